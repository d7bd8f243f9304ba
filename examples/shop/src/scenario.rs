//! `shop demo`: the design notes' "How it all fits together", run as a real deployment with
//! real faults, narrated step by step, and checked.
//!
//! 1. Provision one database (and one for each service that `--database-url-for` places
//!    elsewhere), a role and schema per service; start users, catalog and cart, each as
//!    `--replicas` processes that race to migrate.
//! 2. Deploy orders without its migrations (the notes' 9 AM incident): the gate refuses; then
//!    deploy it with them.
//! 3. Each service's role reads each other service's table: permission denied, 12 times.
//! 4. Seed products and users; the cart learns the users from `UserRegistered`.
//! 5. Deploy a catalog release whose third migration fails: the schema is left as it was.
//! 6. Shoppers place orders through HTTP, through each service's front, while replicas are
//!    killed (SIGKILL) and replaced, the services' database connections are terminated,
//!    acknowledgements are lost on the wire, and (with `--broker-restart`) RabbitMQ restarts.
//! 7. RabbitMQ becomes unreachable from orders while more orders are placed.
//! 8. More orders, while old `OrderPlaced` events are published again and again and a malformed
//!    message lands in the catalog's queue.
//! 9. Wait for every order to be decided, stop every replica gracefully, then check the
//!    invariants from the databases, each service's through its own connection, and the
//!    queues (see [`crate::report`]).

use std::collections::HashMap;
use std::fmt::Display;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures_util::{StreamExt, TryStreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use svcdb::migrate::{MigrateError, Migrator};
use svcdb::{Envelope, Problem, ServiceDb, SqlState};
use svcdb_amqp::lapin::Connection;
use svcdb_amqp::AmqpConfig;
use tokio_util::sync::CancellationToken;

use crate::cart::{Cart, NewCart};
use crate::catalog::{NewProduct, Product};
use crate::client::{ApiClient, Response};
use crate::deploy::{Deployment, Placement};
use crate::events::{Event, Line, OrderPlaced, MALFORMED};
use crate::faults::{self, Link, LostAcks};
use crate::fleet::{Fleet, Spec};
use crate::orders::{Order, PlaceOrder};
use crate::platform::ServiceDef;
use crate::report::{Checks, Figures, Report, Sources};
use crate::services::SERVICES;
use crate::users::{Registration, User};
use crate::{catalog, orders};

/// How long the system must stay quiet (nothing ready, everything applied) to count as settled.
const QUIET: Duration = Duration::from_millis(2500);

/// The longest the demo waits for the system to settle after each phase (replicas restarting
/// and redeliveries included).
const SETTLE: Duration = Duration::from_secs(120);

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub admin_url: String,
    pub amqp_url: String,
    pub database: String,
    /// Services whose schema lives in another database (`--database-url-for`).
    pub placements: Vec<Placement>,
    pub service_password: Option<String>,
    pub orders: usize,
    pub duplicates: usize,
    pub shoppers: usize,
    pub seed: u64,
    pub keep: bool,
    pub replicas: usize,
    pub lost_ack_rate: f64,
    pub redeliveries: u32,
    pub kills: usize,
    pub backend_kills: usize,
    pub broker_restart: bool,
    /// False for the control run: handlers forget their claims.
    pub idempotency: bool,
}

/// The demo was interrupted (Ctrl-C); everything was stopped and removed all the same.
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

/// Runs the demo and cleans up after it (unless `keep`), whatever happened, Ctrl-C included.
/// `Err` only when the demo could not run (no database, no broker, a replica that never came
/// up) or was interrupted ([`Interrupted`]); invariants that fail are in the report.
pub async fn run(options: DemoOptions) -> anyhow::Result<Report> {
    let started = Instant::now();
    let deployment = Deployment::new(
        &options.admin_url,
        &options.database,
        options.service_password.clone(),
        &SERVICES,
        &options.placements,
    )?;
    let amqp = AmqpConfig::new(&options.amqp_url).with_connection_name("shop demo (operator)");
    println!(
        "shop demo: users, catalog, cart and orders on {} and RabbitMQ, {} processes each, with real faults",
        if deployment.is_one_database() {
            "one PostgreSQL database".to_owned()
        } else {
            format!("{} PostgreSQL databases", deployment.databases().len())
        },
        options.replicas
    );
    println!(
        "  database {} on {}, broker {}; {} orders, {} duplicate copies; lost acks {} % × {}, {} kills per service, {} backend kills{}{}",
        deployment.database,
        deployment.home().server(),
        amqp.redacted_url(),
        options.orders,
        options.duplicates,
        options.lost_ack_rate * 100.0,
        options.redeliveries,
        options.kills,
        options.backend_kills,
        if options.broker_restart { ", a broker restart" } else { "" },
        if options.idempotency {
            ""
        } else {
            "\n  CONTROL RUN: the handlers forget their idempotency claims; the checks must fail"
        }
    );
    if !deployment.is_one_database() {
        for def in SERVICES {
            let place = deployment.place(def);
            println!(
                "  {:<8} in database {} on {}",
                def.name,
                place.database,
                place.server()
            );
        }
    }
    let broker = amqp
        .connect()
        .await
        .context("the demo needs RabbitMQ (run scripts/services, or pass --amqp-url)")?;
    let api = ApiClient::new();
    let lost_acks = Arc::new(LostAcks::new(
        options.lost_ack_rate,
        options.redeliveries,
        options.seed,
    ));
    let mut demo = Demo {
        amqp,
        fleet: Arc::new(Fleet::new(api.clone())?),
        options,
        deployment,
        broker,
        api,
        lost_acks,
        links: HashMap::new(),
        pools: HashMap::new(),
        checks: Checks::default(),
        figures: Figures::default(),
        step: 0,
        faults: Arc::default(),
        chaos: None,
        outage_orders: Vec::new(),
        bar: None,
    };
    let outcome = tokio::select! {
        outcome = demo.scenario() => outcome,
        _ = tokio::signal::ctrl_c() => Err(anyhow::Error::new(Interrupted)),
    };
    if let Some(bar) = demo.bar.take() {
        bar.finish_and_clear();
    }
    if let Err(e) = &outcome {
        println!("\nthe demo stopped: {e:#}");
    }
    let cleanup = demo.clean_up().await;
    if let Err(e) = &cleanup {
        println!("clean-up failed: {e:#}");
    }
    outcome?;
    cleanup?;
    demo.figures.elapsed_ms = started.elapsed().as_millis() as u64;
    let report = Report::new(demo.checks, demo.figures, demo.deployment.database.clone());
    println!(
        "\n{} in {:.1} s",
        if report.ok {
            format!("ok: all {} invariants hold", report.checks.len())
        } else {
            format!(
                "FAILED: {} of {} invariants do not hold",
                report.checks.failed(),
                report.checks.len()
            )
        },
        report.figures.elapsed_ms as f64 / 1000.0
    );
    Ok(report)
}

