//! `svcdb`: provision service roles, run migrations, check schemas and health, purge event
//! tables.
//!
//! A thin binary over the `svcdb` library: each subcommand parses its options, calls one
//! library operation and prints its report (a table, or JSON with `--json`).

mod cmd;
mod failure;
mod global;
mod output;
mod usage;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use failure::Failure;
use global::Global;

/// Exit codes, shown in `--help`.
const EXIT_CODES: &str = r#"Exit codes:
  0   success; for `migrate status` up to date; for `schema verify` ready
  1   error; for `migrate status` what `migrate up` would refuse (dirty schema, changed,
      missing or out-of-order migrations); for `schema verify` and `health` not ready
      (every problem is listed)
  2   `migrate status`: migrations are pending and nothing else is wrong
  64  invalid command line, or no database or schema given
  130 interrupted (Ctrl-C; 143 for SIGTERM), as the shell reports a killed process: the
      running transaction is rolled back; a non-transactional migration cut short stays
      marked dirty, and `migrate status` says what to do

With --json, stdout holds one JSON object whatever the outcome: the report, or on error
{"error": what went wrong, "hint": what to do or null, "code": the SQLSTATE (e.g. "42501")
or the kind of error (e.g. "usage", "connect", "changed")}; the text is on stderr too."#;

/// Give each microservice its own safe slice of one PostgreSQL database.
#[derive(Parser)]
#[command(name = "svcdb", version, after_help = EXIT_CODES, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create (or complete) a service's login role and schema; running it twice changes nothing
    /// but the password, which --password-env sets again.
    Provision(cmd::provision::Args),
    /// Run, revert and inspect migrations.
    #[command(subcommand)]
    Migrate(cmd::migrate::Command),
    /// Inspect the service schema and run the start-up gate.
    #[command(subcommand)]
    Schema(cmd::schema::Command),
    /// Report database reachability, latency, pool, migration version and gate problems.
    Health(cmd::health::Args),
    /// Maintain the event tables: purge old claims and published outbox rows.
    #[command(subcommand)]
    Events(cmd::events::Command),
}

/// What a subcommand asks `main` to exit with, besides errors.
pub enum Outcome {
    /// Exit 0.
    Success,
    /// Exit 1 without an error message of its own (the report said why).
    NotReady,
    /// Exit 2: `migrate status` found pending migrations.
    Pending,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version: not errors.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // Parsing failed, so whether --json was given is read from the raw arguments.
            if json_requested() {
                println!("{}", Failure::from_clap(&e).json());
            }
            let _ = e.print();
            return ExitCode::from(64);
        }
    };
    init_tracing();
    // A command exports no metrics: without this the first pool would build the Prometheus
    // recorder, whose clock calibration busy-loops (1.4 ms of CPU of a 14 ms no-op `migrate
    // up` here, and up to 200 ms on a loaded machine).
    svcdb::metrics::disable();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let e = anyhow::Error::new(e).context("cannot start the async runtime");
            return ExitCode::from(Failure::new(&e).print(cli.global.json));
        }
    };
    let result = runtime.block_on(async {
        let result = match cli.command {
            Command::Provision(args) => cmd::provision::run(&cli.global, args).await,
            Command::Migrate(command) => cmd::migrate::run(&cli.global, command).await,
            Command::Schema(command) => cmd::schema::run(&cli.global, command).await,
            Command::Health(args) => cmd::health::run(&cli.global, args).await,
            Command::Events(command) => cmd::events::run(&cli.global, command).await,
        };
        match result {
            Ok(outcome) => Ok(outcome),
            Err(e) => Err(Failure::explain(&e, &cli.global).await),
        }
    });
    match result {
        Ok(Outcome::Success) => ExitCode::SUCCESS,
        Ok(Outcome::NotReady) => ExitCode::from(1),
        Ok(Outcome::Pending) => ExitCode::from(2),
        Err(failure) => ExitCode::from(failure.print(cli.global.json)),
    }
}

/// True when the raw arguments hold `--json` before any `--`.
fn json_requested() -> bool {
    std::env::args_os()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--json")
}

/// Logs go to stderr, off unless `RUST_LOG` asks (stdout is for reports).
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
