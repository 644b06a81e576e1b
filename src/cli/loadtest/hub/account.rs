//! What the sinks hold, compared with what the fleet sealed and was acked for.
//!
//! Every sink record is reduced to its batch key (gateway, stream, incarnation, seq) and a
//! 64-bit fingerprint of the rest of its natural key (subject, field, at). Records of one
//! batch key with equal fingerprints are the same record written more than once
//! (duplicates written; a 64-bit collision inside one batch of at most 50,000 records is
//! negligible). A batch key found in more than one sink (hub) is a cross-sink duplicate.
//! A batch the fleet was acked for is missing unless its distinct records in the sinks
//! reach its record count. Records of a batch the fleet never sealed (a forged one, whose
//! incarnation only the forger used, or anything else) are unexpected.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::io::BufRead;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::fleet::Ledger;
use super::SinkKind;

/// One batch's key with the gateway as an index into the ledgers.
type BatchKey = (u32, String, u64, u64);

/// The accounting's figures.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub(crate) struct Accounting {
    /// Record lines in all sinks.
    pub sink_records: u64,
    pub sink_unreadable_lines: u64,
    /// Records whose natural key occurred before (in any sink).
    pub duplicates_written: u64,
    /// Batches written by more than one hub (each counts once).
    pub cross_sink_duplicate_batches: u64,
    /// Batches the fleet was acked for.
    pub acked_batches: u64,
    /// Acked batches not whole in the sinks, and the records they lack.
    pub missing_batches: u64,
    pub missing_records: u64,
    /// Batches sealed but never acked by the end, and how many of them are in a sink.
    pub unacked_batches: u64,
    pub unacked_in_sink: u64,
    /// Records of batches the fleet did not seal (forged ones among them).
    pub unexpected_records: u64,
}

/// The members of a sink line the accounting needs.
#[derive(Debug, Deserialize)]
struct Line<'a> {
    #[serde(borrow)]
    gateway: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    stream: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    incarnation: Option<std::borrow::Cow<'a, str>>,
    seq: u64,
    #[serde(borrow)]
    subject: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    field: std::borrow::Cow<'a, str>,
    at_ms: i64,
}

/// What the sinks hold, per batch key.
#[derive(Debug, Default)]
pub(super) struct SinkContents {
    /// Fingerprints of each batch's records, and a bit per sink it was found in.
    batches: HashMap<BatchKey, (Vec<u64>, u16)>,
    /// Batches counted by a database: (records, distinct natural keys).
    counted: HashMap<BatchKey, (u64, u64)>,
    unknown_gateway_records: u64,
    records: u64,
    unreadable: u64,
}

fn fingerprint(subject: &str, field: &str, at_ms: i64) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (subject, field, at_ms).hash(&mut h);
    h.finish()
}

/// Reads every sink file (one per hub, in hub order) of `kind`; for PostgreSQL, the batches
/// the database received since `since` and their records, counted in the database, through
/// the sink of `hub_config`.
pub(super) fn read_sinks(
    kind: SinkKind,
    sinks: &[PathBuf],
    ledgers: &[Ledger],
    hub_config: &std::path::Path,
    since: std::time::SystemTime,
) -> Result<SinkContents, String> {
    let gateways: HashMap<&str, u32> = ledgers
        .iter()
        .enumerate()
        .map(|(i, l)| (l.id.as_str(), u32::try_from(i).unwrap_or(u32::MAX)))
        .collect();
    let mut c = SinkContents::default();
    match kind {
        SinkKind::Jsonl => {
            for (i, path) in sinks.iter().enumerate() {
                let file = match std::fs::File::open(path) {
                    Ok(f) => f,
                    // A hub that accepted nothing created no file.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
                };
                for line in std::io::BufReader::new(file).lines() {
                    let line = line.map_err(|e| format!("{}: {e}", path.display()))?;
                    c.push(&line, i, &gateways);
                }
            }
        }
        SinkKind::Postgres => {
            let cfg = crate::hub::HubConfig::load(hub_config).map_err(|e| e.to_string())?;
            let crate::hub::SinkConfig::Postgres(pg) = &cfg.sink else {
                return Err(format!("{}: not a postgres sink", hub_config.display()));
            };
            let mut client = crate::hub::pg::connect(pg).map_err(|e| e.to_string())?;
            let rows = client
                .query(PG_BATCH_COUNTS, &[&since])
                .map_err(|e| format!("reading the database: {e}"))?;
            for row in rows {
                let seq: String = row.get(3);
                let (total, distinct): (i64, i64) = (row.get(4), row.get(5));
                c.push_counted(
                    (
                        row.get(0),
                        row.get(1),
                        row.get(2),
                        seq.parse().unwrap_or(u64::MAX),
                    ),
                    u64::try_from(total).unwrap_or(0),
                    u64::try_from(distinct).unwrap_or(0),
                    &gateways,
                );
            }
        }
    }
    Ok(c)
}

