//! The hub's MQTT side: batches in from a shared subscription, acks out.
//!
//! Subscribes to the hubs' shared subscription (`wire::hub_filters`) so several hub
//! processes can split the load behind one broker cluster, feeds the payloads to
//! [`Hub::ingest_group`] (on a blocking thread: it writes and syncs, or runs a database
//! transaction) — every batch already waiting, up to [`MAX_GROUP_BATCHES`] or
//! [`MAX_GROUP_BYTES`], as one group with one sink commit, so a backlog drains at the rate of
//! groups, not of syncs — and publishes each returned ack on `citygate/v1/{gateway}/ack`. A
//! payload on a topic that names no valid gateway is counted and dropped.
//!
//! Groups commit one at a time, or as many at once as the sink has database connections
//! (`[sink] connections`); acks go out as each group's commit returns.
//!
//! Back-pressure: while groups commit, the service keeps reading batches into a queue,
//! up to `[sink] max_in_flight` batches held in all (committing and waiting; the
//! `citygate_hub_sink_in_flight` gauge). At that bound it stops reading from the link, whose
//! bounded channel then stops the MQTT client reading from the broker (TCP flow control): a
//! slow or failing database slows intake instead of growing memory. Nothing is acknowledged
//! before its commit, so batches dropped at shutdown or failed by the sink are re-sent.
//!
//! Acks and the presence go out through a queue that the service publishes from beside the
//! link's events, one message at a time: a publish waits while the MQTT client's request
//! queue is full, and the client empties it only while its events are read (PUBACKs free its
//! in-flight window), so neither a commit nor the reading may ever wait for a publish. Past
//! [`MAX_QUEUED_ACKS`] acks are dropped and counted (`citygate_hub_acks_dropped_total`); the
//! gateway re-sends and is acknowledged as a duplicate.
//!
//! Readiness: `subscribed_tx` holds true while the broker has granted every filter in the
//! current session (one granted SUBACK per filter since the CONNACK that started it, or
//! a resumed session that had them), false before and while disconnected. Batches
//! published while it is false may reach no hub.
//!
//! Presence (`wire::presence`): each time the subscriptions become granted, the hub
//! publishes a retained `online` with a fresh random session id on
//! `citygate/hub/presence/{hub}`, so gateways re-send what they hold unacknowledged at
//! once (batches they sent before reached no hub). Its link carries the retained `offline`
//! last will ([`offline_will`]); a clean shutdown publishes `offline` itself (a DISCONNECT
//! discards the will).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use std::task::Poll;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Hub, Ingest};
use crate::mqtt::{LinkEvent, MqttLink, QoS};
use crate::reading::GatewayId;
use crate::wire::{ack_topic, hub_filters, parse_stream_topic, presence_topic, Presence};

/// The hub link's last will: topic and retained `offline` payload.
pub(crate) fn offline_will(hub_id: &str) -> (String, Bytes) {
    let offline = Presence {
        hub: hub_id.to_owned(),
        online: None,
    };
    (presence_topic(hub_id), Bytes::from(offline.encode()))
}

/// A message for the broker.
#[derive(Debug)]
enum Outgoing {
    /// The signed ack of a batch, for its gateway.
    Ack { gateway: GatewayId, payload: Bytes },
    /// The hub's retained presence: `Some(session)` online, `None` offline.
    Presence(Option<u64>),
}

/// Publishes one message. It waits while the MQTT client's request queue is full, so the
/// service polls it beside the link's events, never instead of them (see [`serve`]).
async fn publish(link: &MqttLink, hub_id: &str, out: Outgoing) {
    match out {
        Outgoing::Ack { gateway, payload } => {
            if let Err(e) = link
                .publish(&ack_topic(&gateway), QoS::AtLeastOnce, payload)
                .await
            {
                warn!(gateway = %gateway, error = %e, "ack publish failed; the gateway will re-send");
            }
        }
        Outgoing::Presence(session) => {
            let presence = Presence {
                hub: hub_id.to_owned(),
                online: session,
            };
            let payload = Bytes::from(presence.encode());
            match link
                .publish_retained(&presence_topic(hub_id), QoS::AtLeastOnce, payload)
                .await
            {
                Ok(()) => match session {
                    Some(s) => info!(session = format_args!("{s:016x}"), "hub presence: online"),
                    None => info!("hub presence: offline"),
                },
                Err(e) => warn!(error = %e, "hub presence not published"),
            }
        }
    }
}

