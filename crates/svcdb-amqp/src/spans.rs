//! The spans of the broker's side: a relay's publish, a consumer's delivery and its handler,
//! named and attributed after the OpenTelemetry semantic conventions for messaging (RabbitMQ),
//! and how the W3C `traceparent` header ([`svcdb::trace`]) joins them into the producer's
//! trace.
//!
//! | span | kind | attributes |
//! |---|---|---|
//! | `publish {exchange}` (relay) | producer | `messaging.system`, `messaging.operation.type = send`, `messaging.destination.name` (the exchange), `messaging.rabbitmq.destination.routing_key`, `messaging.message.id` (the event id), `svcdb.event.kind` |
//! | `process {exchange}` (a delivery) | consumer | the same, `messaging.operation.type = process`, `messaging.consumer.group.name` (the consumer), `messaging.destination.subscription.name` (the queue), `messaging.rabbitmq.message.delivery_tag` |
//! | `handle {kind}` (the handler, in the claim's transaction) | internal | `messaging.message.id`, `svcdb.event.kind`, `messaging.consumer.group.name` |
//! | `process {queue}` (a batch of deliveries in one transaction, its parent; linked to each delivery's span) | consumer | `messaging.system`, `messaging.operation.type = process`, `messaging.destination.subscription.name`, `messaging.consumer.group.name`, `messaging.batch.message_count` |
//!
//! The publish span continues the row's stored traceparent and the message carries the
//! publish span's own (or the stored one unchanged without an OpenTelemetry layer); the
//! delivery span continues the header's, and the handler span is its child: the handler runs
//! in the producer's trace. With an OpenTelemetry layer, the delivery span also has the field
//! `trace_id`, so that log lines (JSON ones list their spans' fields) name their trace.

use lapin::message::Delivery;
use lapin::types::AMQPValue;
use svcdb::trace::{self, TraceParent, TRACEPARENT_HEADER};
use svcdb::{Envelope, OutboxMessage};
use tracing::field::Empty;
use tracing::Span;

/// The span of one relay publish, continuing the row's trace, and the traceparent to send
/// with the message.
pub(crate) fn publish(message: &OutboxMessage) -> (Span, Option<String>) {
    let envelope = &message.envelope;
    let span = tracing::info_span!(
        target: "svcdb_amqp::relay",
        parent: None,
        "publish",
        otel.name = format!("publish {}", message.exchange),
        otel.kind = "producer",
        messaging.system = "rabbitmq",
        messaging.operation.type = "send",
        messaging.destination.name = %message.exchange,
        messaging.rabbitmq.destination.routing_key = %message.routing_key,
        messaging.message.id = %envelope.id,
        svcdb.event.kind = %envelope.kind,
    );
    let stored = message.traceparent.as_deref();
    if let Some(parent) = stored.and_then(|t| t.parse::<TraceParent>().ok()) {
        trace::continue_trace(&span, &parent);
    }
    let sent = trace::of(&span)
        .map(|own| own.to_string())
        .or_else(|| stored.map(str::to_owned));
    (span, sent)
}

/// The span of one delivery from `queue` to `consumer`, continuing the producer's trace
/// when the message carries a valid `traceparent` (an invalid one is ignored: the delivery
/// starts a trace of its own). The event's id and kind are recorded once it is decoded
/// ([`record_event`]).
pub(crate) fn delivery(queue: &str, consumer: &str, delivery: &Delivery) -> Span {
    let exchange = delivery.exchange.as_str();
    let span = tracing::info_span!(
        target: "svcdb_amqp::consumer",
        parent: None,
        "process",
        otel.name = format!("process {exchange}"),
        otel.kind = "consumer",
        messaging.system = "rabbitmq",
        messaging.operation.type = "process",
        messaging.destination.name = %exchange,
        messaging.rabbitmq.destination.routing_key = %delivery.routing_key,
        messaging.destination.subscription.name = %queue,
        messaging.consumer.group.name = %consumer,
        messaging.rabbitmq.message.delivery_tag = delivery.delivery_tag,
        messaging.message.id = Empty,
        svcdb.event.kind = Empty,
        trace_id = Empty,
    );
    if let Some(parent) = traceparent(delivery) {
        trace::continue_trace(&span, &parent);
    }
    trace::record_trace_id(&span);
    span
}

/// Records the decoded event's id and kind on the current (delivery) span.
pub(crate) fn record_event(envelope: &Envelope) {
    let span = Span::current();
    span.record("messaging.message.id", tracing::field::display(envelope.id));
    span.record("svcdb.event.kind", envelope.kind.as_str());
}

/// The span of a handler running on `envelope` for `consumer`: a child of the current
/// (delivery) span, so in the producer's trace.
pub(crate) fn handler(consumer: &str, envelope: &Envelope) -> Span {
    tracing::info_span!(
        target: "svcdb_amqp::consumer",
        "handle",
        otel.name = format!("handle {}", envelope.kind),
        messaging.consumer.group.name = %consumer,
        messaging.message.id = %envelope.id,
        svcdb.event.kind = %envelope.kind,
    )
}

/// The span of a batch of deliveries from `queue` handled in one transaction (the parent of
/// that transaction's span): a trace of its own, linked to each delivery's span, as the
/// semantic conventions have a batch operation link the messages it processes.
pub(crate) fn batch(queue: &str, consumer: &str, deliveries: &[Span]) -> Span {
    let span = tracing::info_span!(
        target: "svcdb_amqp::consumer",
        parent: None,
        "process batch",
        otel.name = format!("process {queue}"),
        otel.kind = "consumer",
        messaging.system = "rabbitmq",
        messaging.operation.type = "process",
        messaging.destination.subscription.name = %queue,
        messaging.consumer.group.name = %consumer,
        messaging.batch.message_count = deliveries.len(),
    );
    for delivery in deliveries {
        trace::link(&span, delivery);
    }
    span
}

/// The delivery's `traceparent` header, if it has a valid one.
fn traceparent(delivery: &Delivery) -> Option<TraceParent> {
    let headers = delivery.properties.headers().as_ref()?;
    match headers.inner().get(TRACEPARENT_HEADER)? {
        AMQPValue::LongString(value) => std::str::from_utf8(value.as_bytes()).ok()?.parse().ok(),
        AMQPValue::ShortString(value) => value.as_str().parse().ok(),
        _ => None,
    }
}
