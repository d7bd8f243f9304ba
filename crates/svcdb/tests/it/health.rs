//! Health reports and the `/healthz` and `/readyz` endpoints against a real PostgreSQL, and
//! against databases that are gone: a closed port and a server that never answers.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use svcdb::testing::{closed_port, TestDb};
use svcdb::{Config, ServiceDb};
use svcdb::{Gate, Problem};
use tower::ServiceExt;

/// Sends `GET path` to the router without a socket; the status and the body (JSON when it is).
async fn get(db: &ServiceDb, gate: &Gate, path: &str) -> (StatusCode, Value, String) {
    let router: axum::Router = svcdb::http::router(db.clone(), gate.clone());
    let response = router
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::Null),
        text,
    )
}

/// The orders service, migrated: one migration creating `orders`.
async fn migrated_orders(db: &TestDb) -> (ServiceDb, Gate, tempfile::TempDir) {
    let svc = db.service("orders_svc").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("0001_orders.up.sql"),
        "CREATE TABLE orders (id bigint PRIMARY KEY);",
    )
    .unwrap();
    let migrations = svcdb::migrate::Migrations::from_dir(dir.path()).unwrap();
    svcdb::migrate::Migrator::new(svc.clone(), migrations.clone())
        .up()
        .await
        .unwrap();
    let gate = Gate::new()
        .with_migrations(migrations)
        .require(["orders"])
        .unwrap();
    (svc, gate, dir)
}

/// A config for a database at 127.0.0.1:`port`, with long acquire and connect timeouts
/// ([`POOL_WAIT`]) so only the gate's timeout can bound the checks.
fn config_at(port: u16) -> Config {
    let mut config = Config::new(
        &format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        "orders_svc",
    )
    .unwrap();
    config.acquire_timeout = POOL_WAIT;
    config.connect_timeout = POOL_WAIT;
    config.pool_min = 0;
    config
}

/// The pool's own timeouts in these tests: the gate must answer long before them.
const POOL_WAIT: Duration = Duration::from_secs(30);

/// The bound on an answer the gate's timeout (500 ms at most here) should have cut short:
/// many times that timeout, so a loaded machine does not fail it, and a third of
/// [`POOL_WAIT`], so waiting for the pool would.
const ANSWERED_BY_THE_GATE: Duration = Duration::from_secs(10);

#[tokio::test]
async fn healthy_service_is_ready_with_the_report() {
    let db = TestDb::new().await;
    let (svc, gate, _dir) = migrated_orders(&db).await;

    let (status, json, _) = get(&svc, &gate, "/readyz").await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["ready"], true);
    assert_eq!(json["schema"], "orders_svc");
    assert_eq!(json["migration_version"], "0001");
    assert_eq!(json["migrations_checked"], true);
    assert_eq!(json["problems"], serde_json::json!([]));
    assert_eq!(json["database"]["reachable"], true);
    assert!(json["database"]["latency_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(json["pool"]["max_size"], 5);
    assert!(json["pool"]["acquire_wait"]["count"].as_u64().unwrap() >= 1);

    let (status, _, text) = get(&svc, &gate, "/healthz").await;
    assert_eq!((status, text.as_str()), (StatusCode::OK, "ok\n"));

    let report = svc.health(&gate).await;
    assert!(report.gate.ready && report.database.reachable, "{report}");
    assert!(report
        .to_string()
        .contains("ready: schema orders_svc, migration 0001"));
}

#[tokio::test]
async fn an_old_release_answers_200_after_a_newer_one_migrated() {
    let db = TestDb::new().await;
    let (svc, release_1_gate, release_1) = migrated_orders(&db).await;
    // Release 2 ships one more migration and runs it before its replicas are up.
    let release_2 = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(release_1.path()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, release_2.path().join(path.file_name().unwrap())).unwrap();
    }
    std::fs::write(
        release_2.path().join("0002_notes.up.sql"),
        "ALTER TABLE orders ADD COLUMN notes text;",
    )
    .unwrap();
    let migrations = svcdb::migrate::Migrations::from_dir(release_2.path()).unwrap();
    svcdb::migrate::Migrator::new(svc.clone(), migrations)
        .up()
        .await
        .unwrap();

    let (status, json, _) = get(&svc, &release_1_gate, "/readyz").await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["problems"], serde_json::json!([]));
    assert_eq!(json["notices"][0]["kind"], "newer_applied");
    assert_eq!(json["notices"][0]["version"], "0002");
}

#[tokio::test]
async fn table_dropped_behind_the_services_back_makes_readyz_503_naming_it() {
    let db = TestDb::new().await;
    let (svc, gate, _dir) = migrated_orders(&db).await;
    db.admin()
        .await
        .batch_execute("DROP TABLE orders_svc.orders")
        .await
        .unwrap();

    let (status, json, _) = get(&svc, &gate, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json["ready"], false);
    assert_eq!(
        json["database"]["reachable"], true,
        "reachable, just not ready"
    );
    let mut problems = json["problems"].as_array().unwrap().clone();
    let hint = problems[0].as_object_mut().unwrap().remove("hint").unwrap();
    assert!(
        hint.as_str().unwrap().contains("svcdb migrate up"),
        "{hint}"
    );
    assert_eq!(
        problems,
        [serde_json::json!({
            "kind": "missing_table",
            "schema": "orders_svc",
            "table": "orders",
            "message": "table orders is missing from schema orders_svc",
        })]
    );
    // Liveness does not depend on the database.
    assert_eq!(get(&svc, &gate, "/healthz").await.0, StatusCode::OK);
}

