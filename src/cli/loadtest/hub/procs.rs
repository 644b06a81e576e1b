//! The fleet load test's child processes: the broker and the hubs, their readiness, their
//! `/metrics`, and their CPU and RSS across SIGKILLs and restarts.
//!
//! A hub's counters live in its process, so a SIGKILL resets them: each hub keeps the
//! last scrape of every incarnation, and the figures are their sums (what a hub counted
//! between its last scrape and its kill is not in them). CPU is counted per incarnation
//! from the start of the window (or from its spawn, for one started during it) to its kill
//! or the end of the window.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use super::report::HubFigures;
use super::setup::{mosquitto_binary, HubFiles, Setup};
use super::BrokerKind;
use crate::cli::loadtest::procs::Proc;
use crate::cli::loadtest::run::wait_status;
use crate::cli::loadtest::setup::free_port;
use crate::cli::CliError;

/// How long a child may take to become ready.
const READY_LIMIT: Duration = Duration::from_secs(60);
/// How long a scrape of `/metrics` may take.
const SCRAPE_LIMIT: Duration = Duration::from_secs(5);

fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

/// A hub's counters from one scrape of `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct HubCounters {
    pub accepted_batches: u64,
    pub records_written: u64,
    pub duplicates: u64,
    pub rejected: BTreeMap<String, u64>,
}

impl HubCounters {
    /// Reads the hub's counters from Prometheus text.
    pub(super) fn parse(text: &str) -> HubCounters {
        let mut c = HubCounters::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(v) = value.trim().parse::<f64>() else {
                continue;
            };
            let v = v as u64;
            match name {
                "citygate_hub_accepted_batches_total" => c.accepted_batches = v,
                "citygate_hub_records_written_total" => c.records_written = v,
                "citygate_hub_duplicates_total" => c.duplicates = v,
                _ => {
                    if let Some(reason) = name
                        .strip_prefix("citygate_hub_rejected_total{reason=\"")
                        .and_then(|r| r.strip_suffix("\"}"))
                    {
                        c.rejected.insert(reason.to_owned(), v);
                    }
                }
            }
        }
        c
    }

    fn add(&mut self, o: &HubCounters) {
        self.accepted_batches += o.accepted_batches;
        self.records_written += o.records_written;
        self.duplicates += o.duplicates;
        for (k, v) in &o.rejected {
            *self.rejected.entry(k.clone()).or_default() += v;
        }
    }
}

/// One hub over the run.
#[derive(Debug)]
pub(super) struct HubProc {
    pub files: HubFiles,
    pub proc: Proc,
    generation: u32,
    /// CPU seconds at the start of the window for this incarnation; `None` outside it.
    cpu_mark: Option<f64>,
    cpu_window: f64,
    rss_peak_kb: u64,
    restarts: u32,
    /// Counters of incarnations that ended, and the last scrape of the current one.
    done: HubCounters,
    now: HubCounters,
}

impl HubProc {
    /// Starts `citygate hub` with `files`' config and waits until it is subscribed.
    pub(super) fn start(
        rt: &tokio::runtime::Runtime,
        bin: &Path,
        dir: &Path,
        files: &HubFiles,
    ) -> Result<HubProc, CliError> {
        let proc = spawn_hub(rt, bin, dir, files, 1)?;
        Ok(HubProc {
            files: files.clone(),
            proc,
            generation: 1,
            cpu_mark: None,
            cpu_window: 0.0,
            rss_peak_kb: 0,
            restarts: 0,
            done: HubCounters::default(),
            now: HubCounters::default(),
        })
    }

    /// Scrapes `/metrics` (kept if the hub answers) and samples RSS.
    pub(super) fn sample(&mut self, rt: &tokio::runtime::Runtime) {
        if let Ok((200, body)) = rt.block_on(crate::telemetry::http::get(
            self.files.status,
            "/metrics",
            SCRAPE_LIMIT,
        )) {
            self.now = HubCounters::parse(&body);
        }
        if let Some(kb) = self.proc.rss_kb() {
            self.rss_peak_kb = self.rss_peak_kb.max(kb);
        }
    }

    /// Starts counting CPU (the window begins).
    pub(super) fn mark_cpu(&mut self, ticks: u64) {
        self.cpu_mark = self.proc.cpu_seconds(ticks);
    }

    /// Adds the CPU since the mark and stops counting (the window ends, or a kill).
    pub(super) fn take_cpu(&mut self, ticks: u64) {
        if let (Some(mark), Some(now)) = (self.cpu_mark.take(), self.proc.cpu_seconds(ticks)) {
            self.cpu_window += now - mark;
        }
    }

    /// SIGKILLs the hub (after a last scrape) and starts it again, ready.
    pub(super) fn kill_and_restart(
        &mut self,
        rt: &tokio::runtime::Runtime,
        bin: &Path,
        dir: &Path,
        ticks: u64,
    ) -> Result<(), CliError> {
        self.sample(rt);
        let counting = self.cpu_mark.is_some();
        self.take_cpu(ticks);
        self.proc.kill();
        self.done.add(&std::mem::take(&mut self.now));
        self.generation += 1;
        self.restarts += 1;
        self.proc = spawn_hub(rt, bin, dir, &self.files, self.generation)?;
        // A hub started inside the window counts from its spawn.
        self.cpu_mark = counting.then_some(0.0);
        Ok(())
    }

