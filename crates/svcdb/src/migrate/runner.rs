//! The runner: `up`, `down`, `redo`, `status`, `validate`, `baseline`, `repair`.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::time::{Duration, Instant};

use tokio_postgres::types::Type;
use tokio_postgres::{Client, GenericClient};

use super::adopt;
use super::error::{MigrateError, MigrationFailure};
use super::event::{Direction, MigrateEvent};
use super::history::{self, History};
use super::interrupt::Interrupt;
use super::location::{locate, Location};
use super::lock::{Connecting, MigrationLock};
use super::migration::{adds_enum_value, Migration};
use super::options::{DownOptions, MigrateOptions, UpOptions};
use super::repeatable::{self, Repeatable, RepeatableRun, RepeatableState};
use super::report::{
    BaselineReport, DownReport, InvalidIndex, RedoReport, RepairAction, RepairReport, RunEntry,
    UpReport,
};
use super::source::Migrations;
use super::split::{may_change_lock_timeout, statements_to_run, waits_out_older_transactions};
use super::status::StatusReport;
use super::version::Version;
use crate::pool::ServiceDb;

/// `client_connection_check_interval` of the runner's session, in ms: the server notices a
/// vanished runner (cancelled task, killed process) during a long statement within a second
/// and ends the session, releasing the lock, instead of running on until the statement ends.
const CONNECTION_CHECK_MS: u32 = 1000;

/// Runs a service's migrations against its schema.
///
/// ```no_run
/// # async fn demo(db: svcdb::ServiceDb) -> Result<(), svcdb::migrate::MigrateError> {
/// use svcdb::migrate::{Migrations, Migrator};
/// let migrator = Migrator::new(db, Migrations::from_dir("migrations")?);
/// migrator.up().await?;
/// assert!(migrator.status().await?.is_up_to_date());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Migrator {
    db: ServiceDb,
    migrations: Migrations,
    options: MigrateOptions,
    /// Set by [`Migrator::with_interrupt`].
    interrupt: Option<Interrupt>,
}

/// The observer of calls without one.
fn ignore(_: &MigrateEvent) {}

/// A failure of one script, told apart from a failure of the bookkeeping around it.
enum StepError {
    /// The script (or its commit) failed: the migration's fault.
    Script {
        cause: tokio_postgres::Error,
        /// For a non-transactional script, the number of statements that succeeded first.
        statements_done: Option<usize>,
        /// For a transactional script sent statement by statement, the failing statement's
        /// bytes in it.
        at: Option<Range<usize>>,
        /// Retries after a lock timeout before this failure.
        lock_retries: u32,
    },
    /// Anything else.
    Other(MigrateError),
}

impl StepError {
    fn script(cause: tokio_postgres::Error, statements_done: Option<usize>) -> Self {
        StepError::Script {
            cause,
            statements_done,
            at: None,
            lock_retries: 0,
        }
    }
}

impl From<tokio_postgres::Error> for StepError {
    fn from(e: tokio_postgres::Error) -> Self {
        StepError::Other(e.into())
    }
}

/// A failed group: the index of the migration at fault in it, and why.
type GroupError = (usize, StepError);

impl Migrator {
    /// A runner for `migrations` on `db`'s schema, with default [`MigrateOptions`].
    pub fn new(db: ServiceDb, migrations: Migrations) -> Self {
        Self {
            db,
            migrations,
            options: MigrateOptions::default(),
            interrupt: None,
        }
    }

    /// Stops a run when `interrupt` is cancelled (by a signal handler: Ctrl-C, a pod's
    /// SIGTERM), the way a failure stops it, instead of the process vanishing mid-statement.
    ///
    /// * Waiting for the lock, or between migrations: the run ends with
    ///   [`MigrateError::Interrupted`]; what it completed stays (and is on disk).
    /// * During a migration's statement: the server is asked to cancel it
    ///   (`pg_cancel_backend`), and the migration fails with SQLSTATE 57014 as any failure
    ///   does: a transaction rolls back, a non-transactional migration stopped in its first
    ///   statement stays pending, one stopped later is marked dirty, and the rest of the
    ///   deploy is undone where it can be.
    ///
    /// A statement the server cannot cancel (a `COMMIT`) finishes, and the run stops before
    /// the next migration.
    pub fn with_interrupt(mut self, interrupt: tokio_util::sync::CancellationToken) -> Self {
        self.interrupt = Some(Interrupt::new(interrupt));
        self
    }

