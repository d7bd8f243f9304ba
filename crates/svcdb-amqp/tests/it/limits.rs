//! Settings at their extremes: a confirm timeout too long for a clock to add waits for the
//! confirm as any other does, instead of panicking in the deadline computation.

use crate::common;

use std::time::Duration;

use common::Broker;
use svcdb::Envelope;
use svcdb_amqp::topology::{QueueSpec, Topology};

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
