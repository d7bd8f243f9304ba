//! The lint of migrations (`svcdb::migrate::lint`): each rule both ways on small folders, the
//! allow comment, lines, what a regular expression would get wrong, the shop's migrations; and
//! against a real PostgreSQL, `up` refusing before running anything, `allow_unsafe`, empty up
//! and down scripts.

use std::path::{Path, PathBuf};

use svcdb::migrate::{
    lint, DownOptions, MigrateError, MigrateEvent, MigrateOptions, Migrations, Migrator, Rule,
    Severity, UpOptions,
};
use svcdb::testing::TestDb;
use svcdb::ServiceDb;

use crate::migrate_runner::write;

/// The migrations of `files`, in a folder kept alive with them.
fn folder(files: &[(&str, &str)]) -> (tempfile::TempDir, Migrations) {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), files);
    let migrations = Migrations::from_dir(dir.path()).unwrap();
    (dir, migrations)
}

/// `(rule, line, allowed)` of each finding when `files` are deployed together.
fn findings(files: &[(&str, &str)]) -> Vec<(Rule, usize, bool)> {
    let (_dir, migrations) = folder(files);
    lint(migrations.iter())
        .findings
        .iter()
        .map(|f| (f.rule, f.line, f.allowed))
        .collect()
}

/// The rules found in one up script, `sql`, deployed alone (so every table it does not
/// create existed before).
fn rules(sql: &str) -> Vec<Rule> {
    findings(&[("1_m.up.sql", sql)])
        .into_iter()
        .map(|(rule, _, _)| rule)
        .collect()
}

/// Each of `scripts`, deployed alone, passes the lint.
fn assert_all_fine(scripts: &[&str]) {
    for sql in scripts {
        assert_eq!(rules(sql), [], "{sql}");
    }
}

/// Each of `scripts`, deployed alone, breaks `rule` and no other.
fn assert_each_flags(rule: Rule, scripts: &[&str]) {
    for sql in scripts {
        assert_eq!(rules(sql), [rule], "{sql}");
    }
}

const NO_TX: &str = "-- svcdb:no-transaction\n";

#[test]
fn create_index_needs_concurrently_on_a_table_that_existed_before_the_deploy() {
    assert_eq!(
        rules("CREATE INDEX users_email ON users (email);"),
        [Rule::IndexWithoutConcurrently]
    );
    assert_eq!(
        rules("CREATE UNIQUE INDEX IF NOT EXISTS users_email ON app.users (email);"),
        [Rule::IndexWithoutConcurrently]
    );
    assert_eq!(
        rules(&format!(
            "{NO_TX}CREATE INDEX CONCURRENTLY users_email ON users (email);"
        )),
        []
    );
    // Created earlier in the same migration, or by an earlier migration of the same deploy:
    // empty and unseen, nothing to block.
    assert_eq!(
        rules("CREATE TABLE t (a int);\nCREATE INDEX t_a ON t (a);"),
        []
    );
    assert_eq!(
        findings(&[
            ("1_t.up.sql", "CREATE TABLE t (a int);"),
            ("2_t_a.up.sql", "CREATE INDEX t_a ON t (a);"),
        ]),
        []
    );
    // …but not when the index comes first.
    assert_eq!(
        rules("CREATE INDEX t_a ON t (a);\nCREATE TABLE t (a int);"),
        [Rule::IndexWithoutConcurrently]
    );
}

/// Found by a trial on Conductor's Flyway folder: `DROP INDEX` of a live table's index was no
/// finding, while its lock (ACCESS EXCLUSIVE on the table) lasts until the deploy commits.
#[test]
fn drop_index_needs_concurrently_unless_the_deploy_made_the_index() {
    assert_each_flags(
        Rule::DropIndexWithoutConcurrently,
        &[
            "DROP INDEX users_email;",
            "DROP INDEX IF EXISTS app.users_email;",
        ],
    );
    assert_eq!(
        rules("DROP INDEX users_email, users_name;"),
        [
            Rule::DropIndexWithoutConcurrently,
            Rule::DropIndexWithoutConcurrently
        ]
    );
    assert_all_fine(&[
        "CREATE TABLE t (a int); CREATE INDEX t_a ON t (a); DROP INDEX t_a;",
        &format!("{NO_TX}DROP INDEX CONCURRENTLY users_email;"),
    ]);
    // Allowed in its file, it still shows, allowed.
    assert_eq!(
        findings(&[(
            "1_m.up.sql",
            "-- svcdb:allow drop-index-without-concurrently: a tiny table\nDROP INDEX users_email;"
        )]),
        [(Rule::DropIndexWithoutConcurrently, 2, true)]
    );
}

/// Found by a user trial (openfga's goose `NO TRANSACTION` file): in a migration that already
/// runs outside a transaction, `CREATE INDEX` and `DROP INDEX` without `CONCURRENTLY` are
/// still flagged (they block the table while they run), but the fix no longer says to make
/// the migration non-transactional; in a transactional one it does (the control).
#[test]
fn the_index_fix_in_a_non_transactional_migration_only_adds_concurrently() {
    for sql in [
        "CREATE INDEX users_email ON users (email);",
        "DROP INDEX users_email;",
    ] {
        for (script, marked) in [(format!("{NO_TX}{sql}"), true), (sql.to_owned(), false)] {
            let (_dir, migrations) = folder(&[("1_m.up.sql", &script)]);
            let report = lint(migrations.iter());
            let [finding] = report.findings.as_slice() else {
                panic!("{script}: {:?}", report.findings);
            };
            assert!(finding.fix.contains("CONCURRENTLY"), "{}", finding.fix);
            assert_eq!(
                finding.fix.contains(NO_TX.trim()),
                !marked,
                "{script}: {}",
                finding.fix
            );
        }
    }
}

/// Found by a user trial: tables a script made after `SET ROLE postgres` (or `RESET ROLE`,
/// `SET SESSION AUTHORIZATION`, connected as an administrator) belonged to that role, which
/// nothing said until `svcdb provision` refused the schema. Other settings are fine.
#[test]
fn a_script_that_changes_its_role_is_flagged() {
    assert_each_flags(
        Rule::SetRole,
        &[
            "SET ROLE postgres;\nCREATE TABLE t (id int);",
            "SET LOCAL ROLE admin;",
            "RESET ROLE;",
            "SET SESSION AUTHORIZATION postgres;",
            "RESET SESSION AUTHORIZATION;",
        ],
    );
    assert_all_fine(&[
        "SET lock_timeout = '5s';",
        "SET LOCAL statement_timeout = 0;",
        "RESET search_path;",
        "SELECT set_config('application_name', 'x', true);",
    ]);
}

/// Found by a user trial: near misses of the no-transaction marker were ignored silently, and
/// the migration ran in a transaction. They are a warning; the marker itself is none.
#[test]
fn a_near_miss_of_the_no_transaction_marker_is_a_warning() {
    for (script, line) in [
        ("--svcdb:no-transaction\nCREATE TABLE t (id int);", 1),
        ("-- SVCDB:NO-TRANSACTION\nCREATE TABLE t (id int);", 1),
        ("\n-- svcdb:no-transaction\nCREATE TABLE t (id int);", 2),
    ] {
        assert_eq!(
            findings(&[("1_m.up.sql", script)]),
            [(Rule::IgnoredMarker, line, false)],
            "{script:?}"
        );
    }
    assert_all_fine(&["-- svcdb:no-transaction\nCREATE TABLE t (id int);"]);
}

#[test]
fn concurrently_is_flagged_only_in_a_transactional_migration() {
    for sql in [
        "CREATE INDEX CONCURRENTLY users_email ON users (email);",
        "DROP INDEX CONCURRENTLY users_email;",
        "REINDEX (CONCURRENTLY) INDEX users_email;",
    ] {
        assert_eq!(rules(sql), [Rule::ConcurrentlyInTransaction], "{sql}");
        assert_eq!(rules(&format!("{NO_TX}{sql}")), [], "{sql}");
    }
    // The transaction mode is each layout's own: goose's annotation, dbmate's option,
    // diesel's metadata.toml.
    let index = "CREATE INDEX CONCURRENTLY users_email ON users (email);\n";
    for files in [
        vec![(
            "1_i.sql",
            format!("-- +goose NO TRANSACTION\n-- +goose Up\n{index}"),
        )],
        vec![(
            "1_i.sql",
            format!("-- migrate:up transaction:false\n{index}-- migrate:down\n"),
        )],
        vec![
            ("1_i/up.sql", index.to_owned()),
            (
                "1_i/metadata.toml",
                "run_in_transaction = false\n".to_owned(),
            ),
        ],
    ] {
        let files: Vec<(&str, &str)> = files.iter().map(|(p, s)| (*p, s.as_str())).collect();
        assert_eq!(findings(&files), [], "{files:?}");
    }
    let (rule, _, _) = findings(&[("1_i.sql", &format!("-- +goose Up\n{index}"))])[0];
    assert_eq!(rule, Rule::ConcurrentlyInTransaction);
}

#[test]
fn add_column_not_null_needs_a_default() {
    assert_eq!(
        rules("ALTER TABLE users ADD COLUMN plan text NOT NULL;"),
        [Rule::AddColumnNotNullWithoutDefault]
    );
    assert_all_fine(&[
        "ALTER TABLE users ADD COLUMN plan text NOT NULL DEFAULT 'free';",
        "ALTER TABLE users ADD COLUMN plan text;",
        "CREATE TABLE t (a int); ALTER TABLE t ADD COLUMN plan text NOT NULL;",
    ]);
}

#[test]
fn add_column_with_a_volatile_default_rewrites_the_table() {
    assert_each_flags(Rule::AddColumnVolatileDefault, &[
        "ALTER TABLE users ADD COLUMN seen timestamptz DEFAULT clock_timestamp();",
        "ALTER TABLE users ADD COLUMN token uuid NOT NULL DEFAULT gen_random_uuid();",
        "ALTER TABLE users ADD COLUMN r float8 DEFAULT (random() * 10)::float8;",
        "ALTER TABLE users ADD COLUMN n bigserial;",
        "ALTER TABLE users ADD COLUMN n bigint GENERATED ALWAYS AS IDENTITY;",
        "ALTER TABLE users ADD COLUMN lower_email text GENERATED ALWAYS AS (lower(email)) STORED;",
    ]);
    // Stable and constant defaults are evaluated once (PostgreSQL 11+): no rewrite.
    assert_all_fine(&[
        "ALTER TABLE users ADD COLUMN created_at timestamptz NOT NULL DEFAULT now();",
        "ALTER TABLE users ADD COLUMN created_at timestamptz DEFAULT CURRENT_TIMESTAMP;",
        "ALTER TABLE users ADD COLUMN tags text[] NOT NULL DEFAULT '{}';",
        "CREATE TABLE t (a int); ALTER TABLE t ADD COLUMN n bigserial;",
    ]);
}

/// Found by a trial on a Flyway folder: the fix for a stored generated column said to set its
/// default in a second statement, which a generated column does not have.
#[test]
fn a_stored_generated_column_gets_a_fix_it_can_follow() {
    let fix = |sql: &str| {
        let (_dir, migrations) = folder(&[("1_m.up.sql", sql)]);
        lint(migrations.iter()).findings[0].fix.clone()
    };
    let generated =
        fix("ALTER TABLE users ADD COLUMN l text GENERATED ALWAYS AS (lower(email)) STORED;");
    assert!(
        generated.contains("trigger") && !generated.contains("SET DEFAULT"),
        "{generated}"
    );
    // The control: a volatile default is set in a second statement.
    let volatile = fix("ALTER TABLE users ADD COLUMN seen timestamptz DEFAULT clock_timestamp();");
    assert!(volatile.contains("SET DEFAULT"), "{volatile}");
}

#[test]
fn alter_column_type_on_an_existing_table() {
    assert_eq!(
        rules("ALTER TABLE users ALTER COLUMN id TYPE bigint;"),
        [Rule::AlterColumnType]
    );
    assert_eq!(
        rules("CREATE TABLE t (id int); ALTER TABLE t ALTER COLUMN id TYPE bigint;"),
        []
    );
}

#[test]
fn foreign_keys_and_checks_need_not_valid() {
    for sql in [
        "ALTER TABLE orders ADD CONSTRAINT orders_user FOREIGN KEY (user_id) REFERENCES users (id);",
        "ALTER TABLE orders ADD CONSTRAINT positive CHECK (total >= 0);",
    ] {
        assert_eq!(rules(sql), [Rule::ConstraintWithoutNotValid], "{sql}");
        let not_valid = sql.replace(';', " NOT VALID;");
        assert_eq!(rules(&not_valid), [], "{not_valid}");
    }
    assert_all_fine(&[
        "ALTER TABLE orders VALIDATE CONSTRAINT orders_user;",
        "CREATE TABLE t (a int); ALTER TABLE t ADD CONSTRAINT a_positive CHECK (a > 0);",
    ]);
}

