//! Emergency collection (issue 11 item 7) end to end: MQTT water meters → gateway with a
//! daily billing-like flow and an emergency policy → embedded broker → hub. The order comes
//! from the real `citygate emergency` command; the gateway runs in process so the test can
//! read its counters.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use citygate::emergency::{self, Order, Progress};
use citygate::reading::Stream;

use crate::mqtt_rig::{publish, water_payload, MqttRig};
use crate::support::*;

/// A flow that lets nothing out while the test runs (a daily mean) and an emergency policy
/// passing each meter's flow rate as it comes.
fn write_policies(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let head = |name: &str| {
        format!(
            "[purpose]\nname = \"{name}\"\ndescription = \"test\"\nlegal_basis = \"test\"\n\
             owner = \"test\"\nretention = \"1d\"\n\n"
        )
    };
    std::fs::write(
        dir.join("daily.toml"),
        head("daily")
            + "[[rule]]\nfield = \"flow_rate\"\naction = \"aggregate\"\nfunction = \"mean\"\nwindow = \"1d\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("burst.toml"),
        head("burst")
            + "[[rule]]\nfield = \"flow_rate\"\naction = \"pass\"\n\
               override_reason = \"burst main: per-meter flow while the emergency lasts\"\n",
    )
    .unwrap();
}

fn citygate(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_citygate"))
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn tag<'a>(line: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    line["tags"]
        .as_array()?
        .iter()
        .filter_map(|t| t.as_str())
        .find_map(|t| t.strip_prefix(key)?.strip_prefix('='))
}

fn count(line: &serde_json::Value, key: &str) -> u64 {
    tag(line, key)
        .unwrap_or_else(|| panic!("no {key} in {line}"))
        .parse()
        .unwrap()
}

struct Run {
    rig: MqttRig,
    cfg: citygate::config::GatewayConfig,
    config: std::path::PathBuf,
}

fn setup() -> Run {
    let rig = MqttRig::new();
    let dir = rig.dep.path().join("policies");
    write_policies(&dir);
    let toml = rig
        .toml(&dir, &["daily"], &["W0001", "W0002"])
        .shipped_profiles()
        .emergency(&["burst"]);
    let cfg = rig.dep.load_config(&toml, shipped_profiles());
    let config = rig.dep.path().join("gateway.toml");
    Run { rig, cfg, config }
}

/// `citygate emergency start` of the `burst` policy for gateway config `config`.
fn order_burst(config: &Path, reason: &str, duration: &str) -> (bool, String) {
    let config = config.to_str().unwrap();
    citygate(&[
        "emergency",
        "start",
        "--config",
        config,
        "--policy",
        "burst",
        "--reason",
        reason,
        "--for",
        duration,
    ])
}

/// `citygate emergency stop|status` for gateway config `config`.
fn emergency(config: &Path, command: &str) -> (bool, String) {
    citygate(&["emergency", command, "--config", config.to_str().unwrap()])
}

/// A running gateway with its uplink, a hub approving the stamps `approve` keeps, and a
/// meters' link, on `run`'s rig.
struct Live {
    hub: citygate::hub::HubProcess,
    store: std::sync::Arc<dyn citygate::store::Store>,
    running: citygate::supervisor::Running,
    metrics: std::sync::Arc<citygate::telemetry::Metrics>,
    uplink: citygate::supervisor::UplinkHandle,
    link: citygate::mqtt::MqttLink,
}

impl Live {
    async fn start(run: &Run, approve: impl Fn(&citygate::seal::PolicyStamp) -> bool) -> Live {
        let approved: Vec<_> = citygate::supervisor::policy_stamps(&run.cfg)
            .into_iter()
            .map(|(_, s)| s)
            .filter(|s| approve(s))
            .collect();
        let (rig, cfg) = (&run.rig, &run.cfg);
        let hub = start_hub_approving(rig.dep.path(), &rig.ca, rig.port, &approved).await;
        let (store, running) = start_gateway(cfg);
        let metrics = running.metrics.clone();
        let uplink =
            start_uplink(cfg, &running, &rig.ca, rig.port, 8, Duration::from_secs(3)).await;
        let link = rig.meters_link(&metrics).await;
        Live {
            hub,
            store,
            running,
            metrics,
            uplink,
            link,
        }
    }

