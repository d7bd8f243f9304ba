//! `shop demo` and `shop serve` as a user runs them, against the real PostgreSQL and RabbitMQ
//! (`SVCDB_TEST_DATABASE_URL` and `SVCDB_TEST_AMQP_URL` override the local defaults). Each
//! run uses a database of its own, which also prefixes its roles, exchanges and queues, so
//! these tests run in parallel with each other and with the rest of the suite.

use std::process::Output;

use serde_json::Value;
use svcdb::tokio_postgres::NoTls;
use svcdb_amqp::lapin::options::QueueDeclareOptions;
use svcdb_amqp::lapin::types::FieldTable;
use svcdb_amqp::AmqpConfig;
use tokio::process::Command;

fn admin_url() -> String {
    std::env::var("SVCDB_TEST_DATABASE_URL")
        .unwrap_or_else(|_| svcdb::testing::DEFAULT_ADMIN_URL.to_owned())
}

fn amqp_url() -> String {
    std::env::var("SVCDB_TEST_AMQP_URL")
        .unwrap_or_else(|_| svcdb_amqp::config::DEFAULT_URL.to_owned())
}

/// A database name no other run uses. svcdb's test prefix, so that `scripts/test` drops what
/// a killed run left behind, as it does for svcdb's own tests.
fn unique_database() -> String {
    let id = uuid::Uuid::now_v7().simple().to_string();
    format!(
        "{}shop_{}",
        svcdb::testing::DATABASE_PREFIX,
        &id[id.len() - 12..]
    )
}

/// Runs `shop clean` on drop, so a failed test leaves nothing behind either.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let status = std::process::Command::new(env!("CARGO_BIN_EXE_shop"))
            .args(["clean", "--database", &self.0])
            .args(["--database-url", &admin_url(), "--amqp-url", &amqp_url()])
            .stdout(std::process::Stdio::null())
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!(
                "warning: shop clean --database {} failed: {status:?}",
                self.0
            );
        }
    }
}

