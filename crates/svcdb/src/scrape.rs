//! What a metrics scrape asks the database (the outbox's backlog, the tables' sizes): apart
//! from the recorder in [`crate::metrics`], which the pool records through, because this half
//! needs the pool and the event tables and the recorder must not.

use std::time::Duration;

use metrics::Label;

use crate::error::Result;
use crate::idempotency::PROCESSED_EVENTS_TABLE;
use crate::metrics::{with_labels, OutboxBacklog};
use crate::outbox::OUTBOX_TABLE;
use crate::pool::ServiceDb;

/// How long the on-scrape queries may take: a scrape must answer even when the database does
/// not (the pool gauges are then still current).
const OBSERVE_TIMEOUT: Duration = Duration::from_secs(2);

impl ServiceDb {
    /// The labels every series of this pool carries (see [`crate::metrics`]); svcdb-amqp
    /// adds its own (`messaging_destination_name`, …) to them.
    pub fn metric_labels(&self) -> &[Label] {
        self.labels()
    }

    /// The outbox's backlog, or `None` when the service has no `svcdb_outbox` table. One
    /// query, on the partial index of unpublished rows.
    pub async fn outbox_backlog(&self) -> Result<Option<OutboxBacklog>> {
        let conn = self.get().await?;
        let row = conn
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&OUTBOX_TABLE])
            .await?;
        if !row.get::<_, bool>(0) {
            return Ok(None);
        }
        let row = conn
            .query_one(
                "SELECT count(*), EXTRACT(EPOCH FROM now() - min(created_at))::float8 \
                 FROM svcdb_outbox WHERE published_at IS NULL",
                &[],
            )
            .await?;
        Ok(Some(OutboxBacklog {
            rows: u64::try_from(row.get::<_, i64>(0)).unwrap_or(0),
            oldest_age_seconds: row.get::<_, Option<f64>>(1).map(|s| s.max(0.0)),
        }))
    }

    /// Refreshes the gauges that are read rather than counted: the pool's connections and
    /// waiters (from memory), and, within 2 s, the outbox backlog and the svcdb tables' sizes
    /// (queries). Meant for each scrape of `/metrics`, never for the hot path. A database that
    /// does not answer leaves the queried gauges as they were and is logged at debug level.
    pub async fn observe_metrics(&self) {
        let labels = self.labels();
        let status = self.status();
        let gauge = |name: &'static str, extra: &[(&'static str, String)], value: f64| {
            metrics::gauge!(name, with_labels(labels, extra)).set(value);
        };
        gauge(
            "db_client_connection_count",
            &[("state", "idle".into())],
            status.idle as f64,
        );
        gauge(
            "db_client_connection_count",
            &[("state", "used".into())],
            status.in_use as f64,
        );
        gauge("db_client_connection_max", &[], status.max_size as f64);
        gauge(
            "db_client_connection_pending_requests",
            &[],
            status.waiting as f64,
        );
        let queried = tokio::time::timeout(OBSERVE_TIMEOUT, async {
            let conn = self.get().await?;
            let sizes = conn
                .query(
                    "SELECT t.name, pg_total_relation_size(to_regclass(t.name)) \
                     FROM unnest($1::text[]) AS t(name) WHERE to_regclass(t.name) IS NOT NULL",
                    &[&[OUTBOX_TABLE, PROCESSED_EVENTS_TABLE].as_slice()],
                )
                .await?;
            drop(conn);
            for row in &sizes {
                gauge(
                    "svcdb_table_size_bytes",
                    &[("table", row.get::<_, String>(0))],
                    row.get::<_, i64>(1) as f64,
                );
            }
            if let Some(backlog) = self.outbox_backlog().await? {
                gauge("svcdb_outbox_backlog", &[], backlog.rows as f64);
                gauge(
                    "svcdb_outbox_oldest_unpublished_age_seconds",
                    &[],
                    backlog.oldest_age_seconds.unwrap_or(0.0),
                );
            }
            Ok::<_, crate::Error>(())
        })
        .await;
        // Said in a series of its own (found by a user trial: while the database was out,
        // the outbox and table gauges kept their last values and nothing showed it).
        gauge(
            "svcdb_database_up",
            &[],
            if matches!(queried, Ok(Ok(()))) {
                1.0
            } else {
                0.0
            },
        );
        match queried {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(target: "svcdb::metrics", error = %crate::error::Report::new(&e), "metrics: the outbox and table gauges keep their last values")
            }
            Err(_) => {
                tracing::debug!(target: "svcdb::metrics", "metrics: the database did not answer within 2 s; the outbox and table gauges keep their last values")
            }
        }
    }
}
