//! Where each migration stands, and the drift checks built on it.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::adopt::OtherHistory;
use super::error::MigrateError;
use super::history::History;
use super::migration::Migration;
use super::options::MigrateOptions;
use super::repeatable::{self, Recorded, RepeatableEntry, RepeatableState};
use super::source::Migrations;
use super::version::Version;

/// Where one migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationState {
    /// Applied, and the file still matches.
    Applied,
    /// In the source, not applied.
    Pending,
    /// Applied, but the up file changed since.
    Changed,
    /// Applied, but no file has this version.
    Missing,
    /// A non-transactional migration that failed part-way: its history row is marked dirty
    /// and no runner holds the schema's migration lock; see [`MigrateError::Dirty`].
    Dirty,
    /// A non-transactional migration a runner is applying or reverting right now (a long
    /// `CREATE INDEX CONCURRENTLY`): its history row is marked dirty while that runner holds
    /// the schema's migration lock. Not a problem: `up` waits for the lock, the gate stays
    /// ready. [`StatusEntry::running_ms`] says how long it has run.
    InProgress,
}

/// One row of [`StatusReport`].
#[derive(Debug, Clone, Serialize)]
pub struct StatusEntry {
    /// The version, as its file writes it (as the history records it for a missing file).
    pub version: Version,
    /// The file's name, or the history's for a missing file.
    pub name: String,
    /// Where it stands.
    pub state: MigrationState,
    /// The up file, `None` when missing.
    pub path: Option<String>,
    /// Whether it runs in a transaction (from the file, else from the history).
    pub transactional: bool,
    /// When it was applied.
    pub applied_at: Option<DateTime<Utc>>,
    /// How long its up script took, in milliseconds; `None` when it never ran here.
    pub execution_ms: Option<f64>,
    /// Recorded by `baseline` as applied without running (an adopted database).
    pub baselined: bool,
    /// The database user that applied it.
    pub applied_by: Option<String>,
    /// For a migration in progress: how long its script has been running, in milliseconds.
    pub running_ms: Option<f64>,
}

/// The state of every migration of a schema: the output of `svcdb migrate status` and what the
/// start-up gate asks.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    /// The service schema.
    pub schema: String,
    /// False before the first `up` (or `baseline`).
    pub history_exists: bool,
    /// The newest applied version that is not dirty.
    pub current_version: Option<Version>,
    /// The version marked dirty with no runner holding the lock, if any: nothing runs until
    /// `repair`.
    pub dirty: Option<Version>,
    /// The version another runner is migrating right now, if any (see
    /// [`MigrationState::InProgress`]).
    pub in_progress: Option<Version>,
    /// Every migration of the source and every applied version, by version.
    pub entries: Vec<StatusEntry>,
    /// Flyway's repeatable migrations of the source, by name (empty in the start-up gate's
    /// report: a changed view or function does not make a replica unready).
    pub repeatables: Vec<RepeatableEntry>,
    /// While svcdb has applied nothing: the other tools' history tables of the schema (and
    /// `public`), whose history `svcdb migrate adopt` takes over (`up` would run their
    /// migrations again). Empty otherwise, and in the start-up gate's report.
    pub other_histories: Vec<OtherHistory>,
    /// An applied migration whose file is changed and named otherwise than the history says:
    /// most likely another schema's folder ([`StatusReport::check_drift`] refuses it, also
    /// where changed files are allowed).
    #[serde(skip)]
    pub(crate) foreign: Option<Foreign>,
    /// With a migration in progress, or with migrations pending: another session holds the
    /// schema's migration lock (a runner applying them in a transaction, which leaves no dirty
    /// row to see, or reverting or repairing). Always false in the start-up gate's report.
    pub locked: bool,
}

/// An applied migration whose file is another schema's, by its name: see
/// [`StatusReport::foreign`].
#[derive(Debug, Clone)]
pub(crate) struct Foreign {
    version: Version,
    /// Its name in the history.
    recorded: String,
    /// Its file's name, and the file.
    named: String,
    path: String,
}

