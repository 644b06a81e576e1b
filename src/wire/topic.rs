//! MQTT topics between gateways and hubs, written and parsed in one place.
//!
//! | topic | publisher | payload |
//! |---|---|---|
//! | `citygate/v1/{gateway}/{stream}` (`readings`, `alarms`, `audit`) | gateway | a sealed batch (`seal`) |
//! | `citygate/v1/{gateway}/ack` | hub | an [`Ack`](super::Ack) |
//! | `citygate/hub/presence/{hub}` (retained) | hub | a [`Presence`](super::Presence) |
//!
//! Hubs subscribe through a shared subscription, `$share/{group}/citygate/v1/+/{stream}`, so
//! several hub processes can split the load behind one broker cluster.

use crate::reading::{GatewayId, Stream};

/// First two levels of every citygate topic.
const PREFIX: &str = "citygate/v1";

/// The topic a gateway publishes `stream`'s batches on.
pub fn stream_topic(gateway: &GatewayId, stream: Stream) -> String {
    format!("{PREFIX}/{gateway}/{stream}")
}

/// The topic the hub acknowledges a gateway's batches on.
pub fn ack_topic(gateway: &GatewayId) -> String {
    format!("{PREFIX}/{gateway}/ack")
}

/// First levels of every presence topic.
const PRESENCE_PREFIX: &str = "citygate/hub/presence";

/// The topic hub `hub` announces itself on.
pub fn presence_topic(hub: &str) -> String {
    format!("{PRESENCE_PREFIX}/{hub}")
}

/// The filter gateways subscribe to: every hub's presence.
pub fn presence_filter() -> String {
    format!("{PRESENCE_PREFIX}/+")
}

/// The hub id of a presence topic `citygate/hub/presence/{hub}` with a valid id.
pub fn parse_presence_topic(topic: &str) -> Option<&str> {
    let hub = topic.strip_prefix(PRESENCE_PREFIX)?.strip_prefix('/')?;
    GatewayId::new(hub).ok().map(|_| hub)
}

/// The subscription filters of a hub in share group `group`, one per stream.
pub fn hub_filters(group: &str) -> Vec<String> {
    Stream::ALL
        .iter()
        .map(|s| format!("$share/{group}/{PREFIX}/+/{s}"))
        .collect()
}

/// The gateway and stream named by a batch topic `citygate/v1/{gateway}/{stream}`; `None`
/// for anything else (the ack topic, other prefixes, invalid gateway ids, extra levels).
pub fn parse_stream_topic(topic: &str) -> Option<(GatewayId, Stream)> {
    let rest = topic.strip_prefix(PREFIX)?.strip_prefix('/')?;
    let (gateway, stream) = rest.split_once('/')?;
    let stream = Stream::ALL.into_iter().find(|s| s.as_str() == stream)?;
    Some((GatewayId::new(gateway).ok()?, stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_topics_parse_back_and_nothing_else_does() {
        let gw = GatewayId::new("gw-1").unwrap();
        for s in Stream::ALL {
            assert_eq!(
                parse_stream_topic(&stream_topic(&gw, s)),
                Some((gw.clone(), s))
            );
        }
        assert_eq!(ack_topic(&gw), "citygate/v1/gw-1/ack");
        assert!(parse_stream_topic(&ack_topic(&gw)).is_none());
        assert!(parse_stream_topic("citygate/v1/gw 1/readings").is_none());
        assert!(parse_stream_topic("citygate/v2/gw-1/readings").is_none());
        assert!(parse_stream_topic("citygate/v1/gw-1/readings/x").is_none());
        assert!(parse_stream_topic("citygate/v1gw-1/readings").is_none());
        assert_eq!(hub_filters("hubs")[0], "$share/hubs/citygate/v1/+/readings");
        assert_eq!(presence_topic("hub-1"), "citygate/hub/presence/hub-1");
        assert_eq!(presence_filter(), "citygate/hub/presence/+");
        assert_eq!(
            parse_presence_topic("citygate/hub/presence/hub-1"),
            Some("hub-1")
        );
        assert_eq!(parse_presence_topic("citygate/hub/presence/a/b"), None);
        assert_eq!(parse_presence_topic("citygate/v1/gw/ack"), None);
        // Outside the hubs' batch filters.
        assert!(parse_stream_topic(&presence_topic("hub-1")).is_none());
    }
}