#[tokio::test]
async fn closed_port_answers_503_within_the_gate_timeout() {
    let svc = ServiceDb::new(config_at(closed_port())).unwrap();
    let gate = Gate::new().timeout(Duration::from_millis(500));

    let started = Instant::now();
    let (status, json, _) = get(&svc, &gate, "/readyz").await;
    let took = started.elapsed();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(took < ANSWERED_BY_THE_GATE, "answered after {took:?}");
    assert_eq!(json["database"]["reachable"], false);
    assert_eq!(json["database"]["latency_ms"], Value::Null);
    assert_eq!(json["problems"][0]["kind"], "unreachable");
    let error = json["problems"][0]["error"].as_str().unwrap();
    assert!(error.contains("refused"), "the cause is named: {error}");
    assert_eq!(get(&svc, &gate, "/healthz").await.0, StatusCode::OK);
}

#[tokio::test]
async fn acquire_timeout_shorter_than_the_gate_reports_its_own_error() {
    let mut config = config_at(closed_port());
    config.acquire_timeout = Duration::from_millis(200);
    let svc = ServiceDb::new(config).unwrap();

    // The gate would wait far longer: the pool's own timeout ends the check.
    let started = Instant::now();
    let report = svc.health(&Gate::new().timeout(POOL_WAIT)).await;
    let took = started.elapsed();
    assert!(took < ANSWERED_BY_THE_GATE, "answered after {took:?}");
    match report.gate.problems.as_slice() {
        [Problem::Unreachable { error, .. }] => {
            assert!(
                error.contains("timed out") && error.contains("refused"),
                "{error}"
            )
        }
        other => panic!("expected unreachable, got {other:?}"),
    }
    assert!(report.pool.last_connect_error.is_some());
}

#[tokio::test]
async fn server_that_never_answers_does_not_hang_readyz() {
    // Accepts connections and never says a word: the worst case, where only timeouts help.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let svc = ServiceDb::new(config_at(port)).unwrap();
    let gate = Gate::new().timeout(Duration::from_millis(400));

    let started = Instant::now();
    let (status, json, _) = get(&svc, &gate, "/readyz").await;
    let took = started.elapsed();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(took < ANSWERED_BY_THE_GATE, "answered after {took:?}");
    assert!(
        json["problems"][0]["error"]
            .as_str()
            .unwrap()
            .contains("no answer within 400ms"),
        "{json}"
    );
    silent.abort();
}

#[tokio::test]
async fn closed_pool_is_not_ready() {
    let db = TestDb::new().await;
    let (svc, gate, _dir) = migrated_orders(&db).await;
    // The control: answered, the history was checked.
    let (_, json, _) = get(&svc, &gate, "/readyz").await;
    assert_eq!(json["migrations_checked"], true);
    svc.close();
    let (status, json, _) = get(&svc, &gate, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json["problems"][0]["kind"], "unreachable");
    // Found by a README walkthrough: it said true although nothing was asked.
    assert_eq!(json["migrations_checked"], false);
}

/// Regression: a gate that gave up while the pool kept failing in TLS said "check that
/// PostgreSQL is running"; the hint now follows the last connection error's cause.
#[tokio::test]
async fn the_unreachable_hint_follows_the_last_connection_error() {
    let db = TestDb::new().await;
    let mut config = Config::new(
        &format!("{} sslmode=verify-full sslrootcert=system", db.url()),
        "orders_svc",
    )
    .unwrap();
    config.pool_min = 0;
    let svc = ServiceDb::new(config).unwrap();
    let report = svc
        .health(&Gate::new().timeout(Duration::from_millis(300)))
        .await;
    match report.gate.problems.as_slice() {
        [Problem::Unreachable { hint, .. }] => {
            // 127.0.0.1 is not the certificate's name; on a server whose certificate is not in
            // the system roots, the chain fails first.
            let tls_hints = [
                svcdb::TlsFailure::NameMismatch.hint(),
                svcdb::TlsFailure::Untrusted.hint(),
            ];
            assert!(tls_hints.contains(&hint.as_str()), "{hint}");
        }
        other => panic!("expected unreachable, got {other:?}"),
    }
}

#[tokio::test]
async fn readyz_reports_the_outbox_backlog_once_the_service_has_an_outbox() {
    let db = TestDb::new().await;
    let (svc, gate, _dir) = migrated_orders(&db).await;
    let (_, report, text) = get(&svc, &gate, "/readyz").await;
    assert_eq!(report["outbox"], Value::Null, "no outbox table yet: {text}");

    svc.install_outbox().await.unwrap();
    let (_, report, text) = get(&svc, &gate, "/readyz").await;
    assert_eq!(report["outbox"]["rows"], 0, "{text}");
    assert_eq!(
        report["outbox"]["oldest_age_seconds"],
        Value::Null,
        "{text}"
    );

    let event = svcdb::Envelope::new("OrderPlaced", "orders", serde_json::json!({}));
    svc.transaction(async |tx| {
        svcdb::outbox::enqueue(tx, "orders.events", "order.placed", &event).await
    })
    .await
    .unwrap();
    let (_, report, text) = get(&svc, &gate, "/readyz").await;
    assert_eq!(report["outbox"]["rows"], 1, "{text}");
    assert!(
        report["outbox"]["oldest_age_seconds"].as_f64().unwrap() >= 0.0,
        "{text}"
    );
    let shown = svc.health(&gate).await.to_string();
    assert!(shown.contains("outbox: 1 unpublished, oldest "), "{shown}");
}
