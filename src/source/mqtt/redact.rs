//! [`Redactor`]: what an MQTT source may log of a topic or a gateway-API device key.
//!
//! Meter topics carry the meter's own key (`water/W0001/up`), an identifier the purpose lets
//! leave the box only as a pseudonym, so no log line carries a topic or key as received
//! (issue 12). Lines about a configured device name the device (its operator-given name)
//! instead. A topic no device listens on keeps the levels that are fixed parts of the
//! source's filters (`water`, `up` of `water/+/up`; the levels of gateway-API topics) and
//! replaces every other level by a short keyed pseudonym (`water/~3f9a01c2/up`): repeats of
//! one unknown meter show the same pseudonym, so an operator can tell one chatty stranger
//! from many, but the key cannot be recovered or looked up (HMAC-SHA256 under a random key
//! drawn at start, 32 bits shown). Levels of concrete device topics are not kept, as they
//! may be keys themselves (`tb/T0001/telemetry`).

use std::collections::HashSet;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Redacts topics and keys of one MQTT source; see the module docs.
#[derive(Debug)]
pub(crate) struct Redactor {
    fixed_levels: HashSet<String>,
    key: [u8; 32],
}

impl Redactor {
    /// `patterns`: the source's filters with a `+` level and its gateway-API topics.
    pub(crate) fn new<'a>(patterns: impl IntoIterator<Item = &'a str>) -> Self {
        let fixed_levels = patterns
            .into_iter()
            .flat_map(|p| p.split('/'))
            .filter(|l| !matches!(*l, "+" | "#"))
            .map(str::to_owned)
            .collect();
        Self {
            fixed_levels,
            key: rand::random(),
        }
    }

    /// A short keyed pseudonym of `value`: `~` and 8 hex digits.
    pub(crate) fn pseudonym(&self, value: &str) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key)
            .expect("invariant: HMAC takes keys of any length");
        mac.update(value.as_bytes());
        let tag = mac.finalize().into_bytes();
        format!("~{}", hex::encode(&tag[..4]))
    }

    /// `topic` with every level that is not a fixed level of the source's patterns
    /// replaced by its pseudonym.
    pub(crate) fn topic(&self, topic: &str) -> String {
        topic
            .split('/')
            .map(|l| {
                if l.is_empty() || self.fixed_levels.contains(l) {
                    l.to_owned()
                } else {
                    self.pseudonym(l)
                }
            })
            .collect::<Vec<_>>()
            .join("/")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// issue 12 item 2: unknown topics keep their fixed levels, keys become pseudonyms.
    #[test]
    fn keys_become_stable_pseudonyms_and_fixed_levels_stay() {
        let r = Redactor::new(["water/+/up", "v1/gateway/telemetry"]);
        let t = r.topic("water/W0009/up");
        assert!(t.starts_with("water/~") && t.ends_with("/up"), "{t}");
        assert!(!t.contains("W0009"));
        assert_eq!(t, r.topic("water/W0009/up"), "stable within a process");
        assert_ne!(t, r.topic("water/W0010/up"));
        assert_eq!(r.topic("/sys/x").matches('~').count(), 2);
        assert_eq!(r.pseudonym("Meter A").len(), 9);
        let other = Redactor::new(["water/+/up"]);
        assert_ne!(other.pseudonym("W0009"), r.pseudonym("W0009"), "keyed");
    }
}
