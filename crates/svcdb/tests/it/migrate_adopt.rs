//! `Migrator::adopt`: schemas migrated by diesel, sqlx, golang-migrate, goose, dbmate, Flyway
//! and refinery, each history table created with the tool's own DDL and written as the tool
//! writes it, adopted; and the refusals.

use std::hash::{Hash, Hasher};
use std::path::Path;

use sha2::Digest;
use svcdb::migrate::{AdoptError, AdoptOptions, AdoptProblem, Tool};
use svcdb::testing::TestDb;
use svcdb::ServiceDb;

use crate::migrate_runner::{migrator, write};

async fn sql(svc: &ServiceDb, sql: &str) {
    svc.get().await.unwrap().batch_execute(sql).await.unwrap();
}

/// svcdb's history, as (version text, name).
async fn ours(svc: &ServiceDb) -> Vec<(String, String)> {
    let conn = svc.get().await.unwrap();
    let sql = format!(
        "SELECT version_text, name FROM {}.svcdb_migrations ORDER BY version",
        svc.schema()
    );
    match conn.query(&sql, &[]).await {
        Ok(rows) => rows.iter().map(|r| (r.get(0), r.get(1))).collect(),
        Err(_) => Vec::new(),
    }
}

/// Adopts, then checks that `status` says up to date and that `recorded` were recorded.
async fn adopt_then_up_to_date(svc: &ServiceDb, dir: &Path, tool: Tool, recorded: &[&str]) {
    let m = migrator(svc, dir);
    let report = m.adopt(&AdoptOptions::from(tool)).await.unwrap();
    let versions: Vec<String> = report
        .recorded
        .iter()
        .map(|e| e.version.to_string())
        .collect();
    assert_eq!(versions, recorded, "{report:?}");
    let status = m.status().await.unwrap();
    let pending: Vec<String> = status.pending().map(|e| e.version.to_string()).collect();
    assert_eq!(
        pending,
        report
            .pending
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
    );
    if !pending.is_empty() {
        m.up().await.unwrap();
    }
    let status = m.status().await.unwrap();
    assert!(status.is_up_to_date(), "{status:?}");
}

fn sha384(text: &str) -> Vec<u8> {
    sha2::Sha384::digest(text.as_bytes()).to_vec()
}

#[tokio::test]
async fn diesel_schema_is_adopted() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[
            // Lemmy's first two: diesel's setup, then a wider run of zeros that diesel (comparing
            // texts) runs after it.
            ("00000000000000_diesel_initial_setup/up.sql", "SELECT 1;"),
            ("000000000000000_forbid_diesel_cli/up.sql", "SELECT 2;"),
            (
                "2025-11-19-091444-0000_a/up.sql",
                "CREATE TABLE a (id int);",
            ),
            ("2026-01-20-162913_b/up.sql", "CREATE TABLE b (id int);"),
        ],
    );
    // diesel's DDL, in public (diesel runs on the search path's first schema); its versions
    // without the dashes.
    sql(
        &svc,
        "CREATE TABLE public.__diesel_schema_migrations (
             version VARCHAR(50) PRIMARY KEY NOT NULL,
             run_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
         );
         INSERT INTO public.__diesel_schema_migrations (version) VALUES ('00000000000000'), ('000000000000000'), ('202511190914440000'), ('20260120162913');
         CREATE TABLE shop.a (id int); CREATE TABLE shop.b (id int);",
    )
    .await;
    adopt_then_up_to_date(
        &svc,
        dir.path(),
        Tool::Diesel,
        &[
            "00000000000000",
            "000000000000000",
            "2025-11-19-091444-0000",
            "2026-01-20-162913",
        ],
    )
    .await;
    // The other tool's table is left as it was.
    let conn = svc.get().await.unwrap();
    let n: i64 = conn
        .query_one(
            "SELECT count(*) FROM public.__diesel_schema_migrations",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 4);
}

const SQLX_A: &str = "CREATE TABLE a (id int);\n";
const SQLX_B: &str = "CREATE TABLE b (id int);\n";

/// sqlx's DDL (sqlx-postgres `ensure_migrations_table`).
fn sqlx_table(schema: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {schema}._sqlx_migrations (
             version BIGINT PRIMARY KEY,
             description TEXT NOT NULL,
             installed_on TIMESTAMPTZ NOT NULL DEFAULT now(),
             success BOOLEAN NOT NULL,
             checksum BYTEA NOT NULL,
             execution_time BIGINT NOT NULL
         )"
    )
}

async fn sqlx_schema(svc: &ServiceDb, dir: &Path, b_success: bool, b_checksum: &[u8]) {
    write(
        dir,
        &[
            ("20240101000000_a.sql", SQLX_A),
            ("20240102000000_b.sql", SQLX_B),
            ("20240103000000_c.sql", "CREATE TABLE c (id int);\n"),
        ],
    );
    sql(
        svc,
        &format!(
            "{}; CREATE TABLE shop.a (id int); CREATE TABLE shop.b (id int);",
            sqlx_table("shop")
        ),
    )
    .await;
    let conn = svc.get().await.unwrap();
    for (version, description, success, checksum) in [
        (20240101000000_i64, "a", true, sha384(SQLX_A)),
        (20240102000000, "b", b_success, b_checksum.to_vec()),
    ] {
        conn.execute(
            "INSERT INTO shop._sqlx_migrations (version, description, success, checksum, execution_time)
             VALUES ($1, $2, $3, $4, 1000)",
            &[&version, &description, &success, &checksum],
        )
        .await
        .unwrap();
    }
}

#[tokio::test]
async fn sqlx_schema_is_adopted_and_the_pending_one_runs() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    sqlx_schema(&svc, dir.path(), true, &sha384(SQLX_B)).await;
    adopt_then_up_to_date(
        &svc,
        dir.path(),
        Tool::Sqlx,
        &["20240101000000", "20240102000000"],
    )
    .await;
}

