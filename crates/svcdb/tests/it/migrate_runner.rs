//! The migration runner against a real PostgreSQL: run-once, the advisory lock, atomic deploys,
//! undo with down scripts, dirty state, drift, down/redo/baseline/repair.

use std::path::Path;
use std::time::{Duration, Instant};

use svcdb::migrate::{
    Direction, DownOptions, MigrateError, MigrateEvent, MigrateOptions, MigrationFailure,
    MigrationState, Migrations, Migrator, RepairAction, UpOptions,
};
use svcdb::testing::TestDb;
use svcdb::ServiceDb;

/// Writes `files` (name, contents) into `dir`.
/// Every test's start: a throwaway database, its `shop` service, and an empty folder for the
/// test's migrations.
struct Fixture {
    db: TestDb,
    svc: ServiceDb,
    dir: tempfile::TempDir,
}

impl Fixture {
    async fn new() -> Self {
        let db = TestDb::new().await;
        let svc = db.service("shop").await;
        let dir = tempfile::tempdir().unwrap();
        Self { db, svc, dir }
    }
}

/// Writes `files` (paths relative to `dir`) into the migrations folder; shared by the
/// migrate_* test modules.
pub(crate) fn write(dir: &Path, files: &[(&str, &str)]) {
    for (rel, contents) in files {
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, contents).unwrap();
    }
}

/// A runner over the folder `dir`; shared by the migrate_* test modules.
pub(crate) fn migrator(svc: &ServiceDb, dir: &Path) -> Migrator {
    Migrator::new(svc.clone(), Migrations::from_dir(dir).unwrap())
}

