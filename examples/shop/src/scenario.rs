//! `shop demo`: the design notes' "How it all fits together", run for real with faults
//! injected, narrated step by step, and checked.
//!
//! 1. Provision one database, a role and schema per service; start users, catalog and cart.
//! 2. Deploy orders without its migrations (the notes' 9 AM incident): the gate refuses.
//! 3. The orders role reads the catalog's table: permission denied.
//! 4. Seed products and users; the cart learns the users from `UserRegistered`.
//! 5. Deploy a catalog release whose third migration fails: the schema is left as it was.
//! 6. Shoppers place orders through HTTP while the catalog's consumer crashes after a commit.
//! 7. RabbitMQ becomes unreachable from orders while more orders are placed.
//! 8. More orders, while old `OrderPlaced` events are published again and again and a malformed
//!    message lands in the catalog's queue.
//! 9. Wait for every order to be decided, then check the invariants (see [`crate::report`]).

use std::collections::HashMap;
use std::fmt::Display;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures_util::{StreamExt, TryStreamExt};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use svcdb::migrate::{MigrateError, Migrator};
use svcdb::{Envelope, Problem, SqlState};
use svcdb_amqp::lapin::Connection;
use svcdb_amqp::AmqpConfig;

use crate::cart::{Cart, NewCart};
use crate::catalog::{NewProduct, Product};
use crate::client::ApiClient;
use crate::deploy::Deployment;
use crate::events::{Event, Line, OrderPlaced};
use crate::faults::{self, Faults, Link};
use crate::orders::{Order, PlaceOrder};
use crate::platform::{self, Launch, Running, ServiceDef, Tuning};
use crate::report::{Checks, Figures, Report};
use crate::users::{Registration, User};
use crate::{cart, catalog, orders, users};

/// The four services, in the order they start (orders calls cart's API, so cart comes first).
pub const SERVICES: [&ServiceDef; 4] = [
    &users::SERVICE,
    &catalog::SERVICE,
    &cart::SERVICE,
    &orders::SERVICE,
];

/// What a malformed producer wrote: an `OrderPlaced` cut off mid-object, not an envelope.
pub const MALFORMED: &[u8] = br#"{"kind": "OrderPlaced", "order_id": 4"#;

/// The longest the demo waits for the system to settle after each phase.
const SETTLE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub admin_url: String,
    pub amqp_url: String,
    pub database: String,
    pub service_password: Option<String>,
    pub orders: usize,
    pub duplicates: usize,
    pub shoppers: usize,
    pub seed: u64,
    pub keep: bool,
}