#[tokio::test]
async fn sqlx_checksum_mismatch_and_failure_are_refused_naming_each_version() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    sqlx_schema(
        &svc,
        dir.path(),
        true,
        &sha384("CREATE TABLE b (id bigint);\n"),
    )
    .await;
    let m = migrator(&svc, dir.path());
    let err = m.adopt(&AdoptOptions::from(Tool::Sqlx)).await.unwrap_err();
    assert!(err.is_refused(), "{err}");
    assert!(
        matches!(err.problems(), [AdoptProblem::ChecksumMismatch { version, .. }] if version == "20240102000000"),
        "{err}"
    );
    assert!(err.to_string().contains("20240102000000"), "{err}");
    assert_eq!(ours(&svc).await, [] as [(String, String); 0]);

    sql(
        &svc,
        "UPDATE shop._sqlx_migrations SET success = false WHERE version = 20240102000000",
    )
    .await;
    let err = m.adopt(&AdoptOptions::from(Tool::Sqlx)).await.unwrap_err();
    assert!(
        matches!(err.problems(), [AdoptProblem::Dirty { version }] if version == "20240102000000"),
        "{err}"
    );
    assert_eq!(ours(&svc).await, [] as [(String, String); 0]);
}

/// golang-migrate's DDL (database/postgres `ensureVersionTable`) and its one row.
async fn golang_migrate_schema(svc: &ServiceDb, dir: &Path, version: i64, dirty: bool) {
    write(
        dir,
        &[
            ("1_a.up.sql", "CREATE TABLE a (id int);"),
            ("1_a.down.sql", "DROP TABLE a;"),
            ("2_b.up.sql", "CREATE TABLE b (id int);"),
            ("3_c.up.sql", "CREATE TABLE c (id int);"),
        ],
    );
    sql(
        svc,
        &format!(
            "CREATE TABLE IF NOT EXISTS shop.schema_migrations (version bigint not null primary key, dirty boolean not null);
             INSERT INTO shop.schema_migrations (version, dirty) VALUES ({version}, {dirty});
             CREATE TABLE shop.a (id int); CREATE TABLE shop.b (id int);"
        ),
    )
    .await;
}

#[tokio::test]
async fn golang_migrate_schema_is_adopted_up_to_its_version() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    golang_migrate_schema(&svc, dir.path(), 2, false).await;
    adopt_then_up_to_date(&svc, dir.path(), Tool::GolangMigrate, &["1", "2"]).await;
}

/// Found by a trial on a Flyway folder: on a schema the other tool migrated, `up` (and
/// `validate`) said nothing of it, refused only the lint's findings on tables that already
/// existed, and with `--allow-unsafe` ran the migrations again over them. Both (and the lint)
/// now refuse first, pointing to `adopt`; after it, `up` runs only what the tool did not. Controls: the
/// same history table with no row, and the same rows in a schema that holds no table, do
/// not refuse.
#[tokio::test]
async fn up_over_another_tools_applied_history_is_refused_until_it_is_adopted() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    golang_migrate_schema(&svc, dir.path(), 2, false).await;
    let m = migrator(&svc, dir.path());
    // The lint too (found by a trial: it linted the folder as a deploy and passed).
    for err in [
        m.validate().await.unwrap_err(),
        m.lint_pending().await.unwrap_err(),
        m.up().await.unwrap_err(),
    ] {
        match &err {
            svcdb::migrate::MigrateError::OtherToolApplied { other, .. } => {
                assert_eq!(other.tool, Tool::GolangMigrate, "{err}");
                assert_eq!(other.table, "shop.schema_migrations", "{err}");
            }
            other => panic!("expected OtherToolApplied, got {other}"),
        }
    }
    assert!(ours(&svc).await.is_empty(), "nothing was run");
    adopt_then_up_to_date(&svc, dir.path(), Tool::GolangMigrate, &["1", "2"]).await;

    // Controls. The tool's table without a row: it applied nothing.
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    golang_migrate_schema(&svc, dir.path(), 2, false).await;
    sql(
        &svc,
        "DELETE FROM shop.schema_migrations; DROP TABLE shop.a, shop.b; CREATE TABLE shop.kept (id int)",
    )
    .await;
    migrator(&svc, dir.path()).up().await.unwrap();
    // Its rows, in a schema with no table of its own: nothing to run over.
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    golang_migrate_schema(&svc, dir.path(), 2, false).await;
    sql(&svc, "DROP TABLE shop.a, shop.b").await;
    migrator(&svc, dir.path()).up().await.unwrap();
}

#[tokio::test]
async fn golang_migrate_dirty_is_refused_and_dbmate_does_not_read_its_table() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    golang_migrate_schema(&svc, dir.path(), 2, true).await;
    let m = migrator(&svc, dir.path());
    let err = m
        .adopt(&AdoptOptions::from(Tool::GolangMigrate))
        .await
        .unwrap_err();
    assert!(
        matches!(err.problems(), [AdoptProblem::Dirty { version }] if version == "2"),
        "{err}"
    );
    let err = m
        .adopt(&AdoptOptions::from(Tool::Dbmate))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            AdoptError::NotTheToolsTable {
                looks_like: Some(Tool::GolangMigrate),
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(ours(&svc).await, [] as [(String, String); 0]);
}

/// Found by a user trial: over golang-migrate's dirty version, `up` and `status` pointed at
/// `adopt` (which then refused the dirty version), and `baseline` recorded the versions below
/// it without a word. All three now name the dirty version; the control, the same history
/// clean, lets `baseline` record.
#[tokio::test]
async fn another_tools_dirty_version_is_named_by_up_and_refused_by_baseline() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    golang_migrate_schema(&svc, dir.path(), 2, true).await;
    let m = migrator(&svc, dir.path());
    let one = svcdb::migrate::Version::from(1u32);
    for err in [
        m.up().await.unwrap_err(),
        m.validate().await.unwrap_err(),
        m.baseline(&one).await.unwrap_err(),
    ] {
        let svcdb::migrate::MigrateError::OtherToolApplied { other, .. } = &err else {
            panic!("expected OtherToolApplied, got {err}");
        };
        assert_eq!(other.dirty, ["2"], "{err}");
    }
    assert!(ours(&svc).await.is_empty(), "nothing was recorded");

    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    golang_migrate_schema(&svc, dir.path(), 2, false).await;
    let m = migrator(&svc, dir.path());
    let svcdb::migrate::MigrateError::OtherToolApplied { other, .. } = m.up().await.unwrap_err()
    else {
        panic!("expected OtherToolApplied");
    };
    assert!(other.dirty.is_empty(), "{other:?}");
    assert_eq!(m.baseline(&one).await.unwrap().recorded.len(), 1);
}

/// goose's history table (postgres dialect), in schema `shop`.
const GOOSE_TABLE: &str = "CREATE TABLE shop.goose_db_version (
    id integer PRIMARY KEY GENERATED BY DEFAULT AS IDENTITY,
    version_id bigint NOT NULL,
    is_applied boolean NOT NULL,
    tstamp timestamp NOT NULL DEFAULT now()
);";

