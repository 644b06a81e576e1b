//! [`JsonlSink`]: accepted records as JSON Lines in one file.
//!
//! # JSON Lines format
//!
//! One object per record, one record per line (`\n`-terminated), members in this order:
//!
//! ```text
//! {"gateway":"gw-1","stream":"readings","incarnation":"5eed0000000000ff","seq":42,
//!  "purpose":"grid-operation","subject":"p-0123…","field":"voltage_l1",
//!  "value":230.5,"unit":"V","at_ms":1700000000000,"timestamp":"2023-11-14T22:13:20.000Z",
//!  "quality":"uncertain:out_of_range","tags":["emergency"]}
//! {"gateway":"gw-1","stream":"readings","incarnation":"5eed0000000000ff","seq":43,
//!  "purpose":"billing","subject":"p-0123…","field":"energy_import",
//!  "value":4200,"unit":"Wh","at_ms":1699995600000,"timestamp":"2023-11-14T21:00:00.000Z",
//!  "quality":"good","tags":[],
//!  "window":{"function":"delta","start_ms":1699995600000,"end_ms":1699999200000,
//!            "start":"2023-11-14T21:00:00.000Z","end":"2023-11-14T22:00:00.000Z",
//!            "samples":360,"devices":1,"partial":false},
//!  "epoch":3}
//! ```
//!
//! - `purpose`: the purpose the batch was made under (envelope header); `null` for batches of
//!   envelope versions 1 and 2, which did not carry it. Lines written before purposes were
//!   recorded have no `purpose`.
//! - `window`: only on aggregates: the function (`sum`, `mean`, `min`, `max`, `last`,
//!   `delta`), the window `[start_ms, end_ms)` as ms and as RFC 3339 UTC (`null` outside years
//!   1970..=9999), how many readings (`samples`) from how many devices it covers, and whether
//!   it covers only part of the window (`partial`). An aggregate's `at_ms` is its window start.
//! - `epoch`: the pseudonym key epoch of `subject`, only when not 0 (0: before key epochs).
//! - `emergency_id`: only on records made under an emergency collection (issue 11 item 7):
//!   the `ID` of the record's `emergency_id=ID` tag (`[A-Za-z0-9._-]{1,64}`), last member of
//!   the line, so `citygate hub-emergency` and any reader find an emergency's records without
//!   parsing tags. Lines without a valid such tag have no `emergency_id`.
//!
//! - `incarnation`: the gateway store's incarnation (envelope header), 16 lowercase hex digits;
//!   with `gateway`, `stream` and `seq` it names the batch. Lines written before incarnations
//!   existed have no `incarnation` and count as incarnation 0.
//! - `value`: a JSON integer (`Int`), number (`Float`; `null` if not finite), `true`/`false`
//!   (`Bool`) or string (`Text`).
//! - `unit`: the canonical unit symbol (`W`, `Wh`, `V`, `m3`, …).
//! - `timestamp`: `at_ms` as RFC 3339 UTC with milliseconds; `null` outside years 1970..=9999.
//! - `quality`: `"good"`, `"uncertain:REASON"` or `"bad:REASON"`, REASON one of
//!   `out_of_range`, `not_available`, `counter_backwards`, `counter_rollover`, `not_finite`,
//!   `receive_time`, `clock_skew`, `spike`, `frozen`, `counter_reset`.
//!
//! # Hub event lines
//!
//! Besides record lines, offline maintenance may append a line recording what it did to the
//! file. Such a line has a `hub_event` member and no batch key (`gateway`, `stream`, `seq`):
//!
//! ```text
//! {"hub_event":"emergency_destroyed","emergency_id":"em-20261130T233000Z-1a2b","records":1234,
//!  "at_ms":1764547200000,"at":"2025-12-01T00:00:00.000Z"}
//! ```
//!
//! `emergency_destroyed` (`citygate hub-emergency --destroy`, `hub::emergency`): the data
//! records of emergency `emergency_id` were removed from the file (`records` of them) at
//! `at`; its report records stay. Readers skip event lines they do not know; recovery treats
//! them as a boundary between batches, never as part of one.
//!
//! A group of batches (one or more, [`JsonlSink::write_batches`]) is written with one `write_all`,
//! each batch's lines together, and made durable with one `sync_data` before the call returns,
//! because the hub acks on return. If the write fails, the file is truncated back to its length
//! before the group, so a failed group leaves nothing behind. The hub keeps a group's sealed
//! payloads small (`hub::service`), so a group stays well inside the tail that recovery scans.
//!
//! # Restart (crash window)
//!
//! The hub writes the sink first and marks the batch seen afterwards, so a crash between the two
//! leaves a batch in the sink that the de-dup state does not know; the gateway re-sends it.
//! [`JsonlSink::recover`] closes that window at start-up: it scans the last [`TAIL_SCAN_BYTES`] of the
//! file and returns the (gateway, stream, seq) of every batch found there that the de-dup state
//! does not know yet, so the hub marks them before accepting anything. If the file ends in a torn
//! line (a crash mid-write), the torn bytes are cut off, and so are the complete lines of the last
//! batch before them unless that batch is already marked (then the torn line began a new batch):
//! that batch was never acknowledged and is re-sent whole. What remains uncovered: a crash that
//! leaves the last batch cut exactly at a line boundary (its missing lines are then lost, the
//! re-sent batch being taken as a duplicate), and batches older than the scanned tail whose marks
//! power loss erased.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::{BatchKey, SinkBatch, SinkError};
use crate::hub::config::Rotation;
use crate::reading::{PurposeName, Quality, Value, Window};

