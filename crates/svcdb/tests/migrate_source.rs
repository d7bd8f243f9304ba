//! Migration sources without a database: layouts (native, diesel, one-file sqlx/goose/dbmate,
//! Flyway), versions, ignored files, every malformed-file case, what only psql can run,
//! embedding, and `new_migration` in each layout.

use std::path::Path;

use svcdb::migrate::{new_migration, Checksum, EmbeddedMigrations, MigrateError, Migrations};

/// Writes `files` (path relative to `dir`, contents) into `dir`.
fn write(dir: &Path, files: &[(&str, &[u8])]) {
    for (rel, contents) in files {
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, contents).unwrap();
    }
}

fn parse(files: &[(&str, &[u8])]) -> Result<Migrations, MigrateError> {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), files);
    Migrations::from_dir(dir.path())
}

/// The path of a `Source` error.
fn source_error_path(files: &[(&str, &[u8])]) -> String {
    match parse(files) {
        Err(MigrateError::Source { path, .. }) => path,
        other => panic!("expected a source error, got {other:?}"),
    }
}

#[test]
fn native_layout_sorted_numerically_with_other_files_ignored() {
    let m = parse(&[
        ("10_ten.up.sql", b"SELECT 10;"),
        ("9_nine.up.sql", b"SELECT 9;"),
        ("9_nine.down.sql", b"SELECT -9;"),
        ("README.md", b"# not a migration"),
        ("notes.sql", b"SELECT 'loose file';"),
        ("docs/index.html", b"<p>not a migration</p>"),
    ])
    .unwrap();
    let versions: Vec<i64> = m.iter().map(|m| m.version.number()).collect();
    assert_eq!(versions, [9, 10]);
    let nine = m.get(&v(9)).unwrap();
    assert_eq!(nine.name, "nine");
    assert_eq!(nine.down.as_deref(), Some("SELECT -9;"));
    assert!(nine.transactional);
    assert!(nine.path.ends_with("9_nine.up.sql"), "{}", nine.path);
    assert_eq!(
        m.get(&v(10)).unwrap().down,
        None,
        "an up without a down is allowed"
    );
    assert_eq!(m.latest().unwrap().version.number(), 10);
}

#[test]
fn version_digits_and_names_with_spaces() {
    let m = parse(&[
        ("20261124093000_create the table.up.sql", b"SELECT 1;"),
        ("0001_first_one.up.sql", b"SELECT 1;"),
        ("2017-09-23-182408_diesel style/up.sql", b"SELECT 1;"),
    ])
    .unwrap();
    assert_eq!(m.get(&v(20261124093000)).unwrap().name, "create the table");
    assert_eq!(
        m.get(&v(1)).unwrap().name,
        "first_one",
        "the name is everything after the first `_`"
    );
    assert_eq!(m.get(&v(20170923182408)).unwrap().name, "diesel style");
}

#[test]
fn diesel_layout_with_metadata_toml() {
    let m = parse(&[
        (
            "2017-09-23-182408_create_users/up.sql",
            b"CREATE TABLE users (id int);",
        ),
        (
            "2017-09-23-182408_create_users/down.sql",
            b"DROP TABLE users;",
        ),
        (
            "2017-09-24-000000_index/up.sql",
            b"CREATE INDEX CONCURRENTLY u ON users (id);",
        ),
        (
            "2017-09-24-000000_index/down.sql",
            b"DROP INDEX CONCURRENTLY u;",
        ),
        (
            "2017-09-24-000000_index/metadata.toml",
            b"run_in_transaction = false\n",
        ),
        ("2017-09-25-000000_explicit/up.sql", b"SELECT 1;"),
        (
            "2017-09-25-000000_explicit/metadata.toml",
            b"run_in_transaction = true\n",
        ),
    ])
    .unwrap();
    let users = m.get(&v(20170923182408)).unwrap();
    assert!(users.transactional && users.down_transactional);
    let index = m.get(&v(20170924000000)).unwrap();
    assert!(!index.transactional && !index.down_transactional);
    assert!(m.get(&v(20170925000000)).unwrap().transactional);
}

