//! Kill-and-restart durability, in the style of sled's own crash tests.
//!
//! The parent re-runs this test binary with `CITYGATE_STORE_CRASH_CHILD=<store path>` and
//! `--exact <crash_child> --nocapture`. The child appends batches to all three streams, flushes
//! every [`GROUP`] appends and prints `committed <stream code> <seq>` for each batch once the
//! flush returned. The parent reads those lines until a count is reached, SIGKILLs the child
//! (`Child::kill`), reopens the store and checks that every batch it was told was committed is
//! there byte for byte, that nothing stored is torn, and that `next_seq` is past all of them.
//! Several rounds run against the same directory, each child continuing where the last died.
//! Everything is bounded: the child stops by itself after [`CHILD_MAX_BATCHES`] or
//! [`CHILD_MAX_TIME`], so the parent sees EOF instead of hanging.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::reading::Stream;

use super::super::{SledStore, Store, StoreOptions};

const CHILD_ENV: &str = "CITYGATE_STORE_CRASH_CHILD";
const GROUP: usize = 7;
const CHILD_MAX_BATCHES: u64 = 200_000;
const CHILD_MAX_TIME: Duration = Duration::from_secs(30);
/// Committed lines to read before killing the child, per round: early, mid-group sizes, late.
const KILL_AFTER: [usize; 5] = [1, 40, 333, 1000, 99];

fn opts() -> StoreOptions {
    StoreOptions {
        max_bytes: 1 << 30,
        cache_capacity_bytes: 1 << 20,
    }
}

/// The batch the child writes for (stream, seq): varying length, content tied to both.
fn payload(stream: Stream, seq: u64) -> Vec<u8> {
    let len = 16 + usize::try_from((seq * 7919 + u64::from(stream.code()) * 131) % 3000).unwrap();
    let mut v = Vec::with_capacity(len);
    v.push(stream.code());
    v.extend_from_slice(&seq.to_be_bytes());
    v.extend((v.len()..len).map(|i| (i as u8) ^ (seq as u8) ^ stream.code().wrapping_mul(85)));
    v
}

fn this_test(name: &str) -> String {
    let module = module_path!();
    let module = module
        .split_once("::")
        .map_or(module, |(_crate, rest)| rest);
    format!("{module}::{name}")
}

/// The child half; a no-op unless the parent set [`CHILD_ENV`].
#[test]
fn crash_child() {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let store = SledStore::open(Path::new(&path), opts()).unwrap();
    let started = Instant::now();
    let mut out = std::io::stdout().lock();
    let mut pending = Vec::with_capacity(GROUP);
    for i in 0..CHILD_MAX_BATCHES {
        if started.elapsed() > CHILD_MAX_TIME {
            break;
        }
        let stream = Stream::ALL[(i % 3) as usize];
        let seq = store.next_seq(stream);
        store.append(stream, seq, &payload(stream, seq)).unwrap();
        pending.push((stream, seq));
        if pending.len() == GROUP {
            store.flush().unwrap();
            for (s, q) in pending.drain(..) {
                writeln!(out, "committed {} {q}", s.code()).unwrap();
            }
            out.flush().unwrap();
        }
    }
}

/// Runs one child until it has reported `kill_after` commits, kills it, returns what it
/// reported.
fn run_child_and_kill(path: &Path, kill_after: usize) -> Vec<(Stream, u64)> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            &this_test("crash_child"),
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut committed = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        let Some(rest) = line.strip_prefix("committed ") else {
            continue;
        };
        let (code, seq) = rest.split_once(' ').unwrap();
        let stream = Stream::from_code(code.parse().unwrap()).unwrap();
        committed.push((stream, seq.parse().unwrap()));
        if committed.len() >= kill_after {
            break;
        }
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(
        committed.len() >= kill_after,
        "child ended before reporting {kill_after} commits (got {}): {status}",
        committed.len()
    );
    committed
}

#[test]
fn committed_batches_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox");
    let mut committed: BTreeMap<Stream, Vec<u64>> = BTreeMap::new();
    for kill_after in KILL_AFTER {
        for (s, q) in run_child_and_kill(&path, kill_after) {
            committed.entry(s).or_default().push(q);
        }

        let store = SledStore::open(&path, opts()).unwrap();
        assert!(
            store.recovered_from().is_none(),
            "a SIGKILL must not corrupt the store"
        );
        assert_eq!(store.malformed_keys(), 0);
        for stream in Stream::ALL {
            let stored = store.peek(stream, 0, usize::MAX).unwrap();
            for b in &stored {
                assert_eq!(
                    b.bytes,
                    payload(stream, b.seq),
                    "{stream} {} is torn",
                    b.seq
                );
            }
            let stored_seqs: Vec<u64> = stored.iter().map(|b| b.seq).collect();
            // Nothing is ever acked here, so the survivors are 1..=n without holes.
            let expected: Vec<u64> = (1..=stored_seqs.len() as u64).collect();
            assert_eq!(stored_seqs, expected, "{stream}: holes after recovery");
            let want = committed
                .get(&stream)
                .map(Vec::as_slice)
                .unwrap_or_default();
            for q in want {
                assert!(
                    stored_seqs.binary_search(q).is_ok(),
                    "{stream} {q} committed but lost"
                );
            }
            let highest = want.iter().max().copied().unwrap_or(0);
            assert!(
                store.next_seq(stream) > highest,
                "{stream}: next_seq behind a commit"
            );
            let stats = store.stats();
            assert_eq!(stats.get(stream).batches, stored.len() as u64);
        }
    }
    assert!(committed.values().map(Vec::len).sum::<usize>() >= KILL_AFTER.iter().sum::<usize>());
}
