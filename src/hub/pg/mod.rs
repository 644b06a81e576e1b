//! [`PgSink`]: accepted batches in PostgreSQL, exactly once (issue 13).
//!
//! Schema (`migrations/`, applied by `citygate hub-migrate` or `[sink] migrate = true`;
//! `migrate.rs`): `batches` keyed by (gateway, stream, incarnation, seq) with the header
//! fields; `records`, partitioned by day on `at` (`records_YYYYMMDD`, made on demand before
//! an insert, plus `records_default` so nothing is refused for its date; `rows.rs`);
//! `quarantine` for batches the database refused for their data.
//!
//! # Exactly once
//!
//! A group is one transaction (`commit.rs`): insert the batch rows with `ON CONFLICT DO
//! NOTHING RETURNING`; the keys not returned are already held (duplicates: nothing written,
//! acknowledged again); `COPY` the new batches' records; `COMMIT`; only then does the call
//! return and the hub ack. A concurrent insert of the same key by another hub process waits
//! for that transaction and then conflicts, so no local state is needed and any number of
//! hubs may share the subscription.
//!
//! # Failures
//!
//! - The database down, slow or failing the commit: the group fails (`Err`, nothing acked;
//!   the gateways keep their backlog and re-send), the hub reports `degraded`, the connection
//!   is dropped and re-made with backoff ([`crate::backoff`]): until the next attempt is due,
//!   commits fail at once without touching the network.
//! - A batch refused for its data (SQLSTATE class 22 or 23, a *poison* batch): the group is
//!   retried batch by batch; the batch that still fails alone is recorded in `quarantine`
//!   with its reason and SQLSTATE, counted, and acknowledged (it is durably recorded; a
//!   re-send would fail the same way forever).
//!
//! # Connections
//!
//! `[sink] connections` (default 2) connections, each with its own reconnect backoff: as
//! many groups commit at once, each in its own transaction. Two groups holding copies of one
//! batch behave as two hubs would: the second insert waits for the first transaction and
//! then conflicts (a duplicate) or, if that one rolled back, writes.
//!
//! # A database that is not there
//!
//! A hub whose database cannot be reached at start starts anyway (degraded, acknowledging
//! nothing; a database that answers and refuses the login or names no such database stops
//! it, as a wrong schema does) and checks or applies the schema at its first connection.
//! [`Sink::probe`] asks an idle connection `SELECT 1` so `/health` follows the database while
//! no batch arrives.
//!
//! Calls block (network round trips): the hub calls them on blocking threads.

mod commit;
mod connect;
pub(crate) mod migrate;
pub(crate) mod retention;
pub(crate) mod rows;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::{Duration, Instant};

use postgres::Client;

use super::config::PgConfig;
use super::sink::{Outcome, Sink, SinkBatch, SinkError};
use crate::backoff::{Backoff, BackoffPolicy};
use commit::Failure;

pub(crate) use connect::connect;

/// Reconnect delays after a failed connection or commit.
const RECONNECT: BackoffPolicy = BackoffPolicy {
    initial: Duration::from_millis(250),
    max: Duration::from_secs(5),
};

/// A PostgreSQL error as one line: the server's message and SQLSTATE, or the client-side
/// cause (connection refused, closed, timed out).
pub(crate) fn describe(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        );
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// One connection and what the sink knows about the database through it.
struct Conn {
    client: Option<Client>,
    backoff: Backoff,
    /// No connection attempt before this (after a failure).
    retry_at: Option<Instant>,
    last_error: String,
    /// Days whose partition exists (true) or will not be made (false).
    partitions: HashMap<i64, bool>,
}

/// The PostgreSQL sink. See the module docs.
pub(crate) struct PgSink {
    cfg: PgConfig,
    /// `cfg.connections` of them (at least one).
    conns: Vec<Mutex<Conn>>,
    /// Where the next call that finds every connection busy queues.
    next: AtomicUsize,
    /// The schema was checked (or migrated) through some connection.
    schema_ready: AtomicBool,
}

