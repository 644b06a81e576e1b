//! The two small files an emergency collection keeps beside the store: the operator's
//! [`Order`] (`<store>.emergency`, written by `citygate emergency start|stop`) and the
//! gateway's [`Progress`] (`<store>.emergency-state`, written by the running gateway only),
//! so neither side ever rewrites the other's file.
//!
//! Both are JSON, written to a temporary file, synced, renamed into place and the directory
//! synced: a crash leaves the old file or the new one. Times are absolute (unix ms), so a
//! restart can neither extend an emergency nor forget that it ended.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::reading::TimestampMs;

/// What an operator ordered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Order {
    /// `em-<UTC start>-<random>`: names the emergency on the box, in records and at the hub.
    pub id: String,
    /// The emergency policy (a name in `[policies] emergency`).
    pub policy: String,
    /// Why, in the operator's words (travels to the hub with the reports).
    pub reason: String,
    pub started_ms: TimestampMs,
    /// When it ends by itself; fixed at start.
    pub expires_ms: TimestampMs,
    /// Set by `citygate emergency stop`.
    #[serde(default)]
    pub stopped_ms: Option<TimestampMs>,
}

impl Order {
    /// When the collection ends: at expiry, or earlier when stopped.
    pub fn ends_ms(&self) -> TimestampMs {
        self.stopped_ms
            .map_or(self.expires_ms, |s| s.min(self.expires_ms))
    }

    pub fn is_active(&self, now_ms: TimestampMs) -> bool {
        now_ms < self.ends_ms()
    }

    /// `stopped` or `expired`.
    pub fn end_reason(&self) -> &'static str {
        match self.stopped_ms {
            Some(s) if s < self.expires_ms => "stopped",
            _ => "expired",
        }
    }
}

/// Whether `id` is a well-formed emergency id (it is used in tags and file names).
pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A new id for an emergency started at `now_ms`: `em-20261130T233000Z-1a2b`.
pub fn new_id(now_ms: TimestampMs) -> String {
    let at = jiff::Timestamp::from_millisecond(now_ms).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    format!(
        "em-{}-{:04x}",
        at.strftime("%Y%m%dT%H%M%SZ"),
        rand::random::<u16>()
    )
}

/// What the gateway did about the order with id `id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Progress {
    pub id: String,
    pub policy: String,
    /// The emergency stream's first sequence number of this collection.
    pub first_seq: u64,
    /// The stream's acknowledged and evicted counts when it began (the stream carries one
    /// collection at a time, so the differences at the end are this one's).
    pub acked_before: u64,
    pub evicted_before: u64,
    /// Set once the collection ended, was purged and reported.
    #[serde(default)]
    pub report: Option<Report>,
}

/// What an ended emergency collection produced, delivered and purged (in batches of the
/// emergency stream); it goes to the hub as the `emergency_ended` record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    /// `expired` or `stopped`.
    pub end: String,
    pub ended_ms: TimestampMs,
    pub produced_batches: u64,
    pub delivered_batches: u64,
    pub purged_batches: u64,
    pub evicted_batches: u64,
    /// Records of the open batch and open windows that were never sealed.
    pub discarded_records: u64,
    /// The batches' sequence numbers, `[first_seq, end_seq)`.
    pub first_seq: u64,
    pub end_seq: u64,
}

impl Report {
    /// The report's tags on the `emergency_ended` record.
    pub fn tags(&self, id: &str, policy: &str) -> Vec<String> {
        let seqs = if self.end_seq > self.first_seq {
            format!("seqs={}..{}", self.first_seq, self.end_seq - 1)
        } else {
            "seqs=none".into()
        };
        vec![
            "emergency".into(),
            format!("emergency_id={id}"),
            format!("policy={policy}"),
            format!("end={}", self.end),
            format!("produced_batches={}", self.produced_batches),
            format!("delivered_batches={}", self.delivered_batches),
            format!("purged_batches={}", self.purged_batches),
            format!("evicted_batches={}", self.evicted_batches),
            format!("discarded_records={}", self.discarded_records),
            seqs,
        ]
    }
}

/// `<store>.emergency`: the operator's order.
pub fn order_path(store: &Path) -> PathBuf {
    sibling(store, "emergency")
}

/// `<store>.emergency-state`: the gateway's progress.
pub fn progress_path(store: &Path) -> PathBuf {
    sibling(store, "emergency-state")
}

fn sibling(store: &Path, suffix: &str) -> PathBuf {
    let mut name = store.file_name().unwrap_or_default().to_os_string();
    name.push(".");
    name.push(suffix);
    store.with_file_name(name)
}

/// Reads a JSON file; `Ok(None)` when it does not exist. Blocking.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Writes `value` as JSON to `path`, crash-safe (temp file, sync, rename, directory sync).
/// Blocking.
pub fn write<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let tmp = sibling(path, "tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(value).map_err(io::Error::other)?)?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order() -> Order {
        Order {
            id: "em-x".into(),
            policy: "grid-emergency".into(),
            reason: "storm".into(),
            started_ms: 1_000,
            expires_ms: 10_000,
            stopped_ms: None,
        }
    }

    /// issue 11 item 7: an order ends at its fixed expiry or when stopped, whichever is first.
    #[test]
    fn an_order_ends_at_expiry_or_when_stopped() {
        let mut o = order();
        assert!(o.is_active(9_999));
        assert!(!o.is_active(10_000));
        assert_eq!(o.end_reason(), "expired");
        o.stopped_ms = Some(5_000);
        assert_eq!(o.ends_ms(), 5_000);
        assert!(!o.is_active(5_000));
        assert_eq!(o.end_reason(), "stopped");
        // A stop after expiry changes nothing.
        o.stopped_ms = Some(20_000);
        assert_eq!((o.ends_ms(), o.end_reason()), (10_000, "expired"));
    }

    #[test]
    fn files_round_trip_beside_the_store_and_bad_ones_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("outbox");
        assert_eq!(
            order_path(&store),
            dir.path().join("outbox.emergency"),
            "beside the store, not in it"
        );
        assert_eq!(read::<Order>(&order_path(&store)).unwrap(), None);
        write(&order_path(&store), &order()).unwrap();
        assert_eq!(read::<Order>(&order_path(&store)).unwrap(), Some(order()));
        std::fs::write(progress_path(&store), b"{\"id\": 3").unwrap();
        let e = read::<Progress>(&progress_path(&store)).unwrap_err();
        assert!(e.contains("outbox.emergency-state"), "{e}");
    }

    #[test]
    fn ids_are_well_formed() {
        let id = new_id(1_764_545_400_000);
        assert!(id.starts_with("em-20251130T233000Z-"), "{id}");
        assert!(valid_id(&id));
        assert!(!valid_id("a/b") && !valid_id("") && !valid_id(&"x".repeat(65)));
    }
}
