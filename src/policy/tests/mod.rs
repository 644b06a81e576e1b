//! The engine: immediate forms, windows, counters, area aggregates (issue 11 items 1, 4),
//! each against a straightforward reference.

use std::collections::BTreeMap;
use std::path::Path;

use jiff::tz::TimeZone;
use proptest::prelude::*;

use super::*;
use parse::EXAMPLE;

mod parse;
mod props;
use crate::profile::{Field, Profile, Ratios};
use crate::reading::{AggFn, AreaId, Quality, QualityReason, Reading, Record, Value};

const PROFILE: &str = r#"
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
ratio = "ct_pt"
category = "measurement"
grade = "L3"
personal = true
[[field]]
name = "voltage_l1"
register = 4
type = "f32"
unit = "V"
category = "measurement"
grade = "L2"
[[field]]
name = "serial_number"
register = 7
type = "u32"
unit = "1"
category = "identifier"
grade = "L3"
"#;

const HEAD: &str = "[purpose]\nname = \"t\"\ndescription = \"d\"\nlegal_basis = \"b\"\nowner = \"o\"\nretention = \"30d\"\n";

/// 2026-11-30T00:00:00Z.
const T0: i64 = 1_796_083_200_000;

fn profile() -> Profile {
    Profile::parse(Path::new("firmware-profiles/t-e1.toml"), PROFILE).unwrap()
}

fn engine_in(rules: &str, tz: TimeZone) -> Engine {
    let p = CompiledPolicy::parse(
        Path::new("t.toml"),
        &format!("{HEAD}{rules}"),
        tz,
        PseudonymKey::from_bytes([5; 32]).with_epoch(7),
    )
    .unwrap();
    Engine::new(Arc::new(p))
}

fn engine(rules: &str) -> Engine {
    engine_in(rules, TimeZone::get("Asia/Shanghai").unwrap())
}

fn reading(f: &Field, device: &DeviceId, value: Value, at_ms: i64) -> Reading {
    Reading {
        device: device.clone(),
        field: f.name.clone(),
        value,
        unit: f.unit.canonical,
        at_ms,
        quality: Quality::Good,
        class: f.class,
    }
}

struct Dev {
    id: DeviceId,
    subject: String,
    area: Option<AreaId>,
}

impl Dev {
    fn new(name: &str, area: Option<&str>) -> Self {
        Self {
            id: DeviceId::new(name).unwrap(),
            subject: format!("p-{name}"),
            area: area.map(|a| AreaId::new(a).unwrap()),
        }
    }

    fn ctx(&self) -> DeviceCtx<'_> {
        DeviceCtx {
            device: &self.id,
            subject: &self.subject,
            area: self.area.as_ref(),
            ratios: Ratios::UNITY,
        }
    }
}

fn feed(e: &mut Engine, f: &Field, dev: &Dev, samples: &[(i64, Value)]) -> Vec<Record> {
    let mut out = Vec::new();
    for (at, v) in samples {
        e.accept(
            &reading(f, &dev.id, v.clone(), *at),
            f,
            &dev.ctx(),
            &mut out,
        );
    }
    out
}

/// issue 11 item 1: pass, pseudonymise and generalise leave at once, with the epoch;
/// what no rule names does not leave.
#[test]
fn immediate_forms_and_default_deny() {
    let p = profile();
    let mut e = engine(
        "[[rule]]\nfield = \"voltage_l1\"\naction = \"generalise\"\nstep = 5.0\ntime_step = \"15m\"\n\
         [[rule]]\nfield = \"voltage_l1\"\naction = \"pass\"\n\
         [[rule]]\ncategory = \"identifier\"\naction = \"pseudonymise\"\n",
    );
    let d = Dev::new("m1", None);
    let at = T0 + 7 * 60_000 + 123;
    let mut out = feed(
        &mut e,
        p.field("voltage_l1").unwrap(),
        &d,
        &[(at, Value::Float(231.92))],
    );
    out.extend(feed(
        &mut e,
        p.field("serial_number").unwrap(),
        &d,
        &[(at, Value::Int(12345678))],
    ));
    out.extend(feed(
        &mut e,
        p.field("energy_import").unwrap(),
        &d,
        &[(at, Value::Int(5))],
    ));
    assert_eq!(out.len(), 3, "{out:?}");
    assert_eq!(
        (out[0].value.clone(), out[0].at_ms),
        (Value::Float(230.0), T0)
    );
    assert_eq!(
        (out[1].value.clone(), out[1].at_ms),
        (Value::Float(231.92), at)
    );
    match &out[2].value {
        Value::Text(t) => assert!(t.starts_with("p-") && !t.contains("12345678")),
        other => panic!("{other:?}"),
    }
    assert!(out
        .iter()
        .all(|r| r.epoch == 7 && r.subject == "p-m1" && r.window.is_none()));
    assert_eq!(e.next_close_ms(), None, "nothing aggregated");
}