#[test]
fn no_transaction_directive_and_bom() {
    let m = parse(&[
        (
            "1_a.up.sql",
            b"\xef\xbb\xbf-- svcdb:no-transaction\r\nCREATE INDEX CONCURRENTLY i ON t (a);",
        ),
        ("1_a.down.sql", b"DROP INDEX i;"),
    ])
    .unwrap();
    let a = m.get(&v(1)).unwrap();
    assert!(!a.transactional);
    assert!(a.down_transactional, "the down has no directive of its own");
    assert!(
        a.up.starts_with("-- svcdb"),
        "the BOM is stripped from the script"
    );
}

#[test]
fn crlf_only_change_keeps_the_checksum() {
    let lf = parse(&[("1_a.up.sql", b"CREATE TABLE a (id int);\nSELECT 1;\n")]).unwrap();
    let crlf = parse(&[("1_a.up.sql", b"CREATE TABLE a (id int);\r\nSELECT 1;\r\n")]).unwrap();
    let edited = parse(&[("1_a.up.sql", b"CREATE TABLE a (id bigint);\nSELECT 1;\n")]).unwrap();
    assert_eq!(
        lf.get(&v(1)).unwrap().checksum,
        crlf.get(&v(1)).unwrap().checksum
    );
    assert_ne!(
        lf.get(&v(1)).unwrap().checksum,
        edited.get(&v(1)).unwrap().checksum
    );
}

#[test]
fn two_migrations_with_one_version() {
    let path = source_error_path(&[
        ("0001_a.up.sql", b"SELECT 1;"),
        ("1_b.up.sql", b"SELECT 1;"),
    ]);
    assert!(
        path.ends_with("1_b.up.sql") || path.ends_with("0001_a.up.sql"),
        "{path}"
    );
    // Across layouts too.
    let path = source_error_path(&[("1_a.up.sql", b"SELECT 1;"), ("1_a/up.sql", b"SELECT 1;")]);
    assert!(path.contains("1_a"), "{path}");
    let path = source_error_path(&[
        ("0001_a.sql", b"SELECT 1;"),
        ("0001_a.up.sql", b"SELECT 1;"),
    ]);
    assert!(path.contains("0001_a."), "{path}");
    let path = source_error_path(&[("V1__a.sql", b"SELECT 1;"), ("1_b.sql", b"SELECT 1;")]);
    assert!(
        path.ends_with("V1__a.sql") || path.ends_with("1_b.sql"),
        "{path}"
    );
}

#[test]
fn unparseable_names() {
    for bad in [
        "v1_init.up.sql",
        "0001.up.sql",
        "0001_.up.sql",
        "12a_x.up.sql",
        "99999999999999999999_huge.up.sql",
        "_x.up.sql",
        "0001.sql",
        "12a_x.sql",
        "V1_init.sql",
        "V1a__x.sql",
        "V2__.sql",
    ] {
        let path = source_error_path(&[(bad, b"SELECT 1;")]);
        assert!(path.ends_with(bad), "{bad}: {path}");
    }
    let path = source_error_path(&[("latest/up.sql", b"SELECT 1;")]);
    assert!(path.ends_with("latest/up.sql"), "{path}");
}

#[test]
fn an_empty_down_makes_the_migration_irreversible_instead_of_refusing_the_folder() {
    // Every layout's down, empty or comments only, is no down; the up is untouched.
    for files in [
        &[("1_a.up.sql", &b"SELECT 1;"[..]), ("1_a.down.sql", b"")][..],
        &[("1_a.up.sql", b"SELECT 1;"), ("1_a.down.sql", b" \n\t\n")],
        &[
            ("1_a/up.sql", b"SELECT 1;"),
            ("1_a/down.sql", b"\xef\xbb\xbf"),
        ],
        &[
            ("1_a/up.sql", b"SELECT 1;"),
            (
                "1_a/down.sql",
                b"-- This file should undo anything in `up.sql`\n/* nothing */\n",
            ),
        ],
        &[("V1__a.sql", b"SELECT 1;"), ("U1__a.sql", b"-- no undo\n")],
        &[("1_a.sql", b"-- +goose Up\nSELECT 1;\n-- +goose Down\n")],
    ] {
        let m = parse(files).unwrap_or_else(|e| panic!("{files:?}: {e}"));
        let a = m.get(&v(1)).unwrap();
        assert_eq!(a.down, None, "{files:?}");
        assert_eq!(a.down_path, None, "{files:?}");
        assert_eq!(a.up.trim(), "SELECT 1;", "{files:?}");
    }
}

