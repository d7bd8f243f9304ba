//! The demo's verdict: the invariants, the measured figures, and the JSON summary.
//!
//! The auditor reads each service's state through that service's own connection (its role,
//! on its server: see [`Sources`]), and joins what the services hold here, never in SQL: the
//! services may live in different databases or on different servers, where no query reaches
//! two of them. (Through a service's role, one that tried would be refused even in one
//! database: another service's schema answers permission denied.)

use std::collections::{HashMap, HashSet};

use anyhow::Context as _;
use serde::Serialize;
use svcdb::tokio_postgres::types::ToSql;
use svcdb::tokio_postgres::Row;
use svcdb::ServiceDb;
use svcdb_amqp::lapin::options::{BasicGetOptions, QueueDeclareOptions};
use svcdb_amqp::lapin::types::{AMQPValue, FieldTable};
use svcdb_amqp::lapin::Connection;
use uuid::Uuid;

use crate::catalog::Product;
use crate::events::MALFORMED;
use crate::platform::Names;
use crate::services::SERVICES;

/// One invariant and whether it held.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Default, Clone, Serialize)]
#[serde(transparent)]
pub struct Checks(Vec<Check>);

impl Checks {
    pub fn check(&mut self, name: impl Into<String>, ok: bool, detail: impl Into<String>) {
        self.0.push(Check {
            name: name.into(),
            ok,
            detail: detail.into(),
        });
    }

    pub fn all_ok(&self) -> bool {
        !self.0.is_empty() && self.0.iter().all(|c| c.ok)
    }

    pub fn failed(&self) -> usize {
        self.0.iter().filter(|c| !c.ok).count()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn print(&self) {
        for check in &self.0 {
            let mark = if check.ok { "✓" } else { "✗ FAILED:" };
            println!("    {mark} {}", check.name);
            println!("        {}", check.detail);
        }
    }
}

/// What the demo measured. Everything that proves an invariant is read from the databases
/// and the queues, never from counters the demo or the services keep.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Figures {
    pub users: usize,
    /// Orders placed through `POST /orders`.
    pub orders: usize,
    pub confirmed: i64,
    pub rejected: i64,
    pub undecided: i64,
    /// Copies of handled `OrderPlaced` events published on purpose.
    pub duplicates_injected: u64,
    /// Deliveries acknowledged for messages already acknowledged once (the copies, the
    /// redeliveries after lost acks, kills and cut connections), as seen on the wire.
    pub duplicates_absorbed: u64,
    /// Events some subscriber never applied (from the databases: each event joined with the
    /// effect that names it).
    pub lost_events: i64,
    /// Effects applied more than once for one event (answers, reservations).
    pub wrong_state_changes: i64,
    /// Products whose stock does not balance.
    pub stock_mismatches: i64,
    /// Processes per service.
    pub replicas: usize,
    pub replicas_killed: u64,
    /// Database connections terminated, in `backend_kills` rounds.
    pub backends_killed: u64,
    pub backend_kills: u64,
    pub broker_restarts: u64,
    /// Acknowledgements lost on the wire.
    pub acks_lost: u64,
    /// Orders placed and decided per second, outside the broker outage.
    pub orders_per_s: f64,
    /// From placement to decision, from the orders' timestamps (outage orders left out).
    pub order_latency_p50_ms: f64,
    pub order_latency_p99_ms: f64,
    /// Events in the outboxes (each published at least once).
    pub events_published: i64,
    pub dead_lettered: usize,
    pub outbox_unpublished: i64,
    pub http_requests: u64,
    /// From the broker coming back to the outbox drained.
    pub outage_drain_ms: u64,
    /// The orders service's `svcdb_outbox_backlog` (from its `/metrics`) at the end of the
    /// broker outage, when it peaks.
    pub outage_backlog_peak: i64,
    /// Orders of the phases without an outage and the time they took (placing, and waiting
    /// for every decision): the throughput figure.
    pub measured_orders: usize,
    pub measured_ms: u64,
    pub elapsed_ms: u64,
    /// Each subscribing service's handled and duplicate counts, as its replicas' `/metrics`
    /// reported them, and its claims in the database.
    pub metrics: std::collections::BTreeMap<&'static str, ServiceCounts>,
    /// Stock at seeding, by product id.
    #[serde(skip)]
    pub initial_stock: HashMap<i64, i32>,
}

