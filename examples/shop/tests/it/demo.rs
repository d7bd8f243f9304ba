//! `shop demo` and `shop serve` as a user runs them, against the real PostgreSQL and RabbitMQ
//! (`SVCDB_TEST_DATABASE_URL` and `SVCDB_TEST_AMQP_URL` override the local defaults). Each
//! run uses a database of its own, which also prefixes its roles, exchanges and queues, so
//! these tests run in parallel with each other and with the rest of the suite.

use std::process::{Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use svcdb::tokio_postgres::NoTls;
use svcdb_amqp::lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use svcdb_amqp::lapin::types::FieldTable;
use svcdb_amqp::lapin::ExchangeKind;
use svcdb_amqp::AmqpConfig;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

pub(crate) fn admin_url() -> String {
    std::env::var("SVCDB_TEST_DATABASE_URL")
        .unwrap_or_else(|_| svcdb::testing::DEFAULT_ADMIN_URL.to_owned())
}

pub(crate) fn amqp_url() -> String {
    std::env::var("SVCDB_TEST_AMQP_URL").unwrap_or_else(|_| svcdb_amqp::DEFAULT_URL.to_owned())
}

/// A database name no other run uses. svcdb's test prefix, so that `scripts/test` drops what
/// a killed run left behind, as it does for svcdb's own tests.
pub(crate) fn unique_database() -> String {
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
pub(crate) async fn demo(database: &str, args: &[&str]) -> (Output, Value) {
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
pub(crate) fn assert_ok(output: &Output, report: &Value) {
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

pub(crate) async fn database_exists(database: &str) -> bool {
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
pub(crate) async fn queue_exists(database: &str) -> bool {
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

/// Whether a `shop serve` of this run (its namespace is on its command line) is still running.
pub(crate) fn replicas_running(database: &str) -> Vec<String> {
    let mut running = Vec::new();
    for entry in std::fs::read_dir("/proc")
        .expect("/proc lists processes")
        .flatten()
    {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(" serve ") && cmdline.contains(database) {
            running.push(format!(
                "{}: {cmdline}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    running
}

/// Whether the orders service's exchange of this run exists on the broker.
async fn exchange_exists(database: &str) -> bool {
    let connection = AmqpConfig::new(amqp_url())
        .connect()
        .await
        .expect("tests need RabbitMQ (run scripts/services)");
    let channel = connection.create_channel().await.unwrap();
    let declared = channel
        .exchange_declare(
            format!("{database}.orders.events").as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    let _ = connection.close(200, "OK".into()).await;
    declared.is_ok()
}

/// Nothing of the run is left: no process, database, role, queue or exchange.
async fn assert_nothing_left(database: &str) {
    assert_eq!(
        replicas_running(database),
        Vec::<String>::new(),
        "no replica left running"
    );
    assert!(
        !database_exists(database).await,
        "the database and roles were dropped"
    );
    assert!(!queue_exists(database).await, "the queues were deleted");
    assert!(
        !exchange_exists(database).await,
        "the exchanges were deleted"
    );
}

/// The check of this name in the report.
pub(crate) fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .and_then(|checks| {
            checks
                .iter()
                .find(|c| c["name"].as_str().is_some_and(|n| n.starts_with(name)))
        })
        .unwrap_or_else(|| panic!("no check {name:?} in {report:#}"))
}

/// The multi-process deployment at small scale, with every fault but the broker restart
/// (which would disturb everything else using the broker): two replicas per service, lost
/// acknowledgements, one replica of each service killed mid-flight, backend kills.
#[tokio::test]
async fn the_demo_holds_every_invariant_and_leaves_nothing_behind() {
    let database = unique_database();
    let _cleanup = Cleanup(database.clone());
    let (output, report) = demo(
        &database,
        &[
            "--orders",
            "200",
            "--duplicates",
            "20",
            "--replicas",
            "2",
            "--lost-ack-rate",
            "0.05",
            "--redeliveries",
            "3",
            "--kills",
            "1",
            "--backend-kills",
            "2",
        ],
    )
    .await;
    assert_ok(&output, &report);

    assert_eq!(report["database"], database.as_str());
    assert_eq!(report["orders"], 200);
    let decided = report["confirmed"].as_i64().unwrap() + report["rejected"].as_i64().unwrap();
    assert_eq!(decided, 200, "{report}");
    assert_eq!(report["undecided"], 0);
    assert_eq!(report["lost_events"], 0);
    assert_eq!(report["wrong_state_changes"], 0);
    assert_eq!(report["stock_mismatches"], 0);
    assert_eq!(report["outbox_unpublished"], 0);
    assert_eq!(report["dead_lettered"], 1, "only the malformed message");
    assert_eq!(report["duplicates_injected"], 20);
    // The faults really happened: one replica of each of the 4 services killed, connections
    // terminated, acknowledgements lost; 20 copies reach two queues each.
    assert_eq!(report["replicas"], 2);
    assert_eq!(report["replicas_killed"], 4);
    assert!(report["backends_killed"].as_u64().unwrap() > 0, "{report}");
    assert!(report["acks_lost"].as_u64().unwrap() > 0, "{report}");
    assert!(
        report["duplicates_absorbed"].as_u64().unwrap() >= 40,
        "{report}"
    );
    for figure in [
        "orders_per_s",
        "order_latency_p50_ms",
        "order_latency_p99_ms",
    ] {
        assert!(report[figure].as_f64().unwrap() > 0.0, "{figure}: {report}");
    }
    assert_eq!(
        check(
            &report,
            "another service's schema answers permission denied"
        )["detail"],
        "12 of 12 pairs denied"
    );
    // Each subscriber's /metrics, scraped from its replicas, against its claims: every one of
    // the 4 services lost a replica to SIGKILL, so its count may fall short, never exceed.
    for service in ["catalog", "cart", "orders"] {
        let counts = &report["metrics"][service];
        let (handled, claims) = (counts["handled"].as_i64(), counts["claims"].as_i64());
        assert!(
            handled.is_some_and(|h| h > 0) && handled <= claims,
            "{service}: {counts}"
        );
        assert_eq!(
            check(
                &report,
                &format!("{service}'s /metrics agree with its database")
            )["ok"],
            true
        );
    }
    assert!(
        report["outage_backlog_peak"].as_i64().unwrap() > 0,
        "the outage's events waited in the outbox, per /metrics: {report}"
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    for narrated in [
        "shop serve orders (no --migrate) exited",
        "permission denied for schema",
        "everything this command did was rolled back",
        "SIGKILL",
        "pg_terminate_backend",
        "events wait in the outbox",
    ] {
        assert!(
            stdout.contains(narrated),
            "missing {narrated:?} in:\n{stdout}"
        );
    }
    assert_nothing_left(&database).await;
}

/// The control: the same scenario with the handlers forgetting their claims. The copies and
/// redeliveries are applied again, the checks that read the databases see it, and the demo
/// fails. Without this, the demo's checks could pass whatever the services did.
#[tokio::test]
async fn without_idempotency_the_checks_catch_the_damage() {
    let database = unique_database();
    let _cleanup = Cleanup(database.clone());
    let (output, report) = demo(
        &database,
        &[
            "--orders",
            "40",
            "--duplicates",
            "20",
            "--kills",
            "0",
            "--backend-kills",
            "0",
            "--without-idempotency",
        ],
    )
    .await;
    assert_eq!(output.status.code(), Some(1), "{report:#}");
    assert_eq!(report["ok"], false);
    assert!(
        report["wrong_state_changes"].as_i64().unwrap() > 0,
        "copies of handled OrderPlaced events were answered again: {report:#}"
    );
    assert_eq!(
        check(
            &report,
            "every event applied by each subscriber exactly once"
        )["ok"],
        false
    );
    assert_eq!(
        check(&report, "each subscriber's claims match")["ok"],
        false
    );
    // The services count what they handled; the claims they deleted disagree.
    assert_eq!(
        check(&report, "catalog's /metrics agree with its database")["ok"],
        false
    );
    assert_nothing_left(&database).await;
}

/// Ctrl-C in the middle of the orders: the demo stops every replica and removes everything
/// it made, then exits 130.
#[tokio::test]
async fn ctrl_c_stops_every_process_and_removes_everything() {
    let database = unique_database();
    let _cleanup = Cleanup(database.clone());
    let mut child = Command::new(env!("CARGO_BIN_EXE_shop"))
        .args(["demo", "--database", &database, "--orders", "2000"])
        .args(["--database-url", &admin_url(), "--amqp-url", &amqp_url()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("shop runs");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let flowing = tokio::time::timeout(Duration::from_secs(180), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let orders_flow = line.contains("shoppers at a time");
            seen.push(line);
            if orders_flow {
                return true;
            }
        }
        false
    })
    .await;
    assert!(
        matches!(flowing, Ok(true)),
        "the demo never got to its orders:\n{}",
        seen.join("\n")
    );
    assert!(
        !replicas_running(&database).is_empty(),
        "the replicas run as processes"
    );
    // SAFETY: kill(2) on our own child, not yet waited for.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(child.id().unwrap() as libc::pid_t, libc::SIGINT);
    }
    let rest = tokio::spawn(async move {
        let mut rest = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            rest.push(line);
        }
        rest
    });
    let status = tokio::time::timeout(Duration::from_secs(120), child.wait())
        .await
        .expect("the demo exits after Ctrl-C")
        .unwrap();
    let rest = rest.await.unwrap().join("\n");
    assert_eq!(status.code(), Some(130), "{rest}");
    assert!(rest.contains("the demo stopped: interrupted"), "{rest}");
    assert_nothing_left(&database).await;
}

/// `--keep` leaves everything; a rerun on the same database starts from scratch anyway;
/// `shop clean` removes what is left. One test, so that no more than two demos (this one and
/// the one above) share the server's connections at a time.
#[tokio::test]
async fn keep_then_rerun_then_clean() {
    let database = unique_database();
    let _cleanup = Cleanup(database.clone());
    let small = [
        "--orders",
        "10",
        "--duplicates",
        "5",
        "--kills",
        "0",
        "--backend-kills",
        "0",
        "--keep",
    ];
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
    // Without the cart's URL every order would fail while the replica said it was ready (a
    // user trial): refused at start, naming the setting.
    let output = Command::new(env!("CARGO_BIN_EXE_shop"))
        .args(["serve", "orders", "--listen", "127.0.0.1:0"])
        .env("DATABASE_URL", db.url_as(&role))
        .env("SHOP_NAMESPACE", db.name())
        .env("AMQP_URL", amqp_url())
        .env_remove("SVCDB_SCHEMA")
        .env_remove("SHOP_CART_URL")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("SHOP_CART_URL"), "{stderr}");
    // Nor with a URL that is none (found by a user trial: `127.0.0.1:8082` started, then
    // every order failed with "invalid format").
    let output = Command::new(env!("CARGO_BIN_EXE_shop"))
        .args(["serve", "orders", "--listen", "127.0.0.1:0"])
        .env("DATABASE_URL", db.url_as(&role))
        .env("SHOP_NAMESPACE", db.name())
        .env("AMQP_URL", amqp_url())
        .env("SHOP_CART_URL", "127.0.0.1:9")
        .env_remove("SVCDB_SCHEMA")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not an http:// URL"), "{stderr}");
    let output = Command::new(env!("CARGO_BIN_EXE_shop"))
        .args(["serve", "orders", "--listen", "127.0.0.1:0"])
        .env("DATABASE_URL", db.url_as(&role))
        .env("SHOP_NAMESPACE", db.name())
        .env("AMQP_URL", amqp_url())
        .env("SHOP_CART_URL", "http://127.0.0.1:9")
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
        // The shop's migrations are in the binary: the way to run them.
        "shop serve orders --migrate",
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
    // A live system's queue under the same name: `shop clean` deleted it before refusing the
    // database (found by a user trial; its dead letters went with it).
    let connection = AmqpConfig::new(amqp_url()).connect().await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let queue = format!("{}.catalog.reserve-stock", db.name());
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
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
    assert!(
        queue_exists(db.name()).await,
        "the live system's queue is untouched"
    );
    channel
        .queue_delete(queue.as_str().into(), Default::default())
        .await
        .unwrap();
    let _ = connection.close(200, "OK".into()).await;
}
