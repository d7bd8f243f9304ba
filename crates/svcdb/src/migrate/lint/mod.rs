//! Refuse locking DDL before it runs: the statements of a deploy that take long locks on busy
//! tables or break the replicas still running the old release, each with why and the safe
//! rewrite.
//!
//! `up` runs [`lint`] over the migrations it is about to apply (and the repeatable migrations
//! it runs after them: [`lint_with_repeatables`]) and refuses, before running
//! anything, when a finding is an [error](Severity::Error) that neither
//! [`MigrateOptions::allow_unsafe`](super::MigrateOptions::allow_unsafe) (`--allow-unsafe`) nor a
//! `-- svcdb:allow <rule>` comment in that migration's file allows; warnings are reported as
//! [`MigrateEvent::Lint`] and do not stop it. `svcdb migrate lint`
//! prints the same findings without running anything.
//!
//! What a stand-alone linter cannot know and this one does:
//! * **The transaction mode each migration really runs in** (the directive, goose's and dbmate's
//!   markers, diesel's `metadata.toml`: [`Migration::transactional`]), so `CONCURRENTLY` in a
//!   transactional migration is caught before the server refuses it, and never reported for a
//!   migration that runs outside one. (squawk users set `assume_in_transaction` by hand.)
//! * **Which tables are new in this deploy**: a table created by an earlier statement of the
//!   same deploy (this migration or an earlier pending one) is empty and unseen by the old
//!   release, so indexing it, adding constraints or columns to it, renaming or dropping it is
//!   harmless and not reported. Every other table is assumed to exist, hold rows and be in use.
//!   A table keeps what is known of it through a rename (new or not, its columns, their types
//!   and nullability, its indexes), as a column and an index do.
//!
//! # Rules
//!
//! | rule | level | flags (on a table that existed before the deploy) |
//! |---|---|---|
//! | `index-without-concurrently` | error | `CREATE INDEX` without `CONCURRENTLY` |
//! | `drop-index-without-concurrently` | error | `DROP INDEX` without `CONCURRENTLY` of an index that existed before the deploy (its table's `ACCESS EXCLUSIVE` lock lasts until the transaction commits) |
//! | `concurrently-in-transaction` | error, never allowed | `CREATE`/`DROP`/`REINDEX … CONCURRENTLY` in a transactional migration (any table): the server refuses it, so neither `--allow-unsafe` nor `-- svcdb:allow` lets it through |
//! | `refused-on-partitioned-table` | error, never allowed | on a partitioned table (known from the catalog, the folder's earlier migrations, or a `PARTITION BY` of the deploy): `CREATE INDEX CONCURRENTLY`, `DROP INDEX CONCURRENTLY` of its index, `ADD CONSTRAINT … USING INDEX`, `ADD FOREIGN KEY … NOT VALID`, all of which the server refuses; the other rules' fixes for such a table are ones it runs (`ON ONLY` the parent, each partition's index concurrently, attached; a foreign key or unique constraint on each partition first, which the parent then adopts without a scan or a build) |
//! | `not-in-transaction` | error, never allowed | `VACUUM`, `CREATE`/`DROP DATABASE`, `CREATE`/`DROP TABLESPACE`, `ALTER SYSTEM`, `REINDEX SCHEMA`/`SYSTEM`/`DATABASE`, `DISCARD ALL` in a transactional migration: the server refuses them there too |
//! | `add-column-not-null-without-default` | error | `ADD COLUMN … NOT NULL` without a default |
//! | `add-column-volatile-default` | error | `ADD COLUMN` with a volatile default (`random()`, `clock_timestamp()`, `gen_random_uuid()`, `nextval`, a `serial` type), an identity or a stored generated column |
//! | `alter-column-type` | error | `ALTER COLUMN … TYPE` |
//! | `constraint-without-not-valid` | error | `ADD CONSTRAINT … FOREIGN KEY` / `CHECK` without `NOT VALID`; `ADD COLUMN … CHECK`, and `ADD COLUMN … REFERENCES` with a default or generated (without one, every row is NULL and PostgreSQL checks none); or `VALIDATE CONSTRAINT` in the transaction that added it (its lock lasts through the scan) |
//! | `unique-without-index` | error | `ADD PRIMARY KEY` / `UNIQUE` without `USING INDEX`, or `ADD COLUMN … UNIQUE` / `PRIMARY KEY` |
//! | `set-not-null-without-check` | error | `ALTER COLUMN … SET NOT NULL` without a validated `CHECK (col IS NOT NULL)` earlier in the deploy |
//! | `rename-column`, `rename-table` | warning | renaming what the old release still reads |
//! | `drop-column`, `drop-table` | warning | dropping what the old release still reads |
//! | `vacuum-full`, `cluster`, `lock-table` | error | `VACUUM FULL`, `CLUSTER`, `LOCK TABLE` (any table) |
//! | `reindex-without-concurrently` | error | `REINDEX TABLE`/`INDEX`/`SCHEMA`/`DATABASE` without `CONCURRENTLY` (writes to each table it covers wait, and reads that use an index being rebuilt) |
//! | `set-logged-or-unlogged` | error | `ALTER TABLE … SET LOGGED` / `SET UNLOGGED` (rewrites the table under an `ACCESS EXCLUSIVE` lock) |
//! | `set-role` | error | `SET ROLE`, `RESET ROLE`, `SET SESSION AUTHORIZATION`: what the script creates after it belongs to another role than the schema's owner (svcdb runs migrations as the owner), which the service's role can then neither alter nor drop |
//! | `empty-up` | warning | an up script with no statement: a no-op migration, recorded like any other |
//! | `unparsed` | warning | a script PostgreSQL's parser rejects: nothing in it could be checked |
//! | `unparsed-outside-transaction` | error | a non-transactional script (up or down) PostgreSQL's parser rejects: its statements before the one the server refuses would stay, leaving it dirty and half-applied |
//! | `unknown-allow` | warning | a `-- svcdb:allow` comment naming no rule, or a rule that is never allowed (it allows nothing) |
//! | `enum-value-used-before-commit` | warning | in a transactional migration, a string constant equal to a value that `ALTER TYPE … ADD VALUE` added earlier in the same script (in a statement, a `DO` block or a `LANGUAGE sql` function's body): PostgreSQL refuses the new value until the transaction commits (55P04); a warning, since a constant of that spelling may be another column's text |
//! | `ignored-marker` | warning | a comment that reads like `-- svcdb:no-transaction` (another case, no space, not the first line) in a migration that runs in a transaction: the marker is read only as the file's first line, exactly |
//!
//! Volatility is read from the function's name (PostgreSQL's `pg_proc.provolatile` is not
//! consulted, as no database is needed): `now()`, `CURRENT_TIMESTAMP` and constants are stable
//! and do not rewrite the table since PostgreSQL 11; an unknown function is not reported.
//! `ALTER COLUMN … TYPE` is reported unless the old type is known (from the catalog, from the
//! folder's earlier migrations with `lint --all`, or from an earlier statement of the deploy)
//! and the change keeps every stored value (`varchar(n)` to `text` or a longer `varchar`);
//! allow it in the file when it is binary-coercible otherwise.
//!
//! # The parser
//!
//! Statements are read by [`pg_query`], which is PostgreSQL's own parser (libpg_query: the
//! server's grammar compiled as a library), never by pattern matching: what it sees is exactly
//! what the server will run, comments, quoting, dollar-quoted bodies and all. It was chosen over
//! squawk's parser crates (`squawk-parser`/`squawk-syntax`, pure Rust, about 13 s to build here
//! against about 45 s) because those are a hand-written approximation of the grammar, released
//! weekly with an unstable API, and require Rust 1.94, above this crate's `rust-version`;
//! pg_query's cost is a C build and libclang for its bindgen step at build time (scripts/services
//! installs `libclang-dev`). A statement newer than the bundled grammar (PostgreSQL 18) is a
//! `unparsed` warning, never a refusal.
//!
//! # Allowing a finding
//!
//! A line comment `-- svcdb:allow <rule>[, <rule>…]` anywhere in a migration's up script allows
//! those rules for every statement of that migration (say why on the same line or the next):
//!
//! ```sql
//! -- svcdb:allow index-without-concurrently: countries has 250 rows, locked for milliseconds
//! CREATE INDEX countries_code ON countries (code);
//! ```
//!
//! Adding the comment to an applied migration changes its checksum; allowed findings are still
//! listed by `svcdb migrate lint`, marked allowed.

use std::collections::{HashMap, HashSet};

use pg_query::protobuf::{
    a_const, AlterTableCmd, AlterTableStmt, AlterTableType, ColumnDef, ConstrType, Constraint,
    DropStmt, IndexStmt, NullTestType, ObjectType, ReindexObjectType, ReindexStmt, RenameStmt,
    VariableSetKind,
};
use pg_query::NodeEnum;
use serde::Serialize;

use super::error::MigrateError;
use super::event::MigrateEvent;
use super::migration::Migration;
use super::repeatable::Repeatable;
use super::split::{code_start, comments, parsed_pieces, split_statements};
use super::version::Version;

mod finding;
mod live;

pub use finding::{Finding, Rule, Severity, ALLOW_DIRECTIVE};
pub(crate) use live::LiveColumns;

/// What [`lint`] found, in deploy order.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LintReport {
    /// How many migrations were checked (repeatable ones included).
    pub migrations: usize,
    /// Every finding, allowed ones included, oldest migration first, then by line.
    pub findings: Vec<Finding>,
}

impl LintReport {
    /// The findings that stop `up` ([`Finding::blocks`]).
    pub fn blocking(&self) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(|f| f.blocks())
    }

    /// How many findings are errors, allowed or not.
    pub fn errors(&self) -> usize {
        self.count(Severity::Error)
    }

    /// How many findings are warnings.
    pub fn warnings(&self) -> usize {
        self.count(Severity::Warning)
    }

    fn count(&self, severity: Severity) -> usize {
        self.findings
            .iter()
            .filter(|f| f.severity == severity)
            .count()
    }
}

/// Checks `deploy`, the migrations one `up` applies, in the order it applies them: a table
/// created by an earlier statement of the deploy counts as new (see the
/// [module documentation](self)). Only up scripts are checked. Reads no database, so of a
/// column the deploy did not make it cannot tell a type change that keeps the stored values
/// (`varchar(30)` to `text`) or a `SET NOT NULL` on a column that already is:
/// [`Migrator::lint_pending`](super::Migrator::lint_pending) and `up` ask the catalog.
///
/// ```
/// use svcdb::migrate::lint::{lint, Rule};
/// # let dir = tempfile::tempdir().unwrap();
/// std::fs::write(dir.path().join("1_idx.up.sql"), "CREATE INDEX i ON users (email);").unwrap();
/// let migrations = svcdb::migrate::Migrations::from_dir(dir.path()).unwrap();
/// let report = lint(migrations.iter());
/// assert_eq!(report.findings[0].rule, Rule::IndexWithoutConcurrently);
/// ```
pub fn lint<'a>(deploy: impl IntoIterator<Item = &'a Migration>) -> LintReport {
    lint_with_repeatables(deploy, [])
}

