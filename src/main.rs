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
    /// Run the gateway until SIGTERM/SIGINT.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Receive, verify, decrypt, de-duplicate and acknowledge batches over MQTT.
    Hub {
        #[arg(long)]
        config: PathBuf,
    },
    /// Serve simulated meters over Modbus TCP and/or Modbus RTU.
    Sim(Box<cli::SimArgs>),
    /// Read one meter once and print every field (raw registers, value, unit, quality).
    Probe(Box<cli::probe::ProbeArgs>),
    /// List the unit ids that answer on a bus or endpoint.
    Scan(Box<cli::probe::ScanArgs>),
    /// Key management.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
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
enum KeysCommand {
    /// Generate the gateway signing key pair, a hub HPKE key pair and a pseudonym key.
    Gen {
        /// Directory to write the key files into (created with mode 0700).
        #[arg(long)]
        dir: PathBuf,
        /// Overwrite existing key files.
        #[arg(long)]
        force: bool,
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
        Command::Run { config } => cli::run(&config),
        Command::Hub { config } => cli::hub(&config),
        Command::Sim(args) => cli::sim(*args),
        Command::Probe(args) => cli::probe::probe(&args).map(|out| print!("{out}")),
        Command::Scan(args) => cli::probe::scan(&args).map(|out| print!("{out}")),
        Command::Keys {
            command: KeysCommand::Gen { dir, force },
        } => cli::keys_gen(&dir, force),
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
