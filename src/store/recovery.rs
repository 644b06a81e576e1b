//! Opening sled, and moving a corrupt store aside instead of panic-looping on it.
//!
//! Corruption-type failures are `sled::Error::Corruption`, `sled::Error::ReportableBug`,
//! I/O errors of kind `InvalidData`/`UnexpectedEof` (a torn or garbled file) and a panic
//! inside sled's open (sled 0.34 panics on some corrupt snapshots). Only those move the
//! directory aside; every other error is returned, because permission problems, a held lock
//! or a full disk say nothing about the data, and moving a healthy store aside would drop it.

use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::{StoreError, StoreOptions};

/// Background `sync_all` period: bounds what power loss can take after a flush returned.
const BACKGROUND_FSYNC_MS: u64 = 1000;
/// How many `<path>.corrupt-<secs>-<n>` names to try when several recoveries share a second.
const MAX_ASIDE_ATTEMPTS: u32 = 100;

pub(crate) fn config(path: &Path, opts: &StoreOptions) -> sled::Config {
    sled::Config::new()
        .path(path)
        .cache_capacity(opts.cache_capacity_bytes)
        .mode(sled::Mode::LowSpace)
        .flush_every_ms(Some(BACKGROUND_FSYNC_MS))
}

/// Why sled did not open.
#[derive(Debug)]
enum OpenFailure {
    Sled(sled::Error),
    Panicked(String),
}

impl OpenFailure {
    fn is_corruption(&self) -> bool {
        match self {
            OpenFailure::Sled(sled::Error::Corruption { .. } | sled::Error::ReportableBug(_)) => {
                true
            }
            OpenFailure::Sled(sled::Error::Io(e)) => {
                matches!(
                    e.kind(),
                    io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof
                )
            }
            OpenFailure::Sled(_) => false,
            OpenFailure::Panicked(_) => true,
        }
    }

    fn into_error(self) -> StoreError {
        match self {
            OpenFailure::Sled(e) => StoreError::Sled(e),
            OpenFailure::Panicked(msg) => {
                StoreError::Corrupt(format!("sled panicked while opening: {msg}"))
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            OpenFailure::Sled(e) => e.to_string(),
            OpenFailure::Panicked(msg) => format!("panic: {msg}"),
        }
    }
}

fn try_open(path: &Path, opts: &StoreOptions) -> Result<sled::Db, OpenFailure> {
    let config = config(path, opts);
    match panic::catch_unwind(AssertUnwindSafe(|| config.open())) {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) => Err(OpenFailure::Sled(e)),
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".to_owned());
            Err(OpenFailure::Panicked(msg))
        }
    }
}

/// Opens the sled database at `path`; on corruption moves it aside and opens a fresh one,
/// returning where the old one went.
pub(crate) fn open_or_recover(
    path: &Path,
    opts: &StoreOptions,
) -> Result<(sled::Db, Option<PathBuf>), StoreError> {
    let failure = match try_open(path, opts) {
        Ok(db) => return Ok((db, None)),
        Err(f) if f.is_corruption() => f,
        Err(f) => return Err(f.into_error()),
    };
    let moved = move_aside(path)?;
    tracing::error!(
        path = %path.display(),
        moved_to = %moved.display(),
        error = %failure.describe(),
        "store corrupt; moved aside and started empty"
    );
    let db = try_open(path, opts).map_err(OpenFailure::into_error)?;
    Ok((db, Some(moved)))
}

/// Renames `path` to a free `<path>.corrupt-<unix-seconds>[-n]` next to it.
pub(crate) fn move_aside(path: &Path) -> Result<PathBuf, StoreError> {
    let io_err = |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    let name = path.file_name().ok_or_else(|| {
        io_err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "store path has no final component",
        ))
    })?;
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let base = format!("{}.corrupt-{secs}", name.to_string_lossy());
    for n in 0..MAX_ASIDE_ATTEMPTS {
        let candidate = path.with_file_name(if n == 0 {
            base.clone()
        } else {
            format!("{base}-{n}")
        });
        if candidate.symlink_metadata().is_ok() {
            continue;
        }
        std::fs::rename(path, &candidate).map_err(io_err)?;
        return Ok(candidate);
    }
    Err(io_err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("no free name for moving the corrupt store aside ({base}-*)"),
    )))
}
