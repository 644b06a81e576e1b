//! A running hub as `citygate hub` starts it: optionally its own broker, the MQTT link,
//! and the service task. Tests and the CLI start and stop it the same way.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

use super::{service, Hub, HubConfig, HubError, SinkConfig};
use crate::mqtt::{
    certificate_name, BrokerAccess, BrokerError, BrokerOptions, BrokerStatsHandle, EmbeddedBroker,
    LinkError, LinkOptions, MqttLink,
};
use crate::reading::now_ms;
use crate::telemetry::http::{Reply, Routes};
use crate::telemetry::prometheus::{count, Exposition, Kind, CONTENT_TYPE};
use crate::telemetry::StartTime;

/// Why a hub could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Hub(#[from] HubError),
    #[error("embedded broker: {0}")]
    Broker(#[from] BrokerError),
    #[error("mqtt: {0}")]
    Link(#[from] LinkError),
    #[error("hub start-up task failed: {0}")]
    Task(String),
}

/// Runs blocking start-up work (sled, key and PEM files, binding) off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StartError> + Send + 'static,
) -> Result<T, StartError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StartError::Task(e.to_string()))?
}

/// A started hub; [`HubProcess::shutdown`] stops it.
#[derive(Debug)]
pub struct HubProcess {
    hub: Arc<Hub>,
    broker: Option<EmbeddedBroker>,
    status_addr: Option<SocketAddr>,
    subscribed_rx: watch::Receiver<bool>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl HubProcess {
    /// Opens the hub's state and sink, starts the embedded broker if configured, connects
    /// and serves. The blocking parts (state, sink, keys, broker, TLS files) run on blocking
    /// threads.
    pub(crate) async fn start(cfg: &HubConfig) -> Result<HubProcess, StartError> {
        Self::start_with(cfg, |o| o).await
    }

    /// [`start`](Self::start) with a hook to adjust the MQTT link options (tests shorten
    /// timeouts and backoff).
    pub async fn start_with(
        cfg: &HubConfig,
        adjust: impl FnOnce(LinkOptions) -> LinkOptions,
    ) -> Result<HubProcess, StartError> {
        let hub_cfg = cfg.clone();
        let hub = Arc::new(blocking(move || Ok(Hub::open(&hub_cfg)?)).await?);
        let broker = match &cfg.mqtt.embedded_broker {
            Some(e) => {
                let mut opts = BrokerOptions::localhost(e.tls.clone());
                opts.listen = e.listen;
                let hub_cert = cfg.mqtt.tls.as_ref().map(|t| t.cert_file.clone());
                let gateways = cfg.gateways.iter().map(|g| g.id.to_string()).collect();
                let b = blocking(move || {
                    // The hub's own client (its certificate's name) is the hub; registered
                    // gateways are gateways.
                    let hubs = match hub_cert {
                        Some(path) => [certificate_name(&path)?].into(),
                        None => Default::default(),
                    };
                    opts.access = Some(BrokerAccess { hubs, gateways });
                    Ok(EmbeddedBroker::start(opts)?)
                })
                .await?;
                info!(addr = %b.tls_addr(), "embedded broker listening (mutual TLS)");
                Some(b)
            }
            None => None,
        };
        let target = match (&broker, cfg.mqtt.broker_is_embedded) {
            (Some(b), true) => format!("localhost:{}", b.tls_addr().port()),
            _ => cfg.mqtt.broker.clone(),
        };
        let tls = crate::config::TlsFiles::link_tls(cfg.mqtt.tls.as_ref());
        if cfg.mqtt.tls.is_none() {
            warn!(broker = %target, "hub connects without TLS (danger_plaintext)");
        }
        let mut opts = LinkOptions::new(target, cfg.mqtt.client_id.clone(), tls);
        opts.backoff = cfg.mqtt.reconnect;
        opts.last_will = Some(service::offline_will(&cfg.id));
        let opts = adjust(opts);
        let (link, events) = MqttLink::open(opts).await?;
        let stop = CancellationToken::new();
        let (subscribed_tx, subscribed_rx) = watch::channel(false);
        let span = info_span!("hub_service", hub = %cfg.id, group = %cfg.mqtt.share_group);
        let task = tokio::spawn(
            service::serve(
                hub.clone(),
                link,
                events,
                cfg.mqtt.share_group.clone(),
                cfg.id.clone(),
                cfg.sink.max_in_flight(),
                subscribed_tx,
                stop.clone(),
            )
            .instrument(span),
        );
        tokio::spawn(retention_job(hub.clone(), stop.clone()));
        if matches!(cfg.sink, SinkConfig::Postgres(_)) {
            tokio::spawn(probe_job(hub.clone(), stop.clone()));
        }
        let broker_stats = broker.as_ref().map(EmbeddedBroker::stats_handle);
        let status_addr =
            start_status(cfg, &hub, subscribed_rx.clone(), broker_stats, stop.clone());
        Ok(HubProcess {
            hub,
            broker,
            status_addr,
            subscribed_rx,
            stop,
            task,
        })
    }

    /// True while the broker has granted all of the hub's subscriptions; batches
    /// published before that may reach no hub.
    pub fn subscribed(&self) -> watch::Receiver<bool> {
        self.subscribed_rx.clone()
    }

    /// Where the status endpoint listens, if it could bind.
    pub fn status_addr(&self) -> Option<SocketAddr> {
        self.status_addr
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Where the embedded broker listens, if the hub runs one.
    pub fn broker_addr(&self) -> Option<SocketAddr> {
        self.broker.as_ref().map(EmbeddedBroker::tls_addr)
    }

    /// Stops the service (the link disconnects), then the embedded broker.
    /// Reopens the sink's files (SIGHUP after log rotation), on a blocking thread. A failure
    /// is logged; the hub keeps writing to the file it had.
    pub(crate) async fn reopen_sink(&self) {
        let hub = self.hub.clone();
        match tokio::task::spawn_blocking(move || hub.reopen_sink()).await {
            Ok(Ok(())) => info!("sighup: sink reopened"),
            Ok(Err(e)) => {
                warn!(error = %e, "sighup: sink not reopened; writing on to the old file")
            }
            Err(e) => warn!(error = %e, "sighup: sink reopen task failed"),
        }
    }

    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
        if let Some(b) = self.broker {
            // rumqttd's threads join on shutdown: keep that off the async workers.
            let _ = tokio::task::spawn_blocking(move || b.shutdown()).await;
        }
    }
}

/// How often the hub asks its database whether it is there.
const PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);
/// How often the hub drops database partitions past retention.
const RETENTION_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

