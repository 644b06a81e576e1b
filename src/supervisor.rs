//! Wires the gateway's tasks together and shuts them down in order.
//!
//! ```text
//! ModbusPoller (one per endpoint)      ─┐
//! RtuBus (one per bus / DTU)            ─┼samples─► Batcher ─sealed─► Committer ─► Outbox
//! MqttSubscriber (one per mqtt_source)  ─┘
//! ```
//! Shutdown: the cancellation token stops the pollers; their sample senders drop, so
//! the batcher drains its input, seals every open batch and drops its sender; the
//! committer commits what it received and exits. [`Running::shutdown`] waits for all
//! of it within a grace period.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, info_span, warn, Instrument};

use crate::config::{DeviceConfig, DeviceKind, GatewayConfig, KeyPaths, Transport};
use crate::mqtt::{LinkError, LinkOptions, MqttLink};
use crate::pipeline::{
    Batcher, CommittedMarks, Committer, SAMPLES_CHANNEL_CAPACITY, SEALED_CHANNEL_CAPACITY,
};
use crate::reading::{PurposeName, Stream};
use crate::seal::keys;
use crate::seal::{HubPublicKey, KeyError};
use crate::seal::{PolicyStamp, Sealer};
use crate::source::modbus::ModbusPoller;
use crate::source::mqtt::MqttSubscriber;
use crate::source::{GatewayAlarms, SourceContext};

/// Gateway alarm records queued towards the batcher; more at once are dropped (their log
/// lines and counters remain).
const GATEWAY_ALARMS_CAPACITY: usize = 64;
use crate::seal::PseudonymKey;
use crate::store::{Outbox, StoreStats};
use crate::telemetry::Metrics;
use crate::uplink::{Forwarder, ForwarderOptions};
use crate::wire::AckVerifier;

/// The secrets and public keys a gateway runs with.
#[derive(Debug, Clone)]
pub struct KeyMaterial {
    pub signing: ed25519_dalek::SigningKey,
    pub hub: HubPublicKey,
    pub pseudonym: PseudonymKey,
    /// Verifies the hub's acks before anything is deleted.
    pub hub_ack: ed25519_dalek::VerifyingKey,
}

impl KeyMaterial {
    /// Loads the key files, checking types and permissions.
    pub fn load(paths: &KeyPaths) -> Result<Self, KeyError> {
        Ok(Self {
            signing: keys::load_signing_key(&paths.signing_key)?,
            hub: keys::load_hub_public_key(&paths.hub_public_key)?,
            pseudonym: keys::load_pseudonym_key(&paths.pseudonym_key)?,
            hub_ack: keys::load_hub_ack_verifying_key(&paths.hub_ack_key)?,
        })
    }
}

/// The stamps the hub must approve for this gateway, one per purpose flow (the alarms
/// policy's last): the stream, and the purpose name with the policy hash. They follow from
/// the config and the profiles alone — no key is involved — so `citygate check` prints them.
pub fn policy_stamps(cfg: &GatewayConfig) -> Vec<(Stream, PolicyStamp)> {
    stamped_flows(cfg)
        .into_iter()
        .map(|(f, stamp)| (f.stream, stamp))
        .collect()
}

/// Every flow of `cfg` with the stamp its batches are sealed under ([`policy_stamps`]).
pub fn stamped_flows(cfg: &GatewayConfig) -> Vec<(&crate::config::FlowConfig, PolicyStamp)> {
    let versions = cfg.profile_versions();
    cfg.policies
        .all()
        .map(|f| {
            let purpose = PurposeName::new(f.policy.name())
                .expect("invariant: a compiled policy has a valid purpose name");
            (f, PolicyStamp::new(purpose, f.policy.hash(&versions)))
        })
        .collect()
}

/// The `policies = [...]` value of a hub's `[[gateway]]` entry approving `stamps`.
pub fn approval_toml(stamps: &[(Stream, PolicyStamp)]) -> String {
    let mut entries: Vec<String> = Vec::new();
    for (_, s) in stamps {
        let entry = format!(
            "{{ purpose = \"{}\", hash = \"{}\" }}",
            s.purpose,
            s.hash_hex()
        );
        // A legacy [purpose] seals readings and alarms under one stamp: approve it once.
        if !entries.contains(&entry) {
            entries.push(entry);
        }
    }
    format!("[{}]", entries.join(", "))
}

