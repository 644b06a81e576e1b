//! `hub::emergency` over sinks the hub's own [`JsonlSink`] wrote.

use std::path::Path;

use tempfile::TempDir;

use super::*;
use crate::hub::dedup::Dedup;
use crate::hub::rewrite::temp_path;
use crate::hub::sink::{JsonlSink, SinkBatch};
use crate::hub::tests::capture_warnings;
use crate::reading::{GatewayId, PurposeName, Quality, Unit, Value};

const T0: i64 = 1_764_545_400_000; // 2025-11-30T23:30:00Z
const NOW: i64 = 1_764_633_600_000; // 2025-12-02T00:00:00Z

fn config(dir: &Path) -> HubConfig {
    let text = "[hub]\nid = \"hub-1\"\nhpke_secret_key = \"k\"\nack_signing_key = \"a\"\n\
                state_path = \"state\"\n[sink]\ntype = \"jsonl\"\npath = \"records.jsonl\"\n\
                [mqtt]\nbroker = \"localhost:1\"\ndanger_plaintext = true\n\
                [[gateway]]\nid = \"gw-1\"\nverifying_key = \"v\"\n";
    HubConfig::parse(&dir.join("hub.toml"), text).unwrap()
}

fn record(subject: &str, field: &str, value: Value, at_ms: i64, tags: &[&str]) -> Record {
    Record {
        subject: subject.into(),
        field: field.into(),
        value,
        unit: Unit::One,
        at_ms,
        quality: Quality::Good,
        tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        window: None,
        epoch: 0,
    }
}

fn data(id: &str, at_ms: i64) -> Record {
    let tag = format!("emergency_id={id}");
    record(
        "p-0123456789abcdef0123456789abcdef",
        "active_power",
        Value::Int(1200),
        at_ms,
        &["emergency", &tag],
    )
}

fn started(id: &str) -> Record {
    let tag = format!("emergency_id={id}");
    record(
        "gateway:gw-1",
        STARTED,
        Value::Int(T0 + 6 * 3_600_000),
        T0,
        &[
            "emergency",
            &tag,
            "policy=grid-emergency",
            "reason=feeder 7 fault",
            "expires=2025-12-01T05:30:00Z",
        ],
    )
}

fn ended(id: &str) -> Record {
    let tag = format!("emergency_id={id}");
    record(
        "gateway:gw-1",
        ENDED,
        Value::Int(2),
        T0 + 6 * 3_600_000,
        &[
            "emergency",
            &tag,
            "policy=grid-emergency",
            "end=expired",
            "produced_batches=3",
            "delivered_batches=3",
            "purged_batches=2",
            "evicted_batches=0",
            "seqs=1..3",
        ],
    )
}

/// A hub config and a sink written by [`JsonlSink`]: ordinary readings, emergency `em-1`'s
/// data (readings-7) and reports (alarms), and one data record of emergency `em-2`.
struct Fixture {
    dir: TempDir,
    cfg: HubConfig,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let sink = JsonlSink::open(&dir.path().join("records.jsonl")).unwrap();
        let purpose = PurposeName::new("grid-emergency").unwrap();
        let key = |stream: &str, seq| BatchKey {
            gateway: GatewayId::new("gw-1").unwrap(),
            stream: Stream::from_name(stream).unwrap(),
            incarnation: 1,
            seq,
        };
        let ordinary = [record("p-00", "energy_import", Value::Int(7), T0, &[])];
        let em1 = [data("em-1", T0 + 1000), data("em-1", T0 + 2000)];
        let em1_late = [data("em-1", T0 + 3000)];
        let em2 = [data("em-2", T0 + 5000)];
        for (stream, seq, records) in [
            ("readings", 1, &ordinary[..]),
            ("alarms", 1, &[started("em-1")][..]),
            ("readings-7", 1, &em1[..]),
            ("readings", 2, &ordinary[..]),
            ("readings-7", 2, &em1_late[..]),
            ("readings-7", 3, &em2[..]),
            ("alarms", 2, &[ended("em-1")][..]),
        ] {
            let key = key(stream, seq);
            sink.write_batches(&[SinkBatch {
                key: &key,
                purpose: Some(&purpose),
                header: None,
                records,
            }])
            .unwrap();
        }
        Fixture { dir, cfg }
    }

    fn sink(&self) -> PathBuf {
        self.dir.path().join("records.jsonl")
    }

    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(self.sink())
            .unwrap()
            .split_inclusive('\n')
            .map(str::to_owned)
            .collect()
    }
}

/// Whether a sink line is one of emergency `id`'s data records.
fn is_data_of(line: &str, id: &str) -> bool {
    line.contains(&format!("\"emergency_id\":\"{id}\"}}")) && line.contains("readings-7")
}

