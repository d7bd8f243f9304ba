//! The consumer runtime: deliveries from one queue, each handled once in the service's
//! database, acknowledged only after the handler's transaction committed.
//!
//! For each delivery:
//!
//! 1. The body is decoded with [`Envelope::from_slice`]. A malformed message (not JSON, no
//!    `id`, too large, …) is dead-lettered with the reason: redelivering it cannot help.
//! 2. The handler for the envelope's `kind` runs inside
//!    [`ServiceDb::process_once_with`]: the claim on (consumer name, event id) commits in the
//!    same transaction as the handler's writes (and any events it enqueued in the outbox).
//! 3. [`Processed::Done`] or [`Processed::Duplicate`]: acknowledged. Acks come only after the
//!    commit, so delivery is at least once, and a redelivery after a lost ack finds the claim
//!    and changes nothing.
//! 4. A failed handler: everything rolled back. See [`HandlerError`] for retry, requeue and
//!    dead-lettering, and [Delivery counting](#delivery-counting) for how attempts are
//!    bounded even when the process crashes mid-handler.
//! 5. The database unavailable (a terminated backend, a read-only primary after a failover,
//!    no connection: [`HandlerError::is_database_unavailable`]): not the event's fault. The
//!    message is handed back without spending a delivery and the consumer pauses: it cancels
//!    its `basic.consume`, so the broker sends it nothing more, checks the database with
//!    backoff (up to [`ConsumerOptions::max_retry_delay`]) until it hands out a connection
//!    that can write, and consumes again. A failover does not dead-letter the backlog.
//!
//! An event kind with no handler is dead-lettered by default ([`UnknownKind`]): a binding wider
//! than the handlers, or a handler not yet deployed, should be visible and replayable, not
//! silently acknowledged.
//!
//! # Delivery counting
//!
//! The consumer numbers each delivery from the quorum queue's `x-delivery-count` (failed
//! deliveries before this one) and dead-letters the failure of the last one allowed
//! ([`QueueSpec::max_deliveries`]) itself, with the handler's error; the queue's
//! `x-delivery-limit` is the backstop for handlers that crash the process. How it hands a
//! message back decides whether the return counts:
//!
//! | return | method | RabbitMQ 4.3 and later | RabbitMQ 3.x to 4.2 |
//! |---|---|---|---|
//! | the handler failed | `basic.reject`, requeue | counts | counts |
//! | database unavailable, shutdown | `basic.nack`, requeue | does not count | counts |
//! | the channel closed with the message unacknowledged (crash) | — | counts | counts |
//!
//! Since 4.3 a quorum queue counts only failed deliveries in `x-delivery-count`: `basic.reject`
//! means the processing failed, `basic.nack` means the consumer could not process the message
//! now (rabbitmq-server PR 15387, <https://www.rabbitmq.com/docs/4.3/nack>). Before 4.3 every
//! return counts, so there a database outage costs each message in flight one delivery: one,
//! not one per retry, because the consumer pauses instead of retrying. `x-acquired-count`
//! (4.3+, every assignment) is not used. A first delivery (`redelivered` unset) is number 1
//! whatever headers it carries. On a classic queue declared elsewhere nothing counts, and a
//! message that always fails is retried (with [`ConsumerOptions::retry_delay`]) until it is
//! removed by hand; declare queues with [`crate::topology`].
//!
//! # Dead letters
//!
//! The consumer republishes a message it gives up on to the queue's dead-letter exchange
//! (`<queue>.dlx`) itself, with its original body and properties plus headers saying why, and
//! acknowledges it once the broker confirmed the copy (bounded by
//! [`ConsumerOptions::confirm_timeout`]):
//!
//! | header | value |
//! |---|---|
//! | `x-svcdb-reason` | what went wrong: the decoding error, the handler's error, … |
//! | `x-svcdb-queue`, `x-svcdb-consumer` | where it was being handled |
//! | `x-svcdb-original-exchange`, `x-svcdb-original-routing-key` | where to replay it |
//! | `x-svcdb-deliveries` | deliveries so far, this one included |
//!
//! The copy starts afresh: the broker's counting headers (`x-delivery-count`,
//! `x-acquired-count`, `x-death` and the `x-first-death-*` / `x-last-death-*` summaries) are
//! removed from it, so a message replayed from the dead-letter queue after a fix gets every
//! delivery again instead of arriving "at 5 of 5".
//!
//! If that publish fails (the exchange is missing, the channel broke, no confirm in time) the
//! message is rejected without requeue instead, and the broker dead-letters it with its own
//! `x-death` headers; the reason is then only in the log. Messages the broker dead-letters
//! after the delivery limit (a handler that crashed the process every time) carry `x-death`
//! with reason `delivery_limit`.
//!
//! # Concurrency and shutdown
//!
//! The broker sends at most `prefetch` unacknowledged messages ([`AmqpConfig::prefetch`]);
//! each is handled on its own task, at most `min(prefetch, pool_max)` at once, so handlers
//! queue for a permit rather than time out waiting for a database connection. A permit is
//! held only while the handler's transaction runs: a failed message waiting out its pause
//! before redelivery holds none, so failing messages do not stall healthy ones. Cancelling the
//! shutdown token stops consuming (`basic.cancel`), handles the deliveries already received,
//! waits for in-flight handlers to commit and acknowledge (up to
//! [`ConsumerOptions::shutdown_timeout`]), then closes the channels.
//!
//! ```no_run
//! use svcdb_amqp::topology::{events_exchange, QueueSpec, Topology};
//! use svcdb_amqp::{AmqpConfig, Consumer};
//! use tokio_util::sync::CancellationToken;
//!
//! # async fn demo(db: svcdb::ServiceDb) -> anyhow::Result<()> {
//! let amqp = AmqpConfig::from_env()?;
//! let queue = QueueSpec::new("orders.reserve-stock").bind(events_exchange("catalog"), "product.stock.*");
//! let connection = amqp.connect().await?;
//! Topology::new().queue(queue.clone()).declare(&connection).await?;
//! db.install_idempotency().await?;
//!
//! let consumer = Consumer::new(&amqp, db, &queue, "orders.reserve-stock").on(
//!     "ProductStockReserved",
//!     |tx, event| Box::pin(async move {
//!         let quantity = event.payload["quantity"].as_i64().unwrap_or(0);
//!         tx.execute("UPDATE reservations SET quantity = quantity + $1", &[&quantity]).await?;
//!         Ok(())
//!     }),
//! );
//! let shutdown = CancellationToken::new();
//! let task = tokio::spawn({
//!     let shutdown = shutdown.clone();
//!     async move { consumer.run(shutdown).await } // reconnects after a broker restart
//! });
//! tokio::signal::ctrl_c().await?;
//! shutdown.cancel();
//! task.await??; // in-flight handlers finished and acknowledged
//! # Ok(()) }
//! ```
//!
//! [`AmqpConfig::prefetch`]: crate::AmqpConfig::prefetch

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection};
use svcdb::{Envelope, Processed, ServiceDb, TxOptions};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::AmqpConfig;
use crate::connection::{
    close_channel, close_connection, connect_unless_cancelled, next_backoff, open_channel, pause,
};
use crate::error::{Error, Result};
use crate::handler::{DynHandler, EventHandler, FnHandler, HandlerError, HandlerFuture};
use crate::topology::QueueSpec;

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

