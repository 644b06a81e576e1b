//! The shipped device profiles in `firmware-profiles/`.
//!
//! Every file loads (a broken profile fails the test suite), carries the fields a utility polls
//! and classifies them, and a known register image of each meter decodes to the expected
//! engineering values in canonical units. The register words are literals — real traces where
//! the sources have one (Tasmota's DDSU666 `43 66 33 34`, the TUF-2000M `80 6B 42 12`),
//! otherwise IEEE-754 words computed by hand (python3 `struct.pack('>f', v)`) — never produced
//! by the crate's own encoder, so an encoder and decoder that agree on a wrong order cannot
//! pass.

use std::path::{Path, PathBuf};

use citygate::profile::{Counter, FunctionCode, Profile, ProfileSet, Ratio, Ratios, WordOrder};
use citygate::reading::{
    Category, DeviceId, Grade, Quality, QualityReason, Reading, RegisterAddress, Stream, Unit,
    Value,
};
use citygate::source::RegisterImage;
use citygate::transform::check::{assess, assess_scaled, Checker};
use citygate::transform::normalise::{normalise, normalise_with, Normalised};

const SHIPPED: [&str; 9] = [
    "abb-ab",
    "acrel-adl400",
    "chint-ddsu666",
    "chint-dtsu666",
    "eastron-sdm120",
    "eastron-sdm630",
    "oem-tuf-2000m",
    "schneider-iem3000",
    "xintai-water-meter",
];

fn profile_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("firmware-profiles")
}

fn profile_path(name: &str) -> PathBuf {
    profile_dir().join(format!("{name}.toml"))
}

fn profile_text(name: &str) -> String {
    std::fs::read_to_string(profile_path(name)).unwrap()
}

fn load(name: &str) -> Profile {
    Profile::load(&profile_path(name)).unwrap_or_else(|e| panic!("{name}: {e:?}"))
}

/// The shipped profile with its text edited, under the same name.
fn variant(name: &str, edit: impl FnOnce(String) -> String) -> Profile {
    let text = profile_text(name);
    let edited = edit(text.clone());
    assert_ne!(edited, text, "{name}: the edit changed nothing");
    Profile::parse(&profile_path(name), &edited).unwrap_or_else(|e| panic!("{name}: {e:?}"))
}

fn image(blocks: &[(u16, &[u16])]) -> RegisterImage {
    let mut image = RegisterImage::new();
    for (start, words) in blocks {
        image.insert(RegisterAddress(*start), words.to_vec());
    }
    image
}

/// Normalises an image made of `(wire address, words)` blocks.
fn decode(profile: &Profile, blocks: &[(u16, &[u16])]) -> Normalised {
    normalise(
        profile,
        &DeviceId::new("test-meter").unwrap(),
        1_700_000_000_000,
        &image(blocks),
    )
}

/// [`decode`] for a secondary-side meter behind transformers with `ratios`.
fn decode_with(profile: &Profile, blocks: &[(u16, &[u16])], ratios: Ratios) -> Normalised {
    normalise_with(
        profile,
        &DeviceId::new("test-meter").unwrap(),
        1_700_000_000_000,
        &image(blocks),
        &ratios,
    )
}

fn assert_bool(n: &Normalised, field: &str, expected: bool) {
    let r = get(n, field);
    assert_eq!(r.unit, Unit::One, "{field}");
    assert_eq!(r.quality, Quality::Good, "{field}");
    assert_eq!(r.value, Value::Bool(expected), "{field}");
}

fn get<'a>(n: &'a Normalised, field: &str) -> &'a Reading {
    n.readings
        .iter()
        .find(|r| r.field.as_str() == field)
        .unwrap_or_else(|| panic!("no reading for {field}; missing: {:?}", n.missing))
}

/// A good float reading in `unit`, equal to `expected` within f32 precision (the registers
/// hold f32; 1e-6 relative is ~8 ulps).
fn assert_value(n: &Normalised, field: &str, unit: Unit, expected: f64) {
    let r = get(n, field);
    assert_eq!(r.unit, unit, "{field}");
    assert_eq!(r.quality, Quality::Good, "{field}: {:?}", r.value);
    let v = r.value.as_f64().unwrap();
    let tol = (expected.abs() * 1e-6).max(1e-6);
    assert!(
        (v - expected).abs() <= tol,
        "{field}: got {v}, expected {expected} {unit}"
    );
}

fn assert_int(n: &Normalised, field: &str, unit: Unit, expected: i64) {
    let r = get(n, field);
    assert_eq!(r.unit, unit, "{field}");
    assert_eq!(r.quality, Quality::Good, "{field}");
    assert_eq!(r.value, Value::Int(expected), "{field}");
}

/// The quality the check stage gives a reading (no counter history).
fn checked(profile: &Profile, n: &Normalised, field: &str) -> Quality {
    assess(profile.field(field).unwrap(), get(n, field), None)
}

/// Issue 11: the vocabulary policies are checked against names every shipped field, so a
/// shared policy naming a field of another meter type is never taken for a typo.
#[test]
fn every_shipped_field_is_in_the_known_vocabulary() {
    let set = ProfileSet::load_dir(&profile_dir()).unwrap();
    for p in set.iter() {
        for f in &p.fields {
            assert!(
                citygate::profile::KNOWN_FIELDS.contains(&f.name.as_str()),
                "{}: add `{}` to profile::KNOWN_FIELDS",
                p.name,
                f.name
            );
        }
    }
}

