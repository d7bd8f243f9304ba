//! The outbox relay: moves events from the service's `svcdb_outbox` table to RabbitMQ.
//!
//! A [`Relay`] loops over [`Outbox::relay_batch`]: each batch claims due rows
//! (`FOR UPDATE SKIP LOCKED`, so replicas share the work), publishes them on a channel with
//! publisher confirms (see [`crate::publish`] for the message properties), waits up to
//! [`RelayConfig::confirm_timeout`] for the broker's confirms, and marks the confirmed rows
//! published in the same transaction. A row is marked only after the broker confirmed it, so
//! a crash anywhere publishes it again rather than never: consumers absorb the duplicate.
//!
//! * **Pace.** A full batch is followed at once by the next one; a short batch means the
//!   outbox is drained, and the relay sleeps [`RelayConfig::poll_interval`] (100 ms).
//! * **Broker down.** The relay does not claim rows while it has no channel: it reconnects with
//!   backoff ([`RelayConfig::reconnect_backoff`] doubling up to
//!   [`RelayConfig::max_reconnect_backoff`]), and the rows wait, unpublished and not counted
//!   as failed. A connection lost during a batch fails that batch's unconfirmed rows, which
//!   the outbox retries after its own backoff ([`svcdb::outbox::RelayOptions`]).
//! * **Errors** are logged (the first of a streak as a warning) and kept in the
//!   [`RelayStatus`] that [`Relay::status`] watches, for a health endpoint or a test.
//! * **Shutdown.** Cancelling the token lets the batch in progress finish (it is bounded by
//!   the confirm timeout), then closes the channel and the connection.
//!
//! ```no_run
//! use svcdb::Outbox;
//! use svcdb_amqp::{AmqpConfig, Relay};
//! use tokio_util::sync::CancellationToken;
//!
//! # async fn demo(db: svcdb::ServiceDb) -> anyhow::Result<()> {
//! db.install_outbox().await?;
//! let relay = Relay::new(&AmqpConfig::from_env()?, Outbox::new(db));
//! let status = relay.status(); // status.borrow().last_error, for /readyz
//! let shutdown = CancellationToken::new();
//! let task = tokio::spawn({
//!     let shutdown = shutdown.clone();
//!     async move { relay.run(shutdown).await }
//! });
//! // … serve requests; handlers call svcdb::outbox::enqueue in their transactions …
//! shutdown.cancel();
//! let last = task.await??;
//! println!("published {} events", last.published);
//! # let _ = status; Ok(()) }
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::{Channel, Connection};
use svcdb::{Outbox, OutboxMessage};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::AmqpConfig;
use crate::consumer::close_connection;
use crate::error::{Error, Result};
use crate::publish::{self, Unroutable};
use crate::topology::close_channel;

/// How a [`Relay`] batches, waits and reconnects. Every field has a default.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Rows claimed and published per batch (one transaction). Default: 100.
    pub batch_size: usize,
    /// Sleep after a batch that was not full (the outbox is drained). Default: 100 ms.
    pub poll_interval: Duration,
    /// Longest wait for the broker's confirms of one batch; unconfirmed rows are retried.
    /// The batch's rows stay locked meanwhile, so keep it short. Default: 5 s.
    pub confirm_timeout: Duration,
    /// First pause after a failed connection attempt or database error, doubled per
    /// consecutive failure. Default: 100 ms.
    pub reconnect_backoff: Duration,
    /// The longest such pause. Default: 5 s.
    pub max_reconnect_backoff: Duration,
    /// What an unroutable message (no queue bound for it) counts as. Default: failed, so
    /// it is retried ([`Unroutable::Retry`]).
    pub unroutable: Unroutable,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 100,
            poll_interval: Duration::from_millis(100),
            confirm_timeout: Duration::from_secs(5),
            reconnect_backoff: Duration::from_millis(100),
            max_reconnect_backoff: Duration::from_secs(5),
            unroutable: Unroutable::default(),
        }
    }
}

