//! `svcdb-bench pool`: what the pool buys over a new connection per request, and what it costs
//! against the best a client can do (`pgbench -S`, C and libpq).
//!
//! The query is pgbench's own select-only transaction, `SELECT abalance FROM pgbench_accounts
//! WHERE aid = $1` with a random `aid`, on pgbench's table at scale 10 (1 000 000 rows, fully
//! cached after the first run), so every client does exactly the same work and the figures
//! differ only by client overhead:
//!
//! * **pooled**: `ServiceDb::get`, `prepare_cached` (one parse per connection, then only
//!   bind/execute), the query, the connection back to the pool;
//! * **pgbench -S**: `pgbench -S -c N -j N`, its tps without initial connection time, in its
//!   default query mode (`simple`: the SQL text is sent, parsed and planned for every
//!   transaction), which is the reference the target names;
//! * **pgbench -S -M prepared**: the same with the statement parsed once per connection, as
//!   the pool's `prepare_cached` does: the stricter reference, reported beside it;
//! * **tokio-postgres, no pool**: one connection per task held for the whole run, the
//!   statement prepared once: the same driver and runtime without the pool, which splits the
//!   distance to pgbench into the pool's share and the driver's;
//! * **connect-per-request**: connect (TCP, startup, a new backend process), the query
//!   (parse + bind/execute, nothing to reuse), close.
//!
//! The pooled run and the two pgbench runs are repeated `--rounds` times back to back, so each
//! round's ratios compare runs seconds apart; the reported ratio is the median of the rounds'
//! ratios, which a burst of load from elsewhere during one round does not move.
//!
//! Each in-process measurement runs N tasks in a loop for `--duration` seconds after an
//! unrecorded warm-up; throughput is the requests completed in the measured window, latency
//! is per request (checkout included) in an hdrhistogram. Client and server share the CPUs,
//! so each method's client CPU time per request is recorded too (this process's, or the
//! pgbench child's): whatever a client burns, the server cannot use. A last, short run
//! measures the pool alone: checkouts with the statement lookup and no query.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use svcdb::{DedicatedConn, Ident, ServiceDb};
use tokio::task::JoinSet;
use tokio_postgres::NoTls;

use crate::pg::{self, Server};
use crate::report::{self, Bound, Figures, Latencies, LatencySummary, Target};

/// pgbench's select-only transaction (`pgbench -S`), the same text for every client.
const QUERY: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";

/// The checkout-only measurement is short: it makes millions of calls a second, and its
/// figure is a per-call cost, not a throughput to compare.
const CHECKOUT_WARMUP: Duration = Duration::from_millis(100);
const CHECKOUT_RUN: Duration = Duration::from_secs(1);

/// Rows of `pgbench_accounts` per unit of scale, as pgbench defines it.
const ACCOUNTS_PER_SCALE: i64 = 100_000;

/// Options of `svcdb-bench pool`.
#[derive(Debug, clap::Args)]
pub struct PoolArgs {
    /// Print every figure as one JSON object on the last line.
    #[arg(long)]
    json: bool,

    /// Seconds each measurement runs (pgbench rounds up to whole seconds).
    #[arg(long, default_value_t = 3.0, value_parser = positive_seconds)]
    duration: f64,

    /// Rounds of the pooled run and the two pgbench runs, back to back; the ratios reported are
    /// the medians of the rounds' ratios.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    rounds: u32,

    /// Unrecorded seconds before each in-process measurement: connections opened, statements
    /// prepared, caches warm, as in a service that has been up for a while.
    #[arg(long, default_value_t = 0.5, value_parser = non_negative_seconds)]
    warmup: f64,

    /// Concurrent clients, comma-separated; the ratios and targets use the largest. At most 32:
    /// the pool's and the pool-less run's connections are open together, and the server's
    /// default `max_connections` is 100.
    #[arg(long, value_delimiter = ',', default_value = "1,8", value_parser = clap::value_parser!(u16).range(1..=32))]
    clients: Vec<u16>,

    /// pgbench scale factor: 100 000 accounts per unit.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    scale: u32,

    /// The benchmark's own database, created if missing (nothing else is touched).
    #[arg(long, default_value = "svcdb_bench")]
    database: String,

