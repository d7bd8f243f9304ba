//! How the real binary reports failures: with `--json`, one JSON object on stdout
//! (`error`, `hint`, `code`) besides the text on stderr; a missing setting is a usage error
//! (exit 64); each hint once; hints that lead somewhere.

use crate::common;

use common::{svcdb, Output, Project};
use serde_json::Value;

/// The failure object `--json` promises, checked for shape: `error` and `code` strings, `hint`
/// a string or null, nothing else; and the same error as text on stderr.
#[track_caller]
fn failure(out: &Output) -> Value {
    let json = out.json();
    let fields = json
        .as_object()
        .unwrap_or_else(|| panic!("not a JSON object; {out}"));
    let mut keys: Vec<&str> = fields.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["code", "error", "hint"], "{out}");
    assert!(
        json["error"].is_string() && json["code"].is_string(),
        "{out}"
    );
    assert!(json["hint"].is_string() || json["hint"].is_null(), "{out}");
    let error = json["error"].as_str().unwrap_or_default();
    // Line breaks aside: clap lists missing options on lines of their own.
    let words = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        words(&out.stderr).contains(&words(&format!("error: {error}"))),
        "the text on stderr says the same; {out}"
    );
    json
}

/// The `hint` lines of stderr.
fn hint_lines(out: &Output) -> Vec<&str> {
    out.stderr
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("hint: "))
        .collect()
}

/// The subcommands listed by `svcdb <path> --help`, without `help`.
fn subcommands(path: &[String]) -> Vec<String> {
    let mut args = path.to_vec();
    args.push("--help".to_owned());
    let help = svcdb(&args, &[], None).expect_code(0).stdout;
    help.lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        // A name is indented by two spaces; a wrapped description, further.
        .filter_map(|l| l.strip_prefix("  ").filter(|rest| !rest.starts_with(' ')))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect()
}

/// Every command that runs something (`migrate up`, `schema verify`, `provision`, …), found
/// through `--help` so that a new subcommand is covered without touching this file.
fn leaf_commands() -> Vec<Vec<String>> {
    let mut leaves = Vec::new();
    let mut todo = vec![Vec::new()];
    while let Some(path) = todo.pop() {
        let children = subcommands(&path);
        for child in &children {
            let mut next = path.clone();
            next.push(child.clone());
            todo.push(next);
        }
        if children.is_empty() {
            leaves.push(path);
        }
    }
    leaves
}

/// Run bare, with no environment, every command fails: for want of a database, a schema or an
/// argument. Each says so as one JSON object with `--json`, exits 64 (an invalid command line),
/// and without `--json` writes nothing on stdout.
#[test]
fn every_command_with_json_reports_its_failure_as_one_json_object() {
    let cwd = tempfile::tempdir().unwrap();
    // An empty ./migrations, so that the migration commands get as far as the database.
    std::fs::create_dir(cwd.path().join("migrations")).unwrap();
    let leaves = leaf_commands();
    // The control: the list really holds the commands (the help format was understood).
    for known in [&["migrate", "up"][..], &["schema", "verify"], &["health"]] {
        assert!(
            leaves.iter().any(|l| l == known),
            "{known:?} not found in {leaves:?}"
        );
    }
    for leaf in &leaves {
        let mut args = leaf.clone();
        args.push("--json".to_owned());
        let out = svcdb(&args, &[], Some(cwd.path()));
        assert_eq!(out.code, 64, "{args:?}: {out}");
        let json = failure(&out);
        assert_eq!(json["code"], "usage", "{args:?}: {out}");
        assert!(json["hint"].is_string(), "{args:?}: {out}");

        let out = svcdb(leaf, &[], Some(cwd.path()));
        assert_eq!(out.code, 64, "{leaf:?}: {out}");
        assert!(out.stdout.is_empty(), "{leaf:?}: {out}");
    }
}