/// What a relay has done, as [`Relay::status`] reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayStatus {
    /// True while the relay has a channel to the broker.
    pub connected: bool,
    /// Rows published and marked, since the relay started.
    pub published: u64,
    /// Row publishes that failed and were rescheduled, since the relay started.
    pub failed: u64,
    /// The most recent error (connection, publish or database), without credentials. Kept
    /// after recovery, for the record; see `consecutive_errors` for the present.
    pub last_error: Option<String>,
    /// Errors since the last successful step; 0 when healthy.
    pub consecutive_errors: u32,
}

/// Publishes a service's outbox to RabbitMQ until shut down. See the module documentation.
pub struct Relay {
    /// Where to (re)connect.
    amqp: AmqpConfig,
    /// The service's outbox.
    outbox: Outbox,
    /// Batching, pauses and reconnection.
    config: RelayConfig,
    /// The status, published to [`Relay::status`] receivers.
    status: watch::Sender<RelayStatus>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("amqp", &self.amqp)
            .field("config", &self.config)
            .field("status", &*self.status.borrow())
            .finish()
    }
}

/// The relay's connection and its confirm-mode channel.
struct Session {
    /// Kept to open a new channel after a channel-level error, and to close at shutdown.
    connection: Connection,
    /// Publishes with confirms.
    channel: Channel,
}

impl Relay {
    /// A relay for `outbox` to the broker at `amqp`, with the default [`RelayConfig`].
    pub fn new(amqp: &AmqpConfig, outbox: Outbox) -> Self {
        Self {
            amqp: amqp.clone(),
            outbox,
            config: RelayConfig::default(),
            status: watch::Sender::new(RelayStatus::default()),
        }
    }

    /// Replaces the batching, pause and reconnection settings.
    #[must_use]
    pub fn with_config(mut self, config: RelayConfig) -> Self {
        self.config = config;
        self
    }

    /// A receiver of the relay's status; it sees every change while the relay runs.
    pub fn status(&self) -> watch::Receiver<RelayStatus> {
        self.status.subscribe()
    }