#[test]
fn every_shipped_profile_loads_with_the_fields_utilities_poll() {
    let set = ProfileSet::load_dir(&profile_dir()).unwrap_or_else(|errors| {
        let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
        panic!("firmware-profiles/ does not load:\n{}", lines.join("\n"))
    });
    let toml_files = std::fs::read_dir(profile_dir())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "toml")
        })
        .count();
    assert_eq!(set.len(), toml_files, "every file is a profile");
    for name in SHIPPED {
        assert!(set.get(name).is_some(), "{name} is shipped");
    }

    let electricity = [
        "voltage_l1",
        "current_l1",
        "active_power",
        "power_factor",
        "frequency",
        "energy_import",
        "energy_export",
    ];
    let three_phase = [
        "voltage_l2",
        "voltage_l3",
        "current_l2",
        "current_l3",
        "active_power_l1",
        "active_power_l2",
        "active_power_l3",
    ];
    let required: [(&str, Vec<&str>); 9] = [
        ("abb-ab", [&electricity[..], &three_phase[..]].concat()),
        (
            "acrel-adl400",
            [&electricity[..], &three_phase[..]].concat(),
        ),
        (
            "schneider-iem3000",
            [&electricity[..], &three_phase[..]]
                .concat()
                .into_iter()
                .filter(|f| !f.starts_with("power_factor"))
                .collect(),
        ),
        (
            "xintai-water-meter",
            vec![
                "volume_forward",
                "flow_rate",
                "battery_voltage",
                "valve_open",
                "valve_closed",
                "valve_fault",
                "battery_low",
            ],
        ),
        ("chint-ddsu666", electricity.to_vec()),
        (
            "chint-dtsu666",
            [&electricity[..], &three_phase[..]].concat(),
        ),
        ("eastron-sdm120", electricity.to_vec()),
        (
            "eastron-sdm630",
            [&electricity[..], &three_phase[..]].concat(),
        ),
        (
            "oem-tuf-2000m",
            vec!["flow_rate", "volume_forward", "volume_reverse"],
        ),
    ];
    for (name, fields) in &required {
        let p = set.get(name).unwrap();
        for f in fields {
            assert!(p.field(f).is_some(), "{name} lacks {f}");
        }
    }

    for p in set.iter() {
        let name = &p.name;
        let n = p.fields.len();
        assert!((5..=30).contains(&n), "{name}: {n} fields");
        for f in &p.fields {
            assert!(
                f.verified || f.note.as_deref().is_some_and(|s| !s.is_empty()),
                "{name}.{}: an unverified register must say why",
                f.name
            );
            assert!(
                f.range.is_some() || f.class.category != Category::Measurement,
                "{name}.{}: a measurement needs a plausible range",
                f.name
            );
            let totals = [
                "energy_",
                "reactive_energy_",
                "volume_forward",
                "volume_reverse",
            ];
            let is_total = totals.iter().any(|t| f.name.as_str().starts_with(t));
            assert!(
                !is_total || matches!(f.counter, Counter::Monotonic { .. }),
                "{name}.{}: a total is a monotonic counter",
                f.name
            );
            assert_eq!(
                f.stream == Stream::Alarms,
                f.class.category == Category::Alarm,
                "{name}.{}: alarm fields, and only they, travel on the alarms stream",
                f.name
            );
        }
        if let Some(addr) = p.field("meter_address") {
            assert_eq!(addr.class.category, Category::Identifier, "{name}");
            assert!(addr.class.personal, "{name}: §4.5, indirectly personal");
        }
    }

    // Classification of the household meters (§4.5): consumption is personal, L3;
    // grid-level quantities are not.
    for name in ["chint-ddsu666", "eastron-sdm120"] {
        let p = set.get(name).unwrap();
        for f in [
            "current_l1",
            "active_power",
            "energy_import",
            "energy_export",
        ] {
            let c = p.field(f).unwrap().class;
            assert!(c.personal && c.grade == Grade::L3, "{name}.{f}: {c:?}");
            assert!(
                !c.is_identifying(),
                "{name}.{f}: a measurement keeps its value"
            );
        }
        for f in ["voltage_l1", "power_factor", "frequency"] {
            assert!(!p.field(f).unwrap().class.personal, "{name}.{f}");
        }
        assert_eq!(p.field("frequency").unwrap().class.grade, Grade::L1);
    }

    let expect = [
        ("chint-ddsu666", FunctionCode::ReadInput, WordOrder::Abcd),
        ("chint-dtsu666", FunctionCode::ReadHolding, WordOrder::Abcd),
        ("eastron-sdm120", FunctionCode::ReadInput, WordOrder::Abcd),
        ("eastron-sdm630", FunctionCode::ReadInput, WordOrder::Abcd),
        ("oem-tuf-2000m", FunctionCode::ReadHolding, WordOrder::Cdab),
        ("acrel-adl400", FunctionCode::ReadHolding, WordOrder::Abcd),
        ("abb-ab", FunctionCode::ReadHolding, WordOrder::Abcd),
        (
            "schneider-iem3000",
            FunctionCode::ReadHolding,
            WordOrder::Abcd,
        ),
        (
            "xintai-water-meter",
            FunctionCode::ReadHolding,
            WordOrder::Dcba,
        ),
    ];
    for (name, function, order) in expect {
        let p = set.get(name).unwrap();
        assert_eq!(p.function, function, "{name}");
        // Every multi-register field has the meter's order (one-register fields of the
        // water meter are plain big-endian words).
        assert!(
            p.fields
                .iter()
                .filter(|f| f.words() > 1)
                .all(|f| f.order == order),
            "{name}"
        );
    }
    let line = set.get("chint-ddsu666").unwrap().line.unwrap();
    assert_eq!((line.baud, line.data_bits, line.stop_bits), (9600, 8, 1));
}

#[test]
fn ddsu666_tasmota_trace_decodes_to_canonical_units() {
    let p = load("chint-ddsu666");
    let n = decode(
        &p,
        &[
            (
                0x2000,
                &[
                    0x4366, 0x3334, // voltage: Tasmota trace `01 04 04 43 66 33 34` = 230.2 V
                    0x40A0, 0x0000, // current 5.0 A
                    0x3F8C, 0xCCCD, // active power 1.1 kW
                    0x3E4C, 0xCCCD, // reactive power 0.2 kvar
                    0x3F8F, 0x5C29, // apparent power 1.12 kVA
                    0x3F73, 0x3333, // power factor 0.95
                    0x0000, 0x0000, // 0x200C: not in the profile
                    0x4248, 0x0000, // frequency 50.0 Hz
                ],
            ),
            (
                0x4000,
                &[
                    0x449A, 0x5000, // import 1234.5 kWh
                    0, 0, 0, 0, 0, 0, 0, 0, // 0x4002..0x4009: not in the profile
                    0x4144, 0x0000, // export 12.25 kWh
                ],
            ),
            (0x0006, &[0x0001]), // RS-485 address 1
        ],
    );
    assert!(n.missing.is_empty(), "{:?}", n.missing);
    assert_value(&n, "voltage_l1", Unit::Volt, 230.2);
    assert_value(&n, "current_l1", Unit::Ampere, 5.0);
    assert_value(&n, "active_power", Unit::Watt, 1100.0);
    assert_value(&n, "reactive_power", Unit::Var, 200.0);
    assert_value(&n, "apparent_power", Unit::VoltAmpere, 1120.0);
    assert_value(&n, "power_factor", Unit::One, 0.95);
    assert_value(&n, "frequency", Unit::Hertz, 50.0);
    assert_value(&n, "energy_import", Unit::WattHour, 1_234_500.0);
    assert_value(&n, "energy_export", Unit::WattHour, 12_250.0);
    assert_int(&n, "meter_address", Unit::One, 1);
    for r in &n.readings {
        assert_eq!(
            checked(&p, &n, r.field.as_str()),
            Quality::Good,
            "{}",
            r.field
        );
    }
}

#[test]
fn dtsu666_scaled_floats_and_ratios_decode() {
    let p = load("chint-dtsu666");
    let n = decode(
        &p,
        &[
            (
                0x0000,
                &[
                    0x00CD, // REV 205
                    0, 0, 0, 0, 0,      // 0x0001..0x0005: not in the profile
                    0x0028, // IrAt: CT 40
                    0x03E8, // UrAt: 1000 × 0.1 = PT 100
                ],
            ),
            (
                0x2000,
                &[
                    0x4579, 0x3000, // Uab 3987.0 → 398.7 V
                    0x4578, 0xD000, // Ubc 3981.0 → 398.1 V
                    0x4579, 0x6000, // Uca 3990.0 → 399.0 V
                    0x450F, 0xE000, // Ua 2302.0 → 230.2 V
                    0x450F, 0xA000, // Ub 2298.0 → 229.8 V
                    0x4510, 0x6000, // Uc 2310.0 → 231.0 V
                    0x459C, 0x4000, // Ia 5000.0 → 5.0 A
                    0x4583, 0x4000, // Ib 4200.0 → 4.2 A
                    0x4541, 0xC000, // Ic 3100.0 → 3.1 A
                    0x462B, 0xE000, // Pt 11000.0 → 1100 W
                    0x45AB, 0xE000, // Pa 5500.0 → 550 W
                    0x454E, 0x4000, // Pb 3300.0 → 330 W
                    0x4509, 0x8000, // Pc 2200.0 → 220 W
                    0xC396, 0x0000, // Qt -300.0 → -30 var
                ],
            ),
            (
                0x202A,
                &[
                    0x446D, 0x8000, // PFt 950.0 → 0.95
                    0x4470, 0x0000, // PFa 960.0 → 0.96
                    0x446B, 0x0000, // PFb 940.0 → 0.94
                    0x4468, 0x8000, // PFc 930.0 → 0.93
                ],
            ),
            (0x2044, &[0x459C, 0x3800]), // Freq 4999.0 → 49.99 Hz
            (0x101E, &[0x449A, 0x5000]), // ImpEp 1234.5 kWh
            (0x1028, &[0x4144, 0x0000]), // ExpEp 12.25 kWh
        ],
    );
    assert!(n.missing.is_empty(), "{:?}", n.missing);
    assert_int(&n, "firmware_version", Unit::One, 205);
    assert_int(&n, "ct_ratio", Unit::One, 40);
    // An integer register with a scale becomes a float.
    assert_value(&n, "pt_ratio", Unit::One, 100.0);
    assert!(matches!(get(&n, "pt_ratio").value, Value::Float(_)));
    for (f, v) in [
        ("voltage_ll_12", 398.7),
        ("voltage_ll_23", 398.1),
        ("voltage_ll_31", 399.0),
        ("voltage_l1", 230.2),
        ("voltage_l2", 229.8),
        ("voltage_l3", 231.0),
    ] {
        assert_value(&n, f, Unit::Volt, v);
    }
    for (f, v) in [
        ("current_l1", 5.0),
        ("current_l2", 4.2),
        ("current_l3", 3.1),
    ] {
        assert_value(&n, f, Unit::Ampere, v);
    }
    for (f, v) in [
        ("active_power", 1100.0),
        ("active_power_l1", 550.0),
        ("active_power_l2", 330.0),
        ("active_power_l3", 220.0),
    ] {
        assert_value(&n, f, Unit::Watt, v);
    }
    assert_value(&n, "reactive_power", Unit::Var, -30.0);
    for (f, v) in [
        ("power_factor", 0.95),
        ("power_factor_l1", 0.96),
        ("power_factor_l2", 0.94),
        ("power_factor_l3", 0.93),
    ] {
        assert_value(&n, f, Unit::One, v);
    }
    assert_value(&n, "frequency", Unit::Hertz, 49.99);
    assert_value(&n, "energy_import", Unit::WattHour, 1_234_500.0);
    assert_value(&n, "energy_export", Unit::WattHour, 12_250.0);
    for r in &n.readings {
        assert_eq!(
            checked(&p, &n, r.field.as_str()),
            Quality::Good,
            "{}",
            r.field
        );
    }
}

