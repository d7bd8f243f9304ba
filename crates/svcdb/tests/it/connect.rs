//! `ServiceDb::connect` against a real PostgreSQL: errors no retry can fix fail on the first
//! attempt with their cause, transient ones are retried, a schema that does not exist fails at
//! connect naming its look-alikes, and one attempt lasts at most `connect_timeout`.

use crate::forwarder;
// Shared with the CLI's tests, which check the same hints through the binary.
use crate::password_server;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use forwarder::Forwarder;
use password_server::password_checking_server;
use svcdb::testing::TestDb;
use svcdb::{Error, ServiceDb, SqlState};

/// Long enough that an error seen before it came from the first attempts, not the timeout.
const PATIENT: Duration = Duration::from_secs(20);

/// Polls `condition` every 20 ms until it holds, failing the test after 30 s.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Regression: a role or database that does not exist was retried until the acquire timeout,
/// and the error led with "timed out after 5.0s". Each now fails on the first attempt (one
/// connection through the forwarder), as `Error::Connect` with its SQLSTATE.
#[tokio::test]
async fn a_missing_role_or_database_fails_on_the_first_attempt() {
    let db = TestDb::new().await;
    let no_login = db.role_name("nologin");
    db.admin()
        .await
        .batch_execute(&format!("CREATE ROLE {no_login} NOLOGIN"))
        .await
        .unwrap();
    let admin_user = db.connection().get_user().unwrap().to_owned();
    let missing_db = format!("{}_missing", db.name());
    for (user, dbname, code) in [
        (
            "no_such_role_svcdb",
            db.name(),
            SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
        ),
        (
            no_login.as_str(),
            db.name(),
            SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
        ),
        (
            admin_user.as_str(),
            missing_db.as_str(),
            SqlState::INVALID_CATALOG_NAME,
        ),
    ] {
        let forwarder = Forwarder::to(&db).await;
        let mut config = forwarder.config(&db, user, dbname, "public");
        config.acquire_timeout = PATIENT;
        let err = ServiceDb::connect(config).await.unwrap_err();
        assert!(
            matches!(err, Error::Connect { .. }),
            "{user}@{dbname}: expected a connect error, got {err:?}"
        );
        assert_eq!(err.code(), Some(&code), "{user}@{dbname}: {err}");
        assert_eq!(forwarder.accepted(), 1, "{user}@{dbname}: one attempt");
    }
}

/// With several hosts the driver returns the last one's error: a role missing on the server
/// that answers, then a host that refuses, read as "connection refused" and was retried until
/// the acquire timeout. Each host is now tried alone once, and the server's answer (28000)
/// fails at once; the control, the same hosts the other way round, already did.
#[tokio::test]
async fn with_several_hosts_the_server_that_answered_is_the_error_reported() {
    let db = TestDb::new().await;
    let live = db.connection().get_ports()[0];
    let closed = svcdb::testing::closed_port();
    for ports in [[live, closed], [closed, live]] {
        let url = format!(
            "postgres://no_such_role_svcdb@127.0.0.1:{},127.0.0.1:{}/{}",
            ports[0],
            ports[1],
            db.name()
        );
        let mut config = svcdb::Config::new(&url, "public").unwrap();
        config.acquire_timeout = PATIENT;
        let started = Instant::now();
        let err = ServiceDb::connect(config).await.unwrap_err();
        assert_eq!(
            err.code(),
            Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
            "ports {ports:?}: {err}"
        );
        assert!(started.elapsed() < PATIENT / 2, "ports {ports:?}: at once");
    }
}

