//! `svcdb health`: the report `/readyz` serves, from the command line.

use anyhow::Result;

use super::args::{outcome, GateArgs};
use crate::global::Global;
use crate::{output, Outcome};

/// Options of `svcdb health`: the gate's (see `svcdb schema verify`).
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    gate: GateArgs,
}

/// Prints the health report; exit 0 when ready, 1 when not (the database unreachable, or a
/// problem of the gate). Never waits longer than `--timeout`.
pub async fn run(global: &Global, args: Args) -> Result<Outcome> {
    let (db, gate) = args.gate.prepare(global)?;
    let report = db.health(&gate).await;
    output::report(global.json, &report, |r| {
        crate::wording::for_cli(&r.to_string())
    })?;
    Ok(outcome(report.gate.ready))
}