/// How a [`Consumer`] retries, waits and shuts down. Every field has a default.
#[derive(Debug, Clone)]
pub struct ConsumerOptions {
    /// The transaction each handler runs in: isolation level, and how often to retry it on a
    /// serialization failure or deadlock before counting the attempt as failed. Default:
    /// read committed, 5 attempts.
    pub tx: TxOptions,
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
    /// transactions roll back and the broker redelivers their messages). Default: 30 s.
    pub shutdown_timeout: Duration,
    /// First pause before reconnecting after the connection was lost ([`Consumer::run`]);
    /// doubled per failed attempt. Default: 100 ms.
    pub reconnect_backoff: Duration,
    /// The longest pause between reconnection attempts. Default: 5 s.
    pub max_reconnect_backoff: Duration,
    /// How long [`Consumer::run`] keeps claims before deleting them in the background.
    /// Default: [`Retention::claims`](crate::Retention::claims) (7 days, checked hourly).
    pub retention: crate::Retention,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        Self {
            tx: TxOptions::default(),
            unknown_kind: UnknownKind::default(),
            retry_delay: Duration::from_millis(500),
            max_retry_delay: Duration::from_secs(10),
            confirm_timeout: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(30),
            reconnect_backoff: Duration::from_millis(100),
            max_reconnect_backoff: Duration::from_secs(5),
            retention: crate::Retention::claims(),
        }
    }
}

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
struct Counters {
    handled: AtomicU64,
    duplicates: AtomicU64,
    requeued: AtomicU64,
    returned: AtomicU64,
    paused: AtomicU64,
    dead_lettered: AtomicU64,
    ignored: AtomicU64,
}

