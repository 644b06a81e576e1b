//! `citygate probe` and `citygate scan`: commissioning tools.
//!
//! `probe` reads one meter once with its profile's read plan and prints every field:
//! the raw registers (hex, as on the wire), the decoded value in its canonical unit
//! and its quality — so an operator can compare with the meter's display and spot a
//! wrong word order at once. `scan` sends a one-register read to every unit id in a
//! range and lists the ids that answer (with data or a Modbus exception).
//!
//! Both speak Modbus TCP, RTU over TCP, or RTU on a serial port, and fail with one
//! line naming what went wrong (no such device, permission denied, port busy,
//! connection refused, no answer): exit 64 for bad usage, 1 at run time.

use std::fmt::Write as _;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use tokio::time::timeout;
use tokio_modbus::client::{Client, Context};
use tokio_modbus::slave::{Slave, SlaveContext};
use tokio_modbus::{Request, Response};

use super::CliError;
use crate::profile::{FunctionCode, LineSettings, Parity, Profile};
use crate::reading::{DeviceId, RegisterAddress, UnitId, Value};
use crate::source::modbus::{plan, ReadRequest};
use crate::source::rtu::transport::{open_serial, BoxedStream};
use crate::source::rtu::{LineOverride, LineTiming, RtuError, Transactor};
use crate::source::RegisterImage;
use crate::transform::check::assess;
use crate::transform::normalise::normalise_field;

/// Serial parity on the command line.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ParityArg {
    None,
    Even,
    Odd,
}

/// How to reach the meter(s): exactly one of `--tcp`, `--rtu-tcp`, `--serial`.
#[derive(Debug, Clone, clap::Args)]
#[command(group(clap::ArgGroup::new("transport").required(true).args(["tcp", "rtu_tcp", "serial"])))]
pub struct TransportArgs {
    /// Modbus TCP endpoint, HOST:PORT.
    #[arg(long)]
    pub tcp: Option<String>,
    /// Modbus RTU over TCP (serial server, DTU in transparent mode), HOST:PORT.
    #[arg(long)]
    pub rtu_tcp: Option<String>,
    /// Serial device, e.g. /dev/ttyUSB0.
    #[arg(long)]
    pub serial: Option<String>,
    /// Baud rate (serial; default: the profile's `[line]`, else 9600).
    #[arg(long)]
    pub baud: Option<u32>,
    #[arg(long, value_enum)]
    pub parity: Option<ParityArg>,
    #[arg(long)]
    pub data_bits: Option<u8>,
    #[arg(long)]
    pub stop_bits: Option<u8>,
    /// Per-request timeout, e.g. 500ms.
    #[arg(long, value_parser = crate::config::duration::parse)]
    pub timeout: Option<Duration>,
}

/// Arguments of `citygate probe`.
#[derive(Debug, clap::Args)]
pub struct ProbeArgs {
    /// Profile name (file stem in the profiles directory).
    #[arg(long)]
    pub profile: String,
    #[command(flatten)]
    pub transport: TransportArgs,
    /// Modbus unit id, 1..=247.
    #[arg(long)]
    pub unit: u8,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Default: ./firmware-profiles, then /usr/share/citygate/firmware-profiles.
    #[arg(long)]
    pub profiles_dir: Option<PathBuf>,
}

/// Arguments of `citygate scan`.
#[derive(Debug, clap::Args)]
pub struct ScanArgs {
    #[command(flatten)]
    pub transport: TransportArgs,
    /// Unit ids to try, e.g. 1-247 or 1-10.
    #[arg(long, default_value = "1-247")]
    pub units: String,
    /// Register to read (FC03 holding register, wire address).
    #[arg(long, default_value_t = 0)]
    pub register: u16,
    /// Stop after this long and report what was covered, e.g. 30s or 2m.
    #[arg(long, default_value = "30s", value_parser = crate::config::duration::parse)]
    pub budget: Duration,
}

/// `scan` reports its progress on stderr after this many unit ids.
const SCAN_PROGRESS_EVERY: usize = 16;

