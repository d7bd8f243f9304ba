//! `svcdb-bench migrate`: what svcdb's migration runner costs on top of the SQL it runs.
//!
//! On a generated corpus (see [`corpus`]) it measures, each in a fresh database so that no
//! measurement inherits another's objects, dead tuples or dirty buffers:
//!
//! * `up` from empty and `down` to zero through [`svcdb::migrate::Migrator`];
//! * the no-op `up` (everything applied), the call every service replica makes at start-up:
//!   the median of many calls, with the corpus applied and with 1 000 versions applied;
//! * the floor: every up script concatenated and sent through one `psql -f` session, which
//!   pays for the SQL and nothing else;
//! * `psql -f` once per file: the naive shell-loop runner;
//! * diesel CLI (`diesel migration run`, when `diesel` is on `PATH`) on the same corpus laid
//!   out as a diesel folder (`<version>_<name>/up.sql`, `down.sql`, `metadata.toml` for the
//!   migrations outside a transaction, one statement each: see [`corpus::write_diesel`]), and
//!   svcdb on that same folder: `up` from empty, and
//!   the no-op run of both command-line tools, process start included (`svcdb migrate up`,
//!   when the `svcdb` binary is next to this one or on `PATH`), one tool's call then the
//!   other's, so that both meet the same load.
//!
//! `up`, `down`, the floor and diesel run `--rounds` times, svcdb, psql and diesel alternating, and the
//! medians are reported: on a shared machine one round can meet a build. The ratios the
//! targets judge (`up_vs_floor`, `svcdb_vs_diesel`) are the medians of each round's ratio,
//! whose two sides ran back to back (each pair in turns first), not ratios of the two
//! medians, which would set one round's figure against another's. The part of `up`
//! spent outside the scripts (connecting, the advisory lock, session settings, the lint, the
//! history, each transaction's `BEGIN` and `COMMIT`) is reported on its own, from the runner's
//! own per-migration timings, so a miss against the floor points at svcdb's own cost or at
//! the SQL.
//!
//! The schemas the `up` paths produce are compared object by object, so the runner and
//! the references provably did the same work, and after `down` the schema must hold nothing
//! but the history table, which proves every down script reverts its up script.

pub mod corpus;
mod folder;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use svcdb::migrate::{DownOptions, MigrateEvent, Migrations, Migrator, UpOptions};
use svcdb::{DedicatedConn, Ident, ServiceDb};

use crate::pg::{self, Server};
use crate::report::{self, Bound, Figures, Target};

/// The schema every measurement migrates (in its own database).
const SCHEMA: &str = "bench";

/// Options of `svcdb-bench migrate`.
#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// Print every figure as one JSON object on the last line.
    #[arg(long)]
    json: bool,

    /// Realistic migrations to generate and run.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u32).range(3..=9999))]
    count: u32,

    /// Applied migrations for the second no-op figure (a cheap corpus of this many versions).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=9999))]
    applied: u32,

    /// No-op `up` calls per figure; the median is reported.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10000))]
    noop_calls: u32,

    /// Rounds of svcdb up/down and the one-session floor, and of diesel and svcdb on the diesel
    /// folder, each pair in turns first; medians are reported, and the targets judge the
    /// median of the rounds' ratios.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    rounds: u32,

    /// Rows each data backfill inserts.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    backfill_rows: u32,

    /// Prefix of the benchmark's databases (`<prefix>_svcdb_1`, …): recreated for each
    /// measurement, and all dropped at the end of the run.
    #[arg(long, default_value = "svcdb_bench_migrate")]
    database_prefix: String,

    /// Write the corpora here and keep them, for reading or for rerunning by hand; its
    /// `realistic/` and `applied/` folders are replaced (default: a temporary directory,
    /// removed at the end).
    #[arg(long, conflicts_with = "diesel_folder")]
    corpus_dir: Option<PathBuf>,

    /// Instead of the generated corpus, compare `svcdb migrate up` with `diesel migration run`
    /// on this diesel migrations folder (yours): `--rounds` rounds, each tool from empty in a
    /// fresh database, in turns first, process start included; needs diesel on PATH and the
    /// svcdb binary next to this one or on PATH. The folder is only read.
    #[arg(long, value_name = "DIR")]
    diesel_folder: Option<PathBuf>,
}

/// One pass of svcdb over a corpus, in a fresh database.
struct SvcdbRun {
    up: Duration,
    /// The part of `up` not spent in any migration's script (each migration's time, as the
    /// runner reports it, covers its script only): connecting, the lock, session settings, the
    /// lint, reading the history, and each transaction's `BEGIN`, history write and `COMMIT`.
    /// svcdb's own cost on top of the SQL.
    outside_migrations: Duration,
    /// With no-op calls asked for.
    noop: Option<NoopFigures>,
    /// Objects in the schema after `up` (tables, indexes, sequences, functions, triggers,
    /// constraints), the history table left out.
    objects: Fingerprint,
}

