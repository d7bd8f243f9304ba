//! Table and schema checks on the service's pool, and the start-up gate.
//!
//! The failure this module exists for: the orders service is deployed, its migrations did not
//! run, and the first customer's order fails with `relation "orders" does not exist`. A service
//! that runs the [`Gate`] at start-up refuses to start instead, and says why, before it takes
//! any traffic:
//!
//! ```no_run
//! use svcdb::migrate::Migrations;
//! use svcdb::Gate;
//! use svcdb::{Config, ServiceDb};
//!
//! # async fn demo() -> anyhow::Result<()> {
//! let db = ServiceDb::connect(Config::from_env()?).await?;
//! let gate = Gate::new()
//!     .with_migrations(Migrations::from_dir("migrations")?) // or from_embedded(&MIGRATIONS)
//!     .require(["orders", "order_lines"])?;
//! // Lists every problem at once ("migration 3 (add_orders) is not applied", "table orders is
//! // missing", …); `?` turns a failed gate into an error, so the service exits non-zero.
//! db.verify(&gate).await.ensure_ready()?;
//! # Ok(()) }
//! ```
//!
//! The same [`Gate`] then feeds the health report ([`ServiceDb::health`]) and the `/readyz`
//! endpoint ([`http::router`](crate::http::router)), so readiness means exactly what the
//! start-up check meant.
//!
//! Every catalog query names the configured schema as a bind parameter rather than relying on
//! `current_schema()`: a connection whose `search_path` went wrong must not make the checks
//! look at the wrong schema.

use std::borrow::Cow;
use std::fmt;
use std::time::{Duration, Instant};

use serde::{Serialize, Serializer};
use tokio_postgres::types::Type;
use tokio_postgres::Client;

use crate::error::{pg_message, Error, Result, MISSING_TABLES_HINT};
use crate::ident::Ident;
use crate::migrate::history::{self, History};
use crate::migrate::{
    EmbeddedMigrations, MigrationState, Migrations, StatusReport, Version, HISTORY_TABLE,
};
use crate::pool::ServiceDb;

/// The service schema's relations a query can read: `$1` is the schema's name. A macro, not a
/// `const`, so `concat!` can build both queries below from the one definition.
macro_rules! relations_sql {
    () => {
        "SELECT c.relname, c.relkind::text AS kind
           FROM pg_catalog.pg_class c
           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = $1 AND c.relkind IN ('r', 'v', 'm', 'p', 'f')"
    };
}

/// `list_tables`: `$1` schema.
const LIST_SQL: &str = concat!(relations_sql!(), " ORDER BY c.relname");

/// Everything the gate asks the catalog, in one statement: the active schema, whether the
/// configured one exists and the role may use it (NULL: it does not exist), the role, and which
/// of the tables in `$2` are missing, in the order given. `$1` schema, `$2` table names.
const PROBE_SQL: &str = concat!(
    "SELECT current_schema(),
            (SELECT has_schema_privilege(oid, 'USAGE') FROM pg_catalog.pg_namespace WHERE nspname = $1),
            current_user::text,
            ARRAY(SELECT t.name FROM unnest($2::text[]) WITH ORDINALITY AS t(name, i)
                   WHERE NOT EXISTS (SELECT FROM (",
    relations_sql!(),
    ") r WHERE r.relname = t.name)
                   ORDER BY t.i)"
);

/// What a name in the service schema is (`pg_class.relkind`). Only relations a query can read
/// from count; indexes, sequences and composite types do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TableKind {
    /// An ordinary table (also a partition of a partitioned table).
    Table,
    /// A view.
    View,
    /// A materialized view.
    MaterializedView,
    /// A partitioned table (its rows live in its partitions).
    PartitionedTable,
    /// A foreign table (`postgres_fdw`, …).
    ForeignTable,
}

impl TableKind {
    fn from_relkind(relkind: &str) -> Option<Self> {
        Some(match relkind {
            "r" => Self::Table,
            "v" => Self::View,
            "m" => Self::MaterializedView,
            "p" => Self::PartitionedTable,
            "f" => Self::ForeignTable,
            _ => return None,
        })
    }

    /// How psql's `\d` names it: `table`, `view`, `materialized view`, …
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Table => "table",
            Self::View => "view",
            Self::MaterializedView => "materialized view",
            Self::PartitionedTable => "partitioned table",
            Self::ForeignTable => "foreign table",
        }
    }
}

