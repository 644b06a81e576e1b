//! What every source task receives from the supervisor: [`SourceContext`].
//!
//! One struct instead of a list of positional arguments: the sample sender, the metrics,
//! a cancellation token of the source's own (a child of the gateway's, so the gateway
//! stops every source at once, and a source can be stopped alone) and the Modbus
//! defaults. [`SourceContext::send`] is the one place that states what happens when
//! the transforms fall behind.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{RawSample, Rounds};
use crate::config::ModbusConfig;
use crate::reading::{now_ms, GatewayId, Quality, Record, Unit, Value};
use crate::telemetry::Metrics;

/// Records the gateway raises about itself while it runs (not meter readings): the batcher
/// puts them on the alarms stream with subject `gateway:<id>`, outside the purpose policy
/// (they name no meter). Without a sender (tests, tools) raising only logs.
#[derive(Debug, Clone, Default)]
pub struct GatewayAlarms {
    tx: Option<mpsc::Sender<Record>>,
    subject: String,
}

impl GatewayAlarms {
    pub fn new(gateway: &GatewayId, tx: mpsc::Sender<Record>) -> Self {
        Self {
            tx: Some(tx),
            subject: format!("gateway:{}", gateway.as_str()),
        }
    }

    /// Queues an alarm record `field` = `value` with `tags`; false if it could not be
    /// queued (no sender, or the batcher is gone or far behind: the caller's log line and
    /// counter remain).
    pub(crate) fn raise(&self, field: &str, value: i64, tags: Vec<String>) -> bool {
        let Some(tx) = &self.tx else {
            return false;
        };
        let record = Record {
            subject: self.subject.clone(),
            field: field.to_owned(),
            value: Value::Int(value),
            unit: Unit::One,
            at_ms: now_ms(),
            quality: Quality::Good,
            tags,
            window: None,
            epoch: 0,
        };
        tx.try_send(record).is_ok()
    }
}

/// The sample sender, metrics, cancellation and settings a source runs with.
#[derive(Debug, Clone)]
pub struct SourceContext {
    pub samples_tx: mpsc::Sender<RawSample>,
    pub metrics: Arc<Metrics>,
    /// Cancelled when the source must stop.
    pub shutdown: CancellationToken,
    /// Timeouts and backoff cap for Modbus sources.
    pub modbus: ModbusConfig,
    /// Where a source raises alarms about the gateway itself (e.g. a DTU changing address).
    pub alarms: GatewayAlarms,
    /// Where pollers say they are in the middle of a poll round (the batcher seals when
    /// none is).
    pub rounds: Rounds,
}

impl SourceContext {
    /// A context whose token is a child of `shutdown`.
    pub fn new(
        samples_tx: mpsc::Sender<RawSample>,
        metrics: Arc<Metrics>,
        shutdown: &CancellationToken,
        modbus: ModbusConfig,
    ) -> Self {
        Self {
            samples_tx,
            metrics,
            shutdown: shutdown.child_token(),
            modbus,
            alarms: GatewayAlarms::default(),
            rounds: Rounds::default(),
        }
    }

    /// The same context, raising gateway alarms through `alarms`.
    pub fn with_alarms(mut self, alarms: GatewayAlarms) -> Self {
        self.alarms = alarms;
        self
    }

    /// The same context, reporting its poll rounds to `rounds` (shared with the batcher).
    pub fn with_rounds(mut self, rounds: Rounds) -> Self {
        self.rounds = rounds;
        self
    }

    /// The context for one more source: the same sender, metrics and settings, and a
    /// cancellation token of its own under this one.
    pub(crate) fn child(&self) -> Self {
        Self {
            shutdown: self.shutdown.child_token(),
            ..self.clone()
        }
    }

    /// A context under a fresh token with 1 s timeouts, for unit tests.
    #[cfg(test)]
    pub(crate) fn for_test(samples_tx: mpsc::Sender<RawSample>, metrics: Arc<Metrics>) -> Self {
        let second = std::time::Duration::from_secs(1);
        let modbus = ModbusConfig {
            timeout: second,
            connect_timeout: second,
            backoff_max: second,
        };
        Self::new(samples_tx, metrics, &CancellationToken::new(), modbus)
    }

    /// Hands a sample to the transforms and counts it. Policy when they fall behind:
    /// drop the newest sample and count the drop; a source never blocks on downstream
    /// back-pressure. Returns whether the sample was queued.
    pub(crate) fn send(&self, sample: RawSample) -> bool {
        self.metrics.samples_polled.inc();
        if self.samples_tx.try_send(sample).is_err() {
            self.metrics.samples_dropped.inc();
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{RegisterImage, SampleData};

    fn sample() -> RawSample {
        let d = crate::source::mqtt::routes::tests::device("d", "t", None);
        RawSample {
            device: d.id,
            profile: d.profile,
            at_ms: 0,
            data: SampleData::Registers(RegisterImage::new()),
            ratios: crate::profile::Ratios::UNITY,
        }
    }

    #[test]
    fn a_full_channel_drops_the_newest_and_counts_it() {
        let (tx, mut rx) = mpsc::channel(1);
        let root = CancellationToken::new();
        let cx = SourceContext::for_test(tx, Arc::new(Metrics::default()));
        let cx = SourceContext::new(cx.samples_tx, cx.metrics, &root, cx.modbus);
        assert!(cx.send(sample()));
        assert!(!cx.send(sample()));
        assert_eq!(cx.metrics.samples_polled.get(), 2);
        assert_eq!(cx.metrics.samples_dropped.get(), 1);
        assert!(rx.try_recv().is_ok());
        let child = cx.child();
        root.cancel();
        assert!(cx.shutdown.is_cancelled() && child.shutdown.is_cancelled());
    }
}
