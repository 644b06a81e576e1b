//! Records as rows of `COPY records FROM STDIN` (text format), and the daily partitions they
//! go to. Pure: no database here.
//!
//! Column order is [`RECORD_COLUMNS`]. Text format: columns separated by tab, rows ended by
//! newline, `\N` for NULL, and backslash, tab, newline and carriage return escaped. A NUL
//! byte cannot be expressed; the database refuses it (SQLSTATE 22021) and the batch is
//! quarantined. Times are written as `YYYY-MM-DD HH:MM:SS.mmm+00` (with ` BC` before year 1);
//! the database refuses times outside its range (22008), which quarantines the batch too.

use crate::hub::sink::{emergency_id, quality_label, SinkBatch};
use crate::reading::Value;

/// The columns of `records` the COPY writes, in order.
pub(crate) const RECORD_COLUMNS: &str = "gateway, stream, incarnation, seq, purpose, subject, \
     epoch, field, value_num, value_text, value_bool, unit, at, quality, window_function, \
     window_start, window_end, window_samples, window_devices, window_partial, tags, emergency_id";

const MS_PER_DAY: i64 = 86_400_000;
/// Days since 1970-01-01 of 1970-01-01 and 9999-12-31: the range daily partitions are made
/// for; records outside it go to the default partition.
const FIRST_PARTITION_DAY: i64 = 0;
const LAST_PARTITION_DAY: i64 = 2_932_896;

/// Days since 1970-01-01 of the day `ms` falls in (UTC).
pub(crate) fn day_of(ms: i64) -> i64 {
    ms.div_euclid(MS_PER_DAY)
}

/// The daily partition of `day` (`records_YYYYMMDD`), if the day gets one.
pub(crate) fn partition_name(day: i64) -> Option<String> {
    (FIRST_PARTITION_DAY..=LAST_PARTITION_DAY)
        .contains(&day)
        .then(|| {
            let (y, m, d) = civil_from_days(day);
            format!("records_{y:04}{m:02}{d:02}")
        })
}

/// The day a partition name stands for; `None` for names not made by [`partition_name`].
pub(crate) fn partition_day(name: &str) -> Option<i64> {
    let digits = name.strip_prefix("records_")?;
    if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let y: i64 = digits[0..4].parse().ok()?;
    let m: u32 = digits[4..6].parse().ok()?;
    let d: u32 = digits[6..8].parse().ok()?;
    let day = days_from_civil(y, m, d);
    (partition_name(day).as_deref() == Some(name)).then_some(day)
}

/// The `FROM` and `TO` bounds of `day`'s partition, as timestamp literals.
pub(crate) fn partition_bounds(day: i64) -> (String, String) {
    (
        timestamp_literal(day * MS_PER_DAY),
        timestamp_literal((day + 1) * MS_PER_DAY),
    )
}

/// `ms` since the Unix epoch as a PostgreSQL timestamptz literal in UTC.
pub(crate) fn timestamp_literal(ms: i64) -> String {
    let day = day_of(ms);
    let in_day = ms.rem_euclid(MS_PER_DAY);
    let (y, mo, d) = civil_from_days(day);
    let (h, mi, s, milli) = (
        in_day / 3_600_000,
        in_day / 60_000 % 60,
        in_day / 1000 % 60,
        in_day % 1000,
    );
    // Year 0 is 1 BC, year -1 is 2 BC.
    let (year, era) = if y < 1 { (1 - y, " BC") } else { (y, "") };
    format!("{year:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}.{milli:03}+00{era}")
}

/// (year, month, day) of a day count since 1970-01-01 (proleptic Gregorian; H. Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Day count since 1970-01-01 of a (year, month, day) (`days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A u64 as the batch tables' `incarnation` text: 16 lowercase hex digits.
pub(crate) fn incarnation_text(incarnation: u64) -> String {
    format!("{incarnation:016x}")
}

/// Appends `s` escaped for a COPY text column.
fn push_text(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
}

