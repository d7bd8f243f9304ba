//! Isolation enforced by PostgreSQL roles: provisioning, idempotence, cross-service refusal,
//! and names refused before anything reaches the server.

use svcdb::testing::TestDb;
use svcdb::{Error, ProvisionSpec, ServiceDb, SqlState};

#[tokio::test]
async fn provisioning_twice_changes_nothing_the_second_time() {
    let db = TestDb::new().await;
    let (role, first) = db.provision("catalog", "catalog_schema").await;
    assert!(
        first.changes.len() >= 2,
        "role and schema created: {:?}",
        first.changes
    );
    assert_eq!(first.has_password, Some(false), "none was given");

    let spec = ProvisionSpec::new(&role, "catalog_schema").unwrap();
    let again = svcdb::provision(&mut *db.admin().await, &spec)
        .await
        .unwrap();
    assert!(again.changes.is_empty(), "{:?}", again.changes);

    let admin = db.admin().await;
    let row = admin
        .query_one(
            "SELECT pg_get_userbyid(nspowner)::text, \
                    EXISTS (SELECT 1 FROM aclexplode(nspacl) a WHERE a.grantee = 0), \
                    r.rolcanlogin, r.rolsuper \
             FROM pg_namespace, pg_roles r WHERE nspname = 'catalog_schema' AND r.rolname = $1",
            &[&role],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, String>(0),
        role,
        "the schema is owned by the service role"
    );
    assert!(!row.get::<_, bool>(1), "nothing granted to PUBLIC");
    assert!(
        row.get::<_, bool>(2) && !row.get::<_, bool>(3),
        "login, not superuser"
    );
}

#[tokio::test]
async fn a_service_cannot_read_another_services_schema() {
    let db = TestDb::new().await;
    let (catalog, _) = db.provision("catalog", "catalog_schema").await;
    let (orders, _) = db.provision("orders", "orders_schema").await;

    let catalog_db = ServiceDb::connect(db.config_as(&catalog, "catalog_schema"))
        .await
        .unwrap();
    catalog_db
        .get()
        .await
        .unwrap()
        .batch_execute("CREATE TABLE products (id int PRIMARY KEY, name text); INSERT INTO products VALUES (1, 'lamp')")
        .await
        .unwrap();

    let orders_db = ServiceDb::connect(db.config_as(&orders, "orders_schema"))
        .await
        .unwrap();
    let conn = orders_db.get().await.unwrap();
    // Unqualified: not on the orders search path at all.
    let err = conn.query("SELECT * FROM products", &[]).await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::UNDEFINED_TABLE));
    // Qualified: PostgreSQL itself refuses.
    let err = conn
        .query("SELECT * FROM catalog_schema.products", &[])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE));
    // Nor can it create objects there.
    let err = conn
        .batch_execute("CREATE TABLE catalog_schema.stolen (id int)")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE));
    // Widening its own search path does not help: without USAGE the schema is skipped.
    conn.batch_execute("SET search_path = catalog_schema")
        .await
        .unwrap();
    let err = conn
        .batch_execute("CREATE TABLE stolen (id int)")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INVALID_SCHEMA_NAME));
    conn.batch_execute("RESET search_path").await.unwrap();

    // The owning service still reads its own data.
    let n: i64 = catalog_db
        .get()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM products", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

#[tokio::test]
async fn the_roles_default_search_path_is_its_schema() {
    let db = TestDb::new().await;
    let (role, _) = db.provision("users", "users_schema").await;
    // A plain connection as the role, without svcdb's startup option, lands in its schema too.
    let mut pg = db.connection();
    pg.user(&role);
    let conn = svcdb::DedicatedConn::connect(&pg).await.unwrap();
    let schema: String = conn
        .query_one("SELECT current_schema()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(schema, "users_schema");
}

#[tokio::test]
async fn provisioning_with_extra_schemas_grants_usage_and_sets_the_path() {
    let db = TestDb::new().await;
    db.admin()
        .await
        .batch_execute("CREATE SCHEMA extensions")
        .await
        .unwrap();
    let role = db.role_name("cart");
    let mut spec = ProvisionSpec::new(&role, "cart_schema").unwrap();
    spec.extra_schemas = vec![svcdb::Ident::new("schema", "extensions").unwrap()];
    let report = svcdb::provision(&mut *db.admin().await, &spec)
        .await
        .unwrap();
    assert!(
        report.changes.iter().any(|c| c.contains("USAGE")),
        "{:?}",
        report.changes
    );
    let again = svcdb::provision(&mut *db.admin().await, &spec)
        .await
        .unwrap();
    assert!(again.changes.is_empty(), "{:?}", again.changes);

    spec.extra_schemas = vec![svcdb::Ident::new("schema", "does_not_exist").unwrap()];
    let err = svcdb::provision(&mut *db.admin().await, &spec)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err:?}");
}

