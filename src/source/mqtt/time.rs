//! Timestamps as meters write them: epoch milliseconds, epoch seconds, ISO 8601 strings.
//!
//! ISO 8601 accepted: extended `YYYY-MM-DDTHH:MM:SS[.fff…](Z|±HH:MM|±HHMM)` (RFC 3339; a
//! space instead of `T` is accepted) and the basic `YYYYMMDDTHHMMSSZ` of some NB-IoT
//! platforms. A string without a zone is rejected rather than guessed. A timestamp is only
//! used if it is plausible: after 2000-01-01 and at most one day after the receive time
//! (a meter whose clock is unset or wrong); otherwise the caller falls back to the
//! receive time and marks the readings. A plausible timestamp further ahead than the
//! source's `max_clock_skew`, or further behind than its `max_clock_lag`, is kept and
//! marked skewed by the subscriber.

use crate::reading::TimestampMs;

/// 2000-01-01T00:00:00Z.
const EARLIEST_MS: TimestampMs = 946_684_800_000;
/// How far ahead of the receive time a meter clock may be.
const MAX_AHEAD_MS: TimestampMs = 24 * 3600 * 1000;

/// Whether a meter timestamp can be trusted, given when the message arrived.
pub(crate) fn plausible(at_ms: TimestampMs, received_ms: TimestampMs) -> bool {
    at_ms >= EARLIEST_MS && at_ms <= received_ms.saturating_add(MAX_AHEAD_MS)
}

/// Epoch seconds or milliseconds (any JSON number) as milliseconds.
pub(crate) fn from_number(n: f64, seconds: bool) -> Option<TimestampMs> {
    let ms = if seconds { n * 1000.0 } else { n };
    (ms.is_finite() && ms.abs() < 1e16).then(|| ms.round() as TimestampMs)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn digits(s: &str) -> Option<i64> {
    (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

/// An ISO 8601 date-time with a zone, as epoch milliseconds.
pub(crate) fn parse_iso8601(s: &str) -> Option<TimestampMs> {
    let s = s.trim();
    if !s.is_ascii() {
        return None;
    }
    let (date, rest) = s.split_at(s.find(['T', 't', ' '])?);
    let rest = &rest[1..];
    let (y, mo, d) = match date.len() {
        10 if &date[4..5] == "-" && &date[7..8] == "-" => (
            digits(&date[0..4])?,
            digits(&date[5..7])?,
            digits(&date[8..10])?,
        ),
        8 => (
            digits(&date[0..4])?,
            digits(&date[4..6])?,
            digits(&date[6..8])?,
        ),
        _ => return None,
    };
    // Split the zone off the time.
    let zone_at = rest.find(['Z', 'z', '+', '-'])?;
    let (time, zone) = rest.split_at(zone_at);
    let (clock, frac) = match time.split_once('.') {
        Some((c, f)) => (c, Some(f)),
        None => (time, None),
    };
    let (h, mi, sec) = match clock.len() {
        8 if &clock[2..3] == ":" && &clock[5..6] == ":" => (
            digits(&clock[0..2])?,
            digits(&clock[3..5])?,
            digits(&clock[6..8])?,
        ),
        6 => (
            digits(&clock[0..2])?,
            digits(&clock[2..4])?,
            digits(&clock[4..6])?,
        ),
        _ => return None,
    };
    let millis = match frac {
        None => 0,
        Some(f) if !f.is_empty() && f.len() <= 9 => {
            let v = digits(f)?;
            v * 1000 / 10_i64.pow(f.len() as u32)
        }
        Some(_) => return None,
    };
    let offset_min = match zone {
        "Z" | "z" => 0,
        z => {
            let sign = if z.starts_with('-') { -1 } else { 1 };
            let z = &z[1..];
            let (zh, zm) = match z.len() {
                5 if &z[2..3] == ":" => (digits(&z[0..2])?, digits(&z[3..5])?),
                4 => (digits(&z[0..2])?, digits(&z[2..4])?),
                2 => (digits(z)?, 0),
                _ => return None,
            };
            if zh > 23 || zm > 59 {
                return None;
            }
            sign * (zh * 60 + zm)
        }
    };
    let month_days = [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    if !(1..=12).contains(&mo)
        || d < 1
        || d > month_days[(mo - 1) as usize]
        || h > 23
        || mi > 59
        || sec > 60
    {
        return None;
    }
    let days = days_from_civil(y, mo, d);
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset_min * 60;
    Some(secs * 1000 + millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_forms_agree() {
        let z = 1_763_906_400_000; // 2025-11-23T14:00:00Z
        for s in [
            "2025-11-23T14:00:00Z",
            "2025-11-23T22:00:00+08:00",
            "2025-11-23 22:00:00+0800",
            "2025-11-23T09:00:00-05",
            "20251123T140000Z",
        ] {
            assert_eq!(parse_iso8601(s), Some(z), "{s}");
        }
        assert_eq!(parse_iso8601("2025-11-23T14:00:00.250Z"), Some(z + 250));
        assert_eq!(parse_iso8601("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_iso8601("2000-02-29T00:00:00Z"), Some(951_782_400_000));
    }

    #[test]
    fn malformed_or_zoneless_strings_are_rejected() {
        for s in [
            "",
            "2025-11-23",
            "2025-11-23T14:00:00",
            "2025-13-01T00:00:00Z",
            "2025-11-23T24:00:00Z",
            "2025-11-23T14:00Z",
            "2025-11-23T14:00:00+25:00",
            "２０２５-11-23T14:00:00Z",
            "2025-11-23T14:00:00.Z",
        ] {
            assert_eq!(parse_iso8601(s), None, "{s:?}");
        }
    }

    #[test]
    fn plausibility_bounds() {
        let now = 1_763_906_400_000;
        assert!(plausible(now, now));
        assert!(plausible(now + 3_600_000, now));
        assert!(!plausible(now + 2 * 86_400_000, now));
        assert!(!plausible(0, now));
        assert_eq!(from_number(1.5, true), Some(1500));
        assert_eq!(from_number(f64::NAN, false), None);
    }
}
