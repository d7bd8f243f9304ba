//! Prometheus metrics: what the pool, the outbox, the gate and (in svcdb-amqp) the consumers
//! and the relay record, and their rendering in the Prometheus text format for `/metrics`.
//!
//! Recording goes through the [`metrics`](https://docs.rs/metrics) facade; the first
//! [`ServiceDb`](crate::ServiceDb) built installs [`metrics_exporter_prometheus`]'s recorder as the process's
//! global recorder ([`install`]), unless the program installed one of its own before: then
//! svcdb's metrics go to that one and [`render`] has nothing to show. A process that exports
//! no metrics calls [`disable`] first. The `/metrics` route of
//! svcdb-amqp's `Service` calls [`ServiceDb::observe_metrics`](crate::ServiceDb::observe_metrics) (the gauges that need a query)
//! and then [`render`].
//!
//! Names and labels follow OpenTelemetry's semantic conventions for database clients
//! (`db.client.connection.*`) and messaging (`messaging.*`) where they define one, written the
//! Prometheus way (dots become underscores, a unit suffix, `_total` on counters); the rest are
//! `svcdb_*`. Every series carries the labels of [`ServiceDb::metric_labels`](crate::ServiceDb::metric_labels): `service` (the
//! configured [`application_name`](crate::Config::application_name), which svcdb-amqp's
//! `Service` sets to the service's name, else the schema), `schema` and `db_namespace`
//! (`database.schema`), so several services (or tests) in one process never share a series.
//!
//! | metric | kind | what |
//! |---|---|---|
//! | `db_client_connection_count{state="idle"\|"used"}` | gauge | open connections (on scrape) |
//! | `db_client_connection_max` | gauge | the pool's maximum size |
//! | `db_client_connection_pending_requests` | gauge | callers waiting for a connection (on scrape) |
//! | `db_client_connection_wait_time_seconds` | histogram | how long acquires waited |
//! | `db_client_connection_timeouts_total` | counter | acquires that timed out |
//! | `svcdb_pool_connect_errors_total{cause}` | counter | failed connection attempts: `auth`, `database_missing`, `server_error`, `unreachable`, `no_answer` |
//! | `svcdb_outbox_backlog` | gauge | outbox rows not yet published (on scrape) |
//! | `svcdb_outbox_oldest_unpublished_age_seconds` | gauge | age of the oldest of them, 0 when none (on scrape) |
//! | `svcdb_table_size_bytes{table}` | gauge | `svcdb_outbox` and `svcdb_processed_events`, with indexes and TOAST (on scrape) |
//! | `svcdb_database_up` | gauge | 1 when the last scrape's queries got their answer, 0 when the database did not (the outbox and table gauges then keep their last values) |
//! | `svcdb_gate_ready` | gauge | 1 when the last gate check (the start-up gate, a health check) passed, else 0 |
//! | `svcdb_migration_version` | gauge | the applied version's number, every digit read as one integer (diesel's `2017-09-23-182408` is 20170923182408, Flyway's `1.12.30` is 11230: watch it change, do not compare it), as the last gate check saw it |
//! | `svcdb_migration_last_deploy_duration_seconds` | gauge | how long the start-up migration run took (svcdb-amqp's `Service`) |
//! | `svcdb_migration_lock_waits_total{lock}` | counter | in that run: waits for another runner's schema lock (`schema`), retries after a table's `lock_timeout` (`table`) |
//!
//! svcdb-amqp adds, per queue (`messaging_system="rabbitmq"`, `messaging_destination_name`):
//!
//! | metric | kind | what |
//! |---|---|---|
//! | `svcdb_consumer_messages_total{outcome}` | counter | deliveries by outcome: `handled`, `duplicate` (absorbed by the claim), `failed` (requeued for a retry), `dead_lettered`, `returned` (handed back unprocessed: database out, shutdown), `ignored` |
//! | `svcdb_consumer_pauses_total` | counter | times the consumer paused while the database was out |
//! | `messaging_process_duration_seconds` | histogram | the handler's transaction, claim included |
//! | `svcdb_consumer_in_flight` | gauge | deliveries taken and not yet settled |
//! | `svcdb_consumer_connected` | gauge | 1 while the consumer consumes on a broker connection, 0 while it reconnects (alert on 0 for longer than a restart) |
//!
//! and for the relay (`messaging_system="rabbitmq"`) and the purges:
//!
//! | metric | kind | what |
//! |---|---|---|
//! | `messaging_client_sent_messages_total` | counter | outbox rows published (confirmed) and marked |
//! | `svcdb_relay_publish_failures_total` | counter | row publishes that failed and were rescheduled |
//! | `svcdb_relay_confirm_duration_seconds` | histogram | a batch's first publish to its last confirm |
//! | `svcdb_relay_broker_blocked` | gauge | 1 while RabbitMQ blocks the relay's connection (memory or disk alarm) |
//! | `svcdb_relay_connected` | gauge | 1 while the relay has a channel to the broker, 0 while it reconnects (events wait in the outbox meanwhile) |
//! | `svcdb_retention_last_purge_timestamp_seconds{table}` | gauge | Unix time of the last successful purge |
//! | `svcdb_retention_purged_rows_total{table}` | counter | rows the purges deleted |

