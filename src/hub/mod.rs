//! The hub's transport-independent core: sealed batches in, batches to the sink, acks out.
//!
//! The MQTT layer (`service`) receives a payload on `citygate/v1/{gateway_id}/{stream}`, calls
//! [`Hub::ingest_group`] with the topic's gateway id, and publishes each returned [`Ack`],
//! signed with the hub's ack key ([`Hub::ack_payload`], see `wire` for the format), on
//! `citygate/v1/{gateway_id}/ack`. For each payload, in this order:
//!
//! 1. open the envelope ([`Opener`]: parse, registered gateway and key, strict signature, HPKE,
//!    decode) — a failure is rejected with [`OpenError::reason`](crate::seal::OpenError::reason);
//! 2. the header's gateway must equal the topic's (`topic_mismatch`): a registered gateway may
//!    not publish on another's topic, and the batch's (purpose, policy hash) must be approved
//!    for its gateway (`unapproved_policy`, logged as an ERROR alarm, rate-limited; see
//!    `approval`);
//! 3. a second copy of a batch within one group is a duplicate of the first;
//! 4. commit the group to the [`Sink`] ([`Sink::commit`]), which de-duplicates on (gateway,
//!    stream, incarnation, seq) and answers per batch: written ([`Ingest::Accepted`]; a
//!    gateway's emergency reports among them are logged at WARN, `emergency`), already held
//!    ([`Ingest::Duplicate`], acknowledged again) or refused by the database for its data and
//!    quarantined ([`Ingest::Quarantined`], acknowledged: it is durably recorded, and retrying
//!    it would never succeed). All of it is durable when the sink returns.
//!
//! Rejections are counted by reason ([`Hub::stats`]) and logged at WARN, and carry no ack: a
//! forged or broken batch is never acknowledged. A sink failure (`sink_failed`) is logged at
//! ERROR, fails the group's batches (none acknowledged, so the gateways re-send) and makes the
//! hub `degraded` ([`Hub::sink_fault`]) until a commit succeeds again.
//!
//! Where de-dup state lives is the sink's business (`sink`): the JSON Lines sink keeps a local
//! sled window, so hub processes sharing one subscription group must not split one gateway's
//! batches between them with it; the PostgreSQL sink (`pg`) de-duplicates in the database, in
//! the transaction that writes the batch, so any number of hub processes may share the
//! subscription (`$share/{group}/…`).
//!
//! All calls block (file sync, sled flush, database round trips): call them from
//! `spawn_blocking` or a dedicated thread. [`service`] ingests in `spawn_blocking`;
//! [`HubProcess`] opens the hub there.

pub(crate) mod approval;
pub(crate) mod config;
pub(crate) mod dedup;
pub(crate) mod emergency;
pub(crate) mod pg;
pub(crate) mod process;
pub mod prune;
pub(crate) mod rewrite;
mod rotate;
pub(crate) mod sink;
mod stats;

#[cfg(test)]
mod tests;

use std::sync::atomic::Ordering;

pub(crate) mod service;

pub(crate) use approval::{AlarmLimiter, Approvals};
pub use config::{ApprovedPolicy, HubConfig, HubKeys, SinkConfig};
pub use process::HubProcess;
#[cfg(test)]
pub(crate) use sink::JsonlSink;
pub(crate) use sink::{BatchKey, BatchMeta, JsonlDedupSink, Outcome, Sink, SinkBatch, SinkError};
pub use stats::HubStats;
use stats::{Counters, SinkStats};

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
    meta: BatchMeta,
    records: Vec<Record>,
}

/// What became of one payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ingest {
    /// Written to the sink; publish the ack.
    Accepted { ack: Ack, records: usize },
    /// Seen before: nothing written; publish the ack again.
    Duplicate { ack: Ack },
    /// Refused by the sink for its data and recorded in its quarantine; publish the ack.
    Quarantined { ack: Ack, reason: String },
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
            Ingest::Accepted { ack, .. }
            | Ingest::Duplicate { ack }
            | Ingest::Quarantined { ack, .. } => Some(ack),
            Ingest::Rejected { .. } => None,
        }
    }
}

