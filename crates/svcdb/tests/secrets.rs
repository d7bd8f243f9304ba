//! A password never reaches a log line, an error, or a Debug print.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use svcdb::testing::TestDb;
use svcdb::ServiceDb;

const SECRET: &str = "pw-Zq8-never-print-me";

/// Collects everything the tracing subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn the_password_is_absent_from_debug_errors_and_logs() {
    let logs = Captured::default();
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
