//! Emergency collection (issue 11 item 7): a higher-resolution purpose flow switched on by an
//! operator for a bounded time, then ended, purged and reported.
//!
//! - `citygate emergency start --config F --policy NAME --reason TEXT --for 6h` writes an
//!   [`Order`] beside the store (`<store>.emergency`); `… stop` marks it stopped. The policy
//!   must be one of `[policies] emergency`, so its hash was approved at the hub beforehand.
//! - The running gateway's [`Watcher`] reads the order once a second (and wakes at its end).
//!   While it is active, the batcher runs the policy's flow on [`Stream::EMERGENCY`], every
//!   record tagged `emergency` and `emergency_id=<id>`, and an `emergency_started` record goes
//!   out on the alarms stream.
//! - It ends at the order's fixed expiry or when stopped; a restart resumes an active order
//!   with the same id and the same end, and ends an order that ran out meanwhile, so no
//!   restart extends one. At the end the batcher drops what the flow has not sealed, the
//!   watcher waits for what it sealed to be committed, then purges the emergency stream (every
//!   batch not yet acknowledged by the hub is destroyed on the box) and sends an
//!   `emergency_ended` record saying what was produced, delivered, purged, evicted and
//!   discarded, so the hub can export or destroy its copy (`citygate hub-emergency`).
//! - The gateway writes its [`Progress`] to `<store>.emergency-state`; an end that was not
//!   reported (a crash between the end and the report) is finished at the next start.

mod order;

pub use order::{
    new_id, order_path, progress_path, read, valid_id, write, Order, Progress, Report,
};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::GatewayConfig;
use crate::pipeline::{CommittedMarks, EmergencyCommand, EmergencyEnded, Flow};
use crate::reading::{now_ms, Quality, Record, Stream, TimestampMs, Unit, Value};
use crate::seal::PseudonymKey;
use crate::store::Outbox;
use crate::telemetry::{EmergencyStatus, Metrics};

/// How often the order file is read.
const POLL: Duration = Duration::from_secs(1);
/// The longest wait at an end for the batches the flow sealed to be committed before the
/// purge (the committer holds them longer only while the store fails; what it commits after
/// the purge is purged at the next start).
const COMMIT_WAIT: Duration = Duration::from_secs(30);

/// Follows the operator's order and switches the emergency flow on and off.
#[derive(Debug)]
pub(crate) struct Watcher {
    order_path: PathBuf,
    progress_path: PathBuf,
    /// The emergency policies by name, compiled with the gateway's key.
    policies: Vec<(String, Arc<crate::policy::CompiledPolicy>)>,
    versions: Vec<String>,
    outbox: Outbox,
    committed_rx: watch::Receiver<CommittedMarks>,
    commands: mpsc::Sender<EmergencyCommand>,
    alarms: mpsc::Sender<Record>,
    subject: String,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    /// The collection the gateway knows of last (from the progress file).
    progress: Option<Progress>,
    /// The order whose flow runs in the batcher now.
    running: Option<Order>,
    /// The last order file error, logged once.
    last_error: Option<String>,
}

/// Everything [`Watcher::new`] takes from the supervisor.
#[derive(Debug)]
pub(crate) struct Links {
    pub outbox: Outbox,
    pub committed_rx: watch::Receiver<CommittedMarks>,
    pub commands: mpsc::Sender<EmergencyCommand>,
    pub alarms: mpsc::Sender<Record>,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
}

impl Watcher {
    pub(crate) fn new(cfg: &GatewayConfig, key: &PseudonymKey, links: Links) -> Watcher {
        Watcher {
            order_path: order_path(&cfg.store.path),
            progress_path: progress_path(&cfg.store.path),
            policies: cfg
                .policies
                .emergency
                .iter()
                .map(|(n, f)| (n.clone(), Arc::new(f.policy.with_key(key.clone()))))
                .collect(),
            versions: cfg.profile_versions(),
            outbox: links.outbox,
            committed_rx: links.committed_rx,
            commands: links.commands,
            alarms: links.alarms,
            subject: format!("gateway:{}", cfg.gateway_id.as_str()),
            metrics: links.metrics,
            shutdown: links.shutdown,
            progress: None,
            running: None,
            last_error: None,
        }
    }

    /// Whether a gateway with `cfg` needs a watcher: it declares emergency policies, or an
    /// order or progress file exists (a collection to finish after the policies were removed).
    pub(crate) fn wanted(cfg: &GatewayConfig) -> bool {
        !cfg.policies.emergency.is_empty()
            || order_path(&cfg.store.path).exists()
            || progress_path(&cfg.store.path).exists()
    }

