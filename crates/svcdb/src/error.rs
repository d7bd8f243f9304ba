//! The library's error type, and how svcdb's errors are shown to people ([`Report`]).
//!
//! Match on the variant for the kind of failure and on [`Error::code`] for the SQLSTATE the
//! server reported; the `Display` text is for people and may change.
//!
//! # One rule for causes: in the message, not in `source()`
//!
//! An error of svcdb (this [`Error`], [`MigrateError`](crate::migrate::MigrateError), svcdb-amqp's)
//! that shows its cause in its message does not also return it from
//! [`source()`](std::error::Error::source): the cause is in one place, never two. The message
//! is where it belongs here because svcdb words causes better than their own `Display` does
//! (the driver says `db error` and leaves the server's message, SQLSTATE, detail and hint in its
//! source chain), and because services print errors with `{e}` and log them with `%e`: that
//! must tell the whole story, with its `hint:` lines. What a program needs of the cause it
//! gets from the error's methods ([`Error::code`], [`Error::as_db_error`],
//! [`Error::tls_failure`], [`Error::is_database_unavailable`]), not by walking the chain.
//!
//! A wrapper that adds context (anyhow's `context`, an error of your own with `#[source]`) and
//! does not quote its cause keeps it in `source()`: [`Report`] renders such a chain, each
//! message once, with every hint gathered at the end. Every svcdb binary prints its errors
//! with it.

use std::fmt;
use std::time::Duration;

/// A SQLSTATE, the server's five-character error code: compare [`Error::code`] (or
/// [`MigrateError::code`](crate::migrate::MigrateError::code)) with its constants, such as
/// `SqlState::UNIQUE_VIOLATION` (23505) or `SqlState::INSUFFICIENT_PRIVILEGE` (42501), and
/// get the five characters with `code()`. Every constant is listed in PostgreSQL's
/// [error codes appendix](https://www.postgresql.org/docs/current/errcodes-appendix.html),
/// upper-cased (`unique_violation` is `UNIQUE_VIOLATION`). The driver's type
/// (tokio-postgres), under svcdb's name.
pub type SqlState = tokio_postgres::error::SqlState;

