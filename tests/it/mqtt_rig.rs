//! A broker with mutual TLS and MQTT water meters the test publishes for: the rig of the
//! policy, emergency and checkpoint tests.

use std::path::Path;
use std::time::Duration;

use citygate::mqtt::{BrokerOptions, CertAuthority, EmbeddedBroker};

use crate::support::*;

/// The shipped NB-IoT water meter profile (JSON over MQTT; `volume_forward` rolls over at
/// 10⁸ m³).
pub(crate) const MQTT_WATER: &str = "oem-nbiot-water-mqtt";

/// An NB-IoT water meter's `deviceReq` payload, as the shipped profile reads it.
pub(crate) fn water_payload(key: &str, total: f64, flow: f64, at_ms: i64) -> Vec<u8> {
    let at = jiff::Timestamp::from_millisecond(at_ms).unwrap();
    serde_json::json!({
        "msgType": "deviceReq",
        "data": [{
            "serviceId": "WaterMeter",
            "serviceData": { "meterId": key, "totalFlow": total, "flow": flow },
            "eventTime": at.strftime("%Y%m%dT%H%M%SZ").to_string(),
        }],
    })
    .to_string()
    .into_bytes()
}

/// A broker with mutual TLS, a gateway with an MQTT meter source on it, a hub approving
/// every flow of the gateway, and a meters' connection to publish with.
pub(crate) struct MqttRig {
    pub(crate) dep: Deployment,
    pub(crate) ca: CertAuthority,
    pub(crate) broker: EmbeddedBroker,
    pub(crate) port: u16,
}

impl MqttRig {
    pub(crate) fn new() -> Self {
        let dep = Deployment::new();
        let ca = CertAuthority::generate(&dep.path().join("pki"), "citygate test ca").unwrap();
        let server = ca.issue_localhost_server().unwrap();
        let broker =
            EmbeddedBroker::start(BrokerOptions::localhost(ca.server_files(&server))).unwrap();
        let port = broker.tls_addr().port();
        Self {
            dep,
            ca,
            broker,
            port,
        }
    }

    /// The gateway config: `flows` from the policy files in `dir`, the meters `keys` as
    /// devices named by [`device_name`] behind one source (`W0999`, the warm-up key, is no
    /// device).
    pub(crate) fn config(
        &self,
        dir: &Path,
        flows: &[&str],
        keys: &[&str],
    ) -> citygate::config::GatewayConfig {
        let toml = self.toml(dir, flows, keys);
        self.dep.load_config(&toml, shipped_profiles())
    }

    /// The gateway config [`MqttRig::config`] loads, to change before loading.
    pub(crate) fn toml(&self, dir: &Path, flows: &[&str], keys: &[&str]) -> GatewayToml {
        // Its own certificate: the uplink issues (and rewrites) gw-test's.
        let client = TlsFiles::client(&self.ca, "gw-test-meters");
        let mut devices = mqtt_source_toml("meters", self.port, &client, "");
        for k in keys {
            devices +=
                &mqtt_device_toml(&device_name(k), MQTT_WATER, "meters", "water/+/up", Some(k));
        }
        GatewayToml::new("gw-test", &[])
            .policies(dir, flows, None)
            .devices(&devices)
    }

    /// A meters' connection that has seen the gateway's source subscribed: it publishes
    /// warm-up messages for a key no device has (so they reach no flow) until the gateway
    /// received one, so later QoS 1 messages arrive.
    pub(crate) async fn meters_link(
        &self,
        metrics: &citygate::telemetry::Metrics,
    ) -> citygate::mqtt::MqttLink {
        let tls = citygate::mqtt::LinkTls::Files(
            self.ca
                .client_files(&self.ca.issue_client("meters").unwrap()),
        );
        let (link, mut events) =
            citygate::mqtt::MqttLink::start(test_link_options(self.port, "meters", tls)).unwrap();
        tokio::spawn(async move { while events.recv().await.is_some() {} });
        let at = citygate::reading::now_ms() - 600_000;
        for _ in 0..600 {
            if metrics.mqtt_messages.get() >= 1 {
                return link;
            }
            publish(
                &link,
                "water/W0999/up",
                water_payload("W0999", 1.0, 0.0, at),
            )
            .await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "the gateway never received a meter message; source connects {}",
            metrics.mqtt_source_connects.get()
        );
    }

    /// The hub's JSON Lines, parsed.
    pub(crate) fn sink(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dep.path().join("records.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

pub(crate) async fn publish(link: &citygate::mqtt::MqttLink, topic: &str, payload: Vec<u8>) {
    link.publish(
        topic,
        citygate::mqtt::QoS::AtLeastOnce,
        bytes::Bytes::from(payload),
    )
    .await
    .unwrap();
}

/// The name of the device configured for meter `key` (`W0001` → `flat-0001`): an operator's
/// name for the place, not the meter's own key, which the purposes pseudonymise and the logs
/// must not show.
pub(crate) fn device_name(key: &str) -> String {
    format!(
        "flat-{}",
        key.trim_start_matches(|c: char| c.is_ascii_alphabetic())
    )
}
