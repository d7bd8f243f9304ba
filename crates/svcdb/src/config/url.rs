//! Parsing a `DATABASE_URL` for the driver, and naming its hosts in messages: never a piece of
//! the password, in an error or a description.

use crate::error::{Error, Result};

/// Parses a `DATABASE_URL` (URL or `key=value` form) as the driver does: of `sslmode` it knows
/// `disable`, `prefer` and `require`, and `sslrootcert` it refuses;
/// [`Config::new`](super::Config::new) takes every libpq TLS setting. The error never repeats
/// the input, which may hold a password.
pub fn parse_url(database_url: &str) -> Result<tokio_postgres::Config> {
    // Another database's URL (`mysql://…`): said as such, not as a parse error deep inside.
    // Only the scheme is shown: the rest may hold a password.
    if let Some((scheme, _)) = database_url.split_once("://") {
        if !["postgres", "postgresql"].contains(&scheme.to_ascii_lowercase().as_str()) {
            return Err(Error::config(
                "DATABASE_URL",
                format!(
                    "is a {}:// URL; svcdb needs a PostgreSQL one, postgres://user[:password]@host[:port]/dbname",
                    scheme.chars().filter(char::is_ascii_alphanumeric).take(20).collect::<String>()
                ),
            ));
        }
    }
    // Found by a user trial: `svc@db/shop` (the scheme left out) was read as key=value pairs
    // and refused with the driver's "unexpected EOF".
    if url_body(database_url).is_none() && !database_url.contains('=') {
        return Err(Error::config(
            "DATABASE_URL",
            "is neither a URL nor key=value pairs; write postgres://user[:password]@host[:port]/dbname (the scheme included)",
        ));
    }
    refuse_ambiguous_credentials(database_url)?;
    refuse_bad_percent_escapes(database_url)?;
    database_url.parse().map_err(|e: tokio_postgres::Error| {
        let why = std::error::Error::source(&e)
            .map(ToString::to_string)
            .unwrap_or_else(|| e.to_string());
        Error::config(
            "DATABASE_URL",
            format!(
                "cannot parse it ({}); expected postgres://user[:password]@host[:port]/dbname",
                without_input(&why, url_body(database_url).is_some())
            ),
        )
    })
}

/// Refuses a URL with more than one '@'. The driver (like libpq) ends the credentials at the
/// first: a second means a password (or user) with an unencoded '@', whose tail the driver
/// would take for the host, the database or a parameter, and print in errors.
pub(super) fn refuse_ambiguous_credentials(database_url: &str) -> Result<()> {
    match url_body(database_url) {
        Some(body) if body.matches('@').count() > 1 => Err(Error::config(
            "DATABASE_URL",
            "holds more than one '@'; write an '@' in the user name, password or a parameter as %40",
        )),
        _ => Ok(()),
    }
}

