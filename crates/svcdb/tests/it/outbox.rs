//! The transactional outbox: an event exists iff its transaction committed; relays claim rows
//! with SKIP LOCKED, mark what was published and reschedule what failed.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use svcdb::event::{Envelope, EventError, MAX_ENVELOPE_BYTES};
use svcdb::outbox::{self, Outbox, OutboxMessage, PublishRetry, RelayReport};
use svcdb::testing::TestDb;
use svcdb::{Error, ServiceDb, SqlState};
use uuid::Uuid;

async fn setup() -> (TestDb, ServiceDb) {
    let db = TestDb::new().await;
    let svc = db.service("orders").await;
    svc.install_outbox().await.unwrap();
    svc.get()
        .await
        .unwrap()
        .batch_execute("CREATE TABLE orders (id int PRIMARY KEY)")
        .await
        .unwrap();
    (db, svc)
}

fn order_placed(order_id: i32) -> Envelope {
    Envelope::new("OrderPlaced", "orders", json!({ "order_id": order_id }))
}

/// Places an order and enqueues its event in one transaction.
async fn place_order(svc: &ServiceDb, order_id: i32) -> Envelope {
    let event = order_placed(order_id);
    svc.transaction(async |tx| {
        tx.execute("INSERT INTO orders VALUES ($1)", &[&order_id])
            .await?;
        outbox::enqueue(tx, "orders", "order.placed", &event).await?;
        Ok::<_, Error>(())
    })
    .await
    .unwrap();
    event
}

/// A publisher that records what it was given and reports success for everything.
async fn relay_all(outbox: &Outbox, limit: usize) -> (RelayReport, Vec<OutboxMessage>) {
    let seen = Mutex::new(Vec::new());
    let report = outbox
        .relay_batch(limit, async |messages| {
            seen.lock().unwrap().extend_from_slice(messages);
            messages.iter().map(|_| Ok::<(), String>(())).collect()
        })
        .await
        .unwrap();
    (report, seen.into_inner().unwrap())
}

/// (attempts, last_error, published, seconds until next_attempt_at) of a row, by the
/// database's clock.
async fn row_state(svc: &ServiceDb, id: Uuid) -> (i32, Option<String>, bool, f64) {
    let row = svc
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT attempts, last_error, published_at IS NOT NULL,
                    extract(epoch FROM next_attempt_at - now())::float8
               FROM svcdb_outbox WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2), row.get(3))
}

#[tokio::test]
async fn an_event_enqueued_in_a_committed_transaction_is_relayed_once() {
    let (_db, svc) = setup().await;
    let event = place_order(&svc, 1).await;
    let outbox = Outbox::new(svc.clone());
    assert_eq!(outbox.pending_count().await.unwrap(), 1);

    let (report, seen) = relay_all(&outbox, 10).await;
    assert_eq!(
        report,
        RelayReport {
            claimed: 1,
            published: 1,
            failed: 0
        }
    );
    let message = &seen[0];
    assert_eq!(message.id, event.id);
    assert_eq!(
        (message.exchange.as_str(), message.routing_key.as_str()),
        ("orders", "order.placed")
    );
    assert_eq!(
        message.envelope, event,
        "the envelope survives jsonb unchanged"
    );
    assert_eq!(message.attempts, 0);
    assert_eq!(Envelope::from_slice(&message.body()).unwrap(), event);

    assert_eq!(outbox.pending_count().await.unwrap(), 0);
    let (report, seen) = relay_all(&outbox, 10).await;
    assert_eq!(report.claimed, 0);
    assert!(
        seen.is_empty(),
        "the publisher is not called with nothing to publish"
    );
    let (attempts, _, published, _) = row_state(&svc, event.id).await;
    assert_eq!((attempts, published), (1, true));
}

