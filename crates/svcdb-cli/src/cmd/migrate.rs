//! `svcdb migrate`: run, revert and inspect the service's migrations (`--dir`) on its schema.
//!
//! Every subcommand but `new` reads the folder, connects, calls one [`Migrator`] operation and
//! prints its report: lines and tables, or with `--json` exactly one JSON object (the
//! library's serde report) on stdout. `up`, `down` and `redo` print each script as it runs, on
//! stdout, or on stderr with `--json`.
//!
//! Exit codes: 0 success; 1 error (main prints it); 64 invalid command line. `status` adds
//! its own: 0 up to date, 2 pending or in progress (another runner is migrating) and nothing
//! else wrong, 1 when `up` would refuse (a dirty schema, or changed, missing or out-of-order
//! migrations not allowed by the drift flags).
//! `validate` exits 0 with migrations pending: it checks that `up` may run, not that it did.

use std::time::{Duration, Instant};

use anyhow::Result;
use comfy_table::Table;
use svcdb::migrate::{
    new_migration, AdoptOptions, DownOptions, MigrateError, MigrateEvent, MigrateOptions,
    MigrationFailure, MigrationState, Migrator, RepairAction, RepeatableState, RunEntry,
    StatusReport, Tool, UpOptions, Version,
};
use svcdb::ServiceDb;

use crate::global::Global;
use crate::output::errln;
use crate::{output, Outcome};

/// Subcommands.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Apply pending migrations, printing each with its duration as it runs.
    #[command(after_help = "\
Environment:
  SVCDB_CREATE_SCHEMA=true  create the service schema when it is missing (otherwise `svcdb
                            provision` makes it, with the service's own role)")]
    Up(UpArgs),
    /// Revert applied migrations, newest first (default: the newest one).
    Down(DownArgs),
    /// Revert the newest migration and apply it again, to check that its down script undoes it.
    Redo(RunArgs),
    /// Show where every migration stands.
    #[command(after_help = "\
Exit codes:
  0  up to date
  1  `migrate up` would refuse: the schema is dirty (a non-transactional migration failed
     part-way and no runner holds the lock), or a migration changed, is missing or is
     pending but older than the newest applied one (unless the matching flag allows it),
     or another tool's history records migrations svcdb has not (adopt them first); or an
     error
  2  migrations are pending, or one is in progress (another runner holds the schema's
     migration lock: `migrate up` waits for it), and nothing else is wrong")]
    Status(Drift),
    /// Check that the migrations may run (no dirty schema, changed, missing or out-of-order
    /// migration) without running them; pending migrations are fine.
    Validate(Drift),
    /// Report the statements that take long locks or break the replicas still running the old
    /// release (what `up` refuses, and warns about), each with file, line, rule, why and the
    /// safe rewrite; runs nothing.
    ///
    /// By default the pending migrations are checked as the next `up` runs them (a table
    /// created earlier in the same deploy is new, so indexing it is fine); --all needs no
    /// database. Allow a finding with a comment `-- svcdb:allow <rule>` in the migration's
    /// file, or run `up --allow-unsafe` (not concurrently-in-transaction or not-in-transaction:
    /// the server refuses those).
    #[command(after_help = "\
Exit codes:
  0  nothing `migrate up` would refuse (warnings and allowed findings are listed)
  1  an error-level finding that its file does not allow; or an error
  64 invalid command line")]
    Lint(crate::cmd::lint::Args),
    /// Create a new migration's files in --dir, laid out like the newest migration there;
    /// needs no database.
    ///
    /// In an empty folder, or after a native migration: <version>_<name>.up.sql and .down.sql.
    /// After a diesel one: <version>_<name>/up.sql and down.sql. After a one-file migration:
    /// <version>_<name>.sql, with `-- +goose Up`/`Down` or `-- migrate:up`/`down` sections when
    /// that file has them (goose, dbmate), without for plain sqlx files. After a Flyway one:
    /// V<version>__<name>.sql. Each script holds a comment to replace with the SQL.
    ///
    /// The version continues small sequential numbers (0001, 0002); otherwise it is the UTC
    /// time, YYYYMMDDHHMMSS (YYYY-MM-DD-HHMMSS after a diesel-style dashed version).
    New {
        /// What the migration does, e.g. create_products; becomes part of the file names.
        // Checked as the command line is read: an invalid name exits 64 (found by a trial: 1).
        #[arg(value_parser = migration_name)]
        name: String,
    },
    /// Record every migration up to VERSION as applied without running it, to adopt a schema
    /// made before svcdb managed it.
    Baseline {
        /// The newest version that is already in effect.
        // Not named `version`: that is the id of the propagated `--version` flag.
        #[arg(value_name = "VERSION")]
        up_to: Version,
        /// List what would be recorded, refusing as a real run would, without writing anything.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        timeouts: Timeouts,
    },
    /// Take over a schema another tool migrated: read that tool's history table, match every
    /// version it applied to a file in --dir, and record them in svcdb's history (with today's
    /// checksums, in one transaction, running nothing). The other tool's table is left as it
    /// was.
    ///
    /// The table is looked up in the service schema, then in public: __diesel_schema_migrations
    /// (diesel), _sqlx_migrations (sqlx), schema_migrations (golang-migrate, dbmate),
    /// goose_db_version (goose), flyway_schema_history (Flyway), refinery_schema_history
    /// (refinery), schema_migration (pop). Refused, naming each version, when the tool marked a
    /// version dirty or failed, when an applied version has no file, or when a file no longer
    /// matches the checksum the tool recorded (sqlx, Flyway, refinery).
    Adopt(AdoptArgs),
    /// Clear a dirty mark (after fixing the schema by hand) and accept the current checksum of
    /// changed migration files; name every invalid index of the schema (left by a failed
    /// CREATE INDEX CONCURRENTLY) with the statement that drops it.
    Repair(Timeouts),
}