/// Regression: a missing `DATABASE_URL` exited 1 like a failed query, though `--help` lists it
/// under 64 (invalid command line); a missing schema likewise.
#[test]
fn a_missing_database_url_or_schema_is_a_usage_error() {
    let cwd = tempfile::tempdir().unwrap();
    let dir = cwd.path().to_str().unwrap();
    let out = svcdb(
        &["migrate", "status", "--json"],
        &[("SVCDB_SCHEMA", "svc"), ("SVCDB_MIGRATIONS_DIR", dir)],
        Some(cwd.path()),
    )
    .expect_code(64);
    let json = failure(&out);
    assert_eq!(json["code"], "usage");
    assert!(
        json["hint"].as_str().unwrap().contains("DATABASE_URL"),
        "{out}"
    );

    let out = svcdb(
        &["schema", "tables", "--json"],
        &[("DATABASE_URL", "postgres://catalog@127.0.0.1/appdb")],
        Some(cwd.path()),
    )
    .expect_code(64);
    let json = failure(&out);
    assert_eq!(json["code"], "usage");
    assert!(
        json["hint"].as_str().unwrap().contains("SVCDB_SCHEMA"),
        "{out}"
    );

    // An empty one is none given (a robustness trial found exit 1 and "SVCDB_SCHEMA: not
    // set" for `--schema ""`).
    for args in [
        ["--schema", "", "schema", "tables"],
        ["--database-url", "", "schema", "tables"],
    ] {
        let out = svcdb(
            &args,
            &[
                ("DATABASE_URL", "postgres://catalog@127.0.0.1/appdb"),
                ("SVCDB_SCHEMA", "svc"),
            ],
            Some(cwd.path()),
        )
        .expect_code(64);
        assert!(!out.stderr.is_empty(), "{args:?}: {out}");
    }
}

/// Found by a user trial: a malformed DATABASE_URL, a setting that can never work and an
/// invalid name exited 1 where an invalid option exits 64. They exit 64 now, each keeping its
/// code, and its message once; a refusal about the database (a role with CREATEDB, in
/// `provision_refuses_a_role_with_createdb_and_fix_removes_it`) stays 1.
#[test]
fn a_setting_or_name_that_can_never_work_is_a_usage_error_with_its_own_code() {
    let cwd = tempfile::tempdir().unwrap();
    for (url, schema, pool_max, code) in [
        ("127.0.0.1/appdb", "svc", "5", "config"),
        ("postgres://u@127.0.0.1:abc/appdb", "svc", "5", "config"),
        ("postgres://u@127.0.0.1/appdb", "svc", "0", "config"),
        (
            "postgres://u@127.0.0.1/appdb",
            "Bad Name",
            "5",
            "invalid_name",
        ),
    ] {
        let out = svcdb(
            &["schema", "tables", "--json"],
            &[
                ("DATABASE_URL", url),
                ("SVCDB_SCHEMA", schema),
                ("SVCDB_POOL_MAX", pool_max),
            ],
            Some(cwd.path()),
        )
        .expect_code(64);
        let json = failure(&out);
        assert_eq!(json["code"], code, "{out}");
        let error = json["error"].as_str().unwrap_or_default();
        assert_eq!(
            error.matches("invalid configuration").count(),
            usize::from(code == "config"),
            "{out}"
        );
    }
}

/// A failing migration: the SQLSTATE as the code, its file in the error, the hint once.
#[tokio::test]
async fn a_failed_migration_with_json_gives_the_sqlstate_and_one_hint() {
    let p = Project::new().await;
    p.write(&[("0001_broken.up.sql", "CREATE TABLE orders (id bigint;")]);

    let out = p.run(&["migrate", "up", "--json"]).expect_code(1);
    let json = failure(&out);
    assert_eq!(json["code"], "42601", "a syntax error; {out}");
    assert!(
        json["error"]
            .as_str()
            .unwrap()
            .contains("0001_broken.up.sql"),
        "{out}"
    );
    let hints = hint_lines(&out);
    assert_eq!(hints.len(), 1, "{out}");
    assert_eq!(json["hint"], hints[0]);
}

