//! Store errors, classified for the caller's policy.
//!
//! - [`StoreError::SeqRegression`], [`StoreError::SeqExhausted`] and [`StoreError::TooLarge`]
//!   are the caller's mistake or a batch that can never fit: nothing was written, retrying is
//!   pointless; drop the batch and count it.
//! - [`StoreError::Sled`] and [`StoreError::Io`] come from the disk. A full disk
//!   ([`StoreError::is_disk_full`]) is a state to degrade in (keep polling, drop and count),
//!   never a reason to exit.
//! - [`StoreError::Corrupt`] means the on-disk state cannot be trusted; an operator decides.
//! - [`StoreError::Closed`]: a reopen after an I/O error failed; retry (reopen again) as for
//!   a disk error.
//! - [`StoreError::Task`]: the blocking thread of an [`Outbox`](super::Outbox) call panicked or
//!   was cancelled; whether anything was written is unknown, so retry as for a disk error.

use std::io;
use std::path::PathBuf;

use crate::reading::Stream;

/// `ENOSPC` on Linux (every architecture we build for) and on the BSDs and macOS.
const ENOSPC: i32 = 28;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),

    #[error("store i/o on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },

    #[error("sequence regression on stream {stream}: got {seq}, next is {next}")]
    SeqRegression { stream: Stream, seq: u64, next: u64 },

    #[error("sequence numbers exhausted on stream {stream}")]
    SeqExhausted { stream: Stream },

    #[error("batch of {bytes} bytes is larger than the store quota of {max_bytes} bytes")]
    TooLarge { bytes: u64, max_bytes: u64 },

    #[error("store corrupt: {0}")]
    Corrupt(String),

    /// A reopen ([`Store::reopen`](super::Store::reopen)) failed and the store has no engine
    /// until a later one succeeds.
    #[error("store closed: reopening it after an i/o error failed")]
    Closed,

    /// The blocking thread running a store call panicked or was cancelled.
    #[error("store call failed on its blocking thread: {0}")]
    Task(String),
}

impl StoreError {
    /// Whether the disk (or the store's quota on it) is full: `ENOSPC` from sled or from our
    /// own file operations.
    pub(crate) fn is_disk_full(&self) -> bool {
        match self {
            StoreError::Sled(sled::Error::Io(e)) | StoreError::Io { source: e, .. } => {
                io_is_disk_full(e)
            }
            _ => false,
        }
    }
}

fn io_is_disk_full(e: &io::Error) -> bool {
    if e.raw_os_error() == Some(ENOSPC) {
        return true;
    }
    // Once sled's log fails it keeps the error as a "global error" and returns clones of it,
    // and `sled::Error::clone` rebuilds an `io::Error` from the original's Debug text
    // (`Os { code: 28, kind: StorageFull, .. }`), losing the raw OS error.
    let text = e.to_string();
    text.contains("code: 28,") || text.contains("StorageFull")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_full_is_recognised_directly_and_through_sled_clones() {
        let direct = StoreError::Sled(sled::Error::Io(io::Error::from_raw_os_error(ENOSPC)));
        assert!(direct.is_disk_full());

        let cloned = sled::Error::Io(io::Error::from_raw_os_error(ENOSPC)).clone();
        assert!(StoreError::Sled(cloned).is_disk_full());

        let ours = StoreError::Io {
            path: "x".into(),
            source: io::Error::from_raw_os_error(ENOSPC),
        };
        assert!(ours.is_disk_full());
    }

    #[test]
    fn other_errors_are_not_disk_full() {
        let denied = StoreError::Sled(sled::Error::Io(io::Error::from(
            io::ErrorKind::PermissionDenied,
        )));
        assert!(!denied.is_disk_full());
        let cloned = sled::Error::Io(io::Error::from_raw_os_error(13)).clone();
        assert!(!StoreError::Sled(cloned).is_disk_full());
        assert!(!StoreError::TooLarge {
            bytes: 2,
            max_bytes: 1
        }
        .is_disk_full());
        assert!(!StoreError::Corrupt("x".into()).is_disk_full());
    }
}