/// The fix of the one finding `sql`, deployed alone, has.
fn only_fix(sql: &str) -> String {
    let (_dir, migrations) = folder(&[("1_m.up.sql", sql)]);
    let report = lint(migrations.iter());
    let [finding] = &report.findings[..] else {
        panic!("one finding expected: {:?}", report.findings);
    };
    finding.fix.clone()
}

/// Found by a user trial: `ADD CONSTRAINT … FOREIGN KEY` on an existing table was flagged,
/// the same constraint declared in `ADD COLUMN` was not. PostgreSQL checks every existing row
/// for a `CHECK` an `ADD COLUMN` declares (under its `ACCESS EXCLUSIVE` lock), and for its
/// `REFERENCES` when the column has a default or is generated; without one the column is NULL
/// in every row and the foreign key is added unchecked, as `NOT VALID` would (3 million rows:
/// 0.6 ms without a default, 290 ms with one, 120 ms for a `CHECK`, on PostgreSQL 15).
#[test]
fn constraints_an_add_column_declares_are_checked_like_added_ones() {
    assert_each_flags(
        Rule::ConstraintWithoutNotValid,
        &[
            "ALTER TABLE orders ADD COLUMN user_id bigint DEFAULT 1 REFERENCES users (id);",
            "ALTER TABLE orders ADD COLUMN user_id bigint REFERENCES users DEFAULT 1;",
            "ALTER TABLE orders ADD COLUMN user_id bigint DEFAULT NULL CONSTRAINT orders_user REFERENCES users (id);",
            "ALTER TABLE orders ADD COLUMN total int CHECK (total >= 0);",
            "ALTER TABLE orders ADD COLUMN total int NOT NULL DEFAULT 0 CONSTRAINT positive CHECK (total >= 0);",
        ],
    );
    // A generated column is a rewrite, and its foreign key checks every row.
    assert_eq!(
        rules("ALTER TABLE orders ADD COLUMN user_id bigint GENERATED ALWAYS AS (id % 10) STORED REFERENCES users (id);"),
        [Rule::AddColumnVolatileDefault, Rule::ConstraintWithoutNotValid]
    );
    // A CHECK and a REFERENCES without a default: only the CHECK.
    assert_eq!(
        rules("ALTER TABLE orders ADD COLUMN user_id bigint REFERENCES users CHECK (user_id > 0);"),
        [Rule::ConstraintWithoutNotValid]
    );
    assert_all_fine(&[
        // No default: PostgreSQL checks no row.
        "ALTER TABLE orders ADD COLUMN user_id bigint REFERENCES users (id);",
        "ALTER TABLE orders ADD COLUMN user_id bigint CONSTRAINT orders_user REFERENCES users;",
        // No constraint.
        "ALTER TABLE orders ADD COLUMN user_id bigint;",
        "ALTER TABLE orders ADD COLUMN user_id bigint DEFAULT 1;",
        // A table created earlier in the deploy.
        "CREATE TABLE orders (id int); ALTER TABLE orders ADD COLUMN user_id bigint DEFAULT 1 REFERENCES users (id);",
        "CREATE TABLE orders (id int); ALTER TABLE orders ADD COLUMN total int CHECK (total >= 0);",
    ]);
    // Created by an earlier migration of the same deploy.
    assert_eq!(
        findings(&[
            ("1_orders.up.sql", "CREATE TABLE orders (id int);"),
            (
                "2_user.up.sql",
                "ALTER TABLE orders ADD COLUMN user_id bigint DEFAULT 1 REFERENCES users (id), ADD COLUMN total int CHECK (total >= 0);"
            ),
        ]),
        []
    );
    // The fix: the column without the constraint, then the constraint NOT VALID, by name.
    let fix =
        only_fix("ALTER TABLE orders ADD COLUMN user_id bigint DEFAULT 1 REFERENCES users (id);");
    for step in [
        "ALTER TABLE orders ADD COLUMN user_id bigint DEFAULT 1; then ",
        "ALTER TABLE orders ADD CONSTRAINT orders_user_id_fkey FOREIGN KEY (user_id) REFERENCES users (id) NOT VALID; then ",
        "ALTER TABLE orders VALIDATE CONSTRAINT orders_user_id_fkey",
    ] {
        assert!(fix.contains(step), "{step}\n{fix}");
    }
    let fix = only_fix(
        "ALTER TABLE orders ADD COLUMN total int NOT NULL DEFAULT 0 CONSTRAINT positive CHECK (total >= 0);",
    );
    for step in [
        "ALTER TABLE orders ADD COLUMN total int NOT NULL DEFAULT 0; then ",
        "ALTER TABLE orders ADD CONSTRAINT positive CHECK (total >= 0) NOT VALID; then ",
        "VALIDATE CONSTRAINT positive",
    ] {
        assert!(fix.contains(step), "{step}\n{fix}");
    }
}

/// Found on conductor's Flyway folder: `ADD PRIMARY KEY` on a live table builds its index
/// under the table's `ACCESS EXCLUSIVE` lock.
#[test]
fn primary_keys_and_unique_constraints_need_an_index_built_first() {
    for sql in [
        "ALTER TABLE users ADD PRIMARY KEY (id);",
        "ALTER TABLE users ADD CONSTRAINT users_email_key UNIQUE (email);",
        "ALTER TABLE users ADD COLUMN handle text UNIQUE;",
        "ALTER TABLE users ADD COLUMN uid bigint CONSTRAINT users_pk PRIMARY KEY;",
    ] {
        assert_eq!(rules(sql), [Rule::UniqueWithoutIndex], "{sql}");
    }
    // Found by a trial: the fix indexed a column the same statement adds, which the index
    // cannot see until that statement ran; it now says to add the column first.
    let fixes = |sql| {
        let (_dir, migrations) = folder(&[("1_m.up.sql", sql)]);
        let fixes: Vec<String> = lint(migrations.iter())
            .findings
            .into_iter()
            .map(|f| f.fix)
            .collect();
        fixes
    };
    let [fix] = &fixes(
        "ALTER TABLE users ADD COLUMN handle text, ADD CONSTRAINT users_handle_key UNIQUE (handle);",
    )[..] else {
        panic!("one finding expected");
    };
    assert!(
        fix.starts_with("add handle in an ALTER TABLE of its own"),
        "{fix}"
    );
    // Found by a trial on permify's goose folder: the fix said to add the column without its
    // constant default, which would leave the existing rows NULL.
    assert!(
        fix.contains("keeping its type, default and NOT NULL")
            && !fix.contains("without a default"),
        "{fix}"
    );
    let [fix] = &fixes("ALTER TABLE users ADD CONSTRAINT users_email_key UNIQUE (email);")[..]
    else {
        panic!("one finding expected");
    };
    assert!(fix.starts_with("build the index first"), "{fix}");
    // An unnamed primary key gets the name PostgreSQL gives it (found by a trial: `<name>`).
    let [fix] = &fixes("ALTER TABLE users ADD PRIMARY KEY (id);")[..] else {
        panic!("one finding expected");
    };
    assert!(
        fix.contains("CREATE UNIQUE INDEX CONCURRENTLY users_pkey_new")
            && fix.contains("ADD CONSTRAINT users_pkey PRIMARY KEY USING INDEX users_pkey_new"),
        "{fix}"
    );
    assert_all_fine(&[
        "ALTER TABLE users ADD CONSTRAINT users_email_key UNIQUE USING INDEX users_email_key;",
        "ALTER TABLE users ADD CONSTRAINT users_pkey PRIMARY KEY USING INDEX users_pkey;",
        "CREATE TABLE t (id int); ALTER TABLE t ADD PRIMARY KEY (id);",
    ]);
}

#[test]
fn set_not_null_needs_a_validated_check_first() {
    assert_eq!(
        rules("ALTER TABLE users ALTER COLUMN email SET NOT NULL;"),
        [Rule::SetNotNullWithoutCheck]
    );
    // A NOT VALID check, validated, then SET NOT NULL, in one transaction: SET NOT NULL skips
    // its scan, but the validation scans under the ACCESS EXCLUSIVE lock the check's
    // ADD CONSTRAINT still holds (a lint review found the old "safe" verdict wrong here).
    assert_eq!(
        findings(&[(
            "1_m.up.sql",
            "ALTER TABLE users ADD CONSTRAINT email_nn CHECK (email IS NOT NULL) NOT VALID;\n\
             ALTER TABLE users VALIDATE CONSTRAINT email_nn;\n\
             ALTER TABLE users ALTER COLUMN email SET NOT NULL;"
        )]),
        [(Rule::ConstraintWithoutNotValid, 2, false)]
    );
    // Split over two transactional migrations of the same deploy: one transaction, the same.
    let check = (
        "1_check.up.sql",
        "ALTER TABLE users ADD CONSTRAINT email_nn CHECK (email IS NOT NULL) NOT VALID;",
    );
    let validate_then_set =
        "ALTER TABLE users VALIDATE CONSTRAINT email_nn;\nALTER TABLE users ALTER COLUMN email SET NOT NULL;";
    assert_eq!(
        findings(&[check, ("2_nn.up.sql", validate_then_set)]),
        [(Rule::ConstraintWithoutNotValid, 1, false)]
    );
    // The safe sequence: validated in a non-transactional migration, after the check's
    // transaction committed; or in a later deploy.
    let no_tx = format!("{NO_TX}{validate_then_set}");
    assert_eq!(findings(&[check, ("2_nn.up.sql", &no_tx)]), []);
    assert_eq!(rules(validate_then_set), []);
    // A foreign key likewise (its lock blocks writes to both tables).
    assert_eq!(
        rules(
            "ALTER TABLE orders ADD CONSTRAINT orders_user FOREIGN KEY (user_id) REFERENCES users (id) NOT VALID;\n\
             ALTER TABLE orders VALIDATE CONSTRAINT orders_user;"
        ),
        [Rule::ConstraintWithoutNotValid]
    );
    // A check on another column, or one never validated, does not help.
    assert_eq!(
        rules(
            "ALTER TABLE users ADD CONSTRAINT name_nn CHECK (name IS NOT NULL) NOT VALID;\n\
             ALTER TABLE users VALIDATE CONSTRAINT name_nn;\n\
             ALTER TABLE users ALTER COLUMN email SET NOT NULL;"
        ),
        [
            Rule::ConstraintWithoutNotValid,
            Rule::SetNotNullWithoutCheck
        ]
    );
    assert_eq!(
        rules(
            "ALTER TABLE users ADD CONSTRAINT email_nn CHECK (email IS NOT NULL) NOT VALID;\n\
             ALTER TABLE users ALTER COLUMN email SET NOT NULL;"
        ),
        [Rule::SetNotNullWithoutCheck]
    );
}

#[test]
fn renames_and_drops_are_warnings_on_existing_tables_only() {
    for (sql, rule) in [
        (
            "ALTER TABLE users RENAME COLUMN email TO mail;",
            Rule::RenameColumn,
        ),
        ("ALTER TABLE users RENAME TO accounts;", Rule::RenameTable),
        ("ALTER TABLE users DROP COLUMN legacy;", Rule::DropColumn),
        ("DROP TABLE IF EXISTS app.users CASCADE;", Rule::DropTable),
    ] {
        assert_eq!(rules(sql), [rule], "{sql}");
        assert_eq!(rule.severity(), Severity::Warning);
        let on_new = format!("CREATE TABLE users (email text, legacy int); {sql}");
        assert_eq!(rules(&on_new), [], "{on_new}");
    }
    // A new table renamed is still new.
    assert_eq!(
        rules("CREATE TABLE t (a int); ALTER TABLE t RENAME TO u; CREATE INDEX u_a ON u (a);"),
        []
    );
    // A column added in the same deploy, even in an earlier migration, is new too (found by
    // a trial on atuin's sqlx folder); renamed, it stays new; the control is the table's
    // other column.
    assert_eq!(
        findings(&[
            (
                "1_add.up.sql",
                "ALTER TABLE users ADD COLUMN verified_at timestamptz;"
            ),
            (
                "2_drop.up.sql",
                "ALTER TABLE users RENAME COLUMN verified_at TO checked_at;\n\
                 ALTER TABLE users DROP COLUMN checked_at;\n\
                 ALTER TABLE users DROP COLUMN email;"
            ),
        ]),
        [(Rule::DropColumn, 3, false)]
    );
}

