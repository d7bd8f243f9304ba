//! Helpers shared by the CLI's integration tests: run the real `svcdb` binary, alone
//! ([`svcdb`]) or against a throwaway database and migrations folder ([`Project`]).
//!
//! Each test file includes this with `mod common;` and uses some of it.
// Every test file is its own crate: the helpers one of them does not use would warn there.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use svcdb::testing::TestDb;

/// What one run of the binary did.
#[derive(Debug)]
pub struct Output {
    /// The exit code (-1 when killed by a signal).
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Panics, showing both streams, unless the run exited with `code`.
    #[track_caller]
    pub fn expect_code(self, code: i32) -> Self {
        assert_eq!(self.code, code, "unexpected exit code; {self}");
        self
    }

    /// stdout as the single JSON value `--json` promises (anything else on stdout fails).
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON value ({e}); {self}"))
    }
}

impl std::fmt::Display for Output {
    /// Everything a failing assertion should show.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit code {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `svcdb args` in `cwd` with `env` set, and with none of the test process's own
/// `DATABASE_URL` and `SVCDB_*` variables: a developer's settings must not reach a test.
pub fn svcdb<A: AsRef<OsStr>>(args: &[A], env: &[(&str, &str)], cwd: Option<&Path>) -> Output {
    let out = command(args, env, cwd)
        .output()
        .expect("the svcdb binary runs");
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The `svcdb args` command of [`svcdb`], to spawn.
pub fn command<A: AsRef<OsStr>>(args: &[A], env: &[(&str, &str)], cwd: Option<&Path>) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_svcdb"));
    command.args(args);
    for (key, _) in std::env::vars_os() {
        // The tests give the broker themselves too: one in the environment would add a
        // broker check to every `svcdb health`. What the binary logs is its default unless a
        // test says otherwise.
        if key == "DATABASE_URL"
            || key == "AMQP_URL"
            || key == "RUST_LOG"
            || key.to_string_lossy().starts_with("SVCDB_")
        {
            command.env_remove(key);
        }
    }
    command.envs(env.iter().copied());
    if let Some(cwd) = cwd {
        command.current_dir(cwd);
    }
    command
}

/// A throwaway database, a service schema in it and an empty migrations folder: what one test
/// runs the binary against. Everything is dropped with it.
pub struct Project {
    /// The throwaway database (admin connections for checks: `db.admin()`).
    pub db: TestDb,
    /// The service schema, passed as `SVCDB_SCHEMA`; created on first connect.
    pub schema: String,
    /// Working directory of every run; holds the migrations folder.
    pub root: tempfile::TempDir,
}

impl Project {
    /// A fresh database, with `svc` as the service schema.
    pub async fn new() -> Self {
        Self {
            db: TestDb::new().await,
            schema: "svc".to_owned(),
            root: tempfile::tempdir().expect("a temporary folder"),
        }
    }

    /// The migrations folder, passed as `SVCDB_MIGRATIONS_DIR` (absolute, so messages name
    /// files unambiguously).
    pub fn migrations(&self) -> PathBuf {
        self.root.path().join("migrations")
    }

    /// Writes files (path relative to the migrations folder, contents), creating folders.
    pub fn write(&self, files: &[(&str, &str)]) {
        for (rel, contents) in files {
            let path = self.migrations().join(rel);
            std::fs::create_dir_all(path.parent().expect("a parent folder"))
                .expect("create the migrations folder");
            std::fs::write(&path, contents)
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        }
    }

    /// Runs `svcdb args` against this project's database, schema and folder.
    pub fn run(&self, args: &[&str]) -> Output {
        self.run_with_env(args, &[])
    }

    /// `svcdb args` against this project, started with its output piped, not awaited.
    pub fn spawn(&self, args: &[&str]) -> std::process::Child {
        self.command(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("the svcdb binary starts")
    }

    /// The command `svcdb args` against this project, to set up and start.
    pub fn command(&self, args: &[&str]) -> Command {
        let url = self.db.url();
        let dir = self.migrations();
        let dir = dir.to_str().expect("a UTF-8 temporary path");
        command(
            args,
            &[
                ("DATABASE_URL", url.as_str()),
                ("SVCDB_SCHEMA", self.schema.as_str()),
                ("SVCDB_MIGRATIONS_DIR", dir),
                ("SVCDB_CREATE_SCHEMA", "true"),
            ],
            Some(self.root.path()),
        )
    }

    /// [`run`](Self::run) with more environment variables, which win over the project's.
    pub fn run_with_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let url = self.db.url();
        let dir = self.migrations();
        let dir = dir.to_str().expect("a UTF-8 temporary path");
        let mut all = vec![
            ("DATABASE_URL", url.as_str()),
            ("SVCDB_SCHEMA", self.schema.as_str()),
            ("SVCDB_MIGRATIONS_DIR", dir),
            // Tests skip `svcdb provision`: the admin user creates the schema on connect.
            ("SVCDB_CREATE_SCHEMA", "true"),
        ];
        all.extend_from_slice(env);
        svcdb(args, &all, Some(self.root.path()))
    }

    /// The tables of the service schema, sorted (the history table included once it exists).
    pub async fn tables(&self) -> Vec<String> {
        let admin = self.db.admin().await;
        admin
            .query(
                "SELECT table_name::text FROM information_schema.tables
                 WHERE table_schema = $1 ORDER BY 1",
                &[&self.schema],
            )
            .await
            .expect("list the schema's tables")
            .iter()
            .map(|row| row.get(0))
            .collect()
    }

    /// Whether the service schema exists (for commands that must not create it).
    pub async fn schema_exists(&self) -> bool {
        self.db
            .admin()
            .await
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
                &[&self.schema],
            )
            .await
            .expect("ask whether the schema exists")
            .get(0)
    }
}