/// An open connection to a bus or endpoint.
enum Conn {
    Tcp(Context),
    Rtu(Transactor<BoxedStream>),
}

/// How one read failed.
#[derive(Debug)]
enum ReadError {
    Exception(u8),
    NoAnswer,
    Other(String),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Exception(c) => {
                write!(f, "device exception 0x{c:02X}{}", exception_name(*c))
            }
            ReadError::NoAnswer => write!(f, "no answer"),
            ReadError::Other(e) => write!(f, "{e}"),
        }
    }
}

fn exception_name(code: u8) -> &'static str {
    match code {
        1 => " (illegal function)",
        2 => " (illegal data address)",
        3 => " (illegal data value)",
        4 => " (device failure)",
        5 => " (acknowledge)",
        6 => " (device busy)",
        10 | 11 => " (gateway: target not reachable)",
        _ => "",
    }
}

impl TransportArgs {
    fn line(&self, profile: Option<&Profile>) -> LineSettings {
        LineOverride {
            baud: self.baud,
            data_bits: self.data_bits,
            parity: self.parity.map(|p| match p {
                ParityArg::None => Parity::None,
                ParityArg::Even => Parity::Even,
                ParityArg::Odd => Parity::Odd,
            }),
            stop_bits: self.stop_bits,
        }
        .resolve(profile.and_then(|p| p.line))
    }

    fn describe(&self) -> String {
        match (&self.tcp, &self.rtu_tcp, &self.serial) {
            (Some(a), _, _) => format!("tcp://{a}"),
            (_, Some(a), _) => format!("rtu+tcp://{a}"),
            (_, _, Some(p)) => format!("serial://{p}"),
            _ => "nowhere".into(),
        }
    }

    fn check(&self) -> Result<(), CliError> {
        let line = LineOverride {
            baud: self.baud,
            data_bits: self.data_bits,
            parity: None,
            stop_bits: self.stop_bits,
        };
        if let Some((key, msg)) = line.problems().into_iter().next() {
            return Err(CliError::Usage(format!(
                "--{}: {msg}",
                key.replace('_', "-")
            )));
        }
        Ok(())
    }

    async fn open(&self, line: &LineSettings) -> Result<Conn, CliError> {
        let limit = Duration::from_secs(3);
        let tcp = |a: &str| {
            let a = a.to_string();
            async move {
                let s = timeout(limit, tokio::net::TcpStream::connect(a.as_str()))
                    .await
                    .map_err(|_| runtime(format!("cannot connect to {a}: timed out")))?
                    .map_err(|e| runtime(format!("cannot connect to {a}: {}", io_reason(&e))))?;
                let _ = s.set_nodelay(true);
                Ok::<_, CliError>(s)
            }
        };
        let timing = LineTiming::new(line);
        if let Some(a) = &self.tcp {
            let s = tcp(a).await?;
            return Ok(Conn::Tcp(tokio_modbus::client::tcp::attach_slave(
                s,
                Slave(1),
            )));
        }
        if let Some(a) = &self.rtu_tcp {
            let s = tcp(a).await?;
            return Ok(Conn::Rtu(Transactor::new(Box::new(s), timing, Vec::new())));
        }
        if let Some(p) = &self.serial {
            let s = open_serial(p, line).map_err(|e| runtime(serial_reason(p, &e)))?;
            return Ok(Conn::Rtu(Transactor::new(Box::new(s), timing, Vec::new())));
        }
        Err(CliError::Usage(
            "give one of --tcp HOST:PORT, --rtu-tcp HOST:PORT or --serial DEV".into(),
        ))
    }
}

fn runtime(msg: String) -> CliError {
    CliError::Runtime(msg)
}

fn io_reason(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused (nothing listens there)".into(),
        io::ErrorKind::PermissionDenied => "permission denied".into(),
        io::ErrorKind::NotFound => "no such device or host".into(),
        _ => e.to_string(),
    }
}

