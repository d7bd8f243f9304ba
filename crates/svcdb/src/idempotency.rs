//! Handling each event once although RabbitMQ delivers it at least once.
//!
//! A message can arrive twice: the broker redelivers when the consumer's acknowledgement was
//! lost (network timeout, consumer restart), and a producer's outbox may publish twice. Without
//! a record of what was handled, the design notes' `ProductStockReserved` event (abc123,
//! quantity 5) delivered twice reserves 10 units.
//!
//! The record is a row in `svcdb_processed_events`, in the service's own schema, keyed by
//! (consumer, event id), and the point is *where* it is written: in the same transaction as the
//! handler's business writes. Either both commit, and a redelivery finds the row and skips the
//! work, or neither does (an error, a panic, a crash before commit), and a redelivery does the
//! work as if for the first time. A claim made in one transaction and business writes in
//! another would lose one or the other whenever the process dies between them.
//!
//! ```no_run
//! use svcdb::event::Envelope;
//! use svcdb::idempotency::Processed;
//!
//! # async fn demo(db: svcdb::ServiceDb, event: Envelope) -> Result<(), svcdb::Error> {
//! db.install_idempotency().await?; // at start-up; or PROCESSED_EVENTS_SQL in a migration
//!
//! let outcome = db
//!     .process_once("catalog.reserve-stock", &event, async |tx| {
//!         tx.execute("UPDATE products SET stock = stock - 5 WHERE id = 'abc123'", &[]).await?;
//!         Ok::<_, svcdb::Error>(())
//!     })
//!     .await?;
//! match outcome {
//!     Processed::Done(()) => {}   // the stock moved; acknowledge the message
//!     Processed::Duplicate => {}  // handled before; acknowledge it, changing nothing
//! }
//! # Ok(()) }
//! ```
//!
//! On an `Err` (or a panic) nothing was recorded: leave the message for redelivery (reject
//! with requeue), and it is handled again from scratch.
//!
//! # What a claim covers
//!
//! * **Scope.** The consumer name scopes claims: two handlers in one service that both react
//!   to an event (`"orders.reserve-stock"`, `"orders.send-receipt"`) each handle it once. Use a
//!   stable name per handler; renaming one makes every event new to it.
//! * **Concurrent duplicates.** Two deliveries of one event handled at once (two replicas, a
//!   redelivery while the first is still running): the second claim waits on the first's
//!   uncommitted row; if the first commits, the second is a [`Processed::Duplicate`]; if it
//!   rolls back, the second handles the event.
//! * **Only the database.** The claim makes the handler's *database* writes happen once. An
//!   HTTP call or an email sent from inside the handler happens again on a retry; publish
//!   follow-up events through the [outbox](crate::outbox) in the same transaction instead.
//! * **Retention.** Claims are kept until [`ServiceDb::purge_processed`] deletes them; an event
//!   redelivered after its claim was purged is handled again. Keep claims well beyond the
//!   longest a message can spend in a queue (retries, dead-letter replays).

use std::time::Duration;

use futures_util::FutureExt;
use tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;

use crate::any_tx::AnyTransaction;
use crate::error::{Error, Result};
use crate::event::Envelope;
use crate::ident::IdentError;
use crate::pool::ServiceDb;
use crate::transaction::Transaction;
use crate::tx::{Retryable, TxOptions};

/// The claims table's name, in the service schema.
pub const PROCESSED_EVENTS_TABLE: &str = "svcdb_processed_events";

/// The claims table, for [`ServiceDb::install_idempotency`] or a team's own migration.
/// Names are unqualified: it creates the table in the first schema of the `search_path`,
/// which svcdb pins to the service schema.
///
/// `kind` is informational (what was handled) and `NULL` when the caller gave only an id; the
/// index on `processed_at` keeps [`ServiceDb::purge_processed`] from scanning the table.
pub const PROCESSED_EVENTS_SQL: &str = "\
CREATE TABLE IF NOT EXISTS svcdb_processed_events (
    consumer     text        NOT NULL,
    event_id     uuid        NOT NULL,
    kind         text,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
CREATE INDEX IF NOT EXISTS svcdb_processed_events_processed_at_idx
    ON svcdb_processed_events (processed_at);
";

/// The longest consumer name accepted, in bytes.
pub const MAX_CONSUMER_BYTES: usize = 128;

/// What [`ServiceDb::process_once`] did with an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Processed<T> {
    /// First delivery: the handler ran and its writes committed with the claim.
    Done(T),
    /// Already handled by this consumer (or being handled and since committed): the handler
    /// did not run. Acknowledge the message.
    Duplicate,
}