#[tokio::test]
async fn provisioning_with_a_password_sends_only_a_scram_verifier() {
    let db = TestDb::new().await;
    let role = db.role_name("billing");
    let mut spec = ProvisionSpec::new(&role, "billing_schema").unwrap();
    spec.password = Some(svcdb::Password::new("correct horse battery staple"));
    assert!(!format!("{spec:?}").contains("horse"));
    svcdb::provision(&mut *db.admin().await, &spec)
        .await
        .unwrap();
    let stored: String = db
        .admin()
        .await
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
            &[&role],
        )
        .await
        .unwrap()
        .get(0);
    assert!(stored.starts_with("SCRAM-SHA-256$"), "{stored}");
}

#[tokio::test]
async fn injection_shaped_names_are_refused_before_reaching_the_server() {
    // An address where nothing listens: had anything been sent, the error would be a
    // connection error after a timeout, not an immediate identifier error.
    let url = "postgres://postgres@127.0.0.1:1/postgres";
    for bad in [
        "x; drop table y",
        "a\"b",
        "it's",
        "with space",
        "Upper",
        "pg_toast",
        "",
    ] {
        assert!(
            matches!(svcdb::Config::new(url, bad), Err(Error::Ident(_))),
            "{bad:?}"
        );
        assert!(
            matches!(ProvisionSpec::new(bad, "ok_schema"), Err(Error::Ident(_))),
            "{bad:?}"
        );
        assert!(
            matches!(ProvisionSpec::new("ok_role", bad), Err(Error::Ident(_))),
            "{bad:?}"
        );
    }
    let too_long = "a".repeat(64);
    assert!(matches!(
        svcdb::Config::new(url, &too_long),
        Err(Error::Ident(_))
    ));
}

/// Provisions `spec` with the test database's admin connection.
async fn provision(db: &TestDb, spec: &ProvisionSpec) -> Result<svcdb::ProvisionReport, Error> {
    svcdb::provision(&mut *db.admin().await, spec).await
}

/// The `pg_roles` flags of `role`, in the order of `attributes`.
async fn role_flags(db: &TestDb, role: &str) -> [bool; 5] {
    let row = db
        .admin()
        .await
        .query_one(
            "SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls \
             FROM pg_roles WHERE rolname = $1",
            &[&role],
        )
        .await
        .unwrap();
    [0, 1, 2, 3, 4].map(|i| row.get(i))
}