#[tokio::test]
async fn goose_schema_is_adopted_with_its_is_applied_rows() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[
            (
                "00001_a.sql",
                "-- +goose Up\nCREATE TABLE a (id int);\n-- +goose Down\nDROP TABLE a;\n",
            ),
            (
                "00002_b.sql",
                "-- +goose Up\nCREATE TABLE b (id int);\n-- +goose Down\nDROP TABLE b;\n",
            ),
            (
                "00003_c.sql",
                "-- +goose Up\nCREATE TABLE c (id int);\n-- +goose Down\nDROP TABLE c;\n",
            ),
        ],
    );
    // goose's DDL (postgres dialect) and its rows: the initial 0, ups of 1 to 3, and a down of
    // 3 (goose before v3.16 appended `is_applied = false`).
    sql(
        &svc,
        &format!(
            "{GOOSE_TABLE}
             INSERT INTO shop.goose_db_version (version_id, is_applied)
             VALUES (0, true), (1, true), (2, true), (3, true), (3, false);
             CREATE TABLE shop.a (id int); CREATE TABLE shop.b (id int);"
        ),
    )
    .await;
    adopt_then_up_to_date(&svc, dir.path(), Tool::Goose, &["00001", "00002"]).await;
}

/// Found by a user trial of a rolling switch: after the adoption, a replica of the old release
/// ran goose at start-up and applied version 3 first; `up` then ran it again ("relation c
/// already exists", or worse, an effect twice). It is refused, naming the version, until
/// adopting again records it; a version goose has not applied runs as usual (the control).
#[tokio::test]
async fn up_refuses_a_pending_version_the_old_tool_applied_after_the_adoption() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    let goose = |n: u32| {
        (
            format!("0000{n}_t{n}.sql"),
            format!(
                "-- +goose Up\nCREATE TABLE t{n} (id int);\n-- +goose Down\nDROP TABLE t{n};\n"
            ),
        )
    };
    let files: Vec<(String, String)> = (1..=4).map(goose).collect();
    let files: Vec<(&str, &str)> = files
        .iter()
        .map(|(n, s)| (n.as_str(), s.as_str()))
        .collect();
    write(dir.path(), &files);
    sql(
        &svc,
        &format!(
            "{GOOSE_TABLE}
             INSERT INTO shop.goose_db_version (version_id, is_applied) VALUES (0, true), (1, true), (2, true);
             CREATE TABLE shop.t1 (id int); CREATE TABLE shop.t2 (id int);"
        ),
    )
    .await;
    let m = migrator(&svc, dir.path());
    m.adopt(&AdoptOptions::from(Tool::Goose)).await.unwrap();
    // The old release's goose applies version 3.
    sql(
        &svc,
        "INSERT INTO shop.goose_db_version (version_id, is_applied) VALUES (3, true);
         CREATE TABLE shop.t3 (id int);",
    )
    .await;
    // `validate` (what `svcdb migrate status` asks) says so too.
    let refused = m.validate().await.map(drop).expect_err("3 is goose's now");
    assert!(
        matches!(
            refused,
            svcdb::migrate::MigrateError::AppliedByOtherTool { .. }
        ),
        "{refused}"
    );
    match m.up().await.map(drop).expect_err("3 is goose's now") {
        svcdb::migrate::MigrateError::AppliedByOtherTool {
            other, versions, ..
        } => {
            assert_eq!(other.tool, Tool::Goose);
            assert_eq!(versions, ["00003"]);
        }
        other => panic!("expected AppliedByOtherTool, got {other}"),
    }
    let report = m.adopt(&AdoptOptions::from(Tool::Goose)).await.unwrap();
    let recorded: Vec<String> = report
        .recorded
        .iter()
        .map(|e| e.version.to_string())
        .collect();
    assert_eq!(recorded, ["00003"]);
    let up = m.up().await.unwrap();
    assert_eq!(up.migrations.len(), 1, "4 runs: {up:?}");
    assert!(m.status().await.unwrap().is_up_to_date());
}

/// Found by a user trial: `--from sqlx` on a schema goose migrated said only "check `--from`",
/// though the goose table was right there; and `--history-table` named as SQL names tables
/// (`"shop"."goose_db_version"`, `SHOP.GOOSE_DB_VERSION`) was looked up as written.
#[tokio::test]
async fn adopt_names_the_tool_whose_table_is_there_and_reads_quoted_table_names() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[(
            "00001_a.sql",
            "-- +goose Up\nCREATE TABLE a (id int);\n-- +goose Down\nDROP TABLE a;\n",
        )],
    );
    sql(
        &svc,
        &format!(
            "{GOOSE_TABLE}
             INSERT INTO shop.goose_db_version (version_id, is_applied) VALUES (0, true), (1, true);
             CREATE TABLE shop.a (id int);"
        ),
    )
    .await;
    let m = migrator(&svc, dir.path());
    match m.adopt(&AdoptOptions::from(Tool::Sqlx)).await {
        Err(AdoptError::NoHistoryTable { found, .. }) => {
            let tools: Vec<Tool> = found.iter().map(|o| o.tool).collect();
            assert_eq!(tools, [Tool::Goose]);
        }
        other => panic!("expected NoHistoryTable, got {other:?}"),
    }
    for named in ["\"shop\".\"goose_db_version\"", "SHOP.GOOSE_DB_VERSION"] {
        let report = m
            .adopt(&AdoptOptions {
                dry_run: true,
                history_table: Some(named.to_owned()),
                ..AdoptOptions::from(Tool::Goose)
            })
            .await
            .unwrap_or_else(|e| panic!("{named}: {e}"));
        assert_eq!(report.recorded.len(), 1, "{named}");
    }
    // The control: a name with a part quoted otherwise is another table.
    let missing = m
        .adopt(&AdoptOptions {
            dry_run: true,
            history_table: Some("\"SHOP\".goose_db_version".to_owned()),
            ..AdoptOptions::from(Tool::Goose)
        })
        .await
        .map(drop)
        .expect_err("no schema SHOP");
    assert!(missing.is_no_history_table(), "{missing}");
}

