//! Wire timing of an RTU line and the bus budget derived from it.
//!
//! One character is start bit + data bits + parity bit (if any) + stop bits. Frames are
//! separated by 3.5 characters of silence; above 19200 baud the Modbus serial line
//! spec fixes that at 1.75 ms. The *cycle time* of a bus is the wire time of polling
//! every device once (silence + request + reply per planned read); it is a lower
//! bound — real meters add their turnaround. The *load* is the share of wire time the
//! configured poll intervals ask for: above 1.0 the intervals cannot be met.

use std::time::Duration;

use crate::profile::{LineSettings, Parity};
use crate::source::modbus::ReadRequest;

/// Character and silence times of one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineTiming {
    pub char_time: Duration,
    pub silence: Duration,
}

impl LineTiming {
    pub fn new(line: &LineSettings) -> Self {
        let bits = 1
            + u64::from(line.data_bits)
            + u64::from(line.parity != Parity::None)
            + u64::from(line.stop_bits);
        let baud = u64::from(line.baud.max(1));
        let char_time = Duration::from_nanos(bits * 1_000_000_000 / baud);
        let silence = if line.baud > 19_200 {
            Duration::from_micros(1750)
        } else {
            char_time.mul_f64(3.5)
        };
        Self { char_time, silence }
    }

    /// Wire time of `n` characters.
    pub(crate) fn bytes(&self, n: usize) -> Duration {
        self.char_time
            .saturating_mul(u32::try_from(n).unwrap_or(u32::MAX))
    }

    /// Silence + 8-byte request + reply of `count` registers.
    pub(crate) fn transaction(&self, req: &ReadRequest) -> Duration {
        self.silence
            + self.bytes(super::frame::REQUEST_LEN)
            + self.bytes(5 + 2 * usize::from(req.count))
    }
}

/// What the configured devices ask of one bus.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BusBudget {
    /// Wire time of polling every device once.
    pub cycle: Duration,
    /// Requests per cycle.
    pub requests: usize,
    /// Σ (wire time of a device's poll / its poll interval); > 1.0: overloaded.
    pub load: f64,
    /// The shortest poll interval on the bus.
    pub shortest_interval: Duration,
}

impl BusBudget {
    /// `devices`: each device's planned reads and poll interval.
    pub(crate) fn compute<'a>(
        timing: &LineTiming,
        devices: impl IntoIterator<Item = (&'a [ReadRequest], Duration)>,
    ) -> Self {
        let mut cycle = Duration::ZERO;
        let mut requests = 0;
        let mut load = 0.0;
        let mut shortest = Duration::MAX;
        for (plan, interval) in devices {
            let cost: Duration = plan.iter().map(|r| timing.transaction(r)).sum();
            cycle += cost;
            requests += plan.len();
            load += cost.as_secs_f64() / interval.as_secs_f64().max(1e-9);
            shortest = shortest.min(interval);
        }
        Self {
            cycle,
            requests,
            load,
            shortest_interval: if shortest == Duration::MAX {
                Duration::ZERO
            } else {
                shortest
            },
        }
    }

    /// Whether the intervals ask for more than the line can carry.
    pub(crate) fn overloaded(&self) -> bool {
        self.load > 1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::line::DEFAULT_LINE;
    use crate::reading::RegisterAddress;

    #[test]
    fn timing_follows_the_spec() {
        let t = LineTiming::new(&DEFAULT_LINE);
        // 10 bits at 9600 baud.
        assert_eq!(t.char_time, Duration::from_nanos(1_041_666));
        assert_eq!(t.silence, t.char_time.mul_f64(3.5));
        let even = LineTiming::new(&LineSettings {
            parity: Parity::Even,
            ..DEFAULT_LINE
        });
        assert!(even.char_time > t.char_time);
        let fast = LineTiming::new(&LineSettings {
            baud: 115_200,
            ..DEFAULT_LINE
        });
        assert_eq!(fast.silence, Duration::from_micros(1750));
    }

    #[test]
    fn budget_flags_intervals_the_baud_cannot_carry() {
        let t = LineTiming::new(&DEFAULT_LINE);
        let plan = [ReadRequest {
            start: RegisterAddress(0),
            count: 60,
        }];
        // 8 + 125 bytes + 3.5 chars ≈ 142 ms per poll at 9600 baud.
        let one = BusBudget::compute(&t, [(&plan[..], Duration::from_secs(1))]);
        assert!(one.cycle > Duration::from_millis(130) && one.cycle < Duration::from_millis(150));
        assert!(!one.overloaded());
        let eight = BusBudget::compute(&t, (0..8).map(|_| (&plan[..], Duration::from_secs(1))));
        assert_eq!(eight.requests, 8);
        assert!(eight.overloaded(), "{eight:?}");
    }
}
