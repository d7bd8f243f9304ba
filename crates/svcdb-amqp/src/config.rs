//! Where the broker is and how to talk to it: [`AmqpConfig`], from code or the environment,
//! and [`AmqpConfig::connect`].

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connection, ConnectionProperties};

use crate::error::{Error, Result};

/// The URL used when `AMQP_URL` is not set: RabbitMQ's out-of-the-box local broker.
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The default prefetch: enough messages in flight to keep a few database connections busy,
/// few enough that a slow handler does not hoard a queue's backlog from other replicas.
pub const DEFAULT_PREFETCH: u16 = 32;

/// The default bound on connecting (TCP connect plus AMQP handshake).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How to reach RabbitMQ. `Debug` shows the URL without its password.
///
/// | environment variable | default | meaning |
/// |---|---|---|
/// | `AMQP_URL` | `amqp://guest:guest@127.0.0.1:5672/%2f` | `amqp://user:password@host:port/vhost` (`%2f` is the vhost `/`) |
/// | `SVCDB_AMQP_PREFETCH` | `32` | unacknowledged messages a consumer holds at once (its concurrency bound) |
/// | `SVCDB_AMQP_CONNECTION_NAME` | none | shown in the management UI's connection list |
/// | `SVCDB_AMQP_CONNECT_TIMEOUT` | `5s` | longest wait for TCP plus the AMQP handshake |
///
/// The URL usually holds a password. It never appears in `Debug` output, errors or logs:
/// they show [`redact_url`]'s form, `amqp://user@host:5672/%2f`.
#[derive(Clone)]
pub struct AmqpConfig {
    /// `amqp://user:password@host:port/vhost`. Held as given (lapin needs the password);
    /// shown only through [`redact_url`].
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
        }
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
        config.validate()?;
        Ok(config)
    }

    /// Sets the connection name shown in the management UI.
    #[must_use]
    pub fn with_connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = Some(name.into());
        self
    }

    /// Sets the prefetch (see [`AmqpConfig::prefetch`]).
    #[must_use]
    pub fn with_prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// The URL without its password, for messages.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    /// Checks the settings without touching the network; [`AmqpConfig::connect`] calls it.
    pub fn validate(&self) -> Result<()> {
        let uri = self.parse_url()?;
        if uri.scheme == AMQPScheme::AMQPS {
            return Err(Error::config(
                "AMQP_URL",
                format!(
                    "{} uses TLS (amqps://), which this build of svcdb-amqp does not include; use amqp:// inside a trusted network or a TLS-terminating sidecar",
                    self.redacted_url()
                ),
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

    fn parse_url(&self) -> Result<AMQPUri> {
        AMQPUri::from_str(&self.url).map_err(|e| {
            let url = self.redacted_url();
            // lapin's "Invalid URL: '<url>'" repeats the whole input, password included.
            let why = e.replace(&self.url, &url);
            Error::config(
                "AMQP_URL",
                format!(
                    "{url} is not an AMQP URL ({why}); write amqp://user:password@host:5672/%2f, with any '/', '?', '#' or '@' in the password written as %2F, %3F, %23, %40"
                ),
            )
        })
    }

    /// Opens a connection, bounded by [`AmqpConfig::connect_timeout`], and says clearly why
    /// it failed: [`Error::Unreachable`] (refused, unresolvable), [`Error::AccessRefused`]
    /// (wrong user or password), [`Error::Refused`] (unknown vhost, …) or
    /// [`Error::ConnectTimeout`].
    ///
    /// Must be called inside a Tokio runtime: lapin runs its I/O on it.
    pub async fn connect(&self) -> Result<Connection> {
        let uri = self.parse_url()?;
        self.validate()?;
        let url = self.redacted_url();
        let mut properties = ConnectionProperties::default();
        if let Some(name) = &self.connection_name {
            properties = properties.with_connection_name(name.clone().into());
        }
        let attempt = Connection::connect(&self.url, properties);
        match tokio::time::timeout(self.connect_timeout, attempt).await {
            Err(_) => Err(Error::ConnectTimeout {
                url,
                timeout: self.connect_timeout,
            }),
            Ok(Ok(connection)) => {
                tracing::debug!(target: "svcdb_amqp::config", %url, "connected to RabbitMQ");
                Ok(connection)
            }
            Ok(Err(e)) => Err(classify_connect_error(
                e,
                url,
                uri.authority.userinfo.username,
            )),
        }
    }
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
/// URL is safe to print.
///
/// The credentials are taken to run to the *last* `@`: a password may hold `@`, `/`, `?`,
/// `#` or `:` unencoded (`amqp://svc:ab/cd@host/%2f`), and then no parser agrees on where it
/// ends. A vhost or query with a raw `@` in it loses what comes before that `@` too: printing
/// too little is the safe side.
pub fn redact_url(url: &str) -> String {
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
