//! What gateways and hubs say to each other over MQTT, besides the sealed batch itself
//! (`seal` owns that format): the topic layout ([`topic`]), the hub's end-to-end
//! acknowledgement ([`ack`]) and the hub's presence ([`presence`]). Both sides use this
//! module, so neither depends on the other.

mod ack;
mod presence;
mod topic;

pub use ack::{Ack, AckError, AckSigner, AckVerifier, ACK_VERSION, MAX_ACK_BYTES};
pub use presence::{Presence, PresenceError, MAX_PRESENCE_BYTES, PRESENCE_VERSION};
pub use topic::{
    ack_topic, hub_filters, parse_presence_topic, parse_stream_topic, presence_filter,
    presence_topic, stream_topic,
};
