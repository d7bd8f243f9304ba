//! Retention: the runtimes delete old claims and published outbox rows on a schedule, so the
//! inbox (`svcdb_processed_events`) and the outbox (`svcdb_outbox`) do not grow forever.

use std::future::Future;
use std::time::Duration;

use svcdb::{Outbox, ServiceDb};
use tokio_util::sync::{CancellationToken, DropGuard};

/// How long a runtime keeps old rows, and how often it deletes older ones.
///
/// A [`Consumer`](crate::Consumer) purges claims older than
/// [`ConsumerOptions::retention`](crate::ConsumerOptions::retention) (default
/// [`Retention::claims`]: 7 days) and a [`Relay`](crate::Relay) purges rows published longer ago
/// than [`RelayConfig::retention`](crate::RelayConfig::retention) (default
/// [`Retention::published`]: 24 hours). Each runs its purge once at start and then every
/// [`Retention::interval`], in the background, until shut down. The purges delete in small
/// batches, each its own short transaction ([`ServiceDb::purge_processed`],
/// [`Outbox::purge_published`]), so handling and relaying go on meanwhile; replicas purging at
/// once skip each other's rows.
///
/// Keep claims far longer than a message can wait in a queue: an event redelivered after its
/// claim is gone is handled again. To purge from a cron job instead, set
/// [`Retention::disabled`] and run `svcdb events purge --older-than 7d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Rows older than this are deleted; `None` never deletes (purge by other means).
    pub keep: Option<Duration>,
    /// The pause between purges. Default: 1 hour.
    pub interval: Duration,
}

/// The default pause between purges: rows are deleted at most an hour after they expire.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(3600);

impl Retention {
    /// Claims are kept 7 days: longer than any message waits in a queue or dead-letter
    /// queue before it is replayed, so a redelivery still finds its claim.
    pub const fn claims() -> Self {
        Self {
            keep: Some(Duration::from_secs(7 * 24 * 3600)),
            interval: DEFAULT_INTERVAL,
        }
    }

    /// Published outbox rows are kept 24 hours, for looking up what was sent recently.
    pub const fn published() -> Self {
        Self {
            keep: Some(Duration::from_secs(24 * 3600)),
            interval: DEFAULT_INTERVAL,
        }
    }

    /// Keeps every row: for a service that purges from a scheduled job
    /// (`svcdb events purge`) instead.
    pub const fn disabled() -> Self {
        Self {
            keep: None,
            interval: DEFAULT_INTERVAL,
        }
    }
}

/// Purges the service's claims on `retention`'s schedule until `shutdown` is cancelled or the
/// returned guard is dropped. For [`Consumer::run`](crate::Consumer::run).
pub(crate) fn purge_claims(
    db: &ServiceDb,
    retention: &Retention,
    shutdown: &CancellationToken,
) -> DropGuard {
    let purged = Purged::new(db, svcdb::idempotency::PROCESSED_EVENTS_TABLE);
    let db = db.clone();
    spawn(retention, shutdown, "claims", purged, move |keep| {
        let db = db.clone();
        async move { db.purge_processed(keep).await }
    })
}

/// Purges the published outbox rows on `retention`'s schedule until `shutdown` is cancelled
/// or the returned guard is dropped. For [`Relay::run`](crate::Relay::run).
pub(crate) fn purge_published(
    outbox: &Outbox,
    retention: &Retention,
    shutdown: &CancellationToken,
) -> DropGuard {
    let purged = Purged::new(outbox.db(), svcdb::outbox::OUTBOX_TABLE);
    let outbox = outbox.clone();
    spawn(
        retention,
        shutdown,
        "published outbox rows",
        purged,
        move |keep| {
            let outbox = outbox.clone();
            async move { outbox.purge_published(keep).await }
        },
    )
}

/// A table's purge series: `svcdb_retention_last_purge_timestamp_seconds{table}` (the last
/// purge that succeeded, Unix time) and `svcdb_retention_purged_rows_total{table}`.
struct Purged {
    last: metrics::Gauge,
    rows: metrics::Counter,
}

impl Purged {
    fn new(db: &ServiceDb, table: &str) -> Self {
        let labels =
            svcdb::metrics::with_labels(db.metric_labels(), &[("table", table.to_owned())]);
        Self {
            last: metrics::gauge!(
                "svcdb_retention_last_purge_timestamp_seconds",
                labels.iter()
            ),
            rows: metrics::counter!("svcdb_retention_purged_rows_total", labels.iter()),
        }
    }

    fn record(&self, deleted: u64) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        self.last.set(now.as_secs_f64());
        self.rows.increment(deleted);
    }
}

/// Runs `purge(keep)` at once and then every interval, on a task of its own that stops when
/// `shutdown` is cancelled or the guard drops (a purge in progress is dropped between or
/// during a batch; each batch is its own transaction, so what was deleted stays deleted).
/// Failures are logged and retried at the next interval: a purge is housekeeping, never a
/// reason to stop handling events.
fn spawn<F, Fut>(
    retention: &Retention,
    shutdown: &CancellationToken,
    what: &'static str,
    purged: Purged,
    purge: F,
) -> DropGuard
where
    F: Fn(Duration) -> Fut + Send + 'static,
    Fut: Future<Output = svcdb::Result<u64>> + Send,
{
    let stop = shutdown.child_token();
    let Some(keep) = retention.keep else {
        return stop.drop_guard();
    };
    let interval = retention.interval;
    let stopped = stop.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                biased;
                _ = stopped.cancelled() => return,
                outcome = purge(keep) => match outcome {
                    Ok(deleted) => {
                        purged.record(deleted);
                        if deleted > 0 {
                            tracing::info!(target: "svcdb_amqp::retention", deleted, older_than = ?keep, "purged old {what}");
                        }
                    }
                    Err(e) => tracing::warn!(target: "svcdb_amqp::retention", error = %e, retry_in = ?interval, "could not purge old {what}; retrying later"),
                },
            }
            tokio::select! {
                biased;
                _ = stopped.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    });
    stop.drop_guard()
}
