//! `svcdb schema tables`, `svcdb schema verify` and `svcdb health` end to end: the real binary
//! against a throwaway database. Outcomes are matched by exit code and `--json` fields.

use crate::common;

use std::time::{Duration, Instant};

use common::{svcdb, Project};
use serde_json::Value;

/// The orders service's migrations.
const ORDERS: &[(&str, &str)] = &[
    (
        "0001_orders.up.sql",
        "CREATE TABLE orders (id bigint PRIMARY KEY);",
    ),
    (
        "0002_open_orders.up.sql",
        "CREATE VIEW open_orders AS SELECT * FROM orders;",
    ),
];

/// The `kind` of each problem in a report.
fn kinds(report: &Value) -> Vec<&str> {
    report["problems"]
        .as_array()
        .unwrap_or_else(|| panic!("no problems list: {report}"))
        .iter()
        .map(|p| p["kind"].as_str().expect("a kind"))
        .collect()
}

/// A TCP port on 127.0.0.1 where nothing listens.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test]
async fn verify_lists_every_problem_until_migrated_then_passes() {
    let p = Project::new().await;
    p.write(ORDERS);
    p.db.service(&p.schema).await; // the schema exists; nothing else

    let out = p
        .run(&["schema", "verify", "--require", "orders,payments"])
        .expect_code(1);
    for needle in [
        "not ready",
        "never ran",
        "orders is missing",
        "payments is missing",
        "svcdb migrate up",
    ] {
        assert!(out.stdout.contains(needle), "{needle}: {out}");
    }
    let report = p
        .run(&["schema", "verify", "--require", "orders,payments", "--json"])
        .expect_code(1)
        .json();
    assert_eq!(report["ready"], false);
    assert_eq!(
        kinds(&report),
        ["no_history", "missing_table", "missing_table"]
    );

    p.run(&["migrate", "up"]).expect_code(0);
    let report = p
        .run(&["schema", "verify", "--require", "orders", "--json"])
        .expect_code(0)
        .json();
    assert_eq!(report["ready"], true);
    assert_eq!(report["migration_version"], "0002");
    assert_eq!(report["migrations_checked"], true);
    let out = p.run(&["schema", "verify"]).expect_code(0);
    assert!(
        out.stdout.starts_with("ready: schema svc, migration 0002"),
        "{out}"
    );

    p.write(&[("0003_payments.up.sql", "CREATE TABLE payments (id int);")]);
    let report = p
        .run(&["schema", "verify", "--require", "payments", "--json"])
        .expect_code(1)
        .json();
    assert_eq!(kinds(&report), ["pending", "missing_table"]);
    assert_eq!(report["problems"][0]["version"], "0003");
}

#[tokio::test]
async fn verify_without_a_migrations_folder() {
    let p = Project::new().await;
    p.db.service(&p.schema).await;
    let url = p.db.url();
    let env = [("DATABASE_URL", url.as_str()), ("SVCDB_SCHEMA", "svc")];

    // The default ./migrations is missing: schema and tables only, and the report says so.
    let out = svcdb(&["schema", "verify", "--json"], &env, Some(p.root.path())).expect_code(0);
    assert_eq!(out.json()["migrations_checked"], false);
    assert!(out.stderr.contains("not checked"), "{out}");

    // A folder someone named must exist.
    let out = svcdb(
        &["schema", "verify", "--dir", "elsewhere"],
        &env,
        Some(p.root.path()),
    )
    .expect_code(1);
    assert!(out.stderr.contains("elsewhere"), "{out}");
}

#[tokio::test]
async fn tables_lists_names_and_kinds() {
    let p = Project::new().await;
    p.write(ORDERS);
    p.run(&["migrate", "up"]).expect_code(0);

    let listing = p.run(&["schema", "tables", "--json"]).expect_code(0).json();
    assert_eq!(listing["schema"], "svc");
    assert_eq!(
        listing["tables"],
        serde_json::json!([
            {"name": "open_orders", "kind": "view"},
            {"name": "orders", "kind": "table"},
            {"name": "svcdb_migrations", "kind": "table"},
        ])
    );
    let out = p.run(&["schema", "tables"]).expect_code(0);
    assert!(
        out.stdout.contains("open_orders") && out.stdout.contains("view"),
        "{out}"
    );
}

/// Found by a user trial: with an applied migration removed on purpose (older than ones still
/// shipped), `migrate up --ignore-missing` passed and `health` and `schema verify` stayed "not
/// ready", with no way to accept it. They take `--ignore-missing` too; without it they still
/// refuse (the control).
#[tokio::test]
async fn a_migration_removed_on_purpose_is_accepted_by_the_gate_with_ignore_missing() {
    let p = Project::new().await;
    p.write(ORDERS);
    p.run(&["migrate", "up"]).expect_code(0);
    std::fs::remove_file(p.migrations().join("0001_orders.up.sql")).unwrap();

    let out = p.run(&["migrate", "up"]).expect_code(1);
    assert!(
        out.stderr.contains("svcdb health --ignore-missing"),
        "{out}"
    );
    p.run(&["migrate", "up", "--ignore-missing"]).expect_code(0);
    for command in ["health", "verify"] {
        let args: &[&str] = if command == "health" {
            &["health", "--json"]
        } else {
            &["schema", "verify", "--json"]
        };
        let report = p.run(args).expect_code(1).json();
        assert_eq!(kinds(&report), ["unknown_applied"], "{report}");
        let mut accepting = args.to_vec();
        accepting.push("--ignore-missing");
        let report = p.run(&accepting).expect_code(0).json();
        assert_eq!(report["ready"], true, "{report}");
        // Accepted, not unseen (found by a user trial: the gap passed without a word).
        assert_eq!(
            report["notices"][0]["kind"], "unknown_applied_accepted",
            "{report}"
        );
        assert_eq!(report["notices"][0]["version"], "0001", "{report}");
    }
}

