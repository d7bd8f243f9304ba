//! How a deploy executes against a real PostgreSQL: consecutive transactional migrations commit
//! together as one group around the non-transactional ones, and a statement that hits
//! `lock_timeout` is retried (the whole transaction, or the one non-transactional statement).

use std::path::Path;
use std::time::Duration;

use svcdb::error::SqlState;
use svcdb::migrate::{
    MigrateError, MigrateEvent, MigrateOptions, MigrationFailure, Migrator, UpOptions,
};
use svcdb::testing::TestDb;
use svcdb::ServiceDb;

use crate::migrate_runner::write;

fn migrator(svc: &ServiceDb, dir: &Path, options: MigrateOptions) -> Migrator {
    crate::migrate_runner::migrator(svc, dir).with_options(options)
}

/// Every history row: version, dirty, and the id of the transaction that wrote it last.
async fn history(svc: &ServiceDb) -> Vec<(i64, bool, String)> {
    let conn = svc.get().await.unwrap();
    let sql = format!(
        "SELECT version, dirty, xmin::text FROM {}.svcdb_migrations ORDER BY version",
        svc.schema()
    );
    conn.query(&sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

fn versions(rows: &[(i64, bool, String)]) -> Vec<i64> {
    rows.iter().map(|r| r.0).collect()
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

/// The failure inside a `MigrateError::Failed`.
fn failure(err: &MigrateError) -> &MigrationFailure {
    match err {
        MigrateError::Failed(f) => f,
        other => panic!("expected a failed migration, got {other}"),
    }
}

/// Two transactional migrations, a non-transactional one, then two transactional ones.
const MIXED: &[(&str, &str)] = &[
    ("1_a.up.sql", "CREATE TABLE a (id int);"),
    ("2_b.up.sql", "CREATE TABLE b (id int);"),
    (
        "3_a_index.up.sql",
        "-- svcdb:no-transaction\nCREATE INDEX CONCURRENTLY a_id ON a (id);",
    ),
    ("4_c.up.sql", "CREATE TABLE c (id int);"),
    ("5_d.up.sql", "CREATE TABLE d (id int);"),
];

#[tokio::test]
async fn consecutive_transactional_migrations_commit_together_around_a_non_transactional_one() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), MIXED);

    let report = migrator(&svc, dir.path(), MigrateOptions::default())
        .up()
        .await
        .unwrap();
    assert!(!report.atomic);
    assert_eq!(report.migrations.len(), 5);

    // One transaction per group: the rows of a group share the transaction that wrote them.
    let rows = history(&svc).await;
    assert_eq!(versions(&rows), [1, 2, 3, 4, 5]);
    assert!(rows.iter().all(|r| !r.1), "nothing dirty: {rows:?}");
    let xid = |v: usize| rows[v - 1].2.clone();
    assert_eq!(xid(1), xid(2), "group 1–2 commits once: {rows:?}");
    assert_eq!(xid(4), xid(5), "group 4–5 commits once: {rows:?}");
    assert_ne!(xid(2), xid(3), "{rows:?}");
    assert_ne!(xid(3), xid(4), "{rows:?}");
    assert_ne!(xid(1), xid(4), "{rows:?}");
}

