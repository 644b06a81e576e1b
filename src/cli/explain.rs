//! `citygate policy explain`: per device and field, what leaves the box under each purpose,
//! in which form and resolution, and why (the rule and its line, or default deny). `check`
//! uses the one-line summary of the same decisions.

use std::fmt::Write as _;
use std::path::Path;

use super::CliError;
use crate::config::{FlowConfig, GatewayConfig};
use crate::policy::{Action, Decision};
use crate::profile::Field;
use crate::reading::Stream;

/// The flows that decide on `field`: the alarms policy for alarm-stream fields, the purpose
/// flows for the rest.
fn deciding_flows<'a>(cfg: &'a GatewayConfig, field: &Field) -> Vec<&'a FlowConfig> {
    if field.stream == Stream::Alarms {
        cfg.policies.alarms.iter().collect()
    } else {
        cfg.policies.flows.iter().collect()
    }
}

/// The decisions of one flow on `field` that let it leave.
fn leaving(flow: &FlowConfig, field: &Field) -> Vec<Decision> {
    flow.policy
        .decide(&field.name, &field.class)
        .into_iter()
        .filter(|d| d.rule.is_some() && d.action != Action::Drop)
        .collect()
}

/// One line: `billing: aggregate delta 1d; grid-operation: aggregate mean 15m over area
/// (sum, k=5)`, or `dropped (default deny)`.
pub(crate) fn leaves_summary(cfg: &GatewayConfig, field: &Field) -> String {
    let parts: Vec<String> = deciding_flows(cfg, field)
        .into_iter()
        .filter_map(|flow| {
            let forms: Vec<String> = leaving(flow, field)
                .iter()
                .map(|d| d.action.to_string())
                .collect();
            (!forms.is_empty()).then(|| format!("{}: {}", flow.policy.name(), forms.join(" + ")))
        })
        .collect();
    if parts.is_empty() {
        "dropped (no purpose names it)".to_string()
    } else {
        parts.join("; ")
    }
}

/// The full explanation for every device of `cfg` (or the one named `device`).
pub(crate) fn explain(cfg: &GatewayConfig, device: Option<&str>) -> Result<String, CliError> {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "gateway {}  time zone {}",
        cfg.gateway_id,
        tz_name(cfg)
    );
    for (flow, stamp) in crate::supervisor::stamped_flows(cfg) {
        let m = flow.policy.meta();
        let _ = writeln!(
            out,
            "\nflow {} on stream {}: {}\n  policy      {} (hash {})\n  legal basis {}\n  owner       {}\n  retention   {} at the hub",
            m.name,
            flow.stream,
            m.description,
            flow.source.path().display(),
            stamp.hash_hex(),
            m.legal_basis,
            m.owner,
            crate::cli::explain::days(m.retention)
        );
    }
    let devices: Vec<_> = cfg
        .devices
        .iter()
        .filter(|d| device.map_or(true, |n| d.id.as_str() == n))
        .collect();
    if devices.is_empty() {
        let names: Vec<&str> = cfg.devices.iter().map(|d| d.id.as_str()).collect();
        return Err(CliError::Usage(format!(
            "{}: no device {:?}; valid: {}",
            cfg.path.display(),
            device.unwrap_or_default(),
            names.join(", ")
        )));
    }
    for d in devices {
        let _ = writeln!(
            out,
            "\ndevice {} (profile {}@{}, area {})",
            d.id,
            d.profile.name,
            d.profile.version,
            d.area.as_ref().map_or("none", |a| a.as_str())
        );
        for f in &d.profile.fields {
            let class = format!(
                "{:?}/{:?}{}",
                f.class.category,
                f.class.grade,
                if f.class.personal { "/personal" } else { "" }
            )
            .to_lowercase();
            let _ = writeln!(out, "  {} [{class}, {}]", f.name, f.unit.canonical);
            let flows = deciding_flows(cfg, f);
            if flows.is_empty() {
                let _ = writeln!(
                    out,
                    "    does not leave: no {} policy is configured",
                    if f.stream == Stream::Alarms {
                        "alarms"
                    } else {
                        "purpose"
                    }
                );
            }
            for flow in flows {
                for dec in flow.policy.decide(&f.name, &f.class) {
                    let what = if dec.action == Action::Drop {
                        "does not leave".to_string()
                    } else {
                        format!("leaves as {}", form(&dec.action, d.area.is_some()))
                    };
                    let why = match dec.line {
                        Some(line) => {
                            format!("{} at {}:{line}", dec.why, flow.source.path().display())
                        }
                        None => dec.why.to_string(),
                    };
                    let _ = writeln!(out, "    {:<16} {what} ({why})", flow.policy.name());
                }
            }
        }
    }
    Ok(out)
}

/// The form a decision gives a field, in words.
fn form(action: &Action, has_area: bool) -> String {
    match action {
        Action::Pass => "its value, per pseudonymous meter".to_string(),
        Action::Pseudonymise => "a keyed pseudonym of its value".to_string(),
        Action::Aggregate(a) if a.group.is_some() && !has_area => {
            format!("{action} — but this device has no area, so it contributes nothing")
        }
        Action::Aggregate(a) if a.group.is_some() => format!("{action}, subject area:<area>"),
        _ => format!("{action}, per pseudonymous meter"),
    }
}

/// A retention as operators write it: whole days (`400d`), else the exact duration.
pub(crate) fn days(d: std::time::Duration) -> String {
    if d.as_secs() % 86_400 == 0 && d.subsec_nanos() == 0 {
        format!("{}d", d.as_secs() / 86_400)
    } else {
        humantime::format_duration(d).to_string()
    }
}

fn tz_name(cfg: &GatewayConfig) -> String {
    cfg.policies
        .time_zone
        .iana_name()
        .unwrap_or("UTC")
        .to_string()
}

/// `citygate policy explain --config FILE [--device NAME]`
pub fn policy_explain(config: &Path, device: Option<&str>) -> Result<(), CliError> {
    let cfg = GatewayConfig::load(config)?;
    print!("{}", explain(&cfg, device)?);
    Ok(())
}
