//! Broker access rules for mosquitto, as `citygate keys tls` writes them next to the
//! certificates: `mosquitto-acl.conf` and a ready `mosquitto.conf`.
//!
//! Identity is the client certificate's CN (`require_certificate`,
//! `use_identity_as_username`, and `use_username_as_clientid` so nobody can take
//! another's client id and disconnect it). Roles:
//! - gateway `G`: publish only `citygate/v1/G/{readings,alarms,audit}`, subscribe only
//!   `citygate/v1/G/ack` and the hubs' presence `citygate/hub/presence/+`, and read the
//!   meter topics given with `--meter-topic`;
//! - hub: read `citygate/v1/+/{readings,alarms,audit}` (also through `$share/…`),
//!   publish `citygate/v1/+/ack` and `citygate/hub/presence/+` (its presence and last
//!   will), nothing else;
//! - other clients (meters, simulators): publish and subscribe anywhere outside
//!   `citygate/#`.
//!
//! A gateway's meter topics are listed rather than granted as "everything outside
//! `citygate/#`": mosquitto's `deny` applies to every access of a user before any grant,
//! so a gateway denied `citygate/#` could not publish its own batches either (checked
//! against mosquitto 2.0). Topic names come from [`crate::wire`].

use std::fmt::Write as _;
use std::path::Path;

use crate::reading::{GatewayId, Stream};
use crate::wire::{ack_topic, hub_filters, presence_filter, stream_topic};

/// Who gets which certificate, by common name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BrokerRoles {
    pub gateways: Vec<GatewayId>,
    pub hubs: Vec<String>,
    /// Meters, simulators and other clients.
    pub clients: Vec<String>,
    /// Topic filters gateways may read (their MQTT meter sources on this broker).
    pub meter_topics: Vec<String>,
}

/// Why a meter topic filter cannot be granted.
pub fn check_meter_topic(filter: &str) -> Result<(), String> {
    let first = filter.split('/').next().unwrap_or_default();
    if filter.is_empty() || filter.starts_with('$') {
        return Err(format!(
            "meter topic {filter:?} must be a plain topic filter"
        ));
    }
    if matches!(first, "#" | "+") || first == citygate_root() {
        return Err(format!(
            "meter topic {filter:?} would reach into {}/#; name the meters' own topics, e.g. \"meters/#\"",
            citygate_root()
        ));
    }
    Ok(())
}

/// The first level of every citygate topic (`citygate`).
fn citygate_root() -> String {
    // Taken from `wire` so the two cannot drift.
    let sample = hub_filters("g");
    let topic = sample
        .first()
        .and_then(|f| f.strip_prefix("$share/g/"))
        .expect("invariant: hub filters are $share/{group}/…");
    topic.split('/').next().unwrap_or_default().to_owned()
}

/// The hub's filters without the shared-subscription prefix: `citygate/v1/+/{stream}`.
fn hub_topics() -> Vec<String> {
    hub_filters("g")
        .into_iter()
        .map(|f| {
            f.strip_prefix("$share/g/")
                .expect("invariant: hub filters are $share/{group}/…")
                .to_owned()
        })
        .collect()
}

/// The ack topic with `+` for the gateway level.
fn any_ack_topic() -> String {
    let probe = GatewayId::new("probe").expect("invariant: a valid gateway id");
    ack_topic(&probe).replace("/probe/", "/+/")
}

/// The ACL file for `roles`.
pub fn mosquitto_acl(roles: &BrokerRoles) -> String {
    let mut out = String::from(
        "# citygate broker access rules (written by `citygate keys tls`).\n\
         # The user is the client certificate's CN. Clients without a user (none, with\n\
         # require_certificate) get nothing: there are no rules before the first `user`.\n",
    );
    for g in &roles.gateways {
        let _ = writeln!(out, "\n# gateway {g}\nuser {g}");
        for s in Stream::ALL {
            let _ = writeln!(out, "topic write {}", stream_topic(g, s));
        }
        let _ = writeln!(out, "topic read {}", ack_topic(g));
        let _ = writeln!(out, "topic read {}", presence_filter());
        for t in &roles.meter_topics {
            let _ = writeln!(out, "topic read {t}");
        }
    }
    for h in &roles.hubs {
        let _ = writeln!(out, "\n# hub {h}\nuser {h}");
        for t in hub_topics() {
            let _ = writeln!(out, "topic read {t}");
        }
        let _ = writeln!(out, "topic write {}", any_ack_topic());
        let _ = writeln!(out, "topic write {}", presence_filter());
    }
    for c in &roles.clients {
        let _ = writeln!(
            out,
            "\n# client {c}: anything outside {root}/#\nuser {c}\ntopic deny {root}/#\ntopic readwrite #",
            root = citygate_root()
        );
    }
    out
}

