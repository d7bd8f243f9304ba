//! The crate's error type.

use std::time::Duration;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong talking to RabbitMQ (and, through the outbox, PostgreSQL).
///
/// Match on the variant for the kind of failure; the `Display` text says what went wrong and
/// what to do, and may change. As in svcdb ([`svcdb::error`]), a cause shown in the message is
/// not also the error's `source()`: print an error with `{e}`, or a chain of them with
/// [`svcdb::error::Report`]. No variant carries an AMQP URL with its password: URLs are
/// stored redacted ([`crate::config::redact_url`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is missing or malformed.
    #[error("invalid AMQP configuration: {key}: {message}")]
    Config {
        /// The setting (environment variable or field) at fault.
        key: String,
        /// What is wrong with it and what to do.
        message: String,
    },

    /// An exchange, queue or event kind name was refused before anything was sent.
    #[error("invalid {what} name {name:?}: {reason}")]
    InvalidName {
        /// What the name is for: `"exchange"`, `"queue"`, `"event kind"`, …
        what: &'static str,
        /// The name as given (cut to 80 characters).
        name: String,
        /// What is wrong with it and what it should be.
        reason: String,
    },

    /// No TCP connection to the broker: refused, unresolvable host, network down.
    #[error("cannot reach RabbitMQ at {url}: {reason}\n  hint: check that RabbitMQ is running and that AMQP_URL names the right host and port")]
    Unreachable {
        /// The URL, without its password.
        url: String,
        /// The I/O error's message.
        reason: String,
        /// lapin's error (boxed: it is large, and errors travel through every `Result`; shown
        /// in the message, so not the error's `source()`).
        cause: Box<lapin::Error>,
    },

    /// The connection (TCP and AMQP handshake) did not complete in time.
    #[error("timed out after {timeout:?} connecting to RabbitMQ at {url}\n  hint: check that the host and port in AMQP_URL are RabbitMQ's AMQP listener (5672), not a firewalled or HTTP port")]
    ConnectTimeout {
        /// The URL, without its password.
        url: String,
        /// The bound that expired.
        timeout: Duration,
    },

    /// The broker refused the login (`ACCESS_REFUSED`): wrong user or password, or the user
    /// may not use the virtual host.
    #[error("RabbitMQ at {url} refused the login of user {user:?} (ACCESS_REFUSED)\n  hint: check the user and password in AMQP_URL, and that the user has permissions on the vhost (rabbitmqctl list_permissions)")]
    AccessRefused {
        /// The URL, without its password.
        url: String,
        /// The user that was refused.
        user: String,
    },

    /// No node of a list of URLs (a cluster, see [`AmqpConfig`](crate::AmqpConfig)) took the
    /// connection: each node's failure, the most telling first (a refused login, then another
    /// refusal, a timeout, an unreachable node), each node in the order tried within its kind.
    /// The message names every node's failure and gives their hints, the first failure's first:
    /// a node that refused the login must not hide behind one that is down.
    ///
    /// With one URL, [`AmqpConfig::connect`](crate::AmqpConfig::connect) returns that node's
    /// error itself.
    #[error("{}", Nodes(failures))]
    NoNodeConnected {
        /// One error per node ([`Error::AccessRefused`], [`Error::Refused`],
        /// [`Error::ConnectTimeout`], [`Error::Unreachable`]), the most telling first.
        failures: Vec<Error>,
    },

    /// The broker closed the connection during the handshake for another reason, such as a
    /// virtual host that does not exist (`NOT_ALLOWED`).
    #[error("RabbitMQ at {url} refused the connection: {reason}\n  hint: check the virtual host at the end of AMQP_URL (`%2f` is the default vhost `/`)")]
    Refused {
        /// The URL, without its password.
        url: String,
        /// The broker's reply text.
        reason: String,
        /// lapin's error (boxed: it is large, and errors travel through every `Result`; shown
        /// in the message, so not the error's `source()`).
        cause: Box<lapin::Error>,
    },

    /// An AMQP operation failed: a declaration the broker refused, a publish on a closed
    /// channel, …
    #[error("{action} failed: {cause}{}", amqp_hint(cause))]
    Amqp {
        /// What was being done: `"declaring queue orders.reserve-stock"`.
        action: String,
        /// lapin's error, with the broker's reply code and text when it sent one (boxed: it
        /// is large; shown in the message, so not the error's `source()`).
        cause: Box<lapin::Error>,
    },

    /// The broker did not confirm a publish within the timeout; it may or may not have taken
    /// the message.
    #[error("the broker did not confirm {what} within {timeout:?}; it is retried (consumers absorb the duplicate if it did arrive)")]
    ConfirmTimeout {
        /// What was published.
        what: String,
        /// The bound that expired.
        timeout: Duration,
    },

    /// The broker answered a publish with a negative confirm, or returned it as unroutable.
    #[error("the broker did not take {what}: {reason}")]
    NotConfirmed {
        /// What was published.
        what: String,
        /// Why: nacked, or returned with the broker's reply text.
        reason: String,
    },

    /// The connection or the consumer's channel went away while consuming.
    #[error("lost the connection to RabbitMQ: {reason}; unacknowledged messages are redelivered once a consumer is back")]
    ConnectionLost {
        /// What lapin or the broker reported.
        reason: String,
    },

    /// A database error, from svcdb.
    #[error(transparent)]
    Db(#[from] svcdb::Error),

    /// A queue named to [`replay_dead_letters`](crate::replay_dead_letters) does not exist (a
    /// replay creates none: nothing would consume it).
    #[error("queue {queue:?} does not exist on this broker\n  hint: {}", queue_not_found_hint(.dead_letters_of.as_deref()))]
    QueueNotFound {
        /// The queue.
        queue: String,
        /// When `queue` is a dead-letter queue: the queue named, whose dead letters it holds
        /// (it exists).
        dead_letters_of: Option<String>,
    },

    /// [`replay_dead_letters`](crate::replay_dead_letters) stopped part-way: the messages moved
    /// before the failure stay moved, the rest wait in the dead-letter queue.
    #[error("{cause}\n  {replayed} message{} had been moved back before it; the rest are still in the dead-letter queue\n  hint: run the replay again once the cause is fixed (a message moved twice is absorbed by the consumer's claims)", if *replayed == 1 { "" } else { "s" })]
    ReplayStopped {
        /// Messages moved back before the failure.
        replayed: u64,
        /// What stopped it.
        cause: Box<Error>,
    },
}

