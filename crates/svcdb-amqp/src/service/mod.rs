//! The service runtime: the start-up and shutdown every svcdb service repeats, written once.
//!
//! [`Service`] is a builder. [`Service::run`] brings the service up in the order a real one
//! must, each step failing with the service's name and the cause ([`ServiceError`]). Its HTTP
//! port is bound first and answers throughout: `/healthz` says alive, `/readyz` says `503`
//! and names the step, the routes say `503` until step 6 (a port in use fails before
//! anything else runs).
//!
//! 1. **connect** to its database as its own role ([`ServiceDb::connect`]: a wrong password
//!    fails here, at once; a database that does not answer yet is waited for, up to
//!    [`Service::startup_wait`]);
//! 2. **migrate**, if this deploy does ([`Service::migrate`]; off when a separate job runs the
//!    migrations);
//! 3. **install svcdb's tables**: the outbox when it publishes, the claims when it subscribes
//!    (idempotent, safe with several replicas starting at once);
//! 4. **pass the start-up gate**: every migration applied and unchanged, every required table
//!    there, the right schema; otherwise refuse before taking any traffic, listing each problem;
//! 5. **declare its exchange and queues** ([`Topology`], idempotent; a broker that does not
//!    answer yet is waited for, up to [`Service::startup_wait`]: started together with
//!    RabbitMQ, as `docker compose up` or a node's restart does, a replica waits for it
//!    rather than exiting into a crash loop);
//! 6. **serve HTTP**: the service's own routes, each request in a span
//!    ([`svcdb::http::trace_requests`]), with `/healthz` and `/readyz`
//!    ([`svcdb::http`]) and `/metrics` (Prometheus, [`svcdb::metrics`]), **relay its outbox** ([`Relay`]) and **consume its queues**
//!    ([`Consumer`]),
//!
//! While it runs, `/readyz` also says whether the broker is reachable (`"broker"`: the relay's
//! and each consumer's connection; a `broker_unreachable` notice while one reconnects, a
//! `relay_failing` one while the broker refuses what the relay publishes). A
//! broker outage keeps `200`: requests still work, their events wait in the outbox, and taking
//! every replica out of the load balancer would turn the outage into one of the whole API.
//! `/metrics` has the same as `svcdb_relay_connected` and `svcdb_consumer_connected`.
//!
//! then runs until SIGTERM or Ctrl-C, or until one of its parts fails for good (a queue
//! deleted under it, say: then it stops the rest and returns that error, so the orchestrator
//! restarts it instead of leaving it half alive).
//!
//! # Shutdown
//!
//! On SIGTERM or Ctrl-C ([`Running::stop`] does the same), within
//! [`Service::shutdown_timeout`]:
//!
//! 1. `/readyz` answers `503` (`"shutting_down": true`), without asking the database, so the
//!    load balancer takes the replica out; the routes keep answering meanwhile;
//! 2. the consumers stop taking deliveries (`basic.cancel`), handle what the broker already
//!    sent, and wait for in-flight handlers to commit and acknowledge (up to
//!    [`ConsumerOptions::shutdown_timeout`]); a handler still running then is aborted, its
//!    transaction rolls back, and the broker redelivers its message;
//! 3. the HTTP server stops accepting and finishes the requests in flight;
//! 4. the relay finishes its batch (up to [`RelayConfig::confirm_timeout`]); last, so that
//!    it still publishes what the handlers and requests of steps 2 and 3 enqueued until it is
//!    told to stop, and whatever is left waits in the outbox for the next relay;
//! 5. the pool closes.
//!
//! Nothing held is lost: a message is acknowledged only after its transaction committed, and
//! an outbox row is marked published only after the broker confirmed it. Whatever the
//! deadline cuts off is redelivered or republished, and the claims absorb the copies.
//!
//! A second SIGTERM or Ctrl-C during the shutdown stops at once, as the deadline would
//! ([`Cause::Interrupted`]): for the operator who will not wait.
//!
//! Kubernetes keeps sending traffic for a moment after SIGTERM while it updates its
//! endpoints; [`Service::drain_delay`] of a few seconds (or a `preStop` hook that sleeps)
//! covers that gap: without it a replica with nothing in flight stops serving within
//! milliseconds of the signal, before its `503` is seen. Keep
//! [`Service::shutdown_timeout`] below the pod's `terminationGracePeriodSeconds` (30 s by
//! default), after which it is killed.
//!
//! ```no_run
//! use axum::extract::State;
//! use axum::routing::get;
//! use axum::{Json, Router};
//! use svcdb::ServiceDb;
//! use svcdb_amqp::topology::{events_exchange, QueueSpec};
//! use svcdb_amqp::{AmqpConfig, Service};
//!
//! // The service's API; testable without a socket: `app().with_state(db).oneshot(request)`.
//! fn app() -> Router<ServiceDb> {
//!     Router::new().route("/pool", get(pool))
//! }
//!
//! async fn pool(State(db): State<ServiceDb>) -> Json<usize> {
//!     Json(db.status().size)
//! }
//!
//! # async fn demo() -> anyhow::Result<()> {
//! let queue = QueueSpec::new("orders.stock-results").bind(events_exchange("catalog"), "stock.#");
//! Service::new("orders")
//!     .database(svcdb::Config::from_env()?)
//!     .amqp(AmqpConfig::from_env()?)
//!     .require(["orders"])
//!     .publishes(events_exchange("orders"))
//!     .subscribe(queue, "orders.stock-results", |consumer, _db| {
//!         consumer.on("ProductStockReserved", |tx, event| Box::pin(async move {
//!             tx.execute("UPDATE orders SET status = 'confirmed' WHERE id = $1",
//!                 &[&event.payload["order_id"].as_i64()]).await?;
//!             Ok(())
//!         }))
//!     })
//!     .routes(app())
//!     .run()
//!     .await?;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use svcdb::migrate::{
    MigrateError, MigrateEvent, MigrateOptions, Migrations, Migrator, UpOptions, UpReport,
};
use svcdb::outbox::PublishRetry;
use svcdb::{Gate, GateReport, Outbox, ServiceDb};
use tokio::task::{Id, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::AmqpConfig;
use crate::consumer::{Consumer, ConsumerOptions};
use crate::relay::{Relay, RelayConfig};
use crate::topology::{QueueSpec, Topology};

mod starting;

/// Where a service listens unless told otherwise ([`Service::listen`]): every interface, as a
/// container's port mapping needs, port 8080.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";

/// The default of [`Service::shutdown_timeout`]: below Kubernetes' default grace period of 30 s.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(25);

/// A signal this soon after the first is the same one delivered twice, not a second one.
const SAME_SIGNAL_WITHIN: Duration = Duration::from_millis(100);

/// The default of [`Service::startup_wait`]: long enough for PostgreSQL and RabbitMQ started
/// at the same time as the service to come up.
pub const DEFAULT_STARTUP_WAIT: Duration = Duration::from_secs(60);

/// Registers a subscription's handlers on its consumer, given the service's state.
type Register<S> = Box<dyn FnOnce(Consumer, &S) -> Consumer + Send>;

/// One queue the service consumes.
struct Subscription<S> {
    /// The queue, its bindings and delivery limit.
    queue: QueueSpec,
    /// The consumer's name: the scope of its idempotency claims.
    consumer: String,
    /// Adds the handlers.
    register: Register<S>,
}

/// A service built on svcdb and svcdb-amqp, from its database to its shutdown. See the
/// [module documentation](self) for the sequence and the shutdown.
///
/// `S` is the state its routes and handlers get: the [`ServiceDb`] itself with
/// [`Service::new`], or a type of the service's own with [`Service::with_state`].
pub struct Service<S = ServiceDb> {
    name: String,
    database: Option<svcdb::Config>,
    amqp: Option<AmqpConfig>,
    migrations: Option<Migrations>,
    migrate: bool,
    migrate_options: MigrateOptions,
    required: Vec<String>,
    exchanges: Vec<String>,
    subscriptions: Vec<Subscription<S>>,
    routes: Router<S>,
    state: Box<dyn FnOnce(&ServiceDb) -> S + Send>,
    listen: SocketAddr,
    consumer_options: ConsumerOptions,
    relay_config: RelayConfig,
    publish_retry: PublishRetry,
    shutdown_timeout: Duration,
    startup_wait: Duration,
    drain_delay: Duration,
}

impl<S> fmt::Debug for Service<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The configs' own Debug leave passwords out.
        f.debug_struct("Service")
            .field("name", &self.name)
            .field("database", &self.database)
            .field("amqp", &self.amqp)
            .field("migrate", &self.migrate)
            .field("required", &self.required)
            .field("exchanges", &self.exchanges)
            .field(
                "queues",
                &self
                    .subscriptions
                    .iter()
                    .map(|s| s.queue.name.as_str())
                    .collect::<Vec<_>>(),
            )
            .field("listen", &self.listen)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("startup_wait", &self.startup_wait)
            .field("drain_delay", &self.drain_delay)
            .finish_non_exhaustive()
    }
}

