//! Judging a policy against the profiles whose fields it will see: the impossible
//! combinations that need a field's type, counter semantics or classification.

use std::collections::BTreeSet;

use super::rule::{Action, Loc, Rule, Selector};
use super::{CompiledPolicy, Why};
use crate::diag::Diagnostic;
use crate::profile::mqtt::ValueKind;
use crate::profile::{Counter, Field, FieldType, Profile, ProfileSet};
use crate::reading::AggFn;

/// What kind of value a profile field yields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Numeric,
    Bool,
    Text,
}

impl Kind {
    pub(crate) fn of(profile: &Profile, index: usize, field: &Field) -> Kind {
        let mqtt_kind = profile
            .mqtt
            .as_ref()
            .and_then(|m| m.fields.get(index))
            .map(|m| m.kind);
        match (mqtt_kind, field.ty) {
            (Some(ValueKind::Text), _) => Kind::Text,
            (_, FieldType::Bit(_)) => Kind::Bool,
            _ => Kind::Numeric,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Kind::Numeric => "numeric",
            Kind::Bool => "bool",
            Kind::Text => "text",
        }
    }
}

impl CompiledPolicy {
    /// Every rule that cannot apply to a field of `profiles` as written: a numeric action
    /// (aggregate, generalise by value) on a bool or text field, `delta` on a field that
    /// is not a counter, an identifying field under anything but pseudonymise/drop, an L4
    /// personal field sent per device without `override_reason`, and a field rule naming
    /// a field no profile has (a typo would otherwise silently send nothing). Each error
    /// names the policy file, the rule's line and key, the profile and field, and what is
    /// valid.
    pub fn check_against(&self, profiles: &ProfileSet) -> Vec<Diagnostic> {
        let mut seen = BTreeSet::new();
        let mut out = self.unknown_fields(profiles);
        for p in profiles.iter() {
            for (i, f) in p.fields.iter().enumerate() {
                for d in self.decide(&f.name, &f.class) {
                    let Some(index) = d.rule else { continue };
                    let rule = self.rule(index);
                    if let Some((loc, key, msg)) = problem(rule, d.why, p, i, f) {
                        if seen.insert((index, key, f.name.clone(), msg.clone())) {
                            out.push(Diagnostic {
                                file: self.file().to_path_buf(),
                                line: loc.line,
                                col: loc.col,
                                key: format!("rule[{index}].{key}"),
                                message: msg,
                            });
                        }
                    }
                }
            }
        }
        out
    }

    /// Field rules naming a field that neither a profile in `profiles` nor citygate's
    /// vocabulary ([`KNOWN_FIELDS`](crate::profile::KNOWN_FIELDS)) has: a typo.
    fn unknown_fields(&self, profiles: &ProfileSet) -> Vec<Diagnostic> {
        let known: BTreeSet<&str> = profiles
            .iter()
            .flat_map(|p| p.fields.iter().map(|f| f.name.as_str()))
            .chain(crate::profile::KNOWN_FIELDS.iter().copied())
            .collect();
        self.rules()
            .iter()
            .filter_map(|rule| match &rule.selector {
                Selector::Field(name) if !known.contains(name.as_str()) => {
                    let loc = rule.field_loc.unwrap_or(rule.loc);
                    Some(Diagnostic {
                        file: self.file().to_path_buf(),
                        line: loc.line,
                        col: loc.col,
                        key: format!("rule[{}].field", rule.index),
                        message: format!(
                            "`{name}` is not a known field of any profile, so the rule would match nothing; valid: {}",
                            known.iter().copied().collect::<Vec<_>>().join(", ")
                        ),
                    })
                }
                _ => None,
            })
            .collect()
    }
}

fn problem(
    rule: &Rule,
    why: Why,
    profile: &Profile,
    index: usize,
    f: &Field,
) -> Option<(Loc, &'static str, String)> {
    let whose = format!("field `{}` of profile `{}`", f.name, profile.name);
    match why {
        Why::Identifying => {
            return Some((
                rule.loc,
                "action",
                format!(
                    "{whose} is identifying ({:?}{}) and leaves only as a pseudonym, not `{}`; valid: \"pseudonymise\", \"drop\"",
                    f.class.category,
                    if f.class.personal { ", personal" } else { "" },
                    rule.action.name()
                ),
            ))
        }
        Why::L4NeedsOverride => {
            return Some((
                rule.loc,
                "action",
                format!("{whose}: {}", super::raw::l4_message(&rule.action)),
            ))
        }
        _ => {}
    }
    let kind = Kind::of(profile, index, f);
    if rule.action.is_numeric() && kind != Kind::Numeric {
        return Some((
            rule.loc,
            "action",
            format!(
                "{whose} is {}; `{}` needs a numeric field; valid: \"pass\", \"pseudonymise\", \"drop\"",
                kind.as_str(),
                rule.action.name()
            ),
        ));
    }
    if let Action::Aggregate(a) = &rule.action {
        if a.function == AggFn::Delta && f.counter == Counter::None {
            return Some((
                rule.function_loc.unwrap_or(rule.loc),
                "function",
                format!(
                    "{whose} is not a counter (no `counter = \"monotonic\"` in its profile); `{}` needs one; valid: \"sum\", \"mean\", \"min\", \"max\", \"last\"",
                    a.function.as_str()
                ),
            ));
        }
    }
    None
}