/// Runs the demo and cleans up after it (unless `keep`), whatever happened. `Err` only when
/// the demo could not run (no database, no broker); invariants that fail are in the report.
pub async fn run(options: DemoOptions) -> anyhow::Result<Report> {
    let started = Instant::now();
    let deployment = Deployment::new(
        &options.admin_url,
        &options.database,
        options.service_password.clone(),
    )?;
    let amqp = AmqpConfig::new(&options.amqp_url).with_connection_name("shop demo (operator)");
    println!(
        "shop demo: users, catalog, cart and orders on one PostgreSQL database and RabbitMQ, with faults injected"
    );
    println!(
        "  database {} on {}, broker {}; {} orders, {} duplicate copies",
        deployment.database,
        deployment.server(),
        amqp.redacted_url(),
        options.orders,
        options.duplicates
    );
    let broker = amqp
        .connect()
        .await
        .context("the demo needs RabbitMQ (run scripts/services, or pass --amqp-url)")?;
    let mut demo = Demo {
        options,
        deployment,
        broker,
        faults: Arc::new(Faults::default()),
        api: ApiClient::new(),
        links: HashMap::new(),
        running: Vec::new(),
        checks: Checks::default(),
        figures: Figures::default(),
        step: 0,
        phase_c_started: None,
    };
    let outcome = demo.scenario().await;
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

struct Demo {
    options: DemoOptions,
    deployment: Deployment,
    /// The operator's own connection to the broker (clean-up, injected messages, DLQ checks).
    broker: Connection,
    faults: Arc<Faults>,
    api: ApiClient,
    links: HashMap<&'static str, Arc<Link>>,
    running: Vec<Running>,
    checks: Checks,
    figures: Figures,
    step: usize,
    /// When the last phase of orders began (its time counts until the system settled).
    phase_c_started: Option<Instant>,
}

impl Demo {
    fn step(&mut self, title: impl Display) {
        self.step += 1;
        println!("\n[{}] {title}", self.step);
    }

    fn say(&self, text: impl Display) {
        for line in text.to_string().lines() {
            println!("    {line}");
        }
    }

    fn service(&self, name: &str) -> &Running {
        self.running
            .iter()
            .find(|r| r.def.name == name)
            .unwrap_or_else(|| panic!("{name} is running"))
    }

    async fn scenario(&mut self) -> anyhow::Result<()> {
        self.provision().await?;
        self.start_services().await?;
        self.orders_without_migrations().await?;
        self.cross_service_read().await?;
        let (products, users) = self.seed().await?;
        self.failing_release().await?;

        let plans = self.plans(products.len(), users.len());
        let phase_a = plans.len() * 2 / 5;
        let phase_b = plans.len() / 5;
        let (a, rest) = plans.split_at(phase_a);
        let (b, c) = rest.split_at(phase_b);
        self.orders_with_a_crash(a, &products, &users).await?;
        self.relay_outage(b, &products, &users).await?;
        self.duplicates_and_poison(c, &products, &users).await?;
        self.settle().await;
        self.invariants(&products).await?;
        Ok(())
    }

    async fn provision(&mut self) -> anyhow::Result<()> {
        self.step("Provision: one database; per service a login role that owns its schema, nothing for PUBLIC");
        let existed = self.deployment.recreate(&SERVICES).await?;
        self.say(format!(
            "database {}: {}",
            self.deployment.database,
            if existed {
                "dropped the previous run's database and roles, created it anew"
            } else {
                "created"
            }
        ));
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

    /// The launch of `def` as the demo runs it: its own role, its own link to the broker.
    async fn launch(&mut self, def: &'static ServiceDef, migrate: bool) -> anyhow::Result<Launch> {
        let link = match self.links.get(def.name) {
            Some(link) => link.clone(),
            None => {
                let link =
                    Arc::new(Link::open(faults::broker_address(&self.options.amqp_url)?).await?);
                self.faults.add_link(def.name, link.clone());
                self.links.insert(def.name, link.clone());
                link
            }
        };
        // A prefetch below the pool's size: a consumer handles at most min(prefetch, pool)
        // messages at once, and the HTTP handlers and the relay need connections too.
        let amqp = AmqpConfig::new(link.url(&self.options.amqp_url)?)
            .with_connection_name(format!("shop/{}", def.name))
            .with_prefetch(4);
        let mut peers = HashMap::new();
        if let Some(cart) = self.running.iter().find(|r| r.def.name == "cart") {
            peers.insert("cart", cart.url(""));
        }
        Ok(Launch {
            def,
            db: self.deployment.service_config(def)?,
            amqp,
            names: Arc::new(self.deployment.names.clone()),
            peers,
            faults: self.faults.clone(),
            http: self.api.clone(),
            listen: "127.0.0.1:0".parse()?,
            migrate,
            tuning: Tuning::demo(),
        })
    }

    async fn start(&mut self, def: &'static ServiceDef) -> anyhow::Result<()> {
        let launch = self.launch(def, true).await?;
        let started = platform::start(launch).await?;
        let migrations = started
            .migrations
            .as_ref()
            .map(|m| {
                let names: Vec<String> = m
                    .migrations
                    .iter()
                    .map(|e| format!("{:04} {}", e.version, e.name))
                    .collect();
                format!("migrated ({})", names.join(", "))
            })
            .unwrap_or_default();
        self.say(format!(
            "{:<8} {migrations}; gate {}; {}",
            def.name,
            started.gate,
            started.service.url("")
        ));
        self.running.push(started.service);
        Ok(())
    }

    async fn start_services(&mut self) -> anyhow::Result<()> {
        self.step("Start users, catalog and cart: each as its own role, migrate, pass the start-up gate, serve");
        for def in &SERVICES[..3] {
            self.start(def).await?;
        }
        Ok(())
    }

    async fn orders_without_migrations(&mut self) -> anyhow::Result<()> {
        self.step("Fault: orders deployed without its migrations (the notes' 9 AM incident)");
        let launch = self.launch(&orders::SERVICE, false).await?;
        let refused = match platform::start(launch).await {
            Ok(started) => {
                started.service.stop().await?;
                None
            }
            Err(e) => match e.downcast_ref::<svcdb::Error>() {
                Some(svcdb::Error::NotReady(report)) => Some(report.clone()),
                _ => return Err(e),
            },
        };
        match &refused {
            Some(report) => {
                self.say("the start-up gate refused to take traffic, before the first customer:");
                self.say(format!("  {}", report.to_string().replace('\n', "\n  ")));
            }
            None => self.say("the service started without its tables!"),
        }
        let problems = refused
            .as_ref()
            .map(|r| r.problems.as_slice())
            .unwrap_or(&[]);
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
            never_migrated && missing == ["orders", "order_lines"],
            format!(
                "{} problems: migrations never ran = {never_migrated}, missing tables {missing:?}",
                problems.len()
            ),
        );
        self.say("deploying again, this time with its migrations:");
        self.start(&orders::SERVICE).await?;
        let readyz = self.api.get(&self.service("orders").url("/readyz")).await?;
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

    async fn cross_service_read(&mut self) -> anyhow::Result<()> {
        self.step("Fault: the orders service reads the catalog's table directly");
        let conn = self.service("orders").db.get().await?;
        let attempt = conn
            .query("SELECT id, stock FROM catalog_schema.products", &[])
            .await;
        let (ok, detail) = match attempt {
            Ok(rows) => (false, format!("it read {} rows", rows.len())),
            Err(e) => {
                let code = e.code().map(|c| c.code().to_owned()).unwrap_or_default();
                self.say(format!(
                    "SELECT … FROM catalog_schema.products as role {} → {}",
                    self.deployment.names.role("orders"),
                    svcdb::error::pg_message(&e)
                ));
                self.say("PostgreSQL enforces the boundary: each schema belongs to its service's role, PUBLIC gets nothing");
                (
                    e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE),
                    format!("SQLSTATE {code}"),
                )
            }
        };
        self.checks.check(
            "another service's schema answers permission denied (42501)",
            ok,
            detail,
        );
        Ok(())
    }

    /// Products (with stock sized so the late orders run some of them out) and users.
    async fn seed(&mut self) -> anyhow::Result<(Vec<Product>, Vec<User>)> {
        self.step("Seed through the APIs: products with stock, users (UserRegistered → cart)");
        let n = self.options.orders as f64;
        let catalog = self.service("catalog").url("/products");
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
        let users_url = self.service("users").url("/users");
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
        let cart = self.service("cart");
        wait_until(SETTLE, || async {
            cart.stats("customers").handled >= count as u64
        })
        .await;
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
        let db = self.service("catalog").db.clone();
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
            .get(&self.service("catalog").url("/readyz"))
            .await?;
        self.say(format!(
            "the running catalog (release 1) never noticed: GET /readyz → {}",
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

    /// Places `plans` through the APIs, `shoppers` at a time: open a cart, add the items,
    /// place the order.
    async fn shop(
        &self,
        plans: &[Plan],
        products: &[Product],
        users: &[User],
        shoppers: usize,
    ) -> anyhow::Result<Vec<Order>> {
        let carts = self.service("cart").url("/carts");
        let orders = self.service("orders").url("/orders");
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
            async move {
                let cart: Cart = api.post(&carts, &NewCart { user_id }).await?.json()?;
                for line in &lines {
                    api.post(&format!("{carts}/{}/items", cart.id), line)
                        .await?
                        .json::<Cart>()?;
                }
                let response = api.post(&orders, &PlaceOrder { cart_id: cart.id }).await?;
                if response.status != axum::http::StatusCode::CREATED {
                    bail!(
                        "POST /orders answered {}: {}",
                        response.status,
                        response.error_text()
                    );
                }
                response.json::<Order>()
            }
        };
        let placed: Vec<Order> = futures_util::stream::iter(plans)
            .map(shop_one)
            .buffer_unordered(shoppers.max(1))
            .try_collect()
            .await?;
        Ok(placed)
    }

    /// Waits until every order is confirmed or rejected; returns how many are not.
    async fn wait_for_decisions(&self, within: Duration) -> anyhow::Result<usize> {
        let url = self.service("orders").url("/orders");
        let undecided = || async {
            match self
                .api
                .get(&url)
                .await
                .and_then(|r| r.json::<Vec<Order>>())
            {
                Ok(orders) => orders.iter().filter(|o| o.status == "placed").count(),
                Err(_) => usize::MAX,
            }
        };
        wait_until(within, || async { undecided().await == 0 }).await;
        Ok(undecided().await)
    }

    async fn orders_with_a_crash(
        &mut self,
        plans: &[Plan],
        products: &[Product],
        users: &[User],
    ) -> anyhow::Result<()> {
        let shoppers = self.options.shoppers;
        self.step(format!(
            "{} orders, {shoppers} shoppers at a time; fault: the catalog's consumer crashes after a commit, before its ack",
            plans.len()
        ));
        self.faults.arm_crash_after_commit("catalog", 1);
        let started = Instant::now();
        let placed = self.shop(plans, products, users, shoppers).await?;
        let placing = started.elapsed();
        let undecided = self.wait_for_decisions(SETTLE).await?;
        self.figures.orders += placed.len();
        self.figures.measured_orders += placed.len();
        self.figures.measured_ms += started.elapsed().as_millis() as u64;
        self.say(format!(
            "placed {} orders through HTTP in {} ms; all decided after {} ms ({undecided} undecided)",
            placed.len(),
            placing.as_millis(),
            started.elapsed().as_millis()
        ));
        let crashes = self.faults.crashes();
        // The crashed delivery's order is decided already (its answer committed with it); its
        // redelivery arrives once the consumer has reconnected.
        let redelivered = wait_until(SETTLE, || async {
            self.service("catalog").stats("reserve-stock").duplicates >= 1
        })
        .await;
        let catalog = self.service("catalog").stats("reserve-stock");
        match crashes.first() {
            Some(crash) => {
                let order = self.order_of_event(crash.event_id).await?;
                self.say(format!(
                    "{} handled {} {} (order {order}), then its connection to RabbitMQ dropped while the transaction committed: the ack was lost",
                    crash.service, crash.kind, crash.event_id
                ));
                self.say(format!(
                    "RabbitMQ redelivered it, and the messages in flight with it, to the reconnected consumer: {} redeliveries met their committed claims and changed nothing",
                    catalog.duplicates
                ));
            }
            None => self.say("the armed crash never happened"),
        }
        self.figures.crash_redeliveries = catalog.duplicates;
        self.checks.check(
            "a consumer crash between commit and ack is absorbed by the claim",
            crashes.len() == 1 && redelivered && undecided == 0,
            format!(
                "{} crash, {} redeliveries absorbed, {undecided} orders undecided",
                crashes.len(),
                catalog.duplicates
            ),
        );
        Ok(())
    }

    /// The order an `OrderPlaced` event was about, from the orders service's outbox.
    async fn order_of_event(&self, event_id: uuid::Uuid) -> anyhow::Result<i64> {
        let row = self
            .service("orders")
            .db
            .get()
            .await?
            .query_one(
                "SELECT (envelope -> 'payload' ->> 'order_id')::bigint FROM svcdb_outbox WHERE id = $1",
                &[&event_id],
            )
            .await?;
        Ok(row.get(0))
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
        let link = self.links["orders"].clone();
        link.set_down(true);
        // Let the relay notice first, so the narrative shows it disconnected.
        wait_until(Duration::from_secs(5), || async {
            !self.service("orders").relay_status().connected
        })
        .await;
        let started = Instant::now();
        let placed = self.shop(plans, products, users, 1).await?;
        self.figures.orders += placed.len();
        let orders = self.service("orders");
        let ids: Vec<i64> = placed.iter().map(|o| o.id).collect();
        let pending_during: i64 = orders
            .db
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
        let status = orders.relay_status();
        self.say(format!(
            "placed {} orders: each POST /orders answered 201, because it only needs the database",
            placed.len()
        ));
        self.say(format!(
            "outbox: {pending_during} events waiting; relay connected = {}, last error: {}",
            status.connected,
            status
                .last_error
                .as_deref()
                .and_then(|e| e.lines().next())
                .unwrap_or("none")
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;
        link.set_down(false);
        let back = Instant::now();
        let drained = wait_until(SETTLE, || async {
            matches!(self.service("orders").outbox_pending().await, Ok(0))
        })
        .await;
        self.figures.outage_drain_ms = back.elapsed().as_millis() as u64;
        self.say(format!(
            "RabbitMQ reachable again: the relay reconnected and published all {pending_during} within {} ms",
            self.figures.outage_drain_ms
        ));
        let undecided = self.wait_for_decisions(SETTLE).await?;
        self.say(format!(
            "and the orders were decided ({undecided} undecided) {} ms after the outage began",
            started.elapsed().as_millis()
        ));
        self.checks.check(
            "events written during a broker outage wait in the outbox and are published after it",
            pending_during == placed.len() as i64 && drained && undecided == 0,
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
        self.step(format!(
            "{} more orders, while {copies} copies of old OrderPlaced events and a malformed message arrive",
            plans.len()
        ));
        // Events already handled, as a producer retrying lost confirms would send them again.
        let envelopes: Vec<Envelope> = self
            .service("orders")
            .db
            .get()
            .await?
            .query(
                "SELECT envelope FROM svcdb_outbox WHERE routing_key = $1 ORDER BY id LIMIT 10",
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
        let started = Instant::now();
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
        self.figures.measured_orders += placed.len();
        self.phase_c_started = Some(started);
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

    /// Waits (bounded) until every order is decided, every outbox drained and every consumer
    /// has seen every delivery, including the injected ones.
    async fn settle(&mut self) {
        self.step(
            "Wait for the system to settle (every order decided, outboxes drained, queues empty)",
        );
        let started = Instant::now();
        let expected = self.figures.orders as u64 + self.figures.duplicates_injected;
        let settled = wait_until(SETTLE, || async {
            let catalog = self.service("catalog").stats("reserve-stock");
            let cart = self.service("cart").stats("checkout");
            let mut drained = true;
            for service in &self.running {
                drained &= matches!(service.outbox_pending().await, Ok(0));
            }
            drained
                && catalog.handled + catalog.duplicates + catalog.dead_lettered > expected
                && cart.handled + cart.duplicates >= expected
                && matches!(self.wait_for_decisions(Duration::ZERO).await, Ok(0))
        })
        .await;
        if let Some(phase_c) = self.phase_c_started.take() {
            self.figures.measured_ms += phase_c.elapsed().as_millis() as u64;
        }
        self.say(format!(
            "{} after {} ms",
            if settled { "settled" } else { "still busy" },
            started.elapsed().as_millis()
        ));
        for service in &mut self.running {
            if let Some(failure) = service.failure() {
                self.checks.check(
                    format!("{} keeps running", service.def.name),
                    false,
                    failure,
                );
            }
        }
    }

    async fn invariants(&mut self, products: &[Product]) -> anyhow::Result<()> {
        self.step("Invariants, checked by an auditor who reads every schema as the admin");
        let admin = self.deployment.admin().await?;
        crate::report::audit(
            &mut self.checks,
            &mut self.figures,
            &admin,
            &self.broker,
            &self.deployment.names,
            &self.running,
            products,
        )
        .await?;
        self.checks.print();

        self.step("Figures");
        self.figures.http_requests = self.api.requests();
        for service in &self.running {
            let stats = service.total_stats();
            self.figures.events_handled += stats.handled;
            self.figures.duplicates_absorbed += stats.duplicates;
            self.figures.dead_lettered += stats.dead_lettered;
            self.figures.events_published += service.relay_status().published;
        }
        self.figures.print();
        Ok(())
    }

    /// Stops the services, then (unless --keep) drops the database, the roles, the exchanges
    /// and the queues.
    async fn clean_up(&mut self) -> anyhow::Result<()> {
        self.step(if self.options.keep {
            "Stop the services (--keep: the database and the broker objects stay)"
        } else {
            "Stop the services and remove everything the demo made"
        });
        let mut first_error = None;
        while let Some(service) = self.running.pop() {
            if let Err(e) = service.stop().await {
                first_error.get_or_insert(e);
            }
        }
        self.links.clear();
        let names = &self.deployment.names;
        if self.options.keep {
            self.say(format!(
                "{} -c 'TABLE orders_schema.orders'   (each schema belongs to role {}_<service>)",
                self.deployment.psql_command(),
                names.namespace()
            ));
            self.say(format!(
                "rabbitmqctl list_queues name messages | grep '^{}\\.'",
                names.namespace()
            ));
            self.say(format!(
                "remove it all with: shop clean --database {}",
                self.deployment.database
            ));
        } else {
            let removed = remove_all(&self.deployment, &self.broker).await?;
            self.say(removed);
        }
        let _ = self.broker.close(200, "OK".into()).await;
        first_error.map_or(Ok(()), Err)
    }
}

/// Removes what a demo made for `deployment`: its exchanges and queues (dead letters
/// included), its database and its roles. What is already gone is skipped. Says what it did.
async fn remove_all(deployment: &Deployment, broker: &Connection) -> anyhow::Result<String> {
    let mut queues = 0;
    for def in SERVICES {
        let topology = deployment.names.topology(def);
        queues += topology.queues.len() * 2;
        topology.delete(broker).await?;
    }
    let existed = deployment.drop(&SERVICES).await?;
    let roles = SERVICES.len();
    Ok(if existed {
        format!(
            "removed database {}, its {roles} roles, and {queues} queues with their exchanges",
            deployment.database
        )
    } else {
        format!(
            "removed {queues} queues with their exchanges and any of the {roles} roles (database {} was already gone)",
            deployment.database
        )
    })
}

/// `shop clean`: removes what `shop demo --keep` (or a killed demo) left behind.
pub async fn clean(admin_url: &str, amqp_url: &str, database: &str) -> anyhow::Result<()> {
    let deployment = Deployment::new(admin_url, database, None)?;
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