    /// `statement`, run on the lock's session, cancelled there if the run is interrupted
    /// meanwhile ([`Self::with_interrupt`]).
    async fn interruptible<T>(
        &self,
        statement: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, tokio_postgres::Error> {
        match &self.interrupt {
            Some(interrupt) => interrupt.around(&self.db, statement).await,
            None => statement.await,
        }
    }

    /// [`MigrateError::Interrupted`] if the run was asked to stop, with what it did.
    fn check_interrupt(&self, done: &[RunEntry]) -> Result<(), MigrateError> {
        match &self.interrupt {
            Some(interrupt) if interrupt.requested() => Err(MigrateError::Interrupted {
                schema: self.schema(),
                done: done.iter().map(|e| e.version.clone()).collect(),
                dirty: None,
            }),
            _ => Ok(()),
        }
    }

    /// Whether `cause` is a statement the interrupt cancelled (57014 once it was asked for).
    fn cancelled_by_interrupt(&self, cause: &tokio_postgres::Error) -> bool {
        cause.code() == Some(&tokio_postgres::error::SqlState::QUERY_CANCELED)
            && self.interrupt.as_ref().is_some_and(Interrupt::requested)
    }

    /// Replaces the options.
    pub fn with_options(mut self, options: MigrateOptions) -> Self {
        self.options = options;
        self
    }

    /// The source.
    pub fn migrations(&self) -> &Migrations {
        &self.migrations
    }

    /// The options.
    pub fn options(&self) -> &MigrateOptions {
        &self.options
    }

    fn schema(&self) -> String {
        self.db.schema().as_str().to_owned()
    }

    /// The database (for [`adopt`](super::adopt)).
    pub(crate) fn service_db(&self) -> &ServiceDb {
        &self.db
    }

    /// The schema's lock and the history read under it (for [`adopt`](super::adopt), which
    /// takes it only to write), creating the schema if configured to.
    pub(crate) async fn lock_for_adopt(&self) -> Result<(MigrationLock, History), MigrateError> {
        self.lock(&mut ignore, true).await
    }

    /// Where every migration stands. Read-only, takes no lock; one query on a pooled
    /// connection.
    pub async fn status(&self) -> Result<StatusReport, MigrateError> {
        let conn = self.db.get().await?;
        // Sent together: tokio-postgres pipelines concurrent queries on one connection.
        let (history, recorded) = tokio::join!(
            history::read(client(&conn), self.db.schema(), true),
            self.recorded_repeatables(client(&conn))
        );
        let (history, recorded) = (history?, recorded?);
        let mut report = StatusReport::build(self.db.schema().as_str(), &self.migrations, &history)
            .with_repeatables(&self.migrations, &recorded);
        if history.rows.is_empty() {
            // One more query, only while svcdb has applied nothing.
            report.other_histories =
                adopt::other_histories(client(&conn), self.db.schema()).await?;
        }
        // A non-transactional script in progress is a dirty row whose runner holds the lock.
        report.locked = report.in_progress.is_some();
        if report.pending().next().is_some() && !report.locked {
            // A transactional deploy leaves no dirty row to tell it is running: ask the lock.
            let sql = format!(
                "SELECT {}",
                super::lock::held_by_another_sql(self.db.schema())
            );
            report.locked = conn.query_one(&sql, &[]).await?.get(0);
        }
        Ok(report)
    }

    /// The lint of what the next `up` runs: the pending migrations, then the repeatable ones
    /// due, knowing the live tables' columns (what `svcdb migrate lint` prints).
    ///
    /// Refused, as `up` and [`validate`](Self::validate) refuse, with
    /// [`MigrateError::OtherToolApplied`] when another tool applied the folder: `up` would not
    /// run these migrations, and linted as one deploy over that tool's tables they say little
    /// (found by a user trial: lint reported nothing where `validate` refused).
    pub async fn lint_pending(&self) -> Result<super::lint::LintReport, MigrateError> {
        let status = self.status().await?;
        if status.pending().next().is_some() {
            let conn = self.db.get().await?;
            self.refuse_over_other_tool(client(&conn), &status.other_histories)
                .await?;
        }
        let pending = status
            .pending()
            .filter_map(|e| self.migrations.get(&e.version));
        let stale: Vec<&str> = status
            .stale_repeatables()
            .map(|r| r.name.as_str())
            .collect();
        let repeatables = self
            .migrations
            .repeatables()
            .iter()
            .filter(|r| stale.contains(&r.name.as_str()));
        let live = self.live_columns(true).await?;
        Ok(super::lint::lint_live(pending, repeatables, live))
    }

    /// The schema's live columns for the lint, when `needed` (one query); none otherwise.
    async fn live_columns(&self, needed: bool) -> Result<super::lint::LiveColumns, MigrateError> {
        if !needed {
            return Ok(super::lint::LiveColumns::default());
        }
        let conn = self.db.get().await?;
        Ok(super::lint::LiveColumns::read(
            client(&conn),
            self.db.schema(),
            &self.db.config().search_path(),
        )
        .await?)
    }

    /// The recorded repeatable migrations; no query when the source has none.
    async fn recorded_repeatables(
        &self,
        client: &Client,
    ) -> Result<HashMap<String, repeatable::Recorded>, MigrateError> {
        if self.migrations.repeatables().is_empty() {
            return Ok(HashMap::new());
        }
        Ok(repeatable::read(client, self.db.schema()).await?)
    }

    /// [`status`](Self::status), failing on a dirty schema, changed files, missing files and
    /// out-of-order pending migrations (each unless [`MigrateOptions`] allows it), on a
    /// pending migration that is still `migrate new`'s template, and on what the lint refuses
    /// in the pending migrations ([`MigrateError::Unsafe`], unless
    /// [`MigrateOptions::allow_unsafe`]): where `validate` passes, `up` runs. A migration
    /// in progress is no failure: `up` would wait for its runner.
    ///
    /// Before the first `up` it also checks that the schema exists (one more query, only then),
    /// since `up` could not create its history table: [`MigrateError::SchemaMissing`], unless
    /// [`Config::create_schema`](crate::Config::create_schema) lets `up` create it.
    pub async fn validate(&self) -> Result<StatusReport, MigrateError> {
        let status = self.status().await?;
        if !status.history_exists && !self.db.config().create_schema {
            let conn = self.db.get().await?;
            let missing =
                crate::pool::schemas_like(client(&conn), self.db.schema().as_str()).await?;
            if let Some(similar) = missing {
                return Err(MigrateError::SchemaMissing {
                    schema: self.schema(),
                    similar,
                });
            }
        }
        let plan = self.plan_up(&status, None)?;
        super::template::refuse_untouched(&plan)?;
        let recorded = {
            let conn = self.db.get().await?;
            if !plan.is_empty() {
                self.refuse_over_other_tool(client(&conn), &status.other_histories)
                    .await?;
                if status.history_exists {
                    self.refuse_applied_by_other_tool(client(&conn), &plan)
                        .await?;
                }
            }
            self.recorded_repeatables(client(&conn)).await?
        };
        // Found by a user trial: `status` said "run `svcdb migrate up`", which then refused
        // the pending migrations' unsafe statements.
        let stale = self.stale_repeatables(&status, &UpOptions::default(), &recorded);
        self.lint_before_up(&plan, &stale, &mut ignore).await?;
        Ok(status)
    }

    /// [`MigrateError::OtherToolApplied`] when one of `others` (another tool's history tables,
    /// read while svcdb has applied nothing) records migrations in a schema that holds tables:
    /// `up` would run them all again over that tool's work.
    async fn refuse_over_other_tool(
        &self,
        client: &Client,
        others: &[adopt::OtherHistory],
    ) -> Result<(), MigrateError> {
        match adopt::applied_by_other_tool(client, self.db.schema(), others).await? {
            Some(other) => Err(MigrateError::OtherToolApplied {
                schema: self.schema(),
                other,
            }),
            None => Ok(()),
        }
    }

    /// Refuses `plan`, the pending migrations, when another tool's history records one of them
    /// as applied since svcdb adopted it ([`MigrateError::AppliedByOtherTool`]). The history
    /// table must exist.
    async fn refuse_applied_by_other_tool(
        &self,
        client: &Client,
        plan: &[&Migration],
    ) -> Result<(), MigrateError> {
        match adopt::pending_applied_by_other_tool(client, self.db.schema(), plan).await? {
            Some((other, versions)) => Err(MigrateError::AppliedByOtherTool {
                schema: self.schema(),
                other,
                versions,
            }),
            None => Ok(()),
        }
    }

    /// Applies every pending migration; see [`up_with`](Self::up_with).
    pub async fn up(&self) -> Result<UpReport, MigrateError> {
        self.up_with(&UpOptions::default(), &mut ignore).await
    }

    /// Applies pending migrations, telling `observer` about each as it runs.
    ///
    /// With nothing pending and nothing in progress this is one query on a pooled connection
    /// and takes no lock. Otherwise it takes the schema's lock (waiting up to
    /// [`MigrateOptions::lock_wait`] for a runner in progress, e.g. another replica's long
    /// `CREATE INDEX CONCURRENTLY`), reads the history again (that runner may have just
    /// migrated), and runs what is still pending: all in one transaction when every one is
    /// transactional; else each run of consecutive transactional migrations in one transaction
    /// of its own (a *group*, with one history write) and each non-transactional migration on
    /// its own, undoing the groups and migrations this call committed with their down scripts
    /// if one fails (see [`MigrateError::Failed`]). A statement that hits `lock_timeout` is
    /// retried ([`MigrateOptions::lock_retries`]). A group's scripts are sent at once
    /// (pipelined, each still its own message with its own error), and of a deploy of several
    /// transactions only the last commit waits for the disk: it flushes the earlier ones too.
    ///
    /// A pending migration that is still the template [`new_migration`](super::new_migration)
    /// wrote is refused first ([`MigrateError::Unwritten`]). Before anything runs (dry runs
    /// included), the pending migrations are
    /// [linted](mod@super::lint): an error-level finding that neither its file
    /// (`-- svcdb:allow <rule>`) nor [`MigrateOptions::allow_unsafe`] allows refuses the call
    /// with [`MigrateError::Unsafe`]; other findings go to `observer` as [`MigrateEvent::Lint`].
    pub async fn up_with(
        &self,
        options: &UpOptions,
        observer: &mut (dyn FnMut(&MigrateEvent) + Send),
    ) -> Result<UpReport, MigrateError> {
        let (history, recorded) = {
            let conn = self.db.get().await?;
            let (history, recorded) = tokio::join!(
                history::read(client(&conn), self.db.schema(), false),
                self.recorded_repeatables(client(&conn))
            );
            (history?, recorded?)
        };
        let status = StatusReport::build(&self.schema(), &self.migrations, &history);
        let plan = self.plan_up(&status, options.to.as_ref())?;
        super::template::refuse_untouched(&plan)?;
        let stale = self.stale_repeatables(&status, options, &recorded);
        // A migration in progress may be one this call would run, or may fail: only under the
        // lock, once its runner is done, is there nothing to do.
        // A history table an older release wrote is upgraded under the lock first. A schema
        // `up` may create is made under it too, with nothing to apply (found by a user trial:
        // an empty folder said "up to date" and left the service without its schema).
        let may_create = !history.exists && self.db.config().create_schema;
        let nothing_to_do = plan.is_empty()
            && stale.is_empty()
            && status.in_progress.is_none()
            && !history.legacy
            && !may_create;
        let locks = !options.dry_run && !nothing_to_do;
        // The lock's connection opens while the checks and the lint below run.
        let connecting = locks.then(|| Connecting::start(&self.db));
        if history.rows.is_empty() && !plan.is_empty() {
            let conn = self.db.get().await?;
            let others = adopt::other_histories(client(&conn), self.db.schema()).await?;
            self.refuse_over_other_tool(client(&conn), &others).await?;
        } else if !plan.is_empty() {
            let conn = self.db.get().await?;
            self.refuse_applied_by_other_tool(client(&conn), &plan)
                .await?;
        }
        self.lint_before_up(&plan, &stale, observer).await?;
        let Some(connecting) = connecting else {
            return Ok(UpReport {
                schema: self.schema(),
                dry_run: options.dry_run,
                atomic: is_atomic(&plan),
                migrations: plan.iter().map(|m| planned(m)).collect(),
                current_version: history.current_version(&self.migrations),
                repeatables: stale
                    .iter()
                    .map(|r| RepeatableRun {
                        name: r.name.clone(),
                        transactional: r.transactional,
                        duration_ms: None,
                    })
                    .collect(),
            });
        };
        let (mut lock, history) = self.lock_on(connecting, observer, true).await?;
        let result = async {
            let status = StatusReport::build(&self.schema(), &self.migrations, &history);
            let plan = self.plan_up(&status, options.to.as_ref())?;
            let (done, atomic) = match self
                .run(&mut lock, &plan, Direction::Up, history.exists, observer)
                .await
            {
                Err(MigrateError::Failed(mut f))
                    if history.rows.is_empty() && f.is_already_there() =>
                {
                    // Best effort: the failure is the news.
                    f.other_histories = adopt::other_histories(&lock, self.db.schema())
                        .await
                        .unwrap_or_default();
                    return Err(MigrateError::Failed(f));
                }
                done => done?,
            };
            let repeated = self
                .run_repeatables(&lock, &status, options, &done, observer)
                .await?;
            Ok((atomic, done, repeated))
        }
        .await;
        if result.is_err() && lock.created_schema() {
            // This run made the schema and failed: unless something stayed in it (a dirty
            // non-transactional migration's work, its history), it goes, so the database is as
            // before (found by a user trial: an empty schema was left). `RESTRICT` refuses a
            // schema that holds anything; best effort, the failure is the news.
            let drop = format!("DROP SCHEMA IF EXISTS {} RESTRICT", self.db.schema());
            if let Err(e) = lock.client().batch_execute(&drop).await {
                tracing::debug!(target: "svcdb::migrate", error = %crate::error::pg_message(&e), "the schema this run created stays");
            }
        }
        let (atomic, done, repeated) = lock.release_after(result).await?;
        let current = done
            .last()
            .map(|e| e.version.clone())
            .max(history.current_version(&self.migrations));
        Ok(UpReport {
            schema: self.schema(),
            dry_run: false,
            atomic,
            migrations: done,
            current_version: current,
            repeatables: repeated,
        })
    }

    /// The repeatable migrations `up` with `options` runs: each never run or changed since it
    /// ran, by name; none for an `up --to` (a partial deploy), and none while a newer release
    /// has migrated the schema (`status`): they are that release's.
    fn stale_repeatables(
        &self,
        status: &StatusReport,
        options: &UpOptions,
        recorded: &HashMap<String, repeatable::Recorded>,
    ) -> Vec<&Repeatable> {
        if options.to.is_some() || status.newer_release() {
            return Vec::new();
        }
        self.migrations
            .repeatables()
            .iter()
            .filter(|r| repeatable::state(r, recorded) != RepeatableState::Applied)
            .collect()
    }

    /// The lint of what `up` would run (`plan`, then `stale`), knowing the live columns when
    /// there is something: refused unless allowed, the rest told to `observer`.
    async fn lint_before_up(
        &self,
        plan: &[&Migration],
        stale: &[&Repeatable],
        observer: &mut (dyn FnMut(&MigrateEvent) + Send),
    ) -> Result<(), MigrateError> {
        let live = self
            .live_columns(!plan.is_empty() || !stale.is_empty())
            .await?;
        super::lint::check_before_up(plan, stale, live, self.options.allow_unsafe, observer)
    }

    /// Runs the stale repeatable migrations under the lock, after the versioned ones (`done`)
    /// committed, each in a transaction of its own with its row.
    async fn run_repeatables(
        &self,
        lock: &MigrationLock,
        status: &StatusReport,
        options: &UpOptions,
        done: &[RunEntry],
        observer: &mut (dyn FnMut(&MigrateEvent) + Send),
    ) -> Result<Vec<RepeatableRun>, MigrateError> {
        let recorded = self.recorded_repeatables(lock.client()).await?;
        let stale = self.stale_repeatables(status, options, &recorded);
        if stale.is_empty() {
            return Ok(Vec::new());
        }
        let schema = self.db.schema();
        repeatable::create_table(lock.client(), schema).await?;
        let mut ran = Vec::with_capacity(stale.len());
        for r in stale {
            observer(&MigrateEvent::RepeatableStarted {
                name: r.name.clone(),
                transactional: r.transactional,
            });
            let took = repeatable::run(
                lock.client(),
                schema,
                r,
                &self.session_reset(lock.acting_as(), true),
            )
            .await
            .map_err(|(cause, failed)| {
                // Located in its file as a versioned migration's failure is (found by a user
                // trial: only the file was named).
                let statements_done = match failed {
                    repeatable::Failed::Statement(done) => Some(Some(done)),
                    repeatable::Failed::Script => Some(None),
                    repeatable::Failed::Bookkeeping => None,
                };
                let location = statements_done
                    .map(|done| super::location::locate_in(&r.path, &r.sql, 1, &cause, done, None));
                MigrateError::RepeatableFailed {
                    name: r.name.clone(),
                    path: r.path.clone(),
                    line: location
                        .as_ref()
                        .and_then(|l| l.line)
                        .and_then(|l| u32::try_from(l).ok()),
                    statement: location
                        .and_then(|l| l.statement)
                        .map(String::into_boxed_str),
                    transactional: r.transactional,
                    cause,
                    applied: done.iter().map(|e| e.version.clone()).collect(),
                }
            })?;
            let duration_ms = super::report::millis(took);
            observer(&MigrateEvent::RepeatableFinished {
                name: r.name.clone(),
                duration_ms,
            });
            ran.push(RepeatableRun {
                name: r.name.clone(),
                transactional: r.transactional,
                duration_ms: Some(duration_ms),
            });
        }
        Ok(ran)
    }

    /// Reverts applied migrations, newest first; see [`down_with`](Self::down_with).
    pub async fn down(&self, options: &DownOptions) -> Result<DownReport, MigrateError> {
        self.down_with(options, &mut ignore).await
    }

    /// Reverts `options.steps` applied migrations (or all newer than `options.to`), newest
    /// first. Refuses, before running anything, to cross a migration without a down script
    /// ([`MigrateError::NoDown`]) or without a file. Transactional downs run in one transaction.
    pub async fn down_with(
        &self,
        options: &DownOptions,
        observer: &mut (dyn FnMut(&MigrateEvent) + Send),
    ) -> Result<DownReport, MigrateError> {
        let (mut lock, history) = self.lock(observer, false).await?;
        let report = self.revert(&mut lock, &history, options, observer).await;
        lock.release_after(report).await
    }

    /// Reverts the newest applied migration and applies it again (checks that its down script
    /// really undoes it), under one lock.
    pub async fn redo(&self) -> Result<RedoReport, MigrateError> {
        self.redo_with(&mut ignore).await
    }

    /// [`redo`](Self::redo) with an observer.
    ///
    /// The migration's up script is [linted](mod@super::lint) as `up` lints it, before the down
    /// runs (refused then, the migration would stay reverted): an error-level finding refuses
    /// the call with [`MigrateError::Unsafe`] unless allowed, the others go to `observer`.
    /// What the columns are after the down is not known before it, so the catalog is not
    /// asked: a type change that keeps the stored values is a finding here, as in
    /// [`lint`](super::lint::lint).
    pub async fn redo_with(
        &self,
        observer: &mut (dyn FnMut(&MigrateEvent) + Send),
    ) -> Result<RedoReport, MigrateError> {
        let (mut lock, history) = self.lock(observer, false).await?;
        let result = async {
            // What `down` checks (drift, a down script, the lint), without running it yet;
            // first, so that a migration without a down script is said as such rather than
            // after a lint finding on its up script (found by a user trial).
            let planned = DownOptions {
                dry_run: true,
                ..DownOptions::default()
            };
            // Both lints read the down script (an up's failure is undone with it): each
            // finding is said once (found by a user trial: twice).
            let mut said = std::collections::HashSet::new();
            let mut once = |event: &MigrateEvent| {
                if let MigrateEvent::Lint { finding, .. } = event {
                    if !said.insert(finding.to_string()) {
                        return;
                    }
                }
                observer(event);
            };
            let checked = self
                .revert(&mut lock, &history, &planned, &mut once)
                .await?;
            let plan: Vec<&Migration> = checked
                .migrations
                .iter()
                .filter_map(|e| self.migrations.get(&e.version))
                .collect();
            super::lint::check_before_up(
                &plan,
                &[],
                super::lint::LiveColumns::default(),
                self.options.allow_unsafe,
                &mut once,
            )?;
            let current_version = history.rows.iter().rev().nth(1).map(|r| r.version.clone());
            let down = |migrations| DownReport {
                dry_run: false,
                migrations,
                current_version,
                ..checked
            };
            if let [m] = plan[..] {
                if transactional(m, Direction::Down) && transactional(m, Direction::Up) {
                    let (reverted, applied) =
                        self.redo_in_one_transaction(&mut lock, m, observer).await?;
                    return Ok((down(reverted), true, applied));
                }
            }
            // A script outside a transaction: the down commits before the up runs, and a
            // failing up says so ([`MigrationFailure::reverted_first`]).
            let (reverted, _) = self
                .run(&mut lock, &plan, Direction::Down, true, observer)
                .await?;
            let (done, atomic) = match self
                .run(&mut lock, &plan, Direction::Up, true, observer)
                .await
            {
                Err(MigrateError::Failed(mut f)) => {
                    f.rolled_back = false;
                    f.reverted_first = Some(f.version.clone());
                    return Err(MigrateError::Failed(f));
                }
                done => done?,
            };
            Ok((down(reverted), atomic, done))
        }
        .await;
        let (down, atomic, done) = lock.release_after(result).await?;
        let up = UpReport {
            schema: self.schema(),
            dry_run: false,
            atomic,
            migrations: done,
            current_version: history.current_version(&self.migrations),
            // A redo is of the newest versioned migration alone.
            repeatables: Vec::new(),
        };
        Ok(RedoReport { down, up })
    }

    /// `m`'s down script then its up script, each with its history write, in one transaction
    /// (each in a savepoint, as a group runs): a failing up takes the down back with it (found
    /// by a user trial: the down committed, the up failed on what the down had not dropped,
    /// and the history said pending over a schema that still held it). Returns what each ran.
    async fn redo_in_one_transaction(
        &self,
        lock: &mut MigrationLock,
        m: &Migration,
        observer: &mut (dyn FnMut(&MigrateEvent) + Send),
    ) -> Result<(Vec<RunEntry>, Vec<RunEntry>), MigrateError> {
        self.check_interrupt(&[])?;
        let reset = self.session_reset(lock.acting_as(), true);
        let conn: &mut Client = lock;
        let mut tx = conn.transaction().await?;
        let reverted = self
            .run_group(&mut tx, &reset, &[m], Direction::Down, false, observer)
            .await
            .map_err(|e| self.rolled_back_whole(&[m], Direction::Down, e))?;
        let applied = self
            .run_group(&mut tx, &reset, &[m], Direction::Up, false, observer)
            .await
            .map_err(|e| self.rolled_back_whole(&[m], Direction::Up, e))?;
        tx.commit().await?;
        Ok((reverted, applied))
    }

    /// The error of `group`, rolled back whole after it failed at its migration `i`.
    fn rolled_back_whole(
        &self,
        group: &[&Migration],
        direction: Direction,
        (i, error): GroupError,
    ) -> MigrateError {
        match error {
            StepError::Other(e) => e,
            StepError::Script {
                cause,
                lock_retries,
                at,
                ..
            } => MigrateError::Failed(Box::new(MigrationFailure {
                rolled_back: true,
                rolled_back_with: group[..i].iter().map(|m| m.version.clone()).collect(),
                lock_retries,
                interrupted: self.cancelled_by_interrupt(&cause),
                ..failure(
                    group[i],
                    direction,
                    cause,
                    None,
                    at,
                    self.db.schema().as_str(),
                )
            })),
        }
    }

    /// Records every migration of the source with a version ≤ `version` as applied, without
    /// running it: adopts a database whose schema was made before svcdb managed it. Versions
    /// already recorded are left alone. Refused, as `up` refuses, on a dirty schema: svcdb's
    /// own dirty row ([`MigrateError::Dirty`]), or, while svcdb has applied nothing, another
    /// tool's history marking a version dirty or failed ([`MigrateError::OtherToolApplied`]).
    pub async fn baseline(&self, version: &Version) -> Result<BaselineReport, MigrateError> {
        let (lock, history) = self.lock(&mut ignore, true).await?;
        let result = async {
            let rows: Vec<(&Migration, Option<Duration>)> = self
                .baseline_plan(lock.client(), &history, version)
                .await?
                .into_iter()
                .map(|m| (m, None))
                .collect();
            if !history.exists {
                history::create_table(lock.client(), self.db.schema()).await?;
            }
            history::insert(lock.client(), self.db.schema(), &rows, false).await?;
            Ok(rows)
        }
        .await;
        let rows = lock.release_after(result).await?;
        Ok(BaselineReport {
            schema: self.schema(),
            dry_run: false,
            locked: false,
            recorded: rows.iter().map(|(m, _)| planned(m)).collect(),
        })
    }

    /// What [`Self::baseline`] would record, refused as it would be, without writing anything
    /// or taking the lock (found by a user trial: `adopt` and `down` had a dry run, `baseline`,
    /// which writes the history as `adopt` does, had none).
    pub async fn baseline_dry_run(
        &self,
        version: &Version,
    ) -> Result<BaselineReport, MigrateError> {
        let conn = self.db.get().await?;
        let client: &Client = &conn;
        // A schema `baseline` would create (SVCDB_CREATE_SCHEMA) has no history yet.
        let history = match history::read(client, self.db.schema(), true).await {
            Err(e) if e.code() == Some(&crate::error::SqlState::INVALID_SCHEMA_NAME) => {
                History::default()
            }
            read => read?,
        };
        let recorded = self
            .baseline_plan(client, &history, version)
            .await?
            .into_iter()
            .map(planned)
            .collect();
        // Found by a user trial: while another runner migrated, the dry run listed what the
        // real run would find applied by then (and would wait for first).
        let held = format!(
            "SELECT {}",
            super::lock::held_by_another_sql(self.db.schema())
        );
        let locked: bool = client.query_one(&held, &[]).await?.get(0);
        Ok(BaselineReport {
            schema: self.schema(),
            dry_run: true,
            locked,
            recorded,
        })
    }

    /// The migrations [`Self::baseline`] records, or why it refuses.
    async fn baseline_plan(
        &self,
        client: &Client,
        history: &History,
        version: &Version,
    ) -> Result<Vec<&Migration>, MigrateError> {
        if let Some(dirty) = history.rows.iter().find(|r| r.dirty) {
            return Err(MigrateError::Dirty {
                schema: self.schema(),
                version: dirty.version.clone(),
                name: dirty.name.clone(),
            });
        }
        MigrateError::check_known(
            &self.schema(),
            version,
            self.migrations.iter().map(|m| &m.version),
            false,
        )?;
        if history.rows.is_empty() {
            // Found by a user trial: over golang-migrate's dirty version 5, `baseline 4`
            // recorded 1-4 and said nothing, and `up` would have run 5 over its half.
            let others = adopt::other_histories(client, self.db.schema()).await?;
            let over = adopt::applied_by_other_tool(client, self.db.schema(), &others).await?;
            if let Some(other) = over.filter(|o| !o.dirty.is_empty()) {
                return Err(MigrateError::OtherToolApplied {
                    schema: self.schema(),
                    other,
                });
            }
        }
        Ok(self
            .migrations
            .iter()
            .filter(|m| m.version <= *version && history.get(&m.version).is_none())
            .collect())
    }

    /// Deletes dirty history rows (so those migrations count as pending again; fix the schema
    /// by hand first) and records the current checksum of changed applied files. One
    /// transaction; each action is reported. It also names every invalid index of the schema
    /// (what a failed `CREATE INDEX CONCURRENTLY` leaves) with the statement that drops it,
    /// and drops none: [`RepairReport::invalid_indexes`]. It clears no dirty mark while such
    /// an index exists ([`MigrateError::InvalidIndexes`]), nor one of a migration the source
    /// does not ship ([`MigrateError::NewerDirty`]): nothing is changed then.
    pub async fn repair(&self) -> Result<RepairReport, MigrateError> {
        let (mut lock, history) = self.lock(&mut ignore, false).await?;
        let result = self.repair_locked(&mut lock, &history).await;
        let (actions, invalid_indexes) = lock.release_after(result).await?;
        Ok(RepairReport {
            schema: self.schema(),
            actions,
            invalid_indexes,
        })
    }

    /// [`repair`](Self::repair)'s work under the lock: the actions, and the invalid indexes.
    async fn repair_locked(
        &self,
        lock: &mut MigrationLock,
        history: &History,
    ) -> Result<(Vec<RepairAction>, Vec<InvalidIndex>), MigrateError> {
        let schema = self.db.schema();
        // Found by an adversarial trial: run from an older release's folder, repair deleted a
        // newer release's dirty row (whose work stayed half-applied), and the hint's
        // `baseline` then had no file to record. A dirty row is repaired by the release that
        // ships it.
        if let Some(row) = history
            .rows
            .iter()
            .find(|r| r.dirty && self.migrations.get(&r.version).is_none())
        {
            return Err(MigrateError::NewerDirty {
                schema: self.schema(),
                version: row.version.clone(),
                name: row.name.clone(),
            });
        }
        // And with an index a cut-short `CREATE INDEX CONCURRENTLY` left invalid, clearing the
        // mark let the next `up` take it for built (`IF NOT EXISTS`): the schema then passed
        // every check with an index that never worked.
        if history.rows.iter().any(|r| r.dirty) {
            let invalid = invalid_indexes(lock.client(), schema).await?;
            if !invalid.is_empty() {
                return Err(MigrateError::InvalidIndexes {
                    schema: self.schema(),
                    indexes: invalid,
                });
            }
        }
        // A changed file whose name is not the history's is most likely another service's
        // folder (found by a user trial: `--dir` of the catalog's migrations on the orders
        // schema, and repair recorded the catalog's checksums, making every orders replica
        // unready). Nothing is recorded then.
        StatusReport::build(&self.schema(), &self.migrations, history)
            .refuse_foreign_folder("repair records nothing")?;
        let mut actions = Vec::new();
        let tx = lock.transaction().await?;
        for row in &history.rows {
            if row.dirty {
                history::delete(&tx, schema, &[&row.version]).await?;
                actions.push(RepairAction::ClearedDirty {
                    version: row.version.clone(),
                    name: row.name.clone(),
                });
            } else if let Some(m) = self
                .migrations
                .get(&row.version)
                .filter(|m| m.checksum.to_hex() != row.checksum)
            {
                history::realign(&tx, schema, m).await?;
                actions.push(RepairAction::RealignedChecksum {
                    version: m.version.clone(),
                    name: m.name.clone(),
                    old: row.checksum.clone(),
                    new: m.checksum.to_hex(),
                });
            }
        }
        tx.commit().await?;
        Ok((actions, invalid_indexes(lock.client(), schema).await?))
    }

    /// Pending migrations up to `to`, after the drift and order checks.
    fn plan_up(
        &self,
        status: &StatusReport,
        to: Option<&Version>,
    ) -> Result<Vec<&Migration>, MigrateError> {
        status.check_drift(&self.options)?;
        if let Some(to) = to {
            MigrateError::check_known(
                &status.schema,
                to,
                status.entries.iter().map(|e| &e.version),
                true,
            )?;
        }
        let plan: Vec<&Migration> = status
            .pending()
            .filter(|e| to.is_none_or(|to| e.version <= *to))
            .filter_map(|e| self.migrations.get(&e.version))
            .collect();
        status.check_order(&plan, &self.options)?;
        if !plan.is_empty() {
            status.newer_dirty()?;
        }
        Ok(plan)
    }

    /// Takes the schema's lock, applies the session settings, creates the schema if
    /// configured to, and reads the history under the lock.
    async fn lock(
        &self,
        observer: &mut (dyn FnMut(&MigrateEvent) + Send),
        creates: bool,
    ) -> Result<(MigrationLock, History), MigrateError> {
        self.lock_on(Connecting::start(&self.db), observer, creates)
            .await
    }

    /// [`Self::lock`] on the connection `connecting` opens.
    async fn lock_on(
        &self,
        connecting: Connecting,
        observer: &mut (dyn FnMut(&MigrateEvent) + Send),
        creates: bool,
    ) -> Result<(MigrationLock, History), MigrateError> {
        let schema = self.db.schema();
        let acquire =
            MigrationLock::acquire_on(connecting, &self.db, self.options.lock_wait, || {
                observer(&MigrateEvent::WaitingForLock {
                    schema: schema.as_str().to_owned(),
                })
            });
        let mut lock = match &self.interrupt {
            Some(interrupt) => tokio::select! {
                lock = acquire => lock?,
                () = interrupt.wait() => return Err(MigrateError::Interrupted {
                    schema: schema.as_str().to_owned(),
                    done: Vec::new(),
                    dirty: None,
                }),
            },
            None => acquire.await?,
        };
        if let Some(interrupt) = &self.interrupt {
            // The backend a cancel must reach; one query, only for an interruptible run.
            let pid: i32 = lock
                .client()
                .query_one("SELECT pg_backend_pid()", &[])
                .await?
                .get(0);
            interrupt.set_backend(pid);
        }
        // client_connection_check_interval ([`CONNECTION_CHECK_MS`]; PostgreSQL 14+, set
        // through pg_settings so older servers skip it).
        let mut setup = format!(
            "SELECT set_config(name, '{CONNECTION_CHECK_MS}', false) FROM pg_settings WHERE name = 'client_connection_check_interval';
             {}",
            self.session_settings()
        );
        // Only a call that writes the history creates the schema: `down`, `redo` and `repair`
        // on a missing one have nothing to do, and a dry run changes nothing.
        if creates && self.db.config().create_schema {
            // Whether it is there before: a first deploy that fails whole takes it away again.
            let exists: bool = lock
                .client()
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
                    &[&schema.as_str()],
                )
                .await?
                .get(0);
            if !exists {
                setup.push_str(&format!(" CREATE SCHEMA IF NOT EXISTS {schema};"));
                lock.set_created_schema();
            }
        }
        lock.batch_execute(&setup).await?;
        // The role every script starts as ([`Self::session_reset`]).
        let role = super::owner::act_as_owner(lock.client(), schema, observer).await?;
        lock.set_acting_as(role);
        let mut history = history::read(lock.client(), schema, true).await?;
        if history.legacy {
            history::upgrade(lock.client(), schema).await?;
            history = history::read(lock.client(), schema, true).await?;
        }
        Ok((lock, history))
    }

