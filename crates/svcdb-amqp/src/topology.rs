//! Exchanges, queues and bindings, declared idempotently at start-up.
//!
//! # The shape
//!
//! ```text
//!  catalog (producer)                         orders (consumer)
//!  outbox ──relay──▶ catalog.events ──"product.stock.#"──▶ orders.reserve-stock ──▶ handler
//!                   (topic, durable)                        (quorum, x-delivery-limit)
//!                                                                 │ rejected / limit hit
//!                                                                 ▼
//!                                   orders.reserve-stock.dlx ──▶ orders.reserve-stock.dlq
//!                                   (fanout, durable)            (quorum, kept for people)
//! ```
//!
//! * **One topic exchange per producing service**, named [`events_exchange`]`(service)`:
//!   `catalog.events`. The producer owns it (RabbitMQ permissions can give each service
//!   configure and write rights on its own exchange only), its name says where an event came
//!   from, and a service can be retired or moved with its exchange without touching the
//!   others. Routing keys are dotted (`product.stock.reserved`) so consumers subscribe with
//!   patterns (`product.stock.*`, `product.#`).
//! * **One durable queue per (consumer service, handler)**, named `<service>.<handler>`
//!   (`orders.reserve-stock`), bound to the exchanges and routing keys it needs. Two handlers
//!   in one service get two queues, so one slow or failing handler does not hold back the other,
//!   and each gets its own idempotency scope (the consumer name given to
//!   [`Consumer`](crate::Consumer)).
//! * **A dead-letter exchange and queue per consumer queue**: `<queue>.dlx` (fanout) and
//!   `<queue>.dlq`. Malformed messages, events without a handler and messages whose handler
//!   kept failing end there, with the reason in a header, for a person to inspect and replay
//!   (shovel them back to the exchange once fixed).
//!
//! # Why quorum queues with a delivery limit
//!
//! A message whose handler always fails must not loop forever. Counting attempts ourselves
//! (classic queues, a header incremented on each republish) cannot count the attempts that
//! matter most: a handler that crashes the process, or hangs until the pod is killed, never
//! gets to republish, so the poison message comes back uncounted and kills the next replica
//! too. Quorum queues count failed deliveries in the broker (`x-delivery-count`): a channel
//! closed with the message unacknowledged (a crash) or a `basic.reject`, and before RabbitMQ
//! 4.3 every other return as well (see the consumer's
//! [delivery counting](crate::Consumer#delivery-counting)); they dead-letter the message once
//! `x-delivery-limit` is exceeded. They are
//! also replicated and fsync'd (the durable choice on a cluster), and RabbitMQ 3.10 supports
//! at-least-once dead-lettering for them (`x-dead-letter-strategy`), so a poison message is not
//! lost on its way to the DLQ either. [`QueueSpec::max_deliveries`] is the number of
//! deliveries in all; the queue's `x-delivery-limit` is one less (RabbitMQ counts
//! redeliveries).
//!
//! The trade-offs: quorum queues do not support priorities or exclusive/auto-delete queues
//! (an event queue needs none), and a queue's arguments cannot change once declared: declaring
//! it again with other arguments fails with `PRECONDITION_FAILED` (see [`Error::Amqp`]'s hint).
//! To change `max_deliveries`, use a policy (`rabbitmqctl set_policy … '{"delivery-limit":9}'`)
//! or a new queue.
//!
//! # Replicas on a cluster
//!
//! A quorum queue is replicated on `x-quorum-initial-group-size` nodes, chosen when it is
//! created; without the argument, RabbitMQ 3.10 puts it on every cluster member. A topology
//! with [`Topology::with_quorum_group_size`] declares each queue (and its dead-letter queue)
//! with that many replicas; [`Service`](crate::Service) sets it from
//! [`AmqpConfig::quorum_group_size`](crate::AmqpConfig::quorum_group_size) (the node count of
//! `AMQP_URL`, up to 3). Three replicas keep a queue available with one node down: a majority
//! (2 of 3) still elects a leader and confirms writes. The count applies at creation only;
//! `rabbitmq-queues grow` and `shrink` change an existing queue's replicas.
//!
//! ```no_run
//! use svcdb_amqp::topology::{events_exchange, QueueSpec, Topology};
//!
//! # async fn demo(connection: &lapin::Connection) -> svcdb_amqp::Result<()> {
//! // In the orders service, at start-up (every replica; declaring is idempotent):
//! Topology::new()
//!     .exchange(events_exchange("orders")) // what orders publishes
//!     .queue(
//!         QueueSpec::new("orders.reserve-stock")
//!             .bind(events_exchange("catalog"), "product.stock.*")
//!             .with_max_deliveries(5),
//!     )
//!     .declare(connection)
//!     .await?;
//! # Ok(()) }
//! ```

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ExchangeKind};

