//! The outbox relay against the real RabbitMQ and PostgreSQL.

use crate::common;

use std::str::FromStr;
use std::time::Duration;

use common::{closed_port, effects, eventually, service, url_via, Broker, Proxy};
use serde_json::json;
use svcdb::outbox::{self, PublishRetry};
use svcdb::testing::TestDb;
use svcdb::{Envelope, Outbox, ServiceDb};
use svcdb_amqp::topology::{QueueSpec, Topology};
use svcdb_amqp::{AmqpConfig, Consumer, ConsumerOptions, Relay, RelayConfig, RelayStatus, Result};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Quick polling and reconnection, so tests take milliseconds.
pub(crate) fn fast() -> RelayConfig {
    RelayConfig {
        poll_interval: Duration::from_millis(20),
        reconnect_backoff: Duration::from_millis(20),
        max_reconnect_backoff: Duration::from_millis(200),
        ..RelayConfig::default()
    }
}

/// Retries of failed rows after 20 ms instead of 1 s.
pub(crate) fn fast_outbox(db: &ServiceDb) -> Outbox {
    Outbox::new(db.clone()).with_publish_retry(PublishRetry {
        retry_backoff: Duration::from_millis(20),
        max_retry_backoff: Duration::from_millis(100),
    })
}

pub(crate) struct Running {
    shutdown: CancellationToken,
    task: JoinHandle<Result<RelayStatus>>,
    pub(crate) status: watch::Receiver<RelayStatus>,
}

fn start(amqp: &AmqpConfig, outbox: Outbox) -> Running {
    start_with(amqp, outbox, fast())
}

pub(crate) fn start_with(amqp: &AmqpConfig, outbox: Outbox, config: RelayConfig) -> Running {
    let relay = Relay::new(amqp, outbox).with_config(config);
    let status = relay.status();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { relay.run(shutdown).await }
    });
    Running {
        shutdown,
        task,
        status,
    }
}

impl Running {
    /// Waits up to 10 s for the relay's status to meet `condition`.
    async fn until(&self, what: &str, condition: impl FnMut(&RelayStatus) -> bool) {
        let mut status = self.status.clone();
        tokio::time::timeout(Duration::from_secs(10), status.wait_for(condition))
            .await
            .unwrap_or_else(|_| panic!("timed out after 10 s waiting for: {what}"))
            .unwrap();
    }

    pub(crate) async fn stop(self) -> RelayStatus {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the relay stops within 10 s")
            .unwrap()
            .unwrap()
    }
}

pub(crate) async fn enqueue(db: &ServiceDb, exchange: &str, routing_key: &str, event: &Envelope) {
    let (exchange, routing_key, event) =
        (exchange.to_owned(), routing_key.to_owned(), event.clone());
    db.transaction(async move |tx| {
        tx.execute(
            "INSERT INTO effects (event_id, note) VALUES ($1, 'order placed')",
            &[&event.id],
        )
        .await?;
        outbox::enqueue(tx, &exchange, &routing_key, &event).await
    })
    .await
    .unwrap();
}

pub(crate) async fn pending(db: &ServiceDb) -> u64 {
    Outbox::new(db.clone()).pending_count().await.unwrap()
}

/// Waits until no row of the outbox is pending.
async fn until_published(db: &ServiceDb, what: &str) {
    eventually(what, || async { pending(db).await == 0 }).await;
}

/// The real broker, and the service's database (with the `effects` table) the relay reads.
async fn broker_and_service() -> (Broker, TestDb, ServiceDb) {
    common::init_tracing();
    let broker = Broker::new().await;
    let (test_db, db) = service().await;
    (broker, test_db, db)
}

/// An exchange for the service and a plain queue bound to all of it.
pub(crate) async fn exchange_and_queue(broker: &Broker) -> (String, QueueSpec) {
    let exchange = common::unique("orders.events");
    let queue = QueueSpec::new(common::unique("audit")).bind(&exchange, "#");
    broker
        .declare(Topology::new().exchange(&exchange).queue(queue.clone()))
        .await;
    (exchange, queue)
}

