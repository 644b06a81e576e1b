//! The hub's transport-independent core: sealed batches in, records to the sink, acks out.
//!
//! The MQTT layer (`service`) receives a payload on `citygate/v1/{gateway_id}/{stream}`, calls
//! [`Hub::ingest`] with the topic's gateway id, and publishes the returned [`Ack`], signed with
//! the hub's ack key ([`Hub::ack_payload`], see `wire` for the format), on
//! `citygate/v1/{gateway_id}/ack`. For each payload, in this order:
//!
//! 1. open the envelope ([`Opener`]: parse, registered gateway and key, strict signature, HPKE,
//!    decode) — a failure is rejected with [`OpenError::reason`](crate::seal::OpenError::reason);
//! 2. the header's gateway must equal the topic's (`topic_mismatch`): a registered gateway may
//!    not publish on another's topic, and the batch's (purpose, policy hash) must be approved
//!    for its gateway (`unapproved_policy`, logged as an ERROR alarm, rate-limited; see
//!    `approval`);
//! 3. de-duplicate on (gateway, stream, incarnation, seq) ([`Dedup`]): a batch seen before is acknowledged
//!    again and written nothing ([`Ingest::Duplicate`]);
//! 4. write the records to the [`Sink`] durably (a gateway's emergency reports among them are
//!    logged at WARN, `emergency`);
//! 5. mark the batch seen and flush the de-dup state;
//! 6. return [`Ingest::Accepted`] with the ack.
//!
//! Steps 3–5 run under one lock, so two copies of a batch arriving at once are written once.
//! [`Hub::ingest_group`] runs them for several payloads at once, with one sink sync and one
//! de-dup flush for the group (a backlog drains at the rate of groups, not of syncs).
//! Rejections are counted by reason ([`Hub::stats`]) and logged at WARN, and carry no ack: a
//! forged or broken batch is never acknowledged. A sink or de-dup failure (`sink_failed`,
//! `dedup_failed`) is logged at ERROR and also not acknowledged, so the gateway re-sends it.
//!
//! Crash consistency: the sink is written before the batch is marked, and [`Hub::new`] asks the
//! sink for batches it holds that the de-dup state does not know (a crash between steps 4 and 5)
//! and marks them first; `sink.rs` documents exactly what that covers.
//!
//! De-dup state is per hub process: hub processes sharing one subscription group must not split
//! one gateway's batches between them (brokers' sticky/hash strategies by client keep a
//! gateway on one hub), or a re-sent batch could be written by two of them.
//!
//! All calls block (file sync, sled flush): call them from `spawn_blocking` or a dedicated
//! thread. [`service`] ingests in `spawn_blocking`; [`HubProcess`] opens the hub there.

pub(crate) mod approval;
pub(crate) mod config;
pub(crate) mod dedup;
pub(crate) mod emergency;
pub(crate) mod process;
pub mod prune;
pub(crate) mod rewrite;
mod rotate;
pub(crate) mod sink;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

pub(crate) mod service;

pub(crate) use approval::{AlarmLimiter, Approvals};
pub use config::{ApprovedPolicy, HubConfig, HubKeys, SinkConfig};
pub(crate) use dedup::{Dedup, DedupError, Seen};
pub use process::HubProcess;
pub(crate) use sink::{BatchKey, JsonlSink, Sink, SinkBatch, SinkError};

use crate::reading::{GatewayId, PurposeName, Record};
use crate::seal::Opener;
use crate::telemetry::log_limit::LogLimiter;
use crate::wire::{Ack, AckSigner};

/// An opened batch that passed every check but de-duplication.
#[derive(Debug)]
struct Opened {
    key: BatchKey,
    ack: Ack,
    purpose: Option<PurposeName>,
    records: Vec<Record>,
}

/// What became of one payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ingest {
    /// Written to the sink and marked; publish the ack.
    Accepted { ack: Ack, records: usize },
    /// Seen before: nothing written; publish the ack again.
    Duplicate { ack: Ack },
    /// Not accepted and not acknowledged. `reason` is a constant snake_case label.
    Rejected {
        reason: &'static str,
        detail: String,
    },
}

