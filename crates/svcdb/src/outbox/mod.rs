//! The transactional outbox: events are stored in the service's database in the transaction
//! of the business write, and a relay publishes them to RabbitMQ afterwards.
//!
//! Publishing straight to the broker from a handler has two failure modes: the transaction
//! commits and the publish fails (the order exists, nobody hears of it), or the publish
//! succeeds and the transaction rolls back (everybody hears of an order that does not exist).
//! [`enqueue`] writes the event as a row of `svcdb_outbox` inside the caller's transaction, so
//! the event exists if and only if the business write committed. A relay then moves rows to
//! the broker with [`Outbox::relay_batch`]:
//!
//! ```no_run
//! use svcdb::event::Envelope;
//! use svcdb::outbox::{self, Outbox};
//!
//! # async fn demo(db: svcdb::ServiceDb) -> Result<(), svcdb::Error> {
//! db.install_outbox().await?; // at start-up; or OUTBOX_SQL in a migration
//!
//! // In the request handler or event handler: the order and its event commit together.
//! db.transaction(async |tx| {
//!     tx.execute("INSERT INTO orders (id, customer) VALUES (1, 'ada')", &[]).await?;
//!     let placed = Envelope::new("OrderPlaced", "orders", serde_json::json!({ "order_id": 1 }));
//!     outbox::enqueue(tx, "orders", "order.placed", &placed).await?;
//!     Ok::<_, svcdb::Error>(())
//! })
//! .await?;
//!
//! // In the relay (one or more replicas): claim, publish, mark, in one transaction.
//! let relay = Outbox::new(db.clone());
//! let report = relay
//!     .relay_batch(100, async |messages| {
//!         // publish each message (exchange, routing_key, body()) and await the broker's
//!         // confirms; one result per message, in order
//!         messages.iter().map(|_m| Ok::<(), String>(())).collect()
//!     })
//!     .await?;
//! println!("{} published, {} to retry", report.published, report.failed);
//! # Ok(()) }
//! ```
//!
//! # Waking the relay
//!
//! A relay does not wait for its next poll to publish a committed event. When a transaction of
//! [`ServiceDb::transaction`], [`ServiceDb::transaction_with`] or
//! [`ServiceDb::process_once`](crate::ServiceDb::process_once) that called [`enqueue`] has
//! committed, svcdb
//!
//! * wakes the relays of the same outbox in this process at once ([`Wakeups`]), and
//! * sends a `NOTIFY` on the outbox's channel ([`notify_channel`]) for relays in other
//!   processes, which `LISTEN` on a connection of their own. The `NOTIFY` is debounced: at most
//!   one per outbox per [`NOTIFY_DEBOUNCE`] from each process, never one per row or per
//!   transaction (PostgreSQL serialises the commits of notifying transactions on one
//!   database-wide lock, so a `NOTIFY` per transaction would cap the commit rate). No
//!   `NOTIFY` at all while a relay of this process watches the outbox (holds its
//!   [`Wakeups`]): that relay publishes the rows, and the others would only find them claimed.
//!   If it cannot publish (no broker), the other processes' relays find the rows at their
//!   next poll.
//!
//! Polling stays the safety net: a lost notification (the `LISTEN` connection broke, the row
//! was written outside svcdb's wrappers) costs at most the relay's poll interval.
//!
//! # Guarantees
//!
//! * **At least once.** A row is marked published only after the publisher reported success
//!   for it, in the transaction that claimed it. A relay that dies after publishing and before
//!   committing leaves the row unpublished and it is published again: consumers deduplicate by
//!   the envelope id ([`ServiceDb::process_once`](crate::ServiceDb::process_once)).
//! * **No two relays publish one row at once.** Rows are claimed with
//!   `FOR UPDATE SKIP LOCKED` and stay locked while the publisher runs; other replicas take
//!   the next rows instead of waiting. Keep the publisher's work bounded (a publish timeout):
//!   the rows and a pooled connection are held until it returns.
//! * **Order.** Each batch is in id order, which for UUID v7 ids ([`Envelope::new`]) is
//!   creation order. Across replicas and retries there is no global order: a failed message is
//!   retried after later ones went out.
//! * **Retries.** A failed publish increments `attempts`, records `last_error`, and pushes
//!   `next_attempt_at` back exponentially ([`PublishRetry`]); the row is retried when it is
//!   due, indefinitely. Watch [`Outbox::pending_count`] and rows with many attempts.