/// Applied versions, from the history table.
async fn history(svc: &ServiceDb) -> Vec<i64> {
    let conn = svc.get().await.unwrap();
    let sql = format!(
        "SELECT version FROM {}.svcdb_migrations ORDER BY version",
        svc.schema()
    );
    conn.query(&sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// `pg_dump --schema-only` of one schema, without the lines that change between runs.
fn dump(db: &TestDb, schema: &str) -> String {
    let out = std::process::Command::new("pg_dump")
        .args([
            "--schema-only",
            "--no-owner",
            &format!("--schema={schema}"),
            "-d",
            &db.url(),
        ])
        .output()
        .expect("pg_dump on PATH");
    assert!(
        out.status.success(),
        "pg_dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The failure inside a `MigrateError::Failed`.
fn failure(err: &MigrateError) -> &MigrationFailure {
    match err {
        MigrateError::Failed(f) => f,
        other => panic!("expected a failed migration, got {other}"),
    }
}

fn options() -> MigrateOptions {
    MigrateOptions::default()
}

/// Three migrations, each with a down.
const THREE: &[(&str, &str)] = &[
    (
        "0001_items.up.sql",
        "CREATE TABLE items (id bigint PRIMARY KEY);",
    ),
    ("0001_items.down.sql", "DROP TABLE items;"),
    (
        "0002_label.up.sql",
        "ALTER TABLE items ADD COLUMN label text;",
    ),
    (
        "0002_label.down.sql",
        "ALTER TABLE items DROP COLUMN label;",
    ),
    (
        "0003_seed.up.sql",
        "INSERT INTO items VALUES (1, 'one'), (2, 'two');",
    ),
    ("0003_seed.down.sql", "DELETE FROM items;"),
];

#[tokio::test]
async fn up_applies_once_and_status_reports_each_migration() {
    let Fixture { db: _db, svc, dir } = Fixture::new().await;
    write(dir.path(), THREE);
    let m = migrator(&svc, dir.path());

    let before = m.status().await.unwrap();
    assert!(!before.history_exists);
    assert_eq!(before.pending().count(), 3);
    assert!(!before.is_up_to_date());

    let mut events = Vec::new();
    let report = m
        .up_with(&UpOptions::default(), &mut |e| events.push(e.clone()))
        .await
        .unwrap();
    assert!(report.atomic && !report.dry_run);
    assert_eq!(
        report
            .migrations
            .iter()
            .map(|e| e.version.number())
            .collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(report.current_version, Some(v(3)));
    assert_eq!(
        events.len(),
        6,
        "started + finished per migration: {events:?}"
    );
    assert!(matches!(
        &events[0],
        MigrateEvent::Started { version, .. } if version.number() == 1
    ));
    assert!(matches!(
        &events[5],
        MigrateEvent::Finished { version, .. } if version.number() == 3
    ));

    let again = m.up().await.unwrap();
    assert!(again.migrations.is_empty(), "applied versions are skipped");
    assert_eq!(again.current_version, Some(v(3)));
    let conn = svc.get().await.unwrap();
    let n: i64 = conn
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2, "the seed ran once");

    let status = m.status().await.unwrap();
    assert!(status.history_exists && status.is_up_to_date());
    assert_eq!(status.current_version, Some(v(3)));
    assert_eq!(status.dirty, None);
    for e in &status.entries {
        assert_eq!(e.state, MigrationState::Applied);
        assert!(e.applied_at.is_some() && e.execution_ms.is_some());
        assert_eq!(e.applied_by.as_deref(), Some("postgres"));
    }
    // The report is what the CLI prints with --json.
    let json = serde_json::to_value(&status).unwrap();
    assert_eq!(json["entries"][0]["state"], "applied");
}

#[tokio::test]
async fn dry_run_and_target_version() {
    let Fixture { db: _db, svc, dir } = Fixture::new().await;
    write(dir.path(), THREE);
    let m = migrator(&svc, dir.path());

    let dry = m
        .up_with(
            &UpOptions {
                to: None,
                dry_run: true,
            },
            &mut |_| {},
        )
        .await
        .unwrap();
    assert!(dry.dry_run);
    assert_eq!(dry.migrations.len(), 3);
    assert!(
        !m.status().await.unwrap().history_exists,
        "a dry run changes nothing"
    );

    let to2 = m
        .up_with(
            &UpOptions {
                to: Some(v(2)),
                dry_run: false,
            },
            &mut |_| {},
        )
        .await
        .unwrap();
    assert_eq!(
        to2.migrations
            .iter()
            .map(|e| e.version.number())
            .collect::<Vec<_>>(),
        [1, 2]
    );
    assert_eq!(history(&svc).await, [1, 2]);
}

/// The lock key the runner uses for `schema` in the current database.
fn lock_sql(schema: &str) -> String {
    format!("SELECT pg_advisory_lock(hashtextextended('svcdb.migrate.' || current_database() || '.' || '{schema}', 0))")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noop_up_takes_no_lock_and_a_pending_up_waits_for_it_boundedly() {
    let Fixture { db, svc, dir } = Fixture::new().await;
    write(dir.path(), THREE);
    migrator(&svc, dir.path()).up().await.unwrap();

    // Another session holds the schema's migration lock.
    let holder = db.admin().await;
    holder.batch_execute(&lock_sql("shop")).await.unwrap();

    // Were the no-op to take the lock, it would wait the full minute and fail LockTimeout.
    let m = migrator(&svc, dir.path()).with_options(MigrateOptions {
        lock_wait: Duration::from_secs(60),
        ..options()
    });
    let start = Instant::now();
    assert!(m.up().await.unwrap().migrations.is_empty());
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "no-op up waited: {:?}",
        start.elapsed()
    );

    write(
        dir.path(),
        &[("0004_more.up.sql", "CREATE TABLE more (id int);")],
    );
    let m = migrator(&svc, dir.path()).with_options(MigrateOptions {
        lock_wait: Duration::from_millis(300),
        ..options()
    });
    let mut waited = false;
    let err = m
        .up_with(&UpOptions::default(), &mut |e| {
            waited |= matches!(e, MigrateEvent::WaitingForLock { .. })
        })
        .await
        .unwrap_err();
    assert!(matches!(err, MigrateError::LockTimeout { .. }), "{err}");
    assert!(waited, "the observer heard about the wait");

    drop(holder); // closing the session releases its lock
    assert_eq!(m.up().await.unwrap().migrations.len(), 1);
}

#[tokio::test]
async fn noop_up_with_a_thousand_applied_runs_nothing() {
    // Its speed is measured by `svcdb-bench migrate` (docs/benchmarks.md), not timed here.
    let Fixture { db: _db, svc, dir } = Fixture::new().await;
    let files: Vec<(String, String)> = (1..=1000)
        .map(|v| {
            (
                format!("{v:04}_m{v}.up.sql"),
                format!("CREATE TABLE t{v} (id int);"),
            )
        })
        .collect();
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    write(dir.path(), &refs);
    let m = migrator(&svc, dir.path());
    assert_eq!(m.up().await.unwrap().migrations.len(), 1000);
    let again = m.up().await.unwrap();
    assert!(again.migrations.is_empty());
    assert_eq!(again.current_version, Some(v(1000)));
    let status = m.status().await.unwrap();
    assert!(status.is_up_to_date());
    assert_eq!(status.entries.len(), 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_runners_apply_each_migration_exactly_once() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    // Migration 2 waits for a key the test holds, so whichever runner gets the schema's lock
    // keeps it until the test lets go, and the other seven meet it held.
    let hold = format!("SELECT pg_advisory_lock_shared({HELD_BY_TEST});");
    write(
        dir.path(),
        &[
            ("1_log.up.sql", "CREATE TABLE log (version int); INSERT INTO log VALUES (1);"),
            ("2_held.up.sql", &format!("{hold} INSERT INTO log VALUES (2);")),
            ("3_more.up.sql", "-- svcdb:no-transaction\nINSERT INTO log VALUES (3);\nCREATE INDEX CONCURRENTLY log_v ON log (version);"),
        ],
    );
    let test_session = db.admin().await;
    test_session
        .batch_execute(&format!("SELECT pg_advisory_lock({HELD_BY_TEST})"))
        .await
        .unwrap();
    let mut services = Vec::new();
    for _ in 0..8 {
        services.push(db.service("shop").await);
    }
    let mut runners: Vec<_> = services
        .iter()
        .map(|svc| {
            // No lock_timeout: migration 2 waits for the test, not for a clock.
            spawn_up(migrator(svc, dir.path()).with_options(MigrateOptions {
                lock_timeout: Duration::ZERO,
                ..options()
            }))
        })
        .collect();
    // Each runner either holds the lock (and is inside migration 2) or waits for it.
    let mut waiting = 0;
    let mut migrating = 0;
    for (_, events) in &mut runners {
        match wait_for_event(events, |e| {
            matches!(
                e,
                MigrateEvent::WaitingForLock { .. } | MigrateEvent::Started { .. }
            ) && !matches!(e, MigrateEvent::Started { version, .. } if *version != v(2))
        })
        .await
        {
            MigrateEvent::WaitingForLock { .. } => waiting += 1,
            _ => migrating += 1,
        }
    }
    assert_eq!((migrating, waiting), (1, 7), "the runners overlapped");

    test_session
        .batch_execute(&format!("SELECT pg_advisory_unlock({HELD_BY_TEST})"))
        .await
        .unwrap();
    let mut applied = 0;
    for (task, _) in runners {
        applied += task
            .await
            .unwrap()
            .expect("no runner fails")
            .migrations
            .len();
    }
    assert_eq!(applied, 3, "each migration applied by exactly one runner");
    let conn = services[0].get().await.unwrap();
    let log: Vec<i32> = conn
        .query("SELECT version FROM log ORDER BY version", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(log, [1, 2, 3]);
    assert_eq!(history(&services[0]).await, [1, 2, 3]);
}

/// Whether some session holds `schema`'s migration lock, read from `pg_locks` (a bigint
/// advisory key shows as its high and low 32 bits in `classid` and `objid`, `objsubid` 1).
async fn migration_lock_held(db: &TestDb, schema: &str) -> bool {
    db.admin()
        .await
        .query_one(
            "WITH k AS (SELECT hashtextextended('svcdb.migrate.' || current_database() || '.' || $1, 0) AS key)
             SELECT EXISTS (
               SELECT 1 FROM pg_locks l, k
                WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
                  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                  AND l.classid::text::bigint = (k.key >> 32) & 4294967295
                  AND l.objid::text::bigint = k.key & 4294967295)",
            &[&schema],
        )
        .await
        .unwrap()
        .get(0)
}

/// Polls `condition` every 50 ms for up to a minute; panics with `what` if it never holds.
async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    while !condition().await {
        assert!(
            Instant::now() < deadline,
            "timed out after a minute waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_schemas_never_wait_for_each_other() {
    let db = TestDb::new().await;
    let slow_dir = tempfile::tempdir().unwrap();
    // Stays in progress, holding the slow schema's lock, until the test lets go.
    write(
        slow_dir.path(),
        &[(
            "1_slow.up.sql",
            &format!("SELECT pg_advisory_lock_shared({HELD_BY_TEST});"),
        )],
    );
    let fast_dir = tempfile::tempdir().unwrap();
    write(
        fast_dir.path(),
        &[("1_fast.up.sql", "CREATE TABLE fast (id int);")],
    );
    let test_session = db.admin().await;
    test_session
        .batch_execute(&format!("SELECT pg_advisory_lock({HELD_BY_TEST})"))
        .await
        .unwrap();
    let slow = migrator(&db.service("slow").await, slow_dir.path()).with_options(MigrateOptions {
        lock_timeout: Duration::ZERO, // waits for the test, not for a clock
        ..options()
    });
    let (slow_task, mut slow_events) = spawn_up(slow);
    wait_for_event(
        &mut slow_events,
        |e| matches!(e, MigrateEvent::Started { version, .. } if *version == v(1)),
    )
    .await;
    assert!(migration_lock_held(&db, "slow").await);

    // A runner that waited for the slow schema's lock would say so, and time out.
    let fast = migrator(&db.service("fast").await, fast_dir.path()).with_options(MigrateOptions {
        lock_wait: Duration::from_secs(30),
        ..options()
    });
    let mut waited = false;
    let report = fast
        .up_with(&UpOptions::default(), &mut |e| {
            waited |= matches!(e, MigrateEvent::WaitingForLock { .. })
        })
        .await
        .unwrap();
    assert_eq!(report.migrations.len(), 1);
    assert!(!waited, "the fast schema waited for the slow one");
    assert!(
        !slow_task.is_finished(),
        "the slow schema is still migrating"
    );

    test_session
        .batch_execute(&format!("SELECT pg_advisory_unlock({HELD_BY_TEST})"))
        .await
        .unwrap();
    assert_eq!(slow_task.await.unwrap().unwrap().migrations.len(), 1);
}

/// Five migrations whose third fails.
const FAILS_AT_3: &[(&str, &str)] = &[
    ("0002_a.up.sql", "CREATE TABLE a (id int);"),
    ("0002_a.down.sql", "DROP TABLE a;"),
    (
        "0003_b.up.sql",
        "CREATE TABLE b (id int); CREATE INDEX b_id ON b (id);",
    ),
    ("0003_b.down.sql", "DROP TABLE b;"),
    (
        "0004_broken.up.sql",
        "CREATE TABLE c (id int); SELECT 1 / 0;",
    ),
    ("0004_broken.down.sql", "DROP TABLE c;"),
    ("0005_d.up.sql", "CREATE TABLE d (id int);"),
    ("0006_e.up.sql", "CREATE TABLE e (id int);"),
];

#[tokio::test]
async fn failure_at_step_3_of_5_leaves_the_schema_as_it_was() {
    let Fixture { db, svc, dir } = Fixture::new().await;

    // From nothing: the history table created by the deploy is rolled back too.
    write(dir.path(), FAILS_AT_3);
    let before = dump(&db, "shop");
    let err = migrator(&svc, dir.path()).up().await.unwrap_err();
    let f = failure(&err);
    assert_eq!(
        (f.version.number(), f.rolled_back, f.applied.is_empty()),
        (4, true, true),
        "{err}"
    );
    assert_eq!(err.code(), Some(&svcdb::SqlState::DIVISION_BY_ZERO));
    assert_eq!(dump(&db, "shop"), before);

    // From an applied first migration.
    write(
        dir.path(),
        &[("0001_base.up.sql", "CREATE TABLE base (id int);")],
    );
    let m = migrator(&svc, dir.path());
    m.up_with(
        &UpOptions {
            to: Some(v(1)),
            dry_run: false,
        },
        &mut |_| {},
    )
    .await
    .unwrap();
    let before = dump(&db, "shop");
    assert_eq!(failure(&m.up().await.unwrap_err()).version.number(), 4);
    assert_eq!(dump(&db, "shop"), before);
    assert_eq!(history(&svc).await, [1]);
}

/// A table, a non-transactional index migration, then a failure.
const NON_TX_BATCH: &[(&str, &str)] = &[
    ("0001_a.up.sql", "CREATE TABLE a (id int, label text);"),
    ("0001_a.down.sql", "DROP TABLE a;"),
    ("0002_index.up.sql", "-- svcdb:no-transaction\nCREATE INDEX CONCURRENTLY a_label ON a (label);\nCREATE INDEX CONCURRENTLY a_id ON a (id);\n"),
    ("0002_index.down.sql", "-- svcdb:no-transaction\nDROP INDEX CONCURRENTLY a_id;\nDROP INDEX CONCURRENTLY a_label;"),
    ("0003_broken.up.sql", "CREATE TABLE c (id int); SELECT 1 / 0;"),
    ("0004_d.up.sql", "CREATE TABLE d (id int);"),
];

#[tokio::test]
async fn failure_in_a_batch_with_a_non_transactional_migration_runs_the_downs() {
    let Fixture { db, svc, dir } = Fixture::new().await;
    let before = dump(&db, "shop");
    write(dir.path(), NON_TX_BATCH);
    let mut events = Vec::new();
    let err = migrator(&svc, dir.path())
        .up_with(&UpOptions::default(), &mut |e| events.push(e.clone()))
        .await
        .unwrap_err();
    let f = failure(&err);
    assert_eq!(f.version.number(), 3);
    assert_eq!(f.undone, [v(2), v(1)], "{err}");
    assert!(f.applied.is_empty(), "{err}");
    assert!(
        f.undo_error.is_none() && !f.dirty && !f.rolled_back,
        "{err}"
    );
    let downs: Vec<i64> = events
        .iter()
        .filter_map(|e| match e {
            MigrateEvent::Finished {
                version,
                direction: Direction::Down,
                ..
            } => Some(version.number()),
            _ => None,
        })
        .collect();
    assert_eq!(downs, [2, 1]);
    // The history table this deploy created is gone too.
    assert_eq!(dump(&db, "shop"), before);
    assert!(
        !migrator(&svc, dir.path())
            .status()
            .await
            .unwrap()
            .history_exists
    );
}

#[tokio::test]
async fn undoing_stops_at_a_migration_without_a_down_and_says_so() {
    let Fixture { db: _db, svc, dir } = Fixture::new().await;
    write(dir.path(), NON_TX_BATCH);
    std::fs::remove_file(dir.path().join("0001_a.down.sql")).unwrap();
    let err = migrator(&svc, dir.path()).up().await.unwrap_err();
    eprintln!("{err}");
    let f = failure(&err);
    assert_eq!(f.version.number(), 3);
    assert_eq!(
        (f.undone.as_slice(), f.applied.as_slice()),
        (&[v(2)][..], &[v(1)][..]),
        "{err}"
    );
    assert!(f.undo_error.is_some(), "{err}");
    assert_eq!(
        history(&svc).await,
        [1],
        "what stays in effect stays recorded"
    );
}

#[tokio::test]
async fn a_non_transactional_migration_failing_at_its_first_statement_is_not_dirty() {
    let Fixture { db: _db, svc, dir } = Fixture::new().await;
    write(
        dir.path(),
        &[
            ("0001_a.up.sql", "CREATE TABLE a (id int);"),
            ("0001_a.down.sql", "DROP TABLE a;"),
            (
                "0002_idx.up.sql",
                "-- svcdb:no-transaction\nCREATE INDEX CONCURRENTLY a_x ON missing (x);\nCREATE TABLE never (id int);\n",
            ),
            ("0002_idx.down.sql", "-- svcdb:no-transaction\nDROP INDEX CONCURRENTLY a_x;\n"),
        ],
    );
    let err = migrator(&svc, dir.path()).up().await.unwrap_err();
    assert_eq!(err.code(), Some(&svcdb::SqlState::UNDEFINED_TABLE), "{err}");
    let f = failure(&err);
    assert_eq!(
        (f.version.number(), f.dirty, f.statements_done),
        (2, false, Some(0)),
        "{err}"
    );
    // Nothing of it ran, so the deploy is undone as after a transactional failure.
    assert_eq!(f.undone, [v(1)], "{err}");
    assert!(f.applied.is_empty(), "{err}");
    let status = migrator(&svc, dir.path()).status().await.unwrap();
    assert_eq!((status.dirty, status.current_version), (None, None));

    // Fixed, it applies; its down failing at its first statement leaves it applied, not dirty.
    write(
        dir.path(),
        &[
            (
                "0002_idx.up.sql",
                "-- svcdb:no-transaction\nCREATE INDEX CONCURRENTLY a_x ON a (id);\n",
            ),
            (
                "0002_idx.down.sql",
                "-- svcdb:no-transaction\nDROP INDEX CONCURRENTLY a_y;\n",
            ),
        ],
    );
    let m = migrator(&svc, dir.path());
    m.up().await.unwrap();
    let err = m.down(&DownOptions::default()).await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(&svcdb::SqlState::UNDEFINED_OBJECT),
        "{err}"
    );
    let f = failure(&err);
    assert_eq!((f.dirty, f.statements_done), (false, Some(0)), "{err}");
    let status = m.status().await.unwrap();
    assert_eq!((status.dirty, status.current_version), (None, Some(v(2))));
    assert_eq!(history(&svc).await, [1, 2]);
}

#[tokio::test]
async fn non_transactional_failure_marks_dirty_until_repair() {
    let Fixture { db: _db, svc, dir } = Fixture::new().await;
    write(
        dir.path(),
        &[
            ("0001_a.up.sql", "CREATE TABLE a (id int);"),
            (
                "0002_half.up.sql",
                "-- svcdb:no-transaction\nCREATE TABLE half (id int);\nSELECT 1 / 0;\n",
            ),
        ],
    );
    let err = migrator(&svc, dir.path()).up().await.unwrap_err();
    eprintln!("{err}");
    let f = failure(&err);
    assert_eq!(
        (f.version.number(), f.dirty, f.statements_done),
        (2, true, Some(1)),
        "{err}"
    );

    let m = migrator(&svc, dir.path());
    let status = m.status().await.unwrap();
    assert_eq!(status.dirty, Some(v(2)));
    assert_eq!(status.current_version, Some(v(1)));
    assert_eq!(status.entries[1].state, MigrationState::Dirty);
    assert!(matches!(
        m.up().await,
        Err(MigrateError::Dirty { version, .. }) if version.number() == 2
    ));
    assert!(matches!(
        m.validate().await,
        Err(MigrateError::Dirty { version, .. }) if version.number() == 2
    ));
    assert!(matches!(
        m.down(&DownOptions::default()).await,
        Err(MigrateError::Dirty { .. })
    ));

    // The operator cleans up by hand, fixes the file and repairs.
    svc.get()
        .await
        .unwrap()
        .batch_execute("DROP TABLE half")
        .await
        .unwrap();
    write(
        dir.path(),
        &[(
            "0002_half.up.sql",
            "-- svcdb:no-transaction\nCREATE TABLE half (id int);\n",
        )],
    );
    let m = migrator(&svc, dir.path());
    let repair = m.repair().await.unwrap();
    assert!(
        matches!(
            repair.actions.as_slice(),
            [RepairAction::ClearedDirty { version, .. }] if version.number() == 2
        ),
        "{repair:?}"
    );
    assert_eq!(
        m.status().await.unwrap().entries[1].state,
        MigrationState::Pending
    );
    assert_eq!(m.up().await.unwrap().migrations.len(), 1);
    assert!(m.validate().await.unwrap().is_up_to_date());
}

#[tokio::test]
async fn crlf_edit_passes_a_real_edit_fails_until_allowed_or_repaired() {
    let Fixture { db: _db, svc, dir } = Fixture::new().await;
    write(
        dir.path(),
        &[(
            "0001_a.up.sql",
            "CREATE TABLE a (id int);\nCREATE TABLE b (id int);\n",
        )],
    );
    migrator(&svc, dir.path()).up().await.unwrap();

    write(
        dir.path(),
        &[(
            "0001_a.up.sql",
            "\u{feff}CREATE TABLE a (id int);\r\nCREATE TABLE b (id int);\r\n",
        )],
    );
    assert!(migrator(&svc, dir.path())
        .validate()
        .await
        .unwrap()
        .is_up_to_date());

    write(
        dir.path(),
        &[(
            "0001_a.up.sql",
            "CREATE TABLE a (id bigint);\nCREATE TABLE b (id int);\n",
        )],
    );
    let m = migrator(&svc, dir.path());
    let status = m.status().await.unwrap();
    assert_eq!(status.changed().count(), 1);
    assert!(!status.is_up_to_date());
    match m.validate().await {
        Err(MigrateError::Changed { version, path }) if version.number() == 1 => {
            assert!(path.ends_with("0001_a.up.sql"))
        }
        other => panic!("expected Changed, got {other:?}"),
    }
    assert!(matches!(m.up().await, Err(MigrateError::Changed { .. })));
    let allowing = migrator(&svc, dir.path()).with_options(MigrateOptions {
        allow_changed: true,
        ..options()
    });
    allowing.validate().await.unwrap();
    allowing.up().await.unwrap();

    let repair = m.repair().await.unwrap();
    assert!(
        matches!(
            repair.actions.as_slice(),
            [RepairAction::RealignedChecksum { version, .. }] if version.number() == 1
        ),
        "{repair:?}"
    );
    assert!(m.validate().await.unwrap().is_up_to_date());
    assert!(m.repair().await.unwrap().actions.is_empty());
}

#[tokio::test]
async fn diesel_layout_with_a_concurrent_index_and_names_with_spaces() {
    let Fixture { db: _db, svc, dir } = Fixture::new().await;
    write(
        dir.path(),
        &[
            ("2017-09-23-182408_create users/up.sql", "CREATE TABLE users (id int, email text);"),
            ("2017-09-23-182408_create users/down.sql", "DROP TABLE users;"),
            ("2017-09-24-000000_index email/up.sql", "CREATE INDEX CONCURRENTLY users_email ON users (email);\nCREATE INDEX CONCURRENTLY users_id ON users (id);"),
            ("2017-09-24-000000_index email/down.sql", "DROP INDEX CONCURRENTLY users_email;\nDROP INDEX CONCURRENTLY users_id;"),
            ("2017-09-24-000000_index email/metadata.toml", "run_in_transaction = false\n"),
        ],
    );
    let m = migrator(&svc, dir.path());
    let report = m.up().await.unwrap();
    assert!(!report.atomic);
    assert_eq!(report.migrations[1].version.number(), 20170924000000);
    assert_eq!(report.migrations[1].name, "index email");
    assert!(!report.migrations[1].transactional);
    let conn = svc.get().await.unwrap();
    let indexes: i64 = conn
        .query_one(
            "SELECT count(*) FROM pg_indexes WHERE schemaname = 'shop' AND tablename = 'users'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(indexes, 2);
    let status = m.status().await.unwrap();
    assert_eq!(status.entries[0].name, "create users");
    assert!(!status.entries[1].transactional);

    let down = m.down(&DownOptions::default()).await.unwrap();
    assert_eq!(down.migrations[0].version.number(), 20170924000000);
    assert_eq!(down.current_version, Some(v(20170923182408)));
    assert_eq!(history(&svc).await, [20170923182408]);
}

#[tokio::test]
async fn goose_files_go_up_and_down() {
    let Fixture { db: _db, svc, dir } = Fixture::new().await;
    write(
        dir.path(),
        &[
            (
                "20240101120000_create_a.sql",
                "-- +goose Up\n-- +goose StatementBegin\nCREATE TABLE a (id int);\n-- +goose StatementEnd\n\n-- +goose Down\nDROP TABLE a;\n",
            ),
            (
                "20240102000000_index_a.sql",
                "-- +goose NO TRANSACTION\n-- +goose Up\nCREATE INDEX CONCURRENTLY a_id ON a (id);\n-- +goose Down\nDROP INDEX CONCURRENTLY a_id;\n",
            ),
        ],
    );
    let table_a = || async {
        let sql = "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'shop' AND table_name = 'a'";
        let n: i64 = svc
            .get()
            .await
            .unwrap()
            .query_one(sql, &[])
            .await
            .unwrap()
            .get(0);
        n
    };
    let m = migrator(&svc, dir.path());
    let up = m.up().await.unwrap();
    assert!(!up.atomic, "the index runs outside a transaction");
    assert_eq!(history(&svc).await, [20240101120000, 20240102000000]);
    assert_eq!(table_a().await, 1);

    let down = m
        .down(&DownOptions {
            to: Some(v(0)),
            ..DownOptions::default()
        })
        .await
        .unwrap();
    assert_eq!(down.migrations.len(), 2);
    assert_eq!(history(&svc).await, [] as [i64; 0]);
    assert_eq!(table_a().await, 0);
}

#[tokio::test]
async fn down_by_steps_and_to_refuses_to_cross_an_up_without_a_down() {
    let Fixture { db: _db, svc, dir } = Fixture::new().await;
    write(dir.path(), THREE);
    write(
        dir.path(),
        &[
            ("0004_no_down.up.sql", "CREATE TABLE x (id int);"),
            ("0005_last.up.sql", "CREATE TABLE y (id int);"),
            ("0005_last.down.sql", "DROP TABLE y;"),
        ],
    );
    let m = migrator(&svc, dir.path());
    m.up().await.unwrap();

    let dry = m
        .down(&DownOptions {
            to: Some(v(4)),
            dry_run: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(dry.migrations.len(), 1);
    assert_eq!(history(&svc).await, [1, 2, 3, 4, 5]);

    let one = m.down(&DownOptions::default()).await.unwrap();
    assert_eq!(
        one.migrations
            .iter()
            .map(|e| e.version.number())
            .collect::<Vec<_>>(),
        [5]
    );
    assert_eq!(one.current_version, Some(v(4)));
    match m.down(&DownOptions::default()).await {
        Err(MigrateError::NoDown {
            version,
            path,
            newer,
            empty,
            ..
        }) if version.number() == 4 => {
            assert!(path.ends_with("0004_no_down.up.sql"));
            assert_eq!(newer, 0, "it is the newest applied");
            assert!(!empty, "there is no down file");
        }
        other => panic!("expected NoDown, got {other:?}"),
    }
    // A down file holding only a comment (found by a user trial: "it has no down script"
    // when the file was there, empty).
    write(
        dir.path(),
        &[("0004_no_down.down.sql", "-- irreversible\n")],
    );
    let m = migrator(&svc, dir.path());
    let err = m.down(&DownOptions::default()).await.unwrap_err();
    assert!(
        matches!(&err, MigrateError::NoDown { empty: true, .. }),
        "{err}"
    );
    std::fs::remove_file(dir.path().join("0004_no_down.down.sql")).unwrap();
    let m = migrator(&svc, dir.path());
    assert!(matches!(
        m.down(&DownOptions {
            to: Some(v(0)),
            ..Default::default()
        })
        .await,
        Err(MigrateError::NoDown { version, .. }) if version.number() == 4
    ));
    assert_eq!(
        history(&svc).await,
        [1, 2, 3, 4],
        "a refused down runs nothing"
    );

    // Take 4 out by hand, then revert 3 and 2 in one go.
    svc.get()
        .await
        .unwrap()
        .batch_execute("DROP TABLE x; DELETE FROM svcdb_migrations WHERE version = 4")
        .await
        .unwrap();
    let two = m
        .down(&DownOptions {
            steps: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        two.migrations
            .iter()
            .map(|e| e.version.number())
            .collect::<Vec<_>>(),
        [3, 2]
    );
    assert_eq!(two.current_version, Some(v(1)));
    let redo = m.redo().await.unwrap();
    assert_eq!(
        (
            redo.down.migrations[0].version.number(),
            redo.up.migrations[0].version.number()
        ),
        (1, 1)
    );
    assert_eq!(history(&svc).await, [1]);
}

/// Found by a user trial: `redo` of a migration whose down script undoes nothing (here
/// `SELECT 1`) committed the down, then the up failed on the table still there: the history
/// said pending over a schema that held it, and the error said everything was rolled back.
/// The two transactional scripts now run in one transaction, which the failure rolls back.
#[tokio::test]
async fn a_redo_whose_up_fails_leaves_the_migration_applied() {
    let Fixture { db: _db, svc, dir } = Fixture::new().await;
    write(
        dir.path(),
        &[
            ("0001_t.up.sql", "CREATE TABLE t (id int);"),
            ("0001_t.down.sql", "SELECT 1;"),
        ],
    );
    let m = migrator(&svc, dir.path());
    m.up().await.unwrap();

    let Err(MigrateError::Failed(f)) = m.redo().await else {
        panic!("the up of the redo should fail: t is still there");
    };
    assert_eq!(f.direction, Direction::Up);
    assert_eq!(
        f.cause.code(),
        Some(&tokio_postgres::error::SqlState::DUPLICATE_TABLE)
    );
    assert!(f.rolled_back && f.reverted_first.is_none(), "{f}");
    assert_eq!(history(&svc).await, [1], "the down's history delete stays");

    // The control: a down script that undoes the up redoes, in one transaction.
    write(dir.path(), &[("0001_t.down.sql", "DROP TABLE t;")]);
    let m = migrator(&svc, dir.path());
    let redo = m.redo().await.unwrap();
    assert!(redo.up.atomic);
    assert_eq!(redo.down.current_version, None);
    assert_eq!(history(&svc).await, [1]);
}

/// Found by a user trial on a goose folder: goose's placeholder down (`SELECT 'down SQL
/// query'`, written by `goose create`) ran, undid nothing, and the history row went, so the
/// next `up` failed on the table. It is no down script: `down` refuses before running anything.
/// A written down section is run (the control).
#[tokio::test]
async fn gooses_placeholder_down_is_refused_as_no_down() {
    let Fixture { db: _db, svc, dir } = Fixture::new().await;
    let goose = |down: &str| {
        format!("-- +goose Up\nCREATE TABLE t (id int);\n\n-- +goose Down\n-- +goose StatementBegin\n{down}\n-- +goose StatementEnd\n")
    };
    write(
        dir.path(),
        &[("20240101120000_t.sql", &goose("SELECT 'down SQL query';"))],
    );
    let m = migrator(&svc, dir.path());
    m.up().await.unwrap();
    let refused = m.down(&DownOptions::default()).await;
    assert!(
        matches!(refused, Err(MigrateError::NoDown { .. })),
        "{refused:?}"
    );
    assert_eq!(history(&svc).await, [20240101120000]);

    write(
        dir.path(),
        &[("20240101120000_t.sql", &goose("DROP TABLE t;"))],
    );
    let m = migrator(&svc, dir.path()).with_options(MigrateOptions {
        allow_changed: true,
        ..MigrateOptions::default()
    });
    m.down(&DownOptions::default()).await.unwrap();
    assert_eq!(history(&svc).await, [] as [i64; 0]);
}

/// Found by a user trial on a dbmate project: a first migration's down script dropped the
/// service schema with CASCADE (svcdb's history table with it), and `down` failed with a bare
/// `relation "….svcdb_migrations" does not exist`. It is now said for what it is, and the
/// transaction rolled back: the history and the tables are as they were.
#[tokio::test]
async fn a_down_script_that_drops_the_service_schema_is_said_and_rolled_back() {
    let Fixture { db: _db, svc, dir } = Fixture::new().await;
    write(
        dir.path(),
        &[
            ("0001_a.up.sql", "CREATE TABLE a (id int);"),
            ("0001_a.down.sql", "DROP SCHEMA IF EXISTS shop CASCADE;"),
            ("0002_b.up.sql", "CREATE TABLE b (id int);"),
            ("0002_b.down.sql", "DROP TABLE b;"),
        ],
    );
    let m = migrator(&svc, dir.path());
    m.up().await.unwrap();
    let err = m
        .down(&DownOptions {
            steps: 2,
            ..Default::default()
        })
        .await
        .unwrap_err();
    let MigrateError::HistoryDropped { versions, .. } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(
        versions.iter().map(|v| v.number()).collect::<Vec<_>>(),
        [2, 1]
    );
    assert_eq!(history(&svc).await, [1, 2]);
    svc.get()
        .await
        .unwrap()
        .batch_execute("SELECT FROM a, b")
        .await
        .unwrap();
}

/// Found by a user trial on a Flyway folder without undo files: `redo` refused for a lint
/// finding on the up script, and only past `--allow-unsafe` said the real blocker, that the
/// migration has no down script. It now says that first; with a down script, the lint's
/// finding is what refuses (the control).
#[tokio::test]
async fn redo_says_a_missing_down_script_before_the_lint() {
    let Fixture { db: _db, svc, dir } = Fixture::new().await;
    write(
        dir.path(),
        &[
            ("0001_t.up.sql", "CREATE TABLE t (id int, label text);"),
            ("0002_i.up.sql", "CREATE INDEX t_label ON t (label);"),
        ],
    );
    let allowing = MigrateOptions {
        allow_unsafe: true,
        ..MigrateOptions::default()
    };
    migrator(&svc, dir.path())
        .with_options(allowing)
        .up()
        .await
        .unwrap();
    let err = migrator(&svc, dir.path()).redo().await.unwrap_err();
    assert!(matches!(err, MigrateError::NoDown { .. }), "{err}");

    write(dir.path(), &[("0002_i.down.sql", "DROP INDEX t_label;")]);
    let err = migrator(&svc, dir.path()).redo().await.unwrap_err();
    assert!(matches!(err, MigrateError::Unsafe { .. }), "{err}");
    assert_eq!(history(&svc).await, [1, 2]);
}

/// Found by a user trial: `redo` said the lint's warning on its down script twice (its down's
/// check and its up's both read it). Once now.
#[tokio::test]
async fn redo_says_each_lint_finding_once() {
    let Fixture { db: _db, svc, dir } = Fixture::new().await;
    write(
        dir.path(),
        &[
            ("0001_t.up.sql", "CREATE TABLE t (id int);"),
            ("0001_t.down.sql", "DROP TABLE t;\nselec 1;"),
        ],
    );
    let m = migrator(&svc, dir.path());
    m.up().await.unwrap();
    let mut lint = 0;
    let _ = m
        .redo_with(&mut |e| {
            if matches!(e, MigrateEvent::Lint { .. }) {
                lint += 1;
            }
        })
        .await;
    assert_eq!(lint, 1);
}

/// Found by a user trial: a migration calling `uuid_generate_v4()`, of an extension an
/// administrator installed in `public`, failed with "fix the migration", where the fix was the
/// service's extra schemas. The hint now names them; with `public` among them it runs (the
/// control).
#[tokio::test]
async fn a_function_off_the_search_path_is_said_with_the_extra_schemas() {
    let Fixture { db, svc, dir } = Fixture::new().await;
    db.admin()
        .await
        .batch_execute(
            "CREATE FUNCTION public.made_elsewhere() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        )
        .await
        .unwrap();
    write(
        dir.path(),
        &[(
            "0001_t.up.sql",
            "CREATE TABLE t (id int DEFAULT made_elsewhere());",
        )],
    );
    let err = migrator(&svc, dir.path()).up().await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::UNDEFINED_FUNCTION)
    );
    assert!(err.to_string().contains("SVCDB_EXTRA_SCHEMAS"), "{err}");

    let mut config = db.config("shop");
    config.extra_schemas = vec![svcdb::Ident::new("schema", "public").unwrap()];
    let with_public = ServiceDb::connect(config).await.unwrap();
    migrator(&with_public, dir.path()).up().await.unwrap();
}

/// Found by a user trial on the shop: `--dir` of another service's migrations made every
/// applied file "changed", and `redo --allow-changed` ran that service's down script on this
/// schema. A changed file named otherwise than the history says is another schema's folder:
/// refused whatever is allowed, before anything runs. The same file only changed (its name
/// kept) is let through by `allow_changed` (the control).
#[tokio::test]
async fn another_schemas_folder_is_refused_even_where_changes_are_allowed() {
    let Fixture { db: _db, svc, dir } = Fixture::new().await;
    write(
        dir.path(),
        &[
            (
                "0001_create_products.up.sql",
                "CREATE TABLE products (id int);",
            ),
            ("0001_create_products.down.sql", "DROP TABLE products;"),
        ],
    );
    migrator(&svc, dir.path()).up().await.unwrap();
    let other = tempfile::tempdir().unwrap();
    write(
        other.path(),
        &[
            ("0001_create_orders.up.sql", "CREATE TABLE orders (id int);"),
            ("0001_create_orders.down.sql", "DROP TABLE products;"),
        ],
    );
    let allowing = MigrateOptions {
        allow_changed: true,
        ..MigrateOptions::default()
    };
    let m = migrator(&svc, other.path()).with_options(allowing.clone());
    let redo = m.redo().await.unwrap_err();
    assert!(matches!(redo, MigrateError::Source { .. }), "{redo}");
    let down = m.down(&DownOptions::default()).await.unwrap_err();
    assert!(matches!(down, MigrateError::Source { .. }), "{down}");
    assert_eq!(history(&svc).await, [1]);
    svc.get()
        .await
        .unwrap()
        .batch_execute("SELECT FROM products")
        .await
        .unwrap();

    write(
        dir.path(),
        &[(
            "0001_create_products.up.sql",
            "CREATE TABLE products (id int, label text);",
        )],
    );
    migrator(&svc, dir.path())
        .with_options(allowing)
        .redo()
        .await
        .unwrap();
}

/// The same redo with its down script outside a transaction: the down commits first, and the
/// failure says so instead of "everything was rolled back".
#[tokio::test]
async fn a_redo_with_a_nontransactional_down_says_the_down_stays() {
    let Fixture { db: _db, svc, dir } = Fixture::new().await;
    write(
        dir.path(),
        &[
            ("0001_t.up.sql", "CREATE TABLE t (id int);"),
            ("0001_t.down.sql", "-- svcdb:no-transaction\nSELECT 1;"),
        ],
    );
    let m = migrator(&svc, dir.path());
    m.up().await.unwrap();

    let Err(MigrateError::Failed(f)) = m.redo().await else {
        panic!("the up of the redo should fail: t is still there");
    };
    assert!(!f.rolled_back, "{f}");
    assert_eq!(f.reverted_first.as_ref().map(|v| v.number()), Some(1));
    // The hint says where the table may come from, not "fix the migration".
    assert!(f.to_string().contains("reverted before"), "{f}");
    assert_eq!(history(&svc).await, [] as [i64; 0]);
}

#[tokio::test]
async fn a_failing_transactional_down_batch_rolls_back() {
    let Fixture { db, svc, dir } = Fixture::new().await;
    write(dir.path(), THREE);
    write(
        dir.path(),
        &[("0002_label.down.sql", "ALTER TABLE items DROP COLUMN nope;")],
    );
    let m = migrator(&svc, dir.path());
    m.up().await.unwrap();
    let before = dump(&db, "shop");
    let err = m
        .down(&DownOptions {
            to: Some(v(0)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let f = failure(&err);
    assert_eq!(
        (f.version.number(), f.rolled_back, f.direction),
        (2, true, Direction::Down),
        "{err}"
    );
    assert_eq!(err.code(), Some(&svcdb::SqlState::UNDEFINED_COLUMN));
    assert_eq!(dump(&db, "shop"), before);
    assert_eq!(history(&svc).await, [1, 2, 3]);
}

#[tokio::test]
async fn baseline_adopts_an_existing_schema() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    svc.get()
        .await
        .unwrap()
        .batch_execute("CREATE TABLE items (id bigint PRIMARY KEY)")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), THREE);
    let m = migrator(&svc, dir.path());
    let baseline = m.baseline(&v(1)).await.unwrap();
    assert_eq!(
        baseline
            .recorded
            .iter()
            .map(|e| e.version.number())
            .collect::<Vec<_>>(),
        [1]
    );
    assert!(
        m.baseline(&v(1)).await.unwrap().recorded.is_empty(),
        "baseline is idempotent"
    );
    assert_eq!(
        m.up()
            .await
            .unwrap()
            .migrations
            .iter()
            .map(|e| e.version.number())
            .collect::<Vec<_>>(),
        [2, 3]
    );
    // A baselined migration never ran here: status says so rather than showing a duration.
    let status = m.status().await.unwrap();
    let shown: Vec<(i64, bool, bool)> = status
        .entries
        .iter()
        .map(|e| (e.version.number(), e.baselined, e.execution_ms.is_some()))
        .collect();
    assert_eq!(
        shown,
        [(1, true, false), (2, false, true), (3, false, true)]
    );
}

#[tokio::test]
async fn out_of_order_is_refused_then_allowed() {
    let Fixture { db: _db, svc, dir } = Fixture::new().await;
    write(
        dir.path(),
        &[
            ("0001_a.up.sql", "CREATE TABLE a (id int);"),
            ("0003_c.up.sql", "CREATE TABLE c (id int);"),
        ],
    );
    migrator(&svc, dir.path()).up().await.unwrap();
    write(dir.path(), &[("0002_b.up.sql", "CREATE TABLE b (id int);")]);
    let m = migrator(&svc, dir.path());
    match m.up().await {
        Err(MigrateError::OutOfOrder {
            version,
            newest_applied,
            path,
        }) if (version.number(), newest_applied.number()) == (2, 3) => {
            assert!(path.ends_with("0002_b.up.sql"))
        }
        other => panic!("expected OutOfOrder, got {other:?}"),
    }
    assert!(matches!(
        m.validate().await,
        Err(MigrateError::OutOfOrder { .. })
    ));
    let allowed = m.with_options(MigrateOptions {
        allow_out_of_order: true,
        ..options()
    });
    assert_eq!(
        allowed.up().await.unwrap().migrations[0].version.number(),
        2
    );
    assert_eq!(history(&svc).await, [1, 2, 3]);
}

/// A file missing below the newest one is a gap: refused unless ignored. One missing above
/// every file is a newer release's (an older release meets it in a rolling deploy or a
/// rollback; found by an operations trial: the old release's `up` failed to start while the
/// gate said ready): reported, not refused, as Flyway's `ignoreFutureMigrations` does.
#[tokio::test]
async fn missing_files_are_reported_then_ignored() {
    let Fixture { db: _db, svc, dir } = Fixture::new().await;
    write(dir.path(), THREE);
    migrator(&svc, dir.path()).up().await.unwrap();
    std::fs::remove_file(dir.path().join("0002_label.up.sql")).unwrap();
    std::fs::remove_file(dir.path().join("0002_label.down.sql")).unwrap();
    let m = migrator(&svc, dir.path());
    let status = m.status().await.unwrap();
    let missing: Vec<_> = status
        .missing()
        .map(|e| (e.version.number(), e.name.as_str(), status.newer(e)))
        .collect();
    assert_eq!(missing, [(2, "label", false)]);
    assert!(
        status.is_up_to_date(),
        "an older binary may run against a newer schema"
    );
    assert!(matches!(
        m.up().await,
        Err(MigrateError::Missing { version, missing: 1, none_found: false, .. }) if version.number() == 2
    ));
    let err = m.validate().await.unwrap_err();
    assert!(
        matches!(&err, MigrateError::Missing { version, .. } if version.number() == 2),
        "{err}"
    );
    assert!(err.to_string().contains("--ignore-missing"), "{err}");
    // A folder with none of the applied files, most likely the wrong `--dir` (found by a
    // trial: it was told to pass --ignore-missing, which would run the wrong folder's files).
    let elsewhere = tempfile::tempdir().unwrap();
    let err = migrator(&svc, elsewhere.path()).up().await.unwrap_err();
    assert!(
        matches!(
            &err,
            MigrateError::Missing {
                missing: 3,
                none_found: true,
                ..
            }
        ),
        "{err}"
    );
    assert!(!err.to_string().contains("--ignore-missing"), "{err}");
    let ignoring = m.with_options(MigrateOptions {
        ignore_missing: true,
        ..options()
    });
    ignoring.validate().await.unwrap();
    assert!(ignoring.up().await.unwrap().migrations.is_empty());

    // 0002 back and the newest missing instead: 0003 is a newer release's.
    std::fs::remove_file(dir.path().join("0003_seed.up.sql")).unwrap();
    std::fs::remove_file(dir.path().join("0003_seed.down.sql")).unwrap();
    write(dir.path(), &[THREE[2], THREE[3]]);
    let m = migrator(&svc, dir.path());
    let status = m.status().await.unwrap();
    let missing: Vec<_> = status
        .missing()
        .map(|e| (e.version.number(), status.newer(e)))
        .collect();
    assert_eq!(missing, [(3, true)]);
    m.validate().await.unwrap();
    assert!(m.up().await.unwrap().migrations.is_empty());
    // Reverting it needs its file: an error of its own, whose hint is not `--ignore-missing`
    // (a robustness trial found that hint leading to the same error).
    let ignoring = migrator(&svc, dir.path()).with_options(MigrateOptions {
        ignore_missing: true,
        ..options()
    });
    for runner in [&m, &ignoring] {
        assert!(matches!(
            runner.down(&DownOptions::default()).await,
            Err(MigrateError::MissingToRevert { version, .. }) if version.number() == 3
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_runner_releases_the_lock() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let slow = tempfile::tempdir().unwrap();
    // Stays inside its statement, holding the schema's lock, for as long as the test holds
    // the key: only the server noticing the vanished runner ends it.
    write(
        slow.path(),
        &[(
            "1_a.up.sql",
            &format!("SELECT pg_advisory_lock_shared({HELD_BY_TEST}); CREATE TABLE a (id int);"),
        )],
    );
    let fast = tempfile::tempdir().unwrap();
    write(fast.path(), &[("1_a.up.sql", "CREATE TABLE a (id int);")]);
    let test_session = db.admin().await;
    test_session
        .batch_execute(&format!("SELECT pg_advisory_lock({HELD_BY_TEST})"))
        .await
        .unwrap();

    // No lock_timeout: the statement waits for the test, not for a clock.
    let slow_runner = migrator(&svc, slow.path()).with_options(MigrateOptions {
        lock_timeout: Duration::ZERO,
        ..options()
    });
    let (task, mut events) = spawn_up(slow_runner);
    wait_for_event(
        &mut events,
        |e| matches!(e, MigrateEvent::Started { version, .. } if *version == v(1)),
    )
    .await;
    assert!(
        migration_lock_held(&db, "shop").await,
        "the runner holds the lock"
    );
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());

    eventually("the cancelled runner's lock is released", || {
        let db = &db;
        async move { !migration_lock_held(db, "shop").await }
    })
    .await;
    let m = migrator(&svc, fast.path());
    assert_eq!(m.up().await.unwrap().migrations.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_observer_releases_the_lock_and_changes_nothing() {
    let Fixture { db: _db, svc, dir } = Fixture::new().await;
    write(dir.path(), THREE);
    let m = migrator(&svc, dir.path());
    let task = tokio::spawn(async move {
        m.up_with(&UpOptions::default(), &mut |e| {
            if matches!(e, MigrateEvent::Finished { version, .. } if version.number() == 2) {
                panic!("observer bug");
            }
        })
        .await
    });
    assert!(task.await.unwrap_err().is_panic());
    let m = migrator(&svc, dir.path()).with_options(MigrateOptions {
        lock_wait: Duration::from_secs(2),
        ..options()
    });
    assert!(
        !m.status().await.unwrap().history_exists,
        "the deploy's transaction rolled back"
    );
    assert_eq!(m.up().await.unwrap().migrations.len(), 3);
}

#[tokio::test]
async fn lock_timeout_and_statement_timeout_stop_a_stuck_migration() {
    let Fixture { db, svc, dir } = Fixture::new().await;
    write(dir.path(), &THREE[..2]);
    migrator(&svc, dir.path()).up().await.unwrap();

    // Live traffic holds a lock on the table the next migration alters.
    let mut traffic = db.admin().await;
    let tx = traffic.transaction().await.unwrap();
    tx.batch_execute("SELECT * FROM shop.items FOR UPDATE")
        .await
        .unwrap();
    write(
        dir.path(),
        &[(
            "0002_label.up.sql",
            "ALTER TABLE items ADD COLUMN label text;",
        )],
    );
    let short = MigrateOptions {
        lock_timeout: Duration::from_millis(200),
        statement_timeout: Some(Duration::from_millis(500)),
        // The retries on lock timeout have tests of their own (migrate_deploy.rs).
        lock_retries: 0,
        ..options()
    };
    let start = Instant::now();
    let err = migrator(&svc, dir.path())
        .with_options(short.clone())
        .up()
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&svcdb::SqlState::LOCK_NOT_AVAILABLE),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_secs(2));
    drop(tx);

    write(dir.path(), &[("0003_slow.up.sql", "SELECT pg_sleep(5);")]);
    let err = migrator(&svc, dir.path())
        .with_options(short)
        .up()
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&svcdb::SqlState::QUERY_CANCELED), "{err}");
    let MigrateError::Failed(f) = &err else {
        panic!("{err:?}")
    };
    assert!(
        !f.interrupted,
        "the statement timeout, not an interrupt: {err}"
    );
    assert_eq!(history(&svc).await, [1], "both deploys rolled back");
}

#[tokio::test]
async fn validate_accepts_pending_migrations_on_a_fresh_schema() {
    let Fixture { db: _db, svc, dir } = Fixture::new().await;
    write(dir.path(), THREE);
    let status = migrator(&svc, dir.path()).validate().await.unwrap();
    assert!(!status.history_exists);
    assert_eq!(status.current_version, None);
    assert_eq!(status.pending().count(), 3);
}

/// Regression: `up` on a schema nobody created surfaced the server's bare "schema does not
/// exist"; it is now its own error, saying how to create the schema, and nothing is left behind.
#[tokio::test]
async fn up_on_a_schema_that_does_not_exist_says_how_to_create_it() {
    let db = TestDb::new().await;
    let mut config = db.config("never_made");
    config.create_schema = false;
    // `new`: `connect` itself refuses a schema that does not exist.
    let svc = ServiceDb::new(config).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), THREE);
    let m = migrator(&svc, dir.path());

    for err in [
        m.validate().await.unwrap_err(),
        m.up().await.unwrap_err(),
        m.baseline(&v(2)).await.unwrap_err(),
    ] {
        assert!(
            matches!(&err, MigrateError::SchemaMissing { schema, .. } if schema == "never_made"),
            "{err}"
        );
        assert_eq!(err.code(), Some(&svcdb::SqlState::INVALID_SCHEMA_NAME));
    }
    let conn = db.admin().await;
    let schemas: i64 = conn
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'never_made'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(schemas, 0);
}

/// Found by a user trial: the scripts of a group are pipelined, their answers arrive together,
/// and a migration that took a millisecond on the server was recorded as taking 3 µs. The
/// durations now come from the server's clock. Here the client reads no answer after the
/// first migration's until the server has run the whole group (the observer holds it up when
/// the first finishes), so the client's own clock would give the later ones about nothing.
#[tokio::test]
async fn durations_in_a_pipelined_group_are_the_servers() {
    let f = Fixture::new().await;
    write(
        f.dir.path(),
        &[
            ("1_a.up.sql", "CREATE TABLE a (id int);"),
            (
                "2_slow.up.sql",
                "SELECT pg_sleep(0.3);\nCREATE TABLE b (id int);",
            ),
            ("3_c.up.sql", "CREATE TABLE c (id int);"),
        ],
    );
    let mut held = false;
    let report = migrator(&f.svc, f.dir.path())
        .up_with(&UpOptions::default(), &mut |e| {
            if matches!(e, MigrateEvent::Finished { .. }) && !held {
                held = true;
                std::thread::sleep(Duration::from_millis(600));
            }
        })
        .await
        .unwrap();
    let took: Vec<f64> = report
        .migrations
        .iter()
        .map(|m| m.duration_ms.unwrap())
        .collect();
    assert!(took[1] >= 290.0, "the sleep is the second's: {took:?}");
    assert!(took[0] < 290.0 && took[2] < 290.0, "{took:?}");
    let conn = f.svc.get().await.unwrap();
    let us: i64 = conn
        .query_one(
            "SELECT execution_us FROM shop.svcdb_migrations WHERE version = 2",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(us >= 290_000, "recorded: {us} µs");
}

/// Found on permify's goose folder: written for `public`, it creates a table unqualified and
/// alters it as `public.…`, which under a service schema fails as 42P01 with nothing saying
/// why. The failure names the schema the statement qualifies with; the control, the same
/// failure unqualified, names none.
#[tokio::test]
async fn a_statement_qualified_with_public_is_named_when_it_fails() {
    let f = Fixture::new().await;
    write(
        f.dir.path(),
        &[
            ("1_tuples.up.sql", "CREATE TABLE tuples (id int);"),
            (
                "2_more.up.sql",
                "ALTER TABLE public.tuples ADD COLUMN note text;",
            ),
        ],
    );
    let err = migrator(&f.svc, f.dir.path()).up().await.unwrap_err();
    assert_eq!(err.code(), Some(&svcdb::SqlState::UNDEFINED_TABLE), "{err}");
    assert_eq!(
        failure(&err).other_schema.as_deref(),
        Some("public"),
        "{err}"
    );
    // Names the parser's table list misses, found by the server's message (a user trial).
    for script in [
        "CREATE TABLE g (id int REFERENCES public.tuples (id));",
        "COMMENT ON TABLE public.tuples IS 'x';",
        "CREATE TABLE h (x public.mytype);",
        "CREATE TABLE h (LIKE public.tuples);",
    ] {
        let f = Fixture::new().await;
        write(
            f.dir.path(),
            &[
                (
                    "1_tuples.up.sql",
                    "CREATE TABLE tuples (id int PRIMARY KEY);",
                ),
                ("2_more.up.sql", script),
            ],
        );
        let err = migrator(&f.svc, f.dir.path()).up().await.unwrap_err();
        assert_eq!(
            failure(&err).other_schema.as_deref(),
            Some("public"),
            "{script}: {err}"
        );
    }

    let control = Fixture::new().await;
    write(
        control.dir.path(),
        &[("1_more.up.sql", "ALTER TABLE tuples ADD COLUMN note text;")],
    );
    let err = migrator(&control.svc, control.dir.path())
        .up()
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&svcdb::SqlState::UNDEFINED_TABLE), "{err}");
    assert_eq!(failure(&err).other_schema, None, "{err}");
}

/// Regression: a golang-migrate folder (each file wrapped in `BEGIN; … COMMIT;`) failing at
/// step 2 left step 1's table behind, unrecorded, while the error said everything was rolled
/// back: the file's COMMIT had ended the deploy's transaction. The wrapper now runs inside it.
#[tokio::test]
async fn golang_migrate_wrapped_files_fail_atomically() {
    let db = TestDb::new().await;
    let svc = db.service("gm").await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[
            (
                "000001_a.up.sql",
                "BEGIN;\nCREATE TABLE a (id int);\nCOMMIT;\n",
            ),
            ("000001_a.down.sql", "BEGIN;\nDROP TABLE a;\nCOMMIT;\n"),
            (
                "000002_b.up.sql",
                "BEGIN;\nCREATE TABLE b (id int);\nSELECT 1/0;\nCOMMIT;\n",
            ),
        ],
    );
    let before = dump(&db, "gm");
    let err = migrator(&svc, dir.path()).up().await.unwrap_err();
    let failed = failure(&err);
    assert_eq!(failed.version.number(), 2);
    assert!(failed.rolled_back && failed.applied.is_empty());
    assert_eq!(dump(&db, "gm"), before, "the schema is as it was");

    write(
        dir.path(),
        &[(
            "000002_b.up.sql",
            "BEGIN;\nCREATE TABLE b (id int);\nCOMMIT;\n",
        )],
    );
    migrator(&svc, dir.path()).up().await.unwrap();
    assert_eq!(history(&svc).await, [1, 2]);
}

/// A statement that cannot run in a transaction (golang-migrate folders have them unmarked):
/// the deploy rolls back, the error carries SQLSTATE 25001 and names the directive that fixes it.
#[tokio::test]
async fn a_statement_refused_in_a_transaction_points_at_the_directive() {
    let db = TestDb::new().await;
    let svc = db.service("ci").await;
    let dir = tempfile::tempdir().unwrap();
    // The lint before `up` refuses the usual ones (CREATE INDEX CONCURRENTLY, VACUUM) whatever
    // the options; a subscription that creates its slot is refused by the server alone, before
    // it connects anywhere.
    write(
        dir.path(),
        &[
            ("1_a.up.sql", "CREATE TABLE a (id int);"),
            (
                "2_sub.up.sql",
                "CREATE SUBSCRIPTION s CONNECTION 'host=127.0.0.1 port=1' PUBLICATION p;",
            ),
        ],
    );
    let err = migrator(&svc, dir.path())
        .with_options(options())
        .up()
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&svcdb::SqlState::ACTIVE_SQL_TRANSACTION));
    assert!(failure(&err).rolled_back);
    assert!(
        err.to_string()
            .contains(svcdb::migrate::NO_TRANSACTION_DIRECTIVE),
        "{err}"
    );
    let status = migrator(&svc, dir.path()).status().await.unwrap();
    assert!(
        !status.history_exists,
        "nothing recorded, not even the history table"
    );
}

/// An advisory lock key a test holds to keep a migration's statement waiting: the migration
/// runs `SELECT pg_advisory_lock_shared(HELD_BY_TEST)` and stays in progress until the test
/// lets go, however slow the machine.
const HELD_BY_TEST: i64 = 4242;

/// The next event out of `events` that `wanted` accepts, within a generous deadline.
async fn wait_for_event(
    events: &mut tokio::sync::mpsc::UnboundedReceiver<MigrateEvent>,
    wanted: impl Fn(&MigrateEvent) -> bool,
) -> MigrateEvent {
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let event = events.recv().await.expect("the runner ended first");
            if wanted(&event) {
                return event;
            }
        }
    })
    .await
    .expect("the event came within a minute")
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

/// Found by a user trial: while another replica applied a transactional group, `health`
/// listed its migrations as pending with "run `svcdb migrate up`" and nothing about the
/// runner, where `migrate status` said the lock was held. The gate now notes the held lock;
/// once the runner is done, the notice is gone (the control).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transactional_group_in_progress_is_noted_by_the_gate() {
    let Fixture { db, svc, dir } = Fixture::new().await;
    write(
        dir.path(),
        &[
            ("0001_items.up.sql", "CREATE TABLE items (id bigint);"),
            (
                "0002_wait.up.sql",
                &format!("SELECT pg_advisory_lock_shared({HELD_BY_TEST});"),
            ),
        ],
    );
    let test_session = db.admin().await;
    test_session
        .batch_execute(&format!("SELECT pg_advisory_lock({HELD_BY_TEST})"))
        .await
        .unwrap();
    let runner = migrator(&svc, dir.path()).with_options(MigrateOptions {
        lock_timeout: Duration::ZERO,
        ..options()
    });
    let (runner, mut events) = spawn_up(runner);
    wait_for_event(
        &mut events,
        |e| matches!(e, MigrateEvent::Started { version, .. } if version.number() == 2),
    )
    .await;

    let replica = db.service("shop").await;
    let gate = svcdb::Gate::new().with_migrations(Migrations::from_dir(dir.path()).unwrap());
    let health = replica.health(&gate).await;
    assert!(!health.gate.ready, "{health}");
    assert!(
        matches!(
            health.gate.notices.as_slice(),
            [svcdb::Notice::MigrationLocked { .. }]
        ),
        "{health}"
    );
    // The pending migration's hint says to wait for that runner, not to run `up` (found by a
    // user trial), in the text and the JSON alike.
    let shown = health.gate.to_string();
    assert!(!shown.contains("hint: run `svcdb migrate up`"), "{shown}");
    let json = serde_json::to_value(&health.gate).unwrap();
    let hint = json["problems"][0]["hint"].as_str().unwrap();
    assert!(
        shown.contains(hint) && hint.contains("wait for it"),
        "{json}"
    );
    // A baseline's dry run says so too (found by a user trial); the real run would wait.
    let dry = migrator(&replica, dir.path())
        .baseline_dry_run(&v(2))
        .await
        .unwrap();
    assert!(dry.locked && dry.dry_run, "{dry:?}");

    test_session
        .batch_execute(&format!("SELECT pg_advisory_unlock({HELD_BY_TEST})"))
        .await
        .unwrap();
    runner.await.unwrap().unwrap();
    let health = replica.health(&gate).await;
    assert!(health.gate.ready, "{health}");
    assert!(health.gate.notices.is_empty(), "{health}");
    let dry = migrator(&replica, dir.path())
        .baseline_dry_run(&v(2))
        .await
        .unwrap();
    assert!(!dry.locked && dry.recorded.is_empty(), "{dry:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_migration_is_not_reported_dirty() {
    let Fixture { db, svc, dir } = Fixture::new().await;
    let hold = format!("SELECT pg_advisory_lock_shared({HELD_BY_TEST});");
    write(
        dir.path(),
        &[
            ("0001_items.up.sql", "CREATE TABLE items (id bigint);"),
            (
                "0002_slow_index.up.sql",
                &format!("-- svcdb:no-transaction\n{hold}\nCREATE INDEX CONCURRENTLY items_id ON items (id);\n"),
            ),
        ],
    );
    migrator(&svc, dir.path())
        .up_with(
            &UpOptions {
                to: Some(v(1)),
                dry_run: false,
            },
            &mut |_| {},
        )
        .await
        .unwrap();

    // The test holds the key the migration's first statement waits for.
    let test_session = db.admin().await;
    test_session
        .batch_execute(&format!("SELECT pg_advisory_lock({HELD_BY_TEST})"))
        .await
        .unwrap();
    // No lock_timeout: the statement waits for the test, not for a clock.
    let first = migrator(&svc, dir.path()).with_options(MigrateOptions {
        lock_timeout: Duration::ZERO,
        ..options()
    });
    let (first, mut first_events) = spawn_up(first);
    // `Started` of a non-transactional script comes after its history row is marked dirty,
    // and the runner holds the schema's lock until it returns.
    wait_for_event(
        &mut first_events,
        |e| matches!(e, MigrateEvent::Started { version, .. } if version.number() == 2),
    )
    .await;

    // Another replica of the same release: ready, with the migration in progress noted.
    let replica = db.service("shop").await;
    let gate = svcdb::Gate::new().with_migrations(Migrations::from_dir(dir.path()).unwrap());
    let health = replica.health(&gate).await;
    assert!(health.gate.ready, "{health}");
    assert!(
        matches!(
            health.gate.notices.as_slice(),
            [svcdb::Notice::MigrationInProgress { version, .. }] if version.number() == 2
        ),
        "{health}"
    );
    // A replica of the release before, which does not ship migration 2: ready too.
    let older = tempfile::tempdir().unwrap();
    std::fs::copy(
        dir.path().join("0001_items.up.sql"),
        older.path().join("0001_items.up.sql"),
    )
    .unwrap();
    let older_gate =
        svcdb::Gate::new().with_migrations(Migrations::from_dir(older.path()).unwrap());
    let health = replica.health(&older_gate).await;
    assert!(health.gate.ready, "{health}");

    let m = migrator(&replica, dir.path());
    let status = m.status().await.unwrap();
    assert_eq!(status.entries[1].state, MigrationState::InProgress);
    assert_eq!((&status.dirty, &status.in_progress), (&None, &Some(v(2))));
    // An operations trial found `locked` false here while the text said a runner held it.
    assert!(status.locked, "{status:?}");
    assert!(status.entries[1].running_ms.is_some(), "{status:?}");
    m.validate()
        .await
        .expect("a migration in progress is valid");

    // Its `up` waits for the lock instead of failing on a dirty row...
    let second = migrator(&replica, dir.path()).with_options(MigrateOptions {
        lock_wait: Duration::from_secs(120),
        ..options()
    });
    let (second, mut second_events) = spawn_up(second);
    wait_for_event(&mut second_events, |e| {
        matches!(e, MigrateEvent::WaitingForLock { .. })
    })
    .await;
    assert!(
        !second.is_finished(),
        "the second runner waits for the lock"
    );

    // ...and, once the first runner is done, finds nothing to do.
    test_session
        .batch_execute(&format!("SELECT pg_advisory_unlock({HELD_BY_TEST})"))
        .await
        .unwrap();
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.migrations.len(), 1);
    let second = second.await.unwrap().unwrap();
    assert!(second.migrations.is_empty(), "{second:?}");
    assert_eq!(second.current_version, Some(v(2)));
    let status = m.status().await.unwrap();
    assert!(status.is_up_to_date(), "{status:?}");
    assert!(replica.health(&gate).await.gate.notices.is_empty());
}

