//! Why a connection failed in TLS ([`TlsFailure`]), read from the driver's error alone: a leaf
//! module, so that [`Error`](crate::Error) can name it without importing the TLS set-up (which
//! itself returns svcdb's errors).

use rustls::CertificateError;

/// Why a connection failed in TLS, from [`Error::tls_failure`](crate::Error::tls_failure).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TlsFailure {
    /// The server does not accept TLS (`ssl = off`), and the `sslmode` requires it.
    NotOffered,
    /// The server's certificate does not chain to a trusted root (`sslrootcert`, or the
    /// system's roots).
    Untrusted,
    /// The certificate is trusted but does not name the host connected to (`verify-full`).
    NameMismatch,
    /// Any other handshake failure: an expired or malformed certificate, no protocol version
    /// or cipher suite in common, …
    Handshake,
}

impl TlsFailure {
    /// The failure behind a driver error, if it is a TLS one.
    pub(crate) fn of(e: &tokio_postgres::Error) -> Option<Self> {
        // tokio-postgres exposes no error kind; its TLS kind displays as this fixed text, with
        // the cause in the source chain.
        if e.to_string() != "error performing TLS handshake" {
            return None;
        }
        let mut source = std::error::Error::source(e);
        while let Some(cause) = source {
            if let Some(rustls) = rustls_error(cause) {
                return Some(match rustls {
                    rustls::Error::InvalidCertificate(
                        CertificateError::NotValidForName
                        | CertificateError::NotValidForNameContext { .. },
                    ) => TlsFailure::NameMismatch,
                    rustls::Error::InvalidCertificate(
                        CertificateError::UnknownIssuer | CertificateError::BadSignature,
                    ) => TlsFailure::Untrusted,
                    _ => TlsFailure::Handshake,
                });
            }
            // The driver's own refusal carries only this text (a boxed string).
            if cause.to_string() == "server does not support TLS" {
                return Some(TlsFailure::NotOffered);
            }
            source = cause.source();
        }
        Some(TlsFailure::Handshake)
    }

    /// What to do about it, as error messages put it.
    ///
    /// The hint is the same whatever the URL said, so each remedy is written to work from
    /// every URL that can fail this way, and never as what such a URL already has: a
    /// certificate is checked against `sslrootcert` only (a file, or `system`, which svcdb
    /// takes with `verify-full` alone), and `require` with an `sslrootcert` checks the chain
    /// (found by a user trial: `require` with a bundle that did not sign the certificate was
    /// told to use `require`, and `sslrootcert=system` to use `verify-ca`, which svcdb
    /// refuses). A suggested `sslmode=` says "with `sslrootcert=<CA file>`" or "without
    /// sslrootcert" when the URL's own would not do; the tests below hold every hint to that.
    pub fn hint(self) -> &'static str {
        match self {
            TlsFailure::NotOffered => {
                "the server does not accept TLS: turn `ssl` on in its postgresql.conf, or, to connect unencrypted, use sslmode=prefer without sslrootcert in DATABASE_URL"
            }
            TlsFailure::Untrusted => {
                "the server's certificate is not signed by the CA that sslrootcert names (for sslrootcert=system, by any of the system's trusted roots): point sslrootcert at the PEM file of the CA that signed it, or, to encrypt without verifying, use sslmode=require without sslrootcert"
            }
            TlsFailure::NameMismatch => {
                "the server's certificate does not name the host in DATABASE_URL: connect by a name the certificate lists, or, to check the chain but not the name, use sslmode=verify-ca with sslrootcert=<CA file> (verify-ca does not take sslrootcert=system)"
            }
            TlsFailure::Handshake => {
                "the TLS handshake failed: check the server's certificate and the sslmode and sslrootcert in DATABASE_URL"
            }
        }
    }
}

/// True when a connection attempt failed in TLS in a way the same attempt would fail again:
/// the server's certificate was refused (not trusted, not for this host, expired, malformed),
/// or the server does not accept TLS at all. Neither changes until someone changes the
/// certificate, the server's `ssl` setting or `DATABASE_URL`, so retrying until the acquire
/// timeout only delays the error (found by a user trial: 5 s per command). A handshake cut
/// short by the network is not one of these.
pub(crate) fn is_final_tls_failure(e: &tokio_postgres::Error) -> bool {
    match TlsFailure::of(e) {
        Some(TlsFailure::NotOffered | TlsFailure::Untrusted | TlsFailure::NameMismatch) => true,
        // An expired or malformed certificate is a `Handshake` failure to people, and as final.
        Some(TlsFailure::Handshake) => {
            std::iter::successors(std::error::Error::source(e), |cause| (*cause).source()).any(
                |cause| {
                    matches!(
                        rustls_error(cause),
                        Some(rustls::Error::InvalidCertificate(_))
                    )
                },
            )
        }
        None => false,
    }
}