/// Refuses a URL with a `%` not followed by two hex digits: libpq refuses it ("invalid
/// percent-encoded token"), where the driver keeps it as it is (found by a user trial: a
/// password `Hunter2%ZZSecret` was taken literally, and failed only as a wrong password
/// against a server that decodes nothing). Named without the text around it, which may be a
/// password.
fn refuse_bad_percent_escapes(database_url: &str) -> Result<()> {
    let Some(body) = url_body(database_url) else {
        return Ok(());
    };
    let bytes = body.as_bytes();
    let bad = bytes.iter().enumerate().any(|(i, &b)| {
        b == b'%'
            && !(bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
    });
    if bad {
        return Err(Error::config(
            "DATABASE_URL",
            "holds a '%' that is not followed by two hex digits, as libpq refuses it; write a literal '%' (in a password, say) as %25",
        ));
    }
    Ok(())
}

/// A URL's text after `postgres://` or `postgresql://`; `None` for `key=value` pairs.
pub(super) fn url_body(database_url: &str) -> Option<&str> {
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
/// messages name only fixed option names. `url`: the text is a URL, whose query parameters
/// are split at `&` and `=` (where `key=value` pairs split at spaces).
fn without_input(why: &str, url: bool) -> String {
    if let Some(name) = why
        .strip_prefix("unknown option `")
        .and_then(|rest| rest.strip_suffix('`'))
    {
        return if LIBPQ_ONLY_KEYWORDS.contains(&name) {
            format!("libpq's option `{name}`, which this driver does not support")
        } else if url {
            // Found by a user trial: the advice on quoting spaces is for key=value pairs.
            "a query parameter it does not know, not named here since it may be part of a password (`?password=a&b` splits at the `&`): check the parameter names, and write a password's `&`, `=` or `%` as %26, %3D or %25".into()
        } else {
            "an option it does not know, not named here since it may be part of a password; quote a password holding spaces: password='…'".into()
        };
    }
    match why.find(": expected `") {
        Some(cut) if why.starts_with("unexpected character") => why[..cut].to_owned(),
        _ => why.to_owned(),
    }
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
            // An IPv6 address in brackets, as URLs write it: `::1:5432` reads as another
            // address (found by a user trial).
            if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            }
        })
        .collect::<Vec<_>>()
        .join(",");
    let user = pg.get_user().unwrap_or("?");
    let db = pg.get_dbname().unwrap_or(user);
    format!("{user}@{hosts}/{db}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn another_databases_url_is_named_by_its_scheme_only() {
        let e = super::parse_url("mysql://root:s3cret@db/shop").unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, crate::Error::Config { .. }), "{text}");
        assert!(
            text.contains("mysql://") && !text.contains("s3cret"),
            "{text}"
        );
        assert!(
            super::parse_url("postgresql://svc@db/shop").is_ok(),
            "the control"
        );
    }

    #[test]
    fn a_url_without_its_scheme_is_refused_as_such_without_repeating_it() {
        for url in [
            "svc:s3cret@db/shop",
            "db:5432/shop",
            "postgres:/svc:s3cret@db/shop",
        ] {
            let e = super::parse_url(url).unwrap_err();
            let text = e.to_string();
            assert!(matches!(e, crate::Error::Config { .. }), "{text}");
            assert!(text.contains("the scheme"), "{url}: {text}");
            assert!(!text.contains("s3cret"), "{text}");
        }
        // The controls: key=value pairs are no URL and are read.
        assert!(super::parse_url("host=db user=svc dbname=shop").is_ok());
        assert!(super::parse_url("postgres://svc@db/shop").is_ok());
    }

    #[test]
    fn a_percent_sign_that_escapes_nothing_is_refused_without_repeating_it() {
        for url in [
            "postgres://svc:Hunter2%ZZSecret@db/shop",
            "postgres://svc:50%@db/shop",
            "postgres://svc@db/shop?application_name=a%2",
        ] {
            let e = super::parse_url(url).unwrap_err();
            let text = e.to_string();
            assert!(text.contains("%25"), "{url}: {text}");
            assert!(!text.contains("Hunter2"), "{text}");
        }
        // The control: escapes of two hex digits are read, the password decoded.
        let pg = super::parse_url("postgres://svc:50%25%40x@db/shop").unwrap();
        assert_eq!(pg.get_password(), Some(&b"50%@x"[..]));
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
        // In a URL, a password's `&` splits it into a parameter: not named either, and the
        // advice is the URL's (found by a user trial: it gave the key=value form's quoting).
        let shown = message("postgres://svc@db/shop?password=first&hunter2=x");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            !shown.contains("password='") && shown.contains("%26"),
            "says how: {shown}"
        );
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
    fn an_ipv6_host_is_shown_in_brackets() {
        let pg: tokio_postgres::Config = "postgres://svc@[::1]:5433/shop".parse().unwrap();
        assert_eq!(describe_target(&pg), "svc@[::1]:5433/shop");
    }
}
