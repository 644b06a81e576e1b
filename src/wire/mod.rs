//! What gateways and hubs say to each other over MQTT, besides the sealed batch itself
//! (`seal` owns that format): the topic layout ([`topic`]) and the hub's end-to-end
//! acknowledgement ([`ack`]). Both sides use this module, so neither depends on the other.

mod ack;
mod topic;

pub use ack::{Ack, AckError, AckSigner, AckVerifier, ACK_VERSION, MAX_ACK_BYTES};
pub use topic::{ack_topic, hub_filters, parse_stream_topic, stream_topic};