/// Found by a user trial: a value added and used in one transactional script passed the lint
/// and always failed (55P04).
#[test]
fn an_enum_value_used_in_the_transaction_that_adds_it() {
    assert_each_flags(
        Rule::EnumValueUsedBeforeCommit,
        &[
            "ALTER TYPE order_state ADD VALUE 'shipped';\nUPDATE orders SET state = 'shipped' WHERE id = 1;",
            "ALTER TYPE s.order_state ADD VALUE IF NOT EXISTS 'shipped' AFTER 'paid';\nINSERT INTO log (state) VALUES ('shipped');",
            // Found by a later trial: the server runs a DO block, and checks a SQL function's
            // body, at once; and a type made in the same transaction is no exception (15).
            "ALTER TYPE mood ADD VALUE 'meh';\nDO $$ BEGIN UPDATE t SET m = 'meh'; END $$;",
            "ALTER TYPE mood ADD VALUE 'meh';\nCREATE FUNCTION f() RETURNS bigint LANGUAGE sql AS $$ SELECT count(*) FROM t WHERE m = 'meh' $$;",
            "CREATE TYPE st AS ENUM ('a');\nALTER TYPE st ADD VALUE 'b';\nCREATE TABLE s (v st DEFAULT 'b');",
        ],
    );
    // A warning: a constant of that spelling may be another column's text.
    assert_eq!(
        Rule::EnumValueUsedBeforeCommit.severity(),
        Severity::Warning
    );
    assert_eq!(
        findings(&[(
            "1_m.up.sql",
            "SELECT 1;\nALTER TYPE order_state ADD VALUE 'shipped';\nUPDATE orders SET state = 'shipped';",
        )]),
        [(Rule::EnumValueUsedBeforeCommit, 3, false)]
    );
    assert_all_fine(&[
        // Used in a later migration, after svcdb committed this one.
        "ALTER TYPE order_state ADD VALUE 'shipped';\nUPDATE orders SET state = 'paid';",
        // Outside a transaction each statement commits on its own.
        &format!("{NO_TX}ALTER TYPE order_state ADD VALUE 'shipped';\nUPDATE orders SET state = 'shipped';"),
        // A PL/pgSQL body is checked only when it is called.
        "ALTER TYPE mood ADD VALUE 'meh';\nCREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $$ BEGIN UPDATE t SET m = 'meh'; END $$;",
        // Used before it is added.
        "UPDATE orders SET note = 'shipped';\nALTER TYPE order_state ADD VALUE 'shipped';",
        // A column of that name is no constant.
        "ALTER TYPE order_state ADD VALUE 'shipped';\nUPDATE orders SET shipped = true;",
    ]);
    assert_eq!(
        findings(&[
            (
                "1_add.up.sql",
                "ALTER TYPE order_state ADD VALUE 'shipped';"
            ),
            ("2_use.up.sql", "UPDATE orders SET state = 'shipped';"),
        ]),
        []
    );
}

#[test]
fn vacuum_full_cluster_and_lock_table() {
    // VACUUM runs outside a transaction only.
    assert_eq!(
        rules(&format!("{NO_TX}VACUUM FULL users;")),
        [Rule::VacuumFull]
    );
    assert_eq!(
        rules(&format!("{NO_TX}VACUUM (FULL, ANALYZE) users;")),
        [Rule::VacuumFull]
    );
    assert_eq!(rules("CLUSTER users USING users_pkey;"), [Rule::Cluster]);
    assert_eq!(
        rules("LOCK TABLE users IN ACCESS EXCLUSIVE MODE;"),
        [Rule::LockTable]
    );
    assert_all_fine(&[
        &format!("{NO_TX}VACUUM users;"),
        &format!("{NO_TX}VACUUM (FULL false) users;"),
        "ANALYZE users;",
    ]);
}

/// Found by a user trial: a plain `REINDEX` passed, though it blocks writes to the table (and
/// the reads that use the index being rebuilt) as long as `CREATE INDEX` does.
#[test]
fn reindex_needs_concurrently_on_what_existed_before_the_deploy() {
    assert_each_flags(
        Rule::ReindexWithoutConcurrently,
        &[
            "REINDEX TABLE users;",
            "REINDEX INDEX app.users_email;",
            "REINDEX (VERBOSE) TABLE users;",
            "REINDEX (CONCURRENTLY false) TABLE users;",
            &format!("{NO_TX}REINDEX SCHEMA app;"),
            &format!("{NO_TX}REINDEX DATABASE app;"),
        ],
    );
    assert_eq!(
        rules("REINDEX SCHEMA app;"),
        [Rule::NotInTransaction, Rule::ReindexWithoutConcurrently]
    );
    assert_all_fine(&[
        &format!("{NO_TX}REINDEX TABLE CONCURRENTLY users;"),
        &format!("{NO_TX}REINDEX (CONCURRENTLY) INDEX users_email;"),
        &format!("{NO_TX}REINDEX SCHEMA CONCURRENTLY app;"),
        "CREATE TABLE t (a int); REINDEX TABLE t;",
        "CREATE TABLE t (a int); CREATE INDEX t_a ON t (a); REINDEX INDEX t_a;",
    ]);
    let (_dir, migrations) = folder(&[("1_m.up.sql", "REINDEX INDEX users_email;")]);
    let fix = &lint(migrations.iter()).findings[0].fix;
    assert!(
        fix.starts_with("REINDEX INDEX CONCURRENTLY users_email"),
        "{fix}"
    );
    assert_an_error_a_file_may_allow(Rule::ReindexWithoutConcurrently, "REINDEX TABLE users;");
}

/// Found by a user trial: `SET UNLOGGED` (or `SET LOGGED`) on a live table passed, though it
/// rewrites the table under an `ACCESS EXCLUSIVE` lock.
#[test]
fn set_logged_or_unlogged_on_a_table_that_existed_before_the_deploy() {
    assert_each_flags(
        Rule::SetLoggedOrUnlogged,
        &[
            "ALTER TABLE users SET UNLOGGED;",
            "ALTER TABLE app.users SET LOGGED;",
        ],
    );
    assert_all_fine(&[
        "CREATE UNLOGGED TABLE t (a int); ALTER TABLE t SET LOGGED;",
        "CREATE TABLE t (a int); ALTER TABLE t SET UNLOGGED;",
    ]);
    assert_an_error_a_file_may_allow(Rule::SetLoggedOrUnlogged, "ALTER TABLE users SET UNLOGGED;");
}

/// `rule` is an error, and `-- svcdb:allow <rule>` in the file of `statement` allows it.
fn assert_an_error_a_file_may_allow(rule: Rule, statement: &str) {
    let file = format!(
        "-- svcdb:allow {}: known to be safe here\n{statement}",
        rule.name()
    );
    assert_eq!(findings(&[("1_m.up.sql", &file)]), [(rule, 2, true)]);
    assert_eq!(rule.severity(), Severity::Error);
}

#[test]
fn what_only_runs_outside_a_transaction_is_flagged_in_a_transactional_migration() {
    for sql in [
        "VACUUM users;",
        "VACUUM ANALYZE users;",
        "CREATE DATABASE other;",
        "DROP DATABASE IF EXISTS other;",
        "ALTER SYSTEM SET work_mem = '8MB';",
        "REINDEX SYSTEM app;",
        "DISCARD ALL;",
        "CREATE TABLESPACE fast LOCATION '/tmp';",
    ] {
        assert_eq!(rules(sql), [Rule::NotInTransaction], "{sql}");
        assert_eq!(rules(&format!("{NO_TX}{sql}")), [], "{sql}");
    }
    // Fine in a transaction (REINDEX TABLE blocks writes, but the server runs it there).
    assert_all_fine(&["ANALYZE users;", "DISCARD PLANS;"]);
    assert_eq!(
        rules("REINDEX TABLE users;"),
        [Rule::ReindexWithoutConcurrently]
    );
    assert_eq!(
        rules("VACUUM FULL users;"),
        [Rule::NotInTransaction, Rule::VacuumFull]
    );
    assert!(!Rule::NotInTransaction.can_be_allowed());
}

#[test]
fn empty_up_and_unparsable_scripts_are_warnings() {
    assert_eq!(rules("-- nothing yet\n"), [Rule::EmptyUp]);
    assert_eq!(rules(""), [Rule::EmptyUp]);
    assert_eq!(rules("CREATE TABLE (;"), [Rule::Unparsed]);
    assert_eq!(Rule::EmptyUp.severity(), Severity::Warning);
    assert_eq!(Rule::Unparsed.severity(), Severity::Warning);
}

#[test]
fn text_that_only_looks_like_ddl_is_not_a_statement() {
    // In a comment, a string, a dollar-quoted function body: a pattern match would flag all
    // of these; the parser sees one SELECT and one CREATE FUNCTION.
    let sql = "-- CREATE INDEX a ON users (email);\n\
        /* LOCK TABLE users; */\n\
        SELECT 'CREATE INDEX b ON users (email); VACUUM FULL users';\n\
        CREATE FUNCTION f() RETURNS void LANGUAGE sql AS $$ SELECT 1 $$;\n";
    assert_eq!(rules(sql), []);
}

#[test]
fn findings_point_at_the_statement_line_of_the_file() {
    let found = findings(&[(
        "1_m.up.sql",
        "-- header\n\nCREATE TABLE t (a int);\n\n  /* about the index */\n  CREATE INDEX u_a\n    ON users (a);\n",
    )]);
    assert_eq!(found, [(Rule::IndexWithoutConcurrently, 6, false)]);
    // In a goose file the up script starts after its marker: lines are the file's.
    let found = findings(&[(
        "1_m.sql",
        "-- a comment\n-- +goose Up\nSELECT 1;\nCREATE INDEX u_a ON users (a);\n-- +goose Down\nDROP INDEX u_a;\n",
    )]);
    assert_eq!(found, [(Rule::IndexWithoutConcurrently, 4, false)]);
    let (_dir, migrations) = folder(&[("7_m.up.sql", "LOCK TABLE users;")]);
    let report = lint(migrations.iter());
    let finding = &report.findings[0];
    assert_eq!(finding.version.as_ref().unwrap().number(), 7);
    assert!(finding.path.ends_with("7_m.up.sql"), "{}", finding.path);
    assert!(!finding.message.is_empty() && !finding.fix.is_empty());
    assert!(
        finding
            .to_string()
            .contains("7_m.up.sql:1: error[lock-table]"),
        "{finding}"
    );
}

#[test]
fn an_allow_comment_allows_its_rules_in_its_own_file_only() {
    let index = "CREATE INDEX u_a ON users (a);\n";
    let allowed = format!("-- svcdb:allow index-without-concurrently: users has 12 rows\n{index}");
    assert_eq!(
        findings(&[("1_m.up.sql", &allowed)]),
        [(Rule::IndexWithoutConcurrently, 2, true)]
    );
    let (_dir, migrations) = folder(&[("1_m.up.sql", &allowed)]);
    assert_eq!(lint(migrations.iter()).blocking().count(), 0);
    // Several rules in one comment.
    assert_eq!(
        findings(&[(
            "1_m.up.sql",
            &format!(
                "-- svcdb:allow lock-table, index-without-concurrently\n{index}LOCK TABLE users;"
            )
        )]),
        [
            (Rule::IndexWithoutConcurrently, 2, true),
            (Rule::LockTable, 3, true)
        ]
    );
    // A misspelt rule allows nothing, and is reported where it is written.
    assert_eq!(
        findings(&[(
            "1_m.up.sql",
            &format!("SELECT 1;\n-- svcdb:allow index-without-concurency\n{index}")
        )]),
        [
            (Rule::UnknownAllow, 2, false),
            (Rule::IndexWithoutConcurrently, 3, false)
        ]
    );
    // Another rule, a misspelt one, or the comment in another migration: still blocking.
    for files in [
        vec![("1_m.up.sql", format!("-- svcdb:allow lock-table\n{index}"))],
        vec![(
            "1_m.up.sql",
            format!("-- svcdb:allow index-without-concurency\n{index}"),
        )],
        vec![(
            "1_m.up.sql",
            format!("SELECT '-- svcdb:allow index-without-concurrently';\n{index}"),
        )],
        vec![
            (
                "1_a.up.sql",
                "-- svcdb:allow index-without-concurrently\nSELECT 1;".to_owned(),
            ),
            ("2_m.up.sql", index.to_owned()),
        ],
    ] {
        let files: Vec<(&str, &str)> = files.iter().map(|(p, s)| (*p, s.as_str())).collect();
        let (_dir, migrations) = folder(&files);
        assert_eq!(lint(migrations.iter()).blocking().count(), 1, "{files:?}");
    }
}

#[test]
fn what_the_server_refuses_cannot_be_allowed() {
    let index = "CREATE INDEX CONCURRENTLY u_a ON users (a);\n";
    // The comment allows nothing and says so; the finding still blocks.
    let files = [(
        "1_m.up.sql",
        format!("-- svcdb:allow concurrently-in-transaction\n{index}"),
    )];
    let files: Vec<(&str, &str)> = files.iter().map(|(p, s)| (*p, s.as_str())).collect();
    assert_eq!(
        findings(&files),
        [
            (Rule::UnknownAllow, 1, false),
            (Rule::ConcurrentlyInTransaction, 2, false)
        ]
    );
    assert!(!Rule::ConcurrentlyInTransaction.can_be_allowed());
    // The control: a lock hazard can be allowed.
    assert!(Rule::IndexWithoutConcurrently.can_be_allowed());
}

