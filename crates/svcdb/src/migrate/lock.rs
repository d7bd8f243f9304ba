//! One runner at a time per (database, schema): a PostgreSQL session advisory lock.
//!
//! The lock lives on a dedicated connection (never a pooled one, which would carry the lock
//! back into the pool). It is released explicitly on success, and on every other path (error,
//! panic, cancelled future) by dropping the connection: closing the socket ends the session,
//! and PostgreSQL releases session locks with it. Different schemas hash to different keys, so
//! their runners never wait for each other.
//!
//! The lock also tells a dirty history row in progress from a failed one: a live runner holds
//! it for as long as its script runs, and a session that ended (failure, crash, killed pod)
//! holds nothing. Readers of the history ask `pg_locks` without taking it.

use std::ops::{Deref, DerefMut};
use std::time::{Duration, Instant};

use tokio_util::task::AbortOnDropHandle;

use super::error::MigrateError;
use crate::connection::DedicatedConn;
use crate::ident::Ident;
use crate::pool::ServiceDb;

/// The first pause between two tries of a busy lock; it doubles up to [`MAX_POLL`].
const FIRST_POLL: Duration = Duration::from_millis(10);

/// The longest pause between two tries: how late, at most, a waiter notices the lock is free.
const MAX_POLL: Duration = Duration::from_millis(200);

/// A held migration lock and the connection that holds it (migrations run on it).
#[derive(Debug)]
pub struct MigrationLock {
    conn: DedicatedConn,
    /// The SQL expression of the lock key, reused by the unlock.
    key: String,
    /// The role the run works as (the schema's owner), which every script starts as.
    acting_as: String,
    /// This run created the schema (`Config::create_schema`).
    created_schema: bool,
}

impl MigrationLock {
    /// Opens a dedicated connection and takes the lock of `db`'s schema, waiting at most
    /// `wait` for another runner. `on_wait` is called once if the lock is busy, before
    /// waiting, so a CLI can say why it pauses.
    ///
    /// The wait polls `pg_try_advisory_lock` instead of blocking in `pg_advisory_lock` (with
    /// `lock_timeout` as the bound): a session blocked in a statement holds a snapshot, and
    /// `CREATE INDEX CONCURRENTLY` in the lock holder's migration waits for every older
    /// snapshot to go away, so holder and waiter would deadlock. Between polls the waiter holds
    /// nothing.
    pub async fn acquire(
        db: &ServiceDb,
        wait: Duration,
        on_wait: impl FnOnce(),
    ) -> Result<Self, MigrateError> {
        Self::acquire_on(Connecting::start(db), db, wait, on_wait).await
    }

