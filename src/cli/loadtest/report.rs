//! The load test's figures: latency and throughput from the sink, the summary printed and
//! the JSON written with `--json`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::sink::{Accounting, SinkLog};

/// The measured window and the broker outage in it, as wall-clock ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Timeline {
    pub window_start_ms: i64,
    pub window_end_ms: i64,
    /// Broker stopped at, and listening again at.
    pub outage: Option<(i64, i64)>,
}

/// What the sink says about the measured window.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Delivery {
    /// Lines whose meter read (`at_ms`) falls in the window.
    pub values: u64,
    pub latency_p50_s: Option<f64>,
    pub latency_p99_s: Option<f64>,
    /// Lines read during the outage or written before the backlog drained.
    pub outage_values: u64,
    pub outage_latency_p99_s: Option<f64>,
    /// Broker back → the last line read before it came back was written.
    pub drain_s: Option<f64>,
}

/// Nearest-rank percentile `p` (0 < p ≤ 1) of `sorted`.
pub(super) fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Median and peak of `samples`.
pub(super) fn median_peak(samples: &[f64]) -> (Option<f64>, Option<f64>) {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    (percentile(&s, 0.5), s.last().copied())
}

/// Latency (seen − at_ms) of the lines read in the window. With an outage, lines read
/// while the broker was down, or written between its stop and the end of the drain, are
/// counted apart: they measure recovery, not steady delivery.
pub(super) fn delivery(log: &SinkLog, t: &Timeline) -> Delivery {
    let drained_ms = t.outage.map(|(_, up)| {
        log.entries
            .iter()
            .filter(|e| e.at_ms < up)
            .map(|e| e.seen_ms)
            .max()
            .unwrap_or(up)
            .max(up)
    });
    let (mut steady, mut outage) = (Vec::new(), Vec::new());
    for e in &log.entries {
        if e.at_ms < t.window_start_ms || e.at_ms >= t.window_end_ms {
            continue;
        }
        let latency = (e.seen_ms - e.at_ms) as f64 / 1000.0;
        let in_outage = match (t.outage, drained_ms) {
            (Some((down, up)), Some(drained)) => {
                (e.at_ms >= down && e.at_ms < up) || (e.seen_ms >= down && e.seen_ms <= drained)
            }
            _ => false,
        };
        if in_outage {
            outage.push(latency);
        } else {
            steady.push(latency);
        }
    }
    steady.sort_by(f64::total_cmp);
    outage.sort_by(f64::total_cmp);
    Delivery {
        values: (steady.len() + outage.len()) as u64,
        latency_p50_s: percentile(&steady, 0.5),
        latency_p99_s: percentile(&steady, 0.99),
        outage_values: outage.len() as u64,
        outage_latency_p99_s: percentile(&outage, 0.99),
        drain_s: t
            .outage
            .zip(drained_ms)
            .map(|((_, up), drained)| (drained - up) as f64 / 1000.0),
    }
}

/// Everything the load test reports (`--json`).
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Report {
    pub meters: u32,
    pub interval_s: f64,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub profile: String,
    pub transport: String,
    pub endpoints: usize,
    pub broker: String,
    pub outage: Option<String>,
    /// Records in the sink whose meter read falls in the measured window.
    pub values: u64,
    pub values_per_s: f64,
    pub gateway_cpu_s: Option<f64>,
    pub hub_cpu_s: Option<f64>,
    pub gateway_cpu_s_per_1k_values: Option<f64>,
    pub hub_cpu_s_per_1k_values: Option<f64>,
    pub gateway_rss_mb_median: Option<f64>,
    pub gateway_rss_mb_peak: Option<f64>,
    pub hub_rss_mb_median: Option<f64>,
    pub hub_rss_mb_peak: Option<f64>,
    pub latency_p50_s: Option<f64>,
    pub latency_p99_s: Option<f64>,
    pub outage_values: u64,
    pub outage_latency_p99_s: Option<f64>,
    pub drain_s: Option<f64>,
    pub served_polls: u64,
    pub delivered_polls: u64,
    pub lost: u64,
    pub extra: u64,
    pub duplicated: u64,
    pub sink_records: u64,
    pub sink_unreadable_lines: u64,
    pub gateway_exit_code: Option<i32>,
    /// The gateway's `/status` counters just before it was stopped.
    pub gateway_counters: Option<BTreeMap<String, u64>>,
    /// The gateway's store was empty before it was stopped (else what it still held counts
    /// as lost).
    pub gateway_store_drained: bool,
    pub setup_s: f64,
    pub clk_tck: u64,
    pub citygate_version: String,
    pub loadtest_bin: String,
    pub gateway_bin: String,
    pub gateway_version: String,
    pub hub_bin: String,
    pub hub_version: String,
}

impl Report {
    /// Fills in the sink figures and the per-value costs.
    pub(super) fn add_delivery(&mut self, d: &Delivery, a: &Accounting, log: &SinkLog) {
        self.values = d.values;
        self.values_per_s = d.values as f64 / self.duration_s.max(f64::EPSILON);
        let per_1k = |cpu: Option<f64>| {
            cpu.filter(|_| d.values > 0)
                .map(|c| c * 1000.0 / d.values as f64)
        };
        self.gateway_cpu_s_per_1k_values = per_1k(self.gateway_cpu_s);
        self.hub_cpu_s_per_1k_values = per_1k(self.hub_cpu_s);
        self.latency_p50_s = d.latency_p50_s;
        self.latency_p99_s = d.latency_p99_s;
        self.outage_values = d.outage_values;
        self.outage_latency_p99_s = d.outage_latency_p99_s;
        self.drain_s = d.drain_s;
        self.served_polls = a.served_polls;
        self.delivered_polls = a.delivered_polls;
        self.lost = a.lost;
        self.extra = a.extra;
        self.duplicated = a.duplicated;
        self.sink_records = log.entries.len() as u64;
        self.sink_unreadable_lines = log.unreadable;
    }

