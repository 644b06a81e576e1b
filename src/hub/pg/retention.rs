//! Retention in the database: drops daily `records` partitions older than every approved
//! purpose's retention (issue 13 item 5).
//!
//! The rule is the simplest correct one: a partition is dropped only when its age (now minus
//! the end of its day) exceeds the longest retention of every policy approved for any
//! gateway; if any approved policy has no retention, nothing is dropped. A partition mixes
//! purposes, so a shorter retention of one purpose cannot drop it. `records_default` is never
//! dropped; `batches` and `quarantine` rows stay (they hold no readings). Each drop is logged
//! at INFO with the partition and the retentions that allowed it. The hub runs it hourly;
//! `citygate hub-prune` runs it once.

use std::collections::BTreeMap;
use std::time::Duration;

use postgres::Client;

use super::commit::Failure;
use super::rows;
use crate::hub::config::{GatewayEntry, HubConfig};

const MS_PER_DAY: i64 = 86_400_000;

/// The approved purposes' retentions, longest per purpose (`None`: kept without limit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RetentionPolicy {
    purposes: BTreeMap<String, Option<Duration>>,
}

impl RetentionPolicy {
    pub(crate) fn from_config(cfg: &HubConfig) -> RetentionPolicy {
        RetentionPolicy::from_gateways(&cfg.gateways)
    }

    fn from_gateways(gateways: &[GatewayEntry]) -> RetentionPolicy {
        let mut purposes: BTreeMap<String, Option<Duration>> = BTreeMap::new();
        for p in gateways.iter().flat_map(|g| &g.policies) {
            let e = purposes
                .entry(p.stamp.purpose.as_str().to_owned())
                .or_insert(p.retention);
            *e = match (*e, p.retention) {
                (Some(a), Some(b)) => Some(a.max(b)),
                _ => None,
            };
        }
        RetentionPolicy { purposes }
    }

    /// How long a partition is kept: the longest retention, `None` if any purpose keeps its
    /// records without limit or none is approved.
    pub(crate) fn keep(&self) -> Option<Duration> {
        if self.purposes.is_empty() {
            return None;
        }
        self.purposes
            .values()
            .try_fold(Duration::ZERO, |longest, r| r.map(|r| longest.max(r)))
    }

    /// Whether `day`'s partition is past retention at `now_ms`.
    pub(crate) fn expired(&self, day: i64, now_ms: i64) -> bool {
        let Some(keep) = self.keep() else {
            return false;
        };
        let keep_ms = i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
        let end = (day + 1).saturating_mul(MS_PER_DAY);
        now_ms.saturating_sub(end) > keep_ms
    }

    /// `purpose=retention` pairs for the log line.
    fn describe(&self) -> String {
        self.purposes
            .iter()
            .map(|(p, r)| match r {
                Some(r) => format!("{p}={}", humantime::format_duration(*r)),
                None => format!("{p}=unlimited"),
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Drops the expired daily partitions; returns their names.
pub(super) fn drop_expired(
    client: &mut Client,
    policy: &RetentionPolicy,
    now_ms: i64,
) -> Result<Vec<String>, Failure> {
    let names: Vec<String> = client
        .query(
            "SELECT c.relname::text FROM pg_inherits i \
             JOIN pg_class c ON c.oid = i.inhrelid \
             JOIN pg_class p ON p.oid = i.inhparent \
             WHERE p.relname = 'records' ORDER BY 1",
            &[],
        )?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut dropped = Vec::new();
    for name in names {
        let Some(day) = rows::partition_day(&name) else {
            continue;
        };
        if !policy.expired(day, now_ms) {
            continue;
        }
        client.batch_execute(&format!("DROP TABLE IF EXISTS {name}"))?;
        tracing::info!(partition = %name, retentions = %policy.describe(), "records partition past every purpose's retention dropped");
        dropped.push(name);
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::config::ApprovedPolicy;
    use crate::reading::{GatewayId, PurposeName};
    use crate::seal::PolicyStamp;

    fn policy(retentions: &[(&str, Option<u64>)]) -> RetentionPolicy {
        let gateways: Vec<GatewayEntry> = retentions
            .iter()
            .enumerate()
            .map(|(i, (purpose, days))| GatewayEntry {
                id: GatewayId::new(format!("gw-{i}")).unwrap(),
                verifying_key: "v".into(),
                policies: vec![ApprovedPolicy {
                    stamp: PolicyStamp::new(PurposeName::new(*purpose).unwrap(), [i as u8; 32]),
                    retention: days.map(|d| Duration::from_secs(d * 86_400)),
                }],
            })
            .collect();
        RetentionPolicy::from_gateways(&gateways)
    }

    /// Issue 13 item 5: a partition goes only when it is older than the longest retention of
    /// every approved purpose; one purpose without a limit keeps everything.
    #[test]
    fn a_partition_goes_only_past_the_longest_retention_of_every_purpose() {
        let day = 20_000; // 2024-10-04
        let end = (day + 1) * MS_PER_DAY;
        let p = policy(&[
            ("billing", Some(400)),
            ("grid", Some(30)),
            ("billing", Some(10)),
        ]);
        assert_eq!(p.keep(), Some(Duration::from_secs(400 * 86_400)));
        assert!(
            !p.expired(day, end + 30 * MS_PER_DAY + 1),
            "grid's 30 days are not enough"
        );
        assert!(
            !p.expired(day, end + 400 * MS_PER_DAY),
            "exactly 400 days: kept"
        );
        assert!(p.expired(day, end + 400 * MS_PER_DAY + 1));
        let unlimited = policy(&[("billing", Some(1)), ("open-data", None)]);
        assert_eq!(unlimited.keep(), None);
        assert!(!unlimited.expired(day, i64::MAX));
        assert!(
            !policy(&[]).expired(day, i64::MAX),
            "nothing approved: nothing dropped"
        );
        let d = p.describe();
        assert!(
            d.starts_with("billing=1year") && d.ends_with(",grid=30days"),
            "{d}"
        );
    }
}