impl Ingest {
    /// The ack to publish, if any.
    pub(crate) fn ack(&self) -> Option<&Ack> {
        match self {
            Ingest::Accepted { ack, .. } | Ingest::Duplicate { ack } => Some(ack),
            Ingest::Rejected { .. } => None,
        }
    }
}

/// Counters since the hub started.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct HubStats {
    pub accepted_batches: u64,
    pub records_written: u64,
    /// Batches acknowledged again without writing (includes `below_window`).
    pub duplicates: u64,
    /// Duplicates below a de-dup window that gave up a gap (see `dedup`).
    pub below_window: u64,
    /// Batches marked at start-up because the sink already held them.
    pub recovered_batches: u64,
    /// Rejected payloads by reason.
    pub rejected: BTreeMap<&'static str, u64>,
}

/// Why a hub could not start.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(transparent)]
    Dedup(#[from] DedupError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Keys(#[from] crate::seal::KeyError),
}

/// The receiving end. See the module docs.
#[derive(Debug)]
pub struct Hub {
    opener: Opener,
    ack_signer: AckSigner,
    approvals: Approvals,
    unapproved_alarms: AlarmLimiter,
    dedup: Dedup,
    sink: Box<dyn Sink>,
    /// Serialises check → write → mark.
    commit: Mutex<()>,
    accepted_batches: AtomicU64,
    records_written: AtomicU64,
    duplicates: AtomicU64,
    below_window: AtomicU64,
    recovered_batches: u64,
    rejected: Mutex<BTreeMap<&'static str, u64>>,
    /// Rate limit on the warnings of rejected and dropped payloads (the counters count all).
    log: LogLimiter,
    /// The config the hub was opened from (named in the emergency end report's log line).
    config_path: Option<std::path::PathBuf>,
}

impl Hub {
    /// Builds a hub and marks the batches the sink holds but the de-dup state missed.
    pub(crate) fn new(
        opener: Opener,
        ack_signer: AckSigner,
        approvals: Approvals,
        dedup: Dedup,
        sink: Box<dyn Sink>,
    ) -> Result<Hub, HubError> {
        let is_marked = |k: &BatchKey| {
            // An unreadable state counts as marked: recovery then cuts nothing it cannot judge.
            dedup.check(k).map_or(true, |s| s != Seen::New)
        };
        let recovered = sink.recover(&is_marked)?;
        for k in &recovered {
            tracing::warn!(gateway = %k.gateway, stream = %k.stream, incarnation = format_args!("{:016x}", k.incarnation), seq = k.seq, "marking a batch the sink holds but de-dup missed");
            dedup.mark(k)?;
        }
        dedup.flush()?;
        Ok(Hub {
            opener,
            ack_signer,
            approvals,
            unapproved_alarms: AlarmLimiter::default(),
            dedup,
            sink,
            commit: Mutex::new(()),
            accepted_batches: AtomicU64::new(0),
            records_written: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            below_window: AtomicU64::new(0),
            recovered_batches: recovered.len() as u64,
            rejected: Mutex::new(BTreeMap::new()),
            log: LogLimiter::default(),
            config_path: None,
        })
    }

    /// Loads the keys, opens the de-dup state and the sink a config names, and runs the
    /// sink's recovery. Blocks (key files, sled, file reads and syncs, up to 3 s waiting for a
    /// previous instance's lock): async code calls it in `spawn_blocking`, as
    /// [`HubProcess::start`] does.
    pub(crate) fn open(cfg: &HubConfig) -> Result<Hub, HubError> {
        let (opener, ack_signer) = HubKeys::load(cfg)?.into_parts();
        let dedup = Dedup::open(&cfg.state_path)?;
        let sink: Box<dyn Sink> = match &cfg.sink {
            SinkConfig::Jsonl { path, rotate } => {
                Box::new(JsonlSink::open(path)?.with_rotation(*rotate))
            }
        };
        let mut hub = Hub::new(
            opener,
            ack_signer,
            Approvals::new(&cfg.gateways),
            dedup,
            sink,
        )?;
        hub.config_path = Some(cfg.path.clone());
        Ok(hub)
    }

