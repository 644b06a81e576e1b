//! `[sink]` of the hub config: where accepted batches go.
//!
//! ```toml
//! [sink]                      # the default: JSON Lines with a local de-dup window
//! type = "jsonl"
//! path = "records.jsonl"
//! rotate_bytes = 1073741824   # optional
//! rotate_every = "1d"         # optional
//! ```
//!
//! (`[hub] state_path` names the de-dup window's directory; the jsonl sink requires it.)
//!
//! ```toml
//! [sink]                      # PostgreSQL: exactly-once in the database
//! type = "postgres"
//! url = "postgresql://citygate@db.example:5432/citygate"   # no password in the URL
//! password_file = "secrets/pg.pass"   # optional; refused if group/world readable
//! ca_file = "tls/db-ca.pem"           # TLS, server verified against it (verify-full)
//! # danger_plaintext = true           # plaintext to a non-loopback host: opt-in only
//! max_in_flight = 256                 # batches being committed or waiting
//! connections = 2                     # database connections: groups committed at once
//! migrate = false                     # true: apply the schema migrations at start
//! ```
//!
//! `ca_file` is required unless every host of the URL is loopback or a unix socket
//! directory; `danger_plaintext` and `ca_file` exclude each other. The postgres sink keeps
//! no local state, so `[hub] state_path` is refused with it.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::config::duration::HumanDuration;
use crate::diag::{Diagnostic, SourceFile};

/// Where accepted records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkConfig {
    /// JSON Lines, appended to one file, rotated by size and/or age, with the de-dup window
    /// in the sled directory `state_path`.
    Jsonl {
        path: PathBuf,
        rotate: Rotation,
        state_path: PathBuf,
    },
    /// PostgreSQL (`hub::pg`).
    Postgres(PgConfig),
}

impl SinkConfig {
    /// Most batches the hub holds taken from the broker and not yet answered.
    pub fn max_in_flight(&self) -> usize {
        match self {
            SinkConfig::Jsonl { .. } => DEFAULT_MAX_IN_FLIGHT,
            SinkConfig::Postgres(pg) => pg.max_in_flight,
        }
    }
}

/// When the JSON Lines sink starts a fresh file (`rotate_bytes`, `rotate_every`); both
/// `None`: never (an outside logrotate and SIGHUP can still do it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rotation {
    /// Once the file holds at least this many bytes.
    pub bytes: Option<u64>,
    /// Once the file is this old.
    pub every: Option<Duration>,
}

/// The PostgreSQL sink's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgConfig {
    /// The connection URL as configured (validated; no password in it).
    pub url: String,
    /// A file holding the password (first line), mode 0600 or stricter.
    pub password_file: Option<PathBuf>,
    pub tls: PgTls,
    pub max_in_flight: usize,
    /// Database connections, so as many groups commit at once (each its own transaction).
    pub connections: usize,
    /// Apply the schema migrations at hub start.
    pub migrate: bool,
}

impl PgConfig {
    /// The parsed URL (it parsed when the config was loaded).
    pub(crate) fn connect_config(&self) -> postgres::Config {
        postgres::Config::from_str(&self.url).expect("invariant: the url was validated at load")
    }
}

/// How the PostgreSQL connection is protected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgTls {
    /// TLS, the server's certificate verified against `ca_file` and its name (verify-full).
    VerifyFull { ca_file: PathBuf },
    /// No TLS: loopback or unix socket, or `danger_plaintext = true`.
    Plaintext { danger: bool },
}

/// Smallest `rotate_bytes` and `rotate_every` accepted.
const MIN_ROTATE_BYTES: u64 = 64 * 1024;
const MIN_ROTATE_EVERY: Duration = Duration::from_secs(60);
/// `max_in_flight` unless configured.
pub(crate) const DEFAULT_MAX_IN_FLIGHT: usize = 256;
/// Largest `max_in_flight` accepted.
const MAX_MAX_IN_FLIGHT: usize = 65_536;
/// `connections` unless configured: one group commits while the next is opened and sent.
pub(crate) const DEFAULT_CONNECTIONS: usize = 2;
/// Most `connections` accepted.
const MAX_CONNECTIONS: usize = 32;

/// `[sink]`: a struct rather than a tagged enum, so its keys keep their spans.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSink {
    #[serde(rename = "type")]
    kind: Spanned<String>,
    path: Option<Spanned<PathBuf>>,
    rotate_bytes: Option<Spanned<u64>>,
    rotate_every: Option<Spanned<HumanDuration>>,
    url: Option<Spanned<String>>,
    password_file: Option<Spanned<PathBuf>>,
    ca_file: Option<Spanned<PathBuf>>,
    danger_plaintext: Option<Spanned<bool>>,
    max_in_flight: Option<Spanned<i64>>,
    connections: Option<Spanned<i64>>,
    migrate: Option<Spanned<bool>>,
}

