//! [`ServiceDb`]: one service's connection pool, its schema pinned on every connection.

mod hosts;
mod install;
mod maintenance;
mod retry;
mod status;

use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::{
    HookError, Manager, ManagerConfig, Pool, PoolError, QueueMode, RecyclingMethod, Runtime,
    Timeouts,
};
use tokio_postgres::config::TargetSessionAttrs;
use tokio_postgres::NoTls;

pub(crate) use status::no_answer_hint;
pub use status::{PoolStatus, WaitPercentiles};

use crate::config::Config;
use crate::connection::{accepts_writes, DedicatedConn};
use crate::error::{is_lost_create_race, pg_message, Error, Result};
use crate::ident::Ident;
use crate::tls::Tls;
use status::PoolStats;

/// A connection borrowed from a [`ServiceDb`]; it goes back to the pool when dropped.
///
/// It dereferences to [`tokio_postgres::Client`][pg-client], and its `prepare_cached` reuses
/// prepared statements across borrows.
///
/// [pg-client]: https://docs.rs/tokio-postgres/0.7/tokio_postgres/struct.Client.html
pub type PooledConn = deadpool_postgres::Object;

/// One service's access to its schema: a pool of connections whose `search_path` is pinned to
/// the service schema at connect time.
///
/// Cheap to clone; clones share the pool. Dropping the last clone closes the connections.
///
/// ```no_run
/// # async fn demo() -> Result<(), svcdb::Error> {
/// let db = svcdb::ServiceDb::connect(svcdb::Config::from_env()?).await?;
/// let conn = db.get().await?;
/// let row = conn.query_one("SELECT current_schema()", &[]).await?;
/// assert_eq!(row.get::<_, String>(0), db.schema().as_str());
/// # Ok(()) }
/// ```
///
/// The pool itself is deadpool-postgres; svcdb adds what a service needs around it:
/// the schema pinned at connect time, an acquire timeout whose error carries the last connection
/// error, a minimum of warm connections, idle and lifetime limits, a ping for connections that
/// sat idle, and wait statistics.
#[derive(Clone)]
pub struct ServiceDb {
    inner: Arc<Inner>,
}

struct Inner {
    /// The deadpool pool; its manager opens connections with the session config.
    pool: Pool,
    /// The validated configuration this pool was built from.
    config: Config,
    /// The driver config with the schema pinned and the TLS mode set (what every connection
    /// uses).
    session: tokio_postgres::Config,
    /// The connector of the pool and of its dedicated connections.
    tls: Tls,
    /// Wait histogram, timeout count, last connection error.
    stats: Arc<PoolStats>,
    /// The labels of this pool's metrics ([`crate::metrics`]).
    labels: Arc<[metrics::Label]>,
    /// Keeps the pool at `pool_min` and retires idle and old connections; aborted on drop.
    maintenance: tokio::task::JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.maintenance.abort();
        self.pool.close();
    }
}

impl std::fmt::Debug for ServiceDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceDb")
            .field("config", &self.inner.config)
            .field("status", &self.status())
            .finish()
    }
}

