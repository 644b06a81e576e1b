//! Purpose-based minimisation: what leaves the box, and in what form.
//!
//! Default deny: a field leaves only if the declared purpose lists it. Devices leave only
//! as keyed pseudonyms (`p-` + the first 16 bytes of HMAC-SHA256 under a per-deployment
//! key, hex): the same device always maps to the same pseudonym, and without the key
//! the mapping cannot be recomputed from a list of candidate ids. Identifier fields, and
//! personal fields that are not measurements, leave as keyed pseudonyms of their value,
//! never in clear (see `Classification::is_identifying`). Pure functions throughout.

use std::collections::BTreeSet;
use std::fmt;

use sha2::{Digest, Sha256};

pub use crate::seal::PseudonymKey;

use crate::policy::pseudonym::{mac, DEVICE_CONTEXT, VALUE_CONTEXT};
use crate::reading::{Classification, DeviceId, FieldName, Reading, Record, Value};

/// What happens to a field at the edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Disposition {
    /// Leaves the box with its value.
    AsIs,
    /// Leaves the box as a keyed pseudonym of its value.
    Pseudonymised,
    /// Never leaves the box.
    Dropped,
}

impl fmt::Display for Disposition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Disposition::AsIs => "as-is",
            Disposition::Pseudonymised => "pseudonymised",
            Disposition::Dropped => "dropped",
        })
    }
}

/// A declared purpose with its key; hashed into every batch header.
#[derive(Debug, Clone)]
pub struct Policy {
    fields: BTreeSet<FieldName>,
    key: PseudonymKey,
    hash: [u8; 32],
}

impl Policy {
    /// `versions` names what else shaped the output (profile name@version, …) so the hash
    /// changes whenever any of it does.
    pub fn new(
        purpose: &str,
        fields: BTreeSet<FieldName>,
        key: PseudonymKey,
        versions: &[String],
    ) -> Self {
        let mut h = Sha256::new();
        h.update(b"citygate/v1/policy\0");
        h.update(purpose.as_bytes());
        for f in &fields {
            h.update(b"\0field:");
            h.update(f.as_str().as_bytes());
        }
        let mut versions = versions.to_vec();
        versions.sort();
        for v in &versions {
            h.update(b"\0version:");
            h.update(v.as_bytes());
        }
        h.update(b"\0key:");
        h.update(key.key_id());
        Self {
            fields,
            key,
            hash: h.finalize().into(),
        }
    }

    pub(crate) fn fields(&self) -> &BTreeSet<FieldName> {
        &self.fields
    }

    /// SHA-256 naming this policy (purpose, fields, versions, key id).
    pub fn hash(&self) -> [u8; 32] {
        self.hash
    }

    pub(crate) fn disposition(&self, field: &FieldName, class: &Classification) -> Disposition {
        if !self.fields.contains(field) {
            Disposition::Dropped
        } else if class.is_identifying() {
            Disposition::Pseudonymised
        } else {
            Disposition::AsIs
        }
    }

    /// The device's pseudonym.
    pub fn subject(&self, device: &DeviceId) -> String {
        mac(&self.key, DEVICE_CONTEXT, &[device.as_str().as_bytes()])
    }

    fn value_pseudonym(&self, field: &FieldName, value: &Value) -> String {
        let text = value.to_string();
        mac(
            &self.key,
            VALUE_CONTEXT,
            &[field.as_str().as_bytes(), text.as_bytes()],
        )
    }
}

/// The record that leaves the box for `reading`, or `None` if the purpose drops it.
#[cfg(test)]
pub(crate) fn minimise(policy: &Policy, reading: &Reading) -> Option<Record> {
    minimise_as(policy, reading, &policy.subject(&reading.device))
}

