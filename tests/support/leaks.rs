//! The suite's log check (issue 12 item 6): no log line of a citygate process a test starts
//! may carry a raw meter key of the simulators, because the purposes the tests run under
//! pseudonymise those identifiers.
//!
//! Every child started through `spawn_logged`, `spawn_logged_command` or `spawn_run` has
//! each stderr line scanned as it is read ([`scan`]); the lines with a key are kept by the
//! child's pid, and the test that started the child fails when it drops the child's
//! `LogLines` or waits for the child's exit with `wait_exit` ([`assert_none`]).
//!
//! What counts as a raw meter key, as the simulators make them:
//! - MQTT meters (`citygate sim --mqtt-broker`, `sim::mqtt`): the key prefix (one or two
//!   capital letters, `W` by default) and four digits, `W0001`, also inside a topic;
//! - Modbus meters (`sim::model`): identifier registers hold `10_000_000 + unit` (a serial
//!   number) for units 1..=247.
//!
//! Short identifier values (a bus address 1..=247, `1000 + unit`) are not checked: as bare
//! numbers they cannot be told from counts and ports in a log line.

use std::collections::HashMap;
use std::sync::Mutex;
use std::thread::JoinHandle;

/// Per child (by pid): the lines of its log with a raw meter key, with the command.
static LEAKS: Mutex<Option<HashMap<u32, Vec<String>>>> = Mutex::new(None);
/// The threads reading the logs of children nobody reads (`spawn_run`), by pid.
static READERS: Mutex<Option<HashMap<u32, JoinHandle<()>>>> = Mutex::new(None);

/// The raw meter keys in `line`.
pub fn meter_keys(line: &str) -> Vec<&str> {
    line.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|token| is_mqtt_key(token) || is_modbus_serial(token))
        .collect()
}

fn is_mqtt_key(token: &str) -> bool {
    let letters = token.bytes().take_while(u8::is_ascii_uppercase).count();
    (1..=2).contains(&letters)
        && token.len() == letters + 4
        && token.bytes().skip(letters).all(|b| b.is_ascii_digit())
}

fn is_modbus_serial(token: &str) -> bool {
    token.len() == 8
        && token
            .parse::<u32>()
            .is_ok_and(|n| (10_000_001..=10_000_247).contains(&n))
}

/// Records `line` of child `pid` (`command`) if it carries a raw meter key.
pub fn scan(pid: u32, command: &str, line: &str) {
    if !meter_keys(line).is_empty() {
        LEAKS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_or_insert_with(HashMap::new)
            .entry(pid)
            .or_default()
            .push(format!("{command}: {line}"));
    }
}

/// Keeps the thread reading child `pid`'s log, for [`assert_none`] to wait for.
pub fn keep_reader(pid: u32, reader: JoinHandle<()>) {
    READERS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get_or_insert_with(HashMap::new)
        .insert(pid, reader);
}

/// Fails (unless the thread is already panicking) if child `pid`'s log so far carried a raw
/// meter key. Call it once the child exited to check its whole log: a reader kept with
/// [`keep_reader`] is waited for first (it ends with the child's stderr).
pub fn assert_none(pid: u32, exited: bool) {
    let reader = READERS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .as_mut()
        .and_then(|r| if exited { r.remove(&pid) } else { None });
    if let Some(reader) = reader {
        let _ = reader.join();
    }
    let leaks = LEAKS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .as_mut()
        .and_then(|l| l.remove(&pid))
        .unwrap_or_default();
    if std::thread::panicking() {
        return;
    }
    assert!(
        leaks.is_empty(),
        "raw meter keys in the log of citygate process {pid} (issue 12 item 6):\n{}",
        leaks.join("\n")
    );
}

/// The check finds what the simulators make, wherever it sits in a line, and nothing else.
#[test]
fn the_log_check_finds_simulated_meter_keys() {
    let hits = [
        r#"WARN mqtt payload rejected topic="water/W0001/up" device=flat-1"#,
        "DEBUG unknown meter key=TB0042",
        r#"{"fields":{"message":"no device listens on meters/W0133/up"}}"#,
        "INFO identifier value=10000001 field=meter_serial",
        "DEBUG read 10000247.0",
    ];
    for line in hits {
        assert!(!meter_keys(line).is_empty(), "{line}");
    }
    let clean = [
        "INFO hub serving group=citygate-hub",
        "INFO batch sealed seq=10000001000 records=10000000",
        "WARN device=flat-1 subject=p-8f3a0c1b2d4e",
        "INFO listening on 127.0.0.1:10001 W00012 w0001 ABC0001",
        "ERROR at 2026-12-01T02:00:00.000Z in 1024 ms",
    ];
    for line in clean {
        assert!(
            meter_keys(line).is_empty(),
            "{line}: {:?}",
            meter_keys(line)
        );
    }
}
