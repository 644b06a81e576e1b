//! Retention at the hub: `citygate hub-prune` drops records older than their purpose's
//! approved retention from the JSON Lines sink (issue 11 item 3).
//!
//! A record's retention is the `retention` of the policy its (gateway, purpose) is approved
//! under in the hub config; when several hashes of one purpose are approved, the longest
//! retention wins. A record is dropped when `now` is more than its retention past the end of
//! what it describes: an aggregate's window end, else its `at_ms`. Records are kept when
//! their purpose has no retention, is no longer approved (the operator decides; nothing is
//! deleted by omission), or is unknown (lines from before purposes were recorded, envelope
//! versions 1 and 2); lines that do not parse (a torn last line) are copied unchanged.
//!
//! The rotated files beside the sink (`records-<UTC time>.jsonl`, `hub::rotate`) are pruned
//! the same way, each on its own. The sink is rewritten as `rewrite` does it: crash-safely (temp file `<sink>.prune-tmp`,
//! sync, rename, directory sync) and only while no hub holds the hub state, so prune refuses
//! to run beside a hub.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::Deserialize;

use super::config::{HubConfig, SinkConfig};
pub use super::rewrite::RewriteError as PruneError;
use super::rewrite::{lock_hub, rewrite_sink};

/// The temp file beside the sink a prune writes (see `rewrite`).
const TEMP_SUFFIX: &str = ".prune-tmp";

/// What a prune did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneReport {
    pub kept: u64,
    /// Dropped records by purpose (jsonl).
    pub dropped: BTreeMap<String, u64>,
    /// Dropped daily partitions (postgres).
    pub dropped_partitions: Vec<String>,
}

/// The fields of a sink line that decide its fate.
#[derive(Deserialize)]
struct LineAge {
    gateway: String,
    purpose: Option<String>,
    at_ms: i64,
    window: Option<WindowEnd>,
}

#[derive(Deserialize)]
struct WindowEnd {
    end_ms: i64,
}

/// Prunes `cfg`'s sink at `now_ms` (ms since the Unix epoch). Blocks (file I/O, fsync).
pub fn prune(cfg: &HubConfig, now_ms: i64) -> Result<PruneReport, PruneError> {
    let path = match &cfg.sink {
        SinkConfig::Jsonl { path, .. } => path,
        SinkConfig::Postgres(pg) => return prune_postgres(cfg, pg, now_ms),
    };
    let hub_lock = lock_hub(cfg, "pruning")?;
    let mut retention: HashMap<(&str, &str), Duration> = HashMap::new();
    for g in &cfg.gateways {
        for p in &g.policies {
            if let Some(r) = p.retention {
                let e = retention
                    .entry((g.id.as_str(), p.stamp.purpose.as_str()))
                    .or_default();
                *e = (*e).max(r);
            }
        }
    }
    let mut report = PruneReport::default();
    let keep = |line: &[u8]| match expired(line, &retention, now_ms) {
        Some(purpose) => {
            *report.dropped.entry(purpose).or_default() += 1;
            false
        }
        None => true,
    };
    let mut keep = keep;
    let rotated =
        super::rotate::rotated_files(path).map_err(|source| super::rewrite::RewriteError::Io {
            path: path.to_owned(),
            source,
        })?;
    let mut kept = 0;
    let mut any = false;
    for file in rotated.iter().chain(std::iter::once(path)) {
        if let Some(n) = rewrite_sink(&hub_lock, file, TEMP_SUFFIX, &mut keep, b"")? {
            kept += n;
            any = true;
        }
    }
    if !any {
        return Ok(PruneReport::default());
    }
    report.kept = kept;
    for (purpose, n) in &report.dropped {
        tracing::info!(purpose = %purpose, dropped = n, "records past retention pruned");
    }
    tracing::info!(kept = report.kept, sink = %path.display(), "sink pruned");
    Ok(report)
}

/// The postgres sink: drops the daily partitions past every purpose's retention (see
/// `pg::retention`); safe beside running hubs.
fn prune_postgres(
    cfg: &HubConfig,
    pg: &super::config::PgConfig,
    now_ms: i64,
) -> Result<PruneReport, PruneError> {
    let sink = super::pg::PgSink::open(pg)?;
    let policy = super::pg::retention::RetentionPolicy::from_config(cfg);
    let dropped_partitions = sink.drop_expired(&policy, now_ms)?;
    Ok(PruneReport {
        dropped_partitions,
        ..PruneReport::default()
    })
}

