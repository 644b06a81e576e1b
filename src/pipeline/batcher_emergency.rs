//! The batcher's side of an emergency collection: switching its flow on and off in step with
//! the batches, so that everything it produced is on [`Stream::EMERGENCY`] below the
//! sequence number reported at the end, and nothing after.

use tokio::sync::oneshot;

use super::Batcher;
use crate::pipeline::Flow;
use crate::reading::Stream;
use crate::seal::PolicyStamp;

/// What the emergency watcher asks of the batcher.
#[derive(Debug)]
pub enum EmergencyCommand {
    /// Switch `flow` (on [`Stream::EMERGENCY`], tagged) on; the reply is the stream's next
    /// sequence number, the collection's first.
    Start {
        flow: Box<Flow>,
        reply: oneshot::Sender<u64>,
    },
    /// Switch the flow off and drop what it has not sealed.
    End { reply: oneshot::Sender<Ended> },
}

/// The batcher's account of an ended emergency flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    /// The emergency stream's next sequence number: every batch of the collection is below.
    pub end_seq: u64,
    /// Records in the open batch and aggregates of open windows, dropped unsealed.
    pub discarded_records: u64,
}

impl Batcher {
    pub(super) fn on_emergency(&mut self, command: EmergencyCommand) {
        let i = Stream::EMERGENCY.index();
        match command {
            EmergencyCommand::Start { flow, reply } => {
                self.stamps[i] = flow.stamp().clone();
                self.flows.start_emergency(*flow);
                let _ = reply.send(self.next_seq[i]);
            }
            EmergencyCommand::End { reply } => {
                let windows = self.flows.end_emergency();
                let open = std::mem::take(&mut self.open[i]);
                self.stamps[i] = PolicyStamp::gateway();
                let discarded = windows + open.records.len() as u64;
                self.metrics.emergency_records_discarded.add(discarded);
                let _ = reply.send(Ended {
                    end_seq: self.next_seq[i],
                    discarded_records: discarded,
                });
            }
        }
    }
}
