//! `/healthz` and `/readyz` for Kubernetes probes, as an axum [`Router`][axum-router] (feature `http`,
//! on by default).
//!
//! [axum-router]: https://docs.rs/axum/0.8/axum/struct.Router.html
//!
//! ```no_run
//! # async fn demo(db: svcdb::ServiceDb, gate: svcdb::Gate) -> std::io::Result<()> {
//! let app = axum::Router::new()
//!     // .route("/orders", …) — the service's own routes
//!     .merge(svcdb::http::router(db, gate));
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:8080").await?;
//! axum::serve(listener, app).await
//! # }
//! ```
//!
//! | path | answers | use as |
//! |---|---|---|
//! | `/healthz` | `200 ok` whenever the process answers; never touches the database | `livenessProbe` |
//! | `/readyz` | `200` and the [`HealthReport`] as JSON when the database answers and the gate passes; `503` and the report, naming each problem, otherwise | `readinessProbe` |
//!
//! A migration in progress (another replica's long `CREATE INDEX CONCURRENTLY`) and migrations
//! applied by a newer release are listed under `notices` and keep `200`: they are the normal
//! states of a rolling deploy, and answering `503` then would take every replica out at once.
//!
//! Liveness leaves the database out on purpose: a database outage would otherwise make
//! Kubernetes restart every replica, which cures nothing and turns a blip into a cold start.
//! Readiness takes the replica out of the load balancer until the database is back.
//!
//! [`trace_requests`] gives each request of a service's own routes a span, continuing the
//! caller's trace from its `traceparent` header ([`crate::trace`]).
//!
//! `/readyz` answers within the gate's timeout (default 2 s) even when the database is gone,
//! so give the probe `timeoutSeconds: 3`. After [`ServiceDb::close`] it answers `503`, which
//! drains traffic during a graceful shutdown.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

use crate::health::HealthReport;
use crate::pool::ServiceDb;
use crate::schema::Gate;

/// What the handlers share.
struct Probe {
    db: ServiceDb,
    gate: Gate,
}

/// A router with `/healthz` and `/readyz` for `db` checked against `gate`; merge it into the
/// service's own router (it fits a router of any state type).
pub fn router<S>(db: ServiceDb, gate: Gate) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Arc::new(Probe { db, gate }))
}

/// Liveness: the process answers.
async fn healthz() -> impl IntoResponse {
    ([(header::CACHE_CONTROL, "no-store")], "ok\n")
}

/// Readiness: the health report, `200` when ready and `503` otherwise.
async fn readyz(State(probe): State<Arc<Probe>>) -> impl IntoResponse {
    let report: HealthReport = probe.db.health(&probe.gate).await;
    let status = if report.gate.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, [(header::CACHE_CONTROL, "no-store")], Json(report))
}

/// Middleware (`axum::middleware::from_fn(svcdb::http::trace_requests)`, as a layer of the
/// service's own routes) that runs each request in a server span named after its route
/// (`GET /orders/{id}`), with the semantic conventions' `http.request.method`, `http.route`,
/// `url.path` and `http.response.status_code`. A valid `traceparent` header makes the span
/// continue the caller's trace; with an OpenTelemetry layer, its field `trace_id` names the
/// trace in the request's log lines ([`crate::trace::record_trace_id`]).
pub async fn trace_requests(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use tracing::Instrument;

    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(
            || request.uri().path().to_owned(),
            |p| p.as_str().to_owned(),
        );
    let span = tracing::info_span!(
        target: "svcdb::http",
        "request",
        otel.name = format!("{method} {route}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = %route,
        url.path = %request.uri().path(),
        http.response.status_code = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    let parent = request
        .headers()
        .get(crate::trace::TRACEPARENT_HEADER)
        .and_then(|value| value.to_str().ok()?.parse().ok());
    if let Some(parent) = parent {
        crate::trace::continue_trace(&span, &parent);
    }
    crate::trace::record_trace_id(&span);
    let response = next.run(request).instrument(span.clone()).await;
    span.record("http.response.status_code", response.status().as_u16());
    response
}

/// A router with `/metrics` for `db`: each scrape refreshes the gauges that need a query
/// ([`ServiceDb::observe_metrics`]) and answers every series of the process in the Prometheus
/// text format ([`metrics::render`](crate::metrics::render)). Merge it into the service's router, as svcdb-amqp's `Service`
/// does; it fits a router of any state type.
pub fn metrics_router<S>(db: ServiceDb) -> axum::Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    use axum::http::header;
    use axum::response::IntoResponse;

    async fn scrape(
        axum::extract::State(db): axum::extract::State<ServiceDb>,
    ) -> impl IntoResponse {
        db.observe_metrics().await;
        (
            [
                (header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE),
                (header::CACHE_CONTROL, "no-store"),
            ],
            crate::metrics::render(),
        )
    }
    axum::Router::new()
        .route("/metrics", axum::routing::get(scrape))
        .with_state(db)
}
