//! `citygate demo`: simulated meters, the gateway and a hub-side check in one process.
//!
//! Everything runs from embedded defaults: the profiles are compiled in, keys are
//! generated into a temporary directory, the simulated meters listen on 127.0.0.1 with
//! ports chosen by the OS, and the store lives in the temporary directory, removed at
//! the end. Until the uplink exists the demo plays the hub's part itself: it verifies
//! and decrypts committed batches with the hub key and shows the records.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{runtime, CliError};
use crate::config::GatewayConfig;
use crate::profile::{Profile, ProfileSet};
use crate::reading::Stream;
use crate::seal::{keys, Opener};
use crate::sim::{self, SimMeters};
use crate::store::{SledStore, Store, StoreOptions};
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

const PURPOSE_FIELDS: &[&str] = &[
    "active_power",
    "energy_import",
    "voltage_l1",
    "frequency",
    "volume_forward",
    "flow_rate",
    "meter_address",
];

/// What the demo measured, also written as JSON with `--summary-json`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Summary {
    pub duration_s: f64,
    pub meters: usize,
    pub readings_polled: u64,
    pub records_sealed: u64,
    pub batches_sealed: u64,
    pub batches_committed: u64,
    pub batches_verified: u64,
    pub records_decrypted: u64,
    pub batches_rejected: u64,
    /// Records sealed by the gateway that the hub-side check could not decrypt.
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
    crate::telemetry::init_logging("warn");
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
    if summary.records_lost > 0 || summary.batches_rejected > 0 {
        return Err(CliError::Runtime(
            "the hub-side check found lost or rejected records".into(),
        ));
    }
    Ok(())
}

async fn run_demo(dir: &Path, duration: Duration, meters: u8) -> Result<Summary, CliError> {
    let rt_err = |e: &dyn std::fmt::Display| CliError::Runtime(e.to_string());
    let profiles = embedded_profiles()?;
    let generated = keys::generate(&dir.join("keys"), false).map_err(|e| rt_err(&e))?;
    let _ = generated;
    let token = CancellationToken::new();
    let mut devices = String::new();
    let mut sims = Vec::new();
    for (i, profile) in profiles.iter().enumerate() {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| rt_err(&e))?;
        let addr = listener.local_addr().map_err(|e| rt_err(&e))?;
        let sim = SimMeters::new(profile.clone(), meters, 7 + i as u64);
        tokio::spawn(sim::serve(listener, sim.clone(), token.clone()));
        sims.push(sim);
        for unit in 1..=meters {
            let _ = write!(
                devices,
                "[[device]]\nname = \"{}-{unit}\"\nprofile = \"{}\"\ntransport = {{ type = \"tcp\", address = \"{addr}\" }}\nunit = {unit}\npoll_interval = \"1s\"\ntimeout = \"500ms\"\n\n",
                profile.name, profile.name
            );
        }
    }
    let known: Vec<&str> = PURPOSE_FIELDS
        .iter()
        .copied()
        .filter(|f| profiles.iter().any(|p| p.field(f).is_some()))
        .collect();
    let config_text = format!(
        "[gateway]\nid = \"demo-gateway\"\n\n[purpose]\nname = \"demo-grid-and-water-planning\"\nfields = {known:?}\n\n\
         [batch]\nmax_age = \"1s\"\n\n[store]\npath = \"store\"\n\n[keys]\nsigning_key = \"keys/gateway.sign.key\"\n\
         hub_public_key = \"keys/hub.hpke.pub\"\npseudonym_key = \"keys/pseudonym.key\"\n\n{devices}"
    );
    let config_path = dir.join("gateway.toml");
    std::fs::write(&config_path, &config_text).map_err(|e| rt_err(&e))?;
    let cfg = GatewayConfig::parse(&config_path, &config_text, Some(profiles))
        .map_err(CliError::Config)?;
    let keys_loaded = KeyMaterial::load(&cfg.keys).map_err(|e| rt_err(&e))?;
    let mut opener = Opener::new(
        keys::load_hub_secret_key(&dir.join("keys/hub.hpke.key")).map_err(|e| rt_err(&e))?,
    );
    opener.register(
        cfg.gateway_id.clone(),
        keys::load_verifying_key(&dir.join("keys/gateway.sign.pub")).map_err(|e| rt_err(&e))?,
    );
    let store: Arc<dyn Store> = Arc::new(
        SledStore::open(&cfg.store.path, StoreOptions::default()).map_err(|e| rt_err(&e))?,
    );

    println!(
        "citygate demo: {} simulated meters ({}) on 127.0.0.1, polled every 1s for {:?}",
        cfg.devices.len(),
        cfg.profiles.names().collect::<Vec<_>>().join(", "),
        duration
    );
    println!("purpose {:?} needs: {}", cfg.purpose.name, known.join(", "));
    println!("(the uplink to a remote hub arrives with the next release; the demo verifies and decrypts committed batches itself)\n");

    let running = supervisor::start(&cfg, keys_loaded, store.clone());
    let metrics = running.metrics.clone();
    let started = tokio::time::Instant::now();
    let mut next_seq = 1u64;
    let mut verified = Summary::default();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    while started.elapsed() < duration {
        tick.tick().await;
        let shown = show_new_batches(&store, &opener, &mut next_seq, &mut verified, true).await;
        let s = store.stats();
        println!(
            "  t={:>3}s  polls={:<5} readings={:<6} records sealed={:<6} batches committed={:<4} store={} batches/{} B{}",
            started.elapsed().as_secs(),
            metrics.samples_polled.get(),
            metrics.readings_normalised.get(),
            metrics.records_sealed.get(),
            metrics.batches_committed.get(),
            s.total_batches(),
            s.total_bytes(),
            if shown.is_empty() { String::new() } else { format!("\n{shown}") }
        );
    }
    let clean = running.shutdown(Duration::from_secs(10)).await;
    token.cancel();
    let _ = show_new_batches(&store, &opener, &mut next_seq, &mut verified, false).await;
    if !clean {
        return Err(CliError::Runtime(
            "the gateway did not shut down within its grace period".into(),
        ));
    }
    Ok(Summary {
        duration_s: started.elapsed().as_secs_f64(),
        meters: cfg.devices.len(),
        readings_polled: metrics.readings_normalised.get(),
        records_sealed: metrics.records_sealed.get(),
        batches_sealed: metrics.batches_sealed.get(),
        batches_committed: metrics.batches_committed.get(),
        batches_verified: verified.batches_verified,
        records_decrypted: verified.records_decrypted,
        batches_rejected: verified.batches_rejected,
        records_lost: metrics
            .records_sealed
            .get()
            .saturating_sub(verified.records_decrypted),
        samples_dropped: metrics.samples_dropped.get(),
    })
}

