//! svcdb gives each microservice of a PostgreSQL system its own safe slice of one database: a
//! connection pool pinned to the service's schema, isolation enforced by PostgreSQL roles,
//! transactions that roll back on error, and (in the modules below) migrations, a start-up gate
//! and health reports.
//!
//! # Layout
//!
//! | concept | module |
//! |---|---|
//! | configuration from code or the environment, every key with its default | [`config`] |
//! | the pool: schema pinned per connection, acquire timeout, min/max, status | [`pool`] ([`ServiceDb`]) |
//! | TLS: libpq's `sslmode`/`sslrootcert` on rustls, one connector per pool, why a handshake failed | [`tls`] ([`Tls`], [`TlsMode`], [`TlsFailure`]) |
//! | connections outside the pool (locks, long jobs) | [`connection`] |
//! | transactions: commit on `Ok`, rollback on error or drop, retry on 40001/40P01 | [`tx`] |
//! | a login role per service owning its schema; nothing for `PUBLIC` | [`mod@provision`] |
//! | validated, always-quoted schema/role/table names | [`ident`] |
//! | errors, matched by variant and SQLSTATE | [`error`] |
//! | migrations: sources (native, diesel, embedded), history, advisory lock, runner | [`migrate`] |
//! | table and schema checks, the start-up gate | [`schema`] |
//! | health report: reachability, latency, pool, version, gate | [`health`] |
//! | Prometheus metrics: the recorder, `/metrics`' text, the pool's and the outbox's series | [`mod@metrics`] |
//! | `/healthz` and `/readyz` as an axum `Router` (feature `http`) | [`http`] |
//! | the event envelope on the wire, and why a message is not one | [`event`] ([`Envelope`], [`EventError`]) |
//! | handling each event once: the claim commits with the handler's writes | [`idempotency`] ([`ServiceDb::process_once`], [`Processed`]) |
//! | the transactional outbox and its relay (`FOR UPDATE SKIP LOCKED`, retries) | [`outbox`] ([`outbox::enqueue`], [`Outbox`]) |
//! | a throwaway database per test | [`testing`] |
//! | the driver's types a service uses, under svcdb's names | [`Transaction`], [`IsolationLevel`], [`SqlState`], [`PooledConn`] |
//! | the driver itself, the same version as svcdb's, for its other types (`Row`, `types::ToSql`, …) | [`tokio_postgres`][pg] |
//!
//! [pg]: https://docs.rs/tokio-postgres/0.7/tokio_postgres/
//!
//! # Example
//!
//! ```no_run
//! use svcdb::{Config, ServiceDb};
//!
//! # async fn demo() -> Result<(), svcdb::Error> {
//! // DATABASE_URL=postgres://catalog@127.0.0.1/shop SVCDB_SCHEMA=catalog_schema
//! let db = ServiceDb::connect(Config::from_env()?).await?;
//! let names: Vec<String> = db
//!     .transaction(async |tx| {
//!         tx.execute("INSERT INTO products (name) VALUES ($1)", &[&"lamp"]).await?;
//!         let rows = tx.query("SELECT name FROM products ORDER BY name", &[]).await?;
//!         Ok::<_, svcdb::Error>(rows.iter().map(|r| r.get(0)).collect())
//!     })
//!     .await?;
//! println!("{names:?} — pool: {:?}", db.status());
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod config;
pub mod connection;
pub mod error;
pub mod event;
pub mod health;
#[cfg(feature = "http")]
pub mod http;
pub mod idempotency;
pub mod ident;
pub mod metrics;
pub mod migrate;
pub mod outbox;
pub mod pool;
pub mod provision;
pub mod schema;
pub mod testing;
pub mod tls;
pub mod tx;

pub use config::Config;
pub use connection::DedicatedConn;
pub use error::{Error, Result, SqlState};
pub use event::{Envelope, EventError};
pub use health::HealthReport;
pub use idempotency::Processed;
pub use ident::Ident;
pub use outbox::{Outbox, OutboxMessage};
pub use pool::{PoolStatus, PooledConn, ServiceDb};
pub use provision::{provision, Password, ProvisionReport, ProvisionSpec};
pub use schema::{Gate, GateReport, Problem, TableInfo, TableKind};
pub use tls::{Tls, TlsFailure, TlsMode};
pub use tx::{IsolationLevel, Retryable, Transaction, TxOptions};

/// Compiles a migrations folder into the binary, as a
/// [`migrate::EmbeddedMigrations`] for [`migrate::Migrations::from_embedded`].
pub use svcdb_macros::embed_migrations;
/// The driver, re-exported so services use the same version as svcdb.
pub use tokio_postgres;
