//! The demo's verdict: the invariants, checked by an auditor who reads every schema as the
//! admin (which no service can), the measured figures, and the JSON summary.

use std::collections::HashMap;

use serde::Serialize;
use svcdb::tokio_postgres::Client;
use svcdb_amqp::lapin::options::{BasicGetOptions, QueueDeclareOptions};
use svcdb_amqp::lapin::types::{AMQPValue, FieldTable};
use svcdb_amqp::lapin::Connection;

use crate::catalog::Product;
use crate::platform::{Names, Running};
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

/// What the demo measured.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Figures {
    pub users: usize,
    /// Orders placed through `POST /orders` (201).
    pub orders: usize,
    pub confirmed: i64,
    pub rejected: i64,
    pub undecided: i64,
    /// Events the relays published (at least once: a batch cut by a fault is published again).
    pub events_published: u64,
    /// Events whose handler ran and committed.
    pub events_handled: u64,
    /// Copies of handled `OrderPlaced` events published on purpose.
    pub duplicates_injected: u64,
    /// Deliveries of events already handled, acknowledged without effect (the injected copies
    /// reach two queues; redeliveries after the crash and the outage add to them).
    pub duplicates_absorbed: u64,
    /// Of those, the catalog's redeliveries after its crash.
    pub crash_redeliveries: u64,
    pub dead_lettered: u64,
    pub outbox_unpublished: i64,
    pub http_requests: u64,
    /// From the broker coming back to the last event of the outage published.
    pub outage_drain_ms: u64,
    /// Orders placed and decided in the phases without an outage, and the time they took
    /// (placing, and waiting for every decision): the throughput figure.
    pub measured_orders: usize,
    pub measured_ms: u64,
    pub elapsed_ms: u64,
    /// Stock at seeding, by product id.
    #[serde(skip)]
    pub initial_stock: HashMap<i64, i32>,
}

impl Figures {
    pub fn print(&self) {
        let per_second = if self.measured_ms > 0 {
            self.measured_orders as f64 * 1000.0 / self.measured_ms as f64
        } else {
            0.0
        };
        println!(
            "    orders: {} placed, {} confirmed, {} rejected (out of stock), {} undecided",
            self.orders, self.confirmed, self.rejected, self.undecided
        );
        println!(
            "    events: {} published by the relays, {} handled, each once",
            self.events_published, self.events_handled
        );
        let injected = self.duplicates_injected * 2;
        let other = self
            .duplicates_absorbed
            .saturating_sub(injected + self.crash_redeliveries);
        println!(
            "    duplicate deliveries absorbed: {} = {} copies × 2 queues + {} redeliveries after the crash{}",
            self.duplicates_absorbed,
            self.duplicates_injected,
            self.crash_redeliveries,
            if other > 0 {
                format!(" + {other} redeliveries of messages in flight when a link dropped")
            } else {
                String::new()
            }
        );
        println!(
            "    dead-lettered: {}; outbox rows unpublished: {}; HTTP requests: {}",
            self.dead_lettered, self.outbox_unpublished, self.http_requests
        );
        println!(
            "    throughput: {per_second:.0} orders/s placed and decided end to end ({} orders in {} ms; 4 HTTP calls and 3 events each)",
            self.measured_orders, self.measured_ms
        );
        println!(
            "    outage: the outbox drained {} ms after RabbitMQ was reachable again",
            self.outage_drain_ms
        );
    }
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

/// Checks the invariants after the system settled, and fills in the figures the database and
/// the consumers know. Reads every schema through `admin`, the superuser's connection.
pub async fn audit(
    checks: &mut Checks,
    figures: &mut Figures,
    admin: &Client,
    broker: &Connection,
    names: &Names,
    running: &[Running],
    products: &[Product],
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
    checks.check(
        "stock: initial − quantities of confirmed orders = final, for every product",
        balanced == rows.len() && rows.len() == products.len(),
        format!("{balanced} of {} products balance", products.len()),
    );

    // Reservations: at most one per order line, and exactly the lines of confirmed orders.
    let twice: i64 = admin
        .query_one(
            "SELECT count(*) FROM (SELECT order_id, product_id
                                     FROM catalog_schema.stock_reservations
                                    GROUP BY 1, 2 HAVING count(*) > 1) AS twice",
            &[],
        )
        .await?
        .get(0);
    let mismatched: i64 = admin
        .query_one(
            "SELECT count(*) FROM orders_schema.orders o
              WHERE EXISTS (SELECT product_id, quantity FROM catalog_schema.stock_reservations
                             WHERE order_id = o.id
                            EXCEPT
                            SELECT product_id, quantity FROM orders_schema.order_lines
                             WHERE order_id = o.id AND o.status = 'confirmed')
                 OR (o.status = 'confirmed' AND EXISTS (
                            SELECT product_id, quantity FROM orders_schema.order_lines
                             WHERE order_id = o.id
                            EXCEPT
                            SELECT product_id, quantity FROM catalog_schema.stock_reservations
                             WHERE order_id = o.id))",
            &[],
        )
        .await?
        .get(0);
    checks.check(
        "each order reserved at most once: confirmed orders hold exactly their lines, rejected ones nothing",
        twice == 0 && mismatched == 0,
        format!("{twice} order lines reserved twice, {mismatched} orders whose reservations differ from their lines"),
    );

