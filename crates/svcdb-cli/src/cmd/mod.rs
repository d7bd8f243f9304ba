//! One module per subcommand.

pub mod args;
pub mod events;
pub mod health;
pub mod lint;
pub mod migrate;
pub mod provision;
pub mod schema;