use std::fmt::Display;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::FutureExt;
use serde_json::Value;
use tokio_postgres::types::Type;
use tracing::Instrument;
use uuid::Uuid;

use crate::error::Result;
use crate::event::{Envelope, EventError, MAX_ENVELOPE_BYTES};
use crate::ident::IdentError;
use crate::pool::{PooledConn, ServiceDb};

mod wake;

pub(crate) use self::wake::{committed, tracking_enqueues};
pub use self::wake::{notify_channel, Wakeups, NOTIFY_DEBOUNCE};

/// The outbox table's name, in the service schema.
pub const OUTBOX_TABLE: &str = "svcdb_outbox";

/// The outbox table, for [`ServiceDb::install_outbox`] or a team's own migration. Names are
/// unqualified: it creates the table in the first schema of the `search_path`, which svcdb
/// pins to the service schema.
///
/// `id` is the envelope's id. The first partial index holds only unpublished rows, so the
/// relay's claim stays an index scan however many published rows wait for
/// [`Outbox::purge_published`]; the second finds those rows for the purge without scanning
/// the table. `last_error` keeps the most recent failure, also after a later
/// success. `traceparent` is the producer's trace context ([`crate::trace`]), `NULL` without
/// one; a table made before it had the column gets it, checked in the catalog first so that
/// a start-up does not take the table's lock once it is there.
pub const OUTBOX_SQL: &str = "\
CREATE TABLE IF NOT EXISTS svcdb_outbox (
    id              uuid        PRIMARY KEY,
    exchange        text        NOT NULL,
    routing_key     text        NOT NULL,
    envelope        jsonb       NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    published_at    timestamptz,
    attempts        integer     NOT NULL DEFAULT 0,
    last_error      text,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    traceparent     text
);
DO $svcdb$ BEGIN
    IF NOT EXISTS (SELECT FROM pg_attribute
                    WHERE attrelid = 'svcdb_outbox'::regclass AND attname = 'traceparent') THEN
        ALTER TABLE svcdb_outbox ADD COLUMN IF NOT EXISTS traceparent text;
    END IF;
END $svcdb$;
CREATE INDEX IF NOT EXISTS svcdb_outbox_unpublished_idx
    ON svcdb_outbox (id) WHERE published_at IS NULL;
CREATE INDEX IF NOT EXISTS svcdb_outbox_published_at_idx
    ON svcdb_outbox (published_at) WHERE published_at IS NOT NULL;
";

/// The longest exchange name, queue name or routing key AMQP carries (a short string), in
/// bytes.
pub const MAX_AMQP_NAME_BYTES: usize = 255;