#[tokio::test]
async fn a_failed_concurrent_index_is_named_with_the_statement_to_drop_it() {
    let Fixture { db: _db, svc, dir } = Fixture::new().await;
    write(
        dir.path(),
        &[
            (
                "0001_items.up.sql",
                "CREATE TABLE items (sku text); INSERT INTO items VALUES ('a'), ('a');",
            ),
            (
                "0002_unique_sku.up.sql",
                "-- svcdb:no-transaction\nCREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS items_sku_key ON items (sku);\n",
            ),
        ],
    );
    let m = migrator(&svc, dir.path());
    let err = m.up().await.unwrap_err();
    eprintln!("{err}");
    assert_eq!(
        err.code(),
        Some(&svcdb::SqlState::UNIQUE_VIOLATION),
        "{err}"
    );
    let invalid = [svcdb::migrate::InvalidIndex {
        name: "items_sku_key".into(),
        table: "items".into(),
        drop_statement: "DROP INDEX CONCURRENTLY shop.items_sku_key".into(),
    }];
    let f = failure(&err);
    assert!(f.dirty, "{err}");
    assert_eq!(f.invalid_indexes, invalid);
    // Not "0 of its statements ran" beside the index it left (found by a trial).
    assert_eq!(f.statements_done, Some(0));
    assert!(!err.to_string().contains("0 of its statements"), "{err}");

    // While the invalid index is there, repair clears nothing (an adversarial trial: cleared,
    // the next `up` took it for built through IF NOT EXISTS, and every check passed).
    match m.repair().await {
        Err(MigrateError::InvalidIndexes { indexes, .. }) => assert_eq!(indexes, invalid),
        other => panic!("expected InvalidIndexes, got {other:?}"),
    }
    assert_eq!(m.status().await.unwrap().dirty.map(|v| v.number()), Some(2));

    // The named statement drops it; the data fixed, repair clears the mark and the migration
    // builds a valid index.
    let conn = svc.get().await.unwrap();
    conn.batch_execute(&invalid[0].drop_statement)
        .await
        .unwrap();
    conn.batch_execute("DELETE FROM items WHERE ctid <> (SELECT min(ctid) FROM items)")
        .await
        .unwrap();
    let repair = m.repair().await.unwrap();
    assert!(
        matches!(
            repair.actions.as_slice(),
            [RepairAction::ClearedDirty { version, .. }] if version.number() == 2
        ),
        "{repair:?}"
    );
    assert!(repair.invalid_indexes.is_empty());
    assert_eq!(m.up().await.unwrap().migrations.len(), 1);
    let valid: bool = conn
        .query_one(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 'shop.items_sku_key'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(valid);
}

/// The version numbered `n` (as the history's integer column and `0001`-style files number it).
fn v(n: i64) -> svcdb::migrate::Version {
    svcdb::migrate::Version::try_from(n).expect("a non-negative version")
}

#[tokio::test]
async fn a_failing_statements_file_line_and_text_are_in_the_failure() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;

    // Sent whole, in a transaction: the server's position counts from the script's start.
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[(
            "0001_broken.up.sql",
            "CREATE TABLE c (id int);\nSELECT * FROM no_such_table;",
        )],
    );
    let err = migrator(&svc, dir.path()).up().await.unwrap_err();
    let f = failure(&err);
    assert!(
        f.path.ends_with("0001_broken.up.sql"),
        "{f:?} names the up file"
    );
    assert_eq!(f.line, Some(2));
    assert_eq!(f.statement.as_deref(), Some("SELECT * FROM no_such_table"));

    // Sent one statement at a time: the position counts from the failing statement, and the
    // line from the top of the file.
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[(
            "0001_partial.up.sql",
            "-- svcdb:no-transaction\nCREATE TABLE a (id int);\nSELECT * FROM no_such_table;",
        )],
    );
    let err = migrator(&svc, dir.path()).up().await.unwrap_err();
    let f = failure(&err);
    assert!(f.path.ends_with("0001_partial.up.sql"), "{f:?}");
    assert_eq!(f.line, Some(3));
    assert_eq!(f.statement.as_deref(), Some("SELECT * FROM no_such_table"));
    assert_eq!(f.statements_done, Some(1));

    // A goose down section: the down's file and the line in it, past the markers.
    let Fixture { db: _db, svc, dir } = Fixture::new().await;
    write(
        dir.path(),
        &[(
            "20240101120000_a.sql",
            "-- +goose Up\nCREATE TABLE a (id int);\n\n-- +goose Down\nSELECT * FROM no_such_table;\n",
        )],
    );
    let m = migrator(&svc, dir.path());
    m.up().await.unwrap();
    let err = m.down(&DownOptions::default()).await.unwrap_err();
    let f = failure(&err);
    assert_eq!(f.direction, Direction::Down);
    assert!(f.path.ends_with("20240101120000_a.sql"), "{f:?}");
    assert_eq!(f.line, Some(5));
    assert_eq!(f.statement.as_deref(), Some("SELECT * FROM no_such_table"));
}