    /// The session settings every script starts with, sent before the first and again after
    /// each: a script may change them for the rest of its session (pg_dump's
    /// `set_config('search_path', '', false)`, a `RESET statement_timeout`, a `RESET ROLE`, a
    /// `RESET ALL`), and the next migration must not run differently for having been deployed
    /// in the same `up`. The search path goes back to the one pinned at connect time, the role
    /// to the one the run works as (`role`, the schema's owner), the connection check to the
    /// runner's (PostgreSQL 14+), and `synchronous_commit` to what the run needs at that point
    /// (`on` for the deploy's last commit, which must flush everything before it: see
    /// [`Self::run`]).
    fn session_reset(&self, role: &str, synchronous_commit: bool) -> String {
        // One statement, not six: it follows every script of a deploy. The role is written
        // out: a script's `RESET ALL` clears any setting that could have kept it. The check
        // interval is skipped where the server does not know it (before 14): `current_setting`
        // with `missing_ok` is NULL there, and `set_config` of an unknown name would fail.
        format!(
            "SELECT {}, set_config('role', {}, false), set_config('synchronous_commit', '{}', false), \
             CASE WHEN current_setting('client_connection_check_interval', true) IS NOT NULL \
             THEN set_config('client_connection_check_interval', '{CONNECTION_CHECK_MS}', false) END;",
            self.session_setting_calls(),
            crate::ident::quote_literal(role),
            if synchronous_commit { "on" } else { "off" },
        )
    }

