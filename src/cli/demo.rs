//! `citygate demo`: simulated meters, the gateway, an embedded MQTT broker with mutual
//! TLS and the hub, in one process.
//!
//! Everything runs from embedded defaults: the profiles are compiled in; keys, a CA and
//! certificates are generated into a temporary directory; the simulated meters and the
//! broker listen on 127.0.0.1 with ports chosen by the OS; the store, the hub's state and
//! its JSON Lines sink live in the temporary directory, removed at the end. Halfway
//! through, the broker is stopped for a few seconds so batches pile up in the store and
//! drain after it returns. The summary counts what the hub wrote against what the
//! gateway sealed.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{runtime, CliError};
use crate::backoff::BackoffPolicy;
use crate::config::GatewayConfig;
use crate::hub::{HubConfig, HubProcess};
use crate::mqtt::{BrokerOptions, CertAuthority, EmbeddedBroker, LinkOptions};
use crate::profile::{Profile, ProfileSet};
use crate::sim::{self, SimMeters};
use crate::store::{Outbox, SledStore, StoreOptions};
use crate::supervisor::{self, KeyMaterial};

/// Profiles compiled into the binary for the demo: (name, text, meters' poll interval).
const PROFILES: &[(&str, &str)] = &[
    (
        "chint-ddsu666",
        include_str!("../../firmware-profiles/chint-ddsu666.toml"),
    ),
    (
        "eastron-sdm630",
        include_str!("../../firmware-profiles/eastron-sdm630.toml"),
    ),
    (
        "oem-tuf-2000m",
        include_str!("../../firmware-profiles/oem-tuf-2000m.toml"),
    ),
];

/// The shipped purpose policies, compiled in, and the demo's own live flow.
const POLICIES: &[(&str, &str)] = &[
    (
        "billing",
        include_str!("../../config/policies/billing.toml"),
    ),
    (
        "grid-operation",
        include_str!("../../config/policies/grid-operation.toml"),
    ),
    (
        "leak-detection",
        include_str!("../../config/policies/leak-detection.toml"),
    ),
    (
        "open-data",
        include_str!("../../config/policies/open-data.toml"),
    ),
    ("alarms", include_str!("../../config/policies/alarms.toml")),
    ("demo-monitoring", DEMO_MONITORING),
];

/// A live flow for the demo to show while the shipped policies' windows (15 min to a day)
/// are still open: grid quality only (not personal), coarsened.
const DEMO_MONITORING: &str = r#"[purpose]
name = "demo-monitoring"
description = "Live feeder voltage and grid frequency, coarsened, for the demo's screen"
legal_basis = "Demonstration with simulated meters"
owner = "citygate demo"
retention = "1d"

[[rule]]
field = "voltage_l1"
action = "generalise"
step = 0.5

[[rule]]
field = "frequency"
action = "generalise"
step = 0.01
"#;

/// What the demo measured, also written as JSON with `--summary-json`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub(crate) struct Summary {
    pub duration_s: f64,
    pub meters: usize,
    pub readings_polled: u64,
    pub records_sealed: u64,
    /// Aggregate records the purpose flows emitted (per meter and per area).
    pub aggregates_emitted: u64,
    /// Area aggregates withheld because fewer than k meters contributed.
    pub aggregates_suppressed: u64,
    pub batches_committed: u64,
    pub batches_acked: u64,
    pub hub_records_written: u64,
    pub hub_duplicates_dropped: u64,
    pub hub_rejected: u64,
    /// Most `readings` batches waiting in the gateway's store during the outage.
    pub outage_batches_buffered: u64,
    /// Records the gateway sealed and committed that the hub never wrote.
    pub records_lost: u64,
    pub samples_dropped: u64,
}

