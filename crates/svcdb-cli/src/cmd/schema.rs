//! `svcdb schema`: the service schema's tables, and the start-up gate.

use anyhow::Result;
use serde::Serialize;
use svcdb::TableInfo;

use super::args::{outcome, GateArgs};
use crate::global::Global;
use crate::{output, Outcome};

/// Subcommands of `svcdb schema`.
#[derive(clap::Subcommand)]
pub enum Command {
    /// List the tables and views of the service schema, with their kind.
    Tables,
    /// Run the start-up gate: exit 0 when ready, 1 when not, listing every problem.
    ///
    /// Checks that connections use the service schema; that every migration in --dir is
    /// applied, unchanged, with none dirty and none applied that --dir lacks but for newer
    /// ones (a newer release's, noted); and that the --require tables exist. A migration in
    /// progress (another runner holds the lock) is noted, not a problem. When --dir is left at its default and ./migrations does not
    /// exist, migrations are not checked (the report says so); a folder named with --dir or
    /// SVCDB_MIGRATIONS_DIR must exist. Changes nothing in the database.
    Verify(GateArgs),
}

/// Runs one subcommand.
pub async fn run(global: &Global, command: Command) -> Result<Outcome> {
    match command {
        Command::Tables => tables(global).await,
        Command::Verify(args) => {
            let (db, gate) = args.prepare(global)?;
            let report = db.verify(&gate).await;
            output::report(global.json, &report, |r| {
                crate::wording::for_cli(&r.to_string())
            })?;
            Ok(outcome(report.ready))
        }
    }
}

/// `svcdb schema tables --json`: the schema and its tables.
#[derive(Serialize)]
struct Listing<'a> {
    schema: &'a str,
    tables: &'a [TableInfo],
}

async fn tables(global: &Global) -> Result<Outcome> {
    let db = global.connect().await?;
    let tables = db.list_tables().await?;
    let listing = Listing {
        schema: db.schema().as_str(),
        tables: &tables,
    };
    output::report(global.json, &listing, |l| {
        if l.tables.is_empty() {
            return format!("schema {} has no tables or views", l.schema);
        }
        let mut table = output::table(["name", "kind"]);
        for t in l.tables {
            table.add_row([t.name.as_str(), t.kind.as_str()]);
        }
        table.to_string()
    })?;
    Ok(Outcome::Success)
}
