//! The broker connection as the runtimes use it: connecting unless shut down, opening and
//! closing channels within a bound, and the backoff between reconnection attempts.
//!
//! The [`Consumer`](crate::Consumer), the [`Relay`](crate::Relay) and the
//! [`Topology`](crate::Topology) share these, so that every close is bounded the same way: a
//! broker that went silent (a network partition that keeps the TCP connection open) or
//! blocked the connection (a memory or disk alarm) never answers a `channel.close` or
//! `connection.close`, and must not stall a shutdown.

use std::time::Duration;

use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection};
use tokio_util::sync::CancellationToken;

use crate::config::AmqpConfig;
use crate::error::{Error, Result};

/// Longest wait for the broker to confirm a channel's or a connection's close: one that went
/// silent must not stall a shutdown (the connection's close, bounded too, ends the channel
/// anyway).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to `config`'s broker ([`AmqpConfig::connect`], bounded by its connect timeout);
/// `None` when `shutdown` came first.
pub(crate) async fn connect_unless_cancelled(
    config: &AmqpConfig,
    shutdown: &CancellationToken,
) -> Option<Result<Connection>> {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => None,
        connection = config.connect() => Some(connection),
    }
}

/// Sleeps `duration`; `false` if `shutdown` cut the pause short.
pub(crate) async fn pause(shutdown: &CancellationToken, duration: Duration) -> bool {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(duration) => true,
    }
}

/// The pause after `backoff` when the next attempt fails too: doubled, up to `max`.
pub(crate) fn next_backoff(backoff: Duration, max: Duration) -> Duration {
    (backoff * 2).min(max)
}

/// Opens a channel for `purpose` (named in the error).
pub(crate) async fn open_channel(connection: &Connection, purpose: &str) -> Result<Channel> {
    connection
        .create_channel()
        .await
        .map_err(|e| Error::amqp(format!("opening a channel for {purpose}"), e))
}

/// Opens a channel in confirm mode: the broker confirms each message it took
/// ([`publish_envelope`](crate::publish::publish_envelope), the relay, dead letters).
pub async fn confirm_channel(connection: &Connection) -> Result<Channel> {
    let channel = open_channel(connection, "publishing").await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| Error::amqp("enabling publisher confirms", e))?;
    Ok(channel)
}

/// A confirm-mode channel on `connection` within `timeout` (a silent broker never answers
/// `channel.open`); `Ok(None)` when `shutdown` came first.
pub(crate) async fn confirm_channel_within(
    connection: &Connection,
    timeout: Duration,
    shutdown: &CancellationToken,
) -> Result<Option<Channel>> {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => Ok(None),
        opened = tokio::time::timeout(timeout, confirm_channel(connection)) => match opened {
            Ok(channel) => channel.map(Some),
            Err(_) => Err(Error::ConnectionLost {
                reason: format!("RabbitMQ did not open a channel within {timeout:?}; the connection is unresponsive"),
            }),
        },
    }
}

/// Closes a channel we opened, bounded, ignoring a channel the broker already closed.
pub(crate) async fn close_channel(channel: &Channel) {
    if channel.status().connected() {
        match tokio::time::timeout(CLOSE_TIMEOUT, channel.close(200, "OK".into())).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(target: "svcdb_amqp::connection", error = %e, "closing a channel failed")
            }
            Err(_) => {
                tracing::debug!(target: "svcdb_amqp::connection", timeout = ?CLOSE_TIMEOUT, "closing a channel timed out")
            }
        }
    }
}

/// Closes a connection we opened, bounded: a dead broker must not stall shutdown.
pub(crate) async fn close_connection(connection: &Connection) {
    if connection.status().connected() {
        let close = connection.close(200, "OK".into());
        match tokio::time::timeout(CLOSE_TIMEOUT, close).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(target: "svcdb_amqp::connection", error = %e, "closing the connection failed")
            }
            Err(_) => {
                tracing::debug!(target: "svcdb_amqp::connection", timeout = ?CLOSE_TIMEOUT, "closing the connection timed out")
            }
        }
    }
}
