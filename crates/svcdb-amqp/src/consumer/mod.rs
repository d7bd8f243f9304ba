//! The consumer runtime: deliveries from one queue, each handled once in the service's
//! database, acknowledged only after the handler's transaction committed.

// This file: the consumer's builder, its checks and the reconnecting run loop. The rest, one
// concept per file:
//   consume      the consume loop on one channel: a task per delivery or batch, pause, drain
//   batch        a batch: collected with a linger, claims and handlers under savepoints in one
//                transaction, acks (multiple where contiguous), failures one by one
//   context      what a channel's delivery tasks share
//   delivery     one delivery: decode, claim and handle in one transaction, decide its fate
//   settle       ack, reject and nack, and which of them counts as a delivery
//   unsettled    a channel's deliveries not settled yet, and which a `multiple` ack may cover
//   dead_letter  copying a message to the dead-letter exchange with the reason
//   outage       pausing while the database is unavailable
//   options      ConsumerOptions and UnknownKind
//   stats        ConsumerStats and the counters behind them
mod batch;
mod consume;
mod context;
mod dead_letter;
pub(crate) use dead_letter::without_broker_counting;
mod delivery;
mod options;
mod outage;
mod settle;
mod stats;
mod unsettled;

use std::collections::HashMap;
use std::sync::Arc;

use lapin::Connection;
use svcdb::{Envelope, ServiceDb};
use tokio_util::sync::CancellationToken;

#[cfg(doc)]
use svcdb::Processed;

pub use self::options::{ConsumerOptions, UnknownKind, DEFAULT_BATCH};
pub use self::stats::ConsumerStats;
use self::stats::Counters;
use crate::config::AmqpConfig;
use crate::connection::{
    close_channel, close_connection, connect_unless_cancelled, next_backoff, open_channel, pause,
};
use crate::error::{Error, Result};
#[cfg(doc)]
use crate::handler::HandlerError;
use crate::handler::{DynHandler, EventHandler, FnHandler, HandlerFuture};
use crate::topology::QueueSpec;

