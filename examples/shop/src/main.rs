//! `shop`: the reference system built on svcdb and svcdb-amqp.
//!
//! * `shop demo` provisions the databases (one, unless `--database-url-for` places a service
//!   elsewhere), starts every service as several replicas, each its own process (`shop serve`),
//!   drives the design notes' scenario through their HTTP APIs with real faults (lost
//!   acknowledgements, killed replicas, killed database connections, a broker outage), then
//!   checks the invariants from the databases and queues (exit 0 only if every one holds),
//!   stops every process and cleans up.
//! * `shop serve <service>` runs one service on its own, configured from the environment.
//!
//! # Layout
//!
//! | module | what |
//! |---|---|
//! | [`platform`] | what the services share: definition, names, state, HTTP errors; they run on svcdb-amqp's `Service` runtime |
//! | [`users`], [`catalog`], [`cart`], [`orders`] | the services: schema, migrations, routes, handlers |
//! | [`events`] | the events between them (the contract) |
//! | [`deploy`] | the operator's side: where each service's schema lives, the databases, the roles (per server), provisioning |
//! | [`client`] | the JSON-over-HTTP client (the demo's shoppers, orders → cart) |
//! | [`fleet`] | the replicas as child processes, and a round-robin front per service |
//! | [`faults`] | the injected faults on the wire: broker links that drop or lose acknowledgements, a broken release, duplicates, poison |
//! | [`scenario`] | `shop demo`: the narrated scenario |
//! | [`report`] | the invariants, the figures, the JSON summary |

mod cart;
mod catalog;
mod client;
mod deploy;
mod events;
mod faults;
mod fleet;
mod orders;
mod platform;
mod report;
mod scenario;
mod services;
mod users;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand, ValueEnum};
use svcdb::error::Report;
use svcdb_amqp::AmqpConfig;

use crate::deploy::Placement;
use crate::platform::{Launch, Names, ServiceDef, Tuning};
use crate::scenario::DemoOptions;

/// The reference system: users, catalog, cart and orders on PostgreSQL (a schema and role each,
/// in one database unless --database-url-for puts one elsewhere) and RabbitMQ, built on svcdb
/// and svcdb-amqp.
#[derive(Parser)]
#[command(name = "shop", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the design notes' scenario from scratch: every service as --replicas processes, real
    /// faults injected, the invariants checked from the databases and queues, every process
    /// stopped and everything removed. Exit 0 only if every invariant holds.
    Demo(DemoArgs),
    /// Remove what `shop demo --keep` left: the databases, the roles, the exchanges and queues
    /// (pass the run's --database-url-for too).
    Clean(Target),
    /// Run one service (one replica) on its own, configured from the environment: DATABASE_URL
    /// (as the service's role), AMQP_URL, and SHOP_CART_URL for orders. Ctrl-C or SIGTERM stops
    /// it gracefully.
    Serve(ServeArgs),
}

/// Where the demo runs.
#[derive(Args)]
struct Target {
    /// An admin's URL (superuser, or CREATEDB and CREATEROLE): it creates the database and the
    /// services' roles. The services connect as their own roles.
    #[arg(
        long,
        env = "SHOP_ADMIN_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres",
        hide_env_values = true
    )]
    database_url: String,
    /// The broker.
    #[arg(long, env = "AMQP_URL", default_value = svcdb_amqp::DEFAULT_URL, hide_env_values = true)]
    amqp_url: String,
    /// The demo's database, dropped and created anew. Its name also prefixes the roles
    /// (shop_catalog), exchanges and queues (shop.catalog.events), so runs on different
    /// databases never meet.
    #[arg(long, default_value = "shop")]
    database: String,
    /// Puts SERVICE's schema in a database of its own, on this server or another: URL is an
    /// admin's on that server (the demo creates the database and the service's role there),
    /// its path the database (--database's name if it has none). Once per service; the others
    /// stay in --database.
    #[arg(long = "database-url-for", value_name = "SERVICE=URL", value_parser = PlacementParser)]
    database_url_for: Vec<Placement>,
}

