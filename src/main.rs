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
enum StoreCommand {
    /// Verify the config's store offline (stop the gateway first): keys, values, sequence
    /// sanity and the manifest. Exits 0 if sound, 2 if damaged, 1 if it cannot be checked.
    Check {
        #[arg(long)]
        config: PathBuf,
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
    /// Generate a small TLS PKI for a one-box or pilot deployment: a CA, a broker
    /// certificate and client certificates (gateways, hubs).
    Tls {
        /// Directory to write ca.pem, broker.pem/.key and client-ID.pem/.key into.
        #[arg(long)]
        dir: PathBuf,
        /// DNS name or IP address the broker is reached by (repeatable).
        #[arg(long = "server", required = true)]
        servers: Vec<String>,
        /// Client id (gateway id or hub id) to issue a certificate for (repeatable).
        #[arg(long = "client", required = true)]
        clients: Vec<String>,
        /// Replace an existing ca.pem in DIR.
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
        Command::Status { config, addr, json } => cli::status(config.as_deref(), addr, json),
        Command::Hub { config } => cli::hub(&config),
        Command::Sim(args) => cli::sim(*args),
        Command::Probe(args) => cli::probe::probe(&args).map(|out| print!("{out}")),
        Command::Scan(args) => cli::probe::scan(&args).map(|out| print!("{out}")),
        Command::Store {
            command: StoreCommand::Check { config },
        } => cli::store_check(&config),
        Command::Keys {
            command: KeysCommand::Gen { dir, force },
        } => cli::keys_gen(&dir, force),
        Command::Keys {
            command:
                KeysCommand::Tls {
                    dir,
                    servers,
                    clients,
                    force,
                },
        } => cli::keys_tls(&dir, &servers, &clients, force),
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
