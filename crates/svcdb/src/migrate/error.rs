//! Migration errors.
//!
//! Match on the variant; [`MigrateError::code`] gives the SQLSTATE of a database failure. The
//! messages are for people: they say what went wrong and what to do, and may change.

use std::time::Duration;

use super::adopt::OtherHistory;
use super::report::InvalidIndex;
use super::version::Version;
use crate::error::{pg_message, SqlState};

/// Everything that can stop a migration command.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    /// A file that looks like a migration cannot be used (bad name, duplicate version, empty,
    /// not UTF-8, a down without an up, bad `metadata.toml`, misplaced or unknown goose/dbmate
    /// markers, a Flyway repeatable or dotted-version migration, an undo script without its
    /// migration), or the folder is missing or cannot be read.
    #[error("{path}: {message}")]
    Source {
        /// The file or folder at fault.
        path: String,
        /// What is wrong and what to do.
        message: String,
    },

    /// The scripts of a transactional group dropped svcdb's history table, or the service
    /// schema that holds it (`DROP SCHEMA … CASCADE` in a first migration's down script), so
    /// their run cannot be recorded: the group's transaction was rolled back, nothing changed
    /// (found by a user trial: the error was a bare `relation "….svcdb_migrations" does not
    /// exist`).
    #[error("{} dropped svcdb's history table {schema}.{}, or the schema {schema} that holds it (as `DROP SCHEMA {schema} CASCADE` does), so what ran cannot be recorded; it was rolled back, and nothing changed\n  hint: a migration must leave the service schema and svcdb's tables alone: drop the objects it made one by one instead (a schema that should go is dropped by hand once every migration is reverted)", history_droppers(*direction, versions), super::migration::HISTORY_TABLE)]
    HistoryDropped {
        /// The service schema.
        schema: String,
        /// Whether the scripts were up or down scripts.
        direction: super::Direction,
        /// The migrations whose scripts ran in the transaction, one of which dropped it.
        versions: Vec<Version>,
    },

    /// A database or connection error outside any migration's own SQL.
    #[error(transparent)]
    Db(#[from] crate::Error),

    /// Another runner held the schema's migration lock longer than `lock_wait`.
    #[error("timed out after {waited:?} waiting for the migration lock of schema {schema}: another runner is migrating it\n  hint: wait for it to finish, or raise the lock wait (`--lock-wait`, MigrateOptions::lock_wait)")]
    LockTimeout {
        /// The schema.
        schema: String,
        /// How long we waited.
        waited: Duration,
    },

    /// A migration newer than every one this release ships failed part-way (a newer
    /// release's deploy broke): this release's runs that have work to do, and its `repair`,
    /// leave the schema alone; the newer release's migrations say how to repair it.
    #[error("schema {schema} is dirty: migration {} of a newer release failed part-way, and this release does not ship it\n  hint: repair it with that release's migrations (`svcdb migrate status` with its --dir says how); until then this release changes nothing in the schema", super::migration::Named(version, name))]
    NewerDirty {
        /// The schema.
        schema: String,
        /// The dirty version.
        version: Version,
        /// Its name in the history.
        name: String,
    },

    /// `repair` would clear a dirty mark while the schema holds indexes a failed
    /// `CREATE INDEX CONCURRENTLY` left invalid: the migration run again with
    /// `IF NOT EXISTS` would take such an index for a built one, and it would stay invalid for
    /// good. Nothing was changed.
    #[error("schema {schema} holds {} invalid index{} that a failed CREATE INDEX CONCURRENTLY left ({}); repair clears no dirty mark while they are there: the migration run again with IF NOT EXISTS would take them for built ones\n  hint: drop each, {}, then run `svcdb migrate repair` again", indexes.len(), if indexes.len() == 1 { "" } else { "es" }, indexes.iter().map(|i| format!("{} on {}", i.name, i.table)).collect::<Vec<_>>().join(", "), indexes.iter().map(|i| format!("`{}`", i.drop_statement)).collect::<Vec<_>>().join(", "))]
    InvalidIndexes {
        /// The schema.
        schema: String,
        /// The invalid indexes, each with the statement that drops it.
        indexes: Vec<InvalidIndex>,
    },

    /// The run was interrupted ([`Migrator::with_interrupt`](super::Migrator::with_interrupt))
    /// while it waited for the lock or between migrations: the migrations in `done` stay as
    /// this run left them (applied, or reverted), nothing after them ran. An interrupt during
    /// a migration's statement is that migration's failure instead ([`MigrateError::Failed`],
    /// SQLSTATE 57014), with the rollback or dirty mark any failure has.
    #[error(
        "{}\n  hint: {}",
        interrupted(schema, done, dirty.as_ref()),
        if dirty.is_some() { "`svcdb migrate status` says how to finish or undo the dirty migration; then run the command again" } else { "run the command again to go on" }
    )]
    Interrupted {
        /// The schema.
        schema: String,
        /// The migrations this run completed before the interrupt, in order.
        done: Vec<Version>,
        /// A non-transactional migration stopped between two of its statements: it is dirty.
        dirty: Option<Version>,
    },

    /// An applied migration's up file changed since it was applied.
    #[error("migration {version} was changed after it was applied: {path} no longer matches the checksum in the history\n  hint: if it ran only on a database of your own (not released yet), undo it with its down script and apply the file as it is now: `svcdb migrate redo --allow-changed` when it is the newest applied migration, else `svcdb migrate down --to <the version before it> --allow-changed` then `svcdb migrate up`; if it was released, restore the file and put the change in a new migration; `svcdb migrate repair` records the file as it is now without running it, right only when the edit changes nothing the database sees (a comment, formatting)")]
    Changed {
        /// The version.
        version: Version,
        /// The up file.
        path: String,
    },

    /// A pending migration is older than the newest applied one.
    #[error("migration {version} ({path}) is pending but older than the newest applied migration {newest_applied}\n  hint: give it a version above {newest_applied}, or pass `--allow-out-of-order` (MigrateOptions::allow_out_of_order) to run it anyway")]
    OutOfOrder {
        /// The pending version.
        version: Version,
        /// Its up file.
        path: String,
        /// The newest applied version.
        newest_applied: Version,
    },

    /// An applied migration has no file in the source.
    #[error("{}", missing_message(version, name, *missing, *none_found))]
    Missing {
        /// The applied version.
        version: Version,
        /// Its name in the history table.
        name: String,
        /// How many applied migrations have no file, this one included.
        missing: usize,
        /// True when no applied migration has a file: most likely the wrong folder.
        none_found: bool,
    },

    /// `down` (or `redo`) would revert an applied migration whose file is missing: without it
    /// there is no down script to run; nothing was reverted. (`--ignore-missing` only lets
    /// other commands pass over such a migration.)
    #[error("cannot revert migration {}: its file is missing from the migrations folder, so there is no down script to run; nothing was reverted\n  hint: restore the file (from version control) and run again", super::migration::Named(version, name))]
    MissingToRevert {
        /// The applied version.
        version: Version,
        /// Its name in the history table.
        name: String,
    },

    /// A non-transactional migration failed part-way earlier: its history row is marked dirty
    /// and no runner holds the schema's migration lock (a migration still running is waited
    /// for, not refused). The schema is in an unknown state.
    #[error("schema {schema} is dirty: non-transactional migration {} failed part-way and may be half-applied (no runner is migrating the schema)\n  hint: inspect the schema and finish or undo that migration's statements by hand (`svcdb migrate repair` also names the invalid indexes a failed CREATE INDEX CONCURRENTLY left, with the statement to drop each), then run `svcdb migrate repair`: it clears the mark, and the migration counts as not applied; if the schema now holds its changes (its up finished by hand, or a failed down undone), record it with `svcdb migrate baseline {version}`, otherwise the next `svcdb migrate up` runs it", super::migration::Named(version, name))]
    Dirty {
        /// The schema.
        schema: String,
        /// The dirty version.
        version: Version,
        /// Its name.
        name: String,
    },

    /// svcdb has applied nothing to the schema, which holds tables, and another tool's history
    /// table there records migrations: `up` would run every migration again over what that
    /// tool made (a folder of `IF NOT EXISTS` and `DROP … IF EXISTS` statements may well
    /// "succeed" doing so). Refused before anything runs, and before the lint, whose findings
    /// about tables that already exist would be beside the point.
    /// When that tool marks a version dirty or failed, `adopt` would refuse it too: the error
    /// says so, and how to clear the mark first.
    #[error("{}", other_tool_applied(schema, other))]
    OtherToolApplied {
        /// The schema.
        schema: String,
        /// The other tool's history table.
        other: super::adopt::OtherHistory,
    },

    /// Versions svcdb has pending are recorded as applied in another tool's history table:
    /// after an adoption ([`Migrator::adopt`](super::Migrator::adopt)), a replica of the old
    /// release still running that tool applied them. Running them again would fail, or repeat
    /// their effects; refused before anything runs. Adopting again records them.
    #[error(
        "refusing to migrate schema {schema}: {tool}'s history table {table} records {} {} as applied, which svcdb has pending: a release still running {tool} applied {} after its history was adopted; nothing was run\n  hint: record {} with `svcdb migrate adopt --from {tool}` (it adds what {tool} applied since), then run `svcdb migrate up` for the rest; and stop {tool} from running at start-up",
        if versions.len() == 1 { "version" } else { "versions" },
        versions.join(", "),
        if versions.len() == 1 { "it" } else { "them" },
        if versions.len() == 1 { "it" } else { "them" },
        tool = other.tool,
        table = other.table
    )]
    AppliedByOtherTool {
        /// The schema.
        schema: String,
        /// The other tool's history table.
        other: super::adopt::OtherHistory,
        /// The pending versions it records as applied.
        versions: Vec<String>,
    },

    /// The service's schema does not exist, so its history table cannot be made (SQLSTATE
    /// 3F000 from the server).
    #[error(
        "schema {schema} does not exist{}",
        schema_missing_hint(schema, similar)
    )]
    SchemaMissing {
        /// The schema, as configured.
        schema: String,
        /// The database's schemas that look like it (a misspelled `SVCDB_SCHEMA`), closest
        /// first; empty when none does, or none was looked for.
        similar: Vec<String>,
    },

    /// The connected role does not own the service's schema and may not act as its owner
    /// (it is neither a superuser nor a member of the owner role), so what the migrations
    /// create would belong to the wrong role: refused before anything runs.
    #[error("refusing to migrate schema {schema} as role {connected}: the schema belongs to role {owner}, and {connected} may not act as it (SET ROLE {owner} was refused); nothing was run\n  hint: connect as {owner}, the service's own role (its DATABASE_URL), so that what the migrations create belongs to it")]
    NotOwner {
        /// The schema.
        schema: String,
        /// The role the runner connected as.
        connected: String,
        /// The schema's owner.
        owner: String,
    },

    /// A pending migration is still the placeholder `svcdb migrate new` wrote
    /// ([`new_migration`](super::new_migration)): `up` refuses before running anything rather
    /// than record an empty migration as applied.
    #[error("{path} is still the template `svcdb migrate new` wrote: write the migration's SQL first; nothing was run\n  hint: replace the comment in it with the migration's statements (and the down script's with the statements that undo them), then run `svcdb migrate up` again")]
    Unwritten {
        /// The migration's version.
        version: Version,
        /// Its up file.
        path: String,
    },

    /// `down` would have to cross a migration that has no down script (none, or one holding
    /// no statement); nothing was reverted.
    #[error("cannot revert migration {version} ({path}): {}, so nothing was reverted\n  hint: write the statements that undo it in {down_at}{}{}", no_down_why(*empty, down_at), newer_hint(version, *newer), undo_file_caution(down_at))]
    NoDown {
        /// The version.
        version: Version,
        /// Its up file.
        path: String,
        /// Where its down script goes in its folder's layout (`…/0003_x.down.sql`,
        /// `…/2017-09-23-182408_x/down.sql`, Flyway's `…/U3__x.sql`, or a goose or dbmate file's
        /// down section).
        down_at: String,
        /// True when the down script is there but empty or comments only (diesel writes an
        /// empty `down.sql` for a migration nobody made reversible).
        empty: bool,
        /// How many applied migrations newer than it the same `down` would have reverted.
        newer: usize,
    },

    /// `up` (or `redo`, or `down` for a down script) refused before running anything: the
    /// migrations it would run hold statements that
    /// [`lint`](mod@super::lint) reports as errors and nothing allows (neither
    /// `-- svcdb:allow <rule>` in the file nor [`MigrateOptions::allow_unsafe`](super::MigrateOptions::allow_unsafe)).
    #[error("{}", unsafe_message(findings))]
    Unsafe {
        /// The blocking findings, oldest migration first.
        findings: Vec<super::lint::Finding>,
    },

    /// `--to` (or `baseline`'s version) names no migration: neither the migrations folder nor
    /// the history holds it. A typo (a digit short) would otherwise apply, revert or record
    /// everything on one side of it; nothing was run.
    #[error("no migration has version {version} in the migrations folder or the history of schema {schema}; nothing was run\n  hint: {}", unknown_version_hint(below.as_ref(), above.as_ref(), *zero_allowed))]
    UnknownVersion {
        /// The schema.
        schema: String,
        /// The version given.
        version: String,
        /// The nearest version below it the folder or the history holds.
        below: Option<String>,
        /// The nearest version above it.
        above: Option<String>,
        /// Whether `0` (before the first migration) is accepted where it was given.
        zero_allowed: bool,
    },

    /// A migration's SQL failed; the [`MigrationFailure`] says what this command left behind.
    #[error(transparent)]
    Failed(Box<MigrationFailure>),

    /// A repeatable migration's SQL failed. It was rolled back (outside a transaction, its
    /// statements before the failing one stay), and stays due; what `up` committed before it
    /// (the versioned migrations, the repeatables before it by name) stays applied.
    #[error("repeatable migration {name} failed ({path}{}): {}{}\n  {}\n  hint: fix the file and run `svcdb migrate up` again", line.map(|l| format!(", line {l}")).unwrap_or_default(), pg_message(cause), statement.as_deref().map(shown_statement).unwrap_or_default(), repeatable_kept(*transactional, applied))]
    RepeatableFailed {
        /// Its name.
        name: String,
        /// Its file.
        path: String,
        /// The line of `path` the server's error points at, when known.
        line: Option<u32>,
        /// The statement that failed, as written, when known.
        statement: Option<Box<str>>,
        /// Whether it ran in a transaction (rolled back whole) or statement by statement.
        transactional: bool,
        /// The server's error.
        cause: tokio_postgres::Error,
        /// The versions this `up` applied before it, which stay applied.
        applied: Vec<Version>,
    },
}

