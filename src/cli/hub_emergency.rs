//! `citygate hub-emergency --config FILE --list [--json] | --id ID --export FILE | --id ID
//! --destroy`: the hub's copy of emergency collections (issue 11 item 7; `hub::emergency`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::{emit, CliError};
use crate::hub::emergency::{self, Destruction, Emergency, EmergencyError};
use crate::hub::sink::rfc3339_ms;
use crate::hub::HubConfig;
use crate::telemetry::init_logging;

/// What `hub-emergency` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubEmergencyAction {
    /// Every emergency the sink holds, as a table or JSON.
    List { json: bool },
    /// Emergency `id`'s lines into the new file `file`.
    Export { id: String, file: PathBuf },
    /// Emergency `id`'s data records out of the sink (the hub must be stopped).
    Destroy { id: String },
}

/// `citygate hub-emergency --config FILE …`: unknown ids and existing export files exit 64,
/// a running hub and I/O failures 1.
pub fn hub_emergency(path: &Path, action: HubEmergencyAction) -> Result<(), CliError> {
    let cfg = HubConfig::load(path)?;
    init_logging("warn", cfg.log.format);
    let fail = |e: EmergencyError| {
        if e.is_usage() {
            CliError::Usage(e.to_string())
        } else {
            CliError::Runtime(e.to_string())
        }
    };
    match action {
        HubEmergencyAction::List { json } => {
            let all = emergency::list(&cfg).map_err(fail)?;
            if json {
                let text = serde_json::to_string_pretty(&all)
                    .expect("invariant: the emergency list serialises");
                emit(&format!("{text}\n"));
            } else {
                emit(&table(&all));
            }
        }
        HubEmergencyAction::Export { id, file } => {
            let n = emergency::export(&cfg, &id, &file).map_err(fail)?;
            emit(&format!(
                "exported {n} lines of emergency {id} to {}\n",
                file.display()
            ));
        }
        HubEmergencyAction::Destroy { id } => {
            let now = crate::reading::now_ms();
            match emergency::destroy(&cfg, &id, now).map_err(fail)? {
                Destruction::Destroyed(n) => emit(&format!(
                    "destroyed {n} data records of emergency {id}; its reports stay in the sink\n"
                )),
                Destruction::NothingHeld(earlier) => emit(&format!(
                    "emergency {id} holds no data records; nothing destroyed{}\n",
                    earlier.map_or(String::new(), |d| format!(
                        " (destroyed {} records at {})",
                        d.records,
                        time(Some(d.at_ms))
                    ))
                )),
            }
        }
    }
    Ok(())
}

fn time(ms: Option<i64>) -> String {
    ms.and_then(rfc3339_ms).unwrap_or_else(|| "-".into())
}

fn joined(set: &std::collections::BTreeSet<String>) -> String {
    if set.is_empty() {
        "-".into()
    } else {
        set.iter().cloned().collect::<Vec<_>>().join(",")
    }
}

fn number(n: Option<u64>) -> String {
    n.map_or_else(|| "?".into(), |n| n.to_string())
}

/// The plain table of `--list`: one row per emergency, columns aligned.
fn table(all: &[Emergency]) -> String {
    if all.is_empty() {
        return "no emergency records in the sink\n".into();
    }
    let header = [
        "ID",
        "GATEWAY",
        "POLICY",
        "PURPOSE",
        "RECORDS",
        "FIRST",
        "LAST",
        "EXPIRES",
        "END",
        "PRODUCED",
        "DELIVERED",
        "PURGED",
        "EVICTED",
        "SEQS",
        "HUB COPY",
        "REASON",
    ]
    .map(str::to_owned);
    let mut rows = vec![header];
    for e in all {
        let ended = e.ended.as_ref();
        let ended_n = |f: fn(&emergency::Ended) -> Option<u64>| {
            ended.map_or_else(|| "-".into(), |x| number(f(x)))
        };
        let copy = match &e.destroyed {
            Some(d) if e.records == 0 => {
                format!("destroyed {} ({} records)", time(Some(d.at_ms)), d.records)
            }
            Some(d) => format!(
                "held; destroyed {} ({} records) before",
                time(Some(d.at_ms)),
                d.records
            ),
            None => "held".into(),
        };
        let started = e.started.as_ref();
        rows.push([
            e.id.clone(),
            joined(&e.gateways),
            joined(&e.policies),
            joined(&e.purposes),
            e.records.to_string(),
            time(e.first_ms),
            time(e.last_ms),
            started
                .and_then(|s| s.expires.clone())
                .unwrap_or_else(|| "-".into()),
            ended
                .and_then(|x| x.end.clone())
                .unwrap_or_else(|| "-".into()),
            ended_n(|x| x.produced_batches),
            ended_n(|x| x.delivered_batches),
            ended_n(|x| x.purged_batches),
            ended_n(|x| x.evicted_batches),
            ended
                .and_then(|x| x.seqs.clone())
                .unwrap_or_else(|| "-".into()),
            copy,
            started
                .and_then(|s| s.reason.as_ref())
                .map_or_else(|| "-".into(), |r| format!("{r:?}")),
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (cell, w) in row.iter().zip(&widths) {
            let _ = write!(line, "{cell:<w$}  ");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}
