//! The task that polls rumqttc's `EventLoop`, and the classification of its errors.
//!
//! [`Driver::run`] is the only code that touches the event loop and it does nothing else: no
//! publishing or subscribing (rumqttc #263/#1025: awaiting a request from the polling task
//! deadlocks once the request channel is full), no storage, no decoding. It turns events into
//! [`LinkEvent`]s on a bounded channel and a [`LinkState`] on a watch channel, and after an
//! error it sleeps a jittered, capped exponential delay before polling again (rumqttc itself
//! would retry immediately, in a busy loop). The delay starts again from the initial one only
//! after a connection stayed up for `stable_after`, so a broker that accepts the connection
//! and then breaks it each time (an incoming packet above the limit, which rumqttc treats as
//! fatal: rumqtt#614) is retried at the capped delay, not in a loop.
//!
//! It ends when the link sends DISCONNECT or when every `AsyncClient` is gone.

use std::time::Duration;

use rumqttc::{ConnectionError, Event, EventLoop, Outgoing, Packet};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::event::{LinkEvent, LinkFailure, LinkState};
use crate::backoff::{Backoff, BackoffPolicy};

/// Owns the event loop; see the module docs.
pub(crate) struct Driver {
    eventloop: EventLoop,
    events_tx: mpsc::Sender<LinkEvent>,
    state_tx: watch::Sender<LinkState>,
    backoff: Backoff,
    stable_after: Duration,
    /// When the current connection's CONNACK arrived.
    connected_at: Option<Instant>,
    /// The error of the last "mqtt link down" logged at WARN.
    last_warned: Option<String>,
    epoch: u64,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl Driver {
    pub(crate) fn new(
        mut eventloop: EventLoop,
        events_tx: mpsc::Sender<LinkEvent>,
        state_tx: watch::Sender<LinkState>,
        backoff: BackoffPolicy,
        connect_timeout: Duration,
        stable_after: Duration,
    ) -> Driver {
        let mut network = eventloop.network_options();
        // rumqttc counts whole seconds; round up so a sub-second timeout is not zero.
        let secs = connect_timeout.as_secs() + u64::from(connect_timeout.subsec_nanos() > 0);
        network.set_connection_timeout(secs.max(1));
        eventloop.set_network_options(network);
        Driver {
            eventloop,
            events_tx,
            state_tx,
            backoff: Backoff::new(backoff),
            stable_after,
            connected_at: None,
            last_warned: None,
            epoch: 0,
        }
    }

    /// Polls until DISCONNECT is sent or every client handle is dropped.
    pub(crate) async fn run(mut self) {
        loop {
            match self.eventloop.poll().await {
                Ok(Event::Incoming(packet)) => self.incoming(packet).await,
                Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                    info!("mqtt link disconnected on request");
                    break;
                }
                Ok(Event::Outgoing(_)) => {}
                Err(ConnectionError::RequestsDone) => {
                    debug!("all mqtt link handles dropped");
                    break;
                }
                Err(err) => {
                    if self
                        .connected_at
                        .take()
                        .is_some_and(|t| t.elapsed() >= self.stable_after)
                    {
                        self.backoff.reset();
                    }
                    let error = LinkFailure::classify(&err);
                    let retry_in = self.backoff.next_delay();
                    let failures = self.backoff.failures();
                    let retry_in_ms = u64::try_from(retry_in.as_millis()).unwrap_or(u64::MAX);
                    let text = error.to_string();
                    if warn_on_failure(failures, self.last_warned.as_deref() != Some(&text)) {
                        warn!(error = %error, failures, retry_in_ms, "mqtt link down");
                        self.last_warned = Some(text);
                    } else {
                        debug!(error = %error, failures, retry_in_ms, "mqtt link down");
                    }
                    self.state_tx.send_replace(LinkState::Disconnected {
                        error: error.clone(),
                    });
                    self.emit(LinkEvent::Disconnected { error, retry_in }).await;
                    tokio::time::sleep(retry_in).await;
                }
            }
        }
        self.state_tx.send_replace(LinkState::Stopped);
    }

    async fn incoming(&mut self, packet: Packet) {
        match packet {
            Packet::ConnAck(ack) => {
                if self.stable_after.is_zero() {
                    self.backoff.reset();
                }
                self.connected_at = Some(Instant::now());
                self.epoch += 1;
                info!(
                    session_present = ack.session_present,
                    epoch = self.epoch,
                    "mqtt link connected"
                );
                self.state_tx.send_replace(LinkState::Connected {
                    session_present: ack.session_present,
                    epoch: self.epoch,
                });
                self.emit(LinkEvent::Connected {
                    session_present: ack.session_present,
                })
                .await;
            }
            Packet::Publish(publish) => {
                self.emit(LinkEvent::Publish {
                    topic: publish.topic,
                    payload: publish.payload,
                    retain: publish.retain,
                })
                .await;
            }
            Packet::PubAck(ack) => self.emit(LinkEvent::PubAck { pkid: ack.pkid }).await,
            Packet::SubAck(ack) => {
                let granted = ack
                    .return_codes
                    .iter()
                    .all(|code| matches!(code, rumqttc::SubscribeReasonCode::Success(_)));
                self.emit(LinkEvent::SubAck {
                    pkid: ack.pkid,
                    granted,
                })
                .await;
            }
            _ => {}
        }
    }

