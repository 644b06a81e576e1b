//! The hub's MQTT side: batches in from a shared subscription, acks out.
//!
//! Subscribes to `$share/{group}/citygate/v1/+/{readings,alarms,audit}` so several hub
//! processes can split the load behind one broker cluster, feeds every payload to
//! [`Hub::ingest`] (on a blocking thread: it writes and syncs), and publishes the
//! returned ack on `citygate/v1/{gateway}/ack`. A payload on a topic that names no
//! valid gateway is counted and dropped.
//!
//! Readiness: `subscribed_tx` holds true while the broker has granted every filter in the
//! current session (one granted SUBACK per filter since the CONNACK that started it, or
//! a resumed session that had them), false before and while disconnected. Batches
//! published while it is false may reach no hub.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Hub, Ingest};
use crate::reading::{GatewayId, Stream};
use crate::uplink::{ack_topic, LinkEvent, MqttLink, QoS};

/// The subscription filters of a hub in share group `group`.
pub fn filters(group: &str) -> Vec<String> {
    Stream::ALL
        .iter()
        .map(|s| format!("$share/{group}/citygate/v1/+/{s}"))
        .collect()
}

/// The gateway named by a batch topic `citygate/v1/{gateway}/{stream}`.
pub fn topic_gateway(topic: &str) -> Option<GatewayId> {
    let mut parts = topic.split('/');
    match (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) {
        (Some("citygate"), Some("v1"), Some(gw), Some(stream), None)
            if Stream::ALL.iter().any(|s| s.as_str() == stream) =>
        {
            GatewayId::new(gw).ok()
        }
        _ => None,
    }
}

/// Runs the hub over `link` until `shutdown` is cancelled or the link's events end,
/// reporting on `subscribed_tx` whether its subscriptions are in place.
pub async fn serve(
    hub: Arc<Hub>,
    link: MqttLink,
    mut events_rx: mpsc::Receiver<LinkEvent>,
    group: String,
    subscribed_tx: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let filters = filters(&group);
    for f in &filters {
        if let Err(e) = link.subscribe(f, QoS::AtLeastOnce).await {
            warn!(filter = %f, error = %e, "hub subscribe failed");
        }
    }
    info!(group = %group, "hub serving");
    let mut granted = 0;
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => break,
            e = events_rx.recv() => match e { Some(e) => e, None => break },
        };
        let (topic, payload) = match event {
            LinkEvent::Publish { topic, payload } => (topic, payload),
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
                }
                continue;
            }
            LinkEvent::SubAck { granted: false, .. } => {
                warn!(group = %group, "hub subscription refused by the broker");
                continue;
            }
            LinkEvent::PubAck { .. } => continue,
        };
        let Some(gateway) = topic_gateway(&topic) else {
            warn!(topic = %topic, "payload on an unexpected topic dropped");
            continue;
        };
        let h = hub.clone();
        let gw = gateway.clone();
        let outcome = match tokio::task::spawn_blocking(move || h.ingest(&gw, &payload)).await {
            Ok(o) => o,
            Err(e) => {
                warn!(error = %e, "ingest task failed");
                continue;
            }
        };
        if let Ingest::Rejected { .. } = outcome {
            continue; // logged and counted by the hub
        }
        if let Some(ack) = outcome.ack() {
            let payload = Bytes::from(ack.encode());
            if let Err(e) = link
                .publish(&ack_topic(&gateway), QoS::AtLeastOnce, payload)
                .await
            {
                warn!(gateway = %gateway, error = %e, "ack publish failed; the gateway will re-send");
            }
        }
    }
    link.shutdown().await;
    info!("hub stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_name_their_gateway() {
        assert_eq!(
            topic_gateway("citygate/v1/gw-1/readings").unwrap().as_str(),
            "gw-1"
        );
        assert!(topic_gateway("citygate/v1/gw-1/ack").is_none());
        assert!(topic_gateway("citygate/v1/gw 1/readings").is_none());
        assert!(topic_gateway("citygate/v2/gw-1/readings").is_none());
        assert!(topic_gateway("citygate/v1/gw-1/readings/x").is_none());
        assert_eq!(filters("hubs")[0], "$share/hubs/citygate/v1/+/readings");
    }
}
