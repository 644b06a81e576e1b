//! MQTT meters: subscribe to a broker and turn published payloads into samples.
//!
//! - [`decode`](mod@decode): payload bytes → named values by the profile's payload shape (`json` with
//!   JSON pointers, ThingsBoard telemetry, Alibaba Alink property posts) and timestamps
//!   ([`time`]: epoch ms, epoch s, ISO 8601); pure and property-tested.
//! - [`routes`]: topic → device (concrete topics, or one `+` level naming the device).
//! - [`subscriber`]: the task owning one broker connection (one per `[[mqtt_source]]`);
//!   [`health`]: when that connection is down or looping long enough to make its devices stale.
//!
//! Scaling and units are not done here: samples carry values typed as published and
//! `transform::normalise_values` applies the profile, exactly as for registers.

pub mod decode;
pub(crate) mod health;
pub(crate) mod redact;
pub(crate) mod routes;
pub(crate) mod subscriber;
pub(crate) mod time;

pub use decode::{decode, Decoded, FieldError, PayloadError, MAX_PAYLOAD_BYTES};
pub(crate) use subscriber::MqttSubscriber;
