//! Emergency flows and checkpoints through the batcher.

use std::path::Path;
use std::time::Duration;

use super::*;

/// issue 11 item 7: while an emergency flow runs, readings also go to the emergency
/// stream under its stamp, tagged; at its end the unsealed records are dropped and
/// counted, the reply names the stream's next sequence number, and later readings no
/// longer reach the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emergency_flow_runs_tagged_until_ended_and_drops_what_it_has_not_sealed() {
    let p = profile();
    let metrics = Arc::new(Metrics::default());
    let (_samples_tx, samples_rx) = mpsc::channel(16);
    let (sealed_tx, mut sealed_rx) = mpsc::channel(16);
    let mut batcher = test_batcher(5, Duration::ZERO, samples_rx, sealed_tx, metrics.clone());
    let fields: Vec<&Field> = p.fields.iter().collect();
    let flow = Flow::new(Stream::EMERGENCY, passing(&fields), &["x@1".into()])
        .with_tags(vec!["emergency".into(), "emergency_id=em-1".into()]);
    let stamp = flow.stamp().clone();
    let (reply, first) = tokio::sync::oneshot::channel();
    batcher.on_emergency(EmergencyCommand::Start {
        flow: Box::new(flow),
        reply,
    });
    assert_eq!(first.await.unwrap(), 5);
    batcher.accept(sample_of(&p, "m1")).await;
    let i = Stream::EMERGENCY.index();
    let n = batcher.open[i].records.len();
    assert!(n > 0);
    assert!(batcher.open[i]
        .records
        .iter()
        .all(|r| r.tags == ["emergency".to_string(), "emergency_id=em-1".to_string()]));
    assert!(batcher.open[Stream::Readings.index()]
        .records
        .iter()
        .all(|r| r.tags.is_empty()));
    batcher.seal(Stream::EMERGENCY).await;
    let sealed = sealed_rx.recv().await.unwrap();
    assert_eq!((sealed.stream, sealed.seq), (Stream::EMERGENCY, 5));
    let opener = opener();
    let h = opener.open(&sealed.bytes).unwrap().header;
    assert_eq!(PolicyStamp::new(h.purpose.unwrap(), h.policy_hash), stamp);

    batcher.accept(sample_of(&p, "m2")).await;
    let open = batcher.open[i].records.len() as u64;
    assert!(open > 0);
    let (reply, ended) = tokio::sync::oneshot::channel();
    batcher.on_emergency(EmergencyCommand::End { reply });
    let ended = ended.await.unwrap();
    assert_eq!(ended.end_seq, 6);
    assert_eq!(ended.discarded_records, open);
    assert_eq!(metrics.emergency_records_discarded.get(), open);
    batcher.accept(sample_of(&p, "m3")).await;
    assert!(batcher.open[i].records.is_empty(), "the flow is off");
    assert!(!batcher.open[Stream::Readings.index()].records.is_empty());
}

/// issue 11 (windows survive a crash): a batch holding an aggregate carries the
/// checkpoint in which its window is closed; while samples arrive a lone checkpoint
/// follows every `checkpoint_every`; a batcher resumed from it continues the window.
#[tokio::test(start_paused = true)]
async fn checkpoints_go_with_aggregate_batches_and_alone_and_resume_the_windows() {
    use crate::pipeline::checkpoint::CheckpointKey;
    let p = profile();
    let key = CheckpointKey::derive(&PseudonymKey::from_bytes([7; 32]));
    let mean = |seq: u64| {
        let policy = Arc::new(
            CompiledPolicy::parse(
                Path::new("mean.toml"),
                "[purpose]\nname = \"m\"\ndescription = \"d\"\nlegal_basis = \"b\"\nowner = \"o\"\nretention = \"1d\"\n\n\
                 [[rule]]\nfield = \"voltage_l1\"\naction = \"aggregate\"\nfunction = \"mean\"\nwindow = \"1d\"\n",
                jiff::tz::TimeZone::UTC,
                PseudonymKey::from_bytes([7; 32]),
            )
            .unwrap(),
        );
        let (samples_tx, samples_rx) = mpsc::channel(16);
        let (sealed_tx, sealed_rx) = mpsc::channel(16);
        let cfg = BatchConfig {
            max_age: Duration::from_secs(3600),
            min_interval: Duration::ZERO,
            max_records: usize::MAX,
            alarm_state_every: Duration::from_secs(3600),
            checkpoint_every: Duration::from_secs(30),
        };
        let flows = Flows::new(vec![Flow::new(Stream::Readings, policy, &[])], None);
        let batcher = Batcher::new(
            samples_rx,
            sealed_tx,
            sealer(),
            flows,
            cfg,
            move |_| seq,
            Arc::new(Metrics::default()),
        );
        (batcher, samples_tx, sealed_rx)
    };
    let (batcher, samples_tx, mut sealed_rx) = mean(1);
    let task = tokio::spawn(batcher.with_checkpoints(key.clone(), None).run());
    // Today's window (windows close on the wall clock).
    let mut first = sample_of(&p, "m1");
    first.at_ms = now_ms();
    samples_tx.send(first).await.unwrap();
    // Nothing leaves (a daily window); the lone checkpoint comes after checkpoint_every.
    let lone = sealed_rx.recv().await.unwrap();
    assert!(lone.is_checkpoint_only());
    let cp = key.open(lone.checkpoint.as_ref().unwrap()).unwrap();
    assert_eq!(cp.flows.len(), 1);
    assert_eq!(cp.flows[0].state.open_windows(), 1);
    // Quiet: no further checkpoint while nothing changes.
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert!(sealed_rx.try_recv().is_err());
    drop(samples_tx);
    let last = sealed_rx.recv().await.unwrap();
    assert!(!last.is_checkpoint_only(), "the partial window at shutdown");
    let after = key.open(last.checkpoint.as_ref().unwrap()).unwrap();
    assert_eq!(
        after.flows[0].state.open_windows(),
        0,
        "closed with its aggregate"
    );
    task.await.unwrap();

    // A batcher resumed from the lone checkpoint continues the window: its partial
    // aggregate covers the sample of before and the one after.
    let (batcher, samples_tx, mut sealed_rx) = mean(2);
    let task = tokio::spawn(batcher.with_checkpoints(key.clone(), Some(cp)).run());
    let mut later = sample_of(&p, "m1");
    later.at_ms = now_ms() + 1;
    samples_tx.send(later).await.unwrap();
    drop(samples_tx);
    let opener = opener();
    let mut windows = Vec::new();
    while let Some(b) = sealed_rx.recv().await {
        if !b.is_checkpoint_only() {
            let opened = opener.open(&b.bytes).unwrap();
            windows.extend(opened.records.into_iter().filter_map(|r| r.window));
        }
    }
    task.await.unwrap();
    assert_eq!(windows.len(), 1);
    assert_eq!(windows[0].samples, 2);
}