fn serial_reason(port: &str, e: &io::Error) -> String {
    let text = e.to_string();
    let lower = text.to_lowercase();
    let why = if lower.contains("busy") || lower.contains("lock") {
        "port busy (another process has it open)".to_string()
    } else if e.kind() == io::ErrorKind::NotFound || lower.contains("no such file") {
        "no such device".to_string()
    } else if e.kind() == io::ErrorKind::PermissionDenied || lower.contains("permission denied") {
        "permission denied (is the user in the `dialout` group?)".to_string()
    } else {
        text
    };
    format!("cannot open serial port {port}: {why}")
}

impl Conn {
    async fn read(
        &mut self,
        unit: UnitId,
        function: FunctionCode,
        req: ReadRequest,
        limit: Duration,
    ) -> Result<Vec<u16>, ReadError> {
        match self {
            Conn::Rtu(t) => t
                .read(unit, function, req, limit)
                .await
                .map_err(|e| match e {
                    RtuError::Exception(c) => ReadError::Exception(c),
                    RtuError::Timeout(_) => ReadError::NoAnswer,
                    other => ReadError::Other(other.to_string()),
                }),
            Conn::Tcp(ctx) => {
                ctx.set_slave(Slave(unit.0));
                let request = match function {
                    FunctionCode::ReadHolding => {
                        Request::ReadHoldingRegisters(req.start.0, req.count)
                    }
                    FunctionCode::ReadInput => Request::ReadInputRegisters(req.start.0, req.count),
                };
                match timeout(limit, ctx.call(request)).await {
                    Err(_) => Err(ReadError::NoAnswer),
                    Ok(Ok(Ok(
                        Response::ReadHoldingRegisters(w) | Response::ReadInputRegisters(w),
                    ))) if w.len() == usize::from(req.count) => Ok(w),
                    Ok(Ok(Ok(other))) => {
                        Err(ReadError::Other(format!("unexpected reply {other:?}")))
                    }
                    Ok(Ok(Err(code))) => Err(ReadError::Exception(u8::from(code))),
                    Ok(Err(e)) => Err(ReadError::Other(e.to_string())),
                }
            }
        }
    }
}