#[test]
fn sdm120_input_registers_decode() {
    let p = load("eastron-sdm120");
    let n = decode(
        &p,
        &[
            (
                0x0000,
                &[
                    0x4366, 0x3333, // 0x0000 voltage 230.2 V
                    0, 0, 0, 0, // 0x0002..0x0005
                    0x40B0, 0x0000, // 0x0006 current 5.5 A
                    0, 0, 0, 0, // 0x0008..0x000B
                    0x4496, 0x0000, // 0x000C active power 1200 W
                    0, 0, 0, 0, // 0x000E..0x0011
                    0x44A8, 0xC000, // 0x0012 apparent power 1350 VA
                    0, 0, 0, 0, // 0x0014..0x0017
                    0xC396, 0x0000, // 0x0018 reactive power -300 var
                    0, 0, 0, 0, // 0x001A..0x001D
                    0x3F66, 0x6666, // 0x001E power factor 0.9
                ],
            ),
            (
                0x0046,
                &[
                    0x4248, 0x0000, // 0x0046 frequency 50.0 Hz
                    0x449A, 0x5000, // 0x0048 import 1234.5 kWh
                    0x4144, 0x0000, // 0x004A export 12.25 kWh
                    0x437A, 0x0000, // 0x004C reactive import 250 kvarh
                    0x3EC0, 0x0000, // 0x004E reactive export 0.375 kvarh
                ],
            ),
            (
                0x0156,
                &[
                    0x449B, 0xD800, // 0x0156 total active 1246.75 kWh
                    0x437A, 0x6000, // 0x0158 total reactive 250.375 kvarh
                ],
            ),
        ],
    );
    assert!(n.missing.is_empty(), "{:?}", n.missing);
    assert_value(&n, "voltage_l1", Unit::Volt, 230.2);
    assert_value(&n, "current_l1", Unit::Ampere, 5.5);
    assert_value(&n, "active_power", Unit::Watt, 1200.0);
    assert_value(&n, "apparent_power", Unit::VoltAmpere, 1350.0);
    assert_value(&n, "reactive_power", Unit::Var, -300.0);
    assert_value(&n, "power_factor", Unit::One, 0.9);
    assert_value(&n, "frequency", Unit::Hertz, 50.0);
    assert_value(&n, "energy_import", Unit::WattHour, 1_234_500.0);
    assert_value(&n, "energy_export", Unit::WattHour, 12_250.0);
    assert_value(&n, "reactive_energy_import", Unit::VarHour, 250_000.0);
    assert_value(&n, "reactive_energy_export", Unit::VarHour, 375.0);
    assert_value(&n, "energy_combined", Unit::WattHour, 1_246_750.0);
    assert_value(&n, "reactive_energy_combined", Unit::VarHour, 250_375.0);
}

#[test]
fn sdm630_input_registers_decode() {
    let p = load("eastron-sdm630");
    let n = decode(
        &p,
        &[
            (
                0x0000,
                &[
                    0x4365, 0xCCCD, // 0x0000 V1 229.8 V
                    0x4367, 0x0000, // 0x0002 V2 231.0 V
                    0x4366, 0x3333, // 0x0004 V3 230.2 V
                    0x4128, 0x0000, // 0x0006 I1 10.5 A
                    0x4104, 0x0000, // 0x0008 I2 8.25 A
                    0x40A0, 0x0000, // 0x000A I3 5.0 A
                    0x4516, 0x0000, // 0x000C P1 2400 W
                    0x44ED, 0x8000, // 0x000E P2 1900 W
                    0xC4BB, 0x8000, // 0x0010 P3 -1500 W (exporting)
                    0, 0, 0, 0, 0, 0, // 0x0012..0x0017 apparent per phase: not polled
                    0, 0, 0, 0, 0, 0, // 0x0018..0x001D reactive per phase: not polled
                    0x3F7A, 0xE148, // 0x001E PF1 0.98
                    0x3F6B, 0x851F, // 0x0020 PF2 0.92
                    0x3F75, 0xC28F, // 0x0022 PF3 0.96
                ],
            ),
            (
                0x0034,
                &[
                    0x452F, 0x0000, // 0x0034 P total 2800 W
                    0, 0, // 0x0036
                    0x45B0, 0x9000, // 0x0038 S total 5650 VA
                    0, 0, // 0x003A
                    0xC396, 0x0000, // 0x003C Q total -300 var
                    0x3F66, 0x6666, // 0x003E PF total 0.9
                    0, 0, 0, 0, 0, 0, // 0x0040..0x0045
                    0x4247, 0xEB85, // 0x0046 frequency 49.98 Hz
                    0x4640, 0xE666, // 0x0048 import 12345.6 kWh
                    0x429D, 0xCCCD, // 0x004A export 78.9 kWh
                    0x4496, 0x0000, // 0x004C reactive import 1200 kvarh
                    0x437A, 0x0000, // 0x004E reactive export 250 kvarh
                ],
            ),
            (
                0x015A,
                &[
                    0x4583, 0x4000, // 0x015A import L1 4200 kWh
                    0x4541, 0xC000, // 0x015C import L2 3100 kWh
                    0x459C, 0x4000, // 0x015E import L3 5000 kWh
                    0x4148, 0x0000, // 0x0160 export L1 12.5 kWh
                    0x3F00, 0x0000, // 0x0162 export L2 0.5 kWh
                    0x4270, 0x0000, // 0x0164 export L3 60 kWh
                ],
            ),
        ],
    );
    assert!(n.missing.is_empty(), "{:?}", n.missing);
    for (f, v) in [
        ("voltage_l1", 229.8),
        ("voltage_l2", 231.0),
        ("voltage_l3", 230.2),
    ] {
        assert_value(&n, f, Unit::Volt, v);
    }
    for (f, v) in [
        ("current_l1", 10.5),
        ("current_l2", 8.25),
        ("current_l3", 5.0),
    ] {
        assert_value(&n, f, Unit::Ampere, v);
    }
    for (f, v) in [
        ("active_power_l1", 2400.0),
        ("active_power_l2", 1900.0),
        ("active_power_l3", -1500.0),
        ("active_power", 2800.0),
    ] {
        assert_value(&n, f, Unit::Watt, v);
    }
    for (f, v) in [
        ("power_factor_l1", 0.98),
        ("power_factor_l2", 0.92),
        ("power_factor_l3", 0.96),
        ("power_factor", 0.9),
    ] {
        assert_value(&n, f, Unit::One, v);
    }
    assert_value(&n, "apparent_power", Unit::VoltAmpere, 5650.0);
    assert_value(&n, "reactive_power", Unit::Var, -300.0);
    assert_value(&n, "frequency", Unit::Hertz, 49.98);
    assert_value(&n, "energy_import", Unit::WattHour, 12_345_600.0);
    assert_value(&n, "energy_export", Unit::WattHour, 78_900.0);
    assert_value(&n, "reactive_energy_import", Unit::VarHour, 1_200_000.0);
    assert_value(&n, "reactive_energy_export", Unit::VarHour, 250_000.0);
    for (f, v) in [
        ("energy_import_l1", 4_200_000.0),
        ("energy_import_l2", 3_100_000.0),
        ("energy_import_l3", 5_000_000.0),
        ("energy_export_l1", 12_500.0),
        ("energy_export_l2", 500.0),
        ("energy_export_l3", 60_000.0),
    ] {
        assert_value(&n, f, Unit::WattHour, v);
    }
}

