//! A PostgreSQL failover with events and orders flowing: the primary stops, the standby is
//! promoted, and the producer, the relay and the consumer carry on by themselves, losing
//! nothing and handling every event once.
//!
//! Needs a primary and a streaming standby of its own (`scripts/cluster pg up`, ports 5441 and
//! 5442 unless `SVCDB_CLUSTER_PG_PRIMARY_PORT` / `SVCDB_CLUSTER_PG_STANDBY_PORT` say
//! otherwise), which it stops and promotes: `scripts/test-cluster` sets them up, runs it and
//! removes them. RabbitMQ is the shared one, with names unique to the test.

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::{self, within};
use common::Broker;
use serde_json::json;
use svcdb::{Config, DedicatedConn, Envelope, Gate, Outbox, ServiceDb, SqlState};
use svcdb_amqp::topology::{QueueSpec, Topology};
use svcdb_amqp::{Consumer, HandlerError, Relay};
use tokio_util::sync::CancellationToken;

const KIND: &str = "OrderPlaced";

/// Orders placed before the primary stops, and in all.
const BEFORE_STOP: usize = 150;
const ORDERS: usize = 400;

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

/// A service on both servers: `target_session_attrs` left to svcdb's default for several
/// hosts (read-write).
async fn service(url: &str, schema: &str) -> ServiceDb {
    let mut config = Config::new(url, schema).unwrap();
    config.create_schema = true;
    config.pool_min = 2;
    config.pool_max = 8;
    config.acquire_timeout = Duration::from_secs(2);
    ServiceDb::connect(config).await.unwrap()
}

/// When things happened, for the figures.
#[derive(Default)]
struct Timeline {
    /// Commit instants of the orders the producer placed, in order.
    committed: Vec<Instant>,
    /// Orders whose commit failed with a database-unavailable error (retried).
    refused: usize,
}