fn embedded_profiles() -> Result<ProfileSet, CliError> {
    let mut set = ProfileSet::default();
    for (name, text) in PROFILES {
        let p = Profile::parse(Path::new(&format!("{name}.toml")), text)
            .map_err(|e| CliError::Runtime(format!("embedded profile {name} is invalid: {e:?}")))?;
        set.insert(p);
    }
    Ok(set)
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir() -> Result<TempDir, CliError> {
    let dir = std::env::temp_dir().join(format!(
        "citygate-demo-{}-{}",
        std::process::id(),
        crate::reading::now_ms()
    ));
    std::fs::create_dir_all(&dir)
        .map_err(|e| CliError::Runtime(format!("cannot create {}: {e}", dir.display())))?;
    Ok(TempDir(dir))
}

/// `citygate demo`
pub fn demo(duration: Duration, meters: u8, summary_json: Option<&Path>) -> Result<(), CliError> {
    // The outage is part of the show: only errors of citygate itself are logged.
    crate::telemetry::init_logging("citygate=error,rumqttd=off,rumqttc=off", Default::default());
    if meters == 0 || meters > 50 {
        return Err(CliError::Usage("--meters must be 1..=50".into()));
    }
    let tmp = temp_dir()?;
    let rt = runtime()?;
    let summary = rt.block_on(run_demo(&tmp.0, duration, meters))?;
    print_summary(&summary);
    if let Some(path) = summary_json {
        let json =
            serde_json::to_string_pretty(&summary).map_err(|e| CliError::Runtime(e.to_string()))?;
        std::fs::write(path, json + "\n")
            .map_err(|e| CliError::Runtime(format!("cannot write {}: {e}", path.display())))?;
    }
    if summary.records_lost > 0 || summary.hub_rejected > 0 {
        return Err(CliError::Runtime(
            "records were lost or rejected on the way to the hub".into(),
        ));
    }
    Ok(())
}

async fn run_demo(dir: &Path, duration: Duration, meters: u8) -> Result<Summary, CliError> {
    let rt_err = |e: &dyn std::fmt::Display| CliError::Runtime(e.to_string());
    let profiles = embedded_profiles()?;
    crate::seal::handover::generate_one_box(&dir.join("hub-keys"), &dir.join("keys"))
        .map_err(|e| rt_err(&e))?;
    let token = CancellationToken::new();

    // Simulated meters.
    let mut devices = String::new();
    for (i, profile) in profiles.iter().enumerate() {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| rt_err(&e))?;
        let addr = listener.local_addr().map_err(|e| rt_err(&e))?;
        let sim = SimMeters::new(profile.clone(), meters, 7 + i as u64);
        tokio::spawn(sim::serve(listener, sim, token.clone()));
        for unit in 1..=meters {
            let _ = write!(
                devices,
                "[[device]]\nname = \"{}-{unit}\"\nprofile = \"{}\"\ntransport = {{ type = \"tcp\", address = \"{addr}\" }}\nunit = {unit}\npoll_interval = \"1s\"\ntimeout = \"500ms\"\narea = \"demo-district\"\n\n",
                profile.name, profile.name
            );
        }
    }

    // PKI and the embedded broker with mutual TLS.
    let ca =
        CertAuthority::generate(&dir.join("pki"), "citygate demo ca").map_err(|e| rt_err(&e))?;
    let server = ca.issue_localhost_server().map_err(|e| rt_err(&e))?;
    let hub_cert = ca.issue_client("demo-hub").map_err(|e| rt_err(&e))?;
    let gw_cert = ca.issue_client("demo-gateway").map_err(|e| rt_err(&e))?;
    let broker = EmbeddedBroker::start(BrokerOptions::localhost(ca.server_files(&server)))
        .map_err(|e| rt_err(&e))?;
    let port = broker.tls_addr().port();

    // The gateway, under the shipped purpose policies.
    std::fs::create_dir_all(dir.join("policies")).map_err(|e| rt_err(&e))?;
    for (name, text) in POLICIES {
        std::fs::write(dir.join(format!("policies/{name}.toml")), text).map_err(|e| rt_err(&e))?;
    }
    let config_text = format!(
        "[gateway]\nid = \"demo-gateway\"\ntime_zone = \"Asia/Shanghai\"\n\n\
         [policies]\nflows = [\"demo-monitoring\", \"billing\", \"grid-operation\", \"leak-detection\", \"open-data\"]\nalarms = \"alarms\"\n\n\
         [batch]\nmax_age = \"1s\"\n\n[store]\npath = \"store\"\n\n[keys]\nsigning_key = \"keys/gateway.sign.key\"\n\
         hub_public_key = \"keys/hub.hpke.pub\"\npseudonym_key = \"keys/pseudonym.key\"\nhub_ack_key = \"keys/hub.ack.pub\"\n\n\
         [uplink]\nbroker = \"localhost:{port}\"\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n\
         # A batch published while the hub is still re-subscribing after the outage is lost\n\
         # by the broker; a short ack timeout re-sends it quickly.\nack_timeout = \"3s\"\n\n\
         [status]\nlisten = \"off\"\n\n{devices}",
        ca.ca_file().display().to_string(),
        gw_cert.cert.display().to_string(),
        gw_cert.key.display().to_string(),
    );
    let config_path = dir.join("gateway.toml");
    std::fs::write(&config_path, &config_text).map_err(|e| rt_err(&e))?;
    let cfg = GatewayConfig::parse(&config_path, &config_text, Some(profiles))
        .map_err(CliError::Config)?;
    // Key files and sled: on a blocking thread.
    let (keys, store_path) = (cfg.keys.clone(), cfg.store.path.clone());
    let (keys_loaded, outbox) = tokio::task::spawn_blocking(move || {
        let keys = KeyMaterial::load(&keys).map_err(|e| rt_err(&e))?;
        let store =
            SledStore::open(&store_path, StoreOptions::default()).map_err(|e| rt_err(&e))?;
        Ok::<_, CliError>((keys, Outbox::new(Arc::new(store))))
    })
    .await
    .map_err(|e| rt_err(&e))??;
    // The hub, approving the gateway's policy.
    let approvals = supervisor::approval_toml(&supervisor::policy_stamps(&cfg));
    let hub_files = ca.client_files(&hub_cert);
    let hub_text = format!(
        "[hub]\nid = \"demo-hub\"\nhpke_secret_key = \"hub-keys/hub.hpke.key\"\nack_signing_key = \"hub-keys/hub.ack.key\"\nstate_path = \"hub-state\"\n\n\
         [sink]\ntype = \"jsonl\"\npath = \"records.jsonl\"\n\n[mqtt]\nbroker = \"localhost:{port}\"\n\
         ca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n\n[status]\nlisten = \"off\"\n\n\
         [[gateway]]\nid = \"demo-gateway\"\n\
         verifying_key = \"keys/gateway.sign.pub\"\n\
         policies = {approvals}\n",
        hub_files.ca.display().to_string(),
        hub_files.cert.display().to_string(),
        hub_files.key.display().to_string(),
    );
    let hub_path = dir.join("hub.toml");
    std::fs::write(&hub_path, hub_text).map_err(|e| rt_err(&e))?;
    let hub_cfg = HubConfig::load(&hub_path).map_err(CliError::Config)?;
    let hub_process = HubProcess::start_with(&hub_cfg, quick_link)
        .await
        .map_err(|e| rt_err(&e))?;
    let hub = hub_process.hub().clone();
    let running = supervisor::start(&cfg, keys_loaded, outbox.clone());
    let metrics = running.metrics.clone();
    let uplink = supervisor::start_uplink_with(&cfg, &running, quick_link)
        .await
        .map_err(|e| rt_err(&e))?
        .ok_or_else(|| CliError::Runtime("the demo config has no [uplink]".into()))?;

    println!(
        "citygate demo: {} simulated meters ({}) → gateway → MQTT over mutual TLS (embedded broker on 127.0.0.1:{port}) → hub",
        cfg.devices.len(),
        cfg.profiles.names().collect::<Vec<_>>().join(", "),
    );
    for flow in cfg.policies.flows.iter().chain(&cfg.policies.alarms) {
        println!(
            "purpose {:<16} on stream {:<10} {}",
            flow.policy.name(),
            flow.stream.to_string(),
            flow.policy.meta().description
        );
    }
    println!(
        "every meter is in area \"demo-district\"; windows of 15 min to a day are still open when the demo ends and leave marked partial; \
         area aggregates covering fewer than k meters are withheld; everything no policy names stays on the box"
    );
    println!("the uplink is cut for a few seconds halfway through: batches wait in the store and drain after\n");

    let started = tokio::time::Instant::now();
    let outage_at = duration / 2;
    let outage_len = (duration / 5).clamp(Duration::from_secs(3), Duration::from_secs(8));
    let mut broker = Some(broker);
    let mut outage_end: Option<tokio::time::Instant> = None;
    let mut buffered_max = 0u64;
    let mut sink_offset = 0u64;
    let sink_path = dir.join("records.jsonl");
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while started.elapsed() < duration {
        tick.tick().await;
        let mut note = "";
        if outage_end.is_none() && started.elapsed() >= outage_at {
            if let Some(b) = broker.take() {
                b.shutdown();
            }
            outage_end = Some(tokio::time::Instant::now() + outage_len);
            note = "  ✂ uplink cut";
        }
        if let Some(end) = outage_end {
            if broker.is_none() {
                buffered_max =
                    buffered_max.max(outbox.stats().get(crate::reading::Stream::Readings).batches);
                if tokio::time::Instant::now() >= end {
                    let mut opts = BrokerOptions::localhost(ca.server_files(&server));
                    opts.listen.set_port(port);
                    broker = Some(EmbeddedBroker::start(opts).map_err(|e| rt_err(&e))?);
                    note = "  ↺ uplink restored";
                }
            }
        }
        let hs = hub.stats();
        let s = outbox.stats();
        println!(
            "t={:>3}s  polls={:<5} sealed={:<6} committed={:<4} acked={:<4} store={:<3} hub written={:<6} dup={} rejected={}{note}",
            started.elapsed().as_secs(),
            metrics.samples_polled.get(),
            metrics.records_sealed.get(),
            metrics.batches_committed.get(),
            metrics.batches_acked.get(),
            s.total_batches(),
            hs.records_written,
            hs.duplicates,
            hs.rejected.values().sum::<u64>(),
        );
        if started.elapsed().as_secs() % 3 == 0 {
            print!("{}", new_sink_rows(&sink_path, &mut sink_offset, 4));
        }
    }

    // Stop polling, let the uplink deliver the rest, then stop everything.
    let clean = running.shutdown(Duration::from_secs(10)).await;
    uplink.finish(Duration::from_secs(20)).await;
    token.cancel();
    hub_process.shutdown().await;
    if let Some(b) = broker {
        b.shutdown();
    }
    if !clean {
        return Err(CliError::Runtime(
            "the gateway did not shut down within its grace period".into(),
        ));
    }
    let hs = hub.stats();
    Ok(Summary {
        duration_s: started.elapsed().as_secs_f64(),
        meters: cfg.devices.len(),
        readings_polled: metrics.readings_normalised.get(),
        records_sealed: metrics.records_sealed.get(),
        aggregates_emitted: metrics.aggregates_emitted.get(),
        aggregates_suppressed: metrics.aggregates_suppressed.get(),
        batches_committed: metrics.batches_committed.get(),
        batches_acked: metrics.batches_acked.get(),
        hub_records_written: hs.records_written,
        hub_duplicates_dropped: hs.duplicates,
        hub_rejected: hs.rejected.values().sum(),
        outage_batches_buffered: buffered_max,
        records_lost: metrics
            .records_sealed
            .get()
            .saturating_sub(hs.records_written),
        samples_dropped: metrics.samples_dropped.get(),
    })
}