#[test]
fn every_rule_has_a_name_that_reads_back() {
    for &rule in Rule::ALL {
        assert_eq!(Rule::from_name(rule.name()), Some(rule));
        assert_eq!(
            serde_json::to_value(rule).unwrap(),
            serde_json::json!(rule.name())
        );
    }
    assert_eq!(Rule::from_name("no-such-rule"), None);
}

/// The shop example's migration folders.
fn shop_folders() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/shop/migrations");
    let mut folders: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    folders.sort();
    folders
}

#[test]
fn the_shop_migrations_pass_the_lint() {
    let folders = shop_folders();
    assert!(folders.len() >= 4, "{folders:?}");
    for folder in folders {
        let migrations = Migrations::from_dir(&folder).unwrap();
        assert!(!migrations.is_empty(), "{}", folder.display());
        // As one deploy on a new database, and each migration as a deploy of its own.
        let report = lint(migrations.iter());
        assert_eq!(report.findings, [], "{}", folder.display());
        for m in migrations.iter() {
            assert_eq!(lint([m]).findings, [], "{}", m.path);
        }
    }
}

// ---- against PostgreSQL ----

fn migrator(svc: &ServiceDb, dir: &Path, options: MigrateOptions) -> Migrator {
    Migrator::new(svc.clone(), Migrations::from_dir(dir).unwrap()).with_options(options)
}

/// Applied versions, from the history table.
/// A throwaway database whose service schema (`lint`) has `files` applied, and the folder that
/// holds them, for the next migration to be linted against the live catalog.
async fn applied(files: &[(&str, &str)]) -> (TestDb, ServiceDb, tempfile::TempDir) {
    let db = TestDb::new().await;
    let svc = db.service("lint").await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), files);
    migrator(&svc, dir.path(), MigrateOptions::default())
        .up()
        .await
        .unwrap();
    (db, svc, dir)
}

async fn history(svc: &ServiceDb) -> Vec<i64> {
    let conn = svc.get().await.unwrap();
    let sql = format!(
        "SELECT version FROM {}.svcdb_migrations ORDER BY version",
        svc.schema()
    );
    conn.query(&sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Whether the service schema has an index of that name.
async fn has_index(svc: &ServiceDb, name: &str) -> bool {
    let conn = svc.get().await.unwrap();
    conn.query_one(
        "SELECT EXISTS (SELECT 1 FROM pg_indexes WHERE schemaname = $1 AND indexname = $2)",
        &[&svc.schema().as_str(), &name],
    )
    .await
    .unwrap()
    .get(0)
}

/// An observer that notes the rule of each lint finding reported as an event.
fn lint_rules(rules: &mut Vec<Rule>) -> impl FnMut(&MigrateEvent) + Send + '_ {
    move |e| {
        if let MigrateEvent::Lint { finding, .. } = e {
            rules.push(finding.rule);
        }
    }
}

const ITEMS: (&str, &str) = (
    "1_items.up.sql",
    "CREATE TABLE items (id int PRIMARY KEY, label text);",
);
const INDEX: (&str, &str) = (
    "2_label.up.sql",
    "CREATE INDEX items_label ON items (label);",
);
const TAGS: (&str, &str) = ("3_tags.up.sql", "CREATE TABLE tags (id int);");

#[tokio::test]
async fn up_refuses_an_unsafe_migration_before_running_anything() {
    let db = TestDb::new().await;
    let svc = db.service("lint").await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), &[ITEMS]);
    migrator(&svc, dir.path(), MigrateOptions::default())
        .up()
        .await
        .unwrap();

    // items now exists: a plain CREATE INDEX on it in the next deploy blocks its writes.
    write(dir.path(), &[INDEX, TAGS]);
    // `validate` says so first (found by a user trial: it passed, and `up` then refused);
    // with the allowance `up` would have, it passes (the control).
    let checked = migrator(&svc, dir.path(), MigrateOptions::default())
        .validate()
        .await;
    assert!(
        matches!(checked, Err(MigrateError::Unsafe { .. })),
        "{checked:?}"
    );
    let allowed = MigrateOptions {
        allow_unsafe: true,
        ..MigrateOptions::default()
    };
    migrator(&svc, dir.path(), allowed)
        .validate()
        .await
        .unwrap();
    let err = migrator(&svc, dir.path(), MigrateOptions::default())
        .up()
        .await
        .unwrap_err();
    let MigrateError::Unsafe { findings } = &err else {
        panic!("expected Unsafe, got {err}");
    };
    assert_eq!(findings.len(), 1, "{err}");
    assert_eq!(findings[0].rule, Rule::IndexWithoutConcurrently);
    assert_eq!(
        (
            findings[0].version.as_ref().unwrap().number(),
            findings[0].line
        ),
        (2, 1)
    );
    assert!(err.to_string().contains("2_label.up.sql:1"), "{err}");
    assert!(err.to_string().contains("--allow-unsafe"), "{err}");
    assert_eq!(history(&svc).await, [1], "nothing ran, not even 3");
    assert!(!has_index(&svc, "items_label").await);

    // A dry run is refused the same way.
    let dry = migrator(&svc, dir.path(), MigrateOptions::default())
        .up_with(
            &svcdb::migrate::UpOptions {
                dry_run: true,
                ..Default::default()
            },
            &mut |_| {},
        )
        .await;
    assert!(matches!(dry, Err(MigrateError::Unsafe { .. })), "{dry:?}");
}

#[tokio::test]
async fn allow_unsafe_runs_it_and_reports_the_finding_as_an_event() {
    let db = TestDb::new().await;
    let svc = db.service("lint").await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), &[ITEMS]);
    migrator(&svc, dir.path(), MigrateOptions::default())
        .up()
        .await
        .unwrap();
    write(dir.path(), &[INDEX]);
    let mut lint_events = Vec::new();
    migrator(
        &svc,
        dir.path(),
        MigrateOptions {
            allow_unsafe: true,
            ..MigrateOptions::default()
        },
    )
    .up_with(&Default::default(), &mut |e| {
        if let MigrateEvent::Lint {
            finding,
            let_through,
        } = e
        {
            lint_events.push((finding.rule, *let_through));
            assert!(e.to_string().contains("--allow-unsafe"), "{e}");
        }
    })
    .await
    .unwrap();
    assert_eq!(lint_events, [(Rule::IndexWithoutConcurrently, true)]);
    assert_eq!(history(&svc).await, [1, 2]);
    assert!(has_index(&svc, "items_label").await);
}

#[tokio::test]
async fn allow_unsafe_does_not_let_through_what_the_server_would_refuse() {
    let db = TestDb::new().await;
    let svc = db.service("lint").await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[
            ITEMS,
            (
                "2_index.up.sql",
                "CREATE INDEX CONCURRENTLY items_label ON items (label);",
            ),
        ],
    );
    let err = migrator(
        &svc,
        dir.path(),
        MigrateOptions {
            allow_unsafe: true,
            ..MigrateOptions::default()
        },
    )
    .up()
    .await
    .unwrap_err();
    let MigrateError::Unsafe { findings } = &err else {
        panic!("expected a refusal before running anything, got {err}");
    };
    assert_eq!(findings[0].rule, Rule::ConcurrentlyInTransaction);
    // Nothing ran, and the hint does not offer the flag that was just given.
    assert!(!has_index(&svc, "items_label").await);
    assert!(!err.to_string().contains("--allow-unsafe"), "{err}");
}

#[tokio::test]
async fn an_allow_comment_in_the_file_lets_up_run_it_silently() {
    let db = TestDb::new().await;
    let svc = db.service("lint").await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), &[ITEMS]);
    migrator(&svc, dir.path(), MigrateOptions::default())
        .up()
        .await
        .unwrap();
    write(
        dir.path(),
        &[(
            "2_label.up.sql",
            "-- svcdb:allow index-without-concurrently: items is tiny\nCREATE INDEX items_label ON items (label);",
        )],
    );
    let mut events = 0;
    migrator(&svc, dir.path(), MigrateOptions::default())
        .up_with(&Default::default(), &mut |e| {
            events += usize::from(matches!(e, MigrateEvent::Lint { .. }));
        })
        .await
        .unwrap();
    assert_eq!(
        events, 0,
        "an allowed finding is not repeated on every deploy"
    );
    assert!(has_index(&svc, "items_label").await);
}

#[tokio::test]
async fn a_deploy_that_creates_the_table_may_index_it_plainly() {
    let db = TestDb::new().await;
    let svc = db.service("lint").await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), &[ITEMS, INDEX]);
    migrator(&svc, dir.path(), MigrateOptions::default())
        .up()
        .await
        .unwrap();
    assert!(has_index(&svc, "items_label").await);
}

#[tokio::test]
async fn an_empty_up_is_applied_and_recorded_with_a_warning() {
    let db = TestDb::new().await;
    let svc = db.service("lint").await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[
            ITEMS,
            ("2_later.up.sql", ""),
            ("3_noop.up.sql", "-- nothing\n"),
        ],
    );
    let mut warned = Vec::new();
    let report = migrator(&svc, dir.path(), MigrateOptions::default())
        .up_with(&Default::default(), &mut |e| {
            if let MigrateEvent::Lint { finding, .. } = e {
                warned.push((finding.version.as_ref().unwrap().number(), finding.rule));
            }
        })
        .await
        .unwrap();
    assert_eq!(warned, [(2, Rule::EmptyUp), (3, Rule::EmptyUp)]);
    assert_eq!(report.migrations.len(), 3);
    assert_eq!(history(&svc).await, [1, 2, 3]);
    let status = migrator(&svc, dir.path(), MigrateOptions::default())
        .status()
        .await
        .unwrap();
    assert!(status.is_up_to_date());
}

#[tokio::test]
async fn an_empty_down_makes_down_refuse_before_reverting_anything() {
    let db = TestDb::new().await;
    let svc = db.service("lint").await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[
            ITEMS,
            ("1_items.down.sql", "DROP TABLE items;"),
            TAGS,
            (
                "3_tags.down.sql",
                "-- This file should undo anything in `up.sql`\n",
            ),
            ("4_more.up.sql", "CREATE TABLE more (id int);"),
            ("4_more.down.sql", "DROP TABLE more;"),
        ],
    );
    let m = migrator(&svc, dir.path(), MigrateOptions::default());
    m.up().await.unwrap();
    let err = m
        .down(&DownOptions {
            to: Some(v(0)),
            ..DownOptions::default()
        })
        .await
        .unwrap_err();
    match &err {
        MigrateError::NoDown {
            version,
            path,
            down_at,
            empty: true,
            newer,
        } => {
            assert_eq!(version.number(), 3);
            assert!(path.ends_with("3_tags.up.sql"), "{path}");
            assert!(down_at.ends_with("3_tags.down.sql"), "{down_at}");
            assert_eq!(*newer, 1, "migration 4 lies above it");
        }
        other => panic!("expected NoDown, got {other}"),
    }
    assert_eq!(history(&svc).await, [1, 3, 4], "4 was not reverted first");
    // Reverting only what lies above it works.
    m.down(&DownOptions::default()).await.unwrap();
    assert_eq!(history(&svc).await, [1, 3]);
}

/// The version numbered `n` (as the history's integer column and `0001`-style files number it).
fn v(n: i64) -> svcdb::migrate::Version {
    svcdb::migrate::Version::try_from(n).expect("a non-negative version")
}

/// Found by a lint review on real folders (vaultwarden, mCaptcha): `varchar(30)` to
/// `varchar(100)` or `text`, and `SET NOT NULL` on a column that already is, were refused,
/// though PostgreSQL neither rewrites nor scans for them. Before `up` (and in `svcdb migrate
/// lint`) the lint now asks the catalog; a real rewrite is still refused.
#[tokio::test]
async fn up_lets_through_what_the_catalog_shows_rewrites_nothing() {
    let (_db, svc, dir) = applied(&[(
        "1_users.up.sql",
        "CREATE TABLE users (email varchar(30) NOT NULL, nick varchar(20), code char(2));",
    )])
    .await;
    write(
        dir.path(),
        &[(
            "2_wider.up.sql",
            "ALTER TABLE users ALTER COLUMN email TYPE varchar(100);\n\
             ALTER TABLE users ALTER COLUMN nick TYPE text;\n\
             ALTER TABLE users ALTER COLUMN email SET NOT NULL;",
        )],
    );
    let m = migrator(&svc, dir.path(), MigrateOptions::default());
    assert_eq!(m.lint_pending().await.unwrap().findings, []);
    m.up().await.unwrap();

    // The control: char(2) to text converts every value, and nick may hold NULLs.
    write(
        dir.path(),
        &[(
            "3_code.up.sql",
            "ALTER TABLE users ALTER COLUMN code TYPE text;\nALTER TABLE users ALTER COLUMN nick SET NOT NULL;",
        )],
    );
    let err = migrator(&svc, dir.path(), MigrateOptions::default())
        .up()
        .await
        .unwrap_err();
    let MigrateError::Unsafe { findings } = &err else {
        panic!("expected Unsafe, got {err}");
    };
    let rules: Vec<Rule> = findings.iter().map(|f| f.rule).collect();
    assert_eq!(rules, [Rule::AlterColumnType, Rule::SetNotNullWithoutCheck]);

    // A collation given with the same type keeps the values but rebuilds the column's indexes
    // under the table's lock (found by a trial on svix's folder): a finding.
    write(
        dir.path(),
        &[(
            "3_code.up.sql",
            "ALTER TABLE users ALTER COLUMN email TYPE varchar(100) COLLATE \"C\";",
        )],
    );
    let m = migrator(&svc, dir.path(), MigrateOptions::default());
    let rules: Vec<Rule> = m
        .lint_pending()
        .await
        .unwrap()
        .findings
        .iter()
        .map(|f| f.rule)
        .collect();
    assert_eq!(rules, [Rule::AlterColumnType]);
}

