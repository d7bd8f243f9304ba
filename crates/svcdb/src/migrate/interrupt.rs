//! Interrupting a run: a signal handler's request (Ctrl-C, a pod's SIGTERM) that the runner
//! stop at the statement it is running and take its failure path, rather than vanish with the
//! process and leave the server to notice.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::pool::ServiceDb;

/// A runner's interrupt ([`Migrator::with_interrupt`](super::Migrator::with_interrupt)): the
/// caller's token, the backend of the lock's session, and whether its statement was cancelled.
#[derive(Debug, Clone)]
pub(crate) struct Interrupt {
    token: CancellationToken,
    state: Arc<State>,
}

#[derive(Debug, Default)]
struct State {
    /// `pg_backend_pid()` of the session holding the migration lock; 0 before it is known.
    backend: AtomicI32,
    /// A cancel was sent to the server.
    cancel_sent: AtomicBool,
    /// The run has stopped for the interrupt (a statement failed after the cancel, or the
    /// runner stopped between statements): the failure path's own statements and commits run
    /// uninterrupted.
    acted: AtomicBool,
}

impl Interrupt {
    pub(crate) fn new(token: CancellationToken) -> Self {
        Self {
            token,
            state: Arc::default(),
        }
    }

    /// Whether the caller asked to stop.
    pub(crate) fn requested(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves once the caller asks to stop.
    pub(crate) async fn wait(&self) {
        self.token.cancelled().await;
    }

    /// True once, at the first call after the caller asked to stop, unless the run stopped for
    /// it already: the runner then stops where it is, between statements or before a commit
    /// (found by a user trial: a cancel that reaches the server between two statements is
    /// dropped, and the run went on to commit). Later calls, on the failure path, say false.
    pub(crate) fn take(&self) -> bool {
        self.requested() && !self.state.acted.swap(true, Ordering::Relaxed)
    }

    /// Notes the backend whose statements [`Self::around`] cancels.
    pub(crate) fn set_backend(&self, pid: i32) {
        self.state.backend.store(pid, Ordering::Relaxed);
    }

    /// Awaits `statement`, running on the lock's session. Asked to stop meanwhile (the first
    /// time only), it has the server cancel that session's statement: the statement fails
    /// with 57014, so a transaction rolls back and a non-transactional script that had not got
    /// past its first statement is not left dirty, as after any failure. A cancel that came
    /// between two statements is dropped by the server: [`Self::take`] then stops the run
    /// before its next statement or commit.
    pub(crate) async fn around<T>(
        &self,
        db: &ServiceDb,
        statement: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, tokio_postgres::Error> {
        let mut statement = std::pin::pin!(statement);
        let unsent = |state: &State| {
            !state.acted.load(Ordering::Relaxed) && !state.cancel_sent.load(Ordering::Relaxed)
        };
        tokio::select! {
            // The statement first: its first poll sends it.
            biased;
            out = &mut statement => return out,
            () = self.token.cancelled(), if unsent(&self.state) => {}
        }
        if !self.state.cancel_sent.swap(true, Ordering::Relaxed) {
            cancel(db, self.state.backend.load(Ordering::Relaxed)).await;
        }
        let out = statement.await;
        if out.is_err() {
            // The failure path runs from here, uninterrupted.
            self.state.acted.store(true, Ordering::Relaxed);
        }
        out
    }
}

/// Asks the server to cancel backend `pid`'s statement, from a pooled connection of the same
/// role (`pg_cancel_backend` needs no more). Best effort: if it fails, the statement runs to
/// its end and the run stops before the next one.
async fn cancel(db: &ServiceDb, pid: i32) {
    if pid == 0 {
        return;
    }
    let sent = async {
        db.get()
            .await?
            .execute("SELECT pg_cancel_backend($1)", &[&pid])
            .await?;
        Ok::<_, crate::Error>(())
    };
    if let Err(e) = sent.await {
        tracing::warn!(target: "svcdb::migrate", error = %e, "cannot cancel the running migration statement; the run stops after it");
    }
}
