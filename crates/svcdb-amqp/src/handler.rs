//! What a consumer runs for each event: an [`EventHandler`] (a type with an `async fn`) or a
//! closure returning a boxed future, and the [`HandlerError`] either returns.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;

use svcdb::tokio_postgres::Error as PgError;
use svcdb::{Envelope, Retryable, Transaction};

/// The future a closure handler returns: boxed, `Send` (consumers run handlers on spawned
/// tasks), and borrowing the transaction and the event for `'a`.
pub type HandlerFuture<'a> = Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send + 'a>>;

/// Handles one kind of event inside the consumer's transaction.
///
/// Write the method as `async fn handle(&self, tx, event) -> Result<(), HandlerError>`; its
/// future must be `Send`, which it is unless it holds something like an `Rc` across an
/// `.await`. For a handler without state, a closure does the same
/// ([`Consumer::on`](crate::Consumer::on)).
///
/// A handler gets the transaction that also records the event's claim
/// ([`ServiceDb::process_once_with`](svcdb::ServiceDb::process_once_with)): its writes commit
/// together with the claim, or not at all. It may enqueue follow-up events in the same
/// transaction with [`svcdb::outbox::enqueue`].
///
/// ```no_run
/// use svcdb::{Envelope, Transaction};
/// use svcdb_amqp::{EventHandler, HandlerError};
///
/// /// A handler with state: the future may borrow `self`.
/// struct ReserveStock {
///     warehouse: String,
/// }
///
/// impl EventHandler for ReserveStock {
///     async fn handle(&self, tx: &mut Transaction<'_>, event: &Envelope) -> Result<(), HandlerError> {
///         #[derive(serde::Deserialize)]
///         struct Reserved { product_id: String, quantity: i32 }
///         let reserved: Reserved = event.payload_as()?; // a bad payload is dead-lettered at once
///         tx.execute(
///             "UPDATE stock SET reserved = reserved + $1 WHERE product_id = $2 AND warehouse = $3",
///             &[&reserved.quantity, &reserved.product_id, &self.warehouse],
///         )
///         .await?;
///         Ok(())
///     }
/// }
/// ```
pub trait EventHandler: Send + Sync + 'static {
    /// Applies `event`'s business effect with `tx`. `Ok` commits it (with the claim, so a
    /// redelivery is a duplicate); `Err` rolls it back and the message is retried or
    /// dead-lettered (see [`HandlerError`]).
    fn handle(
        &self,
        tx: &mut Transaction<'_>,
        event: &Envelope,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// A closure handler, as taken by [`Consumer::on`](crate::Consumer::on).
pub(crate) struct FnHandler<F>(pub(crate) F);

impl<F> EventHandler for FnHandler<F>
where
    F: for<'a, 't> Fn(&'a mut Transaction<'t>, &'a Envelope) -> HandlerFuture<'a>
        + Send
        + Sync
        + 'static,
{
    async fn handle(&self, tx: &mut Transaction<'_>, event: &Envelope) -> Result<(), HandlerError> {
        (self.0)(tx, event).await
    }
}

/// [`EventHandler`] behind a pointer: the consumer keeps handlers of different types in one
/// map, so their futures are boxed here, once per call.
pub(crate) trait DynHandler: Send + Sync {
    fn call<'a>(&'a self, tx: &'a mut Transaction<'_>, event: &'a Envelope) -> HandlerFuture<'a>;
}

impl<H: EventHandler> DynHandler for H {
    fn call<'a>(&'a self, tx: &'a mut Transaction<'_>, event: &'a Envelope) -> HandlerFuture<'a> {
        Box::pin(self.handle(tx, event))
    }
}

/// Why a handler failed. Any error converts into it with `?`.
///
/// What the consumer does with it (after the transaction rolled back):
///
/// * **Permanent** ([`HandlerError::permanent`], or an [`svcdb::EventError`] such as a payload
///   of the wrong shape): retrying cannot help, so the message is dead-lettered at once.
/// * **Database unavailable** ([`HandlerError::is_database_unavailable`]: no connection, a
///   terminated backend, a read-only primary after a failover, …): the event is not at fault,
///   so the message is handed back without spending one of the queue's deliveries and the
///   consumer pauses until the database answers again; a failover does not dead-letter the
///   backlog.
/// * **Anything else**: the message is returned as failed after a pause and redelivered, up
///   to the queue's [`max_deliveries`](crate::topology::QueueSpec::max_deliveries); the last
///   failure is dead-lettered with this error's text.
///
/// Serialization failures and deadlocks never get here: the transaction is retried first
/// ([`ConsumerOptions::tx`](crate::ConsumerOptions::tx)).
pub struct HandlerError {
    /// The error as returned or converted.
    inner: Box<dyn StdError + Send + Sync + 'static>,
    /// Set by [`HandlerError::permanent`]: dead-letter without retrying.
    permanent: bool,
}

impl HandlerError {
    /// An error with this message.
    pub fn msg(message: impl fmt::Display) -> Self {
        Self {
            inner: message.to_string().into(),
            permanent: false,
        }
    }

    /// An error that retrying cannot fix (the event refers to something that will never
    /// exist, a business rule refuses it for good): the message is dead-lettered at once.
    pub fn permanent(error: impl Into<HandlerError>) -> Self {
        Self {
            permanent: true,
            ..error.into()
        }
    }

    /// True when the message should go to the dead-letter queue without further attempts.
    pub fn is_permanent(&self) -> bool {
        self.permanent || self.inner.downcast_ref::<svcdb::EventError>().is_some()
    }

    /// True when the database, not the event, is at fault: no connection, a backend
    /// terminated mid-statement, a primary that turned read-only after a failover, too many
    /// connections ([`svcdb::Error::is_database_unavailable`] lists them). The error may be
    /// returned as is, or wrapped: every error in its source chain is looked at. The consumer
    /// hands the message back without spending a delivery and pauses until the database
    /// answers again.
    pub fn is_database_unavailable(&self) -> bool {
        let mut next: Option<&(dyn StdError + 'static)> = Some(&*self.inner);
        while let Some(e) = next {
            // svcdb's errors keep the driver's error out of their `source()` (svcdb::error's
            // rule), so each is asked, including one inside this crate's transparent `Db`.
            if let Some(e) = e.downcast_ref::<svcdb::Error>() {
                if e.is_database_unavailable() {
                    return true;
                }
            } else if let Some(crate::Error::Db(e)) = e.downcast_ref::<crate::Error>() {
                if e.is_database_unavailable() {
                    return true;
                }
            } else if let Some(e) = e.downcast_ref::<PgError>() {
                if svcdb::error::is_database_unavailable(e) {
                    return true;
                }
            }
            next = e.source();
        }
        false
    }

    /// The error as returned, for downcasting.
    pub fn get_ref(&self) -> &(dyn StdError + Send + Sync + 'static) {
        &*self.inner
    }
}

impl<E: StdError + Send + Sync + 'static> From<E> for HandlerError {
    fn from(error: E) -> Self {
        Self {
            inner: Box::new(error),
            permanent: false,
        }
    }
}

impl fmt::Display for HandlerError {
    /// The error and its causes as [`svcdb::error::Report`] renders them: each message once,
    /// then the hints.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner: &(dyn StdError + 'static) = &*self.inner;
        svcdb::error::Report::new(inner).fmt(f)
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("inner", &self.inner)
            .field("permanent", &self.permanent)
            .finish()
    }
}

impl Retryable for HandlerError {
    /// Serialization failures and deadlocks, from svcdb or the driver.
    fn is_retryable(&self) -> bool {
        if let Some(e) = self.inner.downcast_ref::<svcdb::Error>() {
            return e.is_retryable();
        }
        self.inner
            .downcast_ref::<PgError>()
            .is_some_and(Retryable::is_retryable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_errors() {
        let plain = HandlerError::msg("stock table is locked");
        assert!(!plain.is_permanent() && !plain.is_database_unavailable() && !plain.is_retryable());
        assert_eq!(plain.to_string(), "stock table is locked");

        let permanent = HandlerError::permanent(HandlerError::msg("unknown product"));
        assert!(permanent.is_permanent());

        let payload: HandlerError = svcdb::EventError::MissingField { field: "payload" }.into();
        assert!(payload.is_permanent());

        let pool: HandlerError = svcdb::Error::PoolClosed.into();
        assert!(pool.is_database_unavailable() && !pool.is_permanent());

        // Wrapped: found in the source chain.
        #[derive(Debug, thiserror::Error)]
        #[error("reserving stock")]
        struct Wrapped(#[source] svcdb::Error);
        let wrapped: HandlerError = Wrapped(svcdb::Error::PoolClosed).into();
        assert!(wrapped.is_database_unavailable());
    }
}
