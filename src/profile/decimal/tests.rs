use super::*;
use proptest::prelude::*;

/// Significant digits of a value's shortest `Display` (an integer's trailing zeros are
/// not significant).
fn sig_digits(shown: &str) -> usize {
    let s = shown.trim_start_matches('-');
    let digits: String = s.chars().filter(char::is_ascii_digit).collect();
    let digits = digits.trim_start_matches('0');
    let digits = if s.contains('.') {
        digits
    } else {
        digits.trim_end_matches('0')
    };
    digits.len()
}

/// Issue 11 item 6: an f32 register reading 231.92935 is 231.92935, not
/// 231.92935180664062.
#[test]
fn f32_widens_through_its_shortest_decimal() {
    assert_eq!(f64::from(231.929_35_f32).to_string(), "231.92935180664063");
    assert_eq!(widen_f32(231.929_35).to_string(), "231.92935");
    for (x, shown) in [
        (0.1_f32, "0.1"),
        (-40.25, "-40.25"),
        (1.0e-30, "0.000000000000000000000000000001"),
        (3.402_823_5e38, "340282350000000000000000000000000000000"),
        (16_777_217.0, "16777216"),
    ] {
        assert_eq!(widen_f32(x).to_string(), shown);
    }
    assert!(widen_f32(f32::NAN).is_nan());
}

#[test]
fn settle_removes_binary_noise_only() {
    let tenths = Precision::integer(3).times(Precision::of(0.1).unwrap());
    assert_eq!(3.0 * 0.1, 0.300_000_000_000_000_04);
    assert_eq!(tenths.settle(3.0 * 0.1), 0.3);
    // A sum: 0.1 + 0.2 carries one decimal.
    let tenth = Precision::of(0.1).unwrap();
    assert_eq!(tenth.plus(tenth).settle(0.1 + 0.2), 0.3);
    // Noise around zero (100 × 0.1 − 10) is zero; a tenth just below 0.1 is 0.1.
    assert_eq!(tenth.settle(0.099_999_999_999_999_99), 0.1);
    assert_eq!(tenth.settle(-1.4e-15), 0.0);
    assert!(tenth.settle(-1.4e-15).is_sign_positive());
    // More digits than f64 can promise: kept as computed.
    let wide = Precision::integer(i128::from(u64::MAX)).times(Precision::of(0.5).unwrap());
    let v = u64::MAX as f64 * 0.5;
    assert_eq!(wide.settle(v), v);
    assert_eq!(Precision::of(f64::INFINITY), None);
    assert_eq!(Precision::of(1500.0), Some(Precision::integer(1500)));
}

proptest! {
    /// The widened value narrows back to the same f32 bits (sentinels compare raw
    /// bits) and is the f64 of the f32's shortest decimal.
    #[test]
    fn widened_f32_round_trips(bits in any::<u32>()) {
        let x = f32::from_bits(bits);
        prop_assume!(x.is_finite());
        let w = widen_f32(x);
        prop_assert_eq!((w as f32).to_bits(), x.to_bits());
        prop_assert_eq!(w, x.to_string().parse::<f64>().unwrap());
    }

    /// The same in the range meter values live in, where the fast path decides.
    #[test]
    fn widened_meter_range_f32_is_its_shortest_decimal(x in 1e-6f32..1.7e7) {
        for x in [x, -x] {
            let w = widen_f32(x);
            prop_assert_eq!((w as f32).to_bits(), x.to_bits());
            prop_assert_eq!(w, x.to_string().parse::<f64>().unwrap());
        }
    }

    /// Issue 11 item 6: an f32 scaled by 1, 0.1, 0.01 or 0.001 shows no more
    /// significant digits than the f32's own shortest decimal.
    #[test]
    fn scaled_f32_shows_no_more_digits_than_its_source(bits in any::<u32>(), k in 0usize..4) {
        let x = f32::from_bits(bits);
        prop_assume!(x.is_finite());
        let scale = [1.0, 0.1, 0.01, 0.001][k];
        let raw = widen_f32(x);
        let p = Precision::of(raw).unwrap().times(Precision::of(scale).unwrap());
        let v = p.settle(raw * scale);
        prop_assert!(
            sig_digits(&v.to_string()) <= sig_digits(&x.to_string()),
            "{} x {} = {}", x, scale, v
        );
    }

    /// Scaling an exact decimal gives the f64 nearest the exact decimal product.
    #[test]
    fn scaled_decimals_are_exact(n in -9_999_999i64..9_999_999, places in 0u32..6, k in 0usize..4) {
        let scale = [1.0, 0.1, 0.01, 0.001][k];
        let x = n as f64 / 10f64.powi(places as i32);
        let p = Precision::of(x).unwrap().times(Precision::of(scale).unwrap());
        let v = p.settle(x * scale);
        let expected: f64 = format!("{n}e-{}", places as usize + k).parse().unwrap();
        prop_assert_eq!(v, expected);
    }
}