    /// Leave pgbench out, as on a machine without it: the table is created with SQL and the
    /// pgbench figures are null.
    #[arg(long)]
    no_pgbench: bool,
}

fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 3600.0 => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds in (0, 3600]")),
    }
}

fn non_negative_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=600.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds in [0, 600]")),
    }
}

/// One client's way of running the query once; each task owns one.
trait Workload: Send + 'static {
    fn request(&mut self, aid: i32) -> impl std::future::Future<Output = Result<()>> + Send;
}

/// Through svcdb's pool, with the statement prepared once per connection.
struct Pooled(ServiceDb);

impl Workload for Pooled {
    async fn request(&mut self, aid: i32) -> Result<()> {
        let conn = self.0.get().await?;
        // deadpool-postgres keeps a statement cache per connection: the first call on a
        // connection prepares, every later one is a hash lookup, so the query is one
        // bind/execute round trip, like pgbench -M prepared.
        let statement = conn.prepare_cached(QUERY).await?;
        let row = conn.query_one(&statement, &[&aid]).await?;
        let _balance: i32 = row.try_get(0)?;
        Ok(())
    }
}

/// A checkout and return with the statement lookup, and no query: what the pool itself costs
/// per request, without the network.
struct Checkout(ServiceDb);

impl Workload for Checkout {
    async fn request(&mut self, _aid: i32) -> Result<()> {
        let conn = self.0.get().await?;
        conn.prepare_cached(QUERY).await?;
        // With a free connection and a cached statement nothing here waits, so the loop would
        // never yield and would starve the task that reads the CPU clock at the window's edges.
        // A service always does I/O next; here the runtime's budget stands in for it.
        tokio::task::consume_budget().await;
        Ok(())
    }
}

/// The driver alone: one connection per client, held for the whole run, the statement
/// prepared once. The pool's overhead is what separates it from [`Pooled`]; the driver's and
/// the runtime's is what separates it from pgbench.
struct Direct {
    conn: DedicatedConn,
    statement: tokio_postgres::Statement,
}

impl Direct {
    async fn open(config: &tokio_postgres::Config) -> Result<Self> {
        let conn = DedicatedConn::connect(config).await?;
        let statement = conn.prepare(QUERY).await?;
        Ok(Self { conn, statement })
    }
}

impl Workload for Direct {
    async fn request(&mut self, aid: i32) -> Result<()> {
        let row = self.conn.query_one(&self.statement, &[&aid]).await?;
        let _balance: i32 = row.try_get(0)?;
        Ok(())
    }
}

/// A new connection for every request, as code without a pool does.
struct ConnectPerRequest(tokio_postgres::Config);

impl Workload for ConnectPerRequest {
    async fn request(&mut self, aid: i32) -> Result<()> {
        let (client, connection) = self.0.connect(NoTls).await?;
        let driver = tokio::spawn(connection);
        let row = client.query_one(QUERY, &[&aid]).await?;
        let _balance: i32 = row.try_get(0)?;
        drop(client);
        // Wait for the socket to close: the request is not over until the server can reuse
        // the slot, and it keeps the number of open connections at the number of clients.
        driver.await??;
        Ok(())
    }
}

/// Throughput and latency of one measurement.
#[derive(Debug, Clone, Copy)]
struct Measured {
    tps: f64,
    latency: LatencySummary,
    /// CPU time this process spent per request during the window (all threads: tasks, pool,
    /// driver, runtime). On a machine where client and server share the CPUs, every
    /// microsecond here is one the server does not get.
    client_cpu_us: Option<f64>,
    /// The machine's CPU left idle during the window, in percent: time neither this client
    /// nor the server used (waiting on wake-ups rather than working).
    idle_pct: Option<f64>,
}

/// What pgbench reports, and what it cost.
#[derive(Debug, Clone, Copy, PartialEq)]
struct PgbenchFigures {
    /// Transactions per second without the initial connection time.
    tps: f64,
    latency_avg_ms: f64,
    /// Transactions processed.
    transactions: u64,
    /// pgbench's CPU time per transaction (from the finished child's accounting).
    client_cpu_us: Option<f64>,
    /// The machine's CPU left idle while pgbench ran, in percent (see [`Measured`]).
    idle_pct: Option<f64>,
}

