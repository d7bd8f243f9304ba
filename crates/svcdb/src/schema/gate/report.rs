//! The gate's verdict: [`GateReport`], the [`Problem`]s that fail it and the [`Notice`]s that
//! do not, with their messages, hints and JSON form. A leaf: the error module reports a failed
//! gate with these types.

use std::borrow::Cow;
use std::fmt;

use serde::{Serialize, Serializer};

use crate::migrate::migration::{Named, HISTORY_TABLE};
use crate::migrate::version::Version;

/// The hint for tables missing from the service schema
/// ([`Error::MissingTables`](crate::Error::MissingTables), and the gate's
/// [`Problem::MissingTable`]).
pub(crate) const MISSING_TABLES_HINT: &str =
    "run `svcdb migrate up` if migrations create the missing tables; otherwise check that SVCDB_SCHEMA names the service's schema";

/// One reason the service is not ready. Serialized (in reports) with a `kind` tag
/// (`"missing_table"`, …), its fields, a `message` and a `hint`; match on the variant, not on
/// the text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Problem {
    /// No connection could be had, or the database did not answer, within the timeout (server
    /// down, wrong address or credentials, every connection busy). Nothing else was checked.
    Unreachable {
        /// What went wrong.
        error: String,
        /// What to do (shown as the problem's hint).
        #[serde(skip)]
        hint: String,
    },
    /// A check's query failed with a database error (e.g. permission denied on the history
    /// table).
    QueryFailed {
        /// The server's message.
        error: String,
    },
    /// The configured schema does not exist.
    NoSchema {
        /// The configured schema.
        schema: String,
        /// The database's schemas whose names look like it (a misspelled `SVCDB_SCHEMA`),
        /// closest first.
        similar: Vec<String>,
    },
    /// The role has no `USAGE` privilege on the configured schema.
    NoSchemaAccess {
        /// The configured schema.
        schema: String,
        /// The role connections log in as.
        role: String,
    },
    /// Connections resolve names in another schema than the configured one.
    WrongSchema {
        /// The configured schema.
        expected: String,
        /// `current_schema()` on a pooled connection (`None`: no usable schema).
        active: Option<String>,
    },
    /// The service ships migrations but the history table does not exist: they never ran.
    NoHistory {
        /// The configured schema.
        schema: String,
        /// How many migrations the service ships (all pending).
        pending: usize,
    },
    /// The gate was given migrations, none of them versioned (an empty folder, or only
    /// repeatable ones), but the history has applied ones: most likely the wrong folder.
    NoneShipped {
        /// How many migrations the history has.
        applied: usize,
    },
    /// A non-transactional migration failed part-way; the schema may be half-migrated.
    Dirty {
        /// Its version.
        version: Version,
        /// Its name.
        name: String,
    },
    /// A migration the service ships is not applied.
    Pending {
        /// Its version.
        version: Version,
        /// Its name.
        name: String,
    },
    /// A migration the service ships is not applied, and its file is still the template
    /// `svcdb migrate new` wrote, which `svcdb migrate up` refuses to run.
    Unwritten {
        /// Its version.
        version: Version,
        /// Its name.
        name: String,
        /// Its up file.
        path: String,
    },
    /// An applied migration's file changed since it was applied.
    Changed {
        /// Its version.
        version: Version,
        /// Its name.
        name: String,
        /// Its up file.
        path: String,
    },
    /// A migration is applied that the service does not ship although it ships newer ones: a
    /// gap (a branch's or another release's migration ran on this database). Unknown
    /// migrations newer than every shipped one are not a problem but a
    /// [`Notice::NewerApplied`].
    UnknownApplied {
        /// Its version.
        version: Version,
        /// Its name in the history table.
        name: String,
        /// The newest version the service ships (newer than this one).
        newest_shipped: Version,
    },
    /// A required table is missing from the service schema.
    MissingTable {
        /// The configured schema.
        schema: String,
        /// The missing table.
        table: String,
    },
}

