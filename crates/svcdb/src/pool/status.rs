//! Pool status: sizes, waiters and acquire-wait percentiles, for logs and health reports.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::config::human_duration;
use crate::error::{connect_hint, pg_message, NO_ANSWER_HINT};

/// What to do about an attempt that got no answer, when the acquire timeout ended it before
/// the connect timeout could: raising the connect timeout would change nothing (found by a
/// user trial: `SVCDB_CONNECT_TIMEOUT=30s` gave up after the 5 s acquire timeout, told to
/// raise SVCDB_CONNECT_TIMEOUT).
pub(crate) const NO_ANSWER_CUT_SHORT_HINT: &str = "check that DATABASE_URL names PostgreSQL's host and port (what answers there is not PostgreSQL, or is stuck); for a slow server or network, raise SVCDB_ACQUIRE_TIMEOUT above SVCDB_CONNECT_TIMEOUT (or the URL's connect_timeout): the acquire timeout ended the wait first";

/// What to do about an attempt that got no answer: raise the timeout that ended it.
pub(crate) fn no_answer_hint(cut_short: bool) -> &'static str {
    if cut_short {
        NO_ANSWER_CUT_SHORT_HINT
    } else {
        NO_ANSWER_HINT
    }
}

/// A snapshot of a pool, cheap to take (one mutex, no I/O).
#[derive(Debug, Clone, Serialize)]
pub struct PoolStatus {
    /// Most connections the pool may open.
    pub max_size: usize,
    /// Connections open now (idle + in use).
    pub size: usize,
    /// Open connections waiting in the pool.
    pub idle: usize,
    /// Connections handed out and not yet returned.
    pub in_use: usize,
    /// Callers waiting for a connection.
    pub waiting: usize,
    /// How long callers waited for a connection, since the pool started.
    pub acquire_wait: WaitPercentiles,
    /// Acquires that ended in a timeout, since the pool started.
    pub acquire_timeouts: u64,
    /// The last error met while opening a connection, if the last attempt failed.
    pub last_connect_error: Option<String>,
}

/// One log-friendly line: `size=5/25 idle=3 in_use=2 waiting=0 wait_p50=0.02ms wait_p99=0.30ms timeouts=0`.
impl std::fmt::Display for PoolStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "size={}/{} idle={} in_use={} waiting={} wait_p50={:.2}ms wait_p99={:.2}ms timeouts={}",
            self.size,
            self.max_size,
            self.idle,
            self.in_use,
            self.waiting,
            self.acquire_wait.p50_ms,
            self.acquire_wait.p99_ms,
            self.acquire_timeouts
        )?;
        if let Some(e) = &self.last_connect_error {
            write!(f, " last_connect_error={e:?}")?;
        }
        Ok(())
    }
}

/// Percentiles of acquire waits, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct WaitPercentiles {
    /// Acquires measured.
    pub count: u64,
    /// Median wait.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Longest wait.
    pub max_ms: f64,
}

/// Shared counters behind [`PoolStatus`].
#[derive(Debug)]
pub(crate) struct PoolStats {
    /// Acquire waits in microseconds; hdrhistogram keeps percentiles exact to 3 digits in
    /// constant memory, whatever the number of acquires.
    waits: Mutex<Histogram<u64>>,
    timeouts: std::sync::atomic::AtomicU64,
    /// The last failed connection attempt's message and what to do about it; cleared by the
    /// next success.
    last_connect_error: Mutex<Option<(String, &'static str)>>,
    /// The pool's labels, for the connect-error counter (labelled by cause when it happens).
    labels: Arc<[metrics::Label]>,
    /// `db_client_connection_wait_time_seconds`.
    wait_time: metrics::Histogram,
    /// `db_client_connection_timeouts_total`.
    timeout_count: metrics::Counter,
}

impl PoolStats {
    pub(crate) fn new(labels: &Arc<[metrics::Label]>) -> Self {
        Self {
            labels: labels.clone(),
            wait_time: metrics::histogram!("db_client_connection_wait_time_seconds", labels.iter()),
            timeout_count: metrics::counter!("db_client_connection_timeouts_total", labels.iter()),
            // 1 µs .. 1 h at 3 significant digits: ~ 30 KiB, fixed.
            waits: Mutex::new(
                Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds"),
            ),
            timeouts: Default::default(),
            last_connect_error: Mutex::new(None),
        }
    }

    pub(crate) fn record_wait(&self, waited: Duration) {
        self.wait_time.record(waited.as_secs_f64());
        let micros = u64::try_from(waited.as_micros()).unwrap_or(u64::MAX);
        self.waits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .saturating_record(micros.max(1));
    }

    pub(crate) fn record_timeout(&self) {
        self.timeout_count.increment(1);
        self.timeouts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn set_connect_error(&self, error: Option<&tokio_postgres::Error>) {
        if let Some(e) = error {
            self.count_connect_error(crate::metrics::connect_error_cause(e));
        }
        *self
            .last_connect_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = error.map(|e| (pg_message(e), connect_hint(e)));
    }

    /// Records an attempt that got no answer within `waited`; `cut_short` when the acquire
    /// deadline, not the connect timeout, ended it.
    pub(crate) fn set_no_answer(&self, waited: Duration, cut_short: bool) {
        self.count_connect_error("no_answer");
        *self
            .last_connect_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some((
            format!(
                "no answer from the server within {}",
                human_duration(waited)
            ),
            no_answer_hint(cut_short),
        ));
    }

    /// Counts a failed connection attempt in `svcdb_pool_connect_errors_total{cause}`.
    fn count_connect_error(&self, cause: &'static str) {
        let labels = crate::metrics::with_labels(&self.labels, &[("cause", cause.to_owned())]);
        metrics::counter!("svcdb_pool_connect_errors_total", labels).increment(1);
    }

    /// The hint for the last failed connection attempt, if the last attempt failed.
    pub(crate) fn last_connect_hint(&self) -> Option<&'static str> {
        self.last_connect_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(_, hint)| *hint)
    }

    pub(crate) fn snapshot(&self, pool: &deadpool_postgres::Status) -> PoolStatus {
        let waits = self.waits.lock().unwrap_or_else(|p| p.into_inner());
        let ms = |micros: u64| micros as f64 / 1000.0;
        let acquire_wait = if waits.is_empty() {
            WaitPercentiles::default()
        } else {
            WaitPercentiles {
                count: waits.len(),
                p50_ms: ms(waits.value_at_quantile(0.50)),
                p90_ms: ms(waits.value_at_quantile(0.90)),
                p99_ms: ms(waits.value_at_quantile(0.99)),
                max_ms: ms(waits.max()),
            }
        };
        PoolStatus {
            max_size: pool.max_size,
            size: pool.size,
            idle: pool.available,
            in_use: pool.size - pool.available,
            waiting: pool.waiting,
            acquire_wait,
            acquire_timeouts: self.timeouts.load(std::sync::atomic::Ordering::Relaxed),
            last_connect_error: self
                .last_connect_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .map(|(message, _)| message.clone()),
        }
    }
}
