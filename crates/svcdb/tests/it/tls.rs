//! TLS against the real PostgreSQL (which has `ssl = on`, with Debian's self-signed snakeoil
//! certificate): what each `sslmode` encrypts, which certificates it refuses and why, and that
//! bad TLS settings fail at start-up with the key or the file at fault.
//!
//! `fixtures/tls/unrelated-ca.pem` is a CA certificate that signed nothing (its key was thrown
//! away): a root the server's certificate never chains to.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::forwarder::Forwarder;
use svcdb::__private::MigrationLock;
use svcdb::testing::TestDb;
use svcdb::tokio_postgres::config::Host;
use svcdb::{Config, DedicatedConn, Error, ServiceDb, Tls, TlsFailure, TlsMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Long enough for a connection, short enough that a refused one fails the test quickly: the
/// pool retries until this runs out.
const FAIL_FAST: Duration = Duration::from_millis(300);

/// Long enough that an error seen before it came from the first attempts, not the timeout.
const PATIENT: Duration = Duration::from_secs(20);

/// A service configuration for the test database, from its `key=value` URL with `params`
/// appended, as a `DATABASE_URL` would carry them.
fn config(db: &TestDb, params: &str) -> Config {
    let mut config = Config::new(&format!("{} {params}", db.url()), "tls").unwrap();
    config.create_schema = true;
    config.pool_min = 1;
    config.pool_max = 2;
    config
}

/// Whether the server sees this session as encrypted.
async fn encrypted(conn: &tokio_postgres::Client) -> bool {
    conn.query_one(
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// Whether the pool's connections and its dedicated ones are encrypted (asserted equal).
async fn pool_encrypted(svc: &ServiceDb) -> bool {
    let pooled = encrypted(&svc.get().await.unwrap()).await;
    let dedicated = encrypted(&svc.dedicated().await.unwrap()).await;
    assert_eq!(pooled, dedicated, "pooled vs dedicated");
    pooled
}

/// The server's own certificate file: self-signed, so usable as the root it chains to.
async fn server_certificate(db: &TestDb) -> PathBuf {
    let admin = db.admin().await;
    let setting = |name: &'static str| {
        let admin = &admin;
        async move {
            let row = admin.query_one(&format!("SHOW {name}"), &[]).await.unwrap();
            PathBuf::from(row.get::<_, String>(0))
        }
    };
    // A relative ssl_cert_file is relative to the data directory.
    setting("data_directory")
        .await
        .join(setting("ssl_cert_file").await)
}

fn unrelated_ca() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls/unrelated-ca.pem")
}

/// Connects a pool that must fail; returns the error after checking it is a connection error
/// reported at once (no retry changes a certificate or a server's `ssl` setting) carrying a
/// TLS failure, and that its message gives that failure's hint.
async fn refused(mut config: Config) -> (Error, TlsFailure) {
    config.acquire_timeout = PATIENT;
    let started = Instant::now();
    let err = ServiceDb::connect(config).await.unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    assert!(
        started.elapsed() < PATIENT / 2,
        "at once, not retried: {err}"
    );
    let failure = err
        .tls_failure()
        .unwrap_or_else(|| panic!("not a TLS failure: {err}"));
    assert!(err.to_string().contains(failure.hint()), "{err}");
    (err, failure)
}

#[tokio::test]
async fn require_encrypts_the_pool_its_dedicated_connections_and_the_migration_lock() {
    let db = TestDb::new().await;
    // The URL form, as cloud providers hand it out.
    let pg = db.connection();
    let host = match pg.get_hosts().first() {
        Some(Host::Tcp(host)) => host.clone(),
        other => panic!("the test server is reached over TCP, not {other:?}"),
    };
    let url = format!(
        "postgres://{}@{host}:{}/{}?sslmode=require",
        pg.get_user().unwrap(),
        pg.get_ports().first().unwrap_or(&5432),
        db.name()
    );
    let mut cfg = Config::new(&url, "tls").unwrap();
    if let Some(password) = pg.get_password() {
        cfg.connection.password(password);
    }
    cfg.create_schema = true;
    cfg.pool_min = 1;
    assert_eq!(cfg.tls, TlsMode::Require);
    let svc = ServiceDb::connect(cfg).await.unwrap();
    assert!(pool_encrypted(&svc).await);
    let lock = MigrationLock::acquire(&svc, Duration::from_secs(5), || {})
        .await
        .unwrap();
    assert!(encrypted(lock.client()).await);
    lock.release().await.unwrap();
}

#[tokio::test]
async fn without_sslmode_or_with_disable_connections_are_plain() {
    let db = TestDb::new().await;
    for params in ["", "sslmode=disable"] {
        let cfg = config(&db, params);
        assert_eq!(cfg.tls, TlsMode::Disable, "{params:?}");
        let svc = ServiceDb::connect(cfg).await.unwrap();
        assert!(!pool_encrypted(&svc).await, "{params:?}");
    }
}

#[tokio::test]
async fn prefer_and_allow_encrypt_when_the_server_offers_tls() {
    let db = TestDb::new().await;
    for params in ["sslmode=prefer", "sslmode=allow"] {
        let svc = ServiceDb::connect(config(&db, params)).await.unwrap();
        assert!(pool_encrypted(&svc).await, "{params}");
    }
}

#[tokio::test]
async fn verify_ca_without_sslrootcert_is_refused_at_start_up_as_libpq_does() {
    let db = TestDb::new().await;
    // Before, verify-ca without a root verified against the system's roots, which any
    // publicly issued certificate for any domain chains to (and which, on Debian, hold this
    // server's snakeoil certificate): "verified" meant nothing. libpq refuses both modes.
    for mode in ["verify-ca", "verify-full"] {
        let expect_refused = |what: &str, result: Result<(), Error>| match result {
            Err(Error::Config { key, message }) => {
                assert_eq!(key, "sslrootcert", "{mode}, {what}");
                assert!(message.contains(mode), "names the mode: {message}");
            }
            other => panic!("{mode}, {what}: expected a config error, got {other:?}"),
        };
        // In the URL's key=value form; the pool refuses to start.
        let cfg = config(&db, &format!("sslmode={mode}"));
        expect_refused("validate", cfg.validate());
        expect_refused("connect", ServiceDb::connect(cfg).await.map(drop));
        expect_refused("Tls::new", Tls::new(mode.parse().unwrap(), None).map(drop));
        // In the URL form, and from PGSSLMODE.
        let url = format!("postgres://svc@127.0.0.1/shop?sslmode={mode}");
        expect_refused("URL", Config::new(&url, "tls").unwrap().validate());
        let env = Config::from_lookup(|key| match key {
            "DATABASE_URL" => Some("postgres://svc@127.0.0.1/shop".into()),
            "SVCDB_SCHEMA" => Some("tls".into()),
            "PGSSLMODE" => Some(mode.into()),
            _ => None,
        });
        expect_refused("PGSSLMODE", env.map(drop));
        // The control: with a root named, the same settings are accepted.
        let env = Config::from_lookup(|key| match key {
            "DATABASE_URL" => Some("postgres://svc@127.0.0.1/shop".into()),
            "SVCDB_SCHEMA" => Some("tls".into()),
            "PGSSLMODE" => Some(mode.into()),
            "PGSSLROOTCERT" => Some("/etc/ca.pem".into()),
            _ => None,
        });
        assert!(env.is_ok(), "{mode} with PGSSLROOTCERT: {env:?}");
    }
}

#[tokio::test]
async fn verify_full_with_the_system_roots_checks_the_certificate() {
    let db = TestDb::new().await;
    let (_, failure) = refused(config(&db, "sslmode=verify-full sslrootcert=system")).await;
    // Untrusted where the system's roots lack the snakeoil; where they hold it (Debian links
    // it into /etc/ssl/certs, which OpenSSL's directory lookup reads), the name is wrong.
    assert!(
        matches!(failure, TlsFailure::Untrusted | TlsFailure::NameMismatch),
        "{failure:?}"
    );
}

#[tokio::test]
async fn verify_ca_trusts_the_root_given_and_verify_full_then_checks_the_name() {
    let db = TestDb::new().await;
    let root = server_certificate(&db).await;
    let root = root.display();
    for params in [
        format!("sslmode=verify-ca sslrootcert='{root}'"),
        // libpq's require with a root checks the chain too.
        format!("sslmode=require sslrootcert='{root}'"),
    ] {
        let svc = ServiceDb::connect(config(&db, &params)).await.unwrap();
        assert!(pool_encrypted(&svc).await, "{params}");
    }

    let cfg = config(&db, &format!("sslmode=verify-full sslrootcert='{root}'"));
    // A certificate names host names, never this address.
    assert!(
        matches!(cfg.connection.get_hosts().first(), Some(Host::Tcp(h)) if h.parse::<IpAddr>().is_ok()),
        "the test server must be reached by IP address"
    );
    let (_, failure) = refused(cfg).await;
    assert_eq!(failure, TlsFailure::NameMismatch);
}

#[tokio::test]
async fn a_root_that_did_not_sign_the_certificate_is_untrusted() {
    let db = TestDb::new().await;
    let root = unrelated_ca();
    for mode in ["require", "verify-ca", "verify-full"] {
        let params = format!("sslmode={mode} sslrootcert='{}'", root.display());
        let (_, failure) = refused(config(&db, &params)).await;
        assert_eq!(failure, TlsFailure::Untrusted, "{mode}");
    }
}

/// A TCP server on 127.0.0.1 that answers PostgreSQL's TLS request with "no", as a server with
/// `ssl = off` does, then reports whether the client went on with a plain startup message.
async fn server_without_tls() -> (u16, tokio::sync::mpsc::UnboundedReceiver<bool>) {
    const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    const PROTOCOL_3: [u8; 4] = [0, 3, 0, 0];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut request = [0; 8];
                socket.read_exact(&mut request).await?;
                if request != SSL_REQUEST {
                    return Ok(()); // not the test's client
                }
                socket.write_all(b"N").await?;
                // A startup message: length, then the protocol version.
                let mut startup = [0; 8];
                let went_on = socket.read_exact(&mut startup).await.is_ok();
                let _ = tx.send(went_on && startup[4..] == PROTOCOL_3);
                Ok::<_, std::io::Error>(())
            });
        }
    });
    (port, rx)
}

