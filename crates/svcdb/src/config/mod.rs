//! Configuration of one service's database access, from code or from the environment.
//!
//! | concept | where |
//! |---|---|
//! | the [`Config`] struct, its defaults, its checks, what each connection is opened with | here |
//! | reading it from the environment ([`Config::from_env`]) | `env` |
//! | parsing a `DATABASE_URL` for the driver, and naming its hosts without the password | `url` |
//! | the libpq keys svcdb reads out of the URL itself: `sslmode`, `sslrootcert`, `target_session_attrs` | `url_params` |
//! | how a duration setting is spelled, and the longest wait a deadline is computed for | `duration` |

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::ident::Ident;
use crate::tls::{is_system_roots, TlsMode};
use tokio_postgres::config::TargetSessionAttrs;

mod duration;
mod env;
mod url;
mod url_params;

pub use duration::{capped_wait, human_duration, parse_duration, saturating_secs_f64, MAX_WAIT};
pub use url::{describe_target, parse_url};
use url_params::UrlParams;

/// How one service reaches its slice of the database.
///
/// Build it with [`Config::new`] or [`Config::from_env`], adjust the public fields, and hand it
/// to [`ServiceDb::connect`](crate::ServiceDb::connect), which validates it. `Debug` never shows
/// the password.
///
/// | environment variable | field | default | meaning |
/// |---|---|---|---|
/// | `DATABASE_URL` | [`Config::connection`] | (required) | `postgres://user[:password]@host[:port]/dbname`, or `key=value` pairs; several hosts: `postgres://user@h1:5432,h2:5433/dbname` or `host=h1,h2 port=5432,5433` |
/// | `DATABASE_URL`'s `target_session_attrs`, else `PGTARGETSESSIONATTRS` | [`Config::target_session_attrs`] | `read-write` with several hosts, else `any` | which server to keep: `read-write` (the primary), `any`, `read-only` (below) |
/// | `DATABASE_URL`'s `sslmode`, else `PGSSLMODE` | [`Config::tls`] | `disable` | libpq's: `disable`, `allow`, `prefer`, `require`, `verify-ca`, `verify-full` (below) |
/// | `DATABASE_URL`'s `sslrootcert`, else `PGSSLROOTCERT` | [`Config::ssl_root_cert`] | none | PEM file of the CA that signed the server's certificate (required by `verify-ca` and `verify-full`); `system`: the system's roots (`verify-full` only) |
/// | `SVCDB_PASSWORD`, `PGPASSWORD` | (password) | none | used when the URL carries no password, so it stays out of URLs |
/// | `SVCDB_SCHEMA` | [`Config::schema`] | (required) | the service's schema, pinned on every connection |
/// | `SVCDB_EXTRA_SCHEMAS` | [`Config::extra_schemas`] | none | comma-separated schemas appended to the search path (`public`, `extensions`) |
/// | `SVCDB_CREATE_SCHEMA` | [`Config::create_schema`] | `false` | create the schema at connect time if it is missing |
/// | `SVCDB_POOL_MIN` | [`Config::pool_min`] | `5` | connections opened at start and kept open while idle |
/// | `SVCDB_POOL_MAX` | [`Config::pool_max`] | `25` | most connections open at once |
/// | `SVCDB_ACQUIRE_TIMEOUT` | [`Config::acquire_timeout`] | `5s` | longest wait for a connection before an error |
/// | `SVCDB_CONNECT_TIMEOUT` | [`Config::connect_timeout`] | `3s` | longest wait for one connection attempt to one host (each host named gets this long); a URL's `connect_timeout` sets it too |
/// | `SVCDB_IDLE_TIMEOUT` | [`Config::idle_timeout`] | `10m` | close connections idle this long (above `pool_min`); `0` disables |
/// | `SVCDB_MAX_LIFETIME` | [`Config::max_lifetime`] | `30m` | close connections this old, once idle; `0` disables |
/// | `SVCDB_MAX_LIFETIME_JITTER` | [`Config::max_lifetime_jitter`] | `2m` | up to this much added per connection so they don't all expire at once |
/// | `SVCDB_VERIFY_AFTER_IDLE` | [`Config::verify_after_idle`] | `1s` | a connection idle longer than this is pinged before it is handed out |
/// | `SVCDB_APPLICATION_NAME` | [`Config::application_name`] | `svcdb/<schema>` | shown in `pg_stat_activity` |
///
/// Durations take a unit (`500ms`, `5s`, `2m`, `1h`); a bare number means seconds.
///
/// `sslmode` and `sslrootcert` go in the URL's query (`?sslmode=verify-full&sslrootcert=ca.pem`)
/// or among the `key=value` pairs, as for libpq; svcdb takes them out and hands the rest to the
/// driver. What each mode encrypts and checks: [`TlsMode`](crate::TlsMode).
///
/// With several hosts, each connection goes to the first host, in order, that answers and
/// passes `target_session_attrs` (`SHOW transaction_read_only`, as libpq before 14). svcdb
/// defaults to `read-write` there, unlike libpq's `any`: its services write on every
/// connection, and a standby first in the list would otherwise take them all. libpq 14's
/// `primary`, `standby` and `prefer-standby` are refused (the driver lacks them), with what to
/// write instead. After a failover, pooled connections to a server that no longer accepts
/// writes are retired (see [`ServiceDb`](crate::ServiceDb)) and new ones find the new primary.
#[derive(Clone)]
pub struct Config {
    /// Host, port, user, password and database. Its password is never printed. Its `ssl_mode`
    /// is not used: [`tls`](Self::tls) decides.
    pub connection: tokio_postgres::Config,
    /// Whether to encrypt, and what to check of the server's certificate: libpq's `sslmode`.
    /// Default: `disable` ([`TlsMode::Require`] when built with
    /// [`with_connection`](Self::with_connection) from a driver config whose `ssl_mode` is
    /// `Require`).
    pub tls: TlsMode,
    /// PEM file of the root certificates the server's must chain to (libpq's `sslrootcert`);
    /// `system` means the system's roots (with `verify-full` only). Read by `require`,
    /// `verify-ca` and `verify-full` only, when the pool is built. Default: none, which
    /// `verify-ca` and `verify-full` refuse, as libpq does.
    pub ssl_root_cert: Option<PathBuf>,
    /// The service's schema: first on the search path of every connection. Required.
    pub schema: Ident,
    /// Schemas searched after the service schema, in order (e.g. `public` for shared
    /// extension types). Default: none.
    pub extra_schemas: Vec<Ident>,
    /// Create the schema when connecting if it does not exist. Default: false (in production
    /// the schema is made by `svcdb provision`, owned by the service's role).
    pub create_schema: bool,
    /// Connections opened at start and kept open while idle. Default: 5.
    pub pool_min: usize,
    /// Most connections open at once. Default: 25.
    pub pool_max: usize,
    /// Longest wait for a connection from the pool, including opening one. Default: 5 s.
    pub acquire_timeout: Duration,
    /// Longest wait for one attempt to open a connection to one host; with several hosts,
    /// each gets this long ([`connect_attempt_timeout`](Self::connect_attempt_timeout)).
    /// Default: 3 s.
    pub connect_timeout: Duration,
    /// Close connections idle longer than this, down to `pool_min`. Default: 10 min.
    pub idle_timeout: Option<Duration>,
    /// Close connections older than this when they are next idle. Default: 30 min.
    pub max_lifetime: Option<Duration>,
    /// Up to this much is added to `max_lifetime`, differently for each connection, so that
    /// connections opened together do not all close together. Default: 2 min.
    pub max_lifetime_jitter: Duration,
    /// A connection idle for longer than this is checked with an empty query before it is
    /// handed out (a busy connection is not: it proved itself moments ago). Default: 1 s.
    pub verify_after_idle: Duration,
    /// Shown in `pg_stat_activity.application_name`. Default: `svcdb/<schema>`.
    pub application_name: Option<String>,
}

