//! Pure transforms between the source and the sealer: no I/O, no tokio.
//!
//! `normalise` decodes register images into typed readings in canonical units
//! (`normalise_values` does the same for named values published by MQTT meters);
//! `check` flags quality (out of range, counters going backwards, resets and
//! rollovers, spikes, frozen values) without ever rewriting a value; `alarm` decides
//! which alarm-stream readings go out (on change, and periodically as standing state).
//! What leaves for which purpose, and in which form, is the policy engine's (`policy`).

pub(crate) mod alarm;
pub mod check;
pub mod normalise;
pub mod normalise_values;