    /// The search path and timeouts of [`Self::session_reset`], set when the lock's session
    /// starts (before the runner works as the schema's owner, whose role the reset restores).
    fn session_settings(&self) -> String {
        format!("SELECT {};", self.session_setting_calls())
    }

    /// `set_config(…)` of the pinned search path and of the lock and statement timeouts.
    fn session_setting_calls(&self) -> String {
        let path: Vec<String> = self
            .db
            .config()
            .search_path()
            .iter()
            .map(|schema| schema.as_str().to_owned())
            .collect();
        format!(
            "set_config('search_path', '{}', false), {}, \
             set_config('statement_timeout', '{}ms', false)",
            // Identifiers hold only `[a-z0-9_$]`: nothing to escape in the literal.
            path.join(","),
            self.lock_timeout_call(),
            server_millis(self.options.statement_timeout.unwrap_or_default()),
        )
    }

    /// `set_config(…)` of svcdb's `lock_timeout` for the session.
    fn lock_timeout_call(&self) -> String {
        format!(
            "set_config('lock_timeout', '{}ms', false)",
            server_millis(self.options.lock_timeout)
        )
    }

    /// Reverts what `options` selects (under the caller's lock).
    async fn revert(
        &self,
        lock: &mut MigrationLock,
        history: &History,
        options: &DownOptions,
        observer: &mut (dyn FnMut(&MigrateEvent) + Send),
    ) -> Result<DownReport, MigrateError> {
        let status = StatusReport::build(&self.schema(), &self.migrations, history);
        status.check_drift(&self.options)?;
        status.newer_dirty()?;
        if let Some(to) = &options.to {
            MigrateError::check_known(
                &self.schema(),
                to,
                self.migrations
                    .iter()
                    .map(|m| &m.version)
                    .chain(history.rows.iter().map(|r| &r.version)),
                true,
            )?;
        }
        let applied = history.rows.iter().rev();
        let targets: Vec<_> = match &options.to {
            Some(to) => applied.take_while(|r| r.version > *to).collect(),
            None => applied.take(options.steps).collect(),
        };
        let mut plan = Vec::with_capacity(targets.len());
        for row in targets {
            let m =
                self.migrations
                    .get(&row.version)
                    .ok_or_else(|| MigrateError::MissingToRevert {
                        version: row.version.clone(),
                        name: row.name.clone(),
                    })?;
            if m.down.is_none() {
                let down_at = super::source::down_script_place(&m.path, m.up_line);
                return Err(MigrateError::NoDown {
                    version: m.version.clone(),
                    path: m.path.clone(),
                    // A two-file layout's down file that is there: empty (found by a user
                    // trial on vaultwarden's diesel folder, told there was none).
                    empty: std::path::Path::new(&down_at).is_file(),
                    down_at,
                    newer: plan.len(),
                });
            }
            plan.push(m);
        }
        // What would make a down script fail, or stop half-way, is said before anything runs
        // (so that `--dry-run` shows it), and refused where it would block an up.
        super::lint::enforce(
            plan.iter()
                .flat_map(|m| super::lint::lint_down(m))
                .collect(),
            self.options.allow_unsafe,
            observer,
        )?;
        let migrations = if options.dry_run {
            plan.iter().map(|m| planned(m)).collect()
        } else {
            self.run(lock, &plan, Direction::Down, true, observer)
                .await?
                .0
        };
        let reverted_all = !options.dry_run;
        let current_version = history
            .rows
            .iter()
            .rev()
            .map(|r| &r.version)
            .find(|v| !(reverted_all && plan.iter().any(|m| m.version == **v)))
            .cloned();
        Ok(DownReport {
            schema: self.schema(),
            dry_run: options.dry_run,
            migrations,
            current_version,
        })
    }