impl Drop for PgSink {
    fn drop(&mut self) {
        // Closing a connection blocks (it runs the client's own runtime): never on an async
        // worker, where the last holder of the hub may drop it.
        let clients: Vec<Client> = self
            .conns
            .iter_mut()
            .filter_map(|c| {
                c.get_mut()
                    .unwrap_or_else(PoisonError::into_inner)
                    .client
                    .take()
            })
            .collect();
        if !clients.is_empty() {
            let _ = std::thread::Builder::new()
                .name("pg-close".into())
                .spawn(move || drop(clients));
        }
    }
}

impl std::fmt::Debug for PgSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgSink")
            .field("url", &self.cfg.url)
            .finish()
    }
}

impl PgSink {
    /// Connects, then applies the migrations (`migrate = true`) or checks the schema is at
    /// the version this hub needs. A database that cannot be reached is no error: the sink
    /// starts without a connection and does both at its first. The further connections are
    /// made at their first use. Blocks.
    pub(crate) fn open(cfg: &PgConfig) -> Result<PgSink, SinkError> {
        let first = match connect(cfg) {
            Ok(mut client) => {
                ready_schema(cfg, &mut client)?;
                tracing::info!(url = %cfg.url, connections = cfg.connections, "postgres sink connected");
                Some(client)
            }
            Err(SinkError::Database(e)) => {
                tracing::warn!(url = %cfg.url, error = %e, "database unreachable at start: the hub starts degraded, acknowledges nothing and connects with backoff");
                None
            }
            Err(e) => return Err(e),
        };
        let schema_ready = first.is_some();
        let mut first = Some(first);
        let conns = (0..cfg.connections.max(1))
            .map(|_| {
                Mutex::new(Conn {
                    client: first.take().flatten(),
                    backoff: Backoff::new(RECONNECT),
                    retry_at: None,
                    last_error: String::new(),
                    partitions: HashMap::new(),
                })
            })
            .collect();
        Ok(PgSink {
            cfg: cfg.clone(),
            conns,
            next: AtomicUsize::new(0),
            schema_ready: AtomicBool::new(schema_ready),
        })
    }

    /// A connection no call holds, if any.
    fn idle_conn(&self) -> Option<MutexGuard<'_, Conn>> {
        self.conns.iter().find_map(|c| match c.try_lock() {
            Ok(guard) => Some(guard),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        })
    }

    /// An idle connection, else the next one in turn (waiting for it).
    fn conn(&self) -> MutexGuard<'_, Conn> {
        self.idle_conn().unwrap_or_else(|| {
            let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
            self.conns[i].lock().unwrap_or_else(PoisonError::into_inner)
        })
    }

    /// Runs `f` with a connection (see [`PgSink::run_on`]).
    fn with_client<T>(
        &self,
        f: impl FnOnce(&mut Client, &mut HashMap<i64, bool>) -> Result<T, Failure>,
    ) -> Result<T, SinkError> {
        self.run_on(&mut self.conn(), f)
    }

    /// Runs `f` on `conn`, connecting first if it has no client and the backoff allows (and
    /// readying the schema at the sink's first connection); a failure that lost the
    /// connection drops it and schedules the next attempt.
    fn run_on<T>(
        &self,
        conn: &mut Conn,
        f: impl FnOnce(&mut Client, &mut HashMap<i64, bool>) -> Result<T, Failure>,
    ) -> Result<T, SinkError> {
        if conn.client.is_none() {
            if let Some(at) = conn.retry_at.filter(|at| *at > Instant::now()) {
                return Err(SinkError::Database(format!(
                    "unavailable ({}); next attempt in {} ms",
                    conn.last_error,
                    at.saturating_duration_since(Instant::now()).as_millis()
                )));
            }
            let connected = connect(&self.cfg).and_then(|mut c| {
                if !self.schema_ready.load(Ordering::Acquire) {
                    ready_schema(&self.cfg, &mut c)?;
                    self.schema_ready.store(true, Ordering::Release);
                }
                Ok(c)
            });
            match connected {
                Ok(c) => {
                    tracing::info!(url = %self.cfg.url, "postgres sink connected");
                    conn.client = Some(c);
                }
                Err(e) => {
                    conn.last_error = e.to_string();
                    conn.retry_at = Some(Instant::now() + conn.backoff.next_delay());
                    return Err(e);
                }
            }
        }
        let client = conn.client.as_mut().expect("invariant: connected above");
        match f(client, &mut conn.partitions) {
            Ok(v) => {
                conn.backoff.reset();
                conn.retry_at = None;
                Ok(v)
            }
            Err(failure) => {
                if failure.connection_lost || client.is_closed() {
                    tracing::warn!(error = %failure.message, "postgres connection lost; reconnecting with backoff");
                    conn.client = None;
                    conn.last_error = failure.message.clone();
                    conn.retry_at = Some(Instant::now() + conn.backoff.next_delay());
                }
                Err(SinkError::Database(failure.message))
            }
        }
    }

    /// Drops daily partitions past retention (see `retention`); returns the dropped names.
    pub(crate) fn drop_expired(
        &self,
        policy: &retention::RetentionPolicy,
        now_ms: i64,
    ) -> Result<Vec<String>, SinkError> {
        let dropped =
            self.with_client(|client, _| retention::drop_expired(client, policy, now_ms))?;
        // Every connection forgets the dropped days, so a late record for one is routed to a
        // new partition or the default one, never assumed to have its own.
        let days: Vec<i64> = dropped
            .iter()
            .filter_map(|n| rows::partition_day(n))
            .collect();
        if !days.is_empty() {
            for c in &self.conns {
                let mut conn = c.lock().unwrap_or_else(PoisonError::into_inner);
                for day in &days {
                    conn.partitions.remove(day);
                }
            }
        }
        Ok(dropped)
    }
}

