//! A broker that nacks every publish of the relay's connection: the relay moves to a new one.

use crate::common;
use crate::relay::{enqueue, fast, fast_outbox, start_with};

use common::{closed_port, service, url_via, Broker, Proxy};
use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::json;
use svcdb::Envelope;
use svcdb_amqp::topology::{QueueSpec, Topology};
use svcdb_amqp::{AmqpConfig, RelayConfig};

/// `connection.open`: one per connection a client makes.
const CONNECTION_OPEN: common::Method = (10, 40);

/// A queue bound to `exchange` for `routing_key` that takes no message: RabbitMQ nacks every
/// publish routed to it (length limit 0, `reject-publish`). Exclusive to the test's
/// connection, so it goes with it.
async fn nacking_queue(broker: &Broker, exchange: &str, routing_key: &str) {
    let name = common::unique("full");
    let channel = broker.connection.create_channel().await.unwrap();
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongInt(0));
    arguments.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    channel
        .queue_declare(
            name.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            arguments,
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            name.as_str().into(),
            exchange.into(),
            routing_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = channel.close(200, "OK".into()).await;
}

#[tokio::test]
async fn a_relay_whose_publishes_are_all_nacked_reconnects() {
    common::init_tracing();
    let broker = Broker::new().await;
    let (_test_db, db) = service().await;
    let exchange = common::unique("orders.events");
    let queue = QueueSpec::new(common::unique("audit")).bind(&exchange, "order.#");
    broker
        .declare(Topology::new().exchange(&exchange).queue(queue.clone()))
        .await;
    nacking_queue(&broker, &exchange, "full.#").await;
    let port = closed_port();
    let proxy = Proxy::start(port).await;
    let relay = start_with(
        &AmqpConfig::new(url_via(port)),
        fast_outbox(&db),
        RelayConfig {
            reconnect_after_nacked_batches: 3,
            ..fast()
        },
    );

    // Control: publishes the broker takes keep the one connection.
    for n in 0..5 {
        let event = Envelope::new("OrderPlaced", "orders", json!({ "order_id": n }));
        enqueue(&db, &exchange, "order.placed", &event).await;
    }
    common::eventually("the relay publishes the accepted events", || async {
        relay.status.borrow().published == 5
    })
    .await;
    assert_eq!(proxy.sent(CONNECTION_OPEN), 1);

    // Every publish of this row is nacked; it is retried (20 ms, then up to 100 ms apart), a
    // batch of its own each time.
    let refused = Envelope::new("OrderPlaced", "orders", json!({ "order_id": 99 }));
    enqueue(&db, &exchange, "full.placed", &refused).await;
    common::eventually("the relay opens a new connection", || async {
        proxy.sent(CONNECTION_OPEN) >= 2
    })
    .await;
    let status = relay.status.borrow().clone();
    assert!(status.failed >= 3, "{status:?}");
    relay.stop().await;
}

/// Found by a user trial: under a stream of new rows that a full queue refuses, the relay
/// reconnected after every few nacked batches, as fast as the rows came (14 connections a
/// second). It now waits between those reconnections as between failed connections, doubling
/// up to `max_reconnect_backoff`. The control is the count itself: one reconnection per
/// nacked batch would open about one connection per row here.
#[tokio::test]
async fn a_relay_reconnecting_over_nacks_backs_off() {
    common::init_tracing();
    let broker = Broker::new().await;
    let (_test_db, db) = service().await;
    let exchange = common::unique("orders.events");
    broker.declare(Topology::new().exchange(&exchange)).await;
    nacking_queue(&broker, &exchange, "full.#").await;
    let port = closed_port();
    let proxy = Proxy::start(port).await;
    let relay = start_with(
        &AmqpConfig::new(url_via(port)),
        fast_outbox(&db),
        RelayConfig {
            reconnect_after_nacked_batches: 1,
            reconnect_backoff: std::time::Duration::from_millis(300),
            max_reconnect_backoff: std::time::Duration::from_millis(600),
            ..fast()
        },
    );
    // 30 rows, one every 50 ms: 1.5 s of refused publishes.
    for n in 0..30 {
        let event = Envelope::new("OrderPlaced", "orders", json!({ "order_id": n }));
        enqueue(&db, &exchange, "full.placed", &event).await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let opened = proxy.sent(CONNECTION_OPEN);
    assert!(opened >= 2, "it reconnects at all: {opened}");
    // 300, 600, 600 ms…: at most 5 reconnections in 1.5 s, and the first connection.
    assert!(opened <= 6, "{opened} connections in 1.5 s");
    relay.stop().await;
}
