//! The store's manifest: a small checksummed file beside sled's files (`<store>/manifest`),
//! written after every successful flush, that lets an open notice entries sled lost.
//!
//! Per stream it records the sequence high-water mark, the batches stored, and the batches
//! *accounted for*: stored + acknowledged + evicted, ever. Both the high-water mark and the
//! accounted count only grow (an append adds one; an ack or an eviction moves one from stored
//! to its persistent counter, in the same sled batch), and the manifest is taken before the
//! flush it follows, so it never claims more than is durable. At open, a store whose mark or
//! accounted count is below the manifest's lost entries: see `SledStore::open`.
//!
//! The file is written to `manifest.tmp` and renamed over `manifest`, without an fsync: a
//! crash can leave the previous manifest, which is only more lenient. A missing manifest
//! (a store from before manifests) is not checked; a manifest whose checksum does not match
//! is reported and ignored.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::reading::Stream;

/// The manifest's file name inside the store directory.
pub(crate) const FILE: &str = "manifest";
const MAGIC: &str = "citygate-store-manifest 1";

/// One stream's counters at a flush.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct StreamMark {
    pub next_seq: u64,
    pub batches: u64,
    /// Stored + acknowledged + evicted, ever.
    pub accounted: u64,
}

/// What a store held at its last successful flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Manifest {
    pub incarnation: u64,
    /// By `Stream::code`.
    pub streams: [StreamMark; Stream::COUNT],
}

pub(crate) fn path(store: &Path) -> PathBuf {
    store.join(FILE)
}

fn checksum(body: &str) -> String {
    hex::encode(Sha256::digest(body.as_bytes()))
}

impl Manifest {
    pub(crate) fn encode(&self) -> String {
        let mut body = format!("{MAGIC}\nincarnation {:016x}\n", self.incarnation);
        for s in Stream::ALL {
            let m = self.streams[s.index()];
            let _ = writeln!(
                body,
                "stream {s} next_seq {} batches {} accounted {}",
                m.next_seq, m.batches, m.accounted
            );
        }
        let sum = checksum(&body);
        body.push_str(&format!("sha256 {sum}\n"));
        body
    }

    pub(crate) fn decode(text: &str) -> Result<Manifest, String> {
        let (body, last) = text
            .trim_end_matches('\n')
            .rsplit_once('\n')
            .ok_or("too short")?;
        let body = format!("{body}\n");
        let sum = last.strip_prefix("sha256 ").ok_or("no checksum line")?;
        if sum != checksum(&body) {
            return Err("checksum mismatch".into());
        }
        let mut lines = body.lines();
        if lines.next() != Some(MAGIC) {
            return Err("not a citygate store manifest".into());
        }
        let incarnation = lines
            .next()
            .and_then(|l| l.strip_prefix("incarnation "))
            .and_then(|h| u64::from_str_radix(h, 16).ok())
            .ok_or("bad incarnation line")?;
        let mut streams = [StreamMark::default(); Stream::COUNT];
        // Stores from before the purpose flows have lines for the first three streams only;
        // the others start empty.
        for s in Stream::ALL {
            let Some(line) = lines.next() else {
                if s.index() < 3 {
                    return Err("missing stream line".into());
                }
                break;
            };
            let words: Vec<&str> = line.split(' ').collect();
            let num = |i: usize| words.get(i).and_then(|w| w.parse::<u64>().ok());
            match (words.get(1), num(3), num(5), num(7)) {
                (Some(name), Some(next_seq), Some(batches), Some(accounted))
                    if *name == s.as_str() =>
                {
                    streams[s.index()] = StreamMark {
                        next_seq,
                        batches,
                        accounted,
                    };
                }
                _ => return Err(format!("bad stream line {line:?}")),
            }
        }
        Ok(Manifest {
            incarnation,
            streams,
        })
    }
}

/// Reads the manifest of the store at `store`: `Ok(None)` if there is none.
pub(crate) fn read(store: &Path) -> Result<Option<Manifest>, String> {
    match std::fs::read_to_string(path(store)) {
        Ok(text) => Manifest::decode(&text).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// Replaces the manifest of the store at `store` (write a temporary file, rename it).
pub(crate) fn write(store: &Path, m: &Manifest) -> std::io::Result<()> {
    let tmp = store.join(format!("{FILE}.tmp"));
    std::fs::write(&tmp, m.encode())?;
    std::fs::rename(&tmp, path(store))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_a_changed_byte() {
        let m = Manifest {
            incarnation: 0xdead_beef,
            streams: {
                let mut s = [StreamMark::default(); Stream::COUNT];
                s[..3].copy_from_slice(&[
                    StreamMark {
                        next_seq: 7,
                        batches: 2,
                        accounted: 6,
                    },
                    StreamMark::default(),
                    StreamMark {
                        next_seq: u64::MAX,
                        batches: 0,
                        accounted: 1,
                    },
                ]);
                s[Stream::COUNT - 1].next_seq = 3;
                s
            },
        };
        let text = m.encode();
        assert_eq!(Manifest::decode(&text), Ok(m));
        // A manifest from before the purpose flows (three stream lines) still reads.
        let mut old = Manifest {
            incarnation: m.incarnation,
            streams: [StreamMark::default(); Stream::COUNT],
        };
        old.streams[..3].copy_from_slice(&m.streams[..3]);
        let body: String = old
            .encode()
            .lines()
            .take(5)
            .map(|l| format!("{l}\n"))
            .collect();
        let three = format!("{body}sha256 {}\n", checksum(&body));
        assert_eq!(Manifest::decode(&three), Ok(old));
        let tampered = text.replace("next_seq 7", "next_seq 8");
        assert!(Manifest::decode(&tampered).is_err());
        assert!(Manifest::decode("").is_err());
        assert!(Manifest::decode("garbage\nsha256 00\n").is_err());
    }
}
