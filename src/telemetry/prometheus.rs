//! Prometheus text exposition format (version 0.0.4), written by hand: a family is a
//! `# HELP` and a `# TYPE` line followed by its samples, label values escaped.
//!
//! ```text
//! # HELP citygate_samples_polled_total Polls that returned a register image.
//! # TYPE citygate_samples_polled_total counter
//! citygate_samples_polled_total 1234
//! ```

use std::fmt::Write as _;

/// The content type Prometheus expects for this format.
pub(crate) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Metric family kinds used here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Counter,
    Gauge,
}

/// Builds one exposition document.
#[derive(Debug, Default)]
pub(crate) struct Exposition {
    out: String,
}

impl Exposition {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Starts a family; the samples that follow must use the same `name`.
    pub(crate) fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Self {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        self
    }

    /// One sample without labels.
    pub(crate) fn sample(&mut self, name: &str, value: impl Into<f64>) -> &mut Self {
        self.labelled(name, &[], value)
    }

    /// One sample with labels (`(name, value)` pairs; values are escaped).
    pub(crate) fn labelled(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        value: impl Into<f64>,
    ) -> &mut Self {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let v: f64 = value.into();
        let _ = writeln!(self.out, " {}", format_value(v));
        self
    }

    /// A family with a single unlabelled sample.
    pub(crate) fn single(
        &mut self,
        name: &str,
        kind: Kind,
        help: &str,
        value: impl Into<f64>,
    ) -> &mut Self {
        self.family(name, kind, help).sample(name, value)
    }

    pub(crate) fn finish(self) -> String {
        self.out
    }
}

fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else if v.fract() == 0.0 && v.abs() < 9.007_199_254_740_992e15 {
        format!("{}", v as i64)
    } else if v.abs() >= 1e15 || (v != 0.0 && v.abs() < 1e-6) {
        format!("{v:e}")
    } else {
        format!("{v}")
    }
}

/// Converts a counter that may exceed 2^53 without panicking (precision loss is accepted
/// by the format).
pub(crate) fn count(n: u64) -> f64 {
    n as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_and_escaped_labels() {
        let mut e = Exposition::new();
        e.single("citygate_up", Kind::Gauge, "1 while running.", 1u8);
        e.family(
            "citygate_device_polls_total",
            Kind::Counter,
            "Polls by outcome.",
        )
        .labelled(
            "citygate_device_polls_total",
            &[("device", "a\"b\\c\nd"), ("outcome", "ok")],
            count(7),
        );
        e.single("citygate_ratio", Kind::Gauge, "A fraction.", 0.25);
        let text = e.finish();
        assert_eq!(
            text,
            "# HELP citygate_up 1 while running.\n# TYPE citygate_up gauge\ncitygate_up 1\n\
             # HELP citygate_device_polls_total Polls by outcome.\n# TYPE citygate_device_polls_total counter\n\
             citygate_device_polls_total{device=\"a\\\"b\\\\c\\nd\",outcome=\"ok\"} 7\n\
             # HELP citygate_ratio A fraction.\n# TYPE citygate_ratio gauge\ncitygate_ratio 0.25\n"
        );
    }

    #[test]
    fn special_values() {
        assert_eq!(format_value(f64::NAN), "NaN");
        assert_eq!(format_value(f64::INFINITY), "+Inf");
        assert_eq!(format_value(-3.0), "-3");
        assert_eq!(format_value(1e300), "1e300");
        assert_eq!(format_value(1.5e-9), "1.5e-9");
    }
}
