//! One group's transaction: the batch rows with `ON CONFLICT DO NOTHING RETURNING` (the keys
//! not returned are duplicates), the new batches' records with one `COPY`, `COMMIT`; a batch
//! refused for its data goes to `quarantine`; daily partitions are made before the insert.

use std::collections::{HashMap, HashSet};
use std::io::Write as _;

use postgres::Client;

use super::rows::{self, incarnation_text, RECORD_COLUMNS};
use crate::hub::sink::{Outcome, SinkBatch};

/// Advisory lock key under which hubs create partitions (one at a time across processes).
const PARTITION_LOCK: i64 = 0x6369_7479_7061_7274;

/// Why a statement failed.
#[derive(Debug)]
pub(super) struct Failure {
    /// The SQLSTATE, if the server answered with an error.
    pub sqlstate: Option<String>,
    pub message: String,
    /// True when the connection is unusable (reconnect before the next commit).
    pub connection_lost: bool,
    constraint: Option<String>,
}

impl Failure {
    /// Refused for its data (SQLSTATE class 22 or 23), not for the batch key's own conflict:
    /// retrying the same batch can never succeed.
    pub(super) fn is_poison(&self) -> bool {
        let class = self.sqlstate.as_deref().map(|s| &s[..2.min(s.len())]);
        matches!(class, Some("22" | "23")) && self.constraint.as_deref() != Some("batches_pkey")
    }
}