/// Found by a trial on a golang-migrate folder: one migration adds an enum value, the next
/// inserts a row with it. Every tool that runs each migration in its own transaction runs
/// that folder; svcdb ran both in one group and failed with 55P04 (a transaction cannot use
/// an enum value it added). The group now commits after the migration that adds the value.
#[tokio::test]
async fn a_migration_that_adds_an_enum_value_commits_before_the_next_one_uses_it() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[
            (
                "1_kinds.up.sql",
                "CREATE TYPE kind AS ENUM ('a');\nCREATE TABLE things (k kind);",
            ),
            (
                "2_add_b.up.sql",
                "ALTER TYPE kind ADD VALUE IF NOT EXISTS 'b';",
            ),
            ("3_use_b.up.sql", "INSERT INTO things VALUES ('b');"),
            ("4_more.up.sql", "CREATE TABLE more (id int);"),
        ],
    );

    let report = migrator(&svc, dir.path(), MigrateOptions::default())
        .up()
        .await
        .unwrap();
    assert!(!report.atomic, "two transactions");
    let rows = history(&svc).await;
    assert_eq!(versions(&rows), [1, 2, 3, 4]);
    let xid = |v: usize| rows[v - 1].2.clone();
    assert_eq!(
        xid(1),
        xid(2),
        "the value is added with what came before: {rows:?}"
    );
    assert_ne!(xid(2), xid(3), "and committed before its use: {rows:?}");
    assert_eq!(xid(3), xid(4), "{rows:?}");

    // Control: the same use in the transaction that adds the value is what PostgreSQL refuses.
    let control = TestDb::new().await;
    let svc = control.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[(
            "1_all.up.sql",
            "CREATE TYPE kind AS ENUM ('a');\nCREATE TABLE things (k kind);\nALTER TYPE kind ADD VALUE 'b';\nINSERT INTO things VALUES ('b');",
        )],
    );
    let err = migrator(&svc, dir.path(), MigrateOptions::default())
        .up()
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&SqlState::UNSAFE_NEW_ENUM_VALUE_USAGE),
        "{err}"
    );
}

/// Found by a user trial on Kestra's Flyway folder: a script with `ALTER TYPE … ADD VALUE`
/// among its statements ran outside a transaction, as Flyway does only on PostgreSQL before
/// 12, so a failure later in it left the type and a table behind and the schema dirty. Flyway
/// on 12+ (and refinery always) runs it in one transaction: a failure takes it all back.
#[tokio::test]
async fn a_flyway_script_that_adds_an_enum_value_runs_in_its_transaction() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[(
            "V1__init.sql",
            "CREATE TYPE mood AS ENUM ('ok');
ALTER TYPE mood ADD VALUE 'meh';
             CREATE TABLE people (id int PRIMARY KEY);
INSERT INTO people VALUES (1), (1);",
        )],
    );
    let m = migrator(&svc, dir.path(), MigrateOptions::default());
    assert!(m.migrations().iter().all(|m| m.transactional));
    let err = m.up().await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::UNIQUE_VIOLATION), "{err}");
    let left: i64 = svc
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FROM pg_class WHERE relname = 'people'
             UNION ALL SELECT count(*) FROM pg_type WHERE typname = 'mood' ORDER BY 1 DESC LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "the type and the table were rolled back");
}

/// A migration writes rows that a `DEFERRABLE INITIALLY DEFERRED` foreign key checks at
/// commit (Django's foreign keys are all so), and the next alters that table: in one group
/// PostgreSQL refuses the `ALTER TABLE` (55006, "pending trigger events"), where every tool
/// that commits each migration runs the folder (checked with psql). The group is run again
/// split there. The control: both in one migration still fail, with 55006.
#[tokio::test]
async fn a_group_stopped_by_pending_deferred_checks_runs_again_split_where_they_are() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    const SEED: &str = "CREATE TABLE p (id int PRIMARY KEY);\n\
        CREATE TABLE c (pid int REFERENCES p DEFERRABLE INITIALLY DEFERRED);\n\
        INSERT INTO p VALUES (1);\nINSERT INTO c VALUES (1);";
    const ALTER: &str = "ALTER TABLE c ADD COLUMN note text;";
    write(
        dir.path(),
        &[
            ("1_seed.up.sql", SEED),
            ("2_alter.up.sql", ALTER),
            ("3_more.up.sql", "CREATE TABLE more (id int);"),
        ],
    );
    let report = migrator(&svc, dir.path(), MigrateOptions::default())
        .up()
        .await
        .unwrap();
    assert_eq!(report.migrations.len(), 3);
    assert!(!report.atomic, "it ran as two transactions");
    let rows = history(&svc).await;
    assert_eq!(versions(&rows), [1, 2, 3]);
    let xid = |v: usize| rows[v - 1].2.clone();
    assert_ne!(xid(1), xid(2), "committed between them: {rows:?}");
    assert_eq!(xid(2), xid(3), "the rest still one group: {rows:?}");

    // The same in a group after a non-transactional migration (a deploy of several groups).
    write(
        dir.path(),
        &[
            (
                "4_index.up.sql",
                "-- svcdb:no-transaction\nCREATE INDEX CONCURRENTLY more_id ON more (id);",
            ),
            (
                "5_seed.up.sql",
                "INSERT INTO p VALUES (2);\nINSERT INTO c VALUES (2);",
            ),
            ("6_alter.up.sql", "ALTER TABLE c ADD COLUMN tag text;"),
        ],
    );
    migrator(&svc, dir.path(), MigrateOptions::default())
        .up()
        .await
        .unwrap();
    let rows = history(&svc).await;
    assert_eq!(versions(&rows), [1, 2, 3, 4, 5, 6]);
    assert_ne!(rows[4].2, rows[5].2, "{rows:?}");

    let control = TestDb::new().await;
    let svc = control.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), &[("1_all.up.sql", &format!("{SEED}\n{ALTER}"))]);
    let err = migrator(&svc, dir.path(), MigrateOptions::default())
        .up()
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::OBJECT_IN_USE), "{err}");
}

