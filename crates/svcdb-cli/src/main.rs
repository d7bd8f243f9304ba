//! `svcdb`: provision service roles, run migrations, check schemas and health, purge event
//! tables.
//!
//! A thin binary over the `svcdb` library: each subcommand parses its options, calls one
//! library operation and prints its report (a table, or JSON with `--json`).

mod cmd;
mod global;
mod output;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use global::Global;

/// Exit codes, shown in `--help`.
const EXIT_CODES: &str = "\
Exit codes:
  0   success; for `migrate status` up to date; for `schema verify` ready
  1   error; for `migrate status` what `migrate up` would refuse (dirty schema, changed,
      missing or out-of-order migrations); for `schema verify` and `health` not ready
      (every problem is listed)
  2   `migrate status`: migrations are pending and nothing else is wrong
  64  invalid command line";

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
    /// Create (or complete) a service's login role and schema; running it twice changes nothing.
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
        Err(e) => {
            let code = if e.use_stderr() { 64 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Provision(args) => cmd::provision::run(&cli.global, args).await,
            Command::Migrate(command) => cmd::migrate::run(&cli.global, command).await,
            Command::Schema(command) => cmd::schema::run(&cli.global, command).await,
            Command::Health(args) => cmd::health::run(&cli.global, args).await,
            Command::Events(command) => cmd::events::run(&cli.global, command).await,
        }
    });
    match result {
        Ok(Outcome::Success) => ExitCode::SUCCESS,
        Ok(Outcome::NotReady) => ExitCode::from(1),
        Ok(Outcome::Pending) => ExitCode::from(2),
        Err(e) => {
            eprintln!("error: {}", render_error(&e));
            ExitCode::from(1)
        }
    }
}

/// The error and its causes on one line, each message once. svcdb's errors already hold their
/// causes' text (better worded than the driver's `db error: …`), so the chain stops at them.
fn render_error(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let message = cause.to_string();
        if !text.contains(&message) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&message);
        }
        if cause.is::<svcdb::Error>() || cause.is::<svcdb::migrate::MigrateError>() {
            break;
        }
    }
    text
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