impl Problem {
    /// What is wrong, in one line.
    pub fn message(&self) -> String {
        match self {
            Problem::Unreachable { error, .. } => format!("database unreachable: {error}"),
            Problem::QueryFailed { error } => format!("a check's query failed: {error}"),
            Problem::NoSchema { schema, similar } if similar.is_empty() => {
                format!("schema {schema} does not exist")
            }
            Problem::NoSchema { schema, similar } => format!(
                "schema {schema} does not exist; similar: {}",
                similar.join(", ")
            ),
            Problem::NoSchemaAccess { schema, role } => {
                format!("role {role} may not use schema {schema} (no USAGE privilege)")
            }
            Problem::WrongSchema { expected, active } => format!(
                "connections use schema {}, not {expected}: the search_path pinned at connect time was changed or dropped",
                active.as_deref().unwrap_or("(none)")
            ),
            Problem::NoHistory { schema, pending } => format!(
                "migrations never ran in schema {schema}: its history table {HISTORY_TABLE} does not exist ({pending} migration{} to apply)",
                if *pending == 1 { "" } else { "s" }
            ),
            Problem::Dirty { version, name } => format!(
                "migration {} is dirty: it failed part-way and may be half-applied (no runner is migrating the schema)",
                Named(version, name)
            ),
            Problem::Pending { version, name } => {
                format!("migration {} is not applied", Named(version, name))
            }
            Problem::Unwritten {
                version,
                name,
                path,
            } => format!(
                "migration {} is not applied, and {path} is still the template `svcdb migrate new` wrote",
                Named(version, name)
            ),
            Problem::NoneShipped { applied } => format!(
                "the service ships no versioned migration, but the history has {applied} applied: the migrations checked are not the service's"
            ),
            Problem::Changed {
                version,
                name,
                path,
            } => format!(
                "migration {} was changed after it was applied: {path} no longer matches the history's checksum",
                Named(version, name)
            ),
            Problem::UnknownApplied {
                version,
                name,
                newest_shipped,
            } => format!(
                "migration {} is applied but this release does not ship it, though it ships newer ones (up to {newest_shipped}): a branch's or another release's migration ran here",
                Named(version, name)
            ),
            Problem::MissingTable { schema, table } => {
                format!("table {table} is missing from schema {schema}")
            }
        }
    }

    /// What to do about it.
    pub fn hint(&self) -> Cow<'_, str> {
        Cow::Borrowed(match self {
            Problem::Unreachable { hint, .. } => return Cow::Borrowed(hint),
            Problem::QueryFailed { .. } => {
                "check the role's privileges on the service schema (`svcdb provision` grants them)"
            }
            Problem::NoSchema { similar, .. } if !similar.is_empty() => {
                "if SVCDB_SCHEMA is misspelled, set it to the right one; otherwise run `svcdb provision` for this service (or start the service with SVCDB_CREATE_SCHEMA=true, which creates it on connect)"
            }
            Problem::NoSchema { .. } => {
                "run `svcdb provision` for this service (or start the service with SVCDB_CREATE_SCHEMA=true, which creates it on connect), or fix SVCDB_SCHEMA"
            }
            Problem::NoSchemaAccess { .. } => {
                "run `svcdb provision` for this service's role, or connect as the schema's owner"
            }
            Problem::WrongSchema { .. } => {
                "use `SET LOCAL search_path` inside a transaction, never `SET` on a pooled connection; behind PgBouncer, which drops the `options` startup parameter, pin it on the role (`ALTER ROLE … SET search_path`)"
            }
            Problem::NoHistory { .. } => "run `svcdb migrate up`",
            Problem::NoneShipped { .. } => {
                "point the check at the service's migrations folder (`--dir`, SVCDB_MIGRATIONS_DIR), or give the gate the service's embedded migrations"
            }
            Problem::Pending { .. } => {
                "run `svcdb migrate up` (a migration older than the newest applied one also needs `--allow-out-of-order`, or a newer version); `svcdb migrate status` says first whether `up` would refuse one, and why (an unsafe statement, a changed file)"
            }
            Problem::Unwritten { .. } => {
                "write the migration's SQL in it (and the statements that undo them in its down script), then run `svcdb migrate up`"
            }
            Problem::Dirty { .. } => {
                "finish or undo that migration's statements by hand (`svcdb migrate repair` names the invalid indexes to drop), then run `svcdb migrate repair`; if you finished them, `svcdb migrate baseline <its version>` then records it as applied"
            }
            Problem::Changed { .. } => {
                "restore the file and put the change in a new migration, or run `svcdb migrate repair` if the edit is harmless"
            }
            Problem::UnknownApplied { .. } => {
                "find the branch or release that ships it: add its file to this release if it belongs, or revert it with that release's `svcdb migrate down` (which reverts the ones after it too); if its file was removed on purpose, accept it with `--ignore-missing` (Gate::allow_unknown_applied, MigrateOptions::ignore_missing for a service)"
            }
            Problem::MissingTable { .. } => MISSING_TABLES_HINT,
        })
    }
}

