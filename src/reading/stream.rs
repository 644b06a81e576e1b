//! [`Stream`]: the outbound streams, as codes for envelope headers and store keys.

use std::fmt;

use serde::{Deserialize, Serialize};

/// An outbound stream. Each has its own sequence numbers at the gateway.
///
/// Streams are small codes, used in envelope headers and store keys: `readings` (0, the first
/// purpose flow), `alarms` (1, priority), `audit` (2, priority), and `readings-1` …
/// `readings-7` (3..=9, the further purpose flows of a gateway that runs several purposes side
/// by side). Every flow has its own sequence numbers, batches and delivery.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Stream(u8);

#[allow(non_upper_case_globals)]
impl Stream {
    /// The first purpose flow: measurements, status values and identifiers a purpose needs.
    pub const Readings: Stream = Stream(0);
    /// Alarm and tamper bits: priority, dropped last under quota.
    pub const Alarms: Stream = Stream(1);
    /// Audit trail: priority, dropped last under quota.
    pub const Audit: Stream = Stream(2);
    /// Most purpose flows one gateway runs side by side.
    pub const MAX_FLOWS: usize = 8;
    /// The last purpose flow's stream, `readings-7`, is reserved for emergency collection
    /// (`citygate emergency start`): configured flows use the others, so whatever an
    /// emergency produced can be purged as a whole when it ends.
    pub const EMERGENCY: Stream = Stream(1 + Self::MAX_FLOWS as u8);
    /// Most purpose flows a gateway config declares (the emergency stream is not one).
    pub const MAX_CONFIG_FLOWS: usize = Self::MAX_FLOWS - 1;
    /// How many stream codes there are.
    pub const COUNT: usize = 2 + Self::MAX_FLOWS;
    /// Every stream, in code order.
    pub const ALL: [Stream; Self::COUNT] = {
        let mut all = [Stream(0); Self::COUNT];
        let mut i = 0;
        while i < Self::COUNT {
            all[i] = Stream(i as u8);
            i += 1;
        }
        all
    };
    const NAMES: [&'static str; Self::COUNT] = [
        "readings",
        "alarms",
        "audit",
        "readings-1",
        "readings-2",
        "readings-3",
        "readings-4",
        "readings-5",
        "readings-6",
        "readings-7",
    ];

    /// The stream of purpose flow `index` (0 is `readings`); `None` past [`Self::MAX_FLOWS`].
    pub fn flow(index: usize) -> Option<Stream> {
        match index {
            0 => Some(Stream::Readings),
            i if i < Self::MAX_FLOWS => Some(Stream(2 + i as u8)),
            _ => None,
        }
    }

    /// Which purpose flow this stream carries; `None` for `alarms` and `audit`.
    pub fn flow_index(self) -> Option<usize> {
        match self.0 {
            0 => Some(0),
            1 | 2 => None,
            c => Some(usize::from(c) - 2),
        }
    }

    /// Alarms and audit: sent first, dropped last under quota.
    pub fn is_priority(self) -> bool {
        self.flow_index().is_none()
    }

    /// The stream's code in the envelope header and in store keys.
    pub(crate) fn code(self) -> u8 {
        self.0
    }

    /// Index of this stream in per-stream arrays of length [`Self::COUNT`].
    pub(crate) fn index(self) -> usize {
        usize::from(self.0)
    }

    pub(crate) fn from_code(code: u8) -> Option<Self> {
        (usize::from(code) < Self::COUNT).then_some(Stream(code))
    }

    pub fn as_str(self) -> &'static str {
        Self::NAMES[self.index()]
    }

    /// The stream named `name` (`readings`, `alarms`, `audit`, `readings-N`).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

impl fmt::Debug for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Stream {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Stream {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Stream::from_name(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown stream {s:?}")))
    }
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
