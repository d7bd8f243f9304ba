//! An AMQP password never reaches `Debug`, `Display`, an error or a log line, whatever it
//! holds: `/`, `?`, `#`, `@`, `:` and the rest, written raw or percent-encoded, in URLs that
//! parse and in URLs that do not.

use crate::common;

use std::str::FromStr;

use common::closed_port;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use svcdb::testing::CapturedLogs;
use svcdb_amqp::redact_url;
use svcdb_amqp::{AmqpConfig, Error};

/// Every password starts and ends with these, so that any leak of its head or its tail, even
/// a partial one, shows as one of them (neither occurs in a host, user or message).
const HEAD: &str = "PwHeadQz";
const TAIL: &str = "QzPwTail";

fn leaks(text: &str) -> bool {
    text.contains(HEAD) || text.contains(TAIL)
}

/// Passwords a broker accepts (once percent-encoded): the URL's reserved characters, spaces,
/// quotes, percent signs and non-ASCII among ordinary ones.
fn password() -> impl Strategy<Value = String> {
    let chars = prop::sample::select(vec![
        '/', '?', '#', '@', ':', ',', '%', '&', '=', '+', ' ', '\'', '"', '\\', '[', ']', '!', 'a',
        'Z', '0', '9', '.', '-', '_', '~', 'é', '€',
    ]);
    prop::collection::vec(chars, 0..16)
        .prop_map(|body| format!("{HEAD}{}{TAIL}", body.into_iter().collect::<String>()))
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Everything svcdb-amqp prints about `url`: its `Debug`, its redacted form, and the
/// errors of validating and connecting (to a port where nothing listens).
async fn rendered(url: &str) -> Vec<String> {
    let config = AmqpConfig::new(url);
    let mut seen = vec![
        format!("{config:?}"),
        config.redacted_url(),
        redact_url(url),
    ];
    if let Err(e) = config.validate() {
        seen.extend([e.to_string(), format!("{e:?}")]);
    }
    let from_env = AmqpConfig::from_lookup(|key| (key == "AMQP_URL").then(|| url.to_owned()));
    match from_env {
        Ok(config) => seen.push(format!("{config:?}")),
        Err(e) => seen.extend([e.to_string(), format!("{e:?}")]),
    }
    let e = config
        .connect()
        .await
        .expect_err("nothing listens there, or the URL is malformed");
    seen.extend([e.to_string(), format!("{e:?}")]);
    seen
}

#[test]
fn no_password_reaches_debug_display_errors_or_logs() {
    let logs = CapturedLogs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    // One thread: lapin's tasks log through this thread's subscriber too.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let port = closed_port();
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 64,
        ..ProptestConfig::default()
    });
    runner
        .run(&password(), |password| {
            let encoded = percent_encode(&password);
            let urls = [
                // What a broker accepts: the password percent-encoded.
                format!("amqp://svc:{encoded}@127.0.0.1:{port}/%2f"),
                // Raw: '/', '?', '#' end the authority early, so these may not even parse.
                format!("amqp://svc:{password}@127.0.0.1:{port}/%2f"),
                format!("amqps://svc:{encoded}@127.0.0.1:{port}/%2f"),
                // Not URLs lapin accepts at all.
                format!("amqp:svc:{password}@127.0.0.1"),
                format!("svc:{password}@127.0.0.1:{port}"),
                // Lists of nodes (a cluster): every URL's password is hidden, raw or encoded,
                // first, in the middle or last.
                format!("amqp://svc:{encoded}@127.0.0.1:{port}/%2f,amqp://svc:{encoded}@127.0.0.1:{port}/%2f"),
                format!("amqp://svc:{password}@127.0.0.1:{port}/%2f,amqp://svc:{password}@127.0.0.1:{port}/%2f"),
                format!("amqp://127.0.0.1:{port}/%2f,amqp://svc:{password}@127.0.0.1:{port}/%2f,amqp://127.0.0.1:{port}/%2f"),
                format!("amqp://svc:{encoded}@127.0.0.1:{port}/%2f,amqps://svc:{password}@127.0.0.1:{port}/%2f"),
            ];
            for url in &urls {
                // The control: the check sees the password where it is.
                prop_assert!(leaks(url), "{url}");
                for text in runtime.block_on(rendered(url)) {
                    prop_assert!(!leaks(&text), "{url} leaked into: {text}");
                }
            }
            let log_text = logs.text();
            let leaked: Vec<&str> = log_text.lines().filter(|line| leaks(line)).collect();
            prop_assert!(leaked.is_empty(), "leaked into the logs: {leaked:#?}");
            Ok(())
        })
        .unwrap();
}

#[tokio::test]
async fn a_refused_login_with_reserved_characters_in_the_password_is_redacted() {
    let base = lapin::uri::AMQPUri::from_str(&common::amqp_url()).unwrap();
    let (host, port) = (base.authority.host, base.authority.port);
    for password in ["a/b?c#d@e:f", "%2F%3F"] {
        let password = format!("{HEAD}{password}{TAIL}");
        let url = format!(
            "amqp://svcdb-no-such-user:{}@{host}:{port}/%2f",
            percent_encode(&password)
        );
        let e = AmqpConfig::new(&url).connect().await.unwrap_err();
        assert!(matches!(e, Error::AccessRefused { .. }), "{e}");
        for text in [e.to_string(), format!("{e:?}")] {
            assert!(!leaks(&text), "leaked into: {text}");
        }
    }
}
