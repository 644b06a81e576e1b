//! One fleet load test run: broker, hubs, fleet, the measured window with its hub kills,
//! the drain, then the accounting (see the module docs of [`super`]).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use super::account::read_sinks;
use super::fleet::{Control, Fleet, Plan, DRAINING, SEALING};
use super::procs::{start_broker, HubProc};
use super::report::{BrokerFigures, HubReport};
use super::setup::{stamp, Setup};
use super::{BrokerKind, HubLoadArgs, SinkKind};
use crate::cli::loadtest::procs::{self, cpu_ticks};
use crate::cli::loadtest::report::percentile;
use crate::cli::CliError;
use crate::seal::keys::{load_hub_ack_verifying_key, load_hub_public_key};
use crate::wire::AckVerifier;

/// How long the fleet may take to connect and subscribe.
const FLEET_READY_LIMIT: Duration = Duration::from_secs(60);
/// How long a hub may take to exit after SIGTERM.
const HUB_STOP_GRACE: Duration = Duration::from_secs(15);
/// How often the window samples RSS and the hubs' counters.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

fn rt_err(e: impl std::fmt::Display) -> CliError {
    CliError::Runtime(e.to_string())
}

/// This process's CPU seconds.
fn own_cpu(ticks: u64) -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    Some(cpu_ticks(&stat)? as f64 / ticks.max(1) as f64)
}

/// When, into the window, which hub is killed: evenly spread, jittered by a quarter of the
/// spacing, hub chosen at random; all from `seed`.
pub(super) fn kill_schedule(
    kills: u32,
    hubs: u8,
    window: Duration,
    seed: u64,
) -> Vec<(Duration, usize)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x000c_4a05);
    let spacing = window.as_secs_f64() / f64::from(kills + 1);
    let mut out: Vec<(Duration, usize)> = (1..=kills)
        .map(|i| {
            let jitter = rng.gen_range(-0.25..0.25) * spacing;
            let at = (f64::from(i) * spacing + jitter).clamp(0.0, window.as_secs_f64());
            (
                Duration::from_secs_f64(at),
                rng.gen_range(0..usize::from(hubs)),
            )
        })
        .collect();
    out.sort_by_key(|k| k.0);
    out
}