use crate::config::human_duration;
use crate::ident::IdentError;
use crate::schema::gate::report::MISSING_TABLES_HINT;
use crate::tls::TlsFailure;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in svcdb's connection layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is missing or malformed.
    #[error("invalid configuration: {key}: {message}")]
    Config {
        /// The setting (environment variable or field) at fault.
        key: String,
        /// What is wrong with it and what to do.
        message: String,
    },

    /// A schema, role or table name (or an event consumer, exchange or routing key) was
    /// refused before any SQL was sent.
    #[error(transparent)]
    Ident(#[from] IdentError),

    /// An event svcdb was asked to store or read is not a valid envelope
    /// ([`outbox::enqueue`](crate::outbox::enqueue)).
    #[error(transparent)]
    Event(#[from] crate::event::EventError),

    /// No connection could be handed out within the acquire timeout.
    ///
    /// `cause` is the last error met while opening a connection (connection refused, …), and
    /// `no_answer_within` says the last attempt got no answer at all; with neither, every
    /// connection was busy the whole time.
    #[error("{}", AcquireTimeoutDisplay(self))]
    AcquireTimeout {
        /// How long the caller waited.
        waited: Duration,
        /// `user@host:port/dbname`, never with the password.
        target: String,
        /// Connections open when the wait ended.
        size: usize,
        /// The pool's maximum size.
        max_size: usize,
        /// The last connection error, if opening a connection failed (shown in the message,
        /// so not the error's `source()`).
        cause: Option<tokio_postgres::Error>,
        /// How long the last attempt to open a connection waited for the server, when it got
        /// no answer in that time (something accepted the connection and said nothing).
        no_answer_within: Option<Duration>,
        /// Whether the acquire timeout, being the shorter, ended that attempt before the
        /// connect timeout could: the hint then says to raise the acquire timeout.
        no_answer_cut_short: bool,
    },

    /// The pool was closed (the service is shutting down).
    #[error("the connection pool is closed")]
    PoolClosed,

    /// A connection could not be opened: a dedicated (unpooled) one, or a pooled one that
    /// failed in a way no retry fixes (a wrong or missing password, a role or database that does
    /// not exist), reported on the first attempt instead of after the acquire timeout.
    #[error(
        "cannot connect to {target}: {}{}",
        pg_message(cause),
        ConnectHint(cause)
    )]
    Connect {
        /// `user@host:port/dbname`, never with the password.
        target: String,
        /// The driver's error (shown in the message, so not the error's `source()`).
        cause: tokio_postgres::Error,
    },

    /// A statement failed; [`Error::code`] gives the SQLSTATE, [`Error::as_db_error`] the
    /// server's whole error. The message is the server's (the driver's error is not the
    /// `source()`: see the [module docs](self)).
    #[error("{}", pg_message(.0))]
    Db(tokio_postgres::Error),

    /// A transaction's closure returned `Ok`, but a statement in it had failed and its error was
    /// dropped (`let _ = tx.execute(…)`, a caught unique violation), which aborted the
    /// transaction: PostgreSQL answers the `COMMIT` of an aborted transaction with a rollback,
    /// so **nothing was committed**. [`Error::code`] is 25P02 (`IN_FAILED_SQL_TRANSACTION`).
    #[error("nothing was committed: a statement of the transaction failed, and the closure returned Ok without its error\n  hint: return the statement's error (`?`), or run a statement that may fail under a savepoint (`tx.savepoint()`) and roll back to it")]
    Aborted(tokio_postgres::Error),

    /// Tables the service needs are missing from its schema
    /// ([`ServiceDb::require_tables`](crate::ServiceDb::require_tables)).
    #[error("schema {schema} lacks {}: {}\n  hint: {}", if tables.len() == 1 { "table" } else { "tables" }, tables.join(", "), MISSING_TABLES_HINT)]
    MissingTables {
        /// The service schema.
        schema: String,
        /// Every missing table, in the order asked for.
        tables: Vec<String>,
    },

    /// The service schema does not exist and [`Config::create_schema`](crate::Config::create_schema)
    /// is off ([`ServiceDb::connect`](crate::ServiceDb::connect)); [`Error::code`] says 3F000.
    #[error("{}", SchemaMissingDisplay(self))]
    SchemaMissing {
        /// The schema, as configured.
        schema: String,
        /// `user@host:port/dbname` it was looked for in, never with the password.
        target: String,
        /// Schemas of that database whose names look like it (a typo away, or one a prefix of
        /// the other), closest first; empty when none does.
        similar: Vec<String>,
    },

    /// The start-up gate found problems; the report lists every one
    /// ([`GateReport::ensure_ready`](crate::schema::GateReport::ensure_ready)).
    #[error("{0}")]
    NotReady(Box<crate::schema::GateReport>),

    /// [`provision`](crate::provision()) found the database in a state it will not build on
    /// (a role whose attributes or memberships bypass isolation, a schema or objects another
    /// role owns) and changed nothing. What is wrong is in the database, not in the settings:
    /// the message says what, and how to fix it or have `fix` do it.
    #[error("{message}")]
    Refused {
        /// What provisioning refused: `role` or `schema`.
        object: String,
        /// What is wrong and what to do.
        message: String,
    },
}

impl Error {
    /// The SQLSTATE reported by the server, for this error or its cause
    /// (`28P01` for a wrong password, `3F000` for [`Error::SchemaMissing`]; for
    /// [`Error::AcquireTimeout`], its cause's code: `57P03` for a server starting up, …).
    pub fn code(&self) -> Option<&SqlState> {
        if let Error::SchemaMissing { .. } = self {
            return Some(&SqlState::INVALID_SCHEMA_NAME);
        }
        self.driver_error()?.code()
    }

    /// The server's error, for this error or its cause: its message, detail, hint, position and
    /// the object it names, as the server sent them. `None` when the server reported nothing
    /// (no connection, a connection that broke, a refusal of svcdb's own).
    pub fn as_db_error(&self) -> Option<&tokio_postgres::error::DbError> {
        self.driver_error()?.as_db_error()
    }

