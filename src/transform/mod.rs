//! Pure transforms between the source and the sealer: no I/O, no tokio.
//!
//! `normalise` decodes register images into typed readings in canonical units
//! (`normalise_values` does the same for named values published by MQTT meters);
//! `check` flags quality (out of range, counters going backwards, resets and
//! rollovers, spikes, frozen values) without ever rewriting a value; `minimise` applies the declared purpose, dropping what it
//! does not need and pseudonymising identifiers with a keyed HMAC; `alarm` decides
//! which alarm-stream readings go out (on change, and periodically as standing state).

pub(crate) mod alarm;
pub mod check;
pub mod minimise;
pub mod normalise;
pub mod normalise_values;
