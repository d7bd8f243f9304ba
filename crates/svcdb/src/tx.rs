//! Transactions that commit when the closure succeeds and roll back when it fails, panics or
//! is cancelled, with an optional retry on serialization failures and deadlocks.

use std::time::Duration;

use tracing::Instrument;

use crate::error::Error;
use crate::pool::ServiceDb;
use crate::transaction::Transaction;

/// The isolation level of a transaction, set with [`TxOptions::isolation`]:
/// `ReadUncommitted`, `ReadCommitted` (PostgreSQL's default), `RepeatableRead` or
/// `Serializable`.
///
/// Under `RepeatableRead` and `Serializable`, PostgreSQL may abort a transaction with a
/// serialization failure (SQLSTATE 40001); [`ServiceDb::transaction_with`] runs it again
/// (up to [`TxOptions::max_attempts`]), and [`TxOptions::serializable`] is the usual choice
/// for read-modify-write logic. The driver's enum (tokio-postgres), under svcdb's name.
pub type IsolationLevel = tokio_postgres::IsolationLevel;

/// Errors that can say whether running the whole transaction again may succeed.
///
/// Implemented for [`Error`] and [`tokio_postgres::Error`][pg-error]; implement it for your
/// own error type to use [`ServiceDb::transaction_with`] with it.
///
/// [pg-error]: https://docs.rs/tokio-postgres/0.7/tokio_postgres/struct.Error.html
pub trait Retryable {
    /// True for serialization failures (SQLSTATE 40001) and deadlocks (40P01).
    fn is_retryable(&self) -> bool;
}

impl Retryable for Error {
    fn is_retryable(&self) -> bool {
        Error::is_retryable(self)
    }
}

impl Retryable for tokio_postgres::Error {
    fn is_retryable(&self) -> bool {
        crate::error::is_retryable(self)
    }
}

/// How [`ServiceDb::transaction_with`] runs a transaction.
#[derive(Debug, Clone)]
pub struct TxOptions {
    /// Isolation level. Default: read committed (the server's default).
    pub isolation: IsolationLevel,
    /// Start the transaction `READ ONLY`. Default: false.
    pub read_only: bool,
    /// Attempts in all, the first included, while the error is [`Retryable`]. Default: 5.
    pub max_attempts: u32,
    /// Wait before the second attempt; doubled for each later one, with random jitter so that
    /// the transactions that collided do not collide again. Default: 5 ms.
    pub backoff: Duration,
}

impl Default for TxOptions {
    fn default() -> Self {
        Self {
            isolation: IsolationLevel::ReadCommitted,
            read_only: false,
            max_attempts: 5,
            backoff: Duration::from_millis(5),
        }
    }
}

impl TxOptions {
    /// `SERIALIZABLE`, retried up to 5 times: the usual choice for read-modify-write logic.
    pub fn serializable() -> Self {
        Self {
            isolation: IsolationLevel::Serializable,
            ..Self::default()
        }
    }
}