use crate::connection::{close_channel, open_channel};
use crate::error::{Error, Result};

/// The suffix of a service's events exchange: `catalog` publishes to `catalog.events`.
pub const EVENTS_EXCHANGE_SUFFIX: &str = ".events";

/// The suffix of a queue's dead-letter exchange.
pub const DEAD_LETTER_EXCHANGE_SUFFIX: &str = ".dlx";

/// The suffix of a queue's dead-letter queue.
pub const DEAD_LETTER_QUEUE_SUFFIX: &str = ".dlq";

/// Deliveries of one message, the first included, before it is dead-lettered.
pub const DEFAULT_MAX_DELIVERIES: u32 = 5;

/// The longest exchange or queue name AMQP carries, in bytes.
pub const MAX_NAME_BYTES: usize = svcdb::outbox::MAX_AMQP_NAME_BYTES;

/// The events exchange of `service`: `"catalog"` → `"catalog.events"`.
pub fn events_exchange(service: &str) -> String {
    format!("{service}{EVENTS_EXCHANGE_SUFFIX}")
}

/// One binding of a queue: messages published to `exchange` with a routing key matching
/// `routing_key` (a topic pattern: `*` one word, `#` zero or more) are copied to the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// The producer's exchange, declared here too (durable topic) so a consumer can start
    /// before its producer without a `NOT_FOUND`.
    pub exchange: String,
    /// The routing key pattern.
    pub routing_key: String,
}

/// A consumer queue with its bindings and dead-letter settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    /// The queue's name, `<service>.<handler>` by convention. `<name>.dlx` and `<name>.dlq`
    /// are derived from it.
    pub name: String,
    /// Where the queue's messages come from.
    pub bindings: Vec<Binding>,
    /// Deliveries of one message, the first included, before the broker dead-letters it
    /// (`x-delivery-limit` = this − 1). The consumer also reads it, to dead-letter the last
    /// failed attempt itself with the handler's error attached. Default:
    /// [`DEFAULT_MAX_DELIVERIES`].
    pub max_deliveries: u32,
}

impl QueueSpec {
    /// A queue named `name`, with no bindings yet and the default delivery limit.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            bindings: Vec::new(),
            max_deliveries: DEFAULT_MAX_DELIVERIES,
        }
    }

    /// Adds a binding to `exchange` with the topic pattern `routing_key`.
    #[must_use]
    pub fn bind(mut self, exchange: impl Into<String>, routing_key: impl Into<String>) -> Self {
        self.bindings.push(Binding {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
        });
        self
    }

    /// Sets [`QueueSpec::max_deliveries`].
    #[must_use]
    pub fn with_max_deliveries(mut self, max_deliveries: u32) -> Self {
        self.max_deliveries = max_deliveries;
        self
    }

    /// `<name>.dlx`: where rejected and exhausted messages are sent.
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}{DEAD_LETTER_EXCHANGE_SUFFIX}", self.name)
    }

    /// `<name>.dlq`: where they wait for a person.
    pub fn dead_letter_queue(&self) -> String {
        format!("{}{DEAD_LETTER_QUEUE_SUFFIX}", self.name)
    }

    /// Checks the names and the limit without touching the network.
    pub fn validate(&self) -> Result<()> {
        self.check_names()?;
        for binding in &self.bindings {
            check_name("exchange", &binding.exchange)?;
            check_routing_key(&binding.routing_key)?;
        }
        if self.max_deliveries == 0 {
            return Err(Error::config(
                "max_deliveries",
                format!(
                    "queue {}: 0 deliveries would dead-letter every message unseen; use 1 or more",
                    self.name
                ),
            ));
        }
        Ok(())
    }

    /// Checks the queue's name and the names derived from it.
    fn check_names(&self) -> Result<()> {
        check_name("queue", &self.name)?;
        check_dead_letter_names(&self.name)
    }

    /// The consumer queue's arguments, with `replicas` as its initial group size if set.
    fn arguments(&self, replicas: Option<u16>) -> FieldTable {
        let mut args = quorum_arguments(replicas);
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(self.max_deliveries) - 1),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(self.dead_letter_exchange().into()),
        );
        // At-least-once dead-lettering: the message leaves this queue only once the DLQ has
        // confirmed it. RabbitMQ requires `reject-publish` overflow with it (there is no
        // length limit, so it never applies).
        args.insert(
            "x-dead-letter-strategy".into(),
            AMQPValue::LongString("at-least-once".into()),
        );
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        args
    }
}