    /// Why the connection failed in TLS, for this error or its cause (for
    /// [`Error::AcquireTimeout`], the last attempt's): the server refused TLS, or its
    /// certificate was untrusted or named another host. `None` for every other error.
    pub fn tls_failure(&self) -> Option<TlsFailure> {
        TlsFailure::of(self.driver_error()?)
    }

    /// True when retrying the whole transaction may succeed: serialization failure (40001)
    /// or deadlock (40P01).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Db(e) if is_retryable(e))
    }

    /// True for an acquire timeout.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::AcquireTimeout { .. })
    }

    /// True when the database, not the request, is at fault: no connection could be had
    /// ([`Error::AcquireTimeout`], [`Error::Connect`], [`Error::PoolClosed`]), or the statement
    /// failed because the server is going away, cannot serve writes, or is full (see
    /// [`is_database_unavailable`] for the SQLSTATEs). The same request may succeed unchanged
    /// once the database answers again, so a consumer waits for it instead of counting the
    /// attempt as a failure of the event.
    pub fn is_database_unavailable(&self) -> bool {
        match self {
            Error::AcquireTimeout { .. } | Error::Connect { .. } | Error::PoolClosed => true,
            Error::Db(e) => is_database_unavailable(e),
            _ => false,
        }
    }

    /// True when the service schema does not exist ([`Error::SchemaMissing`]).
    pub fn is_schema_missing(&self) -> bool {
        matches!(self, Error::SchemaMissing { .. })
    }

    /// The driver's error this error is or carries.
    fn driver_error(&self) -> Option<&tokio_postgres::Error> {
        match self {
            Error::Db(e) | Error::Aborted(e) | Error::Connect { cause: e, .. } => Some(e),
            Error::AcquireTimeout { cause, .. } => cause.as_ref(),
            _ => None,
        }
    }

    pub(crate) fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config {
            key: key.into(),
            message: message.into(),
        }
    }

    pub(crate) fn refused(object: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Refused {
            object: object.into(),
            message: message.into(),
        }
    }
}

/// A statement's error: the cause is in the message (see the [module docs](self)), so this is
/// written by hand rather than with `#[from]`, which would also make it the `source()`.
impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        Error::Db(e)
    }
}

/// True for serialization failures (40001) and deadlocks (40P01).
pub(crate) fn is_retryable(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
    )
}

/// True when a driver error means the database cannot serve the request right now, whatever
/// the request: [`Error::is_database_unavailable`] for errors that reached svcdb's type.
///
/// * the connection closed under the statement (no SQLSTATE: reset, server gone);
/// * `57P01` admin shutdown (`pg_terminate_backend`, a fast shutdown), `57P02` crash
///   shutdown, `57P03` cannot connect now (starting up, shutting down, in recovery);
/// * class `08`, connection exceptions;
/// * `25006` read-only SQL transaction: after a failover the old primary (or a standby the
///   connection string names) refuses writes until connections reach the new primary;
/// * `53300` too many connections.
pub fn is_database_unavailable(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        None => e.is_closed(),
        Some(c) => {
            *c == SqlState::ADMIN_SHUTDOWN
                || *c == SqlState::CRASH_SHUTDOWN
                || *c == SqlState::CANNOT_CONNECT_NOW
                || *c == SqlState::READ_ONLY_SQL_TRANSACTION
                || *c == SqlState::TOO_MANY_CONNECTIONS
                || c.code().starts_with("08")
        }
    }
}

/// True when a `CREATE … IF NOT EXISTS` failed only because another session created the same
/// object at the same moment: both passed the existence check, and the loser hit the catalog's
/// unique index (23505, on `pg_type` or `pg_class`) or the duplicate check (42P06, 42P07,
/// 42710) once the winner committed.
pub(crate) fn is_lost_create_race(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::UNIQUE_VIOLATION
            || *c == SqlState::DUPLICATE_SCHEMA
            || *c == SqlState::DUPLICATE_TABLE
            || *c == SqlState::DUPLICATE_OBJECT
    )
}

