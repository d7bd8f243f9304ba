//! TLS to PostgreSQL: libpq's `sslmode` and `sslrootcert`, on rustls with the ring provider.

mod failure;

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

pub(crate) use failure::is_final_tls_failure;
pub use failure::TlsFailure;

use crate::error::{Error, Result};

/// True for the `sslrootcert` value that means the system's trusted roots (libpq 16 and
/// later), not a file.
pub(crate) fn is_system_roots(root_cert: &Path) -> bool {
    root_cert.as_os_str() == "system"
}

/// libpq's `sslmode`: whether to encrypt, and what to check of the server's certificate (see
/// the table below).
///
/// | `sslmode` | encrypted | certificate checked |
/// |---|---|---|
/// | `disable` (svcdb's default; libpq's is `prefer`) | never | — |
/// | `allow`, `prefer` | when the server offers TLS, else plain | no |
/// | `require` | always, or the connection fails | no; with `sslrootcert`, its chain (as `verify-ca`) |
/// | `verify-ca` | always | its chain, against `sslrootcert` (required); not the host name |
/// | `verify-full` | always | its chain, against `sslrootcert` (required), and that it names the host connected to |
///
/// As in libpq, `verify-ca` and `verify-full` without a root certificate are refused at
/// start-up: there would be nothing to verify against. `sslrootcert=system` means the system's
/// roots and, as in libpq 16, needs `verify-full` (every public CA is trusted, so only the host
/// name check makes them mean anything). Unlike libpq, svcdb does not fall back to
/// `~/.postgresql/root.crt`: name the file.
///
/// A [`Tls`] is built once per [`ServiceDb`](crate::ServiceDb), reading the root certificates
/// then, and shared by its pool and its dedicated connections. With TLS off it connects with
/// tokio-postgres' `NoTls`, so a plain connection costs exactly what it did before TLS existed.
///
/// A connection that fails in TLS says why in [`Error::tls_failure`](crate::Error::tls_failure).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum TlsMode {
    /// Never encrypt. svcdb's default, unlike libpq's `prefer`: a pool on a private network
    /// pays nothing for TLS unless asked to.
    #[default]
    Disable,
    /// As `prefer` (libpq tries plain first and TLS second; the driver cannot).
    Allow,
    /// Encrypt when the server offers TLS, without checking its certificate; plain otherwise.
    Prefer,
    /// Encrypt or fail. The certificate is not checked, unless
    /// [`Config::ssl_root_cert`](crate::Config::ssl_root_cert) is set: then its chain is, as
    /// with `VerifyCa` (libpq does the same).
    Require,
    /// Encrypt, and check that the certificate chains to
    /// [`Config::ssl_root_cert`](crate::Config::ssl_root_cert), which must be set (a file; not
    /// `system`); the host name is not checked.
    VerifyCa,
    /// Encrypt, and check the chain (to `ssl_root_cert`, which must be set; `system` for the
    /// system's roots) and that the certificate names the host connected to.
    VerifyFull,
}

impl TlsMode {
    /// Every mode, weakest first.
    pub const ALL: [TlsMode; 6] = [
        TlsMode::Disable,
        TlsMode::Allow,
        TlsMode::Prefer,
        TlsMode::Require,
        TlsMode::VerifyCa,
        TlsMode::VerifyFull,
    ];

    /// The mode as written in `sslmode=`.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Disable => "disable",
            TlsMode::Allow => "allow",
            TlsMode::Prefer => "prefer",
            TlsMode::Require => "require",
            TlsMode::VerifyCa => "verify-ca",
            TlsMode::VerifyFull => "verify-full",
        }
    }

    /// The mode a bare driver configuration asks for: `require` when its `ssl_mode` says so,
    /// else `disable`. The driver's default is `prefer`, which cannot be told from "not set",
    /// and a plain connection is what svcdb made of it before it had TLS.
    pub(crate) fn of_driver_config(pg: &tokio_postgres::Config) -> Self {
        match pg.get_ssl_mode() {
            SslMode::Require => TlsMode::Require,
            _ => TlsMode::Disable,
        }
    }

    /// What the driver is told: whether to ask the server for TLS, and whether a refusal ends
    /// the attempt. Verification is the connector's.
    fn driver_mode(self) -> SslMode {
        match self {
            TlsMode::Disable => SslMode::Disable,
            TlsMode::Allow | TlsMode::Prefer => SslMode::Prefer,
            TlsMode::Require | TlsMode::VerifyCa | TlsMode::VerifyFull => SslMode::Require,
        }
    }
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TlsMode {
    type Err = Error;

    /// Parses an `sslmode` value; the error names the key and lists the allowed values.
    fn from_str(s: &str) -> Result<Self> {
        TlsMode::parse_setting("sslmode", s)
    }
}