use std::sync::{Arc, OnceLock};

use metrics::Label;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::Serialize;

use crate::SqlState;

/// Histogram buckets, in seconds: sub-millisecond pool waits up to a 30 s handler.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The handle of the recorder svcdb installed, or `None` when another one was installed first.
static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder as the process's global [`metrics`] recorder, once; later
/// calls return the same handle. `None` when the program installed another recorder first
/// (svcdb's metrics then go to that one). [`ServiceDb::new`](crate::ServiceDb::new) calls it, so metrics recorded
/// through a pool are never lost to the no-op recorder.
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(BUCKETS)
                .expect("the bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            match metrics::set_global_recorder(recorder) {
                Ok(()) => {
                    describe();
                    Some(handle)
                }
                Err(_) => {
                    tracing::info!(target: "svcdb::metrics", "another metrics recorder is installed: svcdb's metrics go to it, and /metrics shows none");
                    None
                }
            }
        })
        .as_ref()
}

/// The kind of a metric, for its description.
#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Each metric's `# HELP` text (the tables above, shortened): without a description the
/// exporter writes none (found by a user trial: no family had one).
const HELP: &[(&str, Kind, &str)] = &[
    ("db_client_connection_count", Kind::Gauge, "Open connections of the pool, by state (idle, used)."),
    ("db_client_connection_max", Kind::Gauge, "The pool's maximum number of connections."),
    ("db_client_connection_pending_requests", Kind::Gauge, "Callers waiting for a pool connection."),
    ("db_client_connection_wait_time_seconds", Kind::Histogram, "How long acquiring a pool connection waited."),
    ("db_client_connection_timeouts_total", Kind::Counter, "Pool acquires that timed out."),
    ("svcdb_pool_connect_errors_total", Kind::Counter, "Failed connection attempts, by cause."),
    ("svcdb_outbox_backlog", Kind::Gauge, "Outbox rows not yet published."),
    ("svcdb_outbox_oldest_unpublished_age_seconds", Kind::Gauge, "Age of the oldest unpublished outbox row, 0 when none."),
    ("svcdb_table_size_bytes", Kind::Gauge, "Size of svcdb's tables, with indexes and TOAST."),
    ("svcdb_database_up", Kind::Gauge, "1 when the last scrape's queries got their answer, 0 when the database did not answer (the outbox and table gauges then keep their last values)."),
    ("svcdb_gate_ready", Kind::Gauge, "1 when the last gate check (the start-up gate, a health check) passed, else 0."),
    ("svcdb_migration_version", Kind::Gauge, "The applied migration version's digits as one integer (watch it change; do not compare it)."),
    ("svcdb_migration_last_deploy_duration_seconds", Kind::Gauge, "How long the start-up migration run took."),
    ("svcdb_migration_lock_waits_total", Kind::Counter, "Waits for another runner's schema lock (schema) and lock_timeout retries (table) in the start-up migration run."),
    ("svcdb_consumer_messages_total", Kind::Counter, "Deliveries by outcome (handled, duplicate, failed, dead_lettered, returned, ignored)."),
    ("svcdb_consumer_pauses_total", Kind::Counter, "Times the consumer paused while the database was out."),
    ("messaging_process_duration_seconds", Kind::Histogram, "The handler's transaction, claim included."),
    ("svcdb_consumer_in_flight", Kind::Gauge, "Deliveries taken and not yet settled."),
    ("svcdb_consumer_connected", Kind::Gauge, "1 while the consumer consumes on a broker connection, 0 while it reconnects."),
    ("messaging_client_sent_messages_total", Kind::Counter, "Outbox rows published (confirmed) and marked."),
    ("svcdb_relay_publish_failures_total", Kind::Counter, "Outbox row publishes that failed and were rescheduled."),
    ("svcdb_relay_confirm_duration_seconds", Kind::Histogram, "From a relay batch's first publish to its last confirm."),
    ("svcdb_relay_broker_blocked", Kind::Gauge, "1 while RabbitMQ blocks the relay's connection (memory or disk alarm)."),
    ("svcdb_relay_connected", Kind::Gauge, "1 while the relay has a channel to the broker, 0 while it reconnects."),
    ("svcdb_retention_last_purge_timestamp_seconds", Kind::Gauge, "Unix time of the last successful purge, by table."),
    ("svcdb_retention_purged_rows_total", Kind::Counter, "Rows the purges deleted, by table."),
];