/// A quorum queue's arguments, replicated on `replicas` nodes if set (else the broker's
/// default).
fn quorum_arguments(replicas: Option<u16>) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    if let Some(replicas) = replicas {
        args.insert(
            "x-quorum-initial-group-size".into(),
            AMQPValue::LongInt(i32::from(replicas)),
        );
    }
    args
}

/// What a service declares at start-up: the exchanges it publishes to and the queues it
/// consumes from. Declaring is idempotent, so every replica does it on every start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Topology {
    /// Exchanges this service owns (publishes to), declared as durable topic exchanges.
    pub exchanges: Vec<String>,
    /// Queues this service consumes, each with its dead-letter exchange and queue.
    pub queues: Vec<QueueSpec>,
    /// Replicas of each quorum queue created (`x-quorum-initial-group-size`); `None` leaves
    /// it to the broker. See [Replicas on a cluster](self#replicas-on-a-cluster).
    pub quorum_group_size: Option<u16>,
}

impl Topology {
    /// Nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an exchange this service publishes to (see [`events_exchange`]).
    #[must_use]
    pub fn exchange(mut self, name: impl Into<String>) -> Self {
        self.exchanges.push(name.into());
        self
    }

    /// Adds a queue this service consumes.
    #[must_use]
    pub fn queue(mut self, spec: QueueSpec) -> Self {
        self.queues.push(spec);
        self
    }

    /// Sets [`Topology::quorum_group_size`]: usually
    /// [`AmqpConfig::quorum_group_size`](crate::AmqpConfig::quorum_group_size).
    #[must_use]
    pub fn with_quorum_group_size(mut self, replicas: Option<u16>) -> Self {
        self.quorum_group_size = replicas;
        self
    }

    /// Checks every name without touching the network.
    pub fn validate(&self) -> Result<()> {
        self.check_names()?;
        if self.quorum_group_size == Some(0) {
            return Err(Error::config(
                "quorum_group_size",
                "a quorum queue needs at least 1 replica; use the cluster's node count up to 3, or None",
            ));
        }
        self.queues.iter().try_for_each(QueueSpec::validate)
    }

    /// Checks the names of the exchanges and queues (with their dead-letter names), as
    /// [`Topology::validate`] does.
    fn check_names(&self) -> Result<()> {
        for exchange in &self.exchanges {
            check_name("exchange", exchange)?;
        }
        self.queues.iter().try_for_each(QueueSpec::check_names)
    }

    /// Declares everything, in dependency order: exchanges (this service's and those its
    /// queues bind to), then per queue its dead-letter exchange and queue, the queue, and its
    /// bindings. Existing objects with the same arguments are left as they are; one with
    /// other arguments fails with `PRECONDITION_FAILED` ([`Error::Amqp`], with a hint).
    ///
    /// Runs on a channel of its own, closed afterwards: a refused declaration closes the
    /// channel it ran on, and that must not be a channel the caller is consuming from.
    pub async fn declare(&self, connection: &Connection) -> Result<()> {
        self.validate()?;
        let channel = open_channel(connection, "declaring the topology").await?;
        let result = self.declare_on(&channel).await;
        close_channel(&channel).await;
        result
    }