#[tokio::test]
async fn a_server_without_tls_fails_require_but_not_prefer() {
    let (port, mut went_on) = server_without_tls().await;
    let url = format!("host=127.0.0.1 port={port} user=svc dbname=shop");

    let (_, failure) =
        refused(Config::new(&format!("{url} sslmode=require"), "tls").unwrap()).await;
    assert_eq!(failure, TlsFailure::NotOffered);

    let cfg = Config::new(&format!("{url} sslmode=prefer"), "tls").unwrap();
    let tls = Tls::new(cfg.tls, None).unwrap();
    let err = DedicatedConn::connect_with(&cfg.connection, &tls)
        .await
        .unwrap_err();
    // The fake server hangs up after the startup message: not a TLS failure.
    assert_eq!(err.tls_failure(), None, "{err}");
    // require's attempts stopped at the "no"; only prefer's can have gone on.
    let mut plain = false;
    while let Ok(seen) = went_on.try_recv() {
        plain |= seen;
    }
    assert!(plain, "prefer went on unencrypted after the server said no");
}

#[tokio::test]
async fn unknown_sslmode_and_unusable_sslrootcert_are_config_errors() {
    let db = TestDb::new().await;
    match Config::new(&format!("{} sslmode=strict", db.url()), "tls") {
        Err(Error::Config { key, .. }) => assert_eq!(key, "sslmode"),
        other => panic!("expected a config error, got {other:?}"),
    }

    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("not-a-certificate.pem");
    std::fs::write(&not_pem, "hello\n").unwrap();
    for file in [dir.path().join("missing.pem"), not_pem] {
        let cfg = config(
            &db,
            &format!("sslmode=verify-ca sslrootcert='{}'", file.display()),
        );
        match ServiceDb::connect(cfg).await {
            Err(Error::Config { key, message }) => {
                assert_eq!(key, "sslrootcert");
                assert!(
                    message.contains(&file.display().to_string()),
                    "names the file: {message}"
                );
            }
            other => panic!("{}: expected a config error, got {other:?}", file.display()),
        }
    }
}

