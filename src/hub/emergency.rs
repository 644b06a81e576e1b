//! Emergency collection at the hub (issue 11 item 7): the hub marks, reports, exports and
//! destroys what a gateway collected under an emergency.
//!
//! A gateway switched into emergency collection (`citygate emergency start`) sends its
//! higher-resolution flow (stream `readings-7`) with the tags `emergency` and
//! `emergency_id=ID` on every data record, and reports on its `alarms` stream, subject
//! `gateway:<gateway id>`:
//!
//! - [`STARTED`] (value: expiry, Int unix ms), tags `emergency_id=`, `policy=`, `reason=`,
//!   `expires=` (RFC 3339);
//! - [`ENDED`] (value: purged batches), tags `emergency_id=`, `policy=`, `end=expired|stopped`,
//!   `produced_batches=`, `delivered_batches=`, `purged_batches=`, `evicted_batches=`,
//!   `seqs=FIRST..LAST|none`.
//!
//! The hub's side:
//!
//! - the sink gives every record with an `emergency_id=ID` tag a top-level `emergency_id`
//!   member (`sink`'s line format);
//! - the hub logs one WARN line per report record it writes ([`log_reports`]); the end report's
//!   line names the `citygate hub-emergency` commands to export or destroy the hub's copy;
//! - `citygate hub-emergency` lists the emergencies the sink holds ([`list`]), exports one's
//!   lines to a new file ([`export`]) or destroys its data records ([`destroy`]).
//!
//! A line belongs to emergency ID if its tags carry `emergency_id=ID`; it is a **report** if
//! its field is [`STARTED`] or [`ENDED`] and its subject `gateway:…`, else a **data** record.
//! Destroying removes the data records only: the reports stay as the audit trail, and one hub
//! event line `{"hub_event":"emergency_destroyed","emergency_id":ID,"records":N,"at_ms":…,
//! "at":…}` is appended. The rewrite is `rewrite`'s: crash-safe (temp file
//! `<sink>.emergency-tmp`, sync, rename, directory sync) and refused while a hub holds the
//! hub state. Listing and exporting only read the sink, so they may run beside a hub (they
//! see what it had written when they read). Lines that do not parse (a torn last line) are
//! never an emergency's; a sink ending in one is not destroyed in until a hub has recovered it.
//!
//! With the postgres sink ([`pg`](self::pg)) the same three work on the database: a record's
//! `emergency_id` column, reports found as above, and `emergency_destroyed` rows in
//! `hub_events`. Export writes each row as one JSON object; destruction deletes the data
//! records and records the event in one transaction, then vacuums the partitions they were in,
//! and may run beside running hubs.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::config::{HubConfig, SinkConfig};
use super::rewrite::{lock_hub, rewrite_sink, RewriteError};
use super::sink::{emergency_id, rfc3339_ms, BatchKey};
use crate::reading::{Record, Stream};

/// The field of a gateway's report that an emergency collection started.
pub(crate) const STARTED: &str = "emergency_started";
/// The field of a gateway's report that an emergency collection ended.
pub(crate) const ENDED: &str = "emergency_ended";
/// The subject prefix of a gateway's own records (`gateway:<id>`).
const GATEWAY_SUBJECT: &str = "gateway:";
/// The hub event a destruction appends.
const DESTROYED_EVENT: &str = "emergency_destroyed";
/// The temp file beside the sink a destruction writes (see `rewrite`).
const TEMP_SUFFIX: &str = ".emergency-tmp";

#[derive(Debug, thiserror::Error)]
pub enum EmergencyError {
    #[error(transparent)]
    Rewrite(#[from] RewriteError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no emergency {id:?} in the sink {sink}; {}", known_ids(known))]
    UnknownId {
        id: String,
        /// The sink's file or database URL.
        sink: String,
        known: Vec<String>,
    },
    #[error("{} exists; export writes a new file only", path.display())]
    ExportExists { path: PathBuf },
    /// The postgres sink's database failed or could not be reached.
    #[error("database: {0}")]
    Database(String),
}

fn known_ids(known: &[String]) -> String {
    if known.is_empty() {
        "it holds no emergency records".to_owned()
    } else {
        format!("ids found: {}", known.join(", "))
    }
}

impl EmergencyError {
    /// Whether the operator's input is at fault (an unknown id, an existing export file)
    /// rather than the hub's state or the disk.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            EmergencyError::UnknownId { .. } | EmergencyError::ExportExists { .. }
        )
    }
}