impl ServiceDb {
    /// Builds the pool without touching the network; connections open on first use and the
    /// background task warms the pool up to `pool_min`. Must be called inside a Tokio runtime.
    ///
    /// Reads `ssl_root_cert` (or the system's roots) when the TLS mode checks certificates; a
    /// file that cannot be used is an [`Error::Config`] naming it.
    pub fn new(config: Config) -> Result<Self> {
        config.validate()?;
        // Built once: the root certificates are read here, and every connection shares them.
        let tls = Tls::new(config.tls, config.ssl_root_cert.as_deref())?;
        let session = tls.driver_config(&config.session_config());
        let manager_config = ManagerConfig {
            // `Fast` checks only that the socket is open; the hook below pings connections
            // that sat idle, so a hot connection costs no extra round trip.
            recycling_method: RecyclingMethod::Fast,
        };
        // The manager boxes its connector, so the choice is made once, here: without TLS the
        // pool's connections are `NoTls` ones, exactly as before svcdb had TLS.
        let manager = match tls.rustls() {
            None => Manager::from_config(session.clone(), NoTls, manager_config),
            Some(rustls) => Manager::from_config(session.clone(), rustls.clone(), manager_config),
        };
        let verify_after = config.verify_after_idle;
        let ping_timeout = config.connect_timeout;
        // A pool that must reach the primary asks, in the same round trip as the ping, whether
        // the server still accepts writes: after a failover a connection to a server that
        // became a standby (or was fenced read-only) is retired, and the pool opens one that
        // finds the new primary.
        let requires_writes = config.target_session_attrs() == TargetSessionAttrs::ReadWrite;
        let pool = Pool::builder(manager)
            .max_size(config.pool_max)
            .runtime(Runtime::Tokio1)
            // Last in, first out: busy periods reuse the warmest connections and the rest age
            // out through the idle timeout.
            .queue_mode(QueueMode::Lifo)
            .post_recycle(deadpool_postgres::Hook::async_fn(move |client, metrics| {
                Box::pin(async move {
                    // `last_used` counts from the previous checkout, so a connection that was
                    // held that long is pinged too: one cheap round trip, never a stale socket.
                    if metrics.last_used() < verify_after {
                        return Ok(());
                    }
                    let check = async {
                        if requires_writes {
                            accepts_writes(client).await
                        } else {
                            client.simple_query("").await.map(|_| true)
                        }
                    };
                    match tokio::time::timeout(ping_timeout, check).await {
                        Ok(Ok(true)) => Ok(()),
                        Ok(Ok(false)) => {
                            Err(HookError::message("the server no longer accepts writes"))
                        }
                        Ok(Err(e)) => Err(HookError::Backend(e)),
                        Err(_) => Err(HookError::message("ping timed out")),
                    }
                })
            }))
            .build()
            .map_err(|e| Error::config("pool", e.to_string()))?;
        crate::metrics::install();
        let labels = crate::metrics::labels_for(&config, session.get_dbname().unwrap_or(""));
        let stats = Arc::new(PoolStats::new(&labels));
        let maintenance = tokio::spawn(maintenance::run(
            pool.weak(),
            maintenance::Limits::from(&config),
            stats.clone(),
        ));
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                config,
                session,
                tls,
                stats,
                labels,
                maintenance,
            }),
        })
    }

    /// Builds the pool, creates the schema if configured to, and opens `pool_min`
    /// connections, so that a wrong URL, password, host or schema fails here, at start-up.
    ///
    /// A wrong or missing password, a role or database that does not exist, a refused TLS
    /// certificate and any other error the server sends while starting the session (an
    /// unknown setting in the URL's `options`) fail on the first attempt ([`Error::Connect`]);
    /// a server that refuses connections, is starting up or has no connection slot free is
    /// retried until the acquire timeout. Without [`Config::create_schema`], a schema that does
    /// not exist is [`Error::SchemaMissing`], naming the database's schemas that look like it
    /// (the first query would fail otherwise). [`new`](Self::new) checks none of this.
    pub async fn connect(config: Config) -> Result<Self> {
        let db = Self::new(config)?;
        let first = db.get().await?;
        if db.inner.config.create_schema {
            create_schema_if_missing(&first, &db.inner.config.schema).await?;
        } else {
            require_schema(&first, &db.inner.config).await?;
        }
        let more = db.inner.config.pool_min.saturating_sub(1);
        let warm = futures_util::future::join_all((0..more).map(|_| db.get())).await;
        drop(first);
        for conn in warm {
            drop(conn?);
        }
        Ok(db)
    }

    /// Borrows a connection, waiting at most `acquire_timeout`.
    ///
    /// A connection that was closed (server restart, `pg_terminate_backend`) is never handed
    /// out: it is dropped and another one taken or opened. Opening one is retried until the
    /// timeout, except when it fails in a way no retry fixes (a wrong or missing password, a role
    /// or database that does not exist, a refused TLS certificate, a server's FATAL error at
    /// startup other than "starting up" or "too many connections"): that is
    /// [`Error::Connect`], at once. If no connection can be had in time the error is
    /// [`Error::AcquireTimeout`], carrying the last connection error.
    pub async fn get(&self) -> Result<PooledConn> {
        let started = Instant::now();
        let deadline = started + crate::config::capped_wait(self.inner.config.acquire_timeout);
        let mut last_error: Option<tokio_postgres::Error> = None;
        // Set when the last attempt got no answer within its create timeout (then no error),
        // with whether the acquire deadline cut that attempt short.
        let mut no_answer_within: Option<Duration> = None;
        let mut no_answer_cut_short = false;
        let mut backoff = Duration::from_millis(10);
        // First ask for a free connection without waiting: on the hot path that arms no timer.
        let mut free_only = true;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break;
            }
            let attempt_timeout = self.inner.config.connect_attempt_timeout();
            let create = remaining.min(attempt_timeout);
            let timeouts = Timeouts {
                wait: Some(if free_only { Duration::ZERO } else { remaining }),
                create: Some(create),
                // `RecyclingMethod::Fast` does no I/O, and the post-recycle hook bounds its own
                // ping, so recycling needs no timer of its own.
                recycle: None,
            };
            match self.inner.pool.timeout_get(&timeouts).await {
                Ok(conn) => {
                    self.inner.stats.record_wait(started.elapsed());
                    if last_error.is_some() || no_answer_within.is_some() {
                        self.inner.stats.set_connect_error(None);
                    }
                    return Ok(conn);
                }
                Err(PoolError::Timeout(deadpool_postgres::TimeoutType::Wait)) if free_only => {
                    free_only = false; // every connection is busy: wait for one
                }
                Err(PoolError::Backend(e)) => {
                    free_only = false;
                    // Once, within the acquire deadline: with several hosts, the driver's
                    // error is the last host's.
                    let e = if last_error.is_none() {
                        let probe = hosts::more_telling(
                            &self.inner.session,
                            &self.inner.tls,
                            &e,
                            self.inner.config.connect_attempt_timeout(),
                        );
                        let left = deadline.saturating_duration_since(Instant::now());
                        match tokio::time::timeout(left, probe).await {
                            Ok(Some(better)) => better,
                            _ => e,
                        }
                    } else {
                        e
                    };
                    self.inner.stats.set_connect_error(Some(&e));
                    if retry::no_retry_fixes(&e) {
                        // Every attempt would fail alike: the cause now, not a timeout later.
                        return Err(Error::Connect {
                            target: self.inner.config.target(),
                            cause: e,
                        });
                    }
                    let message = pg_message(&e);
                    if last_error.is_none() {
                        tracing::warn!(target: "svcdb::pool", target_db = %self.inner.config.target(), error = %message, "cannot open a connection; retrying until the acquire timeout");
                    }
                    last_error = Some(e);
                    no_answer_within = None;
                    // Retry: a restarting server comes back soon.
                    tokio::time::sleep(
                        backoff.min(deadline.saturating_duration_since(Instant::now())),
                    )
                    .await;
                    backoff = (backoff * 2).min(Duration::from_millis(250));
                }
                Err(PoolError::Timeout(deadpool_postgres::TimeoutType::Wait)) => break,
                Err(PoolError::Timeout(deadpool_postgres::TimeoutType::Create))
                    if create < attempt_timeout
                        && (last_error.is_some() || no_answer_within.is_some()) =>
                {
                    // Cut short by the acquire deadline, not by the server's silence (a slow
                    // TLS handshake on a loaded machine, say): the earlier cause still stands.
                    break;
                }
                Err(PoolError::Timeout(deadpool_postgres::TimeoutType::Create)) => {
                    // Something accepted the connection and said nothing (the driver's own
                    // connect timeout covers only TCP): try again, with a fresh connection.
                    free_only = false;
                    // The acquire timeout cut this one short when it is the shorter: raising
                    // the connect timeout would not have helped.
                    self.inner
                        .stats
                        .set_no_answer(create, create < attempt_timeout);
                    last_error = None;
                    no_answer_within = Some(create);
                    no_answer_cut_short = create < attempt_timeout;
                }
                Err(PoolError::Timeout(deadpool_postgres::TimeoutType::Recycle)) => continue,
                Err(PoolError::Closed) => return Err(Error::PoolClosed),
                Err(PoolError::PostCreateHook(e)) => {
                    return Err(Error::config(
                        "pool",
                        format!("post-create hook failed: {e}"),
                    ))
                }
                Err(PoolError::NoRuntimeSpecified) => {
                    unreachable!("the pool is built with Runtime::Tokio1")
                }
            }
        }
        self.inner.stats.record_timeout();
        let status = self.inner.pool.status();
        Err(Error::AcquireTimeout {
            waited: started.elapsed(),
            target: self.inner.config.target(),
            size: status.size,
            max_size: status.max_size,
            cause: last_error,
            no_answer_within,
            no_answer_cut_short,
        })
    }

    /// Opens a connection outside the pool, with the same pinned schema. For work that must not
    /// return a connection to the pool in an odd state: session advisory locks, `LISTEN`, long
    /// migrations. It closes when dropped.
    pub async fn dedicated(&self) -> Result<DedicatedConn> {
        DedicatedConn::connect_with(&self.inner.session, &self.inner.tls).await
    }

    /// A dedicated connection and its `NOTIFY` notifications (for `LISTEN`).
    pub(crate) async fn dedicated_listening(
        &self,
    ) -> Result<(
        DedicatedConn,
        tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::Notification>,
    )> {
        DedicatedConn::connect_listening(&self.inner.session, &self.inner.tls).await
    }

    /// The connector of the pool's connections (for a cancel request on one of them).
    pub(crate) fn tls(&self) -> &Tls {
        &self.inner.tls
    }

    /// Sizes, waiters and wait percentiles; no I/O.
    pub fn status(&self) -> PoolStatus {
        self.inner.stats.snapshot(&self.inner.pool.status())
    }

    /// What to do about the last failed connection attempt (the health report's hint), while
    /// the last attempt is a failure.
    pub(crate) fn last_connect_hint(&self) -> Option<&'static str> {
        self.inner.stats.last_connect_hint()
    }

    /// The labels of this pool's metrics.
    pub(crate) fn labels(&self) -> &[metrics::Label] {
        &self.inner.labels
    }

    /// The configuration the pool was built from.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The service schema every connection is pinned to.
    pub fn schema(&self) -> &Ident {
        &self.inner.config.schema
    }

    /// The driver configuration with the pinned schema (password included: do not print it
    /// with anything but its own redacting `Debug`).
    pub fn session_config(&self) -> &tokio_postgres::Config {
        &self.inner.session
    }

    /// Closes the pool: waiting and future `get` calls fail with [`Error::PoolClosed`]; borrowed
    /// connections close when returned.
    pub fn close(&self) {
        self.inner.maintenance.abort();
        self.inner.pool.close();
    }
}