impl ServiceDb {
    /// Runs `f` in a transaction on a pooled connection: commits if it returns `Ok`, rolls
    /// back if it returns `Err`, panics or is cancelled (the transaction rolls back on drop).
    ///
    /// ```no_run
    /// # async fn demo(db: &svcdb::ServiceDb) -> Result<(), svcdb::Error> {
    /// let id: i64 = db
    ///     .transaction(async |tx| {
    ///         let row = tx.query_one("INSERT INTO products (name) VALUES ($1) RETURNING id", &[&"lamp"]).await?;
    ///         Ok::<_, svcdb::Error>(row.get(0))
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn transaction<T, E>(
        &self,
        f: impl AsyncFnOnce(&mut Transaction<'_>) -> Result<T, E>,
    ) -> Result<T, E>
    where
        E: From<Error>,
    {
        let span = crate::trace::transaction_span(self);
        self.transaction_in_span(f).instrument(span).await
    }

    async fn transaction_in_span<T, E>(
        &self,
        f: impl AsyncFnOnce(&mut Transaction<'_>) -> Result<T, E>,
    ) -> Result<T, E>
    where
        E: From<Error>,
    {
        let mut open = Unsettled::new(self, self.get().await?);
        let (mut tx, begun) = Transaction::begin(open.conn(), IsolationLevel::ReadCommitted, false);
        let ((result, enqueued), begun) =
            tokio::join!(crate::outbox::tracking_enqueues(f(&mut tx)), begun);
        let outcome = settle(tx, begun, result).await;
        let conn = open.settled();
        if outcome.is_err() {
            self.retire_if_read_only(conn).await;
        } else if enqueued {
            crate::outbox::committed(self);
        }
        outcome
    }

    /// Like [`ServiceDb::transaction`], with an isolation level, and running `f` again (on a
    /// fresh transaction) while it or the commit fails with a [`Retryable`] error, up to
    /// `max_attempts` in all. The last error is returned as it is.
    ///
    /// Inside a spawned task or an axum handler (futures that must be `Send`), write the
    /// closure as `async move |tx| …` and move clones (of `Arc`s, ids) into it: a closure that
    /// borrows its captures makes the future lose `Send`, a current limit of rustc's async
    /// closures.
    ///
    /// ```no_run
    /// # async fn demo(db: svcdb::ServiceDb, order_id: i64) -> Result<(), svcdb::Error> {
    /// use svcdb::TxOptions;
    /// tokio::spawn(async move {
    ///     db.transaction_with(&TxOptions::serializable(), async move |tx| {
    ///         let n: i32 = tx.query_one("SELECT stock FROM items WHERE id = $1", &[&order_id]).await?.get(0);
    ///         tx.execute("UPDATE items SET stock = $1 WHERE id = $2", &[&(n - 1), &order_id]).await?;
    ///         Ok::<_, svcdb::Error>(())
    ///     })
    ///     .await
    /// });
    /// # Ok(()) }
    /// ```
    pub async fn transaction_with<T, E>(
        &self,
        options: &TxOptions,
        f: impl AsyncFnMut(&mut Transaction<'_>) -> Result<T, E>,
    ) -> Result<T, E>
    where
        E: From<Error> + Retryable,
    {
        let span = crate::trace::transaction_span(self);
        self.transaction_with_in_span(options, f)
            .instrument(span)
            .await
    }

    async fn transaction_with_in_span<T, E>(
        &self,
        options: &TxOptions,
        mut f: impl AsyncFnMut(&mut Transaction<'_>) -> Result<T, E>,
    ) -> Result<T, E>
    where
        E: From<Error> + Retryable,
    {
        let mut attempt = 1;
        let mut backoff = options.backoff;
        loop {
            // No inner `async` block here: one that borrows `f` makes the returned future
            // lose `Send` for callers that spawn it (rustc's higher-ranked auto-trait limits).
            let mut open = Unsettled::new(self, self.get().await?);
            let (mut tx, begun) =
                Transaction::begin(open.conn(), options.isolation, options.read_only);
            let ((result, enqueued), begun) =
                tokio::join!(crate::outbox::tracking_enqueues(f(&mut tx)), begun);
            let outcome = settle(tx, begun, result).await;
            let conn = open.settled();
            if enqueued && outcome.is_ok() {
                crate::outbox::committed(self);
            }
            if matches!(&outcome, Err(e) if !e.is_retryable()) {
                self.retire_if_read_only(conn).await;
                return outcome;
            }
            match outcome {
                Err(e) if e.is_retryable() && attempt < options.max_attempts => {
                    drop(conn);
                    tracing::debug!(target: "svcdb::tx", attempt, "transaction conflicted; retrying");
                    let jitter = backoff.mul_f64(rand::random::<f64>());
                    tokio::time::sleep(backoff.saturating_add(jitter)).await;
                    backoff = backoff.saturating_mul(2);
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

impl ServiceDb {
    /// After a failed transaction: when the pool must reach the primary
    /// (`target_session_attrs=read-write`) and `conn`'s server no longer accepts writes (it
    /// became a standby, or was fenced read-only), takes the connection out of the pool, so the
    /// next transaction opens one that finds the new primary. Otherwise `conn` goes back.
    ///
    /// A busy connection is never idle long enough for the pool's own check
    /// (`verify_after_idle`); without this, the same connection to the old primary would fail
    /// every transaction (25006) for as long as it stayed busy. Costs one round trip, on
    /// failures only.
    pub(crate) async fn retire_if_read_only(&self, conn: crate::pool::PooledConn) {
        use tokio_postgres::config::TargetSessionAttrs;
        if self.config().target_session_attrs() != TargetSessionAttrs::ReadWrite {
            return;
        }
        let check = crate::connection::accepts_writes(&conn);
        match tokio::time::timeout(self.config().connect_timeout, check).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => {
                tracing::info!(target: "svcdb::pool", "the server no longer accepts writes; retiring the connection");
                drop(crate::pool::PooledConn::take(conn));
            }
            // No answer: the connection is broken or stuck; either way, not one to reuse.
            Ok(Err(_)) | Err(_) => drop(crate::pool::PooledConn::take(conn)),
        }
    }
}

/// A pooled connection whose transaction is not settled yet. When the future driving it is
/// dropped part-way (a request's timeout, a `select!`, a consumer's shutdown deadline),
/// tokio-postgres only queues a `ROLLBACK` behind the statement the server is running, which
/// keeps its locks for as long as it runs, and the pool would hand the connection to the next
/// caller, whose statements would wait behind it (found by a user trial: a row stayed locked
/// for seconds after the timeout, and the next request waited 7.8 s past its acquire
/// timeout). Dropped unsettled, this asks the server to cancel what runs for it and takes the
/// connection out of the pool: closed, it can carry no one else's statement, so the cancel
/// can hit none.
struct Unsettled {
    conn: Option<crate::pool::PooledConn>,
    tls: crate::tls::Tls,
}

impl Unsettled {
    fn new(db: &ServiceDb, conn: crate::pool::PooledConn) -> Self {
        Self {
            conn: Some(conn),
            tls: db.tls().clone(),
        }
    }

    fn conn(&mut self) -> &mut crate::pool::PooledConn {
        self.conn.as_mut().expect("taken only when settled")
    }

    /// The connection, its transaction committed or rolled back: fit for the pool again.
    fn settled(mut self) -> crate::pool::PooledConn {
        self.conn.take().expect("taken only once")
    }
}

impl Drop for Unsettled {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        let cancel = conn.cancel_token();
        let closing = crate::pool::PooledConn::take(conn);
        let tls = self.tls.clone();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            // Cancelled first: a backend waiting for a lock or sleeping notices a closed socket
            // only when it next talks to its client. A statement that already ended makes the
            // cancel a no-op; the connection closes either way.
            let cancelled = match tls.rustls() {
                None => cancel.cancel_query(tokio_postgres::NoTls).await,
                Some(rustls) => cancel.cancel_query(rustls.clone()).await,
            };
            if let Err(e) = cancelled {
                tracing::debug!(target: "svcdb::tx", error = %e, "cancelling an abandoned transaction's statement failed; closing its connection anyway");
            }
            drop(closing);
        });
    }
}

/// Commits `tx` when `outcome` is `Ok` and its `BEGIN` succeeded (a failed commit becomes the
/// error, and so does an aborted transaction: [`Transaction::commit`]), rolls it back
/// otherwise. A failed `BEGIN` is the error, whatever `outcome` says: the statements after it
/// failed for it (25P02, in the block it aborted). A failed rollback means the connection
/// broke; the pool discards it.
async fn settle<T, E: From<Error>>(
    tx: Transaction<'_>,
    begun: Result<(), tokio_postgres::Error>,
    outcome: Result<T, E>,
) -> Result<T, E> {
    match begun.map_err(|failed| E::from(failed.into())).and(outcome) {
        Ok(value) => tx.commit().await.map(|()| value).map_err(E::from),
        Err(e) => {
            let _ = tx.rollback().await;
            Err(e)
        }
    }
}
