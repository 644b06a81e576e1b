//! The `[log]` section (gateway and hub): how log lines are written to stderr.
//!
//! ```toml
//! [log]
//! format = "text"   # or "json"
//! ```
//!
//! `text` (the default) is one line per event for journald and terminals: no ANSI colours
//! unless stderr is a terminal and the process is not under systemd (`JOURNAL_STREAM` set),
//! and no timestamp under systemd (journald stamps every line itself). `json` is one JSON
//! object per line (`timestamp`, `level`, `target`, `fields` with `message`, and the span
//! fields) for log collectors. `RUST_LOG` still sets the levels.

use crate::diag;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines, journald-friendly.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The validated `[log]` section.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogConfig {
    pub format: LogFormat,
}

/// The `[log]` section as written.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLog {
    format: toml::Spanned<String>,
}

/// Validates a `[log]` section; the defaults apply when it is absent.
pub(crate) fn log_config(
    raw: Option<RawLog>,
    src: &diag::SourceFile,
    errors: &mut Vec<diag::Diagnostic>,
) -> LogConfig {
    let Some(raw) = raw else {
        return LogConfig::default();
    };
    let format = match raw.format.get_ref().as_str() {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => {
            errors.push(src.at(
                raw.format.span(),
                "log.format",
                format!("{other:?} is not a log format; valid: \"text\", \"json\""),
            ));
            LogFormat::Text
        }
    };
    LogConfig { format }
}