#[tokio::test]
async fn health_reports_the_database_the_pool_the_outbox_and_the_gate() {
    let p = Project::new().await;
    p.write(ORDERS);
    p.run(&["migrate", "up"]).expect_code(0);

    let report = p
        .run_with_env(&["health", "--json"], &[("SVCDB_POOL_MAX", "7")])
        .expect_code(0)
        .json();
    assert_eq!(report["ready"], true);
    assert_eq!(report["problems"], serde_json::json!([]));
    assert_eq!(report["database"]["reachable"], true);
    let latency = report["database"]["latency_ms"].as_f64();
    assert!(latency.is_some_and(|ms| ms > 0.0), "{report}");
    assert_eq!(report["migration_version"], "0002");
    assert_eq!(report["pool"]["max_size"], 7, "the configured pool");
    assert_eq!(report["outbox"], serde_json::Value::Null, "no outbox table");

    p.db.service("svc").await.install_outbox().await.unwrap();
    let report = p.run(&["health", "--json"]).expect_code(0).json();
    assert_eq!(report["outbox"]["rows"], 0, "{report}");
    assert_eq!(
        report["outbox"]["oldest_age_seconds"],
        serde_json::Value::Null
    );

    p.db.admin()
        .await
        .batch_execute("DROP VIEW svc.open_orders")
        .await
        .unwrap();
    let report = p
        .run(&["health", "--require", "orders,open_orders", "--json"])
        .expect_code(1)
        .json();
    assert_eq!(kinds(&report), ["missing_table"]);
    assert_eq!(report["problems"][0]["table"], "open_orders");
}

/// Found by an operations review: `svcdb health` knew nothing of the broker, where a running
/// service's `/readyz` shows it. With `--amqp-url` (or `AMQP_URL`) it says whether RabbitMQ
/// answers; one that does not is reported without turning the verdict to "not ready", as in
/// `/readyz`, and without the password.
#[tokio::test]
async fn health_with_a_broker_says_whether_it_answers() {
    let p = Project::new().await;
    p.write(ORDERS);
    p.run(&["migrate", "up"]).expect_code(0);
    let broker = std::env::var("AMQP_URL").unwrap_or_else(|_| svcdb_amqp::DEFAULT_URL.to_owned());
    let report = p
        .run(&["health", "--json", "--amqp-url", &broker])
        .expect_code(0)
        .json();
    assert_eq!(report["broker"]["connected"], true, "{report}");
    assert!(
        report["broker"]["latency_ms"]
            .as_f64()
            .is_some_and(|ms| ms > 0.0),
        "{report}"
    );

    let down = format!("amqp://guest:s3cret-pw@127.0.0.1:{}/%2f", closed_port());
    let out = p
        .run(&["health", "--json", "--amqp-url", &down])
        .expect_code(0);
    let report = out.json();
    assert_eq!(report["ready"], true, "{out}");
    assert_eq!(report["broker"]["connected"], false, "{out}");
    assert!(report["broker"]["error"].is_string(), "{out}");
    // The hint in a field of its own, not after a line break in `error` (found by a user
    // trial).
    assert!(report["broker"]["hint"].is_string(), "{out}");
    assert!(
        !report["broker"]["error"]
            .as_str()
            .unwrap_or_default()
            .contains('\n'),
        "{out}"
    );
    assert!(!out.to_string().contains("s3cret-pw"), "{out}");
    // Without one, the report has no broker; nor with an empty AMQP_URL, which is unset (found
    // by a user trial: it failed the command on "not an AMQP URL").
    let report = p.run(&["health", "--json"]).expect_code(0).json();
    assert!(report.get("broker").is_none(), "{report}");
    let report = p
        .run_with_env(&["health", "--json"], &[("AMQP_URL", "")])
        .expect_code(0)
        .json();
    assert!(report.get("broker").is_none(), "{report}");
}

#[test]
fn health_of_an_unreachable_database_answers_within_the_timeout() {
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", closed_port());
    let env = [
        ("DATABASE_URL", url.as_str()),
        ("SVCDB_SCHEMA", "svc"),
        ("SVCDB_ACQUIRE_TIMEOUT", "30s"),
    ];
    let cwd = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = svcdb(
        &["health", "--timeout", "500ms", "--json"],
        &env,
        Some(cwd.path()),
    )
    .expect_code(1);
    // The bound is the behaviour: the 500 ms timeout, not the 30 s acquire timeout, ends the
    // check. Twenty times the timeout for a loaded machine, a third of the acquire timeout.
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "answered after {took:?}: {out}"
    );
    let report = out.json();
    assert_eq!(report["database"]["reachable"], false);
    assert_eq!(kinds(&report), ["unreachable"]);

    let out = svcdb(
        &["schema", "verify", "--timeout", "500ms"],
        &env,
        Some(cwd.path()),
    )
    .expect_code(1);
    assert!(out.stdout.contains("database unreachable"), "{out}");
}
