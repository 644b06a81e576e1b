//! The commands behind `main.rs`, as library functions so tests can call them.

pub mod broker;
pub mod catalog;
mod check;
mod check_hub;
pub(crate) mod demo;
mod emergency;
mod explain;
mod hub_emergency;
mod keys;
pub mod loadtest;
mod memory;
pub mod probe;
mod profiles;
mod service_manager;
mod signals;
mod sim_mqtt;
pub(crate) mod sim_rtu;
pub(crate) mod sim_served;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::info;

pub(crate) use check::report as check_report;
pub use hub_emergency::{hub_emergency, HubEmergencyAction};
pub use memory::limit_malloc_arenas;

use self::signals::{SignalEvent, Signals};
use crate::config::{ConfigError, GatewayConfig};
use crate::reading::UnitId;
use crate::sim::{self, Fault, SimMeters};
use crate::store::{Outbox, SledStore, StoreOptions};
use crate::supervisor::{self, KeyMaterial};
use crate::telemetry::init_logging;

/// How long `run` waits for open batches to be sealed and committed at shutdown.
pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long `run` lets the uplink deliver committed batches after the sources stopped.
pub(crate) const UPLINK_LAST_CHANCE: Duration = Duration::from_secs(3);

/// A command's failure, classified for the exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("invalid configuration:\n{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Runtime(String),
    /// `store check` found the store damaged.
    #[error("{0}")]
    Damaged(String),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Config(_) | CliError::Usage(_) => 64,
            CliError::Runtime(_) => 1,
            CliError::Damaged(_) => 2,
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| CliError::Runtime(format!("cannot start the async runtime: {e}")))
}

