//! The fleet load test's figures: the summary printed and the JSON written with `--json`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::account::Accounting;

/// One hub process over the run (all its restarts).
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct HubFigures {
    pub id: String,
    /// CPU seconds used during the window and the drain (every incarnation of the process).
    pub cpu_s: Option<f64>,
    pub rss_mb_peak: Option<f64>,
    /// Times it was SIGKILLed and started again.
    pub restarts: u32,
    /// Its counters from `/metrics`, summed over its incarnations (last scrape of each).
    pub accepted_batches: u64,
    pub records_written: u64,
    pub duplicates: u64,
    pub rejected: BTreeMap<String, u64>,
}

/// The broker process, when the load test started one.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct BrokerFigures {
    pub kind: String,
    pub cpu_s: Option<f64>,
    pub rss_mb_peak: Option<f64>,
}

/// Everything `citygate loadtest hub` reports.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct HubReport {
    pub sink: String,
    /// Database connections per hub (`--sink postgres`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pg_connections: Option<u8>,
    pub hubs: u8,
    pub gateways: u32,
    pub meters: u32,
    pub fields: u32,
    pub interval_s: f64,
    pub batch_every_s: f64,
    pub records_per_batch: u64,
    pub duration_s: f64,
    pub connections: usize,
    pub gateways_per_connection: u32,
    pub withhold_acks: f64,
    pub garbage: f64,
    pub forged: f64,
    pub kill_hubs: u32,
    pub seed: u64,
    /// Batches the fleet would seal in the window if every backlog had room.
    pub offered_batches_per_s: f64,
    /// The window plus the drain: the fleet's load ends when its backlog is acked (or the
    /// drain limit is reached). CPU figures are over this time.
    pub measured_s: f64,
    /// Batches acked over `measured_s`, per second, and their records: what the hubs
    /// sustained (a hub behind the fleet keeps working through the drain).
    pub accepted_batches_per_s: f64,
    pub records_per_s: f64,
    /// First acks that arrived during the window, per second of it.
    pub acked_in_window_per_s: f64,
    /// Sealed → first ack the fleet counted, over every acked batch of the run.
    pub latency_p50_s: Option<f64>,
    pub latency_p99_s: Option<f64>,
    pub latency_max_s: Option<f64>,
    pub sealed_batches: u64,
    pub skipped_seals: u64,
    pub published: u64,
    pub resends: u64,
    /// Hub sessions that came online live while the fleet ran, each re-sending a
    /// connection's unacked batches at once.
    pub presence_resends: u64,
    pub publish_errors: u64,
    pub acks_withheld: u64,
    /// First acks of batches that had been sent more than once.
    pub acks_for_resends: u64,
    /// Acks of batches acked before (the hubs ack every copy).
    pub acks_again: u64,
    pub bad_acks: u64,
    pub garbage_sent: u64,
    pub forged_sent: u64,
    /// From the hubs' `/metrics`: forged = `unknown_signer_key` + `bad_signature`,
    /// garbage = every other reason.
    pub rejected_garbage: u64,
    pub rejected_forged: u64,
    pub forged_acked: u64,
    pub fleet_disconnects: u64,
    #[serde(flatten)]
    pub accounting: Accounting,
    /// The fleet drained: every sealed batch acked before the hubs were stopped.
    pub drained: bool,
    pub drain_s: f64,
    pub hub: Vec<HubFigures>,
    /// Σ hub CPU seconds over `measured_s`, and acked records per hub CPU-second.
    pub hub_cpu_s: Option<f64>,
    pub records_per_hub_cpu_s: Option<f64>,
    pub broker: BrokerFigures,
    /// This process (the fleet: sealing, TLS, acks) over `measured_s`.
    pub fleet_cpu_s: Option<f64>,
    pub setup_s: f64,
    pub clk_tck: u64,
    pub citygate_version: String,
    pub hub_bin: String,
}

impl HubReport {
    /// Why the run failed; empty when it did not.
    pub(crate) fn failures(&self) -> Vec<String> {
        let a = &self.accounting;
        let mut f = Vec::new();
        if a.duplicates_written > 0 {
            f.push(format!(
                "{} duplicate records written",
                a.duplicates_written
            ));
        }
        if a.missing_batches > 0 {
            f.push(format!(
                "{} acked batches missing from the sinks ({} records)",
                a.missing_batches, a.missing_records
            ));
        }
        if a.unexpected_records > 0 {
            f.push(format!(
                "{} records of batches the fleet never sealed (forged?) written",
                a.unexpected_records
            ));
        }
        if self.forged_acked > 0 {
            f.push(format!("{} forged batches acked", self.forged_acked));
        }
        if !self.drained {
            f.push(format!(
                "{} batches never acked within the drain: the hubs fell behind or stalled \
                 (see their logs; a longer --drain gives a slow hub more time)",
                a.unacked_batches
            ));
        }
        f
    }

