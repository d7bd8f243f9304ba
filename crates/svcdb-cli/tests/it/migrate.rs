//! `svcdb migrate …` end to end: the real binary against a throwaway database. Outcomes are
//! matched by exit code and `--json` fields; text only where the contract is about the text
//! (progress lines with durations, errors naming the file).

use crate::common;

use common::{svcdb, Project};
use serde_json::{json, Value};

/// Three migrations, each with a down.
const THREE: &[(&str, &str)] = &[
    (
        "0001_create_items.up.sql",
        "CREATE TABLE items (id int PRIMARY KEY);",
    ),
    ("0001_create_items.down.sql", "DROP TABLE items;"),
    (
        "0002_add_name.up.sql",
        "ALTER TABLE items ADD COLUMN name text;",
    ),
    (
        "0002_add_name.down.sql",
        "ALTER TABLE items DROP COLUMN name;",
    ),
    ("0003_create_tags.up.sql", "CREATE TABLE tags (id int);"),
    ("0003_create_tags.down.sql", "DROP TABLE tags;"),
];

/// The history table's name, in table listings.
const HISTORY: &str = "svcdb_migrations";

/// The `version` of each object in `list` (a report's `migrations`, `entries`, …).
fn versions(list: &Value) -> Vec<i64> {
    list.as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        // A version is the file's text (`"0003"`): compare its number.
        .map(|e| {
            e["version"]
                .as_str()
                .and_then(|v| v.parse().ok())
                .expect("a version")
        })
        .collect()
}

/// The `state` of each entry of a status report.
fn states(status: &Value) -> Vec<&str> {
    status["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["state"].as_str().expect("a state"))
        .collect()
}

#[test]
fn new_creates_both_files_without_a_database() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("migrations");
    let dir_arg = dir.to_str().unwrap();
    // No DATABASE_URL or SVCDB_SCHEMA: `svcdb()` clears them.
    let out = svcdb(
        &["migrate", "new", "create_users", "--dir", dir_arg],
        &[],
        None,
    )
    .expect_code(0);
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names[0].ends_with("_create_users.down.sql"), "{names:?}");
    assert!(names[1].ends_with("_create_users.up.sql"), "{names:?}");
    for name in &names {
        assert!(out.stdout.contains(name.as_str()), "{out}");
    }

    let json = svcdb(
        &["migrate", "new", "add_email", "--dir", dir_arg, "--json"],
        &[],
        None,
    )
    .expect_code(0)
    .json();
    for key in ["up_path", "down_path"] {
        let file = json[key]
            .as_str()
            .unwrap_or_else(|| panic!("{key}: {json}"));
        assert!(std::path::Path::new(file).is_file(), "{json}");
    }
    let first: i64 = names[0].split('_').next().unwrap().parse().unwrap();
    let created: i64 = json["version"].as_str().unwrap().parse().unwrap();
    assert!(created > first, "{json}");
}

#[test]
fn new_in_a_goose_folder_creates_one_goose_file_and_warns_about_ignored_files() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    std::fs::write(
        dir.join("00001_create_a.sql"),
        "-- +goose Up\nCREATE TABLE a (id int);\n-- +goose Down\nDROP TABLE a;\n",
    )
    .unwrap();
    std::fs::write(dir.join("seed.sql"), "INSERT INTO a VALUES (1);").unwrap();
    let out = svcdb(
        &["migrate", "new", "add_b", "--dir", dir.to_str().unwrap()],
        &[],
        None,
    )
    .expect_code(0);
    let created = dir.join("00002_add_b.sql");
    let text = std::fs::read_to_string(&created).unwrap();
    assert!(text.starts_with("-- +goose Up\n"), "{text}");
    assert!(text.contains("\n-- +goose Down\n"), "{text}");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["00001_create_a.sql", "00002_add_b.sql", "seed.sql"]);
    assert_eq!(
        out.stdout.trim(),
        format!("created {}", created.display()),
        "{out}"
    );
    assert!(
        out.stderr.contains("warning: ignored 1 .sql file") && out.stderr.contains("seed.sql"),
        "{out}"
    );
}

#[tokio::test]
async fn up_prints_each_migration_with_its_duration_then_status_is_up_to_date() {
    let p = Project::new().await;
    p.write(THREE);
    let out = p.run(&["migrate", "up"]).expect_code(0);
    for step in ["0001 create_items", "0002 add_name", "0003 create_tags"] {
        assert!(
            out.stdout
                .lines()
                .any(|l| l.contains(&format!("up {step}")) && l.ends_with(" ms")),
            "no line with the duration of {step}; {out}"
        );
    }
    assert_eq!(p.tables().await, ["items", HISTORY, "tags"]);

    p.run(&["migrate", "status"]).expect_code(0);
    let status = p
        .run(&["migrate", "status", "--json"])
        .expect_code(0)
        .json();
    assert_eq!(states(&status), ["applied"; 3]);
    assert_eq!(status["current_version"], "0003");
    assert!(status["entries"][0]["execution_ms"].is_f64(), "{status}");

    // Run once: a second `up` has nothing to do.
    let again = p.run(&["migrate", "up", "--json"]).expect_code(0).json();
    assert_eq!(versions(&again["migrations"]), [] as [i64; 0]);
    assert_eq!(again["current_version"], "0003");
}

