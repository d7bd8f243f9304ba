//! How the binary reports a failure: as text on stderr (`error: …` and one `  hint: …` line
//! per distinct hint) and, with `--json`, also as one JSON object on stdout, so that a script
//! can parse every outcome, not only the successful ones.
//!
//! The JSON object has three fields:
//!
//! * `error`: what went wrong, the same text as on stderr without `error: ` and the hints;
//! * `hint`: what to do, or `null`; several distinct hints are separated by newlines;
//! * `code`: the SQLSTATE the server reported (`"42501"`, `"28P01"`, …), else the kind of
//!   error (see [`Failure::code`]);
//! * `findings`, only when the lint's findings refused a migration (`code` `"unsafe"`): each
//!   blocking finding as `migrate lint --json` writes it (`path`, `line`, `rule`, `message`,
//!   `fix`, …), so that a script need not parse them out of `error`.
//!
//! Every error of the binary goes through [`Failure`], which renders it with the library's
//! [`Report`]: svcdb's errors carry their hints in their text (`\n  hint: …`), and an error
//! wrapped in context would otherwise print a cause's hint twice, or a hint apart from its error.

use std::time::Duration;

use svcdb::error::Report;
use svcdb::migrate::{AdoptError, MigrateError};
use svcdb::tokio_postgres::error::DbError;
use svcdb::{DedicatedConn, SqlState, Tls};

use crate::global::Global;
use crate::output::{errln, outln};
use crate::usage::{Usage, HINT};
use crate::wording::for_cli;

/// A failed command, ready to print.
#[derive(Debug)]
pub struct Failure {
    /// What went wrong: the error and its causes, each message once.
    error: String,
    /// What to do: every distinct hint, one per line.
    hint: Option<String>,
    /// The SQLSTATE, else the kind of error.
    code: String,
    /// The exit code: 64 for a usage error (an invalid command line or configuration), else 1.
    exit: u8,
    /// The lint's findings that refused the migrations, when they did.
    findings: Option<serde_json::Value>,
}

impl Failure {
    /// The failure `e` describes: its chain rendered by [`svcdb::error::Report`] (each message
    /// once, every distinct hint), and its code.
    pub fn new(e: &anyhow::Error) -> Self {
        let report = Report::new(e.as_ref());
        let code = Self::code(e);
        // A value given that can never work (a malformed DATABASE_URL, a name PostgreSQL
        // would not take) is a usage error too, as clap's own invalid values are (found by a
        // user trial: `--service 'a b'` exited 1, `--limit -1` 64).
        let usage = e
            .chain()
            .any(|c| c.is::<Usage>() || c.is::<crate::usage::InvalidSetting>())
            || code == "invalid_name"
            || code == "config";
        let findings = e.chain().find_map(|cause| match migrate_error(cause)? {
            MigrateError::Unsafe { findings } => serde_json::to_value(findings).ok(),
            _ => None,
        });
        Self {
            error: for_cli(report.message()),
            hint: (!report.hints().is_empty()).then(|| for_cli(&report.hints().join("\n"))),
            code,
            exit: if usage { 64 } else { 1 },
            findings,
        }
    }

    /// [`new`](Self::new), with what only the database can tell added to the hint: for
    /// `permission denied for schema X` (42501), the role that owns X; for `permission denied
    /// for database D`, how to get the service schema created.
    pub async fn explain(e: &anyhow::Error, global: &Global) -> Self {
        let mut failure = Self::new(e);
        let hint = match adopt_read_hint(e).or_else(|| create_schema_hint(e, global)) {
            Some(hint) => Some(hint),
            None => schema_owner_hint(e, global).await,
        };
        if let Some(hint) = hint {
            failure.hint = Some(match failure.hint {
                Some(hints) => format!("{hint}\n{hints}"),
                None => hint,
            });
        }
        failure
    }

    /// An invalid command line as clap reports it (clap prints its own text).
    pub fn from_clap(e: &clap::Error) -> Self {
        let text = e.to_string();
        let mut lines = text.lines().peekable();
        let mut error = lines
            .next()
            .unwrap_or_default()
            .trim_start_matches("error: ")
            .to_owned();
        // "the following required arguments were not provided:" lists them on the next,
        // indented lines (found by a user trial: the JSON error stopped at the colon).
        if error.ends_with(':') {
            let mut listed = Vec::new();
            while let Some(line) = lines.next_if(|l| l.starts_with("  ")) {
                listed.push(line.trim());
            }
            if !listed.is_empty() {
                error.push(' ');
                error.push_str(&listed.join(" "));
            }
        }
        let tips: Vec<&str> = lines
            .filter_map(|l| l.trim_start().strip_prefix("tip: "))
            .collect();
        let hint = if tips.is_empty() {
            "run `svcdb --help` (or `svcdb <command> --help`) for the options".to_owned()
        } else {
            tips.join("\n")
        };
        Self {
            error,
            hint: Some(hint),
            code: "usage".to_owned(),
            exit: 64,
            findings: None,
        }
    }

