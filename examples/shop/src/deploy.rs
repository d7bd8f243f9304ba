//! The operator's side: the shop's database and the services' roles, made with the admin
//! (superuser) connection. Services never get that connection; each logs in as its own role.

use anyhow::Context as _;
use svcdb::tokio_postgres;
use svcdb::tokio_postgres::config::Host;
use svcdb::{DedicatedConn, Ident, Password, ProvisionReport, ProvisionSpec};

use crate::platform::{Names, ServiceDef};

/// The comment `shop demo` puts on its database, so that `shop demo` and `shop clean` drop only
/// databases they made.
const DEMO_MARK: &str = "made by shop demo; `shop clean` removes it";

/// One shop database and the roles of its services.
pub struct Deployment {
    /// The admin connection's settings (to the maintenance database).
    admin: tokio_postgres::Config,
    pub database: String,
    pub names: Names,
    /// The services' password, if they use one (sent only as a SCRAM verifier).
    password: Option<String>,
}

impl Deployment {
    /// `admin_url` is a superuser's (or a role with CREATEDB and CREATEROLE); `database` is the
    /// shop's database and names the roles, exchanges and queues (see [`Names`]).
    pub fn new(admin_url: &str, database: &str, password: Option<String>) -> anyhow::Result<Self> {
        let admin = svcdb::parse_url(admin_url).context("--database-url")?;
        Ok(Self {
            admin,
            database: database.to_owned(),
            names: Names::new(database).context("--database")?,
            password,
        })
    }

    /// `user@host:port`, for messages.
    pub fn server(&self) -> String {
        let host = match self.admin.get_hosts().first() {
            Some(Host::Tcp(host)) => host.clone(),
            Some(Host::Unix(path)) => path.display().to_string(),
            None => "localhost".into(),
        };
        let port = self.admin.get_ports().first().copied().unwrap_or(5432);
        format!(
            "{}@{host}:{port}",
            self.admin.get_user().unwrap_or("postgres")
        )
    }

    /// A psql command line for the shop database as the admin.
    pub fn psql_command(&self) -> String {
        let mut command = String::from("psql");
        if let Some(Host::Tcp(host)) = self.admin.get_hosts().first() {
            command.push_str(&format!(" -h {host}"));
        }
        if let Some(port) = self.admin.get_ports().first() {
            command.push_str(&format!(" -p {port}"));
        }
        if let Some(user) = self.admin.get_user() {
            command.push_str(&format!(" -U {user}"));
        }
        command.push_str(&format!(" -d {}", self.database));
        command
    }

    fn database_ident(&self) -> anyhow::Result<Ident> {
        Ok(Ident::new("database", &self.database)?)
    }

    async fn maintenance(&self) -> anyhow::Result<DedicatedConn> {
        DedicatedConn::connect(&self.admin)
            .await
            .context("connecting as the admin (--database-url)")
    }

    /// The admin's connection settings, to the maintenance database (for the fault injector,
    /// which terminates the services' backends).
    pub fn admin_config(&self) -> tokio_postgres::Config {
        self.admin.clone()
    }

    /// A connection to the shop database as the admin: for provisioning, and for the demo's
    /// auditor, who reads every schema to check the invariants.
    pub async fn admin(&self) -> anyhow::Result<DedicatedConn> {
        let mut config = self.admin.clone();
        config.dbname(&self.database);
        DedicatedConn::connect(&config)
            .await
            .with_context(|| format!("connecting to database {} as the admin", self.database))
    }

    /// Drops the database and the services' roles if they exist (a previous run), then
    /// creates the database. Returns whether there was one to drop.
    pub async fn recreate(&self, services: &[&ServiceDef]) -> anyhow::Result<bool> {
        let existed = self.drop(services).await?;
        let db = self.database_ident()?;
        let maintenance = self.maintenance().await?;
        // Two messages: CREATE DATABASE cannot share the implicit transaction of one.
        for sql in [
            format!("CREATE DATABASE {db}"),
            format!("COMMENT ON DATABASE {db} IS '{DEMO_MARK}'"),
        ] {
            maintenance
                .batch_execute(&sql)
                .await
                .with_context(|| format!("creating database {}", self.database))?;
        }
        Ok(existed)
    }

