//! `svcdb migrate new` then `up`: the untouched template is refused, not recorded as an empty
//! migration; and once a migration changed after it was applied, the commands the hint names
//! really fix it.

use crate::common;

use common::Project;

/// Regression: `migrate up` right after `migrate new` recorded the placeholder comment as an
/// applied migration, and the SQL written afterwards never ran.
#[tokio::test]
async fn up_refuses_the_template_migrate_new_wrote_until_it_is_written() {
    let project = Project::new().await;
    let created = project
        .run(&["migrate", "new", "create_products", "--json"])
        .expect_code(0)
        .json();
    let up_path = created["up_path"].as_str().unwrap().to_owned();
    let down_path = created["down_path"].as_str().unwrap().to_owned();

    let out = project.run(&["migrate", "up", "--json"]).expect_code(1);
    assert_eq!(out.json()["code"], "unwritten", "{out}");
    assert!(
        out.stderr.contains(&up_path) && out.stderr.contains("write the migration's SQL first"),
        "{out}"
    );
    assert_eq!(project.tables().await, Vec::<String>::new(), "nothing ran");
    // `status` says `up` would refuse, and why.
    let out = project.run(&["migrate", "status"]).expect_code(1);
    assert!(
        out.stdout.contains("would refuse") && out.stdout.contains(&up_path),
        "{out}"
    );
    assert!(out.stderr.contains("hint: replace the comment"), "{out}");

    std::fs::write(&up_path, "CREATE TABLE products (id bigint PRIMARY KEY);\n").unwrap();
    std::fs::write(&down_path, "DROP TABLE products;\n").unwrap();
    project.run(&["migrate", "up"]).expect_code(0);
    assert_eq!(project.tables().await, ["products", "svcdb_migrations"]);
}

/// Found by a trial: the readiness check said "run `svcdb migrate up`" for a pending migration
/// that is still the template, which `up` refuses. It names the template instead; once the SQL
/// is written the migration is merely pending (the control).
#[tokio::test]
async fn health_names_a_pending_template_as_unwritten() {
    let project = Project::new().await;
    project.write(&[("0001_a.up.sql", "CREATE TABLE a (id int);\n")]);
    project.run(&["migrate", "up"]).expect_code(0);
    let created = project
        .run(&["migrate", "new", "b", "--json"])
        .expect_code(0)
        .json();
    let up_path = created["up_path"].as_str().unwrap().to_owned();
    let health = project.run(&["health", "--json"]).expect_code(1).json();
    assert_eq!(health["problems"][0]["kind"], "unwritten", "{health}");
    assert_eq!(health["problems"][0]["path"], up_path.as_str(), "{health}");
    std::fs::write(&up_path, "CREATE TABLE b (id int);\n").unwrap();
    let health = project.run(&["health", "--json"]).expect_code(1).json();
    assert_eq!(health["problems"][0]["kind"], "pending", "{health}");
}

/// Control for the check above: a migration of comments only that the user wrote is not the
/// template, and runs (with the lint's warning).
#[tokio::test]
async fn a_comment_only_migration_the_user_wrote_is_applied() {
    let project = Project::new().await;
    project.write(&[(
        "0001_nothing_yet.up.sql",
        "-- 0001 nothing_yet: kept empty on purpose.\n",
    )]);
    project.run(&["migrate", "up"]).expect_code(0);
    assert_eq!(project.tables().await, ["svcdb_migrations"]);
}

/// The column names of `products`, in order.
async fn columns(project: &Project) -> Vec<String> {
    project
        .db
        .admin()
        .await
        .query(
            "SELECT column_name::text FROM information_schema.columns
              WHERE table_schema = $1 AND table_name = 'products' ORDER BY ordinal_position",
            &[&project.schema],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Regression: the "changed after it was applied" hint led with `repair`, which records the
/// edited file as applied without running it. It now names `redo --allow-changed` (the newest
/// migration) and `down --to … --allow-changed` then `up` (an older one) first, and both run
/// the edited file.
#[tokio::test]
async fn the_changed_after_applied_hint_names_commands_that_apply_the_edit() {
    let project = Project::new().await;
    let table = |columns: &str| format!("CREATE TABLE products (id bigint PRIMARY KEY{columns});");
    project.write(&[
        ("0001_create_products.up.sql", &table("")),
        ("0001_create_products.down.sql", "DROP TABLE products;"),
    ]);
    project.run(&["migrate", "up"]).expect_code(0);

    // Edited after it ran on this (unreleased) database.
    project.write(&[("0001_create_products.up.sql", &table(", name text"))]);
    let out = project.run(&["migrate", "up"]).expect_code(1);
    let hint = out
        .stderr
        .lines()
        .find(|l| l.trim_start().starts_with("hint:"))
        .unwrap_or_else(|| panic!("no hint; {out}"));
    let redo = hint.find("`svcdb migrate redo --allow-changed`");
    let down = hint.find("`svcdb migrate down --to <the version before it> --allow-changed`");
    let repair = hint.find("`svcdb migrate repair`");
    assert!(
        redo.is_some() && down.is_some() && redo < repair && down < repair,
        "{hint}"
    );

    // The newest migration: redo applies the edit.
    project
        .run(&["migrate", "redo", "--allow-changed"])
        .expect_code(0);
    assert_eq!(columns(&project).await, ["id", "name"]);
    project.run(&["migrate", "status"]).expect_code(0);

    // An older one: down to the version before it, then up.
    project.write(&[
        (
            "0002_add_stock.up.sql",
            "ALTER TABLE products ADD COLUMN stock int;",
        ),
        (
            "0002_add_stock.down.sql",
            "ALTER TABLE products DROP COLUMN stock;",
        ),
    ]);
    project.run(&["migrate", "up"]).expect_code(0);
    project.write(&[(
        "0001_create_products.up.sql",
        &table(", name text, price numeric"),
    )]);
    project.run(&["migrate", "up"]).expect_code(1);
    project
        .run(&["migrate", "down", "--to", "0", "--allow-changed"])
        .expect_code(0);
    project.run(&["migrate", "up"]).expect_code(0);
    assert_eq!(columns(&project).await, ["id", "name", "price", "stock"]);
}
