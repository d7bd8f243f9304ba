//! The pool's Prometheus series against real failures: a database that does not exist and a
//! port where nothing listens. Each test's pool has a database name of its own, so its series
//! (labelled `db_namespace`) are its own in this binary's one recorder.

use std::time::Duration;

use svcdb::{Config, ServiceDb};

/// The value of the series `name` carrying all of `db`'s labels and `extra`, if rendered.
fn value(db: &ServiceDb, name: &str, extra: &[(&str, &str)]) -> Option<f64> {
    let text = svcdb::metrics::render();
    let wanted: Vec<String> = db
        .metric_labels()
        .iter()
        .map(|l| format!("{}=\"{}\"", l.key(), l.value()))
        .chain(extra.iter().map(|(k, v)| format!("{k}=\"{v}\"")))
        .collect();
    text.lines().find_map(|line| {
        let (series, number) = line.rsplit_once(' ')?;
        let (metric, labels) = series.split_once('{')?;
        let labels: Vec<&str> = labels.trim_end_matches('}').split(',').collect();
        (metric == name && wanted.iter().all(|w| labels.contains(&w.as_str())))
            .then(|| number.parse().ok())
            .flatten()
    })
}

/// A pool for `database` at 127.0.0.1:`port`, opening nothing until asked.
fn pool(port: u16, database: &str) -> ServiceDb {
    let mut config = Config::new(
        &format!("postgres://postgres@127.0.0.1:{port}/{database}"),
        "orders_svc",
    )
    .unwrap();
    config.pool_min = 0;
    config.acquire_timeout = Duration::from_millis(300);
    ServiceDb::new(config).unwrap()
}

/// A database name no other test uses.
fn unique_database() -> String {
    format!("svcdb_metrics_{}", uuid::Uuid::now_v7().simple())
}

/// Found by a user trial: while the database was out, the outbox and table gauges kept their
/// last values and no series said so; and `svcdb_migration_version` appeared only after the
/// first health check, not after the start-up gate. `svcdb_database_up` says 0 for a database
/// that cannot answer, 1 for one that does (the control), and `verify` records the version.
#[tokio::test]
async fn a_scrape_says_whether_the_database_answered_and_the_gate_records_the_version() {
    let missing = pool(5432, &unique_database());
    missing.observe_metrics().await;
    assert_eq!(value(&missing, "svcdb_database_up", &[]), Some(0.0));

    let db = svcdb::testing::TestDb::new().await;
    let svc = db.service("orders_svc").await;
    svc.observe_metrics().await;
    assert_eq!(value(&svc, "svcdb_database_up", &[]), Some(1.0));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("0007_a.up.sql"), "CREATE TABLE a (id int);").unwrap();
    let migrations = svcdb::migrate::Migrations::from_dir(dir.path()).unwrap();
    svcdb::migrate::Migrator::new(svc.clone(), migrations.clone())
        .up()
        .await
        .unwrap();
    let report = svc
        .verify(&svcdb::Gate::new().with_migrations(migrations))
        .await;
    assert!(report.ready, "{report:?}");
    assert_eq!(value(&svc, "svcdb_migration_version", &[]), Some(7.0));
    assert_eq!(value(&svc, "svcdb_gate_ready", &[]), Some(1.0));
}

/// Found by a user trial: no family had a `# HELP` line. Every family rendered has one, and
/// its `# TYPE` (the control: a family recorded here).
#[tokio::test]
async fn every_family_has_its_help_text() {
    let db = pool(5432, &unique_database());
    let _ = db.get().await;
    let text = svcdb::metrics::render();
    let families: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    assert!(
        families.contains(&"svcdb_pool_connect_errors_total"),
        "{text}"
    );
    for family in families {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("# HELP {family} "))),
            "{family} has no HELP line: {text}"
        );
    }
}

#[tokio::test]
async fn a_missing_database_counts_as_a_connect_error_of_that_cause() {
    let db = pool(5432, &unique_database());
    let cause = [("cause", "database_missing")];
    assert_eq!(value(&db, "svcdb_pool_connect_errors_total", &cause), None);
    let e = db.get().await.unwrap_err();
    assert!(matches!(e, svcdb::Error::Connect { .. }), "{e:?}");
    assert_eq!(
        value(&db, "svcdb_pool_connect_errors_total", &cause),
        Some(1.0)
    );
    assert_eq!(
        value(
            &db,
            "svcdb_pool_connect_errors_total",
            &[("cause", "unreachable")]
        ),
        None
    );
}

#[tokio::test]
async fn an_acquire_that_times_out_is_counted_with_its_unreachable_attempts() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port(); // nothing listens once the listener is dropped
    let db = pool(port, &unique_database());
    // Registered with the pool: the series is there, at 0, before the first timeout.
    assert_eq!(
        value(&db, "db_client_connection_timeouts_total", &[]),
        Some(0.0)
    );
    let e = db.get().await.unwrap_err();
    assert!(matches!(e, svcdb::Error::AcquireTimeout { .. }), "{e:?}");
    assert_eq!(
        value(&db, "db_client_connection_timeouts_total", &[]),
        Some(1.0)
    );
    let refused = value(
        &db,
        "svcdb_pool_connect_errors_total",
        &[("cause", "unreachable")],
    );
    assert!(refused.is_some_and(|n| n >= 1.0), "{refused:?}");
}

/// Set for the child process of [`a_process_that_disables_metrics_builds_no_recorder`].
const DISABLED_CHILD: &str = "SVCDB_TEST_METRICS_DISABLED_CHILD";

/// `disable` holds for the whole process, so it runs in a process of its own: this test
/// binary again, with only [`metrics_disabled_child`] selected.
#[test]
fn a_process_that_disables_metrics_builds_no_recorder() {
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "metrics::metrics_disabled_child",
            "--ignored",
            "--nocapture",
        ])
        .env(DISABLED_CHILD, "1")
        .output()
        .expect("the test binary runs the child");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("1 passed"),
        "the child ran no test: {stdout}"
    );
    // Control: this process did not disable them, and its pools record into svcdb's recorder.
    assert!(svcdb::metrics::install().is_some());
}

/// Not a test: the child process of [`a_process_that_disables_metrics_builds_no_recorder`].
#[tokio::test]
#[ignore = "the child process of a_process_that_disables_metrics_builds_no_recorder"]
async fn metrics_disabled_child() {
    if std::env::var_os(DISABLED_CHILD).is_none() {
        return;
    }
    assert!(svcdb::metrics::disable());
    assert!(
        !svcdb::metrics::disable(),
        "only the first call takes effect"
    );
    let test_db = svcdb::testing::TestDb::new().await;
    let db = test_db.service("orders").await;
    drop(db.get().await.unwrap());
    assert!(
        svcdb::metrics::install().is_none(),
        "the pool built no recorder"
    );
    assert_eq!(svcdb::metrics::render(), "");
}
