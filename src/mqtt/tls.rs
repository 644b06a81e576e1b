//! rustls configurations for the uplink, built from PEM files.
//!
//! - Protocol: TLS 1.3 only, on both sides.
//! - Provider: rustls' `ring` provider, passed to every builder explicitly
//!   ([`crypto_provider`]); nothing here relies on or installs a process-wide default.
//! - Cipher order: ChaCha20-Poly1305 first, then the AES-GCM suites. ARM boxes without crypto
//!   extensions run ChaCha20 several times faster than software AES; rustls servers follow the
//!   client's order by default, so the gateway's preference decides.
//! - Client ([`client_config`]): the server is verified against one configured CA file (never
//!   the system roots) and the gateway presents its own certificate and key.
//! - Server ([`server_config`]): client certificates are required and verified against the CA.
//! - Private key files must not be readable or writable by group or others
//!   ([`check_key_permissions`]); otherwise loading fails with [`TlsError::KeyPermissions`],
//!   naming the file and its mode.
//!
//! Failures are [`TlsError`]s naming the file; key bytes are never logged or put in errors.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::{ring, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// The PEM files a gateway (or the hub) needs to connect: the CA that signed the broker's
/// certificate, and its own certificate and private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsClientFiles {
    /// CA certificate(s) the broker's certificate must chain to.
    pub ca: PathBuf,
    /// This client's certificate chain, leaf first.
    pub cert: PathBuf,
    /// This client's private key (PKCS#8, SEC1 or PKCS#1); mode 0600 or stricter.
    pub key: PathBuf,
}

/// The PEM files a broker needs: its certificate and key, and the CA client certificates must
/// chain to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsServerFiles {
    /// CA certificate(s) client certificates must chain to.
    pub client_ca: PathBuf,
    /// The server's certificate chain, leaf first.
    pub cert: PathBuf,
    /// The server's private key; mode 0600 or stricter.
    pub key: PathBuf,
}

/// Why a TLS configuration could not be built or certificates could not be written.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot access {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no {what} found in PEM file ({detail})")]
    Pem {
        path: PathBuf,
        what: &'static str,
        detail: String,
    },
    #[error(
        "private key {path} has mode {mode:04o}; it must not be accessible by group or others \
         (run `chmod 600 {path}`)"
    )]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("CA file {path} holds no usable certificate: {detail}")]
    BadCa { path: PathBuf, detail: String },
    #[error("rustls rejected the configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("cannot build the client certificate verifier: {0}")]
    Verifier(String),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("invalid certificate name {0:?}: use 1-64 characters from [A-Za-z0-9._-]")]
    InvalidName(String),
}

/// rustls' `ring` provider with ChaCha20-Poly1305 moved to the front and only TLS 1.3 suites.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    let mut provider = ring::default_provider();
    provider
        .cipher_suites
        .retain(|suite| suite.version() == &rustls::version::TLS13);
    // Stable sort: ChaCha20 first, the AES-GCM suites keep their relative order.
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256);
    Arc::new(provider)
}

/// Builds the gateway's client configuration: TLS 1.3, server verified against `files.ca`,
/// client certificate from `files.cert` and `files.key`.
pub fn client_config(files: &TlsClientFiles) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = load_roots(&files.ca)?;
    let certs = load_certs(&files.cert)?;
    let key = load_key(&files.key)?;
    let config = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)?;
    Ok(Arc::new(config))
}

/// Builds a server configuration that requires client certificates chaining to
/// `files.client_ca`; TLS 1.3 only.
pub fn server_config(files: &TlsServerFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = crypto_provider();
    let roots = load_roots(&files.client_ca)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|err| TlsError::Verifier(err.to_string()))?;
    let certs = load_certs(&files.cert)?;
    let key = load_key(&files.key)?;
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    Ok(Arc::new(config))
}

/// Refuses key files that group or others may read, write or execute.
pub(crate) fn check_key_permissions(path: &Path) -> Result<(), TlsError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = fs::metadata(path).map_err(|source| TlsError::Io {
            path: path.to_owned(),
            source,
        })?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(TlsError::KeyPermissions {
                path: path.to_owned(),
                mode,
            });
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Loads every certificate of a CA file into a root store; at least one must be usable.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(load_certs(path)?);
    if added == 0 {
        return Err(TlsError::BadCa {
            path: path.to_owned(),
            detail: format!("{ignored} certificate(s), none parsable as a trust anchor"),
        });
    }
    Ok(roots)
}

/// Loads a PEM certificate chain; at least one certificate must be present.
pub(crate) fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| TlsError::Pem {
            path: path.to_owned(),
            what: "certificate",
            detail: err.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            what: "certificate",
            detail: "no CERTIFICATE section".to_owned(),
        });
    }
    Ok(certs)
}

/// Loads the first private key of a PEM file after checking the file's permissions. The error
/// never includes key bytes.
pub(crate) fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    check_key_permissions(path)?;
    let bytes = zeroize::Zeroizing::new(read(path)?);
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|err| TlsError::Pem {
        path: path.to_owned(),
        what: "private key",
        // pki-types errors describe the section, not its contents.
        detail: err.to_string(),
    })
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Io {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chacha_comes_first_and_only_tls13_suites_remain() {
        let provider = crypto_provider();
        let suites: Vec<_> = provider.cipher_suites.iter().map(|s| s.suite()).collect();
        assert_eq!(
            suites.first(),
            Some(&rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256)
        );
        assert!(provider
            .cipher_suites
            .iter()
            .all(|s| s.version() == &rustls::version::TLS13));
        assert_eq!(suites.len(), 3);
    }

    #[cfg(unix)]
    #[test]
    fn group_readable_key_is_refused_with_its_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        fs::write(
            &path,
            b"-----BEGIN PRIVATE KEY-----\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let err = load_key(&path).unwrap_err();
        assert!(
            matches!(err, TlsError::KeyPermissions { mode: 0o640, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"));
    }

    #[test]
    fn missing_and_empty_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        assert!(matches!(load_certs(&missing), Err(TlsError::Io { path, .. }) if path == missing));
        let empty = dir.path().join("empty.pem");
        fs::write(&empty, b"").unwrap();
        assert!(matches!(load_certs(&empty), Err(TlsError::Pem { .. })));
        assert!(matches!(load_roots(&empty), Err(TlsError::Pem { .. })));
    }
}