/// Every migration of `migrations` as a deploy of its own, then every repeatable one, without
/// a database (`svcdb migrate lint --all`): the tables the other migrations create count as
/// existing and in use, so a `CREATE TABLE IF NOT EXISTS` of one of them creates nothing, as
/// it would on a live schema.
pub fn lint_each(migrations: &super::Migrations) -> LintReport {
    // Which scripts create each table, by file.
    let mut makers: HashMap<String, Vec<&str>> = HashMap::new();
    let scripts = migrations
        .iter()
        .map(|m| (m.path.as_str(), m.up.as_str()))
        .chain(
            migrations
                .repeatables()
                .iter()
                .map(|r| (r.path.as_str(), r.sql.as_str())),
        );
    for (path, sql) in scripts {
        for table in created_tables(sql) {
            makers.entry(table).or_default().push(path);
        }
    }
    let elsewhere = |me: &str| -> HashSet<String> {
        makers
            .iter()
            .filter(|(_, by)| by.iter().any(|path| *path != me))
            .map(|(table, _)| table.clone())
            .collect()
    };
    let mut report = LintReport::default();
    // What the migrations before each one made (in version order).
    let mut folder = LiveColumns::folder();
    let mut each = Vec::new();
    for m in migrations.iter() {
        each.push(lint_live(
            std::iter::once(m),
            [],
            folder.with_made_elsewhere(elsewhere(&m.path)),
        ));
        folder.record(&m.up);
    }
    each.extend(migrations.repeatables().iter().map(|r| {
        lint_live(
            [],
            std::iter::once(r),
            folder.with_made_elsewhere(elsewhere(&r.path)),
        )
    }));
    for one in each {
        report.migrations += one.migrations;
        report.findings.extend(one.findings);
    }
    report
}

/// The tables `sql` creates (`CREATE TABLE`, `CREATE TABLE … AS`), by name; none when it does
/// not parse.
fn created_tables(sql: &str) -> Vec<String> {
    let mut tables = Vec::new();
    for piece in parsed_pieces(sql) {
        let Ok((_, parsed)) = piece else {
            return Vec::new();
        };
        tables.extend(parsed.protobuf.stmts.iter().filter_map(|raw| {
            match raw.stmt.as_ref()?.node.as_ref()? {
                NodeEnum::CreateStmt(create) => create.relation.as_ref().map(|r| r.relname.clone()),
                NodeEnum::CreateTableAsStmt(create) => create
                    .into
                    .as_ref()
                    .and_then(|i| i.rel.as_ref())
                    .map(|r| r.relname.clone()),
                _ => None,
            }
        }));
    }
    tables
}

/// [`lint`] of `deploy`, then of the repeatable migrations `up` runs after it (Flyway's
/// `R__<name>.sql`), which see the tables the deploy created as new.
pub fn lint_with_repeatables<'a>(
    deploy: impl IntoIterator<Item = &'a Migration>,
    repeatables: impl IntoIterator<Item = &'a Repeatable>,
) -> LintReport {
    lint_live(deploy, repeatables, LiveColumns::default())
}

/// [`lint_with_repeatables`], knowing the live tables' columns (`live`): a `SET NOT NULL` on a
/// column that is already and a type change that keeps the stored values are no findings.
pub(crate) fn lint_live<'a>(
    deploy: impl IntoIterator<Item = &'a Migration>,
    repeatables: impl IntoIterator<Item = &'a Repeatable>,
    live: LiveColumns,
) -> LintReport {
    let mut deploy_state = Deploy {
        live,
        ..Deploy::default()
    };
    let mut report = LintReport::default();
    for m in deploy {
        report.migrations += 1;
        deploy_state.script(Script::of_migration(m), &mut report.findings);
        // A down script does not stop the deploy of its up: warnings here; `down` refuses
        // what blocks in it itself.
        report
            .findings
            .extend(lint_down(m).into_iter().map(|f| Finding {
                severity: Severity::Warning,
                ..f
            }));
    }
    for r in repeatables {
        report.migrations += 1;
        deploy_state.script(Script::of_repeatable(r), &mut report.findings);
    }
    report
}

/// What `m`'s down script holds that would make reverting it fail or stop half-way, at its own
/// file: a script PostgreSQL's parser rejects (a broken down script is otherwise found at the
/// worst time, in a rollback), and what the server refuses where it runs (`CONCURRENTLY`,
/// `VACUUM`, … in a transactional down). Nothing else: a down script drops what its up made,
/// by design. `down` refuses the errors among them before running anything.
pub(crate) fn lint_down(m: &Migration) -> Vec<Finding> {
    let Some(script) = Script::of_down(m) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    Deploy::default().script(script, &mut out);
    out.retain(|f| {
        matches!(f.rule, Rule::Unparsed | Rule::UnparsedOutsideTransaction)
            || !f.rule.can_be_allowed()
    });
    out
}

/// What a non-transactional script the parser rejects would do, for the finding's message.
fn outside_transaction(transactional: bool) -> &'static str {
    if transactional {
        ""
    } else {
        ", and as it runs outside a transaction the statements before the one the server refuses would stay: it would be left dirty, half-applied"
    }
}

/// In a transactional script: reports `node`'s string constants that equal a value an earlier
/// statement added to an enum type (found by a user trial: `ADD VALUE 'shipped'` then an
/// `UPDATE … SET state = 'shipped'` passed the lint and always failed with 55P04), and notes
/// the values `node` adds. Also in the bodies the server runs or checks at once: a `DO` block
/// and a `LANGUAGE sql` function (a PL/pgSQL body is checked only when called). A warning:
/// a constant of that spelling may well be another column's text, and the catalog is not
/// asked whether an `ADD VALUE IF NOT EXISTS` added anything.
fn enum_values(
    s: &Script<'_>,
    at: usize,
    node: &NodeEnum,
    added: &mut Vec<String>,
    out: &mut Vec<Finding>,
) {
    match node {
        NodeEnum::AlterEnumStmt(alter) if !alter.new_val.is_empty() && alter.old_val.is_empty() => {
            added.push(alter.new_val.clone());
        }
        _ if !added.is_empty() => {
            // pg_query's own walk (`nodes()`) visits only where tables are named; the tree's
            // serialized form holds every string constant, as `{"Sval":{"sval":…}}` (an
            // identifier is a `{"String":{"sval":…}}`), wherever it sits, and a body as the
            // text it is, the constant quoted in it.
            let tree = serde_json::to_string(node).unwrap_or_default();
            let body_run_now = match node {
                NodeEnum::DoStmt(_) => true,
                NodeEnum::CreateFunctionStmt(f) => f.options.iter().any(|o| {
                    matches!(&o.node, Some(NodeEnum::DefElem(d)) if d.defname == "language"
                        && matches!(d.arg.as_deref().and_then(|a| a.node.as_ref()),
                            Some(NodeEnum::String(l)) if l.sval.eq_ignore_ascii_case("sql")))
                }),
                _ => false,
            };
            let used = added.iter().find(|value| {
                let constant = format!(
                    "{{\"Sval\":{{\"sval\":{}}}}}",
                    serde_json::Value::from(value.as_str())
                );
                let quoted =
                    serde_json::Value::from(format!("'{}'", value.replace('\'', "''"))).to_string();
                let quoted = &quoted[1..quoted.len() - 1];
                tree.contains(&constant) || (body_run_now && tree.contains(quoted))
            });
            if let Some(value) = used {
                out.push(s.finding(
                    at,
                    Rule::EnumValueUsedBeforeCommit,
                    format!("'{value}' was added to an enum type earlier in this migration's transaction, and PostgreSQL refuses a new enum value until the transaction that added it commits (SQLSTATE 55P04): the deploy would fail here"),
                    format!("move the statements that use '{value}' to a later migration (svcdb commits a migration that adds an enum value before the next one runs); nothing to do if this constant is not that enum's"),
                ));
            }
        }
        _ => {}
    }
}

/// The rule of a script the parser rejects: a warning in a transaction (the server refuses it
/// whole), an error outside one (it would stop half-way).
fn unparsed_rule(transactional: bool) -> Rule {
    if transactional {
        Rule::Unparsed
    } else {
        Rule::UnparsedOutsideTransaction
    }
}

/// Where in `sql`, which the parser rejects, the first statement it rejects on its own
/// starts (its code, after the comments before it); 0 when none does alone.
fn unparsed_at(sql: &str) -> usize {
    split_statements(sql)
        .into_iter()
        .find(|statement| pg_query::parse(statement, pg_query::ParserOptions::DEFAULT).is_err())
        .map_or(0, |statement| {
            // The pieces are slices of `sql`: their offset is the pointers' difference.
            let offset = (statement.as_ptr() as usize)
                .checked_sub(sql.as_ptr() as usize)
                .filter(|&at| at <= sql.len())
                .unwrap_or(0);
            code_start(sql, offset)
        })
}

/// What `up` does with the lint of its plan (and the repeatable migrations it runs after it):
/// refuses when something blocks (unless `allow_unsafe`), and tells `observer` about the rest
/// that was not allowed in its file.
pub(crate) fn check_before_up(
    plan: &[&Migration],
    repeatables: &[&Repeatable],
    live: LiveColumns,
    allow_unsafe: bool,
    observer: &mut (dyn FnMut(&MigrateEvent) + Send),
) -> Result<(), MigrateError> {
    let report = lint_live(plan.iter().copied(), repeatables.iter().copied(), live);
    enforce(report.findings, allow_unsafe, observer)
}

/// Refuses when a finding blocks (unless `allow_unsafe`, which lets through the hazards, not
/// what the server would refuse anyway), and tells `observer` about the rest that was not
/// allowed in its file: what `up`, `redo` and `down` do with their lint.
pub(crate) fn enforce(
    findings: Vec<Finding>,
    allow_unsafe: bool,
    observer: &mut (dyn FnMut(&MigrateEvent) + Send),
) -> Result<(), MigrateError> {
    let blocking: Vec<Finding> = findings
        .iter()
        .filter(|f| f.blocks() && (!allow_unsafe || !f.rule.can_be_allowed()))
        .cloned()
        .collect();
    if !blocking.is_empty() {
        return Err(MigrateError::Unsafe { findings: blocking });
    }
    for finding in findings.into_iter().filter(|f| !f.allowed) {
        tracing::warn!(target: "svcdb::migrate", %finding, "unsafe migration statement");
        let let_through = finding.blocks();
        observer(&MigrateEvent::Lint {
            finding,
            let_through,
        });
    }
    Ok(())
}

