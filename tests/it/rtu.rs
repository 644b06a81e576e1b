//! Modbus RTU end to end: pseudo-terminals with real RTU framing, RTU over TCP and DTU
//! dial-in, against the simulator with line faults.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use citygate::config::{DeviceConfig, DeviceKind, ModbusConfig, ModbusDevice, Transport};
use citygate::profile::{LineSettings, Parity, Profile};
use citygate::reading::{DeviceId, UnitId};
use citygate::sim::{Chaos, RtuSim, SimMeters};
use citygate::source::rtu::dtu::DtuListener;
use citygate::source::rtu::transport::Link;
use citygate::source::rtu::{LineOverride, LineTiming, RtuBus};
use citygate::source::{RawSample, SourceContext};
use citygate::telemetry::Metrics;
use citygate::transform::normalise::normalise;
use tokio::sync::mpsc;
use tokio_serial::SerialPort;
use tokio_util::sync::CancellationToken;

use crate::support::shipped_profiles;

const PROFILE: &str = "chint-ddsu666";

fn line(baud: u32) -> LineSettings {
    LineSettings {
        baud,
        data_bits: 8,
        parity: Parity::None,
        stop_bits: 1,
    }
}

fn profile() -> Arc<Profile> {
    shipped_profiles().get(PROFILE).unwrap().clone()
}

fn devices(
    n: u8,
    transport: &Transport,
    interval: Duration,
    timeout: Duration,
) -> Vec<DeviceConfig> {
    (1..=n)
        .map(|u| DeviceConfig {
            id: DeviceId::new(format!("m{u}")).unwrap(),
            profile: profile(),
            kind: DeviceKind::Modbus(ModbusDevice {
                transport: transport.clone(),
                unit: UnitId(u),
                poll_interval: interval,
                timeout,
            }),
            location: None,
            area: None,
            ratios: citygate::profile::Ratios::UNITY,
        })
        .collect()
}

fn modbus() -> ModbusConfig {
    ModbusConfig {
        timeout: Duration::from_millis(50),
        connect_timeout: Duration::from_secs(2),
        backoff_max: Duration::from_secs(2),
    }
}

/// Values each unit served, in canonical units per field.
struct Served(HashMap<(u8, String), Vec<f64>>);

/// Whether a delivered canonical value is the served engineering value `eng` (the
/// gateway rounds away binary noise of `eng × factor`, so equal up to that noise).
fn same_value(eng: f64, factor: f64, got: f64) -> bool {
    let want = eng * factor;
    (got - want).abs() <= 1e-12 * want.abs().max(1.0)
}

impl Served {
    fn of(meters: &SimMeters, units: u8) -> Self {
        let p = meters.profile().clone();
        let mut map: HashMap<(u8, String), Vec<f64>> = HashMap::new();
        for u in 1..=units {
            for snap in meters.history(UnitId(u)) {
                for f in &p.fields {
                    if let Some(v) = snap.values.get(&f.name) {
                        map.entry((u, f.name.as_str().to_string()))
                            .or_default()
                            .push(*v);
                    }
                }
            }
        }
        Served(map)
    }

    /// Whether every decoded value of `sample` was served by `unit`.
    fn matches(&self, sample: &RawSample, unit: u8) -> bool {
        let citygate::source::SampleData::Registers(image) = &sample.data else {
            return false;
        };
        let n = normalise(&sample.profile, &sample.device, sample.at_ms, image);
        !n.readings.is_empty()
            && n.readings.iter().all(|r| {
                let v = r.value.as_f64().unwrap();
                let factor = sample.profile.field(r.field.as_str()).unwrap().unit.factor;
                self.0
                    .get(&(unit, r.field.as_str().to_string()))
                    .is_some_and(|served| served.iter().any(|eng| same_value(*eng, factor, v)))
            })
    }
}

fn unit_of(sample: &RawSample) -> u8 {
    sample.device.as_str()[1..].parse().unwrap()
}

