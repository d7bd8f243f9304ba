//! Waking relays when rows commit: in this process through a watch channel per outbox, in
//! others through a debounced `NOTIFY` they `LISTEN` for (see [the outbox](super#waking-the-relay)).

use std::cell::Cell;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::config::capped_wait;
use crate::error::Result;
use crate::ident::quote_literal;
use crate::pool::ServiceDb;

/// The shortest time between two `NOTIFY`s of one outbox from one process: a burst of commits
/// is announced by its first commit and then once per this interval, whatever its size.
pub const NOTIFY_DEBOUNCE: Duration = Duration::from_millis(5);

tokio::task_local! {
    /// Inside svcdb's transaction wrappers: set when [`enqueue`](super::enqueue) wrote a row in the
    /// transaction, so that the wrapper wakes the relays after the commit.
    static ENQUEUED: Cell<bool>;
}

/// Marks the transaction in progress as one that enqueued rows: inside svcdb's transaction
/// wrappers, the relays are woken once it commits.
pub(crate) fn enqueued() {
    let _ = ENQUEUED.try_with(|enqueued| enqueued.set(true));
}

/// Runs `transaction` (the caller's closure on its transaction) and says whether it enqueued
/// outbox rows. For svcdb's transaction wrappers, which call [`committed`] after the commit.
pub(crate) async fn tracking_enqueues<F: Future>(transaction: F) -> (F::Output, bool) {
    ENQUEUED
        .scope(Cell::new(false), async move {
            let output = transaction.await;
            (output, ENQUEUED.with(Cell::get))
        })
        .await
}

/// After a transaction that enqueued rows committed on `db`: wakes the relays of its outbox in
/// this process now, or, when there are none, those of other processes through a debounced
/// `NOTIFY`.
pub(crate) fn committed(db: &ServiceDb) {
    let signal = Signal::of(db);
    signal.wake();
    // A relay of this process watches the outbox: it publishes the rows committed here, and
    // a NOTIFY would only wake other processes' relays to find them claimed. Without one,
    // they are the ones to publish it.
    if signal.commits.receiver_count() == 0 {
        signal.notify_soon(db);
    }
}

/// The `NOTIFY` channel of the outbox in `schema`: `svcdb_outbox:` and the schema name, cut to
/// PostgreSQL's 63 bytes (two long schema names that share their first 50 bytes share a
/// channel, which costs a relay an empty claim, nothing more). Relays `LISTEN` on it; a tool
/// that writes outbox rows by hand can `SELECT pg_notify(channel, '')` after its commit.
pub fn notify_channel(schema: &str) -> String {
    let mut channel = format!("svcdb_outbox:{schema}");
    let mut end = channel.len().min(63);
    while !channel.is_char_boundary(end) {
        end -= 1;
    }
    channel.truncate(end);
    channel
}

/// This process's mark in the payload of its `NOTIFY`s, so its own listeners skip what they
/// were already woken for in-process.
fn process_mark() -> &'static str {
    static MARK: OnceLock<String> = OnceLock::new();
    MARK.get_or_init(|| Uuid::now_v7().simple().to_string())
}

/// The wake-up state of one outbox (server, database, schema) in this process, shared by every
/// [`ServiceDb`] on it.
struct Signal {
    /// [`notify_channel`] of the schema.
    channel: String,
    /// Bumped when rows were committed: in-process by [`committed`], from other processes by
    /// the listeners. Each relay watches it through its [`Wakeups`].
    commits: watch::Sender<u64>,
    /// The debounced `NOTIFY`.
    notifier: Mutex<Notifier>,
}

#[derive(Default)]
struct Notifier {
    /// A `NOTIFY` task runs (sending, or waiting out the debounce interval).
    running: bool,
    /// Rows committed since the task last started a `NOTIFY`.
    pending: bool,
}