#[tokio::test]
async fn an_event_for_the_predefined_amq_topic_exchange_is_published() {
    let (broker, _test_db, db) = broker_and_service().await;
    // This test's own queue, bound to RabbitMQ's amq.topic by hand: a Topology declares the
    // exchanges it binds to, and declaring an `amq.` name is refused. Publishing to one is not.
    let queue = QueueSpec::new(common::unique("audit"));
    broker.declare(Topology::new().queue(queue.clone())).await;
    let routing_key = common::unique("order.placed");
    let channel = broker.channel().await;
    channel
        .queue_bind(
            queue.name.as_str().into(),
            "amq.topic".into(),
            routing_key.as_str().into(),
            lapin::options::QueueBindOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = channel.close(200, "OK".into()).await;
    let relay = start(&broker.config, fast_outbox(&db));

    let placed = Envelope::new("OrderPlaced", "orders", json!({ "order_id": 8 }));
    enqueue(&db, "amq.topic", &routing_key, &placed).await;
    let got = broker.take(&queue.name, 1, Duration::from_secs(10)).await;
    until_published(&db, "the row is marked published").await;
    relay.stop().await;

    assert_eq!(got.len(), 1);
    assert_eq!(Envelope::from_slice(&got[0].data).unwrap(), placed);
}

#[tokio::test]
async fn committed_events_are_published_with_their_properties() {
    let (broker, _test_db, db) = broker_and_service().await;
    let (exchange, queue) = exchange_and_queue(&broker).await;
    let relay = start(&broker.config, fast_outbox(&db));

    let placed = Envelope::new("OrderPlaced", "orders", json!({ "order_id": 7 }));
    enqueue(&db, &exchange, "order.placed", &placed).await;
    let got = broker.take(&queue.name, 1, Duration::from_secs(10)).await;
    until_published(&db, "the row is marked published").await;
    let status = relay.stop().await;

    assert_eq!(got.len(), 1);
    let message = &got[0];
    assert_eq!(Envelope::from_slice(&message.data).unwrap(), placed);
    assert_eq!(message.routing_key.as_str(), "order.placed");
    let p = &message.properties;
    assert_eq!(
        p.message_id().as_ref().map(|s| s.to_string()),
        Some(placed.id.to_string())
    );
    assert_eq!(
        p.content_type().as_ref().map(|s| s.to_string()).as_deref(),
        Some("application/json")
    );
    assert_eq!(*p.delivery_mode(), Some(2));
    assert_eq!(
        p.kind().as_ref().map(|s| s.to_string()).as_deref(),
        Some("OrderPlaced")
    );
    assert_eq!(
        p.app_id().as_ref().map(|s| s.to_string()).as_deref(),
        Some("orders")
    );
    assert_eq!(
        (status.published, status.failed, status.consecutive_errors),
        (1, 0, 0)
    );
    assert!(!status.connected, "closed at shutdown");
}

#[tokio::test]
async fn a_rolled_back_transaction_publishes_nothing() {
    let (broker, _test_db, db) = broker_and_service().await;
    let (exchange, queue) = exchange_and_queue(&broker).await;
    let relay = start(&broker.config, fast_outbox(&db));

    let abandoned = Envelope::new("OrderPlaced", "orders", json!({ "order_id": 1 }));
    let (x, e) = (exchange.clone(), abandoned.clone());
    let outcome = db
        .transaction(async move |tx| {
            outbox::enqueue(tx, &x, "order.placed", &e).await?;
            Err::<(), _>(svcdb::Error::Config {
                key: "test".into(),
                message: "card declined".into(),
            })
        })
        .await;
    assert!(
        matches!(&outcome, Err(svcdb::Error::Config { message, .. }) if message == "card declined"),
        "{outcome:?}"
    );
    assert_eq!(pending(&db).await, 0);

    // A committed event behind it: once it arrives, the abandoned one had its chance.
    let placed = Envelope::new("OrderPlaced", "orders", json!({ "order_id": 2 }));
    enqueue(&db, &exchange, "order.placed", &placed).await;
    let got = broker.take(&queue.name, 1, Duration::from_secs(10)).await;
    let status = relay.stop().await;

    let ids: Vec<_> = got
        .iter()
        .map(|m| Envelope::from_slice(&m.data).unwrap().id)
        .collect();
    assert_eq!(ids, vec![placed.id]);
    assert_eq!(broker.ready(&queue.name).await, 0);
    assert_eq!(status.published, 1);
}

#[tokio::test]
async fn the_relay_keeps_rows_while_the_broker_is_unreachable_and_publishes_after_reconnecting() {
    let (broker, _test_db, db) = broker_and_service().await;
    let (exchange, queue) = exchange_and_queue(&broker).await;
    let port = closed_port();
    let relay = start(&AmqpConfig::new(url_via(port)), fast_outbox(&db));

    let first = Envelope::new("OrderPlaced", "orders", json!({ "order_id": 1 }));
    enqueue(&db, &exchange, "order.placed", &first).await;
    relay
        .until("the relay reports its failed connection attempts", |s| {
            s.consecutive_errors >= 2
        })
        .await;
    let reported = relay.status.borrow().clone();
    let error = reported.last_error.clone().unwrap();
    assert!(
        error.contains("cannot reach RabbitMQ") && error.contains(&format!("127.0.0.1:{port}")),
        "{error}"
    );
    let password = lapin::uri::AMQPUri::from_str(&common::amqp_url())
        .unwrap()
        .authority
        .userinfo
        .password;
    assert!(
        !error.contains(&format!(":{password}@")),
        "the password leaked: {error}"
    );
    assert!(!reported.connected);
    // Not claimed while there is no broker: still pending, and not counted as a failed attempt.
    assert_eq!(pending(&db).await, 1);
    let attempts: i32 = db
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT attempts FROM svcdb_outbox WHERE id = $1",
            &[&first.id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(attempts, 0);

    // The broker "comes up".
    let proxy = Proxy::start(port).await;
    let got = broker.take(&queue.name, 1, Duration::from_secs(10)).await;
    assert_eq!(Envelope::from_slice(&got[0].data).unwrap().id, first.id);
    until_published(&db, "the first row is marked published").await;
    assert!(relay.status.borrow().connected);

    // The connection drops; the next event still gets through once the relay reconnects.
    proxy.cut();
    let second = Envelope::new("OrderPlaced", "orders", json!({ "order_id": 2 }));
    enqueue(&db, &exchange, "order.placed", &second).await;
    let got = broker.take(&queue.name, 1, Duration::from_secs(10)).await;
    assert_eq!(Envelope::from_slice(&got[0].data).unwrap().id, second.id);
    until_published(&db, "the second row is marked published").await;

    let status = relay.stop().await;
    assert_eq!(status.published, 2);
    drop(proxy);
}

#[tokio::test]
async fn unroutable_events_stay_in_the_outbox_until_a_queue_is_bound() {
    let (broker, _test_db, db) = broker_and_service().await;
    let exchange = common::unique("orders.events");
    broker.declare(Topology::new().exchange(&exchange)).await;
    let relay = start(&broker.config, fast_outbox(&db));

    let placed = Envelope::new("OrderPlaced", "orders", json!({ "order_id": 3 }));
    enqueue(&db, &exchange, "order.placed", &placed).await;
    eventually("the publish is reported as failed", || async {
        relay.status.borrow().failed >= 1
    })
    .await;
    let reported = relay.status.borrow().last_error.clone().unwrap();
    assert!(reported.contains("no queue is bound"), "{reported}");
    let last_error: Option<String> = db
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT last_error FROM svcdb_outbox WHERE id = $1",
            &[&placed.id],
        )
        .await
        .unwrap()
        .get(0);
    let last_error = last_error.unwrap();
    assert!(
        last_error.contains("no queue is bound") && last_error.contains("NO_ROUTE"),
        "{last_error}"
    );
    assert_eq!(pending(&db).await, 1);

    let queue = QueueSpec::new(common::unique("late")).bind(&exchange, "order.*");
    broker.declare(Topology::new().queue(queue.clone())).await;
    let got = broker.take(&queue.name, 1, Duration::from_secs(10)).await;
    assert_eq!(Envelope::from_slice(&got[0].data).unwrap().id, placed.id);
    until_published(&db, "the row is marked published").await;
    relay.stop().await;
}

#[tokio::test]
async fn an_event_enqueued_by_a_handler_is_relayed_and_consumed_downstream() {
    let (broker, _test_db, db) = broker_and_service().await;
    // catalog.events → orders.reserve-stock (handler enqueues OrderConfirmed in its tx)
    // orders.events  → orders.audit (records OrderConfirmed)
    let catalog = common::unique("catalog.events");
    let orders = common::unique("orders.events");
    let reserve = QueueSpec::new(common::unique("orders.reserve")).bind(&catalog, "product.#");
    let audit = QueueSpec::new(common::unique("orders.audit")).bind(&orders, "order.#");
    broker
        .declare(
            Topology::new()
                .exchange(&catalog)
                .exchange(&orders)
                .queue(reserve.clone())
                .queue(audit.clone()),
        )
        .await;

    let options = ConsumerOptions {
        retry_delay: Duration::from_millis(10),
        ..ConsumerOptions::default()
    };
    let downstream = orders.clone();
    let reserving = Consumer::new(&broker.config, db.clone(), &reserve, "orders.reserve-stock")
        .on("ProductStockReserved", move |tx, event| {
            let exchange = downstream.clone();
            Box::pin(async move {
                tx.execute(
                    "INSERT INTO effects (event_id, note) VALUES ($1, 'reserved')",
                    &[&event.id],
                )
                .await?;
                let confirmed = Envelope::new("OrderConfirmed", "orders", json!({ "order_id": 9 }))
                    .caused_by(event);
                outbox::enqueue(tx, &exchange, "order.confirmed", &confirmed).await?;
                Ok(())
            })
        })
        .with_options(options.clone());
    let auditing = Consumer::new(&broker.config, db.clone(), &audit, "orders.audit")
        .on("OrderConfirmed", |tx, event| {
            Box::pin(async move {
                tx.execute(
                    "INSERT INTO effects (event_id, note) VALUES ($1, $2)",
                    &[&event.id, &event.causation_id.map(|c| c.to_string())],
                )
                .await?;
                Ok(())
            })
        })
        .with_options(options);
    let shutdown = CancellationToken::new();
    let tasks: Vec<JoinHandle<Result<()>>> = [reserving.clone(), auditing.clone()]
        .into_iter()
        .map(|c| {
            let s = shutdown.clone();
            tokio::spawn(async move { c.run(s).await })
        })
        .collect();
    let relay = start(&broker.config, fast_outbox(&db));

    let reserved = Envelope::new(
        "ProductStockReserved",
        "catalog",
        json!({ "product_id": "abc123" }),
    );
    broker
        .publish(&catalog, "product.stock.reserved", &reserved)
        .await;
    eventually("the downstream consumer handled OrderConfirmed", || async {
        auditing.stats().handled == 1
    })
    .await;

    relay.stop().await;
    shutdown.cancel();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert_eq!(effects(&db, reserved.id).await, 1);
    let caused: i64 = db
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FROM effects WHERE note = $1",
            &[&reserved.id.to_string()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        caused, 1,
        "OrderConfirmed arrived once, caused by ProductStockReserved"
    );
    assert_eq!(pending(&db).await, 0);
}

#[tokio::test]
async fn a_service_without_the_outbox_table_is_refused_at_start() {
    let broker = Broker::new().await;
    let test_db = svcdb::testing::TestDb::new().await;
    let db = test_db.service("bare").await; // no install_outbox
    let relay = Relay::new(&broker.config, Outbox::new(db));
    let e = relay.run(CancellationToken::new()).await.unwrap_err();
    assert!(matches!(e, svcdb_amqp::Error::Config { .. }), "{e}");
    assert!(e.to_string().contains("install_outbox"), "{e}");
}

#[tokio::test]
async fn a_missing_exchange_fails_its_row_and_the_relay_carries_on() {
    let (broker, _test_db, db) = broker_and_service().await;
    let (exchange, queue) = exchange_and_queue(&broker).await;
    let relay = start(&broker.config, fast_outbox(&db));

    // Publishing to an exchange that does not exist closes the relay's channel (NOT_FOUND).
    let lost = Envelope::new("OrderPlaced", "orders", json!({ "order_id": 4 }));
    enqueue(
        &db,
        &common::unique("never.declared"),
        "order.placed",
        &lost,
    )
    .await;
    eventually("the publish is reported as failed", || async {
        relay.status.borrow().failed >= 1
    })
    .await;
    let reported = relay.status.borrow().last_error.clone().unwrap();
    assert!(reported.contains("NOT_FOUND"), "{reported}");

    // A new channel carries the next event.
    let placed = Envelope::new("OrderPlaced", "orders", json!({ "order_id": 5 }));
    enqueue(&db, &exchange, "order.placed", &placed).await;
    let got = broker.take(&queue.name, 1, Duration::from_secs(10)).await;
    assert_eq!(Envelope::from_slice(&got[0].data).unwrap().id, placed.id);
    let status = relay.stop().await;
    assert_eq!(status.published, 1);
    assert_eq!(
        pending(&db).await,
        1,
        "the row for the missing exchange waits for it"
    );
}

/// `(attempts, last_error, published)` of the row for `event`.
async fn row(db: &ServiceDb, event: &Envelope) -> (i32, Option<String>, bool) {
    let row = db
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT attempts, last_error, published_at IS NOT NULL FROM svcdb_outbox WHERE id = $1",
            &[&event.id],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

#[tokio::test]
async fn a_row_for_a_missing_exchange_does_not_fail_the_rest_of_its_batch() {
    let (broker, _test_db, db) = broker_and_service().await;
    let (exchange, queue) = exchange_and_queue(&broker).await;
    // One batch, in id order: a good row, the bad one, three more good ones. The bad row's
    // publish closes the channel (NOT_FOUND) while the rows after it are in flight.
    let good: Vec<Envelope> = (0..4)
        .map(|n| Envelope::new("OrderPlaced", "orders", json!({ "order_id": n })))
        .collect();
    let bad = Envelope::new("OrderPlaced", "orders", json!({ "order_id": 99 }));
    enqueue(&db, &exchange, "order.placed", &good[0]).await;
    enqueue(&db, &common::unique("never.declared"), "order.placed", &bad).await;
    for event in &good[1..] {
        enqueue(&db, &exchange, "order.placed", event).await;
    }
    // Failed rows retried only after a minute: what is published, is published in the run
    // that first claimed it.
    let outbox = Outbox::new(db.clone()).with_publish_retry(PublishRetry {
        retry_backoff: Duration::from_secs(60),
        max_retry_backoff: Duration::from_secs(60),
    });
    let relay = start(&broker.config, outbox);

    let got = broker.take(&queue.name, 4, Duration::from_secs(10)).await;
    eventually("the good rows are marked published", || async {
        pending(&db).await == 1
    })
    .await;
    let status = relay.stop().await;

    let mut ids: Vec<_> = got
        .iter()
        .map(|m| Envelope::from_slice(&m.data).unwrap().id)
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids, good.iter().map(|e| e.id).collect::<Vec<_>>());
    for event in &good {
        assert_eq!(
            row(&db, event).await,
            (1, None, true),
            "published on the first attempt, never failed"
        );
    }
    let (attempts, error, published) = row(&db, &bad).await;
    assert_eq!((attempts, published), (1, false));
    assert!(error.unwrap().contains("NOT_FOUND"));
    assert_eq!((status.published, status.failed), (4, 1));
}

/// True while a transaction (a relay's batch) holds a row of the outbox: `FOR UPDATE NOWAIT`
/// fails with 55P03 on it.
async fn row_locked(db: &ServiceDb) -> bool {
    let conn = db.get().await.unwrap();
    conn.batch_execute("BEGIN").await.unwrap();
    let locked = conn
        .query("SELECT id FROM svcdb_outbox FOR UPDATE NOWAIT", &[])
        .await;
    conn.batch_execute("ROLLBACK").await.unwrap();
    match locked {
        Ok(_) => false,
        Err(e) if e.code() == Some(&svcdb::SqlState::LOCK_NOT_AVAILABLE) => true,
        Err(e) => panic!("{e}"),
    }
}

/// Fails unless no row of the outbox is locked.
async fn assert_no_row_locked(db: &ServiceDb) {
    assert!(!row_locked(db).await, "a row is still locked");
}

#[tokio::test]
async fn a_silent_broker_neither_hangs_the_relay_nor_its_shutdown() {
    let (broker, _test_db, db) = broker_and_service().await;
    let (exchange, queue) = exchange_and_queue(&broker).await;
    let (proxy, via_proxy) = common::proxied().await;
    let timeout = Duration::from_secs(3);
    let config = RelayConfig {
        confirm_timeout: timeout,
        ..fast()
    };
    let relay = start_with(&via_proxy, fast_outbox(&db), config);

    let first = Envelope::new("OrderPlaced", "orders", json!({ "order_id": 1 }));
    enqueue(&db, &exchange, "order.placed", &first).await;
    broker.take(&queue.name, 1, Duration::from_secs(10)).await;
    until_published(&db, "the first row is marked published").await;

    // The broker goes silent, the TCP connection stays open.
    proxy.silence();
    let second = Envelope::new("OrderPlaced", "orders", json!({ "order_id": 2 }));
    enqueue(&db, &exchange, "order.placed", &second).await;
    // Shut down while the batch waits on the broker: the row is claimed (locked).
    eventually("the relay claims the row", || async {
        row_locked(&db).await
    })
    .await;
    relay.shutdown.cancel();
    // The bound is the behaviour: the batch in progress and closing the connection share one
    // confirm timeout. Half of one more is slack for a loaded machine, and still tells one
    // shared timeout from two in a row.
    let bound = timeout + timeout / 2;
    let stopped = tokio::time::timeout(bound, relay.task)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the relay did not stop within {bound:?} of the shutdown signal (confirm timeout {timeout:?})"
            )
        });
    let last = stopped.unwrap().unwrap();
    assert_eq!(last.published, 1);
    assert_eq!(pending(&db).await, 1, "the row stays for the next run");
    assert_no_row_locked(&db).await;

    // The next run, on a broker that answers, publishes it.
    proxy.resume();
    let relay = start(&broker.config, fast_outbox(&db));
    let got = broker.take(&queue.name, 1, Duration::from_secs(10)).await;
    assert_eq!(Envelope::from_slice(&got[0].data).unwrap().id, second.id);
    until_published(&db, "the second row is marked published").await;
    relay.stop().await;
}