/// Options of `migrate adopt`.
#[derive(clap::Args)]
pub struct AdoptArgs {
    /// The tool that migrated the schema: diesel, sqlx, golang-migrate, goose, dbmate, flyway,
    /// refinery or pop.
    #[arg(long, value_name = "TOOL")]
    from: Tool,

    /// Where that tool's history is, as schema.table (or a table, looked up in the service
    /// schema, then public) [default: the tool's own table name].
    #[arg(long, value_name = "SCHEMA.TABLE", value_parser = history_table)]
    history_table: Option<String>,

    /// List what would be recorded, refusing as a real run would, without writing anything.
    #[arg(long)]
    dry_run: bool,

    /// Record a version whose file no longer matches the other tool's checksum (edited on
    /// purpose, in a way the database does not see), with a warning, instead of refusing.
    #[arg(long)]
    allow_changed: bool,

    /// Leave out, with a warning, versions the tool applied whose files were removed on
    /// purpose (squashed into a later one), instead of refusing.
    #[arg(long)]
    ignore_missing: bool,

    #[command(flatten)]
    timeouts: Timeouts,
}

/// Which drift the runner accepts; by default each is refused before anything runs.
#[derive(clap::Args)]
#[command(next_help_heading = "Drift")]
pub struct Drift {
    /// Accept applied migrations whose file changed since (`repair` accepts them for good).
    #[arg(long)]
    allow_changed: bool,

    /// Run pending migrations older than the newest applied one.
    #[arg(long)]
    allow_out_of_order: bool,

    /// Accept applied migrations that have no file, e.g. an older release meeting a schema
    /// migrated by a newer one.
    #[arg(long)]
    ignore_missing: bool,

    /// Run statements that `migrate lint` reports as errors (a CREATE INDEX without
    /// CONCURRENTLY on a busy table, a table rewrite, a non-transactional script PostgreSQL's
    /// parser rejects, …) instead of refusing before anything runs; each is printed as a
    /// warning. Not what the server refuses inside a transaction (CONCURRENTLY, VACUUM, …).
    /// For status and validate: judge the pending migrations as `up --allow-unsafe` would.
    #[arg(long)]
    allow_unsafe: bool,
}

/// How long a run may wait; unset options keep the library's defaults (shown in brackets).
#[derive(clap::Args)]
#[command(next_help_heading = "Timeouts")]
pub struct Timeouts {
    /// How long to wait for another runner (another replica's deploy) to release the schema's
    /// migration lock [default: 10m].
    #[arg(long, allow_hyphen_values = true, value_name = "DURATION", value_parser = crate::global::duration)]
    lock_wait: Option<Duration>,

    /// How long a statement may wait for a table lock: a DDL statement queued behind live
    /// traffic would hold up every later query of that table; 0: no limit [default: 10s].
    #[arg(long, allow_hyphen_values = true, value_name = "DURATION", value_parser = crate::global::server_timeout)]
    lock_timeout: Option<Duration>,

    /// How many times a migration that hit the lock timeout is tried again (its whole
    /// transaction, or the failing statement of a non-transactional one), after a backoff of
    /// 1s, 2s, 4s, … plus jitter; 0: fail at once [default: 3].
    #[arg(long, allow_negative_numbers = true, value_name = "N")]
    lock_retries: Option<u32>,

    /// How long one statement may run; 0: no limit [default: no limit].
    #[arg(long, allow_hyphen_values = true, value_name = "DURATION", value_parser = crate::global::server_timeout)]
    statement_timeout: Option<Duration>,
}

