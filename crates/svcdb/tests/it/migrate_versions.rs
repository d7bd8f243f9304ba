//! Versions ordered as their tools order them, kept as the files write them, and history tables
//! written before text versions, upgraded in place.

use svcdb::migrate::{DownOptions, MigrateError, MigrationState, Migrations, Migrator, Version};
use svcdb::testing::TestDb;

use crate::migrate_runner::{migrator, write};

/// Writes `files` (name, contents) into `dir`.
fn texts(m: &Migrations) -> Vec<String> {
    m.iter().map(|m| m.version.to_string()).collect()
}

/// A real diesel folder mixes 14-digit and 18-digit versions.
const MIXED_DIESEL: &[(&str, &str)] = &[
    ("2026-01-20-162913_a/up.sql", "CREATE TABLE a (id int);"),
    ("2026-01-20-162913_a/down.sql", "DROP TABLE a;"),
    (
        "2025-11-19-091444-0000_b/up.sql",
        "CREATE TABLE b (id int);",
    ),
    ("2025-11-19-091444-0000_b/down.sql", "DROP TABLE b;"),
];

#[test]
fn a_mixed_width_diesel_folder_orders_chronologically() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), MIXED_DIESEL);
    let m = Migrations::from_dir(dir.path()).unwrap();
    // November 2025 before January 2026, as diesel runs them; as integers (the old order) the
    // 14-digit version came first.
    assert_eq!(texts(&m), ["2025-11-19-091444-0000", "2026-01-20-162913"]);
    assert_eq!(m.latest().unwrap().name, "a");
    // Found by the digits alone, as diesel's own history writes them.
    let b: Version = "202511190914440000".parse().unwrap();
    assert_eq!(m.get(&b).unwrap().name, "b");
}

#[test]
fn sequential_versions_0001_to_0010_still_order_numerically() {
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<(String, String)> = (1..=10)
        .map(|n| {
            (
                format!("{n:04}_m{n}.up.sql"),
                format!("CREATE TABLE t{n} (id int);"),
            )
        })
        .collect();
    let files: Vec<(&str, &str)> = files
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    write(dir.path(), &files);
    write(dir.path(), &[("2_two.sql", "SELECT 1;")]);
    // `2_two` is version 2 like `0002_m2`: the same version twice.
    let err = Migrations::from_dir(dir.path()).unwrap_err();
    assert!(
        matches!(&err, MigrateError::Source { message, .. } if message.contains("used twice")),
        "{err}"
    );
    std::fs::remove_file(dir.path().join("2_two.sql")).unwrap();
    let m = Migrations::from_dir(dir.path()).unwrap();
    let expected: Vec<String> = (1..=10).map(|n| format!("{n:04}")).collect();
    assert_eq!(texts(&m), expected);
}

#[tokio::test]
async fn the_history_keeps_the_version_text_the_file_writes() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), MIXED_DIESEL);
    let report = migrator(&svc, dir.path()).up().await.unwrap();
    let applied = versions(&report.migrations);
    assert_eq!(applied, ["2025-11-19-091444-0000", "2026-01-20-162913"]);
    assert_eq!(
        report.current_version.unwrap().to_string(),
        "2026-01-20-162913"
    );
    let conn = svc.get().await.unwrap();
    let rows = history(&conn).await;
    assert_eq!(
        rows,
        [
            (20260120162913, "2026-01-20-162913".to_owned()),
            (202511190914440000, "2025-11-19-091444-0000".to_owned()),
        ]
    );
    // JSON carries the text.
    let status = migrator(&svc, dir.path()).status().await.unwrap();
    let json = serde_json::to_value(&status).unwrap();
    assert_eq!(json["current_version"], "2026-01-20-162913");
    assert_eq!(json["entries"][0]["version"], "2025-11-19-091444-0000");
}

#[tokio::test]
async fn a_new_14_digit_migration_after_applied_18_digit_ones_is_pending_not_out_of_order() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), MIXED_DIESEL);
    migrator(&svc, dir.path()).up().await.unwrap();
    write(
        dir.path(),
        &[
            ("2026-08-01-120000_c/up.sql", "CREATE TABLE c (id int);"),
            (
                "2026-08-01-120000-0000_d/up.sql",
                "CREATE TABLE d (id int);",
            ),
        ],
    );
    let m = migrator(&svc, dir.path());
    let status = m.status().await.unwrap();
    let pending: Vec<String> = status.pending().map(|e| e.version.to_string()).collect();
    assert_eq!(pending, ["2026-08-01-120000", "2026-08-01-120000-0000"]);
    m.validate().await.expect("not out of order");
    let report = m.up().await.unwrap();
    assert_eq!(report.migrations.len(), 2);
    assert!(m.status().await.unwrap().is_up_to_date());

    // The control: a migration older than the newest applied one still is out of order.
    write(
        dir.path(),
        &[("2026-02-01-000000-0000_e/up.sql", "SELECT 1;")],
    );
    assert!(matches!(
        migrator(&svc, dir.path()).up().await,
        Err(MigrateError::OutOfOrder { .. })
    ));
}