/// pgbench's query modes (`-M`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QueryMode {
    /// pgbench's default, what `pgbench -S` runs: the SQL text with the value inlined, parsed
    /// and planned by the server for every transaction.
    Simple,
    /// Parsed once per connection, then bind/execute only: what the pool's `prepare_cached`
    /// does, so the comparison with the least server work on pgbench's side.
    Prepared,
}

impl QueryMode {
    fn flag(self) -> &'static str {
        match self {
            Self::Simple => "simple",
            Self::Prepared => "prepared",
        }
    }

    /// The method's name in the report.
    fn label(self) -> &'static str {
        match self {
            Self::Simple => "pgbench -S",
            Self::Prepared => "pgbench -S -M prepared",
        }
    }
}

/// One round at one client count: the pooled run and the two pgbench runs, back to back.
struct Round {
    pooled: Measured,
    pgbench: Option<PgbenchFigures>,
    pgbench_prepared: Option<PgbenchFigures>,
}

impl Round {
    fn pgbench(&self, mode: QueryMode) -> Option<PgbenchFigures> {
        match mode {
            QueryMode::Simple => self.pgbench,
            QueryMode::Prepared => self.pgbench_prepared,
        }
    }

    /// Pooled throughput over pgbench's in this round.
    fn pooled_vs(&self, mode: QueryMode) -> Option<f64> {
        report::ratio(Some(self.pooled.tps), self.pgbench(mode).map(|p| p.tps))
    }
}

/// The figures at one client count.
struct Row {
    clients: u16,
    /// Checkouts without queries (see [`Checkout`]).
    checkout: Measured,
    /// At least one.
    rounds: Vec<Round>,
    direct: Measured,
    connect_per_request: Measured,
}

impl Row {
    /// The pooled run of median throughput, with its own latencies.
    fn pooled(&self) -> &Measured {
        &report::median_by(&self.rounds, |r| r.pooled.tps).pooled
    }

    /// The pgbench run of median throughput in `mode`.
    fn pgbench(&self, mode: QueryMode) -> Option<PgbenchFigures> {
        let runs: Vec<PgbenchFigures> =
            self.rounds.iter().filter_map(|r| r.pgbench(mode)).collect();
        (!runs.is_empty()).then(|| *report::median_by(&runs, |p| p.tps))
    }

    /// Each round's pooled / pgbench ratio in `mode`.
    fn pooled_vs_rounds(&self, mode: QueryMode) -> Vec<f64> {
        self.rounds
            .iter()
            .filter_map(|r| r.pooled_vs(mode))
            .collect()
    }

    /// The median of the rounds' pooled / pgbench ratios in `mode`.
    fn pooled_vs(&self, mode: QueryMode) -> Option<f64> {
        let ratios = self.pooled_vs_rounds(mode);
        (!ratios.is_empty()).then(|| report::median_f64(&ratios))
    }
}

/// Everything one run measured, and what it ran on.
struct Results {
    machine: report::Machine,
    worker_threads: usize,
    pgbench_version: Option<String>,
    accounts: i32,
    /// By client count, ascending.
    rows: Vec<Row>,
    /// The pool's own acquire-wait p99 over the pooled runs (its `status()`).
    acquire_wait_p99_ms: f64,
}

impl Results {
    /// The row with the most clients, which the targets are about.
    fn top(&self) -> &Row {
        self.rows.last().expect("at least one client count")
    }
}

/// Runs the whole benchmark and prints the report.
pub async fn run(server: &Server, args: &PoolArgs, worker_threads: usize) -> Result<()> {
    let results = measure_all(server, args, worker_threads).await?;
    let (figures, targets) = figures(args, &results);
    report::print(&human_report(args, &results), &figures, &targets, args.json);
    Ok(())
}