/// Options of the commands that run scripts (`up`, `down`, `redo`).
#[derive(clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    drift: Drift,
    #[command(flatten)]
    timeouts: Timeouts,
}

/// Options of `migrate up`.
#[derive(clap::Args)]
pub struct UpArgs {
    /// Apply pending migrations up to and including this version only (as the file names
    /// it, e.g. 0003 or 2026-01-20-162913).
    #[arg(long, value_name = "VERSION")]
    to: Option<Version>,

    /// List what would run without running anything.
    #[arg(long)]
    dry_run: bool,

    // Last: its help headings would otherwise apply to the options after it.
    #[command(flatten)]
    run: RunArgs,
}

/// Options of `migrate down`.
#[derive(clap::Args)]
pub struct DownArgs {
    /// Revert this many migrations, newest first [default: 1].
    #[arg(long, allow_negative_numbers = true, value_name = "N", conflicts_with = "to",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    steps: Option<usize>,

    /// Revert every migration newer than this version (0: all of them).
    #[arg(long, value_name = "VERSION")]
    to: Option<Version>,

    /// List what would be reverted without reverting anything.
    #[arg(long)]
    dry_run: bool,

    // Last: its help headings would otherwise apply to the options after it.
    #[command(flatten)]
    run: RunArgs,
}

impl Drift {
    fn options(&self) -> MigrateOptions {
        MigrateOptions {
            allow_changed: self.allow_changed,
            allow_out_of_order: self.allow_out_of_order,
            ignore_missing: self.ignore_missing,
            allow_unsafe: self.allow_unsafe,
            ..MigrateOptions::default()
        }
    }
}

impl Timeouts {
    fn apply(&self, mut options: MigrateOptions) -> MigrateOptions {
        if let Some(wait) = self.lock_wait {
            options.lock_wait = wait;
        }
        if let Some(timeout) = self.lock_timeout {
            options.lock_timeout = timeout;
        }
        if let Some(retries) = self.lock_retries {
            options.lock_retries = retries;
        }
        if let Some(timeout) = self.statement_timeout {
            options.statement_timeout = (!timeout.is_zero()).then_some(timeout);
        }
        options
    }
}

impl RunArgs {
    fn options(&self) -> MigrateOptions {
        self.timeouts.apply(self.drift.options())
    }
}

impl Command {
    /// Whether the command takes the migration lock and changes the schema: then it stops on
    /// Ctrl-C or SIGTERM itself, through the runner's failure path ([`Migrator::with_interrupt`]),
    /// and reports what it did; the others only read, and stop where they are.
    pub fn stops_itself(&self) -> bool {
        matches!(
            self,
            Command::Up(_)
                | Command::Down(_)
                | Command::Redo(_)
                | Command::Baseline { .. }
                | Command::Repair(_)
                | Command::Adopt(_)
        )
    }
}

/// `migrate new`'s name, as the library accepts it.
fn migration_name(name: &str) -> Result<String, String> {
    svcdb::migrate::check_migration_name(name).map(|()| name.to_owned())
}

/// Runs one subcommand.
pub async fn run(global: &Global, command: Command) -> Result<Outcome> {
    match command {
        Command::Up(args) => up(global, args).await,
        Command::Down(args) => down(global, args).await,
        Command::Redo(args) => redo(global, args).await,
        Command::Status(drift) => status(global, drift).await,
        Command::Validate(drift) => validate(global, drift).await,
        Command::Lint(args) => crate::cmd::lint::run(global, args).await,
        Command::New { name } => new(global, &name),
        Command::Baseline {
            up_to,
            dry_run,
            timeouts,
        } => baseline(global, &up_to, dry_run, timeouts).await,
        Command::Repair(timeouts) => repair(global, timeouts).await,
        Command::Adopt(args) => adopt(global, args).await,
    }
}

/// The runner for `--dir` on the service schema. The folder is read while the connection is
/// being made (a TCP handshake and a server process forked: together with the read, most of
/// a no-op `up`), and its errors come first: with a broken migration file the connection is
/// dropped unused and the file is reported, whether or not the server could be reached.
async fn migrator(global: &Global, options: MigrateOptions) -> Result<Migrator> {
    migrator_on(global, options, MissingSchema::LazyIfCreated).await
}

/// What a command that connects makes of a service schema that does not exist.
#[derive(Clone, Copy, PartialEq, Eq)]
enum MissingSchema {
    /// The connection error, unless SVCDB_CREATE_SCHEMA=true says that `up` creates it.
    LazyIfCreated,
    /// A lazy pool that creates nothing, whatever the setting: `status` then lists every
    /// migration as pending and says why `up` would refuse (found by a user trial: `status`
    /// on a fresh database was only an error, where `lint` read it as the first deploy).
    Lazy,
}

