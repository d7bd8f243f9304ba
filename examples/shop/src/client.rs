//! A small JSON-over-HTTP client: what the demo drives the services with, and what the orders
//! service reads a cart with (services talk to each other's APIs, never to each other's
//! schemas).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use axum::body::Bytes;
use axum::http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Longest wait for one request, answer included: a service that hangs fails the step
/// instead of the demo.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Keeps connections alive between requests (hyper's pool). Cheap to clone; clones share the
/// pool and the request counter.
#[derive(Clone)]
pub struct ApiClient {
    client: Client<HttpConnector, Full<Bytes>>,
    requests: Arc<AtomicU64>,
}

/// A response: its status and body.
#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Response {
    /// The body as `T`, if the status is a success; otherwise an error with the body's text.
    pub fn json<T: DeserializeOwned>(&self) -> anyhow::Result<T> {
        if !self.status.is_success() {
            bail!(
                "HTTP {}: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            );
        }
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "unexpected response body: {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

impl Default for ApiClient {
    fn default() -> Self {
        Self::new()
    }
}

impl ApiClient {
    pub fn new() -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
            requests: Arc::default(),
        }
    }

    /// Requests sent so far by this client and its clones.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    pub async fn get(&self, url: &str) -> anyhow::Result<Response> {
        self.send(Method::GET, url, None).await
    }

    pub async fn post<B: Serialize>(&self, url: &str, body: &B) -> anyhow::Result<Response> {
        self.send(Method::POST, url, Some(serde_json::to_vec(body)?))
            .await
    }

    async fn send(
        &self,
        method: Method,
        url: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<Response> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut request = Request::builder().method(method.clone()).uri(url);
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        // Orders reading a cart: the cart's request span joins the order's trace.
        if let Some(parent) = svcdb::trace::current() {
            request = request.header(svcdb::trace::TRACEPARENT_HEADER, parent.to_string());
        }
        let request = request.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let exchange = async {
            let response = self.client.request(request).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            anyhow::Ok(Response { status, body })
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .with_context(|| format!("{method} {url}: no answer within {REQUEST_TIMEOUT:?}"))?
            .with_context(|| format!("{method} {url}"))
    }
}
