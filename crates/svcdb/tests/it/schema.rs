//! Schema utilities and the start-up gate against a real PostgreSQL: table kinds, missing
//! tables listed together, and a gate that names every problem (pending, changed, unknown and
//! dirty migrations, a wrong or missing schema, missing tables) at once.

use std::path::Path;

use svcdb::migrate::{Migrations, Migrator};
use svcdb::testing::TestDb;
use svcdb::{Error, ServiceDb};
use svcdb::{Gate, Notice, Problem, TableKind};

/// Two migrations: the orders table, then its lines.
const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_orders.up.sql",
        "CREATE TABLE orders (id bigint PRIMARY KEY, customer text NOT NULL);",
    ),
    ("0001_orders.down.sql", "DROP TABLE orders;"),
    (
        "0002_lines.up.sql",
        "CREATE TABLE order_lines (order_id bigint REFERENCES orders, sku text);",
    ),
    ("0002_lines.down.sql", "DROP TABLE order_lines;"),
];

/// A migrations folder holding `files`.
fn folder(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, sql) in files {
        std::fs::write(dir.path().join(name), sql).unwrap();
    }
    dir
}

fn migrations(dir: &Path) -> Migrations {
    Migrations::from_dir(dir).unwrap()
}

/// Applies every migration in `dir`.
async fn migrate(svc: &ServiceDb, dir: &Path) {
    Migrator::new(svc.clone(), migrations(dir))
        .up()
        .await
        .unwrap();
}

async fn exec(svc: &ServiceDb, sql: &str) {
    svc.get().await.unwrap().batch_execute(sql).await.unwrap();
}

/// The gate the orders service would run: its migrations and both tables.
fn orders_gate(dir: &Path) -> Gate {
    Gate::new()
        .with_migrations(migrations(dir))
        .require(["orders", "order_lines"])
        .unwrap()
}

#[tokio::test]
async fn lists_tables_and_views_with_their_kind() {
    let db = TestDb::new().await;
    let svc = db.service("orders_svc").await;
    exec(
        &svc,
        "CREATE TABLE orders (id int);
         CREATE VIEW open_orders AS SELECT * FROM orders;
         CREATE MATERIALIZED VIEW order_counts AS SELECT count(*) FROM orders;
         CREATE TABLE events (at date) PARTITION BY RANGE (at);
         CREATE SEQUENCE order_numbers;
         CREATE INDEX orders_id ON orders (id);
         CREATE TABLE public.elsewhere (id int);",
    )
    .await;

    let tables = svc.list_tables().await.unwrap();
    let seen: Vec<(&str, TableKind)> = tables.iter().map(|t| (t.name.as_str(), t.kind)).collect();
    assert_eq!(
        seen,
        [
            ("events", TableKind::PartitionedTable),
            ("open_orders", TableKind::View),
            ("order_counts", TableKind::MaterializedView),
            ("orders", TableKind::Table),
        ],
        "sequences, indexes and other schemas' tables are left out"
    );
    assert_eq!(
        serde_json::to_value(&tables[2]).unwrap(),
        serde_json::json!({"name": "order_counts", "kind": "materialized_view"})
    );
    assert_eq!(
        svc.current_schema().await.unwrap().as_deref(),
        Some("orders_svc")
    );
    assert!(svc.table_exists("open_orders").await.unwrap());
    assert!(!svc.table_exists("elsewhere").await.unwrap());
    assert!(!svc.table_exists("order_numbers").await.unwrap());
}

#[tokio::test]
async fn require_tables_names_every_missing_table() {
    let db = TestDb::new().await;
    let svc = db.service("orders_svc").await;
    exec(&svc, "CREATE TABLE orders (id int)").await;

    svc.require_tables(&["orders"]).await.unwrap();
    let err = svc
        .require_tables(&["payments", "orders", "order_lines"])
        .await
        .unwrap_err();
    match &err {
        Error::MissingTables { schema, tables } => {
            assert_eq!(schema, "orders_svc");
            assert_eq!(tables, &["payments", "order_lines"]);
        }
        other => panic!("expected missing tables, got {other:?}"),
    }
    assert!(err.to_string().contains("svcdb migrate up"), "{err}");
}