/// Parses `--database-url-for SERVICE=URL` with errors of its own: clap's would repeat the
/// value, and the URL may hold a password.
#[derive(Clone)]
struct PlacementParser;

impl clap::builder::TypedValueParser for PlacementParser {
    type Value = Placement;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<Placement, clap::Error> {
        let placement = value
            .to_str()
            .ok_or_else(|| "is not UTF-8".to_owned())
            .and_then(|value| Placement::parse(value, &services::SERVICES));
        placement.map_err(|why| {
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("--database-url-for: {why}\n"),
            )
            .with_cmd(cmd)
        })
    }
}

#[derive(Args)]
struct DemoArgs {
    #[command(flatten)]
    target: Target,
    /// A password for the services' roles (stored as a SCRAM verifier); none by default.
    #[arg(long, env = "SHOP_SERVICE_PASSWORD", hide_env_values = true)]
    service_password: Option<String>,
    /// Orders to place.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(5..=100_000))]
    orders: u32,
    /// Copies of already handled OrderPlaced events to publish. Default: 6 % of --orders, at
    /// least 10 (the notes' 600 duplicates for 10,000 orders).
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=100_000))]
    duplicates: Option<u32>,
    /// Shoppers placing orders at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=64))]
    shoppers: u32,
    /// Seed of the shoppers' choices and of the faults' timing.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Processes per service.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=16))]
    replicas: u32,
    /// Share of messages whose acknowledgement is lost: the consumer's broker connection is cut
    /// as it sends the ack, after its transaction committed, so the broker redelivers.
    #[arg(long, default_value_t = 0.02, value_parser = rate)]
    lost_ack_rate: f64,
    /// How many times each chosen message's acknowledgement is lost (redeliveries).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=100))]
    redeliveries: u32,
    /// Replicas of each service killed (SIGKILL) at random points while orders flow, each
    /// replaced by a new one.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=100))]
    kills: u32,
    /// Times the services' database connections are terminated (pg_terminate_backend, on the
    /// demo's own roles only) while orders flow.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=100))]
    backend_kills: u32,
    /// Restart RabbitMQ's application once mid-run (rabbitmqctl stop_app / start_app). Off by
    /// default: it disturbs everything else using that broker.
    #[arg(long)]
    broker_restart: bool,
    /// The control run: the services' handlers forget their idempotency claims, so redeliveries
    /// and copies are applied again. The invariant checks must catch it (exit 1).
    #[arg(long)]
    without_idempotency: bool,
    /// Print one JSON object with the counts and "ok" as the last line.
    #[arg(long)]
    json: bool,
    /// Leave the database, roles, exchanges and queues for inspection.
    #[arg(long)]
    keep: bool,
}

#[derive(Args)]
struct ServeArgs {
    service: ServiceName,
    /// Where to serve HTTP.
    #[arg(long, env = "SHOP_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Run the service's migrations before the start-up gate (a deploy step). Without it the
    /// gate refuses a schema whose migrations did not run.
    #[arg(long)]
    migrate: bool,
    /// Prefix of the exchanges and queues (the demo uses its database's name).
    #[arg(long, env = "SHOP_NAMESPACE", default_value = "shop")]
    namespace: String,
    /// The broker.
    #[arg(long, env = "AMQP_URL", default_value = svcdb_amqp::DEFAULT_URL, hide_env_values = true)]
    amqp_url: String,
    /// The cart service's base URL (orders reads carts through it).
    #[arg(long, env = "SHOP_CART_URL")]
    cart_url: Option<String>,
    /// Short retry and reconnection pauses (about a second at most instead of the libraries'
    /// defaults), for a demo whose faults should heal quickly.
    #[arg(long, env = "SHOP_QUICK_RECOVERY")]
    quick_recovery: bool,
    /// Milliseconds between a SIGTERM and the end of serving, while `/readyz` answers 503 and
    /// everything else still works (Service::drain_delay): a few seconds under a load
    /// balancer, which needs that long to stop routing to the replica. Default: 0.
    #[arg(long, env = "SHOP_DRAIN_DELAY_MS", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=60_000))]
    drain_delay_ms: u32,
    /// Handlers forget their idempotency claims: every redelivery is applied again. Only for
    /// the demo's control run; never in a deployment.
    #[arg(long, env = "SHOP_WITHOUT_IDEMPOTENCY", hide = true)]
    without_idempotency: bool,
}

