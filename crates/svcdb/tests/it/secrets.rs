//! A password never reaches a log line, an error, or a Debug print.

use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use svcdb::testing::{closed_port, CapturedLogs, TestDb};
use svcdb::{Config, DedicatedConn, ServiceDb, Tls};

const SECRET: &str = "pw-Zq8-never-print-me";

#[tokio::test]
async fn the_password_is_absent_from_debug_errors_and_logs() {
    let logs = CapturedLogs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let mut seen = Vec::new();

    // An unreachable server: connection errors, retries and warnings get logged.
    let mut cfg = svcdb::Config::new(
        &format!("postgres://svc:{SECRET}@127.0.0.1:{}/shop", closed_port()),
        "orders",
    )
    .unwrap();
    cfg.acquire_timeout = Duration::from_millis(300);
    seen.push(format!("{cfg:?}"));
    seen.push(cfg.target());
    let err = ServiceDb::connect(cfg.clone()).await.unwrap_err();
    seen.push(err.to_string());
    seen.push(format!("{err:?}"));
    let svc = ServiceDb::new(cfg).unwrap();
    assert!(svc.get().await.is_err());
    seen.push(format!("{svc:?}"));
    seen.push(format!("{:?}", svc.status()));
    seen.push(format!("{:?}", svc.dedicated().await.unwrap_err()));

    // A reachable server refusing an unknown role that came with a password.
    let db = TestDb::new().await;
    let mut cfg = db.config_as("nobody_svcdb", "orders");
    cfg.connection.password(SECRET);
    cfg.acquire_timeout = Duration::from_millis(300);
    let err = ServiceDb::connect(cfg).await.unwrap_err();
    assert!(err.code().is_some(), "the server answered: {err:?}");
    seen.push(err.to_string());
    seen.push(format!("{err:?}"));

    // A malformed URL holding a password.
    let err = svcdb::Config::new(
        &format!("postgres://svc:{SECRET}@host:99999999/db"),
        "orders",
    )
    .unwrap_err();
    seen.push(err.to_string());
    seen.push(format!("{err:?}"));

    let log_text = logs.text();
    assert!(
        log_text.contains("cannot open a connection"),
        "the failure was logged: {log_text}"
    );
    seen.push(log_text);
    for text in seen {
        assert!(!text.contains(SECRET), "password leaked into: {text}");
    }
}

/// Every generated password starts and ends with these, so that a leak of its head or its
/// tail, even a partial one, shows as one of them (neither occurs in a host, user or message).
const HEAD: &str = "PwHeadQz";
const TAIL: &str = "QzPwTail";

fn leaks(text: &str) -> bool {
    text.contains(HEAD) || text.contains(TAIL)
}

/// Passwords PostgreSQL accepts: the URL's reserved characters, spaces, quotes, backslashes,
/// percent signs and non-ASCII among ordinary ones.
fn password() -> impl Strategy<Value = String> {
    let chars = prop::sample::select(vec![
        '/', '?', '#', '@', ':', '%', '&', '=', '+', ' ', '\'', '"', '\\', '[', ']', '!', 'a', 'Z',
        '0', '9', '.', '-', '_', '~', 'é', '€',
    ]);
    prop::collection::vec(chars, 0..16)
        .prop_map(|body| format!("{HEAD}{}{TAIL}", body.into_iter().collect::<String>()))
}

/// Everything svcdb prints about a configuration built from `url` (and `env`): its `Debug`
/// and target, or the error refusing it; the errors of connecting, outside the pool and
/// through it, to a port where nothing listens.
async fn rendered(url: &str, env: &[(&str, &str)]) -> Vec<String> {
    let config = Config::from_lookup(|key| match key {
        "DATABASE_URL" => Some(url.to_owned()),
        "SVCDB_SCHEMA" => Some("orders".to_owned()),
        "SVCDB_ACQUIRE_TIMEOUT" => Some("30ms".to_owned()),
        _ => env
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_string()),
    });
    let config = match config {
        Ok(config) => config,
        Err(e) => return vec![e.to_string(), format!("{e:?}")],
    };
    let mut seen = vec![format!("{config:?}"), config.target()];
    let tls = Tls::new(config.tls, None).unwrap();
    let e = DedicatedConn::connect_with(&config.connection, &tls)
        .await
        .unwrap_err();
    seen.extend([e.to_string(), format!("{e:?}")]);
    let svc = ServiceDb::new(config).unwrap();
    let e = svc.get().await.unwrap_err();
    seen.extend([e.to_string(), format!("{e:?}"), format!("{svc:?}")]);
    seen
}

#[test]
fn no_password_reaches_debug_display_errors_or_logs_whatever_it_holds() {
    let logs = CapturedLogs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    // One thread: the pool's and the driver's tasks log through this thread's subscriber.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let port = closed_port();
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 48,
        ..ProptestConfig::default()
    });
    runner
        .run(&password(), |password| {
            let encoded = percent_encoding::utf8_percent_encode(
                &password,
                percent_encoding::NON_ALPHANUMERIC,
            )
            .to_string();
            let quoted = password.replace('\\', "\\\\").replace('\'', "\\'");
            let pairs = format!("host=127.0.0.1 port={port} user=svc dbname=shop");
            let cases: [(String, &[(&str, &str)]); 5] = [
                // Percent-encoded, as a URL must carry it.
                (
                    format!("postgres://svc:{encoded}@127.0.0.1:{port}/shop"),
                    &[],
                ),
                // Raw: a second '@', a '?' or a '%' make the driver read something else.
                (
                    format!("postgres://svc:{password}@127.0.0.1:{port}/shop?sslmode=disable"),
                    &[],
                ),
                (format!("{pairs} password='{quoted}'"), &[]),
                (format!("{pairs} password={quoted}"), &[]),
                // From the environment, the URL without one.
                (
                    format!("postgres://svc@127.0.0.1:{port}/shop"),
                    &[("SVCDB_PASSWORD", &password)],
                ),
            ];
            for (url, env) in &cases {
                // The control: the check sees the password where it is.
                prop_assert!(leaks(url) || env.iter().any(|(_, v)| leaks(v)), "{url}");
                for text in runtime.block_on(rendered(url, env)) {
                    prop_assert!(!leaks(&text), "{url} leaked into: {text}");
                }
            }
            let log_text = logs.text();
            let leaked: Vec<&str> = log_text.lines().filter(|line| leaks(line)).collect();
            prop_assert!(leaked.is_empty(), "leaked into the logs: {leaked:#?}");
            Ok(())
        })
        .unwrap();
    // The control for the logs: the failures were logged.
    assert!(logs.text().contains("cannot open a connection"));
}