/// Issue 11 item 7: `--list` gives, per emergency id, its gateway, policy and purpose,
/// records held, first and last record time, and the reports that arrived.
#[test]
fn list_summarises_each_emergency_with_its_reports() {
    let f = Fixture::new();
    let all = list(&f.cfg).unwrap();
    let ids: Vec<_> = all.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["em-1", "em-2"]);
    let em1 = &all[0];
    assert_eq!(em1.records, 3);
    assert_eq!(em1.reports, 2);
    assert_eq!(em1.gateways, BTreeSet::from(["gw-1".to_owned()]));
    assert_eq!(em1.policies, BTreeSet::from(["grid-emergency".to_owned()]));
    assert_eq!(em1.purposes, BTreeSet::from(["grid-emergency".to_owned()]));
    assert_eq!(
        (em1.first_ms, em1.last_ms),
        (Some(T0 + 1000), Some(T0 + 3000))
    );
    assert_eq!(
        em1.started,
        Some(Started {
            gateway: "gw-1".into(),
            reason: Some("feeder 7 fault".into()),
            expires: Some("2025-12-01T05:30:00Z".into()),
        })
    );
    assert_eq!(
        em1.ended,
        Some(Ended {
            gateway: "gw-1".into(),
            end: Some("expired".into()),
            produced_batches: Some(3),
            delivered_batches: Some(3),
            purged_batches: Some(2),
            evicted_batches: Some(0),
            seqs: Some("1..3".into()),
        })
    );
    assert_eq!(em1.destroyed, None);
    let em2 = &all[1];
    assert_eq!((em2.records, em2.reports), (1, 0));
    assert_eq!((em2.started.clone(), em2.ended.clone()), (None, None));
}

/// Issue 11 item 7: `--export` writes exactly the emergency's lines (data and reports), byte
/// for byte, to a new 0600 file; it refuses an existing file and an unknown id (naming the
/// ids there are).
#[test]
fn export_writes_the_emergencys_lines_to_a_new_private_file() {
    let f = Fixture::new();
    let out = f.dir.path().join("em-1.jsonl");
    assert_eq!(export(&f.cfg, "em-1", &out).unwrap(), 5);
    let expected: String = f
        .lines()
        .into_iter()
        .filter(|l| l.contains("\"emergency_id\":\"em-1\""))
        .collect();
    assert_eq!(expected.lines().count(), 5);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), expected);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&out).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    let err = export(&f.cfg, "em-1", &out).unwrap_err();
    assert!(matches!(err, EmergencyError::ExportExists { .. }), "{err}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), expected);

    let other = f.dir.path().join("other.jsonl");
    let err = export(&f.cfg, "em-9", &other).unwrap_err();
    assert!(err.is_usage());
    assert!(err.to_string().contains("ids found: em-1, em-2"), "{err}");
    assert!(!other.exists());
}

/// Issue 11 item 7: `--destroy` removes the emergency's data records only: its reports and
/// every other line stay byte for byte, in order, and one `emergency_destroyed` event line is
/// appended; `--list` then shows the copy destroyed; destroying again changes nothing.
#[test]
fn destroy_keeps_reports_and_other_records_and_list_shows_it_destroyed() {
    let f = Fixture::new();
    let before = f.lines();
    assert_eq!(
        destroy(&f.cfg, "em-1", NOW).unwrap(),
        Destruction::Destroyed(3)
    );
    let after = f.lines();
    let kept: Vec<String> = before
        .iter()
        .filter(|l| !is_data_of(l, "em-1"))
        .cloned()
        .collect();
    assert_eq!(kept.len(), before.len() - 3);
    assert_eq!(after[..kept.len()], kept[..]);
    assert_eq!(after.len(), kept.len() + 1);
    let event: serde_json::Value = serde_json::from_str(&after[kept.len()]).unwrap();
    assert_eq!(
        event,
        serde_json::json!({
            "hub_event": "emergency_destroyed", "emergency_id": "em-1", "records": 3,
            "at_ms": NOW, "at": "2025-12-02T00:00:00.000Z",
        })
    );

    let all = list(&f.cfg).unwrap();
    let em1 = &all[0];
    assert_eq!((em1.records, em1.reports), (0, 2));
    assert_eq!(
        em1.destroyed,
        Some(Destroyed {
            records: 3,
            at_ms: NOW
        })
    );
    assert!(em1.ended.is_some());
    assert_eq!(all[1].records, 1, "em-2 untouched");

    assert_eq!(
        destroy(&f.cfg, "em-1", NOW + 1).unwrap(),
        Destruction::NothingHeld(em1.destroyed.clone())
    );
    assert_eq!(f.lines(), after);
}

/// Issue 11 item 7, crash safety: a temp file a crashed destruction left beside the sink is
/// never read (list and export ignore it) and is replaced by the next destruction.
#[test]
fn a_left_over_temp_file_is_ignored_and_replaced() {
    let f = Fixture::new();
    let tmp = temp_path(&f.sink(), TEMP_SUFFIX);
    let half: String = f.lines()[..2].concat();
    std::fs::write(&tmp, format!("{half}{{\"gateway\":\"gw-1\",\"tor")).unwrap();
    let all = list(&f.cfg).unwrap();
    assert_eq!(all[0].records, 3);
    assert_eq!(all[0].reports, 2);
    let out = f.dir.path().join("em-1.jsonl");
    assert_eq!(export(&f.cfg, "em-1", &out).unwrap(), 5);
    assert_eq!(
        destroy(&f.cfg, "em-1", NOW).unwrap(),
        Destruction::Destroyed(3)
    );
    assert!(!tmp.exists());
    assert_eq!(f.lines().len(), 8 - 3 + 1);
}

