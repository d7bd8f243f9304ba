//! `svcdb events purge`: deletes old claims and published outbox rows by hand, or from a
//! scheduled job, as the consumer and relay runtimes do on their own schedule.
//! `svcdb events replay`: moves a queue's dead letters back to it after a fix.

use std::time::Duration;

use anyhow::{bail, Result};
use serde::Serialize;
use svcdb::idempotency::PROCESSED_EVENTS_TABLE;
use svcdb::outbox::OUTBOX_TABLE;
use svcdb::{Outbox, SqlState};

use crate::global::{duration, Global};

use crate::{output, Outcome};

/// `svcdb events …`.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Delete claims (svcdb_processed_events) and published outbox rows (svcdb_outbox) older
    /// than a retention, in small batches that never hold a long lock: safe while the
    /// service runs. Unpublished outbox rows are never deleted.
    #[command(after_help = PURGE_EXIT_CODES)]
    Purge(PurgeArgs),
    /// Move the messages waiting in a queue's dead-letter queue (<queue>.dlq) back to the
    /// queue, once the handler that failed them is fixed: each is published again straight
    /// to the queue and leaves the dead-letter queue only once RabbitMQ confirmed the copy
    /// (a copy handled twice is absorbed by the consumer's claims). Only the messages there at
    /// the start are moved; one that fails again waits for the next replay.
    #[command(after_help = REPLAY_EXIT_CODES)]
    Replay(ReplayArgs),
}

/// The exit codes of `svcdb events replay`, shown in its `--help`.
const REPLAY_EXIT_CODES: &str = "\
Exit codes:
  0   replayed (also when the dead-letter queue was empty)
  1   error: the broker is unreachable, a queue does not exist, or a copy was not confirmed (it
      stays in the dead-letter queue; those moved before it stay moved)
  64  invalid command line, or a --queue no replay can work for (empty, or too long for AMQP
      with its .dlq)";

/// Options of `svcdb events replay`.
#[derive(clap::Args)]
pub struct ReplayArgs {
    /// The consumer queue whose dead letters go back to it (e.g. orders.stock-results).
    #[arg(long)]
    queue: String,

    /// Move at most this many, oldest first (default: every one waiting).
    #[arg(long, allow_negative_numbers = true)]
    limit: Option<u64>,

    /// The broker: amqp://user:password@host:port/vhost (%2f is the vhost /); default:
    /// amqp://127.0.0.1:5672/%2f as guest, RabbitMQ's own default.
    #[arg(long, env = "AMQP_URL", hide_env_values = true)]
    amqp_url: Option<String>,
}

/// The exit codes of `svcdb events purge`, shown in its `--help`.
const PURGE_EXIT_CODES: &str = "\
Exit codes:
  0   purged (also when nothing was old enough, or with --table all when a table does not exist)
  1   error: the database is unreachable, or the table named by --table does not exist
  64  invalid command line";

/// Which table `svcdb events purge` cleans.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Table {
    /// Both, skipping one the service does not have.
    All,
    /// The consumers' claims (svcdb_processed_events), by when they were processed.
    Claims,
    /// The published rows of the outbox (svcdb_outbox), by when they were published.
    Outbox,
}

/// `--older-than`: a duration with its unit. A bare number is seconds elsewhere, and here
/// `--older-than 7` (meant as days) would delete every claim older than seven seconds.
fn retention(value: &str) -> std::result::Result<Duration, String> {
    let trimmed = value.trim();
    if trimmed != "0" && trimmed.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(format!(
            "give a unit: {trimmed}d for days, {trimmed}h for hours, {trimmed}m for minutes"
        ));
    }
    duration(value)
}

/// Options of `svcdb events purge`.
#[derive(clap::Args)]
pub struct PurgeArgs {
    /// Delete rows older than this, with its unit: 7d, 24h, 90m. A claim purged while its
    /// message can still be redelivered lets that message be handled again: keep claims for
    /// days.
    #[arg(long, allow_hyphen_values = true, value_name = "DURATION", value_parser = retention)]
    older_than: Duration,

    /// Which table to purge.
    #[arg(long, value_enum, default_value_t = Table::All)]
    table: Table,

    /// Purge claims younger than an hour too (refused without it: their messages may still be
    /// redelivered, and would then be handled again).
    #[arg(long)]
    force: bool,
}

/// The youngest claims purged without `--force`: a message can wait in a queue, or in a
/// consumer's retry back-off, for about this long in a healthy system.
const YOUNGEST_CLAIMS: Duration = Duration::from_secs(3600);

/// What one purge did, as `--json` prints it:
/// `{"older_than_secs":604800,"tables":[{"table":"svcdb_processed_events","exists":true,"deleted":120}, …]}`.
#[derive(Serialize)]
struct Report {
    /// The retention, in seconds.
    older_than_secs: f64,
    /// One entry per table purged, claims first.
    tables: Vec<Purged>,
}

/// One table's outcome.
#[derive(Serialize)]
struct Purged {
    /// The table's name in the service schema.
    table: &'static str,
    /// False when the service does not have the table (only with `--table all`).
    exists: bool,
    /// Rows deleted.
    deleted: u64,
}

/// Runs `svcdb events …`.
pub async fn run(global: &Global, command: Command) -> Result<Outcome> {
    match command {
        Command::Purge(args) => purge(global, args).await,
        Command::Replay(args) => replay(global, args).await,
    }
}

