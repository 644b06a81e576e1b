//! The gateway's uplink actor: committed batches out, end-to-end acks in.
//!
//! Committed batches are published in sequence order per stream to
//! `citygate/v1/{gateway}/{stream}` at QoS 1, priority streams (alarms, audit) first,
//! within a bounded in-flight window. A batch is deleted from the store only when the
//! hub's ack arrives on `citygate/v1/{gateway}/ack` — a broker PUBACK deletes nothing.
//! After every (re)connect and whenever an ack is overdue, everything unacknowledged is
//! sent again from the store: rumqttc's in-memory session is not trusted (it drops
//! in-flight publishes when the broker answers `session_present = 0`); the hub
//! de-duplicates on (gateway, stream, seq).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::mqtt::{LinkEvent, MqttLink, QoS};
use crate::pipeline::CommittedMarks;
use crate::reading::{now_ms, GatewayId, Stream};
use crate::store::{Outbox, StoredBatch};
use crate::telemetry::Metrics;
use crate::wire::{ack_topic, stream_topic, Ack, AckVerifier};

/// Sending order: priority streams first.
const PRIORITY: [Stream; 3] = [Stream::Alarms, Stream::Audit, Stream::Readings];

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
    /// Next sequence number to consider per stream (by code).
    cursor: [u64; 3],
    in_flight: BTreeMap<(u8, u64), Instant>,
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
            cursor: [0; 3],
            in_flight: BTreeMap::new(),
        }
    }

    pub(crate) async fn run(mut self) {
        let acks = ack_topic(&self.gateway);
        if let Err(e) = self.link.subscribe(&acks, QoS::AtLeastOnce).await {
            warn!(error = %e, "cannot subscribe to acks");
        }
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
            LinkEvent::Publish { topic, payload } if topic == acks => {
                match self.verifier.verify(&payload) {
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
                }
            }
            _ => {}
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
        self.cursor = [0; 3];
    }

    fn check_overdue(&mut self) {
        let now = Instant::now();
        if self
            .in_flight
            .values()
            .any(|sent| now.duration_since(*sent) > self.opts.ack_timeout)
        {
            warn!(
                in_flight = self.in_flight.len(),
                "acks overdue; re-sending from the store"
            );
            self.resend_all();
        }
    }

    /// Publishes committed batches until the window is full.
    async fn send_more(&mut self) {
        if !self.connected {
            return;
        }
        let marks = *self.committed_rx.borrow();
        for stream in PRIORITY {
            let i = usize::from(stream.code());
            let room = self.opts.window.saturating_sub(self.in_flight.len());
            if room == 0 {
                return;
            }
            if self.cursor[i] > marks[i] {
                continue;
            }
            let batches: Vec<StoredBatch> =
                match self.outbox.peek(stream, self.cursor[i], room).await {
                    Ok(b) => b,
                    Err(e) => {
                        warn!(error = %e, "reading the store failed");
                        return;
                    }
                };
            for b in batches.into_iter().filter(|b| b.seq <= marks[i]) {
                let topic = stream_topic(&self.gateway, stream);
                if let Err(e) =
                    self.link
                        .try_publish(&topic, QoS::AtLeastOnce, Bytes::from(b.bytes))
                {
                    debug!(error = %e, "publish queue full; retrying later");
                    return;
                }
                self.metrics.batches_sent.inc();
                self.in_flight
                    .insert((stream.code(), b.seq), Instant::now());
                self.cursor[i] = b.seq + 1;
            }
        }
    }
}
