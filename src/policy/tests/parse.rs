//! Policy files: parsing, impossible combinations (issue 11 item 1), resolution, hash.

use std::path::Path;

use jiff::tz::TimeZone;

use super::super::*;
use crate::profile::{Profile, ProfileSet};
use crate::reading::{AggFn, Category, Grade};

const FILE: &str = "config/policies/test.toml";

const HEAD: &str = r#"[purpose]
name = "grid-operation"
description = "Feeder load and voltage quality for network operation"
legal_basis = "Electricity supply regulation art. 12"
owner = "DSO network operations"
retention = "400d"
"#;

/// The complete example of the module docs.
pub(super) const EXAMPLE: &str = r#"[purpose]
name = "leak-detection"
description = "Find leaks from hourly flow and the night-time minimum"
legal_basis = "Water supply contract §7; municipal water-loss programme"
owner = "Water utility, network operations"
retention = "90d"

[[rule]]
field = "volume_forward"
action = "aggregate"
function = "delta"
window = "1h"

[[rule]]
field = "flow_rate"
action = "aggregate"
function = "min"
window = "1d"
hours = "01:00-05:00"

[[rule]]
field = "flow_rate"
action = "aggregate"
function = "mean"
window = "15m"
over = "area"
across = "sum"
k = 5

[[rule]]
field = "water_temp_t1"
action = "generalise"
step = 0.5

[[rule]]
category = "identifier"
action = "pseudonymise"
"#;

const MODBUS_PROFILE: &str = r#"
[meter]
vendor = "T"
model = "E1"
protocol = "modbus"
[modbus]
function = 3
[[field]]
name = "energy_import"
register = 0
type = "u32"
unit = "Wh"
counter = "monotonic"
rollover = 100000.0
category = "measurement"
grade = "L3"
personal = true
[[field]]
name = "active_power"
register = 2
type = "f32"
unit = "W"
category = "measurement"
grade = "L4"
personal = true
[[field]]
name = "voltage_l1"
register = 4
type = "f32"
unit = "V"
category = "measurement"
grade = "L2"
[[field]]
name = "relay_open"
register = 6
type = "bit"
bit = 0
unit = "1"
category = "status"
grade = "L2"
[[field]]
name = "serial_number"
register = 7
type = "u32"
unit = "1"
category = "identifier"
grade = "L3"
"#;

const MQTT_PROFILE: &str = r#"
[meter]
vendor = "T"
model = "W1"
protocol = "mqtt"
[mqtt]
shape = "thingsboard"
[[field]]
name = "fw_version"
key = "fw"
type = "text"
unit = "1"
category = "status"
grade = "L1"
"#;

pub(super) fn tz() -> TimeZone {
    TimeZone::get("Asia/Shanghai").unwrap()
}

pub(super) fn policy_with(
    text: &str,
    key: u8,
    epoch: u32,
) -> Result<CompiledPolicy, Vec<Diagnostic>> {
    CompiledPolicy::parse(
        Path::new(FILE),
        text,
        tz(),
        PseudonymKey::from_bytes([key; 32]).with_epoch(epoch),
    )
}

fn policy(rules: &str) -> Result<CompiledPolicy, Vec<Diagnostic>> {
    policy_with(&format!("{HEAD}{rules}"), 1, 0)
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).unwrap() + 1
}

/// The single error of `rules`, asserted to be at the line containing `at` and about `key`.
fn one_error(rules: &str, at: &str, key: &str) -> Diagnostic {
    let errs = policy(rules).unwrap_err();
    assert_eq!(errs.len(), 1, "{errs:?}");
    let e = errs.into_iter().next().unwrap();
    let text = format!("{HEAD}{rules}");
    assert_eq!(e.line, line_of(&text, at), "{e}");
    assert_eq!(e.key, key, "{e}");
    let shown = e.to_string();
    assert!(shown.starts_with(&format!("{FILE}:{}:", e.line)), "{shown}");
    assert!(
        shown.contains("valid") || shown.contains("expected one of"),
        "says what is valid: {shown}"
    );
    e
}

fn profiles() -> ProfileSet {
    let mut set = ProfileSet::default();
    set.insert(Profile::parse(Path::new("firmware-profiles/t-e1.toml"), MODBUS_PROFILE).unwrap());
    set.insert(Profile::parse(Path::new("firmware-profiles/t-w1.toml"), MQTT_PROFILE).unwrap());
    set
}