    /// Takes one payload received on the topic of `topic_gateway`. Never panics.
    #[cfg(test)]
    pub(crate) fn ingest(&self, topic_gateway: &GatewayId, payload: &[u8]) -> Ingest {
        self.ingest_group(&[(topic_gateway.clone(), payload)])
            .pop()
            .expect("invariant: one outcome per payload")
    }

    /// Takes several payloads, each with its topic's gateway, and returns their outcomes in
    /// order. New batches are written to the sink with one sync and marked with one de-dup
    /// flush, so a backlog costs two syncs per group instead of per batch; a sink or de-dup
    /// failure fails (and acknowledges) none of the group's new batches. A batch twice in
    /// one group is written once. Never panics.
    pub(crate) fn ingest_group(&self, payloads: &[(GatewayId, &[u8])]) -> Vec<Ingest> {
        let mut out: Vec<Option<Ingest>> = vec![None; payloads.len()];
        let mut opened = Vec::with_capacity(payloads.len());
        for (i, (gateway, payload)) in payloads.iter().enumerate() {
            match self.open_batch(gateway, payload) {
                Ok(o) => opened.push((i, o)),
                Err(rejected) => out[i] = Some(rejected),
            }
        }

        let _commit = self.commit.lock().unwrap_or_else(PoisonError::into_inner);
        let mut fresh: Vec<(usize, Opened)> = Vec::new();
        for (i, batch) in opened {
            let seen = if fresh.iter().any(|(_, o)| o.key == batch.key) {
                Ok(Seen::Duplicate)
            } else {
                self.dedup.check(&batch.key)
            };
            out[i] = Some(match seen {
                Ok(Seen::New) => {
                    fresh.push((i, batch));
                    continue;
                }
                Ok(seen) => self.duplicate(&batch.key, seen, batch.ack),
                Err(e) => self.fail(&payloads[i].0, "dedup_failed", e.to_string()),
            });
        }
        if !fresh.is_empty() {
            let batches: Vec<SinkBatch<'_>> = fresh
                .iter()
                .map(|(_, o)| SinkBatch {
                    key: &o.key,
                    purpose: o.purpose.as_ref(),
                    records: &o.records,
                })
                .collect();
            let written = self
                .sink
                .write_batches(&batches)
                .map_err(|e| ("sink_failed", e.to_string()))
                .and_then(|()| {
                    fresh
                        .iter()
                        .try_for_each(|(_, o)| self.dedup.mark(&o.key))
                        .and_then(|()| self.dedup.flush())
                        .map_err(|e| ("dedup_failed", e.to_string()))
                });
            for (
                i,
                Opened {
                    key, ack, records, ..
                },
            ) in fresh
            {
                out[i] = Some(match &written {
                    Err((reason, detail)) => self.fail(&payloads[i].0, reason, detail.clone()),
                    Ok(()) => {
                        emergency::log_reports(self.config_path.as_deref(), &key, &records);
                        let records = records.len();
                        self.accepted_batches.fetch_add(1, Ordering::Relaxed);
                        self.records_written
                            .fetch_add(records as u64, Ordering::Relaxed);
                        tracing::debug!(gateway = %key.gateway, stream = %key.stream, seq = key.seq, records, "batch accepted");
                        Ingest::Accepted { ack, records }
                    }
                });
            }
        }
        out.into_iter()
            .map(|o| o.expect("invariant: every payload has an outcome"))
            .collect()
    }

    /// Opens a payload and checks it was published on its own gateway's topic, under a policy
    /// approved for that gateway.
    fn open_batch(&self, topic_gateway: &GatewayId, payload: &[u8]) -> Result<Opened, Ingest> {
        let batch = match self.opener.open(payload) {
            Ok(b) => b,
            Err(e) => return Err(self.reject(topic_gateway, e.reason(), e.to_string())),
        };
        let h = &batch.header;
        if &h.gateway != topic_gateway {
            let detail = format!(
                "batch from {} published on the topic of {topic_gateway}",
                h.gateway
            );
            return Err(self.reject(topic_gateway, "topic_mismatch", detail));
        }
        if !self
            .approvals
            .allows(&h.gateway, h.stream, h.purpose.as_ref(), &h.policy_hash)
        {
            return Err(self.unapproved(&h.gateway, h.stream, h.purpose.as_ref(), &h.policy_hash));
        }
        let ack = Ack {
            gateway: h.gateway.clone(),
            stream: h.stream,
            incarnation: h.incarnation,
            seq: h.seq,
        };
        let key = BatchKey {
            gateway: h.gateway.clone(),
            stream: h.stream,
            incarnation: h.incarnation,
            seq: h.seq,
        };
        Ok(Opened {
            key,
            ack,
            purpose: batch.header.purpose,
            records: batch.records,
        })
    }

