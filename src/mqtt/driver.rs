//! The task that polls rumqttc's `EventLoop`, and the classification of its errors.
//!
//! [`Driver::run`] is the only code that touches the event loop and it does nothing else: no
//! publishing or subscribing (rumqttc #263/#1025: awaiting a request from the polling task
//! deadlocks once the request channel is full), no storage, no decoding. It turns events into
//! [`LinkEvent`]s on a bounded channel and a [`LinkState`] on a watch channel, and after an
//! error it sleeps a jittered, capped exponential delay before polling again (rumqttc itself
//! would retry immediately, in a busy loop).
//!
//! It ends when the link sends DISCONNECT or when every `AsyncClient` is gone.

use std::time::Duration;

use rumqttc::{ConnectionError, Event, EventLoop, Outgoing, Packet};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::event::{LinkEvent, LinkFailure, LinkState};
use crate::backoff::{Backoff, BackoffPolicy};

/// Owns the event loop; see the module docs.
pub(crate) struct Driver {
    eventloop: EventLoop,
    events_tx: mpsc::Sender<LinkEvent>,
    state_tx: watch::Sender<LinkState>,
    backoff: Backoff,
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
                    let error = LinkFailure::classify(&err);
                    let retry_in = self.backoff.next_delay();
                    warn!(
                        error = %error,
                        failures = self.backoff.failures(),
                        retry_in_ms = u64::try_from(retry_in.as_millis()).unwrap_or(u64::MAX),
                        "mqtt link down"
                    );
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
                self.backoff.reset();
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