impl Service<ServiceDb> {
    /// The service `name` (`"orders"`): it names the service in every error and log line.
    /// Its routes and handlers get its [`ServiceDb`] as their state.
    pub fn new(name: impl Into<String>) -> Self {
        Self::with_state(name, ServiceDb::clone)
    }
}

impl<S> Service<S>
where
    S: Clone + Send + Sync + 'static,
{
    /// Like [`Service::new`], with a state of the service's own for its routes and
    /// handlers, made from its [`ServiceDb`] once connected (an HTTP client, settings, …).
    pub fn with_state(
        name: impl Into<String>,
        state: impl FnOnce(&ServiceDb) -> S + Send + 'static,
    ) -> Self {
        Self {
            name: name.into(),
            database: None,
            amqp: None,
            migrations: None,
            migrate: false,
            migrate_options: MigrateOptions::default(),
            required: Vec::new(),
            exchanges: Vec::new(),
            subscriptions: Vec::new(),
            routes: Router::new(),
            state: Box::new(state),
            listen: DEFAULT_LISTEN.parse().expect("a valid address"),
            consumer_options: ConsumerOptions::default(),
            relay_config: RelayConfig::default(),
            publish_retry: PublishRetry::default(),
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            startup_wait: DEFAULT_STARTUP_WAIT,
            drain_delay: Duration::ZERO,
        }
    }

    /// Its database: the service's own role and schema (`svcdb::Config::from_env()?`).
    /// Required.
    #[must_use]
    pub fn database(mut self, config: svcdb::Config) -> Self {
        self.database = Some(config);
        self
    }

    /// Its broker (`AmqpConfig::from_env()?`). Required when it publishes or subscribes.
    #[must_use]
    pub fn amqp(mut self, config: AmqpConfig) -> Self {
        self.amqp = Some(config);
        self
    }

    /// Its migrations: the gate checks that every one is applied and unchanged, and
    /// [`Service::migrate`] applies them first.
    #[must_use]
    pub fn migrations(mut self, migrations: Migrations) -> Self {
        self.migrations = Some(migrations);
        self
    }

    /// Whether this deploy applies the migrations at start-up (default: no, a separate job
    /// does). Replicas starting together are safe: one applies them, the others wait for
    /// its lock and find the work done.
    #[must_use]
    pub fn migrate(mut self, migrate: bool) -> Self {
        self.migrate = migrate;
        self
    }

    /// How the start-up migration runs (with [`Service::migrate`]): lock and statement
    /// timeouts, lock retries, `allow_unsafe` for the lint's findings, … Default:
    /// [`MigrateOptions::default`], as `svcdb migrate up` without options (found by a user
    /// trial: the migration errors pointed at options a service could not set). Its
    /// `ignore_missing` also lets the start-up gate accept applied migrations this release does
    /// not ship ([`Gate::allow_unknown_applied`](svcdb::Gate::allow_unknown_applied)),
    /// migrating or not: a migration removed on purpose is accepted by both, as by `svcdb
    /// migrate up --ignore-missing` and `svcdb health --ignore-missing` (found by a user trial:
    /// `up` accepted it and the gate kept every replica unready).
    #[must_use]
    pub fn migrate_options(mut self, options: MigrateOptions) -> Self {
        self.migrate_options = options;
        self
    }

    /// Tables the gate requires in the service schema, besides svcdb's own (the outbox and
    /// the claims, which the runtime installs and requires as the service needs them).
    #[must_use]
    pub fn require(mut self, tables: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.required.extend(tables.into_iter().map(Into::into));
        self
    }

    /// An exchange it publishes to ([`events_exchange`](crate::topology::events_exchange)):
    /// declared at start-up, and the service gets an outbox and a relay.
    #[must_use]
    pub fn publishes(mut self, exchange: impl Into<String>) -> Self {
        self.exchanges.push(exchange.into());
        self
    }

    /// Consumes `queue` (declared at start-up with its bindings and dead-letter queue) with
    /// a [`Consumer`] named `consumer`, the scope of its idempotency claims: keep it stable
    /// (renaming it makes every event new to it). `handlers` registers the handlers on the
    /// consumer, with the service's state at hand: `|consumer, state| consumer.on(…)`.
    #[must_use]
    pub fn subscribe(
        mut self,
        queue: QueueSpec,
        consumer: impl Into<String>,
        handlers: impl FnOnce(Consumer, &S) -> Consumer + Send + 'static,
    ) -> Self {
        self.subscriptions.push(Subscription {
            queue,
            consumer: consumer.into(),
            register: Box::new(handlers),
        });
        self
    }

    /// Its HTTP API, served with `/healthz`, `/readyz` and `/metrics` (which it must not define). May be
    /// called more than once: the routers are merged.
    #[must_use]
    pub fn routes(mut self, routes: Router<S>) -> Self {
        self.routes = self.routes.merge(routes);
        self
    }

    /// Where to serve HTTP. Default: [`DEFAULT_LISTEN`]; port 0 takes any free port
    /// ([`Running::addr`] says which).
    #[must_use]
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// Options of every consumer (retries, pauses, and how long to wait for in-flight
    /// handlers at shutdown: keep that below [`Service::shutdown_timeout`], which bounds the
    /// whole shutdown); a subscription's `handlers` may still replace them with
    /// [`Consumer::with_options`].
    #[must_use]
    pub fn consumer_options(mut self, options: ConsumerOptions) -> Self {
        self.consumer_options = options;
        self
    }

    /// The relay's batching and reconnection settings.
    #[must_use]
    pub fn relay_config(mut self, config: RelayConfig) -> Self {
        self.relay_config = config;
        self
    }

    /// How the outbox backs off a row the relay failed to publish.
    #[must_use]
    pub fn publish_retry(mut self, options: PublishRetry) -> Self {
        self.publish_retry = options;
        self
    }

    /// The longest the whole shutdown may take, from the signal to the closed pool. What is
    /// still running then is aborted: nothing is lost (unacknowledged messages are
    /// redelivered, unconfirmed outbox rows republished), but it is done again by the next
    /// replica. Default: [`DEFAULT_SHUTDOWN_TIMEOUT`].
    #[must_use]
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// How long the start-up waits for a database or broker that does not answer yet
    /// (connection refused or timed out, the server starting up, too many connections),
    /// retrying with backoff and logging each attempt; then it fails at that step. A refused
    /// login or a TLS failure fails at once. Default: [`DEFAULT_STARTUP_WAIT`];
    /// [`Duration::ZERO`] tries once. The HTTP port answers meanwhile (bound first):
    /// `/healthz` says the process is alive, so a liveness probe does not restart a replica
    /// that is still waiting, and `/readyz` answers `503` naming the step it waits at.
    #[must_use]
    pub fn startup_wait(mut self, wait: Duration) -> Self {
        self.startup_wait = wait;
        self
    }

    /// How long, at the start of the shutdown, `/readyz` answers `503` while everything else
    /// keeps working (routes, consumers, relay), before anything stops: the time a load
    /// balancer needs to notice and send no more requests. Kubernetes updates its endpoints
    /// a few seconds after the SIGTERM, so give it that (2–5 s) instead of a `preStop` sleep;
    /// it counts against [`Service::shutdown_timeout`]. Default: none (a service with no
    /// request in flight stops serving within milliseconds of the signal).
    #[must_use]
    pub fn drain_delay(mut self, delay: Duration) -> Self {
        self.drain_delay = delay;
        self
    }

    /// Starts the service ([`Service::start`]), runs it until SIGTERM or Ctrl-C, then stops
    /// it gracefully ([`Running::stop`]). Returns the first error: a step of the start-up,
    /// a part that failed while running, or the shutdown.
    pub async fn run(self) -> Result<(), ServiceError> {
        self.start().await?.run_until_signal().await
    }

    /// Runs the start-up sequence and returns once the service serves HTTP, relays and
    /// consumes; [`Running::stop`] or [`Running::run_until_signal`] end it.
    ///
    /// A SIGTERM or Ctrl-C during the start-up stops it: a migration through its failure path,
    /// as `svcdb migrate up` stops (the statement cancelled, its transaction rolled back, a
    /// non-transactional migration stopped in its first statement left pending, not dirty),
    /// a wait for the database or the broker at once ([`Cause::Stopped`]). Once watched, the
    /// signals no longer end the process by themselves (tokio's signal handling): end a started
    /// service with [`Running::run_until_signal`], or with [`Running::stop`] on a signal of
    /// your own.
    pub async fn start(self) -> Result<Running, ServiceError> {
        let Self {
            name,
            database,
            amqp,
            migrations,
            migrate,
            migrate_options,
            mut required,
            exchanges,
            subscriptions,
            routes,
            state,
            listen,
            consumer_options,
            relay_config,
            publish_retry,
            shutdown_timeout,
            startup_wait,
            drain_delay,
        } = self;
        let progress = starting::Progress::new(&name);
        let steps = Steps {
            service: &name,
            progress: &progress,
        };
        // A SIGTERM or Ctrl-C during the start-up stops it (found by a user trial: SIGTERM
        // during a long migration killed the process at once and left a non-transactional
        // migration dirty, refusing every later start): a migration through its failure path,
        // as `svcdb migrate up` stops (its statement cancelled and rolled back; one stopped in
        // its first statement stays pending), a wait for the database or the broker where it
        // is. Watched from here, and by `Running::run_until_signal` once started. Dropping the
        // set when `start` returns ends the watch.
        let interrupt = CancellationToken::new();
        let mut watch = JoinSet::new();
        watch.spawn({
            let interrupt = interrupt.clone();
            async move {
                if shutdown_signal().await.is_ok() {
                    interrupt.cancel();
                }
            }
        });
        let subscribes = !subscriptions.is_empty();
        let uses_broker = !exchanges.is_empty() || subscribes;
        let topology = subscriptions
            .iter()
            .fold(Topology::new(), |t, s| t.queue(s.queue.clone()));
        let topology = exchanges.iter().fold(topology, |t, e| t.exchange(e));
        let (database, amqp) = steps
            .run(Step::Configure, async {
                let database = database.ok_or_else(|| {
                    Cause::Config("no database; give it one with Service::database(svcdb::Config::from_env()?)".into())
                })?;
                let amqp = match amqp {
                    Some(amqp) => Some(amqp),
                    None if uses_broker => {
                        return Err(Cause::Config(
                            "it publishes or subscribes but has no broker; give it one with Service::amqp(AmqpConfig::from_env()?)".into(),
                        ))
                    }
                    None => None,
                };
                if migrate && migrations.is_none() {
                    return Err(Cause::Config(
                        "Service::migrate(true) without migrations; give them with Service::migrations".into(),
                    ));
                }
                // Found by a user trial: an empty name started (its log lines read `service= `),
                // and two consumers of one queue took each other's messages, each dead-lettering
                // the kinds only the other handles.
                if name.trim().is_empty() {
                    return Err(Cause::Config(
                        "the service has no name; give it one with Service::new(\"orders\"): it names its logs, metrics and database connections".into(),
                    ));
                }
                let mut queues: Vec<&str> = subscriptions.iter().map(|s| s.queue.name.as_str()).collect();
                queues.sort_unstable();
                if let Some(twice) = queues.windows(2).find(|w| w[0] == w[1]) {
                    return Err(Cause::Config(format!(
                        "queue {} is subscribed twice; its consumers would take each other's messages: subscribe once, with every handler on that one consumer",
                        twice[0]
                    )));
                }
                Ok((database, amqp))
            })
            .await?;

        // Bound first, and answering from then on (see `starting`): probes get an answer
        // during a long migration or a wait for the database, and a port in use fails
        // before anything else runs. The service's routes take over on the same listener.
        let (listener, addr) = steps
            .run(Step::Listen(listen), async {
                let listener = tokio::net::TcpListener::bind(listen).await?;
                let addr = listener.local_addr()?;
                Ok::<_, std::io::Error>((listener, addr))
            })
            .await?;
        let app_slot: Arc<OnceLock<Router>> = Arc::default();
        let http_stop = CancellationToken::new();
        // Dropped with the start-up's failure, which aborts the server.
        let mut tasks = JoinSet::new();
        let http = tasks.spawn({
            let front = starting::router(progress.clone(), app_slot.clone());
            let stop = http_stop.clone();
            async move {
                axum::serve(listener, front)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await
                    .map_err(Cause::Io)
            }
        });

        let mut database = database;
        // The service's name in `pg_stat_activity` and in its metrics' `service` label,
        // unless configured otherwise (SVCDB_APPLICATION_NAME).
        database
            .application_name
            .get_or_insert_with(|| name.clone());
        let db = steps
            .run(
                Step::Connect,
                until(
                    &interrupt,
                    retry_while_down(&name, "its database", startup_wait, || {
                        ServiceDb::connect(database.clone())
                    }),
                ),
            )
            .await?;
        // From here on a failed step closes the pool it opened.
        let started = async {
            let ignore_missing = migrate_options.ignore_missing;
            let migrated = match (&migrations, migrate) {
                (Some(migrations), true) => {
                    let began = Instant::now();
                    let migrator = Migrator::new(db.clone(), migrations.clone())
                        .with_options(migrate_options)
                        .with_interrupt(interrupt.clone());
                    let mut count_lock_waits = lock_wait_counter(&db);
                    let report = steps
                        .run(
                            Step::Migrate,
                            migrator.up_with(&UpOptions::default(), &mut count_lock_waits),
                        )
                        .await?;
                    metrics::gauge!(
                        "svcdb_migration_last_deploy_duration_seconds",
                        db.metric_labels().iter()
                    )
                    .set(began.elapsed().as_secs_f64());
                    Some(report)
                }
                _ => None,
            };

            steps
                .run(Step::InstallTables, async {
                    if !exchanges.is_empty() {
                        db.install_outbox().await?;
                        required.push(svcdb::outbox::OUTBOX_TABLE.to_owned());
                    }
                    if subscribes {
                        db.install_idempotency().await?;
                        required.push(svcdb::idempotency::PROCESSED_EVENTS_TABLE.to_owned());
                    }
                    Ok::<_, svcdb::Error>(())
                })
                .await?;

            let (gate, report) = steps
                .run(Step::Gate, async {
                    let mut gate = Gate::new().allow_unknown_applied(ignore_missing);
                    if let Some(migrations) = migrations {
                        gate = gate.with_migrations(migrations);
                    }
                    let gate = gate.require(&required)?;
                    let report = db.verify(&gate).await.ensure_ready()?;
                    Ok::<_, svcdb::Error>((gate, report))
                })
                .await?;

            if let Some(amqp) = &amqp {
                steps
                    .run(
                        Step::DeclareTopology,
                        until(
                            &interrupt,
                            retry_while_down(&name, "RabbitMQ", startup_wait, || {
                                declare(amqp, &topology)
                            }),
                        ),
                    )
                    .await?;
            }
            // A signal in the quick steps since the last wait: not served, as if it came there.
            if interrupt.is_cancelled() {
                return Err(ServiceError {
                    service: name.clone(),
                    step: Step::Signal,
                    cause: Cause::Stopped,
                });
            }
            Ok::<_, ServiceError>((migrated, gate, report))
        }
        .await;
        let (migrated, gate, report) = match started {
            Ok(started) => started,
            Err(e) => {
                db.close();
                return Err(e);
            }
        };

        // Serving: nothing below fails; the parts report their errors from their tasks.
        let state = state(&db);
        let relay = match (&amqp, exchanges.is_empty()) {
            (Some(amqp), false) => {
                let outbox = Outbox::new(db.clone()).with_publish_retry(publish_retry);
                Some(Relay::new(amqp, outbox).with_config(relay_config))
            }
            _ => None,
        };
        if consumer_options.shutdown_timeout >= shutdown_timeout && subscribes {
            tracing::warn!(target: "svcdb_amqp::service", service = %name, consumers = ?consumer_options.shutdown_timeout, service_timeout = ?shutdown_timeout, "the consumers' shutdown timeout is not below the service's: a handler still running at the service's deadline is cut off without the consumers' own cleanup; lower ConsumerOptions::shutdown_timeout");
        }
        let consumers: Vec<(String, Consumer)> = match &amqp {
            Some(amqp) => subscriptions
                .into_iter()
                .map(|subscription| {
                    let Subscription {
                        queue,
                        consumer,
                        register,
                    } = subscription;
                    let consumer = Consumer::new(amqp, db.clone(), &queue, consumer)
                        .with_options(consumer_options.clone());
                    (queue.name, register(consumer, &state))
                })
                .collect(),
            None => Vec::new(),
        };
        // Found by a user trial: a consumer without handlers started, said "serving", and
        // failed only from `stop`.
        for (queue, consumer) in &consumers {
            if let Err(e) = consumer.check() {
                db.close();
                return Err(ServiceError {
                    service: name.clone(),
                    step: Step::Consume(queue.clone()),
                    cause: Cause::Amqp(e),
                });
            }
        }
        let draining = Arc::new(AtomicBool::new(false));
        let probes = svcdb::http::router(db.clone(), gate).layer(middleware::from_fn_with_state(
            Probe {
                service: Arc::from(name.as_str()),
                draining: draining.clone(),
                broker: Arc::new(BrokerWatch {
                    relay: relay.as_ref().map(Relay::status),
                    consumers: consumers.clone(),
                }),
            },
            readiness,
        ));
        // Spans for the service's own requests, not for the probes and scrapes.
        let app = routes
            .with_state(state.clone())
            .layer(middleware::from_fn(svcdb::http::trace_requests))
            .merge(probes)
            .merge(svcdb::http::metrics_router(db.clone()));

        let mut running = Running {
            name: name.clone(),
            addr,
            db: db.clone(),
            migrated,
            gate: report,
            draining,
            shutdown_timeout,
            drain_delay,
            parts: HashMap::from([(http.id(), Part::Http)]),
            tasks,
            stop: HashMap::from([(Group::Http, http_stop)]),
        };
        // From here on the port serves the service's routes and probes.
        let _ = app_slot.set(app);

        if let Some(relay) = relay {
            let stop = running.token(Group::Relay);
            running.spawn(Part::Relay, async move {
                relay.run(stop).await.map(drop).map_err(Cause::Amqp)
            });
        }
        for (queue, consumer) in consumers {
            let stop = running.token(Group::Consumers);
            let amqp = amqp.clone();
            let service = name.clone();
            running.spawn(Part::Consumer(queue), async move {
                let mut redeclared = 0;
                loop {
                    let started = tokio::time::Instant::now();
                    let consumed = consumer.run(stop.clone()).await;
                    // Counted while it keeps failing at once; a queue consumed for a while
                    // since its last loss starts the count again.
                    if started.elapsed() > Duration::from_secs(60) {
                        redeclared = 0;
                    }
                    match consumed {
                        // Found by a user trial: a consumer's queue deleted by hand stopped the
                        // whole service, its API included, until someone restarted it. Declared
                        // again as at the start-up, it is consumed again (what was published
                        // to it meanwhile went back to the relays, which retry it). A queue
                        // that keeps disappearing still stops the service.
                        Err(e) if e.is_not_found() && !stop.is_cancelled() && redeclared < 3 => {
                            let Some(amqp) = &amqp else {
                                return Err(Cause::Amqp(e));
                            };
                            redeclared += 1;
                            tracing::warn!(target: "svcdb_amqp::service", service = %service, queue = %consumer.queue().name, error = %e, "the consumer's queue is gone; declaring it again");
                            // Not at once: a quorum queue declared again while the broker still
                            // shuts down the deleted one's process (RabbitMQ 3.10) crashed its
                            // channels with INTERNAL_ERROR.
                            if !crate::connection::pause(&stop, Duration::from_secs(1)).await {
                                return Ok(());
                            }
                            let topology = Topology::new().queue(consumer.queue().clone());
                            declare(amqp, &topology).await.map_err(Cause::Amqp)?;
                        }
                        other => return other.map_err(Cause::Amqp),
                    }
                }
            });
        }
        tracing::info!(target: "svcdb_amqp::service", service = %name, %addr, "serving");
        Ok(running)
    }
}

