//! `hub-emergency` on the postgres sink: list, export and destroy an emergency's records in
//! the database (see the parent module for what an emergency's data and reports are).
//!
//! - Data records are summed up in the database (`count`, first and last `at`, gateways,
//!   purposes) so listing never loads them; reports are read one by one, as few as they are.
//! - Destruction deletes the data records and inserts the `emergency_destroyed` row into
//!   `hub_events` in one transaction, then vacuums the partitions that held them, so the
//!   deleted rows do not linger as dead tuples. The database's WAL, replicas and backups keep
//!   what their own retention keeps: the operator's to erase. It may run beside running hubs:
//!   a re-sent batch of the emergency is a duplicate of its `batches` row and writes nothing.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use postgres::fallible_iterator::FallibleIterator;
use postgres::Client;

use super::{
    absorb, create_export, finish_export, known, DestroyedLine, Destruction, Emergency,
    EmergencyError, Parsed, RecordLine, DESTROYED_EVENT, ENDED, GATEWAY_SUBJECT, STARTED,
};
use crate::hub::config::PgConfig;

/// `at` as Unix milliseconds, in SQL.
const AT_MS: &str = "(extract(epoch FROM at) * 1000)::int8";

fn db(context: &'static str) -> impl Fn(postgres::Error) -> EmergencyError {
    move |e| EmergencyError::Database(format!("{context}: {}", crate::hub::pg::describe(&e)))
}

/// Connects as the hub's `[sink]` says. Blocks.
pub(super) fn connect(cfg: &PgConfig) -> Result<Client, EmergencyError> {
    crate::hub::pg::connect(cfg).map_err(|e| EmergencyError::Database(e.to_string()))
}

/// The SQL condition "this record is a report" (the constants are plain words).
fn report_sql() -> String {
    format!("(subject LIKE '{GATEWAY_SUBJECT}%' AND field IN ('{STARTED}', '{ENDED}'))")
}

/// Every emergency the database holds, by id.
pub(super) fn scan(client: &mut Client) -> Result<BTreeMap<String, Emergency>, EmergencyError> {
    let mut all: BTreeMap<String, Emergency> = BTreeMap::new();
    let data = client
        .query(
            &format!(
                "SELECT emergency_id, count(*), min({AT_MS}), max({AT_MS}), \
                     array_agg(DISTINCT gateway), \
                     coalesce(array_agg(DISTINCT purpose) FILTER (WHERE purpose IS NOT NULL), '{{}}') \
                 FROM records WHERE emergency_id IS NOT NULL AND NOT {} \
                 GROUP BY emergency_id",
                report_sql()
            ),
            &[],
        )
        .map_err(db("reading emergency records"))?;
    for row in data {
        let id: String = row.get(0);
        let e = all.entry(id.clone()).or_insert_with(|| Emergency {
            id,
            ..Emergency::default()
        });
        e.records = u64::try_from(row.get::<_, i64>(1)).unwrap_or(0);
        e.first_ms = row.get(2);
        e.last_ms = row.get(3);
        e.gateways.extend(row.get::<_, Vec<String>>(4));
        e.purposes.extend(row.get::<_, Vec<String>>(5));
    }
    let reports = client
        .query(
            &format!(
                "SELECT emergency_id, gateway, purpose, subject, field, {AT_MS}, tags \
                 FROM records WHERE emergency_id IS NOT NULL AND {} ORDER BY at",
                report_sql()
            ),
            &[],
        )
        .map_err(db("reading emergency reports"))?;
    for row in reports {
        let line = RecordLine {
            gateway: row.get(1),
            purpose: row.get(2),
            subject: row.get(3),
            field: row.get(4),
            at_ms: row.get(5),
            tags: row.get(6),
        };
        absorb(
            &mut all,
            Parsed::Report {
                id: row.get(0),
                line,
            },
        );
    }
    let events = client
        .query(
            &format!(
                "SELECT emergency_id, records, {AT_MS} FROM hub_events \
                 WHERE event = $1 AND emergency_id IS NOT NULL ORDER BY id"
            ),
            &[&DESTROYED_EVENT],
        )
        .map_err(db("reading hub_events"))?;
    for row in events {
        absorb(
            &mut all,
            Parsed::Destroyed(DestroyedLine {
                hub_event: DESTROYED_EVENT.to_owned(),
                emergency_id: row.get(0),
                records: u64::try_from(row.get::<_, Option<i64>>(1).unwrap_or(0)).unwrap_or(0),
                at_ms: row.get(2),
                at: None,
            }),
        );
    }
    Ok(all)
}