/// `citygate probe`: returns the report to print.
pub fn probe(args: &ProbeArgs) -> Result<String, CliError> {
    if !(1..=247).contains(&args.unit) {
        return Err(CliError::Usage(format!(
            "--unit {}: valid: 1..=247",
            args.unit
        )));
    }
    args.transport.check()?;
    let profile = super::profiles::load_profile(args.profiles_dir.as_deref(), &args.profile)?;
    if profile.mqtt.is_some() {
        return Err(CliError::Usage(format!(
            "profile {} is an MQTT profile; probe reads Modbus meters (watch an MQTT meter's \
             topic with a broker client, or simulate it with `citygate sim --mqtt-broker`)",
            profile.name
        )));
    }
    let line = args.transport.line(Some(&profile));
    let limit = args.transport.timeout.unwrap_or(Duration::from_secs(1));
    let unit = UnitId(args.unit);
    let rt = super::runtime()?;
    let (image, errors) = rt.block_on(async {
        let mut conn = args.transport.open(&line).await?;
        let mut image = RegisterImage::new();
        let mut errors: Vec<(ReadRequest, ReadError)> = Vec::new();
        for req in plan(&profile) {
            match conn.read(unit, profile.function, req, limit).await {
                Ok(words) => image.insert(req.start, words),
                Err(e) => errors.push((req, e)),
            }
        }
        Ok::<_, CliError>((image, errors))
    })?;
    let target = args.transport.describe();
    if image.is_empty() {
        let why = errors
            .first()
            .map_or_else(|| "nothing to read".to_string(), |(_, e)| e.to_string());
        return Err(runtime(format!(
            "unit {unit} on {target}: {why} (timeout {limit:?})"
        )));
    }
    let device = DeviceId::new(format!("unit-{}", unit.0)).map_err(|e| runtime(e.to_string()))?;
    let mut rows = Vec::new();
    for f in &profile.fields {
        let words = image.get(f.address, f.words());
        let raw: Vec<String> = words
            .map(|w| w.iter().map(|x| format!("{x:04X}")).collect())
            .unwrap_or_default();
        let (value, quality) = match words {
            Some(w) => {
                let mut r = normalise_field(f, &device, 0, w);
                r.quality = r.quality.worst(assess(f, &r, None));
                (Some(r.value), r.quality.to_string())
            }
            None => (None, "missing (read failed)".to_string()),
        };
        rows.push((f, raw, value, quality));
    }
    if args.json {
        let fields: Vec<serde_json::Value> = rows
            .iter()
            .map(|(f, raw, value, quality)| {
                serde_json::json!({
                    "name": f.name.as_str(),
                    "register": f.register,
                    "address": f.address.0,
                    "type": f.ty.to_string(),
                    "order": f.order.to_string(),
                    "raw": raw,
                    "value": value.as_ref().map(json_value),
                    "unit": f.unit.canonical.symbol(),
                    "quality": quality,
                })
            })
            .collect();
        let errs: Vec<String> = errors
            .iter()
            .map(|(r, e)| format!("{}+{}: {e}", r.start, r.count))
            .collect();
        let doc = serde_json::json!({
            "profile": profile.name, "unit": unit.0, "transport": target,
            "fields": fields, "errors": errs,
        });
        return Ok(format!("{doc:#}\n"));
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} ({} {}) unit {} on {target}",
        profile.name, profile.vendor, profile.model, unit
    );
    for (r, e) in &errors {
        let _ = writeln!(out, "read {:#06x}+{} failed: {e}", r.start.0, r.count);
    }
    let _ = writeln!(
        out,
        "{:<24} {:>8} {:<5} {:<5} {:<20} {:>18} {:<6} quality",
        "field", "register", "type", "order", "raw", "value", "unit"
    );
    for (f, raw, value, quality) in rows {
        let _ = writeln!(
            out,
            "{:<24} {:>8} {:<5} {:<5} {:<20} {:>18} {:<6} {}",
            f.name.as_str(),
            format!("{:#06x}", f.register),
            f.ty.to_string(),
            f.order.to_string(),
            if raw.is_empty() {
                "-".to_string()
            } else {
                raw.join(" ")
            },
            value.as_ref().map_or_else(|| "-".into(), human),
            f.unit.canonical.symbol(),
            quality
        );
    }
    Ok(out)
}

/// A value as an operator reads it off a display: floats to 9 significant digits.
fn human(v: &Value) -> String {
    match v {
        Value::Float(x) if x.is_finite() && *x != 0.0 => {
            let magnitude = x.abs().log10().floor() as i32 + 1;
            let decimals = (9 - magnitude).clamp(0, 9) as usize;
            let s = format!("{x:.decimals$}");
            if s.contains('.') {
                s.trim_end_matches('0').trim_end_matches('.').to_string()
            } else {
                s
            }
        }
        other => other.to_string(),
    }
}

fn json_value(v: &Value) -> serde_json::Value {
    match v {
        Value::Int(i) => serde_json::json!(i),
        Value::Float(x) => serde_json::json!(x),
        Value::Bool(b) => serde_json::json!(b),
        Value::Text(t) => serde_json::json!(t),
    }
}

/// Parses `1-247`, `5` or `1-3,7`.
fn parse_units(s: &str) -> Result<Vec<u8>, CliError> {
    let bad = || {
        CliError::Usage(format!(
            "--units {s:?}: write e.g. 1-247 or 1-3,7 (ids 1..=247)"
        ))
    };
    let mut out = Vec::new();
    for part in s.split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let a: u8 = a.trim().parse().map_err(|_| bad())?;
        let b: u8 = b.trim().parse().map_err(|_| bad())?;
        if a == 0 || b > 247 || a > b {
            return Err(bad());
        }
        out.extend(a..=b);
    }
    Ok(out)
}