/// Found by a user trial: `svcdb migrate up | head -1` panicked at the second progress line
/// (exit 101), and the panic rolled the deploy back.
#[tokio::test]
async fn a_closed_stdout_and_stderr_do_not_stop_the_deploy() {
    let p = Project::new().await;
    p.write(THREE);
    for args in [
        &["migrate", "up"][..],
        &["migrate", "up", "--json"],
        &["migrate", "status"],
    ] {
        // Both pipes' readers are gone before the run, as after `| head -1` had its line.
        let (reader, writer) = std::io::pipe().expect("a pipe");
        drop(reader);
        let status = p
            .command(args)
            .stdout(writer.try_clone().expect("a second writer"))
            .stderr(writer)
            .status()
            .expect("the svcdb binary runs");
        assert_eq!(status.code(), Some(0), "svcdb {args:?}");
    }
    assert_eq!(p.tables().await, ["items", HISTORY, "tags"]);
}

/// Found by a user trial: `svcdb migrate status --json > /dev/full` lost its report and exited
/// 0. The work still runs to its end; the exit says the report was lost.
#[tokio::test]
async fn a_report_that_cannot_be_written_is_no_success() {
    let p = Project::new().await;
    p.write(THREE);
    let full = || {
        std::fs::File::options()
            .write(true)
            .open("/dev/full")
            .expect("/dev/full")
    };
    for args in [&["migrate", "up", "--json"][..], &["migrate", "status"]] {
        let out = p
            .command(args)
            .stdout(full())
            .output()
            .expect("the svcdb binary runs");
        assert_eq!(out.status.code(), Some(1), "svcdb {args:?}");
    }
    // The deploy itself ran: status, written where it can be, says up to date.
    p.run(&["migrate", "status"]).expect_code(0);
}

#[tokio::test]
async fn a_new_pending_file_makes_status_exit_2_until_up() {
    let p = Project::new().await;
    p.write(THREE);
    p.run(&["migrate", "up"]).expect_code(0);
    p.write(&[("0004_create_notes.up.sql", "CREATE TABLE notes (id int);")]);

    p.run(&["migrate", "status"]).expect_code(2);
    let status = p
        .run(&["migrate", "status", "--json"])
        .expect_code(2)
        .json();
    assert_eq!(
        states(&status),
        ["applied", "applied", "applied", "pending"]
    );
    assert_eq!(status["entries"][3]["version"], "0004");
    assert_eq!(status["out_of_order"], json!([]), "the control: {status}");

    // With --json, stdout is the report alone and the progress goes to stderr.
    let out = p.run(&["migrate", "up", "--json"]).expect_code(0);
    assert!(out.stderr.contains("up 0004 create_notes"), "{out}");
    let report = out.json();
    assert_eq!(versions(&report["migrations"]), [4]);
    assert_eq!(report["current_version"], "0004");
    p.run(&["migrate", "status"]).expect_code(0);

    // Found by a user trial: a file below the newest applied one read as merely pending, and
    // `up` then refused it.
    p.write(&[("0000_late.up.sql", "CREATE TABLE late (id int);")]);
    let out = p.run(&["migrate", "status"]);
    assert!(
        out.stdout.contains("older than the newest applied"),
        "{out}"
    );
    let status = p.run(&["migrate", "status", "--json"]).json();
    assert_eq!(status["out_of_order"], json!(["0000"]), "{status}");
    assert_eq!(status["refused"]["code"], "out_of_order", "{status}");
}

#[tokio::test]
async fn a_changed_flyway_repeatable_makes_status_exit_2_until_up_runs_it_again() {
    let p = Project::new().await;
    p.write(&[
        ("V1__items.sql", "CREATE TABLE items (id int, name text);"),
        ("V1_1__tags.sql", "CREATE TABLE tags (id int);"),
        (
            "R__items_view.sql",
            "CREATE OR REPLACE VIEW items_view AS SELECT id FROM items;",
        ),
    ]);
    let out = p.run(&["migrate", "up"]).expect_code(0);
    assert!(
        out.stdout.contains("repeatable items_view done in"),
        "{out}"
    );
    let status = p
        .run(&["migrate", "status", "--json"])
        .expect_code(0)
        .json();
    assert_eq!(status["current_version"], "1.1");
    assert_eq!(status["repeatables"][0]["state"], "applied", "{status}");

    p.write(&[(
        "R__items_view.sql",
        "CREATE OR REPLACE VIEW items_view AS SELECT id, name FROM items;",
    )]);
    let out = p.run(&["migrate", "status"]).expect_code(2);
    assert!(out.stdout.contains("1 repeatable changed"), "{out}");
    let report = p.run(&["migrate", "up", "--json"]).expect_code(0).json();
    assert_eq!(report["migrations"].as_array().map(Vec::len), Some(0));
    assert_eq!(report["repeatables"][0]["name"], "items_view", "{report}");
    p.run(&["migrate", "status"]).expect_code(0);
    assert_eq!(
        p.tables().await,
        [
            "items",
            "items_view",
            "svcdb_migrations",
            "svcdb_repeatables",
            "tags"
        ]
    );
}

#[tokio::test]
async fn dry_run_applies_nothing_and_to_stops_at_a_version() {
    let p = Project::new().await;
    p.write(THREE);
    let plan = p
        .run(&["migrate", "up", "--dry-run", "--json"])
        .expect_code(0)
        .json();
    assert_eq!(plan["dry_run"], true);
    assert_eq!(versions(&plan["migrations"]), [1, 2, 3]);
    assert!(
        plan["migrations"]
            .as_array()
            .is_some_and(|m| m.iter().all(|m| m["duration_ms"].is_null())),
        "nothing ran, so no duration: {plan}"
    );
    let text = p.run(&["migrate", "up", "--dry-run"]).expect_code(0);
    assert!(text.stdout.contains("create_tags"), "{text}");

    let status = p
        .run(&["migrate", "status", "--json"])
        .expect_code(2)
        .json();
    assert_eq!(status["history_exists"], false);
    assert_eq!(states(&status), ["pending"; 3]);
    assert!(p.tables().await.is_empty());

    let report = p
        .run(&["migrate", "up", "--to", "2", "--json"])
        .expect_code(0)
        .json();
    assert_eq!(versions(&report["migrations"]), [1, 2]);
    assert!(report["migrations"][0]["duration_ms"].is_f64(), "{report}");
    let status = p
        .run(&["migrate", "status", "--json"])
        .expect_code(2)
        .json();
    assert_eq!(states(&status), ["applied", "applied", "pending"]);
}