/// True when a connection attempt failed in a way no retry fixes: the server refused the role
/// or its password (28000, 28P01), the database does not exist (3D000), or the driver could not
/// even try (the server asked for a password and none was given, or for an authentication method
/// the driver lacks). A refused or reset connection, a server starting up (57P03) or out of
/// connection slots (53300) may pass on its own.
pub(crate) fn is_permanent_connect_error(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        Some(c) => {
            *c == SqlState::INVALID_PASSWORD
                || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
                || *c == SqlState::INVALID_CATALOG_NAME
        }
        // tokio-postgres exposes no error kind; its `Config` and `Authentication` kinds display
        // as these fixed texts, with the detail in the source chain.
        None => matches!(
            e.to_string().as_str(),
            DRIVER_CONFIG_ERROR | "authentication error"
        ),
    }
}

/// How tokio-postgres displays its `Config` error kind ("password missing" is its source).
const DRIVER_CONFIG_ERROR: &str = "invalid configuration";

/// True when the server asked for a password and the connection had none.
fn is_password_missing(e: &tokio_postgres::Error) -> bool {
    e.to_string() == DRIVER_CONFIG_ERROR
        && std::error::Error::source(e).is_some_and(|s| s.to_string() == "password missing")
}

/// True when `channel_binding=require` refused the server's authentication (tokio-postgres:
/// "server did not use channel binding"; found by a user trial, told to check that the server
/// was running).
fn is_channel_binding_refused(e: &tokio_postgres::Error) -> bool {
    std::error::Error::source(e).is_some_and(|s| s.to_string().contains("channel binding"))
}

/// True when the driver connected but `target_session_attrs=read-write` refused the server
/// because it accepts only reads: tokio-postgres reports that as a connection error caused by
/// an `io::Error` of kind `PermissionDenied` ("database does not allow writes"), a kind a
/// TCP connect almost never fails with.
fn is_read_only_server(e: &tokio_postgres::Error) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied)
}

/// Renders a driver error with its cause: tokio-postgres' own `Display` says only
/// "db error" and leaves the server's message in the source chain.
pub fn pg_message(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{} (SQLSTATE {})", db.message(), db.code().code());
        if let Some(detail) = db.detail() {
            s.push_str(&format!("; detail: {detail}"));
        }
        if let Some(hint) = db.hint() {
            s.push_str(&format!("; hint: {hint}"));
        }
        if db.code() == &SqlState::UNDEFINED_TABLE {
            s.push_str(missing_svcdb_table(db.message()));
        }
        return s;
    }
    Report::new(e).message
}

/// The hint for one of svcdb's own tables missing from the schema (found by a user trial:
/// `outbox::enqueue` before the outbox was installed failed with a bare `relation
/// "svcdb_outbox" does not exist`; the relay alone said how to install it).
fn missing_svcdb_table(message: &str) -> &'static str {
    let named = |table: &str| message.contains(&format!("\"{table}\""));
    if named(crate::outbox::OUTBOX_TABLE) {
        "\n  hint: install svcdb's outbox in the service schema first: ServiceDb::install_outbox at start-up, or svcdb::outbox::OUTBOX_SQL in a migration (svcdb_amqp::Service does it for a service that publishes)"
    } else if named(crate::idempotency::PROCESSED_EVENTS_TABLE) {
        "\n  hint: install svcdb's claims table in the service schema first: ServiceDb::install_idempotency at start-up, or svcdb::idempotency::PROCESSED_EVENTS_SQL in a migration (svcdb_amqp::Service does it for a service that subscribes)"
    } else {
        ""
    }
}

/// An error and its causes, rendered for people: [`Report::message`] joins the message of
/// each link of the `source()` chain with `: `, and [`Report::hints`] gathers the `hint:`
/// lines svcdb's messages end with, each distinct hint once. `Display` writes the message and
/// then one `\n  hint: …` line per hint, as every svcdb binary prints a failure:
///
/// ```
/// use svcdb::error::Report;
///
/// let e = svcdb::Error::PoolClosed;
/// assert_eq!(Report::new(&e).to_string(), "the connection pool is closed");
/// ```
///
/// svcdb's errors follow the [one rule](self) and need nothing more. Other crates' errors may
/// show their cause and also return it as `source()` (lapin writes `IO error: <cause>` and
/// returns the cause too): a link whose message the rendered text already holds is skipped, so
/// each message appears once whatever the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    message: String,
    hints: Vec<String>,
}