/// What the statements of the deploy so far have done to the tables later ones touch.
#[derive(Default)]
struct Deploy {
    /// Tables created in this deploy (by name, as the parser folds it).
    created: HashSet<String>,
    /// Live tables dropped in this deploy: a `CREATE TABLE IF NOT EXISTS` after it makes one.
    dropped: HashSet<String>,
    /// Indexes created in this deploy (by name): dropping one locks nothing the old release
    /// relies on.
    created_indexes: HashSet<String>,
    /// Per live table: columns added in this deploy, which the old release never used, so
    /// dropping or renaming them is no finding.
    added_columns: HashMap<String, HashSet<String>>,
    /// Per table: constraints added in this deploy, by name, with the column of those that are
    /// a `CHECK (col IS NOT NULL)`.
    added: HashMap<String, HashMap<String, Option<String>>>,
    /// Per table: constraints known valid (validated, or added without `NOT VALID`) in this
    /// deploy.
    validated: HashMap<String, HashSet<String>>,
    /// Per table: constraints added in the transaction still open (the run of transactional
    /// migrations so far, which `up` commits together), each with whether it is a foreign
    /// key. Their `ADD CONSTRAINT` lock lasts until that commit.
    open_tx_added: HashMap<String, HashMap<String, bool>>,
    /// What is known of the tables, columns and indexes, as the deploy's statements so far
    /// left them: those of the catalog when a database was asked, or of the folder's earlier
    /// migrations (`lint --all`).
    live: LiveColumns,
}

/// One script to check (a migration's up script, or a repeatable one) and where findings in
/// it go.
struct Script<'m> {
    up: &'m str,
    /// The line of `path` the script starts on.
    up_line: usize,
    path: &'m str,
    version: Option<&'m Version>,
    transactional: bool,
    allowed: HashSet<Rule>,
}

impl<'m> Script<'m> {
    fn of_migration(m: &'m Migration) -> Self {
        Script {
            up: &m.up,
            up_line: m.up_line,
            path: &m.path,
            version: Some(&m.version),
            transactional: m.transactional,
            allowed: HashSet::new(),
        }
    }

    /// `m`'s down script, when it has one.
    fn of_down(m: &'m Migration) -> Option<Self> {
        Some(Script {
            up: m.down.as_deref()?,
            up_line: m.down_line,
            path: m.down_path.as_deref()?,
            version: Some(&m.version),
            transactional: m.down_transactional,
            allowed: HashSet::new(),
        })
    }

    fn of_repeatable(r: &'m Repeatable) -> Self {
        Script {
            up: &r.sql,
            up_line: 1,
            path: &r.path,
            version: None,
            transactional: r.transactional,
            allowed: HashSet::new(),
        }
    }

    /// A finding at byte `at` of the script.
    fn finding(&self, at: usize, rule: Rule, message: String, fix: String) -> Finding {
        let sql = self.up.as_bytes();
        let at = at.min(sql.len());
        let line = self.up_line + sql[..at].iter().filter(|&&b| b == b'\n').count();
        Finding {
            version: self.version.cloned(),
            path: self.path.to_owned(),
            line,
            rule,
            severity: rule.severity(),
            message,
            fix,
            allowed: self.allowed.contains(&rule) && rule.can_be_allowed(),
        }
    }
}

/// The rules a script allows with `-- svcdb:allow` comments, and the names in them that are
/// no rule (with the comment's offset): those allow nothing, so the finding they meant to
/// allow stays, and each is reported.
fn allow_comments(sql: &str) -> (HashSet<Rule>, Vec<(usize, String)>) {
    let mut allowed = HashSet::new();
    let mut unknown = Vec::new();
    for (at, comment) in comments(sql) {
        let Some(rest) = comment
            .strip_prefix("--")
            .and_then(|c| c.trim_start().strip_prefix(ALLOW_DIRECTIVE))
        else {
            continue;
        };
        // The names run up to a `:` that starts the reason.
        let names = rest.split(':').next().unwrap_or_default();
        for name in names
            .split([',', ' ', '\t', '\r', '\n'])
            .filter(|n| !n.is_empty())
        {
            match Rule::from_name(name) {
                Some(rule) if rule.can_be_allowed() => {
                    allowed.insert(rule);
                }
                _ => unknown.push((at, name.to_owned())),
            }
        }
    }
    (allowed, unknown)
}

/// Volatile functions (`pg_proc.provolatile = 'v'`) seen as column defaults: each evaluates per
/// row, so `ADD COLUMN … DEFAULT f()` rewrites the table.
const VOLATILE_FUNCTIONS: &[&str] = &[
    "random",
    "random_normal",
    "clock_timestamp",
    "timeofday",
    "gen_random_uuid",
    "uuid_generate_v1",
    "uuid_generate_v1mc",
    "uuid_generate_v4",
    "uuidv4",
    "uuidv7",
    "nextval",
];

/// Types that are an integer with a `nextval` default.
const SERIAL_TYPES: &[&str] = &[
    "serial",
    "serial2",
    "serial4",
    "serial8",
    "smallserial",
    "bigserial",
];

impl Deploy {
    fn is_new(&self, table: &str) -> bool {
        self.created.contains(table)
    }

    /// A `CREATE TABLE` of `table`. With `IF NOT EXISTS` on a table the catalog has, it
    /// creates nothing: the live table stays the one the old release uses (mattermost writes
    /// every table so, to upgrade older schemas that have them).
    fn create(&mut self, table: &str, if_not_exists: bool) {
        if !(if_not_exists && self.live.has_table(table) && !self.dropped.contains(table)) {
            self.created.insert(table.to_owned());
        }
    }

    fn script(&mut self, mut script: Script<'_>, out: &mut Vec<Finding>) {
        // A non-transactional script starts after the open transaction committed, and runs
        // each statement in a transaction of its own (cleared after each, below).
        if !script.transactional {
            self.open_tx_added.clear();
        }
        let (allowed, unknown) = allow_comments(script.up);
        script.allowed = allowed;
        for (at, name) in unknown {
            let (why, fix) = if Rule::from_name(&name) == Some(Rule::RefusedOnPartitionedTable) {
                (
                    "the server refuses such a statement as written, so allowing it is not possible",
                    "write it as the finding's fix says: what works on a partitioned table".to_owned(),
                )
            } else if Rule::from_name(&name).is_some() {
                (
                    "the server refuses such a statement as written, so allowing it is not possible",
                    format!("make the migration non-transactional: {}", super::migration::NO_TRANSACTION_HOW),
                )
            } else {
                let known: Vec<&str> = Rule::ALL
                    .iter()
                    .filter(|r| r.can_be_allowed())
                    .map(|r| r.name())
                    .collect();
                (
                    "it is no rule",
                    format!("name one of: {}", known.join(", ")),
                )
            };
            out.push(script.finding(
                at,
                Rule::UnknownAllow,
                format!("`-- {ALLOW_DIRECTIVE} {name}`: {why}, so it allows nothing"),
                fix,
            ));
        }
        if script.transactional {
            // Found by a user trial: `--svcdb:no-transaction`, `-- SVCDB:NO-TRANSACTION` and
            // the marker on a second line were ignored without a word, and the migration ran
            // in a transaction.
            let mut at = 0;
            for line in script.up.split_inclusive('\n') {
                let squeezed: String = line
                    .chars()
                    .filter(|c| !c.is_whitespace())
                    .flat_map(char::to_lowercase)
                    .collect();
                if squeezed == "--svcdb:no-transaction" {
                    out.push(script.finding(
                        at,
                        Rule::IgnoredMarker,
                        format!("`{}` reads like the no-transaction marker, but is not one: the marker is read only as the file's first line, written exactly `-- svcdb:no-transaction`, so this migration runs in a transaction", line.trim()),
                        "to run it outside a transaction, make the first line exactly `-- svcdb:no-transaction`; otherwise delete the comment".into(),
                    ));
                }
                at += line.len();
            }
        }
        if split_statements(script.up).is_empty() {
            out.push(script.finding(
                0,
                Rule::EmptyUp,
                "the up script has no statement: the migration changes nothing and is recorded as applied".into(),
                "write its SQL before it is deployed; once applied, put further changes in a new migration".into(),
            ));
            return;
        }
        // Values this script's transaction added to enum types.
        let mut added_values: Vec<String> = Vec::new();
        for piece in parsed_pieces(script.up) {
            let (offset, parsed) = match piece {
                Ok(piece) => piece,
                Err(e) => {
                    out.push(script.finding(
                        unparsed_at(script.up),
                        unparsed_rule(script.transactional),
                        format!("PostgreSQL's parser rejects the script, so it was not checked{}: {e}", outside_transaction(script.transactional)),
                        "fix the syntax (the server will refuse it too); it is checked once it parses".into(),
                    ));
                    return;
                }
            };
            for raw in &parsed.protobuf.stmts {
                let Some(node) = raw.stmt.as_ref().and_then(|s| s.node.as_ref()) else {
                    continue;
                };
                // The parser's location may include the comments before the statement.
                let location = offset + usize::try_from(raw.stmt_location).unwrap_or(0);
                let at = code_start(script.up, location);
                if script.transactional {
                    enum_values(&script, at, node, &mut added_values, out);
                }
                self.statement(&script, at, node, out);
                self.live.apply(node);
                if !script.transactional {
                    self.open_tx_added.clear();
                }
            }
        }
    }