#[test]
fn tuf2000m_low_word_first_trace_and_one_based_registers_decode() {
    let p = load("oem-tuf-2000m");
    // address_base = 1: manual register N is wire address N - 1.
    assert_eq!(p.field("flow_rate").unwrap().address, RegisterAddress(0));
    assert_eq!(
        p.field("meter_address").unwrap().address,
        RegisterAddress(1441)
    );
    let n = decode(
        &p,
        &[
            (
                0, // registers 1..36
                &[
                    0x0000, 0x4148, // reg 1 flow 12.5 m³/h (CDAB)
                    0, 0, 0, 0, 0, 0, // reg 3..8: energy flow, velocity, sound speed
                    0xE240,
                    0x0001, // reg 9 positive totaliser 123456 m³ (0x0001E240, low word first)
                    0x0000, 0x3EC0, // reg 11 positive fraction 0.375 m³ → 123456.375 m³
                    0x0007, 0x0000, // reg 13 negative totaliser 7 m³
                    0x0000, 0x3F00, // reg 15 negative fraction 0.5 m³
                    0, 0, 0, 0, 0, 0, 0, 0, // reg 17..24
                    0xE239, 0x0001, // reg 25 net totaliser 123449 m³
                    0, 0, 0, 0, 0, 0, // reg 27..32
                    0x806B, 0x4212, // reg 33 T1: arivin29 trace `80 6B 42 12` = 36.625 °C
                    0x0000, 0x4144, // reg 35 T2 12.25 °C
                ],
            ),
            (71, &[0x0002]),          // reg 72 error code: bit1 signal too weak
            (91, &[0x0047]),          // reg 92 signal quality 71
            (102, &[0x2088, 0x0000]), // reg 103 working time 8328 s (arivin29 output)
            (
                1436, // registers 1437..1442
                &[
                    0x0000, // flow unit m³/h
                    0x0000, // totaliser unit m³
                    0x0003, // multiplier code 3 = ×1
                    0x0000, 0x0000, // 1440, 1441
                    0x0001, // Modbus address 1
                ],
            ),
        ],
    );
    assert!(n.missing.is_empty(), "{:?}", n.missing);
    assert_value(&n, "flow_rate", Unit::CubicMetrePerHour, 12.5);
    // One canonical total each: LONG integer part + REAL4 fraction.
    assert_eq!(
        get(&n, "volume_forward").value,
        Value::Float(123_456.375),
        "exact: both parts are exact in f64"
    );
    assert_eq!(get(&n, "volume_reverse").value, Value::Float(7.5));
    assert_eq!(get(&n, "volume_forward").unit, Unit::CubicMetre);
    assert!(p.field("volume_forward_fraction").is_none());
    assert_int(&n, "volume_net", Unit::CubicMetre, 123_449);
    // 0x4212806B = 36.62541 (the trace's low mantissa bits are not zero).
    assert_value(&n, "water_temp_t1", Unit::Celsius, 36.625_408);
    assert_value(&n, "water_temp_t2", Unit::Celsius, 12.25);
    assert_int(&n, "alarm_flags", Unit::One, 2);
    assert_bool(&n, "no_signal", false);
    assert_bool(&n, "signal_weak", true);
    assert_bool(&n, "temp_sensor_fault", false);
    for f in [
        "alarm_flags",
        "no_signal",
        "signal_weak",
        "temp_sensor_fault",
    ] {
        assert_eq!(p.field(f).unwrap().stream, Stream::Alarms, "{f}");
    }
    assert_eq!(p.field("flow_rate").unwrap().stream, Stream::Readings);
    assert_int(&n, "signal_quality", Unit::One, 71);
    assert_int(&n, "working_time", Unit::Second, 8328);
    assert_int(&n, "flow_unit_code", Unit::One, 0);
    assert_int(&n, "totaliser_unit_code", Unit::One, 0);
    assert_int(&n, "totaliser_multiplier_code", Unit::One, 3);
    assert_int(&n, "meter_address", Unit::One, 1);
    for r in &n.readings {
        assert_eq!(
            checked(&p, &n, r.field.as_str()),
            Quality::Good,
            "{}",
            r.field
        );
    }
}

/// The same f32 in each word/byte order, via a profile variant with a different `order`.
#[test]
fn every_word_order_decodes_the_same_value() {
    // (order, voltage 230.2 V as Tasmota's trace 0x43663334, import 1234.5 kWh 0x449A5000)
    let cases: [(&str, [u16; 2], [u16; 2]); 4] = [
        ("ABCD", [0x4366, 0x3334], [0x449A, 0x5000]),
        ("CDAB", [0x3334, 0x4366], [0x5000, 0x449A]),
        ("BADC", [0x6643, 0x3433], [0x9A44, 0x0050]),
        ("DCBA", [0x3433, 0x6643], [0x0050, 0x9A44]),
    ];
    for electricity in [
        "chint-ddsu666",
        "chint-dtsu666",
        "eastron-sdm120",
        "eastron-sdm630",
    ] {
        let base = load(electricity);
        let voltage = base.field("voltage_l1").unwrap();
        let energy = base.field("energy_import").unwrap();
        for (order, v_words, e_words) in cases {
            let p = if order == "ABCD" {
                base.clone()
            } else {
                variant(electricity, |t| {
                    t.replacen("order = \"ABCD\"", &format!("order = \"{order}\""), 1)
                })
            };
            let n = decode(
                &p,
                &[(voltage.address.0, &v_words), (energy.address.0, &e_words)],
            );
            let v = get(&n, "voltage_l1").value.as_f64().unwrap() / voltage.scale;
            assert!((v - 230.2).abs() < 1e-4, "{electricity} {order}: {v}");
            assert_value(&n, "energy_import", Unit::WattHour, 1_234_500.0);
        }
    }
    // The flow meter ships CDAB; its trace read as ABCD is the same temperature.
    let temp = [0x806B, 0x4212];
    let n = decode(&load("oem-tuf-2000m"), &[(32, &temp)]);
    assert_value(&n, "water_temp_t1", Unit::Celsius, 36.625_408);
    let abcd = variant("oem-tuf-2000m", |t| {
        t.replacen("order = \"CDAB\"", "order = \"ABCD\"", 1)
    });
    let n = decode(&abcd, &[(32, &[0x4212, 0x806B])]);
    assert_value(&n, "water_temp_t1", Unit::Celsius, 36.625_408);
    // A LONG changes too: 123456 low word first vs high word first (fraction 0.375).
    let n = decode(&abcd, &[(8, &[0x0001, 0xE240, 0x3EC0, 0x0000])]);
    assert_eq!(get(&n, "volume_forward").value, Value::Float(123_456.375));
    let n = decode(
        &load("oem-tuf-2000m"),
        &[(8, &[0xE240, 0x0001, 0x0000, 0x3EC0])],
    );
    assert_eq!(get(&n, "volume_forward").value, Value::Float(123_456.375));
}