struct Bus {
    samples_rx: mpsc::Receiver<RawSample>,
    status: tokio::sync::watch::Receiver<citygate::source::rtu::bus::BusStatus>,
    metrics: Arc<Metrics>,
    token: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn start_bus(
    link: Link,
    line: &LineSettings,
    devices: Vec<DeviceConfig>,
    heartbeats: Vec<Vec<u8>>,
) -> Bus {
    let (samples_tx, samples_rx) = mpsc::channel(100_000);
    let metrics = Arc::new(Metrics::default());
    let token = CancellationToken::new();
    let bus = RtuBus::new(
        link,
        LineTiming::new(line),
        devices,
        heartbeats,
        SourceContext::new(samples_tx, metrics.clone(), &token, modbus()),
    );
    let status = bus.status();
    let task = tokio::spawn(bus.run());
    Bus {
        samples_rx,
        status,
        metrics,
        token,
        task,
    }
}

impl Bus {
    async fn stop(mut self) -> Vec<RawSample> {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("bus stops promptly")
            .unwrap();
        let mut out = Vec::new();
        while let Ok(s) = self.samples_rx.try_recv() {
            out.push(s);
        }
        out
    }
}

/// A pty pair: the simulator serves the master side, the bus opens the slave by path
/// (a real serial port open with line settings).
fn pty_sim(sim: &RtuSim, token: &CancellationToken) -> (String, tokio_serial::SerialStream) {
    let (master, slave) = tokio_serial::SerialStream::pair().expect("pty pair");
    let path = slave.name().expect("pty has a path");
    let sim = sim.clone();
    let token = token.clone();
    tokio::spawn(async move { sim.serve(master, token, None).await });
    (path, slave)
}

fn serial(path: &str, baud: u32) -> Transport {
    Transport::Serial {
        port: path.to_string(),
        line: LineOverride {
            baud: Some(baud),
            ..LineOverride::default()
        },
    }
}

/// Waits (bounded) until every device in `ids` has answered `n` polls.
async fn until_polled(metrics: &Metrics, ids: &[DeviceId], n: u64) {
    let done = crate::support::wait_for(Duration::from_secs(30), || {
        ids.iter().all(|id| metrics.device(id).polls_ok >= n)
    })
    .await;
    let polls: Vec<u64> = ids.iter().map(|id| metrics.device(id).polls_ok).collect();
    assert!(done, "polls {polls:?}, waiting for {n} each");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_meters_on_one_pty_bus_are_each_polled_every_cycle_and_a_silent_one_costs_at_most_one_timeout_per_cycle(
) {
    let meters = SimMeters::new(profile(), 8, 11);
    meters.set_fault(UnitId(5), citygate::sim::Fault::Silent);
    let sim = RtuSim::new(meters.clone());
    let sim_token = CancellationToken::new();
    let (path, _keep) = pty_sim(&sim, &sim_token);
    let transport = serial(&path, 115_200);
    let interval = Duration::from_millis(200);
    // A timeout an answering meter never reaches, even on a loaded machine (50 ms did, under
    // parallel builds); the silent meter's cost is counted in timeouts per cycle, not in time.
    let devs = devices(8, &transport, interval, Duration::from_millis(400));
    let l = line(115_200);
    let bus = start_bus(
        Link::Serial {
            port: path.clone(),
            line: l,
        },
        &l,
        devs.clone(),
        Vec::new(),
    );
    // Fifteen cycles of the seven answering meters, however long the machine takes.
    let answering: Vec<DeviceId> = devs
        .iter()
        .filter(|d| d.modbus().unwrap().unit != UnitId(5))
        .map(|d| d.id.clone())
        .collect();
    until_polled(&bus.metrics, &answering, 15).await;
    let metrics = bus.metrics.clone();
    let samples = bus.stop().await;
    sim_token.cancel();

    let polls: Vec<u64> = answering
        .iter()
        .map(|id| metrics.device(id).polls_ok)
        .collect();
    let cycles = *polls.iter().max().unwrap();
    for id in &answering {
        let s = metrics.device(id);
        assert_eq!(s.timeouts, 0, "{id}: {s:?}");
        // Polled in every cycle: the silent meter delays no one by a whole interval.
        assert!(s.polls_ok + 1 >= cycles, "{id}: {polls:?}");
    }
    let silent = metrics.device(&DeviceId::new("m5").unwrap());
    assert!(silent.timeouts >= 1, "{silent:?}");
    assert!(
        silent.timeouts <= cycles,
        "silent meter cost {} timeouts in {cycles} cycles",
        silent.timeouts
    );
    assert_eq!(silent.polls_ok, 0);
    let served = Served::of(&meters, 8);
    assert!(samples.iter().all(|s| served.matches(s, unit_of(s))));
    assert!(samples.iter().all(|s| unit_of(s) != 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn line_faults_never_misattribute_a_reading_over_ten_thousand_transactions() {
    let meters = SimMeters::new(profile(), 8, 12).with_tick(Duration::from_millis(20));
    let sim = RtuSim::new(meters.clone()).with_chaos(Chaos {
        rate: 0.06,
        late: Duration::from_millis(45),
        seed: 99,
    });
    let sim_token = CancellationToken::new();
    let (path, _keep) = pty_sim(&sim, &sim_token);
    let transport = serial(&path, 115_200);
    // Flat out: every device is always due.
    let devs = devices(
        8,
        &transport,
        Duration::from_millis(1),
        Duration::from_millis(30),
    );
    let l = line(115_200);
    let bus = start_bus(
        Link::Serial {
            port: path.clone(),
            line: l,
        },
        &l,
        devs,
        Vec::new(),
    );
    let replies = || {
        sim.injected()
            .replies
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let done = crate::support::wait_for(Duration::from_secs(120), || replies() >= 10_000).await;
    let samples = bus.stop().await;
    sim_token.cancel();
    assert!(done, "only {} transactions in time", replies());

    let inj = sim.injected();
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    for (name, n) in [
        ("late", load(&inj.late)),
        ("corrupt", load(&inj.corrupt)),
        ("garbage", load(&inj.garbage)),
        ("fragments", load(&inj.fragments)),
    ] {
        assert!(n >= 20, "only {n} {name} faults injected");
    }
    let served = Served::of(&meters, 8);
    let mut wrong = 0;
    for s in &samples {
        if !served.matches(s, unit_of(s)) {
            wrong += 1;
        }
    }
    assert_eq!(
        wrong,
        0,
        "{wrong} of {} samples misattributed",
        samples.len()
    );
    assert!(samples.len() > 3_000, "{} samples", samples.len());
    // The check can fail: a sample of one unit does not match another unit's history.
    let other = samples
        .iter()
        .filter(|s| !served.matches(s, unit_of(s) % 8 + 1))
        .count();
    assert_eq!(other, samples.len(), "units served distinguishable values");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn illegal_address_is_not_hammered_and_busy_is_retried() {
    use tokio_modbus::ExceptionCode;
    let meters = SimMeters::new(profile(), 3, 13);
    meters.set_fault(
        UnitId(2),
        citygate::sim::Fault::Exception(ExceptionCode::IllegalDataAddress),
    );
    meters.set_fault(
        UnitId(3),
        citygate::sim::Fault::Exception(ExceptionCode::ServerDeviceBusy),
    );
    let sim = RtuSim::new(meters.clone());
    let sim_token = CancellationToken::new();
    let (path, _keep) = pty_sim(&sim, &sim_token);
    let transport = serial(&path, 115_200);
    let interval = Duration::from_millis(100);
    // Every answer is immediate: a timeout generous enough for a loaded CI machine, so the
    // check below is about busy not being taken for silence.
    let devs = devices(3, &transport, interval, Duration::from_millis(500));
    let plan_len = citygate::source::modbus::plan(&profile()).len() as u64;
    let l = line(115_200);
    let bus = start_bus(
        Link::Serial {
            port: path,
            line: l,
        },
        &l,
        devs,
        Vec::new(),
    );
    // Twelve cycles of the healthy meter.
    until_polled(&bus.metrics, &[DeviceId::new("m1").unwrap()], 12).await;
    let metrics = bus.metrics.clone();
    bus.stop().await;
    sim_token.cancel();
    let ok = metrics.device(&DeviceId::new("m1").unwrap()).polls_ok;
    // Every read rejected once, then left alone (retried only every 10 minutes) ...
    assert_eq!(meters.requests_served(UnitId(2)), plan_len);
    // ... while the device is still polled every cycle and reports why its fields miss.
    let m2 = metrics.device(&DeviceId::new("m2").unwrap());
    assert!(
        m2.exceptions + 2 >= ok,
        "{m2:?} vs {ok} polls of a healthy meter"
    );
    // Busy: polled more often than its interval (quick retries), but still alive.
    let m3 = metrics.device(&DeviceId::new("m3").unwrap());
    assert!(
        m3.exceptions > ok,
        "{m3:?} vs {ok} polls of a healthy meter"
    );
    assert_eq!(m3.timeouts, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtu_over_tcp_end_to_end() {
    let meters = SimMeters::new(profile(), 4, 14);
    let sim = RtuSim::new(meters.clone());
    let token = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    tokio::spawn(citygate::sim::serve_rtu_tcp(listener, sim, token.clone()));
    let transport = Transport::RtuTcp {
        address: address.clone(),
        line: LineOverride::default(),
    };
    let devs = devices(
        4,
        &transport,
        Duration::from_millis(100),
        Duration::from_millis(200),
    );
    let l = line(9600);
    let mut bus = start_bus(Link::Tcp { address }, &l, devs, Vec::new());
    let mut got = Vec::new();
    while got.len() < 20 {
        let s = tokio::time::timeout(Duration::from_secs(10), bus.samples_rx.recv())
            .await
            .expect("samples keep coming")
            .unwrap();
        got.push(s);
    }
    bus.stop().await;
    token.cancel();
    let served = Served::of(&meters, 4);
    assert!(got.iter().all(|s| served.matches(s, unit_of(s))));
    let units: HashSet<u8> = got.iter().map(unit_of).collect();
    assert_eq!(units.len(), 4, "{units:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dtu_dials_in_registers_and_its_heartbeats_are_filtered() {
    let meters = SimMeters::new(profile(), 3, 15);
    let sim = RtuSim::new(meters.clone());
    let token = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let id = "865000111222333".to_string();
    let (dtu, mut sessions) = DtuListener::new(address.clone(), [id.clone()], token.clone());
    tokio::spawn(dtu.serve(listener));
    tokio::spawn(citygate::sim::dial_dtu(
        address.clone(),
        id.clone(),
        Duration::from_millis(30),
        sim,
        token.clone(),
    ));
    let transport = Transport::Dtu {
        id: id.clone(),
        listen: address,
        heartbeat: None,
        line: LineOverride::default(),
        allow: Vec::new(),
    };
    let devs = devices(
        3,
        &transport,
        Duration::from_millis(100),
        Duration::from_millis(300),
    );
    let l = line(9600);
    let link = Link::Dtu {
        id: id.clone(),
        sessions: sessions.remove(&id).unwrap(),
    };
    let mut bus = start_bus(link, &l, devs, vec![id.as_bytes().to_vec()]);
    let mut got = Vec::new();
    while got.len() < 30 {
        let s = tokio::time::timeout(Duration::from_secs(10), bus.samples_rx.recv())
            .await
            .expect("samples keep coming")
            .unwrap();
        got.push(s);
    }
    let metrics = bus.metrics.clone();
    let status = bus.status.clone();
    bus.stop().await;
    token.cancel();
    let discarded = status.borrow().link.discarded_bytes;
    assert!(
        discarded >= 3 * id.len() as u64,
        "heartbeats were not seen and dropped: {discarded} bytes discarded"
    );
    let served = Served::of(&meters, 3);
    assert!(got.iter().all(|s| served.matches(s, unit_of(s))));
    for u in 1..=3 {
        let s = metrics.device(&DeviceId::new(format!("m{u}")).unwrap());
        assert_eq!((s.timeouts, s.transport_errors), (0, 0), "m{u}: {s:?}");
    }
}

/// Bus cycle time measured with baud emulation against the computed wire-time limit.
/// `cargo test --test it rtu::measure_cycle_time -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; prints numbers"]
async fn measure_cycle_time() {
    for baud in [9600, 115_200] {
        let l = line(baud);
        let meters = SimMeters::new(profile(), 8, 16);
        let sim = RtuSim::new(meters).with_baud(&l);
        let sim_token = CancellationToken::new();
        let (path, _keep) = pty_sim(&sim, &sim_token);
        let transport = serial(&path, baud);
        let devs = devices(
            8,
            &transport,
            Duration::from_millis(1),
            Duration::from_millis(500),
        );
        let bus = RtuBus::new(
            Link::Serial {
                port: path.clone(),
                line: l,
            },
            LineTiming::new(&l),
            devs.clone(),
            Vec::new(),
            SourceContext::new(
                mpsc::channel(100_000).0,
                Arc::new(Metrics::default()),
                &CancellationToken::new(),
                modbus(),
            ),
        );
        let computed = bus.budget();
        let b = start_bus(
            Link::Serial {
                port: path,
                line: l,
            },
            &l,
            devs.clone(),
            Vec::new(),
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        let polls = |m: &Metrics| devs.iter().map(|d| m.device(&d.id).polls_ok).sum::<u64>();
        let p0 = polls(&b.metrics);
        let t0 = std::time::Instant::now();
        // At least a dozen cycles.
        tokio::time::sleep(
            computed
                .cycle
                .saturating_mul(12)
                .max(Duration::from_secs(5)),
        )
        .await;
        let p1 = polls(&b.metrics);
        let elapsed = t0.elapsed();
        let metrics = b.metrics.clone();
        b.stop().await;
        sim_token.cancel();
        let cycles = (p1 - p0) as f64 / 8.0;
        let measured = elapsed.as_secs_f64() / cycles;
        println!(
            "baud {baud}: 8 x {PROFILE}, {} requests/cycle; computed cycle {:.1} ms, measured {:.1} ms ({cycles:.0} cycles, timeouts {})",
            computed.requests,
            computed.cycle.as_secs_f64() * 1e3,
            measured * 1e3,
            devs.iter().map(|d| metrics.device(&d.id).timeouts).sum::<u64>()
        );
    }
}

/// Runs the whole gateway (config → supervisor → bus task → seal → commit) on
/// `devices` (named `{prefix}{unit}`) until `batches` are committed, then opens every
/// sealed record and checks it against what `meters` served to its unit. Returns the
/// number of records checked and the gateway's counters.
async fn gateway_records_match_the_meters(
    meters: &SimMeters,
    devices: &str,
    prefix: &str,
    units: std::ops::RangeInclusive<u8>,
    batches: u64,
) -> (usize, Arc<Metrics>) {
    use crate::support::{open_all, wait_for, Deployment};
    use citygate::store::{SledStore, Store, StoreOptions};
    use citygate::supervisor::{self, KeyMaterial};

    let dep = Deployment::new();
    let cfg = dep.config(&["active_power", "voltage_l1"], devices, shipped_profiles());
    let keys = KeyMaterial::load(&cfg.keys).unwrap();
    let policy = cfg.policies.flows[0]
        .policy
        .with_key(keys.pseudonym.clone());
    let store: Arc<dyn Store> =
        Arc::new(SledStore::open(&cfg.store.path, StoreOptions::default()).unwrap());
    let running = supervisor::start(&cfg, keys, store.clone());
    let metrics = running.metrics.clone();
    let enough = wait_for(Duration::from_secs(20), || {
        metrics.batches_committed.get() >= batches
    })
    .await;
    assert!(enough, "{} batches", metrics.batches_committed.get());
    assert!(running.shutdown(Duration::from_secs(10)).await);

    let subjects: HashMap<String, u8> = units
        .map(|u| {
            (
                policy.subject(&DeviceId::new(format!("{prefix}{u}")).unwrap()),
                u,
            )
        })
        .collect();
    let p = profile();
    let mut checked = 0;
    for batch in open_all(store.as_ref(), &dep.opener(&cfg.gateway_id)) {
        for rec in &batch.records {
            let unit = subjects[&rec.subject];
            let field = p.field(&rec.field).unwrap();
            let v = rec.value.as_f64().unwrap();
            let served = meters
                .history(UnitId(unit))
                .iter()
                .filter_map(|s| s.values.get(&field.name).copied())
                .any(|eng| same_value(eng, field.unit.factor, v));
            assert!(served, "{prefix}{unit} {} = {v} never served", rec.field);
            checked += 1;
        }
    }
    (checked, metrics)
}

/// RTU over TCP through the whole gateway: the opened records carry values the
/// simulator served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtu_over_tcp_through_the_gateway_into_sealed_batches() {
    let meters = SimMeters::new(profile(), 3, 17);
    let token = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    tokio::spawn(citygate::sim::serve_rtu_tcp(
        listener,
        RtuSim::new(meters.clone()),
        token.clone(),
    ));
    let devices: String = (1..=3u8)
        .map(|u| {
            crate::support::transport_device(
                &format!("m{u}"),
                PROFILE,
                &format!("type = \"rtu_tcp\", address = \"{address}\", baud = 19200"),
                u,
                "200ms",
            )
        })
        .collect();
    let (checked, metrics) =
        gateway_records_match_the_meters(&meters, &devices, "m", 1..=3, 4).await;
    token.cancel();
    assert!(checked >= 12, "{checked}");
    for u in 1..=3u8 {
        let s = metrics.device(&DeviceId::new(format!("m{u}")).unwrap());
        assert!(s.polls_ok >= 2 && s.timeouts == 0, "m{u}: {s:?}");
    }
}

/// A DTU dialling in to the gateway's listener, through the whole gateway into
/// sealed batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dtu_dial_in_through_the_gateway_into_sealed_batches() {
    // The gateway binds the configured address itself: reserve a loopback port for it.
    let (_reserved, listen) = crate::support::reserve_port();
    let listen = listen.to_string();
    let id = "865000999888777";
    let meters = SimMeters::new(profile(), 2, 18);
    let token = CancellationToken::new();
    tokio::spawn(citygate::sim::dial_dtu(
        listen.clone(),
        id.to_string(),
        Duration::from_millis(50),
        RtuSim::new(meters.clone()),
        token.clone(),
    ));
    let devices: String = (1..=2u8)
        .map(|u| {
            crate::support::transport_device(
                &format!("d{u}"),
                PROFILE,
                &format!("type = \"dtu\", id = \"{id}\", listen = \"{listen}\""),
                u,
                "200ms",
            )
        })
        .collect();
    let (checked, _) = gateway_records_match_the_meters(&meters, &devices, "d", 1..=2, 3).await;
    token.cancel();
    assert!(checked >= 8, "{checked}");
}

/// A TCP proxy to `upstream` that writes every chunk the server sends twice (a serial
/// server or DTU that repeats replies). Returns its address.
async fn duplicating_proxy(upstream: String, token: CancellationToken) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let (client, _) = tokio::select! {
                () = token.cancelled() => return,
                r = listener.accept() => r.unwrap(),
            };
            let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                continue;
            };
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut cr, &mut sw).await;
            });
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = sr.read(&mut buf).await {
                    if n == 0
                        || cw.write_all(&buf[..n]).await.is_err()
                        || cw.write_all(&buf[..n]).await.is_err()
                    {
                        break;
                    }
                }
            });
        }
    });
    address
}

