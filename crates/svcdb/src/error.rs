//! The library's error type.
//!
//! Match on the variant for the kind of failure and on [`Error::code`] for the SQLSTATE the
//! server reported; the `Display` text is for people and may change.

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

use crate::ident::IdentError;
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
    /// `cause` is the last error met while opening a connection (authentication failed,
    /// connection refused, …); `None` means every connection was busy the whole time.
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
        /// The last connection error, if opening a connection failed.
        #[source]
        cause: Option<tokio_postgres::Error>,
    },

    /// The pool was closed (the service is shutting down).
    #[error("the connection pool is closed")]
    PoolClosed,

    /// A dedicated (unpooled) connection could not be opened.
    #[error(
        "cannot connect to {target}: {}{}",
        pg_message(source),
        TlsHint(source)
    )]
    Connect {
        /// `user@host:port/dbname`, never with the password.
        target: String,
        /// The driver's error.
        source: tokio_postgres::Error,
    },

    /// A statement failed; [`Error::code`] gives the SQLSTATE.
    #[error("{}", pg_message(.0))]
    Db(#[from] tokio_postgres::Error),

    /// Tables the service needs are missing from its schema
    /// ([`ServiceDb::require_tables`](crate::ServiceDb::require_tables)).
    #[error("schema {schema} lacks {}: {}\n  hint: {}", if tables.len() == 1 { "table" } else { "tables" }, tables.join(", "), crate::schema::MISSING_TABLES_HINT)]
    MissingTables {
        /// The service schema.
        schema: String,
        /// Every missing table, in the order asked for.
        tables: Vec<String>,
    },

    /// The start-up gate found problems; the report lists every one
    /// ([`GateReport::ensure_ready`](crate::schema::GateReport::ensure_ready)).
    #[error("{0}")]
    NotReady(Box<crate::schema::GateReport>),
}

impl Error {
    /// The SQLSTATE reported by the server, for this error or its cause
    /// (for [`Error::AcquireTimeout`], the cause's code: `28P01` for a wrong password, …).
    pub fn code(&self) -> Option<&SqlState> {
        self.driver_error()?.code()
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

    /// The driver's error this error is or carries.
    fn driver_error(&self) -> Option<&tokio_postgres::Error> {
        match self {
            Error::Db(e) | Error::Connect { source: e, .. } => Some(e),
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
        return s;
    }
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        // io::Error repeats its inner error as its source; print each message once.
        let text = cause.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = cause.source();
    }
    s
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
        } = self.0
        else {
            unreachable!("AcquireTimeoutDisplay wraps only AcquireTimeout")
        };
        write!(
            f,
            "timed out after {waited:.1?} waiting for a connection to {target}"
        )?;
        match cause {
            Some(e) => {
                write!(f, ": last connection attempt failed: {}", pg_message(e))?;
                write!(f, "\n  hint: {}", connect_hint(e))
            }
            None => write!(
                f,
                ": all {size} of {max_size} connections stayed busy\n  hint: raise SVCDB_POOL_MAX or SVCDB_ACQUIRE_TIMEOUT, or look for connections held across slow work"
            ),
        }
    }
}

/// What to do about a failed connection attempt, by its cause.
pub(crate) fn connect_hint(e: &tokio_postgres::Error) -> &'static str {
    // A TLS failure has no SQLSTATE, yet the server answered: not the "is it running" case.
    match (TlsFailure::of(e), e.code()) {
        (Some(tls), _) => tls.hint(),
        (None, Some(c))
            if *c == SqlState::INVALID_PASSWORD
                || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION =>
        {
            "check the user and password in DATABASE_URL, or run `svcdb provision` to create the service's role"
        }
        (None, Some(c)) if *c == SqlState::INVALID_CATALOG_NAME => {
            "the database does not exist: create it or fix DATABASE_URL"
        }
        (None, Some(_)) => "see the server's message above",
        (None, None) => {
            "check that PostgreSQL is running and that DATABASE_URL names the right host and port"
        }
    }
}

/// `\n  hint: …` after a connection error that failed in TLS; nothing otherwise.
struct TlsHint<'a>(&'a tokio_postgres::Error);

impl fmt::Display for TlsHint<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match TlsFailure::of(self.0) {
            Some(failure) => write!(f, "\n  hint: {}", failure.hint()),
            None => Ok(()),
        }
    }
}