#[tokio::test]
async fn a_failure_in_a_group_rolls_back_that_whole_group_and_only_it() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    // No down scripts before the failing group: nothing can undo them, so what stays in effect
    // shows exactly what the failing group's rollback covered.
    write(dir.path(), MIXED);
    write(
        dir.path(),
        &[
            ("6_fails.up.sql", "CREATE TABLE e (id int);\nSELECT 1 / 0;"),
            ("7_f.up.sql", "CREATE TABLE f (id int);"),
        ],
    );

    let err = migrator(&svc, dir.path(), MigrateOptions::default())
        .up()
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::DIVISION_BY_ZERO), "{err}");
    let f = failure(&err);
    assert_eq!(f.version.number(), 6);
    assert_eq!(numbers(&f.rolled_back_with), [4, 5], "{err}");
    assert!(!f.rolled_back, "earlier groups were committed: {err}");
    assert!(!f.dirty);
    assert_eq!(numbers(&f.applied), [1, 2, 3]);
    assert!(f.undone.is_empty());
    assert!(f.undo_error.is_some(), "3 has no down script: {err}");

    assert_eq!(versions(&history(&svc).await), [1, 2, 3]);
    for table in ["a", "b"] {
        assert!(table_exists(&svc, table).await, "{table} was committed");
    }
    for table in ["c", "d", "e", "f"] {
        assert!(!table_exists(&svc, table).await, "{table} rolled back");
    }
}

#[tokio::test]
async fn a_non_transactional_migration_between_groups_still_marks_dirty_on_failure() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[
            ("1_a.up.sql", "CREATE TABLE a (id int);"),
            ("2_b.up.sql", "CREATE TABLE b (id int);"),
            (
                "3_half.up.sql",
                "-- svcdb:no-transaction\nCREATE TABLE half (id int);\nSELECT 1 / 0;\n",
            ),
            ("4_c.up.sql", "CREATE TABLE c (id int);"),
        ],
    );

    let err = migrator(&svc, dir.path(), MigrateOptions::default())
        .up()
        .await
        .unwrap_err();
    let f = failure(&err);
    assert_eq!(f.version.number(), 3);
    assert!(f.dirty, "{err}");
    assert_eq!(f.statements_done, Some(1));
    assert!(f.rolled_back_with.is_empty());
    assert_eq!(
        numbers(&f.applied),
        [1, 2],
        "no undo over a half-applied migration"
    );

    let rows = history(&svc).await;
    assert_eq!(
        rows.iter().map(|r| (r.0, r.1)).collect::<Vec<_>>(),
        [(1, false), (2, false), (3, true)]
    );
    assert!(table_exists(&svc, "half").await);
    assert!(!table_exists(&svc, "c").await);
    let again = migrator(&svc, dir.path(), MigrateOptions::default())
        .up()
        .await
        .unwrap_err();
    assert!(
        matches!(&again, MigrateError::Dirty { version, .. } if version.number() == 3),
        "{again}"
    );
}