/// Counts the start-up migration run's lock waits in `svcdb_migration_lock_waits_total` (and
/// logs a wait for the schema's lock):
/// `lock="schema"` when another runner held the schema's migration lock, `lock="table"` for each
/// retry after a statement's `lock_timeout` (a live session held a table lock).
fn lock_wait_counter(db: &ServiceDb) -> impl FnMut(&MigrateEvent) + Send {
    let labels = db.metric_labels().to_vec();
    move |event| {
        let lock = match event {
            MigrateEvent::WaitingForLock { .. } => {
                // Said in the log too (found by a user trial: nothing showed for the 10 s a
                // replica waited for another one's migration).
                tracing::info!(target: "svcdb_amqp::service", "{event}");
                "schema"
            }
            MigrateEvent::LockRetry { .. } => "table",
            _ => return,
        };
        let labels = svcdb::metrics::with_labels(&labels, &[("lock", lock.to_owned())]);
        metrics::counter!("svcdb_migration_lock_waits_total", labels).increment(1);
    }
}

/// An error a start-up step may wait out: the other end is not up yet.
trait NotUpYet {
    fn not_up_yet(&self) -> bool;
}

impl NotUpYet for svcdb::Error {
    /// The pool retried until its acquire timeout and got no connection (refused, no answer,
    /// the server starting up or full); a refused login fails at once, as `Error::Connect`.
    fn not_up_yet(&self) -> bool {
        self.is_timeout()
    }
}