async fn migrator_on(
    global: &Global,
    options: MigrateOptions,
    missing: MissingSchema,
) -> Result<Migrator> {
    let connecting = global
        .config()
        .map(|config| tokio::spawn(connect_leaving_the_schema(config, missing)));
    let migrations = match global.migrations() {
        Ok(migrations) => migrations,
        Err(e) => {
            if let Ok(connecting) = connecting {
                connecting.abort();
            }
            return Err(e);
        }
    };
    // Nothing has run while connecting: a signal stops it at once (a user trial found
    // Ctrl-C waiting out the connect timeout).
    let db = tokio::select! {
        db = connecting? => db??,
        () = global.interrupt.cancelled() => return Err(crate::interrupt::Interrupted::default().into()),
    };
    Ok(Migrator::new(db, migrations)
        .with_options(options)
        .with_interrupt(global.interrupt.clone()))
}

/// Connects without creating a missing schema, also under SVCDB_CREATE_SCHEMA=true: the
/// commands that only read (`status`, `validate`) must not create it, and for the others the
/// runner creates it under the migration lock, where a first deploy that fails whole takes it
/// away again. With the setting, a missing schema gives a lazy pool that keeps it (the server
/// answered: `connect` got as far as the schema), so that `validate` knows `up` creates it;
/// [`MissingSchema::Lazy`] gives it without the setting too.
async fn connect_leaving_the_schema(
    config: svcdb::Config,
    missing: MissingSchema,
) -> svcdb::Result<ServiceDb> {
    let lazy = config.create_schema || missing == MissingSchema::Lazy;
    let mut leaving = config.clone();
    leaving.create_schema = false;
    match ServiceDb::connect(leaving).await {
        Err(e) if lazy && e.is_schema_missing() => ServiceDb::new(config),
        connected => connected,
    }
}

/// An observer printing each event as it happens (see [`output::progress`]).
fn progress(json: bool) -> impl FnMut(&MigrateEvent) + Send {
    move |event| output::progress(json, event)
}

async fn up(global: &Global, args: UpArgs) -> Result<Outcome> {
    let migrator = migrator(global, args.run.options()).await?;
    let options = UpOptions {
        to: args.to.clone(),
        dry_run: args.dry_run,
    };
    let started = Instant::now();
    let report = migrator
        .up_with(&options, &mut progress(global.json))
        .await
        .map_err(explain)?;
    let elapsed = started.elapsed();
    output::report(global.json, &report, |r| {
        let idle = match &args.to {
            Some(to) => format!(
                "nothing to do up to version {to}: {}",
                at(r.current_version.as_ref())
            ),
            None => format!(
                "nothing to do: up to date {}",
                at(r.current_version.as_ref())
            ),
        };
        let versioned = RunText {
            would: "apply",
            did: "applied",
            mode: if r.atomic { " in one transaction" } else { "" },
            entries: &r.migrations,
            dry_run: r.dry_run,
            current: r.current_version.as_ref(),
            elapsed,
            idle,
        }
        .render();
        if r.repeatables.is_empty() {
            return versioned;
        }
        let names: Vec<&str> = r.repeatables.iter().map(|x| x.name.as_str()).collect();
        let n = r.repeatables.len();
        let what = format!(
            "{n} repeatable migration{} ({})",
            if n == 1 { "" } else { "s" },
            names.join(", ")
        );
        let repeated = if r.dry_run {
            format!("dry run: would run {what}")
        } else {
            format!("ran {what}")
        };
        if r.migrations.is_empty() && !r.dry_run {
            format!("{repeated}; {}", at(r.current_version.as_ref()))
        } else {
            format!("{versioned}\n{repeated}")
        }
    })?;
    Ok(Outcome::Success)
}

async fn down(global: &Global, args: DownArgs) -> Result<Outcome> {
    let migrator = migrator(global, args.run.options()).await?;
    let options = DownOptions {
        steps: args.steps.unwrap_or(DownOptions::default().steps),
        to: args.to,
        dry_run: args.dry_run,
    };
    let started = Instant::now();
    let report = migrator
        .down_with(&options, &mut progress(global.json))
        .await
        .map_err(explain)?;
    let elapsed = started.elapsed();
    output::report(global.json, &report, |r| {
        let idle = format!(
            "nothing to revert: schema {} is {}",
            r.schema,
            at(r.current_version.as_ref())
        );
        RunText {
            would: "revert",
            did: "reverted",
            mode: "",
            entries: &r.migrations,
            dry_run: r.dry_run,
            current: r.current_version.as_ref(),
            elapsed,
            idle,
        }
        .render()
    })?;
    Ok(Outcome::Success)
}

