//! `svcdb migrate lint` and the lint before `svcdb migrate up`, end to end: the real binary,
//! exit codes, `--json` fields, `--allow-unsafe`, and the shop's migrations.

use crate::common;

use std::path::Path;

use common::{svcdb, Project};
use serde_json::Value;

const ITEMS: (&str, &str) = (
    "0001_items.up.sql",
    "CREATE TABLE items (id int PRIMARY KEY, label text);",
);
const INDEX: (&str, &str) = (
    "0002_label.up.sql",
    "-- why: searches by label\nCREATE INDEX items_label ON items (label);",
);

/// `(rule, severity, allowed)` of each finding of a `--json` lint report.
fn rules(report: &Value) -> Vec<(String, String, bool)> {
    report["findings"]
        .as_array()
        .unwrap_or_else(|| panic!("no findings list: {report}"))
        .iter()
        .map(|f| {
            (
                f["rule"].as_str().unwrap().to_owned(),
                f["severity"].as_str().unwrap().to_owned(),
                f["allowed"].as_bool().unwrap(),
            )
        })
        .collect()
}

fn finding(rule: &str, severity: &str, allowed: bool) -> (String, String, bool) {
    (rule.to_owned(), severity.to_owned(), allowed)
}

/// `svcdb migrate lint --all` on a folder of `files`, without any database.
fn lint_all(files: &[(&str, &str)], extra: &[&str]) -> common::Output {
    let root = tempfile::tempdir().unwrap();
    for (rel, contents) in files {
        std::fs::write(root.path().join(rel), contents).unwrap();
    }
    let dir = root.path().to_str().unwrap();
    let mut args = vec!["migrate", "lint", "--all", "--dir", dir];
    args.extend_from_slice(extra);
    svcdb(&args, &[], None)
}

#[test]
fn lint_all_needs_no_database_and_exits_1_on_an_error() {
    // Each migration on its own: items existed before the deploy of 0002.
    let out = lint_all(&[ITEMS, INDEX], &[]).expect_code(1);
    assert!(
        out.stdout
            .contains("0002_label.up.sql:2: error[index-without-concurrently]"),
        "{out}"
    );
    assert!(
        out.stdout.contains("fix: CREATE INDEX CONCURRENTLY"),
        "{out}"
    );
    let report = lint_all(&[ITEMS, INDEX], &["--json"]).expect_code(1).json();
    assert_eq!(
        rules(&report),
        [finding("index-without-concurrently", "error", false)]
    );
    let f = &report["findings"][0];
    assert_eq!(
        (f["version"].as_str(), f["line"].as_i64()),
        (Some("0002"), Some(2))
    );
    assert!(f["path"].as_str().unwrap().ends_with("0002_label.up.sql"));
    assert!(!f["message"].as_str().unwrap().is_empty());
    assert!(!f["fix"].as_str().unwrap().is_empty());
    assert_eq!(report["migrations"], 2);
}

#[test]
fn warnings_and_allowed_findings_exit_0() {
    let report = lint_all(
        &[
            ITEMS,
            ("0002_drop.up.sql", "ALTER TABLE items DROP COLUMN label;"),
            (
                "0003_label.up.sql",
                "-- svcdb:allow index-without-concurrently: items holds ten rows\nCREATE INDEX items_label ON items (label);",
            ),
            ("0004_later.up.sql", ""),
        ],
        &["--json"],
    )
    .expect_code(0)
    .json();
    assert_eq!(
        rules(&report),
        [
            finding("drop-column", "warning", false),
            finding("index-without-concurrently", "error", true),
            finding("empty-up", "warning", false),
        ]
    );
    let out = lint_all(&[ITEMS], &[]).expect_code(0);
    assert!(out.stdout.contains("nothing to report"), "{out}");
}

#[test]
fn lint_help_documents_the_exit_codes() {
    let out = svcdb(&["migrate", "lint", "--help"], &[], None).expect_code(0);
    assert!(out.stdout.contains("Exit codes:"), "{out}");
    assert!(out.stdout.contains("svcdb:allow"), "{out}");
}

#[tokio::test]
async fn lint_checks_the_pending_migrations_as_up_will_run_them() {
    let p = Project::new().await;
    // Both pending: items is created by the same deploy, so the plain index is fine.
    p.write(&[ITEMS, INDEX]);
    let report = p.run(&["migrate", "lint", "--json"]).expect_code(0).json();
    assert_eq!(rules(&report), []);
    assert_eq!(report["migrations"], 2);

    // With 0001 applied, 0002 alone is the deploy: items exists.
    p.write(&[ITEMS]);
    std::fs::remove_file(p.migrations().join(INDEX.0)).unwrap();
    p.run(&["migrate", "up"]).expect_code(0);
    p.write(&[INDEX]);
    let report = p.run(&["migrate", "lint", "--json"]).expect_code(1).json();
    assert_eq!(
        rules(&report),
        [finding("index-without-concurrently", "error", false)]
    );
    assert_eq!(report["migrations"], 1, "the applied 0001 is not linted");
}

