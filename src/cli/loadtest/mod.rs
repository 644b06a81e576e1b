//! `citygate loadtest`: N simulated meters, the gateway, a broker and the hub as separate
//! processes on this machine, measured from the outside.
//!
//! Order of a run (every wait bounded; every child's output in a log file in the run
//! directory, which is removed at the end unless `--keep-dir` or the run failed):
//! 1. set-up ([`setup`]): profile, keys, CA and certificates, hub config;
//! 2. `citygate broker` (unless `--broker`), `citygate hub` (ready when its `/status` says
//!    `subscribed`), one `citygate sim --served-file` per endpoint (ready when it prints
//!    its address), `citygate run` (ready when its `/status` shows the uplink connected);
//! 3. warm-up, then the measured window: RSS of gateway and hub every second, their CPU
//!    time at the start and the end; with `--outage D@T` the broker is stopped T into the
//!    window (SIGTERM, SIGKILL after 2 s) and started again on the same port after D;
//! 4. stop: the simulators (they stop answering and write what they served), one interval
//!    plus the Modbus timeout later the gateway (it seals and delivers its open batches),
//!    then wait until the sink holds every served poll or stops growing, then hub and
//!    broker;
//! 5. accounting ([`sink`]) and figures ([`report`]).
//!
//! The gateway and hub run from `--citygate-bin` if given (to measure another build with
//! the same set-up), everything else from this executable. Exit status 1 if a poll was
//! lost or a value duplicated (after the report is printed).
//!
//! `citygate loadtest hub` ([`hub`]) measures the hub side at city scale instead: many
//! simulated gateways in this process against one or more hub processes behind a broker.

pub mod hub;
mod procs;
mod report;
mod run;
mod setup;
mod sink;

use std::path::PathBuf;
use std::time::Duration;

use self::run::run;
use super::CliError;
use crate::reading::now_ms;

/// How the simulators are reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// Modbus TCP.
    Tcp,
    /// Modbus RTU over TCP (a serial server in transparent mode).
    RtuTcp,
}

/// `--outage D@T`: the broker is down for D, starting T into the measured window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outage {
    pub down_for: Duration,
    pub at: Duration,
}

fn parse_outage(s: &str) -> Result<Outage, String> {
    let (d, t) = s
        .split_once('@')
        .ok_or_else(|| format!("{s:?}: write DURATION@START, e.g. 30s@20s"))?;
    Ok(Outage {
        down_for: crate::config::duration::parse(d)?,
        at: crate::config::duration::parse(t)?,
    })
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::config::duration::parse(s)
}

/// What `citygate loadtest` measures besides the default gateway path.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum LoadtestTarget {
    /// Measure the hub at city scale: N simulated gateways (in this process) seal and
    /// publish batches through a real broker to 1..=9 `citygate hub` processes on one shared
    /// subscription; reports batches/s, records/s, ingest latency, duplicates written,
    /// acked batches missing from the sink, CPU and RSS of every hub and of the broker.
    Hub(Box<hub::HubLoadArgs>),
}

