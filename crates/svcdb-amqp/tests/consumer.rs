//! The consumer runtime against the real RabbitMQ and PostgreSQL.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{effects, eventually, header, service, Broker};
use serde_json::json;
use svcdb::{Envelope, ServiceDb, Transaction};
use svcdb_amqp::topology::{QueueSpec, Topology};
use svcdb_amqp::{Consumer, ConsumerOptions, EventHandler, HandlerError, Result};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const KIND: &str = "ProductStockReserved";

/// A producer exchange and a consumer queue bound to it, unique to one test.
struct Setup {
    broker: Broker,
    exchange: String,
    queue: QueueSpec,
}

async fn setup(max_deliveries: u32) -> Setup {
    common::init_tracing();
    let broker = Broker::new().await;
    let exchange = common::unique("catalog.events");
    let queue = QueueSpec::new(common::unique("orders.reserve"))
        .bind(&exchange, "product.#")
        .with_max_deliveries(max_deliveries);
    broker
        .declare(Topology::new().exchange(&exchange).queue(queue.clone()))
        .await;
    Setup {
        broker,
        exchange,
        queue,
    }
}

impl Setup {
    /// The consumer under test, before its handlers: the test queue, the claims of
    /// `orders.reserve-stock`, fast retries.
    fn consumer(&self, db: &ServiceDb) -> Consumer {
        Consumer::new(
            &self.broker.config,
            db.clone(),
            &self.queue,
            "orders.reserve-stock",
        )
        .with_options(fast())
    }

    /// Publishes `envelope` to the test exchange (routing key `product.stock.reserved`),
    /// with confirms.
    async fn publish(&self, envelope: &Envelope) {
        self.broker
            .publish(&self.exchange, "product.stock.reserved", envelope)
            .await;
    }
}

/// Fast retries, so tests of redelivery take milliseconds.
fn fast() -> ConsumerOptions {
    ConsumerOptions {
        retry_delay: Duration::from_millis(10),
        max_retry_delay: Duration::from_millis(50),
        ..ConsumerOptions::default()
    }
}

/// Writes one `effects` row per handled event.
async fn record(tx: &mut Transaction<'_>, event: &Envelope) -> Result<(), HandlerError> {
    tx.execute(
        "INSERT INTO effects (event_id, note) VALUES ($1, $2)",
        &[&event.id, &event.kind],
    )
    .await?;
    Ok(())
}

fn recording_consumer(s: &Setup, db: &ServiceDb) -> Consumer {
    s.consumer(db)
        .on(KIND, |tx, event| Box::pin(record(tx, event)))
}

fn start(consumer: &Consumer) -> (CancellationToken, JoinHandle<Result<()>>) {
    let shutdown = CancellationToken::new();
    let task = tokio::spawn({
        let consumer = consumer.clone();
        let shutdown = shutdown.clone();
        async move { consumer.run(shutdown).await }
    });
    (shutdown, task)
}

async fn stop(shutdown: CancellationToken, task: JoinHandle<Result<()>>) {
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the consumer stops within 10 s")
        .unwrap()
        .unwrap();
}

fn event() -> Envelope {
    Envelope::new(
        KIND,
        "catalog",
        json!({ "product_id": "abc123", "quantity": 5 }),
    )
}

#[tokio::test]
async fn an_event_is_handled_once_and_acknowledged() {
    let s = setup(5).await;
    let (_test_db, db) = service().await;
    let consumer = recording_consumer(&s, &db);
    let (shutdown, task) = start(&consumer);

    let reserved = event();
    s.publish(&reserved).await;
    eventually("the event is handled", || async {
        consumer.stats().handled == 1
    })
    .await;
    stop(shutdown, task).await;

    assert_eq!(effects(&db, reserved.id).await, 1);
    assert!(db
        .is_processed("orders.reserve-stock", reserved.id)
        .await
        .unwrap());
    // Stopping closed the channel: an unacknowledged message would be back in the queue.
    assert_eq!(s.broker.ready(&s.queue.name).await, 0);
    assert_eq!(s.broker.ready(&s.queue.dead_letter_queue()).await, 0);
    let stats = consumer.stats();
    assert_eq!(
        (stats.duplicates, stats.requeued, stats.dead_lettered),
        (0, 0, 0)
    );
}