#[tokio::test]
async fn table_names_are_validated_before_any_sql() {
    let db = TestDb::new().await;
    let svc = db.service("orders_svc").await;
    for name in ["orders; DROP TABLE x", "Orders", "pg_class", ""] {
        assert!(
            matches!(svc.table_exists(name).await, Err(Error::Ident(_))),
            "{name:?}"
        );
    }
    assert!(matches!(
        svc.require_tables(&["ok", "not ok"]).await,
        Err(Error::Ident(_))
    ));
    assert!(matches!(
        Gate::new().require(["x\"y"]),
        Err(Error::Ident(_))
    ));
}

#[tokio::test]
async fn gate_passes_when_migrated_and_reports_the_version() {
    let db = TestDb::new().await;
    let svc = db.service("orders_svc").await;
    let dir = folder(MIGRATIONS);
    migrate(&svc, dir.path()).await;

    let report = svc.verify(&orders_gate(dir.path())).await;
    assert!(report.ready, "{report}");
    assert!(report.problems.is_empty());
    assert_eq!(report.migration_version, Some(v(2)));
    assert!(report.migrations_checked);
    report.ensure_ready().unwrap();
}

/// Found by a user trial: `schema verify --extra-schemas public,nope` said ready and nothing
/// more. An extra schema that does not exist is a notice (PostgreSQL skips it on the search
/// path, so the service still works, without what it meant to find there); `public`, which
/// exists, is none (the control).
#[tokio::test]
async fn an_extra_schema_that_does_not_exist_is_a_notice() {
    let db = TestDb::new().await;
    let mut config = db.config("orders_svc");
    config.extra_schemas = vec![
        svcdb::Ident::new("schema", "public").unwrap(),
        svcdb::Ident::new("schema", "nope_extra").unwrap(),
    ];
    let svc = ServiceDb::connect(config).await.unwrap();
    let report = svc.verify(&Gate::new()).await;
    assert!(report.ready, "{report}");
    assert_eq!(
        report.notices,
        [Notice::ExtraSchemaMissing {
            schema: "nope_extra".into()
        }]
    );
}

#[tokio::test]
async fn service_deployed_without_migrations_refuses_to_start() {
    // The notes' scenario: nothing ran, and the service would crash on the first order.
    let db = TestDb::new().await;
    let svc = db.service("orders_svc").await;
    let dir = folder(MIGRATIONS);

    let report = svc.verify(&orders_gate(dir.path())).await;
    assert!(!report.ready);
    assert_eq!(
        report.problems,
        [
            Problem::NoHistory {
                schema: "orders_svc".into(),
                pending: 2
            },
            Problem::MissingTable {
                schema: "orders_svc".into(),
                table: "orders".into()
            },
            Problem::MissingTable {
                schema: "orders_svc".into(),
                table: "order_lines".into()
            },
        ]
    );
    match report.ensure_ready() {
        Err(Error::NotReady(report)) => {
            let shown = report.to_string();
            assert!(shown.contains("svcdb migrate up"), "{shown}");
        }
        other => panic!("expected NotReady, got {other:?}"),
    }
}

#[tokio::test]
async fn pending_migration_is_named() {
    let db = TestDb::new().await;
    let svc = db.service("orders_svc").await;
    let dir = folder(&MIGRATIONS[..2]);
    migrate(&svc, dir.path()).await;
    let dir = folder(MIGRATIONS); // the new release ships 0002

    let report = svc
        .verify(&Gate::new().with_migrations(migrations(dir.path())))
        .await;
    assert_eq!(
        report.problems,
        [Problem::Pending {
            version: v(2),
            name: "lines".into()
        }]
    );
    assert_eq!(report.migration_version, Some(v(1)));
}

#[tokio::test]
async fn changed_applied_migration_is_named() {
    let db = TestDb::new().await;
    let svc = db.service("orders_svc").await;
    let dir = folder(MIGRATIONS);
    migrate(&svc, dir.path()).await;
    std::fs::write(
        dir.path().join("0001_orders.up.sql"),
        "CREATE TABLE orders (id bigint PRIMARY KEY, customer text);",
    )
    .unwrap();

    let report = svc.verify(&orders_gate(dir.path())).await;
    match report.problems.as_slice() {
        [Problem::Changed {
            version,
            name,
            path,
        }] if version.number() == 1 => {
            assert_eq!(name, "orders");
            assert!(path.ends_with("0001_orders.up.sql"), "{path}");
        }
        other => panic!("expected one changed migration, got {other:?}"),
    }
}

