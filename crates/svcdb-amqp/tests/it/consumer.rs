//! The consumer runtime against the real RabbitMQ and PostgreSQL.

use crate::common;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{effects, eventually, header, service, Broker};
use serde_json::json;
use svcdb::testing::TestDb;
use svcdb::{Envelope, ServiceDb, Transaction};
use svcdb_amqp::topology::{QueueSpec, Topology};
use svcdb_amqp::{AmqpConfig, Consumer, ConsumerOptions, EventHandler, HandlerError, Result};
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

/// [`setup`], and the service's database (with the `effects` table) the consumer writes to.
async fn queue_and_service(max_deliveries: u32) -> (Setup, TestDb, ServiceDb) {
    let s = setup(max_deliveries).await;
    let (test_db, db) = service().await;
    (s, test_db, db)
}

impl Setup {
    /// The consumer under test, before its handlers: the test queue, the claims of
    /// `orders.reserve-stock`, fast retries.
    fn consumer(&self, db: &ServiceDb) -> Consumer {
        self.consumer_on(&self.broker.config, db)
    }

    /// [`consumer`](Self::consumer), reaching the broker through `amqp` (a proxy, another
    /// prefetch).
    fn consumer_on(&self, amqp: &AmqpConfig, db: &ServiceDb) -> Consumer {
        Consumer::new(amqp, db.clone(), &self.queue, "orders.reserve-stock").with_options(fast())
    }