/// Regression: "permission denied for schema X" (42501) came with no hint, though the fix is
/// to run as X's owner, or to use one's own schema. The hint names both, and running as the
/// owner it names works.
#[tokio::test]
async fn permission_denied_for_the_service_schema_names_its_owner_and_the_roles_own_schema() {
    let p = Project::new().await;
    p.write(&[("0001_orders.up.sql", "CREATE TABLE orders (id bigint);")]);
    let (catalog, _) = p.db.provision("catalog", "catalog_schema").await;
    let (orders, _) = p.db.provision("orders", "orders_schema").await;

    // The catalog's role pointed at the orders' schema (a copied environment, say).
    let as_catalog = p.db.url_as(&catalog);
    let env = [
        ("DATABASE_URL", as_catalog.as_str()),
        ("SVCDB_SCHEMA", "orders_schema"),
        ("SVCDB_CREATE_SCHEMA", "false"),
    ];
    let out = p
        .run_with_env(&["migrate", "status", "--json"], &env)
        .expect_code(1);
    let json = failure(&out);
    assert_eq!(json["code"], "42501", "{out}");
    let hint = json["hint"]
        .as_str()
        .unwrap_or_else(|| panic!("a hint; {out}"));
    assert!(hint.contains(&orders), "names the owner; {out}");
    assert!(
        hint.contains("catalog_schema"),
        "names its own schema; {out}"
    );
    assert!(
        hint_lines(&out).iter().any(|h| h.contains(&orders)),
        "the text says it too; {out}"
    );

    // Following the hint: as the owner, the same command works (exit 2: one pending).
    let as_orders = p.db.url_as(&orders);
    let env = [
        ("DATABASE_URL", as_orders.as_str()),
        ("SVCDB_SCHEMA", "orders_schema"),
        ("SVCDB_CREATE_SCHEMA", "false"),
    ];
    p.run_with_env(&["migrate", "status", "--json"], &env)
        .expect_code(2);
}

/// Found by a user trial: a role `provision` made, pointed at a schema not made yet, was told
/// (by `schema tables`) to let `migrate up` create it with SVCDB_CREATE_SCHEMA=true, and got a
/// bare `permission denied for database` with no hint. The hint now says how to get the schema
/// made; following it (provision as the administrator), `up` works.
#[tokio::test]
async fn a_role_that_may_not_create_schemas_is_told_how_to_get_one() {
    let p = Project::new().await;
    p.write(&[("0001_orders.up.sql", "CREATE TABLE orders (id bigint);")]);
    let (orders, _) = p.db.provision("orders", "orders_schema").await;
    let as_orders = p.db.url_as(&orders);
    let env = [
        ("DATABASE_URL", as_orders.as_str()),
        ("SVCDB_SCHEMA", "orders_new"),
        ("SVCDB_CREATE_SCHEMA", "true"),
    ];
    let out = p
        .run_with_env(&["migrate", "up", "--json"], &env)
        .expect_code(1);
    let json = failure(&out);
    assert_eq!(json["code"], "42501", "{out}");
    assert!(
        json["hint"]
            .as_str()
            .is_some_and(|h| h.contains("orders_new")),
        "a hint naming the schema; {out}"
    );
    p.run(&["provision", "--service", &orders, "--schema", "orders_new"])
        .expect_code(0);
    p.run_with_env(&["migrate", "up", "--json"], &env)
        .expect_code(0);
}

/// A migration reaching into another service's schema: the hint names that schema's owner
/// (and does not send the role to a schema it is already using).
#[tokio::test]
async fn permission_denied_for_another_schema_names_its_owner() {
    let p = Project::new().await;
    p.write(&[(
        "0001_peek.up.sql",
        "CREATE TABLE orders_schema.stolen (id bigint);",
    )]);
    let (catalog, _) = p.db.provision("catalog", "catalog_schema").await;
    let (orders, _) = p.db.provision("orders", "orders_schema").await;

    let as_catalog = p.db.url_as(&catalog);
    let env = [
        ("DATABASE_URL", as_catalog.as_str()),
        ("SVCDB_SCHEMA", "catalog_schema"),
        ("SVCDB_CREATE_SCHEMA", "false"),
    ];
    let out = p
        .run_with_env(&["migrate", "up", "--json"], &env)
        .expect_code(1);
    let json = failure(&out);
    assert_eq!(json["code"], "42501", "{out}");
    let hint = json["hint"]
        .as_str()
        .unwrap_or_else(|| panic!("a hint; {out}"));
    assert!(hint.contains(&orders), "names the owner; {out}");
    assert!(!hint.contains("SVCDB_SCHEMA"), "{out}");
    // The migration's own hint is kept, once.
    let hints = hint_lines(&out);
    assert_eq!(hints.len(), 2, "{out}");
    assert_ne!(hints[0], hints[1], "{out}");
}