impl Counters {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Consumes one queue into one service's database, with a handler per event kind.
///
/// Build it with [`Consumer::new`] and [`Consumer::on`] / [`Consumer::on_handler`], then
/// [`Consumer::run`] it until a shutdown token is cancelled. Cheap to clone (handlers are
/// shared).
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
        Self {
            config: config.clone(),
            db,
            queue: queue.clone(),
            name: name.into(),
            handlers: HashMap::new(),
            duplicate: None,
            options: ConsumerOptions::default(),
            counters: Arc::default(),
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

    /// What this consumer (and its clones) did so far.
    pub fn stats(&self) -> ConsumerStats {
        let c = &self.counters;
        ConsumerStats {
            handled: c.handled.load(Ordering::Relaxed),
            duplicates: c.duplicates.load(Ordering::Relaxed),
            requeued: c.requeued.load(Ordering::Relaxed),
            returned: c.returned.load(Ordering::Relaxed),
            paused: c.paused.load(Ordering::Relaxed),
            dead_lettered: c.dead_lettered.load(Ordering::Relaxed),
            ignored: c.ignored.load(Ordering::Relaxed),
        }
    }

    /// The queue consumed.
    pub fn queue(&self) -> &QueueSpec {
        &self.queue
    }

    /// Refuses a consumer that cannot work, before connecting.
    fn check(&self) -> Result<()> {
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
        let result = self.consume(&channel, &dead_letters, shutdown).await;
        close_channel(&dead_letters).await;
        close_channel(&channel).await;
        result
    }

    async fn consume(
        &self,
        channel: &Channel,
        dead_letters: &Channel,
        shutdown: &CancellationToken,
    ) -> Result<()> {
        let queue = self.queue.name.as_str();
        channel
            .basic_qos(self.config.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| {
                Error::amqp(
                    format!("setting prefetch {} on {queue}", self.config.prefetch),
                    e,
                )
            })?;
        let permits = usize::from(self.config.prefetch).min(self.db.config().pool_max.max(1));
        let context = Arc::new(Context {
            db: self.db.clone(),
            name: self.name.clone(),
            queue: self.queue.clone(),
            handlers: self.handlers.clone(),
            dead_letters: dead_letters.clone(),
            options: self.options.clone(),
            permits: Semaphore::new(permits),
            shutdown: shutdown.clone(),
            counters: self.counters.clone(),
            flow: watch::Sender::new(Flow::Consuming),
        });

        let mut tasks = JoinSet::new();
        let outcome = self
            .consume_until_stopped(channel, &context, &mut tasks)
            .await;
        // Tasks waiting for the pause to hand their message back must not wait for a loop
        // that has ended.
        context.flow.send_replace(Flow::Stopped);

        let in_flight = tasks.len();
        let finish = async {
            while let Some(joined) = tasks.join_next().await {
                log_join(joined);
            }
        };
        if tokio::time::timeout(self.options.shutdown_timeout, finish)
            .await
            .is_err()
        {
            tracing::warn!(target: "svcdb_amqp::consumer", %queue, remaining = tasks.len(), timeout = ?self.options.shutdown_timeout, "handlers still running at the shutdown timeout; aborting them (their transactions roll back and their messages are redelivered)");
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        match &outcome {
            Ok(()) => {
                tracing::info!(target: "svcdb_amqp::consumer", %queue, consumer = %self.name, in_flight, "consumer stopped")
            }
            Err(e) => {
                tracing::warn!(target: "svcdb_amqp::consumer", %queue, consumer = %self.name, in_flight, error = %e, "consumer lost its channel")
            }
        }
        outcome
    }

    /// Consumes, spawning a task per delivery into `tasks`, until shutdown (`Ok`) or the
    /// channel is lost; pauses while the database is unavailable.
    async fn consume_until_stopped(
        &self,
        channel: &Channel,
        context: &Arc<Context>,
        tasks: &mut JoinSet<()>,
    ) -> Result<()> {
        let queue = self.queue.name.as_str();
        let shutdown = &context.shutdown;
        let mut resuming = false;
        loop {
            // A tag per basic.consume, prefixed with the consumer name, so the management UI
            // shows which service and replica holds which messages.
            let random = uuid::Uuid::now_v7().simple().to_string();
            let tag = format!("{}.{}", self.name, &random[random.len() - 8..]);
            let mut deliveries = channel
                .basic_consume(
                    queue.into(),
                    crate::publish::short(&tag),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| {
                    if resuming && !channel.status().connected() {
                        // Lost while paused (a broker restart): reconnecting helps.
                        Error::ConnectionLost {
                            reason: format!(
                                "the channel closed while the consumer was paused: {e}"
                            ),
                        }
                    } else {
                        Error::amqp(format!("consuming from queue {queue}"), e)
                    }
                })?;
            context.flow.send_replace(Flow::Consuming);
            tracing::info!(target: "svcdb_amqp::consumer", %queue, consumer = %self.name, %tag, prefetch = self.config.prefetch, "consuming");

            let mut flow = context.flow.subscribe();
            let database_out = loop {
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break false,
                    Some(joined) = tasks.join_next(), if !tasks.is_empty() => log_join(joined),
                    _ = flow.wait_for(|f| *f == Flow::PauseRequested) => break true,
                    next = deliveries.next() => match next {
                        Some(Ok(delivery)) => {
                            tasks.spawn(handle_delivery(context.clone(), delivery));
                        }
                        Some(Err(e)) => return Err(Error::ConnectionLost { reason: e.to_string() }),
                        None => return Err(Error::ConnectionLost {
                            reason: format!("the broker cancelled the consumer of {queue} (was the queue deleted?)"),
                        }),
                    },
                }
            };
            // Stop the flow, then handle what the broker sent before it saw the cancel: those
            // messages are ours until settled, and handling them now spares them a
            // redelivery (while paused, they are handed back if the database is still out).
            cancel_and_drain(channel, &tag, &mut deliveries, context, tasks).await;
            if !database_out {
                return Ok(());
            }

            context.flow.send_replace(Flow::Paused);
            Counters::bump(&context.counters.paused);
            tracing::warn!(target: "svcdb_amqp::consumer", %queue, consumer = %self.name, "the database is unavailable; stopped taking deliveries until it answers");
            let mut wait = self.options.retry_delay;
            loop {
                if !pause(shutdown, wait).await {
                    return Ok(());
                }
                let check = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return Ok(()),
                    check = database_can_write(&self.db) => check,
                };
                match check {
                    Ok(()) => break,
                    Err(reason) => {
                        wait = next_backoff(wait, self.options.max_retry_delay);
                        tracing::debug!(target: "svcdb_amqp::consumer", %queue, %reason, check_in = ?wait, "the database is still unavailable");
                    }
                }
            }
            tracing::info!(target: "svcdb_amqp::consumer", %queue, consumer = %self.name, "the database answers again; taking deliveries");
            resuming = true;
        }
    }
}