    async fn declare_on(&self, channel: &Channel) -> Result<()> {
        // Collected before the first `await`: an iterator whose closures live across it made
        // the future of `declare` not `Send` inside a spawned task ("implementation of
        // `FnOnce` is not general enough").
        let exchanges: Vec<&String> = self
            .exchanges
            .iter()
            .chain(
                self.queues
                    .iter()
                    .flat_map(|q| q.bindings.iter().map(|b| &b.exchange)),
            )
            .collect();
        let mut declared: Vec<&String> = Vec::new();
        for exchange in exchanges {
            if exchange.is_empty() || declared.contains(&exchange) {
                continue; // "" is the default exchange, which always exists
            }
            declare_exchange(channel, exchange, ExchangeKind::Topic).await?;
            declared.push(exchange);
        }
        for queue in &self.queues {
            let dlx = queue.dead_letter_exchange();
            let dlq = queue.dead_letter_queue();
            declare_exchange(channel, &dlx, ExchangeKind::Fanout).await?;
            declare_queue(channel, &dlq, quorum_arguments(self.quorum_group_size)).await?;
            bind(channel, &dlq, &dlx, "").await?;
            declare_queue(
                channel,
                &queue.name,
                queue.arguments(self.quorum_group_size),
            )
            .await?;
            for binding in &queue.bindings {
                bind(
                    channel,
                    &queue.name,
                    &binding.exchange,
                    &binding.routing_key,
                )
                .await?;
            }
            tracing::debug!(target: "svcdb_amqp::topology", queue = %queue.name, bindings = queue.bindings.len(), "declared queue");
        }
        Ok(())
    }

    /// Deletes every queue (with its dead-letter queue and exchange) and every exchange in
    /// [`Topology::exchanges`]; exchanges only bound to are left to their owners. Messages in
    /// the queues are lost: for tests and decommissioning. Missing objects are not an error;
    /// a name that could not have been declared is ([`Error::InvalidName`], before anything
    /// is deleted).
    pub async fn delete(&self, connection: &Connection) -> Result<()> {
        // lapin panics on a name over 255 bytes; the rest of the rules keep a half-deleted
        // topology from a name that could never have been declared.
        self.check_names()?;
        let channel = open_channel(connection, "deleting the topology").await?;
        let result = async {
            for queue in &self.queues {
                for name in [queue.name.clone(), queue.dead_letter_queue()] {
                    channel
                        .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                        .await
                        .map_err(|e| Error::amqp(format!("deleting queue {name}"), e))?;
                }
                let dlx = queue.dead_letter_exchange();
                delete_exchange(&channel, &dlx).await?;
            }
            for exchange in &self.exchanges {
                delete_exchange(&channel, exchange).await?;
            }
            Ok(())
        }
        .await;
        close_channel(&channel).await;
        result
    }
}

async fn declare_exchange(channel: &Channel, name: &str, kind: ExchangeKind) -> Result<()> {
    let options = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(name.into(), kind, options, FieldTable::default())
        .await
        .map_err(|e| Error::amqp(format!("declaring exchange {name}"), e))
}

async fn declare_queue(channel: &Channel, name: &str, arguments: FieldTable) -> Result<()> {
    let options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(name.into(), options, arguments)
        .await
        .map(drop)
        .map_err(|e| Error::amqp(format!("declaring queue {name}"), e))
}

async fn bind(channel: &Channel, queue: &str, exchange: &str, routing_key: &str) -> Result<()> {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            routing_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| {
            Error::amqp(
                format!("binding queue {queue} to exchange {exchange} with {routing_key:?}"),
                e,
            )
        })
}

async fn delete_exchange(channel: &Channel, name: &str) -> Result<()> {
    channel
        .exchange_delete(name.into(), ExchangeDeleteOptions::default())
        .await
        .map_err(|e| Error::amqp(format!("deleting exchange {name}"), e))
}

/// svcdb's rules for a name to declare ([`svcdb::outbox::check_declared_name`]: not empty,
/// not `amq.`, at most 255 bytes of letters, digits, `-`, `_`, `.` and `:`), as this crate's
/// error.
fn check_name(what: &'static str, name: &str) -> Result<()> {
    svcdb::outbox::check_declared_name(what, name).map_err(|e| invalid_name(name, e))
}

