//! How a deploy's commits and round trips are spent: a group's scripts are sent at once
//! (pipelined) yet a failure still names the failing migration, file, line and statement; only
//! the deploy's last commit waits for the disk.

use svcdb::error::SqlState;
use svcdb::migrate::{MigrateError, MigrateEvent, MigrationFailure, UpOptions};
use svcdb::testing::TestDb;
use svcdb::ServiceDb;

use crate::migrate_runner::{migrator, write};

/// The failure inside a `MigrateError::Failed`.
fn failure(err: &MigrateError) -> &MigrationFailure {
    match err {
        MigrateError::Failed(f) => f,
        other => panic!("expected a failed migration, got {other}"),
    }
}

async fn table_exists(svc: &ServiceDb, table: &str) -> bool {
    let conn = svc.get().await.unwrap();
    conn.query_one(
        "SELECT to_regclass(current_schema() || '.' || $1) IS NOT NULL",
        &[&table],
    )
    .await
    .unwrap()
    .get(0)
}

/// Five transactional migrations in one group; the third fails on its third line, the fourth
/// would fail too (differently) if it ran outside the aborted transaction.
const GROUP: &[(&str, &str)] = &[
    ("1_a.up.sql", "CREATE TABLE a (id int);"),
    ("2_b.up.sql", "CREATE TABLE b (id int);"),
    (
        "3_bad.up.sql",
        "CREATE TABLE c (id int);\n\nSELECT missing_column FROM c;\n",
    ),
    ("4_worse.up.sql", "SELECT 1 / 0;"),
    ("5_e.up.sql", "CREATE TABLE e (id int);"),
];

#[tokio::test]
async fn a_failure_inside_a_pipelined_group_names_its_migration_file_line_and_statement() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), GROUP);

    let mut events = Vec::new();
    let err = migrator(&svc, dir.path())
        .up_with(&UpOptions::default(), &mut |e| events.push(e.clone()))
        .await
        .unwrap_err();
    // The script's own error, not the "transaction is aborted" (25P02) of the scripts sent
    // after it, nor the division by zero of the next one.
    assert_eq!(err.code(), Some(&SqlState::UNDEFINED_COLUMN), "{err}");
    let f = failure(&err);
    assert_eq!(f.version.number(), 3, "{err}");
    assert!(f.path.ends_with("3_bad.up.sql"), "{}", f.path);
    assert_eq!(f.line, Some(3), "{err}");
    assert_eq!(
        f.statement.as_deref(),
        Some("SELECT missing_column FROM c"),
        "{err}"
    );
    assert!(f.rolled_back, "{err}");
    assert_eq!(
        f.rolled_back_with
            .iter()
            .map(|v| v.number())
            .collect::<Vec<_>>(),
        [1, 2]
    );

    // Progress as it happened: 1 and 2 finished, 3 started and never finished, 4 never
    // started.
    let seen: Vec<String> = events
        .iter()
        .filter_map(|e| match e {
            MigrateEvent::Started { version, .. } => Some(format!("start {version}")),
            MigrateEvent::Finished { version, .. } => Some(format!("end {version}")),
            _ => None,
        })
        .collect();
    assert_eq!(
        seen,
        ["start 1", "end 1", "start 2", "end 2", "start 3"],
        "{events:?}"
    );

    // The whole group is rolled back, history table included.
    for table in ["a", "b", "c", "e", "svcdb_migrations"] {
        assert!(!table_exists(&svc, table).await, "{table} rolled back");
    }
}

#[tokio::test]
async fn an_error_without_a_position_in_a_pipelined_group_is_put_on_its_own_migration() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    // A non-transactional migration first, so the failing group is one of several.
    write(
        dir.path(),
        &[
            (
                "1_first.up.sql",
                "-- svcdb:no-transaction\nCREATE TABLE first (id int);",
            ),
            ("2_a.up.sql", "CREATE TABLE a (id int);"),
            ("3_b.up.sql", "CREATE TABLE b (id int);"),
            ("4_zero.up.sql", "CREATE TABLE z (id int);\nSELECT 1 / 0;"),
            ("5_c.up.sql", "CREATE TABLE c (id int);"),
        ],
    );

    let err = migrator(&svc, dir.path()).up().await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::DIVISION_BY_ZERO), "{err}");
    let f = failure(&err);
    assert_eq!(f.version.number(), 4, "{err}");
    assert!(f.path.ends_with("4_zero.up.sql"), "{}", f.path);
    assert!(!f.rolled_back, "1 was committed before: {err}");
    assert_eq!(
        f.rolled_back_with
            .iter()
            .map(|v| v.number())
            .collect::<Vec<_>>(),
        [2, 3]
    );
    assert!(table_exists(&svc, "first").await);
    for table in ["a", "b", "z", "c"] {
        assert!(!table_exists(&svc, table).await, "{table} rolled back");
    }
}

/// `synchronous_commit` as each recording migration saw it, by version.
async fn settings(svc: &ServiceDb) -> Vec<(i32, String)> {
    let conn = svc.get().await.unwrap();
    conn.query("SELECT version, setting FROM seen ORDER BY version", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test]
async fn only_the_last_commit_of_a_deploy_waits_for_the_disk() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    let record =
        |v: u32| format!("INSERT INTO seen VALUES ({v}, current_setting('synchronous_commit'));");
    write(
        dir.path(),
        &[
            (
                "1_seen.up.sql",
                &format!("CREATE TABLE seen (version int, setting text);\n{}", record(1)),
            ),
            ("2_more.up.sql", &record(2)),
            (
                "3_index.up.sql",
                "-- svcdb:no-transaction\nCREATE INDEX CONCURRENTLY seen_version ON seen (version);",
            ),
            ("4_last.up.sql", &record(4)),
        ],
    );
    migrator(&svc, dir.path()).up().await.unwrap();
    // The first group's commit does not wait; the last one does (and flushes the first's WAL
    // with its own).
    assert_eq!(
        settings(&svc).await,
        [(1, "off".into()), (2, "off".into()), (4, "on".into())]
    );

    // The control: a deploy that is one transaction commits it as the last, waiting.
    write(dir.path(), &[("5_alone.up.sql", &record(5))]);
    migrator(&svc, dir.path()).up().await.unwrap();
    assert_eq!(settings(&svc).await.last(), Some(&(5, "on".into())));
}