/// A transient refusal from the server itself (53300: the role's connection limit is reached)
/// is retried until it passes, within the acquire timeout.
#[tokio::test]
async fn a_full_connection_limit_is_retried_until_a_slot_frees() {
    let db = TestDb::new().await;
    let role = db.role_name("limited");
    let admin = db.admin().await;
    admin
        .batch_execute(&format!("CREATE ROLE {role} LOGIN CONNECTION LIMIT 0"))
        .await
        .unwrap();
    let forwarder = Forwarder::to(&db).await;
    let mut config = forwarder.config(&db, &role, db.name(), "public");
    config.pool_min = 0;
    config.acquire_timeout = Duration::from_secs(60);
    let svc = ServiceDb::new(config).unwrap();
    let waiting = {
        let svc = svc.clone();
        tokio::spawn(async move { svc.get().await.map(drop) })
    };
    eventually("a refused attempt", || {
        svc.status().last_connect_error.is_some()
    })
    .await;
    assert!(!waiting.is_finished(), "{:?}", svc.status());
    admin
        .batch_execute(&format!("ALTER ROLE {role} CONNECTION LIMIT -1"))
        .await
        .unwrap();
    waiting.await.unwrap().unwrap();
    assert!(forwarder.accepted() >= 2, "retried after the refusal");
}

/// Found by a user trial: a role at its own CONNECTION LIMIT was told to lower other
/// services' pools or raise the server's max_connections. The hint now names the role's
/// limit (the old hint fails both checks).
#[tokio::test]
async fn a_roles_connection_limit_is_named_as_the_cause() {
    let db = TestDb::new().await;
    let role = db.role_name("limited");
    db.admin()
        .await
        .batch_execute(&format!("CREATE ROLE {role} LOGIN CONNECTION LIMIT 0"))
        .await
        .unwrap();
    let mut config = svcdb::Config::new(&db.url_as(&role), "public").unwrap();
    config.acquire_timeout = Duration::from_millis(500);
    let err = ServiceDb::connect(config).await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err}");
    let shown = err.to_string();
    assert!(
        shown.contains("CONNECTION LIMIT") && !shown.contains("max_connections"),
        "{shown}"
    );
}

/// Regression: a server that wants a password failed every command after 5 s with "password
/// missing" (or 28P01) and a hint to check that PostgreSQL is running. Both now fail on the
/// first attempt, with a hint about the password.
#[tokio::test]
async fn a_missing_or_wrong_password_fails_at_once_with_a_password_hint() {
    for password in [None, Some("wrong")] {
        let (port, accepted) = password_checking_server().await;
        let url = match password {
            None => format!("postgres://svc@127.0.0.1:{port}/shop"),
            Some(pw) => format!("postgres://svc:{pw}@127.0.0.1:{port}/shop"),
        };
        let mut config = svcdb::Config::new(&url, "orders").unwrap();
        config.acquire_timeout = PATIENT;
        let err = ServiceDb::connect(config).await.unwrap_err();
        assert!(matches!(err, Error::Connect { .. }), "{err:?}");
        if password.is_some() {
            assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{err}");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one attempt: {err}");
        let shown = err.to_string();
        assert!(
            shown.contains("PGPASSWORD") && !shown.contains("PostgreSQL is running"),
            "{shown}"
        );
    }
}

/// Regression: `connect` with a misspelled schema succeeded, and the first query failed with
/// `relation "orders" does not exist`. It now fails, naming the schemas that look alike.
#[tokio::test]
async fn a_misspelled_schema_fails_at_connect_naming_its_look_alikes() {
    let db = TestDb::new().await;
    db.admin()
        .await
        .batch_execute("CREATE SCHEMA orders_schema; CREATE SCHEMA orders; CREATE SCHEMA catalog")
        .await
        .unwrap();
    for (asked, similar) in [
        ("orders_shema", &["orders_schema", "orders"][..]),
        ("order", &["orders", "orders_schema"][..]),
        ("billing", &[][..]),
    ] {
        let mut config = db.config(asked);
        config.create_schema = false;
        let err = ServiceDb::connect(config).await.unwrap_err();
        match &err {
            Error::SchemaMissing {
                schema,
                similar: found,
                ..
            } => {
                assert_eq!(schema, asked);
                assert_eq!(found, similar, "{err}");
            }
            other => panic!("{asked}: expected a missing schema, got {other:?}"),
        }
        assert!(err.is_schema_missing());
        assert_eq!(err.code(), Some(&SqlState::INVALID_SCHEMA_NAME));
    }
    // The control: the schema spelt right connects, and create_schema still creates.
    let mut config = db.config("orders_schema");
    config.create_schema = false;
    ServiceDb::connect(config).await.unwrap();
    ServiceDb::connect(db.config("billing")).await.unwrap();
}

