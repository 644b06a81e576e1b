//! Sealing at the end of poll rounds.

use std::time::Duration;

use super::*;

/// A batcher with rounds, `max_age` one hour, and a sample sender.
fn round_batcher(
    min_interval: Duration,
) -> (
    mpsc::Sender<RawSample>,
    mpsc::Receiver<SealedBatch>,
    crate::source::Rounds,
    Arc<Metrics>,
) {
    let (samples_tx, samples_rx) = mpsc::channel(64);
    let (sealed_tx, sealed_rx) = mpsc::channel(64);
    let rounds = crate::source::Rounds::default();
    let metrics = Arc::new(Metrics::default());
    let batcher = test_batcher(1, min_interval, samples_rx, sealed_tx, metrics.clone())
        .with_rounds(rounds.clone());
    tokio::spawn(batcher.run());
    (samples_tx, sealed_rx, rounds, metrics)
}

/// issue 10 item 1: a batch is sealed when the poll round ends (all its samples in),
/// not when `max_age` (here an hour) runs out; samples of a round in progress wait.
#[tokio::test(start_paused = true)]
async fn a_batch_seals_at_the_end_of_a_poll_round_not_at_max_age() {
    let p = profile();
    let fields_per_sample = p.fields.len();
    let (tx, mut sealed_rx, rounds, metrics) = round_batcher(Duration::from_millis(100));
    // Past the first min_interval after start.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let round = rounds.begin();
    for d in ["m1", "m2", "m3"] {
        tx.send(sample_of(&p, d)).await.unwrap();
    }
    let early = tokio::time::timeout(Duration::from_secs(60), sealed_rx.recv()).await;
    assert!(early.is_err(), "sealed while the round was in progress");
    assert_eq!(
        metrics.records_minimised.get(),
        3 * fields_per_sample as u64
    );

    drop(round);
    let batch = tokio::time::timeout(Duration::from_secs(60), sealed_rx.recv())
        .await
        .expect("sealed when the round ended")
        .unwrap();
    assert_eq!(batch.stream, Stream::Readings);
    assert_eq!(metrics.records_sealed.get(), 3 * fields_per_sample as u64);
    assert_eq!(metrics.batches_sealed_idle.get(), 1);

    // The next round ends right away: this batch waits for min_interval after the last
    // seal, and no longer.
    let sealed_at = Instant::now();
    let round = rounds.begin();
    tx.send(sample_of(&p, "m1")).await.unwrap();
    drop(round);
    tokio::time::timeout(Duration::from_secs(60), sealed_rx.recv())
        .await
        .expect("sealed after min_interval")
        .unwrap();
    let waited = Instant::now() - sealed_at;
    assert!(
        waited >= Duration::from_millis(100) && waited < Duration::from_secs(1),
        "{waited:?}"
    );
    assert_eq!(metrics.batches_sealed.get(), 2);
}

/// Without pollers (MQTT meters), a sample leaves once the sample queue is empty.
#[tokio::test(start_paused = true)]
async fn without_rounds_in_progress_a_sample_leaves_when_the_queue_runs_empty() {
    let p = profile();
    let (tx, mut sealed_rx, _rounds, _) = round_batcher(Duration::from_millis(100));
    tx.send(sample_of(&p, "m1")).await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), sealed_rx.recv())
        .await
        .expect("sealed without waiting for max_age")
        .unwrap();
}

/// `min_interval = max_age` turns round-end sealing off: the batch waits for its age.
#[tokio::test(start_paused = true)]
async fn min_interval_equal_to_max_age_seals_by_age_only() {
    let p = profile();
    let (tx, mut sealed_rx, _rounds, metrics) = round_batcher(Duration::from_secs(3600));
    tx.send(sample_of(&p, "m1")).await.unwrap();
    let early = tokio::time::timeout(Duration::from_secs(600), sealed_rx.recv()).await;
    assert!(early.is_err(), "sealed before max_age");
    tokio::time::timeout(Duration::from_secs(3600), sealed_rx.recv())
        .await
        .expect("sealed at max_age")
        .unwrap();
    assert_eq!(metrics.batches_sealed_idle.get(), 0);
}
