//! The operator's side: the shop's databases and the services' roles, made with an admin
//! (superuser) connection to each server. Services never get that connection; each logs in as
//! its own role.
//!
//! Each service's schema lives where its [`Place`] says: by default all four in one database
//! (`--database` on the server of `--database-url`); `--database-url-for SERVICE=URL` moves one
//! to another database, on the same server or another. Nothing here assumes they share one:
//! every database is created, checked and dropped on its own server, and a role (which
//! belongs to a server, not to a database) is made and dropped on its service's server only.

use std::collections::HashMap;

use anyhow::Context as _;
use svcdb::tokio_postgres;
use svcdb::tokio_postgres::config::Host;
use svcdb::{DedicatedConn, Ident, Password, ProvisionReport, ProvisionSpec};

use crate::platform::{Names, ServiceDef};

/// The comment `shop demo` puts on its databases, so that `shop demo` and `shop clean` drop
/// only databases they made.
const DEMO_MARK: &str = "made by shop demo; `shop clean` removes it";

/// Where an admin connects to create and drop a database on a server of a `--database-url-for`
/// (the server's own database for that; every PostgreSQL has one).
const MAINTENANCE_DATABASE: &str = "postgres";

/// One `--database-url-for SERVICE=URL`: the service's schema lives on URL's server, in URL's
/// database (or, if the URL names none, in one named like the shop's). URL is an admin's on
/// that server: the demo creates the database and the service's role there.
#[derive(Clone, Debug)]
pub struct Placement {
    pub service: &'static str,
    /// The admin's settings; tokio-postgres's `Debug` leaves the password out.
    admin: tokio_postgres::Config,
}

impl Placement {
    /// Parses `SERVICE=URL`. The errors never repeat the URL, nor anything that may be a piece
    /// of it (a password).
    pub fn parse(value: &str, services: &[&'static ServiceDef]) -> Result<Self, String> {
        let Some((service, url)) = value.split_once('=') else {
            return Err(
                "expected SERVICE=URL, e.g. catalog=postgres://postgres@db2:5432/shop_catalog"
                    .into(),
            );
        };
        let known = services.iter().find(|def| def.name == service);
        let names = || {
            let names: Vec<&str> = services.iter().map(|def| def.name).collect();
            names.join(", ")
        };
        let Some(def) = known else {
            // Only a word is repeated: text before a '=' in a URL's parameters holds its
            // credentials.
            let word = !service.is_empty()
                && service
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_');
            return Err(if word {
                format!(
                    "there is no service {service:?}; the services are {}",
                    names()
                )
            } else {
                format!("expected SERVICE=URL with SERVICE one of {}", names())
            });
        };
        let admin = svcdb::parse_url(url).map_err(|e| match e {
            svcdb::Error::Config { message, .. } => format!("the URL for {service}: {message}"),
            _ => format!("the URL for {service} cannot be parsed"),
        })?;
        if admin.get_hosts().is_empty() {
            return Err(format!(
                "the URL for {service} names no server; expected postgres://user@host:port/database"
            ));
        }
        Ok(Self {
            service: def.name,
            admin,
        })
    }
}

/// Where one service's schema lives: a database on a server, and an admin's way in.
#[derive(Clone)]
pub struct Place {
    /// The admin's connection settings, to the server's maintenance database.
    admin: tokio_postgres::Config,
    /// The database holding the service's schema.
    pub database: String,
}

impl Place {
    /// `host:port` of the server, what two places on one server share.
    fn address(&self) -> String {
        let host = match self.admin.get_hosts().first() {
            Some(Host::Tcp(host)) => host.clone(),
            Some(Host::Unix(path)) => path.display().to_string(),
            None => "localhost".into(),
        };
        let port = self.admin.get_ports().first().copied().unwrap_or(5432);
        format!("{host}:{port}")
    }

    /// `user@host:port`, for messages (never a password).
    pub fn server(&self) -> String {
        format!(
            "{}@{}",
            self.admin.get_user().unwrap_or("postgres"),
            self.address()
        )
    }

    /// Whether `other` is the same database on the same server.
    pub fn same(&self, other: &Place) -> bool {
        self.address() == other.address() && self.database == other.database
    }

    /// A psql command line for the database as the admin.
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

    /// The admin's connection to the server's maintenance database.
    async fn maintenance(&self) -> anyhow::Result<DedicatedConn> {
        DedicatedConn::connect(&self.admin)
            .await
            .with_context(|| format!("connecting to {} as the admin", self.server()))
    }