impl<T> Processed<T> {
    /// True for [`Processed::Duplicate`].
    pub fn is_duplicate(&self) -> bool {
        matches!(self, Processed::Duplicate)
    }

    /// The handler's value, `None` for a duplicate.
    pub fn done(self) -> Option<T> {
        match self {
            Processed::Done(value) => Some(value),
            Processed::Duplicate => None,
        }
    }
}

/// The event a claim is for: its id and, when known, its kind (stored for people reading the
/// table). Made from a [`Uuid`] or an [`&Envelope`](Envelope).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventRef<'a> {
    /// The event's id, the idempotency key.
    pub id: Uuid,
    /// The event's kind, if known.
    pub kind: Option<&'a str>,
}

impl From<Uuid> for EventRef<'_> {
    fn from(id: Uuid) -> Self {
        Self { id, kind: None }
    }
}

impl<'a> From<&'a Envelope> for EventRef<'a> {
    fn from(envelope: &'a Envelope) -> Self {
        Self {
            id: envelope.id,
            kind: Some(&envelope.kind),
        }
    }
}

/// Claims `event` for `consumer` inside the caller's transaction: `true` if this is the first
/// claim (go ahead, and commit the claim with the business writes), `false` if the event was
/// already handled (roll back or skip the work).
///
/// For callers that run their own transaction; [`ServiceDb::process_once`] does this for you.
/// `tx` must be the transaction of the business writes: a claim committed on its own defeats
/// the point. Waits while another transaction holds an uncommitted claim on the same event.
///
/// ```no_run
/// # async fn demo(db: svcdb::ServiceDb, event: svcdb::event::Envelope) -> Result<(), svcdb::Error> {
/// let mut conn = db.get().await?;
/// let tx = conn.transaction().await?;
/// if svcdb::idempotency::claim(&tx, "orders.reserve-stock", &event).await? {
///     tx.execute("UPDATE products SET stock = stock - 5 WHERE id = 'abc123'", &[]).await?;
///     tx.commit().await?;
/// } // else: dropped, rolled back
/// # Ok(()) }
/// ```
pub async fn claim<'e>(
    tx: &impl crate::AnyTransaction,
    consumer: &str,
    event: impl Into<EventRef<'e>>,
) -> Result<bool> {
    check_consumer(consumer)?;
    Ok(insert_claim(tx, consumer, event.into()).await?)
}