#[tokio::test]
async fn a_script_that_changes_its_session_does_not_change_the_next_migrations() {
    let db = TestDb::new().await;
    let svc = db.service("app").await;
    let dir = tempfile::tempdir().unwrap();
    // pg_dump's first line, then svix's `RESET statement_timeout`, then a `RESET ALL` and a
    // `synchronous_commit` of the script's own, each followed in the same deploy by a migration
    // that relies on the runner's session: in one transaction, in a group after a
    // non-transactional one, and outside any. Before the deploy's last segment commits go
    // without waiting for the disk; the last must wait (it flushes the deploy), and the
    // connection check must survive (it ends a vanished runner's session).
    write(
        dir.path(),
        &[
            (
                "1_dump.up.sql",
                "SELECT pg_catalog.set_config('search_path', '', false);\nCREATE TABLE app.a (id int);",
            ),
            ("2_b.up.sql", "CREATE TABLE b (id int); DO $$ BEGIN IF current_setting('synchronous_commit') <> 'off' THEN RAISE 'an early group waits for the disk'; END IF; END $$;"),
            (
                "3_index.up.sql",
                "-- svcdb:no-transaction\nSET search_path TO public;\nCREATE INDEX CONCURRENTLY b_id ON app.b (id);\nRESET statement_timeout;\nRESET ALL;\nSET synchronous_commit = off;",
            ),
            ("4_c.up.sql", "CREATE TABLE c (id int); DO $$ BEGIN \
                IF current_setting('statement_timeout') = '0' THEN RAISE 'statement_timeout was dropped'; END IF; \
                IF current_setting('synchronous_commit') <> 'on' THEN RAISE 'the last commit does not wait for the disk'; END IF; \
                IF current_setting('client_connection_check_interval') = '0' THEN RAISE 'the connection check was dropped'; END IF; END $$;"),
        ],
    );
    migrator(&svc, dir.path())
        .with_options(MigrateOptions {
            statement_timeout: Some(Duration::from_secs(60)),
            ..options()
        })
        .up()
        .await
        .unwrap();
    let conn = svc.get().await.unwrap();
    let tables: Vec<String> = conn
        .query(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = 'app' AND tablename IN ('a', 'b', 'c') ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(tables, ["a", "b", "c"]);
}

/// Found by a robustness trial: `down --to 2026110209000` (a digit short) reverted every
/// migration above that number. A version that neither the folder nor the history holds is
/// refused before anything runs, for `up --to`, `down --to` and `baseline`; `0` still means
/// "before the first" for the first two.
#[tokio::test]
async fn a_version_that_no_migration_has_is_refused() {
    let Fixture { db: _db, svc, dir } = Fixture::new().await;
    write(
        dir.path(),
        &[
            ("20261101090000_a.up.sql", "CREATE TABLE a (id int);"),
            ("20261101090000_a.down.sql", "DROP TABLE a;"),
            ("20261102090000_b.up.sql", "CREATE TABLE b (id int);"),
            ("20261102090000_b.down.sql", "DROP TABLE b;"),
            ("20261103090000_c.up.sql", "CREATE TABLE c (id int);"),
            ("20261103090000_c.down.sql", "DROP TABLE c;"),
        ],
    );
    let m = migrator(&svc, dir.path());
    let typo: svcdb::migrate::Version = "2026110209000".parse().unwrap();
    let unknown = |result: Result<(), MigrateError>| match result {
        Err(MigrateError::UnknownVersion {
            version,
            below,
            above,
            ..
        }) => {
            assert_eq!(version, typo.to_string());
            (below, above)
        }
        other => panic!("expected UnknownVersion, got {other:?}"),
    };
    let up_to = |to: &svcdb::migrate::Version| UpOptions {
        to: Some(to.clone()),
        dry_run: false,
    };
    assert_eq!(
        unknown(m.up_with(&up_to(&typo), &mut |_| {}).await.map(drop)),
        (None, Some("20261101090000".to_owned()))
    );
    assert!(!m.status().await.unwrap().history_exists, "nothing ran");
    m.up().await.unwrap();

    let down_to = |to: &svcdb::migrate::Version| DownOptions {
        to: Some(to.clone()),
        ..DownOptions::default()
    };
    unknown(m.down(&down_to(&typo)).await.map(drop));
    assert_eq!(history(&svc).await.len(), 3, "nothing was reverted");
    assert!(matches!(
        m.baseline(&typo).await,
        Err(MigrateError::UnknownVersion { .. })
    ));

    // The controls: a version that exists, and 0.
    let b: svcdb::migrate::Version = "20261102090000".parse().unwrap();
    assert_eq!(m.down(&down_to(&b)).await.unwrap().migrations.len(), 1);
    assert_eq!(m.down(&down_to(&v(0))).await.unwrap().migrations.len(), 2);
    assert_eq!(m.baseline(&b).await.unwrap().recorded.len(), 2);
}

/// Found by a robustness trial: while another runner applied transactional migrations (no
/// dirty row to see), `status` said plain "pending". It now says the lock is held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_sees_another_runner_holding_the_lock_in_a_transactional_deploy() {
    let Fixture { db, svc, dir } = Fixture::new().await;
    write(
        dir.path(),
        &[(
            "1_held.up.sql",
            &format!("SELECT pg_advisory_lock_shared({HELD_BY_TEST}); CREATE TABLE a (id int);"),
        )],
    );
    let m = migrator(&svc, dir.path());
    // The control: nobody migrating, nothing held.
    assert!(!m.status().await.unwrap().locked);
    let test_session = db.admin().await;
    test_session
        .batch_execute(&format!("SELECT pg_advisory_lock({HELD_BY_TEST})"))
        .await
        .unwrap();
    let (runner, mut events) = spawn_up(migrator(&svc, dir.path()).with_options(MigrateOptions {
        lock_timeout: Duration::ZERO,
        ..options()
    }));
    wait_for_event(&mut events, |e| matches!(e, MigrateEvent::Started { .. })).await;
    let status = m.status().await.unwrap();
    assert!(status.locked, "{status:?}");
    assert_eq!(status.pending().count(), 1);
    test_session
        .batch_execute(&format!("SELECT pg_advisory_unlock({HELD_BY_TEST})"))
        .await
        .unwrap();
    runner.await.unwrap().unwrap();
    let status = m.status().await.unwrap();
    assert!(!status.locked && status.is_up_to_date(), "{status:?}");
}

