//! Adopting a schema another tool migrated: `svcdb migrate adopt --from <tool>`.
//!
//! [`Migrator::adopt`] reads the other tool's history table where that tool keeps it (in the
//! service schema, else in `public`, or where [`AdoptOptions::history_table`] says), matches
//! every version it applied to a file of the folder, and records them in svcdb's history with
//! today's checksums, in one transaction under the schema's migration lock, without running
//! anything. The other tool's table is only read.
//!
//! | tool | table | applied | refused |
//! |---|---|---|---|
//! | diesel | `__diesel_schema_migrations` | every row (`version` without dashes) | — |
//! | sqlx | `_sqlx_migrations` | rows with `success` | `success = false` (sqlx's dirty); a SHA-384 of the file other than `checksum` |
//! | golang-migrate | `schema_migrations` (`version`, `dirty`) | every file up to its one row's version | `dirty` |
//! | goose | `goose_db_version` | versions whose newest row (by `id`) says `is_applied` (version 0 is goose's own first row) | — |
//! | dbmate | `schema_migrations` (`version` only) | every row | — |
//! | Flyway | `flyway_schema_history` | `SQL` rows, minus those undone (`UNDO_SQL`) or deleted (`DELETE`); a `BASELINE` row counts every file up to its version; a repeatable (`R__`) whose newest run was of the file as it is now | `success = false`; a CRC32 of the file's lines other than `checksum`; Java migrations |
//! | refinery | `refinery_schema_history` | every row | a SipHash-1-3 of name, version and file other than `checksum` |
//! | pop | `schema_migration` | every row; a 14-digit row that no file has counts for every migration whose version starts with it (ory's popx wrote those before 20-digit versions) | — |
//!
//! Every applied version must have its file; each problem is named with its version, all of
//! them at once ([`AdoptError::Refused`]). A table that is not the tool's, lacking a column
//! the tool's has or having another tool's (refinery's `applied_on` and `checksum`,
//! golang-migrate's `dirty`), is refused before anything is read from it, naming the tool it
//! looks like ([`AdoptError::NotTheToolsTable`]).

use std::collections::BTreeMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

use super::error::MigrateError;
use super::history;
use super::migration::Migration;
use super::repeatable::{self, Repeatable};
use super::report::RunEntry;
use super::runner::Migrator;
use super::version::Version;

/// Why a recorded version is refused when it does not parse.
const NOT_A_VERSION: &str =
    "not a version svcdb reads: digits, separated by `-` (`2026-11-24-093000`) or by `.` (`1.1`)";

/// A migration tool whose history [`Migrator::adopt`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Tool {
    /// diesel: `__diesel_schema_migrations`.
    Diesel,
    /// sqlx: `_sqlx_migrations`.
    Sqlx,
    /// golang-migrate: `schema_migrations` with `version` and `dirty`.
    GolangMigrate,
    /// goose: `goose_db_version`.
    Goose,
    /// dbmate: `schema_migrations` with `version` only.
    Dbmate,
    /// Flyway: `flyway_schema_history`.
    Flyway,
    /// refinery: `refinery_schema_history`.
    Refinery,
    /// pop (gobuffalo's, and ory's popx, which kratos, hydra and keto use): `schema_migration`.
    Pop,
}

impl Tool {
    /// Every tool, in the order `--from` lists them.
    pub const ALL: [Tool; 8] = [
        Tool::Diesel,
        Tool::Sqlx,
        Tool::GolangMigrate,
        Tool::Goose,
        Tool::Dbmate,
        Tool::Flyway,
        Tool::Refinery,
        Tool::Pop,
    ];

    /// The name `--from` takes (`golang-migrate`).
    pub fn name(self) -> &'static str {
        match self {
            Tool::Diesel => "diesel",
            Tool::Sqlx => "sqlx",
            Tool::GolangMigrate => "golang-migrate",
            Tool::Goose => "goose",
            Tool::Dbmate => "dbmate",
            Tool::Flyway => "flyway",
            Tool::Refinery => "refinery",
            Tool::Pop => "pop",
        }
    }

    /// The table the tool keeps its history in, by default.
    pub fn history_table(self) -> &'static str {
        match self {
            Tool::Diesel => "__diesel_schema_migrations",
            Tool::Sqlx => "_sqlx_migrations",
            Tool::GolangMigrate | Tool::Dbmate => "schema_migrations",
            Tool::Goose => "goose_db_version",
            Tool::Flyway => "flyway_schema_history",
            Tool::Refinery => "refinery_schema_history",
            Tool::Pop => "schema_migration",
        }
    }

    /// The columns the tool's table must have to be read as that tool's.
    fn columns(self) -> &'static [&'static str] {
        match self {
            Tool::Diesel | Tool::Dbmate | Tool::Pop => &["version"],
            Tool::Sqlx => &["version", "success", "checksum"],
            Tool::GolangMigrate => &["version", "dirty"],
            Tool::Goose => &["id", "version_id", "is_applied"],
            Tool::Flyway => &["installed_rank", "version", "type", "checksum", "success"],
            Tool::Refinery => &["version", "name", "checksum"],
        }
    }

    /// The columns that tell the tool's table from the others' (with [`columns`](Self::columns)
    /// among them, so that a table that has them is read as the tool's): dbmate's table has
    /// `version` and nothing else (see [`looks_like`]).
    fn fingerprint(self) -> &'static [&'static str] {
        match self {
            Tool::Diesel => &["version", "run_on"],
            Tool::Sqlx => &["version", "success", "checksum", "execution_time"],
            Tool::GolangMigrate => &["version", "dirty"],
            Tool::Goose => &["id", "version_id", "is_applied"],
            Tool::Dbmate => &["version"],
            Tool::Flyway => &[
                "installed_rank",
                "version",
                "type",
                "script",
                "checksum",
                "success",
            ],
            Tool::Refinery => &["version", "name", "applied_on", "checksum"],
            // popx's; gobuffalo's pop has `version` alone, read as dbmate's table is.
            Tool::Pop => &["version", "version_self"],
        }
    }
}

impl fmt::Display for Tool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Tool {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Tool::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                let names: Vec<&str> = Tool::ALL.iter().map(|t| t.name()).collect();
                format!("unknown tool {s:?}; svcdb adopts from {}", names.join(", "))
            })
    }
}

/// What [`Migrator::adopt`] reads and whether it writes.
#[derive(Debug, Clone)]
pub struct AdoptOptions {
    /// The tool whose history to read.
    pub from: Tool,
    /// Where that history is, `schema.table` (or a table name, looked up in the service schema,
    /// then `public`); `None`: the tool's own table name ([`Tool::history_table`]), looked up
    /// alike.
    pub history_table: Option<String>,
    /// Report what would be recorded, and refuse as a real run would, without writing (and
    /// without taking the lock).
    pub dry_run: bool,
    /// Record a version whose file no longer matches the other tool's checksum, with a
    /// warning, instead of refusing: for files edited on purpose when switching (a psql line
    /// removed, `COPY … FROM stdin` turned into `INSERT`s, a no-transaction directive added).
    /// The edit must change nothing the database sees, since nothing runs again.
    pub allow_changed: bool,
    /// Leave out, with a warning, the versions the other tool applied whose files are gone
    /// (squashed or deleted on purpose), instead of refusing: goose, golang-migrate and diesel
    /// keep working over them, and svcdb's history then records the rest. Those versions stay
    /// unknown to svcdb (nothing of theirs runs again, and `up` does not miss them).
    pub ignore_missing: bool,
}