#[tokio::test]
async fn down_reverts_one_step_by_default_and_everything_with_to_0() {
    let p = Project::new().await;
    p.write(THREE);
    p.run(&["migrate", "up"]).expect_code(0);

    let out = p.run(&["migrate", "down"]).expect_code(0);
    assert!(out.stdout.contains("down 0003 create_tags"), "{out}");
    assert_eq!(p.tables().await, ["items", HISTORY]);

    let plan = p
        .run(&["migrate", "down", "--steps", "2", "--dry-run", "--json"])
        .expect_code(0)
        .json();
    assert_eq!(plan["dry_run"], true);
    assert_eq!(versions(&plan["migrations"]), [2, 1]);

    let report = p
        .run(&["migrate", "down", "--to", "0", "--json"])
        .expect_code(0)
        .json();
    assert_eq!(versions(&report["migrations"]), [2, 1]);
    assert_eq!(report["current_version"], Value::Null);
    assert_eq!(p.tables().await, [HISTORY]);
    let status = p
        .run(&["migrate", "status", "--json"])
        .expect_code(2)
        .json();
    assert_eq!(states(&status), ["pending"; 3]);

    // Nothing left to revert is not an error.
    p.run(&["migrate", "down"]).expect_code(0);
}

#[tokio::test]
async fn redo_reverts_and_reapplies_the_newest_migration() {
    let p = Project::new().await;
    p.write(THREE);
    p.run(&["migrate", "up"]).expect_code(0);

    let report = p.run(&["migrate", "redo", "--json"]).expect_code(0).json();
    assert_eq!(versions(&report["down"]["migrations"]), [3]);
    assert_eq!(versions(&report["up"]["migrations"]), [3]);

    let out = p.run(&["migrate", "redo"]).expect_code(0);
    assert!(out.stdout.contains("down 0003 create_tags"), "{out}");
    assert!(out.stdout.contains("up 0003 create_tags"), "{out}");
    p.run(&["migrate", "status"]).expect_code(0);
    assert_eq!(p.tables().await, ["items", HISTORY, "tags"]);
}

#[tokio::test]
async fn a_failure_at_step_3_of_5_leaves_the_schema_as_it_was() {
    let p = Project::new().await;
    p.write(&[
        ("0001_a.up.sql", "CREATE TABLE a (id int);"),
        ("0002_b.up.sql", "CREATE TABLE b (id int);"),
        (
            "0003_broken.up.sql",
            "CREATE TABLE c (id int);\nSELECT * FROM no_such_table;",
        ),
        ("0004_d.up.sql", "CREATE TABLE d (id int);"),
        ("0005_e.up.sql", "CREATE TABLE e (id int);"),
    ]);
    let out = p.run(&["migrate", "up"]).expect_code(1);
    // Which file and line, the server's error, and that it was all rolled back.
    assert!(out.stderr.contains("0003_broken.up.sql, line 2"), "{out}");
    assert!(out.stderr.contains("no_such_table"), "{out}");
    assert!(out.stderr.contains("rolled back"), "{out}");

    let status = p
        .run(&["migrate", "status", "--json"])
        .expect_code(2)
        .json();
    assert_eq!(status["history_exists"], false);
    assert_eq!(states(&status), ["pending"; 5]);
    assert!(p.tables().await.is_empty());
    // Nor is the schema this first deploy made for itself (found by a user trial).
    assert!(!p.schema_exists().await);
}

#[tokio::test]
async fn a_failure_after_a_non_transactional_migration_is_undone_with_the_downs() {
    let p = Project::new().await;
    p.write(&[
        ("0001_a.up.sql", "CREATE TABLE a (id int);"),
        ("0001_a.down.sql", "DROP TABLE a;"),
        (
            "0002_index.up.sql",
            "-- svcdb:no-transaction\nCREATE INDEX CONCURRENTLY a_id ON a (id);",
        ),
        ("0002_index.down.sql", "DROP INDEX a_id;"),
        ("0003_broken.up.sql", "SELECT * FROM no_such_table;"),
    ]);
    let out = p.run(&["migrate", "up"]).expect_code(1);
    assert!(out.stderr.contains("0003_broken.up.sql"), "{out}");
    assert!(out.stderr.contains("no_such_table"), "{out}");
    // The versions undone, newest first, are listed.
    assert!(out.stderr.contains("0002, 0001"), "{out}");

    let status = p
        .run(&["migrate", "status", "--json"])
        .expect_code(2)
        .json();
    assert_eq!(states(&status), ["pending"; 3]);
    assert!(p.tables().await.is_empty());
    assert!(!p.schema_exists().await);
}

