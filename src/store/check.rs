//! `citygate store check`: verifies a stopped store offline.
//!
//! The store directory is copied to a temporary directory first and sled is opened on the
//! copy, so the check never changes the store (sled writes on open) and never moves it
//! aside. It verifies every key and value shape, the incarnation id, sequence sanity
//! (nothing at or above 2^62; each stream's `next_seq` above its batches) and the manifest
//! against the content, the same comparison an open makes (see `manifest.rs`).

use std::fmt::Write as _;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use crate::reading::Stream;

use super::keys::{self, Key, MetaField};
use super::ledger::Ledger;
use super::manifest;
use super::recovery;
use super::sled_store::TREE;
use super::StoreOptions;

/// What `store check` found.
#[derive(Debug, Default)]
pub(crate) struct CheckReport {
    /// The summary to print.
    pub text: String,
    /// Everything wrong; empty if the store is sound.
    pub problems: Vec<String>,
}

/// Removes the temporary copy when the check ends.
struct TempCopy(PathBuf);

impl Drop for TempCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// Checks the stopped store at `path`. `Err` only when the check itself could not run
/// (no such directory, the copy failed).
pub(crate) fn check(path: &Path) -> Result<CheckReport, String> {
    if !path.is_dir() {
        return Err(format!("{}: no store directory here", path.display()));
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let copy = TempCopy(std::env::temp_dir().join(format!(
        "citygate-store-check-{}-{nanos}",
        std::process::id()
    )));
    copy_dir(path, &copy.0).map_err(|e| format!("copying {} failed: {e}", path.display()))?;

    let mut report = CheckReport::default();
    let config = recovery::config(&copy.0, &StoreOptions::default());
    let db = match panic::catch_unwind(AssertUnwindSafe(|| config.open())) {
        Ok(Ok(db)) => db,
        Ok(Err(e)) => {
            report.problems.push(format!("sled cannot open it: {e}"));
            return Ok(finish(report));
        }
        Err(_) => {
            report.problems.push("sled panicked opening it".into());
            return Ok(finish(report));
        }
    };
    let tree = db.open_tree(TREE).map_err(|e| e.to_string())?;
    let mut ledger = Ledger::new(u64::MAX);
    let mut max_seq = [None::<u64>; Stream::COUNT];
    let mut min_seq = [None::<u64>; Stream::COUNT];
    let mut meta_next = [None::<u64>; Stream::COUNT];
    let mut incarnation = None;
    for item in tree.iter() {
        let (k, v) = match item {
            Ok(kv) => kv,
            Err(e) => {
                report
                    .problems
                    .push(format!("reading the tree failed: {e}"));
                break;
            }
        };
        match keys::decode_key(&k) {
            Key::Batch(stream, seq) => {
                if v.is_empty() {
                    report
                        .problems
                        .push(format!("batch {stream}/{seq} is empty"));
                }
                ledger.count_stored(stream, seq, v.len() as u64);
                let i = stream.index();
                max_seq[i] = Some(max_seq[i].map_or(seq, |m: u64| m.max(seq)));
                min_seq[i] = Some(min_seq[i].map_or(seq, |m: u64| m.min(seq)));
            }
            Key::Meta(field, stream) => match keys::decode_u64(&v) {
                Some(value) => {
                    ledger.restore_meta(field, stream, value);
                    if field == MetaField::NextSeq {
                        meta_next[stream.index()] = Some(value);
                    }
                }
                None => report.problems.push(format!(
                    "metadata {field:?} of stream {stream} is {} bytes, expected 8",
                    v.len()
                )),
            },
            Key::Incarnation => match keys::decode_u64(&v).filter(|&i| i != 0) {
                Some(i) => incarnation = Some(i),
                None => report
                    .problems
                    .push("the incarnation id is not 8 non-zero bytes".into()),
            },
            Key::Checkpoint => {}
            Key::Malformed => report
                .problems
                .push(format!("malformed key {:?}", k.as_ref())),
        }
    }
    if let Some((what, stream, value)) = ledger.absurd() {
        report.problems.push(format!(
            "absurd sequence state: {what} of stream {stream} is {value}"
        ));
    }
    match incarnation {
        Some(i) => {
            let _ = writeln!(report.text, "incarnation {i:016x}");
        }
        None => report.problems.push("no incarnation id".into()),
    }
    for s in Stream::ALL {
        let i = s.index();
        let st = ledger.stream(s);
        let range = match (min_seq[i], max_seq[i]) {
            (Some(lo), Some(hi)) => format!("seq {lo}..={hi}"),
            _ => "no batches".into(),
        };
        let _ = writeln!(
            report.text,
            "{:<9} {} batches, {} bytes, {range}, next_seq {}, evicted {}",
            s.as_str(),
            st.batches,
            st.bytes,
            ledger.next_seq(s),
            st.evicted_batches
        );
        if let (Some(next), Some(hi)) = (meta_next[i], max_seq[i]) {
            if next <= hi {
                report.problems.push(format!(
                    "stream {s}: next_seq {next} is not above its last batch {hi}"
                ));
            }
        }
    }
    match manifest::read(path) {
        Ok(Some(m)) => {
            let before = report.problems.len();
            if incarnation.is_some_and(|i| i != m.incarnation) {
                report
                    .problems
                    .push(format!("manifest is of incarnation {:016x}", m.incarnation));
            }
            for s in Stream::ALL {
                let want = m.streams[s.index()];
                if ledger.next_seq(s) < want.next_seq || ledger.accounted(s) < want.accounted {
                    report.problems.push(format!(
                        "stream {s}: entries lost: next_seq {} (manifest {}), batches accounted \
                         {} (manifest {}, {} stored then)",
                        ledger.next_seq(s),
                        want.next_seq,
                        ledger.accounted(s),
                        want.accounted,
                        want.batches
                    ));
                }
            }
            if report.problems.len() == before {
                let _ = writeln!(report.text, "manifest  matches the content");
            }
        }
        Ok(None) => {
            let _ = writeln!(
                report.text,
                "manifest  none (a store from before manifests): not compared"
            );
        }
        Err(e) => report.problems.push(format!("manifest unreadable: {e}")),
    }
    Ok(finish(report))
}

fn finish(mut report: CheckReport) -> CheckReport {
    if report.problems.is_empty() {
        report.text.push_str("store ok\n");
    } else {
        for p in &report.problems {
            let _ = writeln!(report.text, "problem   {p}");
        }
        let _ = writeln!(
            report.text,
            "store DAMAGED ({} problems)",
            report.problems.len()
        );
    }
    report
}