#[test]
fn sentinels_and_non_finite_floats_are_not_available() {
    // No source names a sentinel for these meters; a deployment that finds one adds it.
    // An all-ones totaliser flagged as "not available" keeps its raw value.
    // The sentinel is the integer part's bit pattern.
    let p = variant("oem-tuf-2000m", |t| {
        t.replacen(
            "fraction_register = 11\n",
            "fraction_register = 11\nsentinels = [\"0xFFFFFFFF\"]\n",
            1,
        )
    });
    let n = decode(&p, &[(8, &[0xFFFF, 0xFFFF, 0x0000, 0x0000])]);
    let r = get(&n, "volume_forward");
    assert_eq!(r.quality, Quality::Bad(QualityReason::NotAvailable));
    assert_eq!(r.value, Value::Float(-1.0));
    assert_eq!(
        checked(&p, &n, "volume_forward"),
        Quality::Bad(QualityReason::NotAvailable)
    );

    // A float meter answering NaN / all-ones is never a number.
    let p = load("chint-ddsu666");
    let n = decode(
        &p,
        &[(0x2004, &[0x7FC0, 0x0000]), (0x4000, &[0xFFFF, 0xFFFF])],
    );
    for f in ["active_power", "energy_import"] {
        assert_eq!(
            get(&n, f).quality,
            Quality::Bad(QualityReason::NotFinite),
            "{f}"
        );
    }
}

#[test]
fn out_of_range_values_are_flagged_not_rewritten() {
    let p = load("chint-ddsu666");
    let n = decode(&p, &[(0x2000, &[0x43C8, 0x0000])]); // 400.0 V on a 230 V meter
    assert_eq!(get(&n, "voltage_l1").quality, Quality::Good);
    assert_eq!(
        checked(&p, &n, "voltage_l1"),
        Quality::Bad(QualityReason::OutOfRange)
    );
    assert_eq!(get(&n, "voltage_l1").value, Value::Float(400.0));

    // DTSU666 frequency 6000.0 × 0.01 = 60 Hz on a 50 Hz grid.
    let p = load("chint-dtsu666");
    let n = decode(&p, &[(0x2044, &[0x45BB, 0x8000])]);
    assert_eq!(
        checked(&p, &n, "frequency"),
        Quality::Bad(QualityReason::OutOfRange)
    );

    // A TUF-2000M set to L/h (code 2, as on the arivin29 test device) would report
    // flow_rate in the wrong unit: commissioning sees the unit code out of range.
    let p = load("oem-tuf-2000m");
    let n = decode(&p, &[(1436, &[0x0002])]);
    assert_eq!(
        checked(&p, &n, "flow_unit_code"),
        Quality::Bad(QualityReason::OutOfRange)
    );
}

#[test]
fn energy_counter_going_backwards_is_flagged() {
    let p = load("chint-ddsu666");
    let field = p.field("energy_import").unwrap();
    let mut checker = Checker::new();
    // 1234.5 kWh, then 1200.0 kWh (0x4496_0000).
    for (words, expected) in [
        ([0x449A, 0x5000], Quality::Good),
        (
            [0x4496, 0x0000],
            Quality::Uncertain(QualityReason::CounterBackwards),
        ),
    ] {
        let n = decode(&p, &[(0x4000, &words)]);
        let mut r = get(&n, "energy_import").clone();
        assert_eq!(checker.check(field, &mut r), expected);
    }
}

#[test]
fn every_shipped_profile_plans_into_whole_reads() {
    use citygate::source::modbus::plan;
    let set = ProfileSet::load_dir(&profile_dir()).unwrap();
    for p in set.iter().filter(|p| !p.is_mqtt()) {
        let reads = plan(p);
        assert!(reads.iter().all(|r| r.count <= 125), "{}", p.name);
        let holding = |start: RegisterAddress, words: u16| {
            reads
                .iter()
                .position(|r| {
                    start.0 >= r.start.0
                        && u32::from(start.0) + u32::from(words)
                            <= u32::from(r.start.0) + u32::from(r.count)
                })
                .unwrap_or_else(|| panic!("{}: no read holds {start}", p.name))
        };
        for f in &p.fields {
            // Every part of a field, and a combined total's parts from the same request.
            let requests: Vec<usize> = f
                .parts()
                .map(|(address, ty)| holding(address, ty.words()))
                .collect();
            assert!(
                requests.windows(2).all(|w| w[0] == w[1]),
                "{}.{}: parts torn across requests {requests:?}",
                p.name,
                f.name
            );
        }
    }
    let tuf = set.get("oem-tuf-2000m").unwrap();
    assert!(tuf.field("volume_forward").unwrap().fraction.is_some());
}

/// ADL400 secondary-side integer block (hand-computed big-endian integers).
const ADL400_IMAGE: &[(u16, &[u16])] = &[
    (
        0x0000,
        &[
            0x00BC, 0x614E, // 0x0000 combined 12345678 × 0.01 = 123456.78 kWh
            0, 0, 0, 0, 0, 0, 0, 0, // 0x0002..0x0009
            0x00B7, 0x1B00, // 0x000A import 12000000 → 120000.00 kWh
            0, 0, 0, 0, 0, 0, 0, 0, // 0x000C..0x0013
            0x0005, 0x464E, // 0x0014 export 345678 → 3456.78 kWh
        ],
    ),
    (
        0x0061,
        &[
            0x08FE, 0x08FA, 0x0906, // 0x0061 U a/b/c 2302/2298/2310 → 230.2/229.8/231.0 V
            0x0208, 0x01FE, 0x01EA, // 0x0064 I a/b/c 520/510/490 → 5.20/5.10/4.90 A
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,      // 0x0067..0x0076
            0x138A, // 0x0077 frequency 5002 → 50.02 Hz
        ],
    ),
    (0x008D, &[0x0001, 0x0028]), // PT 1, CT 40 as programmed into the meter
    (
        0x0164,
        &[
            0x0000, 0x04BA, // 0x0164 Pa 1210 W
            0x0000, 0x04A6, // 0x0166 Pb 1190 W
            0x0000, 0x04CE, // 0x0168 Pc 1230 W
            0x0000, 0x0E2E, // 0x016A P total 3630 W
            0, 0, 0, 0, 0, 0, // 0x016C..0x0171
            0x0000, 0x01A4, // 0x0172 Q total 420 var
            0, 0, 0, 0, 0, 0, // 0x0174..0x0179
            0x0000, 0x0E47, // 0x017A S total 3655 VA
            0, 0, 0,      // 0x017C..0x017E
            0x03E1, // 0x017F PF 993 → 0.993
        ],
    ),
];

