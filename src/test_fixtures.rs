//! Config and profile text the unit tests share, built from parts, so a schema change is
//! made once. (The integration tests have their own, `tests/support/fixtures.rs`.) Layouts are
//! fixed: tests assert on the line numbers of diagnostics.

use std::path::Path;

use crate::profile::{Profile, ProfileSet};

/// Profile `test-m`: one f32 voltage in input register 0.
pub(crate) const VOLTAGE_PROFILE: &str = r#"
[meter]
vendor = "T"
model = "M"
protocol = "modbus"
[modbus]
function = 4
[[field]]
name = "voltage_l1"
register = 0
type = "f32"
unit = "V"
category = "measurement"
grade = "L2"
"#;

/// A gateway config: gateway `gw-1`, purpose `purpose` with `fields` (a TOML array's inside,
/// e.g. `"\"voltage_l1\""`), a store, the usual key paths, then `rest` (devices, sources).
/// The `[gateway]` header is line 1; `rest` starts at line 16.
pub(crate) fn gateway_config(purpose: &str, fields: &str, rest: &str) -> String {
    format!(
        r#"[gateway]
id = "gw-1"
[purpose]
name = "{purpose}"
fields = [{fields}]

[store]
path = "store"

[keys]
signing_key = "keys/gateway.sign.key"
hub_public_key = "keys/hub.hpke.pub"
pseudonym_key = "keys/pseudonym.key"
hub_ack_key = "keys/hub.ack.pub"

{rest}"#
    )
}

/// A Modbus TCP device at 127.0.0.1:502, unit 1, polled every second (six lines).
pub(crate) fn tcp_device(name: &str, profile: &str) -> String {
    format!(
        "[[device]]\nname = \"{name}\"\nprofile = \"{profile}\"\n\
         transport = {{ type = \"tcp\", address = \"127.0.0.1:502\" }}\nunit = 1\npoll_interval = \"1s\"\n"
    )
}

/// The profiles `(name, text)`, parsed.
pub(crate) fn profile_set(profiles: &[(&str, &str)]) -> ProfileSet {
    let mut set = ProfileSet::default();
    for (name, text) in profiles {
        let path = format!("{name}.toml");
        set.insert(Profile::parse(Path::new(&path), text).expect("test profile parses"));
    }
    set
}
