//! The policy file as written (serde, `deny_unknown_fields`) and its one-time conversion
//! into validated [`Rule`]s, collecting every error with its location.

use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::rule::{
    Across, Action, Aggregate, Generalise, Group, Loc, Rule, Selector, ValueStep, DEFAULT_K,
};
use super::window::{DayDivision, Hours};
use super::PurposeMeta;
use crate::diag::{Diagnostic, SourceFile};
use crate::reading::{AggFn, Category, FieldName, Grade};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    purpose: RawPurpose,
    #[serde(rename = "rule", default)]
    rules: Vec<RawRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPurpose {
    name: Spanned<String>,
    description: String,
    legal_basis: String,
    owner: String,
    retention: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    field: Option<Spanned<String>>,
    category: Option<Spanned<Category>>,
    grade: Option<Spanned<Grade>>,
    personal: Option<Spanned<bool>>,
    action: Spanned<String>,
    function: Option<Spanned<String>>,
    window: Option<Spanned<String>>,
    over: Option<Spanned<String>>,
    across: Option<Spanned<String>>,
    k: Option<Spanned<i64>>,
    hours: Option<Spanned<String>>,
    step: Option<Spanned<f64>>,
    buckets: Option<Spanned<Vec<f64>>>,
    time_step: Option<Spanned<String>>,
    override_reason: Option<Spanned<String>>,
    note: Option<String>,
}

/// A parsed, validated policy file: its purpose and rules.
pub(super) struct Parsed {
    pub meta: PurposeMeta,
    pub rules: Vec<Rule>,
}

struct Check<'a> {
    src: SourceFile<'a>,
    errors: Vec<Diagnostic>,
}

impl Check<'_> {
    fn err(&mut self, span: Range<usize>, key: String, message: impl Into<String>) {
        self.errors.push(self.src.at(span, key, message));
    }

    fn loc(&self, span: Range<usize>) -> Loc {
        let (line, col) = crate::diag::line_col(self.src.text, span.start);
        Loc { line, col }
    }
}

pub(super) fn parse(path: &Path, text: &str) -> Result<Parsed, Vec<Diagnostic>> {
    let src = SourceFile::new(path, text);
    let raw: RawPolicy = src.parse().map_err(|d| vec![d])?;
    let mut c = Check {
        src,
        errors: Vec::new(),
    };
    let name = raw.purpose.name.get_ref();
    if let Err(e) = FieldName::new(name.as_str()) {
        let msg = e.to_string().replace("field name", "purpose name");
        c.err(raw.purpose.name.span(), "purpose.name".into(), msg);
    }
    let retention = match humantime::parse_duration(raw.purpose.retention.get_ref().trim()) {
        Ok(d) if d >= Duration::from_secs(3600) => d,
        _ => {
            c.err(
                raw.purpose.retention.span(),
                "purpose.retention".into(),
                format!(
                    "invalid retention {:?}; valid: a duration of at least 1h, e.g. \"30d\", \"400d\"",
                    raw.purpose.retention.get_ref()
                ),
            );
            Duration::ZERO
        }
    };
    let rules: Vec<Rule> = raw
        .rules
        .into_iter()
        .enumerate()
        .filter_map(|(i, r)| convert_rule(&mut c, i, r))
        .collect();
    if !c.errors.is_empty() {
        return Err(c.errors);
    }
    Ok(Parsed {
        meta: PurposeMeta {
            name: name.clone(),
            description: raw.purpose.description,
            legal_basis: raw.purpose.legal_basis,
            owner: raw.purpose.owner,
            retention,
        },
        rules,
    })
}

fn convert_rule(c: &mut Check<'_>, i: usize, r: RawRule) -> Option<Rule> {
    let key = |k: &str| format!("rule[{i}].{k}");
    let before = c.errors.len();
    let selector = selector(c, i, &r);
    let action = action(c, i, &r);
    if let Some(reason) = &r.override_reason {
        if reason.get_ref().trim().is_empty() {
            c.err(
                reason.span(),
                key("override_reason"),
                "must say why; valid: a non-empty reason",
            );
        }
    }
    let (selector, action) = (selector?, action?);
    if let Selector::Class {
        category, personal, ..
    } = &selector
    {
        // Class rules that pin an identifying classification can be judged now; the rest
        // are judged against the profiles (`check_against`).
        let identifying = *category == Some(Category::Identifier)
            || (*personal == Some(true)
                && matches!(category, Some(Category::Status | Category::Alarm)));
        if identifying && !matches!(action, Action::Pseudonymise | Action::Drop) {
            c.err(
                r.action.span(),
                key("action"),
                format!(
                    "identifying fields leave only as pseudonyms, not `{}`; valid: \"pseudonymise\", \"drop\"",
                    action.name()
                ),
            );
        }
        if let Selector::Class {
            grade: Some(Grade::L4),
            personal: Some(true),
            ..
        } = &selector
        {
            if action.reveals_per_device() && r.override_reason.is_none() {
                c.err(r.action.span(), key("action"), l4_message(&action));
            }
        }
    }
    if c.errors.len() > before {
        return None;
    }
    Some(Rule {
        index: i,
        selector,
        action,
        override_reason: r.override_reason.map(Spanned::into_inner),
        note: r.note,
        loc: c.loc(r.action.span()),
        function_loc: r.function.as_ref().map(|f| c.loc(f.span())),
        field_loc: r.field.as_ref().map(|f| c.loc(f.span())),
    })
}

