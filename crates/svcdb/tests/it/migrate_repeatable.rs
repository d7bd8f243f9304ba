//! Flyway's repeatable migrations (`R__<name>.sql`): run after the versioned ones, again only
//! when their file changes, each in a transaction of its own; a failing one; and adopting them
//! from Flyway's history.

use svcdb::migrate::{
    lint_with_repeatables, AdoptOptions, MigrateError, MigrateEvent, Migrations, RepeatableState,
    Rule, Tool, UpOptions,
};
use svcdb::testing::TestDb;
use svcdb::{ServiceDb, SqlState};

use crate::migrate_adopt::FLYWAY_DDL;
use crate::migrate_runner::{migrator, write};

/// The SQL of the view `v`, as the server prints it.
async fn view(svc: &ServiceDb) -> Option<String> {
    svc.get()
        .await
        .unwrap()
        .query_one("SELECT pg_get_viewdef(to_regclass('shop.v'))", &[])
        .await
        .unwrap()
        .get(0)
}

/// The names `up` reported running, in order.
fn ran(report: &svcdb::migrate::UpReport) -> Vec<&str> {
    report.repeatables.iter().map(|r| r.name.as_str()).collect()
}

#[tokio::test]
async fn repeatables_run_after_the_versioned_migrations_and_again_only_when_changed() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[
            ("V1__t.sql", "CREATE TABLE t (a int, b int);"),
            ("R__v.sql", "CREATE OR REPLACE VIEW v AS SELECT a FROM t;"),
            // Name order, as Flyway runs them: `a_grant` first, though it needs the table only.
            ("R__a_grant.sql", "COMMENT ON TABLE t IS 'granted';"),
        ],
    );
    let m = migrator(&svc, dir.path());
    let dry = m
        .up_with(
            &UpOptions {
                dry_run: true,
                ..UpOptions::default()
            },
            &mut |_| {},
        )
        .await
        .unwrap();
    assert_eq!(ran(&dry), ["a_grant", "v"]);
    assert_eq!(view(&svc).await, None, "a dry run runs nothing");

    let mut events = Vec::new();
    let report = m
        .up_with(&UpOptions::default(), &mut |e| events.push(e.to_string()))
        .await
        .unwrap();
    assert_eq!(report.migrations.len(), 1);
    assert_eq!(ran(&report), ["a_grant", "v"]);
    // After the versioned migration, which the view needs.
    let first_repeatable = events
        .iter()
        .position(|e| e.starts_with("repeatable"))
        .unwrap();
    assert!(
        events[..first_repeatable]
            .iter()
            .any(|e| e.starts_with("up 1")),
        "{events:?}"
    );
    assert!(view(&svc).await.unwrap().contains("t.a"));
    let status = m.status().await.unwrap();
    assert!(status.is_up_to_date(), "{status:?}");

    // Unchanged: nothing runs.
    assert_eq!(ran(&m.up().await.unwrap()), [] as [&str; 0]);

    // Changed: reported, then run again, alone.
    write(
        dir.path(),
        &[(
            "R__v.sql",
            "CREATE OR REPLACE VIEW v AS SELECT a, b FROM t;",
        )],
    );
    let m = migrator(&svc, dir.path());
    let status = m.status().await.unwrap();
    assert!(!status.is_up_to_date());
    let states: Vec<(&str, RepeatableState)> = status
        .repeatables
        .iter()
        .map(|r| (r.name.as_str(), r.state))
        .collect();
    assert_eq!(
        states,
        [
            ("a_grant", RepeatableState::Applied),
            ("v", RepeatableState::Changed)
        ]
    );
    assert_eq!(ran(&m.up().await.unwrap()), ["v"]);
    assert!(view(&svc).await.unwrap().contains("t.b"));
    assert!(m.status().await.unwrap().is_up_to_date());
}

#[tokio::test]
async fn a_failing_repeatable_is_rolled_back_and_stays_due_while_the_versioned_ones_stay_applied() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[
            ("V1__t.sql", "CREATE TABLE t (a int);"),
            // The view is made, then the script fails: its transaction takes the view along.
            (
                "R__v.sql",
                "CREATE OR REPLACE VIEW v AS SELECT a FROM t;\nSELECT no_such_column FROM t;",
            ),
        ],
    );
    let m = migrator(&svc, dir.path());
    let err = m.up().await.unwrap_err();
    assert!(
        matches!(&err, MigrateError::RepeatableFailed { name, applied, .. } if name == "v" && applied.len() == 1),
        "{err}"
    );
    assert_eq!(err.code(), Some(&SqlState::UNDEFINED_COLUMN));
    // Located in its file, as a versioned migration's failure is (found by a user trial: only
    // the file was named).
    let MigrateError::RepeatableFailed {
        line, statement, ..
    } = &err
    else {
        unreachable!()
    };
    assert_eq!(*line, Some(2), "{err}");
    assert_eq!(
        statement.as_deref(),
        Some("SELECT no_such_column FROM t"),
        "{err}"
    );
    assert_eq!(view(&svc).await, None, "rolled back with its script");
    let status = m.status().await.unwrap();
    assert!(
        status.entries.iter().all(|e| e.applied_at.is_some()),
        "{status:?}"
    );
    assert_eq!(status.repeatables[0].state, RepeatableState::Pending);

    write(
        dir.path(),
        &[("R__v.sql", "CREATE OR REPLACE VIEW v AS SELECT a FROM t;")],
    );
    let m = migrator(&svc, dir.path());
    assert_eq!(ran(&m.up().await.unwrap()), ["v"]);
    assert!(m.status().await.unwrap().is_up_to_date());
}