/// The message and its hint on a second line.
impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}\n  hint: {}", self.message(), self.hint())
    }
}

/// The gate's verdict: every problem it found, and the migration version it saw. Serialized with
/// its fields, each problem as a `kind`, its fields, a `message` and a `hint`, each notice as a
/// `kind`, its fields and a `message`.
#[derive(Debug, Clone)]
pub struct GateReport {
    /// True when there is no problem.
    pub ready: bool,
    /// The configured schema.
    pub schema: String,
    /// The newest applied migration that is not dirty (`None`: none, or not read).
    pub migration_version: Option<Version>,
    /// False when the history was not checked against migrations: the gate had none, or the
    /// database did not answer.
    pub migrations_checked: bool,
    /// Every problem found, schema first, then migrations, then tables.
    pub problems: Vec<Problem>,
    /// What is worth knowing but does not stop the service (a migration in progress, newer
    /// migrations applied by a newer release), by version.
    pub notices: Vec<Notice>,
}

/// The hint of a pending migration (or a history not yet made) while another session holds
/// the migration lock ([`Notice::MigrationLocked`]).
const LOCKED_HINT: &str = "another runner holds the migration lock and is most likely applying them now: wait for it to commit (`svcdb migrate up` would wait for it too; `svcdb migrate status` shows the lock)";

impl GateReport {
    /// What to do about `problem`, knowing the notices: found by a user trial, "run `svcdb
    /// migrate up`" beside the note that a runner was applying the migrations.
    fn hint_of<'a>(&self, problem: &'a Problem) -> Cow<'a, str> {
        let locked = self
            .notices
            .iter()
            .any(|n| matches!(n, Notice::MigrationLocked { .. }));
        match problem {
            Problem::Pending { .. } | Problem::NoHistory { .. } if locked => {
                Cow::Borrowed(LOCKED_HINT)
            }
            _ => problem.hint(),
        }
    }
}

impl Serialize for GateReport {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut report = s.serialize_struct("GateReport", 6)?;
        report.serialize_field("ready", &self.ready)?;
        report.serialize_field("schema", &self.schema)?;
        report.serialize_field("migration_version", &self.migration_version)?;
        report.serialize_field("migrations_checked", &self.migrations_checked)?;
        report.serialize_field("problems", &ShownProblems(self))?;
        report.serialize_field("notices", &ShownNotices(&self.notices))?;
        report.end()
    }
}