/// Fails with [`Error::SchemaMissing`] unless the service schema exists.
async fn require_schema(client: &tokio_postgres::Client, config: &Config) -> Result<()> {
    match schemas_like(client, config.schema.as_str()).await? {
        None => Ok(()),
        Some(similar) => Err(Error::SchemaMissing {
            schema: config.schema.as_str().to_owned(),
            target: config.target(),
            similar,
        }),
    }
}

/// `None` when `schema` exists, else the database's schemas that look like it
/// ([`look_alike`]). `pg_namespace` lists every schema of the database to every role, so the
/// look-alikes include schemas the role may not use (the start-up gate reports that
/// separately).
pub(crate) async fn schemas_like(
    client: &tokio_postgres::Client,
    schema: &str,
) -> std::result::Result<Option<Vec<String>>, tokio_postgres::Error> {
    let names: Vec<String> = client
        .query(
            "SELECT nspname::text FROM pg_namespace \
             WHERE nspname = $1 OR (nspname !~ '^pg_' AND nspname <> 'information_schema')",
            &[&schema],
        )
        .await?
        .into_iter()
        .map(|row| row.get(0))
        .collect();
    Ok((!names.iter().any(|name| name == schema)).then(|| look_alike(schema, names)))
}

/// The names that look like `wanted`: a few edits away (at most a third of its length, as
/// rustc's suggestions), equal but for case, or one a prefix of the other (`orders` and
/// `orders_svc`); closest first, at most five.
pub(crate) fn look_alike(wanted: &str, names: Vec<String>) -> Vec<String> {
    let wanted_lower = wanted.to_lowercase();
    let max_edits = (wanted.chars().count() / 3).max(1);
    let mut close: Vec<(usize, String)> = names
        .into_iter()
        .filter_map(|name| {
            let lower = name.to_lowercase();
            let edits = strsim::levenshtein(&wanted_lower, &lower);
            let prefix = lower.starts_with(&wanted_lower) || wanted_lower.starts_with(&lower);
            (edits <= max_edits || prefix).then_some((edits, name))
        })
        .collect();
    close.sort();
    close.into_iter().take(5).map(|(_, name)| name).collect()
}

/// `CREATE SCHEMA IF NOT EXISTS` still fails when two sessions create the schema at the same
/// moment; losing that race is success.
async fn create_schema_if_missing(client: &tokio_postgres::Client, schema: &Ident) -> Result<()> {
    match client
        .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
        .await
    {
        Err(e) if is_lost_create_race(&e) => Ok(()),
        other => Ok(other?),
    }
}