/// [`minimise`] with the device's pseudonym already computed (callers that see the same
/// devices again and again cache `policy.subject(device)`).
pub fn minimise_as(policy: &Policy, reading: &Reading, subject: &str) -> Option<Record> {
    let value = match policy.disposition(&reading.field, &reading.class) {
        Disposition::Dropped => return None,
        Disposition::AsIs => reading.value.clone(),
        Disposition::Pseudonymised => {
            Value::Text(policy.value_pseudonym(&reading.field, &reading.value))
        }
    };
    Some(Record {
        subject: subject.to_string(),
        field: reading.field.as_str().to_string(),
        value,
        unit: reading.unit,
        at_ms: reading.at_ms,
        quality: reading.quality,
        tags: Vec::new(),
        window: None,
        epoch: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::{Category, Grade, Quality, Unit};
    use proptest::prelude::*;

    fn policy(key: [u8; 32]) -> Policy {
        let fields = ["active_power", "serial_number"]
            .iter()
            .map(|f| FieldName::new(*f).unwrap())
            .collect();
        Policy::new(
            "grid-planning",
            fields,
            PseudonymKey::from_bytes(key),
            &["p@1".into()],
        )
    }

    fn reading(
        device: &str,
        field: &str,
        value: Value,
        category: Category,
        personal: bool,
    ) -> Reading {
        Reading {
            device: DeviceId::new(device).unwrap(),
            field: FieldName::new(field).unwrap(),
            value,
            unit: Unit::Watt,
            at_ms: 1,
            quality: Quality::Good,
            class: Classification {
                category,
                grade: Grade::L3,
                personal,
            },
        }
    }

    #[test]
    fn fields_the_purpose_does_not_list_are_dropped() {
        let p = policy([1; 32]);
        let r = reading(
            "m1",
            "voltage_l1",
            Value::Float(230.0),
            Category::Measurement,
            false,
        );
        assert_eq!(minimise(&p, &r), None);
    }

    #[test]
    fn listed_measurement_leaves_as_is_under_a_pseudonym() {
        let p = policy([1; 32]);
        let rec = minimise(
            &p,
            &reading(
                "m1",
                "active_power",
                Value::Float(5.0),
                Category::Measurement,
                true,
            ),
        )
        .unwrap();
        assert_eq!(
            rec.value,
            Value::Float(5.0),
            "personal measurement values stay; the subject is pseudonymous"
        );
        assert!(
            rec.subject.starts_with("p-") && rec.subject.len() == 34,
            "{}",
            rec.subject
        );
        assert!(!rec.subject.contains("m1"));
    }

    #[test]
    fn identifier_values_are_pseudonymised() {
        let p = policy([1; 32]);
        let rec = minimise(
            &p,
            &reading(
                "m1",
                "serial_number",
                Value::Int(12345678),
                Category::Identifier,
                false,
            ),
        )
        .unwrap();
        match &rec.value {
            Value::Text(t) => assert!(t.starts_with("p-") && !t.contains("12345678")),
            other => panic!("expected a pseudonym, got {other:?}"),
        }
    }

    #[test]
    fn policy_hash_changes_with_fields_and_key() {
        let a = policy([1; 32]).hash();
        assert_ne!(a, policy([2; 32]).hash());
        let other = Policy::new(
            "grid-planning",
            BTreeSet::new(),
            PseudonymKey::from_bytes([1; 32]),
            &["p@1".into()],
        );
        assert_ne!(a, other.hash());
        assert!(!format!("{:?}", PseudonymKey::from_bytes([7; 32])).contains("07070707"));
    }

    proptest! {
        #[test]
        fn same_device_same_pseudonym_and_keys_separate(dev in "[a-z0-9]{1,20}", k1: [u8; 32], k2: [u8; 32]) {
            let d = DeviceId::new(dev.clone()).unwrap();
            let p1 = policy(k1);
            prop_assert_eq!(p1.subject(&d), policy(k1).subject(&d));
            if k1 != k2 {
                prop_assert_ne!(p1.subject(&d), policy(k2).subject(&d));
            }
            prop_assert!(!p1.subject(&d).contains(&dev) || dev.len() < 4);
        }

        #[test]
        fn distinct_devices_get_distinct_pseudonyms(a in "[a-z0-9]{1,20}", b in "[a-z0-9]{1,20}") {
            prop_assume!(a != b);
            let p = policy([9; 32]);
            prop_assert_ne!(p.subject(&DeviceId::new(a).unwrap()), p.subject(&DeviceId::new(b).unwrap()));
        }

        #[test]
        fn only_listed_fields_leave(field in "[a-z_]{1,16}", v: f64, personal: bool, ident: bool) {
            let p = policy([3; 32]);
            let cat = if ident { Category::Identifier } else { Category::Measurement };
            let r = reading("m", &field, Value::Float(v), cat, personal);
            let out = minimise(&p, &r);
            let listed = field == "active_power" || field == "serial_number";
            prop_assert_eq!(out.is_some(), listed);
            if let Some(rec) = out {
                prop_assert_eq!(rec.subject, p.subject(&r.device));
                if ident {
                    prop_assert!(matches!(rec.value, Value::Text(_)));
                } else {
                    prop_assert!(rec.value == Value::Float(v) || v.is_nan());
                }
            }
        }
    }
}