impl fmt::Display for TableKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One table or view of the service schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TableInfo {
    /// Its name, without the schema.
    pub name: String,
    /// Table, view, …
    pub kind: TableKind,
}

/// The catalog's answer to [`PROBE_SQL`].
struct SchemaRow {
    /// `current_schema()`: `None` when no schema on the search path is usable.
    active: Option<String>,
    /// `None`: the configured schema does not exist; `Some(false)`: the role lacks `USAGE`.
    usable: Option<bool>,
    /// `current_user`.
    user: String,
    /// Required tables that are not in the configured schema, in the order asked.
    missing: Vec<String>,
}

async fn probe_schema(
    client: &Client,
    schema: &Ident,
    tables: &[Ident],
) -> Result<SchemaRow, tokio_postgres::Error> {
    let names: Vec<&str> = tables.iter().map(Ident::as_str).collect();
    // query_typed: parse, bind and execute in one message, so this is one round trip.
    let row = client
        .query_typed(
            PROBE_SQL,
            &[(&schema.as_str(), Type::TEXT), (&names, Type::TEXT_ARRAY)],
        )
        .await?;
    let row = row.first().expect("a SELECT without FROM returns one row");
    Ok(SchemaRow {
        active: row.get(0),
        usable: row.get(1),
        user: row.get(2),
        missing: row.get(3),
    })
}

/// Validates table names as [`Ident`]s before any SQL is sent.
fn table_idents(names: impl IntoIterator<Item = impl AsRef<str>>) -> Result<Vec<Ident>> {
    names
        .into_iter()
        .map(|n| Ok(Ident::new("table", n.as_ref())?))
        .collect()
}

impl ServiceDb {
    /// The schema unqualified names resolve to on a pooled connection. It is the configured
    /// schema unless that schema does not exist, the role may not use it, or something changed
    /// `search_path` on the connection; `None` when no schema on the search path is usable.
    pub async fn current_schema(&self) -> Result<Option<String>> {
        let conn = self.get().await?;
        let row = conn.query_one("SELECT current_schema()", &[]).await?;
        Ok(row.get(0))
    }

    /// True when the service schema holds a table, view, materialized view, partitioned or
    /// foreign table named `name`. The name is validated like every [`Ident`].
    pub async fn table_exists(&self, name: &str) -> Result<bool> {
        Ok(self
            .missing_tables(&table_idents([name])?)
            .await?
            .is_empty())
    }

    /// The tables and views of the service schema with their kind, by name.
    pub async fn list_tables(&self) -> Result<Vec<TableInfo>> {
        let conn = self.get().await?;
        let rows = conn
            .query_typed(LIST_SQL, &[(&self.schema().as_str(), Type::TEXT)])
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                Some(TableInfo {
                    name: r.get(0),
                    kind: TableKind::from_relkind(r.get(1))?,
                })
            })
            .collect())
    }

    /// `Ok` when every one of `names` exists in the service schema (as
    /// [`table_exists`](Self::table_exists) counts), else [`Error::MissingTables`] naming every
    /// missing one. All names are validated before anything is sent.
    pub async fn require_tables(&self, names: &[impl AsRef<str>]) -> Result<()> {
        let missing = self.missing_tables(&table_idents(names)?).await?;
        if missing.is_empty() {
            return Ok(());
        }
        Err(Error::MissingTables {
            schema: self.schema().as_str().to_owned(),
            tables: missing,
        })
    }

    /// Runs the start-up `gate` and reports every problem it finds; it never fails itself (an
    /// unreachable database is a [`Problem::Unreachable`]) and never waits longer than the
    /// gate's timeout. Read-only.
    ///
    /// Call it at start-up and exit non-zero unless the report is ready
    /// ([`GateReport::ensure_ready`] does that with `?`).
    pub async fn verify(&self, gate: &Gate) -> GateReport {
        gate.run(self).await.0
    }

    async fn missing_tables(&self, tables: &[Ident]) -> Result<Vec<String>> {
        let conn = self.get().await?;
        Ok(probe_schema(&conn, self.schema(), tables).await?.missing)
    }
}