/// Prepares the table and the pool, then measures each client count: rounds of pooled and
/// pgbench (both modes), the driver without the pool, connect-per-request, and the pool's
/// checkout alone.
async fn measure_all(server: &Server, args: &PoolArgs, worker_threads: usize) -> Result<Results> {
    let machine = report::Machine::now(server.version());
    let mut clients = args.clients.clone();
    clients.sort_unstable();
    clients.dedup();
    let top = *clients.last().context("--clients names no client count")?;
    let pgbench = if args.no_pgbench {
        None
    } else {
        pg::find_tool("pgbench")
    };
    let pgbench_version = match &pgbench {
        Some(path) => pg::tool_version(path).await,
        None => None,
    };

    if server.ensure_database(&args.database).await? {
        eprintln!("created database {}", args.database);
    }
    let connection = server.database(&args.database);
    let accounts = ensure_accounts(server, &args.database, args.scale, pgbench.as_deref()).await?;

    let mut config = svcdb::Config::with_connection(connection, Ident::new("schema", "public")?);
    // Every client gets a connection of its own, opened before the clock starts.
    config.pool_min = usize::from(top);
    config.pool_max = usize::from(top);
    config.application_name = Some("svcdb-bench/pooled".into());
    let db = ServiceDb::connect(config.clone()).await?;
    // The same session settings (pinned search path included) without the pool.
    let mut per_request = config.session_config();
    per_request.application_name("svcdb-bench/unpooled");

    let warmup = Duration::from_secs_f64(args.warmup);
    let duration = Duration::from_secs_f64(args.duration);
    let mut rows = Vec::new();
    for &n in &clients {
        let mut rounds = Vec::new();
        for round in 1..=args.rounds {
            let of = args.rounds;
            eprintln!(
                "round {round}/{of}: pooled, {n} clients, {:.1} s…",
                args.duration
            );
            let tasks = (0..n).map(|_| Pooled(db.clone())).collect();
            let pooled = measure(tasks, accounts, warmup, duration).await?;
            // pgbench right after the pooled run, so the runs compared run under the same
            // conditions (the connect-per-request run leaves the server reaping backends).
            let pgbench_run = async |mode: QueryMode| -> Result<Option<PgbenchFigures>> {
                let Some(path) = &pgbench else {
                    return Ok(None);
                };
                let secs = whole_seconds(args.duration);
                eprintln!(
                    "round {round}/{of}: {}, {n} clients, {secs} s…",
                    mode.label()
                );
                Ok(Some(
                    run_pgbench(server, path, &args.database, mode, n, secs).await?,
                ))
            };
            let simple = pgbench_run(QueryMode::Simple).await?;
            let prepared = pgbench_run(QueryMode::Prepared).await?;
            rounds.push(Round {
                pooled,
                pgbench: simple,
                pgbench_prepared: prepared,
            });
        }
        eprintln!(
            "tokio-postgres without pool, {n} clients, {:.1} s…",
            args.duration
        );
        let mut tasks = Vec::new();
        for _ in 0..n {
            tasks.push(Direct::open(&per_request).await?);
        }
        let direct = measure(tasks, accounts, warmup, duration).await?;
        eprintln!("connect-per-request, {n} clients, {:.1} s…", args.duration);
        let tasks = (0..n)
            .map(|_| ConnectPerRequest(per_request.clone()))
            .collect();
        let connect_per_request = measure(tasks, accounts, warmup, duration).await?;
        eprintln!("pool checkout alone, {n} clients, 1 s…");
        let tasks = (0..n).map(|_| Checkout(db.clone())).collect();
        let checkout = measure(tasks, accounts, CHECKOUT_WARMUP, CHECKOUT_RUN).await?;
        rows.push(Row {
            clients: n,
            checkout,
            rounds,
            direct,
            connect_per_request,
        });
    }
    let acquire_wait_p99_ms = db.status().acquire_wait.p99_ms;
    db.close();
    Ok(Results {
        machine,
        worker_threads,
        pgbench_version,
        accounts,
        rows,
        acquire_wait_p99_ms,
    })
}

