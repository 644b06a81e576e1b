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
//! Back-pressure: while one group commits, the service keeps reading batches into a queue,
//! up to `[sink] max_in_flight` batches held in all (committing and waiting; the
//! `citygate_hub_sink_in_flight` gauge). At that bound it stops reading from the link, whose
//! bounded channel then stops the MQTT client reading from the broker (TCP flow control): a
//! slow or failing database slows intake instead of growing memory. Nothing is acknowledged
//! before its commit, so batches dropped at shutdown or failed by the sink are re-sent.
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
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Hub, Ingest};
use crate::mqtt::{LinkEvent, MqttLink, QoS};
use crate::wire::{ack_topic, hub_filters, parse_stream_topic, presence_topic, Presence};

/// The hub link's last will: topic and retained `offline` payload.
pub(crate) fn offline_will(hub_id: &str) -> (String, Bytes) {
    let offline = Presence {
        hub: hub_id.to_owned(),
        online: None,
    };
    (presence_topic(hub_id), Bytes::from(offline.encode()))
}

/// Publishes the hub's retained presence: `Some(session)` online, `None` offline.
async fn announce(link: &MqttLink, hub_id: &str, session: Option<u64>) {
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

/// Most batches ingested as one group.
const MAX_GROUP_BATCHES: usize = 64;
/// A group is closed once its sealed payloads reach this many bytes (its JSON Lines stay well
/// inside the tail the sink's crash recovery scans).
const MAX_GROUP_BYTES: usize = 64 * 1024;

/// Ingests one group of payloads on a blocking thread and publishes the acks.
async fn ingest_group(hub: &Arc<Hub>, link: &MqttLink, group: Vec<(String, Bytes)>) {
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
        return;
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
            return;
        }
    };
    // Rejections carry no ack; they are logged and counted by the hub.
    for ack in outcomes.iter().filter_map(Ingest::ack) {
        let payload = Bytes::from(hub.ack_payload(ack));
        if let Err(e) = link
            .publish(&ack_topic(&ack.gateway), QoS::AtLeastOnce, payload)
            .await
        {
            warn!(gateway = %ack.gateway, error = %e, "ack publish failed; the gateway will re-send");
        }
    }
}

/// One group being committed: its ingest (commit, then acks) and how many batches it holds.
type Committing<'a> = (Pin<Box<dyn Future<Output = ()> + Send + 'a>>, usize);

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
    let mut committing: Option<Committing<'_>> = None;
    loop {
        if committing.is_none() && !waiting.is_empty() {
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
            committing = Some((Box::pin(ingest_group(&hub, &link, group)), n));
        }
        let held = waiting.len() + committing.as_ref().map_or(0, |c| c.1);
        let event = tokio::select! {
            _ = shutdown.cancelled() => break,
            () = async { committing.as_mut().expect("invariant: guarded").0.as_mut().await },
                if committing.is_some() => {
                let n = committing.take().map_or(0, |c| c.1);
                hub.sink_stats().release(n);
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
                    announce(&link, &hub_id, Some(rand::random())).await;
                }
            }
            LinkEvent::SubAck { granted: false, .. } => {
                warn!(group = %group, "hub subscription refused by the broker");
            }
            LinkEvent::PubAck { .. } => {}
        }
    }
    // The group being committed finishes (its acks go out); waiting batches are not
    // acknowledged, so their gateways re-send them.
    if let Some((commit, n)) = committing.take() {
        commit.await;
        hub.sink_stats().release(n);
    }
    drop(committing);
    hub.sink_stats().release(waiting.len());
    if *subscribed_tx.borrow() {
        announce(&link, &hub_id, None).await;
    }
    link.shutdown().await;
    hub.log_limiter().flush();
    info!("hub stopped");
}
