//! What a consumer did: the counters its delivery tasks bump, the snapshot
//! [`Consumer::stats`] returns, and the same counts (with the handler's duration and the
//! deliveries in flight) as Prometheus series (see `svcdb::metrics`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use std::sync::Arc;

use metrics::Label;
use svcdb::metrics::with_labels;
use svcdb::ServiceDb;

#[cfg(doc)]
use super::{Consumer, UnknownKind};

/// What a [`Consumer`] did since it was built, for metrics and tests ([`Consumer::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConsumerStats {
    /// Events whose handler ran and committed (acknowledged).
    pub handled: u64,
    /// Deliveries of events already handled (acknowledged, nothing changed).
    pub duplicates: u64,
    /// Failed attempts handed back to the queue for redelivery (`basic.reject`): each spends
    /// one of the message's deliveries.
    pub requeued: u64,
    /// Messages handed back unprocessed (`basic.nack`), because the database was unavailable
    /// or the consumer was shutting down: on RabbitMQ 4.3+ they spend no delivery.
    pub returned: u64,
    /// Times the consumer stopped taking deliveries until the database answered again.
    pub paused: u64,
    /// Messages sent to the dead-letter queue (by the consumer, or rejected to the broker's
    /// dead-lettering when that failed), counted once the attempt is over.
    pub dead_lettered: u64,
    /// Events without a handler acknowledged under [`UnknownKind::Ack`].
    pub ignored: u64,
    /// True while the consumer is consuming on a connection to the broker; false before its
    /// first connection and while it reconnects (the broker is down or unreachable).
    pub connected: bool,
}

/// One of a consumer's counts: in memory for [`ConsumerStats`], and in
/// `svcdb_consumer_messages_total{outcome}` (or `svcdb_consumer_pauses_total`) for `/metrics`.
#[derive(Debug)]
pub(super) struct Count {
    value: AtomicU64,
    metric: metrics::Counter,
}

impl Count {
    /// The count registered under `name`, with `labels` and `outcome` when given.
    fn new(name: &'static str, labels: &[Label], outcome: Option<&'static str>) -> Self {
        let labels: Vec<Label> = match outcome {
            Some(outcome) => with_labels(labels, &[("outcome", outcome.to_owned())]),
            None => labels.to_vec(),
        };
        Self {
            value: AtomicU64::new(0),
            metric: metrics::counter!(name, labels),
        }
    }

    fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }
}

/// The counters behind [`ConsumerStats`] and the consumer's series in `/metrics`, shared by a
/// consumer's clones and tasks.
#[derive(Debug)]
pub(super) struct Counters {
    pub(super) handled: Count,
    pub(super) duplicates: Count,
    pub(super) requeued: Count,
    pub(super) returned: Count,
    pub(super) paused: Count,
    pub(super) dead_lettered: Count,
    pub(super) ignored: Count,
    /// `messaging_process_duration_seconds`: the handler's transaction, claim included.
    pub(super) duration: metrics::Histogram,
    /// `svcdb_consumer_in_flight`: deliveries taken and not yet settled.
    in_flight: metrics::Gauge,
    /// True while a [`Connected`] guard lives; mirrored in `svcdb_consumer_connected`.
    connected: Arc<(AtomicBool, metrics::Gauge)>,
}

/// Marks a consumer connected (`svcdb_consumer_connected` 1) until dropped.
pub(super) struct Connected(Arc<(AtomicBool, metrics::Gauge)>);

impl Drop for Connected {
    fn drop(&mut self) {
        self.0 .0.store(false, Ordering::Relaxed);
        self.0 .1.set(0.0);
    }
}

/// Counts a delivery in flight until dropped.
pub(super) struct InFlight(metrics::Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

impl Counters {
    /// The counters of the consumer of `queue` on `db`: the pool's labels, plus
    /// `messaging_system="rabbitmq"` and `messaging_destination_name` (the queue).
    pub(super) fn new(db: &ServiceDb, queue: &str) -> Self {
        let labels = with_labels(
            db.metric_labels(),
            &[
                ("messaging_system", "rabbitmq".to_owned()),
                ("messaging_destination_name", queue.to_owned()),
            ],
        );
        const MESSAGES: &str = "svcdb_consumer_messages_total";
        Self {
            handled: Count::new(MESSAGES, &labels, Some("handled")),
            duplicates: Count::new(MESSAGES, &labels, Some("duplicate")),
            requeued: Count::new(MESSAGES, &labels, Some("failed")),
            returned: Count::new(MESSAGES, &labels, Some("returned")),
            dead_lettered: Count::new(MESSAGES, &labels, Some("dead_lettered")),
            ignored: Count::new(MESSAGES, &labels, Some("ignored")),
            paused: Count::new("svcdb_consumer_pauses_total", &labels, None),
            duration: metrics::histogram!("messaging_process_duration_seconds", labels.iter()),
            in_flight: metrics::gauge!("svcdb_consumer_in_flight", labels.iter()),
            connected: Arc::new((
                AtomicBool::new(false),
                metrics::gauge!("svcdb_consumer_connected", labels.iter()),
            )),
        }
    }

    /// Marks the consumer connected until the guard is dropped.
    pub(super) fn connected(&self) -> Connected {
        self.connected.0.store(true, Ordering::Relaxed);
        self.connected.1.set(1.0);
        Connected(self.connected.clone())
    }

    /// Counts one more.
    pub(super) fn bump(counter: &Count) {
        counter.value.fetch_add(1, Ordering::Relaxed);
        counter.metric.increment(1);
    }

    /// Counts a delivery in flight until the guard is dropped.
    pub(super) fn in_flight(&self) -> InFlight {
        self.in_flight.increment(1.0);
        InFlight(self.in_flight.clone())
    }

    /// The counts now.
    pub(super) fn snapshot(&self) -> ConsumerStats {
        ConsumerStats {
            handled: self.handled.get(),
            duplicates: self.duplicates.get(),
            requeued: self.requeued.get(),
            returned: self.returned.get(),
            paused: self.paused.get(),
            dead_lettered: self.dead_lettered.get(),
            ignored: self.ignored.get(),
            connected: self.connected.0.load(Ordering::Relaxed),
        }
    }
}