/// Whether the schema exists: a refused provisioning changes nothing.
async fn schema_exists(db: &TestDb, schema: &str) -> bool {
    db.admin()
        .await
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[&schema],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn an_existing_role_with_a_privileged_attribute_is_refused_not_reported_as_provisioned() {
    let db = TestDb::new().await;
    for (i, attribute) in [
        "SUPERUSER",
        "CREATEROLE",
        "CREATEDB",
        "REPLICATION",
        "BYPASSRLS",
    ]
    .into_iter()
    .enumerate()
    {
        let role = db.role_name("svc");
        db.admin()
            .await
            .batch_execute(&format!("CREATE ROLE \"{role}\" LOGIN {attribute}"))
            .await
            .unwrap();
        let mut spec = ProvisionSpec::new(&role, "svc_schema").unwrap();
        match provision(&db, &spec).await {
            Err(Error::Refused { object, message }) => {
                assert_eq!(object, "role", "{attribute}");
                assert!(message.contains(attribute), "names it: {message}");
                assert!(
                    message.contains(&format!("NO{attribute}")),
                    "says how: {message}"
                );
            }
            other => panic!("{attribute}: expected a refusal, got {other:?}"),
        }
        assert!(role_flags(&db, &role).await[i], "{attribute} untouched");
        assert!(
            !schema_exists(&db, "svc_schema").await,
            "nothing was changed"
        );

        spec.fix = true;
        let report = provision(&db, &spec).await.unwrap();
        assert!(
            report.changes.iter().any(|c| c.contains(attribute)),
            "{:?}",
            report.changes
        );
        assert_eq!(
            role_flags(&db, &role).await,
            [false; 5],
            "{attribute} removed"
        );
        // Fixed for good: the next run, without --fix, has nothing to do.
        spec.fix = false;
        let again = provision(&db, &spec).await.unwrap();
        assert!(again.changes.is_empty(), "{:?}", again.changes);
        db.admin()
            .await
            .batch_execute("DROP SCHEMA svc_schema")
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_service_role_that_is_a_member_of_another_services_role_is_refused() {
    let db = TestDb::new().await;
    let (catalog, _) = db.provision("catalog", "catalog_schema").await;
    ServiceDb::connect(db.config_as(&catalog, "catalog_schema"))
        .await
        .unwrap()
        .get()
        .await
        .unwrap()
        .batch_execute("CREATE TABLE products (id int); INSERT INTO products VALUES (1)")
        .await
        .unwrap();
    let orders = db.role_name("orders");
    let admin = db.admin().await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE \"{orders}\" LOGIN; GRANT \"{catalog}\" TO \"{orders}\""
        ))
        .await
        .unwrap();
    let mut spec = ProvisionSpec::new(&orders, "orders_schema").unwrap();
    match provision(&db, &spec).await {
        Err(Error::Refused { object, message }) => {
            assert_eq!(object, "role");
            assert!(
                message.contains(&catalog),
                "names the membership: {message}"
            );
            assert!(message.contains("REVOKE"), "says how: {message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    // The control: the membership really is a hole, reading the other service's table.
    let read = |role: String| {
        let db = &db;
        async move {
            let mut pg = db.connection();
            pg.user(&role);
            let conn = svcdb::DedicatedConn::connect(&pg).await.unwrap();
            conn.query("SELECT * FROM catalog_schema.products", &[])
                .await
                .map(|rows| rows.len())
        }
    };
    assert_eq!(read(orders.clone()).await.unwrap(), 1);

    spec.fix = true;
    let report = provision(&db, &spec).await.unwrap();
    assert!(
        report.changes.iter().any(|c| c.contains(&catalog)),
        "{:?}",
        report.changes
    );
    let err = read(orders.clone()).await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE));
}

#[tokio::test]
async fn the_role_provisioning_connects_as_is_never_stripped() {
    let db = TestDb::new().await;
    // A superuser of the test's own, standing in for the administrator.
    let admin_role = db.role_name("admin");
    db.admin()
        .await
        .batch_execute(&format!("CREATE ROLE \"{admin_role}\" LOGIN SUPERUSER"))
        .await
        .unwrap();
    let mut pg = db.connection();
    pg.user(&admin_role);
    let mut admin = svcdb::DedicatedConn::connect(&pg).await.unwrap();
    let mut spec = ProvisionSpec::new(&admin_role, "admin_schema").unwrap();
    spec.fix = true;
    match svcdb::provision(&mut admin, &spec).await {
        Err(Error::Refused { object, message }) => {
            assert_eq!(object, "role");
            assert!(message.contains("connects as"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(role_flags(&db, &admin_role).await[0], "still a superuser");
}

#[tokio::test]
async fn public_create_on_an_extra_schema_is_revoked() {
    let db = TestDb::new().await;
    // PostgreSQL 14 and older grant this by default; 15 does not, so the test grants it.
    db.admin()
        .await
        .batch_execute("GRANT CREATE ON SCHEMA public TO PUBLIC")
        .await
        .unwrap();
    let (other, _) = db.provision("other", "other_schema").await;
    let plant = |role: String| {
        let db = &db;
        async move {
            let mut pg = db.connection();
            pg.user(&role);
            let conn = svcdb::DedicatedConn::connect(&pg).await.unwrap();
            conn.batch_execute("CREATE TABLE public.planted (id int); DROP TABLE public.planted")
                .await
        }
    };
    // The control: any role can plant objects on a path that includes public.
    plant(other.clone()).await.unwrap();

    let cart = db.role_name("cart");
    let mut spec = ProvisionSpec::new(&cart, "cart_schema").unwrap();
    spec.extra_schemas = vec![svcdb::Ident::new("schema", "public").unwrap()];
    let report = provision(&db, &spec).await.unwrap();
    assert!(
        report
            .changes
            .iter()
            .any(|c| c.contains("CREATE on schema public")),
        "{:?}",
        report.changes
    );
    let err = plant(other).await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE));
    let again = provision(&db, &spec).await.unwrap();
    assert!(again.changes.is_empty(), "{:?}", again.changes);
}

/// A runner connected as another role than the schema's owner works as the owner when it may
/// (here a member of the owner role), and is refused with both names before anything runs
/// when it may not; what it creates belongs to the service's role either way.
#[tokio::test]
async fn migrations_run_as_the_schemas_owner_or_not_at_all() {
    use svcdb::migrate::{MigrateError, MigrateEvent, Migrations, Migrator, UpOptions};

    let db = TestDb::new().await;
    let (owner, _) = db.provision("catalog", "catalog_schema").await;
    let deployer = db.role_name("deployer");
    let admin = db.admin().await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE \"{deployer}\" LOGIN; \
             GRANT USAGE, CREATE ON SCHEMA catalog_schema TO \"{deployer}\""
        ))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("0001_products.up.sql"),
        "CREATE TABLE products (id int PRIMARY KEY);",
    )
    .unwrap();
    // A script that drops the role it runs as, in the same deploy: the next one still runs
    // as the owner.
    // (The lint's `set-role` refuses it unless allowed: allowed here, as the point.)
    std::fs::write(
        dir.path().join("0002_reset.up.sql"),
        "-- svcdb:allow set-role\nRESET ROLE;",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("0003_prices.up.sql"),
        "CREATE TABLE prices (id int);",
    )
    .unwrap();
    // `RESET ALL` clears every session setting, so the role to go back to cannot be kept in
    // one (a robustness trial found it failing with `role "" does not exist`).
    std::fs::write(dir.path().join("0004_reset_all.up.sql"), "RESET ALL;").unwrap();
    std::fs::write(
        dir.path().join("0005_taxes.up.sql"),
        "CREATE TABLE taxes (id int);",
    )
    .unwrap();
    let deployer_db = ServiceDb::connect(db.config_as(&deployer, "catalog_schema"))
        .await
        .unwrap();
    let migrator = Migrator::new(deployer_db, Migrations::from_dir(dir.path()).unwrap());
    let owners = || async {
        db.admin()
            .await
            .query(
                "SELECT pg_get_userbyid(relowner)::text FROM pg_class \
                 WHERE relnamespace = 'catalog_schema'::regnamespace",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
    };

    match migrator.up().await {
        Err(MigrateError::NotOwner {
            connected,
            owner: refused_owner,
            ..
        }) => assert_eq!(
            (connected, refused_owner),
            (deployer.clone(), owner.clone())
        ),
        other => panic!("expected NotOwner, got {other:?}"),
    }
    assert_eq!(owners().await, Vec::<String>::new(), "nothing ran");

    admin
        .batch_execute(&format!("GRANT \"{owner}\" TO \"{deployer}\""))
        .await
        .unwrap();
    let mut events = Vec::new();
    migrator
        .up_with(&UpOptions::default(), &mut |e| events.push(e.clone()))
        .await
        .unwrap();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, MigrateEvent::ActingAsOwner { owner: o, .. } if *o == owner)),
        "{events:?}"
    );
    let owners = owners().await;
    assert!(
        owners.len() >= 5 && owners.iter().all(|o| *o == owner),
        "the tables, a key and the history table: {owners:?}"
    );
}