    /// Runs `plan` in `direction`. Each run of consecutive transactional scripts is one group:
    /// one transaction, one history write; a group also ends after a script that adds an enum
    /// value, which the scripts after it may use only once it is committed, and a group that
    /// fails with 55006 at a later script ([`splits_at`]) runs again as two. When the whole
    /// plan is one group, that transaction also creates the history table, and a failure
    /// leaves the schema exactly as it was. Otherwise the groups and the non-transactional
    /// scripts between them run in order, and when one fails (its group rolled back, or a
    /// non-transactional script left dirty) the ups this call committed before it are undone
    /// with their downs, newest first. Returns what ran, and whether it ran as one
    /// transaction (what a report calls atomic: known only once it ran, as a group may split).
    async fn run(
        &self,
        lock: &mut MigrationLock,
        plan: &[&Migration],
        direction: Direction,
        history_exists: bool,
        observer: &mut (dyn FnMut(&MigrateEvent) + Send),
    ) -> Result<(Vec<RunEntry>, bool), MigrateError> {
        let schema = self.db.schema();
        if plan.is_empty() {
            // Another runner applied everything while we waited for the lock.
            return Ok((Vec::new(), false));
        }
        let reset = self.session_reset(lock.acting_as(), true);
        let reset = reset.as_str();
        // The reset of the scripts before the last segment, which commit without waiting.
        let deferred = self.session_reset(lock.acting_as(), false);
        let conn: &mut Client = lock;
        // A group also ends after a migration that adds an enum value: the ones after it may
        // use the value, which its transaction cannot before it commits.
        let mut segments: VecDeque<&[&Migration]> = plan
            .chunk_by(|a, b| {
                transactional(a, direction)
                    && transactional(b, direction)
                    && !adds_enum_value(script(a, direction).0)
            })
            .collect();
        self.check_interrupt(&[])?;
        if segments.len() == 1 && transactional(plan[0], direction) {
            match self
                .run_group(conn, reset, plan, direction, !history_exists, observer)
                .await
            {
                Ok(entries) => return Ok((entries, true)),
                // Rolled back whole: run it again as two groups, below.
                Err((i, StepError::Script { ref cause, .. })) if splits_at(cause, i) => {
                    segments = VecDeque::from([&plan[..i], &plan[i..]]);
                }
                Err(e) => return Err(self.rolled_back_whole(plan, direction, e)),
            }
        }
        // Only the deploy's last commit waits for its WAL to reach the disk; the groups and
        // non-transactional statements before it commit with `synchronous_commit = off` (on
        // this dedicated connection, closed after the run). A commit that waits flushes all
        // the WAL written before it, so when the last one returns, everything is on disk, as
        // with a flush per commit. A crash in between loses at most the latest commits: WAL
        // is replayed in order, so what survives is always a prefix of the deploy, each group
        // whole with its history rows, and a non-transactional script never without the dirty
        // mark written before it. That is the state a crash at that earlier point would have
        // left, which the runner already handles (a group is pending, a dirty row refuses the
        // next run until `repair`). Before a failure is reported, what it says is applied is
        // made durable too ([`flush`]). What the earlier commits make visible to other sessions
        // before it is on disk is only ever an intermediate version of this deploy: a replica
        // whose start-up gate waits for the newest one waits for the last, flushed, commit.
        // Whether the session's commits wait for the disk: on, as the connection starts.
        let mut waits = true;
        if !history_exists {
            history::create_table(&*conn, schema).await?;
        }
        let mut done: Vec<RunEntry> = Vec::with_capacity(plan.len());
        while let Some(segment) = segments.pop_front() {
            if let Err(interrupted) = self.check_interrupt(&done) {
                // The commits so far went without waiting for the disk: they are done.
                flush(conn).await;
                return Err(interrupted);
            }
            let last = segments.is_empty();
            if last != waits {
                let set = if last { "on" } else { "off" };
                conn.batch_execute(&format!("SET synchronous_commit = {set}"))
                    .await?;
                waits = last;
            }
            let segment_reset = if last { reset } else { deferred.as_str() };
            let result = if transactional(segment[0], direction) {
                self.run_group(conn, segment_reset, segment, direction, false, observer)
                    .await
            } else {
                self.step(conn, segment_reset, segment[0], direction, observer)
                    .await
                    .map(|entry| vec![entry])
                    .map_err(|e| (0, e))
            };
            let (i, cause, statements_done, at, lock_retries) = match result {
                Ok(entries) => {
                    done.extend(entries);
                    continue;
                }
                // The group was rolled back whole: run it again as two.
                Err((i, StepError::Script { ref cause, .. }))
                    if transactional(segment[0], direction) && splits_at(cause, i) =>
                {
                    segments.push_front(&segment[i..]);
                    segments.push_front(&segment[..i]);
                    continue;
                }
                Err((_, StepError::Other(MigrateError::Interrupted { schema, dirty, .. }))) => {
                    // Stopped where it stood: what is done stays done, and is on disk.
                    flush(conn).await;
                    return Err(MigrateError::Interrupted {
                        schema,
                        done: done.iter().map(|e| e.version.clone()).collect(),
                        dirty,
                    });
                }
                Err((_, StepError::Other(e))) => return Err(e),
                Err((
                    i,
                    StepError::Script {
                        cause,
                        statements_done,
                        at,
                        lock_retries,
                    },
                )) => (i, cause, statements_done, at, lock_retries),
            };
            let m = segment[i];
            let dirty = !transactional(m, direction)
                && self
                    .left_dirty(
                        conn,
                        m,
                        direction,
                        statements_done.unwrap_or(0),
                        Some(&cause),
                    )
                    .await;
            flush(conn).await;
            // Undo this deploy's ups unless the failing step left the schema in an unknown
            // state: running downs over a half-applied step would only make the mess bigger.
            // Nor after an interrupt, which asks to stop, not to start down scripts (found by
            // a trial: Ctrl-C ran nine of them, some outside a transaction, which a second
            // Ctrl-C could cut off half-way); what was committed stays, as when the interrupt
            // comes between two statements. Downs are never "undone" by running ups again.
            let interrupted = self.cancelled_by_interrupt(&cause);
            let (undone, undo_error, undo_left_dirty) =
                if direction == Direction::Up && !dirty && !interrupted {
                    self.undo(conn, reset, &done, observer).await
                } else {
                    (Vec::new(), None, None)
                };
            let applied: Vec<Version> = done
                .iter()
                .map(|e| e.version.clone())
                .filter(|v| !undone.contains(v) && undo_left_dirty.as_ref() != Some(v))
                .collect();
            if direction == Direction::Up
                && !history_exists
                && !dirty
                && undo_left_dirty.is_none()
                && applied.is_empty()
            {
                // Everything was undone: drop the history table this call created too, so the
                // schema is exactly as before. Best effort: an empty table is harmless if this
                // fails.
                let drop_table = history::drop_table_sql(schema);
                if let Err(e) = conn.batch_execute(&drop_table).await {
                    tracing::warn!(target: "svcdb::migrate", error = %crate::error::pg_message(&e), "cannot drop the history table");
                }
            }
            // Best effort: the failure is the news. A session the server ended (a restart, a
            // failover, `pg_terminate_backend` in a `CREATE INDEX CONCURRENTLY`) is asked
            // again on a pooled connection (found by a trial: the index it left went unnamed).
            let listed = match invalid_indexes(conn, schema).await {
                Err(_) if conn.is_closed() => match self.db.get().await {
                    Ok(pooled) => invalid_indexes(client(&pooled), schema).await,
                    Err(e) => Err(e.into()),
                },
                listed => listed,
            };
            let invalid_indexes = listed.unwrap_or_else(|e| {
                tracing::warn!(target: "svcdb::migrate", error = %e, "cannot list the schema's invalid indexes");
                Vec::new()
            });
            return Err(MigrateError::Failed(Box::new(MigrationFailure {
                applied,
                undone,
                undo_error,
                undo_left_dirty,
                dirty,
                invalid_indexes,
                rolled_back_with: segment[..i].iter().map(|m| m.version.clone()).collect(),
                lock_retries,
                interrupted,
                ..failure(m, direction, cause, statements_done, at, schema.as_str())
            })));
        }
        Ok((done, false))
    }

