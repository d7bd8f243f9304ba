//! Configuration of one service's database access, from code or from the environment.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::ident::Ident;
use crate::tls::{is_system_roots, TlsMode};
use tokio_postgres::config::TargetSessionAttrs;

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
/// | `SVCDB_CONNECT_TIMEOUT` | [`Config::connect_timeout`] | `3s` | longest wait for one connection attempt to one host (each host named gets this long) |
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
            connect_timeout: Duration::from_secs(3),
            idle_timeout: Some(Duration::from_secs(600)),
            max_lifetime: Some(Duration::from_secs(1800)),
            max_lifetime_jitter: Duration::from_secs(120),
            verify_after_idle: Duration::from_secs(1),
            application_name: None,
        }
    }

    /// Reads the configuration from the process environment (see the module table).
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|key| std::env::var(key).ok())
    }

    /// Reads the configuration through `lookup` (the environment, a map in tests, …).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let get = |key: &str| lookup(key).filter(|v| !v.trim().is_empty());
        let url = get("DATABASE_URL").ok_or_else(|| {
            Error::config(
                "DATABASE_URL",
                "not set; set it to postgres://user@host:5432/dbname",
            )
        })?;
        let schema = get("SVCDB_SCHEMA").ok_or_else(|| {
            Error::config("SVCDB_SCHEMA", "not set; set it to the service's schema")
        })?;
        // An environment that sets libpq's variables for psql expects them honoured here too:
        // ignoring PGSSLMODE=require would connect unencrypted without a word.
        let url_defaults = UrlParams {
            mode: get("PGSSLMODE")
                .map(|v| TlsMode::parse_setting("PGSSLMODE", v.trim()))
                .transpose()?,
            root_cert: get("PGSSLROOTCERT").map(PathBuf::from),
            session_attrs: get("PGTARGETSESSIONATTRS")
                .map(|v| parse_session_attrs("PGTARGETSESSIONATTRS", &v))
                .transpose()?,
            ..UrlParams::default()
        };
        let mut config = Self::with_url_defaults(&url, &schema, url_defaults)?;
        if config.connection.get_password().is_none() {
            if let Some(pw) = get("SVCDB_PASSWORD").or_else(|| get("PGPASSWORD")) {
                config.connection.password(pw);
            }
        }
        if let Some(v) = get("SVCDB_EXTRA_SCHEMAS") {
            config.extra_schemas = Ident::parse_list("schema", &v)?;
        }
        if let Some(v) = get("SVCDB_CREATE_SCHEMA") {
            config.create_schema = parse_bool("SVCDB_CREATE_SCHEMA", &v)?;
        }
        if let Some(v) = get("SVCDB_POOL_MIN") {
            config.pool_min = parse_count("SVCDB_POOL_MIN", &v)?;
        }
        if let Some(v) = get("SVCDB_POOL_MAX") {
            config.pool_max = parse_count("SVCDB_POOL_MAX", &v)?;
        }
        if let Some(v) = get("SVCDB_ACQUIRE_TIMEOUT") {
            config.acquire_timeout = parse_duration("SVCDB_ACQUIRE_TIMEOUT", &v)?;
        }
        if let Some(v) = get("SVCDB_CONNECT_TIMEOUT") {
            config.connect_timeout = parse_duration("SVCDB_CONNECT_TIMEOUT", &v)?;
        }
        if let Some(v) = get("SVCDB_IDLE_TIMEOUT") {
            config.idle_timeout = parse_optional_duration("SVCDB_IDLE_TIMEOUT", &v)?;
        }
        if let Some(v) = get("SVCDB_MAX_LIFETIME") {
            config.max_lifetime = parse_optional_duration("SVCDB_MAX_LIFETIME", &v)?;
        }
        if let Some(v) = get("SVCDB_MAX_LIFETIME_JITTER") {
            config.max_lifetime_jitter = parse_duration("SVCDB_MAX_LIFETIME_JITTER", &v)?;
        }
        if let Some(v) = get("SVCDB_VERIFY_AFTER_IDLE") {
            config.verify_after_idle = parse_duration("SVCDB_VERIFY_AFTER_IDLE", &v)?;
        }
        config.application_name = get("SVCDB_APPLICATION_NAME");
        config.validate()?;
        Ok(config)
    }

    /// Checks the settings against each other; [`ServiceDb::connect`](crate::ServiceDb::connect)
    /// calls it too.
    pub fn validate(&self) -> Result<()> {
        crate::tls::check_root_cert(self.tls, self.ssl_root_cert.as_deref())?;
        if self.pool_max == 0 {
            return Err(Error::config("pool_max", "must be at least 1"));
        }
        if self.pool_min > self.pool_max {
            return Err(Error::config(
                "pool_min",
                format!(
                    "{} is more than pool_max ({}); lower SVCDB_POOL_MIN or raise SVCDB_POOL_MAX",
                    self.pool_min, self.pool_max
                ),
            ));
        }
        if self.acquire_timeout.is_zero() {
            return Err(Error::config(
                "acquire_timeout",
                "must be more than zero: a pool must never wait forever",
            ));
        }
        if self.connect_timeout.is_zero() {
            return Err(Error::config("connect_timeout", "must be more than zero"));
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

/// Parses a `DATABASE_URL` (URL or `key=value` form) as the driver does: of `sslmode` it knows
/// `disable`, `prefer` and `require`, and `sslrootcert` it refuses; [`Config::new`] takes every
/// libpq TLS setting. The error never repeats the input, which may hold a password.
pub fn parse_url(database_url: &str) -> Result<tokio_postgres::Config> {
    refuse_ambiguous_credentials(database_url)?;
    database_url.parse().map_err(|e: tokio_postgres::Error| {
        let why = std::error::Error::source(&e)
            .map(ToString::to_string)
            .unwrap_or_else(|| e.to_string());
        Error::config(
            "DATABASE_URL",
            format!(
                "cannot parse it ({}); expected postgres://user[:password]@host[:port]/dbname",
                without_input(&why)
            ),
        )
    })
}

/// Refuses a URL with more than one '@'. The driver (like libpq) ends the credentials at the
/// first: a second means a password (or user) with an unencoded '@', whose tail the driver
/// would take for the host, the database or a parameter, and print in errors.
fn refuse_ambiguous_credentials(database_url: &str) -> Result<()> {
    match url_body(database_url) {
        Some(body) if body.matches('@').count() > 1 => Err(Error::config(
            "DATABASE_URL",
            "holds more than one '@'; write an '@' in the user name, password or a parameter as %40",
        )),
        _ => Ok(()),
    }
}

/// A URL's text after `postgres://` or `postgresql://`; `None` for `key=value` pairs.
fn url_body(database_url: &str) -> Option<&str> {
    ["postgres://", "postgresql://"]
        .iter()
        .find_map(|prefix| database_url.strip_prefix(prefix))
}

/// libpq's connection keywords the driver does not know: an unknown option with one of these
/// names is named in the error; any other name may be a piece of a password (an unquoted
/// `password=` value with a space in it), so it is not.
const LIBPQ_ONLY_KEYWORDS: [&str; 24] = [
    "channel_binding",
    "client_encoding",
    "fallback_application_name",
    "gssdelegation",
    "gssencmode",
    "gsslib",
    "krbsrvname",
    "max_protocol_version",
    "min_protocol_version",
    "passfile",
    "replication",
    "require_auth",
    "requirepeer",
    "service",
    "ssl_max_protocol_version",
    "ssl_min_protocol_version",
    "sslcert",
    "sslcertmode",
    "sslcompression",
    "sslcrl",
    "sslcrldir",
    "sslkey",
    "sslpassword",
    "sslsni",
];

/// The driver's parse error without the parts of the input it repeats: an unknown option's
/// name (unless it is a libpq keyword) and the character it stumbled on. The rest of its
/// messages name only fixed option names.
fn without_input(why: &str) -> String {
    if let Some(name) = why
        .strip_prefix("unknown option `")
        .and_then(|rest| rest.strip_suffix('`'))
    {
        return if LIBPQ_ONLY_KEYWORDS.contains(&name) {
            format!("libpq's option `{name}`, which this driver does not support")
        } else {
            "an option it does not know, not named here since it may be part of a password; quote a password holding spaces: password='…'".into()
        };
    }
    match why.find(": expected `") {
        Some(cut) if why.starts_with("unexpected character") => why[..cut].to_owned(),
        _ => why.to_owned(),
    }
}

/// A `DATABASE_URL` with the libpq keys svcdb reads itself taken out: the driver knows only
/// three `sslmode` values, refuses `sslrootcert`, and knows three of libpq's six
/// `target_session_attrs` (svcdb says which and why). Everything else is left as written, for
/// the driver.
#[derive(Default)]
struct UrlParams {
    /// The URL or `key=value` string without `sslmode`, `sslrootcert` and
    /// `target_session_attrs`.
    rest: String,
    /// The last `sslmode`, parsed.
    mode: Option<TlsMode>,
    /// The last `sslrootcert`.
    root_cert: Option<PathBuf>,
    /// The last `target_session_attrs`, parsed.
    session_attrs: Option<TargetSessionAttrs>,
}

impl UrlParams {
    fn take(database_url: &str) -> Result<Self> {
        // Before anything is read from the query: with a stray '@' a piece of the password
        // would be read as a parameter (an sslrootcert path an error then names).
        refuse_ambiguous_credentials(database_url)?;
        let (rest, found) = match url_body(database_url) {
            Some(body) => take_from_url(database_url, body),
            None => take_from_pairs(database_url),
        };
        let mut params = Self {
            rest,
            ..Self::default()
        };
        for (key, value) in found {
            match key {
                OwnKey::Mode => params.mode = Some(value.parse()?),
                OwnKey::RootCert => params.root_cert = Some(PathBuf::from(value)),
                OwnKey::SessionAttrs => {
                    params.session_attrs =
                        Some(parse_session_attrs("target_session_attrs", &value)?)
                }
            }
        }
        Ok(params)
    }
}

/// The keys svcdb reads itself.
#[derive(Clone, Copy)]
enum OwnKey {
    Mode,
    RootCert,
    SessionAttrs,
}

impl OwnKey {
    fn of(key: &str) -> Option<Self> {
        match key {
            "sslmode" => Some(OwnKey::Mode),
            "sslrootcert" => Some(OwnKey::RootCert),
            "target_session_attrs" => Some(OwnKey::SessionAttrs),
            _ => None,
        }
    }
}

/// libpq's `target_session_attrs` (or `PGTARGETSESSIONATTRS`), as far as the driver
/// (tokio-postgres 0.7) implements it: `any`, `read-write` and `read-only`. It checks each
/// host with `SHOW transaction_read_only`, as libpq did before version 14. libpq 14's
/// `primary`, `standby` and `prefer-standby` (which read `in_hot_standby`) are refused with
/// what to write instead, rather than silently meaning something else.
fn parse_session_attrs(key: &str, value: &str) -> Result<TargetSessionAttrs> {
    let unsupported = |instead: &str| {
        Error::config(
            key,
            format!("`{value}` is libpq's, but svcdb's driver (tokio-postgres 0.7) does not support it; {instead}"),
        )
    };
    match value.trim() {
        "any" => Ok(TargetSessionAttrs::Any),
        "read-write" => Ok(TargetSessionAttrs::ReadWrite),
        "read-only" => Ok(TargetSessionAttrs::ReadOnly),
        "primary" => Err(unsupported(
            "write read-write, which finds the primary too (and also skips a primary made read-only with default_transaction_read_only)",
        )),
        "standby" => Err(unsupported(
            "write read-only to reach a server that refuses writes, such as a standby (for a service that only reads: svcdb's consumers, outbox and migrations write)",
        )),
        "prefer-standby" => Err(unsupported(
            "write read-only (a standby or nothing) or any (the first host that answers)",
        )),
        _ => Err(Error::config(
            key,
            format!("`{value}` is not a target_session_attrs value; write read-write (the primary), any or read-only"),
        )),
    }
}

/// Takes the TLS keys out of a URL's query. `body` is `url` after its scheme. The query is
/// found and split as the driver does: credentials run to the first `@`, the query starts at
/// the next `?`, a key runs to the next `=` and its value to the next `&`; keys and values are
/// percent-decoded.
fn take_from_url(url: &str, body: &str) -> (String, Vec<(OwnKey, String)>) {
    let body_start = url.len() - body.len();
    let after_credentials = body.find('@').map_or(body_start, |at| body_start + at + 1);
    let Some(question) = url[after_credentials..].find('?') else {
        return (url.to_owned(), Vec::new());
    };
    let query_start = after_credentials + question + 1;
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(|d| d.into_owned())
    };
    let (mut kept, mut found) = (Vec::new(), Vec::new());
    let mut query = &url[query_start..];
    while !query.is_empty() {
        let Some(eq) = query.find('=') else {
            kept.push(query); // the driver reports the unterminated parameter
            break;
        };
        let end = query[eq + 1..]
            .find('&')
            .map_or(query.len(), |amp| eq + 1 + amp);
        let (param, key, value) = (&query[..end], &query[..eq], &query[eq + 1..end]);
        match (
            decode(key).ok().as_deref().and_then(OwnKey::of),
            decode(value),
        ) {
            (Some(tls_key), Ok(value)) => found.push((tls_key, value)),
            // Not ours, or not decodable: the driver keeps or refuses it.
            _ => kept.push(param),
        }
        query = query.get(end + 1..).unwrap_or("");
    }
    let mut rest = url[..query_start - 1].to_owned();
    if !kept.is_empty() {
        rest.push('?');
        rest.push_str(&kept.join("&"));
    }
    (rest, found)
}

/// Takes the TLS keys out of `key=value` pairs, read as the driver reads them: whitespace
/// around `=` allowed, values either bare or in single quotes, `\` escaping the next
/// character. From the first thing the driver would refuse on, the text is left to it.
fn take_from_pairs(s: &str) -> (String, Vec<(OwnKey, String)>) {
    let (mut kept, mut found) = (Vec::new(), Vec::new());
    let mut chars = s.char_indices().peekable();
    let position = |chars: &mut std::iter::Peekable<std::str::CharIndices>| {
        chars.peek().map_or(s.len(), |&(i, _)| i)
    };
    loop {
        while chars.next_if(|&(_, c)| c.is_whitespace()).is_some() {}
        let start = position(&mut chars);
        while chars
            .next_if(|&(_, c)| !c.is_whitespace() && c != '=')
            .is_some()
        {}
        let key = &s[start..position(&mut chars)];
        if key.is_empty() {
            break;
        }
        while chars.next_if(|&(_, c)| c.is_whitespace()).is_some() {}
        let value = chars.next_if(|&(_, c)| c == '=').and_then(|_| {
            while chars.next_if(|&(_, c)| c.is_whitespace()).is_some() {}
            pair_value(&mut chars)
        });
        match (value, OwnKey::of(key)) {
            (Some(value), Some(tls_key)) => found.push((tls_key, value)),
            (Some(_), None) => kept.push(&s[start..position(&mut chars)]),
            (None, _) => {
                kept.push(&s[start..]);
                break;
            }
        }
    }
    (kept.join(" "), found)
}

/// One `key=value` value, unescaped: `'quoted'` or bare up to whitespace. `None` where the
/// driver would fail (nothing there, an unterminated quote).
fn pair_value(chars: &mut std::iter::Peekable<std::str::CharIndices>) -> Option<String> {
    let quoted = chars.next_if(|&(_, c)| c == '\'').is_some();
    let mut value = String::new();
    loop {
        match chars.peek() {
            None if quoted => return None,
            Some(&(_, '\'')) if quoted => {
                chars.next();
                return Some(value);
            }
            Some(&(_, c)) if !quoted && c.is_whitespace() => break,
            None => break,
            Some(_) => {}
        }
        let (_, c) = chars.next()?;
        if c == '\\' {
            if let Some((_, escaped)) = chars.next() {
                value.push(escaped);
            }
        } else {
            value.push(c);
        }
    }
    (!value.is_empty()).then_some(value)
}

/// `user@host:port/dbname` of a driver configuration, `user@h1:5432,h2:5433/dbname` with
/// several hosts; never the password.
pub fn describe_target(pg: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let ports = pg.get_ports();
    let hosts: Vec<String> = match pg.get_hosts() {
        [] => vec!["localhost".into()],
        hosts => hosts
            .iter()
            .map(|host| match host {
                Host::Tcp(h) => h.clone(),
                #[cfg(unix)]
                Host::Unix(p) => p.display().to_string(),
            })
            .collect(),
    };
    let hosts = hosts
        .iter()
        .enumerate()
        .map(|(i, host)| {
            // A host name never holds '@'; one that does came from a password with an
            // unencoded '@' in a URL the driver parsed (svcdb's own parsing refuses those):
            // keep only what follows.
            let host = host.rfind('@').map_or(host.as_str(), |at| &host[at + 1..]);
            // One port serves every host; otherwise each host has its own (as the driver
            // pairs them).
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            format!("{host}:{port}")
        })
        .collect::<Vec<_>>()
        .join(",");
    let user = pg.get_user().unwrap_or("?");
    let db = pg.get_dbname().unwrap_or(user);
    format!("{user}@{hosts}/{db}")
}

fn parse_count(key: &str, v: &str) -> Result<usize> {
    v.trim()
        .parse()
        .map_err(|_| Error::config(key, format!("{v:?} is not a whole number")))
}

fn parse_bool(key: &str, v: &str) -> Result<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(Error::config(key, format!("{v:?} is not true or false"))),
    }
}

