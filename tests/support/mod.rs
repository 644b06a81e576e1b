//! Shared fixtures for the integration tests: shipped profiles, simulated meters on
//! loopback, generated keys, and a gateway config pointing at them.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use citygate::config::GatewayConfig;
use citygate::profile::ProfileSet;
use citygate::reading::GatewayId;
use citygate::seal::{keys, OpenedBatch, Opener};
use citygate::sim::{self, SimMeters};
use citygate::store::Store;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub fn shipped_profiles() -> ProfileSet {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("firmware-profiles");
    ProfileSet::load_dir(&dir).unwrap_or_else(|e| panic!("{e:?}"))
}

/// A simulated endpoint serving `count` meters of one profile on 127.0.0.1.
pub struct SimEndpoint {
    pub meters: SimMeters,
    pub address: String,
}

pub async fn start_sim(
    profiles: &ProfileSet,
    profile: &str,
    count: u8,
    seed: u64,
    token: &CancellationToken,
) -> SimEndpoint {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let meters = SimMeters::new(profiles.get(profile).unwrap().clone(), count, seed);
    tokio::spawn(sim::serve(listener, meters.clone(), token.clone()));
    SimEndpoint { meters, address }
}

/// A test deployment directory with generated keys.
pub struct Deployment {
    pub dir: tempfile::TempDir,
}

impl Deployment {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        keys::generate(&dir.path().join("keys"), false).unwrap();
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn store_path(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// The hub side: an opener that trusts this deployment's gateway key.
    pub fn opener(&self, gateway: &GatewayId) -> Opener {
        let mut o =
            Opener::new(keys::load_hub_secret_key(&self.path().join("keys/hub.hpke.key")).unwrap());
        o.register(
            gateway.clone(),
            keys::load_verifying_key(&self.path().join("keys/gateway.sign.pub")).unwrap(),
        );
        o
    }

    /// Writes and loads a gateway config: `devices` is the `[[device]]` TOML.
    pub fn config(
        &self,
        purpose_fields: &[&str],
        devices: &str,
        profiles: ProfileSet,
    ) -> GatewayConfig {
        let text = format!(
            "[gateway]\nid = \"gw-test\"\n\n[purpose]\nname = \"test\"\nfields = {purpose_fields:?}\n\n\
             [batch]\nmax_age = \"200ms\"\n\n[store]\npath = \"store\"\n\n[keys]\nsigning_key = \"keys/gateway.sign.key\"\n\
             hub_public_key = \"keys/hub.hpke.pub\"\npseudonym_key = \"keys/pseudonym.key\"\n\n\
             [modbus]\ntimeout = \"300ms\"\nbackoff_max = \"2s\"\n\n{devices}"
        );
        let path = self.path().join("gateway.toml");
        std::fs::write(&path, &text).unwrap();
        GatewayConfig::parse(&path, &text, Some(profiles)).unwrap_or_else(|e| panic!("{e}"))
    }
}

pub fn device_toml(name: &str, profile: &str, address: &str, unit: u8, interval: &str) -> String {
    format!(
        "[[device]]\nname = \"{name}\"\nprofile = \"{profile}\"\ntransport = {{ type = \"tcp\", address = \"{address}\" }}\nunit = {unit}\npoll_interval = \"{interval}\"\n\n"
    )
}

/// Opens every stored batch of every stream, in order.
pub fn open_all(store: &dyn Store, opener: &Opener) -> Vec<OpenedBatch> {
    let mut out = Vec::new();
    for stream in citygate::reading::Stream::ALL {
        for b in store.peek(stream, 0, usize::MAX).unwrap() {
            out.push(
                opener
                    .open(&b.bytes)
                    .unwrap_or_else(|e| panic!("batch {stream}/{} rejected: {e}", b.seq)),
            );
        }
    }
    out
}

/// Waits (bounded) until `cond` holds.
pub async fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cond()
}

pub fn arc_store(s: impl Store) -> Arc<dyn Store> {
    Arc::new(s)
}

/// Starts `citygate run --config CONFIG` as a child process.
pub fn spawn_run(config: &Path) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_citygate"))
        .args(["run", "--config"])
        .arg(config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// Sends `sig` (e.g. "-TERM", "-KILL") to a child this test started.
pub fn signal(child: &std::process::Child, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits (bounded) for the child to exit; kills it and fails the test past `limit`.
pub async fn wait_exit(
    child: &mut std::process::Child,
    limit: Duration,
) -> std::process::ExitStatus {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if tokio::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("citygate run did not exit within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// MQTT link options for loopback tests: short timeouts and backoff.
pub fn test_link_options(
    port: u16,
    id: &str,
    tls: citygate::uplink::LinkTls,
) -> citygate::uplink::LinkOptions {
    let mut o = citygate::uplink::LinkOptions::new(format!("localhost:{port}"), id, tls);
    o.keep_alive = Duration::from_secs(5);
    o.connect_timeout = Duration::from_secs(5);
    o.backoff = citygate::backoff::BackoffPolicy {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(500),
    };
    o
}

/// Connects a hub to the broker on `port` with a client certificate from `ca` and
/// serves it in a task until `token` is cancelled.
pub fn start_hub_service(
    hub: &Arc<citygate::hub::Hub>,
    ca: &citygate::uplink::CertAuthority,
    port: u16,
    token: &CancellationToken,
) -> tokio::task::JoinHandle<()> {
    use citygate::uplink::{LinkTls, MqttLink};
    let tls = LinkTls::Files(ca.client_files(&ca.issue_client("hub-1").unwrap()));
    let (link, events) = MqttLink::start(test_link_options(port, "hub-1", tls)).unwrap();
    tokio::spawn(citygate::hub::service::serve(
        hub.clone(),
        link,
        events,
        "hubs".to_string(),
        token.clone(),
    ))
}

/// Forwards `running`'s committed batches to the broker on `port` as gateway `gw-test`;
/// cancel the returned token to stop it.
pub fn start_forwarder(
    cfg: &citygate::config::GatewayConfig,
    running: &citygate::supervisor::Running,
    ca: &citygate::uplink::CertAuthority,
    port: u16,
    opts: citygate::uplink::ForwarderOptions,
) -> (tokio::task::JoinHandle<()>, CancellationToken) {
    use citygate::uplink::{Forwarder, LinkTls, MqttLink};
    let tls = LinkTls::Files(ca.client_files(&ca.issue_client("gw-test").unwrap()));
    let (link, events) = MqttLink::start(test_link_options(port, "gw-test", tls)).unwrap();
    let stop = CancellationToken::new();
    let forwarder = Forwarder::new(
        cfg.gateway_id.clone(),
        running.store.clone(),
        link,
        events,
        running.committed_rx.clone(),
        opts,
        running.metrics.clone(),
        stop.clone(),
    );
    (tokio::spawn(forwarder.run()), stop)
}
