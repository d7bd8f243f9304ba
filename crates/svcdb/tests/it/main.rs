//! The integration tests of `svcdb`, as one test binary (one link, not one per file), each
//! file a module. They talk to the real PostgreSQL and RabbitMQ (see the README).

mod forwarder;
mod password_server;

mod connect;
mod failover;
#[cfg(feature = "http")]
mod health;
mod idempotency;
mod isolation;
mod limits;
mod metrics;
mod migrate_adopt;
mod migrate_deploy;
mod migrate_lint;
mod migrate_pipeline;
mod migrate_repeatable;
mod migrate_runner;
mod migrate_source;
mod migrate_versions;
mod outbox;
mod pool;
mod provision;
mod schema;
mod secrets;
mod tls;
mod transactions;