/// Found trying a real dbmate folder on a fresh database: lint, which runs nothing, failed on
/// the schema `up` had not created yet, and with SVCDB_CREATE_SCHEMA=true created it. Now it
/// lints every migration as pending and leaves the database alone, knowing that nothing
/// exists yet: a `DROP INDEX IF EXISTS` drops nothing (found by a trial on Mattermost's
/// folder: four false errors, where `up` ran them).
#[tokio::test]
async fn lint_before_the_schema_exists_lints_everything_and_creates_nothing() {
    let p = Project::new().await;
    p.write(&[
        ITEMS,
        INDEX,
        ("0003_tidy.up.sql", "DROP INDEX IF EXISTS nowhere_idx;"),
    ]);
    for create in ["false", "true"] {
        let report = p
            .run_with_env(
                &["migrate", "lint", "--json"],
                &[("SVCDB_CREATE_SCHEMA", create)],
            )
            .expect_code(0)
            .json();
        assert_eq!(report["migrations"], 3, "SVCDB_CREATE_SCHEMA={create}");
        assert!(!p.schema_exists().await, "SVCDB_CREATE_SCHEMA={create}");
    }
}

#[tokio::test]
async fn up_refuses_an_unsafe_migration_unless_allow_unsafe() {
    let p = Project::new().await;
    p.write(&[ITEMS]);
    p.run(&["migrate", "up"]).expect_code(0);
    p.write(&[INDEX]);

    let out = p.run(&["migrate", "up"]).expect_code(1);
    assert!(
        out.stderr.contains("0002_label.up.sql:2")
            && out.stderr.contains("index-without-concurrently"),
        "{out}"
    );
    // With --json, the findings are in the error object, as `lint --json` writes them (found
    // by a trial: only inside the `error` text).
    let refused = p.run(&["migrate", "up", "--json"]).expect_code(1).json();
    assert_eq!(refused["code"], "unsafe", "{refused}");
    let finding = &refused["findings"][0];
    assert_eq!(finding["rule"], "index-without-concurrently", "{refused}");
    assert_eq!(finding["line"], 2, "{refused}");
    assert!(
        finding["path"]
            .as_str()
            .is_some_and(|p| p.ends_with("0002_label.up.sql")),
        "{refused}"
    );
    assert_eq!(refused["findings"].as_array().map(Vec::len), Some(1));
    // `status` and `validate` say that `up` would refuse (found by a user trial: status said
    // "run up"); judged as `up --allow-unsafe`, the migration is merely pending.
    let status = p
        .run(&["migrate", "status", "--json"])
        .expect_code(1)
        .json();
    assert_eq!(status["entries"][1]["state"], "pending", "{status}");
    assert_eq!(status["refused"]["code"], "unsafe", "{status}");
    // In text, the summary says why once and the finding follows (found by a trial: the
    // refusal was printed twice, on stdout and again on stderr).
    let text = p.run(&["migrate", "status"]).expect_code(1);
    let both = format!("{}{}", text.stdout, text.stderr);
    assert_eq!(both.matches("unsafe statement").count(), 1, "{text}");
    assert!(text.stderr.contains("0002_label.up.sql:2"), "{text}");
    p.run(&["migrate", "validate"]).expect_code(1);
    p.run(&["migrate", "status", "--allow-unsafe"])
        .expect_code(2);

    let out = p.run(&["migrate", "up", "--allow-unsafe"]).expect_code(0);
    assert!(
        out.stdout.contains("error[index-without-concurrently]")
            && out.stdout.contains("allowed by --allow-unsafe"),
        "the finding let through is printed as such: {out}"
    );
    p.run(&["migrate", "status"]).expect_code(0);
}

#[test]
fn the_shop_migrations_pass_the_lint() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/shop/migrations");
    let mut checked = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let dir = entry.unwrap().path();
        let out = svcdb(
            &[
                "migrate",
                "lint",
                "--all",
                "--json",
                "--dir",
                dir.to_str().unwrap(),
            ],
            &[],
            None,
        )
        .expect_code(0)
        .json();
        assert_eq!(rules(&out), [], "{}", dir.display());
        checked += 1;
    }
    assert!(checked >= 4, "{checked} shop services");
}
