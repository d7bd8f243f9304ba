//! What the runner is allowed to do and how long it may wait: [`MigrateOptions`] for every
//! command, [`UpOptions`] and [`DownOptions`] per call.

use std::time::Duration;

use super::version::Version;

/// How the runner treats drift and how long it lets things wait.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// Accept applied migrations whose up file changed (`repair` records the new checksum for
    /// good). Default: false.
    pub allow_changed: bool,
    /// Run pending migrations older than the newest applied one. Default: false.
    pub allow_out_of_order: bool,
    /// Accept applied versions that have no file. Default: false.
    pub ignore_missing: bool,
    /// How long to wait for another runner's lock on the same schema (a long deploy of another
    /// replica, e.g. a migration in progress building an index concurrently) before failing
    /// with [`MigrateError::LockTimeout`](super::MigrateError::LockTimeout). Default: 10 min.
    pub lock_wait: Duration,
    /// `lock_timeout` while migrating: a DDL statement waiting this long for a table lock held by
    /// live traffic fails instead of queueing every later query of that table behind it.
    /// Default: 10 s. `Duration::ZERO` means no limit. Not applied to the `CONCURRENTLY`
    /// statements of a non-transactional migration (`CREATE`/`DROP INDEX`, `REINDEX`,
    /// `DETACH PARTITION`), which block no reads or writes while they wait out every older
    /// transaction in the database; a script's own `SET lock_timeout` to another value is
    /// kept for them. The server counts whole milliseconds in
    /// an `int`: less than 1 ms is sent as 1 ms, more than `i32::MAX` ms (about 24 days) as that.
    pub lock_timeout: Duration,
    /// How many times a script that hit `lock_timeout` (SQLSTATE 55P03) is tried again before
    /// the deploy fails: a transactional script's whole transaction (its group of consecutive
    /// transactional migrations) is rolled back and run again; a non-transactional script's
    /// failing statement alone is run again (not when the schema then holds an invalid index,
    /// which a `CREATE INDEX CONCURRENTLY` cut short leaves: running it again would fail or,
    /// with `IF NOT EXISTS`, accept the broken index). Each retry is reported as
    /// [`MigrateEvent::LockRetry`](super::MigrateEvent::LockRetry). Default: 3; 0: fail at the
    /// first timeout.
    pub lock_retries: u32,
    /// The pause before the first retry after a lock timeout; it doubles for each later one,
    /// plus a random jitter of up to as much again, so that the runner does not queue behind
    /// the same traffic at the same moment each time. Default: 1 s.
    pub lock_retry_backoff: Duration,
    /// `statement_timeout` while migrating; `None` means no limit (the server default is not
    /// inherited: a backfill may legitimately run long). Default: `None`. Rounded as
    /// [`lock_timeout`](Self::lock_timeout) is.
    pub statement_timeout: Option<Duration>,
    /// Let `up` run statements that [`lint`](mod@super::lint) reports as errors (reported as
    /// [`MigrateEvent::Lint`](super::MigrateEvent::Lint) instead of refused with
    /// [`MigrateError::Unsafe`](super::MigrateError::Unsafe)). Default: false.
    pub allow_unsafe: bool,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        Self {
            allow_changed: false,
            allow_out_of_order: false,
            ignore_missing: false,
            lock_wait: Duration::from_secs(600),
            lock_timeout: Duration::from_secs(10),
            lock_retries: 3,
            lock_retry_backoff: Duration::from_secs(1),
            statement_timeout: None,
            allow_unsafe: false,
        }
    }
}

/// What `up` runs.
#[derive(Debug, Clone, Default)]
pub struct UpOptions {
    /// Apply pending migrations up to and including this version only. Default: all.
    pub to: Option<Version>,
    /// Report what would run without running it (and without taking the lock). Default: false.
    pub dry_run: bool,
}

/// What `down` reverts.
#[derive(Debug, Clone)]
pub struct DownOptions {
    /// Revert this many applied migrations, newest first. Default: 1. Ignored when `to` is set.
    pub steps: usize,
    /// Revert every applied migration newer than this version (version `0`, `Version::from(0)`: all of them, when versions start at 1).
    /// Default: `None`.
    pub to: Option<Version>,
    /// Report what would be reverted without reverting it. Default: false.
    pub dry_run: bool,
}

impl Default for DownOptions {
    fn default() -> Self {
        Self {
            steps: 1,
            to: None,
            dry_run: false,
        }
    }
}