    /// A batch under a policy not approved for its gateway: counted, not acknowledged (the
    /// gateway keeps it), and raised as an alarm, at most once per `approval::ALARM_EVERY` for
    /// the same (gateway, purpose, hash).
    fn unapproved(
        &self,
        gateway: &GatewayId,
        stream: crate::reading::Stream,
        purpose: Option<&PurposeName>,
        hash: &[u8; 32],
    ) -> Ingest {
        const REASON: &str = "unapproved_policy";
        self.count_rejection(REASON);
        let purpose_name = purpose.map_or("(none: envelope before version 3)", PurposeName::as_str);
        let hash_hex = hex::encode(hash);
        if self
            .unapproved_alarms
            .should_log(gateway, purpose, hash, std::time::Instant::now())
        {
            tracing::error!(
                gateway = %gateway,
                stream = %stream,
                purpose = purpose_name,
                hash = %hash_hex,
                "unapproved policy: batch not acknowledged; approve it in the hub config or fix the gateway"
            );
        }
        Ingest::Rejected {
            reason: REASON,
            detail: format!(
                "gateway {gateway} is not approved for purpose {purpose_name} with policy hash {hash_hex}"
            ),
        }
    }

    /// A batch seen before: counted, acknowledged again, not written.
    fn duplicate(&self, key: &BatchKey, seen: Seen, ack: Ack) -> Ingest {
        self.duplicates.fetch_add(1, Ordering::Relaxed);
        if seen == Seen::BelowWindow {
            self.below_window.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(gateway = %key.gateway, stream = %key.stream, incarnation = format_args!("{:016x}", key.incarnation), seq = key.seq, "batch below the de-dup window acknowledged without writing");
        } else {
            tracing::debug!(gateway = %key.gateway, stream = %key.stream, seq = key.seq, "duplicate batch");
        }
        Ingest::Duplicate { ack }
    }

    /// The signed payload of `ack` (see `wire` for the format).
    pub(crate) fn ack_payload(&self, ack: &Ack) -> Vec<u8> {
        self.ack_signer.encode(ack)
    }

    /// Reopens the sink's files after log rotation moved them (SIGHUP). Blocks (file I/O).
    pub(crate) fn reopen_sink(&self) -> Result<(), SinkError> {
        self.sink.reopen()
    }

    /// The hub's limit on repeated warnings (also used by its MQTT side).
    pub(crate) fn log_limiter(&self) -> &LogLimiter {
        &self.log
    }

    pub fn stats(&self) -> HubStats {
        HubStats {
            accepted_batches: self.accepted_batches.load(Ordering::Relaxed),
            records_written: self.records_written.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            below_window: self.below_window.load(Ordering::Relaxed),
            recovered_batches: self.recovered_batches,
            rejected: self
                .rejected
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }

    fn count_rejection(&self, reason: &'static str) {
        *self
            .rejected
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(reason)
            .or_default() += 1;
    }

    fn reject(&self, gateway: &GatewayId, reason: &'static str, detail: String) -> Ingest {
        self.count_rejection(reason);
        if self.log.allow(reason) {
            tracing::warn!(gateway = %gateway, reason, detail = %detail, "batch rejected");
        }
        Ingest::Rejected { reason, detail }
    }

    /// A failure of the hub itself: not acknowledged, so the gateway re-sends.
    fn fail(&self, gateway: &GatewayId, reason: &'static str, detail: String) -> Ingest {
        self.count_rejection(reason);
        if self.log.allow(reason) {
            tracing::error!(gateway = %gateway, reason, detail = %detail, "batch not written");
        }
        Ingest::Rejected { reason, detail }
    }
}
