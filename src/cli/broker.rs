//! `citygate broker`: the embedded MQTT broker ([`EmbeddedBroker`], mutual TLS) as a process
//! of its own, until SIGTERM or SIGINT.
//!
//! The one-box broker a hub can also run inside itself (`embedded_broker` in `hub.toml`);
//! as its own process it can be stopped and restarted without the hub (`citygate loadtest
//! --outage`). With `--hub`/`--gateway` names it applies the access rules of
//! [`BrokerAccess`] (the same as the mosquitto ACL of `citygate keys tls`); without, client
//! ids are bound to certificate names and topics are open.

use std::net::SocketAddr;
use std::path::PathBuf;

use tracing::info;

use super::{runtime, shutdown_signal, CliError};
use crate::mqtt::{BrokerAccess, BrokerOptions, EmbeddedBroker, TlsServerFiles};
use crate::telemetry::init_logging;

/// Arguments of `citygate broker`.
#[derive(Debug, clap::Args)]
pub struct BrokerArgs {
    /// Mutual-TLS listener, e.g. 0.0.0.0:8883 (port 0: a free port, printed).
    #[arg(long)]
    pub listen: SocketAddr,
    /// The broker's certificate (leaf first), PEM.
    #[arg(long)]
    pub cert_file: PathBuf,
    /// The broker's private key, PEM.
    #[arg(long)]
    pub key_file: PathBuf,
    /// The CA client certificates must chain to, PEM.
    #[arg(long)]
    pub client_ca_file: PathBuf,
    /// Certificate name with the hub role (repeatable); with `--gateway`, turns the access
    /// rules on.
    #[arg(long = "hub")]
    pub hubs: Vec<String>,
    /// Gateway id with the gateway role (repeatable).
    #[arg(long = "gateway")]
    pub gateways: Vec<String>,
}

/// `citygate broker`
pub fn broker(args: &BrokerArgs) -> Result<(), CliError> {
    init_logging("info,rumqttd=warn", Default::default());
    let mut opts = BrokerOptions::localhost(TlsServerFiles {
        client_ca: args.client_ca_file.clone(),
        cert: args.cert_file.clone(),
        key: args.key_file.clone(),
    });
    opts.listen = args.listen;
    if !args.hubs.is_empty() || !args.gateways.is_empty() {
        opts.access = Some(BrokerAccess {
            hubs: args.hubs.iter().cloned().collect(),
            gateways: args.gateways.iter().cloned().collect(),
        });
    }
    let broker = EmbeddedBroker::start(opts).map_err(|e| CliError::Usage(e.to_string()))?;
    let addr = broker.tls_addr();
    // The line `citygate loadtest` waits for: the listener is bound.
    println!("broker listening on {addr} (mutual TLS)");
    info!(addr = %addr, "broker listening (mutual TLS)");
    runtime()?.block_on(shutdown_signal());
    info!("broker stopping");
    broker.shutdown();
    Ok(())
}