/// Per batch received since `$1`: its records, and how many distinct natural keys they have
/// (the database counts; a batch's key is its gateway, stream, incarnation and seq).
const PG_BATCH_COUNTS: &str = "SELECT r.gateway, r.stream, r.incarnation, r.seq::text, \
     count(*), count(DISTINCT (r.subject, r.field, r.at)) \
     FROM records r JOIN batches b USING (gateway, stream, incarnation, seq) \
     WHERE b.received_at >= $1 GROUP BY 1, 2, 3, 4";

impl SinkContents {
    /// Adds one line of sink `sink`.
    fn push(&mut self, line: &str, sink: usize, gateways: &HashMap<&str, u32>) {
        if line.contains("\"hub_event\"") {
            return;
        }
        let Ok(l) = serde_json::from_str::<Line<'_>>(line) else {
            self.unreadable += 1;
            return;
        };
        self.records += 1;
        let Some(&g) = gateways.get(l.gateway.as_ref()) else {
            self.unknown_gateway_records += 1;
            return;
        };
        let incarnation = l
            .incarnation
            .as_deref()
            .and_then(|h| u64::from_str_radix(h, 16).ok())
            .unwrap_or(0);
        let e = self
            .batches
            .entry((g, l.stream.into_owned(), incarnation, l.seq))
            .or_default();
        e.0.push(fingerprint(&l.subject, &l.field, l.at_ms));
        e.1 |= 1 << sink.min(15);
    }

    /// Adds one batch (gateway, stream, incarnation as hex, seq) a database counted.
    fn push_counted(
        &mut self,
        (gateway, stream, incarnation, seq): (String, String, String, u64),
        total: u64,
        distinct: u64,
        gateways: &HashMap<&str, u32>,
    ) {
        self.records += total;
        let Some(&g) = gateways.get(gateway.as_str()) else {
            self.unknown_gateway_records += total;
            return;
        };
        let incarnation = u64::from_str_radix(&incarnation, 16).unwrap_or(0);
        let e = self
            .counted
            .entry((g, stream, incarnation, seq))
            .or_default();
        e.0 += total;
        e.1 += distinct;
    }

    /// Compares the sinks with the fleet's ledgers.
    pub(super) fn account(mut self, ledgers: &[Ledger]) -> Accounting {
        let mut a = Accounting {
            sink_records: self.records,
            sink_unreadable_lines: self.unreadable,
            unexpected_records: self.unknown_gateway_records,
            ..Accounting::default()
        };
        let mut distinct: HashMap<BatchKey, u64> = HashMap::with_capacity(self.batches.len());
        for (key, (fps, sinks)) in &mut self.batches {
            fps.sort_unstable();
            let before = fps.len() as u64;
            fps.dedup();
            a.duplicates_written += before - fps.len() as u64;
            if sinks.count_ones() > 1 {
                a.cross_sink_duplicate_batches += 1;
            }
            distinct.insert(key.clone(), fps.len() as u64);
        }
        for (key, (total, unique)) in self.counted {
            a.duplicates_written += total - unique.min(total);
            *distinct.entry(key).or_default() += unique;
        }
        let readings = crate::reading::Stream::Readings.as_str().to_owned();
        for (g, l) in ledgers.iter().enumerate() {
            let g = u32::try_from(g).unwrap_or(u32::MAX);
            for (ix, acked) in l.acked.iter().enumerate() {
                let seq = ix as u64 + 1;
                let key = (g, readings.clone(), l.incarnation, seq);
                let found = distinct.remove(&key);
                let whole = found.unwrap_or(0) >= l.records_per_batch;
                if *acked {
                    a.acked_batches += 1;
                    if !whole {
                        a.missing_batches += 1;
                        a.missing_records += l.records_per_batch - found.unwrap_or(0);
                    }
                } else {
                    a.unacked_batches += 1;
                    a.unacked_in_sink += u64::from(found.is_some());
                }
            }
        }
        // What is left belongs to no sealed batch.
        a.unexpected_records += distinct.values().sum::<u64>();
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::GatewayId;

    fn line(gw: &str, inc: u64, seq: u64, subject: &str, at: i64) -> String {
        format!(
            "{{\"gateway\":\"{gw}\",\"stream\":\"readings\",\"incarnation\":\"{inc:016x}\",\
             \"seq\":{seq},\"purpose\":\"p\",\"subject\":\"{subject}\",\"field\":\"v\",\
             \"value\":1,\"unit\":\"V\",\"at_ms\":{at},\"timestamp\":null,\"quality\":\"good\",\
             \"tags\":[]}}"
        )
    }

    fn ledger(acked: Vec<bool>) -> Ledger {
        Ledger {
            id: GatewayId::new("gw-00001").unwrap(),
            incarnation: 7,
            forged_incarnation: 9,
            acked,
            records_per_batch: 2,
        }
    }

    fn contents(lines: &[(usize, String)], ledgers: &[Ledger]) -> SinkContents {
        let gateways: HashMap<&str, u32> = ledgers
            .iter()
            .enumerate()
            .map(|(i, l)| (l.id.as_str(), i as u32))
            .collect();
        let mut c = SinkContents::default();
        for (sink, l) in lines {
            c.push(l, *sink, &gateways);
        }
        c
    }

    #[test]
    fn exact_sinks_account_clean() {
        let l = [ledger(vec![true, true, false])];
        let lines = [
            (0, line("gw-00001", 7, 1, "a", 1)),
            (0, line("gw-00001", 7, 1, "b", 1)),
            (0, line("gw-00001", 7, 2, "a", 2)),
            (0, line("gw-00001", 7, 2, "b", 2)),
            (0, line("gw-00001", 7, 3, "a", 3)),
            (0, line("gw-00001", 7, 3, "b", 3)),
        ];
        let a = contents(&lines, &l).account(&l);
        assert_eq!(a.sink_records, 6);
        assert_eq!(a.duplicates_written, 0);
        assert_eq!(a.missing_batches, 0);
        assert_eq!(a.acked_batches, 2);
        assert_eq!((a.unacked_batches, a.unacked_in_sink), (1, 1));
        assert_eq!(a.unexpected_records, 0);
    }

    #[test]
    fn duplicates_missing_cross_sink_and_forged_records_are_counted() {
        let l = [ledger(vec![true, true, true])];
        let lines = [
            // seq 1 written by hub 0 and again by hub 1.
            (0, line("gw-00001", 7, 1, "a", 1)),
            (0, line("gw-00001", 7, 1, "b", 1)),
            (1, line("gw-00001", 7, 1, "a", 1)),
            (1, line("gw-00001", 7, 1, "b", 1)),
            // seq 2 lacks one record; seq 3 absent.
            (0, line("gw-00001", 7, 2, "a", 2)),
            // A forged batch (the forger's incarnation) and an unknown gateway.
            (0, line("gw-00001", 9, 1, "a", 5)),
            (0, line("gw-99999", 7, 1, "a", 5)),
            (0, "{\"hub_event\":\"x\"}".into()),
            (0, "not json".into()),
        ];
        let a = contents(&lines, &l).account(&l);
        assert_eq!(a.duplicates_written, 2);
        assert_eq!(a.cross_sink_duplicate_batches, 1);
        assert_eq!((a.missing_batches, a.missing_records), (2, 3));
        assert_eq!(a.unexpected_records, 2);
        assert_eq!(a.sink_unreadable_lines, 1);
        assert_eq!(a.sink_records, 7);
    }
}