#[test]
fn an_empty_up_is_a_no_op_migration() {
    for files in [
        &[("1_a.up.sql", &b""[..])][..],
        &[("1_a.up.sql", b" \n\t\n"), ("1_a.down.sql", b"SELECT 1;")],
        &[("1_a/up.sql", b"\xef\xbb\xbf-- nothing yet\n")],
        &[("1_a.sql", b"-- +goose Up\n\n-- +goose Down\nSELECT 1;\n")],
        &[("V1__a.sql", b"")],
    ] {
        let m = parse(files).unwrap_or_else(|e| panic!("{files:?}: {e}"));
        let a = m.get(&v(1)).unwrap();
        assert!(
            svcdb::__private::split_statements(&a.up).is_empty(),
            "{files:?}"
        );
        assert!(a.transactional, "{files:?}");
    }
}
#[test]
fn non_utf8_files() {
    assert!(source_error_path(&[("1_a.up.sql", b"SELECT '\xff';")]).ends_with("1_a.up.sql"));
    assert!(
        source_error_path(&[("1_a/up.sql", b"SELECT 1;"), ("1_a/metadata.toml", b"\xff")])
            .ends_with("metadata.toml")
    );
}

#[test]
fn bad_metadata_toml() {
    let path = source_error_path(&[
        ("1_a/up.sql", b"SELECT 1;"),
        ("1_a/metadata.toml", b"run_in_transaction = maybe"),
    ]);
    assert!(path.ends_with("1_a/metadata.toml"), "{path}");
}

#[test]
fn down_without_up() {
    assert!(source_error_path(&[("1_a.down.sql", b"SELECT 1;")]).ends_with("1_a.down.sql"));
    assert!(source_error_path(&[("1_a/down.sql", b"SELECT 1;")]).ends_with("1_a/down.sql"));
    // A folder holding only metadata.toml is not a migration.
    assert!(
        parse(&[("1_a/metadata.toml", b"run_in_transaction = false")])
            .unwrap()
            .is_empty()
    );
}

#[test]
fn missing_folder_is_a_source_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = Migrations::from_dir(dir.path().join("nope")).unwrap_err();
    assert!(
        matches!(err, MigrateError::Source { ref path, .. } if path.ends_with("nope")),
        "{err}"
    );
}

#[test]
fn sqlx_simple_files_are_up_only_migrations() {
    let text = "CREATE TABLE a (id int);\n";
    let m = parse(&[
        ("20240101120000_create_a.sql", text.as_bytes()),
        ("00001_x.sql", b"SELECT 1;"),
    ])
    .unwrap();
    let a = m.get(&v(20240101120000)).unwrap();
    assert_eq!(a.name, "create_a");
    assert_eq!(a.up, text);
    assert_eq!(a.down, None);
    assert_eq!(a.down_path, None);
    assert!(a.transactional);
    assert_eq!(
        a.checksum,
        Checksum::of(text),
        "the whole file, as for `.up.sql`"
    );
    assert!(
        a.path.ends_with("20240101120000_create_a.sql"),
        "{}",
        a.path
    );
    assert_eq!(a.up_line, 1);
    assert_eq!(m.get(&v(1)).unwrap().name, "x");
}

/// sqlx marks a migration that must run outside a transaction with `-- no-transaction`.
#[test]
fn sqlx_no_transaction_first_line_is_honoured() {
    let m = parse(&[
        (
            "20240101120000_index.up.sql",
            b"-- no-transaction\nCREATE INDEX CONCURRENTLY i ON a (id);\n",
        ),
        (
            "20240101120000_index.down.sql",
            b"-- no-transaction\nDROP INDEX CONCURRENTLY i;\n",
        ),
        ("20240102000000_x.sql", b"SELECT 1; -- no-transaction\n"),
    ])
    .unwrap();
    let index = m.get(&v(20240101120000)).unwrap();
    assert!(!index.transactional && !index.down_transactional);
    assert!(m.get(&v(20240102000000)).unwrap().transactional);
}

/// A goose file: header comments, `NO TRANSACTION`, markers in mixed case and spacing.
const GOOSE: &str = "\
-- Adds the index without locking writes.
-- +goose NO TRANSACTION

--   +goose   up
-- +goose StatementBegin
CREATE INDEX CONCURRENTLY a_id ON a (id);
-- +goose StatementEnd