/// Why a hub could not start.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
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
    sink: Box<dyn Sink>,
    counters: Counters,
    sink_stats: SinkStats,
    /// Rate limit on the warnings of rejected and dropped payloads (the counters count all).
    log: LogLimiter,
    /// The config the hub was opened from (named in the emergency end report's log line).
    config_path: Option<std::path::PathBuf>,
    /// The PostgreSQL sink and the approved retentions, for the hourly retention job.
    retention: Option<(std::sync::Arc<pg::PgSink>, pg::retention::RetentionPolicy)>,
}

impl Hub {
    /// Builds a hub over an open sink (which has run its own recovery).
    pub(crate) fn new(
        opener: Opener,
        ack_signer: AckSigner,
        approvals: Approvals,
        sink: Box<dyn Sink>,
    ) -> Hub {
        Hub {
            opener,
            ack_signer,
            approvals,
            unapproved_alarms: AlarmLimiter::default(),
            counters: Counters::new(sink.recovered()),
            sink_stats: SinkStats::default(),
            sink,
            log: LogLimiter::default(),
            config_path: None,
            retention: None,
        }
    }

    /// Loads the keys and opens the sink a config names (the JSON Lines sink runs its crash
    /// recovery; the PostgreSQL sink checks or applies the schema). Blocks (key files, sled,
    /// file reads and syncs, database round trips): async code calls it in `spawn_blocking`,
    /// as [`HubProcess::start`] does.
    pub(crate) fn open(cfg: &HubConfig) -> Result<Hub, HubError> {
        let (opener, ack_signer) = HubKeys::load(cfg)?.into_parts();
        let (sink, retention): (Box<dyn Sink>, _) = match &cfg.sink {
            SinkConfig::Jsonl {
                path,
                rotate,
                state_path,
            } => (
                Box::new(JsonlDedupSink::open(state_path, path, *rotate)?),
                None,
            ),
            SinkConfig::Postgres(pg) => {
                let sink = std::sync::Arc::new(pg::PgSink::open(pg)?);
                let policy = pg::retention::RetentionPolicy::from_config(cfg);
                (Box::new(sink.clone()), Some((sink, policy)))
            }
        };
        let mut hub = Hub::new(opener, ack_signer, Approvals::new(&cfg.gateways), sink);
        hub.config_path = Some(cfg.path.clone());
        hub.retention = retention;
        Ok(hub)
    }

    /// Drops the database partitions past retention (see `pg::retention`), if the sink is
    /// PostgreSQL; `None` otherwise. Blocks.
    pub(crate) fn drop_expired_partitions(
        &self,
        now_ms: i64,
    ) -> Option<Result<Vec<String>, SinkError>> {
        self.retention
            .as_ref()
            .map(|(sink, policy)| sink.drop_expired(policy, now_ms))
    }

    /// Takes one payload received on the topic of `topic_gateway`. Never panics.
    #[cfg(test)]
    pub(crate) fn ingest(&self, topic_gateway: &GatewayId, payload: &[u8]) -> Ingest {
        self.ingest_group(&[(topic_gateway.clone(), payload)])
            .pop()
            .expect("invariant: one outcome per payload")
    }