#[tokio::test]
async fn a_half_applied_non_transactional_migration_is_dirty_until_repair() {
    let p = Project::new().await;
    p.write(&[(
        "0001_partial.up.sql",
        "-- svcdb:no-transaction\nCREATE TABLE a (id int);\nSELECT * FROM no_such_table;",
    )]);
    let out = p.run(&["migrate", "up"]).expect_code(1);
    // The line counts from the top of the file, though the statements ran one by one.
    assert!(out.stderr.contains("0001_partial.up.sql, line 3"), "{out}");

    // The control: what the dirty migration left keeps the schema it was made in.
    assert!(p.schema_exists().await);
    let out = p.run(&["migrate", "status", "--json"]).expect_code(1);
    assert_eq!(out.json()["dirty"], "0001");
    // Why it exits 1 is in the JSON too (a user trial found only stderr saying it).
    assert_eq!(out.json()["refused"]["code"], "dirty", "{out}");
    assert_eq!(states(&out.json()), ["dirty"]);
    assert!(out.stderr.contains("repair"), "{out}");
    p.run(&["migrate", "up"]).expect_code(1);

    // Fixed by hand, then repaired: the migration is pending again.
    p.write(&[(
        "0001_partial.up.sql",
        "-- svcdb:no-transaction\nCREATE TABLE a (id int);",
    )]);
    p.db.admin()
        .await
        .batch_execute("DROP TABLE svc.a")
        .await
        .unwrap();
    let repair = p
        .run(&["migrate", "repair", "--json"])
        .expect_code(0)
        .json();
    assert_eq!(repair["actions"][0]["action"], "cleared_dirty");
    let pending = p
        .run(&["migrate", "status", "--json"])
        .expect_code(2)
        .json();
    assert_eq!(pending["refused"], serde_json::Value::Null);
    p.run(&["migrate", "up"]).expect_code(0);
    p.run(&["migrate", "status"]).expect_code(0);
}

#[tokio::test]
async fn a_changed_file_is_refused_until_allowed_or_repaired() {
    let p = Project::new().await;
    p.write(THREE);
    p.run(&["migrate", "up"]).expect_code(0);
    p.write(&[(
        "0002_add_name.up.sql",
        "ALTER TABLE items ADD COLUMN name text NOT NULL;",
    )]);

    let out = p.run(&["migrate", "validate"]).expect_code(1);
    assert!(out.stderr.contains("0002_add_name.up.sql"), "{out}");
    p.run(&["migrate", "validate", "--allow-changed"])
        .expect_code(0);
    let status = p
        .run(&["migrate", "status", "--json"])
        .expect_code(1)
        .json();
    assert_eq!(states(&status), ["applied", "changed", "applied"]);
    p.run(&["migrate", "status", "--allow-changed"])
        .expect_code(0);
    p.run(&["migrate", "up"]).expect_code(1);

    let repair = p
        .run(&["migrate", "repair", "--json"])
        .expect_code(0)
        .json();
    assert_eq!(repair["actions"][0]["action"], "realigned_checksum");
    assert_eq!(repair["actions"][0]["version"], "0002");
    p.run(&["migrate", "validate"]).expect_code(0);
    p.run(&["migrate", "status"]).expect_code(0);
}