/// A COPY column: tab before every column but the first.
fn col(out: &mut String, first: bool) {
    if !first {
        out.push('\t');
    }
}

const NULL: &str = "\\N";

/// A float as a `numeric` literal (NaN and infinities included).
fn float_text(f: f64) -> String {
    if f.is_nan() {
        "NaN".into()
    } else if f.is_infinite() {
        if f > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else {
        format!("{f}")
    }
}

/// A `text[]` literal: `{"a","b"}` with `"` and `\` escaped in elements.
fn array_literal(items: &[String]) -> String {
    let mut out = String::from("{");
    for (i, t) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        for c in t.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
    out.push('}');
    out
}

/// Appends the COPY rows of `batch`'s records to `out`.
pub(crate) fn encode_records(out: &mut String, batch: &SinkBatch<'_>) {
    let key = batch.key;
    let incarnation = incarnation_text(key.incarnation);
    for r in batch.records {
        let mut cols: Vec<Option<String>> = Vec::with_capacity(22);
        cols.push(Some(key.gateway.as_str().to_owned()));
        cols.push(Some(key.stream.as_str().to_owned()));
        cols.push(Some(incarnation.clone()));
        cols.push(Some(key.seq.to_string()));
        cols.push(batch.purpose.map(|p| p.as_str().to_owned()));
        cols.push(Some(r.subject.clone()));
        cols.push(Some(r.epoch.to_string()));
        cols.push(Some(r.field.clone()));
        let (num, text, boolean) = match &r.value {
            Value::Int(i) => (Some(i.to_string()), None, None),
            Value::Float(f) => (Some(float_text(*f)), None, None),
            Value::Text(s) => (None, Some(s.clone()), None),
            Value::Bool(b) => (None, None, Some(b.to_string())),
        };
        cols.extend([num, text, boolean]);
        cols.push(Some(r.unit.symbol().to_owned()));
        cols.push(Some(timestamp_literal(r.at_ms)));
        cols.push(Some(quality_label(r.quality)));
        match &r.window {
            Some(w) => cols.extend([
                Some(w.function.as_str().to_owned()),
                Some(timestamp_literal(w.start_ms)),
                Some(timestamp_literal(w.end_ms)),
                Some(w.samples.to_string()),
                Some(w.devices.to_string()),
                Some(w.partial.to_string()),
            ]),
            None => cols.extend((0..6).map(|_| None)),
        }
        cols.push(Some(array_literal(&r.tags)));
        cols.push(emergency_id(&r.tags).map(str::to_owned));
        for (i, c) in cols.iter().enumerate() {
            col(out, i == 0);
            match c {
                Some(v) => push_text(out, v),
                None => out.push_str(NULL),
            }
        }
        out.push('\n');
    }
}

/// The distinct days (partition keys) the records of `batches` fall in.
pub(crate) fn days<'a>(batches: impl IntoIterator<Item = &'a SinkBatch<'a>>) -> Vec<i64> {
    let mut days: Vec<i64> = batches
        .into_iter()
        .flat_map(|b| b.records.iter().map(|r| day_of(r.at_ms)))
        .collect();
    days.sort_unstable();
    days.dedup();
    days
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::sink::BatchKey;
    use crate::reading::{
        AggFn, GatewayId, PurposeName, Quality, QualityReason, Record, Stream, Unit, Window,
    };

    #[test]
    fn timestamps_and_days_follow_the_calendar() {
        assert_eq!(timestamp_literal(0), "1970-01-01 00:00:00.000+00");
        assert_eq!(
            timestamp_literal(1_700_000_000_123),
            "2023-11-14 22:13:20.123+00"
        );
        assert_eq!(timestamp_literal(-1), "1969-12-31 23:59:59.999+00");
        assert_eq!(
            timestamp_literal(951_782_400_000),
            "2000-02-29 00:00:00.000+00"
        );
        // Year 0 is 1 BC.
        assert_eq!(
            timestamp_literal(-62_167_219_200_000),
            "0001-01-01 00:00:00.000+00 BC"
        );
        assert_eq!(
            partition_name(day_of(1_700_000_000_000)).unwrap(),
            "records_20231114"
        );
        assert_eq!(partition_name(-1), None);
        assert_eq!(
            partition_name(LAST_PARTITION_DAY).unwrap(),
            "records_99991231"
        );
        assert_eq!(partition_name(LAST_PARTITION_DAY + 1), None);
        for day in [0, 1, 59, 11_016, 19_675, 20_000, LAST_PARTITION_DAY] {
            let name = partition_name(day).unwrap();
            assert_eq!(partition_day(&name), Some(day), "{name}");
        }
        assert_eq!(partition_day("records_default"), None);
        assert_eq!(partition_day("records_20231131"), None, "no 31 November");
        assert_eq!(
            partition_bounds(19_675),
            (
                "2023-11-14 00:00:00.000+00".to_string(),
                "2023-11-15 00:00:00.000+00".to_string()
            )
        );
    }

    #[test]
    fn records_become_escaped_copy_rows_with_one_value_column() {
        let key = BatchKey {
            gateway: GatewayId::new("gw-1").unwrap(),
            stream: Stream::Readings,
            incarnation: 0xff,
            seq: u64::MAX,
        };
        let purpose = PurposeName::new("billing").unwrap();
        let rec = |value, tags: &[&str], window| Record {
            subject: "p-1".into(),
            field: "f".into(),
            value,
            unit: Unit::Volt,
            at_ms: 1_700_000_000_000,
            quality: Quality::Uncertain(QualityReason::OutOfRange),
            tags: tags.iter().map(|t| (*t).to_string()).collect(),
            window,
            epoch: 3,
        };
        let records = vec![
            rec(Value::Float(230.5), &[], None),
            rec(
                Value::Text("a\tb\\c\nd".into()),
                &["emergency", "emergency_id=em-1", "q\"x"],
                None,
            ),
            rec(
                Value::Bool(true),
                &[],
                Some(Window {
                    function: AggFn::Delta,
                    start_ms: 1_700_000_000_000,
                    end_ms: 1_700_000_900_000,
                    samples: 90,
                    devices: 1,
                    partial: false,
                }),
            ),
            rec(Value::Float(f64::NEG_INFINITY), &[], None),
        ];
        let batch = SinkBatch {
            key: &key,
            purpose: Some(&purpose),
            header: None,
            records: &records,
        };
        let mut out = String::new();
        encode_records(&mut out, &batch);
        let rows: Vec<Vec<&str>> = out.lines().map(|l| l.split('\t').collect()).collect();
        assert_eq!(rows.len(), 4);
        assert!(rows.iter().all(|r| r.len() == 22), "{rows:?}");
        let head = "gw-1 readings 00000000000000ff 18446744073709551615 billing p-1 3 f";
        assert_eq!(rows[0][..8].join(" "), head);
        assert_eq!(rows[0][8..11], ["230.5", NULL, NULL]);
        assert_eq!(rows[0][12], "2023-11-14 22:13:20.000+00");
        assert_eq!(rows[0][13], "uncertain:out_of_range");
        assert_eq!(rows[0][14..20], [NULL; 6]);
        assert_eq!(rows[0][20..], ["{}", NULL]);
        assert_eq!(rows[1][9], "a\\tb\\\\c\\nd", "escaped, one row");
        assert_eq!(
            rows[1][20],
            "{\"emergency\",\"emergency_id=em-1\",\"q\\\\\"x\"}"
        );
        assert_eq!(rows[1][21], "em-1");
        assert_eq!(rows[2][10], "true");
        assert_eq!(
            rows[2][14..20],
            [
                "delta",
                "2023-11-14 22:13:20.000+00",
                "2023-11-14 22:28:20.000+00",
                "90",
                "1",
                "false"
            ]
        );
        assert_eq!(rows[3][8], "-Infinity");
        assert_eq!(days([&batch]), vec![day_of(1_700_000_000_000)]);
    }
}