    /// Takes several payloads, each with its topic's gateway, and returns their outcomes in
    /// order. The opened batches are committed to the sink as one group (one sync or one
    /// transaction); a sink failure fails (and acknowledges) none of them. A batch twice in
    /// one group is written once. Never panics.
    pub(crate) fn ingest_group(&self, payloads: &[(GatewayId, &[u8])]) -> Vec<Ingest> {
        let mut out: Vec<Option<Ingest>> = vec![None; payloads.len()];
        let mut fresh: Vec<(usize, Opened)> = Vec::with_capacity(payloads.len());
        // A second copy of a batch in the group: its position and the copy's opening. It is
        // acknowledged only if the first copy's commit succeeds.
        let mut copies: Vec<(usize, Opened)> = Vec::new();
        for (i, (gateway, payload)) in payloads.iter().enumerate() {
            match self.open_batch(gateway, payload) {
                Ok(o) if fresh.iter().any(|(_, f)| f.key == o.key) => copies.push((i, o)),
                Ok(o) => fresh.push((i, o)),
                Err(rejected) => out[i] = Some(rejected),
            }
        }
        if !fresh.is_empty() {
            let batches: Vec<SinkBatch<'_>> = fresh
                .iter()
                .map(|(_, o)| SinkBatch {
                    key: &o.key,
                    purpose: o.purpose.as_ref(),
                    header: Some(o.meta),
                    records: &o.records,
                })
                .collect();
            let started = std::time::Instant::now();
            let committed = self.sink.commit(&batches);
            self.sink_stats.commit_done(started.elapsed(), &committed);
            if let Ok(outcomes) = &committed {
                assert_eq!(
                    outcomes.len(),
                    fresh.len(),
                    "invariant: the sink answers every batch of the group"
                );
            }
            for (n, (i, o)) in fresh.into_iter().enumerate() {
                out[i] = Some(match &committed {
                    Err(e) => self.fail(&payloads[i].0, "sink_failed", e.to_string()),
                    Ok(outcomes) => self.committed(o, &outcomes[n]),
                });
            }
            for (i, o) in copies {
                out[i] = Some(match &committed {
                    Err(e) => self.fail(&payloads[i].0, "sink_failed", e.to_string()),
                    Ok(_) => self.duplicate(&o.key, &Outcome::Duplicate, o.ack),
                });
            }
        }
        out.into_iter()
            .map(|o| o.expect("invariant: every payload has an outcome"))
            .collect()
    }

    /// The ingest outcome of a batch the sink answered `outcome` for.
    fn committed(&self, o: Opened, outcome: &Outcome) -> Ingest {
        let Opened {
            key, ack, records, ..
        } = o;
        match outcome {
            Outcome::Written => {
                emergency::log_reports(self.config_path.as_deref(), &key, &records);
                let records = records.len();
                self.counters.accepted(records);
                tracing::debug!(gateway = %key.gateway, stream = %key.stream, seq = key.seq, records, "batch accepted");
                Ingest::Accepted { ack, records }
            }
            Outcome::Duplicate | Outcome::BelowWindow => self.duplicate(&key, outcome, ack),
            Outcome::Quarantined { reason } => {
                self.counters.quarantined.fetch_add(1, Ordering::Relaxed);
                tracing::error!(gateway = %key.gateway, stream = %key.stream, incarnation = format_args!("{:016x}", key.incarnation), seq = key.seq, reason = %reason, "batch refused by the database: quarantined and acknowledged");
                Ingest::Quarantined {
                    ack,
                    reason: reason.clone(),
                }
            }
        }
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
        let meta = BatchMeta {
            created_at_ms: h.created_at_ms,
            record_count: h.record_count,
            policy_hash: h.policy_hash,
            signer_key_id: h.signer_key_id,
            recipient_key_id: h.recipient_key_id,
        };
        Ok(Opened {
            key,
            ack,
            purpose: batch.header.purpose,
            meta,
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
    fn duplicate(&self, key: &BatchKey, outcome: &Outcome, ack: Ack) -> Ingest {
        self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
        if *outcome == Outcome::BelowWindow {
            self.counters.below_window.fetch_add(1, Ordering::Relaxed);
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
        self.counters.snapshot()
    }

    /// Probes the sink (see [`Sink::probe`]) and records the result for `/health`. Blocks.
    pub(crate) fn probe_sink(&self) {
        if let Some(result) = self.sink.probe() {
            self.sink_stats.probe_done(&result);
        }
    }

    /// How many groups the service commits at once (the sink's connections).
    pub(crate) fn parallel_commits(&self) -> usize {
        self.sink.parallel_commits().max(1)
    }

    /// The sink's commit figures (`/metrics`).
    pub(crate) fn sink_stats(&self) -> &SinkStats {
        &self.sink_stats
    }

    /// The sink's `type` (`jsonl`, `postgres`).
    pub(crate) fn sink_kind(&self) -> &'static str {
        self.sink.kind()
    }

    /// Why the sink's last commit failed, while no commit has succeeded since (`/health`
    /// reports the hub degraded).
    pub(crate) fn sink_fault(&self) -> Option<String> {
        self.sink_stats.fault()
    }

    fn count_rejection(&self, reason: &'static str) {
        self.counters.reject(reason);
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
