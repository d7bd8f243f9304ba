//! Connecting (and failing to, clearly) and declaring topology, against the real RabbitMQ.

mod common;

use std::str::FromStr;
use std::time::Duration;

use common::Broker;
use svcdb_amqp::topology::{QueueSpec, Topology};
use svcdb_amqp::{AmqpConfig, Error};

/// The test broker's URL with other credentials, vhost or port.
fn url_with(user: &str, password: &str, port: Option<u16>, vhost: &str) -> String {
    let uri = lapin::uri::AMQPUri::from_str(&common::amqp_url()).unwrap();
    let port = port.unwrap_or(uri.authority.port);
    format!(
        "amqp://{user}:{password}@{}:{port}/{vhost}",
        uri.authority.host
    )
}

#[tokio::test]
async fn connection_refused_is_unreachable_and_hides_the_password() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = AmqpConfig::new(url_with("svc", "s3cret-pw", Some(port), "%2f"));
    let e = config.connect().await.unwrap_err();
    assert!(matches!(e, Error::Unreachable { .. }), "{e}");
    assert!(e.is_connection_error());
    let text = e.to_string();
    assert!(
        text.contains("amqp://svc@") && text.contains("refused"),
        "{text}"
    );
    assert!(
        !text.contains("s3cret-pw") && !format!("{e:?}").contains("s3cret-pw"),
        "{text}"
    );
}

#[tokio::test]
async fn bad_credentials_are_access_refused() {
    let config = AmqpConfig::new(url_with("guest", "definitely-wrong", None, "%2f"));
    let e = config.connect().await.unwrap_err();
    assert!(
        matches!(&e, Error::AccessRefused { user, .. } if user == "guest"),
        "{e}"
    );
    assert!(
        !e.is_connection_error(),
        "reconnecting will not fix a password"
    );
    let text = e.to_string();
    assert!(
        text.contains("ACCESS_REFUSED") && !text.contains("definitely-wrong"),
        "{text}"
    );
}

#[tokio::test]
async fn an_unknown_vhost_is_refused() {
    let uri = lapin::uri::AMQPUri::from_str(&common::amqp_url()).unwrap();
    let user = &uri.authority.userinfo;
    let config = AmqpConfig::new(url_with(
        &user.username,
        &user.password,
        None,
        "no-such-vhost",
    ));
    let e = config.connect().await.unwrap_err();
    assert!(matches!(e, Error::Refused { .. }), "{e}");
    assert!(e.to_string().contains("no-such-vhost"), "{e}");
}

#[tokio::test]
async fn a_silent_server_times_out() {
    // Accepts TCP connections and never says a word.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let mut config = AmqpConfig::new(url_with("guest", "guest", Some(port), "%2f"));
    config.connect_timeout = Duration::from_millis(300);
    let e = config.connect().await.unwrap_err();
    assert!(matches!(e, Error::ConnectTimeout { .. }), "{e}");
    assert!(e.is_connection_error());
    holder.abort();
}

#[tokio::test]
async fn declaring_is_idempotent_and_conflicts_are_explained() {
    let broker = Broker::new().await;
    let exchange = common::unique("catalog.events");
    let queue = QueueSpec::new(common::unique("orders.reserve")).bind(&exchange, "product.#");
    let topology = Topology::new().exchange(&exchange).queue(queue.clone());
    broker.declare(topology.clone()).await;
    topology
        .declare(&broker.connection)
        .await
        .expect("declaring again is a no-op");

    // The same queue with another delivery limit: the broker refuses, and says how to fix it.
    let changed = Topology::new().queue(queue.clone().with_max_deliveries(9));
    let e = changed.declare(&broker.connection).await.unwrap_err();
    assert!(
        matches!(e, Error::Amqp { .. }) && !e.is_connection_error(),
        "{e}"
    );
    let text = e.to_string();
    assert!(
        text.contains("PRECONDITION_FAILED") && text.contains("hint:"),
        "{text}"
    );
    assert!(text.contains(&queue.name), "{text}");

    // The refusal closed only the declaring channel.
    assert!(broker.connection.status().connected());
    assert_eq!(broker.ready(&queue.dead_letter_queue()).await, 0);
}
