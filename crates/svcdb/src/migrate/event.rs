//! Progress events, for a CLI that prints each migration as it runs.

use std::fmt;

use serde::Serialize;

use super::version::Version;

/// Which script of a migration runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// The up script.
    Up,
    /// The down script.
    Down,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Up => "up",
            Direction::Down => "down",
        })
    }
}

/// Progress, reported as it happens to the observer of [`Migrator::up_with`](super::Migrator::up_with) and friends.
///
/// In an atomic deploy `Finished` means the script ran inside the deploy's transaction; it is
/// committed only when the call returns `Ok`. The `Display` form is one line for a terminal.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum MigrateEvent {
    /// Another runner holds the schema's lock; we wait (at most `lock_wait`).
    WaitingForLock {
        /// The schema.
        schema: String,
    },
    /// The connected role is not the owner of the schema but may act as it (a superuser, or a
    /// member of the owner role): the run works as the owner (`SET ROLE`), so what the
    /// migrations create, the history table included, belongs to the owner, the service's role.
    ActingAsOwner {
        /// The schema.
        schema: String,
        /// The role the runner connected as.
        connected: String,
        /// The schema's owner, whom the run works as.
        owner: String,
    },
    /// A script starts.
    Started {
        /// Its version.
        version: Version,
        /// Its name.
        name: String,
        /// Up or down.
        direction: Direction,
        /// Whether it runs in a transaction.
        transactional: bool,
    },
    /// A script finished without error.
    Finished {
        /// Its version.
        version: Version,
        /// Its name.
        name: String,
        /// Up or down.
        direction: Direction,
        /// How long it took, in milliseconds.
        duration_ms: f64,
    },
    /// A statement waited longer than `lock_timeout` for a table lock (SQLSTATE 55P03: another
    /// session holds a conflicting lock, e.g. a long transaction on the table); after `delay_ms`
    /// the runner tries again (see
    /// [`MigrateOptions::lock_retries`](super::MigrateOptions::lock_retries)).
    LockRetry {
        /// The version whose statement timed out.
        version: Version,
        /// Its name.
        name: String,
        /// Up or down.
        direction: Direction,
        /// What runs again: `None` for the whole transaction (every migration of its group,
        /// rolled back), `Some(n)` for the n-th statement (from 1) of a non-transactional script.
        statement: Option<usize>,
        /// This retry's number, from 1.
        attempt: u32,
        /// The most retries allowed.
        retries: u32,
        /// The pause before it, in milliseconds.
        delay_ms: f64,
    },
    /// A repeatable migration (Flyway's `R__<name>.sql`) runs: never run, or its file changed.
    RepeatableStarted {
        /// Its name.
        name: String,
        /// Whether it runs in a transaction.
        transactional: bool,
    },
    /// A repeatable migration ran and was recorded.
    RepeatableFinished {
        /// Its name.
        name: String,
        /// How long it took, in milliseconds.
        duration_ms: f64,
    },
    /// Before anything runs: a [lint](mod@super::lint) finding that does not stop `up` (a
    /// warning, or an error let through by
    /// [`MigrateOptions::allow_unsafe`](super::MigrateOptions::allow_unsafe)).
    Lint {
        /// What was found.
        finding: super::lint::Finding,
        /// True for an error that would have stopped the run, let through by
        /// [`MigrateOptions::allow_unsafe`](super::MigrateOptions::allow_unsafe).
        let_through: bool,
    },
}

impl fmt::Display for MigrateEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrateEvent::WaitingForLock { schema } => {
                write!(
                    f,
                    "waiting for another runner to finish migrating schema {schema}…"
                )
            }
            MigrateEvent::ActingAsOwner {
                schema,
                connected,
                owner,
            } => write!(
                f,
                "connected as {connected}, which does not own schema {schema}: migrating as its owner {owner} (SET ROLE), so what the migrations create belongs to {owner}"
            ),
            MigrateEvent::Started {
                version,
                name,
                direction,
                transactional,
            } => {
                let mode = if *transactional {
                    ""
                } else {
                    " (no transaction)"
                };
                write!(f, "{direction} {version}{}{mode}…", spaced(name))
            }
            MigrateEvent::Finished {
                version,
                name,
                direction,
                duration_ms,
            } => {
                write!(
                    f,
                    "{direction} {version}{} done in {duration_ms:.1} ms",
                    spaced(name)
                )
            }
            MigrateEvent::LockRetry {
                version,
                name,
                direction,
                statement,
                attempt,
                retries,
                delay_ms,
            } => {
                let what = match statement {
                    None => "its transaction".to_owned(),
                    Some(n) => format!("statement {n}"),
                };
                write!(
                    f,
                    "{direction} {version}{}: a table lock was not granted within lock_timeout; retrying {what} in {:.1} s (retry {attempt} of {retries})",
                    spaced(name),
                    delay_ms / 1e3
                )
            }
            MigrateEvent::RepeatableStarted {
                name,
                transactional,
            } => {
                let mode = if *transactional {
                    ""
                } else {
                    " (no transaction)"
                };
                write!(f, "repeatable {name}{mode}…")
            }
            MigrateEvent::RepeatableFinished { name, duration_ms } => {
                write!(f, "repeatable {name} done in {duration_ms:.1} ms")
            }
            MigrateEvent::Lint {
                finding,
                let_through,
            } => {
                finding.fmt(f)?;
                if *let_through {
                    // Found by a user trial: an error line before a run that went ahead read as
                    // a failure.
                    f.write_str("\n    allowed by --allow-unsafe (MigrateOptions::allow_unsafe): running it anyway")?;
                }
                Ok(())
            }
        }
    }
}

/// A migration's name after its version in a progress line, or nothing for one whose file
/// gives no name (Flyway's `V0003.sql`).
fn spaced(name: &str) -> String {
    if name.is_empty() {
        String::new()
    } else {
        format!(" {name}")
    }
}
