//! The start-up gate: what the service needs from its schema and its migrations before it
//! takes traffic, checked in one round trip.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use self::report::{GateReport, Notice, Problem};
use super::tables::{probe_schema, table_idents, SchemaRow};
use crate::error::{pg_message, Error, Result};
use crate::ident::Ident;
use crate::migrate::history::{self, History};
use crate::migrate::{EmbeddedMigrations, MigrationState, Migrations, StatusReport, Version};
use crate::pool::ServiceDb;

pub(crate) mod report;

impl ServiceDb {
    /// Runs the start-up `gate` and reports every problem it finds; it never fails itself (an
    /// unreachable database is a [`Problem::Unreachable`]) and never waits longer than the
    /// gate's timeout. Read-only.
    ///
    /// Call it at start-up and exit non-zero unless the report is ready
    /// ([`GateReport::ensure_ready`] does that with `?`).
    pub async fn verify(&self, gate: &Gate) -> GateReport {
        gate.run(self).await.0
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
/// Three states of a rolling deploy are reported as [`Notice`]s and do not fail it: a migration
/// in progress (a runner holds the schema's migration lock, e.g. a long
/// `CREATE INDEX CONCURRENTLY`), applied migrations newer than every one the service ships
/// (a newer release migrated first: expand, then roll out), and a dirty migration newer than
/// every one it ships (a newer release's deploy failed part-way: this release does not depend
/// on it).
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
                probe_schema(client, schema, &self.required, &db.config().extra_schemas),
                history::read(client, schema, false)
            );
            Ok::<_, Error>((row, history, started.elapsed(), conn))
        };
        let mut notices = Vec::new();
        let deadline = tokio::time::Instant::now() + self.timeout;
        let (problems, version, latency) = match tokio::time::timeout_at(deadline, queries).await {
            Ok(Ok((Ok(row), history, latency, conn))) => {
                let (problems, version) = self.assess(schema, row, history, &mut notices);
                // Found by a user trial: while another replica applied a transactional group,
                // health listed its migrations as pending with "run `svcdb migrate up`", where
                // `migrate status` said the lock was held. Asked only then: one more query.
                let pending = problems
                    .iter()
                    .any(|p| matches!(p, Problem::Pending { .. } | Problem::NoHistory { .. }));
                if pending {
                    let held = format!(
                        "SELECT {}",
                        crate::migrate::lock::held_by_another_sql(schema)
                    );
                    let asked = tokio::time::timeout_at(deadline, conn.query_one(&held, &[]));
                    if let Ok(Ok(row)) = asked.await {
                        if row.get::<_, bool>(0) {
                            notices.push(Notice::MigrationLocked {
                                schema: schema.as_str().to_owned(),
                            });
                        }
                    }
                }
                (problems, version, Some(latency))
            }
            Ok(Ok((Err(e), _, latency, _))) => (
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
            // Not when the database did not answer: nothing was checked then.
            migrations_checked: self.migrations.is_some() && answered,
            problems,
            notices,
        };
        // Here, so the start-up gate records them too, not only the health checks (found by
        // a user trial: after a restart `svcdb_migration_version` was missing until the first
        // `/readyz`).
        let labels = db.metric_labels();
        metrics::gauge!("svcdb_gate_ready", labels.iter()).set(if report.ready {
            1.0
        } else {
            0.0
        });
        if let Some(version) = &report.migration_version {
            metrics::gauge!("svcdb_migration_version", labels.iter()).set(version.as_f64());
        }
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
                // As `connect` suggests them (found by a user trial: health and verify did not).
                similar: crate::pool::look_alike(&name, row.others),
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
        // Found by a user trial: `--extra-schemas public,nope` was ready without a word; the
        // search path skips a schema that does not exist, so it is a notice, not a problem.
        notices.extend(
            row.missing_extra
                .into_iter()
                .map(|schema| Notice::ExtraSchemaMissing { schema }),
        );
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

    /// Dirty rows count (but a newer release's is a notice, against the service's
    /// migrations), and a migration in progress is always noted; the rest only against the
    /// service's migrations. Reuses the runner's [`StatusReport`], so the gate and
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
        if self.migrations.is_some() && newest_shipped.is_none() && !history.rows.is_empty() {
            // Every applied migration would read as a newer release's: a wrong folder made a
            // service ready (found by an adversarial trial; `migrate status` refused it).
            problems.push(Problem::NoneShipped {
                applied: history.rows.len(),
            });
            return status.current_version;
        }
        for e in &status.entries {
            let (version, name) = (e.version.clone(), e.name.clone());
            let problem = match e.state {
                // A newer release's migration this one does not ship: expand-then-contract
                // means this release does not depend on it, so its failure must not take the
                // running replicas out of service (found by an operations trial: one failed
                // deploy pod made every old replica unready).
                MigrationState::Dirty
                    if self.migrations.is_some()
                        && newest_shipped.is_some_and(|newest| version > *newest) =>
                {
                    notices.push(Notice::NewerDirty { version, name });
                    continue;
                }
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
                // Found by a trial: "run `svcdb migrate up`" for a migration `up` refuses,
                // still `migrate new`'s template.
                MigrationState::Pending => match source.get(&version) {
                    Some(m) if crate::migrate::template::is_untouched(m) => Problem::Unwritten {
                        version,
                        name,
                        path: m.path.clone(),
                    },
                    _ => Problem::Pending { version, name },
                },
                MigrationState::Changed => Problem::Changed {
                    version,
                    name,
                    path: e.path.clone().unwrap_or_default(),
                },
                MigrationState::Missing => match newest_shipped {
                    Some(newest) if version < *newest => {
                        if self.allow_unknown_applied {
                            // Accepted, and said (found by a user trial: a gap passed
                            // without a word).
                            notices.push(Notice::UnknownAppliedAccepted { version, name });
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
                "could not connect within {}; last connection attempt failed: {cause}",
                crate::config::human_duration(self.timeout)
            ),
            None => format!(
                "no answer within {}",
                crate::config::human_duration(self.timeout)
            ),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_keeps_the_errors_own_hint() {
        let e = Error::AcquireTimeout {
            waited: Duration::from_millis(300),
            target: "u@h:1/d".into(),
            size: 5,
            max_size: 5,
            cause: None,
            no_answer_within: None,
            no_answer_cut_short: false,
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