#[tokio::test]
async fn a_blocked_connection_is_reported_and_its_rows_wait_until_unblocked() {
    let (broker, _test_db, db) = broker_and_service().await;
    let (exchange, queue) = exchange_and_queue(&broker).await;
    let (proxy, via_proxy) = common::proxied().await;
    let timeout = Duration::from_millis(200);
    let config = RelayConfig {
        confirm_timeout: timeout,
        ..fast()
    };
    let relay = start_with(&via_proxy, fast_outbox(&db), config);
    relay.until("the relay connects", |s| s.connected).await;

    proxy.block("low on memory");
    relay
        .until("the relay reports the blocked connection", |s| {
            s.blocked.is_some()
        })
        .await;
    assert_eq!(
        relay.status.borrow().blocked.as_deref(),
        Some("low on memory")
    );
    let event = Envelope::new("OrderPlaced", "orders", json!({ "order_id": 1 }));
    enqueue(&db, &exchange, "order.placed", &event).await;
    // Not claimed while blocked. The window is five confirm timeouts: a relay that claimed
    // the row would have had its publish time out, and the row counted as failed, in it.
    tokio::time::sleep(5 * timeout).await;
    assert_eq!(row(&db, &event).await, (0, None, false), "not attempted");
    assert_eq!(relay.status.borrow().failed, 0);
    assert_no_row_locked(&db).await;

    proxy.resume();
    let got = broker.take(&queue.name, 1, Duration::from_secs(10)).await;
    assert_eq!(Envelope::from_slice(&got[0].data).unwrap().id, event.id);
    until_published(&db, "the row is marked published").await;
    assert_eq!(relay.status.borrow().blocked, None, "unblocked");
    let last = relay.stop().await;
    assert_eq!(
        row(&db, &event).await,
        (1, None, true),
        "published on its first attempt"
    );
    assert_eq!((last.published, last.failed), (1, 0));
}

