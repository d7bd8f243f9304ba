//! The integration tests of `svcdb-cli`, as one test binary (one link, not one per file), each
//! file a module. They talk to the real PostgreSQL and RabbitMQ (see the README).

mod common;
#[path = "../../../svcdb/tests/it/password_server/mod.rs"]
mod password_server;

mod errors;
mod events;
mod limits;
mod migrate;
mod migrate_adopt;
mod migrate_deploy;
mod migrate_lint;
mod migrate_owner;
mod migrate_template;
mod password;
mod provision;
mod provision_again;
mod readme;
mod schema;
