//! Failover: writes refused by a server that accepts only reads are database-unavailable
//! errors, and the pool leaves such a server for the one that accepts writes.
//!
//! The tests marked `#[ignore]` need a primary and a streaming standby of their own
//! (`scripts/cluster pg up`, on ports 5441 and 5442, or `SVCDB_CLUSTER_PG_PRIMARY_PORT` and
//! `SVCDB_CLUSTER_PG_STANDBY_PORT`); `scripts/test-cluster` sets them up, runs these tests and
//! removes them. Those that promote the standby need fresh clusters each.

use std::process::Command;
use std::time::{Duration, Instant};

use svcdb::testing::TestDb;
use svcdb::DedicatedConn;
use svcdb::{Config, Error, ServiceDb, SqlState, TxOptions};

/// Inserts one row into `t`; the write a standby refuses.
async fn insert(db: &ServiceDb, options: &TxOptions) -> Result<(), Error> {
    db.transaction_with(options, async |tx| {
        tx.execute("INSERT INTO t DEFAULT VALUES", &[]).await?;
        Ok::<_, Error>(())
    })
    .await
}

#[tokio::test]
async fn a_transaction_with_options_does_not_write_through_a_read_only_database() {
    let test_db = TestDb::new().await;
    test_db
        .service("orders")
        .await
        .get()
        .await
        .unwrap()
        .batch_execute("CREATE TABLE t (id bigserial PRIMARY KEY)")
        .await
        .unwrap();
    // How a primary is fenced during a switchover (here for this database only): sessions
    // that start from now on refuse writes unless a transaction asks for READ WRITE.
    let admin = test_db.admin().await;
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{}\" SET default_transaction_read_only = on",
            test_db.name()
        ))
        .await
        .unwrap();
    let mut config = test_db.config("orders");
    config.create_schema = false; // it exists, and CREATE SCHEMA is a write
    let db = ServiceDb::connect(config).await.unwrap();

    let err = insert(&db, &TxOptions::default()).await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(&SqlState::READ_ONLY_SQL_TRANSACTION),
        "{err}"
    );
    assert!(err.is_database_unavailable(), "{err}");
    // Control: the fence is what refused it; an explicit READ WRITE goes through it.
    let conn = db.get().await.unwrap();
    conn.batch_execute("START TRANSACTION READ WRITE; INSERT INTO t DEFAULT VALUES; ROLLBACK")
        .await
        .unwrap();
    let written: i64 = admin
        .query_one("SELECT count(*) FROM orders.t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(written, 0);
}

#[tokio::test]
async fn a_host_that_drops_connection_attempts_does_not_hide_the_next_one() {
    let test_db = TestDb::new().await;
    drop(test_db.service("orders").await);
    // A listener whose accept queue is full: Linux then drops further SYNs, as packets to a
    // primary whose machine vanished are dropped.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let vanished = listener.local_addr().unwrap();
    let mut queued = Vec::new();
    loop {
        let attempt = tokio::net::TcpStream::connect(vanished);
        match tokio::time::timeout(Duration::from_millis(500), attempt).await {
            Ok(Ok(stream)) => queued.push(stream),
            Ok(Err(e)) => panic!("cannot fill the accept queue: {e}"),
            Err(_) => break, // no SYN-ACK: the queue is full
        }
        assert!(queued.len() < 64, "the accept queue never filled");
    }

    // The vanished host first, the test database's server second.
    let reachable = test_db.connection();
    let mut pg = tokio_postgres::Config::new();
    pg.host("127.0.0.1").port(vanished.port());
    for host in reachable.get_hosts() {
        match host {
            tokio_postgres::config::Host::Tcp(h) => pg.host(h),
            tokio_postgres::config::Host::Unix(p) => pg.host_path(p),
        };
    }
    pg.port(reachable.get_ports().first().copied().unwrap_or(5432));
    pg.user(reachable.get_user().unwrap())
        .dbname(test_db.name());
    if let Some(password) = reachable.get_password() {
        pg.password(password);
    }
    let mut config = Config::with_connection(pg, svcdb::Ident::new("schema", "orders").unwrap());
    config.connect_timeout = Duration::from_secs(1);
    config.acquire_timeout = Duration::from_secs(10);
    config.pool_min = 1;
    let started = Instant::now();
    let db = ServiceDb::connect(config)
        .await
        .unwrap_or_else(|e| panic!("the second host was never tried: {e}"));
    let port: i32 = db
        .get()
        .await
        .unwrap()
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(port, i32::from(vanished.port()));
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "the vanished host was tried first"
    );
    drop(listener);
}