/// Found on mattermost's golang-migrate folder, whose every table is `CREATE TABLE IF NOT
/// EXISTS` (to upgrade schemas that have them): on a schema that had `posts`, the lint took it
/// for new and let ten plain `CREATE INDEX` on it through. And on atuin's sqlx folder: `DROP
/// TABLE IF EXISTS` of a table the schema never had was a `drop-table` warning. With the
/// catalog read, the first is refused and the second is no finding; without it (`lint`) both
/// are as before, which is the control.
#[tokio::test]
async fn if_not_exists_and_if_exists_are_judged_by_the_catalog() {
    let (_db, svc, dir) = applied(&[(
        "1_posts.up.sql",
        "CREATE TABLE posts (id int, body text);\nCREATE INDEX posts_id ON posts (id);",
    )])
    .await;
    // Line 6, an index the schema has (a Flyway folder rerun, found by a trial), is skipped by
    // PostgreSQL and no finding; line 2, the same on an index it lacks, is the control.
    write(
        dir.path(),
        &[(
            "2_again.up.sql",
            "CREATE TABLE IF NOT EXISTS posts (id int, body text);\n\
             CREATE INDEX IF NOT EXISTS posts_body ON posts (body);\n\
             DROP TABLE IF EXISTS never_there;\n\
             CREATE TABLE IF NOT EXISTS fresh (id int);\n\
             CREATE INDEX fresh_id ON fresh (id);\n\
             CREATE INDEX IF NOT EXISTS posts_id ON posts (id);",
        )],
    );
    let m = migrator(&svc, dir.path(), MigrateOptions::default());
    let rules = |findings: &[lint::Finding]| -> Vec<(usize, Rule)> {
        findings.iter().map(|f| (f.line, f.rule)).collect()
    };
    let live = m.lint_pending().await.unwrap();
    assert_eq!(rules(&live.findings), [(2, Rule::IndexWithoutConcurrently)]);
    assert!(matches!(m.up().await, Err(MigrateError::Unsafe { .. })));

    // Without the catalog the lint cannot know: `posts` counts as created, `never_there` as
    // a table the old release may use.
    let migrations = Migrations::from_dir(dir.path()).unwrap();
    let blind = lint::lint(migrations.iter().filter(|m| m.version.to_string() == "2"));
    assert_eq!(rules(&blind.findings), [(3, Rule::DropTable)]);
    // Knowing what the earlier migrations made (`lint --all`), it judges as with the catalog.
    let all = lint::lint_each(&migrations);
    assert_eq!(rules(&all.findings), [(2, Rule::IndexWithoutConcurrently)]);

    // A live table dropped earlier in the deploy is created anew by IF NOT EXISTS.
    write(
        dir.path(),
        &[(
            "2_again.up.sql",
            "DROP TABLE posts;\nCREATE TABLE IF NOT EXISTS posts (id int);\nCREATE INDEX posts_id ON posts (id);",
        )],
    );
    let m = migrator(&svc, dir.path(), MigrateOptions::default());
    assert_eq!(
        rules(&m.lint_pending().await.unwrap().findings),
        [(1, Rule::DropTable)]
    );

    // The catalog says which indexes exist: `DROP INDEX IF EXISTS` of one the schema lacks
    // drops nothing; of one it has, it is a finding (the control).
    write(
        dir.path(),
        &[(
            "2_again.up.sql",
            "DROP INDEX IF EXISTS never_indexed;\nDROP INDEX IF EXISTS posts_id;",
        )],
    );
    let m = migrator(&svc, dir.path(), MigrateOptions::default());
    assert_eq!(
        rules(&m.lint_pending().await.unwrap().findings),
        [(2, Rule::DropIndexWithoutConcurrently)]
    );

    // `ADD COLUMN IF NOT EXISTS` of a column the table has adds nothing: dropping it is a
    // finding; of one it lacks, the column is new.
    write(
        dir.path(),
        &[(
            "2_again.up.sql",
            "ALTER TABLE posts ADD COLUMN IF NOT EXISTS body text, ADD COLUMN IF NOT EXISTS title text;\n\
             ALTER TABLE posts DROP COLUMN body, DROP COLUMN title;",
        )],
    );
    let m = migrator(&svc, dir.path(), MigrateOptions::default());
    let drops: Vec<String> = m
        .lint_pending()
        .await
        .unwrap()
        .findings
        .iter()
        .filter(|f| f.rule == Rule::DropColumn)
        .map(|f| f.message.clone())
        .collect();
    assert_eq!(drops.len(), 1, "{drops:?}");
    assert!(drops[0].contains("posts.body"), "{drops:?}");
}

/// Found on a real folder: `redo` applied again a plain `CREATE INDEX` on a live table that
/// `up` refuses, without a word. Its up half is now checked as `up`'s is, before the down
/// runs, so a refusal leaves the migration applied; `allow_unsafe` lets it through (the
/// control: the same redo then runs).
#[tokio::test]
async fn redo_checks_its_up_script_before_reverting() {
    let db = TestDb::new().await;
    let svc = db.service("lint").await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[
            ITEMS,
            ("2_label.up.sql", INDEX.1),
            ("2_label.down.sql", "DROP INDEX items_label;"),
        ],
    );
    let allowing = MigrateOptions {
        allow_unsafe: true,
        ..MigrateOptions::default()
    };
    migrator(&svc, dir.path(), MigrateOptions::default())
        .up_with(
            &UpOptions {
                to: Some("1".parse().unwrap()),
                dry_run: false,
            },
            &mut |_| {},
        )
        .await
        .unwrap();
    migrator(&svc, dir.path(), allowing.clone())
        .up()
        .await
        .unwrap();
    let err = migrator(&svc, dir.path(), MigrateOptions::default())
        .redo()
        .await
        .unwrap_err();
    assert!(
        matches!(&err, MigrateError::Unsafe { findings } if findings[0].rule == Rule::IndexWithoutConcurrently),
        "{err}"
    );
    assert_eq!(history(&svc).await, [1, 2], "nothing was reverted");
    assert!(has_index(&svc, "items_label").await);

    let mut lint_events = Vec::new();
    migrator(&svc, dir.path(), allowing)
        .redo_with(&mut lint_rules(&mut lint_events))
        .await
        .unwrap();
    assert_eq!(lint_events, [Rule::IndexWithoutConcurrently]);
    assert_eq!(history(&svc).await, [1, 2]);
}

/// Found on windmill's sqlx folder: a down script with a syntax error (`DROP COLUMN language
/// SCRIPT_LANG;`) passed `down --dry-run` and `lint`, and failed only when reverted. Both now
/// report it, at its own file and line; a valid down script is no finding (the control).
#[tokio::test]
async fn a_down_script_the_parser_rejects_is_reported_before_it_runs() {
    let db = TestDb::new().await;
    let svc = db.service("lint").await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[
            ITEMS,
            ("1_items.down.sql", "DROP TABLE items;"),
            (
                "2_lang.up.sql",
                "ALTER TABLE items ADD COLUMN language text;",
            ),
            (
                "2_lang.down.sql",
                "-- the column goes\n\nALTER TABLE items DROP COLUMN language SCRIPT_LANG;",
            ),
        ],
    );
    let m = migrator(&svc, dir.path(), MigrateOptions::default());
    let found: Vec<(String, usize, Rule)> = m
        .lint_pending()
        .await
        .unwrap()
        .findings
        .iter()
        .map(|f| {
            (
                f.path.rsplit('/').next().unwrap().to_owned(),
                f.line,
                f.rule,
            )
        })
        .collect();
    assert_eq!(found, [("2_lang.down.sql".to_owned(), 3, Rule::Unparsed)]);
    m.up().await.unwrap();
    let mut warned = Vec::new();
    let dry = DownOptions {
        dry_run: true,
        ..DownOptions::default()
    };
    m.down_with(&dry, &mut lint_rules(&mut warned))
        .await
        .unwrap();
    assert_eq!(warned, [Rule::Unparsed]);
    // Reverting the one below it, whose down script parses, warns of nothing.
    warned.clear();
    let two = DownOptions {
        to: Some("0".parse().unwrap()),
        dry_run: true,
        ..DownOptions::default()
    };
    write(
        dir.path(),
        &[("2_lang.down.sql", "ALTER TABLE items DROP COLUMN language;")],
    );
    migrator(&svc, dir.path(), MigrateOptions::default())
        .with_options(MigrateOptions {
            allow_changed: true,
            ..MigrateOptions::default()
        })
        .down_with(&two, &mut lint_rules(&mut warned))
        .await
        .unwrap();
    assert_eq!(warned, []);
}

/// Found by an adversarial trial: a non-transactional down script with a typo in its third
/// statement was warned about, then run: its first two statements dropped two indexes, the
/// third failed, and the migration was left dirty, half-reverted. Outside a transaction a
/// script the parser rejects is now refused before anything runs, up or down; allowed, it runs
/// and stops half-way, as the refusal said it would (the control).
#[tokio::test]
async fn a_non_transactional_script_the_parser_rejects_is_refused_before_it_runs() {
    let db = TestDb::new().await;
    let svc = db.service("lint").await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[
            ITEMS,
            (
                "2_idx.up.sql",
                "-- svcdb:no-transaction\nCREATE INDEX CONCURRENTLY items_a ON items (id);\nCREATE INDEX CONCURRENTLY items_b ON items (label);",
            ),
            (
                "2_idx.down.sql",
                "-- svcdb:no-transaction\nDROP INDEX CONCURRENTLY items_a;\nDROP INDEX CONCURRENTLY items_b;\nselec 1;",
            ),
            (
                "3_bad.up.sql",
                "-- svcdb:no-transaction\nCREATE INDEX CONCURRENTLY items_c ON items (id);\nselec 1;",
            ),
        ],
    );
    let m = migrator(&svc, dir.path(), MigrateOptions::default());
    match m.up().await {
        Err(MigrateError::Unsafe { findings }) => {
            let found: Vec<(usize, Rule)> = findings.iter().map(|f| (f.line, f.rule)).collect();
            // The down script's finding is a warning here: it does not stop the up.
            assert_eq!(found, [(3, Rule::UnparsedOutsideTransaction)]);
        }
        other => panic!("expected Unsafe, got {other:?}"),
    }
    assert!(!has_index(&svc, "items_a").await, "nothing ran");
    std::fs::remove_file(dir.path().join("3_bad.up.sql")).unwrap();
    let allowing = MigrateOptions {
        allow_unsafe: true,
        ..MigrateOptions::default()
    };
    migrator(&svc, dir.path(), allowing.clone())
        .up()
        .await
        .unwrap();

    let m = migrator(&svc, dir.path(), MigrateOptions::default());
    assert!(matches!(
        m.down(&DownOptions::default()).await,
        Err(MigrateError::Unsafe { .. })
    ));
    assert!(has_index(&svc, "items_a").await && has_index(&svc, "items_b").await);
    let err = migrator(&svc, dir.path(), allowing)
        .down(&DownOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(&err, MigrateError::Failed(f) if f.dirty), "{err}");
    assert!(
        !has_index(&svc, "items_a").await,
        "the control: it stopped half-way"
    );
}

/// Found by an adversarial trial: with `public` an extra schema, `DROP TABLE p` of a table in
/// `public` was no finding (the catalog was read for the service schema only) and `up` dropped
/// it. The search path is read: it is a `drop-table` warning; a table in no schema of it is
/// still no finding (the control).
#[tokio::test]
async fn a_drop_of_a_table_in_an_extra_schema_is_a_finding() {
    let db = TestDb::new().await;
    let mut config = db.config("lint");
    config.extra_schemas = vec![svcdb::Ident::new("schema", "public").unwrap()];
    let svc = ServiceDb::connect(config).await.unwrap();
    svc.get()
        .await
        .unwrap()
        .batch_execute(
            "CREATE TABLE public.shared_p (id int); CREATE TABLE public.shared_q (id int);",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[(
            "1_drop.up.sql",
            "DROP TABLE IF EXISTS shared_p;\nDROP TABLE IF EXISTS nowhere_q;\n\
             CREATE TABLE IF NOT EXISTS shared_q (id int);\nCREATE INDEX shared_q_id ON shared_q (id);",
        )],
    );
    let m = migrator(&svc, dir.path(), MigrateOptions::default());
    let found: Vec<(usize, Rule)> = m
        .lint_pending()
        .await
        .unwrap()
        .findings
        .iter()
        .map(|f| (f.line, f.rule))
        .collect();
    // `CREATE TABLE IF NOT EXISTS` makes the table in the service schema whatever `public`
    // holds (a user trial found its index refused): no finding for the index.
    assert_eq!(found, [(1, Rule::DropTable)]);
}

