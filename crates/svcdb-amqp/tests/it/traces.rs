//! Traces across the broker: the producer's W3C traceparent stored with the outbox row, sent
//! by the relay as the AMQP header, continued by the consumer's handler span; and the
//! handler's span in JSON logs.
//!
//! Each test installs its subscriber for its own thread only (`set_default`) and runs on
//! tokio's current-thread runtime, so every task of the test (relay, consumer, pool) records
//! into it and other tests are not affected.

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{effects, eventually, service, Broker};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::Value;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use serde_json::json;
use svcdb::outbox;
use svcdb::trace::TraceParent;
use svcdb::{Envelope, Outbox, ServiceDb};
use svcdb_amqp::telemetry::LogFormat;
use svcdb_amqp::topology::{QueueSpec, Topology};
use svcdb_amqp::{Consumer, ConsumerOptions, Relay, RelayConfig};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;

/// Spans recorded in memory, as a collector would receive them.
struct Recorded {
    exporter: InMemorySpanExporter,
    provider: SdkTracerProvider,
}

impl Recorded {
    fn new() -> Self {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        Self { exporter, provider }
    }

    /// The layer that records into it.
    fn layer<S>(&self) -> impl tracing_subscriber::Layer<S>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        tracing_opentelemetry::layer().with_tracer(self.provider.tracer("test"))
    }

    fn spans(&self) -> Vec<SpanData> {
        self.exporter.get_finished_spans().unwrap()
    }

    /// The finished span named `name` with attribute `key` = `value`.
    fn find(&self, name: &str, key: &str, value: &str) -> Option<SpanData> {
        self.spans()
            .into_iter()
            .find(|s| s.name == name && attribute(s, key).as_deref() == Some(value))
    }
}

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| match &kv.value {
            Value::String(s) => s.as_str().to_owned(),
            other => other.to_string(),
        })
}

/// Installs, for this thread, an OpenTelemetry layer exporting to memory.
fn record_spans() -> (Recorded, tracing::subscriber::DefaultGuard) {
    let recorded = Recorded::new();
    let guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(recorded.layer()));
    (recorded, guard)
}

/// An exchange, and a queue bound to all of it.
async fn exchange_and_queue(broker: &Broker) -> (String, QueueSpec) {
    let exchange = common::unique("orders.events");
    let queue = QueueSpec::new(common::unique("reserve")).bind(&exchange, "#");
    broker
        .declare(Topology::new().exchange(&exchange).queue(queue.clone()))
        .await;
    (exchange, queue)
}

/// A consumer of `queue` whose `OrderPlaced` handler records an effect, logs a line and
/// answers with a `StockReserved` event to `exchange` through the outbox (the next hop), which
/// its other handler records. One delivery a transaction (`batch: 1`), so that each handler's
/// transaction is a span of its own trace.
fn consumer(broker: &Broker, db: &ServiceDb, queue: &QueueSpec, exchange: &str) -> Consumer {
    let exchange = exchange.to_owned();
    Consumer::new(&broker.config, db.clone(), queue, "catalog.reserve")
        .with_options(ConsumerOptions {
            batch: 1,
            ..ConsumerOptions::default()
        })
        .on("OrderPlaced", move |tx, event| {
            let exchange = exchange.clone();
            Box::pin(async move {
                tracing::info!("reserving stock");
                tx.execute(
                    "INSERT INTO effects (event_id, note) VALUES ($1, 'reserved')",
                    &[&event.id],
                )
                .await?;
                let reply = Envelope::new("StockReserved", "catalog", json!({})).caused_by(event);
                outbox::enqueue(tx, &exchange, "stock.reserved", &reply).await?;
                Ok(())
            })
        })
        .on("StockReserved", |tx, event| {
            Box::pin(async move {
                tx.execute(
                    "INSERT INTO effects (event_id, note) VALUES ($1, 'confirmed')",
                    &[&event.causation_id],
                )
                .await?;
                Ok(())
            })
        })
}

/// Enqueues `event` in a transaction, as a request handler does.
async fn enqueue(db: &ServiceDb, exchange: &str, event: &Envelope) {
    let (exchange, event) = (exchange.to_owned(), event.clone());
    db.transaction(async move |tx| outbox::enqueue(tx, &exchange, "order.placed", &event).await)
        .await
        .unwrap();
}

