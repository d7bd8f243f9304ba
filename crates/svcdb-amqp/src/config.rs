//! Where the broker is and how to talk to it: [`AmqpConfig`], from code or the environment,
//! and [`AmqpConfig::connect`].

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connection, ConnectionProperties};

use crate::error::{Error, Result};

/// The URL used when `AMQP_URL` is not set: RabbitMQ's out-of-the-box local broker.
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The default prefetch: room for 8 batches of the default
/// [`ConsumerOptions::batch`](crate::ConsumerOptions::batch) (16) in flight. A batch holds its
/// deliveries for its whole transaction, so at a prefetch of 32 only two batches ran at once,
/// each a chain of round trips: on a busy 2-CPU machine the consumer then fell behind a paced
/// 1 000 events/s that it handles with room to spare at 128 (`svcdb-bench events`, latency p50
/// 443 ms against 19 ms; docs/benchmarks.md). RabbitMQ: "values in the 100 through 300 range
/// usually offer optimal throughput and do not run significant risk of overwhelming
/// consumers" (<https://www.rabbitmq.com/docs/confirms#channel-qos-prefetch-throughput>).
/// The database work a consumer runs at once stays bounded by its pool: a consumer with
/// `batch = 1` handles at most the pool's size of deliveries at a time, and the rest wait in
/// the process (a slow handler of that kind may want a lower prefetch, so that other replicas
/// take the backlog).
pub const DEFAULT_PREFETCH: u16 = 128;

/// The default bound on connecting (TCP connect plus AMQP handshake).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The heartbeat timeout asked for, in seconds, when the URL names none (`?heartbeat=N` does;
/// `0` asks for none, and the broker's then applies). The lower of the client's and the
/// broker's wins; RabbitMQ proposes 60 s, and lapin gives up on a connection after two
/// timeouts without a byte, so a broker that froze with its sockets open (a paused VM, a
/// `SIGSTOP`, a partition that drops packets) went unnoticed for two minutes, its consumers
/// and relays "connected" and idle (found by a user trial). RabbitMQ: "values within the 5 to
/// 20 seconds range are optimal for most environments"
/// (<https://www.rabbitmq.com/docs/heartbeats#heartbeats-timeout>).
pub const DEFAULT_HEARTBEAT_SECS: u16 = 10;

/// The most replicas [`AmqpConfig::quorum_group_size`] asks for by default: RabbitMQ's advice
/// for quorum queues is an odd count, and 3 survives one node's loss (5 would survive two, at
/// the cost of every write going to 5 nodes;
/// <https://www.rabbitmq.com/docs/quorum-queues#replication-factor>).
pub const DEFAULT_MAX_QUORUM_GROUP_SIZE: u16 = 3;

