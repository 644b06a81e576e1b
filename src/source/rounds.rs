//! [`Rounds`]: whether any poller is in the middle of a poll round, so the batcher can seal
//! as soon as a round's samples are all in instead of waiting for `batch.max_age`.
//!
//! A Modbus scheduler (one per TCP endpoint lane, RTU bus or DTU) holds a [`RoundGuard`]
//! from its first poll after waking until no device of its own is due any more, i.e. until
//! it goes back to sleep (connecting to an endpoint that is down holds none). It sends each poll's sample before it lets go, so once
//! no guard is held and the sample channel is empty, every sample of every finished round is
//! in the batcher: the gateway is idle and the open batches can leave. Schedulers whose polls
//! are mostly timeouts (a TCP endpoint's probation lane) do not take part: a dead meter must
//! not hold up every live one's readings.
//!
//! With several pollers whose rounds overlap without pause, the gateway may never be idle;
//! `batch.max_age` then bounds how long a record waits, as before.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// Counts the pollers in the middle of a round; cloned into every source.
#[derive(Debug, Clone, Default)]
pub struct Rounds {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    busy: AtomicUsize,
    idle: Notify,
}

impl Rounds {
    /// A round starts; it ends when the guard drops.
    pub(crate) fn begin(&self) -> RoundGuard {
        self.inner.busy.fetch_add(1, Ordering::AcqRel);
        RoundGuard {
            inner: self.inner.clone(),
        }
    }

    /// No poller is in the middle of a round.
    pub(crate) fn is_idle(&self) -> bool {
        self.inner.busy.load(Ordering::Acquire) == 0
    }

    /// Resolves after the last round in progress has ended (or at once if that happened
    /// since the previous call returned). Check [`Rounds::is_idle`] after it: another round
    /// may have begun meanwhile.
    pub(crate) async fn ended(&self) {
        self.inner.idle.notified().await;
    }
}

/// A poll round in progress; dropping it ends the round.
#[derive(Debug)]
pub(crate) struct RoundGuard {
    inner: Arc<Inner>,
}

impl Drop for RoundGuard {
    fn drop(&mut self) {
        if self.inner.busy.fetch_sub(1, Ordering::AcqRel) == 1 {
            // notify_one keeps a permit when nobody waits, so the end is never missed.
            self.inner.idle.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_only_when_every_round_has_ended_and_the_end_is_never_missed() {
        let rounds = Rounds::default();
        assert!(rounds.is_idle());
        let a = rounds.begin();
        let b = rounds.begin();
        assert!(!rounds.is_idle());
        drop(a);
        assert!(!rounds.is_idle(), "one round still runs");
        drop(b);
        assert!(rounds.is_idle());
        // The end happened before anyone waited: the permit is kept.
        tokio::time::timeout(std::time::Duration::from_secs(5), rounds.ended())
            .await
            .expect("the end of the last round is signalled");
    }
}
