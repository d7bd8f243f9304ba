//! The connection manager against a real PostgreSQL: schema pinning, acquire timeouts with
//! their cause, recovery from terminated backends, pool sizing and status.

use std::time::{Duration, Instant};

use svcdb::testing::TestDb;
use svcdb::{Error, ServiceDb, SqlState};

async fn current_schema(conn: &tokio_postgres::Client) -> String {
    conn.query_one("SELECT current_schema()", &[])
        .await
        .unwrap()
        .get(0)
}

/// A TCP port on 127.0.0.1 where nothing listens.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
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
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(svc.status().waiting, 1);
    drop(held);
    waiter.await.unwrap().unwrap();
    let status = svc.status();
    assert!(status.acquire_wait.count >= 8, "{status:?}");
    assert!(
        status.acquire_wait.max_ms >= 50.0,
        "the waiter waited ~100 ms: {status:?}"
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
    assert!(svc.get().await.is_err());
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
    let started = Instant::now();
    for _ in 0..20 {
        let conn = svc.get().await.unwrap();
        assert_eq!(current_schema(&conn).await, "catalog");
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn idle_connections_above_min_are_retired_and_min_is_restored() {
    let db = TestDb::new().await;
    let mut cfg = db.config("catalog");
    cfg.pool_min = 2;
    cfg.pool_max = 5;
    cfg.idle_timeout = Some(Duration::from_millis(300));
    let svc = ServiceDb::connect(cfg).await.unwrap();
    let held: Vec<_> = futures_util::future::join_all((0..5).map(|_| svc.get())).await;
    drop(held);
    assert_eq!(svc.status().size, 5);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(svc.status().size, 2, "retired down to pool_min");
}

/// Regression: idle time was counted from the last checkout (deadpool's `last_used`), so a
/// connection held longer than the idle timeout was retired the moment it came back.
#[tokio::test]
async fn a_connection_held_longer_than_the_idle_timeout_is_not_retired_on_return() {
    let db = TestDb::new().await;
    let mut cfg = db.config("catalog");
    cfg.pool_min = 1;
    cfg.pool_max = 2;
    cfg.idle_timeout = Some(Duration::from_secs(1));
    let svc = ServiceDb::connect(cfg).await.unwrap();
    let held = (svc.get().await.unwrap(), svc.get().await.unwrap());
    tokio::time::sleep(Duration::from_millis(2000)).await; // longer than the idle timeout
    drop(held);
    tokio::time::sleep(Duration::from_millis(700)).await; // at least one maintenance scan
    assert_eq!(svc.status().size, 2, "just returned: not idle yet");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        svc.status().size,
        1,
        "idle past the timeout: retired to pool_min"
    );
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
    let pid = |c: svcdb::PooledConn| async move {
        c.query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get::<_, i32>(0)
    };
    let before = pid(svc.get().await.unwrap()).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = pid(svc.get().await.unwrap()).await;
    assert_ne!(before, after, "the old connection was retired");
    assert_eq!(svc.status().size, 2, "and the pool was topped up again");
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
