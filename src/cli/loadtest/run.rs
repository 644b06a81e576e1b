//! One load test run: starting, measuring and stopping the processes (see the module docs
//! of [`super`] for the order), then the accounting.

use std::collections::HashMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use super::procs::{self, Proc};
use super::report::{self, median_peak, Report, Timeline};
use super::setup::{BrokerPlan, Setup};
use super::sink::{self, Tailer};
use super::{LoadtestArgs, Transport};
use crate::cli::sim_served::Served;
use crate::cli::CliError;
use crate::reading::now_ms;

/// How long a child may take to become ready.
const READY_LIMIT: Duration = Duration::from_secs(60);
/// SIGTERM → SIGKILL for the broker at the start of an outage.
const BROKER_KILL_AFTER: Duration = Duration::from_secs(2);
/// How long the gateway may take to exit after SIGTERM (it seals, commits and delivers
/// for up to ~13 s).
const GATEWAY_EXIT_LIMIT: Duration = Duration::from_secs(30);
/// How long the sink may take to receive the last batches after the gateway stopped.
const SINK_SETTLE_LIMIT: Duration = Duration::from_secs(30);
/// The sink counts as settled when it did not grow for this long.
const SINK_QUIET: Duration = Duration::from_secs(5);
/// How long the gateway may take to empty its store after the simulators stopped.
const STORE_DRAIN_LIMIT: Duration = Duration::from_secs(60);
/// The gateway's default `[batch] max_age`, which the load test keeps.
const BATCH_MAX_AGE: Duration = Duration::from_secs(1);
/// The gateway's Modbus request timeout (its default, which the load test keeps).
const MODBUS_TIMEOUT: Duration = Duration::from_secs(1);

/// The children of one run; dropping it kills whatever still runs.
#[derive(Debug)]
struct Children {
    broker: Option<Proc>,
    hub: Option<Proc>,
    sims: Vec<Proc>,
    gateway: Option<Proc>,
}

fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

fn path_arg(p: &Path) -> String {
    p.display().to_string()
}

/// Starts `citygate broker` for `plan` and waits until it listens.
fn start_broker(exe: &Path, s: &Setup, generation: u32) -> Result<Option<Proc>, CliError> {
    let BrokerPlan::Own {
        port,
        cert,
        key,
        ca,
    } = &s.broker
    else {
        return Ok(None);
    };
    let listen = format!("127.0.0.1:{port}");
    let args = os(&[
        "broker",
        "--listen",
        &listen,
        "--cert-file",
        &path_arg(cert),
        "--key-file",
        &path_arg(key),
        "--client-ca-file",
        &path_arg(ca),
        "--hub",
        &s.hub_id,
        "--gateway",
        &s.gateway_id,
    ]);
    let log = s.dir.join(format!("broker-{generation}.log"));
    let mut p = Proc::spawn("broker", exe, &args, &s.dir, log)?;
    p.wait_log("broker listening on", READY_LIMIT)?;
    Ok(Some(p))
}

/// One HTTP GET of `/status` from `addr`, as JSON.
pub(super) fn status_json(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
) -> Option<serde_json::Value> {
    let (code, body) = rt
        .block_on(crate::telemetry::http::get(
            addr,
            "/status",
            Duration::from_secs(5),
        ))
        .ok()?;
    (code == 200).then(|| serde_json::from_str(&body).ok())?
}

