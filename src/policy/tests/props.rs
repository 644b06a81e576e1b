//! Property tests: every aggregate against a straightforward reference, over random samples,
//! zones (with DST) and window lengths.

use super::*;

// ---- references ----------------------------------------------------------------------

/// Every window boundary of the civil days from `from_ms` to `to_ms` (and one day
/// either side), as instants, sorted: civil midnight plus multiples of the length.
fn boundaries(tz: &TimeZone, len_s: i64, from_ms: i64, to_ms: i64) -> Vec<i64> {
    let date = |ms| {
        tz.to_datetime(jiff::Timestamp::from_millisecond(ms).unwrap())
            .date()
    };
    let (mut day, last) = (
        date(from_ms).yesterday().unwrap(),
        date(to_ms).tomorrow().unwrap(),
    );
    let mut b = Vec::new();
    while day <= last {
        let mut civil = day.to_datetime(jiff::civil::Time::midnight());
        while civil.date() == day {
            b.push(
                tz.to_ambiguous_timestamp(civil)
                    .compatible()
                    .unwrap()
                    .as_millisecond(),
            );
            civil = civil
                .checked_add(jiff::SignedDuration::from_secs(len_s))
                .unwrap();
        }
        day = day.tomorrow().unwrap();
    }
    b.sort_unstable();
    b.dedup();
    b
}

/// The window `[b_i, b_i+1)` of `boundaries` that contains `at_ms`.
fn window_of(b: &[i64], at_ms: i64) -> (i64, i64) {
    let i = b.partition_point(|x| *x <= at_ms);
    (b[i - 1], b[i])
}

fn zones() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "UTC",
        "Asia/Shanghai",
        "Europe/Berlin",
        "Asia/Kolkata",
        "America/New_York",
    ])
}

fn lengths() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["1m", "5m", "15m", "30m", "1h", "2h", "1d"])
}

/// Sorted timestamps over about two days from a start that includes DST change days.
fn times() -> impl Strategy<Value = Vec<i64>> {
    let starts = prop::sample::select(vec![
        T0,
        1_774_746_000_000,
        1_792_890_000_000,
        1_773_536_400_000,
    ]);
    (starts, prop::collection::vec(1i64..40_000, 1..200)).prop_map(|(s, gaps)| {
        let mut t = s;
        gaps.into_iter()
            .map(|g| {
                t += g * 1_000 / 3;
                t
            })
            .collect()
    })
}