#[tokio::test]
async fn an_event_enqueued_in_a_rolled_back_transaction_does_not_exist() {
    let (_db, svc) = setup().await;
    let err = svc
        .transaction(async |tx| {
            outbox::enqueue(tx, "orders", "order.placed", &order_placed(1)).await?;
            tx.execute("INSERT INTO orders VALUES (1)", &[]).await?;
            tx.execute("INSERT INTO orders VALUES (1)", &[]).await?; // the business write fails
            Ok::<_, Error>(())
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::UNIQUE_VIOLATION));
    let outbox = Outbox::new(svc.clone());
    assert_eq!(outbox.pending_count().await.unwrap(), 0);
    assert_eq!(relay_all(&outbox, 10).await.0.claimed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_relays_skip_each_others_rows() {
    let (_db, svc) = setup().await;
    let mut ids = Vec::new();
    for n in 0..10 {
        ids.push(place_order(&svc, n).await.id);
    }
    let outbox = Outbox::new(svc.clone());

    // Relay A claims 5 rows and holds them (publishing) while relay B runs.
    let (claimed_tx, claimed_rx) = tokio::sync::oneshot::channel::<Vec<Uuid>>();
    let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
    let a = {
        let outbox = outbox.clone();
        tokio::spawn(async move {
            outbox
                .relay_batch(5, async move |messages| {
                    claimed_tx
                        .send(messages.iter().map(|m| m.id).collect())
                        .unwrap();
                    finish_rx.await.unwrap();
                    messages.iter().map(|_| Ok::<(), String>(())).collect()
                })
                .await
        })
    };
    let a_ids = claimed_rx.await.unwrap();
    assert_eq!(a_ids, ids[..5], "the oldest rows, in id order");

    let (b_report, b_seen) = relay_all(&outbox, 10).await;
    let b_ids: Vec<Uuid> = b_seen.iter().map(|m| m.id).collect();
    assert_eq!(
        b_report.claimed, 5,
        "B skipped A's locked rows instead of waiting"
    );
    assert_eq!(b_ids, ids[5..]);

    finish_tx.send(()).unwrap();
    assert_eq!(a.await.unwrap().unwrap().published, 5);
    assert_eq!(outbox.pending_count().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_relay_replicas_publish_every_row_exactly_once() {
    const REPLICAS: usize = 4;
    let (_db, svc) = setup().await;
    svc.transaction(async |tx| {
        for n in 0..200 {
            outbox::enqueue(tx, "orders", "order.placed", &order_placed(n)).await?;
        }
        Ok::<_, Error>(())
    })
    .await
    .unwrap();
    // Each replica's first batch holds its rows until every replica holds a batch: four
    // transactions with rows locked at once, the overlap SKIP LOCKED exists for. A replica
    // whose claim waited on another's locks would never reach the barrier.
    let all_holding = Arc::new(tokio::sync::Barrier::new(REPLICAS));
    let published = Arc::new(Mutex::new(Vec::<(usize, Uuid)>::new()));
    let replicas: Vec<_> = (0..REPLICAS)
        .map(|replica| {
            let outbox = Outbox::new(svc.clone());
            let (published, all_holding) = (published.clone(), all_holding.clone());
            // The shape of the AMQP relay loop: spawned, owned captures, until nothing is due.
            tokio::spawn(async move {
                let mut first = true;
                loop {
                    let (sink, barrier) = (published.clone(), all_holding.clone());
                    let hold = std::mem::replace(&mut first, false);
                    let report = outbox
                        .relay_batch(7, async move |messages| {
                            if hold {
                                tokio::time::timeout(Duration::from_secs(10), barrier.wait())
                                    .await
                                    .expect("every replica holds a batch at once");
                            }
                            let mut sink = sink.lock().unwrap();
                            sink.extend(messages.iter().map(|m| (replica, m.id)));
                            messages.iter().map(|_| Ok::<(), String>(())).collect()
                        })
                        .await?;
                    if report.claimed == 0 {
                        return Ok::<_, Error>(());
                    }
                }
            })
        })
        .collect();
    for replica in replicas {
        replica.await.unwrap().unwrap();
    }
    let published = std::mem::take(&mut *published.lock().unwrap());
    for replica in 0..REPLICAS {
        let rows = published.iter().filter(|(r, _)| *r == replica).count();
        assert!(rows >= 7, "replica {replica} published {rows} rows");
    }
    let distinct: HashSet<_> = published.iter().map(|(_, id)| id).collect();
    assert_eq!(published.len(), 200, "no row was published twice");
    assert_eq!(distinct.len(), 200);
    assert_eq!(Outbox::new(svc).pending_count().await.unwrap(), 0);
}

#[tokio::test]
async fn a_failed_publish_is_recorded_and_retried_when_due() {
    let (_db, svc) = setup().await;
    let events = [
        place_order(&svc, 1).await,
        place_order(&svc, 2).await,
        place_order(&svc, 3).await,
    ];
    let outbox = Outbox::new(svc.clone()).with_publish_retry(PublishRetry {
        retry_backoff: Duration::from_secs(3600),
        max_retry_backoff: Duration::from_secs(90 * 60),
    });

    // The broker refuses the second message.
    let report = outbox
        .relay_batch(10, async |messages| {
            messages
                .iter()
                .map(|m| {
                    if m.id == events[1].id {
                        Err("NOT_FOUND - no exchange 'orders'")
                    } else {
                        Ok(())
                    }
                })
                .collect()
        })
        .await
        .unwrap();
    assert_eq!(
        report,
        RelayReport {
            claimed: 3,
            published: 2,
            failed: 1
        }
    );
    let (attempts, last_error, published, due_in) = row_state(&svc, events[1].id).await;
    assert_eq!(attempts, 1);
    assert_eq!(
        last_error.as_deref(),
        Some("NOT_FOUND - no exchange 'orders'")
    );
    assert!(!published);
    assert!(
        (3500.0..=3600.0).contains(&due_in),
        "retried after the first backoff, 1 h: {due_in}"
    );
    assert_eq!(outbox.pending_count().await.unwrap(), 1);

    // Not due yet: the next batch leaves it alone.
    assert_eq!(relay_all(&outbox, 10).await.0.claimed, 0);

    // An hour passes; it fails again: the backoff doubles, capped at 90 min.
    let make_due = || async {
        svc.get()
            .await
            .unwrap()
            .execute("UPDATE svcdb_outbox SET next_attempt_at = now()", &[])
            .await
            .unwrap();
    };
    make_due().await;
    let report = outbox
        .relay_batch(10, async |messages| {
            messages
                .iter()
                .map(|_| Err("connection reset"))
                .collect::<Vec<Result<(), _>>>()
        })
        .await
        .unwrap();
    assert_eq!((report.claimed, report.failed), (1, 1));
    let (attempts, last_error, _, due_in) = row_state(&svc, events[1].id).await;
    assert_eq!(attempts, 2);
    assert_eq!(last_error.as_deref(), Some("connection reset"));
    assert!(
        (5300.0..=5400.0).contains(&due_in),
        "capped at 90 min: {due_in}"
    );

    // Due again, and the broker is back.
    make_due().await;
    let (report, seen) = relay_all(&outbox, 10).await;
    assert_eq!((report.claimed, report.published), (1, 1));
    assert_eq!(seen[0].id, events[1].id);
    assert_eq!(seen[0].attempts, 2, "the publisher sees earlier attempts");
    let (attempts, _, published, _) = row_state(&svc, events[1].id).await;
    assert_eq!((attempts, published), (3, true));
    assert_eq!(outbox.pending_count().await.unwrap(), 0);
}

#[tokio::test]
async fn a_publisher_that_returns_too_few_results_fails_the_rest() {
    let (_db, svc) = setup().await;
    let first = place_order(&svc, 1).await;
    let second = place_order(&svc, 2).await;
    let report = Outbox::new(svc.clone())
        .relay_batch(10, async |_messages| vec![Ok::<(), String>(())])
        .await
        .unwrap();
    assert_eq!((report.published, report.failed), (1, 1));
    assert!(row_state(&svc, first.id).await.2);
    let (attempts, last_error, published, _) = row_state(&svc, second.id).await;
    assert_eq!((attempts, published), (1, false));
    assert_eq!(
        last_error.as_deref(),
        Some("the publisher returned no result for this message")
    );
}

/// Fails unless every transaction on the test database has ended and the rows with `ids`
/// are not locked. Reading the rows from another session cannot tell: it never sees a
/// transaction's uncommitted work. A transaction left open shows as a backend `idle in
/// transaction`, and it holds its row locks, so locking the same rows fails at the lock
/// timeout (55P03).
async fn assert_nothing_left_open(db: &TestDb, ids: &[Uuid]) {
    // Not a pooled connection: the pool would hand out a leaked transaction's own connection,
    // whose locks are its own.
    let conn = db.admin().await;
    db.assert_no_transaction_left_open().await;
    conn.batch_execute("BEGIN; SET LOCAL search_path = orders; SET LOCAL lock_timeout = '5s'")
        .await
        .unwrap();
    let locked = conn
        .query(
            "SELECT id FROM svcdb_outbox WHERE id = ANY($1) FOR UPDATE",
            &[&ids],
        )
        .await;
    conn.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(locked.unwrap().len(), ids.len(), "the rows exist, unlocked");
}

#[tokio::test]
async fn a_panicking_publisher_releases_its_rows_unpublished() {
    let (db, svc) = setup().await;
    let event = place_order(&svc, 1).await;
    let outbox = Outbox::new(svc.clone());
    let panicking = {
        let outbox = outbox.clone();
        tokio::spawn(async move {
            outbox
                .relay_batch(10, async |_messages| -> Vec<Result<(), String>> {
                    panic!("publisher bug")
                })
                .await
        })
    };
    assert!(panicking.await.unwrap_err().is_panic());
    assert_nothing_left_open(&db, &[event.id]).await;
    let (report, seen) = relay_all(&outbox, 10).await;
    assert_eq!(report.published, 1);
    assert_eq!(seen[0].id, event.id);
    assert_eq!(seen[0].attempts, 0, "the panicked attempt left no trace");
}

#[tokio::test]
async fn a_mark_that_fails_fails_the_batch_and_leaves_its_rows_unpublished_and_unlocked() {
    let (db, _) = setup().await;
    // One connection, so the batch after the failure runs on the connection it failed on.
    let mut config = db.config("orders");
    config.pool_max = 1;
    let svc = ServiceDb::connect(config).await.unwrap();
    let event = place_order(&svc, 1).await;
    svc.get()
        .await
        .unwrap()
        .batch_execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN RAISE EXCEPTION 'no marks today'; END $$;
             CREATE TRIGGER refuse_marks BEFORE UPDATE ON svcdb_outbox
                 FOR EACH ROW EXECUTE FUNCTION refuse();",
        )
        .await
        .unwrap();
    let outbox = Outbox::new(svc.clone());
    let published = Mutex::new(0);
    let err = outbox
        .relay_batch(10, async |messages| {
            *published.lock().unwrap() += messages.len();
            messages.iter().map(|_| Ok::<(), String>(())).collect()
        })
        .await
        .unwrap_err();
    // The mark's own error, not a commit that quietly rolled back.
    assert_eq!(err.code(), Some(&SqlState::RAISE_EXCEPTION), "{err}");
    assert_eq!(*published.lock().unwrap(), 1);
    assert_nothing_left_open(&db, &[event.id]).await;
    assert!(!row_state(&svc, event.id).await.2, "not marked published");

    // The connection went back to the pool out of its transaction: the next batch claims
    // the row again, and with the trigger gone marks it.
    svc.get()
        .await
        .unwrap()
        .batch_execute("DROP TRIGGER refuse_marks ON svcdb_outbox")
        .await
        .unwrap();
    let (report, seen) = relay_all(&outbox, 10).await;
    assert_eq!((report.claimed, report.published), (1, 1));
    assert_eq!(seen[0].id, event.id);
    assert!(row_state(&svc, event.id).await.2);
    assert_eq!(svc.status().size, 1);
}

#[tokio::test]
async fn a_relay_on_a_database_that_refuses_writes_gets_a_database_unavailable_error() {
    let (db, svc) = setup().await;
    let event = place_order(&svc, 1).await;
    // How a primary is fenced during a switchover (here for this database only). Sessions
    // opened before the fence are not fenced: this one lifts it again.
    let admin = db.admin().await;
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{}\" SET default_transaction_read_only = on",
            db.name()
        ))
        .await
        .unwrap();
    let mut config = db.config("orders");
    config.create_schema = false;
    let fenced = ServiceDb::connect(config).await.unwrap();
    let err = Outbox::new(fenced)
        .relay_batch(10, async |messages| {
            messages.iter().map(|_| Ok::<(), String>(())).collect()
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&SqlState::READ_ONLY_SQL_TRANSACTION),
        "{err}"
    );
    assert!(err.is_database_unavailable(), "{err}");
    // Control: the fence is what refused it; the pool connected before it relays the row.
    let (report, _) = relay_all(&Outbox::new(svc.clone()), 10).await;
    assert_eq!(report.published, 1);
    // Lifted, so that the check's own session can lock the row.
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{}\" RESET default_transaction_read_only",
            db.name()
        ))
        .await
        .unwrap();
    assert_nothing_left_open(&db, &[event.id]).await;
}

