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

/// Runs `f` with WARN and above logged to a string (no ANSI), and returns both.
pub(crate) fn capture_warnings<T>(f: impl FnOnce() -> T) -> (T, String) {
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
    (out, text)
}
