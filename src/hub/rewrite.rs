//! Offline rewrites of the hub's JSON Lines sink, shared by `citygate hub-prune` (`prune`) and
//! `citygate hub-emergency --destroy` (`emergency`): keep the lines a predicate keeps, append
//! what the caller records about the rewrite, and replace the file crash-safely.
//!
//! Crash safety: the kept lines (and the trailer) are written to `<sink><suffix>` in the same
//! directory, synced, renamed over the sink, and the directory is synced. A crash leaves either
//! the old file or the new one, never a mix; a left-over temp file is never read, and the next
//! rewrite overwrites it.
//!
//! A running hub appends to the sink; rewriting under it would lose what it appends after the
//! copy. Callers therefore hold the hub's de-dup state ([`lock_hub`]) from before they read
//! the sink until the rename: a running hub holds that state's lock, so a rewrite refuses to
//! run beside one (after the same few seconds' wait a restarting hub gets), and a hub started
//! meanwhile waits and fails instead of writing to the file being replaced.

use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use super::config::{HubConfig, SinkConfig};
use super::dedup::{Dedup, DedupError};

/// Why a sink rewrite failed.
#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    #[error(
        "cannot open the hub state {}: {source}; is a hub running on it? stop it before {action}",
        path.display()
    )]
    HubRunning {
        path: PathBuf,
        /// What the caller was about to do (`pruning`, `destroying`).
        action: &'static str,
        #[source]
        source: DedupError,
    },
    #[error(transparent)]
    Sink(#[from] super::sink::SinkError),
    #[error("{action} works on the jsonl sink's files, not on the postgres sink")]
    NotJsonl { action: &'static str },
    #[error("sink {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The hub's de-dup state, held to keep a hub from starting while the sink is rewritten.
#[derive(Debug)]
pub(crate) struct HubLock {
    _state: Dedup,
}

/// Opens the hub state of `cfg`'s jsonl sink, failing if a hub holds it; `action` names the
/// refusal's reason. Blocks (up to a few seconds for a previous hub's lock).
pub(crate) fn lock_hub(cfg: &HubConfig, action: &'static str) -> Result<HubLock, RewriteError> {
    let SinkConfig::Jsonl { state_path, .. } = &cfg.sink else {
        return Err(RewriteError::NotJsonl { action });
    };
    Dedup::open(state_path)
        .map(|state| HubLock { _state: state })
        .map_err(|source| RewriteError::HubRunning {
            path: state_path.clone(),
            action,
            source,
        })
}

/// Rewrites the sink at `path`, under a [`HubLock`], keeping the lines (each with its `\n`,
/// a torn last line without) that `keep` returns true for, in order and byte for byte, then
/// appending `trailer` (refused if the last kept line is torn: the trailer would join it).
/// Returns how many lines were kept, or `None` if there is no sink (then
/// nothing is written). Blocks (file I/O, fsync).
pub(crate) fn rewrite_sink(
    _lock: &HubLock,
    path: &Path,
    suffix: &str,
    mut keep: impl FnMut(&[u8]) -> bool,
    trailer: &[u8],
) -> Result<Option<u64>, RewriteError> {
    let io_err = |source| RewriteError::Io {
        path: path.to_owned(),
        source,
    };
    let input = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(e)),
    };
    let tmp = temp_path(path, suffix);
    let mut out = BufWriter::new(File::create(&tmp).map_err(io_err)?);
    let mut reader = BufReader::new(input);
    let mut kept = 0;
    let mut torn = false;
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).map_err(io_err)? == 0 {
            break;
        }
        if keep(&line) {
            kept += 1;
            torn = line.last() != Some(&b'\n');
            out.write_all(&line).map_err(io_err)?;
        }
    }
    if torn && !trailer.is_empty() {
        return Err(io_err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the file ends in a partly written line; start the hub once so it recovers the file",
        )));
    }
    out.write_all(trailer).map_err(io_err)?;
    let file = out.into_inner().map_err(|e| io_err(e.into_error()))?;
    file.sync_all().map_err(io_err)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io_err)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir).and_then(|d| d.sync_all()).map_err(io_err)?;
    }
    Ok(Some(kept))
}

/// `<sink><suffix>`, beside the sink.
pub(crate) fn temp_path(sink: &Path, suffix: &str) -> PathBuf {
    let mut name = sink.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    sink.with_file_name(name)
}