    /// Runs `group` (transactional scripts) and its history change in one transaction, which
    /// also creates the history table with `create_table`. When a script hits `lock_timeout`,
    /// the transaction is rolled back and the whole group runs again, at most
    /// [`MigrateOptions::lock_retries`] times. On a failure nothing of the group stays.
    async fn run_group(
        &self,
        conn: &mut (impl GenericClient + Send),
        reset: &str,
        group: &[&Migration],
        direction: Direction,
        create_table: bool,
        observer: &mut (dyn FnMut(&MigrateEvent) + Send),
    ) -> Result<Vec<RunEntry>, GroupError> {
        let mut retries = 0;
        loop {
            match self
                .try_group(conn, group, direction, create_table, reset, observer)
                .await
            {
                Err((i, StepError::Script { cause, .. }))
                    if is_lock_timeout(&cause) && retries < self.options.lock_retries =>
                {
                    retries += 1;
                    if self
                        .pause_before_retry(group[i], direction, None, retries, observer)
                        .await
                    {
                        // The group's transaction is rolled back: nothing of it stays.
                        return Err((
                            i,
                            StepError::Other(MigrateError::Interrupted {
                                schema: self.schema(),
                                done: Vec::new(),
                                dirty: None,
                            }),
                        ));
                    }
                }
                Err((
                    i,
                    StepError::Script {
                        cause,
                        statements_done,
                        at,
                        ..
                    },
                )) => {
                    return Err((
                        i,
                        StepError::Script {
                            cause,
                            statements_done,
                            at,
                            lock_retries: retries,
                        },
                    ))
                }
                other => return other,
            }
        }
    }

    /// One non-transactional script with its bookkeeping: the row is marked dirty first, the
    /// statements run one by one (a multi-statement message would be one implicit
    /// transaction), then the mark is cleared (up) or the row deleted (down); a failure in
    /// between leaves the dirty mark (taken back by [`Self::unmark_untouched`] when nothing ran). A statement that hits `lock_timeout` changed nothing
    /// and runs again, at most [`MigrateOptions::lock_retries`] times, unless the schema now
    /// holds an invalid index (see the option).
    async fn step(
        &self,
        conn: &mut Client,
        reset: &str,
        m: &Migration,
        direction: Direction,
        observer: &mut (dyn FnMut(&MigrateEvent) + Send),
    ) -> Result<RunEntry, StepError> {
        let schema = self.db.schema();
        let (sql, _) = script(m, direction);
        match direction {
            Direction::Up => history::insert(&*conn, schema, &[(m, None)], true).await?,
            Direction::Down => history::set_dirty(&*conn, schema, &m.version, true, None).await?,
        }
        let start = started(m, direction, observer);
        let statements = statements_to_run(sql);
        let mut own_bound = OwnBound::default();
        for (done, &statement) in statements.iter().enumerate() {
            if self.interrupt.as_ref().is_some_and(Interrupt::take) {
                // Between two statements: none of this one ran.
                return Err(self.stopped_in(conn, m, direction, done).await);
            }
            if !self.lifts_lock_timeout(statement) || own_bound.set_before(&statements, done) {
                self.statement_with_retries(conn, m, direction, done, statement, observer)
                    .await?;
                continue;
            }
            // Sent together (`biased`: in this order), one round trip: the lift cannot fail
            // but with the connection, which fails the statement too.
            let (lifted, ran) = tokio::join!(
                biased;
                conn.batch_execute("SET lock_timeout = 0"),
                self.statement_with_retries(conn, m, direction, done, statement, observer)
            );
            let last = done + 1 == statements.len();
            if ran.is_err() || !last {
                // Put back for the statements after it, and on a failure too: the undo of
                // the deploy's earlier ups, on this session, must run under svcdb's bound.
                // After the last one the session reset below puts it back.
                let restored = conn
                    .batch_execute(&format!("SELECT {}", self.lock_timeout_call()))
                    .await;
                if ran.is_ok() {
                    restored?;
                }
            }
            ran?;
            lifted.map_err(|cause| StepError::Script {
                cause,
                statements_done: Some(done + 1),
                at: None,
                lock_retries: 0,
            })?;
        }
        let took = start.elapsed();
        conn.batch_execute(reset).await?;
        match direction {
            Direction::Up => {
                history::set_dirty(&*conn, schema, &m.version, false, Some(took)).await?
            }
            Direction::Down => history::delete(&*conn, schema, &[&m.version]).await?,
        }
        // The duration recorded in the history, so that `status` and the progress line agree.
        Ok(finished(m, direction, took, observer))
    }

    /// Runs `statement`, number `done + 1` of non-transactional `m`: again after a lock timeout,
    /// at most [`MigrateOptions::lock_retries`] times, unless the schema now holds an invalid
    /// index.
    async fn statement_with_retries(
        &self,
        conn: &Client,
        m: &Migration,
        direction: Direction,
        done: usize,
        statement: &str,
        observer: &mut (dyn FnMut(&MigrateEvent) + Send),
    ) -> Result<(), StepError> {
        let mut retries = 0;
        while let Err(cause) = self.interruptible(conn.batch_execute(statement)).await {
            let retry = retries < self.options.lock_retries
                && is_lock_timeout(&cause)
                && invalid_indexes(conn, self.db.schema())
                    .await
                    .is_ok_and(|found| found.is_empty());
            if !retry {
                return Err(StepError::Script {
                    cause,
                    statements_done: Some(done),
                    at: None,
                    lock_retries: retries,
                });
            }
            retries += 1;
            if self
                .pause_before_retry(m, direction, Some(done + 1), retries, observer)
                .await
            {
                // As between two statements: the one that timed out changed nothing.
                return Err(self.stopped_in(conn, m, direction, done).await);
            }
        }
        Ok(())
    }

    /// Whether `statement` of a non-transactional script runs without svcdb's own
    /// `lock_timeout`: when it is one of the `CONCURRENTLY` statements whose waits for older
    /// transactions block nobody ([`waits_out_older_transactions`]), so that another service's
    /// long transaction in the same database does not cut it short and leave an invalid index
    /// (found by a user trial: two services deploying at once). Only svcdb's own bound: a
    /// script that set `lock_timeout` itself before it keeps its value ([`OwnBound`]), and
    /// `statement_timeout` still applies.
    fn lifts_lock_timeout(&self, statement: &str) -> bool {
        server_millis(self.options.lock_timeout) != 0 && waits_out_older_transactions(statement)
    }

    /// The interrupt stopped non-transactional `m` after `statements_done` of its statements
    /// (between two, or in the pause before a lock retry): what ran stays, and `m` is dirty
    /// when anything did ([`Self::left_dirty`]).
    async fn stopped_in(
        &self,
        conn: &Client,
        m: &Migration,
        direction: Direction,
        statements_done: usize,
    ) -> StepError {
        let dirty = self
            .left_dirty(conn, m, direction, statements_done, None)
            .await;
        StepError::Other(MigrateError::Interrupted {
            schema: self.schema(),
            done: Vec::new(),
            dirty: dirty.then(|| m.version.clone()),
        })
    }

    /// Whether non-transactional `m`, stopped after `statements_done` of its statements (by
    /// `cause`, when a statement failed), is left dirty: after one or more, yes; before the
    /// first, not if its mark can be taken back ([`Self::unmark_untouched`]).
    ///
    /// When the server ended the session in the first statement (`pg_terminate_backend`, a
    /// fast shutdown or a crash of another backend: SQLSTATE 57P01, 57P02, the statement's
    /// own answer, so the server rolled it back) the mark cannot be taken back on the lost
    /// connection: it is, on a new one under the migration lock, if that lock is free within
    /// [`RELOCK_WAIT`] (found by a user trial: after a failover, every replica was refused
    /// the dirty schema until someone ran `repair`). A runner that took the lock meanwhile
    /// has seen the mark and refused; a connection cut without an answer leaves the mark,
    /// since the statement may have committed just before.
    async fn left_dirty(
        &self,
        conn: &Client,
        m: &Migration,
        direction: Direction,
        statements_done: usize,
        cause: Option<&tokio_postgres::Error>,
    ) -> bool {
        if statements_done > 0 {
            return true;
        }
        if self.unmark_untouched(conn, m, direction).await {
            return false;
        }
        let ended_by_server = cause.and_then(|c| c.code()).is_some_and(|code| {
            *code == crate::error::SqlState::ADMIN_SHUTDOWN
                || *code == crate::error::SqlState::CRASH_SHUTDOWN
        });
        if !ended_by_server {
            return true;
        }
        let Ok(lock) = MigrationLock::acquire(&self.db, RELOCK_WAIT, || {}).await else {
            return true;
        };
        let unmarked = super::owner::act_as_owner(lock.client(), self.db.schema(), &mut |_| {})
            .await
            .is_ok()
            && self.unmark_untouched(lock.client(), m, direction).await;
        let _ = lock.release().await;
        !unmarked
    }

