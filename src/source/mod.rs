//! Sources: tasks that poll meters and hand raw register images to the transforms.
//!
//! A source never interprets registers beyond framing: it produces a [`RawSample`]
//! (which device, which profile, when, and the register blocks it read). Turning
//! registers into typed readings is `transform::normalise`'s job, so every protocol
//! shares one decoder.

pub mod modbus;
pub mod rtu;

use std::sync::Arc;

use crate::profile::{Profile, Ratios};
use crate::reading::{DeviceId, RegisterAddress, TimestampMs};

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
    pub fn get(&self, addr: RegisterAddress, n: u16) -> Option<&[u16]> {
        self.blocks.iter().find_map(|(start, words)| {
            let off = usize::from(addr.0.checked_sub(start.0)?);
            words.get(off..off + usize::from(n))
        })
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Total registers held.
    pub fn len(&self) -> usize {
        self.blocks.iter().map(|(_, w)| w.len()).sum()
    }
}

/// One poll of one device.
#[derive(Debug, Clone)]
pub struct RawSample {
    pub device: DeviceId,
    pub profile: Arc<Profile>,
    pub at_ms: TimestampMs,
    pub image: RegisterImage,
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
