//! `svcdb provision` against the real PostgreSQL: an existing role that would break the
//! service's isolation, and objects in the schema that another role owns, are refused with the
//! way out, and `--fix` takes it; a role without a password is pointed to `--password-env`.

use crate::common;

use common::Project;

#[tokio::test]
async fn provision_refuses_a_role_with_createdb_and_fix_removes_it() {
    let project = Project::new().await;
    let role = project.db.role_name("svc");
    let admin = project.db.admin().await;
    admin
        .batch_execute(&format!("CREATE ROLE \"{role}\" LOGIN CREATEDB"))
        .await
        .unwrap();
    let args = ["provision", "--service", &role, "--schema", "svc_schema"];

    let out = project.run(&args).expect_code(1);
    assert!(
        out.stderr.contains("CREATEDB") && out.stderr.contains("--fix"),
        "{out}"
    );
    assert!(createdb(&admin, &role).await, "refused means untouched");
    // A state of the database, not a setting: its own code, exit 1, and not called a
    // configuration error (found by a user trial: "invalid configuration: role: role …").
    let mut json = args.to_vec();
    json.push("--json");
    let out = project.run(&json).expect_code(1);
    let failure: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(failure["code"], "refused", "{out}");
    assert!(
        !failure["error"]
            .as_str()
            .unwrap_or_default()
            .contains("configuration"),
        "{out}"
    );

    let mut fixed = args.to_vec();
    fixed.push("--fix");
    let out = project.run(&fixed).expect_code(0);
    assert!(out.stdout.contains("CREATEDB"), "{out}");
    assert!(!createdb(&admin, &role).await);
    let out = project.run(&args).expect_code(0);
    assert!(out.stdout.contains("nothing to do"), "{out}");
}

/// The role's `CREATEDB` attribute.
async fn createdb(admin: &svcdb::DedicatedConn, role: &str) -> bool {
    admin
        .query_one(
            "SELECT rolcreatedb FROM pg_roles WHERE rolname = $1",
            &[&role],
        )
        .await
        .unwrap()
        .get(0)
}

/// Regression: after `migrate up` run as postgres left postgres owning the service's tables,
/// provision said "nothing to do" while the service got `permission denied`. It now names
/// them, and `--fix` gives them to the service's role.
#[tokio::test]
async fn provision_names_objects_another_role_owns_and_fix_gives_them_to_the_service() {
    let project = Project::new().await;
    let role = project.db.role_name("svc");
    let args = ["provision", "--service", &role, "--schema", "svc_schema"];
    project.run(&args).expect_code(0);
    let admin = project.db.admin().await;
    // What an administrator's migration run leaves, one object of each kind provision covers.
    admin
        .batch_execute(
            "SET search_path = svc_schema;
             CREATE TABLE products (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text);
             CREATE VIEW product_names AS SELECT name FROM products;
             CREATE MATERIALIZED VIEW product_count AS SELECT count(*) FROM products;
             CREATE SEQUENCE skus;
             CREATE TYPE colour AS ENUM ('red', 'blue');
             CREATE TYPE money_pair AS (low numeric, high numeric);
             CREATE DOMAIN positive AS int CHECK (VALUE > 0);
             CREATE FUNCTION stock() RETURNS int LANGUAGE sql AS 'SELECT 1';
             CREATE PROCEDURE restock(n int) LANGUAGE sql AS 'SELECT 1';
             CREATE AGGREGATE total(int) (sfunc = int4pl, stype = int);",
        )
        .await
        .unwrap();
    let foreign = not_owned_by(&admin, &role).await;
    // The 10 objects and what changes owner with them (the table's index and sequence).
    assert!(
        foreign.len() > 10 && foreign.contains(&"rel products".to_owned()),
        "{foreign:?}"
    );

    let out = project.run(&args).expect_code(1);
    assert!(
        out.stderr
            .contains("table svc_schema.products (owned by postgres)")
            && out.stderr.contains("--fix"),
        "{out}"
    );
    assert_eq!(
        not_owned_by(&admin, &role).await,
        foreign,
        "refused means untouched"
    );

    let mut fixed = args.to_vec();
    fixed.push("--fix");
    let out = project.run(&fixed).expect_code(0);
    assert!(out.stdout.contains("gave 10 objects"), "{out}");
    assert_eq!(not_owned_by(&admin, &role).await, Vec::<String>::new());
    let out = project.run(&args).expect_code(0);
    assert!(out.stdout.contains("nothing to do"), "{out}");
}

