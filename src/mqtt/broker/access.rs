//! Who may do what on the embedded broker: the broker access rules shared with the
//! mosquitto ACL file that `citygate keys tls` writes.
//!
//! Identity is the client certificate's CN; the session is bound to it (in `front`). The
//! role comes from the CN:
//! - hub (the hub's own client): subscribe `citygate/v1/+/{readings,alarms,audit}` (also
//!   through `$share/{group}/…`), publish `citygate/v1/{gateway}/ack` and its presence
//!   `citygate/hub/presence/{hub}` (also as its last will);
//! - gateway `G` (listed in the hub registry): publish `citygate/v1/G/{readings,alarms,audit}`,
//!   subscribe `citygate/v1/G/ack` and `citygate/hub/presence/+` (never publish presence: a
//!   gateway must not make the others re-send, or hide that a hub is gone);
//! - anyone else (meters, simulators): nothing under `citygate/`.
//!
//! Outside `citygate/`, hubs and others may publish and subscribe; a gateway may only
//! subscribe there (its MQTT meter sources). A filter whose first level is a wildcard may
//! match `citygate/…` topics, so it counts as "under `citygate/`".
//! Pure functions, no I/O: the front end calls them per CONNECT, PUBLISH and SUBSCRIBE.

use std::collections::BTreeSet;

use crate::reading::{GatewayId, Stream};
use crate::wire::{parse_presence_topic, presence_filter};

/// First level of every citygate topic.
const ROOT: &str = "citygate";
/// The two levels every citygate topic starts with.
const PREFIX: &str = "citygate/v1";

/// The identities the embedded broker gives roles to. Without it (tests, the demo) the
/// broker binds client ids to certificate CNs but leaves topics open.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BrokerAccess {
    /// Certificate CNs with the hub role.
    pub hubs: BTreeSet<String>,
    /// Certificate CNs with the gateway role (the hub registry's gateway ids).
    pub gateways: BTreeSet<String>,
}

impl BrokerAccess {
    /// The role of the client whose certificate has common name `cn`.
    pub(crate) fn role(&self, cn: &str) -> Role {
        if self.hubs.contains(cn) {
            Role::Hub
        } else if self.gateways.contains(cn) {
            GatewayId::new(cn).map_or(Role::Other, Role::Gateway)
        } else {
            Role::Other
        }
    }
}

/// What a connected client may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Role {
    /// No topic rules: no [`BrokerAccess`] configured, or the `danger_plaintext` listener.
    Unrestricted,
    Hub,
    Gateway(GatewayId),
    Other,
}

impl Role {
    /// A short name for logs.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Role::Unrestricted => "unrestricted",
            Role::Hub => "hub",
            Role::Gateway(_) => "gateway",
            Role::Other => "other",
        }
    }

    /// May this client publish on `topic` (also used for its last will)?
    pub(crate) fn may_publish(&self, topic: &str) -> bool {
        let under_root = topic == ROOT || topic.starts_with("citygate/");
        match self {
            Role::Unrestricted => true,
            Role::Hub => {
                !under_root
                    || ack_topic_gateway(topic).is_some()
                    || parse_presence_topic(topic).is_some()
            }
            Role::Gateway(gw) => Stream::ALL
                .iter()
                .any(|s| topic == format!("{PREFIX}/{gw}/{s}")),
            Role::Other => !under_root,
        }
    }

    /// May this client subscribe to `filter` (with or without a `$share/{group}/` prefix)?
    pub(crate) fn may_subscribe(&self, filter: &str) -> bool {
        let filter = split_share(filter).map_or(filter, |(_, f)| f);
        let disjoint = filter_is_outside_root(filter);
        match self {
            Role::Unrestricted => true,
            Role::Hub => disjoint || is_hub_filter(filter),
            Role::Gateway(gw) => {
                disjoint
                    || filter == format!("{PREFIX}/{gw}/ack")
                    || filter == presence_filter()
                    || parse_presence_topic(filter).is_some()
            }
            Role::Other => disjoint,
        }
    }
}

/// `$share/{group}/{filter}` split into group and filter.
pub(crate) fn split_share(filter: &str) -> Option<(&str, &str)> {
    filter.strip_prefix("$share/")?.split_once('/')
}

/// True if no topic under `citygate/` can match `filter`.
fn filter_is_outside_root(filter: &str) -> bool {
    let first = filter.split('/').next().unwrap_or_default();
    !matches!(first, ROOT | "+" | "#")
}

/// `citygate/v1/{+ or gateway}/{readings|alarms|audit}`.
fn is_hub_filter(filter: &str) -> bool {
    let Some(rest) = filter.strip_prefix("citygate/v1/") else {
        return false;
    };
    let Some((gateway, stream)) = rest.split_once('/') else {
        return false;
    };
    (gateway == "+" || GatewayId::new(gateway).is_ok())
        && Stream::ALL.iter().any(|s| s.as_str() == stream)
}