/// How to reach RabbitMQ. `Debug` shows the URL without its password.
///
/// | environment variable | default | meaning |
/// |---|---|---|
/// | `AMQP_URL` | `amqp://guest:guest@127.0.0.1:5672/%2f` | `amqp://user:password@host:port/vhost` (`%2f` is the vhost `/`); for a cluster, one URL per node, comma-separated |
/// | `SVCDB_AMQP_PREFETCH` | `128` | unacknowledged messages a consumer holds at once (its concurrency bound, with the pool's size) |
/// | `SVCDB_AMQP_CONNECTION_NAME` | none | shown in the management UI's connection list |
/// | `SVCDB_AMQP_CONNECT_TIMEOUT` | `5s` | longest wait for TCP plus the AMQP handshake, per node |
/// | `SVCDB_AMQP_QUORUM_GROUP_SIZE` | the node count up to 3 with several URLs; the broker's choice with one | replicas of each quorum queue declared (`x-quorum-initial-group-size`) |
///
/// The URL usually holds a password. It never appears in `Debug` output, errors or logs:
/// they show [`redact_url`]'s form, `amqp://user@host:5672/%2f`.
///
/// # A cluster
///
/// `AMQP_URL=amqp://u:p@h1:5672/%2f,amqp://u:p@h2:5672/%2f,amqp://u:p@h3:5672/%2f` names
/// the nodes of one RabbitMQ cluster. [`AmqpConfig::connect`] tries them in turn, starting
/// with the node this configuration (and its clones) last connected to, and returns the first
/// connection made: when a node goes down, the consumer and the relay reconnect to the next
/// node that answers. When none does, the error ([`Error::NoNodeConnected`]) names each
/// node's failure, a refused login before a node that is down. A new URL starts wherever `,`
/// is followed by a scheme (`amqp://`), so a password holding `,` followed by a scheme must
/// write that comma as `%2C`.
#[derive(Clone)]
pub struct AmqpConfig {
    /// `amqp://user:password@host:port/vhost`, or several such URLs separated by commas, one
    /// per node of a cluster (see [`AmqpConfig`]'s "A cluster"). Held as given
    /// (lapin needs the password); shown only through [`redact_url`].
    pub url: String,
    /// Unacknowledged deliveries the broker sends one consumer before waiting for acks
    /// (`basic.qos`). Consumers handle at most this many messages at once; 0 is refused,
    /// because AMQP reads it as "unlimited".
    pub prefetch: u16,
    /// The connection name the management UI shows, so operators can tell services apart.
    pub connection_name: Option<String>,
    /// Longest wait for one connection attempt, TCP and handshake together: a black-holed
    /// host fails within this instead of hanging start-up.
    pub connect_timeout: Duration,
    /// Replicas of each quorum queue the [`Topology`](crate::Topology) declares
    /// (`x-quorum-initial-group-size`); `None` for the default, [`AmqpConfig::quorum_group_size`].
    /// It applies when a queue is created: RabbitMQ keeps an existing queue's replicas
    /// (`rabbitmq-queues grow` / `shrink` change them).
    pub quorum_group_size: Option<u16>,
    /// The index in [`AmqpConfig::urls`] of the node last connected to, shared by clones, so
    /// that a reconnection starts with the node that answered last rather than a dead first one.
    last_node: Arc<AtomicUsize>,
}

impl AmqpConfig {
    /// Makes the next [`AmqpConfig::connect`] start with the node after the one last
    /// connected to (for clones too): for leaving a node that answers but misbehaves.
    pub(crate) fn prefer_next_node(&self) {
        self.last_node.fetch_add(1, Ordering::Relaxed);
    }
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self::new(DEFAULT_URL)
    }
}

impl fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("url", &redact_url(&self.url))
            .field("prefetch", &self.prefetch)
            .field("connection_name", &self.connection_name)
            .field("connect_timeout", &self.connect_timeout)
            .field("quorum_group_size", &self.quorum_group_size)
            .finish()
    }
}

impl AmqpConfig {
    /// A configuration for `url` with every other setting at its default.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefetch: DEFAULT_PREFETCH,
            connection_name: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            quorum_group_size: None,
            last_node: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// A configuration for the nodes of one cluster, one URL each (see
    /// [`AmqpConfig::url`]), every other setting at its default.
    pub fn cluster<I, S>(urls: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let urls: Vec<String> = urls.into_iter().map(|u| u.as_ref().to_owned()).collect();
        Self::new(urls.join(","))
    }

    /// The URLs of [`AmqpConfig::url`], one per node, in the order given.
    pub fn urls(&self) -> Vec<&str> {
        split_urls(&self.url)
    }

    /// The replicas each quorum queue is declared with: [`AmqpConfig::quorum_group_size`] if
    /// set, else as many as the URLs name nodes, up to [`DEFAULT_MAX_QUORUM_GROUP_SIZE`]; with
    /// one URL, `None`: the broker's default (every cluster member, up to its own limit) then
    /// applies, since one URL says nothing about the cluster's size.
    pub fn quorum_group_size(&self) -> Option<u16> {
        self.quorum_group_size.or_else(|| {
            let nodes = self.urls().len();
            (nodes > 1).then(|| {
                u16::try_from(nodes).map_or(DEFAULT_MAX_QUORUM_GROUP_SIZE, |n| {
                    n.min(DEFAULT_MAX_QUORUM_GROUP_SIZE)
                })
            })
        })
    }

