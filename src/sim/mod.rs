//! Simulated Modbus meters for tests, demos and commissioning practice.
//!
//! [`SimMeters`] is a set of meters that all follow one [`Profile`], with unit ids
//! `1..=count`. Each meter evolves plausible values for every profile field (see
//! `model`), encodes them into the profile's register map exactly as the profile
//! describes (types, word orders, scale and offset), and records what it served as
//! [`Snapshot`]s so tests can compare a gateway's readings with the truth.
//! [`serve`] puts the meters behind one Modbus TCP endpoint, like a serial device
//! server in front of an RS-485 bus.
//!
//! Invariants:
//! - One snapshot is served for at least `tick` (default 100 ms), so one poll of
//!   several blocks sees consistent values.
//! - Monotonic counters (energy, volume) strictly increase from one snapshot to the
//!   next as served on the wire, until they wrap at their rollover or range.
//! - Every value stays inside its field's `range` as decoded from the registers.
//! - Random draws are deterministic per seed and unit id; counters integrate over the
//!   (tokio) time elapsed between snapshots.
//!
//! [`RtuSim`] serves the same meters over Modbus RTU (pty, RTU over TCP, DTU
//! dial-out) with line faults on top.
//!
//! Faults ([`Fault`]) are set per unit at run time: slow answers, silence and
//! exception responses. Nothing here panics on a client's request; malformed or
//! unsupported requests get Modbus exceptions.
//!
//! [`mqtt`] simulates meters that publish over MQTT (`citygate sim --mqtt-broker`), with
//! the same value model.
//!
//! [`Profile`]: crate::profile::Profile

mod map;
mod meter;
mod model;
pub mod mqtt;
mod rtu;
mod server;

pub use meter::{Fault, SimMeters, Snapshot, DEFAULT_TICK, HISTORY_LIMIT};
pub use rtu::{dial_dtu, serve_rtu_tcp, Chaos, InjectedFaults, LineFault, RtuSim};
pub use server::serve;

#[cfg(test)]
pub(crate) mod fixtures {
    use std::path::Path;
    use std::sync::Arc;

    use crate::profile::Profile;

    /// A small profile with every kind of field the simulator distinguishes.
    pub(crate) const TEST_PROFILE: &str = r#"
[meter]
vendor = "Sim"
model = "S1"
protocol = "modbus"

[modbus]
function = 4
address_base = 0

[[field]]
name = "voltage_l1"
register = 0
type = "f32"
order = "ABCD"
unit = "V"
range = [0.0, 300.0]
category = "measurement"
grade = "L2"

[[field]]
name = "voltage_l1_l2"
register = 2
type = "f32"
order = "CDAB"
unit = "V"
range = [340.0, 460.0]
category = "measurement"
grade = "L2"

[[field]]
name = "current_l1"
register = 4
type = "u16"
scale = 0.01
unit = "A"
range = [0.0, 19.995]
category = "measurement"
grade = "L2"

[[field]]
name = "power_total"
register = 5
type = "i16"
unit = "W"
category = "measurement"
grade = "L2"

[[field]]
name = "power_factor"
register = 6
type = "i16"
scale = 0.001
unit = "1"
range = [-1.0, 1.0]
category = "measurement"
grade = "L2"

[[field]]
name = "frequency"
register = 7
type = "u16"
scale = 0.01
unit = "Hz"
range = [45.0, 55.0]
category = "measurement"
grade = "L1"

[[field]]
name = "aux_voltage"
register = 8
type = "i16"
scale = 0.1
unit = "V"
range = [20.0, 28.0]
category = "measurement"
grade = "L1"

[[field]]
name = "status_word"
register = 0x10
type = "u16"
unit = "1"
category = "status"
grade = "L2"

[[field]]
name = "status_low_bit"
register = 0x10
type = "bit"
bit = 1
unit = "1"
category = "status"
grade = "L2"

[[field]]
name = "relay_open"
register = 0x11
type = "bit"
bit = 0
unit = "1"
category = "status"
grade = "L2"

[[field]]
name = "tamper"
register = 0x11
type = "bit"
bit = 3
unit = "1"
category = "alarm"
grade = "L2"

[[field]]
name = "energy_import"
register = 0x20
type = "u32"
order = "CDAB"
scale = 0.01
unit = "kWh"
counter = "monotonic"
range = [0.0, 99999999.0]
category = "measurement"
grade = "L3"

[[field]]
name = "energy_reactive"
register = 0x22
type = "f32"
unit = "kvarh"
counter = "monotonic"
category = "measurement"
grade = "L3"

[[field]]
name = "temperature"
register = 0x24
type = "i16"
scale = 0.1
unit = "degC"
range = [-40.0, 85.0]
category = "measurement"
grade = "L1"

[[field]]
name = "volume_forward"
register = 0x26
type = "u32"
scale = 0.001
unit = "m3"
counter = "monotonic"
category = "measurement"
grade = "L3"

[[field]]
name = "flow"
register = 0x28
type = "u16"
scale = 0.001
unit = "m3/h"
range = [0.0, 10.0]
category = "measurement"
grade = "L2"

[[field]]
name = "meter_serial"
register = 0x30
type = "u32"
unit = "1"
category = "identifier"
grade = "L3"
"#;

    pub(crate) fn test_profile() -> Arc<Profile> {
        Arc::new(Profile::parse(Path::new("sim-test.toml"), TEST_PROFILE).expect("fixture parses"))
    }
}
