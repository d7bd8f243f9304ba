//! On a server that checks passwords, a missing or wrong password fails the command at once
//! with a hint about the password (where it goes), not about the host.

use crate::common;

use crate::password_server;

use std::sync::atomic::Ordering;

use password_server::password_checking_server;

/// Regression: without a password (as `svcdb provision` leaves a role unless given
/// `--password-env`), or with a wrong one, every command failed after 5 s with "password
/// missing" and a hint to check that PostgreSQL is running.
#[tokio::test]
async fn a_missing_or_wrong_password_fails_at_once_through_the_cli_with_a_password_hint() {
    for (password, code) in [(None, "connect"), (Some("wrong"), "28P01")] {
        let (port, accepted) = password_checking_server().await;
        let url = match password {
            None => format!("postgres://svc@127.0.0.1:{port}/shop"),
            Some(pw) => format!("postgres://svc:{pw}@127.0.0.1:{port}/shop"),
        };
        // The stand-in runs on this test's runtime: run the binary off it.
        let out = tokio::task::spawn_blocking(move || {
            let env = [("DATABASE_URL", url.as_str()), ("SVCDB_SCHEMA", "svc")];
            common::svcdb(&["schema", "tables", "--json"], &env, None)
        })
        .await
        .unwrap()
        .expect_code(1);
        let failure = out.json();
        assert_eq!(failure["code"], code, "{out}");
        let hint = failure["hint"].as_str().unwrap_or_default();
        assert!(
            hint.contains("DATABASE_URL") && hint.contains("PGPASSWORD"),
            "{out}"
        );
        assert!(!out.stderr.contains("PostgreSQL is running"), "{out}");
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one attempt; {out}");
        if let Some(pw) = password {
            assert!(
                !out.stderr.contains(pw) && !out.stdout.contains(pw),
                "{out}"
            );
        }
    }
}
