//! RabbitMQ for svcdb services: the topology each service declares, a consumer runtime that
//! handles every event once in the service's database, and the relay that publishes the
//! transactional outbox.
//!
//! svcdb gives the database half of reliable messaging: [`svcdb::outbox::enqueue`] stores an
//! event in the business transaction, and [`ServiceDb::process_once`](svcdb::ServiceDb::process_once)
//! commits a consumer's claim on an event with its writes. This crate is the broker half, on
//! [lapin](https://docs.rs/lapin): what is declared, how deliveries are acknowledged (only
//! after the commit), what happens to messages that cannot be handled (a dead-letter queue,
//! with the reason), and how outbox rows reach the broker (publisher confirms, reconnection).
//!
//! # Layout
//!
//! Most of svcdb-amqp is one import away: `use svcdb_amqp::{AmqpConfig, Consumer, Relay, …}`.
//! Four modules are public, as namespaces with their own documentation: [`topology`] (the
//! names and arguments declared on the broker), [`publish`] (an event's message properties;
//! publishing outside the outbox), [`service`] (the start-up steps, [`service::Step`]) and
//! [`telemetry`] (logs and traces).
//!
//! | concept | where |
//! |---|---|
//! | the broker URL (password never shown), prefetch, connection name; connecting with a bounded timeout | [`AmqpConfig`] ([`DEFAULT_URL`], [`redact_url`]) |
//! | exchanges per producing service, quorum queues per handler with a delivery limit, dead-letter exchange and queue per queue; names checked with svcdb's rules ([`svcdb::outbox::check_declared_name`]) | [`topology`] ([`Topology`], [`QueueSpec`]) |
//! | handlers: a trait with an `async fn`, or closures; how their errors are retried | [`EventHandler`], [`HandlerError`] |
//! | the consumer runtime: building and running it (reconnecting), the consume loop, batches (many deliveries in one transaction, each under a savepoint; `multiple` acks) and per delivery: decode, claim and handle, ack after commit, dead-letter, the pause while the database is out, graceful shutdown | [`Consumer`], [`ConsumerOptions`]; a file each under `consumer/`: `consume`, `batch`, `delivery`, `settle`, `dead_letter`, `outage` |
//! | the broker connection as the consumer, the relay and the topology use it: connecting unless shut down, channels opened and closed within a bound, backoff between reconnections | `connection` (internal; [`publish::confirm_channel`]) |
//! | the message properties of an event; confirmed publishing | [`publish`] |
//! | the outbox relay: batches with publisher confirms, woken on commit (in-process, or `LISTEN`/`NOTIFY`) with polling as the safety net, reconnect with backoff, status; its settings ([`RelayConfig`]; when failed rows are retried is the outbox's [`svcdb::outbox::PublishRetry`]) | [`Relay`], [`RelayStatus`] |
//! | deleting old claims and published outbox rows on a schedule | [`Retention`] |
//! | moving a queue's dead letters back to it after a fix, each confirmed before it leaves (`svcdb events replay`) | [`replay_dead_letters`] |
//! | errors, matched by variant | [`Error`] |
//! | logs (`RUST_LOG`, `SVCDB_LOG_FORMAT=json`) and, with feature `otlp`, spans exported over OTLP | [`telemetry`] ([`telemetry::init`]) |
//! | the spans of a relay publish, a delivery and its handler (OpenTelemetry's messaging conventions), joined to the producer's trace by the `traceparent` header ([`svcdb::trace`]) | `spans` (internal) |
//! | the service runtime: the start-up sequence (connect, migrate, install, gate, declare, serve, relay, consume) and the graceful shutdown, written once; here, not in svcdb, because it runs the consumers and the relay | [`service`] ([`Service`]) |
//!
//! # A service end to end
//!
//! ```no_run
//! use svcdb::{outbox, Envelope, Outbox, ServiceDb};
//! use svcdb_amqp::topology::{events_exchange, QueueSpec, Topology};
//! use svcdb_amqp::{AmqpConfig, Consumer, Relay};
//! use tokio_util::sync::CancellationToken;
//!
//! # async fn demo() -> anyhow::Result<()> {
//! let db = ServiceDb::connect(svcdb::Config::from_env()?).await?;
//! db.install_idempotency().await?;
//! db.install_outbox().await?;
//!
//! // Declare what orders publishes and consumes (idempotent; every replica, every start).
//! let amqp = AmqpConfig::from_env()?.with_connection_name("orders");
//! let queue = QueueSpec::new("orders.reserve-stock").bind(events_exchange("catalog"), "product.stock.*");
//! let connection = amqp.connect().await?;
//! Topology::new().exchange(events_exchange("orders")).queue(queue.clone()).declare(&connection).await?;
//!
//! // Handle ProductStockReserved once per event id; announce OrderConfirmed in the same tx.
//! let consumer = Consumer::new(&amqp, db.clone(), &queue, "orders.reserve-stock").on(
//!     "ProductStockReserved",
//!     |tx, event| Box::pin(async move {
//!         let order_id = event.payload["order_id"].as_i64().unwrap_or_default();
//!         tx.execute("UPDATE orders SET status = 'confirmed' WHERE id = $1", &[&order_id]).await?;
//!         let confirmed = Envelope::new("OrderConfirmed", "orders", serde_json::json!({ "order_id": order_id }))
//!             .caused_by(event);
//!         outbox::enqueue(tx, &events_exchange("orders"), "order.confirmed", &confirmed).await?;
//!         Ok(())
//!     }),
//! );
//! let relay = Relay::new(&amqp, Outbox::new(db));
//!
//! let shutdown = CancellationToken::new();
//! let consuming = tokio::spawn({ let s = shutdown.clone(); async move { consumer.run(s).await } });
//! let relaying = tokio::spawn({ let s = shutdown.clone(); async move { relay.run(s).await } });
//! tokio::signal::ctrl_c().await?;
//! shutdown.cancel(); // stop taking messages, finish in-flight ones, flush the relay's batch
//! consuming.await??;
//! relaying.await??;
//! # Ok(()) }
//! ```
//!
//! # Guarantees
//!
//! * **Effects once.** A delivery is acknowledged only after its handler's transaction (with
//!   the claim) committed; a redelivery, a duplicate publish or a concurrent copy is a
//!   [`Processed::Duplicate`](svcdb::Processed::Duplicate) and is acknowledged unchanged.
//! * **Nothing lost between database and broker.** Outbox rows are marked published only
//!   after the broker's confirm; while the broker is unreachable they wait.
//! * **No endless loops.** A message is delivered at most
//!   [`QueueSpec::max_deliveries`](topology::QueueSpec::max_deliveries) times, counted by the
//!   broker even across crashes, then dead-lettered.
#![deny(missing_docs)]

