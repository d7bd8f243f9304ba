//! What the shop's services share: how a service is described ([`ServiceDef`]), the names of its
//! role and broker objects ([`Names`]), what its routes and handlers get ([`Ctx`]), its HTTP
//! errors ([`ApiError`]), and the settings of the demo ([`Tuning`]). How a service starts and
//! stops is svcdb-amqp's [`Service`] runtime; [`service`] hands it the shop's parts.
//!
//! A service module (users, catalog, cart, orders) only says what is its own: schema, migrations,
//! tables, routes, and which events it handles.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use svcdb::migrate::{EmbeddedMigrations, Migrations};
use svcdb::outbox::{self, PublishRetry};
use svcdb::{Envelope, Gate, Ident, ServiceDb, Transaction};
use svcdb_amqp::topology::{events_exchange, QueueSpec, Topology};
use svcdb_amqp::{
    AmqpConfig, Consumer, ConsumerOptions, EventHandler, HandlerError, RelayConfig, Service,
};

use crate::client::ApiClient;
use crate::events::Event;

/// One service, as the platform needs to know it.
pub struct ServiceDef {
    /// `catalog`: names its role, queues and exchange.
    pub name: &'static str,
    /// `catalog_schema`: the schema it owns and is pinned to.
    pub schema: &'static str,
    /// Its migrations, compiled in.
    pub migrations: &'static EmbeddedMigrations,
    /// Tables the start-up gate requires (svcdb's own are added as the service needs them).
    pub tables: &'static [&'static str],
    /// True when it publishes events: it gets an exchange, an outbox and a relay.
    pub publishes: bool,
    /// Its HTTP API (the platform adds `/healthz` and `/readyz`).
    pub routes: fn() -> Router<Ctx>,
    /// The events it consumes, one queue per handler.
    pub subscriptions: &'static [Subscription],
}

/// One queue of a service: what it is bound to and the handlers that consume it.
pub struct Subscription {
    /// `reserve-stock`: the queue is `<namespace>.<service>.<handler>`, and `<service>.<handler>`
    /// scopes the idempotency claims (stable across namespaces and releases).
    pub handler: &'static str,
    /// `(producing service, routing key pattern)` pairs the queue is bound to.
    pub sources: &'static [(&'static str, &'static str)],
    /// Registers the handlers, by event kind, on the consumer.
    pub register: fn(Consumer, &Ctx) -> Consumer,
}

impl ServiceDef {
    pub fn migrations(&self) -> anyhow::Result<Migrations> {
        Migrations::from_embedded(self.migrations)
            .with_context(|| format!("the {} service's embedded migrations", self.name))
    }

    /// Every table the gate requires: the service's own, and svcdb's outbox and claims tables
    /// when it publishes or consumes (the runtime installs those), as the runtime's gate
    /// requires them: for the demo's own checks of a schema.
    pub fn required_tables(&self) -> Vec<&'static str> {
        let mut tables = self.tables.to_vec();
        if self.publishes {
            tables.push(svcdb::outbox::OUTBOX_TABLE);
        }
        if !self.subscriptions.is_empty() {
            tables.push(svcdb::idempotency::PROCESSED_EVENTS_TABLE);
        }
        tables
    }

    pub fn gate(&self) -> anyhow::Result<Gate> {
        Ok(Gate::new()
            .with_migrations(self.migrations()?)
            .require(self.required_tables())?)
    }
}

/// Deliveries of one message before the broker dead-letters it, above svcdb-amqp's default of
/// 5. RabbitMQ 3.10's quorum queues count every return towards the limit, a consumer's lost
/// connection included (RabbitMQ's quorum queue guide, "Poison Message Handling"; the demo's
/// first runs with 5 dead-lettered events it had applied), and each lost acknowledgement cuts a connection that holds up to a
/// prefetch of other messages: with the notes' 3 redeliveries per lost ack, 5 would leave a
/// message room for a single further interruption (a killed replica, another cut) before an
/// event already applied is dead-lettered. The limit still stops a message that crashes its
/// consumer every time.
pub const MAX_DELIVERIES: u32 = 20;

/// The names one deployment of the shop uses. The namespace (the database's name) prefixes
/// everything that is not inside the database, because roles are cluster-wide and exchanges and
/// queues are vhost-wide: two deployments (the demo and a test run) never share one.
#[derive(Debug, Clone)]
pub struct Names {
    namespace: String,
}