impl NotUpYet for crate::Error {
    fn not_up_yet(&self) -> bool {
        self.is_connection_error()
    }
}

/// Runs `attempt` until it succeeds, fails in a way waiting cannot fix, or `wait` is over
/// (then its last error), pausing with backoff between attempts and logging each: `what`
/// (the database, RabbitMQ) may still be starting, as when it and the service start together.
async fn retry_while_down<T, E, F>(
    service: &str,
    what: &str,
    wait: Duration,
    mut attempt: impl FnMut() -> F,
) -> Result<T, E>
where
    E: NotUpYet + fmt::Display,
    F: Future<Output = Result<T, E>>,
{
    let began = Instant::now();
    let deadline = began + wait;
    let mut backoff = Duration::from_millis(250);
    loop {
        match attempt().await {
            Err(e) if e.not_up_yet() && Instant::now() + backoff < deadline => {
                tracing::warn!(target: "svcdb_amqp::service", %service, error = %e, retry_in = ?backoff, startup_wait = ?wait, "{what} does not answer yet; waiting for it");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(e) if e.not_up_yet() && !wait.is_zero() => {
                let waited = began.elapsed();
                tracing::error!(target: "svcdb_amqp::service", %service, ?waited, startup_wait = ?wait, "{what} did not answer within the start-up wait; giving up (raise Service::startup_wait to wait longer)");
                return Err(e);
            }
            outcome => return outcome,
        }
    }
}

/// `work`, unless `interrupt` is cancelled first ([`Cause::Stopped`]).
async fn until<T, E: Into<Cause>>(
    interrupt: &CancellationToken,
    work: impl Future<Output = Result<T, E>>,
) -> Result<T, Cause> {
    tokio::select! {
        done = work => done.map_err(Into::into),
        () = interrupt.cancelled() => Err(Cause::Stopped),
    }
}

/// Declares `topology` on a connection of its own, closed afterwards (bounded: a broker that
/// stops answering must not hold the start-up).
async fn declare(amqp: &AmqpConfig, topology: &Topology) -> Result<(), crate::Error> {
    let connection = amqp.connect().await?;
    let topology = topology
        .clone()
        .with_quorum_group_size(amqp.quorum_group_size());
    let declared = topology.declare(&connection).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), connection.close(200, "OK".into())).await;
    declared
}