#[test]
fn adl400_secondary_integers_decode() {
    let p = load("acrel-adl400");
    let n = decode(&p, ADL400_IMAGE);
    assert!(n.missing.is_empty(), "{:?}", n.missing);
    assert_value(&n, "energy_combined", Unit::WattHour, 123_456_780.0);
    assert_value(&n, "energy_import", Unit::WattHour, 120_000_000.0);
    assert_value(&n, "energy_export", Unit::WattHour, 3_456_780.0);
    for (f, v) in [
        ("voltage_l1", 230.2),
        ("voltage_l2", 229.8),
        ("voltage_l3", 231.0),
    ] {
        assert_value(&n, f, Unit::Volt, v);
    }
    for (f, v) in [
        ("current_l1", 5.2),
        ("current_l2", 5.1),
        ("current_l3", 4.9),
    ] {
        assert_value(&n, f, Unit::Ampere, v);
    }
    assert_value(&n, "frequency", Unit::Hertz, 50.02);
    assert_int(&n, "pt_ratio", Unit::One, 1);
    assert_int(&n, "ct_ratio", Unit::One, 40);
    // Fields with a ratio are floats even at ratio 1 (one type per field).
    assert_eq!(get(&n, "active_power").value, Value::Float(3630.0));
    for (f, v) in [
        ("active_power_l1", 1210.0),
        ("active_power_l2", 1190.0),
        ("active_power_l3", 1230.0),
    ] {
        assert_value(&n, f, Unit::Watt, v);
    }
    assert_value(&n, "reactive_power", Unit::Var, 420.0);
    assert_value(&n, "apparent_power", Unit::VoltAmpere, 3655.0);
    assert_value(&n, "power_factor", Unit::One, 0.993);
    for r in &n.readings {
        assert_eq!(
            checked(&p, &n, r.field.as_str()),
            Quality::Good,
            "{}",
            r.field
        );
    }
}

#[test]
fn ct_pt_ratios_turn_secondary_values_into_primary_ones() {
    let p = load("acrel-adl400");
    // A 200/5 A CT (40) and a 10 kV/100 V PT (100) on a medium-voltage feeder.
    let ratios = Ratios {
        ct: 40.0,
        pt: 100.0,
    };
    let n = decode_with(&p, ADL400_IMAGE, ratios);
    assert_value(&n, "current_l1", Unit::Ampere, 5.2 * 40.0);
    assert_value(&n, "voltage_l1", Unit::Volt, 230.2 * 100.0);
    assert_value(&n, "active_power", Unit::Watt, 3630.0 * 4000.0);
    assert_value(&n, "reactive_power", Unit::Var, 420.0 * 4000.0);
    assert_value(&n, "apparent_power", Unit::VoltAmpere, 3655.0 * 4000.0);
    assert_value(
        &n,
        "energy_combined",
        Unit::WattHour,
        123_456_780.0 * 4000.0,
    );
    // No ratio: frequency, PF and the meter's own ratio registers are unchanged.
    assert_value(&n, "frequency", Unit::Hertz, 50.02);
    assert_value(&n, "power_factor", Unit::One, 0.993);
    assert_int(&n, "ct_ratio", Unit::One, 40);
    for (f, r) in [
        ("current_l2", Some(Ratio::Ct)),
        ("voltage_l3", Some(Ratio::Pt)),
        ("energy_export", Some(Ratio::CtPt)),
        ("frequency", None),
    ] {
        assert_eq!(p.field(f).unwrap().ratio, r, "{f}");
    }
    // The DTSU666's scaled floats are secondary-side too.
    let dtsu = load("chint-dtsu666");
    for (f, r) in [
        ("current_l1", Ratio::Ct),
        ("voltage_ll_12", Ratio::Pt),
        ("reactive_power", Ratio::CtPt),
        ("energy_import", Ratio::CtPt),
    ] {
        assert_eq!(dtsu.field(f).unwrap().ratio, Some(r), "{f}");
    }
    // The profile's ranges describe the meter's (secondary) values: primary values far
    // above them are still good once the ratio is divided back out…
    let power = p.field("active_power").unwrap();
    let primary = get(&n, "active_power");
    assert_eq!(
        assess_scaled(power, primary, None, ratios.multiplier(power.ratio)),
        Quality::Good
    );
    // …and a secondary value outside the range is flagged whatever the ratio.
    let hot = decode_with(&p, &[(0x016A, &[0x0001, 0x86A0])], ratios); // 100000 W secondary
    assert_eq!(
        assess_scaled(
            power,
            get(&hot, "active_power"),
            None,
            ratios.multiplier(power.ratio)
        ),
        Quality::Bad(QualityReason::OutOfRange)
    );
}

#[test]
fn abb_ab_integers_and_not_available_sentinels_decode() {
    let p = load("abb-ab");
    let n = decode(
        &p,
        &[
            (
                0x5000,
                &[
                    0x0000, 0x0000, 0x075B, 0xCD15, // import 123456789 → 1234567.89 kWh
                    0x0000, 0x0000, 0x0000, 0x10E1, // export 4321 → 43.21 kWh
                ],
            ),
            (
                0x5460,
                &[
                    0x0000, 0x0000, 0x0262, 0x5A00, // import L1 400000.00 kWh
                    0x0000, 0x0000, 0x0271, 0x9C40, // import L2 410000.00 kWh
                    0x0000, 0x0000, 0x0287, 0xD6D5, // import L3 424567.89 kWh
                    0x0000, 0x0000, 0x0000, 0x03E8, // export L1 10.00 kWh
                    0x0000, 0x0000, 0x0000, 0x07D0, // export L2 20.00 kWh
                    0x0000, 0x0000, 0x0000, 0x0529, // export L3 13.21 kWh
                ],
            ),
            (
                0x5B00,
                &[
                    0x0000, 0x08FE, // 0x5B00 U1 2302 → 230.2 V
                    0x0000, 0x08FA, // 0x5B02 U2 229.8 V
                    0x0000, 0x0906, // 0x5B04 U3 231.0 V
                    0, 0, 0, 0, 0, 0, // 0x5B06..0x5B0B
                    0x0000, 0x0208, // 0x5B0C I1 520 → 5.20 A
                    0x0000, 0x01FE, // 0x5B0E I2 5.10 A
                    0x0000, 0x01EA, // 0x5B10 I3 4.90 A
                    0, 0, // 0x5B12..0x5B13
                    0x0005, 0x8548, // 0x5B14 P 361800 → 3618.00 W
                    0x0001, 0xD6B4, // 0x5B16 P1 1205.00 W
                    0x0001, 0xD3F8, // 0x5B18 P2 1198.00 W
                    0xFFFD, 0xB610, // 0x5B1A P3 -150000 → -1500.00 W (exporting)
                    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,      // 0x5B1C..0x5B2B
                    0x138A, // 0x5B2C frequency 5002 → 50.02 Hz
                    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,      // 0x5B2D..0x5B39
                    0x03C2, // 0x5B3A PF 0.962
                    0x03C0, // 0x5B3B PF1 0.960
                    0xFC45, // 0x5B3C PF2 -955 → -0.955
                    0x03CA, // 0x5B3D PF3 0.970
                ],
            ),
        ],
    );
    assert!(n.missing.is_empty(), "{:?}", n.missing);
    assert_value(&n, "energy_import", Unit::WattHour, 1_234_567_890.0);
    assert_value(&n, "energy_export", Unit::WattHour, 43_210.0);
    for (f, v) in [
        ("energy_import_l1", 400_000_000.0),
        ("energy_import_l2", 410_000_000.0),
        ("energy_import_l3", 424_567_890.0),
        ("energy_export_l1", 10_000.0),
        ("energy_export_l2", 20_000.0),
        ("energy_export_l3", 13_210.0),
    ] {
        assert_value(&n, f, Unit::WattHour, v);
    }
    for (f, v) in [
        ("voltage_l1", 230.2),
        ("voltage_l2", 229.8),
        ("voltage_l3", 231.0),
    ] {
        assert_value(&n, f, Unit::Volt, v);
    }
    for (f, v) in [
        ("current_l1", 5.2),
        ("current_l2", 5.1),
        ("current_l3", 4.9),
    ] {
        assert_value(&n, f, Unit::Ampere, v);
    }
    for (f, v) in [
        ("active_power", 3618.0),
        ("active_power_l1", 1205.0),
        ("active_power_l2", 1198.0),
        ("active_power_l3", -1500.0),
    ] {
        assert_value(&n, f, Unit::Watt, v);
    }
    assert_value(&n, "frequency", Unit::Hertz, 50.02);
    for (f, v) in [
        ("power_factor", 0.962),
        ("power_factor_l1", 0.96),
        ("power_factor_l2", -0.955),
        ("power_factor_l3", 0.97),
    ] {
        assert_value(&n, f, Unit::One, v);
    }
    for r in &n.readings {
        assert_eq!(
            checked(&p, &n, r.field.as_str()),
            Quality::Good,
            "{}",
            r.field
        );
    }

    // "Not available": all-ones unsigned, 0x7FFF… signed (mbmd `wrapTransform`).
    let n = decode(
        &p,
        &[
            (0x5B02, &[0xFFFF, 0xFFFF]),                 // U2 unsigned all-ones
            (0x5B18, &[0x7FFF, 0xFFFF]),                 // P2 signed 0x7FFF…
            (0x5B3C, &[0x7FFF]),                         // PF2
            (0x5464, &[0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF]), // import L2
        ],
    );
    for f in [
        "voltage_l2",
        "active_power_l2",
        "power_factor_l2",
        "energy_import_l2",
    ] {
        assert_eq!(
            get(&n, f).quality,
            Quality::Bad(QualityReason::NotAvailable),
            "{f}"
        );
    }
}

