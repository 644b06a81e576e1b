//! `citygate sim`'s Modbus RTU options: a pseudo-terminal, RTU over TCP, dialling a
//! gateway's DTU listener, baud emulation and line faults.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::CliError;
use crate::profile::{LineSettings, Parity};
use crate::reading::UnitId;
use crate::sim::{self, LineFault, RtuSim, SimMeters};
use crate::source::rtu::DEFAULT_LINE;

/// RTU serving options of `citygate sim`.
#[derive(Debug, Clone, clap::Args)]
pub struct RtuSimArgs {
    /// Serve Modbus RTU over TCP on this address (serial server / DTU in transparent mode).
    #[arg(long)]
    pub rtu_listen: Option<String>,
    /// Serve Modbus RTU on a new pseudo-terminal; its path is printed.
    #[arg(long)]
    pub pty: bool,
    /// Dial a gateway's DTU listener at HOST:PORT like a 4G DTU.
    #[arg(long, requires = "dtu_id")]
    pub dtu: Option<String>,
    /// Registration and heartbeat packet of the simulated DTU.
    #[arg(long)]
    pub dtu_id: Option<String>,
    /// DTU heartbeat period.
    #[arg(long, default_value = "30s", value_parser = crate::config::duration::parse)]
    pub heartbeat: Duration,
    /// Emulate this baud rate (8N1): every RTU frame takes its wire time.
    #[arg(long)]
    pub baud: Option<u32>,
    /// UNIT=DELAY: RTU replies of UNIT arrive this late (after the client's timeout).
    #[arg(long)]
    pub late: Vec<String>,
    /// RTU replies of UNIT have a corrupted byte.
    #[arg(long)]
    pub corrupt: Vec<u8>,
    /// RTU replies of UNIT are preceded by garbage.
    #[arg(long)]
    pub garbage: Vec<u8>,
    /// RTU replies of UNIT are written in fragments.
    #[arg(long)]
    pub fragment: Vec<u8>,
    /// UNIT=CODE: UNIT answers every request with this Modbus exception code (e.g. 2=illegal address).
    #[arg(long)]
    pub exception_code: Vec<String>,
}

impl RtuSimArgs {
    pub(crate) fn any(&self) -> bool {
        self.rtu_listen.is_some() || self.pty || self.dtu.is_some()
    }

    /// Applies the exception codes to `meters` (they hold for TCP too).
    pub(crate) fn apply_exceptions(&self, meters: &SimMeters) -> Result<(), CliError> {
        for s in &self.exception_code {
            let (u, c) = unit_pair(s, "--exception-code", "2=2")?;
            let code: u8 = c.parse().map_err(|_| {
                CliError::Usage(format!("--exception-code {s:?}: {c:?} is not a code"))
            })?;
            meters.set_fault(
                u,
                sim::Fault::Exception(tokio_modbus::ExceptionCode::new(code)),
            );
        }
        Ok(())
    }

    fn sim(&self, meters: SimMeters) -> Result<RtuSim, CliError> {
        let mut rtu = RtuSim::new(meters);
        if let Some(baud) = self.baud {
            rtu = rtu.with_baud(&LineSettings {
                baud,
                parity: Parity::None,
                ..DEFAULT_LINE
            });
        }
        for s in &self.late {
            let (u, d) = unit_pair(s, "--late", "3=1500ms")?;
            let d = crate::config::duration::parse(d).map_err(CliError::Usage)?;
            rtu.set_line_fault(u, LineFault::Late(d));
        }
        for (units, fault) in [
            (&self.corrupt, LineFault::CorruptCrc),
            (&self.garbage, LineFault::Garbage),
            (&self.fragment, LineFault::Fragments),
        ] {
            for u in units {
                rtu.set_line_fault(UnitId(*u), fault);
            }
        }
        Ok(rtu)
    }

    /// Starts every RTU endpoint asked for; prints where each serves.
    pub(crate) async fn start(
        &self,
        meters: SimMeters,
        token: &CancellationToken,
    ) -> Result<Vec<tokio::task::JoinHandle<()>>, CliError> {
        let rtu = self.sim(meters)?;
        let mut tasks = Vec::new();
        if let Some(addr) = &self.rtu_listen {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| CliError::Runtime(format!("cannot listen on {addr}: {e}")))?;
            let local = listener
                .local_addr()
                .map_err(|e| CliError::Runtime(e.to_string()))?;
            println!("serving modbus rtu over tcp on {local}");
            let (rtu, token) = (rtu.clone(), token.clone());
            tasks.push(tokio::spawn(async move {
                let _ = sim::serve_rtu_tcp(listener, rtu, token).await;
            }));
        }
        if self.pty {
            use tokio_serial::SerialPort;
            let (master, slave) = tokio_serial::SerialStream::pair()
                .map_err(|e| CliError::Runtime(format!("cannot create a pseudo-terminal: {e}")))?;
            let path = slave.name().unwrap_or_default();
            println!("serving modbus rtu on {path}");
            let (rtu, token) = (rtu.clone(), token.clone());
            tasks.push(tokio::spawn(async move {
                // Keeps the slave side open so the pty stays up between client opens.
                let _slave = slave;
                let _ = rtu.serve(master, token, None).await;
            }));
        }
        if let (Some(addr), Some(id)) = (&self.dtu, &self.dtu_id) {
            println!("dialling dtu listener {addr} as {id}");
            tasks.push(tokio::spawn(sim::dial_dtu(
                addr.clone(),
                id.clone(),
                self.heartbeat,
                rtu.clone(),
                token.clone(),
            )));
        }
        Ok(tasks)
    }
}

fn unit_pair<'a>(s: &'a str, flag: &str, example: &str) -> Result<(UnitId, &'a str), CliError> {
    let (u, rest) = s.split_once('=').ok_or_else(|| {
        CliError::Usage(format!("{flag} {s:?}: write UNIT=VALUE, e.g. {example}"))
    })?;
    let unit: u8 = u
        .parse()
        .map_err(|_| CliError::Usage(format!("{flag} {s:?}: {u:?} is not a unit id")))?;
    Ok((UnitId(unit), rest))
}
