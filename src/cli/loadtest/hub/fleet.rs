//! The simulated gateways: sealing, publishing, acks and re-sends, on one tokio runtime.
//!
//! Each MQTT connection carries a group of gateways and runs two tasks over one shared
//! [`GroupState`] (a `std` mutex, never held across an await): the *sender* wakes every
//! [`TICK`], seals the batches that are due (on a blocking thread: sealing is CPU work),
//! then publishes them and every batch unacked for `--ack-timeout`; the *receiver* takes
//! the link's events, verifies acks with the hub's ack key and removes acked batches (or
//! ignores a `--withhold-acks` share of them). They are apart because a publish may wait on
//! a full request queue, which only drains while the link's events are read.
//!
//! A gateway seals one batch per `--batch-every`, its first offset by its index so the
//! fleet's seals spread over the period. A period whose backlog already holds `--window`
//! batches seals nothing (`skipped_seals`): the fleet offers more than the hubs take.
//! What each gateway sealed and which of its seqs were acked is its [`Ledger`], which the
//! accounting compares with the sinks.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use tokio::time::Instant;

use super::records;
use super::setup::{Connection, FleetGateway};
use crate::mqtt::{LinkEvent, LinkOptions, LinkTls, MqttLink, QoS, TlsClientFiles};
use crate::reading::{now_ms, GatewayId, Stream};
use crate::seal::{HubPublicKey, PolicyStamp, Sealer};
use crate::wire::{ack_topic, stream_topic, AckVerifier};

/// How often a sender looks for due seals and re-sends.
const TICK: Duration = Duration::from_millis(20);
/// Outgoing QoS 1 publishes in flight per connection (the broker's PUBACKs bound them).
const LINK_INFLIGHT: u16 = 200;

/// Phases of a run, in order, after idle (0: connected, sealing nothing).
pub(super) const SEALING: u8 = 1;
pub(super) const DRAINING: u8 = 2;
pub(super) const STOPPED: u8 = 3;

/// What every gateway does alike.
#[derive(Debug)]
pub(super) struct Plan {
    pub meters: u32,
    pub fields: u32,
    pub readings: u64,
    pub interval_ms: i64,
    pub batch_every: Duration,
    pub window: usize,
    pub ack_timeout: Duration,
    pub withhold_acks: f64,
    pub garbage: f64,
    pub forged: f64,
    pub seed: u64,
    pub stamp: PolicyStamp,
    pub hub_key: HubPublicKey,
    pub broker: String,
}

/// Fleet-wide counters and the phase, shared by every task and the orchestrator.
#[derive(Debug, Default)]
pub(super) struct Control {
    phase: AtomicU8,
    window_start: OnceLock<Instant>,
    /// Batches sealed and not yet acked, over the fleet.
    pub pending: AtomicI64,
    pub sealed: AtomicU64,
    pub skipped_seals: AtomicU64,
    pub published: AtomicU64,
    pub resends: AtomicU64,
    pub publish_errors: AtomicU64,
    pub acked: AtomicU64,
    pub acked_in_window: AtomicU64,
    pub acks_withheld: AtomicU64,
    pub acks_for_resends: AtomicU64,
    /// Valid acks for a batch acked before (a re-send's ack after the first one counted).
    pub acks_again: AtomicU64,
    pub bad_acks: AtomicU64,
    pub garbage_sent: AtomicU64,
    pub forged_sent: AtomicU64,
    pub forged_acked: AtomicU64,
    pub connects: AtomicU64,
    pub disconnects: AtomicU64,
    pub subscribed: AtomicU64,
    pub subscribe_refused: AtomicU64,
}

impl Control {
    pub(super) fn phase(&self) -> u8 {
        self.phase.load(Ordering::SeqCst)
    }

    pub(super) fn set_phase(&self, phase: u8) {
        if phase == SEALING {
            let _ = self.window_start.set(Instant::now());
        }
        self.phase.store(phase, Ordering::SeqCst);
    }