#[tokio::test]
async fn baseline_records_versions_without_running_them() {
    let p = Project::new().await;
    p.write(THREE);
    // Found by a user trial: no dry run, where `adopt` and `down` had one.
    let out = p
        .run(&["migrate", "baseline", "2", "--dry-run"])
        .expect_code(0);
    assert!(out.stdout.contains("would record 0002"), "{out}");
    let report = p
        .run(&["migrate", "baseline", "2", "--dry-run", "--json"])
        .expect_code(0)
        .json();
    assert_eq!(versions(&report["recorded"]), [1, 2]);
    assert_eq!(report["dry_run"], true);
    assert!(!p.schema_exists().await, "the dry run wrote");
    let report = p
        .run(&["migrate", "baseline", "2", "--json"])
        .expect_code(0)
        .json();
    assert_eq!(versions(&report["recorded"]), [1, 2]);
    assert_eq!(p.tables().await, [HISTORY], "baseline ran a script");

    let status = p
        .run(&["migrate", "status", "--json"])
        .expect_code(2)
        .json();
    assert_eq!(states(&status), ["applied", "applied", "pending"]);
    let baselined: Vec<&Value> = status["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["baselined"])
        .collect();
    assert_eq!(baselined, [true, true, false]);
    let table = p.run(&["migrate", "status"]).expect_code(2);
    assert_eq!(
        table.stdout.matches("baselined").count(),
        2,
        "{}",
        table.stdout
    );
    let up = p.run(&["migrate", "up", "--json"]).expect_code(0).json();
    assert_eq!(versions(&up["migrations"]), [3]);
}

#[tokio::test]
async fn timeouts_apply_to_the_migration_session() {
    let p = Project::new().await;
    p.write(&[("0001_slow.up.sql", "SELECT pg_sleep(5);")]);
    let out = p
        .run(&["migrate", "up", "--statement-timeout", "100ms"])
        .expect_code(1);
    assert!(out.stderr.contains("0001_slow.up.sql"), "{out}");
    assert!(
        out.stderr.contains("57014"),
        "not a statement timeout; {out}"
    );
}

/// Found by a user trial: a migration's `RAISE WARNING` (and `RAISE NOTICE`) never showed,
/// even with RUST_LOG=info. Warnings show on stderr by default, notices when RUST_LOG asks;
/// stdout keeps only the report.
#[tokio::test]
async fn a_migrations_server_warnings_show_on_stderr() {
    let p = Project::new().await;
    p.write(&[
        (
            "0001_backfill.up.sql",
            "DO $$ BEGIN RAISE WARNING 'careful: % rows', 42; RAISE NOTICE 'backfilled % rows', 7; END $$;",
        ),
        ("0001_backfill.down.sql", "SELECT 1;"),
    ]);
    let out = p.run(&["migrate", "up", "--json"]).expect_code(0);
    assert!(out.stderr.contains("careful: 42 rows"), "{out}");
    assert!(!out.stderr.contains("backfilled 7 rows"), "{out}");
    out.json();
    p.run(&["migrate", "down"]).expect_code(0);
    let out = p
        .run_with_env(&["migrate", "up"], &[("RUST_LOG", "svcdb::server=info")])
        .expect_code(0);
    assert!(
        out.stderr.contains("backfilled 7 rows") && !out.stdout.contains("backfilled"),
        "{out}"
    );
}

#[tokio::test]
async fn ignored_sql_files_are_a_warning_on_stderr_and_json_stays_clean() {
    let p = Project::new().await;
    p.write(&[
        (
            "20240101120000_create_a.sql",
            "-- +goose Up\nCREATE TABLE a (id int);\n-- +goose Down\nDROP TABLE a;\n",
        ),
        ("notes.sql", "SELECT 'not a migration';"),
        ("seed.sql", "INSERT INTO a VALUES (1);"),
    ]);
    let out = p.run(&["migrate", "status", "--json"]).expect_code(2);
    let warning = out
        .stderr
        .lines()
        .find(|l| l.starts_with("warning: ignored 2 .sql files"))
        .unwrap_or_else(|| panic!("no warning; {out}"));
    assert!(warning.contains("(notes.sql, seed.sql)"), "{out}");
    let status = out.json();
    assert_eq!(versions(&status["entries"]), [20240101120000]);
    assert_eq!(states(&status), ["pending"]);
    // The JSON says so too (found by a user trial).
    assert_eq!(
        status["ignored"],
        serde_json::json!(["notes.sql", "seed.sql"])
    );
    let lint = p.run(&["migrate", "lint", "--json"]).expect_code(0).json();
    assert_eq!(
        lint["ignored"],
        serde_json::json!(["notes.sql", "seed.sql"])
    );
    assert!(!out.stderr.contains("Flyway callback"), "{out}");

    // A Flyway callback is named as one, with what to do instead.
    p.write(&[("afterMigrate.sql", "GRANT SELECT ON a TO PUBLIC;")]);
    let out = p.run(&["migrate", "status"]).expect_code(2);
    assert!(
        out.stderr
            .contains("warning: afterMigrate.sql is a Flyway callback"),
        "{out}"
    );
    // Named once, as a callback, not also among the files that are not migrations.
    assert!(
        !out.stderr.contains("afterMigrate.sql)") && !out.stderr.contains("afterMigrate.sql, "),
        "{out}"
    );

    // Found by a trial: files named as the warning asks, in a sub-folder of versions, were
    // told they "are not migrations". They are named for where they are instead.
    p.write(&[("000001-000100/000091_x.up.sql", "CREATE TABLE x (id int);")]);
    let out = p.run(&["migrate", "status"]).expect_code(2);
    let nested = out
        .stderr
        .lines()
        .find(|l| l.starts_with("warning: ignored 1 .sql file in sub-folders"))
        .unwrap_or_else(|| panic!("no warning; {out}"));
    assert!(nested.contains("000001-000100/000091_x.up.sql"), "{out}");
    assert!(out.stderr.contains("point --dir at the folder"), "{out}");
    assert!(
        out.stderr.contains("warning: ignored 2 .sql files")
            && !out.stderr.contains("000091_x.up.sql, "),
        "the others are still listed apart: {out}"
    );
}

/// Found by a trial: `--dir db` where the migrations were in db/migrations warned of the
/// files in the sub-folder, then `up` and `status` said "up to date" and exited 0, so a
/// deploy gate passed over an empty schema. A folder with no migration of its own but
/// migration-named files in a sub-folder is refused, naming the folder to give; with one
/// migration of its own, the sub-folder's files stay a warning (the control above).
#[tokio::test]
async fn a_dir_one_level_above_the_migrations_is_refused_with_the_right_one() {
    let p = Project::new().await;
    p.write(&[
        ("migrations/0001_a.up.sql", "CREATE TABLE a (id int);"),
        ("migrations/0002_b.up.sql", "CREATE TABLE b (id int);"),
    ]);
    for args in [
        &["migrate", "up", "--json"][..],
        &["migrate", "status", "--json"],
    ] {
        let out = p.run(args).expect_code(1);
        assert_eq!(out.json()["code"], "migration_source", "{args:?}: {out}");
        let right = p.migrations().join("migrations");
        assert!(
            out.stderr.contains(&format!("--dir {}", right.display())),
            "{args:?}: {out}"
        );
    }
    assert!(!p.schema_exists().await);
    let right = p.migrations().join("migrations");
    p.run_with_env(
        &["migrate", "up"],
        &[("SVCDB_MIGRATIONS_DIR", right.to_str().unwrap())],
    )
    .expect_code(0);
}

#[tokio::test]
async fn failing_goose_scripts_are_located_in_their_file() {
    let p = Project::new().await;
    p.write(&[(
        "20240101120000_a.sql",
        "-- +goose Up\nCREATE TABLE a (id int);\n\n-- +goose Down\nSELECT * FROM no_such_table;\n",
    )]);
    p.run(&["migrate", "up"]).expect_code(0);
    let out = p.run(&["migrate", "down"]).expect_code(1);
    assert!(out.stderr.contains("20240101120000_a.sql, line 5"), "{out}");

    p.write(&[(
        "20240102000000_broken.sql",
        "-- header\n-- +goose Up\nCREATE TABLE b (id int);\nSELECT * FROM no_such_table;\n",
    )]);
    let out = p.run(&["migrate", "up"]).expect_code(1);
    assert!(
        out.stderr.contains("20240102000000_broken.sql, line 4"),
        "{out}"
    );
}

#[test]
fn a_missing_database_url_is_an_error_with_a_hint() {
    let root = tempfile::tempdir().unwrap();
    let out = svcdb(
        &["migrate", "status"],
        &[
            ("SVCDB_SCHEMA", "svc"),
            ("SVCDB_MIGRATIONS_DIR", root.path().to_str().unwrap()),
        ],
        None,
    )
    .expect_code(64);
    assert!(out.stderr.contains("DATABASE_URL"), "{out}");
}

#[test]
fn an_invalid_command_line_exits_64() {
    for args in [
        &["migrate", "up", "--no-such-flag"][..],
        &["migrate", "down", "--steps", "2", "--to", "1"],
        &["migrate", "down", "--steps", "0"],
        &["migrate", "up", "--lock-timeout", "soon"],
        &["migrate", "baseline"],
        &["migrate"],
    ] {
        let out = svcdb(args, &[], None);
        assert_eq!(out.code, 64, "{args:?}: {out}");
        assert!(!out.stderr.is_empty(), "{args:?}: {out}");
    }
    // A missing required option is named in the JSON error, not cut at clap's colon.
    let out = svcdb(&["--json", "events", "replay"], &[], None).expect_code(64);
    let error = out.json();
    assert_eq!(error["code"], "usage");
    assert!(
        error["error"].as_str().unwrap().contains("--queue"),
        "{error}"
    );
}

/// Regression: on a schema nobody created, `status` said "2 pending; run `svcdb migrate up`"
/// (exit 2) although `up` could only fail. It now exits 1, as for everything `up` refuses.
/// Found by a later trial: it then printed only the connection error, where `lint` reads
/// the same database as the first deploy; it now lists the migrations, all pending, with
/// the refusal in the report.
#[tokio::test]
async fn status_on_a_schema_that_does_not_exist_exits_1() {
    let p = Project::new().await;
    p.write(THREE);
    let out = p
        .run_with_env(&["migrate", "status"], &[("SVCDB_CREATE_SCHEMA", "false")])
        .expect_code(1);
    assert!(out.stderr.contains("svcdb provision"), "{out}");
    let out = p
        .run_with_env(
            &["migrate", "status", "--json"],
            &[("SVCDB_CREATE_SCHEMA", "false")],
        )
        .expect_code(1);
    let report = out.json();
    assert_eq!(states(&report), ["pending"; 3], "{out}");
    assert_eq!(report["refused"]["code"], "3F000", "{out}");
    assert!(!p.schema_exists().await, "status created the schema");
    // A misspelled SVCDB_SCHEMA is named, as connecting names it (found by a trial).
    p.db.admin()
        .await
        .batch_execute("CREATE SCHEMA svc_orders")
        .await
        .unwrap();
    let out = p
        .run_with_env(&["migrate", "status"], &[("SVCDB_CREATE_SCHEMA", "false")])
        .expect_code(1);
    assert!(
        out.stdout.contains("similar: svc_orders") && out.stderr.contains("misspelled"),
        "{out}"
    );
    p.run(&["migrate", "up"]).expect_code(0);
    p.run_with_env(&["migrate", "status"], &[("SVCDB_CREATE_SCHEMA", "false")])
        .expect_code(0);
}

/// Same kind as `listing_and_purging_create_no_schema`: with SVCDB_CREATE_SCHEMA=true (as
/// this project sets it) `status` and `validate` created the missing schema they were asked
/// about. They read; the schema is `up`'s to create, so they report every migration pending
/// (what `up` would do) and leave the database as it was.
#[tokio::test]
async fn status_and_validate_create_no_schema() {
    let p = Project::new().await;
    p.write(THREE);
    let out = p.run(&["migrate", "status", "--json"]).expect_code(2);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).expect("status JSON");
    assert_eq!(report["history_exists"], false, "{out}");
    p.run(&["migrate", "validate"]).expect_code(0);
    assert!(
        !p.schema_exists().await,
        "status or validate created the schema"
    );
    p.run(&["migrate", "up"]).expect_code(0);
    p.run(&["migrate", "status"]).expect_code(0);
}