async fn stored_traceparent(db: &ServiceDb, id: uuid::Uuid) -> Option<String> {
    db.get()
        .await
        .unwrap()
        .query_one("SELECT traceparent FROM svcdb_outbox WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0)
}

fn fast_relay(broker: &Broker, db: &ServiceDb) -> Relay {
    Relay::new(&broker.config, Outbox::new(db.clone())).with_config(RelayConfig {
        poll_interval: Duration::from_millis(20),
        ..RelayConfig::default()
    })
}

#[tokio::test]
async fn a_handlers_span_continues_the_producers_trace_across_the_broker() {
    let (recorded, _guard) = record_spans();
    let broker = Broker::new().await;
    let (_test_db, db) = service().await;
    let (exchange, queue) = exchange_and_queue(&broker).await;

    // The producer: a request's span, in which the order's event is enqueued.
    let placed = Envelope::new("OrderPlaced", "orders", json!({ "order_id": 1 }));
    let request = tracing::info_span!("POST /orders");
    let producer = request
        .in_scope(svcdb::trace::current)
        .expect("a span with a layer has a trace");
    tracing::Instrument::instrument(enqueue(&db, &exchange, &placed), request).await;
    let stored: TraceParent = stored_traceparent(&db, placed.id)
        .await
        .expect("enqueue stores the traceparent")
        .parse()
        .unwrap();
    assert_eq!(stored.trace_id(), producer.trace_id());

    // The control: an event published outside any span carries no traceparent, and its
    // handler's span is in a trace of its own.
    let loose = Envelope::new("OrderPlaced", "orders", json!({ "order_id": 2 }));
    broker.publish(&exchange, "order.placed", &loose).await;

    let shutdown = CancellationToken::new();
    let relay = fast_relay(&broker, &db);
    let consumer = consumer(&broker, &db, &queue, &exchange);
    let relaying = tokio::spawn({
        let s = shutdown.clone();
        async move { relay.run(s).await }
    });
    let consuming = tokio::spawn({
        let s = shutdown.clone();
        async move { consumer.run(s).await }
    });
    for event in [&placed, &loose] {
        eventually("both hops' handlers ran", || async {
            effects(&db, event.id).await == 2
        })
        .await;
    }
    let id = placed.id.to_string();
    let loose_id = loose.id.to_string();
    eventually("the deliveries' spans ended", || async {
        let spans = recorded.spans();
        [&id, &loose_id].iter().all(|id| {
            recorded
                .find(&format!("process {exchange}"), "messaging.message.id", id)
                .is_some()
        }) && spans
            .iter()
            .filter(|s| s.name == "handle StockReserved")
            .count()
            == 2
    })
    .await;
    shutdown.cancel();
    relaying.await.unwrap().unwrap();
    consuming.await.unwrap().unwrap();

    let trace_id = opentelemetry::trace::TraceId::from_bytes(producer.trace_id().to_be_bytes());
    let handler = recorded
        .find("handle OrderPlaced", "messaging.message.id", &id)
        .expect("the handler's span");
    assert_eq!(
        handler.span_context.trace_id(),
        trace_id,
        "the handler is in the producer's trace"
    );
    assert_eq!(
        attribute(&handler, "svcdb.event.kind").as_deref(),
        Some("OrderPlaced")
    );

    let delivery = recorded
        .find(&format!("process {exchange}"), "messaging.message.id", &id)
        .unwrap();
    assert_eq!(delivery.span_context.trace_id(), trace_id);
    assert_eq!(handler.parent_span_id, delivery.span_context.span_id());
    assert_eq!(
        attribute(&delivery, "messaging.system").as_deref(),
        Some("rabbitmq")
    );
    assert_eq!(
        attribute(&delivery, "messaging.destination.name").as_deref(),
        Some(exchange.as_str())
    );
    assert_eq!(
        attribute(&delivery, "messaging.rabbitmq.destination.routing_key").as_deref(),
        Some("order.placed")
    );
    assert_eq!(
        attribute(&delivery, "svcdb.event.kind").as_deref(),
        Some("OrderPlaced")
    );

    // The relay's publish span is in the trace too, between the producer and the delivery.
    let publish = recorded
        .find(&format!("publish {exchange}"), "messaging.message.id", &id)
        .expect("the relay's publish span");
    assert_eq!(publish.span_context.trace_id(), trace_id);
    assert_eq!(delivery.parent_span_id, publish.span_context.span_id());

    // The handler's transaction is a database span of the same trace.
    let transaction = recorded
        .spans()
        .into_iter()
        .find(|s| {
            s.parent_span_id == handler.span_context.span_id() && s.name.starts_with("transaction ")
        })
        .expect("the handler's transaction span");
    assert_eq!(
        attribute(&transaction, "db.system.name").as_deref(),
        Some("postgresql")
    );
    assert!(attribute(&transaction, "db.namespace")
        .unwrap()
        .ends_with(".svc"));

    // The next hop, enqueued by the handler, is in the same trace.
    assert!(
        recorded
            .spans()
            .iter()
            .any(|s| s.name == "handle StockReserved" && s.span_context.trace_id() == trace_id),
        "the second hop's handler is in the producer's trace"
    );

    let unrelated = recorded
        .find("handle OrderPlaced", "messaging.message.id", &loose_id)
        .expect("the control's handler span");
    assert_ne!(unrelated.span_context.trace_id(), trace_id);
}

#[tokio::test]
async fn in_a_batch_each_handler_is_in_its_own_producers_trace() {
    let (recorded, _guard) = record_spans();
    let broker = Broker::new().await;
    let (_test_db, db) = service().await;
    let (exchange, queue) = exchange_and_queue(&broker).await;
    // Two orders, each enqueued in a request span of its own: two traces.
    let mut producers = Vec::new();
    for order in [1, 2] {
        let placed = Envelope::new("OrderPlaced", "orders", json!({ "order_id": order }));
        let request = tracing::info_span!("POST /orders");
        let trace = request.in_scope(svcdb::trace::current).unwrap().trace_id();
        tracing::Instrument::instrument(enqueue(&db, &exchange, &placed), request).await;
        producers.push((placed, trace));
    }
    assert_ne!(producers[0].1, producers[1].1);

    // Published before the consumer starts, not eager and a long linger: both in one batch.
    let relay = fast_relay(&broker, &db);
    let shutdown = CancellationToken::new();
    let relaying = tokio::spawn({
        let s = shutdown.clone();
        async move { relay.run(s).await }
    });
    eventually("both orders are queued", || async {
        broker.ready(&queue.name).await == 2
    })
    .await;
    let consumer = consumer(&broker, &db, &queue, &exchange).with_options(ConsumerOptions {
        batch: 2,
        linger: Duration::from_secs(1),
        eager: false,
        ..ConsumerOptions::default()
    });
    let consuming = tokio::spawn({
        let s = shutdown.clone();
        async move { consumer.run(s).await }
    });
    for (placed, _) in &producers {
        eventually("both hops' handlers ran", || async {
            effects(&db, placed.id).await == 2
        })
        .await;
    }
    shutdown.cancel();
    relaying.await.unwrap().unwrap();
    consuming.await.unwrap().unwrap();

    for (placed, trace) in &producers {
        let id = placed.id.to_string();
        let trace_id = opentelemetry::trace::TraceId::from_bytes(trace.to_be_bytes());
        let handler = recorded
            .find("handle OrderPlaced", "messaging.message.id", &id)
            .expect("the handler's span");
        let delivery = recorded
            .find(&format!("process {exchange}"), "messaging.message.id", &id)
            .expect("the delivery's span");
        assert_eq!(
            handler.span_context.trace_id(),
            trace_id,
            "in its producer's trace"
        );
        assert_eq!(handler.parent_span_id, delivery.span_context.span_id());
    }

    // The batch's own span, parent of its transaction's, links every delivery's span.
    let spans = recorded.spans();
    let batch = spans
        .iter()
        .find(|s| {
            s.name == format!("process {}", queue.name)
                && attribute(s, "messaging.batch.message_count").as_deref() == Some("2")
        })
        .expect("the batch's span");
    let linked: Vec<_> = batch
        .links
        .links
        .iter()
        .map(|l| l.span_context.span_id())
        .collect();
    for (placed, _) in &producers {
        let delivery = recorded
            .find(
                &format!("process {exchange}"),
                "messaging.message.id",
                &placed.id.to_string(),
            )
            .unwrap();
        assert!(
            linked.contains(&delivery.span_context.span_id()),
            "the batch links the delivery of {}: {linked:?}",
            placed.id
        );
    }
    assert!(
        spans
            .iter()
            .any(|s| s.parent_span_id == batch.span_context.span_id()
                && s.name.starts_with("transaction ")),
        "the batch's transaction is the batch span's child"
    );
}

#[tokio::test]
async fn without_an_opentelemetry_layer_no_traceparent_is_stored_or_sent() {
    common::init_tracing();
    let broker = Broker::new().await;
    let (_test_db, db) = service().await;
    let (exchange, queue) = exchange_and_queue(&broker).await;
    let event = Envelope::new("OrderPlaced", "orders", json!({ "order_id": 3 }));
    tracing::Instrument::instrument(
        enqueue(&db, &exchange, &event),
        tracing::info_span!("request"),
    )
    .await;
    assert_eq!(stored_traceparent(&db, event.id).await, None);

    // A row stored with a traceparent (by a producer that had a layer) keeps it through a
    // relay without one: the header is the stored value.
    let traced = Envelope::new("OrderPlaced", "orders", json!({ "order_id": 4 }));
    enqueue(&db, &exchange, &traced).await;
    let stored = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    db.get()
        .await
        .unwrap()
        .execute(
            "UPDATE svcdb_outbox SET traceparent = $1 WHERE id = $2",
            &[&stored, &traced.id],
        )
        .await
        .unwrap();

    let shutdown = CancellationToken::new();
    let relay = fast_relay(&broker, &db);
    let relaying = tokio::spawn({
        let s = shutdown.clone();
        async move { relay.run(s).await }
    });
    let deliveries = broker.take(&queue.name, 2, Duration::from_secs(10)).await;
    shutdown.cancel();
    relaying.await.unwrap().unwrap();
    let header = |id: uuid::Uuid| {
        let delivery = deliveries
            .iter()
            .find(|d| {
                d.properties.message_id().as_ref().map(|m| m.as_str()) == Some(&id.to_string())
            })
            .expect("delivered");
        common::header(delivery, "traceparent")
    };
    assert_eq!(header(event.id), None);
    assert_eq!(header(traced.id).as_deref(), Some(stored));
}

#[tokio::test]
async fn an_outbox_table_from_before_traceparent_gets_the_column_and_its_rows_are_relayed() {
    common::init_tracing();
    let broker = Broker::new().await;
    let test_db = svcdb::testing::TestDb::new().await;
    let db = test_db.service("svc").await;
    let (exchange, queue) = exchange_and_queue(&broker).await;
    // The table as releases before this one created it, with a row waiting.
    let old = Envelope::new("OrderPlaced", "orders", json!({ "order_id": 5 }));
    let conn = db.get().await.unwrap();
    conn.batch_execute(
        "CREATE TABLE svcdb_outbox (
            id uuid PRIMARY KEY, exchange text NOT NULL, routing_key text NOT NULL,
            envelope jsonb NOT NULL, created_at timestamptz NOT NULL DEFAULT now(),
            published_at timestamptz, attempts integer NOT NULL DEFAULT 0, last_error text,
            next_attempt_at timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .unwrap();
    conn.execute(
        "INSERT INTO svcdb_outbox (id, exchange, routing_key, envelope) VALUES ($1, $2, 'order.placed', $3)",
        &[&old.id, &exchange, &serde_json::to_value(&old).unwrap()],
    )
    .await
    .unwrap();
    // The control: the old table has no such column.
    let missing = conn
        .query("SELECT traceparent FROM svcdb_outbox", &[])
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Some(&svcdb::SqlState::UNDEFINED_COLUMN));
    drop(conn);

    db.install_outbox().await.unwrap();
    db.install_outbox().await.unwrap(); // again: a second replica's start-up
    assert_eq!(stored_traceparent(&db, old.id).await, None);

    let relay = fast_relay(&broker, &db);
    let shutdown = CancellationToken::new();
    let relaying = tokio::spawn({
        let s = shutdown.clone();
        async move { relay.run(s).await }
    });
    let delivered = broker.take(&queue.name, 1, Duration::from_secs(10)).await;
    shutdown.cancel();
    relaying.await.unwrap().unwrap();
    assert_eq!(delivered.len(), 1);
    assert_eq!(common::header(&delivered[0], "traceparent"), None);
}

#[tokio::test]
async fn the_handlers_span_shows_in_json_logs_with_its_trace_id() {
    let logs = SharedBuffer::default();
    let recorded = Recorded::new();
    let subscriber = tracing_subscriber::registry()
        .with(LogFormat::Json.layer(logs.clone(), false))
        .with(recorded.layer());
    let _guard = tracing::subscriber::set_default(subscriber);
    let broker = Broker::new().await;
    let (_test_db, db) = service().await;
    let (exchange, queue) = exchange_and_queue(&broker).await;
    let event = Envelope::new("OrderPlaced", "orders", json!({ "order_id": 6 }));
    broker.publish(&exchange, "order.placed", &event).await;

    let shutdown = CancellationToken::new();
    let consumer = consumer(&broker, &db, &queue, &exchange);
    let consuming = tokio::spawn({
        let s = shutdown.clone();
        async move { consumer.run(s).await }
    });
    eventually("the handler ran", || async {
        effects(&db, event.id).await == 1
    })
    .await;
    shutdown.cancel();
    consuming.await.unwrap().unwrap();

    let text = logs.text();
    let line = text
        .lines()
        .find(|l| l.contains("reserving stock"))
        .unwrap_or_else(|| panic!("the handler's line is in the logs:\n{text}"));
    let line: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
    let id = event.id.to_string();
    // The line's own span is the handler's transaction; the list has every span it is in.
    assert_eq!(line["span"]["name"], "transaction", "{line}");
    let spans = line["spans"].as_array().expect("the span list");
    let span = |name: &str| {
        spans
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("the {name} span is listed: {line}"))
    };
    let handler = span("handle");
    assert_eq!(handler["svcdb.event.kind"], "OrderPlaced", "{line}");
    assert_eq!(handler["messaging.message.id"], id.as_str(), "{line}");
    let delivery = span("process");
    assert_eq!(
        delivery["messaging.destination.subscription.name"],
        queue.name.as_str()
    );
    assert_eq!(delivery["messaging.message.id"], id.as_str());
    let handler = recorded
        .find("handle OrderPlaced", "messaging.message.id", &id)
        .expect("the handler's span");
    assert_eq!(
        delivery["trace_id"],
        handler.span_context.trace_id().to_string(),
        "the log line names the handler's trace: {line}"
    );
}

