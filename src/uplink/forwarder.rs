//! The gateway's uplink actor: committed batches out, end-to-end acks in.
//!
//! Committed batches are published to `citygate/v1/{gateway}/{stream}` at QoS 1, priority
//! streams (alarms, audit) first, within a bounded in-flight window that live data and a
//! backlog share ([`super::lanes`]). A batch is deleted from the store only when the hub's
//! ack arrives on `citygate/v1/{gateway}/ack` — a broker PUBACK deletes nothing.
//!
//! Everything unacknowledged is sent again from the store (the hub de-duplicates on
//! (gateway, stream, incarnation, seq)):
//! - after every (re)connect: rumqttc's in-memory session is not trusted (it drops in-flight
//!   publishes when the broker answers `session_present = 0`). With a new session nothing
//!   is published until the broker has acknowledged both subscriptions (acks, hub
//!   presence; at most [`SUBSCRIBE_HOLD`]), so no ack for a re-sent batch is missed and
//!   the hubs' retained presence is known first;
//! - when a hub session comes online live ([`super::presence`] has the rule): the
//!   batches sent while no hub was subscribed were dropped by the broker;
//! - when an ack is overdue (`ack_timeout`), the fallback for everything else.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::lanes::{live_reserve, InFlight, Lane, Lanes};
use super::presence::{HubWatch, Verdict};
use crate::mqtt::{LinkEvent, MqttLink, QoS};
use crate::pipeline::CommittedMarks;
use crate::reading::{now_ms, GatewayId};
use crate::store::{Outbox, StoredBatch};
use crate::telemetry::Metrics;
use crate::wire::{
    ack_topic, parse_presence_topic, presence_filter, stream_topic, Ack, AckVerifier, Presence,
};

/// The forwarder's subscriptions: its acks and the hubs' presence.
const SUBSCRIPTIONS: usize = 2;
/// Longest wait for the SUBACKs of a new session before sending anyway.
pub(crate) const SUBSCRIBE_HOLD: Duration = Duration::from_secs(2);

/// Flow control of the uplink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ForwarderOptions {
    /// Most batches published and not yet acknowledged by the hub.
    pub window: usize,
    /// After this long without the oldest ack, everything unacked is sent again.
    pub ack_timeout: Duration,
}

impl Default for ForwarderOptions {
    fn default() -> Self {
        Self {
            window: 16,
            ack_timeout: Duration::from_secs(10),
        }
    }
}

/// Publishes committed batches and deletes them on the hub's ack.
#[derive(Debug)]
pub(crate) struct Forwarder {
    gateway: GatewayId,
    outbox: Outbox,
    /// Only acks the hub signed delete anything.
    verifier: AckVerifier,
    link: MqttLink,
    events_rx: mpsc::Receiver<LinkEvent>,
    committed_rx: watch::Receiver<CommittedMarks>,
    opts: ForwarderOptions,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    connected: bool,
    /// SUBACKs still awaited in this session, and since when; nothing is sent meanwhile.
    subacks_pending: usize,
    held_since: Instant,
    lanes: Lanes,
    /// Published, not yet acknowledged: when, and in which lane.
    in_flight: BTreeMap<(u8, u64), (Instant, Lane)>,
    hubs: HubWatch,
}