    /// Reads the configuration from the process environment (see the module table).
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|key| std::env::var(key).ok())
    }

    /// Reads the configuration through `lookup` (the environment, a map in tests, …).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let get = |key: &str| lookup(key).filter(|v| !v.trim().is_empty());
        let mut config = Self::new(get("AMQP_URL").unwrap_or_else(|| DEFAULT_URL.to_owned()));
        if let Some(v) = get("SVCDB_AMQP_PREFETCH") {
            config.prefetch = v.trim().parse().map_err(|_| {
                Error::config(
                    "SVCDB_AMQP_PREFETCH",
                    format!("{v:?} is not a count from 1 to 65535"),
                )
            })?;
        }
        config.connection_name = get("SVCDB_AMQP_CONNECTION_NAME");
        if let Some(v) = get("SVCDB_AMQP_CONNECT_TIMEOUT") {
            config.connect_timeout =
                svcdb::__private::parse_duration("SVCDB_AMQP_CONNECT_TIMEOUT", &v).map_err(
                    |e| match e {
                        svcdb::Error::Config { key, message } => Error::Config { key, message },
                        other => Error::Db(other),
                    },
                )?;
        }
        if let Some(v) = get("SVCDB_AMQP_QUORUM_GROUP_SIZE") {
            config.quorum_group_size = Some(v.trim().parse().map_err(|_| {
                Error::config(
                    "SVCDB_AMQP_QUORUM_GROUP_SIZE",
                    format!("{v:?} is not a replica count from 1 to 65535"),
                )
            })?);
        }
        config.validate()?;
        Ok(config)
    }

    /// Sets the connection name shown in the management UI.
    #[must_use]
    pub fn with_connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = Some(name.into());
        self
    }

    /// Sets the replicas of each quorum queue (see [`AmqpConfig::quorum_group_size`]).
    #[must_use]
    pub fn with_quorum_group_size(mut self, replicas: u16) -> Self {
        self.quorum_group_size = Some(replicas);
        self
    }

    /// Sets the prefetch (see [`AmqpConfig::prefetch`]).
    #[must_use]
    pub fn with_prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// The URL (every URL of a list) without its password, for messages.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    /// Checks the settings without touching the network; [`AmqpConfig::connect`] calls it.
    pub fn validate(&self) -> Result<()> {
        for url in self.urls() {
            let uri = parse_url(url)?;
            // lapin sends the vhost as an AMQP short string and panics on a longer one (found
            // by a user trial: `svcdb health` with a 300-byte vhost). No broker has such a
            // vhost, so it is a mistake in the URL.
            if uri.vhost.len() > svcdb::outbox::MAX_AMQP_NAME_BYTES {
                return Err(Error::config(
                    "AMQP_URL",
                    format!(
                        "the virtual host at the end of {}… is {} bytes long once decoded, and AMQP carries at most {}; check that path, which names the vhost (%2f is the default vhost /; rabbitmqctl list_vhosts shows the others)",
                        // Cut after redacting, so no part of the password shows.
                        redact_url(url).chars().take(80).collect::<String>(),
                        uri.vhost.len(),
                        svcdb::outbox::MAX_AMQP_NAME_BYTES
                    ),
                ));
            }
            if uri.scheme == AMQPScheme::AMQPS {
                return Err(Error::config(
                    "AMQP_URL",
                    format!(
                        "{} uses TLS (amqps://), which this build of svcdb-amqp does not include; use amqp:// inside a trusted network or a TLS-terminating sidecar",
                        redact_url(url)
                    ),
                ));
            }
        }
        if self.quorum_group_size == Some(0) {
            return Err(Error::config(
                "SVCDB_AMQP_QUORUM_GROUP_SIZE",
                "a quorum queue needs at least 1 replica; use the cluster's node count up to 3, or leave it unset",
            ));
        }
        if self.prefetch == 0 {
            return Err(Error::config(
                "SVCDB_AMQP_PREFETCH",
                "0 means unlimited in AMQP, which removes the bound on messages in flight; use a count such as 32",
            ));
        }
        if self.connect_timeout.is_zero() {
            return Err(Error::config(
                "SVCDB_AMQP_CONNECT_TIMEOUT",
                "0 leaves no time to connect; use a duration such as 5s",
            ));
        }
        Ok(())
    }

    /// Opens a connection, each attempt bounded by [`AmqpConfig::connect_timeout`], and says
    /// clearly why it failed: [`Error::Unreachable`] (refused, unresolvable),
    /// [`Error::AccessRefused`] (wrong user or password), [`Error::Refused`] (unknown vhost,
    /// …) or [`Error::ConnectTimeout`].
    ///
    /// With several URLs, tries each node once, starting with the one last connected to, and
    /// returns the first connection made; if none answers, [`Error::NoNodeConnected`] with
    /// every node's error, the most telling first (a refused login before a node that is down).
    ///
    /// Must be called inside a Tokio runtime: lapin runs its I/O on it.
    pub async fn connect(&self) -> Result<Connection> {
        self.validate()?;
        let urls = self.urls();
        let first = self.last_node.load(Ordering::Relaxed) % urls.len();
        let mut failures: Vec<Error> = Vec::new();
        for index in (first..urls.len()).chain(0..first) {
            if let Some(e) = failures.last() {
                tracing::info!(target: "svcdb_amqp::config", error = %e, "cannot connect to this RabbitMQ node; trying the next");
            }
            match self.connect_to(urls[index]).await {
                Ok(connection) => {
                    self.last_node.store(index, Ordering::Relaxed);
                    return Ok(connection);
                }
                Err(e) => failures.push(e),
            }
        }
        // One node's error as it is; several, each of them: found by a user trial, the last
        // node's "connection refused" hid that the node that was up refused the password.
        // Stable: within a kind, the order tried.
        failures.sort_by_key(crate::error::connect_failure_rank);
        match failures.len() {
            // split_urls never returns an empty list, so there was an attempt.
            0 => Err(Error::config(
                "AMQP_URL",
                "no URL given; write amqp://user:password@host:5672/%2f",
            )),
            1 => Err(failures.remove(0)),
            _ => Err(Error::NoNodeConnected { failures }),
        }
    }

    /// One connection attempt to one node's `url`.
    async fn connect_to(&self, url: &str) -> Result<Connection> {
        let mut uri = parse_url(url)?;
        let username = uri.authority.userinfo.username.clone();
        uri.query.heartbeat.get_or_insert(DEFAULT_HEARTBEAT_SECS);
        let redacted = redact_url(url);
        let mut properties = ConnectionProperties::default();
        if let Some(name) = &self.connection_name {
            properties = properties.with_connection_name(name.clone().into());
        }
        let attempt = Connection::connect_uri(uri, properties);
        match tokio::time::timeout(self.connect_timeout, attempt).await {
            Err(_) => Err(Error::ConnectTimeout {
                url: redacted,
                timeout: self.connect_timeout,
            }),
            Ok(Ok(connection)) => {
                tracing::debug!(target: "svcdb_amqp::config", url = %redacted, "connected to RabbitMQ");
                Ok(connection)
            }
            Ok(Err(e)) => Err(classify_connect_error(e, redacted, username)),
        }
    }
}

