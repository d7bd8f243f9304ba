//! `svcdb provision` against the real PostgreSQL: an existing role that would break the
//! service's isolation is refused with the way out, and `--fix` takes it.

mod common;

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