/// Validates `[sink]` (and `[hub] state_path`, which only the jsonl sink uses); `None` if it
/// has errors (pushed to `errors`).
pub(super) fn sink_config(
    raw: RawSink,
    state_path: Option<Spanned<PathBuf>>,
    src: &SourceFile<'_>,
    resolve: &dyn Fn(&Path) -> PathBuf,
    errors: &mut Vec<Diagnostic>,
) -> Option<SinkConfig> {
    let before = errors.len();
    let kind = raw.kind.get_ref().as_str();
    let misplaced = |errors: &mut Vec<Diagnostic>,
                     keys: &[(&str, Option<std::ops::Range<usize>>)]| {
        for (key, span) in keys {
            if let Some(span) = span {
                errors.push(src.at(
                    span.clone(),
                    format!("sink.{key}"),
                    format!("not a key of the {kind} sink"),
                ));
            }
        }
    };
    let sink = match kind {
        "jsonl" => {
            misplaced(
                errors,
                &[
                    ("url", raw.url.as_ref().map(Spanned::span)),
                    (
                        "password_file",
                        raw.password_file.as_ref().map(Spanned::span),
                    ),
                    ("ca_file", raw.ca_file.as_ref().map(Spanned::span)),
                    (
                        "danger_plaintext",
                        raw.danger_plaintext.as_ref().map(Spanned::span),
                    ),
                    (
                        "max_in_flight",
                        raw.max_in_flight.as_ref().map(Spanned::span),
                    ),
                    ("connections", raw.connections.as_ref().map(Spanned::span)),
                    ("migrate", raw.migrate.as_ref().map(Spanned::span)),
                ],
            );
            jsonl(raw, state_path, src, resolve, errors)
        }
        "postgres" => {
            misplaced(
                errors,
                &[
                    ("path", raw.path.as_ref().map(Spanned::span)),
                    ("rotate_bytes", raw.rotate_bytes.as_ref().map(Spanned::span)),
                    ("rotate_every", raw.rotate_every.as_ref().map(Spanned::span)),
                ],
            );
            if let Some(s) = &state_path {
                errors.push(src.at(
                    s.span(),
                    "hub.state_path",
                    "not used with the postgres sink (it de-duplicates in the database); remove it",
                ));
            }
            postgres(raw, src, resolve, errors).map(SinkConfig::Postgres)
        }
        other => {
            errors.push(src.at(
                raw.kind.span(),
                "sink.type",
                format!("unknown sink type {other:?}; valid: \"jsonl\", \"postgres\""),
            ));
            None
        }
    };
    sink.filter(|_| errors.len() == before)
}

fn jsonl(
    raw: RawSink,
    state_path: Option<Spanned<PathBuf>>,
    src: &SourceFile<'_>,
    resolve: &dyn Fn(&Path) -> PathBuf,
    errors: &mut Vec<Diagnostic>,
) -> Option<SinkConfig> {
    if let Some(b) = raw
        .rotate_bytes
        .as_ref()
        .filter(|b| *b.get_ref() < MIN_ROTATE_BYTES)
    {
        errors.push(src.at(
            b.span(),
            "sink.rotate_bytes",
            format!(
                "{} is too small; valid: at least {MIN_ROTATE_BYTES} (e.g. 1073741824 for 1 GiB)",
                b.get_ref()
            ),
        ));
    }
    if let Some(e) = raw
        .rotate_every
        .as_ref()
        .filter(|e| e.get_ref().0 < MIN_ROTATE_EVERY)
    {
        errors.push(src.at(
            e.span(),
            "sink.rotate_every",
            "too short; valid: at least \"1m\", e.g. \"1d\"",
        ));
    }
    let Some(path) = raw.path else {
        errors.push(src.at(
            raw.kind.span(),
            "sink.path",
            "missing: the jsonl sink needs the file to write, e.g. path = \"records.jsonl\"",
        ));
        return None;
    };
    let Some(state_path) = state_path else {
        errors.push(src.whole(
            "hub.state_path",
            "missing: the jsonl sink keeps its de-dup window there, e.g. state_path = \"state\"",
        ));
        return None;
    };
    Some(SinkConfig::Jsonl {
        path: resolve(path.get_ref()),
        rotate: Rotation {
            bytes: raw.rotate_bytes.map(Spanned::into_inner),
            every: raw.rotate_every.map(|e| e.into_inner().0),
        },
        state_path: resolve(state_path.get_ref()),
    })
}