impl Config {
    /// A configuration with the documented defaults for `database_url` and `schema`; the URL's
    /// `sslmode` and `sslrootcert` set [`tls`](Self::tls) and
    /// [`ssl_root_cert`](Self::ssl_root_cert).
    pub fn new(database_url: &str, schema: &str) -> Result<Self> {
        Self::with_url_defaults(database_url, schema, UrlParams::default())
    }

    /// [`new`](Self::new), with `defaults` standing in for the keys the URL does not set
    /// (libpq's `PGSSLMODE`, `PGSSLROOTCERT` and `PGTARGETSESSIONATTRS`: the URL wins, as in
    /// libpq).
    fn with_url_defaults(database_url: &str, schema: &str, defaults: UrlParams) -> Result<Self> {
        let url = UrlParams::take(database_url)?;
        let mut connection = parse_url(&url.rest)?;
        match url.session_attrs.or(defaults.session_attrs) {
            Some(attrs) => {
                connection.target_session_attrs(attrs);
            }
            // libpq's default is `any`: the first host that answers, even a standby. Every
            // svcdb service writes (claims, outbox, migrations), and after a failover the old
            // primary may come back as a standby first in the list, so several hosts mean
            // "the one that accepts writes" unless the URL says otherwise.
            None if connection.get_hosts().len() > 1 => {
                connection.target_session_attrs(TargetSessionAttrs::ReadWrite);
            }
            None => {}
        }
        let mut config = Self::with_connection(connection, Ident::new("schema", schema)?);
        let root = url.root_cert.or(defaults.root_cert);
        config.tls = match (url.mode.or(defaults.mode), &root) {
            (Some(mode), _) => mode,
            // libpq 16: the system's roots make verify-full the default.
            (None, Some(root)) if is_system_roots(root) => TlsMode::VerifyFull,
            (None, _) => TlsMode::Disable,
        };
        config.ssl_root_cert = root;
        Ok(config)
    }