    /// Final scrape, then SIGTERM (SIGKILL after `grace`).
    pub(super) fn stop(&mut self, rt: &tokio::runtime::Runtime, grace: Duration) {
        self.sample(rt);
        self.proc.stop(grace);
    }

    /// The hub's figures over the run.
    pub(super) fn figures(&self) -> HubFigures {
        let mut c = self.done.clone();
        c.add(&self.now);
        HubFigures {
            id: self.files.id.clone(),
            cpu_s: Some(self.cpu_window),
            rss_mb_peak: (self.rss_peak_kb > 0).then(|| self.rss_peak_kb as f64 / 1024.0),
            restarts: self.restarts,
            accepted_batches: c.accepted_batches,
            records_written: c.records_written,
            duplicates: c.duplicates,
            rejected: c.rejected,
        }
    }
}

fn spawn_hub(
    rt: &tokio::runtime::Runtime,
    bin: &Path,
    dir: &Path,
    files: &HubFiles,
    generation: u32,
) -> Result<Proc, CliError> {
    let args = os(&["hub", "--config", &files.config.display().to_string()]);
    let log = dir.join(format!("{}-{generation}.log", files.id));
    let mut p = Proc::spawn(&files.id, bin, &args, dir, log)?;
    wait_status(rt, &mut p, files.status, "subscribed", |v| {
        v["subscribed"] == serde_json::Value::Bool(true)
    })?;
    Ok(p)
}

/// Starts the broker `s` asks for and sets `s.broker_port` to where it listens.
pub(super) fn start_broker(exe: &Path, s: &mut Setup) -> Result<Proc, CliError> {
    let dir = s.dir.clone();
    match s.broker {
        BrokerKind::Embedded => {
            let listen = format!("127.0.0.1:{}", s.broker_port);
            let mut args = os(&[
                "broker",
                "--listen",
                &listen,
                "--cert-file",
                &s.server_cert.display().to_string(),
                "--key-file",
                &s.server_key.display().to_string(),
                "--client-ca-file",
                &s.ca.display().to_string(),
            ]);
            for h in &s.hubs {
                args.extend(os(&["--hub", &h.id]));
            }
            for g in &s.gateways {
                args.extend(os(&["--gateway", g.id.as_str()]));
            }
            let mut p = Proc::spawn("broker", exe, &args, &dir, dir.join("broker.log"))?;
            p.wait_log("broker listening on", READY_LIMIT)?;
            Ok(p)
        }
        BrokerKind::Mosquitto => {
            let bin = mosquitto_binary().ok_or_else(|| {
                CliError::Usage("--broker mosquitto: mosquitto is not installed".into())
            })?;
            // mosquitto cannot report a port it picked: a free one is chosen, and another
            // if something took it first.
            for attempt in 0..5 {
                if attempt > 0 {
                    s.broker_port = free_port()?;
                }
                let conf = dir.join("mosquitto.conf");
                std::fs::write(&conf, s.mosquitto_conf(s.broker_port))
                    .map_err(|e| CliError::Runtime(e.to_string()))?;
                let log = dir.join(format!("mosquitto-{attempt}.log"));
                let args = os(&["-c", &conf.display().to_string()]);
                let mut p = Proc::spawn("mosquitto", Path::new(bin), &args, &dir, log.clone())?;
                match p.wait_log(" running", READY_LIMIT) {
                    Ok(_) => return Ok(p),
                    Err(e) => {
                        let text = std::fs::read_to_string(&log).unwrap_or_default();
                        if !text.contains("Address already in use") {
                            return Err(e);
                        }
                    }
                }
            }
            Err(CliError::Runtime(
                "mosquitto found no free port in 5 attempts".into(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_counters_come_from_the_metrics_text_and_add_up_over_restarts() {
        let text = "# HELP citygate_hub_accepted_batches_total Batches.\n\
                    # TYPE citygate_hub_accepted_batches_total counter\n\
                    citygate_hub_accepted_batches_total 12\n\
                    citygate_hub_records_written_total 7200\n\
                    citygate_hub_duplicates_total 3\n\
                    citygate_hub_rejected_total{reason=\"bad_magic\"} 2\n\
                    citygate_hub_rejected_total{reason=\"unknown_signer_key\"} 5\n";
        let c = HubCounters::parse(text);
        assert_eq!(
            (c.accepted_batches, c.records_written, c.duplicates),
            (12, 7200, 3)
        );
        assert_eq!(c.rejected.get("bad_magic"), Some(&2));
        assert_eq!(c.rejected.get("unknown_signer_key"), Some(&5));
        let mut sum = c.clone();
        sum.add(&c);
        assert_eq!(sum.accepted_batches, 24);
        assert_eq!(sum.rejected.get("unknown_signer_key"), Some(&10));
    }
}