impl Figures {
    pub fn print(&self) {
        println!(
            "    orders: {} placed, {} confirmed, {} rejected (out of stock), {} undecided",
            self.orders, self.confirmed, self.rejected, self.undecided
        );
        println!(
            "    events: {} in the outboxes; {} lost, {} applied twice (from the databases)",
            self.events_published, self.lost_events, self.wrong_state_changes
        );
        println!(
            "    duplicate deliveries acknowledged: {} ({} copies injected, reaching 2 queues each; the rest redeliveries)",
            self.duplicates_absorbed, self.duplicates_injected
        );
        println!(
            "    faults: {} replicas killed and replaced (of {} per service), {} backends terminated in {} rounds, {} acknowledgements lost, {} broker restarts",
            self.replicas_killed, self.replicas, self.backends_killed, self.backend_kills, self.acks_lost, self.broker_restarts
        );
        println!(
            "    dead-lettered: {}; outbox rows unpublished: {}; HTTP requests: {}",
            self.dead_lettered, self.outbox_unpublished, self.http_requests
        );
        println!(
            "    throughput: {:.0} orders/s placed and decided end to end ({} orders in {} ms; 4 HTTP calls and 3 events each)",
            self.orders_per_s, self.measured_orders, self.measured_ms
        );
        println!(
            "    order latency, placed → decided: p50 {:.0} ms, p99 {:.0} ms",
            self.order_latency_p50_ms, self.order_latency_p99_ms
        );
        println!(
            "    outage: the orders outbox's backlog peaked at {} rows (/metrics); it drained {} ms after RabbitMQ was reachable again",
            self.outage_backlog_peak, self.outage_drain_ms
        );
        for (service, counts) in &self.metrics {
            println!(
                "    /metrics of {service}: {} handled, {} duplicates absorbed; {} claims in its database",
                counts.scraped.handled, counts.scraped.duplicates, counts.claims
            );
        }
    }
}

/// A service's consumer counts as its replicas' `/metrics` reported them, summed over its
/// queues and replicas.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Scraped {
    /// `svcdb_consumer_messages_total{outcome="handled"}`.
    pub handled: u64,
    /// `svcdb_consumer_messages_total{outcome="duplicate"}`.
    pub duplicates: u64,
}

impl Scraped {
    /// The counts in one scrape (Prometheus text format), summed over its queues.
    pub fn parse(text: &str) -> Self {
        let mut counts = Self::default();
        for line in text.lines() {
            let Some(labels) = line
                .strip_prefix("svcdb_consumer_messages_total{")
                .and_then(|rest| rest.split_once('}'))
            else {
                continue;
            };
            let (labels, value) = labels;
            let value = value.trim().parse::<f64>().unwrap_or(0.0) as u64;
            if labels.contains(r#"outcome="handled""#) {
                counts.handled += value;
            } else if labels.contains(r#"outcome="duplicate""#) {
                counts.duplicates += value;
            }
        }
        counts
    }

    pub fn add(&mut self, other: Scraped) {
        self.handled += other.handled;
        self.duplicates += other.duplicates;
    }
}

/// The value of the first series named `name` in a scrape (Prometheus text format).
pub fn gauge(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let metric = series.split_once('{').map_or(series, |(m, _)| m);
        (metric == name).then(|| value.parse().ok()).flatten()
    })
}

/// A service's scraped counts beside its claims (one per event it handled) in its database.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct ServiceCounts {
    #[serde(flatten)]
    pub scraped: Scraped,
    pub claims: i64,
}