/// An attempt on a server that accepts connections and never answers is given up after
/// `connect_timeout`, and another one made, until the acquire timeout. Regression: the error
/// then said "all 0 of 25 connections stayed busy" with a hint to raise SVCDB_POOL_MAX.
#[tokio::test]
async fn each_attempt_on_a_server_that_never_answers_ends_at_the_connect_timeout() {
    // Accepts connections and never says a word.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let silent = {
        let accepted = accepted.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                held.push(socket);
            }
        })
    };
    let mut config =
        svcdb::Config::new(&format!("postgres://svc@127.0.0.1:{port}/shop"), "orders").unwrap();
    config.connect_timeout = Duration::from_millis(300);
    config.acquire_timeout = Duration::from_secs(3);
    let err = ServiceDb::connect(config).await.unwrap_err();
    // Said as it is: no answer, not a busy pool.
    match &err {
        Error::AcquireTimeout {
            cause: None,
            no_answer_within: Some(_),
            ..
        } => {}
        other => panic!("expected an acquire timeout for want of an answer, got {other:?}"),
    }
    // Ten attempts fit in the acquire timeout; one that waited it out would be the only one.
    let attempts = accepted.load(Ordering::SeqCst);
    assert!(attempts >= 3, "{attempts} attempts in 3 s");
    silent.abort();
}

#[tokio::test]
async fn an_attempt_cut_short_by_the_acquire_timeout_keeps_the_earlier_cause() {
    // The first connection is closed at once (an error with a cause); later ones get no answer,
    // and the last of them is cut short by the acquire timeout, not by the connect timeout.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        let mut first = true;
        while let Ok((socket, _)) = listener.accept().await {
            if std::mem::take(&mut first) {
                drop(socket);
            } else {
                held.push(socket);
            }
        }
    });
    let mut config =
        svcdb::Config::new(&format!("postgres://svc@127.0.0.1:{port}/shop"), "orders").unwrap();
    config.connect_timeout = Duration::from_secs(30);
    config.acquire_timeout = Duration::from_millis(500);
    let err = ServiceDb::connect(config).await.unwrap_err();
    match &err {
        Error::AcquireTimeout {
            cause: Some(_),
            no_answer_within: None,
            ..
        } => {}
        other => panic!("expected the closed connection as the cause, got {other:?}"),
    }
    server.abort();
}

/// Regression (user trial): an unknown setting in the URL's `options` (42704, a FATAL error
/// while the session starts) was retried until the acquire timeout, though no retry makes the
/// server know it. It now fails on the first attempt (one connection through the forwarder),
/// as `Error::Connect` with the server's SQLSTATE, and so does a bad value for a known setting
/// (22023). The control, a server out of connection slots (53300), is still retried:
/// `a_full_connection_limit_is_retried_until_a_slot_frees`.
#[tokio::test]
async fn a_fatal_error_while_the_session_starts_fails_on_the_first_attempt() {
    let db = TestDb::new().await;
    let user = db.connection().get_user().unwrap().to_owned();
    for (options, code) in [
        ("-c svcdb_bogus_setting=1", SqlState::UNDEFINED_OBJECT),
        (
            "-c statement_timeout=soon",
            SqlState::INVALID_PARAMETER_VALUE,
        ),
    ] {
        let forwarder = Forwarder::to(&db).await;
        let mut config = forwarder.config(&db, &user, db.name(), "public");
        config.connection.options(options);
        config.acquire_timeout = PATIENT;
        let err = ServiceDb::connect(config).await.unwrap_err();
        assert!(
            matches!(err, Error::Connect { .. }),
            "{options}: expected a connect error, got {err:?}"
        );
        assert_eq!(err.code(), Some(&code), "{options}: {err}");
        assert_eq!(forwarder.accepted(), 1, "{options}: one attempt");
    }
}