    fn statement(&mut self, s: &Script<'_>, at: usize, node: &NodeEnum, out: &mut Vec<Finding>) {
        if let Some(what) = refused_in_a_transaction(node).filter(|_| s.transactional) {
            out.push(s.finding(
                at,
                Rule::NotInTransaction,
                format!("{what} cannot run inside a transaction, and this migration runs in one: the server would refuse it (SQLSTATE 25001)"),
                format!("make the migration non-transactional: {}, with the statement in a migration of its own", super::migration::NO_TRANSACTION_HOW),
            ));
        }
        match node {
            NodeEnum::CreateStmt(create) => {
                if let Some(rel) = &create.relation {
                    self.create(&rel.relname, create.if_not_exists);
                }
            }
            NodeEnum::CreateTableAsStmt(create) => {
                if let Some(rel) = create.into.as_ref().and_then(|i| i.rel.as_ref()) {
                    self.create(&rel.relname, create.if_not_exists);
                }
            }
            NodeEnum::IndexStmt(index) => self.index(s, at, index, out),
            NodeEnum::DropStmt(drop) => self.drop(s, at, drop, out),
            NodeEnum::ReindexStmt(reindex) => self.reindex(s, at, reindex, out),
            NodeEnum::AlterTableStmt(alter) => self.alter_table(s, at, alter, out),
            NodeEnum::RenameStmt(rename) => self.rename(s, at, rename, out),
            NodeEnum::VacuumStmt(vacuum) if vacuum.is_vacuumcmd => {
                let full = vacuum.options.iter().any(|o| match &o.node {
                    Some(NodeEnum::DefElem(d)) => d.defname == "full" && !is_false(d.arg.as_deref()),
                    _ => false,
                });
                if full {
                    out.push(s.finding(
                        at,
                        Rule::VacuumFull,
                        "VACUUM FULL rewrites the table under an ACCESS EXCLUSIVE lock: every read and write of it waits until it ends".into(),
                        "run a plain VACUUM (it runs beside reads and writes), or pg_repack outside the deploy to reclaim space".into(),
                    ));
                }
            }
            NodeEnum::ClusterStmt(_) => out.push(s.finding(
                at,
                Rule::Cluster,
                "CLUSTER rewrites the table under an ACCESS EXCLUSIVE lock: every read and write of it waits until it ends".into(),
                "leave it out of migrations; reorder the table with pg_repack outside the deploy".into(),
            )),
            NodeEnum::LockStmt(_) => out.push(s.finding(
                at,
                Rule::LockTable,
                "LOCK TABLE holds the lock until the transaction ends, which in an atomic deploy is after every pending migration has run".into(),
                "remove it: each statement takes the lock it needs, and lock_timeout bounds the wait for it".into(),
            )),
            // Found by a user trial: tables a script made after `SET ROLE postgres` belonged to
            // postgres, unseen until `svcdb provision` refused the schema for them. (svcdb
            // restores the role after each script, so only the script's own objects move.)
            NodeEnum::VariableSetStmt(set)
                if matches!(set.name.as_str(), "role" | "session_authorization") =>
            {
                let statement = match (set.name.as_str(), set.kind == VariableSetKind::VarReset as i32) {
                    ("role", true) => "RESET ROLE",
                    ("role", false) => "SET ROLE",
                    (_, true) => "RESET SESSION AUTHORIZATION",
                    (_, false) => "SET SESSION AUTHORIZATION",
                };
                out.push(s.finding(
                    at,
                    Rule::SetRole,
                    format!("{statement} makes what the script creates after it belong to another role than the schema's owner, which svcdb runs migrations as: the service's role can then neither alter nor drop it, and `svcdb provision` refuses the schema"),
                    "remove it; a statement that needs another role's rights (an extension, a grant on another schema) belongs outside the service's migrations, run by an administrator".into(),
                ));
            }
            _ => {}
        }
    }

    /// A `REINDEX`: without `CONCURRENTLY`, of a table or index that existed before the
    /// deploy (or of a schema or database, which hold such), it locks out writes to each table
    /// it covers and, with its index's `ACCESS EXCLUSIVE` lock, the reads that use the index.
    fn reindex(&self, s: &Script<'_>, at: usize, reindex: &ReindexStmt, out: &mut Vec<Finding>) {
        let concurrently = reindex.params.iter().any(|p| {
            matches!(&p.node, Some(NodeEnum::DefElem(d)) if d.defname == "concurrently" && !is_false(d.arg.as_deref()))
        });
        if concurrently {
            if s.transactional {
                out.push(concurrently_in_transaction(s, at, "REINDEX"));
            }
            return;
        }
        let name = reindex
            .relation
            .as_ref()
            .map_or(reindex.name.as_str(), |r| r.relname.as_str());
        let kind = match ReindexObjectType::try_from(reindex.kind) {
            Ok(ReindexObjectType::ReindexObjectTable) if !self.is_new(name) => "TABLE",
            Ok(ReindexObjectType::ReindexObjectIndex) if !self.created_indexes.contains(name) => {
                "INDEX"
            }
            Ok(ReindexObjectType::ReindexObjectSchema) => "SCHEMA",
            Ok(ReindexObjectType::ReindexObjectDatabase) => "DATABASE",
            // `SYSTEM` rebuilds the catalogs' indexes, which CONCURRENTLY cannot.
            _ => return,
        };
        // `REINDEX DATABASE` may leave out the name (the current database).
        let (plain, concurrent) = if name.is_empty() {
            (kind.to_owned(), format!("{kind} CONCURRENTLY"))
        } else {
            (
                format!("{kind} {name}"),
                format!("{kind} CONCURRENTLY {name}"),
            )
        };
        out.push(s.finding(
            at,
            Rule::ReindexWithoutConcurrently,
            format!("REINDEX {plain} locks out every write to each table it covers until it ends (in an atomic deploy, until the deploy commits), and every read that uses an index being rebuilt"),
            format!("REINDEX {concurrent} (PostgreSQL 12+), in a non-transactional migration of its own: {} (a failed rebuild leaves an INVALID index beside the old one: drop it with DROP INDEX CONCURRENTLY before retrying)", super::migration::NO_TRANSACTION_HOW),
        ));
    }

    fn index(&mut self, s: &Script<'_>, at: usize, index: &IndexStmt, out: &mut Vec<Finding>) {
        let table = index.relation.as_ref().map_or("", |r| r.relname.as_str());
        if index.if_not_exists && self.live.has_index(&index.idxname) {
            // It is there already: PostgreSQL skips the statement with a notice, building
            // nothing and locking nothing (a folder another tool applied, rerun; found by a
            // trial on a Flyway folder).
            return;
        }
        if !index.idxname.is_empty() {
            self.created_indexes.insert(index.idxname.clone());
        }
        // Found by a user trial: on a partitioned table the fix said CREATE INDEX
        // CONCURRENTLY, which the server refuses there.
        let partitioned = self.live.is_partitioned(table);
        let only = index.relation.as_ref().is_some_and(|r| !r.inh);
        if index.concurrent && partitioned {
            out.push(s.finding(
                at,
                Rule::RefusedOnPartitionedTable,
                format!("CREATE INDEX CONCURRENTLY on {table}, a partitioned table: the server refuses it (SQLSTATE 0A000: cannot create index on partitioned table concurrently)"),
                partitioned_index_fix(table, index, self.live.partitions(table)),
            ));
        } else if index.concurrent {
            if s.transactional {
                out.push(concurrently_in_transaction(s, at, "CREATE INDEX"));
            }
        } else if partitioned && only {
            // `ON ONLY` a partitioned table: an invalid index of the parent alone, made at
            // once, no partition locked.
        } else if !self.is_new(table) {
            let fix = if partitioned {
                partitioned_index_fix(table, index, self.live.partitions(table))
            } else if s.transactional {
                format!("CREATE INDEX CONCURRENTLY, in a non-transactional migration of its own: {} (a failed build leaves an INVALID index: drop it with DROP INDEX CONCURRENTLY IF EXISTS before retrying)", super::migration::NO_TRANSACTION_HOW)
            } else {
                // Found by a user trial (openfga's goose `NO TRANSACTION` file): the fix told
                // a non-transactional migration to become one.
                "CREATE INDEX CONCURRENTLY: the migration already runs outside a transaction (a failed build leaves an INVALID index: drop it with DROP INDEX CONCURRENTLY IF EXISTS before retrying)".to_owned()
            };
            out.push(s.finding(
                at,
                Rule::IndexWithoutConcurrently,
                format!("CREATE INDEX on {table}, a table that existed before this deploy, blocks every write to it while the index builds"),
                fix,
            ));
        }
    }

    fn drop(&mut self, s: &Script<'_>, at: usize, drop: &DropStmt, out: &mut Vec<Finding>) {
        let partitioned_index = drop
            .objects
            .iter()
            .filter_map(last_name)
            .find(|index| self.live.is_partitioned_index(index));
        if let (true, Some(index)) = (drop.concurrent, partitioned_index) {
            out.push(s.finding(
                at,
                Rule::RefusedOnPartitionedTable,
                format!("DROP INDEX CONCURRENTLY of {index}, the index of a partitioned table: the server refuses it (SQLSTATE 0A000: cannot drop partitioned index concurrently)"),
                partitioned_drop_index_fix(index),
            ));
        } else if drop.concurrent && s.transactional {
            out.push(concurrently_in_transaction(s, at, "DROP INDEX"));
        }
        if drop.remove_type == ObjectType::ObjectIndex as i32 && !drop.concurrent {
            self.drop_index(s, at, drop, out);
        }
        if drop.remove_type != ObjectType::ObjectTable as i32 {
            return;
        }
        for table in drop.objects.iter().filter_map(last_name) {
            // One created in this deploy, or one that is not there (`DROP TABLE IF EXISTS` of
            // a table an old release had, found by a trial on atuin's folder): no replica
            // uses it.
            if self.created.remove(table) || self.live.drops_no_table(table, drop.missing_ok) {
                continue;
            }
            self.dropped.insert(table.to_owned());
            out.push(s.finding(
                at,
                Rule::DropTable,
                format!("dropping {table}: the replicas still running the old release read and write it until they are replaced"),
                "expand, then contract: first release code that no longer uses the table, then drop it in a migration of a later release".into(),
            ));
        }
    }

    /// A plain `DROP INDEX`: a finding for each index it drops that existed before the deploy
    /// (found by a trial on Conductor's Flyway folder, whose later migrations drop indexes of
    /// live tables).
    fn drop_index(&mut self, s: &Script<'_>, at: usize, drop: &DropStmt, out: &mut Vec<Finding>) {
        for index in drop.objects.iter().filter_map(last_name) {
            // Made in this deploy, or not there (`IF EXISTS` drops nothing; without it the
            // server refuses the statement).
            if self.created_indexes.remove(index)
                || self.live.drops_no_index(index, drop.missing_ok)
            {
                continue;
            }
            let fix = if self.live.is_partitioned_index(index) {
                partitioned_drop_index_fix(index)
            } else if s.transactional {
                format!("DROP INDEX CONCURRENTLY {index}, in a non-transactional migration of its own: {}", super::migration::NO_TRANSACTION_HOW)
            } else {
                format!("DROP INDEX CONCURRENTLY {index}: the migration already runs outside a transaction")
            };
            let held = if s.transactional {
                "until the transaction commits (in an atomic deploy, the whole deploy)"
            } else {
                "while the index is dropped"
            };
            out.push(s.finding(
                at,
                Rule::DropIndexWithoutConcurrently,
                format!("DROP INDEX {index} takes an ACCESS EXCLUSIVE lock on its table, which every read and write of it then waits for {held}, and which itself waits behind every running query of the table"),
                fix,
            ));
        }
    }