/// Every [`PROBE_EVERY`] (and at start): probes the sink, so `/health` says `degraded` while
/// the database is unreachable and `ok` once it is back, whether or not batches arrive.
async fn probe_job(hub: Arc<Hub>, stop: CancellationToken) {
    periodic(hub, stop, PROBE_EVERY, "sink probe", |h| {
        h.probe_sink();
        true
    })
    .await;
}

/// Hourly (and at start): drops the database partitions past retention (`pg::retention`).
/// Ends at once for a sink without partitions (jsonl: `citygate hub-prune` runs offline).
async fn retention_job(hub: Arc<Hub>, stop: CancellationToken) {
    periodic(hub, stop, RETENTION_EVERY, "retention", |h| {
        match h.drop_expired_partitions(now_ms()) {
            None => return false,
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                warn!(error = %e, "retention: partitions not dropped; next try in an hour")
            }
        }
        true
    })
    .await;
}

/// Runs `job` on a blocking thread at once and then every `period`, until `stop` or until
/// `job` answers false.
async fn periodic(
    hub: Arc<Hub>,
    stop: CancellationToken,
    period: std::time::Duration,
    what: &'static str,
    job: fn(&Hub) -> bool,
) {
    let mut every = tokio::time::interval(period);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        let h = hub.clone();
        match tokio::task::spawn_blocking(move || job(&h)).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => warn!(error = %e, job = what, "hub job task failed"),
        }
    }
}

/// The hub's `/status`, `/metrics` and `/health`.
#[derive(Debug)]
struct HubRoutes {
    id: String,
    hub: Arc<Hub>,
    subscribed_rx: watch::Receiver<bool>,
    started: StartTime,
    /// The embedded broker's front-end counters, if the hub runs one.
    broker: Option<BrokerStatsHandle>,
}

#[derive(Debug, serde::Serialize)]
struct HubStatus<'a> {
    hub: &'a str,
    version: &'a str,
    uptime_s: i64,
    /// Whether the broker has granted all of the hub's subscriptions.
    subscribed: bool,
    #[serde(flatten)]
    stats: super::HubStats,
}