#[tokio::test]
async fn a_repeatable_that_flyway_runs_outside_a_transaction_runs_statement_by_statement() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[
            ("V1__t.sql", "CREATE TABLE t (a int);"),
            (
                "R__index.sql",
                "DROP INDEX CONCURRENTLY IF EXISTS t_a;\nCREATE INDEX CONCURRENTLY t_a ON t (a);",
            ),
        ],
    );
    let m = migrator(&svc, dir.path());
    let mut events = Vec::new();
    let report = m
        .up_with(&UpOptions::default(), &mut |e| {
            if let MigrateEvent::RepeatableStarted { transactional, .. } = e {
                events.push(*transactional);
            }
        })
        .await
        .unwrap();
    assert_eq!(ran(&report), ["index"]);
    assert_eq!(events, [false]);
    assert!(m.status().await.unwrap().is_up_to_date());
}

#[tokio::test]
async fn adopting_from_flyway_records_a_repeatable_whose_file_is_unchanged_and_leaves_a_changed_one_due(
) {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[
            ("V1__a.sql", "CREATE TABLE a (id int);\n"),
            (
                "R__my_view.sql",
                "CREATE OR REPLACE VIEW v AS SELECT id FROM a;\n",
            ),
            ("R__grants.sql", "COMMENT ON TABLE a IS 'x';\n"),
        ],
    );
    // Flyway's checksums of the files (CRC32 of their lines, computed with Python's
    // zlib.crc32): `my view` ran as it is now; `grants` ran with another text (1 is not its
    // checksum). Flyway writes a repeatable with no version and `_` as a space.
    svc.get()
        .await
        .unwrap()
        .batch_execute(&format!(
            "{FLYWAY_DDL}
             INSERT INTO shop.flyway_schema_history VALUES
               (1, '1', 'a', 'SQL', 'V1__a.sql', -623083431, 'me', now(), 5, true),
               (2, NULL, 'my view', 'SQL', 'R__my_view.sql', -883864728, 'me', now(), 5, true),
               (3, NULL, 'grants', 'SQL', 'R__grants.sql', 1, 'me', now(), 5, true);
             CREATE TABLE shop.a (id int); CREATE VIEW shop.v AS SELECT id FROM shop.a;"
        ))
        .await
        .unwrap();
    let m = migrator(&svc, dir.path());
    let report = m.adopt(&AdoptOptions::from(Tool::Flyway)).await.unwrap();
    assert_eq!(report.repeatables, ["my_view"]);
    assert!(
        report.warnings.iter().any(|w| w.contains("grants")),
        "{report:?}"
    );
    let status = m.status().await.unwrap();
    let states: Vec<(&str, RepeatableState)> = status
        .repeatables
        .iter()
        .map(|r| (r.name.as_str(), r.state))
        .collect();
    assert_eq!(
        states,
        [
            ("grants", RepeatableState::Pending),
            ("my_view", RepeatableState::Applied)
        ]
    );
    assert_eq!(ran(&m.up().await.unwrap()), ["grants"]);
    assert!(m.status().await.unwrap().is_up_to_date());
}

#[test]
fn repeatables_are_linted_after_the_deploy_whose_new_tables_they_may_index() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[
            ("V1__t.sql", "CREATE TABLE t (a int);"),
            ("R__t_index.sql", "CREATE INDEX IF NOT EXISTS t_a ON t (a);"),
            (
                "R__users_index.sql",
                "CREATE INDEX IF NOT EXISTS users_a ON users (a);",
            ),
        ],
    );
    let m = Migrations::from_dir(dir.path()).unwrap();
    let report = lint_with_repeatables(m.iter(), m.repeatables());
    // `t` is new in this deploy; `users` existed before it.
    let found: Vec<(Rule, bool, &str)> = report
        .findings
        .iter()
        .map(|f| {
            (
                f.rule,
                f.version.is_none(),
                f.path.rsplit('/').next().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        found,
        [(Rule::IndexWithoutConcurrently, true, "R__users_index.sql")]
    );
    assert_eq!(report.migrations, 3);
}

#[tokio::test]
async fn up_refuses_an_unsafe_repeatable_before_running_anything() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), &[("V1__t.sql", "CREATE TABLE t (a int);")]);
    migrator(&svc, dir.path()).up().await.unwrap();
    write(
        dir.path(),
        &[
            ("V2__u.sql", "CREATE TABLE u (a int);"),
            ("R__t_index.sql", "CREATE INDEX IF NOT EXISTS t_a ON t (a);"),
        ],
    );
    let m = migrator(&svc, dir.path());
    let err = m.up().await.unwrap_err();
    assert!(
        matches!(&err, MigrateError::Unsafe { findings } if findings[0].version.is_none()),
        "{err}"
    );
    // Nothing ran: V2 is still pending.
    assert_eq!(m.status().await.unwrap().pending().count(), 1);
}
