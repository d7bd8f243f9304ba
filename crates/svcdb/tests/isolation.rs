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
