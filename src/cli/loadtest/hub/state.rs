//! What the fleet's tasks share: the plan every gateway follows, the fleet-wide
//! [`Control`] (phase and counters), and each connection's [`GroupState`] with its
//! gateways' pending batches and [`Ledger`]s, behind a `std` mutex never held across an
//! await ([`lock`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use rand::rngs::StdRng;
use tokio::time::Instant;

use crate::reading::GatewayId;
use crate::seal::{HubPublicKey, PolicyStamp, Sealer};

/// Phases of a run, in order, after idle (0: connected, sealing nothing).
pub(super) const SEALING: u8 = 1;
pub(super) const DRAINING: u8 = 2;
pub(super) const STOPPED: u8 = 3;

/// What every gateway does alike.
#[derive(Debug)]
pub(super) struct Plan {
    pub meters: u32,
    pub fields: u32,
    pub readings: u64,
    pub interval_ms: i64,
    pub batch_every: Duration,
    pub window: usize,
    pub ack_timeout: Duration,
    pub withhold_acks: f64,
    pub garbage: f64,
    pub forged: f64,
    pub seed: u64,
    pub stamp: PolicyStamp,
    pub hub_key: HubPublicKey,
    pub broker: String,
}

/// Fleet-wide counters and the phase, shared by every task and the orchestrator.
#[derive(Debug, Default)]
pub(super) struct Control {
    phase: AtomicU8,
    window_start: OnceLock<Instant>,
    /// Batches sealed and not yet acked, over the fleet.
    pub pending: AtomicI64,
    pub sealed: AtomicU64,
    pub skipped_seals: AtomicU64,
    pub published: AtomicU64,
    pub resends: AtomicU64,
    pub publish_errors: AtomicU64,
    pub acked: AtomicU64,
    pub acked_in_window: AtomicU64,
    pub acks_withheld: AtomicU64,
    pub acks_for_resends: AtomicU64,
    /// Valid acks for a batch acked before (a re-send's ack after the first one counted).
    pub acks_again: AtomicU64,
    pub bad_acks: AtomicU64,
    pub garbage_sent: AtomicU64,
    pub forged_sent: AtomicU64,
    pub forged_acked: AtomicU64,
    pub connects: AtomicU64,
    pub disconnects: AtomicU64,
    pub subscribed: AtomicU64,
    pub subscribe_refused: AtomicU64,
    /// Hub sessions that came online live, each re-sending the group's unacked batches at
    /// once (as the uplink does).
    pub presence_resends: AtomicU64,
}

impl Control {
    pub(super) fn phase(&self) -> u8 {
        self.phase.load(Ordering::SeqCst)
    }

    pub(super) fn set_phase(&self, phase: u8) {
        if phase == SEALING {
            let _ = self.window_start.set(Instant::now());
        }
        self.phase.store(phase, Ordering::SeqCst);
    }

    /// When the window began, once it has.
    pub(super) fn window_start(&self) -> Option<Instant> {
        self.window_start.get().copied()
    }

    pub(super) fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    pub(super) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// What one gateway sealed and which of its batches the hubs acked.
#[derive(Debug, Clone)]
pub(super) struct Ledger {
    pub id: GatewayId,
    pub incarnation: u64,
    /// Incarnation of its forged batches (never to appear in a sink).
    pub forged_incarnation: u64,
    /// `acked[seq - 1]`: batch `seq` was acked; its length is the number sealed.
    pub acked: Vec<bool>,
    /// Records in each sealed batch.
    pub records_per_batch: u64,
}

/// A batch sealed and not yet acked.
#[derive(Debug)]
pub(super) struct Pending {
    pub bytes: Bytes,
    pub sealed_at: Instant,
    /// `None`: send at the next tick (new session).
    pub sent_at: Option<Instant>,
    pub sends: u32,
}

#[derive(Debug)]
pub(super) struct SimGateway {
    pub ledger: Ledger,
    pub sealer: Arc<Sealer>,
    pub forger: Arc<Sealer>,
    pub subjects: Arc<Vec<String>>,
    pub forged_seq: u64,
    pub pending: BTreeMap<u64, Pending>,
    /// Offset of its first seal into the window.
    pub offset: Duration,
    pub next_seal: Option<Instant>,
}

#[derive(Debug)]
pub(super) struct GroupState {
    pub gateways: Vec<SimGateway>,
    pub index: HashMap<GatewayId, usize>,
    /// Sealed → ack received, per first ack, in ms.
    pub latencies_ms: Vec<f32>,
    pub rng: StdRng,
    /// The hubs' presence as this connection saw it (the uplink's rule).
    pub hubs: crate::uplink::presence::HubWatch,
}

/// The group's state; a panicked holder leaves it usable.
pub(super) fn lock(s: &Mutex<GroupState>) -> std::sync::MutexGuard<'_, GroupState> {
    s.lock().unwrap_or_else(PoisonError::into_inner)
}
