//! Connecting (and failing to, clearly) and declaring topology, against the real RabbitMQ.

use crate::common;

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

/// Found by a user trial: a broker stopped with `SIGSTOP` left its clients "connected" for two
/// minutes (RabbitMQ proposes a 60 s heartbeat, and lapin waits two of them). svcdb asks for
/// [`svcdb_amqp::DEFAULT_HEARTBEAT_SECS`] unless the URL names a heartbeat; the broker's 60 is
/// the control: without the default, that is what the connection gets.
#[tokio::test]
async fn the_heartbeat_is_ten_seconds_unless_the_url_names_one() {
    let url = common::amqp_url();
    let separator = if url.contains('?') { '&' } else { '?' };
    for (config, expected) in [
        (
            AmqpConfig::new(url.clone()),
            svcdb_amqp::DEFAULT_HEARTBEAT_SECS,
        ),
        (AmqpConfig::new(format!("{url}{separator}heartbeat=30")), 30),
    ] {
        let connection = config.connect().await.unwrap();
        assert_eq!(connection.configuration().heartbeat(), expected);
        let _ = connection.close(200, "OK".into()).await;
    }
}

/// A broker that goes silent with its connections open (the proxy stops passing bytes either
/// way, as a paused VM or a frozen process does) is noticed within two heartbeats, not at the
/// next publish: the connection reports itself lost, so consumers and relays reconnect.
#[tokio::test]
async fn a_broker_gone_silent_is_noticed_within_two_heartbeats() {
    let port = common::closed_port();
    let proxy = common::Proxy::start(port).await;
    let config = AmqpConfig::new(format!("{}?heartbeat=1", common::url_via(port)));
    let connection = config.connect().await.unwrap();
    assert!(connection.status().connected());
    proxy.silence();
    let noticed = tokio::time::timeout(Duration::from_secs(10), async {
        while connection.status().connected() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        noticed.is_ok(),
        "still connected 10 s after the broker went silent"
    );
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

#[tokio::test]
async fn rabbitmq_refuses_to_declare_amq_names_and_topology_refuses_them_first() {
    use lapin::options::ExchangeDeclareOptions;
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    use lapin::types::FieldTable;

    let broker = Broker::new().await;
    let name = format!("amq.{}", common::unique("reserved"));
    // Deleted at the end in case the broker took it after all (then the test fails anyway).
    broker.delete_later(Topology::new().exchange(&name));

    let e = Topology::new()
        .exchange(&name)
        .declare(&broker.connection)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidName {
                what: "exchange",
                ..
            }
        ),
        "{e}"
    );

    // The control: the rule is RabbitMQ's. Declared anyway, the name is refused with
    // ACCESS_REFUSED (which closes the channel: why topology checks first).
    let channel = broker.connection.create_channel().await.unwrap();
    let refused = channel
        .exchange_declare(
            name.as_str().into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            refused.kind(),
            lapin::ErrorKind::ProtocolError(amqp)
                if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED))
        ),
        "{refused}"
    );
}

/// Found by a user trial: a vhost over AMQP's 255 bytes made lapin panic
/// (`ShortString exceeds maximum length`) while connecting, as `svcdb health` did.
#[tokio::test]
async fn a_vhost_amqp_cannot_carry_is_a_config_error_not_a_panic() {
    let uri = lapin::uri::AMQPUri::from_str(&common::amqp_url()).unwrap();
    let user = &uri.authority.userinfo;
    let long = AmqpConfig::new(url_with(
        &user.username,
        &user.password,
        None,
        &"v".repeat(300),
    ));
    let e = long.connect().await.unwrap_err();
    assert!(
        matches!(&e, Error::Config { key, .. } if key == "AMQP_URL"),
        "{e}"
    );
    // The control: a vhost of 255 bytes is sent, and the broker says it does not exist.
    let longest = AmqpConfig::new(url_with(
        &user.username,
        &user.password,
        None,
        &"v".repeat(255),
    ));
    let e = longest.connect().await.unwrap_err();
    assert!(matches!(e, Error::Refused { .. }), "{e}");
}

/// Found by a user trial: with a list of URLs where one node refused the login and the other
/// was down, the error was only the last node's "connection refused" (and its hint to start
/// RabbitMQ), hiding the wrong password.
#[tokio::test]
async fn when_no_node_connects_every_node_failure_is_named_a_refused_login_first() {
    use svcdb::error::Report;
    let refused_login = url_with("guest", "definitely-wrong", None, "%2f");
    let down = url_with(
        "guest",
        "definitely-wrong",
        Some(common::closed_port()),
        "%2f",
    );
    // What each node says on its own.
    let refused = AmqpConfig::new(&refused_login).connect().await.unwrap_err();
    let unreachable = AmqpConfig::new(&down).connect().await.unwrap_err();
    assert!(matches!(refused, Error::AccessRefused { .. }), "{refused}");
    assert!(
        matches!(unreachable, Error::Unreachable { .. }),
        "{unreachable}"
    );

    for urls in [[&refused_login, &down], [&down, &refused_login]] {
        let config = AmqpConfig::cluster(urls);
        let e = config.connect().await.unwrap_err();
        let urls = config.redacted_url();
        let report = Report::new(&e);
        for node in [&refused, &unreachable] {
            assert!(
                report.message().contains(Report::new(node).message()),
                "{urls}: {e}"
            );
        }
        // The refused login's hint leads; the unreachable node's follows.
        assert_eq!(
            report.hints(),
            [
                Report::new(&refused).hints(),
                Report::new(&unreachable).hints()
            ]
            .concat(),
            "{urls}: {e}"
        );
        assert!(
            !e.is_connection_error(),
            "reconnecting will not fix a password: {e}"
        );
        assert!(
            matches!(&e, Error::NoNodeConnected { failures } if failures.len() == 2),
            "{e:?}"
        );
        for text in [e.to_string(), format!("{e:?}")] {
            assert!(!text.contains("definitely-wrong"), "{text}");
        }
    }

    // Every node down: a connection error, which reconnecting may fix.
    let other_down = url_with("guest", "guest", Some(common::closed_port()), "%2f");
    let e = AmqpConfig::cluster([&down, &other_down])
        .connect()
        .await
        .unwrap_err();
    assert!(e.is_connection_error(), "{e}");
}