/// Cancels the consumer `tag` and spawns a task for each delivery the broker sent before it
/// saw the cancel.
async fn cancel_and_drain(
    channel: &Channel,
    tag: &str,
    deliveries: &mut lapin::Consumer,
    context: &Arc<Context>,
    tasks: &mut JoinSet<()>,
) {
    let queue = context.queue.name.as_str();
    let cancel = channel.basic_cancel(crate::publish::short(tag), BasicCancelOptions::default());
    // Bounded: a broker that went silent never confirms the cancel.
    match tokio::time::timeout(DRAIN_TIMEOUT, cancel).await {
        Ok(Ok(())) => {
            let drain = async {
                while let Some(Ok(delivery)) = deliveries.next().await {
                    tasks.spawn(handle_delivery(context.clone(), delivery));
                }
            };
            if tokio::time::timeout(DRAIN_TIMEOUT, drain).await.is_err() {
                tracing::debug!(target: "svcdb_amqp::consumer", %queue, "consumer stream did not end after basic.cancel; going on anyway");
            }
        }
        Ok(Err(e)) => {
            tracing::debug!(target: "svcdb_amqp::consumer", %queue, error = %e, "basic.cancel failed; the channel is closed with the consumer")
        }
        Err(_) => {
            tracing::debug!(target: "svcdb_amqp::consumer", %queue, timeout = ?DRAIN_TIMEOUT, "the broker did not confirm basic.cancel; going on anyway")
        }
    }
}