-- +GOOSE DOWN
DROP INDEX CONCURRENTLY a_id;
";

#[test]
fn goose_file_with_up_down_and_no_transaction() {
    let m = parse(&[("20240102000000_index_a.sql", GOOSE.as_bytes())]).unwrap();
    let index = m.get(&v(20240102000000)).unwrap();
    let up = "-- +goose StatementBegin\nCREATE INDEX CONCURRENTLY a_id ON a (id);\n-- +goose StatementEnd\n\n";
    assert_eq!(index.up, up);
    assert_eq!(
        index.down.as_deref(),
        Some("DROP INDEX CONCURRENTLY a_id;\n")
    );
    assert!(!index.transactional && !index.down_transactional);
    assert_eq!(index.checksum, Checksum::of(up), "the up section only");
    assert_eq!((index.up_line, index.down_line), (5, 10));
    assert_eq!(index.down_path.as_ref(), Some(&index.path));

    // CRLF line endings: same scripts, same checksum.
    let crlf = GOOSE.replace('\n', "\r\n");
    let m = parse(&[("20240102000000_index_a.sql", crlf.as_bytes())]).unwrap();
    assert_eq!(m.get(&v(20240102000000)).unwrap().checksum, index.checksum);
}

#[test]
fn dbmate_file_with_transaction_false_and_an_empty_down() {
    let m = parse(&[(
        "20240103000000_index_b.sql",
        b"-- migrate:up transaction:false\nCREATE INDEX CONCURRENTLY b_id ON b (id);\n\n-- migrate:down\n-- nothing to undo\n\n",
    )])
    .unwrap();
    let index = m.get(&v(20240103000000)).unwrap();
    assert_eq!(index.up, "CREATE INDEX CONCURRENTLY b_id ON b (id);\n\n");
    assert_eq!(index.down, None, "a down section of comments is no down");
    assert_eq!(index.down_path, None);
    assert!(!index.transactional);
    assert_eq!(index.up_line, 2);
}

#[test]
fn flyway_versioned_migrations_with_an_undo() {
    let m = parse(&[
        ("V1__init.sql", b"CREATE TABLE a (id int);"),
        ("V2__create_b.sql", b"CREATE TABLE b (id int);"),
        ("U2__create_b.sql", b"DROP TABLE b;"),
        ("v3__lower_case.sql", b"SELECT 3;"),
    ])
    .unwrap();
    let versions: Vec<i64> = m.iter().map(|m| m.version.number()).collect();
    assert_eq!(versions, [1, 2, 3]);
    let b = m.get(&v(2)).unwrap();
    assert_eq!(b.name, "create_b");
    assert_eq!(b.down.as_deref(), Some("DROP TABLE b;"));
    assert!(b.path.ends_with("V2__create_b.sql"), "{}", b.path);
    assert!(b
        .down_path
        .as_deref()
        .unwrap()
        .ends_with("U2__create_b.sql"));
    assert_eq!(m.get(&v(1)).unwrap().down, None);
    assert_eq!(m.get(&v(3)).unwrap().name, "lower_case");
}

#[test]
fn flyway_undo_without_its_migration() {
    assert!(source_error_path(&[("U3__x.sql", b"DROP TABLE x;")]).ends_with("U3__x.sql"));
    // The `V` must be there: another layout's migration of that version does not count.
    let path = source_error_path(&[
        ("0003_x.up.sql", b"CREATE TABLE x (id int);"),
        ("U3__x.sql", b"DROP TABLE x;"),
    ]);
    assert!(path.ends_with("U3__x.sql"), "{path}");
}

#[test]
fn flyway_repeatable_migrations_are_refused() {
    let path = source_error_path(&[
        ("V1__init.sql", b"SELECT 1;"),
        ("R__views.sql", b"CREATE OR REPLACE VIEW v AS SELECT 1;"),
    ]);
    assert!(path.ends_with("R__views.sql"), "{path}");
}

#[test]
fn flyway_dotted_versions_are_refused() {
    for bad in ["V1.1__x.sql", "V1_1__x.sql", "U1.1__x.sql"] {
        let path = source_error_path(&[(bad, b"SELECT 1;")]);
        assert!(path.ends_with(bad), "{bad}: {path}");
    }
}

