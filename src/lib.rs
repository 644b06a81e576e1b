//! citygate: an edge gateway for city-brain meter data.
//!
//! The modules follow the pipeline: `config` and `profile` describe what to poll,
//! `source` polls meters, `transform` normalises, checks and minimises readings,
//! `seal` turns records into encrypted, signed batches, `store` keeps them durable
//! until the hub acknowledges them. `supervisor` wires the tasks; `sim` serves
//! simulated meters for tests, demos and commissioning practice.

pub mod config;
pub mod profile;
pub mod reading;
pub mod sim;