async fn replay(global: &Global, args: ReplayArgs) -> Result<Outcome> {
    let url =
        super::args::amqp_url(args.amqp_url).unwrap_or_else(|| svcdb_amqp::DEFAULT_URL.to_owned());
    let config = svcdb_amqp::AmqpConfig::new(url).with_connection_name("svcdb events replay");
    config.validate()?;
    let report = match svcdb_amqp::replay_dead_letters(&config, &args.queue, args.limit).await {
        // Refused before connecting: a --queue no replay can work for (empty, or it or its
        // dead-letter queue too long for AMQP) is a bad command line.
        Err(e @ svcdb_amqp::Error::InvalidName { .. }) => return Err(bad_queue(&e).into()),
        other => other?,
    };
    output::report(global.json, &report, |r| {
        format!(
            "replayed {} message{} from {} to {}{}",
            r.replayed,
            if r.replayed == 1 { "" } else { "s" },
            r.dead_letter_queue,
            r.queue,
            if r.left > 0 {
                format!("; {} left in {}", r.left, r.dead_letter_queue)
            } else {
                String::new()
            }
        )
    })?;
    Ok(Outcome::Success)
}

/// `--queue`'s refusal as a usage error, with the library's hint or one of its own.
fn bad_queue(e: &svcdb_amqp::Error) -> crate::usage::Usage {
    let text = e.to_string();
    let (message, hint) = text.split_once(crate::usage::HINT).unwrap_or((
        &text,
        "pass the name of the consumer queue as it was declared (rabbitmqctl list_queues name)",
    ));
    crate::usage::Usage::new(format!("--queue: {message}"), hint)
}

async fn purge(global: &Global, args: PurgeArgs) -> Result<Outcome> {
    // 0 is a retention under an hour like any other (found by a user trial: it was refused
    // apart, for claims even with --table outbox, and --force did not let it through).
    if args.table != Table::Outbox && args.older_than < YOUNGEST_CLAIMS && !args.force {
        // Found by a user trial: `--older-than 1s --table claims` deleted 4 605 live claims.
        return Err(crate::usage::Usage::new(
            format!(
                "--older-than {} would purge claims younger than an hour: their messages may still be redelivered (waiting in a queue, a retry back-off, a dead-letter replay) and would then be handled again",
                readable(args.older_than)
            ),
            "keep claims for days (--older-than 7d); purge only the outbox with --table outbox; or pass --force if no such message can exist",
        )
        .into());
    }
    let db = global.connect().await?;
    // Without USAGE on the schema its tables are invisible, and would be reported absent.
    let access = db
        .get()
        .await?
        .query_one(
            "SELECT has_schema_privilege($1, 'USAGE'), current_user::text",
            &[&db.schema().as_str()],
        )
        .await?;
    if !access.get::<_, bool>(0) {
        bail!(
            "role {} may not use schema {} (no USAGE privilege), so its event tables cannot be purged\n  hint: connect as the service's own role (its DATABASE_URL)",
            access.get::<_, String>(1),
            db.schema().as_str()
        );
    }
    let mut tables = Vec::new();
    if args.table != Table::Outbox {
        let purged = db.purge_processed(args.older_than).await;
        tables.push(outcome(
            PROCESSED_EVENTS_TABLE,
            purged,
            args.table,
            "install_idempotency",
        )?);
    }
    if args.table != Table::Claims {
        let purged = Outbox::new(db.clone())
            .purge_published(args.older_than)
            .await;
        tables.push(outcome(OUTBOX_TABLE, purged, args.table, "install_outbox")?);
    }
    let report = Report {
        older_than_secs: args.older_than.as_secs_f64(),
        tables,
    };
    output::report(global.json, &report, |report| {
        let older = readable(args.older_than);
        report
            .tables
            .iter()
            .map(|t| {
                if t.exists {
                    format!("{}: deleted {} rows older than {older}", t.table, t.deleted)
                } else {
                    format!("{}: absent from the schema; nothing to purge", t.table)
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    })?;
    Ok(Outcome::Success)
}

/// A table's result; a missing table is skipped under `--table all` and an error when it was
/// asked for by name.
fn outcome(
    table: &'static str,
    purged: svcdb::Result<u64>,
    asked: Table,
    installer: &str,
) -> Result<Purged> {
    match purged {
        Ok(deleted) => Ok(Purged {
            table,
            exists: true,
            deleted,
        }),
        Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) && asked == Table::All => {
            Ok(Purged {
                table,
                exists: false,
                deleted: 0,
            })
        }
        // The driver's error stays in the chain: `--json` gives its SQLSTATE as the code.
        Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => Err(anyhow::Error::new(e)
            .context(format!(
                "the service schema has no {table} table\n  hint: check --schema; a service creates the table with ServiceDb::{installer} at start-up"
            ))),
        Err(e) => Err(e.into()),
    }
}

/// `7d`, `24h`, `90m` or `1.5s`, for the text report.
fn readable(d: Duration) -> String {
    match d.as_secs() {
        _ if d.subsec_nanos() != 0 => format!("{d:?}"),
        // Found by a user trial: `--older-than 0s` read back as "0d".
        0 => "0s".to_owned(),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3_600 == 0 => format!("{}h", s / 3_600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}