/// What the readiness guard needs.
#[derive(Clone)]
struct Probe {
    service: Arc<str>,
    draining: Arc<AtomicBool>,
    broker: Arc<BrokerWatch>,
}

/// The broker connections of a service's parts, as `/readyz` shows them.
struct BrokerWatch {
    relay: Option<tokio::sync::watch::Receiver<crate::relay::RelayStatus>>,
    /// Each consumer's queue, and a clone sharing its counters.
    consumers: Vec<(String, Consumer)>,
}

impl BrokerWatch {
    /// `/readyz`'s `"broker"` object, and the `broker_unreachable` notice while a part
    /// reconnects; `None` for a service that neither publishes nor subscribes.
    fn report(&self, service: &str) -> Option<(serde_json::Value, Option<serde_json::Value>)> {
        if self.relay.is_none() && self.consumers.is_empty() {
            return None;
        }
        let relay = self.relay.as_ref().map(|r| r.borrow().clone());
        let failing = relay
            .as_ref()
            .filter(|r| r.consecutive_errors > 0)
            .and_then(|r| r.last_error.clone());
        let consumers: Vec<(&str, bool)> = self
            .consumers
            .iter()
            .map(|(queue, consumer)| (queue.as_str(), consumer.stats().connected))
            .collect();
        let mut down: Vec<String> = Vec::new();
        if relay.as_ref().is_some_and(|r| !r.connected) {
            down.push("the outbox relay (events wait in the outbox)".to_owned());
        }
        for (queue, connected) in &consumers {
            if !connected {
                down.push(format!("the consumer of {queue}"));
            }
        }
        let broker = serde_json::json!({
            "connected": down.is_empty(),
            "relay": relay.map(|r| serde_json::json!({
                "connected": r.connected,
                "blocked": r.blocked,
                "last_error": r.last_error.filter(|_| r.consecutive_errors > 0),
            })),
            "consumers": consumers
                .iter()
                .map(|(queue, connected)| serde_json::json!({"queue": queue, "connected": connected}))
                .collect::<Vec<_>>(),
        });
        let notice = if !down.is_empty() {
            Some(serde_json::json!({
                "kind": "broker_unreachable",
                "message": format!(
                    "service {service} has no connection to RabbitMQ for {}: reconnecting; requests are still served",
                    down.join(", ")
                ),
            }))
        } else {
            // Connected, and failing: the broker refuses what the relay publishes (a full
            // queue that rejects publishes, no queue bound). Found by a user trial: `/readyz`
            // said nothing while thousands of rows waited.
            failing.map(|error| {
                serde_json::json!({
                    "kind": "relay_failing",
                    "message": format!(
                        "service {service}'s outbox relay cannot publish: {error}; the events wait in the outbox and are retried; requests are still served"
                    ),
                })
            })
        };
        Some((broker, notice))
    }
}

