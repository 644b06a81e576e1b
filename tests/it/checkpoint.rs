//! Aggregate windows survive a crash (issue 11, "SIGKILL loses nothing"): a real `citygate
//! run` process folds MQTT meter samples into a daily window, is SIGKILLed after a
//! checkpoint, restarts and folds more; what it seals at its clean stop covers every sample
//! of both runs, and the counter's delta counts the increment across the kill.

use std::time::Duration;

use citygate::reading::Stream;
use citygate::store::{SledStore, Store, StoreOptions};

use crate::mqtt_rig::{publish, water_payload, MqttRig};
use crate::support::*;

/// Readings one water meter message of [`water_payload`] decodes to (meter id, volume, flow).
const READINGS_PER_MESSAGE: u64 = 3;

async fn counters(status: std::net::SocketAddr) -> std::collections::BTreeMap<String, u64> {
    let (_, body) = citygate::telemetry::http::get(status, "/status", Duration::from_secs(5))
        .await
        .unwrap();
    let st: citygate::status::GatewayStatus = serde_json::from_str(&body).unwrap();
    st.counters
}

/// Waits (bounded) until counter `name` of the gateway at `status` reaches `at_least`.
async fn counter_reaches(status: std::net::SocketAddr, name: &str, at_least: u64) -> bool {
    for _ in 0..300 {
        if counters(status).await.get(name).copied().unwrap_or(0) >= at_least {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// A meters' link whose messages the running gateway at `status` receives: warm-up
/// messages for a key no device has until one arrived.
async fn meters_link(rig: &MqttRig, status: std::net::SocketAddr) -> citygate::mqtt::MqttLink {
    let tls = citygate::mqtt::LinkTls::Files(
        rig.ca.client_files(&rig.ca.issue_client("meters").unwrap()),
    );
    let (link, mut events) =
        citygate::mqtt::MqttLink::start(test_link_options(rig.port, "meters", tls)).unwrap();
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    for _ in 0..300 {
        if counters(status)
            .await
            .get("mqtt_messages")
            .copied()
            .unwrap_or(0)
            >= 1
        {
            return link;
        }
        let at = citygate::reading::now_ms();
        publish(
            &link,
            "water/W0999/up",
            water_payload("W0999", 1.0, 0.0, at),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the gateway never received a meter message");
}

/// issue 11 (open aggregate windows survive a crash): see the module docs. Without the
/// checkpoint the final window would cover only the second run's samples.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_loses_no_aggregate_window() {
    let rig = MqttRig::new();
    let dir = rig.dep.path().join("policies");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("daily.toml"),
        "[purpose]\nname = \"daily\"\ndescription = \"daily flow and volume\"\n\
         legal_basis = \"test\"\nowner = \"test\"\nretention = \"1d\"\n\n\
         [[rule]]\nfield = \"flow_rate\"\naction = \"aggregate\"\nfunction = \"mean\"\nwindow = \"1d\"\n\n\
         [[rule]]\nfield = \"volume_forward\"\naction = \"aggregate\"\nfunction = \"delta\"\nwindow = \"1d\"\n",
    )
    .unwrap();
    let toml = rig
        .toml(&dir, &["daily"], &["W0001"])
        .shipped_profiles()
        .status()
        .batch("max_age = \"200ms\"\ncheckpoint_every = \"200ms\"");
    let cfg = rig.dep.load_config(&toml, shipped_profiles());
    let config = rig.dep.path().join("gateway.toml");
    let store_path = cfg.store.path.clone();
    // Samples one second apart from just after the start of today (UTC), in one daily window.
    let day = citygate::reading::now_ms() / 86_400_000 * 86_400_000;
    let at = |i: usize| day + 60_000 + i as i64 * 1000;
    let flows: Vec<f64> = (0..10).map(|i| 0.5 + f64::from(i) * 0.25).collect();
    let totals: Vec<f64> = (0..10).map(|i| 100.0 + f64::from(i * i)).collect();

    // First run: six samples, then a checkpoint, then SIGKILL.
    let mut first = spawn_run(&config);
    let status = status_address(&store_path).await;
    let link = meters_link(&rig, status).await;
    let before = counters(status).await["mqtt_messages"];
    for i in 0..6 {
        publish(
            &link,
            "water/W0001/up",
            water_payload("W0001", totals[i], flows[i], at(i)),
        )
        .await;
    }
    assert!(counter_reaches(status, "mqtt_messages", before + 6).await);
    // Each message is READINGS_PER_MESSAGE readings; the kill comes once a checkpoint covers
    // all six messages' (and only these messages make readings).
    assert!(
        counter_reaches(status, "readings_checkpointed", 6 * READINGS_PER_MESSAGE).await,
        "a checkpoint after the samples: {:?}",
        counters(status).await
    );
    assert_eq!(
        counters(status).await["readings_normalised"],
        6 * READINGS_PER_MESSAGE
    );
    signal(&first, "-KILL");
    assert!(!wait_exit(&mut first, Duration::from_secs(10))
        .await
        .success());
    drop(link);
    // The killed run's status address is stale: wait for the new one.
    std::fs::remove_file(store_path.with_file_name("store.status-addr")).unwrap();

    // Second run: four more samples, then a clean stop (open windows leave, partial).
    let mut second = spawn_run(&config);
    let status = status_address(&store_path).await;
    let link = meters_link(&rig, status).await;
    let before = counters(status).await["mqtt_messages"];
    for i in 6..10 {
        publish(
            &link,
            "water/W0001/up",
            water_payload("W0001", totals[i], flows[i], at(i)),
        )
        .await;
    }
    assert!(counter_reaches(status, "mqtt_messages", before + 4).await);
    signal(&second, "-TERM");
    assert!(wait_exit(&mut second, Duration::from_secs(20))
        .await
        .success());

    let store = SledStore::open(&store_path, StoreOptions::default()).unwrap();
    let opener = rig.dep.opener(&cfg.gateway_id);
    let records: Vec<_> = open_all(&store, &opener)
        .into_iter()
        .filter(|b| b.header.stream == Stream::Readings)
        .flat_map(|b| b.records)
        .filter(|r| r.window.is_some())
        .collect();
    let flow: Vec<_> = records.iter().filter(|r| r.field == "flow_rate").collect();
    let volume: Vec<_> = records
        .iter()
        .filter(|r| r.field == "volume_forward")
        .collect();
    assert_eq!((flow.len(), volume.len()), (1, 1), "{records:#?}");
    assert_eq!(
        flow[0].window.as_ref().unwrap().samples,
        10,
        "both runs' samples"
    );
    let mean = flows.iter().sum::<f64>() / 10.0;
    assert!(
        (flow[0].value.as_f64().unwrap() - mean).abs() < 1e-9,
        "{:?}",
        flow[0]
    );
    assert_eq!(volume[0].window.as_ref().unwrap().samples, 10);
    let delta = totals[9] - totals[0];
    assert!(
        (volume[0].value.as_f64().unwrap() - delta).abs() < 1e-9,
        "the increment across the kill counts (m3): {:?}",
        volume[0]
    );
    assert!(store.checkpoint().unwrap().is_some());
    rig.broker.shutdown();
}
