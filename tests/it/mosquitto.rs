//! The end-to-end path against a real, external broker: Debian's mosquitto with mutual
//! TLS. Skipped (with a note on stderr) where mosquitto is not installed, unless
//! `CITYGATE_REQUIRE_MOSQUITTO=1` (CI sets it), which turns a missing broker into a failure.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use citygate::mqtt::CertAuthority;
use citygate::store::{SledStore, Store, StoreOptions};
use citygate::supervisor::{self, KeyMaterial};
use tokio_util::sync::CancellationToken;

use crate::support::*;

pub(crate) fn mosquitto_binary() -> Option<&'static str> {
    ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .find(|p| Path::new(p).exists())
}

/// Kills the broker this test started, by its id, when the test ends.
pub(crate) struct Broker(std::process::Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts mosquitto with the config `conf(port)` writes, on a loopback port nobody uses.
/// Mosquitto cannot listen on port 0 and report the port, so a free port is picked; if
/// another process takes it first, mosquitto exits with "Address already in use" and a
/// fresh port is tried. Ready once mosquitto logs that it is running.
pub(crate) async fn start_mosquitto(
    bin: &str,
    dir: &Path,
    conf: impl Fn(u16) -> String,
) -> (Broker, u16) {
    for attempt in 0..5 {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let conf_path = dir.join("mosquitto.conf");
        std::fs::write(&conf_path, conf(port)).unwrap();
        let log_path = dir.join(format!("mosquitto-{attempt}.log"));
        let mut broker = Broker(
            Command::new(bin)
                .arg("-c")
                .arg(&conf_path)
                .stdout(Stdio::null())
                .stderr(Stdio::from(std::fs::File::create(&log_path).unwrap()))
                .spawn()
                .unwrap(),
        );
        let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
        let mut exited = false;
        let settled = wait_for(Duration::from_secs(10), || {
            exited = broker.0.try_wait().unwrap().is_some();
            exited || log().contains(" running")
        })
        .await;
        assert!(settled, "mosquitto neither ran nor exited: {}", log());
        if !exited {
            return (broker, port);
        }
        assert!(
            log().contains("Address already in use"),
            "mosquitto did not start: {}",
            log()
        );
    }
    panic!("mosquitto found no free port in 5 attempts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meters_to_hub_through_mosquitto_with_mutual_tls() {
    let Some(bin) = mosquitto_binary() else {
        assert!(
            std::env::var("CITYGATE_REQUIRE_MOSQUITTO").is_err(),
            "CITYGATE_REQUIRE_MOSQUITTO is set but mosquitto is not installed"
        );
        eprintln!("note: mosquitto not installed; skipping the external-broker test");
        return;
    };
    let dep = Deployment::new();
    let ca = CertAuthority::generate(&dep.path().join("pki"), "citygate test ca").unwrap();
    let server = ca.issue_localhost_server().unwrap();
    let (_broker, port) = start_mosquitto(bin, dep.path(), |port| {
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\ncafile {}\ncertfile {}\nkeyfile {}\n\
             require_certificate true\nuse_identity_as_username true\ntls_version tlsv1.3\n\
             max_packet_size 1100000\npersistence false\nuser root\n",
            ca.ca_file().display(),
            server.cert.display(),
            server.key.display()
        )
    })
    .await;

    let token = CancellationToken::new();
    let profiles = shipped_profiles();
    let sim = start_sim(&profiles, "eastron-sdm120", 2, 21, &token).await;

    let hub = start_hub(dep.path(), &ca, port).await;

    let devices: String = (1..=2u8)
        .map(|u| device_toml(&format!("m{u}"), "eastron-sdm120", &sim.address, u, "200ms"))
        .collect();
    let cfg = dep.config(
        &["active_power", "energy_import", "voltage_l1"],
        &devices,
        profiles,
    );
    let store: Arc<dyn Store> =
        Arc::new(SledStore::open(&cfg.store.path, StoreOptions::default()).unwrap());
    let running = supervisor::start(&cfg, KeyMaterial::load(&cfg.keys).unwrap(), store.clone());
    let metrics = running.metrics.clone();
    let uplink = start_uplink(&cfg, &running, &ca, port, 8, Duration::from_secs(2)).await;
    assert!(
        wait_for(Duration::from_secs(20), || metrics.batches_acked.get() >= 5).await,
        "hub {:?}",
        hub.hub().stats()
    );
    assert!(running.shutdown(Duration::from_secs(10)).await);
    assert!(
        wait_for(Duration::from_secs(20), || store.stats().total_batches()
            == 0)
        .await
    );
    uplink.finish(Duration::ZERO).await;
    token.cancel();
    let stats = hub.hub().stats();
    hub.shutdown().await;
    assert_eq!(stats.records_written, metrics.records_sealed.get());
    assert!(stats.rejected.values().all(|n| *n == 0), "{stats:?}");
}