/// Parses `500ms`, `5s`, `2m`, `1h` or a bare number of seconds. A negative, non-finite
/// (`NaN`, `inf`) or unrepresentable (`1e30`) value is an [`Error::Config`] naming `key`,
/// never a panic. A value this accepts may still be too long for a clock: deadlines computed
/// from it go through [`capped_wait`].
pub fn parse_duration(key: &str, v: &str) -> Result<Duration> {
    let v = v.trim();
    let bad = |why: String| Error::config(key, format!("{v:?} {why}; write e.g. 500ms, 5s or 2m"));
    match v.parse::<f64>() {
        // `Duration::from_secs_f64` panics on all of these; `try_` says which it was.
        Ok(secs) if secs.is_nan() => Err(bad("is not a number of seconds".into())),
        Ok(secs) if secs < 0.0 => Err(bad("is negative".into())),
        Ok(secs) => Duration::try_from_secs_f64(secs).map_err(|_| {
            bad(format!(
                "is more seconds than a duration holds (at most {})",
                u64::MAX
            ))
        }),
        Err(_) => humantime::parse_duration(v).map_err(|e| bad(format!("is not a duration ({e})"))),
    }
}

/// The longest wait svcdb computes a deadline for: 30 years, the cap tokio puts on its own
/// timers. Longer means "never" in practice, and `Instant::now() + wait` beyond what the
/// clock can represent panics.
pub const MAX_WAIT: Duration = Duration::from_secs(30 * 365 * 24 * 60 * 60);

