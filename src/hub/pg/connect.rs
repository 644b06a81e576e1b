//! Connecting to PostgreSQL as `[sink]` says: the password from its file (refused if group or
//! others may access it), TLS with rustls (ring provider, server verified against `ca_file`
//! and its host name, i.e. verify-full) or plaintext where the config allows it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use postgres::config::SslMode;
use postgres::{Client, NoTls};

use crate::hub::config::{PgConfig, PgTls};
use crate::hub::sink::SinkError;

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Keepalive idle time, so a vanished server is noticed.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);

/// Opens a connection. Blocks. A database that cannot be reached (refused, timed out, gone
/// mid-handshake) is [`SinkError::Database`]: worth trying again. One that answers and will
/// not have us — a server certificate that does not verify, a refused login, no such
/// database — is [`SinkError::Setup`]: the configuration must change.
pub(crate) fn connect(cfg: &PgConfig) -> Result<Client, SinkError> {
    let mut c = cfg.connect_config();
    c.connect_timeout(CONNECT_TIMEOUT)
        .keepalives(true)
        .keepalives_idle(KEEPALIVE_IDLE)
        .application_name("citygate-hub");
    if let Some(file) = &cfg.password_file {
        c.password(read_password(file)?);
    }
    let client = match &cfg.tls {
        PgTls::VerifyFull { ca_file } => {
            c.ssl_mode(SslMode::Require);
            c.connect(tokio_postgres_rustls::MakeRustlsConnect::new(
                (*client_config(ca_file)?).clone(),
            ))
        }
        PgTls::Plaintext { .. } => {
            c.ssl_mode(SslMode::Disable);
            c.connect(NoTls)
        }
    };
    client.map_err(|e| {
        let text = format!("connecting: {}", super::describe(&e));
        if refused_us(&e) {
            SinkError::Setup(text)
        } else {
            SinkError::Database(text)
        }
    })
}

/// Whether the server answered and refused this client: its certificate did not verify
/// (rustls), or it refused the login (SQLSTATE class 28) or knows no such database (3D000).
fn refused_us(e: &postgres::Error) -> bool {
    if let Some(code) = e.code().map(|c| c.code()) {
        return code.starts_with("28") || code == "3D000";
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cause {
        let inner_io = c
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref);
        if c.is::<rustls::Error>() || inner_io.is_some_and(|i| i.is::<rustls::Error>()) {
            return true;
        }
        cause = c.source();
    }
    false
}

/// rustls client configuration trusting only `ca_file`.
fn client_config(ca_file: &Path) -> Result<Arc<rustls::ClientConfig>, SinkError> {
    let setup = |e: crate::mqtt::TlsError| SinkError::Setup(e.to_string());
    let roots = crate::mqtt::tls::load_roots(ca_file).map_err(setup)?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| SinkError::Setup(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The first line of the password file; refused if group or others may access the file.
fn read_password(path: &Path) -> Result<String, SinkError> {
    let io = |e: std::io::Error| SinkError::Setup(format!("password_file {}: {e}", path.display()));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(SinkError::Setup(format!(
                "password_file {} has mode {mode:04o}; it must not be accessible by group or \
                 others (run `chmod 600 {}`)",
                path.display(),
                path.display()
            )));
        }
    }
    let text = std::fs::read_to_string(path).map_err(io)?;
    Ok(text.lines().next().unwrap_or_default().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 13 item 2: a password file others may read is refused, naming file and mode.
    #[test]
    fn a_password_file_readable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pg.pass");
        std::fs::write(&path, "s3cret\nignored\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_password(&path).unwrap_err().to_string();
        assert!(err.contains("0644") && err.contains("pg.pass"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_password(&path).unwrap(), "s3cret");
    }
}