/// `/readyz` answers 503 once the shutdown began, without asking the database: the load
/// balancer is to stop sending traffic, whatever the database says. Otherwise the database's
/// report, with the broker's connections added (which never turn it to 503).
async fn readiness(State(probe): State<Probe>, request: Request, next: Next) -> Response {
    if request.uri().path() != "/readyz" {
        return next.run(request).await;
    }
    if !probe.draining.load(Ordering::Acquire) {
        let response = next.run(request).await;
        return match probe.broker.report(&probe.service) {
            Some((broker, notice)) => with_broker(response, broker, notice).await,
            None => response,
        };
    }
    let body = serde_json::json!({
        "ready": false,
        "shutting_down": true,
        "problems": [{
            "kind": "shutting_down",
            "message": format!("service {} is shutting down", probe.service),
        }],
    });
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::CACHE_CONTROL, "no-store")],
        Json(body),
    )
        .into_response()
}

/// The health report in `response` with `broker` added, and `notice` appended to its notices;
/// the status and headers kept.
async fn with_broker(
    response: Response,
    broker: serde_json::Value,
    notice: Option<serde_json::Value>,
) -> Response {
    /// Far above any health report: a body this large is not one, and passes unchanged.
    const LIMIT: usize = 1 << 20;
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, LIMIT).await else {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot read the health report\n",
        )
            .into_response();
    };
    let mut report: serde_json::Value = match serde_json::from_slice(&bytes) {
        Ok(serde_json::Value::Object(report)) => serde_json::Value::Object(report),
        _ => return Response::from_parts(parts, axum::body::Body::from(bytes)),
    };
    if let (Some(notice), Some(notices)) = (notice, report["notices"].as_array_mut()) {
        notices.push(notice);
    }
    report["broker"] = broker;
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(report.to_string()))
}

/// The parts stopped together, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Group {
    Consumers,
    Http,
    Relay,
}

/// One task of a running service.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Http,
    Relay,
    Consumer(String),
}

impl Part {
    fn group(&self) -> Group {
        match self {
            Part::Http => Group::Http,
            Part::Relay => Group::Relay,
            Part::Consumer(_) => Group::Consumers,
        }
    }

    fn step(&self) -> Step {
        match self {
            Part::Http => Step::Serve,
            Part::Relay => Step::Relay,
            Part::Consumer(queue) => Step::Consume(queue.clone()),
        }
    }
}

/// A service that passed its start-up and is serving HTTP, relaying and consuming, until
/// [`Running::stop`] (or [`Running::run_until_signal`]). Dropping it aborts every part
/// without the graceful shutdown.
pub struct Running {
    name: String,
    addr: SocketAddr,
    db: ServiceDb,
    migrated: Option<UpReport>,
    gate: GateReport,
    draining: Arc<AtomicBool>,
    shutdown_timeout: Duration,
    drain_delay: Duration,
    tasks: JoinSet<Result<(), Cause>>,
    parts: HashMap<Id, Part>,
    stop: HashMap<Group, CancellationToken>,
}

impl fmt::Debug for Running {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Running")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .field("parts", &self.parts.values().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Running {
    /// The address HTTP is served on (the port chosen, when [`Service::listen`] gave 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The service's pool.
    pub fn db(&self) -> &ServiceDb {
        &self.db
    }