/// The first sequence number to use on a stream whose store says `store_next`.
///
/// Sequence numbers count within the store's incarnation (a random id made with the store and
/// carried in every envelope header); the hub de-duplicates on (gateway, stream, incarnation,
/// seq). A new store (a new box, or one moved aside after corruption) is a new incarnation, so
/// its streams start again at 1 without colliding with anything an earlier store sent, and no
/// wall clock is involved: a clock that is wrong when a store is created costs nothing.
pub(crate) fn first_seq(store_next: u64) -> u64 {
    store_next.max(1)
}

/// A started gateway.
#[derive(Debug)]
pub struct Running {
    pub metrics: Arc<Metrics>,
    /// The store, as async code may use it.
    pub outbox: Outbox,
    /// Highest committed sequence number per stream; changes after every flush.
    pub committed_rx: watch::Receiver<CommittedMarks>,
    /// Checks the hub's signature on acks (from [`KeyMaterial::hub_ack`]).
    ack_verifier: AckVerifier,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Running {
    /// Stops the sources and waits for the open batches to be sealed and committed.
    /// Returns whether the gateway stopped clean: false if the grace period ran out first, or
    /// if any sealed batch was lost before it was committed (`batches_lost`: the store failed
    /// or refused it), during the run or at its end.
    pub async fn shutdown(self, grace: Duration) -> bool {
        self.shutdown.cancel();
        self.tracker.close();
        let done = tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok();
        if !done {
            warn!(?grace, "shutdown grace period ran out");
        }
        let lost = self.metrics.batches_lost.get();
        if lost > 0 {
            warn!(lost, "sealed batches were lost before they were committed");
        }
        done && lost == 0
    }
}

/// Starts pollers, batcher and committer for `cfg` on the current runtime. `outbox` is an
/// [`Outbox`] or the `Arc<dyn Store>` to wrap in one (before any task writes to it).
pub fn start(cfg: &GatewayConfig, keys: KeyMaterial, outbox: impl Into<Outbox>) -> Running {
    let outbox: Outbox = outbox.into();
    let metrics = Arc::new(Metrics::default());
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let (samples_tx, samples_rx) = mpsc::channel(SAMPLES_CHANNEL_CAPACITY);
    let (sealed_tx, sealed_rx) = mpsc::channel(SEALED_CHANNEL_CAPACITY);
    let (committed_tx, committed_rx) =
        watch::channel(Stream::ALL.map(|s| outbox.next_seq_at_open(s).saturating_sub(1)));

    let flows = crate::pipeline::Flows::from_config(cfg, &keys.pseudonym);
    let pseudonym_key = keys.pseudonym.clone();
    let sealer = Sealer::new(
        cfg.gateway_id.clone(),
        keys.signing,
        keys.hub,
        outbox.incarnation(),
    );
    let ack_verifier = AckVerifier::new(keys.hub_ack);
    let seq_outbox = outbox.clone();
    let mut batcher = Batcher::new(
        samples_rx,
        sealed_tx,
        sealer,
        flows,
        cfg.batch,
        move |s| first_seq(seq_outbox.next_seq_at_open(s)),
        metrics.clone(),
    );
    let (alarms_tx, alarms_rx) = mpsc::channel(GATEWAY_ALARMS_CAPACITY);
    // Pollers report their rounds here; the batcher seals when none is in progress.
    let rounds = crate::source::Rounds::default();
    batcher = batcher
        .with_gateway_alarms(alarms_rx)
        .with_rounds(rounds.clone());
    let checkpoint_key = crate::pipeline::checkpoint::CheckpointKey::derive(&pseudonym_key);
    let restored = outbox.checkpoint_at_open().and_then(|bytes| {
        checkpoint_key
            .open(bytes)
            .map_err(
                |e| warn!(error = %e, "last checkpoint not used; aggregate windows start fresh"),
            )
            .ok()
    });
    batcher = batcher.with_checkpoints(checkpoint_key, restored);
    if let Some(recovery) = outbox.recovery() {
        // The store was damaged and replaced at open: say so where the hub sees it.
        metrics.store_recoveries.inc();
        metrics
            .batches_lost_to_corruption
            .add(recovery.batches_lost);
        tracing::error!(
            moved_to = %recovery.moved_to.display(),
            batches_lost = recovery.batches_lost,
            reason = %recovery.reason,
            "store was damaged and replaced; alarm raised"
        );
        batcher.push_gateway_record(
            Stream::Alarms,
            crate::pipeline::store_recovery_alarm(&cfg.gateway_id, recovery),
        );
    }
    if crate::emergency::Watcher::wanted(cfg) {
        let (commands, commands_rx) = mpsc::channel(1);
        batcher = batcher.with_emergency(commands_rx);
        let links = crate::emergency::Links {
            outbox: outbox.clone(),
            committed_rx: committed_rx.clone(),
            commands,
            alarms: alarms_tx.clone(),
            metrics: metrics.clone(),
            shutdown: shutdown.child_token(),
        };
        let watcher = crate::emergency::Watcher::new(cfg, &pseudonym_key, links);
        tracker.spawn(watcher.run().instrument(info_span!("emergency")));
    }
    // Each task runs in a span naming it, so its log lines carry their context.
    tracker.spawn(batcher.run().instrument(info_span!("batcher")));
    tracker.spawn(
        Committer::new(sealed_rx, outbox.clone(), metrics.clone(), committed_tx)
            .run()
            .instrument(info_span!("committer")),
    );

    let mut endpoints: BTreeMap<Transport, Vec<DeviceConfig>> = BTreeMap::new();
    let mut mqtt_devices: BTreeMap<&str, Vec<DeviceConfig>> = BTreeMap::new();
    for d in &cfg.devices {
        match &d.kind {
            DeviceKind::Mqtt(t) => mqtt_devices.entry(&t.source).or_default().push(d.clone()),
            DeviceKind::Modbus(m) => endpoints
                .entry(m.transport.clone())
                .or_default()
                .push(d.clone()),
        }
    }
    // Every source gets the same sender and metrics and a token of its own under
    // `shutdown`; the last sender drops with `sources` once every source has stopped.
    let sources = SourceContext::new(samples_tx, metrics.clone(), &shutdown, cfg.modbus)
        .with_alarms(GatewayAlarms::new(&cfg.gateway_id, alarms_tx))
        .with_rounds(rounds);
    let mut rtu_groups = Vec::new();
    for (transport, devices) in endpoints {
        match transport {
            Transport::Tcp { address } => {
                let span = info_span!("modbus_tcp", endpoint = %address);
                let poller = ModbusPoller::new(address, devices, sources.child());
                tracker.spawn(poller.run().instrument(span));
            }
            t @ (Transport::Serial { .. } | Transport::RtuTcp { .. } | Transport::Dtu { .. }) => {
                rtu_groups.push((t, devices))
            }
        }
    }
    for task in crate::source::rtu::spawn::tasks(rtu_groups, &sources) {
        tracker.spawn(task);
    }
    for source in &cfg.mqtt_sources {
        let Some(devices) = mqtt_devices.remove(source.name.as_str()) else {
            warn!(source = %source.name, "mqtt source has no devices; not connecting");
            continue;
        };
        let span = info_span!("mqtt_source", source = %source.name);
        let subscriber = MqttSubscriber::new(source.clone(), devices, sources.child());
        tracker.spawn(subscriber.run().instrument(span));
    }
    drop(sources);
    info!(gateway = %cfg.gateway_id, devices = cfg.devices.len(), "gateway started");
    Running {
        metrics,
        outbox,
        committed_rx,
        ack_verifier,
        shutdown,
        tracker,
    }
}

/// A running uplink (forwarder + MQTT link).
#[derive(Debug)]
pub struct UplinkHandle {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    /// The outbox's published counters: the uplink is done when they show no batch.
    stats_rx: watch::Receiver<StoreStats>,
}

impl UplinkHandle {
    /// Gives the uplink up to `grace` to deliver what is committed (the store is empty once
    /// the hub acknowledged everything), then stops it. Wakes on every change of the store's
    /// counters; never polls.
    pub async fn finish(mut self, grace: Duration) {
        let drained = self.stats_rx.wait_for(|s| s.total_batches() == 0);
        // Err: the grace ran out, or the outbox is gone (nothing left to wait for).
        let _ = tokio::time::timeout(grace, drained).await;
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Starts forwarding committed batches to the hub, if the config has an `[uplink]`. The TLS
/// files are read on a blocking thread.
pub(crate) async fn start_uplink(
    cfg: &GatewayConfig,
    running: &Running,
) -> Result<Option<UplinkHandle>, LinkError> {
    start_uplink_with(cfg, running, |o| o).await
}

/// [`start_uplink`] with a hook to adjust the MQTT link options (the demo and tests
/// shorten keep-alive and backoff).
pub async fn start_uplink_with(
    cfg: &GatewayConfig,
    running: &Running,
    adjust: impl FnOnce(LinkOptions) -> LinkOptions,
) -> Result<Option<UplinkHandle>, LinkError> {
    let Some(u) = &cfg.uplink else {
        return Ok(None);
    };
    let tls = crate::config::TlsFiles::link_tls(u.tls.as_ref());
    if u.tls.is_none() {
        warn!(broker = %u.broker, "uplink without TLS (danger_plaintext): batches are sealed, but the link is not authenticated");
    }
    let mut opts = LinkOptions::new(u.broker.clone(), u.client_id.clone(), tls);
    opts.backoff = u.reconnect;
    let opts = adjust(opts);
    let (link, events) = MqttLink::open(opts).await?;
    running.metrics.update_link(|l| {
        l.configured = true;
        l.broker = Some(u.broker.clone());
    });
    let stop = CancellationToken::new();
    let forwarder = Forwarder::new(
        cfg.gateway_id.clone(),
        running.outbox.clone(),
        running.ack_verifier.clone(),
        link,
        events,
        running.committed_rx.clone(),
        ForwarderOptions {
            window: u.window,
            ack_timeout: u.ack_timeout,
        },
        running.metrics.clone(),
        stop.clone(),
    );
    info!(broker = %u.broker, "uplink started");
    Ok(Some(UplinkHandle {
        stop,
        task: tokio::spawn(
            forwarder
                .run()
                .instrument(info_span!("uplink", broker = %u.broker)),
        ),
        stats_rx: running.outbox.stats_rx(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemStore;

    #[tokio::test(start_paused = true)]
    async fn finishing_the_uplink_wakes_on_the_last_ack_without_waiting() {
        let outbox = Outbox::new(Arc::new(MemStore::default()));
        outbox.append(Stream::Alarms, 7, vec![1; 8]).await.unwrap();
        let stop = CancellationToken::new();
        let uplink = UplinkHandle {
            stop: stop.clone(),
            task: tokio::spawn(async move { stop.cancelled().await }),
            stats_rx: outbox.stats_rx(),
        };
        let started = tokio::time::Instant::now();
        let finish = tokio::spawn(uplink.finish(Duration::from_secs(60)));
        tokio::task::yield_now().await;
        assert!(!finish.is_finished(), "finished with a batch in the store");
        assert!(outbox.ack(Stream::Alarms, 7).await.unwrap());
        finish.await.unwrap();
        // Paused time only moves when every task sleeps: a polling wait would have slept.
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    /// Issue 9 item 4: sequences no longer come from the wall clock; a fresh stream starts
    /// at 1 (its store's new incarnation keeps it apart from earlier stores).
    #[test]
    fn fresh_streams_start_at_one_and_continue_their_store() {
        assert_eq!(first_seq(42), 42);
        assert_eq!(first_seq(1), 1);
        assert_eq!(first_seq(0), 1);
    }
}