pub(super) fn l4_message(action: &Action) -> String {
    format!(
        "`{}` on an L4 personal field sends it per device; add `override_reason = \"…\"` saying why, or valid: \"drop\", \"pseudonymise\", an area aggregate (`over = \"area\"`)",
        action.name()
    )
}

fn selector(c: &mut Check<'_>, i: usize, r: &RawRule) -> Option<Selector> {
    let class_given = r.category.is_some() || r.grade.is_some() || r.personal.is_some();
    match &r.field {
        Some(f) if class_given => {
            c.err(
                f.span(),
                format!("rule[{i}].field"),
                "a rule names either a field or a classification; valid: `field`, or any of `category`, `grade`, `personal`",
            );
            None
        }
        Some(f) => match FieldName::new(f.get_ref().as_str()) {
            Ok(name) => Some(Selector::Field(name)),
            Err(e) => {
                c.err(f.span(), format!("rule[{i}].field"), e.to_string());
                None
            }
        },
        None if !class_given => {
            c.err(
                r.action.span(),
                format!("rule[{i}]"),
                "the rule applies to nothing; valid: `field = \"…\"`, or any of `category`, `grade`, `personal`",
            );
            None
        }
        None => Some(Selector::Class {
            category: r.category.as_ref().map(|s| *s.get_ref()),
            grade: r.grade.as_ref().map(|s| *s.get_ref()),
            personal: r.personal.as_ref().map(|s| *s.get_ref()),
        }),
    }
}

/// Reports keys that only an action other than `name` takes.
fn only_for(c: &mut Check<'_>, i: usize, name: &str, keys: &[(&str, Option<Range<usize>>)]) {
    for (k, span) in keys {
        if let Some(span) = span {
            let owner = if ["step", "buckets", "time_step"].contains(k) {
                "generalise"
            } else {
                "aggregate"
            };
            c.err(
                span.clone(),
                format!("rule[{i}].{k}"),
                format!("`{k}` applies to action = \"{owner}\" only, not \"{name}\"; valid: remove `{k}`, or action = \"{owner}\""),
            );
        }
    }
}

fn action(c: &mut Check<'_>, i: usize, r: &RawRule) -> Option<Action> {
    let key = |k: &str| format!("rule[{i}].{k}");
    let name = r.action.get_ref().as_str();
    let agg_keys = [
        ("function", r.function.as_ref().map(Spanned::span)),
        ("window", r.window.as_ref().map(Spanned::span)),
        ("over", r.over.as_ref().map(Spanned::span)),
        ("across", r.across.as_ref().map(Spanned::span)),
        ("k", r.k.as_ref().map(Spanned::span)),
        ("hours", r.hours.as_ref().map(Spanned::span)),
    ];
    let gen_keys = [
        ("step", r.step.as_ref().map(Spanned::span)),
        ("buckets", r.buckets.as_ref().map(Spanned::span)),
        ("time_step", r.time_step.as_ref().map(Spanned::span)),
    ];
    match name {
        "pass" | "drop" | "pseudonymise" => {
            only_for(c, i, name, &agg_keys);
            only_for(c, i, name, &gen_keys);
            Some(match name {
                "pass" => Action::Pass,
                "drop" => Action::Drop,
                _ => Action::Pseudonymise,
            })
        }
        "generalise" => {
            only_for(c, i, name, &agg_keys);
            generalise(c, i, r).map(Action::Generalise)
        }
        "aggregate" => {
            only_for(c, i, name, &gen_keys);
            aggregate(c, i, r).map(Action::Aggregate)
        }
        other => {
            c.err(
                r.action.span(),
                key("action"),
                format!("unknown action {other:?}; valid: {}", Action::NAMES),
            );
            None
        }
    }
}