/// The single error `check_against` reports for `rules`, at the line containing `at`.
fn one_profile_error(rules: &str, at: &str, key: &str) -> Diagnostic {
    let p = policy(rules).unwrap();
    let errs = p.check_against(&profiles());
    assert_eq!(errs.len(), 1, "{errs:?}");
    let e = errs.into_iter().next().unwrap();
    assert_eq!(e.line, line_of(&format!("{HEAD}{rules}"), at), "{e}");
    assert_eq!(e.key, key, "{e}");
    assert!(
        e.to_string().starts_with(&format!("{FILE}:{}:", e.line)),
        "{e}"
    );
    assert!(e.message.contains("valid"), "{e}");
    e
}

/// issue 11 item 1: the documented example is a complete, valid policy.
#[test]
fn the_documented_example_parses() {
    let p = policy_with(EXAMPLE, 1, 0).unwrap();
    assert!(include_str!("../mod.rs").contains("hours = \"01:00-05:00\""));
    assert_eq!(p.name(), "leak-detection");
    assert_eq!(p.retention(), Duration::from_secs(90 * 86_400));
    assert_eq!(p.rules().len(), 5);
    assert_eq!(
        p.rules()[2].action.to_string(),
        "aggregate mean 15m over area (sum, k=5)"
    );
    assert_eq!(
        p.rules()[1].action.to_string(),
        "aggregate min 1d hours 01:00-05:00"
    );
    let shipped =
        ProfileSet::load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("firmware-profiles"))
            .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(p.check_against(&shipped), Vec::new());
    // A field these profiles lack but citygate knows (a shared policy on an electricity-only
    // box) is fine; a name in neither is a typo that would match nothing.
    let errs = p.check_against(&profiles());
    assert!(!errs.iter().any(|e| e.key == "rule[0].field"), "{errs:?}");
    let typo = CompiledPolicy::parse(
        Path::new(FILE),
        &EXAMPLE.replacen(
            "field = \"volume_forward\"",
            "field = \"volume_froward\"",
            1,
        ),
        tz(),
        PseudonymKey::from_bytes([1; 32]),
    )
    .unwrap();
    let errs = typo.check_against(&profiles());
    assert!(
        errs.iter().any(|e| e.key == "rule[0].field"
            && e.line == 9
            && e.message
                .contains("`volume_froward` is not a known field of any profile")),
        "{errs:?}"
    );
}

/// issue 11 item 1: unknown keys are errors with file:line and key.
#[test]
fn unknown_keys_are_located() {
    let e = one_error(
        "[[rule]]\nfield = \"voltage_l1\"\naction = \"pass\"\nwindw = \"1h\"\n",
        "windw",
        "rule.windw",
    );
    assert!(e.message.contains("window"), "lists the valid keys: {e}");
    let errs = policy_with(&HEAD.replace("owner", "owners"), 1, 0).unwrap_err();
    assert_eq!(errs[0].key, "purpose.owners", "{errs:?}");
}

/// issue 11 item 1: a window must divide the day.
#[test]
fn window_that_does_not_divide_a_day_is_an_error() {
    let e = one_error(
        "[[rule]]\nfield = \"active_power\"\naction = \"aggregate\"\nfunction = \"mean\"\nwindow = \"7m\"\nover = \"area\"\n",
        "window =",
        "rule[0].window",
    );
    assert!(e.message.contains("divide"), "{e}");
}

/// issue 11 item 4: k below 2 protects nobody.
#[test]
fn k_below_two_is_an_error() {
    one_error(
        "[[rule]]\nfield = \"active_power\"\naction = \"aggregate\"\nfunction = \"sum\"\nwindow = \"15m\"\nover = \"area\"\nk = 1\n",
        "k = 1",
        "rule[0].k",
    );
}

/// issue 11 item 4: `across` needs `over = "area"`.
#[test]
fn across_without_over_is_an_error() {
    one_error(
        "[[rule]]\nfield = \"voltage_l1\"\naction = \"aggregate\"\nfunction = \"mean\"\nwindow = \"15m\"\nacross = \"sum\"\n",
        "across",
        "rule[0].across",
    );
}

/// issue 11 item 1: keys of another action, unknown actions and functions, bad buckets.
#[test]
fn misplaced_and_unknown_values_are_errors() {
    one_error(
        "[[rule]]\nfield = \"voltage_l1\"\naction = \"pass\"\nstep = 5.0\n",
        "step",
        "rule[0].step",
    );
    one_error(
        "[[rule]]\nfield = \"voltage_l1\"\naction = \"keep\"\n",
        "keep",
        "rule[0].action",
    );
    one_error(
        "[[rule]]\nfield = \"voltage_l1\"\naction = \"aggregate\"\nfunction = \"median\"\nwindow = \"1h\"\n",
        "median",
        "rule[0].function",
    );
    one_error(
        "[[rule]]\nfield = \"voltage_l1\"\naction = \"generalise\"\nbuckets = [240, 220]\n",
        "buckets",
        "rule[0].buckets",
    );
    one_error(
        "[[rule]]\nfield = \"voltage_l1\"\ncategory = \"status\"\naction = \"drop\"\n",
        "field =",
        "rule[0].field",
    );
}