#[tokio::test]
async fn an_unreadable_stored_envelope_is_failed_not_published() {
    let (_db, svc) = setup().await;
    let good = place_order(&svc, 1).await;
    let bad = Uuid::now_v7();
    svc.get()
        .await
        .unwrap()
        .execute(
            "INSERT INTO svcdb_outbox (id, exchange, routing_key, envelope)
             VALUES ($1, 'orders', 'order.placed', '{\"kind\": \"OrderPlaced\"}')",
            &[&bad],
        )
        .await
        .unwrap();
    let (report, seen) = relay_all(&Outbox::new(svc.clone()), 10).await;
    assert_eq!(
        report,
        RelayReport {
            claimed: 2,
            published: 1,
            failed: 1
        }
    );
    assert_eq!(seen.iter().map(|m| m.id).collect::<Vec<_>>(), [good.id]);
    let (attempts, last_error, published, _) = row_state(&svc, bad).await;
    assert_eq!((attempts, published), (1, false));
    let last_error = last_error.unwrap();
    assert!(
        last_error.starts_with("the stored envelope is invalid: "),
        "{last_error}"
    );
}

#[tokio::test]
async fn enqueue_refuses_what_the_relay_could_never_publish() {
    let (_db, svc) = setup().await;
    let enqueue = |exchange: &'static str, routing_key: String, envelope: Envelope| {
        let svc = svc.clone();
        async move {
            svc.transaction(async |tx| outbox::enqueue(tx, exchange, &routing_key, &envelope).await)
                .await
        }
    };
    let err = enqueue("orders; drop", "k".into(), order_placed(1))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Ident(e) if e.what == "exchange"),
        "{err:?}"
    );
    let err = enqueue("orders", "k".repeat(256), order_placed(1))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Ident(e) if e.what == "routing key"),
        "{err:?}"
    );

    let mut no_kind = order_placed(1);
    no_kind.kind = " ".into();
    let err = enqueue("orders", "k".into(), no_kind).await.unwrap_err();
    assert!(matches!(
        err,
        Error::Event(EventError::EmptyField { field: "kind" })
    ));
    let mut nil_id = order_placed(1);
    nil_id.id = Uuid::nil();
    let err = enqueue("orders", "k".into(), nil_id).await.unwrap_err();
    assert!(matches!(
        err,
        Error::Event(EventError::InvalidField { field: "id", .. })
    ));
    let huge = Envelope::new(
        "OrderPlaced",
        "orders",
        json!({ "blob": "x".repeat(MAX_ENVELOPE_BYTES) }),
    );
    let err = enqueue("orders", "k".into(), huge).await.unwrap_err();
    assert!(matches!(err, Error::Event(EventError::TooLarge { .. })));
    // Found by a user trial: a NUL in a string reached the INSERT, which jsonb refused
    // (22P05), aborting the caller's business write. Refused first, wherever it is; a
    // backslash-u written out in text is no NUL (the control).
    let mut nul_kind = order_placed(1);
    nul_kind.kind = "Order\u{0}Placed".into();
    for (field, envelope) in [
        (
            "payload",
            Envelope::new("OrderPlaced", "orders", json!({ "name": "a\u{0}b" })),
        ),
        (
            "payload",
            Envelope::new(
                "OrderPlaced",
                "orders",
                json!({ "lines": [{ "note": "\u{0}" }] }),
            ),
        ),
        (
            "payload",
            Envelope::new("OrderPlaced", "orders", json!({ "k\u{0}": 1 })),
        ),
        ("kind", nul_kind),
    ] {
        let err = enqueue("orders", "k".into(), envelope).await.unwrap_err();
        assert!(
            matches!(&err, Error::Event(EventError::InvalidField { field: f, .. }) if *f == field),
            "{err:?}"
        );
    }
    enqueue(
        "orders",
        "k".into(),
        Envelope::new("OrderPlaced", "orders", json!({ "text": "\\u0000" })),
    )
    .await
    .unwrap();

    // The default exchange (empty name) is fine; one envelope id twice is not.
    let event = order_placed(1);
    enqueue("", "orders-queue".into(), event.clone())
        .await
        .unwrap();
    let err = enqueue("", "orders-queue".into(), event).await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::UNIQUE_VIOLATION));
    assert_eq!(Outbox::new(svc).pending_count().await.unwrap(), 2);
}

