//! Flyway's repeatable migrations (`R__<name>.sql`): scripts without a version that `up` runs
//! again whenever their file changes, after the versioned migrations, as Flyway does (views,
//! functions, grants: `CREATE OR REPLACE …` kept in one file and edited in place).
//!
//! Their state lives in a table of their own beside the history, created the first time one
//! runs:
//!
//! ```sql
//! CREATE TABLE IF NOT EXISTS <schema>.svcdb_repeatables (
//!     name          text        PRIMARY KEY,  -- the file's name after `R__`
//!     checksum      text        NOT NULL,     -- SHA-256 of the script when it last ran (see Checksum)
//!     applied_at    timestamptz NOT NULL DEFAULT now(),
//!     execution_us  bigint,                   -- NULL: recorded by `adopt`, not run here
//!     applied_by    text        NOT NULL DEFAULT current_user
//! );
//! ```
//!
//! A table of its own keeps `svcdb_migrations` what older releases read during a rolling
//! deploy: one row per version.
//!
//! `up` runs, in name order (Flyway's), each repeatable whose checksum differs from the one
//! recorded or that has none, each in a transaction of its own with its row (or, when it
//! holds a statement Flyway runs outside a transaction, statement by statement, then its row),
//! after the versioned migrations have committed. `down` does not revert them (they have no
//! down script, in Flyway either); a repeatable whose file is removed is left as it is.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::types::Type;
use tokio_postgres::GenericClient;

use super::migration::Checksum;
use super::split::statements_to_run;
use crate::error::SqlState;
use crate::ident::Ident;

/// The table that records repeatable migrations, in the service schema.
pub const REPEATABLES_TABLE: &str = "svcdb_repeatables";

/// A repeatable migration, read from `R__<name>.sql`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repeatable {
    /// The name after `R__` (Flyway's description), its key.
    pub name: String,
    /// The script, with any byte-order mark removed.
    pub sql: String,
    /// Its checksum, as [`Migration::checksum`](super::Migration::checksum) is computed.
    pub checksum: Checksum,
    /// False when it holds a statement Flyway runs outside a transaction, or starts with the
    /// no-transaction directive: it is then sent statement by statement.
    pub transactional: bool,
    /// The file, for messages.
    pub path: String,
}

/// A repeatable migration's state against the schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RepeatableState {
    /// Run with the file as it is now.
    Applied,
    /// Never run here: the next `up` runs it.
    Pending,
    /// Run, and its file changed since: the next `up` runs it again.
    Changed,
}

/// One repeatable migration in a [`StatusReport`](super::StatusReport).
#[derive(Debug, Clone, Serialize)]
pub struct RepeatableEntry {
    /// Its name.
    pub name: String,
    /// Its state.
    pub state: RepeatableState,
    /// Its file.
    pub path: String,
    /// When it last ran (or was adopted), if it did.
    pub applied_at: Option<DateTime<Utc>>,
}

/// A repeatable migration `up` ran.
#[derive(Debug, Clone, Serialize)]
pub struct RepeatableRun {
    /// Its name.
    pub name: String,
    /// Whether it ran in a transaction.
    pub transactional: bool,
    /// How long its script took, in milliseconds; `None` (JSON `null`) in a dry run.
    pub duration_ms: Option<f64>,
}

/// What the table says about one repeatable.
#[derive(Debug, Clone)]
pub(crate) struct Recorded {
    pub checksum: String,
    pub applied_at: DateTime<Utc>,
}

/// The recorded repeatables by name; none when the table does not exist yet.
pub(crate) async fn read(
    client: &impl GenericClient,
    schema: &Ident,
) -> Result<HashMap<String, Recorded>, tokio_postgres::Error> {
    let sql = format!("SELECT name, checksum, applied_at FROM {schema}.{REPEATABLES_TABLE}");
    match client.query(&sql, &[]).await {
        Ok(rows) => Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    Recorded {
                        checksum: r.get(1),
                        applied_at: r.get(2),
                    },
                )
            })
            .collect()),
        Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => Ok(HashMap::new()),
        Err(e) => Err(e),
    }
}