/// Gives the installed recorder every metric's description.
fn describe() {
    for &(name, kind, help) in HELP {
        match kind {
            Kind::Counter => metrics::describe_counter!(name, help),
            Kind::Gauge => metrics::describe_gauge!(name, help),
            Kind::Histogram => metrics::describe_histogram!(name, help),
        }
    }
}

/// For a process that exports no metrics (a command-line tool): installs a no-op recorder in
/// place of svcdb's, so that [`install`] (called by the first
/// [`ServiceDb`](crate::ServiceDb)) builds nothing and [`render`] shows nothing. Building the
/// Prometheus recorder calibrates its clock ([quanta]'s TSC calibration) by busy-looping until
/// its estimate settles: about a millisecond of a CPU on a quiet machine, up to 200 ms when
/// the loop keeps being interrupted (a loaded one). Returns false, changing nothing, when
/// [`install`] or `disable` already ran.
///
/// [quanta]: https://docs.rs/quanta
pub fn disable() -> bool {
    let mut disabled = false;
    HANDLE.get_or_init(|| {
        disabled = true;
        // Another recorder installed first keeps the metrics; either way svcdb builds none.
        let _ = metrics::set_global_recorder(metrics::NoopRecorder);
        None
    });
    disabled
}

/// Every metric recorded in this process, in the Prometheus text format (version 0.0.4), or
/// an empty text when another recorder was installed first ([`install`]).
pub fn render() -> String {
    match install() {
        Some(handle) => {
            // Histograms accumulate until rendered; upkeep also drops idle series' storage.
            handle.run_upkeep();
            handle.render()
        }
        None => String::new(),
    }
}

/// The `Content-Type` of [`render`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The labels of one pool's series: `service` (the configured application name, which
/// svcdb-amqp's `Service` sets to the service's name unless configured, else the schema), `schema`, and `db_namespace` (`database.schema`, OpenTelemetry's `db.namespace`).
pub(crate) fn labels_for(config: &crate::Config, database: &str) -> Arc<[Label]> {
    let schema = config.schema.as_str().to_owned();
    let service = config
        .application_name
        .clone()
        .unwrap_or_else(|| schema.clone());
    Arc::from(vec![
        Label::new("service", service),
        Label::new("db_namespace", format!("{database}.{schema}")),
        Label::new("schema", schema),
    ])
}

/// The labels with `extra` appended.
pub fn with_labels(base: &[Label], extra: &[(&'static str, String)]) -> Vec<Label> {
    base.iter()
        .cloned()
        .chain(extra.iter().map(|(k, v)| Label::new(*k, v.clone())))
        .collect()
}

/// Why a connection attempt failed, as the `cause` label of `svcdb_pool_connect_errors_total`.
pub(crate) fn connect_error_cause(e: &tokio_postgres::Error) -> &'static str {
    match e.code() {
        Some(c) if *c == SqlState::INVALID_PASSWORD => "auth",
        Some(c) if *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION => "auth",
        Some(c) if *c == SqlState::INVALID_CATALOG_NAME => "database_missing",
        Some(_) => "server_error",
        // No SQLSTATE: refused, reset, TLS, a standby skipped by target_session_attrs.
        None => "unreachable",
    }
}

/// The outbox rows waiting to be published.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct OutboxBacklog {
    /// Rows not yet published (due, or waiting for a retry).
    pub rows: u64,
    /// Seconds since the oldest of them was enqueued (by the database's clock); `None` when
    /// there are none.
    pub oldest_age_seconds: Option<f64>,
}