/// The JSON figures and the targets they are held to.
fn figures(args: &PoolArgs, r: &Results) -> (Figures, Vec<Target>) {
    let mut f = Figures::new();
    f.set("benchmark", "pool");
    f.set("query", QUERY);
    f.set("scale", args.scale);
    f.set("accounts", r.accounts);
    f.set("duration_s", args.duration);
    f.set("warmup_s", args.warmup);
    f.set("rounds", args.rounds);
    f.set(
        "clients",
        r.rows.iter().map(|row| row.clients).collect::<Vec<_>>(),
    );
    r.machine.add_to(&mut f);
    f.set("worker_threads", r.worker_threads);
    f.set("pgbench_version", r.pgbench_version.clone());
    for row in &r.rows {
        let n = row.clients;
        for (method, m) in [
            ("pooled", row.pooled()),
            ("direct", &row.direct),
            ("connect_per_request", &row.connect_per_request),
        ] {
            f.set(format!("{method}_tps_{n}"), m.tps);
            f.set(format!("{method}_p50_ms_{n}"), m.latency.p50_ms);
            f.set(format!("{method}_p99_ms_{n}"), m.latency.p99_ms);
            f.set(format!("{method}_mean_ms_{n}"), m.latency.mean_ms);
            f.set(format!("{method}_max_ms_{n}"), m.latency.max_ms);
            f.set(format!("{method}_requests_{n}"), m.latency.count);
            f.set(format!("{method}_client_cpu_us_{n}"), m.client_cpu_us);
            f.set(format!("{method}_idle_pct_{n}"), m.idle_pct);
        }
        f.set(
            format!("pool_checkout_cpu_us_{n}"),
            row.checkout.client_cpu_us,
        );
        f.set(
            format!("pooled_tps_rounds_{n}"),
            row.rounds.iter().map(|r| r.pooled.tps).collect::<Vec<_>>(),
        );
        // `pgbench_*` is `pgbench -S` as run by default; `pgbench_prepared_*` with -M prepared.
        for (key, mode) in [
            ("pgbench", QueryMode::Simple),
            ("pgbench_prepared", QueryMode::Prepared),
        ] {
            let run = row.pgbench(mode);
            f.set(format!("{key}_tps_{n}"), run.map(|p| p.tps));
            f.set(
                format!("{key}_latency_avg_ms_{n}"),
                run.map(|p| p.latency_avg_ms),
            );
            f.set(
                format!("{key}_client_cpu_us_{n}"),
                run.and_then(|p| p.client_cpu_us),
            );
            f.set(format!("{key}_idle_pct_{n}"), run.and_then(|p| p.idle_pct));
            f.set(format!("pooled_vs_{key}_{n}"), row.pooled_vs(mode));
            f.set(
                format!("pooled_vs_{key}_rounds_{n}"),
                row.pooled_vs_rounds(mode),
            );
            f.set(
                format!("direct_vs_{key}_{n}"),
                report::ratio(Some(row.direct.tps), run.map(|p| p.tps)),
            );
        }
        let pooled = Some(row.pooled().tps);
        f.set(
            format!("pooled_vs_connect_per_request_{n}"),
            report::ratio(pooled, Some(row.connect_per_request.tps)),
        );
        f.set(
            format!("pooled_vs_direct_{n}"),
            report::ratio(pooled, Some(row.direct.tps)),
        );
    }
    f.set("pool_acquire_wait_p99_ms", r.acquire_wait_p99_ms);

    let top = r.top();
    let n = top.clients;
    let targets = vec![
        Target {
            key: format!("pooled_vs_connect_per_request_{n}"),
            what: format!("pooled / connect-per-request, {n} clients"),
            value: report::ratio(Some(top.pooled().tps), Some(top.connect_per_request.tps)),
            bound: Bound::AtLeast(100.0),
            unit: "×",
        },
        Target {
            key: format!("pooled_vs_pgbench_{n}"),
            what: format!("pooled / pgbench -S, {n} clients (median of the rounds)"),
            value: top.pooled_vs(QueryMode::Simple),
            bound: Bound::AtLeast(0.9),
            unit: "×",
        },
    ];
    f.set_targets(&targets);
    (f, targets)
}