    /// The human summary.
    pub(crate) fn summary(&self) -> String {
        let f = |v: Option<f64>, d: usize| v.map_or_else(|| "-".into(), |v| format!("{v:.d$}"));
        let a = &self.accounting;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "\nloadtest hub  {} gateways × {} meters × {} fields @ {}s, a batch every {}s \
             ({} records), {} hub(s), sink {}, broker {}, {}s window",
            self.gateways,
            self.meters,
            self.fields,
            self.interval_s,
            self.batch_every_s,
            self.records_per_batch,
            self.hubs,
            match self.pg_connections {
                Some(n) => format!("{} ({n} connections per hub)", self.sink),
                None => self.sink.clone(),
            },
            self.broker.kind,
            self.duration_s,
        );
        let hubs: Vec<String> = self
            .hub
            .iter()
            .map(|h| {
                format!(
                    "{} cpu {} s rss {} MB restarts {}",
                    h.id,
                    f(h.cpu_s, 2),
                    f(h.rss_mb_peak, 1),
                    h.restarts
                )
            })
            .collect();
        let rows = [
            (
                "accepted",
                format!(
                    "{:.1} batches/s, {:.0} records/s over {:.1} s of window and drain \
                     (offered {:.1} batches/s; {} periods skipped, backlog full)",
                    self.accepted_batches_per_s,
                    self.records_per_s,
                    self.measured_s,
                    self.offered_batches_per_s,
                    self.skipped_seals
                ),
            ),
            (
                "latency",
                format!(
                    "p50 {} s, p99 {} s, max {} s (sealed → ack received)",
                    f(self.latency_p50_s, 3),
                    f(self.latency_p99_s, 3),
                    f(self.latency_max_s, 3)
                ),
            ),
            (
                "re-sends",
                format!(
                    "{} re-sent ({} rounds on a hub coming online), {} acks withheld, {} acks \
                     for re-sends, {} repeated acks",
                    self.resends,
                    self.presence_resends,
                    self.acks_withheld,
                    self.acks_for_resends,
                    self.acks_again
                ),
            ),
            (
                "rejected",
                format!(
                    "garbage {} of {} sent, forged {} of {} sent, forged acked {}",
                    self.rejected_garbage,
                    self.garbage_sent,
                    self.rejected_forged,
                    self.forged_sent,
                    self.forged_acked
                ),
            ),
            (
                "sinks",
                format!(
                    "{} records, duplicates written {} ({} batches in more than one sink), \
                     unexpected {}",
                    a.sink_records,
                    a.duplicates_written,
                    a.cross_sink_duplicate_batches,
                    a.unexpected_records
                ),
            ),
            (
                "batches",
                format!(
                    "sealed {}, acked {}, missing {}, unacked {} ({} of them in a sink); \
                     drained {} in {:.1} s",
                    self.sealed_batches,
                    a.acked_batches,
                    a.missing_batches,
                    a.unacked_batches,
                    a.unacked_in_sink,
                    self.drained,
                    self.drain_s
                ),
            ),
            (
                "hub cpu",
                format!(
                    "{} s over window and drain, {} acked records per hub CPU-second",
                    f(self.hub_cpu_s, 2),
                    f(self.records_per_hub_cpu_s, 0)
                ),
            ),
            ("hubs", hubs.join("; ")),
            (
                "broker",
                format!(
                    "{} cpu {} s rss {} MB",
                    self.broker.kind,
                    f(self.broker.cpu_s, 2),
                    f(self.broker.rss_mb_peak, 1)
                ),
            ),
            (
                "fleet",
                format!(
                    "cpu {} s, {} connections, {} disconnects",
                    f(self.fleet_cpu_s, 2),
                    self.connections,
                    self.fleet_disconnects
                ),
            ),
        ];
        for (k, v) in rows {
            let _ = writeln!(s, "  {k:<10} {v}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clean_run_has_no_failures_and_each_fault_is_named() {
        let mut r = HubReport {
            drained: true,
            ..HubReport::default()
        };
        assert!(r.failures().is_empty());
        r.accounting.duplicates_written = 3;
        r.accounting.missing_batches = 1;
        r.forged_acked = 1;
        let f = r.failures().join("; ");
        assert!(f.contains("3 duplicate records"), "{f}");
        assert!(f.contains("1 acked batches missing"), "{f}");
        assert!(f.contains("forged batches acked"), "{f}");
        assert!(r.summary().contains("duplicates written 3"));
        r.drained = false;
        r.accounting.unacked_batches = 7;
        let f = r.failures().join("; ");
        assert!(f.contains("7 batches never acked within the drain"), "{f}");
    }
}