    /// The `code` field: the SQLSTATE the server reported for the error or a cause, else the
    /// kind of error: `usage` (exit 64: a missing `DATABASE_URL` or schema, a bad option),
    /// `config` (exit 64 too for a setting given that can never work, such as a malformed
    /// `DATABASE_URL`), `invalid_name` (exit 64), `invalid_event`, `connect` (no connection and no SQLSTATE:
    /// refused, TLS, timed out), `acquire_timeout` (every connection stayed busy),
    /// `pool_closed`, `connection_lost`, `missing_tables`, `not_ready`, `refused` (`provision`
    /// found a role or schema it will not build on); for migrations
    /// `migration_source` (a file or the folder), `lock_timeout`, `changed`, `out_of_order`,
    /// `missing`, `dirty`, `no_down`, `unwritten`, `migration_failed`; for `migrate adopt`
    /// `adopt_no_history`, `adopt_wrong_table`, `adopt_refused`; for the broker (`events
    /// replay`) `not_found` (no such queue), `connect`, `amqp`; `error` for anything else.
    fn code(e: &anyhow::Error) -> String {
        if e.chain().any(|c| c.is::<Usage>()) {
            return "usage".to_owned();
        }
        let sqlstate = e.chain().find_map(|cause| {
            if let Some(db) = cause.downcast_ref::<DbError>() {
                Some(db.code())
            } else if let Some(e) = cause.downcast_ref::<svcdb::Error>() {
                e.code()
            } else if let Some(e) = migrate_error(cause) {
                // Adopt's too: found by a user trial, its 42501 came out as `connection_lost`.
                e.code()
            } else {
                None
            }
        });
        if let Some(code) = sqlstate {
            return code.code().to_owned();
        }
        if e.chain()
            .any(|c| c.is::<crate::global::SchemaMissingHere>())
        {
            return SqlState::INVALID_SCHEMA_NAME.code().to_owned();
        }
        let kind = e.chain().find_map(|cause| {
            if let Some(e) = cause.downcast_ref::<svcdb::Error>() {
                Some(error_kind(e))
            } else if let Some(e) = cause.downcast_ref::<MigrateError>() {
                Some(migrate_kind(e))
            } else if let Some(e) = cause.downcast_ref::<AdoptError>() {
                Some(match e {
                    AdoptError::Migrate(e) => migrate_kind(e),
                    AdoptError::NoHistoryTable { .. } => "adopt_no_history",
                    AdoptError::NotTheToolsTable { .. } => "adopt_wrong_table",
                    _ => "adopt_refused",
                })
            } else if let Some(e) = cause.downcast_ref::<svcdb_amqp::Error>() {
                Some(if matches!(e, svcdb_amqp::Error::Config { .. }) {
                    // A malformed AMQP_URL is as much a usage error as a malformed
                    // DATABASE_URL (found by a user trial: it exited 1, coded `amqp`).
                    "config"
                } else if matches!(e, svcdb_amqp::Error::InvalidName { .. }) {
                    "invalid_name"
                } else if e.is_not_found() {
                    "not_found"
                } else if e.is_connection_error() {
                    "connect"
                } else {
                    "amqp"
                })
            } else if cause.is::<svcdb::IdentError>() {
                Some("invalid_name")
            } else if cause.is::<crate::interrupt::Interrupted>() {
                Some("interrupted")
            } else {
                None
            }
        });
        kind.unwrap_or("error").to_owned()
    }

    /// Prints the failure (text on stderr; with `json`, the object on stdout too) and returns
    /// the exit code.
    pub fn print(&self, json: bool) -> u8 {
        if json {
            outln!("{}", self.json());
        }
        errln!("{}", self.text());
        self.exit
    }

    /// The failure for scripts: one line of JSON.
    pub fn json(&self) -> String {
        self.value().to_string()
    }

    /// `{"error", "hint", "code"}` (and `findings`, when there are), to print or to put in a
    /// report.
    pub fn value(&self) -> serde_json::Value {
        let mut value =
            serde_json::json!({"error": self.error, "hint": self.hint, "code": self.code});
        if let Some(findings) = &self.findings {
            value["findings"] = findings.clone();
        }
        value
    }

    /// The failure for people: `error: …`, then each hint on a line of its own.
    pub fn text(&self) -> String {
        let mut text = format!("error: {}", self.error);
        for hint in self.hint.iter().flat_map(|h| h.lines()) {
            text.push_str(HINT);
            text.push_str(hint);
        }
        text
    }
}