/// The table and the context a reader needs to judge it.
fn human_report(args: &PoolArgs, r: &Results) -> String {
    let mut table = report::table(&[
        "method",
        "clients",
        "tps",
        "p50 ms",
        "p99 ms",
        "mean ms",
        "client CPU µs/req",
        "idle CPU %",
        "vs connect-per-request",
    ]);
    let cpu = |us: Option<f64>| us.map_or_else(|| "—".to_owned(), report::num);
    let idle = |pct: Option<f64>| pct.map_or_else(|| "—".to_owned(), |p| format!("{p:.1}"));
    for row in &r.rows {
        let base = row.connect_per_request.tps;
        let line = |name: &str, m: &Measured| {
            vec![
                name.to_owned(),
                row.clients.to_string(),
                report::num(m.tps),
                report::num(m.latency.p50_ms),
                report::num(m.latency.p99_ms),
                report::num(m.latency.mean_ms),
                cpu(m.client_cpu_us),
                idle(m.idle_pct),
                format!("{}×", report::num(m.tps / base)),
            ]
        };
        table.add_row(line("svcdb pool (prepare_cached)", row.pooled()));
        for mode in [QueryMode::Simple, QueryMode::Prepared] {
            match row.pgbench(mode) {
                Some(p) => table.add_row(vec![
                    mode.label().to_owned(),
                    row.clients.to_string(),
                    report::num(p.tps),
                    "—".into(),
                    "—".into(),
                    report::num(p.latency_avg_ms),
                    cpu(p.client_cpu_us),
                    idle(p.idle_pct),
                    format!("{}×", report::num(p.tps / base)),
                ]),
                None => table.add_row(vec![
                    format!("{} (not available)", mode.label()),
                    row.clients.to_string(),
                ]),
            };
        }
        table.add_row(line("tokio-postgres, no pool", &row.direct));
        table.add_row(line("connect per request", &row.connect_per_request));
    }
    let mut rounds = String::new();
    for row in &r.rows {
        for mode in [QueryMode::Simple, QueryMode::Prepared] {
            let ratios = row.pooled_vs_rounds(mode);
            if let Some(median) = row.pooled_vs(mode) {
                let each: Vec<String> = ratios.iter().map(|&v| report::num(v)).collect();
                rounds.push_str(&format!(
                    "\npooled / {} at clients = {}: {}× (median; rounds {})",
                    mode.label(),
                    row.clients,
                    report::num(median),
                    each.join(", "),
                ));
            }
        }
    }
    let checkout = r
        .rows
        .iter()
        .map(|row| format!("{} µs at {}", cpu(row.checkout.client_cpu_us), row.clients))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "Pool benchmark: {QUERY}\n\
         scale {} ({} accounts), {} s per measurement after {} s warm-up, {} rounds of pooled \
         and pgbench (the table shows each method's median round); \
         {} tokio worker threads\n{}; {}\n\n{table}\n{rounds}\n\n\
         The pool alone (get + prepare_cached + return, no query), client CPU per checkout: \
         {checkout} clients",
        args.scale,
        i64::from(args.scale) * ACCOUNTS_PER_SCALE,
        report::num(args.duration),
        report::num(args.warmup),
        args.rounds,
        r.worker_threads,
        r.machine.line(),
        r.pgbench_version
            .as_deref()
            .unwrap_or("pgbench not available"),
    )
}

/// Runs one task per workload, each issuing requests back to back until the deadline;
/// records only requests that start after the warm-up.
async fn measure<W: Workload>(
    workloads: Vec<W>,
    accounts: i32,
    warmup: Duration,
    duration: Duration,
) -> Result<Measured> {
    let started = Instant::now();
    let window_start = started + warmup;
    let deadline = window_start + duration;
    let cpu_at_window_start = tokio::spawn(async move {
        tokio::time::sleep_until(window_start.into()).await;
        report::cpu_times()
    });
    let mut tasks = JoinSet::new();
    for (client, mut workload) in (0_u64..).zip(workloads) {
        tasks.spawn(async move {
            // A fast, per-task generator: no shared state between tasks; the seed only needs
            // to differ between clients.
            let mut rng = SmallRng::seed_from_u64(0x5eed ^ client);
            let mut latencies = Latencies::new();
            loop {
                let begun = Instant::now();
                if begun >= deadline {
                    break;
                }
                workload.request(rng.random_range(1..=accounts)).await?;
                if begun >= window_start {
                    latencies.record(begun.elapsed());
                }
            }
            anyhow::Ok(latencies)
        });
    }
    let mut all = Latencies::new();
    while let Some(result) = tasks.join_next().await {
        all.merge(&result??);
    }
    // The window ends when the last request finishes, a request's length after the deadline.
    let window = window_start.elapsed().as_secs_f64();
    ensure!(all.count() > 0, "no request completed in {window:.1} s");
    let (client_cpu_us, idle_pct) = match (cpu_at_window_start.await?, report::cpu_times()) {
        (Some(start), Some(end)) => (
            Some((end.own - start.own).as_secs_f64() * 1e6 / all.count() as f64),
            Some(start.idle_percent(&end, Duration::from_secs_f64(window))),
        ),
        _ => (None, None),
    };
    Ok(Measured {
        tps: all.count() as f64 / window,
        latency: all.summary(),
        client_cpu_us,
        idle_pct,
    })
}

