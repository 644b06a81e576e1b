//! A throw-away certificate authority for tests and `citygate demo` (rcgen, ECDSA P-256).
//!
//! [`CertAuthority::generate`] creates a CA and writes its certificate to `ca.pem` in the given
//! directory; [`CertAuthority::issue_localhost_server`] and [`CertAuthority::issue_client`]
//! write leaf certificates signed by it (`{name}.pem` + `{name}.key`). Private keys are created
//! with mode 0600 (and tightened to 0600 if the file already existed); the CA's private key
//! stays in memory and is never written, so a CA can only issue while its value lives.
//!
//! Client certificates carry the gateway id as common name and no organisation: rumqttd (with
//! client-certificate verification) turns a subject organisation into a tenant prefix that
//! would partition topics between gateways and the hub.
//!
//! This is not a production PKI: no revocation, long validity, no key escrow.

use std::fs;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

use super::tls::{TlsClientFiles, TlsError, TlsServerFiles};

/// A leaf certificate and its private key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertKeyFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A CA held in memory that writes certificates into one directory.
pub struct CertAuthority {
    dir: PathBuf,
    ca_file: PathBuf,
    cert: Certificate,
    key: KeyPair,
}

impl std::fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key pair.
        f.debug_struct("CertAuthority")
            .field("dir", &self.dir)
            .field("ca_file", &self.ca_file)
            .finish_non_exhaustive()
    }
}

impl CertAuthority {
    /// Generates a CA named `common_name` and writes its certificate to `dir/ca.pem`. The
    /// directory is created if needed.
    pub fn generate(dir: &Path, common_name: &str) -> Result<CertAuthority, TlsError> {
        fs::create_dir_all(dir).map_err(|source| TlsError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key)?;
        let ca_file = dir.join("ca.pem");
        write_file(&ca_file, cert.pem().as_bytes(), false)?;
        Ok(CertAuthority {
            dir: dir.to_owned(),
            ca_file,
            cert,
            key,
        })
    }

    /// The CA certificate file (`ca.pem`).
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// Issues `server.pem`/`server.key` for `localhost` and 127.0.0.1.
    pub fn issue_localhost_server(&self) -> Result<CertKeyFiles, TlsError> {
        self.issue_server("server", &["localhost"], &[IpAddr::V4(Ipv4Addr::LOCALHOST)])
    }

    /// Issues a server certificate (`{file_stem}.pem`/`.key`) for the given names.
    pub(crate) fn issue_server(
        &self,
        file_stem: &str,
        dns_names: &[&str],
        ips: &[IpAddr],
    ) -> Result<CertKeyFiles, TlsError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(dns_names.first().copied().unwrap_or(file_stem));
        for dns in dns_names {
            params.subject_alt_names.push(SanType::DnsName(
                (*dns)
                    .try_into()
                    .map_err(|_| TlsError::InvalidName((*dns).to_owned()))?,
            ));
        }
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue_leaf(file_stem, params)
    }

    /// Issues `client-{gateway_id}.pem`/`.key`, common name = the gateway id.
    pub fn issue_client(&self, gateway_id: &str) -> Result<CertKeyFiles, TlsError> {
        check_file_stem(gateway_id)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(gateway_id);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue_leaf(&format!("client-{gateway_id}"), params)
    }

    /// The files a client needs: this CA, plus the given client certificate and key.
    pub fn client_files(&self, client: &CertKeyFiles) -> TlsClientFiles {
        TlsClientFiles {
            ca: self.ca_file.clone(),
            cert: client.cert.clone(),
            key: client.key.clone(),
        }
    }

    /// The files a broker needs: this CA for client certificates, plus its own cert and key.
    pub fn server_files(&self, server: &CertKeyFiles) -> TlsServerFiles {
        TlsServerFiles {
            client_ca: self.ca_file.clone(),
            cert: server.cert.clone(),
            key: server.key.clone(),
        }
    }

    fn issue_leaf(
        &self,
        file_stem: &str,
        mut params: CertificateParams,
    ) -> Result<CertKeyFiles, TlsError> {
        check_file_stem(file_stem)?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        let files = CertKeyFiles {
            cert: self.dir.join(format!("{file_stem}.pem")),
            key: self.dir.join(format!("{file_stem}.key")),
        };
        let key_pem = zeroize::Zeroizing::new(key.serialize_pem());
        write_file(&files.key, key_pem.as_bytes(), true)?;
        write_file(&files.cert, cert.pem().as_bytes(), false)?;
        Ok(files)
    }
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

/// Whether `name` can name a client certificate ([`CertAuthority::issue_client`]).
pub(crate) fn check_client_name(name: &str) -> Result<(), TlsError> {
    check_file_stem(name)?;
    check_file_stem(&format!("client-{name}"))
}

/// File stems become file names: no separators, no dot-dot, no surprises.
fn check_file_stem(stem: &str) -> Result<(), TlsError> {
    let ok = (1..=64).contains(&stem.len())
        && !stem.starts_with('.')
        && stem
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(TlsError::InvalidName(stem.to_owned()))
    }
}

fn write_file(path: &Path, bytes: &[u8], private: bool) -> Result<(), TlsError> {
    let io_err = |source| TlsError::Io {
        path: path.to_owned(),
        source,
    };
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        options.mode(0o600);
        // An existing file keeps its mode on open: tighten it before writing the key.
        if path.exists() {
            fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io_err)?;
        }
    }
    let mut file = options.open(path).map_err(io_err)?;
    file.write_all(bytes).map_err(io_err)?;
    file.sync_all().map_err(io_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::tls;

    #[test]
    fn issued_files_load_into_rustls_configs() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertAuthority::generate(dir.path(), "citygate test ca").unwrap();
        let server = ca.issue_localhost_server().unwrap();
        let client = ca.issue_client("gw-0001").unwrap();
        assert!(tls::client_config(&ca.client_files(&client)).is_ok());
        assert!(tls::server_config(&ca.server_files(&server)).is_ok());
        assert_eq!(client.cert.file_name().unwrap(), "client-gw-0001.pem");
    }

    #[cfg(unix)]
    #[test]
    fn keys_are_0600_even_over_an_existing_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join("server.key");
        fs::write(&stale, b"old").unwrap();
        fs::set_permissions(&stale, fs::Permissions::from_mode(0o644)).unwrap();
        let ca = CertAuthority::generate(dir.path(), "ca").unwrap();
        let server = ca.issue_localhost_server().unwrap();
        let mode = fs::metadata(&server.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        tls::check_key_permissions(&server.key).unwrap();
    }

    #[test]
    fn names_that_are_not_plain_file_stems_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertAuthority::generate(dir.path(), "ca").unwrap();
        for bad in ["../x", "a/b", "", ".hidden"] {
            assert!(
                matches!(ca.issue_client(bad), Err(TlsError::InvalidName(_))),
                "{bad:?}"
            );
        }
    }
}