/// Found adopting a real goose schema: a middle version goose had rolled back (its newer ones
/// still applied) came out pending, and adopt said "run `svcdb migrate up`", which refused it
/// as out of order. The report names it; `up` with `allow_out_of_order` applies it, and
/// without it refuses (the control).
#[tokio::test]
async fn a_version_the_other_tool_rolled_back_below_applied_ones_is_named_out_of_order() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[
            ("00001_a.sql", "-- +goose Up\nCREATE TABLE a (id int);\n"),
            ("00002_b.sql", "-- +goose Up\nCREATE TABLE b (id int);\n"),
            ("00003_c.sql", "-- +goose Up\nCREATE TABLE c (id int);\n"),
        ],
    );
    sql(
        &svc,
        &format!(
            "{GOOSE_TABLE}
             INSERT INTO shop.goose_db_version (version_id, is_applied)
             VALUES (0, true), (1, true), (2, true), (2, false), (3, true);
             CREATE TABLE shop.a (id int); CREATE TABLE shop.c (id int);"
        ),
    )
    .await;
    let m = migrator(&svc, dir.path());
    let report = m.adopt(&AdoptOptions::from(Tool::Goose)).await.unwrap();
    let names = |v: &[svcdb::migrate::Version]| -> Vec<String> {
        v.iter().map(ToString::to_string).collect()
    };
    assert_eq!(names(&report.pending), ["00002"]);
    assert_eq!(names(&report.out_of_order), ["00002"]);
    assert!(matches!(
        m.up().await,
        Err(svcdb::migrate::MigrateError::OutOfOrder { .. })
    ));
    migrator(&svc, dir.path())
        .with_options(svcdb::migrate::MigrateOptions {
            allow_out_of_order: true,
            ..svcdb::migrate::MigrateOptions::default()
        })
        .up()
        .await
        .unwrap();
    assert!(m.status().await.unwrap().is_up_to_date());
}

/// dbmate's history table (its DDL: pkg/driver/postgres `CreateMigrationsTable`) recording
/// versions `20240101000000` and `20240102000000`, and the table they made.
async fn dbmate_applied_two(svc: &ServiceDb) {
    sql(
        svc,
        "CREATE TABLE IF NOT EXISTS shop.schema_migrations (version varchar(128) primary key);
         INSERT INTO shop.schema_migrations (version) VALUES ('20240101000000'), ('20240102000000');
         CREATE TABLE shop.a (id int);",
    )
    .await;
}

#[tokio::test]
async fn dbmate_schema_is_adopted_and_a_missing_file_is_refused() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[(
            "20240101000000_a.sql",
            "-- migrate:up\nCREATE TABLE a (id int);\n\n-- migrate:down\nDROP TABLE a;\n",
        )],
    );
    dbmate_applied_two(&svc).await;
    let m = migrator(&svc, dir.path());
    let err = m
        .adopt(&AdoptOptions::from(Tool::Dbmate))
        .await
        .unwrap_err();
    assert!(
        matches!(err.problems(), [AdoptProblem::NoFile { version }] if version == "20240102000000"),
        "{err}"
    );
    assert_eq!(ours(&svc).await, [] as [(String, String); 0]);
    // The control: with the file back, it is adopted.
    write(
        dir.path(),
        &[(
            "20240102000000_b.sql",
            "-- migrate:up\nSELECT 1;\n-- migrate:down\n",
        )],
    );
    adopt_then_up_to_date(
        &svc,
        dir.path(),
        Tool::Dbmate,
        &["20240101000000", "20240102000000"],
    )
    .await;
}

/// ory's popx (kratos, hydra, keto) keeps `schema_migration` (its DDL: popx
/// `createTransactionalMigrationTable`) and counts a 14-digit row, written before its versions
/// had 20 digits, for the migration whose version starts with it. Both kinds of rows are
/// adopted, and the migration no row names stays pending; a row no file has is refused.
#[tokio::test]
async fn a_pop_schema_with_legacy_rows_is_adopted() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[
            (
                "20150100000001000000_networks.postgres.up.sql",
                "CREATE TABLE networks (id int);",
            ),
            (
                "20150100000001000000_networks.mysql.up.sql",
                "CREATE TABLE networks (id int) ENGINE=InnoDB;",
            ),
            (
                "20200519101057000000_identities.postgres.up.sql",
                "CREATE TABLE identities (id int);",
            ),
            (
                "20210410175418000000_sessions.up.sql",
                "CREATE TABLE sessions (id int);",
            ),
        ],
    );
    sql(
        &svc,
        "CREATE TABLE shop.schema_migration (version VARCHAR (48) NOT NULL, version_self INT NOT NULL DEFAULT 0);
         CREATE UNIQUE INDEX schema_migration_version_idx ON shop.schema_migration (version);
         INSERT INTO shop.schema_migration (version) VALUES ('20150100000001'), ('20200519101057000000'), ('20190100000001');
         CREATE TABLE shop.networks (id int); CREATE TABLE shop.identities (id int);",
    )
    .await;
    let m = migrator(&svc, dir.path());
    let err = m.adopt(&AdoptOptions::from(Tool::Pop)).await.unwrap_err();
    assert!(
        matches!(err.problems(), [AdoptProblem::NoFile { version }] if version == "20190100000001"),
        "{err}"
    );
    // The control: without the row no file has, both others are adopted.
    sql(
        &svc,
        "DELETE FROM shop.schema_migration WHERE version = '20190100000001'",
    )
    .await;
    adopt_then_up_to_date(
        &svc,
        dir.path(),
        Tool::Pop,
        &["20150100000001000000", "20200519101057000000"],
    )
    .await;
}

/// Found by a user trial: a folder whose oldest versions were squashed into a later one (the
/// other tool keeps working over their rows) could not be adopted, and the refusal named no
/// way out. `ignore_missing` leaves them out with a warning; without it the refusal names it.
#[tokio::test]
async fn versions_squashed_away_are_left_out_with_ignore_missing() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[(
            "20240102000000_squashed.sql",
            "-- migrate:up\nCREATE TABLE a (id int);\n-- migrate:down\nDROP TABLE a;\n",
        )],
    );
    dbmate_applied_two(&svc).await;
    let m = migrator(&svc, dir.path());
    let err = m
        .adopt(&AdoptOptions::from(Tool::Dbmate))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("--ignore-missing"), "{err}");
    let report = m
        .adopt(&AdoptOptions {
            ignore_missing: true,
            ..AdoptOptions::from(Tool::Dbmate)
        })
        .await
        .unwrap();
    assert_eq!(
        ours(&svc)
            .await
            .into_iter()
            .map(|(v, _)| v)
            .collect::<Vec<_>>(),
        ["20240102000000"]
    );
    assert_eq!(report.warnings.len(), 1, "{report:?}");
    assert!(report.warnings[0].contains("20240101000000"), "{report:?}");
    assert!(m.status().await.unwrap().is_up_to_date());
}

