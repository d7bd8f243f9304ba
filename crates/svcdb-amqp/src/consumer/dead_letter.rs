//! Dead-lettering by the consumer: a copy to the queue's dead-letter exchange with headers
//! saying why, acknowledged once confirmed; rejected to the broker's own dead-lettering if
//! that fails. See [`Consumer`](crate::Consumer), "Dead letters".

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicRejectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};

use super::context::Context;
use super::settle;
use super::stats::Counters;
use crate::error::Result;

/// The longest reason kept in the dead-letter header, in characters.
const MAX_REASON_CHARS: usize = 2000;

/// Headers with which the broker counts a message's deliveries and dead-letterings. A
/// dead-letter copy goes without them: replayed after a fix, it starts with every delivery
/// (else it would arrive "at 5 of 5" and go back to the dead-letter queue on its first
/// transient failure).
const BROKER_COUNTING_HEADERS: [&str; 9] = [
    "x-delivery-count",
    "x-acquired-count",
    "x-death",
    "x-first-death-reason",
    "x-first-death-queue",
    "x-first-death-exchange",
    "x-last-death-reason",
    "x-last-death-queue",
    "x-last-death-exchange",
];

/// Copies the message to the dead-letter exchange with the reason, then acknowledges it; if
/// the copy is not confirmed in time, rejects it so the broker dead-letters it instead.
pub(super) async fn dead_letter(
    context: &Context,
    delivery: &Delivery,
    reason: &str,
    deliveries: u32,
) {
    let queue = context.queue.name.as_str();
    // One bound on both halves (`publish::start` and `finish`): `basic_publish` waits for its
    // frames to be written, which stops while the broker blocks the connection (memory or
    // disk alarm) or goes silent.
    let deadline = crate::publish::Deadline::after(context.options.confirm_timeout);
    let published = publish_dead_letter(context, delivery, reason, deliveries, deadline).await;
    match published {
        Ok(()) => {
            let ack = delivery.ack(BasicAckOptions::default());
            settle::settle(
                context,
                delivery.delivery_tag,
                None,
                "acknowledge a dead-lettered message",
                ack,
            )
            .await;
        }
        Err(e) => {
            tracing::warn!(target: "svcdb_amqp::consumer", %queue, error = %e, "could not copy the message to the dead-letter exchange; rejecting it so the broker dead-letters it (without the reason header)");
            let reject = delivery.reject(BasicRejectOptions { requeue: false });
            settle::settle(
                context,
                delivery.delivery_tag,
                None,
                "reject a message to dead-letter it",
                reject,
            )
            .await;
        }
    }
    Counters::bump(&context.counters.dead_lettered);
}

/// The headers of `properties` without the broker's counting ones: what a dead-letter copy,
/// and a replayed one, carries.
pub(crate) fn without_broker_counting(properties: &lapin::BasicProperties) -> FieldTable {
    properties
        .headers()
        .as_ref()
        .map(|h| {
            h.inner()
                .iter()
                .filter(|(name, _)| !BROKER_COUNTING_HEADERS.contains(&name.as_str()))
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect::<std::collections::BTreeMap<_, _>>()
                .into()
        })
        .unwrap_or_default()
}

/// Publishes the dead-letter copy (original body and properties, the broker's counting
/// headers removed, ours added) and awaits its confirm, all by `deadline`.
async fn publish_dead_letter(
    context: &Context,
    delivery: &Delivery,
    reason: &str,
    deliveries: u32,
    deadline: crate::publish::Deadline,
) -> Result<()> {
    let exchange = context.queue.dead_letter_exchange();
    let mut headers = without_broker_counting(&delivery.properties);
    let text = |s: &str| AMQPValue::LongString(LongString::from(s));
    // A replayed message came straight to the queue: where it first came from stays.
    let replayed = headers.inner().contains_key("x-svcdb-original-exchange");
    let reason: String = reason.chars().take(MAX_REASON_CHARS).collect();
    headers.insert("x-svcdb-reason".into(), text(&reason));
    headers.insert("x-svcdb-queue".into(), text(&context.queue.name));
    headers.insert("x-svcdb-consumer".into(), text(&context.name));
    if !replayed {
        headers.insert(
            "x-svcdb-original-exchange".into(),
            text(delivery.exchange.as_str()),
        );
        headers.insert(
            "x-svcdb-original-routing-key".into(),
            text(delivery.routing_key.as_str()),
        );
    }
    // Replaces the count of an earlier dead-lettering of a replayed message.
    headers.insert(
        "x-svcdb-deliveries".into(),
        AMQPValue::LongLongInt(i64::from(deliveries)),
    );
    let properties = delivery.properties.clone().with_headers(headers);
    let what = format!(
        "a dead letter from {} to exchange {exchange}",
        context.queue.name
    );
    let confirm = crate::publish::start(
        &context.dead_letters,
        &exchange,
        delivery.routing_key.as_str(),
        &delivery.data,
        properties,
        &what,
        deadline,
    )
    .await?;
    crate::publish::finish(confirm, deadline, what, crate::publish::Unroutable::Retry).await
}
