//! `svcdb provision` run twice, as a deploy pipeline does on every release: the second run
//! finds everything in place, changes nothing and succeeds.

use crate::common;

use common::Project;

#[tokio::test]
async fn provisioning_twice_from_the_cli_finds_nothing_to_do_the_second_time() {
    let project = Project::new().await;
    let role = project.db.role_name("svc");
    let args = ["provision", "--service", &role, "--schema", "svc_schema"];
    let json_args = [&args[..], &["--json"]].concat();

    let first = project.run(&json_args).expect_code(0).json();
    let changes = first["changes"].as_array().expect("a list of changes");
    assert!(changes.len() >= 2, "role and schema created: {first}");
    let owner: String = project
        .db
        .admin()
        .await
        .query_one(
            "SELECT pg_get_userbyid(nspowner)::text FROM pg_namespace WHERE nspname = 'svc_schema'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, role);

    let again = project.run(&json_args).expect_code(0).json();
    assert_eq!(again["changes"], serde_json::json!([]), "{again}");
    assert_eq!(again["role"], role.as_str());
    let out = project.run(&args).expect_code(0);
    assert!(out.stdout.starts_with("nothing to do"), "{out}");
}

/// Found by a user trial: provisioning a service again with another `--schema` made its role
/// the owner of a second schema and said nothing of the first, now off its search path. The
/// first run (one schema) is the control: no warning, `other_schemas` empty.
#[tokio::test]
async fn provisioning_again_with_another_schema_names_the_schema_left_behind() {
    let project = Project::new().await;
    let role = project.db.role_name("svc");
    let first = project
        .run(&["provision", "--service", &role, "--schema", "first_schema"])
        .expect_code(0);
    assert!(!first.stderr.contains("also owns"), "{first}");
    let args = ["provision", "--service", &role, "--schema", "second_schema"];

    let out = project.run(&args).expect_code(0);
    assert!(
        out.stderr.contains("also owns schema first_schema")
            && out.stderr.contains("DROP SCHEMA \"first_schema\""),
        "{out}"
    );
    assert!(!out.stdout.contains("also owns"), "{out}");
    let json = project
        .run(&[&args[..], &["--json"]].concat())
        .expect_code(0)
        .json();
    assert_eq!(
        json["other_schemas"],
        serde_json::json!(["first_schema"]),
        "{json}"
    );
}
