//! `shop serve` stopped by SIGTERM while it handles a backlog: the graceful shutdown of
//! svcdb-amqp's service runtime hands back what it did not handle, a restart handles the rest,
//! and every event is handled exactly once, as the database shows.

use std::process::Stdio;
use std::time::Duration;

use svcdb::testing::TestDb;
use svcdb::Envelope;
use svcdb_amqp::topology::{QueueSpec, Topology};
use svcdb_amqp::AmqpConfig;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Events published at once: enough that the catalog is still busy when it gets SIGTERM.
const EVENTS: i64 = 600;

fn amqp_url() -> String {
    std::env::var("SVCDB_TEST_AMQP_URL").unwrap_or_else(|_| svcdb_amqp::DEFAULT_URL.to_owned())
}

/// What the catalog declares in namespace `ns`, deleted on drop (also when the test fails).
struct Declared(Topology);

impl Declared {
    fn new(ns: &str) -> Self {
        Self(
            Topology::new()
                .exchange(format!("{ns}.catalog.events"))
                .exchange(format!("{ns}.orders.events"))
                .queue(QueueSpec::new(format!("{ns}.catalog.reserve-stock"))),
        )
    }
}

impl Drop for Declared {
    fn drop(&mut self) {
        let topology = self.0.clone();
        // Drop cannot await: a runtime of its own, on a thread of its own.
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async {
                    if let Ok(connection) = AmqpConfig::new(amqp_url()).connect().await {
                        let _ = topology.delete(&connection).await;
                        let _ = connection.close(200, "OK".into()).await;
                    }
                })
        })
        .join();
    }
}

/// `shop serve catalog` as its role, migrating; returns once it serves.
async fn serve(db: &TestDb, role: &str) -> Child {
    serve_with(db, role, &[]).await.0
}

/// `shop serve catalog` as its role, migrating, with `extra` arguments; returns once it
/// serves, with the address it serves on.
async fn serve_with(db: &TestDb, role: &str, extra: &[&str]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_shop"))
        .args(["serve", "catalog", "--listen", "127.0.0.1:0", "--migrate"])
        .args(extra)
        .arg("--quick-recovery")
        .env("DATABASE_URL", db.url_as(role))
        .env("SHOP_NAMESPACE", db.name())
        .env("AMQP_URL", amqp_url())
        .env("SVCDB_POOL_MIN", "1")
        .env("SVCDB_POOL_MAX", "4")
        .env_remove("SVCDB_SCHEMA")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let serving = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some((_, addr)) = line.split_once("serving http://") {
                return addr
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
            }
        }
        panic!("shop serve catalog exited before serving");
    });
    let addr = serving
        .await
        .expect("shop serve catalog serves within 60 s");
    (child, addr)
}