    /// What the migration run did, when this deploy migrated ([`Service::migrate`]).
    pub fn migrated(&self) -> Option<&UpReport> {
        self.migrated.as_ref()
    }

    /// The start-up gate's report (ready, the migration version).
    pub fn gate(&self) -> &GateReport {
        &self.gate
    }

    /// The token that stops one group of parts, made on first use.
    fn token(&mut self, group: Group) -> CancellationToken {
        self.stop.entry(group).or_default().clone()
    }

    fn spawn(
        &mut self,
        part: Part,
        task: impl Future<Output = Result<(), Cause>> + Send + 'static,
    ) {
        let handle = self.tasks.spawn(task);
        self.parts.insert(handle.id(), part);
    }

    /// Waits for SIGTERM or Ctrl-C, then stops gracefully ([`Running::stop`]); a second
    /// signal meanwhile aborts what is left at once ([`Cause::Interrupted`]). A part that
    /// fails for good before (a consumer whose queue was deleted, the HTTP server) stops the
    /// service too, and its error is returned.
    pub async fn run_until_signal(mut self) -> Result<(), ServiceError> {
        let failure = tokio::select! {
            signal = shutdown_signal() => {
                if let Err(e) = signal {
                    Some(self.error(Step::Signal, Cause::Io(e)))
                } else {
                    tracing::info!(target: "svcdb_amqp::service", service = %self.name, "stopping (signal)");
                    None
                }
            }
            Some(joined) = self.tasks.join_next_with_id() => {
                let (part, outcome) = self.joined(joined);
                let cause = outcome.err().unwrap_or(Cause::Ended);
                let error = self.error(part.step(), cause);
                tracing::error!(target: "svcdb_amqp::service", service = %self.name, error = %error, "a part of the service failed; stopping the rest");
                Some(error)
            }
        };
        if let Some(error) = failure {
            let _ = self.stop().await;
            return Err(error);
        }
        // A second signal during the graceful shutdown means "now" (as an operator's second
        // Ctrl-C, or a platform that gave up waiting): dropping the shutdown aborts every part;
        // deliveries held are redelivered and claimed outbox rows republished, as after a crash.
        // A repeat within `SAME_SIGNAL_WITHIN` of the first is the same signal delivered twice
        // (GNU `timeout` and a shell's job control signal the process and then its group).
        let first = Instant::now();
        let interrupted = self.error(Step::Shutdown, Cause::Interrupted);
        let name = self.name.clone();
        let stopping = self.stop();
        tokio::pin!(stopping);
        loop {
            tokio::select! {
                stopped = &mut stopping => return stopped,
                _ = shutdown_signal() => {
                    if first.elapsed() < SAME_SIGNAL_WITHIN {
                        continue;
                    }
                    tracing::warn!(target: "svcdb_amqp::service", service = %name, "second signal: stopping at once without finishing what is held");
                    return Err(interrupted);
                }
            }
        }
    }

    /// Graceful shutdown, in the order of the [module documentation](self#shutdown), within
    /// the service's shutdown timeout. Returns the first error of a part, or that the
    /// timeout cut the shutdown short.
    pub async fn stop(mut self) -> Result<(), ServiceError> {
        let deadline = Instant::now() + self.shutdown_timeout;
        self.draining.store(true, Ordering::Release);
        metrics::gauge!("svcdb_gate_ready", self.db.metric_labels().iter()).set(0.0);
        // Not ready, still serving: the load balancer takes the replica out meanwhile.
        tokio::time::sleep_until(deadline.min(Instant::now() + self.drain_delay)).await;
        let mut first_error = None;
        for group in [Group::Consumers, Group::Http, Group::Relay] {
            let started = Instant::now();
            if let Some(token) = self.stop.get(&group) {
                token.cancel();
            }
            if let Err(e) = self.wait_for(group, deadline, &mut first_error).await {
                first_error.get_or_insert(e);
                break;
            }
            tracing::debug!(target: "svcdb_amqp::service", service = %self.name, ?group, elapsed = ?started.elapsed(), "stopped");
        }
        // Past the deadline: what is left is aborted (its messages are redelivered, its rows
        // republished).
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        self.db.close();
        tracing::info!(target: "svcdb_amqp::service", service = %self.name, "stopped");
        first_error.map_or(Ok(()), Err)
    }

    /// Waits until every part of `group` ended, recording parts' errors; `Err` at the
    /// deadline.
    async fn wait_for(
        &mut self,
        group: Group,
        deadline: Instant,
        errors: &mut Option<ServiceError>,
    ) -> Result<(), ServiceError> {
        while self.parts.values().any(|p| p.group() == group) {
            match tokio::time::timeout_at(deadline, self.tasks.join_next_with_id()).await {
                Ok(Some(joined)) => {
                    let (part, outcome) = self.joined(joined);
                    if let Err(cause) = outcome {
                        errors.get_or_insert(self.error(part.step(), cause));
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    let left: Vec<&Part> = self.parts.values().collect();
                    tracing::warn!(target: "svcdb_amqp::service", service = %self.name, ?left, timeout = ?self.shutdown_timeout, "shutdown timed out; aborting what is left");
                    return Err(self.error(Step::Shutdown, Cause::Timeout(self.shutdown_timeout)));
                }
            }
        }
        Ok(())
    }

    /// The part a finished task was, and its outcome (a panic as an error).
    fn joined(
        &mut self,
        joined: Result<(Id, Result<(), Cause>), tokio::task::JoinError>,
    ) -> (Part, Result<(), Cause>) {
        match joined {
            Ok((id, outcome)) => (self.parts.remove(&id).unwrap_or(Part::Http), outcome),
            Err(e) => {
                let part = self.parts.remove(&e.id()).unwrap_or(Part::Http);
                (part, Err(Cause::Panicked(e.to_string())))
            }
        }
    }

    fn error(&self, step: Step, cause: Cause) -> ServiceError {
        ServiceError {
            service: self.name.clone(),
            step,
            cause,
        }
    }
}

/// SIGTERM (what container runtimes send) or SIGINT (Ctrl-C).
async fn shutdown_signal() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            signal = tokio::signal::ctrl_c() => signal,
            _ = terminate.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await
    }
}

/// Runs the steps of one service's start-up: the one place where each starts and ends (and
/// so where its log lines, and later its metrics and spans, go).
struct Steps<'a> {
    service: &'a str,
    /// Where the port's answers during the start-up read the step.
    progress: &'a starting::Progress,
}