/// `MigrateOptions` timeouts the server cannot take as they are: half a millisecond was sent
/// as `0ms`, which is no limit at all, and 100 days made every run fail on the setting. The
/// first is one millisecond now, the second the most the server takes (about 24 days).
#[tokio::test]
async fn timeouts_the_server_cannot_take_become_the_nearest_it_can() {
    let Fixture { db: _db, svc, dir } = Fixture::new().await;
    write(
        dir.path(),
        &[(
            "1_check.up.sql",
            "DO $$ BEGIN \
                IF current_setting('lock_timeout') <> '1ms' THEN RAISE 'lock_timeout %', current_setting('lock_timeout'); END IF; \
                IF current_setting('statement_timeout') <> '2147483647ms' THEN RAISE 'statement_timeout %', current_setting('statement_timeout'); END IF; \
             END $$;",
        )],
    );
    migrator(&svc, dir.path())
        .with_options(MigrateOptions {
            lock_timeout: Duration::from_micros(500),
            statement_timeout: Some(Duration::from_secs(100 * 24 * 3600)),
            ..options()
        })
        .up()
        .await
        .unwrap();
}

/// A newer release's non-transactional migration failed part-way, and the release before it
/// is rolled back to: its `up` has nothing to run and must not fail (its replicas would not
/// start), but one that has something to run is refused, as on any dirty schema.
#[tokio::test]
async fn a_newer_releases_dirty_migration_refuses_only_a_run_with_work() {
    let Fixture { db: _db, svc, dir } = Fixture::new().await;
    // 0001 and 0003 applied; 0002 comes later, from the older release's branch.
    write(
        dir.path(),
        &[
            THREE[0],
            THREE[1],
            ("0003_seed.up.sql", "INSERT INTO items VALUES (1);"),
        ],
    );
    migrator(&svc, dir.path()).up().await.unwrap();
    svc.get()
        .await
        .unwrap()
        .batch_execute("UPDATE svcdb_migrations SET dirty = true WHERE version = 3")
        .await
        .unwrap();
    // The control: the release that ships it is refused.
    assert!(matches!(
        migrator(&svc, dir.path()).up().await,
        Err(MigrateError::Dirty { version, .. }) if version.number() == 3
    ));
    std::fs::remove_file(dir.path().join("0003_seed.up.sql")).unwrap();
    let older = migrator(&svc, dir.path());
    assert!(older.up().await.unwrap().migrations.is_empty());
    older.validate().await.unwrap();
    // The repeatable migrations are the newer release's to run (a user trial found an older
    // release putting its own view back under the newer release's migrations).
    write(
        dir.path(),
        &[(
            "R__view.sql",
            "CREATE OR REPLACE VIEW v AS SELECT 1 AS one;",
        )],
    );
    let with_repeatable = migrator(&svc, dir.path());
    let report = with_repeatable.up().await.unwrap();
    assert!(report.repeatables.is_empty(), "{report:?}");
    let status = with_repeatable.status().await.unwrap();
    assert_eq!(status.stale_repeatables().count(), 0);
    with_repeatable.validate().await.unwrap();
    std::fs::remove_file(dir.path().join("R__view.sql")).unwrap();
    write(dir.path(), &[THREE[2], THREE[3]]);
    let with_work = migrator(&svc, dir.path()).with_options(MigrateOptions {
        allow_out_of_order: true,
        ..options()
    });
    assert!(matches!(
        with_work.up().await,
        Err(MigrateError::NewerDirty { version, .. }) if version.number() == 3
    ));
    // Nor does the older release's repair touch it: its work stays half-applied, and only the
    // release that ships it can finish or undo it (an adversarial trial found repair deleting
    // the row, and the hint's `baseline` then failing).
    assert!(matches!(
        older.repair().await,
        Err(MigrateError::NewerDirty { version, .. }) if version.number() == 3
    ));
    assert_eq!(
        migrator(&svc, dir.path())
            .status()
            .await
            .unwrap()
            .dirty
            .map(|v| v.number()),
        Some(3)
    );
}

