//! Settings and names at their extremes: a confirm timeout too long for a clock to add waits
//! for the confirm as any other does, instead of panicking in the deadline computation; a name
//! AMQP cannot carry (over 255 bytes) is refused, instead of panicking in lapin.

use crate::common;

use std::time::Duration;

use common::Broker;
use svcdb::Envelope;
use svcdb_amqp::topology::{QueueSpec, Topology};
use svcdb_amqp::Error;

#[tokio::test]
async fn a_huge_confirm_timeout_publishes_instead_of_panicking() {
    let broker = Broker::new().await;
    let exchange = common::unique("limits");
    let queue = QueueSpec::new(common::unique("limits.q")).bind(&exchange, "#");
    broker
        .declare(Topology::new().exchange(&exchange).queue(queue.clone()))
        .await;
    let channel = broker.channel().await;
    let envelope = Envelope::new("Limits", "limits", serde_json::json!({}));
    svcdb_amqp::publish::publish_envelope(&channel, &exchange, "x", &envelope, Duration::MAX)
        .await
        .unwrap();
    common::eventually("the message reached its queue", || async {
        broker.ready(&queue.name).await == 1
    })
    .await;
}

/// A queue name of `len` bytes, unique to this run.
fn name_of(len: usize) -> String {
    let name = common::unique("limits");
    format!("{name}{}", "q".repeat(len - name.len()))
}

/// Found by a user trial: `svcdb events replay --queue <name>` panicked in lapin
/// (`ShortString exceeds maximum length`) for a queue of 252 to 255 bytes, whose dead-letter
/// queue `<queue>.dlq` AMQP cannot name, and for any longer queue.
#[tokio::test]
async fn a_replay_of_a_queue_whose_names_amqp_cannot_carry_is_refused_not_a_panic() {
    let config = common::amqp();
    for len in [252, 255, 256, 300] {
        let e = svcdb_amqp::replay_dead_letters(&config, &name_of(len), None)
            .await
            .unwrap_err();
        assert!(
            matches!(e, Error::InvalidName { what: "queue", .. }),
            "{len}: {e}"
        );
    }
    let e = svcdb_amqp::replay_dead_letters(&config, "", None)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidName { what: "queue", .. }), "{e}");
    // As in the trial: the queue exists (RabbitMQ takes its name), its dead-letter queue cannot.
    let broker = Broker::new().await;
    let channel = broker.channel().await;
    let existing = name_of(253);
    channel
        .queue_declare(
            existing.as_str().into(),
            lapin::options::QueueDeclareOptions::default(),
            Default::default(),
        )
        .await
        .unwrap();
    let replayed = svcdb_amqp::replay_dead_letters(&config, &existing, None).await;
    channel
        .queue_delete(existing.as_str().into(), Default::default())
        .await
        .unwrap();
    let e = replayed.unwrap_err();
    assert!(matches!(e, Error::InvalidName { what: "queue", .. }), "{e}");
    // The control: the longest name whose dead-letter queue fits is asked for.
    let e = svcdb_amqp::replay_dead_letters(&config, &name_of(251), None)
        .await
        .unwrap_err();
    assert!(e.is_not_found(), "{e}");
}

/// Found by a user trial: replaying a queue declared without svcdb's topology (so without a
/// dead-letter queue) told the user to drop a `.dlq` suffix they never typed. The error now
/// says whose dead letters are missing; a queue that does not exist at all names none.
#[tokio::test]
async fn a_replay_of_a_queue_without_a_dead_letter_queue_names_the_queue_it_belongs_to() {
    let config = common::amqp();
    let broker = Broker::new().await;
    let channel = broker.channel().await;
    let plain = common::unique("plain");
    channel
        .queue_declare(
            plain.as_str().into(),
            lapin::options::QueueDeclareOptions::default(),
            Default::default(),
        )
        .await
        .unwrap();
    let replayed = svcdb_amqp::replay_dead_letters(&config, &plain, None).await;
    channel
        .queue_delete(plain.as_str().into(), Default::default())
        .await
        .unwrap();
    match replayed.unwrap_err() {
        Error::QueueNotFound {
            queue,
            dead_letters_of,
        } => {
            assert_eq!(queue, format!("{plain}.dlq"));
            assert_eq!(dead_letters_of, Some(plain));
        }
        other => panic!("expected QueueNotFound, got {other}"),
    }
    // The control: a queue that does not exist is the one missing, with no owner.
    let missing = common::unique("missing");
    match svcdb_amqp::replay_dead_letters(&config, &missing, None)
        .await
        .unwrap_err()
    {
        Error::QueueNotFound {
            queue,
            dead_letters_of,
        } => assert_eq!((queue, dead_letters_of), (missing, None)),
        other => panic!("expected QueueNotFound, got {other}"),
    }
}

/// `Topology::delete` sent its names unchecked: one over 255 bytes (a queue's, its dead-letter
/// queue's, an exchange's) made lapin panic.
#[tokio::test]
async fn deleting_names_amqp_cannot_carry_is_refused_not_a_panic() {
    let broker = Broker::new().await;
    for topology in [
        Topology::new().queue(QueueSpec::new(name_of(252))),
        Topology::new().queue(QueueSpec::new(name_of(300))),
        Topology::new().exchange(name_of(256)),
    ] {
        let e = topology.delete(&broker.connection).await.unwrap_err();
        assert!(matches!(e, Error::InvalidName { .. }), "{e}");
    }
    // The control: names that fit are deleted (absent ones too).
    Topology::new()
        .queue(QueueSpec::new(name_of(251)))
        .exchange(name_of(255))
        .delete(&broker.connection)
        .await
        .unwrap();
}