/// Refuses an envelope with the character U+0000 in a string (a field, or any key or string
/// of the payload): PostgreSQL's `jsonb` cannot store it, and the `INSERT` would fail with
/// 22P05 inside the caller's transaction, aborting its business write (found by a user trial:
/// a user-supplied name with a NUL in it).
fn refuse_nul(envelope: &Envelope) -> Result<()> {
    /// The path of the first string under `value` that holds a NUL (`$` for `value` itself).
    fn nul_in(value: &serde_json::Value, path: &str) -> Option<String> {
        match value {
            serde_json::Value::String(s) if s.contains('\0') => Some(path.to_owned()),
            serde_json::Value::Array(items) => items
                .iter()
                .enumerate()
                .find_map(|(i, item)| nul_in(item, &format!("{path}[{i}]"))),
            serde_json::Value::Object(fields) => fields.iter().find_map(|(key, item)| {
                if key.contains('\0') {
                    Some(format!("{path} (a key)"))
                } else {
                    nul_in(item, &format!("{path}.{key}"))
                }
            }),
            _ => None,
        }
    }
    let found = [("kind", &envelope.kind), ("source", &envelope.source)]
        .into_iter()
        .find(|(_, text)| text.contains('\0'))
        .map(|(field, _)| (field, field.to_owned()))
        .or_else(|| nul_in(&envelope.payload, "payload").map(|path| ("payload", path)));
    match found {
        Some((field, path)) => Err(EventError::InvalidField {
            field,
            reason: format!("{path} holds the character U+0000, which PostgreSQL cannot store in jsonb (nor in text); remove it, or encode the value (base64) before putting it in the event"),
        }
        .into()),
        None => Ok(()),
    }
}

/// The longest `last_error` stored, in characters; longer publisher errors are cut.
const MAX_ERROR_CHARS: usize = 2000;

/// Stores `envelope` in the outbox inside `tx`, to be published to `exchange` with
/// `routing_key` once `tx` commits (and never if it rolls back).
///
/// `tx` is the transaction of the business write: a [`Transaction`](crate::Transaction) from
/// [`ServiceDb::transaction`] or [`ServiceDb::process_once`] (the `INSERT` is prepared once
/// per pooled connection), or any tokio-postgres transaction on a connection pinned to the
/// service schema ([`AnyTransaction`](crate::AnyTransaction)).
///
/// Refused before any SQL is sent, so that the relay never holds a row the broker cannot take:
/// an invalid envelope, one over [`MAX_ENVELOPE_BYTES`], or one with the character U+0000 in a
/// string, which `jsonb` cannot store ([`Error::Event`](crate::Error::Event)), an exchange name
/// other than letters, digits, `-`, `_`, `.` and `:` ([`check_exchange`]: empty names the
/// default exchange, and `amq.topic` is fine) or a routing key over 255 bytes
/// ([`check_routing_key`]; both [`Error::Ident`](crate::Error::Ident)). Enqueueing one envelope id twice fails with
/// a unique violation (SQLSTATE 23505): make a new [`Envelope`] per event.
///
/// The current span's trace context ([`trace::current`](crate::trace::current)) is stored
/// with the row, for the relay to send as the `traceparent` header.
pub async fn enqueue(
    tx: &impl crate::AnyTransaction,
    exchange: &str,
    routing_key: &str,
    envelope: &Envelope,
) -> Result<()> {
    check_exchange(exchange)?;
    check_routing_key(routing_key)?;
    envelope.validate()?;
    refuse_nul(envelope)?;
    let json = serde_json::to_string(envelope).expect("an envelope always serializes");
    if json.len() > MAX_ENVELOPE_BYTES {
        return Err(EventError::TooLarge {
            size: json.len(),
            max: MAX_ENVELOPE_BYTES,
        }
        .into());
    }
    crate::any_tx::execute(
        tx,
        "INSERT INTO svcdb_outbox (id, exchange, routing_key, envelope, traceparent)
         VALUES ($1, $2, $3, $4::jsonb, $5)",
        &[
            (&envelope.id, Type::UUID),
            (&exchange, Type::TEXT),
            (&routing_key, Type::TEXT),
            (&json, Type::TEXT),
            (&crate::trace::current().map(|t| t.to_string()), Type::TEXT),
        ],
    )
    .await?;
    wake::enqueued();
    Ok(())
}