/// Options for the lock tests: a short `lock_timeout` so the test does not wait 10 s per try,
/// and a backoff long enough for the test to end the blocking transaction after the first
/// timeout (the retries after it leave slack on a slow machine).
fn lock_options(retries: u32) -> MigrateOptions {
    MigrateOptions {
        lock_timeout: Duration::from_millis(300),
        lock_retries: retries,
        lock_retry_backoff: Duration::from_millis(500),
        ..MigrateOptions::default()
    }
}

/// Applies `1_items` (a table `items`) and opens another session whose open transaction has
/// read `items`: every later `ALTER TABLE items` waits for it.
async fn items_held_by_another_session(
    db: &TestDb,
    svc: &ServiceDb,
    dir: &Path,
) -> svcdb::DedicatedConn {
    write(
        dir,
        &[("1_items.up.sql", "CREATE TABLE items (id bigint);")],
    );
    migrator(svc, dir, MigrateOptions::default())
        .up()
        .await
        .unwrap();
    let holder = db.admin().await;
    holder
        .batch_execute(&format!(
            "BEGIN; SELECT count(*) FROM {}.items;",
            svc.schema()
        ))
        .await
        .unwrap();
    holder
}

/// Runs `m.up_with` in a task, sending each event it reports into the returned receiver.
fn spawn_up(
    m: Migrator,
) -> (
    tokio::task::JoinHandle<Result<svcdb::migrate::UpReport, MigrateError>>,
    tokio::sync::mpsc::UnboundedReceiver<MigrateEvent>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut observer = move |e: &MigrateEvent| drop(tx.send(e.clone()));
        m.up_with(&UpOptions::default(), &mut observer).await
    });
    (task, rx)
}

/// The next lock retry out of `events`, within a generous deadline.
async fn next_retry(
    events: &mut tokio::sync::mpsc::UnboundedReceiver<MigrateEvent>,
) -> MigrateEvent {
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let event = events.recv().await.expect("the runner ended first");
            if matches!(event, MigrateEvent::LockRetry { .. }) {
                return event;
            }
        }
    })
    .await
    .expect("a lock retry within a minute")
}

/// The versions as the numbers their files give them.
pub(crate) fn numbers(versions: &[svcdb::migrate::Version]) -> Vec<i64> {
    versions.iter().map(|v| v.number()).collect()
}