/// Found by a later trial: with every applied version squashed into a new file, `adopt
/// --ignore-missing` recorded nothing and said "run up", and `up` refused, pointing back at
/// adopt. It now refuses, naming `baseline`, which records the squashed file.
#[tokio::test]
async fn a_history_squashed_whole_is_refused_with_the_baseline_to_run() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[(
            "20240103000000_squashed.sql",
            "-- migrate:up\nCREATE TABLE a (id int);\n-- migrate:down\nDROP TABLE a;\n",
        )],
    );
    dbmate_applied_two(&svc).await;
    let m = migrator(&svc, dir.path());
    let err = m
        .adopt(&AdoptOptions {
            ignore_missing: true,
            ..AdoptOptions::from(Tool::Dbmate)
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&err, AdoptError::NothingLeft { left_out, .. } if left_out.len() == 2),
        "{err}"
    );
    assert!(err.to_string().contains("svcdb migrate baseline"), "{err}");
    assert_eq!(ours(&svc).await, [] as [(String, String); 0]);
    m.baseline(&"20240103000000".parse().unwrap())
        .await
        .unwrap();
    assert!(m.status().await.unwrap().is_up_to_date());
}

/// Flyway's DDL (PostgreSQL `createMetaDataTable.sql`).
pub(crate) const FLYWAY_DDL: &str = "CREATE TABLE shop.flyway_schema_history (
    installed_rank INT NOT NULL,
    version VARCHAR(50),
    description VARCHAR(200) NOT NULL,
    type VARCHAR(20) NOT NULL,
    script VARCHAR(1000) NOT NULL,
    checksum INTEGER,
    installed_by VARCHAR(100) NOT NULL,
    installed_on TIMESTAMP NOT NULL DEFAULT now(),
    execution_time INTEGER NOT NULL,
    success BOOLEAN NOT NULL
);
ALTER TABLE shop.flyway_schema_history ADD CONSTRAINT flyway_schema_history_pk PRIMARY KEY (installed_rank);
CREATE INDEX flyway_schema_history_s_idx ON shop.flyway_schema_history (success);";

#[tokio::test]
async fn flyway_schema_is_adopted_with_its_crc32_checksums() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[
            ("V1__a.sql", "CREATE TABLE a (id int);\n"),
            (
                "V2__b.sql",
                "CREATE TABLE b (id int);\r\nINSERT INTO b VALUES (1);\r\n",
            ),
            ("V3__c.sql", "CREATE TABLE c (id int);\n"),
        ],
    );
    // The checksums Flyway records for these files: CRC32 of the lines without their endings,
    // as a signed int (computed independently, with Python's zlib.crc32).
    sql(
        &svc,
        &format!(
            "{FLYWAY_DDL}
             INSERT INTO shop.flyway_schema_history VALUES
               (0, NULL, '<< Flyway Schema Creation >>', 'SCHEMA', '\"shop\"', NULL, 'me', now(), 0, true),
               (1, '1', 'a', 'SQL', 'V1__a.sql', -623083431, 'me', now(), 5, true),
               (2, '2', 'b', 'SQL', 'V2__b.sql', 914031549, 'me', now(), 5, true);
             CREATE TABLE shop.a (id int); CREATE TABLE shop.b (id int);"
        ),
    )
    .await;
    let m = migrator(&svc, dir.path());
    let dry = m
        .adopt(&AdoptOptions {
            dry_run: true,
            ..AdoptOptions::from(Tool::Flyway)
        })
        .await
        .unwrap();
    assert_eq!(dry.recorded.len(), 2);
    assert_eq!(
        ours(&svc).await,
        [] as [(String, String); 0],
        "a dry run writes nothing"
    );
    adopt_then_up_to_date(&svc, dir.path(), Tool::Flyway, &["1", "2"]).await;
}

#[tokio::test]
async fn flyway_dotted_versions_are_adopted_applied_and_reverted_in_flyways_order() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[
            ("V1__a.sql", "CREATE TABLE a (id int);\n"),
            // Flyway reads `1_1` as 1.1, and 1.10 after 1.2.
            ("V1_1__b.sql", "CREATE TABLE b (id int);\n"),
            ("U1_1__b.sql", "DROP TABLE b;\n"),
            ("V1.10__d.sql", "CREATE TABLE d (id int);\n"),
            ("U1.10__d.sql", "DROP TABLE d;\n"),
            ("V1.2__c.sql", "CREATE TABLE c (id int);\n"),
            ("U1.2__c.sql", "DROP TABLE c;\n"),
            // The digits of 1.1.
            ("V11__e.sql", "CREATE TABLE e (id int);\n"),
            ("U11__e.sql", "DROP TABLE e;\n"),
        ],
    );
    // Flyway records the version with dots; checksums as Python's zlib.crc32 computes them.
    sql(
        &svc,
        &format!(
            "{FLYWAY_DDL}
             INSERT INTO shop.flyway_schema_history VALUES
               (1, '1', 'a', 'SQL', 'V1__a.sql', -623083431, 'me', now(), 5, true),
               (2, '1.1', 'b', 'SQL', 'V1_1__b.sql', 1128195672, 'me', now(), 5, true);
             CREATE TABLE shop.a (id int); CREATE TABLE shop.b (id int);"
        ),
    )
    .await;
    // Adopts 1 and 1.1; 1.2, 1.10 and 11 are pending and applied.
    adopt_then_up_to_date(&svc, dir.path(), Tool::Flyway, &["1", "1.1"]).await;
    assert_eq!(
        ours(&svc).await.len(),
        5,
        "five history rows, though `1.1` has the digits of `11`"
    );
    let m = migrator(&svc, dir.path());
    let down = m
        .down(&svcdb::migrate::DownOptions {
            to: Some("1".parse().unwrap()),
            ..Default::default()
        })
        .await
        .unwrap();
    let reverted: Vec<String> = down
        .migrations
        .iter()
        .map(|e| e.version.to_string())
        .collect();
    assert_eq!(reverted, ["11", "1.10", "1.2", "1.1"]);
    let left: Vec<String> = ours(&svc).await.into_iter().map(|(v, _)| v).collect();
    assert_eq!(left, ["1"]);
    m.up().await.unwrap();
    assert!(m.status().await.unwrap().is_up_to_date());
}

