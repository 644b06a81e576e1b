//! Which device a message is from, by its topic.
//!
//! A device listens on a concrete topic, or on a filter with one `+` level and a key: the
//! message's value at that level must equal the key. A concrete topic wins over a filter
//! that also matches it. A concrete topic with keys is a ThingsBoard gateway-API topic
//! (`v1/gateway/telemetry`): one message carries several devices, each under its key.
//! The subscription list is every distinct topic and filter.

use std::collections::HashMap;

use crate::config::{DeviceConfig, MqttTopic};

#[derive(Debug)]
struct Pattern {
    filter: String,
    levels: Vec<String>,
    plus_at: usize,
    keys: HashMap<String, usize>,
}

/// The devices of one MQTT source, by topic.
#[derive(Debug)]
pub(crate) struct Routes {
    devices: Vec<DeviceConfig>,
    exact: HashMap<String, usize>,
    patterns: Vec<Pattern>,
    /// Gateway-API topics: device key → device.
    gateways: HashMap<String, HashMap<String, usize>>,
}

impl Routes {
    /// Builds the table; devices with another transport are ignored.
    pub(crate) fn new(devices: Vec<DeviceConfig>) -> Self {
        let mut exact = HashMap::new();
        let mut patterns: Vec<Pattern> = Vec::new();
        let mut gateways: HashMap<String, HashMap<String, usize>> = HashMap::new();
        for (i, d) in devices.iter().enumerate() {
            let Some(MqttTopic { topic, key, .. }) = d.mqtt() else {
                continue;
            };
            let levels: Vec<String> = topic.split('/').map(str::to_owned).collect();
            match (levels.iter().position(|l| l == "+"), key) {
                (Some(plus_at), Some(key)) => {
                    match patterns.iter_mut().find(|p| &p.filter == topic) {
                        Some(p) => {
                            p.keys.insert(key.clone(), i);
                        }
                        None => patterns.push(Pattern {
                            filter: topic.clone(),
                            levels,
                            plus_at,
                            keys: HashMap::from([(key.clone(), i)]),
                        }),
                    }
                }
                (None, Some(key)) => {
                    gateways
                        .entry(topic.clone())
                        .or_default()
                        .insert(key.clone(), i);
                }
                (_, None) => {
                    exact.insert(topic.clone(), i);
                }
            }
        }
        Self {
            devices,
            exact,
            patterns,
            gateways,
        }
    }

    /// Every topic and filter to subscribe to.
    pub(crate) fn filters(&self) -> Vec<String> {
        let mut f: Vec<String> = self.exact.keys().cloned().collect();
        f.extend(self.patterns.iter().map(|p| p.filter.clone()));
        f.extend(self.gateways.keys().cloned());
        f.sort();
        f
    }

    /// The filters with a `+` level and the gateway-API topics: topics whose levels name no
    /// meter (what [`super::redact::Redactor`] may keep of an unknown topic).
    pub(crate) fn patterns(&self) -> impl Iterator<Item = &str> {
        self.patterns
            .iter()
            .map(|p| p.filter.as_str())
            .chain(self.gateways.keys().map(String::as_str))
    }

    /// The device a message on `topic` is from.
    pub(crate) fn device(&self, topic: &str) -> Option<&DeviceConfig> {
        if let Some(i) = self.exact.get(topic) {
            return self.devices.get(*i);
        }
        let levels: Vec<&str> = topic.split('/').collect();
        self.patterns.iter().find_map(|p| {
            if p.levels.len() != levels.len() {
                return None;
            }
            let fixed_match = p
                .levels
                .iter()
                .zip(&levels)
                .enumerate()
                .all(|(i, (want, got))| i == p.plus_at || want == got);
            if !fixed_match {
                return None;
            }
            let i = p.keys.get(*levels.get(p.plus_at)?)?;
            self.devices.get(*i)
        })
    }

    /// Whether messages on `topic` are ThingsBoard gateway-API messages.
    pub(crate) fn is_gateway(&self, topic: &str) -> bool {
        self.gateways.contains_key(topic)
    }

    /// The device under `key` in a gateway-API message on `topic`.
    pub(crate) fn gateway_device(&self, topic: &str, key: &str) -> Option<&DeviceConfig> {
        let i = self.gateways.get(topic)?.get(key)?;
        self.devices.get(*i)
    }

    pub(crate) fn devices(&self) -> &[DeviceConfig] {
        &self.devices
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use super::*;
    use crate::profile::Profile;
    use crate::reading::DeviceId;

    pub(crate) fn device(name: &str, topic: &str, key: Option<&str>) -> DeviceConfig {
        let profile = Profile::parse(
            Path::new("t.toml"),
            "[meter]\nvendor = \"T\"\nmodel = \"T\"\nprotocol = \"mqtt\"\n[mqtt]\nshape = \"json\"\n\
             [[field]]\nname = \"flow_rate\"\npointer = \"/f\"\nunit = \"m3/h\"\ncategory = \"measurement\"\ngrade = \"L2\"\n",
        )
        .unwrap();
        DeviceConfig {
            id: DeviceId::new(name).unwrap(),
            profile: Arc::new(profile),
            kind: crate::config::DeviceKind::Mqtt(MqttTopic {
                source: "s".into(),
                topic: topic.into(),
                key: key.map(str::to_owned),
                expect_every: None,
            }),
            location: None,
            area: None,
            ratios: crate::profile::Ratios::UNITY,
        }
    }

    #[test]
    fn exact_topics_and_one_wildcard_level() {
        let r = Routes::new(vec![
            device("a", "m/a/up", None),
            device("b", "m/+/up", Some("B1")),
            device("c", "m/+/up", Some("C1")),
            device("x", "m/+/up", Some("a")),
            device("s", "/sys/pk/+/thing/event/property/post", Some("dev1")),
            device("g1", "v1/gateway/telemetry", Some("Meter A")),
            device("g2", "v1/gateway/telemetry", Some("Meter B")),
        ]);
        assert_eq!(
            r.filters(),
            [
                "/sys/pk/+/thing/event/property/post",
                "m/+/up",
                "m/a/up",
                "v1/gateway/telemetry"
            ]
        );
        assert!(r.is_gateway("v1/gateway/telemetry") && !r.is_gateway("m/a/up"));
        let gw = |k: &str| {
            r.gateway_device("v1/gateway/telemetry", k)
                .map(|d| d.id.to_string())
        };
        assert_eq!(gw("Meter B").as_deref(), Some("g2"));
        assert_eq!(gw("Meter C"), None);
        assert_eq!(
            r.device("v1/gateway/telemetry").map(|d| d.id.to_string()),
            None
        );
        let who = |t: &str| r.device(t).map(|d| d.id.to_string());
        assert_eq!(who("m/a/up").as_deref(), Some("a"), "exact wins");
        assert_eq!(who("m/B1/up").as_deref(), Some("b"));
        assert_eq!(who("m/C1/up").as_deref(), Some("c"));
        assert_eq!(
            who("/sys/pk/dev1/thing/event/property/post").as_deref(),
            Some("s")
        );
        for unknown in [
            "m/Z9/up",
            "m/B1/down",
            "m/B1/up/x",
            "m/B1",
            "",
            "/sys/pk/dev2/thing/event/property/post",
        ] {
            assert_eq!(who(unknown), None, "{unknown}");
        }
    }
}