fn retries(events: &[MigrateEvent]) -> Vec<(i64, Option<usize>, u32)> {
    events
        .iter()
        .filter_map(|e| match e {
            MigrateEvent::LockRetry {
                version,
                statement,
                attempt,
                ..
            } => Some((version.number(), *statement, *attempt)),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transactional_group_blocked_by_a_table_lock_is_retried_whole_once_the_lock_is_gone() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    let holder = items_held_by_another_session(&db, &svc, dir.path()).await;
    write(
        dir.path(),
        &[
            ("2_log.up.sql", "CREATE TABLE log (id int);"),
            ("3_label.up.sql", "ALTER TABLE items ADD COLUMN label text;"),
        ],
    );

    let (task, mut events) = spawn_up(migrator(&svc, dir.path(), lock_options(5)));
    let first = next_retry(&mut events).await;
    assert!(
        matches!(
            &first,
            MigrateEvent::LockRetry {
                version,
                statement: None,
                attempt: 1,
                retries: 5,
                ..
            } if version.number() == 3
        ),
        "{first:?}"
    );
    assert!(first.to_string().contains("retry 1 of 5"), "{first}");
    holder.batch_execute("COMMIT").await.unwrap();

    let report = task.await.unwrap().unwrap();
    assert_eq!(report.migrations.len(), 2);
    let mut rest = Vec::new();
    while let Ok(event) = events.try_recv() {
        rest.push(event);
    }
    // The whole group ran again: migration 2, rolled back with 3, started again.
    assert!(
        rest.iter()
            .any(|e| matches!(e, MigrateEvent::Started { version, .. } if version.number() == 2)),
        "{rest:?}"
    );
    assert_eq!(versions(&history(&svc).await), [1, 2, 3]);
}

/// Found by a trial: Ctrl-C during the pause before a lock retry was only seen when the
/// retry's statement was cancelled, and the run reported 57014. The pause now ends at the
/// interrupt, with the run interrupted and nothing of the group kept.
#[tokio::test]
async fn an_interrupt_during_the_pause_before_a_lock_retry_stops_the_run_there() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    let _holder = items_held_by_another_session(&db, &svc, dir.path()).await;
    write(
        dir.path(),
        &[
            ("2_log.up.sql", "CREATE TABLE log (id int);"),
            ("3_label.up.sql", "ALTER TABLE items ADD COLUMN label text;"),
        ],
    );
    let token = tokio_util::sync::CancellationToken::new();
    let m = migrator(
        &svc,
        dir.path(),
        MigrateOptions {
            lock_retry_backoff: Duration::from_secs(30),
            ..lock_options(3)
        },
    )
    .with_interrupt(token.clone());
    let (task, mut events) = spawn_up(m);
    next_retry(&mut events).await;
    let asked = std::time::Instant::now();
    token.cancel();
    let err = task.await.unwrap().unwrap_err();
    assert!(
        matches!(&err, MigrateError::Interrupted { done, dirty: None, .. } if done.is_empty()),
        "{err:?}"
    );
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "it waited out the pause"
    );
    assert_eq!(versions(&history(&svc).await), [1]);
    assert!(!table_exists(&svc, "log").await);

    // The same in a non-transactional migration, after one of its statements ran: stopped
    // there, it is dirty, as an interrupt between two statements leaves it.
    write(
        dir.path(),
        &[
            (
                "2_log.up.sql",
                "-- svcdb:no-transaction\nCREATE TABLE log (id int);\nALTER TABLE items ADD COLUMN label text;",
            ),
            ("3_label.up.sql", "SELECT 1;"),
        ],
    );
    let token = tokio_util::sync::CancellationToken::new();
    let m = migrator(
        &svc,
        dir.path(),
        MigrateOptions {
            lock_retry_backoff: Duration::from_secs(30),
            ..lock_options(3)
        },
    )
    .with_interrupt(token.clone());
    let (task, mut events) = spawn_up(m);
    let retry = next_retry(&mut events).await;
    assert!(
        matches!(
            &retry,
            MigrateEvent::LockRetry {
                statement: Some(2),
                ..
            }
        ),
        "{retry:?}"
    );
    let asked = std::time::Instant::now();
    token.cancel();
    let err = task.await.unwrap().unwrap_err();
    assert!(
        matches!(&err, MigrateError::Interrupted { dirty: Some(v), .. } if v.number() == 2),
        "{err:?}"
    );
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "it waited out the pause"
    );
    assert!(table_exists(&svc, "log").await, "its first statement stays");
}

#[tokio::test]
async fn a_transactional_migration_whose_table_stays_locked_fails_after_the_retries() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    let _holder = items_held_by_another_session(&db, &svc, dir.path()).await;
    write(
        dir.path(),
        &[
            ("2_log.up.sql", "CREATE TABLE log (id int);"),
            ("3_label.up.sql", "ALTER TABLE items ADD COLUMN label text;"),
        ],
    );

    let mut events = Vec::new();
    let options = MigrateOptions {
        lock_retry_backoff: Duration::from_millis(10),
        ..lock_options(2)
    };
    let err = migrator(&svc, dir.path(), options)
        .up_with(&UpOptions::default(), &mut |e| events.push(e.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::LOCK_NOT_AVAILABLE), "{err}");
    let f = failure(&err);
    assert_eq!((f.version.number(), f.lock_retries), (3, 2));
    assert!(f.rolled_back);
    assert_eq!(numbers(&f.rolled_back_with), [2]);
    assert_eq!(retries(&events), [(3, None, 1), (3, None, 2)]);
    assert_eq!(versions(&history(&svc).await), [1]);
    assert!(!table_exists(&svc, "log").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_transactional_statement_blocked_by_a_table_lock_is_retried_alone() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    let holder = items_held_by_another_session(&db, &svc, dir.path()).await;
    // Running the whole script again would fail on the CREATE TABLE that already ran.
    write(
        dir.path(),
        &[(
            "2_label.up.sql",
            "-- svcdb:no-transaction\nCREATE TABLE log (id int);\nALTER TABLE items ADD COLUMN label text;\n",
        )],
    );

    let (task, mut events) = spawn_up(migrator(&svc, dir.path(), lock_options(5)));
    let first = next_retry(&mut events).await;
    assert!(
        matches!(
            &first,
            MigrateEvent::LockRetry {
                version,
                statement: Some(2),
                attempt: 1,
                ..
            } if version.number() == 2
        ),
        "{first:?}"
    );
    holder.batch_execute("COMMIT").await.unwrap();

    task.await.unwrap().unwrap();
    let rows = history(&svc).await;
    assert_eq!(
        rows.iter().map(|r| (r.0, r.1)).collect::<Vec<_>>(),
        [(1, false), (2, false)]
    );
}

