//! `svcdb-bench`: the figures behind svcdb's performance claims, measured against references
//! anyone can rerun.
//!
//! * `svcdb-bench pool`: the pool against a new connection per request and against
//!   `pgbench -S` (see [`pool`]).
//! * `svcdb-bench migrate`: the migration runner against `psql -f` (see [`migrate`]).
//! * `svcdb-bench events`: outbox, relay and exactly-once consumer end to end against raw
//!   lapin publishing and consuming (see [`events`]).
//!
//! All work in databases of their own (`svcdb_bench`, `svcdb_bench_migrate_*`,
//! `svcdb_bench_events`), never in the one `--database-url` names, so pointing them at a real
//! server touches no user data. Results and the machine they were measured on are in
//! `docs/benchmarks.md`.

mod events;
mod migrate;
mod pg;
mod pool;
mod report;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The server the benchmarks use when neither `--database-url` nor `DATABASE_URL` says
/// otherwise: the local PostgreSQL of `scripts/services`.
const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Benchmarks for svcdb: pool vs connection-per-request vs pgbench, migration runner vs psql.
#[derive(Debug, Parser)]
#[command(name = "svcdb-bench", version, about)]
struct Cli {
    /// An administrator's connection (it creates and drops the benchmark databases); its
    /// database is only used to reach the server.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = DEFAULT_DATABASE_URL,
        global = true,
        hide_env_values = true
    )]
    database_url: String,

    /// Tokio worker threads. Default: one per CPU, which is how a service runs; `pgbench -j N`
    /// has N threads, but on the same CPUs (2, 4 and 8 workers measured the same within noise
    /// on the 2-CPU benchmark machine; see docs/benchmarks.md).
    #[arg(long, global = true)]
    worker_threads: Option<usize>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Pooled queries vs a new connection per request vs `pgbench -S`.
    Pool(pool::PoolArgs),
    /// The migration runner (up, down, no-op up) vs `psql -f`.
    Migrate(migrate::MigrateArgs),
    /// Outbox + relay + exactly-once consumer vs raw lapin publish/consume, end to end.
    Events(events::EventsArgs),
}

fn main() -> ExitCode {
    // Printing to a closed pipe (`svcdb-bench events | head`) ends the process quietly, as it
    // ends `cat`, where Rust's default (SIGPIPE ignored) makes `println!` panic.
    // SAFETY: restores the default disposition before any other thread runs.
    #[allow(unsafe_code)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", svcdb::error::Report::new(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    // A multi-thread runtime, as a service would run: the pool benchmark compares against
    // pgbench's threads, and a single-thread runtime would cap the client side at one CPU.
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(threads) = cli.worker_threads {
        runtime.worker_threads(threads);
    }
    let worker_threads = cli.worker_threads.unwrap_or_else(report::cpus);
    runtime.build()?.block_on(async {
        let server = pg::Server::connect(&cli.database_url).await?;
        match cli.command {
            Command::Pool(args) => pool::run(&server, &args, worker_threads).await,
            Command::Migrate(args) => migrate::run(&server, &args).await,
            Command::Events(args) => events::run(&server, &args).await,
        }
    })
}