/// `citygate scan`: returns the report to print.
pub fn scan(args: &ScanArgs) -> Result<String, CliError> {
    args.transport.check()?;
    let units = parse_units(&args.units)?;
    let line = args.transport.line(None);
    let limit = args.transport.timeout.unwrap_or(Duration::from_millis(300));
    let rt = super::runtime()?;
    let total = units.len();
    let (found, tried) = rt.block_on(async {
        let started = tokio::time::Instant::now();
        let mut conn = args.transport.open(&line).await?;
        let mut found = Vec::new();
        let req = ReadRequest {
            start: RegisterAddress(args.register),
            count: 1,
        };
        let mut tried = 0;
        for u in units {
            if started.elapsed() >= args.budget {
                break;
            }
            tried += 1;
            match conn
                .read(UnitId(u), FunctionCode::ReadHolding, req, limit)
                .await
            {
                Ok(_) => found.push((u, "answers".to_string())),
                Err(ReadError::Exception(10 | 11)) | Err(ReadError::NoAnswer) => {}
                Err(ReadError::Exception(c)) => found.push((
                    u,
                    format!("answers with exception 0x{c:02X}{}", exception_name(c)),
                )),
                Err(ReadError::Other(e)) if e.contains("transport") => return Err(runtime(e)),
                Err(ReadError::Other(_)) => found.push((u, "answers (garbled reply)".into())),
            }
            if tried % SCAN_PROGRESS_EVERY == 0 || tried == total {
                eprintln!(
                    "scan: {tried}/{total} unit ids tried (up to {u}), {} answered",
                    found.len()
                );
            }
        }
        Ok::<_, CliError>((found, tried))
    })?;
    let mut out = String::new();
    let target = args.transport.describe();
    let cut = (tried < total).then(|| {
        format!(
            "the --budget of {:?} ran out after {tried} of {total} unit ids; \
             scan the rest with --units {}",
            args.budget,
            rest_of(&args.units, tried),
        )
    });
    if found.is_empty() {
        return Err(runtime(match cut {
            Some(cut) => format!("no unit answered on {target} (timeout {limit:?}); {cut}"),
            None => format!(
                "no unit answered on {target} (ids {}, timeout {limit:?})",
                args.units
            ),
        }));
    }
    for (u, what) in found {
        let _ = writeln!(out, "unit {u:>3}  {what}");
    }
    if let Some(cut) = cut {
        let _ = writeln!(out, "stopped: {cut}");
    }
    Ok(out)
}

/// The unit ids of `spec` after the first `tried`, written for `--units`.
fn rest_of(spec: &str, tried: usize) -> String {
    let units = parse_units(spec).unwrap_or_default();
    let rest = units.get(tried..).unwrap_or_default();
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < rest.len() {
        let mut j = i;
        while j + 1 < rest.len() && rest[j + 1] == rest[j].saturating_add(1) {
            j += 1;
        }
        parts.push(if i == j {
            rest[i].to_string()
        } else {
            format!("{}-{}", rest[i], rest[j])
        });
        i = j + 1;
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_read_like_a_display() {
        assert_eq!(human(&Value::Float(231.670_089_721_679_7)), "231.67009");
        assert_eq!(human(&Value::Float(0.912_919_521_331_787_1)), "0.912919521");
        assert_eq!(human(&Value::Float(44_182_250.0)), "44182250");
        assert_eq!(
            human(&Value::Float(-1_739.393_472_671_508_8)),
            "-1739.39347"
        );
        assert_eq!(human(&Value::Int(2)), "2");
    }

    /// issue 12 item 5: the ids a cut scan left, written back for `--units`.
    #[test]
    fn the_rest_of_a_cut_scan_is_a_units_argument() {
        assert_eq!(rest_of("1-247", 10), "11-247");
        assert_eq!(rest_of("1-3,7,9-10", 2), "3,7,9-10");
        assert_eq!(rest_of("1-3", 3), "");
    }

    #[test]
    fn unit_ranges_parse() {
        assert_eq!(parse_units("1-3,7").unwrap(), vec![1, 2, 3, 7]);
        assert!(parse_units("0-3").is_err());
        assert!(parse_units("5-2").is_err());
        assert!(parse_units("1-248").is_err());
    }
}
