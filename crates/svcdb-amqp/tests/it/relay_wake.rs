//! The relay wakes on commit: in-process at once, from other processes through a debounced
//! `NOTIFY`, and the poll covers what a lost notification would have announced.

use crate::common;
use crate::relay::{enqueue, exchange_and_queue, fast, pending, start_with, Running};

use std::time::Duration;

use common::{service, Broker};
use serde_json::json;
use svcdb::outbox::{self, NOTIFY_DEBOUNCE};
use svcdb::testing::TestDb;
use svcdb::{Envelope, Outbox, ServiceDb};
use svcdb_amqp::topology::QueueSpec;
use svcdb_amqp::RelayConfig;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// Longer than any test: a row published under it was not found by a poll.
const NEVER: Duration = Duration::from_secs(3600);

fn placed(n: i64) -> Envelope {
    Envelope::new("OrderPlaced", "orders", json!({ "order_id": n }))
}

/// Writes `event` to the outbox as a tool or another process would: in a transaction outside
/// svcdb's wrappers, which wakes nobody.
async fn enqueue_unannounced(db: &ServiceDb, exchange: &str, event: &Envelope) {
    let mut conn = db.dedicated().await.unwrap();
    let tx = conn.transaction().await.unwrap();
    outbox::enqueue(&tx, exchange, "order.placed", event)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

/// What another process's svcdb sends after its commit.
async fn notify_as_another_process(db: &ServiceDb) {
    let channel = outbox::notify_channel(db.schema().as_str());
    db.get()
        .await
        .unwrap()
        .execute("SELECT pg_notify($1, 'another process')", &[&channel])
        .await
        .unwrap();
}

/// The backend of the relay's `LISTEN` connection, once there is one.
async fn listener_pid(db: &ServiceDb) -> Option<i32> {
    db.get()
        .await
        .unwrap()
        .query_opt(
            "SELECT pid FROM pg_stat_activity
              WHERE datname = current_database() AND query LIKE 'LISTEN %'
                AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .map(|row| row.get(0))
}

/// Waits until the relay listens, then a little longer, so that the claim its listener's
/// first wake-up starts is over before the test writes rows.
async fn until_listening(status: &mut tokio::sync::watch::Receiver<svcdb_amqp::RelayStatus>) {
    tokio::time::timeout(
        Duration::from_secs(10),
        status.wait_for(|s| s.listening && s.connected),
    )
    .await
    .expect("the relay connects and listens within 10 s")
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// A relay with `poll_interval` on a fresh service and exchange (with a queue bound to all of
/// it), started and listening ([`until_listening`]).
struct Listening {
    broker: Broker,
    _test_db: TestDb,
    db: ServiceDb,
    exchange: String,
    queue: QueueSpec,
    relay: Running,
}

async fn listening(poll_interval: Duration) -> Listening {
    common::init_tracing();
    let broker = Broker::new().await;
    let (_test_db, db) = service().await;
    let (exchange, queue) = exchange_and_queue(&broker).await;
    let mut relay = start_with(
        &broker.config,
        Outbox::new(db.clone()),
        RelayConfig {
            poll_interval,
            ..fast()
        },
    );
    until_listening(&mut relay.status).await;
    Listening {
        broker,
        _test_db,
        db,
        exchange,
        queue,
        relay,
    }
}

#[tokio::test]
async fn a_committed_event_is_published_without_waiting_for_a_poll() {
    let Listening {
        broker,
        _test_db,
        db,
        exchange,
        queue,
        relay,
    } = listening(NEVER).await;

    let event = placed(1);
    enqueue(&db, &exchange, "order.placed", &event).await;
    common::eventually("the relay publishes the committed event", || async {
        relay.status.borrow().published == 1
    })
    .await;
    let delivered = broker.take(&queue.name, 1, Duration::from_secs(5)).await;
    assert_eq!(
        delivered[0]
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str()),
        Some(event.id.to_string().as_str())
    );
    assert_eq!(pending(&db).await, 0);
    relay.stop().await;
}

#[tokio::test]
async fn an_event_enqueued_by_a_handler_with_retries_is_published_without_waiting_for_a_poll() {
    let Listening {
        broker: _broker,
        _test_db,
        db,
        exchange,
        queue: _queue,
        relay,
    } = listening(NEVER).await;

    // What a consumer runs for each delivery: process_once_with (transaction_with inside).
    let incoming = placed(1);
    let reply = placed(2);
    let outcome = db
        .process_once_with(
            &svcdb::TxOptions::serializable(),
            "orders.reply",
            &incoming,
            async |tx| outbox::enqueue(tx, &exchange, "order.placed", &reply).await,
        )
        .await
        .unwrap();
    assert!(matches!(outcome, svcdb::Processed::Done(())));
    common::eventually("the relay publishes the handler's event", || async {
        relay.status.borrow().published == 1
    })
    .await;
    relay.stop().await;
}

#[tokio::test]
async fn a_notify_from_another_process_wakes_the_relay() {
    let Listening {
        broker: _broker,
        _test_db,
        db,
        exchange,
        queue: _queue,
        relay,
    } = listening(NEVER).await;

    enqueue_unannounced(&db, &exchange, &placed(1)).await;
    // Control: unannounced, the row waits (the poll is an hour away).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(relay.status.borrow().published, 0);
    assert_eq!(pending(&db).await, 1);

    notify_as_another_process(&db).await;
    common::eventually("the NOTIFY wakes the relay", || async {
        relay.status.borrow().published == 1
    })
    .await;
    relay.stop().await;
}

#[tokio::test]
async fn with_the_notification_lost_the_poll_still_publishes() {
    // The same setting as the control above but for the poll.
    let Listening {
        broker: _broker,
        _test_db,
        db,
        exchange,
        queue: _queue,
        relay,
    } = listening(Duration::from_millis(300)).await;

    enqueue_unannounced(&db, &exchange, &placed(1)).await;
    common::eventually("the poll publishes the unannounced row", || async {
        relay.status.borrow().published == 1
    })
    .await;
    relay.stop().await;
}

#[tokio::test]
async fn a_killed_listen_connection_is_reopened() {
    let Listening {
        broker: _broker,
        _test_db,
        db,
        exchange,
        queue: _queue,
        mut relay,
    } = listening(NEVER).await;
    let first = listener_pid(&db).await.expect("the relay's LISTEN backend");
    let killed: bool = db
        .get()
        .await
        .unwrap()
        .query_one("SELECT pg_terminate_backend($1)", &[&first])
        .await
        .unwrap()
        .get(0);
    assert!(killed);

    common::eventually("a new LISTEN connection", || async {
        listener_pid(&db).await.is_some_and(|pid| pid != first)
    })
    .await;
    until_listening(&mut relay.status).await;
    enqueue_unannounced(&db, &exchange, &placed(1)).await;
    notify_as_another_process(&db).await;
    common::eventually("the NOTIFY reaches the new connection", || async {
        relay.status.borrow().published == 1
    })
    .await;
    relay.stop().await;
}

/// Listens on `channel` on a connection of its own and hands over each notification's
/// payload; the connection lives as long as the client returned.
async fn listen(
    db: &ServiceDb,
    channel: &str,
) -> (
    svcdb::tokio_postgres::Client,
    mpsc::UnboundedReceiver<String>,
) {
    let (client, mut connection) = db
        .session_config()
        .connect(svcdb::tokio_postgres::NoTls)
        .await
        .unwrap();
    let (to, from) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(message)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let svcdb::tokio_postgres::AsyncMessage::Notification(n) = message {
                let _ = to.send(n.payload().to_owned());
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN \"{channel}\""))
        .await
        .unwrap();
    (client, from)
}

#[tokio::test]
async fn a_burst_of_commits_sends_far_fewer_notifies_than_rows() {
    common::init_tracing();
    let (_test_db, db) = service().await;
    let channel = outbox::notify_channel(db.schema().as_str());
    let (_listener, mut received) = listen(&db, &channel).await;

    // Control: a NOTIFY per transaction is counted as such (PostgreSQL folds duplicates only
    // within one transaction).
    const CONTROL: usize = 50;
    for _ in 0..CONTROL {
        db.get()
            .await
            .unwrap()
            .execute("SELECT pg_notify($1, 'control')", &[&channel])
            .await
            .unwrap();
    }
    let mut control = 0;
    while control < CONTROL {
        let payload = tokio::time::timeout(Duration::from_secs(10), received.recv())
            .await
            .expect("every control NOTIFY arrives")
            .unwrap();
        assert_eq!(payload, "control");
        control += 1;
    }

    // The burst: rows each committed in a transaction of its own, 16 at a time.
    const ROWS: usize = 1000;
    let mut tasks = JoinSet::new();
    for worker in 0..16 {
        let db = db.clone();
        tasks.spawn(async move {
            for n in (worker..ROWS).step_by(16) {
                let event = placed(n as i64);
                db.transaction(async |tx| outbox::enqueue(tx, "", "order.placed", &event).await)
                    .await
                    .unwrap();
            }
        });
    }
    tasks.join_all().await;
    // The trailing NOTIFY goes out within the debounce interval of the last commit.
    tokio::time::sleep(NOTIFY_DEBOUNCE * 20 + Duration::from_millis(500)).await;
    let mut burst = 0;
    while let Ok(payload) = received.try_recv() {
        assert_ne!(payload, "control");
        burst += 1;
    }
    assert!(burst >= 1, "the burst was announced");
    assert!(
        burst * 4 <= ROWS,
        "{burst} NOTIFYs for {ROWS} rows: the debounce should send far fewer"
    );
}

#[tokio::test]
async fn commits_watched_by_a_relay_of_this_process_send_no_notify() {
    common::init_tracing();
    let (_test_db, db) = service().await;
    let channel = outbox::notify_channel(db.schema().as_str());
    let (_listener, mut received) = listen(&db, &channel).await;
    let commit_rows = |from: i64| {
        let db = db.clone();
        async move {
            for n in from..from + 20 {
                let event = placed(n);
                db.transaction(async |tx| outbox::enqueue(tx, "", "order.placed", &event).await)
                    .await
                    .unwrap();
            }
            // The trailing NOTIFY, if any, goes out within the debounce interval.
            tokio::time::sleep(NOTIFY_DEBOUNCE * 20 + Duration::from_millis(500)).await;
        }
    };
    let announced = |received: &mut mpsc::UnboundedReceiver<String>| {
        std::iter::from_fn(|| received.try_recv().ok()).count()
    };

    // Watched: a relay loop of this process holds the outbox's wake-ups.
    let wakeups =
        Outbox::new(db.clone()).wakeups(Duration::from_millis(100), Duration::from_secs(1));
    commit_rows(0).await;
    assert_eq!(
        announced(&mut received),
        0,
        "this process's relay publishes them"
    );

    // Control: with nobody watching here, the same commits are announced.
    drop(wakeups);
    commit_rows(100).await;
    assert!(
        announced(&mut received) >= 1,
        "other processes' relays are woken"
    );
}
