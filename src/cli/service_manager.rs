//! Readiness and stop notices to systemd for `Type=notify` units (`sd_notify(3)`).
//!
//! systemd passes the datagram socket in `NOTIFY_SOCKET`; without it (a shell, a test, another
//! service manager) every notice is a no-op. A notice that cannot be sent is logged, never
//! fatal: the service manager then times the start out, which names the problem itself.

use sd_notify::NotifyState;
use tracing::warn;

/// `READY=1`: the service is up (systemd finishes `systemctl start` and starts dependants).
pub(crate) fn ready() {
    send(&[NotifyState::Ready]);
}

/// `STOPPING=1`: the service is shutting down (sealing and committing what it holds).
pub(crate) fn stopping() {
    send(&[NotifyState::Stopping]);
}

fn send(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, state) {
        warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET)");
    }
}
