//! Idempotent event handling: the claim commits with the handler's writes, so a redelivered
//! event has its effects once; and the envelope's decoding errors, by variant.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use svcdb::event::{Envelope, EventError, MAX_ENVELOPE_BYTES};
use svcdb::idempotency::{self, Processed};
use svcdb::testing::TestDb;
use svcdb::{Error, ServiceDb, SqlState, TxOptions};
use uuid::Uuid;

const CONSUMER: &str = "catalog.reserve-stock";

/// The catalog service: products with stock, and the claims table.
async fn setup() -> (TestDb, ServiceDb) {
    let db = TestDb::new().await;
    let svc = db.service("catalog").await;
    svc.install_idempotency().await.unwrap();
    svc.get()
        .await
        .unwrap()
        .batch_execute(
            "CREATE TABLE products (id text PRIMARY KEY, stock int NOT NULL);
             INSERT INTO products VALUES ('abc123', 100);",
        )
        .await
        .unwrap();
    (db, svc)
}

/// The design notes' event: 5 units of abc123 reserved.
fn stock_reserved() -> Envelope {
    Envelope::new(
        "ProductStockReserved",
        "orders",
        json!({ "product_id": "abc123", "quantity": 5 }),
    )
}

#[derive(serde::Deserialize)]
struct StockReserved {
    product_id: String,
    quantity: i32,
}

/// The consumer's handler: decode the message, reserve the stock once. Written as a spawned
/// consumer loop would (owned captures, `async move`), which also proves the future is `Send`.
async fn handle(svc: ServiceDb, body: Vec<u8>) -> Result<Processed<()>, Error> {
    let event = Envelope::from_slice(&body).map_err(Error::from)?;
    let reserved: StockReserved = event.payload_as().map_err(Error::from)?;
    svc.process_once(CONSUMER, &event, async move |tx| {
        tx.execute(
            "UPDATE products SET stock = stock - $1 WHERE id = $2",
            &[&reserved.quantity, &reserved.product_id],
        )
        .await?;
        Ok::<_, Error>(())
    })
    .await
}