fn unknown_version_hint(below: Option<&String>, above: Option<&String>, zero: bool) -> String {
    let nearest: Vec<String> = [(below, "below"), (above, "above")]
        .into_iter()
        .filter_map(|(v, side)| v.map(|v| format!("{v} ({side})")))
        .collect();
    let mut hint = if nearest.is_empty() {
        "the folder and the history hold no migration".to_owned()
    } else {
        let verb = if nearest.len() == 1 { "is" } else { "are" };
        format!(
            "give a version that exists; the nearest {verb} {}",
            nearest.join(" and ")
        )
    };
    if zero {
        hint.push_str(", or 0 for before the first migration");
    }
    hint
}

fn repeatable_kept(transactional: bool, applied: &[Version]) -> String {
    let what = if transactional {
        "it was rolled back"
    } else {
        "it ran outside a transaction, so its statements before the failing one stay in effect, and it runs again from its start"
    };
    if applied.is_empty() {
        return format!("{what}; the versioned migrations were up to date already");
    }
    let list: Vec<String> = applied.iter().map(Version::to_string).collect();
    format!(
        "{what}; the versioned migrations this command applied before it stay applied: {}",
        list.join(", ")
    )
}

/// A migration script that failed, and what the command did about it (boxed in
/// [`MigrateError::Failed`] to keep the error small).
#[derive(Debug, thiserror::Error)]
#[error("{}", failed_message(self))]
pub struct MigrationFailure {
    /// The failing migration's version.
    pub version: Version,
    /// Its name.
    pub name: String,
    /// Up or down.
    pub direction: super::Direction,
    /// The failing script's file: the migration's up file, or its down file for a down (for a
    /// one-file goose or dbmate migration, the one file).
    pub path: String,
    /// The line of [`path`](Self::path) the server's error points at, counted in the file (so
    /// past a goose or dbmate marker); `None` when the error carries no position (a lock
    /// timeout, a lost connection).
    pub line: Option<usize>,
    /// The statement that failed, as written in the script: for a non-transactional script
    /// the one that was running, for a script sent whole the one holding the error's position;
    /// `None` when the error carries no position and the script was sent whole.
    pub statement: Option<String>,
    /// The server's error (shown in the message, so not the error's `source()`: see
    /// [`crate::error`]).
    pub cause: tokio_postgres::Error,
    /// Versions this command applied (or reverted, for a down) that stay in effect.
    pub applied: Vec<Version>,
    /// Versions this command applied and then undid with their down scripts, newest first.
    pub undone: Vec<Version>,
    /// Why undoing stopped early (a down script failed or is missing), if it did; the
    /// versions in `applied` are then still in effect.
    pub undo_error: Option<String>,
    /// The migration whose non-transactional down script stopped part-way while undoing: it
    /// is now dirty, half-reverted, and in neither `applied` nor `undone`.
    pub undo_left_dirty: Option<Version>,
    /// True when everything this command did was rolled back in one transaction.
    pub rolled_back: bool,
    /// The migrations that ran in the failing one's transaction before it (its group of
    /// consecutive transactional migrations, or the whole deploy), rolled back with it.
    pub rolled_back_with: Vec<Version>,
    /// How many times the failing script (or statement) was tried again after a lock timeout
    /// before this failure ([`MigrateOptions::lock_retries`](super::MigrateOptions::lock_retries)).
    pub lock_retries: u32,
    /// True when the failing migration was non-transactional and the schema is now dirty.
    pub dirty: bool,
    /// For a non-transactional script: how many of its statements succeeded before the
    /// failing one (they stay in effect).
    pub statements_done: Option<usize>,
    /// After a failure outside one transaction: every invalid index of the schema (a failed
    /// `CREATE INDEX CONCURRENTLY` leaves one, which `CREATE INDEX IF NOT EXISTS` would then
    /// silently accept), with the statement that drops it. Empty when the deploy ran in one
    /// transaction, or when the schema could not be asked.
    pub invalid_indexes: Vec<InvalidIndex>,
    /// When svcdb had applied nothing and the failing statement found its object already
    /// there: the other tools' history tables of the schema (and `public`), whose history
    /// [`Migrator::adopt`](super::Migrator::adopt) takes over instead of running their
    /// migrations again. Empty otherwise.
    pub other_histories: Vec<OtherHistory>,
    /// A schema other than the service schema that the failing statement names explicitly
    /// (`public.users`), when the error is one a name looked up in the wrong schema causes
    /// (an undefined table, schema, function or object; permission denied): folders written
    /// for tools that run migrations in `public` qualify names with it, where svcdb runs them
    /// in the service schema and their unqualified names created their objects there.
    pub other_schema: Option<String>,
    /// For a `redo` whose up failed: the migration whose down script this command ran and
    /// committed first (a script outside a transaction keeps them apart). It stays reverted,
    /// pending, over what its down script left. `None` otherwise (a redo of two transactional
    /// scripts runs them in one transaction, which the failure rolled back).
    pub reverted_first: Option<Version>,
    /// True when the runner's interrupt ([`Migrator::with_interrupt`](super::Migrator::with_interrupt):
    /// Ctrl-C, SIGTERM) cancelled the failing statement (57014): the migration is not at fault.
    pub interrupted: bool,
}