/// Found by a trial: a 17 MB seed migration took 1.4 GB to lint, its whole parse tree at
/// once. Large scripts are parsed a piece at a time; a finding in a later piece still names
/// its own line, and one in the first piece too.
#[test]
fn a_large_script_is_linted_in_pieces_with_the_right_lines() {
    let mut sql = String::from("CREATE INDEX early ON users (email);\n");
    for i in 0..20_000 {
        sql.push_str(&format!(
            "INSERT INTO seed VALUES ({i}, 'row {i} of the seed data');\n"
        ));
    }
    assert!(sql.len() > 1024 * 1024, "more than one piece");
    sql.push_str("CREATE INDEX late ON users (name);\n");
    assert_eq!(
        findings(&[("1_seed.up.sql", &sql)]),
        [
            (Rule::IndexWithoutConcurrently, 1, false),
            (Rule::IndexWithoutConcurrently, 20_002, false)
        ]
    );
}

/// `(version, line, rule)` of each finding of [`lint::lint_each`].
fn each_finding(migrations: &Migrations) -> Vec<(String, usize, Rule)> {
    lint::lint_each(migrations)
        .findings
        .iter()
        .map(|f| (f.version.as_ref().unwrap().to_string(), f.line, f.rule))
        .collect()
}

/// Found by an adversarial trial: `lint --all` (no database) took `CREATE TABLE IF NOT EXISTS
/// t` for a new table though another migration makes `t`, and let a plain `CREATE INDEX` on
/// it through, where `lint` with the catalog refused it. `lint_each` counts the tables other
/// migrations make as existing; a table only its own migration makes stays new (the control).
#[test]
fn lint_each_counts_the_tables_other_migrations_make_as_existing() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[
            ("1_t.up.sql", "CREATE TABLE t (id int);"),
            (
                "2_again.up.sql",
                "CREATE TABLE IF NOT EXISTS t (id int);\nCREATE INDEX t_i ON t (id);",
            ),
            (
                "3_u.up.sql",
                "CREATE TABLE IF NOT EXISTS u (id int);\nCREATE INDEX u_i ON u (id);",
            ),
        ],
    );
    let migrations = Migrations::from_dir(dir.path()).unwrap();
    let found = each_finding(&migrations);
    assert_eq!(found, [("2".to_owned(), 2, Rule::IndexWithoutConcurrently)]);
}

/// Found by a user trial on harbor's and vaultwarden's folders: `lint --all` flagged
/// `varchar(128)` to `varchar(1024)` and `varchar(255)` to `text` as rewrites, where `lint`
/// with the catalog knows they are not. Without a database it now knows the types the earlier
/// migrations gave; the controls: a change to another type, and a column whose type no
/// earlier migration gave.
#[test]
fn lint_each_knows_the_column_types_earlier_migrations_gave() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[
            (
                "1_t.up.sql",
                "CREATE TABLE t (v varchar(128), w varchar(255), n int);",
            ),
            ("2_u.up.sql", "ALTER TABLE t ADD COLUMN x varchar(40);"),
            (
                "3_wider.up.sql",
                "ALTER TABLE t ALTER COLUMN v TYPE varchar(1024);\n\
                 ALTER TABLE t ALTER COLUMN w TYPE text;\n\
                 ALTER TABLE t ALTER COLUMN x TYPE varchar(40);",
            ),
            (
                "4_other.up.sql",
                "ALTER TABLE t ALTER COLUMN v TYPE varchar(10);\n\
                 ALTER TABLE t ALTER COLUMN n TYPE bigint;\n\
                 ALTER TABLE elsewhere ALTER COLUMN z TYPE text;",
            ),
        ],
    );
    let migrations = Migrations::from_dir(dir.path()).unwrap();
    let found = each_finding(&migrations);
    assert_eq!(
        found,
        [
            ("4".to_owned(), 1, Rule::AlterColumnType),
            ("4".to_owned(), 2, Rule::AlterColumnType),
            ("4".to_owned(), 3, Rule::AlterColumnType),
        ]
    );
}

/// Found by a user trial: a transactional down script with `DROP INDEX CONCURRENTLY` was run
/// and failed (25001), where the same in an up script is refused before anything runs. `down`
/// now refuses it first, whatever allows (the server would refuse it anyway); its up, in a
/// migration of its own outside a transaction, is fine (the control).
#[tokio::test]
async fn down_refuses_what_the_server_refuses_in_its_transaction_before_running() {
    let db = TestDb::new().await;
    let svc = db.service("lint").await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[
            ITEMS,
            (
                "2_idx.up.sql",
                "-- svcdb:no-transaction\nCREATE INDEX CONCURRENTLY items_a ON items (id);",
            ),
            ("2_idx.down.sql", "DROP INDEX CONCURRENTLY items_a;"),
        ],
    );
    let allowing = MigrateOptions {
        allow_unsafe: true,
        ..MigrateOptions::default()
    };
    migrator(&svc, dir.path(), allowing.clone())
        .up()
        .await
        .unwrap();
    match migrator(&svc, dir.path(), allowing)
        .down(&DownOptions::default())
        .await
    {
        Err(MigrateError::Unsafe { findings }) => {
            assert_eq!(findings[0].rule, Rule::ConcurrentlyInTransaction);
            assert!(findings[0].path.ends_with("2_idx.down.sql"), "{findings:?}");
        }
        other => panic!("expected Unsafe, got {other:?}"),
    }
    assert!(has_index(&svc, "items_a").await, "nothing was reverted");
}

/// Found by a user trial on vaultwarden's folder: `lint --all` flagged `SET NOT NULL` on a
/// column an earlier migration had added `NOT NULL DEFAULT 0`, where `lint` with the catalog
/// knows it is already. Without a database it now knows which columns the earlier migrations
/// made `NOT NULL` (and made nullable again); the controls: a nullable column, and one whose
/// `NOT NULL` a later migration dropped.
#[test]
fn lint_each_knows_which_columns_earlier_migrations_made_not_null() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[
            (
                "1_twofactor.up.sql",
                "CREATE TABLE twofactor (id int PRIMARY KEY, atype int NOT NULL, data text);",
            ),
            (
                "2_last_used.up.sql",
                "ALTER TABLE twofactor ADD COLUMN last_used INTEGER NOT NULL DEFAULT 0;",
            ),
            (
                "3_not_null.up.sql",
                "ALTER TABLE twofactor ALTER COLUMN last_used SET NOT NULL;\n\
                 ALTER TABLE twofactor ALTER COLUMN atype SET NOT NULL;\n\
                 ALTER TABLE twofactor ALTER COLUMN id SET NOT NULL;\n\
                 ALTER TABLE twofactor ALTER COLUMN data SET NOT NULL;",
            ),
            (
                "4_nullable.up.sql",
                "ALTER TABLE twofactor ALTER COLUMN atype DROP NOT NULL;",
            ),
            (
                "5_again.up.sql",
                "ALTER TABLE twofactor ALTER COLUMN atype SET NOT NULL;",
            ),
        ],
    );
    let migrations = Migrations::from_dir(dir.path()).unwrap();
    assert_eq!(
        each_finding(&migrations),
        [
            ("3".to_owned(), 4, Rule::SetNotNullWithoutCheck),
            ("5".to_owned(), 1, Rule::SetNotNullWithoutCheck),
        ]
    );
    // In one deploy likewise: a column an earlier statement added `NOT NULL`.
    assert_eq!(
        rules(
            "ALTER TABLE users ADD COLUMN n int NOT NULL DEFAULT 0;
\
             ALTER TABLE users ALTER COLUMN n SET NOT NULL;"
        ),
        []
    );
}

/// `(line, rule)` of each finding of the lint of what `up` would run on `svc` from `dir`,
/// knowing the catalog.
async fn pending_findings(svc: &ServiceDb, dir: &Path) -> Vec<(usize, Rule)> {
    migrator(svc, dir, MigrateOptions::default())
        .lint_pending()
        .await
        .unwrap()
        .findings
        .iter()
        .map(|f| (f.line, f.rule))
        .collect()
}

/// Found by a user trial on mattermost's folder: `ADD COLUMN IF NOT EXISTS schemeguest boolean
/// NOT NULL` of a column an earlier migration had added was refused, though PostgreSQL skips
/// it. The controls: the same of a column no earlier migration added, and the volatile-default
/// rule likewise; and in one deploy, a column added by an earlier statement.
#[test]
fn add_column_if_not_exists_of_a_column_that_is_there_adds_nothing() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[
            ("1_members.up.sql", "CREATE TABLE TeamMembers (id int);"),
            (
                "2_guest.up.sql",
                "ALTER TABLE TeamMembers ADD COLUMN schemeguest boolean, ADD COLUMN token uuid;",
            ),
            (
                "3_again.up.sql",
                "ALTER TABLE TeamMembers ADD COLUMN IF NOT EXISTS schemeguest boolean NOT NULL;\n\
                 ALTER TABLE TeamMembers ADD COLUMN IF NOT EXISTS token uuid DEFAULT gen_random_uuid();\n\
                 ALTER TABLE TeamMembers ADD COLUMN IF NOT EXISTS schemeadmin boolean NOT NULL;\n\
                 ALTER TABLE TeamMembers ADD COLUMN IF NOT EXISTS secret uuid DEFAULT gen_random_uuid();",
            ),
        ],
    );
    let migrations = Migrations::from_dir(dir.path()).unwrap();
    assert_eq!(
        each_finding(&migrations),
        [
            ("3".to_owned(), 3, Rule::AddColumnNotNullWithoutDefault),
            ("3".to_owned(), 4, Rule::AddColumnVolatileDefault),
        ]
    );
    assert_eq!(
        rules(
            "ALTER TABLE users ADD COLUMN plan text;\n\
             ALTER TABLE users ADD COLUMN IF NOT EXISTS plan text NOT NULL;"
        ),
        []
    );
    assert_eq!(
        rules("ALTER TABLE users ADD COLUMN IF NOT EXISTS plan text NOT NULL;"),
        [Rule::AddColumnNotNullWithoutDefault]
    );
}

/// The same, knowing the catalog: a column the live table has.
#[tokio::test]
async fn add_column_if_not_exists_of_a_live_column_adds_nothing() {
    let (_db, svc, dir) = applied(&[(
        "1_members.up.sql",
        "CREATE TABLE teammembers (id int, schemeguest boolean, token uuid);",
    )])
    .await;
    write(
        dir.path(),
        &[(
            "2_again.up.sql",
            "ALTER TABLE TeamMembers ADD COLUMN IF NOT EXISTS schemeguest boolean NOT NULL;\n\
             ALTER TABLE TeamMembers ADD COLUMN IF NOT EXISTS token uuid DEFAULT gen_random_uuid();\n\
             ALTER TABLE TeamMembers ADD COLUMN IF NOT EXISTS schemeadmin boolean NOT NULL;\n\
             ALTER TABLE TeamMembers ADD COLUMN IF NOT EXISTS secret uuid DEFAULT gen_random_uuid();",
        )],
    );
    assert_eq!(
        pending_findings(&svc, dir.path()).await,
        [
            (3, Rule::AddColumnNotNullWithoutDefault),
            (4, Rule::AddColumnVolatileDefault)
        ]
    );
}

/// Found by a user trial: `lint --all` flagged `DROP INDEX IF EXISTS` of an index no migration
/// of the folder made (error) and `DROP TABLE IF EXISTS` of a table none made (warning), though
/// both drop nothing. The controls: what an earlier migration made, and a drop without
/// `IF EXISTS`, whose object must be there (made outside the folder) for it to run.
#[test]
fn lint_each_drops_with_if_exists_of_what_no_earlier_migration_made_are_no_finding() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[
            (
                "1_t.up.sql",
                "CREATE TABLE t (id int);\nCREATE INDEX t_id ON t (id);",
            ),
            (
                "2_drops.up.sql",
                "DROP INDEX IF EXISTS never_made;\n\
                 DROP TABLE IF EXISTS never_there;\n\
                 DROP INDEX IF EXISTS t_id;\n\
                 DROP INDEX outside_the_folder;\n\
                 DROP TABLE outside;",
            ),
            // Dropped by the earlier migration: nothing to drop any more.
            ("3_again.up.sql", "DROP INDEX IF EXISTS t_id;"),
            ("4_t.up.sql", "DROP TABLE IF EXISTS t;"),
        ],
    );
    let migrations = Migrations::from_dir(dir.path()).unwrap();
    assert_eq!(
        each_finding(&migrations),
        [
            ("2".to_owned(), 3, Rule::DropIndexWithoutConcurrently),
            ("2".to_owned(), 4, Rule::DropIndexWithoutConcurrently),
            ("2".to_owned(), 5, Rule::DropTable),
            ("4".to_owned(), 1, Rule::DropTable),
        ]
    );
}