impl Steps<'_> {
    async fn run<T, E: Into<Cause>>(
        &self,
        step: Step,
        work: impl Future<Output = Result<T, E>>,
    ) -> Result<T, ServiceError> {
        let service = self.service;
        self.progress.at(&step);
        tracing::debug!(target: "svcdb_amqp::service", %service, %step, "starting");
        let started = Instant::now();
        match work.await {
            Ok(value) => {
                tracing::info!(target: "svcdb_amqp::service", %service, %step, elapsed = ?started.elapsed(), "done");
                Ok(value)
            }
            Err(cause) => Err(ServiceError {
                service: service.to_owned(),
                step,
                cause: cause.into(),
            }),
        }
    }
}

/// A step of a service's life, as [`ServiceError::step`] names it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Step {
    /// Checking the builder's settings, before connecting to anything.
    Configure,
    /// Connecting to its database as its role.
    Connect,
    /// Applying its migrations.
    Migrate,
    /// Creating svcdb's outbox and claims tables.
    InstallTables,
    /// The start-up gate.
    Gate,
    /// Declaring its exchanges and queues.
    DeclareTopology,
    /// Binding its HTTP port.
    Listen(SocketAddr),
    /// Serving HTTP.
    Serve,
    /// Relaying its outbox.
    Relay,
    /// Consuming a queue (its name).
    Consume(String),
    /// Waiting for SIGTERM or Ctrl-C.
    Signal,
    /// The graceful shutdown.
    Shutdown,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Configure => f.write_str("checking its configuration"),
            Step::Connect => f.write_str("connecting to its database"),
            Step::Migrate => f.write_str("migrating"),
            Step::InstallTables => f.write_str("installing svcdb's outbox and claims tables"),
            Step::Gate => f.write_str("the start-up gate"),
            Step::DeclareTopology => f.write_str("declaring its exchanges and queues"),
            Step::Listen(addr) => write!(f, "listening on {addr}"),
            Step::Serve => f.write_str("serving HTTP"),
            Step::Relay => f.write_str("relaying its outbox"),
            Step::Consume(queue) => write!(f, "consuming queue {queue}"),
            Step::Signal => f.write_str("listening for SIGTERM and Ctrl-C"),
            Step::Shutdown => f.write_str("shutting down"),
        }
    }
}

/// Why a step failed: the underlying error, kept whole for matching.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Cause {
    /// The builder's settings cannot work; the message says what to call.
    #[error("{0}")]
    Config(String),
    /// A database error: connecting, installing tables, or the gate's refusal
    /// ([`svcdb::Error::NotReady`], with the report).
    #[error("{0}")]
    Db(#[from] svcdb::Error),
    /// A migration failed (the schema is as it was, or the error says what is left).
    #[error("{0}")]
    Migrate(#[from] MigrateError),
    /// A broker error: connecting, declaring, or a consumer or the relay giving up.
    #[error("{0}")]
    Amqp(#[from] crate::Error),
    /// The HTTP port could not be bound or served, or the signals could not be watched.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The shutdown did not finish in time; what was left was aborted.
    #[error("not done within {0:?}; what was left was aborted (its messages are redelivered and its outbox rows republished)\n  hint: give handlers and requests less to do at once, or raise Service::shutdown_timeout (below the platform's grace period)")]
    Timeout(Duration),
    /// A second SIGTERM or Ctrl-C came during the graceful shutdown, which was abandoned.
    #[error("interrupted by a second signal; what was left was aborted (its messages are redelivered and its outbox rows republished)")]
    Interrupted,
    /// A SIGTERM or Ctrl-C came during the start-up, which stopped where it was (a
    /// migration stops through its own failure path: [`Cause::Migrate`] with
    /// `MigrateError::Interrupted`).
    #[error("stopped by a signal (SIGTERM or Ctrl-C) during the start-up; nothing was served")]
    Stopped,
    /// A part of the service panicked.
    #[error("panicked: {0}")]
    Panicked(String),
    /// A part of the service ended before the shutdown without an error (none is meant to).
    #[error("ended on its own while the service was running\n  hint: this is a bug in svcdb-amqp's runtime; please report it with the log")]
    Ended,
}

/// A service failed to start, failed while running, or did not stop cleanly: which service,
/// at which step, and why. Shown as `service orders: the start-up gate: not ready: …`.
#[derive(Debug, thiserror::Error)]
#[error("service {service}: {step}: {cause}")]
pub struct ServiceError {
    service: String,
    step: Step,
    // Shown in the message, so not also a `source` (it would print twice in a chain).
    cause: Cause,
}

impl ServiceError {
    /// The service's name.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The step that failed.
    pub fn step(&self) -> &Step {
        &self.step
    }

    /// Why.
    pub fn cause(&self) -> &Cause {
        &self.cause
    }

    /// The underlying error, for `?` into another error type.
    pub fn into_cause(self) -> Cause {
        self.cause
    }

    /// True when a SIGTERM or Ctrl-C stopped the start-up ([`Cause::Stopped`], or the
    /// start-up migration interrupted): not a failure of the service, so a program exits the
    /// way a signal's end is reported (128 + the signal: 143 for SIGTERM), not 1 (found by a
    /// user trial: an orchestrator counted the stop as a crash).
    pub fn is_stopped_by_signal(&self) -> bool {
        match &self.cause {
            Cause::Stopped | Cause::Migrate(MigrateError::Interrupted { .. }) => true,
            // A statement the signal cancelled fails the migration, marked so.
            Cause::Migrate(MigrateError::Failed(failure)) => failure.interrupted,
            _ => false,
        }
    }

    /// True when the start-up gate refused the schema; [`ServiceError::gate_report`] lists
    /// the problems.
    pub fn is_not_ready(&self) -> bool {
        self.gate_report().is_some()
    }

    /// The gate's report when it refused the schema.
    pub fn gate_report(&self) -> Option<&GateReport> {
        match &self.cause {
            Cause::Db(svcdb::Error::NotReady(report)) => Some(report),
            _ => None,
        }
    }

    /// The database error, if that was the cause.
    pub fn db_error(&self) -> Option<&svcdb::Error> {
        match &self.cause {
            Cause::Db(e) => Some(e),
            _ => None,
        }
    }

    /// The broker error, if that was the cause.
    pub fn amqp_error(&self) -> Option<&crate::Error> {
        match &self.cause {
            Cause::Amqp(e) => Some(e),
            _ => None,
        }
    }

    /// True when the shutdown timed out and aborted what was left.
    pub fn is_shutdown_timeout(&self) -> bool {
        matches!(self.cause, Cause::Timeout(_))
    }
}
