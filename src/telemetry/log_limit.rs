//! [`LogLimiter`]: a rate limit on repeated warnings, keyed by what is being warned about.
//!
//! A hub fed garbage, or a meter sending malformed payloads every second, must not fill the
//! journal: each warning site asks [`LogLimiter::allow`] with a key (the site, or the site and
//! a reason) before logging. Per key, the first [`LogLimiter::burst`] occurrences of a window
//! are logged; the rest are counted, and the next occurrence after the window closes first
//! logs one summary line (`suppressed = N`, the key) and then opens a new window. So a
//! steady flood costs at most `burst + 1` lines per key and window, whatever its rate. The
//! counters of the events themselves are kept by the callers and never limited.
//!
//! Occurrences that stop arriving leave their last count unreported until the key fires
//! again (or [`LogLimiter::flush`] is called, e.g. at shutdown); the counters still hold it.
//!
//! The limiter is `Sync` (one mutex, held for a map lookup): the hub calls it from blocking
//! threads. Time is tokio's, so tests with paused time can move past a window.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// Warnings logged per key and window by [`LogLimiter::default`].
pub(crate) const DEFAULT_BURST: u32 = 10;
/// The window of [`LogLimiter::default`].
pub(crate) const DEFAULT_WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct KeyState {
    window_start: Instant,
    logged: u32,
    suppressed: u64,
}

/// A keyed limit on repeated warnings; see the module docs.
#[derive(Debug)]
pub(crate) struct LogLimiter {
    burst: u32,
    window: Duration,
    keys: Mutex<HashMap<String, KeyState>>,
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new(DEFAULT_BURST, DEFAULT_WINDOW)
    }
}

impl LogLimiter {
    pub(crate) fn new(burst: u32, window: Duration) -> Self {
        Self {
            burst,
            window,
            keys: Mutex::new(HashMap::new()),
        }
    }

    /// Warnings logged per key and window.
    #[cfg(test)]
    pub(crate) fn burst(&self) -> u32 {
        self.burst
    }

    /// Whether the caller logs this occurrence of `key`. When a window with suppressed
    /// occurrences has closed, logs their count first.
    pub(crate) fn allow(&self, key: &str) -> bool {
        let now = Instant::now();
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        let state = match keys.get_mut(key) {
            Some(s) => s,
            None => keys.entry(key.to_owned()).or_insert(KeyState {
                window_start: now,
                logged: 0,
                suppressed: 0,
            }),
        };
        if now.duration_since(state.window_start) >= self.window {
            if state.suppressed > 0 {
                report(key, state.suppressed, self.window);
            }
            *state = KeyState {
                window_start: now,
                logged: 0,
                suppressed: 0,
            };
        }
        if state.logged < self.burst {
            state.logged += 1;
            true
        } else {
            state.suppressed += 1;
            false
        }
    }

    /// Logs the count of every key's occurrences suppressed and not yet reported.
    pub(crate) fn flush(&self) {
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        for (key, state) in keys.iter_mut() {
            if state.suppressed > 0 {
                report(key, state.suppressed, self.window);
                state.suppressed = 0;
            }
        }
    }
}

fn report(key: &str, suppressed: u64, window: Duration) {
    tracing::warn!(
        key,
        suppressed,
        window = ?window,
        "repeated warnings not logged"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_flood_logs_a_burst_then_one_summary_per_window_and_keys_are_separate() {
        let limiter = LogLimiter::new(3, Duration::from_secs(60));
        let allowed = (0..1000).filter(|_| limiter.allow("a")).count();
        assert_eq!(allowed, 3);
        // Another key has its own budget.
        assert!(limiter.allow("b"));
        tokio::time::advance(Duration::from_secs(61)).await;
        // The next window opens with the burst again (the summary is logged first).
        let allowed = (0..10).filter(|_| limiter.allow("a")).count();
        assert_eq!(allowed, 3);
        let state = |k: &str| limiter.keys.lock().unwrap()[k].suppressed;
        assert_eq!(state("a"), 7);
        limiter.flush();
        assert_eq!(state("a"), 0);
    }
}
