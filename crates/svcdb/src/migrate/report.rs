//! What each command did, serde-serializable for `--json` output.

use std::time::Duration;

use serde::Serialize;

use super::version::Version;

/// `d` in milliseconds, to the microsecond: what the server's clock and ours can tell apart,
/// without float noise (`0.08600000000000001`) in the JSON.
pub(crate) fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// One migration run (or, in a dry run, to be run).
#[derive(Debug, Clone, Serialize)]
pub struct RunEntry {
    /// Its version.
    pub version: Version,
    /// Its name.
    pub name: String,
    /// Whether its script ran in a transaction.
    pub transactional: bool,
    /// How long the script took, in milliseconds; `None` (JSON `null`) when it did not run: in a
    /// dry run, a baseline or an adoption.
    pub duration_ms: Option<f64>,
}

/// What `up` did.
#[derive(Debug, Clone, Serialize)]
pub struct UpReport {
    /// The service schema.
    pub schema: String,
    /// True when nothing ran: `migrations` is what would run.
    pub dry_run: bool,
    /// True when every migration ran in one transaction.
    pub atomic: bool,
    /// Applied, oldest first (empty when up to date).
    pub migrations: Vec<RunEntry>,
    /// The newest applied version afterwards.
    pub current_version: Option<Version>,
    /// Flyway's repeatable migrations run after the versioned ones (never run, or changed),
    /// by name; in a dry run, those that would run.
    pub repeatables: Vec<super::repeatable::RepeatableRun>,
}

/// What `down` did.
#[derive(Debug, Clone, Serialize)]
pub struct DownReport {
    /// The service schema.
    pub schema: String,
    /// True when nothing ran: `migrations` is what would be reverted.
    pub dry_run: bool,
    /// Reverted, newest first.
    pub migrations: Vec<RunEntry>,
    /// The newest applied version afterwards.
    pub current_version: Option<Version>,
}

/// What `redo` did: the newest migration reverted and applied again.
#[derive(Debug, Clone, Serialize)]
pub struct RedoReport {
    /// The revert.
    pub down: DownReport,
    /// The re-apply.
    pub up: UpReport,
}

/// What `baseline` recorded.
#[derive(Debug, Clone, Serialize)]
pub struct BaselineReport {
    /// The service schema.
    pub schema: String,
    /// True when nothing was written ([`Migrator::baseline_dry_run`](super::Migrator::baseline_dry_run)).
    pub dry_run: bool,
    /// In a dry run, true when another runner held the schema's migration lock: the real run
    /// waits for it (up to the lock wait), then records only what that runner did not apply.
    pub locked: bool,
    /// Migrations recorded as applied without running them.
    pub recorded: Vec<RunEntry>,
}

/// One thing `repair` did.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum RepairAction {
    /// Deleted a dirty history row: the migration counts as pending again.
    ClearedDirty {
        /// The version.
        version: Version,
        /// Its name.
        name: String,
    },
    /// Recorded the current checksum of a changed applied file.
    RealignedChecksum {
        /// The version.
        version: Version,
        /// Its name.
        name: String,
        /// The checksum recorded before.
        old: String,
        /// The file's checksum, recorded now.
        new: String,
    },
}

/// What `repair` did.
#[derive(Debug, Clone, Serialize)]
pub struct RepairReport {
    /// The service schema.
    pub schema: String,
    /// Each change, by version; empty when there was nothing to repair.
    pub actions: Vec<RepairAction>,
    /// Every invalid index of the schema, each with the statement that drops it: `repair`
    /// names them and leaves dropping them to the operator.
    pub invalid_indexes: Vec<InvalidIndex>,
}

/// An index PostgreSQL marked invalid (`pg_index.indisvalid = false`): left behind by a
/// `CREATE INDEX CONCURRENTLY` (or `REINDEX CONCURRENTLY`) that failed or was cancelled, or
/// still being built. Queries never use it, but writes keep updating it, and
/// `CREATE INDEX IF NOT EXISTS` takes it for the index it wanted: drop it, then build it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InvalidIndex {
    /// The index, without the schema.
    pub name: String,
    /// The table it indexes, without the schema.
    pub table: String,
    /// The statement that drops it, e.g. `DROP INDEX CONCURRENTLY shop.items_sku_key`
    /// (without `CONCURRENTLY` for an index of a partitioned table, which cannot be dropped
    /// concurrently).
    pub drop_statement: String,
}