#[tokio::test]
#[ignore = "needs the failover clusters of scripts/cluster, and stops and promotes them; run by scripts/test-cluster"]
async fn events_and_orders_survive_a_failover_exactly_once() {
    common::init_tracing();
    let (primary, standby) = cluster_ports();
    let name = format!("failover_{}", uuid::Uuid::now_v7().simple());
    let admin_url = format!("postgres://postgres@127.0.0.1:{primary}/postgres");
    let admin = DedicatedConn::connect(&svcdb::parse_url(&admin_url).unwrap())
        .await
        .unwrap_or_else(|e| {
            panic!("{e}\n  hint: run scripts/cluster pg up (or scripts/test-cluster)")
        });
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    drop(admin);
    let url = format!("postgres://postgres@127.0.0.1:{primary},127.0.0.1:{standby}/{name}");

    // Two services: `orders` places orders and enqueues OrderPlaced in the same transaction;
    // `shipping` consumes them, one `shipments` row per event, deliberately without a unique
    // key, so an event handled twice shows as two rows.
    let orders = service(&url, "orders").await;
    orders.install_outbox().await.unwrap();
    orders
        .get()
        .await
        .unwrap()
        .batch_execute("CREATE TABLE placed (id uuid PRIMARY KEY, n int NOT NULL)")
        .await
        .unwrap();
    let shipping = service(&url, "shipping").await;
    shipping.install_idempotency().await.unwrap();
    cluster::create_shipments(&shipping).await;

    let broker = Broker::new().await;
    let exchange = common::unique("orders.events");
    let queue = QueueSpec::new(common::unique("shipping.orders")).bind(&exchange, "order.#");
    broker
        .declare(Topology::new().exchange(&exchange).queue(queue.clone()))
        .await;

    let shutdown = CancellationToken::new();
    let relay = Relay::new(&broker.config, Outbox::new(orders.clone()));
    let relay_task = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { relay.run(shutdown).await }
    });
    let consumer = Consumer::new(&broker.config, shipping.clone(), &queue, "shipping.ship").on(
        KIND,
        |tx, event| {
            Box::pin(async move {
                // Shipping is slower than ordering (8 handlers at a time, 200 ms each), so a
                // backlog builds and handlers are mid-transaction when the primary stops.
                tx.execute("SELECT pg_sleep(0.2)", &[]).await?;
                tx.execute("INSERT INTO shipments (event_id) VALUES ($1)", &[&event.id])
                    .await?;
                Ok::<(), HandlerError>(())
            })
        },
    );
    let consumer_task = tokio::spawn({
        let consumer = consumer.clone();
        let shutdown = shutdown.clone();
        async move { consumer.run(shutdown).await }
    });

    // The producer: one order after another, each retried until it commits. A commit whose
    // answer was lost may have happened: its retry then finds the order there (23505) and
    // counts it once.
    let timeline = Arc::new(Mutex::new(Timeline::default()));
    let producer = tokio::spawn({
        let (orders, exchange, timeline) = (orders.clone(), exchange.clone(), timeline.clone());
        async move {
            for n in 0..ORDERS {
                let event = Envelope::new(KIND, "orders", json!({ "n": n }));
                loop {
                    let outcome = orders
                        .transaction(async |tx| {
                            tx.execute(
                                "INSERT INTO placed (id, n) VALUES ($1, $2)",
                                &[&event.id, &(n as i32)],
                            )
                            .await?;
                            svcdb::outbox::enqueue(tx, &exchange, "order.placed", &event).await
                        })
                        .await;
                    match outcome {
                        Ok(()) => break,
                        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => break,
                        Err(e) if e.is_database_unavailable() => {
                            timeline.lock().unwrap().refused += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(e) => panic!("order {n}: {e}"),
                    }
                }
                timeline.lock().unwrap().committed.push(Instant::now());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });

    let gate = Gate::new().timeout(Duration::from_secs(2));
    assert!(orders.health(&gate).await.gate.ready);
    let handled = |db: ServiceDb| async move {
        let row = db
            .get()
            .await
            .ok()?
            .query_one("SELECT count(*) FROM shipments", &[])
            .await
            .ok()?;
        Some(row.get::<_, i64>(0))
    };
    within(
        Duration::from_secs(60),
        "orders placed, some shipped, and a backlog of shipments before the stop",
        || {
            let (timeline, shipping) = (timeline.clone(), shipping.clone());
            async move {
                let placed = timeline.lock().unwrap().committed.len() as i64;
                let shipped = handled(shipping).await.unwrap_or(0);
                placed >= BEFORE_STOP as i64 && shipped > 0 && placed - shipped >= 16
            }
        },
    )
    .await;

    // The failover: the primary stops (fast shutdown: its connections close, and what it
    // committed has reached the standby), then the standby is promoted.
    let stopped_at = Instant::now();
    cluster::script(&["pg", "stop-primary"]);
    let stop_took = stopped_at.elapsed();

    // During the outage: a request (a connection and a query, as an HTTP handler makes) fails
    // within the acquire timeout, with an error the shop answers 503 for, and the health
    // report says not ready. The pool may still hold a connection whose closed socket it has
    // not seen yet: the query then fails at once.
    let asked = Instant::now();
    let request = async {
        let conn = orders.get().await?;
        conn.simple_query("SELECT 1").await?;
        Ok::<_, svcdb::Error>(())
    };
    let err = request.await.unwrap_err();
    let waited = asked.elapsed();
    assert!(err.is_database_unavailable(), "{err}");
    assert!(
        waited < orders.config().acquire_timeout + Duration::from_secs(1),
        "a request waited {waited:?}, more than the acquire timeout"
    );
    let report = orders.health(&gate).await;
    assert!(!report.gate.ready, "{report}");
    let outage_report = report.to_string();

    let promote_started = Instant::now();
    cluster::script(&["pg", "promote"]);
    let promote_took = promote_started.elapsed();

    within(
        Duration::from_secs(60),
        "an order placed after the promotion",
        || {
            let timeline = timeline.clone();
            async move {
                timeline
                    .lock()
                    .unwrap()
                    .committed
                    .last()
                    .is_some_and(|&at| at > promote_started)
            }
        },
    )
    .await;
    let first_write_after = {
        let timeline = timeline.lock().unwrap();
        *timeline
            .committed
            .iter()
            .find(|&&at| at > stopped_at)
            .unwrap()
    };
    within(
        Duration::from_secs(30),
        "the health report ready again",
        || {
            let (orders, gate) = (orders.clone(), gate.clone());
            async move { orders.health(&gate).await.gate.ready }
        },
    )
    .await;

    tokio::time::timeout(Duration::from_secs(120), producer)
        .await
        .expect("the producer placed every order within 120 s")
        .unwrap();
    let shipped_after_stop = Instant::now();
    within(Duration::from_secs(60), "every order shipped", || {
        let shipping = shipping.clone();
        async move { handled(shipping).await.unwrap_or(0) >= ORDERS as i64 }
    })
    .await;
    let drained = shipped_after_stop.elapsed();

    // Nothing lost, nothing twice: the orders placed are exactly the events shipped, each once.
    let placed: Vec<uuid::Uuid> = orders
        .get()
        .await
        .unwrap()
        .query("SELECT id FROM placed", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(
        placed.len(),
        ORDERS,
        "every order the producer saw committed is there"
    );
    let shipments = cluster::shipments(&shipping).await;
    let twice: Vec<_> = shipments.iter().filter(|(_, &n)| n > 1).collect();
    assert!(twice.is_empty(), "events handled more than once: {twice:?}");
    let missing = placed
        .iter()
        .filter(|id| !shipments.contains_key(id))
        .count();
    assert_eq!(missing, 0, "orders whose event was never handled");
    assert_eq!(shipments.len(), ORDERS, "no event without an order");
    let pending = Outbox::new(orders.clone()).pending_count().await.unwrap();
    assert_eq!(pending, 0, "the outbox drained");
    // The handlers the stop interrupted paused the consumer and handed their deliveries back
    // unspent: none counted as a failed attempt, none dead-lettered.
    let stats = consumer.stats();
    assert!(stats.paused >= 1, "the consumer never paused: {stats:?}");
    assert_eq!((stats.requeued, stats.dead_lettered), (0, 0), "{stats:?}");

    // Both servers answer as they should now: the old primary is gone, the new one writes.
    let server: i32 = orders
        .get()
        .await
        .unwrap()
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(server, i32::from(standby));

    shutdown.cancel();
    consumer_task.await.unwrap().unwrap();
    let relay_final = relay_task.await.unwrap().unwrap();
    let refused = timeline.lock().unwrap().refused;
    let recovered = first_write_after - stopped_at;
    println!(
        "failover figures ({ORDERS} orders, primary stopped after {BEFORE_STOP}):\n\
         \x20 primary stop (fast shutdown) took        {stop_took:.2?}\n\
         \x20 primary stop -> promotion started        {:.2?} (the outage checks above)\n\
         \x20 promotion (pg_ctl promote) took          {promote_took:.2?}\n\
         \x20 primary stop -> first order committed    {recovered:.2?}\n\
         \x20 promotion done -> first order committed  {:.2?}\n\
         \x20 orders retried during the switch         {refused}\n\
         \x20 events lost                              {missing}\n\
         \x20 events handled twice                     {}\n\
         \x20 duplicates absorbed by the consumer      {}\n\
         \x20 consumer pauses / handed back unspent    {} / {}\n\
         \x20 relay: published {} failed {} (rescheduled)\n\
         \x20 last orders shipped {drained:.2?} after the producer finished\n\
         \x20 health report during the outage:\n{}",
        promote_started - stopped_at,
        first_write_after.saturating_duration_since(promote_started + promote_took),
        twice.len(),
        stats.duplicates,
        stats.paused,
        stats.returned,
        relay_final.published,
        relay_final.failed,
        outage_report
            .lines()
            .map(|l| format!("      {l}"))
            .collect::<Vec<_>>()
            .join("\n"),
    );
}
