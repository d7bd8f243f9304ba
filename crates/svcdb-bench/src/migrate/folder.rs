//! `svcdb-bench migrate --diesel-folder <DIR>`: svcdb and diesel CLI on a team's own diesel
//! migrations folder, as a team deciding whether to switch would compare them.
//!
//! Each round applies the whole folder from empty with both command-line tools, each in a
//! fresh database and in turns first, process start included for both (`svcdb migrate up
//! --allow-unsafe`: diesel runs whatever the folder holds, so svcdb's lint must not refuse
//! what diesel would run). The schemas both built are compared object by object. The figure
//! is the median of the rounds' svcdb / diesel ratios, as in the generated benchmark; there is
//! no target, the folder being the user's.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use svcdb::migrate::Migrations;

use super::{
    all_secs, diesel_db, diesel_in, fingerprint, same_or_first, secs, svcdb_cli, svcdb_up,
    timed_call, Fingerprint, MigrateArgs,
};
use crate::pg::{self, Server};
use crate::report::{self, Figures};

/// Runs the comparison on `folder` and prints the report.
pub async fn run(server: &Server, args: &MigrateArgs, folder: &Path) -> Result<()> {
    let machine = report::Machine::now(server.version());
    if diesel_migrations(folder)? == 0 {
        bail!(
            "{} is not a diesel migrations folder: it holds no `<version>_<name>/up.sql`\n  hint: name the folder that holds them (diesel's default is `migrations/`)",
            folder.display()
        );
    }
    let migrations = Migrations::from_dir(folder)
        .with_context(|| format!("cannot read the migrations in {}", folder.display()))?;
    let Some(diesel) = pg::find_tool("diesel") else {
        bail!("diesel is not on PATH: install it (`cargo install diesel_cli --no-default-features --features postgres`) or add its folder to PATH");
    };
    let Some(svcdb) = svcdb_cli() else {
        bail!("the svcdb binary is neither next to svcdb-bench nor on PATH: build it with `cargo build --release -p svcdb-cli`");
    };
    // diesel reads diesel.toml from the project around its working directory; an empty one in
    // a folder of our own keeps it from finding (and acting on) the user's.
    let config_dir = tempfile::tempdir()?;
    let config = config_dir.path().join("diesel.toml");
    std::fs::write(&config, "")?;

    // Each round's databases kept to the end of the run (Server::scratch_database).
    let name = |tool: &str, round: u32| format!("{}_folder_{tool}_{round}", args.database_prefix);
    let svcdb_command = |db: &str| {
        let mut cmd = svcdb_up(server, &svcdb, db, folder);
        cmd.arg("--allow-unsafe");
        cmd
    };

    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let mut objects: Option<Fingerprint> = None;
    server
        .measuring(async {
            for round in 1..=args.rounds {
                for diesel_turn in [round % 2 == 0, round % 2 == 1] {
                    let db = name(if diesel_turn { "diesel" } else { "svcdb" }, round);
                    let (command, what) = if diesel_turn {
                        let command = diesel_in(server, &diesel, &db, folder, config.clone());
                        (command(), "diesel migration run")
                    } else {
                        (svcdb_command(&db), "svcdb migrate up")
                    };
                    eprintln!("round {round}/{}: {what}…", args.rounds);
                    let conn = diesel_db(server, &db).await?;
                    server.checkpoint().await;
                    let took = timed_call(command, what).await?;
                    same_or_first(&mut objects, fingerprint(&conn).await?, what)?;
                    if diesel_turn {
                        theirs.push(took);
                    } else {
                        ours.push(took);
                    }
                }
            }
            Ok(())
        })
        .await?;
    let objects = objects.expect("at least one round");

    let ratio =
        report::paired_median(&all_secs(&ours), &all_secs(&theirs)).expect("at least one round");
    let mut f = Figures::new();
    f.set("benchmark", "migrate-folder");
    machine.add_to(&mut f);
    f.set("folder", folder.display().to_string());
    f.set("migrations", migrations.len());
    f.set("schema_objects", objects.count);
    f.set("rounds", args.rounds);
    f.set("svcdb_cli_up_s", secs(report::median(&ours)));
    f.set("svcdb_cli_up_s_rounds", all_secs(&ours));
    f.set("diesel_up_s", secs(report::median(&theirs)));
    f.set("diesel_up_s_rounds", all_secs(&theirs));
    f.set(
        "svcdb_vs_diesel_rounds",
        report::paired_ratios(&all_secs(&ours), &all_secs(&theirs)),
    );
    f.set("svcdb_vs_diesel", ratio);

    let text = format!(
        "svcdb-bench migrate --diesel-folder: {} migrations in {} ({} schema objects), median of {} rounds, process start included\n{}\n\n  svcdb migrate up      {}\n  diesel migration run  {}\n  svcdb / diesel        {}× (median of the rounds' ratios)",
        migrations.len(),
        folder.display(),
        objects.count,
        args.rounds,
        machine.line(),
        seconds(report::median(&ours)),
        seconds(report::median(&theirs)),
        report::num(ratio),
    );
    report::print(&text, &f, &[], args.json);
    Ok(())
}

/// How many `<version>_<name>/up.sql` `folder` holds (diesel's layout).
fn diesel_migrations(folder: &Path) -> Result<usize> {
    let entries = std::fs::read_dir(folder)
        .with_context(|| format!("cannot read the folder {}", folder.display()))?;
    let mut count = 0;
    for entry in entries {
        let entry =
            entry.with_context(|| format!("cannot read the folder {}", folder.display()))?;
        if entry.path().join("up.sql").is_file() {
            count += 1;
        }
    }
    Ok(count)
}

fn seconds(d: Duration) -> String {
    format!("{} s", report::num(secs(d)))
}