#[tokio::test]
async fn flyway_failed_and_changed_versions_are_refused() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[
            ("V1__a.sql", "CREATE TABLE a (id bigint);\n"),
            ("V2__b.sql", "CREATE TABLE b (id int);\n"),
        ],
    );
    sql(
        &svc,
        &format!(
            "{FLYWAY_DDL}
             INSERT INTO shop.flyway_schema_history VALUES
               (1, '1', 'a', 'SQL', 'V1__a.sql', -623083431, 'me', now(), 5, true),
               (2, '2', 'b', 'SQL', 'V2__b.sql', 1, 'me', now(), 5, false);"
        ),
    )
    .await;
    let err = migrator(&svc, dir.path())
        .adopt(&AdoptOptions::from(Tool::Flyway))
        .await
        .unwrap_err();
    let problems = err.problems();
    assert_eq!(problems.len(), 2, "{err}");
    assert!(
        matches!(&problems[0], AdoptProblem::Dirty { version } if version == "2"),
        "{err}"
    );
    assert!(
        matches!(&problems[1], AdoptProblem::ChecksumMismatch { version, .. } if version == "1"),
        "{err}"
    );
}

#[tokio::test]
async fn a_file_changed_on_purpose_is_adopted_with_allow_changed_and_a_warning() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    // Flyway applied `CREATE TABLE a (id int);` (-623083431); the file has since gained svcdb's
    // directive, which the database does not see.
    write(
        dir.path(),
        &[(
            "V1__a.sql",
            "-- svcdb:no-transaction\nCREATE TABLE a (id int);\n",
        )],
    );
    sql(
        &svc,
        &format!(
            "{FLYWAY_DDL}
             INSERT INTO shop.flyway_schema_history VALUES
               (1, '1', 'a', 'SQL', 'V1__a.sql', -623083431, 'me', now(), 5, true);
             CREATE TABLE shop.a (id int);"
        ),
    )
    .await;
    let m = migrator(&svc, dir.path());
    let err = m
        .adopt(&AdoptOptions::from(Tool::Flyway))
        .await
        .unwrap_err();
    assert!(
        matches!(err.problems(), [AdoptProblem::ChecksumMismatch { version, .. }] if version == "1"),
        "{err}"
    );
    assert!(err.to_string().contains("--allow-changed"), "{err}");
    let report = m
        .adopt(&AdoptOptions {
            allow_changed: true,
            ..AdoptOptions::from(Tool::Flyway)
        })
        .await
        .unwrap();
    assert_eq!(report.recorded.len(), 1);
    assert_eq!(report.warnings.len(), 1, "{report:?}");
    assert!(m.status().await.unwrap().is_up_to_date());
}

/// refinery's checksum, as `refinery_core::Migration::unapplied` computes it.
fn refinery_checksum(name: &str, version: i32, sql: &str) -> String {
    let mut hasher = siphasher::sip::SipHasher13::new();
    name.hash(&mut hasher);
    version.hash(&mut hasher);
    sql.hash(&mut hasher);
    hasher.finish().to_string()
}

#[tokio::test]
async fn refinery_schema_is_adopted_and_a_changed_file_is_refused() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    let a = "CREATE TABLE a (id int);\n";
    write(
        dir.path(),
        &[("V1__initial.sql", a), ("V2__more.sql", "SELECT 1;\n")],
    );
    // refinery's DDL (`ASSERT_MIGRATIONS_TABLE_QUERY`) in public, its default.
    sql(
        &svc,
        "CREATE TABLE IF NOT EXISTS public.refinery_schema_history(
             version INT4 PRIMARY KEY,
             name VARCHAR(255),
             applied_on VARCHAR(255),
             checksum VARCHAR(255));
         CREATE TABLE shop.a (id int);",
    )
    .await;
    let conn = svc.get().await.unwrap();
    conn.execute(
        "INSERT INTO public.refinery_schema_history (version, name, applied_on, checksum)
         VALUES (1, 'initial', '2026-01-01T00:00:00+00:00', $1)",
        &[&refinery_checksum(
            "initial",
            1,
            "CREATE TABLE a (id bigint);\n",
        )],
    )
    .await
    .unwrap();
    let m = migrator(&svc, dir.path());
    let err = m
        .adopt(&AdoptOptions::from(Tool::Refinery))
        .await
        .unwrap_err();
    assert!(
        matches!(err.problems(), [AdoptProblem::ChecksumMismatch { version, .. }] if version == "1"),
        "{err}"
    );
    conn.execute(
        "UPDATE public.refinery_schema_history SET checksum = $1",
        &[&refinery_checksum("initial", 1, a)],
    )
    .await
    .unwrap();
    adopt_then_up_to_date(&svc, dir.path(), Tool::Refinery, &["1"]).await;
}

#[tokio::test]
async fn no_history_table_names_where_it_looked() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), &[("1_a.up.sql", "SELECT 1;")]);
    let err = migrator(&svc, dir.path())
        .adopt(&AdoptOptions::from(Tool::Sqlx))
        .await
        .unwrap_err();
    assert!(err.is_no_history_table(), "{err}");
    assert!(err.to_string().contains("public._sqlx_migrations"), "{err}");
}

#[tokio::test]
async fn flyway_baseline_counts_every_file_up_to_it_and_an_undone_version_is_pending() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[
            ("V1__a.sql", "CREATE TABLE a (id int);\n"),
            (
                "V2__b.sql",
                "CREATE TABLE b (id int);\r\nINSERT INTO b VALUES (1);\r\n",
            ),
            ("V3__c.sql", "CREATE TABLE c (id int);\n"),
            ("U3__c.sql", "DROP TABLE c;\n"),
        ],
    );
    // `flyway baseline` at 1, then V2 and V3 applied, then V3 undone (`flyway undo`).
    sql(
        &svc,
        &format!(
            "{FLYWAY_DDL}
             INSERT INTO shop.flyway_schema_history VALUES
               (1, '1', '<< Flyway Baseline >>', 'BASELINE', '<< Flyway Baseline >>', NULL, 'me', now(), 0, true),
               (2, '2', 'b', 'SQL', 'V2__b.sql', 914031549, 'me', now(), 5, true),
               (3, '3', 'c', 'SQL', 'V3__c.sql', 1, 'me', now(), 5, true),
               (4, '3', 'c', 'UNDO_SQL', 'U3__c.sql', 2, 'me', now(), 5, true);
             CREATE TABLE shop.a (id int); CREATE TABLE shop.b (id int);"
        ),
    )
    .await;
    adopt_then_up_to_date(&svc, dir.path(), Tool::Flyway, &["1", "2"]).await;
}