fn generalise(c: &mut Check<'_>, i: usize, r: &RawRule) -> Option<Generalise> {
    let key = |k: &str| format!("rule[{i}].{k}");
    let before = c.errors.len();
    let value = match (&r.step, &r.buckets) {
        (Some(s), Some(_)) => {
            c.err(
                s.span(),
                key("step"),
                "`step` and `buckets` are alternatives; valid: one of them",
            );
            None
        }
        (Some(s), None) => {
            let v = *s.get_ref();
            if !(v.is_finite() && v > 0.0) {
                c.err(
                    s.span(),
                    key("step"),
                    format!("step {v} is not valid; valid: a positive number"),
                );
            }
            Some(ValueStep::Step(v))
        }
        (None, Some(b)) => {
            let edges = b.get_ref();
            let increasing = edges.windows(2).all(|w| w[0] < w[1]);
            if edges.is_empty() || !increasing || edges.iter().any(|e| !e.is_finite()) {
                c.err(
                    b.span(),
                    key("buckets"),
                    "valid: one or more finite bucket edges in increasing order, e.g. [0, 200, 220, 240]",
                );
            }
            Some(ValueStep::Buckets(edges.clone()))
        }
        (None, None) => None,
    };
    let time_step = r.time_step.as_ref().and_then(|t| {
        DayDivision::parse(t.get_ref(), 1)
            .map_err(|e| c.err(t.span(), key("time_step"), e))
            .ok()
    });
    if value.is_none() && r.time_step.is_none() && c.errors.len() == before {
        c.err(
            r.action.span(),
            key("action"),
            "generalise needs how; valid: `step = …`, `buckets = […]` and/or `time_step = \"…\"`",
        );
    }
    (c.errors.len() == before).then_some(Generalise { value, time_step })
}

fn aggregate(c: &mut Check<'_>, i: usize, r: &RawRule) -> Option<Aggregate> {
    let key = |k: &str| format!("rule[{i}].{k}");
    let before = c.errors.len();
    let function = match &r.function {
        None => {
            c.err(
                r.action.span(),
                key("function"),
                "aggregate needs `function`; valid: \"sum\", \"mean\", \"min\", \"max\", \"last\", \"delta\"",
            );
            None
        }
        Some(f) => {
            let parsed = match f.get_ref().as_str() {
                "sum" => Some(AggFn::Sum),
                "mean" => Some(AggFn::Mean),
                "min" => Some(AggFn::Min),
                "max" => Some(AggFn::Max),
                "last" => Some(AggFn::Last),
                "delta" => Some(AggFn::Delta),
                _ => None,
            };
            if parsed.is_none() {
                c.err(
                    f.span(),
                    key("function"),
                    format!("unknown function {:?}; valid: \"sum\", \"mean\", \"min\", \"max\", \"last\", \"delta\"", f.get_ref()),
                );
            }
            parsed
        }
    };
    let window = match &r.window {
        None => {
            c.err(
                r.action.span(),
                key("window"),
                "aggregate needs `window`; valid: a duration that divides a day, e.g. \"15m\", \"1h\", \"1d\"",
            );
            None
        }
        Some(w) => DayDivision::parse(w.get_ref(), 60)
            .map_err(|e| c.err(w.span(), key("window"), e))
            .ok(),
    };
    let hours = r.hours.as_ref().and_then(|h| {
        Hours::parse(h.get_ref())
            .map_err(|e| c.err(h.span(), key("hours"), e))
            .ok()
    });
    let group = group(c, i, r);
    if c.errors.len() > before {
        return None;
    }
    Some(Aggregate {
        function: function?,
        window: window?,
        group: group?,
        hours,
    })
}

/// `Some(None)`: a per-device aggregate; `None`: an error was reported.
fn group(c: &mut Check<'_>, i: usize, r: &RawRule) -> Option<Option<Group>> {
    let key = |k: &str| format!("rule[{i}].{k}");
    let before = c.errors.len();
    match &r.over {
        Some(o) if o.get_ref() != "area" => {
            c.err(
                o.span(),
                key("over"),
                format!("unknown grouping {:?}; valid: \"area\"", o.get_ref()),
            );
        }
        Some(_) => {}
        None => {
            for (k, span) in [
                ("across", r.across.as_ref().map(Spanned::span)),
                ("k", r.k.as_ref().map(Spanned::span)),
            ] {
                if let Some(span) = span {
                    c.err(
                        span,
                        key(k),
                        format!("`{k}` needs a group aggregate; valid: add `over = \"area\"`, or remove `{k}`"),
                    );
                }
            }
        }
    }
    let across = match &r.across {
        Some(a) => Across::parse(a.get_ref()).or_else(|| {
            c.err(
                a.span(),
                key("across"),
                format!(
                    "unknown function {:?}; valid: {}",
                    a.get_ref(),
                    Across::NAMES
                ),
            );
            None
        }),
        None => Some(Across::Sum),
    };
    let k = match &r.k {
        Some(k) => match u32::try_from(*k.get_ref()) {
            Ok(v) if v >= 2 => Some(v),
            _ => {
                c.err(
                    k.span(),
                    key("k"),
                    format!(
                        "k = {} protects nobody; valid: 2 or more (default {DEFAULT_K})",
                        k.get_ref()
                    ),
                );
                None
            }
        },
        None => Some(DEFAULT_K),
    };
    if c.errors.len() > before {
        return None;
    }
    Some(r.over.as_ref().map(|_| Group {
        across: across.unwrap_or(Across::Sum),
        k: k.unwrap_or(DEFAULT_K),
    }))
}