    /// A configuration with the documented defaults for an already parsed connection.
    pub fn with_connection(connection: tokio_postgres::Config, schema: Ident) -> Self {
        // A URL's own `connect_timeout=N` (libpq's) is the default, as libpq users expect;
        // SVCDB_CONNECT_TIMEOUT, read after, still wins.
        let connect_timeout = connection
            .get_connect_timeout()
            .copied()
            .filter(|d| !d.is_zero())
            .unwrap_or(Duration::from_secs(3));
        Self {
            tls: TlsMode::of_driver_config(&connection),
            ssl_root_cert: None,
            connection,
            schema,
            extra_schemas: Vec::new(),
            create_schema: false,
            pool_min: 5,
            pool_max: 25,
            acquire_timeout: Duration::from_secs(5),
            connect_timeout,
            idle_timeout: Some(Duration::from_secs(600)),
            max_lifetime: Some(Duration::from_secs(1800)),
            max_lifetime_jitter: Duration::from_secs(120),
            verify_after_idle: Duration::from_secs(1),
            application_name: None,
        }
    }

    /// Checks the settings against each other; [`ServiceDb::connect`](crate::ServiceDb::connect)
    /// calls it too. An error's key names the field and the variable that sets it (found by a
    /// user trial: `SVCDB_POOL_MAX=0` was told `pool_max: must be at least 1`).
    pub fn validate(&self) -> Result<()> {
        crate::tls::check_root_cert(self.tls, self.ssl_root_cert.as_deref())?;
        if self.pool_max == 0 {
            return Err(Error::config(
                "pool_max (SVCDB_POOL_MAX)",
                "must be at least 1",
            ));
        }
        if self.pool_min > self.pool_max {
            return Err(Error::config(
                "pool_min (SVCDB_POOL_MIN)",
                format!(
                    "{} is more than pool_max ({}); lower SVCDB_POOL_MIN or raise SVCDB_POOL_MAX",
                    self.pool_min, self.pool_max
                ),
            ));
        }
        if self.acquire_timeout.is_zero() {
            return Err(Error::config(
                "acquire_timeout (SVCDB_ACQUIRE_TIMEOUT)",
                "must be more than zero: a pool must never wait forever",
            ));
        }
        if self.connect_timeout.is_zero() {
            return Err(Error::config(
                "connect_timeout (SVCDB_CONNECT_TIMEOUT)",
                "must be more than zero",
            ));
        }
        if self.connection.get_user().is_none() {
            return Err(Error::config(
                "DATABASE_URL",
                "names no user; write postgres://user@host/dbname",
            ));
        }
        let (hosts, ports) = (
            self.connection.get_hosts().len(),
            self.connection.get_ports().len(),
        );
        if hosts == 0 {
            return Err(Error::config(
                "DATABASE_URL",
                "names no host; write postgres://user@host/dbname",
            ));
        }
        // The driver would refuse it only at connect time, as a connection error.
        if ports > 1 && ports != hosts {
            return Err(Error::config(
                "DATABASE_URL",
                format!("names {hosts} hosts and {ports} ports; give one port for all hosts, or one per host (postgres://user@h1:5432,h2:5433/dbname, or host=h1,h2 port=5432,5433)"),
            ));
        }
        Ok(())
    }

