//! The hub and purpose policies: approval, and what the sink records of them.

use super::*;

#[test]
fn batches_under_unapproved_policies_are_rejected_and_not_acked() {
    let f = Fixture::new();
    let hub = f.hub();
    let seal = |stream: Stream, seq: u64, stamp: &PolicyStamp| {
        f.sealer
            .seal(stream, seq, 1_700_000_000_000, stamp, &records())
            .unwrap()
            .bytes
    };
    let unknown = PolicyStamp::new(PurposeName::new("open-data").unwrap(), stamp().hash);
    let changed = PolicyStamp::new(stamp().purpose, [8; 32]);
    for (seq, s) in [(1, &unknown), (2, &changed), (3, &PolicyStamp::gateway())] {
        let out = hub.ingest(&gw(), &seal(Stream::Readings, seq, s));
        assert!(out.ack().is_none(), "{out:?}");
        assert_eq!(rejected(out), "unapproved_policy");
    }
    assert_eq!(hub.stats().rejected.get("unapproved_policy"), Some(&3));
    assert!(f.lines().is_empty());
    assert!(matches!(
        hub.ingest(&gw(), &seal(Stream::Audit, 1, &PolicyStamp::gateway())),
        Ingest::Accepted { .. }
    ));
    let lines = f.lines();
    assert_eq!(lines[0]["purpose"], "citygate-gateway");
    // Once approved (a hub restarted with the new registry), the same batch is accepted.
    let approved = Hub::new(
        f.opener(),
        crate::wire::AckSigner::new(
            seal::load_hub_ack_signing_key(&f.keys.hub_ack_signing_key).unwrap(),
        ),
        Approvals::new(&[config::GatewayEntry {
            id: gw(),
            verifying_key: "unused".into(),
            policies: vec![ApprovedPolicy {
                stamp: changed.clone(),
                retention: None,
            }],
        }]),
        Box::new(
            JsonlDedupSink::open(
                &f.dir.path().join("state-2"),
                &f.dir.path().join("out/records-2.jsonl"),
                config::Rotation::default(),
            )
            .unwrap(),
        ),
    );
    assert!(matches!(
        approved.ingest(&gw(), &seal(Stream::Readings, 2, &changed)),
        Ingest::Accepted { .. }
    ));
}

/// Issue 11 items 2, 3 and 9: the sink writes an aggregate's window (ms and RFC 3339) and the
/// key epoch beside the purpose.
#[test]
fn the_sink_writes_window_and_epoch() {
    let f = Fixture::new();
    let hub = f.hub();
    let mut r = records().remove(0);
    r.window = Some(crate::reading::Window {
        function: crate::reading::AggFn::Delta,
        start_ms: 1_699_995_600_000,
        end_ms: 1_699_999_200_000,
        samples: 360,
        devices: 1,
        partial: true,
    });
    r.epoch = 3;
    let env = f
        .sealer
        .seal(Stream::Readings, 1, 0, &stamp(), &[r, records().remove(0)])
        .unwrap()
        .bytes;
    assert!(matches!(hub.ingest(&gw(), &env), Ingest::Accepted { .. }));
    let lines = f.lines();
    assert_eq!(
        lines[0]["window"],
        serde_json::json!({
            "function": "delta", "start_ms": 1_699_995_600_000_i64, "end_ms": 1_699_999_200_000_i64,
            "start": "2023-11-14T21:00:00.000Z", "end": "2023-11-14T22:00:00.000Z",
            "samples": 360, "devices": 1, "partial": true
        })
    );
    assert_eq!(lines[0]["epoch"], 3);
    assert_eq!(lines[0]["purpose"], "billing");
    assert!(lines[1].get("window").is_none() && lines[1].get("epoch").is_none());
}
