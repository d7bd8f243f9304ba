//! `/metrics` after real deliveries and a real broker outage: the values move as the events
//! go. Every test reads only the series labelled with its own database (`db_namespace`), so
//! tests in this binary share the process's one recorder without reading each other's counts.

use crate::common;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{amqp, closed_port, eventually, unique, url_via, Broker};
use http_body_util::BodyExt;
use svcdb::outbox;
use svcdb::{Envelope, Outbox, ServiceDb};
use svcdb_amqp::topology::{events_exchange, QueueSpec, Topology};
use svcdb_amqp::{AmqpConfig, Consumer, ConsumerOptions, HandlerError, Relay, RelayConfig};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// `GET /metrics` through svcdb's metrics router (what the `Service` runtime serves), without
/// a socket.
async fn scrape(db: &ServiceDb) -> String {
    let response = svcdb::http::metrics_router::<()>(db.clone())
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let body = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

/// The value of the series `name` carrying all of `db`'s labels and `extra`, if scraped.
pub(crate) fn value(text: &str, db: &ServiceDb, name: &str, extra: &[(&str, &str)]) -> Option<f64> {
    let wanted: Vec<String> = db
        .metric_labels()
        .iter()
        .map(|l| format!("{}=\"{}\"", l.key(), l.value()))
        .chain(extra.iter().map(|(k, v)| format!("{k}=\"{v}\"")))
        .collect();
    text.lines().find_map(|line| {
        let (series, number) = line.rsplit_once(' ')?;
        let (metric, labels) = series.split_once('{')?;
        let labels: Vec<&str> = labels.trim_end_matches('}').split(',').collect();
        (metric == name && wanted.iter().all(|w| labels.contains(&w.as_str())))
            .then(|| number.parse().ok())
            .flatten()
    })
}

/// The consumer's count of `outcome` deliveries on `queue`, 0 before the first.
fn outcome(text: &str, db: &ServiceDb, queue: &str, outcome: &str) -> f64 {
    value(
        text,
        db,
        "svcdb_consumer_messages_total",
        &[("messaging_destination_name", queue), ("outcome", outcome)],
    )
    .unwrap_or(0.0)
}

#[tokio::test]
async fn a_duplicate_increments_duplicates_and_a_failure_increments_failed() {
    common::init_tracing();
    let broker = Broker::new().await;
    let (_test_db, db) = common::service().await;
    let exchange = events_exchange(&unique("metrics"));
    // Two deliveries at most: one failure is requeued (failed), the second dead-letters.
    let queue = QueueSpec::new(unique("metrics.effects"))
        .bind(&exchange, "#")
        .with_max_deliveries(2);
    let topology = Topology::new().exchange(&exchange).queue(queue.clone());
    broker.declare(topology.clone()).await;
    broker.delete_later(topology);
    let consumer = Consumer::new(&broker.config, db.clone(), &queue, "metrics.effects")
        .on("Tested", |tx, event| {
            Box::pin(async move {
                tx.execute("INSERT INTO effects (event_id) VALUES ($1)", &[&event.id])
                    .await?;
                Ok(())
            })
        })
        .on("Broken", |_tx, _event| {
            Box::pin(async move { Err(HandlerError::msg("the warehouse is closed")) })
        })
        .with_options(ConsumerOptions {
            retry_delay: Duration::from_millis(10),
            max_retry_delay: Duration::from_millis(50),
            ..ConsumerOptions::default()
        });
    let shutdown = CancellationToken::new();
    let task = tokio::spawn({
        let (consumer, shutdown) = (consumer.clone(), shutdown.clone());
        async move { consumer.run(shutdown).await }
    });
    let name = queue.name.as_str();

    let event = Envelope::new("Tested", "metrics-test", serde_json::json!({}));
    broker.publish(&exchange, "tested", &event).await;
    eventually("the event is handled", || async {
        outcome(&scrape(&db).await, &db, name, "handled") == 1.0
    })
    .await;
    let text = scrape(&db).await;
    assert_eq!(
        outcome(&text, &db, name, "duplicate"),
        0.0,
        "no duplicate yet"
    );
    assert_eq!(outcome(&text, &db, name, "failed"), 0.0, "no failure yet");
    let duration = value(
        &text,
        &db,
        "messaging_process_duration_seconds_count",
        &[("messaging_destination_name", name)],
    );
    assert_eq!(duration, Some(1.0), "one handler run timed:\n{text}");

    broker.publish(&exchange, "tested", &event).await; // the same event id again
    eventually("the copy is absorbed as a duplicate", || async {
        outcome(&scrape(&db).await, &db, name, "duplicate") == 1.0
    })
    .await;

    let broken = Envelope::new("Broken", "metrics-test", serde_json::json!({}));
    broker.publish(&exchange, "broken", &broken).await;
    eventually("the failing event is dead-lettered", || async {
        outcome(&scrape(&db).await, &db, name, "dead_lettered") == 1.0
    })
    .await;
    let text = scrape(&db).await;
    assert_eq!(
        outcome(&text, &db, name, "failed"),
        1.0,
        "first delivery failed:\n{text}"
    );
    assert_eq!(
        outcome(&text, &db, name, "handled"),
        1.0,
        "the copy was not handled again"
    );
    assert_eq!(
        value(
            &text,
            &db,
            "svcdb_consumer_in_flight",
            &[("messaging_destination_name", name)]
        ),
        Some(0.0),
        "nothing in flight once settled"
    );
    // The in-memory stats and the scraped series are the same counts.
    let stats = consumer.stats();
    assert_eq!((stats.handled, stats.duplicates), (1, 1));

    shutdown.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn the_outbox_backlog_shows_while_the_broker_is_down_and_clears_once_relayed() {
    common::init_tracing();
    let broker = Broker::new().await;
    let (_test_db, db) = common::service().await;
    let exchange = events_exchange(&unique("metrics"));
    // A queue bound, so the publishes are routable (unroutable ones count as failed).
    let queue = QueueSpec::new(unique("metrics.sink")).bind(&exchange, "#");
    let topology = Topology::new().exchange(&exchange).queue(queue);
    broker.declare(topology.clone()).await;
    broker.delete_later(topology);
    for _ in 0..3 {
        let event = Envelope::new("Tested", "metrics-test", serde_json::json!({}));
        db.transaction(async |tx| outbox::enqueue(tx, &exchange, "tested", &event).await)
            .await
            .unwrap();
    }
    let fast = RelayConfig {
        poll_interval: Duration::from_millis(20),
        reconnect_backoff: Duration::from_millis(20),
        max_reconnect_backoff: Duration::from_millis(200),
        ..RelayConfig::default()
    };

    // A relay whose broker is down: nothing is published.
    let down = Relay::new(
        &AmqpConfig::new(url_via(closed_port())),
        Outbox::new(db.clone()),
    )
    .with_config(fast.clone());
    let mut down_status = down.status();
    let stop_down = CancellationToken::new();
    let relaying = tokio::spawn({
        let stop = stop_down.clone();
        async move { down.run(stop).await }
    });
    down_status
        .wait_for(|s| s.consecutive_errors > 0)
        .await
        .unwrap();
    let text = scrape(&db).await;
    assert_eq!(
        value(&text, &db, "svcdb_outbox_backlog", &[]),
        Some(3.0),
        "{text}"
    );
    let age = value(
        &text,
        &db,
        "svcdb_outbox_oldest_unpublished_age_seconds",
        &[],
    )
    .unwrap();
    assert!(age >= 0.0, "the oldest row's age: {age}");
    assert!(
        value(
            &text,
            &db,
            "svcdb_table_size_bytes",
            &[("table", "svcdb_outbox")]
        )
        .unwrap()
            > 0.0,
        "the outbox's size:\n{text}"
    );
    let health = db.health(&svcdb::Gate::new()).await;
    assert_eq!(
        health.outbox.map(|o| o.rows),
        Some(3),
        "health report: {health}"
    );
    stop_down.cancel();
    relaying.await.unwrap().unwrap();

    // The broker is back: the backlog drains and the publishes are counted.
    let up = Relay::new(&amqp(), Outbox::new(db.clone())).with_config(fast);
    let stop_up = CancellationToken::new();
    let relaying = tokio::spawn({
        let stop = stop_up.clone();
        async move { up.run(stop).await }
    });
    eventually("the backlog drains", || async {
        value(&scrape(&db).await, &db, "svcdb_outbox_backlog", &[]) == Some(0.0)
    })
    .await;
    let text = scrape(&db).await;
    assert_eq!(
        value(
            &text,
            &db,
            "messaging_client_sent_messages_total",
            &[("messaging_system", "rabbitmq")]
        ),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        value(
            &text,
            &db,
            "svcdb_outbox_oldest_unpublished_age_seconds",
            &[]
        ),
        Some(0.0)
    );
    let health = db.health(&svcdb::Gate::new()).await;
    let backlog = health.outbox.unwrap();
    assert_eq!((backlog.rows, backlog.oldest_age_seconds), (0, None));
    stop_up.cancel();
    relaying.await.unwrap().unwrap();
}

#[tokio::test]
async fn the_pool_series_show_connections_by_state_and_acquire_waits() {
    let (_test_db, db) = common::service().await;
    let held = db.get().await.unwrap();
    let text = scrape(&db).await;
    let used = value(
        &text,
        &db,
        "db_client_connection_count",
        &[("state", "used")],
    );
    // The scrape's own queries return their connection before rendering; `held` stays used.
    assert_eq!(used, Some(1.0), "{text}");
    assert_eq!(
        value(&text, &db, "db_client_connection_max", &[]),
        Some(db.config().pool_max as f64)
    );
    let waits = value(
        &text,
        &db,
        "db_client_connection_wait_time_seconds_count",
        &[],
    )
    .unwrap();
    assert!(waits >= 2.0, "the acquires so far were timed: {waits}");
    drop(held);
    let text = scrape(&db).await;
    assert_eq!(
        value(
            &text,
            &db,
            "db_client_connection_count",
            &[("state", "used")]
        ),
        Some(0.0),
        "{text}"
    );
}

/// The body of `GET path` on `addr`, which must answer 200.
async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let (code, body) = common::http_get(addr, path).await;
    assert_eq!(code, 200, "{body}");
    body
}

#[tokio::test]
async fn the_service_serves_metrics_and_says_not_ready_once_stopping() {
    let (test_db, _db) = common::service().await;
    let running = svcdb_amqp::Service::new("metrics-test")
        .database(test_db.config("svc"))
        .listen("127.0.0.1:0".parse().unwrap())
        .start()
        .await
        .unwrap();
    let db = running.db().clone();
    let text = get(running.addr(), "/metrics").await;
    assert!(
        text.contains(r#"service="metrics-test""#),
        "labelled with the service's name:\n{text}"
    );
    assert_eq!(
        value(&text, &db, "svcdb_gate_ready", &[]),
        Some(1.0),
        "{text}"
    );
    assert!(
        value(
            &text,
            &db,
            "db_client_connection_count",
            &[("state", "idle")]
        )
        .is_some(),
        "{text}"
    );
    running.stop().await.unwrap();
    let text = svcdb::metrics::render();
    assert_eq!(
        value(&text, &db, "svcdb_gate_ready", &[]),
        Some(0.0),
        "{text}"
    );
}

#[tokio::test]
async fn a_start_up_migration_that_waits_for_the_lock_counts_the_wait() {
    let (test_db, db) = common::service().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("0001_orders.up.sql"),
        "CREATE TABLE orders (id bigint PRIMARY KEY);",
    )
    .unwrap();
    let migrations = svcdb::migrate::Migrations::from_dir(dir.path()).unwrap();
    // Another runner (a replica deploying at the same time) holds the schema's lock.
    let held = svcdb::__private::MigrationLock::acquire(&db, Duration::from_secs(10), || {})
        .await
        .unwrap();
    let waits = |text: &str| {
        value(
            text,
            &db,
            "svcdb_migration_lock_waits_total",
            &[("lock", "schema")],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(waits(&svcdb::metrics::render()), 0.0);
    // The start (not `Send`: its handlers' registrations) runs here, beside the release.
    let starting = svcdb_amqp::Service::new("svc")
        .database(test_db.config("svc"))
        .migrations(migrations)
        .migrate(true)
        .listen("127.0.0.1:0".parse().unwrap())
        .start();
    let release = async {
        eventually("the start-up migration waits for the lock", || async {
            waits(&svcdb::metrics::render()) == 1.0
        })
        .await;
        held.release().await.unwrap();
    };
    let (running, ()) = tokio::join!(starting, release);
    let running = running.unwrap();
    let text = get(running.addr(), "/metrics").await;
    assert_eq!(waits(&text), 1.0, "{text}");
    let took = value(
        &text,
        &db,
        "svcdb_migration_last_deploy_duration_seconds",
        &[],
    );
    assert!(took.is_some_and(|s| s > 0.0), "{took:?}");
    running.stop().await.unwrap();
}
