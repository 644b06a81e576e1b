//! Sources: tasks that poll meters and hand raw samples to the transforms.
//!
//! A source never interprets values beyond framing: it produces a [`RawSample`]
//! (which device, which profile, when, and what it read). Register sources hand over
//! the register blocks they read ([`SampleData::Registers`]); sources whose meters
//! publish named values (MQTT) hand over those values, located and typed by the
//! profile but not scaled ([`SampleData::Values`]). Turning either into typed readings
//! in canonical units is `transform::normalise`'s job, so every protocol shares one
//! set of unit, scale and sentinel rules.

mod context;
pub mod modbus;
pub mod mqtt;
pub(crate) mod poll;
mod rounds;
pub mod rtu;

pub use context::{GatewayAlarms, SourceContext};
pub(crate) use rounds::RoundGuard;
pub use rounds::Rounds;

use std::sync::Arc;

use crate::profile::{Profile, Ratios, RawValue};
use crate::reading::{DeviceId, FieldName, RegisterAddress, TimestampMs};

/// Register blocks read from one device in one poll.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegisterImage {
    blocks: Vec<(RegisterAddress, Vec<u16>)>,
}

impl RegisterImage {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a block of consecutive registers starting at `start`.
    pub fn insert(&mut self, start: RegisterAddress, words: Vec<u16>) {
        self.blocks.push((start, words));
    }

    /// The `n` registers starting at `addr`, if one block holds all of them.
    pub(crate) fn get(&self, addr: RegisterAddress, n: u16) -> Option<&[u16]> {
        self.blocks.iter().find_map(|(start, words)| {
            let off = usize::from(addr.0.checked_sub(start.0)?);
            words.get(off..off + usize::from(n))
        })
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Total registers held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.blocks.iter().map(|(_, w)| w.len()).sum()
    }
}

/// A value a meter published under a name, before scaling and unit conversion.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceValue {
    /// A number or flag, typed as the profile field declares it.
    Raw(RawValue),
    /// A text identifier (serial numbers, IMEIs).
    Text(String),
}

/// Where a named value's timestamp comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeSource {
    /// The meter's own timestamp from the payload.
    Device,
    /// The gateway's receive time: the payload had none, or an implausible one.
    Received,
    /// The meter's own timestamp, kept, but ahead of the gateway's clock by more than the
    /// source's `max_clock_skew`, or behind it by more than `max_clock_lag`: the meter's
    /// clock is wrong.
    Skewed,
}

/// One named value of a sample.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedValue {
    pub field: FieldName,
    pub value: SourceValue,
    pub at_ms: TimestampMs,
    pub time: TimeSource,
}

/// What a source read from one device.
#[derive(Debug, Clone, PartialEq)]
pub enum SampleData {
    /// Register blocks (Modbus).
    Registers(RegisterImage),
    /// Named values with their own timestamps (MQTT payloads).
    Values(Vec<NamedValue>),
}

/// One poll (or one received message) of one device.
#[derive(Debug, Clone)]
pub struct RawSample {
    pub device: DeviceId,
    pub profile: Arc<Profile>,
    /// When the sample was taken (poll time, or receive time for messages).
    pub at_ms: TimestampMs,
    pub data: SampleData,
    /// The device's transformer ratios (`Ratios::UNITY` for a direct-connected meter),
    /// applied by normalisation to fields with a `ratio`.
    pub ratios: Ratios,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_finds_words_inside_blocks_only() {
        let mut img = RegisterImage::new();
        img.insert(RegisterAddress(10), vec![1, 2, 3, 4]);
        img.insert(RegisterAddress(100), vec![9]);
        assert_eq!(img.get(RegisterAddress(11), 2), Some(&[2, 3][..]));
        assert_eq!(img.get(RegisterAddress(13), 2), None, "runs past the block");
        assert_eq!(img.get(RegisterAddress(9), 1), None);
        assert_eq!(img.get(RegisterAddress(100), 1), Some(&[9][..]));
        assert_eq!(img.len(), 5);
    }
}