/// Most acks waiting to be published; beyond it an ack is dropped (counted): its gateway
/// re-sends the batch after its ack timeout and gets the ack of the duplicate.
const MAX_QUEUED_ACKS: usize = 8192;
/// How long a stopping hub still publishes the acks of what it committed, and its presence.
const STOP_PUBLISH_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Most batches ingested as one group.
const MAX_GROUP_BATCHES: usize = 64;
/// A group is closed once its sealed payloads reach this many bytes (its JSON Lines stay well
/// inside the tail the sink's crash recovery scans).
const MAX_GROUP_BYTES: usize = 64 * 1024;

/// Ingests one group of payloads on a blocking thread and returns the acks to publish.
async fn ingest_group(hub: Arc<Hub>, group: Vec<(String, Bytes)>) -> Vec<Outgoing> {
    let mut items = Vec::with_capacity(group.len());
    for (topic, payload) in group {
        match parse_stream_topic(&topic) {
            Some((gateway, _stream)) => items.push((gateway, payload)),
            None => {
                if hub.log_limiter().allow("unexpected_topic") {
                    warn!(topic = %topic, "payload on an unexpected topic dropped");
                }
            }
        }
    }
    if items.is_empty() {
        return Vec::new();
    }
    let h = hub.clone();
    let outcomes = tokio::task::spawn_blocking(move || {
        let refs: Vec<_> = items.iter().map(|(g, p)| (g.clone(), &p[..])).collect();
        h.ingest_group(&refs)
    })
    .await;
    let outcomes = match outcomes {
        Ok(o) => o,
        Err(e) => {
            warn!(error = %e, "ingest task failed");
            return Vec::new();
        }
    };
    // Rejections carry no ack; they are logged and counted by the hub.
    outcomes
        .iter()
        .filter_map(Ingest::ack)
        .map(|ack| Outgoing::Ack {
            gateway: ack.gateway.clone(),
            payload: Bytes::from(hub.ack_payload(ack)),
        })
        .collect()
}

/// Queues a committed group's acks behind those waiting; past [`MAX_QUEUED_ACKS`] an ack is
/// dropped and counted.
fn queue_acks(hub: &Hub, outgoing: &mut VecDeque<Outgoing>, acks: Vec<Outgoing>) {
    for ack in acks {
        if outgoing.len() < MAX_QUEUED_ACKS {
            outgoing.push_back(ack);
        } else {
            hub.sink_stats().ack_dropped();
            if hub.log_limiter().allow("ack_dropped") {
                warn!("ack queue full: ack dropped; the gateway re-sends the batch and gets the ack of the duplicate");
            }
        }
    }
}

/// One group being committed: its ingest (the commit, giving the acks) and how many batches
/// it holds.
type Committing = (Pin<Box<dyn Future<Output = Vec<Outgoing>> + Send>>, usize);
/// The first of `committing` to finish (removed from it): its acks and batch count. Pending
/// while `committing` is empty.
fn next_committed(
    committing: &mut Vec<Committing>,
) -> impl Future<Output = (Vec<Outgoing>, usize)> + '_ {
    std::future::poll_fn(move |cx| {
        for i in 0..committing.len() {
            if let Poll::Ready(acks) = committing[i].0.as_mut().poll(cx) {
                let (_, n) = committing.swap_remove(i);
                return Poll::Ready((acks, n));
            }
        }
        Poll::Pending
    })
}

