//! Which failure to report when a `DATABASE_URL` with several hosts gets no connection.
//!
//! The driver tries the hosts in order and returns the last one's error: a wrong password on
//! the primary, then a standby that is down, reads as "connection refused", and the retries
//! that follow wait out the acquire timeout for a password no retry fixes (found at stop 27;
//! the AMQP side names every node's failure since stop 28). Each host is tried alone once, on
//! the first failure, and the most telling error kept.

use std::time::Duration;

use tokio_postgres::config::Host;

use crate::connection::DedicatedConn;
use crate::error::Error;
use crate::tls::{Tls, TlsFailure};

/// When `session` names several hosts and `failed` is no server's answer, a more telling
/// failure, from the hosts tried one by one (each within `attempt`): a server's answer (a
/// refused password, a role or database that does not exist) over a failed TLS handshake,
/// over a refused or unanswered connection. `None` when none says more.
pub(super) async fn more_telling(
    session: &tokio_postgres::Config,
    tls: &Tls,
    failed: &tokio_postgres::Error,
    attempt: Duration,
) -> Option<tokio_postgres::Error> {
    let hosts = session.get_hosts().len();
    if hosts < 2 || failed.code().is_some() {
        return None;
    }
    let mut best: Option<tokio_postgres::Error> = None;
    for i in 0..hosts {
        let one = alone(session, i);
        if let Ok(Err(Error::Connect { cause, .. })) =
            tokio::time::timeout(attempt, DedicatedConn::connect_with(&one, tls)).await
        {
            let bar = best.as_ref().map_or(rank(failed), rank);
            if rank(&cause) > bar {
                best = Some(cause);
            }
        }
    }
    best
}

/// How much an error says: 2 a server's answer, 1 a TLS failure, 0 no answer.
fn rank(e: &tokio_postgres::Error) -> u8 {
    if e.code().is_some() {
        2
    } else if TlsFailure::of(e).is_some() {
        1
    } else {
        0
    }
}

/// `session` with its `i`th host only (and that host's port and address).
fn alone(session: &tokio_postgres::Config, i: usize) -> tokio_postgres::Config {
    let mut one = tokio_postgres::Config::new();
    if let Some(user) = session.get_user() {
        one.user(user);
    }
    if let Some(password) = session.get_password() {
        one.password(password);
    }
    if let Some(dbname) = session.get_dbname() {
        one.dbname(dbname);
    }
    if let Some(options) = session.get_options() {
        one.options(options);
    }
    if let Some(name) = session.get_application_name() {
        one.application_name(name);
    }
    if let Some(timeout) = session.get_connect_timeout() {
        one.connect_timeout(*timeout);
    }
    one.ssl_mode(session.get_ssl_mode())
        .channel_binding(session.get_channel_binding())
        .target_session_attrs(session.get_target_session_attrs());
    match &session.get_hosts()[i] {
        Host::Tcp(host) => one.host(host),
        Host::Unix(path) => one.host_path(path),
    };
    // One port for every host, or one each; addresses are one each.
    let ports = session.get_ports();
    if let Some(port) = ports.get(if ports.len() == 1 { 0 } else { i }) {
        one.port(*port);
    }
    if let Some(addr) = session.get_hostaddrs().get(i) {
        one.hostaddr(*addr);
    }
    one
}