impl Report {
    /// Renders `error` and its `source()` chain. For an `anyhow::Error`, pass `e.as_ref()`.
    pub fn new(error: &(dyn std::error::Error + 'static)) -> Self {
        let mut report = Report {
            message: String::new(),
            hints: Vec::new(),
        };
        let mut next = Some(error);
        while let Some(link) = next {
            let text = link.to_string();
            let mut parts = text.split(HINT);
            let message = parts.next().unwrap_or_default();
            if !report.message.contains(message) {
                if !report.message.is_empty() {
                    report.message.push_str(": ");
                }
                report.message.push_str(message);
            }
            for hint in parts {
                if !report.hints.iter().any(|h| h == hint) {
                    report.hints.push(hint.to_owned());
                }
            }
            next = link.source();
        }
        report
    }

    /// What went wrong: the error's message and its causes', each once, without the hints.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// What to do: every distinct hint of the chain, outermost error's first.
    pub fn hints(&self) -> &[String] {
        &self.hints
    }
}

/// Where a hint starts in svcdb's messages.
const HINT: &str = "\n  hint: ";

/// The message, then one `\n  hint: …` line per hint.
impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        for hint in &self.hints {
            write!(f, "{HINT}{hint}")?;
        }
        Ok(())
    }
}

struct AcquireTimeoutDisplay<'a>(&'a Error);

impl fmt::Display for AcquireTimeoutDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Error::AcquireTimeout {
            waited,
            target,
            size,
            max_size,
            cause,
            no_answer_within,
            no_answer_cut_short,
        } = self.0
        else {
            unreachable!("AcquireTimeoutDisplay wraps only AcquireTimeout")
        };
        write!(
            f,
            "timed out after {} waiting for a connection to {target}",
            human_duration(*waited)
        )?;
        match (cause, no_answer_within) {
            (Some(e), _) => {
                write!(f, ": last connection attempt failed: {}", pg_message(e))?;
                write!(f, "\n  hint: {}", connect_hint(e))
            }
            (None, Some(d)) => write!(
                f,
                ": the server accepted the connection and did not answer within {}\n  hint: {}",
                human_duration(*d),
                crate::pool::no_answer_hint(*no_answer_cut_short)
            ),
            (None, None) => write!(
                f,
                ": all {size} of {max_size} connections stayed busy\n  hint: raise SVCDB_POOL_MAX or SVCDB_ACQUIRE_TIMEOUT, or look for connections held across slow work"
            ),
        }
    }
}

/// What to do about connection attempts that got no answer.
pub(crate) const NO_ANSWER_HINT: &str = "check that DATABASE_URL names PostgreSQL's host and port (what answers there is not PostgreSQL, or is stuck); for a slow server or network, raise SVCDB_CONNECT_TIMEOUT";

/// True for PostgreSQL's "too many connections for role …" and "… for database …": a limit
/// set on that role or database, not the server's `max_connections` ("sorry, too many
/// clients already").
fn per_role_or_database(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        db.message().starts_with("too many connections for role")
            || db
                .message()
                .starts_with("too many connections for database")
    })
}