    /// Drops the database (disconnecting whoever is still in it) and the services' roles.
    /// Returns whether the database existed.
    pub async fn drop(&self, services: &[&ServiceDef]) -> anyhow::Result<bool> {
        let db = self.database_ident()?;
        let admin = self.maintenance().await?;
        let mark: Option<Option<String>> = admin
            .query_opt(
                "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = $1",
                &[&self.database],
            )
            .await?
            .map(|row| row.get(0));
        let existed = mark.is_some();
        // Never drop a database the demo did not make: `shop` is a likely name for a user's own.
        if let Some(mark) = mark {
            anyhow::ensure!(
                mark.as_deref() == Some(DEMO_MARK),
                "database {} exists and was not made by `shop demo`, so it is left alone\n  \
                 hint: pass --database with another name, or drop it yourself if it is expendable",
                self.database
            );
        }
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .await
            .with_context(|| format!("dropping database {}", self.database))?;
        // The roles' objects and settings lived in that database; nothing else holds them.
        for def in services {
            let role = Ident::new("role", &self.names.role(def.name))?;
            admin
                .batch_execute(&format!("DROP ROLE IF EXISTS {role}"))
                .await
                .with_context(|| format!("dropping role {}", role.as_str()))?;
        }
        Ok(existed)
    }

    /// The service's login role, owning its schema, with nothing granted to `PUBLIC`
    /// ([`svcdb::provision()`]).
    pub async fn provision(&self, def: &ServiceDef) -> anyhow::Result<ProvisionReport> {
        let mut spec = ProvisionSpec::new(&self.names.role(def.name), def.schema)?;
        spec.password = self.password.clone().map(Password::new);
        let mut admin = self.admin().await?;
        svcdb::provision(&mut admin, &spec)
            .await
            .with_context(|| format!("provisioning {}", def.name))
    }

    /// How a replica of the service connects, as the environment of `shop serve`: as its own
    /// role (DATABASE_URL without a password; the password, if any, in SVCDB_PASSWORD, which
    /// svcdb never logs), to the shop database. Small pools: every replica of every service
    /// shares one PostgreSQL here, and other users of the server need connections too.
    pub fn service_env(&self, def: &ServiceDef) -> Vec<(&'static str, String)> {
        let role = self.names.role(def.name);
        let port = self.admin.get_ports().first().copied().unwrap_or(5432);
        let url = match self.admin.get_hosts().first() {
            Some(Host::Unix(path)) => format!(
                "postgres://{role}@/{}?host={}&port={port}",
                self.database,
                path.display()
            ),
            Some(Host::Tcp(host)) => format!("postgres://{role}@{host}:{port}/{}", self.database),
            None => format!("postgres://{role}@localhost:{port}/{}", self.database),
        };
        let mut env = vec![
            ("DATABASE_URL", url),
            ("SVCDB_SCHEMA", def.schema.to_owned()),
            ("SVCDB_POOL_MIN", "1".to_owned()),
            ("SVCDB_POOL_MAX", "5".to_owned()),
            ("SVCDB_APPLICATION_NAME", format!("shop/{}", def.name)),
        ];
        if let Some(password) = &self.password {
            env.push(("SVCDB_PASSWORD", password.clone()));
        }
        env
    }

    /// How the service connects: as its own role, to the shop database, pinned to its schema.
    /// Small pools: four services share one PostgreSQL here.
    pub fn service_config(&self, def: &ServiceDef) -> anyhow::Result<svcdb::Config> {
        // Host and port from the admin URL; nothing else of the admin's (their password is
        // not the service's).
        let mut connection = tokio_postgres::Config::new();
        for host in self.admin.get_hosts() {
            match host {
                Host::Tcp(name) => connection.host(name),
                Host::Unix(path) => connection.host_path(path),
            };
        }
        for port in self.admin.get_ports() {
            connection.port(*port);
        }
        connection
            .user(self.names.role(def.name))
            .dbname(&self.database);
        if let Some(password) = &self.password {
            connection.password(password);
        }
        let mut config =
            svcdb::Config::with_connection(connection, Ident::new("schema", def.schema)?);
        config.pool_min = 1;
        config.pool_max = 8;
        config.application_name = Some(format!("shop/{}", def.name));
        Ok(config)
    }
}
