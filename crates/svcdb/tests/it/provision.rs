//! Provisioning over what was there before: a schema someone opened to `PUBLIC`, and a schema
//! another role owns. Each starts with a control showing the hole is real.

use svcdb::testing::TestDb;
use svcdb::{DedicatedConn, ProvisionSpec, SqlState};

/// A session on the test database as `role`.
async fn session_as(db: &TestDb, role: &str) -> DedicatedConn {
    let mut pg = db.connection();
    pg.user(role);
    DedicatedConn::connect(&pg).await.unwrap()
}

/// The grantees of `schema`'s privileges ("PUBLIC" for the pseudo-role), and its owner.
async fn schema_acl(db: &TestDb, schema: &str) -> (Vec<String>, String) {
    let row = db
        .admin()
        .await
        .query_one(
            "SELECT ARRAY(SELECT DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                                            ELSE pg_get_userbyid(a.grantee)::text END
                            FROM aclexplode(n.nspacl) a ORDER BY 1),
                    pg_get_userbyid(n.nspowner)::text
               FROM pg_namespace n WHERE n.nspname = $1",
            &[&schema],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn provisioning_revokes_what_public_was_granted_on_an_existing_schema() {
    let db = TestDb::new().await;
    // Someone made the schema before the service was provisioned, and opened it to everyone.
    db.admin()
        .await
        .batch_execute(
            "CREATE SCHEMA catalog_schema;
             CREATE TABLE catalog_schema.products (id int);
             INSERT INTO catalog_schema.products VALUES (1);
             GRANT USAGE, CREATE ON SCHEMA catalog_schema TO PUBLIC;
             GRANT SELECT ON catalog_schema.products TO PUBLIC;",
        )
        .await
        .unwrap();
    let (orders, _) = db.provision("orders", "orders_schema").await;
    let intruder = session_as(&db, &orders).await;
    // The control: through PUBLIC, another service reads and plants.
    intruder
        .batch_execute("SELECT * FROM catalog_schema.products; CREATE TABLE catalog_schema.planted (id int); DROP TABLE catalog_schema.planted")
        .await
        .unwrap();

    let catalog = db.role_name("catalog");
    let mut spec = ProvisionSpec::new(&catalog, "catalog_schema").unwrap();
    // The table someone else made there is refused without it (another test's subject).
    spec.fix = true;
    let report = svcdb::provision(&mut *db.admin().await, &spec)
        .await
        .unwrap();
    assert!(
        report.changes.iter().any(|c| c.contains("PUBLIC")),
        "{:?}",
        report.changes
    );
    let (grantees, owner) = schema_acl(&db, "catalog_schema").await;
    assert_eq!(owner, catalog);
    assert!(!grantees.contains(&"PUBLIC".to_owned()), "{grantees:?}");

    // The table's own grant to PUBLIC is left, and useless without USAGE on the schema.
    let err = intruder
        .batch_execute("SELECT * FROM catalog_schema.products")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE));
    let err = intruder
        .batch_execute("CREATE TABLE catalog_schema.planted (id int)")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE));

    let again = svcdb::provision(&mut *db.admin().await, &spec)
        .await
        .unwrap();
    assert!(again.changes.is_empty(), "{:?}", again.changes);
}

#[tokio::test]
async fn provisioning_takes_an_existing_schema_from_the_role_that_owned_it() {
    let db = TestDb::new().await;
    let previous = db.role_name("previous");
    db.admin()
        .await
        .batch_execute(&format!(
            "CREATE ROLE \"{previous}\" LOGIN;
             CREATE SCHEMA catalog_schema AUTHORIZATION \"{previous}\";"
        ))
        .await
        .unwrap();
    let old_owner = session_as(&db, &previous).await;
    // The control: the owner may create there.
    old_owner
        .batch_execute("CREATE TABLE catalog_schema.before (id int)")
        .await
        .unwrap();

    let catalog = db.role_name("catalog");
    let mut spec = ProvisionSpec::new(&catalog, "catalog_schema").unwrap();
    // The table someone else made there is refused without it (another test's subject).
    spec.fix = true;
    let report = svcdb::provision(&mut *db.admin().await, &spec)
        .await
        .unwrap();
    assert!(
        report.changes.iter().any(|c| c.contains(&previous)),
        "the change names the previous owner: {:?}",
        report.changes
    );
    let (grantees, owner) = schema_acl(&db, "catalog_schema").await;
    assert_eq!(owner, catalog);
    assert!(
        !grantees.contains(&previous),
        "the previous owner kept a grant: {grantees:?}"
    );

    // The service creates in its schema; the previous owner no longer can.
    session_as(&db, &catalog)
        .await
        .batch_execute("CREATE TABLE catalog_schema.products (id int)")
        .await
        .unwrap();
    let err = old_owner
        .batch_execute("CREATE TABLE catalog_schema.after (id int)")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE));

    let again = svcdb::provision(&mut *db.admin().await, &spec)
        .await
        .unwrap();
    assert!(again.changes.is_empty(), "{:?}", again.changes);
}

/// Found by a README walkthrough: `--schema public` was handed to one service with PUBLIC's
/// privileges revoked, an empty schema of another (non-superuser) role was taken without a
/// word, and an empty `--password-env` value removed the role's password. Each is refused now;
/// an empty schema a superuser made for the service is still handed over.
#[tokio::test]
async fn provisioning_refuses_public_another_roles_schema_and_an_empty_password() {
    let db = TestDb::new().await;
    let other = db.role_name("other");
    db.admin()
        .await
        .batch_execute(&format!(
            "CREATE ROLE \"{other}\" LOGIN;
             CREATE SCHEMA theirs AUTHORIZATION \"{other}\";
             CREATE SCHEMA made_for_it;"
        ))
        .await
        .unwrap();
    let role = db.role_name("svc");
    // A setting that can never work is a configuration error; a database state provisioning
    // will not build on (another role's schema) is a refusal.
    let refused = |result: svcdb::Result<svcdb::ProvisionReport>| {
        assert!(
            matches!(result, Err(svcdb::Error::Config { .. })),
            "{result:?}"
        )
    };
    let refused_state = |result: svcdb::Result<svcdb::ProvisionReport>| {
        assert!(
            matches!(&result, Err(svcdb::Error::Refused { object, .. }) if object == "schema"),
            "{result:?}"
        )
    };
    refused(
        svcdb::provision(
            &mut *db.admin().await,
            &ProvisionSpec::new(&role, "public").unwrap(),
        )
        .await,
    );
    let spec = ProvisionSpec::new(&role, "theirs").unwrap();
    refused_state(svcdb::provision(&mut *db.admin().await, &spec).await);
    assert_eq!(schema_acl(&db, "theirs").await.1, other, "nothing changed");
    let mut empty = ProvisionSpec::new(&role, "made_for_it").unwrap();
    empty.password = Some(svcdb::Password::new(""));
    refused(svcdb::provision(&mut *db.admin().await, &empty).await);

    // The controls: a schema the superuser made is handed over; another role's with --fix.
    svcdb::provision(
        &mut *db.admin().await,
        &ProvisionSpec::new(&role, "made_for_it").unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(schema_acl(&db, "made_for_it").await.1, role);
    let mut fix = spec;
    fix.fix = true;
    svcdb::provision(&mut *db.admin().await, &fix)
        .await
        .unwrap();
    assert_eq!(schema_acl(&db, "theirs").await.1, role);
}