/// Consumes one queue into one service's database, with a handler per event kind.
///
/// Build it with [`Consumer::new`] and [`Consumer::on`] / [`Consumer::on_handler`], then
/// [`Consumer::run`] it until a shutdown token is cancelled. Cheap to clone (handlers are
/// shared).
///
/// For each delivery:
///
/// 1. The body is decoded with [`Envelope::from_slice`]. A malformed message (not JSON, no
///    `id`, too large, …) is dead-lettered with the reason: redelivering it cannot help.
/// 2. The handler for the envelope's `kind` runs inside
///    [`ServiceDb::process_once_with`] (or, in a [batch](#batches), a transaction shared with
///    the batch's other deliveries): the claim on (consumer name, event id) commits in the
///    same transaction as the handler's writes (and any events it enqueued in the outbox).
/// 3. [`Processed::Done`] or [`Processed::Duplicate`]: acknowledged. Acks come only after the
///    commit, so delivery is at least once, and a redelivery after a lost ack finds the claim
///    and changes nothing.
/// 4. A failed handler: everything rolled back. See [`HandlerError`] for retry, requeue and
///    dead-lettering, and [Delivery counting](#delivery-counting) for how attempts are
///    bounded even when the process crashes mid-handler.
/// 5. The database unavailable (a terminated backend, a read-only primary after a failover,
///    no connection: [`HandlerError::is_database_unavailable`]): not the event's fault. The
///    message is handed back without spending a delivery and the consumer pauses: it cancels
///    its `basic.consume`, so the broker sends it nothing more, checks the database with
///    backoff (up to [`ConsumerOptions::max_retry_delay`]) until it hands out a connection
///    that can write, and consumes again. A failover does not dead-letter the backlog.
///
/// An event kind with no handler is dead-lettered by default ([`UnknownKind`]): a binding wider
/// than the handlers, or a handler not yet deployed, should be visible and replayable, not
/// silently acknowledged.
///
/// # Batches
///
/// By default the consumer handles up to [`ConsumerOptions::batch`] deliveries
/// ([`DEFAULT_BATCH`], at most the prefetch) in one transaction: a batch closes when full or
/// [`ConsumerOptions::linger`] after its first delivery, so a quiet queue answers at once.
/// With [`ConsumerOptions::eager`], a batch also starts at once when no other batch of the
/// consumer is running, and while one runs the next fills and starts when it ends: batches
/// grow with the load, as PostgreSQL groups commits.
/// The batch's events are claimed in one statement ([`svcdb::idempotency::claim_batch`]),
/// each handler runs under a savepoint of its own ([`svcdb::idempotency::savepoint_event`]),
/// then the transaction commits once and the deliveries are acknowledged (one `multiple` ack
/// for those that are the channel's lowest unsettled). Fewer round trips and one commit for
/// many events is what makes it fast.
///
/// * Exactly once, as for a single delivery: the claims commit with the effects. A crash
///   before the commit redelivers the whole batch, whose claims never existed; after it, the
///   redeliveries find their claims and are duplicates. Two copies of one event in a batch:
///   the second is a duplicate.
/// * A failing handler fails only its own delivery: its savepoint is rolled back (its claim
///   with it) and the rest of the batch commits; the failed delivery is then returned or
///   dead-lettered on its own, by the rules above (`basic.reject`, never a `multiple` nack,
///   which RabbitMQ would not count).
/// * The database unavailable (the connection dies, the commit fails for it): the whole
///   batch is handed back with `basic.nack` and the consumer pauses, as for one delivery.
/// * When the batch fails otherwise (a deadlock or serialization failure, a deferred
///   constraint refused at commit) each of its deliveries is handled again on its own, in a
///   transaction of its own with the retries of [`ConsumerOptions::tx`], so only the one at
///   fault fails. The batch itself is not run again: one that deadlocked would likely
///   deadlock again, each time after the server's `deadlock_timeout`.
///
/// A handler in a batch shares the transaction: a `SET LOCAL` it makes holds for the
/// handlers after it, and [`ConsumerOptions::tx`] sets the isolation level of the batch.
///
/// Use `batch = 1` (a transaction per delivery)
///
/// * when handlers call other systems (an HTTP API, an email): a batch that fails and falls
///   back to one delivery at a time repeats those calls for every event in it, not only the
///   failed one (database writes, and events enqueued in the outbox, are never repeated);
/// * when handlers lock rows that other events lock too (a stock counter, an account
///   balance): a batch holds every lock its events took until it commits, so two batches
///   lock shared rows in different orders and deadlock, each deadlock costing the server's
///   `deadlock_timeout` (1 s). The shop's stock reservation measured 136 deadlocks and half
///   the order rate with batches of 16 (see docs/benchmarks.md).
///
/// # Delivery counting
///
/// The consumer numbers each delivery from the quorum queue's `x-delivery-count` (failed
/// deliveries before this one) and dead-letters the failure of the last one allowed
/// ([`QueueSpec::max_deliveries`]) itself, with the handler's error; the queue's
/// `x-delivery-limit` is the backstop for handlers that crash the process. How it hands a
/// message back decides whether the return counts:
///
/// | return | method | RabbitMQ 4.3 and later | RabbitMQ 3.x to 4.2 |
/// |---|---|---|---|
/// | the handler failed | `basic.reject`, requeue | counts | counts |
/// | database unavailable, shutdown | `basic.nack`, requeue | does not count | counts |
/// | the channel closed with the message unacknowledged (crash) | — | counts | counts |
///
/// Since 4.3 a quorum queue counts only failed deliveries in `x-delivery-count`: `basic.reject`
/// means the processing failed, `basic.nack` means the consumer could not process the message
/// now (rabbitmq-server PR 15387, <https://www.rabbitmq.com/docs/4.3/nack>). Before 4.3 every
/// return counts, so there a database outage costs each message in flight one delivery: one,
/// not one per retry, because the consumer pauses instead of retrying. `x-acquired-count`
/// (4.3+, every assignment) is not used. A first delivery (`redelivered` unset) is number 1
/// whatever headers it carries. On a classic queue declared elsewhere nothing counts, and a
/// message that always fails is retried (with [`ConsumerOptions::retry_delay`]) until it is
/// removed by hand; declare queues with [`crate::topology`].
///
/// # Dead letters
///
/// The consumer republishes a message it gives up on to the queue's dead-letter exchange
/// (`<queue>.dlx`) itself, with its original body and properties plus headers saying why, and
/// acknowledges it once the broker confirmed the copy (bounded by
/// [`ConsumerOptions::confirm_timeout`]):
///
/// | header | value |
/// |---|---|
/// | `x-svcdb-reason` | what went wrong: the decoding error, the handler's error, … |
/// | `x-svcdb-queue`, `x-svcdb-consumer` | where it was being handled |
/// | `x-svcdb-original-exchange`, `x-svcdb-original-routing-key` | where to replay it |
/// | `x-svcdb-deliveries` | deliveries so far, this one included |
///
/// The copy starts afresh: the broker's counting headers (`x-delivery-count`,
/// `x-acquired-count`, `x-death` and the `x-first-death-*` / `x-last-death-*` summaries) are
/// removed from it, so a message replayed from the dead-letter queue after a fix gets every
/// delivery again instead of arriving "at 5 of 5".
///
/// If that publish fails (the exchange is missing, the channel broke, no confirm in time) the
/// message is rejected without requeue instead, and the broker dead-letters it with its own
/// `x-death` headers; the reason is then only in the log. Messages the broker dead-letters
/// after the delivery limit (a handler that crashed the process every time) carry `x-death`
/// with reason `delivery_limit`.
///
/// # Concurrency and shutdown
///
/// The broker sends at most `prefetch` unacknowledged messages ([`AmqpConfig::prefetch`]);
/// each batch (or, with `batch = 1`, each message) is handled on its own task, at most
/// `min(prefetch, pool_max)` at once, so handlers
/// queue for a permit rather than time out waiting for a database connection. A permit is
/// held only while the handler's transaction runs: a failed message waiting out its pause
/// before redelivery holds none, so failing messages do not stall healthy ones. Cancelling the
/// shutdown token stops consuming (`basic.cancel`), handles the deliveries already received,
/// waits for in-flight handlers to commit and acknowledge (up to
/// [`ConsumerOptions::shutdown_timeout`]), then closes the channels.
///
/// ```no_run
/// use svcdb_amqp::topology::{events_exchange, QueueSpec, Topology};
/// use svcdb_amqp::{AmqpConfig, Consumer};
/// use tokio_util::sync::CancellationToken;
///
/// # async fn demo(db: svcdb::ServiceDb) -> anyhow::Result<()> {
/// let amqp = AmqpConfig::from_env()?;
/// let queue = QueueSpec::new("orders.reserve-stock").bind(events_exchange("catalog"), "product.stock.*");
/// let connection = amqp.connect().await?;
/// Topology::new().queue(queue.clone()).declare(&connection).await?;
/// db.install_idempotency().await?;
///
/// let consumer = Consumer::new(&amqp, db, &queue, "orders.reserve-stock").on(
///     "ProductStockReserved",
///     |tx, event| Box::pin(async move {
///         let quantity = event.payload["quantity"].as_i64().unwrap_or(0);
///         tx.execute("UPDATE reservations SET quantity = quantity + $1", &[&quantity]).await?;
///         Ok(())
///     }),
/// );
/// let shutdown = CancellationToken::new();
/// let task = tokio::spawn({
///     let shutdown = shutdown.clone();
///     async move { consumer.run(shutdown).await } // reconnects after a broker restart
/// });
/// tokio::signal::ctrl_c().await?;
/// shutdown.cancel();
/// task.await??; // in-flight handlers finished and acknowledged
/// # Ok(()) }
/// ```
///
/// [`AmqpConfig::prefetch`]: crate::AmqpConfig::prefetch
#[derive(Clone)]
pub struct Consumer {
    /// Where to (re)connect, and the prefetch.
    config: AmqpConfig,
    /// The service's pool: handlers' transactions and claims run here.
    db: ServiceDb,
    /// The queue, with its delivery limit and dead-letter exchange.
    queue: QueueSpec,
    /// The idempotency scope of the claims and the prefix of the consumer tag.
    name: String,
    /// Handlers by event kind.
    handlers: HashMap<String, Arc<dyn DynHandler>>,
    /// A kind registered twice, reported by `run` (the builder methods do not fail).
    duplicate: Option<String>,
    /// Retries, pauses and shutdown.
    options: ConsumerOptions,
    /// What it did, shared with its clones and tasks.
    counters: Arc<Counters>,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut kinds: Vec<&String> = self.handlers.keys().collect();
        kinds.sort();
        f.debug_struct("Consumer")
            .field("config", &self.config)
            .field("queue", &self.queue.name)
            .field("name", &self.name)
            .field("kinds", &kinds)
            .field("options", &self.options)
            .finish()
    }
}