#[test]
fn misplaced_or_unknown_markers() {
    for (why, text) in [
        (
            "down before up",
            "-- +goose Down\nDROP TABLE a;\n-- +goose Up\nCREATE TABLE a (id int);\n",
        ),
        ("down without up", "-- migrate:down\nDROP TABLE a;\n"),
        (
            "two ups",
            "-- +goose Up\nSELECT 1;\n-- +goose Up\nSELECT 2;\n",
        ),
        (
            "SQL before the up marker",
            "SELECT 0;\n-- +goose Up\nSELECT 1;\n",
        ),
        (
            "an unknown annotation",
            "-- +goose ENVSUB ON\n-- +goose Up\nSELECT '${X}';\n",
        ),
        (
            "an unknown dbmate option",
            "-- migrate:up transaction:maybe\nSELECT 1;\n",
        ),
    ] {
        match parse(&[("1_a.sql", text.as_bytes())]) {
            Err(MigrateError::Source { path, .. }) => {
                assert!(path.ends_with("1_a.sql"), "{why}: {path}")
            }
            other => panic!("{why}: expected a source error, got {other:?}"),
        }
    }
}

#[test]
fn ignored_sql_files_are_listed() {
    let m = parse(&[
        ("0001_a.up.sql", b"SELECT 1;"),
        ("0002_b.sql", b"SELECT 2;"),
        ("V3__c.sql", b"SELECT 3;"),
        ("2017-09-23-182408_d/up.sql", b"SELECT 4;"),
        ("notes.sql", b"SELECT 'notes';"),
        ("seed.sql", b"INSERT INTO a VALUES (1);"),
        ("schema.sql", b"CREATE TABLE a (id int);"),
        (
            "20240101000000_init/migration.sql",
            b"CREATE TABLE p (id int);",
        ),
        ("README.md", b"# not SQL"),
    ])
    .unwrap();
    assert_eq!(m.len(), 4);
    assert_eq!(
        m.ignored(),
        [
            "20240101000000_init/migration.sql",
            "notes.sql",
            "schema.sql",
            "seed.sql"
        ]
    );
}

static EMBEDDED: EmbeddedMigrations = svcdb::embed_migrations!("tests/fixtures/migrate/embedded");

#[test]
fn embedded_parses_like_the_folder() {
    let embedded = Migrations::from_embedded(&EMBEDDED).unwrap();
    let dir = Migrations::from_dir(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/migrate/embedded"),
    )
    .unwrap();
    assert_eq!(embedded.len(), 2);
    for (e, d) in embedded.iter().zip(dir.iter()) {
        assert_eq!(
            (
                e.version.number(),
                &e.name,
                &e.up,
                &e.down,
                e.checksum,
                e.transactional
            ),
            (
                d.version.number(),
                &d.name,
                &d.up,
                &d.down,
                d.checksum,
                d.transactional
            )
        );
    }
    assert_eq!(embedded.ignored(), ["notes.sql"]);
    assert_eq!(embedded.ignored(), dir.ignored());
    let index = embedded.get(&v(2)).unwrap();
    assert_eq!(index.name, "add index");
    assert!(!index.transactional, "metadata.toml is embedded and read");
    assert!(
        EMBEDDED.files.iter().any(|f| f.path == "README.md"),
        "all files are embedded; the parser ignores the others"
    );
}

#[test]
fn new_migration_uses_timestamps_or_continues_sequential_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let fresh = dir.path().join("fresh");
    let created = new_migration(&fresh, "create users").unwrap();
    assert!(
        created.version.number() >= 20260101000000 && created.version.number() < 100000000000000,
        "{}",
        created.version.number()
    );
    let (up, Some(down)) = (&created.up_path, &created.down_path) else {
        panic!("{created:?}")
    };
    assert!(up.ends_with(format!("{}_create users.up.sql", created.version)));
    assert!(down.ends_with(format!("{}_create users.down.sql", created.version)));
    assert!(up.is_file() && down.is_file());
    // A second one in the same second still gets a higher version.
    let second = new_migration(&fresh, "second").unwrap();
    assert!(second.version > created.version);
    assert_eq!(
        Migrations::from_dir(&fresh).unwrap().len(),
        2,
        "new files parse"
    );

    let seq = dir.path().join("seq");
    write(
        &seq,
        &[
            ("0001_a.up.sql", b"SELECT 1;"),
            ("0002_b.up.sql", b"SELECT 1;"),
        ],
    );
    let next = new_migration(&seq, "c").unwrap();
    assert_eq!(next.version.number(), 3);
    assert!(next.up_path.ends_with("0003_c.up.sql"), "{next:?}");

    assert!(matches!(
        new_migration(&seq, "a/b"),
        Err(MigrateError::Source { .. })
    ));
    assert!(matches!(
        new_migration(&seq, " "),
        Err(MigrateError::Source { .. })
    ));
}