/// What to do about a missing queue: the dead-letter queue of an existing `dead_letters_of`,
/// or a queue named wrong. Found by a user trial: the hint said to drop a `.dlq` suffix the
/// user never typed, because the missing queue (the dead-letter one) always has it.
fn queue_not_found_hint(dead_letters_of: Option<&str>) -> String {
    match dead_letters_of {
        Some(named) if named.ends_with(crate::topology::DEAD_LETTER_QUEUE_SUFFIX) => {
            "name the consumer's queue, without its dead-letter suffix".to_owned()
        }
        Some(named) => format!(
            "queue {named:?} has no dead-letter queue: svcdb declares one with each queue of its topology (QueueSpec), so this queue was declared otherwise, or under another name; there is nothing of it to replay"
        ),
        None => "check the name (`rabbitmqctl list_queues name messages`) and the vhost in AMQP_URL"
            .to_owned(),
    }
}

impl Error {
    /// True when the broker answered that the exchange or queue named does not exist
    /// (`NOT_FOUND`, 404).
    pub fn is_not_found(&self) -> bool {
        use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
        match self {
            Error::QueueNotFound { .. } => true,
            Error::ReplayStopped { cause, .. } => cause.is_not_found(),
            Error::Amqp { cause, .. } => matches!(
                cause.kind(),
                lapin::ErrorKind::ProtocolError(amqp)
                    if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
            ),
            _ => false,
        }
    }

    /// True when the cause is the connection rather than the request: unreachable, timed
    /// out, lost, or an AMQP operation that failed on I/O or a connection-level error.
    /// Reconnecting (with backoff) may help; repeating the same declaration will not. For
    /// [`Error::NoNodeConnected`], only when every node's failure is one: a node that answered
    /// and refused (a password, a vhost) will refuse again.
    pub fn is_connection_error(&self) -> bool {
        match self {
            Error::Unreachable { .. }
            | Error::ConnectTimeout { .. }
            | Error::ConnectionLost { .. } => true,
            Error::Amqp { cause, .. } => is_connection_level(cause),
            Error::ReplayStopped { cause, .. } => cause.is_connection_error(),
            // A node that answered and refused (a password, a vhost) refuses the same on the
            // next attempt: the nodes of a cluster share their users and vhosts.
            Error::NoNodeConnected { failures } => failures.iter().all(Error::is_connection_error),
            _ => false,
        }
    }