    /// Relays until `shutdown` is cancelled, then returns the final status. Broker and
    /// database failures are retried and reported through [`Relay::status`], never returned:
    /// the error is only for a configuration that cannot work (an invalid URL, a batch size
    /// of 0, no `svcdb_outbox` table in the service schema).
    pub async fn run(&self, shutdown: CancellationToken) -> Result<RelayStatus> {
        self.amqp.validate()?;
        if self.config.batch_size == 0 {
            return Err(Error::config(
                "batch_size",
                "0 would never publish anything; use e.g. 100",
            ));
        }
        // Without the table every batch fails; say so once, at start. Other errors (the
        // database is down) are the loop's to wait out.
        if let Err(e) = self.outbox.pending_count().await {
            if e.code() == Some(&svcdb::SqlState::UNDEFINED_TABLE) {
                return Err(Error::config(
                    "outbox",
                    format!("{e}; create svcdb_outbox with ServiceDb::install_outbox or svcdb::outbox::OUTBOX_SQL in a migration"),
                ));
            }
        }
        let mut session: Option<Session> = None;
        let mut backoff = self.config.reconnect_backoff;
        while !shutdown.is_cancelled() {
            let channel = match self.ensure_session(&mut session, &shutdown).await {
                Ok(Some(channel)) => channel,
                Ok(None) => break, // shut down while connecting
                Err(e) => {
                    self.record_error(&e.to_string(), Failure::Broker);
                    if !pause(&shutdown, backoff).await {
                        break;
                    }
                    backoff = (backoff * 2).min(self.config.max_reconnect_backoff);
                    continue;
                }
            };
            let flags = Arc::new(BatchFlags::default());
            let (confirm_timeout, unroutable) =
                (self.config.confirm_timeout, self.config.unroutable);
            let shared = flags.clone();
            let batch = self
                .outbox
                .relay_batch(self.config.batch_size, async move |messages| {
                    publish_batch(&channel, messages, confirm_timeout, unroutable, &shared).await
                })
                .await;
            if flags.broken.load(Ordering::Relaxed) {
                // A timed-out confirm or a closed channel: start over on a fresh channel, so
                // late confirms cannot be taken for new ones.
                if let Some(old) = session.as_mut() {
                    close_channel(&old.channel).await;
                }
                self.status.send_modify(|s| s.connected = false);
            }
            match batch {
                Ok(report) => {
                    self.status.send_modify(|s| {
                        s.published += report.published as u64;
                        s.failed += report.failed as u64;
                        if report.failed == 0 {
                            s.consecutive_errors = 0;
                        }
                    });
                    if report.claimed > 0 {
                        tracing::debug!(target: "svcdb_amqp::relay", claimed = report.claimed, published = report.published, failed = report.failed, "relayed a batch");
                    }
                    if report.failed > 0 {
                        // The outbox logged the rows' errors and rescheduled them.
                        let first = flags
                            .first_error
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .take();
                        let first =
                            first.unwrap_or_else(|| "see svcdb_outbox.last_error".to_owned());
                        self.record_error(
                            &format!(
                                "{} of {} messages not published: {first}",
                                report.failed, report.claimed
                            ),
                            Failure::Rows,
                        );
                    } else {
                        backoff = self.config.reconnect_backoff;
                    }
                    if report.claimed >= self.config.batch_size
                        && !flags.broken.load(Ordering::Relaxed)
                    {
                        continue; // more are probably due
                    }
                    if !pause(&shutdown, self.config.poll_interval).await {
                        break;
                    }
                }
                Err(e) => {
                    self.record_error(&format!("outbox: {e}"), Failure::Database);
                    if !pause(&shutdown, backoff).await {
                        break;
                    }
                    backoff = (backoff * 2).min(self.config.max_reconnect_backoff);
                }
            }
        }
        if let Some(session) = session.take() {
            close_channel(&session.channel).await;
            close_connection(&session.connection).await;
        }
        self.status.send_modify(|s| s.connected = false);
        let last = self.status.borrow().clone();
        tracing::info!(target: "svcdb_amqp::relay", published = last.published, failed = last.failed, "outbox relay stopped");
        Ok(last)
    }

    /// A usable confirm-mode channel: the current one, a new one on the current connection,
    /// or a new connection. `Ok(None)` when shutdown came first.
    async fn ensure_session(
        &self,
        session: &mut Option<Session>,
        shutdown: &CancellationToken,
    ) -> Result<Option<Channel>> {
        if let Some(current) = session.as_mut() {
            if current.connection.status().connected() {
                if current.channel.status().connected() {
                    return Ok(Some(current.channel.clone()));
                }
                match publish::confirm_channel(&current.connection).await {
                    Ok(channel) => {
                        current.channel = channel.clone();
                        self.status.send_modify(|s| s.connected = true);
                        return Ok(Some(channel));
                    }
                    Err(e) => {
                        tracing::debug!(target: "svcdb_amqp::relay", error = %e, "cannot open a channel; reconnecting")
                    }
                }
            }
            if let Some(old) = session.take() {
                if !old.connection.status().connected() {
                    tracing::warn!(target: "svcdb_amqp::relay", url = %self.amqp.redacted_url(), "outbox relay lost its connection to RabbitMQ; reconnecting");
                    self.status.send_modify(|s| s.connected = false);
                }
                close_connection(&old.connection).await;
            }
        }
        let connection = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(None),
            connection = self.amqp.connect() => connection?,
        };
        let channel = match publish::confirm_channel(&connection).await {
            Ok(channel) => channel,
            Err(e) => {
                close_connection(&connection).await;
                return Err(e);
            }
        };
        if self.status.borrow().consecutive_errors > 0 {
            tracing::info!(target: "svcdb_amqp::relay", url = %self.amqp.redacted_url(), "outbox relay connected to RabbitMQ again");
        }
        self.status.send_modify(|s| {
            s.connected = true;
            s.consecutive_errors = 0;
        });
        *session = Some(Session {
            connection,
            channel: channel.clone(),
        });
        Ok(Some(channel))
    }

    /// Keeps `error` in the status and logs it: the first of a streak as a warning, the
    /// repeats at debug level, so an outage does not flood the log.
    fn record_error(&self, error: &str, failure: Failure) {
        let mut streak = 0;
        self.status.send_modify(|s| {
            s.consecutive_errors = s.consecutive_errors.saturating_add(1);
            s.last_error = Some(error.to_owned());
            streak = s.consecutive_errors;
            if failure == Failure::Broker {
                s.connected = false;
            }
        });
        // Failed rows were logged by the outbox already.
        if streak == 1 && failure != Failure::Rows {
            tracing::warn!(target: "svcdb_amqp::relay", %error, "outbox relay failed; retrying with backoff (rows stay unpublished)");
        } else {
            tracing::debug!(target: "svcdb_amqp::relay", %error, streak, "outbox relay still failing");
        }
    }
}