/// Issue 11 item 7: destroying refuses beside a hub holding the state (the sink stays as it
/// was), and refuses a sink ending in a partly written line until a hub has recovered it.
#[test]
fn destroy_refuses_beside_a_running_hub_and_on_a_torn_sink() {
    let f = Fixture::new();
    let before = std::fs::read_to_string(f.sink()).unwrap();
    let hub = Dedup::open(&f.cfg.path.parent().unwrap().join("state")).unwrap();
    let err = destroy(&f.cfg, "em-1", NOW).unwrap_err();
    assert!(
        matches!(
            err,
            EmergencyError::Rewrite(RewriteError::HubRunning { .. })
        ),
        "{err}"
    );
    assert!(!err.is_usage());
    drop(hub);
    assert_eq!(std::fs::read_to_string(f.sink()).unwrap(), before);

    let torn = format!("{before}{{\"gateway\":\"gw-1\",\"stream\":\"readings-7\",\"se");
    std::fs::write(f.sink(), &torn).unwrap();
    let err = destroy(&f.cfg, "em-1", NOW).unwrap_err();
    assert!(err.to_string().contains("partly written line"), "{err}");
    assert_eq!(std::fs::read_to_string(f.sink()).unwrap(), torn);
}

/// Issue 11 item 7: the hub's restart recovery treats the destruction's event line as a
/// boundary: it is no batch and no unreadable line (no warning), and a torn batch written
/// after it is cut without touching it.
#[test]
fn recovery_keeps_the_event_line_and_cuts_only_a_torn_batch_after_it() {
    let f = Fixture::new();
    destroy(&f.cfg, "em-1", NOW).unwrap();
    let destroyed = std::fs::read_to_string(f.sink()).unwrap();
    let torn = format!("{destroyed}{{\"gateway\":\"gw-1\",\"stream\":\"readings\",\"se");
    std::fs::write(f.sink(), &torn).unwrap();
    let sink = JsonlSink::open(&f.sink()).unwrap();
    // Nothing is marked: every batch before the event line is reported, none is cut.
    let (found, logs) = capture_warnings(|| sink.recover(&|_| false).unwrap());
    assert_eq!(found.len(), 5);
    assert_eq!(std::fs::read_to_string(f.sink()).unwrap(), destroyed);
    assert!(!logs.contains("without a batch key"), "{logs}");
    assert!(logs.contains("cutting"), "{logs}");
}

/// Issue 11 item 7 with issue 12's sink rotation: an emergency whose records are split over
/// a rotated file and the current one is listed, exported and destroyed in both.
#[test]
fn list_export_and_destroy_cover_the_rotated_files() {
    let f = Fixture::new();
    // Rotate after the fixture's batches; then one more em-1 record in the fresh file.
    let rotated = f.dir.path().join("records-20251201T000000Z.jsonl");
    std::fs::rename(f.sink(), &rotated).unwrap();
    let sink = JsonlSink::open(&f.sink()).unwrap();
    let key = BatchKey {
        gateway: GatewayId::new("gw-1").unwrap(),
        stream: Stream::from_name("readings-7").unwrap(),
        incarnation: 1,
        seq: 9,
    };
    let purpose = PurposeName::new("grid-emergency").unwrap();
    sink.write_batches(&[SinkBatch {
        key: &key,
        purpose: Some(&purpose),
        header: None,
        records: &[data("em-1", T0 + 9000)],
    }])
    .unwrap();
    drop(sink);
    let em1 = list(&f.cfg)
        .unwrap()
        .into_iter()
        .find(|e| e.id == "em-1")
        .unwrap();
    assert_eq!((em1.records, em1.reports), (4, 2), "both files");
    let out = f.dir.path().join("em-1.jsonl");
    assert_eq!(export(&f.cfg, "em-1", &out).unwrap(), 6);
    assert_eq!(
        destroy(&f.cfg, "em-1", NOW).unwrap(),
        Destruction::Destroyed(4)
    );
    for file in [&rotated, &f.sink()] {
        let text = std::fs::read_to_string(file).unwrap();
        assert!(
            !text.lines().any(|l| is_data_of(l, "em-1")),
            "{}",
            file.display()
        );
    }
    assert!(std::fs::read_to_string(f.sink())
        .unwrap()
        .contains("emergency_destroyed"));
    let em1 = list(&f.cfg)
        .unwrap()
        .into_iter()
        .find(|e| e.id == "em-1")
        .unwrap();
    assert_eq!(em1.records, 0);
    assert_eq!(em1.destroyed.map(|d| d.records), Some(4));
}
