//! What a consumer does with events it has no handler for, and how it retries, waits and
//! shuts down.

use std::time::Duration;

use svcdb::TxOptions;

#[cfg(doc)]
use super::Consumer;

/// What a consumer does with an event whose kind has no handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnknownKind {
    /// Send it to the dead-letter queue, to replay once a handler exists.
    #[default]
    DeadLetter,
    /// Acknowledge and drop it (logged at debug level): for queues bound more widely than
    /// the kinds they handle, on purpose.
    Ack,
}

/// The default [`ConsumerOptions::batch`], measured with `svcdb-bench events
/// --consume-batch`: at a prefetch of 128, batches of 16 handled more events a second than
/// batches of 8 (fewer commits) or 32 (fewer batches in flight); the default prefetch
/// ([`DEFAULT_PREFETCH`](crate::DEFAULT_PREFETCH), 128) has room for 8 such batches.
pub const DEFAULT_BATCH: usize = 16;

/// How a [`Consumer`] retries, waits and shuts down. Every field has a default.
#[derive(Debug, Clone)]
pub struct ConsumerOptions {
    /// The transaction each handler runs in: isolation level, and how often to retry it on a
    /// serialization failure or deadlock before counting the attempt as failed. Default:
    /// read committed, 5 attempts.
    pub tx: TxOptions,
    /// Deliveries handled in one database transaction: each claims its event and runs its
    /// handler under a savepoint, then one commit, then the acknowledgements (see
    /// [Batches](super::Consumer#batches)). At most the prefetch: a batch holds its
    /// deliveries for its whole transaction, so for batches to overlap give the prefetch room
    /// for several ([`AmqpConfig::prefetch`](crate::AmqpConfig::prefetch), by default 128: 8
    /// batches of 16 in flight; at 32, only two).
    /// `1` handles each delivery in its own transaction: use it for handlers that call other
    /// systems (HTTP, email), whose effects a failed batch would repeat for its neighbours,
    /// and for handlers that lock rows shared by many events (a stock counter), which
    /// batches would hold until their commit and deadlock over.
    /// Default: [`DEFAULT_BATCH`].
    pub batch: usize,
    /// How long a batch waits for more deliveries after its first before it is handled
    /// anyway, while another batch of this consumer is running (with [`ConsumerOptions::eager`]
    /// off: always). Default: 1 ms.
    pub linger: Duration,
    /// Start a batch at once, whatever it holds, when no other batch of this consumer is
    /// running: a quiet queue answers without lingering, and under load the next batch fills
    /// while the previous one runs and starts when it is done (as PostgreSQL groups commits),
    /// so batches grow with the load. Off, every batch waits until it is full or for
    /// [`ConsumerOptions::linger`]. Default: false (the shop's services, eager, made fewer
    /// orders a second under their faults; not yet understood, see docs/benchmarks.md).
    pub eager: bool,
    /// What to do with an event kind that has no handler. Default: dead-letter.
    pub unknown_kind: UnknownKind,
    /// Pause before returning a failed message for redelivery, doubled for each earlier
    /// delivery: it gives a conflicting writer or a briefly unavailable dependency time to
    /// clear, instead of spending every delivery in a few milliseconds. The message (and its
    /// prefetch slot) is held meanwhile, but not a database permit. Also the first pause
    /// before checking an unavailable database, doubled per check. Default: 500 ms.
    pub retry_delay: Duration,
    /// The longest such pause, and the longest between checks of an unavailable database.
    /// Default: 10 s.
    pub max_retry_delay: Duration,
    /// Bound on publishing a dead-letter copy (until the broker confirmed it) and on writing
    /// each ack, reject or nack: a broker that went silent, or blocked the connection under a
    /// memory or disk alarm, must not hang the consumer. Default: 5 s.
    pub confirm_timeout: Duration,
    /// Longest wait, at shutdown, for in-flight handlers; after it they are aborted (their
    /// transactions roll back and the broker redelivers their messages). Default: 15 s, so that
    /// in a [`Service`](crate::Service) the consumers' drain and the relay's last batch (up to
    /// its 5 s confirm timeout) fit in the service's 25 s shutdown, itself below Kubernetes'
    /// 30 s grace period.
    pub shutdown_timeout: Duration,
    /// First pause before reconnecting after the connection was lost ([`Consumer::run`]);
    /// doubled per failed attempt. Default: 100 ms.
    pub reconnect_backoff: Duration,
    /// The longest pause between reconnection attempts. Default: 5 s.
    pub max_reconnect_backoff: Duration,
    /// How long [`Consumer::run`] keeps claims before deleting them in the background.
    /// Default: [`Retention::claims`](crate::retention::Retention::claims) (7 days, checked hourly).
    pub retention: crate::retention::Retention,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        Self {
            tx: TxOptions::default(),
            batch: DEFAULT_BATCH,
            linger: Duration::from_millis(1),
            eager: false,
            unknown_kind: UnknownKind::default(),
            retry_delay: Duration::from_millis(500),
            max_retry_delay: Duration::from_secs(10),
            confirm_timeout: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(15),
            reconnect_backoff: Duration::from_millis(100),
            max_reconnect_backoff: Duration::from_secs(5),
            retention: crate::retention::Retention::claims(),
        }
    }
}