/// issue 11 item 1: a window closes when the device's next reading is past it, or by
/// time after the lateness; late samples are counted, not folded; the device's first
/// window (begun before its first reading) and the windows shutdown flushes are partial.
#[test]
fn windows_close_by_reading_and_by_time_and_late_samples_are_counted() {
    let p = profile();
    let f = p.field("voltage_l1").unwrap();
    let mut e = engine("[[rule]]\nfield = \"voltage_l1\"\naction = \"aggregate\"\nfunction = \"max\"\nwindow = \"15m\"\n");
    let d = Dev::new("m1", None);
    let min = 60_000;
    let mut out = feed(
        &mut e,
        f,
        &d,
        &[
            (T0 + min, Value::Float(230.0)),
            (T0 + 2 * min, Value::Float(232.0)),
        ],
    );
    assert!(out.is_empty());
    assert_eq!(e.next_close_ms(), Some(T0 + 15 * min + LATENESS_MS));
    out = feed(&mut e, f, &d, &[(T0 + 16 * min, Value::Float(229.0))]);
    assert_eq!(out.len(), 1);
    let w = out[0].window.unwrap();
    assert_eq!(
        (out[0].value.clone(), out[0].at_ms),
        (Value::Float(232.0), T0)
    );
    assert_eq!(
        (w.function, w.start_ms, w.end_ms, w.samples, w.devices, w.partial),
        (AggFn::Max, T0, T0 + 15 * min, 2, 1, true),
        "first seen a minute into its window"
    );
    assert!(feed(&mut e, f, &d, &[(T0 + 3 * min, Value::Float(999.0))]).is_empty());
    assert_eq!(e.stats().late_samples, 1);
    let mut out = Vec::new();
    e.close_due(T0 + 30 * min + LATENESS_MS - 1, &mut out);
    assert!(out.is_empty(), "still in its grace period");
    e.close_due(T0 + 30 * min + LATENESS_MS, &mut out);
    assert_eq!(out.len(), 1);
    assert!(
        !out[0].window.unwrap().partial,
        "the device was followed from its window's start"
    );
    assert_eq!(e.next_close_ms(), None);
    feed(&mut e, f, &d, &[(T0 + 29 * min, Value::Float(1.0))]);
    assert_eq!(e.stats().late_samples, 2, "its window has closed");
    let mut out = feed(&mut e, f, &d, &[(T0 + 31 * min, Value::Float(231.0))]);
    e.flush_partial(&mut out);
    assert_eq!(out.len(), 1);
    assert!(out[0].window.as_ref().unwrap().partial);
}

/// issue 11 item 1: night-flow minimum over local hours; bad samples stay out; the
/// worst quality of what is covered wins.
#[test]
fn hours_filter_quality_and_bad_samples() {
    let p = profile();
    let f = p.field("voltage_l1").unwrap();
    let mut e = engine("[[rule]]\nfield = \"voltage_l1\"\naction = \"aggregate\"\nfunction = \"min\"\nwindow = \"1d\"\nhours = \"00:00-05:00\"\n");
    let d = Dev::new("m1", None);
    let h = 3_600_000;
    // Shanghai midnight is 16:00 UTC the day before.
    let day = T0 - 8 * h;
    let mut out = Vec::new();
    for (i, v) in [(1, 5.0), (3, 2.0), (6, 0.5), (12, 0.1)] {
        e.accept(
            &reading(f, &d.id, Value::Float(v), day + i * h),
            f,
            &d.ctx(),
            &mut out,
        );
    }
    let mut bad = reading(f, &d.id, Value::Float(-1.0), day + 2 * h);
    bad.quality = Quality::Bad(QualityReason::OutOfRange);
    e.accept(&bad, f, &d.ctx(), &mut out);
    let mut unsure = reading(f, &d.id, Value::Float(4.0), day + 4 * h);
    unsure.quality = Quality::Uncertain(QualityReason::ClockSkew);
    e.accept(&unsure, f, &d.ctx(), &mut out);
    e.close_due(day + 25 * h, &mut out);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].value, Value::Float(2.0));
    assert_eq!(out[0].window.as_ref().unwrap().samples, 3);
    assert_eq!(out[0].quality, Quality::Uncertain(QualityReason::ClockSkew));
    assert_eq!(e.stats().bad_excluded, 1);
}

