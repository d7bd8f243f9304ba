//! `svcdb migrate adopt` through the real binary: a schema golang-migrate migrated (its table
//! written as golang-migrate writes it) adopted, the dry run, the refusal and its exit code.

use crate::common;

use common::Project;
use serde_json::Value;

const FILES: &[(&str, &str)] = &[
    ("1_a.up.sql", "CREATE TABLE a (id int);"),
    ("1_a.down.sql", "DROP TABLE a;"),
    ("2_b.up.sql", "CREATE TABLE b (id int);"),
    ("3_c.up.sql", "CREATE TABLE c (id int);"),
];

/// golang-migrate's table in public, at version 2, and the tables its migrations made.
async fn migrated_by_golang_migrate(p: &Project, dirty: bool) {
    p.db.admin()
        .await
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS public.schema_migrations (version bigint not null primary key, dirty boolean not null);
             INSERT INTO public.schema_migrations (version, dirty) VALUES (2, {dirty});
             CREATE SCHEMA svc; CREATE TABLE svc.a (id int); CREATE TABLE svc.b (id int);"
        ))
        .await
        .unwrap();
}

fn versions(list: &Value) -> Vec<&str> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|e| e["version"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn adopt_from_golang_migrate_then_up_runs_only_the_rest() {
    let p = Project::new().await;
    p.write(FILES);
    migrated_by_golang_migrate(&p, false).await;

    let dry = p
        .run(&[
            "migrate",
            "adopt",
            "--from",
            "golang-migrate",
            "--dry-run",
            "--json",
        ])
        .expect_code(0)
        .json();
    assert_eq!(versions(&dry["recorded"]), ["1", "2"]);
    assert_eq!(dry["pending"], serde_json::json!(["3"]));
    assert_eq!(dry["table"], "public.schema_migrations");
    assert!(
        !p.tables().await.contains(&"svcdb_migrations".to_owned()),
        "a dry run wrote the history"
    );

    let text = p
        .run(&[
            "migrate",
            "adopt",
            "--from",
            "golang-migrate",
            "--history-table",
            "public.schema_migrations",
        ])
        .expect_code(0);
    assert!(text.stdout.contains("recorded 2 b as applied"), "{text}");
    // Pending: the one golang-migrate did not apply.
    p.run(&["migrate", "status"]).expect_code(2);
    let up = p.run(&["migrate", "up", "--json"]).expect_code(0).json();
    assert_eq!(versions(&up["migrations"]), ["3"]);
    p.run(&["migrate", "status"]).expect_code(0);
}

#[tokio::test]
async fn adopting_a_dirty_golang_migrate_schema_is_refused_naming_the_version() {
    let p = Project::new().await;
    p.write(FILES);
    migrated_by_golang_migrate(&p, true).await;
    let out = p
        .run(&["migrate", "adopt", "--from", "golang-migrate", "--json"])
        .expect_code(1);
    assert_eq!(out.json()["code"], "adopt_refused", "{out}");
    assert!(out.stderr.contains("version 2"), "names the version: {out}");
    assert!(!p.tables().await.contains(&"svcdb_migrations".to_owned()));
    // An unknown tool is a command-line error.
    p.run(&["migrate", "adopt", "--from", "liquibase"])
        .expect_code(64);
}

/// Found by a user trial: the service's role may not read the other tool's table in `public`,
/// and `--json` said `connection_lost`; the code is the server's SQLSTATE.
#[tokio::test]
async fn a_history_table_the_role_may_not_read_is_reported_with_its_sqlstate() {
    let p = Project::new().await;
    p.write(FILES);
    migrated_by_golang_migrate(&p, false).await;
    let role = p.db.role_name("svc");
    p.db.admin()
        .await
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN; GRANT USAGE, CREATE ON SCHEMA svc TO {role}; ALTER SCHEMA svc OWNER TO {role};"
        ))
        .await
        .unwrap();
    let url = p.db.url_as(&role);
    let out = p
        .run_with_env(
            &["migrate", "adopt", "--from", "golang-migrate", "--json"],
            &[("DATABASE_URL", url.as_str())],
        )
        .expect_code(1)
        .json();
    assert_eq!(out["code"], "42501", "{out}");
    assert!(out["hint"].is_string(), "says how to let it read: {out}");
}

/// Found by a user trial: `--from diesel --history-table` over another tool's table recorded
/// every migration. Refused with `adopt_wrong_table`, the hint names the tool the table looks
/// like, and the command it gives adopts.
#[tokio::test]
async fn another_tools_table_is_refused_with_a_hint_that_works() {
    let p = Project::new().await;
    p.write(FILES);
    migrated_by_golang_migrate(&p, false).await;
    let out = p
        .run(&["migrate", "adopt", "--from", "dbmate", "--json"])
        .expect_code(1);
    let json = out.json();
    assert_eq!(json["code"], "adopt_wrong_table", "{out}");
    assert!(
        json["hint"]
            .as_str()
            .unwrap()
            .contains("`--from golang-migrate`"),
        "{out}"
    );
    let out = p
        .run(&[
            "migrate",
            "adopt",
            "--from",
            "diesel",
            "--history-table",
            "public.schema_migrations",
            "--json",
        ])
        .expect_code(1);
    let json = out.json();
    assert_eq!(json["code"], "adopt_wrong_table", "{out}");
    let hint = json["hint"].as_str().unwrap();
    let suggested = "--from golang-migrate --history-table public.schema_migrations";
    assert!(hint.contains(suggested), "{out}");
    assert!(!p.tables().await.contains(&"svcdb_migrations".to_owned()));
    let mut args = vec!["migrate", "adopt"];
    args.extend(suggested.split(' '));
    p.run(&args).expect_code(0);
    p.run(&["migrate", "status"]).expect_code(2);
}