/// Issue 9 item 12: a Modbus TCP endpoint whose every reply arrives twice. The stale
/// copies are discarded, every poll counts as answered, and the records reach the
/// batches with the values the meters served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_modbus_tcp_replies_are_discarded_and_polls_count_ok() {
    let meters = SimMeters::new(profile(), 2, 19);
    let token = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap().to_string();
    tokio::spawn(citygate::sim::serve(
        listener,
        meters.clone(),
        token.clone(),
    ));
    let address = duplicating_proxy(upstream, token.clone()).await;
    let devices: String = (1..=2u8)
        .map(|u| {
            crate::support::transport_device(
                &format!("t{u}"),
                PROFILE,
                &format!("type = \"tcp\", address = \"{address}\""),
                u,
                "200ms",
            )
        })
        .collect();
    let (checked, metrics) =
        gateway_records_match_the_meters(&meters, &devices, "t", 1..=2, 3).await;
    token.cancel();
    assert!(checked >= 8, "{checked}");
    for u in 1..=2u8 {
        let s = metrics.device(&DeviceId::new(format!("t{u}")).unwrap());
        assert!(
            s.polls_ok >= 2 && s.transport_errors == 0 && s.timeouts == 0,
            "t{u}: {s:?}"
        );
    }
    assert!(metrics.modbus_stale_replies.get() >= 4);
}