/// The gateway of `citygate/v1/{gateway}/ack`.
fn ack_topic_gateway(topic: &str) -> Option<GatewayId> {
    let rest = topic.strip_prefix("citygate/v1/")?;
    let gateway = rest.strip_suffix("/ack")?;
    GatewayId::new(gateway).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{ack_topic, hub_filters, presence_topic, stream_topic};

    fn access() -> BrokerAccess {
        BrokerAccess {
            hubs: ["hub-1".to_owned()].into(),
            gateways: ["gw1".to_owned(), "gw2".to_owned()].into(),
        }
    }

    #[test]
    fn roles_come_from_the_certificate_name() {
        let a = access();
        assert_eq!(a.role("hub-1"), Role::Hub);
        assert_eq!(a.role("gw1"), Role::Gateway(GatewayId::new("gw1").unwrap()));
        assert_eq!(a.role("sim-7"), Role::Other);
        assert_eq!(BrokerAccess::default().role("gw1"), Role::Other);
    }

    #[test]
    fn a_gateway_publishes_only_its_own_batches_and_reads_only_its_own_acks() {
        let gw1 = GatewayId::new("gw1").unwrap();
        let gw2 = GatewayId::new("gw2").unwrap();
        let role = access().role("gw1");
        for s in Stream::ALL {
            assert!(role.may_publish(&stream_topic(&gw1, s)));
            assert!(!role.may_publish(&stream_topic(&gw2, s)));
            assert!(!role.may_subscribe(&stream_topic(&gw1, s)));
        }
        assert!(!role.may_publish(&ack_topic(&gw1)));
        assert!(!role.may_publish("meters/m1"));
        assert!(role.may_subscribe(&ack_topic(&gw1)));
        assert!(!role.may_subscribe(&ack_topic(&gw2)));
        assert!(role.may_subscribe("v1/devices/me/telemetry"));
        assert!(role.may_subscribe("meters/+/data"));
        // issue 10 item 2: gateways read every hub's presence and publish none.
        assert!(role.may_subscribe(&presence_filter()));
        assert!(role.may_subscribe(&presence_topic("hub-1")));
        assert!(!role.may_publish(&presence_topic("hub-1")));
        assert!(!role.may_subscribe("citygate/hub/#"));
        assert!(!role.may_subscribe("citygate/hub/presence/#"));
        for filter in [
            "#",
            "+/v1/gw2/ack",
            "citygate/#",
            "citygate/v1/+/ack",
            "$share/g/#",
        ] {
            assert!(!role.may_subscribe(filter), "{filter}");
        }
    }

    #[test]
    fn the_hub_reads_batches_and_writes_acks_and_nothing_else_under_citygate() {
        let role = access().role("hub-1");
        let gw1 = GatewayId::new("gw1").unwrap();
        for filter in hub_filters("hubs") {
            assert!(role.may_subscribe(&filter), "{filter}");
        }
        assert!(role.may_subscribe("citygate/v1/+/readings"));
        assert!(role.may_subscribe("citygate/v1/gw1/alarms"));
        assert!(role.may_publish(&ack_topic(&gw1)));
        assert!(role.may_publish("citygate/v1/any-gw/ack"));
        assert!(role.may_publish(&presence_topic("hub-1")));
        assert!(!role.may_publish("citygate/hub/presence/+"));
        assert!(!role.may_publish("citygate/hub/presence/a/b"));
        for filter in [
            "#",
            "citygate/#",
            "citygate/v1/+/ack",
            "citygate/v1/+/+",
            "+/v1/+/ack",
        ] {
            assert!(!role.may_subscribe(filter), "{filter}");
        }
        for topic in [
            "citygate/v1/gw1/readings",
            "citygate/v1/gw 1/ack",
            "citygate/v1/a/b/ack",
            "citygate",
        ] {
            assert!(!role.may_publish(topic), "{topic}");
        }
    }

    #[test]
    fn other_clients_stay_outside_citygate() {
        let role = access().role("sim-7");
        let gw1 = GatewayId::new("gw1").unwrap();
        assert!(role.may_publish("meters/m1"));
        assert!(role.may_subscribe("meters/#"));
        assert!(!role.may_publish(&ack_topic(&gw1)));
        assert!(!role.may_publish(&stream_topic(&gw1, Stream::Readings)));
        assert!(!role.may_subscribe(&stream_topic(&gw1, Stream::Readings)));
        assert!(!role.may_subscribe("#"));
        assert!(!role.may_subscribe("$share/g/citygate/v1/+/readings"));
        assert!(!role.may_publish(&presence_topic("hub-1")));
        assert!(!role.may_subscribe(&presence_filter()));
        assert!(Role::Unrestricted.may_subscribe("#"));
        assert!(Role::Unrestricted.may_publish(&ack_topic(&gw1)));
    }
}