/// issue 11 item 1: a reset adds the new value and marks the window uncertain; a
/// rollover adds across the wrap; rollover scales with the device's ratios.
#[test]
fn counter_reset_and_rollover() {
    let p = profile();
    let f = p.field("energy_import").unwrap();
    let mut e = engine("[[rule]]\nfield = \"energy_import\"\naction = \"aggregate\"\nfunction = \"delta\"\nwindow = \"1h\"\n");
    let d = Dev::new("m1", None);
    let m = 60_000;
    let s = [
        (T0, 99_000),
        (T0 + m, 99_900),
        (T0 + 2 * m, 100),
        (T0 + 61 * m, 300),
        (T0 + 62 * m, 20),
    ];
    let samples: Vec<(i64, Value)> = s.iter().map(|(t, v)| (*t, Value::Int(*v))).collect();
    let mut out = feed(&mut e, f, &d, &samples);
    e.flush_partial(&mut out);
    assert_eq!(out.len(), 2);
    assert_eq!(
        out[0].value,
        Value::Int(900 + 200),
        "900, then the wrap 100000-99900+100"
    );
    assert_eq!(out[0].quality, Quality::Good);
    assert_eq!(
        out[1].value,
        Value::Int(200 + 20),
        "reset: the new value counts"
    );
    assert_eq!(
        out[1].quality,
        Quality::Uncertain(QualityReason::CounterBackwards)
    );
    // A CT ratio of 10 makes the canonical rollover 1 000 000 Wh.
    let mut e = engine("[[rule]]\nfield = \"energy_import\"\naction = \"aggregate\"\nfunction = \"delta\"\nwindow = \"1h\"\n");
    let ctx = DeviceCtx {
        ratios: Ratios { ct: 10.0, pt: 1.0 },
        ..d.ctx()
    };
    let mut out = Vec::new();
    for (t, v) in [(T0, 990_000), (T0 + m, 1_000)] {
        e.accept(&reading(f, &d.id, Value::Int(v), t), f, &ctx, &mut out);
    }
    e.flush_partial(&mut out);
    assert_eq!(out[0].value, Value::Int(11_000));
}

/// issue 11 item 4: area aggregates need k devices; devices without an area are counted.
#[test]
fn area_aggregates_respect_k_and_count_devices_without_area() {
    let p = profile();
    let f = p.field("voltage_l1").unwrap();
    let mut e = engine("[[rule]]\nfield = \"voltage_l1\"\naction = \"aggregate\"\nfunction = \"mean\"\nwindow = \"15m\"\nover = \"area\"\nacross = \"sum\"\nk = 3\n");
    let mut out = Vec::new();
    for (i, area) in ["f1", "f1", "f1", "f2", "f2"].iter().enumerate() {
        let d = Dev::new(&format!("m{i}"), Some(area));
        out.extend(feed(
            &mut e,
            f,
            &d,
            &[
                (T0, Value::Float(1.0 + i as f64)),
                (T0 + 1000, Value::Float(3.0 + i as f64)),
            ],
        ));
    }
    let lone = Dev::new("lone", None);
    feed(&mut e, f, &lone, &[(T0, Value::Float(1.0))]);
    assert!(out.is_empty());
    e.close_due(T0 + 16 * 60_000, &mut out);
    assert_eq!(out.len(), 1, "{out:?}");
    let r = &out[0];
    assert_eq!(r.subject, "area:f1");
    assert_eq!(
        r.value,
        Value::Float(2.0 + 3.0 + 4.0),
        "sum of per-device means"
    );
    assert_eq!(r.tags, vec!["across=sum".to_string()]);
    let w = r.window.as_ref().unwrap();
    assert_eq!((w.devices, w.samples, w.function), (3, 6, AggFn::Mean));
    assert_eq!((e.stats().suppressed, e.stats().no_area_samples), (1, 1));
    assert_eq!(e.next_close_ms(), None);
}

#[test]
fn the_documented_example_runs() {
    let p = CompiledPolicy::parse(
        Path::new("e.toml"),
        EXAMPLE,
        TimeZone::UTC,
        PseudonymKey::from_bytes([1; 32]),
    )
    .unwrap();
    let mut e = Engine::new(Arc::new(p));
    let mut out = Vec::new();
    e.flush_partial(&mut out);
    assert!(out.is_empty());
}