/// A state of the history the gate reports without failing on it: the normal states of a
/// rolling deploy. Serialized like a [`Problem`]: `kind`, the fields and a `message`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Notice {
    /// A non-transactional migration is running right now: its history row is marked dirty
    /// and a runner holds the schema's migration lock (a long `CREATE INDEX CONCURRENTLY`).
    MigrationInProgress {
        /// Its version.
        version: Version,
        /// Its name.
        name: String,
        /// How long its script has run, in milliseconds.
        running_ms: f64,
    },
    /// An applied migration newer than every migration the service ships: a newer release
    /// migrated the schema. Fine while migrations stay backward compatible (expand first, then
    /// roll out, contract later).
    NewerApplied {
        /// Its version.
        version: Version,
        /// Its name in the history table.
        name: String,
    },
    /// An extra schema of the search path (`SVCDB_EXTRA_SCHEMAS`) does not exist: PostgreSQL
    /// skips it, so what the service meant to find there (a shared extension's types) is
    /// missing, or the name is misspelled.
    ExtraSchemaMissing {
        /// The extra schema.
        schema: String,
    },
    /// A non-transactional migration newer than every migration the service ships failed
    /// part-way (it is dirty, and no runner is migrating): a newer release's deploy broke.
    /// This release does not depend on it, so it keeps serving; the newer release's runner
    /// refuses to migrate until the migration is repaired.
    NewerDirty {
        /// Its version.
        version: Version,
        /// Its name in the history table.
        name: String,
    },
    /// Migrations are pending (or the history is missing) while another session holds the
    /// schema's migration lock: a runner is applying them right now, in a transaction whose
    /// work shows only when it commits.
    MigrationLocked {
        /// The service schema.
        schema: String,
    },
    /// An applied migration older than the newest this release ships, whose file it does not
    /// ship (a gap: a branch's migration, or a file removed on purpose), accepted because the
    /// gate was told to ([`Gate::allow_unknown_applied`](crate::Gate::allow_unknown_applied),
    /// `--ignore-missing`).
    UnknownAppliedAccepted {
        /// Its version.
        version: Version,
        /// Its name in the history table.
        name: String,
    },
}

impl Notice {
    /// What it is, in one line.
    pub fn message(&self) -> String {
        match self {
            Notice::MigrationInProgress {
                version,
                name,
                running_ms,
            } => format!(
                "migration {} is in progress: running for {:.1} s",
                Named(version, name),
                running_ms / 1e3
            ),
            Notice::NewerApplied { version, name } => format!(
                "migration {} is applied by a newer release; this one does not ship it",
                Named(version, name)
            ),
            Notice::ExtraSchemaMissing { schema } => format!(
                "extra schema {schema} (SVCDB_EXTRA_SCHEMAS) does not exist, so the search path skips it: create it, or fix SVCDB_EXTRA_SCHEMAS"
            ),
            Notice::NewerDirty { version, name } => format!(
                "migration {} of a newer release failed part-way and is dirty; this release does not ship it and keeps serving, but that release cannot migrate until it is repaired (`svcdb migrate status` with its migrations says how)",
                Named(version, name)
            ),
            Notice::UnknownAppliedAccepted { version, name } => format!(
                "migration {} is applied but not shipped by this release, older than its newest: accepted as told (--ignore-missing)",
                Named(version, name)
            ),
            Notice::MigrationLocked { schema } => format!(
                "a runner holds schema {schema}'s migration lock: the pending migrations are most likely being applied now, and show once its transaction commits"
            ),
        }
    }
}

impl fmt::Display for Notice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message())
    }
}

/// `ready: schema orders, migration 3`, or `not ready: schema orders has 2 problems:` followed
/// by one line per problem and each distinct hint once; then a `note:` line per notice.
impl fmt::Display for GateReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.ready {
            write!(f, "ready: schema {}", self.schema)?;
            match &self.migration_version {
                Some(v) => write!(f, ", migration {v}")?,
                None => write!(f, ", no migration applied")?,
            }
            if !self.migrations_checked {
                write!(f, " (migrations not checked)")?;
            }
            return self.write_notices(f);
        }
        let n = self.problems.len();
        write!(
            f,
            "not ready: schema {} has {n} problem{}:",
            self.schema,
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  - {}", p.message())?;
        }
        let mut hints: Vec<Cow<'_, str>> = Vec::new();
        for hint in self.problems.iter().map(|p| self.hint_of(p)) {
            if !hints.contains(&hint) {
                hints.push(hint);
            }
        }
        for hint in hints {
            write!(f, "\n  hint: {hint}")?;
        }
        self.write_notices(f)
    }
}

