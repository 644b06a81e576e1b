//! Following the hub's JSON Lines sink, and the exact accounting of what reached it.
//!
//! [`Tailer`] reads the bytes appended to the sink every [`TAIL_EVERY`] on a thread of its
//! own; a line's *seen* time is when the tailer first read it complete (the hub writes a
//! batch with one `write_all` and syncs it, so this is its write time within
//! [`TAIL_EVERY`] plus the tailer's own scheduling). Each line is reduced to an [`Entry`]:
//! interned subject and field, `at_ms` (when the gateway read the meter), the seen time.
//!
//! [`account`] compares the sink with what the simulators served, per device (subject):
//! - duplicated: lines whose (subject, field, at_ms) occurred before;
//! - delivered polls: distinct `at_ms` of the device's readings lines;
//! - lost: Σ max(0, served − delivered); extra: Σ max(0, delivered − served) (a line for
//!   a device the simulators never served counts as extra too). Both must be 0.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Deserialize;

use crate::reading::now_ms;

/// How often the tailer reads what was appended.
pub(super) const TAIL_EVERY: Duration = Duration::from_millis(5);

/// One sink line, reduced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Entry {
    pub subject: u32,
    pub field: u32,
    /// The line is on the readings stream.
    pub readings: bool,
    pub at_ms: i64,
    pub seen_ms: i64,
}

/// The members of a sink line the accounting needs.
#[derive(Debug, Deserialize)]
struct Line<'a> {
    #[serde(borrow)]
    stream: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    subject: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    field: std::borrow::Cow<'a, str>,
    at_ms: i64,
}

/// Every line read so far, in sink order.
#[derive(Debug, Default)]
pub(super) struct SinkLog {
    pub subjects: Vec<String>,
    subject_ix: HashMap<String, u32>,
    fields: HashMap<String, u32>,
    pub entries: Vec<Entry>,
    /// Lines that are not sink records (never expected).
    pub unreadable: u64,
    /// Distinct (subject, at_ms) of readings lines: polls delivered so far.
    polls: HashSet<(u32, i64)>,
}

impl SinkLog {
    /// Adds one line (without its `\n`), first read at `seen_ms`.
    pub(super) fn push(&mut self, line: &str, seen_ms: i64) {
        let Ok(l) = serde_json::from_str::<Line<'_>>(line) else {
            self.unreadable += 1;
            return;
        };
        let next = u32::try_from(self.subjects.len()).unwrap_or(u32::MAX);
        let subject = *self
            .subject_ix
            .entry(l.subject.to_string())
            .or_insert_with(|| {
                self.subjects.push(l.subject.to_string());
                next
            });
        let next = u32::try_from(self.fields.len()).unwrap_or(u32::MAX);
        let field = *self.fields.entry(l.field.to_string()).or_insert(next);
        let readings = l.stream == "readings";
        if readings {
            self.polls.insert((subject, l.at_ms));
        }
        self.entries.push(Entry {
            subject,
            field,
            readings,
            at_ms: l.at_ms,
            seen_ms,
        });
    }

    /// Polls delivered so far (all devices).
    pub(super) fn delivered_polls(&self) -> u64 {
        self.polls.len() as u64
    }
}

/// Progress the tailer publishes while it runs.
#[derive(Debug, Default)]
pub(super) struct Progress {
    pub lines: AtomicU64,
    pub delivered_polls: AtomicU64,
}

/// The thread following the sink file.
#[derive(Debug)]
pub(super) struct Tailer {
    stop: Arc<AtomicBool>,
    pub progress: Arc<Progress>,
    thread: JoinHandle<SinkLog>,
}

impl Tailer {
    /// Follows `path` (which may not exist yet) until [`Tailer::finish`].
    pub(super) fn start(path: PathBuf) -> Tailer {
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(Progress::default());
        let (s, p) = (stop.clone(), progress.clone());
        let thread = std::thread::spawn(move || follow(&path, &s, &p));
        Tailer {
            stop,
            progress,
            thread,
        }
    }

    /// Reads what is left and returns every line seen.
    pub(super) fn finish(self) -> SinkLog {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap_or_default()
    }
}

fn follow(path: &std::path::Path, stop: &AtomicBool, progress: &Progress) -> SinkLog {
    let mut log = SinkLog::default();
    let mut file = None;
    let mut offset = 0u64;
    let mut pending: Vec<u8> = Vec::new();
    let mut chunk = Vec::new();
    loop {
        // Read the stop flag first: the pass after it was set reads everything written
        // before it was set.
        let last = stop.load(Ordering::SeqCst);
        if file.is_none() {
            file = std::fs::File::open(path).ok();
        }
        if let Some(f) = file.as_mut() {
            chunk.clear();
            if f.seek(SeekFrom::Start(offset)).is_ok() && f.read_to_end(&mut chunk).is_ok() {
                offset += chunk.len() as u64;
            }
            if !chunk.is_empty() {
                let seen = now_ms();
                pending.extend_from_slice(&chunk);
                if let Some(end) = pending.iter().rposition(|&b| b == b'\n') {
                    let whole: Vec<u8> = pending.drain(..=end).collect();
                    for line in String::from_utf8_lossy(&whole).lines() {
                        log.push(line, seen);
                    }
                    progress
                        .lines
                        .store(log.entries.len() as u64, Ordering::Relaxed);
                    progress
                        .delivered_polls
                        .store(log.delivered_polls(), Ordering::Relaxed);
                }
            }
        }
        if last {
            return log;
        }
        std::thread::sleep(TAIL_EVERY);
    }
}

