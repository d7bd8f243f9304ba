//! What the failover tests of a PostgreSQL and of a RabbitMQ cluster share: the cluster
//! script, patient waits, and the `shipments` table that shows an event handled twice.

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use svcdb::ServiceDb;

/// Runs `scripts/cluster <args>` (`pg promote`, `rabbit stop-node 1`), panicking with its
/// output if it fails.
pub fn script(args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/cluster");
    let out = Command::new(script)
        .args(args)
        .output()
        .expect("scripts/cluster runs");
    assert!(
        out.status.success(),
        "scripts/cluster {} failed:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Polls `condition` every 20 ms for up to `limit`; panics with `what` if it never holds.
pub async fn within<F, Fut>(limit: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !condition().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One row per handled event, deliberately without a unique key: an event handled twice
/// shows as two rows.
pub async fn create_shipments(shipping: &ServiceDb) {
    shipping
        .get()
        .await
        .unwrap()
        .batch_execute("CREATE TABLE shipments (event_id uuid NOT NULL)")
        .await
        .unwrap();
}

/// How many times each event was handled, from the `shipments` table.
pub async fn shipments(shipping: &ServiceDb) -> HashMap<uuid::Uuid, i64> {
    let mut shipments: HashMap<uuid::Uuid, i64> = HashMap::new();
    for row in shipping
        .get()
        .await
        .unwrap()
        .query("SELECT event_id FROM shipments", &[])
        .await
        .unwrap()
    {
        *shipments.entry(row.get(0)).or_default() += 1;
    }
    shipments
}
