//! Configuration at its extremes: timeouts too long for a clock to add mean "wait forever",
//! never a panic in a deadline computation.

use std::time::Duration;

use svcdb::__private::MigrationLock;
use svcdb::testing::TestDb;
use svcdb::{Config, ServiceDb};

#[tokio::test]
async fn huge_timeouts_wait_forever_instead_of_panicking() {
    let db = TestDb::new().await;
    // 1e19 s parses (a Duration holds up to u64::MAX s), but `Instant::now() + it` overflows.
    let huge = "1e19";
    let mut config = Config::from_lookup(|key| match key {
        "DATABASE_URL" => Some(db.url()),
        "SVCDB_SCHEMA" => Some("limits".into()),
        "SVCDB_POOL_MIN" => Some("1".into()),
        "SVCDB_ACQUIRE_TIMEOUT"
        | "SVCDB_CONNECT_TIMEOUT"
        | "SVCDB_IDLE_TIMEOUT"
        | "SVCDB_MAX_LIFETIME"
        | "SVCDB_MAX_LIFETIME_JITTER"
        | "SVCDB_VERIFY_AFTER_IDLE" => Some(huge.into()),
        _ => None,
    })
    .unwrap();
    assert!(config.acquire_timeout > Duration::from_secs(u64::MAX / 2));
    config.create_schema = true;
    let svc = ServiceDb::connect(config).await.unwrap();
    let one: i32 = svc
        .get()
        .await
        .unwrap()
        .query_one("SELECT 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(one, 1);

    // The migration lock's wait (`--lock-wait`, MigrateOptions::lock_wait), at its maximum.
    let lock = MigrationLock::acquire(&svc, Duration::MAX, || {})
        .await
        .unwrap();
    lock.release().await.unwrap();
}