impl AdoptOptions {
    /// Adopt from `tool`'s table where the tool keeps it.
    pub fn from(tool: Tool) -> Self {
        Self {
            from: tool,
            history_table: None,
            dry_run: false,
            allow_changed: false,
            ignore_missing: false,
        }
    }
}

/// What [`Migrator::adopt`] recorded (or, in a dry run, would record).
#[derive(Debug, Clone, Serialize)]
pub struct AdoptReport {
    /// The service schema.
    pub schema: String,
    /// The tool adopted from.
    pub from: Tool,
    /// The other tool's table that was read, `schema.table`; left as it was.
    pub table: String,
    /// True when nothing was written.
    pub dry_run: bool,
    /// Versions recorded in svcdb's history as applied, oldest first (not run).
    pub recorded: Vec<RunEntry>,
    /// Versions the other tool applied that svcdb's history already had.
    pub already_recorded: Vec<Version>,
    /// Files the other tool did not apply: `svcdb migrate up` runs them.
    pub pending: Vec<Version>,
    /// The pending ones older than the newest recorded version (the other tool rolled them
    /// back, or skipped them): `up` runs them only with
    /// [`MigrateOptions::allow_out_of_order`](super::MigrateOptions::allow_out_of_order).
    pub out_of_order: Vec<Version>,
    /// What was read but not adopted, and checks that could not be made.
    pub warnings: Vec<String>,
    /// Flyway's repeatable migrations recorded as run with their file as it is now, by name;
    /// the folder's others are due, and `svcdb migrate up` runs them.
    pub repeatables: Vec<String>,
}

/// One reason [`Migrator::adopt`] refuses, naming the version as the other tool wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AdoptProblem {
    /// The other tool marked the version dirty or failed (golang-migrate `dirty`, sqlx or
    /// Flyway `success = false`): its schema may be half-migrated.
    Dirty {
        /// The version.
        version: String,
    },
    /// An applied version has no file in the folder.
    NoFile {
        /// The version.
        version: String,
    },
    /// The file no longer matches the checksum the other tool recorded when it applied it.
    ChecksumMismatch {
        /// The version.
        version: String,
        /// The file.
        path: String,
        /// The other tool's checksum.
        recorded: String,
        /// The file's, computed as that tool computes it.
        computed: String,
    },
    /// A row svcdb cannot adopt: a version that is not digits (Flyway's `1.1`), a Java
    /// migration.
    Unsupported {
        /// The version.
        version: String,
        /// Why.
        why: String,
    },
}

impl fmt::Display for AdoptProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdoptProblem::Dirty { version } => write!(
                f,
                "version {version} is marked dirty or failed: it may be half-applied"
            ),
            AdoptProblem::NoFile { version } => write!(
                f,
                "version {version} is applied but no file in the folder has it"
            ),
            AdoptProblem::ChecksumMismatch {
                version,
                path,
                recorded,
                computed,
            } => write!(
                f,
                "version {version}: {path} changed since it was applied (recorded checksum {recorded}, the file's {computed})"
            ),
            AdoptProblem::Unsupported { version, why } => write!(f, "version {version}: {why}"),
        }
    }
}

/// Why [`Migrator::adopt`] did not adopt.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdoptError {
    /// The other tool's history table is not where it was looked for.
    #[error("no {tool} history table: looked for {}\n  hint: {}", looked_in.join(", "), no_history_hint(found))]
    NoHistoryTable {
        /// The tool.
        tool: Tool,
        /// The tables looked for.
        looked_in: Vec<String>,
        /// Other tools' history tables found where `adopt` looks: `--from` may name the wrong
        /// tool.
        found: Vec<OtherHistory>,
    },
    /// The table exists but is not the tool's: it lacks a column the tool's has, or it has
    /// another tool's columns (golang-migrate's and dbmate's are both `schema_migrations`, and
    /// `history_table` may name any table).
    #[error("{}", wrong_table_message(tool, table, missing, looks_like.as_ref(), history_table.as_deref()))]
    NotTheToolsTable {
        /// The tool.
        tool: Tool,
        /// The table.
        table: String,
        /// The columns of the tool's table it lacks (none when it has them, and another
        /// tool's as well).
        missing: Vec<String>,
        /// The tool whose table it looks like by its columns, if one's: adopting from that
        /// tool (with `history_table`) reads it.
        looks_like: Option<Tool>,
        /// The [`AdoptOptions::history_table`] to adopt from `looks_like` with: `None` when
        /// that tool finds this table where it looks by itself.
        history_table: Option<String>,
    },
    /// The other tool's history cannot be adopted as it is; nothing was written.
    #[error("{}", refused_message(tool, table, problems))]
    Refused {
        /// The tool.
        tool: Tool,
        /// Its table.
        table: String,
        /// Every problem, by version.
        problems: Vec<AdoptProblem>,
    },
    /// The other tool's table is in another schema than the service's, which holds nothing
    /// of its own: the migrations it records made their objects there, not in the service
    /// schema, where svcdb would look for them.
    #[error("{tool}'s history table {table} is in schema {elsewhere}, and schema {schema} holds no table, view, sequence or function of its own: the migrations it records created their objects in {elsewhere}, not in {schema}; nothing was recorded\n  hint: run the service in schema {elsewhere} (`--schema {elsewhere}`), or move its objects into {schema} first (`ALTER TABLE {elsewhere}.<name> SET SCHEMA {schema}`, and the same for its sequences, views and functions), then adopt again")]
    ObjectsElsewhere {
        /// The tool.
        tool: Tool,
        /// Its table.
        table: String,
        /// The schema the table is in.
        elsewhere: String,
        /// The service schema.
        schema: String,
    },
    /// Every version the other tool applied was left out ([`AdoptOptions::ignore_missing`]):
    /// their files are gone, so there is nothing to record, and `up` would run the folder's
    /// files over what that tool made.
    #[error("{tool} ({table}) applied {}, and no file in the folder has any of them: there is nothing to adopt; nothing was recorded\n  hint: {}", left_out.join(", "), nothing_left_hint(first_pending.as_ref()))]
    NothingLeft {
        /// The tool.
        tool: Tool,
        /// Its table.
        table: String,
        /// The versions it applied, all without a file.
        left_out: Vec<String>,
        /// The folder's first migration.
        first_pending: Option<Version>,
    },
    /// Reading the folder, the database, the lock, or svcdb's own history failed.
    #[error(transparent)]
    Migrate(#[from] MigrateError),
}

impl AdoptError {
    /// True when the other tool's table was not found.
    pub fn is_no_history_table(&self) -> bool {
        matches!(self, AdoptError::NoHistoryTable { .. })
    }

    /// True when the other tool's history was read and refused.
    pub fn is_refused(&self) -> bool {
        matches!(self, AdoptError::Refused { .. })
    }

    /// The problems of a refusal (empty otherwise).
    pub fn problems(&self) -> &[AdoptProblem] {
        match self {
            AdoptError::Refused { problems, .. } => problems,
            _ => &[],
        }
    }
}