/// Holds every relay's marking of its batch while closed: a trigger on `svcdb_outbox` takes
/// an advisory lock that the gate's own session holds. The relay marks rows only after the
/// broker confirmed them, so a relay waiting here is inside the window between the confirm
/// and the commit, for as long as the test needs.
struct CommitGate {
    /// The session holding the lock.
    conn: svcdb::DedicatedConn,
}

/// The advisory lock key of the [`CommitGate`]; advisory locks are per database, and each
/// test has its own.
const GATE_KEY: i64 = 0x5ec_0b0;

impl CommitGate {
    /// Closes the gate on the outbox of `common::service`'s schema.
    async fn close(test_db: &svcdb::testing::TestDb) -> Self {
        let conn = test_db.admin().await;
        conn.batch_execute(&format!(
            "CREATE FUNCTION svc.commit_gate() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN PERFORM pg_advisory_xact_lock({GATE_KEY}); RETURN NULL; END $$;
             CREATE TRIGGER commit_gate BEFORE UPDATE ON svc.svcdb_outbox
                FOR EACH STATEMENT EXECUTE FUNCTION svc.commit_gate();
             SELECT pg_advisory_lock({GATE_KEY});"
        ))
        .await
        .unwrap();
        Self { conn }
    }

    /// Waits until a relay's marking waits at the gate, and returns that backend's pid.
    async fn waiting(&self) -> i32 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let waiting = self
                .conn
                .query_opt(
                    "SELECT pid FROM pg_stat_activity
                      WHERE datname = current_database() AND wait_event = 'advisory'
                        AND query LIKE 'UPDATE svcdb_outbox SET published_at%'
                      LIMIT 1",
                    &[],
                )
                .await
                .unwrap();
            if let Some(row) = waiting {
                return row.get(0);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no relay marked its batch within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// How many relay transactions wait at the gate to mark their batch now.
    async fn marking(&self) -> i64 {
        self.conn
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND wait_event = 'advisory'
                    AND query LIKE 'UPDATE svcdb_outbox SET published_at%'",
                &[],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// Lets every marking through.
    async fn open(&self) {
        self.conn
            .execute("SELECT pg_advisory_unlock($1)", &[&GATE_KEY])
            .await
            .unwrap();
    }
}

/// The ids of `messages`' envelopes.
fn ids(messages: &[lapin::message::Delivery]) -> Vec<uuid::Uuid> {
    messages
        .iter()
        .map(|m| Envelope::from_slice(&m.data).unwrap().id)
        .collect()
}

#[tokio::test]
async fn a_relay_that_dies_between_the_confirm_and_its_commit_publishes_the_event_again() {
    let (broker, test_db, db) = broker_and_service().await;
    let (exchange, queue) = exchange_and_queue(&broker).await;
    let gate = CommitGate::close(&test_db).await;
    let relay = start(&broker.config, fast_outbox(&db));

    let placed = Envelope::new("OrderPlaced", "orders", json!({ "order_id": 1 }));
    enqueue(&db, &exchange, "order.placed", &placed).await;
    let relay_backend = gate.waiting().await;
    // The broker confirmed it: the message is in the queue, the row is not marked.
    eventually("the confirmed message is in the queue", || async {
        broker.ready(&queue.name).await == 1
    })
    .await;
    // The relay's session dies before its commit, as it does when the relay's process dies:
    // the server rolls the batch back.
    let terminated: bool = gate
        .conn
        .query_one("SELECT pg_terminate_backend($1)", &[&relay_backend])
        .await
        .unwrap()
        .get(0);
    assert!(terminated);
    relay
        .until("the relay reports the lost commit", |s| {
            s.consecutive_errors >= 1
        })
        .await;
    assert_eq!(row(&db, &placed).await, (0, None, false), "rolled back");

    gate.open().await;
    let got = broker.take(&queue.name, 2, Duration::from_secs(10)).await;
    until_published(&db, "the row is marked published").await;
    let last = relay.stop().await;
    assert_eq!(
        ids(&got),
        [placed.id, placed.id],
        "published again: a duplicate, not a loss"
    );
    assert_eq!(broker.ready(&queue.name).await, 0);
    assert_eq!(row(&db, &placed).await, (1, None, true));
    assert_eq!((last.published, last.failed), (1, 0));
}

// A current-thread runtime (tokio::test's default): after the shutdown signal, yielding
// once lets the relay see it before the test opens the gate.
#[tokio::test]
async fn shutdown_during_a_batch_lets_the_batch_finish() {
    let (broker, test_db, db) = broker_and_service().await;
    let (exchange, queue) = exchange_and_queue(&broker).await;
    let gate = CommitGate::close(&test_db).await;
    let config = RelayConfig {
        confirm_timeout: Duration::from_secs(30),
        ..fast()
    };
    let relay = start_with(&broker.config, fast_outbox(&db), config);

    let placed = Envelope::new("OrderPlaced", "orders", json!({ "order_id": 1 }));
    enqueue(&db, &exchange, "order.placed", &placed).await;
    gate.waiting().await;
    relay.shutdown.cancel();
    tokio::task::yield_now().await;
    assert!(
        !relay.task.is_finished(),
        "the relay waits for its batch in progress"
    );
    gate.open().await;
    let last = tokio::time::timeout(Duration::from_secs(10), relay.task)
        .await
        .expect("the relay stops once its batch is done")
        .unwrap()
        .unwrap();

    assert_eq!(row(&db, &placed).await, (1, None, true), "marked published");
    assert_eq!((last.published, last.failed), (1, 0));
    assert!(!last.connected, "closed at shutdown");
    let got = broker.take(&queue.name, 1, Duration::from_secs(10)).await;
    assert_eq!(ids(&got), [placed.id], "published once");
}

/// `rows` rows in the outbox, and a relay taking batches of 5 with `batches_in_flight` as
/// given, whose markings wait at a closed [`CommitGate`]: returns the relay, the gate, the
/// exchange (for more rows) and the events in the order they were enqueued.
async fn rows_behind_a_closed_gate(
    rows: usize,
    batches_in_flight: usize,
) -> (
    Broker,
    TestDb,
    ServiceDb,
    String,
    QueueSpec,
    CommitGate,
    Running,
    Vec<Envelope>,
) {
    let (broker, test_db, db) = broker_and_service().await;
    let (exchange, queue) = exchange_and_queue(&broker).await;
    let mut events = Vec::new();
    for n in 0..rows {
        let placed = Envelope::new("OrderPlaced", "orders", json!({ "order_id": n }));
        enqueue(&db, &exchange, "order.placed", &placed).await;
        events.push(placed);
    }
    let gate = CommitGate::close(&test_db).await;
    let config = RelayConfig {
        batch_size: 5,
        confirm_timeout: Duration::from_secs(30),
        batches_in_flight,
        ..fast()
    };
    let relay = start_with(&broker.config, fast_outbox(&db), config);
    (broker, test_db, db, exchange, queue, gate, relay, events)
}

/// Takes `events.len()` messages from `queue` and checks they are `events`, in order, each once.
async fn assert_taken_in_order(broker: &Broker, queue: &QueueSpec, events: &[Envelope]) {
    let got = broker
        .take(&queue.name, events.len(), Duration::from_secs(10))
        .await;
    let sent: Vec<uuid::Uuid> = events.iter().map(|e| e.id).collect();
    assert_eq!(ids(&got), sent, "in id order, each once");
}

#[tokio::test]
async fn the_next_batch_is_published_while_the_previous_one_waits_to_be_marked() {
    let (broker, _test_db, db, _exchange, queue, gate, relay, events) =
        rows_behind_a_closed_gate(10, 2).await;

    eventually("both batches wait at the gate to be marked", || async {
        gate.marking().await == 2
    })
    .await;
    assert_eq!(
        broker.ready(&queue.name).await,
        10,
        "the broker confirmed both batches"
    );
    assert_eq!(pending(&db).await, 10, "no row is marked yet");
    assert_eq!(relay.status.borrow().published, 0);

    // Shutdown lets both batches finish (a current-thread runtime: yielding once lets the
    // relay see the signal before the gate opens).
    relay.shutdown.cancel();
    tokio::task::yield_now().await;
    assert!(
        !relay.task.is_finished(),
        "the relay waits for both batches"
    );
    gate.open().await;
    let last = tokio::time::timeout(Duration::from_secs(10), relay.task)
        .await
        .expect("the relay stops once both batches are done")
        .unwrap()
        .unwrap();
    assert_eq!(pending(&db).await, 0, "both batches are marked");
    assert_eq!((last.published, last.failed), (10, 0));
    assert_taken_in_order(&broker, &queue, &events).await;
}

// The control: one batch at a time, the second batch is not even claimed while the first
// waits to be marked. (The wait is a window for a failure to show, not a timing assertion:
// overlapped, the second batch takes milliseconds.)
#[tokio::test]
async fn without_overlap_the_next_batch_waits_until_the_previous_one_is_marked() {
    let (broker, _test_db, db, _exchange, queue, gate, relay, events) =
        rows_behind_a_closed_gate(10, 1).await;

    gate.waiting().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(gate.marking().await, 1, "one batch waits at the gate");
    assert_eq!(
        broker.ready(&queue.name).await,
        5,
        "only the first batch was published"
    );
    assert_eq!(pending(&db).await, 10, "no row is marked yet");

    gate.open().await;
    until_published(&db, "both batches are marked once the gate opens").await;
    let last = relay.stop().await;
    assert_eq!((last.published, last.failed), (10, 0));
    assert_taken_in_order(&broker, &queue, &events).await;
}

/// One row in the outbox and a relay taking batches of 5, `batches_in_flight` as given, whose
/// marking waits at a closed [`CommitGate`]; once that short batch waits there, a second row
/// is committed (waking the relay in-process). Returns what the broker holds a second later,
/// then opens the gate and checks that both rows are published once, in order.
async fn a_row_committed_while_a_short_batch_awaits_its_marking(batches_in_flight: usize) -> u32 {
    let (broker, _test_db, db, exchange, queue, gate, relay, mut events) =
        rows_behind_a_closed_gate(1, batches_in_flight).await;
    events.push(Envelope::new(
        "OrderPlaced",
        "orders",
        json!({ "order_id": 1 }),
    ));
    gate.waiting().await;
    enqueue(&db, &exchange, "order.placed", &events[1]).await;
    // A window for the second row to be published, not a timing assertion: woken, its batch
    // takes milliseconds.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ready = broker.ready(&queue.name).await;
    gate.open().await;
    until_published(&db, "both rows are marked once the gate opens").await;
    let last = relay.stop().await;
    assert_eq!((last.published, last.failed), (2, 0));
    assert_taken_in_order(&broker, &queue, &events).await;
    ready
}

#[tokio::test]
async fn a_row_committed_while_a_short_batch_awaits_its_marking_is_published_without_waiting_for_it(
) {
    assert_eq!(
        a_row_committed_while_a_short_batch_awaits_its_marking(
            RelayConfig::default().batches_in_flight
        )
        .await,
        2,
        "the second row went out while the first batch waited"
    );
}

// The control: one batch at a time, the second row waits for the first batch's commit.
#[tokio::test]
async fn with_one_batch_in_flight_a_row_committed_meanwhile_waits_for_the_batch_before_it() {
    assert_eq!(
        a_row_committed_while_a_short_batch_awaits_its_marking(1).await,
        1,
        "only the first row was published"
    );
}

#[tokio::test]
async fn a_connection_lost_mid_batch_fails_its_rows_and_they_are_published_after_reconnecting() {
    let (broker, _test_db, db) = broker_and_service().await;
    let (exchange, queue) = exchange_and_queue(&broker).await;
    let (proxy, via_proxy) = common::proxied().await;
    // Far beyond the test's waits: what fails the rows is the lost connection.
    let config = RelayConfig {
        confirm_timeout: Duration::from_secs(300),
        ..fast()
    };
    let relay = start_with(&via_proxy, fast_outbox(&db), config);
    relay.until("the relay connects", |s| s.connected).await;

    // The broker stops answering, so the batch is still waiting for its confirms when the
    // connection drops.
    proxy.silence();
    let events: Vec<Envelope> = (0..3)
        .map(|n| Envelope::new("OrderPlaced", "orders", json!({ "order_id": n })))
        .collect();
    let batch = events.clone();
    let x = exchange.clone();
    db.transaction(async move |tx| {
        for event in &batch {
            outbox::enqueue(tx, &x, "order.placed", event).await?;
        }
        Ok::<_, svcdb::Error>(())
    })
    .await
    .unwrap();
    eventually("the relay claims the batch", || async {
        row_locked(&db).await
    })
    .await;
    proxy.cut();
    proxy.resume();

    let got = broker.take(&queue.name, 3, Duration::from_secs(10)).await;
    until_published(&db, "the rows are marked published").await;
    let last = relay.stop().await;
    let mut got = ids(&got);
    got.sort();
    got.dedup();
    assert_eq!(got, events.iter().map(|e| e.id).collect::<Vec<_>>());
    let mut own_failures = 0;
    for event in &events {
        let (attempts, error, published) = row(&db, event).await;
        assert_eq!(
            (attempts, published),
            (2, true),
            "failed with the connection, published after it"
        );
        // Each row failed with the connection, not at a confirm timeout: its own publish
        // failed, or (when the cut came while the batch was still being written) it was not
        // sent because the channel had failed on a row before it.
        let error = error.unwrap();
        let own = error.starts_with(&format!("publishing OrderPlaced event {} ", event.id))
            && error.contains(" failed: ");
        own_failures += usize::from(own);
        assert!(
            own || error == "not sent: the channel failed on an earlier message of this batch",
            "{error}"
        );
    }
    assert!(own_failures >= 1, "the first row sent failed on its own");
    assert_eq!((last.published, last.failed), (3, 3));
}

#[tokio::test]
async fn a_silent_broker_fails_the_batch_at_the_confirm_timeout_and_the_rows_wait_for_it() {
    let (broker, _test_db, db) = broker_and_service().await;
    let (exchange, queue) = exchange_and_queue(&broker).await;
    let (proxy, via_proxy) = common::proxied().await;
    let config = RelayConfig {
        confirm_timeout: Duration::from_millis(500),
        ..fast()
    };
    let relay = start_with(&via_proxy, fast_outbox(&db), config);
    relay.until("the relay connects", |s| s.connected).await;

    proxy.silence();
    let placed = Envelope::new("OrderPlaced", "orders", json!({ "order_id": 1 }));
    enqueue(&db, &exchange, "order.placed", &placed).await;
    // With no byte from the broker, only the confirm timeout can fail the row; and it lets go
    // of it, while the broker is still silent.
    relay
        .until("the row fails while the broker is silent", |s| {
            s.failed >= 1
        })
        .await;
    eventually("the relay holds no row", || async {
        !row_locked(&db).await
    })
    .await;
    let (attempts, error, published) = row(&db, &placed).await;
    assert!(
        attempts >= 1 && !published,
        "{attempts} attempts, {published}"
    );
    let error = error.unwrap();
    assert!(
        error.starts_with(&format!(
            "the broker did not confirm OrderPlaced event {} ",
            placed.id
        )) && error.contains("within 500ms"),
        "{error}"
    );

    proxy.resume();
    let got = broker.take(&queue.name, 1, Duration::from_secs(10)).await;
    until_published(&db, "the row is marked published").await;
    relay.stop().await;
    // The timed-out publish may still reach the broker once it answers: a duplicate at most.
    let mut got = ids(&got);
    got.extend(ids(&broker.take(&queue.name, 0, Duration::ZERO).await));
    assert!(
        !got.is_empty() && got.iter().all(|id| *id == placed.id),
        "{got:?}"
    );
    assert!(row(&db, &placed).await.2);
}

/// The child process's database (a connection string) and broker, set by
/// [`RelayProcess::spawn`].
const CHILD_DB: &str = "SVCDB_TEST_RELAY_CHILD_DB";
const CHILD_AMQP: &str = "SVCDB_TEST_RELAY_CHILD_AMQP";

/// A relay in a process of its own (this test binary, running [`relay_child_process`]),
/// killed with SIGKILL on [`RelayProcess::kill`] or drop.
struct RelayProcess {
    child: std::process::Child,
}

impl RelayProcess {
    fn spawn(test_db: &svcdb::testing::TestDb, amqp: &AmqpConfig) -> Self {
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "relay::relay_child_process",
                "--ignored",
                "--nocapture",
            ])
            .env(CHILD_DB, test_db.url())
            .env(CHILD_AMQP, &amqp.url)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("the test binary runs the child relay");
        Self { child }
    }

