//! [`SourceHealth`]: whether an MQTT source's broker connection can be trusted to deliver,
//! from the link's connect and disconnect events.
//!
//! A source is faulty (its devices are stale, `/health` is degraded under the key
//! `mqtt_source:<name>`) while
//! - it has been disconnected for `grace` or longer (from the start, or since the last
//!   connection broke), or
//! - it is reconnect-looping: [`LOOP_DROPS`] connections in a row broke less than `grace`
//!   after their CONNACK (e.g. the broker re-sends a retained packet the link cannot read).
//!   Only a connection that then stays up for `grace` ends the loop.
//!
//! Pure: time is passed in, so the rules are tested without a broker or a clock.

use std::time::Duration;

use tokio::time::Instant;

/// Consecutive short-lived connections that make a reconnect loop.
pub(crate) const LOOP_DROPS: u32 = 3;

/// The connection history of one source; see the module docs.
#[derive(Debug)]
pub(crate) struct SourceHealth {
    name: String,
    grace: Duration,
    /// CONNACK of the current connection; `None` while disconnected.
    connected_at: Option<Instant>,
    /// Start of the current disconnected spell; `None` while connected.
    down_since: Option<Instant>,
    /// Connections in a row that broke within `grace`.
    short_drops: u32,
    last_error: String,
}

impl SourceHealth {
    /// A source starting at `now`, not yet connected.
    pub(crate) fn new(name: &str, grace: Duration, now: Instant) -> Self {
        Self {
            name: name.to_owned(),
            grace,
            connected_at: None,
            down_since: Some(now),
            short_drops: 0,
            last_error: "not connected yet".into(),
        }
    }

    /// The fault key of this source.
    pub(crate) fn key(&self) -> String {
        format!("mqtt_source:{}", self.name)
    }

    /// The broker accepted a connection.
    pub(crate) fn connected(&mut self, now: Instant) {
        self.settle(now);
        self.connected_at = Some(now);
        self.down_since = None;
    }

    /// The connection broke, or an attempt failed.
    pub(crate) fn disconnected(&mut self, now: Instant, error: String) {
        self.settle(now);
        if let Some(at) = self.connected_at.take() {
            if now.duration_since(at) < self.grace {
                self.short_drops = self.short_drops.saturating_add(1);
            }
            self.down_since = Some(now);
        }
        self.down_since.get_or_insert(now);
        self.last_error = error;
    }

    /// The fault's reason as of `now`, or `None` when the source is fine.
    pub(crate) fn fault(&mut self, now: Instant) -> Option<String> {
        self.settle(now);
        let grace = humantime::format_duration(self.grace);
        if self.short_drops >= LOOP_DROPS {
            return Some(format!(
                "mqtt source {} reconnect loop: {} connections in a row broke within {grace} ({})",
                self.name, self.short_drops, self.last_error
            ));
        }
        match self.down_since {
            Some(since) if now.duration_since(since) >= self.grace => Some(format!(
                "mqtt source {} down for more than {grace} ({})",
                self.name, self.last_error
            )),
            _ => None,
        }
    }

    /// When [`SourceHealth::fault`] may change without another event.
    pub(crate) fn next_change(&self) -> Option<Instant> {
        match (self.connected_at, self.down_since) {
            (Some(at), _) if self.short_drops > 0 => Some(at + self.grace),
            (None, Some(since)) => Some(since + self.grace),
            _ => None,
        }
    }

    /// A connection up for `grace` ends any loop.
    fn settle(&mut self, now: Instant) {
        if self
            .connected_at
            .is_some_and(|at| now.duration_since(at) >= self.grace)
        {
            self.short_drops = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(60);

    fn at(t0: Instant, secs: u64) -> Instant {
        t0 + Duration::from_secs(secs)
    }

    #[test]
    fn down_beyond_the_grace_is_a_fault_until_connected() {
        let t0 = Instant::now();
        let mut h = SourceHealth::new("plant", GRACE, t0);
        assert_eq!(h.fault(at(t0, 59)), None);
        assert_eq!(h.next_change(), Some(at(t0, 60)));
        let f = h.fault(at(t0, 60)).unwrap();
        assert!(
            f.starts_with("mqtt source plant down for more than 1m"),
            "{f}"
        );
        h.connected(at(t0, 61));
        assert_eq!(h.fault(at(t0, 61)), None);
        assert_eq!(h.next_change(), None);
        // A broker restart shorter than the grace is no fault; a longer one is.
        h.disconnected(at(t0, 500), "network: connection refused".into());
        assert_eq!(h.fault(at(t0, 530)), None);
        let f = h.fault(at(t0, 560)).unwrap();
        assert!(f.ends_with("(network: connection refused)"), "{f}");
        assert_eq!(h.key(), "mqtt_source:plant");
    }

    #[test]
    fn connections_that_keep_breaking_are_a_loop_until_one_lasts() {
        let t0 = Instant::now();
        let mut h = SourceHealth::new("m", GRACE, t0);
        let big = "protocol: incoming packet of 5242880 bytes above max_packet_bytes";
        for i in 0..LOOP_DROPS {
            assert_eq!(h.fault(at(t0, u64::from(i) * 10)), None, "drop {i}");
            h.connected(at(t0, u64::from(i) * 10));
            h.disconnected(at(t0, u64::from(i) * 10 + 1), big.into());
        }
        let f = h.fault(at(t0, 31)).unwrap();
        assert!(f.contains("reconnect loop: 3 connections"), "{f}");
        // Connected again: still a loop until it has lasted the grace.
        h.connected(at(t0, 40));
        assert!(h.fault(at(t0, 99)).is_some());
        assert_eq!(h.next_change(), Some(at(t0, 100)));
        assert_eq!(h.fault(at(t0, 100)), None);
        h.disconnected(at(t0, 200), big.into());
        assert_eq!(
            h.fault(at(t0, 201)),
            None,
            "one drop after a stable connection"
        );
    }
}