    /// Waits for room in the event channel (backpressure); a dropped receiver discards events.
    async fn emit(&mut self, event: LinkEvent) {
        if self.events_tx.send(event).await.is_err() {
            debug!("link event receiver gone; event discarded");
        }
    }
}

/// Whether the `failures`-th failure in a row (1-based) is logged at WARN: the first three,
/// then the 4th, 8th, … 64th, then every 64th (at a 2 s retry cap, one line every two
/// minutes of an outage instead of thirty), and any failure whose error differs from the last
/// one logged. The others are logged at DEBUG; `/status` shows the link's state throughout.
fn warn_on_failure(failures: u32, changed: bool) -> bool {
    changed || failures <= 3 || (failures <= 64 && failures.is_power_of_two()) || failures % 64 == 0
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::mqtt::{LinkOptions, LinkTls, MqttLink};

    /// issue 12 item 6: a broker down for an hour at a 2 s retry cap (1,800 failures) costs
    /// the log 35 WARN lines instead of 1,800, and a new kind of error is always logged.
    #[test]
    fn a_long_outage_is_logged_sparsely_and_a_new_error_always() {
        let warned: Vec<u32> = (1..=1800).filter(|&n| warn_on_failure(n, false)).collect();
        assert_eq!(&warned[..9], &[1, 2, 3, 4, 8, 16, 32, 64, 128]);
        assert_eq!(warned.len(), 35);
        assert!(warn_on_failure(1001, true));
        assert!(!warn_on_failure(1001, false));
    }

    /// A broker that accepts every connection and then announces a 5 MB PUBLISH, as a
    /// broker re-sending a retained oversized message after each subscription does.
    async fn oversized_broker() -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut connect = [0u8; 256];
                    if socket.read(&mut connect).await.unwrap_or(0) == 0 {
                        return;
                    }
                    // CONNACK, then a PUBLISH header with remaining length 5_000_000.
                    let mut bytes = vec![0x20, 0x02, 0x00, 0x00, 0x30];
                    let mut len = 5_000_000u32;
                    loop {
                        let b = (len % 128) as u8;
                        len /= 128;
                        bytes.push(if len > 0 { b | 0x80 } else { b });
                        if len == 0 {
                            break;
                        }
                    }
                    let _ = socket.write_all(&bytes).await;
                    let _ = socket.read(&mut connect).await;
                });
            }
        });
        addr
    }

    /// The retry delays of the first `n` disconnects of a link to `addr`.
    async fn retry_delays(
        addr: std::net::SocketAddr,
        stable_after: Duration,
        n: usize,
    ) -> Vec<(LinkFailure, Duration)> {
        let mut opts = LinkOptions::new(addr.to_string(), "t", LinkTls::DangerPlaintext);
        opts.backoff = BackoffPolicy {
            initial: Duration::from_millis(10),
            max: Duration::from_secs(10),
        };
        opts.stable_after = stable_after;
        let (link, mut events) = MqttLink::start(opts).unwrap();
        let mut out = Vec::new();
        while out.len() < n {
            let event = tokio::time::timeout(Duration::from_secs(20), events.recv())
                .await
                .expect("link events within 20 s")
                .expect("link running");
            if let LinkEvent::Disconnected { error, retry_in } = event {
                out.push((error, retry_in));
            }
        }
        drop(link);
        out
    }

    /// issue 9 item 8: a broker that drops the link right after each CONNACK (a packet
    /// above the limit) no longer gets a reconnect every `initial` delay: the backoff keeps
    /// growing unless a connection lasted `stable_after`. With `stable_after` zero (the
    /// uplink's setting) every CONNACK still restarts it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_broken_after_connack_back_off_unless_stable() {
        let addr = oversized_broker().await;
        let delays = retry_delays(addr, Duration::from_secs(60), 5).await;
        for (i, (error, retry_in)) in delays.iter().enumerate() {
            assert_eq!(*error, LinkFailure::TooLarge(5_000_000));
            // Equal jitter: the i-th failure waits at least half of 10 ms * 2^i.
            let floor = Duration::from_millis(5) * (1 << i);
            assert!(
                *retry_in >= floor,
                "disconnect {i}: {retry_in:?} < {floor:?}"
            );
        }
        let delays = retry_delays(addr, Duration::ZERO, 4).await;
        assert!(
            delays.iter().all(|(_, d)| *d <= Duration::from_millis(10)),
            "{delays:?}"
        );
    }
}