/// One planned order: a user (index into the seeded users) and lines (product index, quantity).
struct Plan {
    user: usize,
    lines: Vec<(usize, i32)>,
}

/// What the fault injector did so far, shared with the progress bar.
#[derive(Default)]
struct FaultCounts {
    /// Orders placed so far (the injector's clock).
    placed: AtomicUsize,
    /// Held by the injector for each fault, and by the broker outage throughout: a replica
    /// started during the outage could not declare its queues, so the two never overlap.
    quiet: tokio::sync::Mutex<()>,
    backend_kills: AtomicU64,
    backends_terminated: AtomicU64,
    broker_restarts: AtomicU64,
    /// What happened, in order, for the narration.
    log: std::sync::Mutex<Vec<String>>,
}

impl FaultCounts {
    fn note(&self, line: String) {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(line);
    }
}

struct Demo {
    options: DemoOptions,
    deployment: Deployment,
    /// The operator's own connection to the broker (clean-up, injected messages, DLQ checks),
    /// and how to make it again after a broker restart ([`Demo::reconnect_broker`]).
    broker: Connection,
    amqp: AmqpConfig,
    api: ApiClient,
    fleet: Arc<Fleet>,
    lost_acks: Arc<LostAcks>,
    links: HashMap<&'static str, Arc<Link>>,
    /// A pool per service's role, the operator's: the deploy steps (migrations, the gate) and
    /// the boundary check run as the service would.
    pools: HashMap<&'static str, ServiceDb>,
    checks: Checks,
    figures: Figures,
    step: usize,
    faults: Arc<FaultCounts>,
    /// The fault injector, while orders flow.
    chaos: Option<(
        CancellationToken,
        tokio::task::JoinHandle<anyhow::Result<()>>,
    )>,
    /// Orders placed during the broker outage (left out of the latency figures).
    outage_orders: Vec<i64>,
    /// The progress bar, while orders flow (drawn on a terminal only).
    bar: Option<ProgressBar>,
}

impl Demo {
    fn step(&mut self, title: impl Display) {
        self.step += 1;
        self.print(format!("\n[{}] {title}", self.step));
    }

    fn say(&self, text: impl Display) {
        let text: Vec<String> = text
            .to_string()
            .lines()
            .map(|l| format!("    {l}"))
            .collect();
        self.print(text.join("\n"));
    }

    /// Prints above the progress bar while there is one.
    fn print(&self, text: String) {
        match &self.bar {
            Some(bar) => bar.suspend(|| println!("{text}")),
            None => println!("{text}"),
        }
    }

    /// A new operator's connection if the broker restarted (`--broker-restart`) since.
    async fn reconnect_broker(&mut self) -> anyhow::Result<()> {
        if !self.broker.status().connected() {
            self.broker = self
                .amqp
                .connect()
                .await
                .context("reconnecting to RabbitMQ")?;
        }
        Ok(())
    }

    async fn scenario(&mut self) -> anyhow::Result<()> {
        self.provision().await?;
        self.define_fleet().await?;
        self.start_services().await?;
        self.orders_without_migrations().await?;
        self.cross_service_reads().await?;
        let (products, users) = self.seed().await?;
        self.failing_release().await?;

        let plans = self.plans(products.len(), users.len());
        let phase_a = plans.len() * 2 / 5;
        let phase_b = plans.len() / 5;
        let (a, rest) = plans.split_at(phase_a);
        let (b, c) = rest.split_at(phase_b);
        self.start_chaos();
        self.bar = Some(self.progress_bar());
        let measured = Instant::now();
        let outcome = async {
            self.orders_with_faults(a, &products, &users).await?;
            let outage = Instant::now();
            self.relay_outage(b, &products, &users).await?;
            let outage = outage.elapsed();
            self.duplicates_and_poison(c, &products, &users).await?;
            self.settle().await?;
            anyhow::Ok(outage)
        }
        .await;
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        let outage = outcome?;
        self.figures.measured_ms = measured.elapsed().saturating_sub(outage).as_millis() as u64;
        self.figures.measured_orders = a.len() + c.len();
        self.stop_services().await;
        self.invariants(&products).await?;
        Ok(())
    }

    async fn provision(&mut self) -> anyhow::Result<()> {
        self.step(if self.deployment.is_one_database() {
            "Provision: one database; per service a login role that owns its schema, nothing for PUBLIC"
        } else {
            "Provision: a database per place; per service, on its server, a login role that owns its schema, nothing for PUBLIC"
        });
        let existed = self.deployment.recreate(&SERVICES).await?;
        for place in self.deployment.databases() {
            self.say(format!(
                "database {} on {}: {}",
                place.database,
                place.server(),
                if existed {
                    "dropped the previous run's databases and roles, created it anew"
                } else {
                    "created"
                }
            ));
        }
        // A previous run with --keep left its exchanges and queues (and their messages).
        for def in SERVICES {
            self.deployment
                .names
                .topology(def)
                .delete(&self.broker)
                .await?;
        }
        let mut reports = Vec::new();
        for def in SERVICES {
            let report = self.deployment.provision(def).await?;
            self.say(format!(
                "{:<8} login role {:<14} owns schema {}",
                def.name, report.role, report.schema
            ));
            reports.push(report);
        }
        self.say(format!(
            "what svcdb::provision did for {} (the others alike):",
            reports[0].role
        ));
        for change in &reports[0].changes {
            self.say(format!("  - {change}"));
        }
        self.say("  (a schema made this way grants PUBLIC nothing; provision revokes what an older one granted)");
        Ok(())
    }

