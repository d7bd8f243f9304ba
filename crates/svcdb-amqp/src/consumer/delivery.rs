//! One delivery, handled to the end: decoded, its handler run with the claim in one
//! transaction, then acknowledged, handed back or dead-lettered (see the module
//! documentation of [`consumer`](super) for the rules). A batch uses the same steps:
//! [`prepare`], then its own transaction, then [`finish`] for each delivery that failed.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::FutureExt;
use lapin::message::Delivery;
use lapin::types::AMQPValue;
use svcdb::{Envelope, Processed};
use tracing::Instrument;

use super::context::Context;
use super::outage;
use super::stats::{Counters, InFlight};
use super::{dead_letter, settle, UnknownKind};
use crate::connection::pause;
use crate::handler::{DynHandler, HandlerError};

/// Handles one delivery to the end: acked, handed back, or dead-lettered; in its span, which
/// continues the producer's trace.
pub(super) async fn handle(context: Arc<Context>, delivery: Delivery) {
    let Some(work) = prepare(&context, delivery).await else {
        return;
    };
    let span = work.span.clone();
    async {
        let outcome = process_alone(&context, &work).await;
        finish(&context, work, outcome).await;
    }
    .instrument(span)
    .await
}

/// A delivery with a handler for its event, to run.
pub(super) struct Work {
    pub(super) delivery: Delivery,
    pub(super) envelope: Envelope,
    pub(super) handler: Arc<dyn DynHandler>,
    /// This delivery's number ([`delivery_number`]).
    pub(super) deliveries: u32,
    /// The delivery's span ([`crate::spans::delivery`]): the handler's span is its child.
    pub(super) span: tracing::Span,
    /// Counted in flight until settled.
    _in_flight: InFlight,
}

/// Decodes `delivery` and finds its handler; a message that is not an event, or has no
/// handler, is settled here (dead-lettered or acknowledged) and `None` returned. Opens the
/// delivery's span ([`crate::spans::delivery`]), which the returned work keeps.
pub(super) async fn prepare(context: &Context, delivery: Delivery) -> Option<Work> {
    let span = crate::spans::delivery(&context.queue.name, &context.name, &delivery);
    decode(context, delivery, span.clone())
        .instrument(span)
        .await
}

async fn decode(context: &Context, delivery: Delivery, span: tracing::Span) -> Option<Work> {
    let in_flight = context.counters.in_flight();
    let deliveries = delivery_number(&delivery);
    let queue = context.queue.name.as_str();
    let envelope = match Envelope::from_slice(&delivery.data) {
        Ok(envelope) => envelope,
        Err(e) => {
            let reason = format!("malformed event: {e}");
            tracing::warn!(target: "svcdb_amqp::consumer", %queue, message_id = ?delivery.properties.message_id(), %reason, "dead-lettering a message that is not an event");
            dead_letter::dead_letter(context, &delivery, &reason, deliveries).await;
            return None;
        }
    };
    crate::spans::record_event(&envelope);
    let id = envelope.id;
    let kind = envelope.kind.as_str();
    let Some(handler) = context.handlers.get(kind).cloned() else {
        match context.options.unknown_kind {
            UnknownKind::Ack => {
                tracing::debug!(target: "svcdb_amqp::consumer", %queue, %id, %kind, "no handler for this kind; acknowledged");
                settle::ack(context, &delivery, id).await;
                Counters::bump(&context.counters.ignored);
            }
            UnknownKind::DeadLetter => {
                let reason = format!(
                    "no handler for event kind {kind:?} in consumer {}; register one with Consumer::on, or narrow the queue's bindings",
                    context.name
                );
                tracing::warn!(target: "svcdb_amqp::consumer", %queue, %id, %kind, "dead-lettering an event without a handler");
                dead_letter::dead_letter(context, &delivery, &reason, deliveries).await;
            }
        }
        return None;
    };
    Some(Work {
        delivery,
        envelope,
        handler,
        deliveries,
        span,
        _in_flight: in_flight,
    })
}

/// Runs `work`'s handler with its claim in a transaction of its own, holding a permit.
pub(super) async fn process_alone(
    context: &Context,
    work: &Work,
) -> std::result::Result<Processed<()>, HandlerError> {
    let Ok(_permit) = context.permits.acquire().await else {
        // Never closed.
        return Err(HandlerError::msg("the consumer's permits were closed"));
    };
    let started = std::time::Instant::now();
    let outcome = process(context, &work.handler, &work.envelope).await;
    context.counters.duration.record(started.elapsed());
    outcome
    // The permit goes back here: what follows waits (for a pause, a backoff, the broker)
    // and must not keep healthy messages from the database.
}