/// `shop demo --json` with `args`; the output and the JSON report on its last line.
async fn demo(database: &str, args: &[&str]) -> (Output, Value) {
    let output = Command::new(env!("CARGO_BIN_EXE_shop"))
        .args(["demo", "--json", "--database", database])
        .args(["--database-url", &admin_url(), "--amqp-url", &amqp_url()])
        .args(args)
        .output()
        .await
        .expect("shop runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    let report = serde_json::from_str(last).unwrap_or_else(|e| {
        panic!(
            "the last line is not the JSON report ({e}):\n{stdout}\nstderr:\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output, report)
}

/// Panics with every failed check and the output, unless the run succeeded with `ok: true`.
fn assert_ok(output: &Output, report: &Value) {
    let failed: Vec<&Value> = report["checks"]
        .as_array()
        .map(|checks| checks.iter().filter(|c| c["ok"] != true).collect())
        .unwrap_or_default();
    assert!(
        output.status.success() && report["ok"] == true && failed.is_empty(),
        "exit {:?}, failed checks {failed:#?}\n{}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

async fn database_exists(database: &str) -> bool {
    let (client, connection) = svcdb::tokio_postgres::connect(&admin_url(), NoTls)
        .await
        .expect("tests need PostgreSQL (run scripts/services)");
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT FROM pg_database WHERE datname = $1),
                    (SELECT count(*) FROM pg_roles WHERE starts_with(rolname, $1 || '_'))",
            &[&database],
        )
        .await
        .unwrap();
    let (exists, roles): (bool, i64) = (row.get(0), row.get(1));
    assert_eq!(
        exists,
        roles == 4,
        "the database and its 4 roles come and go together"
    );
    exists
}

/// Whether the catalog's queue of this run exists on the broker.
async fn queue_exists(database: &str) -> bool {
    let connection = AmqpConfig::new(amqp_url())
        .connect()
        .await
        .expect("tests need RabbitMQ (run scripts/services)");
    let channel = connection.create_channel().await.unwrap();
    let declared = channel
        .queue_declare(
            format!("{database}.catalog.reserve-stock").as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    let _ = connection.close(200, "OK".into()).await;
    declared.is_ok()
}

#[tokio::test]
async fn the_demo_holds_every_invariant_and_leaves_nothing_behind() {
    let database = unique_database();
    let _cleanup = Cleanup(database.clone());
    let (output, report) = demo(&database, &["--orders", "20", "--duplicates", "10"]).await;
    assert_ok(&output, &report);

    assert_eq!(report["database"], database.as_str());
    assert_eq!(report["orders"], 20);
    let decided = report["confirmed"].as_i64().unwrap() + report["rejected"].as_i64().unwrap();
    assert_eq!(decided, 20, "{report}");
    assert_eq!(report["undecided"], 0);
    assert_eq!(report["outbox_unpublished"], 0);
    assert_eq!(report["dead_lettered"], 1, "only the malformed message");
    assert_eq!(report["duplicates_injected"], 10);
    // 10 copies reach two queues each; the crash adds at least one redelivery.
    assert!(
        report["duplicates_absorbed"].as_u64().unwrap() >= 21,
        "{report}"
    );
    // Every OrderPlaced handled by catalog and cart, every answer by orders, every
    // UserRegistered (5 users for 20 orders) by cart: once each.
    assert_eq!(report["events_handled"], 3 * 20 + 5);
    let stdout = String::from_utf8_lossy(&output.stdout);
    for narrated in [
        "the start-up gate refused to take traffic",
        "permission denied for schema catalog_schema",
        "everything this command did was rolled back",
        "the ack was lost",
        "events waiting; relay connected = false",
    ] {
        assert!(
            stdout.contains(narrated),
            "missing {narrated:?} in:\n{stdout}"
        );
    }

    assert!(
        !database_exists(&database).await,
        "the database was dropped"
    );
    assert!(!queue_exists(&database).await, "the queues were deleted");
}

/// `--keep` leaves everything; a rerun on the same database starts from scratch anyway;
/// `shop clean` removes what is left. One test, so that no more than two demos (this one and
/// the one above) share the server's connections at a time.
#[tokio::test]
async fn keep_then_rerun_then_clean() {
    let database = unique_database();
    let _cleanup = Cleanup(database.clone());
    let small = ["--orders", "10", "--duplicates", "5", "--keep"];
    let (output, report) = demo(&database, &small).await;
    assert_ok(&output, &report);
    assert!(
        database_exists(&database).await,
        "--keep keeps the database"
    );
    assert!(queue_exists(&database).await, "--keep keeps the queues");

    // The leftovers (a message in a dead-letter queue among them) are removed first, so the
    // run's checks hold as on a fresh machine.
    let (output, report) = demo(&database, &small).await;
    assert_ok(&output, &report);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("dropped the previous run's database"),
        "{stdout}"
    );
    assert!(stdout.contains(&format!("shop clean --database {database}")));

    let output = Command::new(env!("CARGO_BIN_EXE_shop"))
        .args(["clean", "--database", &database])
        .args(["--database-url", &admin_url(), "--amqp-url", &amqp_url()])
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert!(!database_exists(&database).await);
    assert!(!queue_exists(&database).await);
}

#[tokio::test]
async fn serve_refuses_a_schema_whose_migrations_did_not_run() {
    let db = svcdb::testing::TestDb::new().await;
    let (role, _) = db.provision("orders", "orders_schema").await;
    let output = Command::new(env!("CARGO_BIN_EXE_shop"))
        .args(["serve", "orders", "--listen", "127.0.0.1:0"])
        .env("DATABASE_URL", db.url_as(&role))
        .env("SHOP_NAMESPACE", db.name())
        .env("AMQP_URL", amqp_url())
        .env_remove("SVCDB_SCHEMA")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    for expected in [
        "not ready: schema orders_schema has 3 problems",
        "migrations never ran",
        "table orders is missing",
        "table order_lines is missing",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
}

/// Regression: `shop demo` dropped any database with its name, and `shop` is a likely name
/// for a user's own database.
#[tokio::test]
async fn a_database_the_demo_did_not_make_is_left_alone() {
    let db = svcdb::testing::TestDb::new().await;
    db.admin()
        .await
        .batch_execute("CREATE TABLE precious (id int); INSERT INTO precious VALUES (1)")
        .await
        .unwrap();
    for command in ["demo", "clean"] {
        let output = Command::new(env!("CARGO_BIN_EXE_shop"))
            .args([command, "--database", db.name()])
            .args(["--database-url", &admin_url(), "--amqp-url", &amqp_url()])
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "shop {command}: {stderr}");
        assert!(stderr.contains("was not made by `shop demo`"), "{stderr}");
    }
    let kept: i64 = db
        .admin()
        .await
        .query_one("SELECT count(*) FROM precious", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 1, "the database and its data are untouched");
}