/// The message being published.
type Publishing<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// Runs hub `hub_id` over `link` until `shutdown` is cancelled or the link's events end,
/// reporting on `subscribed_tx` whether its subscriptions are in place and announcing its
/// presence once they are. At most `max_in_flight` batches are held (committing or waiting);
/// beyond that the hub stops reading from the broker.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    hub: Arc<Hub>,
    link: MqttLink,
    mut events_rx: mpsc::Receiver<LinkEvent>,
    group: String,
    hub_id: String,
    max_in_flight: usize,
    subscribed_tx: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let filters = hub_filters(&group);
    for f in &filters {
        if let Err(e) = link.subscribe(f, QoS::AtLeastOnce).await {
            warn!(filter = %f, error = %e, "hub subscribe failed");
        }
    }
    info!(group = %group, "hub serving");
    let mut granted = 0;
    // Batches read from the broker, not yet in a group.
    let mut waiting: VecDeque<(String, Bytes)> = VecDeque::new();
    // Groups being committed, each giving its acks and how many batches it held.
    let parallel = hub.parallel_commits();
    let mut committing: Vec<Committing> = Vec::new();
    // Acks and presence waiting for the broker, and the one being published.
    let mut outgoing: VecDeque<Outgoing> = VecDeque::new();
    let mut publishing: Option<Publishing<'_>> = None;
    loop {
        while committing.len() < parallel && !waiting.is_empty() {
            // Batches already waiting are taken as one group: one sink sync or transaction.
            let mut group = Vec::new();
            let mut group_bytes = 0;
            while group.len() < MAX_GROUP_BATCHES && group_bytes < MAX_GROUP_BYTES {
                let Some(item) = waiting.pop_front() else {
                    break;
                };
                group_bytes += item.1.len();
                group.push(item);
            }
            let n = group.len();
            committing.push((Box::pin(ingest_group(hub.clone(), group)), n));
        }
        if publishing.is_none() {
            if let Some(out) = outgoing.pop_front() {
                publishing = Some(Box::pin(publish(&link, &hub_id, out)));
            }
        }
        let held = waiting.len() + committing.iter().map(|c| c.1).sum::<usize>();
        // The link's events are read whatever is being committed or published: the MQTT
        // client stops taking publishes while its events wait (PUBACKs among them), so a
        // commit or publish that waited for the link while the link waited for this loop
        // would stop the hub for good. Only the in-flight bound stops the reading.
        let event = tokio::select! {
            _ = shutdown.cancelled() => break,
            (acks, n) = next_committed(&mut committing), if !committing.is_empty() => {
                hub.sink_stats().release(n);
                queue_acks(&hub, &mut outgoing, acks);
                continue;
            }
            () = async { publishing.as_mut().expect("invariant: guarded").as_mut().await },
                if publishing.is_some() => {
                publishing = None;
                continue;
            }
            e = events_rx.recv(), if held < max_in_flight => match e { Some(e) => e, None => break },
        };
        match event {
            LinkEvent::Publish { topic, payload, .. } => {
                hub.sink_stats().take(1);
                waiting.push_back((topic, payload));
            }
            LinkEvent::Connected { session_present } => {
                if !session_present {
                    granted = 0;
                }
                subscribed_tx.send_replace(granted >= filters.len());
            }
            LinkEvent::Disconnected { .. } => {
                subscribed_tx.send_replace(false);
            }
            LinkEvent::SubAck { granted: true, .. } => {
                granted += 1;
                if granted == filters.len() {
                    subscribed_tx.send_replace(true);
                    info!(group = %group, "hub subscribed");
                    outgoing.push_front(Outgoing::Presence(Some(rand::random())));
                }
            }
            LinkEvent::SubAck { granted: false, .. } => {
                warn!(group = %group, "hub subscription refused by the broker");
            }
            LinkEvent::PubAck { .. } => {}
        }
    }
    // The groups being committed finish; their acks and those still queued go out within a
    // grace period (the link's events are no longer read, so the broker may stop taking
    // them). Waiting batches are not acknowledged: their gateways re-send them.
    while !committing.is_empty() {
        let (acks, n) = next_committed(&mut committing).await;
        hub.sink_stats().release(n);
        queue_acks(&hub, &mut outgoing, acks);
    }
    hub.sink_stats().release(waiting.len());
    if *subscribed_tx.borrow() {
        outgoing.push_back(Outgoing::Presence(None));
    }
    let drain = async {
        if let Some(p) = publishing.take() {
            p.await;
        }
        while let Some(out) = outgoing.pop_front() {
            publish(&link, &hub_id, out).await;
        }
    };
    if tokio::time::timeout(STOP_PUBLISH_GRACE, drain)
        .await
        .is_err()
    {
        warn!("acks or presence not published before the stop; gateways re-send what was not acknowledged");
    }
    drop(publishing);
    link.shutdown().await;
    hub.log_limiter().flush();
    info!("hub stopped");
}