/// The state of `r` against what is `recorded`.
pub(crate) fn state(r: &Repeatable, recorded: &HashMap<String, Recorded>) -> RepeatableState {
    match recorded.get(&r.name) {
        None => RepeatableState::Pending,
        Some(row) if row.checksum != r.checksum.to_hex() => RepeatableState::Changed,
        Some(_) => RepeatableState::Applied,
    }
}

/// The status entries of `repeatables`, in name order.
pub(crate) fn entries(
    repeatables: &[Repeatable],
    recorded: &HashMap<String, Recorded>,
) -> Vec<RepeatableEntry> {
    repeatables
        .iter()
        .map(|r| RepeatableEntry {
            name: r.name.clone(),
            state: state(r, recorded),
            path: r.path.clone(),
            applied_at: recorded.get(&r.name).map(|row| row.applied_at),
        })
        .collect()
}

/// Creates the table if it is missing.
pub(crate) async fn create_table(
    client: &impl GenericClient,
    schema: &Ident,
) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {schema}.{REPEATABLES_TABLE} (
                name text PRIMARY KEY,
                checksum text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now(),
                execution_us bigint,
                applied_by text NOT NULL DEFAULT current_user
            )"
        ))
        .await
}

/// Records that `r` ran (`execution`) or was adopted (`None`) with its current file.
pub(crate) async fn record(
    client: &impl GenericClient,
    schema: &Ident,
    r: &Repeatable,
    execution: Option<Duration>,
) -> Result<(), tokio_postgres::Error> {
    let micros = execution.map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
    let sql = format!(
        "INSERT INTO {schema}.{REPEATABLES_TABLE} (name, checksum, execution_us) VALUES ($1, $2, $3)
         ON CONFLICT (name) DO UPDATE SET checksum = excluded.checksum, execution_us = excluded.execution_us,
             applied_at = now(), applied_by = current_user"
    );
    client
        .execute_typed(
            &sql,
            &[
                (&r.name, Type::TEXT),
                (&r.checksum.to_hex(), Type::TEXT),
                (&micros, Type::INT8),
            ],
        )
        .await
        .map(drop)
}

/// Runs `r` and records it, on `client` (the migration lock's session): in one transaction
/// with its row (rolled back whole if it fails), or, when it is not transactional, statement
/// by statement and then its row. `reset` (the runner's session settings) follows the script,
/// as it follows every migration's. Returns how long the script took.
pub(crate) async fn run(
    client: &tokio_postgres::Client,
    schema: &Ident,
    r: &Repeatable,
    reset: &str,
) -> Result<Duration, (tokio_postgres::Error, Failed)> {
    let started = Instant::now();
    let bookkeeping = |e| (e, Failed::Bookkeeping);
    if !r.transactional {
        for (done, statement) in statements_to_run(&r.sql).into_iter().enumerate() {
            client
                .batch_execute(statement)
                .await
                .map_err(|e| (e, Failed::Statement(done)))?;
        }
        let took = started.elapsed();
        client.batch_execute(reset).await.map_err(bookkeeping)?;
        record(client, schema, r, Some(took))
            .await
            .map_err(bookkeeping)?;
        return Ok(took);
    }
    client.batch_execute("BEGIN").await.map_err(bookkeeping)?;
    let result = async {
        client
            .batch_execute(&r.sql)
            .await
            .map_err(|e| (e, Failed::Script))?;
        let took = started.elapsed();
        client.batch_execute(reset).await.map_err(bookkeeping)?;
        record(client, schema, r, Some(took))
            .await
            .map_err(bookkeeping)?;
        client.batch_execute("COMMIT").await.map_err(bookkeeping)?;
        Ok(took)
    }
    .await;
    if result.is_err() {
        // The session stays the lock's: leave it out of the failed transaction.
        let _ = client.batch_execute("ROLLBACK").await;
    }
    result
}

/// Where a repeatable migration's [`run`] failed.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Failed {
    /// Its script, sent whole (in a transaction): the server's position counts from its start.
    Script,
    /// Its statement after this many succeeded (outside a transaction, one at a time).
    Statement(usize),
    /// Its bookkeeping after the script ran (the session reset, its row, the commit).
    Bookkeeping,
}
