//! The PostgreSQL server the benchmarks run against: an administrator's connection that creates
//! and drops the benchmark's own databases, and the PostgreSQL command-line tools (`pgbench`,
//! `psql`) pointed at the same server.

use std::path::{Path, PathBuf};
use std::process::Output;

use anyhow::{bail, Context, Result};
use svcdb::{DedicatedConn, Ident};

/// An administrator's session on the server, and the settings to reach any database on it.
pub struct Server {
    /// The parsed `--database-url`; other databases are reached by changing only its name.
    admin: tokio_postgres::Config,
    /// `--database-url` as given, for tools that take a URL (`svcdb`).
    url: String,
    /// Open for the whole run: creating and dropping databases, `CHECKPOINT`.
    conn: DedicatedConn,
    /// `server_version`, e.g. `15.20 (Debian 15.20-0+deb12u1)`, for the report.
    version: String,
    /// The databases [`Server::scratch_database`] made, dropped by [`Server::measuring`].
    scratch: std::sync::Mutex<Vec<String>>,
}

impl Server {
    /// Connects to the database `url` names (usually `postgres`).
    pub async fn connect(url: &str) -> Result<Self> {
        let admin = svcdb::parse_url(url)?;
        let conn = DedicatedConn::connect(&admin).await.context(
            "cannot reach PostgreSQL (start it with scripts/services, or set --database-url)",
        )?;
        let version = conn
            .query_one("SHOW server_version", &[])
            .await?
            .get::<_, String>(0);
        Ok(Self {
            admin,
            url: url.to_owned(),
            conn,
            version,
            scratch: std::sync::Mutex::default(),
        })
    }

    /// The server's version string.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Connection settings for database `name` on this server, as the administrator.
    pub fn database(&self, name: &str) -> tokio_postgres::Config {
        let mut config = self.admin.clone();
        config.dbname(name);
        config
    }

    /// `--database-url` with its database replaced by `name` (query parameters kept), for a
    /// tool that reads a URL: `postgres://user@host/postgres?x=y` → `postgres://user@host/name?x=y`.
    /// It may hold a password: pass it in the environment, never on a command line.
    pub fn url(&self, name: &str) -> String {
        let (base, query) = match self.url.split_once('?') {
            Some((base, query)) => (base, format!("?{query}")),
            None => (self.url.as_str(), String::new()),
        };
        let authority_start = base.find("://").map_or(0, |i| i + 3);
        let authority_end = base[authority_start..]
            .find('/')
            .map_or(base.len(), |i| authority_start + i);
        format!("{}/{name}{query}", &base[..authority_end])
    }