/// Before the first `up` the service schema may not exist yet: nothing does, so `DROP … IF
/// EXISTS` drops nothing; the control, a plain `CREATE INDEX` on a table no migration makes.
#[tokio::test]
async fn drops_if_exists_before_the_schema_exists_are_no_finding() {
    let db = TestDb::new().await;
    let mut config = db.config("not_yet");
    config.create_schema = false;
    let svc = ServiceDb::new(config).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[(
            "1_drops.up.sql",
            "DROP INDEX IF EXISTS old_index;\nDROP TABLE IF EXISTS old_table;\nCREATE INDEX users_email ON users (email);",
        )],
    );
    assert_eq!(
        pending_findings(&svc, dir.path()).await,
        [(3, Rule::IndexWithoutConcurrently)]
    );
}

/// The harbor migration of a user trial, after one that made `replication_target`.
const REPLICATION_TARGET: (&str, &str) = (
    "1_target.up.sql",
    "CREATE TABLE replication_target (id int, url varchar(64), password varchar(128), name varchar(64) NOT NULL);\n\
     CREATE INDEX target_name ON replication_target (name);",
);
const REGISTRY: (&str, &str) = (
    "2_registry.up.sql",
    "ALTER TABLE replication_target RENAME TO registry;\n\
     ALTER TABLE registry RENAME COLUMN password TO access_secret;\n\
     ALTER TABLE registry ALTER COLUMN url TYPE varchar(256);\n\
     ALTER TABLE registry ALTER COLUMN access_secret TYPE varchar(4096);\n\
     ALTER TABLE registry ALTER COLUMN name SET NOT NULL;\n\
     ALTER INDEX target_name RENAME TO registry_name;\n\
     CREATE INDEX IF NOT EXISTS registry_name ON registry (name);\n\
     DROP INDEX IF EXISTS target_name;\n\
     ALTER TABLE registry ALTER COLUMN name TYPE varchar(10);\n\
     CREATE INDEX registry_url ON registry (url);\n\
     DROP INDEX IF EXISTS registry_name;",
);
/// What the lint finds in [`REGISTRY`] by line: the renames themselves (warnings), and the
/// controls: a narrower type, an index on the renamed table, which existed before the deploy,
/// and a drop of the renamed index.
const REGISTRY_FINDINGS: [(usize, Rule); 5] = [
    (1, Rule::RenameTable),
    (2, Rule::RenameColumn),
    (9, Rule::AlterColumnType),
    (10, Rule::IndexWithoutConcurrently),
    (11, Rule::DropIndexWithoutConcurrently),
];

/// Found by a user trial on harbor's folder: after `RENAME TO registry` and `RENAME COLUMN
/// password TO access_secret`, widening their `varchar`s (which rewrites nothing) was an error,
/// the lint no longer knowing the table or the column. What it knows of a table, its columns
/// and indexes now follows their renames, without a database (earlier migrations and earlier
/// statements) …
#[test]
fn lint_each_follows_renames_of_tables_columns_and_indexes() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[
            REPLICATION_TARGET,
            REGISTRY,
            (
                "3_later.up.sql",
                "ALTER TABLE registry ALTER COLUMN access_secret TYPE text;\n\
                 ALTER TABLE registry ALTER COLUMN name SET NOT NULL;\n\
                 ALTER TABLE replication_target ALTER COLUMN url TYPE text;",
            ),
        ],
    );
    let migrations = Migrations::from_dir(dir.path()).unwrap();
    let mut expected: Vec<(String, usize, Rule)> = REGISTRY_FINDINGS
        .iter()
        .map(|&(line, rule)| ("2".to_owned(), line, rule))
        .collect();
    // The old name is no table any more: nothing is known of its columns.
    expected.push(("3".to_owned(), 3, Rule::AlterColumnType));
    assert_eq!(each_finding(&migrations), expected);
}

/// … and knowing the catalog.
#[tokio::test]
async fn renames_of_live_tables_columns_and_indexes_are_followed() {
    let db = TestDb::new().await;
    let svc = db.service("lint").await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), &[REPLICATION_TARGET]);
    migrator(&svc, dir.path(), MigrateOptions::default())
        .up()
        .await
        .unwrap();
    write(dir.path(), &[REGISTRY]);
    assert_eq!(pending_findings(&svc, dir.path()).await, REGISTRY_FINDINGS);
}

/// What the deploy did to a table (a column it added, a constraint it added in the still open
/// transaction) follows the table's rename: dropping the column is no finding, validating the
/// constraint is; the control is a column the table had. A validated `CHECK (col IS NOT NULL)`
/// follows its column's rename: `SET NOT NULL` under the new name skips its scan.
#[test]
fn a_renamed_table_or_column_keeps_what_the_deploy_did_to_it() {
    assert_eq!(
        rules(
            "ALTER TABLE users ADD COLUMN verified_at timestamptz;\n\
             ALTER TABLE users ADD CONSTRAINT email_nn CHECK (email IS NOT NULL) NOT VALID;\n\
             ALTER TABLE users RENAME TO accounts;\n\
             ALTER TABLE accounts DROP COLUMN verified_at;\n\
             ALTER TABLE accounts VALIDATE CONSTRAINT email_nn;\n\
             ALTER TABLE accounts DROP COLUMN email;"
        ),
        [
            Rule::RenameTable,
            Rule::ConstraintWithoutNotValid,
            Rule::DropColumn
        ]
    );
    let check = (
        "1_check.up.sql",
        "ALTER TABLE users ADD CONSTRAINT email_nn CHECK (email IS NOT NULL) NOT VALID;",
    );
    let renamed = format!(
        "{NO_TX}ALTER TABLE users VALIDATE CONSTRAINT email_nn;\n\
         ALTER TABLE users RENAME COLUMN email TO mail;\n\
         ALTER TABLE users ALTER COLUMN mail SET NOT NULL;"
    );
    assert_eq!(
        findings(&[check, ("2_nn.up.sql", &renamed)]),
        [(Rule::RenameColumn, 3, false)]
    );
}

/// Against PostgreSQL: `ADD COLUMN … REFERENCES` without a default on a table with rows runs
/// (the server adds the key unchecked, and valid); with a `CHECK` it is refused, and the
/// statements of the fix, the validation in a non-transactional migration of its own, pass
/// the lint and run.
#[tokio::test]
async fn an_add_column_constraint_is_judged_as_the_server_checks_it() {
    let (_db, svc, dir) = applied(&[(
        "1_orders.up.sql",
        "CREATE TABLE users (id bigint PRIMARY KEY);
         INSERT INTO users VALUES (1);
         CREATE TABLE orders (id int);
         INSERT INTO orders SELECT generate_series(1, 100);",
    )])
    .await;
    write(
        dir.path(),
        &[(
            "2_user.up.sql",
            "ALTER TABLE orders ADD COLUMN user_id bigint REFERENCES users (id);",
        )],
    );
    let mut events = Vec::new();
    migrator(&svc, dir.path(), MigrateOptions::default())
        .up_with(&UpOptions::default(), &mut lint_rules(&mut events))
        .await
        .unwrap();
    assert_eq!(events, []);
    let valid: bool = svc
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT convalidated FROM pg_constraint WHERE conname = 'orders_user_id_fkey'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(valid, "added valid without a check of the rows");

    let checked = "ALTER TABLE orders ADD COLUMN total int DEFAULT 0 CHECK (total >= 0);";
    write(dir.path(), &[("3_total.up.sql", checked)]);
    let err = migrator(&svc, dir.path(), MigrateOptions::default())
        .up()
        .await
        .unwrap_err();
    let MigrateError::Unsafe { findings } = &err else {
        panic!("expected Unsafe, got {err}");
    };
    assert_eq!(findings.len(), 1, "{err}");
    assert_eq!(findings[0].rule, Rule::ConstraintWithoutNotValid);
    let (_, steps) = findings[0].fix.rsplit_once("): ").unwrap();
    let steps: Vec<&str> = steps.split("; then ").collect();
    let [add_column, add_constraint, validate] = steps[..] else {
        panic!("three statements expected: {}", findings[0].fix);
    };
    std::fs::remove_file(dir.path().join("3_total.up.sql")).unwrap();
    write(
        dir.path(),
        &[
            (
                "3_total.up.sql",
                &format!("{add_column};\n{add_constraint};\n"),
            ),
            ("4_validate.up.sql", &format!("{NO_TX}{validate};\n")),
        ],
    );
    let mut events = Vec::new();
    migrator(&svc, dir.path(), MigrateOptions::default())
        .up_with(&UpOptions::default(), &mut lint_rules(&mut events))
        .await
        .unwrap();
    assert_eq!(events, []);
    assert_eq!(history(&svc).await, [1, 2, 3, 4]);
}

// ---- partitioned tables ----

/// A partitioned table with two partitions and rows, a plain table (the control) and the
/// table both reference.
const PARTITIONED: (&str, &str) = (
    "1_events.up.sql",
    "CREATE TABLE accts (id bigint PRIMARY KEY);
     INSERT INTO accts SELECT generate_series(1, 10);
     CREATE TABLE events (id bigint NOT NULL, acct bigint, at date NOT NULL) PARTITION BY RANGE (at);
     CREATE TABLE events_2024 PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
     CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
     INSERT INTO events SELECT g, g % 10 + 1, date '2024-06-01' + g % 400 FROM generate_series(1, 1000) g;
     CREATE TABLE ledger (id bigint NOT NULL, acct bigint);
     INSERT INTO ledger SELECT g, g % 10 + 1 FROM generate_series(1, 1000) g;",
);

/// `(rule, fix)` of each finding of what `up` would run on `svc` from `dir`, knowing the
/// catalog.
async fn pending_fixes(svc: &ServiceDb, dir: &Path) -> Vec<(Rule, String)> {
    migrator(svc, dir, MigrateOptions::default())
        .lint_pending()
        .await
        .unwrap()
        .findings
        .iter()
        .map(|f| (f.rule, f.fix.clone()))
        .collect()
}

/// The SQLSTATE the server answers `sql` with, run in the service schema; `None` when it runs.
async fn sqlstate(svc: &ServiceDb, sql: &str) -> Option<String> {
    let conn = svc.get().await.unwrap();
    conn.batch_execute(&format!("SET search_path TO {}", svc.schema()))
        .await
        .unwrap();
    conn.batch_execute(sql)
        .await
        .err()
        .map(|e| e.code().expect("a server error").code().to_owned())
}

/// `rules`, and that each fix of a finding of `rule` contains every one of `steps`.
fn assert_fix(found: &[(Rule, String)], rules: &[Rule], steps: &[&str]) {
    let got: Vec<Rule> = found.iter().map(|(r, _)| *r).collect();
    assert_eq!(got, rules, "{found:?}");
    for step in steps {
        assert!(found[0].1.contains(step), "{step}\n{}", found[0].1);
    }
}