impl Consumer {
    /// A consumer of `queue` for the service whose database is `db`. `name` scopes the
    /// idempotency claims ([`ServiceDb::process_once`]): keep it stable per handler, such as
    /// the queue name `"orders.reserve-stock"`; renaming it makes every event new to it.
    pub fn new(
        config: &AmqpConfig,
        db: ServiceDb,
        queue: &QueueSpec,
        name: impl Into<String>,
    ) -> Self {
        let counters = Arc::new(Counters::new(&db, &queue.name));
        Self {
            config: config.clone(),
            db,
            queue: queue.clone(),
            name: name.into(),
            handlers: HashMap::new(),
            duplicate: None,
            options: ConsumerOptions::default(),
            counters,
        }
    }

    /// Handles events of `kind` with a closure that returns a boxed future:
    ///
    /// ```no_run
    /// # fn demo(consumer: svcdb_amqp::Consumer) -> svcdb_amqp::Consumer {
    /// consumer.on("ProductStockReserved", |tx, event| Box::pin(async move {
    ///     tx.execute("INSERT INTO seen (id) VALUES ($1)", &[&event.id]).await?;
    ///     Ok(())
    /// }))
    /// # }
    /// ```
    ///
    /// The future borrows `tx` and `event`; state from outside is moved in as clones (an
    /// `Arc`), or use a type implementing [`EventHandler`], whose future may borrow `self`.
    /// The box is what lets the future be `Send` for the consumer's tasks: Rust cannot yet
    /// require that of an `async` closure's future.
    #[must_use]
    pub fn on<F>(self, kind: impl Into<String>, handler: F) -> Self
    where
        F: for<'a, 't> Fn(&'a mut svcdb::Transaction<'t>, &'a Envelope) -> HandlerFuture<'a>
            + Send
            + Sync
            + 'static,
    {
        self.on_handler(kind, FnHandler(handler))
    }

    /// Handles events of `kind` with an [`EventHandler`].
    #[must_use]
    pub fn on_handler(mut self, kind: impl Into<String>, handler: impl EventHandler) -> Self {
        let kind = kind.into();
        if self
            .handlers
            .insert(kind.clone(), Arc::new(handler))
            .is_some()
        {
            self.duplicate.get_or_insert(kind);
        }
        self
    }

    /// Replaces the options.
    #[must_use]
    pub fn with_options(mut self, options: ConsumerOptions) -> Self {
        self.options = options;
        self
    }

    /// The options, e.g. to change one of them:
    /// `ConsumerOptions { batch: 1, ..consumer.options().clone() }`.
    pub fn options(&self) -> &ConsumerOptions {
        &self.options
    }

    /// What this consumer (and its clones) did so far.
    pub fn stats(&self) -> ConsumerStats {
        self.counters.snapshot()
    }

    /// The queue consumed.
    pub fn queue(&self) -> &QueueSpec {
        &self.queue
    }

    /// Refuses a consumer that cannot work, before connecting (also [`crate::Service`]'s
    /// start-up, before it serves).
    pub(crate) fn check(&self) -> Result<()> {
        self.config.validate()?;
        self.queue.validate()?;
        if self.name.trim().is_empty() || self.name.len() > svcdb::idempotency::MAX_CONSUMER_BYTES {
            return Err(Error::InvalidName {
                what: "consumer",
                name: self.name.chars().take(80).collect(),
                reason: format!(
                    "give it a stable name of 1 to {} bytes, such as \"orders.reserve-stock\"",
                    svcdb::idempotency::MAX_CONSUMER_BYTES
                ),
            });
        }
        if self.options.batch == 0 {
            return Err(Error::config(
                "batch",
                "a batch of 0 deliveries handles nothing; use 1 for a transaction per delivery",
            ));
        }
        if let Some(kind) = &self.duplicate {
            return Err(Error::config(
                "handlers",
                format!("two handlers for event kind {kind:?}; register one per kind"),
            ));
        }
        if self.handlers.is_empty() {
            return Err(Error::config(
                "handlers",
                format!(
                    "consumer {} has no handlers, so it would dead-letter every message; add one with Consumer::on",
                    self.name
                ),
            ));
        }
        if let Some(kind) = self.handlers.keys().find(|k| k.trim().is_empty()) {
            return Err(Error::config(
                "handlers",
                format!("event kind {kind:?} is blank; envelopes never have a blank kind"),
            ));
        }
        Ok(())
    }

    /// Connects, consumes until `shutdown` is cancelled, and shuts down gracefully.
    ///
    /// Refuses to start when the service schema lacks `svcdb_processed_events`
    /// ([`ServiceDb::install_idempotency`]): every claim would fail and every message end in
    /// the dead-letter queue.
    ///
    /// A lost connection (broker restart, network) is not the end: in-flight handlers finish
    /// (their acks fail, and the broker redelivers those messages, which the claims absorb),
    /// then the consumer reconnects with backoff and carries on. Errors that reconnecting
    /// cannot fix are returned: a refused login, a queue that does not exist, an invalid
    /// configuration.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<()> {
        self.check()?;
        let _purging = crate::retention::purge_claims(&self.db, &self.options.retention, &shutdown);
        let mut backoff = self.options.reconnect_backoff;
        loop {
            let Some(connection) = connect_unless_cancelled(&self.config, &shutdown).await else {
                return Ok(());
            };
            let error = match connection {
                Ok(connection) => {
                    backoff = self.options.reconnect_backoff;
                    let result = self.run_on(&connection, &shutdown).await;
                    close_connection(&connection).await;
                    match result {
                        Ok(()) => return Ok(()),
                        Err(e) => e,
                    }
                }
                Err(e) => e,
            };
            if !error.is_connection_error() {
                return Err(error);
            }
            tracing::warn!(target: "svcdb_amqp::consumer", queue = %self.queue.name, error = %error, retry_in = ?backoff, "consumer lost RabbitMQ; reconnecting");
            if !pause(&shutdown, backoff).await {
                return Ok(());
            }
            backoff = next_backoff(backoff, self.options.max_reconnect_backoff);
        }
    }

