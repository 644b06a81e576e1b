//! Located diagnostics for operator-written files (gateway config, device profiles).
//!
//! Every error an operator can cause by editing a file is reported as
//! `FILE:LINE:COL: key `KEY`: MESSAGE`, naming what would be valid where the
//! message can. `toml`'s own errors carry a byte span; semantic errors found after
//! parsing carry the span of the value they are about (via `toml::Spanned`).

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// An error located in a file the operator wrote.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Diagnostic {
    pub file: PathBuf,
    /// 1-based line; 0 when the error concerns the whole file.
    pub line: usize,
    /// 1-based column; 0 when unknown.
    pub col: usize,
    /// The key the error is about (dotted path where known), or empty.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}", self.line)?;
            if self.col > 0 {
                write!(f, ":{}", self.col)?;
            }
        }
        if self.key.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": key `{}`: {}", self.key, self.message)
        }
    }
}

/// 1-based (line, column) of a byte offset in `src`.
pub(crate) fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(src.len());
    let before = src.get(..offset).unwrap_or(src);
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
    (line, col)
}

/// Builds diagnostics for one file whose text is in memory.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SourceFile<'a> {
    pub path: &'a Path,
    pub text: &'a str,
}

impl<'a> SourceFile<'a> {
    pub(crate) fn new(path: &'a Path, text: &'a str) -> Self {
        Self { path, text }
    }

    /// A diagnostic at a byte span, about `key`.
    pub(crate) fn at(
        &self,
        span: Range<usize>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> Diagnostic {
        let (line, col) = line_col(self.text, span.start);
        Diagnostic {
            file: self.path.to_path_buf(),
            line,
            col,
            key: key.into(),
            message: message.into(),
        }
    }

    /// A diagnostic about the whole file.
    pub(crate) fn whole(&self, key: impl Into<String>, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            file: self.path.to_path_buf(),
            line: 0,
            col: 0,
            key: key.into(),
            message: message.into(),
        }
    }

    /// Parses TOML into `T`, turning `toml`'s error into a located diagnostic that
    /// names the offending key.
    pub(crate) fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, Diagnostic> {
        toml::from_str(self.text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            let key = self.key_at(span.clone());
            self.at(span, key, e.message().trim().replace('\n', "; "))
        })
    }

    /// Best-effort dotted key for an error span: the table header above it plus the
    /// key on its line (or the span's own text when the span is the key).
    fn key_at(&self, span: Range<usize>) -> String {
        let start = span.start.min(self.text.len());
        let line_start = self
            .text
            .get(..start)
            .and_then(|s| s.rfind('\n'))
            .map_or(0, |i| i + 1);
        let line_end = self
            .text
            .get(start..)
            .and_then(|s| s.find('\n'))
            .map_or(self.text.len(), |i| start + i);
        let line = self.text.get(line_start..line_end).unwrap_or("");
        let span_text = self.text.get(span.clone()).unwrap_or("").trim();
        let key = match line.find('=') {
            Some(eq) if line_start + eq < start => line[..eq].trim().to_string(),
            _ if !span_text.is_empty()
                && !span_text.contains('\n')
                && !span_text.starts_with('[') =>
            {
                span_text.split('=').next().unwrap_or("").trim().to_string()
            }
            _ => String::new(),
        };
        let table = self
            .text
            .get(..line_start)
            .unwrap_or("")
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| l.starts_with('['))
            .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
        match (table, key.is_empty()) {
            (Some(t), false) => format!("{t}.{key}"),
            (Some(t), true) => t,
            (None, _) => key,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        let s = "a = 1\nbb = 2\n";
        assert_eq!(line_col(s, 0), (1, 1));
        assert_eq!(line_col(s, 6), (2, 1));
        assert_eq!(line_col(s, 9), (2, 4));
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct T {
        gateway: G,
    }
    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct G {
        id: String,
        port: u16,
    }

    #[test]
    fn unknown_key_is_located_and_named() {
        let path = Path::new("gw.toml");
        let text = "[gateway]\nid = \"x\"\nprot = 5\nport = 1\n";
        let err = SourceFile::new(path, text).parse::<T>().unwrap_err();
        assert_eq!(err.line, 3, "{err}");
        assert_eq!(err.key, "gateway.prot", "{err}");
        let shown = err.to_string();
        assert!(shown.starts_with("gw.toml:3:"), "{shown}");
        assert!(shown.contains("port"), "should say what is valid: {shown}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let path = Path::new("gw.toml");
        let text = "[gateway]\nid = \"x\"\nport = \"eighty\"\n";
        let err = SourceFile::new(path, text).parse::<T>().unwrap_err();
        assert_eq!(err.line, 3, "{err}");
        assert_eq!(err.key, "gateway.port", "{err}");
    }
}
