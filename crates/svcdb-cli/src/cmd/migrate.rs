//! `svcdb migrate` (wired when the library module lands).

use anyhow::Result;

use crate::global::Global;
use crate::Outcome;

/// Subcommands.
#[derive(clap::Subcommand)]
pub enum Command {}

/// Runs one subcommand.
pub async fn run(_global: &Global, command: Command) -> Result<Outcome> {
    match command {}
}