/// Parses one node's URL, with an error that shows it redacted.
fn parse_url(url: &str) -> Result<AMQPUri> {
    let invalid = |why: &str| {
        let redacted = redact_url(url);
        // lapin's "Invalid URL: '<url>'" repeats the whole input, password included.
        let why = why.replace(url, &redacted);
        Error::config(
            "AMQP_URL",
            format!(
                "{redacted} is not an AMQP URL ({why}); write amqp://user:password@host:5672/%2f, with any '/', '?', '#' or '@' in the password written as %2F, %3F, %23, %40 (and, in a list of URLs, a ',' as %2C)"
            ),
        )
    };
    // The URL parser takes `amqp:/user:password@host/%2f` (one slash) as a URL with no host
    // and the vhost `user:password@host/`, which the broker then names in its refusal:
    // password and all (found by a user trial).
    if !url.find("://").is_some_and(|end| is_scheme(&url[..end])) {
        return Err(invalid("no `//` after the scheme"));
    }
    AMQPUri::from_str(url).map_err(|e| invalid(&e))
}

/// Splits a list of URLs where a comma is followed by a scheme and `://`: `,amqp://` starts a
/// new URL, any other comma (in a password, a vhost, a query) belongs to the URL it is in.
/// Never empty: a string without such a comma is one URL.
fn split_urls(list: &str) -> Vec<&str> {
    let mut urls = Vec::new();
    let mut start = 0;
    for (comma, _) in list.match_indices(',') {
        if comma < start {
            continue;
        }
        let next = &list[comma + 1..];
        if next.find("://").is_some_and(|end| is_scheme(&next[..end])) {
            urls.push(&list[start..comma]);
            start = comma + 1;
        }
    }
    urls.push(&list[start..]);
    urls
}