/// `Ok` when the database hands out a connection that can write; else why not. Handlers'
/// transactions always write (the claim), so a connection to a primary that turned read-only
/// is not "back".
async fn database_can_write(db: &ServiceDb) -> std::result::Result<(), String> {
    let conn = db.get().await.map_err(|e| e.to_string())?;
    let row = conn
        .query_one("SELECT current_setting('transaction_read_only')", &[])
        .await
        .map_err(|e| svcdb::error::pg_message(&e))?;
    match row.try_get::<_, String>(0).as_deref() {
        Ok("off") => Ok(()),
        Ok(_) => Err("the database accepts only read-only transactions".to_owned()),
        Err(e) => Err(svcdb::error::pg_message(e)),
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

/// Longest wait, after `basic.cancel`, for the deliveries the broker sent before it saw the
/// cancel; lapin ends the stream once the broker confirms the cancel, so this only matters
/// when the broker does not answer.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

fn log_join(joined: std::result::Result<(), tokio::task::JoinError>) {
    if let Err(e) = joined {
        if e.is_panic() {
            // Handler panics are caught inside the task; this is the runtime's own code.
            tracing::error!(target: "svcdb_amqp::consumer", error = %e, "a delivery task panicked");
        }
    }
}

/// Whether the consumer takes deliveries: a delivery task that met an unavailable database
/// asks for a pause, and hands its message back once the broker sends nothing more (else the
/// broker could hand it straight back to this consumer, spending a delivery before 4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    /// `basic.consume` is active.
    Consuming,
    /// A task met an unavailable database; the consume loop is to cancel.
    PauseRequested,
    /// Cancelled, until the database answers again.
    Paused,
    /// The consume loop ended (shutdown, lost channel).
    Stopped,
}

/// What each delivery task needs, shared.
struct Context {
    /// The service's pool.
    db: ServiceDb,
    /// The claims' scope.
    name: String,
    /// Queue name, delivery limit, dead-letter exchange.
    queue: QueueSpec,
    /// Handlers by kind.
    handlers: HashMap<String, Arc<dyn DynHandler>>,
    /// Confirm-mode channel for dead-letter copies.
    dead_letters: Channel,
    /// Pauses and policies.
    options: ConsumerOptions,
    /// Bounds handlers running at once to what the pool can serve.
    permits: Semaphore,
    /// Cut pauses short at shutdown.
    shutdown: CancellationToken,
    /// The consumer's counters.
    counters: Arc<Counters>,
    /// Consuming or paused for the database.
    flow: watch::Sender<Flow>,
}

/// Handles one delivery to the end: acked, handed back, or dead-lettered.
async fn handle_delivery(context: Arc<Context>, delivery: Delivery) {
    let deliveries = delivery_number(&delivery);
    let queue = context.queue.name.as_str();
    let envelope = match Envelope::from_slice(&delivery.data) {
        Ok(envelope) => envelope,
        Err(e) => {
            let reason = format!("malformed event: {e}");
            tracing::warn!(target: "svcdb_amqp::consumer", %queue, message_id = ?delivery.properties.message_id(), %reason, "dead-lettering a message that is not an event");
            return dead_letter(&context, &delivery, &reason, deliveries).await;
        }
    };
    let id = envelope.id;
    let kind = envelope.kind.clone();
    let Some(handler) = context.handlers.get(&kind).cloned() else {
        return match context.options.unknown_kind {
            UnknownKind::Ack => {
                tracing::debug!(target: "svcdb_amqp::consumer", %queue, %id, %kind, "no handler for this kind; acknowledged");
                ack(&context, &delivery, id).await;
                Counters::bump(&context.counters.ignored);
            }
            UnknownKind::DeadLetter => {
                let reason = format!(
                    "no handler for event kind {kind:?} in consumer {}; register one with Consumer::on, or narrow the queue's bindings",
                    context.name
                );
                tracing::warn!(target: "svcdb_amqp::consumer", %queue, %id, %kind, "dead-lettering an event without a handler");
                dead_letter(&context, &delivery, &reason, deliveries).await;
            }
        };
    };

    let outcome = {
        let Ok(_permit) = context.permits.acquire().await else {
            return; // never closed
        };
        process(&context, &handler, &envelope).await
        // The permit goes back here: what follows waits (for a pause, a backoff, the broker)
        // and must not keep healthy messages from the database.
    };
    match outcome {
        Ok(Processed::Done(())) => {
            tracing::debug!(target: "svcdb_amqp::consumer", %queue, %id, %kind, deliveries, "handled");
            ack(&context, &delivery, id).await;
            Counters::bump(&context.counters.handled);
        }
        Ok(Processed::Duplicate) => {
            tracing::debug!(target: "svcdb_amqp::consumer", %queue, %id, %kind, deliveries, "duplicate; already handled");
            ack(&context, &delivery, id).await;
            Counters::bump(&context.counters.duplicates);
        }
        Err(e) if e.is_database_unavailable() => {
            // The database, not the event: hand the message back without counting a failure,
            // once this consumer takes no more deliveries (it pauses until the database
            // answers; at shutdown it stops anyway).
            tracing::warn!(target: "svcdb_amqp::consumer", %queue, %id, %kind, deliveries, error = %e, "database unavailable; handing the event back and pausing");
            context.flow.send_if_modified(|flow| {
                let request = *flow == Flow::Consuming;
                if request {
                    *flow = Flow::PauseRequested;
                }
                request
            });
            let mut flow = context.flow.subscribe();
            // The consume loop sets Paused or Stopped on every path out of Consuming.
            let _ = flow
                .wait_for(|f| matches!(f, Flow::Paused | Flow::Stopped))
                .await;
            return_unprocessed(&context, &delivery, id).await;
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
                return dead_letter(&context, &delivery, &reason, deliveries).await;
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
            return_failed(&context, &delivery, id).await;
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
    match AssertUnwindSafe(run).catch_unwind().await {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a non-string panic".to_owned());
            Err(HandlerError::msg(format!("handler panicked: {message}")))
        }
    }
}

/// This delivery's number, the first being 1: the failed deliveries the quorum queue counted
/// before it (`x-delivery-count`, absent on a first delivery), plus one. See the module's
/// "Delivery counting" for what counts on which RabbitMQ version.
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

/// Waits for a settlement (ack, reject, nack) to be written, up to the confirm timeout: a
/// connection the broker blocked (memory or disk alarm) writes nothing. A message left
/// unsettled is redelivered when the channel closes.
async fn settle<T>(
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

async fn ack(context: &Context, delivery: &Delivery, id: uuid::Uuid) {
    // Committed but not acknowledged: the redelivery finds the claim and is a duplicate.
    let ack = delivery.ack(BasicAckOptions::default());
    settle(context, Some(id), "acknowledge a handled event", ack).await;
}

/// Hands back a message whose handler failed, with `basic.reject` and requeue: a failed
/// delivery on every RabbitMQ version. (Before 4.3 every return counts; since 4.3 only
/// `basic.reject` and a closed channel do, `basic.nack` does not: rabbitmq-server PR 15387,
/// <https://www.rabbitmq.com/docs/4.3/nack>. A nack here would retry a poison message
/// forever on 4.3, its `x-delivery-count` stuck.)
async fn return_failed(context: &Context, delivery: &Delivery, id: uuid::Uuid) {
    Counters::bump(&context.counters.requeued);
    let reject = delivery.reject(BasicRejectOptions { requeue: true });
    settle(context, Some(id), "requeue a failed event", reject).await;
}

/// Hands back a message that was not processed (database unavailable, shutdown), with
/// `basic.nack` and requeue: since RabbitMQ 4.3 a return without failure that leaves
/// `x-delivery-count` as it is (rabbitmq-server PR 15387,
/// <https://www.rabbitmq.com/docs/4.3/nack>). Before 4.3 a quorum queue counts every return,
/// this one too: a database outage then costs each message in flight one delivery (one per
/// outage, as the consumer pauses rather than retries).
async fn return_unprocessed(context: &Context, delivery: &Delivery, id: uuid::Uuid) {
    Counters::bump(&context.counters.returned);
    let nack = delivery.nack(BasicNackOptions {
        requeue: true,
        multiple: false, // a multiple nack never counts on 4.3 either, but takes others along
    });
    settle(context, Some(id), "hand back an unprocessed event", nack).await;
}

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
async fn dead_letter(context: &Context, delivery: &Delivery, reason: &str, deliveries: u32) {
    let queue = context.queue.name.as_str();
    // One bound on both halves (`publish::start` and `finish`): `basic_publish` waits for its
    // frames to be written, which stops while the broker blocks the connection (memory or
    // disk alarm) or goes silent.
    let deadline = crate::publish::Deadline::after(context.options.confirm_timeout);
    let published = publish_dead_letter(context, delivery, reason, deliveries, deadline).await;
    match published {
        Ok(()) => {
            let ack = delivery.ack(BasicAckOptions::default());
            settle(context, None, "acknowledge a dead-lettered message", ack).await;
        }
        Err(e) => {
            tracing::warn!(target: "svcdb_amqp::consumer", %queue, error = %e, "could not copy the message to the dead-letter exchange; rejecting it so the broker dead-letters it (without the reason header)");
            let reject = delivery.reject(BasicRejectOptions { requeue: false });
            settle(context, None, "reject a message to dead-letter it", reject).await;
        }
    }
    Counters::bump(&context.counters.dead_lettered);
}

async fn publish_dead_letter(
    context: &Context,
    delivery: &Delivery,
    reason: &str,
    deliveries: u32,
    deadline: crate::publish::Deadline,
) -> Result<()> {
    let exchange = context.queue.dead_letter_exchange();
    let mut headers: FieldTable = delivery
        .properties
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
        .unwrap_or_default();
    let text = |s: &str| AMQPValue::LongString(LongString::from(s));
    let reason: String = reason.chars().take(MAX_REASON_CHARS).collect();
    headers.insert("x-svcdb-reason".into(), text(&reason));
    headers.insert("x-svcdb-queue".into(), text(&context.queue.name));
    headers.insert("x-svcdb-consumer".into(), text(&context.name));
    headers.insert(
        "x-svcdb-original-exchange".into(),
        text(delivery.exchange.as_str()),
    );
    headers.insert(
        "x-svcdb-original-routing-key".into(),
        text(delivery.routing_key.as_str()),
    );
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
