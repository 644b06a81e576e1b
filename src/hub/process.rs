//! A running hub as `citygate hub` starts it: optionally its own broker, the MQTT link,
//! and the service task. Tests and the CLI start and stop it the same way.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{service, Hub, HubConfig, HubError};
use crate::uplink::{
    BrokerError, BrokerOptions, EmbeddedBroker, LinkError, LinkOptions, LinkTls, MqttLink,
    TlsClientFiles,
};

/// Why a hub could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Hub(#[from] HubError),
    #[error("embedded broker: {0}")]
    Broker(#[from] BrokerError),
    #[error("mqtt: {0}")]
    Link(#[from] LinkError),
}

/// A started hub; [`HubProcess::shutdown`] stops it.
#[derive(Debug)]
pub struct HubProcess {
    hub: Arc<Hub>,
    broker: Option<EmbeddedBroker>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl HubProcess {
    /// Opens the hub's state and sink, starts the embedded broker if configured, connects
    /// and serves. Must run inside a tokio runtime; binding the broker blocks briefly.
    pub fn start(cfg: &HubConfig) -> Result<HubProcess, StartError> {
        Self::start_with(cfg, |o| o)
    }

    /// [`start`](Self::start) with a hook to adjust the MQTT link options (tests shorten
    /// timeouts and backoff).
    pub fn start_with(
        cfg: &HubConfig,
        adjust: impl FnOnce(LinkOptions) -> LinkOptions,
    ) -> Result<HubProcess, StartError> {
        let hub = Arc::new(Hub::open(cfg)?);
        let broker = match &cfg.mqtt.embedded_broker {
            Some(e) => {
                let mut opts = BrokerOptions::localhost(e.tls.clone());
                opts.listen = e.listen;
                let b = EmbeddedBroker::start(opts)?;
                info!(addr = %b.tls_addr(), "embedded broker listening (mutual TLS)");
                Some(b)
            }
            None => None,
        };
        let target = match (&broker, cfg.mqtt.broker_is_embedded) {
            (Some(b), true) => format!("localhost:{}", b.tls_addr().port()),
            _ => cfg.mqtt.broker.clone(),
        };
        let tls = match &cfg.mqtt.tls {
            Some(t) => LinkTls::Files(TlsClientFiles {
                ca: t.ca_file.clone(),
                cert: t.cert_file.clone(),
                key: t.key_file.clone(),
            }),
            None => {
                warn!(broker = %target, "hub connects without TLS (danger_plaintext)");
                LinkTls::DangerPlaintext
            }
        };
        let opts = adjust(LinkOptions::new(target, cfg.mqtt.client_id.clone(), tls));
        let (link, events) = MqttLink::start(opts)?;
        let stop = CancellationToken::new();
        let task = tokio::spawn(service::serve(
            hub.clone(),
            link,
            events,
            cfg.mqtt.share_group.clone(),
            stop.clone(),
        ));
        Ok(HubProcess {
            hub,
            broker,
            stop,
            task,
        })
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Where the embedded broker listens, if the hub runs one.
    pub fn broker_addr(&self) -> Option<SocketAddr> {
        self.broker.as_ref().map(EmbeddedBroker::tls_addr)
    }

    /// Stops the service (the link disconnects), then the embedded broker.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
        if let Some(b) = self.broker {
            // rumqttd's threads join on shutdown: keep that off the async workers.
            let _ = tokio::task::spawn_blocking(move || b.shutdown()).await;
        }
    }
}