#[tokio::test]
async fn the_same_envelope_twice_has_its_effect_once() {
    let s = setup(5).await;
    let (_test_db, db) = service().await;
    let consumer = recording_consumer(&s, &db);
    let (shutdown, task) = start(&consumer);

    let reserved = event();
    s.publish(&reserved).await;
    s.publish(&reserved).await;
    eventually("both copies are acknowledged", || async {
        let stats = consumer.stats();
        stats.handled + stats.duplicates == 2
    })
    .await;
    stop(shutdown, task).await;

    assert_eq!(effects(&db, reserved.id).await, 1);
    let stats = consumer.stats();
    assert_eq!((stats.handled, stats.duplicates), (1, 1));
    assert_eq!(s.broker.ready(&s.queue.name).await, 0);
}

#[tokio::test]
async fn eight_concurrent_copies_have_their_effect_once() {
    let s = setup(5).await;
    let (_test_db, db) = service().await;
    // The handler lingers inside its transaction, so the copies overlap: the others wait on
    // the first one's uncommitted claim and then find it committed.
    let consumer = s.consumer(&db).on(KIND, |tx, event| {
        Box::pin(async move {
            record(tx, event).await?;
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok(())
        })
    });
    let (shutdown, task) = start(&consumer);

    let reserved = event();
    let publishes = (0..8).map(|_| s.publish(&reserved));
    futures_util::future::join_all(publishes).await;
    eventually("all 8 copies are acknowledged", || async {
        let stats = consumer.stats();
        stats.handled + stats.duplicates == 8
    })
    .await;
    stop(shutdown, task).await;

    assert_eq!(effects(&db, reserved.id).await, 1);
    assert_eq!(consumer.stats().handled, 1);
    assert_eq!(s.broker.ready(&s.queue.name).await, 0);
}

/// Fails its first two attempts (an error, then a panic), then succeeds.
struct Flaky {
    attempts: Arc<AtomicU32>,
}

impl EventHandler for Flaky {
    async fn handle(&self, tx: &mut Transaction<'_>, event: &Envelope) -> Result<(), HandlerError> {
        // The write happens before the failure: it must be rolled back with the claim.
        record(tx, event).await?;
        match self.attempts.fetch_add(1, Ordering::SeqCst) {
            0 => Err(HandlerError::msg("stock service briefly unavailable")),
            1 => panic!("handler bug on the second attempt"),
            _ => Ok(()),
        }
    }
}

#[tokio::test]
async fn a_failed_handler_is_redelivered_until_it_succeeds() {
    let s = setup(5).await;
    let (_test_db, db) = service().await;
    let attempts = Arc::new(AtomicU32::new(0));
    let consumer = s.consumer(&db).on_handler(
        KIND,
        Flaky {
            attempts: attempts.clone(),
        },
    );
    let (shutdown, task) = start(&consumer);

    let reserved = event();
    s.publish(&reserved).await;
    eventually("the third attempt succeeds", || async {
        consumer.stats().handled == 1
    })
    .await;
    stop(shutdown, task).await;

    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    assert_eq!(
        effects(&db, reserved.id).await,
        1,
        "the failed attempts' writes rolled back"
    );
    let stats = consumer.stats();
    assert_eq!((stats.requeued, stats.dead_lettered), (2, 0));
    assert_eq!(s.broker.ready(&s.queue.name).await, 0);
}