    /// Consumes on `connection` until `shutdown` is cancelled (`Ok`) or the connection or the
    /// consumer's channel is lost ([`Error::ConnectionLost`]); either way the deliveries
    /// received are handled and in-flight handlers finish first. Opens two channels of its
    /// own (consuming, and publishing dead letters with confirms) and closes them; the
    /// connection stays open.
    ///
    /// For a connection shared with other consumers or a relay; [`Consumer::run`] manages one
    /// itself and reconnects.
    pub async fn run_on(
        &self,
        connection: &Connection,
        shutdown: &CancellationToken,
    ) -> Result<()> {
        self.check()?;
        require_table(&self.db, svcdb::idempotency::PROCESSED_EVENTS_TABLE).await?;
        let channel = open_channel(connection, "consuming").await?;
        let dead_letters = crate::publish::confirm_channel(connection).await;
        let dead_letters = match dead_letters {
            Ok(c) => c,
            Err(e) => {
                close_channel(&channel).await;
                return Err(e);
            }
        };
        let connected = self.counters.connected();
        let result = self.consume(&channel, &dead_letters, shutdown).await;
        drop(connected);
        close_channel(&dead_letters).await;
        close_channel(&channel).await;
        result
    }
}

/// Refuses to start without svcdb's `table`: every claim would fail, and every message would
/// be retried into the dead-letter queue. Other database errors (it is down) do not stop the
/// start: the handlers wait for it like for any outage.
async fn require_table(db: &ServiceDb, table: &str) -> Result<()> {
    match db.require_tables(&[table]).await {
        Err(e @ svcdb::Error::MissingTables { .. }) => Err(Error::Db(e)),
        Err(e) => {
            tracing::warn!(target: "svcdb_amqp::consumer", %table, error = %e, "cannot check for svcdb's table; starting anyway");
            Ok(())
        }
        Ok(()) => Ok(()),
    }
}