/// Regression: on a schema nobody created, `schema verify` added "migrations never ran" and
/// "table … is missing", each with a hint to run `svcdb migrate up`, which fails on a missing
/// schema too. The schema is the one problem; its hint (`svcdb provision`) works.
#[tokio::test]
async fn a_missing_schema_is_never_told_to_run_migrate_up() {
    let p = Project::new().await;
    p.write(&[("0001_orders.up.sql", "CREATE TABLE orders (id bigint);")]);
    let no_create = [("SVCDB_CREATE_SCHEMA", "false")];

    let out = p
        .run_with_env(
            &["schema", "verify", "--require", "orders", "--json"],
            &no_create,
        )
        .expect_code(1);
    let report = out.json();
    let problems = report["problems"].as_array().unwrap();
    let kinds: Vec<&str> = problems
        .iter()
        .map(|p| p["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["no_schema"], "{out}");
    let text = p
        .run_with_env(&["schema", "verify", "--require", "orders"], &no_create)
        .expect_code(1);
    assert!(!text.stdout.contains("migrate up"), "{text}");

    for command in [
        &["migrate", "up", "--json"][..],
        &["migrate", "status", "--json"],
    ] {
        let out = p.run_with_env(command, &no_create).expect_code(1);
        assert!(!out.stderr.contains("migrate up`"), "{command:?}: {out}");
    }
    let out = p
        .run_with_env(&["migrate", "up", "--json"], &no_create)
        .expect_code(1);
    let json = failure(&out);
    assert!(
        json["hint"].as_str().unwrap().contains("svcdb provision"),
        "{out}"
    );

    // Following the hint: provisioned, the schema migrates and is ready.
    let role = p.db.role_name("svc");
    let admin = p.db.url();
    p.run_with_env(
        &["provision", "--service", "svc", "--role", &role],
        &[("DATABASE_URL", admin.as_str())],
    )
    .expect_code(0);
    let as_role = p.db.url_as(&role);
    let env = [("DATABASE_URL", as_role.as_str()), no_create[0]];
    p.run_with_env(&["migrate", "up"], &env).expect_code(0);
    p.run_with_env(&["schema", "verify", "--require", "orders"], &env)
        .expect_code(0);
}

/// Found by a README walkthrough: `schema tables` and `events purge` with
/// SVCDB_CREATE_SCHEMA=true created the schema they were asked about, owned by whoever ran
/// them. They list and delete; they create nothing.
#[tokio::test]
async fn listing_and_purging_create_no_schema() {
    let p = Project::new().await;
    for args in [
        &["schema", "tables"][..],
        &["events", "purge", "--older-than", "7d"],
    ] {
        let out = p
            .run_with_env(args, &[("SVCDB_CREATE_SCHEMA", "true")])
            .expect_code(1);
        assert!(out.stderr.contains("does not exist"), "{args:?}: {out}");
        // Not "let svcdb create it when it connects": these never do (a user trial found that
        // hint with the variable already set). The SQLSTATE stays the code.
        assert!(!out.stderr.contains("when it connects"), "{args:?}: {out}");
        let mut json = args.to_vec();
        json.push("--json");
        let out = p
            .run_with_env(&json, &[("SVCDB_CREATE_SCHEMA", "true")])
            .expect_code(1);
        assert_eq!(out.json()["code"], "3F000", "{args:?}: {out}");
        assert!(!p.schema_exists().await, "{args:?} created the schema");
    }
}

/// Found by a user trial: `--json --version` printed text where every other `--json` run
/// prints one JSON object; without `--json` it stays the usual line (the control).
#[test]
fn version_with_json_is_one_json_object() {
    for args in [
        &["--version", "--json"][..],
        &["migrate", "--json", "--version"],
    ] {
        let out = svcdb(args, &[], None).expect_code(0);
        let json = out.json();
        assert_eq!(json["name"], "svcdb", "{args:?}: {out}");
        assert_eq!(
            json["version"],
            env!("CARGO_PKG_VERSION"),
            "{args:?}: {out}"
        );
    }
    let out = svcdb(&["--version"], &[], None).expect_code(0);
    assert_eq!(
        out.stdout.trim(),
        format!("svcdb {}", env!("CARGO_PKG_VERSION"))
    );
}

/// Found by a user trial: `events replay --help` listed --dir, --schema and --database-url,
/// which a replay (all AMQP) ignores. A command that uses them still lists them (the control),
/// and the hidden ones are still accepted (they come from the environment too).
#[test]
fn a_command_help_lists_only_the_shared_options_it_uses() {
    let help = |args: &[&str]| svcdb(args, &[], None).expect_code(0).stdout;
    let replay = help(&["events", "replay", "--help"]);
    for unused in ["--dir", "--schema", "--database-url", "--extra-schemas"] {
        assert!(!replay.contains(unused), "{unused} in {replay}");
    }
    assert!(replay.contains("--json"), "{replay}");
    assert!(!help(&["provision", "--help"]).contains("--dir"));
    let up = help(&["migrate", "up", "--help"]);
    for used in ["--dir", "--schema", "--database-url", "--json"] {
        assert!(up.contains(used), "{used} not in {up}");
    }
    // Accepted: it fails on the queue it names, not on the option.
    let out = svcdb(
        &["events", "replay", "--dir", "x", "--queue", ""],
        &[],
        None,
    );
    assert_eq!(out.code, 64, "{out}");
    assert!(!out.stderr.contains("unexpected argument"), "{out}");
}

/// Found by a user trial: a negative number or duration (`--limit -1`, `--timeout -1s`) was
/// read as an unknown flag ("unexpected argument '-1' found"); it is the option's invalid
/// value now. The control: a real unknown flag is still one.
#[test]
fn a_negative_value_is_an_invalid_value_not_an_unknown_flag() {
    for args in [
        &["events", "replay", "--queue", "q", "--limit", "-1"][..],
        &["health", "--timeout", "-1s"],
        &["migrate", "up", "--lock-wait", "-5s"],
        &["events", "purge", "--older-than", "-1d"],
        &["migrate", "down", "--steps", "-2"],
    ] {
        let out = svcdb(args, &[], None);
        assert_eq!(out.code, 64, "{args:?}: {out}");
        assert!(
            out.stderr.contains("invalid value") && !out.stderr.contains("unexpected argument"),
            "{args:?}: {out}"
        );
    }
    let out = svcdb(&["health", "--bogus"], &[], None);
    assert!(out.stderr.contains("unexpected argument"), "{out}");
}

/// Found by a user trial: `migrate new ''` (or `../x`) exited 1 with code `migration_source`,
/// where `--help` says an invalid command line exits 64. A usable name creates its files (the
/// control).
#[test]
fn an_invalid_migration_name_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("migrations");
    let folder = folder.to_str().unwrap();
    // A name too long for its files (found by another trial: it failed writing them, exit 1).
    let long = "n".repeat(250);
    for name in ["", "../x", " padded", long.as_str(), "x.up", "x.sql"] {
        let out = svcdb(
            &["--json", "migrate", "new", name, "--dir", folder],
            &[],
            None,
        );
        assert_eq!(out.code, 64, "{name:?}: {out}");
        assert_eq!(failure(&out)["code"], "usage", "{name:?}: {out}");
    }
    assert!(
        !dir.path().join("migrations").exists(),
        "nothing was created"
    );
    svcdb(&["migrate", "new", "create_x", "--dir", folder], &[], None).expect_code(0);
}

/// Regression (user trial): a refused certificate and an unknown setting in the URL's
/// `options` (a FATAL error while the session starts) were retried until the acquire timeout,
/// 5 s per command, though no retry fixes either; and `sslrootcert=system` was told to use
/// `sslmode=verify-ca`, which svcdb refuses with the system's roots. Each now fails at once,
/// with the server's SQLSTATE or `connect` as the code, and the certificate's hint is the one
/// of its failure (whose hints are held to suggesting only what svcdb accepts).
#[tokio::test]
async fn a_connection_failure_no_retry_fixes_is_reported_at_once() {
    let p = Project::new().await;
    p.write(&[("0001_orders.up.sql", "CREATE TABLE orders (id bigint);")]);
    let patient = std::time::Duration::from_secs(30);
    let run = |url: String| {
        let started = std::time::Instant::now();
        let out = p
            .run_with_env(
                &["migrate", "status", "--json"],
                &[
                    ("DATABASE_URL", url.as_str()),
                    ("SVCDB_ACQUIRE_TIMEOUT", "30s"),
                ],
            )
            .expect_code(1);
        assert!(started.elapsed() < patient / 2, "at once; {out}");
        out
    };

    let out = run(format!("{} options='-c svcdb_bogus_setting=1'", p.db.url()));
    assert_eq!(failure(&out)["code"], "42704", "{out}");

    // 127.0.0.1 is not a name the server's certificate lists; where the system's roots lack
    // the snakeoil certificate, the chain fails first.
    let out = run(format!(
        "{} sslmode=verify-full sslrootcert=system",
        p.db.url()
    ));
    let json = failure(&out);
    assert_eq!(json["code"], "connect", "{out}");
    let hints = [
        svcdb::TlsFailure::NameMismatch.hint(),
        svcdb::TlsFailure::Untrusted.hint(),
    ];
    assert!(
        hints.iter().any(|hint| json["hint"] == *hint),
        "the certificate's hint; {out}"
    );
}