impl MigrationFailure {
    /// Whether `cause` is an error a name qualified with the wrong schema causes: SQLSTATE
    /// 42P01, 3F000, 42883, 42704 or 42501.
    pub(crate) fn may_be_misplaced(cause: &tokio_postgres::Error) -> bool {
        cause.code().is_some_and(|code| {
            [
                SqlState::UNDEFINED_TABLE,
                SqlState::INVALID_SCHEMA_NAME,
                SqlState::UNDEFINED_FUNCTION,
                SqlState::UNDEFINED_OBJECT,
                SqlState::INSUFFICIENT_PRIVILEGE,
            ]
            .contains(code)
        })
    }

    /// The failing statement found its object already there (a table, column, index, schema,
    /// function, constraint…), SQLSTATE 42P07, 42701, 42710, 42P06, 42723 or 42712.
    pub fn is_already_there(&self) -> bool {
        self.cause.code().is_some_and(|code| {
            [
                SqlState::DUPLICATE_TABLE,
                SqlState::DUPLICATE_COLUMN,
                SqlState::DUPLICATE_OBJECT,
                SqlState::DUPLICATE_SCHEMA,
                SqlState::DUPLICATE_FUNCTION,
                SqlState::DUPLICATE_ALIAS,
            ]
            .contains(code)
        })
    }
}