/// Found by a trial on Conductor's Flyway folder, whose first migration hands the schema to
/// the application's role (`ALTER SCHEMA … OWNER TO`): svcdb's history table stayed the
/// administrator's, every later run switched to the new owner, and `up`, `down` and `repair`
/// failed with 42501 on `svcdb_migrations`. The runner now gives its tables to the schema's
/// owner before switching to it.
#[tokio::test]
async fn a_migration_that_hands_the_schema_to_another_role_does_not_lock_svcdb_out() {
    use svcdb::migrate::Version;
    use svcdb::migrate::{DownOptions, Migrations, Migrator, UpOptions};

    let db = TestDb::new().await;
    let app = db.role_name("app");
    db.admin()
        .await
        .batch_execute(&format!("CREATE ROLE \"{app}\""))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, sql: String| std::fs::write(dir.path().join(name), sql).unwrap();
    write(
        "0001_initial.up.sql",
        format!("CREATE TABLE a (id int);\nALTER SCHEMA handed OWNER TO \"{app}\";"),
    );
    write("0001_initial.down.sql", "DROP TABLE a;".into());
    write("0002_b.up.sql", "CREATE TABLE b (id int);".into());
    write("0002_b.down.sql", "DROP TABLE b;".into());
    // A fresh pool for each run, as each deploy's process has.
    let migrator = async || {
        let migrations = Migrations::from_dir(dir.path()).unwrap();
        Migrator::new(db.service("handed").await, migrations)
    };
    let to = |v: &str| UpOptions {
        to: Some(v.parse::<Version>().unwrap()),
        ..UpOptions::default()
    };
    migrator()
        .await
        .up_with(&to("1"), &mut |_| {})
        .await
        .unwrap();
    // The next run works as the new owner, on a history table it now owns.
    migrator().await.up().await.unwrap();
    let owner: String = db
        .admin()
        .await
        .query_one(
            "SELECT pg_get_userbyid(relowner)::text FROM pg_class \
             WHERE relnamespace = 'handed'::regnamespace AND relname = 'svcdb_migrations'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, app);
    migrator()
        .await
        .down_with(&DownOptions::default(), &mut |_| {})
        .await
        .unwrap();
}
