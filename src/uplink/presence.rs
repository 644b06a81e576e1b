//! The gateway's view of the hubs' presence (`wire::presence`), and the rule that decides
//! when a hub coming online makes the forwarder re-send its unacknowledged window.
//!
//! The rule: a **live** `online` (not retained) with a session this gateway has not seen
//! re-sends everything unacknowledged at once. Such a message was published after this
//! gateway's presence subscription was in place, so batches the gateway published before it
//! may have reached no hub. A **retained** `online` (the broker sends it because this
//! gateway just (re)subscribed) only records the session: that hub announced itself before
//! the gateway's subscription existed, and after a reconnect the forwarder publishes nothing
//! until its subscriptions are acknowledged, so everything it sends reaches that hub; what
//! it had sent before the reconnect is re-sent by the reconnect itself. A session seen
//! before (a redelivered message) does nothing. So the two triggers that come together
//! after an outage — the gateway's own reconnect and the retained presence right after it —
//! send the window once, not twice; a hub that reconnects later than the gateway costs one
//! more round, which is the one that reaches it.

use std::collections::BTreeMap;

use crate::reading::now_ms;
use crate::telemetry::HubPresence;
use crate::wire::Presence;

/// Hubs by id and the sessions seen from them.
#[derive(Debug, Default)]
pub(crate) struct HubWatch {
    hubs: BTreeMap<String, (Option<u64>, bool)>,
}

/// What a presence message means for the forwarder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// A hub session came online after this gateway subscribed: re-send everything.
    Resend,
    /// A session seen for the first time, but through the retained message.
    NewSession,
    /// Nothing new (offline, or a session seen before).
    Nothing,
}

impl HubWatch {
    /// Takes one presence message; `retained`: delivered because this gateway subscribed.
    pub(crate) fn observe(&mut self, p: &Presence, retained: bool) -> Verdict {
        let entry = self.hubs.entry(p.hub.clone()).or_insert((None, false));
        let Some(session) = p.online else {
            entry.1 = false;
            return Verdict::Nothing;
        };
        let new = entry.0 != Some(session);
        *entry = (Some(session), true);
        match (new, retained) {
            (false, _) => Verdict::Nothing,
            (true, true) => Verdict::NewSession,
            (true, false) => Verdict::Resend,
        }
    }

    /// The status of hub `hub` as last heard, stamped now (call it when a message came).
    pub(crate) fn status(&self, hub: &str) -> Option<HubPresence> {
        self.hubs.get(hub).map(|(session, online)| HubPresence {
            online: *online,
            session: session.map(|s| format!("{s:016x}")),
            since_ms: now_ms(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn online(hub: &str, session: u64) -> Presence {
        Presence {
            hub: hub.into(),
            online: Some(session),
        }
    }

    /// issue 10 item 2: the presence rule — a live new session re-sends, a retained one or
    /// a repeated one does not, an offline hub coming back with a new session does.
    #[test]
    fn only_a_live_new_session_re_sends() {
        let mut w = HubWatch::default();
        // Gateway start: the retained presence of a hub that was already there.
        assert_eq!(w.observe(&online("hub-1", 1), true), Verdict::NewSession);
        // Redelivered (QoS 1) or retained again after the gateway's own reconnect.
        assert_eq!(w.observe(&online("hub-1", 1), false), Verdict::Nothing);
        assert_eq!(w.observe(&online("hub-1", 1), true), Verdict::Nothing);
        // The hub goes away (last will) and comes back with a new session.
        let offline = Presence {
            hub: "hub-1".into(),
            online: None,
        };
        assert_eq!(w.observe(&offline, false), Verdict::Nothing);
        assert!(!w.status("hub-1").unwrap().online);
        assert_eq!(w.observe(&online("hub-1", 2), false), Verdict::Resend);
        let s = w.status("hub-1").unwrap();
        assert!(s.online);
        assert_eq!(s.session.as_deref(), Some("0000000000000002"));
        // Both reconnected after a broker outage, the hub first: its new session arrives
        // retained after the gateway's re-subscription; the reconnect already re-sent.
        assert_eq!(w.observe(&online("hub-1", 3), true), Verdict::NewSession);
        // Another hub's session is its own.
        assert_eq!(w.observe(&online("hub-2", 3), false), Verdict::Resend);
        assert_eq!(w.status("hub-3"), None);
    }
}
