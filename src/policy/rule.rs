//! Compiled policy rules: validated once from the file, immutable afterwards.

use std::fmt;

use super::window::{DayDivision, Hours};
use crate::reading::{AggFn, Category, Classification, FieldName, Grade};

/// Where a rule (or one of its keys) is in its file: 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Loc {
    pub line: usize,
    pub col: usize,
}

/// Which readings a rule is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// `field = "…"`: every field rule naming a field applies to it.
    Field(FieldName),
    /// `category` / `grade` / `personal` (each optional, at least one): the first class
    /// rule that matches applies to fields no field rule names.
    Class {
        category: Option<Category>,
        grade: Option<Grade>,
        personal: Option<bool>,
    },
}

impl Selector {
    pub(crate) fn matches_class(&self, class: &Classification) -> bool {
        match self {
            Selector::Field(_) => false,
            Selector::Class {
                category,
                grade,
                personal,
            } => {
                category.map_or(true, |c| c == class.category)
                    && grade.map_or(true, |g| g == class.grade)
                    && personal.map_or(true, |p| p == class.personal)
            }
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Field(name) => write!(f, "field={name}"),
            Selector::Class {
                category,
                grade,
                personal,
            } => {
                let mut sep = "";
                if let Some(c) = category {
                    write!(f, "category={}", category_str(*c))?;
                    sep = ",";
                }
                if let Some(g) = grade {
                    write!(f, "{sep}grade={g:?}")?;
                    sep = ",";
                }
                if let Some(p) = personal {
                    write!(f, "{sep}personal={p}")?;
                }
                Ok(())
            }
        }
    }
}

pub(crate) fn category_str(c: Category) -> &'static str {
    match c {
        Category::Identifier => "identifier",
        Category::Measurement => "measurement",
        Category::Status => "status",
        Category::Alarm => "alarm",
    }
}

/// How a numeric value is coarsened.
#[derive(Debug, Clone, PartialEq)]
pub enum ValueStep {
    /// Rounded to the nearest multiple of the step.
    Step(f64),
    /// Replaced by the text label of its bucket: with edges `[0, 200, 220]` a value
    /// leaves as `"[-inf,0)"`, `"[0,200)"`, `"[200,220)"` or `"[220,inf)"`.
    Buckets(Vec<f64>),
}

/// `action = "generalise"`.
#[derive(Debug, Clone, PartialEq)]
pub struct Generalise {
    pub value: Option<ValueStep>,
    /// Timestamps floored to this civil step (aligned to local midnight).
    pub time_step: Option<DayDivision>,
}

/// How per-device window values of an area are combined (`across`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Across {
    Sum,
    Mean,
    Min,
    Max,
}

impl Across {
    pub(crate) const NAMES: &'static str = "\"sum\", \"mean\", \"min\", \"max\"";

    pub(crate) fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "sum" => Across::Sum,
            "mean" => Across::Mean,
            "min" => Across::Min,
            "max" => Across::Max,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Across::Sum => "sum",
            Across::Mean => "mean",
            Across::Min => "min",
            Across::Max => "max",
        }
    }
}

/// `over = "area"`: an aggregate across the devices of an area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Group {
    pub across: Across,
    /// Smallest number of contributing devices for the aggregate to leave (k-anonymity).
    pub k: u32,
}

/// Default k of an area aggregate.
pub const DEFAULT_K: u32 = 5;

/// `action = "aggregate"`.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregate {
    pub function: AggFn,
    pub window: DayDivision,
    pub group: Option<Group>,
    /// Only samples whose local time of day falls in this range are folded.
    pub hours: Option<Hours>,
}

/// What a rule does with the readings it applies to.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Pass,
    Drop,
    Pseudonymise,
    Generalise(Generalise),
    Aggregate(Aggregate),
}

impl Action {
    pub(crate) const NAMES: &'static str =
        "\"pass\", \"drop\", \"pseudonymise\", \"generalise\", \"aggregate\"";

    /// The action's name as written in policy files.
    pub fn name(&self) -> &'static str {
        match self {
            Action::Pass => "pass",
            Action::Drop => "drop",
            Action::Pseudonymise => "pseudonymise",
            Action::Generalise(_) => "generalise",
            Action::Aggregate(_) => "aggregate",
        }
    }

    /// Whether the value leaves per device in a form that still carries it (the actions
    /// an L4 personal field needs an `override_reason` for).
    pub(crate) fn reveals_per_device(&self) -> bool {
        match self {
            Action::Pass | Action::Generalise(_) => true,
            Action::Aggregate(a) => a.group.is_none(),
            Action::Drop | Action::Pseudonymise => false,
        }
    }

    /// Whether the action computes on the value (needs a numeric field).
    pub(crate) fn is_numeric(&self) -> bool {
        match self {
            Action::Aggregate(_) => true,
            Action::Generalise(g) => g.value.is_some(),
            _ => false,
        }
    }
}

/// The action with its form and resolution, as `policy explain` shows it and as the
/// policy hash covers it: `aggregate delta 1d`, `aggregate mean 15m over area (sum, k=5)`,
/// `generalise step 5 time_step 15m`.
impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())?;
        match self {
            Action::Generalise(g) => {
                match &g.value {
                    Some(ValueStep::Step(s)) => write!(f, " step {s}")?,
                    Some(ValueStep::Buckets(b)) => write!(f, " buckets {b:?}")?,
                    None => {}
                }
                if let Some(t) = g.time_step {
                    write!(f, " time_step {t}")?;
                }
                Ok(())
            }
            Action::Aggregate(a) => {
                write!(f, " {} {}", a.function.as_str(), a.window)?;
                if let Some(h) = a.hours {
                    write!(f, " hours {h}")?;
                }
                if let Some(g) = a.group {
                    write!(f, " over area ({}, k={})", g.across.as_str(), g.k)?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// One validated `[[rule]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// 0-based position in the file (`rule[i]` in diagnostics).
    pub index: usize,
    pub selector: Selector,
    pub action: Action,
    pub override_reason: Option<String>,
    pub note: Option<String>,
    /// The rule's `action` key.
    pub loc: Loc,
    /// The rule's `function` key, for errors about it.
    pub(crate) function_loc: Option<Loc>,
    /// The rule's `field` key, for errors about it.
    pub(crate) field_loc: Option<Loc>,
}
