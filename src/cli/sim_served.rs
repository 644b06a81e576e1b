//! `citygate sim --served-file PATH`: what a simulator served, for `citygate loadtest`'s
//! exact loss accounting.
//!
//! A poll is counted when the unit answers, with data, the *marker* read: the first read of
//! the gateway's plan ([`crate::source::modbus::plan`]) that covers a field of the readings
//! stream. The gateway reads a device's planned ranges in address order and stops at the
//! first failed read, and a sample carries every range answered before the failure, so:
//! - marker answered ⇒ the gateway holds at least one readings field of that poll (unless it
//!   gave up waiting for the answer: a timed-out answer counts as served and, never
//!   delivered, as lost);
//! - marker not answered ⇒ no readings field of that poll exists (earlier ranges, if any,
//!   hold only alarm or audit fields).
//!
//! So the served count per unit equals the number of distinct read times (`at_ms`) of that
//! device in the hub's sink when nothing was lost. Counting every read and dividing by the
//! plan length would not be exact: a poll that broke half-way leaves a remainder.
//!
//! At SIGTERM the simulator first stops answering ([`SimMeters::stop_answering`]), waits
//! [`SERVED_GRACE`] so answers already counted are written to their sockets, then stops and
//! writes the file: counted and sent are then the same set.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::profile::Profile;
use crate::reading::{RegisterAddress, Stream, UnitId};
use crate::sim::SimMeters;
use crate::source::modbus::plan;

/// Time between "stop answering" and closing the connections at SIGTERM.
pub(crate) const SERVED_GRACE: Duration = Duration::from_millis(300);

/// The served file: polls answered per unit id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Served {
    pub profile: String,
    /// Start address (on the wire) of the read counted as a poll.
    pub marker_start: u16,
    /// Unit id → polls answered.
    pub polls: BTreeMap<u8, u64>,
}

/// The read that counts as a poll: the first planned read covering a readings field (the
/// first planned read if no field is on the readings stream).
pub(crate) fn poll_marker(profile: &Profile) -> RegisterAddress {
    let reads = plan(profile);
    let carries_readings = |start: RegisterAddress, count: u16| {
        let end = u32::from(start.0) + u32::from(count);
        profile.fields.iter().any(|f| {
            let (a, w) = f.span();
            f.stream == Stream::Readings
                && u32::from(a.0) >= u32::from(start.0)
                && u32::from(a.0) + u32::from(w) <= end
        })
    };
    reads
        .iter()
        .find(|r| carries_readings(r.start, r.count))
        .or(reads.first())
        .map_or(RegisterAddress(0), |r| r.start)
}

impl Served {
    /// What `meters` (unit ids `1..=count`) served so far.
    pub(crate) fn of(meters: &SimMeters, count: u8, marker: RegisterAddress) -> Served {
        Served {
            profile: meters.profile().name.clone(),
            marker_start: marker.0,
            polls: (1..=count)
                .map(|u| (u, meters.polls_served(UnitId(u))))
                .collect(),
        }
    }

    pub(crate) fn write(&self, path: &Path) -> Result<(), String> {
        let text = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    }

    pub(crate) fn read(path: &Path) -> Result<Served, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::fixtures::test_profile;

    #[test]
    fn marker_is_the_first_read_with_a_readings_field() {
        // The fixture's first read (0x00…) holds voltages: a readings field.
        let p = test_profile();
        assert_eq!(poll_marker(&p), plan(&p)[0].start);
    }

    #[test]
    fn served_file_round_trips() {
        let dir = tempfile::tempdir().expect("temp dir");
        let meters = SimMeters::new(test_profile(), 2, 1);
        meters.count_polls_at(RegisterAddress(0));
        meters
            .read(
                UnitId(2),
                crate::profile::FunctionCode::ReadInput,
                RegisterAddress(0),
                2,
            )
            .expect("served");
        let s = Served::of(&meters, 2, RegisterAddress(0));
        assert_eq!(s.polls, BTreeMap::from([(1, 0), (2, 1)]));
        let path = dir.path().join("served.json");
        s.write(&path).expect("written");
        assert_eq!(Served::read(&path).expect("read"), s);
    }
}