#[test]
fn iem3000_floats_and_i64_watt_hours_decode() {
    let p = load("schneider-iem3000");
    // doc 3000 (current L1) is wire address 0x0BB7.
    assert_eq!(
        p.field("current_l1").unwrap().address,
        RegisterAddress(0x0BB7)
    );
    let n = decode(
        &p,
        &[
            (
                0x0BB7,
                &[
                    0x40A6, 0x6666, // I1 5.2 A
                    0x40A3, 0x3333, // I2 5.1 A
                    0x409C, 0xCCCD, // I3 4.9 A
                ],
            ),
            (
                0x0BD3,
                &[
                    0x4367, 0x8000, // V1 231.5 V
                    0x4366, 0x199A, // V2 230.1 V
                    0x4365, 0x6666, // V3 229.4 V
                ],
            ),
            (
                0x0BED,
                &[
                    0x3F9A, 0x3D71, // P1 1.205 kW
                    0x3F99, 0x5810, // P2 1.198 kW
                    0x3F9B, 0x851F, // P3 1.215 kW
                    0x4067, 0x8D50, // P total 3.618 kW
                    0, 0, 0, 0, 0, 0, // 0x0BF5..0x0BFA
                    0xBE80, 0x0000, // 0x0BFB Q total -0.25 kvar
                    0, 0, 0, 0, 0, 0, // 0x0BFD..0x0C02
                    0x4090, 0x624E, // 0x0C03 S total 4.512 kVA
                ],
            ),
            (0x0C25, &[0x4248, 0x147B]), // frequency 50.02 Hz
            (
                0x0C83,
                &[
                    0x0000, 0x0000, 0x00BC, 0x614E, // import 12345678 Wh
                    0x0000, 0x0000, 0x0000, 0x10E1, // export 4321 Wh
                    0, 0, 0, 0, 0, 0, 0, 0, // 0x0C8B..0x0C92
                    0x0000, 0x0000, 0x000F, 0x1206, // reactive import 987654 varh
                    0x0000, 0x0000, 0x0000, 0x0000, // reactive export 0 varh
                ],
            ),
            (
                0x0DBD,
                &[
                    0x0000, 0x0000, 0x003D, 0x0900, // import L1 4000000 Wh
                    0x0000, 0x0000, 0x003E, 0x8FA0, // import L2 4100000 Wh
                    0x0000, 0x0000, 0x0040, 0xC8AE, // import L3 4245678 Wh
                ],
            ),
        ],
    );
    assert!(n.missing.is_empty(), "{:?}", n.missing);
    for (f, v) in [
        ("current_l1", 5.2),
        ("current_l2", 5.1),
        ("current_l3", 4.9),
    ] {
        assert_value(&n, f, Unit::Ampere, v);
    }
    for (f, v) in [
        ("voltage_l1", 231.5),
        ("voltage_l2", 230.1),
        ("voltage_l3", 229.4),
    ] {
        assert_value(&n, f, Unit::Volt, v);
    }
    for (f, v) in [
        ("active_power_l1", 1205.0),
        ("active_power_l2", 1198.0),
        ("active_power_l3", 1215.0),
        ("active_power", 3618.0),
    ] {
        assert_value(&n, f, Unit::Watt, v);
    }
    assert_value(&n, "reactive_power", Unit::Var, -250.0);
    assert_value(&n, "apparent_power", Unit::VoltAmpere, 4512.0);
    assert_value(&n, "frequency", Unit::Hertz, 50.02);
    // Watt-hour integers need no conversion and stay integers.
    assert_int(&n, "energy_import", Unit::WattHour, 12_345_678);
    assert_int(&n, "energy_export", Unit::WattHour, 4321);
    assert_int(&n, "reactive_energy_import", Unit::VarHour, 987_654);
    assert_int(&n, "reactive_energy_export", Unit::VarHour, 0);
    assert_int(&n, "energy_import_l1", Unit::WattHour, 4_000_000);
    assert_int(&n, "energy_import_l2", Unit::WattHour, 4_100_000);
    assert_int(&n, "energy_import_l3", Unit::WattHour, 4_245_678);
    for r in &n.readings {
        assert_eq!(
            checked(&p, &n, r.field.as_str()),
            Quality::Good,
            "{}",
            r.field
        );
    }
}

#[test]
fn xintai_water_meter_floats_and_valve_bits_decode() {
    let p = load("xintai-water-meter");
    // The driver's one FC03 block read: 28 registers from 0x0001, floats DCBA.
    let n = decode(
        &p,
        &[(
            0x0001,
            &[
                0x2552, 0x9A44, // 0x0001 forward 1234.567 m³ (0x449A5225 little-endian)
                0x0000, 0x003E, // 0x0003 reverse 0.125 m³
                0x0AD7, 0xA33E, // 0x0005 flow 0.32 m³/h
                0x00AA, // 0x0007 pipe full
                0x0080, 0xB042, // 0x0008 prepaid balance 88.25 m³
                0x0AD7, 0xA33E, // 0x000A pressure 0.32 MPa
                0x0000, 0x9441, // 0x000C water 18.5 °C
                0x0005, // 0x000E Modbus id 5
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // 0x000F..0x0019
                0x6666, 0x6640, // 0x001A battery 3.6 V
                0x0009, // 0x001C valve status: bit0 open, bit3 battery low
            ],
        )],
    );
    assert!(n.missing.is_empty(), "{:?}", n.missing);
    assert_value(&n, "volume_forward", Unit::CubicMetre, 1234.567);
    assert_value(&n, "volume_reverse", Unit::CubicMetre, 0.125);
    assert_value(&n, "flow_rate", Unit::CubicMetrePerHour, 0.32);
    assert_int(&n, "pipe_status", Unit::One, 0xAA);
    assert_value(&n, "remaining_volume", Unit::CubicMetre, 88.25);
    assert_value(&n, "pressure", Unit::Pascal, 320_000.0);
    assert_value(&n, "water_temp", Unit::Celsius, 18.5);
    assert_int(&n, "meter_address", Unit::One, 5);
    assert_value(&n, "battery_voltage", Unit::Volt, 3.6);
    assert_bool(&n, "valve_open", true);
    assert_bool(&n, "valve_closed", false);
    assert_bool(&n, "valve_fault", false);
    assert_bool(&n, "battery_low", true);
    for r in &n.readings {
        assert_eq!(
            checked(&p, &n, r.field.as_str()),
            Quality::Good,
            "{}",
            r.field
        );
    }
    for f in ["valve_fault", "battery_low"] {
        assert_eq!(p.field(f).unwrap().stream, Stream::Alarms, "{f}");
    }
    for f in ["valve_open", "valve_closed", "volume_forward"] {
        assert_eq!(p.field(f).unwrap().stream, Stream::Readings, "{f}");
    }
    // Closed with a valve fault: bits 1 and 2.
    let n = decode(&p, &[(0x001C, &[0x0006])]);
    assert_bool(&n, "valve_open", false);
    assert_bool(&n, "valve_closed", true);
    assert_bool(&n, "valve_fault", true);
    assert_bool(&n, "battery_low", false);
    // The whole map is one read, as the source's driver does it.
    let reads = citygate::source::modbus::plan(&p);
    assert_eq!(reads.len(), 1, "{reads:?}");
    assert_eq!((reads[0].start, reads[0].count), (RegisterAddress(1), 28));
}