/// The throwaway clusters' ports.
fn cluster_ports() -> (u16, u16) {
    let port = |key: &str, default: u16| {
        std::env::var(key)
            .ok()
            .map(|v| {
                v.parse()
                    .unwrap_or_else(|_| panic!("{key}={v:?} is not a port"))
            })
            .unwrap_or(default)
    };
    (
        port("SVCDB_CLUSTER_PG_PRIMARY_PORT", 5441),
        port("SVCDB_CLUSTER_PG_STANDBY_PORT", 5442),
    )
}

/// Runs `scripts/cluster pg <action>`, panicking with its output if it fails.
fn cluster(action: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/cluster");
    let out = Command::new(script)
        .args(["pg", action])
        .output()
        .expect("scripts/cluster runs");
    assert!(
        out.status.success(),
        "scripts/cluster pg {action} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn server(port: u16, dbname: &str) -> tokio_postgres::Config {
    svcdb::parse_url(&format!("postgres://postgres@127.0.0.1:{port}/{dbname}")).unwrap()
}

/// A fresh database on the primary with schema `orders` and table `t`, once the standby has it
/// too; its name.
async fn database_on_both() -> String {
    let (primary, standby) = cluster_ports();
    let name = format!("failover_{}", uuid::Uuid::now_v7().simple());
    let admin = DedicatedConn::connect(&server(primary, "postgres"))
        .await
        .unwrap_or_else(|e| {
            panic!("{e}\n  hint: run scripts/cluster pg up (or scripts/test-cluster)")
        });
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let db = DedicatedConn::connect(&server(primary, &name))
        .await
        .unwrap();
    db.batch_execute("CREATE SCHEMA orders; CREATE TABLE orders.t (id bigserial PRIMARY KEY)")
        .await
        .unwrap();
    let replica = DedicatedConn::connect(&server(standby, "postgres"))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let streamed = async {
            let standby_db = DedicatedConn::connect(&server(standby, &name)).await.ok()?;
            standby_db
                .query_opt(
                    "SELECT FROM pg_tables WHERE schemaname = 'orders' AND tablename = 't'",
                    &[],
                )
                .await
                .ok()?
        };
        if streamed.await.is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the standby did not receive {name} within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(replica);
    name
}

/// The port of the server a pooled connection reached.
async fn server_port(db: &ServiceDb) -> i32 {
    db.get()
        .await
        .unwrap()
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
#[ignore = "needs the failover clusters of scripts/cluster; run by scripts/test-cluster"]
async fn a_write_on_a_standby_is_a_database_unavailable_error() {
    let (_, standby) = cluster_ports();
    let name = database_on_both().await;
    // Straight to the standby, as a connection string listing it with `any` would.
    let config = Config::new(
        &format!("postgres://postgres@127.0.0.1:{standby}/{name}"),
        "orders",
    )
    .unwrap();
    let db = ServiceDb::connect(config).await.unwrap();
    // Not SERIALIZABLE: a hot standby refuses that at the first statement, with 0A000
    // whatever the statement; a pool asking for read-write never reaches a standby (a server
    // can become one only by restarting, which closes its connections).
    let repeatable_read = TxOptions {
        isolation: svcdb::IsolationLevel::RepeatableRead,
        ..TxOptions::default()
    };
    for options in [TxOptions::default(), repeatable_read] {
        let err = insert(&db, &options).await.unwrap_err();
        // Not 0A000 ("cannot set transaction read-write mode during recovery") at BEGIN.
        assert_eq!(
            err.code(),
            Some(&SqlState::READ_ONLY_SQL_TRANSACTION),
            "{err}"
        );
        assert!(err.is_database_unavailable(), "{err}");
    }
    let err = db
        .transaction(async |tx| {
            tx.execute("INSERT INTO t DEFAULT VALUES", &[]).await?;
            Ok::<_, Error>(())
        })
        .await
        .unwrap_err();
    assert!(err.is_database_unavailable(), "{err}");
}

#[tokio::test]
#[ignore = "needs the failover clusters of scripts/cluster, and promotes the standby; run by scripts/test-cluster"]
async fn a_busy_connection_to_a_fenced_primary_is_retired_and_the_new_primary_found() {
    let (primary, standby) = cluster_ports();
    let name = database_on_both().await;
    let mut config = Config::new(
        &format!("postgres://postgres@127.0.0.1:{primary},127.0.0.1:{standby}/{name}"),
        "orders",
    )
    .unwrap();
    // One connection, never idle long enough for the pool's own check: only what a failed
    // transaction teaches the pool can move it.
    config.pool_min = 1;
    config.pool_max = 1;
    config.verify_after_idle = Duration::from_secs(3600);
    config.acquire_timeout = Duration::from_secs(2);
    let db = ServiceDb::connect(config).await.unwrap();
    insert(&db, &TxOptions::default()).await.unwrap();
    assert_eq!(server_port(&db).await, i32::from(primary));

    // A switchover: fence the old primary (its open sessions too, at their next transaction),
    // then promote the standby.
    let admin = DedicatedConn::connect(&server(primary, "postgres"))
        .await
        .unwrap();
    // Two statements, not one batch: ALTER SYSTEM refuses the implicit transaction block.
    for statement in [
        "ALTER SYSTEM SET default_transaction_read_only = on",
        "SELECT pg_reload_conf()",
    ] {
        admin.batch_execute(statement).await.unwrap();
    }
    cluster("promote");

    let deadline = Instant::now() + Duration::from_secs(30);
    let mut refused = 0;
    loop {
        match insert(&db, &TxOptions::default()).await {
            Ok(()) => break,
            Err(e) => {
                assert!(e.is_database_unavailable(), "{e}");
                refused += 1;
            }
        }
        assert!(
            Instant::now() < deadline,
            "still no write after 30 s ({refused} refused): the pool keeps its connection to the fenced primary"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(server_port(&db).await, i32::from(standby));
    assert!(db.status().size <= 1);
}

#[tokio::test]
#[ignore = "needs the failover clusters of scripts/cluster, and promotes the standby; run by scripts/test-cluster"]
async fn an_idle_connection_to_a_fenced_primary_is_not_handed_out() {
    let (primary, standby) = cluster_ports();
    let name = database_on_both().await;
    let mut config = Config::new(
        &format!("postgres://postgres@127.0.0.1:{primary},127.0.0.1:{standby}/{name}"),
        "orders",
    )
    .unwrap();
    // One connection, checked at every checkout; nothing fails on it (reads only), so only the
    // pool's own check can tell it no longer reaches a primary.
    config.pool_min = 1;
    config.pool_max = 1;
    config.verify_after_idle = Duration::ZERO;
    let db = ServiceDb::connect(config).await.unwrap();
    assert_eq!(server_port(&db).await, i32::from(primary));

    let admin = DedicatedConn::connect(&server(primary, "postgres"))
        .await
        .unwrap();
    for statement in [
        "ALTER SYSTEM SET default_transaction_read_only = on",
        "SELECT pg_reload_conf()",
    ] {
        admin.batch_execute(statement).await.unwrap();
    }
    cluster("promote");

    // The reload reaches the old primary's sessions a moment later: wait for it, not a while.
    let deadline = Instant::now() + Duration::from_secs(30);
    while server_port(&db).await != i32::from(standby) {
        assert!(
            Instant::now() < deadline,
            "after 30 s the pool still hands out its connection to the fenced primary"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Control: the old primary still serves reads, so nothing but the check moved the pool.
    let old = DedicatedConn::connect(&server(primary, &name))
        .await
        .unwrap();
    let read_only: String = old
        .query_one("SHOW transaction_read_only", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(read_only, "on");
}
