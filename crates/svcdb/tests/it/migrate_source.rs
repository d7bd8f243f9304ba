//! Embedded migrations end to end: `embed_migrations!` compiles a folder into the binary, and
//! `Migrations::from_embedded` parses it as `Migrations::from_dir` parses the folder. The
//! layouts, names and checks of a source are unit tests beside their code in
//! `src/migrate/source/`.

use std::path::Path;

use svcdb::migrate::{EmbeddedMigrations, Migrations};

static EMBEDDED: EmbeddedMigrations = svcdb::embed_migrations!("tests/fixtures/migrate/embedded");

/// Flyway migrations filed by year and quarter, two folders down.
static EMBEDDED_DEEP: EmbeddedMigrations =
    svcdb::embed_migrations!("tests/fixtures/migrate/embedded_deep");

/// Found by a user trial: Flyway scans every depth of its locations, and svcdb read one level
/// of sub-folders, skipping `2024/q1/V2__b.sql` without a word. Read from the folder and
/// embedded alike, in version order.
#[test]
fn migrations_folders_down_are_read_embedded_and_from_the_folder() {
    let dir = Migrations::from_dir(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/migrate/embedded_deep"),
    )
    .unwrap();
    let embedded = Migrations::from_embedded(&EMBEDDED_DEEP).unwrap();
    for migrations in [&dir, &embedded] {
        let versions: Vec<i64> = migrations.iter().map(|m| m.version.number()).collect();
        assert_eq!(versions, [1, 2, 3]);
    }
}

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

/// The version numbered `n` (as the history's integer column and `0001`-style files number it).
fn v(n: i64) -> svcdb::migrate::Version {
    svcdb::migrate::Version::try_from(n).expect("a non-negative version")
}

/// Found by a robustness trial: a migration that is a link to /dev/zero grew the process to
/// gigabytes, and a FIFO blocked the read forever. Neither is a file to read.
#[test]
fn a_migration_that_is_no_regular_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("0001_a.up.sql"), "SELECT 1;").unwrap();
    // The control: a link to a regular file is read.
    std::os::unix::fs::symlink(
        dir.path().join("0001_a.up.sql"),
        dir.path().join("0002_b.up.sql"),
    )
    .unwrap();
    assert_eq!(Migrations::from_dir(dir.path()).unwrap().len(), 2);
    std::os::unix::fs::symlink("/dev/zero", dir.path().join("0003_zero.up.sql")).unwrap();
    match Migrations::from_dir(dir.path()) {
        Err(svcdb::migrate::MigrateError::Source { path, .. }) => {
            assert!(path.ends_with("0003_zero.up.sql"), "{path}")
        }
        other => panic!("expected a source error, got {other:?}"),
    }
}

/// Found by a user trial: dbmate runs its files in file-name order, so `10_create_b.sql`
/// before `9_create_a.sql` (and supabase's `10000000000000_demote-postgres.sql` before
/// `100000022_test.sql`), where svcdb orders the numbers numerically. Such a folder is
/// refused, naming both files, rather than applied in another order than dbmate's.
#[test]
fn a_dbmate_folder_dbmate_would_run_in_another_order_is_refused() {
    let dbmate = |table: &str| {
        format!("-- migrate:up\nCREATE TABLE {table} (id int);\n\n-- migrate:down\nDROP TABLE {table};\n")
    };
    let refused = |files: &[&str]| {
        let dir = tempfile::tempdir().unwrap();
        for (i, name) in files.iter().enumerate() {
            std::fs::write(dir.path().join(name), dbmate(&format!("t{i}"))).unwrap();
        }
        match Migrations::from_dir(dir.path()) {
            Err(svcdb::migrate::MigrateError::Source { path, message }) => (path, message),
            other => panic!("{files:?}: expected a source error, got {other:?}"),
        }
    };
    let (path, message) = refused(&["9_create_a.sql", "10_create_b.sql"]);
    assert!(path.ends_with("10_create_b.sql"), "{path}");
    assert!(message.contains("9_create_a.sql"), "{message}");
    let (path, message) = refused(&[
        "10000000000000_demote-postgres.sql",
        "100000022_test.sql",
        "20230612152300_test.sql",
    ]);
    assert!(
        path.ends_with("10000000000000_demote-postgres.sql"),
        "{path}"
    );
    assert!(message.contains("100000022_test.sql"), "{message}");

    // The control: dbmate's own 14-digit timestamps read as before, in the same order.
    let dir = tempfile::tempdir().unwrap();
    for name in ["20240102000000_b.sql", "20231231235959_a.sql"] {
        std::fs::write(dir.path().join(name), dbmate(&name[15..16])).unwrap();
    }
    let m = Migrations::from_dir(dir.path()).unwrap();
    let names: Vec<&str> = m.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
}