/// Found by a trial: Ctrl-C during a later migration of a deploy ran the down scripts of the
/// migrations the deploy had committed (nine of them, some outside a transaction, which a
/// second Ctrl-C could cut off half-way). An interrupt asks to stop: what was committed
/// stays, as when it comes between two statements. The control: a failure there undoes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupt_keeps_what_the_deploy_committed_where_a_failure_undoes_it() {
    use tokio_util::sync::CancellationToken;
    let Fixture { db: _db, svc, dir } = Fixture::new().await;
    let deploy = |last: &'static str| {
        write(
            dir.path(),
            &[
                ("0001_a.up.sql", "CREATE TABLE a (id int);"),
                ("0001_a.down.sql", "DROP TABLE a;"),
                (
                    "0002_a_id.up.sql",
                    "-- svcdb:no-transaction\nCREATE INDEX CONCURRENTLY a_id ON a (id);",
                ),
                (
                    "0002_a_id.down.sql",
                    "-- svcdb:no-transaction\nDROP INDEX CONCURRENTLY a_id;",
                ),
                ("0003_last.up.sql", last),
            ],
        );
    };
    let applied = || async {
        let status = migrator(&svc, dir.path()).status().await.unwrap();
        status
            .entries
            .iter()
            .filter(|e| e.state == MigrationState::Applied)
            .map(|e| e.version.number())
            .collect::<Vec<_>>()
    };

    deploy("CREATE TABLE b (id int);\nSELECT pg_sleep(30);");
    let token = CancellationToken::new();
    let m = migrator(&svc, dir.path()).with_interrupt(token.clone());
    let run = tokio::spawn(async move { m.up().await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    token.cancel();
    let err = run.await.unwrap().unwrap_err();
    let f = failure(&err);
    assert!(f.interrupted, "{err}");
    assert!(f.undone.is_empty() && f.undo_error.is_none(), "{err}");
    assert_eq!(crate::migrate_deploy::numbers(&f.applied), [1, 2], "{err}");
    assert_eq!(applied().await, [1, 2]);

    // The control: the same deploy failing at the same place undoes what it committed.
    migrator(&svc, dir.path())
        .down_with(
            &DownOptions {
                to: Some(v(0)),
                ..DownOptions::default()
            },
            &mut |_| {},
        )
        .await
        .unwrap();
    deploy("CREATE TABLE b (id int);\nSELECT 1 / 0;");
    let err = migrator(&svc, dir.path()).up().await.unwrap_err();
    assert_eq!(
        crate::migrate_deploy::numbers(&failure(&err).undone),
        [2, 1],
        "{err}"
    );
    assert_eq!(applied().await, Vec::<i64>::new());
}

/// Found by an operations trial: a pod's SIGTERM during a non-transactional migration's first
/// statement left it dirty although nothing of it ran (an SQL error there does not), and
/// every later deploy then needed `repair`. Interrupted, the runner has the server cancel the
/// statement and takes the failure path: nothing ran, so it stays pending. The controls: an
/// interrupt after its first statement leaves it dirty, and one in a transactional migration
/// rolls it back; waiting for the lock, the run ends with nothing done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_run_stops_at_its_statement_as_a_failure_does() {
    use tokio_util::sync::CancellationToken;
    let Fixture { db: _db, svc, dir } = Fixture::new().await;
    let interrupted_run = |script: &'static str| {
        let (svc, path) = (svc.clone(), dir.path().to_owned());
        async move {
            write(&path, &[("0001_slow.up.sql", script)]);
            let token = CancellationToken::new();
            let m = migrator(&svc, &path).with_interrupt(token.clone());
            let run = tokio::spawn(async move { m.up().await });
            tokio::time::sleep(Duration::from_millis(500)).await;
            token.cancel();
            let started = std::time::Instant::now();
            let outcome = run.await.unwrap();
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the statement ran on"
            );
            outcome
        }
    };
    let cancelled = |outcome: Result<svcdb::migrate::UpReport, MigrateError>| {
        let err = outcome.unwrap_err();
        assert_eq!(err.code(), Some(&svcdb::SqlState::QUERY_CANCELED), "{err}");
        // Found by a trial: the hint then listed every cause of a cancelled statement.
        assert!(failure(&err).interrupted, "{err}");
        assert!(!err.to_string().contains("statement timeout"), "{err}");
        failure(&err).dirty
    };

    let first = "-- svcdb:no-transaction\nSELECT pg_sleep(30);\nCREATE TABLE a (id int);";
    assert!(!cancelled(interrupted_run(first).await));
    let pending = || async {
        let status = migrator(&svc, dir.path()).status().await.unwrap();
        status.entries.iter().map(|e| e.state).collect::<Vec<_>>()
    };
    assert_eq!(
        pending().await,
        [MigrationState::Pending],
        "it stays pending"
    );

    let second = "-- svcdb:no-transaction\nCREATE TABLE a (id int);\nSELECT pg_sleep(30);";
    assert!(cancelled(interrupted_run(second).await), "left dirty");
    migrator(&svc, dir.path()).repair().await.unwrap();
    svc.get()
        .await
        .unwrap()
        .batch_execute("DROP TABLE a")
        .await
        .unwrap();

    let transactional = "CREATE TABLE a (id int);\nSELECT pg_sleep(30);";
    assert!(!cancelled(interrupted_run(transactional).await));
    assert_eq!(pending().await, [MigrationState::Pending]);
    assert!(
        svc.get()
            .await
            .unwrap()
            .query_opt("SELECT 1 FROM pg_tables WHERE tablename = 'a'", &[])
            .await
            .unwrap()
            .is_none(),
        "rolled back"
    );

    // Many short statements, pipelined: a cancel reaching the server between two of them is
    // dropped (a user trial found the run then committed, exit 0). The run stops before its
    // commit instead, and nothing stays.
    let many: String = std::iter::once("CREATE TABLE many (id int);".to_owned())
        .chain((0..20_000).map(|i| format!("INSERT INTO many VALUES ({i});")))
        .collect::<Vec<_>>()
        .join("\n");
    let many: &'static str = Box::leak(many.into_boxed_str());
    match interrupted_run(many).await {
        Err(MigrateError::Interrupted { dirty: None, .. }) => {}
        Err(e) if e.code() == Some(&svcdb::SqlState::QUERY_CANCELED) => {}
        other => panic!("expected the run stopped, got {other:?}"),
    }
    assert_eq!(pending().await, [MigrationState::Pending]);

    // Another runner holds the lock: the waiting one ends with nothing done.
    let holder = tokio::spawn({
        let (svc, path) = (svc.clone(), dir.path().to_owned());
        async move {
            write(&path, &[("0001_slow.up.sql", "SELECT pg_sleep(3);")]);
            migrator(&svc, &path).up().await
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let token = CancellationToken::new();
    let waiter = migrator(&svc, dir.path())
        .with_options(MigrateOptions {
            lock_wait: Duration::from_secs(60),
            ..options()
        })
        .with_interrupt(token.clone());
    let waiting = tokio::spawn(async move { waiter.up().await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    token.cancel();
    assert!(matches!(
        waiting.await.unwrap(),
        Err(MigrateError::Interrupted { done, .. }) if done.is_empty()
    ));
    holder.await.unwrap().unwrap();
}

/// Found on coder's golang-migrate folder: a transactional script failing past the parser (a
/// missing trigger, a duplicate key: errors without a position) was reported without its line
/// or statement, though the README promises both. Each statement is now its own message, so
/// the failing one is known: in the second migration of a group, and in a down script.
#[tokio::test]
async fn a_failure_without_a_position_names_its_statement_and_line() {
    let Fixture { db: _db, svc, dir } = Fixture::new().await;
    write(
        dir.path(),
        &[
            ("0001_t.up.sql", "CREATE TABLE t (id int PRIMARY KEY);"),
            (
                "0002_rows.up.sql",
                "INSERT INTO t VALUES (1);\n-- the same key again\n\nINSERT INTO t\n  VALUES (1);\nINSERT INTO t VALUES (2);",
            ),
        ],
    );
    let err = migrator(&svc, dir.path()).up().await.unwrap_err();
    let f = failure(&err);
    assert_eq!(f.cause.code(), Some(&svcdb::SqlState::UNIQUE_VIOLATION));
    assert!(f.path.ends_with("0002_rows.up.sql"), "{f:?}");
    assert_eq!(f.line, Some(4), "{f:?}");
    assert_eq!(f.statement.as_deref(), Some("INSERT INTO t\n  VALUES (1)"));

    write(
        dir.path(),
        &[
            ("0002_rows.up.sql", "INSERT INTO t VALUES (1);"),
            (
                "0002_rows.down.sql",
                "DELETE FROM t;\nDROP TRIGGER no_such_trigger ON t;",
            ),
        ],
    );
    let m = migrator(&svc, dir.path());
    m.up().await.unwrap();
    let err = m.down(&DownOptions::default()).await.unwrap_err();
    let f = failure(&err);
    assert!(f.path.ends_with("0002_rows.down.sql"), "{f:?}");
    assert_eq!(
        (f.line, f.statement.as_deref()),
        (Some(2), Some("DROP TRIGGER no_such_trigger ON t"))
    );
}

/// Found by an adversarial trial: undoing a failed deploy stopped in a non-transactional down
/// script part-way, and the report said the migration was "still in effect … recorded as
/// applied and will be skipped", while it was dirty and the next `up` refused. The failure now
/// names it as dirty, and lists it neither as applied nor as undone.
#[tokio::test]
async fn undo_stopped_in_a_non_transactional_down_names_the_migration_dirty() {
    let Fixture { db: _db, svc, dir } = Fixture::new().await;
    write(
        dir.path(),
        &[
            (
                "0001_t1.up.sql",
                "-- svcdb:no-transaction\nCREATE TABLE t1 (id int);",
            ),
            (
                "0001_t1.down.sql",
                "-- svcdb:no-transaction\nDROP TABLE t1;\nINSERT INTO nosuch VALUES (1);",
            ),
            ("0002_broken.up.sql", "SELECT * FROM no_such_table;"),
        ],
    );
    let m = migrator(&svc, dir.path());
    let err = m.up().await.unwrap_err();
    let f = failure(&err);
    assert_eq!(
        f.undo_left_dirty.as_ref().map(|v| v.number()),
        Some(1),
        "{err}"
    );
    assert!(f.applied.is_empty() && f.undone.is_empty(), "{err}");
    assert!(err.to_string().contains("dirty"), "{err}");
    assert_eq!(m.status().await.unwrap().dirty.map(|v| v.number()), Some(1));
}

/// Found by a user trial: a non-transactional script holding a SQL-standard function body
/// (`BEGIN ATOMIC … END`, bare `;` inside) was cut at those `;` and left dirty. Such scripts
/// are now split by PostgreSQL's own parser, as transactional ones are.
#[tokio::test]
async fn a_non_transactional_script_with_a_begin_atomic_body_runs_whole() {
    let Fixture { db: _db, svc, dir } = Fixture::new().await;
    write(
        dir.path(),
        &[
            ("0001_t.up.sql", "CREATE TABLE t (x int);"),
            (
                "0002_f.up.sql",
                "-- svcdb:no-transaction\nCREATE FUNCTION twice(x int) RETURNS int LANGUAGE sql\nBEGIN ATOMIC\n  SELECT x * 2;\nEND;\nCREATE INDEX CONCURRENTLY t_x ON t (x);",
            ),
        ],
    );
    migrator(&svc, dir.path())
        .with_options(MigrateOptions {
            allow_unsafe: true,
            ..options()
        })
        .up()
        .await
        .unwrap();
    let twice: i32 = svc
        .get()
        .await
        .unwrap()
        .query_one("SELECT twice(21)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(twice, 42);
}

/// Found by a user trial: `svcdb migrate repair` with another service's folder (a wrong
/// `--dir`) recorded that folder's checksums as the schema's, and every replica of the
/// service went unready. A changed file under another name than the history's is refused,
/// and nothing is recorded; the same name edited is realigned as before (the control).
#[tokio::test]
async fn repair_records_nothing_from_what_looks_like_another_schemas_folder() {
    let Fixture { db: _db, svc, dir } = Fixture::new().await;
    write(
        dir.path(),
        &[("0001_create_orders.up.sql", "CREATE TABLE orders (id int);")],
    );
    migrator(&svc, dir.path()).up().await.unwrap();
    let other = tempfile::tempdir().unwrap();
    write(
        other.path(),
        &[(
            "0001_create_products.up.sql",
            "CREATE TABLE products (id int);",
        )],
    );
    let err = migrator(&svc, other.path()).repair().await.unwrap_err();
    assert!(matches!(err, MigrateError::Source { .. }), "{err}");
    migrator(&svc, dir.path()).validate().await.unwrap();

    write(
        dir.path(),
        &[(
            "0001_create_orders.up.sql",
            "CREATE TABLE orders (id int); -- edited",
        )],
    );
    let repaired = migrator(&svc, dir.path()).repair().await.unwrap();
    assert_eq!(repaired.actions.len(), 1, "{repaired:?}");
}

/// Found by a trial on Conductor's Flyway folder: a migration naming a role the server lacks
/// was told "fix the migration"; the role is what is missing, from the one-time set-up. The
/// control: another undefined object (a type) keeps the usual advice.
#[tokio::test]
async fn a_missing_role_is_blamed_on_the_set_up_not_the_migration() {
    let Fixture { db: _db, svc, dir } = Fixture::new().await;
    write(
        dir.path(),
        &[(
            "0001_grant.up.sql",
            "CREATE TABLE a (id int);\nGRANT SELECT ON a TO svcdb_test_no_such_role;",
        )],
    );
    let err = migrator(&svc, dir.path()).up().await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(&svcdb::SqlState::UNDEFINED_OBJECT),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("CREATE ROLE \"svcdb_test_no_such_role\"")
            && !text.contains("fix the migration"),
        "{text}"
    );

    write(
        dir.path(),
        &[("0001_grant.up.sql", "DROP TYPE no_such_type;")],
    );
    let err = migrator(&svc, dir.path()).up().await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(&svcdb::SqlState::UNDEFINED_OBJECT),
        "{err}"
    );
    assert!(!err.to_string().contains("CREATE ROLE"), "{err}");
}
