//! The process signals a long-running command reacts to, installed once for the whole run.
//!
//! Installing the handlers once (not a fresh `signal()` future per loop turn) means a signal
//! that arrives while the loop is busy is queued, never lost. SIGTERM and SIGINT stop the
//! process; SIGHUP asks it to reopen the files it writes (logrotate's `postrotate kill -HUP`)
//! and is otherwise harmless: without a handler, its default action would kill the process
//! and cost the open batch.

use tokio::signal::unix::{signal, Signal, SignalKind};

/// What a received signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SignalEvent {
    /// SIGTERM or SIGINT: stop cleanly.
    Stop,
    /// SIGHUP: reopen files written by the process.
    Reopen,
}

/// The installed handlers.
#[derive(Debug)]
pub(crate) struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    /// Installs the handlers; call within the runtime, before the work starts.
    pub(crate) fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// The next signal received.
    pub(crate) async fn next(&mut self) -> SignalEvent {
        tokio::select! {
            _ = self.term.recv() => SignalEvent::Stop,
            _ = self.int.recv() => SignalEvent::Stop,
            _ = self.hup.recv() => SignalEvent::Reopen,
        }
    }

    /// Waits for a stop signal; `on_reopen` runs for each SIGHUP before it.
    pub(crate) async fn until_stop<F, Fut>(&mut self, mut on_reopen: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        while self.next().await == SignalEvent::Reopen {
            on_reopen().await;
        }
    }
}