/// Loopback link options for the demo: short keep-alive and backoff, so the outage and
/// the recovery are visible within seconds.
fn quick_link(mut o: LinkOptions) -> LinkOptions {
    o.keep_alive = Duration::from_secs(5);
    o.connect_timeout = Duration::from_secs(5);
    o.backoff = BackoffPolicy {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(1),
    };
    o
}

/// The newest rows the hub wrote since `offset`, as a compact table.
fn new_sink_rows(path: &Path, offset: &mut u64, max: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        if f.seek(SeekFrom::Start(*offset)).is_ok() && f.read_to_string(&mut text).is_ok() {
            // Only whole lines; a partial last line is read next time.
            let whole = text.rfind('\n').map_or(0, |i| i + 1);
            text.truncate(whole);
            *offset += whole as u64;
        }
    }
    let mut out = String::new();
    for line in text
        .lines()
        .rev()
        .take(max)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
    {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
            let subject = v["subject"].as_str().unwrap_or("");
            let _ = writeln!(
                out,
                "         hub ← {:<8} {}…  {:<16} {:>16} {}",
                format!("{}#{}", v["stream"].as_str().unwrap_or(""), v["seq"]),
                &subject[..subject.len().min(12)],
                v["field"].as_str().unwrap_or(""),
                v["value"].to_string(),
                v["unit"].as_str().unwrap_or("")
            );
        }
    }
    out
}

fn print_summary(s: &Summary) {
    println!("\nsummary");
    println!("  meters                   {}", s.meters);
    println!("  readings polled          {}", s.readings_polled);
    println!("  records sealed           {}", s.records_sealed);
    println!(
        "  aggregates               {} emitted, {} withheld (fewer than k meters)",
        s.aggregates_emitted, s.aggregates_suppressed
    );
    println!("  batches committed        {}", s.batches_committed);
    println!("  batches acked by the hub {}", s.batches_acked);
    println!("  hub records written      {}", s.hub_records_written);
    println!("  hub duplicates dropped   {}", s.hub_duplicates_dropped);
    println!("  hub rejected             {}", s.hub_rejected);
    println!(
        "  buffered during outage   {} batches",
        s.outage_batches_buffered
    );
    println!("  records lost             {}", s.records_lost);
}