#[tokio::test]
async fn a_non_transactional_statement_whose_table_stays_locked_fails_dirty_after_the_retries() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    let _holder = items_held_by_another_session(&db, &svc, dir.path()).await;
    write(
        dir.path(),
        &[(
            "2_label.up.sql",
            "-- svcdb:no-transaction\nCREATE TABLE log (id int);\nALTER TABLE items ADD COLUMN label text;\n",
        )],
    );

    let mut events = Vec::new();
    let options = MigrateOptions {
        lock_retry_backoff: Duration::from_millis(10),
        ..lock_options(3)
    };
    let err = migrator(&svc, dir.path(), options)
        .up_with(&UpOptions::default(), &mut |e| events.push(e.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::LOCK_NOT_AVAILABLE), "{err}");
    let f = failure(&err);
    assert_eq!((f.version.number(), f.lock_retries), (2, 3));
    assert!(f.dirty);
    assert_eq!(f.statements_done, Some(1));
    assert_eq!(
        retries(&events),
        [(2, Some(2), 1), (2, Some(2), 2), (2, Some(2), 3)]
    );
}

#[tokio::test]
async fn no_lock_retries_fails_at_the_first_lock_timeout() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    let _holder = items_held_by_another_session(&db, &svc, dir.path()).await;
    write(
        dir.path(),
        &[("2_label.up.sql", "ALTER TABLE items ADD COLUMN label text;")],
    );

    let mut events = Vec::new();
    let err = migrator(&svc, dir.path(), lock_options(0))
        .up_with(&UpOptions::default(), &mut |e| events.push(e.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::LOCK_NOT_AVAILABLE), "{err}");
    assert_eq!(failure(&err).lock_retries, 0);
    assert!(retries(&events).is_empty());
}

#[tokio::test]
async fn a_concurrent_index_cut_short_by_lock_timeout_is_not_retried() {
    concurrent_index_under_the_scripts_own_lock_timeout("250ms").await;
}

/// Found by a trial: a script that set svcdb's very value itself had it lifted, when the runner
/// told the script's bound from its own by the server's setting.
#[tokio::test]
async fn a_scripts_own_lock_timeout_equal_to_svcdbs_is_kept_for_a_concurrent_index() {
    concurrent_index_under_the_scripts_own_lock_timeout("300ms").await;
}

