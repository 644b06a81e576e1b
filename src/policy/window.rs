//! Windows aligned to the local civil day.
//!
//! A window length divides the day (1 min … 1 d). The boundaries of a civil day are its
//! local midnight plus whole multiples of the length, in civil (wall-clock) time, mapped
//! to instants with the usual "compatible" rule: a boundary inside a spring-forward gap
//! maps to the instant after the gap, one inside a fall-back fold to its first occurrence.
//! Boundary instants are therefore non-decreasing and the windows partition the timeline:
//! every instant lies in exactly one window. On a day with a DST change the windows stay
//! on civil boundaries; the window that contains the repeated hour is longer than its
//! length (it runs to the first boundary after the fold), and boundaries that fall into a
//! gap collapse onto the first instant after it (a window that would be empty does not
//! exist).

use std::fmt;

use jiff::civil::{Date, DateTime};
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};

pub(crate) const DAY_SECS: u32 = 86_400;

/// A length that divides the civil day: a window (≥ 1 min) or a timestamp step (≥ 1 s).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DayDivision {
    secs: u32,
}

impl DayDivision {
    /// `text` as a duration that divides a day and is at least `min_secs` long; the error
    /// says what would be valid.
    pub(crate) fn parse(text: &str, min_secs: u32) -> Result<Self, String> {
        let valid = "valid: a duration of at least {min} that divides a day, e.g. \"1m\", \"5m\", \"15m\", \"30m\", \"1h\", \"2h\", \"6h\", \"1d\"";
        let valid = valid.replace("{min}", if min_secs >= 60 { "1m" } else { "1s" });
        let d = humantime::parse_duration(text.trim())
            .map_err(|e| format!("invalid duration {text:?} ({e}); {valid}"))?;
        let whole = d.subsec_nanos() == 0;
        match u32::try_from(d.as_secs()) {
            Ok(secs) if whole && secs >= min_secs && secs <= DAY_SECS && DAY_SECS % secs == 0 => {
                Ok(Self { secs })
            }
            _ => Err(format!("{text:?} does not divide a day; {valid}")),
        }
    }

    pub fn secs(self) -> u32 {
        self.secs
    }
}

impl fmt::Display for DayDivision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.secs;
        if s % 86_400 == 0 {
            write!(f, "{}d", s / 86_400)
        } else if s % 3600 == 0 {
            write!(f, "{}h", s / 3600)
        } else if s % 60 == 0 {
            write!(f, "{}m", s / 60)
        } else {
            write!(f, "{s}s")
        }
    }
}

/// The instant of civil `dt` in `tz` (compatible disambiguation), in ms.
fn instant_ms(tz: &TimeZone, dt: DateTime) -> i64 {
    tz.to_ambiguous_timestamp(dt)
        .compatible()
        .map_or(i64::MAX, |t| t.as_millisecond())
}

/// Boundary `index` (0 = local midnight of `date`; may exceed the day) in ms.
fn boundary_ms(tz: &TimeZone, date: Date, len: DayDivision, index: i64) -> i64 {
    let civil = date
        .to_datetime(jiff::civil::Time::midnight())
        .checked_add(SignedDuration::from_secs(index * i64::from(len.secs)));
    civil.map_or(i64::MAX, |c| instant_ms(tz, c))
}

/// The window `[start_ms, end_ms)` of length `len` that contains `at_ms`.
pub(crate) fn bounds(tz: &TimeZone, len: DayDivision, at_ms: i64) -> (i64, i64) {
    let Ok(ts) = Timestamp::from_millisecond(at_ms) else {
        // Outside jiff's range (years beyond ±9999): plain UTC arithmetic.
        let l = i64::from(len.secs) * 1000;
        let start = at_ms.div_euclid(l) * l;
        return (start, start.saturating_add(l));
    };
    let dt = tz.to_datetime(ts);
    let date = dt.date();
    let secs_of_day =
        i64::from(dt.hour()) * 3600 + i64::from(dt.minute()) * 60 + i64::from(dt.second());
    let mut index = secs_of_day / i64::from(len.secs);
    let mut start = boundary_ms(tz, date, len, index);
    let mut end = boundary_ms(tz, date, len, index + 1);
    // In a fold the civil index points at the first occurrence; the instant lies in a
    // later (longer) window. Before a gap, collapsed boundaries make empty windows. Walk
    // to the window that contains the instant (a few steps at most, on DST days only).
    while at_ms >= end && end != i64::MAX {
        index += 1;
        start = end;
        end = boundary_ms(tz, date, len, index + 1);
    }
    while at_ms < start && index > 0 {
        index -= 1;
        end = start;
        start = boundary_ms(tz, date, len, index);
    }
    (start, end)
}

/// A range of local times of day, `from` inclusive to `to` exclusive, possibly across
/// midnight (`"22:00-05:00"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Hours {
    from_min: u16,
    to_min: u16,
}

