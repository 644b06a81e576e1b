//! Which committed batches the forwarder publishes next: live data and the backlog share
//! the in-flight window.
//!
//! Each stream has two lanes, split at `live_from`, the first seq committed after the last
//! (re)start of sending (start, reconnect, a hub coming online, an overdue ack):
//! - the **drain** lane sends the backlog, seqs below `live_from`, oldest first, in at most
//!   `window - reserve` slots;
//! - the **live** lane sends what is committed from `live_from` on, newest data as it
//!   commits, in any free slot — so without a backlog it has the whole window, and with one
//!   it always has at least `reserve` slots: a long drain never holds live readings back.
//!
//! Streams go in priority order (alarms, audit, readings), live lane before drain lane, so
//! alarms, live or not, take free slots first.
//!
//! The hub accepts out-of-order seqs: its de-dup keeps runs of seqs (`hub::dedup`), and two
//! lanes per stream make two runs plus at most one per batch in flight, far below its bound
//! of 1,024 open gaps.
//!
//! Pure bookkeeping: the forwarder asks [`Lanes::next_pull`] what to read from the store,
//! reads it, and reports each batch published ([`Lanes::sent`]) or that the range held
//! nothing more ([`Lanes::exhausted`]).

use crate::reading::Stream;

/// Sending order: priority streams first, then the purpose flows in code order.
pub(crate) const PRIORITY: [Stream; Stream::COUNT] = {
    let mut order = [Stream::Alarms; Stream::COUNT];
    order[1] = Stream::Audit;
    let mut i = 0;
    let mut at = 2;
    while i < Stream::COUNT {
        if i != 1 && i != 2 {
            order[at] = Stream::ALL[i];
            at += 1;
        }
        i += 1;
    }
    order
};

/// The lane a batch went out in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lane {
    Live,
    Drain,
}

/// A read to make from the store: up to `max` batches of `stream` with `from <= seq < below`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pull {
    pub stream: Stream,
    pub lane: Lane,
    pub from: u64,
    pub below: u64,
    pub max: usize,
}

/// Slots taken by batches in flight, per lane.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct InFlight {
    pub live: usize,
    pub drain: usize,
}

/// Per-stream cursors of both lanes. See the module docs.
#[derive(Debug, Clone, Default)]
pub(crate) struct Lanes {
    live_from: [u64; Stream::COUNT],
    drain_next: [u64; Stream::COUNT],
    live_next: [u64; Stream::COUNT],
}

/// The slots of `window` the live lane keeps for itself: a quarter.
pub(crate) fn live_reserve(window: usize) -> usize {
    window / 4
}

impl Lanes {
    /// Starts sending again from the oldest stored batch: what is committed (`marks`,
    /// highest committed seq per stream code) is backlog, later batches are live.
    pub(crate) fn restart(&mut self, marks: [u64; Stream::COUNT]) {
        self.live_from = marks.map(|m| m.saturating_add(1));
        self.live_next = self.live_from;
        self.drain_next = [0; Stream::COUNT];
    }

    /// The next read to make, or `None` when the window is full or nothing committed is
    /// left to send.
    pub(crate) fn next_pull(
        &self,
        marks: [u64; Stream::COUNT],
        in_flight: InFlight,
        window: usize,
        reserve: usize,
    ) -> Option<Pull> {
        let free = window.saturating_sub(in_flight.live + in_flight.drain);
        if free == 0 {
            return None;
        }
        let drain_room = window
            .saturating_sub(reserve)
            .saturating_sub(in_flight.drain)
            .min(free);
        for stream in PRIORITY {
            let i = stream.index();
            let committed_below = marks[i].saturating_add(1);
            let live_from = self.live_from[i].max(self.live_next[i]);
            if live_from < committed_below {
                return Some(Pull {
                    stream,
                    lane: Lane::Live,
                    from: live_from,
                    below: committed_below,
                    max: free,
                });
            }
            if drain_room > 0 && self.drain_next[i] < self.live_from[i] {
                return Some(Pull {
                    stream,
                    lane: Lane::Drain,
                    from: self.drain_next[i],
                    below: self.live_from[i],
                    max: drain_room,
                });
            }
        }
        None
    }

    /// Batch `seq` of `stream` was published in `lane`.
    pub(crate) fn sent(&mut self, stream: Stream, lane: Lane, seq: u64) {
        let i = stream.index();
        let next = seq.saturating_add(1);
        match lane {
            Lane::Live => self.live_next[i] = self.live_next[i].max(next),
            Lane::Drain => self.drain_next[i] = self.drain_next[i].max(next),
        }
    }

