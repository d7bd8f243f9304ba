//! Throwaway databases for tests, in the spirit of `#[sqlx::test]`.
//!
//! [`TestDb::new`] creates a database with a unique name on the server named by
//! `SVCDB_TEST_DATABASE_URL` (else `DATABASE_URL`, else `postgres://postgres@127.0.0.1:5432/postgres`),
//! and dropping the [`TestDb`] drops that database and every role made through it, so tests run
//! in parallel and leave nothing behind.
//!
//! ```no_run
//! # async fn demo() {
//! let db = svcdb::testing::TestDb::new().await;
//! let svc = db.service("catalog").await; // schema created, pinned on every connection
//! svc.get().await.unwrap().batch_execute("CREATE TABLE products (id int)").await.unwrap();
//! # }
//! ```

use std::sync::Mutex;

use crate::config::Config;
use crate::connection::DedicatedConn;
use crate::ident::Ident;
use crate::pool::ServiceDb;
use crate::provision::{provision, ProvisionReport, ProvisionSpec};

/// The server tests run against when no environment variable says otherwise.
pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Prefix of every throwaway database's name, so leftovers of a killed run can be found.
pub const DATABASE_PREFIX: &str = "svcdb_test_";

/// A database that exists for one test and is dropped with this value.
pub struct TestDb {
    /// The throwaway database's name.
    name: String,
    /// Connection to the server's maintenance database, as the admin user.
    admin: tokio_postgres::Config,
    /// Connection to the throwaway database, as the admin user.
    connection: tokio_postgres::Config,
    /// Roles made through [`TestDb::role_name`]; roles are cluster-wide, so they are dropped
    /// explicitly after the database.
    roles: Mutex<Vec<String>>,
}