/// Found by a user trial (hawkbit): Flyway 9 runs a baseline migration (`B2__base.sql`) on an
/// empty database in place of every version up to it, and records it as `SQL_BASELINE`; adopt
/// refused that row as "not a SQL file". It counts every file up to it as applied, as a
/// `BASELINE` row does; the later versions keep their checksums.
#[tokio::test]
async fn a_flyway_baseline_migrations_row_counts_every_file_up_to_it() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[
            ("V1__a.sql", "CREATE TABLE a (id int);\n"),
            (
                "V2__b.sql",
                "CREATE TABLE b (id int);\r\nINSERT INTO b VALUES (1);\r\n",
            ),
            (
                "B2__base.sql",
                "CREATE TABLE a (id int);\nCREATE TABLE b (id int);\n",
            ),
            ("V3__c.sql", "CREATE TABLE c (id int);\n"),
        ],
    );
    // V3's checksum as Flyway records it: CRC32 of its lines without their endings (Python's
    // zlib.crc32), as a signed int.
    sql(
        &svc,
        &format!(
            "{FLYWAY_DDL}
             INSERT INTO shop.flyway_schema_history VALUES
               (1, '2', 'base', 'SQL_BASELINE', 'B2__base.sql', 77, 'me', now(), 5, true),
               (2, '3', 'c', 'SQL', 'V3__c.sql', -2102380136, 'me', now(), 5, true);
             CREATE TABLE shop.a (id int); CREATE TABLE shop.b (id int); CREATE TABLE shop.c (id int);"
        ),
    )
    .await;
    adopt_then_up_to_date(&svc, dir.path(), Tool::Flyway, &["1", "2", "3"]).await;
}

#[tokio::test]
async fn sqlx_checksums_of_a_crlf_checkout_match_the_lf_file() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    // Applied by a build from a Windows checkout: sqlx hashed the CRLF bytes.
    sqlx_schema(
        &svc,
        dir.path(),
        true,
        &sha384(&SQLX_B.replace('\n', "\r\n")),
    )
    .await;
    adopt_then_up_to_date(
        &svc,
        dir.path(),
        Tool::Sqlx,
        &["20240101000000", "20240102000000"],
    )
    .await;
}

/// Before svcdb records anything, `status` names another tool's history table, and `up`
/// refuses to run over what that tool made, saying to adopt it; golang-migrate's `schema_migrations`
/// (with `dirty`) is told from dbmate's.
#[tokio::test]
async fn another_tools_history_is_named_until_svcdb_records_something() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[
            ("1_a.up.sql", "CREATE TABLE a (id int);"),
            ("1_a.down.sql", "DROP TABLE a;"),
        ],
    );
    let m = migrator(&svc, dir.path());
    // The control: no other tool's table, nothing named.
    assert_eq!(m.status().await.unwrap().other_histories, []);

    sql(
        &svc,
        "CREATE TABLE shop.schema_migrations (version bigint NOT NULL PRIMARY KEY, dirty boolean NOT NULL);
         INSERT INTO shop.schema_migrations VALUES (1, false);
         CREATE TABLE shop.a (id int);",
    )
    .await;
    let named = |others: &[svcdb::migrate::OtherHistory]| {
        others
            .iter()
            .map(|o| (o.tool, o.table.clone()))
            .collect::<Vec<_>>()
    };
    let expected = [(Tool::GolangMigrate, "shop.schema_migrations".to_owned())];
    assert_eq!(named(&m.status().await.unwrap().other_histories), expected);
    // `up` refuses before running anything over it (see
    // `up_over_another_tools_applied_history_is_refused_until_it_is_adopted`).
    let err = m.up().await.unwrap_err();
    let svcdb::migrate::MigrateError::OtherToolApplied { other, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(named(std::slice::from_ref(other)), expected, "{err}");

    // Adopted, svcdb has a history of its own: nothing is named any more.
    m.adopt(&AdoptOptions::from(Tool::GolangMigrate))
        .await
        .unwrap();
    assert_eq!(m.status().await.unwrap().other_histories, []);

    // Without `dirty`, the same table name is dbmate's.
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    sql(
        &svc,
        "CREATE TABLE shop.schema_migrations (version varchar(128) primary key);",
    )
    .await;
    assert_eq!(
        named(
            &migrator(&svc, dir.path())
                .status()
                .await
                .unwrap()
                .other_histories
        ),
        [(Tool::Dbmate, "shop.schema_migrations".to_owned())]
    );
}

/// Found by a user trial: diesel had migrated `public`, the service was given a new schema,
/// and adopt recorded every migration there (whose tables were in `public`); `up` then failed
/// on the missing tables. Adopt now refuses; the control, with the tables moved into the
/// service schema, adopts. Adopting again after `up` lists nothing as pending.
#[tokio::test]
async fn a_history_in_public_over_an_empty_service_schema_is_refused() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[
            ("2025-01-01-000000_a/up.sql", "CREATE TABLE a (id int);"),
            ("2025-01-02-000000_b/up.sql", "CREATE TABLE b (id int);"),
        ],
    );
    sql(
        &svc,
        "CREATE TABLE public.__diesel_schema_migrations (
             version VARCHAR(50) PRIMARY KEY NOT NULL,
             run_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
         );
         INSERT INTO public.__diesel_schema_migrations (version) VALUES ('20250101000000');
         CREATE TABLE public.a (id int);",
    )
    .await;
    let m = migrator(&svc, dir.path());
    let err = m
        .adopt(&AdoptOptions::from(Tool::Diesel))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, AdoptError::ObjectsElsewhere { elsewhere, schema, .. } if elsewhere == "public" && schema == "shop"),
        "{err}"
    );
    assert_eq!(ours(&svc).await, []);

    sql(&svc, "ALTER TABLE public.a SET SCHEMA shop;").await;
    let report = m.adopt(&AdoptOptions::from(Tool::Diesel)).await.unwrap();
    assert_eq!(report.recorded.len(), 1, "{report:?}");
    assert_eq!(report.pending.len(), 1, "{report:?}");
    m.up().await.unwrap();
    let again = m.adopt(&AdoptOptions::from(Tool::Diesel)).await.unwrap();
    assert_eq!(
        (again.recorded.len(), again.already_recorded.len()),
        (0, 1),
        "{again:?}"
    );
    assert_eq!(again.pending, [], "svcdb applied it since: {again:?}");
}