async fn redo(global: &Global, args: RunArgs) -> Result<Outcome> {
    let migrator = migrator(global, args.options()).await?;
    let report = migrator
        .redo_with(&mut progress(global.json))
        .await
        .map_err(explain)?;
    output::report(global.json, &report, |r| {
        match (r.down.migrations.first(), r.up.migrations.first()) {
            (Some(down), Some(up)) => format!(
                "redid migration {} {}: reverted in {}, applied again in {}; now {}",
                up.version,
                up.name,
                output::took(down.duration_ms),
                output::took(up.duration_ms),
                at(r.up.current_version.as_ref())
            ),
            _ => format!(
                "nothing to redo: schema {} is {}",
                r.down.schema,
                at(r.down.current_version.as_ref())
            ),
        }
    })?;
    Ok(Outcome::Success)
}

async fn status(global: &Global, drift: Drift) -> Result<Outcome> {
    let migrator = migrator_on(global, drift.options(), MissingSchema::Lazy).await?;
    let report = migrator.status().await?;
    // `validate` applies the drift rules and allowances exactly as `up` does, so exit 1 means
    // precisely "`up` would refuse", with the library's message saying why and what to do.
    let refusal = match migrator.validate().await {
        Ok(_) => None,
        Err(
            e @ (MigrateError::Dirty { .. }
            | MigrateError::NewerDirty { .. }
            | MigrateError::Changed { .. }
            | MigrateError::Missing { .. }
            | MigrateError::OutOfOrder { .. }
            | MigrateError::SchemaMissing { .. }
            | MigrateError::Unwritten { .. }
            | MigrateError::Unsafe { .. }
            | MigrateError::OtherToolApplied { .. }
            | MigrateError::AppliedByOtherTool { .. }),
        ) => Some(e),
        Err(e) => return Err(e.into()),
    };
    // Another tool's history (read only while svcdb's is empty), unless the refusal is about
    // it already, with what `adopt` would do with it.
    let adoption = match (&refusal, report.other_histories.first()) {
        (Some(MigrateError::OtherToolApplied { .. }), _) | (_, None) => None,
        (_, Some(other)) => Some(adoption_note(&migrator, other).await),
    };
    // With --json the refusal is in the report too (found by a user trial: exit 1 with a JSON
    // report that never said why): `refused` is `{"error", "hint", "code"}`, or null.
    let refusal = refusal.map(|e| crate::failure::Failure::new(&anyhow::Error::new(e)));
    let mut json = serde_json::to_value(&report)?;
    json["refused"] = refusal
        .as_ref()
        .map_or(serde_json::Value::Null, |f| f.value());
    json["out_of_order"] = serde_json::to_value(
        report
            .out_of_order()
            .map(|e| e.version.to_string())
            .collect::<Vec<_>>(),
    )?;
    // The files that are no migration, which the text warns of on stderr (found by a user
    // trial: the JSON did not say so).
    json["ignored"] = serde_json::to_value(migrator.migrations().ignored())?;
    output::report(global.json, &json, |_| {
        let r = &report;
        let mut summary = summary(r);
        if let Some(refused) = &refusal {
            // Found by a trial: stdout said only "5 pending" while the exit code said refused;
            // the reason and hint follow on stderr.
            let text = refused.text();
            let why = text
                .trim_start_matches("error: ")
                .lines()
                .next()
                .unwrap_or_default();
            summary.push_str(&format!("; `svcdb migrate up` would refuse: {why}"));
        } else if r.in_progress.is_some() || r.locked {
            summary.push_str("; another runner holds the schema's migration lock, and `svcdb migrate up` waits for it");
        } else if refusal.is_none() && adoption.is_some() {
            // Said below.
        } else if refusal.is_none()
            && (r.pending().next().is_some() || r.stale_repeatables().next().is_some())
        {
            summary.push_str("; run `svcdb migrate up`");
        }
        // Found by a user trial: under a refusal for another reason (the lint), another
        // tool's history went unmentioned.
        if let Some(adoption) = &adoption {
            summary.push_str(&format!("\n{adoption}"));
        }
        if r.entries.is_empty() && r.repeatables.is_empty() {
            summary
        } else {
            format!("{}\n{summary}", status_table(r))
        }
    })?;
    Ok(if let Some(refused) = refusal {
        let text = refused.text();
        let text = text.trim_start_matches("error: ");
        if global.json {
            errln!("not up to date: {text}");
        } else if let Some((_, details)) = text.split_once('\n') {
            // The summary above said why in its first line (found by a trial: the refusal
            // was printed twice); its details and hint follow.
            errln!("{details}");
        }
        Outcome::NotReady
    } else if report.pending().next().is_some()
        || report.stale_repeatables().next().is_some()
        || report.in_progress.is_some()
        || report.locked
    {
        Outcome::Pending
    } else {
        Outcome::Success
    })
}

