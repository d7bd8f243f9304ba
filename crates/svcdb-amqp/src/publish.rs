//! Publishing envelopes with publisher confirms: the AMQP properties an event carries, and a
//! confirmed publish for tools and tests. Services publish through the outbox
//! ([`svcdb::outbox::enqueue`] and the [relay](crate::Relay)), not with this directly: a
//! publish outside the business transaction can announce what then rolls back.
//!
//! Every event is published
//!
//! * **persistent** (`delivery_mode` 2), so it survives a broker restart in a durable queue;
//! * with **`message_id`** = the envelope id (the consumers' idempotency key, visible in the
//!   management UI and to non-svcdb consumers), `content_type` `application/json`, `type` =
//!   the kind, `app_id` = the source, `correlation_id` and `timestamp` from the envelope;
//! * with the producer's W3C trace context as the header **`traceparent`**, when it has one
//!   ([`svcdb::trace`]), so that the consumer's span continues the producer's trace;
//! * **mandatory**, so a message no queue is bound for comes back instead of vanishing
//!   ([`Unroutable`] says what that means);
//! * on a channel in **confirm mode**, and counted as sent only once the broker confirmed it
//!   (for durable queues, after it is written to disk);
//! * within a **deadline** that covers writing the frames as well as the confirm. Writing
//!   can wait forever: under a memory or disk alarm RabbitMQ sends `connection.blocked` and
//!   stops reading from publishing connections, and lapin then stops writing (its io loop
//!   holds frames while the connection is blocked); a broker that went silent never answers.
//!   A publish that misses its deadline is [`Error::ConfirmTimeout`], and the channel must be
//!   replaced: its frames may still go out, and a late confirm must not be taken for another
//!   message's.

use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};
use svcdb::Envelope;
use tokio::time::Instant;

pub use crate::connection::confirm_channel;
use crate::error::{Error, Result};

/// The broker's `delivery_mode` for messages written to disk.
pub const PERSISTENT: u8 = 2;

/// The content type of every event.
pub const CONTENT_TYPE: &str = "application/json";

/// What a publisher does with a message the broker returned as unroutable (no queue bound
/// for its routing key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Unroutable {
    /// Count it as failed: the outbox row stays and is retried with backoff until a queue is
    /// bound. Nothing is lost when a producer starts before its consumers declared their
    /// queues; an event nobody subscribes to is retried (with growing pauses, up to the
    /// outbox's maximum backoff) and shows in [`Outbox::pending_count`].
    ///
    /// [`Outbox::pending_count`]: svcdb::Outbox::pending_count
    #[default]
    Retry,
    /// Count it as published and log it: for exchanges where events nobody consumes are
    /// normal.
    Drop,
}

/// The AMQP properties of `envelope` (see the module documentation).
pub fn envelope_properties(envelope: &Envelope) -> BasicProperties {
    let mut properties = BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_content_type(CONTENT_TYPE.into())
        .with_message_id(envelope.id.to_string().into())
        .with_type(short(&envelope.kind))
        .with_app_id(short(&envelope.source));
    if let Ok(secs) = u64::try_from(envelope.occurred_at.timestamp()) {
        properties = properties.with_timestamp(secs);
    }
    if let Some(correlation) = envelope.correlation_id {
        properties = properties.with_correlation_id(correlation.to_string().into());
    }
    properties
}

/// `properties` with the `traceparent` header, when there is one.
pub fn with_traceparent(properties: BasicProperties, traceparent: Option<&str>) -> BasicProperties {
    let Some(traceparent) = traceparent else {
        return properties;
    };
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(
        svcdb::trace::TRACEPARENT_HEADER.into(),
        AMQPValue::LongString(traceparent.into()),
    );
    properties.with_headers(headers)
}

/// A short string property; AMQP carries at most 255 bytes, so longer values are cut on a
/// character boundary (the full value is in the body).
pub(crate) fn short(value: &str) -> ShortString {
    let mut end = value.len().min(255);
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    value[..end].into()
}