/// Writes emergency `id`'s records (data and reports, by time) and hub events, each row as one
/// JSON object (`row_to_json`: the table's columns) per line, to the new file `out`
/// (mode 0600, synced); returns how many lines.
pub(super) fn export(cfg: &PgConfig, id: &str, out: &Path) -> Result<u64, EmergencyError> {
    let mut client = connect(cfg)?;
    known(&scan(&mut client)?, id, &cfg.url)?;
    let mut writer = create_export(out)?;
    let out_err = |source| EmergencyError::Io {
        path: out.to_owned(),
        source,
    };
    let mut written = 0u64;
    for sql in [
        "SELECT row_to_json(r)::text FROM records r WHERE emergency_id = $1 \
         ORDER BY at, gateway, stream, incarnation, seq",
        "SELECT row_to_json(e)::text FROM hub_events e WHERE emergency_id = $1 ORDER BY id",
    ] {
        let mut rows = client
            .query_raw(sql, [&id])
            .map_err(db("exporting the emergency"))?;
        while let Some(row) = rows.next().map_err(db("exporting the emergency"))? {
            let line: String = row.get(0);
            writer.write_all(line.as_bytes()).map_err(out_err)?;
            writer.write_all(b"\n").map_err(out_err)?;
            written += 1;
        }
    }
    finish_export(out, writer)?;
    tracing::info!(emergency_id = id, lines = written, file = %out.display(), "emergency exported");
    Ok(written)
}

/// Deletes emergency `id`'s data records and records the destruction (stamped `now_ms`) in
/// one transaction, then vacuums the partitions that held them.
pub(super) fn destroy(
    cfg: &PgConfig,
    id: &str,
    now_ms: i64,
) -> Result<Destruction, EmergencyError> {
    let mut client = connect(cfg)?;
    let all = scan(&mut client)?;
    let e = known(&all, id, &cfg.url)?;
    if e.records == 0 {
        return Ok(Destruction::NothingHeld(e.destroyed.clone()));
    }
    let data = format!("emergency_id = $1 AND NOT {}", report_sql());
    let mut tx = client
        .transaction()
        .map_err(db("starting the destruction"))?;
    let partitions: Vec<String> = tx
        .query(
            &format!("SELECT DISTINCT tableoid::regclass::text FROM records WHERE {data}"),
            &[&id],
        )
        .map_err(db("finding the emergency's partitions"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let records = tx
        .execute(&format!("DELETE FROM records WHERE {data}"), &[&id])
        .map_err(db("deleting the emergency's records"))?;
    tx.execute(
        "INSERT INTO hub_events (event, emergency_id, records, at) \
         VALUES ($1, $2, $3, to_timestamp($4::float8 / 1000))",
        &[
            &DESTROYED_EVENT,
            &id,
            &i64::try_from(records).unwrap_or(i64::MAX),
            &(now_ms as f64),
        ],
    )
    .map_err(db("recording the destruction"))?;
    tx.commit().map_err(db("committing the destruction"))?;
    for partition in &partitions {
        // The names come from the database's own catalogue (regclass output is quoted).
        if let Err(e) = client.batch_execute(&format!("VACUUM {partition}")) {
            tracing::warn!(partition = %partition, error = %crate::hub::pg::describe(&e), "vacuum after the destruction failed; the deleted rows stay on disk until the next vacuum");
        }
    }
    tracing::info!(emergency_id = id, records, sink = %cfg.url, "emergency records destroyed");
    Ok(Destruction::Destroyed(records))
}