/// Sorts a failed connection attempt into the variant that says what to fix.
fn classify_connect_error(e: lapin::Error, url: String, user: String) -> Error {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    match e.kind() {
        lapin::ErrorKind::IOError(io) => Error::Unreachable {
            url,
            reason: io.to_string(),
            cause: Box::new(e),
        },
        lapin::ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => Error::AccessRefused { url, user },
            _ => Error::Refused {
                url,
                reason: amqp.get_message().to_string(),
                cause: Box::new(e),
            },
        },
        _ => Error::Refused {
            url,
            reason: e.to_string(),
            cause: Box::new(e),
        },
    }
}

/// `url` with the password removed: `amqp://guest:secret@host:5672/%2f` becomes
/// `amqp://guest@host:5672/%2f`. Works on strings that do not parse, so even a malformed
/// URL is safe to print, and on lists of URLs (see [`AmqpConfig::url`]), each redacted.
///
/// In a list, a URL whose authority holds no `@` while a later one does is redacted together
/// with the URLs up to that `@`: its "next URL" may be the rest of a password that holds
/// `,amqp://`, and only the `@` shows where the credentials end.
///
/// The credentials are taken to run to the *last* `@`: a password may hold `@`, `/`, `?`,
/// `#` or `:` unencoded (`amqp://svc:ab/cd@host/%2f`), and then no parser agrees on where it
/// ends. A vhost or query with a raw `@` in it loses what comes before that `@` too: printing
/// too little is the safe side.
pub fn redact_url(url: &str) -> String {
    let urls = split_urls(url);
    if urls.len() == 1 {
        return redact_one(url);
    }
    let last_at = urls.iter().rposition(|piece| piece.contains('@'));
    let mut redacted = Vec::new();
    // Byte offsets in `url`: the pieces are consecutive slices of it, one ',' apart.
    let (mut group_start, mut offset) = (0, 0);
    for (i, piece) in urls.iter().enumerate() {
        let end = offset + piece.len();
        if piece.contains('@') || last_at.is_none_or(|last| i > last) {
            redacted.push(redact_one(&url[group_start..end]));
            group_start = end + 1;
        }
        offset = end + 1;
    }
    redacted.join(",")
}

/// [`redact_url`] for one URL.
fn redact_one(url: &str) -> String {
    // Only a real scheme counts: a "://" inside a password of a scheme-less string does not.
    let rest_start = url
        .find("://")
        .filter(|&end| is_scheme(&url[..end]))
        .map(|end| end + 3);
    let Some(rest_start) = rest_start else {
        // Not a URL; if it looks like it holds credentials, drop everything before the '@'.
        return match url.rfind('@') {
            Some(at) => format!("***{}", &url[at..]),
            None => url.to_owned(),
        };
    };
    let rest = &url[rest_start..];
    let Some(at) = rest.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &rest[..at];
    match userinfo.find(':') {
        Some(colon) => format!(
            "{}{}{}",
            &url[..rest_start],
            &userinfo[..colon],
            &rest[at..]
        ),
        // A user name and no password.
        None => url.to_owned(),
    }
}