/// What `status` says of another tool's history table while svcdb's is empty: take it over
/// with `adopt`, when a dry run of that adoption passes; else why `adopt` would refuse and
/// what to do instead (found by a user trial: the history and the tables were in `public`,
/// the service schema empty, and the suggested `adopt` refused).
async fn adoption_note(migrator: &Migrator, other: &svcdb::migrate::OtherHistory) -> String {
    let (tool, table) = (&other.tool, &other.table);
    let options = AdoptOptions {
        history_table: Some(table.clone()),
        dry_run: true,
        ..AdoptOptions::from(*tool)
    };
    match migrator.adopt(&options).await {
        Ok(_) => format!(
            "{tool}'s history table {table} is in the database: take it over with `svcdb migrate adopt --from {tool}`, or run `svcdb migrate up` if that history is not this schema's"
        ),
        Err(e) => {
            let failure = crate::failure::Failure::new(&anyhow::Error::new(e));
            let text = failure.text();
            let why = text.trim_start_matches("error: ");
            format!("{tool}'s history table {table} is in the database, but `svcdb migrate adopt --from {tool}` would refuse it: {why}")
        }
    }
}

async fn validate(global: &Global, drift: Drift) -> Result<Outcome> {
    let report = migrator(global, drift.options()).await?.validate().await?;
    output::report(global.json, &report, |r| format!("valid: {}", summary(r)))?;
    Ok(Outcome::Success)
}

fn new(global: &Global, name: &str) -> Result<Outcome> {
    // Read through `Global` for the other subcommands' warning about `.sql` files that are not
    // migrations; `new_migration` reads the folder again (a few ms), and creates it if missing.
    if global.dir.exists() {
        global.migrations()?;
    }
    let created = new_migration(&global.dir, name)?;
    output::report(global.json, &created, |c| {
        let lines: Vec<String> = c
            .files()
            .map(|f| format!("created {}", f.display()))
            .collect();
        lines.join("\n")
    })?;
    Ok(Outcome::Success)
}

async fn baseline(
    global: &Global,
    version: &Version,
    dry_run: bool,
    timeouts: Timeouts,
) -> Result<Outcome> {
    let migrator = migrator(global, timeouts.apply(MigrateOptions::default())).await?;
    let report = if dry_run {
        migrator.baseline_dry_run(version).await?
    } else {
        migrator.baseline(version).await?
    };
    output::report(global.json, &report, |r| {
        if r.recorded.is_empty() {
            return format!(
                "nothing to record: every migration up to version {version} is already recorded in schema {}",
                r.schema
            );
        }
        let verb = if r.dry_run {
            "would record"
        } else {
            "recorded"
        };
        let mut lines: Vec<String> = r
            .recorded
            .iter()
            .map(|m| format!("{verb} {} {} as applied", m.version, m.name))
            .collect();
        lines.push(if r.dry_run {
            format!(
                "dry run: {} would be recorded in schema {} without running; nothing was written{}",
                count(r.recorded.len()),
                r.schema,
                if r.locked {
                    "\nnote: another runner holds the schema's migration lock: the real run waits for it (--lock-wait), then records only what that runner did not apply"
                } else {
                    ""
                }
            )
        } else {
            format!(
                "baselined schema {}: {} recorded without running",
                r.schema,
                count(r.recorded.len())
            )
        });
        lines.join("\n")
    })?;
    Ok(Outcome::Success)
}

/// `--history-table`: a table, or `schema.table`, both parts non-empty.
fn history_table(value: &str) -> std::result::Result<String, String> {
    let parts: Vec<&str> = value.split('.').collect();
    if parts.len() > 2 || parts.iter().any(|p| p.trim().is_empty()) {
        return Err("give a table, or schema.table".into());
    }
    Ok(value.to_owned())
}

