//! The transactions svcdb's own statements run in, and how those statements reach the server:
//! prepared once per pooled connection where the transaction has a statement cache.

use std::future::Future;

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Row, Statement};

/// A transaction that svcdb's functions write in ([`outbox::enqueue`](crate::outbox::enqueue),
/// [`idempotency::claim`](crate::idempotency::claim),
/// [`idempotency::claim_batch`](crate::idempotency::claim_batch)):
///
/// * svcdb's [`Transaction`](crate::Transaction), from [`ServiceDb::transaction`](crate::ServiceDb::transaction),
///   or one of its [`Savepoint`](crate::Savepoint)s, or the driver's transaction on a pooled
///   connection (`conn.transaction()`): svcdb's statements are prepared once per connection
///   and reused, so the server parses and plans them once, not on every call (an outbox row
///   per business transaction is a hot path);
/// * a plain [`tokio_postgres::Transaction`] (on a [`DedicatedConn`](crate::DedicatedConn) or
///   a connection of your own): each statement is sent with its text, in one round trip, and
///   parsed and planned every time.
///
/// Sealed: implemented for these only.
pub trait AnyTransaction: sealed::Sealed + Sync {
    /// The driver's client the transaction runs on.
    #[doc(hidden)]
    fn pg_client(&self) -> &tokio_postgres::Client;

    /// `sql` prepared with parameter `types` on this transaction's connection, from its
    /// statement cache; `None` without one.
    #[doc(hidden)]
    fn cached(
        &self,
        sql: &str,
        types: &[Type],
    ) -> impl Future<Output = Result<Option<Statement>, tokio_postgres::Error>> + Send;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for tokio_postgres::Transaction<'_> {}
    impl Sealed for deadpool_postgres::Transaction<'_> {}
    impl Sealed for crate::Transaction<'_> {}
    impl Sealed for crate::Savepoint<'_> {}
}

impl AnyTransaction for tokio_postgres::Transaction<'_> {
    fn pg_client(&self) -> &tokio_postgres::Client {
        self.client()
    }

    async fn cached(
        &self,
        _sql: &str,
        _types: &[Type],
    ) -> Result<Option<Statement>, tokio_postgres::Error> {
        Ok(None)
    }
}

impl AnyTransaction for deadpool_postgres::Transaction<'_> {
    fn pg_client(&self) -> &tokio_postgres::Client {
        self.client()
    }

    async fn cached(
        &self,
        sql: &str,
        types: &[Type],
    ) -> Result<Option<Statement>, tokio_postgres::Error> {
        self.prepare_typed_cached(sql, types).await.map(Some)
    }
}

/// svcdb's own transaction and its savepoints: on a pooled client, with its statement cache.
macro_rules! on_pooled_client {
    ($($ty:ty),*) => {$(
        impl AnyTransaction for $ty {
            fn pg_client(&self) -> &tokio_postgres::Client {
                self.pooled_client()
            }

            async fn cached(
                &self,
                sql: &str,
                types: &[Type],
            ) -> Result<Option<Statement>, tokio_postgres::Error> {
                self.pooled_client().prepare_typed_cached(sql, types).await.map(Some)
            }
        }
    )*};
}

on_pooled_client!(crate::Transaction<'_>, crate::Savepoint<'_>);

/// Runs `sql` with its typed parameters on `tx`: bind and execute of the cached statement
/// where `tx` has a cache (its first use on a connection also prepares it), else parse, bind
/// and execute in one round trip.
pub(crate) async fn query(
    tx: &impl AnyTransaction,
    sql: &str,
    params: &[(&(dyn ToSql + Sync), Type)],
) -> Result<Vec<Row>, tokio_postgres::Error> {
    match cached(tx, sql, params).await? {
        Some(statement) => tx.pg_client().query(&statement, &values(params)).await,
        None => tx.pg_client().query_typed(sql, params).await,
    }
}

/// [`query`] for a statement that returns no rows: the rows it changed.
pub(crate) async fn execute(
    tx: &impl AnyTransaction,
    sql: &str,
    params: &[(&(dyn ToSql + Sync), Type)],
) -> Result<u64, tokio_postgres::Error> {
    match cached(tx, sql, params).await? {
        Some(statement) => tx.pg_client().execute(&statement, &values(params)).await,
        None => tx.pg_client().execute_typed(sql, params).await,
    }
}

/// `sql` prepared for the types of `params`, from `tx`'s statement cache; `None` without one.
async fn cached(
    tx: &impl AnyTransaction,
    sql: &str,
    params: &[(&(dyn ToSql + Sync), Type)],
) -> Result<Option<Statement>, tokio_postgres::Error> {
    let types: Vec<Type> = params.iter().map(|(_, t)| t.clone()).collect();
    tx.cached(sql, &types).await
}

fn values<'p>(params: &[(&'p (dyn ToSql + Sync), Type)]) -> Vec<&'p (dyn ToSql + Sync)> {
    params.iter().map(|(value, _)| *value).collect()
}
