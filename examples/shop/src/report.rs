//! The demo's verdict: the invariants, checked by an auditor who reads every schema as the
//! admin (which no service can), the measured figures, and the JSON summary.

use std::collections::HashMap;

use serde::Serialize;
use svcdb::tokio_postgres::Client;
use svcdb_amqp::lapin::options::{BasicGetOptions, QueueDeclareOptions};
use svcdb_amqp::lapin::types::{AMQPValue, FieldTable};
use svcdb_amqp::lapin::Connection;

use crate::catalog::Product;
use crate::platform::Names;
use crate::scenario::{MALFORMED, SERVICES};

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
    admin: &Client,
    scraped: &HashMap<&'static str, Scraped>,
    killed: &std::collections::HashSet<&'static str>,
) -> anyhow::Result<()> {
    for def in SERVICES.iter().filter(|d| !d.subscriptions.is_empty()) {
        let claims: i64 = admin
            .query_one(
                &format!("SELECT count(*) FROM {}.svcdb_processed_events", def.schema),
                &[],
            )
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

/// The events each subscriber must apply, and the effect that names the event once applied:
/// the catalog's answer (its causation id), the cart's `checked_out_by`, the order's
/// `decided_by`, the cart's customer row.
const APPLIED: &str = "
WITH placed AS (
    SELECT id, (envelope -> 'payload' ->> 'cart_id')::bigint AS cart_id
      FROM orders_schema.svcdb_outbox WHERE routing_key = 'order.placed'),
answers AS (
    SELECT id, (envelope ->> 'causation_id')::uuid AS cause,
           (envelope -> 'payload' ->> 'order_id')::bigint AS order_id
      FROM catalog_schema.svcdb_outbox),
registered AS (
    SELECT (envelope -> 'payload' ->> 'user_id')::bigint AS user_id
      FROM users_schema.svcdb_outbox WHERE routing_key = 'user.registered')
SELECT
    (SELECT count(*) FROM placed p WHERE NOT EXISTS (SELECT FROM answers a WHERE a.cause = p.id)),
    (SELECT count(*) FROM placed p WHERE NOT EXISTS (
        SELECT FROM cart_schema.carts c WHERE c.id = p.cart_id AND c.checked_out_by = p.id)),
    (SELECT count(*) FROM orders_schema.orders o
      WHERE EXISTS (SELECT FROM answers a WHERE a.order_id = o.id)
        AND NOT EXISTS (SELECT FROM answers a WHERE a.order_id = o.id AND a.id = o.decided_by)),
    (SELECT count(*) FROM registered r WHERE NOT EXISTS (
        SELECT FROM cart_schema.customers c WHERE c.user_id = r.user_id)),
    coalesce((SELECT sum(n - 1) FROM (SELECT count(*) AS n FROM answers a JOIN placed p ON a.cause = p.id
                                        GROUP BY p.id) AS per_event WHERE n > 1), 0)::bigint,
    coalesce((SELECT sum(n - 1) FROM (SELECT count(*) AS n FROM catalog_schema.stock_reservations
                                        GROUP BY order_id, product_id) AS per_line WHERE n > 1), 0)::bigint";

/// Events not yet applied by every subscriber (0 once the system settled).
pub async fn unapplied(admin: &Client) -> anyhow::Result<i64> {
    let row = admin.query_one(APPLIED, &[]).await?;
    Ok((0..4).map(|i| row.get::<_, i64>(i)).sum())
}

/// Checks the invariants after the system settled and every replica stopped, and fills in
/// the figures. Reads every schema through `admin`, the superuser's connection, and the
/// queues through `broker`.
pub async fn audit(
    checks: &mut Checks,
    figures: &mut Figures,
    admin: &Client,
    broker: &Connection,
    names: &Names,
    products: &[Product],
    outage_orders: &[i64],
) -> anyhow::Result<()> {
    // Every placed order decided.
    let mut by_status: HashMap<String, i64> = HashMap::new();
    for row in admin
        .query(
            "SELECT status, count(*) FROM orders_schema.orders GROUP BY status",
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
    let rows = admin
        .query(
            "SELECT p.id, p.name, p.stock,
                    coalesce((SELECT sum(l.quantity)
                                FROM orders_schema.order_lines l
                                JOIN orders_schema.orders o ON o.id = l.order_id
                               WHERE l.product_id = p.id AND o.status = 'confirmed'), 0)::int
               FROM catalog_schema.products p ORDER BY p.id",
            &[],
        )
        .await?;
    println!("    product   initial − confirmed orders = left");
    let mut balanced = 0;
    for row in &rows {
        let (id, name, left, taken): (i64, String, i32, i32) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
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

    // Reservations: at most one per order line, and exactly the lines of confirmed orders.
    let mismatched: i64 = admin
        .query_one(
            "SELECT count(*) FROM orders_schema.orders o
              WHERE EXISTS (SELECT product_id, quantity FROM catalog_schema.stock_reservations
                             WHERE order_id = o.id
                            EXCEPT ALL
                            SELECT product_id, quantity FROM orders_schema.order_lines
                             WHERE order_id = o.id AND o.status = 'confirmed')
                 OR (o.status = 'confirmed' AND EXISTS (
                            SELECT product_id, quantity FROM orders_schema.order_lines
                             WHERE order_id = o.id
                            EXCEPT ALL
                            SELECT product_id, quantity FROM catalog_schema.stock_reservations
                             WHERE order_id = o.id))",
            &[],
        )
        .await?
        .get(0);
    checks.check(
        "confirmed orders hold exactly their lines in reservations, rejected ones nothing",
        mismatched == 0,
        format!("{mismatched} orders whose reservations differ from their lines"),
    );

    // Every event applied by each of its subscribers exactly once, from the effects.
    let row = admin.query_one(APPLIED, &[]).await?;
    let lost: Vec<i64> = (0..4).map(|i| row.get(i)).collect();
    let (answers_twice, reserved_twice): (i64, i64) = (row.get(4), row.get(5));
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
                let producer_schema = SERVICES
                    .iter()
                    .find(|d| d.name == *producer)
                    .map(|d| d.schema)
                    .unwrap_or_default();
                let pattern = key.replace(['#', '*'], "%");
                let row = admin
                    .query_one(
                        &format!(
                            "WITH events AS (SELECT id FROM {producer_schema}.svcdb_outbox WHERE routing_key LIKE $2),
                                  claims AS (SELECT event_id FROM {schema}.svcdb_processed_events WHERE consumer = $1)
                             SELECT (SELECT count(*) FROM events e WHERE NOT EXISTS (SELECT FROM claims c WHERE c.event_id = e.id)),
                                    (SELECT count(*) FROM claims c WHERE NOT EXISTS (SELECT FROM events e WHERE e.id = c.event_id)),
                                    (SELECT count(*) FROM events)",
                            schema = def.schema
                        ),
                        &[&consumer, &pattern],
                    )
                    .await?;
                let (unclaimed, stray, events): (i64, i64, i64) =
                    (row.get(0), row.get(1), row.get(2));
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
        let row = admin
            .query_one(
                &format!(
                    "SELECT count(*), count(*) FILTER (WHERE published_at IS NULL) FROM {}.svcdb_outbox",
                    def.schema
                ),
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
    let row = admin
        .query_one(
            "SELECT coalesce(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), 0),
                    coalesce(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms), 0)
               FROM (SELECT extract(epoch FROM decided_at - placed_at)::float8 * 1000 AS ms
                       FROM orders_schema.orders
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