/// Claims every event of a batch for `consumer` inside `tx`, in one statement: for each
/// event, `true` if this is its first claim (handle it), `false` if it was handled before, or
/// is a second copy in `events` (the first copy claims it).
///
/// For handling many events in one transaction, each under a savepoint
/// ([`savepoint_event`]); [`ServiceDb::process_once`] does one event. Events are claimed in
/// id order, so two batches claiming the same events wait on each other instead of
/// deadlocking. Like [`claim`], waits while another transaction holds an uncommitted claim on
/// one of them.
pub async fn claim_batch(
    tx: &impl crate::AnyTransaction,
    consumer: &str,
    events: &[EventRef<'_>],
) -> Result<Vec<bool>> {
    check_consumer(consumer)?;
    let mut sorted: Vec<(Uuid, Option<&str>)> = events.iter().map(|e| (e.id, e.kind)).collect();
    sorted.sort_unstable_by_key(|(id, _)| *id);
    sorted.dedup_by_key(|(id, _)| *id);
    let (ids, kinds): (Vec<Uuid>, Vec<Option<&str>>) = sorted.into_iter().unzip();
    // ORDER BY: the rows are inserted, so their locks taken, in id order.
    let rows = crate::any_tx::query(
        tx,
        "INSERT INTO svcdb_processed_events (consumer, event_id, kind)
         SELECT $1, id, kind FROM unnest($2::uuid[], $3::text[]) AS e(id, kind) ORDER BY id
         ON CONFLICT (consumer, event_id) DO NOTHING RETURNING event_id",
        &[
            (&consumer, Type::TEXT),
            (&ids, Type::UUID_ARRAY),
            (&kinds, Type::TEXT_ARRAY),
        ],
    )
    .await?;
    let mut claimed: std::collections::HashSet<Uuid> =
        rows.iter().map(|row| row.get::<_, Uuid>(0)).collect();
    // The first copy of an event takes its claim; a later copy is a duplicate.
    Ok(events.iter().map(|e| claimed.remove(&e.id)).collect())
}

/// Sets the savepoint before the work of the event `id` of a batch, without waiting for the
/// server's answer: the `SAVEPOINT` travels with the work's first statement, sparing a round
/// trip per event. A failure to set it shows as the failure of the next statement on `tx`
/// (the transaction is then aborted): the transactions of [`ServiceDb`] then fail their
/// commit ([`Error::Aborted`]); on a transaction of your own, end the
/// batch with [`check_batch`].
///
/// Each event's savepoint has a name of its own (its id): when a statement failed unseen
/// before it (an earlier event's handler dropped an error, leaving the transaction aborted),
/// this `SAVEPOINT` fails too, and [`undo_event`] for it then fails instead of rolling back to
/// an earlier event's savepoint, which would undo that event's work and keep its claim (found
/// by a user trial: an event's effect lost, its claim committed). The batch then fails whole.
///
/// A savepoint that writes is a subtransaction of `tx`; beyond 64 in one transaction
/// PostgreSQL's per-backend subtransaction cache overflows and other sessions' snapshots get
/// slower, so keep batches below that.
pub fn savepoint_event(tx: &impl AnyTransaction, id: Uuid) {
    // The driver sends a request when its future is first polled and reads the answer of one
    // whose future was dropped; polled once here, the `SAVEPOINT` is on its way.
    let _ = tx
        .pg_client()
        .batch_execute(&format!("SAVEPOINT {}", event_savepoint(id)))
        .now_or_never();
}

/// Undoes the work since [`savepoint_event`] for the event `id`, and `consumer`'s claim on
/// it: a redelivery handles it again. Earlier events' claims and work stay, and `tx` can go on
/// (also when an error aborted it). Fails when that savepoint was never set (the transaction
/// was aborted before it): the batch cannot go on.
pub async fn undo_event(tx: &impl AnyTransaction, consumer: &str, id: Uuid) -> Result<()> {
    // Sent together: one round trip.
    let rollback_to = format!("ROLLBACK TO SAVEPOINT {}", event_savepoint(id));
    let rollback = tx.pg_client().batch_execute(&rollback_to);
    let params: [(&(dyn ToSql + Sync), Type); 2] = [(&consumer, Type::TEXT), (&id, Type::UUID)];
    let unclaim = tx.pg_client().execute_typed(
        "DELETE FROM svcdb_processed_events WHERE consumer = $1 AND event_id = $2",
        &params,
    );
    futures_util::future::try_join(rollback, unclaim).await?;
    Ok(())
}

/// Fails if `tx` is aborted: PostgreSQL answers a `COMMIT` of an aborted transaction with a
/// rollback, not an error, so a batch on a transaction of your own checks before it commits
/// that no statement failed unseen (a [`savepoint_event`], a handler that swallowed an
/// error). The transactions of [`ServiceDb`] check as they commit, in the same round trip.
pub async fn check_batch(tx: &impl AnyTransaction) -> Result<()> {
    Ok(tx.pg_client().batch_execute("SELECT").await?)
}

/// The name of the savepoint [`savepoint_event`] sets for the event `id`: `svcdb_event_`
/// and the id's 32 hex digits, a valid unquoted identifier (45 bytes of the 63 allowed).
fn event_savepoint(id: Uuid) -> String {
    format!("svcdb_event_{}", id.simple())
}

/// The claim itself, on a validated consumer name.
async fn insert_claim(
    tx: &impl crate::AnyTransaction,
    consumer: &str,
    event: EventRef<'_>,
) -> Result<bool, tokio_postgres::Error> {
    // One round trip (bind and execute of the cached statement, or parse too without a
    // cache). RETURNING tells an inserted row from a conflict without a second statement.
    let rows = crate::any_tx::query(
        tx,
        "INSERT INTO svcdb_processed_events (consumer, event_id, kind) VALUES ($1, $2, $3)
         ON CONFLICT (consumer, event_id) DO NOTHING RETURNING true",
        &[
            (&consumer, Type::TEXT),
            (&event.id, Type::UUID),
            (&event.kind, Type::TEXT),
        ],
    )
    .await?;
    Ok(!rows.is_empty())
}

/// A claim's values, owned. The closures that [`ServiceDb::process_once`] hands to the
/// transaction helpers capture this rather than the caller's `&str`s: a closure capturing
/// borrows makes the returned future lose `Send` (rustc's higher-ranked auto-trait limits),
/// and a consumer loop must be able to spawn it.
struct OwnedClaim {
    consumer: String,
    id: Uuid,
    kind: Option<String>,
}

impl OwnedClaim {
    fn new(consumer: &str, event: EventRef<'_>) -> Self {
        Self {
            consumer: consumer.to_owned(),
            id: event.id,
            kind: event.kind.map(str::to_owned),
        }
    }

    async fn insert(&self, tx: &impl crate::AnyTransaction) -> Result<bool, tokio_postgres::Error> {
        let event = EventRef {
            id: self.id,
            kind: self.kind.as_deref(),
        };
        insert_claim(tx, &self.consumer, event).await
    }
}

/// Consumer names are data (bind parameters, never SQL text), so any printable name works;
/// the bounds keep them meaningful in the table and in logs.
fn check_consumer(name: &str) -> Result<(), IdentError> {
    let refuse = |reason: String| IdentError {
        what: "consumer",
        shown: format!("{name:?}"),
        reason,
    };
    if name.trim().is_empty() {
        return Err(refuse(
            "the name is empty; name the handler, such as \"orders.reserve-stock\"".into(),
        ));
    }
    if name.len() > MAX_CONSUMER_BYTES {
        return Err(refuse(format!(
            "it is {} bytes long; consumer names hold at most {MAX_CONSUMER_BYTES}",
            name.len()
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(refuse(
            "control characters are not allowed; use letters, digits and punctuation".into(),
        ));
    }
    Ok(())
}

impl ServiceDb {
    /// Runs `f` once per (`consumer`, event): in one transaction, claims the event and, if it
    /// was not handled before, runs `f` on that transaction and commits both.
    ///
    /// * First delivery: [`Processed::Done`] with `f`'s value.
    /// * Already handled: [`Processed::Duplicate`]; `f` does not run and nothing is written.
    /// * `f` returns `Err` or panics (or the future is dropped): everything rolls back, the
    ///   claim included, so a redelivery handles the event again; the error is returned as is.
    ///
    /// `event` is an [`&Envelope`](Envelope) (its kind is recorded too) or a bare [`Uuid`].
    /// For retries of serialization failures and deadlocks, use
    /// [`ServiceDb::process_once_with`].
    pub async fn process_once<'e, T, E>(
        &self,
        consumer: &str,
        event: impl Into<EventRef<'e>>,
        f: impl AsyncFnOnce(&mut Transaction<'_>) -> Result<T, E>,
    ) -> Result<Processed<T>, E>
    where
        E: From<Error>,
    {
        check_consumer(consumer).map_err(Error::from)?;
        let claim = OwnedClaim::new(consumer, event.into());
        self.transaction(async move |tx| {
            if !claim.insert(tx).await.map_err(Error::from)? {
                return Ok(Processed::Duplicate);
            }
            f(tx).await.map(Processed::Done)
        })
        .await
    }

    /// Like [`ServiceDb::process_once`], in a transaction run by
    /// [`ServiceDb::transaction_with`]: with `options`' isolation level, and claiming and
    /// running `f` again on a fresh transaction when it fails with a serialization failure or
    /// deadlock. Under `REPEATABLE READ` and `SERIALIZABLE`, a duplicate delivery that raced
    /// the first one fails with a serialization failure and is retried into a
    /// [`Processed::Duplicate`].
    ///
    /// Inside a spawned task (a consumer loop), write the closure as `async move |tx| …` with
    /// owned captures, as for [`ServiceDb::transaction_with`]:
    ///
    /// ```no_run
    /// # async fn demo(db: svcdb::ServiceDb, event: svcdb::event::Envelope) {
    /// use svcdb::TxOptions;
    /// tokio::spawn(async move {
    ///     let quantity: i32 = event.payload["quantity"].as_i64().unwrap_or(0) as i32;
    ///     db.process_once_with(&TxOptions::serializable(), "catalog.reserve-stock", &event, async move |tx| {
    ///         tx.execute("UPDATE products SET stock = stock - $1 WHERE id = 'abc123'", &[&quantity]).await?;
    ///         Ok::<_, svcdb::Error>(())
    ///     })
    ///     .await
    /// });
    /// # }
    /// ```
    pub async fn process_once_with<'e, T, E>(
        &self,
        options: &TxOptions,
        consumer: &str,
        event: impl Into<EventRef<'e>>,
        mut f: impl AsyncFnMut(&mut Transaction<'_>) -> Result<T, E>,
    ) -> Result<Processed<T>, E>
    where
        E: From<Error> + Retryable,
    {
        check_consumer(consumer).map_err(Error::from)?;
        let claim = OwnedClaim::new(consumer, event.into());
        self.transaction_with(options, async move |tx| {
            if !claim.insert(tx).await.map_err(Error::from)? {
                return Ok(Processed::Duplicate);
            }
            f(tx).await.map(Processed::Done)
        })
        .await
    }

    /// True when `consumer` has a committed claim on `event_id`. For diagnostics and tests;
    /// a handler must not check first and claim later (a duplicate can slip in between): use
    /// [`ServiceDb::process_once`] or [`claim`].
    pub async fn is_processed(&self, consumer: &str, event_id: Uuid) -> Result<bool> {
        check_consumer(consumer)?;
        let conn = self.get().await?;
        let rows = conn
            .query_typed(
                "SELECT FROM svcdb_processed_events WHERE consumer = $1 AND event_id = $2",
                &[(&consumer, Type::TEXT), (&event_id, Type::UUID)],
            )
            .await?;
        Ok(!rows.is_empty())
    }

    /// Deletes claims recorded more than `older_than` ago (by the database's clock), for every
    /// consumer, and returns how many. An event redelivered after its claim is gone is handled
    /// again, so keep claims far longer than a message can wait in a queue (days, not
    /// minutes). The consumer runtime of svcdb-amqp runs this on a schedule (its `Retention`).
    ///
    /// Deletes in batches of [`PURGE_BATCH_ROWS`], each its own short transaction that skips
    /// locked rows, so a purge of millions of rows never holds a long lock or a long
    /// transaction (which would hold back vacuum) and handlers keep claiming meanwhile.
    pub async fn purge_processed(&self, older_than: Duration) -> Result<u64> {
        purge_in_batches(self, PROCESSED_EVENTS_TABLE, "processed_at", older_than).await
    }

    /// Creates `svcdb_processed_events` in the service schema if it is missing
    /// ([`PROCESSED_EVENTS_SQL`]). Idempotent, and safe when several replicas start at once.
    /// Needs `CREATE` on the schema (the service role owns it after `svcdb provision`).
    pub async fn install_idempotency(&self) -> Result<()> {
        self.install_ddl(
            PROCESSED_EVENTS_SQL,
            &[
                "svcdb_processed_events",
                "svcdb_processed_events_processed_at_idx",
            ],
        )
        .await
    }
}

/// Rows deleted per statement by [`ServiceDb::purge_processed`] and
/// [`Outbox::purge_published`](crate::Outbox::purge_published): small enough that each
/// statement takes milliseconds, large enough that a purge of a million rows is a thousand
/// round trips.
pub const PURGE_BATCH_ROWS: i64 = 1000;

/// The longest retention honoured; longer ones purge as if it were this (nothing that old
/// exists), instead of overflowing PostgreSQL's interval.
const MAX_RETENTION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Deletes the rows of `table` whose `column` is older than `older_than`, [`PURGE_BATCH_ROWS`]
/// at a time, and returns how many. The one implementation behind both purges.
///
/// Each batch is one statement in its own (autocommit) transaction, on a connection taken
/// from the pool for that statement only: between batches the purge holds no lock and no
/// connection. `FOR UPDATE SKIP LOCKED` leaves rows another transaction holds (a relay's
/// batch, a concurrent purge on another replica) for later instead of waiting on them. The
/// `ctid` lookup deletes exactly the rows the subquery locked, whatever the table's key.
pub(crate) async fn purge_in_batches(
    db: &ServiceDb,
    table: &'static str,
    column: &'static str,
    older_than: Duration,
) -> Result<u64> {
    let sql = format!(
        "DELETE FROM {table} WHERE ctid = ANY(ARRAY(
             SELECT ctid FROM {table}
              WHERE {column} < now() - make_interval(secs => $1)
              LIMIT $2 FOR UPDATE SKIP LOCKED))"
    );
    let secs = older_than.min(MAX_RETENTION).as_secs_f64();
    let mut total = 0;
    loop {
        let deleted = db
            .get()
            .await?
            .execute_typed(
                &sql,
                &[(&secs, Type::FLOAT8), (&PURGE_BATCH_ROWS, Type::INT8)],
            )
            .await?;
        total += deleted;
        if deleted < PURGE_BATCH_ROWS as u64 {
            return Ok(total);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumer_names_are_bounded_and_printable() {
        for ok in [
            "orders.reserve-stock",
            "x",
            "Reserve Stock (v2)",
            &"a".repeat(128),
        ] {
            check_consumer(ok).unwrap();
        }
        for bad in ["", "  ", "a\nb", "tab\there", &"a".repeat(129)] {
            let e = check_consumer(bad).unwrap_err();
            assert_eq!(e.what, "consumer", "{bad:?}");
        }
    }

    #[test]
    fn processed_accessors() {
        assert_eq!(Processed::Done(3).done(), Some(3));
        assert!(Processed::<()>::Duplicate.is_duplicate());
        assert!(!Processed::Done(()).is_duplicate());
    }
}
