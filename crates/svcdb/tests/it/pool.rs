//! The connection manager against a real PostgreSQL: schema pinning, acquire timeouts with
//! their cause, recovery from terminated backends, pool sizing and status.

use crate::forwarder;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use forwarder::Forwarder;
use svcdb::testing::{closed_port, TestDb};
use svcdb::{Config, Error, ServiceDb, TlsMode};

/// How long a test waits for a state the pool reaches on its own before failing: generous, for
/// a loaded two-CPU machine.
const DEADLINE: Duration = Duration::from_secs(30);

/// Polls `condition` every 20 ms until it holds, failing the test after [`DEADLINE`].
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The backends of the pool for schema `catalog` on the test database.
async fn pool_backends(admin: &tokio_postgres::Client) -> HashSet<i32> {
    admin
        .query(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name = 'svcdb/catalog'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

async fn backend_pid(conn: &tokio_postgres::Client) -> i32 {
    conn.query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

async fn current_schema(conn: &tokio_postgres::Client) -> String {
    conn.query_one("SELECT current_schema()", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn search_path_survives_reset_all_discard_all_and_recycling() {
    let db = TestDb::new().await;
    let mut cfg = db.config("catalog");
    cfg.pool_min = 1;
    cfg.pool_max = 1; // one connection, so every get() recycles the same one
    let svc = ServiceDb::connect(cfg).await.unwrap();

    for reset in [
        "RESET ALL",
        "DISCARD ALL",
        "SET search_path = public",
        "RESET search_path",
    ] {
        let conn = svc.get().await.unwrap();
        conn.batch_execute(reset).await.unwrap();
        if reset.starts_with("SET ") {
            // A session-level SET lasts until the session resets it; the reset value is ours.
            conn.batch_execute("RESET ALL").await.unwrap();
        }
        drop(conn);
        let conn = svc.get().await.unwrap();
        assert_eq!(current_schema(&conn).await, "catalog", "after {reset}");
    }
    assert_eq!(svc.status().size, 1);
}

#[tokio::test]
async fn extra_schemas_follow_the_service_schema() {
    let db = TestDb::new().await;
    let mut cfg = db.config("catalog");
    cfg.extra_schemas = vec![svcdb::Ident::new("schema", "public").unwrap()];
    let svc = ServiceDb::connect(cfg).await.unwrap();
    let conn = svc.get().await.unwrap();
    let path: Vec<String> = conn
        .query_one("SELECT current_schemas(false)::text[]", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(path, ["catalog", "public"]);
}

#[tokio::test]
async fn connect_warms_pool_min_connections_and_reports_status() {
    let db = TestDb::new().await;
    let mut cfg = db.config("catalog");
    cfg.pool_min = 3;
    cfg.pool_max = 4;
    let svc = ServiceDb::connect(cfg).await.unwrap();
    let status = svc.status();
    assert_eq!((status.size, status.idle, status.in_use), (3, 3, 0));

    let held: Vec<_> = futures_util::future::join_all((0..4).map(|_| svc.get())).await;
    let held: Vec<_> = held.into_iter().map(Result::unwrap).collect();
    let status = svc.status();
    assert_eq!((status.size, status.in_use, status.max_size), (4, 4, 4));

    // A fifth caller waits; the status counts it.
    let waiter = {
        let svc = svc.clone();
        tokio::spawn(async move { svc.get().await.map(drop) })
    };
    eventually("the fifth caller waits", || svc.status().waiting == 1).await;
    // Held this long after the waiter started waiting: its wait is at least as long.
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(held);
    waiter.await.unwrap().unwrap();
    let status = svc.status();
    assert!(status.acquire_wait.count >= 8, "{status:?}");
    assert!(
        status.acquire_wait.max_ms >= 100.0,
        "the waiter waited 100 ms or more: {status:?}"
    );
    assert!(status.acquire_wait.p50_ms <= status.acquire_wait.p99_ms);
    let line = status.to_string();
    assert!(
        line.starts_with("size=4/4 idle=4 in_use=0 waiting=0 wait_p50="),
        "{line}"
    );
}

#[tokio::test]
async fn exhausted_pool_times_out_saying_every_connection_was_busy() {
    let db = TestDb::new().await;
    let mut cfg = db.config("catalog");
    cfg.pool_max = 1;
    cfg.acquire_timeout = Duration::from_millis(200);
    let svc = ServiceDb::connect(cfg).await.unwrap();
    let _held = svc.get().await.unwrap();
    let started = Instant::now();
    let err = svc.get().await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2));
    match &err {
        Error::AcquireTimeout {
            cause: None,
            size: 1,
            max_size: 1,
            ..
        } => {}
        other => panic!("expected a busy-pool timeout, got {other:?}"),
    }
    assert_eq!(svc.status().acquire_timeouts, 1);
}

#[tokio::test]
async fn acquire_timeout_carries_the_cause_for_a_closed_port() {
    let mut cfg = svcdb::Config::new(
        &format!("postgres://postgres@127.0.0.1:{}/postgres", closed_port()),
        "catalog",
    )
    .unwrap();
    cfg.acquire_timeout = Duration::from_millis(300);
    let started = Instant::now();
    let err = ServiceDb::connect(cfg).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "bounded by the acquire timeout"
    );
    match &err {
        Error::AcquireTimeout {
            cause: Some(cause), ..
        } => {
            assert!(
                cause.code().is_none(),
                "a refused connection has no SQLSTATE"
            );
        }
        other => panic!("expected an acquire timeout with a cause, got {other:?}"),
    }
    // The message names both the timeout and the refused connection.
    let shown = err.to_string();
    assert!(
        shown.contains("timed out") && shown.contains("refused"),
        "{shown}"
    );
}

#[tokio::test]
async fn lazy_pool_reports_the_last_connect_error_in_status() {
    let mut cfg = svcdb::Config::new(
        &format!("postgres://postgres@127.0.0.1:{}/postgres", closed_port()),
        "catalog",
    )
    .unwrap();
    cfg.acquire_timeout = Duration::from_millis(100);
    let svc = ServiceDb::new(cfg).unwrap();
    match svc.get().await.unwrap_err() {
        Error::AcquireTimeout {
            cause: Some(cause), ..
        } => {
            let refused = std::iter::successors(std::error::Error::source(&cause), |e| e.source())
                .filter_map(|e| e.downcast_ref::<std::io::Error>())
                .any(|e| e.kind() == std::io::ErrorKind::ConnectionRefused);
            assert!(refused, "{cause:?}");
        }
        other => panic!("expected an acquire timeout with its cause, got {other:?}"),
    }
    assert!(svc.status().last_connect_error.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovers_after_every_backend_is_terminated() {
    let db = TestDb::new().await;
    let mut cfg = db.config("catalog");
    cfg.pool_min = 4;
    cfg.pool_max = 4;
    let svc = ServiceDb::connect(cfg).await.unwrap();
    assert_eq!(svc.status().size, 4);

    // Terminate every connection of the pool and wait for the backends to be gone.
    let admin = db.admin().await;
    let killed: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity a, pg_terminate_backend(a.pid, 5000) t \
             WHERE a.datname = current_database() AND a.pid <> pg_backend_pid() \
             AND a.application_name = 'svcdb/catalog' AND t",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 4);

    // No broken connection is handed out: each of many queries succeeds.
    for _ in 0..20 {
        let conn = svc.get().await.unwrap();
        assert_eq!(current_schema(&conn).await, "catalog");
    }
}

#[tokio::test]
async fn idle_connections_above_min_are_retired_and_min_is_restored() {
    let db = TestDb::new().await;
    let admin = db.admin().await;
    let mut cfg = db.config("catalog");
    cfg.pool_min = 2;
    cfg.pool_max = 5;
    cfg.idle_timeout = Some(Duration::from_millis(300));
    let svc = ServiceDb::connect(cfg).await.unwrap();
    let held: Vec<_> = futures_util::future::join_all((0..5).map(|_| svc.get())).await;
    drop(held);
    assert_eq!(svc.status().size, 5);
    let opened = pool_backends(&admin).await;
    eventually("retired down to pool_min", || svc.status().size == 2).await;
    // Two of the five were kept (retiring them all and opening two would do too, needlessly).
    let kept = pool_backends(&admin).await;
    assert!(
        kept.len() == 2 && kept.is_subset(&opened),
        "{kept:?} of {opened:?}"
    );

    // Below the minimum (its backends terminated), the pool opens connections again.
    let killed: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity a, pg_terminate_backend(a.pid, 5000) t \
             WHERE a.datname = current_database() AND a.application_name = 'svcdb/catalog' AND t",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 2);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let now = pool_backends(&admin).await;
        if now.len() == 2 && now.is_disjoint(&kept) && svc.status().size == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pool_min not restored: {now:?}, {:?}",
            svc.status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Regression: idle time was counted from the last checkout (deadpool's `last_used`), so a
/// connection held longer than the idle timeout was retired the moment it came back.
#[tokio::test]
async fn a_connection_held_longer_than_the_idle_timeout_is_not_retired_on_return() {
    let db = TestDb::new().await;
    let mut cfg = db.config("catalog");
    cfg.pool_min = 1;
    cfg.pool_max = 2;
    cfg.idle_timeout = Some(Duration::from_secs(4));
    let svc = ServiceDb::connect(cfg).await.unwrap();
    let held = (svc.get().await.unwrap(), svc.get().await.unwrap());
    tokio::time::sleep(Duration::from_millis(4500)).await; // longer than the idle timeout
    drop(held);
    // Two maintenance scans at least (every 0.5 s), a quarter of the idle timeout.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(svc.status().size, 2, "just returned: not idle yet");
    eventually("idle past the timeout, retired to pool_min", || {
        svc.status().size == 1
    })
    .await;
}

#[tokio::test]
async fn connections_past_max_lifetime_are_replaced() {
    let db = TestDb::new().await;
    let mut cfg = db.config("catalog");
    cfg.pool_min = 2;
    cfg.pool_max = 2;
    cfg.max_lifetime = Some(Duration::from_millis(200));
    cfg.max_lifetime_jitter = Duration::from_millis(100);
    let svc = ServiceDb::connect(cfg).await.unwrap();
    let before = backend_pid(&svc.get().await.unwrap()).await;
    let deadline = Instant::now() + DEADLINE;
    while backend_pid(&svc.get().await.unwrap()).await == before {
        assert!(
            Instant::now() < deadline,
            "the old connection was never retired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eventually("the pool is topped up again", || svc.status().size == 2).await;
}

/// Connections opened together do not all close together: each one's lifetime gets its own
/// share of the jitter.
#[tokio::test]
async fn lifetime_jitter_spreads_the_retirement_of_connections_opened_together() {
    let db = TestDb::new().await;
    let admin = db.admin().await;
    let mut cfg = db.config("catalog");
    cfg.pool_min = 8;
    cfg.pool_max = 8;
    cfg.idle_timeout = None;
    cfg.max_lifetime = Some(Duration::from_secs(1));
    cfg.max_lifetime_jitter = Duration::from_secs(6);
    let started = Instant::now();
    let svc = ServiceDb::connect(cfg).await.unwrap();
    let opened = pool_backends(&admin).await;
    assert_eq!(opened.len(), 8);
    let mut retired: HashMap<i32, Duration> = HashMap::new();
    while retired.len() < opened.len() {
        assert!(started.elapsed() < DEADLINE, "retired so far: {retired:?}");
        let now = pool_backends(&admin).await;
        for pid in opened.difference(&now) {
            retired.entry(*pid).or_insert_with(|| started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first = *retired.values().min().unwrap();
    let last = *retired.values().max().unwrap();
    assert!(
        first >= Duration::from_secs(1),
        "before max_lifetime: {retired:?}"
    );
    // Eight shares of 6 s all within 1.5 s of each other: odds below 1 in 2,000. Without
    // jitter they all go in the same maintenance scan.
    assert!(
        last - first >= Duration::from_millis(1500),
        "retired together: {retired:?}"
    );
    drop(svc);
}

/// A connection that sat idle longer than `verify_after_idle` is pinged before it is handed
/// out: one whose socket stays open while its peer is gone (a network partition, here a
/// frozen forwarder) is replaced, not handed out to hang.
#[tokio::test]
async fn an_idle_connection_whose_peer_is_gone_is_not_handed_out() {
    let db = TestDb::new().await;
    let forwarder = Forwarder::to(&db).await;
    let pool = |verify_after_idle: Duration| {
        let mut cfg = forwarder.config(
            &db,
            db.connection().get_user().unwrap(),
            db.name(),
            "catalog",
        );
        cfg.create_schema = true;
        cfg.pool_min = 1;
        cfg.pool_max = 1;
        cfg.connect_timeout = Duration::from_secs(1);
        cfg.verify_after_idle = verify_after_idle;
        ServiceDb::connect(cfg)
    };
    let unchecked = pool(Duration::from_secs(3600)).await.unwrap();
    let checked = pool(Duration::from_millis(200)).await.unwrap();
    let opened = forwarder.accepted();
    forwarder.freeze();
    tokio::time::sleep(Duration::from_millis(400)).await; // idle past verify_after_idle

    // The control: unpinged, the frozen connection is handed out, and its query hangs.
    let conn = unchecked.get().await.unwrap();
    let hung = tokio::time::timeout(Duration::from_secs(2), conn.simple_query("SELECT 1")).await;
    assert!(hung.is_err(), "the frozen connection answered: {hung:?}");

    // Pinged, it is dropped and a new connection opened in its place.
    let conn = checked.get().await.unwrap();
    let answered =
        tokio::time::timeout(Duration::from_secs(10), conn.simple_query("SELECT 1")).await;
    assert!(matches!(answered, Ok(Ok(_))), "{answered:?}");
    assert!(forwarder.accepted() > opened, "a new connection was opened");
}

/// Every default the configuration table documents (the module's and the README's) is the
/// one a configuration gets when the variable is not set.
#[test]
fn every_documented_default_is_the_default() {
    let from = |extra: &[(&str, &str)]| {
        let mut vars: HashMap<&str, &str> = HashMap::from([
            ("DATABASE_URL", "postgres://svc@127.0.0.1/shop"),
            ("SVCDB_SCHEMA", "catalog"),
        ]);
        vars.extend(extra.iter().copied());
        Config::from_lookup(|key| vars.get(key).map(|v| v.to_string())).unwrap()
    };
    let defaults = from(&[]);
    assert_eq!(
        format!("{defaults:?}"),
        format!(
            "{:?}",
            Config::new("postgres://svc@127.0.0.1/shop", "catalog").unwrap()
        )
    );
    // `| `SVCDB_KEY` | … | `default` | meaning |`: the default is in the given column.
    let table = |text: &str, line_prefix: &str, column: usize| -> HashMap<String, String> {
        text.lines()
            .filter_map(|line| line.strip_prefix(line_prefix))
            .filter(|line| line.starts_with("| `SVCDB_"))
            .filter_map(|line| {
                let cells: Vec<&str> = line.split('|').map(str::trim).collect();
                let key = cells.get(1)?.trim_matches('`');
                let default = cells.get(column)?.trim_matches('`');
                // Rows naming two variables (the password's) have no single default to set.
                (!key.contains('`')).then(|| (key.to_owned(), default.to_owned()))
            })
            .collect()
    };
    let module = table(include_str!("../../src/config/mod.rs"), "/// ", 3);
    let readme = table(include_str!("../../../../README.md"), "", 2);
    let mut checked = 0;
    for (key, default) in &module {
        assert_eq!(
            readme.get(key),
            Some(default),
            "{key}: README and rustdoc disagree"
        );
        match (key.as_str(), default.as_str()) {
            ("SVCDB_SCHEMA", "(required)") => {}
            ("SVCDB_EXTRA_SCHEMAS", "none") => assert!(defaults.extra_schemas.is_empty()),
            ("SVCDB_APPLICATION_NAME", "svcdb/<schema>") => assert_eq!(
                defaults.session_config().get_application_name(),
                Some("svcdb/catalog")
            ),
            // Setting the variable to its documented default changes nothing.
            (key, default) => assert_eq!(
                format!("{:?}", from(&[(key, default)])),
                format!("{defaults:?}"),
                "{key}={default}"
            ),
        }
        checked += 1;
    }
    assert!(checked >= 12, "only {checked} rows found: {module:?}");
    assert_eq!(defaults.tls, TlsMode::Disable);
    assert_eq!(defaults.ssl_root_cert, None);
    assert_eq!(defaults.connection.get_password(), None);
}

#[tokio::test]
async fn create_schema_is_safe_when_many_services_start_at_once() {
    let db = TestDb::new().await;
    let cfg = db.config("orders");
    let started =
        futures_util::future::join_all((0..6).map(|_| ServiceDb::connect(cfg.clone()))).await;
    for svc in started {
        svc.unwrap();
    }
}
