//! svcdb gives each microservice of a PostgreSQL system its own safe slice of one database: a
//! connection pool pinned to the service's schema, isolation enforced by PostgreSQL roles,
//! transactions that roll back on error, and (in the modules below) migrations, a start-up gate
//! and health reports.
//!
//! # Layout
//!
//! Most of svcdb is one import away: `use svcdb::{Config, ServiceDb, Gate, …}`. The modules
//! that are public are namespaces a service names by path, each with its own documentation:
//! [`migrate`], [`outbox`], [`idempotency`], [`event`] (the wire format), [`error`] (error
//! rendering and driver-error predicates), [`http`], [`trace`] and, for tests, `testing`.
//!
//! | concept | where |
//! |---|---|
//! | configuration from code or the environment, every key with its default | [`Config`] ([`Config::from_env`]); [`parse_url`] for an admin's URL |
//! | the pool: schema pinned per connection, acquire timeout, min/max, status | [`ServiceDb`], [`PooledConn`], [`PoolStatus`] |
//! | TLS: libpq's `sslmode`/`sslrootcert` on rustls, one connector per pool, why a handshake failed | [`Tls`], [`TlsMode`], [`TlsFailure`] |
//! | connections outside the pool (locks, long jobs, provisioning) | [`DedicatedConn`] |
//! | transactions: commit on `Ok`, rollback on error or drop, retry on 40001/40P01; the `BEGIN` sent with the first statement, savepoints; `execute` prepared once per connection | [`ServiceDb::transaction`], [`Transaction`], [`Savepoint`], [`Execute`], [`TxOptions`], [`Retryable`] |
//! | a login role per service owning its schema; nothing for `PUBLIC` | [`provision()`], [`ProvisionSpec`], [`ProvisionReport`] |
//! | validated, always-quoted schema/role/table names | [`Ident`] |
//! | errors, matched by variant and SQLSTATE; a failure rendered with its hints | [`Error`], [`SqlState`]; [`error`] ([`error::Report`]) |
//! | migrations: sources (native, diesel, embedded), history, advisory lock, runner | [`migrate`] ([`migrate::Migrator`]) |
//! | table and schema checks, the start-up gate | [`Gate`], [`GateReport`], [`Problem`], [`Notice`], [`TableInfo`] |
//! | health report: reachability, latency, pool, version, gate | [`ServiceDb::health`], [`HealthReport`] |
//! | Prometheus metrics: the recorder, `/metrics`' text, the pool's and the outbox's series | [`mod@metrics`] |
//! | `/healthz` and `/readyz` as an axum `Router` (feature `http`, on by default) | [`http`] ([`http::router`]) |
//! | the event envelope on the wire, and why a message is not one | [`event`] ([`Envelope`], [`EventError`]) |
//! | handling each event once: the claim commits with the handler's writes | [`idempotency`] ([`ServiceDb::process_once`], [`Processed`]; many events in one transaction: [`idempotency::claim_batch`], [`idempotency::savepoint_event`]) |
//! | the transactional outbox and its relay (`FOR UPDATE SKIP LOCKED`, retries, waking relays on commit) | [`outbox`] ([`outbox::enqueue`], [`Outbox`], [`outbox::Wakeups`]) |
//! | trace context across the broker: the W3C traceparent of the current span (stored with an outbox row), a span continuing a remote one | [`trace`] ([`trace::TraceParent`], [`trace::current`], [`trace::continue_trace`]) |
//! | a throwaway database per test (feature `testing`, for dev-dependencies) | `testing::TestDb` |
//! | the driver's types a service uses, under svcdb's names | [`IsolationLevel`], [`SqlState`], [`PooledConn`] |
//! | the transactions svcdb's own statements run in, prepared once per pooled connection | [`AnyTransaction`] |
//! | the driver itself, the same version as svcdb's, for its other types (`Row`, `types::ToSql`, …) | [`tokio_postgres`][pg] |
//!
//! A `#[doc(hidden)]` module, `__private`, holds what the workspace's own crates (svcdb-amqp,
//! svcdb-cli, svcdb-bench) and svcdb's tests share with svcdb; it is not API and may change in
//! any release.
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

// The public namespaces: each is a concept a service names by path (`svcdb::migrate::Migrator`,
// `svcdb::outbox::enqueue`), with more than one type. Everything else is reached through the
// re-exports below; its module is private so that the files can be reorganised freely.
pub mod error;
pub mod event;
#[cfg(feature = "http")]
pub mod http;
pub mod idempotency;
pub mod metrics;
pub mod migrate;
pub mod outbox;
mod scrape;
#[cfg(feature = "testing")]
pub mod testing;
pub mod trace;

mod any_tx;
mod config;
mod connection;
mod health;
mod ident;
mod pool;
mod provision;
mod schema;
mod tls;
mod transaction;
mod tx;

pub use any_tx::AnyTransaction;
pub use config::{parse_url, Config};
pub use connection::DedicatedConn;
pub use error::{Error, Result, SqlState};
pub use event::{Envelope, EventError};
pub use health::{DatabaseHealth, HealthReport};
pub use idempotency::Processed;
pub use ident::{Ident, IdentError};
pub use outbox::{Outbox, OutboxMessage};
pub use pool::{PoolStatus, PooledConn, ServiceDb, WaitPercentiles};
pub use provision::{provision, Password, ProvisionReport, ProvisionSpec};
pub use schema::{Gate, GateReport, Notice, Problem, TableInfo, TableKind};
pub use tls::{Tls, TlsFailure, TlsMode};
pub use transaction::{Execute, Savepoint, Transaction, MAX_CACHED_STATEMENTS};
pub use tx::{IsolationLevel, Retryable, TxOptions};

/// Compiles a migrations folder into the binary, as a
/// [`migrate::EmbeddedMigrations`] for [`migrate::Migrations::from_embedded`].
pub use svcdb_macros::embed_migrations;
/// The driver, re-exported so services use the same version as svcdb.
pub use tokio_postgres;

/// Not API: helpers the workspace's other crates (svcdb-amqp, svcdb-cli, svcdb-bench) and
/// svcdb's own integration tests share with svcdb, so that a rule is written once (how a
/// duration setting is spelled, how far a deadline may reach). Hidden from the docs and exempt
/// from semver: a service must not use them.
#[doc(hidden)]
pub mod __private {
    /// How svcdb spells a duration setting (`500ms`, `5s`, a bare number of seconds): for
    /// svcdb-amqp's `SVCDB_AMQP_*` keys and the CLI's `--lock-wait`, so they read as svcdb's do.
    pub use crate::config::parse_duration;
    /// A deadline's wait, capped so that `Instant::now() + wait` cannot panic: for svcdb-amqp's
    /// publisher-confirm deadline.
    pub use crate::config::{capped_wait, MAX_WAIT};
    /// The migrations' advisory lock: svcdb's tests hold it to see what a migration run does
    /// while another one runs.
    pub use crate::migrate::lock::MigrationLock;
    /// The statement splitter of the migration runner: the CLI maps a server error position in
    /// a failed script to its statement with it, and svcdb's tests check that psql-only lines
    /// split to nothing.
    pub use crate::migrate::split::split_statements;
}