/// What the service needs from its schema before it takes traffic: built once at start-up,
/// used by [`ServiceDb::verify`], [`ServiceDb::health`] and the `/readyz` endpoint.
///
/// It checks that connections use the configured schema, that the required tables exist and,
/// when given the service's migrations, that the history table exists, is not dirty, has every
/// migration applied unchanged and no unknown migration older than the newest one the service
/// ships.
///
/// Two states of a rolling deploy are reported as [`Notice`]s and do not fail it: a migration
/// in progress (a runner holds the schema's migration lock, e.g. a long
/// `CREATE INDEX CONCURRENTLY`), and applied migrations newer than every one the service ships
/// (a newer release migrated first: expand, then roll out).
#[derive(Debug, Clone)]
pub struct Gate {
    migrations: Option<Migrations>,
    required: Vec<Ident>,
    allow_unknown_applied: bool,
    timeout: Duration,
}

impl Default for Gate {
    fn default() -> Self {
        Self::new()
    }
}

impl Gate {
    /// The default timeout of the checks: under the 3 s a Kubernetes probe should be given
    /// (`timeoutSeconds: 3`), so the probe gets the report instead of timing out itself.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

    /// A gate that checks only the active schema; add migrations and tables to it.
    pub fn new() -> Self {
        Self {
            migrations: None,
            required: Vec::new(),
            allow_unknown_applied: false,
            timeout: Self::DEFAULT_TIMEOUT,
        }
    }

    /// Checks the history against `migrations`, the ones the service ships (usually
    /// [`Migrations::from_embedded`]). Without migrations the gate checks no history: for a
    /// service whose migrations another tool runs.
    pub fn with_migrations(mut self, migrations: Migrations) -> Self {
        self.migrations = Some(migrations);
        self
    }

    /// Adds tables (or views) that must exist in the service schema. Fails on a name that is
    /// not a valid [`Ident`], so a typo shows at start-up, not as a missing table.
    pub fn require(mut self, tables: impl IntoIterator<Item = impl AsRef<str>>) -> Result<Self> {
        self.required.extend(table_idents(tables)?);
        Ok(self)
    }

    /// Also accepts applied migrations the service does not ship that are *older* than the
    /// newest one it ships. Applied migrations newer than every shipped one never fail the
    /// gate (a newer release migrated during a rolling deploy; they are reported as
    /// [`Notice::NewerApplied`]); an unknown one in between is a gap, by default a
    /// [`Problem::UnknownApplied`]: a branch's or another release's migration this binary
    /// has never seen changed the schema. Allow it only if it is known to be harmless.
    pub fn allow_unknown_applied(mut self, allow: bool) -> Self {
        self.allow_unknown_applied = allow;
        self
    }

    /// The longest the checks wait for the database (connection included) before reporting it
    /// unreachable. Default: [`DEFAULT_TIMEOUT`](Self::DEFAULT_TIMEOUT).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The migrations checked, if any.
    pub fn migrations(&self) -> Option<&Migrations> {
        self.migrations.as_ref()
    }

    /// The required tables.
    pub fn required_tables(&self) -> &[Ident] {
        &self.required
    }

