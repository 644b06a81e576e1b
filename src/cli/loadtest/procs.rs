//! The load test's child processes and what `/proc` says about them.
//!
//! Every child is started by the load test, writes stdout and stderr to its own log file in
//! the run directory, and is signalled by its pid only (`kill -TERM PID`: the crate forbids
//! `unsafe`, so no `libc::kill`). A [`Proc`] that is dropped while its child still runs
//! kills it (SIGKILL), so an aborted run leaves nothing behind.
//!
//! CPU time is `utime + stime` of `/proc/PID/stat` (fields 14 and 15, in clock ticks; the
//! ticks per second come from `getconf CLK_TCK`, 100 if that fails, as it is on every Linux
//! we run on); RSS is `VmRSS` of `/proc/PID/status`.

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::cli::CliError;

/// How often a wait re-checks a log file or a child's exit.
const POLL_EVERY: Duration = Duration::from_millis(20);

/// One child process.
#[derive(Debug)]
pub(super) struct Proc {
    pub name: String,
    child: Child,
    pub log: PathBuf,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Starts `bin ARGS…` in `cwd`, stdout and stderr appended to `log`.
    pub(super) fn spawn(
        name: &str,
        bin: &Path,
        args: &[OsString],
        cwd: &Path,
        log: PathBuf,
    ) -> Result<Proc, CliError> {
        let file = File::create(&log)
            .map_err(|e| CliError::Runtime(format!("cannot create {}: {e}", log.display())))?;
        let err = file
            .try_clone()
            .map_err(|e| CliError::Runtime(e.to_string()))?;
        let child = Command::new(bin)
            .args(args)
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .map_err(|e| CliError::Runtime(format!("cannot start {}: {e}", bin.display())))?;
        Ok(Proc {
            name: name.to_owned(),
            child,
            log,
            status: None,
        })
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, if the child has exited.
    pub(super) fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Sends SIGTERM (to this child's pid only).
    pub(super) fn terminate(&mut self) {
        if self.exited().is_none() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.pid().to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }

    /// SIGKILL (to this child's pid only), and reaps it.
    pub(super) fn kill(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }

    /// Waits up to `limit` for the child to exit.
    pub(super) fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(POLL_EVERY);
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`. `None` if it had to be
    /// killed.
    pub(super) fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        self.terminate();
        if let Some(s) = self.wait_exit(grace) {
            return Some(s);
        }
        let _ = self.child.kill();
        self.status = self.child.wait().ok();
        None
    }

    /// Waits up to `limit` for a log line containing `needle`; returns the line. Fails
    /// early if the child exits first.
    pub(super) fn wait_log(&mut self, needle: &str, limit: Duration) -> Result<String, CliError> {
        let deadline = Instant::now() + limit;
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.contains(needle)) {
                return Ok(line.to_owned());
            }
            if let Some(s) = self.exited() {
                return Err(self.failed(&format!("exited ({s})")));
            }
            if Instant::now() >= deadline {
                return Err(self.failed(&format!("did not log {needle:?} within {limit:?}")));
            }
            std::thread::sleep(POLL_EVERY);
        }
    }

    /// An error naming this child and its log.
    pub(super) fn failed(&self, what: &str) -> CliError {
        CliError::Runtime(format!(
            "{} (pid {}) {what}; see {}",
            self.name,
            self.child.id(),
            self.log.display()
        ))
    }

    /// CPU seconds used so far, if the child still runs.
    pub(super) fn cpu_seconds(&self, ticks_per_s: u64) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).ok()?;
        Some(cpu_ticks(&stat)? as f64 / ticks_per_s.max(1) as f64)
    }

    /// Resident set size in kB, if the child still runs.
    pub(super) fn rss_kb(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        rss_kb(&status)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `utime + stime` from the text of `/proc/PID/stat`. The command name (field 2) is in
/// parentheses and may hold spaces and parentheses itself, so fields are counted after the
/// last `)`: field 3 (state) is the first there, so utime (14) and stime (15) are the 12th
/// and 13th.
pub(super) fn cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// `VmRSS` in kB from the text of `/proc/PID/status`.
pub(super) fn rss_kb(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut words = line["VmRSS:".len()..].split_whitespace();
    let kb = words.next()?.parse().ok()?;
    (words.next() == Some("kB")).then_some(kb)
}

/// Clock ticks per second for `/proc/PID/stat`: `getconf CLK_TCK`, else 100 (Linux's value
/// on every architecture citygate targets).
pub(super) fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|t| *t > 0)
        .unwrap_or(100)
}

/// The first line `bin --version` prints, e.g. `citygate 0.1.0`.
pub(super) fn version_of(bin: &Path) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_cpu_is_utime_plus_stime_even_with_odd_command_names() {
        let stat = "4242 (citygate) S 1 4242 4242 0 -1 4194560 1234 0 0 0 \
                    150 37 0 0 20 0 3 0 123456 10000000 2000 18446744073709551615";
        assert_eq!(cpu_ticks(stat), Some(187));
        let odd = "7 (a) b (c) R 1 7 7 0 -1 0 0 0 0 0 5 6 0 0 20 0 1 0 1 1 1";
        assert_eq!(cpu_ticks(odd), Some(11));
        assert_eq!(cpu_ticks("7 (x) R 1"), None);
        assert_eq!(cpu_ticks("no parenthesis"), None);
    }

    #[test]
    fn status_rss_is_vmrss_in_kb() {
        let status =
            "Name:\tcitygate\nVmPeak:\t  90000 kB\nVmRSS:\t   28672 kB\nRssAnon:\t 20000 kB\n";
        assert_eq!(rss_kb(status), Some(28_672));
        assert_eq!(rss_kb("Name:\tzombie\n"), None);
        assert_eq!(rss_kb("VmRSS:\t12 MB\n"), None);
    }

    #[test]
    fn this_process_reads_from_proc() {
        let me = std::fs::read_to_string("/proc/self/status").expect("linux /proc");
        assert!(rss_kb(&me).is_some_and(|kb| kb > 0));
        let stat = std::fs::read_to_string("/proc/self/stat").expect("linux /proc");
        assert!(cpu_ticks(&stat).is_some());
        assert!(clock_ticks() > 0);
    }
}
