//! `citygate loadtest hub`: the hub at city scale, measured from the outside.
//!
//! N simulated gateways run in this process ([`fleet`]); each has its own Ed25519 signing
//! key (its public half registered in the generated hub config with an approved policy), its
//! own store incarnation and seq counter, and seals real batches with [`crate::seal::Sealer`]
//! (meters × fields × batch-every/interval records) that it publishes on
//! `citygate/v1/{gateway}/readings` over MQTT with mutual TLS. Like the gateway's uplink it
//! keeps every batch until the hub's signed ack arrives, holds at most `--window` of them
//! (a period whose backlog is full is skipped and counted), and re-sends what is unacked after
//! `--ack-timeout`. `--withhold-acks P` ignores that share of acks, so the batch is re-sent
//! and must be acked again without being written twice; `--garbage P` and `--forged P`
//! publish random bytes and batches signed with an unregistered key, which must be rejected,
//! never written and never acked. K gateways share one MQTT connection (`--per-connection`),
//! whose certificate's ACL grants exactly their topics.
//!
//! The hub side ([`run`]): a broker (mosquitto with mutual TLS and an ACL if installed, else
//! `citygate broker`), then `--hubs` `citygate hub` processes with the same config but their
//! own id, status port, state and sink, on one shared subscription group. `--kill-hubs N`
//! SIGKILLs a random hub N times during the window (seeded by `--seed`) and starts it again.
//! After the window the fleet stops sealing and re-sends until every batch is acked (at most
//! `--drain`), then the hubs are stopped and their sinks read.
//!
//! The accounting ([`account`]): each sink record's natural key (gateway, stream,
//! incarnation, seq, subject, field, at) must appear once across all sinks (duplicates
//! written), every batch the fleet got an ack for must be in the sinks whole (missing), and
//! no record may belong to a batch the fleet did not seal (forged, written). Batches never
//! acked by the end are reported as unacked, apart. Exit status 1 if any of these fails, or
//! if batches are still unacked when the drain ends (the measurement did not finish).
//!
//! JSONL is not exactly-once across hub processes: each hub's de-dup state is its own, so
//! with several hubs a batch re-sent to another hub is written again; the report counts such
//! cross-file duplicates as duplicates. The sink a hub writes is configured by one function
//! ([`setup::sink_toml`]) and read back by one ([`account::read_sinks`]), so another sink
//! type is added in those two places.

mod account;
mod fleet;
mod procs;
mod records;
mod report;
mod run;
mod sender;
mod setup;
mod state;

use std::path::PathBuf;
use std::time::Duration;

use super::parse_duration;
use crate::cli::CliError;
use crate::reading::now_ms;

/// Where the hubs write what they accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SinkKind {
    /// JSON Lines, one file per hub process.
    Jsonl,
    /// The PostgreSQL database at `--pg-url`, shared by every hub (migrated first with
    /// `citygate hub-migrate`); only the run's own batches are read back.
    Postgres,
}

/// Which broker sits between the fleet and the hubs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BrokerKind {
    /// Debian's mosquitto (mutual TLS, an ACL per certificate).
    Mosquitto,
    /// `citygate broker` (one connection per gateway: its access rules know gateways only).
    Embedded,
}

fn parse_share(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{s}: a share is 0..=1, e.g. 0.05"))
    }
}

