//! Health reports: is the database reachable and how fast, the pool, the migration version and
//! the start-up gate's problems, in one report cheap enough to ask for every few seconds.

use std::fmt;

use serde::Serialize;

use crate::metrics::OutboxBacklog;
use crate::pool::{PoolStatus, ServiceDb};
use crate::schema::{Gate, GateReport};

/// The state of a service's database access; `gate.ready` says whether it may take traffic.
///
/// As JSON the gate's fields come first, at the top level:
/// `{"ready":true,"schema":"orders","migration_version":"0003","migrations_checked":true,
/// "problems":[],"notices":[],"database":{"reachable":true,"latency_ms":0.4},"pool":{…},
/// "outbox":{"rows":0,"oldest_age_seconds":null}}`.
///
/// ```no_run
/// # async fn demo(db: svcdb::ServiceDb, gate: svcdb::Gate) {
/// let report = db.health(&gate).await; // never waits longer than the gate's timeout
/// if !report.gate.ready {
///     eprintln!("{report}");
/// }
/// # }
/// ```
///
/// A healthy report costs one round trip: the gate's catalog probe and history read are
/// pipelined on one pooled connection (plus the pool's ping when that connection sat idle
/// longer than `SVCDB_VERIFY_AFTER_IDLE`), and two short queries for the outbox's backlog when
/// the database answered. The pool figures come from memory. Each report also sets the
/// `svcdb_gate_ready` and `svcdb_migration_version` gauges ([`crate::metrics`]).
#[derive(Debug, Clone, Serialize)]
pub struct HealthReport {
    /// The gate's verdict: ready, schema, migration version, problems (an unreachable
    /// database is one of them).
    #[serde(flatten)]
    pub gate: GateReport,
    /// Whether the database answered, and how fast.
    pub database: DatabaseHealth,
    /// Pool sizes, waiters, acquire-wait percentiles, last connection error.
    pub pool: PoolStatus,
    /// The outbox rows waiting to be published and the oldest one's age; `null` when the
    /// service has no outbox table, or the database did not answer.
    pub outbox: Option<OutboxBacklog>,
}

/// Whether the database answered the checks, and how fast.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct DatabaseHealth {
    /// True when the checks' queries got an answer within the timeout.
    pub reachable: bool,
    /// The checks' round trip in milliseconds, once a connection was had (`None` when
    /// unreachable). Waiting for the connection shows in the pool's `acquire_wait`.
    pub latency_ms: Option<f64>,
}

/// Longest wait for the outbox's backlog in a health report, after the gate's checks: a
/// database that answered them and then stalls costs a probe this much more, not the pool's
/// acquire timeout.
const OUTBOX_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

impl ServiceDb {
    /// Runs `gate`'s checks and adds reachability, latency, pool status and the outbox's
    /// backlog. Never fails, and never waits longer than the gate's timeout plus 1 s (the
    /// backlog is asked for only once the database answered the gate):
    /// an unreachable database is reported, not returned as an error.
    pub async fn health(&self, gate: &Gate) -> HealthReport {
        let (gate, latency) = gate.run(self).await;
        // Only once the database answered the gate: an unreachable one already took its time.
        let outbox = match latency {
            Some(_) => tokio::time::timeout(OUTBOX_TIMEOUT, self.outbox_backlog())
                .await
                .ok()
                .and_then(Result::ok)
                .flatten(),
            None => None,
        };
        HealthReport {
            gate,
            database: DatabaseHealth {
                reachable: latency.is_some(),
                // Whole microseconds: finer digits are noise, and they clutter the JSON.
                latency_ms: latency.map(|d| d.as_micros() as f64 / 1e3),
            },
            pool: self.status(),
            outbox,
        }
    }
}

/// The database line, the pool line, then the gate's report.
impl fmt::Display for HealthReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.database.latency_ms {
            Some(ms) => writeln!(f, "database: reachable, {ms:.2} ms")?,
            None => writeln!(f, "database: unreachable")?,
        }
        writeln!(f, "pool: {}", self.pool)?;
        if let Some(outbox) = &self.outbox {
            match outbox.oldest_age_seconds {
                Some(age) => writeln!(f, "outbox: {} unpublished, oldest {age:.1} s", outbox.rows)?,
                None => writeln!(f, "outbox: 0 unpublished")?,
            }
        }
        write!(f, "{}", self.gate)
    }
}