    pub(crate) fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config {
            key: key.into(),
            message: message.into(),
        }
    }

    pub(crate) fn amqp(action: impl Into<String>, cause: lapin::Error) -> Self {
        Error::Amqp {
            action: action.into(),
            cause: Box::new(cause),
        }
    }
}

/// [`Error::NoNodeConnected`]'s message: a line per node's failure, then each distinct hint
/// once, in the order of the failures (so the most telling failure's hint comes first), each
/// failure split into its message and hints as [`svcdb::error::Report`] splits them.
struct Nodes<'a>(&'a [Error]);

impl std::fmt::Display for Nodes<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "none of the {} RabbitMQ nodes in AMQP_URL took the connection:",
            self.0.len()
        )?;
        let mut hints: Vec<String> = Vec::new();
        for failure in self.0 {
            let report = svcdb::error::Report::new(failure);
            write!(f, "\n  {}", report.message())?;
            for hint in report.hints() {
                if !hints.contains(hint) {
                    hints.push(hint.clone());
                }
            }
        }
        hints
            .iter()
            .try_for_each(|hint| write!(f, "\n  hint: {hint}"))
    }
}

/// How much a failed connection attempt tells about what to fix, most first: a broker that
/// answered and refused names the fault (a password, a vhost); a timeout or a node that is
/// down may be one node's trouble.
pub(crate) fn connect_failure_rank(e: &Error) -> u8 {
    match e {
        Error::AccessRefused { .. } => 0,
        Error::Refused { .. } => 1,
        Error::ConnectTimeout { .. } => 3,
        Error::Unreachable { .. } => 4,
        _ => 2,
    }
}

/// True for errors that mean the connection itself is gone or unusable.
///
/// That includes an operation refused because its channel is in lapin's `Error` state, which
/// lapin gives every channel of a connection that failed (`set_connection_error`), and no
/// channel otherwise (a channel the broker closed is `Closed`). Found by the shop's demo: a
/// consumer reconnecting just as the new connection was cut got "invalid channel state:
/// Error" from `basic.qos`, took it for a fault of its own and stopped the service.
pub(crate) fn is_connection_level(e: &lapin::Error) -> bool {
    use lapin::{ChannelState, ErrorKind};
    e.is_io_error()
        || e.is_amqp_hard_error()
        || matches!(
            e.kind(),
            ErrorKind::InvalidConnectionState(_)
                | ErrorKind::MissingHeartbeatError
                | ErrorKind::InvalidChannelState(ChannelState::Error, _)
        )
}

/// A hint for the broker replies people meet while declaring topology.
fn amqp_hint(e: &lapin::Error) -> &'static str {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    let lapin::ErrorKind::ProtocolError(amqp) = e.kind() else {
        return "";
    };
    match amqp.kind() {
        AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => {
            "\n  hint: it exists with other arguments (type, durability, dead-letter settings); delete it or declare it as it is"
        }
        AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => {
            "\n  hint: declare the exchange or queue first (a service declares what it names in Service::publishes and Service::subscribe; otherwise topology::Topology::declare)"
        }
        AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => {
            "\n  hint: the user lacks configure/write/read permission on this resource (rabbitmqctl set_permissions)"
        }
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use lapin::{ChannelState, ErrorKind};

    use super::*;

    #[test]
    fn a_channel_failed_with_its_connection_is_a_connection_error_and_one_the_broker_closed_is_not()
    {
        // What the shop's demo met: `basic.qos` on a channel whose new connection was cut.
        let failed = Error::amqp(
            "setting prefetch 4 on orders",
            ErrorKind::InvalidChannelState(ChannelState::Error, "basic.qos").into(),
        );
        assert!(failed.is_connection_error(), "{failed}");
        // A channel the broker closed (a refused declaration, say) stays the request's fault.
        let closed = Error::amqp(
            "declaring queue orders",
            ErrorKind::InvalidChannelState(ChannelState::Closed, "queue.declare").into(),
        );
        assert!(!closed.is_connection_error(), "{closed}");
    }
}
