//! Table and schema checks on the service's pool, and the start-up gate.
//!
//! The failure this module exists for: the orders service is deployed, its migrations did not
//! run, and the first customer's order fails with `relation "orders" does not exist`. A service
//! that runs the [`Gate`] at start-up refuses to start instead, and says why, before it takes
//! any traffic:
//!
//! ```no_run
//! use svcdb::migrate::Migrations;
//! use svcdb::Gate;
//! use svcdb::{Config, ServiceDb};
//!
//! # async fn demo() -> anyhow::Result<()> {
//! let db = ServiceDb::connect(Config::from_env()?).await?;
//! let gate = Gate::new()
//!     .with_migrations(Migrations::from_dir("migrations")?) // or from_embedded(&MIGRATIONS)
//!     .require(["orders", "order_lines"])?;
//! // Lists every problem at once ("migration 3 (add_orders) is not applied", "table orders is
//! // missing", …); `?` turns a failed gate into an error, so the service exits non-zero.
//! db.verify(&gate).await.ensure_ready()?;
//! # Ok(()) }
//! ```
//!
//! The same [`Gate`] then feeds the health report
//! ([`ServiceDb::health`](crate::ServiceDb::health)) and the `/readyz` endpoint
//! ([`http::router`](crate::http::router)), so readiness means exactly what the start-up check
//! meant.
//!
//! Every catalog query names the configured schema as a bind parameter rather than relying on
//! `current_schema()`: a connection whose `search_path` went wrong must not make the checks
//! look at the wrong schema.
//!
//! # Layout
//!
//! | concept | file |
//! |---|---|
//! | the service schema's tables: list, exist, require ([`TableInfo`], [`TableKind`]) | `tables.rs` |
//! | the start-up gate and its run ([`Gate`], [`ServiceDb::verify`](crate::ServiceDb::verify)) | `gate/mod.rs` |
//! | the gate's verdict, its messages and JSON ([`GateReport`], [`Problem`], [`Notice`]) | `gate/report.rs` |

pub(crate) mod gate;
mod tables;

pub use gate::report::{GateReport, Notice, Problem};
pub use gate::Gate;
pub use tables::{TableInfo, TableKind};