/// What to do about a failed connection attempt, by its cause.
pub(crate) fn connect_hint(e: &tokio_postgres::Error) -> &'static str {
    // A TLS failure has no SQLSTATE, yet the server answered: not the "is it running" case.
    match (TlsFailure::of(e), e.code()) {
        (Some(tls), _) => tls.hint(),
        (None, Some(c)) if *c == SqlState::INVALID_PASSWORD => {
            "the password was refused: check the one in DATABASE_URL (postgres://user:password@host/dbname), else SVCDB_PASSWORD, else PGPASSWORD, used in that order"
        }
        (None, Some(c)) if *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION => {
            "check the user in DATABASE_URL, or run `svcdb provision` to create the service's role"
        }
        (None, Some(c)) if *c == SqlState::INVALID_CATALOG_NAME => {
            "the database does not exist: create it or fix DATABASE_URL"
        }
        // FATAL errors while the session starts (retrying does not help: see the pool): what
        // DATABASE_URL passes at startup is the usual cause.
        (None, Some(c)) if *c == SqlState::UNDEFINED_OBJECT => {
            "the server does not know a setting DATABASE_URL passes at startup (in options=-c name=value): correct its name or remove it"
        }
        (None, Some(c)) if *c == SqlState::INVALID_PARAMETER_VALUE => {
            "a setting DATABASE_URL passes at startup (in options=-c name=value) has a value the server refuses: correct the value or remove the setting"
        }
        // Found by a user trial: a role's CONNECTION LIMIT was blamed on max_connections.
        (None, Some(c)) if *c == SqlState::TOO_MANY_CONNECTIONS && per_role_or_database(e) => {
            "the role or the database in DATABASE_URL is at its own CONNECTION LIMIT (ALTER ROLE/DATABASE … CONNECTION LIMIT), which counts every session of it, other replicas' pools included: raise that limit (a service needs its SVCDB_POOL_MAX per replica, and `svcdb migrate up` two connections: the migration's and its checks'), or lower SVCDB_POOL_MAX"
        }
        (None, Some(c)) if *c == SqlState::CANNOT_CONNECT_NOW || *c == SqlState::TOO_MANY_CONNECTIONS => {
            "the server cannot take a connection now (starting up, shutting down, or out of connection slots): svcdb retried until SVCDB_ACQUIRE_TIMEOUT; raise it to wait longer, or free connection slots (lower SVCDB_POOL_MAX of the services sharing the server, or raise its max_connections)"
        }
        (None, Some(_)) => {
            "the server refused the connection for the reason in its message: fix what it names in DATABASE_URL, or on the server"
        }
        (None, None) if is_read_only_server(e) => {
            "a server answered but accepts no writes (a standby, or a primary being promoted or fenced), and target_session_attrs=read-write skips it: svcdb keeps trying the hosts in DATABASE_URL until one accepts writes; if this lasts, check that DATABASE_URL names the new primary"
        }
        (None, None) if is_password_missing(e) => {
            "the server asks for a password and none was given: put it in DATABASE_URL (postgres://user:password@host/dbname), or set SVCDB_PASSWORD or PGPASSWORD"
        }
        (None, None) if is_channel_binding_refused(e) => {
            "channel_binding=require needs SCRAM authentication over TLS, and this server authenticated the connection otherwise (trust, md5, or no TLS): make pg_hba.conf ask for scram-sha-256 on hostssl lines, or drop channel_binding=require from DATABASE_URL"
        }
        (None, None) => {
            "check that PostgreSQL is running and that DATABASE_URL names the right host and port"
        }
    }
}

/// `\n  hint: …` after a connection error: what to do about its cause.
struct ConnectHint<'a>(&'a tokio_postgres::Error);

impl fmt::Display for ConnectHint<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\n  hint: {}", connect_hint(self.0))
    }
}

struct SchemaMissingDisplay<'a>(&'a Error);

impl fmt::Display for SchemaMissingDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Error::SchemaMissing {
            schema,
            target,
            similar,
        } = self.0
        else {
            unreachable!("SchemaMissingDisplay wraps only SchemaMissing")
        };
        write!(f, "schema {schema} does not exist in {target}")?;
        // A misspelling is the likelier mistake when a look-alike exists: say so first.
        if !similar.is_empty() {
            write!(
                f,
                "; similar: {}\n  hint: if SVCDB_SCHEMA is misspelled, set it to the right one; otherwise create",
                similar.join(", ")
            )?;
        } else {
            f.write_str("\n  hint: create")?;
        }
        write!(f, " the schema with the service's own role, `svcdb provision --service <name> --schema {}`, or let svcdb create it when it connects (SVCDB_CREATE_SCHEMA=true, Config::create_schema)", shell_word(schema))
    }
}