/// Arguments of `citygate loadtest hub`.
#[derive(Debug, Clone, clap::Args)]
pub struct HubLoadArgs {
    /// Simulated gateways (gw-00001…), each with its own key and incarnation.
    #[arg(long, default_value_t = 100)]
    pub gateways: u32,
    /// Meters per gateway.
    #[arg(long, default_value_t = 100)]
    pub meters: u32,
    /// Fields per meter reading (at most 12).
    #[arg(long, default_value_t = 6)]
    pub fields: u32,
    /// Time between two readings of a meter.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Time between two batches of a gateway (the gateway's `[batch] max_age` default is
    /// 1 s); each holds meters × fields × batch-every/interval records.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub batch_every: Duration,
    /// Length of the measured window (the fleet seals during it).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub duration: Duration,
    /// `citygate hub` processes on one shared subscription (1..=9).
    #[arg(long, default_value_t = 1)]
    pub hubs: u8,
    #[arg(long, value_enum, default_value_t = SinkKind::Jsonl)]
    pub sink: SinkKind,
    /// The database of `--sink postgres` (`postgresql://USER@HOST:PORT/DB`; loopback or a
    /// unix socket: no TLS). Rows of earlier runs stay; the accounting reads this run's only.
    #[arg(long, required_if_eq("sink", "postgres"))]
    pub pg_url: Option<String>,
    /// Database connections of each hub (`[sink] connections`, 1..=32) with --sink postgres.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=32))]
    pub pg_connections: u8,
    /// Default: mosquitto when installed, else embedded.
    #[arg(long, value_enum)]
    pub broker: Option<BrokerKind>,
    /// Gateways sharing one MQTT connection (with --broker embedded always 1).
    #[arg(long, default_value_t = 25)]
    pub per_connection: u32,
    /// Unacked batches a gateway holds at most (the uplink's default window).
    #[arg(long, default_value_t = 16)]
    pub window: usize,
    /// Re-send a batch unacked this long (the uplink's default).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub ack_timeout: Duration,
    /// Share of acks ignored, so their batch is re-sent (0..=1).
    #[arg(long, default_value = "0", value_parser = parse_share)]
    pub withhold_acks: f64,
    /// Share of batch periods that also publish random bytes (0..=1).
    #[arg(long, default_value = "0", value_parser = parse_share)]
    pub garbage: f64,
    /// Share of batch periods that also publish a batch signed with an unregistered key.
    #[arg(long, default_value = "0", value_parser = parse_share)]
    pub forged: f64,
    /// SIGKILL a random hub this many times during the window and start it again.
    #[arg(long, default_value_t = 0)]
    pub kill_hubs: u32,
    /// Seed of every random choice (values, shares, kills).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// After the window: how long the fleet may re-send until every batch is acked.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub drain: Duration,
    /// Write the figures as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Run the hubs from this citygate executable (e.g. another build).
    #[arg(long)]
    pub citygate_bin: Option<PathBuf>,
    /// Keep the run directory (configs, logs, sinks).
    #[arg(long)]
    pub keep_dir: bool,
}

impl HubLoadArgs {
    /// Records in one batch: meters × fields × readings per batch.
    pub(super) fn records_per_batch(&self) -> u64 {
        u64::from(self.meters) * u64::from(self.fields) * self.readings_per_batch()
    }

    /// Readings of one meter in one batch (at least 1).
    pub(super) fn readings_per_batch(&self) -> u64 {
        let per = self.batch_every.as_millis() / self.interval.as_millis().max(1);
        u64::try_from(per).unwrap_or(u64::MAX).max(1)
    }

    fn check(&self) -> Result<(), CliError> {
        let usage = |m: &str| Err(CliError::Usage(m.into()));
        if self.gateways == 0 || self.gateways > 99_999 {
            return usage("--gateways must be 1..=99999");
        }
        if self.meters == 0 || self.fields == 0 || self.fields > records::MAX_FIELDS {
            return usage("--meters must be at least 1 and --fields 1..=12");
        }
        if self.hubs == 0 || self.hubs > 9 {
            return usage("--hubs must be 1..=9");
        }
        if self.interval < Duration::from_millis(10) || self.batch_every < self.interval {
            return usage("--interval must be at least 10ms and --batch-every at least --interval");
        }
        if self.records_per_batch() > u64::from(crate::seal::MAX_RECORDS_PER_BATCH) {
            return usage("meters × fields × batch-every/interval must be at most 50000");
        }
        if self.duration.is_zero() || self.per_connection == 0 || self.window == 0 {
            return usage("--duration, --per-connection and --window must be more than 0");
        }
        if self.ack_timeout < Duration::from_millis(100) {
            return usage("--ack-timeout must be at least 100ms");
        }
        Ok(())
    }
}

/// `citygate loadtest hub`
pub fn loadtest_hub(args: &HubLoadArgs) -> Result<(), CliError> {
    args.check()?;
    let exe = std::env::current_exe()
        .map_err(|e| CliError::Runtime(format!("cannot find this executable: {e}")))?;
    let dir = std::env::temp_dir().join(format!(
        "citygate-loadtest-hub-{}-{}",
        std::process::id(),
        now_ms()
    ));
    std::fs::create_dir_all(&dir)
        .map_err(|e| CliError::Runtime(format!("cannot create {}: {e}", dir.display())))?;
    println!("run directory {}", dir.display());
    let report = match run::run(args, &exe, &dir) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadtest hub failed; logs kept in {}", dir.display());
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
    let failures = report.failures();
    if args.keep_dir || !failures.is_empty() {
        println!("run directory kept: {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(CliError::Runtime(failures.join("; ")))
    }
}
