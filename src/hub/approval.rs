//! The policies the hub accepts, per gateway (issue 11 item 3).
//!
//! Every version 3 batch names the purpose and the policy hash it was made under; the registry
//! (`[[gateway]] policies = [...]` in the hub config) lists per gateway the pairs approved. A
//! batch is accepted only if its gateway is approved for exactly its pair: an unknown purpose
//! and a known purpose under a changed hash are both refused with `unapproved_policy`, not
//! acknowledged (the gateway keeps the batch and re-sends it until the policy is approved or
//! fixed), and raised as an alarm in the hub log. The built-in gateway stamp
//! ([`PolicyStamp::gateway`]) is accepted on the audit and alarms streams without approval:
//! it marks the gateway's own records (a store recovery, an emergency's start and end
//! reports), never meter data, which leaves only under a policy's stamp. Batches of
//! envelope versions 1 and 2 carry no purpose: they are accepted if their hash is approved for
//! the gateway under any purpose, so a backlog sealed before the upgrade still drains.
//!
//! A gateway re-sends a refused batch on every reconnect and after every ack timeout, so the
//! alarm is logged at most once per [`ALARM_EVERY`] for each (gateway, purpose, hash); every
//! refusal is still counted.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::reading::{GatewayId, PurposeName, Stream};
use crate::seal::PolicyStamp;

use super::config::GatewayEntry;

/// How often the same unapproved (gateway, purpose, hash) is logged at most.
pub(crate) const ALARM_EVERY: Duration = Duration::from_secs(300);

/// The approved policies of every registered gateway.
#[derive(Debug, Default)]
pub(crate) struct Approvals {
    by_gateway: HashMap<GatewayId, Vec<PolicyStamp>>,
}

impl Approvals {
    pub(crate) fn new(gateways: &[GatewayEntry]) -> Approvals {
        Approvals {
            by_gateway: gateways
                .iter()
                .map(|g| {
                    let stamps = g.policies.iter().map(|p| p.stamp.clone()).collect();
                    (g.id.clone(), stamps)
                })
                .collect(),
        }
    }

    /// Whether a batch of `gateway` on `stream`, naming `purpose` (`None` before envelope
    /// version 3) and `hash`, is accepted. See the module docs.
    pub(crate) fn allows(
        &self,
        gateway: &GatewayId,
        stream: Stream,
        purpose: Option<&PurposeName>,
        hash: &[u8; 32],
    ) -> bool {
        let approved = self.by_gateway.get(gateway).map_or(&[][..], Vec::as_slice);
        match purpose {
            Some(purpose) => {
                let gw = PolicyStamp::gateway();
                (stream.is_priority() && *purpose == gw.purpose && *hash == gw.hash)
                    || approved
                        .iter()
                        .any(|a| a.purpose == *purpose && a.hash == *hash)
            }
            None => approved.iter().any(|a| a.hash == *hash),
        }
    }
}

/// (gateway, purpose, hash) of an unapproved batch.
type AlarmKey = (GatewayId, Option<PurposeName>, [u8; 32]);

/// Remembers when each unapproved (gateway, purpose, hash) was last logged.
#[derive(Debug, Default)]
pub(crate) struct AlarmLimiter {
    last: Mutex<HashMap<AlarmKey, Instant>>,
}

impl AlarmLimiter {
    /// Whether to log the alarm for this triple at `now`: the first time, and again once
    /// [`ALARM_EVERY`] has passed since it was last logged.
    pub(crate) fn should_log(
        &self,
        gateway: &GatewayId,
        purpose: Option<&PurposeName>,
        hash: &[u8; 32],
        now: Instant,
    ) -> bool {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (gateway.clone(), purpose.cloned(), *hash);
        match last.get(&key) {
            Some(at) if now.saturating_duration_since(*at) < ALARM_EVERY => false,
            _ => {
                last.insert(key, now);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::config::ApprovedPolicy;

    fn gw(id: &str) -> GatewayId {
        GatewayId::new(id).unwrap()
    }

    fn purpose(p: &str) -> PurposeName {
        PurposeName::new(p).unwrap()
    }

    fn approvals() -> Approvals {
        Approvals::new(&[
            GatewayEntry {
                id: gw("gw-1"),
                verifying_key: "k".into(),
                policies: vec![ApprovedPolicy {
                    stamp: PolicyStamp::new(purpose("billing"), [1; 32]),
                    retention: None,
                }],
            },
            GatewayEntry {
                id: gw("gw-2"),
                verifying_key: "k".into(),
                policies: vec![],
            },
        ])
    }

    /// Issue 11 item 3: only the exact approved (purpose, hash) of the batch's own gateway
    /// passes; the gateway stamp passes on the audit stream only; legacy batches by hash.
    #[test]
    fn only_approved_pairs_pass() {
        let a = approvals();
        let billing = purpose("billing");
        let r = Stream::Readings;
        assert!(a.allows(&gw("gw-1"), r, Some(&billing), &[1; 32]));
        assert!(
            !a.allows(&gw("gw-1"), r, Some(&billing), &[2; 32]),
            "changed hash"
        );
        assert!(!a.allows(&gw("gw-1"), r, Some(&purpose("open-data")), &[1; 32]));
        assert!(
            !a.allows(&gw("gw-2"), r, Some(&billing), &[1; 32]),
            "other gateway"
        );
        assert!(!a.allows(&gw("gw-9"), r, Some(&billing), &[1; 32]));
        let g = PolicyStamp::gateway();
        assert!(a.allows(&gw("gw-2"), Stream::Audit, Some(&g.purpose), &g.hash));
        // The gateway's own alarms (an emergency's reports) need no alarms policy.
        assert!(a.allows(&gw("gw-2"), Stream::Alarms, Some(&g.purpose), &g.hash));
        assert!(!a.allows(&gw("gw-2"), r, Some(&g.purpose), &g.hash));
        assert!(!a.allows(&gw("gw-2"), Stream::EMERGENCY, Some(&g.purpose), &g.hash));
        assert!(!a.allows(&gw("gw-2"), Stream::Audit, Some(&g.purpose), &[1; 32]));
        assert!(
            a.allows(&gw("gw-1"), r, None, &[1; 32]),
            "v2 batch, approved hash"
        );
        assert!(!a.allows(&gw("gw-1"), r, None, &[2; 32]));
        assert!(!a.allows(&gw("gw-2"), r, None, &[1; 32]));
    }

    #[test]
    fn repeats_of_one_alarm_are_logged_once_per_interval() {
        let l = AlarmLimiter::default();
        let t0 = Instant::now();
        let p = purpose("billing");
        assert!(l.should_log(&gw("gw-1"), Some(&p), &[1; 32], t0));
        assert!(!l.should_log(&gw("gw-1"), Some(&p), &[1; 32], t0 + ALARM_EVERY / 2));
        assert!(
            l.should_log(&gw("gw-1"), Some(&p), &[2; 32], t0),
            "another hash"
        );
        assert!(
            l.should_log(&gw("gw-2"), Some(&p), &[1; 32], t0),
            "another gateway"
        );
        assert!(l.should_log(&gw("gw-1"), Some(&p), &[1; 32], t0 + ALARM_EVERY));
    }
}