#[tokio::test]
async fn the_password_stays_out_of_debug_and_errors_with_tls_settings() {
    const SECRET: &str = "pw-Tls-never-print-me";
    let db = TestDb::new().await;
    let pg = db.connection();
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    let url = |root: &Path| {
        format!(
            "postgres://svc:{SECRET}@127.0.0.1:{port}/{}?sslmode=require&sslrootcert={}",
            db.name(),
            root.display()
        )
    };
    let mut seen = Vec::new();

    // A root file that is not there: refused before connecting.
    let cfg = Config::new(&url(Path::new("/nonexistent/ca.pem")), "tls").unwrap();
    assert_eq!(cfg.connection.get_password(), Some(SECRET.as_bytes()));
    seen.push(format!("{cfg:?}"));
    let err = ServiceDb::connect(cfg).await.unwrap_err();
    seen.extend([err.to_string(), format!("{err:?}")]);

    // An untrusted certificate: refused in the handshake, by the pool and outside it.
    let mut cfg = Config::new(&url(&unrelated_ca()), "tls").unwrap();
    cfg.acquire_timeout = FAIL_FAST;
    seen.push(format!("{cfg:?}"));
    let svc = ServiceDb::new(cfg).unwrap();
    let err = svc.get().await.unwrap_err();
    assert_eq!(err.tls_failure(), Some(TlsFailure::Untrusted));
    seen.extend([err.to_string(), format!("{err:?}"), format!("{svc:?}")]);
    let err = svc.dedicated().await.unwrap_err();
    assert_eq!(err.tls_failure(), Some(TlsFailure::Untrusted));
    seen.extend([err.to_string(), format!("{err:?}")]);

    for text in seen {
        assert!(!text.contains(SECRET), "password leaked into: {text}");
    }
}

