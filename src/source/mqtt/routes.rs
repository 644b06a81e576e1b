//! Which device a message is from, by its topic.
//!
//! A device listens on a concrete topic, or on a filter with one `+` level and a key: the
//! message's value at that level must equal the key. A concrete topic wins over a filter
//! that also matches it. The subscription list is every distinct topic and filter.

use std::collections::HashMap;

use crate::config::{DeviceConfig, Transport};

#[derive(Debug)]
struct Pattern {
    filter: String,
    levels: Vec<String>,
    plus_at: usize,
    keys: HashMap<String, usize>,
}

/// The devices of one MQTT source, by topic.
#[derive(Debug)]
pub struct Routes {
    devices: Vec<DeviceConfig>,
    exact: HashMap<String, usize>,
    patterns: Vec<Pattern>,
}

impl Routes {
    /// Builds the table; devices with another transport are ignored.
    pub fn new(devices: Vec<DeviceConfig>) -> Self {
        let mut exact = HashMap::new();
        let mut patterns: Vec<Pattern> = Vec::new();
        for (i, d) in devices.iter().enumerate() {
            let Transport::Mqtt { topic, key, .. } = &d.transport else {
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
                _ => {
                    exact.insert(topic.clone(), i);
                }
            }
        }
        Self {
            devices,
            exact,
            patterns,
        }
    }

    /// Every topic and filter to subscribe to.
    pub fn filters(&self) -> Vec<String> {
        let mut f: Vec<String> = self.exact.keys().cloned().collect();
        f.extend(self.patterns.iter().map(|p| p.filter.clone()));
        f.sort();
        f
    }

    /// The device a message on `topic` is from.
    pub fn device(&self, topic: &str) -> Option<&DeviceConfig> {
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

    pub fn devices(&self) -> &[DeviceConfig] {
        &self.devices
    }
}