/// Writes a command's report to stdout. A reader that went away (`citygate check | head`)
/// is not an error worth a panic: the rest is dropped.
fn emit(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// `citygate check --config FILE`: a gateway or a hub config (a top-level `[hub]` table).
pub fn check(path: &Path) -> Result<(), CliError> {
    let (report, key_error) = if check_hub::is_hub_config(path) {
        check_hub::report(&crate::hub::HubConfig::load(path)?)
    } else {
        check_report(&GatewayConfig::load(path)?)
    };
    emit(&report);
    if key_error {
        return Err(CliError::Usage(
            "a key file is present but unusable (see above)".into(),
        ));
    }
    Ok(())
}

/// `citygate store check --config FILE`: verifies the (stopped) store of the config on a
/// copy. Exits 0 if it is sound, 2 if it is damaged, 1 if it could not be checked.
pub fn store_check(path: &Path) -> Result<(), CliError> {
    let cfg = GatewayConfig::load(path)?;
    let report = crate::store::check_offline(&cfg.store.path).map_err(CliError::Runtime)?;
    emit(&format!(
        "store     {}\n{}",
        cfg.store.path.display(),
        report.text
    ));
    if !report.problems.is_empty() {
        return Err(CliError::Damaged(format!(
            "store {} is damaged ({} problems)",
            cfg.store.path.display(),
            report.problems.len()
        )));
    }
    Ok(())
}

/// `citygate run --config FILE`
pub fn run(path: &Path) -> Result<(), CliError> {
    let cfg = GatewayConfig::load(path)?;
    init_logging("info", cfg.log.format);
    let keys = KeyMaterial::load(&cfg.keys).map_err(|e| CliError::Usage(e.to_string()))?;
    let store = SledStore::open(
        &cfg.store.path,
        StoreOptions {
            max_bytes: cfg.store.max_bytes,
            cache_capacity_bytes: cfg.store.cache_capacity_bytes,
        },
    )
    .map_err(|e| {
        CliError::Runtime(format!(
            "cannot open store {}: {e}",
            cfg.store.path.display()
        ))
    })?;
    let outbox = Outbox::new(Arc::new(store));
    let rt = runtime()?;
    rt.block_on(async {
        let mut signals = Signals::install()
            .map_err(|e| CliError::Runtime(format!("cannot install signal handlers: {e}")))?;
        let running = supervisor::start(&cfg, keys, outbox.clone());
        let metrics = running.metrics.clone();
        let status_stop = CancellationToken::new();
        crate::status::start_endpoint(
            &cfg,
            metrics.clone(),
            outbox.stats_rx(),
            status_stop.clone(),
        );
        let uplink = supervisor::start_uplink(&cfg, &running)
            .await
            .map_err(|e| CliError::Usage(format!("uplink: {e}")))?;
        if uplink.is_none() {
            tracing::warn!("no [uplink] configured: batches stay in the store");
        }
        service_manager::ready();
        let mut ticker = tokio::time::interval(Duration::from_secs(30));
        ticker.tick().await;
        loop {
            tokio::select! {
                event = signals.next() => match event {
                    SignalEvent::Stop => break,
                    // Logs go to stderr (journald); the store is not a file to rotate.
                    SignalEvent::Reopen => info!("sighup: nothing to reopen; running on"),
                },
                _ = ticker.tick() => {
                    let s = outbox.stats();
                    info!(
                        polled = metrics.samples_polled.get(),
                        sealed = metrics.records_sealed.get(),
                        committed = metrics.batches_committed.get(),
                        store_batches = s.total_batches(),
                        store_bytes = s.total_bytes(),
                        "pipeline"
                    );
                }
            }
        }
        service_manager::stopping();
        info!("shutting down: sealing and committing open batches");
        let clean = running.shutdown(SHUTDOWN_GRACE).await;
        if let Some(u) = uplink {
            // A short last chance to deliver; whatever is left is sent after restart.
            u.finish(UPLINK_LAST_CHANCE).await;
        }
        status_stop.cancel();
        let _ = std::fs::remove_file(crate::status::address_file(&cfg.store.path));
        let s = outbox.stats();
        info!(
            clean,
            committed = metrics.batches_committed.get(),
            lost = metrics.batches_lost.get(),
            store_batches = s.total_batches(),
            "gateway stopped"
        );
        if !cfg.mqtt_sources.is_empty() {
            info!(
                messages = metrics.mqtt_messages.get(),
                unknown_topic = metrics.mqtt_unknown_topic.get(),
                payload_errors = metrics.mqtt_payload_errors.get(),
                field_errors = metrics.mqtt_field_errors.get(),
                stale_values = metrics.mqtt_stale_values.get(),
                "mqtt sources"
            );
        }
        if !clean {
            return Err(CliError::Runtime(format!(
                "stopped without committing everything it sealed ({} batches lost; see the log)",
                metrics.batches_lost.get()
            )));
        }
        Ok(())
    })
}

/// `citygate status (--config FILE | --addr IP:PORT) [--json]`
pub fn status(
    config: Option<&Path>,
    addr: Option<std::net::SocketAddr>,
    json: bool,
) -> Result<(), CliError> {
    let addr = match (addr, config) {
        (Some(a), _) => a,
        (None, Some(path)) => {
            let cfg = GatewayConfig::load(path)?;
            let Some(listen) = cfg.status.listen else {
                return Err(CliError::Usage(format!(
                    "{}: the status endpoint is off ([status] listen = \"off\")",
                    path.display()
                )));
            };
            if listen.port() == 0 {
                crate::status::read_address_file(&cfg.store.path).ok_or_else(|| {
                    CliError::Runtime(format!(
                        "the gateway of {} listens on a port chosen at start, and {} does not name it: is it running?",
                        path.display(),
                        crate::status::address_file(&cfg.store.path).display()
                    ))
                })?
            } else {
                listen
            }
        }
        (None, None) => return Err(CliError::Usage("give --config or --addr".into())),
    };
    let rt = runtime()?;
    let (code, body) = rt
        .block_on(crate::telemetry::http::get(
            addr,
            "/status",
            Duration::from_secs(5),
        ))
        .map_err(|e| CliError::Runtime(e.to_string()))?;
    if code != 200 {
        return Err(CliError::Runtime(format!(
            "{addr}/status answered HTTP {code}: {}",
            body.trim()
        )));
    }
    if json {
        emit(&body);
        return Ok(());
    }
    let st: crate::status::GatewayStatus = serde_json::from_str(&body).map_err(|e| {
        CliError::Runtime(format!(
            "{addr}/status is not a citygate status document: {e}"
        ))
    })?;
    emit(&crate::status::render(&st));
    Ok(())
}

/// `citygate hub --config FILE`
pub fn hub(path: &Path) -> Result<(), CliError> {
    use crate::hub::{HubConfig, HubProcess};
    let cfg = HubConfig::load(path)?;
    init_logging("info", cfg.log.format);
    let rt = runtime()?;
    rt.block_on(async {
        let mut signals = Signals::install()
            .map_err(|e| CliError::Runtime(format!("cannot install signal handlers: {e}")))?;
        let process = HubProcess::start(&cfg)
            .await
            .map_err(|e| CliError::Usage(e.to_string()))?;
        let mut subscribed = process.subscribed();
        let announce = async {
            // READY=1 once the broker has granted the hub's subscriptions.
            if subscribed.wait_for(|s| *s).await.is_ok() {
                service_manager::ready();
            }
            std::future::pending::<()>().await
        };
        tokio::select! {
            _ = signals.until_stop(|| process.reopen_sink()) => {}
            _ = announce => {}
        }
        service_manager::stopping();
        let hub = process.hub().clone();
        process.shutdown().await;
        let s = hub.stats();
        info!(
            batches = s.accepted_batches,
            records = s.records_written,
            duplicates = s.duplicates,
            rejected = s.rejected.values().sum::<u64>(),
            "hub stopped"
        );
        Ok(())
    })
}

/// `citygate hub-prune --config FILE [--now RFC3339]`: drops records past their purpose's
/// retention from the hub's sink; refuses while a hub runs on the same state.
pub fn hub_prune(path: &Path, now: Option<&str>) -> Result<(), CliError> {
    use crate::hub::{prune, HubConfig};
    let cfg = HubConfig::load(path)?;
    init_logging("info", cfg.log.format);
    let now_ms = match now {
        None => crate::reading::now_ms(),
        Some(text) => humantime::parse_rfc3339_weak(text)
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .and_then(|d| i64::try_from(d.as_millis()).ok())
            .ok_or_else(|| {
                CliError::Usage(format!(
                    "--now {text:?}: not a time; valid: RFC 3339 such as 2026-01-01T00:00:00Z"
                ))
            })?,
    };
    let report = prune::prune(&cfg, now_ms).map_err(|e| CliError::Runtime(e.to_string()))?;
    let dropped: u64 = report.dropped.values().sum();
    let mut out = if report.dropped_partitions.is_empty() {
        format!("kept {} records, dropped {dropped}\n", report.kept)
    } else {
        format!(
            "dropped partitions {}\n",
            report.dropped_partitions.join(", ")
        )
    };
    for (purpose, n) in &report.dropped {
        let _ =
            std::fmt::Write::write_fmt(&mut out, format_args!("  {purpose}: {n} past retention\n"));
    }
    print!("{out}");
    Ok(())
}

/// `citygate hub-migrate --config FILE`: applies the database schema migrations the hub's
/// PostgreSQL sink lacks (idempotent: an up-to-date database is left as it is).
pub fn hub_migrate(path: &Path) -> Result<(), CliError> {
    use crate::hub::{pg, HubConfig, SinkConfig};
    let cfg = HubConfig::load(path)?;
    init_logging("info", cfg.log.format);
    let SinkConfig::Postgres(pg_cfg) = &cfg.sink else {
        return Err(CliError::Usage(format!(
            "{}: [sink] type is \"jsonl\"; hub-migrate applies to the postgres sink",
            path.display()
        )));
    };
    let (applied, version) =
        pg::migrate_database(pg_cfg).map_err(|e| CliError::Runtime(e.to_string()))?;
    if applied.is_empty() {
        println!("schema already at version {version}; nothing to apply");
    } else {
        let applied: Vec<String> = applied.iter().map(i32::to_string).collect();
        println!(
            "applied migration(s) {}; schema at version {version}",
            applied.join(", ")
        );
    }
    Ok(())
}

/// Resolves on SIGINT or SIGTERM; SIGHUP is ignored (for commands that write no files).
pub(crate) async fn shutdown_signal() {
    match Signals::install() {
        Ok(mut signals) => signals.until_stop(|| async {}).await,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Arguments of `citygate sim`.
#[derive(Debug, clap::Args)]
pub struct SimArgs {
    /// Profile name (file stem in the profiles directory).
    #[arg(long)]
    pub profile: String,
    /// Number of meters, served as unit ids 1..=N.
    #[arg(long, default_value_t = 1)]
    pub count: u8,
    /// Serve Modbus TCP on this address, e.g. 127.0.0.1:5020.
    #[arg(long)]
    pub listen: Option<String>,
    /// Default: ./firmware-profiles, then /usr/share/citygate/firmware-profiles.
    #[arg(long)]
    pub profiles_dir: Option<std::path::PathBuf>,
    /// Unit ids that never answer.
    #[arg(long)]
    pub silent: Vec<u8>,
    /// Unit ids that answer with "server device busy".
    #[arg(long)]
    pub exception: Vec<u8>,
    /// UNIT=DELAY pairs that answer late, e.g. 3=800ms.
    #[arg(long)]
    pub slow: Vec<String>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// At SIGTERM, stop answering, then write the polls each unit answered to this file
    /// (JSON; Modbus only; see `citygate loadtest`).
    #[arg(long)]
    pub served_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub rtu: sim_rtu::RtuSimArgs,
    #[command(flatten)]
    pub mqtt: Box<sim_mqtt::MqttSimArgs>,
}

/// `citygate sim`
pub fn sim(args: SimArgs) -> Result<(), CliError> {
    init_logging("info", Default::default());
    let profile = profiles::load_profile(args.profiles_dir.as_deref(), &args.profile)?;
    if args.count == 0 || args.count > 247 {
        return Err(CliError::Usage("--count must be 1..=247".into()));
    }
    if args.mqtt.mqtt_broker.is_some() {
        return sim_mqtt::sim_mqtt(&args, profile);
    }
    // Nobody reads the history of a simulator run from the command line: keep one snapshot.
    let meters = SimMeters::new(profile, args.count, args.seed).with_history_limit(1);
    let marker = sim_served::poll_marker(meters.profile());
    if args.served_file.is_some() {
        meters.count_polls_at(marker);
    }
    let served = meters.clone();
    for u in &args.silent {
        meters.set_fault(UnitId(*u), Fault::Silent);
    }
    for u in &args.exception {
        meters.set_fault(
            UnitId(*u),
            Fault::Exception(tokio_modbus::ExceptionCode::ServerDeviceBusy),
        );
    }
    for s in &args.slow {
        let (u, d) = s.split_once('=').ok_or_else(|| {
            CliError::Usage(format!("--slow {s:?}: write UNIT=DELAY, e.g. 3=800ms"))
        })?;
        let unit: u8 = u
            .parse()
            .map_err(|_| CliError::Usage(format!("--slow {s:?}: {u:?} is not a unit id")))?;
        let delay = crate::config::duration::parse(d).map_err(CliError::Usage)?;
        meters.set_fault(UnitId(unit), Fault::Slow(delay));
    }
    args.rtu.apply_exceptions(&meters)?;
    if args.listen.is_none() && !args.rtu.any() {
        return Err(CliError::Usage(
            "give --listen ADDR (Modbus TCP) and/or --rtu-listen ADDR, --pty, --dtu ADDR (Modbus RTU), or --mqtt-broker HOST:PORT (MQTT meters)"
                .into(),
        ));
    }
    let rt = runtime()?;
    rt.block_on(async {
        let token = CancellationToken::new();
        let mut tasks = args.rtu.start(meters.clone(), &token).await?;
        if let Some(listen) = &args.listen {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|e| CliError::Runtime(format!("cannot listen on {listen}: {e}")))?;
            let addr = listener
                .local_addr()
                .map_err(|e| CliError::Runtime(e.to_string()))?;
            println!(
                "serving {} x {} on {addr} (unit ids 1..={})",
                args.count, args.profile, args.count
            );
            let token = token.clone();
            tasks.push(tokio::spawn(async move {
                let _ = sim::serve(listener, meters, token).await;
            }));
        }
        shutdown_signal().await;
        if args.served_file.is_some() {
            served.stop_answering();
            tokio::time::sleep(sim_served::SERVED_GRACE).await;
        }
        token.cancel();
        for t in tasks {
            let _ = t.await;
        }
        if let Some(path) = &args.served_file {
            sim_served::Served::of(&served, args.count, marker)
                .write(path)
                .map_err(CliError::Runtime)?;
        }
        Ok(())
    })
}

pub use catalog::{catalog, CatalogFormat};
pub use emergency::{emergency_start, emergency_status, emergency_stop};
pub use explain::policy_explain;
pub use keys::{keys, KeysCommand, TlsIssue};

pub use demo::demo;
