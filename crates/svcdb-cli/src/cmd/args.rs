//! Options more than one command takes, in one place: the gate's, for `svcdb schema verify`
//! and `svcdb health`, with the exit code of the gate's verdict; and the broker's URL, for
//! `svcdb health` and `svcdb events replay`.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use svcdb::{Gate, ServiceDb};

use crate::global::{Global, DEFAULT_MIGRATIONS_DIR};
use crate::output::errln;
use crate::Outcome;

/// An `--amqp-url` or `AMQP_URL` as given: `None` when absent or empty. clap hands an empty
/// variable through as the URL "" (found by a user trial: `AMQP_URL= svcdb health` failed on
/// "not an AMQP URL"); empty is unset, as for DATABASE_URL and `AmqpConfig::from_env`.
pub fn amqp_url(given: Option<String>) -> Option<String> {
    given.filter(|url| !url.trim().is_empty())
}

/// What the gate checks besides the schema, and how long it may wait; `svcdb health` takes
/// the same options.
#[derive(clap::Args)]
pub struct GateArgs {
    /// Tables (or views) that must exist in the service schema, comma-separated.
    #[arg(long, value_name = "TABLES", value_delimiter = ',')]
    require: Vec<String>,

    /// Longest wait for the database (connecting included) before it counts as unreachable;
    /// for `svcdb health` with a broker, also the longest wait for the broker.
    #[arg(long, allow_hyphen_values = true, value_name = "DURATION", default_value = "2s", value_parser = crate::global::positive_duration)]
    timeout: Duration,

    /// Accept applied migrations that --dir does not hold though it holds newer ones (removed
    /// on purpose), as `svcdb migrate up --ignore-missing` does; by default they make the
    /// service not ready, as a branch's or another release's migration.
    #[arg(long)]
    ignore_missing: bool,
}

impl GateArgs {
    /// `--timeout`: the longest wait for the database (and, for `svcdb health`, the broker).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The pool and the gate. The pool is lazy (`ServiceDb::new`): an unreachable database
    /// becomes a problem in the report rather than an error before it, and nothing is created
    /// (not even with `SVCDB_CREATE_SCHEMA`), since a check must not change what it checks.
    pub fn prepare(&self, global: &Global) -> Result<(ServiceDb, Gate)> {
        let mut gate = Gate::new()
            .timeout(self.timeout)
            .require(&self.require)?
            .allow_unknown_applied(self.ignore_missing);
        if global.dir.exists() || global.dir != Path::new(DEFAULT_MIGRATIONS_DIR) {
            gate = gate.with_migrations(global.migrations()?);
        } else {
            errln!(
                "note: no {DEFAULT_MIGRATIONS_DIR} folder, so migrations are not checked; pass --dir to check them"
            );
        }
        // `--timeout` is the longest wait for a connection too: the pool's own bound
        // (SVCDB_ACQUIRE_TIMEOUT, 5 s) cut a `--timeout 10s` short (found by a user trial).
        let mut config = global.config()?;
        config.acquire_timeout = self.timeout;
        Ok((ServiceDb::new(config)?, gate))
    }
}

/// Exit 0 when ready, 1 when not.
pub fn outcome(ready: bool) -> Outcome {
    if ready {
        Outcome::Success
    } else {
        Outcome::NotReady
    }
}
