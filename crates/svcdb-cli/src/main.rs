//! `svcdb`: provision service roles, run migrations, check schemas and health, purge event
//! tables.
//!
//! A thin binary over the `svcdb` library: each subcommand parses its options, calls one
//! library operation and prints its report (a table, or JSON with `--json`).

#![deny(clippy::print_stdout, clippy::print_stderr)] // output::outln! and errln! instead: see there

mod cmd;
mod failure;
mod global;
mod interrupt;
mod output;
mod usage;
mod wording;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Subcommand};

use crate::output::{errln, outln};
use failure::Failure;
use global::Global;

/// Exit codes, shown in `--help`.
const EXIT_CODES: &str = r#"Exit codes:
  0   success; for `migrate status` up to date; for `schema verify` ready
  1   error; for `migrate status` what `migrate up` would refuse (dirty schema, changed,
      missing or out-of-order migrations); for `schema verify` and `health` not ready
      (every problem is listed)
  2   `migrate status`: migrations are pending and nothing else is wrong
  64  invalid command line or configuration (a malformed DATABASE_URL, an invalid name), or
      no database or schema given
  130 interrupted (Ctrl-C; 143 for SIGTERM), as the shell reports a killed process: a
      migration command cancels its running statement on the server, so the transaction
      rolls back and a non-transactional migration stopped in its first statement stays
      pending (one stopped later is marked dirty: `migrate status` says what to do), and
      what it committed before stays (no down script runs), then reports it like any
      failure; a second signal exits at once

With --json, stdout holds one JSON object whatever the outcome: the report, or on error
{"error": what went wrong, "hint": what to do or null, "code": the SQLSTATE (e.g. "42501")
or the kind of error (e.g. "usage", "connect", "changed"), and with "unsafe" the lint's
"findings" that refused}; the text is on stderr too."#;

/// Give each microservice its own safe slice of one PostgreSQL database.
#[derive(clap::Parser)]
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
    /// Maintain the event tables: purge old claims and published outbox rows; replay
    /// dead-lettered events.
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
    let cli = match command()
        .try_get_matches()
        .and_then(|mut matches| Cli::from_arg_matches_mut(&mut matches))
    {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version: not errors. With --json, stdout holds one JSON object
            // whatever the command (a script reading the version found text there).
            if e.kind() == clap::error::ErrorKind::DisplayVersion && json_requested() {
                outln!(
                    "{}",
                    serde_json::json!({ "name": "svcdb", "version": env!("CARGO_PKG_VERSION") })
                );
            } else {
                let _ = e.print();
            }
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // Parsing failed, so whether --json was given is read from the raw arguments.
            if json_requested() {
                outln!("{}", Failure::from_clap(&e).json());
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
    let (result, signals) = runtime.block_on(async {
        // A migration stops on its own at the signal, through its failure path (the runner
        // watches `global.interrupt`); the other commands stop where they are.
        let stops_itself = matches!(&cli.command, Command::Migrate(c) if c.stops_itself());
        let signals = interrupt::Signals::watch(cli.global.json, stops_itself);
        let mut global = cli.global;
        global.interrupt = signals.token.clone();
        let command = async {
            match cli.command {
                Command::Provision(args) => cmd::provision::run(&global, args).await,
                Command::Migrate(command) => cmd::migrate::run(&global, command).await,
                Command::Schema(command) => cmd::schema::run(&global, command).await,
                Command::Health(args) => cmd::health::run(&global, args).await,
                Command::Events(command) => cmd::events::run(&global, command).await,
            }
        };
        let result = if stops_itself {
            command.await
        } else {
            tokio::select! {
                result = command => result,
                () = signals.token.cancelled() => Err(interrupt::Interrupted::default().into()),
            }
        };
        let result = match result {
            Ok(outcome) => Ok(outcome),
            Err(e) => Err(Failure::explain(&e, &global).await),
        };
        (result.map_err(|f| (f, global.json)), signals)
    });
    let code = match result {
        Ok(Outcome::Success) => 0,
        Ok(Outcome::NotReady) => 1,
        Ok(Outcome::Pending) => 2,
        Err((failure, json)) => {
            let code = failure.print(json);
            signals.code().unwrap_or(code)
        }
    };
    // A report that could not be written (a full disk) is no success; but what the command
    // did stays done, and the message says so (found by a user trial: `migrate up >
    // /dev/full` applied the migrations and said only that the report failed).
    match output::write_failure() {
        Some(e) if code == 0 => {
            errln!("error: could not write the report: {e}\n  hint: the command itself finished: what it changed stays changed (`svcdb migrate status` shows where the schema stands); write the report somewhere with room");
            ExitCode::from(1)
        }
        _ => ExitCode::from(code),
    }
}

/// The command line, with each subcommand's help leaving out the shared options it does not
/// use (found by a user trial: `events replay --help` offered --dir and --schema, which a
/// replay, all AMQP, ignores). Still accepted there, as they come from the environment too.
fn command() -> clap::Command {
    /// Per subcommand path, the shared options it ignores.
    const UNUSED: &[(&[&str], &[&str])] = &[
        (&["provision"], &["dir"]),
        (&["schema", "tables"], &["dir"]),
        (&["events", "purge"], &["dir"]),
        (
            &["events", "replay"],
            &["dir", "database_url", "schema", "extra_schemas"],
        ),
    ];
    let mut command = Cli::command();
    // Shared options reach the subcommands when the command is built.
    command.build();
    for (path, unused) in UNUSED {
        command = hide_in(command, path, unused);
    }
    command
}

/// `command` with the options `unused` hidden in the help of its subcommand at `path`. Built
/// commands keep their arguments and subcommands by position, so both are changed in place
/// (`mut_arg` and `mut_subcommand` move what they change to the end).
fn hide_in(command: clap::Command, path: &[&str], unused: &[&str]) -> clap::Command {
    match path {
        [] => command.mut_args(|arg| {
            let hide = arg.is_hide_set() || unused.contains(&arg.get_id().as_str());
            arg.hide(hide)
        }),
        [first, rest @ ..] => command.mut_subcommands(|sub| {
            if sub.get_name() == *first {
                hide_in(sub, rest, unused)
            } else {
                sub
            }
        }),
    }
}

/// True when the raw arguments hold `--json` before any `--`.
fn json_requested() -> bool {
    std::env::args_os()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--json")
}

/// Logs go to stderr, errors only unless `RUST_LOG` asks (stdout is for reports), and the
/// server's warnings (a migration's `RAISE WARNING`), and without colour codes when stderr is
/// not a terminal. lapin's own error lines (its connection's
/// recovery giving up) are left out: the command reports the same failure itself (found by a
/// user trial: two or three such lines before each `events replay` error).
///
/// tokio-postgres logs each statement's text and parameters at debug, and `provision`'s
/// `ALTER ROLE … PASSWORD` carries the role's SCRAM verifier, which an attacker can test
/// passwords against offline (found by a user trial, at RUST_LOG=debug): a RUST_LOG filter
/// keeps it and lapin's returned messages quiet unless it names them, as services' logs do
/// (`svcdb_amqp::telemetry::quiet_leaky_targets`).
fn init_tracing() {
    use std::io::IsTerminal;
    let filter = match tracing_subscriber::EnvFilter::try_from_default_env() {
        Ok(filter) => svcdb_amqp::telemetry::quiet_leaky_targets(
            filter,
            &std::env::var("RUST_LOG").unwrap_or_default(),
        ),
        Err(_) => tracing_subscriber::EnvFilter::new("error,lapin=off,svcdb::server=warn"),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