    /// The first `count` dead letters of the test queue, waiting up to 10 s for them.
    async fn dead_letters(&self, count: usize) -> Vec<lapin::message::Delivery> {
        self.broker
            .take(
                &self.queue.dead_letter_queue(),
                count,
                Duration::from_secs(10),
            )
            .await
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

/// Waits until `consumer` has handled `count` events.
async fn until_handled(consumer: &Consumer, count: u64, what: &str) {
    eventually(what, || async { consumer.stats().handled == count }).await;
}

/// Whether the claim of `orders.reserve-stock` on `event_id` is committed.
async fn claimed(db: &ServiceDb, event_id: uuid::Uuid) -> bool {
    db.is_processed("orders.reserve-stock", event_id)
        .await
        .unwrap()
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
    let (s, _test_db, db) = queue_and_service(5).await;
    let consumer = recording_consumer(&s, &db);
    let (shutdown, task) = start(&consumer);

    let reserved = event();
    s.publish(&reserved).await;
    until_handled(&consumer, 1, "the event is handled").await;
    stop(shutdown, task).await;

    assert_eq!(effects(&db, reserved.id).await, 1);
    assert!(claimed(&db, reserved.id).await);
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
    let (s, _test_db, db) = queue_and_service(5).await;
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
    let (s, test_db, db) = queue_and_service(5).await;
    // The first handler holds its transaction open until the test lets go, so the copies
    // overlap: the others wait on its uncommitted claim and then find it committed.
    let release = CancellationToken::new();
    let gate = release.clone();
    // A transaction per delivery (batch 1): copies in one batch would share its transaction.
    let consumer = s
        .consumer(&db)
        .with_options(ConsumerOptions { batch: 1, ..fast() })
        .on(KIND, move |tx, event| {
            let gate = gate.clone();
            Box::pin(async move {
                record(tx, event).await?;
                gate.cancelled().await;
                Ok(())
            })
        });
    let (shutdown, task) = start(&consumer);

    let reserved = event();
    let publishes = (0..8).map(|_| s.publish(&reserved));
    futures_util::future::join_all(publishes).await;
    // Handlers at once: min(prefetch, pool_max); all but the first wait on its claim.
    let at_once = i64::from(s.broker.config.prefetch).min(db.config().pool_max as i64);
    eventually("the other copies wait on the first one's claim", || async {
        claim_waiters(&test_db).await >= at_once - 1
    })
    .await;
    release.cancel();
    eventually("all 8 copies are acknowledged", || async {
        let stats = consumer.stats();
        stats.handled + stats.duplicates == 8
    })
    .await;
    stop(shutdown, task).await;

    assert_eq!(effects(&db, reserved.id).await, 1);
    let stats = consumer.stats();
    assert_eq!((stats.handled, stats.duplicates), (1, 7));
    assert_eq!(s.broker.ready(&s.queue.name).await, 0);
}

/// Sessions on the test database waiting for a lock (a claim another transaction holds),
/// counted from a session of the admin's own, outside the service's pool.
async fn claim_waiters(test_db: &svcdb::testing::TestDb) -> i64 {
    test_db
        .admin()
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND wait_event_type = 'Lock'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
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
    let (s, _test_db, db) = queue_and_service(5).await;
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
    until_handled(&consumer, 1, "the third attempt succeeds").await;
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
    let (s, _test_db, db) = queue_and_service(3).await;
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
    let dead = s.dead_letters(1).await;
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
    assert!(!claimed(&db, reserved.id).await);
    assert_eq!(s.broker.ready(&s.queue.name).await, 0);
    let stats = consumer.stats();
    assert_eq!(
        (stats.requeued, stats.dead_lettered, stats.handled),
        (2, 1, 0)
    );
}

#[tokio::test]
async fn malformed_messages_and_unknown_kinds_are_dead_lettered_without_retries() {
    let (s, _test_db, db) = queue_and_service(5).await;
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

    let dead = s.dead_letters(3).await;
    until_handled(&consumer, 1, "the good event is handled").await;
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

/// Runs `statements` one by one (each its own transaction) on the test database as the
/// admin, outside the service's pool.
async fn admin(test_db: &svcdb::testing::TestDb, statements: &[&str]) {
    let conn = test_db.admin().await;
    for statement in statements {
        conn.batch_execute(statement).await.unwrap();
    }
}

/// Ends every session on the test database but the caller's: a failover, seen from the
/// service (its pooled connections die, new ones go wherever the server sends them).
const TERMINATE_OTHER_SESSIONS: &str = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
     WHERE datname = current_database() AND pid <> pg_backend_pid()";

#[tokio::test]
async fn poison_messages_are_counted_on_every_rabbitmq_version() {
    // Failures go back with basic.reject, which counts on 3.x and 4.3+ alike; a database
    // outage goes back with basic.nack, which 4.3+ does not count. Seen on the wire through
    // the proxy, and in the count the consumer dead-letters with.
    let (s, _test_db, db) = queue_and_service(4).await;
    let nack_counts = s.broker.nack_spends_a_delivery().await;
    let (proxy, via_proxy) = common::proxied().await;
    let attempts = Arc::new(AtomicU32::new(0));
    let counter = attempts.clone();
    let consumer = s.consumer_on(&via_proxy, &db).on(KIND, move |tx, _event| {
        let counter = counter.clone();
        Box::pin(async move {
            if counter.fetch_add(1, Ordering::SeqCst) == 0 {
                // A real outage for this attempt: its own backend terminated (57P01).
                tx.execute("SELECT pg_terminate_backend(pg_backend_pid())", &[])
                    .await?;
                unreachable!("the backend was terminated under its statement");
            }
            Err(HandlerError::msg("product abc123 is locked by an audit"))
        })
    });
    let (shutdown, task) = start(&consumer);

    let reserved = event();
    s.publish(&reserved).await;
    let dead = s.dead_letters(1).await;
    stop(shutdown, task).await;

    // Deliveries 1 to 4, as the consumer counted them; the outage's return counted as one
    // only where the broker counts a nack.
    let reason = header(&dead[0], "x-svcdb-reason").unwrap();
    assert!(reason.contains("delivery 4 of 4"), "{reason}");
    assert_eq!(header(&dead[0], "x-svcdb-deliveries").as_deref(), Some("4"));
    let free_return = u32::from(!nack_counts);
    assert_eq!(attempts.load(Ordering::SeqCst), 4 + free_return);
    let failures_returned = 2 + free_return as usize;
    assert_eq!(proxy.sent(common::BASIC_REJECT), failures_returned);
    assert_eq!(
        proxy.sent(common::BASIC_NACK),
        1,
        "only the outage is nacked"
    );
    let stats = consumer.stats();
    assert_eq!(
        (
            stats.requeued,
            stats.returned,
            stats.paused,
            stats.dead_lettered
        ),
        (failures_returned as u64, 1, 1, 1)
    );
}

#[tokio::test]
async fn a_message_replayed_from_the_dead_letter_queue_starts_with_a_fresh_count() {
    let (s, _test_db, db) = queue_and_service(2).await;
    // The copies as the consumer publishes them, before the dead-letter queue (a quorum
    // queue) sets its own count on them.
    let copies = s.broker.tap(&s.queue.dead_letter_exchange()).await;
    let fixed = Arc::new(AtomicBool::new(false));
    let after_fix = Arc::new(AtomicU32::new(0));
    let (is_fixed, counter) = (fixed.clone(), after_fix.clone());
    let consumer = s.consumer(&db).on(KIND, move |tx, event| {
        let (is_fixed, counter) = (is_fixed.clone(), counter.clone());
        Box::pin(async move {
            if !is_fixed.load(Ordering::SeqCst) {
                return Err(HandlerError::msg("bug: quantity read as a string"));
            }
            // Fixed, yet the first attempt meets a transient failure.
            if counter.fetch_add(1, Ordering::SeqCst) == 0 {
                return Err(HandlerError::msg("stock row briefly locked"));
            }
            record(tx, event).await
        })
    });
    let (shutdown, task) = start(&consumer);

    let reserved = event();
    s.publish(&reserved).await;
    let dead = s.broker.take(&copies, 1, Duration::from_secs(10)).await;
    let copy = &dead[0];
    for counting in ["x-delivery-count", "x-acquired-count", "x-death"] {
        assert_eq!(header(copy, counting), None, "{counting} left on the copy");
    }
    assert_eq!(header(copy, "x-svcdb-deliveries").as_deref(), Some("2"));

    // The fix is deployed; a person replays the dead letter as it is, headers and all.
    fixed.store(true, Ordering::SeqCst);
    let exchange = header(copy, "x-svcdb-original-exchange").unwrap();
    let routing_key = header(copy, "x-svcdb-original-routing-key").unwrap();
    s.broker
        .publish_with(&exchange, &routing_key, &copy.data, copy.properties.clone())
        .await;
    until_handled(&consumer, 1, "the replayed event is handled").await;
    stop(shutdown, task).await;

    assert_eq!(
        after_fix.load(Ordering::SeqCst),
        2,
        "one transient failure, then done"
    );
    assert_eq!(effects(&db, reserved.id).await, 1);
    assert_eq!(
        consumer.stats().dead_lettered,
        1,
        "dead-lettered once, before the fix"
    );
    assert_eq!(s.broker.ready(&s.queue.dead_letter_queue()).await, 1);
}

/// Found by a user trial: a message replayed straight to its queue (`svcdb events replay`)
/// that failed again was dead-lettered with the default exchange and the queue's name as its
/// origin, so where it first came from was lost. The first origin stays.
#[tokio::test]
async fn a_replayed_message_that_fails_again_keeps_its_first_origin() {
    let (s, _test_db, db) = queue_and_service(1).await;
    let copies = s.broker.tap(&s.queue.dead_letter_exchange()).await;
    let consumer = s.consumer(&db).on(KIND, |_tx, _event| {
        Box::pin(async { Err(HandlerError::msg("still broken")) })
    });
    let (shutdown, task) = start(&consumer);
    let reserved = event();
    let text = |s: &str| lapin::types::AMQPValue::LongString(s.into());
    let mut headers = lapin::types::FieldTable::default();
    headers.insert("x-svcdb-original-exchange".into(), text("catalog.events"));
    headers.insert(
        "x-svcdb-original-routing-key".into(),
        text("product.stock.reserved"),
    );
    let properties = svcdb_amqp::publish::envelope_properties(&reserved).with_headers(headers);
    s.broker
        .publish_with("", &s.queue.name, &reserved.to_json_bytes(), properties)
        .await;
    let dead = s.broker.take(&copies, 1, Duration::from_secs(10)).await;
    stop(shutdown, task).await;
    assert_eq!(
        header(&dead[0], "x-svcdb-original-exchange").as_deref(),
        Some("catalog.events")
    );
    assert_eq!(
        header(&dead[0], "x-svcdb-original-routing-key").as_deref(),
        Some("product.stock.reserved")
    );
}

#[tokio::test]
async fn a_first_delivery_is_number_one_whatever_count_its_headers_carry() {
    // A copy dead-lettered by the broker (or by RabbitMQ 4.x, which carries the count across
    // dead-lettering) and replayed by hand still says "4 earlier deliveries".
    let (s, _test_db, db) = queue_and_service(5).await;
    let attempts = Arc::new(AtomicU32::new(0));
    let counter = attempts.clone();
    let consumer = s.consumer(&db).on(KIND, move |tx, event| {
        let counter = counter.clone();
        Box::pin(async move {
            if counter.fetch_add(1, Ordering::SeqCst) == 0 {
                return Err(HandlerError::msg("stock row briefly locked"));
            }
            record(tx, event).await
        })
    });
    let (shutdown, task) = start(&consumer);

    let reserved = event();
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        "x-delivery-count".into(),
        lapin::types::AMQPValue::LongLongInt(4),
    );
    let properties = svcdb_amqp::publish::envelope_properties(&reserved).with_headers(headers);
    s.broker
        .publish_with(
            &s.exchange,
            "product.stock.reserved",
            &reserved.to_json_bytes(),
            properties,
        )
        .await;
    until_handled(&consumer, 1, "the event is handled on its second delivery").await;
    stop(shutdown, task).await;

    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    assert_eq!(consumer.stats().dead_lettered, 0);
}

#[tokio::test]
async fn a_dead_letter_publish_to_a_silent_broker_gives_up_at_the_timeout() {
    let (s, _test_db, db) = queue_and_service(5).await;
    let (proxy, via_proxy) = common::proxied().await;
    // The broker goes silent when the dead-letter copy starts: its frames pile up in the
    // socket buffers until they are full, and lapin's writes stop there.
    proxy.freeze_at(common::BASIC_PUBLISH);
    let consumer = s
        .consumer_on(&via_proxy, &db)
        .on(KIND, |tx, event| Box::pin(record(tx, event)))
        .with_options(ConsumerOptions {
            confirm_timeout: Duration::from_millis(200),
            // Far beyond the test's wait: only the publish's own bound can end the attempt.
            shutdown_timeout: Duration::from_secs(3600),
            ..fast()
        });
    let (shutdown, task) = start(&consumer);

    // Too large to be an event, so dead-lettered at once, and too large for the buffers.
    let body = vec![b'x'; 32 * 1024 * 1024];
    s.broker
        .publish_raw(&s.exchange, "product.stock.reserved", &body)
        .await;
    eventually("the dead-letter attempt ends", || async {
        consumer.stats().dead_lettered == 1
    })
    .await;
    assert_eq!(proxy.sent(common::BASIC_PUBLISH), 1);
    proxy.cut(); // the connection drops; the message, never settled, is redelivered later
    stop(shutdown, task).await;
    // The broker requeues it once it has noticed the closed connection, not at once.
    eventually("the unsettled message is back in the queue", || async {
        s.broker.ready(&s.queue.name).await == 1
    })
    .await;
}

#[tokio::test]
async fn a_primary_turned_read_only_pauses_the_consumer_instead_of_dead_lettering() {
    // Two deliveries: a failure counted for the read-only attempt (or a return counted per
    // retry, as 3.x counts nacks) would dead-letter the event.
    let (s, test_db, db) = queue_and_service(2).await;
    // svcdb begins its transactions READ WRITE explicitly, which overrides the database's
    // default; the handler applies the default to its transaction itself, as a transaction
    // begun without a mode would.
    let consumer = s.consumer(&db).on(KIND, |tx, event| {
        Box::pin(async move {
            tx.execute(
                "SELECT set_config('transaction_read_only', current_setting('default_transaction_read_only'), true)",
                &[],
            )
            .await?;
            record(tx, event).await
        })
    });
    let (shutdown, task) = start(&consumer);
    let warm_up = event();
    s.publish(&warm_up).await;
    until_handled(&consumer, 1, "the consumer is up").await;

    // Failover to a node that refuses writes (25006): existing sessions end, new ones are
    // read-only.
    let database = test_db.name().to_owned();
    admin(
        &test_db,
        &[
            &format!("ALTER DATABASE \"{database}\" SET default_transaction_read_only = on"),
            TERMINATE_OTHER_SESSIONS,
        ],
    )
    .await;
    let reserved = event();
    s.publish(&reserved).await;
    eventually("the consumer hands the event back and pauses", || async {
        let stats = consumer.stats();
        stats.returned >= 1 && stats.paused == 1
    })
    .await;
    assert_eq!(effects(&db, reserved.id).await, 0);

    // The writable primary is back; the read-only sessions end with the failover.
    admin(
        &test_db,
        &[
            "SET default_transaction_read_only = off", // this session started read-only too
            &format!("ALTER DATABASE \"{database}\" RESET default_transaction_read_only"),
            TERMINATE_OTHER_SESSIONS,
        ],
    )
    .await;
    until_handled(
        &consumer,
        2,
        "the event is handled once the database can write",
    )
    .await;
    stop(shutdown, task).await;

    assert_eq!(effects(&db, reserved.id).await, 1);
    let stats = consumer.stats();
    assert_eq!((stats.requeued, stats.dead_lettered), (0, 0));
    assert_eq!(s.broker.ready(&s.queue.dead_letter_queue()).await, 0);
    assert_eq!(s.broker.ready(&s.queue.name).await, 0);
}

#[tokio::test]
async fn a_backend_terminated_mid_statement_is_not_a_handler_failure() {
    let (s, test_db, db) = queue_and_service(2).await;
    let (pid_tx, pid_rx) = tokio::sync::mpsc::unbounded_channel::<i32>();
    let attempts = Arc::new(AtomicU32::new(0));
    let counter = attempts.clone();
    let consumer = s.consumer(&db).on(KIND, move |tx, event| {
        let (pid_tx, counter) = (pid_tx.clone(), counter.clone());
        Box::pin(async move {
            if counter.fetch_add(1, Ordering::SeqCst) == 0 {
                let pid: i32 = tx.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
                pid_tx.send(pid).unwrap();
                tx.execute("SELECT pg_sleep(60)", &[]).await?; // terminated here
            }
            record(tx, event).await
        })
    });
    let (shutdown, task) = start(&consumer);

    let reserved = event();
    s.publish(&reserved).await;
    let mut pid_rx = pid_rx;
    let pid = tokio::time::timeout(Duration::from_secs(10), pid_rx.recv())
        .await
        .expect("the handler starts")
        .unwrap();
    let terminated: bool = test_db
        .admin()
        .await
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap()
        .get(0);
    assert!(terminated);
    until_handled(&consumer, 1, "the event is handled on the next attempt").await;
    stop(shutdown, task).await;

    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    assert_eq!(effects(&db, reserved.id).await, 1);
    let stats = consumer.stats();
    assert_eq!(
        (
            stats.returned,
            stats.paused,
            stats.requeued,
            stats.dead_lettered
        ),
        (1, 1, 0, 0),
        "handed back and paused, not counted as a failure"
    );
    assert_eq!(s.broker.ready(&s.queue.dead_letter_queue()).await, 0);
}

#[tokio::test]
async fn failed_messages_waiting_to_be_retried_do_not_stall_healthy_ones() {
    // The test pool has 5 connections, so the consumer runs 5 handlers at once; ten failed
    // messages wait out an hour's pause before their redelivery.
    let (s, _test_db, db) = queue_and_service(5).await;
    let failures = Arc::new(AtomicU32::new(0));
    let counter = failures.clone();
    let consumer = s
        .consumer(&db)
        .on(KIND, move |tx, event| {
            let counter = counter.clone();
            Box::pin(async move {
                if event.payload["fail"] == json!(true) {
                    counter.fetch_add(1, Ordering::SeqCst);
                    return Err(HandlerError::msg("stock service rejects this product"));
                }
                record(tx, event).await
            })
        })
        .with_options(ConsumerOptions {
            retry_delay: Duration::from_secs(3600),
            max_retry_delay: Duration::from_secs(3600),
            ..fast()
        });
    assert!(db.config().pool_max < 10);
    let (shutdown, task) = start(&consumer);

    for _ in 0..10 {
        s.publish(&Envelope::new(KIND, "catalog", json!({ "fail": true })))
            .await;
    }
    eventually("all ten failed and wait for their redelivery", || async {
        failures.load(Ordering::SeqCst) == 10
    })
    .await;
    let healthy: Vec<Envelope> = (0..5).map(|_| event()).collect();
    for e in &healthy {
        s.publish(e).await;
    }
    until_handled(&consumer, 5, "the healthy events are handled meanwhile").await;
    // Shutdown cuts the pauses short; each failure still counts as one.
    stop(shutdown, task).await;

    for e in &healthy {
        assert_eq!(effects(&db, e.id).await, 1);
    }
    let stats = consumer.stats();
    assert_eq!((stats.requeued, stats.dead_lettered), (10, 0));
}

#[tokio::test]
async fn shutdown_waits_for_the_handler_in_flight() {
    let (s, _test_db, db) = queue_and_service(5).await;
    let started = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let (on_start, gate) = (started.clone(), release.clone());
    // Through the proxy, to see the consumer's basic.cancel on the wire.
    let (proxy, via_proxy) = common::proxied().await;
    let consumer = s.consumer_on(&via_proxy, &db).on(KIND, move |tx, event| {
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
    // The consumer acts on the shutdown (it cancels its basic.consume) while the handler is
    // parked on the gate; run() must not return meanwhile. Had it returned, it would have
    // aborted the handler, and the effect below would never be committed.
    let mut task = task;
    tokio::select! {
        returned = &mut task => panic!("run() returned while a handler was in flight: {returned:?}"),
        () = eventually("the consumer stops consuming", || async {
            proxy.sent(common::BASIC_CANCEL) == 1
        }) => {}
    }
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
    let (s, _test_db, db) = queue_and_service(5).await;
    let bare = s.consumer(&db);
    let e = bare.run(CancellationToken::new()).await.unwrap_err();
    assert!(matches!(e, svcdb_amqp::Error::Config { .. }), "{e}");

    let missing = QueueSpec::new(common::unique("never.declared"));
    let consumer = Consumer::new(&s.broker.config, db, &missing, "x")
        .on(KIND, |tx, event| Box::pin(record(tx, event)));
    let e = consumer.run(CancellationToken::new()).await.unwrap_err();
    let not_found = match &e {
        svcdb_amqp::Error::Amqp { cause, .. } => matches!(
            cause.kind(),
            lapin::ErrorKind::ProtocolError(amqp) if matches!(
                amqp.kind(),
                lapin::protocol::AMQPErrorKind::Soft(lapin::protocol::AMQPSoftError::NOTFOUND)
            )
        ),
        _ => false,
    };
    assert!(not_found, "the broker's NOT_FOUND: {e}");
    assert!(!e.is_connection_error());
}

#[tokio::test]
async fn the_consumer_reconnects_after_losing_the_broker() {
    let (s, _test_db, db) = queue_and_service(5).await;
    let (proxy, via_proxy) = common::proxied().await;
    let consumer = s
        .consumer_on(&via_proxy, &db)
        .on(KIND, |tx, event| Box::pin(record(tx, event)))
        .with_options(ConsumerOptions {
            reconnect_backoff: Duration::from_millis(20),
            max_reconnect_backoff: Duration::from_millis(200),
            ..fast()
        });
    let (shutdown, task) = start(&consumer);

    let first = event();
    s.publish(&first).await;
    until_handled(&consumer, 1, "the first event is handled").await;

    proxy.cut(); // the broker "restarts": the consumer's connection drops
    let second = event();
    s.publish(&second).await;
    until_handled(
        &consumer,
        2,
        "the second event is handled after reconnecting",
    )
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
    // Waiting before the start: a consumer that took deliveries before refusing would have
    // this one in hand.
    let reserved = event();
    s.publish(&reserved).await;
    let e = tokio::time::timeout(
        Duration::from_secs(30),
        consumer.run(CancellationToken::new()),
    )
    .await
    .expect("run() refuses instead of consuming")
    .unwrap_err();
    assert!(
        matches!(&e, svcdb_amqp::Error::Db(svcdb::Error::MissingTables { tables, .. }) if tables == &["svcdb_processed_events"]),
        "{e}"
    );
    // Nothing was consumed: the message is still there, never delivered.
    let waiting = s
        .broker
        .take(&s.queue.name, 1, Duration::from_secs(10))
        .await;
    assert_eq!(waiting.len(), 1);
    assert!(
        !waiting[0].redelivered,
        "the consumer took it before refusing"
    );
    assert_eq!(consumer.stats(), svcdb_amqp::ConsumerStats::default());
}

#[tokio::test]
async fn a_handler_still_running_at_the_shutdown_timeout_is_aborted_and_redelivered() {
    let (s, _test_db, db) = queue_and_service(5).await;
    let started = Arc::new(Notify::new());
    let on_start = started.clone();
    // Writes its effect, then never finishes: only the shutdown timeout can end it.
    let consumer = s
        .consumer(&db)
        .on(KIND, move |tx, event| {
            let on_start = on_start.clone();
            Box::pin(async move {
                record(tx, event).await?;
                on_start.notify_one();
                std::future::pending::<()>().await;
                Ok(())
            })
        })
        .with_options(ConsumerOptions {
            shutdown_timeout: Duration::from_millis(300),
            ..fast()
        });
    let (shutdown, task) = start(&consumer);

    let reserved = event();
    s.publish(&reserved).await;
    tokio::time::timeout(Duration::from_secs(10), started.notified())
        .await
        .expect("the handler starts");
    // Without the abort, run() would wait for the handler forever.
    stop(shutdown, task).await;

    // The aborted handler's transaction rolled back, claim and effect alike, and the
    // unacknowledged message went back to the queue when the channel closed.
    assert_eq!(effects(&db, reserved.id).await, 0);
    assert!(!claimed(&db, reserved.id).await);
    let back = s
        .broker
        .take(&s.queue.name, 1, Duration::from_secs(10))
        .await;
    assert_eq!(Envelope::from_slice(&back[0].data).unwrap(), reserved);
    assert!(back[0].redelivered);
    let stats = consumer.stats();
    assert_eq!(
        (stats.handled, stats.requeued, stats.dead_lettered),
        (0, 0, 0)
    );
}

#[tokio::test]
async fn a_permanent_handler_error_is_dead_lettered_on_the_first_delivery() {
    let (s, _test_db, db) = queue_and_service(5).await;
    let attempts = Arc::new(AtomicU32::new(0));
    let counter = attempts.clone();
    let consumer = s.consumer(&db).on(KIND, move |tx, event| {
        let counter = counter.clone();
        Box::pin(async move {
            counter.fetch_add(1, Ordering::SeqCst);
            record(tx, event).await?;
            Err(HandlerError::permanent(HandlerError::msg(
                "product abc123 was discontinued",
            )))
        })
    });
    let (shutdown, task) = start(&consumer);

    let reserved = event();
    s.publish(&reserved).await;
    let dead = s.dead_letters(1).await;
    stop(shutdown, task).await;

    assert_eq!(Envelope::from_slice(&dead[0].data).unwrap(), reserved);
    assert_eq!(
        header(&dead[0], "x-svcdb-deliveries").as_deref(),
        Some("1"),
        "no retries for a permanent error"
    );
    let reason = header(&dead[0], "x-svcdb-reason").unwrap();
    assert!(
        reason.contains("was discontinued"),
        "the handler's error: {reason}"
    );
    assert_eq!(attempts.load(Ordering::SeqCst), 1);
    assert_eq!(
        effects(&db, reserved.id).await,
        0,
        "the attempt rolled back"
    );
    assert!(!claimed(&db, reserved.id).await);
    assert_eq!(s.broker.ready(&s.queue.name).await, 0);
    let stats = consumer.stats();
    assert_eq!(
        (stats.requeued, stats.dead_lettered, stats.handled),
        (0, 1, 0)
    );
}

/// The most handlers a consumer with `prefetch` over a pool of `pool_max` runs at once, with
/// more deliveries in hand than either: every handler waits until the test has seen the
/// consumer hold all it may, and the pool is asked for no more connections than it has.
async fn handlers_at_once(prefetch: u16, pool_max: usize) -> usize {
    let (s, test_db, _) = queue_and_service(5).await;
    let mut config = test_db.config("svc");
    config.pool_max = pool_max;
    // Short, so a handler queued on the pool instead of on the consumer would fail.
    config.acquire_timeout = Duration::from_millis(500);
    let db = ServiceDb::connect(config).await.unwrap();
    let mut amqp = s.broker.config.clone();
    amqp.prefetch = prefetch;

    let in_flight = Arc::new(AtomicU32::new(0));
    let most = Arc::new(AtomicU32::new(0));
    let release = CancellationToken::new();
    let (counter, peak, gate) = (in_flight.clone(), most.clone(), release.clone());
    let consumer = s.consumer_on(&amqp, &db).on(KIND, move |tx, event| {
        let (counter, peak, gate) = (counter.clone(), peak.clone(), gate.clone());
        Box::pin(async move {
            let now = counter.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            gate.cancelled().await;
            counter.fetch_sub(1, Ordering::SeqCst);
            record(tx, event).await
        })
    });
    // A handler per delivery at once (batch 1): the bound is on transactions.
    let consumer = consumer.with_options(ConsumerOptions { batch: 1, ..fast() });
    let (shutdown, task) = start(&consumer);

    let total = usize::from(prefetch).max(pool_max) + 2;
    for _ in 0..total {
        s.publish(&event()).await;
    }
    let bound = usize::from(prefetch).min(pool_max);
    let held = u32::try_from(total - usize::from(prefetch)).unwrap();
    eventually(
        "the consumer holds a full prefetch and runs its handlers",
        || async {
            s.broker.ready(&s.queue.name).await == held
                && in_flight.load(Ordering::SeqCst) as usize == bound
        },
    )
    .await;
    // Deliveries beyond the bound wait for a permit, not for a pool connection.
    let pool = db.status();
    assert_eq!(pool.waiting, 0, "{pool:?}");
    release.cancel();
    until_handled(&consumer, total as u64, "every message is handled").await;
    stop(shutdown, task).await;

    assert_eq!(db.status().acquire_timeouts, 0);
    let stats = consumer.stats();
    assert_eq!((stats.requeued, stats.returned, stats.paused), (0, 0, 0));
    most.load(Ordering::SeqCst) as usize
}

#[tokio::test]
async fn handlers_run_at_most_the_pool_size_at_once_when_the_prefetch_is_larger() {
    assert_eq!(handlers_at_once(8, 3).await, 3);
}

#[tokio::test]
async fn handlers_run_at_most_the_prefetch_at_once_when_the_pool_is_larger() {
    assert_eq!(handlers_at_once(2, 5).await, 2);
}

/// The `reason` of each entry of the `x-death` header the broker puts on a dead letter.
fn death_reasons(delivery: &lapin::message::Delivery) -> Vec<String> {
    let headers = delivery.properties.headers();
    let Some(lapin::types::AMQPValue::FieldArray(deaths)) =
        headers.as_ref().and_then(|h| h.inner().get("x-death"))
    else {
        return Vec::new();
    };
    deaths
        .as_slice()
        .iter()
        .filter_map(|death| match death {
            lapin::types::AMQPValue::FieldTable(t) => match t.inner().get("reason") {
                Some(lapin::types::AMQPValue::LongString(s)) => {
                    Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                }
                _ => None,
            },
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_consumer_that_dies_mid_handler_every_time_meets_the_brokers_delivery_limit() {
    // The handler never fails in the consumer's eyes: the connection dies under it each time,
    // as when the process crashes. Only the quorum queue's x-delivery-limit can stop the
    // redeliveries.
    let (s, _test_db, db) = queue_and_service(3).await;
    let (proxy, via_proxy) = common::proxied().await;
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel::<()>();
    let consumer = s
        .consumer_on(&via_proxy, &db)
        .on(KIND, move |tx, event| {
            let started_tx = started_tx.clone();
            Box::pin(async move {
                record(tx, event).await?;
                started_tx.send(()).unwrap();
                std::future::pending::<()>().await;
                Ok(())
            })
        })
        .with_options(ConsumerOptions {
            // Each lost connection ends the stuck handler quickly, as a crash would.
            shutdown_timeout: Duration::from_millis(100),
            reconnect_backoff: Duration::from_millis(20),
            max_reconnect_backoff: Duration::from_millis(200),
            ..fast()
        });
    let (shutdown, task) = start(&consumer);

    let reserved = event();
    s.publish(&reserved).await;
    for delivery in 1..=s.queue.max_deliveries {
        tokio::time::timeout(Duration::from_secs(30), started.recv())
            .await
            .unwrap_or_else(|_| panic!("delivery {delivery} reaches the handler"));
        proxy.cut();
    }
    let dead = s
        .broker
        .take(&s.queue.dead_letter_queue(), 1, Duration::from_secs(30))
        .await;
    stop(shutdown, task).await;

    assert_eq!(Envelope::from_slice(&dead[0].data).unwrap(), reserved);
    assert_eq!(death_reasons(&dead[0]), ["delivery_limit"]);
    assert_eq!(
        header(&dead[0], "x-svcdb-reason"),
        None,
        "dead-lettered by the broker, not the consumer"
    );
    assert!(
        started.try_recv().is_err(),
        "no delivery beyond the limit reached the handler"
    );
    assert_eq!(effects(&db, reserved.id).await, 0);
    assert!(!claimed(&db, reserved.id).await);
    assert_eq!(s.broker.ready(&s.queue.name).await, 0);
    let stats = consumer.stats();
    assert_eq!((stats.handled, stats.dead_lettered), (0, 0));
}

/// Found by a user trial: a replay cut off part-way (the broker stopped) said only what
/// failed, not how many messages had already moved. Here the broker goes silent at the first
/// message's removal from the dead-letter queue: the replay ends within its bound, naming the
/// one moved; the control, with the broker answering, moves both.
#[tokio::test]
async fn a_replay_stopped_part_way_says_how_many_moved() {
    let s = setup(5).await;
    for _ in 0..2 {
        let envelope = event();
        s.broker
            .publish_with(
                "",
                &s.queue.dead_letter_queue(),
                &envelope.to_json_bytes(),
                svcdb_amqp::publish::envelope_properties(&envelope),
            )
            .await;
    }
    let (proxy, amqp) = common::proxied().await;
    proxy.freeze_at(common::BASIC_ACK);
    let err = svcdb_amqp::replay_dead_letters(&amqp, &s.queue.name, None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, svcdb_amqp::Error::ReplayStopped { replayed: 1, .. }),
        "{err}"
    );
    drop(proxy);
    // The message whose removal never reached the broker is back in the dead-letter queue
    // (and its copy in the queue: a duplicate the claims absorb), once the broker has seen the
    // proxied connection close: waited for, as it takes a moment on a loaded machine (the
    // replay below once found only the other message).
    let dlq = s.queue.dead_letter_queue();
    eventually("both messages back in the dead-letter queue", || async {
        s.broker.ready(&dlq).await == 2
    })
    .await;
    let report = svcdb_amqp::replay_dead_letters(&s.broker.config, &s.queue.name, None)
        .await
        .unwrap();
    assert_eq!(report.replayed, 2, "{report:?}");
    assert_eq!(s.broker.ready(&s.queue.name).await, 3);
}
