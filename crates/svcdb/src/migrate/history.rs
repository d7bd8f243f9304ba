//! The history table, `svcdb_migrations`, in the service's own schema.
//!
//! ```sql
//! CREATE TABLE IF NOT EXISTS <schema>.svcdb_migrations (
//!     version       bigint PRIMARY KEY,    -- every digit of the version as one integer, with exceptions (see Versions)
//!     version_text  text,                  -- the version as its file writes it (`2026-01-20-162913`, `0003`)
//!     name          text        NOT NULL,
//!     checksum      text        NOT NULL,  -- SHA-256 of the up script, hex (see Checksum)
//!     applied_at    timestamptz NOT NULL DEFAULT now(),  -- for a dirty row: when its script started
//!     execution_us  bigint,                -- microseconds the up script took; NULL: not run here (baseline) or still running
//!     applied_by    text        NOT NULL DEFAULT current_user,
//!     transactional boolean     NOT NULL,
//!     dirty         boolean     NOT NULL DEFAULT false  -- a non-transactional script failed part-way
//! );
//! ```
//!
//! A row exists for every applied migration. A *dirty* row marks a non-transactional script
//! that was started and did not finish. While the runner that started it still holds the
//! schema's migration lock (a session advisory lock), the script is *in progress* (a long
//! `CREATE INDEX CONCURRENTLY`): other runners wait for the lock and the start-up gate stays
//! ready. With nobody holding the lock the script failed part-way, and runners refuse to run
//! until `repair` deletes the row.
//!
//! # Versions
//!
//! The order of the rows is the order of their [`Version`]s (read from `version_text`), not of
//! the integer column: as an integer, diesel's 18-digit `2025-11-19-091444-0000` would sort
//! after the 14-digit `2026-01-20-162913`. The integer stays the key, so that distinct
//! versions stay distinct (two versions with the same digits are the same version) and a
//! replica of an older release, during a rolling deploy, still reads and writes the table.
//! One exception: a run of more than 14 zeros (Lemmy's `000000000000000_forbid_diesel_cli`,
//! after diesel's `00000000000000`) is a version of its own, keyed -1 for 15 zeros, -2 for
//! 16 and so on, where its digits would make it 0. And a dotted version (Flyway's `1.1`, whose
//! digits are those of `11`) is keyed by a hash of its parts, below -2^62; equal versions
//! (`1.1`, `1.1.0`) share it. Older releases refuse such folders.
//! `version_text` is NULL in the rows such a replica writes; it reads as the integer's digits.
//!
//! A table written before `version_text` existed is upgraded in place by the first command
//! that takes the migration lock: the column is added and filled from the
//! integer. Until then it is read as it is.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_postgres::types::Type;
use tokio_postgres::GenericClient;

use super::error::MigrateError;
use super::migration::Migration;
use super::version::Version;
use crate::error::SqlState;
use crate::ident::Ident;

pub use super::migration::HISTORY_TABLE;

/// One row of the history table.
#[derive(Debug, Clone)]
pub(crate) struct HistoryRow {
    pub version: Version,
    pub name: String,
    pub checksum: String,
    pub dirty: bool,
    /// For a dirty row: how long ago its script started (by the database's clock).
    pub dirty_for: Option<Duration>,
    /// Filled by [`read`] with `full`; the no-op `up` path does not fetch it.
    pub detail: Option<HistoryDetail>,
}

/// The columns only `status` shows.
#[derive(Debug, Clone)]
pub(crate) struct HistoryDetail {
    pub applied_at: DateTime<Utc>,
    /// `None` for a baselined migration (recorded, never run) and for one still running
    /// outside a transaction.
    pub execution: Option<Duration>,
    pub applied_by: String,
    pub transactional: bool,
}

/// The history table as read: absent, or its rows sorted by version.
#[derive(Debug, Clone, Default)]
pub(crate) struct History {
    pub exists: bool,
    pub rows: Vec<HistoryRow>,
    /// Another session held the schema's migration lock when a row was dirty: that row's
    /// script is in progress, not failed. Only asked when a row is dirty.
    pub locked: bool,
    /// The table predates `version_text`: [`upgrade`] it under the migration lock.
    pub legacy: bool,
}

impl History {
    pub fn get(&self, version: &Version) -> Option<&HistoryRow> {
        self.rows
            .binary_search_by(|r| r.version.cmp(version))
            .ok()
            .map(|i| &self.rows[i])
    }

    /// The newest applied version that is not dirty, written as its file writes it when
    /// `migrations` has it (a row an older release wrote holds only the digits).
    pub fn current_version(&self, migrations: &super::source::Migrations) -> Option<Version> {
        let newest = self
            .rows
            .iter()
            .filter(|r| !r.dirty)
            .map(|r| &r.version)
            .max()?;
        Some(
            migrations
                .get(newest)
                .map_or(newest, |m| &m.version)
                .clone(),
        )
    }
}

/// `"schema".svcdb_migrations`.
pub(crate) fn table(schema: &Ident) -> String {
    format!("{schema}.{HISTORY_TABLE}")
}