#[tokio::test]
async fn a_handler_that_always_fails_ends_in_the_dead_letter_queue() {
    let s = setup(3).await;
    let (_test_db, db) = service().await;
    let attempts = Arc::new(AtomicU32::new(0));
    let counter = attempts.clone();
    let consumer = s.consumer(&db).on(KIND, move |tx, event| {
        let counter = counter.clone();
        Box::pin(async move {
            counter.fetch_add(1, Ordering::SeqCst);
            record(tx, event).await?;
            Err(HandlerError::msg("product abc123 is locked by an audit"))
        })
    });
    let (shutdown, task) = start(&consumer);

    let reserved = event();
    s.publish(&reserved).await;
    let dead = s
        .broker
        .take(&s.queue.dead_letter_queue(), 1, Duration::from_secs(10))
        .await;
    stop(shutdown, task).await;

    assert_eq!(dead.len(), 1);
    assert_eq!(Envelope::from_slice(&dead[0].data).unwrap(), reserved);
    let reason = header(&dead[0], "x-svcdb-reason").unwrap();
    assert!(
        reason.contains("delivery 3 of 3") && reason.contains("locked by an audit"),
        "{reason}"
    );
    assert_eq!(header(&dead[0], "x-svcdb-deliveries").as_deref(), Some("3"));
    assert_eq!(
        header(&dead[0], "x-svcdb-original-exchange").as_deref(),
        Some(s.exchange.as_str())
    );
    assert_eq!(
        header(&dead[0], "x-svcdb-original-routing-key").as_deref(),
        Some("product.stock.reserved")
    );
    assert_eq!(
        dead[0]
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.to_string()),
        Some(reserved.id.to_string())
    );

    assert_eq!(
        attempts.load(Ordering::SeqCst),
        3,
        "max_deliveries bounds the attempts"
    );
    assert_eq!(effects(&db, reserved.id).await, 0);
    assert!(!db
        .is_processed("orders.reserve-stock", reserved.id)
        .await
        .unwrap());
    assert_eq!(s.broker.ready(&s.queue.name).await, 0);
    let stats = consumer.stats();
    assert_eq!(
        (stats.requeued, stats.dead_lettered, stats.handled),
        (2, 1, 0)
    );
}

#[tokio::test]
async fn malformed_messages_and_unknown_kinds_are_dead_lettered_without_retries() {
    let s = setup(5).await;
    let (_test_db, db) = service().await;
    let consumer = recording_consumer(&s, &db);
    let (shutdown, task) = start(&consumer);

    s.broker
        .publish_raw(&s.exchange, "product.x", b"not json {")
        .await;
    let no_id = json!({ "kind": KIND, "occurred_at": "2025-01-15T09:01:00Z", "source": "catalog", "payload": {} });
    s.broker
        .publish_raw(&s.exchange, "product.x", no_id.to_string().as_bytes())
        .await;
    let unknown = Envelope::new("ProductRenamed", "catalog", json!({}));
    s.broker
        .publish(&s.exchange, "product.renamed", &unknown)
        .await;
    // The consumer is still alive afterwards and handles a good event.
    let good = event();
    s.publish(&good).await;

    let dead = s
        .broker
        .take(&s.queue.dead_letter_queue(), 3, Duration::from_secs(10))
        .await;
    eventually("the good event is handled", || async {
        consumer.stats().handled == 1
    })
    .await;
    stop(shutdown, task).await;

    let mut reasons: Vec<String> = dead
        .iter()
        .map(|d| header(d, "x-svcdb-reason").unwrap())
        .collect();
    reasons.sort();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(reasons[0].contains("event has no `id`"), "{reasons:?}");
    assert!(reasons[1].contains("not valid JSON"), "{reasons:?}");
    assert!(
        reasons[2].contains("no handler for event kind \"ProductRenamed\""),
        "{reasons:?}"
    );
    for d in &dead {
        assert_eq!(
            header(d, "x-svcdb-deliveries").as_deref(),
            Some("1"),
            "dead-lettered on the first delivery"
        );
    }
    assert_eq!(dead.iter().filter(|d| d.data == b"not json {").count(), 1);
    let stats = consumer.stats();
    assert_eq!(
        (stats.requeued, stats.dead_lettered, stats.handled),
        (0, 3, 1)
    );
    assert_eq!(effects(&db, good.id).await, 1);
    assert_eq!(s.broker.ready(&s.queue.name).await, 0);
}

#[tokio::test]
async fn database_outages_are_retried_without_spending_deliveries() {
    // One delivery allowed: a requeue would dead-letter the event.
    let s = setup(1).await;
    let (_test_db, db) = service().await;
    let attempts = Arc::new(AtomicU32::new(0));
    let counter = attempts.clone();
    let consumer = s.consumer(&db).on(KIND, move |tx, event| {
        let counter = counter.clone();
        Box::pin(async move {
            if counter.fetch_add(1, Ordering::SeqCst) < 2 {
                return Err(svcdb::Error::PoolClosed.into()); // what a failover looks like
            }
            record(tx, event).await
        })
    });
    let (shutdown, task) = start(&consumer);

    let reserved = event();
    s.publish(&reserved).await;
    eventually("the event is handled", || async {
        consumer.stats().handled == 1
    })
    .await;
    stop(shutdown, task).await;

    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    assert_eq!(effects(&db, reserved.id).await, 1);
    let stats = consumer.stats();
    assert_eq!((stats.requeued, stats.dead_lettered), (0, 0));
}