    /// After non-transactional `m` failed at its first statement: PostgreSQL ran that statement
    /// on its own, so it changed nothing, unless it was one of those that commit part-way
    /// (`CREATE INDEX CONCURRENTLY` and its kin, which leave an invalid index behind). When the
    /// schema holds no invalid index the dirty mark is taken back, as if `m` had not been
    /// started: an up's row is deleted, a down's row is applied again. True when it was; on
    /// any doubt (an invalid index, a query that failed) the mark stays.
    async fn unmark_untouched(&self, conn: &Client, m: &Migration, direction: Direction) -> bool {
        let schema = self.db.schema();
        if !invalid_indexes(conn, schema)
            .await
            .is_ok_and(|found| found.is_empty())
        {
            return false;
        }
        let unmarked = match direction {
            Direction::Up => history::delete(conn, schema, &[&m.version]).await,
            Direction::Down => history::set_dirty(conn, schema, &m.version, false, None).await,
        };
        unmarked.is_ok()
    }

    /// Reports retry `attempt` after a lock timeout and waits before it: the backoff doubled
    /// per earlier retry, plus up to as much again at random. True when the interrupt came
    /// during the wait: the run is to stop there.
    async fn pause_before_retry(
        &self,
        m: &Migration,
        direction: Direction,
        statement: Option<usize>,
        attempt: u32,
        observer: &mut (dyn FnMut(&MigrateEvent) + Send),
    ) -> bool {
        let backoff = self
            .options
            .lock_retry_backoff
            .saturating_mul(2u32.saturating_pow(attempt - 1));
        let delay = backoff.saturating_add(backoff.mul_f64(rand::random::<f64>()));
        observer(&MigrateEvent::LockRetry {
            version: m.version.clone(),
            name: m.name.clone(),
            direction,
            statement,
            attempt,
            retries: self.options.lock_retries,
            delay_ms: super::report::millis(delay),
        });
        // An interrupt during the pause stops the run there: nothing is running to cancel
        // (found by a trial: the pause ran out, the retry was cancelled, and the run
        // reported a cancelled statement, 57014, instead of the interrupt).
        match &self.interrupt {
            Some(interrupt) => tokio::select! {
                () = tokio::time::sleep(delay) => false,
                () = interrupt.wait() => {
                    interrupt.take();
                    true
                }
            },
            None => {
                tokio::time::sleep(delay).await;
                false
            }
        }
    }

    /// Runs the down scripts of `done` (this call's ups), newest first, stopping at the first
    /// that is missing or fails; returns the versions undone and why it stopped early.
    async fn undo(
        &self,
        conn: &mut Client,
        reset: &str,
        done: &[RunEntry],
        observer: &mut (dyn FnMut(&MigrateEvent) + Send),
    ) -> (Vec<Version>, Option<String>, Option<Version>) {
        let mut undone = Vec::new();
        for entry in done.iter().rev() {
            let Some(m) = self
                .migrations
                .get(&entry.version)
                .filter(|m| m.down.is_some())
            else {
                return (
                    undone,
                    Some(format!("migration {} has no down script", entry.version)),
                    None,
                );
            };
            let result = if m.down_transactional {
                self.run_group(conn, reset, &[m], Direction::Down, false, observer)
                    .await
                    .map_err(|(_, e)| e)
            } else {
                self.step(conn, reset, m, Direction::Down, observer)
                    .await
                    .map(|_| Vec::new())
            };
            let (failure, left_dirty) = match result {
                Ok(_) => {
                    undone.push(m.version.clone());
                    continue;
                }
                Err(StepError::Script {
                    cause,
                    statements_done,
                    ..
                }) => {
                    let dirty = !m.down_transactional
                        && self
                            .left_dirty(
                                conn,
                                m,
                                Direction::Down,
                                statements_done.unwrap_or(0),
                                Some(&cause),
                            )
                            .await;
                    (crate::error::pg_message(&cause), dirty)
                }
                Err(StepError::Other(e)) => (e.to_string(), false),
            };
            return (
                undone,
                Some(format!(
                    "the down script of migration {} failed: {failure}",
                    m.version
                )),
                left_dirty.then(|| m.version.clone()),
            );
        }
        (undone, None, None)
    }

    /// One try of [`Migrator::run_group`]: begin, every script, the history change, commit. A
    /// failing commit (a deferred constraint) is put on the group's last migration.
    async fn try_group(
        &self,
        conn: &mut (impl GenericClient + Send),
        group: &[&Migration],
        direction: Direction,
        create_table: bool,
        reset: &str,
        observer: &mut (dyn FnMut(&MigrateEvent) + Send),
    ) -> Result<Vec<RunEntry>, GroupError> {
        let schema = self.db.schema();
        let other = |e: MigrateError| (0, StepError::Other(e));
        // Dropping `tx` on any early return rolls back.
        let tx = conn.transaction().await.map_err(|e| other(e.into()))?;
        if create_table {
            history::create_table(&tx, schema).await.map_err(other)?;
        }
        // The scripts are pipelined: each statement is its own simple-query message, all sent
        // before the first answer is awaited, so the server runs them back to back instead of
        // waiting a round trip for the next one. Each message keeps its own answer, so a
        // failure is the failing statement's own error, whose file and line the failure names
        // even when the server gives no position (most errors past the parser: a missing
        // relation, a violated constraint); the server runs every later message in the
        // aborted transaction, which refuses it (25P02) and changes nothing. The statements
        // are found by PostgreSQL's own parser (`BEGIN ATOMIC` bodies and all); a script it
        // rejects goes whole, and the server reports where, as a position in the script.
        // After each script, the session reset (a message of its own; sent with a whole
        // script, after a line break and a `;`, so that a last statement without its `;`, or
        // a trailing `--` comment, does not take it in). A future of tokio-postgres sends its
        // message when first polled, hence one poll each, in order, before any is awaited.
        //
        // The answers of a pipeline arrive together, so the time between them here says
        // nothing of how long each script took (a user trial saw "done in 0.0 ms"): the
        // server's clock is read before the first script and with each reset, in the same
        // messages, and a script took the time between two readings.
        let pieces = pieces(group, direction, reset);
        type Answer<'t> = std::pin::Pin<
            Box<
                dyn std::future::Future<Output = Result<Option<f64>, tokio_postgres::Error>>
                    + Send
                    + 't,
            >,
        >;
        let mut pipeline: Vec<Answer<'_>> = pieces
            .iter()
            .map(|piece| -> Answer<'_> {
                if piece.reads_clock {
                    Box::pin(async {
                        let messages = tx.simple_query(&piece.sql).await?;
                        Ok(server_clock(&messages))
                    })
                } else {
                    Box::pin(async { tx.batch_execute(&piece.sql).await.map(|()| None) })
                }
            })
            .collect();
        let mut answered = Vec::with_capacity(pieces.len());
        for sent in &mut pipeline {
            answered.push(futures_util::future::poll_immediate(sent.as_mut()).await);
        }
        let mut done = Vec::with_capacity(group.len());
        // Each script starts, on the server, when the one before it ends.
        let mut start = started(group[0], direction, observer);
        let mut clock: Option<f64> = None;
        for ((sent, answer), piece) in pipeline.iter_mut().zip(answered).zip(&pieces) {
            let result = match answer {
                Some(result) => result,
                None => self.interruptible(sent.as_mut()).await,
            };
            let i = piece.migration;
            let read = result.map_err(|cause| {
                (
                    i,
                    StepError::Script {
                        cause,
                        statements_done: None,
                        at: piece.at.clone(),
                        lock_retries: 0,
                    },
                )
            })?;
            let before = clock;
            clock = read.or(clock);
            if piece.ends_script {
                let took = match (before, read) {
                    (Some(from), Some(to)) if to >= from => {
                        crate::config::saturating_secs_f64(to - from)
                    }
                    _ => start.elapsed(),
                };
                done.push(finished(group[i], direction, took, observer));
                if let Some(next) = group.get(i + 1) {
                    start = started(next, direction, observer);
                }
            }
        }
        drop(pipeline);
        let written = match direction {
            Direction::Up => {
                let rows: Vec<(&Migration, Option<Duration>)> = group
                    .iter()
                    .zip(&done)
                    .map(|(m, e)| {
                        (
                            *m,
                            e.duration_ms
                                .map(|ms| crate::config::saturating_secs_f64(ms / 1e3)),
                        )
                    })
                    .collect();
                history::insert(&tx, schema, &rows, false).await
            }
            Direction::Down => history::delete(&tx, schema, &versions(group)).await,
        };
        written.map_err(|e| {
            use tokio_postgres::error::SqlState;
            let gone = [SqlState::UNDEFINED_TABLE, SqlState::INVALID_SCHEMA_NAME];
            if e.code().is_some_and(|code| gone.contains(code)) {
                other(MigrateError::HistoryDropped {
                    schema: self.schema(),
                    direction,
                    versions: versions(group).into_iter().cloned().collect(),
                })
            } else {
                other(e.into())
            }
        })?;
        if self.interrupt.as_ref().is_some_and(Interrupt::take) {
            // Asked to stop, and no statement took the cancel (it reached the server between
            // two of them, which drops it): no commit; dropping `tx` rolls the group back.
            return Err((
                group.len() - 1,
                StepError::Other(MigrateError::Interrupted {
                    schema: self.schema(),
                    done: Vec::new(),
                    dirty: None,
                }),
            ));
        }
        // Deferred constraint triggers run in the commit: an interrupt cancels them too.
        self.interruptible(tx.commit())
            .await
            .map_err(|cause| (group.len() - 1, StepError::script(cause, None)))?;
        Ok(done)
    }
}

/// Whether a non-transactional script's statements so far set `lock_timeout` themselves
/// ([`may_change_lock_timeout`]; a trial found a script that set svcdb's very value lifted when
/// the server's setting was compared). Each statement is read once, and only when a later one
/// would lift the bound: parsing every statement of every such script would cost more.
#[derive(Default)]
struct OwnBound {
    /// The statements read so far.
    read: usize,
    set: bool,
}

impl OwnBound {
    /// Whether any of `statements[..i]` set the bound.
    fn set_before(&mut self, statements: &[&str], i: usize) -> bool {
        if !self.set {
            self.set = statements[self.read..i]
                .iter()
                .any(|s| may_change_lock_timeout(s));
            self.read = i;
        }
        self.set
    }
}

