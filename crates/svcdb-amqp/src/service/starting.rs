//! What a service's HTTP port answers before the service is up.
//!
//! The port is bound first, before connecting to anything, and answers from then on: during
//! a wait for the database or the broker ([`Service::startup_wait`](super::Service::startup_wait))
//! or a long migration, `/healthz` says the process is alive (so a `livenessProbe` does not
//! restart it mid-migration, which would only start the migration over) and `/readyz` says
//! `503`, naming the step it is at (so an operator sees why, rather than a refused
//! connection). `/metrics` serves what the process has recorded so far (the migration lock's
//! waits, say). Every other path is `503` until the service's own routes take over, on the
//! same listener, once the start-up is done.

use std::convert::Infallible;
use std::sync::{Arc, Mutex, OnceLock};

use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use tokio::time::Instant;
use tower::ServiceExt;

use super::Step;

/// The step the start-up is at, shared by the start-up (which moves it on) and the port's
/// answers (which name it).
#[derive(Clone)]
pub(super) struct Progress {
    service: Arc<str>,
    step: Arc<Mutex<Step>>,
    began: Instant,
}

impl Progress {
    pub(super) fn new(service: &str) -> Self {
        Self {
            service: Arc::from(service),
            step: Arc::new(Mutex::new(Step::Configure)),
            began: Instant::now(),
        }
    }

    /// The start-up is now at `step`.
    pub(super) fn at(&self, step: &Step) {
        *self.step.lock().unwrap_or_else(|p| p.into_inner()) = step.clone();
    }

    fn step(&self) -> Step {
        self.step.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The answer to `path` while the service starts.
    fn answer(&self, path: &str) -> Response {
        let no_store = [(header::CACHE_CONTROL, "no-store")];
        match path {
            "/healthz" => (no_store, "ok\n").into_response(),
            "/metrics" => (
                [
                    (header::CONTENT_TYPE, svcdb::metrics::CONTENT_TYPE),
                    (header::CACHE_CONTROL, "no-store"),
                ],
                svcdb::metrics::render(),
            )
                .into_response(),
            "/readyz" => {
                let step = self.step();
                let body = serde_json::json!({
                    "ready": false,
                    "starting": true,
                    "step": step.to_string(),
                    "problems": [{
                        "kind": "starting",
                        "message": format!(
                            "service {} is starting: {step} (for {} s)",
                            self.service,
                            self.began.elapsed().as_secs()
                        ),
                    }],
                });
                (StatusCode::SERVICE_UNAVAILABLE, no_store, Json(body)).into_response()
            }
            _ => (
                StatusCode::SERVICE_UNAVAILABLE,
                no_store,
                format!(
                    "service {} is starting: {}; try again shortly\n",
                    self.service,
                    self.step()
                ),
            )
                .into_response(),
        }
    }
}

/// The router served from the moment the port is bound: `app` once it is set, the start-up's
/// answers ([`Progress::answer`]) until then.
pub(super) fn router(progress: Progress, app: Arc<OnceLock<Router>>) -> Router {
    Router::new().fallback(move |request: Request| {
        let (progress, app) = (progress.clone(), app.clone());
        async move {
            match app.get() {
                Some(app) => app
                    .clone()
                    .oneshot(request)
                    .await
                    .unwrap_or_else(|never: Infallible| match never {}),
                None => progress.answer(request.uri().path()),
            }
        }
    })
}