/// The history's integer keys and version texts, by key.
async fn history(conn: &svcdb::PooledConn) -> Vec<(i64, String)> {
    conn.query(
        "SELECT version, version_text FROM shop.svcdb_migrations ORDER BY version",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// The versions of a report's migrations, as written.
fn versions(entries: &[svcdb::migrate::RunEntry]) -> Vec<String> {
    entries.iter().map(|e| e.version.to_string()).collect()
}

/// Whether the history table has the `version_text` column.
async fn has_text_column(conn: &svcdb::PooledConn) -> bool {
    let sql = "SELECT count(*) FROM information_schema.columns
                WHERE table_schema = 'shop' AND table_name = 'svcdb_migrations'
                  AND column_name = 'version_text'";
    conn.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) == 1
}

/// The history table as svcdb wrote it before text versions.
const OLD_DDL: &str = "CREATE TABLE shop.svcdb_migrations (
    version bigint PRIMARY KEY,
    name text NOT NULL,
    checksum text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    execution_us bigint,
    applied_by text NOT NULL DEFAULT current_user,
    transactional boolean NOT NULL,
    dirty boolean NOT NULL DEFAULT false
)";

#[tokio::test]
async fn a_history_table_written_by_the_old_code_is_upgraded_in_place_and_keeps_working() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), MIXED_DIESEL);
    let migrations = Migrations::from_dir(dir.path()).unwrap();
    // The old code applied both and recorded the integers, with today's checksums.
    let conn = svc.get().await.unwrap();
    conn.batch_execute(&format!(
        "{OLD_DDL};
         CREATE TABLE a (id int); CREATE TABLE b (id int);"
    ))
    .await
    .unwrap();
    for m in migrations.iter() {
        conn.execute(
            "INSERT INTO shop.svcdb_migrations (version, name, checksum, execution_us, transactional)
             VALUES ($1, $2, $3, 1000, true)",
            &[&m.version.number(), &m.name, &m.checksum.to_hex()],
        )
        .await
        .unwrap();
    }

    // Read as it is, without the lock: up to date, in file order.
    let m = migrator(&svc, dir.path());
    let status = m.status().await.unwrap();
    assert!(status.is_up_to_date(), "{status:?}");
    assert_eq!(
        status.current_version.unwrap().to_string(),
        "2026-01-20-162913"
    );
    assert!(!has_text_column(&conn).await);

    // A new migration: pending, not out of order, and applying it upgrades the table first.
    write(
        dir.path(),
        &[("2026-08-01-120000_c/up.sql", "CREATE TABLE c (id int);")],
    );
    let m = migrator(&svc, dir.path());
    let status = m.status().await.unwrap();
    assert_eq!(status.in_state(MigrationState::Pending).count(), 1);
    m.up().await.unwrap();
    assert!(has_text_column(&conn).await);
    let rows = history(&conn).await;
    assert_eq!(
        rows,
        [
            // Filled from the integer, as the old rows only had it.
            (20260120162913, "20260120162913".to_owned()),
            (20260801120000, "2026-08-01-120000".to_owned()),
            (202511190914440000, "202511190914440000".to_owned()),
        ]
    );
    let status = m.status().await.unwrap();
    assert!(status.is_up_to_date(), "{status:?}");
    assert_eq!(
        status.current_version.unwrap().to_string(),
        "2026-08-01-120000"
    );
    // An old replica's row (integer only, during a rolling deploy) still reads.
    conn.execute(
        "INSERT INTO shop.svcdb_migrations (version, name, checksum, transactional)
         VALUES (20260901000000, 'from_an_old_replica', 'x', true)",
        &[],
    )
    .await
    .unwrap();
    let status = m.status().await.unwrap();
    assert_eq!(
        status.current_version.unwrap().to_string(),
        "20260901000000"
    );
}

#[tokio::test]
async fn a_no_op_up_on_an_old_history_table_upgrades_it() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), &[("0001_a.up.sql", "CREATE TABLE a (id int);")]);
    let migrations = Migrations::from_dir(dir.path()).unwrap();
    let m1 = migrations.iter().next().unwrap();
    let conn = svc.get().await.unwrap();
    conn.batch_execute(&format!("{OLD_DDL}; CREATE TABLE a (id int);"))
        .await
        .unwrap();
    conn.execute(
        "INSERT INTO shop.svcdb_migrations (version, name, checksum, transactional)
         VALUES (1, 'a', $1, true)",
        &[&m1.checksum.to_hex()],
    )
    .await
    .unwrap();
    let m = Migrator::new(svc.clone(), migrations);
    let report = m.up().await.unwrap();
    assert!(report.migrations.is_empty());
    assert_eq!(report.current_version.unwrap().to_string(), "0001");
    let text: String = conn
        .query_one("SELECT version_text FROM shop.svcdb_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(text, "1");
    // `0001` and the history's `1` are one version: applied, not missing plus pending.
    let status = m.status().await.unwrap();
    assert!(status.is_up_to_date(), "{status:?}");
    assert_eq!(status.entries.len(), 1);
    assert_eq!(status.entries[0].version.to_string(), "0001");
}

