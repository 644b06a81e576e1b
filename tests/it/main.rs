//! citygate's integration tests, as one binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

mod acks;
mod chaos;
mod checkpoint;
mod cli;
mod config_files;
mod e2e;
mod emergency;
mod hub_emergency;
mod hub_flood;
mod hub_pg;
mod hub_pg_faults;
mod hub_scale;
mod hub_wire;
mod loadtest;
mod loadtest_hub;
mod mosquitto;
mod mqtt_meters;
mod mqtt_rig;
mod one_box;
mod operations;
mod packaging;
mod pipeline;
mod policies;
mod policy_cli;
mod precision;
mod probe;
mod profiles;
mod recovery;
mod rtu;
mod run;
mod sd_notify;
mod status;
mod store_faults;
mod uplink;