/// Checks the name of an exchange to publish to, as [`enqueue`] does before writing: at most
/// [`MAX_AMQP_NAME_BYTES`] of letters, digits, `-`, `_`, `.` and `:`. The empty name (the
/// default exchange) and RabbitMQ's predefined `amq.` exchanges (`amq.topic`) are accepted:
/// publishing to them is allowed, only declaring them is not ([`check_declared_name`]).
pub fn check_exchange(name: &str) -> Result<(), IdentError> {
    check_name("exchange", name, Use::Publish)
}

/// Checks the name of an exchange or queue to declare (`what`: `"exchange"`, `"queue"`), as
/// svcdb-amqp's topology does before declaring it: the rules of [`check_exchange`], and it is
/// not empty and does not start with `amq.`. RabbitMQ reserves that prefix and refuses to
/// declare such a name with `ACCESS_REFUSED`, which closes the channel.
pub fn check_declared_name(what: &'static str, name: &str) -> Result<(), IdentError> {
    check_name(what, name, Use::Declare)
}

/// Checks a routing key (or a binding's topic pattern): at most [`MAX_AMQP_NAME_BYTES`], any
/// characters.
pub fn check_routing_key(key: &str) -> Result<(), IdentError> {
    check_length("routing key", key)
}

/// Where an AMQP name is used: its rules differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Use {
    /// Published to: may name the default exchange or a predefined `amq.` one.
    Publish,
    /// Declared: must be a name of one's own.
    Declare,
}

