//! The simulated gateways on one tokio runtime: connecting, subscribing, acks.
//!
//! Each MQTT connection carries a group of gateways and runs two tasks over one shared
//! group state (`state`, a `std` mutex never held across an await): the sender
//! (`sender`) seals what is due and publishes new batches and re-sends; the receiver
//! ([`receive`]) takes the link's events, verifies acks with the hub's ack key and
//! removes acked batches (or ignores a `--withhold-acks` share of them). They are apart
//! because a publish may wait on a full request queue, which only drains while the
//! link's events are read.
//!
//! A gateway seals one batch per `--batch-every`, its first offset by its index so the
//! fleet's seals spread over the period. A period whose backlog already holds `--window`
//! batches seals nothing (`skipped_seals`): the fleet offers more than the hubs take.
//! What each gateway sealed and which of its seqs were acked is its ledger, which the
//! accounting compares with the sinks.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

use super::records;
use super::sender::send;
use super::setup::{Connection, FleetGateway};
use super::state::{lock, GroupState, SimGateway, STOPPED};
pub(super) use super::state::{Control, Ledger, Plan, DRAINING, SEALING};
use crate::mqtt::{LinkEvent, LinkOptions, LinkTls, MqttLink, QoS, TlsClientFiles};
use crate::reading::Stream;
use crate::seal::Sealer;
use crate::uplink::presence::Verdict;
use crate::wire::{ack_topic, parse_presence_topic, presence_filter, AckVerifier, Presence};

/// Outgoing QoS 1 publishes in flight per connection (the broker's PUBACKs bound them).
const LINK_INFLIGHT: u16 = 200;

/// A running fleet.
#[derive(Debug)]
pub(super) struct Fleet {
    pub control: Arc<Control>,
    groups: Vec<Arc<Mutex<GroupState>>>,
    links: Vec<Arc<MqttLink>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    total_gateways: u64,
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
        // Incarnations differ between runs whatever the seed, as a new store's would: a
        // database sink keeps earlier runs' batches, and a batch key seen there is acked as
        // a duplicate without being written again.
        let run_nonce: u64 = rand::random();
        let n = gateways.len().max(1);
        let (mut groups, mut links, mut tasks) = (Vec::new(), Vec::new(), Vec::new());
        let _guard = rt.enter();
        for (c, conn) in connections.iter().enumerate() {
            let mut sims = Vec::new();
            for k in conn.gateways.clone() {
                let g = &gateways[k];
                let incarnation = rng.next_u64() ^ run_nonce;
                let forger_key = ed25519_dalek::SigningKey::generate(&mut rng);
                let forged_incarnation = rng.next_u64() ^ run_nonce;
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
                hubs: Default::default(),
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
            let acks = conn.gateways.clone().map(|k| ack_topic(&gateways[k].id));
            for filter in acks.chain([presence_filter()]) {
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

    /// Whether every gateway's ack subscription and every connection's presence
    /// subscription was granted.
    pub(super) fn subscribed(&self) -> bool {
        Control::get(&self.control.subscribed) >= self.total_gateways + self.links.len() as u64
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

/// The link's events: acks, hub presence, new sessions, subscription grants.
async fn receive(
    mut events: tokio::sync::mpsc::Receiver<LinkEvent>,
    state: Arc<Mutex<GroupState>>,
    ctl: Arc<Control>,
    plan: Arc<Plan>,
    verifier: AckVerifier,
) {
    while let Some(ev) = events.recv().await {
        match ev {
            LinkEvent::Publish {
                topic,
                payload,
                retain,
            } => match parse_presence_topic(&topic) {
                Some(hub) => on_presence(&state, &ctl, hub, &payload, retain),
                None => match verifier.verify(&payload) {
                    Ok(ack) => on_ack(&state, &ctl, &plan, &ack),
                    Err(_) => Control::add(&ctl.bad_acks, 1),
                },
            },
            LinkEvent::Connected { session_present } => {
                Control::add(&ctl.connects, 1);
                if !session_present {
                    // A new session: whatever was in flight may be gone; send it again now.
                    resend_all(&mut lock(&state));
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

/// A hub's presence: a session that comes online live re-sends the group's unacked batches
/// at once, as the uplink does (`uplink::presence`).
fn on_presence(state: &Mutex<GroupState>, ctl: &Control, hub: &str, payload: &[u8], retain: bool) {
    let Ok(presence) = Presence::decode(hub, payload) else {
        return;
    };
    let mut s = lock(state);
    if s.hubs.observe(&presence, retain) == Verdict::Resend {
        Control::add(&ctl.presence_resends, 1);
        resend_all(&mut s);
    }
}

/// Marks every unacked batch of the group unsent, so the sender sends it again now.
fn resend_all(s: &mut GroupState) {
    for g in &mut s.gateways {
        for p in g.pending.values_mut() {
            p.sent_at = None;
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