impl From<tokio_postgres::Error> for AdoptError {
    fn from(e: tokio_postgres::Error) -> Self {
        AdoptError::Migrate(e.into())
    }
}

fn wrong_table_message(
    tool: &Tool,
    table: &str,
    missing: &[String],
    looks_like: Option<&Tool>,
    history_table: Option<&str>,
) -> String {
    let mut why = Vec::new();
    if !missing.is_empty() {
        why.push(format!(
            "it has no column{} {}",
            if missing.len() == 1 { "" } else { "s" },
            missing.join(", ")
        ));
    }
    match looks_like {
        Some(Tool::Dbmate) => why.push("its only column is version, as dbmate's".to_owned()),
        Some(other) => why.push(format!(
            "it has {other}'s columns {}",
            other.fingerprint().join(", ")
        )),
        None => {}
    }
    let hint = match (looks_like, history_table) {
        (Some(other), None) => format!("it looks like {other}'s: pass `--from {other}`"),
        (Some(other), Some(named)) => {
            format!("it looks like {other}'s: pass `--from {other} --history-table {named}`")
        }
        (None, _) => {
            "check `--from`, or name the right table with `--history-table schema.table`".to_owned()
        }
    };
    format!(
        "{table} is not {tool}'s history table: {}\n  hint: {hint}",
        why.join("; ")
    )
}

fn refused_message(tool: &Tool, table: &str, problems: &[AdoptProblem]) -> String {
    let mut s = format!(
        "refusing to adopt from {tool} ({table}): {} problem{}; nothing was recorded",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for p in problems {
        s.push_str(&format!("\n  {p}"));
    }
    if problems
        .iter()
        .any(|p| matches!(p, AdoptProblem::Dirty { .. }))
    {
        // As `up`'s refusal over the same table says it (found by a user trial: `status` named
        // `migrate force`, `adopt` only "that tool").
        s.push_str(&format!(
            "\n  hint: finish or undo each dirty or failed version by hand and clear its mark with {tool} ({}); restore changed or missing files from version control; then adopt again",
            clear_mark_how(*tool)
        ));
    } else {
        s.push_str("\n  hint: finish or repair the other tool's migrations with that tool (and restore changed or missing files from version control), then adopt again");
    }
    if problems
        .iter()
        .any(|p| matches!(p, AdoptProblem::ChecksumMismatch { .. }))
    {
        s.push_str("; a file changed on purpose in a way the database does not see (a psql line removed, a no-transaction directive added) can be adopted as it is with `--allow-changed` (AdoptOptions::allow_changed)");
    }
    if problems
        .iter()
        .any(|p| matches!(p, AdoptProblem::NoFile { .. }))
    {
        // Found by a user trial: a goose folder whose first versions were squashed away.
        s.push_str("; versions whose files were removed on purpose (squashed into a later one) can be left out with `--ignore-missing` (AdoptOptions::ignore_missing)");
    }
    s
}

/// What to do when every version another tool applied is gone from the folder.
fn nothing_left_hint(first_pending: Option<&Version>) -> String {
    match first_pending {
        Some(v) => format!("if their files were squashed into migration {v} (or later ones), what the schema holds is what those files make: record them as applied without running them with `svcdb migrate baseline <the newest of them>` (`--dry-run` first); otherwise point --dir at the folder the tool applied"),
        None => "point --dir at the folder the tool applied".to_owned(),
    }
}

/// How `tool` clears the mark of a dirty or failed version, once it is finished or undone by
/// hand.
pub(crate) fn clear_mark_how(tool: Tool) -> &'static str {
    match tool {
        Tool::GolangMigrate => "`migrate force <version>`",
        Tool::Flyway => "`flyway repair`",
        Tool::Sqlx => "delete the row whose success is false",
        // The others record no failed version.
        Tool::Diesel | Tool::Goose | Tool::Dbmate | Tool::Refinery | Tool::Pop => "its own way",
    }
}

/// One version the other tool applied, as read from its table.
struct Applied {
    /// As the tool wrote it.
    text: String,
    /// What it recorded about the file, to compare.
    checksum: Option<Recorded>,
}

/// A checksum another tool recorded.
enum Recorded {
    /// sqlx: SHA-384 of the file.
    Sha384(Vec<u8>),
    /// Flyway: CRC32 of the file's lines, as a signed 32-bit integer.
    Crc32(i32),
    /// refinery: SipHash-1-3 of name, version and file, as decimal text.
    SipHash(String),
}

/// The tool's history, reduced to what was applied.
struct ToolHistory {
    applied: Vec<Applied>,
    /// Flyway `BASELINE`, golang-migrate's single version: every file up to it counts as
    /// applied (without a checksum).
    up_to: Option<String>,
    problems: Vec<AdoptProblem>,
    warnings: Vec<String>,
    /// Flyway's repeatable migrations: by description, the checksum of the newest successful
    /// run, unless a failed run came after it (`None`: run it again).
    repeatables: BTreeMap<String, Option<i32>>,
}

impl Migrator {
    /// Records in svcdb's history every migration `options.from` applied to this schema, with
    /// today's checksums, without running any: see the [module documentation](self). One
    /// transaction under the schema's migration lock; the other tool's table is only read.
    /// Versions svcdb's history already has are left alone.
    pub async fn adopt(&self, options: &AdoptOptions) -> Result<AdoptReport, AdoptError> {
        let tool = options.from;
        let (table, tool_history) = {
            let conn = self.service_db().get().await.map_err(MigrateError::from)?;
            let client: &tokio_postgres::Client = &conn;
            let (table, in_schema, name) = find_table(client, self, options).await?;
            let read = read_tool(client, tool, &table)
                .await
                .map_err(|e| with_retry_table(e, options, &format!("{in_schema}.{name}")))?;
            let service = self.service_db().schema().as_str();
            // Found by a user trial: diesel's table in `public`, a new service schema, and
            // adopt recorded every migration there, whose `up` then missed the tables.
            if in_schema != service
                && (!read.applied.is_empty() || read.up_to.is_some())
                && !holds_objects(client, service).await?
            {
                return Err(AdoptError::ObjectsElsewhere {
                    tool,
                    table,
                    elsewhere: in_schema,
                    schema: service.to_owned(),
                });
            }
            (table, read)
        };
        let (adopted_repeatables, repeatable_warnings) =
            self.match_repeatables(&tool_history.repeatables);
        let (plan, pending, mut warnings) =
            self.match_files(tool, &table, tool_history, options)?;
        warnings.extend(repeatable_warnings);
        let schema = self.service_db().schema();
        // `ours`: svcdb's history already there.
        let report = |recorded: Vec<RunEntry>,
                      already: Vec<Version>,
                      warnings: Vec<String>,
                      ours: &history::History| {
            // Found by a user trial: adopting again after `up` listed as pending what svcdb
            // had applied since.
            let pending: Vec<Version> = pending
                .iter()
                .filter(|v| ours.get(v).is_none())
                .cloned()
                .collect();
            // Found adopting a goose schema whose middle version was rolled back: adopt
            // said "run `svcdb migrate up`", which then refused it as out of order.
            let newest = recorded.iter().map(|e| &e.version).chain(&already).max();
            let out_of_order = pending
                .iter()
                .filter(|v| newest.is_some_and(|newest| *v < newest))
                .cloned()
                .collect();
            AdoptReport {
                schema: schema.as_str().to_owned(),
                from: tool,
                table: table.clone(),
                dry_run: options.dry_run,
                recorded,
                already_recorded: already,
                pending,
                out_of_order,
                warnings,
                repeatables: adopted_repeatables.iter().map(|r| r.name.clone()).collect(),
            }
        };
        let entry = |m: &Migration| RunEntry {
            version: m.version.clone(),
            name: m.name.clone(),
            transactional: m.transactional,
            duration_ms: None,
        };
        if options.dry_run {
            let conn = self.service_db().get().await.map_err(MigrateError::from)?;
            let client: &tokio_postgres::Client = &conn;
            let ours = history::read(client, schema, false).await?;
            let (new, already): (Vec<&Migration>, Vec<&Migration>) =
                plan.iter().partition(|m| ours.get(&m.version).is_none());
            return Ok(report(
                new.into_iter().map(entry).collect(),
                already.into_iter().map(|m| m.version.clone()).collect(),
                warnings,
                &ours,
            ));
        }
        let (mut lock, ours) = self.lock_for_adopt().await?;
        let result = async {
            if let Some(dirty) = ours.rows.iter().find(|r| r.dirty) {
                return Err(MigrateError::Dirty {
                    schema: schema.as_str().to_owned(),
                    version: dirty.version.clone(),
                    name: dirty.name.clone(),
                });
            }
            let (new, already): (Vec<&Migration>, Vec<&Migration>) =
                plan.iter().partition(|m| ours.get(&m.version).is_none());
            let rows: Vec<(&Migration, Option<Duration>)> =
                new.iter().map(|m| (*m, None)).collect();
            let tx = lock.transaction().await?;
            if !ours.exists {
                history::create_table(&tx, schema).await?;
            }
            history::insert(&tx, schema, &rows, false).await?;
            if !adopted_repeatables.is_empty() {
                repeatable::create_table(&tx, schema).await?;
                for r in &adopted_repeatables {
                    repeatable::record(&tx, schema, r, None).await?;
                }
            }
            tx.commit().await?;
            Ok((
                new.into_iter().map(entry).collect::<Vec<_>>(),
                already.into_iter().map(|m| m.version.clone()).collect(),
            ))
        }
        .await;
        let (recorded, already) = lock.release_after(result).await?;
        Ok(report(recorded, already, warnings, &ours))
    }