/// The kind of a library error without a SQLSTATE (see [`Failure::code`]).
fn error_kind(e: &svcdb::Error) -> &'static str {
    match e {
        svcdb::Error::Config { .. } => "config",
        svcdb::Error::Ident(_) => "invalid_name",
        svcdb::Error::Event(_) => "invalid_event",
        svcdb::Error::AcquireTimeout { cause: Some(_), .. } | svcdb::Error::Connect { .. } => {
            "connect"
        }
        svcdb::Error::AcquireTimeout { cause: None, .. } => "acquire_timeout",
        svcdb::Error::PoolClosed => "pool_closed",
        // A driver error without a SQLSTATE: the connection broke during the statement.
        svcdb::Error::Db(_) => "connection_lost",
        svcdb::Error::MissingTables { .. } => "missing_tables",
        svcdb::Error::NotReady(_) => "not_ready",
        svcdb::Error::Refused { .. } => "refused",
        _ => "error",
    }
}

/// The kind of a migration error without a SQLSTATE (see [`Failure::code`]).
fn migrate_kind(e: &MigrateError) -> &'static str {
    match e {
        MigrateError::Source { .. } => "migration_source",
        MigrateError::Db(e) => error_kind(e),
        MigrateError::LockTimeout { .. } => "lock_timeout",
        MigrateError::Changed { .. } => "changed",
        MigrateError::OutOfOrder { .. } => "out_of_order",
        MigrateError::Missing { .. } | MigrateError::MissingToRevert { .. } => "missing",
        MigrateError::Dirty { .. } | MigrateError::NewerDirty { .. } => "dirty",
        MigrateError::InvalidIndexes { .. } => "invalid_index",
        MigrateError::Unsafe { .. } => "unsafe",
        MigrateError::OtherToolApplied { .. } | MigrateError::AppliedByOtherTool { .. } => {
            "other_tool_applied"
        }
        MigrateError::NoDown { .. } => "no_down",
        MigrateError::Unwritten { .. } => "unwritten",
        MigrateError::UnknownVersion { .. } => "unknown_version",
        MigrateError::Interrupted { .. } => "interrupted",
        MigrateError::Failed(_) => "migration_failed",
        MigrateError::HistoryDropped { .. } => "history_dropped",
        _ => "error",
    }
}

