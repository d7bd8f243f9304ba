//! A RabbitMQ node stops with events flowing: the consumer and the relay connected to it move
//! to another node of the cluster by themselves, losing nothing and handling every event once.
//!
//! Needs the three-node cluster of `scripts/cluster rabbit up` (ports 5681-5683 unless
//! `SVCDB_CLUSTER_RABBIT_PORT` says otherwise), whose node 1 it kills and starts again:
//! `scripts/test-cluster` sets it up, runs it and removes it. PostgreSQL is the shared main
//! server, with a throwaway database.

use crate::common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::{self, within};
use serde_json::json;
use svcdb::testing::TestDb;
use svcdb::{Envelope, Outbox};
use svcdb_amqp::topology::{QueueSpec, Topology};
use svcdb_amqp::{AmqpConfig, Consumer, HandlerError, Relay};
use tokio_util::sync::CancellationToken;

const KIND: &str = "OrderPlaced";

/// Events enqueued before node 1 stops, and in all.
const BEFORE_STOP: usize = 150;
const EVENTS: usize = 400;

/// The AMQP ports of the cluster's three nodes.
fn node_ports() -> [u16; 3] {
    let base: u16 = std::env::var("SVCDB_CLUSTER_RABBIT_PORT")
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("SVCDB_CLUSTER_RABBIT_PORT={v:?} is not a port"))
        })
        .unwrap_or(5681);
    [base, base + 1, base + 2]
}

/// This process's established TCP connections to 127.0.0.1:`port`: the sockets among its
/// file descriptors (`/proc/self/fd`) that `/proc/net/tcp` lists as connected to that port.
/// This is how the test sees which node the consumer and the relay use, from the outside,
/// without asking them.
fn connections_to(port: u16) -> usize {
    let ours: HashSet<u64> = std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd (Linux)")
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            target
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect();
    let remote = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .expect("/proc/net/tcp")
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // remote address, state (01 = ESTABLISHED), inode
            fields.len() > 9
                && fields[2] == remote
                && fields[3] == "01"
                && fields[9]
                    .parse()
                    .is_ok_and(|inode: u64| ours.contains(&inode))
        })
        .count()
}