fn postgres(
    raw: RawSink,
    src: &SourceFile<'_>,
    resolve: &dyn Fn(&Path) -> PathBuf,
    errors: &mut Vec<Diagnostic>,
) -> Option<PgConfig> {
    let mut count = |value: Option<Spanned<i64>>, key: &str, max: usize, default: usize| {
        let Some(v) = value else { return default };
        match usize::try_from(*v.get_ref()) {
            Ok(n) if (1..=max).contains(&n) => n,
            _ => {
                errors.push(src.at(
                    v.span(),
                    key,
                    format!(
                        "{} is out of range; valid: 1..={max}, e.g. {default}",
                        v.get_ref()
                    ),
                ));
                default
            }
        }
    };
    let max_in_flight = count(
        raw.max_in_flight,
        "sink.max_in_flight",
        MAX_MAX_IN_FLIGHT,
        DEFAULT_MAX_IN_FLIGHT,
    );
    let connections = count(
        raw.connections,
        "sink.connections",
        MAX_CONNECTIONS,
        DEFAULT_CONNECTIONS,
    );
    let Some(url) = raw.url else {
        errors.push(src.at(
            raw.kind.span(),
            "sink.url",
            "missing: the postgres sink needs url = \"postgresql://USER@HOST:5432/DATABASE\"",
        ));
        return None;
    };
    let at_url = |msg: String| src.at(url.span(), "sink.url", msg);
    let parsed = match postgres::Config::from_str(url.get_ref()) {
        Ok(c) => c,
        Err(e) => {
            errors.push(at_url(format!(
                "not a PostgreSQL connection URL ({e}); valid: \"postgresql://USER@HOST:5432/DATABASE\""
            )));
            return None;
        }
    };
    if parsed.get_password().is_some() {
        errors.push(at_url(
            "carries a password; remove it and name a file holding it with password_file (mode 0600)"
                .into(),
        ));
    }
    if parsed.get_user().is_none() {
        errors.push(at_url(
            "names no user; valid: \"postgresql://USER@HOST:5432/DATABASE\"".into(),
        ));
    }
    if parsed.get_hosts().is_empty() {
        errors.push(at_url(
            "names no host; valid: \"postgresql://USER@HOST:5432/DATABASE\"".into(),
        ));
    }
    let loopback = is_loopback(&parsed);
    let danger = raw.danger_plaintext.as_ref().is_some_and(|d| *d.get_ref());
    let tls = match (&raw.ca_file, danger) {
        (Some(ca), true) => {
            errors.push(src.at(
                ca.span(),
                "sink.ca_file",
                "ca_file and danger_plaintext = true exclude each other; keep ca_file for TLS",
            ));
            PgTls::Plaintext { danger }
        }
        (Some(ca), false) => PgTls::VerifyFull {
            ca_file: resolve(ca.get_ref()),
        },
        (None, danger) => {
            if !loopback && !danger {
                errors.push(at_url(
                    "the database is not on a loopback address or unix socket: give ca_file (TLS, \
                     server verified) or, to send credentials and data unencrypted, \
                     danger_plaintext = true"
                        .into(),
                ));
            }
            PgTls::Plaintext { danger }
        }
    };
    Some(PgConfig {
        url: url.into_inner(),
        password_file: raw.password_file.map(|p| resolve(p.get_ref())),
        tls,
        max_in_flight,
        connections,
        migrate: raw.migrate.is_some_and(Spanned::into_inner),
    })
}