/// How much of the end of a JSON Lines file [`JsonlSink::recover`] reads.
pub(crate) const TAIL_SCAN_BYTES: u64 = 4 * 1024 * 1024;
/// Last millisecond RFC 3339 can express with four-digit years (9999-12-31T23:59:59.999Z).
const MAX_RFC3339_MS: i64 = 253_402_300_799_999;
/// The tag naming the emergency collection a record was made under: `emergency_id=ID`.
pub(crate) const EMERGENCY_ID_TAG: &str = "emergency_id=";

/// The emergency id among `tags` (`emergency_id=ID`, ID `[A-Za-z0-9._-]{1,64}`), if any.
pub(crate) fn emergency_id<S: AsRef<str>>(tags: &[S]) -> Option<&str> {
    tags.iter()
        .filter_map(|t| t.as_ref().strip_prefix(EMERGENCY_ID_TAG))
        .find(|id| {
            (1..=64).contains(&id.len())
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        })
}

/// Appends JSON Lines to one file.
#[derive(Debug)]
pub(crate) struct JsonlSink {
    path: PathBuf,
    file: Mutex<File>,
    rotation: Rotation,
    /// When the current file was started (its creation time, or when it was opened).
    since: Mutex<SystemTime>,
}

#[derive(Serialize)]
struct Line<'a> {
    gateway: &'a str,
    stream: &'static str,
    incarnation: String,
    seq: u64,
    purpose: Option<&'a str>,
    subject: &'a str,
    field: &'a str,
    value: serde_json::Value,
    unit: &'static str,
    at_ms: i64,
    timestamp: Option<String>,
    quality: String,
    tags: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    window: Option<WindowLine>,
    #[serde(skip_serializing_if = "is_zero")]
    epoch: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    emergency_id: Option<&'a str>,
}

#[derive(Serialize)]
struct WindowLine {
    function: &'static str,
    start_ms: i64,
    end_ms: i64,
    start: Option<String>,
    end: Option<String>,
    samples: u32,
    devices: u32,
    partial: bool,
}