impl Signal {
    /// The signal of `db`'s outbox, created on first use.
    fn of(db: &ServiceDb) -> Arc<Signal> {
        static SIGNALS: OnceLock<Mutex<HashMap<String, Arc<Signal>>>> = OnceLock::new();
        let pg = db.session_config();
        // Not the user: relays and producers of one outbox may connect as different roles.
        let key = format!(
            "{:?} {:?} {:?} {}",
            pg.get_hosts(),
            pg.get_ports(),
            pg.get_dbname(),
            db.schema().as_str()
        );
        let mut signals = SIGNALS
            .get_or_init(Mutex::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        signals
            .entry(key)
            .or_insert_with(|| {
                Arc::new(Signal {
                    channel: notify_channel(db.schema().as_str()),
                    commits: watch::Sender::new(0),
                    notifier: Mutex::default(),
                })
            })
            .clone()
    }

    fn wake(&self) {
        self.commits.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Arranges a `NOTIFY` that starts after this call: at once when none was sent in the
    /// last [`NOTIFY_DEBOUNCE`], else when that interval ends.
    ///
    /// Why a trailing `NOTIFY` rather than skipping one when another went out a moment ago:
    /// a relay woken by that earlier `NOTIFY` may have claimed before this commit and would not
    /// see the row until its next poll. Here every commit is followed by a `NOTIFY` sent after
    /// it, so a relay that listens always claims after the commit. Sending it after the commit
    /// (on a pooled connection, in a transaction of its own) rather than inside the business
    /// transaction is what allows the debounce: a `NOTIFY` inside would be one per transaction.
    fn notify_soon(self: &Arc<Self>, db: &ServiceDb) {
        let mut notifier = self.notifier.lock().unwrap_or_else(|p| p.into_inner());
        notifier.pending = true;
        if notifier.running {
            return;
        }
        notifier.running = true;
        drop(notifier);
        tokio::spawn(self.clone().notify_while_pending(db.clone()));
    }

    async fn notify_while_pending(self: Arc<Self>, db: ServiceDb) {
        loop {
            {
                let mut notifier = self.notifier.lock().unwrap_or_else(|p| p.into_inner());
                if !notifier.pending {
                    // Quiet for a whole interval: the task ends (and lets go of the pool).
                    notifier.running = false;
                    return;
                }
                notifier.pending = false;
            }
            if let Err(e) = self.notify(&db).await {
                // The relays' poll covers a lost notification.
                tracing::debug!(target: "svcdb::outbox", error = %e, "could not notify the relays of other processes; they find the rows at their next poll");
            }
            tokio::time::sleep(NOTIFY_DEBOUNCE).await;
        }
    }

    async fn notify(&self, db: &ServiceDb) -> Result<()> {
        let conn = db.get().await?;
        // A transaction of its own, committed asynchronously: the notification is delivered at
        // commit either way, and it need not wait for a WAL flush.
        conn.batch_execute(&format!(
            "BEGIN; SET LOCAL synchronous_commit TO off; SELECT pg_notify({}, {}); COMMIT",
            quote_literal(&self.channel),
            quote_literal(process_mark()),
        ))
        .await?;
        Ok(())
    }
}

fn quote_ident(value: &str) -> String {
    format!("\"{}\"", value.replace('"', "\"\""))
}

/// What wakes a relay loop of one outbox: commits of [`enqueue`](super::enqueue)d rows in this process, and
/// `NOTIFY`s from other processes, received on a `LISTEN` connection of its own that
/// reconnects (with backoff) after it is lost. From [`Outbox::wakeups`](super::Outbox::wakeups); dropping it closes the
/// `LISTEN` connection.
///
/// Use: [`Wakeups::mark_seen`] right before claiming rows, then, after a batch that drained
/// the outbox, [`Wakeups::wait`] with the poll interval. A commit between the two is not
/// missed: `wait` returns at once.
#[derive(Debug)]
pub struct Wakeups {
    commits: watch::Receiver<u64>,
    listening: watch::Receiver<bool>,
    listener: JoinHandle<()>,
}

impl Drop for Wakeups {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

impl Wakeups {
    /// Starts watching `db`'s outbox ([`Outbox::wakeups`](super::Outbox::wakeups)(super::Outbox::wakeups)).
    pub(super) fn start(
        db: &ServiceDb,
        reconnect_backoff: Duration,
        max_reconnect_backoff: Duration,
    ) -> Self {
        let signal = Signal::of(db);
        let commits = signal.commits.subscribe();
        let (listening_tx, listening) = watch::channel(false);
        let listener = tokio::spawn(listen(
            db.clone(),
            signal,
            listening_tx,
            reconnect_backoff,
            max_reconnect_backoff,
        ));
        Wakeups {
            commits,
            listening,
            listener,
        }
    }

    /// Forgets the wake-ups so far: the claim that follows sees every row they announced.
    pub fn mark_seen(&mut self) {
        self.commits.borrow_and_update();
    }

    /// Waits until rows were committed since [`Wakeups::mark_seen`] (true) or `poll_interval`
    /// passed (false).
    pub async fn wait(&mut self, poll_interval: Duration) -> bool {
        let sleep = tokio::time::sleep(capped_wait(poll_interval));
        tokio::select! {
            changed = self.commits.changed() => changed.is_ok(),
            () = sleep => false,
        }
    }

    /// Whether the `LISTEN` connection is up, now and on every change.
    pub fn listening(&self) -> watch::Receiver<bool> {
        self.listening.clone()
    }
}

/// Listens on the outbox's channel for as long as the [`Wakeups`] live, reconnecting with
/// backoff.
async fn listen(
    db: ServiceDb,
    signal: Arc<Signal>,
    listening: watch::Sender<bool>,
    first_backoff: Duration,
    max_backoff: Duration,
) {
    let mut backoff = first_backoff;
    loop {
        let outcome = listen_once(&db, &signal, &listening).await;
        if *listening.borrow() {
            backoff = first_backoff;
        }
        listening.send_replace(false);
        match outcome {
            Ok(()) => {
                tracing::debug!(target: "svcdb::outbox", "the outbox's LISTEN connection closed; reconnecting (the relay polls meanwhile)")
            }
            Err(e) => {
                tracing::debug!(target: "svcdb::outbox", error = %e, "cannot listen for outbox notifications; retrying (the relay polls meanwhile)")
            }
        }
        tokio::time::sleep(capped_wait(backoff)).await;
        backoff = backoff.saturating_mul(2).min(max_backoff);
    }
}

/// One `LISTEN` connection, until it ends.
async fn listen_once(
    db: &ServiceDb,
    signal: &Signal,
    listening: &watch::Sender<bool>,
) -> Result<()> {
    let (conn, mut notifications) = db.dedicated_listening().await?;
    conn.batch_execute(&format!("LISTEN {}", quote_ident(&signal.channel)))
        .await?;
    listening.send_replace(true);
    // Rows may have been committed while nobody listened: one claim finds them.
    signal.wake();
    while let Some(notification) = notifications.recv().await {
        if notification.payload() != process_mark() {
            signal.wake();
        }
    }
    Ok(())
}
