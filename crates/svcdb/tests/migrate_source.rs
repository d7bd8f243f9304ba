//! Migration sources without a database: layouts, versions, ignored files, every malformed-file
//! case, embedding, and `new_migration`.

use std::path::Path;

use svcdb::migrate::{new_migration, EmbeddedMigrations, MigrateError, Migrations};

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
    let versions: Vec<i64> = m.iter().map(|m| m.version).collect();
    assert_eq!(versions, [9, 10]);
    let nine = m.get(9).unwrap();
    assert_eq!(nine.name, "nine");
    assert_eq!(nine.down.as_deref(), Some("SELECT -9;"));
    assert!(nine.transactional);
    assert!(nine.path.ends_with("9_nine.up.sql"), "{}", nine.path);
    assert_eq!(
        m.get(10).unwrap().down,
        None,
        "an up without a down is allowed"
    );
    assert_eq!(m.latest().unwrap().version, 10);
}

#[test]
fn version_digits_and_names_with_spaces() {
    let m = parse(&[
        ("20261124093000_create the table.up.sql", b"SELECT 1;"),
        ("0001_first_one.up.sql", b"SELECT 1;"),
        ("2017-09-23-182408_diesel style/up.sql", b"SELECT 1;"),
    ])
    .unwrap();
    assert_eq!(m.get(20261124093000).unwrap().name, "create the table");
    assert_eq!(
        m.get(1).unwrap().name,
        "first_one",
        "the name is everything after the first `_`"
    );
    assert_eq!(m.get(20170923182408).unwrap().name, "diesel style");
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
    let users = m.get(20170923182408).unwrap();
    assert!(users.transactional && users.down_transactional);
    let index = m.get(20170924000000).unwrap();
    assert!(!index.transactional && !index.down_transactional);
    assert!(m.get(20170925000000).unwrap().transactional);
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
    let a = m.get(1).unwrap();
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
    assert_eq!(lf.get(1).unwrap().checksum, crlf.get(1).unwrap().checksum);
    assert_ne!(lf.get(1).unwrap().checksum, edited.get(1).unwrap().checksum);
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
    ] {
        let path = source_error_path(&[(bad, b"SELECT 1;")]);
        assert!(path.ends_with(bad), "{bad}: {path}");
    }
    let path = source_error_path(&[("latest/up.sql", b"SELECT 1;")]);
    assert!(path.ends_with("latest/up.sql"), "{path}");
}

#[test]
fn empty_and_whitespace_only_files() {
    assert!(source_error_path(&[("1_a.up.sql", b"")]).ends_with("1_a.up.sql"));
    assert!(source_error_path(&[("1_a.up.sql", b" \n\t\n")]).ends_with("1_a.up.sql"));
    assert!(
        source_error_path(&[("1_a.up.sql", b"SELECT 1;"), ("1_a.down.sql", b"")])
            .ends_with("1_a.down.sql")
    );
    assert!(source_error_path(&[("1_a/up.sql", b"\xef\xbb\xbf")]).ends_with("1_a/up.sql"));
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
                e.version,
                &e.name,
                &e.up,
                &e.down,
                e.checksum,
                e.transactional
            ),
            (
                d.version,
                &d.name,
                &d.up,
                &d.down,
                d.checksum,
                d.transactional
            )
        );
    }
    let index = embedded.get(2).unwrap();
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
        created.version >= 20260101000000 && created.version < 100000000000000,
        "{}",
        created.version
    );
    assert!(created
        .up_path
        .ends_with(format!("{}_create users.up.sql", created.version)));
    assert!(created.down_path.exists());
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
    assert_eq!(next.version, 3);
    assert!(
        next.up_path.ends_with("0003_c.up.sql"),
        "{}",
        next.up_path.display()
    );

    assert!(matches!(
        new_migration(&seq, "a/b"),
        Err(MigrateError::Source { .. })
    ));
    assert!(matches!(
        new_migration(&seq, " "),
        Err(MigrateError::Source { .. })
    ));
}