async fn adopt(global: &Global, args: AdoptArgs) -> Result<Outcome> {
    let migrator = migrator(global, args.timeouts.apply(MigrateOptions::default())).await?;
    let report = migrator
        .adopt(&AdoptOptions {
            from: args.from,
            history_table: args.history_table,
            dry_run: args.dry_run,
            allow_changed: args.allow_changed,
            ignore_missing: args.ignore_missing,
        })
        .await?;
    for warning in &report.warnings {
        errln!("warning: {warning}");
    }
    output::report(global.json, &report, |r| {
        let verb = if r.dry_run {
            "would record"
        } else {
            "recorded"
        };
        let mut lines: Vec<String> = r
            .recorded
            .iter()
            .map(|m| format!("{verb} {} {} as applied", m.version, m.name))
            .chain(
                r.repeatables
                    .iter()
                    .map(|name| format!("{verb} repeatable {name} as run")),
            )
            .collect();
        let counts = format!(
            "{} {}, {} already recorded, {} pending",
            count(r.recorded.len()),
            if r.dry_run { "to record" } else { "recorded" },
            r.already_recorded.len(),
            r.pending.len()
        );
        lines.push(if r.dry_run {
            format!(
                "dry run: nothing changed; adopting schema {} from {} ({}) would find {counts}",
                r.schema, r.from, r.table
            )
        } else {
            format!(
                "adopted schema {} from {} ({}): {counts}; {} was left as it was",
                r.schema, r.from, r.table, r.table
            )
        });
        if !r.out_of_order.is_empty() {
            let list: Vec<String> = r.out_of_order.iter().map(Version::to_string).collect();
            lines.push(format!(
                "{} of the pending ({}) {} older than the newest recorded migration ({} rolled back or skipped): `svcdb migrate up --allow-out-of-order` applies them, plain `up` refuses them",
                list.len(),
                list.join(", "),
                if list.len() == 1 { "is" } else { "are" },
                r.from
            ));
        } else if !r.pending.is_empty() && !r.dry_run {
            lines.push("run `svcdb migrate up` to apply the pending ones".to_owned());
        }
        lines.join("\n")
    })?;
    Ok(Outcome::Success)
}

async fn repair(global: &Global, timeouts: Timeouts) -> Result<Outcome> {
    let migrator = migrator(global, timeouts.apply(MigrateOptions::default())).await?;
    let report = migrator.repair().await?;
    output::report(global.json, &report, |r| {
        let mut lines: Vec<String> = r.actions.iter().map(repair_line).collect();
        if lines.is_empty() {
            lines.push(format!("nothing to repair in schema {}", r.schema));
        }
        for index in &r.invalid_indexes {
            lines.push(format!(
                "invalid index {} on table {} (a failed CREATE INDEX CONCURRENTLY leaves one; IF NOT EXISTS would accept it): drop it with\n  {};",
                index.name, index.table, index.drop_statement
            ));
        }
        lines.join("\n")
    })?;
    Ok(Outcome::Success)
}

fn repair_line(action: &RepairAction) -> String {
    // 12 hex digits tell two checksums apart; all 64 are in the JSON.
    let short = |hex: &str| hex.get(..12).unwrap_or(hex).to_owned();
    match action {
        RepairAction::ClearedDirty { version, name } => format!(
            "cleared the dirty mark of migration {version} {name}: it counts as pending again"
        ),
        RepairAction::RealignedChecksum {
            version,
            name,
            old,
            new,
        } => format!(
            "accepted the changed file of migration {version} {name}: checksum {}… is now {}…",
            short(old),
            short(new)
        ),
    }
}

/// The text of an `up` or `down` run. Each script was already printed as it ran: this is the
/// summary, or for a dry run the list of what would run.
struct RunText<'a> {
    /// The verb of a dry run's lines: `apply`, `revert`.
    would: &'static str,
    /// The verb of the summary: `applied`, `reverted`.
    did: &'static str,
    /// How they ran, for the summary: ` in one transaction` or nothing.
    mode: &'static str,
    entries: &'a [RunEntry],
    dry_run: bool,
    current: Option<&'a Version>,
    elapsed: Duration,
    /// The whole text when nothing ran.
    idle: String,
}

impl RunText<'_> {
    fn render(self) -> String {
        let n = count(self.entries.len());
        if self.entries.is_empty() {
            self.idle
        } else if self.dry_run {
            let mut lines: Vec<String> = self
                .entries
                .iter()
                .map(|m| {
                    let mode = if m.transactional {
                        ""
                    } else {
                        " (no transaction)"
                    };
                    format!("would {} {} {}{mode}", self.would, m.version, m.name)
                })
                .collect();
            lines.push(format!(
                "dry run: nothing changed; {n} to {}{}",
                self.would, self.mode
            ));
            lines.join("\n")
        } else {
            format!(
                "{} {n}{} in {}; now {}",
                self.did,
                self.mode,
                output::millis(self.elapsed.as_secs_f64() * 1e3),
                at(self.current)
            )
        }
    }
}

/// `1 migration`, `3 migrations`.
fn count(n: usize) -> String {
    format!("{n} migration{}", if n == 1 { "" } else { "s" })
}

/// Where a schema stands, after "is" or "now".
fn at(version: Option<&Version>) -> String {
    version.map_or_else(
        || "before the first migration".to_owned(),
        |v| format!("at version {v}"),
    )
}

/// A state in the text output (`--json` spells `in progress` as `in_progress`).
fn state_name(state: MigrationState) -> &'static str {
    match state {
        MigrationState::Applied => "applied",
        MigrationState::Pending => "pending",
        MigrationState::Changed => "changed",
        MigrationState::Missing => "missing",
        MigrationState::Dirty => "dirty",
        MigrationState::InProgress => "in progress",
    }
}