impl GateReport {
    fn write_notices(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for notice in &self.notices {
            write!(f, "\n  note: {notice}")?;
        }
        Ok(())
    }
}

/// Notices as JSON objects: `kind`, the variant's fields and `message`.
struct ShownNotices<'a>(&'a [Notice]);

impl Serialize for ShownNotices<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Shown<'a> {
            #[serde(flatten)]
            notice: &'a Notice,
            message: String,
        }
        s.collect_seq(self.0.iter().map(|notice| Shown {
            notice,
            message: notice.message(),
        }))
    }
}

/// A report's problems as JSON objects: `kind`, the variant's fields, `message` and `hint`.
struct ShownProblems<'a>(&'a GateReport);

impl Serialize for ShownProblems<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Shown<'a> {
            #[serde(flatten)]
            problem: &'a Problem,
            message: String,
            hint: Cow<'a, str>,
        }
        let report = self.0;
        s.collect_seq(report.problems.iter().map(|problem| Shown {
            problem,
            message: problem.message(),
            hint: report.hint_of(problem),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_serialize_with_kind_fields_message_and_hint() {
        let report = GateReport {
            ready: false,
            schema: "orders".into(),
            migration_version: Some(Version::from(3)),
            migrations_checked: true,
            notices: Vec::new(),
            problems: vec![
                Problem::MissingTable {
                    schema: "orders".into(),
                    table: "lines".into(),
                },
                Problem::Unreachable {
                    error: "refused".into(),
                    hint: "start it".into(),
                },
            ],
        };
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["problems"][0]["kind"], "missing_table");
        assert_eq!(json["problems"][0]["table"], "lines");
        assert_eq!(
            json["problems"][0]["message"],
            "table lines is missing from schema orders"
        );
        assert_eq!(json["problems"][0]["hint"], MISSING_TABLES_HINT);
        assert_eq!(json["problems"][1]["kind"], "unreachable");
        assert_eq!(json["problems"][1]["hint"], "start it");
        assert_eq!(json["migration_version"], "3");
    }

    #[test]
    fn notices_serialize_with_kind_fields_and_message_and_show_as_notes() {
        let report = GateReport {
            ready: true,
            schema: "orders".into(),
            migration_version: Some(Version::from(3)),
            migrations_checked: true,
            problems: Vec::new(),
            notices: vec![Notice::MigrationInProgress {
                version: Version::from(4),
                name: "sku_index".into(),
                running_ms: 1500.0,
            }],
        };
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["notices"][0]["kind"], "migration_in_progress");
        assert_eq!(json["notices"][0]["version"], "4");
        assert_eq!(json["notices"][0]["running_ms"], 1500.0);
        assert_eq!(
            json["notices"][0]["message"],
            "migration 4 (sku_index) is in progress: running for 1.5 s"
        );
        assert_eq!(
            report.to_string(),
            "ready: schema orders, migration 3\n  note: migration 4 (sku_index) is in progress: running for 1.5 s"
        );
    }

    #[test]
    fn report_lists_every_problem_and_each_hint_once() {
        let pending = |n: u32| Problem::Pending {
            version: Version::from(n),
            name: format!("m{n}"),
        };
        let report = GateReport {
            ready: false,
            schema: "orders".into(),
            migration_version: None,
            migrations_checked: true,
            notices: Vec::new(),
            problems: vec![pending(1), pending(2)],
        };
        let shown = report.to_string();
        assert!(shown.contains("m1") && shown.contains("m2"), "{shown}");
        assert_eq!(shown.matches("hint:").count(), 1, "{shown}");
    }
}