    /// The longest one attempt to open a connection may take: `connect_timeout` for each host
    /// `DATABASE_URL` names, since the driver tries them in turn, each with the full
    /// `connect_timeout`. With a single bound, a primary that vanished (packets dropped, not
    /// refused) would use all of it and the standby named after it would never be tried.
    pub fn connect_attempt_timeout(&self) -> Duration {
        let hosts = u32::try_from(self.connection.get_hosts().len())
            .unwrap_or(u32::MAX)
            .max(1);
        self.connect_timeout.saturating_mul(hosts)
    }

    /// What `target_session_attrs` asks of each server (from `DATABASE_URL`, else
    /// `PGTARGETSESSIONATTRS`; with several hosts and neither, `read-write`).
    pub fn target_session_attrs(&self) -> TargetSessionAttrs {
        self.connection.get_target_session_attrs()
    }

    /// The search path every connection gets: the service schema, then the extra schemas.
    pub fn search_path(&self) -> Vec<Ident> {
        std::iter::once(self.schema.clone())
            .chain(self.extra_schemas.iter().cloned())
            .collect()
    }

    /// `user@host:port/dbname`, for messages; never the password.
    pub fn target(&self) -> String {
        describe_target(&self.connection)
    }

    /// The driver configuration with the schema pinned as a startup option, so it holds for
    /// the whole session and survives `RESET ALL`, `DISCARD ALL` and pool recycling.
    pub fn session_config(&self) -> tokio_postgres::Config {
        let mut pg = self.connection.clone();
        let path = self
            .search_path()
            .iter()
            .map(Ident::as_str)
            .collect::<Vec<_>>()
            .join(",");
        // Startup options are split on whitespace; validated names hold none.
        let pin = format!("-c search_path={path}");
        let options = match pg.get_options() {
            Some(existing) if !existing.trim().is_empty() => format!("{existing} {pin}"),
            _ => pin,
        };
        pg.options(options);
        pg.application_name(
            self.application_name
                .clone()
                .unwrap_or_else(|| format!("svcdb/{}", self.schema.as_str())),
        );
        pg.connect_timeout(self.connect_timeout);
        pg
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("target", &self.target())
            .field(
                "password",
                &self.connection.get_password().map(|_| "<redacted>"),
            )
            .field("tls", &self.tls)
            .field("ssl_root_cert", &self.ssl_root_cert)
            .field("schema", &self.schema)
            .field("extra_schemas", &self.extra_schemas)
            .field("create_schema", &self.create_schema)
            .field("pool_min", &self.pool_min)
            .field("pool_max", &self.pool_max)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_lifetime", &self.max_lifetime)
            .field("max_lifetime_jitter", &self.max_lifetime_jitter)
            .field("verify_after_idle", &self.verify_after_idle)
            .field("application_name", &self.application_name)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = Config::new("postgres://svc@127.0.0.1/shop", "catalog").unwrap();
        assert_eq!((c.pool_min, c.pool_max), (5, 25));
        assert_eq!(c.acquire_timeout, Duration::from_secs(5));
        assert!(c.extra_schemas.is_empty());
        assert_eq!(c.target(), "svc@127.0.0.1:5432/shop");
    }

