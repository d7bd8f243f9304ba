//! The libpq keys svcdb reads out of a `DATABASE_URL` itself (`sslmode`, `sslrootcert`,
//! `target_session_attrs`), leaving the rest, as written, to the driver.

use std::path::PathBuf;

use super::url::{refuse_ambiguous_credentials, url_body};
use crate::error::{Error, Result};
use crate::tls::TlsMode;
use tokio_postgres::config::TargetSessionAttrs;

/// A `DATABASE_URL` with the libpq keys svcdb reads itself taken out: the driver knows only
/// three `sslmode` values, refuses `sslrootcert`, and knows three of libpq's six
/// `target_session_attrs` (svcdb says which and why). Everything else is left as written, for
/// the driver.
#[derive(Default)]
pub(super) struct UrlParams {
    /// The URL or `key=value` string without `sslmode`, `sslrootcert` and
    /// `target_session_attrs`.
    pub(super) rest: String,
    /// The last `sslmode`, parsed.
    pub(super) mode: Option<TlsMode>,
    /// The last `sslrootcert`.
    pub(super) root_cert: Option<PathBuf>,
    /// The last `target_session_attrs`, parsed.
    pub(super) session_attrs: Option<TargetSessionAttrs>,
}

impl UrlParams {
    pub(super) fn take(database_url: &str) -> Result<Self> {
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
pub(super) fn parse_session_attrs(key: &str, value: &str) -> Result<TargetSessionAttrs> {
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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use crate::config::Config;
    use crate::error::Error;
    use crate::tls::TlsMode;

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
}
