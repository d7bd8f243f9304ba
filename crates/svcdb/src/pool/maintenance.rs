//! The pool's background task: keeps `pool_min` connections open and retires connections that
//! are closed, idle too long or too old. deadpool leaves both to the application.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::{Metrics, Timeouts};

use super::status::PoolStats;
use crate::config::Config;
use crate::error::pg_message;

/// How often the task looks at the pool. Retiring is a scan of at most `pool_max` idle slots
/// under one mutex, so a short period costs nothing measurable.
const TICK: Duration = Duration::from_millis(500);

/// The limits the task enforces, copied out of [`Config`].
pub(super) struct Limits {
    min: usize,
    idle_timeout: Option<Duration>,
    max_lifetime: Option<Duration>,
    jitter: Duration,
    connect_timeout: Duration,
}

impl From<&Config> for Limits {
    fn from(c: &Config) -> Self {
        Self {
            min: c.pool_min,
            idle_timeout: c.idle_timeout,
            max_lifetime: c.max_lifetime,
            jitter: c.max_lifetime_jitter,
            connect_timeout: c.connect_attempt_timeout(),
        }
    }
}

/// Runs until the pool is dropped.
pub(super) async fn run(pool: deadpool_postgres::WeakPool, limits: Limits, stats: Arc<PoolStats>) {
    // The first tick one TICK from now, not at once: `ServiceDb::connect` opens the first
    // connections itself, and an immediate top-up would race it, making a second attempt at a
    // server that just refused the password.
    let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + TICK, TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut retry_at = Instant::now();
    let mut backoff = TICK;
    let mut idle = IdleSince::default();
    loop {
        interval.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        if pool.is_closed() {
            return;
        }
        retire(&pool, &limits, &mut idle);
        if Instant::now() >= retry_at {
            match top_up(&pool, &limits).await {
                Ok(()) => backoff = TICK,
                Err(e) => {
                    let message = pg_message(&e);
                    tracing::warn!(target: "svcdb::pool", error = %message, retry_in = ?backoff, "cannot open connections to reach pool_min");
                    stats.set_connect_error(Some(&e));
                    retry_at = Instant::now() + backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
}

/// When each idle connection was first seen back in the pool, keyed by its creation instant.
///
/// deadpool's `Metrics::last_used` counts from the last *checkout*, so a connection held for
/// ten minutes would look idle for ten minutes the moment it is returned and be retired at
/// once. Its `recycled` instant changes on every checkout, so a connection seen with a new one
/// has been borrowed and returned since the last scan: its idle time starts now (accurate to one
/// [`TICK`]).
#[derive(Default)]
struct IdleSince {
    /// Creation instant → (the `recycled` instant seen, when it was first seen idle with it).
    seen: HashMap<Instant, (Option<Instant>, Instant)>,
}

impl IdleSince {
    /// How long the connection has been idle, recording it in `next` (connections not seen in
    /// a scan are borrowed or gone, and are forgotten).
    fn idle_for(&self, metrics: &Metrics, now: Instant, next: &mut Self) -> Duration {
        let since = match self.seen.get(&metrics.created) {
            Some(&(recycled, since)) if recycled == metrics.recycled => since,
            _ => now,
        };
        next.seen.insert(metrics.created, (metrics.recycled, since));
        now - since
    }
}

/// Drops idle connections that are closed, past their (jittered) lifetime, or idle past the
/// idle timeout while the pool holds more than `min`.
fn retire(pool: &deadpool_postgres::Pool, limits: &Limits, idle: &mut IdleSince) {
    let mut size = pool.status().size;
    let now = Instant::now();
    let mut next = IdleSince::default();
    let result = pool.retain(|client, metrics| {
        let expired = limits.max_lifetime.is_some_and(|max| {
            metrics.age() > max.saturating_add(jitter_for(&metrics, limits.jitter))
        });
        let idle_for = idle.idle_for(&metrics, now, &mut next);
        let idle_too_long =
            size > limits.min && limits.idle_timeout.is_some_and(|limit| idle_for > limit);
        let keep = !(client.is_closed() || expired || idle_too_long);
        if !keep {
            size -= 1;
        }
        keep
    });
    *idle = next;
    if !result.removed.is_empty() {
        tracing::debug!(target: "svcdb::pool", retired = result.removed.len(), "retired idle connections");
    }
}

/// A stable per-connection share of the jitter, derived from its creation instant, so that
/// connections opened together expire spread over the jitter window.
fn jitter_for(metrics: &Metrics, jitter: Duration) -> Duration {
    if jitter.is_zero() {
        return Duration::ZERO;
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    metrics.created.hash(&mut h);
    let jitter_ms = u64::try_from(jitter.as_millis()).unwrap_or(u64::MAX).max(1);
    Duration::from_millis(h.finish() % jitter_ms)
}

/// Opens connections until the pool holds `min`, without waiting on a busy pool: a borrowed
/// connection counts toward the minimum already.
async fn top_up(
    pool: &deadpool_postgres::Pool,
    limits: &Limits,
) -> Result<(), tokio_postgres::Error> {
    let status = pool.status();
    if status.size >= limits.min || status.waiting > 0 {
        return Ok(());
    }
    let timeouts = Timeouts {
        wait: Some(Duration::ZERO),
        create: Some(limits.connect_timeout),
        recycle: Some(limits.connect_timeout),
    };
    let need = limits.min - status.size;
    // Holding them all at once makes each `get` open a new connection rather than reuse the
    // one just returned.
    let got = futures_util::future::join_all((0..need).map(|_| pool.timeout_get(&timeouts))).await;
    for result in got {
        if let Err(deadpool_postgres::PoolError::Backend(e)) = result {
            return Err(e);
        }
    }
    Ok(())
}