    /// SIGKILL: no destructor, no shutdown, no ROLLBACK sent.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Not a test: the relay of [`RelayProcess`], run in a child process until it is killed (or
/// its parent goes away, closing its stdin). Does nothing outside a `RelayProcess`.
#[tokio::test]
#[ignore = "the child process of a_relay_process_killed_while_its_mark_waits_publishes_the_event_once"]
async fn relay_child_process() {
    let (Ok(db_url), Ok(amqp_url)) = (std::env::var(CHILD_DB), std::env::var(CHILD_AMQP)) else {
        return;
    };
    std::thread::spawn(|| {
        use std::io::Read;
        let _ = std::io::stdin().read(&mut [0u8]);
        std::process::exit(0);
    });
    let mut config = svcdb::Config::with_connection(
        db_url.parse().unwrap(),
        svcdb::Ident::new("schema", "svc").unwrap(),
    );
    (config.pool_min, config.pool_max) = (1, 2);
    let db = ServiceDb::connect(config).await.unwrap();
    let relay = Relay::new(&AmqpConfig::new(amqp_url), fast_outbox(&db)).with_config(fast());
    relay.run(CancellationToken::new()).await.unwrap();
}

#[tokio::test]
async fn a_relay_process_killed_while_its_mark_waits_publishes_the_event_once() {
    let (broker, test_db, db) = broker_and_service().await;
    let (exchange, queue) = exchange_and_queue(&broker).await;
    let gate = CommitGate::close(&test_db).await;
    let mut child = RelayProcess::spawn(&test_db, &broker.config);

    let placed = Envelope::new("OrderPlaced", "orders", json!({ "order_id": 1 }));
    enqueue(&db, &exchange, "order.placed", &placed).await;
    let child_backend = gate.waiting().await;
    eventually("the confirmed message is in the queue", || async {
        broker.ready(&queue.name).await == 1
    })
    .await;
    child.kill();
    // Its session waits at the gate still; let it through. The relay sends its `COMMIT` with
    // its mark, after the broker's confirm: the server has both, and commits the mark though
    // the process that sent it is gone.
    gate.open().await;
    eventually("the killed relay's session is gone", || async {
        gate.conn
            .query_opt(
                "SELECT FROM pg_stat_activity WHERE pid = $1",
                &[&child_backend],
            )
            .await
            .unwrap()
            .is_none()
    })
    .await;
    assert_eq!(row(&db, &placed).await, (1, None, true), "committed");

    // The relay restarts (or another replica carries on): it publishes the next event, and
    // not the marked one again.
    let relay = start(&broker.config, fast_outbox(&db));
    let next = Envelope::new("OrderPlaced", "orders", json!({ "order_id": 2 }));
    enqueue(&db, &exchange, "order.placed", &next).await;
    let got = broker.take(&queue.name, 2, Duration::from_secs(10)).await;
    let last = relay.stop().await;
    assert_eq!(ids(&got), [placed.id, next.id], "each event once");
    assert_eq!(broker.ready(&queue.name).await, 0);
    assert_eq!((last.published, last.failed), (1, 0));
}
