//! Batched consumption: many deliveries in one transaction, each under a savepoint, against
//! the real RabbitMQ and PostgreSQL.

use crate::common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{effects, eventually, service, Broker, Proxy};
use serde_json::json;
use svcdb::{Envelope, ServiceDb, Transaction};
use svcdb_amqp::topology::{QueueSpec, Topology};
use svcdb_amqp::{AmqpConfig, Consumer, ConsumerOptions, HandlerError, Result};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const KIND: &str = "ProductStockReserved";
const NAME: &str = "orders.reserve-stock";
/// A batch of 32, the size the issue names (below the default prefetch, 128).
const BATCH: usize = 32;

/// An exchange and a queue bound to it, unique to one test, and a proxy to the broker to
/// count (or stop) what the consumer sends.
struct Setup {
    broker: Broker,
    exchange: String,
    queue: QueueSpec,
    proxy: Proxy,
    via_proxy: AmqpConfig,
}

async fn setup() -> Setup {
    common::init_tracing();
    let broker = Broker::new().await;
    let exchange = common::unique("catalog.events");
    let queue = QueueSpec::new(common::unique("orders.batch"))
        .bind(&exchange, "product.#")
        .with_max_deliveries(5);
    broker
        .declare(Topology::new().exchange(&exchange).queue(queue.clone()))
        .await;
    let port = common::closed_port();
    let proxy = Proxy::start(port).await;
    let via_proxy = AmqpConfig::new(common::url_via(port));
    Setup {
        broker,
        exchange,
        queue,
        proxy,
        via_proxy,
    }
}

impl Setup {
    /// A consumer through the proxy taking batches of `BATCH`, not eager and lingering long
    /// enough that deliveries published before it starts make one batch.
    fn consumer(&self, db: &ServiceDb) -> Consumer {
        Consumer::new(&self.via_proxy, db.clone(), &self.queue, NAME).with_options(options())
    }

    /// Publishes `envelopes` in their order, each confirmed before the next: concurrent
    /// publishes (a channel each) may reach the queue in any order, and the deadlock test needs
    /// the batch to lock its rows in the order it was given them.
    async fn publish_all(&self, envelopes: &[Envelope]) {
        for e in envelopes {
            self.broker
                .publish(&self.exchange, "product.stock.reserved", e)
                .await;
        }
    }
}

fn options() -> ConsumerOptions {
    ConsumerOptions {
        batch: BATCH,
        linger: Duration::from_secs(3),
        eager: false,
        retry_delay: Duration::from_millis(10),
        max_retry_delay: Duration::from_millis(50),
        ..ConsumerOptions::default()
    }
}

