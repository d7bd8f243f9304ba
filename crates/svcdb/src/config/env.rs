//! [`Config::from_env`]: every key of the environment table, with libpq's `PG*` variables
//! filling in what `DATABASE_URL` does not say.

use std::path::PathBuf;

use super::duration::{parse_duration, parse_optional_duration};
use super::url_params::{parse_session_attrs, UrlParams};
use super::Config;
use crate::error::{Error, Result};
use crate::ident::Ident;
use crate::tls::TlsMode;

impl Config {
    /// Reads the configuration from the process environment (see the module table).
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|key| std::env::var(key).ok())
    }

    /// Reads the configuration through `lookup` (the environment, a map in tests, …).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let get = |key: &str| lookup(key).filter(|v| !v.trim().is_empty());
        let url = get("DATABASE_URL").ok_or_else(|| {
            Error::config(
                "DATABASE_URL",
                "not set; set it to postgres://user@host:5432/dbname",
            )
        })?;
        let schema = get("SVCDB_SCHEMA").ok_or_else(|| {
            Error::config("SVCDB_SCHEMA", "not set; set it to the service's schema")
        })?;
        // An environment that sets libpq's variables for psql expects them honoured here too:
        // ignoring PGSSLMODE=require would connect unencrypted without a word.
        let url_defaults = UrlParams {
            mode: get("PGSSLMODE")
                .map(|v| TlsMode::parse_setting("PGSSLMODE", v.trim()))
                .transpose()?,
            root_cert: get("PGSSLROOTCERT").map(PathBuf::from),
            session_attrs: get("PGTARGETSESSIONATTRS")
                .map(|v| parse_session_attrs("PGTARGETSESSIONATTRS", &v))
                .transpose()?,
            ..UrlParams::default()
        };
        let mut config = Self::with_url_defaults(&url, &schema, url_defaults)?;
        if config.connection.get_password().is_none() {
            if let Some(pw) = get("SVCDB_PASSWORD").or_else(|| get("PGPASSWORD")) {
                config.connection.password(pw);
            }
        }
        if let Some(v) = get("SVCDB_EXTRA_SCHEMAS") {
            config.extra_schemas = Ident::parse_list("schema", &v)?;
        }
        if let Some(v) = get("SVCDB_CREATE_SCHEMA") {
            config.create_schema = parse_bool("SVCDB_CREATE_SCHEMA", &v)?;
        }
        if let Some(v) = get("SVCDB_POOL_MIN") {
            config.pool_min = parse_count("SVCDB_POOL_MIN", &v)?;
        }
        if let Some(v) = get("SVCDB_POOL_MAX") {
            config.pool_max = parse_count("SVCDB_POOL_MAX", &v)?;
        }
        if let Some(v) = get("SVCDB_ACQUIRE_TIMEOUT") {
            config.acquire_timeout = parse_duration("SVCDB_ACQUIRE_TIMEOUT", &v)?;
        }
        if let Some(v) = get("SVCDB_CONNECT_TIMEOUT") {
            config.connect_timeout = parse_duration("SVCDB_CONNECT_TIMEOUT", &v)?;
        }
        if let Some(v) = get("SVCDB_IDLE_TIMEOUT") {
            config.idle_timeout = parse_optional_duration("SVCDB_IDLE_TIMEOUT", &v)?;
        }
        if let Some(v) = get("SVCDB_MAX_LIFETIME") {
            config.max_lifetime = parse_optional_duration("SVCDB_MAX_LIFETIME", &v)?;
        }
        if let Some(v) = get("SVCDB_MAX_LIFETIME_JITTER") {
            config.max_lifetime_jitter = parse_duration("SVCDB_MAX_LIFETIME_JITTER", &v)?;
        }
        if let Some(v) = get("SVCDB_VERIFY_AFTER_IDLE") {
            config.verify_after_idle = parse_duration("SVCDB_VERIFY_AFTER_IDLE", &v)?;
        }
        config.application_name = get("SVCDB_APPLICATION_NAME");
        config.validate()?;
        Ok(config)
    }
}

