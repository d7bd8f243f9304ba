//! The outbox relay: moves events from the service's `svcdb_outbox` table to RabbitMQ.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use futures_util::stream::FuturesOrdered;
use futures_util::StreamExt;
use lapin::{Channel, Connection};
use svcdb::outbox::RelayReport;
use svcdb::{Outbox, OutboxMessage};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::AmqpConfig;
use crate::connection::{
    close_channel, close_connection, confirm_channel, confirm_channel_within,
    connect_unless_cancelled, next_backoff, pause,
};
use crate::error::{Error, Result};
use crate::publish::{self, Deadline, Unroutable};
use crate::retention::{self, Retention};

/// How a [`Relay`] batches, waits and reconnects: the relay loop's settings. Every field has a
/// default.
///
/// When a row whose publish failed is tried again is not here but the outbox's
/// ([`svcdb::outbox::PublishRetry`], set with [`Outbox::with_publish_retry`]): it is stored
/// with the row, so every replica and every restart follows it.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Rows claimed and published per batch (one transaction). Default: 100.
    pub batch_size: usize,
    /// After a batch that was not full (the outbox is drained), the longest wait for the next
    /// one. The relay is woken earlier by every commit of rows ([`svcdb::outbox::Wakeups`]):
    /// this is the safety net for a lost notification. Default: 100 ms.
    pub poll_interval: Duration,
    /// Longest wait for one batch's publishes (writing them and the broker's confirms);
    /// unconfirmed rows are retried. Also bounds opening and closing channels, and how long
    /// shutdown waits for a batch in progress. The batch's rows stay locked meanwhile, so
    /// keep it short. Default: 5 s.
    pub confirm_timeout: Duration,
    /// First pause after a failed connection attempt or database error, doubled per
    /// consecutive failure; also for reopening the `LISTEN` connection. Default: 100 ms.
    pub reconnect_backoff: Duration,
    /// The longest such pause. Default: 5 s.
    pub max_reconnect_backoff: Duration,
    /// What an unroutable message (no queue bound for it) counts as. Default: failed, so
    /// it is retried ([`Unroutable::Retry`]).
    pub unroutable: Unroutable,
    /// How long published rows are kept before the relay deletes them, and how often it
    /// checks. Default: [`Retention::published`] (24 hours, checked hourly).
    pub retention: Retention,
    /// After this many batches in a row whose every publish the broker nacked, the relay
    /// opens a new connection (to another node of a cluster, if the URL lists several): a
    /// node that restarted inside a cluster has been seen to nack every publish of a
    /// connection for over a minute. 0: never. Default: 3.
    pub reconnect_after_nacked_batches: u32,
    /// How many batches may be in flight at once: while one awaits its confirms and commits,
    /// the next is claimed and published, each in its own transaction (a pool connection
    /// each). The next batch starts once the newest one's publishes were all written on a
    /// healthy channel (so messages still go out in id order), when that batch was full or a
    /// commit of rows woke the relay since it started, and only while the pool has a
    /// connection to spare; never more than half the pool's size (the service's handlers and
    /// requests share it). 1: one batch at a time. Default: 2 (4 made smaller batches and
    /// cost throughput under load, for no gain in latency: docs/benchmarks.md).
    pub batches_in_flight: usize,
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
            retention: Retention::published(),
            reconnect_after_nacked_batches: 3,
            batches_in_flight: 2,
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
    /// The broker's reason while it has blocked the relay's connection (`connection.blocked`,
    /// sent under a memory or disk alarm, e.g. `"low on memory"`); `None` otherwise. The
    /// relay claims no rows while blocked; they are published once the alarm clears.
    pub blocked: Option<String>,
    /// True while the relay listens for `NOTIFY`s of commits in other processes (its `LISTEN`
    /// connection is up). While false, rows committed by other processes wait for the poll.
    pub listening: bool,
}