/// `word` as one word of a POSIX shell command line, for hints that show a command to run:
/// as it is when the shell would keep it so, else in single quotes. A name PostgreSQL accepts
/// unquoted may hold `$` (`sch$x`), which a shell would expand (found by a user trial: the
/// pasted hint provisioned schema `sch`).
///
/// ```
/// assert_eq!(svcdb::error::shell_word("orders"), "orders");
/// assert_eq!(svcdb::error::shell_word("sch$x"), "'sch$x'");
/// assert_eq!(svcdb::error::shell_word("it's"), r#"'it'\''s'"#);
/// ```
pub fn shell_word(word: &str) -> std::borrow::Cow<'_, str> {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-.,:/=@%+".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        std::borrow::Cow::Borrowed(word)
    } else {
        std::borrow::Cow::Owned(format!("'{}'", word.replace('\'', r"'\''")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wrapper that adds context and keeps its cause in `source()`, as the rule asks.
    #[derive(Debug, thiserror::Error)]
    #[error("cannot start the service\n  hint: see the cause")]
    struct Context(#[source] Error);

    /// A foreign error that breaks the rule as lapin's do: its cause in its message and in
    /// its `source()`.
    #[derive(Debug, thiserror::Error)]
    #[error("IO error: {0}")]
    struct Repeats(#[source] std::io::Error);

    /// A driver error from a refused connection.
    async fn refused() -> tokio_postgres::Error {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let url = format!("postgres://nobody@127.0.0.1:{port}/none");
        let config: tokio_postgres::Config = url.parse().unwrap();
        match config.connect(tokio_postgres::NoTls).await {
            Err(e) => e,
            Ok(_) => panic!("port {port} was free a moment ago, yet something answered"),
        }
    }

    /// How many links of the chain show `needle`: what a renderer printing every link repeats.
    fn links_showing(e: &(dyn std::error::Error + 'static), needle: &str) -> usize {
        std::iter::successors(Some(e), |e| e.source())
            .filter(|e| e.to_string().contains(needle))
            .count()
    }

    #[tokio::test]
    async fn svcdb_errors_show_their_cause_in_the_message_not_in_source() {
        let shown = pg_message(&refused().await);
        let errors = [
            Error::Db(refused().await),
            Error::Connect {
                target: "nobody@127.0.0.1/none".into(),
                cause: refused().await,
            },
            Error::AcquireTimeout {
                waited: Duration::from_millis(1),
                target: "nobody@127.0.0.1/none".into(),
                size: 0,
                max_size: 1,
                cause: Some(refused().await),
                no_answer_within: None,
                no_answer_cut_short: false,
            },
        ];
        for e in &errors {
            assert!(std::error::Error::source(e).is_none(), "{e:?}");
            assert!(e.to_string().contains(&shown), "{e}");
            assert_eq!(links_showing(e, "refused"), 1, "{e:?}");
        }
        // Control: an error that keeps its cause in `source()` is told apart.
        assert!(std::error::Error::source(&Context(Error::PoolClosed)).is_some());
    }

    #[tokio::test]
    async fn a_report_shows_each_message_once_and_gathers_the_hints() {
        let e = Context(Error::Connect {
            target: "nobody@127.0.0.1/none".into(),
            cause: refused().await,
        });
        let report = Report::new(&e);
        assert_eq!(report.message().matches("refused").count(), 1, "{report}");
        assert!(
            report
                .message()
                .starts_with("cannot start the service: cannot connect to nobody@127.0.0.1/none: "),
            "{report}"
        );
        assert_eq!(report.hints().len(), 2, "{report:?}");
        assert_eq!(report.hints()[0], "see the cause");
        assert_eq!(
            report.to_string().matches("\n  hint: ").count(),
            2,
            "{report}"
        );

        // A foreign error that repeats its cause is shown once too; the control shows that
        // its chain does repeat it.
        let foreign = Repeats(std::io::Error::other("broker went away"));
        assert_eq!(links_showing(&foreign, "broker went away"), 2);
        let report = Report::new(&foreign);
        assert_eq!(report.message(), "IO error: broker went away");
        assert!(report.hints().is_empty());
    }
}