fn parse_count(key: &str, v: &str) -> Result<usize> {
    v.trim()
        .parse()
        .map_err(|_| Error::config(key, format!("{v:?} is not a whole number")))
}

fn parse_bool(key: &str, v: &str) -> Result<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(Error::config(key, format!("{v:?} is not true or false"))),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use super::super::duration::{capped_wait, tests::number_text};
    use super::*;
    use tokio_postgres::config::TargetSessionAttrs;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn reads_every_key_from_the_environment() {
        let c = Config::from_lookup(lookup(&[
            ("DATABASE_URL", "postgres://svc@db:6543/shop"),
            ("SVCDB_SCHEMA", "orders"),
            ("SVCDB_EXTRA_SCHEMAS", "public, extensions"),
            ("SVCDB_CREATE_SCHEMA", "yes"),
            ("SVCDB_POOL_MIN", "2"),
            ("SVCDB_POOL_MAX", "8"),
            ("SVCDB_ACQUIRE_TIMEOUT", "250ms"),
            ("SVCDB_CONNECT_TIMEOUT", "1"),
            ("SVCDB_IDLE_TIMEOUT", "0"),
            ("SVCDB_MAX_LIFETIME", "1h"),
            ("SVCDB_MAX_LIFETIME_JITTER", "10s"),
            ("SVCDB_VERIFY_AFTER_IDLE", "2s"),
            ("SVCDB_APPLICATION_NAME", "orders-api"),
            ("SVCDB_PASSWORD", "s3cret"),
        ]))
        .unwrap();
        assert_eq!(c.schema.as_str(), "orders");
        assert_eq!(c.extra_schemas.len(), 2);
        assert!(c.create_schema);
        assert_eq!((c.pool_min, c.pool_max), (2, 8));
        assert_eq!(c.acquire_timeout, Duration::from_millis(250));
        assert_eq!(c.connect_timeout, Duration::from_secs(1));
        assert_eq!(c.idle_timeout, None);
        assert_eq!(c.max_lifetime, Some(Duration::from_secs(3600)));
        assert_eq!(c.max_lifetime_jitter, Duration::from_secs(10));
        assert_eq!(c.verify_after_idle, Duration::from_secs(2));
        assert_eq!(c.application_name.as_deref(), Some("orders-api"));
        assert_eq!(c.connection.get_password(), Some(&b"s3cret"[..]));
        let opts = c.session_config().get_options().unwrap().to_owned();
        assert_eq!(opts, "-c search_path=orders,public,extensions");
    }

    #[test]
    fn malformed_values_name_the_key() {
        let base = [
            ("DATABASE_URL", "postgres://svc@db/shop"),
            ("SVCDB_SCHEMA", "orders"),
        ];
        for (key, bad) in [
            ("SVCDB_POOL_MAX", "lots"),
            ("SVCDB_ACQUIRE_TIMEOUT", "soon"),
            ("SVCDB_CREATE_SCHEMA", "maybe"),
        ] {
            let mut pairs = base.to_vec();
            pairs.push((key, bad));
            match Config::from_lookup(lookup(&pairs)) {
                Err(Error::Config { key: k, .. }) => assert_eq!(k, key),
                other => panic!("{key}: expected a config error, got {other:?}"),
            }
        }
        let mut pairs = base.to_vec();
        pairs.push(("SVCDB_POOL_MIN", "30"));
        assert!(matches!(
            Config::from_lookup(lookup(&pairs)),
            Err(Error::Config { .. })
        ));
        assert!(matches!(
            Config::from_lookup(lookup(&[("DATABASE_URL", "postgres://svc@db/shop")])),
            Err(Error::Config { .. })
        ));
        assert!(matches!(
            Config::from_lookup(lookup(&[
                ("DATABASE_URL", "postgres://svc@db/shop"),
                ("SVCDB_SCHEMA", "x;drop")
            ])),
            Err(Error::Ident(_))
        ));
    }

    #[test]
    fn pgsslmode_and_pgsslrootcert_fill_in_what_the_url_does_not_say() {
        let env = |url: &'static str, mode: &'static str| {
            Config::from_lookup(lookup(&[
                ("DATABASE_URL", url),
                ("SVCDB_SCHEMA", "orders"),
                ("PGSSLMODE", mode),
                ("PGSSLROOTCERT", "/etc/ca.pem"),
            ]))
        };
        let c = env("postgres://svc@db/shop", "verify-full").unwrap();
        assert_eq!(c.tls, TlsMode::VerifyFull);
        assert_eq!(c.ssl_root_cert, Some(PathBuf::from("/etc/ca.pem")));
        let c = env(
            "postgres://svc@db/shop?sslmode=disable&sslrootcert=mine.pem",
            "require",
        )
        .unwrap();
        assert_eq!(c.tls, TlsMode::Disable, "the URL wins");
        assert_eq!(c.ssl_root_cert, Some(PathBuf::from("mine.pem")));
        assert!(matches!(
            env("postgres://svc@db/shop", "sometimes"),
            Err(Error::Config { key, .. }) if key == "PGSSLMODE"
        ));
    }

    #[test]
    fn pgtargetsessionattrs_fills_in_what_the_url_does_not_say() {
        let env = |url: &'static str, attrs: &'static str| {
            Config::from_lookup(lookup(&[
                ("DATABASE_URL", url),
                ("SVCDB_SCHEMA", "orders"),
                ("PGTARGETSESSIONATTRS", attrs),
            ]))
        };
        let c = env("postgres://svc@h1/shop", "read-write").unwrap();
        assert_eq!(c.target_session_attrs(), TargetSessionAttrs::ReadWrite);
        let c = env("postgres://svc@h1,h2/shop", "any").unwrap();
        assert_eq!(c.target_session_attrs(), TargetSessionAttrs::Any);
        let c = env(
            "postgres://svc@h1/shop?target_session_attrs=read-only",
            "read-write",
        )
        .unwrap();
        assert_eq!(
            c.target_session_attrs(),
            TargetSessionAttrs::ReadOnly,
            "the URL wins"
        );
        assert!(matches!(
            env("postgres://svc@h1/shop", "primary"),
            Err(Error::Config { key, .. }) if key == "PGTARGETSESSIONATTRS"
        ));
    }

    /// Every duration setting of the environment table.
    const DURATION_KEYS: [&str; 6] = [
        "SVCDB_ACQUIRE_TIMEOUT",
        "SVCDB_CONNECT_TIMEOUT",
        "SVCDB_IDLE_TIMEOUT",
        "SVCDB_MAX_LIFETIME",
        "SVCDB_MAX_LIFETIME_JITTER",
        "SVCDB_VERIFY_AFTER_IDLE",
    ];

    proptest::proptest! {
        #[test]
        fn no_duration_setting_panics(index in 0..DURATION_KEYS.len(), text in number_text()) {
            let key = DURATION_KEYS[index];
            let pairs = [
                ("DATABASE_URL", "postgres://svc@db/shop"),
                ("SVCDB_SCHEMA", "orders"),
                (key, text.as_str()),
            ];
            match Config::from_lookup(lookup(&pairs)) {
                Ok(config) => {
                    // What the pool computes from it, at the extremes the value allows.
                    let now = std::time::Instant::now();
                    let _ = now + capped_wait(config.acquire_timeout);
                    let _ = config.session_config();
                }
                Err(e) => proptest::prop_assert!(
                    matches!(&e, Error::Config { .. }),
                    "{key}={text:?}: {e:?}"
                ),
            }
        }
    }
}