/// A share from 0 to 1.
fn rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} is not a share from 0 to 1 (0.02 is 2 %)")),
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum ServiceName {
    Users,
    Catalog,
    Cart,
    Orders,
}

impl ServiceName {
    fn def(self) -> &'static ServiceDef {
        match self {
            ServiceName::Users => &users::SERVICE,
            ServiceName::Catalog => &catalog::SERVICE,
            ServiceName::Cart => &cart::SERVICE,
            ServiceName::Orders => &orders::SERVICE,
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    // Printing to a closed pipe (`shop demo | head`) ends the process quietly, as it ends
    // `cat`, where Rust's default (SIGPIPE ignored) makes `println!` panic; the replicas go
    // with it (their parent-death signal).
    // SAFETY: restores the default disposition before any thread writes to a pipe.
    #[allow(unsafe_code)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    // The demo narrates on stdout; the libraries' own logs of the injected faults would
    // drown it, so they show only with RUST_LOG (e.g. RUST_LOG=svcdb_amqp=warn).
    let default_filter = match cli.command {
        Command::Demo(_) | Command::Clean(_) => "error,lapin=off",
        Command::Serve(_) => "info,tokio_postgres=warn",
    };
    // RUST_LOG, SVCDB_LOG_FORMAT=json, and spans over OTLP with `--features otlp`.
    let service = match &cli.command {
        Command::Serve(args) => args.service.def().name,
        Command::Demo(_) | Command::Clean(_) => "shop",
    };
    let _telemetry = match svcdb_amqp::telemetry::init(service, default_filter) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Demo(args) => demo(args).await,
        Command::Clean(target) => exit(
            scenario::clean(
                &target.database_url,
                &target.amqp_url,
                &target.database,
                &target.database_url_for,
            )
            .await,
        ),
        Command::Serve(args) => exit(serve(args).await),
    }
}

fn exit(outcome: anyhow::Result<()>) -> ExitCode {
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", Report::new(e.as_ref()));
            // Stopped by a signal during the start-up: 143, as the svcdb CLI ends on SIGTERM
            // (found by a user trial: exit 1 read as a crash to the orchestrator).
            let stopped = e.chain().any(|cause| {
                cause
                    .downcast_ref::<svcdb_amqp::service::ServiceError>()
                    .is_some_and(svcdb_amqp::service::ServiceError::is_stopped_by_signal)
            });
            if stopped {
                ExitCode::from(143)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn demo(args: DemoArgs) -> ExitCode {
    let options = DemoOptions {
        admin_url: args.target.database_url,
        amqp_url: args.target.amqp_url,
        database: args.target.database,
        placements: args.target.database_url_for,
        service_password: args.service_password,
        orders: args.orders as usize,
        duplicates: args
            .duplicates
            .map_or((args.orders as usize * 6 / 100).max(10), |d| d as usize),
        shoppers: args.shoppers as usize,
        seed: args.seed,
        keep: args.keep,
        replicas: args.replicas as usize,
        lost_ack_rate: args.lost_ack_rate,
        redeliveries: args.redeliveries,
        kills: args.kills as usize,
        backend_kills: args.backend_kills as usize,
        broker_restart: args.broker_restart,
        idempotency: !args.without_idempotency,
    };
    match scenario::run(options).await {
        Ok(report) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string(&report).expect("the report serializes")
                );
            }
            if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        // Interrupted: everything was stopped and removed; 130 is the shells' code for SIGINT.
        Err(e) if e.is::<scenario::Interrupted>() => {
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({ "ok": false, "error": "interrupted" })
                );
            }
            ExitCode::from(130)
        }
        Err(e) => {
            let report = Report::new(e.as_ref());
            eprintln!("error: {report}");
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({ "ok": false, "error": report.to_string() })
                );
            }
            ExitCode::FAILURE
        }
    }
}