/// Repeated no-op `up` calls.
#[derive(Debug, Clone, Copy)]
struct NoopFigures {
    median: Duration,
    max: Duration,
}

/// A schema's objects, for comparing what two runs built.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    count: i64,
    /// Sorted `kind:name[:columns]` items, comma-separated.
    items: String,
}

/// The generated corpora on disk, and the realistic one as svcdb read it.
struct Corpus {
    realistic: Vec<corpus::MigrationFile>,
    migrations: Migrations,
    /// How long `Migrations::from_dir` took for the realistic corpus.
    load: Duration,
    up_files: Vec<PathBuf>,
    concatenated: PathBuf,
    applied: Migrations,
    /// The realistic corpus in diesel's layout, and as svcdb read it.
    diesel_dir: PathBuf,
    diesel: Migrations,
}

impl Corpus {
    /// Generates both corpora into `dir/realistic` and `dir/applied` (replacing what a previous
    /// run left there: a stale file would become a migration) plus `dir/all_up.sql`, and reads
    /// them back the way a service does.
    fn write(dir: &Path, args: &MigrateArgs) -> Result<Self> {
        let count = args.count as usize;
        let realistic_dir = dir.join("realistic");
        let applied_dir = dir.join("applied");
        let diesel_dir = dir.join("diesel");
        for stale in [&realistic_dir, &applied_dir, &diesel_dir] {
            if stale.exists() {
                std::fs::remove_dir_all(stale)
                    .with_context(|| format!("cannot clear {}", stale.display()))?;
            }
        }
        let realistic = corpus::realistic(count, args.backfill_rows);
        let up_files = corpus::write(&realistic_dir, &realistic)?;
        let concatenated = dir.join("all_up.sql");
        std::fs::write(&concatenated, corpus::concatenated_up(&realistic, SCHEMA))?;
        corpus::write(&applied_dir, &corpus::trivial(args.applied as usize))?;
        let diesel_count = corpus::write_diesel(&diesel_dir, &realistic)?;
        let diesel = Migrations::from_dir(&diesel_dir)?;
        ensure!(
            diesel.len() == diesel_count,
            "svcdb read {} of {diesel_count} migrations in the diesel layout",
            diesel.len()
        );
        let started = Instant::now();
        let migrations = Migrations::from_dir(&realistic_dir)?;
        let load = started.elapsed();
        ensure!(
            migrations.len() == count,
            "svcdb read {} of {count} migrations",
            migrations.len()
        );
        Ok(Self {
            realistic,
            migrations,
            load,
            up_files,
            concatenated,
            applied: Migrations::from_dir(&applied_dir)?,
            diesel_dir,
            diesel,
        })
    }

    fn non_transactional(&self) -> usize {
        self.realistic.iter().filter(|m| !m.transactional()).count()
    }
}

/// Everything measured, before it is turned into figures.
struct Results {
    /// svcdb `up` from empty, per round.
    ups: Vec<Duration>,
    /// The part of each `up` outside the scripts.
    outside: Vec<Duration>,
    /// svcdb `down` to zero, per round.
    downs: Vec<Duration>,
    /// One `psql -f` session, per round (empty without psql).
    floors: Vec<Duration>,
    /// No-op `up` with the realistic corpus applied.
    noop: NoopFigures,
    /// What the realistic corpus builds.
    objects: Fingerprint,
    /// `up` of the cheap corpus, from empty.
    applied_up: Duration,
    /// No-op `up` with the cheap corpus applied.
    applied_noop: NoopFigures,
    /// `psql -f` once per file (`None` without psql).
    per_file: Option<Duration>,
    /// `diesel migration run` from empty, per round (empty without diesel).
    diesel_ups: Vec<Duration>,
    /// No-op `diesel migration run` (`None` without diesel).
    diesel_noop: Option<NoopFigures>,
    /// svcdb `up` of the diesel layout from empty, per round.
    svcdb_diesel_ups: Vec<Duration>,
    /// No-op `svcdb migrate up`, process start included (`None` without the binary).
    noop_cli: Option<NoopFigures>,
}

impl Results {
    fn up(&self) -> Duration {
        report::median(&self.ups)
    }

    fn floor(&self) -> Option<Duration> {
        (!self.floors.is_empty()).then(|| report::median(&self.floors))
    }

    /// The median of the rounds' `up` / floor ratios.
    fn up_vs_floor(&self) -> Option<f64> {
        report::paired_median(&all_secs(&self.ups), &all_secs(&self.floors))
    }