/// A mosquitto config for citygate: a listener on `port` (on `bind`, or every interface)
/// with the files in `dir`. Ready to run (`mosquitto -c`) or to include from
/// `/etc/mosquitto/conf.d/`.
pub fn mosquitto_conf(dir: &Path, port: u16, bind: Option<std::net::IpAddr>) -> String {
    let f = |name: &str| dir.join(name).display().to_string();
    let bind = bind.map(|b| format!(" {b}")).unwrap_or_default();
    format!(
        "# citygate broker listener (written by `citygate keys tls`): run it with\n\
         # `mosquitto -c {conf}`, or include it from /etc/mosquitto/conf.d/.\n\
         # mosquitto started as root runs as user `mosquitto`, which must be able to read\n\
         # broker.key (owner mosquitto, 0600) and this folder's .conf files (group mosquitto,\n\
         # 0640): `citygate keys tls` run as root sets that, otherwise it prints the commands.\n\
         listener {port}{bind}\n\
         cafile {ca}\n\
         certfile {cert}\n\
         keyfile {key}\n\
         tls_version tlsv1.3\n\
         require_certificate true\n\
         use_identity_as_username true\n\
         use_username_as_clientid true\n\
         allow_anonymous false\n\
         acl_file {acl}\n\
         max_packet_size 1100000\n",
        conf = f("mosquitto.conf"),
        ca = f("ca.pem"),
        cert = f("broker.pem"),
        key = f("broker.key"),
        acl = f("mosquitto-acl.conf"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_name_the_wire_topics() {
        let roles = BrokerRoles {
            gateways: vec![GatewayId::new("gw1").unwrap()],
            hubs: vec!["hub".into()],
            clients: vec!["meter1".into()],
            meter_topics: vec!["meters/#".into()],
        };
        let acl = mosquitto_acl(&roles);
        let streams = |verb: &str, gw: &str| -> String {
            Stream::ALL
                .iter()
                .map(|s| format!("topic {verb} citygate/v1/{gw}/{s}\n"))
                .collect()
        };
        assert!(
            acl.contains("topic write citygate/v1/gw1/readings-7\n"),
            "{acl}"
        );
        let gw = format!(
            "user gw1\n{}topic read citygate/v1/gw1/ack\n\
             topic read citygate/hub/presence/+\ntopic read meters/#\n",
            streams("write", "gw1")
        );
        assert!(acl.contains(&gw), "{acl}");
        let hub = format!(
            "user hub\n{}topic write citygate/v1/+/ack\n\
             topic write citygate/hub/presence/+\n",
            streams("read", "+")
        );
        assert!(acl.contains(&hub), "{acl}");
        assert!(
            acl.contains("user meter1\ntopic deny citygate/#\ntopic readwrite #\n"),
            "{acl}"
        );
        // issue 10 item 2: only hubs may write presence; gateways read it.
        let gw_rules = acl
            .split("\nuser gw1\n")
            .nth(1)
            .unwrap()
            .split("\n\n")
            .next()
            .unwrap();
        assert!(!gw_rules.contains("write citygate/hub"), "{gw_rules}");
        assert_eq!(
            acl.matches("topic write citygate/hub/presence/+").count(),
            1,
            "{acl}"
        );
        // Nothing granted before the first user (anonymous clients).
        let before = acl.split("\nuser ").next().unwrap();
        assert!(!before.contains("\ntopic"), "{before}");
    }

    #[test]
    fn meter_topics_stay_outside_citygate() {
        assert!(check_meter_topic("meters/#").is_ok());
        assert!(check_meter_topic("v1/devices/me/telemetry").is_ok());
        for bad in ["#", "+/x", "citygate/v1/gw1/ack", "$share/g/x", ""] {
            assert!(check_meter_topic(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn listener_snippet_has_the_identity_settings() {
        let conf = mosquitto_conf(Path::new("/etc/citygate/tls"), 8883, None);
        for line in [
            "listener 8883",
            "tls_version tlsv1.3",
            "require_certificate true",
            "use_identity_as_username true",
            "use_username_as_clientid true",
            "acl_file /etc/citygate/tls/mosquitto-acl.conf",
        ] {
            assert!(conf.contains(&format!("\n{line}\n")), "{line}: {conf}");
        }
    }
}