/// A repeatable migration's state in the text output, as `--json` spells it.
fn repeatable_state_name(state: RepeatableState) -> &'static str {
    match state {
        RepeatableState::Applied => "applied",
        RepeatableState::Pending => "pending",
        RepeatableState::Changed => "changed",
    }
}

/// One line on where the schema stands: `schema s at version 3: 2 pending, 1 changed`.
fn summary(report: &StatusReport) -> String {
    let counts: Vec<String> = [
        MigrationState::Pending,
        MigrationState::Changed,
        MigrationState::Missing,
        MigrationState::Dirty,
        MigrationState::InProgress,
    ]
    .into_iter()
    .filter_map(|state| {
        let n = report.in_state(state).filter(|e| !report.newer(e)).count();
        let early = match state {
            MigrationState::Pending => report.out_of_order().count(),
            _ => 0,
        };
        (n > 0).then(|| match early {
            0 => format!("{n} {}", state_name(state)),
            early => format!(
                "{n} {} ({early} older than the newest applied: `up` refuses {} without --allow-out-of-order)",
                state_name(state),
                if early == 1 { "it" } else { "them" }
            ),
        })
    })
    .chain(
        // A newer release's migrations: met during a rolling deploy or a rollback.
        [
            (MigrationState::Missing, "applied by a newer release"),
            (MigrationState::Dirty, "of a newer release dirty"),
        ]
        .into_iter()
        .filter_map(|(state, what)| {
            let n = report.in_state(state).filter(|e| report.newer(e)).count();
            (n > 0).then(|| format!("{n} {what}"))
        }),
    )
    .chain(
        [RepeatableState::Pending, RepeatableState::Changed]
            .into_iter()
            .filter_map(|state| {
                let n = report
                    .repeatables
                    .iter()
                    .filter(|r| r.state == state)
                    .count();
                (n > 0).then(|| format!("{n} repeatable {}", repeatable_state_name(state)))
            }),
    )
    .collect();
    let state = if counts.is_empty() {
        "up to date".to_owned()
    } else {
        counts.join(", ")
    };
    format!(
        "schema {} {}: {state}",
        report.schema,
        at(report.current_version.as_ref())
    )
}

/// One row per migration: version, name, state, when it was applied and how long it took.
fn status_table(report: &StatusReport) -> Table {
    let mut table = output::table(["version", "name", "state", "applied at", "duration"]);
    let early: Vec<&Version> = report.out_of_order().map(|e| &e.version).collect();
    for e in &report.entries {
        table.add_row([
            e.version.to_string(),
            e.name.clone(),
            if early.contains(&&e.version) {
                "pending, out of order".to_owned()
            } else {
                state_name(e.state).to_owned()
            },
            e.applied_at.map_or_else(String::new, |t| {
                t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
            }),
            if e.baselined {
                "baselined".to_owned()
            } else if let Some(ms) = e.running_ms {
                format!("running for {}", output::millis(ms))
            } else {
                e.execution_ms.map_or_else(String::new, output::millis)
            },
        ]);
    }
    for r in &report.repeatables {
        table.add_row([
            "repeatable".to_owned(),
            r.name.clone(),
            repeatable_state_name(r.state).to_owned(),
            r.applied_at.map_or_else(String::new, |t| {
                t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
            }),
            String::new(),
        ]);
    }
    table
}

/// A migration command's error, with the failing script's file (and line, when the server
/// points at one) in front: the library's message says which migration failed, the SQL error
/// and what was rolled back or undone; the [`MigrationFailure`] says where.
fn explain(e: MigrateError) -> anyhow::Error {
    let location = match &e {
        MigrateError::Failed(failure) => Some(location(failure)),
        _ => None,
    };
    match location {
        Some(location) => anyhow::Error::new(e).context(location),
        None => e.into(),
    }
}

/// `path` or `path, line N` of the script that failed.
fn location(failure: &MigrationFailure) -> String {
    match failure.line {
        Some(line) => format!("{}, line {line}", failure.path),
        None => failure.path.clone(),
    }
}

#[cfg(test)]
mod tests {
    /// clap checks a subcommand's definition only when that subcommand is parsed (a clash
    /// with the propagated `--version` panics at run time): check all of them at once.
    #[test]
    fn the_command_line_definition_is_consistent() {
        let cli = clap::Command::new("svcdb")
            .version("0")
            .propagate_version(true);
        let cli = <crate::global::Global as clap::Args>::augment_args(cli);
        <super::Command as clap::Subcommand>::augment_subcommands(cli).debug_assert();
    }
}
