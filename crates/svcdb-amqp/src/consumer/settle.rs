//! How a delivery is settled: `basic.ack` after the commit, `basic.reject` with requeue for
//! a failed attempt (it counts), `basic.nack` with requeue for one not processed (since
//! RabbitMQ 4.3 it does not count); each bounded by the confirm timeout. A batch's
//! acknowledgements go as one `multiple` ack where that covers only its own deliveries.

use std::collections::BTreeSet;
use std::future::Future;

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};

use super::context::Context;
use super::stats::Counters;

/// Waits for a settlement (ack, reject, nack) of the delivery `tag` to be written, up to the
/// confirm timeout: a connection the broker blocked (memory or disk alarm) writes nothing. A
/// message left unsettled is redelivered when the channel closes.
pub(super) async fn settle<T>(
    context: &Context,
    tag: u64,
    id: Option<uuid::Uuid>,
    what: &str,
    settlement: impl Future<Output = lapin::Result<T>>,
) {
    let _order = context.unsettled.in_order().await;
    context.unsettled.take(&BTreeSet::from([tag]));
    written(context, id, what, settlement).await;
}

/// Waits for a settlement to be written, up to the confirm timeout, and logs a failure.
async fn written<T>(
    context: &Context,
    id: Option<uuid::Uuid>,
    what: &str,
    settlement: impl Future<Output = lapin::Result<T>>,
) {
    let queue = context.queue.name.as_str();
    match tokio::time::timeout(context.options.confirm_timeout, settlement).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::warn!(target: "svcdb_amqp::consumer", %queue, ?id, error = %e, "could not {what}; the broker redelivers the message when the channel closes");
        }
        Err(_) => {
            tracing::warn!(target: "svcdb_amqp::consumer", %queue, ?id, timeout = ?context.options.confirm_timeout, "could not {what} in time (is the connection blocked?); the broker redelivers the message when the channel closes");
        }
    }
}

/// Acknowledges a handled event (or a duplicate, or an ignored kind).
pub(super) async fn ack(context: &Context, delivery: &Delivery, id: uuid::Uuid) {
    // Committed but not acknowledged: the redelivery finds the claim and is a duplicate.
    let ack = delivery.ack(BasicAckOptions::default());
    settle(
        context,
        delivery.delivery_tag,
        Some(id),
        "acknowledge a handled event",
        ack,
    )
    .await;
}

/// Acknowledges a batch's handled events (and duplicates): one `multiple` ack for those that
/// are the lowest unsettled deliveries of the channel, one ack each for the others.
pub(super) async fn ack_all(context: &Context, deliveries: &[&Delivery]) {
    let _order = context.unsettled.in_order().await;
    let ours: BTreeSet<u64> = deliveries.iter().map(|d| d.delivery_tag).collect();
    let upto = context.unsettled.take(&ours);
    let acks = deliveries.iter().filter_map(|delivery| {
        let tag = delivery.delivery_tag;
        let ack = match upto {
            Some(upto) if tag < upto => return None, // covered by the multiple ack
            Some(upto) if tag == upto => delivery.ack(BasicAckOptions { multiple: true }),
            _ => delivery.ack(BasicAckOptions::default()),
        };
        Some(written(context, None, "acknowledge handled events", ack))
    });
    futures_util::future::join_all(acks).await;
}

/// Hands back a message whose handler failed, with `basic.reject` and requeue: a failed
/// delivery on every RabbitMQ version. (Before 4.3 every return counts; since 4.3 only
/// `basic.reject` and a closed channel do, `basic.nack` does not: rabbitmq-server PR 15387,
/// <https://www.rabbitmq.com/docs/4.3/nack>. A nack here would retry a poison message
/// forever on 4.3, its `x-delivery-count` stuck.)
pub(super) async fn return_failed(context: &Context, delivery: &Delivery, id: uuid::Uuid) {
    Counters::bump(&context.counters.requeued);
    let reject = delivery.reject(BasicRejectOptions { requeue: true });
    settle(
        context,
        delivery.delivery_tag,
        Some(id),
        "requeue a failed event",
        reject,
    )
    .await;
}

/// Hands back a message that was not processed (database unavailable, shutdown), with
/// `basic.nack` and requeue: since RabbitMQ 4.3 a return without failure that leaves
/// `x-delivery-count` as it is (rabbitmq-server PR 15387,
/// <https://www.rabbitmq.com/docs/4.3/nack>). Before 4.3 a quorum queue counts every return,
/// this one too: a database outage then costs each message in flight one delivery (one per
/// outage, as the consumer pauses rather than retries).
pub(super) async fn return_unprocessed(context: &Context, delivery: &Delivery, id: uuid::Uuid) {
    Counters::bump(&context.counters.returned);
    let nack = delivery.nack(BasicNackOptions {
        requeue: true,
        multiple: false, // a multiple nack never counts on 4.3 either, but takes others along
    });
    settle(
        context,
        delivery.delivery_tag,
        Some(id),
        "hand back an unprocessed event",
        nack,
    )
    .await;
}