/// Found by a user trial: on a partitioned table, `index-without-concurrently` said to use
/// `CREATE INDEX CONCURRENTLY`, which the server refuses there (0A000), and the lint of the
/// catalog let that through. The fix is now the one PostgreSQL runs (`ON ONLY` the parent,
/// each partition concurrently, attached), checked here; the plain table keeps the old fix.
#[tokio::test]
async fn a_partitioned_table_is_indexed_with_a_fix_the_server_runs() {
    let (_db, svc, dir) = applied(&[PARTITIONED]).await;
    write(
        dir.path(),
        &[("2_idx.up.sql", "CREATE INDEX events_acct ON events (acct);")],
    );
    assert_fix(
        &pending_fixes(&svc, dir.path()).await,
        &[Rule::IndexWithoutConcurrently],
        &[
            "CREATE INDEX events_acct ON ONLY events USING btree (acct) (at once",
            "CREATE INDEX CONCURRENTLY events_2024_acct ON events_2024 USING btree (acct); CREATE INDEX CONCURRENTLY events_2025_acct ON events_2025",
            "ALTER INDEX events_acct ATTACH PARTITION events_2024_acct; ALTER INDEX events_acct ATTACH PARTITION events_2025_acct",
        ],
    );
    // The control: a plain table.
    write(
        dir.path(),
        &[("2_idx.up.sql", "CREATE INDEX ledger_acct ON ledger (acct);")],
    );
    assert_fix(
        &pending_fixes(&svc, dir.path()).await,
        &[Rule::IndexWithoutConcurrently],
        &["CREATE INDEX CONCURRENTLY, in a non-transactional migration"],
    );

    // CONCURRENTLY on the partitioned table: refused by the server, so by the lint, with no
    // way to allow it; on the plain table it is fine.
    let concurrently = "CREATE INDEX CONCURRENTLY events_acct ON events (acct);";
    assert_eq!(sqlstate(&svc, concurrently).await.as_deref(), Some("0A000"));
    write(
        dir.path(),
        &[(
            "2_idx.up.sql",
            &format!("{NO_TX}-- svcdb:allow refused-on-partitioned-table\n{concurrently}"),
        )],
    );
    assert_fix(
        &pending_fixes(&svc, dir.path()).await,
        &[Rule::UnknownAllow, Rule::RefusedOnPartitionedTable],
        &[],
    );
    let allow_unsafe = MigrateOptions {
        allow_unsafe: true,
        ..MigrateOptions::default()
    };
    assert!(matches!(
        migrator(&svc, dir.path(), allow_unsafe).up().await,
        Err(MigrateError::Unsafe { .. })
    ));
    write(
        dir.path(),
        &[(
            "2_idx.up.sql",
            &format!("{NO_TX}CREATE INDEX CONCURRENTLY ledger_acct ON ledger (acct);"),
        )],
    );
    assert_eq!(pending_fixes(&svc, dir.path()).await, []);

    // The fix passes the lint and runs; the parent's index is then valid.
    std::fs::remove_file(dir.path().join("2_idx.up.sql")).unwrap();
    write(
        dir.path(),
        &[
            (
                "2_only.up.sql",
                "CREATE INDEX events_acct ON ONLY events (acct);",
            ),
            (
                "3_parts.up.sql",
                &format!(
                    "{NO_TX}CREATE INDEX CONCURRENTLY events_2024_acct ON events_2024 (acct);\n\
                     CREATE INDEX CONCURRENTLY events_2025_acct ON events_2025 (acct);\n\
                     ALTER INDEX events_acct ATTACH PARTITION events_2024_acct;\n\
                     ALTER INDEX events_acct ATTACH PARTITION events_2025_acct;"
                ),
            ),
        ],
    );
    assert_eq!(pending_fixes(&svc, dir.path()).await, []);
    migrator(&svc, dir.path(), MigrateOptions::default())
        .up()
        .await
        .unwrap();
    let valid: bool = svc
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = 'events_acct'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(valid);

    // Its index cannot be dropped concurrently either (0A000); the plain drop's fix says so.
    assert_eq!(
        sqlstate(&svc, "DROP INDEX CONCURRENTLY events_acct;")
            .await
            .as_deref(),
        Some("0A000")
    );
    write(
        dir.path(),
        &[(
            "4_drop.up.sql",
            &format!("{NO_TX}DROP INDEX CONCURRENTLY events_acct;"),
        )],
    );
    assert_fix(
        &pending_fixes(&svc, dir.path()).await,
        &[Rule::RefusedOnPartitionedTable],
        &["no form avoids the lock"],
    );
    write(dir.path(), &[("4_drop.up.sql", "DROP INDEX events_acct;")]);
    assert_fix(
        &pending_fixes(&svc, dir.path()).await,
        &[Rule::DropIndexWithoutConcurrently],
        &["no form avoids the lock"],
    );
}

/// Found by the same trial: `constraint-without-not-valid` said to add a foreign key to a
/// partitioned table `NOT VALID`, which the server refuses there (42809 on PostgreSQL 15). The
/// fix now adds it `NOT VALID` to each partition, validates it there, and adds it to the
/// parent, which adopts them without a scan; checked here, with the plain table as the
/// control. A `CHECK … NOT VALID` works on a partitioned table: its fix stays.
#[tokio::test]
async fn a_foreign_key_on_a_partitioned_table_gets_a_fix_the_server_runs() {
    let (_db, svc, dir) = applied(&[PARTITIONED]).await;
    let fk =
        "ALTER TABLE events ADD CONSTRAINT events_acct_fk FOREIGN KEY (acct) REFERENCES accts (id)";
    write(dir.path(), &[("2_fk.up.sql", &format!("{fk};"))]);
    assert_fix(
        &pending_fixes(&svc, dir.path()).await,
        &[Rule::ConstraintWithoutNotValid],
        &[
            "ALTER TABLE events_2024 ADD CONSTRAINT events_2024_acct_fk FOREIGN KEY (acct) REFERENCES accts (id) NOT VALID; ALTER TABLE events_2025 ADD CONSTRAINT events_2025_acct_fk",
            "ALTER TABLE events_2024 VALIDATE CONSTRAINT events_2024_acct_fk; ALTER TABLE events_2025 VALIDATE CONSTRAINT events_2025_acct_fk; then",
            "then ALTER TABLE events ADD CONSTRAINT events_acct_fk FOREIGN KEY (acct) REFERENCES accts (id), which adopts",
        ],
    );
    // The control: a plain table, and a CHECK on the partitioned one.
    write(
        dir.path(),
        &[(
            "2_fk.up.sql",
            "ALTER TABLE ledger ADD CONSTRAINT ledger_acct_fk FOREIGN KEY (acct) REFERENCES accts (id);\n\
             ALTER TABLE events ADD CONSTRAINT events_acct_positive CHECK (acct > 0);",
        )],
    );
    let found = pending_fixes(&svc, dir.path()).await;
    assert_eq!(found.len(), 2, "{found:?}");
    for (rule, fix) in &found {
        assert_eq!(*rule, Rule::ConstraintWithoutNotValid);
        assert!(fix.starts_with("add it with NOT VALID"), "{fix}");
    }
    // An ADD COLUMN … REFERENCES with a default: the same partition-wise fix.
    write(
        dir.path(),
        &[(
            "2_fk.up.sql",
            "ALTER TABLE events ADD COLUMN acct2 bigint DEFAULT 1 REFERENCES accts (id);",
        )],
    );
    assert_fix(
        &pending_fixes(&svc, dir.path()).await,
        &[Rule::ConstraintWithoutNotValid],
        &["ALTER TABLE events_2024 ADD CONSTRAINT events_2024_acct2_fkey FOREIGN KEY (acct2) REFERENCES accts (id) NOT VALID"],
    );

    // NOT VALID on the partitioned table: refused by the server, so by the lint.
    let not_valid = format!("{fk} NOT VALID;");
    assert_eq!(sqlstate(&svc, &not_valid).await.as_deref(), Some("42809"));
    write(dir.path(), &[("2_fk.up.sql", &not_valid)]);
    assert_fix(
        &pending_fixes(&svc, dir.path()).await,
        &[Rule::RefusedOnPartitionedTable],
        &["ALTER TABLE events_2024 VALIDATE CONSTRAINT events_2024_acct_fk"],
    );

    // The fix passes the lint and runs, the CHECK's too: the partitions' keys first (the lint
    // follows the deploy), then the parent's (the lint reads the partitions' from the catalog).
    std::fs::remove_file(dir.path().join("2_fk.up.sql")).unwrap();
    write(
        dir.path(),
        &[
            (
                "2_fk.up.sql",
                "ALTER TABLE events_2024 ADD CONSTRAINT events_2024_acct_fk FOREIGN KEY (acct) REFERENCES accts (id) NOT VALID;\n\
                 ALTER TABLE events_2025 ADD CONSTRAINT events_2025_acct_fk FOREIGN KEY (acct) REFERENCES accts (id) NOT VALID;\n\
                 ALTER TABLE events ADD CONSTRAINT events_acct_positive CHECK (acct > 0) NOT VALID;",
            ),
            (
                "3_validate.up.sql",
                &format!(
                    "{NO_TX}ALTER TABLE events_2024 VALIDATE CONSTRAINT events_2024_acct_fk;\n\
                     ALTER TABLE events_2025 VALIDATE CONSTRAINT events_2025_acct_fk;\n\
                     ALTER TABLE events VALIDATE CONSTRAINT events_acct_positive;"
                ),
            ),
        ],
    );
    assert_eq!(pending_fixes(&svc, dir.path()).await, []);
    migrator(&svc, dir.path(), MigrateOptions::default())
        .up()
        .await
        .unwrap();
    write(dir.path(), &[("4_parent.up.sql", &format!("{fk};"))]);
    assert_eq!(pending_fixes(&svc, dir.path()).await, []);
    migrator(&svc, dir.path(), MigrateOptions::default())
        .up()
        .await
        .unwrap();
    assert_eq!(history(&svc).await, [1, 2, 3, 4]);
}

/// A unique constraint on a partitioned table: `USING INDEX` is refused there (0A000), so its
/// fix builds each partition's index concurrently, makes it that partition's constraint, and
/// adds the parent's, which adopts them and builds nothing; checked here.
#[tokio::test]
async fn a_unique_constraint_on_a_partitioned_table_gets_a_fix_the_server_runs() {
    let (_db, svc, dir) = applied(&[PARTITIONED]).await;
    let unique = "ALTER TABLE events ADD CONSTRAINT events_uq UNIQUE (id, at);";
    write(dir.path(), &[("2_uq.up.sql", unique)]);
    assert_fix(
        &pending_fixes(&svc, dir.path()).await,
        &[Rule::UniqueWithoutIndex],
        &[
            "CREATE UNIQUE INDEX CONCURRENTLY events_2024_uq ON events_2024 (id, at)",
            "ALTER TABLE events_2025 ADD CONSTRAINT events_2025_uq UNIQUE USING INDEX events_2025_uq",
        ],
    );
    // The control: a plain table.
    write(
        dir.path(),
        &[(
            "2_uq.up.sql",
            "ALTER TABLE ledger ADD CONSTRAINT ledger_uq UNIQUE (id);",
        )],
    );
    assert_fix(
        &pending_fixes(&svc, dir.path()).await,
        &[Rule::UniqueWithoutIndex],
        &["ADD CONSTRAINT ledger_uq UNIQUE USING INDEX ledger_uq_new"],
    );
    // USING INDEX on the partitioned table: refused by the server, so by the lint.
    let using = "ALTER TABLE events ADD CONSTRAINT events_uq UNIQUE USING INDEX events_uq_idx;";
    let index = "CREATE UNIQUE INDEX events_uq_idx ON events (id, at);";
    assert_eq!(
        sqlstate(&svc, &format!("{index}\n{using}"))
            .await
            .as_deref(),
        Some("0A000")
    );
    write(dir.path(), &[("2_uq.up.sql", using)]);
    assert_fix(
        &pending_fixes(&svc, dir.path()).await,
        &[Rule::RefusedOnPartitionedTable],
        &[],
    );

    std::fs::remove_file(dir.path().join("2_uq.up.sql")).unwrap();
    write(
        dir.path(),
        &[
            (
                "2_build.up.sql",
                &format!(
                    "{NO_TX}CREATE UNIQUE INDEX CONCURRENTLY events_2024_uq ON events_2024 (id, at);\n\
                     CREATE UNIQUE INDEX CONCURRENTLY events_2025_uq ON events_2025 (id, at);"
                ),
            ),
            (
                "3_uq.up.sql",
                &format!(
                    "ALTER TABLE events_2024 ADD CONSTRAINT events_2024_uq UNIQUE USING INDEX events_2024_uq;\n\
                     ALTER TABLE events_2025 ADD CONSTRAINT events_2025_uq UNIQUE USING INDEX events_2025_uq;\n\
                     {unique}"
                ),
            ),
        ],
    );
    assert_eq!(pending_fixes(&svc, dir.path()).await, []);
    migrator(&svc, dir.path(), MigrateOptions::default())
        .up()
        .await
        .unwrap();
    assert!(has_index(&svc, "events_2024_uq").await);
}

/// A table the deploy creates `PARTITION BY` is known partitioned: what the server refuses on
/// one is refused on it; the control is the same on a plain table created so.
#[test]
fn what_the_server_refuses_on_a_table_the_deploy_partitions_is_refused() {
    let table = "CREATE TABLE t (a int, b int) PARTITION BY LIST (a);\n";
    let plain = "CREATE TABLE t (a int, b int);\n";
    for statement in [
        "CREATE INDEX CONCURRENTLY t_b ON t (b);",
        "ALTER TABLE t ADD CONSTRAINT t_b FOREIGN KEY (b) REFERENCES users (id) NOT VALID;",
    ] {
        assert_eq!(
            rules(&format!("{NO_TX}{table}{statement}")),
            [Rule::RefusedOnPartitionedTable],
            "{statement}"
        );
        assert_eq!(
            rules(&format!("{NO_TX}{plain}{statement}")),
            [],
            "{statement}"
        );
    }
    assert!(!Rule::RefusedOnPartitionedTable.can_be_allowed());
}

/// Without a database (`lint --all`), the partitions earlier migrations made are known.
#[test]
fn lint_each_knows_the_partitions_earlier_migrations_made() {
    let (_dir, migrations) = folder(&[
        PARTITIONED,
        ("2_idx.up.sql", "CREATE INDEX events_acct ON events (acct);"),
    ]);
    let report = lint::lint_each(&migrations);
    let [finding] = &report.findings[..] else {
        panic!("one finding expected: {:?}", report.findings);
    };
    assert_eq!(finding.rule, Rule::IndexWithoutConcurrently);
    assert!(
        finding
            .fix
            .contains("ALTER INDEX events_acct ATTACH PARTITION events_2025_acct"),
        "{}",
        finding.fix
    );
}