    pub(super) fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// What one gateway sealed and which of its batches the hubs acked.
#[derive(Debug, Clone)]
pub(super) struct Ledger {
    pub id: GatewayId,
    pub incarnation: u64,
    /// Incarnation of its forged batches (never to appear in a sink).
    pub forged_incarnation: u64,
    /// `acked[seq - 1]`: batch `seq` was acked; its length is the number sealed.
    pub acked: Vec<bool>,
    /// Records in each sealed batch.
    pub records_per_batch: u64,
}

/// A batch sealed and not yet acked.
#[derive(Debug)]
struct Pending {
    bytes: Bytes,
    sealed_at: Instant,
    /// `None`: send at the next tick (new session).
    sent_at: Option<Instant>,
    sends: u32,
}

#[derive(Debug)]
struct SimGateway {
    ledger: Ledger,
    sealer: Arc<Sealer>,
    forger: Arc<Sealer>,
    subjects: Arc<Vec<String>>,
    forged_seq: u64,
    pending: BTreeMap<u64, Pending>,
    /// Offset of its first seal into the window.
    offset: Duration,
    next_seal: Option<Instant>,
}

#[derive(Debug)]
struct GroupState {
    gateways: Vec<SimGateway>,
    index: HashMap<GatewayId, usize>,
    /// Sealed → ack received, per first ack, in ms.
    latencies_ms: Vec<f32>,
    rng: StdRng,
}

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

/// A running fleet.
#[derive(Debug)]
pub(super) struct Fleet {
    pub control: Arc<Control>,
    groups: Vec<Arc<Mutex<GroupState>>>,
    links: Vec<Arc<MqttLink>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    total_gateways: u64,
}

fn lock(s: &Mutex<GroupState>) -> std::sync::MutexGuard<'_, GroupState> {
    s.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Fleet {
    /// Connects every group and subscribes its gateways' ack topics; the fleet seals
    /// nothing until the phase is [`SEALING`].
    pub(super) fn start(
        rt: &tokio::runtime::Runtime,
        plan: Arc<Plan>,
        gateways: &[FleetGateway],
        connections: &[Connection],
        ack_verifier: &AckVerifier,
    ) -> Result<Fleet, String> {
        let control = Arc::new(Control::default());
        let mut rng = StdRng::seed_from_u64(plan.seed ^ 0x5_eedf_1ee7);
        let n = gateways.len().max(1);
        let (mut groups, mut links, mut tasks) = (Vec::new(), Vec::new(), Vec::new());
        let _guard = rt.enter();
        for (c, conn) in connections.iter().enumerate() {
            let mut sims = Vec::new();
            for k in conn.gateways.clone() {
                let g = &gateways[k];
                let incarnation = rng.next_u64();
                let forger_key = ed25519_dalek::SigningKey::generate(&mut rng);
                let forged_incarnation = rng.next_u64();
                sims.push(SimGateway {
                    ledger: Ledger {
                        id: g.id.clone(),
                        incarnation,
                        forged_incarnation,
                        acked: Vec::new(),
                        records_per_batch: u64::from(plan.meters)
                            * u64::from(plan.fields)
                            * plan.readings,
                    },
                    sealer: Arc::new(Sealer::new(
                        g.id.clone(),
                        g.signing.clone(),
                        plan.hub_key.clone(),
                        incarnation,
                    )),
                    forger: Arc::new(Sealer::new(
                        g.id.clone(),
                        forger_key,
                        plan.hub_key.clone(),
                        forged_incarnation,
                    )),
                    subjects: Arc::new(
                        (0..plan.meters)
                            .map(|m| records::subject(g.id.as_str(), m))
                            .collect(),
                    ),
                    forged_seq: 0,
                    pending: BTreeMap::new(),
                    offset: plan.batch_every.mul_f64(k as f64 / n as f64),
                    next_seal: None,
                });
            }
            let index = sims
                .iter()
                .enumerate()
                .map(|(i, s)| (s.ledger.id.clone(), i))
                .collect();
            let state = Arc::new(Mutex::new(GroupState {
                gateways: sims,
                index,
                latencies_ms: Vec::new(),
                rng: StdRng::seed_from_u64(plan.seed.wrapping_add(c as u64 + 1)),
            }));
            let mut opts = LinkOptions::new(
                plan.broker.clone(),
                conn.client_id.clone(),
                LinkTls::Files(TlsClientFiles {
                    ca: conn.tls.ca.clone(),
                    cert: conn.tls.cert.clone(),
                    key: conn.tls.key.clone(),
                }),
            );
            opts.inflight = LINK_INFLIGHT;
            let (link, events) = MqttLink::start(opts).map_err(|e| e.to_string())?;
            let link = Arc::new(link);
            for k in conn.gateways.clone() {
                let filter = ack_topic(&gateways[k].id);
                rt.block_on(link.subscribe(&filter, QoS::AtLeastOnce))
                    .map_err(|e| e.to_string())?;
            }
            tasks.push(tokio::spawn(receive(
                events,
                state.clone(),
                control.clone(),
                plan.clone(),
                ack_verifier.clone(),
            )));
            tasks.push(tokio::spawn(send(
                link.clone(),
                state.clone(),
                control.clone(),
                plan.clone(),
            )));
            groups.push(state);
            links.push(link);
        }
        Ok(Fleet {
            control,
            groups,
            links,
            tasks,
            total_gateways: gateways.len() as u64,
        })
    }

    /// Whether every gateway's ack subscription was granted.
    pub(super) fn subscribed(&self) -> bool {
        Control::get(&self.control.subscribed) >= self.total_gateways
    }

    /// Stops every task and link; returns the ledgers and the latencies.
    pub(super) fn finish(self, rt: &tokio::runtime::Runtime) -> (Vec<Ledger>, Vec<f32>) {
        self.control.set_phase(STOPPED);
        for t in &self.tasks {
            t.abort();
        }
        for link in self.links {
            if let Ok(link) = Arc::try_unwrap(link) {
                rt.block_on(link.shutdown());
            }
        }
        let mut ledgers = Vec::new();
        let mut latencies = Vec::new();
        for g in &self.groups {
            let mut s = lock(g);
            ledgers.extend(s.gateways.iter().map(|g| g.ledger.clone()));
            latencies.append(&mut s.latencies_ms);
        }
        (ledgers, latencies)
    }
}

/// The link's events: acks, new sessions, subscription grants.
async fn receive(
    mut events: tokio::sync::mpsc::Receiver<LinkEvent>,
    state: Arc<Mutex<GroupState>>,
    ctl: Arc<Control>,
    plan: Arc<Plan>,
    verifier: AckVerifier,
) {
    while let Some(ev) = events.recv().await {
        match ev {
            LinkEvent::Publish { payload, .. } => match verifier.verify(&payload) {
                Ok(ack) => on_ack(&state, &ctl, &plan, &ack),
                Err(_) => Control::add(&ctl.bad_acks, 1),
            },
            LinkEvent::Connected { session_present } => {
                Control::add(&ctl.connects, 1);
                if !session_present {
                    // A new session: whatever was in flight may be gone; send it again now.
                    for g in &mut lock(&state).gateways {
                        for p in g.pending.values_mut() {
                            p.sent_at = None;
                        }
                    }
                }
            }
            LinkEvent::Disconnected { .. } => Control::add(&ctl.disconnects, 1),
            LinkEvent::SubAck { granted, .. } => {
                Control::add(
                    if granted {
                        &ctl.subscribed
                    } else {
                        &ctl.subscribe_refused
                    },
                    1,
                );
            }
            LinkEvent::PubAck { .. } => {}
        }
    }
}

fn on_ack(state: &Mutex<GroupState>, ctl: &Control, plan: &Plan, ack: &crate::wire::Ack) {
    let mut s = lock(state);
    let Some(&i) = s.index.get(&ack.gateway) else {
        Control::add(&ctl.bad_acks, 1);
        return;
    };
    let withhold = s.rng.gen_bool(plan.withhold_acks);
    let g = &mut s.gateways[i];
    if ack.incarnation == g.ledger.forged_incarnation {
        Control::add(&ctl.forged_acked, 1);
        return;
    }
    if ack.incarnation != g.ledger.incarnation || ack.stream != Stream::Readings {
        Control::add(&ctl.bad_acks, 1);
        return;
    }
    let Some(p) = g.pending.get(&ack.seq) else {
        Control::add(&ctl.acks_again, 1);
        return;
    };
    if withhold {
        Control::add(&ctl.acks_withheld, 1);
        return;
    }
    let (sends, sealed_at) = (p.sends, p.sealed_at);
    g.pending.remove(&ack.seq);
    if let Some(slot) = usize::try_from(ack.seq - 1)
        .ok()
        .and_then(|ix| g.ledger.acked.get_mut(ix))
    {
        *slot = true;
    }
    s.latencies_ms
        .push(sealed_at.elapsed().as_secs_f32() * 1000.0);
    ctl.pending.fetch_sub(1, Ordering::Relaxed);
    Control::add(&ctl.acked, 1);
    if sends > 1 {
        Control::add(&ctl.acks_for_resends, 1);
    }
    if ctl.phase() == SEALING {
        Control::add(&ctl.acked_in_window, 1);
    }
}

/// Seals what is due and publishes new batches and re-sends, every [`TICK`].
async fn send(
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
    let Some(start) = ctl.window_start.get().copied() else {
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