/// RabbitMQ's rules for exchange and queue names.
fn check_name(what: &'static str, name: &str, usage: Use) -> Result<(), IdentError> {
    let refuse = |reason: String| IdentError {
        what,
        shown: format!("{name:?}"),
        reason,
    };
    if usage == Use::Declare && name.is_empty() {
        return Err(refuse(
            "it is empty; name it, such as \"orders.reserve-stock\"".into(),
        ));
    }
    check_length(what, name)?;
    if usage == Use::Declare && name.starts_with("amq.") {
        return Err(refuse(
            "names starting with \"amq.\" are reserved by RabbitMQ".into(),
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
    {
        return Err(refuse(format!(
            "{bad:?} is not allowed; use letters, digits, `-`, `_`, `.` and `:`"
        )));
    }
    Ok(())
}

fn check_length(what: &'static str, name: &str) -> Result<(), IdentError> {
    if name.len() > MAX_AMQP_NAME_BYTES {
        return Err(IdentError {
            what,
            shown: format!("{:?}…", name.chars().take(40).collect::<String>()),
            reason: format!(
                "it is {} bytes long; AMQP carries at most {MAX_AMQP_NAME_BYTES}",
                name.len()
            ),
        });
    }
    Ok(())
}

/// One claimed row, handed to the publisher by [`Outbox::relay_batch`].
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxMessage {
    /// The row's id: the envelope's id. Publish it as the AMQP `message_id`.
    pub id: Uuid,
    /// The exchange to publish to (empty: the default exchange).
    pub exchange: String,
    /// The routing key.
    pub routing_key: String,
    /// The event.
    pub envelope: Envelope,
    /// Earlier publish attempts of this row (0 the first time).
    pub attempts: i32,
    /// When the row was enqueued (the database's clock).
    pub created_at: DateTime<Utc>,
    /// The producer's W3C trace context, as stored (see [`crate::trace`]); send it as the
    /// `traceparent` header.
    pub traceparent: Option<String>,
}

impl OutboxMessage {
    /// The message body to publish: the envelope's JSON.
    pub fn body(&self) -> Vec<u8> {
        self.envelope.to_json_bytes()
    }
}

/// When the outbox retries a row whose publish failed: the row's `next_attempt_at`, stored
/// with it by [`Outbox::relay_batch`], so every relay replica and every restart follows it.
/// Set with [`Outbox::with_publish_retry`].
///
/// The relay's other settings (batch size, polling, the confirm timeout, reconnecting to the
/// broker) belong to the relay loop, not to the rows: svcdb-amqp's `RelayConfig`.
#[derive(Debug, Clone)]
pub struct PublishRetry {
    /// Wait after the first failure; doubled after each further one. Default: 1 s.
    pub retry_backoff: Duration,
    /// The longest wait between attempts. Default: 5 min.
    pub max_retry_backoff: Duration,
}

impl Default for PublishRetry {
    fn default() -> Self {
        Self {
            retry_backoff: Duration::from_secs(1),
            max_retry_backoff: Duration::from_secs(5 * 60),
        }
    }
}

/// What one [`Outbox::relay_batch`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayReport {
    /// Rows claimed. Fewer than the limit means the outbox had no more rows due.
    pub claimed: usize,
    /// Rows the publisher reported published, now marked so.
    pub published: usize,
    /// Rows whose publish failed (or whose stored envelope is unreadable), rescheduled.
    pub failed: usize,
}

/// The relay side of a service's outbox: claims due rows, hands them to a publisher, records
/// the outcome. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Outbox {
    db: ServiceDb,
    retry: PublishRetry,
}

/// Due, unpublished rows in id order, locked; rows locked by another relay are skipped.
const CLAIM_SQL: &str = "\
SELECT id, exchange, routing_key, envelope, attempts, created_at, traceparent
  FROM svcdb_outbox
 WHERE published_at IS NULL AND next_attempt_at <= now()
 ORDER BY id
 LIMIT $1
   FOR UPDATE SKIP LOCKED";

/// Also commits the relay's transaction asynchronously (`synchronous_commit` off for this
/// transaction, set in the statement so it costs no round trip): the commit does not wait for
/// its WAL flush. Safe because the mark is the only thing it makes durable: a crash that loses
/// it leaves the rows unpublished, and they are published again (at least once, as after a
/// relay crash), never lost.
const MARK_PUBLISHED_SQL: &str = "\
UPDATE svcdb_outbox SET published_at = now(), attempts = attempts + 1
 WHERE id = ANY($1)
   AND (SELECT set_config('synchronous_commit', 'off', true)) IS NOT NULL";

/// `$3` first backoff and `$4` largest backoff, in seconds. `attempts` in the expression is
/// the count before this failure; the exponent is capped so `power` cannot overflow.
const MARK_FAILED_SQL: &str = "\
UPDATE svcdb_outbox o
   SET attempts = o.attempts + 1,
       last_error = f.error,
       next_attempt_at = now() + make_interval(secs => least($3 * power(2, least(o.attempts, 30)), $4))
  FROM unnest($1::uuid[], $2::text[]) AS f(id, error)
 WHERE o.id = f.id";

impl Outbox {
    /// The outbox of `db`'s service schema, with default [`PublishRetry`].
    pub fn new(db: ServiceDb) -> Self {
        Self {
            db,
            retry: PublishRetry::default(),
        }
    }

    /// The pool this outbox uses.
    pub fn db(&self) -> &ServiceDb {
        &self.db
    }

    /// Replaces when failed rows are retried.
    #[must_use]
    pub fn with_publish_retry(mut self, retry: PublishRetry) -> Self {
        self.retry = retry;
        self
    }

    /// Relays up to `limit` due rows, in one transaction:
    ///
    /// 1. claims them (`FOR UPDATE SKIP LOCKED`, in id order);
    /// 2. calls `publish` with them, which publishes each and returns one result per message,
    ///    in the same order (a missing result counts as a failure);
    /// 3. marks the successes published and reschedules the failures (`attempts + 1`,
    ///    `last_error`, `next_attempt_at` backed off), then commits.
    ///
    /// A row whose stored envelope cannot be read (written by hand) is not given to `publish`
    /// and is recorded as failed with the reason. `publish` is not called when no row is due.
    /// If `publish` panics, or the future is dropped, the transaction rolls back and the rows
    /// are claimed again by the next batch. The error is a database error; publish failures are
    /// counted in the [`RelayReport`] and logged, not returned.
    ///
    /// In a spawned relay loop, write `publish` as `async move |messages| …` with owned
    /// captures (clones of the channel), as for [`ServiceDb::transaction_with`].
    pub async fn relay_batch<P: Display>(
        &self,
        limit: usize,
        publish: impl AsyncFnOnce(&[OutboxMessage]) -> Vec<Result<(), P>>,
    ) -> Result<RelayReport> {
        if limit == 0 {
            return Ok(RelayReport::default());
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let span = crate::trace::transaction_span(&self.db);
        self.relay_in_span(limit, publish).instrument(span).await
    }

    /// [`Outbox::relay_batch`], on a pooled connection's client rather than through
    /// [`ServiceDb::transaction`]: tokio-postgres pipelines requests made at once on one
    /// client, so the `BEGIN` travels with the claim and the marks with the `COMMIT`, two round
    /// trips a batch instead of four (at a light load a batch holds a few rows, and the
    /// round trips are most of its cost).
    async fn relay_in_span<P: Display>(
        &self,
        limit: i64,
        publish: impl AsyncFnOnce(&[OutboxMessage]) -> Vec<Result<(), P>>,
    ) -> Result<RelayReport> {
        let conn = self.db.get().await?;
        let open = RollbackOnDrop::new(&conn);
        let outcome = self.relay_on(&conn, limit, publish).await;
        open.settled();
        if outcome.is_err() {
            // Rolled back, then back to the pool unless its server no longer accepts writes,
            // as after a failed `ServiceDb::transaction`; closed if it cannot roll back.
            if conn.batch_execute("ROLLBACK").await.is_ok() {
                self.db.retire_if_read_only(conn).await;
            } else {
                drop(PooledConn::take(conn));
            }
        }
        outcome
    }

    /// Claims, publishes and marks on `client`, committing at the end; an error leaves the
    /// transaction open (or aborted) for the caller to roll back.
    async fn relay_on<P: Display>(
        &self,
        client: &deadpool_postgres::ClientWrapper,
        limit: i64,
        publish: impl AsyncFnOnce(&[OutboxMessage]) -> Vec<Result<(), P>>,
    ) -> Result<RelayReport> {
        // Prepared once per pooled connection (outside the transaction), then cached.
        let claim = client
            .prepare_typed_cached(CLAIM_SQL, &[Type::INT8])
            .await?;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&limit];
        // `biased`: polled in this order, so sent in this order (each request is written to
        // the connection on its future's first poll).
        let (begun, rows) = tokio::join!(
            biased;
            client.batch_execute("BEGIN"),
            client.query(&claim, &params)
        );
        begun?;
        let rows = rows?;
        let claimed = rows.len();
        let mut messages = Vec::with_capacity(rows.len());
        let mut failures: Vec<(Uuid, String)> = Vec::new();
        for row in rows {
            let id: Uuid = row.get(0);
            match Envelope::try_from(row.get::<_, Value>(3)) {
                Ok(envelope) => messages.push(OutboxMessage {
                    id,
                    exchange: row.get(1),
                    routing_key: row.get(2),
                    envelope,
                    attempts: row.get(4),
                    created_at: row.get(5),
                    traceparent: row.get(6),
                }),
                Err(e) => failures.push((id, format!("the stored envelope is invalid: {e}"))),
            }
        }
        let mut results = if messages.is_empty() {
            Vec::new()
        } else {
            publish(&messages).await
        }
        .into_iter();
        let mut published = Vec::with_capacity(messages.len());
        for message in &messages {
            match results.next() {
                Some(Ok(())) => published.push(message.id),
                Some(Err(e)) => failures.push((message.id, e.to_string())),
                None => failures.push((
                    message.id,
                    "the publisher returned no result for this message".into(),
                )),
            }
        }
        let failed = failures.len();
        if !failures.is_empty() {
            // One line per batch: with the broker down, every row fails.
            let (first_id, first_error) = &failures[0];
            tracing::warn!(target: "svcdb::outbox", failed, %first_id, %first_error, "outbox messages were not published; they will be retried");
            for (id, error) in &failures[1..] {
                tracing::debug!(target: "svcdb::outbox", %id, %error, "outbox message not published");
            }
        }
        let (failed_ids, errors): (Vec<Uuid>, Vec<String>) = failures
            .into_iter()
            .map(|(id, e)| (id, truncate(e, MAX_ERROR_CHARS)))
            .unzip();
        let mark_published = if published.is_empty() {
            None
        } else {
            Some(
                client
                    .prepare_typed_cached(MARK_PUBLISHED_SQL, &[Type::UUID_ARRAY])
                    .await?,
            )
        };
        let mark_failed = if failed_ids.is_empty() {
            None
        } else {
            let types = [
                Type::UUID_ARRAY,
                Type::TEXT_ARRAY,
                Type::FLOAT8,
                Type::FLOAT8,
            ];
            Some(client.prepare_typed_cached(MARK_FAILED_SQL, &types).await?)
        };
        let backoff = self.retry.retry_backoff.as_secs_f64();
        let max_backoff = self.retry.max_retry_backoff.as_secs_f64();
        // Sent in this order, answered in this order: a failed mark aborts the transaction,
        // and the COMMIT then rolls it back, so each mark's own result is what tells.
        let (marked, marked_failed, committed) = tokio::join!(
            biased;
            async {
                match &mark_published {
                    Some(statement) => client.execute(statement, &[&published]).await,
                    None => Ok(0),
                }
            },
            async {
                match &mark_failed {
                    Some(statement) => {
                        client
                            .execute(statement, &[&failed_ids, &errors, &backoff, &max_backoff])
                            .await
                    }
                    None => Ok(0),
                }
            },
            client.batch_execute("COMMIT"),
        );
        marked?;
        marked_failed?;
        committed?;
        Ok(RelayReport {
            claimed,
            published: published.len(),
            failed,
        })
    }

    /// Rows not yet published, due or waiting for a retry.
    pub async fn pending_count(&self) -> Result<u64> {
        let conn = self.db.get().await?;
        let rows = conn
            .query_typed(
                "SELECT count(*) FROM svcdb_outbox WHERE published_at IS NULL",
                &[],
            )
            .await?;
        let count: i64 = rows[0].get(0);
        Ok(u64::try_from(count).unwrap_or(0))
    }

    /// Deletes rows published more than `older_than` ago (by the database's clock) and returns
    /// how many. Unpublished rows are never deleted. The relay of svcdb-amqp runs this on a
    /// schedule (its `Retention`).
    ///
    /// Deletes in batches of [`PURGE_BATCH_ROWS`](crate::idempotency::PURGE_BATCH_ROWS), each
    /// its own short transaction that skips locked rows, as
    /// [`ServiceDb::purge_processed`] does: the relay keeps publishing meanwhile.
    pub async fn purge_published(&self, older_than: Duration) -> Result<u64> {
        crate::idempotency::purge_in_batches(&self.db, OUTBOX_TABLE, "published_at", older_than)
            .await
    }
}

/// Guards a relay batch's transaction, begun by hand on a pooled connection, until the batch
/// has committed or failed ([`RollbackOnDrop::settled`]). Dropped before that (the batch's
/// future was dropped, or its publisher panicked), it sends a `ROLLBACK` without waiting, as
/// tokio-postgres's own transactions do when dropped: it goes out ahead of anything the
/// connection's next user sends, so the rows are released at once and the pool never hands
/// out a connection in the middle of a transaction.
struct RollbackOnDrop<'a> {
    client: &'a tokio_postgres::Client,
    armed: bool,
}