/// Arguments of `citygate loadtest`.
#[derive(Debug, Clone, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct LoadtestArgs {
    #[command(subcommand)]
    pub target: Option<LoadtestTarget>,
    /// Simulated meters (devices m00001…).
    #[arg(long, required = true)]
    pub meters: Option<u32>,
    /// Poll interval of every meter.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Length of the measured window.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Time between the gateway being connected and the measured window.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Profile of every meter (any Modbus profile in --profiles-dir).
    #[arg(long, default_value = "chint-ddsu666")]
    pub profile: String,
    #[arg(long, default_value = "firmware-profiles")]
    pub profiles_dir: PathBuf,
    /// Meters per simulator endpoint (unit ids 1..=N; at most 247).
    #[arg(long, default_value_t = 100)]
    pub per_endpoint: u8,
    #[arg(long, value_enum, default_value_t = Transport::Tcp)]
    pub transport: Transport,
    /// Stop the broker for D, T into the measured window, e.g. 30s@20s.
    #[arg(long, value_parser = parse_outage)]
    pub outage: Option<Outage>,
    /// Use this broker (HOST:PORT) instead of starting `citygate broker`.
    #[arg(long)]
    pub broker: Option<String>,
    /// With --broker: the CA the broker's certificate chains to.
    #[arg(long, requires = "broker")]
    pub ca_file: Option<PathBuf>,
    /// With --broker: the gateway's client certificate and key (name = --gateway-id).
    #[arg(long, requires = "broker")]
    pub gateway_cert_file: Option<PathBuf>,
    #[arg(long, requires = "broker")]
    pub gateway_key_file: Option<PathBuf>,
    /// With --broker: the hub's client certificate and key (name = --hub-id).
    #[arg(long, requires = "broker")]
    pub hub_cert_file: Option<PathBuf>,
    #[arg(long, requires = "broker")]
    pub hub_key_file: Option<PathBuf>,
    /// With --broker: connect without TLS (development brokers only).
    #[arg(long, requires = "broker")]
    pub broker_danger_plaintext: bool,
    #[arg(long, default_value = setup::DEFAULT_GATEWAY_ID)]
    pub gateway_id: String,
    #[arg(long, default_value = setup::DEFAULT_HUB_ID)]
    pub hub_id: String,
    /// Write the figures as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Run the gateway and the hub from this citygate executable (e.g. an older build).
    #[arg(long)]
    pub citygate_bin: Option<PathBuf>,
    /// Keep the run directory (configs, logs, sink, served files).
    #[arg(long)]
    pub keep_dir: bool,
}

impl LoadtestArgs {
    /// `--meters` (clap requires it unless a subcommand is given, and [`loadtest`] checks
    /// it before a run starts).
    pub(super) fn meters(&self) -> u32 {
        self.meters.unwrap_or(0)
    }
}

/// `citygate loadtest` and `citygate loadtest hub`.
pub fn loadtest(args: &LoadtestArgs) -> Result<(), CliError> {
    if let Some(LoadtestTarget::Hub(hub_args)) = &args.target {
        return hub::loadtest_hub(hub_args);
    }
    if args.meters() == 0 || args.meters() > 99_999 {
        return Err(CliError::Usage("--meters must be 1..=99999".into()));
    }
    if args.per_endpoint == 0 || args.per_endpoint > 247 {
        return Err(CliError::Usage("--per-endpoint must be 1..=247".into()));
    }
    if args.interval < Duration::from_millis(10) || args.duration.is_zero() {
        return Err(CliError::Usage(
            "--interval must be at least 10ms and --duration more than 0".into(),
        ));
    }
    if let Some(o) = args.outage {
        if args.broker.is_some() {
            return Err(CliError::Usage(
                "--outage stops the broker the load test starts; it cannot stop --broker".into(),
            ));
        }
        if o.at >= args.duration || o.down_for.is_zero() {
            return Err(CliError::Usage(
                "--outage D@T: T must fall within --duration and D must be more than 0".into(),
            ));
        }
    }
    let exe = std::env::current_exe()
        .map_err(|e| CliError::Runtime(format!("cannot find this executable: {e}")))?;
    let dir = std::env::temp_dir().join(format!(
        "citygate-loadtest-{}-{}",
        std::process::id(),
        now_ms()
    ));
    std::fs::create_dir_all(&dir)
        .map_err(|e| CliError::Runtime(format!("cannot create {}: {e}", dir.display())))?;
    println!("run directory {}", dir.display());
    let result = run(args, &exe, &dir);
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadtest failed; logs kept in {}", dir.display());
            return Err(e);
        }
    };
    print!("{}", report.summary());
    if let Some(path) = &args.json {
        let json =
            serde_json::to_string_pretty(&report).map_err(|e| CliError::Runtime(e.to_string()))?;
        std::fs::write(path, json + "\n")
            .map_err(|e| CliError::Runtime(format!("cannot write {}: {e}", path.display())))?;
    }
    let failed = report.lost > 0 || report.duplicated > 0 || report.extra > 0;
    if args.keep_dir || failed {
        println!("run directory kept: {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    if failed {
        return Err(CliError::Runtime(format!(
            "{} polls lost, {} extra, {} values duplicated",
            report.lost, report.extra, report.duplicated
        )));
    }
    Ok(())
}
