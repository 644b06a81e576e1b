//! Serial line settings: what a transport sets explicitly ([`LineOverride`]), what a profile
//! defaults to, and what applies when neither says ([`DEFAULT_LINE`]). Config validation and
//! the RTU transports both use these, so they sit with the profile's [`LineSettings`].

use super::{LineSettings, Parity};

/// Serial settings when neither the transport nor the profile gives any.
pub const DEFAULT_LINE: LineSettings = LineSettings {
    baud: 9600,
    data_bits: 8,
    parity: Parity::None,
    stop_bits: 1,
};

/// Serial settings a transport sets explicitly; the rest come from the profile's
/// `[line]` defaults, then [`DEFAULT_LINE`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LineOverride {
    pub baud: Option<u32>,
    pub data_bits: Option<u8>,
    pub parity: Option<Parity>,
    pub stop_bits: Option<u8>,
}

/// Baud rates a transport may name.
pub(crate) const BAUD_RATES: [u32; 9] =
    [1200, 2400, 4800, 9600, 14400, 19200, 38400, 57600, 115200];

impl LineOverride {
    pub(crate) fn resolve(&self, profile_default: Option<LineSettings>) -> LineSettings {
        let d = profile_default.unwrap_or(DEFAULT_LINE);
        LineSettings {
            baud: self.baud.unwrap_or(d.baud),
            data_bits: self.data_bits.unwrap_or(d.data_bits),
            parity: self.parity.unwrap_or(d.parity),
            stop_bits: self.stop_bits.unwrap_or(d.stop_bits),
        }
    }

    /// Problems with explicit values, as (key, message) pairs.
    pub(crate) fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if let Some(b) = self.baud {
            if !BAUD_RATES.contains(&b) {
                out.push((
                    "baud",
                    format!("{b} is not a supported baud rate; valid: {BAUD_RATES:?}"),
                ));
            }
        }
        if let Some(d) = self.data_bits {
            if !(d == 7 || d == 8) {
                out.push(("data_bits", format!("{d} data bits; valid: 7, 8")));
            }
        }
        if let Some(s) = self.stop_bits {
            if !(s == 1 || s == 2) {
                out.push(("stop_bits", format!("{s} stop bits; valid: 1, 2")));
            }
        }
        out
    }
}

/// `9600 8N1`-style summary.
pub(crate) fn describe(line: &LineSettings) -> String {
    let p = match line.parity {
        Parity::None => 'N',
        Parity::Even => 'E',
        Parity::Odd => 'O',
    };
    format!("{} {}{}{}", line.baud, line.data_bits, p, line.stop_bits)
}