    fn diesel_up(&self) -> Option<Duration> {
        (!self.diesel_ups.is_empty()).then(|| report::median(&self.diesel_ups))
    }

    fn svcdb_diesel_up(&self) -> Duration {
        report::median(&self.svcdb_diesel_ups)
    }

    /// The median of the rounds' svcdb / diesel ratios.
    fn vs_diesel(&self) -> Option<f64> {
        report::paired_median(
            &all_secs(&self.svcdb_diesel_ups),
            &all_secs(&self.diesel_ups),
        )
    }

    fn noop_cli_vs_diesel(&self) -> Option<f64> {
        report::ratio(
            self.noop_cli.map(|n| report::ms(n.median)),
            self.diesel_noop.map(|n| report::ms(n.median)),
        )
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn all_secs(ds: &[Duration]) -> Vec<f64> {
    ds.iter().copied().map(secs).collect()
}

/// Runs the whole benchmark and prints the report.
pub async fn run(server: &Server, args: &MigrateArgs) -> Result<()> {
    if let Some(folder) = &args.diesel_folder {
        return folder::run(server, args, folder).await;
    }
    let machine = report::Machine::now(server.version());
    let psql = pg::find_tool("psql");
    let temp;
    let dir = match &args.corpus_dir {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_owned()
        }
    };
    let corpus = Corpus::write(&dir, args)?;
    let results = server
        .measuring(measure(server, args, &corpus, psql.as_deref()))
        .await?;
    let (figures, targets) = figures(args, &machine, &corpus, &results);
    let text = human_report(args, &machine, &corpus, &results);
    report::print(&text, &figures, &targets, args.json);
    Ok(())
}

/// Every measurement, in the order that keeps them fair (see the module documentation).
async fn measure(
    server: &Server,
    args: &MigrateArgs,
    corpus: &Corpus,
    psql: Option<&Path>,
) -> Result<Results> {
    let count = corpus.migrations.len();
    // Each measurement in a database of its own, all kept until the end of the run (see
    // Server::scratch_database): `<prefix>_svcdb_1`, …
    let db_name = |what: &str, round: u32| format!("{}_{what}_{round}", args.database_prefix);
    let diesel = pg::find_tool("diesel");
    if diesel.is_none() {
        eprintln!("diesel not found on PATH: the diesel references are left out");
    }
    let (mut diesel_ups, mut svcdb_diesel_ups) = (vec![], vec![]);
    // svcdb and the floor run back to back, each round in the other order (as diesel and svcdb
    // below), so that a burst of load from elsewhere on the machine hits both sides alike and
    // neither always runs first; the medians shrug off one unlucky round.
    let (mut ups, mut outside, mut floors) = (vec![], vec![], vec![]);
    let mut noop = None;
    let mut objects: Option<Fingerprint> = None;
    for round in 1..=args.rounds {
        for floor_turn in [round % 2 == 0, round % 2 == 1] {
            if !floor_turn {
                eprintln!(
                    "round {round}/{}: svcdb up, {count} migrations…",
                    args.rounds
                );
                let calls = if round == 1 { args.noop_calls } else { 0 };
                let name = db_name("svcdb", round);
                let run = svcdb_run(server, &name, &corpus.migrations, calls).await?;
                ups.push(run.up);
                outside.push(run.outside_migrations);
                noop = noop.or(run.noop);
                same_or_first(&mut objects, run.objects, "an earlier svcdb round")?;
            } else if let Some(psql) = psql {
                eprintln!("round {round}/{}: psql -f, one session…", args.rounds);
                let single = std::slice::from_ref(&corpus.concatenated);
                let (floor, built) =
                    psql_timed(server, psql, &db_name("psql", round), single, false).await?;
                same_or_first(&mut objects, built, "one psql session")?;
                floors.push(floor);
            }
        }
        let objects = objects.as_ref().expect("svcdb ran this round");
        // diesel and svcdb on the same folder run back to back, each round in the other order,
        // so that each round's ratio compares the two under the same load and neither always
        // runs first.
        for diesel_turn in [round % 2 == 1, round % 2 == 0] {
            if !diesel_turn {
                eprintln!(
                    "round {round}/{}: svcdb up, the diesel layout…",
                    args.rounds
                );
                let name = db_name("svcdb_diesel", round);
                let run = svcdb_run(server, &name, &corpus.diesel, 0).await?;
                same_schema(objects, &run.objects, "svcdb on the diesel layout")?;
                svcdb_diesel_ups.push(run.up);
            } else if let Some(diesel) = &diesel {
                eprintln!("round {round}/{}: diesel migration run…", args.rounds);
                let run = diesel_run(server, diesel, &db_name("diesel", round), corpus).await?;
                same_schema(objects, &run.objects, "diesel")?;
                diesel_ups.push(run.up);
            }
        }
    }
    let objects = objects.expect("at least one round");

    eprintln!("svcdb no-op up with {} applied…", args.applied);
    let applied = svcdb_run(
        server,
        &db_name("applied", 1),
        &corpus.applied,
        args.noop_calls,
    )
    .await?;

    let svcdb = svcdb_cli();
    if svcdb.is_none() {
        eprintln!("the svcdb binary is neither next to svcdb-bench nor on PATH (build it with `cargo build --release -p svcdb-cli`): noop_cli_ms is left out");
    }
    eprintln!("no-op runs of the command-line tools, process start included…");
    let (noop_cli, diesel_noop) =
        cli_noops(server, svcdb.as_deref(), diesel.as_deref(), corpus, args).await?;

    let per_file = match psql {
        Some(psql) => {
            eprintln!("psql -f, one session per file ({count} sessions)…");
            let (elapsed, built) = psql_timed(
                server,
                psql,
                &db_name("psql_per_file", 1),
                &corpus.up_files,
                true,
            )
            .await?;
            same_schema(&objects, &built, "psql per file")?;
            Some(elapsed)
        }
        None => {
            eprintln!("psql not found: the psql references are left out");
            None
        }
    };

    // The downs last: each drops every table, thousands of files, which would slow the file
    // creation of every `up` after it (Server::scratch_database).
    let mut downs = Vec::with_capacity(args.rounds as usize);
    for round in 1..=args.rounds {
        eprintln!("svcdb down to zero, {count} migrations, round {round}'s database…");
        downs.push(svcdb_down(server, &db_name("svcdb", round), &corpus.migrations).await?);
    }
    Ok(Results {
        ups,
        outside,
        downs,
        floors,
        noop: noop.expect("no-op calls in round 1"),
        objects,
        applied_up: applied.up,
        applied_noop: applied.noop.expect("no-op calls asked for"),
        per_file,
        diesel_ups,
        diesel_noop,
        svcdb_diesel_ups,
        noop_cli,
    })
}

/// The JSON figures and the targets they are held to.
fn figures(
    args: &MigrateArgs,
    machine: &report::Machine,
    corpus: &Corpus,
    r: &Results,
) -> (Figures, Vec<Target>) {
    let applied = args.applied;
    let mut f = Figures::new();
    f.set("benchmark", "migrate");
    machine.add_to(&mut f);
    f.set("count", args.count);
    f.set("backfill_rows", args.backfill_rows);
    f.set("non_transactional", corpus.non_transactional());
    f.set("schema_objects", r.objects.count);
    f.set("rounds", args.rounds);
    f.set("load_ms", report::ms(corpus.load));
    f.set("up_s", secs(r.up()));
    f.set("up_s_rounds", all_secs(&r.ups));
    f.set(
        "up_outside_migrations_ms",
        report::ms(report::median(&r.outside)),
    );
    f.set("down_s", secs(report::median(&r.downs)));
    f.set("down_s_rounds", all_secs(&r.downs));
    f.set("noop_calls", args.noop_calls);
    f.set("noop_up_ms", report::ms(r.noop.median));
    f.set("noop_up_max_ms", report::ms(r.noop.max));
    f.set(format!("up_{applied}_s"), secs(r.applied_up));
    f.set(
        format!("noop_up_ms_{applied}"),
        report::ms(r.applied_noop.median),
    );
    f.set(
        format!("noop_up_max_ms_{applied}"),
        report::ms(r.applied_noop.max),
    );
    f.set("psql_single_session_s", r.floor().map(secs));
    f.set("psql_single_session_s_rounds", all_secs(&r.floors));
    f.set("psql_per_file_s", r.per_file.map(secs));
    f.set("up_vs_floor", r.up_vs_floor());
    f.set(
        "up_vs_floor_rounds",
        report::paired_ratios(&all_secs(&r.ups), &all_secs(&r.floors)),
    );
    f.set(
        "psql_per_file_vs_floor",
        report::ratio(r.per_file.map(secs), r.floor().map(secs)),
    );
    f.set("diesel_count", corpus.diesel.len());
    f.set("diesel_up_s", r.diesel_up().map(secs));
    f.set("diesel_up_s_rounds", all_secs(&r.diesel_ups));
    f.set(
        "diesel_noop_ms",
        r.diesel_noop.map(|n| report::ms(n.median)),
    );
    f.set("svcdb_diesel_layout_up_s", secs(r.svcdb_diesel_up()));
    f.set(
        "svcdb_diesel_layout_up_s_rounds",
        all_secs(&r.svcdb_diesel_ups),
    );
    f.set("noop_cli_ms", r.noop_cli.map(|n| report::ms(n.median)));
    f.set("svcdb_vs_diesel", r.vs_diesel());
    f.set(
        "svcdb_vs_diesel_rounds",
        report::paired_ratios(&all_secs(&r.svcdb_diesel_ups), &all_secs(&r.diesel_ups)),
    );
    f.set("noop_cli_vs_diesel", r.noop_cli_vs_diesel());
    let targets = vec![
        Target {
            key: "up_vs_floor".into(),
            what: "up / one psql session (the floor)".into(),
            value: r.up_vs_floor(),
            bound: Bound::AtMost(1.0),
            unit: "×",
        },
        Target {
            key: "svcdb_vs_diesel".into(),
            what: "svcdb up / diesel migration run, same diesel folder".into(),
            value: r.vs_diesel(),
            bound: Bound::AtMost(0.8),
            unit: "×",
        },
        Target {
            key: "noop_cli_vs_diesel".into(),
            what: "no-op `svcdb migrate up` / no-op `diesel migration run`, process start included"
                .into(),
            value: r.noop_cli_vs_diesel(),
            bound: Bound::AtMost(1.0),
            unit: "×",
        },
        Target {
            key: "noop_up_ms".into(),
            what: format!("no-op up, {} applied (median)", args.count),
            value: Some(report::ms(r.noop.median)),
            bound: Bound::AtMost(5.0),
            unit: " ms",
        },
        Target {
            key: format!("noop_up_ms_{applied}"),
            what: format!("no-op up, {applied} applied (median)"),
            value: Some(report::ms(r.applied_noop.median)),
            bound: Bound::AtMost(10.0),
            unit: " ms",
        },
    ];
    f.set_targets(&targets);
    (f, targets)
}

/// The table and the context a reader needs to judge it.
fn human_report(
    args: &MigrateArgs,
    machine: &report::Machine,
    corpus: &Corpus,
    r: &Results,
) -> String {
    let count = args.count;
    let floor = r.floor();
    let list = |values: Vec<f64>| {
        values
            .into_iter()
            .map(report::num)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let seconds = |what: String, d: Option<Duration>, rounds: &[Duration]| {
        let value = d.map(secs);
        vec![
            what,
            value.map_or_else(|| "—".to_owned(), |s| format!("{} s", report::num(s))),
            report::ratio(value, floor.map(secs))
                .map_or_else(|| "—".to_owned(), |x| format!("{}×", report::num(x))),
            list(all_secs(rounds)),
        ]
    };
    let noop = |what: String, n: NoopFigures| {
        vec![
            what,
            format!(
                "{} ms (max {} ms)",
                report::num(report::ms(n.median)),
                report::num(report::ms(n.max))
            ),
            "—".to_owned(),
            String::new(),
        ]
    };
    let mut table = report::table(&["measurement", "time", "vs floor", "rounds"]);
    table.add_row(seconds(
        format!("svcdb up, {count} migrations from empty"),
        Some(r.up()),
        &r.ups,
    ));
    table.add_row(vec![
        "… of which outside the scripts (connect, lock, lint, history, commits)".to_owned(),
        format!("{} ms", report::num(report::ms(report::median(&r.outside)))),
        "—".to_owned(),
        list(r.outside.iter().copied().map(report::ms).collect()),
    ]);
    table.add_row(seconds(
        format!("svcdb down to zero, {count} migrations"),
        Some(report::median(&r.downs)),
        &r.downs,
    ));
    table.add_row(seconds(
        "psql -f, one session (the floor)".into(),
        floor,
        &r.floors,
    ));
    table.add_row(seconds(
        format!("psql -f, one session per file ({count})"),
        r.per_file,
        &[],
    ));
    table.add_row(seconds(
        format!(
            "diesel migration run, the diesel folder ({} migrations)",
            corpus.diesel.len()
        ),
        r.diesel_up(),
        &r.diesel_ups,
    ));
    table.add_row(seconds(
        "svcdb up, the same diesel folder".into(),
        Some(r.svcdb_diesel_up()),
        &r.svcdb_diesel_ups,
    ));
    let calls = args.noop_calls;
    let optional_noop = |what: String, n: Option<NoopFigures>| match n {
        Some(n) => noop(what, n),
        None => vec![what, "—".to_owned(), "—".to_owned(), String::new()],
    };
    table.add_row(optional_noop(
        format!("diesel migration run, no-op, process included (median of {calls})"),
        r.diesel_noop,
    ));
    table.add_row(optional_noop(
        format!("svcdb migrate up, no-op, process included (median of {calls})"),
        r.noop_cli,
    ));
    table.add_row(noop(
        format!("svcdb no-op up, {count} applied (median of {calls})"),
        r.noop,
    ));
    table.add_row(noop(
        format!(
            "svcdb no-op up, {} applied (median of {calls})",
            args.applied
        ),
        r.applied_noop,
    ));
    format!(
        "Migrate benchmark: {count} generated migrations ({} outside a transaction, {} schema \
         objects, backfills of {} rows), median of {} rounds; {} applied for the second no-op \
         figure\n{}; corpus read in {} ms\n\n{table}",
        corpus.non_transactional(),
        r.objects.count,
        args.backfill_rows,
        args.rounds,
        args.applied,
        machine.line(),
        report::num(report::ms(corpus.load)),
    )
}

/// Keeps `built` as the reference when it is the first (svcdb's, round 1 running svcdb first),
/// or checks it against the reference.
fn same_or_first(
    reference: &mut Option<Fingerprint>,
    built: Fingerprint,
    what: &str,
) -> Result<()> {
    match reference {
        Some(first) => same_schema(first, &built, what),
        None => {
            *reference = Some(built);
            Ok(())
        }
    }
}

/// Refuses a comparison between runs that built different schemas.
fn same_schema(svcdb: &Fingerprint, other: &Fingerprint, what: &str) -> Result<()> {
    if svcdb != other {
        bail!(
            "svcdb and {what} built different schemas ({} vs {} objects); the comparison would be unfair",
            svcdb.count,
            other.count
        );
    }
    Ok(())
}

/// In a fresh database `name`, kept to the end of the run: `up` from empty (timed), then
/// `noop_calls` no-op `up`s.
async fn svcdb_run(
    server: &Server,
    name: &str,
    migrations: &Migrations,
    noop_calls: u32,
) -> Result<SvcdbRun> {
    let bench = bench_db(server, name, migrations.clone()).await?;
    let expected = migrations.len();
    server.checkpoint().await;
    let mut in_migrations = 0.0;
    let started = Instant::now();
    let report = bench
        .up_with(&UpOptions::default(), &mut |event| {
            if let MigrateEvent::Finished { duration_ms, .. } = event {
                in_migrations += duration_ms;
            }
        })
        .await?;
    let up = started.elapsed();
    ensure!(
        report.migrations.len() == expected,
        "up applied {} of {expected} migrations",
        report.migrations.len()
    );
    let objects = bench.objects().await?;

    let mut samples = Vec::with_capacity(noop_calls as usize);
    for _ in 0..noop_calls {
        let started = Instant::now();
        let report = bench.up().await?;
        samples.push(started.elapsed());
        ensure!(
            report.migrations.is_empty(),
            "a no-op up applied migrations"
        );
    }
    let noop = noop_figures(&samples);
    Ok(SvcdbRun {
        up,
        outside_migrations: up.saturating_sub(Duration::from_secs_f64(in_migrations / 1e3)),
        noop,
        objects,
    })
}

/// `down` to zero (timed) of the database `name`, which a [`svcdb_run`] of `migrations`
/// migrated, and a check that it left nothing behind.
async fn svcdb_down(server: &Server, name: &str, migrations: &Migrations) -> Result<Duration> {
    let bench = open_bench(server, name, migrations.clone()).await?;
    let expected = migrations.len();
    server.checkpoint().await;
    let started = Instant::now();
    let report = bench
        .down(&DownOptions {
            to: Some(0u32.into()),
            ..DownOptions::default()
        })
        .await?;
    let elapsed = started.elapsed();
    ensure!(
        report.migrations.len() == expected,
        "down reverted {} of {expected} migrations",
        report.migrations.len()
    );
    let left = bench.objects().await?;
    ensure!(
        left.count == 0,
        "down to zero left {} objects behind: {}",
        left.count,
        left.items
    );
    Ok(elapsed)
}

/// A fresh database `name`, kept to the end of the run, and a runner for `migrations` on its
/// schema `bench` (created by svcdb, as `SVCDB_CREATE_SCHEMA` would).
async fn bench_db(server: &Server, name: &str, migrations: Migrations) -> Result<Bench> {
    server.scratch_database(name).await?;
    open_bench(server, name, migrations).await
}

/// A runner for `migrations` on the schema `bench` of the existing database `name`.
async fn open_bench(server: &Server, name: &str, migrations: Migrations) -> Result<Bench> {
    let mut config =
        svcdb::Config::with_connection(server.database(name), Ident::new("schema", SCHEMA)?);
    config.create_schema = true;
    config.pool_min = 1;
    config.pool_max = 2;
    config.application_name = Some("svcdb-bench/migrate".into());
    let db = ServiceDb::connect(config).await?;
    Ok(Bench {
        migrator: Migrator::new(db.clone(), migrations),
        db,
    })
}

/// A runner with its pool (for looking at the schema it built).
struct Bench {
    migrator: Migrator,
    db: ServiceDb,
}

impl Bench {
    /// What the schema holds now.
    async fn objects(&self) -> Result<Fingerprint> {
        let conn = self.db.get().await?;
        fingerprint(&conn).await
    }
}

impl std::ops::Deref for Bench {
    type Target = Migrator;
    fn deref(&self) -> &Migrator {
        &self.migrator
    }
}

/// Runs `psql -X -q -v ON_ERROR_STOP=1 -f <file>` for each file into a fresh database whose
/// schema `bench` exists, kept to the end of the run; returns the total time and what it
/// built. With `pin_schema`, the
/// search path goes in `PGOPTIONS` (a startup option, exactly as svcdb pins it); otherwise
/// the file sets it itself.
async fn psql_timed(
    server: &Server,
    psql: &Path,
    name: &str,
    files: &[PathBuf],
    pin_schema: bool,
) -> Result<(Duration, Fingerprint)> {
    server.scratch_database(name).await?;
    let conn = DedicatedConn::connect(&server.database(name)).await?;
    conn.batch_execute(&format!("CREATE SCHEMA {SCHEMA}"))
        .await?;
    server.checkpoint().await;
    let started = Instant::now();
    for file in files {
        let mut cmd = server.tool(psql, name);
        cmd.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-f"])
            .arg(file);
        if pin_schema {
            cmd.env("PGOPTIONS", format!("-c search_path={SCHEMA}"));
        }
        pg::run_tool(cmd, &format!("psql -f {}", file.display())).await?;
    }
    let elapsed = started.elapsed();
    let objects = fingerprint(&conn).await?;
    Ok((elapsed, objects))
}

/// The objects of schema `bench`, without svcdb's and diesel's history tables: relations (with their column
/// count), functions, triggers and constraints.
async fn fingerprint(conn: &tokio_postgres::Client) -> Result<Fingerprint> {
    let row = conn
        .query_one(
            "WITH ns AS (SELECT oid FROM pg_namespace WHERE nspname = $1),
                  items AS (
                      SELECT c.relkind::text || ':' || c.relname || ':' || c.relnatts AS item
                        FROM pg_class c
                       WHERE c.relnamespace = (SELECT oid FROM ns)
                         AND c.relname NOT IN ('svcdb_migrations', 'svcdb_migrations_pkey',
                                               '__diesel_schema_migrations',
                                               '__diesel_schema_migrations_pkey')
                      UNION ALL
                      SELECT 'f:' || p.proname FROM pg_proc p WHERE p.pronamespace = (SELECT oid FROM ns)
                      UNION ALL
                      SELECT 't:' || t.tgname
                        FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
                       WHERE c.relnamespace = (SELECT oid FROM ns) AND NOT t.tgisinternal
                      UNION ALL
                      SELECT 'k:' || k.conname
                        FROM pg_constraint k
                       WHERE k.connamespace = (SELECT oid FROM ns)
                         AND k.conname NOT IN ('svcdb_migrations_pkey',
                                               '__diesel_schema_migrations_pkey'))
             SELECT count(*), coalesce(string_agg(item, ',' ORDER BY item), '') FROM items",
            &[&SCHEMA],
        )
        .await
        .context("cannot list the schema's objects")?;
    Ok(Fingerprint {
        count: row.get(0),
        items: row.get(1),
    })
}

/// One pass of diesel CLI over the diesel folder, in a fresh database.
struct DieselRun {
    up: Duration,
    objects: Fingerprint,
}

/// In a fresh database `name`, kept to the end of the run: `diesel migration run` from
/// empty, timed.
async fn diesel_run(
    server: &Server,
    diesel: &Path,
    name: &str,
    corpus: &Corpus,
) -> Result<DieselRun> {
    let conn = diesel_db(server, name).await?;
    let command = diesel_command(server, diesel, name, corpus)?;
    server.checkpoint().await;
    let up = timed_call(command(), "diesel migration run").await?;
    let objects = fingerprint(&conn).await?;
    Ok(DieselRun { up, objects })
}

/// A fresh database `name` whose schema `bench` exists, for diesel, and a connection to it;
/// kept to the end of the run.
async fn diesel_db(server: &Server, name: &str) -> Result<DedicatedConn> {
    server.scratch_database(name).await?;
    let conn = DedicatedConn::connect(&server.database(name)).await?;
    conn.batch_execute(&format!("CREATE SCHEMA {SCHEMA}"))
        .await?;
    Ok(conn)
}

/// `diesel migration run` of the diesel folder on database `name`. The schema is pinned
/// through `PGOPTIONS`, a startup option, as svcdb pins it; libpq reads the server and user
/// from the environment ([`Server::tool`]), so the URL names only the database.
fn diesel_command<'a>(
    server: &'a Server,
    diesel: &'a Path,
    name: &'a str,
    corpus: &'a Corpus,
) -> Result<impl Fn() -> tokio::process::Command + 'a> {
    // diesel looks for its configuration (diesel.toml) in the project around the working
    // directory; an empty one in the corpus folder keeps it from finding any other.
    let config = corpus.diesel_dir.join("diesel.toml");
    std::fs::write(&config, "")?;
    Ok(diesel_in(server, diesel, name, &corpus.diesel_dir, config))
}