    /// Stops everything; the gateway must stop clean.
    async fn finish(self, run: Run) {
        assert!(self.running.shutdown(Duration::from_secs(10)).await);
        self.uplink.finish(Duration::from_secs(5)).await;
        self.hub.shutdown().await;
        run.rig.broker.shutdown();
    }
}

/// Publishes readings of both meters, one every 200 ms, until `done` or 30 s.
async fn publish_until(link: &citygate::mqtt::MqttLink, mut done: impl FnMut() -> bool) -> bool {
    for i in 0..150 {
        if done() {
            return true;
        }
        let at = citygate::reading::now_ms();
        for key in ["W0001", "W0002"] {
            let flow = 1.0 + f64::from(i) / 8.0;
            publish(
                link,
                &format!("water/{key}/up"),
                water_payload(key, 100.0 + f64::from(i), flow, at),
            )
            .await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    done()
}

/// issue 11 item 7: `citygate emergency start` raises the resolution (each meter's flow rate
/// reaches the hub as it comes, tagged `emergency` and `emergency_id`, where the standing
/// flow sends nothing), the collection ends by itself at its expiry, and an
/// `emergency_ended` report accounts for every batch it produced; nothing of it is left in
/// the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emergency_raises_resolution_ends_by_itself_and_reports() {
    let run = setup();
    assert!(citygate::supervisor::policy_stamps(&run.cfg)
        .iter()
        .any(|(_, s)| s.purpose.as_str() == "burst"));
    let live = Live::start(&run, |_| true).await;
    let (rig, cfg, config) = (&run.rig, &run.cfg, &run.config);
    let (store, metrics, link, hub) = (&live.store, &live.metrics, &live.link, &live.hub);

    let (ok, out) = order_burst(config, "burst main on Elm Street", "4s");
    assert!(ok, "{out}");
    let order: Order = emergency::read(&emergency::order_path(&cfg.store.path))
        .unwrap()
        .unwrap();
    assert!(out.contains(&order.id), "{out}");
    assert_eq!(order.expires_ms - order.started_ms, 4_000);
    // A second order while this one runs is refused.
    let (ok, out) = order_burst(config, "again", "1h");
    assert!(!ok && out.contains("is active until"), "{out}");

    let tagged = |l: &serde_json::Value| tag(l, "emergency_id") == Some(order.id.as_str());
    let ended = |l: &serde_json::Value| l["field"] == "emergency_ended" && tagged(l);
    assert!(
        publish_until(link, || rig.sink().iter().any(ended)).await,
        "no emergency_ended report at the hub; status {:?}; hub {:?}",
        metrics.emergency(),
        hub.hub().stats()
    );
    assert_eq!(metrics.emergency(), None, "ended by itself");
    let lines = rig.sink();
    let data: Vec<_> = lines
        .iter()
        .filter(|l| tagged(l) && l["field"] == "flow_rate")
        .collect();
    assert!(
        data.len() >= 2,
        "per-meter readings during the emergency: {}",
        data.len()
    );
    for l in &data {
        assert!(l["window"].is_null(), "as it came, not aggregated: {l}");
        assert_eq!(l["purpose"], "burst", "{l}");
        assert_eq!(l["stream"], "readings-7", "{l}");
        assert_eq!(
            l["emergency_id"],
            order.id.as_str(),
            "the hub marks it: {l}"
        );
        assert!(
            l["subject"].as_str().unwrap().starts_with("p-"),
            "pseudonymous: {l}"
        );
        assert!(
            l["tags"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t == "emergency"),
            "{l}"
        );
    }
    let subjects: std::collections::BTreeSet<_> =
        data.iter().map(|l| l["subject"].to_string()).collect();
    assert_eq!(subjects.len(), 2, "both meters");
    assert!(
        !lines
            .iter()
            .any(|l| l["field"] == "flow_rate" && !tagged(l)),
        "outside the emergency the flow rate leaves only as a daily mean"
    );
    let started = lines
        .iter()
        .find(|l| l["field"] == "emergency_started" && tagged(l))
        .expect("an emergency_started report");
    assert_eq!(tag(started, "reason"), Some("burst main on Elm Street"));
    assert_eq!(tag(started, "policy"), Some("burst"));
    let report = lines.iter().find(|l| ended(l)).unwrap();
    assert_eq!(tag(report, "end"), Some("expired"));
    let produced = count(report, "produced_batches");
    assert!(produced >= 1, "{report}");
    assert_eq!(
        count(report, "delivered_batches")
            + count(report, "purged_batches")
            + count(report, "evicted_batches"),
        produced,
        "every batch is accounted for: {report}"
    );
    assert_eq!(
        store.stats().get(Stream::EMERGENCY).batches,
        0,
        "nothing of it left on the box"
    );
    let progress: Progress = emergency::read(&emergency::progress_path(&cfg.store.path))
        .unwrap()
        .unwrap();
    assert_eq!(progress.id, order.id);
    assert_eq!(progress.report.as_ref().unwrap().produced_batches, produced);
    assert_eq!(metrics.emergencies_started.get(), 1);
    assert_eq!(metrics.emergencies_ended.get(), 1);
    let (ok, out) = emergency(config, "status");
    assert!(ok && out.contains("ended (expired)"), "{out}");

    live.finish(run).await;
}

/// issue 11 item 7: batches the hub has not acknowledged when an emergency is stopped are
/// destroyed on the box, and the report says so (here the hub never approved the emergency
/// policy, so it acknowledges none of them; the report itself, the gateway's own record,
/// is accepted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_an_emergency_purges_what_the_hub_has_not_acknowledged() {
    let run = setup();
    let live = Live::start(&run, |s| s.purpose.as_str() != "burst").await;
    let (rig, cfg, config) = (&run.rig, &run.cfg, &run.config);
    let (store, metrics, link) = (&live.store, &live.metrics, &live.link);

    let (ok, out) = order_burst(config, "flood", "1h");
    assert!(ok, "{out}");
    assert!(
        publish_until(link, || store.stats().get(Stream::EMERGENCY).batches >= 2).await,
        "emergency batches never reached the store"
    );
    let (ok, out) = emergency(config, "stop");
    assert!(ok, "{out}");
    let order: Order = emergency::read(&emergency::order_path(&cfg.store.path))
        .unwrap()
        .unwrap();
    let ended = |l: &serde_json::Value| {
        l["field"] == "emergency_ended" && tag(l, "emergency_id") == Some(order.id.as_str())
    };
    assert!(
        wait_for(Duration::from_secs(30), || rig.sink().iter().any(ended)).await,
        "no emergency_ended report at the hub"
    );
    let lines = rig.sink();
    let report = lines.iter().find(|l| ended(l)).unwrap();
    assert_eq!(tag(report, "end"), Some("stopped"));
    let produced = count(report, "produced_batches");
    assert!(produced >= 2, "{report}");
    assert_eq!(count(report, "delivered_batches"), 0, "{report}");
    assert_eq!(
        count(report, "purged_batches") + count(report, "evicted_batches"),
        produced,
        "{report}"
    );
    assert_eq!(
        report["value"].as_i64(),
        Some(count(report, "purged_batches") as i64)
    );
    assert!(
        !lines.iter().any(|l| l["stream"] == "readings-7"),
        "the hub refused them all"
    );
    let st = store.stats();
    assert_eq!(st.get(Stream::EMERGENCY).batches, 0);
    assert_eq!(
        st.get(Stream::EMERGENCY).purged_batches,
        count(report, "purged_batches")
    );
    assert_eq!(
        metrics.emergency_batches_purged.get(),
        count(report, "purged_batches")
    );
    let (ok, out) = emergency(config, "stop");
    assert!(
        !ok && out.contains("no emergency collection is active"),
        "{out}"
    );

    live.finish(run).await;
}