/// Whether every host the connection may use is a unix socket or a loopback address.
fn is_loopback(c: &postgres::Config) -> bool {
    use postgres::config::Host;
    let host_ok = |h: &Host| match h {
        Host::Unix(_) => true,
        Host::Tcp(name) => {
            name.eq_ignore_ascii_case("localhost")
                || name
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
    };
    !c.get_hosts().is_empty()
        && c.get_hosts().iter().all(host_ok)
        && c.get_hostaddrs().iter().all(IpAddr::is_loopback)
}

#[cfg(test)]
mod tests {
    use super::super::HubConfig;
    use super::*;
    use crate::config::ConfigError;

    const BASE: &str = "[hub]\nid = \"h\"\nhpke_secret_key = \"k\"\nack_signing_key = \"a\"\n\
                        [mqtt]\nbroker = \"localhost:1\"\ndanger_plaintext = true\n\
                        [[gateway]]\nid = \"gw-1\"\nverifying_key = \"v\"\n";

    fn parse(sink: &str) -> Result<HubConfig, ConfigError> {
        HubConfig::parse(Path::new("/etc/h.toml"), &format!("{BASE}[sink]\n{sink}"))
    }

    /// (line, key) of each error.
    fn located(sink: &str) -> Vec<(usize, String)> {
        parse(sink)
            .unwrap_err()
            .diagnostics
            .into_iter()
            .map(|d| (d.line, d.key))
            .collect()
    }

    /// Issue 13 item 1: the postgres sink's keys, with defaults and resolved paths.
    #[test]
    fn postgres_sink_parses_with_tls_and_defaults() {
        let c = parse(
            "type = \"postgres\"\nurl = \"postgresql://citygate@db.example:5432/citygate\"\n\
             password_file = \"secrets/pg.pass\"\nca_file = \"tls/db-ca.pem\"\n",
        )
        .unwrap();
        assert_eq!(
            c.sink,
            SinkConfig::Postgres(PgConfig {
                url: "postgresql://citygate@db.example:5432/citygate".into(),
                password_file: Some("/etc/secrets/pg.pass".into()),
                tls: PgTls::VerifyFull {
                    ca_file: "/etc/tls/db-ca.pem".into()
                },
                max_in_flight: DEFAULT_MAX_IN_FLIGHT,
                connections: DEFAULT_CONNECTIONS,
                migrate: false,
            })
        );
        let c = parse(
            "type = \"postgres\"\nurl = \"postgresql://citygate@127.0.0.1:5433/x\"\nmax_in_flight = 16\nconnections = 4\nmigrate = true\n",
        )
        .unwrap();
        let SinkConfig::Postgres(pg) = c.sink else {
            panic!("not postgres")
        };
        assert_eq!(pg.tls, PgTls::Plaintext { danger: false }, "loopback");
        assert_eq!(
            (pg.max_in_flight, pg.connections, pg.migrate),
            (16, 4, true)
        );
        assert!(
            parse("type = \"postgres\"\nurl = \"postgresql://u@%2Frun%2Fpostgresql/x\"\n").is_ok(),
            "unix socket"
        );
        assert!(parse(
            "type = \"postgres\"\nurl = \"postgresql://u@db.example/x\"\ndanger_plaintext = true\n"
        )
        .is_ok());
    }

    /// Issue 13 item 7 (config errors located): each mistake names its line and key.
    #[test]
    fn postgres_sink_errors_name_line_and_key() {
        // Line 12 is `type`, the sink's keys follow.
        assert_eq!(
            located("type = \"postgres\"\nurl = \"postgresql://u:secret@db.example/x\"\n"),
            [(13, "sink.url".to_string()), (13, "sink.url".to_string())],
            "a password in the url, and a remote host without ca_file"
        );
        let e = parse("type = \"postgres\"\nurl = \"postgresql://u@db.example/x\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/etc/h.toml:13:")
                && e.contains("ca_file")
                && e.contains("danger_plaintext"),
            "{e}"
        );
        assert_eq!(
            located("type = \"postgres\"\nurl = \"mysql://u@h/x\"\n"),
            [(13, "sink.url".to_string())]
        );
        assert_eq!(
            located("type = \"postgres\"\n"),
            [(12, "sink.url".to_string())]
        );
        assert_eq!(
            located("type = \"postgres\"\nurl = \"postgresql://u@localhost/x\"\nmax_in_flight = 0\npath = \"r.jsonl\"\n"),
            [(15, "sink.path".to_string()), (14, "sink.max_in_flight".to_string())]
        );
        assert_eq!(
            located("type = \"postgres\"\nurl = \"postgresql://u@localhost/x\"\nconnections = 0\n"),
            [(14, "sink.connections".to_string())]
        );
        let e =
            parse("type = \"postgres\"\nurl = \"postgresql://u@localhost/x\"\nconnections = 33\n")
                .unwrap_err()
                .to_string();
        assert!(e.contains("valid: 1..=32"), "{e}");
        assert_eq!(
            located("type = \"jsonl\"\npath = \"r.jsonl\"\nconnections = 2\n"),
            [
                (14, "sink.connections".to_string()),
                (0, "hub.state_path".to_string())
            ]
        );
        assert_eq!(
            located("type = \"postgres\"\nurl = \"postgresql://u@db/x\"\nca_file = \"ca.pem\"\ndanger_plaintext = true\n"),
            [(14, "sink.ca_file".to_string())]
        );
        assert_eq!(
            located("type = \"jsonl\"\npath = \"r.jsonl\"\nurl = \"postgresql://u@localhost/x\"\n"),
            [
                (14, "sink.url".to_string()),
                (0, "hub.state_path".to_string())
            ],
            "a postgres key, and the jsonl sink's missing state_path"
        );
        let e = parse("type = \"jsonl\"\npath = \"r.jsonl\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("hub.state_path") && e.contains("missing"), "{e}");
        let with_state = HubConfig::parse(
            Path::new("/etc/h.toml"),
            &format!(
                "{}[sink]\ntype = \"postgres\"\nurl = \"postgresql://u@localhost/x\"\n",
                BASE.replace(
                    "ack_signing_key = \"a\"\n",
                    "ack_signing_key = \"a\"\nstate_path = \"s\"\n"
                )
            ),
        )
        .unwrap_err();
        assert_eq!(
            (
                with_state.diagnostics[0].line,
                with_state.diagnostics[0].key.as_str()
            ),
            (5, "hub.state_path")
        );
    }
}