/// issue 11 item 1: a class rule that pins identifiers may only pseudonymise or drop.
#[test]
fn identifier_class_rule_that_passes_is_an_error() {
    one_error(
        "[[rule]]\ncategory = \"identifier\"\naction = \"pass\"\n",
        "action",
        "rule[0].action",
    );
}

/// issue 11 item 1: `pass` on L4 personal data needs an explicit override with a reason.
#[test]
fn l4_personal_class_rule_needs_an_override() {
    let rules = "[[rule]]\ngrade = \"L4\"\npersonal = true\naction = \"pass\"\n";
    let e = one_error(rules, "action", "rule[0].action");
    assert!(e.message.contains("override_reason"), "{e}");
    let ok = format!("{rules}override_reason = \"feeder meters only, no households\"\n");
    assert!(policy(&ok).is_ok());
    one_error(
        &format!("{rules}override_reason = \" \"\n"),
        "override_reason",
        "rule[0].override_reason",
    );
}

/// issue 11 item 1: aggregating a text field is an error with file:line (needs profiles).
#[test]
fn aggregating_text_is_an_error() {
    let e = one_profile_error(
        "[[rule]]\nfield = \"fw_version\"\naction = \"aggregate\"\nfunction = \"last\"\nwindow = \"1d\"\n",
        "action",
        "rule[0].action",
    );
    assert!(
        e.message.contains("text") && e.message.contains("t-w1"),
        "{e}"
    );
}

/// issue 11 item 1: generalising a bool field is an error.
#[test]
fn generalising_a_bool_is_an_error() {
    let e = one_profile_error(
        "[[rule]]\nfield = \"relay_open\"\naction = \"generalise\"\nstep = 1.0\n",
        "action",
        "rule[0].action",
    );
    assert!(e.message.contains("bool"), "{e}");
}

/// issue 11 item 1: `delta` on a field that is not a counter.
#[test]
fn delta_on_a_gauge_is_an_error() {
    let e = one_profile_error(
        "[[rule]]\nfield = \"voltage_l1\"\naction = \"aggregate\"\nfunction = \"delta\"\nwindow = \"1h\"\n",
        "function",
        "rule[0].function",
    );
    assert!(e.message.contains("counter"), "{e}");
}

/// issue 11 item 1: `pass` on an L4 personal field without override, by field rule.
#[test]
fn passing_an_l4_personal_field_is_an_error() {
    let rules = "[[rule]]\nfield = \"active_power\"\naction = \"pass\"\n";
    let e = one_profile_error(rules, "action", "rule[0].action");
    assert!(e.message.contains("override_reason"), "{e}");
    let with = format!("{rules}override_reason = \"commissioning check on a feeder meter\"\n");
    assert!(policy(&with).unwrap().check_against(&profiles()).is_empty());
    let area = "[[rule]]\nfield = \"active_power\"\naction = \"aggregate\"\nfunction = \"mean\"\nwindow = \"15m\"\nover = \"area\"\n";
    assert!(policy(area).unwrap().check_against(&profiles()).is_empty());
}

/// issue 11 item 1: identifier fields may only be pseudonymised or dropped.
#[test]
fn passing_an_identifier_field_is_an_error() {
    one_profile_error(
        "[[rule]]\nfield = \"serial_number\"\naction = \"pass\"\n",
        "action",
        "rule[0].action",
    );
    // A class rule broad enough to reach identifiers is judged per field too.
    one_profile_error(
        "[[rule]]\ngrade = \"L3\"\naction = \"pass\"\n",
        "action",
        "rule[0].action",
    );
}

fn class(category: Category, grade: Grade, personal: bool) -> Classification {
    Classification {
        category,
        grade,
        personal,
    }
}