impl From<&Window> for WindowLine {
    fn from(w: &Window) -> WindowLine {
        WindowLine {
            function: w.function.as_str(),
            start_ms: w.start_ms,
            end_ms: w.end_ms,
            start: rfc3339_ms(w.start_ms),
            end: rfc3339_ms(w.end_ms),
            samples: w.samples,
            devices: w.devices,
            partial: w.partial,
        }
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn json_value(v: &Value) -> serde_json::Value {
    match v {
        Value::Int(i) => (*i).into(),
        Value::Float(f) => {
            serde_json::Number::from_f64(*f).map_or(serde_json::Value::Null, Into::into)
        }
        Value::Bool(b) => (*b).into(),
        Value::Text(s) => s.as_str().into(),
    }
}

/// `at_ms` as RFC 3339 UTC with milliseconds, if representable.
pub(crate) fn rfc3339_ms(at_ms: i64) -> Option<String> {
    let ms = u64::try_from(at_ms)
        .ok()
        .filter(|_| at_ms <= MAX_RFC3339_MS)?;
    let t = UNIX_EPOCH.checked_add(Duration::from_millis(ms))?;
    Some(humantime::format_rfc3339_millis(t).to_string())
}

/// `"good"`, `"uncertain:REASON"` or `"bad:REASON"`.
pub(crate) fn quality_label(q: Quality) -> String {
    match q {
        Quality::Good => "good".to_owned(),
        Quality::Uncertain(r) => format!("uncertain:{}", r.as_str()),
        Quality::Bad(r) => format!("bad:{}", r.as_str()),
    }
}

/// The JSON Lines bytes of one batch.
pub(crate) fn encode_batch(batch: &SinkBatch<'_>) -> Vec<u8> {
    let SinkBatch {
        key,
        purpose,
        records,
        ..
    } = *batch;
    let mut out = Vec::with_capacity(records.len() * 256);
    for r in records {
        let line = Line {
            gateway: key.gateway.as_str(),
            stream: key.stream.as_str(),
            incarnation: format!("{:016x}", key.incarnation),
            seq: key.seq,
            purpose: purpose.map(PurposeName::as_str),
            subject: &r.subject,
            field: &r.field,
            value: json_value(&r.value),
            unit: r.unit.symbol(),
            at_ms: r.at_ms,
            timestamp: rfc3339_ms(r.at_ms),
            quality: quality_label(r.quality),
            tags: &r.tags,
            window: r.window.as_ref().map(WindowLine::from),
            epoch: r.epoch,
            emergency_id: emergency_id(&r.tags),
        };
        serde_json::to_writer(&mut out, &line).expect("invariant: a record line serialises");
        out.push(b'\n');
    }
    out
}

impl JsonlSink {
    /// Opens (or creates) the file for appending; creates its directory if needed.
    pub(crate) fn open(path: &Path) -> Result<JsonlSink, SinkError> {
        let file = open_append(path)?;
        let since = started(&file);
        Ok(JsonlSink {
            path: path.to_owned(),
            file: Mutex::new(file),
            rotation: Rotation::default(),
            since: Mutex::new(since),
        })
    }

    /// Rotates the file as `rotation` says (see [`super::rotate`]).
    pub(crate) fn with_rotation(mut self, rotation: Rotation) -> JsonlSink {
        self.rotation = rotation;
        self
    }

    /// Starts a fresh file if the current one is due; call with the file locked, before a
    /// group's lines.
    fn rotate_if_due(&self, file: &mut File) -> Result<(), SinkError> {
        let now = SystemTime::now();
        let mut since = self.since.lock().unwrap_or_else(PoisonError::into_inner);
        let len = file.metadata().map_err(self.io_err())?.len();
        if !crate::hub::rotate::due(&self.rotation, len, *since, now) {
            return Ok(());
        }
        let to = crate::hub::rotate::rotate(&self.path, now).map_err(self.io_err())?;
        *file = open_append(&self.path)?;
        *since = now;
        tracing::info!(rotated_to = %to.display(), bytes = len, "sink rotated");
        Ok(())
    }

    fn io_err(&self) -> impl FnOnce(io::Error) -> SinkError + '_ {
        move |source| SinkError::Io {
            path: self.path.clone(),
            source,
        }
    }
}

/// When `file` was started: its creation time where the file system keeps one, else now.
fn started(file: &File) -> SystemTime {
    file.metadata()
        .and_then(|m| m.created())
        .unwrap_or_else(|_| SystemTime::now())
}

/// Opens (or creates) `path` for appending, creating its directory if needed.
fn open_append(path: &Path) -> Result<File, SinkError> {
    let io_err = |source| SinkError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_err)?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(path)
        .map_err(io_err)
}

/// A line's batch key, ignoring the other members.
fn line_key(line: &[u8]) -> Option<BatchKey> {
    serde_json::from_slice::<BatchKey>(line).ok()
}

/// Whether a line is a hub event line (see the module docs): an object with a string
/// `hub_event`.
pub(crate) fn is_hub_event(line: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(line)
        .is_ok_and(|m| m.get("hub_event").is_some_and(serde_json::Value::is_string))
}