/// The path of a `Source` error and the line its message starts with (`line N: …`).
fn refused_at(files: &[(&str, &[u8])]) -> (String, usize) {
    match parse(files) {
        Err(MigrateError::Source { path, message }) => {
            let line = message
                .strip_prefix("line ")
                .and_then(|rest| rest.split_once(':'))
                .and_then(|(n, _)| n.parse().ok())
                .unwrap_or_else(|| panic!("no line in {message:?}"));
            (path, line)
        }
        other => panic!("expected a source error, got {other:?}"),
    }
}

/// The 1-based number of the first line of `text` starting with `start`.
fn line_of(text: &str, start: &str) -> usize {
    text.lines().position(|l| l.starts_with(start)).unwrap() + 1
}

/// The shape of `pg_dump` output (since 17.6, 16.10, 15.14): `\restrict`, then a data section.
const PG_DUMP: &str = "\
--
-- PostgreSQL database dump
--

\\restrict p2pTPzcmK7wXf1gLbKqcX1yBqfxbWZmXc3QRLGS4v4j5eGD1LTMhIhOxEcgtmIa

-- Dumped from database version 15.14
-- Dumped by pg_dump version 17.6

SET statement_timeout = 0;
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);

CREATE TABLE public.items (
    id integer NOT NULL,
    name text
);

--
-- Data for Name: items; Type: TABLE DATA; Schema: public; Owner: postgres
--

COPY public.items (id, name) FROM stdin;
1\tapple
2\tpear\\tgreen
\\.

--
-- PostgreSQL database dump complete
--

\\unrestrict p2pTPzcmK7wXf1gLbKqcX1yBqfxbWZmXc3QRLGS4v4j5eGD1LTMhIhOxEcgtmIa
";

#[test]
fn pg_dump_output_is_refused_at_its_psql_lines() {
    let (path, line) = refused_at(&[("0001_dump.up.sql", PG_DUMP.as_bytes())]);
    assert!(path.ends_with("0001_dump.up.sql"), "{path}");
    assert_eq!(line, line_of(PG_DUMP, "\\restrict"));

    // Without the psql commands, the data section is what cannot run.
    let unrestricted: String = PG_DUMP
        .split_inclusive('\n')
        .filter(|l| !l.contains("restrict "))
        .collect();
    let (path, line) = refused_at(&[("0001_dump.up.sql", unrestricted.as_bytes())]);
    assert!(path.ends_with("0001_dump.up.sql"), "{path}");
    assert_eq!(line, line_of(&unrestricted, "COPY public.items"));

    // In a goose file, counted from the top of the file; any case, any spacing.
    let goose = "-- +goose Up\nCREATE TABLE t (a int);\ncopy t (a)\n  from\tSTDIN;\n1\n\\.\n";
    let (path, line) = refused_at(&[("20240101000000_load.sql", goose.as_bytes())]);
    assert!(path.ends_with("20240101000000_load.sql"), "{path}");
    assert_eq!(line, 3);
}

#[test]
fn psql_meta_commands_in_down_scripts_are_refused() {
    let (path, line) = refused_at(&[
        ("0001_a.up.sql", b"CREATE TABLE a (id int);"),
        (
            "0001_a.down.sql",
            b"-- undo\n\\set ON_ERROR_STOP on\nDROP TABLE a;",
        ),
    ]);
    assert!(path.ends_with("0001_a.down.sql"), "{path}");
    assert_eq!(line, 2);

    let dbmate = "-- migrate:up\nCREATE TABLE a (id int);\n\n-- migrate:down\n\\connect other\nDROP TABLE a;\n";
    let (path, line) = refused_at(&[("20240101000000_a.sql", dbmate.as_bytes())]);
    assert!(path.ends_with("20240101000000_a.sql"), "{path}");
    assert_eq!(line, 5);
}