fn secs(len: &str) -> i64 {
    i64::from(DayDivision::parse(len, 60).unwrap().secs())
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

proptest! {
    /// issue 11 item 1: sum/mean/min/max/last per window equal a reference over random
    /// samples and alignments (non-UTC and DST zones); no sample counted twice.
    #[test]
    fn aggregates_equal_a_reference(
        zone in zones(), len in lengths(), times in times(),
        f in prop::sample::select(vec!["sum", "mean", "min", "max", "last"]),
        values in prop::collection::vec(-1000.0f64..1000.0, 200),
        close_every in 1usize..50,
    ) {
        let tz = TimeZone::get(zone).unwrap();
        let p = profile();
        let field = p.field("voltage_l1").unwrap();
        let mut e = engine_in(&format!("[[rule]]\nfield = \"voltage_l1\"\naction = \"aggregate\"\nfunction = \"{f}\"\nwindow = \"{len}\"\n"), tz.clone());
        let d = Dev::new("m1", None);
        let mut out = Vec::new();
        let mut reference: BTreeMap<(i64, i64), Vec<f64>> = BTreeMap::new();
        let b = boundaries(&tz, secs(len), times[0], *times.last().unwrap());
        for (i, at) in times.iter().enumerate() {
            e.accept(&reading(field, &d.id, Value::Float(values[i]), *at), field, &d.ctx(), &mut out);
            reference.entry(window_of(&b, *at)).or_default().push(values[i]);
            if i % close_every == 0 {
                e.close_due(*at, &mut out);
            }
        }
        e.flush_partial(&mut out);
        prop_assert_eq!(out.len(), reference.len());
        prop_assert_eq!(e.stats().late_samples, 0);
        let covered: u32 = out.iter().map(|r| r.window.as_ref().unwrap().samples).sum();
        prop_assert_eq!(covered as usize, times.len(), "every sample in exactly one window");
        for (r, ((start, end), xs)) in out.iter().zip(&reference) {
            let w = r.window.as_ref().unwrap();
            prop_assert_eq!((w.start_ms, w.end_ms, w.samples as usize), (*start, *end, xs.len()));
            let want = match f {
                "sum" => xs.iter().sum::<f64>(),
                "mean" => xs.iter().sum::<f64>() / xs.len() as f64,
                "min" => xs.iter().cloned().fold(f64::INFINITY, f64::min),
                "max" => xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
                _ => *xs.last().unwrap(),
            };
            let got = r.value.as_f64().unwrap();
            prop_assert!(close(got, want), "{} {} != {}", f, got, want);
        }
    }

    /// issue 11 item 1: with samples out of order and windows closing in between, every
    /// sample is either in exactly one window or counted late: never both, never twice;
    /// a window never holds a sample outside its bounds.
    #[test]
    fn out_of_order_samples_are_counted_once_or_late(
        zone in zones(), len in lengths(), times in times(),
        swaps in prop::collection::vec(any::<prop::sample::Index>(), 0..60),
        closes in prop::collection::vec(any::<bool>(), 200),
    ) {
        let tz = TimeZone::get(zone).unwrap();
        let p = profile();
        let field = p.field("voltage_l1").unwrap();
        let mut e = engine_in(&format!("[[rule]]\nfield = \"voltage_l1\"\naction = \"aggregate\"\nfunction = \"min\"\nwindow = \"{len}\"\n"), tz);
        let mut times = times;
        for s in swaps {
            let i = s.index(times.len());
            let j = (i + 1).min(times.len() - 1);
            times.swap(i, j);
        }
        let d = Dev::new("m1", None);
        let mut out = Vec::new();
        let mut now = i64::MIN;
        for (i, at) in times.iter().enumerate() {
            // The value is the sample's own time: a window's min must lie in its bounds.
            e.accept(&reading(field, &d.id, Value::Int(*at), *at), field, &d.ctx(), &mut out);
            now = now.max(*at);
            if closes[i] {
                e.close_due(now, &mut out);
            }
        }
        e.flush_partial(&mut out);
        let covered: u64 = out.iter().map(|r| u64::from(r.window.unwrap().samples)).sum();
        prop_assert_eq!(covered + e.stats().late_samples, times.len() as u64);
        let mut starts: Vec<i64> = out.iter().map(|r| r.at_ms).collect();
        starts.dedup();
        prop_assert_eq!(starts.len(), out.len(), "one record per window");
        for r in &out {
            let w = r.window.unwrap();
            let Value::Int(min) = r.value else { panic!("{:?}", r.value) };
            prop_assert!(w.start_ms <= min && min < w.end_ms);
        }
    }

    /// issue 11 item 1: deltas over counter series with resets and rollovers equal the
    /// reference per window and add up to the total; resets mark the window uncertain.
    #[test]
    fn deltas_equal_a_reference_and_add_up(
        zone in zones(), len in lengths(), times in times(),
        steps in prop::collection::vec((0u32..3000, 0u8..40), 200),
        start in 0i64..100_000,
    ) {
        const R: i64 = 100_000;
        let tz = TimeZone::get(zone).unwrap();
        let p = profile();
        let field = p.field("energy_import").unwrap();
        let mut e = engine_in(&format!("[[rule]]\nfield = \"energy_import\"\naction = \"aggregate\"\nfunction = \"delta\"\nwindow = \"{len}\"\n"), tz.clone());
        let d = Dev::new("m1", None);
        let mut out = Vec::new();
        let mut reference: BTreeMap<(i64, i64), (i64, bool)> = BTreeMap::new();
        let (mut v, mut prev): (i64, Option<i64>) = (start, None);
        let mut total = 0;
        let b = boundaries(&tz, secs(len), times[0], *times.last().unwrap());
        for (i, at) in times.iter().enumerate() {
            let (inc, dice) = steps[i];
            v = if dice == 0 { i64::from(inc) % 50 } else { (v + i64::from(inc)) % R };
            e.accept(&reading(field, &d.id, Value::Int(v), *at), field, &d.ctx(), &mut out);
            let (add, reset) = match prev {
                None => (0, false),
                Some(p) if v >= p => (v - p, false),
                Some(p) if p * 10 > 9 * R && v * 10 < R => (R - p + v, false),
                Some(_) => (v, true),
            };
            prop_assert!(add >= 0);
            total += add;
            prev = Some(v);
            let w = reference.entry(window_of(&b, *at)).or_default();
            w.0 += add;
            w.1 |= reset;
        }
        e.flush_partial(&mut out);
        prop_assert_eq!(out.len(), reference.len());
        let mut sum = 0;
        for (r, ((start, _), (want, reset))) in out.iter().zip(&reference) {
            prop_assert_eq!(r.at_ms, *start);
            prop_assert_eq!(r.value.clone(), Value::Int(*want));
            prop_assert_eq!(r.quality != Quality::Good, *reset);
            sum += want;
        }
        prop_assert_eq!(sum, total);
    }

    /// issue 11 item 1: a generalised value is never finer than its step or bucket, and
    /// a generalised time never finer than its time step.
    #[test]
    fn generalisation_is_never_finer_than_configured(
        v in -1e6f64..1e6, at in T0..T0 + 86_400_000 * 3,
        step in prop::sample::select(vec![0.1, 0.25, 0.5, 1.0, 5.0, 10.0, 100.0]),
        tstep in prop::sample::select(vec!["1s", "1m", "15m", "1h", "1d"]),
        edges in prop::collection::btree_set(-1000i32..1000, 1..6),
    ) {
        let p = profile();
        let field = p.field("voltage_l1").unwrap();
        let edges: Vec<f64> = edges.into_iter().map(f64::from).collect();
        let rules = format!(
            "[[rule]]\nfield = \"voltage_l1\"\naction = \"generalise\"\nstep = {step:?}\ntime_step = \"{tstep}\"\n\
             [[rule]]\nfield = \"voltage_l1\"\naction = \"generalise\"\nbuckets = {edges:?}\n"
        );
        let mut e = engine(&rules);
        let d = Dev::new("m1", None);
        let out = feed(&mut e, field, &d, &[(at, Value::Float(v))]);
        prop_assert_eq!(out.len(), 2);
        let g = out[0].value.as_f64().unwrap();
        let k = g / step;
        prop_assert!((k - k.round()).abs() < 1e-6, "{} is not a multiple of {}", g, step);
        prop_assert!((g - v).abs() <= step / 2.0 + 1e-6);
        let tz = TimeZone::get("Asia/Shanghai").unwrap();
        let t = out[0].at_ms;
        let step_s = i64::from(DayDivision::parse(tstep, 1).unwrap().secs());
        prop_assert!(t <= at && at - t < step_s * 1000);
        let midnight = tz
            .to_datetime(jiff::Timestamp::from_millisecond(t).unwrap())
            .date()
            .to_zoned(tz.clone())
            .unwrap()
            .timestamp()
            .as_millisecond();
        prop_assert_eq!((t - midnight) % (step_s * 1000), 0, "on a civil step boundary");
        let label = match &out[1].value { Value::Text(s) => s.clone(), other => panic!("{other:?}") };
        let i = edges.iter().filter(|e| **e <= v).count();
        let lo = if i == 0 { "-inf".to_string() } else { edges[i - 1].to_string() };
        let hi = edges.get(i).map_or("inf".to_string(), |e| e.to_string());
        prop_assert_eq!(label, format!("[{lo},{hi})"));
    }

    /// issue 11 item 4: area aggregates below k never appear; those at or above k equal
    /// the reference (per-device sum, then across); suppressions are counted.
    #[test]
    fn area_aggregates_below_k_never_appear(
        areas in prop::collection::vec(1usize..8, 1..5), k in 2u32..7,
        times in times(), seed in any::<u64>(),
    ) {
        let p = profile();
        let field = p.field("voltage_l1").unwrap();
        let tz = TimeZone::get("Asia/Shanghai").unwrap();
        let mut e = engine_in(&format!("[[rule]]\nfield = \"voltage_l1\"\naction = \"aggregate\"\nfunction = \"sum\"\nwindow = \"1h\"\nover = \"area\"\nacross = \"max\"\nk = {k}\n"), tz.clone());
        let devs: Vec<Dev> = areas.iter().enumerate()
            .flat_map(|(a, n)| (0..*n).map(move |i| Dev::new(&format!("a{a}d{i}"), Some(&format!("area{a}")))))
            .collect();
        let mut out = Vec::new();
        // (area, window) -> device -> per-device sum
        let mut reference: BTreeMap<(String, i64), BTreeMap<String, f64>> = BTreeMap::new();
        let mut rng = seed;
        let b = boundaries(&tz, 3600, times[0], *times.last().unwrap());
        for at in &times {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let d = &devs[(rng >> 33) as usize % devs.len()];
            let v = f64::from((rng >> 40) as u16 % 500);
            e.accept(&reading(field, &d.id, Value::Float(v), *at), field, &d.ctx(), &mut out);
            let w = window_of(&b, *at).0;
            *reference.entry((d.area.clone().unwrap().to_string(), w)).or_default().entry(d.subject.clone()).or_default() += v;
        }
        e.close_due(i64::MAX / 2, &mut out);
        prop_assert!(out.iter().all(|r| r.window.as_ref().unwrap().devices >= k));
        let expected: Vec<_> = reference.iter().filter(|(_, devs)| devs.len() >= k as usize).collect();
        prop_assert_eq!(out.len(), expected.len());
        prop_assert_eq!(e.stats().suppressed as usize, reference.len() - expected.len());
        let mut got: Vec<_> = out.iter().map(|r| ((r.subject.clone(), r.at_ms), r.value.as_f64().unwrap())).collect();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        for (((area, w), devs), (key, value)) in expected.into_iter().zip(got) {
            prop_assert_eq!(key, (format!("area:{area}"), *w));
            let want = devs.values().cloned().fold(f64::NEG_INFINITY, f64::max);
            prop_assert!(close(value, want));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// issue 11 (aggregates survive a crash): an engine restored at any point from a
    /// snapshot (through its encoded bytes, as a checkpoint stores it) emits exactly what the
    /// uninterrupted engine emits from there on: per-device windows, counter deltas across
    /// the cut, and area windows.
    #[test]
    fn a_restored_engine_continues_exactly_where_its_snapshot_was_taken(
        zone in zones(), len in lengths(), times in times(), cut in 0usize..200,
        seed in any::<u64>(), close_every in 1usize..30,
    ) {
        let tz = TimeZone::get(zone).unwrap();
        let p = profile();
        let energy = p.field("energy_import").unwrap();
        let volts = p.field("voltage_l1").unwrap();
        let rules = format!(
            "[[rule]]\nfield = \"energy_import\"\naction = \"aggregate\"\nfunction = \"delta\"\nwindow = \"{len}\"\n\
             [[rule]]\nfield = \"voltage_l1\"\naction = \"aggregate\"\nfunction = \"mean\"\nwindow = \"{len}\"\n\
             [[rule]]\nfield = \"voltage_l1\"\naction = \"aggregate\"\nfunction = \"max\"\nwindow = \"{len}\"\nover = \"area\"\nacross = \"max\"\nk = 2\n"
        );
        let devs = [Dev::new("m1", Some("a")), Dev::new("m2", Some("a")), Dev::new("m3", None)];
        let mut whole = engine_in(&rules, tz.clone());
        let mut resumed: Option<Engine> = None;
        let mut part = engine_in(&rules, tz.clone());
        let (mut out_whole, mut out_part) = (Vec::new(), Vec::new());
        let mut rng = seed;
        let mut counters = [1_000i64; 3];
        let cut = cut.min(times.len());
        for (i, at) in times.iter().enumerate() {
            if i == cut {
                let state = part.snapshot();
                let cfg = bincode::config::standard();
                let bytes = bincode::serde::encode_to_vec(&state, cfg).unwrap();
                let (decoded, _): (EngineState, usize) = bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
                prop_assert_eq!(&decoded, &state);
                let mut fresh = engine_in(&rules, tz.clone());
                fresh.restore(&decoded).unwrap();
                prop_assert_eq!(fresh.next_close_ms(), part.next_close_ms());
                resumed = Some(fresh);
            }
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let k = (rng >> 33) as usize % devs.len();
            counters[k] += (rng >> 40) as i64 % 100;
            let v = f64::from((rng >> 20) as u16 % 500);
            let d = &devs[k];
            let readings = [
                (energy, reading(energy, &d.id, Value::Int(counters[k]), *at)),
                (volts, reading(volts, &d.id, Value::Float(v), *at)),
            ];
            let target = resumed.as_mut().unwrap_or(&mut part);
            for (f, r) in &readings {
                whole.accept(r, f, &d.ctx(), &mut out_whole);
                target.accept(r, f, &d.ctx(), &mut out_part);
            }
            if i % close_every == 0 {
                whole.close_due(*at, &mut out_whole);
                target.close_due(*at, &mut out_part);
            }
        }
        whole.flush_partial(&mut out_whole);
        resumed.as_mut().unwrap_or(&mut part).flush_partial(&mut out_part);
        prop_assert_eq!(out_part, out_whole);
    }
}

/// A snapshot applies only to the policy it was taken under.
#[test]
fn a_snapshot_of_another_policy_is_refused_and_changes_nothing() {
    let p = profile();
    let f = p.field("voltage_l1").unwrap();
    let mut a = engine("[[rule]]\nfield = \"voltage_l1\"\naction = \"aggregate\"\nfunction = \"mean\"\nwindow = \"1h\"\n");
    feed(
        &mut a,
        f,
        &Dev::new("m1", None),
        &[(T0, Value::Float(230.0))],
    );
    let state = a.snapshot();
    assert_eq!(state.open_windows(), 1);
    let mut b = engine("[[rule]]\nfield = \"voltage_l1\"\naction = \"aggregate\"\nfunction = \"max\"\nwindow = \"1h\"\n");
    assert!(b.restore(&state).is_err());
    assert_eq!(b.next_close_ms(), None);
    assert!(b.snapshot().is_empty());
}
