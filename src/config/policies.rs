//! `[policies]`: which purpose flows a gateway runs, each under its policy file, and the time
//! zone their windows follow. The legacy `[purpose]` allow-list becomes one inline policy.
//!
//! ```toml
//! [gateway]
//! time_zone = "Asia/Shanghai"        # windows align to this civil day; default "UTC"
//!
//! [policies]
//! dir = "policies"                   # default: "policies" beside this file
//! flows = ["billing", "grid-operation"]   # <dir>/<name>.toml, one stream each, in this order
//! alarms = "alarms"                  # the policy of the alarms stream (optional)
//! emergency = ["grid-emergency"]     # policies `citygate emergency start` may switch on
//! emergency_max = "24h"              # the longest emergency collection (default 24h)
//! ```
//!
//! Configured flows use `readings` … `readings-6`; `readings-7` is the emergency stream.
//!
//! Every policy is compiled and checked against the profiles when the config loads (with a
//! stand-in pseudonym key: nothing checked depends on it), so `citygate check` reports a bad
//! policy with its file and line. The supervisor compiles them again with the real key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

use crate::diag::{Diagnostic, SourceFile};
use crate::policy::CompiledPolicy;
use crate::profile::ProfileSet;
use crate::reading::{FieldName, Stream};
use crate::seal::PseudonymKey;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicies {
    dir: Option<PathBuf>,
    flows: Spanned<Vec<Spanned<String>>>,
    alarms: Option<Spanned<String>>,
    /// Policies `citygate emergency start --policy` may switch on.
    emergency: Option<Vec<Spanned<String>>>,
    /// The longest emergency collection `--for` may ask for.
    emergency_max: Option<Spanned<String>>,
}

/// The legacy `[purpose]` section: an allow-list of fields that leave at full resolution.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPurpose {
    pub name: Spanned<String>,
    pub description: Option<String>,
    pub fields: Vec<Spanned<String>>,
}

/// Where a policy's text comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicySource {
    /// A policy file.
    File(PathBuf),
    /// Generated from the gateway config's `[purpose]` allow-list; errors name the config.
    Inline { path: PathBuf, text: String },
}

impl PolicySource {
    /// The file errors and `policy explain` name.
    pub fn path(&self) -> &Path {
        match self {
            PolicySource::File(p) | PolicySource::Inline { path: p, .. } => p,
        }
    }

    /// Compiles the policy under `key` (its epoch goes into every record).
    pub fn compile(
        &self,
        tz: &jiff::tz::TimeZone,
        key: PseudonymKey,
    ) -> Result<CompiledPolicy, Vec<Diagnostic>> {
        match self {
            PolicySource::File(p) => CompiledPolicy::load(p, tz.clone(), key),
            PolicySource::Inline { path, text } => {
                CompiledPolicy::parse(path, text, tz.clone(), key)
            }
        }
    }
}

/// One purpose flow: its stream and its policy.
#[derive(Debug, Clone)]
pub struct FlowConfig {
    pub stream: Stream,
    pub source: PolicySource,
    /// Compiled with a stand-in key, for `check`, `policy explain` and `catalog`.
    pub policy: Arc<CompiledPolicy>,
}

/// What leaves the box, and under which purposes.
#[derive(Debug, Clone)]
pub struct PolicyConfig {
    pub time_zone: jiff::tz::TimeZone,
    /// The purpose flows, in stream order (`readings`, `readings-1`, …).
    pub flows: Vec<FlowConfig>,
    /// The policy of alarm-stream fields; `None`: alarm fields do not leave.
    pub alarms: Option<FlowConfig>,
    /// The policies an emergency collection may run under, each on [`Stream::EMERGENCY`]
    /// (one at a time), with the name `--policy` takes (the file stem).
    pub emergency: Vec<(String, FlowConfig)>,
    /// The longest emergency collection (`emergency_max`, default 24 h).
    pub emergency_max: std::time::Duration,
    /// The config uses the legacy `[purpose]` allow-list.
    pub legacy_purpose: bool,
}

impl PolicyConfig {
    /// Every flow: the purpose flows in stream order, the alarms policy's, then the
    /// emergency policies (each must be approved at the hub before it is needed).
    pub fn all(&self) -> impl Iterator<Item = &FlowConfig> {
        self.flows
            .iter()
            .chain(&self.alarms)
            .chain(self.emergency.iter().map(|(_, f)| f))
    }