/// Publishes a service's outbox to RabbitMQ until shut down.
///
/// A [`Relay`] loops over [`Outbox::relay_batch`]: each batch claims due rows
/// (`FOR UPDATE SKIP LOCKED`, so replicas share the work), publishes them on a channel with
/// publisher confirms (see [`crate::publish`] for the message properties), waits up to
/// [`RelayConfig::confirm_timeout`] for the broker's confirms, and marks the confirmed rows
/// published in the same transaction. A row is marked only after the broker confirmed it, so
/// a crash anywhere publishes it again rather than never: consumers absorb the duplicate.
///
/// * **Overlap.** While a batch awaits its confirms and commits, the next batch is claimed
///   (skipping the earlier ones' locked rows) and published on the same channel, after the
///   earlier ones' messages, so they stay in id order: up to
///   [`RelayConfig::batches_in_flight`] (2) batches at once, each in its own transaction (a
///   pool connection each), each marking only its own rows, and only once the broker
///   confirmed them. A new row thus waits for a claim, not for the broker's confirms of the
///   rows before it.
/// * **Pace.** A full batch is followed at once by the next one; a short batch means the
///   outbox is drained, and the relay waits for the next commit of rows (also while earlier
///   batches are in flight): in this process it
///   is woken as the transaction of [`svcdb::outbox::enqueue`] commits, from other processes
///   by a debounced `NOTIFY` it `LISTEN`s for on a connection of its own (reopened after a
///   loss; [`RelayStatus::listening`]). [`RelayConfig::poll_interval`] (100 ms) bounds the
///   wait, so a lost notification delays a row by at most that.
/// * **Broker down.** The relay does not claim rows while it has no channel: it reconnects with
///   backoff ([`RelayConfig::reconnect_backoff`] doubling up to
///   [`RelayConfig::max_reconnect_backoff`]), and the rows wait, unpublished and not counted
///   as failed. A connection lost during a batch fails that batch's unconfirmed rows, which
///   the outbox retries after its own backoff ([`svcdb::outbox::PublishRetry`]).
/// * **A silent or blocked broker.** Every publish, every channel opened and every close is
///   bounded by [`RelayConfig::confirm_timeout`]: a broker that stops answering (a network
///   partition that keeps the TCP connection open) fails the batch's rows after that long,
///   and the relay starts over on a fresh channel. Under a memory or disk alarm RabbitMQ
///   sends `connection.blocked` and stops reading publishes; the relay then claims no rows
///   (they wait, not counted as failed), shows the broker's reason in
///   [`RelayStatus::blocked`], and resumes at `connection.unblocked`.
/// * **A bad row.** A row whose exchange does not exist makes the broker close the channel
///   (`NOT_FOUND`), which would fail every later row of the batch. The relay then publishes
///   the batch's remaining rows one at a time on fresh channels: only the bad row fails and
///   backs off; the others are published in the same run.
/// * **A broker that nacks everything.** After
///   [`RelayConfig::reconnect_after_nacked_batches`] (3) batches in a row whose every publish
///   was nacked, the relay opens a new connection, starting with the next node of a cluster's
///   URLs. The nacked rows are retried on the outbox's backoff as any failed row.
/// * **The pool.** The relay's batches take connections from the [`Outbox`]'s pool, the
///   service's own unless given another. A burst of requests that holds every connection
///   makes the relay (and a consumer on the same pool) wait behind it: with bursts like that,
///   give the relay and the consumers a [`svcdb::ServiceDb`] of their own (a second
///   `ServiceDb::connect` with a small pool); wake-ups still reach the relay, as they are
///   shared by every `ServiceDb` of the same database and schema in the process.
/// * **Errors** are logged (the first of a streak as a warning) and kept in the
///   [`RelayStatus`] that [`Relay::status`] watches, for a health endpoint or a test.
/// * **Retention.** Published rows older than [`RelayConfig::retention`] (24 hours) are
///   deleted in the background, in small batches ([`Retention`](crate::Retention)).
/// * **Shutdown.** Cancelling the token gives the batches in progress up to the confirm
///   timeout to finish; a batch still waiting then is dropped,
///   so its transaction rolls back and its rows stay for the next run. The channel and the
///   connection are closed within the same bound.
///
/// ```no_run
/// use svcdb::Outbox;
/// use svcdb_amqp::{AmqpConfig, Relay};
/// use tokio_util::sync::CancellationToken;
///
/// # async fn demo(db: svcdb::ServiceDb) -> anyhow::Result<()> {
/// db.install_outbox().await?;
/// let relay = Relay::new(&AmqpConfig::from_env()?, Outbox::new(db));
/// let status = relay.status(); // status.borrow().last_error, for /readyz
/// let shutdown = CancellationToken::new();
/// let task = tokio::spawn({
///     let shutdown = shutdown.clone();
///     async move { relay.run(shutdown).await }
/// });
/// // … serve requests; handlers call svcdb::outbox::enqueue in their transactions …
/// shutdown.cancel();
/// let last = task.await??;
/// println!("published {} events", last.published);
/// # let _ = status; Ok(()) }
/// ```
pub struct Relay {
    /// Where to (re)connect.
    amqp: AmqpConfig,
    /// The service's outbox.
    outbox: Outbox,
    /// Batching, pauses and reconnection.
    config: RelayConfig,
    /// The status, published to [`Relay::status`] receivers.
    status: watch::Sender<RelayStatus>,
    /// Its series in `/metrics`.
    metrics: RelayMetrics,
}