// The public namespaces: what a service names by path, each with its reference documentation
// (the names and shapes declared on the broker, publishing outside the outbox, the steps of a
// service's start-up). Everything else is re-exported below; its module is private so that the
// files can be reorganised freely.
pub mod publish;
pub mod service;
pub mod telemetry;
pub mod topology;

mod config;
mod connection;
mod consumer;
mod error;
mod handler;
mod relay;
mod replay;
mod retention;
mod spans;

pub use config::{
    redact_url, AmqpConfig, DEFAULT_CONNECT_TIMEOUT, DEFAULT_HEARTBEAT_SECS,
    DEFAULT_MAX_QUORUM_GROUP_SIZE, DEFAULT_PREFETCH, DEFAULT_URL,
};
pub use consumer::{Consumer, ConsumerOptions, ConsumerStats, UnknownKind, DEFAULT_BATCH};
pub use error::{Error, Result};
pub use handler::{EventHandler, HandlerError, HandlerFuture};
pub use relay::{Relay, RelayConfig, RelayStatus};
pub use replay::{replay_dead_letters, ReplayReport};
pub use retention::Retention;
pub use service::{Running, Service, ServiceError};
pub use topology::{QueueSpec, Topology};

/// The AMQP client, re-exported so services use the same version as svcdb-amqp.
pub use lapin;
/// The shutdown signal that [`Consumer::run`] and [`Relay::run`] take: make one with
/// `CancellationToken::new()`, give each task a `clone()`, and call `cancel()` (on SIGTERM,
/// say) to stop them all: each shuts down gracefully and returns.
///
/// tokio-util's token, under svcdb-amqp's name so that a service needs no dependency of its
/// own on tokio-util.
pub type CancellationToken = tokio_util::sync::CancellationToken;

// Compiles the README's examples as doc tests, so the README cannot drift from the API. Here,
// not in svcdb: the examples use both crates, and svcdb-amqp depends on svcdb.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