    /// The repeatable migrations of the folder whose newest run by Flyway was of the file as
    /// it is now (by Flyway's checksum), and warnings about the others: a changed one stays
    /// due, and `up` runs it again, as Flyway would.
    fn match_repeatables(
        &self,
        ran: &BTreeMap<String, Option<i32>>,
    ) -> (Vec<&Repeatable>, Vec<String>) {
        let mut adopted = Vec::new();
        let mut warnings = Vec::new();
        for (description, checksum) in ran {
            // Flyway's description is the file's name with `_` read as a space.
            let file = self
                .migrations()
                .repeatables()
                .iter()
                .find(|r| r.name.replace('_', " ") == *description);
            let Some(r) = file else {
                warnings.push(format!(
                    "Flyway's repeatable migration {description:?} has no R__ file in the folder: not recorded"
                ));
                continue;
            };
            let current = std::fs::read(&r.path)
                .ok()
                .map(|bytes| flyway_checksum(&String::from_utf8_lossy(&bytes)));
            if checksum.is_some() && *checksum == current {
                adopted.push(r);
            } else {
                warnings.push(format!(
                    "Flyway's repeatable migration {description:?} last ran with another version of {} (or failed): not recorded, so `svcdb migrate up` runs it again",
                    r.path
                ));
            }
        }
        (adopted, warnings)
    }

    /// The files the tool applied (oldest first), the files it did not, and warnings; or every
    /// problem.
    #[allow(clippy::type_complexity)]
    fn match_files(
        &self,
        tool: Tool,
        table: &str,
        read: ToolHistory,
        options: &AdoptOptions,
    ) -> Result<(Vec<&Migration>, Vec<Version>, Vec<String>), AdoptError> {
        let allow_changed = options.allow_changed;
        let ignored_missing = |version: &str| {
            format!("version {version}: applied by {tool}, but no file in the folder has it; left out (--ignore-missing)")
        };
        let mut left_out = Vec::new();
        let ToolHistory {
            applied,
            up_to,
            mut problems,
            mut warnings,
            repeatables: _,
        } = read;
        let migrations = self.migrations();
        let mut plan: BTreeMap<Version, &Migration> = BTreeMap::new();
        if let Some(text) = up_to {
            match text.parse::<Version>() {
                Ok(limit) => {
                    if migrations.get(&limit).is_none() && tool == Tool::GolangMigrate {
                        if options.ignore_missing {
                            warnings.push(ignored_missing(&text));
                            left_out.push(text.clone());
                        } else {
                            problems.push(AdoptProblem::NoFile {
                                version: text.clone(),
                            });
                        }
                    }
                    for m in migrations.iter().filter(|m| m.version <= limit) {
                        plan.insert(m.version.clone(), m);
                    }
                }
                Err(_) => problems.push(AdoptProblem::Unsupported {
                    version: text,
                    why: NOT_A_VERSION.to_owned(),
                }),
            }
        }
        for a in applied {
            let version = match a.text.parse::<Version>() {
                Ok(v) => v,
                Err(_) => {
                    problems.push(AdoptProblem::Unsupported {
                        version: a.text,
                        why: NOT_A_VERSION.to_owned(),
                    });
                    continue;
                }
            };
            let Some(m) = migrations.get(&version) else {
                let legacy = pop_legacy(tool, migrations, &a.text);
                if !legacy.is_empty() {
                    plan.extend(legacy.into_iter().map(|m| (m.version.clone(), m)));
                } else if options.ignore_missing {
                    warnings.push(ignored_missing(&a.text));
                    left_out.push(a.text.clone());
                } else {
                    problems.push(AdoptProblem::NoFile { version: a.text });
                }
                continue;
            };
            if let Some(recorded) = &a.checksum {
                match check(recorded, m, &version) {
                    Ok(None) => {}
                    Ok(Some((recorded, computed))) if allow_changed => warnings.push(format!(
                        "version {}: {} no longer matches what {tool} applied ({tool}'s checksum {recorded}, the file's {computed}); recorded as applied with the file as it is now (allow_changed)",
                        a.text, m.path
                    )),
                    Ok(Some((recorded, computed))) => {
                        problems.push(AdoptProblem::ChecksumMismatch {
                            version: a.text.clone(),
                            path: m.path.clone(),
                            recorded,
                            computed,
                        })
                    }
                    Err(why) => warnings.push(format!(
                        "version {}: {tool}'s checksum was not checked: {why}",
                        a.text
                    )),
                }
            }
            plan.insert(version, m);
        }
        if !problems.is_empty() {
            return Err(AdoptError::Refused {
                tool,
                table: table.to_owned(),
                problems,
            });
        }
        let pending: Vec<Version> = migrations
            .iter()
            .filter(|m| !plan.contains_key(&m.version))
            .map(|m| m.version.clone())
            .collect();
        if plan.is_empty() && !left_out.is_empty() {
            // Found by a user trial: every applied version squashed away, adopt recorded
            // nothing and said "run up", and `up` sent them back to adopt.
            return Err(AdoptError::NothingLeft {
                tool,
                table: table.to_owned(),
                left_out,
                first_pending: pending.first().cloned(),
            });
        }
        Ok((plan.into_values().collect(), pending, warnings))
    }
}