async fn stock(svc: &ServiceDb) -> i32 {
    svc.get()
        .await
        .unwrap()
        .query_one("SELECT stock FROM products WHERE id = 'abc123'", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_redelivered_event_reserves_stock_once() {
    let (_db, svc) = setup().await;
    let event = stock_reserved();
    let body = event.to_json_bytes();

    let first = tokio::spawn(handle(svc.clone(), body.clone()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first, Processed::Done(()));
    // The acknowledgement was lost; RabbitMQ delivers the same message again.
    let second = tokio::spawn(handle(svc.clone(), body))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second, Processed::Duplicate);

    assert_eq!(stock(&svc).await, 95, "reserved 5 units once, not 10");
    assert!(svc.is_processed(CONSUMER, event.id).await.unwrap());
    let kind: Option<String> = svc
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT kind FROM svcdb_processed_events WHERE event_id = $1",
            &[&event.id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(kind.as_deref(), Some("ProductStockReserved"));
}

#[tokio::test]
async fn a_duplicate_does_not_run_the_handler() {
    let (_db, svc) = setup().await;
    let id = Uuid::now_v7(); // a bare id works too; the kind is then not recorded
    let runs = AtomicU32::new(0);
    for _ in 0..3 {
        svc.process_once(CONSUMER, id, async |_tx| {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// Fails unless every transaction on the test database has ended and `event` is free to
/// claim. `is_processed` and the stock, read from another session, cannot tell: they never
/// see uncommitted work. A transaction left open shows as a backend `idle in transaction`,
/// and a claim it holds makes the same claim wait, failing at the lock timeout (55P03).
async fn assert_nothing_left_open(db: &TestDb, event: &Envelope) {
    // Not a pooled connection: the pool would hand out a leaked transaction's own connection,
    // whose claim is its own.
    let mut conn = db.admin().await;
    db.assert_no_transaction_left_open().await;
    let tx = conn.transaction().await.unwrap();
    tx.batch_execute("SET LOCAL search_path = catalog; SET LOCAL lock_timeout = '5s'")
        .await
        .unwrap();
    let claimed = idempotency::claim(&tx, CONSUMER, event).await;
    tx.rollback().await.unwrap();
    assert!(claimed.unwrap(), "the event is free to claim");
}

#[tokio::test]
async fn a_handler_error_rolls_back_the_claim_and_the_redelivery_processes_it() {
    let (db, svc) = setup().await;
    let event = stock_reserved();

    #[derive(Debug)]
    enum HandlerError {
        PaymentServiceDown,
        Db(#[allow(dead_code)] Error),
    }
    impl From<Error> for HandlerError {
        fn from(e: Error) -> Self {
            HandlerError::Db(e)
        }
    }
    let err = svc
        .process_once(CONSUMER, &event, async |tx| {
            tx.execute("UPDATE products SET stock = stock - 5", &[])
                .await
                .map_err(Error::from)?;
            Err::<(), _>(HandlerError::PaymentServiceDown)
        })
        .await
        .unwrap_err();
    assert!(matches!(err, HandlerError::PaymentServiceDown));
    assert_nothing_left_open(&db, &event).await;
    assert_eq!(stock(&svc).await, 100, "the business write rolled back");
    assert!(
        !svc.is_processed(CONSUMER, event.id).await.unwrap(),
        "the claim rolled back with it"
    );

    let redelivered = handle(svc.clone(), event.to_json_bytes()).await.unwrap();
    assert_eq!(redelivered, Processed::Done(()));
    assert_eq!(stock(&svc).await, 95);
}

#[tokio::test]
async fn a_handler_panic_rolls_back_the_claim_and_the_redelivery_processes_it() {
    let (db, svc) = setup().await;
    let event = stock_reserved();
    let panicking = {
        let svc = svc.clone();
        let event = event.clone();
        tokio::spawn(async move {
            svc.process_once(CONSUMER, &event, async |tx| {
                tx.execute("UPDATE products SET stock = stock - 5", &[])
                    .await?;
                panic!("handler bug");
                #[allow(unreachable_code)]
                Ok::<_, Error>(())
            })
            .await
        })
    };
    assert!(panicking.await.unwrap_err().is_panic());
    assert_nothing_left_open(&db, &event).await;
    assert_eq!(stock(&svc).await, 100);
    assert!(!svc.is_processed(CONSUMER, event.id).await.unwrap());

    let redelivered = handle(svc.clone(), event.to_json_bytes()).await.unwrap();
    assert_eq!(redelivered, Processed::Done(()));
    assert_eq!(stock(&svc).await, 95);
}

/// A pool for eight deliveries at once and a session watching them (the test pools hold 5).
async fn wide_pool(db: &TestDb) -> ServiceDb {
    let mut config = db.config("catalog");
    config.pool_max = 9;
    ServiceDb::connect(config).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_deliveries_reserve_stock_once() {
    let (db, _) = setup().await;
    let svc = wide_pool(&db).await;
    let event = stock_reserved();
    let barrier = Arc::new(tokio::sync::Barrier::new(8));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (svc, event, barrier) = (svc.clone(), event.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let watcher = svc.clone();
                svc.process_once(CONSUMER, &event, async move |tx| {
                    // The first claim commits only once the seven others wait on it: all
                    // eight deliveries in flight at once.
                    until_lock_waiters(&watcher, 7).await;
                    tx.execute(
                        "UPDATE products SET stock = stock - 5 WHERE id = 'abc123'",
                        &[],
                    )
                    .await?;
                    Ok::<_, Error>(())
                })
                .await
            })
        })
        .collect();
    let mut done = 0;
    let mut duplicate = 0;
    for task in tasks {
        match task.await.unwrap().unwrap() {
            Processed::Done(()) => done += 1,
            Processed::Duplicate => duplicate += 1,
        }
    }
    assert_eq!((done, duplicate), (1, 7));
    assert_eq!(stock(&svc).await, 95);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_serializable_deliveries_retry_into_duplicates() {
    let (db, _) = setup().await;
    let svc = wide_pool(&db).await;
    let event = stock_reserved();
    let runs = Arc::new(AtomicU32::new(0));
    let barrier = Arc::new(tokio::sync::Barrier::new(8));
    let options = TxOptions {
        max_attempts: 10,
        ..TxOptions::serializable()
    };
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (svc, event, barrier, runs, options) = (
                svc.clone(),
                event.clone(),
                barrier.clone(),
                runs.clone(),
                options.clone(),
            );
            tokio::spawn(async move {
                barrier.wait().await;
                let watcher = svc.clone();
                svc.process_once_with(&options, CONSUMER, &event, async move |tx| {
                    runs.fetch_add(1, Ordering::SeqCst);
                    // The seven others wait on this claim, and fail when it commits.
                    until_lock_waiters(&watcher, 7).await;
                    tx.execute(
                        "UPDATE products SET stock = stock - 5 WHERE id = 'abc123'",
                        &[],
                    )
                    .await?;
                    Ok::<_, Error>(())
                })
                .await
            })
        })
        .collect();
    let mut done = 0;
    for task in tasks {
        if let Processed::Done(()) = task.await.unwrap().unwrap() {
            done += 1;
        }
    }
    assert_eq!(done, 1);
    assert_eq!(stock(&svc).await, 95);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "a racing duplicate's serialization failure is retried into a Duplicate, not a second run"
    );
}

/// Waits until `n` sessions of the test database wait on a lock; fails after 10 s.
async fn until_lock_waiters(svc: &ServiceDb, n: i64) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while lock_waiters(svc).await < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{n} sessions never waited on a lock at once"));
}

/// Number of sessions of the test database waiting on a lock.
async fn lock_waiters(svc: &ServiceDb) -> i64 {
    svc.get()
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND wait_event_type = 'Lock'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// Runs a first delivery that holds its claim uncommitted until told to finish (commit if
/// `commit`, else fail), starts a second delivery that must wait for it, and returns the
/// second delivery's outcome.
async fn second_delivery_while_first_in_flight(commit: bool) -> (ServiceDb, Processed<()>) {
    let (db, svc) = setup().await;
    let event = stock_reserved();
    let (claimed_tx, claimed_rx) = tokio::sync::oneshot::channel::<()>();
    let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
    let first = {
        let (svc, event) = (svc.clone(), event.clone());
        tokio::spawn(async move {
            svc.process_once(CONSUMER, &event, async move |tx| {
                tx.execute("UPDATE products SET stock = stock - 5", &[])
                    .await?;
                claimed_tx.send(()).unwrap();
                finish_rx.await.unwrap();
                if commit {
                    Ok(())
                } else {
                    Err(anyhow::anyhow!("payment service down"))
                }
            })
            .await
        })
    };
    claimed_rx.await.unwrap();
    let second = tokio::spawn(handle(svc.clone(), event.to_json_bytes()));
    // The second claim blocks on the first's uncommitted row: wait until the server says so.
    until_lock_waiters(&svc, 1).await;
    assert!(!second.is_finished());
    finish_tx.send(()).unwrap();
    let first = first.await.unwrap();
    match first {
        Ok(outcome) => assert!(commit && outcome == Processed::Done(()), "{outcome:?}"),
        Err(e) => assert!(!commit && e.to_string() == "payment service down", "{e}"),
    }
    let second = second.await.unwrap().unwrap();
    assert_eq!(stock(&svc).await, 95, "the stock moved exactly once");
    drop(db);
    (svc, second)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_racing_a_committed_one_is_a_duplicate() {
    let (_svc, second) = second_delivery_while_first_in_flight(true).await;
    assert_eq!(second, Processed::Duplicate);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_racing_a_failed_one_processes_the_event() {
    let (_svc, second) = second_delivery_while_first_in_flight(false).await;
    assert_eq!(second, Processed::Done(()));
}

#[tokio::test]
async fn each_consumer_processes_an_event_once() {
    let (_db, svc) = setup().await;
    let event = stock_reserved();
    for consumer in ["catalog.reserve-stock", "catalog.audit"] {
        let outcome = svc
            .process_once(consumer, &event, async |_tx| Ok::<_, Error>(consumer))
            .await
            .unwrap();
        assert_eq!(outcome, Processed::Done(consumer));
    }
    for consumer in ["catalog.reserve-stock", "catalog.audit"] {
        let outcome = svc
            .process_once(consumer, &event, async |_tx| Ok::<_, Error>(consumer))
            .await
            .unwrap();
        assert!(outcome.is_duplicate(), "{consumer}");
    }
}

#[tokio::test]
async fn claim_runs_in_the_callers_transaction() {
    let (_db, svc) = setup().await;
    let event = stock_reserved();
    let mut conn = svc.get().await.unwrap();

    // Rolled back: the claim goes with it.
    let tx = conn.transaction().await.unwrap();
    assert!(idempotency::claim(&tx, CONSUMER, &event).await.unwrap());
    tx.rollback().await.unwrap();
    assert!(!svc.is_processed(CONSUMER, event.id).await.unwrap());

    // Committed: a second claim, in another transaction, is refused.
    let tx = conn.transaction().await.unwrap();
    assert!(idempotency::claim(&tx, CONSUMER, &event).await.unwrap());
    tx.execute("UPDATE products SET stock = stock - 5", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let tx = conn.transaction().await.unwrap();
    assert!(!idempotency::claim(&tx, CONSUMER, event.id).await.unwrap());
    drop(tx);
    drop(conn);
    assert_eq!(stock(&svc).await, 95);
}

#[tokio::test]
async fn purge_deletes_claims_older_than_the_retention() {
    let (_db, svc) = setup().await;
    let ids: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
    for id in &ids {
        svc.process_once(CONSUMER, *id, async |_tx| Ok::<_, Error>(()))
            .await
            .unwrap();
    }
    // Two of the claims are three days old.
    svc.get()
        .await
        .unwrap()
        .execute(
            "UPDATE svcdb_processed_events SET processed_at = now() - interval '3 days'
              WHERE event_id = ANY($1)",
            &[&&ids[..2]],
        )
        .await
        .unwrap();
    let day = Duration::from_secs(24 * 3600);
    assert_eq!(svc.purge_processed(day).await.unwrap(), 2);
    assert_eq!(svc.purge_processed(day).await.unwrap(), 0);
    assert!(!svc.is_processed(CONSUMER, ids[0]).await.unwrap());
    assert!(!svc.is_processed(CONSUMER, ids[1]).await.unwrap());
    assert!(svc.is_processed(CONSUMER, ids[2]).await.unwrap());
    // The documented trade-off: a purged event delivered again is processed again.
    let again = svc
        .process_once(CONSUMER, ids[0], async |_tx| Ok::<_, Error>(()))
        .await
        .unwrap();
    assert_eq!(again, Processed::Done(()));
}

#[tokio::test]
async fn a_purge_deletes_more_than_one_batch_and_does_not_wait_on_locked_claims() {
    let (_db, svc) = setup().await;
    let old = 2 * idempotency::PURGE_BATCH_ROWS + 1;
    svc.get()
        .await
        .unwrap()
        .execute(
            "INSERT INTO svcdb_processed_events (consumer, event_id, processed_at)
             SELECT $1, gen_random_uuid(), now() - interval '3 days' FROM generate_series(1, $2::bigint)",
            &[&CONSUMER, &old],
        )
        .await
        .unwrap();
    // Another transaction holds one old claim (a replica's purge, a handler's re-claim).
    let mut holder = svc.get().await.unwrap();
    let tx = holder.transaction().await.unwrap();
    let held: Uuid = tx
        .query_one(
            "SELECT event_id FROM svcdb_processed_events LIMIT 1 FOR UPDATE",
            &[],
        )
        .await
        .unwrap()
        .get(0);

    // One unbounded DELETE would wait on the held row for as long as it is held.
    let day = Duration::from_secs(24 * 3600);
    let purged = tokio::time::timeout(Duration::from_secs(10), svc.purge_processed(day))
        .await
        .expect("the purge skips the locked row instead of waiting on it")
        .unwrap();
    assert_eq!(purged, old as u64 - 1);
    assert!(svc.is_processed(CONSUMER, held).await.unwrap());
    // Awaited: a dropped transaction's ROLLBACK is only queued, and a purge that ran before
    // it arrived would skip the row again.
    tx.rollback().await.unwrap();
    assert_eq!(
        svc.purge_processed(day).await.unwrap(),
        1,
        "taken next time"
    );
}

#[tokio::test]
async fn invalid_consumer_names_are_refused_before_any_sql() {
    // No claims table: a refusal that reached the server would be 42P01 instead.
    let db = TestDb::new().await;
    let svc = db.service("catalog").await;
    let long = "c".repeat(idempotency::MAX_CONSUMER_BYTES + 1);
    for bad in ["", " ", "line\nbreak", long.as_str()] {
        let ran = AtomicU32::new(0);
        let err = svc
            .process_once(bad, Uuid::now_v7(), async |_tx| {
                ran.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(())
            })
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::Ident(e) if e.what == "consumer"),
            "{bad:?}: {err:?}"
        );
        assert_eq!(ran.load(Ordering::SeqCst), 0);
        let err = svc.is_processed(bad, Uuid::now_v7()).await.unwrap_err();
        assert!(matches!(&err, Error::Ident(e) if e.what == "consumer"));
    }
    // A valid name reaches the server, which says the table is missing.
    let err = svc
        .process_once(CONSUMER, Uuid::now_v7(), async |_tx| Ok::<_, Error>(()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::UNDEFINED_TABLE));
}

#[tokio::test]
async fn install_refuses_a_missing_schema_instead_of_using_public() {
    let db = TestDb::new().await;
    let mut config = db.config("missing_schema");
    config.create_schema = false;
    config.extra_schemas = vec![svcdb::Ident::new("schema", "public").unwrap()];
    // `new`: `connect` itself refuses a schema that does not exist.
    let svc = ServiceDb::new(config).unwrap();
    let err = svc.install_idempotency().await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INVALID_SCHEMA_NAME));
    let in_public: i64 = db
        .admin()
        .await
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE tablename = 'svcdb_processed_events'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(in_public, 0);
}

#[test]
fn envelope_round_trips_through_json() {
    let cause = Envelope::new("OrderPlaced", "orders", json!({ "order_id": 7 }));
    let event = stock_reserved().caused_by(&cause);
    let bytes = event.to_json_bytes();
    let back = Envelope::from_slice(&bytes).unwrap();
    assert_eq!(back, event);
    assert_eq!(back.id.get_version_num(), 7);
    assert_eq!(back.causation_id, Some(cause.id));
    assert_eq!(back.correlation_id, Some(cause.id));
    // serde goes through the same validation.
    assert_eq!(serde_json::from_slice::<Envelope>(&bytes).unwrap(), event);
    let reserved: StockReserved = back.payload_as().unwrap();
    assert_eq!(
        (reserved.product_id.as_str(), reserved.quantity),
        ("abc123", 5)
    );
}

#[test]
fn envelope_decoding_is_tolerant_where_it_can_be() {
    // Unknown fields are ignored; absent correlation/causation are None; a null payload is kept.
    let body = json!({
        "id": "01912f6e-8a38-7cc1-9f5b-3c1e5a0f2b7d",
        "kind": "ProductStockReserved",
        "occurred_at": "2025-01-15T10:01:00+01:00",
        "source": "orders",
        "payload": null,
        "schema_version": 2,
    });
    let e = Envelope::from_slice(body.to_string().as_bytes()).unwrap();
    assert_eq!(e.correlation_id, None);
    assert_eq!(e.payload, serde_json::Value::Null);
    assert_eq!(e.occurred_at.to_rfc3339(), "2025-01-15T09:01:00+00:00");
}

#[test]
fn malformed_envelopes_are_refused_with_the_matching_variant() {
    let valid = json!({
        "id": "01912f6e-8a38-7cc1-9f5b-3c1e5a0f2b7d",
        "kind": "ProductStockReserved",
        "occurred_at": "2025-01-15T09:01:00Z",
        "source": "orders",
        "correlation_id": null,
        "causation_id": null,
        "payload": { "product_id": "abc123", "quantity": 5 },
    });
    Envelope::from_slice(valid.to_string().as_bytes()).unwrap();
    let with = |field: &str, value: serde_json::Value| {
        let mut v = valid.clone();
        v[field] = value;
        Envelope::from_slice(v.to_string().as_bytes())
    };
    let without = |field: &str| {
        let mut v = valid.clone();
        v.as_object_mut().unwrap().remove(field);
        Envelope::from_slice(v.to_string().as_bytes())
    };

    for body in [&b"not json"[..], b"{\"id\": ", b"\xff\xfe", b""] {
        assert!(
            matches!(Envelope::from_slice(body), Err(EventError::NotJson { .. })),
            "{body:?}"
        );
    }
    assert_eq!(
        Envelope::from_slice(b"[1, 2]"),
        Err(EventError::NotAnObject { found: "array" })
    );
    assert_eq!(without("id"), Err(EventError::MissingField { field: "id" }));
    assert_eq!(
        with("id", serde_json::Value::Null),
        Err(EventError::MissingField { field: "id" })
    );
    for bad_id in [
        json!("abc123"),
        json!(42),
        json!("00000000-0000-0000-0000-000000000000"),
    ] {
        assert!(
            matches!(
                with("id", bad_id.clone()),
                Err(EventError::InvalidField { field: "id", .. })
            ),
            "{bad_id}"
        );
    }
    for empty in ["", "   "] {
        assert_eq!(
            with("kind", json!(empty)),
            Err(EventError::EmptyField { field: "kind" })
        );
    }
    assert_eq!(
        with("source", json!("")),
        Err(EventError::EmptyField { field: "source" })
    );
    assert!(matches!(
        with("kind", json!(["x"])),
        Err(EventError::InvalidField { field: "kind", .. })
    ));
    assert!(matches!(
        with("occurred_at", json!("yesterday")),
        Err(EventError::InvalidField {
            field: "occurred_at",
            ..
        })
    ));
    assert!(matches!(
        with("causation_id", json!("not-a-uuid")),
        Err(EventError::InvalidField {
            field: "causation_id",
            ..
        })
    ));
    assert_eq!(
        without("payload"),
        Err(EventError::MissingField { field: "payload" })
    );
    let huge = vec![b' '; MAX_ENVELOPE_BYTES + 1];
    assert_eq!(
        Envelope::from_slice(&huge),
        Err(EventError::TooLarge {
            size: MAX_ENVELOPE_BYTES + 1,
            max: MAX_ENVELOPE_BYTES
        })
    );

    // A well-formed envelope whose payload is not what the handler expects.
    let event = Envelope::new(
        "ProductStockReserved",
        "orders",
        json!({ "quantity": "five" }),
    );
    assert!(matches!(
        event.payload_as::<StockReserved>(),
        Err(EventError::Payload { id, .. }) if id == event.id
    ));
    // Every error converts into svcdb::Error for `?` in handlers.
    let err: Error = EventError::EmptyField { field: "kind" }.into();
    assert!(matches!(err, Error::Event(EventError::EmptyField { .. })));
}