/// Regression (user trial): a refused certificate was retried until the acquire timeout (5 s
/// per command), though no retry changes a certificate. Each now fails on the first attempt
/// (one connection through the forwarder), as `Error::Connect` with its TLS failure: a root
/// that did not sign the server's certificate (with `require`, which checks the chain when
/// given a root, as libpq's does), a name the certificate does not list, and the system's
/// roots by address (untrusted or misnamed, as the system's roots hold the snakeoil or not).
#[tokio::test]
async fn a_refused_certificate_fails_on_the_first_attempt() {
    let db = TestDb::new().await;
    let server_root = server_certificate(&db).await;
    let user = db.connection().get_user().unwrap().to_owned();
    for (mode, root, expected) in [
        (
            TlsMode::Require,
            unrelated_ca(),
            &[TlsFailure::Untrusted][..],
        ),
        (
            TlsMode::VerifyFull,
            server_root.clone(),
            &[TlsFailure::NameMismatch],
        ),
        (
            TlsMode::VerifyFull,
            PathBuf::from("system"),
            &[TlsFailure::Untrusted, TlsFailure::NameMismatch],
        ),
    ] {
        let forwarder = Forwarder::to(&db).await;
        let mut config = forwarder.config(&db, &user, db.name(), "public");
        (config.tls, config.ssl_root_cert) = (mode, Some(root.clone()));
        config.acquire_timeout = PATIENT;
        let err = ServiceDb::connect(config).await.unwrap_err();
        let what = format!("{mode} with {}", root.display());
        assert!(
            matches!(err, Error::Connect { .. }),
            "{what}: expected a connect error, got {err:?}"
        );
        let failure = err.tls_failure();
        assert!(
            failure.is_some_and(|f| expected.contains(&f)),
            "{what}: {failure:?}, {err}"
        );
        assert_eq!(forwarder.accepted(), 1, "{what}: one attempt");
    }
}