impl Hours {
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let bad = || {
            format!("invalid hours {text:?}; valid: \"HH:MM-HH:MM\" in local time, e.g. \"00:00-05:00\" or \"22:00-04:00\"")
        };
        let (a, b) = text.split_once('-').ok_or_else(bad)?;
        let parse = |s: &str| -> Option<u16> {
            let (h, m) = s.trim().split_once(':')?;
            let (h, m) = (h.parse::<u16>().ok()?, m.parse::<u16>().ok()?);
            (m < 60 && (h < 24 || (h == 24 && m == 0))).then_some(h * 60 + m)
        };
        let (from_min, to_min) = (parse(a).ok_or_else(bad)?, parse(b).ok_or_else(bad)?);
        if from_min == to_min || from_min >= 24 * 60 {
            return Err(bad());
        }
        Ok(Self { from_min, to_min })
    }

    /// Whether local time `at_ms` in `tz` falls in the range.
    pub(crate) fn contains(&self, tz: &TimeZone, at_ms: i64) -> bool {
        let Ok(ts) = Timestamp::from_millisecond(at_ms) else {
            return false;
        };
        let dt = tz.to_datetime(ts);
        let m =
            u16::try_from(dt.hour()).unwrap_or(0) * 60 + u16::try_from(dt.minute()).unwrap_or(0);
        self.contains_minute(m)
    }

    pub(crate) fn contains_minute(&self, m: u16) -> bool {
        if self.from_min < self.to_min {
            (self.from_min..self.to_min).contains(&m)
        } else {
            m >= self.from_min || m < self.to_min
        }
    }
}

impl fmt::Display for Hours {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hm = |m: u16| format!("{:02}:{:02}", m / 60, m % 60);
        write!(f, "{}-{}", hm(self.from_min), hm(self.to_min))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tz(name: &str) -> TimeZone {
        TimeZone::get(name).unwrap()
    }

    fn ms(s: &str) -> i64 {
        s.parse::<Timestamp>().unwrap().as_millisecond()
    }

    #[test]
    fn lengths_must_divide_a_day() {
        assert_eq!(DayDivision::parse("15m", 60).unwrap().secs(), 900);
        assert_eq!(DayDivision::parse("1d", 60).unwrap().secs(), 86_400);
        assert!(DayDivision::parse("7m", 60).unwrap_err().contains("divide"));
        assert!(DayDivision::parse("2d", 60).is_err());
        assert!(DayDivision::parse("30s", 60).is_err());
        assert!(DayDivision::parse("30s", 1).is_ok());
        assert!(DayDivision::parse("1500ms", 1).is_err());
        assert_eq!(DayDivision::parse("90m", 60).unwrap().to_string(), "90m");
    }

    #[test]
    fn shanghai_days_start_at_local_midnight() {
        let sh = tz("Asia/Shanghai");
        let day = DayDivision::parse("1d", 60).unwrap();
        let (s, e) = bounds(&sh, day, ms("2026-11-30T20:30:00Z"));
        assert_eq!(s, ms("2026-11-30T16:00:00Z"));
        assert_eq!(e, ms("2026-12-01T16:00:00Z"));
    }

    #[test]
    fn dst_days_stay_on_civil_boundaries() {
        let be = tz("Europe/Berlin");
        let h = DayDivision::parse("1h", 60).unwrap();
        // Spring forward 2026-03-29 02:00 CET → 03:00 CEST: 01:00–03:00 local is one hour.
        let (s, e) = bounds(&be, h, ms("2026-03-29T00:30:00Z"));
        assert_eq!(
            (s, e),
            (ms("2026-03-29T00:00:00Z"), ms("2026-03-29T01:00:00Z"))
        );
        let (s2, _) = bounds(&be, h, ms("2026-03-29T01:10:00Z"));
        assert_eq!(s2, e, "03:10 CEST follows directly");
        // Fall back 2026-10-25 03:00 CEST → 02:00 CET: the 02:00 window holds both passes.
        let (s, e) = bounds(&be, h, ms("2026-10-25T00:30:00Z"));
        assert_eq!(
            (s, e),
            (ms("2026-10-25T00:00:00Z"), ms("2026-10-25T02:00:00Z"))
        );
        let (s2, e2) = bounds(&be, h, ms("2026-10-25T01:30:00Z"));
        assert_eq!((s2, e2), (s, e));
        let d = DayDivision::parse("1d", 60).unwrap();
        let (s, e) = bounds(&be, d, ms("2026-10-25T12:00:00Z"));
        assert_eq!(e - s, 25 * 3_600_000, "the fall-back day is 25 h long");
    }

    #[test]
    fn fifteen_minute_windows_in_a_fold_never_contain_a_sample_twice() {
        let be = tz("Europe/Berlin");
        let q = DayDivision::parse("15m", 60).unwrap();
        let mut t = ms("2026-10-24T23:00:00Z");
        let mut prev: Option<(i64, i64)> = None;
        while t < ms("2026-10-25T03:00:00Z") {
            let (s, e) = bounds(&be, q, t);
            assert!(s <= t && t < e, "{t} not in [{s},{e})");
            if let Some((ps, pe)) = prev {
                assert!(s == ps || s >= pe, "windows overlap");
            }
            prev = Some((s, e));
            t += 60_000;
        }
    }

    #[test]
    fn hours_may_wrap_midnight() {
        let h = Hours::parse("22:00-05:00").unwrap();
        assert!(h.contains_minute(23 * 60) && h.contains_minute(0) && !h.contains_minute(5 * 60));
        let n = Hours::parse("00:00-05:00").unwrap();
        assert!(n.contains_minute(0) && n.contains_minute(299) && !n.contains_minute(300));
        assert!(Hours::parse("5-6").is_err() && Hours::parse("01:00-01:00").is_err());
        assert_eq!(n.to_string(), "00:00-05:00");
    }
}
