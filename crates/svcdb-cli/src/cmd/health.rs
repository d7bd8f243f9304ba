//! `svcdb health` (wired when the library module lands).

use anyhow::Result;

use crate::global::Global;
use crate::Outcome;

/// Options.
#[derive(clap::Args)]
pub struct Args {}

/// Runs.
pub async fn run(_global: &Global, _args: Args) -> Result<Outcome> {
    Ok(Outcome::Success)
}
