//! What a lint finding is: the [`Rule`] it broke, how serious it is ([`Severity`]) and where.
//! A leaf, so the migration errors and events can carry findings without depending on the
//! linter.

use std::fmt;

use serde::Serialize;

use crate::migrate::version::Version;

/// The comment that allows rules in one migration: `-- svcdb:allow <rule>[, <rule>…]`.
pub const ALLOW_DIRECTIVE: &str = "svcdb:allow";

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Reported; `up` runs the migration anyway.
    Warning,
    /// `up` refuses the deploy unless the finding is allowed.
    Error,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Warning => "warning",
            Severity::Error => "error",
        })
    }
}

/// A lint rule, named in findings and in `-- svcdb:allow <rule>` by [`Rule::name`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Rule {
    /// `CREATE INDEX` without `CONCURRENTLY` on a table that existed before the deploy: it
    /// blocks every write to the table while the index builds.
    IndexWithoutConcurrently,
    /// `DROP INDEX` without `CONCURRENTLY` of an index that existed before the deploy: it takes
    /// an `ACCESS EXCLUSIVE` lock on the index's table, held until the transaction (in an
    /// atomic deploy, the deploy's) commits.
    DropIndexWithoutConcurrently,
    /// `CREATE`/`DROP`/`REINDEX … CONCURRENTLY` in a migration that runs in a transaction: the
    /// server refuses it (SQLSTATE 25001).
    ConcurrentlyInTransaction,
    /// A statement PostgreSQL refuses on a partitioned table: `CREATE INDEX CONCURRENTLY` on
    /// one, `DROP INDEX CONCURRENTLY` of its index (SQLSTATE 0A000), `ADD CONSTRAINT …
    /// USING INDEX` (0A000), and `ADD FOREIGN KEY … NOT VALID` (42809 on PostgreSQL 15).
    RefusedOnPartitionedTable,
    /// Another statement PostgreSQL refuses inside a transaction (`VACUUM`, `CREATE DATABASE`,
    /// `ALTER SYSTEM`, `REINDEX SCHEMA`, `DISCARD ALL`, …) in a migration that runs in one
    /// (SQLSTATE 25001).
    NotInTransaction,
    /// `ADD COLUMN … NOT NULL` without a default: fails on a table that has rows.
    AddColumnNotNullWithoutDefault,
    /// `ADD COLUMN` whose default is volatile (or an identity, a `serial`, a stored generated
    /// column): the whole table is rewritten under an `ACCESS EXCLUSIVE` lock.
    AddColumnVolatileDefault,
    /// `ALTER COLUMN … TYPE`: rewrites the table and its indexes under an `ACCESS EXCLUSIVE`
    /// lock unless the change is binary-coercible.
    AlterColumnType,
    /// `ADD CONSTRAINT … FOREIGN KEY` or `CHECK` without `NOT VALID`: every row is checked while
    /// writes (for a foreign key, to both tables) are blocked. Also an `ADD COLUMN` that
    /// declares a `CHECK`, or `REFERENCES` on a column with a default (every row checked under
    /// the `ACCESS EXCLUSIVE` lock of `ADD COLUMN`), and `VALIDATE CONSTRAINT` in the
    /// transaction that added the constraint, whose lock lasts through the scan.
    ConstraintWithoutNotValid,
    /// `ADD PRIMARY KEY` or `ADD UNIQUE` without `USING INDEX` on a table that existed before
    /// the deploy: its index is built while reads and writes wait for the `ACCESS EXCLUSIVE`
    /// lock.
    UniqueWithoutIndex,
    /// `SET NOT NULL` without a validated `CHECK (col IS NOT NULL)` earlier in the deploy: the
    /// whole table is scanned under an `ACCESS EXCLUSIVE` lock.
    SetNotNullWithoutCheck,
    /// Renaming a column the old release still reads (warning).
    RenameColumn,
    /// Renaming a table the old release still reads (warning).
    RenameTable,
    /// Dropping a column the old release still reads (warning).
    DropColumn,
    /// Dropping a table the old release still reads (warning).
    DropTable,
    /// `VACUUM FULL`: rewrites the table under an `ACCESS EXCLUSIVE` lock.
    VacuumFull,
    /// `CLUSTER`: rewrites the table under an `ACCESS EXCLUSIVE` lock.
    Cluster,
    /// `LOCK TABLE`: holds the lock until the migration's (in an atomic deploy, the deploy's)
    /// transaction ends.
    LockTable,
    /// `REINDEX` without `CONCURRENTLY` of what existed before the deploy: writes to each table
    /// it covers wait until it ends, and so do the reads that use an index being rebuilt.
    ReindexWithoutConcurrently,
    /// `ALTER TABLE … SET LOGGED` or `SET UNLOGGED` on a table that existed before the deploy:
    /// rewrites the whole table under an `ACCESS EXCLUSIVE` lock.
    SetLoggedOrUnlogged,
    /// `SET ROLE`, `RESET ROLE` or `SET SESSION AUTHORIZATION`: what the script creates after
    /// it belongs to another role than the schema's owner, which svcdb runs migrations as.
    SetRole,
    /// An up script without any statement: a no-op migration, recorded like any other (warning).
    EmptyUp,
    /// A script PostgreSQL's parser rejects, so nothing in it was checked (warning).
    Unparsed,
    /// A non-transactional script PostgreSQL's parser rejects: its statements before the one
    /// the server refuses would stay, leaving the migration half-applied and dirty (error:
    /// allow it if the server knows syntax newer than the parser's).
    UnparsedOutsideTransaction,
    /// A `-- svcdb:allow` comment naming no rule: it allows nothing (warning).
    UnknownAllow,
    /// A comment that reads like the no-transaction marker but is not one (not the first
    /// line, or spelled otherwise): the migration runs in a transaction (warning).
    IgnoredMarker,
    /// A value that `ALTER TYPE … ADD VALUE` added earlier in the same transactional script,
    /// used as a string constant: PostgreSQL refuses an enum value before the transaction that
    /// added it commits (SQLSTATE 55P04), so the deploy would fail there (warning: the
    /// constant may be another column's text).
    EnumValueUsedBeforeCommit,
}