impl JsonlSink {
    /// Writes several batches' records, all or none; they survive a crash once this returns
    /// `Ok` (one sync for the group).
    pub(crate) fn write_batches(&self, batches: &[SinkBatch<'_>]) -> Result<(), SinkError> {
        let mut bytes = Vec::new();
        for batch in batches {
            bytes.extend_from_slice(&encode_batch(batch));
        }
        if bytes.is_empty() {
            return Ok(());
        }
        let mut file = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        self.rotate_if_due(&mut file)?;
        let before = file.metadata().map_err(self.io_err())?.len();
        let written = file.write_all(&bytes).and_then(|()| file.sync_data());
        if let Err(e) = written {
            if let Err(undo) = file.set_len(before).and_then(|()| file.sync_data()) {
                tracing::error!(path = %self.path.display(), error = %undo, "cannot undo a failed sink write");
            }
            return Err(self.io_err()(e));
        }
        Ok(())
    }

    /// Writes one batch's records ([`JsonlSink::write_batches`] of one), without a purpose.
    #[cfg(test)]
    pub(crate) fn write_batch(
        &self,
        key: &BatchKey,
        records: &[crate::reading::Record],
    ) -> Result<(), SinkError> {
        self.write_batches(&[SinkBatch {
            key,
            purpose: None,
            header: None,
            records,
        }])
    }

    /// Reopens the file after log rotation moved it (SIGHUP).
    pub(crate) fn reopen(&self) -> Result<(), SinkError> {
        // Opened before taking the lock, swapped under it: a write in progress finishes on
        // the old file; every later write goes to the file now at `path`.
        let fresh = open_append(&self.path)?;
        let since = started(&fresh);
        let mut file = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        file.sync_all().map_err(self.io_err())?;
        *file = fresh;
        *self.since.lock().unwrap_or_else(PoisonError::into_inner) = since;
        Ok(())
    }

    /// At start-up: batches the file holds durably that `is_marked` does not know (see the
    /// module docs).
    pub(crate) fn recover(
        &self,
        is_marked: &dyn Fn(&BatchKey) -> bool,
    ) -> Result<Vec<BatchKey>, SinkError> {
        let mut file = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        let len = file.metadata().map_err(self.io_err())?.len();
        let start = len.saturating_sub(TAIL_SCAN_BYTES);
        let mut tail = Vec::new();
        file.seek(SeekFrom::Start(start)).map_err(self.io_err())?;
        (&mut *file)
            .take(len - start)
            .read_to_end(&mut tail)
            .map_err(self.io_err())?;

        // Complete lines as (offset in file, key); the first may be cut by the scan window.
        let mut lines: Vec<(u64, Option<BatchKey>)> = Vec::new();
        let mut pos = 0usize;
        let mut torn_at = None;
        let mut unreadable = 0usize;
        while pos < tail.len() {
            let offset = start + pos as u64;
            match tail[pos..].iter().position(|b| *b == b'\n') {
                Some(n) => {
                    if !(pos == 0 && start > 0) {
                        // A hub event line has no key: a boundary that belongs to no batch.
                        let line = &tail[pos..pos + n];
                        let key = line_key(line);
                        if key.is_none() && !is_hub_event(line) {
                            unreadable += 1;
                        }
                        lines.push((offset, key));
                    }
                    pos += n + 1;
                }
                None => {
                    torn_at = Some(offset);
                    break;
                }
            }
        }
        if unreadable > 0 {
            tracing::warn!(path = %self.path.display(), lines = unreadable, "sink tail holds lines without a batch key");
        }

        if let Some(torn) = torn_at {
            let mut cut = torn;
            if let Some((_, Some(last))) = lines.last().cloned() {
                if !is_marked(&last) {
                    while let Some((offset, Some(k))) = lines.last() {
                        if *k != last {
                            break;
                        }
                        cut = *offset;
                        lines.pop();
                    }
                }
            }
            tracing::warn!(path = %self.path.display(), from = cut, to = len, "cutting an unacknowledged, partly written batch off the sink");
            file.set_len(cut)
                .and_then(|()| file.sync_data())
                .map_err(self.io_err())?;
        }

        let mut found: Vec<BatchKey> = Vec::new();
        let mut previous: Option<BatchKey> = None;
        for key in lines.into_iter().filter_map(|(_, k)| k) {
            // A batch's lines are contiguous: ask once per batch, not once per line.
            if previous.as_ref() != Some(&key) {
                if !found.contains(&key) && !is_marked(&key) {
                    found.push(key.clone());
                }
                previous = Some(key);
            }
        }
        Ok(found)
    }
}