/// RFC 3986's scheme: a letter, then letters, digits, `+`, `-` or `.`.
fn is_scheme(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Found by a user trial: `amqp:/guest:secret@host/%2f` parsed as a URL whose vhost held
    /// the password, and the broker's "vhost … not found" printed it.
    #[test]
    fn a_url_without_its_two_slashes_is_refused_and_its_password_not_shown() {
        for url in [
            "amqp:/guest:SECRETX@127.0.0.1/%2f",
            "amqp:guest:SECRETX@127.0.0.1/%2f",
            "amqps:/guest:SECRETX@127.0.0.1:5671/%2f",
        ] {
            match parse_url(url) {
                Err(e @ Error::Config { .. }) => {
                    assert!(!e.to_string().contains("SECRETX"), "{e}");
                }
                other => panic!("{url}: expected a refusal, got {other:?}"),
            }
        }
        // The control: with both slashes, the same URL is taken.
        parse_url("amqp://guest:SECRETX@127.0.0.1/%2f").unwrap();
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("amqp://guest:s3cr:et@host:5672/%2f"),
            "amqp://guest@host:5672/%2f"
        );
        assert_eq!(redact_url("amqp://u:p@h"), "amqp://u@h");
        // Unencoded '/', '?', '#', '@' and ':' in the password.
        for password in ["ab/cd", "a?b", "a#b", "a@b", "a:b", "a/b@c?d#e:f", "x://y"] {
            assert_eq!(
                redact_url(&format!("amqp://svc:{password}@host/%2f")),
                "amqp://svc@host/%2f",
                "{password}"
            );
        }
        assert_eq!(redact_url("u:x://y@host"), "***@host");
        // A raw '@' after the host: over-redacted rather than guessed at.
        assert_eq!(redact_url("amqp://h:5672/v?x=@"), "amqp://h@");
        assert_eq!(redact_url("amqp://u@h/v"), "amqp://u@h/v");
        assert_eq!(redact_url("amqp://h/%2f"), "amqp://h/%2f");
        assert_eq!(redact_url("u:pw@host"), "***@host");
    }

    #[test]
    fn a_list_of_urls_is_split_where_a_url_starts() {
        let list = "amqp://u:p@h1:5681/%2f,amqp://u:p@h2:5682/%2f";
        let config = AmqpConfig::new(list);
        assert_eq!(
            config.urls(),
            ["amqp://u:p@h1:5681/%2f", "amqp://u:p@h2:5682/%2f"]
        );
        assert_eq!(AmqpConfig::cluster(config.urls()).url, list);
        // A comma not followed by a scheme is part of the URL it is in.
        let one = "amqp://u:a,b@h/%2f";
        assert_eq!(AmqpConfig::new(one).urls(), [one]);
        assert_eq!(
            redact_url(list),
            "amqp://u@h1:5681/%2f,amqp://u@h2:5682/%2f"
        );
        // A password holding ",amqp://" is redacted up to the '@' that ends it.
        assert_eq!(
            redact_url("amqp://u:a,amqp://b@h/%2f,amqp://u:p@h2/%2f"),
            "amqp://u@h/%2f,amqp://u@h2/%2f"
        );
        // A URL without credentials before one with: redacted together (too much, not too
        // little).
        assert_eq!(
            redact_url("amqp://h1/%2f,amqp://u:p@h2/%2f,amqp://h3/%2f"),
            "amqp://h1/%2f,amqp@h2/%2f,amqp://h3/%2f"
        );
        let bad = AmqpConfig::new("amqp://svc:hunter2@h1/%2f,amqps://svc:hunter2@h2/%2f");
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("amqps://svc@h2/%2f"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn quorum_replicas_follow_the_node_count_up_to_three() {
        let node = |port: u16| format!("amqp://u:p@h:{port}/%2f");
        assert_eq!(AmqpConfig::new(node(1)).quorum_group_size(), None);
        assert_eq!(
            AmqpConfig::cluster([node(1), node(2)]).quorum_group_size(),
            Some(2)
        );
        let five = AmqpConfig::cluster((1..=5).map(node));
        assert_eq!(five.quorum_group_size(), Some(3));
        assert_eq!(five.with_quorum_group_size(5).quorum_group_size(), Some(5));
        let env = |key: &str| match key {
            "AMQP_URL" => Some(node(1)),
            "SVCDB_AMQP_QUORUM_GROUP_SIZE" => Some("2".to_owned()),
            _ => None,
        };
        assert_eq!(
            AmqpConfig::from_lookup(env).unwrap().quorum_group_size(),
            Some(2)
        );
        for value in ["0", "three"] {
            let env = |key: &str| (key == "SVCDB_AMQP_QUORUM_GROUP_SIZE").then(|| value.to_owned());
            let e = AmqpConfig::from_lookup(env).unwrap_err();
            assert!(
                matches!(&e, Error::Config { key, .. } if key == "SVCDB_AMQP_QUORUM_GROUP_SIZE"),
                "{e}"
            );
        }
    }

    #[test]
    fn debug_and_errors_hide_the_password() {
        let config = AmqpConfig::new("amqp://svc:hunter2@127.0.0.1:5672/%2f");
        assert!(!format!("{config:?}").contains("hunter2"));
        let bad = AmqpConfig::new("amqps://svc:hunter2@127.0.0.1:5671/%2f");
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("amqps://svc@127.0.0.1:5671/%2f"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        let bad = AmqpConfig::new("http://svc:hunter2@host");
        let e = bad.validate().unwrap_err().to_string();
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn reads_the_environment() {
        let env: HashMap<&str, &str> = [
            ("AMQP_URL", "amqp://a:b@h:1/v"),
            ("SVCDB_AMQP_PREFETCH", "7"),
            ("SVCDB_AMQP_CONNECTION_NAME", "orders"),
            ("SVCDB_AMQP_CONNECT_TIMEOUT", "250ms"),
        ]
        .into();
        let config = AmqpConfig::from_lookup(|k| env.get(k).map(|v| v.to_string())).unwrap();
        assert_eq!(config.prefetch, 7);
        assert_eq!(config.connection_name.as_deref(), Some("orders"));
        assert_eq!(config.connect_timeout, Duration::from_millis(250));

        let defaults = AmqpConfig::from_lookup(|_| None).unwrap();
        assert_eq!(defaults.url, DEFAULT_URL);
        assert_eq!(defaults.prefetch, DEFAULT_PREFETCH);

        for (key, value) in [
            ("SVCDB_AMQP_PREFETCH", "0"),
            ("SVCDB_AMQP_PREFETCH", "lots"),
            ("SVCDB_AMQP_CONNECT_TIMEOUT", "soon"),
        ] {
            let e = AmqpConfig::from_lookup(|k| (k == key).then(|| value.to_string())).unwrap_err();
            assert!(
                matches!(&e, Error::Config { key: k, .. } if k == key),
                "{e}"
            );
        }
    }

    #[test]
    fn an_empty_amqp_url_is_unset() {
        for empty in ["", "  \t"] {
            let config =
                AmqpConfig::from_lookup(|k| (k == "AMQP_URL").then(|| empty.to_owned())).unwrap();
            assert_eq!(config.url, DEFAULT_URL, "{empty:?}");
        }
    }

    /// Found by a user trial: `svcdb health --amqp-url amqp://…/<300 bytes>` panicked in lapin,
    /// which sends the vhost as an AMQP short string.
    #[test]
    fn a_vhost_amqp_cannot_carry_is_a_config_error() {
        let url = |vhost: &str| format!("amqp://svc:hunter2@127.0.0.1:5672/{vhost}");
        for vhost in ["v".repeat(256), "v".repeat(300), "%C3%A9".repeat(128)] {
            for config in [
                AmqpConfig::new(url(&vhost)),
                AmqpConfig::cluster([url("%2f"), url(&vhost)]),
            ] {
                let e = config.validate().unwrap_err();
                assert!(
                    matches!(&e, Error::Config { key, .. } if key == "AMQP_URL"),
                    "{e}"
                );
                assert!(!format!("{e} {e:?}").contains("hunter2"), "{e}");
            }
            let env = |key: &str| (key == "AMQP_URL").then(|| url(&vhost));
            assert!(AmqpConfig::from_lookup(env).is_err());
        }
        // The control: 255 bytes once decoded fit, however long the encoded form.
        for vhost in ["v".repeat(255), "%2f".repeat(255)] {
            AmqpConfig::new(url(&vhost)).validate().unwrap();
        }
    }

    use proptest::prelude::*;

    proptest! {
        #[test]
        fn no_connect_timeout_setting_panics(text in prop_oneof![
            any::<f64>().prop_map(|x| format!("{x:e}")),
            any::<u128>().prop_map(|x| format!("{x}s")),
            "\\PC{0,24}",
        ]) {
            let env = |key: &str| (key == "SVCDB_AMQP_CONNECT_TIMEOUT").then(|| text.clone());
            match AmqpConfig::from_lookup(env) {
                // Connecting bounds itself with tokio's timeout, which saturates.
                Ok(config) => prop_assert!(!config.connect_timeout.is_zero()),
                Err(e) => prop_assert!(
                    matches!(&e, Error::Config { key, .. } if key == "SVCDB_AMQP_CONNECT_TIMEOUT"),
                    "{text:?}: {e:?}"
                ),
            }
        }
    }
}
