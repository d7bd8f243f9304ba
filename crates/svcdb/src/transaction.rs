//! svcdb's transaction, whose `BEGIN` travels with its first statement, and its savepoints.

use std::future::Future;
use std::ops::Deref;
use std::pin::Pin;
use std::task::{Context, Poll};

use deadpool_postgres::ClientWrapper;
use futures_util::FutureExt;
use tokio_postgres::types::ToSql;
use tokio_postgres::Statement;

use crate::error::Error;
use crate::tx::IsolationLevel;

/// The answer to a transaction's `BEGIN`, from [`Transaction::begin`]: read while the
/// transaction's statements run (see there), it is `Err` when the `BEGIN` failed.
pub(crate) type Begun<'a> =
    Pin<Box<dyn Future<Output = Result<(), tokio_postgres::Error>> + Send + 'a>>;

/// The transaction [`ServiceDb::transaction`](crate::ServiceDb::transaction) and
/// [`ServiceDb::transaction_with`](crate::ServiceDb::transaction_with) hand to their closure,
/// on a connection of the service's pool (so on the service schema).
///
/// svcdb commits it when the closure returns `Ok` and rolls it back when it returns `Err`,
/// panics or is cancelled: the closure does not commit or roll back itself. It dereferences to
/// the pooled client, whose methods run statements (`query`, `query_one`, `query_opt`,
/// `batch_execute`, `simple_query`, `copy_in`, …) and whose `prepare_cached` prepares a
/// statement once per pooled connection rather than once per call;
/// [`Transaction::execute`] does that by itself; [`Transaction::savepoint`] sets a savepoint. A function of yours that takes
/// `&impl tokio_postgres::GenericClient` takes [`tx.client()`](Transaction::client), the
/// driver's client the transaction runs on.
///
/// Its `BEGIN` is not waited for: the closure's first statement goes out right behind it, so a
/// transaction costs the round trips of its statements and of its commit, one fewer than a
/// driver's transaction (which waits for the `BEGIN`'s answer before it hands the transaction
/// over). A `BEGIN` that failed is the transaction's error, whatever the closure returned;
/// nothing is then reported committed. The window this leaves: a plain `BEGIN` that fails
/// while its session lives (only a cancel landing on it: svcdb's own cancels close the
/// connection, and a failing `SET TRANSACTION` aborts the block instead) lets the statements
/// already sent behind it run on their own, each committed, before its error is read.
pub struct Transaction<'a> {
    conn: &'a ClientWrapper,
    /// Committed or rolled back: nothing to undo when dropped.
    settled: bool,
}

impl<'a> Transaction<'a> {
    /// Starts a transaction on `conn`: sends its `BEGIN` and returns at once, with the answer
    /// to it. The caller reads that answer while the transaction's statements run (joined with
    /// them), not after: the driver hands a request at most two pieces of its answer before it
    /// waits for them to be read, holding up every answer behind it, and the `BEGIN` of a
    /// transaction with characteristics can answer in three.
    pub(crate) fn begin(
        conn: &'a ClientWrapper,
        isolation: IsolationLevel,
        read_only: bool,
    ) -> (Self, Begun<'a>) {
        let mut begun: Begun<'a> = Box::pin(conn.batch_execute(begin_sql(isolation, read_only)));
        // The driver sends a request when its future is first polled: one poll here, and the
        // `BEGIN` is on its way before any statement of the transaction.
        if let Poll::Ready(answer) = begun.as_mut().poll(&mut Context::from_waker(
            futures_util::task::noop_waker_ref(),
        )) {
            // Not sent at all (the connection is closed).
            begun = Box::pin(std::future::ready(answer));
        }
        let tx = Self {
            conn,
            settled: false,
        };
        (tx, begun)
    }

    /// Commits, or fails with [`Error::Aborted`] when a statement of the transaction had
    /// failed unseen.
    ///
    /// PostgreSQL answers the `COMMIT` of a transaction that an error aborted with a rollback,
    /// not an error, and the driver does not tell the two apart: a closure that dropped a
    /// statement's error would be reported committed with nothing committed. So an empty
    /// `SELECT` goes first, in the same message as the `COMMIT`: in an aborted transaction it
    /// fails with 25P02, and the server skips the rest of the message. One message rather
    /// than two pipelined ones: the same round trip, less work on both ends per transaction.
    pub(crate) async fn commit(mut self) -> Result<(), Error> {
        use tokio_postgres::error::SqlState;
        self.settled = true;
        let Err(e) = self.conn.batch_execute("SELECT; COMMIT").await else {
            return Ok(());
        };
        // The check failed, or was cancelled: the `COMMIT` was skipped and the transaction is
        // still open, so end it. A `COMMIT` that failed (a deferred constraint, a
        // serialization failure) has ended it already.
        let open = [
            &SqlState::IN_FAILED_SQL_TRANSACTION,
            &SqlState::QUERY_CANCELED,
        ];
        if e.code().is_some_and(|code| open.contains(&code)) {
            let _ = self.conn.batch_execute("ROLLBACK").await;
        }
        Err(match e.code() {
            Some(&SqlState::IN_FAILED_SQL_TRANSACTION) => Error::Aborted(e),
            _ => Error::from(e),
        })
    }

