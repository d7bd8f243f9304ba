//! Which failed connection attempts are worth another one before the acquire timeout.

use tokio_postgres::error::SqlState;

use crate::error::is_permanent_connect_error;
use crate::tls::is_final_tls_failure;

/// True when opening a connection failed in a way another attempt cannot fix, so that
/// [`ServiceDb::get`](super::ServiceDb::get) reports it at once instead of after the acquire
/// timeout (found by a user trial: a refused certificate and an unknown setting in the URL's
/// `options` each took 5 s to report).
///
/// * what [`is_permanent_connect_error`] says: a refused role or password, a database that
///   does not exist, a password the driver cannot send;
/// * a certificate refused, or TLS not offered to a mode that requires it
///   ([`is_final_tls_failure`]);
/// * any other error the server sent while starting the session (a FATAL during startup:
///   `42704` for an unknown setting in `options=-c …`, `22023` for a bad value, `42501` for
///   a role without `CONNECT` on the database, …) except those that say the server cannot
///   take the connection *now*: `57P01`–`57P03` (shutting down, crashed, starting up or in
///   recovery), `55000` (the database "is not currently accepting connections": an
///   administrator's `ALLOW_CONNECTIONS false` for maintenance, or the database being
///   dropped or created; found by a user trial, where it recovered within a second), class
///   `53` (too many connections, out of memory or disk), class `08` (connection
///   exceptions), class `58` and `XX` (the server's own trouble).
///
/// A connection refused or reset, or no answer, has no SQLSTATE and is retried: a restarting
/// server comes back.
pub(super) fn no_retry_fixes(e: &tokio_postgres::Error) -> bool {
    if is_permanent_connect_error(e) || is_final_tls_failure(e) {
        return true;
    }
    let Some(code) = e.code() else {
        return false;
    };
    let transient = *code == SqlState::ADMIN_SHUTDOWN
        || *code == SqlState::CRASH_SHUTDOWN
        || *code == SqlState::CANNOT_CONNECT_NOW
        || *code == SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE
        || ["53", "08", "58", "XX"]
            .iter()
            .any(|class| code.code().starts_with(class));
    !transient
}
