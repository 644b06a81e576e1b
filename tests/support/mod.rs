//! Shared fixtures for the integration tests: shipped profiles, simulated meters on
//! loopback, generated keys, and a gateway config pointing at them.
#![allow(dead_code)]

mod fixtures;
pub mod leaks;
mod postgres;
pub use self::postgres::PgServer;
pub use fixtures::*;

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
    ProfileSet::load_dir(&shipped_profiles_dir()).unwrap_or_else(|e| panic!("{e:?}"))
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

/// A loopback port for a component that binds a configured address itself and cannot
/// report a port of its choosing: the returned socket holds the port bound (with
/// SO_REUSEADDR, not listening) so no other process takes it, while a listener that also
/// sets SO_REUSEADDR, as tokio's do, can still bind and listen on it. Keep it alive while
/// the component runs.
pub fn reserve_port() -> (tokio::net::TcpSocket, std::net::SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    (socket, addr)
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

    /// Writes and loads gateway `gw-test`'s config: `devices` is the `[[device]]` TOML.
    pub fn config(
        &self,
        purpose_fields: &[&str],
        devices: &str,
        profiles: ProfileSet,
    ) -> GatewayConfig {
        self.load_config(
            &GatewayToml::new("gw-test", purpose_fields)
                .modbus("300ms", "2s")
                .devices(devices),
            profiles,
        )
    }

    /// Writes and loads `toml` as this deployment's gateway config.
    pub fn load_config(&self, toml: &GatewayToml, profiles: ProfileSet) -> GatewayConfig {
        let path = toml.write(self.path());
        let text = std::fs::read_to_string(&path).unwrap();
        GatewayConfig::parse(&path, &text, Some(profiles)).unwrap_or_else(|e| panic!("{e}"))
    }
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

/// Starts `citygate run --config CONFIG` as a child process; its log is only scanned for
/// raw meter keys ([`leaks`]).
pub fn spawn_run(config: &Path) -> std::process::Child {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_citygate"))
        .args(["run", "--config"])
        .arg(config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().expect("stderr is piped");
    let pid = child.id();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            leaks::scan(pid, "citygate run", &line);
        }
    });
    leaks::keep_reader(pid, reader);
    child
}

/// Starts `citygate ARGS…` as a child process whose log (stderr) the test reads as it is
/// written.
pub fn spawn_logged(args: &[&std::ffi::OsStr]) -> (std::process::Child, LogLines) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_citygate"));
    cmd.args(args);
    spawn_logged_command(cmd)
}

/// Starts `cmd` (which runs citygate, e.g. through a wrapper that sets limits) as a child
/// process whose log (stderr) the test reads as it is written.
pub fn spawn_logged_command(mut cmd: std::process::Command) -> (std::process::Child, LogLines) {
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let command = cmd
        .get_args()
        .take(3)
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let pid = child.id();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            leaks::scan(pid, &command, &line);
            let _ = tx.send(line);
        }
    });
    (
        child,
        LogLines {
            rx,
            text: String::new(),
            pid,
        },
    )
}

/// A child's log lines, in the order written; `text` keeps every line read so far. Dropping
/// it fails the test if a child's log carried a raw meter key ([`leaks`]).
#[derive(Debug)]
pub struct LogLines {
    rx: tokio::sync::mpsc::UnboundedReceiver<String>,
    pub text: String,
    pid: u32,
}

impl Drop for LogLines {
    fn drop(&mut self) {
        leaks::assert_none(self.pid, false);
    }
}

impl LogLines {
    /// Waits (bounded) for a line containing `needle`; false at the deadline or when the
    /// log ends (the child exited).
    pub async fn wait_for(&mut self, needle: &str, limit: Duration) -> bool {
        let found = tokio::time::timeout(limit, async {
            while let Some(line) = self.rx.recv().await {
                let hit = line.contains(needle);
                self.text.push_str(&line);
                self.text.push('\n');
                if hit {
                    return true;
                }
            }
            false
        })
        .await;
        found == Ok(true)
    }