    /// The emergency policy `name` (file stem or purpose name).
    pub fn emergency_policy(&self, name: &str) -> Option<&FlowConfig> {
        self.emergency
            .iter()
            .find(|(n, f)| n == name || f.policy.name() == name)
            .map(|(_, f)| f)
    }
}

/// The longest emergency collection unless `[policies] emergency_max` says otherwise.
pub const DEFAULT_EMERGENCY_MAX: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// The key `check` compiles with: policies do not depend on key material.
fn stand_in_key() -> PseudonymKey {
    PseudonymKey::from_bytes([0; 32])
}

/// The time zone `name` (IANA, e.g. "Asia/Shanghai"; or "UTC").
pub(super) fn time_zone(
    src: &SourceFile<'_>,
    name: Option<&Spanned<String>>,
    errors: &mut Vec<Diagnostic>,
) -> jiff::tz::TimeZone {
    let Some(name) = name else {
        return jiff::tz::TimeZone::UTC;
    };
    jiff::tz::TimeZone::get(name.get_ref()).unwrap_or_else(|_| {
        errors.push(src.at(
            name.span(),
            "gateway.time_zone",
            format!(
                "{:?} is not a known time zone; valid: an IANA name such as \"Asia/Shanghai\" or \"UTC\"",
                name.get_ref()
            ),
        ));
        jiff::tz::TimeZone::UTC
    })
}

/// The inline policy text of a legacy `[purpose]`: each listed field passes (identifying
/// fields as pseudonyms); everything else is denied.
fn legacy_policy_text(
    purpose: &RawPurpose,
    fields: &[FieldName],
    identifying: &dyn Fn(&FieldName) -> bool,
) -> String {
    let mut text = format!(
        "[purpose]\nname = {:?}\ndescription = {:?}\nlegal_basis = \"declared in the gateway config ([purpose])\"\nowner = \"the gateway operator\"\nretention = \"3650d\"\n",
        purpose.name.get_ref(),
        purpose.description.as_deref().unwrap_or("")
    );
    for f in fields {
        let action = if identifying(f) {
            "pseudonymise"
        } else {
            "pass"
        };
        text.push_str(&format!(
            "\n[[rule]]\nfield = {:?}\naction = {action:?}\n",
            f.as_str()
        ));
    }
    text
}

/// Everything [`resolve`] needs from the rest of the config.
pub(super) struct Inputs<'a> {
    pub src: &'a SourceFile<'a>,
    pub path: &'a Path,
    pub base: &'a Path,
    pub profiles: &'a ProfileSet,
    pub profiles_loaded: bool,
    pub tz: jiff::tz::TimeZone,
}