    /// Runs the checks within the timeout: the report, and how long the queries took once a
    /// connection was had (`None` when the database did not answer them).
    ///
    /// The catalog probe and the history read are sent together on one connection
    /// (tokio-postgres pipelines concurrent queries), so a healthy gate costs one round trip.
    pub(crate) async fn run(&self, db: &ServiceDb) -> (GateReport, Option<Duration>) {
        let schema = db.schema();
        let queries = async {
            let conn = db.get().await?;
            let client: &Client = &conn;
            let started = Instant::now();
            let (row, history) = tokio::join!(
                probe_schema(client, schema, &self.required),
                history::read(client, schema, false)
            );
            Ok::<_, Error>((row, history, started.elapsed()))
        };
        let mut notices = Vec::new();
        let (problems, version, latency) = match tokio::time::timeout(self.timeout, queries).await {
            Ok(Ok((Ok(row), history, latency))) => {
                let (problems, version) = self.assess(schema, row, history, &mut notices);
                (problems, version, Some(latency))
            }
            Ok(Ok((Err(e), _, latency))) => (
                vec![Problem::from_error(&Error::Db(e))],
                None,
                Some(latency),
            ),
            Ok(Err(e)) => (vec![Problem::from_error(&e)], None, None),
            Err(_) => (vec![self.timed_out(db)], None, None),
        };
        // A query that failed because the connection broke got no answer either.
        let answered = !problems
            .iter()
            .any(|p| matches!(p, Problem::Unreachable { .. }));
        let report = GateReport {
            ready: problems.is_empty(),
            schema: schema.as_str().to_owned(),
            migration_version: version,
            migrations_checked: self.migrations.is_some(),
            problems,
            notices,
        };
        (report, latency.filter(|_| answered))
    }

    /// The problems (and notices) in what the database answered, and the current migration
    /// version.
    fn assess(
        &self,
        schema: &Ident,
        row: SchemaRow,
        history: Result<History, tokio_postgres::Error>,
        notices: &mut Vec<Notice>,
    ) -> (Vec<Problem>, Option<Version>) {
        let name = schema.as_str().to_owned();
        let mut problems = Vec::new();
        match (row.usable, &row.active) {
            (None, _) => problems.push(Problem::NoSchema {
                schema: name.clone(),
            }),
            (Some(false), _) => problems.push(Problem::NoSchemaAccess {
                schema: name.clone(),
                role: row.user,
            }),
            (Some(true), active) if active.as_deref() != Some(schema.as_str()) => {
                problems.push(Problem::WrongSchema {
                    expected: name.clone(),
                    active: active.clone(),
                })
            }
            _ => {}
        }
        if row.usable != Some(true) {
            // The history and the tables live in the schema: without it (or without USAGE on
            // it) they are missing for the same reason, and their hint (`svcdb migrate up`)
            // would fail for that reason too. The schema problem alone says what to do.
            return (problems, None);
        }
        let version = match history {
            Ok(history) => self.assess_history(&name, &history, &mut problems, notices),
            Err(e) => {
                problems.push(Problem::from_error(&Error::Db(e)));
                None
            }
        };
        problems.extend(row.missing.into_iter().map(|table| Problem::MissingTable {
            schema: name.clone(),
            table,
        }));
        (problems, version)
    }