/// `wait`, at most [`MAX_WAIT`]: what every deadline is computed from, so that a huge
/// configured timeout (`SVCDB_ACQUIRE_TIMEOUT=1e18`, `--lock-wait 1e19`) waits "forever"
/// instead of panicking in `Instant::now() + wait`.
pub fn capped_wait(wait: Duration) -> Duration {
    wait.min(MAX_WAIT)
}

/// `secs` seconds as a [`Duration`], saturating where `Duration::from_secs_f64` would panic:
/// zero for negative and `NaN`, [`Duration::MAX`] for too many. For values svcdb did not
/// parse itself (a `float8` read back from a table).
pub fn saturating_secs_f64(secs: f64) -> Duration {
    Duration::try_from_secs_f64(secs).unwrap_or(if secs > 0.0 {
        Duration::MAX
    } else {
        Duration::ZERO
    })
}

fn parse_optional_duration(key: &str, v: &str) -> Result<Option<Duration>> {
    let d = parse_duration(key, v)?;
    Ok((!d.is_zero()).then_some(d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = Config::new("postgres://svc@127.0.0.1/shop", "catalog").unwrap();
        assert_eq!((c.pool_min, c.pool_max), (5, 25));
        assert_eq!(c.acquire_timeout, Duration::from_secs(5));
        assert!(c.extra_schemas.is_empty());
        assert_eq!(c.target(), "svc@127.0.0.1:5432/shop");
    }

    #[test]
    fn reads_every_key_from_the_environment() {
        let c = Config::from_lookup(lookup(&[
            ("DATABASE_URL", "postgres://svc@db:6543/shop"),
            ("SVCDB_SCHEMA", "orders"),
            ("SVCDB_EXTRA_SCHEMAS", "public, extensions"),
            ("SVCDB_CREATE_SCHEMA", "yes"),
            ("SVCDB_POOL_MIN", "2"),
            ("SVCDB_POOL_MAX", "8"),
            ("SVCDB_ACQUIRE_TIMEOUT", "250ms"),
            ("SVCDB_CONNECT_TIMEOUT", "1"),
            ("SVCDB_IDLE_TIMEOUT", "0"),
            ("SVCDB_MAX_LIFETIME", "1h"),
            ("SVCDB_MAX_LIFETIME_JITTER", "10s"),
            ("SVCDB_VERIFY_AFTER_IDLE", "2s"),
            ("SVCDB_APPLICATION_NAME", "orders-api"),
            ("SVCDB_PASSWORD", "s3cret"),
        ]))
        .unwrap();
        assert_eq!(c.schema.as_str(), "orders");
        assert_eq!(c.extra_schemas.len(), 2);
        assert!(c.create_schema);
        assert_eq!((c.pool_min, c.pool_max), (2, 8));
        assert_eq!(c.acquire_timeout, Duration::from_millis(250));
        assert_eq!(c.connect_timeout, Duration::from_secs(1));
        assert_eq!(c.idle_timeout, None);
        assert_eq!(c.max_lifetime, Some(Duration::from_secs(3600)));
        assert_eq!(c.max_lifetime_jitter, Duration::from_secs(10));
        assert_eq!(c.verify_after_idle, Duration::from_secs(2));
        assert_eq!(c.application_name.as_deref(), Some("orders-api"));
        assert_eq!(c.connection.get_password(), Some(&b"s3cret"[..]));
        let opts = c.session_config().get_options().unwrap().to_owned();
        assert_eq!(opts, "-c search_path=orders,public,extensions");
    }

    #[test]
    fn malformed_values_name_the_key() {
        let base = [
            ("DATABASE_URL", "postgres://svc@db/shop"),
            ("SVCDB_SCHEMA", "orders"),
        ];
        for (key, bad) in [
            ("SVCDB_POOL_MAX", "lots"),
            ("SVCDB_ACQUIRE_TIMEOUT", "soon"),
            ("SVCDB_CREATE_SCHEMA", "maybe"),
        ] {
            let mut pairs = base.to_vec();
            pairs.push((key, bad));
            match Config::from_lookup(lookup(&pairs)) {
                Err(Error::Config { key: k, .. }) => assert_eq!(k, key),
                other => panic!("{key}: expected a config error, got {other:?}"),
            }
        }
        let mut pairs = base.to_vec();
        pairs.push(("SVCDB_POOL_MIN", "30"));
        assert!(matches!(
            Config::from_lookup(lookup(&pairs)),
            Err(Error::Config { .. })
        ));
        assert!(matches!(
            Config::from_lookup(lookup(&[("DATABASE_URL", "postgres://svc@db/shop")])),
            Err(Error::Config { .. })
        ));
        assert!(matches!(
            Config::from_lookup(lookup(&[
                ("DATABASE_URL", "postgres://svc@db/shop"),
                ("SVCDB_SCHEMA", "x;drop")
            ])),
            Err(Error::Ident(_))
        ));
    }

    #[test]
    fn tls_keys_leave_the_url_and_the_rest_reaches_the_driver() {
        let c = Config::new(
            "postgres://svc:p%3Fw@db:6543/shop?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fmy%20ca.pem&connect_timeout=7",
            "orders",
        )
        .unwrap();
        assert_eq!(c.tls, TlsMode::VerifyFull);
        assert_eq!(c.ssl_root_cert, Some(PathBuf::from("/etc/my ca.pem")));
        assert_eq!(c.connection.get_password(), Some(&b"p?w"[..]));
        assert_eq!(c.connection.get_application_name(), Some("x"));
        assert_eq!(
            c.connection.get_connect_timeout(),
            Some(&Duration::from_secs(7))
        );
        assert_eq!(c.target(), "svc@db:6543/shop");

        let c = Config::new("postgresql://svc@db/shop?sslmode=require", "orders").unwrap();
        assert_eq!(
            (c.tls, c.ssl_root_cert.as_deref()),
            (TlsMode::Require, None)
        );
        assert_eq!(c.target(), "svc@db:5432/shop");

        let c = Config::new("postgres://svc@db/shop", "orders").unwrap();
        assert_eq!(c.tls, TlsMode::Disable);
        let c = Config::new("postgres://svc@db/shop?sslrootcert=system", "orders").unwrap();
        assert_eq!(
            c.tls,
            TlsMode::VerifyFull,
            "libpq 16's default with system roots"
        );
    }

    #[test]
    fn tls_keys_leave_key_value_pairs_too() {
        let c = Config::new(
            r"host=db user=svc sslmode = verify-ca  sslrootcert='/etc/my ca.pem' password='a\'b c' dbname=shop",
            "orders",
        )
        .unwrap();
        assert_eq!(c.tls, TlsMode::VerifyCa);
        assert_eq!(c.ssl_root_cert, Some(PathBuf::from("/etc/my ca.pem")));
        assert_eq!(c.connection.get_password(), Some(&b"a'b c"[..]));
        assert_eq!(c.target(), "svc@db:5432/shop");
        // The driver still refuses what it refused, with its own reason.
        assert!(matches!(
            Config::new("host=db user=svc sslmode=require bogus=1", "orders"),
            Err(Error::Config { .. })
        ));
    }

    #[test]
    fn pgsslmode_and_pgsslrootcert_fill_in_what_the_url_does_not_say() {
        let env = |url: &'static str, mode: &'static str| {
            Config::from_lookup(lookup(&[
                ("DATABASE_URL", url),
                ("SVCDB_SCHEMA", "orders"),
                ("PGSSLMODE", mode),
                ("PGSSLROOTCERT", "/etc/ca.pem"),
            ]))
        };
        let c = env("postgres://svc@db/shop", "verify-full").unwrap();
        assert_eq!(c.tls, TlsMode::VerifyFull);
        assert_eq!(c.ssl_root_cert, Some(PathBuf::from("/etc/ca.pem")));
        let c = env(
            "postgres://svc@db/shop?sslmode=disable&sslrootcert=mine.pem",
            "require",
        )
        .unwrap();
        assert_eq!(c.tls, TlsMode::Disable, "the URL wins");
        assert_eq!(c.ssl_root_cert, Some(PathBuf::from("mine.pem")));
        assert!(matches!(
            env("postgres://svc@db/shop", "sometimes"),
            Err(Error::Config { key, .. }) if key == "PGSSLMODE"
        ));
    }

    #[test]
    fn an_unknown_sslmode_is_a_config_error_naming_the_key() {
        for url in [
            "postgres://svc:hunter2@db/shop?sslmode=verify_full",
            "host=db user=svc password=hunter2 sslmode=verify_full",
        ] {
            match Config::new(url, "orders") {
                Err(e @ Error::Config { .. }) => {
                    let Error::Config { key, .. } = &e else {
                        unreachable!()
                    };
                    assert_eq!(key, "sslmode");
                    assert!(!format!("{e} {e:?}").contains("hunter2"), "{e:?}");
                }
                other => panic!("{url}: expected a config error, got {other:?}"),
            }
        }
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

    /// Every duration setting of the environment table.
    const DURATION_KEYS: [&str; 6] = [
        "SVCDB_ACQUIRE_TIMEOUT",
        "SVCDB_CONNECT_TIMEOUT",
        "SVCDB_IDLE_TIMEOUT",
        "SVCDB_MAX_LIFETIME",
        "SVCDB_MAX_LIFETIME_JITTER",
        "SVCDB_VERIFY_AFTER_IDLE",
    ];

    #[test]
    fn out_of_range_durations_are_config_errors_not_panics() {
        for bad in [
            "1e30",
            "NaN",
            "nan",
            "inf",
            "-inf",
            "-1",
            "-0.5",
            "1e20",
            "18446744073709551616",
        ] {
            match parse_duration("SVCDB_ACQUIRE_TIMEOUT", bad) {
                Err(Error::Config { key, .. }) => assert_eq!(key, "SVCDB_ACQUIRE_TIMEOUT", "{bad}"),
                other => panic!("{bad}: expected a config error, got {other:?}"),
            }
        }
        assert_eq!(
            parse_duration("k", "1e19").unwrap(),
            Duration::from_secs(10_000_000_000_000_000_000)
        );
        assert_eq!(
            parse_duration("k", "0.25").unwrap(),
            Duration::from_millis(250)
        );
    }

    #[test]
    fn saturating_secs_f64_saturates() {
        assert_eq!(saturating_secs_f64(f64::NAN), Duration::ZERO);
        assert_eq!(saturating_secs_f64(-3.0), Duration::ZERO);
        assert_eq!(saturating_secs_f64(1e300), Duration::MAX);
        assert_eq!(saturating_secs_f64(f64::INFINITY), Duration::MAX);
        assert_eq!(saturating_secs_f64(1.5), Duration::from_millis(1500));
        assert_eq!(capped_wait(Duration::MAX), MAX_WAIT);
        assert_eq!(capped_wait(Duration::from_secs(5)), Duration::from_secs(5));
        // The cap is one the clock can add: a deadline from it exists.
        assert!(std::time::Instant::now().checked_add(MAX_WAIT).is_some());
    }

    /// Numbers as people (and fuzzers) write them: any float, in plain and exponent form.
    fn number_text() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            any::<f64>().prop_map(|x| x.to_string()),
            any::<f64>().prop_map(|x| format!("{x:e}")),
            any::<u128>().prop_map(|x| x.to_string()),
            (
                any::<u64>(),
                prop::sample::select(vec!["ns", "ms", "s", "m", "h", "d", "w", "y"])
            )
                .prop_map(|(n, unit)| format!("{n}{unit}")),
            "\\PC{0,24}",
        ]
    }

    proptest::proptest! {
        #[test]
        fn the_duration_parser_never_panics(text in number_text()) {
            if let Ok(secs) = text.trim().parse::<f64>() {
                let parsed = parse_duration("k", &text);
                proptest::prop_assert_eq!(
                    parsed.is_ok(),
                    Duration::try_from_secs_f64(secs).is_ok(),
                    "{:?} -> {:?}", text, parsed
                );
            } else if let Err(e) = parse_duration("k", &text) {
                proptest::prop_assert!(matches!(&e, Error::Config { key, .. } if key == "k"), "{e:?}");
            }
        }

        #[test]
        fn no_duration_setting_panics(index in 0..DURATION_KEYS.len(), text in number_text()) {
            let key = DURATION_KEYS[index];
            let pairs = [
                ("DATABASE_URL", "postgres://svc@db/shop"),
                ("SVCDB_SCHEMA", "orders"),
                (key, text.as_str()),
            ];
            match Config::from_lookup(lookup(&pairs)) {
                Ok(config) => {
                    // What the pool computes from it, at the extremes the value allows.
                    let now = std::time::Instant::now();
                    let _ = now + capped_wait(config.acquire_timeout);
                    let _ = config.session_config();
                }
                Err(e) => proptest::prop_assert!(
                    matches!(&e, Error::Config { .. }),
                    "{key}={text:?}: {e:?}"
                ),
            }
        }
    }

    #[test]
    fn a_password_with_an_unencoded_at_sign_is_refused_not_misread() {
        // The driver would read "cd@db" as the host, and print it in every error.
        match Config::new("postgres://svc:ab@cd@db/shop", "orders") {
            Err(Error::Config { key, message }) => {
                assert_eq!(key, "DATABASE_URL");
                assert!(message.contains("%40"), "says how: {message}");
                assert!(
                    !message.contains("ab") && !message.contains("cd"),
                    "{message}"
                );
            }
            other => panic!("expected a config error, got {other:?}"),
        }
        let c = Config::new("postgres://svc:ab%40cd@db/shop", "orders").unwrap();
        assert_eq!(c.connection.get_password(), Some(&b"ab@cd"[..]));
    }

    #[test]
    fn unknown_options_are_named_only_when_they_are_libpq_keywords() {
        let message = |url: &str| match parse_url(url) {
            Err(Error::Config { message, .. }) => message,
            other => panic!("{url}: expected a config error, got {other:?}"),
        };
        // libpq's, so not a piece of a password: worth naming.
        assert!(message("host=db user=svc sslcert=/c.pem").contains("`sslcert`"));
        // A password with a space, unquoted: its second half is read as an option name.
        let shown = message("host=db user=svc password=first hunter2=x");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("password='"), "says how: {shown}");
    }

    #[test]
    fn several_hosts_in_either_form_reach_the_driver_in_order() {
        use tokio_postgres::config::Host;
        for url in [
            "postgres://svc@h1:5441,h2:5442/shop",
            "host=h1,h2 port=5441,5442 user=svc dbname=shop",
        ] {
            let c = Config::new(url, "orders").unwrap();
            assert_eq!(
                c.connection.get_hosts(),
                [Host::Tcp("h1".into()), Host::Tcp("h2".into())],
                "{url}"
            );
            assert_eq!(c.connection.get_ports(), [5441, 5442], "{url}");
            assert_eq!(c.target(), "svc@h1:5441,h2:5442/shop", "{url}");
        }
        // One port for every host, as for libpq.
        let c = Config::new("host=h1,h2 port=6000 user=svc dbname=shop", "orders").unwrap();
        assert_eq!(c.target(), "svc@h1:6000,h2:6000/shop");
        let c = Config::new("postgres://svc@h1,h2/shop", "orders").unwrap();
        assert_eq!(c.target(), "svc@h1:5432,h2:5432/shop");
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
    fn pgtargetsessionattrs_fills_in_what_the_url_does_not_say() {
        let env = |url: &'static str, attrs: &'static str| {
            Config::from_lookup(lookup(&[
                ("DATABASE_URL", url),
                ("SVCDB_SCHEMA", "orders"),
                ("PGTARGETSESSIONATTRS", attrs),
            ]))
        };
        let c = env("postgres://svc@h1/shop", "read-write").unwrap();
        assert_eq!(c.target_session_attrs(), TargetSessionAttrs::ReadWrite);
        let c = env("postgres://svc@h1,h2/shop", "any").unwrap();
        assert_eq!(c.target_session_attrs(), TargetSessionAttrs::Any);
        let c = env(
            "postgres://svc@h1/shop?target_session_attrs=read-only",
            "read-write",
        )
        .unwrap();
        assert_eq!(
            c.target_session_attrs(),
            TargetSessionAttrs::ReadOnly,
            "the URL wins"
        );
        assert!(matches!(
            env("postgres://svc@h1/shop", "primary"),
            Err(Error::Config { key, .. }) if key == "PGTARGETSESSIONATTRS"
        ));
    }

    #[test]
    fn libpq_session_attrs_the_driver_lacks_are_refused_with_what_to_write() {
        for (value, instead) in [
            ("primary", "read-write"),
            ("standby", "read-only"),
            ("prefer-standby", "read-only"),
            ("readwrite", "read-write"),
        ] {
            for url in [
                format!("postgres://svc:hunter2@h1,h2/shop?target_session_attrs={value}"),
                format!("host=h1,h2 user=svc password=hunter2 target_session_attrs={value}"),
            ] {
                match Config::new(&url, "orders") {
                    Err(e @ Error::Config { .. }) => {
                        let Error::Config { key, message } = &e else {
                            unreachable!()
                        };
                        assert_eq!(key, "target_session_attrs", "{url}");
                        assert!(message.contains(&format!("`{value}`")), "{message}");
                        assert!(message.contains(instead), "{message}");
                        assert!(!format!("{e} {e:?}").contains("hunter2"), "{e:?}");
                    }
                    other => panic!("{url}: expected a config error, got {other:?}"),
                }
            }
        }
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
    fn no_password_in_the_target_of_several_hosts() {
        let secret = "hunter2-very-secret";
        let c = Config::new(
            &format!("postgres://svc:{secret}@h1:5441,h2:5442/shop"),
            "orders",
        )
        .unwrap();
        let shown = format!("{c:?} {}", c.target());
        assert!(!shown.contains(secret), "{shown}");
        // A driver config read by the driver alone (svcdb's parse refuses a stray '@'): the
        // tail of a password with an unencoded '@' would be the first host.
        let pg: tokio_postgres::Config =
            "postgres://svc:ab@cd@h1:5441,h2:5442/shop".parse().unwrap();
        let shown = describe_target(&pg);
        assert!(!shown.contains("ab") && !shown.contains("cd@"), "{shown}");
        assert_eq!(shown, "svc@h1:5441,h2:5442/shop");
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