/// The migrations a pop row of a 14-digit version applied when no file has that version:
/// ory's popx recorded its migrations under their first 14 digits before it wrote 20, and
/// counts such a row as applying every migration whose version starts with it (popx's
/// `Status`: `applied == version[:14]`). None for other tools or rows.
fn pop_legacy<'m>(tool: Tool, migrations: &'m super::Migrations, text: &str) -> Vec<&'m Migration> {
    if tool != Tool::Pop || text.len() != 14 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Vec::new();
    }
    migrations
        .iter()
        .filter(|m| m.version.digits().count() > 14 && m.version.digits().take(14).eq(text.bytes()))
        .collect()
}

/// Another tool's history table, found where [`Migrator::adopt`] looks for it (the service
/// schema, then `public`): reported when svcdb has applied nothing, since `up` would then run
/// every migration again over what that tool made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OtherHistory {
    /// The tool whose table it is, by its name and columns.
    pub tool: Tool,
    /// The table, `schema.table`.
    pub table: String,
    /// The versions it marks dirty or failed (golang-migrate `dirty`, sqlx or Flyway
    /// `success = false`): their migrations may be half-applied, and `adopt` refuses them.
    /// Read only when the table records migrations over tables in the schema.
    pub dirty: Vec<String>,
}

/// The schemas a tool's table is looked for in: the service schema, then `public`.
fn searched_schemas(service: &str) -> Vec<String> {
    let mut schemas = vec![service.to_owned()];
    if service != "public" {
        schemas.push("public".to_owned());
    }
    schemas
}

/// Every other tool's history table in `service` and `public`, each with the tool its name and
/// columns say (golang-migrate's `schema_migrations` has `dirty`, dbmate's does not).
pub(crate) async fn other_histories(
    client: &tokio_postgres::Client,
    service: &crate::Ident,
) -> Result<Vec<OtherHistory>, tokio_postgres::Error> {
    let names: Vec<&str> = Tool::ALL.iter().map(|t| t.history_table()).collect();
    let rows = client
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname), c.relname::text,
                    array_agg(a.attname::text ORDER BY a.attnum)
               FROM pg_catalog.pg_class c
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
              WHERE c.relname = ANY($1) AND n.nspname = ANY($2) AND c.relkind IN ('r', 'p')
              GROUP BY n.nspname, c.relname
              ORDER BY array_position($2, n.nspname::text), c.relname",
            &[&names, &searched_schemas(service.as_str())],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|row| {
            let (table, name, columns): (String, String, Vec<String>) =
                (row.get(0), row.get(1), row.get(2));
            // By its name, the tool whose table it can be read as; else (another tool's
            // table under that name) the first whose columns it has, so that `up` still
            // refuses to run over it, and `adopt` names the tool it looks like.
            let named = |tool: &Tool| tool.history_table() == name;
            Tool::ALL
                .into_iter()
                .find(|tool| named(tool) && fit(*tool, &columns).is_ok())
                .or_else(|| {
                    Tool::ALL.into_iter().find(|tool| {
                        named(tool)
                            && tool
                                .columns()
                                .iter()
                                .all(|c| columns.iter().any(|have| have == c))
                    })
                })
                .map(|tool| OtherHistory {
                    tool,
                    table,
                    dirty: Vec::new(),
                })
        })
        .collect())
}

/// The first of `others` (found by [`other_histories`] while svcdb has applied nothing) that
/// `up` must not run over: it records a migration, and the service schema holds a table
/// other than svcdb's own and the tools' histories. With an empty schema running everything
/// is what the user wants; with an empty history table the other tool applied nothing.
pub(crate) async fn applied_by_other_tool(
    client: &tokio_postgres::Client,
    service: &crate::Ident,
    others: &[OtherHistory],
) -> Result<Option<OtherHistory>, tokio_postgres::Error> {
    if others.is_empty() {
        return Ok(None);
    }
    let mut own: Vec<&str> = Tool::ALL.iter().map(|t| t.history_table()).collect();
    own.extend([
        super::migration::HISTORY_TABLE,
        super::repeatable::REPEATABLES_TABLE,
        crate::outbox::OUTBOX_TABLE,
        crate::idempotency::PROCESSED_EVENTS_TABLE,
    ]);
    let holds_tables: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_class c
                              JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                             WHERE n.nspname = $1 AND c.relkind IN ('r', 'p')
                               AND c.relname <> ALL($2))",
            &[&service.as_str(), &own],
        )
        .await?
        .get(0);
    if !holds_tables {
        return Ok(None);
    }
    for other in others {
        // `table` is `format('%I.%I')`: quoted as an identifier already.
        let sql = format!("SELECT EXISTS (SELECT 1 FROM {})", other.table);
        if client.query_one(&sql, &[]).await?.get::<_, bool>(0) {
            // Found by a user trial: the refusal pointed at `adopt`, which then refused the
            // dirty version. A table that does not read as the tool's own says nothing here;
            // `adopt` reports it.
            let dirty = match read_tool(client, other.tool, &other.table).await {
                Ok(history) => history
                    .problems
                    .into_iter()
                    .filter_map(|p| match p {
                        AdoptProblem::Dirty { version } => Some(version),
                        _ => None,
                    })
                    .collect(),
                Err(_) => Vec::new(),
            };
            return Ok(Some(OtherHistory {
                dirty,
                ..other.clone()
            }));
        }
    }
    Ok(None)
}

/// The first other tool's history (found as [`other_histories`] finds them) that records,
/// in rows written after svcdb's adoption, any of `pending` (svcdb's pending versions) as
/// applied, with those versions. After an adoption, a replica of the old release still running
/// that tool at start-up may apply a version before svcdb does (found by a user trial: `up`
/// then ran goose's version again, or failed on "relation already exists"). Rows from before
/// the adoption say nothing: svcdb may have reverted what they record since.
///
/// "After" is told by the rows' `xmin`, the transaction that wrote them, against the newest
/// adopted or baselined row of svcdb's history (`execution_us` NULL): `age()` counts back from
/// the current transaction, so the younger row has the smaller age (until some two billion
/// transactions later, when transaction ids wrap around). No adopted row: `None`. The
/// history table must exist.
pub(crate) async fn pending_applied_by_other_tool(
    client: &tokio_postgres::Client,
    service: &crate::Ident,
    pending: &[&Migration],
) -> Result<Option<(OtherHistory, Vec<String>)>, tokio_postgres::Error> {
    for other in other_histories(client, service).await? {
        // The version column, and what makes a row an applied version, as `read_tool` reads
        // them. golang-migrate's one row names the newest version: every one up to it.
        let (version, applied, up_to) = match other.tool {
            Tool::Diesel | Tool::Dbmate | Tool::Refinery | Tool::Pop => {
                ("version::text", "true", false)
            }
            Tool::Sqlx => ("version::text", "success", false),
            Tool::GolangMigrate => ("version::text", "NOT dirty", true),
            Tool::Goose => ("version_id::text", "is_applied", false),
            Tool::Flyway => ("version", "success AND type = 'SQL'", false),
        };
        // One statement: `age()` counts from a point that moves with every transaction the
        // server starts, so ages read in two statements do not compare (found by a flaky
        // run, with other tests' transactions in between). No adopted row: NULL, no rows.
        let sql = format!(
            "SELECT {version} FROM {} WHERE {applied} AND {version} IS NOT NULL \
               AND age(xmin) < (SELECT min(age(xmin)) FROM {} \
                                 WHERE execution_us IS NULL AND NOT dirty)",
            other.table,
            history::table(service)
        );
        let Ok(rows) = client.query(&sql, &[]).await else {
            // Not the tool's table after all (`other_histories` matched its name only).
            continue;
        };
        let recorded: Vec<Version> = rows
            .iter()
            .filter_map(|r| r.get::<_, String>(0).parse().ok())
            .collect();
        let versions: Vec<String> = pending
            .iter()
            .filter(|m| {
                recorded
                    .iter()
                    .any(|v| *v == m.version || (up_to && m.version <= *v))
            })
            .map(|m| m.version.to_string())
            .collect();
        if !versions.is_empty() {
            return Ok(Some((other, versions)));
        }
    }
    Ok(None)
}

