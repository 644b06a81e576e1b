//! Reconnect delays: capped exponential backoff with jitter, for every connection the
//! gateway keeps open (the MQTT links, Modbus TCP endpoints, RTU buses).
//!
//! The n-th consecutive failure waits a random duration in `[d/2, d]` where
//! `d = min(initial * 2^n, max)` ("equal jitter"): never zero, so a broken broker or meter
//! endpoint is never hammered in a busy loop, and spread out so a fleet of gateways that
//! lost the same peer does not reconnect in lock-step. [`Backoff::reset`] after a
//! successful connection (CONNACK, TCP connect, serial open).

use std::time::Duration;

use rand::Rng;

/// Default first reconnect delay.
pub(crate) const DEFAULT_INITIAL: Duration = Duration::from_millis(500);
/// Default cap on reconnect delays.
pub(crate) const DEFAULT_MAX: Duration = Duration::from_secs(60);

/// Default first reconnect delay of the uplink and the hub (`reconnect_initial`): a broker
/// failover costs a link 100–200 ms.
///
/// Why 200 ms to 2 s: a returning broker is found within the cap, so a backlog can be
/// delivered within the recovery budget (≤ 3 s after the broker is back), and the fleet does
/// not stampede it. At the cap, equal jitter puts each attempt uniformly in [1 s, 2 s]; after
/// a few failures the attempts of gateways that lost the broker together have random
/// phases, so ~1,000 gateways reach a returning broker at about 500–1,000 TLS handshakes a
/// second for two seconds (mean wait ≈ 0.8 s), which one broker core handles. A fleet of
/// ~10,000 raises `reconnect_max` to 5–10 s to keep that rate.
pub const RECONNECT_INITIAL: Duration = Duration::from_millis(200);
/// Default cap of the uplink's and the hub's reconnect delays (`reconnect_max`).
pub const RECONNECT_MAX: Duration = Duration::from_secs(2);

/// Backoff bounds; `initial` is raised to 1 ms and `max` to `initial` if smaller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    pub initial: Duration,
    pub max: Duration,
}

impl BackoffPolicy {
    /// The uplink's and the hub's default: [`RECONNECT_INITIAL`] to [`RECONNECT_MAX`].
    pub const RECONNECT: BackoffPolicy = BackoffPolicy {
        initial: RECONNECT_INITIAL,
        max: RECONNECT_MAX,
    };
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        BackoffPolicy {
            initial: DEFAULT_INITIAL,
            max: DEFAULT_MAX,
        }
    }
}

/// The state of one reconnect sequence.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub(crate) fn new(policy: BackoffPolicy) -> Backoff {
        let initial = policy.initial.max(Duration::from_millis(1));
        Backoff {
            initial,
            max: policy.max.max(initial),
            failures: 0,
        }
    }

    /// The delay before the next attempt; each call counts one more failure.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        let half = ceiling / 2;
        let jitter_nanos = rand::thread_rng().gen_range(0..=duration_nanos(ceiling - half));
        half + Duration::from_nanos(jitter_nanos)
    }

    /// Consecutive failures since the last reset.
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }

    /// Back to the initial delay (after a successful connection).
    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }

    fn ceiling(&self) -> Duration {
        // 2^16 * initial already exceeds any sensible cap; avoid overflow beyond that.
        let factor = 1u32 << self.failures.min(16);
        self.initial.saturating_mul(factor).min(self.max)
    }
}

fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_stay_in_bounds_and_reset() {
        let policy = BackoffPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        let mut backoff = Backoff::new(policy);
        let expected_ceilings = [100, 200, 400, 800, 1600, 2000, 2000, 2000];
        for ceiling_ms in expected_ceilings {
            let d = backoff.next_delay();
            let ceiling = Duration::from_millis(ceiling_ms);
            assert!(d >= ceiling / 2 && d <= ceiling, "{d:?} vs {ceiling:?}");
        }
        for _ in 0..100 {
            assert!(backoff.next_delay() <= policy.max);
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn zero_policy_never_busy_loops() {
        let mut backoff = Backoff::new(BackoffPolicy {
            initial: Duration::ZERO,
            max: Duration::ZERO,
        });
        for _ in 0..10 {
            assert!(backoff.next_delay() >= Duration::from_micros(500));
        }
    }
}