    pub(crate) async fn run(mut self) {
        match blocking(read_file::<Progress>, self.progress_path.clone()).await {
            Ok(p) => self.progress = p,
            Err(e) => error!(error = %e, "emergency progress unreadable; treated as none"),
        }
        self.purge_leftovers().await;
        loop {
            let order = match blocking(read_file::<Order>, self.order_path.clone()).await {
                Ok(o) => {
                    self.last_error = None;
                    o
                }
                Err(e) => {
                    if self.last_error.as_ref() != Some(&e) {
                        error!(error = %e, "emergency order unreadable; ignored until fixed");
                        self.last_error = Some(e);
                    }
                    None
                }
            };
            self.step(order, now_ms()).await;
            let wait = self
                .running
                .as_ref()
                .map(|o| u64::try_from(o.ends_ms() - now_ms()).unwrap_or(0))
                .map_or(POLL, |ms| POLL.min(Duration::from_millis(ms)));
            tokio::select! {
                () = self.shutdown.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
            }
        }
        // An active collection goes on after a restart (its end is fixed in the order).
        self.metrics.set_emergency(None);
    }

    /// Does what `order` asks as of `now`.
    async fn step(&mut self, order: Option<Order>, now: TimestampMs) {
        if let Some(r) = &self.running {
            let same = order.as_ref().filter(|o| o.id == r.id);
            match same {
                Some(o) if o.is_active(now) => return,
                Some(o) => {
                    let reason = o.end_reason();
                    self.end(reason).await;
                }
                // The order was removed or replaced: the collection stops now.
                None => self.end("stopped").await,
            }
            return;
        }
        let unreported = self
            .progress
            .as_ref()
            .filter(|p| p.report.is_none())
            .cloned();
        if let Some(p) = unreported {
            match order.as_ref().filter(|o| o.id == p.id) {
                Some(o) if o.is_active(now) => self.start(o.clone(), Some(p)).await,
                Some(o) => self.finish(p, o.end_reason(), None).await,
                None => self.finish(p, "stopped", None).await,
            }
            return;
        }
        let Some(o) = order else { return };
        if self.progress.as_ref().is_some_and(|p| p.id == o.id) {
            return;
        }
        if o.is_active(now) {
            self.start(o, None).await;
        } else {
            // Ordered and over while the gateway was not running: nothing was produced.
            info!(id = %o.id, "emergency collection ended before the gateway ran it");
            let p = self.begin(&o, self.outbox.next_seq_at_open(Stream::EMERGENCY));
            self.finish(p, o.end_reason(), None).await;
        }
    }

    /// Switches the order's flow on; `resumed` is its progress from before a restart.
    async fn start(&mut self, order: Order, resumed: Option<Progress>) {
        let Some(policy) = self
            .policies
            .iter()
            .find(|(n, p)| *n == order.policy || p.name() == order.policy)
            .map(|(_, p)| p.clone())
        else {
            let known: Vec<&str> = self.policies.iter().map(|(n, _)| n.as_str()).collect();
            error!(
                id = %order.id,
                policy = %order.policy,
                ?known,
                "emergency order names a policy [policies] emergency does not list; not started"
            );
            let p = self.begin(&order, self.outbox.next_seq_at_open(Stream::EMERGENCY));
            self.finish(p, "refused", None).await;
            return;
        };
        let flow = Flow::new(Stream::EMERGENCY, policy, &self.versions).with_tags(vec![
            "emergency".into(),
            format!("emergency_id={}", order.id),
        ]);
        let (reply, first) = oneshot::channel();
        let flow = Box::new(flow);
        if self
            .commands
            .send(EmergencyCommand::Start { flow, reply })
            .await
            .is_err()
        {
            return;
        }
        let Ok(first_seq) = first.await else { return };
        let progress = match resumed {
            Some(p) => {
                info!(id = %order.id, "emergency collection resumed after a restart; its end is unchanged");
                p
            }
            None => {
                let p = self.begin(&order, first_seq);
                self.save(&p).await;
                self.metrics.emergencies_started.inc();
                let expires = jiff::Timestamp::from_millisecond(order.expires_ms)
                    .map(|t| t.to_string())
                    .unwrap_or_default();
                self.report_record(
                    "emergency_started",
                    order.expires_ms,
                    vec![
                        "emergency".into(),
                        format!("emergency_id={}", order.id),
                        format!("policy={}", order.policy),
                        format!("reason={}", order.reason),
                        format!("expires={expires}"),
                    ],
                )
                .await;
                warn!(id = %order.id, policy = %order.policy, reason = %order.reason, %expires, "emergency collection started");
                p
            }
        };
        self.progress = Some(progress);
        self.metrics.set_emergency(Some(EmergencyStatus {
            id: order.id.clone(),
            policy: order.policy.clone(),
            reason: order.reason.clone(),
            started_ms: order.started_ms,
            ends_ms: order.ends_ms(),
        }));
        self.running = Some(order);
    }

    /// A fresh progress for `order` starting at `first_seq`, with the stream's counters now.
    fn begin(&self, order: &Order, first_seq: u64) -> Progress {
        let st = self.outbox.stats();
        let st = st.get(Stream::EMERGENCY);
        Progress {
            id: order.id.clone(),
            policy: order.policy.clone(),
            first_seq,
            acked_before: st.acked_batches,
            evicted_before: st.evicted_batches,
            report: None,
        }
    }