    /// Rolls back. A failure means the connection broke; the pool then discards it.
    pub(crate) async fn rollback(mut self) -> Result<(), tokio_postgres::Error> {
        self.settled = true;
        self.conn.batch_execute("ROLLBACK").await
    }

    /// Sets a savepoint named `name` (quoted as an identifier): statements run through the
    /// [`Savepoint`] are undone alone by its [`rollback`](Savepoint::rollback), or when it is
    /// dropped without [`release`](Savepoint::release), and the transaction goes on. Use it for a
    /// statement that may fail (a unique violation you expect) without aborting the transaction.
    pub async fn savepoint(&mut self, name: &str) -> Result<Savepoint<'_>, tokio_postgres::Error> {
        let name = format!("\"{}\"", name.replace('"', "\"\""));
        self.conn
            .batch_execute(&format!("SAVEPOINT {name}"))
            .await?;
        Ok(Savepoint {
            conn: self.conn,
            name,
            settled: false,
        })
    }

    /// The driver's client the transaction runs on, for functions that take the driver's
    /// `&impl GenericClient` or `&Client`: its statements are the transaction's.
    pub fn client(&self) -> &'a tokio_postgres::Client {
        self.conn
    }

    /// Runs a statement that returns no rows (`INSERT`, `UPDATE`, `DELETE`, DDL) and returns
    /// how many rows it changed, as the driver's `execute` does, but with SQL text prepared
    /// once per pooled connection: later calls with the same text, in this transaction or a
    /// later one on the same connection, send only its parameters (one round trip instead of
    /// two). See [`Execute`] for what is kept and what is not.
    pub async fn execute(
        &self,
        statement: &(impl Execute + ?Sized),
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, tokio_postgres::Error> {
        execute(self.conn, statement, params).await
    }

    /// The pooled client, for svcdb's own statements.
    pub(crate) fn pooled_client(&self) -> &'a ClientWrapper {
        self.conn
    }
}

impl Deref for Transaction<'_> {
    type Target = ClientWrapper;

    fn deref(&self) -> &ClientWrapper {
        self.conn
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if !self.settled {
            // Sent, not waited for, as the driver's own transactions do when dropped.
            let _ = self.conn.batch_execute("ROLLBACK").now_or_never();
        }
    }
}

impl std::fmt::Debug for Transaction<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transaction").finish_non_exhaustive()
    }
}

/// A savepoint of a [`Transaction`], from [`Transaction::savepoint`]: it dereferences to the
/// pooled client, as the transaction does. Dropped without [`release`](Self::release) or
/// [`rollback`](Self::rollback), it rolls back to itself.
pub struct Savepoint<'a> {
    conn: &'a ClientWrapper,
    name: String,
    settled: bool,
}

impl Savepoint<'_> {
    /// Keeps what ran since the savepoint (`RELEASE SAVEPOINT`), as part of the transaction.
    pub async fn release(mut self) -> Result<(), tokio_postgres::Error> {
        self.settled = true;
        self.conn
            .batch_execute(&format!("RELEASE SAVEPOINT {}", self.name))
            .await
    }

    /// Undoes what ran since the savepoint (`ROLLBACK TO SAVEPOINT`); the transaction goes on,
    /// also when a statement's error had aborted it.
    pub async fn rollback(mut self) -> Result<(), tokio_postgres::Error> {
        self.settled = true;
        self.conn
            .batch_execute(&format!("ROLLBACK TO SAVEPOINT {}", self.name))
            .await
    }

    /// [`Transaction::execute`], inside the savepoint.
    pub async fn execute(
        &self,
        statement: &(impl Execute + ?Sized),
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, tokio_postgres::Error> {
        execute(self.conn, statement, params).await
    }

    /// The pooled client, for svcdb's own statements.
    pub(crate) fn pooled_client(&self) -> &ClientWrapper {
        self.conn
    }
}

/// What [`Transaction::execute`] and [`Savepoint::execute`] run: SQL text (`&str`,
/// `&String`), or a [`Statement`] you prepared.
///
/// SQL text is prepared once per pooled connection and kept in the connection's statement
/// cache (the one `prepare_cached` fills), unless
///
/// * the statement returns rows (`SELECT`, `… RETURNING`): PostgreSQL fails a kept statement
///   whose rows change shape, as `SELECT *` or `RETURNING *` do once a migration adds a
///   column (0A000, "cached plan must not change result type"), which would fail the old
///   release's replicas in the middle of a rolling deploy. Such text is prepared for the call
///   only, as the driver's `execute` does;
/// * the connection already keeps [`MAX_CACHED_STATEMENTS`]: SQL built with values inlined
///   would otherwise keep a prepared statement on the server for every value.
///
/// A statement that returns no rows is planned again by PostgreSQL when a table it uses
/// changes, so a kept `INSERT` goes on working across a migration.
pub trait Execute: Sync + sealed::Sealed {
    /// The SQL text, or the prepared statement.
    #[doc(hidden)]
    fn sql_or_statement(&self) -> Result<&str, &Statement>;
}