/// Found by a user trial: `--from diesel --history-table …refinery_schema_history` read
/// refinery's table (it has a `version`) and recorded every migration without checking
/// refinery's checksums. A table with another tool's columns is refused, naming that tool and
/// the `history_table` to adopt it with; adopting so then works (the control: each refused
/// table is adopted from its own tool).
#[tokio::test]
async fn another_tools_table_is_refused_naming_the_tool_it_looks_like() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    let a = "CREATE TABLE a (id int);\n";
    write(dir.path(), &[("V1__initial.sql", a)]);
    sql(
        &svc,
        "CREATE TABLE shop.refinery_schema_history(
             version INT4 PRIMARY KEY,
             name VARCHAR(255),
             applied_on VARCHAR(255),
             checksum VARCHAR(255));
         CREATE TABLE shop.a (id int);",
    )
    .await;
    svc.get()
        .await
        .unwrap()
        .execute(
            "INSERT INTO shop.refinery_schema_history (version, name, applied_on, checksum)
             VALUES (1, 'initial', '2026-01-01T00:00:00+00:00', $1)",
            &[&refinery_checksum("initial", 1, a)],
        )
        .await
        .unwrap();
    let m = migrator(&svc, dir.path());
    for asked in [
        Tool::Diesel,
        Tool::Dbmate,
        Tool::Sqlx,
        Tool::Flyway,
        Tool::GolangMigrate,
        Tool::Goose,
    ] {
        let err = m
            .adopt(&AdoptOptions {
                history_table: Some("shop.refinery_schema_history".to_owned()),
                ..AdoptOptions::from(asked)
            })
            .await
            .unwrap_err();
        let AdoptError::NotTheToolsTable {
            looks_like: Some(Tool::Refinery),
            history_table: Some(retry),
            ..
        } = &err
        else {
            panic!("{asked}: expected a refusal naming refinery, got {err}");
        };
        assert_eq!(retry, "shop.refinery_schema_history", "{asked}: {err}");
        assert!(
            err.to_string().contains("--from refinery"),
            "{asked}: {err}"
        );
    }
    assert_eq!(ours(&svc).await, [] as [(String, String); 0]);
    // Without `history_table`, the refinery table is found under its own name.
    let err = m.adopt(&AdoptOptions::from(Tool::Refinery)).await;
    assert_eq!(err.unwrap().recorded.len(), 1);
}

/// golang-migrate over dbmate's `schema_migrations` names dbmate (and no `history_table`:
/// dbmate finds the same table), dbmate over golang-migrate's names golang-migrate, and diesel
/// over golang-migrate's too; each suggestion then adopts.
#[tokio::test]
async fn golang_migrate_and_dbmate_tables_name_each_other() {
    // dbmate's table, asked as golang-migrate's.
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[(
            "20240101000000_a.sql",
            "-- migrate:up\nCREATE TABLE a (id int);\n-- migrate:down\nDROP TABLE a;\n",
        )],
    );
    sql(
        &svc,
        "CREATE TABLE shop.schema_migrations (version varchar(128) primary key);
         INSERT INTO shop.schema_migrations (version) VALUES ('20240101000000');
         CREATE TABLE shop.a (id int);",
    )
    .await;
    let m = migrator(&svc, dir.path());
    let err = m
        .adopt(&AdoptOptions::from(Tool::GolangMigrate))
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            AdoptError::NotTheToolsTable {
                looks_like: Some(Tool::Dbmate),
                history_table: None,
                missing,
                ..
            } if missing == &["dirty"]
        ),
        "{err}"
    );
    assert!(err.to_string().contains("--from dbmate`"), "{err}");
    let report = m.adopt(&AdoptOptions::from(Tool::Dbmate)).await.unwrap();
    assert_eq!(report.recorded.len(), 1);

    // golang-migrate's table, asked as dbmate's and (named) as diesel's.
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    golang_migrate_schema(&svc, dir.path(), 2, false).await;
    let m = migrator(&svc, dir.path());
    for (asked, named) in [
        (Tool::Dbmate, None),
        (Tool::Diesel, Some("shop.schema_migrations")),
    ] {
        let err = m
            .adopt(&AdoptOptions {
                history_table: named.map(str::to_owned),
                ..AdoptOptions::from(asked)
            })
            .await
            .unwrap_err();
        assert!(
            matches!(
                &err,
                AdoptError::NotTheToolsTable {
                    looks_like: Some(Tool::GolangMigrate),
                    missing,
                    history_table,
                    ..
                } if missing.is_empty() && history_table.as_deref() == named
            ),
            "{asked}: {err}"
        );
    }
    assert_eq!(ours(&svc).await, [] as [(String, String); 0]);
    let report = m
        .adopt(&AdoptOptions::from(Tool::GolangMigrate))
        .await
        .unwrap();
    assert_eq!(report.recorded.len(), 2);
}

/// sqlx's table asked as Flyway's, and Flyway's (which has sqlx's columns too) asked as
/// sqlx's: each names the other, with the table's name to pass.
#[tokio::test]
async fn sqlx_and_flyway_tables_name_each_other() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    sqlx_schema(&svc, dir.path(), true, &sha384(SQLX_B)).await;
    sql(&svc, FLYWAY_DDL).await;
    let m = migrator(&svc, dir.path());
    for (asked, table, other) in [
        (Tool::Flyway, "shop._sqlx_migrations", Tool::Sqlx),
        (Tool::Sqlx, "shop.flyway_schema_history", Tool::Flyway),
    ] {
        let err = m
            .adopt(&AdoptOptions {
                history_table: Some(table.to_owned()),
                ..AdoptOptions::from(asked)
            })
            .await
            .unwrap_err();
        assert!(
            matches!(
                &err,
                AdoptError::NotTheToolsTable { looks_like: Some(o), history_table: Some(t), .. }
                    if *o == other && t == table
            ),
            "{asked}: {err}"
        );
    }
    // Without `history_table`, Flyway asked finds its own (empty) table, and sqlx its own.
    assert_eq!(
        m.adopt(&AdoptOptions::from(Tool::Flyway))
            .await
            .unwrap()
            .recorded
            .len(),
        0
    );
    assert_eq!(
        m.adopt(&AdoptOptions::from(Tool::Sqlx))
            .await
            .unwrap()
            .recorded
            .len(),
        2
    );
}