    // Consumers: every event handled exactly once, every copy absorbed.
    let stats = |service: &str, handler: &str| {
        running
            .iter()
            .find(|r| r.def.name == service)
            .map(|r| r.stats(handler))
            .unwrap_or_default()
    };
    let reserve = stats("catalog", "reserve-stock");
    let decide = stats("orders", "stock-results");
    let checkout = stats("cart", "checkout");
    let customers = stats("cart", "customers");
    let orders = figures.orders as u64;
    let requeued: u64 = running.iter().map(|r| r.total_stats().requeued).sum();
    checks.check(
        "every event's handler ran exactly once (handled = events)",
        reserve.handled == orders
            && decide.handled == orders
            && checkout.handled == orders
            && customers.handled == figures.users as u64
            && requeued == 0,
        format!(
            "OrderPlaced: catalog {}/{orders}, cart {}/{orders}; stock answers: orders {}/{orders}; UserRegistered: cart {}/{}; {requeued} handler failures",
            reserve.handled, checkout.handled, decide.handled, customers.handled, figures.users
        ),
    );
    let injected = figures.duplicates_injected;
    checks.check(
        "duplicate deliveries change nothing: each copy is acknowledged as a duplicate",
        reserve.duplicates > injected
            && checkout.duplicates >= injected,
        format!(
            "catalog absorbed {} (≥ {injected} copies + the crash's redelivery), cart {} (≥ {injected} copies)",
            reserve.duplicates, checkout.duplicates
        ),
    );

    // Outboxes: nothing left behind.
    let mut outbox_detail = Vec::new();
    let mut unpublished = 0;
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
        outbox_detail.push(format!("{} {all} events, {left} unpublished", def.name));
    }
    figures.outbox_unpublished = unpublished;
    checks.check(
        "no outbox row left unpublished",
        unpublished == 0,
        outbox_detail.join("; "),
    );

    // Carts: each closed by its order's OrderPlaced.
    let open: i64 = admin
        .query_one(
            "SELECT count(*) FROM orders_schema.orders o
               LEFT JOIN cart_schema.carts c ON c.id = o.cart_id
              WHERE c.order_id IS DISTINCT FROM o.id",
            &[],
        )
        .await?
        .get(0);
    checks.check(
        "every ordered cart was checked out by its OrderPlaced event",
        open == 0,
        format!("{open} carts not closed by their order"),
    );

    // Queues: empty; dead-letter queues: exactly the malformed message.
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
                        String::from_utf8_lossy(&body),
                        reason.unwrap_or_default()
                    ));
                }
            }
        }
    }
    checks.check(
        "the dead-letter queues hold exactly the malformed message; the consumer went on",
        expected_dead == 1 && unexpected.is_empty() && reserve.dead_lettered == 1,
        if unexpected.is_empty() {
            format!("{expected_dead} malformed message in the catalog's DLQ, nothing else")
        } else {
            format!("unexpected dead letters: {}", unexpected.join("; "))
        },
    );
    checks.check(
        "no message left waiting in any queue",
        waiting == 0,
        format!("{waiting} messages ready"),
    );
    Ok(())
}

/// Messages ready in `queue`.
async fn ready(broker: &Connection, queue: &str) -> anyhow::Result<u32> {
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