/// Polls `addr`'s `/status` until `ready` holds; fails if `p` exits or at the limit.
pub(super) fn wait_status(
    rt: &tokio::runtime::Runtime,
    p: &mut Proc,
    addr: SocketAddr,
    what: &str,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> Result<(), CliError> {
    let deadline = Instant::now() + READY_LIMIT;
    loop {
        if status_json(rt, addr).is_some_and(|v| ready(&v)) {
            return Ok(());
        }
        if let Some(s) = p.exited() {
            return Err(p.failed(&format!("exited ({s})")));
        }
        if Instant::now() >= deadline {
            return Err(p.failed(&format!("was not {what} within {READY_LIMIT:?}")));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(super) fn run(args: &LoadtestArgs, exe: &Path, dir: &Path) -> Result<Report, CliError> {
    let started = Instant::now();
    let bin = args.citygate_bin.clone().unwrap_or_else(|| exe.to_owned());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Runtime(e.to_string()))?;
    let s = Setup::prepare(args, dir)?;
    let ticks = procs::clock_ticks();
    let (mut c, tailer) = start(args, exe, &bin, &s, &rt)?;
    let setup_s = started.elapsed().as_secs_f64();
    println!(
        "{} meters on {} simulator endpoints, gateway pid {}, hub pid {}; set-up took {setup_s:.1} s",
        args.meters(),
        s.endpoints.len(),
        c.gateway.as_ref().map_or(0, Proc::pid),
        c.hub.as_ref().map_or(0, Proc::pid),
    );
    println!("warm-up {:?}", args.warmup);
    std::thread::sleep(args.warmup);
    let window = measure(args, exe, &s, &mut c, ticks)?;
    let stopped = stop_sources_and_gateway(args, &s, &mut c, &rt)?;
    let served = served_by_subject(&s)?;
    settle(&tailer, served.values().sum());
    if let Some(h) = c.hub.as_mut() {
        h.stop(Duration::from_secs(15));
    }
    if let Some(b) = c.broker.as_mut() {
        b.stop(Duration::from_secs(5));
    }
    let log = tailer.finish();
    let accounting = sink::account(&log, &served);
    let delivery = report::delivery(&log, &window.timeline);

    let mb = |kb: &[u64]| median_peak(&kb.iter().map(|k| *k as f64 / 1024.0).collect::<Vec<_>>());
    let (gateway_rss_mb_median, gateway_rss_mb_peak) = mb(&window.gateway_rss_kb);
    let (hub_rss_mb_median, hub_rss_mb_peak) = mb(&window.hub_rss_kb);
    let mut report = Report {
        meters: args.meters(),
        interval_s: args.interval.as_secs_f64(),
        duration_s: args.duration.as_secs_f64(),
        warmup_s: args.warmup.as_secs_f64(),
        profile: s.profile.name.clone(),
        transport: clap::ValueEnum::to_possible_value(&args.transport)
            .map_or_else(String::new, |v| v.get_name().to_owned()),
        endpoints: s.endpoints.len(),
        broker: match &s.broker {
            BrokerPlan::Own { port, .. } => format!("citygate broker on 127.0.0.1:{port}"),
            BrokerPlan::External { address } => address.clone(),
        },
        outage: args.outage.map(|o| format!("{:?}@{:?}", o.down_for, o.at)),
        gateway_cpu_s: window.gateway_cpu_s,
        hub_cpu_s: window.hub_cpu_s,
        gateway_rss_mb_median,
        gateway_rss_mb_peak,
        hub_rss_mb_median,
        hub_rss_mb_peak,
        gateway_exit_code: stopped.exit_code,
        gateway_counters: stopped.counters,
        gateway_store_drained: stopped.store_drained,
        setup_s,
        clk_tck: ticks,
        citygate_version: format!("citygate {}", env!("CARGO_PKG_VERSION")),
        loadtest_bin: path_arg(exe),
        gateway_bin: path_arg(&bin),
        gateway_version: procs::version_of(&bin),
        hub_bin: path_arg(&bin),
        hub_version: procs::version_of(&bin),
        ..Report::default()
    };
    report.add_delivery(&delivery, &accounting, &log);
    Ok(report)
}

/// Starts broker, hub, simulators and gateway, each once the one before is ready, and
/// the sink's tailer once the hub is.
fn start(
    args: &LoadtestArgs,
    exe: &Path,
    bin: &Path,
    s: &Setup,
    rt: &tokio::runtime::Runtime,
) -> Result<(Children, Tailer), CliError> {
    let dir = s.dir.as_path();
    let mut c = Children {
        broker: start_broker(exe, s, 1)?,
        hub: None,
        sims: Vec::new(),
        gateway: None,
    };
    let hub_args = os(&["hub", "--config", &path_arg(&s.hub_config)]);
    let hub = c.hub.insert(Proc::spawn(
        "hub",
        bin,
        &hub_args,
        dir,
        dir.join("hub.log"),
    )?);
    wait_status(rt, hub, s.hub_status, "subscribed", |v| {
        v["subscribed"] == serde_json::Value::Bool(true)
    })?;
    let tailer = Tailer::start(dir.join("records.jsonl"));

    let (listen_flag, served_line) = match args.transport {
        Transport::Tcp => ("--listen", "serving "),
        Transport::RtuTcp => ("--rtu-listen", "serving modbus rtu over tcp on "),
    };
    for (i, units) in s.endpoints.iter().enumerate() {
        let a = os(&[
            "sim",
            "--profile",
            &s.profile.name,
            "--count",
            &units.to_string(),
            listen_flag,
            "127.0.0.1:0",
            "--profiles-dir",
            &path_arg(&dir.join("profiles")),
            "--seed",
            &(i + 1).to_string(),
            "--served-file",
            &path_arg(&dir.join(format!("served-{i}.json"))),
        ]);
        let log = dir.join(format!("sim-{i}.log"));
        c.sims
            .push(Proc::spawn(&format!("sim {i}"), exe, &a, dir, log)?);
    }
    let mut addresses = Vec::new();
    for p in &mut c.sims {
        let line = p.wait_log(served_line, READY_LIMIT)?;
        let addr = line
            .split_whitespace()
            .find_map(|w| w.parse::<SocketAddr>().ok())
            .ok_or_else(|| p.failed(&format!("printed no address: {line:?}")))?;
        addresses.push(addr);
    }
    s.write_gateway_config(&addresses, args.interval, args.transport)?;
    let gw_args = os(&["run", "--config", &path_arg(&s.gateway_config)]);
    let gw = c.gateway.insert(Proc::spawn(
        "gateway",
        bin,
        &gw_args,
        dir,
        dir.join("gateway.log"),
    )?);
    wait_status(rt, gw, s.gateway_status, "connected", |v| {
        v["link"]["connected"] == serde_json::Value::Bool(true)
    })?;
    Ok((c, tailer))
}

/// How the gateway ended.
#[derive(Debug)]
struct Stopped {
    exit_code: Option<i32>,
    counters: Option<std::collections::BTreeMap<String, u64>>,
    store_drained: bool,
}

/// Stops the simulators (they write what they served), lets the gateway finish its last
/// polls and drain its store, then stops it.
fn stop_sources_and_gateway(
    args: &LoadtestArgs,
    s: &Setup,
    c: &mut Children,
    rt: &tokio::runtime::Runtime,
) -> Result<Stopped, CliError> {
    println!("stopping the simulators");
    for p in &mut c.sims {
        p.terminate();
    }
    for p in &mut c.sims {
        if !matches!(p.wait_exit(Duration::from_secs(15)), Some(st) if st.success()) {
            return Err(p.failed("did not stop cleanly after SIGTERM"));
        }
    }
    // The last polls end (answered or timed out) and their batch is sealed and committed.
    std::thread::sleep(args.interval + MODBUS_TIMEOUT + BATCH_MAX_AGE);
    // What the gateway still holds is delivered late, not lost: let it drain (the uplink
    // re-sends unacknowledged batches after its ack timeout) before stopping it.
    let store_drained = wait_store_drained(rt, s.gateway_status);
    if !store_drained {
        println!("the gateway's store did not drain within {STORE_DRAIN_LIMIT:?}");
    }
    let counters = status_json(rt, s.gateway_status)
        .and_then(|v| serde_json::from_value(v["counters"].clone()).ok());
    println!("stopping the gateway");
    let gateway = c
        .gateway
        .as_mut()
        .expect("invariant: the gateway was started");
    Ok(Stopped {
        exit_code: gateway.stop(GATEWAY_EXIT_LIMIT).and_then(|st| st.code()),
        counters,
        store_drained,
    })
}

/// What the measured window gave.
#[derive(Debug)]
struct Window {
    timeline: Timeline,
    gateway_cpu_s: Option<f64>,
    hub_cpu_s: Option<f64>,
    gateway_rss_kb: Vec<u64>,
    hub_rss_kb: Vec<u64>,
}

/// Runs the measured window: RSS every second, CPU at both ends, the outage if asked.
fn measure(
    args: &LoadtestArgs,
    exe: &Path,
    s: &Setup,
    c: &mut Children,
    ticks: u64,
) -> Result<Window, CliError> {
    let cpu = |p: &Option<Proc>| p.as_ref().and_then(|p| p.cpu_seconds(ticks));
    let rss = |p: &Option<Proc>| p.as_ref().and_then(Proc::rss_kb);
    let start = Instant::now();
    let window_start_ms = now_ms();
    let (gw0, hub0) = (cpu(&c.gateway), cpu(&c.hub));
    println!("measuring for {:?}", args.duration);
    let (mut gateway_rss_kb, mut hub_rss_kb) = (Vec::new(), Vec::new());
    let mut outage: Option<(i64, i64)> = None;
    let mut down_since: Option<(Instant, i64)> = None;
    let mut generation = 1;
    let mut next_sample = Duration::ZERO;
    // Outage edges are acted on within 100 ms; RSS is sampled every second.
    let step = if args.outage.is_some() {
        Duration::from_millis(100)
    } else {
        Duration::from_secs(1)
    };
    loop {
        let elapsed = start.elapsed();
        if elapsed >= args.duration {
            break;
        }
        if let (Some(o), None, None) = (args.outage, down_since, outage) {
            if elapsed >= o.at {
                if let Some(mut b) = c.broker.take() {
                    println!("outage: stopping the broker for {:?}", o.down_for);
                    b.stop(BROKER_KILL_AFTER);
                }
                down_since = Some((Instant::now(), now_ms()));
            }
        }
        if let (Some(o), Some((since, down_ms))) = (args.outage, down_since) {
            if since.elapsed() >= o.down_for {
                generation += 1;
                c.broker = start_broker(exe, s, generation)?;
                outage = Some((down_ms, now_ms()));
                println!("outage: broker back");
                down_since = None;
            }
        }
        if elapsed >= next_sample {
            gateway_rss_kb.extend(rss(&c.gateway));
            hub_rss_kb.extend(rss(&c.hub));
            for p in [&mut c.gateway, &mut c.hub].into_iter().flatten() {
                if let Some(st) = p.exited() {
                    return Err(p.failed(&format!("exited during the measured window ({st})")));
                }
            }
            next_sample += Duration::from_secs(1);
        }
        let wake = next_sample.min(args.duration).min(elapsed + step);
        std::thread::sleep(wake.saturating_sub(start.elapsed()));
    }
    let window_end_ms = now_ms();
    let (gw1, hub1) = (cpu(&c.gateway), cpu(&c.hub));
    // An outage still running at the end of the window ends now, so the drain is seen.
    if let Some((_, down_ms)) = down_since {
        generation += 1;
        c.broker = start_broker(exe, s, generation)?;
        outage = Some((down_ms, now_ms()));
    }
    Ok(Window {
        timeline: Timeline {
            window_start_ms,
            window_end_ms,
            outage,
        },
        gateway_cpu_s: gw0.zip(gw1).map(|(a, b)| b - a),
        hub_cpu_s: hub0.zip(hub1).map(|(a, b)| b - a),
        gateway_rss_kb,
        hub_rss_kb,
    })
}

/// Waits until the gateway's `/status` shows an empty store and nothing in flight, at most
/// [`STORE_DRAIN_LIMIT`]. False at the limit.
fn wait_store_drained(rt: &tokio::runtime::Runtime, addr: SocketAddr) -> bool {
    let deadline = Instant::now() + STORE_DRAIN_LIMIT;
    let mut said = false;
    while Instant::now() < deadline {
        if let Some(v) = status_json(rt, addr) {
            let stored: u64 = v["store"]["batches"].as_object().map_or(0, |m| {
                m.values().filter_map(serde_json::Value::as_u64).sum()
            });
            let in_flight = v["link"]["in_flight"].as_u64().unwrap_or(0);
            if stored == 0 && in_flight == 0 {
                return true;
            }
            if !said {
                println!("waiting for the gateway to deliver {stored} stored batches");
                said = true;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// Polls served per device pseudonym, from the simulators' served files.
fn served_by_subject(s: &Setup) -> Result<HashMap<String, u64>, CliError> {
    let subjects = s.subjects()?;
    let mut out = HashMap::new();
    for (i, row) in subjects.iter().enumerate() {
        let served =
            Served::read(&s.dir.join(format!("served-{i}.json"))).map_err(CliError::Runtime)?;
        for (u, subject) in row.iter().enumerate() {
            let unit = u8::try_from(u + 1).expect("invariant: at most 247 units");
            out.insert(
                subject.clone(),
                served.polls.get(&unit).copied().unwrap_or(0),
            );
        }
    }
    Ok(out)
}

/// Waits until the sink holds `expected` polls, or stopped growing for [`SINK_QUIET`],
/// at most [`SINK_SETTLE_LIMIT`].
fn settle(tailer: &Tailer, expected: u64) {
    use std::sync::atomic::Ordering;
    let deadline = Instant::now() + SINK_SETTLE_LIMIT;
    let mut last = (
        tailer.progress.lines.load(Ordering::Relaxed),
        Instant::now(),
    );
    while Instant::now() < deadline {
        if tailer.progress.delivered_polls.load(Ordering::Relaxed) >= expected {
            // Give the tailer one more pass for the rest of the last batch.
            std::thread::sleep(sink::TAIL_EVERY * 4);
            return;
        }
        let lines = tailer.progress.lines.load(Ordering::Relaxed);
        if lines != last.0 {
            last = (lines, Instant::now());
        } else if last.1.elapsed() >= SINK_QUIET {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