/// issue 11 item 7 ("also across restarts, never extended by one"): a gateway restarted
/// while its emergency is active resumes it with the same id and the same end; one restarted
/// after the end ends it at start: purges what the collection left in the store and reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_an_active_emergency_unchanged_and_ends_an_expired_one() {
    let Run { rig, cfg, config } = setup();
    let (ok, out) = order_burst(&config, "storm", "1h");
    assert!(ok, "{out}");
    let order_path = emergency::order_path(&cfg.store.path);
    let order: Order = emergency::read(&order_path).unwrap().unwrap();

    // First run: the collection starts and produces batches (no uplink: they stay).
    let (store, running) = start_gateway(&cfg);
    let metrics = running.metrics.clone();
    let link = rig.meters_link(&metrics).await;
    assert!(
        publish_until(&link, || store.stats().get(Stream::EMERGENCY).batches >= 1).await,
        "emergency batches never reached the store"
    );
    let first = metrics.emergency().expect("active");
    assert_eq!(
        (first.id.as_str(), first.ends_ms),
        (order.id.as_str(), order.expires_ms)
    );
    assert!(running.shutdown(Duration::from_secs(10)).await);
    drop(store);

    // Second run, still within the hour: resumed, same id and end, not counted as a new start.
    let (store, running) = start_gateway_retrying(&cfg).await;
    let metrics = running.metrics.clone();
    assert!(
        wait_for(Duration::from_secs(20), || metrics.emergency().is_some()).await,
        "not resumed"
    );
    assert_eq!(
        metrics.emergency(),
        Some(first.clone()),
        "same id, same end"
    );
    assert_eq!(
        metrics.emergencies_started.get(),
        0,
        "resumed, not started again"
    );
    assert!(running.shutdown(Duration::from_secs(10)).await);
    let held = store.stats().get(Stream::EMERGENCY).batches;
    assert!(held >= 1);
    drop(store);

    // The hour passes while the gateway is down (the order's end moved to the past).
    let mut over = order.clone();
    over.expires_ms = citygate::reading::now_ms() - 1;
    emergency::write(&order_path, &over).unwrap();
    let (store, running) = start_gateway_retrying(&cfg).await;
    let metrics = running.metrics.clone();
    assert!(
        wait_for(Duration::from_secs(20), || metrics.emergencies_ended.get()
            == 1)
        .await,
        "an emergency that expired while the gateway was down is ended at start"
    );
    assert_eq!(metrics.emergency(), None, "not resumed past its end");
    assert_eq!(store.stats().get(Stream::EMERGENCY).batches, 0);
    assert_eq!(metrics.emergency_batches_purged.get(), held);
    let progress: Progress = emergency::read(&emergency::progress_path(&cfg.store.path))
        .unwrap()
        .unwrap();
    let report = progress.report.expect("reported");
    assert_eq!(report.end, "expired");
    assert_eq!(report.purged_batches, held);
    assert_eq!(report.delivered_batches, 0);
    assert!(running.shutdown(Duration::from_secs(10)).await);
    // The report was sealed into the alarms stream for the hub.
    let opener = rig.dep.opener(&cfg.gateway_id);
    let records: Vec<_> = open_all(store.as_ref(), &opener)
        .into_iter()
        .filter(|b| b.header.stream == Stream::Alarms)
        .flat_map(|b| b.records)
        .filter(|r| r.field == "emergency_ended")
        .collect();
    assert_eq!(records.len(), 1, "{records:?}");
    assert!(records[0]
        .tags
        .contains(&format!("emergency_id={}", order.id)));
    assert!(records[0].tags.contains(&format!("purged_batches={held}")));
    rig.broker.shutdown();
}

/// [`start_gateway`] on a store this process just closed (sled lets go of its lock shortly
/// after the last handle drops).
async fn start_gateway_retrying(
    cfg: &citygate::config::GatewayConfig,
) -> (
    std::sync::Arc<dyn citygate::store::Store>,
    citygate::supervisor::Running,
) {
    for _ in 0..100 {
        let opened = citygate::store::SledStore::open(
            &cfg.store.path,
            citygate::store::StoreOptions::default(),
        );
        if let Ok(s) = opened {
            let store: std::sync::Arc<dyn citygate::store::Store> = std::sync::Arc::new(s);
            let keys = citygate::supervisor::KeyMaterial::load(&cfg.keys).unwrap();
            let running = citygate::supervisor::start(cfg, keys, store.clone());
            return (store, running);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("store still locked");
}