/// Checks that what each subscribing service's `/metrics` counted as handled agrees with its
/// claims in the database: equal, or (for a service that lost a replica to SIGKILL, whose
/// last events after its last scrape went uncounted) never more.
pub async fn metrics_agree(
    checks: &mut Checks,
    figures: &mut Figures,
    sources: &Sources<'_>,
    scraped: &HashMap<&'static str, Scraped>,
    killed: &std::collections::HashSet<&'static str>,
) -> anyhow::Result<()> {
    for def in SERVICES.iter().filter(|d| !d.subscriptions.is_empty()) {
        let claims: i64 = sources
            .one(def.name, "SELECT count(*) FROM svcdb_processed_events", &[])
            .await?
            .get(0);
        let counts = ServiceCounts {
            scraped: scraped.get(def.name).copied().unwrap_or_default(),
            claims,
        };
        figures.metrics.insert(def.name, counts);
        let handled = i64::try_from(counts.scraped.handled).unwrap_or(i64::MAX);
        let (ok, expected) = if killed.contains(def.name) {
            (
                handled <= claims,
                "at most as many (a replica was killed after its last scrape)",
            )
        } else {
            (handled == claims, "as many")
        };
        checks.check(
            format!("{}'s /metrics agree with its database", def.name),
            ok,
            format!(
                "{handled} events handled per /metrics, {claims} claims in {}.svcdb_processed_events (expected: {expected}); {} duplicates absorbed",
                def.schema, counts.scraped.duplicates
            ),
        );
    }
    Ok(())
}

/// The summary `--json` prints as the last line.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub ok: bool,
    pub database: String,
    #[serde(flatten)]
    pub figures: Figures,
    pub checks: Checks,
}

impl Report {
    pub fn new(checks: Checks, figures: Figures, database: String) -> Self {
        Self {
            ok: checks.all_ok(),
            database,
            figures,
            checks,
        }
    }
}

/// Each service's own pool (its role, pinned to its schema, on its server), by service name:
/// what the auditor reads each service's state through.
pub struct Sources<'a>(pub &'a HashMap<&'static str, ServiceDb>);