/// What a batch's publisher tells the loop besides the per-message results.
#[derive(Debug, Default)]
struct BatchFlags {
    /// The channel should be replaced: it closed, or a confirm timed out (a late confirm
    /// must not be taken for a new message's).
    broken: AtomicBool,
    /// The first message's error, for [`RelayStatus::last_error`].
    first_error: Mutex<Option<String>>,
}

/// What failed, for [`RelayStatus`] and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// Connecting or opening a channel: the relay has no broker.
    Broker,
    /// Claiming or marking rows: the database.
    Database,
    /// Some rows of a batch were not published (the outbox logged and rescheduled them).
    Rows,
}

/// `false` if shutdown cut the pause short.
async fn pause(shutdown: &CancellationToken, duration: Duration) -> bool {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(duration) => true,
    }
}

/// Publishes every message, then collects the confirms (pipelined: one round trip's wait for
/// the batch, not one per message). One result per message, in order, as
/// [`Outbox::relay_batch`] expects. Sets `broken` when the channel should be replaced.
async fn publish_batch(
    channel: &Channel,
    messages: &[OutboxMessage],
    confirm_timeout: Duration,
    unroutable: Unroutable,
    flags: &BatchFlags,
) -> Vec<Result<(), String>> {
    let broken = &flags.broken;
    let mut pending = Vec::with_capacity(messages.len());
    for message in messages {
        let what = publish::describe(&message.exchange, &message.routing_key, &message.envelope);
        let started = if flags.broken.load(Ordering::Relaxed) {
            // The channel failed on an earlier message of this batch; don't pile on.
            Err("not sent: the channel failed on an earlier message of this batch".to_owned())
        } else {
            publish::start(
                channel,
                &message.exchange,
                &message.routing_key,
                &message.body(),
                publish::envelope_properties(&message.envelope),
                &what,
            )
            .await
            .map_err(|e| {
                if e.is_connection_error() || !channel.status().connected() {
                    broken.store(true, Ordering::Relaxed);
                }
                e.to_string()
            })
        };
        pending.push(started.map(|confirm| (confirm, what)));
    }
    let deadline = Instant::now() + svcdb::config::capped_wait(confirm_timeout);
    let mut results = Vec::with_capacity(pending.len());
    for started in pending {
        results.push(match started {
            Err(e) => Err(e),
            Ok((confirm, what)) => {
                publish::finish(confirm, deadline, confirm_timeout, what, unroutable)
                    .await
                    .map_err(|e| {
                        if matches!(e, Error::ConfirmTimeout { .. } | Error::Amqp { .. }) {
                            broken.store(true, Ordering::Relaxed);
                        }
                        e.to_string()
                    })
            }
        });
    }
    if !channel.status().connected() {
        // A channel-level error (a missing exchange: NOT_FOUND) closed it.
        broken.store(true, Ordering::Relaxed);
    }
    if let Some(Err(first)) = results.iter().find(|r| r.is_err()) {
        *flags.first_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(first.clone());
    }
    results
}