    /// Reads the rest of the log; call after the child exited.
    pub async fn finish(&mut self) -> &str {
        while let Some(line) = self.rx.recv().await {
            self.text.push_str(&line);
            self.text.push('\n');
        }
        &self.text
    }
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
            leaks::assert_none(child.id(), true);
            return status;
        }
        if tokio::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("citygate run did not exit within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Shortens an MQTT link's keep-alive, connect timeout and reconnect backoff for loopback
/// tests.
pub fn fast_link(mut o: citygate::mqtt::LinkOptions) -> citygate::mqtt::LinkOptions {
    o.keep_alive = Duration::from_secs(5);
    o.connect_timeout = Duration::from_secs(5);
    o.backoff = citygate::backoff::BackoffPolicy {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(500),
    };
    o
}

/// MQTT link options for loopback tests: short timeouts and backoff.
pub fn test_link_options(
    port: u16,
    id: &str,
    tls: citygate::mqtt::LinkTls,
) -> citygate::mqtt::LinkOptions {
    fast_link(citygate::mqtt::LinkOptions::new(
        format!("localhost:{port}"),
        id,
        tls,
    ))
}

/// The stamp `cfg`'s first purpose flow is sealed under (the legacy `[purpose]` of the test
/// fixtures seals its alarms under the same): what a hub must approve for it.
pub fn policy_stamp(cfg: &GatewayConfig) -> citygate::seal::PolicyStamp {
    citygate::supervisor::policy_stamps(cfg).remove(0).1
}

/// Starts a hub the way `citygate hub` does ([`citygate::hub::HubProcess`]), as `hub-1` with
/// a client certificate from `ca`, connected to the broker on loopback `port`, approving
/// `gateway`'s policy; its config is written into `dir`. Returns once the broker has granted
/// the hub's subscriptions.
pub async fn start_hub(
    dir: &std::path::Path,
    ca: &citygate::mqtt::CertAuthority,
    port: u16,
    gateway: &GatewayConfig,
) -> citygate::hub::HubProcess {
    start_hub_approving(dir, ca, port, &[policy_stamp(gateway)]).await
}

/// [`start_hub`], approving exactly `approved` for gw-test.
pub async fn start_hub_approving(
    dir: &std::path::Path,
    ca: &citygate::mqtt::CertAuthority,
    port: u16,
    approved: &[citygate::seal::PolicyStamp],
) -> citygate::hub::HubProcess {
    let path = approved
        .iter()
        .fold(
            HubToml::client(port, &TlsFiles::client(ca, "hub-1")).status(),
            HubToml::approve,
        )
        .write(dir);
    let cfg = citygate::hub::HubConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let hub = citygate::hub::HubProcess::start_with(&cfg, fast_link)
        .await
        .unwrap();
    let mut subscribed = hub.subscribed();
    tokio::time::timeout(Duration::from_secs(20), subscribed.wait_for(|s| *s))
        .await
        .expect("hub subscribed within 20 s")
        .expect("hub service running");
    hub
}

/// Starts `running`'s uplink the way `citygate run` does ([`citygate::supervisor::start_uplink_with`]),
/// as gateway `gw-test` with a client certificate from `ca`, to the broker on loopback `port`.
pub async fn start_uplink(
    cfg: &citygate::config::GatewayConfig,
    running: &citygate::supervisor::Running,
    ca: &citygate::mqtt::CertAuthority,
    port: u16,
    window: usize,
    ack_timeout: Duration,
) -> citygate::supervisor::UplinkHandle {
    let files = TlsFiles::client(ca, "gw-test");
    let mut cfg = cfg.clone();
    cfg.uplink = Some(citygate::config::UplinkConfig {
        broker: format!("localhost:{port}"),
        client_id: "gw-test".to_string(),
        tls: Some(citygate::config::TlsFiles {
            ca_file: files.ca,
            cert_file: files.cert,
            key_file: files.key,
        }),
        window,
        ack_timeout,
        reconnect: citygate::backoff::BackoffPolicy::RECONNECT,
    });
    citygate::supervisor::start_uplink_with(&cfg, running, fast_link)
        .await
        .unwrap()
        .expect("the config has an uplink")
}

/// The status endpoint address a running gateway with store `store` recorded, waiting for it
/// (bounded) while the gateway starts.
pub async fn status_address(store: &Path) -> std::net::SocketAddr {
    assert!(
        wait_for(Duration::from_secs(20), || {
            citygate::status::read_address_file(store).is_some()
        })
        .await,
        "the gateway never recorded its status address in {}",
        store.display()
    );
    citygate::status::read_address_file(store).unwrap()
}

/// Opens `cfg`'s store and starts the gateway's pipeline on it (no uplink yet).
pub fn start_gateway(cfg: &GatewayConfig) -> (Arc<dyn Store>, citygate::supervisor::Running) {
    let store: Arc<dyn Store> = Arc::new(
        citygate::store::SledStore::open(&cfg.store.path, citygate::store::StoreOptions::default())
            .unwrap(),
    );
    let keys = citygate::supervisor::KeyMaterial::load(&cfg.keys).unwrap();
    let running = citygate::supervisor::start(cfg, keys, store.clone());
    (store, running)
}