/// The relay's Prometheus series, with the pool's labels and `messaging_system="rabbitmq"`.
#[derive(Clone)]
struct RelayMetrics {
    /// `messaging_client_sent_messages_total`: rows published and marked.
    published: metrics::Counter,
    /// `svcdb_relay_publish_failures_total`: row publishes that failed and were rescheduled.
    failed: metrics::Counter,
    /// `svcdb_relay_confirm_duration_seconds`: from a batch's first publish to its last
    /// confirm (one round trip for a pipelined batch).
    confirm: metrics::Histogram,
    /// `svcdb_relay_broker_blocked`: 1 while the broker blocks the relay's connection.
    blocked: metrics::Gauge,
    /// `svcdb_relay_connected`: 1 while the relay has a channel to the broker.
    connected: metrics::Gauge,
}

impl RelayMetrics {
    fn new(db: &svcdb::ServiceDb) -> Self {
        let labels = svcdb::metrics::with_labels(
            db.metric_labels(),
            &[("messaging_system", "rabbitmq".into())],
        );
        Self {
            published: metrics::counter!("messaging_client_sent_messages_total", labels.iter()),
            failed: metrics::counter!("svcdb_relay_publish_failures_total", labels.iter()),
            confirm: metrics::histogram!("svcdb_relay_confirm_duration_seconds", labels.iter()),
            blocked: metrics::gauge!("svcdb_relay_broker_blocked", labels.iter()),
            connected: metrics::gauge!("svcdb_relay_connected", labels.iter()),
        }
    }
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
    /// Copies the connection's blocked/unblocked notifications into the status.
    watcher: JoinHandle<()>,
}

impl Session {
    /// Closes the channel and the connection, waiting at most until `deadline`: a silent or
    /// blocked broker never answers a close (lapin writes nothing while blocked), and then
    /// the connection is dropped instead.
    async fn close(self, deadline: Instant) {
        self.watcher.abort();
        let close = async {
            close_channel(&self.channel).await;
            close_connection(&self.connection).await;
        };
        if tokio::time::timeout_at(deadline, close).await.is_err() {
            tracing::debug!(target: "svcdb_amqp::relay", "closing the connection to RabbitMQ timed out; dropping it");
        }
    }
}