    /// Creates database `name` unless it exists (keeping what is in it). True if created.
    pub async fn ensure_database(&self, name: &str) -> Result<bool> {
        let exists = self
            .conn
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
            .await?
            .is_some();
        if exists {
            return Ok(false);
        }
        match self
            .conn
            .batch_execute(&format!("CREATE DATABASE {}", quoted(name)?))
            .await
        {
            Ok(()) => Ok(true),
            // Another run created it between the check and here: it exists, which is the goal.
            Err(e) if e.code() == Some(&svcdb::SqlState::DUPLICATE_DATABASE) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("cannot create database {name}")),
        }
    }

    /// Drops database `name` (if it exists) and creates it empty, so a measurement never sees a
    /// previous run's objects, dead tuples or catalog bloat.
    pub async fn recreate_database(&self, name: &str) -> Result<()> {
        self.drop_database(name).await?;
        self.conn
            .batch_execute(&format!("CREATE DATABASE {}", quoted(name)?))
            .await
            .with_context(|| format!("cannot create database {name}"))
    }

    /// A fresh database `name` for one measurement ([`Server::recreate_database`]), kept until
    /// the end of the run ([`Server::measuring`]) rather than dropped when the measurement is
    /// done.
    ///
    /// Dropping a database deletes thousands of files, and on some file systems that slows
    /// the file creation of the next minutes, which is what DDL measurements time. ext4
    /// without a journal (the benchmark machine's) will not reuse an inode freed in the last
    /// 60 s, or 300 s while its inode-table block is unwritten (`recently_deleted()` in
    /// `fs/ext4/ialloc.c`, `RECENTCY_MIN` and `RECENTCY_DIRTY`), and creating a file then scans
    /// past every such inode: the same `svcdb migrate up` took 0.73–1.12 s into databases kept
    /// and 1.30–1.64 s with a database dropped after each run (docs/benchmarks.md). Dropped
    /// between measurements, each round was slower than the last and the tools' own costs
    /// drowned in the file system's.
    pub async fn scratch_database(&self, name: &str) -> Result<()> {
        self.recreate_database(name).await?;
        let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        if !scratch.iter().any(|kept| kept == name) {
            scratch.push(name.to_owned());
        }
        Ok(())
    }

    /// Runs `measurements`, then drops every database [`Server::scratch_database`] made, also
    /// when they failed (their error is the one returned).
    pub async fn measuring<T>(
        &self,
        measurements: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let measured = measurements.await;
        let names = std::mem::take(&mut *self.scratch.lock().unwrap_or_else(|e| e.into_inner()));
        let mut dropped = Ok(());
        for name in names {
            dropped = dropped.and(self.drop_database(&name).await);
        }
        let value = measured?;
        dropped.map(|()| value)
    }

    /// Drops database `name` if it exists, disconnecting whoever is still in it.
    pub async fn drop_database(&self, name: &str) -> Result<()> {
        self.conn
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                quoted(name)?
            ))
            .await
            .with_context(|| format!("cannot drop database {name}"))
    }

    /// Writes out dirty buffers before a timed step, so that it does not pay for the previous
    /// step's writes through a checkpoint that happens to start in the middle of it. Best
    /// effort: a non-superuser cannot, and the figures are then only noisier.
    pub async fn checkpoint(&self) {
        if let Err(e) = self.conn.batch_execute("CHECKPOINT").await {
            tracing::debug!(error = %e, "CHECKPOINT refused; timings may be noisier");
        }
    }

    /// A command running `tool` against database `dbname` on this server, as the administrator.
    ///
    /// The connection goes through libpq's environment variables rather than arguments, so the
    /// password never shows in a process list; `PGOPTIONS` is cleared so only what the caller
    /// sets reaches the server.
    pub fn tool(&self, tool: &Path, dbname: &str) -> tokio::process::Command {
        use tokio_postgres::config::Host;
        let mut cmd = tokio::process::Command::new(tool);
        match self.admin.get_hosts().first() {
            Some(Host::Tcp(host)) => {
                cmd.env("PGHOST", host);
            }
            #[cfg(unix)]
            Some(Host::Unix(dir)) => {
                cmd.env("PGHOST", dir);
            }
            None => {}
        }
        if let Some(port) = self.admin.get_ports().first() {
            cmd.env("PGPORT", port.to_string());
        }
        if let Some(user) = self.admin.get_user() {
            cmd.env("PGUSER", user);
        }
        match self.admin.get_password() {
            Some(password) => {
                cmd.env("PGPASSWORD", String::from_utf8_lossy(password).as_ref());
            }
            None => {
                cmd.env_remove("PGPASSWORD");
            }
        }
        cmd.env("PGDATABASE", dbname)
            // svcdb connects without TLS (`NoTls`); libpq's default `prefer` would encrypt
            // over TCP whenever the server has `ssl = on`, and the references would then pay
            // for encryption that svcdb does not: a skewed comparison.
            .env("PGSSLMODE", "disable")
            .env_remove("PGOPTIONS")
            .env_remove("PGSERVICE")
            .kill_on_drop(true);
        cmd
    }
}

/// A database name, validated and double-quoted for SQL (the names are the benchmark's own,
/// but a `--database` option must not be able to inject SQL).
fn quoted(name: &str) -> Result<String> {
    Ok(Ident::new("database", name)?.to_string())
}

/// Runs `cmd` to completion; an error carries the tool's output, which says what went wrong.
pub async fn run_tool(mut cmd: tokio::process::Command, what: &str) -> Result<Output> {
    let output = cmd
        .output()
        .await
        .with_context(|| format!("cannot start {what}"))?;
    if !output.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(output)
}

/// Finds a PostgreSQL client program: on `PATH`, else in Debian's versioned
/// `/usr/lib/postgresql/<major>/bin` (newest major first), where it lives when only the server
/// package put it there.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default();
    let mut debian: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let major = entry.file_name().to_str()?.parse().ok()?;
            Some((major, entry.path().join("bin")))
        })
        .collect();
    debian.sort_by_key(|(major, _)| std::cmp::Reverse(*major));
    on_path
        .into_iter()
        .chain(debian.into_iter().map(|(_, dir)| dir))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// The first line of `tool --version`, e.g. `pgbench (PostgreSQL) 15.20 (Debian …)`.
pub async fn tool_version(tool: &Path) -> Option<String> {
    let output = tokio::process::Command::new(tool)
        .arg("--version")
        .output()
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines().next().map(|line| line.trim().to_owned())
}
