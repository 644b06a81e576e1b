//! Builds the RTU tasks for a validated config: one [`RtuBus`] per serial port, per
//! RTU-over-TCP server and per DTU, and one [`DtuListener`] per listen address.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use tracing::{info_span, Instrument};

use super::dtu::DtuListener;
use super::timing::LineTiming;
use super::transport::Link;
use super::RtuBus;

use crate::config::{DeviceConfig, Transport};
use crate::profile::LineSettings;
use crate::source::SourceContext;

/// A task to spawn.
pub(crate) type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The line settings a bus runs with: the transport's explicit settings over the
/// first device's profile defaults.
pub(crate) fn bus_line(transport: &Transport, devices: &[DeviceConfig]) -> LineSettings {
    let profile_line = devices.first().and_then(|d| d.profile.line);
    transport.line().unwrap_or_default().resolve(profile_line)
}

/// The bus task of one RTU transport (its stream not yet open), without DTU routing.
pub(crate) fn bus_for(
    transport: &Transport,
    devices: Vec<DeviceConfig>,
    link: Link,
    cx: SourceContext,
) -> RtuBus {
    let line = bus_line(transport, &devices);
    let heartbeats = match transport {
        Transport::Dtu { id, heartbeat, .. } => {
            let mut h = vec![id.as_bytes().to_vec()];
            if let Some(hb) = heartbeat {
                h.push(hb.as_bytes().to_vec());
            }
            h
        }
        _ => Vec::new(),
    };
    RtuBus::new(link, LineTiming::new(&line), devices, heartbeats, cx)
}

/// Every RTU task for `groups` (devices grouped by transport; TCP groups are ignored).
pub(crate) fn tasks(groups: Vec<(Transport, Vec<DeviceConfig>)>, cx: &SourceContext) -> Vec<Task> {
    let mut out: Vec<Task> = Vec::new();
    let mut dtus: BTreeMap<String, Vec<(Transport, Vec<DeviceConfig>)>> = BTreeMap::new();
    for (transport, devices) in groups {
        let link = match &transport {
            Transport::Serial { port, .. } => Link::Serial {
                port: port.clone(),
                line: bus_line(&transport, &devices),
            },
            Transport::RtuTcp { address, .. } => Link::Tcp {
                address: address.clone(),
            },
            Transport::Dtu { listen, .. } => {
                dtus.entry(listen.clone())
                    .or_default()
                    .push((transport, devices));
                continue;
            }
            Transport::Tcp { .. } => continue,
        };
        let span = info_span!("rtu_bus", bus = %link);
        let bus = bus_for(&transport, devices, link, cx.child());
        out.push(Box::pin(bus.run().instrument(span)));
    }
    for (listen, buses) in dtus {
        let ids = buses.iter().filter_map(|(t, _)| match t {
            Transport::Dtu { id, .. } => Some(id.clone()),
            _ => None,
        });
        // The config gives every DTU of one listener the same allow list.
        let allow = buses
            .iter()
            .find_map(|(t, _)| match t {
                Transport::Dtu { allow, .. } => Some(allow.clone()),
                _ => None,
            })
            .unwrap_or_default();
        let span = info_span!("dtu_listener", listen = %listen);
        let (listener, mut receivers) = DtuListener::new(listen, ids, cx.shutdown.child_token());
        let listener = listener
            .with_allow(allow)
            .with_metrics(cx.metrics.clone())
            .with_alarms(cx.alarms.clone());
        out.push(Box::pin(listener.run().instrument(span)));
        for (transport, devices) in buses {
            let Transport::Dtu { id, .. } = &transport else {
                continue;
            };
            let Some(sessions) = receivers.remove(id) else {
                continue;
            };
            let link = Link::Dtu {
                id: id.clone(),
                sessions,
            };
            let span = info_span!("rtu_bus", bus = %link);
            let bus = bus_for(&transport, devices, link, cx.child());
            out.push(Box::pin(bus.run().instrument(span)));
        }
    }
    out
}

/// One line per RTU bus of `devices`: line settings, requests per cycle, the computed
/// wire-time cycle and load, and a warning when the intervals exceed what the baud
/// rate carries. Empty when no device uses RTU.
pub(crate) fn bus_report(devices: &[DeviceConfig]) -> String {
    use std::fmt::Write as _;
    let mut groups: BTreeMap<&Transport, Vec<&DeviceConfig>> = BTreeMap::new();
    for d in devices {
        if let Some(m) = d.modbus().filter(|m| m.transport.is_rtu()) {
            groups.entry(&m.transport).or_default().push(d);
        }
    }
    let mut out = String::new();
    for (transport, devs) in groups {
        let owned: Vec<DeviceConfig> = devs.iter().map(|d| (*d).clone()).collect();
        let line = bus_line(transport, &owned);
        let timing = LineTiming::new(&line);
        let plans: Vec<(Vec<crate::source::modbus::ReadRequest>, std::time::Duration)> = owned
            .iter()
            .filter_map(|d| {
                Some((
                    crate::source::modbus::plan(&d.profile),
                    d.modbus()?.poll_interval,
                ))
            })
            .collect();
        let budget =
            super::BusBudget::compute(&timing, plans.iter().map(|(p, i)| (p.as_slice(), *i)));
        let _ = writeln!(
            out,
            "  {transport}  {}  {} device(s), {} request(s)/cycle, cycle ≥ {:.1} ms on the wire, load {:.0}% of the line{}",
            crate::profile::line::describe(&line),
            owned.len(),
            budget.requests,
            budget.cycle.as_secs_f64() * 1e3,
            budget.load * 100.0,
            if budget.overloaded() {
                "  WARNING: the poll intervals ask for more than this baud rate carries"
            } else {
                ""
            }
        );
        let defaults: std::collections::BTreeSet<_> =
            owned.iter().filter_map(|d| d.profile.line).collect();
        if defaults.len() > 1 {
            let _ = writeln!(
                out,
                "    note: the profiles on this bus have different [line] defaults; unset keys follow {}'s",
                owned.first().map_or("", |d| d.profile.name.as_str())
            );
        }
    }
    out
}