impl Forwarder {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        gateway: GatewayId,
        outbox: Outbox,
        verifier: AckVerifier,
        link: MqttLink,
        events_rx: mpsc::Receiver<LinkEvent>,
        committed_rx: watch::Receiver<CommittedMarks>,
        opts: ForwarderOptions,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            gateway,
            outbox,
            verifier,
            link,
            events_rx,
            committed_rx,
            opts,
            metrics,
            shutdown,
            connected: false,
            subacks_pending: 0,
            held_since: Instant::now(),
            lanes: Lanes::default(),
            in_flight: BTreeMap::new(),
            hubs: HubWatch::default(),
        }
    }

    pub(crate) async fn run(mut self) {
        let acks = ack_topic(&self.gateway);
        for filter in [&acks, &presence_filter()] {
            if let Err(e) = self.link.subscribe(filter, QoS::AtLeastOnce).await {
                warn!(%filter, error = %e, "uplink cannot subscribe");
            }
        }
        let marks = *self.committed_rx.borrow();
        self.lanes.restart(marks);
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut committer_gone = false;
        let mut reported_in_flight = 0;
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                event = self.events_rx.recv() => match event {
                    Some(e) => self.on_event(e, &acks).await,
                    None => break,
                },
                changed = self.committed_rx.changed(), if !committer_gone => {
                    // The committer is gone (shutdown): keep serving acks until cancelled.
                    committer_gone = changed.is_err();
                }
                _ = tick.tick() => self.check_overdue(),
            }
            self.send_more().await;
            let n = self.in_flight.len() as u64;
            if n != reported_in_flight {
                reported_in_flight = n;
                self.metrics.update_link(|l| l.in_flight = n);
            }
        }
        self.link.shutdown().await;
        info!(in_flight = self.in_flight.len(), "uplink stopped");
    }

    async fn on_event(&mut self, event: LinkEvent, acks: &str) {
        match event {
            LinkEvent::Connected { session_present } => {
                info!(
                    session_present,
                    "uplink connected; re-sending everything unacknowledged"
                );
                self.connected = true;
                self.subacks_pending = if session_present { 0 } else { SUBSCRIPTIONS };
                self.held_since = Instant::now();
                self.metrics.update_link(|l| {
                    l.connected = true;
                    l.since_ms = Some(now_ms());
                    l.connects += 1;
                });
                self.resend_all();
            }
            LinkEvent::Disconnected { error, .. } => {
                if self.connected {
                    warn!(error = %error, "uplink disconnected");
                }
                let was = self.connected;
                self.metrics.update_link(|l| {
                    l.connected = false;
                    if was || l.since_ms.is_none() {
                        l.since_ms = Some(now_ms());
                    }
                    l.last_error = Some(error.to_string());
                });
                self.connected = false;
            }
            LinkEvent::SubAck { granted, .. } => {
                self.subacks_pending = self.subacks_pending.saturating_sub(1);
                if !granted {
                    warn!("uplink subscription refused by the broker (acks or hub presence); check its access rules");
                }
            }
            LinkEvent::Publish {
                topic,
                payload,
                retain,
            } if topic != acks => self.on_presence(&topic, &payload, retain),
            LinkEvent::Publish { payload, .. } => match self.verifier.verify(&payload) {
                Ok(ack)
                    if ack.gateway == self.gateway
                        && ack.incarnation == self.outbox.incarnation() =>
                {
                    self.on_ack(ack).await
                }
                Ok(ack) => {
                    self.metrics.acks_rejected.inc();
                    warn!(gateway = %ack.gateway, incarnation = format_args!("{:016x}", ack.incarnation), "signed ack for another gateway or store incarnation ignored");
                }
                Err(e) if e.is_unauthenticated() => {
                    self.metrics.acks_unauthenticated.inc();
                    warn!(error = %e, "ack without a valid hub signature ignored; nothing deleted");
                }
                Err(e) => {
                    self.metrics.acks_rejected.inc();
                    warn!(error = %e, "malformed ack ignored");
                }
            },
            _ => {}
        }
    }

    /// A message on a hub's presence topic; see [`super::presence`] for the rule.
    fn on_presence(&mut self, topic: &str, payload: &[u8], retained: bool) {
        let Some(hub) = parse_presence_topic(topic) else {
            debug!(%topic, "message on an unexpected topic ignored");
            return;
        };
        let presence = match Presence::decode(hub, payload) {
            Ok(p) => p,
            Err(e) => {
                warn!(%hub, error = %e, "hub presence ignored");
                return;
            }
        };
        let verdict = self.hubs.observe(&presence, retained);
        if let Some(status) = self.hubs.status(hub) {
            self.metrics.update_link(|l| {
                l.hubs.insert(hub.to_owned(), status);
            });
        }
        match (verdict, presence.online) {
            (Verdict::Resend, Some(session)) => {
                info!(%hub, session = format_args!("{session:016x}"), in_flight = self.in_flight.len(), "hub online; re-sending everything unacknowledged");
                self.metrics.hub_sessions.inc();
                self.metrics.presence_resends.inc();
                self.resend_all();
            }
            (Verdict::NewSession, Some(session)) => {
                info!(%hub, session = format_args!("{session:016x}"), "hub online");
                self.metrics.hub_sessions.inc();
            }
            (_, None) => info!(%hub, "hub offline"),
            (_, Some(_)) => {}
        }
    }

    async fn on_ack(&mut self, ack: Ack) {
        self.in_flight.remove(&(ack.stream.code(), ack.seq));
        match self.outbox.ack(ack.stream, ack.seq).await {
            Ok(true) => {
                self.metrics.batches_acked.inc();
                self.metrics.update_link(|l| l.last_ack_ms = Some(now_ms()));
                debug!(stream = %ack.stream, seq = ack.seq, "batch acknowledged and deleted");
            }
            Ok(false) => debug!(stream = %ack.stream, seq = ack.seq, "repeated ack"),
            Err(e) => warn!(error = %e, "deleting an acknowledged batch failed"),
        }
    }

    fn resend_all(&mut self) {
        if !self.in_flight.is_empty() {
            self.metrics.resend_rounds.inc();
        }
        self.in_flight.clear();
        let marks = *self.committed_rx.borrow();
        self.lanes.restart(marks);
    }

    fn check_overdue(&mut self) {
        let now = Instant::now();
        if self
            .in_flight
            .values()
            .any(|(sent, _)| now.duration_since(*sent) > self.opts.ack_timeout)
        {
            warn!(
                in_flight = self.in_flight.len(),
                "acks overdue; re-sending from the store"
            );
            self.resend_all();
        }
    }

    /// Publishes committed batches until the window is full ([`Lanes`] decides which).
    async fn send_more(&mut self) {
        if !self.connected {
            return;
        }
        if self.subacks_pending > 0 {
            if self.held_since.elapsed() < SUBSCRIBE_HOLD {
                return;
            }
            warn!(
                missing = self.subacks_pending,
                "no SUBACK from the broker in time; sending anyway"
            );
            self.subacks_pending = 0;
        }
        let marks = *self.committed_rx.borrow();
        let reserve = live_reserve(self.opts.window);
        loop {
            let counts = self.in_flight_by_lane();
            let Some(pull) = self
                .lanes
                .next_pull(marks, counts, self.opts.window, reserve)
            else {
                return;
            };
            let batches: Vec<StoredBatch> =
                match self.outbox.peek(pull.stream, pull.from, pull.max).await {
                    Ok(b) => b,
                    Err(e) => {
                        warn!(error = %e, "reading the store failed");
                        return;
                    }
                };
            let batches: Vec<StoredBatch> =
                batches.into_iter().filter(|b| b.seq < pull.below).collect();
            if batches.is_empty() {
                self.lanes.exhausted(&pull);
                continue;
            }
            let topic = stream_topic(&self.gateway, pull.stream);
            for b in batches {
                if let Err(e) =
                    self.link
                        .try_publish(&topic, QoS::AtLeastOnce, Bytes::from(b.bytes))
                {
                    debug!(error = %e, "publish queue full; retrying later");
                    return;
                }
                self.metrics.batches_sent.inc();
                self.in_flight
                    .insert((pull.stream.code(), b.seq), (Instant::now(), pull.lane));
                self.lanes.sent(pull.stream, pull.lane, b.seq);
            }
        }
    }

    fn in_flight_by_lane(&self) -> InFlight {
        let live = self
            .in_flight
            .values()
            .filter(|(_, lane)| *lane == Lane::Live)
            .count();
        InFlight {
            live,
            drain: self.in_flight.len() - live,
        }
    }
}