/// Found by a user trial: with SVCDB_CREATE_SCHEMA=true and no migrations yet (a new
/// service's first deploy), `up` said "up to date" and left the schema uncreated, so the
/// service then failed at start-up. The setting off (the schema is missing: exit 1, as with
/// migrations) and a dry run create nothing: the controls.
#[tokio::test]
async fn up_with_no_migrations_yet_creates_the_schema_it_may_create() {
    let p = Project::new().await;
    std::fs::create_dir(p.migrations()).unwrap();
    p.run_with_env(&["migrate", "up"], &[("SVCDB_CREATE_SCHEMA", "false")])
        .expect_code(1);
    p.run(&["migrate", "up", "--dry-run"]).expect_code(0);
    assert!(!p.schema_exists().await);

    p.run(&["migrate", "up"]).expect_code(0);
    assert!(p.schema_exists().await, "up did not create the schema");
    p.run(&["migrate", "up"]).expect_code(0);
    p.run(&["migrate", "status"]).expect_code(0);
}

/// Found by trying a real dbmate project: on a schema another tool migrated, `status` said
/// "3 pending; run `svcdb migrate up`", and `up` then failed on the first table. Both now
/// refuse, naming the other tool's history and the `adopt` command, which then works.
#[tokio::test]
async fn status_and_up_point_at_adopt_on_a_schema_another_tool_migrated() {
    let p = Project::new().await;
    p.write(THREE);
    p.db.admin()
        .await
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {s};
             CREATE TABLE {s}.goose_db_version (id serial PRIMARY KEY, version_id bigint NOT NULL,
                 is_applied boolean NOT NULL, tstamp timestamp DEFAULT now());
             INSERT INTO {s}.goose_db_version (version_id, is_applied) VALUES (0, true), (1, true);
             CREATE TABLE {s}.items (id int PRIMARY KEY);",
            s = p.schema
        ))
        .await
        .unwrap();
    let adopt = "svcdb migrate adopt --from goose";
    // Refused before anything runs (what `up` would do is what `status` reports), by kind.
    let out = p.run(&["migrate", "status"]).expect_code(1);
    assert!(out.stderr.contains(adopt), "{out}");
    // The report on stdout says it too (found by a trial: it said only "pending").
    assert!(
        out.stdout
            .contains("`svcdb migrate up` would refuse: refusing to migrate schema"),
        "{out}"
    );
    let out = p.run(&["--json", "migrate", "status"]).expect_code(1);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["refused"]["code"], "other_tool_applied", "{out}");
    let out = p.run(&["--json", "migrate", "up"]).expect_code(1);
    assert!(out.stdout.contains("other_tool_applied"), "{out}");
    let out = p.run(&["migrate", "up"]).expect_code(1);
    assert!(out.stderr.contains(adopt), "{out}");
    // The lint says it too, rather than linting the folder as a deploy over goose's tables.
    let out = p.run(&["--json", "migrate", "lint"]).expect_code(1);
    assert_eq!(out.json()["code"], "other_tool_applied", "{out}");
    p.run(&["migrate", "adopt", "--from", "goose"])
        .expect_code(0);
    let out = p.run(&["migrate", "status"]).expect_code(2);
    assert!(!out.stdout.contains(adopt), "{out}");
    p.run(&["migrate", "lint"]).expect_code(0);
    p.run(&["migrate", "up"]).expect_code(0);
}