impl TlsMode {
    /// Parses a value of `key` (`sslmode`, `PGSSLMODE`); the error names `key` and lists the
    /// allowed values.
    pub(crate) fn parse_setting(key: &str, value: &str) -> Result<Self> {
        TlsMode::ALL
            .into_iter()
            .find(|mode| mode.as_str() == value)
            .ok_or_else(|| {
                let allowed = TlsMode::ALL.map(TlsMode::as_str).join(", ");
                // The value is not repeated: in a malformed DATABASE_URL it can be a piece of a
                // password.
                Error::config(key, format!("must be one of {allowed}"))
            })
    }
}

/// Refuses what libpq refuses of `sslrootcert` before connecting: none with `verify-ca` or
/// `verify-full` (nothing to verify against), and `system` with anything but `verify-full`.
/// [`Config::validate`](crate::Config::validate) and [`Tls::new`] call it.
pub(crate) fn check_root_cert(mode: TlsMode, root_cert: Option<&Path>) -> Result<()> {
    match root_cert {
        // libpq's rule: the system's roots trust every public CA, so only the host name check
        // makes them mean anything.
        Some(root) if is_system_roots(root) && mode != TlsMode::VerifyFull => Err(Error::config(
            "sslmode",
            format!("sslrootcert=system needs sslmode=verify-full, not {mode}"),
        )),
        None if matches!(mode, TlsMode::VerifyCa | TlsMode::VerifyFull) => {
            Err(missing_root_cert(mode))
        }
        _ => Ok(()),
    }
}

/// The error for a `verify-*` mode without `sslrootcert`. Without it, svcdb used to verify
/// against the system's roots, which every publicly issued certificate chains to: with
/// `verify-ca`, which checks no host name, that verified nothing.
fn missing_root_cert(mode: TlsMode) -> Error {
    Error::config(
        "sslrootcert",
        format!(
            "not set, and sslmode={mode} verifies the server's certificate against it (libpq refuses this too)\n  \
             hint: set sslrootcert=<CA file> in DATABASE_URL (or PGSSLROOTCERT) to the CA that signed the server's certificate; \
             sslrootcert=system with sslmode=verify-full for the system's trusted roots; or sslmode=require to encrypt without verifying"
        ),
    )
}

/// How connections are encrypted: one per pool, shared by its connections. Cheap to clone.
///
/// ```no_run
/// # async fn demo(pg: svcdb::tokio_postgres::Config) -> Result<(), svcdb::Error> {
/// use svcdb::{Tls, TlsMode};
/// let ca = std::path::Path::new("/etc/ssl/certs/db-ca.pem");
/// let tls = Tls::new(TlsMode::VerifyFull, Some(ca))?;
/// let admin = svcdb::DedicatedConn::connect_with(&pg, &tls).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Tls {
    /// What the driver asks of the server.
    mode: TlsMode,
    /// `None` when TLS is off: connections then use `NoTls`.
    rustls: Option<MakeRustlsConnect>,
}

impl Tls {
    /// The connector for `mode`, reading `root_cert` (PEM, one or more certificates; `system`:
    /// the system's roots) now when the mode checks certificates. `verify-ca` and
    /// `verify-full` without `root_cert`, and a root file that is missing, unreadable or holds
    /// no usable certificate, are an [`Error::Config`] naming `sslrootcert`.
    pub fn new(mode: TlsMode, root_cert: Option<&Path>) -> Result<Self> {
        check_root_cert(mode, root_cert)?;
        let checks = match mode {
            TlsMode::Disable => return Ok(Self { mode, rustls: None }),
            // Encryption when it is to be had, never a refused certificate: a given
            // sslrootcert is not read.
            TlsMode::Allow | TlsMode::Prefer => Checks::NameBlind(None),
            TlsMode::Require => Checks::NameBlind(root_cert.map(read_roots).transpose()?),
            TlsMode::VerifyCa => Checks::NameBlind(Some(roots(mode, root_cert)?)),
            TlsMode::VerifyFull => Checks::Full(roots(mode, root_cert)?),
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let algorithms = provider.signature_verification_algorithms;
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring's provider supports TLS 1.2 and 1.3");
        let config = match checks {
            Checks::Full(roots) => builder.with_root_certificates(roots),
            Checks::NameBlind(roots) => {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(NameBlindVerifier {
                        roots,
                        algorithms,
                    }))
            }
        }
        .with_no_client_auth();
        Ok(Self {
            mode,
            rustls: Some(MakeRustlsConnect::new(config)),
        })
    }

    /// The mode this connector was built for.
    pub fn mode(&self) -> TlsMode {
        self.mode
    }