#[test]
fn backslashes_in_strings_bodies_and_comments_and_server_side_copy_are_accepted() {
    let up = r#"-- \restrict in a comment
/* \connect in a /* nested */ comment */
CREATE FUNCTION f() RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    -- \set in the body
    RETURN E'a\\b\'' || '\n' || $q$\.$q$;
END
$$;
SELECT 'C:\temp\' AS path, "odd\name" FROM (SELECT 1 AS "odd\name") s;
COPY t FROM '/tmp/x.csv' WITH (FORMAT csv);
COPY t TO STDOUT;
COPY (SELECT a FROM stdin) TO STDOUT;
"#;
    let m = parse(&[("0001_a.up.sql", up.as_bytes())]).unwrap();
    assert_eq!(m.get(&v(1)).unwrap().up, up);
}

/// A folder holding `files`, and what `new_migration` created in it, relative to it.
fn new_in(files: &[(&str, &[u8])], name: &str) -> (tempfile::TempDir, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), files);
    let created = new_migration(dir.path(), name).unwrap();
    let rel = created
        .files()
        .map(|f| {
            let rel = f.strip_prefix(dir.path()).unwrap();
            rel.to_str().unwrap().replace('\\', "/")
        })
        .collect();
    (dir, rel)
}

/// The text of the file `rel` of `dir`.
fn read(dir: &tempfile::TempDir, rel: &str) -> String {
    std::fs::read_to_string(dir.path().join(rel)).unwrap()
}

#[test]
fn new_migration_in_a_diesel_folder_keeps_its_folders_and_dashes() {
    let (dir, files) = new_in(
        &[("2017-09-23-182408_create_users/up.sql", b"SELECT 1;")],
        "add_email",
    );
    let [up, down] = &files[..] else {
        panic!("{files:?}")
    };
    let stem = up.strip_suffix("/up.sql").unwrap();
    assert_eq!(down, &format!("{stem}/down.sql"));
    // `YYYY-MM-DD-HHMMSS_add_email`, as diesel writes it.
    let (version, name) = stem.split_once('_').unwrap();
    assert_eq!(name, "add_email");
    assert_eq!(
        version
            .match_indices('-')
            .map(|(i, _)| i)
            .collect::<Vec<_>>(),
        [4, 7, 10],
        "{stem}"
    );
    let m = Migrations::from_dir(dir.path()).unwrap();
    assert_eq!(m.latest().unwrap().name, "add_email");
    assert!(
        m.latest().unwrap().down.is_none(),
        "the placeholder down is a comment: no down until its SQL is written"
    );

    // Without dashes in the folder's names, none in the new one.
    let (_dir, files) = new_in(&[("20240101000000_a/up.sql", b"SELECT 1;")], "b");
    assert!(
        files[0].chars().take(14).all(|c| c.is_ascii_digit()),
        "{files:?}"
    );
}

#[test]
fn new_migration_in_a_goose_folder_writes_one_file_with_both_sections() {
    let (dir, files) = new_in(&[("00001_a.sql", GOOSE.as_bytes())], "b");
    assert_eq!(files, ["00002_b.sql"]);
    let text = read(&dir, "00002_b.sql");
    assert!(text.starts_with("-- +goose Up\n"), "{text}");
    assert!(text.contains("\n-- +goose Down\n"), "{text}");
    let m = Migrations::from_dir(dir.path()).unwrap();
    let b = m.get(&v(2)).unwrap();
    assert_eq!(b.up_line, 2);
    assert_eq!(b.down, None, "the down section holds only a comment");
}

#[test]
fn new_migration_in_a_dbmate_folder_writes_dbmate_markers() {
    let (dir, files) = new_in(
        &[(
            "20240101000000_a.sql",
            b"-- migrate:up\nCREATE TABLE a (id int);\n-- migrate:down\nDROP TABLE a;\n",
        )],
        "b",
    );
    let [file] = &files[..] else {
        panic!("{files:?}")
    };
    assert!(
        file.ends_with("_b.sql") && !file.ends_with(".up.sql"),
        "{file}"
    );
    let text = read(&dir, file);
    assert!(text.starts_with("-- migrate:up\n"), "{text}");
    assert!(text.contains("\n-- migrate:down\n"), "{text}");
    assert_eq!(Migrations::from_dir(dir.path()).unwrap().len(), 2);
}