/// The value of the first `name=VALUE` tag.
fn tag<'a, S: AsRef<str>>(tags: &'a [S], name: &str) -> Option<&'a str> {
    tags.iter().find_map(|t| {
        t.as_ref()
            .strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('='))
    })
}

fn is_report(subject: &str, field: &str) -> bool {
    subject.starts_with(GATEWAY_SUBJECT) && (field == STARTED || field == ENDED)
}

/// Logs one WARN line per emergency report among a written batch's records; the end report's
/// line names the commands that export or destroy the hub's copy (`config`: the hub config
/// the hub was started with, if known).
pub(crate) fn log_reports(config: Option<&Path>, key: &BatchKey, records: &[Record]) {
    if key.stream != Stream::Alarms {
        return;
    }
    for r in records.iter().filter(|r| is_report(&r.subject, &r.field)) {
        let tags = &r.tags;
        let id = emergency_id(tags).unwrap_or("(none)");
        let policy = tag(tags, "policy").unwrap_or("(none)");
        let n = |name| tag(tags, name).unwrap_or("?");
        if r.field == STARTED {
            tracing::warn!(
                gateway = %key.gateway,
                emergency_id = id,
                policy,
                reason = ?n("reason"),
                expires = n("expires"),
                "emergency collection started at a gateway"
            );
        } else {
            let config = config.map_or_else(|| "HUB.toml".into(), |p| p.display().to_string());
            tracing::warn!(
                gateway = %key.gateway,
                emergency_id = id,
                policy,
                end = n("end"),
                produced_batches = n("produced_batches"),
                delivered_batches = n("delivered_batches"),
                purged_batches = n("purged_batches"),
                evicted_batches = n("evicted_batches"),
                seqs = n("seqs"),
                next = %format_args!("citygate hub-emergency --config {config} --id {id} --export FILE|--destroy"),
                "emergency collection ended at a gateway: export or destroy the hub's copy"
            );
        }
    }
}

/// What the sink holds of one emergency.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Emergency {
    pub id: String,
    /// Gateways of its records and reports.
    pub gateways: BTreeSet<String>,
    /// Policies its reports name.
    pub policies: BTreeSet<String>,
    /// Purposes its data records were made under.
    pub purposes: BTreeSet<String>,
    /// Data records held.
    pub records: u64,
    /// Report records held.
    pub reports: u64,
    pub first_ms: Option<i64>,
    pub last_ms: Option<i64>,
    pub started: Option<Started>,
    pub ended: Option<Ended>,
    /// The last destruction of the hub's copy, if any.
    pub destroyed: Option<Destroyed>,
}

/// A gateway's start report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Started {
    pub gateway: String,
    pub reason: Option<String>,
    pub expires: Option<String>,
}

/// A gateway's end report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ended {
    pub gateway: String,
    /// `expired` or `stopped`.
    pub end: Option<String>,
    pub produced_batches: Option<u64>,
    pub delivered_batches: Option<u64>,
    pub purged_batches: Option<u64>,
    pub evicted_batches: Option<u64>,
    /// `FIRST..LAST` or `none`.
    pub seqs: Option<String>,
}

/// A destruction of the hub's copy (its hub event line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Destroyed {
    /// Data records removed.
    pub records: u64,
    pub at_ms: i64,
}

/// The members of a record line this module reads.
#[derive(Deserialize)]
struct RecordLine {
    gateway: String,
    purpose: Option<String>,
    subject: String,
    field: String,
    at_ms: i64,
    tags: Vec<String>,
}

/// An `emergency_destroyed` hub event line.
#[derive(Serialize, Deserialize)]
struct DestroyedLine {
    hub_event: String,
    emergency_id: String,
    records: u64,
    at_ms: i64,
    #[serde(default)]
    at: Option<String>,
}

/// What one sink line is to the emergencies.
enum Parsed {
    Data { id: String, line: RecordLine },
    Report { id: String, line: RecordLine },
    Destroyed(DestroyedLine),
}

/// The emergency `line` belongs to and how, or `None` (other records, unknown hub events,
/// lines that do not parse).
fn parse(line: &[u8]) -> Option<Parsed> {
    if let Ok(r) = serde_json::from_slice::<RecordLine>(line) {
        let id = emergency_id(&r.tags)?.to_owned();
        return Some(if is_report(&r.subject, &r.field) {
            Parsed::Report { id, line: r }
        } else {
            Parsed::Data { id, line: r }
        });
    }
    serde_json::from_slice::<DestroyedLine>(line)
        .ok()
        .filter(|d| d.hub_event == DESTROYED_EVENT)
        .map(Parsed::Destroyed)
}