/// Makes sure pgbench's tables exist at `scale` with every row; returns the number of accounts.
/// A run that finds them skips the (slow) initialisation.
async fn ensure_accounts(
    server: &Server,
    database: &str,
    scale: u32,
    pgbench: Option<&Path>,
) -> Result<i32> {
    let accounts = i64::from(scale) * ACCOUNTS_PER_SCALE;
    let accounts_i32 = i32::try_from(accounts).context("--scale too large for int4 aids")?;
    let conn = svcdb::DedicatedConn::connect(&server.database(database)).await?;
    let counts = conn
        .query_one(
            "SELECT (SELECT count(*) FROM pgbench_branches), (SELECT count(*) FROM pgbench_accounts)",
            &[],
        )
        .await;
    match counts {
        Ok(row) if row.get::<_, i64>(0) == i64::from(scale) && row.get::<_, i64>(1) == accounts => {
            return Ok(accounts_i32)
        }
        Ok(_) => eprintln!("pgbench tables have another scale; initialising at scale {scale}…"),
        Err(e) if e.code() == Some(&svcdb::SqlState::UNDEFINED_TABLE) => {
            eprintln!("initialising pgbench tables at scale {scale}…")
        }
        Err(e) => return Err(e.into()),
    }
    let started = Instant::now();
    match pgbench {
        Some(path) => {
            let mut cmd = server.tool(path, database);
            cmd.args(["-i", "-q", "-s", &scale.to_string()]);
            pg::run_tool(cmd, "pgbench -i").await?;
        }
        None => init_with_sql(&conn, scale).await?,
    }
    eprintln!("initialised in {:.1} s", started.elapsed().as_secs_f64());
    Ok(accounts_i32)
}

/// What `pgbench -i` does, in SQL, for machines without pgbench: the same four tables, rows,
/// primary keys and statistics, so the query plan and cache footprint match.
async fn init_with_sql(conn: &tokio_postgres::Client, scale: u32) -> Result<()> {
    conn.batch_execute(&format!(
        "DROP TABLE IF EXISTS pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history;
         CREATE TABLE pgbench_history (tid int, bid int, aid int, delta int, mtime timestamp, filler char(22));
         CREATE TABLE pgbench_tellers (tid int NOT NULL, bid int, tbalance int, filler char(84)) WITH (fillfactor = 100);
         CREATE TABLE pgbench_accounts (aid int NOT NULL, bid int, abalance int, filler char(84)) WITH (fillfactor = 100);
         CREATE TABLE pgbench_branches (bid int NOT NULL, bbalance int, filler char(88)) WITH (fillfactor = 100);
         INSERT INTO pgbench_branches (bid, bbalance) SELECT b, 0 FROM generate_series(1, {scale}) AS b;
         INSERT INTO pgbench_tellers (tid, bid, tbalance) SELECT t, (t - 1) / 10 + 1, 0 FROM generate_series(1, {scale} * 10) AS t;
         INSERT INTO pgbench_accounts (aid, bid, abalance, filler)
             SELECT a, (a - 1) / {ACCOUNTS_PER_SCALE} + 1, 0, '' FROM generate_series(1, {scale} * {ACCOUNTS_PER_SCALE}) AS a;
         ALTER TABLE pgbench_branches ADD PRIMARY KEY (bid);
         ALTER TABLE pgbench_tellers ADD PRIMARY KEY (tid);
         ALTER TABLE pgbench_accounts ADD PRIMARY KEY (aid);"
    ))
    .await?;
    // VACUUM cannot run inside the implicit transaction of a multi-statement message.
    conn.batch_execute(
        "VACUUM ANALYZE pgbench_branches, pgbench_tellers, pgbench_accounts, pgbench_history",
    )
    .await?;
    Ok(())
}