    /// Found by a robustness trial: `?connect_timeout=2` in the URL was ignored (always 3 s).
    #[test]
    fn the_urls_connect_timeout_is_the_default() {
        let c = Config::new("postgres://svc@db/shop?connect_timeout=2", "orders").unwrap();
        assert_eq!(c.connect_timeout, Duration::from_secs(2));
        let c = Config::new("postgres://svc@db/shop", "orders").unwrap();
        assert_eq!(c.connect_timeout, Duration::from_secs(3), "the control");
    }

    #[test]
    fn a_driver_config_asking_for_tls_keeps_asking() {
        let pg = parse_url("postgres://svc@db/shop?sslmode=require").unwrap();
        let c = Config::with_connection(pg, Ident::new("schema", "orders").unwrap());
        assert_eq!(c.tls, TlsMode::Require);
        let pg = parse_url("postgres://svc@db/shop").unwrap();
        let c = Config::with_connection(pg, Ident::new("schema", "orders").unwrap());
        assert_eq!(c.tls, TlsMode::Disable);
    }

    #[test]
    fn several_hosts_default_to_the_one_that_accepts_writes() {
        let attrs = |url: &str| Config::new(url, "orders").unwrap().target_session_attrs();
        assert_eq!(
            attrs("postgres://svc@h1,h2/shop"),
            TargetSessionAttrs::ReadWrite
        );
        assert_eq!(attrs("host=h1,h2 user=svc"), TargetSessionAttrs::ReadWrite);
        // One host: libpq's default, whatever the server is.
        assert_eq!(attrs("postgres://svc@h1/shop"), TargetSessionAttrs::Any);
        // Said explicitly, it holds, in the URL's query or among the pairs.
        assert_eq!(
            attrs("postgres://svc@h1,h2/shop?target_session_attrs=any"),
            TargetSessionAttrs::Any
        );
        assert_eq!(
            attrs("host=h1 user=svc target_session_attrs=read-write"),
            TargetSessionAttrs::ReadWrite
        );
        assert_eq!(
            attrs("postgres://svc@h1,h2/shop?application_name=x&target_session_attrs=read-only"),
            TargetSessionAttrs::ReadOnly
        );
        let c = Config::new(
            "postgres://svc@h1,h2/shop?application_name=x&target_session_attrs=read-only",
            "orders",
        )
        .unwrap();
        assert_eq!(c.connection.get_application_name(), Some("x"));
    }

    #[test]
    fn a_port_count_that_matches_neither_one_nor_the_hosts_is_refused() {
        let c = Config::new("host=h1,h2,h3 port=5441,5442 user=svc", "orders").unwrap();
        match c.validate() {
            Err(Error::Config { key, message }) => {
                assert_eq!(key, "DATABASE_URL");
                assert!(message.contains("3 hosts and 2 ports"), "{message}");
            }
            other => panic!("expected a config error, got {other:?}"),
        }
        Config::new("host=h1,h2,h3 port=5441 user=svc", "orders")
            .unwrap()
            .validate()
            .unwrap();
    }

    #[test]
    fn one_connection_attempt_may_try_every_host() {
        let mut c = Config::new("postgres://svc@h1,h2,h3/shop", "orders").unwrap();
        c.connect_timeout = Duration::from_secs(2);
        assert_eq!(c.connect_attempt_timeout(), Duration::from_secs(6));
        let c = Config::new("postgres://svc@h1/shop", "orders").unwrap();
        assert_eq!(c.connect_attempt_timeout(), c.connect_timeout);
    }

    #[test]
    fn password_never_printed() {
        let secret = "hunter2-very-secret";
        let c = Config::new(&format!("postgres://svc:{secret}@db/shop"), "orders").unwrap();
        let shown = format!("{c:?} {}", c.target());
        assert!(!shown.contains(secret), "{shown}");
        assert!(shown.contains("<redacted>"));
        let bad = parse_url(&format!("postgres://svc:{secret}@db:notaport/shop")).unwrap_err();
        assert!(!bad.to_string().contains(secret), "{bad}");
        assert!(!format!("{bad:?}").contains(secret));
    }
}