/// Issue 9 item 12 over RTU: a serial server that repeats every reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_rtu_replies_are_discarded_and_polls_count_ok() {
    let meters = SimMeters::new(profile(), 2, 20);
    let token = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap().to_string();
    tokio::spawn(citygate::sim::serve_rtu_tcp(
        listener,
        RtuSim::new(meters.clone()),
        token.clone(),
    ));
    let address = duplicating_proxy(upstream, token.clone()).await;
    let devices: String = (1..=2u8)
        .map(|u| {
            crate::support::transport_device(
                &format!("r{u}"),
                PROFILE,
                &format!("type = \"rtu_tcp\", address = \"{address}\", baud = 19200"),
                u,
                "200ms",
            )
        })
        .collect();
    let (checked, metrics) =
        gateway_records_match_the_meters(&meters, &devices, "r", 1..=2, 3).await;
    token.cancel();
    assert!(checked >= 8, "{checked}");
    for u in 1..=2u8 {
        let s = metrics.device(&DeviceId::new(format!("r{u}")).unwrap());
        assert!(
            s.polls_ok >= 2 && s.transport_errors == 0 && s.timeouts == 0,
            "r{u}: {s:?}"
        );
    }
}

/// A DTU listener on a fresh loopback port for `id`, counting into its own metrics;
/// returns the address, the bus's link, and the metrics.
async fn dtu_listener(
    id: &str,
    allow: Vec<citygate::config::PeerNet>,
    token: &CancellationToken,
) -> (String, Link, Arc<Metrics>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let metrics = Arc::new(Metrics::default());
    let (dtu, mut sessions) = DtuListener::new(address.clone(), [id.to_string()], token.clone());
    let dtu = dtu.with_allow(allow).with_metrics(metrics.clone());
    tokio::spawn(dtu.serve(listener));
    let link = Link::Dtu {
        id: id.to_string(),
        sessions: sessions.remove(id).unwrap(),
    };
    (address, link, metrics)
}

