//! What a consumer did: the counters its delivery tasks bump, and the snapshot
//! [`Consumer::stats`] returns.

use std::sync::atomic::{AtomicU64, Ordering};

#[cfg(doc)]
use super::{Consumer, UnknownKind};

/// What a [`Consumer`] did since it was built, for metrics and tests ([`Consumer::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConsumerStats {
    /// Events whose handler ran and committed (acknowledged).
    pub handled: u64,
    /// Deliveries of events already handled (acknowledged, nothing changed).
    pub duplicates: u64,
    /// Failed attempts handed back to the queue for redelivery (`basic.reject`): each spends
    /// one of the message's deliveries.
    pub requeued: u64,
    /// Messages handed back unprocessed (`basic.nack`), because the database was unavailable
    /// or the consumer was shutting down: on RabbitMQ 4.3+ they spend no delivery.
    pub returned: u64,
    /// Times the consumer stopped taking deliveries until the database answered again.
    pub paused: u64,
    /// Messages sent to the dead-letter queue (by the consumer, or rejected to the broker's
    /// dead-lettering when that failed), counted once the attempt is over.
    pub dead_lettered: u64,
    /// Events without a handler acknowledged under [`UnknownKind::Ack`].
    pub ignored: u64,
}

/// The counters behind [`ConsumerStats`], shared by a consumer's clones and tasks.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) handled: AtomicU64,
    pub(super) duplicates: AtomicU64,
    pub(super) requeued: AtomicU64,
    pub(super) returned: AtomicU64,
    pub(super) paused: AtomicU64,
    pub(super) dead_lettered: AtomicU64,
    pub(super) ignored: AtomicU64,
}

impl Counters {
    /// Counts one more.
    pub(super) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The counts now.
    pub(super) fn snapshot(&self) -> ConsumerStats {
        ConsumerStats {
            handled: self.handled.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            requeued: self.requeued.load(Ordering::Relaxed),
            returned: self.returned.load(Ordering::Relaxed),
            paused: self.paused.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            ignored: self.ignored.load(Ordering::Relaxed),
        }
    }
}
