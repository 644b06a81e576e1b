//! The database schema as numbered SQL migrations (`migrations/NNNN_name.sql`, embedded in
//! the binary), applied by `citygate hub-migrate` or at hub start with `[sink] migrate = true`.
//!
//! `schema_migrations` records what is applied. [`migrate`] holds a session advisory lock
//! (several hubs may start at once), creates that table if needed, and applies each missing
//! migration in its own transaction together with its `schema_migrations` row, so a failed
//! migration leaves nothing behind and running it again is a no-op once applied.
//! [`check`] is what a hub without `migrate = true` runs at start: the database must be at
//! exactly the latest version this binary knows.

use postgres::Client;

use crate::hub::sink::SinkError;

/// One migration: its version (the file's number), name and SQL.
#[derive(Debug)]
pub(crate) struct Migration {
    pub version: i32,
    pub name: &'static str,
    sql: &'static str,
}

/// Every migration, in order.
pub(crate) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "batches_records_quarantine",
        sql: include_str!("../../../migrations/0001_batches_records_quarantine.sql"),
    },
    Migration {
        version: 2,
        name: "hub_events_emergency_index",
        sql: include_str!("../../../migrations/0002_hub_events_emergency_index.sql"),
    },
];

/// The advisory lock key migrations run under (any constant; "citygate" in ASCII).
const MIGRATION_LOCK: i64 = 0x6369_7479_6761_7465;

/// The version the schema must be at.
pub(crate) fn latest() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

fn db(context: &str) -> impl Fn(postgres::Error) -> SinkError + '_ {
    move |e| SinkError::Database(format!("{context}: {}", super::describe(&e)))
}

/// Applies the migrations the database lacks; returns the versions applied now.
pub(crate) fn migrate(client: &mut Client) -> Result<Vec<i32>, SinkError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .map_err(db("taking the migration lock"))?;
    let result = apply_missing(client);
    let _ = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]);
    result
}

fn apply_missing(client: &mut Client) -> Result<Vec<i32>, SinkError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version    integer     PRIMARY KEY,
                 name       text        NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
        )
        .map_err(db("creating schema_migrations"))?;
    let mut applied = Vec::new();
    for m in MIGRATIONS {
        let mut tx = client.transaction().map_err(db("starting a migration"))?;
        let present = tx
            .query_opt(
                "SELECT 1 FROM schema_migrations WHERE version = $1",
                &[&m.version],
            )
            .map_err(db("reading schema_migrations"))?
            .is_some();
        if present {
            continue;
        }
        let context = format!("migration {:04}_{}", m.version, m.name);
        tx.batch_execute(m.sql)
            .map_err(|e| SinkError::Setup(format!("{context} failed: {}", super::describe(&e))))?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[&m.version, &m.name],
        )
        .map_err(db(&context))?;
        tx.commit().map_err(db(&context))?;
        tracing::info!(
            version = m.version,
            name = m.name,
            "database migration applied"
        );
        applied.push(m.version);
    }
    Ok(applied)
}

/// The schema version the database is at: 0 if never migrated.
pub(crate) fn current(client: &mut Client) -> Result<i32, SinkError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
        .map_err(db("reading schema_migrations"))?
        .get(0);
    if !exists {
        return Ok(0);
    }
    let v: Option<i32> = client
        .query_one("SELECT max(version) FROM schema_migrations", &[])
        .map_err(db("reading schema_migrations"))?
        .get(0);
    Ok(v.unwrap_or(0))
}

/// Fails unless the database is at [`latest`], naming the command that migrates it.
pub(crate) fn check(client: &mut Client) -> Result<(), SinkError> {
    let at = current(client)?;
    let want = latest();
    match at.cmp(&want) {
        std::cmp::Ordering::Equal => Ok(()),
        std::cmp::Ordering::Less => Err(SinkError::Setup(format!(
            "the database schema is at version {at}, this hub needs {want}: run \
             `citygate hub-migrate --config HUB.toml` (or set `migrate = true` in [sink])"
        ))),
        std::cmp::Ordering::Greater => Err(SinkError::Setup(format!(
            "the database schema is at version {at}, newer than this hub knows ({want}); \
             upgrade the hub"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_in_order_and_name_their_files() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i32 + 1);
            assert!(!m.sql.trim().is_empty());
        }
        let files: Vec<String> =
            std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
        assert_eq!(
            files.len(),
            MIGRATIONS.len(),
            "every file is embedded: {files:?}"
        );
        for m in MIGRATIONS {
            let name = format!("{:04}_{}.sql", m.version, m.name);
            assert!(files.contains(&name), "{name} not in {files:?}");
        }
    }
}
