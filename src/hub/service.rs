//! The hub's MQTT side: batches in from a shared subscription, acks out.
//!
//! Subscribes to the hubs' shared subscription (`wire::hub_filters`) so several hub
//! processes can split the load behind one broker cluster, feeds the payloads to
//! [`Hub::ingest_group`] (on a blocking thread: it writes and syncs) — every batch already
//! waiting in the link's event channel, up to [`MAX_GROUP_BATCHES`] or [`MAX_GROUP_BYTES`],
//! as one group with one sink sync and one de-dup flush, so a backlog drains at the rate of
//! groups, not of syncs — and publishes each returned ack on `citygate/v1/{gateway}/ack`. A payload on a topic that names no
//! valid gateway is counted and dropped.
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

/// Runs hub `hub_id` over `link` until `shutdown` is cancelled or the link's events end,
/// reporting on `subscribed_tx` whether its subscriptions are in place and announcing its
/// presence once they are.
pub async fn serve(
    hub: Arc<Hub>,
    link: MqttLink,
    mut events_rx: mpsc::Receiver<LinkEvent>,
    group: String,
    hub_id: String,
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
    // An event read while gathering a group, handled next.
    let mut pending: Option<LinkEvent> = None;
    loop {
        let event = match pending.take() {
            Some(e) => e,
            None => tokio::select! {
                _ = shutdown.cancelled() => break,
                e = events_rx.recv() => match e { Some(e) => e, None => break },
            },
        };
        let (topic, payload) = match event {
            LinkEvent::Publish { topic, payload, .. } => (topic, payload),
            LinkEvent::Connected { session_present } => {
                if !session_present {
                    granted = 0;
                }
                subscribed_tx.send_replace(granted >= filters.len());
                continue;
            }
            LinkEvent::Disconnected { .. } => {
                subscribed_tx.send_replace(false);
                continue;
            }
            LinkEvent::SubAck { granted: true, .. } => {
                granted += 1;
                if granted == filters.len() {
                    subscribed_tx.send_replace(true);
                    info!(group = %group, "hub subscribed");
                    announce(&link, &hub_id, Some(rand::random())).await;
                }
                continue;
            }
            LinkEvent::SubAck { granted: false, .. } => {
                warn!(group = %group, "hub subscription refused by the broker");
                continue;
            }
            LinkEvent::PubAck { .. } => continue,
        };
        // Batches already waiting are taken as one group: one sink sync, one de-dup flush.
        let mut group = vec![(topic, payload)];
        let mut group_bytes = group[0].1.len();
        while group.len() < MAX_GROUP_BATCHES && group_bytes < MAX_GROUP_BYTES {
            match events_rx.try_recv() {
                Ok(LinkEvent::Publish { topic, payload, .. }) => {
                    group_bytes += payload.len();
                    group.push((topic, payload));
                }
                Ok(other) => {
                    pending = Some(other);
                    break;
                }
                Err(_) => break,
            }
        }
        ingest_group(&hub, &link, group).await;
    }
    if *subscribed_tx.borrow() {
        announce(&link, &hub_id, None).await;
    }
    link.shutdown().await;
    hub.log_limiter().flush();
    info!("hub stopped");
}