impl Execute for str {
    fn sql_or_statement(&self) -> Result<&str, &Statement> {
        Ok(self)
    }
}

impl Execute for String {
    fn sql_or_statement(&self) -> Result<&str, &Statement> {
        Ok(self)
    }
}

impl Execute for Statement {
    fn sql_or_statement(&self) -> Result<&str, &Statement> {
        Err(self)
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for str {}
    impl Sealed for String {}
    impl Sealed for tokio_postgres::Statement {}
}

/// The most SQL texts [`Transaction::execute`] keeps prepared on one pooled connection (its
/// own and `prepare_cached`'s together); past it, new texts are prepared for the call only.
pub const MAX_CACHED_STATEMENTS: usize = 256;

/// [`Transaction::execute`] on `conn`.
async fn execute(
    conn: &ClientWrapper,
    statement: &(impl Execute + ?Sized),
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64, tokio_postgres::Error> {
    let sql = match statement.sql_or_statement() {
        Ok(sql) => sql,
        Err(prepared) => return conn.execute(prepared, params).await,
    };
    let cached_before = conn.statement_cache.size();
    let prepared = conn.prepare_cached(sql).await?;
    let cached = conn.statement_cache.size();
    if cached > cached_before && (!prepared.columns().is_empty() || cached > MAX_CACHED_STATEMENTS)
    {
        // Added by this call and not to be kept: out of the cache, and closed on the server
        // once `prepared` is dropped (the driver sends the `Close` then, unawaited).
        conn.statement_cache.remove(sql, &[]);
    }
    conn.execute(&prepared, params).await
}

impl Deref for Savepoint<'_> {
    type Target = ClientWrapper;

    fn deref(&self) -> &ClientWrapper {
        self.conn
    }
}

impl Drop for Savepoint<'_> {
    fn drop(&mut self) {
        if !self.settled {
            let rollback = format!("ROLLBACK TO SAVEPOINT {}", self.name);
            let _ = self.conn.batch_execute(&rollback).now_or_never();
        }
    }
}

impl std::fmt::Debug for Savepoint<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Savepoint")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The message that starts a transaction with these characteristics: `BEGIN`, then the
/// characteristics in a `SET TRANSACTION` of their own. The statements after it do not wait
/// for its answer, so where it can fail it must fail inside the transaction block: a
/// `SET TRANSACTION` that fails (`SERIALIZABLE` on a hot standby, 0A000) aborts the block, and
/// the statements after it fail (25P02) instead of running on their own, as they would after a
/// failed `BEGIN ISOLATION LEVEL SERIALIZABLE`.
///
/// Never an explicit `READ WRITE`: on a hot standby it fails at once with 0A000 ("cannot set
/// transaction read-write mode during recovery"), which says nothing of an outage, and on a
/// primary fenced with `default_transaction_read_only` it would write through the fence. Left
/// unsaid, the first write fails with 25006, a database-unavailable error, until connections
/// reach the new primary.
fn begin_sql(isolation: IsolationLevel, read_only: bool) -> &'static str {
    use tokio_postgres::IsolationLevel::{
        ReadCommitted, ReadUncommitted, RepeatableRead, Serializable,
    };
    match (isolation, read_only) {
        (ReadCommitted, false) => "BEGIN",
        (ReadCommitted, true) => "BEGIN; SET TRANSACTION READ ONLY",
        (RepeatableRead, false) => "BEGIN; SET TRANSACTION ISOLATION LEVEL REPEATABLE READ",
        (RepeatableRead, true) => {
            "BEGIN; SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"
        }
        (Serializable, false) => "BEGIN; SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        (Serializable, true) => "BEGIN; SET TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY",
        (ReadUncommitted, false) => "BEGIN; SET TRANSACTION ISOLATION LEVEL READ UNCOMMITTED",
        (ReadUncommitted, true) => {
            "BEGIN; SET TRANSACTION ISOLATION LEVEL READ UNCOMMITTED, READ ONLY"
        }
        // The driver's enum is non-exhaustive: a level it adds is the server's default here
        // until svcdb names it.
        (_, false) => "BEGIN",
        (_, true) => "BEGIN; SET TRANSACTION READ ONLY",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn begin_statements_name_the_level_and_never_read_write() {
        assert_eq!(begin_sql(IsolationLevel::ReadCommitted, false), "BEGIN");
        assert_eq!(
            begin_sql(IsolationLevel::Serializable, true),
            "BEGIN; SET TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY"
        );
        for level in [
            IsolationLevel::ReadUncommitted,
            IsolationLevel::ReadCommitted,
            IsolationLevel::RepeatableRead,
            IsolationLevel::Serializable,
        ] {
            for read_only in [false, true] {
                assert!(!begin_sql(level, read_only).contains("WRITE"));
            }
        }
    }
}