/// `diesel migration run` of `folder` on database `name` with the configuration file
/// `config`, run from the folder containing `config`.
fn diesel_in<'a>(
    server: &'a Server,
    diesel: &'a Path,
    name: &'a str,
    folder: &'a Path,
    config: PathBuf,
) -> impl Fn() -> tokio::process::Command + 'a {
    move || {
        let mut cmd = server.tool(diesel, name);
        cmd.args(["migration", "run", "--migration-dir"])
            .arg(folder)
            .arg("--config-file")
            .arg(&config)
            .current_dir(config.parent().unwrap_or(folder))
            .env("DATABASE_URL", format!("postgres:///{name}"))
            .env("PGOPTIONS", format!("-c search_path={SCHEMA}"));
        cmd
    }
}

async fn cli_noops(
    server: &Server,
    svcdb: Option<&Path>,
    diesel: Option<&Path>,
    corpus: &Corpus,
    args: &MigrateArgs,
) -> Result<(Option<NoopFigures>, Option<NoopFigures>)> {
    let svcdb_name = format!("{}_cli", args.database_prefix);
    let ours = match svcdb {
        Some(svcdb) => {
            let bench = bench_db(server, &svcdb_name, corpus.diesel.clone()).await?;
            bench.up().await?;
            let name = svcdb_name.as_str();
            let command = move || svcdb_up(server, svcdb, name, &corpus.diesel_dir);
            Some((bench, command))
        }
        None => None,
    };
    let diesel_name = format!("{}_diesel_noop", args.database_prefix);
    let theirs = match diesel {
        Some(diesel) => {
            let conn = diesel_db(server, &diesel_name).await?;
            let command = diesel_command(server, diesel, &diesel_name, corpus)?;
            timed_call(command(), "diesel migration run").await?;
            Some((conn, command))
        }
        None => None,
    };
    let (mut svcdb_times, mut diesel_times) = (Vec::new(), Vec::new());
    for _ in 0..args.noop_calls {
        if let Some((_, command)) = &ours {
            svcdb_times.push(timed_call(command(), "svcdb migrate up (no-op)").await?);
        }
        if let Some((_, command)) = &theirs {
            diesel_times.push(timed_call(command(), "diesel migration run (no-op)").await?);
        }
    }
    Ok((noop_figures(&svcdb_times), noop_figures(&diesel_times)))
}