fn dtu_transport(id: &str, listen: &str) -> Transport {
    Transport::Dtu {
        id: id.to_string(),
        listen: listen.to_string(),
        heartbeat: None,
        line: LineOverride::default(),
        allow: Vec::new(),
    }
}

/// Issue 9 item 10: an impostor that registers a live DTU's id is refused and closed;
/// the real DTU keeps its connection and only its meter's values arrive. Once the real
/// DTU hangs up, the next registration of the id is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_dtu_keeps_its_connection_when_an_impostor_registers_its_id() {
    let id = "865000444555666";
    let token = CancellationToken::new();
    let (address, link, listener_metrics) = dtu_listener(id, Vec::new(), &token).await;
    let real = SimMeters::new(profile(), 1, 21);
    let real_token = CancellationToken::new();
    tokio::spawn(citygate::sim::dial_dtu(
        address.clone(),
        id.to_string(),
        Duration::from_millis(30),
        RtuSim::new(real.clone()),
        real_token.clone(),
    ));
    let devs = devices(
        1,
        &dtu_transport(id, &address),
        Duration::from_millis(100),
        Duration::from_millis(300),
    );
    let mut bus = start_bus(link, &line(9600), devs, vec![id.as_bytes().to_vec()]);
    let m1 = DeviceId::new("m1").unwrap();
    until_polled(&bus.metrics, std::slice::from_ref(&m1), 3).await;

    // The impostor dials the same id (and retries every second when closed).
    let impostor = SimMeters::new(profile(), 1, 22);
    let impostor_token = CancellationToken::new();
    tokio::spawn(citygate::sim::dial_dtu(
        address.clone(),
        id.to_string(),
        Duration::from_millis(30),
        RtuSim::new(impostor.clone()),
        impostor_token.clone(),
    ));
    let refused = crate::support::wait_for(Duration::from_secs(20), || {
        listener_metrics.dtu_registrations_refused.get() >= 2
    })
    .await;
    assert!(refused, "the impostor was not refused twice");
    let polled = bus.metrics.device(&m1).polls_ok;
    until_polled(&bus.metrics, std::slice::from_ref(&m1), polled + 3).await;
    assert!(
        impostor.history(UnitId(1)).is_empty(),
        "the impostor's meter was polled"
    );
    let mut before = Vec::new();
    while let Ok(s) = bus.samples_rx.try_recv() {
        before.push(s);
    }
    let served = Served::of(&real, 1);
    assert!(before.len() >= 6, "{}", before.len());
    assert!(before.iter().all(|s| served.matches(s, 1)));

    // The real DTU hangs up: the id's next registration (the retrying dialler) is taken.
    real_token.cancel();
    let taken = crate::support::wait_for(Duration::from_secs(20), || {
        !impostor.history(UnitId(1)).is_empty()
    })
    .await;
    assert!(taken, "no registration accepted after the live DTU hung up");
    assert_eq!(listener_metrics.dtu_peer_changed.get(), 0);
    impostor_token.cancel();
    bus.stop().await;
    token.cancel();
}