/// The status of `GET /readyz` at `addr`, or `None` when nothing accepts the connection.
async fn readyz(addr: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

/// Found by a user trial: on SIGTERM `/readyz` was never seen answering 503, as the README
/// says it does first: the shop left `Service::drain_delay` at 0, which stops serving at
/// once, and could not set it. With `--drain-delay-ms` the replica answers 503 meanwhile.
#[tokio::test]
async fn with_a_drain_delay_readyz_answers_503_after_sigterm() {
    let db = TestDb::new().await;
    let (role, _) = db.provision("catalog", "catalog_schema").await;
    let _declared = Declared::new(db.name());
    let (child, addr) = serve_with(&db, &role, &["--drain-delay-ms", "3000"]).await;
    assert_eq!(readyz(&addr).await, Some(200));
    let pid = child.id().expect("still running") as libc::pid_t;
    // SAFETY: kill(2) on our own child, which keeps its pid until we wait for it.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let mut seen = None;
    for _ in 0..100 {
        seen = readyz(&addr).await;
        if seen == Some(503) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(seen, Some(503));
    let mut child = child;
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("it stops within 30 s of SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");
}

/// SIGTERM, then its exit status (within 30 s).
async fn terminate(mut child: Child) -> std::process::ExitStatus {
    let pid = child.id().expect("still running") as libc::pid_t;
    // SAFETY: kill(2) on our own child, which keeps its pid until we wait for it.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("it stops within 30 s of SIGTERM")
        .unwrap()
}

/// One number from the database.
async fn count(db: &TestDb, sql: &str) -> i64 {
    db.admin().await.query_one(sql, &[]).await.unwrap().get(0)
}

/// Polls `sql` until it returns `expected` (60 s at most); the last value.
async fn until(db: &TestDb, sql: &str, expected: impl Fn(i64) -> bool) -> i64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let value = count(db, sql).await;
        if expected(value) || tokio::time::Instant::now() >= deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Messages ready in the catalog's queue.
async fn ready(ns: &str) -> i64 {
    let connection = AmqpConfig::new(amqp_url()).connect().await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let queue = channel
        .queue_declare(
            format!("{ns}.catalog.reserve-stock").as_str().into(),
            svcdb_amqp::lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    let _ = connection.close(200, "OK".into()).await;
    i64::from(queue.message_count())
}

#[tokio::test]
async fn sigterm_under_load_loses_nothing_and_a_restart_handles_every_event_once() {
    let db = TestDb::new().await;
    let (role, _) = db.provision("catalog", "catalog_schema").await;
    let ns = db.name().to_owned();
    let _declared = Declared::new(&ns);

    let first = serve(&db, &role).await;
    let product: i64 = db
        .admin()
        .await
        .query_one(
            "INSERT INTO catalog_schema.products (name, price_cents, stock)
             VALUES ('lamp', 100, 1000000) RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let connection = AmqpConfig::new(amqp_url()).connect().await.unwrap();
    let channel = svcdb_amqp::publish::confirm_channel(&connection)
        .await
        .unwrap();
    for order in 1..=EVENTS {
        let placed = Envelope::new(
            "OrderPlaced",
            "orders",
            serde_json::json!({
                "order_id": order, "cart_id": order, "user_id": 1,
                "lines": [{ "product_id": product, "quantity": 1 }],
            }),
        );
        svcdb_amqp::publish::publish_envelope(
            &channel,
            &format!("{ns}.orders.events"),
            "order.placed",
            &placed,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    }
    let _ = connection.close(200, "OK".into()).await;

    let reservations = "SELECT count(*) FROM catalog_schema.stock_reservations";
    until(&db, reservations, |n| n >= EVENTS / 10).await;
    let status = terminate(first).await;
    assert!(status.success(), "a graceful stop exits 0: {status}");
    let handled = count(&db, reservations).await;
    assert!(
        handled < EVENTS,
        "all {EVENTS} events were handled before SIGTERM: the test needs more load"
    );
    // Every message it held was either handled and acknowledged, or handed back: the queue
    // holds exactly the rest (a message lost would make it fewer; one committed but not
    // acknowledged, more).
    let left = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let left = ready(&ns).await;
            if left == EVENTS - handled {
                return left;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{handled} handled, so {} should be left", EVENTS - handled));
    assert_eq!(handled + left, EVENTS);

    let second = serve(&db, &role).await;
    until(&db, reservations, |n| n >= EVENTS).await;
    assert!(terminate(second).await.success());

    // Exactly once: one reservation, one claim and one answer per event; no table has a unique
    // key that would hide a second application.
    assert_eq!(count(&db, reservations).await, EVENTS);
    assert_eq!(
        count(
            &db,
            "SELECT count(DISTINCT event_id) FROM catalog_schema.stock_reservations"
        )
        .await,
        EVENTS
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM catalog_schema.svcdb_processed_events"
        )
        .await,
        EVENTS
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM catalog_schema.svcdb_outbox").await,
        EVENTS
    );
    assert_eq!(
        count(
            &db,
            "SELECT 1000000 - stock::bigint FROM catalog_schema.products"
        )
        .await,
        EVENTS
    );
    assert_eq!(ready(&ns).await, 0);
}
