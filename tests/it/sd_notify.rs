//! Issue 12, "Debian packages": the units are `Type=notify`, so `citygate run` and
//! `citygate hub` tell systemd on `NOTIFY_SOCKET` when they are ready (`READY=1`) and when
//! they begin to stop (`STOPPING=1`). The test binds the datagram socket systemd would.

use std::path::Path;
use std::time::Duration;

use tokio::net::UnixDatagram;
use tokio_util::sync::CancellationToken;

use crate::support::*;

/// The socket a service manager listens on, in a temp dir of the test's.
struct NotifySocket {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    socket: UnixDatagram,
}

impl NotifySocket {
    fn bind() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        Self {
            _dir: dir,
            path,
            socket,
        }
    }

    /// The next notice (bounded), e.g. "READY=1".
    async fn next(&self, limit: Duration) -> Option<String> {
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(limit, self.socket.recv(&mut buf))
            .await
            .ok()?
            .unwrap();
        Some(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
    }
}

/// Spawns `citygate ARGS` with `NOTIFY_SOCKET` set to `notify`'s path.
fn spawn_notifying(
    args: &[&std::ffi::OsStr],
    notify: &NotifySocket,
) -> (std::process::Child, LogLines) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_citygate"));
    cmd.args(args).env("NOTIFY_SOCKET", &notify.path);
    spawn_logged_command(cmd)
}

/// Expects `READY=1`, then stops the child with SIGTERM and expects `STOPPING=1` and a
/// clean exit; returns the child's log.
async fn ready_then_stopping(
    notify: &NotifySocket,
    mut child: std::process::Child,
    mut log: LogLines,
) -> String {
    let ready = notify.next(Duration::from_secs(20)).await;
    if ready.as_deref() != Some("READY=1") {
        let _ = child.kill();
        panic!("expected READY=1, got {ready:?}\n{}", log.finish().await);
    }
    assert!(child.try_wait().unwrap().is_none(), "exited after READY=1");
    signal(&child, "-TERM");
    let stopping = notify.next(Duration::from_secs(20)).await;
    let status = wait_exit(&mut child, Duration::from_secs(20)).await;
    assert_eq!(
        stopping.as_deref(),
        Some("STOPPING=1"),
        "{}",
        log.finish().await
    );
    assert!(status.success(), "{status}\n{}", log.finish().await);
    log.finish().await.to_owned()
}

/// issue 12 (Debian packages, `Type=notify`): `citygate run` sends `READY=1` once its
/// pipeline and uplink are started and `STOPPING=1` on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn citygate_run_notifies_ready_and_stopping() {
    let profiles = shipped_profiles();
    let token = CancellationToken::new();
    let sim = start_sim(&profiles, "chint-ddsu666", 1, 5, &token).await;
    let dep = Deployment::new();
    let config = GatewayToml::new("gw-notify", &["active_power"])
        .shipped_profiles()
        .devices(&device_toml(
            "m1",
            "chint-ddsu666",
            &sim.address,
            1,
            "200ms",
        ))
        .write(dep.path());
    let notify = NotifySocket::bind();
    let (child, log) = spawn_notifying(
        &["run".as_ref(), "--config".as_ref(), config.as_os_str()],
        &notify,
    );
    ready_then_stopping(&notify, child, log).await;
    token.cancel();
}

/// issue 12 (Debian packages, `Type=notify`): `citygate hub` sends `READY=1` once the
/// broker granted its subscriptions (here its embedded broker's) and `STOPPING=1` on
/// SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn citygate_hub_notifies_ready_once_subscribed_and_stopping() {
    let dep = Deployment::new();
    let config = embedded_broker_hub(&dep);
    let notify = NotifySocket::bind();
    let (child, log) = spawn_notifying(
        &["hub".as_ref(), "--config".as_ref(), config.as_os_str()],
        &notify,
    );
    let log = ready_then_stopping(&notify, child, log).await;
    assert!(log.contains("hub subscribed"), "{log}");
}

/// A hub config with its own broker, from `citygate keys tls` output.
fn embedded_broker_hub(dep: &Deployment) -> std::path::PathBuf {
    let pki = dep.path().join("pki");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_citygate"))
        .args(["keys", "tls", "--dir"])
        .arg(&pki)
        .args([
            "--server",
            "localhost",
            "--server",
            "127.0.0.1",
            "--client",
            "hub-1",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let files = |dir: &Path, cert: &str, key: &str| TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join(cert),
        key: dir.join(key),
    };
    HubToml::embedded_broker(
        "127.0.0.1:0",
        &files(&pki, "client-hub-1.pem", "client-hub-1.key"),
        &files(&pki, "broker.pem", "broker.key"),
    )
    .write(dep.path())
}