    /// A rename: what the deploy did to the table, column or index follows it to its new name
    /// (found by a user trial on harbor's folder, whose widened `varchar`s were errors after
    /// a rename); [`LiveColumns::apply`] does the same for what was known before.
    fn rename(&mut self, s: &Script<'_>, at: usize, rename: &RenameStmt, out: &mut Vec<Finding>) {
        let table = rename.relation.as_ref().map_or("", |r| r.relname.as_str());
        let new = rename.newname.as_str();
        if rename.rename_type == ObjectType::ObjectIndex as i32 {
            if self.created_indexes.remove(table) {
                self.created_indexes.insert(new.to_owned());
            }
        } else if rename.rename_type == ObjectType::ObjectTable as i32 {
            rekey(&mut self.added_columns, table, new);
            rekey(&mut self.added, table, new);
            rekey(&mut self.validated, table, new);
            rekey(&mut self.open_tx_added, table, new);
            if self.created.remove(table) {
                self.created.insert(new.to_owned());
                return;
            }
            out.push(s.finding(
                at,
                Rule::RenameTable,
                format!("renaming {table} to {}: the replicas still running the old release use the old name and fail until they are replaced", rename.newname),
                "expand, then contract: create the new table (or a view under the new name), move the code over in a release, then drop the old one in a later release".into(),
            ));
        } else if rename.rename_type == ObjectType::ObjectColumn as i32 {
            // A `CHECK (column IS NOT NULL)` now checks the column under its new name.
            for checked in self
                .added
                .get_mut(table)
                .into_iter()
                .flat_map(|a| a.values_mut())
            {
                if checked.as_deref() == Some(rename.subname.as_str()) {
                    *checked = Some(new.to_owned());
                }
            }
            if self.is_new(table) {
                return;
            }
            if self.forget_added_column(table, &rename.subname) {
                self.note_added_column(table, &rename.newname);
                return;
            }
            out.push(s.finding(
                at,
                Rule::RenameColumn,
                format!("renaming column {}.{} to {}: the replicas still running the old release use the old name and fail until they are replaced", table, rename.subname, rename.newname),
                "expand, then contract: add the new column and write both, backfill, release code that reads the new one, then drop the old one in a later release".into(),
            ));
        }
    }

    /// `table.column` is added in this deploy (or renamed from a column that was).
    fn note_added_column(&mut self, table: &str, column: &str) {
        self.added_columns
            .entry(table.to_owned())
            .or_default()
            .insert(column.to_owned());
    }

    /// Whether `table.column` was added earlier in this deploy; it is forgotten (dropped, or
    /// renamed, which records the new name).
    fn forget_added_column(&mut self, table: &str, column: &str) -> bool {
        self.added_columns
            .get_mut(table)
            .is_some_and(|added| added.remove(column))
    }

    fn alter_table(
        &mut self,
        s: &Script<'_>,
        at: usize,
        alter: &AlterTableStmt,
        out: &mut Vec<Finding>,
    ) {
        let Some(table) = alter.relation.as_ref().map(|r| r.relname.as_str()) else {
            return;
        };
        let new = self.is_new(table);
        let cmds: Vec<&AlterTableCmd> = alter
            .cmds
            .iter()
            .filter_map(|cmd| match &cmd.node {
                Some(NodeEnum::AlterTableCmd(cmd)) => Some(&**cmd),
                _ => None,
            })
            .collect();
        // A constraint's fix cannot index a column before the statement that adds it ran.
        let adding: Vec<&str> = cmds
            .iter()
            .filter(|cmd| cmd.subtype == AlterTableType::AtAddColumn as i32)
            .filter_map(|cmd| match cmd.def.as_ref().and_then(|d| d.node.as_ref()) {
                Some(NodeEnum::ColumnDef(column)) => Some(column.colname.as_str()),
                _ => None,
            })
            .collect();
        for cmd in cmds {
            self.alter_table_cmd(s, at, (table, &adding), new, cmd, out);
        }
    }

    /// `table`: its name, and the columns its `ALTER TABLE` adds.
    fn alter_table_cmd(
        &mut self,
        s: &Script<'_>,
        at: usize,
        (table, adding): (&str, &[&str]),
        new: bool,
        cmd: &AlterTableCmd,
        out: &mut Vec<Finding>,
    ) {
        let def = cmd.def.as_ref().and_then(|d| d.node.as_ref());
        let subtype = cmd.subtype;
        if subtype == AlterTableType::AtAddConstraint as i32 {
            if let Some(NodeEnum::Constraint(c)) = def {
                self.add_constraint(s, at, (table, adding), new, c, out);
            }
        } else if subtype == AlterTableType::AtValidateConstraint as i32 {
            self.validated
                .entry(table.to_owned())
                .or_default()
                .insert(cmd.name.clone());
            let added_here = self
                .open_tx_added
                .get(table)
                .and_then(|added| added.get(&cmd.name));
            if let (false, Some(&foreign)) = (new, added_here) {
                let (lock, waiting) = if foreign {
                    ("SHARE ROW EXCLUSIVE", "writes to both tables".to_owned())
                } else {
                    (
                        "ACCESS EXCLUSIVE",
                        format!("every read and write of {table}"),
                    )
                };
                out.push(s.finding(
                    at,
                    Rule::ConstraintWithoutNotValid,
                    format!("{} is validated in the transaction that added it, which holds the {lock} lock of ADD CONSTRAINT until it commits: {waiting} wait for the whole validation scan", cmd.name),
                    format!("validate it in a later deploy, or in a non-transactional migration of its own after the one that adds it ({})", super::migration::NO_TRANSACTION_HOW),
                ));
            }
        } else if new {
            // Nothing below can hurt a table nobody else sees yet.
        } else if subtype == AlterTableType::AtAddColumn as i32 {
            if let Some(NodeEnum::ColumnDef(column)) = def {
                // `ADD COLUMN IF NOT EXISTS` of a column the table has: PostgreSQL skips it,
                // adding, filling and checking nothing (found by a user trial on mattermost's
                // folder).
                if cmd.missing_ok && self.live.has_column(table, &column.colname) {
                    return;
                }
                self.note_added_column(table, &column.colname);
                let partitions = self
                    .live
                    .is_partitioned(table)
                    .then(|| self.live.partitions(table));
                add_column(s, at, (table, partitions), column, out);
                self.add_column_constraints(s, at, table, cmd, column, out);
            }
        } else if subtype == AlterTableType::AtAlterColumnType as i32 {
            // Without `USING`, a type change the catalog shows keeps every stored value. Not
            // with `COLLATE`: PostgreSQL rebuilds every index of the column under the table's
            // ACCESS EXCLUSIVE lock (found by a trial on svix's folder).
            if let Some(NodeEnum::ColumnDef(column)) = def {
                let keeps = column.raw_default.is_none()
                    && column.coll_clause.is_none()
                    && column
                        .type_name
                        .as_ref()
                        .is_some_and(|t| self.live.keeps_storage(table, &cmd.name, t));
                if keeps {
                    return;
                }
            }
            out.push(s.finding(
                at,
                Rule::AlterColumnType,
                format!("changing the type of {table}.{} rewrites the table and rebuilds its indexes under an ACCESS EXCLUSIVE lock, unless the change is binary-coercible (varchar(n) to text or to a longer varchar, numeric to unconstrained numeric)", cmd.name),
                "add a column of the new type, write both in the code, backfill in batches, switch reads, then drop the old column in a later release; if this change is binary-coercible, allow it with `-- svcdb:allow alter-column-type`".into(),
            ));
        } else if subtype == AlterTableType::AtSetLogged as i32
            || subtype == AlterTableType::AtSetUnLogged as i32
        {
            let (what, wal) = if subtype == AlterTableType::AtSetLogged as i32 {
                (
                    "SET LOGGED",
                    ", writing all of it to the WAL the replicas replay",
                )
            } else {
                ("SET UNLOGGED", "")
            };
            out.push(s.finding(
                at,
                Rule::SetLoggedOrUnlogged,
                format!("{what} on {table} rewrites the whole table under an ACCESS EXCLUSIVE lock{wal}: every read and write of it waits until it ends"),
                "no form of it avoids the rewrite: create a new table with the persistence wanted, copy the rows in batches and move the code over in a release, then drop the old table in a later one; or run it in a maintenance window, allowing it with `-- svcdb:allow set-logged-or-unlogged`".into(),
            ));
        } else if subtype == AlterTableType::AtSetNotNull as i32 {
            if !self.has_valid_not_null_check(table, &cmd.name)
                && !self.live.is_not_null(table, &cmd.name)
            {
                out.push(s.finding(
                    at,
                    Rule::SetNotNullWithoutCheck,
                    format!("SET NOT NULL on {table}.{} scans the whole table under an ACCESS EXCLUSIVE lock", cmd.name),
                    format!("first ADD CONSTRAINT {c}_not_null CHECK ({c} IS NOT NULL) NOT VALID; then, in a later deploy or a non-transactional migration of its own, VALIDATE CONSTRAINT it (a scan that blocks no writes, unless the transaction that added the check still holds its lock); SET NOT NULL after the validation then skips the scan (PostgreSQL 12+), and the check can be dropped", c = cmd.name),
                ));
            }
        } else if subtype == AlterTableType::AtDropColumn as i32 {
            if self.forget_added_column(table, &cmd.name) {
                // Added earlier in this deploy: the old release never saw it (found by a
                // trial on atuin's sqlx folder).
                return;
            }
            out.push(s.finding(
                at,
                Rule::DropColumn,
                format!("dropping column {table}.{}: the replicas still running the old release read and write it until they are replaced", cmd.name),
                "expand, then contract: first release code that no longer uses the column, then drop it in a migration of a later release".into(),
            ));
        }
    }