    /// The admin's connection to this database, for provisioning.
    async fn admin(&self) -> anyhow::Result<DedicatedConn> {
        let mut config = self.admin.clone();
        config.dbname(&self.database);
        DedicatedConn::connect(&config).await.with_context(|| {
            format!(
                "connecting to database {} on {} as the admin",
                self.database,
                self.server()
            )
        })
    }
}

/// The shop's databases and the roles of its services.
pub struct Deployment {
    /// The shop's database: where every service's schema lives unless placed elsewhere, and
    /// the name of the roles, exchanges and queues (see [`Names`]).
    pub database: String,
    pub names: Names,
    /// The shop's database on `--database-url`'s server: where every service not placed
    /// elsewhere lives.
    home: Place,
    /// Where each service's schema lives, by service name.
    places: HashMap<&'static str, Place>,
    /// The services' password, if they use one (sent only as a SCRAM verifier).
    password: Option<String>,
}

impl Deployment {
    /// `admin_url` is a superuser's (or a role with CREATEDB and CREATEROLE); `database` is the
    /// shop's database and names the roles, exchanges and queues (see [`Names`]). Each of
    /// `placements` puts a service's schema elsewhere; the others live in `database` on
    /// `admin_url`'s server.
    pub fn new(
        admin_url: &str,
        database: &str,
        password: Option<String>,
        services: &[&'static ServiceDef],
        placements: &[Placement],
    ) -> anyhow::Result<Self> {
        let admin = svcdb::parse_url(admin_url).context("--database-url")?;
        let default = Place {
            admin,
            database: database.to_owned(),
        };
        let mut places: HashMap<&'static str, Place> = services
            .iter()
            .map(|def| (def.name, default.clone()))
            .collect();
        let mut placed = Vec::new();
        for placement in placements {
            anyhow::ensure!(
                !placed.contains(&placement.service),
                "--database-url-for {} is given twice; give each service one place",
                placement.service
            );
            placed.push(placement.service);
            let mut admin = placement.admin.clone();
            let database = admin
                .get_dbname()
                .filter(|name| !name.is_empty())
                .unwrap_or(database)
                .to_owned();
            admin.dbname(MAINTENANCE_DATABASE);
            places.insert(placement.service, Place { admin, database });
        }
        let deployment = Self {
            database: database.to_owned(),
            names: Names::new(database).context("--database")?,
            home: default,
            places,
            password,
        };
        for place in deployment.databases() {
            place.database_ident()?;
        }
        Ok(deployment)
    }

    /// Where the service's schema lives.
    pub fn place(&self, def: &ServiceDef) -> &Place {
        &self.places[def.name]
    }

    /// The shop's database on `--database-url`'s server, the place of every service not
    /// placed elsewhere.
    pub fn home(&self) -> &Place {
        &self.home
    }

    /// Whether every service lives in the one database.
    pub fn is_one_database(&self) -> bool {
        let home = self.home();
        self.places.values().all(|place| place.same(home))
    }

    /// Each database holding a service's schema, once, in a stable order.
    pub fn databases(&self) -> Vec<&Place> {
        let mut all: Vec<&Place> = Vec::new();
        let mut sorted: Vec<(&&'static str, &Place)> = self.places.iter().collect();
        sorted.sort_by_key(|(name, _)| **name);
        for (_, place) in sorted {
            if !all.iter().any(|seen| seen.same(place)) {
                all.push(place);
            }
        }
        all
    }

    /// Each database with the services' roles that live in it: what the fault injector
    /// terminates (each server's admin sees its own backends only).
    pub fn backends(&self) -> Vec<(tokio_postgres::Config, String, Vec<String>)> {
        self.databases()
            .into_iter()
            .map(|place| {
                let mut roles: Vec<String> = self
                    .places
                    .iter()
                    .filter(|(_, p)| p.same(place))
                    .map(|(name, _)| self.names.role(name))
                    .collect();
                roles.sort();
                (place.admin.clone(), place.database.clone(), roles)
            })
            .collect()
    }

    /// Drops the databases and the services' roles if they exist (a previous run), then
    /// creates the databases. Returns whether there was one to drop.
    pub async fn recreate(&self, services: &[&ServiceDef]) -> anyhow::Result<bool> {
        let existed = self.drop(services).await?;
        for place in self.databases() {
            let db = place.database_ident()?;
            let maintenance = place.maintenance().await?;
            // Two messages: CREATE DATABASE cannot share the implicit transaction of one.
            for sql in [
                format!("CREATE DATABASE {db}"),
                format!("COMMENT ON DATABASE {db} IS '{DEMO_MARK}'"),
            ] {
                maintenance.batch_execute(&sql).await.with_context(|| {
                    format!("creating database {} on {}", place.database, place.server())
                })?;
            }
        }
        Ok(existed)
    }

    /// Whether any of the deployment's databases exists, after checking that every one that
    /// does was made by `shop demo` (its comment): a refusal before anything is removed, the
    /// broker's queues included (found by a user trial: `shop clean` deleted a live system's
    /// queues, dead letters and all, then refused its database).
    pub async fn ensure_demo_made(&self) -> anyhow::Result<bool> {
        let mut existed = false;
        for place in self.databases() {
            let admin = place.maintenance().await?;
            let mark: Option<Option<String>> = admin
                .query_opt(
                    "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = $1",
                    &[&place.database],
                )
                .await?
                .map(|row| row.get(0));
            existed |= mark.is_some();
            // Never drop a database the demo did not make: `shop` is a likely name for a
            // user's own.
            if let Some(mark) = mark {
                anyhow::ensure!(
                    mark.as_deref() == Some(DEMO_MARK),
                    "database {} on {} exists and was not made by `shop demo`, so it is left alone\n  \
                     hint: pass --database (or the database of --database-url-for) with another name, or drop it yourself if it is expendable",
                    place.database,
                    place.server()
                );
            }
        }
        Ok(existed)
    }

    /// Drops the databases (disconnecting whoever is still in them), then the services'
    /// roles, each on its service's server. Returns whether any database existed. Checks every
    /// database before dropping any ([`Self::ensure_demo_made`]), so a refusal leaves them all
    /// as they were.
    pub async fn drop(&self, services: &[&ServiceDef]) -> anyhow::Result<bool> {
        let existed = self.ensure_demo_made().await?;
        for place in self.databases() {
            let db = place.database_ident()?;
            place
                .maintenance()
                .await?
                .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                .await
                .with_context(|| {
                    format!("dropping database {} on {}", place.database, place.server())
                })?;
        }
        // A role belongs to its server, not to a database: each is dropped where its service
        // lives, after every database (its objects and settings lived only in its service's).
        // Every role that can go goes, then the first failure is the error (found by a user
        // trial: a role still owning objects in a database of another server, not named on
        // the command line, stopped the clean-up before the roles after it).
        let mut failed = None;
        for def in services {
            let role = Ident::new("role", &self.names.role(def.name))?;
            let place = self.place(def);
            let dropped = async {
                place
                    .maintenance()
                    .await?
                    .batch_execute(&format!("DROP ROLE IF EXISTS {role}"))
                    .await
                    .map_err(anyhow::Error::from)
            }
            .await;
            if let Err(e) = dropped {
                let dependent = e
                    .downcast_ref::<svcdb::tokio_postgres::Error>()
                    .and_then(|e| e.code())
                    == Some(&svcdb::SqlState::DEPENDENT_OBJECTS_STILL_EXIST);
                let hint = if dependent {
                    format!("\n  hint: it still owns objects in a database on another server, most likely one the run placed with --database-url-for {}=<URL>: pass the same --database-url-for to `shop clean`", def.name)
                } else {
                    String::new()
                };
                failed.get_or_insert(anyhow::anyhow!(
                    "dropping role {} on {}: {e:#}{hint}",
                    role.as_str(),
                    place.server()
                ));
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        Ok(existed)
    }

    /// The service's login role, owning its schema, with nothing granted to `PUBLIC`
    /// ([`svcdb::provision()`]), made on the service's server in its database.
    pub async fn provision(&self, def: &ServiceDef) -> anyhow::Result<ProvisionReport> {
        let mut spec = ProvisionSpec::new(&self.names.role(def.name), def.schema)?;
        spec.password = self.password.clone().map(Password::new);
        let mut admin = self.place(def).admin().await?;
        svcdb::provision(&mut admin, &spec)
            .await
            .with_context(|| format!("provisioning {}", def.name))
    }

    /// How a replica of the service connects, as the environment of `shop serve`: as its own
    /// role (DATABASE_URL without a password; the password, if any, in SVCDB_PASSWORD, which
    /// svcdb never logs), to its database on its server. Small pools: every replica of every
    /// service may share one PostgreSQL, and other users of the server need connections too.
    pub fn service_env(&self, def: &ServiceDef) -> Vec<(&'static str, String)> {
        let role = self.names.role(def.name);
        let place = self.place(def);
        let port = place.admin.get_ports().first().copied().unwrap_or(5432);
        let database = &place.database;
        let url = match place.admin.get_hosts().first() {
            Some(Host::Unix(path)) => format!(
                "postgres://{role}@/{database}?host={}&port={port}",
                path.display()
            ),
            Some(Host::Tcp(host)) => format!("postgres://{role}@{host}:{port}/{database}"),
            None => format!("postgres://{role}@localhost:{port}/{database}"),
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

    /// How the service connects: as its own role, to its database on its server, pinned to
    /// its schema. Small pools: four services may share one PostgreSQL.
    pub fn service_config(&self, def: &ServiceDef) -> anyhow::Result<svcdb::Config> {
        let place = self.place(def);
        // Host and port from the admin URL; nothing else of the admin's (their password is
        // not the service's).
        let mut connection = tokio_postgres::Config::new();
        for host in place.admin.get_hosts() {
            match host {
                Host::Tcp(name) => connection.host(name),
                Host::Unix(path) => connection.host_path(path),
            };
        }
        for port in place.admin.get_ports() {
            connection.port(*port);
        }
        connection
            .user(self.names.role(def.name))
            .dbname(&place.database);
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