/// Settles `work` by its handler's `outcome`: acknowledged, handed back, or dead-lettered.
pub(super) async fn finish(
    context: &Context,
    work: Work,
    outcome: std::result::Result<Processed<()>, HandlerError>,
) {
    let queue = context.queue.name.as_str();
    let Work {
        delivery,
        envelope,
        deliveries,
        ..
    } = &work;
    let (id, kind, deliveries) = (envelope.id, envelope.kind.as_str(), *deliveries);
    // Each outcome is counted before its acknowledgement, as committed: a connection lost while
    // the ack is sent ends this task, and the redelivery then counts as a duplicate.
    match outcome {
        Ok(Processed::Done(())) => {
            tracing::debug!(target: "svcdb_amqp::consumer", %queue, %id, %kind, deliveries, "handled");
            Counters::bump(&context.counters.handled);
            settle::ack(context, delivery, id).await;
        }
        Ok(Processed::Duplicate) => {
            tracing::debug!(target: "svcdb_amqp::consumer", %queue, %id, %kind, deliveries, "duplicate; already handled");
            Counters::bump(&context.counters.duplicates);
            settle::ack(context, delivery, id).await;
        }
        Err(e) if e.is_database_unavailable() => {
            // The database, not the event: hand the message back without counting a failure,
            // once this consumer takes no more deliveries (it pauses until the database
            // answers; at shutdown it stops anyway).
            tracing::warn!(target: "svcdb_amqp::consumer", %queue, %id, %kind, deliveries, error = %e, "database unavailable; handing the event back and pausing");
            outage::pause_consuming(&context.flow).await;
            settle::return_unprocessed(context, delivery, id).await;
        }
        Err(e) => {
            let max = context.queue.max_deliveries;
            if e.is_permanent() || deliveries >= max {
                let reason = if e.is_permanent() {
                    format!("handler refused the event for good: {e}")
                } else {
                    format!("handler failed on delivery {deliveries} of {max}: {e}")
                };
                tracing::warn!(target: "svcdb_amqp::consumer", %queue, %id, %kind, %reason, "dead-lettering");
                return dead_letter::dead_letter(context, delivery, &reason, deliveries).await;
            }
            let exponent = deliveries.saturating_sub(1).min(16);
            let delay = context
                .options
                .retry_delay
                .saturating_mul(1 << exponent)
                .min(context.options.max_retry_delay);
            tracing::warn!(target: "svcdb_amqp::consumer", %queue, %id, %kind, deliveries, max, error = %e, requeue_in = ?delay, "handler failed; the event will be redelivered");
            // Cut short at shutdown; the attempt failed all the same, so it still counts.
            pause(&context.shutdown, delay).await;
            settle::return_failed(context, delivery, id).await;
        }
    }
}

/// Runs the handler in the claim's transaction; a panic becomes an error (the transaction
/// was dropped, so it rolled back) instead of leaving the message unacknowledged.
async fn process(
    context: &Context,
    handler: &Arc<dyn DynHandler>,
    envelope: &Envelope,
) -> std::result::Result<Processed<()>, HandlerError> {
    let owned_handler = handler.clone();
    let owned_envelope = envelope.clone();
    // Boxed as `dyn Future + Send` here, where every lifetime is concrete. Left unboxed inside
    // this larger async fn, the spawned task's future fails rustc's higher-ranked `Send` check
    // ("implementation of `Send` is not general enough" for a `&str` in `process_once_with`'s
    // generic future), even with owned captures and a `'static` consumer name.
    let run: Pin<
        Box<dyn Future<Output = std::result::Result<Processed<()>, HandlerError>> + Send + '_>,
    > = Box::pin(context.db.process_once_with(
        &context.options.tx,
        &context.name,
        envelope,
        async move |tx| owned_handler.call(tx, &owned_envelope).await,
    ));
    let run = run.instrument(crate::spans::handler(&context.name, envelope));
    match AssertUnwindSafe(run).catch_unwind().await {
        Ok(result) => result,
        Err(panic) => Err(panicked(panic)),
    }
}

/// The error of a handler that panicked.
pub(super) fn panicked(panic: Box<dyn std::any::Any + Send>) -> HandlerError {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic".to_owned());
    HandlerError::msg(format!("handler panicked: {message}"))
}

/// This delivery's number, the first being 1: the failed deliveries the quorum queue counted
/// before it (`x-delivery-count`, absent on a first delivery), plus one. See
/// [delivery counting](super#delivery-counting) for what counts on which RabbitMQ version.
///
/// A delivery the broker does not flag `redelivered` is the message's first from this queue,
/// whatever its headers say: a message republished by hand (from a dead-letter queue, say)
/// may still carry the count of its earlier life. Classic queues do not count; on them every
/// delivery is number 1.
fn delivery_number(delivery: &Delivery) -> u32 {
    if !delivery.redelivered {
        return 1;
    }
    let Some(headers) = delivery.properties.headers() else {
        return 1;
    };
    let count = match headers.inner().get("x-delivery-count") {
        Some(AMQPValue::LongLongInt(n)) => *n,
        Some(AMQPValue::LongInt(n)) => i64::from(*n),
        Some(AMQPValue::ShortInt(n)) => i64::from(*n),
        Some(AMQPValue::LongUInt(n)) => i64::from(*n),
        _ => 0,
    };
    u32::try_from(count).unwrap_or(0).saturating_add(1)
}