    /// `table`: its name, and the columns its `ALTER TABLE` adds.
    fn add_constraint(
        &mut self,
        s: &Script<'_>,
        at: usize,
        (table, adding): (&str, &[&str]),
        new: bool,
        c: &Constraint,
        out: &mut Vec<Finding>,
    ) {
        let check = c.contype == ConstrType::ConstrCheck as i32;
        let foreign = c.contype == ConstrType::ConstrForeign as i32;
        // The constraint's name in a fix: its own, the one PostgreSQL gives a primary key
        // (found by a trial: the fix said `<name>` where the name was known), or a place
        // for one.
        let default_name = format!("{table}_pkey");
        let name = if !c.conname.is_empty() {
            c.conname.as_str()
        } else if c.contype == ConstrType::ConstrPrimary as i32 {
            default_name.as_str()
        } else {
            "<name>"
        };
        let primary = c.contype == ConstrType::ConstrPrimary as i32;
        let unique = c.contype == ConstrType::ConstrUnique as i32;
        let partitions: Option<Vec<String>> = self
            .live
            .is_partitioned(table)
            .then(|| self.live.partitions(table).to_vec());
        // On a partitioned table, the name PostgreSQL gives it: its partitions' constraints
        // in a fix are named after it, and it adopts those.
        let columns = names(if foreign { &c.fk_attrs } else { &c.keys });
        let own_name = if c.conname.is_empty() {
            default_constraint_name(table, c, &columns)
        } else {
            c.conname.clone()
        };
        // Whether each partition has the valid constraint a fix names after this one: a
        // partitioned table adopts those, checking and indexing no row (checked on PostgreSQL
        // 15).
        let adopts = |partitions: &[String]| {
            partitions.iter().all(|p| {
                self.live
                    .has_valid_constraint(p, &part_name(&own_name, table, p))
            })
        };
        if let (Some(partitions), true) =
            (&partitions, (primary || unique) && !c.indexname.is_empty())
        {
            let kind = if primary { "PRIMARY KEY" } else { "UNIQUE" };
            let f = unique_without_index(
                s,
                at,
                (table, Some(partitions)),
                (&own_name, primary),
                &["<columns>"],
                &[],
            );
            out.push(Finding {
                rule: Rule::RefusedOnPartitionedTable,
                severity: Rule::RefusedOnPartitionedTable.severity(),
                allowed: false,
                message: format!("ADD CONSTRAINT … {kind} USING INDEX on {table}, a partitioned table: the server refuses it (SQLSTATE 0A000: not supported on partitioned tables)"),
                ..f
            });
        } else if !new
            && (primary || unique)
            && c.indexname.is_empty()
            && !partitions.as_deref().is_some_and(adopts)
        {
            let name = if partitions.is_some() {
                own_name.as_str()
            } else {
                name
            };
            let added: Vec<&str> = columns
                .iter()
                .copied()
                .filter(|c| adding.contains(c))
                .collect();
            out.push(unique_without_index(
                s,
                at,
                (table, partitions.as_deref()),
                (name, primary),
                &columns,
                &added,
            ));
        }
        // PostgreSQL 18 adds a foreign key NOT VALID to a partitioned table ("Allow NOT VALID
        // foreign key constraints on partitioned tables", its release notes); 11–17 refuse it
        // (42809), and only there do such keys need the per-partition fix.
        let fk_partitions = partitions.as_ref().filter(|_| {
            !self
                .live
                .adds_not_valid_foreign_keys_to_partitioned_tables()
        });
        if let (Some(partitions), true) = (fk_partitions, foreign) {
            let mut named = c.clone();
            named.conname.clone_from(&own_name);
            if c.skip_validation {
                // PostgreSQL 15 (SQLSTATE 42809, "not yet supported on partitioned tables").
                out.push(s.finding(
                    at,
                    Rule::RefusedOnPartitionedTable,
                    format!("adding a foreign key NOT VALID to {table}, a partitioned table: the server refuses it (SQLSTATE 42809: not supported on partitioned tables)"),
                    partitioned_foreign_key_fix(table, &named, partitions),
                ));
            } else if !new && !adopts(partitions) {
                let other = c.pktable.as_ref().map_or("", |r| r.relname.as_str());
                out.push(s.finding(
                    at,
                    Rule::ConstraintWithoutNotValid,
                    format!("adding a foreign key to {table} checks every existing row while writes to {table} and {other} are blocked"),
                    partitioned_foreign_key_fix(table, &named, partitions),
                ));
            }
        }
        let not_null = if check { not_null_test(c) } else { None };
        self.added
            .entry(table.to_owned())
            .or_default()
            .insert(c.conname.clone(), not_null.map(str::to_owned));
        if !c.skip_validation {
            self.validated
                .entry(table.to_owned())
                .or_default()
                .insert(c.conname.clone());
        } else if check || foreign {
            self.open_tx_added
                .entry(table.to_owned())
                .or_default()
                .insert(c.conname.clone(), foreign);
        }
        if new || c.skip_validation || !(check || foreign) || (foreign && fk_partitions.is_some()) {
            return;
        }
        let (what, blocked) = if foreign {
            let other = c.pktable.as_ref().map_or("", |r| r.relname.as_str());
            ("a foreign key", format!("writes to {table} and {other}"))
        } else {
            ("a check constraint", format!("writes to {table}"))
        };
        out.push(s.finding(
            at,
            Rule::ConstraintWithoutNotValid,
            format!("adding {what} to {table} checks every existing row while {blocked} are blocked"),
            format!("add it with NOT VALID (new rows are checked at once), then ALTER TABLE {table} VALIDATE CONSTRAINT {name}, which checks the old rows without blocking writes, in a later deploy or a non-transactional migration of its own (in the transaction that added it, ADD CONSTRAINT's lock would last through the scan)"),
        ));
    }

    /// The `CHECK` and `REFERENCES` constraints of a column `cmd` adds to `table`, a table
    /// that existed before the deploy: PostgreSQL checks every existing row for a `CHECK`
    /// (under `ADD COLUMN`'s `ACCESS EXCLUSIVE` lock) and, when the column has a default (or
    /// is generated), for a foreign key, whose referenced table is meanwhile locked against
    /// writes. Without a default the new column is NULL in every row, and PostgreSQL adds the
    /// foreign key without checking any (as `NOT VALID` would, with the same locks).
    /// Neither can be written `NOT VALID` in a column definition.
    fn add_column_constraints(
        &mut self,
        s: &Script<'_>,
        at: usize,
        table: &str,
        cmd: &AlterTableCmd,
        column: &ColumnDef,
        out: &mut Vec<Finding>,
    ) {
        let constraints = column_constraints(column);
        let type_name = column_type(column);
        let filled = SERIAL_TYPES.contains(&type_name)
            || constraints.iter().any(|c| {
                c.contype == ConstrType::ConstrDefault as i32
                    || c.contype == ConstrType::ConstrGenerated as i32
            });
        let col = column.colname.as_str();
        // The constraints PostgreSQL checks the rows for: the rewrite adds the column without
        // them.
        let scanned = |c: &Constraint| {
            !c.skip_validation
                && (c.contype == ConstrType::ConstrCheck as i32
                    || (c.contype == ConstrType::ConstrForeign as i32 && filled))
        };
        for c in constraints.iter().copied() {
            let check = c.contype == ConstrType::ConstrCheck as i32;
            let foreign = c.contype == ConstrType::ConstrForeign as i32;
            if !(check || foreign) {
                continue;
            }
            // The name PostgreSQL gives it unless the definition does.
            let name = if c.conname.is_empty() {
                default_constraint_name(table, c, &[col])
            } else {
                c.conname.clone()
            };
            let not_null = if check { not_null_test(c) } else { None };
            self.added
                .entry(table.to_owned())
                .or_default()
                .insert(name.clone(), not_null.map(str::to_owned));
            self.validated
                .entry(table.to_owned())
                .or_default()
                .insert(name.clone());
            if !scanned(c) {
                continue;
            }
            let (what, blocked) = if foreign {
                let other = c.pktable.as_ref().map_or("", |r| r.relname.as_str());
                (
                    format!("a default and a foreign key to {other}"),
                    format!("every read and write of {table} and every write to {other} wait (without the default every row would be NULL, and none checked)"),
                )
            } else {
                (
                    "a check constraint".to_owned(),
                    format!("every read and write of {table} waits"),
                )
            };
            // The column without the constraints checked, then each as a table constraint.
            let mut plain = cmd.clone();
            let mut def = column.clone();
            def.constraints.retain(|n| match &n.node {
                Some(NodeEnum::Constraint(c)) => !scanned(c),
                _ => true,
            });
            plain.def = Some(Box::new(pg_query::Node {
                node: Some(NodeEnum::ColumnDef(Box::new(def))),
            }));
            let mut constraint = c.clone();
            constraint.conname = name.clone();
            constraint.skip_validation = true;
            constraint.initially_valid = false;
            if foreign {
                constraint.fk_attrs = vec![pg_query::Node {
                    node: Some(NodeEnum::String(pg_query::protobuf::String {
                        sval: col.to_owned(),
                    })),
                }];
            }
            let add = AlterTableCmd {
                subtype: AlterTableType::AtAddConstraint as i32,
                def: Some(Box::new(pg_query::Node {
                    node: Some(NodeEnum::Constraint(Box::new(constraint))),
                })),
                ..cmd.clone()
            };
            let validate = AlterTableCmd {
                subtype: AlterTableType::AtValidateConstraint as i32,
                name: name.clone(),
                def: None,
                ..cmd.clone()
            };
            let kind = if check { "CHECK" } else { "REFERENCES" };
            if foreign && self.live.is_partitioned(table) {
                let plain = deparse_alter(table, plain).unwrap_or_else(|| {
                    format!("ALTER TABLE {table} ADD COLUMN {col} … without REFERENCES")
                });
                let Some(NodeEnum::Constraint(named)) =
                    add.def.as_ref().and_then(|d| d.node.as_ref())
                else {
                    continue;
                };
                let mut named = (**named).clone();
                named.skip_validation = false;
                named.initially_valid = true;
                out.push(s.finding(
                    at,
                    Rule::ConstraintWithoutNotValid,
                    format!("adding column {table}.{col} with {what} checks every existing row while {blocked}"),
                    format!("add the column without REFERENCES: {plain}; then {}", partitioned_foreign_key_fix(table, &named, self.live.partitions(table))),
                ));
                continue;
            }
            let steps = match (
                deparse_alter(table, plain),
                deparse_alter(table, add),
                deparse_alter(table, validate),
            ) {
                (Some(plain), Some(add), Some(validate)) => format!("{plain}; then {add}; then {validate}"),
                _ => format!("ALTER TABLE {table} ADD COLUMN {col} … without {kind}; then ALTER TABLE {table} ADD CONSTRAINT {name} … NOT VALID; then ALTER TABLE {table} VALIDATE CONSTRAINT {name}"),
            };
            out.push(s.finding(
                at,
                Rule::ConstraintWithoutNotValid,
                format!("adding column {table}.{col} with {what} checks every existing row while {blocked}"),
                format!("add the column without {kind}, then the constraint with NOT VALID (new rows are checked at once), and validate it, which checks the old rows without blocking writes, in a later deploy or a non-transactional migration of its own (in the transaction that added it, ADD CONSTRAINT's lock would last through the scan): {steps}"),
            ));
        }
    }

    /// Whether a constraint on `table` validated in this deploy makes `SET NOT NULL` on
    /// `column` skip its scan: a `CHECK (column IS NOT NULL)`, or one added before the deploy,
    /// whose definition is unknown here (given the benefit of the doubt).
    fn has_valid_not_null_check(&self, table: &str, column: &str) -> bool {
        let added = self.added.get(table);
        self.validated.get(table).is_some_and(|valid| {
            valid
                .iter()
                .any(|name| match added.and_then(|a| a.get(name)) {
                    Some(checked) => checked.as_deref() == Some(column),
                    None => true,
                })
        })
    }
}

/// The schemas `statement` qualifies a table or function name with, in order, without
/// repeats and without PostgreSQL's own (`pg_catalog`, `information_schema`, `pg_temp`);
/// nothing when the parser rejects it.
pub(crate) fn schemas_named(statement: &str) -> Vec<String> {
    let Ok(parsed) = pg_query::parse(statement, pg_query::ParserOptions::DEFAULT) else {
        return Vec::new();
    };
    let mut schemas: Vec<String> = Vec::new();
    for name in parsed.tables().into_iter().chain(parsed.functions()) {
        let Some((schema, _)) = name.split_once('.') else {
            continue;
        };
        let ours = ["pg_catalog", "information_schema", "pg_temp"].contains(&schema);
        if !ours && !schemas.iter().any(|s| s == schema) {
            schemas.push(schema.to_owned());
        }
    }
    schemas
}