/// Found by a user trial: goose's history and its tables in `public`, the service schema
/// empty: `status` said "take it over with `svcdb migrate adopt --from goose`", which then
/// refused (the objects are in `public`). It now says what `adopt` would do: refuse, and run
/// the service in `public` instead; and it says so under a refusal for another reason (here
/// the lint's), where it said nothing. With the tables in the service schema the adopt it
/// suggests works (the control, `status_and_up_point_at_adopt…` above).
#[tokio::test]
async fn status_says_when_adopting_another_tools_history_would_be_refused() {
    let p = Project::new().await;
    p.write(&[(
        "0001_create_items.up.sql",
        "CREATE TABLE items (id int PRIMARY KEY);",
    )]);
    p.db.admin()
        .await
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {s};
             CREATE TABLE public.goose_db_version (id serial PRIMARY KEY, version_id bigint NOT NULL,
                 is_applied boolean NOT NULL, tstamp timestamp DEFAULT now());
             INSERT INTO public.goose_db_version (version_id, is_applied) VALUES (0, true), (1, true);
             CREATE TABLE public.items (id int PRIMARY KEY);",
            s = p.schema
        ))
        .await
        .unwrap();
    let out = p.run(&["migrate", "status"]).expect_code(2);
    assert!(
        out.stdout.contains("would refuse it") && out.stdout.contains("--schema public"),
        "{out}"
    );
    p.run(&["migrate", "adopt", "--from", "goose"])
        .expect_code(1);

    // Under the lint's refusal, the other history is still named.
    p.write(&[(
        "0002_index.up.sql",
        "CREATE INDEX CONCURRENTLY items_id ON items (id);",
    )]);
    let out = p.run(&["migrate", "status"]).expect_code(1);
    assert!(out.stdout.contains("would refuse:"), "{out}");
    assert!(out.stdout.contains("public.goose_db_version"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_migration_is_in_progress_not_dirty() {
    let p = Project::new().await;
    // The migration's first statement waits for an advisory lock the test holds.
    p.write(&[
        ("0001_items.up.sql", "CREATE TABLE items (id int);"),
        (
            "0002_slow.up.sql",
            "-- svcdb:no-transaction\nSELECT pg_advisory_lock_shared(4242);\nCREATE INDEX CONCURRENTLY items_id ON items (id);",
        ),
    ]);
    p.run(&["migrate", "up", "--to", "1"]).expect_code(0);
    let test_session = p.db.admin().await;
    test_session
        .batch_execute("SELECT pg_advisory_lock(4242)")
        .await
        .unwrap();
    // Another replica's runner, through the library; no lock_timeout, so its statement
    // waits for the test, not for a clock.
    let svc = p.db.service(&p.schema).await;
    let migrations = svcdb::migrate::Migrations::from_dir(p.migrations()).unwrap();
    let runner = svcdb::migrate::Migrator::new(svc, migrations).with_options(
        svcdb::migrate::MigrateOptions {
            lock_timeout: std::time::Duration::ZERO,
            ..Default::default()
        },
    );
    let (started, mut started_rx) = tokio::sync::mpsc::unbounded_channel();
    let runner = tokio::spawn(async move {
        let mut observer = move |e: &svcdb::migrate::MigrateEvent| {
            if matches!(e, svcdb::migrate::MigrateEvent::Started { version, .. } if version.number() == 2)
            {
                let _ = started.send(());
            }
        };
        runner.up_with(&Default::default(), &mut observer).await
    });
    // `Started` of a non-transactional script comes once its history row is marked dirty.
    tokio::time::timeout(std::time::Duration::from_secs(60), started_rx.recv())
        .await
        .expect("the migration started within a minute")
        .expect("the runner reported it");

    let out = p.run(&["migrate", "status", "--json"]).expect_code(2);
    let status = out.json();
    assert_eq!(states(&status), ["applied", "in_progress"], "{out}");
    assert_eq!(status["in_progress"], "0002");
    assert!(status["dirty"].is_null(), "{out}");
    let out = p.run(&["migrate", "status"]).expect_code(2);
    assert!(out.stdout.contains("in progress"), "{out}");
    let health = p.run(&["health", "--json"]).expect_code(0).json();
    assert_eq!(health["notices"][0]["kind"], "migration_in_progress");

    test_session
        .batch_execute("SELECT pg_advisory_unlock(4242)")
        .await
        .unwrap();
    assert_eq!(runner.await.unwrap().unwrap().migrations.len(), 1);
    p.run(&["migrate", "status"]).expect_code(0);
}

#[tokio::test]
async fn a_failed_concurrent_index_is_named_with_the_statement_to_drop_it() {
    let p = Project::new().await;
    p.write(&[
        (
            "0001_items.up.sql",
            "CREATE TABLE items (sku text); INSERT INTO items VALUES ('a'), ('a');",
        ),
        (
            "0002_unique_sku.up.sql",
            "-- svcdb:no-transaction\nCREATE UNIQUE INDEX CONCURRENTLY items_sku_key ON items (sku);",
        ),
    ]);
    let drop = "DROP INDEX CONCURRENTLY svc.items_sku_key";
    let out = p.run(&["migrate", "up"]).expect_code(1);
    assert!(out.stderr.contains(drop), "{out}");
    // Repair names it and clears nothing while it is there.
    let out = p.run(&["migrate", "repair", "--json"]).expect_code(1);
    assert_eq!(out.json()["code"], "invalid_index", "{out}");
    assert!(
        out.json()["hint"]
            .as_str()
            .is_some_and(|h| h.contains(drop)),
        "{out}"
    );
    let out = p.run(&["migrate", "repair"]).expect_code(1);
    assert!(out.stderr.contains(drop), "{out}");
    p.db.admin().await.batch_execute(drop).await.unwrap();
    let repair = p
        .run(&["migrate", "repair", "--json"])
        .expect_code(0)
        .json();
    assert_eq!(repair["actions"][0]["action"], "cleared_dirty");
}

/// Found by an operations trial: after a non-transactional migration failed part-way, the hint
/// said "finish (or undo) by hand, repair, run again"; finished by hand, the next `up` ran it
/// again (42P07 on the table it had made). The hint now names both ways, and the one for a
/// migration finished by hand (`repair`, then `baseline`) leaves the schema up to date.
#[tokio::test]
async fn a_dirty_migration_finished_by_hand_is_recorded_with_baseline() {
    let p = Project::new().await;
    p.write(&[(
        "0001_partial.up.sql",
        "-- svcdb:no-transaction\nCREATE TABLE a (id int);\nCREATE TABLE b (id int REFERENCES nowhere);",
    )]);
    let out = p.run(&["migrate", "up"]).expect_code(1);
    assert!(
        out.stderr.contains("`svcdb migrate baseline 0001`"),
        "{out}"
    );
    // Finished by hand, as the migration meant.
    p.db.admin()
        .await
        .batch_execute("CREATE TABLE svc.b (id int)")
        .await
        .unwrap();
    p.run(&["migrate", "repair"]).expect_code(0);
    p.run(&["migrate", "baseline", "0001"]).expect_code(0);
    p.run(&["migrate", "status"]).expect_code(0);
    // The control: run again instead, as the old hint said, it fails on what was finished.
    p.db.admin()
        .await
        .batch_execute("DELETE FROM svc.svcdb_migrations")
        .await
        .unwrap();
    let out = p.run(&["migrate", "up", "--json"]).expect_code(1);
    assert_eq!(out.json()["code"], "42P07", "{out}");
}

/// A project whose one migration (non-transactional) sleeps a minute in its first statement,
/// and `migrate up --json` running it: returned once the statement runs on the server.
async fn slow_migration_running() -> (Project, std::process::Child) {
    let p = Project::new().await;
    p.write(&[(
        "0001_slow.up.sql",
        "-- svcdb:no-transaction\nSELECT pg_sleep(60);\nCREATE TABLE a (id int);",
    )]);
    let mut child = p.spawn(&["migrate", "up", "--json"]);
    let admin = p.db.admin().await;
    for _ in 0..200 {
        let running = admin
            .query_opt(
                "SELECT 1 FROM pg_stat_activity WHERE query LIKE '%pg_sleep(60)%' AND state = 'active' AND datname = current_database() AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .is_some();
        if running {
            return (p, child);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the migration never started");
}

/// Found by an operations trial: SIGTERM (a pod being stopped) printed nothing, `--json`
/// printed no JSON, and a non-transactional migration stopped in its first statement stayed
/// dirty. The signal now cancels the statement on the server; the command reports the
/// failure (text and JSON) and exits 143, and the migration stays pending.
#[tokio::test]
async fn sigterm_stops_a_migration_as_a_failure_and_says_so() {
    let (p, child) = slow_migration_running().await;
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(143), "{stdout}\n{stderr}");
    let json: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(json["code"], "57014", "{json}");
    assert!(stderr.contains("SIGTERM"), "{stderr}");
    let status = p
        .run(&["migrate", "status", "--json"])
        .expect_code(2)
        .json();
    assert_eq!(states(&status), ["pending"]);
}

/// Found by a user trial: `timeout -s INT` signals the process and then its process group,
/// so the command saw two signals at once, exited at once as after a second Ctrl-C, and left
/// the statement running on the server. A repeat within 100 ms is the same signal.
#[tokio::test]
async fn a_signal_delivered_twice_at_once_still_stops_the_migration_cleanly() {
    let (p, child) = slow_migration_running().await;
    // Two deliveries a few milliseconds apart, as `timeout` sends them.
    for _ in 0..2 {
        let killed = std::process::Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(130), "{stdout}");
    let json: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(json["code"], "57014", "the statement was cancelled: {json}");
    let status = p
        .run(&["migrate", "status", "--json"])
        .expect_code(2)
        .json();
    assert_eq!(states(&status), ["pending"]);
}
