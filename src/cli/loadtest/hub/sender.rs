//! A connection's sender task: every [`TICK`] it seals the batches that are due (on a
//! blocking thread: sealing is CPU work), then publishes them, the garbage and forged
//! payloads of their period, and every batch unacked for `--ack-timeout`.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use tokio::time::Instant;

use super::records;
use super::state::{lock, Control, GroupState, Pending, Plan, SEALING, STOPPED};
use crate::mqtt::{MqttLink, QoS};
use crate::reading::{now_ms, Stream};
use crate::seal::Sealer;
use crate::wire::stream_topic;

/// How often a sender looks for due seals and re-sends.
const TICK: Duration = Duration::from_millis(20);

/// One seal to do off the async workers.
struct SealJob {
    gateway: usize,
    seq: u64,
    sealer: Arc<Sealer>,
    subjects: Arc<Vec<String>>,
    forged: Option<(Arc<Sealer>, u64)>,
    garbage: bool,
    seed: u64,
}

impl std::fmt::Debug for SealJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealJob")
            .field("gateway", &self.gateway)
            .field("seq", &self.seq)
            .finish()
    }
}

#[derive(Debug)]
struct Sealed {
    gateway: usize,
    seq: u64,
    batch: Option<Vec<u8>>,
    extra: Vec<Vec<u8>>,
    forged: bool,
    garbage: bool,
}

/// Seals what is due and publishes new batches and re-sends, every [`TICK`].
pub(super) async fn send(
    link: Arc<MqttLink>,
    state: Arc<Mutex<GroupState>>,
    ctl: Arc<Control>,
    plan: Arc<Plan>,
) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let phase = ctl.phase();
        if phase == STOPPED {
            return;
        }
        let jobs = if phase == SEALING {
            due_seals(&state, &ctl, &plan)
        } else {
            Vec::new()
        };
        let sealed = if jobs.is_empty() {
            Vec::new()
        } else {
            let p = plan.clone();
            match tokio::task::spawn_blocking(move || {
                jobs.into_iter().map(|j| seal(j, &p)).collect::<Vec<_>>()
            })
            .await
            {
                Ok(s) => s,
                Err(_) => return,
            }
        };
        let out = to_publish(&state, &ctl, &plan, sealed);
        for (topic, bytes) in out {
            match link.publish(&topic, QoS::AtLeastOnce, bytes).await {
                Ok(()) => Control::add(&ctl.published, 1),
                Err(_) => Control::add(&ctl.publish_errors, 1),
            }
        }
    }
}

/// The seals due now; a gateway whose backlog is full skips its period.
fn due_seals(state: &Mutex<GroupState>, ctl: &Control, plan: &Plan) -> Vec<SealJob> {
    let Some(start) = ctl.window_start() else {
        return Vec::new();
    };
    let now = Instant::now();
    let mut s = lock(state);
    let s = &mut *s;
    let mut jobs = Vec::new();
    for (i, g) in s.gateways.iter_mut().enumerate() {
        let next = *g.next_seal.get_or_insert(start + g.offset);
        if next > now {
            continue;
        }
        // One seal per period; periods missed while the process was busy are not caught up.
        let mut following = next + plan.batch_every;
        while following <= now {
            following += plan.batch_every;
        }
        g.next_seal = Some(following);
        if g.pending.len() >= plan.window {
            Control::add(&ctl.skipped_seals, 1);
            continue;
        }
        let seq = g.ledger.acked.len() as u64 + 1;
        g.ledger.acked.push(false);
        let forged = s.rng.gen_bool(plan.forged).then(|| {
            g.forged_seq += 1;
            (g.forger.clone(), g.forged_seq)
        });
        jobs.push(SealJob {
            gateway: i,
            seq,
            sealer: g.sealer.clone(),
            subjects: g.subjects.clone(),
            forged,
            garbage: s.rng.gen_bool(plan.garbage),
            seed: s.rng.next_u64(),
        });
    }
    jobs
}

/// Seals one job (blocking: run on a blocking thread).
fn seal(j: SealJob, plan: &Plan) -> Sealed {
    let mut rng = StdRng::seed_from_u64(j.seed);
    let end_ms = now_ms();
    let recs = records::batch(
        &j.subjects,
        plan.fields,
        plan.readings,
        plan.interval_ms,
        end_ms,
        &mut rng,
    );
    let batch = j
        .sealer
        .seal(Stream::Readings, j.seq, end_ms, &plan.stamp, &recs)
        .ok()
        .map(|b| b.bytes);
    let mut extra = Vec::new();
    let forged = j.forged.is_some();
    if let Some((forger, seq)) = j.forged {
        if let Ok(b) = forger.seal(Stream::Readings, seq, end_ms, &plan.stamp, &recs) {
            extra.push(b.bytes);
        }
    }
    if j.garbage {
        let mut junk = vec![0u8; rng.gen_range(64..2048)];
        rng.fill_bytes(&mut junk);
        extra.push(junk);
    }
    Sealed {
        gateway: j.gateway,
        seq: j.seq,
        batch,
        extra,
        forged,
        garbage: j.garbage,
    }
}

/// Records new batches as pending and returns them, the garbage and forged payloads, and
/// every re-send due, as (topic, payload).
fn to_publish(
    state: &Mutex<GroupState>,
    ctl: &Control,
    plan: &Plan,
    sealed: Vec<Sealed>,
) -> Vec<(String, Bytes)> {
    let now = Instant::now();
    let mut s = lock(state);
    let mut out = Vec::new();
    for b in sealed {
        let g = &mut s.gateways[b.gateway];
        let topic = stream_topic(&g.ledger.id, Stream::Readings);
        if let Some(bytes) = b.batch {
            let bytes = Bytes::from(bytes);
            g.pending.insert(
                b.seq,
                Pending {
                    bytes: bytes.clone(),
                    sealed_at: now,
                    sent_at: Some(now),
                    sends: 1,
                },
            );
            ctl.pending.fetch_add(1, Ordering::Relaxed);
            Control::add(&ctl.sealed, 1);
            out.push((topic.clone(), bytes));
        }
        Control::add(&ctl.forged_sent, u64::from(b.forged));
        Control::add(&ctl.garbage_sent, u64::from(b.garbage));
        out.extend(b.extra.into_iter().map(|x| (topic.clone(), Bytes::from(x))));
    }
    for g in &mut s.gateways {
        for p in g.pending.values_mut() {
            if p.sent_at
                .is_some_and(|t| now.duration_since(t) < plan.ack_timeout)
            {
                continue;
            }
            p.sent_at = Some(now);
            p.sends += 1;
            Control::add(&ctl.resends, 1);
            out.push((
                stream_topic(&g.ledger.id, Stream::Readings),
                p.bytes.clone(),
            ));
        }
    }
    out
}