/// The statement, when PostgreSQL refuses it inside a transaction block whatever its options
/// (SQLSTATE 25001), `CONCURRENTLY` aside (`concurrently-in-transaction`).
pub(crate) fn refused_in_a_transaction(node: &NodeEnum) -> Option<&'static str> {
    use pg_query::protobuf::DiscardMode;
    match node {
        NodeEnum::VacuumStmt(vacuum) if vacuum.is_vacuumcmd => Some("VACUUM"),
        NodeEnum::CreatedbStmt(_) => Some("CREATE DATABASE"),
        NodeEnum::DropdbStmt(_) => Some("DROP DATABASE"),
        NodeEnum::CreateTableSpaceStmt(_) => Some("CREATE TABLESPACE"),
        NodeEnum::DropTableSpaceStmt(_) => Some("DROP TABLESPACE"),
        NodeEnum::AlterSystemStmt(_) => Some("ALTER SYSTEM"),
        NodeEnum::DiscardStmt(discard) if discard.target == DiscardMode::DiscardAll as i32 => {
            Some("DISCARD ALL")
        }
        NodeEnum::ReindexStmt(reindex) => match ReindexObjectType::try_from(reindex.kind) {
            Ok(ReindexObjectType::ReindexObjectSchema) => Some("REINDEX SCHEMA"),
            Ok(ReindexObjectType::ReindexObjectSystem) => Some("REINDEX SYSTEM"),
            Ok(ReindexObjectType::ReindexObjectDatabase) => Some("REINDEX DATABASE"),
            _ => None,
        },
        _ => None,
    }
}

fn concurrently_in_transaction(s: &Script<'_>, at: usize, what: &str) -> Finding {
    s.finding(
        at,
        Rule::ConcurrentlyInTransaction,
        format!("{what} … CONCURRENTLY cannot run inside a transaction, and this migration runs in one: the server would refuse it (SQLSTATE 25001)"),
        format!("make the migration non-transactional: {}, with the concurrent statement in a migration of its own", super::migration::NO_TRANSACTION_HOW),
    )
}

/// Checks an `ADD COLUMN` on a table that existed before the deploy.
/// `table`: its name, and its partitions when it is partitioned.
fn add_column(
    s: &Script<'_>,
    at: usize,
    (table, partitions): (&str, Option<&[String]>),
    column: &ColumnDef,
    out: &mut Vec<Finding>,
) {
    let constraints = column_constraints(column);
    let has = |t: ConstrType| constraints.iter().any(|c| c.contype == t as i32);
    let default = constraints
        .iter()
        .find(|c| c.contype == ConstrType::ConstrDefault as i32)
        .and_then(|c| c.raw_expr.as_deref());
    let type_name = column_type(column);
    let stored_generated = constraints
        .iter()
        .any(|c| c.contype == ConstrType::ConstrGenerated as i32 && c.generated_kind != "v");
    let rewrite = if SERIAL_TYPES.contains(&type_name) {
        Some(format!(
            "its type {type_name} fills every row from a sequence"
        ))
    } else if has(ConstrType::ConstrIdentity) {
        Some("an identity column fills every row from a sequence".to_owned())
    } else if stored_generated {
        Some("a stored generated column is computed for every row".to_owned())
    } else {
        default
            .and_then(volatile_function)
            .map(|f| format!("its default {f}() is volatile, so it is evaluated for every row"))
    };
    let name = &column.colname;
    for c in &constraints {
        let primary = c.contype == ConstrType::ConstrPrimary as i32;
        if (primary || c.contype == ConstrType::ConstrUnique as i32) && c.indexname.is_empty() {
            let constraint = match (c.conname.is_empty(), partitions) {
                (false, _) => c.conname.clone(),
                // The partitions' constraints are named after it.
                (true, Some(_)) => default_constraint_name(table, c, &[name]),
                (true, None) => "<name>".to_owned(),
            };
            out.push(unique_without_index(
                s,
                at,
                (table, partitions),
                (&constraint, primary),
                &[name],
                &[name],
            ));
        }
    }
    if let Some(why) = rewrite {
        // A generated column has no default to set later (found by a trial on a Flyway
        // folder, whose fix said to set one).
        let fix = if stored_generated {
            "add it as a plain column that a BEFORE INSERT OR UPDATE trigger computes, then backfill existing rows in batches; or compute the expression where it is read (a view, an expression index)"
        } else {
            "add the column without a default (or with a constant one), set the default in a second statement (ALTER COLUMN … SET DEFAULT applies to new rows only), then backfill existing rows in batches"
        };
        out.push(s.finding(
            at,
            Rule::AddColumnVolatileDefault,
            format!("adding column {table}.{name}: {why}, rewriting the whole table under an ACCESS EXCLUSIVE lock"),
            fix.into(),
        ));
    } else if (column.is_not_null || has(ConstrType::ConstrNotnull)) && default.is_none() {
        out.push(s.finding(
            at,
            Rule::AddColumnNotNullWithoutDefault,
            format!("adding column {table}.{name} NOT NULL without a default fails as soon as the table has rows, and the old release's INSERTs would not set it"),
            "add it with a constant default (no rewrite since PostgreSQL 11), or add it nullable, backfill, then add a NOT VALID CHECK (… IS NOT NULL), validate it and SET NOT NULL".into(),
        ));
    }
}

/// A `PRIMARY KEY` or `UNIQUE` constraint (`constraint`: its name, and whether it is the
/// primary key) added to an existing `table` on `columns` without an index built first;
/// `added`: those of the columns the same statement adds, which must exist before an index can.
fn unique_without_index(
    s: &Script<'_>,
    at: usize,
    (table, partitions): (&str, Option<&[String]>),
    (name, primary): (&str, bool),
    columns: &[&str],
    added: &[&str],
) -> Finding {
    let (kind, index_kind) = if primary {
        ("PRIMARY KEY", "a primary key")
    } else {
        ("UNIQUE", "a unique constraint")
    };
    let add_first = if added.is_empty() {
        String::new()
    } else {
        format!(
            "add {} in an ALTER TABLE of its own without the constraint, keeping its type, default and NOT NULL (a constant default rewrites no row since PostgreSQL 11; dropping it would leave the existing rows NULL); ",
            added.join(", ")
        )
    };
    let pk_note = if primary {
        " (a primary key also makes its columns NOT NULL: see set-not-null-without-check)"
    } else {
        ""
    };
    if let Some(partitions) = partitions {
        // `ADD CONSTRAINT … USING INDEX` is refused on a partitioned table (SQLSTATE 0A000,
        // PostgreSQL 15); on a partition, a plain table, it is not, and ADD CONSTRAINT on the
        // parent then adopts each partition's constraint and its index, building none (checked
        // on PostgreSQL 15: the partitions' indexes keep their relfilenode).
        let cols = columns.join(", ");
        let mut build = Vec::new();
        let mut adopt = Vec::new();
        for partition in or_placeholder(partitions) {
            let own = part_name(name, table, partition);
            build.push(format!(
                "CREATE UNIQUE INDEX CONCURRENTLY {own} ON {partition} ({cols})"
            ));
            adopt.push(format!(
                "ALTER TABLE {partition} ADD CONSTRAINT {own} {kind} USING INDEX {own}"
            ));
        }
        return s.finding(
            at,
            Rule::UniqueWithoutIndex,
            format!("adding {index_kind} to {table} builds its index on every partition while every read and write of {table} waits"),
            format!(
                "{add_first}{table} is partitioned, where ADD CONSTRAINT … USING INDEX is refused (SQLSTATE 0A000): build each partition's index first without blocking, in a non-transactional migration ({how}): {build}; then make each its partition's constraint: {adopt}; then ALTER TABLE {table} ADD CONSTRAINT {name} {kind} ({cols}), which adopts the partitions' constraints and builds no index (it still takes an ACCESS EXCLUSIVE lock on {table} and its partitions, for a moment){pk_note}",
                how = super::migration::NO_TRANSACTION_HOW,
                build = build.join("; "),
                adopt = adopt.join("; "),
            ),
        );
    }
    s.finding(
        at,
        Rule::UniqueWithoutIndex,
        format!("adding {index_kind} to {table} builds its index while every read and write of {table} waits"),
        format!(
            "{add_first}build the index first without blocking, in a non-transactional migration: CREATE UNIQUE INDEX CONCURRENTLY {name}_new ON {table} ({}); then ALTER TABLE {table} ADD CONSTRAINT {name} {kind} USING INDEX {name}_new, which gives the index the constraint's name (to replace a constraint of that name, drop it in the same ALTER TABLE){}",
            columns.join(", "),
            pk_note
        ),
    )
}

/// The partitions to write a fix for: `partitions`, or a place for one when none is known.
fn or_placeholder(partitions: &[String]) -> Vec<&str> {
    if partitions.is_empty() {
        vec!["<partition>"]
    } else {
        partitions.iter().map(String::as_str).collect()
    }
}

/// The name a fix gives the part on `partition` of `name`, an index or constraint of
/// `table`: `events_acct` of `events` is `events_2024_acct` on `events_2024`.
fn part_name(name: &str, table: &str, partition: &str) -> String {
    match name
        .strip_prefix(table)
        .and_then(|rest| rest.strip_prefix('_'))
    {
        Some(rest) if !rest.is_empty() => format!("{partition}_{rest}"),
        _ => format!("{partition}_{name}"),
    }
}

/// The name PostgreSQL gives an unnamed constraint `c` of `table` on `columns` (truncation to
/// 63 bytes aside).
fn default_constraint_name(table: &str, c: &Constraint, columns: &[&str]) -> String {
    let columns = columns.join("_");
    match ConstrType::try_from(c.contype) {
        Ok(ConstrType::ConstrPrimary) => format!("{table}_pkey"),
        Ok(ConstrType::ConstrForeign) => format!("{table}_{columns}_fkey"),
        Ok(ConstrType::ConstrUnique) => format!("{table}_{columns}_key"),
        _ => format!("{table}_{columns}_check"),
    }
}

/// The constraints a column definition declares (`NOT NULL`, `DEFAULT`, `REFERENCES`, …).
fn column_constraints(column: &ColumnDef) -> Vec<&Constraint> {
    column
        .constraints
        .iter()
        .filter_map(|c| match &c.node {
            Some(NodeEnum::Constraint(c)) => Some(&**c),
            _ => None,
        })
        .collect()
}

/// The last part of a column definition's type name (`int4`, `bigserial`, `varchar`).
fn column_type(column: &ColumnDef) -> &str {
    column
        .type_name
        .as_ref()
        .and_then(|t| t.names.last())
        .and_then(string)
        .unwrap_or_default()
}

/// The names of the `String` nodes of `nodes` (a constraint's columns).
fn names(nodes: &[pg_query::Node]) -> Vec<&str> {
    nodes.iter().filter_map(string).collect()
}