/// Builds the flows from `[policies]` or a legacy `[purpose]` (exactly one of them).
pub(super) fn resolve(
    cx: &Inputs<'_>,
    policies: Option<RawPolicies>,
    purpose: Option<(RawPurpose, Vec<FieldName>)>,
    errors: &mut Vec<Diagnostic>,
) -> PolicyConfig {
    let mut out = PolicyConfig {
        time_zone: cx.tz.clone(),
        flows: Vec::new(),
        alarms: None,
        emergency: Vec::new(),
        emergency_max: DEFAULT_EMERGENCY_MAX,
        legacy_purpose: false,
    };
    let compile = |source: PolicySource, stream: Stream, errors: &mut Vec<Diagnostic>| match source
        .compile(&cx.tz, stand_in_key())
    {
        Ok(policy) => {
            if cx.profiles_loaded {
                errors.extend(policy.check_against(cx.profiles));
            }
            Some(FlowConfig {
                stream,
                source,
                policy: Arc::new(policy),
            })
        }
        Err(mut e) => {
            errors.append(&mut e);
            None
        }
    };
    match (policies, purpose) {
        (Some(_), Some((purpose, _))) => errors.push(cx.src.at(
            purpose.name.span(),
            "purpose",
            "[purpose] and [policies] cannot both be set; keep [policies] (see config/policies/)",
        )),
        (None, None) => errors.push(cx.src.at(
            0..0,
            "policies",
            "missing: declare what leaves the box, e.g. [policies] flows = [\"billing\"] \
             (policy files in config/policies/)",
        )),
        (None, Some((purpose, fields))) => {
            let identifying = |f: &FieldName| {
                cx.profiles
                    .iter()
                    .flat_map(|p| p.fields.iter())
                    .any(|pf| pf.name == *f && pf.class.is_identifying())
            };
            let text = legacy_policy_text(&purpose, &fields, &identifying);
            let source = PolicySource::Inline {
                path: cx.path.to_path_buf(),
                text,
            };
            out.legacy_purpose = true;
            out.flows
                .extend(compile(source.clone(), Stream::Readings, errors));
            out.alarms = compile(source, Stream::Alarms, errors);
        }
        (Some(raw), None) => {
            let dir = crate::config::resolve_path(
                cx.base,
                raw.dir.as_deref().unwrap_or(Path::new("policies")),
            );
            let file = |name: &Spanned<String>, key: &str, errors: &mut Vec<Diagnostic>| {
                let n = name.get_ref();
                if n.is_empty() || n.contains(['/', '\\']) || n.starts_with('.') {
                    errors.push(cx.src.at(
                        name.span(),
                        key,
                        format!(
                            "{n:?} is not a policy name; valid: a file stem in {}",
                            dir.display()
                        ),
                    ));
                    return None;
                }
                let path = dir.join(format!("{n}.toml"));
                if !path.is_file() {
                    errors.push(cx.src.at(
                        name.span(),
                        key,
                        format!(
                            "no policy file {}; valid: {}",
                            path.display(),
                            available(&dir)
                        ),
                    ));
                    return None;
                }
                Some(PolicySource::File(path))
            };
            if raw.flows.get_ref().is_empty()
                || raw.flows.get_ref().len() > Stream::MAX_CONFIG_FLOWS
            {
                errors.push(cx.src.at(
                    raw.flows.span(),
                    "policies.flows",
                    format!(
                        "name 1 to {} policies, e.g. [\"billing\"] (the last stream is kept for emergency collection)",
                        Stream::MAX_CONFIG_FLOWS
                    ),
                ));
            }
            let mut names: BTreeMap<String, ()> = BTreeMap::new();
            for (i, name) in raw
                .flows
                .get_ref()
                .iter()
                .take(Stream::MAX_CONFIG_FLOWS)
                .enumerate()
            {
                if names.insert(name.get_ref().clone(), ()).is_some() {
                    errors.push(cx.src.at(
                        name.span(),
                        "policies.flows",
                        format!(
                            "{:?} is named twice; each purpose is one flow",
                            name.get_ref()
                        ),
                    ));
                    continue;
                }
                let stream = Stream::flow(i).expect("invariant: at most MAX_FLOWS flows");
                if let Some(source) = file(name, "policies.flows", errors) {
                    out.flows.extend(compile(source, stream, errors));
                }
            }
            if let Some(name) = &raw.alarms {
                if let Some(source) = file(name, "policies.alarms", errors) {
                    out.alarms = compile(source, Stream::Alarms, errors);
                }
            }
            for name in raw.emergency.iter().flatten() {
                if out.emergency.iter().any(|(n, _)| n == name.get_ref()) {
                    errors.push(cx.src.at(
                        name.span(),
                        "policies.emergency",
                        format!("{:?} is named twice", name.get_ref()),
                    ));
                    continue;
                }
                if let Some(source) = file(name, "policies.emergency", errors) {
                    if let Some(f) = compile(source, Stream::EMERGENCY, errors) {
                        out.emergency.push((name.get_ref().clone(), f));
                    }
                }
            }
            if let Some(max) = &raw.emergency_max {
                match humantime::parse_duration(max.get_ref()) {
                    Ok(d) if !d.is_zero() => out.emergency_max = d,
                    _ => errors.push(cx.src.at(
                        max.span(),
                        "policies.emergency_max",
                        format!(
                            "{:?} is not a duration; valid: a positive duration such as \"24h\"",
                            max.get_ref()
                        ),
                    )),
                }
            }
            let mut purposes = BTreeMap::new();
            for f in out.all() {
                if let Some(other) =
                    purposes.insert(f.policy.name().to_string(), f.source.path().to_path_buf())
                {
                    errors.push(Diagnostic {
                        file: f.source.path().to_path_buf(),
                        line: 0,
                        col: 0,
                        key: "purpose.name".into(),
                        message: format!(
                            "purpose {:?} is also the purpose of {}; each flow needs its own purpose name",
                            f.policy.name(),
                            other.display()
                        ),
                    });
                }
            }
        }
    }
    out
}

/// The policy names in `dir`, for error messages.
fn available(dir: &Path) -> String {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let p = e.path();
                    if p.extension()? == "toml" {
                        Some(p.file_stem()?.to_string_lossy().into_owned())
                    } else {
                        None
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    if names.is_empty() {
        format!("(no .toml files in {})", dir.display())
    } else {
        names.join(", ")
    }
}