/// A `CREATE INDEX CONCURRENTLY` after the script's own `SET lock_timeout = '<set>'`, while a
/// writer's transaction stays open: cut short by that bound, not retried, the index named.
async fn concurrent_index_under_the_scripts_own_lock_timeout(set: &str) {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[("1_items.up.sql", "CREATE TABLE items (id bigint);")],
    );
    migrator(&svc, dir.path(), MigrateOptions::default())
        .up()
        .await
        .unwrap();
    // A writer's open transaction: CREATE INDEX CONCURRENTLY gets its own table lock, records
    // the index, then waits for this writer and times out, leaving the index invalid.
    let writer = db.admin().await;
    writer
        .batch_execute(&format!(
            "BEGIN; INSERT INTO {}.items VALUES (1);",
            svc.schema()
        ))
        .await
        .unwrap();
    // svcdb lifts its own lock_timeout for such a statement
    // (`a_concurrent_index_waits_out_another_services_old_transaction`); a script's own is
    // kept.
    write(
        dir.path(),
        &[(
            "2_items_id.up.sql",
            &format!("-- svcdb:no-transaction\nSET lock_timeout = '{set}';\nCREATE INDEX CONCURRENTLY items_id ON items (id);\n"),
        )],
    );

    let mut events = Vec::new();
    // Lifted, the build would wait for the writer for good.
    let err = tokio::time::timeout(
        Duration::from_secs(20),
        migrator(&svc, dir.path(), lock_options(3))
            .up_with(&UpOptions::default(), &mut |e| events.push(e.clone())),
    )
    .await
    .expect("the index build waited past the script's own lock_timeout")
    .unwrap_err();
    // Run again, the statement would fail on the index it left (42P07), or with IF NOT EXISTS
    // accept the broken one: the lock timeout is the failure, with the index named.
    assert_eq!(err.code(), Some(&SqlState::LOCK_NOT_AVAILABLE), "{err}");
    let f = failure(&err);
    assert_eq!(f.lock_retries, 0, "{err}");
    assert!(retries(&events).is_empty(), "{events:?}");
    assert!(f.dirty);
    assert_eq!(
        f.invalid_indexes
            .iter()
            .map(|i| i.name.as_str())
            .collect::<Vec<_>>(),
        ["items_id"],
        "{err}"
    );
}

/// Found by a user trial: `CREATE INDEX CONCURRENTLY` waits for every transaction in the
/// database older than its snapshot, another service's long backfill included, and that
/// wait counted against svcdb's `lock_timeout`: the index build failed, left an invalid
/// index and the schema dirty, though it blocked nobody. svcdb now lifts its own bound for
/// such a statement. The control is the test above: with the script's own `lock_timeout` the
/// same wait still fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_index_waits_out_another_services_old_transaction() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    let other = items_under_an_old_transaction(&db, &svc, dir.path()).await;
    write(
        dir.path(),
        &[(
            "2_items_id.up.sql",
            // svcdb's own bound is back for the statements after it.
            "-- svcdb:no-transaction\nCREATE INDEX CONCURRENTLY items_id ON items (id);\n\
             DO $$ BEGIN IF current_setting('lock_timeout') <> '300ms' THEN \
             RAISE EXCEPTION 'lock_timeout is %', current_setting('lock_timeout'); END IF; END $$;\n",
        )],
    );
    let (task, _events) = spawn_up(migrator(&svc, dir.path(), lock_options(0)));
    // Well past lock_timeout (300 ms), the index build is still waiting for it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!task.is_finished(), "{:?}", task.await);
    other.batch_execute("COMMIT").await.unwrap();

    task.await.unwrap().unwrap();
    assert_eq!(
        history(&svc)
            .await
            .iter()
            .map(|r| (r.0, r.1))
            .collect::<Vec<_>>(),
        [(1, false), (2, false)]
    );
    let valid: bool = db
        .admin()
        .await
        .query_one(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = $1::text::regclass",
            &[&format!("{}.items_id", svc.schema())],
        )
        .await
        .unwrap()
        .get(0);
    assert!(valid);
}

/// Found by a trial: a `CREATE INDEX CONCURRENTLY` whose session the server ended (a restart,
/// a failover) left an invalid index that the failure did not name: the runner asked for
/// invalid indexes on the dead session. It now asks on a pooled connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_build_ended_by_the_server_names_the_invalid_index_it_left() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    // An old transaction the build waits out, so that it is still running when ended.
    let other = items_under_an_old_transaction(&db, &svc, dir.path()).await;
    write(
        dir.path(),
        &[(
            "2_items_id.up.sql",
            "-- svcdb:no-transaction\nCREATE INDEX CONCURRENTLY items_id ON items (id);\n",
        )],
    );
    let (task, _events) = spawn_up(migrator(&svc, dir.path(), MigrateOptions::default()));
    assert!(
        terminate_backends(
            &db,
            "a.query LIKE 'CREATE INDEX CONCURRENTLY%' AND a.wait_event_type = 'Lock'"
        )
        .await,
        "the index build was never seen waiting"
    );
    let err = task.await.unwrap().unwrap_err();
    other.batch_execute("COMMIT").await.unwrap();
    let f = failure(&err);
    assert!(f.dirty, "{err}");
    assert_eq!(
        f.invalid_indexes
            .iter()
            .map(|i| i.name.as_str())
            .collect::<Vec<_>>(),
        ["items_id"],
        "{err}"
    );
}