/// Issue 9 item 10: a DTU listener with an allow list closes connections from other
/// networks before reading the registration, and counts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dtu_allow_list_refuses_peers_from_other_networks() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let id = "865000777888999";
    let token = CancellationToken::new();
    let elsewhere = vec!["10.0.0.0/8".parse().unwrap()];
    let (address, link, metrics) = dtu_listener(id, elsewhere, &token).await;
    let Link::Dtu { mut sessions, .. } = link else {
        unreachable!()
    };
    let mut s = tokio::net::TcpStream::connect(&address).await.unwrap();
    let _ = s.write_all(id.as_bytes()).await;
    let mut b = [0u8; 8];
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    assert_eq!(metrics.dtu_peers_refused.get(), 1);
    assert!(sessions.newer().is_none());

    let loopback = vec!["127.0.0.0/8".parse().unwrap()];
    let (address, link, metrics) = dtu_listener(id, loopback, &token).await;
    let Link::Dtu { mut sessions, .. } = link else {
        unreachable!()
    };
    let mut s = tokio::net::TcpStream::connect(&address).await.unwrap();
    s.write_all(id.as_bytes()).await.unwrap();
    let accepted = tokio::time::timeout(Duration::from_secs(5), sessions.next()).await;
    assert!(matches!(accepted, Ok(Ok(_))), "not accepted");
    assert_eq!(metrics.dtu_peers_refused.get(), 0);
    token.cancel();
}