/// Creates the table if it is missing. A schema that does not exist is
/// [`MigrateError::SchemaMissing`], which says how to make it, rather than the server's bare
/// "schema does not exist".
pub(crate) async fn create_table(
    client: &impl GenericClient,
    schema: &Ident,
) -> Result<(), MigrateError> {
    let sql = format!(
        "CREATE TABLE IF NOT EXISTS {} (
            version bigint PRIMARY KEY,
            version_text text,
            name text NOT NULL,
            checksum text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now(),
            execution_us bigint,
            applied_by text NOT NULL DEFAULT current_user,
            transactional boolean NOT NULL,
            dirty boolean NOT NULL DEFAULT false
        )",
        table(schema)
    );
    client.batch_execute(&sql).await.map_err(|e| {
        if e.code() == Some(&SqlState::INVALID_SCHEMA_NAME) {
            MigrateError::SchemaMissing {
                schema: schema.as_str().to_owned(),
                similar: Vec::new(),
            }
        } else {
            e.into()
        }
    })
}

/// Upgrades a history table written before `version_text` existed ([`History::legacy`]):
/// adds the column and fills it from the integer. Run under the migration lock, so that no
/// other runner writes meanwhile; adding a nullable column without a default only changes the
/// catalog (no rewrite), and the fill touches one row per migration. Idempotent.
pub(crate) async fn upgrade(
    client: &impl GenericClient,
    schema: &Ident,
) -> Result<(), tokio_postgres::Error> {
    let table = table(schema);
    // One simple query: its statements run as one implicit transaction.
    client
        .batch_execute(&format!(
            "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS version_text text;
             UPDATE {table} SET version_text = version::text WHERE version_text IS NULL"
        ))
        .await
}

/// Drops the history table (when a failed deploy that created it undid everything).
pub(crate) fn drop_table_sql(schema: &Ident) -> String {
    format!("DROP TABLE IF EXISTS {}", table(schema))
}

/// Reads the history in one round trip (`query_typed` sends parse, bind and execute at once).
/// A missing table (42P01) is an empty history. `full` adds the columns only `status` shows;
/// without it the read is what the no-op `up` costs.
///
/// For dirty rows the same statement asks `pg_locks` whether a runner holds the schema's lock
/// ([`History::locked`]); the lock lookup is an uncorrelated subquery under `CASE WHEN dirty`,
/// which PostgreSQL evaluates once and only when a row is dirty, so a clean history costs no
/// look at `pg_locks`.
///
/// The rows come from the statement's snapshot, the lock from a moment later: a runner that
/// finished its script and released the lock in between would look dirty and unlocked. So a
/// dirty, unlocked answer is read once more; a script that really failed is still dirty then.
pub(crate) async fn read(
    client: &impl GenericClient,
    schema: &Ident,
    full: bool,
) -> Result<History, tokio_postgres::Error> {
    let history = read_once(client, schema, full).await?;
    if history.locked || !history.rows.iter().any(|r| r.dirty) {
        return Ok(history);
    }
    read_once(client, schema, full).await
}

async fn read_once(
    client: &impl GenericClient,
    schema: &Ident,
    full: bool,
) -> Result<History, tokio_postgres::Error> {
    match read_rows(client, schema, full, "version_text").await {
        // A table an older svcdb wrote: no `version_text` yet.
        Err(e) if e.code() == Some(&SqlState::UNDEFINED_COLUMN) => {
            let mut history = read_rows(client, schema, full, "NULL::text").await?;
            history.legacy = true;
            Ok(history)
        }
        other => other,
    }
}

/// The rows, with `version_text` (an SQL expression of type text) as each row's version text.
async fn read_rows(
    client: &impl GenericClient,
    schema: &Ident,
    full: bool,
    version_text: &str,
) -> Result<History, tokio_postgres::Error> {
    let extra = if full {
        ", applied_at, execution_us, applied_by, transactional"
    } else {
        ""
    };
    let sql = format!(
        "SELECT version, {version_text}, name, checksum, dirty,
                CASE WHEN dirty THEN extract(epoch FROM now() - applied_at)::float8 END,
                CASE WHEN dirty THEN {} END{extra}
           FROM {}",
        super::lock::held_by_another_sql(schema),
        table(schema)
    );
    let rows = match client.query_typed(&sql, &[]).await {
        Ok(rows) => rows,
        Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => return Ok(History::default()),
        Err(e) => return Err(e),
    };
    let locked = rows
        .iter()
        .any(|r| r.get::<_, Option<bool>>(6) == Some(true));
    let mut rows: Vec<HistoryRow> = rows
        .iter()
        .map(|r| HistoryRow {
            version: row_version(r.get(0), r.get(1)),
            name: r.get(2),
            checksum: r.get(3),
            dirty: r.get(4),
            // A clock step back can make the difference negative: read it as just started.
            dirty_for: r
                .get::<_, Option<f64>>(5)
                .map(|secs| Duration::try_from_secs_f64(secs).unwrap_or_default()),
            detail: full.then(|| HistoryDetail {
                applied_at: r.get(7),
                execution: r
                    .get::<_, Option<i64>>(8)
                    .map(|us| Duration::from_micros(us.max(0) as u64)),
                applied_by: r.get(9),
                transactional: r.get(10),
            }),
        })
        .collect();
    // By version, not by the integer column: see the module documentation.
    rows.sort_by(|a, b| a.version.cmp(&b.version));
    Ok(History {
        exists: true,
        rows,
        locked,
        legacy: false,
    })
}

