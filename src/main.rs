//! The `citygate` command: parse arguments, load configuration, start, map errors to
//! exit codes (0 ok, 64 bad usage or configuration, 1 runtime failure).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use citygate::cli;
use citygate::config::duration;

#[derive(Debug, Parser)]
#[command(
    name = "citygate",
    version,
    about = "Edge gateway for city-brain meter data"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate a config and its profiles; show what is polled and what leaves the box.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Purpose policies: what leaves the box, in which form and resolution, and why.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Emergency collection: a higher-resolution flow for a bounded time, purged on the box
    /// and reported to the hub when it ends.
    Emergency {
        #[command(subcommand)]
        command: EmergencyCmd,
    },
    /// Export a public-data catalogue entry per purpose flow: data items with their
    /// classification, sharing class, update frequency, unit, purpose and retention.
    Catalog {
        #[arg(long)]
        config: PathBuf,
        #[arg(long, value_enum, default_value = "json")]
        format: cli::CatalogFormat,
    },
    /// Run the gateway until SIGTERM/SIGINT.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Ask a running gateway (the one of this config) how it is doing.
    Status {
        #[arg(long, required_unless_present = "addr")]
        config: Option<PathBuf>,
        /// The status endpoint's address, instead of reading it from the config.
        #[arg(long)]
        addr: Option<std::net::SocketAddr>,
        /// Print the JSON document instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Receive, verify, decrypt, de-duplicate and acknowledge batches over MQTT.
    Hub {
        #[arg(long)]
        config: PathBuf,
    },
    /// Drop records older than their purpose's approved retention from the hub's sink (jsonl:
    /// the hub must be stopped; postgres: drops daily partitions, beside running hubs).
    HubPrune {
        #[arg(long)]
        config: PathBuf,
        /// Prune as of this time (RFC 3339, e.g. 2026-01-01T00:00:00Z) instead of now.
        #[arg(long)]
        now: Option<String>,
    },
    /// Apply the database schema migrations of the hub's PostgreSQL sink (idempotent).
    HubMigrate {
        #[arg(long)]
        config: PathBuf,
    },
    /// Emergency collections the hub's sink holds: list them, export one's records, or
    /// destroy the hub's copy of its data records (destroying needs the hub stopped).
    #[command(group(clap::ArgGroup::new("action").required(true).args(["list", "export", "destroy"])))]
    HubEmergency {
        #[arg(long)]
        config: PathBuf,
        /// List every emergency: gateway, policy, records held, reports, hub copy.
        #[arg(long, conflicts_with = "id")]
        list: bool,
        /// With --list: print JSON instead of the table.
        #[arg(long, requires = "list")]
        json: bool,
        /// The emergency id (from --list or the hub's log).
        #[arg(long)]
        id: Option<String>,
        /// Write every sink line of emergency --id to this new file (mode 0600).
        #[arg(long, requires = "id", value_name = "FILE")]
        export: Option<PathBuf>,
        /// Remove emergency --id's data records from the sink; its reports stay.
        #[arg(long, requires = "id")]
        destroy: bool,
    },
    /// Serve simulated meters over Modbus TCP and/or Modbus RTU.
    Sim(Box<cli::SimArgs>),
    /// Measure simulated meters → gateway → broker → hub, each its own process: values/s,
    /// CPU and RSS per process, latency, exact loss and duplicates.
    Loadtest(Box<cli::loadtest::LoadtestArgs>),
    /// Run the embedded MQTT broker (mutual TLS) as a process of its own until SIGTERM.
    Broker(Box<cli::broker::BrokerArgs>),
    /// Read one meter once and print every field (raw registers, value, unit, quality).
    Probe(Box<cli::probe::ProbeArgs>),
    /// List the unit ids that answer on a bus or endpoint.
    Scan(Box<cli::probe::ScanArgs>),
    /// Key management.
    Keys {
        #[command(subcommand)]
        command: cli::KeysCommand,
    },
    /// Store maintenance.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// Simulated meters, the gateway and a hub-side check in one process.
    Demo {
        /// How long to run, e.g. "20s".
        #[arg(long, default_value = "20s", value_parser = parse_duration)]
        duration: Duration,
        /// Simulated meters per profile.
        #[arg(long, default_value_t = 3)]
        meters: u8,
        /// Write the summary as JSON to this file.
        #[arg(long)]
        summary_json: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Per device and field: what leaves, in which form and resolution, under which
    /// purpose, and why (the rule and its line, or default deny).
    Explain {
        #[arg(long)]
        config: PathBuf,
        /// Only this device (its name in the config).
        #[arg(long)]
        device: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum EmergencyCmd {
    /// Switch on an emergency policy (one of `[policies] emergency`) for a bounded time.
    Start {
        #[arg(long)]
        config: PathBuf,
        /// The emergency policy.
        #[arg(long)]
        policy: String,
        /// Why; travels to the hub with the start and end reports.
        #[arg(long)]
        reason: String,
        /// How long, e.g. 6h (at most `[policies] emergency_max`); never extended.
        #[arg(long = "for")]
        duration: String,
    },
    /// End the active emergency collection now.
    Stop {
        #[arg(long)]
        config: PathBuf,
    },
    /// Show the order and what the gateway did about it.
    Status {
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum StoreCommand {
    /// Verify the config's store offline (stop the gateway first): keys, values, sequence
    /// sanity and the manifest. Exits 0 if sound, 2 if damaged, 1 if it cannot be checked.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    duration::parse(s)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(64),
            };
        }
    };
    let result = match cli.command {
        Command::Check { config } => cli::check(&config),
        Command::Run { config } => {
            cli::limit_malloc_arenas();
            cli::run(&config)
        }
        Command::Status { config, addr, json } => cli::status(config.as_deref(), addr, json),
        Command::Hub { config } => cli::hub(&config),
        Command::HubPrune { config, now } => cli::hub_prune(&config, now.as_deref()),
        Command::HubMigrate { config } => cli::hub_migrate(&config),
        Command::HubEmergency {
            config,
            list,
            json,
            id,
            export,
            destroy,
        } => {
            let action = match (id, export) {
                (Some(id), Some(file)) => cli::HubEmergencyAction::Export { id, file },
                (Some(id), None) if destroy => cli::HubEmergencyAction::Destroy { id },
                _ if list => cli::HubEmergencyAction::List { json },
                _ => unreachable!("clap requires one of --list, --export, --destroy"),
            };
            cli::hub_emergency(&config, action)
        }
        Command::Sim(args) => cli::sim(*args),
        Command::Broker(args) => cli::broker::broker(&args),
        Command::Loadtest(args) => cli::loadtest::loadtest(&args),
        Command::Probe(args) => cli::probe::probe(&args).map(|out| print!("{out}")),
        Command::Policy {
            command: PolicyCommand::Explain { config, device },
        } => cli::policy_explain(&config, device.as_deref()),
        Command::Catalog { config, format } => cli::catalog(&config, format),
        Command::Emergency { command } => match command {
            EmergencyCmd::Start {
                config,
                policy,
                reason,
                duration,
            } => cli::emergency_start(&config, &policy, &reason, &duration),
            EmergencyCmd::Stop { config } => cli::emergency_stop(&config),
            EmergencyCmd::Status { config } => cli::emergency_status(&config),
        },
        Command::Scan(args) => cli::probe::scan(&args).map(|out| print!("{out}")),
        Command::Store {
            command: StoreCommand::Check { config },
        } => cli::store_check(&config),
        Command::Keys { command } => cli::keys(command),
        Command::Demo {
            duration,
            meters,
            summary_json,
        } => cli::demo(duration, meters, summary_json.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("citygate: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