#[tokio::test]
#[ignore = "needs the three-node RabbitMQ cluster of scripts/cluster, and kills its node 1; run by scripts/test-cluster"]
async fn a_consumer_and_a_relay_move_to_another_node_when_theirs_stops() {
    common::init_tracing();
    let ports = node_ports();
    let amqp =
        AmqpConfig::cluster(ports.map(|port| format!("amqp://guest:guest@127.0.0.1:{port}/%2f")))
            .with_prefetch(8);
    assert_eq!(amqp.quorum_group_size(), Some(3));
    for (n, port) in ports.iter().enumerate() {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", *port)).is_ok(),
            "node {} (port {port}) is not running\n  hint: run scripts/cluster rabbit start-node {} (or scripts/test-cluster, which makes a fresh cluster)",
            n + 1,
            n + 1
        );
    }

    let test_db = TestDb::new().await;
    let orders = test_db.service("orders").await;
    orders.install_outbox().await.unwrap();
    let shipping = test_db.service("shipping").await;
    shipping.install_idempotency().await.unwrap();
    cluster::create_shipments(&shipping).await;

    let exchange = common::unique("orders.events");
    let queue = QueueSpec::new(common::unique("shipping.orders")).bind(&exchange, "order.#");
    let topology = Topology::new()
        .exchange(&exchange)
        .queue(queue.clone())
        .with_quorum_group_size(amqp.quorum_group_size());
    {
        let connection = amqp.connect().await.unwrap_or_else(|e| {
            panic!("{e}\n  hint: run scripts/cluster rabbit up (or scripts/test-cluster)")
        });
        topology.declare(&connection).await.unwrap();
        connection.close(200, "OK".into()).await.unwrap();
    }
    within(
        Duration::from_secs(10),
        "the declaring connection closed",
        || async { ports.iter().all(|&port| connections_to(port) == 0) },
    )
    .await;

    let shutdown = CancellationToken::new();
    let relay = Relay::new(&amqp, Outbox::new(orders.clone()));
    let relay_status = relay.status();
    let relay_task = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { relay.run(shutdown).await }
    });
    // When each handler started, to see when handling resumed after the stop.
    let started: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let consumer = Consumer::new(&amqp, shipping.clone(), &queue, "shipping.ship").on(KIND, {
        let started = started.clone();
        move |tx, event| {
            started.lock().unwrap().push(Instant::now());
            Box::pin(async move {
                // Slower than the producer at first, so deliveries are in flight at the stop.
                tx.execute("SELECT pg_sleep(0.05)", &[]).await?;
                tx.execute("INSERT INTO shipments (event_id) VALUES ($1)", &[&event.id])
                    .await?;
                Ok::<(), HandlerError>(())
            })
        }
    });
    let consumer_task = tokio::spawn({
        let consumer = consumer.clone();
        let shutdown = shutdown.clone();
        async move { consumer.run(shutdown).await }
    });

    // The producer: events enqueued in the orders service's transactions, one every 10 ms;
    // the relay publishes them.
    let enqueued: Arc<Mutex<Vec<uuid::Uuid>>> = Arc::default();
    let producer = tokio::spawn({
        let (orders, exchange, enqueued) = (orders.clone(), exchange.clone(), enqueued.clone());
        async move {
            for n in 0..EVENTS {
                let event = Envelope::new(KIND, "orders", json!({ "n": n }));
                orders
                    .transaction(async |tx| {
                        svcdb::outbox::enqueue(tx, &exchange, "order.placed", &event).await
                    })
                    .await
                    .unwrap();
                enqueued.lock().unwrap().push(event.id);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });

    let handled = |shipping: svcdb::ServiceDb| async move {
        shipping
            .get()
            .await
            .unwrap()
            .query_one("SELECT count(*) FROM shipments", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    // Both start on node 1, the first URL; the check is that they are there before the stop.
    within(
        Duration::from_secs(60),
        "events flowing, and the consumer and the relay both on node 1",
        || {
            let (enqueued, shipping) = (enqueued.clone(), shipping.clone());
            async move {
                let sent = enqueued.lock().unwrap().len();
                sent >= BEFORE_STOP && handled(shipping).await > 0 && connections_to(ports[0]) == 2
            }
        },
    )
    .await;

    // The kill is the script's first step; it then waits for the VM to be gone. Watched
    // meanwhile, so that the move is timed from the kill, not from the script's return.
    let stopped_at = Instant::now();
    let stopping = tokio::task::spawn_blocking(|| {
        cluster::script(&["rabbit", "stop-node", "1"]);
        Instant::now()
    });

    within(
        Duration::from_secs(60),
        "the consumer and the relay on nodes 2 and 3",
        || async {
            connections_to(ports[0]) == 0
                && connections_to(ports[1]) + connections_to(ports[2]) == 2
        },
    )
    .await;
    let moved_at = Instant::now();
    let stop_took = stopping.await.unwrap() - stopped_at;
    let waiting = Instant::now();
    while !started.lock().unwrap().iter().any(|&at| at > moved_at) {
        if waiting.elapsed() > Duration::from_secs(60) {
            let sent = enqueued.lock().unwrap().len();
            panic!(
                "the consumer did not handle again within 60 s: {sent} of {EVENTS} enqueued, {} handled, {} pending in the outbox, relay {:?}, consumer {:?}",
                handled(shipping.clone()).await,
                Outbox::new(orders.clone()).pending_count().await.unwrap(),
                relay_status.borrow().clone(),
                consumer.stats(),
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let handling_again = {
        let started = started.lock().unwrap();
        *started.iter().find(|&&at| at > moved_at).unwrap()
    };

    tokio::time::timeout(Duration::from_secs(120), producer)
        .await
        .expect("the producer enqueued every event within 120 s")
        .unwrap();
    let finished_at = Instant::now();
    let waiting = Instant::now();
    while handled(shipping.clone()).await < EVENTS as i64 {
        if waiting.elapsed() > Duration::from_secs(60) {
            panic!(
                "not every event was handled within 60 s: {} handled, {} pending in the outbox, relay {:?}, consumer {:?}",
                handled(shipping.clone()).await,
                Outbox::new(orders.clone()).pending_count().await.unwrap(),
                relay_status.borrow().clone(),
                consumer.stats(),
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained = finished_at.elapsed();

    // Nothing lost, nothing twice.
    let enqueued = enqueued.lock().unwrap().clone();
    let shipments = cluster::shipments(&shipping).await;
    let twice: Vec<_> = shipments.iter().filter(|(_, &n)| n > 1).collect();
    assert!(twice.is_empty(), "events handled more than once: {twice:?}");
    let missing = enqueued
        .iter()
        .filter(|id| !shipments.contains_key(id))
        .count();
    assert_eq!(missing, 0, "events never handled");
    assert_eq!(shipments.len(), EVENTS, "no event without an enqueue");
    let pending = Outbox::new(orders.clone()).pending_count().await.unwrap();
    assert_eq!(pending, 0, "the outbox drained");
    let stats = consumer.stats();
    assert_eq!(stats.dead_lettered, 0, "{stats:?}");

    shutdown.cancel();
    consumer_task.await.unwrap().unwrap();
    let relay_final = relay_task.await.unwrap().unwrap();

    // Node 1 back, for the next test; it rejoins the cluster by itself.
    cluster::script(&["rabbit", "start-node", "1"]);
    {
        let connection = amqp.connect().await.unwrap();
        topology.delete(&connection).await.unwrap();
        connection.close(200, "OK".into()).await.unwrap();
    }

    println!(
        "RabbitMQ node failover figures ({EVENTS} events, node 1 killed after {BEFORE_STOP}, 3 nodes, quorum queue of 3 replicas):\n\
         \x20 scripts/cluster rabbit stop-node 1 took       {stop_took:.2?} (kill, then waiting for the VM to exit)\n\
         \x20 node stop -> consumer and relay on other nodes {:.2?}\n\
         \x20 node stop -> a handler started after the move  {:.2?}\n\
         \x20 events lost                                    {missing}\n\
         \x20 events handled twice                           {}\n\
         \x20 duplicates absorbed by the consumer            {}\n\
         \x20 relay: published {} failed {} (rescheduled)\n\
         \x20 last events handled {drained:.2?} after the producer finished",
        moved_at - stopped_at,
        handling_again - stopped_at,
        twice.len(),
        stats.duplicates,
        relay_final.published,
        relay_final.failed,
    );
}