/// `-T` takes whole seconds.
fn whole_seconds(seconds: f64) -> u64 {
    seconds.ceil().max(1.0) as u64
}

/// Runs `pgbench -S -M <mode> -c N -j N -T secs` (`-n`: no vacuum first; the in-process
/// measurements do not get one either; `-j N`: a thread per client, pgbench's fastest).
async fn run_pgbench(
    server: &Server,
    pgbench: &Path,
    database: &str,
    mode: QueryMode,
    clients: u16,
    seconds: u64,
) -> Result<PgbenchFigures> {
    let mut cmd = server.tool(pgbench, database);
    let n = clients.to_string();
    cmd.args(["-n", "-S", "-M", mode.flag(), "-c", &n, "-j", &n, "-T"])
        .arg(seconds.to_string());
    let before = report::cpu_times();
    let started = Instant::now();
    let output = pg::run_tool(cmd, "pgbench -S").await?;
    let elapsed = started.elapsed();
    let after = report::cpu_times();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut figures =
        parse_pgbench(&stdout).with_context(|| format!("unexpected pgbench output:\n{stdout}"))?;
    if let (Some(before), Some(after)) = (before, after) {
        figures.client_cpu_us = Some(
            (after.children - before.children).as_secs_f64() * 1e6
                / figures.transactions.max(1) as f64,
        );
        figures.idle_pct = Some(before.idle_percent(&after, elapsed));
    }
    Ok(figures)
}

/// Reads `tps = … (without initial connection time)` (PostgreSQL 14+; `excluding connections
/// establishing` before) and `latency average = … ms` from pgbench's summary.
fn parse_pgbench(stdout: &str) -> Result<PgbenchFigures> {
    let mut tps = None;
    let mut latency_avg_ms = None;
    let mut transactions = None;
    for line in stdout.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("number of transactions actually processed: ") {
            transactions = rest.split(['/', ' ']).next().and_then(|v| v.parse().ok());
        }
        if let Some(rest) = line.strip_prefix("tps = ") {
            if rest.contains("without initial connection time")
                || rest.contains("excluding connections establishing")
            {
                tps = rest.split_whitespace().next().and_then(|v| v.parse().ok());
            }
        } else if let Some(rest) = line.strip_prefix("latency average = ") {
            latency_avg_ms = rest.strip_suffix(" ms").and_then(|v| v.trim().parse().ok());
        }
    }
    match (tps, latency_avg_ms, transactions) {
        (Some(tps), Some(latency_avg_ms), Some(transactions)) => Ok(PgbenchFigures {
            tps,
            latency_avg_ms,
            transactions,
            client_cpu_us: None,
            idle_pct: None,
        }),
        _ => {
            bail!("no tps (without initial connection time), latency average or transactions line")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pgbench_15_summary() {
        let out = "pgbench (15.20 (Debian 15.20-0+deb12u1))
transaction type: <builtin: select only>
scaling factor: 10
query mode: prepared
number of clients: 8
number of threads: 8
maximum number of tries: 1
duration: 5 s
number of transactions actually processed: 150000
number of failed transactions: 0 (0.000%)
latency average = 0.266 ms
initial connection time = 12.345 ms
tps = 30012.345678 (without initial connection time)
";
        assert_eq!(
            parse_pgbench(out).unwrap(),
            PgbenchFigures {
                tps: 30012.345678,
                latency_avg_ms: 0.266,
                transactions: 150000,
                client_cpu_us: None,
                idle_pct: None,
            }
        );
    }

    #[test]
    fn reads_pre_14_summary_and_refuses_garbage() {
        let old = "number of transactions actually processed: 4750/5000\n\
                   latency average = 1.5 ms\n\
                   tps = 900.1 (including connections establishing)\n\
                   tps = 950.2 (excluding connections establishing)\n";
        let parsed = parse_pgbench(old).unwrap();
        assert_eq!((parsed.tps, parsed.transactions), (950.2, 4750));
        assert!(parse_pgbench("connection to server failed").is_err());
    }

    #[test]
    fn pgbench_duration_is_whole_seconds() {
        assert_eq!(whole_seconds(5.0), 5);
        assert_eq!(whole_seconds(0.2), 1);
        assert_eq!(whole_seconds(2.5), 3);
    }
}