impl TestDb {
    /// Creates a fresh database. Panics with a message saying what to start or set when the
    /// server cannot be reached: this is a test helper.
    pub async fn new() -> Self {
        let url = admin_url();
        let admin = crate::config::parse_url(&url).expect("SVCDB_TEST_DATABASE_URL/DATABASE_URL");
        let name = format!("{DATABASE_PREFIX}{}", uuid::Uuid::now_v7().simple());
        let client = DedicatedConn::connect(&admin).await.unwrap_or_else(|e| {
            panic!("tests need PostgreSQL: {e}\n  hint: run scripts/services, or set SVCDB_TEST_DATABASE_URL")
        });
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "cannot create test database {name}: {}",
                    crate::error::pg_message(&e)
                )
            });
        let mut connection = admin.clone();
        connection.dbname(&name);
        Self {
            name,
            admin,
            connection,
            roles: Mutex::new(Vec::new()),
        }
    }

    /// The throwaway database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Driver settings for the throwaway database, as the admin user.
    pub fn connection(&self) -> tokio_postgres::Config {
        self.connection.clone()
    }

    /// A `key=value` connection string for the throwaway database as the admin user (what a
    /// CLI test passes as `--database-url`).
    pub fn url(&self) -> String {
        self.url_as(self.connection.get_user().unwrap_or("postgres"))
    }

    /// A connection string for the throwaway database as `user`, with the admin's host, port
    /// and password.
    pub fn url_as(&self, user: &str) -> String {
        use tokio_postgres::config::Host;
        let quote = |s: &str| format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"));
        let mut parts = vec![];
        if let Some(Host::Tcp(h)) = self.connection.get_hosts().first() {
            parts.push(format!("host={}", quote(h)));
        }
        if let Some(port) = self.connection.get_ports().first() {
            parts.push(format!("port={port}"));
        }
        parts.push(format!("user={}", quote(user)));
        parts.push(format!("dbname={}", quote(&self.name)));
        if let Some(pw) = self.connection.get_password() {
            parts.push(format!("password={}", quote(&String::from_utf8_lossy(pw))));
        }
        parts.join(" ")
    }

    /// A service [`Config`] for `schema` on the throwaway database as the admin user, with the
    /// schema created on connect and a pool of at most 5 (tests run many pools at once).
    pub fn config(&self, schema: &str) -> Config {
        let mut config = Config::with_connection(
            self.connection.clone(),
            Ident::new("schema", schema).expect("valid schema name"),
        );
        config.create_schema = true;
        config.pool_min = 1;
        config.pool_max = 5;
        config
    }

    /// A service [`Config`] for `schema` connecting as `role` (e.g. one made by
    /// [`TestDb::provision`]).
    pub fn config_as(&self, role: &str, schema: &str) -> Config {
        let mut config = self.config(schema);
        config.connection.user(role);
        config.create_schema = false;
        config
    }

    /// Connects a [`ServiceDb`] for `schema` (created if missing) as the admin user.
    pub async fn service(&self, schema: &str) -> ServiceDb {
        ServiceDb::connect(self.config(schema))
            .await
            .unwrap_or_else(|e| panic!("cannot connect the test service: {e}"))
    }

    /// A connection outside any pool to the throwaway database as the admin user.
    pub async fn admin(&self) -> DedicatedConn {
        DedicatedConn::connect(&self.connection)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to the test database: {e}"))
    }

    /// Waits (up to 10 s) until no session on the throwaway database is `idle in transaction`,
    /// and panics naming their last statements if some still are. A rollback test needs this
    /// besides counting rows: another session never sees uncommitted rows, so a leaked
    /// transaction looks rolled back from outside. A dropped transaction's `ROLLBACK` is sent
    /// without waiting, hence the wait.
    pub async fn assert_no_transaction_left_open(&self) {
        let admin = self.admin().await;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let open: Vec<String> = admin
                .query(
                    "SELECT coalesce(query, '') FROM pg_stat_activity \
                     WHERE datname = current_database() AND pid <> pg_backend_pid() \
                     AND state LIKE 'idle in transaction%'",
                    &[],
                )
                .await
                .unwrap_or_else(|e| panic!("cannot read pg_stat_activity: {e}"))
                .iter()
                .map(|row| row.get(0))
                .collect();
            if open.is_empty() {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "transactions left open, last statements: {open:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// A role name unique to this test (`<base>_<random>`), dropped with the database.
    pub fn role_name(&self, base: &str) -> String {
        let name = format!("{base}_{:010x}", rand::random::<u64>() & 0xff_ffff_ffff);
        self.roles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(name.clone());
        name
    }

    /// Provisions a service with a unique role named after `service` and returns the role
    /// name with the report.
    pub async fn provision(&self, service: &str, schema: &str) -> (String, ProvisionReport) {
        let role = self.role_name(service);
        let spec = ProvisionSpec::new(&role, schema).expect("valid names");
        let mut admin = self.admin().await;
        let report = provision(&mut admin, &spec)
            .await
            .unwrap_or_else(|e| panic!("provisioning {service} failed: {e}"));
        (role, report)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin = self.admin.clone();
        let name = std::mem::take(&mut self.name);
        let roles = std::mem::take(&mut *self.roles.lock().unwrap_or_else(|p| p.into_inner()));
        // Drop can't await, and the test's runtime may be single-threaded: clean up on a
        // thread of our own with a runtime of its own.
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for test clean-up");
            rt.block_on(async move {
                let client = DedicatedConn::connect(&admin).await?;
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .await?;
                for role in roles {
                    client
                        .batch_execute(&format!("DROP ROLE IF EXISTS \"{role}\""))
                        .await?;
                }
                Ok::<_, crate::Error>(())
            })
        });
        match cleanup.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("warning: test database clean-up failed: {e}"),
            Err(_) => eprintln!("warning: test database clean-up panicked"),
        }
    }
}

/// The admin URL tests use.
pub fn admin_url() -> String {
    std::env::var("SVCDB_TEST_DATABASE_URL")
        .or_else(|_| std::env::var("DATABASE_URL"))
        .unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_owned())
}

/// A local port where nothing listens: a connection to it is refused at once.
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free local port");
    listener.local_addr().expect("the port just bound").port()
}

/// Everything a log subscriber writes, kept for the test to read back: hand
/// `move || logs.clone()` to `tracing_subscriber::fmt().with_writer(…)`. Clones share one
/// buffer.
#[derive(Clone, Default)]
pub struct CapturedLogs(std::sync::Arc<Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CapturedLogs {
    /// What was written so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}
