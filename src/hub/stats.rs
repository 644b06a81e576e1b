//! The hub's counters ([`HubStats`] on `/status`) and its sink's commit figures
//! ([`SinkStats`] on `/metrics`, with the fault `/health` reports).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use super::sink::{Outcome, SinkError};

/// Counters since the hub started.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct HubStats {
    pub accepted_batches: u64,
    pub records_written: u64,
    /// Batches acknowledged again without writing (includes `below_window`).
    pub duplicates: u64,
    /// Duplicates below a de-dup window that gave up a gap (see `dedup`).
    pub below_window: u64,
    /// Batches the sink refused for their data and quarantined (acknowledged).
    pub quarantined: u64,
    /// Batches marked at start-up because the sink already held them.
    pub recovered_batches: u64,
    /// Rejected payloads by reason.
    pub rejected: BTreeMap<&'static str, u64>,
}

/// The live counters behind [`HubStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub accepted_batches: AtomicU64,
    pub records_written: AtomicU64,
    pub duplicates: AtomicU64,
    pub below_window: AtomicU64,
    pub quarantined: AtomicU64,
    recovered_batches: u64,
    rejected: Mutex<BTreeMap<&'static str, u64>>,
}

impl Counters {
    pub(crate) fn new(recovered_batches: u64) -> Counters {
        Counters {
            recovered_batches,
            ..Counters::default()
        }
    }

    pub(crate) fn accepted(&self, records: usize) {
        self.accepted_batches.fetch_add(1, Ordering::Relaxed);
        self.records_written
            .fetch_add(records as u64, Ordering::Relaxed);
    }

    pub(crate) fn reject(&self, reason: &'static str) {
        *self
            .rejected
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(reason)
            .or_default() += 1;
    }

    pub(crate) fn snapshot(&self) -> HubStats {
        HubStats {
            accepted_batches: self.accepted_batches.load(Ordering::Relaxed),
            records_written: self.records_written.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            below_window: self.below_window.load(Ordering::Relaxed),
            quarantined: self.quarantined.load(Ordering::Relaxed),
            recovered_batches: self.recovered_batches,
            rejected: self
                .rejected
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }
}

/// The sink's commits: latency (sum and count), failures, the fault since the last failure, and how many
/// batches the hub holds unanswered (in flight).
#[derive(Debug, Default)]
pub(crate) struct SinkStats {
    latency_us: AtomicU64,
    commits: AtomicU64,
    failures: AtomicU64,
    in_flight: AtomicU64,
    acks_dropped: AtomicU64,
    fault: Mutex<Option<Fault>>,
}

/// Why the hub is degraded, and whether a probe found the sink unreachable meanwhile.
#[derive(Debug)]
struct Fault {
    reason: String,
    /// A probe failed since the fault began: a probe that succeeds again ends it. A fault
    /// only commits have seen (the database answers, but refuses the commits) ends only with
    /// a commit that succeeds.
    unreachable_seen: bool,
}

/// A point-in-time copy of [`SinkStats`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SinkFigures {
    pub latency_sum_s: f64,
    pub commits: u64,
    pub failures: u64,
    pub in_flight: u64,
    pub acks_dropped: u64,
}

impl SinkStats {
    /// Records one commit attempt that took `took`; a failure sets the fault, a success
    /// clears it.
    pub(crate) fn commit_done(&self, took: Duration, result: &Result<Vec<Outcome>, SinkError>) {
        let mut fault = self.fault.lock().unwrap_or_else(PoisonError::into_inner);
        match result {
            Ok(_) => {
                self.latency_us.fetch_add(
                    u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
                self.commits.fetch_add(1, Ordering::Relaxed);
                if let Some(was) = fault.take() {
                    tracing::info!(was = %was.reason, "sink commits again: hub healthy");
                }
            }
            Err(e) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                let unreachable_seen = fault.as_ref().is_some_and(|f| f.unreachable_seen);
                *fault = Some(Fault {
                    reason: e.to_string(),
                    unreachable_seen,
                });
            }
        }
    }