/// Opens committed `readings` batches from `next_seq` on, as the hub would; returns a
/// few rows of the newest batch for display.
async fn show_new_batches(
    store: &Arc<dyn Store>,
    opener: &Opener,
    next_seq: &mut u64,
    acc: &mut Summary,
    render: bool,
) -> String {
    let mut rows = String::new();
    for stream in [Stream::Readings, Stream::Alarms] {
        let from = if stream == Stream::Readings {
            *next_seq
        } else {
            0
        };
        let s = store.clone();
        let batches = tokio::task::spawn_blocking(move || s.peek(stream, from, 10_000))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        for b in &batches {
            match opener.open(&b.bytes) {
                Ok(opened) => {
                    acc.batches_verified += 1;
                    acc.records_decrypted += opened.records.len() as u64;
                    if render && stream == Stream::Readings && Some(b) == batches.last() {
                        for r in opened.records.iter().take(6) {
                            let _ = writeln!(
                                rows,
                                "           hub ← seq {:<4} {}…  {:<16} {:>14} {:<5} {}",
                                b.seq,
                                &r.subject[..r.subject.len().min(12)],
                                r.field,
                                r.value.to_string(),
                                r.unit,
                                r.quality
                            );
                        }
                    }
                }
                Err(e) => {
                    acc.batches_rejected += 1;
                    eprintln!("  hub rejected batch {stream}/{}: {}", b.seq, e.reason());
                }
            }
            // The demo's hub "acknowledges" what it verified so the store drains.
            let s = store.clone();
            let (st, seq) = (b.stream, b.seq);
            let _ = tokio::task::spawn_blocking(move || s.ack(st, seq)).await;
            if stream == Stream::Readings {
                *next_seq = b.seq + 1;
            }
        }
    }
    rows.trim_end().to_string()
}

fn print_summary(s: &Summary) {
    println!("\nsummary");
    println!("  meters                {}", s.meters);
    println!("  readings polled       {}", s.readings_polled);
    println!("  records sealed        {}", s.records_sealed);
    println!("  batches committed     {}", s.batches_committed);
    println!(
        "  batches verified      {} (signature, decryption)",
        s.batches_verified
    );
    println!("  records decrypted     {}", s.records_decrypted);
    println!("  batches rejected      {}", s.batches_rejected);
    println!("  records lost          {}", s.records_lost);
}
