//! `citygate catalog`: one public-data catalogue entry per purpose flow, as JSON or CSV.
//!
//! An entry names the flow (purpose, description, legal basis, owner, retention at the hub,
//! stream, policy hash) and lists its data items: every field the configured devices produce,
//! with its classification (category, grade, personal), source unit, the form in which it
//! leaves, how often, and its sharing class:
//!
//! - `unconditional`: leaves only as area aggregates covering at least k devices;
//! - `conditional`: leaves per (pseudonymous) meter, to the purpose's owner only;
//! - `not_shared`: does not leave under this purpose.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use super::CliError;
use crate::config::{FlowConfig, GatewayConfig};
use crate::policy::Action;
use crate::reading::Stream;

/// Output formats of `citygate catalog`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CatalogFormat {
    Json,
    Csv,
}

#[derive(Debug, Serialize)]
struct Entry {
    purpose: String,
    description: String,
    legal_basis: String,
    owner: String,
    retention_days: u64,
    stream: String,
    /// `standing`, or `emergency`: produced only while an operator's emergency order runs
    /// (bounded in time, purged on the box at its end).
    collection: &'static str,
    policy_file: String,
    policy_hash: String,
    time_zone: String,
    items: Vec<Item>,
}

#[derive(Debug, Serialize)]
struct Item {
    field: String,
    category: String,
    grade: String,
    personal: bool,
    source_unit: String,
    unit: String,
    profiles: Vec<String>,
    sharing: &'static str,
    /// Each form it leaves in (`aggregate delta 1d`, …); empty when not shared.
    forms: Vec<String>,
    /// How often a value is produced: the window, or the fastest poll interval.
    update_frequency: String,
}

/// A field as the configured devices produce it.
struct Produced<'a> {
    field: &'a crate::profile::Field,
    profiles: Vec<String>,
    /// Fastest poll interval among the devices producing it; `None` for MQTT meters.
    fastest: Option<Duration>,
}

fn produced(cfg: &GatewayConfig) -> BTreeMap<(String, String), Produced<'_>> {
    let mut out: BTreeMap<(String, String), Produced<'_>> = BTreeMap::new();
    for d in &cfg.devices {
        let interval = d.modbus().map(|m| m.poll_interval);
        for f in &d.profile.fields {
            let class = format!("{:?}", f.class);
            let e = out
                .entry((f.name.to_string(), class))
                .or_insert_with(|| Produced {
                    field: f,
                    profiles: Vec::new(),
                    fastest: None,
                });
            let name = d.profile.name.clone();
            if !e.profiles.contains(&name) {
                e.profiles.push(name);
            }
            e.fastest = match (e.fastest, interval) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
    }
    out
}

fn item(flow: &FlowConfig, p: &Produced<'_>) -> Item {
    let f = p.field;
    let applies = (f.stream == Stream::Alarms) == (flow.stream == Stream::Alarms);
    let decisions: Vec<_> = if applies {
        flow.policy
            .decide(&f.name, &f.class)
            .into_iter()
            .filter(|d| d.rule.is_some() && d.action != Action::Drop)
            .collect()
    } else {
        Vec::new()
    };
    let sharing = if decisions.is_empty() {
        "not_shared"
    } else if decisions
        .iter()
        .all(|d| matches!(&d.action, Action::Aggregate(a) if a.group.is_some()))
    {
        "unconditional"
    } else {
        "conditional"
    };
    let update_frequency = decisions
        .iter()
        .map(|d| match &d.action {
            Action::Aggregate(a) => format!("every {}", a.window),
            _ if f.stream == Stream::Alarms => "on change, and as standing state".to_string(),
            _ => p.fastest.map_or("as the meter publishes".to_string(), |i| {
                format!("every {}", humantime::format_duration(i))
            }),
        })
        .collect::<Vec<_>>()
        .join(" + ");
    Item {
        field: f.name.to_string(),
        category: format!("{:?}", f.class.category).to_lowercase(),
        grade: format!("{:?}", f.class.grade),
        personal: f.class.personal,
        source_unit: f.unit.symbol.to_string(),
        unit: f.unit.canonical.to_string(),
        profiles: p.profiles.clone(),
        sharing,
        forms: decisions.iter().map(|d| d.action.to_string()).collect(),
        update_frequency: if update_frequency.is_empty() {
            "-".to_string()
        } else {
            update_frequency
        },
    }
}

fn entries(cfg: &GatewayConfig) -> Vec<Entry> {
    let fields = produced(cfg);
    crate::supervisor::stamped_flows(cfg)
        .into_iter()
        .map(|(flow, stamp)| {
            let stream = flow.stream;
            let m = flow.policy.meta();
            Entry {
                purpose: m.name.clone(),
                description: m.description.clone(),
                legal_basis: m.legal_basis.clone(),
                owner: m.owner.clone(),
                retention_days: m.retention.as_secs() / 86_400,
                stream: stream.to_string(),
                collection: if stream == Stream::EMERGENCY {
                    "emergency"
                } else {
                    "standing"
                },
                policy_file: flow.source.path().display().to_string(),
                policy_hash: stamp.hash_hex(),
                time_zone: cfg
                    .policies
                    .time_zone
                    .iana_name()
                    .unwrap_or("UTC")
                    .to_string(),
                items: fields.values().map(|p| item(flow, p)).collect(),
            }
        })
        .collect()
}

/// The catalogue of `cfg` in `format`.
pub(crate) fn render(cfg: &GatewayConfig, format: CatalogFormat) -> String {
    let entries = entries(cfg);
    match format {
        CatalogFormat::Json => {
            let mut s = serde_json::to_string_pretty(&entries)
                .expect("invariant: catalogue entries serialise");
            s.push('\n');
            s
        }
        CatalogFormat::Csv => {
            let mut s = String::from(
                "purpose,stream,retention_days,owner,legal_basis,field,category,grade,personal,source_unit,unit,profiles,sharing,forms,update_frequency\n",
            );
            for e in &entries {
                for i in &e.items {
                    let row = [
                        e.purpose.as_str(),
                        &e.stream,
                        &e.retention_days.to_string(),
                        &e.owner,
                        &e.legal_basis,
                        &i.field,
                        &i.category,
                        &i.grade,
                        if i.personal { "true" } else { "false" },
                        &i.source_unit,
                        &i.unit,
                        &i.profiles.join(" "),
                        i.sharing,
                        &i.forms.join(" + "),
                        &i.update_frequency,
                    ];
                    let cells: Vec<String> = row.iter().map(|c| csv_cell(c)).collect();
                    let _ = writeln!(s, "{}", cells.join(","));
                }
            }
            s
        }
    }
}

/// A CSV cell (RFC 4180): quoted when it holds a comma, quote or line break.
fn csv_cell(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

/// `citygate catalog --config FILE --format json|csv`
pub fn catalog(config: &Path, format: CatalogFormat) -> Result<(), CliError> {
    let cfg = GatewayConfig::load(config)?;
    print!("{}", render(&cfg, format));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_cells_are_quoted_only_when_needed() {
        assert_eq!(csv_cell("plain"), "plain");
        assert_eq!(csv_cell("a, b"), "\"a, b\"");
        assert_eq!(csv_cell("say \"hi\""), "\"say \"\"hi\"\"\"");
    }
}