fn events(n: usize) -> Vec<Envelope> {
    (0..n)
        .map(|i| Envelope::new(KIND, "catalog", json!({ "seq": i })))
        .collect()
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

/// Every event's effect is there exactly once.
async fn each_once(db: &ServiceDb, envelopes: &[Envelope]) {
    for envelope in envelopes {
        assert_eq!(effects(db, envelope.id).await, 1, "{}", envelope.id);
    }
}

#[tokio::test]
async fn a_crash_between_commit_and_acks_redelivers_every_delivery_as_a_duplicate() {
    let s = setup().await;
    let (_test_db, db) = service().await;
    let envelopes = events(BATCH);
    s.publish_all(&envelopes).await;
    // The connection stops at the first ack, before the broker sees it: the batch committed,
    // its acknowledgement lost, as when the process dies right after the commit.
    s.proxy.freeze_at(common::BASIC_ACK);
    let consumer = s
        .consumer(&db)
        .on(KIND, |tx, event| Box::pin(record(tx, event)));
    let (shutdown, task) = start(&consumer);

    eventually("the batch commits and its ack is sent", || async {
        consumer.stats().handled == BATCH as u64 && s.proxy.sent(common::BASIC_ACK) == 1
    })
    .await;
    each_once(&db, &envelopes).await;
    s.proxy.freeze_at_nothing();
    s.proxy.cut();
    s.proxy.resume();

    eventually("every delivery comes back and is a duplicate", || async {
        consumer.stats().duplicates == BATCH as u64
    })
    .await;
    // One ack for each batch: `multiple`, its deliveries being the channel's only ones.
    eventually("the duplicates are acknowledged", || async {
        s.broker.ready(&s.queue.name).await == 0 && s.proxy.sent(common::BASIC_ACK) == 2
    })
    .await;
    stop(shutdown, task).await;

    each_once(&db, &envelopes).await;
    let stats = consumer.stats();
    assert_eq!(
        (stats.handled, stats.duplicates),
        (BATCH as u64, BATCH as u64)
    );
    assert_eq!((stats.requeued, stats.returned), (0, 0));
}

#[tokio::test]
async fn a_crash_before_commit_redelivers_the_batch_and_each_is_handled_once() {
    let s = setup().await;
    let (_test_db, db) = service().await;
    let envelopes = events(BATCH);
    s.publish_all(&envelopes).await;
    // Every handler writes its effect; the last of the batch then never returns, so the
    // transaction holds all of them, uncommitted, when the process dies.
    let entered = Arc::new(AtomicU32::new(0));
    let counter = entered.clone();
    let crashing = s.consumer(&db).on(KIND, move |tx, event| {
        let counter = counter.clone();
        Box::pin(async move {
            record(tx, event).await?;
            if counter.fetch_add(1, Ordering::SeqCst) + 1 == BATCH as u32 {
                std::future::pending::<()>().await;
            }
            Ok(())
        })
    });
    let (_, task) = start(&crashing);
    eventually("every handler of the batch ran", || async {
        entered.load(Ordering::SeqCst) == BATCH as u32
    })
    .await;
    // The crash: the consumer's tasks are gone (the transaction is dropped, never
    // committed) and so is its connection (the broker requeues what it held).
    task.abort();
    let _ = task.await;
    s.proxy.cut();
    for envelope in &envelopes {
        assert_eq!(effects(&db, envelope.id).await, 0, "never committed");
    }

    let consumer = s
        .consumer(&db)
        .on(KIND, |tx, event| Box::pin(record(tx, event)));
    let (shutdown, task) = start(&consumer);
    eventually("the redelivered batch is handled", || async {
        consumer.stats().handled == BATCH as u64
    })
    .await;
    stop(shutdown, task).await;

    each_once(&db, &envelopes).await;
    let stats = consumer.stats();
    // No claim survived the crash: none of them is a duplicate.
    assert_eq!((stats.handled, stats.duplicates), (BATCH as u64, 0));
    assert_eq!(crashing.stats().handled, 0);
    assert_eq!(s.broker.ready(&s.queue.name).await, 0);
}

#[tokio::test]
async fn a_failing_handler_returns_only_its_delivery() {
    let s = setup().await;
    let (_test_db, db) = service().await;
    let envelopes = events(BATCH);
    let failing = envelopes[BATCH / 2].id;
    s.publish_all(&envelopes).await;
    // One event of the batch fails on its first attempt, after writing its effect.
    let attempts = Arc::new(AtomicU32::new(0));
    let counter = attempts.clone();
    let consumer = s.consumer(&db).on(KIND, move |tx, event| {
        let counter = counter.clone();
        Box::pin(async move {
            record(tx, event).await?;
            if event.id == failing && counter.fetch_add(1, Ordering::SeqCst) == 0 {
                return Err(HandlerError::msg("stock service briefly unavailable"));
            }
            Ok(())
        })
    });
    let (shutdown, task) = start(&consumer);

    eventually(
        "the batch's other events commit and the failed one is returned",
        || async {
            let stats = consumer.stats();
            stats.handled >= BATCH as u64 - 1 && stats.requeued == 1
        },
    )
    .await;
    // The 31 committed in that first batch, without the failed one's effect.
    let committed_first: i64 = db
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FROM effects WHERE event_id <> $1",
            &[&failing],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(committed_first, BATCH as i64 - 1);
    eventually(
        "the returned event is handled on its redelivery",
        || async { consumer.stats().handled == BATCH as u64 },
    )
    .await;
    stop(shutdown, task).await;

    each_once(&db, &envelopes).await;
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    let stats = consumer.stats();
    assert_eq!(
        (
            stats.handled,
            stats.duplicates,
            stats.requeued,
            stats.returned
        ),
        (BATCH as u64, 0, 1, 0)
    );
    // Returned on its own, as a failure (reject, which counts), not with a nack.
    assert_eq!(s.proxy.sent(common::BASIC_REJECT), 1);
    assert_eq!(s.proxy.sent(common::BASIC_NACK), 0);
    assert_eq!(s.broker.ready(&s.queue.name).await, 0);
}

/// Found by a user trial: a handler that ran its write, then dropped the error of a failing
/// statement and returned `Ok`, left the batch's transaction aborted; the next event's
/// savepoint failed unseen, its handler's error rolled back to the first event's savepoint,
/// which undid the first event's write and kept its claim: the commit then recorded it handled
/// without its effect. Each event's savepoint now has a name of its own, so that rollback
/// fails and the batch is handled one event at a time. The handler drops the error on its
/// first run only: every event ends with its effect once.
#[tokio::test]
async fn an_error_a_handler_drops_in_a_batch_loses_no_events_effect() {
    let s = setup().await;
    let (_test_db, db) = service().await;
    let envelopes = events(3);
    let dropping = envelopes[0].id;
    s.publish_all(&envelopes).await;
    let dropped = Arc::new(AtomicU32::new(0));
    let counter = dropped.clone();
    let consumer = s
        .consumer(&db)
        .with_options(ConsumerOptions {
            batch: envelopes.len(),
            ..options()
        })
        .on(KIND, move |tx, event| {
            let counter = counter.clone();
            Box::pin(async move {
                record(tx, event).await?;
                if event.id == dropping && counter.fetch_add(1, Ordering::SeqCst) == 0 {
                    // The misuse: the statement fails, and the handler says nothing of it.
                    let _ = tx.execute("SELECT 1 / 0", &[]).await;
                }
                Ok(())
            })
        });
    let (shutdown, task) = start(&consumer);

    eventually("every event is handled", || async {
        let stats = consumer.stats();
        stats.handled + stats.duplicates >= 3 && s.broker.ready(&s.queue.name).await == 0
    })
    .await;
    stop(shutdown, task).await;

    assert!(dropped.load(Ordering::SeqCst) >= 1, "the misuse happened");
    each_once(&db, &envelopes).await;
}

#[tokio::test]
async fn two_copies_of_one_event_in_a_batch_have_their_effect_once() {
    let s = setup().await;
    let (_test_db, db) = service().await;
    let mut envelopes = events(3);
    envelopes.push(envelopes[1].clone());
    s.publish_all(&envelopes).await;
    let consumer = s
        .consumer(&db)
        .with_options(ConsumerOptions {
            batch: envelopes.len(),
            ..options()
        })
        .on(KIND, |tx, event| Box::pin(record(tx, event)));
    let (shutdown, task) = start(&consumer);

    eventually("the batch is acknowledged", || async {
        let stats = consumer.stats();
        stats.handled + stats.duplicates == 4
    })
    .await;
    stop(shutdown, task).await;

    each_once(&db, &envelopes[..3]).await;
    let stats = consumer.stats();
    assert_eq!((stats.handled, stats.duplicates), (3, 1));
    // One batch: one (multiple) ack for all four.
    assert_eq!(s.proxy.sent(common::BASIC_ACK), 1);
    assert_eq!(s.broker.ready(&s.queue.name).await, 0);
}

#[tokio::test]
async fn a_single_message_on_a_quiet_queue_is_handled_without_waiting_for_the_batch_to_fill() {
    let s = setup().await;
    let (_test_db, db) = service().await;
    // Side by side on a queue of its own, the control: not eager, with a linger longer than
    // the test, so its batch of one waits, held by the consumer, until shutdown flushes it.
    let control_queue = QueueSpec::new(common::unique("orders.batch-control"))
        .bind(&s.exchange, "product.#")
        .with_max_deliveries(5);
    s.broker
        .declare(Topology::new().queue(control_queue.clone()))
        .await;
    let quick = s
        .consumer(&db)
        .with_options(ConsumerOptions {
            linger: ConsumerOptions::default().linger,
            eager: ConsumerOptions::default().eager,
            ..options()
        })
        .on(KIND, |tx, event| Box::pin(record(tx, event)));
    let lingering = Consumer::new(&s.via_proxy, db.clone(), &control_queue, "orders.control")
        .with_options(ConsumerOptions {
            linger: Duration::from_secs(3600),
            ..options()
        })
        .on(KIND, |tx, event| Box::pin(record(tx, event)));
    let (quick_shutdown, quick_task) = start(&quick);
    let (lingering_shutdown, lingering_task) = start(&lingering);

    // One event, into both queues.
    let envelope = events(1).remove(0);
    s.publish_all(std::slice::from_ref(&envelope)).await;
    eventually("the lingering consumer holds the event", || async {
        s.broker.ready(&control_queue.name).await == 0
    })
    .await;
    eventually("the defaults handle the event alone", || async {
        quick.stats().handled == 1
    })
    .await;
    assert_eq!(
        lingering.stats().handled,
        0,
        "the control's batch still waits"
    );

    stop(lingering_shutdown, lingering_task).await;
    assert_eq!(
        lingering.stats().handled,
        1,
        "shutdown handles the open batch"
    );
    stop(quick_shutdown, quick_task).await;
    assert_eq!(effects(&db, envelope.id).await, 2); // one per consumer
}

/// One event whose handler holds its batch open until released, and five more published while
/// it does, to an eager consumer with a linger longer than the test. Returns how many events
/// were handled a second after the release (a window for the five to be handled, not a timing
/// assertion) and the acks sent, then stops the consumer and checks each was handled once.
async fn events_arriving_while_a_batch_runs() -> (u64, usize) {
    let s = setup().await;
    let (_test_db, db) = service().await;
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let consumer = s
        .consumer(&db)
        .with_options(ConsumerOptions {
            linger: Duration::from_secs(3600),
            eager: true,
            ..options()
        })
        .on(KIND, {
            let release = release.clone();
            move |tx, event| {
                let release = release.clone();
                Box::pin(async move {
                    if event.payload["seq"] == 0 {
                        let _held = release.acquire().await;
                    }
                    record(tx, event).await
                })
            }
        });
    let (shutdown, task) = start(&consumer);
    let envelopes = events(6);
    s.publish_all(&envelopes[..1]).await;
    eventually("the first event's batch runs", || async {
        s.broker.ready(&s.queue.name).await == 0
    })
    .await;
    s.publish_all(&envelopes[1..]).await;
    eventually("the consumer holds the five", || async {
        s.broker.ready(&s.queue.name).await == 0
    })
    .await;
    release.add_permits(1);
    eventually("the first event is handled", || async {
        consumer.stats().handled >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let handled = consumer.stats().handled;
    let acks = s.proxy.sent(common::BASIC_ACK);
    stop(shutdown, task).await;
    each_once(&db, &envelopes).await;
    (handled, acks)
}

#[tokio::test]
async fn deliveries_arriving_while_a_batch_runs_make_the_next_batch_which_starts_when_it_ends() {
    // The first event is a batch of its own at once (nothing else ran); the five fill the next
    // one while it runs, which starts as it ends, not after the linger: two batches, two
    // acks. (The linger's control is the quiet-queue test's: not eager, nothing starts.)
    assert_eq!(events_arriving_while_a_batch_runs().await, (6, 2));
}

#[tokio::test]
async fn a_batch_whose_connection_dies_is_handed_back_whole_without_spending_deliveries() {
    let s = setup().await;
    let (_test_db, db) = service().await;
    let envelopes = events(BATCH);
    s.publish_all(&envelopes).await;
    // The last handler of the first batch terminates its own backend: the connection dies
    // under the transaction, with every other delivery's work in it.
    let entered = Arc::new(AtomicU32::new(0));
    let counter = entered.clone();
    let consumer = s.consumer(&db).on(KIND, move |tx, event| {
        let counter = counter.clone();
        Box::pin(async move {
            record(tx, event).await?;
            if counter.fetch_add(1, Ordering::SeqCst) + 1 == BATCH as u32 {
                tx.execute("SELECT pg_terminate_backend(pg_backend_pid())", &[])
                    .await?;
            }
            Ok(())
        })
    });
    let (shutdown, task) = start(&consumer);

    eventually("the batch is handed back and handled again", || async {
        consumer.stats().handled == BATCH as u64
    })
    .await;
    stop(shutdown, task).await;

    each_once(&db, &envelopes).await;
    let stats = consumer.stats();
    // Every delivery returned unprocessed (a nack each: not a failure), one pause.
    assert_eq!(
        (stats.handled, stats.returned, stats.requeued, stats.paused),
        (BATCH as u64, BATCH as u64, 0, 1)
    );
    assert!(entered.load(Ordering::SeqCst) >= 2 * BATCH as u32 - 1);
    assert_eq!(s.proxy.sent(common::BASIC_NACK), BATCH);
    assert_eq!(s.proxy.sent(common::BASIC_REJECT), 0);
    assert_eq!(s.broker.ready(&s.queue.name).await, 0);
}

#[tokio::test]
async fn a_batch_of_zero_deliveries_is_refused_before_connecting() {
    let s = setup().await;
    let (_test_db, db) = service().await;
    let consumer = s
        .consumer(&db)
        .with_options(ConsumerOptions {
            batch: 0,
            ..options()
        })
        .on(KIND, |tx, event| Box::pin(record(tx, event)));
    let e = consumer.run(CancellationToken::new()).await.unwrap_err();
    assert!(
        matches!(&e, svcdb_amqp::Error::Config { key, .. } if key == "batch"),
        "{e:?}"
    );
    // Control: the same consumer with batches of one starts.
    let (shutdown, task) = start(&consumer.with_options(ConsumerOptions {
        batch: 1,
        ..options()
    }));
    eventually("the consumer consumes", || async {
        s.proxy.sent(common::BASIC_CONSUME) > 0
    })
    .await;
    stop(shutdown, task).await;
}

#[tokio::test]
async fn a_batch_that_deadlocks_is_handled_one_delivery_at_a_time_not_again_whole() {
    let s = setup().await;
    let (test_db, db) = service().await;
    db.get()
        .await
        .unwrap()
        .batch_execute(
            "CREATE TABLE hot (id int PRIMARY KEY, n int NOT NULL);
             INSERT INTO hot VALUES (1, 0), (2, 0);
             CREATE TABLE runs (event_id uuid NOT NULL, txid bigint NOT NULL)",
        )
        .await
        .unwrap();
    // Two events, each bumping one hot row: `first` row 1, then `second` row 2.
    let first = Envelope::new(KIND, "catalog", json!({ "row": 1 }));
    let second = Envelope::new(KIND, "catalog", json!({ "row": 2 }));
    // Another writer holds row 2, so the batch waits on it while holding row 1.
    let mut other = test_db.admin().await;
    let other_tx = other.transaction().await.unwrap();
    other_tx
        .execute("UPDATE svc.hot SET n = n + 1 WHERE id = 2", &[])
        .await
        .unwrap();

    s.publish_all(&[first.clone(), second.clone()]).await;
    let consumer = s
        .consumer(&db)
        .with_options(ConsumerOptions {
            batch: 2,
            ..options()
        })
        .on(KIND, |tx, event| {
            Box::pin(async move {
                let row: i32 = event.payload["row"].as_i64().unwrap().try_into().unwrap();
                // Its wait looks for a deadlock after 3 s, not the default 1 s: long enough
                // for the other writer to join the cycle first on a busy machine (a check
                // that finds no cycle is not repeated, and the other writer's would then find
                // it and make that one the victim).
                tx.batch_execute("SET LOCAL deadlock_timeout = '3s'")
                    .await?;
                tx.execute("UPDATE hot SET n = n + 1 WHERE id = $1", &[&row])
                    .await?;
                tx.execute("INSERT INTO runs VALUES ($1, txid_current())", &[&event.id])
                    .await?;
                record(tx, event).await
            })
        });
    let (shutdown, task) = start(&consumer);
    let admin = test_db.admin().await;
    eventually("the batch waits for row 2", || async {
        let waiting: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        waiting == 1
    })
    .await;
    // Now the other writer wants row 1, which the batch holds: a deadlock. The batch's backend
    // finds the cycle when its deadlock_timeout (3 s) ends, the other writer's being far
    // longer, so the batch's transaction is the one aborted; the other writer then goes on.
    other_tx
        .batch_execute("SET LOCAL deadlock_timeout = '60s'")
        .await
        .unwrap();
    other_tx
        .execute("UPDATE svc.hot SET n = n + 1 WHERE id = 1", &[])
        .await
        .expect("the batch, not the other writer, is the deadlock's victim");
    other_tx.commit().await.unwrap();

    eventually("both events are handled", || async {
        consumer.stats().handled == 2
    })
    .await;
    stop(shutdown, task).await;
    each_once(&db, &[first.clone(), second.clone()]).await;
    // Each committed in a transaction of its own: the batch was not run again whole.
    let txids: Vec<i64> = admin
        .query("SELECT txid FROM svc.runs ORDER BY txid", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(txids.len(), 2, "one committed run per event: {txids:?}");
    assert_ne!(
        txids[0], txids[1],
        "handled one at a time after the deadlock"
    );
}
