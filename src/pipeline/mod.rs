//! The gateway's middle: samples → records → sealed batches → committed batches.
//!
//! [`Batcher`] owns the transforms' state (counter memory) and the open batch of each
//! stream; it seals a batch when it reaches `batch.max_records` or `batch.max_age`, and
//! once more for whatever is open when its input closes (shutdown). [`Committer`] owns
//! the store's write side: it hands every sealed batch that is waiting to the
//! [`Outbox`](crate::store::Outbox), which appends them and flushes once (group commit)
//! on a blocking thread.

mod batcher;
pub(crate) mod checkpoint;
mod committer;
mod flows;

pub(crate) use batcher::store_recovery_alarm;
pub use batcher::{Batcher, EmergencyCommand, EmergencyEnded};
pub(crate) use committer::{CommittedMarks, Committer};
pub use flows::{Flow, Flows};

/// Raw samples waiting for the transforms. Full: the poller drops the newest and counts it.
pub const SAMPLES_CHANNEL_CAPACITY: usize = 1024;
/// Sealed batches waiting for commit. Full: the batcher waits (back-pressure to the
/// sample channel, whose policy above then applies).
pub const SEALED_CHANNEL_CAPACITY: usize = 64;