/// Applies `1_items` (a table `items`) in `dir` and opens another service's transaction, on
/// none of this schema's tables, that holds its snapshot: a `CREATE INDEX CONCURRENTLY` waits
/// for it to end. Returns that session (`COMMIT` ends it).
async fn items_under_an_old_transaction(
    db: &TestDb,
    svc: &ServiceDb,
    dir: &std::path::Path,
) -> svcdb::DedicatedConn {
    write(
        dir,
        &[("1_items.up.sql", "CREATE TABLE items (id bigint);")],
    );
    migrator(svc, dir, MigrateOptions::default())
        .up()
        .await
        .unwrap();
    let other = db.admin().await;
    other
        .batch_execute("CREATE TABLE public.ledger (id int)")
        .await
        .unwrap();
    other
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM public.ledger;")
        .await
        .unwrap();
    other
}

/// Terminates the backends of `db` whose `pg_stat_activity` row (`a`) matches `condition`,
/// asking every 25 ms for up to 5 s; false if none ever matched.
async fn terminate_backends(db: &TestDb, condition: &str) -> bool {
    let admin = db.admin().await;
    let sql = format!(
        "SELECT count(*) > 0 FROM pg_stat_activity a, pg_terminate_backend(a.pid) t \
         WHERE a.datname = current_database() AND {condition} AND t"
    );
    for _ in 0..200 {
        if admin.query_one(&sql, &[]).await.unwrap().get(0) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

/// Runs `up` of a non-transactional migration whose statement number `slow` (1-based) sleeps,
/// terminates its backend while it sleeps, and returns the failure.
async fn terminated_in_statement(slow: usize) -> (TestDb, ServiceDb, MigrateError) {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    let mut statements = vec!["CREATE TABLE log (id int)", "CREATE TABLE audit (id int)"];
    statements.insert(slow - 1, "SELECT pg_sleep(30)");
    write(
        dir.path(),
        &[(
            "1_slow.up.sql",
            &format!("-- svcdb:no-transaction\n{};\n", statements.join(";\n")),
        )],
    );
    let (task, _events) = spawn_up(migrator(&svc, dir.path(), MigrateOptions::default()));
    assert!(
        terminate_backends(&db, "a.query LIKE 'SELECT pg_sleep(30)%'").await,
        "the sleeping statement never ran"
    );
    let err = task.await.unwrap().unwrap_err();
    (db, svc, err)
}

/// Found by a user trial: `pg_terminate_backend` (as a restart or a failover does) in the
/// first statement of a non-transactional migration left the schema dirty, and every replica
/// was then refused until someone ran `repair`, though the server had rolled that statement
/// back. The mark is now taken back on a new connection, and the migration stays pending.
/// The control: terminated in its second statement, after the first committed, it is dirty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ended_by_the_server_in_the_first_statement_leaves_the_migration_pending() {
    let (_db, svc, err) = terminated_in_statement(1).await;
    assert_eq!(err.code(), Some(&SqlState::ADMIN_SHUTDOWN), "{err}");
    assert!(!failure(&err).dirty, "{err}");
    assert!(history(&svc).await.is_empty());
    assert!(!table_exists(&svc, "log").await);

    let (_db, svc, err) = terminated_in_statement(2).await;
    assert_eq!(err.code(), Some(&SqlState::ADMIN_SHUTDOWN), "{err}");
    assert!(failure(&err).dirty, "{err}");
    assert_eq!(
        history(&svc)
            .await
            .iter()
            .map(|r| (r.0, r.1))
            .collect::<Vec<_>>(),
        [(1, true)]
    );
}