#[tokio::test]
async fn an_old_release_stays_ready_after_a_newer_one_migrated() {
    let db = TestDb::new().await;
    let svc = db.service("orders_svc").await;
    let release_1 = folder(&MIGRATIONS[..2]); // ships 0001 only
    let release_2 = folder(MIGRATIONS);
    migrate(&svc, release_1.path()).await;
    let gate = Gate::new().with_migrations(migrations(release_1.path()));
    assert!(svc.verify(&gate).await.ready);

    // Rolling deploy: release 2 migrates before its replicas replace release 1's.
    migrate(&svc, release_2.path()).await;
    let report = svc.verify(&gate).await;
    assert!(report.ready, "{report}");
    assert_eq!(
        report.notices,
        [Notice::NewerApplied {
            version: v(2),
            name: "lines".into()
        }]
    );
    assert_eq!(report.migration_version, Some(v(2)));

    // Release 2's migration failed part-way instead (as a non-transactional one does): found
    // by an operations trial, this made every replica of release 1 unready. Release 1 does not
    // ship it, so it keeps serving, told so; release 2's own gate refuses (the control).
    exec(
        &svc,
        "UPDATE svcdb_migrations SET dirty = true WHERE version = 2",
    )
    .await;
    let report = svc.verify(&gate).await;
    assert!(report.ready, "{report}");
    assert_eq!(
        report.notices,
        [Notice::NewerDirty {
            version: v(2),
            name: "lines".into()
        }]
    );
    let newer = svc
        .verify(&Gate::new().with_migrations(migrations(release_2.path())))
        .await;
    assert_eq!(
        newer.problems,
        [Problem::Dirty {
            version: v(2),
            name: "lines".into()
        }]
    );
}

/// Found by an adversarial trial: given an empty folder (a wrong `--dir`), every applied
/// migration read as a newer release's and the service was ready, while `migrate status`
/// refused. The gate now says none is shipped; with the service's folder it is ready (the
/// control).
#[tokio::test]
async fn a_gate_given_no_versioned_migration_over_a_history_is_not_ready() {
    let db = TestDb::new().await;
    let svc = db.service("orders_svc").await;
    let release = folder(MIGRATIONS);
    migrate(&svc, release.path()).await;
    for files in [
        &[][..],
        &[("R__view.sql", "CREATE OR REPLACE VIEW v AS SELECT 1;")],
    ] {
        let wrong = folder(files);
        let report = svc
            .verify(&Gate::new().with_migrations(migrations(wrong.path())))
            .await;
        assert!(!report.ready, "{report}");
        assert_eq!(report.problems, [Problem::NoneShipped { applied: 2 }]);
    }
    let gate = Gate::new().with_migrations(migrations(release.path()));
    assert!(svc.verify(&gate).await.ready);
}

#[tokio::test]
async fn an_unknown_migration_older_than_the_newest_shipped_one_is_a_gap() {
    let db = TestDb::new().await;
    let svc = db.service("orders_svc").await;
    let third = (
        "0003_notes.up.sql",
        "ALTER TABLE orders ADD COLUMN notes text;",
    );
    let branch = folder(&[MIGRATIONS[0], MIGRATIONS[2], third]);
    migrate(&svc, branch.path()).await;
    // This release ships 0001 and 0003; 0002 came from a branch it never saw.
    let release = folder(&[MIGRATIONS[0], third]);

    let gate = Gate::new().with_migrations(migrations(release.path()));
    let report = svc.verify(&gate).await;
    assert!(!report.ready);
    assert_eq!(
        report.problems,
        [Problem::UnknownApplied {
            version: v(2),
            name: "lines".into(),
            newest_shipped: v(3),
        }]
    );
    assert!(report.notices.is_empty(), "{report}");
    assert!(svc.verify(&gate.allow_unknown_applied(true)).await.ready);
}

#[tokio::test]
async fn dirty_migration_is_named_even_without_migrations() {
    let db = TestDb::new().await;
    let svc = db.service("orders_svc").await;
    let dir = folder(MIGRATIONS);
    migrate(&svc, dir.path()).await;
    exec(
        &svc,
        "UPDATE svcdb_migrations SET dirty = true WHERE version = 2",
    )
    .await;

    let dirty = [Problem::Dirty {
        version: v(2),
        name: "lines".into(),
    }];
    assert_eq!(svc.verify(&orders_gate(dir.path())).await.problems, dirty);
    let without = svc.verify(&Gate::new()).await;
    assert_eq!(without.problems, dirty);
    assert!(!without.migrations_checked);
    assert_eq!(without.migration_version, Some(v(1)));
}