/// The purpose of `line` if it is past its retention at `now_ms`.
fn expired(
    line: &[u8],
    retention: &HashMap<(&str, &str), Duration>,
    now_ms: i64,
) -> Option<String> {
    let l: LineAge = serde_json::from_slice(line).ok()?;
    let purpose = l.purpose?;
    let keep = retention.get(&(l.gateway.as_str(), purpose.as_str()))?;
    let keep_ms = i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
    let end = l.window.map_or(l.at_ms, |w| w.end_ms);
    (now_ms.saturating_sub(end) > keep_ms).then_some(purpose)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::dedup::Dedup;
    use super::super::rewrite::temp_path;
    use super::*;

    const DAY_MS: i64 = 86_400_000;
    const NOW: i64 = 1_700_000_000_000;

    fn config(dir: &Path) -> HubConfig {
        let hash = "ab".repeat(32);
        let text = format!(
            "[hub]\nid = \"hub-1\"\nhpke_secret_key = \"k\"\nack_signing_key = \"a\"\n\
             state_path = \"state\"\n[sink]\ntype = \"jsonl\"\npath = \"records.jsonl\"\n\
             [mqtt]\nbroker = \"localhost:1\"\ndanger_plaintext = true\n\
             [[gateway]]\nid = \"gw-1\"\nverifying_key = \"v\"\npolicies = [\n\
             {{ purpose = \"billing\", hash = \"{hash}\", retention = \"1d\" }},\n\
             {{ purpose = \"billing\", hash = \"{}\", retention = \"2d\" }},\n\
             {{ purpose = \"open-data\", hash = \"{hash}\" }},\n]\n\
             [[gateway]]\nid = \"gw-2\"\nverifying_key = \"v\"\n",
            "cd".repeat(32)
        );
        HubConfig::parse(&dir.join("hub.toml"), &text).unwrap()
    }

    fn line(gateway: &str, purpose: Option<&str>, at_ms: i64, window_end: Option<i64>) -> String {
        let mut v = serde_json::json!({
            "gateway": gateway, "stream": "readings", "seq": 1, "purpose": purpose,
            "field": "energy_import", "at_ms": at_ms,
        });
        if let Some(end) = window_end {
            v["window"] = serde_json::json!({ "function": "delta", "end_ms": end });
        }
        format!("{v}\n")
    }

    /// Issue 11 item 3: records past their purpose's retention are dropped (the longest
    /// retention of the purpose's approved hashes; an aggregate by its window end); others,
    /// hub event lines and lines that do not parse, are kept byte for byte.
    #[test]
    fn records_past_their_purposes_retention_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let kept = [
            line("gw-1", Some("billing"), NOW - DAY_MS, None),
            line(
                "gw-1",
                Some("billing"),
                NOW - 3 * DAY_MS,
                Some(NOW - DAY_MS),
            ),
            line("gw-1", Some("open-data"), NOW - 100 * DAY_MS, None),
            line("gw-1", None, NOW - 100 * DAY_MS, None),
            line("gw-2", Some("billing"), NOW - 100 * DAY_MS, None),
            // A hub event line (issue 11 item 7) has no record to age: kept.
            "{\"hub_event\":\"emergency_destroyed\",\"emergency_id\":\"em-1\",\"records\":3,\"at_ms\":0}\n"
                .to_owned(),
        ];
        let dropped = [
            line("gw-1", Some("billing"), NOW - 2 * DAY_MS - 1, None),
            line(
                "gw-1",
                Some("billing"),
                NOW - 9 * DAY_MS,
                Some(NOW - 3 * DAY_MS),
            ),
        ];
        let torn = "{\"gateway\":\"gw-1\",\"purpose\":\"bil";
        let mut text = String::new();
        for (i, l) in kept.iter().enumerate() {
            text.push_str(l);
            if let Some(d) = dropped.get(i) {
                text.push_str(d);
            }
        }
        text.push_str(torn);
        let sink = dir.path().join("records.jsonl");
        std::fs::write(&sink, &text).unwrap();

        let report = prune(&cfg, NOW).unwrap();
        assert_eq!(report.kept, 7);
        assert_eq!(report.dropped, BTreeMap::from([("billing".to_owned(), 2)]));
        assert_eq!(
            std::fs::read_to_string(&sink).unwrap(),
            kept.concat() + torn
        );
        assert!(!temp_path(&sink, TEMP_SUFFIX).exists());
    }

    /// issue 12 item 4: the rotated files beside the sink are pruned too.
    #[test]
    fn rotated_files_are_pruned_too() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let old = line("gw-1", Some("billing"), NOW - 9 * DAY_MS, None);
        let fresh = line("gw-1", Some("billing"), NOW - DAY_MS, None);
        let rotated = dir.path().join("records-20231101T000000Z.jsonl");
        let other = dir.path().join("records-notes.jsonl");
        std::fs::write(&rotated, old.clone() + &fresh).unwrap();
        std::fs::write(&other, &old).unwrap();
        std::fs::write(dir.path().join("records.jsonl"), &fresh).unwrap();
        let report = prune(&cfg, NOW).unwrap();
        assert_eq!(report.kept, 2);
        assert_eq!(report.dropped, BTreeMap::from([("billing".to_owned(), 1)]));
        assert_eq!(std::fs::read_to_string(&rotated).unwrap(), fresh);
        assert_eq!(
            std::fs::read_to_string(&other).unwrap(),
            old,
            "not a rotated file"
        );
    }

    /// Prune refuses to run beside a hub holding the state (and so the sink).
    #[test]
    fn prune_refuses_while_a_hub_holds_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let sink = dir.path().join("records.jsonl");
        let text = line("gw-1", Some("billing"), 0, None);
        std::fs::write(&sink, &text).unwrap();
        let hub = Dedup::open(&cfg.path.parent().unwrap().join("state")).unwrap();
        let err = prune(&cfg, NOW).unwrap_err();
        assert!(matches!(err, PruneError::HubRunning { .. }), "{err}");
        assert_eq!(std::fs::read_to_string(&sink).unwrap(), text);
        drop(hub);
    }
}