/// `svcdb migrate up` (the binary at `svcdb`) of `folder` on database `name`, schema
/// [`SCHEMA`].
fn svcdb_up(server: &Server, svcdb: &Path, name: &str, folder: &Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(svcdb);
    cmd.args(["migrate", "up"])
        // The URL may hold the administrator's password: the environment, not argv.
        .env("DATABASE_URL", server.url(name))
        .env("SVCDB_SCHEMA", SCHEMA)
        .env("SVCDB_MIGRATIONS_DIR", folder)
        .kill_on_drop(true);
    cmd
}

/// Runs `command` to success and returns how long it took.
async fn timed_call(command: tokio::process::Command, what: &str) -> Result<Duration> {
    let started = Instant::now();
    pg::run_tool(command, what).await?;
    Ok(started.elapsed())
}

/// The median and the slowest of `samples` (`None` for none).
fn noop_figures(samples: &[Duration]) -> Option<NoopFigures> {
    (!samples.is_empty()).then(|| NoopFigures {
        median: report::median(samples),
        max: samples.iter().copied().max().unwrap_or_default(),
    })
}

/// The `svcdb` binary: next to this one (the same `cargo build`), else on `PATH`.
fn svcdb_cli() -> Option<PathBuf> {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("svcdb")))
        .filter(|path| path.is_file())
        .or_else(|| {
            std::env::split_paths(&std::env::var_os("PATH")?)
                .map(|dir| dir.join("svcdb"))
                .find(|path| path.is_file())
        })
}