impl Names {
    /// `namespace` must be a plain identifier: it goes into role names.
    pub fn new(namespace: &str) -> anyhow::Result<Self> {
        Ident::new("namespace", namespace)?;
        anyhow::ensure!(
            namespace
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "namespace {namespace:?}: use letters, digits and underscores (it names roles, exchanges and queues)"
        );
        // Found by a user trial: a 60-byte name passed, and the demo stopped part-way at the
        // role `<name>_catalog`, past PostgreSQL's 63 bytes.
        let longest = crate::services::SERVICES
            .iter()
            .map(|def| def.name.len() + 1)
            .max()
            .unwrap_or(0);
        anyhow::ensure!(
            namespace.len() + longest <= 63,
            "namespace {namespace:?} is {} bytes: the roles it names (`{namespace}_<service>`) would pass PostgreSQL's 63\n  hint: use at most {} bytes",
            namespace.len(),
            63 - longest
        );
        Ok(Self {
            namespace: namespace.to_owned(),
        })
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The service's login role: `shop_catalog`.
    pub fn role(&self, service: &str) -> String {
        format!("{}_{service}", self.namespace)
    }

    /// The exchange a service publishes to: `shop.catalog.events`.
    pub fn exchange(&self, service: &str) -> String {
        events_exchange(&format!("{}.{service}", self.namespace))
    }

    /// A subscription's queue, bound to its sources' exchanges.
    pub fn queue(&self, service: &str, subscription: &Subscription) -> QueueSpec {
        let name = format!("{}.{service}.{}", self.namespace, subscription.handler);
        subscription.sources.iter().fold(
            QueueSpec::new(name).with_max_deliveries(MAX_DELIVERIES),
            |queue, (producer, key)| queue.bind(self.exchange(producer), *key),
        )
    }

    /// What the service declares at start-up: its exchange if it publishes, and its queues.
    pub fn topology(&self, def: &ServiceDef) -> Topology {
        let mut topology = Topology::new();
        if def.publishes {
            topology = topology.exchange(self.exchange(def.name));
        }
        def.subscriptions
            .iter()
            .fold(topology, |t, s| t.queue(self.queue(def.name, s)))
    }
}

/// Settings that differ between `shop demo` (everything on one machine, faults injected,
/// quick recovery wanted) and a service run for real (the libraries' defaults).
#[derive(Debug, Clone)]
pub struct Tuning {
    pub consumer: ConsumerOptions,
    pub relay: RelayConfig,
    pub outbox: PublishRetry,
    /// The whole graceful shutdown ([`Service::shutdown_timeout`]).
    pub shutdown: Duration,
}

impl Tuning {
    /// The libraries' defaults. Consumers take batches (`ConsumerOptions::batch`, 16): every
    /// shop handler writes only its own database and outbox, so a batch that runs again
    /// repeats nothing outside it; the catalog's stock reservation alone runs one order a
    /// transaction (its rows are shared by every order).
    pub fn production() -> Self {
        Self {
            consumer: ConsumerOptions::default(),
            relay: RelayConfig::default(),
            outbox: PublishRetry::default(),
            shutdown: svcdb_amqp::service::DEFAULT_SHUTDOWN_TIMEOUT,
        }
    }

    /// Short pauses, so an injected outage heals in about a second instead of the production
    /// backoffs' several; nothing else changes.
    pub fn demo() -> Self {
        let quick = Duration::from_millis(100);
        let cap = Duration::from_secs(1);
        Self {
            consumer: ConsumerOptions {
                retry_delay: quick,
                max_retry_delay: cap,
                reconnect_backoff: quick,
                max_reconnect_backoff: cap,
                shutdown_timeout: Duration::from_secs(10),
                ..ConsumerOptions::default()
            },
            relay: RelayConfig {
                poll_interval: Duration::from_millis(50),
                reconnect_backoff: quick,
                max_reconnect_backoff: cap,
                ..RelayConfig::default()
            },
            outbox: PublishRetry {
                retry_backoff: Duration::from_millis(200),
                max_retry_backoff: Duration::from_secs(2),
            },
            // Within the demo's 30 s wait for a replica to exit (`Fleet::stop`).
            shutdown: Duration::from_secs(20),
        }
    }
}

/// What a request or event handler of a service can reach. Cheap to clone.
#[derive(Clone)]
pub struct Ctx {
    /// The service's name.
    pub service: &'static str,
    /// Its pool, pinned to its schema, logged in as its role.
    pub db: ServiceDb,
    /// For calls to other services' APIs.
    pub http: ApiClient,
    names: Arc<Names>,
    peers: Arc<HashMap<&'static str, String>>,
    /// False only in `shop demo --without-idempotency`, the control run (see [`Ctx::handler`]).
    idempotency: bool,
}

impl Ctx {
    /// Stores `event` in this service's outbox inside `tx`, the business write's transaction:
    /// it is published (by the relay) if and only if `tx` commits. `cause`, the event being
    /// handled, links the two for tracing (correlation and causation ids).
    pub async fn publish<E: Event>(
        &self,
        tx: &impl svcdb::AnyTransaction,
        event: &E,
        cause: Option<&Envelope>,
    ) -> svcdb::Result<Envelope> {
        let payload = serde_json::to_value(event).expect("event payloads serialize");
        let mut envelope = Envelope::new(E::KIND, self.service, payload);
        if let Some(cause) = cause {
            envelope = envelope.caused_by(cause);
        }
        outbox::enqueue(
            tx,
            &self.names.exchange(self.service),
            E::ROUTING_KEY,
            &envelope,
        )
        .await?;
        Ok(envelope)
    }