/// Delivery against what the simulators served.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Accounting {
    pub served_polls: u64,
    pub delivered_polls: u64,
    pub lost: u64,
    pub extra: u64,
    pub duplicated: u64,
    /// Devices with at least one lost poll.
    pub devices_short: u64,
}

/// Compares `log` with `served`: subject → polls the simulator answered.
pub(super) fn account(log: &SinkLog, served: &HashMap<String, u64>) -> Accounting {
    let mut seen: HashSet<(u32, u32, i64)> = HashSet::with_capacity(log.entries.len());
    let mut polls: HashSet<(u32, i64)> = HashSet::new();
    let mut a = Accounting::default();
    for e in &log.entries {
        if !seen.insert((e.subject, e.field, e.at_ms)) {
            a.duplicated += 1;
        }
        if e.readings {
            polls.insert((e.subject, e.at_ms));
        }
    }
    let mut delivered: HashMap<&str, u64> = HashMap::new();
    for (subject, _) in &polls {
        *delivered
            .entry(log.subjects[*subject as usize].as_str())
            .or_default() += 1;
    }
    for (subject, served) in served {
        let got = delivered.get(subject.as_str()).copied().unwrap_or(0);
        a.served_polls += served;
        a.lost += served.saturating_sub(got);
        a.extra += got.saturating_sub(*served);
        a.devices_short += u64::from(got < *served);
    }
    for (subject, got) in &delivered {
        a.delivered_polls += got;
        if !served.contains_key(*subject) {
            a.extra += got;
        }
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(subject: &str, field: &str, at_ms: i64) -> String {
        format!(
            "{{\"gateway\":\"gw\",\"stream\":\"readings\",\"incarnation\":\"0000000000000001\",\"seq\":1,\
             \"subject\":\"{subject}\",\"field\":\"{field}\",\"value\":1.5,\"unit\":\"V\",\
             \"at_ms\":{at_ms},\"timestamp\":null,\"quality\":\"good\"}}"
        )
    }

    /// Issue 10 item 4: the accounting finds a duplicate line and a missing poll.
    #[test]
    fn a_duplicate_and_a_missing_poll_are_counted() {
        let mut log = SinkLog::default();
        for l in [
            line("p-a", "voltage", 1000),
            line("p-a", "power", 1000),
            line("p-a", "voltage", 2000),
            line("p-a", "power", 2000),
            // Re-delivered line: a duplicate, not a new poll.
            line("p-a", "voltage", 2000),
            // Device b: two polls served, one delivered.
            line("p-b", "voltage", 1001),
            line("p-b", "power", 1001),
        ] {
            log.push(&l, 5000);
        }
        log.push("{torn", 5000);
        let served = HashMap::from([("p-a".to_string(), 2), ("p-b".to_string(), 2)]);
        let a = account(&log, &served);
        assert_eq!(
            a,
            Accounting {
                served_polls: 4,
                delivered_polls: 3,
                lost: 1,
                extra: 0,
                duplicated: 1,
                devices_short: 1,
            }
        );
        assert_eq!(log.unreadable, 1);
        assert_eq!(log.delivered_polls(), 3);
    }

    #[test]
    fn polls_of_unknown_devices_and_beyond_the_served_count_are_extra() {
        let mut log = SinkLog::default();
        for l in [
            line("p-a", "v", 1),
            line("p-a", "v", 2),
            line("p-z", "v", 1),
        ] {
            log.push(&l, 10);
        }
        let served = HashMap::from([("p-a".to_string(), 1)]);
        let a = account(&log, &served);
        assert_eq!((a.lost, a.extra, a.duplicated), (0, 2, 0));
    }

    #[test]
    fn tailer_sees_whole_lines_only_and_everything_at_finish() {
        use std::io::Write;
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("records.jsonl");
        let tailer = Tailer::start(path.clone());
        let mut f = std::fs::File::create(&path).expect("create");
        let first = line("p-a", "v", 1);
        // A torn line is not read until its newline arrives.
        write!(f, "{first}\n{}", &first[..10]).expect("write");
        f.flush().expect("flush");
        writeln!(f, "{}", &first[10..]).expect("write");
        f.flush().expect("flush");
        let log = tailer.finish();
        assert_eq!(log.entries.len(), 2);
        assert_eq!(log.unreadable, 0);
        assert!(log.entries.iter().all(|e| e.seen_ms > 0 && e.at_ms == 1));
    }
}