    /// The store holds nothing more in `pull`'s range (batches evicted or acknowledged).
    pub(crate) fn exhausted(&mut self, pull: &Pull) {
        self.sent(pull.stream, pull.lane, pull.below.saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    /// The forwarder's loop over a model store: committed seqs per stream, batches in
    /// flight by (stream, seq) with their lane. Returns what was published, in order.
    struct Model {
        lanes: Lanes,
        stored: [BTreeSet<u64>; Stream::COUNT],
        marks: [u64; Stream::COUNT],
        in_flight: BTreeMap<(Stream, u64), Lane>,
        window: usize,
    }

    impl Model {
        fn new(window: usize) -> Model {
            Model {
                lanes: Lanes::default(),
                stored: Default::default(),
                marks: [0; Stream::COUNT],
                in_flight: BTreeMap::new(),
                window,
            }
        }

        fn commit(&mut self, stream: Stream, seqs: std::ops::RangeInclusive<u64>) {
            let i = stream.index();
            self.marks[i] = self.marks[i].max(*seqs.end());
            self.stored[i].extend(seqs);
        }

        fn ack(&mut self, stream: Stream, seq: u64) {
            self.in_flight.remove(&(stream, seq));
            self.stored[stream.index()].remove(&seq);
        }

        fn send_more(&mut self) -> Vec<(Stream, u64, Lane)> {
            let mut out = Vec::new();
            loop {
                let counts = InFlight {
                    live: self
                        .in_flight
                        .values()
                        .filter(|l| **l == Lane::Live)
                        .count(),
                    drain: self
                        .in_flight
                        .values()
                        .filter(|l| **l == Lane::Drain)
                        .count(),
                };
                let Some(pull) = self.lanes.next_pull(
                    self.marks,
                    counts,
                    self.window,
                    live_reserve(self.window),
                ) else {
                    return out;
                };
                let batch: Vec<u64> = self.stored[pull.stream.index()]
                    .range(pull.from..pull.below)
                    .take(pull.max)
                    .copied()
                    .collect();
                if batch.is_empty() {
                    self.lanes.exhausted(&pull);
                }
                for seq in batch {
                    self.in_flight.insert((pull.stream, seq), pull.lane);
                    self.lanes.sent(pull.stream, pull.lane, seq);
                    out.push((pull.stream, seq, pull.lane));
                }
            }
        }
    }

    /// issue 10 item 3: with a backlog of 100 readings batches, new readings go out at once
    /// in the reserved quarter of the window while the rest drains oldest-first; alarms,
    /// live or backlog, go before both.
    #[test]
    fn live_batches_pass_a_draining_backlog_and_alarms_go_first() {
        let mut m = Model::new(16);
        m.commit(Stream::Readings, 1..=100);
        m.commit(Stream::Alarms, 1..=2);
        m.lanes.restart(m.marks);
        let first = m.send_more();
        // Backlog only: the drain lane gets 12 of 16 slots, alarms first.
        assert_eq!(first.len(), 12);
        assert_eq!(
            first[..2],
            [
                (Stream::Alarms, 1, Lane::Drain),
                (Stream::Alarms, 2, Lane::Drain)
            ]
        );
        let readings: Vec<u64> = first[2..].iter().map(|(_, s, _)| *s).collect();
        assert_eq!(readings, (1..=10).collect::<Vec<_>>(), "oldest first");

        // Live readings commit while the drain is busy: they take the reserved slots.
        m.commit(Stream::Readings, 101..=103);
        let live = m.send_more();
        assert_eq!(
            live,
            [101, 102, 103].map(|s| (Stream::Readings, s, Lane::Live))
        );
        // A live alarm takes the last free slot ahead of everything.
        m.commit(Stream::Alarms, 3..=3);
        m.commit(Stream::Readings, 104..=105);
        let alarm = m.send_more();
        assert_eq!(alarm, [(Stream::Alarms, 3, Lane::Live)]);

        // Acks free slots: live first, then the drain continues where it was.
        for s in [101, 102, 1, 2] {
            m.ack(Stream::Readings, s);
        }
        let next = m.send_more();
        assert_eq!(
            next,
            [
                (Stream::Readings, 104, Lane::Live),
                (Stream::Readings, 105, Lane::Live),
                (Stream::Readings, 11, Lane::Drain),
                (Stream::Readings, 12, Lane::Drain),
            ]
        );

        // Everything delivered exactly once per round, however it interleaves.
        let mut sent: BTreeSet<(Stream, u64)> = BTreeSet::new();
        for (s, q, _) in first.iter().chain(&live).chain(&alarm).chain(&next) {
            assert!(sent.insert((*s, *q)), "{s}/{q} sent twice");
        }
        while !m.in_flight.is_empty() {
            let acked: Vec<(Stream, u64)> = m.in_flight.keys().copied().collect();
            for (s, q) in acked {
                m.ack(s, q);
            }
            for (s, q, _) in m.send_more() {
                assert!(sent.insert((s, q)), "{s}/{q} sent twice");
            }
        }
        assert_eq!(sent.len(), 105 + 3);
    }

    /// Without a backlog the live lane has the whole window, in order.
    #[test]
    fn without_a_backlog_live_data_uses_the_whole_window() {
        let mut m = Model::new(4);
        m.lanes.restart(m.marks);
        m.commit(Stream::Readings, 1..=6);
        let sent = m.send_more();
        assert_eq!(
            sent,
            (1..=4)
                .map(|s| (Stream::Readings, s, Lane::Live))
                .collect::<Vec<_>>()
        );
        assert!(m.send_more().is_empty(), "window full");
    }

    /// A restart (reconnect, hub online, overdue ack) sends everything again from the
    /// oldest stored batch; what was live becomes backlog. Evicted seqs are skipped.
    #[test]
    fn a_restart_sends_everything_stored_again() {
        let mut m = Model::new(8);
        m.lanes.restart(m.marks);
        m.commit(Stream::Readings, 1..=5);
        assert_eq!(m.send_more().len(), 5);
        m.stored[0].remove(&2); // evicted by the quota
        m.in_flight.clear();
        m.lanes.restart(m.marks);
        let again: Vec<(u64, Lane)> = m.send_more().iter().map(|(_, s, l)| (*s, *l)).collect();
        assert_eq!(
            again,
            [1, 3, 4, 5].map(|s| (s, Lane::Drain)),
            "the backlog, oldest first, in the drain's slots"
        );
    }
}