    /// Opens a broker link and a front per service, and says how their replicas start.
    async fn define_fleet(&mut self) -> anyhow::Result<()> {
        let broker = faults::broker_address(&self.options.amqp_url)?;
        let fleet = Arc::get_mut(&mut self.fleet).context("the fleet is not shared yet")?;
        for def in SERVICES {
            let link =
                Arc::new(Link::open(def.name, broker.clone(), self.lost_acks.clone()).await?);
            let mut spec = Spec {
                args: vec![
                    "--namespace".into(),
                    self.deployment.names.namespace().to_owned(),
                    "--quick-recovery".into(),
                ],
                env: self.deployment.service_env(def),
            };
            if !self.options.idempotency {
                spec.args.push("--without-idempotency".into());
            }
            spec.env
                .push(("AMQP_URL", link.url(&self.options.amqp_url)?));
            // A prefetch below the pool's size: a consumer handles at most min(prefetch, pool)
            // messages at once, and the HTTP handlers and the relay need connections too.
            spec.env.push(("SVCDB_AMQP_PREFETCH", "4".into()));
            spec.env
                .push(("SVCDB_AMQP_CONNECTION_NAME", format!("shop/{}", def.name)));
            fleet.define(def.name, spec).await?;
            self.links.insert(def.name, link);
        }
        let cart = fleet.url("cart");
        fleet.set_env("orders", "SHOP_CART_URL", cart);
        for def in SERVICES {
            let pool = ServiceDb::connect(self.deployment.service_config(def)?)
                .await
                .with_context(|| format!("connecting as {}'s role", def.name))?;
            self.pools.insert(def.name, pool);
        }
        Ok(())
    }

    /// Starts `--replicas` processes of `service` at once (they race to migrate: svcdb's
    /// advisory lock lets one apply, the others find the work done) and waits for all to be
    /// ready.
    async fn start_replicas(&mut self, def: &'static ServiceDef) -> anyhow::Result<()> {
        let fleet = self.fleet.clone();
        let started: Vec<String> = futures_util::future::try_join_all(
            (0..self.options.replicas).map(|_| fleet.start(def.name)),
        )
        .await?;
        let versions: i64 = self.pools[def.name]
            .get()
            .await?
            .query_one(
                &format!("SELECT count(*) FROM {}", svcdb::migrate::HISTORY_TABLE),
                &[],
            )
            .await
            .map(|r| r.get(0))
            .unwrap_or(-1);
        self.say(format!(
            "{:<8} {} ready behind {} ({versions} migrations applied once, whoever won the lock)",
            def.name,
            started.join(", "),
            fleet.url(def.name)
        ));
        Ok(())
    }

    async fn start_services(&mut self) -> anyhow::Result<()> {
        self.step(format!(
            "Start users, catalog and cart: {} processes each (`shop serve <service> --migrate`, configured from the environment), each waited for until its /readyz says 200",
            self.options.replicas
        ));
        for def in &SERVICES[..3] {
            self.start_replicas(def).await?;
        }
        Ok(())
    }

    async fn orders_without_migrations(&mut self) -> anyhow::Result<()> {
        self.step("Fault: orders deployed without its migrations (the notes' 9 AM incident)");
        let (status, log) = self.fleet.run_to_exit("orders", &[]).await?;
        self.say(format!("shop serve orders (no --migrate) exited: {status}"));
        for line in log.lines().filter(|l| !l.trim().is_empty()).take(6) {
            self.say(format!("  {line}"));
        }
        // The same gate, asked by the operator as the orders role: what exactly it refused.
        let report = self.pools["orders"].verify(&orders::SERVICE.gate()?).await;
        let problems = &report.problems;
        let never_migrated = problems
            .iter()
            .any(|p| matches!(p, Problem::NoHistory { .. }));
        let missing: Vec<&str> = problems
            .iter()
            .filter_map(|p| match p {
                Problem::MissingTable { table, .. } => Some(table.as_str()),
                _ => None,
            })
            .collect();
        self.checks.check(
            "start-up gate refuses a service whose migrations did not run",
            status.code() == Some(1) && never_migrated && missing == ["orders", "order_lines"],
            format!(
                "the process exited with {status}; {} problems: migrations never ran = {never_migrated}, missing tables {missing:?}",
                problems.len()
            ),
        );
        self.say("deploying again, this time with its migrations:");
        self.start_replicas(&orders::SERVICE).await?;
        let readyz = self
            .api
            .get(&format!("{}/readyz", self.fleet.url("orders")))
            .await?;
        self.say(format!(
            "GET /readyz → {} (what the Kubernetes readiness probe sees)",
            readyz.status
        ));
        self.checks.check(
            "after migrating, orders passes the gate and /readyz says 200",
            readyz.status.is_success(),
            format!("/readyz answered {}", readyz.status),
        );
        Ok(())
    }