/// What to do when the tool's table is not there: the `--from` of another tool's table that
/// is (found by a user trial: `--from sqlx` on a diesel schema said only "check `--from`"),
/// else how to name the table.
fn no_history_hint(found: &[OtherHistory]) -> String {
    match found.first() {
        Some(other) => format!(
            "{}'s history table {} is here: adopt with `--from {}`",
            other.tool, other.table, other.tool
        ),
        None => "name it with `--history-table schema.table` (AdoptOptions::history_table), or check `--from`".to_owned(),
    }
}

/// `schema.table` or `table` as SQL writes a name: a part in double quotes as it is (`""` for
/// a quote), any other part in lower case, as PostgreSQL folds it (found by a user trial:
/// `"public"."goose_db_version"` and `PUBLIC.GOOSE_DB_VERSION` were looked up as written).
/// `None` for more than two parts or an unclosed quote.
fn parse_table_name(named: &str) -> Option<(Option<String>, String)> {
    let mut parts = Vec::new();
    let mut chars = named.trim().chars().peekable();
    loop {
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next()? {
                    '"' if chars.peek() == Some(&'"') => {
                        chars.next();
                        part.push('"');
                    }
                    '"' => break,
                    c => part.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' {
                    break;
                }
                part.extend(c.to_lowercase());
                chars.next();
            }
        }
        if part.is_empty() {
            return None;
        }
        parts.push(part);
        match chars.next() {
            None => break,
            Some('.') => continue,
            Some(_) => return None,
        }
    }
    match <[String; 2]>::try_from(parts) {
        Ok([schema, table]) => Some((Some(schema), table)),
        Err(parts) => match <[String; 1]>::try_from(parts) {
            Ok([table]) => Some((None, table)),
            Err(_) => None,
        },
    }
}

/// The other tool's table, quoted and qualified (`"public"."_sqlx_migrations"`), the schema
/// it is in and its name; or where it was looked for.
async fn find_table(
    client: &tokio_postgres::Client,
    migrator: &Migrator,
    options: &AdoptOptions,
) -> Result<(String, String, String), AdoptError> {
    let service = migrator.service_db().schema().as_str().to_owned();
    let (schemas, table) = match options.history_table.as_deref() {
        Some(named) => match parse_table_name(named) {
            Some((Some(schema), table)) => (vec![schema], table),
            Some((None, table)) => (searched_schemas(&service), table),
            // Looked up as written: not found, and the error shows it.
            None => (searched_schemas(&service), named.to_owned()),
        },
        None => (
            searched_schemas(&service),
            options.from.history_table().to_owned(),
        ),
    };
    let row = client
        .query_opt(
            "SELECT format('%I.%I', n.nspname, c.relname), n.nspname::text
               FROM pg_catalog.pg_class c
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relname = $1 AND n.nspname = ANY($2) AND c.relkind IN ('r', 'p')
              ORDER BY array_position($2, n.nspname::text)
              LIMIT 1",
            &[&table, &schemas],
        )
        .await?;
    match row {
        Some(row) => Ok((row.get(0), row.get(1), table)),
        None => Err(AdoptError::NoHistoryTable {
            tool: options.from,
            looked_in: schemas.iter().map(|s| format!("{s}.{table}")).collect(),
            found: other_histories(client, migrator.service_db().schema())
                .await?
                .into_iter()
                .filter(|other| other.tool != options.from)
                .collect(),
        }),
    }
}

/// Whether `schema` holds a relation (table, view, sequence, …) or function besides svcdb's
/// own tables.
async fn holds_objects(client: &tokio_postgres::Client, schema: &str) -> Result<bool, AdoptError> {
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_class c
                             WHERE c.relnamespace = to_regnamespace($1) AND c.relname NOT LIKE 'svcdb\\_%'
                               AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f'))
                 OR EXISTS (SELECT 1 FROM pg_catalog.pg_proc p WHERE p.pronamespace = to_regnamespace($1))",
            &[&schema],
        )
        .await
        .map_err(MigrateError::from)?;
    Ok(row.get(0))
}

/// Why a table's columns are not a tool's.
#[derive(Debug, PartialEq, Eq)]
struct Misfit {
    /// The columns the tool reads that it lacks.
    missing: Vec<String>,
    /// The other tool whose table it looks like, if one's.
    looks_like: Option<Tool>,
}

/// The tool whose table `columns` are, when one's: the tool with the most columns of its
/// [`fingerprint`](Tool::fingerprint) all there (`preferred` when it ties), or dbmate for a
/// table whose only column is `version`. A Flyway table has sqlx's columns too, and more.
fn looks_like(columns: &[String], preferred: Tool) -> Option<Tool> {
    let has = |c: &&str| columns.iter().any(|have| have == c);
    Tool::ALL
        .into_iter()
        .filter(|t| match t {
            Tool::Dbmate => columns.len() == 1 && columns[0] == "version",
            _ => t.fingerprint().iter().all(has),
        })
        .max_by_key(|t| (t.fingerprint().len(), *t == preferred))
}

/// Whether `columns` can be read as `tool`'s table: every column `tool` reads, and no other
/// tool's table by its own columns. A table of `version` alone (dbmate's) counts as diesel's
/// too: diesel reads nothing else, and the two read it alike.
fn fit(tool: Tool, columns: &[String]) -> Result<(), Misfit> {
    let missing: Vec<String> = tool
        .columns()
        .iter()
        .filter(|c| !columns.iter().any(|have| have == *c))
        .map(|c| (*c).to_owned())
        .collect();
    let looks_like = looks_like(columns, tool).filter(|other| *other != tool);
    let another = looks_like.is_some_and(|other| other != Tool::Dbmate);
    if missing.is_empty() && !another {
        return Ok(());
    }
    Err(Misfit {
        missing,
        looks_like,
    })
}

