//! Hub presence: a hub says on `citygate/hub/presence/{hub}` whether it is online, so that
//! gateways re-send their unacknowledged batches the moment a hub is back instead of after
//! their `ack_timeout`.
//!
//! # Wire encoding, version 1
//!
//! One UTF-8 JSON object, no trailing newline, published **retained** at QoS 1:
//!
//! ```text
//! {"v":1,"hub":"hub-1","state":"online","session":"9f2c0a17d4e5b6c8"}
//! ```
//!
//! | member    | type                              | meaning |
//! |-----------|-----------------------------------|---------|
//! | `v`       | integer, must be 1                | presence format version |
//! | `hub`     | string, a hub id (gateway-id characters) | the hub (also the topic's last level) |
//! | `state`   | `"online"` or `"offline"`         | see below |
//! | `session` | string, 16 lowercase hex digits, or absent | random per connection of the hub; absent in the last will |
//!
//! A hub publishes `online` with a fresh random `session` each time the broker has granted
//! all of its batch subscriptions (after the SUBACKs, never before: batches re-sent on its
//! word before that would reach no hub). It sets `offline` (without a session) as its
//! retained last will at connect, and publishes it explicitly on a clean shutdown.
//!
//! The topic lies outside `citygate/v1/+/+`, the hubs' batch filters, so a hub never
//! receives presence as a batch. Only the hub role may publish it; gateways may subscribe
//! to `citygate/hub/presence/+` (broker access rules, `mqtt::broker::access` and
//! `mqtt::acl`). Readers reject another `v`, a topic/payload hub mismatch, payloads above
//! [`MAX_PRESENCE_BYTES`] and anything malformed; decoding never panics.

use serde::{Deserialize, Serialize};

/// The presence format version written in `v`.
pub const PRESENCE_VERSION: u8 = 1;
/// Longest presence payload accepted.
pub const MAX_PRESENCE_BYTES: usize = 256;
/// What a hub says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    pub hub: String,
    /// `Some(session)` online, `None` offline.
    pub online: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct WirePresence {
    v: u64,
    hub: String,
    state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    session: Option<String>,
}

/// Why a presence payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("presence message is not valid: {0}")]
pub struct PresenceError(pub String);

impl Presence {
    /// The payload of this presence.
    pub fn encode(&self) -> Vec<u8> {
        let wire = WirePresence {
            v: u64::from(PRESENCE_VERSION),
            hub: self.hub.clone(),
            state: if self.online.is_some() {
                "online"
            } else {
                "offline"
            }
            .to_owned(),
            session: self.online.map(|s| format!("{s:016x}")),
        };
        serde_json::to_vec(&wire).expect("invariant: a presence always serialises")
    }

    /// Decodes a payload received on the presence topic of `topic_hub`.
    pub fn decode(topic_hub: &str, payload: &[u8]) -> Result<Presence, PresenceError> {
        let bad = |m: &str| PresenceError(m.to_owned());
        if payload.len() > MAX_PRESENCE_BYTES {
            return Err(bad("too long"));
        }
        let wire: WirePresence =
            serde_json::from_slice(payload).map_err(|e| PresenceError(e.to_string()))?;
        if wire.v != u64::from(PRESENCE_VERSION) {
            return Err(PresenceError(format!("unknown version {}", wire.v)));
        }
        if wire.hub != topic_hub {
            return Err(bad("hub differs from the topic's"));
        }
        let session = match wire.session.as_deref() {
            Some(s) if s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit()) => {
                Some(u64::from_str_radix(s, 16).map_err(|e| PresenceError(e.to_string()))?)
            }
            Some(_) => return Err(bad("session is not 16 hex digits")),
            None => None,
        };
        let online = match (wire.state.as_str(), session) {
            ("online", Some(s)) => Some(s),
            ("online", None) => return Err(bad("online without a session")),
            ("offline", _) => None,
            _ => return Err(bad("state is neither online nor offline")),
        };
        Ok(Presence {
            hub: wire.hub,
            online,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_round_trips_and_rejects_what_it_must() {
        let online = Presence {
            hub: "hub-1".into(),
            online: Some(0x9f2c_0a17_d4e5_b6c8),
        };
        let bytes = online.encode();
        assert_eq!(
            std::str::from_utf8(&bytes).unwrap(),
            r#"{"v":1,"hub":"hub-1","state":"online","session":"9f2c0a17d4e5b6c8"}"#
        );
        assert_eq!(Presence::decode("hub-1", &bytes).unwrap(), online);
        let offline = Presence {
            hub: "hub-1".into(),
            online: None,
        };
        assert_eq!(
            Presence::decode("hub-1", &offline.encode()).unwrap(),
            offline
        );
        assert!(Presence::decode("hub-2", &bytes).is_err());
        for bad in [
            &br#"{"v":2,"hub":"hub-1","state":"online","session":"9f2c0a17d4e5b6c8"}"#[..],
            br#"{"v":1,"hub":"hub-1","state":"online"}"#,
            br#"{"v":1,"hub":"hub-1","state":"away"}"#,
            br#"{"v":1,"hub":"hub-1","state":"online","session":"xyz"}"#,
            br#"not json"#,
            &[0xff; 300],
        ] {
            assert!(Presence::decode("hub-1", bad).is_err());
        }
    }
}