    /// [`Self::acquire`] on the connection `connecting` opens.
    pub(crate) async fn acquire_on(
        connecting: Connecting,
        db: &ServiceDb,
        wait: Duration,
        on_wait: impl FnOnce(),
    ) -> Result<Self, MigrateError> {
        let conn = connecting.finish().await?;
        let key = key_sql(db.schema());
        let try_lock = format!("SELECT pg_try_advisory_lock({key})");
        let deadline = Instant::now() + crate::config::capped_wait(wait);
        let mut on_wait = Some(on_wait);
        let mut pause = FIRST_POLL;
        while first_value(&conn, &try_lock).await?.as_deref() != Some("t") {
            let now = Instant::now();
            if now >= deadline {
                return Err(MigrateError::LockTimeout {
                    schema: db.schema().as_str().to_owned(),
                    waited: wait,
                });
            }
            if let Some(f) = on_wait.take() {
                f();
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(MAX_POLL);
        }
        Ok(Self {
            conn,
            key,
            acting_as: String::new(),
            created_schema: false,
        })
    }

    /// The role the run works as, once [`Self::set_acting_as`] said it (empty before).
    pub(crate) fn acting_as(&self) -> &str {
        &self.acting_as
    }

    /// Notes the role the run works as.
    pub(crate) fn set_acting_as(&mut self, role: String) {
        self.acting_as = role;
    }

    /// Whether this run created the schema ([`Self::set_created_schema`]).
    pub(crate) fn created_schema(&self) -> bool {
        self.created_schema
    }

    /// Notes that this run created the schema.
    pub(crate) fn set_created_schema(&mut self) {
        self.created_schema = true;
    }

    /// The connection holding the lock, as a driver client.
    pub fn client(&self) -> &tokio_postgres::Client {
        &self.conn
    }

    /// Unlocks and closes the connection.
    pub async fn release(self) -> Result<(), MigrateError> {
        self.conn
            .simple_query(&format!("SELECT pg_advisory_unlock({})", self.key))
            .await?;
        Ok(())
    }

    /// Releases the lock whatever `result` is, then returns it (or the release's error after
    /// a success). On a failure the unlock is explicit too: dropping the connection would
    /// release the lock only once the server noticed the closed socket, and until then a
    /// failed migration's dirty row would read as in progress. A failing unlock after a
    /// failure is only logged: the failure is the news, and dropping the connection still
    /// ends the session.
    pub async fn release_after<T>(
        self,
        result: Result<T, MigrateError>,
    ) -> Result<T, MigrateError> {
        match result {
            Ok(value) => self.release().await.map(|()| value),
            Err(e) => {
                if let Err(unlock) = self.release().await {
                    tracing::warn!(target: "svcdb::migrate", error = %unlock, "cannot release the migration lock after a failure; closing its connection");
                }
                Err(e)
            }
        }
    }
}

/// The SQL expression of `schema`'s lock key in the current database. The schema goes in as a
/// string literal so that each try is one simple query; an [`Ident`] holds only `[a-z0-9_$]`,
/// so it cannot break out of the quotes.
fn key_sql(schema: &Ident) -> String {
    format!(
        "hashtextextended('svcdb.migrate.' || current_database() || '.' || '{}', 0)",
        schema.as_str()
    )
}

/// A boolean SQL expression: another session holds `schema`'s migration lock, i.e. a runner is
/// migrating it right now. Read from `pg_locks`, which every role may read, so asking takes no
/// lock and changes nothing. A `bigint` advisory key shows there as its high half in `classid`,
/// its low half in `objid` and `objsubid = 1` (PostgreSQL docs, "pg_locks"). The asking session
/// is left out: a runner reading the history under its own lock must not see itself.
pub(crate) fn held_by_another_sql(schema: &Ident) -> String {
    format!(
        "EXISTS (SELECT FROM pg_catalog.pg_locks l
                  WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
                    AND l.pid <> pg_backend_pid()
                    AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())
                    AND ((l.classid::int8 << 32) | l.objid::int8) = {})",
        key_sql(schema)
    )
}

/// The first column of the last row a simple query returned.
async fn first_value(conn: &DedicatedConn, sql: &str) -> Result<Option<String>, MigrateError> {
    let messages = conn.simple_query(sql).await?;
    Ok(messages
        .iter()
        .rev()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_owned)),
            _ => None,
        })
        .flatten())
}

impl Deref for MigrationLock {
    type Target = DedicatedConn;
    fn deref(&self) -> &DedicatedConn {
        &self.conn
    }
}

impl DerefMut for MigrationLock {
    fn deref_mut(&mut self) -> &mut DedicatedConn {
        &mut self.conn
    }
}

/// The lock's own connection, opened in a task of its own from [`Connecting::start`] on, so
/// that `up` can lint while the server starts the session (a backend's start-up is a few
/// milliseconds of the server's time, the lint's parse a few of the client's). Dropped
/// unfinished, the task is aborted and the connection closed.
pub(crate) struct Connecting(AbortOnDropHandle<Result<DedicatedConn, MigrateError>>);

impl Connecting {
    /// Starts opening the connection for the lock of `db`'s schema.
    pub(crate) fn start(db: &ServiceDb) -> Self {
        let db = db.clone();
        Self(AbortOnDropHandle::new(tokio::spawn(async move {
            dedicated_when_a_slot_frees(&db).await
        })))
    }

    /// The connection, once open.
    async fn finish(self) -> Result<DedicatedConn, MigrateError> {
        match self.0.await {
            Ok(connected) => connected,
            // Never aborted while awaited; a panic in it is this call's own.
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}

/// The lock's own connection. A server out of connection slots (53300) or still starting
/// (57P03) is asked again until the pool's acquire timeout, as the pool asks for its own (found
/// by a user trial: a replica migrating at start-up exited at once while others were busy).
async fn dedicated_when_a_slot_frees(db: &ServiceDb) -> Result<DedicatedConn, MigrateError> {
    let deadline = Instant::now() + crate::config::capped_wait(db.config().acquire_timeout);
    let mut pause = Duration::from_millis(50);
    loop {
        match db.dedicated().await {
            Err(crate::Error::Connect { cause, .. })
                if cause.code().is_some_and(|c| {
                    *c == crate::SqlState::TOO_MANY_CONNECTIONS
                        || *c == crate::SqlState::CANNOT_CONNECT_NOW
                }) && Instant::now() + pause < deadline =>
            {
                tracing::debug!(target: "svcdb::migrate", error = %crate::error::pg_message(&cause), "no connection slot for the migration lock yet; asking again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(500));
            }
            connected => return Ok(connected?),
        }
    }
}