/// `e`, when it refuses a table that looks like another tool's, with the
/// [`AdoptOptions::history_table`] to adopt from that tool with: the one given, or `found`
/// (`schema.table`) when that tool looks for another name.
fn with_retry_table(e: AdoptError, options: &AdoptOptions, found: &str) -> AdoptError {
    match e {
        AdoptError::NotTheToolsTable {
            tool,
            table,
            missing,
            looks_like: Some(other),
            history_table: None,
        } => {
            let history_table = match &options.history_table {
                Some(named) => Some(named.clone()),
                None if other.history_table() == tool.history_table() => None,
                None => Some(found.to_owned()),
            };
            AdoptError::NotTheToolsTable {
                tool,
                table,
                missing,
                looks_like: Some(other),
                history_table,
            }
        }
        e => e,
    }
}

/// Reads `table` as `tool` writes it.
async fn read_tool(
    client: &tokio_postgres::Client,
    tool: Tool,
    table: &str,
) -> Result<ToolHistory, AdoptError> {
    let columns: Vec<String> = client
        .query(
            "SELECT attname::text FROM pg_catalog.pg_attribute
              WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped",
            &[&table],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    // Found by a user trial: `--from diesel --history-table arroyo.refinery_schema_history`
    // read refinery's table, which has a `version`, and recorded every migration without
    // checking refinery's checksums.
    if let Err(misfit) = fit(tool, &columns) {
        return Err(AdoptError::NotTheToolsTable {
            tool,
            table: table.to_owned(),
            missing: misfit.missing,
            looks_like: misfit.looks_like,
            history_table: None,
        });
    }
    let mut h = ToolHistory {
        applied: Vec::new(),
        up_to: None,
        problems: Vec::new(),
        warnings: Vec::new(),
        repeatables: BTreeMap::new(),
    };
    let plain = |text: String| Applied {
        text,
        checksum: None,
    };
    match tool {
        Tool::Diesel | Tool::Dbmate | Tool::Pop => {
            let rows = client
                .query(&format!("SELECT version::text FROM {table}"), &[])
                .await?;
            h.applied = rows.iter().map(|r| plain(r.get(0))).collect();
        }
        Tool::Sqlx => {
            let rows = client
                .query(
                    &format!(
                        "SELECT version::text, success, checksum FROM {table} ORDER BY version"
                    ),
                    &[],
                )
                .await?;
            for r in rows {
                let text: String = r.get(0);
                if !r.get::<_, bool>(1) {
                    h.problems.push(AdoptProblem::Dirty { version: text });
                    continue;
                }
                h.applied.push(Applied {
                    text,
                    checksum: Some(Recorded::Sha384(r.get(2))),
                });
            }
        }
        Tool::GolangMigrate => {
            // golang-migrate keeps one row: the current version, and whether it is dirty.
            let rows = client
                .query(&format!("SELECT version::text, dirty FROM {table}"), &[])
                .await?;
            for r in rows {
                let text: String = r.get(0);
                if r.get::<_, bool>(1) {
                    h.problems.push(AdoptProblem::Dirty { version: text });
                } else if h.up_to.replace(text).is_some() {
                    h.warnings.push(
                        "golang-migrate's table has several rows; the last one read counts"
                            .to_owned(),
                    );
                }
            }
        }
        Tool::Goose => {
            // goose appends a row per up (is_applied = true) and, before v3.16, per down
            // (false); the newest row of a version says where it stands. Version 0 is the row
            // goose writes when it creates the table.
            let rows = client
                .query(
                    &format!("SELECT version_id::text, is_applied FROM {table} ORDER BY id"),
                    &[],
                )
                .await?;
            let mut state: BTreeMap<String, bool> = BTreeMap::new();
            let mut order = Vec::new();
            for r in rows {
                let text: String = r.get(0);
                if text == "0" {
                    continue;
                }
                if state.insert(text.clone(), r.get(1)).is_none() {
                    order.push(text);
                }
            }
            h.applied = order.into_iter().filter(|v| state[v]).map(plain).collect();
        }
        Tool::Flyway => {
            let rows = client
                .query(
                    &format!(
                        "SELECT version, type, checksum, success, description FROM {table} ORDER BY installed_rank"
                    ),
                    &[],
                )
                .await?;
            let mut applied: BTreeMap<String, Option<i32>> = BTreeMap::new();
            for r in rows {
                let version: Option<String> = r.get(0);
                let kind: String = r.get(1);
                let checksum: Option<i32> = r.get(2);
                let success: bool = r.get(3);
                let description: String = r.get(4);
                let Some(version) = version else {
                    if kind == "SQL" {
                        // The newest run decides: a failed one must run again.
                        h.repeatables
                            .insert(description, checksum.filter(|_| success));
                    }
                    continue;
                };
                if !success {
                    h.problems.push(AdoptProblem::Dirty { version });
                    continue;
                }
                match kind.as_str() {
                    "SQL" => {
                        applied.insert(version, checksum);
                    }
                    // A baseline migration (`B<version>__…sql`, Flyway 9): its script built the
                    // schema as of `version`, and Flyway skips every version up to it, as for a
                    // `baseline` row (found by a user trial: hawkbit ships one).
                    "BASELINE" | "SQL_BASELINE" => h.up_to = Some(version),
                    "UNDO_SQL" | "DELETE" => {
                        applied.remove(&version);
                    }
                    "SCHEMA" => {}
                    other => h.problems.push(AdoptProblem::Unsupported {
                        version,
                        why: format!("a Flyway {other} migration: svcdb runs SQL files only"),
                    }),
                }
            }
            h.applied = applied
                .into_iter()
                .map(|(text, checksum)| Applied {
                    text,
                    checksum: checksum.map(Recorded::Crc32),
                })
                .collect();
        }
        Tool::Refinery => {
            let rows = client
                .query(
                    &format!("SELECT version::text, checksum FROM {table} ORDER BY version"),
                    &[],
                )
                .await?;
            h.applied = rows
                .iter()
                .map(|r| Applied {
                    text: r.get(0),
                    checksum: r.get::<_, Option<String>>(1).map(Recorded::SipHash),
                })
                .collect();
        }
    }
    Ok(h)
}

/// Compares a recorded checksum with the file's, computed as the tool computes it:
/// `Ok(None)` when they match, `Ok(Some((recorded, computed)))` when not, `Err(why)` when the
/// file cannot be read.
fn check(
    recorded: &Recorded,
    m: &Migration,
    version: &Version,
) -> Result<Option<(String, String)>, String> {
    // The tools hash the file as it is on disk (byte-order mark, line endings and all), so
    // read it again rather than use the parsed script.
    let file = std::fs::read(&m.path).map_err(|e| format!("cannot read {}: {e}", m.path))?;
    let text = String::from_utf8_lossy(&file);
    let differ = |recorded: String, computed: String| {
        Ok((recorded != computed).then_some((recorded, computed)))
    };
    // sqlx and refinery hash the raw text, so a checkout with other line endings than the
    // build that applied it (Windows `core.autocrlf`) reads as an edit (sqlx issue #2659).
    // svcdb's own checksum ignores line endings; so does this check: the file as it is, with
    // LF, or with CRLF line endings.
    let lf = text.replace("\r\n", "\n");
    let variants = [text.to_string(), lf.clone(), lf.replace('\n', "\r\n")];
    match recorded {
        Recorded::Sha384(bytes) => {
            let recorded = hex::encode(bytes);
            let computed: Vec<String> = variants
                .iter()
                .map(|v| hex::encode(sha384(v.as_bytes())))
                .collect();
            differ_unless_any(recorded, computed)
        }
        // Flyway's own checksum ignores line endings already.
        Recorded::Crc32(value) => differ(value.to_string(), flyway_checksum(&text).to_string()),
        Recorded::SipHash(value) => {
            // refinery hashes its version as an i32 (an i64 with its `int8-versions` feature,
            // a usize before 0.6): accept either width.
            let number = version.number();
            let mut computed = Vec::new();
            for v in &variants {
                if let Ok(narrow) = i32::try_from(number) {
                    computed.push(refinery_checksum(&m.name, narrow, v).to_string());
                }
                computed.push(refinery_checksum(&m.name, number, v).to_string());
            }
            differ_unless_any(value.clone(), computed)
        }
    }
}

/// A match when any of `computed` is `recorded`; else the first, to show.
fn differ_unless_any(
    recorded: String,
    computed: Vec<String>,
) -> Result<Option<(String, String)>, String> {
    if computed.contains(&recorded) {
        return Ok(None);
    }
    let first = computed.into_iter().next().unwrap_or_default();
    Ok(Some((recorded, first)))
}

fn sha384(bytes: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha384::digest(bytes).to_vec()
}

/// Flyway's checksum (`ChecksumCalculator`): CRC32 over the UTF-8 bytes of each line without
/// its line ending (Java's `BufferedReader.readLine`, which ends a line at `\n`, `\r` or
/// `\r\n`), a byte-order mark removed from the first, cast to a signed 32-bit integer.
fn flyway_checksum(text: &str) -> i32 {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut crc = Crc32::new();
    let mut rest = text;
    while !rest.is_empty() {
        let end = rest.find(['\n', '\r']).unwrap_or(rest.len());
        crc.update(&rest.as_bytes()[..end]);
        rest = &rest[end..];
        rest = rest
            .strip_prefix("\r\n")
            .or_else(|| rest.strip_prefix('\n'))
            .or_else(|| rest.strip_prefix('\r'))
            .unwrap_or(rest);
    }
    crc.finish() as i32
}

/// CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320), as `java.util.zip.CRC32` computes
/// it. Bitwise: a migration file is small.
struct Crc32(u32);

impl Crc32 {
    fn new() -> Self {
        Crc32(!0)
    }

    fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u32::from(b);
            for _ in 0..8 {
                self.0 = (self.0 >> 1) ^ (0xEDB8_8320 & (self.0 & 1).wrapping_neg());
            }
        }
    }

    fn finish(&self) -> u32 {
        !self.0
    }
}