/// One service, as a deployment would run it: connect as its role (DATABASE_URL), optionally
/// migrate, pass the gate, serve until Ctrl-C.
async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let def = args.service.def();
    // SVCDB_SCHEMA defaults to the service's own schema; every other key as svcdb documents.
    let db = svcdb::Config::from_lookup(|key| {
        std::env::var(key)
            .ok()
            .or_else(|| (key == "SVCDB_SCHEMA").then(|| def.schema.to_owned()))
    })?;
    let mut peers = HashMap::new();
    if let Some(cart) = args.cart_url {
        // Found by a user trial: `127.0.0.1:8082` (no scheme) passed the start-up, and every
        // order then failed with "invalid format".
        let cart = cart.trim_end_matches('/').to_owned();
        let uri: Option<axum::http::Uri> = cart.parse().ok();
        anyhow::ensure!(
            uri.is_some_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some()),
            "SHOP_CART_URL (--cart-url) is not an http:// URL\n  hint: give the cart service's base URL, e.g. http://127.0.0.1:8082"
        );
        peers.insert("cart", cart);
    }
    // Orders reads carts through the cart service: without its URL every order would fail
    // while the replica said it was ready (found by a user trial).
    anyhow::ensure!(
        def.name != "orders" || peers.contains_key("cart"),
        "the orders service needs the cart service's URL to read carts\n  hint: set SHOP_CART_URL (or --cart-url), e.g. http://127.0.0.1:8082"
    );
    // SVCDB_AMQP_PREFETCH and the other keys as svcdb-amqp documents; the URL from --amqp-url.
    let mut amqp = AmqpConfig::from_env()?;
    amqp.url = args.amqp_url;
    if amqp.connection_name.is_none() {
        amqp.connection_name = Some(format!("shop/{}", def.name));
    }
    let launch = Launch {
        def,
        db,
        amqp,
        names: Arc::new(Names::new(&args.namespace)?),
        peers,
        idempotency: !args.without_idempotency,
        http: client::ApiClient::new(),
        listen: args.listen,
        migrate: args.migrate,
        drain_delay: std::time::Duration::from_millis(args.drain_delay_ms.into()),
        tuning: if args.quick_recovery {
            Tuning::demo()
        } else {
            Tuning::production()
        },
    };
    let running = match platform::service(launch)?.start().await {
        Ok(running) => running,
        // The gate's hint names `svcdb migrate up`, which needs the migrations as files; the
        // shop's are built into it (found by a user trial).
        Err(e) if *e.step() == svcdb_amqp::service::Step::Gate && !args.migrate => {
            anyhow::bail!(
                "{e}\n  hint: the shop's migrations are built into it: start a replica with `shop serve {} --migrate`, or run `svcdb migrate up --dir examples/shop/migrations/{}` as the service's role",
                def.name,
                def.name
            )
        }
        Err(e) => return Err(e.into()),
    };
    if let Some(report) = running.migrated() {
        tracing::info!(
            applied = report.migrations.len(),
            version = report.current_version.as_ref().map(tracing::field::display),
            "migrated"
        );
    }
    // `shop demo` reads the address from this line.
    println!(
        "{}: {}; serving http://{} (Ctrl-C to stop)",
        def.name,
        running.gate(),
        running.addr()
    );
    // SIGINT (Ctrl-C) or SIGTERM (what a container runtime sends, and `shop demo`): the
    // runtime's graceful shutdown.
    running.run_until_signal().await?;
    Ok(())
}