/// A log writer the test reads back.
#[derive(Clone, Default)]
struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl SharedBuffer {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

impl std::io::Write for SharedBuffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'w> MakeWriter<'w> for SharedBuffer {
    type Writer = Self;

    fn make_writer(&'w self) -> Self {
        self.clone()
    }
}

#[tokio::test]
async fn a_request_span_continues_the_callers_trace_and_holds_its_transaction() {
    use axum::body::Body;
    use axum::extract::State;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    let (recorded, _guard) = record_spans();
    let (_test_db, db) = service().await;
    async fn order(State(db): State<ServiceDb>) -> StatusCode {
        db.transaction(async |tx| {
            tx.execute(
                "INSERT INTO effects (event_id, note) VALUES (gen_random_uuid(), 'ordered')",
                &[],
            )
            .await?;
            Ok::<_, svcdb::Error>(())
        })
        .await
        .map_or(StatusCode::SERVICE_UNAVAILABLE, |()| StatusCode::CREATED)
    }
    let app = axum::Router::new()
        .route("/orders/{id}", axum::routing::post(order))
        .with_state(db.clone())
        .layer(axum::middleware::from_fn(svcdb::http::trace_requests));
    let caller: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        .parse()
        .unwrap();
    let post = |traceparent: Option<String>| {
        let mut request = Request::post("/orders/7");
        if let Some(traceparent) = traceparent {
            request = request.header("traceparent", traceparent);
        }
        request.body(Body::empty()).unwrap()
    };
    let response = app
        .clone()
        .oneshot(post(Some(caller.to_string())))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    // The control: a request without the header starts a trace of its own.
    let response = app.oneshot(post(None)).await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);

    let requests: Vec<SpanData> = recorded
        .spans()
        .into_iter()
        .filter(|s| s.name == "POST /orders/{id}")
        .collect();
    assert_eq!(requests.len(), 2, "{requests:?}");
    let trace_id = opentelemetry::trace::TraceId::from_bytes(caller.trace_id().to_be_bytes());
    let continued = requests
        .iter()
        .find(|s| s.span_context.trace_id() == trace_id)
        .expect("the request with the header continues the caller's trace");
    assert_eq!(
        continued.parent_span_id,
        opentelemetry::trace::SpanId::from_bytes(caller.span_id().to_be_bytes())
    );
    assert_eq!(
        attribute(continued, "http.route").as_deref(),
        Some("/orders/{id}")
    );
    assert_eq!(
        attribute(continued, "url.path").as_deref(),
        Some("/orders/7")
    );
    assert_eq!(
        attribute(continued, "http.response.status_code").as_deref(),
        Some("201")
    );
    assert!(requests
        .iter()
        .any(|s| s.span_context.trace_id() != trace_id));
    let transaction = recorded
        .spans()
        .into_iter()
        .find(|s| s.parent_span_id == continued.span_context.span_id())
        .expect("the handler's transaction is a child of the request");
    assert!(transaction.name.starts_with("transaction "));
}