/// How to build `index` on `table`, a partitioned table with `partitions`, without blocking
/// writes: `CREATE INDEX CONCURRENTLY` is refused there (SQLSTATE 0A000). The parent's index
/// `ON ONLY` it (invalid, made at once), each partition's concurrently, then each attached,
/// which makes the parent's valid once all are (checked on PostgreSQL 15).
fn partitioned_index_fix(table: &str, index: &IndexStmt, partitions: &[String]) -> String {
    let name = if index.idxname.is_empty() {
        let columns: Vec<&str> = index
            .index_params
            .iter()
            .filter_map(|p| match &p.node {
                Some(NodeEnum::IndexElem(e)) if !e.name.is_empty() => Some(e.name.as_str()),
                _ => None,
            })
            .collect();
        format!("{table}_{}_idx", columns.join("_"))
    } else {
        index.idxname.clone()
    };
    let deparse = |index: IndexStmt| {
        NodeEnum::IndexStmt(Box::new(index))
            .deparse(pg_query::DeparseOptions::default())
            .ok()
    };
    let mut parent = index.clone();
    parent.idxname.clone_from(&name);
    parent.concurrent = false;
    if let Some(r) = parent.relation.as_mut() {
        r.inh = false;
    }
    let parent =
        deparse(parent).unwrap_or_else(|| format!("CREATE INDEX {name} ON ONLY {table} (…)"));
    let mut build = Vec::new();
    let mut attach = Vec::new();
    for partition in or_placeholder(partitions) {
        let own = part_name(&name, table, partition);
        let mut child = index.clone();
        child.idxname.clone_from(&own);
        child.concurrent = true;
        child.if_not_exists = false;
        if let Some(r) = child.relation.as_mut() {
            r.relname = partition.to_owned();
            r.schemaname.clear();
            r.inh = true;
        }
        build.push(
            deparse(child)
                .unwrap_or_else(|| format!("CREATE INDEX CONCURRENTLY {own} ON {partition} (…)")),
        );
        attach.push(format!("ALTER INDEX {name} ATTACH PARTITION {own}"));
    }
    format!(
        "{table} is partitioned, where CREATE INDEX CONCURRENTLY is refused (SQLSTATE 0A000): make the index of {table} alone, then each partition's concurrently, and attach each: {parent} (at once: an invalid index of {table} only, no partition locked); then, in a non-transactional migration ({how}): {build}; then {attach} (the index of {table} becomes valid once every partition's is attached; a failed build leaves an INVALID index: drop it with DROP INDEX CONCURRENTLY IF EXISTS before retrying)",
        how = super::migration::NO_TRANSACTION_HOW,
        build = build.join("; "),
        attach = attach.join("; "),
    )
}

/// How to add `c`, a foreign key (named), to `table`, a partitioned table with `partitions`,
/// without checking every row under its lock: `NOT VALID` is refused there (PostgreSQL 15:
/// SQLSTATE 42809), not on a partition; and the parent adopts a partition's validated key of
/// the same definition, checking no row again (checked on PostgreSQL 15: no scan of the
/// partitions when they had one, a scan of each when they had none).
fn partitioned_foreign_key_fix(table: &str, c: &Constraint, partitions: &[String]) -> String {
    let name = c.conname.as_str();
    let other = c.pktable.as_ref().map_or("", |r| r.relname.as_str());
    let add = |constraint: Constraint| AlterTableCmd {
        subtype: AlterTableType::AtAddConstraint as i32,
        def: Some(Box::new(pg_query::Node {
            node: Some(NodeEnum::Constraint(Box::new(constraint))),
        })),
        // 0 is no behaviour at all to the deparser, which aborts on it.
        behavior: pg_query::protobuf::DropBehavior::DropRestrict as i32,
        ..AlterTableCmd::default()
    };
    let mut adds = Vec::new();
    let mut validates = Vec::new();
    for partition in or_placeholder(partitions) {
        let own = part_name(name, table, partition);
        let mut part = c.clone();
        part.conname.clone_from(&own);
        part.skip_validation = true;
        part.initially_valid = false;
        adds.push(deparse_alter(partition, add(part)).unwrap_or_else(|| {
            format!("ALTER TABLE {partition} ADD CONSTRAINT {own} FOREIGN KEY … NOT VALID")
        }));
        validates.push(format!("ALTER TABLE {partition} VALIDATE CONSTRAINT {own}"));
    }
    let mut parent = c.clone();
    parent.skip_validation = false;
    parent.initially_valid = true;
    let parent = deparse_alter(table, add(parent))
        .unwrap_or_else(|| format!("ALTER TABLE {table} ADD CONSTRAINT {name} FOREIGN KEY …"));
    format!(
        "{table} is partitioned, where a foreign key cannot be added NOT VALID (SQLSTATE 42809): add it NOT VALID to each partition (new rows are checked at once): {adds}; then validate each, which checks the old rows without blocking writes, in a later deploy or a non-transactional migration of its own ({how}): {validates}; then {parent}, which adopts the partitions' validated keys without checking a row again (it still takes a SHARE ROW EXCLUSIVE lock on {table}, its partitions and {other}, for a moment)",
        how = super::migration::NO_TRANSACTION_HOW,
        adds = adds.join("; "),
        validates = validates.join("; "),
    )
}

/// The fix for dropping `index`, the index of a partitioned table: there is no form without
/// the lock (checked on PostgreSQL 15: `DROP INDEX CONCURRENTLY` of it is refused, SQLSTATE
/// 0A000, and its partitions' indexes cannot be dropped while it stands).
fn partitioned_drop_index_fix(index: &str) -> String {
    format!("{index} is the index of a partitioned table: DROP INDEX CONCURRENTLY is refused for it (SQLSTATE 0A000) and its partitions' indexes cannot be dropped apart from it, so no form avoids the lock; the drop itself is quick: run DROP INDEX {index} in a non-transactional migration of its own, so that the lock lasts only as long as the drop (the migration's lock_timeout bounds the wait for it), and allow it there with `-- svcdb:allow drop-index-without-concurrently`")
}

/// `ALTER TABLE table <cmd>`, as PostgreSQL's deparser writes it; `None` when it cannot.
fn deparse_alter(table: &str, cmd: AlterTableCmd) -> Option<String> {
    let alter = AlterTableStmt {
        relation: Some(pg_query::protobuf::RangeVar {
            relname: table.to_owned(),
            inh: true,
            relpersistence: "p".to_owned(),
            ..Default::default()
        }),
        cmds: vec![pg_query::Node {
            node: Some(NodeEnum::AlterTableCmd(Box::new(cmd))),
        }],
        objtype: ObjectType::ObjectTable as i32,
        missing_ok: false,
    };
    NodeEnum::AlterTableStmt(alter)
        .deparse(pg_query::DeparseOptions::default())
        .ok()
}

/// The column of a `CHECK (column IS NOT NULL)`.
fn not_null_test(c: &Constraint) -> Option<&str> {
    let Some(NodeEnum::NullTest(test)) = c.raw_expr.as_ref().and_then(|e| e.node.as_ref()) else {
        return None;
    };
    if test.nulltesttype != NullTestType::IsNotNull as i32 {
        return None;
    }
    let Some(NodeEnum::ColumnRef(column)) = test.arg.as_ref().and_then(|a| a.node.as_ref()) else {
        return None;
    };
    match &column.fields[..] {
        [only] => string(only),
        _ => None,
    }
}

/// The first volatile function called anywhere in `expr`. The protobuf tree is walked through
/// its serde form, which reaches every node kind without listing them.
fn volatile_function(expr: &pg_query::Node) -> Option<String> {
    fn walk(value: &serde_json::Value) -> Option<String> {
        match value {
            serde_json::Value::Object(map) => {
                if let Some(call) = map.get("FuncCall") {
                    let name = call["funcname"]
                        .as_array()
                        .and_then(|n| n.last())
                        .and_then(|n| n["node"]["String"]["sval"].as_str());
                    if let Some(name) = name.filter(|n| VOLATILE_FUNCTIONS.contains(n)) {
                        return Some(name.to_owned());
                    }
                }
                map.values().find_map(walk)
            }
            serde_json::Value::Array(items) => items.iter().find_map(walk),
            _ => None,
        }
    }
    walk(&serde_json::to_value(expr).ok()?)
}

/// Moves the entry of `old` in `map`, if any, to `new`.
fn rekey<V>(map: &mut HashMap<String, V>, old: &str, new: &str) {
    if let Some(value) = map.remove(old) {
        map.insert(new.to_owned(), value);
    }
}

/// The last name of a dotted name (`schema.table`), as a `DROP` lists its objects.
fn last_name(object: &pg_query::Node) -> Option<&str> {
    match object.node.as_ref()? {
        NodeEnum::List(names) => names.items.last().and_then(string),
        _ => None,
    }
}

/// The text of a `String` node.
fn string(node: &pg_query::Node) -> Option<&str> {
    match &node.node {
        Some(NodeEnum::String(s)) => Some(s.sval.as_str()),
        _ => None,
    }
}

/// True when an option's argument says false (`VACUUM (FULL false)`); an absent one is true.
fn is_false(arg: Option<&pg_query::Node>) -> bool {
    match arg.and_then(|a| a.node.as_ref()) {
        Some(NodeEnum::Boolean(b)) => !b.boolval,
        Some(NodeEnum::String(s)) => {
            matches!(s.sval.to_ascii_lowercase().as_str(), "false" | "off" | "0")
        }
        Some(NodeEnum::Integer(i)) => i.ival == 0,
        Some(NodeEnum::AConst(c)) => match &c.val {
            Some(a_const::Val::Boolval(b)) => !b.boolval,
            Some(a_const::Val::Ival(i)) => i.ival == 0,
            Some(a_const::Val::Sval(s)) => {
                matches!(s.sval.to_ascii_lowercase().as_str(), "false" | "off")
            }
            _ => false,
        },
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::Migrations;

    /// The rules a deploy of one migration, `sql`, breaks on a server of `version`.
    fn rules_on(version: i32, sql: &str) -> Vec<Rule> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("1_x.up.sql"), sql).unwrap();
        let migrations = Migrations::from_dir(dir.path()).unwrap();
        lint_live(migrations.iter(), [], LiveColumns::of_server(version))
            .findings
            .into_iter()
            .map(|f| f.rule)
            .collect()
    }

    /// PostgreSQL 18 adds a foreign key `NOT VALID` to a partitioned table, which 15 refuses
    /// (the integration tests show 15 on the server; 18 is not installed here).
    #[test]
    fn a_not_valid_foreign_key_on_a_partitioned_table_is_refused_before_postgresql_18_only() {
        let sql = "-- svcdb:no-transaction\nCREATE TABLE t (a int, b int) PARTITION BY LIST (a);\n\
                   ALTER TABLE t ADD CONSTRAINT t_b FOREIGN KEY (b) REFERENCES users (id) NOT VALID;";
        assert_eq!(rules_on(150_000, sql), [Rule::RefusedOnPartitionedTable]);
        assert_eq!(rules_on(180_000, sql), []);
    }
}