/// Publishes `envelope` to `exchange` with `routing_key` and waits up to `confirm_timeout`
/// for the frames to be written and the broker's confirm. `channel` must be in confirm mode
/// ([`confirm_channel`]).
///
/// An unroutable message is an error ([`Error::NotConfirmed`]), as is a negative confirm;
/// no confirm in time (the broker is slow, silent, or has blocked the connection) is
/// [`Error::ConfirmTimeout`].
pub async fn publish_envelope(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    envelope: &Envelope,
    confirm_timeout: Duration,
) -> Result<()> {
    let what = describe(exchange, routing_key, envelope);
    let deadline = Deadline::after(confirm_timeout);
    let confirm = start(
        channel,
        exchange,
        routing_key,
        &envelope.to_json_bytes(),
        with_traceparent(
            envelope_properties(envelope),
            svcdb::trace::current().map(|t| t.to_string()).as_deref(),
        ),
        &what,
        deadline,
    )
    .await?;
    finish(confirm, deadline, what, Unroutable::Retry).await
}

/// The reason of a negative confirm.
const NACKED: &str = "the broker nacked it (an internal error or a full queue with reject-publish)";

/// Whether `error` is a negative confirm (`basic.nack`) from the broker.
pub(crate) fn is_nack(error: &Error) -> bool {
    matches!(error, Error::NotConfirmed { reason, .. } if reason == NACKED)
}

/// When a publish (or a batch of them) must be done by, and the timeout it came from (for
/// the error).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline {
    /// The instant.
    pub(crate) at: Instant,
    /// The bound it was made from.
    pub(crate) timeout: Duration,
}

impl Deadline {
    /// `timeout` from now.
    pub(crate) fn after(timeout: Duration) -> Self {
        // Saturates: a huge configured timeout means "no practical bound", not a panic.
        Self {
            at: Instant::now() + svcdb::__private::capped_wait(timeout),
            timeout,
        }
    }
}

/// How a message is named in errors and logs.
pub(crate) fn describe(exchange: &str, routing_key: &str, envelope: &Envelope) -> String {
    format!(
        "{} event {} to exchange {exchange:?} with routing key {routing_key:?}",
        envelope.kind, envelope.id
    )
}

/// Sends one message (mandatory) and returns its pending confirm, or
/// [`Error::ConfirmTimeout`] if its frames are not written by `deadline` (see the module
/// documentation: the channel must then be replaced). Names over 255 bytes are refused here
/// (lapin would panic on them); the outbox checks them at enqueue time, but a row written by
/// hand is not checked.
pub(crate) async fn start(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
    what: &str,
    deadline: Deadline,
) -> Result<PublisherConfirm> {
    let name = |kind: &'static str, value: &str| {
        crate::topology::check_length(kind, value).map(|()| ShortString::from(value))
    };
    let exchange = name("exchange", exchange)?;
    let routing_key = name("routing key", routing_key)?;
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    let publish = channel.basic_publish(exchange, routing_key, options, body, properties);
    match tokio::time::timeout_at(deadline.at, publish).await {
        Err(_) => Err(Error::ConfirmTimeout {
            what: what.to_owned(),
            timeout: deadline.timeout,
        }),
        Ok(result) => result.map_err(|e| Error::amqp(format!("publishing {what}"), e)),
    }
}

/// Waits for one confirm until `deadline` and says whether the message is safely with the
/// broker.
pub(crate) async fn finish(
    confirm: PublisherConfirm,
    deadline: Deadline,
    what: String,
    unroutable: Unroutable,
) -> Result<()> {
    match tokio::time::timeout_at(deadline.at, confirm).await {
        Err(_) => Err(Error::ConfirmTimeout {
            what,
            timeout: deadline.timeout,
        }),
        Ok(Err(e)) => Err(Error::amqp(format!("publishing {what}"), e)),
        Ok(Ok(Confirmation::Ack(None))) => Ok(()),
        Ok(Ok(Confirmation::Ack(Some(returned)))) => {
            let reason = format!(
                "no queue is bound for it ({} {}); declare the consumers' queues, or relay with Unroutable::Drop",
                returned.reply_code, returned.reply_text
            );
            match unroutable {
                Unroutable::Retry => Err(Error::NotConfirmed { what, reason }),
                Unroutable::Drop => {
                    tracing::info!(target: "svcdb_amqp::publish", %what, "dropped an unroutable message: {reason}");
                    Ok(())
                }
            }
        }
        Ok(Ok(Confirmation::Nack(_))) => Err(Error::NotConfirmed {
            what,
            reason: NACKED.into(),
        }),
        Ok(Ok(Confirmation::NotRequested)) => Err(Error::NotConfirmed {
            what,
            reason: "the channel is not in confirm mode, so the broker never said it took the message; publish on a channel from confirm_channel".into(),
        }),
    }
}