    /// Dirty rows always count, and a migration in progress is always noted; the rest only
    /// against the service's migrations. Reuses the runner's [`StatusReport`], so the gate and
    /// `svcdb migrate status` see the same states; only where they lead differs: applied
    /// migrations newer than every shipped one are a notice here, while the runner refuses
    /// them as missing files unless told to ignore them.
    fn assess_history(
        &self,
        schema: &str,
        history: &History,
        problems: &mut Vec<Problem>,
        notices: &mut Vec<Notice>,
    ) -> Option<Version> {
        // StatusReport needs a source; against an empty one every row is "missing", which
        // counts only with the service's own migrations (below).
        static NONE: EmbeddedMigrations = EmbeddedMigrations::new("", &[]);
        let none;
        let source = match &self.migrations {
            Some(m) => m,
            None => {
                none = Migrations::from_embedded(&NONE).expect("an empty source is valid");
                &none
            }
        };
        let status = StatusReport::build(schema, source, history);
        if self.migrations.is_some() && !status.history_exists && !source.is_empty() {
            // One problem instead of one per migration: all of them are pending.
            problems.push(Problem::NoHistory {
                schema: schema.to_owned(),
                pending: source.len(),
            });
            return None;
        }
        let newest_shipped = source.latest().map(|m| &m.version);
        for e in &status.entries {
            let (version, name) = (e.version.clone(), e.name.clone());
            let problem = match e.state {
                MigrationState::Dirty => Problem::Dirty { version, name },
                MigrationState::InProgress => {
                    notices.push(Notice::MigrationInProgress {
                        version,
                        name,
                        running_ms: e.running_ms.unwrap_or_default(),
                    });
                    continue;
                }
                // Without the service's migrations, only a dirty row means anything.
                _ if self.migrations.is_none() => continue,
                MigrationState::Pending => Problem::Pending { version, name },
                MigrationState::Changed => Problem::Changed {
                    version,
                    name,
                    path: e.path.clone().unwrap_or_default(),
                },
                MigrationState::Missing => match newest_shipped {
                    Some(newest) if version < *newest => {
                        if self.allow_unknown_applied {
                            continue;
                        }
                        Problem::UnknownApplied {
                            version,
                            name,
                            newest_shipped: newest.clone(),
                        }
                    }
                    _ => {
                        notices.push(Notice::NewerApplied { version, name });
                        continue;
                    }
                },
                MigrationState::Applied => continue,
            };
            problems.push(problem);
        }
        status.current_version
    }

    /// The problem for checks that outlived the timeout, with the pool's last connection
    /// error when there is one (the usual reason).
    fn timed_out(&self, db: &ServiceDb) -> Problem {
        // A server that refused (unknown database, bad password) did answer: say so.
        let error = match db.status().last_connect_error {
            Some(cause) => format!(
                "could not connect within {:?}; last connection attempt failed: {cause}",
                self.timeout
            ),
            None => format!("no answer within {:?}", self.timeout),
        };
        Problem::Unreachable {
            error,
            hint: db.last_connect_hint().unwrap_or(UNREACHABLE_HINT).into(),
        }
    }
}