/// issue 11 item 1: field rules all apply, else the first matching class rule, else
/// default deny; guards drop what a rule may not send.
#[test]
fn resolution_order_and_default_deny() {
    let p = policy(
        "[[rule]]\nfield = \"flow_rate\"\naction = \"aggregate\"\nfunction = \"mean\"\nwindow = \"1h\"\n\
         [[rule]]\nfield = \"flow_rate\"\naction = \"aggregate\"\nfunction = \"min\"\nwindow = \"1d\"\nhours = \"00:00-05:00\"\n\
         [[rule]]\ncategory = \"measurement\"\ngrade = \"L2\"\naction = \"generalise\"\nstep = 5.0\n\
         [[rule]]\ncategory = \"measurement\"\naction = \"drop\"\n\
         [[rule]]\ngrade = \"L1\"\naction = \"pass\"\n",
    )
    .unwrap();
    let m3 = class(Category::Measurement, Grade::L3, true);
    let flow = p.decide(&FieldName::new("flow_rate").unwrap(), &m3);
    assert_eq!(flow.len(), 2);
    assert!(flow.iter().all(|d| d.why == Why::FieldRule));
    assert_eq!(flow[1].line, Some(HEAD.lines().count() + 8));
    let v = p.decide(
        &FieldName::new("voltage_l1").unwrap(),
        &class(Category::Measurement, Grade::L2, false),
    );
    assert_eq!((v.len(), v[0].why, v[0].rule), (1, Why::ClassRule, Some(2)));
    let e = p.decide(&FieldName::new("energy_import").unwrap(), &m3);
    assert_eq!((e[0].action.clone(), e[0].rule), (Action::Drop, Some(3)));
    let s = p.decide(
        &FieldName::new("relay_open").unwrap(),
        &class(Category::Status, Grade::L2, false),
    );
    assert_eq!(
        (s[0].action.clone(), s[0].why),
        (Action::Drop, Why::DefaultDeny)
    );
    let id = p.decide(
        &FieldName::new("meter_no").unwrap(),
        &class(Category::Identifier, Grade::L1, false),
    );
    assert_eq!(
        (id[0].action.clone(), id[0].why),
        (Action::Drop, Why::Identifying)
    );
}

/// issue 11 items 2/9: the hash names content and zone, not layout and not key material
/// (records carry the epoch; a rotation needs no new approval).
#[test]
fn hash_covers_content_and_zone_but_not_comments_or_keys() {
    let base = policy_with(EXAMPLE, 1, 0).unwrap();
    let h = base.hash(&["p@1".into(), "q@2".into()]);
    assert_eq!(h, base.hash(&["q@2".into(), "p@1".into()]));
    let commented = EXAMPLE.replace("[[rule]]\n", "# why\n[[rule]]  # this rule\n");
    assert_eq!(
        policy_with(&commented, 1, 0)
            .unwrap()
            .hash(&["p@1".into(), "q@2".into()]),
        h
    );
    let versions = ["p@1".to_string(), "q@2".to_string()];
    assert_eq!(policy_with(EXAMPLE, 2, 0).unwrap().hash(&versions), h);
    assert_eq!(policy_with(EXAMPLE, 1, 1).unwrap().hash(&versions), h);
    assert_ne!(base.hash(&["p@1".into()]), h);
    let finer = EXAMPLE.replace("window = \"1h\"", "window = \"30m\"");
    assert_ne!(policy_with(&finer, 1, 0).unwrap().hash(&versions), h);
    let utc = CompiledPolicy::parse(
        Path::new(FILE),
        EXAMPLE,
        TimeZone::UTC,
        PseudonymKey::from_bytes([1; 32]),
    )
    .unwrap();
    assert_ne!(utc.hash(&versions), h);
    assert!(
        !base.canonical().contains(&hex::encode([1u8; 32])),
        "never the key itself"
    );
}

/// Issue 11: subjects are keyed and separated per purpose and per key (epoch).
#[test]
fn subjects_are_keyed_per_purpose() {
    let p = policy_with(EXAMPLE, 4, 0).unwrap();
    let d = crate::reading::DeviceId::new("flat-12").unwrap();
    assert_eq!(
        p.subject(&d),
        policy_with(EXAMPLE, 4, 0).unwrap().subject(&d)
    );
    assert!(p.subject(&d).starts_with("p-") && p.subject(&d).len() == 34);
    assert!(!p.subject(&d).contains("flat-12"));
    let other = EXAMPLE.replacen("name = \"", "name = \"other-", 1);
    assert_ne!(
        policy_with(&other, 4, 0).unwrap().subject(&d),
        p.subject(&d)
    );
    assert_ne!(
        policy_with(EXAMPLE, 5, 0).unwrap().subject(&d),
        p.subject(&d)
    );
    assert_eq!(
        p.with_key(PseudonymKey::from_bytes([5; 32])).subject(&d),
        policy_with(EXAMPLE, 5, 0).unwrap().subject(&d)
    );
}

#[test]
fn agg_fn_names_round_trip() {
    for f in [
        AggFn::Sum,
        AggFn::Mean,
        AggFn::Min,
        AggFn::Max,
        AggFn::Last,
        AggFn::Delta,
    ] {
        let text = format!(
            "[[rule]]\nfield = \"energy_import\"\naction = \"aggregate\"\nfunction = \"{}\"\nwindow = \"1h\"\n",
            f.as_str()
        );
        match &policy(&text).unwrap().rules()[0].action {
            Action::Aggregate(a) => assert_eq!(a.function, f),
            other => panic!("{other:?}"),
        }
    }
}