    /// `pg` with the driver's `ssl_mode` set to match this connector, whatever it said before.
    pub(crate) fn driver_config(&self, pg: &tokio_postgres::Config) -> tokio_postgres::Config {
        let mut pg = pg.clone();
        pg.ssl_mode(self.mode.driver_mode());
        pg
    }

    /// The rustls connector; `None` means connect with `NoTls`.
    pub(crate) fn rustls(&self) -> Option<&MakeRustlsConnect> {
        self.rustls.as_ref()
    }
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls").field("mode", &self.mode).finish()
    }
}

/// What a connector checks of the server's certificate.
enum Checks {
    /// The chain against these roots, or nothing without roots; never the host name.
    NameBlind(Option<RootCertStore>),
    /// Chain and host name: rustls' own verifier (`verify-full`).
    Full(RootCertStore),
}

/// The roots `mode` verifies against: `root_cert`'s, or the system's for `system`.
fn roots(mode: TlsMode, root_cert: Option<&Path>) -> Result<RootCertStore> {
    match root_cert {
        Some(path) if is_system_roots(path) => system_roots(),
        Some(path) => read_roots(path),
        None => Err(missing_root_cert(mode)),
    }
}

/// Every certificate of a PEM file, as trust anchors.
fn read_roots(path: &Path) -> Result<RootCertStore> {
    let bad = |why: String| Error::config("sslrootcert", format!("{}: {why}", path.display()));
    let pem = std::fs::read(path).map_err(|e| {
        bad(format!(
            "cannot read it ({e}); point sslrootcert at the PEM file of the CA that signed the server's certificate"
        ))
    })?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| bad(format!("is not valid PEM ({e})")))?;
        roots
            .add(cert)
            .map_err(|e| bad(format!("holds a certificate that cannot be a root ({e})")))?;
    }
    if roots.is_empty() {
        return Err(bad(
            "holds no certificate (no -----BEGIN CERTIFICATE----- block); point sslrootcert at the CA's PEM file".into(),
        ));
    }
    Ok(roots)
}

/// The system's trusted roots (OpenSSL's locations, or `SSL_CERT_FILE`/`SSL_CERT_DIR`).
fn system_roots() -> Result<RootCertStore> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        let why = found
            .errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        return Err(Error::config(
            "sslrootcert",
            format!(
                "is system, and no trusted root certificate was found on this system ({why}); install the system's CA certificates, or set sslrootcert=<CA file> in DATABASE_URL"
            ),
        ));
    }
    Ok(roots)
}

/// libpq's checks below `verify-full`: the certificate's chain against `roots` when there are
/// some, nothing when there are none, never the host name. The handshake signature is always
/// checked, so the server proves it holds the key of the certificate it sent.
#[derive(Debug)]
struct NameBlindVerifier {
    /// `None`: any certificate (`prefer`, `require` without `sslrootcert`).
    roots: Option<RootCertStore>,
    /// The provider's signature algorithms, for chains and handshake signatures.
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for NameBlindVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = ParsedCertificate::try_from(end_entity)?;
            verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.algorithms.all,
            )?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_as_written_and_unknown_ones_list_the_allowed() {
        for mode in TlsMode::ALL {
            assert_eq!(mode.as_str().parse::<TlsMode>().unwrap(), mode);
        }
        match "verify_full".parse::<TlsMode>() {
            Err(Error::Config { key, message }) => {
                assert_eq!(key, "sslmode");
                assert!(TlsMode::ALL.iter().all(|m| message.contains(m.as_str())));
            }
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn system_roots_need_verify_full() {
        let system = Some(Path::new("system"));
        for mode in [TlsMode::Disable, TlsMode::Require, TlsMode::VerifyCa] {
            assert!(
                matches!(Tls::new(mode, system), Err(Error::Config { .. })),
                "{mode}"
            );
        }
    }

    #[test]
    fn verify_modes_need_a_root_certificate_and_others_do_not() {
        for mode in [TlsMode::VerifyCa, TlsMode::VerifyFull] {
            assert!(
                matches!(Tls::new(mode, None), Err(Error::Config { key, .. }) if key == "sslrootcert"),
                "{mode}"
            );
        }
        for mode in [
            TlsMode::Disable,
            TlsMode::Allow,
            TlsMode::Prefer,
            TlsMode::Require,
        ] {
            assert!(check_root_cert(mode, None).is_ok(), "{mode}");
        }
        assert!(check_root_cert(TlsMode::VerifyFull, Some(Path::new("system"))).is_ok());
    }

    #[test]
    fn a_disabled_connector_has_no_rustls() {
        assert!(Tls::new(TlsMode::Disable, None).unwrap().rustls().is_none());
        assert!(Tls::new(TlsMode::Prefer, None).unwrap().rustls().is_some());
    }
}