impl From<postgres::Error> for Failure {
    fn from(e: postgres::Error) -> Failure {
        let db = e.as_db_error();
        Failure {
            sqlstate: e.code().map(|c| c.code().to_owned()),
            message: super::describe(&e),
            connection_lost: db.is_none() || e.is_closed(),
            constraint: db.and_then(|d| d.constraint()).map(str::to_owned),
        }
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Failure {
        match e
            .into_inner()
            .map(|inner| inner.downcast::<postgres::Error>())
        {
            Some(Ok(pg)) => Failure::from(*pg),
            Some(Err(other)) => Failure {
                sqlstate: None,
                message: other.to_string(),
                connection_lost: true,
                constraint: None,
            },
            None => Failure {
                sqlstate: None,
                message: "copy failed".into(),
                connection_lost: true,
                constraint: None,
            },
        }
    }
}

/// Commits `batches` (distinct keys) in one transaction; `Written` or `Duplicate` per batch.
pub(super) fn commit_group(
    client: &mut Client,
    batches: &[SinkBatch<'_>],
) -> Result<Vec<Outcome>, Failure> {
    let n = batches.len();
    let mut gateway = Vec::with_capacity(n);
    let mut stream = Vec::with_capacity(n);
    let mut incarnation = Vec::with_capacity(n);
    let mut seq = Vec::with_capacity(n);
    let mut purpose = Vec::with_capacity(n);
    let mut policy_hash: Vec<Vec<u8>> = Vec::with_capacity(n);
    let mut signer: Vec<Vec<u8>> = Vec::with_capacity(n);
    let mut recipient: Vec<Vec<u8>> = Vec::with_capacity(n);
    let mut created = Vec::with_capacity(n);
    let mut count: Vec<i32> = Vec::with_capacity(n);
    for b in batches {
        gateway.push(b.key.gateway.as_str());
        stream.push(b.key.stream.as_str());
        incarnation.push(incarnation_text(b.key.incarnation));
        seq.push(b.key.seq.to_string());
        purpose.push(b.purpose.map(|p| p.as_str()));
        let meta = b.header;
        policy_hash.push(meta.map_or_else(Vec::new, |m| m.policy_hash.to_vec()));
        signer.push(meta.map_or_else(Vec::new, |m| m.signer_key_id.to_vec()));
        recipient.push(meta.map_or_else(Vec::new, |m| m.recipient_key_id.to_vec()));
        created.push(rows::timestamp_literal(meta.map_or(0, |m| m.created_at_ms)));
        let records = meta.map_or(b.records.len() as u64, |m| u64::from(m.record_count));
        count.push(i32::try_from(records).unwrap_or(i32::MAX));
    }
    let mut tx = client.transaction()?;
    let inserted = tx.query(
        "INSERT INTO batches (gateway, stream, incarnation, seq, purpose, policy_hash, \
             signer_key_id, recipient_key_id, created_at, record_count) \
         SELECT g, s, i, q::numeric, p, h, sk, rk, c::timestamptz, n \
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bytea[], \
                     $7::bytea[], $8::bytea[], $9::text[], $10::int4[]) \
              AS t(g, s, i, q, p, h, sk, rk, c, n) \
         ON CONFLICT DO NOTHING \
         RETURNING gateway, stream, incarnation, seq::text",
        &[
            &gateway,
            &stream,
            &incarnation,
            &seq,
            &purpose,
            &policy_hash,
            &signer,
            &recipient,
            &created,
            &count,
        ],
    )?;
    let new: HashSet<(String, String, String, String)> = inserted
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let is_new: Vec<bool> = (0..n)
        .map(|i| {
            new.contains(&(
                gateway[i].to_owned(),
                stream[i].to_owned(),
                incarnation[i].clone(),
                seq[i].clone(),
            ))
        })
        .collect();
    let mut copy = String::new();
    for (b, _) in batches.iter().zip(&is_new).filter(|(_, new)| **new) {
        rows::encode_records(&mut copy, b);
    }
    if !copy.is_empty() {
        let mut w = tx.copy_in(&format!("COPY records ({RECORD_COLUMNS}) FROM STDIN"))?;
        w.write_all(copy.as_bytes())?;
        w.finish()?;
    }
    tx.commit()?;
    Ok(is_new
        .into_iter()
        .map(|new| {
            if new {
                Outcome::Written
            } else {
                Outcome::Duplicate
            }
        })
        .collect())
}

/// Records `batch` in `quarantine` (a re-sent one is not recorded twice).
pub(super) fn quarantine(
    client: &mut Client,
    batch: &SinkBatch<'_>,
    why: &Failure,
) -> Result<(), Failure> {
    let count = i32::try_from(batch.records.len()).unwrap_or(i32::MAX);
    client.execute(
        "INSERT INTO quarantine (gateway, stream, incarnation, seq, purpose, reason, sqlstate, \
             record_count) \
         VALUES ($1, $2, $3, $4::text::numeric, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
        &[
            &batch.key.gateway.as_str(),
            &batch.key.stream.as_str(),
            &incarnation_text(batch.key.incarnation),
            &batch.key.seq.to_string(),
            &batch.purpose.map(|p| p.as_str()),
            &why.message,
            &why.sqlstate.as_deref().unwrap_or(""),
            &count,
        ],
    )?;
    Ok(())
}

/// Creates the daily partitions of `days` that `known` does not list yet, each in its own
/// transaction under an advisory lock (hubs may race for the same day). A partition that
/// cannot be created (e.g. the default partition already holds rows of its day) is logged;
/// its records then go to the default partition. Fails only if the connection fails.
pub(super) fn ensure_partitions(
    client: &mut Client,
    days: &[i64],
    known: &mut HashMap<i64, bool>,
) -> Result<(), Failure> {
    for &day in days {
        if known.contains_key(&day) {
            continue;
        }
        let Some(name) = rows::partition_name(day) else {
            known.insert(day, false);
            continue;
        };
        let (from, to) = rows::partition_bounds(day);
        let mut tx = client.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PARTITION_LOCK])?;
        let exists: bool = tx
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])?
            .get(0);
        if exists {
            tx.commit()?;
            known.insert(day, true);
            continue;
        }
        let created = tx.batch_execute(&format!(
            "CREATE TABLE {name} PARTITION OF records FOR VALUES FROM ('{from}') TO ('{to}')"
        ));
        match created {
            Ok(()) => {
                tx.commit()?;
                tracing::info!(partition = %name, "records partition created");
                known.insert(day, true);
            }
            Err(e) => {
                let f = Failure::from(e);
                if f.connection_lost {
                    return Err(f);
                }
                drop(tx);
                tracing::warn!(partition = %name, error = %f.message, "records partition not created; its records go to records_default");
                known.insert(day, false);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(sqlstate: Option<&str>, constraint: Option<&str>) -> Failure {
        Failure {
            sqlstate: sqlstate.map(str::to_owned),
            message: String::new(),
            connection_lost: sqlstate.is_none(),
            constraint: constraint.map(str::to_owned),
        }
    }

    /// Issue 13 item 3: only data errors (classes 22 and 23) make a batch poison; the batch
    /// key's own conflict, lost connections and server trouble fail the group for a retry.
    #[test]
    fn data_errors_are_poison_and_everything_else_is_retried() {
        for poison in ["22021", "22008", "22P02", "23502", "23514"] {
            assert!(failure(Some(poison), None).is_poison(), "{poison}");
        }
        assert!(!failure(Some("23505"), Some("batches_pkey")).is_poison());
        for transient in ["40001", "40P01", "57P01", "53300", "08006", "42P01"] {
            assert!(!failure(Some(transient), None).is_poison(), "{transient}");
        }
        assert!(!failure(None, None).is_poison());
    }
}
