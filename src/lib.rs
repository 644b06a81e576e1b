//! citygate: an edge gateway for city-brain meter data.
//!
//! The modules follow the pipeline: `config` and `profile` describe what to poll,
//! `source` polls meters, `transform` normalises, checks and minimises readings,
//! `seal` turns records into encrypted, signed batches, `store` keeps them durable
//! until the hub acknowledges them, `uplink` carries them over MQTT with mutual TLS
//! (and embeds a broker for one-box setups); `hub` is the receiving end (verify,
//! decrypt, de-duplicate, write, ack). `supervisor` wires the tasks; `status` and
//! `telemetry` report on them; `sim` serves simulated meters for tests, demos and
//! commissioning practice.

pub mod backoff;
pub mod cli;
pub mod config;
pub mod hub;
pub mod pipeline;
pub mod profile;
pub mod reading;
pub mod seal;
pub mod sim;
pub mod source;
pub mod status;
pub mod store;
pub mod supervisor;
pub mod telemetry;
pub mod transform;
pub mod uplink;