/// Read requests per poll for every shipped profile (the numbers the issue asks for).
#[test]
fn read_requests_per_poll_of_each_shipped_profile() {
    use citygate::source::modbus::plan;
    let set = ProfileSet::load_dir(&profile_dir()).unwrap();
    let expected = [
        ("abb-ab", 3),
        ("acrel-adl400", 4),
        ("chint-ddsu666", 3),
        ("chint-dtsu666", 4),
        ("eastron-sdm120", 3),
        ("eastron-sdm630", 2),
        ("oem-tuf-2000m", 4),
        ("schneider-iem3000", 6),
        ("xintai-water-meter", 1),
    ];
    let mut table = Vec::new();
    // MQTT profiles have no registers to plan.
    for p in set.iter().filter(|p| !p.is_mqtt()) {
        let reads = plan(p);
        let registers: u32 = reads.iter().map(|r| u32::from(r.count)).sum();
        table.push(format!(
            "{:<20} {:>2} fields {:>2} requests {:>4} registers",
            p.name,
            p.fields.len(),
            reads.len(),
            registers
        ));
    }
    println!("{}", table.join("\n"));
    for (name, n) in expected {
        let p = set.get(name).unwrap();
        assert_eq!(plan(p).len(), n, "{name}: {:?}", plan(p));
    }
}

/// The simulator serves every shipped profile (combined totals, bits, ratios included) so
/// that one poll along the read plan decodes to exactly the values it recorded.
#[test]
fn the_simulator_serves_every_shipped_profile_as_planned() {
    use citygate::reading::UnitId;
    use citygate::sim::SimMeters;
    use citygate::source::modbus::plan;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let set = ProfileSet::load_dir(&profile_dir()).unwrap();
    for p in set.iter() {
        let meters = SimMeters::new(p.clone(), 1, 7).with_tick(std::time::Duration::ZERO);
        for round in 0..20 {
            let mut img = RegisterImage::new();
            // The tick is zero, so every request takes a new snapshot: each request is
            // compared with the snapshot it produced.
            for req in plan(p) {
                let words = meters
                    .read(UnitId(1), p.function, req.start, req.count)
                    .unwrap_or_else(|e| panic!("{}: {req:?} refused: {e:?}", p.name));
                assert_eq!(words.len(), usize::from(req.count), "{}", p.name);
                let mut one = RegisterImage::new();
                one.insert(req.start, words.clone());
                img.insert(req.start, words);
                let snap = meters.history(UnitId(1)).pop().unwrap();
                let n = normalise(p, &DeviceId::new("sim").unwrap(), 0, &one);
                for r in &n.readings {
                    let f = p.field(r.field.as_str()).unwrap();
                    let served = snap.values[&f.name] * f.unit.factor;
                    let got = r.value.as_f64().unwrap();
                    assert!(
                        (got - served).abs() <= 1e-9 * served.abs().max(1.0),
                        "{} round {round}: {} decoded {got}, served {served}",
                        p.name,
                        f.name
                    );
                    if matches!(f.ty, citygate::profile::FieldType::Bit(_)) {
                        assert!(matches!(r.value, Value::Bool(_)), "{}", f.name);
                    }
                }
            }
            let n = normalise(p, &DeviceId::new("sim").unwrap(), 0, &img);
            assert!(n.missing.is_empty(), "{}: {:?}", p.name, n.missing);
        }
        // Combined totals keep counting up as the sum of their parts.
        if let Some(total) = p.fields.iter().find(|f| f.fraction.is_some()) {
            let history = meters.history(UnitId(1));
            let values: Vec<f64> = history.iter().map(|s| s.values[&total.name]).collect();
            assert!(
                values.windows(2).all(|w| w[1] > w[0]),
                "{}.{}: {values:?}",
                p.name,
                total.name
            );
            assert!(
                values.iter().any(|v| v.fract() != 0.0),
                "{}.{}: the fraction part is served",
                p.name,
                total.name
            );
        }
    }
}

/// Issue 11 acceptance: `check` rejects a profile field without classification, naming
/// the file, the field's line, the key and the valid values, and exits 64.
#[test]
fn check_rejects_a_profile_field_without_classification() {
    let dir = tempfile::tempdir().unwrap();
    let profiles = dir.path().join("profiles");
    std::fs::create_dir(&profiles).unwrap();
    for entry in std::fs::read_dir(profile_dir()).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "toml") {
            std::fs::copy(&p, profiles.join(p.file_name().unwrap())).unwrap();
        }
    }
    let text = profile_text("chint-ddsu666");
    let name_at = text.find("name = \"voltage_l1\"").unwrap();
    let line = text[..name_at].matches('\n').count() + 1;
    let edited = text.replacen("category = \"measurement\"\n", "", 1);
    assert_ne!(edited, text);
    let broken = profiles.join("chint-ddsu666.toml");
    std::fs::write(&broken, edited).unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/gateway.example.toml");
    let cfg = std::fs::read_to_string(example).unwrap().replace(
        "profiles_dir = \"../firmware-profiles\"",
        "profiles_dir = \"profiles\"",
    );
    let cfg_path = dir.path().join("gw.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_citygate"))
        .args(["check", "--config"])
        .arg(&cfg_path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains(&format!("{}:{line}:", broken.display())),
        "file:line of the field: {stderr}"
    );
    assert!(
        stderr.contains("(voltage_l1).category`")
            && stderr.contains("\"identifier\", \"measurement\", \"status\", \"alarm\""),
        "names the key and the valid values: {stderr}"
    );
}

/// Issue 11 item 6: the shipped meters' mains voltages carry a frozen-value limit and
/// their frequencies a rate and a frozen-value limit; no counter carries `frozen_after`.
#[test]
fn shipped_voltages_and_frequencies_carry_quality_limits() {
    let set = ProfileSet::load_dir(&profile_dir()).unwrap();
    let mut seen = 0;
    for p in set.iter() {
        for f in &p.fields {
            let name = f.name.as_str();
            let mains_voltage = name.starts_with("voltage_l");
            if mains_voltage || name == "frequency" {
                seen += 1;
                assert!(f.frozen_after.is_some(), "{}: {name}", p.name);
            }
            if name == "frequency" {
                assert_eq!(f.max_rate, Some(5.0), "{}: {name}", p.name);
            }
            if matches!(f.counter, Counter::Monotonic { .. }) {
                assert_eq!(f.frozen_after, None, "{}: {name}", p.name);
            }
        }
    }
    assert!(seen >= 20, "{seen}");
}
