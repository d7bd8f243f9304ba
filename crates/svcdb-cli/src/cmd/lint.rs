//! `svcdb migrate lint`: the statements that `migrate up` would refuse (or warn about), found
//! without running anything. See [`svcdb::migrate::lint`] for the rules.

use anyhow::Result;
use svcdb::migrate::{lint_each, LintReport, Migrator};

use crate::global::Global;
use crate::output::errln;
use crate::{output, Outcome};

/// Options of `migrate lint`.
#[derive(clap::Args)]
pub struct Args {
    /// Lint every migration in --dir without a database, each as a deploy of its own (tables
    /// from other migrations count as existing and in use), instead of the pending ones as the
    /// next `migrate up` runs them.
    #[arg(long)]
    all: bool,
}

/// Runs `migrate lint`.
pub async fn run(global: &Global, args: Args) -> Result<Outcome> {
    let migrations = global.migrations()?;
    let ignored = migrations.ignored().to_vec();
    let report = if args.all {
        lint_each(&migrations)
    } else {
        // `connect` creates no schema; one that does not exist yet has every migration
        // pending.
        match global.connect().await {
            Ok(db) => Migrator::new(db, migrations).lint_pending().await?,
            Err(e) if e.is::<crate::global::SchemaMissingHere>() => {
                // Said, as `status` says it (found by a user trial: lint was silent).
                errln!(
                    "note: schema {} does not exist yet: every migration is linted as the first deploy into it (`migrate up` creates it with SVCDB_CREATE_SCHEMA=true; `svcdb provision` creates it with its role)",
                    global.schema()?
                );
                // Knowing that nothing exists yet (a lazy pool, which creates nothing): a
                // `DROP … IF EXISTS` drops nothing, where a lint without the database cannot
                // tell (found by a user trial: four false errors on Mattermost's folder).
                let db = svcdb::ServiceDb::new(global.config()?)?;
                Migrator::new(db, migrations).lint_pending().await?
            }
            Err(e) => return Err(e),
        }
    };
    // The files the folder holds that are no migration, which the text warns of on stderr
    // (found by a user trial: the JSON did not say so).
    let mut json = serde_json::to_value(&report)?;
    json["ignored"] = serde_json::to_value(ignored)?;
    output::report(global.json, &json, |_| render(&report))?;
    Ok(if report.blocking().next().is_some() {
        Outcome::NotReady
    } else {
        Outcome::Success
    })
}

/// Each finding (with its fix), then a summary line.
fn render(report: &LintReport) -> String {
    let mut text = String::new();
    for finding in &report.findings {
        text.push_str(&format!("{finding}\n"));
    }
    let plural = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
    let blocking = report.blocking().count();
    let checked = plural(report.migrations, "migration");
    text.push_str(&if report.findings.is_empty() {
        format!("{checked} checked: nothing to report")
    } else {
        format!(
            "{checked} checked: {}, {} ({blocking} would stop `migrate up`)",
            plural(report.errors(), "error"),
            plural(report.warnings(), "warning"),
        )
    });
    text
}
