//! Replaying a queue's dead letters after a fix: each message in `<queue>.dlq` is published
//! again straight to `<queue>` (the default exchange, so no other queue bound to the original
//! exchange gets a copy) and removed from the dead-letter queue only once the broker confirmed
//! the copy. A crash in between leaves the message in both; the consumer's claims absorb the
//! second copy, as any redelivery.
//!
//! Only the messages there when the replay starts are moved: one that fails again and comes
//! back to the dead-letter queue waits for the next replay instead of going round for ever.
//! The copy keeps the message's properties and headers, svcdb's `x-svcdb-reason`,
//! `x-svcdb-deliveries` and `x-svcdb-original-exchange` included (what happened before, and
//! where it first came from, which a failure after the replay keeps), without the broker's
//! counting headers (`x-death`, …, of a message the broker dead-lettered itself): it starts at
//! delivery 1.

use std::time::Duration;

use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde::Serialize;

use crate::config::AmqpConfig;
use crate::connection::confirm_channel;
use crate::error::{Error, Result};
use crate::publish::{finish, start, Deadline, Unroutable};
use crate::topology::QueueSpec;

/// How long one copy may wait for its confirm, and each other exchange with the broker for its
/// answer (a broker gone silent must not hold the replay for ever).
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// `step`, bounded by [`CONFIRM_TIMEOUT`]; `what` names it in the error.
async fn bounded<T>(
    what: impl Fn() -> String,
    step: impl std::future::Future<Output = lapin::Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(CONFIRM_TIMEOUT, step).await {
        Ok(done) => done.map_err(|e| Error::amqp(what(), e)),
        Err(_) => Err(Error::ConfirmTimeout {
            what: what(),
            timeout: CONFIRM_TIMEOUT,
        }),
    }
}

/// What [`replay_dead_letters`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplayReport {
    /// The consumer queue the messages went back to.
    pub queue: String,
    /// Its dead-letter queue, where they came from.
    pub dead_letter_queue: String,
    /// Messages moved back.
    pub replayed: u64,
    /// Messages left in the dead-letter queue (beyond `limit`, or arrived during the replay).
    pub left: u64,
}

/// Moves up to `limit` (all, with `None`) of the messages waiting in `queue`'s dead-letter
/// queue back to `queue`, oldest first, each confirmed by the broker before it leaves the
/// dead-letter queue. Both queues must exist ([`Error::QueueNotFound`] otherwise: a replay
/// must not create a queue nobody consumes).
///
/// A `queue` that cannot have a dead-letter queue is refused before connecting
/// ([`Error::InvalidName`]): empty, or over AMQP's 255 bytes with its `.dlq`.
pub async fn replay_dead_letters(
    config: &AmqpConfig,
    queue: &str,
    limit: Option<u64>,
) -> Result<ReplayReport> {
    check_queue(queue)?;
    let dead_letter_queue = QueueSpec::new(queue).dead_letter_queue();
    let connection = config.connect().await?;
    let replayed = async {
        let channel = confirm_channel(&connection).await?;
        // How many messages `name` holds; a passive declare, which fails on a missing queue.
        let count = async |name: &str| {
            let passive = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            bounded(
                || format!("looking for queue {name:?}"),
                channel.queue_declare(name.into(), passive, FieldTable::default()),
            )
            .await
            .map(|q| u64::from(q.message_count()))
        };
        for name in [queue, dead_letter_queue.as_str()] {
            match count(name).await {
                Err(e) if e.is_not_found() => {
                    return Err(Error::QueueNotFound {
                        queue: name.to_owned(),
                        dead_letters_of: (name != queue).then(|| queue.to_owned()),
                    })
                }
                other => other?,
            };
        }
        let waiting = count(&dead_letter_queue).await?;
        let to_move = limit.map_or(waiting, |l| l.min(waiting));
        let mut replayed = 0;
        // Once some moved, a failure says how many.
        let stopped = |replayed: u64, e: Error| match replayed {
            0 => e,
            replayed => Error::ReplayStopped {
                replayed,
                cause: Box::new(e),
            },
        };
        while replayed < to_move {
            let Some(message) = bounded(
                || format!("taking a message from {dead_letter_queue:?}"),
                channel.basic_get(
                    dead_letter_queue.as_str().into(),
                    BasicGetOptions::default(),
                ),
            )
            .await
            .map_err(|e| stopped(replayed, e))?
            else {
                break; // another replay, or a consumer of the dead letters, took the rest
            };
            let what = format!("dead letter {} back to queue {queue:?}", replayed + 1);
            let deadline = Deadline::after(CONFIRM_TIMEOUT);
            let sent = async {
                let confirm = start(
                    &channel,
                    "",
                    queue,
                    &message.delivery.data,
                    // The broker's counting headers of a message it dead-lettered itself
                    // (`x-death`) go, as from the consumer's own dead letters.
                    message.delivery.properties.clone().with_headers(
                        crate::consumer::without_broker_counting(&message.delivery.properties),
                    ),
                    &what,
                    deadline,
                )
                .await?;
                finish(confirm, deadline, what.clone(), Unroutable::Retry).await
            }
            .await;
            let tag = message.delivery.delivery_tag;
            if let Err(e) = sent {
                // Back where it was; the copy, if the broker took it after all, is a
                // duplicate the claims absorb.
                let requeue = BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                };
                let _ =
                    tokio::time::timeout(CONFIRM_TIMEOUT, channel.basic_nack(tag, requeue)).await;
                return Err(stopped(replayed, e));
            }
            bounded(
                || format!("removing {what} from the dead-letter queue"),
                channel.basic_ack(tag, BasicAckOptions::default()),
            )
            .await
            .map_err(|e| stopped(replayed, e))?;
            replayed += 1;
        }
        let left = count(&dead_letter_queue).await?;
        let _ = tokio::time::timeout(CONFIRM_TIMEOUT, channel.close(200, "OK".into())).await;
        Ok::<_, Error>((replayed, left))
    }
    .await;
    let _ = tokio::time::timeout(CONFIRM_TIMEOUT, connection.close(200, "OK".into())).await;
    let (replayed, left) = replayed?;
    Ok(ReplayReport {
        queue: queue.to_owned(),
        dead_letter_queue,
        replayed,
        left,
    })
}

/// Refuses a queue whose dead letters cannot be replayed, before connecting. Found by a user
/// trial: `svcdb events replay --queue` with a name of 252 to 255 bytes (one RabbitMQ takes)
/// panicked in lapin, which cannot send its dead-letter queue's name (over 255 bytes); any
/// longer name did too. Only the lengths are checked: a queue declared by other means, with
/// characters svcdb's topology would refuse, may still have dead letters to move.
fn check_queue(queue: &str) -> Result<()> {
    if queue.is_empty() {
        return Err(Error::InvalidName {
            what: "queue",
            name: String::new(),
            reason: "it is empty\n  hint: name the consumer queue whose dead letters to move back, such as orders.reserve-stock".into(),
        });
    }
    crate::topology::check_length("queue", queue)?;
    crate::topology::check_dead_letter_names(queue)
}