fn parsed_id(p: &Parsed) -> &str {
    match p {
        Parsed::Data { id, .. } | Parsed::Report { id, .. } => id,
        Parsed::Destroyed(d) => &d.emergency_id,
    }
}

/// The sink's files: its rotated files (`hub::rotate`), oldest first, then the current one.
fn sink_files(path: &Path) -> Result<Vec<PathBuf>, EmergencyError> {
    let mut files = super::rotate::rotated_files(path).map_err(|source| EmergencyError::Io {
        path: path.to_owned(),
        source,
    })?;
    files.push(path.to_owned());
    Ok(files)
}

/// Calls `each` with every line of the sink's files, rotated ones first (none if there is
/// no sink).
fn for_each_line(path: &Path, mut each: impl FnMut(&[u8])) -> Result<(), EmergencyError> {
    for file in sink_files(path)? {
        for_each_line_of(&file, &mut each)?;
    }
    Ok(())
}

/// Calls `each` with every line of the file `path` (none if it does not exist).
fn for_each_line_of(path: &Path, mut each: impl FnMut(&[u8])) -> Result<(), EmergencyError> {
    let io_err = |source| EmergencyError::Io {
        path: path.to_owned(),
        source,
    };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(e)),
    };
    let mut reader = BufReader::new(file);
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).map_err(io_err)? == 0 {
            return Ok(());
        }
        each(&line);
    }
}

/// Every emergency the sink holds, by id.
fn scan(path: &Path) -> Result<BTreeMap<String, Emergency>, EmergencyError> {
    let mut all: BTreeMap<String, Emergency> = BTreeMap::new();
    for_each_line(path, |line| {
        if let Some(p) = parse(line) {
            absorb(&mut all, p);
        }
    })?;
    Ok(all)
}

/// Adds one data record, report or destruction to its emergency in `all`.
fn absorb(all: &mut BTreeMap<String, Emergency>, p: Parsed) {
    let e = all
        .entry(parsed_id(&p).to_owned())
        .or_insert_with_key(|id| Emergency {
            id: id.clone(),
            ..Emergency::default()
        });
    match p {
        Parsed::Data { line, .. } => {
            e.records += 1;
            e.gateways.insert(line.gateway);
            e.purposes.extend(line.purpose);
            e.first_ms = Some(e.first_ms.map_or(line.at_ms, |f| f.min(line.at_ms)));
            e.last_ms = Some(e.last_ms.map_or(line.at_ms, |l| l.max(line.at_ms)));
        }
        Parsed::Report { line, .. } => {
            e.reports += 1;
            e.gateways.insert(line.gateway.clone());
            e.policies
                .extend(tag(&line.tags, "policy").map(str::to_owned));
            let text = |name| tag(&line.tags, name).map(str::to_owned);
            let count = |name| tag(&line.tags, name).and_then(|v| v.parse().ok());
            if line.field == STARTED {
                e.started = Some(Started {
                    gateway: line.gateway.clone(),
                    reason: text("reason"),
                    expires: text("expires"),
                });
            } else {
                e.ended = Some(Ended {
                    gateway: line.gateway.clone(),
                    end: text("end"),
                    produced_batches: count("produced_batches"),
                    delivered_batches: count("delivered_batches"),
                    purged_batches: count("purged_batches"),
                    evicted_batches: count("evicted_batches"),
                    seqs: text("seqs"),
                });
            }
        }
        Parsed::Destroyed(d) => {
            e.destroyed = Some(Destroyed {
                records: d.records,
                at_ms: d.at_ms,
            });
        }
    }
}

/// Every emergency `cfg`'s sink holds, by id. Reads the sink (blocks).
pub fn list(cfg: &HubConfig) -> Result<Vec<Emergency>, EmergencyError> {
    let all = match &cfg.sink {
        SinkConfig::Jsonl { path, .. } => scan(path)?,
        SinkConfig::Postgres(db) => pg::scan(&mut pg::connect(db)?)?,
    };
    Ok(all.into_values().collect())
}

/// Emergency `id` in `all`, or the error naming the ids there are.
fn known<'a>(
    all: &'a BTreeMap<String, Emergency>,
    id: &str,
    sink: &str,
) -> Result<&'a Emergency, EmergencyError> {
    all.get(id).ok_or_else(|| EmergencyError::UnknownId {
        id: id.to_owned(),
        sink: sink.to_owned(),
        known: all.keys().cloned().collect(),
    })
}