/// Found by a user trial: a database that "is not currently accepting connections" (55000:
/// `ALLOW_CONNECTIONS false` for maintenance) is a moment's state, which running services
/// waited out and a starting one did not. It is retried until the acquire timeout: a
/// connection asked for while it lasts is made once it ends (the control that FATAL errors
/// fail at once is `a_fatal_error_while_the_session_starts_fails_on_the_first_attempt`).
#[tokio::test]
async fn a_database_closed_to_connections_for_a_moment_is_waited_for() {
    let db = TestDb::new().await;
    let user = db.connection().get_user().unwrap().to_owned();
    // From another database: a session cannot close its own to connections.
    let mut server = db.connection();
    server.dbname("postgres");
    let admin = svcdb::DedicatedConn::connect(&server).await.unwrap();
    let allow = |yes: bool| format!("ALTER DATABASE \"{}\" ALLOW_CONNECTIONS {yes}", db.name());
    admin.batch_execute(&allow(false)).await.unwrap();
    let forwarder = Forwarder::to(&db).await;
    let mut config = forwarder.config(&db, &user, db.name(), "public");
    config.acquire_timeout = PATIENT;
    let connecting = tokio::spawn(ServiceDb::connect(config));
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    let attempts = forwarder.accepted();
    admin.batch_execute(&allow(true)).await.unwrap();
    let svc = connecting
        .await
        .unwrap()
        .expect("connected once the database reopened");
    drop(svc.get().await.unwrap());
    assert!(attempts >= 2, "retried while closed: {attempts} attempts");
}

/// Regression (user trial): with `SVCDB_CONNECT_TIMEOUT=30s` (or `?connect_timeout=60`) a
/// server that never answers was given up after the 5 s acquire timeout, and the hint said to
/// raise SVCDB_CONNECT_TIMEOUT, which changes nothing; a 1 s wait read `1000.0ms`. The pool's
/// last error and its hint (what the start-up gate reports) now name the acquire timeout, and
/// the wait reads as every other one does.
#[tokio::test]
async fn no_answer_within_an_acquire_timeout_shorter_than_the_connect_timeout_names_it() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let mut config =
        svcdb::Config::new(&format!("postgres://svc@127.0.0.1:{port}/shop"), "orders").unwrap();
    config.connect_timeout = Duration::from_secs(30);
    config.acquire_timeout = Duration::from_secs(1);
    config.pool_min = 0;
    let svc = ServiceDb::new(config).unwrap();
    let err = svc.get().await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::AcquireTimeout {
                cause: None,
                no_answer_within: Some(_),
                ..
            }
        ),
        "{err:?}"
    );
    let last = svc.status().last_connect_error.unwrap();
    assert!(
        last.ends_with(" 1.0s"),
        "written as other waits are: {last}"
    );
    // The error says so too.
    let text = err.to_string();
    let (message, hint) = text.split_once("\n  hint: ").unwrap();
    assert!(message.ends_with(" 1.0s"), "{message}");
    assert!(hint.contains("SVCDB_ACQUIRE_TIMEOUT"), "{hint}");
    assert!(!hint.contains("raise SVCDB_CONNECT_TIMEOUT"), "{hint}");
    // A gate that gives up before the pool does reports the pool's last error and its hint.
    let report = svc
        .verify(&svcdb::Gate::new().timeout(Duration::from_millis(200)))
        .await;
    match report.problems.as_slice() {
        [svcdb::Problem::Unreachable { hint, .. }] => {
            assert!(hint.contains("SVCDB_ACQUIRE_TIMEOUT"), "{hint}");
            assert!(!hint.contains("raise SVCDB_CONNECT_TIMEOUT"), "{hint}");
        }
        other => panic!("expected unreachable, got {other:?}"),
    }
    silent.abort();
}