impl StatusReport {
    /// Builds the report from the source and the history table.
    pub(crate) fn build(schema: &str, migrations: &Migrations, history: &History) -> Self {
        // Found by user trials: `--dir` of the catalog's migrations on the orders schema made
        // every file "changed", and `redo --allow-changed` ran the catalog's down script there.
        let foreign = history.rows.iter().find_map(|row| {
            migrations
                .get(&row.version)
                .filter(|m| m.checksum.to_hex() != row.checksum && m.name != row.name)
                .map(|m| Foreign {
                    version: row.version.clone(),
                    recorded: row.name.clone(),
                    named: m.name.clone(),
                    path: m.path.clone(),
                })
        });
        let mut entries: Vec<StatusEntry> = migrations
            .iter()
            .map(|m| {
                let row = history.get(&m.version);
                let state = match row {
                    None => MigrationState::Pending,
                    Some(r) if r.dirty => dirty_state(history),
                    Some(r) if r.checksum != m.checksum.to_hex() => MigrationState::Changed,
                    Some(_) => MigrationState::Applied,
                };
                entry(
                    m.version.clone(),
                    m.name.clone(),
                    state,
                    Some(m.path.clone()),
                    m.transactional,
                    row,
                )
            })
            .collect();
        for row in history
            .rows
            .iter()
            .filter(|r| migrations.get(&r.version).is_none())
        {
            let state = if row.dirty {
                dirty_state(history)
            } else {
                MigrationState::Missing
            };
            let transactional = row.detail.as_ref().is_none_or(|d| d.transactional);
            entries.push(entry(
                row.version.clone(),
                row.name.clone(),
                state,
                None,
                transactional,
                Some(row),
            ));
        }
        entries.sort_by(|a, b| a.version.cmp(&b.version));
        Self {
            schema: schema.to_owned(),
            history_exists: history.exists,
            current_version: history.current_version(migrations),
            dirty: history
                .rows
                .iter()
                .find(|r| r.dirty && !history.locked)
                .map(|r| r.version.clone()),
            in_progress: history
                .rows
                .iter()
                .find(|r| r.dirty && history.locked)
                .map(|r| r.version.clone()),
            entries,
            repeatables: Vec::new(),
            other_histories: Vec::new(),
            foreign,
            locked: false,
        }
    }

    /// [`MigrateError::Source`] when the folder looks like another schema's
    /// ([`StatusReport::foreign`]), whatever the options: `what` says what was not done.
    pub(crate) fn refuse_foreign_folder(&self, what: &str) -> Result<(), MigrateError> {
        let Some(f) = &self.foreign else {
            return Ok(());
        };
        Err(MigrateError::Source {
            path: f.path.clone(),
            message: format!(
                "migration {} is `{}` in schema {}'s history but `{}` in this folder, and its file is changed: these look like another schema's migrations, so {what}\n  hint: point --dir (SVCDB_MIGRATIONS_DIR) at schema {}'s own migrations; if the file was renamed on purpose, give it back the name the history has",
                f.version, f.recorded, self.schema, f.named, self.schema
            ),
        })
    }

    /// The report with the state of the source's repeatable migrations against `recorded`.
    pub(crate) fn with_repeatables(
        mut self,
        migrations: &Migrations,
        recorded: &HashMap<String, Recorded>,
    ) -> Self {
        self.repeatables = repeatable::entries(migrations.repeatables(), recorded);
        self
    }

    /// Repeatable migrations the next `up` runs: never run, or changed since they ran; none
    /// while a newer release has migrated the schema ([`Self::newer_release`]).
    pub fn stale_repeatables(&self) -> impl Iterator<Item = &RepeatableEntry> {
        // A newer release's: an older one would put its own versions of the views and
        // functions back under the newer release's migrations (found by a user trial).
        let newer = self.newer_release();
        self.repeatables
            .iter()
            .filter(move |r| !newer && r.state != RepeatableState::Applied)
    }

    /// A newer release has migrated the schema: some applied (or dirty) migration is newer
    /// than every file ([`Self::newer`]). The repeatable migrations are then that release's to
    /// run, not this one's.
    pub fn newer_release(&self) -> bool {
        self.entries.iter().any(|e| self.newer(e))
    }

    /// Entries in `state`.
    pub fn in_state(&self, state: MigrationState) -> impl Iterator<Item = &StatusEntry> {
        self.entries.iter().filter(move |e| e.state == state)
    }

    /// Migrations not yet applied.
    pub fn pending(&self) -> impl Iterator<Item = &StatusEntry> {
        self.in_state(MigrationState::Pending)
    }

    /// Applied migrations whose file changed.
    pub fn changed(&self) -> impl Iterator<Item = &StatusEntry> {
        self.in_state(MigrationState::Changed)
    }

    /// Applied versions with no file.
    pub fn missing(&self) -> impl Iterator<Item = &StatusEntry> {
        self.in_state(MigrationState::Missing)
    }

    /// True when nothing is pending, changed, dirty or in progress, repeatable migrations
    /// included. Missing files do not count: during a
    /// rolling deploy an older binary meets a database migrated by a newer one, which is fine
    /// as long as migrations stay backward compatible.
    pub fn is_up_to_date(&self) -> bool {
        self.entries
            .iter()
            .all(|e| matches!(e.state, MigrationState::Applied | MigrationState::Missing))
            && self.stale_repeatables().next().is_none()
    }