/// Writes every sink line of emergency `id` (data records, reports, destruction events), byte
/// for byte, to the new file `out` (mode 0600, synced); returns how many. Refuses an existing
/// `out`. Reads the sink, writes and syncs (blocks).
pub fn export(cfg: &HubConfig, id: &str, out: &Path) -> Result<u64, EmergencyError> {
    let path = match &cfg.sink {
        SinkConfig::Jsonl { path, .. } => path,
        SinkConfig::Postgres(db) => return pg::export(db, id, out),
    };
    known(&scan(path)?, id, &path.display().to_string())?;
    let out_err = |source| EmergencyError::Io {
        path: out.to_owned(),
        source,
    };
    let mut writer = create_export(out)?;
    let mut written = 0;
    let mut failed = None;
    for_each_line(path, |line| {
        if failed.is_some() || !parse(line).is_some_and(|p| parsed_id(&p) == id) {
            return;
        }
        match writer.write_all(line) {
            Ok(()) => written += 1,
            Err(e) => failed = Some(e),
        }
    })?;
    if let Some(e) = failed {
        return Err(out_err(e));
    }
    finish_export(out, writer)?;
    tracing::info!(emergency_id = id, lines = written, file = %out.display(), "emergency exported");
    Ok(written)
}

/// Creates the new export file `out`, mode 0600; refuses an existing one.
fn create_export(out: &Path) -> Result<io::BufWriter<File>, EmergencyError> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options.open(out).map_err(|e| match e.kind() {
        io::ErrorKind::AlreadyExists => EmergencyError::ExportExists {
            path: out.to_owned(),
        },
        _ => EmergencyError::Io {
            path: out.to_owned(),
            source: e,
        },
    })?;
    Ok(io::BufWriter::new(file))
}

/// Flushes and syncs the export file `out` and its directory.
fn finish_export(out: &Path, writer: io::BufWriter<File>) -> Result<(), EmergencyError> {
    let out_err = |source| EmergencyError::Io {
        path: out.to_owned(),
        source,
    };
    let file = writer.into_inner().map_err(|e| out_err(e.into_error()))?;
    file.sync_all().map_err(out_err)?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(out_err)?;
    }
    Ok(())
}

/// What [`destroy`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destruction {
    /// This many data records were removed and the event recorded.
    Destroyed(u64),
    /// No data records were left (an earlier destruction, if any, is given); nothing changed.
    NothingHeld(Option<Destroyed>),
}

/// Removes emergency `id`'s data records from the sink, keeping its reports and every other
/// line byte for byte, and appends the `emergency_destroyed` event stamped `now_ms`. Refuses
/// beside a running hub. Blocks (file I/O, fsync).
pub fn destroy(cfg: &HubConfig, id: &str, now_ms: i64) -> Result<Destruction, EmergencyError> {
    let path = match &cfg.sink {
        SinkConfig::Jsonl { path, .. } => path,
        SinkConfig::Postgres(db) => return pg::destroy(db, id, now_ms),
    };
    let hub_lock = lock_hub(cfg, "destroying emergency records")?;
    let all = scan(path)?;
    let e = known(&all, id, &path.display().to_string())?;
    if e.records == 0 {
        return Ok(Destruction::NothingHeld(e.destroyed.clone()));
    }
    let records = e.records;
    let mut event = serde_json::to_vec(&DestroyedLine {
        hub_event: DESTROYED_EVENT.to_owned(),
        emergency_id: id.to_owned(),
        records,
        at_ms: now_ms,
        at: rfc3339_ms(now_ms),
    })
    .expect("invariant: an event line serialises");
    event.push(b'\n');
    let is_data = |line: &[u8]| matches!(parse(line), Some(Parsed::Data { id: i, .. }) if i == id);
    // Rotated files that hold some of its records are rewritten without them; the current
    // file (or, before its first write after a rotation, the newest rotated one) also gets
    // the event.
    let files = sink_files(path)?;
    let event_at = if path.exists() {
        path.to_owned()
    } else {
        files
            .iter()
            .rev()
            .find(|f| f.exists())
            .cloned()
            .unwrap_or_else(|| path.to_owned())
    };
    for file in &files {
        let mut held = 0u64;
        for_each_line_of(file, |line| held += u64::from(is_data(line)))?;
        let trailer: &[u8] = if *file == event_at { &event } else { b"" };
        if held > 0 || !trailer.is_empty() {
            rewrite_sink(&hub_lock, file, TEMP_SUFFIX, |line| !is_data(line), trailer)?;
        }
    }
    tracing::info!(emergency_id = id, records, sink = %path.display(), "emergency records destroyed");
    Ok(Destruction::Destroyed(records))
}

mod pg;
#[cfg(test)]
mod tests;
