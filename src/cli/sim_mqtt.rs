//! `citygate sim --mqtt-broker HOST:PORT …`: simulated meters publishing to a broker.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{runtime, shutdown_signal, CliError, SimArgs};
use crate::mqtt::{LinkOptions, LinkTls, MqttLink, TlsClientFiles};
use crate::profile::mqtt::PayloadShape;
use crate::profile::Profile;
use crate::sim::mqtt::{publish, MqttSim, MqttSimOptions};

/// The MQTT options of `citygate sim`.
#[derive(Debug, clap::Args)]
pub struct MqttSimArgs {
    /// Publish simulated MQTT meters (profile with protocol = "mqtt") to this broker.
    #[arg(long, value_name = "HOST:PORT")]
    pub mqtt_broker: Option<String>,
    /// Payload shape: json, thingsboard or alink (default: the profile's).
    #[arg(long, requires = "mqtt_broker")]
    pub shape: Option<String>,
    /// Topic template; {key} is the meter's key (default depends on the shape).
    #[arg(long, requires = "mqtt_broker")]
    pub topic: Option<String>,
    /// Meter keys are this prefix and a 4-digit number (W0001, W0002, …).
    #[arg(long, default_value = "W")]
    pub key_prefix: String,
    /// Time between two messages of a meter.
    #[arg(long, default_value = "1s")]
    pub interval: String,
    /// Follow every K-th message of a meter with a malformed one.
    #[arg(long, requires = "mqtt_broker")]
    pub malformed_every: Option<u32>,
    /// Connect without TLS. Development only.
    #[arg(long, requires = "mqtt_broker")]
    pub danger_plaintext: bool,
    /// CA the broker's certificate must chain to (TLS; with --cert-file and --key-file).
    #[arg(long, requires_all = ["mqtt_broker", "cert_file", "key_file"])]
    pub ca_file: Option<PathBuf>,
    /// Client certificate presented to the broker.
    #[arg(long, requires = "ca_file")]
    pub cert_file: Option<PathBuf>,
    /// Client private key (mode 0600).
    #[arg(long, requires = "ca_file")]
    pub key_file: Option<PathBuf>,
}

pub(super) fn sim_mqtt(args: &SimArgs, profile: Arc<Profile>) -> Result<(), CliError> {
    let m = &args.mqtt;
    let broker = m.mqtt_broker.clone().unwrap_or_default();
    let shape = match m.shape.as_deref() {
        None => None,
        Some(s) => Some(PayloadShape::parse(s).ok_or_else(|| {
            CliError::Usage(format!(
                "--shape {s:?} is not known; valid: {}",
                PayloadShape::NAMES
            ))
        })?),
    };
    let tls = match (&m.ca_file, &m.cert_file, &m.key_file, m.danger_plaintext) {
        (Some(ca), Some(cert), Some(key), false) => LinkTls::Files(TlsClientFiles {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        }),
        (None, None, None, true) => LinkTls::DangerPlaintext,
        _ => {
            return Err(CliError::Usage(
                "give --ca-file, --cert-file and --key-file, or --danger-plaintext".into(),
            ))
        }
    };
    let interval = crate::config::duration::parse(&m.interval).map_err(CliError::Usage)?;
    if interval < Duration::from_millis(10) {
        return Err(CliError::Usage("--interval must be at least 10ms".into()));
    }
    let spec_shape = profile.mqtt.as_ref().map(|s| s.shape);
    let opts = MqttSimOptions {
        shape,
        topic: m.topic.clone().unwrap_or_else(|| {
            MqttSimOptions::default_topic(shape.or(spec_shape).unwrap_or(PayloadShape::Json))
                .to_owned()
        }),
        key_prefix: m.key_prefix.clone(),
        count: args.count,
        seed: args.seed,
        malformed_every: m.malformed_every,
    };
    let sim = MqttSim::new(profile, &opts).map_err(|e| CliError::Usage(e.to_string()))?;
    let rt = runtime()?;
    rt.block_on(async {
        let client_id = format!("citygate-sim-{}", std::process::id());
        let (link, events) = MqttLink::open(LinkOptions::new(broker.clone(), client_id, tls))
            .await
            .map_err(|e| CliError::Runtime(format!("cannot connect to {broker}: {e}")))?;
        println!(
            "publishing {} x {} as {} to {broker} every {interval:?}",
            args.count,
            args.profile,
            sim.shape().as_str()
        );
        for (key, topic) in sim.topics() {
            println!("  {key}  {topic}");
        }
        let token = CancellationToken::new();
        let task = tokio::spawn(publish(sim, link, events, interval, token.clone()));
        shutdown_signal().await;
        token.cancel();
        let published = task.await.unwrap_or(0);
        println!("published {published} messages");
        Ok(())
    })
}