impl Relay {
    /// A relay for `outbox` to the broker at `amqp`, with the default [`RelayConfig`].
    pub fn new(amqp: &AmqpConfig, outbox: Outbox) -> Self {
        Self {
            amqp: amqp.clone(),
            metrics: RelayMetrics::new(outbox.db()),
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
                // The message says how to install it (svcdb's hint for its own tables).
                return Err(Error::config("outbox", e.to_string()));
            }
        }
        let _purging = retention::purge_published(&self.outbox, &self.config.retention, &shutdown);
        let mut wakeups = self.outbox.wakeups(
            self.config.reconnect_backoff,
            self.config.max_reconnect_backoff,
        );
        // Ends when `wakeups` is dropped.
        tokio::spawn(watch_listening(wakeups.listening(), self.status.clone()));
        // Ends when the relay is dropped.
        tokio::spawn(mirror_connected(
            self.status.subscribe(),
            self.metrics.connected.clone(),
        ));
        let mut session: Option<Session> = None;
        // Set when shutdown came during a batch: by when the relay must be done.
        let mut stop_by: Option<Instant> = None;
        let mut loop_state = LoopState {
            backoff: self.config.reconnect_backoff,
            nacked_batches: 0,
        };
        while !shutdown.is_cancelled() {
            let current = match self.ensure_session(&mut session, &shutdown).await {
                Ok(Some(current)) => current,
                Ok(None) => break, // shut down while connecting
                Err(e) => {
                    self.record_error(&e.to_string(), Failure::Broker);
                    if !pause(&shutdown, loop_state.backoff).await {
                        break;
                    }
                    loop_state.backoff =
                        next_backoff(loop_state.backoff, self.config.max_reconnect_backoff);
                    continue;
                }
            };
            if current.connection.status().blocked() {
                // Every publish would wait out its timeout and count against its row: leave
                // the rows unclaimed until the broker unblocks the connection.
                if !pause(&shutdown, self.config.poll_interval).await {
                    break;
                }
                continue;
            }
            let run = self
                .relay_run(
                    current,
                    &shutdown,
                    &mut wakeups,
                    &mut stop_by,
                    &mut loop_state,
                )
                .await;
            if run.broken {
                // A timed-out publish or a closed channel: start over on a fresh channel, so
                // late confirms cannot be taken for new ones (at shutdown, closing the session
                // below closes it).
                if let Some(old) = session.as_mut().filter(|_| stop_by.is_none()) {
                    let deadline = Deadline::after(self.config.confirm_timeout).at;
                    let _ = tokio::time::timeout_at(deadline, close_channel(&old.channel)).await;
                }
                self.status.send_modify(|s| s.connected = false);
            }
            if run.reconnect {
                tracing::warn!(target: "svcdb_amqp::relay", batches = self.config.reconnect_after_nacked_batches, url = %self.amqp.redacted_url(), "the broker nacked every publish of the last batches; reconnecting");
                self.amqp.prefer_next_node();
                if let Some(old) = session.take() {
                    old.close(Deadline::after(self.config.confirm_timeout).at)
                        .await;
                }
                self.status.send_modify(|s| {
                    s.connected = false;
                    s.blocked = None;
                });
                self.metrics.blocked.set(0.0);
                // As after a failed connection: a broker that nacks whatever arrives (a full
                // queue that rejects publishes) was reconnected to as fast as rows came in
                // (found by a user trial: 14 connections a second, 2 000 log lines in 25 s).
                // A batch the broker takes resets the pause.
                if !pause(&shutdown, loop_state.backoff).await {
                    break;
                }
                loop_state.backoff =
                    next_backoff(loop_state.backoff, self.config.max_reconnect_backoff);
            }
            if run.timed_out {
                break;
            }
            if run.database_error {
                if !pause(&shutdown, loop_state.backoff).await {
                    break;
                }
                loop_state.backoff =
                    next_backoff(loop_state.backoff, self.config.max_reconnect_backoff);
                continue;
            }
            if run.more {
                continue; // more are probably due
            }
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                _ = wakeups.wait(self.config.poll_interval) => {}
            }
        }
        if let Some(session) = session.take() {
            session
                .close(stop_by.unwrap_or_else(|| Deadline::after(self.config.confirm_timeout).at))
                .await;
        }
        drop(wakeups);
        self.status.send_modify(|s| {
            s.connected = false;
            s.blocked = None;
            s.listening = false;
        });
        let last = self.status.borrow().clone();
        tracing::info!(target: "svcdb_amqp::relay", published = last.published, failed = last.failed, "outbox relay stopped");
        Ok(last)
    }

    /// Relays batches on `session` until none is in flight and none is due at once: the
    /// outbox is drained, a batch failed its channel, the database failed, the broker nacked
    /// too many batches in a row, the connection was blocked, or shutdown came. Up to
    /// [`RelayConfig::batches_in_flight`] batches overlap: once the newest batch's publishes
    /// were all written on a healthy channel, the next one starts if that batch was full or a
    /// commit of rows woke the relay since it started, and the pool has a connection to
    /// spare. Outcomes are taken in claim order. Every batch started is finished before this
    /// returns, unless shutdown's deadline passes first: then the batches still running are
    /// dropped and their transactions roll back.
    async fn relay_run(
        &self,
        session: &Session,
        shutdown: &CancellationToken,
        wakeups: &mut svcdb::outbox::Wakeups,
        stop_by: &mut Option<Instant>,
        state: &mut LoopState,
    ) -> RunEnd {
        let mut end = RunEnd::default();
        let mut in_flight = FuturesOrdered::new();
        // The newest batch's signal that its publishes were all written (with whether it was
        // full), and that signal once received: `None` until then, or if it never came (the
        // channel failed, or the batch claimed nothing to publish).
        let mut written: Option<oneshot::Receiver<bool>> = None;
        let mut newest_written: Option<bool> = None;
        // The newest batch's publisher; closed when it is done.
        let mut newest_done: Option<oneshot::Receiver<()>> = None;
        // A batch should start as soon as there is room for it.
        let mut due = true;
        // No more batches in this run.
        let mut stopping = false;
        loop {
            if due
                && !stopping
                && self.room_for_a_batch(
                    session,
                    shutdown,
                    in_flight.len(),
                    newest_written.is_some(),
                )
            {
                due = false;
                // Commits from here on wake the relay for the next batch; earlier ones it claims.
                wakeups.mark_seen();
                let (done_tx, done_rx) = oneshot::channel();
                let previous = newest_done.replace(done_rx);
                let (written_tx, written_rx) = oneshot::channel();
                written = Some(written_rx);
                newest_written = None;
                in_flight.push_back(self.batch(session, written_tx, previous, done_tx));
            }
            if in_flight.is_empty() {
                // A wake-up that came while the batches finished: the next run follows at once.
                end.more |= due && !stopping;
                return end;
            }
            let stop_at = *stop_by;
            tokio::select! {
                biased;
                Some((batch, flags)) = in_flight.next() => {
                    self.after_batch(batch, &flags, stop_at.is_some(), state, &mut end);
                    // A failure stops new batches at once; a short batch does not: the batches
                    // after it may still be full, and the last one's `more` says what follows.
                    stopping |= end.broken || end.reconnect || end.database_error;
                }
                signal = async {
                    match written.as_mut() {
                        Some(written) => written.await,
                        None => std::future::pending().await,
                    }
                }, if written.is_some() => {
                    written = None;
                    newest_written = signal.ok();
                    // A full batch: more rows are probably due.
                    due |= newest_written == Some(true);
                }
                woke = wakeups.wait(Duration::MAX), if !due && !stopping && newest_written.is_some() => {
                    due = woke;
                }
                () = shutdown.cancelled(), if stop_at.is_none() => {
                    // The batches' publishes are bounded by the confirm timeout; past it, drop
                    // them: their transactions roll back and the rows stay for the next run.
                    // Closing the session gets what is left of the same bound.
                    *stop_by = Some(Deadline::after(self.config.confirm_timeout).at);
                    stopping = true;
                    due = false;
                }
                () = tokio::time::sleep_until(stop_at.unwrap_or_else(Instant::now)), if stop_at.is_some() => {
                    tracing::info!(target: "svcdb_amqp::relay", timeout = ?self.config.confirm_timeout, batches = in_flight.len(), "the batches in progress did not finish within the confirm timeout at shutdown; rolled back, their rows stay for the next run");
                    end.timed_out = true;
                    return end;
                }
            }
        }
    }

    /// Whether a batch may start now, with `in_flight` batches running and (`written`) the
    /// newest one's publishes all written: the first always; another only after that, below
    /// [`RelayConfig::batches_in_flight`] and half the pool's size, with a pool connection to
    /// spare (the service's requests share the pool), on a connection the broker has not
    /// blocked.
    fn room_for_a_batch(
        &self,
        session: &Session,
        shutdown: &CancellationToken,
        in_flight: usize,
        written: bool,
    ) -> bool {
        if shutdown.is_cancelled() {
            return false;
        }
        if in_flight == 0 {
            return true;
        }
        let pool = self.outbox.db().status();
        // At most half the pool: the service's handlers and requests need the rest.
        let limit = self.config.batches_in_flight.min(pool.max_size / 2).max(1);
        written
            && in_flight < limit
            && pool.in_use < pool.max_size
            && !session.connection.status().blocked()
    }

    /// One batch on `session` ([`Outbox::relay_batch`]), with what its publisher reported.
    /// `written` is told (with whether the batch is full) once every publish was written on a
    /// healthy channel; a publisher that must publish again one at a time first waits for the
    /// `previous` batch's publisher to be done, so messages stay in id order; `done` closes
    /// when this batch's publisher is.
    async fn batch(
        &self,
        session: &Session,
        written: oneshot::Sender<bool>,
        previous: Option<oneshot::Receiver<()>>,
        done: oneshot::Sender<()>,
    ) -> (svcdb::Result<RelayReport>, BatchFlags) {
        let flags = BatchFlags::default();
        let publisher = Publisher {
            connection: &session.connection,
            channel: session.channel.clone(),
            config: &self.config,
            flags: &flags,
            confirm_time: &self.metrics.confirm,
            written: Some(written),
            previous,
            _done: done,
        };
        let batch = self
            .outbox
            .relay_batch(self.config.batch_size, async move |messages| {
                publisher.publish(messages).await
            })
            .await;
        (batch, flags)
    }

    /// Takes one batch's outcome into the status, the metrics and `end` (`end.more`: the next
    /// batch should follow at once, this one being full on a fine channel). `stopping`:
    /// shutdown came, so no reconnection is asked for.
    fn after_batch(
        &self,
        batch: svcdb::Result<RelayReport>,
        flags: &BatchFlags,
        stopping: bool,
        state: &mut LoopState,
        end: &mut RunEnd,
    ) {
        let broken = flags.broken.load(Ordering::Relaxed);
        end.broken |= broken;
        let sent = flags.sent.load(Ordering::Relaxed);
        if end.reconnect {
            // A batch that overlapped the one that asked for a new connection: it used the
            // old connection, so it does not count towards the next reconnection.
        } else if sent > 0 && flags.nacked.load(Ordering::Relaxed) == sent {
            state.nacked_batches += 1;
        } else if sent > 0 {
            state.nacked_batches = 0;
        }
        let limit = self.config.reconnect_after_nacked_batches;
        if limit > 0 && state.nacked_batches >= limit && !stopping {
            state.nacked_batches = 0;
            end.reconnect = true;
        }
        let more = match batch {
            Ok(report) => {
                self.metrics.published.increment(report.published as u64);
                self.metrics.failed.increment(report.failed as u64);
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
                    let first = first.unwrap_or_else(|| "see svcdb_outbox.last_error".to_owned());
                    self.record_error(
                        &format!(
                            "{} of {} messages not published: {first}",
                            report.failed, report.claimed
                        ),
                        Failure::Rows,
                    );
                } else {
                    state.backoff = self.config.reconnect_backoff;
                }
                report.claimed >= self.config.batch_size && !broken
            }
            Err(e) => {
                self.record_error(&format!("outbox: {e}"), Failure::Database);
                end.database_error = true;
                false
            }
        };
        end.more = more && !end.reconnect;
    }

    /// A usable session: the current one, the current connection with a new confirm-mode
    /// channel, or a new connection. `Ok(None)` when shutdown came first. Opening a channel
    /// is bounded by the confirm timeout: a silent broker never answers `channel.open`.
    async fn ensure_session<'s>(
        &self,
        session: &'s mut Option<Session>,
        shutdown: &CancellationToken,
    ) -> Result<Option<&'s Session>> {
        let timeout = self.config.confirm_timeout;
        if let Some(current) = session.as_mut() {
            if current.connection.status().connected() {
                if current.channel.status().connected() {
                    return Ok(session.as_ref());
                }
                match confirm_channel_within(&current.connection, timeout, shutdown).await {
                    Ok(Some(channel)) => {
                        current.channel = channel;
                        self.status.send_modify(|s| s.connected = true);
                        return Ok(session.as_ref());
                    }
                    Ok(None) => return Ok(None),
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
                old.close(Deadline::after(timeout).at).await;
                self.status.send_modify(|s| s.blocked = None);
                self.metrics.blocked.set(0.0);
            }
        }
        let Some(connection) = connect_unless_cancelled(&self.amqp, shutdown).await else {
            return Ok(None);
        };
        let connection = connection?;
        // Listen before anything is published: lapin drops notifications nobody listens to.
        let watcher = tokio::spawn(watch_blocked(
            connection.events_listener(),
            self.status.clone(),
            self.metrics.blocked.clone(),
        ));
        let channel = match confirm_channel_within(&connection, timeout, shutdown).await {
            Ok(Some(channel)) => channel,
            outcome => {
                watcher.abort();
                let deadline = Deadline::after(timeout).at;
                let _ = tokio::time::timeout_at(deadline, close_connection(&connection)).await;
                return outcome.map(|_| None);
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
            channel,
            watcher,
        });
        Ok(session.as_ref())
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

/// Mirrors the broker's `connection.blocked` / `connection.unblocked` notifications into
/// [`RelayStatus::blocked`] until the connection's event stream ends.
async fn watch_blocked(
    events: impl futures_util::Stream<Item = lapin::Event>,
    status: watch::Sender<RelayStatus>,
    blocked: metrics::Gauge,
) {
    futures_util::pin_mut!(events);
    while let Some(event) = events.next().await {
        match event {
            lapin::Event::ConnectionBlocked(reason) => {
                tracing::warn!(target: "svcdb_amqp::relay", %reason, "RabbitMQ blocked the relay's connection (a memory or disk alarm); rows wait until it is unblocked");
                status.send_modify(|s| s.blocked = Some(reason));
                blocked.set(1.0);
            }
            lapin::Event::ConnectionUnblocked => {
                tracing::info!(target: "svcdb_amqp::relay", "RabbitMQ unblocked the relay's connection");
                status.send_modify(|s| s.blocked = None);
                blocked.set(0.0);
            }
            _ => {}
        }
    }
}

/// Keeps `gauge` at 1 while the relay's status says connected, 0 otherwise, until the
/// relay is dropped.
async fn mirror_connected(mut status: watch::Receiver<RelayStatus>, gauge: metrics::Gauge) {
    loop {
        let connected = status.borrow_and_update().connected;
        gauge.set(if connected { 1.0 } else { 0.0 });
        if status.changed().await.is_err() {
            return;
        }
    }
}

/// Mirrors whether the outbox's `LISTEN` connection is up into [`RelayStatus::listening`],
/// until the [`svcdb::outbox::Wakeups`] it watches are dropped.
async fn watch_listening(mut listening: watch::Receiver<bool>, status: watch::Sender<RelayStatus>) {
    loop {
        let now = *listening.borrow_and_update();
        status.send_if_modified(|s| std::mem::replace(&mut s.listening, now) != now);
        if listening.changed().await.is_err() {
            status.send_if_modified(|s| std::mem::replace(&mut s.listening, false));
            return;
        }
    }
}

/// What carries over from one run of batches to the next.
#[derive(Debug)]
struct LoopState {
    /// The pause after the next failure.
    backoff: Duration,
    /// Batches in a row whose every publish was nacked.
    nacked_batches: u32,
}

/// How a run of batches ([`Relay::relay_run`]) ended: what the loop does next.
#[derive(Debug, Default)]
struct RunEnd {
    /// A batch's channel should be replaced.
    broken: bool,
    /// The broker nacked every publish of too many batches in a row: open a new connection.
    reconnect: bool,
    /// Claiming or marking failed: pause with backoff.
    database_error: bool,
    /// The last batch was full: the next one follows at once.
    more: bool,
    /// Shutdown's deadline passed with batches in flight; they were dropped.
    timed_out: bool,
}

/// What a batch's publisher tells the loop besides the per-message results.
#[derive(Debug, Default)]
struct BatchFlags {
    /// The channel should be replaced: it closed, or a publish timed out (a late confirm
    /// must not be taken for a new message's).
    broken: AtomicBool,
    /// The first message's error, for [`RelayStatus::last_error`].
    first_error: Mutex<Option<String>>,
    /// Messages whose confirm came back, positive or negative.
    sent: AtomicUsize,
    /// Of those, negative confirms (`basic.nack`).
    nacked: AtomicUsize,
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

/// Publishes one batch of outbox rows.
struct Publisher<'a> {
    /// For fresh channels after a channel-level error.
    connection: &'a Connection,
    /// The session's confirm-mode channel.
    channel: Channel,
    /// The confirm timeout and what unroutable messages count as.
    config: &'a RelayConfig,
    /// Reported back to the loop.
    flags: &'a BatchFlags,
    /// Where the batch's publish-to-confirm time goes.
    confirm_time: &'a metrics::Histogram,
    /// Told (with whether the batch is full) once every publish was written on a healthy
    /// channel: the next batch may publish.
    written: Option<oneshot::Sender<bool>>,
    /// Closes when the previous batch's publisher is done.
    previous: Option<oneshot::Receiver<()>>,
    /// Closes (is dropped) when this publisher is done.
    _done: oneshot::Sender<()>,
}

/// One row's outcome within a batch; `None` while it was not sent.
type Sent = Option<Result<()>>;

/// One row's publish awaiting its confirm (with the row's name); `None` if it was not sent.
type Pending = Option<Result<(lapin::PublisherConfirm, String)>>;

impl Publisher<'_> {
    /// Publishes every message within one confirm timeout and returns one result per
    /// message, in order, as [`Outbox::relay_batch`] expects. Sets `broken` when the
    /// session's channel should be replaced.
    ///
    /// First pipelined on the session's channel: every message sent, then the confirms
    /// collected (one round trip's wait for the batch, not one per message). If a
    /// channel-level error (a missing exchange: `NOT_FOUND`) closed the channel while the
    /// connection stays up, the rows it took down with it are published again one at a time
    /// ([`Publisher::one_by_one`]), so that only the bad row fails.
    async fn publish(mut self, messages: &[OutboxMessage]) -> Vec<Result<(), String>> {
        let deadline = Deadline::after(self.config.confirm_timeout);
        let started = Instant::now();
        let pending = self.send(messages, deadline).await;
        if let Some(written) = self.written.take() {
            if !self.flags.broken.load(Ordering::Relaxed) && self.channel.status().connected() {
                let _ = written.send(messages.len() >= self.config.batch_size);
            }
        }
        let mut results = self.confirms(pending, deadline).await;
        self.confirm_time.record(started.elapsed());
        if !self.channel.status().connected() {
            self.flags.broken.store(true, Ordering::Relaxed);
            // The previous batch may be publishing again one at a time too: after it.
            if let Some(previous) = self.previous.take() {
                let _ = previous.await;
            }
            if self.connection.status().connected() {
                self.one_by_one(messages, &mut results, deadline).await;
            }
        }
        let results: Vec<Result<(), String>> = results
            .into_iter()
            .map(|sent| match sent {
                Some(result) => result.map_err(|e| e.to_string()),
                None => Err(
                    "not sent: the channel failed on an earlier message of this batch".to_owned(),
                ),
            })
            .collect();
        if let Some(Err(first)) = results.iter().find(|r| r.is_err()) {
            *self
                .flags
                .first_error
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(first.clone());
        }
        results
    }

    /// Sends every message on the session's channel, without waiting for confirms. Stops
    /// sending once the channel or the connection failed.
    async fn send(&self, messages: &[OutboxMessage], deadline: Deadline) -> Vec<Pending> {
        let mut pending = Vec::with_capacity(messages.len());
        for message in messages {
            if self.flags.broken.load(Ordering::Relaxed) || !self.channel.status().connected() {
                // Don't pile on a failed channel.
                pending.push(None);
                continue;
            }
            let what = describe(message);
            match self.start(&self.channel, message, &what, deadline).await {
                Ok(confirm) => pending.push(Some(Ok((confirm, what)))),
                Err(e) => pending.push(Some(Err(e))),
            }
        }
        pending
    }

    /// Awaits the confirms of what [`Publisher::send`] sent, until `deadline`.
    async fn confirms(&self, pending: Vec<Pending>, deadline: Deadline) -> Vec<Sent> {
        let mut results = Vec::with_capacity(pending.len());
        for sent in pending {
            results.push(match sent {
                None => None,
                Some(Err(e)) => Some(Err(e)),
                Some(Ok((confirm, what))) => Some(self.finish(confirm, what, deadline).await),
            });
        }
        results
    }

    /// Publishes again, one at a time, each message the closed channel took down (not sent,
    /// or failed with a channel-level error), each on an open channel and awaiting its
    /// confirm before the next: a message that closes its channel fails alone, and the next
    /// one gets a fresh channel. Messages already confirmed, nacked or returned keep their
    /// result. A message whose first copy did reach a queue is published twice; consumers
    /// absorb the duplicate.
    async fn one_by_one(
        &self,
        messages: &[OutboxMessage],
        results: &mut [Sent],
        deadline: Deadline,
    ) {
        let mut channel: Option<Channel> = None;
        for (message, result) in messages.iter().zip(results.iter_mut()) {
            let retry = match result {
                None => true,
                Some(Err(Error::Amqp { cause, .. })) => !crate::error::is_connection_level(cause),
                Some(_) => false,
            };
            if !retry {
                continue;
            }
            if !self.connection.status().connected() {
                break;
            }
            let open = match channel.take() {
                Some(open) if open.status().connected() => open,
                closed => {
                    if let Some(closed) = closed {
                        close_channel(&closed).await;
                    }
                    let opened =
                        tokio::time::timeout_at(deadline.at, confirm_channel(self.connection))
                            .await;
                    match opened {
                        Ok(Ok(open)) => open,
                        Ok(Err(e)) => {
                            *result = Some(Err(e));
                            break;
                        }
                        Err(_) => break, // out of time: the rest keep their errors
                    }
                }
            };
            let what = describe(message);
            *result = Some(match self.start(&open, message, &what, deadline).await {
                Ok(confirm) => self.finish(confirm, what, deadline).await,
                Err(e) => Err(e),
            });
            channel = Some(open);
        }
        if let Some(channel) = channel {
            let _ = tokio::time::timeout_at(deadline.at, close_channel(&channel)).await;
        }
    }

    /// Sends one message on `channel`; a connection failure marks the session broken.
    async fn start(
        &self,
        channel: &Channel,
        message: &OutboxMessage,
        what: &str,
        deadline: Deadline,
    ) -> Result<lapin::PublisherConfirm> {
        let (span, traceparent) = crate::spans::publish(message);
        let properties = publish::envelope_properties(&message.envelope);
        publish::start(
            channel,
            &message.exchange,
            &message.routing_key,
            &message.body(),
            publish::with_traceparent(properties, traceparent.as_deref()),
            what,
            deadline,
        )
        .instrument(span)
        .await
        .inspect_err(|e| {
            if matches!(e, Error::ConfirmTimeout { .. }) || e.is_connection_error() {
                self.flags.broken.store(true, Ordering::Relaxed);
            }
        })
    }

    /// Awaits one confirm; a timeout or an AMQP error marks the session broken.
    async fn finish(
        &self,
        confirm: lapin::PublisherConfirm,
        what: String,
        deadline: Deadline,
    ) -> Result<()> {
        let result = publish::finish(confirm, deadline, what, self.config.unroutable).await;
        if !matches!(
            &result,
            Err(Error::ConfirmTimeout { .. } | Error::Amqp { .. })
        ) {
            self.flags.sent.fetch_add(1, Ordering::Relaxed);
        }
        if matches!(&result, Err(e) if publish::is_nack(e)) {
            self.flags.nacked.fetch_add(1, Ordering::Relaxed);
        }
        result.inspect_err(|e| {
            if matches!(e, Error::ConfirmTimeout { .. } | Error::Amqp { .. }) {
                self.flags.broken.store(true, Ordering::Relaxed);
            }
        })
    }
}

/// How a row is named in errors and logs.
fn describe(message: &OutboxMessage) -> String {
    publish::describe(&message.exchange, &message.routing_key, &message.envelope)
}