/// The hint for an unreachable database whose error carries none.
const UNREACHABLE_HINT: &str =
    "check that PostgreSQL is running and that DATABASE_URL names the right host, port, user and database";

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
    /// Turns an error of the checks into a problem: connection-level failures make the
    /// database unreachable, a server's error is a failed query.
    fn from_error(e: &Error) -> Self {
        match e {
            Error::Db(db) if db.code().is_some() => Problem::QueryFailed {
                error: pg_message(db),
            },
            other => {
                // svcdb's errors end with their own "\n  hint: …"; keep it as the hint.
                let text = other.to_string();
                let (error, hint) = match text.split_once("\n  hint: ") {
                    Some((error, hint)) => (error.to_owned(), hint.to_owned()),
                    None => (text, UNREACHABLE_HINT.to_owned()),
                };
                Problem::Unreachable { error, hint }
            }
        }
    }

    /// What is wrong, in one line.
    pub fn message(&self) -> String {
        match self {
            Problem::Unreachable { error, .. } => format!("database unreachable: {error}"),
            Problem::QueryFailed { error } => format!("a check's query failed: {error}"),
            Problem::NoSchema { schema } => format!("schema {schema} does not exist"),
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
                "migration {version} ({name}) is dirty: it failed part-way and may be half-applied (no runner is migrating the schema)"
            ),
            Problem::Pending { version, name } => {
                format!("migration {version} ({name}) is not applied")
            }
            Problem::Changed {
                version,
                name,
                path,
            } => format!(
                "migration {version} ({name}) was changed after it was applied: {path} no longer matches the history's checksum"
            ),
            Problem::UnknownApplied {
                version,
                name,
                newest_shipped,
            } => format!(
                "migration {version} ({name}) is applied but this release does not ship it, though it ships newer ones (up to {newest_shipped}): a branch's or another release's migration ran here"
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
            Problem::NoSchema { .. } => {
                "run `svcdb provision` for this service (or set SVCDB_CREATE_SCHEMA=true), or fix SVCDB_SCHEMA"
            }
            Problem::NoSchemaAccess { .. } => {
                "run `svcdb provision` for this service's role, or connect as the schema's owner"
            }
            Problem::WrongSchema { .. } => {
                "use `SET LOCAL search_path` inside a transaction, never `SET` on a pooled connection; behind PgBouncer, which drops the `options` startup parameter, pin it on the role (`ALTER ROLE … SET search_path`)"
            }
            Problem::NoHistory { .. } | Problem::Pending { .. } => "run `svcdb migrate up`",
            Problem::Dirty { .. } => {
                "finish or undo that migration's statements by hand (`svcdb migrate repair` names the invalid indexes to drop), then run `svcdb migrate repair`"
            }
            Problem::Changed { .. } => {
                "restore the file and put the change in a new migration, or run `svcdb migrate repair` if the edit is harmless"
            }
            Problem::UnknownApplied { .. } => {
                "find the branch or release that ships it: add its file to this release if it belongs, or revert it with that release's `svcdb migrate down` (Gate::allow_unknown_applied accepts it as it is)"
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

/// The gate's verdict: every problem it found, and the migration version it saw.
#[derive(Debug, Clone, Serialize)]
pub struct GateReport {
    /// True when there is no problem.
    pub ready: bool,
    /// The configured schema.
    pub schema: String,
    /// The newest applied migration that is not dirty (`None`: none, or not read).
    pub migration_version: Option<Version>,
    /// False when the gate had no migrations to check the history against.
    pub migrations_checked: bool,
    /// Every problem found, schema first, then migrations, then tables.
    #[serde(serialize_with = "serialize_problems")]
    pub problems: Vec<Problem>,
    /// What is worth knowing but does not stop the service (a migration in progress, newer
    /// migrations applied by a newer release), by version.
    #[serde(serialize_with = "serialize_notices")]
    pub notices: Vec<Notice>,
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
                "migration {version} ({name}) is in progress: running for {:.1} s",
                running_ms / 1e3
            ),
            Notice::NewerApplied { version, name } => format!(
                "migration {version} ({name}) is applied by a newer release; this one does not ship it"
            ),
        }
    }
}

impl fmt::Display for Notice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message())
    }
}

impl GateReport {
    /// `Ok(self)` when ready, else [`Error::NotReady`] carrying the report, whose message lists
    /// every problem: `db.verify(&gate).await.ensure_ready()?` in a service's `main`.
    pub fn ensure_ready(self) -> Result<Self> {
        if self.ready {
            Ok(self)
        } else {
            Err(Error::NotReady(Box::new(self)))
        }
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
        for hint in self.problems.iter().map(Problem::hint) {
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
fn serialize_notices<S: Serializer>(notices: &[Notice], s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Shown<'a> {
        #[serde(flatten)]
        notice: &'a Notice,
        message: String,
    }
    s.collect_seq(notices.iter().map(|notice| Shown {
        notice,
        message: notice.message(),
    }))
}

/// Problems as JSON objects: `kind`, the variant's fields, `message` and `hint`.
fn serialize_problems<S: Serializer>(problems: &[Problem], s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Shown<'a> {
        #[serde(flatten)]
        problem: &'a Problem,
        message: String,
        hint: Cow<'a, str>,
    }
    s.collect_seq(problems.iter().map(|problem| Shown {
        problem,
        message: problem.message(),
        hint: problem.hint(),
    }))
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

    #[test]
    fn unreachable_keeps_the_errors_own_hint() {
        let e = Error::AcquireTimeout {
            waited: Duration::from_millis(300),
            target: "u@h:1/d".into(),
            size: 5,
            max_size: 5,
            cause: None,
            no_answer_within: None,
        };
        match Problem::from_error(&e) {
            Problem::Unreachable { error, hint } => {
                assert!(!error.contains("hint"), "{error}");
                assert!(hint.contains("SVCDB_POOL_MAX"), "{hint}");
            }
            other => panic!("{other:?}"),
        }
    }
}