impl Routes for HubRoutes {
    fn get(&self, path: &str) -> Option<Reply> {
        let stats = self.hub.stats();
        let uptime_s = (now_ms() - self.started.0) / 1000;
        match path {
            "/status" => Some(Reply::json(
                200,
                &HubStatus {
                    hub: &self.id,
                    version: env!("CARGO_PKG_VERSION"),
                    uptime_s,
                    subscribed: *self.subscribed_rx.borrow(),
                    stats,
                },
            )),
            "/health" => Some(match self.hub.sink_fault() {
                None => Reply::ok("text/plain", "ok\n".into()),
                Some(fault) => Reply {
                    status: 503,
                    content_type: "text/plain",
                    body: format!("degraded: sink: {fault}\n"),
                },
            }),
            "/metrics" => {
                let mut e = Exposition::new();
                e.family("citygate_hub_info", Kind::Gauge, "Hub identity; always 1.")
                    .labelled(
                        "citygate_hub_info",
                        &[("hub", &self.id), ("version", env!("CARGO_PKG_VERSION"))],
                        1u8,
                    );
                e.single(
                    "citygate_hub_up_seconds",
                    Kind::Gauge,
                    "Seconds since the hub started.",
                    uptime_s as f64,
                );
                for (name, help, v) in [
                    (
                        "accepted_batches",
                        "Batches written and acknowledged.",
                        stats.accepted_batches,
                    ),
                    (
                        "records_written",
                        "Records written to the sink.",
                        stats.records_written,
                    ),
                    (
                        "duplicates",
                        "Batches seen before: acknowledged again, not written.",
                        stats.duplicates,
                    ),
                    (
                        "recovered_batches",
                        "Batches found in the sink at start and marked seen.",
                        stats.recovered_batches,
                    ),
                    (
                        "quarantined",
                        "Batches the database refused for their data: quarantined and acknowledged.",
                        stats.quarantined,
                    ),
                ] {
                    e.single(
                        &format!("citygate_hub_{name}_total"),
                        Kind::Counter,
                        help,
                        count(v),
                    );
                }
                e.family(
                    "citygate_hub_rejected_total",
                    Kind::Counter,
                    "Payloads rejected (never acknowledged), by reason.",
                );
                for (reason, n) in &stats.rejected {
                    e.labelled(
                        "citygate_hub_rejected_total",
                        &[("reason", reason)],
                        count(*n),
                    );
                }
                sink_metrics(
                    &mut e,
                    self.hub.sink_kind(),
                    &stats,
                    &self.hub.sink_stats().figures(),
                );
                if let Some(broker) = &self.broker {
                    let b = broker.get();
                    e.family(
                        "citygate_hub_broker_refused_total",
                        Kind::Counter,
                        "Embedded broker: connections dropped before CONNECT (handshake), \
                         refused at CONNECT (connect), closed for a denied packet (packet).",
                    );
                    for (what, n) in [
                        ("handshake", b.handshakes_failed),
                        ("connect", b.connections_refused),
                        ("packet", b.packets_denied),
                    ] {
                        e.labelled(
                            "citygate_hub_broker_refused_total",
                            &[("what", what)],
                            count(n),
                        );
                    }
                }
                Some(Reply::ok(CONTENT_TYPE, e.finish()))
            }
            _ => None,
        }
    }
}

/// The sink's families, labelled `sink="jsonl"` or `sink="postgres"`.
fn sink_metrics(
    e: &mut Exposition,
    sink: &str,
    stats: &super::HubStats,
    f: &super::stats::SinkFigures,
) {
    let label = [("sink", sink)];
    for (name, kind, help, v) in [
        (
            "citygate_hub_sink_commit_seconds_sum",
            Kind::Counter,
            "Time spent in successful sink commits (group writes), seconds.",
            f.latency_sum_s,
        ),
        (
            "citygate_hub_sink_commit_seconds_count",
            Kind::Counter,
            "Successful sink commits (groups).",
            count(f.commits),
        ),
        (
            "citygate_hub_sink_commit_failures_total",
            Kind::Counter,
            "Sink commits that failed (nothing of the group acknowledged).",
            count(f.failures),
        ),
        (
            "citygate_hub_sink_batches_written_total",
            Kind::Counter,
            "Batches written by the sink.",
            count(stats.accepted_batches),
        ),
        (
            "citygate_hub_sink_records_written_total",
            Kind::Counter,
            "Records written by the sink.",
            count(stats.records_written),
        ),
        (
            "citygate_hub_sink_duplicates_total",
            Kind::Counter,
            "Batches the sink already held: acknowledged again, not written.",
            count(stats.duplicates),
        ),
        (
            "citygate_hub_sink_quarantined_total",
            Kind::Counter,
            "Batches the sink refused for their data and quarantined.",
            count(stats.quarantined),
        ),
        (
            "citygate_hub_acks_dropped_total",
            Kind::Counter,
            "Acks dropped because the queue to the broker was full (the gateway re-sends).",
            count(f.acks_dropped),
        ),
        (
            "citygate_hub_sink_in_flight",
            Kind::Gauge,
            "Batches taken from the broker and not yet answered (committing or waiting).",
            count(f.in_flight),
        ),
    ] {
        e.family(name, kind, help).labelled(name, &label, v);
    }
}

/// Binds the hub's status endpoint; a failure is logged, not fatal.
fn start_status(
    cfg: &HubConfig,
    hub: &Arc<Hub>,
    subscribed_rx: watch::Receiver<bool>,
    broker: Option<BrokerStatsHandle>,
    stop: CancellationToken,
) -> Option<SocketAddr> {
    let routes = Arc::new(HubRoutes {
        id: cfg.id.clone(),
        hub: hub.clone(),
        subscribed_rx,
        started: StartTime::default(),
        broker,
    });
    crate::telemetry::http::spawn_endpoint(cfg.status.listen?, routes, stop)
}