/// The rustls error in a link of a driver error's source chain. tokio-rustls wraps it in an
/// `io::Error`, whose `source()` skips the wrapped error, so that link is opened by hand.
fn rustls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    e.downcast_ref::<rustls::Error>().or_else(|| {
        e.downcast_ref::<std::io::Error>()?
            .get_ref()?
            .downcast_ref::<rustls::Error>()
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::tls::{check_root_cert, TlsMode};

    /// What a URL says of TLS: its `sslmode`, and its `sslrootcert` (`None`: not set).
    type Url = (TlsMode, Option<&'static str>);

    const FILE: Option<&str> = Some("/etc/ssl/db-ca.pem");
    const SYSTEM: Option<&str> = Some("system");

    /// Every URL svcdb accepts that can fail this way.
    fn failing_urls(failure: TlsFailure) -> Vec<Url> {
        use TlsMode::*;
        match failure {
            // Any mode that insists on TLS.
            TlsFailure::NotOffered => vec![
                (Require, None),
                (Require, FILE),
                (VerifyCa, FILE),
                (VerifyFull, FILE),
                (VerifyFull, SYSTEM),
            ],
            // Any mode that checks a chain: it has roots to check it against.
            TlsFailure::Untrusted => vec![
                (Require, FILE),
                (VerifyCa, FILE),
                (VerifyFull, FILE),
                (VerifyFull, SYSTEM),
            ],
            // verify-full alone checks the name.
            TlsFailure::NameMismatch => vec![(VerifyFull, FILE), (VerifyFull, SYSTEM)],
            TlsFailure::Handshake => vec![(Prefer, None), (Require, FILE), (VerifyFull, SYSTEM)],
        }
    }

    /// The settings a hint suggests for `url`: each `sslmode=<mode>` with the `sslrootcert`
    /// its clause gives (`with sslrootcert=<CA file>`, `without sslrootcert`), else the URL's.
    fn suggested(hint: &str, url: Url) -> Vec<Url> {
        hint.split("sslmode=")
            .skip(1)
            .map(|clause| {
                let mode: String = clause
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '-')
                    .collect();
                let mode = mode.parse().unwrap_or_else(|e| panic!("{mode}: {e}"));
                // The clause runs to the next punctuation that ends a remedy.
                let clause = clause
                    .split([',', ';', ')', '('])
                    .next()
                    .unwrap_or_default();
                let root = if clause.contains("without sslrootcert") {
                    None
                } else if clause.contains("with sslrootcert=<CA file>") {
                    FILE
                } else {
                    url.1
                };
                (mode, root)
            })
            .collect()
    }

    /// Regression (user trial): `sslrootcert=system` was told to use `verify-ca`, which svcdb
    /// refuses with system roots, and `require` with a CA bundle that did not sign the server's
    /// certificate was told to use `require` (libpq's `require` with a root checks the chain).
    /// Every `sslmode` a hint suggests must be one svcdb accepts, and not what the URL has.
    #[test]
    fn no_hint_suggests_what_svcdb_refuses_or_what_the_url_already_says() {
        for failure in [
            TlsFailure::NotOffered,
            TlsFailure::Untrusted,
            TlsFailure::NameMismatch,
            TlsFailure::Handshake,
        ] {
            for url in failing_urls(failure) {
                check_root_cert(url.0, url.1.map(Path::new))
                    .unwrap_or_else(|e| panic!("the test's own URL {url:?} is refused: {e}"));
                for remedy in suggested(failure.hint(), url) {
                    assert!(
                        check_root_cert(remedy.0, remedy.1.map(Path::new)).is_ok(),
                        "{failure:?} from {url:?} suggests {remedy:?}, which svcdb refuses"
                    );
                    assert_ne!(
                        remedy, url,
                        "{failure:?} suggests what the URL already says"
                    );
                }
            }
        }
    }
}