/// Refuses a queue name AMQP carries whose dead-letter exchange and queue (`<queue>.dlx`,
/// `<queue>.dlq`) it cannot: a queue of 252 to 255 bytes, which RabbitMQ takes, has no
/// dead-letter queue.
pub(crate) fn check_dead_letter_names(queue: &str) -> Result<()> {
    let suffix = DEAD_LETTER_QUEUE_SUFFIX
        .len()
        .max(DEAD_LETTER_EXCHANGE_SUFFIX.len());
    let derived = queue.len() + suffix;
    if derived > MAX_NAME_BYTES {
        return Err(Error::InvalidName {
            what: "queue",
            name: queue.chars().take(80).collect(),
            reason: format!(
                "its dead-letter queue, the name with {DEAD_LETTER_QUEUE_SUFFIX:?} appended, would be {derived} bytes long, and AMQP carries at most {MAX_NAME_BYTES}\n  hint: name the queue with at most {} bytes",
                MAX_NAME_BYTES - suffix
            ),
        });
    }
    Ok(())
}

/// Refuses a name longer than AMQP carries (lapin would panic on it), as
/// [`Error::InvalidName`] for `what`.
pub(crate) fn check_length(what: &'static str, name: &str) -> Result<()> {
    if name.len() > MAX_NAME_BYTES {
        return Err(Error::InvalidName {
            what,
            name: name.chars().take(80).collect(),
            reason: format!(
                "it is {} bytes long; AMQP carries at most {MAX_NAME_BYTES}",
                name.len()
            ),
        });
    }
    Ok(())
}

/// svcdb's rule for a routing key or binding pattern ([`svcdb::outbox::check_routing_key`]).
fn check_routing_key(key: &str) -> Result<()> {
    svcdb::outbox::check_routing_key(key).map_err(|e| invalid_name(key, e))
}

/// svcdb's refusal as [`Error::InvalidName`], with the name cut to 80 characters.
fn invalid_name(name: &str, refused: svcdb::IdentError) -> Error {
    Error::InvalidName {
        what: refused.what,
        name: name.chars().take(80).collect(),
        reason: refused.reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_names() {
        let q = QueueSpec::new("orders.reserve-stock");
        assert_eq!(q.dead_letter_exchange(), "orders.reserve-stock.dlx");
        assert_eq!(q.dead_letter_queue(), "orders.reserve-stock.dlq");
        assert_eq!(events_exchange("catalog"), "catalog.events");
    }

    #[test]
    fn arguments_limit_deliveries_and_dead_letter() {
        let args = QueueSpec::new("q").with_max_deliveries(3).arguments(None);
        let inner = args.inner();
        assert_eq!(
            inner.get("x-delivery-limit"),
            Some(&AMQPValue::LongLongInt(2))
        );
        assert_eq!(
            inner.get("x-queue-type"),
            Some(&AMQPValue::LongString("quorum".into()))
        );
        assert_eq!(
            inner.get("x-dead-letter-exchange"),
            Some(&AMQPValue::LongString("q.dlx".into()))
        );
        // Left to the broker unless asked for.
        assert_eq!(inner.get("x-quorum-initial-group-size"), None);
        let args = QueueSpec::new("q").arguments(Some(3));
        assert_eq!(
            args.inner().get("x-quorum-initial-group-size"),
            Some(&AMQPValue::LongInt(3))
        );
    }

    #[test]
    fn names_are_checked() {
        QueueSpec::new("orders.reserve-stock")
            .bind("catalog.events", "product.#")
            .validate()
            .unwrap();
        for bad in ["", "amq.mine", "with space", "naïve", &"q".repeat(252)] {
            let e = QueueSpec::new(bad).validate().unwrap_err();
            assert!(
                matches!(e, Error::InvalidName { what: "queue", .. }),
                "{bad:?}: {e}"
            );
        }
        let e = QueueSpec::new("q")
            .bind("x", "k".repeat(256))
            .validate()
            .unwrap_err();
        assert!(matches!(
            e,
            Error::InvalidName {
                what: "routing key",
                ..
            }
        ));
        let e = QueueSpec::new("q")
            .with_max_deliveries(0)
            .validate()
            .unwrap_err();
        assert!(matches!(e, Error::Config { .. }), "{e}");
    }
}