#[tokio::test]
async fn shutdown_waits_for_the_handler_in_flight() {
    let s = setup(5).await;
    let (_test_db, db) = service().await;
    let started = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let (on_start, gate) = (started.clone(), release.clone());
    let consumer = s.consumer(&db).on(KIND, move |tx, event| {
        let (on_start, gate) = (on_start.clone(), gate.clone());
        Box::pin(async move {
            record(tx, event).await?;
            on_start.notify_one();
            gate.notified().await;
            Ok(())
        })
    });
    let (shutdown, task) = start(&consumer);

    let reserved = event();
    s.publish(&reserved).await;
    tokio::time::timeout(Duration::from_secs(10), started.notified())
        .await
        .expect("the handler starts");
    shutdown.cancel();
    // The handler is parked on the gate: the consumer cannot have finished.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !task.is_finished(),
        "run() returned while a handler was in flight"
    );
    assert_eq!(effects(&db, reserved.id).await, 0, "not committed yet");

    release.notify_one();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the consumer stops once the handler is done")
        .unwrap()
        .unwrap();
    assert_eq!(effects(&db, reserved.id).await, 1);
    assert_eq!(consumer.stats().handled, 1);
    // Acknowledged before the channel closed, so not requeued.
    assert_eq!(s.broker.ready(&s.queue.name).await, 0);
}

#[tokio::test]
async fn a_consumer_without_handlers_or_queue_is_refused() {
    let s = setup(5).await;
    let (_test_db, db) = service().await;
    let bare = s.consumer(&db);
    let e = bare.run(CancellationToken::new()).await.unwrap_err();
    assert!(matches!(e, svcdb_amqp::Error::Config { .. }), "{e}");

    let missing = QueueSpec::new(common::unique("never.declared"));
    let consumer = Consumer::new(&s.broker.config, db, &missing, "x")
        .on(KIND, |tx, event| Box::pin(record(tx, event)));
    let e = consumer.run(CancellationToken::new()).await.unwrap_err();
    assert!(
        matches!(e, svcdb_amqp::Error::Amqp { .. }) && e.to_string().contains("NOT_FOUND"),
        "{e}"
    );
    assert!(!e.is_connection_error());
}

#[tokio::test]
async fn the_consumer_reconnects_after_losing_the_broker() {
    let s = setup(5).await;
    let (_test_db, db) = service().await;
    let port = common::closed_port();
    let proxy = common::Proxy::start(port).await;
    let via_proxy = svcdb_amqp::AmqpConfig::new(common::url_via(port));
    let consumer = Consumer::new(&via_proxy, db.clone(), &s.queue, "orders.reserve-stock")
        .on(KIND, |tx, event| Box::pin(record(tx, event)))
        .with_options(ConsumerOptions {
            reconnect_backoff: Duration::from_millis(20),
            max_reconnect_backoff: Duration::from_millis(200),
            ..fast()
        });
    let (shutdown, task) = start(&consumer);

    let first = event();
    s.publish(&first).await;
    eventually("the first event is handled", || async {
        consumer.stats().handled == 1
    })
    .await;

    proxy.cut(); // the broker "restarts": the consumer's connection drops
    let second = event();
    s.publish(&second).await;
    eventually("the second event is handled after reconnecting", || async {
        consumer.stats().handled == 2
    })
    .await;
    stop(shutdown, task).await;

    assert_eq!(effects(&db, first.id).await, 1);
    assert_eq!(effects(&db, second.id).await, 1);
    assert_eq!(s.broker.ready(&s.queue.name).await, 0);
}

#[tokio::test]
async fn a_service_without_the_claims_table_is_refused_at_start() {
    let s = setup(5).await;
    let test_db = svcdb::testing::TestDb::new().await;
    let db = test_db.service("bare").await; // no install_idempotency
    let consumer = recording_consumer(&s, &db);
    let e = consumer.run(CancellationToken::new()).await.unwrap_err();
    assert!(
        matches!(&e, svcdb_amqp::Error::Db(svcdb::Error::MissingTables { tables, .. }) if tables == &["svcdb_processed_events"]),
        "{e}"
    );
    // Nothing was consumed.
    let reserved = event();
    s.publish(&reserved).await;
    assert_eq!(s.broker.ready(&s.queue.name).await, 1);
}