#[tokio::test]
async fn search_path_changed_on_a_pooled_connection_is_named() {
    let db = TestDb::new().await;
    let mut config = db.config("orders_svc");
    config.pool_max = 1; // the gate gets the connection the SET ran on
    let svc = ServiceDb::connect(config).await.unwrap();
    exec(&svc, "SET search_path = public").await;

    let report = svc.verify(&Gate::new()).await;
    assert_eq!(
        report.problems,
        [Problem::WrongSchema {
            expected: "orders_svc".into(),
            active: Some("public".into())
        }]
    );
    assert_eq!(
        svc.current_schema().await.unwrap().as_deref(),
        Some("public")
    );
}

/// The history and the required tables are missing because the schema is: listed apart, they
/// would add "run `svcdb migrate up`", which fails on a missing schema too.
#[tokio::test]
async fn a_missing_schema_is_the_one_problem_not_the_tables_it_would_hold() {
    let db = TestDb::new().await;
    let mut config = db.config("orders_svc");
    config.create_schema = false; // never provisioned
                                  // `new`: `connect` itself refuses a schema that does not exist.
    let svc = ServiceDb::new(config).unwrap();
    let dir = folder(MIGRATIONS);

    let report = svc.verify(&orders_gate(dir.path())).await;
    assert_eq!(
        report.problems,
        [Problem::NoSchema {
            schema: "orders_svc".into(),
            similar: vec![],
        }]
    );
    // A misspelled SVCDB_SCHEMA gets the look-alike, as `connect` gives it (found by a user
    // trial: health and verify did not).
    db.service("orders_svcs").await;
    let report = svc.verify(&orders_gate(dir.path())).await;
    assert_eq!(
        report.problems,
        [Problem::NoSchema {
            schema: "orders_svc".into(),
            similar: vec!["orders_svcs".into()],
        }]
    );
    assert_eq!(svc.current_schema().await.unwrap(), None);
    let shown = report.to_string();
    assert!(
        shown.starts_with("not ready: schema orders_svc has 1 problem"),
        "{shown}"
    );
    assert!(!shown.contains("migrate up"), "{shown}");
}

#[tokio::test]
async fn schema_the_role_may_not_use_is_named() {
    let db = TestDb::new().await;
    let (role, _) = db.provision("orders", "orders_svc").await;
    let intruder = db.role_name("intruder");
    db.admin()
        .await
        .batch_execute(&format!("CREATE ROLE {intruder} LOGIN"))
        .await
        .unwrap();
    let svc = ServiceDb::connect(db.config_as(&intruder, "orders_svc"))
        .await
        .unwrap();

    let report = svc.verify(&Gate::new()).await;
    assert_eq!(
        report.problems,
        [Problem::NoSchemaAccess {
            schema: "orders_svc".into(),
            role: intruder.clone()
        }],
        "the schema belongs to {role}"
    );
}

#[tokio::test]
async fn several_problems_at_once_are_all_listed() {
    let db = TestDb::new().await;
    let svc = db.service("orders_svc").await;
    let applied = folder(MIGRATIONS);
    migrate(&svc, applied.path()).await;
    exec(&svc, "DROP TABLE order_lines").await;
    let shipped = folder(&[
        (
            "0001_orders.up.sql",
            "CREATE TABLE orders (id bigint PRIMARY KEY);", // changed
        ),
        ("0003_payments.up.sql", "CREATE TABLE payments (id int);"), // pending
    ]); // and 0002 unknown to it

    let gate = Gate::new()
        .with_migrations(migrations(shipped.path()))
        .require(["orders", "order_lines", "payments"])
        .unwrap();
    let report = svc.verify(&gate).await;
    assert!(!report.ready);
    let expected = [
        "changed",
        "unknown_applied",
        "pending",
        "missing_table",
        "missing_table",
    ];
    let json = serde_json::to_value(&report).unwrap();
    let kinds: Vec<&str> = json["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, expected);
    assert_eq!(json["problems"][3]["table"], "order_lines");
    assert_eq!(json["problems"][4]["table"], "payments");
    let shown = report.to_string();
    for needle in [
        "0001_orders.up.sql",
        "migration 0002",
        "migration 0003",
        "order_lines",
        "payments",
    ] {
        assert!(shown.contains(needle), "{needle} in {shown}");
    }
}

/// The version numbered `n` (as the history's integer column and `0001`-style files number it).
fn v(n: i64) -> svcdb::migrate::Version {
    svcdb::migrate::Version::try_from(n).expect("a non-negative version")
}