impl Rule {
    /// Every rule.
    pub const ALL: &'static [Rule] = &[
        Rule::IndexWithoutConcurrently,
        Rule::DropIndexWithoutConcurrently,
        Rule::ConcurrentlyInTransaction,
        Rule::RefusedOnPartitionedTable,
        Rule::NotInTransaction,
        Rule::AddColumnNotNullWithoutDefault,
        Rule::AddColumnVolatileDefault,
        Rule::AlterColumnType,
        Rule::ConstraintWithoutNotValid,
        Rule::UniqueWithoutIndex,
        Rule::SetNotNullWithoutCheck,
        Rule::RenameColumn,
        Rule::RenameTable,
        Rule::DropColumn,
        Rule::DropTable,
        Rule::VacuumFull,
        Rule::Cluster,
        Rule::LockTable,
        Rule::ReindexWithoutConcurrently,
        Rule::SetLoggedOrUnlogged,
        Rule::SetRole,
        Rule::EmptyUp,
        Rule::Unparsed,
        Rule::UnparsedOutsideTransaction,
        Rule::UnknownAllow,
        Rule::IgnoredMarker,
        Rule::EnumValueUsedBeforeCommit,
    ];

    /// The name used in findings and in `-- svcdb:allow <rule>`, e.g.
    /// `index-without-concurrently`.
    pub fn name(self) -> &'static str {
        match self {
            Rule::IndexWithoutConcurrently => "index-without-concurrently",
            Rule::DropIndexWithoutConcurrently => "drop-index-without-concurrently",
            Rule::ConcurrentlyInTransaction => "concurrently-in-transaction",
            Rule::RefusedOnPartitionedTable => "refused-on-partitioned-table",
            Rule::NotInTransaction => "not-in-transaction",
            Rule::AddColumnNotNullWithoutDefault => "add-column-not-null-without-default",
            Rule::AddColumnVolatileDefault => "add-column-volatile-default",
            Rule::AlterColumnType => "alter-column-type",
            Rule::ConstraintWithoutNotValid => "constraint-without-not-valid",
            Rule::UniqueWithoutIndex => "unique-without-index",
            Rule::SetNotNullWithoutCheck => "set-not-null-without-check",
            Rule::RenameColumn => "rename-column",
            Rule::RenameTable => "rename-table",
            Rule::DropColumn => "drop-column",
            Rule::DropTable => "drop-table",
            Rule::VacuumFull => "vacuum-full",
            Rule::Cluster => "cluster",
            Rule::LockTable => "lock-table",
            Rule::ReindexWithoutConcurrently => "reindex-without-concurrently",
            Rule::SetLoggedOrUnlogged => "set-logged-or-unlogged",
            Rule::SetRole => "set-role",
            Rule::EmptyUp => "empty-up",
            Rule::Unparsed => "unparsed",
            Rule::UnparsedOutsideTransaction => "unparsed-outside-transaction",
            Rule::UnknownAllow => "unknown-allow",
            Rule::IgnoredMarker => "ignored-marker",
            Rule::EnumValueUsedBeforeCommit => "enum-value-used-before-commit",
        }
    }

    /// The rule with this [`name`](Self::name).
    pub fn from_name(name: &str) -> Option<Rule> {
        Rule::ALL.iter().copied().find(|r| r.name() == name)
    }

    /// False for a rule whose statement the server refuses as written
    /// (`concurrently-in-transaction`, `not-in-transaction`, `refused-on-partitioned-table`):
    /// neither `-- svcdb:allow` nor
    /// `--allow-unsafe` lets it through, as that would only move the failure to run time.
    pub fn can_be_allowed(self) -> bool {
        !matches!(
            self,
            Rule::ConcurrentlyInTransaction
                | Rule::NotInTransaction
                | Rule::RefusedOnPartitionedTable
        )
    }

    /// Whether a finding of this rule stops `up` (unless allowed).
    pub fn severity(self) -> Severity {
        match self {
            Rule::RenameColumn
            | Rule::RenameTable
            | Rule::DropColumn
            | Rule::DropTable
            | Rule::EmptyUp
            | Rule::Unparsed
            | Rule::UnknownAllow
            | Rule::IgnoredMarker
            | Rule::EnumValueUsedBeforeCommit => Severity::Warning,
            _ => Severity::Error,
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for Rule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// One statement that the deploy should not run as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// The migration's version; `None` for a repeatable migration (`R__<name>.sql`).
    pub version: Option<Version>,
    /// Its up file ([`Migration::path`](crate::migrate::Migration::path)).
    pub path: String,
    /// The line of `path` the statement starts on.
    pub line: usize,
    /// What was found.
    pub rule: Rule,
    /// The rule's [severity](Rule::severity).
    pub severity: Severity,
    /// Why it is unsafe.
    pub message: String,
    /// The safe way to write it.
    pub fix: String,
    /// True when the migration's file allows the rule (`-- svcdb:allow <rule>`).
    pub allowed: bool,
}

impl Finding {
    /// True when this finding stops `up`: an error the file does not allow (`--allow-unsafe`
    /// aside).
    pub fn blocks(&self) -> bool {
        self.severity == Severity::Error && !self.allowed
    }
}

impl fmt::Display for Finding {
    /// `path:line: error[rule]: why`, then the fix on an indented `fix:` line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: {}[{}]: {}",
            self.path, self.line, self.severity, self.rule, self.message
        )?;
        if self.allowed {
            write!(f, " (allowed by `-- {ALLOW_DIRECTIVE} {}`)", self.rule)?;
        }
        write!(f, "\n    fix: {}", self.fix)
    }
}