/// The objects of `svc_schema` (relations, routines, types but arrays and base types) whose owner
/// is not `role`, as `kind name`, sorted.
async fn not_owned_by(admin: &svcdb::DedicatedConn, role: &str) -> Vec<String> {
    admin
        .query(
            "SELECT kind || ' ' || name FROM (
                 SELECT 'rel' AS kind, relname::text AS name, relowner AS owner
                   FROM pg_class WHERE relnamespace = 'svc_schema'::regnamespace
                 UNION ALL SELECT 'routine', proname::text, proowner
                   FROM pg_proc WHERE pronamespace = 'svc_schema'::regnamespace
                 UNION ALL SELECT 'type', typname::text, typowner
                   FROM pg_type WHERE typnamespace = 'svc_schema'::regnamespace
                                  AND typtype IN ('c', 'd', 'e')
             ) o WHERE owner <> (SELECT oid FROM pg_roles WHERE rolname = $1) ORDER BY 1",
            &[&role],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Regression: provision created a role without a password and did not say so; every later
/// command on a server that checks passwords then failed with "password missing".
#[tokio::test]
async fn provision_says_when_the_role_has_no_password_and_how_to_give_it_one() {
    let project = Project::new().await;
    let role = project.db.role_name("svc");
    let args = ["provision", "--service", &role, "--schema", "svc_schema"];

    let out = project.run(&args).expect_code(0);
    assert!(
        out.stderr.contains(&format!("role {role} has no password"))
            && out.stderr.contains("--password-env"),
        "{out}"
    );
    let mut json = args.to_vec();
    json.push("--json");
    let out = project.run(&json).expect_code(0);
    assert_eq!(out.json()["has_password"], false, "{out}");

    // The command the note gives, as it gives it.
    let var = format!("{}_PASSWORD", role.to_uppercase());
    let mut with_password = args.to_vec();
    with_password.extend(["--password-env", &var]);
    // At RUST_LOG=debug too (found by a user trial: tokio-postgres logged the statement,
    // with the SCRAM verifier, which can be attacked offline), and with tokio-postgres asked
    // for by name (found by a later trial): the verifier is a parameter it logs redacted. The
    // control: its statements do show then.
    let out = project
        .run_with_env(
            &with_password,
            &[
                (&var, "correct horse battery staple"),
                ("RUST_LOG", "debug"),
            ],
        )
        .expect_code(0);
    assert!(out.stdout.contains("set the password"), "{out}");
    assert!(!out.stderr.contains("no password"), "{out}");
    assert!(
        !out.stderr.contains("SCRAM-SHA-256") && !out.stderr.contains("horse"),
        "{out}"
    );
    let out = project
        .run_with_env(
            &with_password,
            &[
                (&var, "correct horse battery staple"),
                ("RUST_LOG", "tokio_postgres=debug"),
            ],
        )
        .expect_code(0);
    assert!(out.stderr.contains("svcdb_set_password"), "{out}");
    assert!(out.stderr.contains("<redacted>"), "{out}");
    assert!(
        !out.stderr.contains("SCRAM-SHA-256") && !out.stderr.contains("horse"),
        "{out}"
    );
    assert_eq!(
        project.run(&json).expect_code(0).json()["has_password"],
        true
    );
}

/// Found by a user trial: a name with `$` (valid unquoted in PostgreSQL) went into the hint's
/// command as it is, and the shell the user pasted it into expanded `$x`: the command then
/// provisioned schema `sch`. The hint quotes it; a plain name stays as it is (the control).
#[tokio::test]
async fn the_no_password_hint_quotes_a_name_the_shell_would_expand() {
    let project = Project::new().await;
    let role = project.db.role_name("svc");
    let out = project
        .run(&["provision", "--service", &role, "--schema", "sch$x"])
        .expect_code(0);
    assert!(out.stderr.contains("--schema 'sch$x' "), "{out}");
    assert!(out.stderr.contains(&format!("--service {role} ")), "{out}");
}

/// Found by a user trial: as the administrator the hint names (a CREATEROLE role that owns the
/// database, no superuser), provision failed on PostgreSQL 15 with "must be member of role"
/// at `CREATE SCHEMA … AUTHORIZATION`. It grants itself the role first; a second run changes
/// nothing, and the service's role can use its schema.
#[tokio::test]
async fn a_createrole_administrator_that_owns_the_database_provisions() {
    let project = Project::new().await;
    let admin_role = project.db.role_name("admin");
    let superuser = project.db.admin().await;
    superuser
        .batch_execute(&format!(
            "CREATE ROLE {admin_role} LOGIN CREATEROLE; ALTER DATABASE {} OWNER TO {admin_role}",
            project.db.name()
        ))
        .await
        .unwrap();
    let service = project.db.role_name("svc");
    let args = [
        "provision",
        "--service",
        &service,
        "--schema",
        "svc_schema",
        "--json",
    ];
    let as_admin = [("DATABASE_URL", project.db.url_as(&admin_role))];
    let as_admin: Vec<(&str, &str)> = as_admin.iter().map(|(k, v)| (*k, v.as_str())).collect();
    project.run_with_env(&args, &as_admin).expect_code(0);
    let again = project.run_with_env(&args, &as_admin).expect_code(0).json();
    assert_eq!(again["changes"], serde_json::json!([]), "{again}");
    let owner: String = superuser
        .query_one(
            "SELECT pg_get_userbyid(nspowner)::text FROM pg_namespace WHERE nspname = 'svc_schema'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, service);
    superuser
        .batch_execute(&format!(
            "ALTER DATABASE {} OWNER TO CURRENT_USER; DROP OWNED BY {admin_role}; DROP ROLE {admin_role}",
            project.db.name()
        ))
        .await
        .unwrap();
}

/// Found by an operations trial: run as a service's own role, provision failed with the
/// server's "permission denied" and no hint. It now says provision needs an administrator,
/// keeping the SQLSTATE; the same command as the administrator works (the control).
#[tokio::test]
async fn provision_as_a_role_that_may_not_create_roles_says_it_needs_an_administrator() {
    let project = Project::new().await;
    let plain = project.db.role_name("plain");
    let admin = project.db.admin().await;
    admin
        .batch_execute(&format!("CREATE ROLE {plain} LOGIN"))
        .await
        .unwrap();
    let service = project.db.role_name("svc");
    let args = [
        "provision",
        "--service",
        &service,
        "--schema",
        "svc_schema",
        "--json",
    ];
    let out = project.run_with_env(&args, &[("DATABASE_URL", &project.db.url_as(&plain))]);
    let out = out.expect_code(1);
    let json = out.json();
    assert_eq!(json["code"], "42501", "{out}");
    assert!(
        json["hint"]
            .as_str()
            .is_some_and(|h| h.contains("administrator")),
        "{out}"
    );
    project.run(&args).expect_code(0);
    admin
        .batch_execute(&format!("DROP ROLE {plain}"))
        .await
        .unwrap();
}