/// `citygate hub-migrate --config CONFIG` with the hubs' binary, once before they start.
fn migrate(bin: &Path, config: &Path) -> Result<(), CliError> {
    let out = std::process::Command::new(bin)
        .args(["hub-migrate", "--config"])
        .arg(config)
        .output()
        .map_err(rt_err)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(CliError::Runtime(format!(
            "citygate hub-migrate failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

pub(super) fn run(args: &HubLoadArgs, exe: &Path, dir: &Path) -> Result<HubReport, CliError> {
    let started = Instant::now();
    let bin = args.citygate_bin.clone().unwrap_or_else(|| exe.to_owned());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(rt_err)?;
    let ticks = procs::clock_ticks();
    let run_started = std::time::SystemTime::now();
    let mut s = Setup::prepare(args, dir)?;
    let mut broker = start_broker(exe, &mut s)?;
    s.write_hub_configs(s.broker_port)?;
    if args.sink == SinkKind::Postgres {
        migrate(&bin, &s.hubs[0].config)?;
    }
    let mut hubs = Vec::new();
    for h in &s.hubs {
        hubs.push(HubProc::start(&rt, &bin, dir, h)?);
    }
    let plan = Arc::new(Plan {
        meters: args.meters,
        fields: args.fields,
        readings: args.readings_per_batch(),
        interval_ms: i64::try_from(args.interval.as_millis()).unwrap_or(i64::MAX),
        batch_every: args.batch_every,
        window: args.window,
        ack_timeout: args.ack_timeout,
        withhold_acks: args.withhold_acks,
        garbage: args.garbage,
        forged: args.forged,
        seed: args.seed,
        stamp: stamp(),
        hub_key: load_hub_public_key(&s.hub_public_key).map_err(rt_err)?,
        broker: s.broker_address(),
    });
    let verifier = AckVerifier::new(load_hub_ack_verifying_key(&s.hub_ack_key).map_err(rt_err)?);
    let fleet = Fleet::start(&rt, plan, &s.gateways, &s.connections, &verifier)
        .map_err(CliError::Runtime)?;
    let deadline = Instant::now() + FLEET_READY_LIMIT;
    while !fleet.subscribed() {
        let refused = Control::get(&fleet.control.subscribe_refused);
        if refused > 0 || Instant::now() >= deadline {
            return Err(CliError::Runtime(format!(
                "the fleet did not subscribe its ack and presence topics ({} granted, {refused} \
                 refused); \
                 see the broker log in {}",
                Control::get(&fleet.control.subscribed),
                dir.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let setup_s = started.elapsed().as_secs_f64();
    println!(
        "{} gateways on {} connections, {} hub(s), broker {:?} on port {}; set-up took \
         {setup_s:.1} s; measuring for {:?}",
        s.gateways.len(),
        s.connections.len(),
        hubs.len(),
        s.broker,
        s.broker_port,
        args.duration
    );

    // The measured window.
    for h in &mut hubs {
        h.mark_cpu(ticks);
    }
    let (broker_cpu0, fleet_cpu0) = (broker.cpu_seconds(ticks), own_cpu(ticks));
    let mut broker_rss_kb = 0u64;
    let mut kills = kill_schedule(args.kill_hubs, args.hubs, args.duration, args.seed).into_iter();
    let mut next_kill = kills.next();
    let window_start = Instant::now();
    fleet.control.set_phase(SEALING);
    let mut next_sample = Duration::ZERO;
    loop {
        let elapsed = window_start.elapsed();
        if elapsed >= args.duration {
            break;
        }
        if let Some((at, h)) = next_kill {
            if elapsed >= at {
                println!(
                    "killing {} (SIGKILL) {:.1} s into the window",
                    hubs[h].files.id,
                    elapsed.as_secs_f64()
                );
                hubs[h].kill_and_restart(&rt, &bin, dir, ticks)?;
                next_kill = kills.next();
            }
        }
        if elapsed >= next_sample {
            for h in &mut hubs {
                if let Some(st) = h.proc.exited() {
                    return Err(h.proc.failed(&format!("exited during the window ({st})")));
                }
                h.sample(&rt);
            }
            broker_rss_kb = broker_rss_kb.max(broker.rss_kb().unwrap_or(0));
            next_sample += SAMPLE_EVERY;
        }
        let wake = next_sample
            .min(args.duration)
            .min(next_kill.map_or(args.duration, |k| k.0));
        std::thread::sleep(
            wake.saturating_sub(window_start.elapsed())
                .min(SAMPLE_EVERY),
        );
    }
    fleet.control.set_phase(DRAINING);

    // The drain: the fleet re-sends until every batch is acked.
    let drain_start = Instant::now();
    println!("window over; draining the fleet's backlog");
    let drained = loop {
        if fleet
            .control
            .pending
            .load(std::sync::atomic::Ordering::Relaxed)
            <= 0
        {
            break true;
        }
        if drain_start.elapsed() >= args.drain {
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let drain_s = drain_start.elapsed().as_secs_f64();
    // The load ends with the drain: a hub behind the fleet works through it.
    let measured_s = window_start.elapsed().as_secs_f64();
    for h in &mut hubs {
        h.take_cpu(ticks);
    }
    let broker_cpu = broker_cpu0
        .zip(broker.cpu_seconds(ticks))
        .map(|(a, b)| b - a);
    let fleet_cpu = fleet_cpu0.zip(own_cpu(ticks)).map(|(a, b)| b - a);
    for h in &mut hubs {
        h.stop(&rt, HUB_STOP_GRACE);
    }
    let c = fleet.control.clone();
    let (ledgers, mut latencies) = fleet.finish(&rt);
    broker_rss_kb = broker_rss_kb.max(broker.rss_kb().unwrap_or(0));
    broker.stop(Duration::from_secs(5));

    let sinks: Vec<_> = hubs.iter().map(|h| h.files.sink.clone()).collect();
    let accounting = read_sinks(args.sink, &sinks, &ledgers, &s.hubs[0].config, run_started)
        .map_err(CliError::Runtime)?
        .account(&ledgers);
    latencies.sort_by(f32::total_cmp);
    let lat: Vec<f64> = latencies.iter().map(|ms| f64::from(*ms) / 1000.0).collect();
    let hub_figures: Vec<_> = hubs.iter().map(HubProc::figures).collect();
    let (mut rejected_garbage, mut rejected_forged) = (0, 0);
    for (reason, n) in hub_figures.iter().flat_map(|h| &h.rejected) {
        if reason == "unknown_signer_key" || reason == "bad_signature" {
            rejected_forged += n;
        } else {
            rejected_garbage += n;
        }
    }
    let hub_cpu_s: f64 = hub_figures.iter().filter_map(|h| h.cpu_s).sum();
    let duration_s = args.duration.as_secs_f64();
    let records_per_batch = args.records_per_batch();
    let acked = Control::get(&c.acked);
    let acked_records = (acked * records_per_batch) as f64;
    Ok(HubReport {
        sink: match args.sink {
            SinkKind::Jsonl => "jsonl".into(),
            SinkKind::Postgres => "postgres".into(),
        },
        pg_connections: (args.sink == SinkKind::Postgres).then_some(args.pg_connections),
        hubs: args.hubs,
        gateways: args.gateways,
        meters: args.meters,
        fields: args.fields,
        interval_s: args.interval.as_secs_f64(),
        batch_every_s: args.batch_every.as_secs_f64(),
        records_per_batch,
        duration_s,
        measured_s,
        connections: s.connections.len(),
        gateways_per_connection: match s.broker {
            BrokerKind::Mosquitto => args.per_connection,
            BrokerKind::Embedded => 1,
        },
        withhold_acks: args.withhold_acks,
        garbage: args.garbage,
        forged: args.forged,
        kill_hubs: args.kill_hubs,
        seed: args.seed,
        offered_batches_per_s: f64::from(args.gateways) / args.batch_every.as_secs_f64(),
        accepted_batches_per_s: acked as f64 / measured_s,
        records_per_s: acked_records / measured_s,
        acked_in_window_per_s: Control::get(&c.acked_in_window) as f64 / duration_s,
        latency_p50_s: percentile(&lat, 0.5),
        latency_p99_s: percentile(&lat, 0.99),
        latency_max_s: lat.last().copied(),
        sealed_batches: Control::get(&c.sealed),
        skipped_seals: Control::get(&c.skipped_seals),
        published: Control::get(&c.published),
        resends: Control::get(&c.resends),
        presence_resends: Control::get(&c.presence_resends),
        publish_errors: Control::get(&c.publish_errors),
        acks_withheld: Control::get(&c.acks_withheld),
        acks_for_resends: Control::get(&c.acks_for_resends),
        acks_again: Control::get(&c.acks_again),
        bad_acks: Control::get(&c.bad_acks),
        garbage_sent: Control::get(&c.garbage_sent),
        forged_sent: Control::get(&c.forged_sent),
        rejected_garbage,
        rejected_forged,
        forged_acked: Control::get(&c.forged_acked),
        fleet_disconnects: Control::get(&c.disconnects),
        accounting,
        drained,
        drain_s,
        hub: hub_figures,
        hub_cpu_s: Some(hub_cpu_s),
        records_per_hub_cpu_s: (hub_cpu_s > 0.0).then(|| acked_records / hub_cpu_s),
        broker: BrokerFigures {
            kind: match s.broker {
                BrokerKind::Mosquitto => "mosquitto".into(),
                BrokerKind::Embedded => "citygate broker".into(),
            },
            cpu_s: broker_cpu,
            rss_mb_peak: (broker_rss_kb > 0).then(|| broker_rss_kb as f64 / 1024.0),
        },
        fleet_cpu_s: fleet_cpu,
        setup_s,
        clk_tck: ticks,
        citygate_version: format!("citygate {}", env!("CARGO_PKG_VERSION")),
        hub_bin: bin.display().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kills_spread_over_the_window_and_repeat_with_the_seed() {
        let k = kill_schedule(3, 3, Duration::from_secs(40), 7);
        assert_eq!(k.len(), 3);
        assert!(k.windows(2).all(|w| w[0].0 <= w[1].0));
        assert!(k
            .iter()
            .all(|(at, h)| *at <= Duration::from_secs(40) && *h < 3));
        // Each kill stays within a quarter spacing (10 s) of its even slot.
        for (i, (at, _)) in k.iter().enumerate() {
            let slot = 10.0 * (i + 1) as f64;
            assert!((at.as_secs_f64() - slot).abs() <= 2.5, "{k:?}");
        }
        assert_eq!(k, kill_schedule(3, 3, Duration::from_secs(40), 7));
        assert!(kill_schedule(0, 1, Duration::from_secs(5), 1).is_empty());
    }
}