/// With the feature `otlp`, `telemetry::init` exports spans to the collector the standard
/// variable names, over OTLP/HTTP. Installs the global subscriber: nextest runs each test in a
/// process of its own. Called inside a runtime, as a service's `main` does.
#[cfg(feature = "otlp")]
#[tokio::test]
async fn with_feature_otlp_spans_are_exported_to_the_configured_collector() {
    use std::io::{BufRead, BufReader, Read, Write};

    // A collector that answers 200 to every request and hands over what it received.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (sent, received) = std::sync::mpsc::channel::<(String, Vec<u8>)>();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            let mut length = 0;
            loop {
                let mut header = String::new();
                reader.read_line(&mut header).unwrap();
                if header.trim().is_empty() {
                    break;
                }
                if let Some((name, value)) = header.split_once(':') {
                    if name.eq_ignore_ascii_case("content-length") {
                        length = value.trim().parse().unwrap();
                    }
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
            let _ = sent.send((request_line, body));
        }
    });
    std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{addr}"));
    std::env::remove_var("OTEL_SERVICE_NAME");

    let guard = svcdb_amqp::telemetry::init("otlp-test-service", "off").unwrap();
    tracing::info_span!("exported-span").in_scope(|| {});
    drop(guard); // flushes the batch

    let (request_line, body) = received
        .recv_timeout(Duration::from_secs(10))
        .expect("the collector got a request");
    assert!(
        request_line.starts_with("POST /v1/traces "),
        "{request_line}"
    );
    let has = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
    assert!(has(b"exported-span"), "the span is in the export");
    assert!(
        has(b"otlp-test-service"),
        "the service's name is in the export"
    );
}