#[tokio::test]
async fn lemmys_two_zero_versions_are_applied_recorded_and_reverted_apart() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    // Lemmy's first migrations: diesel's setup, then a 15-zero version that diesel, comparing
    // texts, runs after it (its down is empty in Lemmy's folder).
    write(
        dir.path(),
        &[
            (
                "00000000000000_diesel_initial_setup/up.sql",
                "CREATE TABLE setup (id int);",
            ),
            (
                "00000000000000_diesel_initial_setup/down.sql",
                "DROP TABLE setup;",
            ),
            (
                "000000000000000_forbid_diesel_cli/up.sql",
                "CREATE TABLE forbid (id int);",
            ),
            (
                "000000000000000_forbid_diesel_cli/down.sql",
                "DROP TABLE forbid;",
            ),
            (
                "2019-02-26-002946_create_user/up.sql",
                "CREATE TABLE users (id int);",
            ),
            (
                "2019-02-26-002946_create_user/down.sql",
                "DROP TABLE users;",
            ),
        ],
    );
    let m = migrator(&svc, dir.path());
    let report = m.up().await.unwrap();
    let applied = versions(&report.migrations);
    assert_eq!(
        applied,
        ["00000000000000", "000000000000000", "2019-02-26-002946"]
    );
    let conn = svc.get().await.unwrap();
    let rows = history(&conn).await;
    assert_eq!(
        rows,
        [
            (-1, "000000000000000".to_owned()),
            (0, "00000000000000".to_owned()),
            (20190226002946, "2019-02-26-002946".to_owned()),
        ]
    );
    assert!(m.status().await.unwrap().is_up_to_date());

    // Down to diesel's setup reverts the other two, newest first, and keeps the setup.
    let down = m
        .down(&DownOptions {
            to: Some("00000000000000".parse().unwrap()),
            ..DownOptions::default()
        })
        .await
        .unwrap();
    let reverted = versions(&down.migrations);
    assert_eq!(reverted, ["2019-02-26-002946", "000000000000000"]);
    let left: Vec<i64> = conn
        .query("SELECT version FROM shop.svcdb_migrations", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, [0]);
    let tables: i64 = conn
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'shop' AND tablename <> 'svcdb_migrations'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 1, "only the setup's table is left");
    m.up().await.unwrap();
    assert!(m.status().await.unwrap().is_up_to_date());
}

/// Found by a trial on ory kratos's folder: pop's 20-digit versions (the first ones not even
/// dates) and a file per database were refused whole. They apply in order, each keeps its text
/// in the history, and down reverts them newest first.
#[tokio::test]
async fn a_pop_folder_with_20_digit_versions_is_applied_recorded_and_reverted() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[
            (
                "20150100000001000000_networks.postgres.up.sql",
                "CREATE TABLE networks (id uuid);",
            ),
            (
                "20150100000001000000_networks.postgres.down.sql",
                "DROP TABLE networks;",
            ),
            (
                "20150100000001000000_networks.mysql.up.sql",
                "CREATE TABLE networks (id char(36)) ENGINE=InnoDB;",
            ),
            (
                "20200519101057000000_identities.postgres.up.sql",
                "CREATE TABLE identities (id uuid);",
            ),
            (
                "20200519101057000000_identities.postgres.down.sql",
                "DROP TABLE identities;",
            ),
            (
                "20200519101057000000_identities.sqlite3.up.sql",
                "CREATE TABLE identities (id TEXT);",
            ),
            (
                "20200519101057000001_seed.up.sql",
                "INSERT INTO identities VALUES (gen_random_uuid());",
            ),
            (
                "20200519101057000001_seed.down.sql",
                "DELETE FROM identities;",
            ),
            // An empty down, as ory ships many: pop runs it as a down with nothing to undo.
            (
                "20200519101057000002_touch.postgres.up.sql",
                "UPDATE identities SET id = id;",
            ),
            ("20200519101057000002_touch.postgres.down.sql", ""),
        ],
    );
    let m = migrator(&svc, dir.path());
    let applied = versions(&m.up().await.unwrap().migrations);
    assert_eq!(
        applied,
        [
            "20150100000001000000",
            "20200519101057000000",
            "20200519101057000001",
            "20200519101057000002"
        ]
    );
    let conn = svc.get().await.unwrap();
    let texts: Vec<String> = history(&conn).await.into_iter().map(|(_, t)| t).collect();
    assert_eq!(texts.len(), 4);
    for version in &applied {
        assert!(texts.contains(version), "{texts:?}");
    }
    assert!(m.status().await.unwrap().is_up_to_date());

    let down = m
        .down(&DownOptions {
            to: Some("20150100000001000000".parse().unwrap()),
            ..DownOptions::default()
        })
        .await
        .unwrap();
    assert_eq!(
        versions(&down.migrations),
        [
            "20200519101057000002",
            "20200519101057000001",
            "20200519101057000000"
        ]
    );
    let texts: Vec<String> = history(&conn).await.into_iter().map(|(_, t)| t).collect();
    assert_eq!(texts, ["20150100000001000000"]);
    m.up().await.unwrap();
    assert!(m.status().await.unwrap().is_up_to_date());
}