/// One message of a transactional group: a statement of a script (`at`: its bytes in the
/// script), a script the parser could not split, or the session reset after a script.
struct Piece<'a> {
    sql: Cow<'a, str>,
    /// The group's migration it belongs to.
    migration: usize,
    at: Option<Range<usize>>,
    /// Its answer is the end of the migration's script.
    ends_script: bool,
    /// It ends with [`CLOCK`], whose answer is the server's time.
    reads_clock: bool,
}

/// Reads the server's clock, in seconds since 1970, at the point of the pipeline it is sent.
const CLOCK: &str = "SELECT extract(epoch FROM clock_timestamp())";

/// The time [`CLOCK`] answered, the last row of `messages`.
fn server_clock(messages: &[tokio_postgres::SimpleQueryMessage]) -> Option<f64> {
    messages.iter().rev().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0)?.parse().ok(),
        _ => None,
    })
}

/// The messages [`Migrator::try_group`] sends for `group`, in order.
fn pieces<'a>(group: &[&'a Migration], direction: Direction, reset: &'a str) -> Vec<Piece<'a>> {
    let mut pieces = vec![Piece {
        sql: Cow::Borrowed(CLOCK),
        migration: 0,
        at: None,
        ends_script: false,
        reads_clock: true,
    }];
    // The reset, then the clock (after a line break and a `;`, as the reset after a whole
    // script, so that neither ends up in a trailing comment).
    let reset_and_clock = format!("{reset}\n;{CLOCK}");
    for (i, m) in group.iter().enumerate() {
        let sql = script(m, direction).0;
        match pg_query::split_with_parser(sql) {
            Ok(statements) if !statements.is_empty() => {
                for statement in statements {
                    // The parser's pieces are slices of the script.
                    let start = (statement.as_ptr() as usize)
                        .checked_sub(sql.as_ptr() as usize)
                        .filter(|&start| start + statement.len() <= sql.len());
                    pieces.push(Piece {
                        sql: Cow::Borrowed(statement),
                        migration: i,
                        at: start.map(|start| start..start + statement.len()),
                        ends_script: false,
                        reads_clock: false,
                    });
                }
                pieces.push(Piece {
                    sql: Cow::Owned(reset_and_clock.clone()),
                    migration: i,
                    at: None,
                    ends_script: true,
                    reads_clock: true,
                });
            }
            _ => pieces.push(Piece {
                sql: Cow::Owned(format!("{sql}\n;{reset_and_clock}")),
                migration: i,
                at: None,
                ends_script: true,
                reads_clock: true,
            }),
        }
    }
    pieces
}

/// A timeout as the server takes it: whole milliseconds in an `int`. Zero stays zero (no
/// limit); anything shorter than a millisecond is one (rounded down it would be no limit);
/// anything past `i32::MAX` ms (about 24 days), which the server would refuse, is the most it
/// takes.
fn server_millis(timeout: Duration) -> u128 {
    if timeout.is_zero() {
        0
    } else {
        timeout.as_millis().clamp(1, i32::MAX as u128)
    }
}

/// Turns `synchronous_commit` back on and waits until the WAL of every earlier commit of the
/// session is on disk: a commit that waits flushes all WAL before it, and a transaction with
/// an id writes a commit record even when it changed nothing. Best effort: it runs after a
/// failure, on a connection that may be broken.
async fn flush(conn: &Client) {
    if let Err(e) = conn
        .batch_execute("SET synchronous_commit = on; SELECT txid_current()")
        .await
    {
        tracing::warn!(target: "svcdb::migrate", error = %crate::error::pg_message(&e), "cannot flush the deploy's commits to disk");
    }
}

/// How long [`Migrator::left_dirty`] waits for the migration lock (and a server that is
/// starting again) to take back the mark of a migration whose session the server ended.
const RELOCK_WAIT: Duration = Duration::from_secs(5);

/// A statement waited longer than `lock_timeout` for a lock (SQLSTATE 55P03).
fn is_lock_timeout(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&crate::error::SqlState::LOCK_NOT_AVAILABLE)
}

fn versions<'a>(migrations: &[&'a Migration]) -> Vec<&'a Version> {
    migrations.iter().map(|m| &m.version).collect()
}

/// The script of `m` for `direction` and whether it runs in a transaction. `run` checked that
/// a down exists before planning it.
fn script(m: &Migration, direction: Direction) -> (&str, bool) {
    match direction {
        Direction::Up => (&m.up, m.transactional),
        Direction::Down => (m.down.as_deref().unwrap_or_default(), m.down_transactional),
    }
}

fn transactional(m: &Migration, direction: Direction) -> bool {
    script(m, direction).1
}

/// Whether a group that failed with `cause` at its migration `i` is to run again as two
/// groups, split before that migration: the failure is 55006 (`cannot ALTER TABLE … because
/// it has pending trigger events`: an earlier migration of the group wrote rows that a
/// `DEFERRABLE INITIALLY DEFERRED` foreign key checks at commit, as Django's are), which a
/// commit between the two clears, as every tool that commits each migration does.
fn splits_at(cause: &tokio_postgres::Error, i: usize) -> bool {
    i > 0 && cause.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE)
}

fn started(
    m: &Migration,
    direction: Direction,
    observer: &mut (dyn FnMut(&MigrateEvent) + Send),
) -> Instant {
    observer(&MigrateEvent::Started {
        version: m.version.clone(),
        name: m.name.clone(),
        direction,
        transactional: transactional(m, direction),
    });
    Instant::now()
}

/// Reports `m` finished, `took` after it started (the duration its history row records).
fn finished(
    m: &Migration,
    direction: Direction,
    took: Duration,
    observer: &mut (dyn FnMut(&MigrateEvent) + Send),
) -> RunEntry {
    let duration_ms = super::report::millis(took);
    observer(&MigrateEvent::Finished {
        version: m.version.clone(),
        name: m.name.clone(),
        direction,
        duration_ms,
    });
    RunEntry {
        version: m.version.clone(),
        name: m.name.clone(),
        transactional: transactional(m, direction),
        duration_ms: Some(duration_ms),
    }
}

/// A failure of `m` in `schema` that changed nothing else, located in its file
/// (`statements_done`: how many statements of a non-transactional script succeeded); callers
/// fill in what they did.
fn failure(
    m: &Migration,
    direction: Direction,
    cause: tokio_postgres::Error,
    statements_done: Option<usize>,
    at: Option<Range<usize>>,
    schema: &str,
) -> MigrationFailure {
    let Location {
        path,
        line,
        statement,
    } = locate(m, direction, &cause, statements_done, at);
    let other_schema = MigrationFailure::may_be_misplaced(&cause)
        .then(|| {
            // The statement's table and function names, else the name the server's message
            // quotes (a `REFERENCES public.a`, a `COMMENT ON`, a type: found by a user trial).
            let named = statement
                .as_deref()
                .map(super::lint::schemas_named)
                .unwrap_or_default();
            // Permission denied on another service's schema is isolation at work, which the
            // CLI's owner hint explains; on `public` (PostgreSQL 15 gives no CREATE there), a
            // folder written for it.
            let denied =
                cause.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE);
            named
                .into_iter()
                .chain(quoted_schema(&cause))
                .find(|named| named != schema && (!denied || named == "public"))
        })
        .flatten();
    MigrationFailure {
        version: m.version.clone(),
        name: m.name.clone(),
        direction,
        path,
        line,
        statement,
        cause,
        applied: Vec::new(),
        undone: Vec::new(),
        undo_error: None,
        undo_left_dirty: None,
        rolled_back: false,
        rolled_back_with: Vec::new(),
        lock_retries: 0,
        dirty: false,
        statements_done,
        invalid_indexes: Vec::new(),
        other_histories: Vec::new(),
        other_schema,
        reverted_first: None,
        interrupted: false,
    }
}

/// The schema of the name a server error quotes: `relation "public.a" does not exist` (and
/// `type`, `function`, …) gives `public`, `schema "x" does not exist` gives `x`; PostgreSQL's
/// own schemas are none.
fn quoted_schema(cause: &tokio_postgres::Error) -> Option<String> {
    let db = cause.as_db_error()?;
    let (_, rest) = db.message().split_once('"')?;
    let (quoted, _) = rest.split_once('"')?;
    let schema = if *db.code() == tokio_postgres::error::SqlState::INVALID_SCHEMA_NAME {
        quoted
    } else {
        quoted.split_once('.')?.0
    };
    (!["pg_catalog", "information_schema", "pg_temp"].contains(&schema)).then(|| schema.to_owned())
}

/// Every invalid index of `schema` (`pg_index.indisvalid` false), by name, with the statement
/// that drops it. An index of a partitioned table cannot be dropped `CONCURRENTLY` (PostgreSQL
/// docs, DROP INDEX), so its statement is a plain `DROP INDEX`.
async fn invalid_indexes(
    client: &Client,
    schema: &crate::Ident,
) -> Result<Vec<InvalidIndex>, MigrateError> {
    let rows = client
        .query_typed(
            "SELECT c.relname::text, t.relname::text,
                    format('DROP INDEX %s%I.%I',
                           CASE WHEN c.relkind = 'I' THEN '' ELSE 'CONCURRENTLY ' END,
                           n.nspname, c.relname)
               FROM pg_catalog.pg_index i
               JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
               JOIN pg_catalog.pg_class t ON t.oid = i.indrelid
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND NOT i.indisvalid
              ORDER BY c.relname",
            &[(&schema.as_str(), Type::TEXT)],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| InvalidIndex {
            name: r.get(0),
            table: r.get(1),
            drop_statement: r.get(2),
        })
        .collect())
}

/// True when `plan` would run up as one transaction (and there is something to run), for a
/// dry run's report: every migration transactional, and none but the last adding an enum
/// value (the group commits after it: see [`Migrator::run`]). A real run says what it did.
fn is_atomic(plan: &[&Migration]) -> bool {
    let Some((_, before_last)) = plan.split_last() else {
        return false;
    };
    plan.iter().all(|m| m.transactional) && !before_last.iter().any(|m| adds_enum_value(&m.up))
}

fn planned(m: &Migration) -> RunEntry {
    RunEntry {
        version: m.version.clone(),
        name: m.name.clone(),
        transactional: m.transactional,
        duration_ms: None,
    }
}

/// The driver client behind a pooled connection.
fn client(conn: &crate::PooledConn) -> &Client {
    conn
}