impl Sources<'_> {
    /// Runs `sql` on `service`'s connection.
    async fn query(
        &self,
        service: &str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> anyhow::Result<Vec<Row>> {
        let db = self
            .0
            .get(service)
            .with_context(|| format!("no connection to the {service} service's database"))?;
        db.get()
            .await?
            .query(sql, params)
            .await
            .with_context(|| format!("reading the {service} service's database"))
    }

    /// Runs `sql`, which returns one row, on `service`'s connection.
    async fn one(
        &self,
        service: &str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> anyhow::Result<Row> {
        self.query(service, sql, params)
            .await?
            .into_iter()
            .next()
            .with_context(|| format!("no row from the {service} service's database"))
    }
}

/// Whether the events between the services were applied, from the effects that name them: the
/// catalog's answer (its causation id), the cart's `checked_out_by`, the order's `decided_by`,
/// the cart's customer row. Each side read from its own service's database.
struct Applied {
    /// Not applied: OrderPlaced by catalog, by cart; answers by orders; UserRegistered by cart.
    lost: [i64; 4],
    /// OrderPlaced events answered more than once (the extra answers).
    answers_twice: i64,
    /// Order lines reserved more than once (the extra reservations).
    reserved_twice: i64,
}

impl Applied {
    async fn read(sources: &Sources<'_>) -> anyhow::Result<Self> {
        let placed: Vec<(Uuid, i64)> = sources
            .query(
                "orders",
                "SELECT id, (envelope -> 'payload' ->> 'cart_id')::bigint
                   FROM svcdb_outbox WHERE routing_key = 'order.placed'",
                &[],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let answers = sources
            .query(
                "catalog",
                "SELECT id, (envelope ->> 'causation_id')::uuid,
                        (envelope -> 'payload' ->> 'order_id')::bigint
                   FROM svcdb_outbox",
                &[],
            )
            .await?;
        let mut answers_by_cause: HashMap<Uuid, i64> = HashMap::new();
        let mut answers_by_order: HashMap<i64, HashSet<Uuid>> = HashMap::new();
        for row in &answers {
            if let Some(cause) = row.get::<_, Option<Uuid>>(1) {
                *answers_by_cause.entry(cause).or_default() += 1;
            }
            if let Some(order) = row.get::<_, Option<i64>>(2) {
                answers_by_order
                    .entry(order)
                    .or_default()
                    .insert(row.get(0));
            }
        }
        let checked_out: HashSet<(i64, Uuid)> = sources
            .query(
                "cart",
                "SELECT id, checked_out_by FROM carts WHERE checked_out_by IS NOT NULL",
                &[],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let decided: Vec<(i64, Option<Uuid>)> = sources
            .query("orders", "SELECT id, decided_by FROM orders", &[])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let registered: Vec<i64> = sources
            .query(
                "users",
                "SELECT (envelope -> 'payload' ->> 'user_id')::bigint
                   FROM svcdb_outbox WHERE routing_key = 'user.registered'",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let customers: HashSet<i64> = sources
            .query("cart", "SELECT user_id FROM customers", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let reserved_twice: i64 = sources
            .one(
                "catalog",
                "SELECT coalesce(sum(n - 1), 0)::bigint
                   FROM (SELECT count(*) AS n FROM stock_reservations
                          GROUP BY order_id, product_id) AS per_line WHERE n > 1",
                &[],
            )
            .await?
            .get(0);

        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        let lost = [
            count(
                placed
                    .iter()
                    .filter(|(id, _)| !answers_by_cause.contains_key(id))
                    .count(),
            ),
            count(
                placed
                    .iter()
                    .filter(|(id, cart)| !checked_out.contains(&(*cart, *id)))
                    .count(),
            ),
            count(
                decided
                    .iter()
                    .filter(|(order, by)| {
                        answers_by_order
                            .get(order)
                            .is_some_and(|ids| !by.is_some_and(|by| ids.contains(&by)))
                    })
                    .count(),
            ),
            count(
                registered
                    .iter()
                    .filter(|user| !customers.contains(user))
                    .count(),
            ),
        ];
        let answers_twice = placed
            .iter()
            .filter_map(|(id, _)| answers_by_cause.get(id))
            .map(|n| n - 1)
            .sum();
        Ok(Self {
            lost,
            answers_twice,
            reserved_twice,
        })
    }
}

/// Events not yet applied by every subscriber (0 once the system settled).
pub async fn unapplied(sources: &Sources<'_>) -> anyhow::Result<i64> {
    Ok(Applied::read(sources).await?.lost.iter().sum())
}

/// Checks the invariants after the system settled and every replica stopped, and fills in
/// the figures. Reads each service's state through its own connection in `sources`, and the
/// queues through `broker`.
pub async fn audit(
    checks: &mut Checks,
    figures: &mut Figures,
    sources: &Sources<'_>,
    broker: &Connection,
    names: &Names,
    products: &[Product],
    outage_orders: &[i64],
) -> anyhow::Result<()> {
    // Every placed order decided.
    let mut by_status: HashMap<String, i64> = HashMap::new();
    for row in sources
        .query(
            "orders",
            "SELECT status, count(*) FROM orders GROUP BY status",
            &[],
        )
        .await?
    {
        by_status.insert(row.get(0), row.get(1));
    }
    let count = |s: &str| by_status.get(s).copied().unwrap_or(0);
    figures.confirmed = count("confirmed");
    figures.rejected = count("rejected");
    figures.undecided = count("placed");
    let stored = figures.confirmed + figures.rejected + figures.undecided;
    checks.check(
        "every placed order ends confirmed or rejected",
        figures.undecided == 0 && stored == figures.orders as i64,
        format!(
            "{} placed through HTTP, {stored} stored: {} confirmed, {} rejected, {} undecided",
            figures.orders, figures.confirmed, figures.rejected, figures.undecided
        ),
    );

    // Stock: what was there, minus what confirmed orders took, is what is left.
    let taken: HashMap<i64, i32> = sources
        .query(
            "orders",
            "SELECT l.product_id, sum(l.quantity)::int
               FROM order_lines l JOIN orders o ON o.id = l.order_id
              WHERE o.status = 'confirmed' GROUP BY l.product_id",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let rows = sources
        .query(
            "catalog",
            "SELECT id, name, stock FROM products ORDER BY id",
            &[],
        )
        .await?;
    println!("    product   initial − confirmed orders = left");
    let mut balanced = 0;
    for row in &rows {
        let (id, name, left): (i64, String, i32) = (row.get(0), row.get(1), row.get(2));
        let taken = taken.get(&id).copied().unwrap_or(0);
        let initial = figures.initial_stock.get(&id).copied().unwrap_or(-1);
        let ok = initial - taken == left;
        balanced += usize::from(ok);
        let mark = if ok { "" } else { "  ✗ does not balance" };
        println!("    {name:<9} {initial:>7} − {taken:>16} = {left}{mark}");
    }
    figures.stock_mismatches = (products.len() - balanced.min(products.len())) as i64;
    checks.check(
        "stock: initial − quantities of confirmed orders = final, for every product",
        balanced == rows.len() && rows.len() == products.len(),
        format!("{balanced} of {} products balance", products.len()),
    );

    // Reservations: exactly the lines of confirmed orders (as many times), none for others.
    let mut reserved: HashMap<i64, Vec<(i64, i32)>> = HashMap::new();
    for row in sources
        .query(
            "catalog",
            "SELECT order_id, product_id, quantity FROM stock_reservations",
            &[],
        )
        .await?
    {
        reserved
            .entry(row.get(0))
            .or_default()
            .push((row.get(1), row.get(2)));
    }
    let mut expected: HashMap<i64, Vec<(i64, i32)>> = HashMap::new();
    for row in sources
        .query(
            "orders",
            "SELECT o.id, l.product_id, l.quantity
               FROM orders o LEFT JOIN order_lines l
                 ON l.order_id = o.id AND o.status = 'confirmed'",
            &[],
        )
        .await?
    {
        let lines = expected.entry(row.get(0)).or_default();
        if let (Some(product), Some(quantity)) = (row.get(1), row.get(2)) {
            lines.push((product, quantity));
        }
    }
    let mut mismatched = 0;
    for (order, mut lines) in expected {
        let mut held = reserved.remove(&order).unwrap_or_default();
        held.sort_unstable();
        lines.sort_unstable();
        mismatched += usize::from(held != lines);
    }
    checks.check(
        "confirmed orders hold exactly their lines in reservations, rejected ones nothing",
        mismatched == 0,
        format!("{mismatched} orders whose reservations differ from their lines"),
    );

    // Every event applied by each of its subscribers exactly once, from the effects.
    let Applied {
        lost,
        answers_twice,
        reserved_twice,
    } = Applied::read(sources).await?;
    figures.lost_events = lost.iter().sum();
    figures.wrong_state_changes = answers_twice + reserved_twice;
    checks.check(
        "every event applied by each subscriber exactly once (from the effects in the databases)",
        figures.lost_events == 0 && figures.wrong_state_changes == 0,
        format!(
            "not applied: OrderPlaced by catalog {}, by cart {}; answers by orders {}; UserRegistered by cart {}. Applied again: {answers_twice} OrderPlaced answered twice, {reserved_twice} order lines reserved twice",
            lost[0], lost[1], lost[2], lost[3]
        ),
    );

    // Each subscriber's claims, one to one with its producer's outbox rows.
    let mut claims_detail = Vec::new();
    let mut claims_off = 0;
    for def in SERVICES {
        for subscription in def.subscriptions {
            let consumer = format!("{}.{}", def.name, subscription.handler);
            for (producer, key) in subscription.sources {
                let pattern = key.replace(['#', '*'], "%");
                let events: HashSet<Uuid> = sources
                    .query(
                        producer,
                        "SELECT id FROM svcdb_outbox WHERE routing_key LIKE $1",
                        &[&pattern],
                    )
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                let claims: HashSet<Uuid> = sources
                    .query(
                        def.name,
                        "SELECT event_id FROM svcdb_processed_events WHERE consumer = $1",
                        &[&consumer],
                    )
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                let unclaimed = events.difference(&claims).count();
                let stray = claims.difference(&events).count();
                let events = events.len();
                claims_off += unclaimed + stray;
                claims_detail.push(format!(
                    "{consumer}: {events} events, {unclaimed} unclaimed, {stray} claims of no event"
                ));
            }
        }
    }
    checks.check(
        "each subscriber's claims match its producer's events one to one",
        claims_off == 0,
        claims_detail.join("; "),
    );

    // Outboxes: nothing left behind.
    let mut outbox_detail = Vec::new();
    let (mut unpublished, mut all_events) = (0, 0);
    for def in SERVICES.iter().filter(|d| d.publishes) {
        let row = sources
            .one(
                def.name,
                "SELECT count(*), count(*) FILTER (WHERE published_at IS NULL) FROM svcdb_outbox",
                &[],
            )
            .await?;
        let (all, left): (i64, i64) = (row.get(0), row.get(1));
        unpublished += left;
        all_events += all;
        outbox_detail.push(format!("{} {all} events, {left} unpublished", def.name));
    }
    figures.outbox_unpublished = unpublished;
    figures.events_published = all_events;
    checks.check(
        "no outbox row left unpublished",
        unpublished == 0,
        outbox_detail.join("; "),
    );

    // Queues: empty (every consumer stopped, so nothing is held unacknowledged: what a
    // consumer held would be back and counted here); dead-letter queues: exactly the
    // malformed message.
    let mut expected_dead = 0;
    let mut unexpected = Vec::new();
    let mut waiting = 0;
    for def in SERVICES {
        for subscription in def.subscriptions {
            let queue = names.queue(def.name, subscription);
            waiting += ready(broker, &queue.name).await?;
            for (body, reason) in dead_letters(broker, &queue.dead_letter_queue()).await? {
                let is_poison = def.name == "catalog"
                    && body == MALFORMED
                    && reason.as_deref().is_some_and(|r| r.contains("malformed"));
                if is_poison {
                    expected_dead += 1;
                    println!(
                        "    {}: {:?}, reason: {}",
                        queue.dead_letter_queue(),
                        String::from_utf8_lossy(&body),
                        reason.unwrap_or_default()
                    );
                } else {
                    unexpected.push(format!(
                        "{}: {:?} ({})",
                        queue.dead_letter_queue(),
                        String::from_utf8_lossy(&body)
                            .chars()
                            .take(120)
                            .collect::<String>(),
                        reason.unwrap_or_default()
                    ));
                }
            }
        }
    }
    figures.dead_lettered = usize::from(expected_dead > 0) + unexpected.len();
    // Dead-lettering is a copy, then an ack: an ack lost after the copy (the lost-ack fault
    // may pick the malformed message too) brings it back, and it is copied again. More than one
    // copy of that one message is at-least-once dead-lettering, not another dead letter.
    checks.check(
        "the dead-letter queues hold exactly the malformed message; the consumer went on",
        expected_dead >= 1 && unexpected.is_empty(),
        if unexpected.is_empty() {
            format!("the malformed message in the catalog's DLQ ({expected_dead} copy or copies: one per ack lost after its copy), nothing else")
        } else {
            let shown: Vec<&String> = unexpected.iter().take(3).collect();
            format!(
                "{} unexpected dead letters, e.g. {}",
                unexpected.len(),
                shown
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        },
    );
    checks.check(
        "no message left waiting in any queue, ready or unacknowledged (checked with every consumer stopped)",
        waiting == 0,
        format!("{waiting} messages in the queues"),
    );

    // Latency and throughput.
    let row = sources
        .one(
            "orders",
            "SELECT coalesce(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), 0),
                    coalesce(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms), 0)
               FROM (SELECT extract(epoch FROM decided_at - placed_at)::float8 * 1000 AS ms
                       FROM orders
                      WHERE decided_at IS NOT NULL AND NOT id = ANY($1)) AS decided",
            &[&outage_orders],
        )
        .await?;
    figures.order_latency_p50_ms = row.get(0);
    figures.order_latency_p99_ms = row.get(1);
    if figures.measured_ms > 0 {
        figures.orders_per_s = figures.measured_orders as f64 * 1000.0 / figures.measured_ms as f64;
    }
    Ok(())
}

/// Messages ready in `queue`.
pub async fn ready(broker: &Connection, queue: &str) -> anyhow::Result<u32> {
    let channel = broker.create_channel().await?;
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let _ = channel.close(200, "OK".into()).await;
    Ok(declared.message_count())
}

/// The messages of a dead-letter queue with their `x-svcdb-reason`, left in the queue: they
/// are taken unacknowledged and return when the channel closes (for a person, with --keep).
async fn dead_letters(
    broker: &Connection,
    queue: &str,
) -> anyhow::Result<Vec<(Vec<u8>, Option<String>)>> {
    let channel = broker.create_channel().await?;
    let mut letters = Vec::new();
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions::default())
        .await?
    {
        let delivery = message.delivery;
        let reason = delivery.properties.headers().as_ref().and_then(|h| {
            match h.inner().get("x-svcdb-reason") {
                Some(AMQPValue::LongString(s)) => {
                    Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                }
                _ => None,
            }
        });
        letters.push((delivery.data, reason));
        if letters.len() >= 100 {
            break; // enough to say it is wrong
        }
    }
    let _ = channel.close(200, "OK".into()).await;
    Ok(letters)
}