#[test]
fn new_migration_in_an_sqlx_folder_writes_one_plain_file() {
    let (dir, files) = new_in(&[("0001_a.sql", b"CREATE TABLE a (id int);")], "b");
    assert_eq!(files, ["0002_b.sql"]);
    let text = read(&dir, "0002_b.sql");
    assert!(
        !text.contains("goose") && !text.contains("migrate:"),
        "{text}"
    );
    let m = Migrations::from_dir(dir.path()).unwrap();
    assert_eq!((m.len(), m.get(&v(2)).unwrap().down.as_deref()), (2, None));
}

#[test]
fn new_migration_in_a_flyway_folder_writes_a_versioned_file() {
    let (dir, files) = new_in(
        &[("V1__init.sql", b"SELECT 1;"), ("V2__b.sql", b"SELECT 2;")],
        "add_c",
    );
    assert_eq!(files, ["V3__add_c.sql"]);
    assert_eq!(
        Migrations::from_dir(dir.path())
            .unwrap()
            .get(&v(3))
            .unwrap()
            .name,
        "add_c"
    );
}

#[test]
fn new_migration_follows_the_newest_migration_when_layouts_mix() {
    let goose_then_native = [
        ("0001_a.sql", GOOSE.as_bytes()),
        ("0002_b.up.sql", b"SELECT 2;"),
    ];
    let (_dir, files) = new_in(&goose_then_native, "c");
    assert_eq!(files, ["0003_c.up.sql", "0003_c.down.sql"]);
    let native_then_goose = [
        ("0001_a.up.sql", b"SELECT 1;" as &[u8]),
        ("0002_b.sql", GOOSE.as_bytes()),
    ];
    let (_dir, files) = new_in(&native_then_goose, "c");
    assert_eq!(files, ["0003_c.sql"]);

    // A name that would make the one file read as a native `.up.sql` is refused.
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), &native_then_goose);
    assert!(matches!(
        new_migration(dir.path(), "c.up"),
        Err(MigrateError::Source { .. })
    ));
    assert_eq!(Migrations::from_dir(dir.path()).unwrap().len(), 2);
}

/// golang-migrate runs files as they are, so its users wrap them in `BEGIN; … COMMIT;`: that
/// wrapper is accepted (and blanked, keeping the checksum and the line numbers); any other
/// transaction control is refused at its line.
#[test]
fn golang_migrate_wrappers_are_accepted_other_transaction_control_refused() {
    let wrapped = "BEGIN;\nCREATE TABLE a (id int);\nCOMMIT;\n";
    let migrations = parse(&[
        ("000001_a.up.sql", wrapped.as_bytes()),
        ("000001_a.down.sql", b"BEGIN;\nDROP TABLE a;\nCOMMIT;\n"),
    ])
    .unwrap();
    let m = migrations.get(&v(1)).unwrap();
    assert_eq!(m.up, "      \nCREATE TABLE a (id int);\n       \n");
    assert_eq!(m.down.as_deref(), Some("      \nDROP TABLE a;\n       \n"));
    assert_eq!(m.checksum, svcdb::migrate::Checksum::of(wrapped));
    assert!(m.transactional);

    let mid_commit = "CREATE TABLE a (id int);\nCOMMIT;\nCREATE TABLE b (id int);\n";
    let (path, line) = refused_at(&[("0001_a.up.sql", mid_commit.as_bytes())]);
    assert!(
        path.ends_with("0001_a.up.sql") && line == 2,
        "{path}:{line}"
    );
    let goose =
        "-- +goose Up\nCREATE TABLE a (id int);\n-- +goose Down\nDROP TABLE a;\nROLLBACK;\n";
    let (path, line) = refused_at(&[("0001_a.sql", goose.as_bytes())]);
    assert!(path.ends_with("0001_a.sql") && line == 5, "{path}:{line}");
    let no_tx =
        "-- svcdb:no-transaction\nBEGIN;\nCREATE INDEX CONCURRENTLY i ON a (id);\nCOMMIT;\n";
    let (path, line) = refused_at(&[("0001_a.up.sql", no_tx.as_bytes())]);
    assert!(
        path.ends_with("0001_a.up.sql") && line == 2,
        "{path}:{line}"
    );
}

/// The version numbered `n` (as the history's integer column and `0001`-style files number it).
fn v(n: i64) -> svcdb::migrate::Version {
    svcdb::migrate::Version::try_from(n).expect("a non-negative version")
}