    /// The human summary.
    pub(crate) fn summary(&self) -> String {
        let f = |v: Option<f64>, digits: usize| {
            v.map_or_else(|| "-".to_string(), |v| format!("{v:.digits$}"))
        };
        let mut s = String::new();
        let _ = writeln!(
            s,
            "\nloadtest  {} meters ({}, {}, {} endpoints) @ {}s for {}s after {}s warm-up, broker {}{}",
            self.meters,
            self.profile,
            self.transport,
            self.endpoints,
            self.interval_s,
            self.duration_s,
            self.warmup_s,
            self.broker,
            self.outage
                .as_ref()
                .map(|o| format!(", outage {o}"))
                .unwrap_or_default()
        );
        let rows = [
            (
                "values",
                format!("{} ({:.1}/s)", self.values, self.values_per_s),
            ),
            (
                "cpu per 1k values",
                format!(
                    "gateway {} s, hub {} s (total gateway {} s, hub {} s)",
                    f(self.gateway_cpu_s_per_1k_values, 4),
                    f(self.hub_cpu_s_per_1k_values, 4),
                    f(self.gateway_cpu_s, 2),
                    f(self.hub_cpu_s, 2)
                ),
            ),
            (
                "rss median/peak",
                format!(
                    "gateway {}/{} MB, hub {}/{} MB",
                    f(self.gateway_rss_mb_median, 1),
                    f(self.gateway_rss_mb_peak, 1),
                    f(self.hub_rss_mb_median, 1),
                    f(self.hub_rss_mb_peak, 1)
                ),
            ),
            (
                "latency p50/p99",
                format!(
                    "{} s / {} s (meter read → hub sink)",
                    f(self.latency_p50_s, 3),
                    f(self.latency_p99_s, 3)
                ),
            ),
            (
                "outage",
                match &self.outage {
                    Some(_) => format!(
                        "drain {} s after the broker was back; {} values around it, p99 {} s",
                        f(self.drain_s, 2),
                        self.outage_values,
                        f(self.outage_latency_p99_s, 2)
                    ),
                    None => "none".into(),
                },
            ),
            (
                "polls",
                format!(
                    "served {}, delivered {}, lost {}, extra {}, duplicated values {}",
                    self.served_polls, self.delivered_polls, self.lost, self.extra, self.duplicated
                ),
            ),
            (
                "gateway",
                format!(
                    "{} ({}), exit code {}",
                    self.gateway_version,
                    self.gateway_bin,
                    self.gateway_exit_code
                        .map_or_else(|| "killed".into(), |c| c.to_string())
                ),
            ),
            ("hub", format!("{} ({})", self.hub_version, self.hub_bin)),
            (
                "set-up",
                format!("{:.1} s until the gateway was connected", self.setup_s),
            ),
        ];
        for (k, v) in rows {
            let _ = writeln!(s, "  {k:<18} {v}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(lines: &[(i64, i64)]) -> SinkLog {
        let mut log = SinkLog::default();
        for (i, (at, seen)) in lines.iter().enumerate() {
            log.push(
                &format!(
                    "{{\"stream\":\"readings\",\"subject\":\"p-{i}\",\"field\":\"v\",\"at_ms\":{at}}}"
                ),
                *seen,
            );
        }
        log
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), Some(50.0));
        assert_eq!(percentile(&v, 0.99), Some(99.0));
        assert_eq!(percentile(&[3.0], 0.99), Some(3.0));
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(median_peak(&[3.0, 1.0, 2.0]), (Some(2.0), Some(3.0)));
    }

    #[test]
    fn latency_counts_the_window_only() {
        let l = log(&[(500, 900), (1000, 1200), (1500, 1600), (2500, 2600)]);
        let t = Timeline {
            window_start_ms: 1000,
            window_end_ms: 2000,
            outage: None,
        };
        let d = delivery(&l, &t);
        assert_eq!(d.values, 2);
        assert_eq!(d.latency_p50_s, Some(0.1));
        assert_eq!(d.latency_p99_s, Some(0.2));
        assert_eq!(d.drain_s, None);
    }

    #[test]
    fn outage_lines_are_apart_and_drain_ends_with_the_last_backlog_line() {
        // Broker down 2000..5000. Read before the outage and delivered at once; read
        // before it and held back; read during it; read after it, delivered during the
        // drain; read and delivered after the drain.
        let l = log(&[
            (1000, 1100),
            (1900, 5500),
            (3000, 6500),
            (5200, 6000),
            (8000, 8100),
        ]);
        let t = Timeline {
            window_start_ms: 0,
            window_end_ms: 10_000,
            outage: Some((2000, 5000)),
        };
        let d = delivery(&l, &t);
        assert_eq!(d.drain_s, Some(1.5));
        assert_eq!(d.values, 5);
        assert_eq!(d.outage_values, 3);
        assert_eq!(d.latency_p99_s, Some(0.1));
        assert_eq!(d.outage_latency_p99_s, Some(3.6));
    }
}