    async fn cross_service_reads(&mut self) -> anyhow::Result<()> {
        self.step("Fault: each service's role reads each other service's table (12 pairs)");
        let (mut denied, mut elsewhere) = (0, 0);
        let mut wrong = Vec::new();
        for reader in SERVICES {
            let conn = self.pools[reader.name].get().await?;
            for owner in SERVICES.iter().filter(|o| o.name != reader.name) {
                // In one database the schema is there and refused; a service in another
                // database (or on another server) is out of reach of any query: no such table.
                let apart = !self
                    .deployment
                    .place(reader)
                    .same(self.deployment.place(owner));
                let expected = if apart {
                    SqlState::UNDEFINED_TABLE
                } else {
                    SqlState::INSUFFICIENT_PRIVILEGE
                };
                let sql = format!("SELECT count(*) FROM {}.{}", owner.schema, owner.tables[0]);
                match conn.query_one(&sql, &[]).await {
                    Ok(_) => wrong.push(format!("{} read {}", reader.name, owner.schema)),
                    Err(e) if e.code() == Some(&expected) => {
                        if (apart && elsewhere == 0) || (!apart && denied == 0) {
                            self.say(format!(
                                "{sql} as role {} → {}",
                                self.deployment.names.role(reader.name),
                                svcdb::error::pg_message(&e)
                            ));
                        }
                        if apart {
                            elsewhere += 1;
                        } else {
                            denied += 1;
                        }
                    }
                    Err(e) => wrong.push(format!(
                        "{} on {}: SQLSTATE {}",
                        reader.name,
                        owner.schema,
                        e.code().map(|c| c.code()).unwrap_or("none")
                    )),
                }
            }
        }
        let apart_note = if elsewhere > 0 {
            "; a table in another database is not even there"
        } else {
            ""
        };
        self.say(format!(
            "…and so for all {} pairs: each schema belongs to its service's role, PUBLIC gets nothing{apart_note}",
            denied + elsewhere
        ));
        let detail = if elsewhere > 0 {
            format!(
                "{} of 12 pairs denied ({elsewhere} of them in another database: no such table)",
                denied + elsewhere
            )
        } else {
            format!("{denied} of 12 pairs denied")
        };
        self.checks.check(
            "another service's schema answers permission denied (42501), or in another database is not there (42P01), for every pair of services",
            denied + elsewhere == 12 && wrong.is_empty(),
            if wrong.is_empty() {
                detail
            } else {
                format!("{detail}; {}", wrong.join("; "))
            },
        );
        Ok(())
    }

    /// Products (with stock sized so the late orders run some of them out) and users.
    async fn seed(&mut self) -> anyhow::Result<(Vec<Product>, Vec<User>)> {
        self.step("Seed through the APIs: products with stock, users (UserRegistered → cart)");
        let n = self.options.orders as f64;
        let catalog = format!("{}/products", self.fleet.url("catalog"));
        let names = [
            "lamp", "desk", "chair", "shelf", "rug", "mirror", "clock", "vase",
        ];
        let mut products = Vec::new();
        for (i, name) in names.iter().enumerate() {
            // An order takes about 4 units in all, ½ n per product on average: the first
            // products have plenty, the last run out and their orders are rejected.
            let stock = ((n * (0.8 - 0.1 * i as f64)).round() as i32).max(3);
            let new = NewProduct {
                name: (*name).into(),
                price_cents: 1500 + 700 * i as i64,
                stock,
            };
            products.push(self.api.post(&catalog, &new).await?.json::<Product>()?);
        }
        let stock: Vec<String> = products
            .iter()
            .map(|p| format!("{} {}", p.name, p.stock))
            .collect();
        self.say(format!("catalog: {}", stock.join(", ")));
        self.figures.initial_stock = products.iter().map(|p| (p.id, p.stock)).collect();

        let count = (self.options.orders / 4).clamp(3, 50);
        let users_url = format!("{}/users", self.fleet.url("users"));
        let learned = Instant::now();
        let mut users = Vec::new();
        for i in 0..count {
            let registration = Registration {
                email: format!("customer{i}@shop.example"),
                name: format!("Customer {i}"),
            };
            users.push(
                self.api
                    .post(&users_url, &registration)
                    .await?
                    .json::<User>()?,
            );
        }
        let cart = self.pools["cart"].clone();
        let all = wait_until(SETTLE, || async {
            matches!(
                cart.get().await,
                Ok(c) if matches!(c.query_one("SELECT count(*) FROM customers", &[]).await,
                                  Ok(r) if r.get::<_, i64>(0) >= count as i64)
            )
        })
        .await;
        anyhow::ensure!(
            all,
            "the cart service did not learn the {count} users within {SETTLE:?}"
        );
        self.figures.users = count;
        self.say(format!(
            "users: registered {count}; the cart service learned all of them from UserRegistered events within {} ms (outbox → relay → RabbitMQ → consumer)",
            learned.elapsed().as_millis()
        ));
        Ok((products, users))
    }

    async fn failing_release(&mut self) -> anyhow::Result<()> {
        self.step(
            "Fault: catalog release 2 ships 3 migrations and the third fails (atomic deploy)",
        );
        let db = self.pools["catalog"].clone();
        let table_names = |tables: Vec<svcdb::TableInfo>| -> Vec<String> {
            tables.into_iter().map(|t| t.name).collect()
        };
        let before = table_names(db.list_tables().await?);
        let release = faults::catalog_release_2()?;
        let migrator = Migrator::new(db.clone(), release);
        let version_before = migrator.status().await?.current_version;
        self.say(format!(
            "tables before: {} (migration {})",
            before.join(", "),
            version_before
                .as_ref()
                .map_or("none".into(), |v| v.to_string())
        ));
        let outcome = migrator.up().await;
        let after = table_names(db.list_tables().await?);
        let version_after = migrator.status().await?.current_version;
        let (failed_at, rolled_back) = match &outcome {
            Err(MigrateError::Failed(failure)) => {
                self.say(format!(
                    "deploy failed: {}",
                    failure.to_string().replace("\n  ", "\n    ")
                ));
                (Some(failure.version.clone()), failure.rolled_back)
            }
            Err(e) => {
                self.say(format!("deploy failed unexpectedly: {e}"));
                (None, false)
            }
            Ok(_) => {
                self.say("the broken release applied!");
                (None, false)
            }
        };
        self.say(format!(
            "tables after:  {} (migration {})",
            after.join(", "),
            version_after
                .as_ref()
                .map_or("none".into(), |v| v.to_string())
        ));
        let readyz = self
            .api
            .get(&format!("{}/readyz", self.fleet.url("catalog")))
            .await?;
        self.say(format!(
            "the running catalog replicas (release 1) never noticed: GET /readyz → {}",
            readyz.status
        ));
        self.checks.check(
            "a deploy failing at step 3 leaves the schema exactly as before",
            failed_at == Some(5u32.into())
                && rolled_back
                && before == after
                && version_before == version_after
                && readyz.status.is_success(),
            format!(
                "failed at migration {}, rolled back = {rolled_back}, tables unchanged = {}, version {} → {}",
                failed_at.map_or("none".into(), |v| v.to_string()),
                before == after,
                version_before.map_or("none".into(), |v| v.to_string()),
                version_after.map_or("none".into(), |v| v.to_string())
            ),
        );
        Ok(())
    }