/// Applies the migrations (`migrate = true`) or checks the schema is at the version this hub
/// needs.
fn ready_schema(cfg: &PgConfig, client: &mut Client) -> Result<(), SinkError> {
    if cfg.migrate {
        migrate::migrate(client).map(drop)
    } else {
        migrate::check(client)
    }
}

/// Connects and applies the missing migrations; returns those applied now and the version
/// the schema is at. Blocks.
pub(crate) fn migrate_database(cfg: &PgConfig) -> Result<(Vec<i32>, i32), SinkError> {
    let mut client = connect(cfg)?;
    let applied = migrate::migrate(&mut client)?;
    Ok((applied, migrate::current(&mut client)?))
}

/// Commits `batches`; on a poison failure isolates the poison batch(es) one by one.
fn commit_isolating(
    client: &mut Client,
    partitions: &mut HashMap<i64, bool>,
    batches: &[SinkBatch<'_>],
) -> Result<Vec<Outcome>, Failure> {
    commit::ensure_partitions(client, &rows::days(batches), partitions)?;
    match commit::commit_group(client, batches) {
        Err(f) if f.is_poison() && batches.len() > 1 => {
            tracing::warn!(batches = batches.len(), error = %f.message, "group refused for its data; committing its batches one by one");
            let mut out = Vec::with_capacity(batches.len());
            for b in batches {
                out.extend(commit_isolating(
                    client,
                    partitions,
                    std::slice::from_ref(b),
                )?);
            }
            Ok(out)
        }
        Err(f) if f.is_poison() => {
            commit::quarantine(client, &batches[0], &f)?;
            Ok(vec![Outcome::Quarantined { reason: f.message }])
        }
        other => other,
    }
}

impl Sink for PgSink {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn parallel_commits(&self) -> usize {
        self.conns.len()
    }

    fn probe(&self) -> Option<Result<(), SinkError>> {
        // An idle connection only: while all of them commit, the commits tell.
        let mut conn = self.idle_conn()?;
        Some(self.run_on(&mut conn, |client, _| {
            client.simple_query("SELECT 1")?;
            Ok(())
        }))
    }

    fn commit(&self, batches: &[SinkBatch<'_>]) -> Result<Vec<Outcome>, SinkError> {
        let mut sorted: Vec<(usize, SinkBatch<'_>)> = batches.iter().copied().enumerate().collect();
        // One key order for every hub, so concurrent groups cannot deadlock on batch rows.
        sorted.sort_by(|a, b| a.1.key.cmp(b.1.key));
        let ordered: Vec<SinkBatch<'_>> = sorted.iter().map(|(_, b)| *b).collect();
        let outcomes =
            self.with_client(|client, partitions| commit_isolating(client, partitions, &ordered))?;
        let mut out = vec![Outcome::Duplicate; batches.len()];
        for ((i, _), o) in sorted.into_iter().zip(outcomes) {
            out[i] = o;
        }
        Ok(out)
    }
}
