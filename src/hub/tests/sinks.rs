//! The hub over the [`Sink`] trait (issue 13 items 1 and 3): what it acknowledges for each
//! outcome a sink answers, and what a failing sink does to `/health`.

use std::sync::{Mutex, PoisonError};

use super::*;

/// A sink that answers from a script and records the keys of every group it was given.
#[derive(Debug, Default)]
struct ScriptedSink {
    /// Answers, one per call; `None`: fail the group.
    script: Mutex<Vec<Option<Vec<Outcome>>>>,
    groups: Mutex<Vec<Vec<u64>>>,
}

impl Sink for ScriptedSink {
    fn kind(&self) -> &'static str {
        "scripted"
    }

    fn commit(&self, batches: &[SinkBatch<'_>]) -> Result<Vec<Outcome>, SinkError> {
        self.groups
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(batches.iter().map(|b| b.key.seq).collect());
        let meta = batches[0].header.expect("the hub passes the header");
        assert_eq!(meta.policy_hash, [7; 32]);
        assert_eq!(meta.record_count, 4);
        match self.script.lock().unwrap().remove(0) {
            Some(outcomes) => Ok(outcomes),
            None => Err(SinkError::Database("connection refused".into())),
        }
    }
}

fn hub_over(f: &Fixture, sink: std::sync::Arc<ScriptedSink>) -> Hub {
    let signer = crate::wire::AckSigner::new(
        seal::load_hub_ack_signing_key(&f.keys.hub_ack_signing_key).unwrap(),
    );
    Hub::new(f.opener(), signer, approvals(), Box::new(sink))
}

/// A failed commit acknowledges nothing, not even a second copy of one of its batches in
/// the same group (acked before the commit, it made the gateway drop a batch the sink never
/// held), and makes the hub degraded until a commit succeeds; a quarantined batch is
/// acknowledged and counted; a duplicate is acknowledged again; a batch twice in one group
/// reaches the sink once.
#[test]
fn the_hub_acks_what_the_sink_made_durable_and_nothing_of_a_failed_group() {
    let f = Fixture::new();
    let sink = std::sync::Arc::new(ScriptedSink::default());
    *sink.script.lock().unwrap() = vec![
        None,
        Some(vec![
            Outcome::Written,
            Outcome::Duplicate,
            Outcome::Quarantined {
                reason: "ERROR: bad (SQLSTATE 22021)".into(),
            },
        ]),
    ];
    let hub = hub_over(&f, sink.clone());
    let (b1, b2, b3) = (
        f.seal(Stream::Readings, 1),
        f.seal(Stream::Readings, 2),
        f.seal(Stream::Readings, 3),
    );
    let group = |payloads: &[&Vec<u8>]| {
        let items: Vec<(GatewayId, &[u8])> =
            payloads.iter().map(|p| (gw(), p.as_slice())).collect();
        hub.ingest_group(&items)
    };

    let failed = group(&[&b1, &b2, &b1]);
    assert!(failed.iter().all(|o| o.ack().is_none()), "{failed:?}");
    assert_eq!(rejected(failed[0].clone()), "sink_failed");
    assert_eq!(
        hub.sink_fault().as_deref(),
        Some("database: connection refused")
    );

    let out = group(&[&b1, &b2, &b1, &b3]);
    assert_eq!(
        out,
        [
            Ingest::Accepted {
                ack: ack(Stream::Readings, 1),
                records: 4
            },
            Ingest::Duplicate {
                ack: ack(Stream::Readings, 2)
            },
            Ingest::Duplicate {
                ack: ack(Stream::Readings, 1)
            },
            Ingest::Quarantined {
                ack: ack(Stream::Readings, 3),
                reason: "ERROR: bad (SQLSTATE 22021)".into()
            },
        ]
    );
    assert_eq!(
        *sink.groups.lock().unwrap(),
        [vec![1, 2], vec![1, 2, 3]],
        "the second copy of batch 1 never reached the sink"
    );
    assert_eq!(hub.sink_fault(), None, "a commit succeeded: healthy again");
    let s = hub.stats();
    assert_eq!(
        (s.accepted_batches, s.duplicates, s.quarantined),
        (1, 2, 1),
        "{s:?}"
    );
    assert_eq!(s.rejected.get("sink_failed"), Some(&3));
    let figures = hub.sink_stats().figures();
    assert_eq!((figures.commits, figures.failures), (1, 1));
}