    /// Records a probe of the sink (is the database there?): a failure sets the fault; a
    /// success ends a fault during which a probe had failed.
    pub(crate) fn probe_done(&self, result: &Result<(), SinkError>) {
        let mut fault = self.fault.lock().unwrap_or_else(PoisonError::into_inner);
        match result {
            Err(e) => {
                if fault.is_none() {
                    tracing::warn!(error = %e, "sink unreachable: hub degraded");
                }
                *fault = Some(Fault {
                    reason: e.to_string(),
                    unreachable_seen: true,
                });
            }
            Ok(()) => {
                if fault.as_ref().is_some_and(|f| f.unreachable_seen) {
                    let was = fault.take().map(|f| f.reason).unwrap_or_default();
                    tracing::info!(was = %was, "sink reachable again: hub healthy");
                }
            }
        }
    }

    /// Why the last commit failed, while none has succeeded since.
    pub(crate) fn fault(&self) -> Option<String> {
        self.fault
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|f| f.reason.clone())
    }

    /// `n` more batches taken from the broker and not yet answered.
    pub(crate) fn take(&self, n: usize) {
        self.in_flight.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// `n` batches answered (acknowledged or not).
    pub(crate) fn release(&self, n: usize) {
        self.in_flight.fetch_sub(n as u64, Ordering::Relaxed);
    }

    /// One ack dropped because the queue to the broker was full.
    pub(crate) fn ack_dropped(&self) {
        self.acks_dropped.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn figures(&self) -> SinkFigures {
        SinkFigures {
            latency_sum_s: self.latency_us.load(Ordering::Relaxed) as f64 / 1e6,
            commits: self.commits.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            acks_dropped: self.acks_dropped.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 13 items 3 and 5: commit latency sums up; a failure sets the fault `/health`
    /// reports until the next success.
    #[test]
    fn commits_sum_their_latency_and_a_failure_is_a_fault_until_the_next_success() {
        let s = SinkStats::default();
        s.commit_done(Duration::from_micros(800), &Ok(vec![]));
        s.commit_done(Duration::from_millis(30), &Ok(vec![]));
        s.commit_done(Duration::from_secs(9), &Ok(vec![]));
        let f = s.figures();
        assert_eq!(f.commits, 3);
        assert!(
            (f.latency_sum_s - 9.0308).abs() < 1e-9,
            "{}",
            f.latency_sum_s
        );
        assert_eq!(s.fault(), None);
        s.commit_done(
            Duration::ZERO,
            &Err(SinkError::Database("connection refused".into())),
        );
        assert_eq!(s.fault().as_deref(), Some("database: connection refused"));
        assert_eq!(s.figures().failures, 1);
        s.commit_done(Duration::ZERO, &Ok(vec![]));
        assert_eq!(s.fault(), None);
    }

    /// A probe that finds the database gone degrades the hub, and one that finds it back
    /// ends that, with no commit needed; a fault only commits saw (the database answers but
    /// refuses them) stays until a commit succeeds.
    #[test]
    fn a_probe_ends_only_a_fault_it_saw() {
        let s = SinkStats::default();
        let down = || Err(SinkError::Database("connecting: connection refused".into()));
        s.probe_done(&Ok(()));
        assert_eq!(s.fault(), None);
        s.probe_done(&down());
        assert_eq!(
            s.fault().as_deref(),
            Some("database: connecting: connection refused")
        );
        s.commit_done(
            Duration::ZERO,
            &Err(SinkError::Database("connection lost".into())),
        );
        s.probe_done(&Ok(()));
        assert_eq!(s.fault(), None, "the database is back");
        assert_eq!(s.figures().failures, 1, "a probe is not a commit");

        s.commit_done(
            Duration::ZERO,
            &Err(SinkError::Database(
                "ERROR: disk full (SQLSTATE 53100)".into(),
            )),
        );
        s.probe_done(&Ok(()));
        assert!(
            s.fault().is_some(),
            "the database answers, but commits fail"
        );
        s.commit_done(Duration::ZERO, &Ok(vec![]));
        assert_eq!(s.fault(), None);
    }
}