/// A row's version: its text when that is one (svcdb writes only valid ones), else the
/// integer's digits (a row an older release wrote, or a text edited by hand).
fn row_version(number: i64, text: Option<String>) -> Version {
    text.and_then(|t| t.parse().ok())
        .or_else(|| Version::try_from(number).ok())
        // A negative integer was never written by svcdb: show it as version 0 rather than fail
        // every command on a hand-edited row.
        .unwrap_or_else(|| Version::from(0u32))
}

/// Inserts rows for `migrations` in one statement, whatever their number; a `None` duration
/// records a migration that did not run (yet).
pub(crate) async fn insert(
    client: &impl GenericClient,
    schema: &Ident,
    migrations: &[(&Migration, Option<Duration>)],
    dirty: bool,
) -> Result<(), tokio_postgres::Error> {
    let versions: Vec<i64> = migrations.iter().map(|(m, _)| m.version.key()).collect();
    let texts: Vec<&str> = migrations.iter().map(|(m, _)| m.version.as_str()).collect();
    let names: Vec<&str> = migrations.iter().map(|(m, _)| m.name.as_str()).collect();
    let checksums: Vec<String> = migrations
        .iter()
        .map(|(m, _)| m.checksum.to_hex())
        .collect();
    let micros: Vec<Option<i64>> = migrations
        .iter()
        .map(|(_, d)| d.map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX)))
        .collect();
    let transactional: Vec<bool> = migrations.iter().map(|(m, _)| m.transactional).collect();
    let sql = format!(
        "INSERT INTO {} (version, version_text, name, checksum, execution_us, transactional, dirty)
         SELECT v, vt, n, c, e, t, $7 FROM unnest($1, $2, $3, $4, $5, $6) AS u(v, vt, n, c, e, t)",
        table(schema)
    );
    client
        .execute_typed(
            &sql,
            &[
                (&versions, Type::INT8_ARRAY),
                (&texts, Type::TEXT_ARRAY),
                (&names, Type::TEXT_ARRAY),
                (&checksums, Type::TEXT_ARRAY),
                (&micros, Type::INT8_ARRAY),
                (&transactional, Type::BOOL_ARRAY),
                (&dirty, Type::BOOL),
            ],
        )
        .await
        .map(drop)
}

/// Sets or clears the dirty mark; clearing also records how long the script took. Setting it
/// (before a non-transactional down script) stamps `applied_at` with the start, so an
/// in-progress down reports how long it has run.
pub(crate) async fn set_dirty(
    client: &impl GenericClient,
    schema: &Ident,
    version: &Version,
    dirty: bool,
    execution: Option<Duration>,
) -> Result<(), tokio_postgres::Error> {
    let micros = execution.map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
    let sql = format!(
        "UPDATE {} SET dirty = $2, execution_us = coalesce($3, execution_us),
                applied_at = CASE WHEN $2 THEN now() ELSE applied_at END
          WHERE version = $1",
        table(schema)
    );
    client
        .execute_typed(
            &sql,
            &[
                (&version.key(), Type::INT8),
                (&dirty, Type::BOOL),
                (&micros, Type::INT8),
            ],
        )
        .await
        .map(drop)
}

/// Deletes the rows of `versions`.
pub(crate) async fn delete(
    client: &impl GenericClient,
    schema: &Ident,
    versions: &[&Version],
) -> Result<(), tokio_postgres::Error> {
    let versions: Vec<i64> = versions.iter().map(|v| v.key()).collect();
    let sql = format!("DELETE FROM {} WHERE version = ANY($1)", table(schema));
    client
        .execute_typed(&sql, &[(&versions, Type::INT8_ARRAY)])
        .await
        .map(drop)
}

/// Records the file's current checksum, name and version text for an applied version
/// (`repair`).
pub(crate) async fn realign(
    client: &impl GenericClient,
    schema: &Ident,
    migration: &Migration,
) -> Result<(), tokio_postgres::Error> {
    let sql = format!(
        "UPDATE {} SET checksum = $2, name = $3, version_text = $4 WHERE version = $1",
        table(schema)
    );
    client
        .execute_typed(
            &sql,
            &[
                (&migration.version.key(), Type::INT8),
                (&migration.checksum.to_hex(), Type::TEXT),
                (&migration.name, Type::TEXT),
                (&migration.version.as_str(), Type::TEXT),
            ],
        )
        .await
        .map(drop)
}