    /// The base URL of another service's API.
    pub fn peer(&self, service: &str) -> Result<&str, ApiError> {
        self.peers.get(service).map(String::as_str).ok_or_else(|| {
            ApiError::Internal(anyhow::anyhow!(
                "the {} service does not know where {service} is (set SHOP_{}_URL)",
                self.service,
                service.to_uppercase()
            ))
        })
    }

    /// `handler` as the service registers it. With idempotency off (the demo's control run,
    /// `--without-idempotency`) the handler also deletes the claim the consumer made for the
    /// event, in the same transaction: nothing remembers that the event was handled, so every
    /// redelivery and copy is applied again, as in a service without an inbox.
    pub fn handler<H: EventHandler>(&self, handler: H) -> impl EventHandler {
        Forgetful {
            inner: handler,
            forget: !self.idempotency,
        }
    }
}

/// A handler that, when `forget` is set, deletes its event's claim after running.
struct Forgetful<H> {
    inner: H,
    forget: bool,
}

impl<H: EventHandler> EventHandler for Forgetful<H> {
    async fn handle(&self, tx: &mut Transaction<'_>, event: &Envelope) -> Result<(), HandlerError> {
        self.inner.handle(tx, event).await?;
        if self.forget {
            tx.execute(
                &format!(
                    "DELETE FROM {} WHERE event_id = $1",
                    svcdb::idempotency::PROCESSED_EVENTS_TABLE
                ),
                &[&event.id],
            )
            .await?;
        }
        Ok(())
    }
}

/// An API error: its status and a JSON body `{"error": "…"}`.
#[derive(Debug)]
pub enum ApiError {
    NotFound(String),
    Conflict(String),
    /// The request is well-formed but cannot be done (yet): an unknown user, an empty cart.
    Unprocessable(String),
    /// The database cannot serve the request right now (down, failing over, out of
    /// connections: [`svcdb::Error::is_database_unavailable`]), or a service this one calls
    /// cannot: `503` with `Retry-After`, so clients and load balancers retry instead of
    /// treating it as the request's fault. The body says only which; the cause is logged.
    Unavailable(String),
    Internal(anyhow::Error),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, m),
            ApiError::Conflict(m) => (StatusCode::CONFLICT, m),
            ApiError::Unprocessable(m) => (StatusCode::UNPROCESSABLE_ENTITY, m),
            ApiError::Unavailable(m) => {
                tracing::debug!(error = %m, "answering 503");
                let body = Json(serde_json::json!({ "error": m }));
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(axum::http::header::RETRY_AFTER, "1")],
                    body,
                )
                    .into_response();
            }
            ApiError::Internal(e) => {
                // The cause stays in the log (found by a user trial: the body carried the
                // database's error, `column "stock" does not exist`, to any client).
                tracing::error!(error = format!("{e:#}"), "request failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error; the service's log has the cause".to_owned(),
                )
            }
        };
        (status, Json(serde_json::json!({ "error": message }))).into_response()
    }
}

impl From<svcdb::Error> for ApiError {
    fn from(e: svcdb::Error) -> Self {
        if e.is_database_unavailable() {
            return database_unavailable(&e);
        }
        // A data exception (class 22: a quantity past the column's range, say) comes from the
        // request's values (found by a user trial: a cart item's quantity added past 2^31
        // answered 500).
        if e.code().is_some_and(|c| c.code().starts_with("22")) {
            let why = e
                .as_db_error()
                .map_or_else(|| e.to_string(), |db| db.message().to_owned());
            return ApiError::Unprocessable(format!(
                "a value of the request cannot be stored: {why}"
            ));
        }
        ApiError::Internal(e.into())
    }
}