    /// Refuses a dirty schema, changed files and missing files (unless `options` allow them).
    ///
    /// A missing or dirty migration newer than every file is a newer release's ([`Self::newer`]):
    /// an older release meets it during a rolling deploy or a rollback, and its `up` with
    /// nothing to run must not fail on it (Flyway's `ignoreFutureMigrations`, true by
    /// default, does the same; the start-up gate reports them as notices). A newer release's
    /// dirty migration still refuses a run that has something to do ([`Self::newer_dirty`]).
    pub(crate) fn check_drift(&self, options: &MigrateOptions) -> Result<(), MigrateError> {
        self.refuse_foreign_folder("nothing was run")?;
        for e in self.entries.iter().filter(|e| !self.newer(e)) {
            match e.state {
                MigrationState::Dirty => {
                    return Err(MigrateError::Dirty {
                        schema: self.schema.clone(),
                        version: e.version.clone(),
                        name: e.name.clone(),
                    })
                }
                MigrationState::Changed if !options.allow_changed => {
                    return Err(MigrateError::Changed {
                        version: e.version.clone(),
                        path: e.path.clone().unwrap_or_default(),
                    })
                }
                MigrationState::Missing if !options.ignore_missing => {
                    let missing = self.missing().count();
                    let none_found = !self
                        .entries
                        .iter()
                        .any(|e| e.path.is_some() && e.state != MigrationState::Pending);
                    return Err(MigrateError::Missing {
                        version: e.version.clone(),
                        name: e.name.clone(),
                        missing,
                        none_found,
                    });
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Whether `entry` is a newer release's: applied (or dirty) without a file, and newer than
    /// every migration that has one. Never when no migration has a file (a wrong folder would
    /// otherwise make every applied migration look newer).
    pub fn newer(&self, entry: &StatusEntry) -> bool {
        // Only a row without a file needs the newest file looked up: the drift check asks of
        // every entry, and a scan per entry would make a no-op `up` quadratic in the history.
        entry.path.is_none()
            && matches!(entry.state, MigrationState::Missing | MigrationState::Dirty)
            && self
                .entries
                .iter()
                .filter(|e| e.path.is_some())
                .map(|e| &e.version)
                .max()
                .is_some_and(|newest| entry.version > *newest)
    }

    /// A newer release's migration that failed part-way ([`Self::newer`]), as the refusal of
    /// a run that has something to do.
    pub(crate) fn newer_dirty(&self) -> Result<(), MigrateError> {
        match self
            .entries
            .iter()
            .find(|e| e.state == MigrationState::Dirty && self.newer(e))
        {
            Some(e) => Err(MigrateError::NewerDirty {
                schema: self.schema.clone(),
                version: e.version.clone(),
                name: e.name.clone(),
            }),
            None => Ok(()),
        }
    }

    /// The newest version in the history (applied, changed, missing, dirty or in progress).
    fn newest_applied(&self) -> Option<&Version> {
        self.entries
            .iter()
            .filter(|e| e.state != MigrationState::Pending)
            .map(|e| &e.version)
            .max()
    }

    /// Pending migrations older than the newest applied one: `up` refuses them unless
    /// [`MigrateOptions::allow_out_of_order`] (found by a user trial: `status` listed such a
    /// migration as merely pending, and `up` then refused it).
    pub fn out_of_order(&self) -> impl Iterator<Item = &StatusEntry> {
        let newest = self.newest_applied();
        self.pending()
            .filter(move |e| newest.is_some_and(|newest| e.version < *newest))
    }

    /// Refuses to run a migration older than the newest applied one, unless allowed.
    pub(crate) fn check_order(
        &self,
        plan: &[&Migration],
        options: &MigrateOptions,
    ) -> Result<(), MigrateError> {
        match (plan.first(), self.newest_applied()) {
            (Some(m), Some(newest)) if m.version < *newest && !options.allow_out_of_order => {
                Err(MigrateError::OutOfOrder {
                    version: m.version.clone(),
                    path: m.path.clone(),
                    newest_applied: newest.clone(),
                })
            }
            _ => Ok(()),
        }
    }
}

/// A dirty row's state: in progress while another session holds the schema's lock.
fn dirty_state(history: &History) -> MigrationState {
    if history.locked {
        MigrationState::InProgress
    } else {
        MigrationState::Dirty
    }
}

fn entry(
    version: Version,
    name: String,
    state: MigrationState,
    path: Option<String>,
    transactional: bool,
    row: Option<&super::history::HistoryRow>,
) -> StatusEntry {
    let detail = row.and_then(|r| r.detail.as_ref());
    StatusEntry {
        version,
        name,
        state,
        path,
        transactional,
        applied_at: detail.map(|d| d.applied_at),
        execution_ms: detail.and_then(|d| d.execution).map(super::report::millis),
        baselined: row.is_some_and(|r| !r.dirty) && detail.is_some_and(|d| d.execution.is_none()),
        applied_by: detail.map(|d| d.applied_by.clone()),
        running_ms: (state == MigrationState::InProgress)
            .then(|| row.and_then(|r| r.dirty_for))
            .flatten()
            .map(super::report::millis),
    }
}