/// refinery's checksum (`Migration::unapplied`): SipHash-1-3 with zero keys over the name,
/// the version and the SQL, each through `Hash` (a `str` is its bytes then 0xff; an integer
/// its native-endian bytes, little-endian on every platform refinery ships for).
fn refinery_checksum<N: Hash>(name: &str, version: N, sql: &str) -> u64 {
    let mut hasher = siphasher::sip::SipHasher13::new();
    name.hash(&mut hasher);
    version.hash(&mut hasher);
    sql.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        // The CRC-32 check value of "123456789" (as java.util.zip.CRC32 gives it).
        let mut crc = Crc32::new();
        crc.update(b"123456789");
        assert_eq!(crc.finish(), 0xCBF4_3926);
    }

    #[test]
    fn flyway_checksums_ignore_line_endings_and_the_bom() {
        let lf = flyway_checksum("CREATE TABLE a (id int);\nSELECT 1;\n");
        assert_eq!(
            flyway_checksum("CREATE TABLE a (id int);\r\nSELECT 1;\r\n"),
            lf
        );
        assert_eq!(
            flyway_checksum("\u{feff}CREATE TABLE a (id int);\rSELECT 1;"),
            lf
        );
        assert_ne!(
            flyway_checksum("CREATE TABLE a (id bigint);\nSELECT 1;\n"),
            lf
        );
    }

    /// Each tool's table, by the columns its own DDL gives it.
    fn ddl_columns(tool: Tool) -> Vec<String> {
        let columns: &[&str] = match tool {
            Tool::Diesel => &["version", "run_on"],
            Tool::Sqlx => &[
                "version",
                "description",
                "installed_on",
                "success",
                "checksum",
                "execution_time",
            ],
            Tool::GolangMigrate => &["version", "dirty"],
            Tool::Goose => &["id", "version_id", "is_applied", "tstamp"],
            Tool::Dbmate => &["version"],
            Tool::Flyway => &[
                "installed_rank",
                "version",
                "description",
                "type",
                "script",
                "checksum",
                "installed_by",
                "installed_on",
                "execution_time",
                "success",
            ],
            Tool::Refinery => &["version", "name", "applied_on", "checksum"],
            Tool::Pop => &["version", "version_self"],
        };
        columns.iter().map(|c| (*c).to_owned()).collect()
    }

    /// Every tool's table is read as its own and refused as any other's, naming its tool,
    /// whose own read then fits (the hint never names a tool that would refuse it too); but
    /// diesel reads a table of `version` alone, as dbmate does.
    #[test]
    fn each_tools_table_is_its_own_and_named_when_another_is_asked() {
        for owner in Tool::ALL {
            let columns = ddl_columns(owner);
            assert_eq!(looks_like(&columns, owner), Some(owner), "{owner}");
            assert_eq!(fit(owner, &columns), Ok(()), "{owner}");
            for asked in Tool::ALL.into_iter().filter(|t| *t != owner) {
                let result = fit(asked, &columns);
                // diesel and gobuffalo's pop read a table of `version` alone as dbmate does.
                if matches!((asked, owner), (Tool::Diesel | Tool::Pop, Tool::Dbmate)) {
                    assert_eq!(result, Ok(()));
                    continue;
                }
                let misfit = result.expect_err(&format!("{asked} over {owner}'s"));
                assert_eq!(misfit.looks_like, Some(owner), "{asked} over {owner}'s");
            }
        }
        // A table that is no tool's names none.
        let odd = vec!["version".to_owned(), "applied".to_owned()];
        assert_eq!(
            fit(Tool::Sqlx, &odd),
            Err(Misfit {
                missing: vec!["success".to_owned(), "checksum".to_owned()],
                looks_like: None
            })
        );
        assert_eq!(fit(Tool::Dbmate, &odd), Ok(()));
    }

    #[test]
    fn a_history_table_is_named_as_sql_names_it() {
        let both = |s: &str, t: &str| Some((Some(s.to_owned()), t.to_owned()));
        assert_eq!(
            super::parse_table_name("public.goose_db_version"),
            both("public", "goose_db_version")
        );
        assert_eq!(
            super::parse_table_name("\"public\".\"goose_db_version\""),
            both("public", "goose_db_version")
        );
        assert_eq!(
            super::parse_table_name("PUBLIC.GOOSE_DB_VERSION"),
            both("public", "goose_db_version")
        );
        assert_eq!(
            super::parse_table_name("\"My \"\"S\".t"),
            both("My \"S", "t")
        );
        assert_eq!(super::parse_table_name("T"), Some((None, "t".to_owned())));
        for bad in ["a.b.c", "\"open", "a.", ".b", "", "\"a\"b"] {
            assert_eq!(super::parse_table_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn tools_parse_by_their_names() {
        for tool in Tool::ALL {
            assert_eq!(tool.name().parse::<Tool>().unwrap(), tool);
        }
        assert!("liquibase".parse::<Tool>().is_err());
    }
}