#[tokio::test]
async fn purge_deletes_old_published_rows_only() {
    let (_db, svc) = setup().await;
    let events = [
        place_order(&svc, 1).await,
        place_order(&svc, 2).await,
        place_order(&svc, 3).await,
    ];
    let outbox = Outbox::new(svc.clone());
    // Publish the first two; the third fails.
    outbox
        .relay_batch(10, async |messages| {
            messages
                .iter()
                .map(|m| {
                    if m.id == events[2].id {
                        Err("down")
                    } else {
                        Ok(())
                    }
                })
                .collect()
        })
        .await
        .unwrap();
    svc.get()
        .await
        .unwrap()
        .execute(
            "UPDATE svcdb_outbox
                SET created_at = now() - interval '8 days',
                    published_at = published_at - interval '8 days' -- stays NULL if unpublished
              WHERE id = $1 OR id = $2",
            &[&events[0].id, &events[2].id],
        )
        .await
        .unwrap();
    let week = Duration::from_secs(7 * 24 * 3600);
    // events[2] is as old, but was never published: it is kept.
    assert_eq!(outbox.purge_published(week).await.unwrap(), 1);
    assert_eq!(outbox.purge_published(week).await.unwrap(), 0);
    let left: Vec<Uuid> = svc
        .get()
        .await
        .unwrap()
        .query("SELECT id FROM svcdb_outbox ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, [events[1].id, events[2].id]);
    assert_eq!(outbox.pending_count().await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_is_idempotent_and_safe_from_concurrent_replicas() {
    // Eight replicas start at once, each with its own pool, each installing both tables.
    let db = TestDb::new().await;
    let mut replicas = Vec::new();
    for _ in 0..8 {
        replicas.push(db.service("orders").await);
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(8));
    let tasks: Vec<_> = replicas
        .iter()
        .cloned()
        .map(|svc| {
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                svc.install_outbox().await?;
                svc.install_idempotency().await
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let svc = &replicas[0];
    svc.install_outbox().await.unwrap(); // and once more, later
    svc.install_idempotency().await.unwrap();
    let placed: Vec<(String, String)> = svc
        .get()
        .await
        .unwrap()
        .query(
            "SELECT tablename::text, schemaname::text FROM pg_tables
              WHERE tablename = ANY($1) ORDER BY tablename",
            &[&[
                outbox::OUTBOX_TABLE,
                svcdb::idempotency::PROCESSED_EVENTS_TABLE,
            ]
            .as_slice()],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        placed,
        [
            (outbox::OUTBOX_TABLE.to_owned(), "orders".to_owned()),
            (
                svcdb::idempotency::PROCESSED_EVENTS_TABLE.to_owned(),
                "orders".to_owned()
            ),
        ],
        "both in the service schema, nowhere else"
    );
    let index: Option<String> = svc
        .get()
        .await
        .unwrap()
        .query_opt(
            "SELECT indexdef FROM pg_indexes
              WHERE schemaname = 'orders' AND indexname = 'svcdb_outbox_unpublished_idx'",
            &[],
        )
        .await
        .unwrap()
        .map(|r| r.get(0));
    let index = index.expect("the index on unpublished rows exists");
    assert!(
        index.ends_with("WHERE (published_at IS NULL)"),
        "partial, on unpublished rows only: {index}"
    );
}

#[tokio::test]
async fn the_ddl_constants_work_as_a_migration() {
    // Teams may put the DDL in their own migrations instead of calling install_*.
    let db = TestDb::new().await;
    let svc = db.service("orders").await;
    let conn = svc.get().await.unwrap();
    conn.batch_execute(outbox::OUTBOX_SQL).await.unwrap();
    conn.batch_execute(svcdb::idempotency::PROCESSED_EVENTS_SQL)
        .await
        .unwrap();
    drop(conn);
    svc.install_outbox().await.unwrap();
    svc.install_idempotency().await.unwrap();
    assert!(svc.table_exists(outbox::OUTBOX_TABLE).await.unwrap());
    assert!(svc
        .table_exists(svcdb::idempotency::PROCESSED_EVENTS_TABLE)
        .await
        .unwrap());
}

/// Found by a user trial: a replica starting ran `CREATE INDEX IF NOT EXISTS` on the outbox,
/// which waits for a SHARE lock behind any transaction writing it, and every later write
/// queued behind that (another replica's requests took 11 s). Installed already, the tables
/// are only looked up in the catalog: no lock. The control: a missing index still gets made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installing_over_installed_tables_takes_no_lock() {
    let db = TestDb::new().await;
    let svc = db.service("shop").await;
    svc.install_outbox().await.unwrap();
    svc.install_idempotency().await.unwrap();
    let writer = db.admin().await;
    writer
        .batch_execute(
            "BEGIN; LOCK TABLE shop.svcdb_outbox, shop.svcdb_processed_events IN ROW EXCLUSIVE MODE",
        )
        .await
        .unwrap();
    let installed = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        svc.install_outbox().await?;
        svc.install_idempotency().await
    })
    .await;
    assert!(matches!(installed, Ok(Ok(()))), "{installed:?}");
    writer.batch_execute("COMMIT").await.unwrap();

    writer
        .batch_execute("DROP INDEX shop.svcdb_outbox_published_at_idx")
        .await
        .unwrap();
    svc.install_outbox().await.unwrap();
    let made: bool = writer
        .query_one(
            "SELECT to_regclass('shop.svcdb_outbox_published_at_idx') IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(made);
}

/// Found by a user trial: `enqueue` before the outbox was installed (and `process_once` before
/// the claims table was) failed with a bare `relation "svcdb_outbox" does not exist`. Each
/// says how to install its table, by its SQLSTATE still (42P01); a missing table of the
/// service's own gets no such hint (the control).
#[tokio::test]
async fn svcdb_tables_not_installed_yet_say_how_to_install_them() {
    let db = TestDb::new().await;
    let svc = db.service("orders").await;
    let event = order_placed(1);
    let err = svc
        .transaction(async |tx| outbox::enqueue(tx, "orders", "order.placed", &event).await)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::UNDEFINED_TABLE));
    assert!(err.to_string().contains("install_outbox"), "{err}");

    let err = svc
        .process_once("orders.x", &event, async |_tx| Ok::<_, Error>(()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::UNDEFINED_TABLE));
    assert!(err.to_string().contains("install_idempotency"), "{err}");

    let err = svc
        .transaction(async |tx| {
            tx.execute("SELECT FROM no_such", &[])
                .await
                .map_err(Error::from)
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::UNDEFINED_TABLE));
    assert!(!err.to_string().contains("hint: install"), "{err}");
}
