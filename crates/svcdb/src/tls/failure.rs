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
    pub fn hint(self) -> &'static str {
        match self {
            TlsFailure::NotOffered => {
                "the server does not accept TLS: turn `ssl` on in its postgresql.conf, or use sslmode=prefer (or disable) in DATABASE_URL to connect unencrypted"
            }
            TlsFailure::Untrusted => {
                "the server's certificate is not trusted: pass sslrootcert=<CA file> in DATABASE_URL, or use sslmode=require to encrypt without verifying"
            }
            TlsFailure::NameMismatch => {
                "the server's certificate does not name the host in DATABASE_URL: connect by a name the certificate lists, or use sslmode=verify-ca to check the chain but not the name"
            }
            TlsFailure::Handshake => {
                "the TLS handshake failed: check the server's certificate and the sslmode and sslrootcert in DATABASE_URL"
            }
        }
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