impl From<svcdb::tokio_postgres::Error> for ApiError {
    fn from(e: svcdb::tokio_postgres::Error) -> Self {
        svcdb::Error::from(e).into()
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        let unavailable = e
            .chain()
            .filter_map(|cause| cause.downcast_ref::<svcdb::Error>())
            .any(svcdb::Error::is_database_unavailable);
        if unavailable {
            return database_unavailable(&e);
        }
        ApiError::Internal(e)
    }
}

/// `503` for a database that cannot serve now: the cause (its host, database and role) goes
/// to the log, the client learns only that it may retry.
fn database_unavailable(cause: &dyn std::fmt::Display) -> ApiError {
    tracing::warn!(error = %cause, "the database is unavailable");
    ApiError::Unavailable("the service's database is unavailable".into())
}

/// Everything [`service`] needs to describe one deployed service.
pub struct Launch {
    pub def: &'static ServiceDef,
    /// Its database access: its own role, its schema.
    pub db: svcdb::Config,
    /// Its broker (in the demo, through the demo's link for the service).
    pub amqp: AmqpConfig,
    pub names: Arc<Names>,
    /// Base URLs of the services it calls.
    pub peers: HashMap<&'static str, String>,
    /// False for the demo's control run: handlers forget their claims ([`Ctx::handler`]).
    pub idempotency: bool,
    pub http: ApiClient,
    /// Where to serve HTTP (port 0: any free port).
    pub listen: SocketAddr,
    /// Run the service's migrations before the gate. False is a deploy that forgot them.
    pub migrate: bool,
    /// How long `/readyz` answers 503 before serving ends ([`Service::drain_delay`]).
    pub drain_delay: std::time::Duration,
    pub tuning: Tuning,
}

/// The service as svcdb-amqp's runtime runs it: what is the shop's own (names, handlers,
/// routes, the [`Ctx`] they share) on the library's start-up and shutdown.
pub fn service(launch: Launch) -> anyhow::Result<Service<Ctx>> {
    let Launch {
        def,
        db,
        amqp,
        names,
        peers,
        idempotency,
        http,
        listen,
        migrate,
        drain_delay,
        tuning,
    } = launch;
    let state_names = names.clone();
    let peers = Arc::new(peers);
    let mut service = Service::with_state(def.name, move |db: &ServiceDb| Ctx {
        service: def.name,
        db: db.clone(),
        http,
        names: state_names,
        peers,
        idempotency,
    })
    .database(db)
    .amqp(amqp)
    .migrations(def.migrations()?)
    .migrate(migrate)
    .require(def.tables.iter().copied())
    .routes((def.routes)())
    .listen(listen)
    .consumer_options(tuning.consumer)
    .relay_config(tuning.relay)
    .publish_retry(tuning.outbox)
    .shutdown_timeout(tuning.shutdown)
    .drain_delay(drain_delay);
    if def.publishes {
        service = service.publishes(names.exchange(def.name));
    }
    for subscription in def.subscriptions {
        service = service.subscribe(
            names.queue(def.name, subscription),
            format!("{}.{}", def.name, subscription.handler),
            subscription.register,
        );
    }
    Ok(service)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_outage_is_a_503_not_a_500() {
        let response = ApiError::from(svcdb::Error::PoolClosed).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(response
            .headers()
            .contains_key(axum::http::header::RETRY_AFTER));
        // Through anyhow too, as handlers that add context return it.
        let wrapped = anyhow::Error::from(svcdb::Error::PoolClosed).context("placing the order");
        let response = ApiError::from(wrapped).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        // Control: the request's own failures stay what they were.
        let response = ApiError::from(anyhow::anyhow!("a bug")).into_response();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    /// Found by a user trial: a 500's body carried the database's error to the client. The
    /// cause goes to the log; the body says only that the log has it.
    #[tokio::test]
    async fn an_internal_error_keeps_its_cause_out_of_the_response() {
        let response =
            ApiError::from(anyhow::anyhow!("column \"stock\" does not exist")).into_response();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        let body = String::from_utf8_lossy(&body);
        assert!(
            body.contains("internal error") && !body.contains("stock"),
            "{body}"
        );
    }

    /// Found by a user trial: a 60-byte `--database` passed, and the demo stopped part-way at
    /// the role `<name>_catalog`, past PostgreSQL's 63 bytes.
    #[test]
    fn a_namespace_whose_roles_would_not_fit_is_refused() {
        assert!(Names::new(&"a".repeat(55)).is_ok());
        let e = Names::new(&"a".repeat(56)).expect_err("refused");
        assert!(e.to_string().contains("at most 55 bytes"), "{e}");
    }
}
