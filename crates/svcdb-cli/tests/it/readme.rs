//! The README's `svcdb` walkthrough, run as written: the shell block after the
//! `<!-- walkthrough: … -->` marker, read from README.md at test time so that the two cannot
//! drift. Only what must differ on a shared server is substituted: the database name, the
//! role (roles are cluster-wide) and the server's address when the tests use another one;
//! `svcdb` is the binary under test, first on `PATH`.

use std::path::Path;
use std::process::Command;

use svcdb::testing::TestDb;

/// The comment that precedes the walkthrough's block in README.md.
const MARKER: &str =
    "<!-- walkthrough: crates/svcdb-cli/tests/it/readme.rs runs the next block -->";

/// The shell block after [`MARKER`] in `readme`.
fn walkthrough(readme: &str) -> &str {
    let after = readme
        .split_once(MARKER)
        .unwrap_or_else(|| panic!("README.md has no {MARKER}"))
        .1;
    let block = after
        .trim_start()
        .strip_prefix("```sh\n")
        .unwrap_or_else(|| panic!("no ```sh block right after {MARKER}"));
    &block[..block.find("\n```").expect("the block is closed")]
}

/// `text` with every whole-word `word` (not part of a longer identifier such as
/// `catalog_schema` or `CATALOG_PASSWORD`) replaced by `with`.
fn replace_word(text: &str, word: &str, with: &str) -> String {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(word) {
        let before = rest[..at].chars().last().or_else(|| out.chars().last());
        let after = rest[at + word.len()..].chars().next();
        out.push_str(&rest[..at]);
        if before.is_some_and(is_ident) || after.is_some_and(is_ident) {
            out.push_str(word);
        } else {
            out.push_str(with);
        }
        rest = &rest[at + word.len()..];
    }
    out.push_str(rest);
    out
}

/// Drops the walkthrough's database (it is the README's `createdb` that makes it).
struct DropDatabase<'a> {
    admin: &'a TestDb,
    name: String,
}

impl Drop for DropDatabase<'_> {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        let config = self.admin.connection();
        // Drop can't await: a thread with a runtime of its own, as TestDb does.
        let dropped = std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async {
                    let admin = svcdb::DedicatedConn::connect(&config)
                        .await
                        .map_err(std::io::Error::other)?;
                    admin
                        .batch_execute(&sql)
                        .await
                        .map_err(std::io::Error::other)
                })
            })
            .join()
        });
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("warning: could not drop {}: {dropped:?}", self.name);
        }
    }
}

#[tokio::test]
async fn the_readme_walkthrough_runs_as_written_and_ends_ready() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README.md");
    let block = walkthrough(&readme);
    // The control: this is the walkthrough, not some other block.
    for command in [
        "createdb",
        "svcdb provision",
        "svcdb migrate up",
        "svcdb schema verify",
    ] {
        assert!(block.contains(command), "{command} not in:\n{block}");
    }

    // A throwaway database of the tests' naming (so leftovers are found), and a role unique to
    // this run; the role is dropped after the database (declared after `db`, `_database`
    // drops first).
    let db = TestDb::new().await;
    let database = format!("{}_readme", db.name());
    let role = db.role_name("catalog");
    let _database = DropDatabase {
        admin: &db,
        name: database.clone(),
    };
    let mut script = replace_word(block, "appdb", &database);
    script = replace_word(&script, "catalog", &role);
    let server = db.connection();
    let host = match server.get_hosts().first() {
        Some(svcdb::tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        _ => "127.0.0.1".to_owned(),
    };
    let port = server.get_ports().first().copied().unwrap_or(5432);
    script = script
        .replace("-h 127.0.0.1", &format!("-h {host} -p {port}"))
        .replace("@127.0.0.1/", &format!("@{host}:{port}/"));

    let bin = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_svcdb"), bin.path().join("svcdb")).unwrap();
    let path = std::env::join_paths(std::iter::once(bin.path().to_owned()).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))
    .unwrap();
    let cwd = tempfile::tempdir().unwrap();
    let mut shell = Command::new("sh");
    // -e: every command must succeed, as a reader's would; -x: show which one did not.
    shell
        .args(["-e", "-x", "-c", &script])
        .current_dir(cwd.path());
    for (key, _) in std::env::vars_os() {
        let key_text = key.to_string_lossy();
        if key == "DATABASE_URL" || key_text.starts_with("SVCDB_") || key_text.starts_with("PG") {
            shell.env_remove(&key);
        }
    }
    shell.env("PATH", path);
    let out = shell.output().expect("sh runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the walkthrough failed ({})\n--- script ---\n{script}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        out.status
    );

    // Checked apart from the block's own exit codes: the schema is the role's, migrated to
    // the newest version, with the table it promised; and the role has a password.
    let mut config = db.connection();
    config.dbname(&database);
    let admin = svcdb::DedicatedConn::connect(&config).await.unwrap();
    let row = admin
        .query_one(
            "SELECT (SELECT tableowner::text FROM pg_tables
                      WHERE schemaname = 'catalog_schema' AND tablename = 'products'),
                    (SELECT max(version) FROM catalog_schema.svcdb_migrations),
                    (SELECT rolpassword IS NOT NULL FROM pg_authid WHERE rolname = $1)",
            &[&role],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, Option<String>>(0).as_deref(),
        Some(role.as_str())
    );
    assert_eq!(row.get::<_, Option<i64>>(1), Some(2));
    assert_eq!(row.get::<_, Option<bool>>(2), Some(true));
    assert!(cwd
        .path()
        .join(Path::new("migrations/0002_add_stock.up.sql"))
        .exists());
}