    /// The orders to place, drawn from the seed: a user and 1 to 3 lines of 1 to 3 units.
    fn plans(&self, products: usize, users: usize) -> Vec<Plan> {
        let mut rng = StdRng::seed_from_u64(self.options.seed);
        let mut indices: Vec<usize> = (0..products).collect();
        (0..self.options.orders)
            .map(|_| {
                indices.shuffle(&mut rng);
                let count = rng.random_range(1..=3);
                Plan {
                    user: rng.random_range(0..users),
                    lines: indices[..count]
                        .iter()
                        .map(|&p| (p, rng.random_range(1..=3)))
                        .collect(),
                }
            })
            .collect()
    }

    /// The progress bar (on a terminal only): placed, decided, duplicates absorbed, faults.
    fn progress_bar(&self) -> ProgressBar {
        let bar = ProgressBar::new(self.options.orders as u64);
        bar.set_style(
            ProgressStyle::with_template("    {bar:30} {pos}/{len} placed · {msg}")
                .expect("a valid template"),
        );
        let (bar2, faults, lost_acks, fleet) = (
            bar.clone(),
            self.faults.clone(),
            self.lost_acks.clone(),
            self.fleet.clone(),
        );
        let orders = self.pools["orders"].clone();
        tokio::spawn(async move {
            while !bar2.is_finished() {
                let decided: i64 = match orders.get().await {
                    Ok(c) => c
                        .query_one("SELECT count(*) FROM orders WHERE status <> 'placed'", &[])
                        .await
                        .map(|r| r.get(0))
                        .unwrap_or(0),
                    Err(_) => 0,
                };
                bar2.set_position(faults.placed.load(Ordering::Relaxed) as u64);
                bar2.set_message(format!(
                    "{decided} decided · {} duplicates absorbed · faults: {} acks lost, {} replicas killed, {} backend kills",
                    lost_acks.repeated_acks(),
                    lost_acks.cuts(),
                    fleet.killed(),
                    faults.backend_kills.load(Ordering::Relaxed),
                ));
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        bar
    }

    /// Starts the fault injector: `--kills` per service, `--backend-kills`, and the broker
    /// restart, each at a random point (by orders placed) while orders flow.
    fn start_chaos(&mut self) {
        // Its own stream, so that the faults' timing does not shift the shoppers' choices.
        let mut rng = StdRng::seed_from_u64(self.options.seed.wrapping_add(1));
        let total = self.options.orders;
        let mut events: Vec<(usize, Fault)> = Vec::new();
        let at = |rng: &mut StdRng| rng.random_range(total / 20..=(total * 9 / 10).max(total / 20));
        for def in SERVICES {
            for _ in 0..self.options.kills {
                events.push((at(&mut rng), Fault::Kill(def.name)));
            }
        }
        for _ in 0..self.options.backend_kills {
            events.push((at(&mut rng), Fault::Backends));
        }
        if self.options.broker_restart {
            // In the first phase, so that the operator's publishing in the third meets a
            // broker that is back.
            let at = rng.random_range(total / 20..=(total * 3 / 10).max(total / 20));
            events.push((at, Fault::BrokerRestart));
        }
        events.sort_by_key(|(at, _)| *at);
        let fleet = self.fleet.clone();
        let faults = self.faults.clone();
        let backends = self.deployment.backends();
        let stop = CancellationToken::new();
        let cancelled = stop.clone();
        let task = tokio::spawn(async move {
            for (at, fault) in events {
                // Wait for the orders to reach the point, or for the placing to end (then the
                // rest happen at once, while the last orders are decided).
                while faults.placed.load(Ordering::Relaxed) < at && !cancelled.is_cancelled() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let _one_at_a_time = faults.quiet.lock().await;
                match fault {
                    Fault::Kill(service) => {
                        let (killed, started) = fleet.kill_one(service, &mut rng).await?;
                        faults.note(format!(
                            "after {} orders: SIGKILL {killed}; {started} started and ready",
                            faults.placed.load(Ordering::Relaxed)
                        ));
                    }
                    Fault::Backends => {
                        let mut terminated = 0;
                        for (admin, database, roles) in &backends {
                            terminated += terminate_backends(admin, database, roles).await?;
                        }
                        faults.backend_kills.fetch_add(1, Ordering::Relaxed);
                        faults
                            .backends_terminated
                            .fetch_add(terminated, Ordering::Relaxed);
                        faults.note(format!(
                            "after {} orders: pg_terminate_backend on the services' {terminated} connections",
                            faults.placed.load(Ordering::Relaxed)
                        ));
                    }
                    Fault::BrokerRestart => {
                        restart_broker().await?;
                        faults.broker_restarts.fetch_add(1, Ordering::Relaxed);
                        faults.note(format!(
                            "after {} orders: RabbitMQ restarted (rabbitmqctl stop_app; start_app)",
                            faults.placed.load(Ordering::Relaxed)
                        ));
                    }
                }
            }
            Ok(())
        });
        self.chaos = Some((stop, task));
    }

    /// Waits for the fault injector to finish what it has left (the orders are all placed).
    async fn finish_chaos(&mut self) -> anyhow::Result<()> {
        if let Some((stop, task)) = self.chaos.take() {
            stop.cancel();
            task.await.context("the fault injector")??;
        }
        Ok(())
    }

    /// Places `plans` through the services' fronts, `shoppers` at a time: open a cart, add the
    /// items, place the order. A request that fails on the way (its replica was killed, its
    /// database connection terminated) is sent again, as a client behind a load balancer
    /// would: placing the same cart twice returns the same order.
    async fn shop(
        &self,
        plans: &[Plan],
        products: &[Product],
        users: &[User],
        shoppers: usize,
    ) -> anyhow::Result<Vec<Order>> {
        let carts = format!("{}/carts", self.fleet.url("cart"));
        let orders = format!("{}/orders", self.fleet.url("orders"));
        let shop_one = |plan: &Plan| {
            let (carts, orders, api) = (carts.clone(), orders.clone(), self.api.clone());
            let user_id = users[plan.user].id;
            let lines: Vec<Line> = plan
                .lines
                .iter()
                .map(|&(p, quantity)| Line {
                    product_id: products[p].id,
                    quantity,
                })
                .collect();
            let placed = &self.faults.placed;
            async move {
                let cart: Cart = post_retrying(&api, &carts, &NewCart { user_id })
                    .await?
                    .json()?;
                for line in &lines {
                    post_retrying(&api, &format!("{carts}/{}/items", cart.id), line)
                        .await?
                        .json::<Cart>()?;
                }
                let order = post_retrying(&api, &orders, &PlaceOrder { cart_id: cart.id })
                    .await?
                    .json::<Order>()?;
                placed.fetch_add(1, Ordering::Relaxed);
                anyhow::Ok(order)
            }
        };
        let placed: Vec<Order> = futures_util::stream::iter(plans)
            .map(shop_one)
            .buffer_unordered(shoppers.max(1))
            .try_collect()
            .await?;
        Ok(placed)
    }

    /// Orders still `placed`, from the orders service's database.
    async fn undecided(&self) -> anyhow::Result<i64> {
        Ok(self.pools["orders"]
            .get()
            .await?
            .query_one("SELECT count(*) FROM orders WHERE status = 'placed'", &[])
            .await?
            .get(0))
    }

    async fn orders_with_faults(
        &mut self,
        plans: &[Plan],
        products: &[Product],
        users: &[User],
    ) -> anyhow::Result<()> {
        let shoppers = self.options.shoppers;
        self.step(format!(
            "{} orders, {shoppers} shoppers at a time, while replicas are killed, database connections terminated and {} % of acknowledgements lost",
            plans.len(),
            self.options.lost_ack_rate * 100.0
        ));
        let started = Instant::now();
        let placed = self.shop(plans, products, users, shoppers).await?;
        self.figures.orders += placed.len();
        self.say(format!(
            "placed {} orders through HTTP in {} ms",
            placed.len(),
            started.elapsed().as_millis()
        ));
        Ok(())
    }

    async fn relay_outage(
        &mut self,
        plans: &[Plan],
        products: &[Product],
        users: &[User],
    ) -> anyhow::Result<()> {
        self.step(format!(
            "Fault: RabbitMQ unreachable from orders while {} orders are placed",
            plans.len()
        ));
        // Faults wait (and this waits for the one in progress): a replica starting now could
        // not declare its queues.
        let faults = self.faults.clone();
        let quiet = faults.quiet.lock().await;
        let link = self.links["orders"].clone();
        link.set_down(true);
        let placed = self.shop(plans, products, users, 1).await;
        let placed = match placed {
            Ok(placed) => placed,
            Err(e) => {
                link.set_down(false);
                return Err(e);
            }
        };
        self.figures.orders += placed.len();
        let ids: Vec<i64> = placed.iter().map(|o| o.id).collect();
        let pending_during: i64 = self.pools["orders"]
            .get()
            .await?
            .query_one(
                "SELECT count(*) FROM svcdb_outbox
                  WHERE published_at IS NULL
                    AND (envelope -> 'payload' ->> 'order_id')::bigint = ANY($1)",
                &[&ids],
            )
            .await?
            .get(0);
        self.outage_orders = ids;
        // The backlog only grows while the relays cannot publish: now it is at its peak. Any
        // replica answers for the service's outbox (the gauge is read from the database).
        let scrape = self
            .api
            .get(&format!("{}/metrics", self.fleet.url("orders")))
            .await?;
        let backlog = crate::report::gauge(
            &String::from_utf8_lossy(&scrape.body),
            "svcdb_outbox_backlog",
        );
        self.figures.outage_backlog_peak = backlog.unwrap_or(0.0) as i64;
        self.checks.check(
            "the orders service's /metrics show the outbox backlog during the outage",
            backlog.is_some_and(|b| b as i64 >= pending_during && b > 0.0),
            format!("svcdb_outbox_backlog {backlog:?} at the end of the outage, {pending_during} of them the outage's orders' events"),
        );
        self.say(format!(
            "placed {} orders: each POST /orders succeeded, because it only needs the database; {pending_during} events wait in the outbox",
            placed.len()
        ));
        link.set_down(false);
        drop(quiet);
        let back = Instant::now();
        let orders = self.pools["orders"].clone();
        let drained =
            wait_until(SETTLE, || async { matches!(pending(&orders).await, Ok(0)) }).await;
        self.figures.outage_drain_ms = back.elapsed().as_millis() as u64;
        self.say(format!(
            "RabbitMQ reachable again: the relays reconnected and the outbox drained within {} ms",
            self.figures.outage_drain_ms
        ));
        self.checks.check(
            "events written during a broker outage wait in the outbox and are published after it",
            pending_during == placed.len() as i64 && drained,
            format!(
                "{pending_during} of the {} orders' events waiting during the outage, drained = {drained}",
                placed.len()
            ),
        );
        Ok(())
    }

    async fn duplicates_and_poison(
        &mut self,
        plans: &[Plan],
        products: &[Product],
        users: &[User],
    ) -> anyhow::Result<()> {
        let copies = self.options.duplicates;
        self.reconnect_broker().await?;
        self.step(format!(
            "{} more orders, while {copies} copies of old OrderPlaced events and a malformed message arrive",
            plans.len()
        ));
        // Events already handled, as a producer retrying lost confirms would send them again.
        let envelopes: Vec<Envelope> = self.pools["orders"]
            .get()
            .await?
            .query(
                "SELECT envelope FROM svcdb_outbox
                  WHERE routing_key = $1 AND published_at IS NOT NULL ORDER BY id LIMIT 10",
                &[&OrderPlaced::ROUTING_KEY],
            )
            .await?
            .into_iter()
            .map(|r| serde_json::from_value(r.get(0)))
            .collect::<Result<_, _>>()?;
        let names = &self.deployment.names;
        let exchange = names.exchange("orders");
        let catalog_queue = names
            .queue("catalog", &catalog::SERVICE.subscriptions[0])
            .name;
        let (placed, copied, poisoned) = tokio::join!(
            self.shop(plans, products, users, self.options.shoppers),
            faults::publish_copies(
                &self.broker,
                &exchange,
                OrderPlaced::ROUTING_KEY,
                &envelopes,
                copies
            ),
            faults::publish_malformed(&self.broker, &catalog_queue, MALFORMED),
        );
        let placed = placed?;
        copied?;
        poisoned?;
        self.figures.orders += placed.len();
        self.figures.duplicates_injected = copies as u64;
        self.say(format!(
            "placed {} orders; published {copies} copies of {} handled OrderPlaced events to {exchange} (the catalog's and the cart's queues each get every copy)",
            placed.len(),
            envelopes.len().min(copies)
        ));
        self.say(format!(
            "published {:?} to {catalog_queue}",
            String::from_utf8_lossy(MALFORMED)
        ));
        Ok(())
    }

    /// Lets the fault injector finish, then waits (bounded) until every order is decided,
    /// every outbox drained, every event applied by each of its subscribers, and every queue
    /// has nothing ready.
    async fn settle(&mut self) -> anyhow::Result<()> {
        self.finish_chaos().await?;
        self.step("Faults injected");
        let log = self
            .faults
            .log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .join("\n");
        self.say(log);
        self.say(format!(
            "{} acknowledgements lost on the wire (the consumer's connection cut as it sent the ack, after its commit)",
            self.lost_acks.cuts()
        ));
        self.step(
            "Wait for the system to settle (every order decided, outboxes drained, every event applied, queues empty)",
        );
        self.reconnect_broker().await?;
        let started = Instant::now();
        let sources = Sources(&self.pools);
        let quiet = || async {
            let mut ready = 0;
            for def in SERVICES {
                for subscription in def.subscriptions {
                    let queue = self.deployment.names.queue(def.name, subscription);
                    ready += crate::report::ready(&self.broker, &queue.name)
                        .await
                        .unwrap_or(1);
                }
            }
            ready == 0
                && matches!(self.undecided().await, Ok(0))
                && matches!(crate::report::unapplied(&sources).await, Ok(0))
        };
        // "Nothing ready" can be a moment between two deliveries of one message: a duplicate
        // held unacknowledged by a consumer, or a lost ack's redelivery between the cut and the
        // consumer's reconnect (backoff up to 1 s). Settled is quiet twice, QUIET apart.
        let deadline = started + SETTLE;
        let mut settled = false;
        while Instant::now() < deadline
            && wait_until(deadline.saturating_duration_since(Instant::now()), quiet).await
        {
            tokio::time::sleep(QUIET).await;
            if quiet().await {
                settled = true;
                break;
            }
        }
        self.say(format!(
            "{} after {} ms",
            if settled { "settled" } else { "still busy" },
            started.elapsed().as_millis()
        ));
        if let Some(exited) = self.fleet.exited() {
            self.checks
                .check("every replica keeps running until stopped", false, exited);
        }
        Ok(())
    }

    /// Stops every replica gracefully: what a consumer still held is handled and acknowledged,
    /// or back in its queue for the check that follows. Acknowledgements are no longer lost.
    async fn stop_services(&mut self) {
        self.step("Stop every replica (SIGTERM: finish what is in flight, acknowledge, exit)");
        self.lost_acks.disable();
        let failures = self.fleet.stop().await;
        let total = self.options.replicas * SERVICES.len();
        self.say(format!(
            "{} replicas stopped{}",
            total,
            if failures.is_empty() {
                " cleanly".to_owned()
            } else {
                format!("; {}", failures.join("; "))
            }
        ));
        self.checks.check(
            "every replica stops gracefully when told to",
            failures.is_empty(),
            if failures.is_empty() {
                format!("{total} replicas exited 0 after SIGTERM")
            } else {
                failures.join("; ")
            },
        );
    }

    async fn invariants(&mut self, products: &[Product]) -> anyhow::Result<()> {
        self.step("Invariants, checked from the databases (each service's through its own role, on its own server) and the queues");
        let sources = Sources(&self.pools);
        self.figures.replicas = self.options.replicas;
        self.figures.replicas_killed = self.fleet.killed();
        self.figures.backends_killed = self.faults.backends_terminated.load(Ordering::Relaxed);
        self.figures.backend_kills = self.faults.backend_kills.load(Ordering::Relaxed);
        self.figures.broker_restarts = self.faults.broker_restarts.load(Ordering::Relaxed);
        self.figures.acks_lost = self.lost_acks.cuts();
        self.figures.duplicates_absorbed = self.lost_acks.repeated_acks();
        crate::report::audit(
            &mut self.checks,
            &mut self.figures,
            &sources,
            &self.broker,
            &self.deployment.names,
            products,
            &self.outage_orders,
        )
        .await?;
        crate::report::metrics_agree(
            &mut self.checks,
            &mut self.figures,
            &sources,
            &self.fleet.scraped(),
            &self.fleet.killed_services(),
        )
        .await?;
        self.checks.print();

        self.step("Figures");
        self.figures.http_requests = self.api.requests();
        self.figures.print();
        Ok(())
    }

    /// Stops the services (every process, gracefully if it still runs), then (unless --keep)
    /// drops the database, the roles, the exchanges and the queues.
    async fn clean_up(&mut self) -> anyhow::Result<()> {
        self.step(if self.options.keep {
            "Stop the services (--keep: the database and the broker objects stay)"
        } else {
            "Stop the services and remove everything the demo made"
        });
        if let Some((_, task)) = self.chaos.take() {
            task.abort();
            let _ = task.await;
        }
        let failures = self.fleet.stop().await;
        for failure in &failures {
            self.say(failure);
        }
        for pool in self.pools.values() {
            pool.close();
        }
        self.pools.clear();
        self.links.clear();
        let names = &self.deployment.names;
        if self.options.keep {
            for place in self.deployment.databases() {
                let schemas: Vec<&str> = SERVICES
                    .iter()
                    .filter(|def| self.deployment.place(def).same(place))
                    .map(|def| def.schema)
                    .collect();
                self.say(format!(
                    "{} -c '\\dn'   (schemas {}; each belongs to role {}_<service>)",
                    place.psql_command(),
                    schemas.join(", "),
                    names.namespace()
                ));
            }
            self.say(format!(
                "rabbitmqctl list_queues name messages | grep '^{}\\.'",
                names.namespace()
            ));
            self.say(format!(
                "remove it all with: shop clean --database {}{}",
                self.deployment.database,
                if self.deployment.is_one_database() {
                    ""
                } else {
                    " and the same --database-url-for"
                }
            ));
        } else {
            self.reconnect_broker().await?;
            let removed = remove_all(&self.deployment, &self.broker).await?;
            self.say(removed);
        }
        let _ = self.broker.close(200, "OK".into()).await;
        Ok(())
    }
}

/// A fault the injector fires while orders flow.
enum Fault {
    Kill(&'static str),
    Backends,
    BrokerRestart,
}

/// Terminates every connection of `roles` to `database` (and no one else's); how many.
async fn terminate_backends(
    admin: &svcdb::tokio_postgres::Config,
    database: &str,
    roles: &[String],
) -> anyhow::Result<u64> {
    let conn = svcdb::DedicatedConn::connect(admin).await?;
    let terminated: i64 = conn
        .query_one(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))
               FROM pg_stat_activity WHERE datname = $1 AND usename = ANY($2)",
            &[&database, &roles],
        )
        .await?
        .get(0);
    Ok(terminated as u64)
}

/// `rabbitmqctl stop_app`, then `start_app`: the broker's application restarts (connections
/// dropped, durable queues kept), the Erlang node stays up.
async fn restart_broker() -> anyhow::Result<()> {
    for action in ["stop_app", "start_app"] {
        let output = tokio::process::Command::new("rabbitmqctl")
            .arg(action)
            .output()
            .await
            .context("running rabbitmqctl (--broker-restart needs it on PATH, with the rights to control the broker)")?;
        if !output.status.success() {
            bail!(
                "rabbitmqctl {action} failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
    }
    Ok(())
}

/// Unpublished rows in a service's outbox.
async fn pending(db: &ServiceDb) -> anyhow::Result<i64> {
    Ok(db
        .get()
        .await?
        .query_one(
            "SELECT count(*) FROM svcdb_outbox WHERE published_at IS NULL",
            &[],
        )
        .await?
        .get(0))
}

/// POSTs `body`, sending it again (up to 20 times in all, pausing a little longer each time)
/// when the request fails on the way or the service answers 5xx: the replica behind the front
/// may have just been killed, or its database connection terminated.
async fn post_retrying<B: serde::Serialize>(
    api: &ApiClient,
    url: &str,
    body: &B,
) -> anyhow::Result<Response> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let outcome = api.post(url, body).await;
        let retry = match &outcome {
            Ok(response) => response.status.is_server_error(),
            Err(_) => true,
        };
        if !retry || attempt >= 20 {
            return outcome;
        }
        tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
    }
}

/// Removes what a demo made for `deployment`: its exchanges and queues (dead letters
/// included), its database and its roles. What is already gone is skipped. Says what it did.
async fn remove_all(deployment: &Deployment, broker: &Connection) -> anyhow::Result<String> {
    // Refuses a database the demo did not make before touching the broker.
    deployment.ensure_demo_made().await?;
    let mut queues = 0;
    for def in SERVICES {
        let topology = deployment.names.topology(def);
        queues += topology.queues.len() * 2;
        topology.delete(broker).await?;
    }
    let existed = deployment.drop(&SERVICES).await?;
    let roles = SERVICES.len();
    let databases: Vec<String> = deployment
        .databases()
        .iter()
        .map(|place| format!("database {} on {}", place.database, place.server()))
        .collect();
    let databases = databases.join(" and ");
    Ok(if existed {
        format!("removed {databases}, the {roles} roles, and {queues} queues with their exchanges")
    } else {
        format!(
            "removed {queues} queues with their exchanges and any of the {roles} roles ({databases}: already gone)"
        )
    })
}

/// `shop clean`: removes what `shop demo --keep` (or a killed demo) left behind.
pub async fn clean(
    admin_url: &str,
    amqp_url: &str,
    database: &str,
    placements: &[Placement],
) -> anyhow::Result<()> {
    let deployment = Deployment::new(admin_url, database, None, &SERVICES, placements)?;
    let broker = AmqpConfig::new(amqp_url)
        .with_connection_name("shop clean")
        .connect()
        .await?;
    let removed = remove_all(&deployment, &broker).await;
    let _ = broker.close(200, "OK".into()).await;
    println!("{}", removed?);
    Ok(())
}

/// Polls `condition` every 50 ms until it holds (`true`) or `within` passed (`false`).
pub async fn wait_until<F, Fut>(within: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