#[test]
fn text_logs_name_the_spans_without_their_semantic_convention_attributes() {
    let logs = SharedBuffer::default();
    let subscriber =
        tracing_subscriber::registry().with(LogFormat::Text.layer(logs.clone(), false));
    tracing::subscriber::with_default(subscriber, || {
        let delivery = tracing::info_span!(
            "process",
            messaging.system = "rabbitmq",
            messaging.message.id = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        delivery.record("messaging.message.id", 7);
        delivery.record("trace_id", "4bf92f3577b34da6a3ce929d0e0e4736");
        let _delivery = delivery.enter();
        let handler = tracing::info_span!("handle", svcdb.event.kind = "OrderPlaced");
        let _handler = handler.enter();
        tracing::warn!(
            queue = "catalog.reserve",
            http.route = "/x",
            "handler failed"
        );
    });
    let text = logs.text();
    assert!(
        text.contains(
            r#"process{trace_id="4bf92f3577b34da6a3ce929d0e0e4736"}:handle: it::traces: handler failed queue="catalog.reserve""#
        ),
        "{text}"
    );
    // The control: the attributes were there to leave out; JSON keeps them.
    assert!(
        !text.contains("messaging.") && !text.contains("svcdb.event.kind"),
        "{text}"
    );
    let json = SharedBuffer::default();
    let subscriber =
        tracing_subscriber::registry().with(LogFormat::Json.layer(json.clone(), false));
    tracing::subscriber::with_default(subscriber, || {
        let _span = tracing::info_span!("handle", svcdb.event.kind = "OrderPlaced").entered();
        tracing::warn!("handler failed");
    });
    assert!(
        json.text().contains(r#""svcdb.event.kind":"OrderPlaced""#),
        "{}",
        json.text()
    );
}