impl<'a> RollbackOnDrop<'a> {
    fn new(client: &'a tokio_postgres::Client) -> Self {
        Self {
            client,
            armed: true,
        }
    }

    /// The batch committed or failed on its own: nothing to do on drop.
    fn settled(mut self) {
        self.armed = false;
    }
}

impl Drop for RollbackOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            // The driver sends a request when its future is first polled and reads the answer
            // of one whose future was dropped; polled once here, the `ROLLBACK` is on its way.
            let _ = self.client.batch_execute("ROLLBACK").now_or_never();
        }
    }
}

impl Outbox {
    /// Starts watching for committed rows: see [`Wakeups`]. The `LISTEN` connection is opened
    /// in the background and reopened after a failure, after `reconnect_backoff` doubling up
    /// to `max_reconnect_backoff`. Must be called inside a Tokio runtime.
    pub fn wakeups(&self, reconnect_backoff: Duration, max_reconnect_backoff: Duration) -> Wakeups {
        Wakeups::start(&self.db, reconnect_backoff, max_reconnect_backoff)
    }
}

fn truncate(mut s: String, max_chars: usize) -> String {
    if let Some((at, _)) = s.char_indices().nth(max_chars) {
        s.truncate(at);
        s.push('…');
    }
    s
}

impl ServiceDb {
    /// Creates `svcdb_outbox` in the service schema if it is missing ([`OUTBOX_SQL`]).
    /// Idempotent, and safe when several replicas start at once. Needs `CREATE` on the schema
    /// (the service role owns it after `svcdb provision`).
    pub async fn install_outbox(&self) -> Result<()> {
        self.install_ddl(
            OUTBOX_SQL,
            &[
                "svcdb_outbox",
                "svcdb_outbox.traceparent",
                "svcdb_outbox_unpublished_idx",
                "svcdb_outbox_published_at_idx",
            ],
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exchange_and_routing_key_rules() {
        for ok in ["", "orders", "amq.topic", "orders-v2_x:y"] {
            check_exchange(ok).unwrap();
        }
        for bad in ["with space", "x;y", "naïve", &"a".repeat(256)] {
            assert_eq!(check_exchange(bad).unwrap_err().what, "exchange", "{bad:?}");
        }
        check_routing_key("order.placed.eu #").unwrap();
        check_routing_key(&"k".repeat(255)).unwrap();
        assert_eq!(
            check_routing_key(&"k".repeat(256)).unwrap_err().what,
            "routing key"
        );
    }

    #[test]
    fn only_declared_names_refuse_empty_and_the_amq_prefix() {
        // Publishing to the default exchange or a predefined one is fine; declaring them is
        // refused by RabbitMQ (ACCESS_REFUSED for the prefix).
        for name in ["", "amq.topic", "amq.mine"] {
            check_exchange(name).unwrap();
            for what in ["exchange", "queue"] {
                assert_eq!(
                    check_declared_name(what, name).unwrap_err().what,
                    what,
                    "{name:?}"
                );
            }
        }
        for ok in ["orders.events", "orders-v2_x:y", "amq", "x.amq.y"] {
            check_declared_name("exchange", ok).unwrap();
        }
        for bad in ["with space", "x;y", "naïve", &"a".repeat(256)] {
            assert_eq!(
                check_declared_name("queue", bad).unwrap_err().what,
                "queue",
                "{bad:?}"
            );
        }
    }

    #[test]
    fn notify_channels_fit_postgres_names() {
        assert_eq!(notify_channel("orders"), "svcdb_outbox:orders");
        // 63 bytes at most (pg_notify refuses longer), cut on a character boundary.
        let long = notify_channel(&"é".repeat(40));
        assert!(long.len() <= 63 && long.len() >= 62, "{long}");
        assert!(long.starts_with("svcdb_outbox:é"));
    }

    #[test]
    fn truncates_errors_on_char_boundaries() {
        assert_eq!(truncate("ééé".into(), 2), "éé…");
        assert_eq!(truncate("ab".into(), 2), "ab");
    }
}