    /// Switches the running flow off, then purges and reports.
    async fn end(&mut self, reason: &str) {
        let Some(order) = self.running.take() else {
            return;
        };
        self.metrics.set_emergency(None);
        let (reply, ended) = oneshot::channel();
        let ended = match self.commands.send(EmergencyCommand::End { reply }).await {
            Ok(()) => ended.await.ok(),
            Err(_) => None,
        };
        let Some(p) = self.progress.clone().filter(|p| p.id == order.id) else {
            return;
        };
        if let Some(e) = ended {
            // What the flow sealed must be in the store before the purge can destroy it.
            let last = e.end_seq.saturating_sub(1);
            let mut marks = self.committed_rx.clone();
            let committed = tokio::time::timeout(
                COMMIT_WAIT,
                marks
                    .wait_for(|m| e.end_seq <= p.first_seq || m[Stream::EMERGENCY.index()] >= last),
            )
            .await;
            if !matches!(committed, Ok(Ok(_))) {
                warn!(id = %p.id, "emergency batches not all committed before the purge; the rest is purged at the next start");
            }
        }
        self.finish(p, reason, ended).await;
    }

    /// Purges the emergency stream and reports the collection `p` as ended.
    async fn finish(&mut self, mut p: Progress, reason: &str, ended: Option<EmergencyEnded>) {
        let purged = match self.outbox.purge(Stream::EMERGENCY).await {
            Ok(purged) => purged,
            Err(e) => {
                // Unreported progress stays on file: the next step tries again.
                error!(id = %p.id, error = %e, "emergency purge failed; retrying");
                self.progress = Some(p);
                return;
            }
        };
        let end_seq = ended.map_or_else(
            || self.outbox.next_seq_at_open(Stream::EMERGENCY),
            |e| e.end_seq,
        );
        let st = self.outbox.stats();
        let st = st.get(Stream::EMERGENCY);
        let report = Report {
            end: reason.into(),
            ended_ms: now_ms(),
            produced_batches: end_seq.saturating_sub(p.first_seq),
            delivered_batches: st.acked_batches.saturating_sub(p.acked_before),
            purged_batches: purged.batches,
            evicted_batches: st.evicted_batches.saturating_sub(p.evicted_before),
            discarded_records: ended.map_or(0, |e| e.discarded_records),
            first_seq: p.first_seq,
            end_seq: end_seq.max(p.first_seq),
        };
        let tags = report.tags(&p.id, &p.policy);
        warn!(
            id = %p.id,
            end = reason,
            produced = report.produced_batches,
            delivered = report.delivered_batches,
            purged = report.purged_batches,
            evicted = report.evicted_batches,
            discarded_records = report.discarded_records,
            "emergency collection ended; what it left on the box is purged"
        );
        let purged_batches = purged.batches;
        p.report = Some(report);
        self.save(&p).await;
        // Counted once the account is on file: whoever sees the end counted can read it.
        self.metrics.emergencies_ended.inc();
        self.metrics.emergency_batches_purged.add(purged_batches);
        self.progress = Some(p);
        self.report_record(
            "emergency_ended",
            i64::try_from(purged_batches).unwrap_or(i64::MAX),
            tags,
        )
        .await;
    }

    /// Batches on the emergency stream with no collection to account them to (committed
    /// after an end's purge, or left by a crash before one): destroyed at start.
    async fn purge_leftovers(&mut self) {
        if self.progress.as_ref().is_some_and(|p| p.report.is_none()) {
            return;
        }
        if self.outbox.stats().get(Stream::EMERGENCY).batches == 0 {
            return;
        }
        match self.outbox.purge(Stream::EMERGENCY).await {
            Ok(purged) => {
                self.metrics.emergency_batches_purged.add(purged.batches);
                warn!(
                    batches = purged.batches,
                    "emergency batches of an ended collection purged at start"
                );
            }
            Err(e) => error!(error = %e, "purging left-over emergency batches failed"),
        }
    }

    async fn save(&self, p: &Progress) {
        let path = self.progress_path.clone();
        let p = p.clone();
        let written = tokio::task::spawn_blocking(move || write(&path, &p)).await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                error!(file = %self.progress_path.display(), error = %e, "emergency progress not saved")
            }
            Err(e) => error!(error = %e, "emergency progress task failed"),
        }
    }

    /// Sends a report record on the alarms stream (waiting if the batcher is behind).
    async fn report_record(&self, field: &str, value: i64, tags: Vec<String>) {
        let record = Record {
            subject: self.subject.clone(),
            field: field.into(),
            value: Value::Int(value),
            unit: Unit::One,
            at_ms: now_ms(),
            quality: Quality::Good,
            tags,
            window: None,
            epoch: 0,
        };
        if self.alarms.send(record).await.is_err() {
            error!(field, "batcher gone; emergency report not sent");
        }
    }
}

/// Runs `f(path)` on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: fn(&std::path::Path) -> Result<T, String>,
    path: PathBuf,
) -> Result<T, String> {
    tokio::task::spawn_blocking(move || f(&path))
        .await
        .map_err(|e| e.to_string())?
}

fn read_file<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<Option<T>, String> {
    read(path)
}