impl MigrateError {
    /// The SQLSTATE of the database error behind this one, if any.
    pub fn code(&self) -> Option<&SqlState> {
        match self {
            MigrateError::Db(e) => e.code(),
            MigrateError::Failed(f) => f.cause.code(),
            MigrateError::RepeatableFailed { cause, .. } => cause.code(),
            MigrateError::SchemaMissing { .. } => Some(&SqlState::INVALID_SCHEMA_NAME),
            MigrateError::NotOwner { .. } => Some(&SqlState::INSUFFICIENT_PRIVILEGE),
            _ => None,
        }
    }

    /// `Ok` when `version` is one of `known` (the folder's and the history's versions), or `0`
    /// where `zero_allowed`; else [`MigrateError::UnknownVersion`] with the nearest ones.
    pub(crate) fn check_known<'v>(
        schema: &str,
        version: &Version,
        known: impl IntoIterator<Item = &'v Version>,
        zero_allowed: bool,
    ) -> Result<(), Self> {
        if zero_allowed && *version == Version::from(0u32) {
            return Ok(());
        }
        let (mut below, mut above): (Option<&Version>, Option<&Version>) = (None, None);
        for v in known {
            match v.cmp(version) {
                std::cmp::Ordering::Equal => return Ok(()),
                std::cmp::Ordering::Less => below = below.max(Some(v)),
                std::cmp::Ordering::Greater => {
                    above = Some(above.map_or(v, |a| a.min(v)));
                }
            }
        }
        Err(MigrateError::UnknownVersion {
            schema: schema.to_owned(),
            version: version.to_string(),
            below: below.map(Version::to_string),
            above: above.map(Version::to_string),
            zero_allowed,
        })
    }

    pub(crate) fn source_file(path: impl Into<String>, message: impl Into<String>) -> Self {
        MigrateError::Source {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl From<tokio_postgres::Error> for MigrateError {
    fn from(e: tokio_postgres::Error) -> Self {
        MigrateError::Db(crate::Error::Db(e))
    }
}

fn unsafe_message(findings: &[super::lint::Finding]) -> String {
    let mut s = format!(
        "refusing to migrate: {} unsafe statement{} in the scripts this run would run; nothing was run",
        findings.len(),
        if findings.len() == 1 { "" } else { "s" }
    );
    for finding in findings {
        s.push_str(&format!(
            "\n  {}",
            finding.to_string().replace('\n', "\n  ")
        ));
    }
    s.push_str(
        "\n  hint: rewrite each statement as its fix says (a migration already applied elsewhere: in a new migration)",
    );
    // Allowing a statement the server refuses would only move the failure to run time.
    if findings.iter().any(|f| f.rule.can_be_allowed()) {
        // Found by a user trial: for `redo`, the comment changed an applied migration, which
        // `redo` then refused as changed.
        s.push_str("; if one is safe here (a small table, a maintenance window), write `-- svcdb:allow <rule>` in its file (not in a migration already applied: that changes its checksum), or pass `--allow-unsafe` (MigrateOptions::allow_unsafe)");
        if findings.iter().any(|f| !f.rule.can_be_allowed()) {
            s.push_str(", which does not apply to what the server itself refuses (`concurrently-in-transaction`, `not-in-transaction`)");
        }
    }
    s
}

/// The role a `role "…" does not exist` error (42704) names, quoted as an identifier.
fn missing_role(cause: &tokio_postgres::Error) -> Option<String> {
    let db = cause.as_db_error()?;
    if db.code() != &SqlState::UNDEFINED_OBJECT {
        return None;
    }
    let role = db
        .message()
        .strip_prefix("role \"")?
        .strip_suffix("\" does not exist")?;
    Some(format!("\"{}\"", role.replace('"', "\"\"")))
}

fn missing_message(version: &Version, name: &str, missing: usize, none_found: bool) -> String {
    let named = super::migration::Named(version, name);
    if none_found {
        // Found by a trial: an empty or wrong `--dir` was told to pass `--ignore-missing`,
        // which would then run every file of the wrong folder.
        return format!(
            "none of the {missing} applied migrations has a file in the migrations folder (the first is {named}): it is most likely not the folder this schema was migrated from\n  hint: point --dir (SVCDB_MIGRATIONS_DIR) at that folder"
        );
    }
    let more = match missing {
        0 | 1 => String::new(),
        n => format!(" (and {} more applied without a file)", n - 1),
    };
    format!(
        "migration {named} is applied but its file is missing from the migrations folder{more}\n  hint: restore the file; or, if it was removed on purpose, pass `--ignore-missing` (MigrateOptions::ignore_missing), here and to the start-up gate's checks (`svcdb health --ignore-missing`, a service's `Service::migrate_options`), which otherwise keep the service not ready"
    )
}

/// The line that shows a failing statement: `\n  in: ` and its code on one line, cut.
fn shown_statement(statement: &str) -> String {
    /// Characters of the statement shown; the rest is cut.
    const SHOWN: usize = 160;
    // From its code: the comments before it would read as if it were commented out.
    let code = &statement[super::split::code_start(statement, 0)..];
    // Without its comments: on one line, a `--` comment would seem to swallow the code after
    // it (found by a user trial: `( -- uh oh, comma here … id integer, )`).
    let mut uncommented = String::with_capacity(code.len());
    let mut from = 0;
    for (at, comment) in super::split::comments(code) {
        uncommented.push_str(&code[from..at]);
        uncommented.push(' ');
        from = at + comment.len();
    }
    uncommented.push_str(&code[from..]);
    let flat: Vec<&str> = uncommented.split_whitespace().collect();
    let flat = flat.join(" ");
    let shown: String = flat.chars().take(SHOWN).collect();
    let cut = if shown.len() < flat.len() { " …" } else { "" };
    format!("\n  in: {shown}{cut}")
}

fn failed_message(f: &MigrationFailure) -> String {
    let MigrationFailure {
        version,
        name,
        direction,
        path: _,
        line: _,
        statement,
        cause,
        applied,
        undone,
        undo_error,
        undo_left_dirty,
        rolled_back,
        rolled_back_with,
        lock_retries,
        dirty,
        statements_done,
        invalid_indexes,
        other_histories,
        other_schema,
        reverted_first,
        interrupted,
    } = f;
    let list = |v: &[Version]| {
        v.iter()
            .map(Version::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut s = format!(
        "migration {} failed ({direction}): {}",
        super::migration::Named(version, name),
        pg_message(cause)
    );
    if let Some(statement) = statement {
        s.push_str(&shown_statement(statement));
    }
    let lock_timeout = cause.code() == Some(&SqlState::LOCK_NOT_AVAILABLE);
    if lock_timeout && *lock_retries > 0 {
        s.push_str(&format!(
            "\n  the lock was still not granted after {lock_retries} retr{}",
            if *lock_retries == 1 { "y" } else { "ies" }
        ));
    }
    if *dirty {
        // Found by a trial: "0 of its statements ran" beside an invalid index the first
        // statement had left, which read as if nothing had happened.
        let what = match statements_done.unwrap_or(0) {
            0 if !invalid_indexes.is_empty() => {
                "its first statement failed part-way, leaving the invalid index below".to_owned()
            }
            0 => "its first statement may have done part of its work before it failed".to_owned(),
            done => format!("{done} of its statements ran before the failing one"),
        };
        s.push_str(&format!(
            "\n  the migration is not transactional: {what}, so the schema is marked dirty"
        ));
    } else if *statements_done == Some(0) {
        s.push_str(&format!(
            "\n  the migration is not transactional, but its first statement failed: it changed nothing and stays {}",
            match direction {
                super::Direction::Up => "pending",
                super::Direction::Down => "applied",
            }
        ));
    }
    if let Some(reverted) = reverted_first {
        s.push_str(&format!(
            "\n  its down script ran first, outside one transaction with the up, and stays: migration {reverted} is reverted and pending, over whatever its down script did not undo"
        ));
    }
    if *rolled_back {
        s.push_str("\n  everything this command did was rolled back; the schema is as it was");
    } else if !rolled_back_with.is_empty() {
        s.push_str(&format!(
            "\n  rolled back with it (same transaction): {}",
            list(rolled_back_with)
        ));
    }
    if !undone.is_empty() {
        s.push_str(&format!(
            "\n  undone with their down scripts: {}",
            list(undone)
        ));
    }
    if let Some(why) = undo_error {
        s.push_str(&format!("\n  undoing stopped: {why}"));
    }
    if let Some(left) = undo_left_dirty {
        s.push_str(&format!(
            "\n  migration {left} is now dirty: its down script runs outside a transaction and stopped part-way, so it is half-reverted"
        ));
    }
    if !applied.is_empty() {
        s.push_str(&format!(
            "\n  still in effect from this command: {}",
            list(applied)
        ));
    }
    for index in invalid_indexes {
        s.push_str(&format!(
            "\n  invalid index {} on table {} (queries ignore it, IF NOT EXISTS accepts it): drop it with `{}`",
            index.name, index.table, index.drop_statement
        ));
    }
    s.push_str("\n  hint: ");
    if !invalid_indexes.is_empty() {
        s.push_str("drop the invalid indexes (above) first; ");
    }
    let outside_a_transaction = format!("this statement cannot run inside a transaction: make the migration non-transactional ({}), then run again", super::migration::NO_TRANSACTION_HOW);
    if let (false, Some(other)) = (*dirty, other_histories.first()) {
        // Instead of the generic advice: the migration is fine, running it again is not.
        s.push_str(&format!(
            "{}'s history table {} is in the database and svcdb has recorded nothing: take it over with `svcdb migrate adopt --from {}` (Migrator::adopt) instead of running its migrations again",
            other.tool, other.table, other.tool
        ));
        return s;
    }
    if let Some(left) = undo_left_dirty {
        // Found by an adversarial trial: the generic advice said the migrations still in
        // effect would be skipped, while the next `up` refused the dirty schema.
        s.push_str(&format!(
            "the schema is dirty: finish migration {left}'s down statements by hand and run `svcdb migrate repair` (it counts as reverted), or undo them by hand, then `svcdb migrate repair` and `svcdb migrate baseline {left}` (it counts as applied); then fix migration {version} and run again"
        ));
        return s;
    }
    if *dirty {
        // Found by an operations trial: "finish by hand, repair, run again" ran the migration
        // again over what was finished (42P07), and blamed the migration for a lost session.
        s.push_str(&match direction {
            super::Direction::Up => format!(
                "the schema is dirty: undo those statements by hand and run `svcdb migrate repair` (the migration counts as pending again, and the next `svcdb migrate up` runs it); or finish them by hand, then `svcdb migrate repair` and `svcdb migrate baseline {version}` record it as applied"
            ),
            super::Direction::Down => format!(
                "the schema is dirty: finish the down script's statements by hand and run `svcdb migrate repair` (the migration counts as reverted); or undo them by hand, then `svcdb migrate repair` and `svcdb migrate baseline {version}` record it as applied again"
            ),
        });
        s.push_str("; why the statement failed: ");
    }
    if let Some(named) = other_schema {
        // Found on permify's goose folder: written for `public`, it creates tables unqualified
        // and alters them as `public.…`.
        s.push_str(&format!(
            "the statement names schema {named} explicitly, but svcdb runs migrations in the service schema (its search path), where the folder's unqualified names created their objects: drop the `{named}.` qualifiers (keep them only for what really lives in {named}), then run again"
        ));
        return s;
    }
    // Found by a trial on Conductor's Flyway folder (`ALTER SCHEMA … OWNER TO conductor`
    // before the role existed): the migration was right, the set-up was missing.
    let missing_role_advice = missing_role(cause).map(|role| format!("the migration names role {role}, which this PostgreSQL server does not have: roles belong to the whole server, not to a schema, so they come from the one-time set-up an administrator runs (`svcdb provision` makes the service's own), not from the migrations; create it there (CREATE ROLE {role}), then run again"));
    s.push_str(if lock_timeout {
        "another session held a lock on the migration's table for longer than lock_timeout: find it in pg_stat_activity (a long or idle-in-transaction session), then run again when it is gone; or allow more with `--lock-retries`/`--lock-timeout` (MigrateOptions::lock_retries, lock_timeout), which queues the table's other queries behind the migration for that long"
    } else if cause.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) {
        // Found on a real dbmate folder whose first migration is `CREATE SCHEMA IF NOT
        // EXISTS`: after `svcdb provision`, the runner works as the schema's owner, which
        // may not create schemas.
        "migrations run as the schema's owner (svcdb switches to it with SET ROLE when connected as another role, and says so before the run), and that role lacks this privilege: a statement that needs more than the service schema (CREATE SCHEMA, CREATE EXTENSION, grants on other schemas) belongs in the one-time set-up an administrator runs (`svcdb provision` creates the schema), or grant the privilege to the owner; then run again"
    } else if *interrupted {
        // Found by a trial: after "interrupted (Ctrl-C)" the hint listed every cause of a
        // cancelled statement.
        "the interrupt (Ctrl-C, SIGTERM) cancelled the statement, not a fault of the migration; run again when ready"
    } else if cause.code() == Some(&SqlState::QUERY_CANCELED) {
        "the statement was cancelled: by the statement timeout (`--statement-timeout`, MigrateOptions::statement_timeout: raise it, or 0 for none, for a migration that takes long), by an interrupt of the runner (Ctrl-C, SIGTERM: Migrator::with_interrupt), or from another session (pg_cancel_backend); then run again"
    } else if let Some(advice) = &missing_role_advice {
        advice
    } else if cause.code() == Some(&SqlState::DEPENDENT_OBJECTS_STILL_EXIST) {
        // PostgreSQL's own hint says CASCADE; for a down script dropping the service schema
        // (a dbmate folder's first migration), that would take svcdb's history table with it.
        "other objects depend on what this statement drops, and CASCADE would drop them too (for the service schema itself, svcdb's history table with them, which `svcdb provision` and the schema's owner keep): drop the dependents by name first, or leave the schema out of the migration; then run again"
    } else if cause.code() == Some(&SqlState::ACTIVE_SQL_TRANSACTION) {
        // CREATE INDEX CONCURRENTLY, VACUUM, ALTER TYPE … ADD VALUE (before PostgreSQL 12): the
        // migration itself is fine, it only needs to run outside a transaction.
        &outside_a_transaction
    } else if cause.code().is_some_and(|c| {
        *c == SqlState::ADMIN_SHUTDOWN
            || *c == SqlState::CRASH_SHUTDOWN
            || *c == SqlState::CANNOT_CONNECT_NOW
            || c.code().starts_with("08")
    }) || cause.is_closed()
    {
        "the server ended the session (pg_terminate_backend, a restart or a failover), not the migration: run again once the server accepts connections"
    } else if cause.code() == Some(&SqlState::UNDEFINED_FUNCTION)
        || cause
            .as_db_error()
            .is_some_and(|db| db.code() == &SqlState::UNDEFINED_OBJECT && db.message().starts_with("type \""))
    {
        // Found by a user trial: `uuid_generate_v4()` of the extension an administrator had
        // installed in `public`, which the service's search path does not name.
        "a function or type the statement uses is not on the migration's search path (the service schema and its extra schemas): one an extension provides lives in the schema it was created in (often public or extensions): add that schema to the extra schemas (SVCDB_EXTRA_SCHEMAS, Config::extra_schemas) or qualify the name; an extension not installed yet is created by an administrator (CREATE EXTENSION); then run again"
    } else if *dirty {
        "see the error above; fix the migration if it is wrong"
    } else if f.is_already_there() && *direction == super::Direction::Up {
        // Found by a user trial: a down script that undid nothing (goose's placeholder) had
        // reverted the migration, and the next `up` said "fix the migration".
        "what the statement creates is already there: if this migration was applied and reverted before, its down script did not undo it (drop what it left by hand, and fix the down script); if another tool or a person made it, `svcdb migrate adopt` or `svcdb migrate baseline` records it instead; then run again"
    } else {
        "fix the migration and run again"
    });
    if !applied.is_empty() && !*dirty {
        // Found by a user trial (windmill's folder, whose enum value ends a group): the rerun
        // was refused for locks on tables this run's committed part had just made, which the
        // checks before `up` now count as live.
        s.push_str("; the migrations still in effect are recorded as applied and will be skipped, and the tables they made count as live tables for the checks before the next `up`: a statement it refuses on one of those (nothing else uses them yet) can be allowed for that run with --allow-unsafe");
    }
    s
}

/// [`MigrateError::Interrupted`]'s first line.
fn interrupted(schema: &str, done: &[Version], dirty: Option<&Version>) -> String {
    let mut s = if done.is_empty() && dirty.is_some() {
        // Not "before any migration was done" when one was started and stays half-done
        // (found by a user trial: the message contradicted itself).
        format!("interrupted in schema {schema}")
    } else if done.is_empty() {
        format!("interrupted before any migration of schema {schema} was done")
    } else {
        let list: Vec<String> = done.iter().map(Version::to_string).collect();
        format!(
            "interrupted in schema {schema}: the migrations done before it stay done ({})",
            list.join(", ")
        )
    };
    match dirty {
        Some(v) => s.push_str(&format!("; non-transactional migration {v} stopped between two of its statements, so the schema is marked dirty (the statements before stay)")),
        None if done.is_empty() => s.push_str(": nothing changed"),
        None => s.push_str("; nothing after them ran"),
    }
    s
}

/// The part of [`MigrateError::NoDown`]'s hint for the migrations above the irreversible one:
/// a command that reverts them, when there are some.
/// Whose scripts [`MigrateError::HistoryDropped`] blames.
fn history_droppers(direction: super::Direction, versions: &[Version]) -> String {
    let kind = match direction {
        super::Direction::Up => "up",
        super::Direction::Down => "down",
    };
    match versions {
        [one] => format!("the {kind} script of migration {one}"),
        more => format!(
            "one of the {kind} scripts of migrations {}",
            more.iter()
                .map(Version::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Why [`MigrateError::NoDown`]'s migration has no down script to run.
fn no_down_why(empty: bool, down_at: &str) -> &'static str {
    if empty {
        "its down script holds no statement"
    } else if down_at.starts_with("the down section of ") {
        // Found by a user trial on a goose folder: the section was there, with goose's
        // placeholder in it, and "it has no down script" read as wrong.
        "its down section holds nothing that undoes it (no statement, or goose's `SELECT 'down SQL query'` placeholder)"
    } else {
        "it has no down script"
    }
}

/// For a down script to go in a Flyway undo file (`U3__x.sql`): refinery reads the same
/// folder layout, and to refinery a `U` file is an unversioned migration, run on every
/// deploy as an up (found by a user trial on a refinery project).
fn undo_file_caution(down_at: &str) -> &'static str {
    let file = down_at.rsplit('/').next().unwrap_or(down_at);
    if file.starts_with(['U', 'u']) && file.contains("__") {
        " (Flyway's undo file; if refinery also runs this folder, do not add it: refinery would run a U file as a migration of its own)"
    } else {
        ""
    }
}

fn newer_hint(version: &Version, newer: usize) -> String {
    match newer {
        0 => String::new(),
        1 => format!(
            "; `svcdb migrate down --to {version}` (DownOptions::to) reverts the one newer migration and stops there"
        ),
        n => format!(
            "; `svcdb migrate down --to {version}` (DownOptions::to) reverts the {n} newer migrations and stops there"
        ),
    }
}

/// The text of [`MigrateError::OtherToolApplied`].
fn other_tool_applied(schema: &str, other: &super::adopt::OtherHistory) -> String {
    let (tool, table) = (&other.tool, &other.table);
    let adopt = format!("`svcdb migrate adopt --from {tool}`");
    if other.dirty.is_empty() {
        return format!(
            "refusing to migrate schema {schema}: svcdb has applied nothing to it, but {tool}'s history table {table} records migrations already applied, and the schema holds tables: `up` would run every migration again over them; nothing was run\n  hint: take that history over with {adopt} (try `--dry-run` first): it records what that tool applied, and `up` then runs only what it did not"
        );
    }
    let (s, them) = if other.dirty.len() == 1 {
        ("", "it")
    } else {
        ("s", "them")
    };
    format!(
        "refusing to migrate schema {schema}: svcdb has applied nothing to it, and {tool}'s history table {table} marks version{s} {} dirty or failed: the schema may be half-migrated; nothing was run\n  hint: finish or undo {them} by hand and clear the mark with {tool} ({}), then take the history over with {adopt}",
        other.dirty.join(", "),
        super::adopt::clear_mark_how(other.tool)
    )
}

/// What [`MigrateError::SchemaMissing`] says after its first line: the look-alikes, when there
/// are any (a misspelling is then the likelier mistake, so it is named first), and how to make
/// the schema.
fn schema_missing_hint(schema: &str, similar: &[String]) -> String {
    let create = format!(
        "create it with the service's own role, `svcdb provision --service <name> --schema {}`; or let svcdb create it when it connects (SVCDB_CREATE_SCHEMA=true, Config::create_schema)",
        crate::error::shell_word(schema)
    );
    if similar.is_empty() {
        format!("\n  hint: {create}")
    } else {
        format!(
            "; similar: {}\n  hint: if SVCDB_SCHEMA is misspelled, set it to the right one; otherwise {create}",
            similar.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by a user trial: the failing statement, shown on one line, kept its `--` comments,
    /// which then seemed to comment out the code after them.
    #[test]
    fn a_statement_is_shown_on_one_line_without_its_comments() {
        let shown = shown_statement(
            "-- before\ncreate table t ( -- a comment, here\n  id integer, /* inline */ name text\n)",
        );
        assert_eq!(shown, "\n  in: create table t ( id integer, name text )");
        // Text that only looks like a comment stays.
        assert_eq!(
            shown_statement("SELECT '-- not a comment'"),
            "\n  in: SELECT '-- not a comment'"
        );
    }

    /// Found by a user trial: a non-transactional migration interrupted between two statements,
    /// the first of the run, was reported as "interrupted before any migration was done" and
    /// as stopped part-way in the same line.
    #[test]
    fn an_interrupt_that_leaves_a_migration_dirty_does_not_say_nothing_was_done() {
        let v: Version = "0002".parse().unwrap();
        let dirty = interrupted("app", &[], Some(&v));
        assert!(!dirty.contains("before any migration"), "{dirty}");
        assert!(dirty.contains("0002"), "{dirty}");
        // The control: interrupted with nothing started.
        assert!(interrupted("app", &[], None).contains("before any migration"));
    }
}