/// The migration error a link of the chain is, or that `migrate adopt`'s error wraps.
fn migrate_error<'a>(cause: &'a (dyn std::error::Error + 'static)) -> Option<&'a MigrateError> {
    match cause.downcast_ref::<AdoptError>() {
        Some(AdoptError::Migrate(e)) => Some(e),
        _ => cause.downcast_ref::<MigrateError>(),
    }
}

/// The server's error a link of the chain is or carries: svcdb's errors show the driver's error
/// in their message rather than return it as `source()`, so it is asked of them.
fn db_error<'a>(cause: &'a (dyn std::error::Error + 'static)) -> Option<&'a DbError> {
    if let Some(db) = cause.downcast_ref::<DbError>() {
        return Some(db);
    }
    if let Some(e) = cause.downcast_ref::<svcdb::Error>() {
        return e.as_db_error();
    }
    match migrate_error(cause)? {
        MigrateError::Db(e) => e.as_db_error(),
        MigrateError::Failed(failure) => failure.cause.as_db_error(),
        _ => None,
    }
}

/// For `permission denied for database D` (42501): the role may not create schemas there, so
/// SVCDB_CREATE_SCHEMA cannot create the service schema (found by a user trial: a role that
/// `provision` made, told by a hint to let `migrate up` create its schema, got the bare error).
fn create_schema_hint(e: &anyhow::Error, global: &Global) -> Option<String> {
    let db = e.chain().find_map(db_error)?;
    if *db.code() != SqlState::INSUFFICIENT_PRIVILEGE {
        return None;
    }
    let database = db
        .message()
        .strip_prefix("permission denied for database ")?;
    let schema = global.schema().ok()?;
    let config = global.config().ok()?;
    let role = config.connection.get_user().unwrap_or("the connected role");
    let schema_word = svcdb::error::shell_word(schema);
    Some(format!(
        "role {role} may not create schemas in database {database}, so schema {schema} cannot be created for it here: have an administrator create it, owned by the role (`svcdb provision --service <name> --schema {schema_word}` as the administrator), or grant the role CREATE ON DATABASE {database}"
    ))
}

/// For `migrate adopt` refused reading the other tool's table (42501, `permission denied for
/// table X`): how to let it (found by a user trial: the error had no hint).
fn adopt_read_hint(e: &anyhow::Error) -> Option<String> {
    if !e.chain().any(|c| c.is::<AdoptError>()) {
        return None;
    }
    let db = e.chain().find_map(db_error)?;
    let table = db.message().strip_prefix("permission denied for table ")?;
    Some(format!(
        "the connected role may not read the other tool's table {table}: adopt as a role that may (its owner, the one that ran that tool), or have that role GRANT SELECT on it to this one first (`svcdb migrate status` names the table with its schema)"
    ))
}

/// For `permission denied for schema X` (42501): which role owns X, and what the connected
/// role could do instead. The server's error names the schema but not its owner, so this asks
/// the database, on a connection of its own made as the failed one was; `None` when the error
/// is another one or the question cannot be answered.
async fn schema_owner_hint(e: &anyhow::Error, global: &Global) -> Option<String> {
    /// Longest wait for the answer: the hint must not hold up the error.
    const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
    let db = e.chain().find_map(db_error)?;
    if *db.code() != SqlState::INSUFFICIENT_PRIVILEGE {
        return None;
    }
    // A statement qualified with another schema has its own hint, to drop the qualifier; a
    // grant there would be the wrong fix (found by a user trial: two hints that disagreed).
    let qualified = e.chain().any(|cause| {
        matches!(cause.downcast_ref::<MigrateError>(), Some(MigrateError::Failed(f)) if f.other_schema.is_some())
    });
    if qualified {
        return None;
    }
    // PostgreSQL's aclcheck_error: "permission denied for schema %s", the name unquoted. The
    // name is in no field of its own, only in the message: a server whose lc_messages is not
    // English gets no owner hint (the error itself is unchanged).
    let schema = db.message().strip_prefix("permission denied for schema ")?;
    let config = global.config().ok()?;
    let tls = Tls::new(config.tls, config.ssl_root_cert.as_deref()).ok()?;
    let lookup = async {
        let conn = DedicatedConn::connect_with(&config.session_config(), &tls)
            .await
            .ok()?;
        conn.query_opt(
            "SELECT pg_catalog.pg_get_userbyid(n.nspowner)::text, current_user::text,
                    ARRAY(SELECT nspname::text FROM pg_catalog.pg_namespace
                           WHERE nspowner = (SELECT oid FROM pg_catalog.pg_roles
                                              WHERE rolname = current_user)
                           ORDER BY 1)
               FROM pg_catalog.pg_namespace n
              WHERE n.nspname = $1",
            &[&schema],
        )
        .await
        .ok()?
    };
    let row = tokio::time::timeout(LOOKUP_TIMEOUT, lookup).await.ok()??;
    let (owner, me, own): (String, String, Vec<String>) = (
        row.try_get(0).ok()?,
        row.try_get(1).ok()?,
        row.try_get(2).ok()?,
    );
    if owner == me {
        return None;
    }
    let mut hint = format!(
        "schema {schema} is owned by role {owner}, and {me} (the user DATABASE_URL connects as) has no rights on it: run this as {owner}"
    );
    if schema == config.schema.as_str() && !own.is_empty() {
        // The service schema itself: most likely the wrong schema for this role, or the wrong
        // role for this schema.
        hint.push_str(&format!(
            "; or, if {me} is the right role, set SVCDB_SCHEMA to its own schema ({})",
            own.join(", ")
        ));
    } else if schema == config.schema.as_str() && e.chain().any(|c| c.is::<MigrateError>()) {
        // Migrations run as the service schema's owner (`SET ROLE`), which a grant on the
        // schema does not allow (found by a user trial: following the GRANT, `up` was refused
        // with "SET ROLE … was refused").
        hint.push_str(&format!(
            ", or as a member of it (GRANT {owner} TO {me}): migrations run as the schema's owner"
        ));
    } else {
        hint.push_str(&format!(
            ", or have {owner} grant the rights (GRANT USAGE, CREATE ON SCHEMA {schema} TO {me})"
        ));
    }
    Some(hint)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Context that repeats its cause's hint (as a wrapper quoting the error would) shows it once.
    #[test]
    fn a_hint_repeated_down_the_chain_is_shown_once() {
        let e = anyhow::Error::new(Usage::new("no schema given", "pass --schema"))
            .context("cannot list tables\n  hint: pass --schema");
        let failure = Failure::new(&e);
        assert_eq!(failure.hint.as_deref(), Some("pass --schema"));
        assert_eq!(failure.text().matches("hint:").count(), 1, "{failure:?}");
        assert_eq!(failure.error, "cannot list tables: no schema given");
        assert_eq!((failure.code.as_str(), failure.exit), ("usage", 64));
    }
}
