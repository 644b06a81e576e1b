//! Rotation of the JSON Lines sink: when the file reached `rotate_bytes` or is
//! `rotate_every` old, it is renamed to `records-<UTC time>.jsonl` beside it
//! (`records-20261201T000000Z.jsonl`; `-1`, `-2`… appended if that name is taken) and a
//! fresh file is started at the configured path.
//!
//! Crash safety: the sink rotates only at the start of a write, before the group's lines,
//! so every batch in a rotated file was written and synced by an earlier group, whose
//! de-dup marks the hub flushed before it took the next group. A crash between the rename
//! and the next write leaves either the old file (rename not durable: it is rotated again)
//! or no file (the sink creates a fresh one at start). [`super::sink::Sink::recover`] scans the
//! current file only, which is all it needs: nothing unmarked was ever rotated away. The
//! one exception: a group whose lines were written but whose de-dup marks could not be
//! flushed (`dedup_failed`) is re-sent by its gateway, and the copy may land in the next
//! file.
//!
//! `citygate hub-prune` prunes the rotated files beside the sink too ([`rotated_files`]);
//! `citygate hub-emergency` works on the current file only (its records of an emergency
//! that has since rotated away are in the rotated file of that time).

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::config::Rotation;

/// Whether a file of `len` bytes, started at `since`, is due at `now`.
pub(crate) fn due(rotation: &Rotation, len: u64, since: SystemTime, now: SystemTime) -> bool {
    let full = rotation.bytes.is_some_and(|max| len >= max);
    let old = rotation
        .every
        .is_some_and(|every| now.duration_since(since).unwrap_or(Duration::ZERO) >= every);
    len > 0 && (full || old)
}

/// The name a file rotated at `now` gets: `STEM-YYYYMMDDTHHMMSSZ.EXT` beside `path`, with
/// `-N` added until the name is free.
pub(crate) fn rotated_path(path: &Path, now: SystemTime) -> PathBuf {
    let stem = path
        .file_stem()
        .map_or_else(|| "records".into(), |s| s.to_string_lossy().into_owned());
    let ext = path
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    let stamp = humantime::format_rfc3339_seconds(now)
        .to_string()
        .replace(['-', ':'], "");
    let name = |n: u32| match n {
        0 => format!("{stem}-{stamp}{ext}"),
        n => format!("{stem}-{stamp}-{n}{ext}"),
    };
    let mut n = 0;
    loop {
        let candidate = path.with_file_name(name(n));
        if !candidate.exists() {
            return candidate;
        }
        n += 1;
    }
}

/// The rotated files of the sink at `path` (`STEM-<digits>T<digits>Z….EXT` beside it),
/// oldest first.
pub(crate) fn rotated_files(path: &Path) -> io::Result<Vec<PathBuf>> {
    let stem = path
        .file_stem()
        .map_or_else(|| "records".into(), |s| s.to_string_lossy().into_owned());
    let ext = path
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => d.to_path_buf(),
        None => PathBuf::from("."),
    };
    let is_rotated = |name: &str| {
        name.strip_prefix(&format!("{stem}-"))
            .and_then(|rest| rest.strip_suffix(ext.as_str()))
            .is_some_and(|stamp| {
                let b = stamp.as_bytes();
                b.len() >= 16
                    && b[..8].iter().all(u8::is_ascii_digit)
                    && b[8] == b'T'
                    && b[9..15].iter().all(u8::is_ascii_digit)
                    && b[15] == b'Z'
            })
    };
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_str().is_some_and(is_rotated))
        .map(|e| e.path())
        .collect();
    found.sort();
    Ok(found)
}

/// Renames `path` to its rotated name and makes the rename durable; returns the new name.
pub(crate) fn rotate(path: &Path, now: SystemTime) -> io::Result<PathBuf> {
    let to = rotated_path(path, now);
    std::fs::rename(path, &to)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)?.sync_all()?;
    }
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_is_due_by_size_or_age_never_when_empty() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_547_200);
        let r = Rotation {
            bytes: Some(100),
            every: Some(Duration::from_secs(3600)),
        };
        assert!(!due(&r, 99, t0, t0));
        assert!(due(&r, 100, t0, t0));
        assert!(due(&r, 1, t0, t0 + Duration::from_secs(3600)));
        assert!(!due(&r, 0, t0, t0 + Duration::from_secs(7200)));
        assert!(!due(
            &Rotation::default(),
            u64::MAX,
            t0,
            t0 + Duration::from_secs(1 << 30)
        ));
    }

    #[test]
    fn rotated_names_carry_the_utc_time_and_never_collide() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("records.jsonl");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_547_200);
        let first = rotated_path(&path, t);
        assert_eq!(first, dir.path().join("records-20251201T000000Z.jsonl"));
        std::fs::write(&first, b"x").unwrap();
        assert_eq!(
            rotated_path(&path, t),
            dir.path().join("records-20251201T000000Z-1.jsonl")
        );
    }
}
