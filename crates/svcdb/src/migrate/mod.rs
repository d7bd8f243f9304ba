//! Versioned, reversible, lock-safe migrations for one service schema.
//!
//! ```no_run
//! use svcdb::migrate::{Migrations, Migrator, UpOptions};
//!
//! # async fn demo(db: svcdb::ServiceDb) -> Result<(), svcdb::migrate::MigrateError> {
//! let migrator = Migrator::new(db, Migrations::from_dir("migrations")?);
//! let report = migrator
//!     .up_with(&UpOptions::default(), &mut |event| println!("{event}"))
//!     .await?;
//! println!("{} applied, now at {:?}", report.migrations.len(), report.current_version);
//! # Ok(()) }
//! ```
//!
//! To ship the files inside the service binary instead (edits to them rebuild it):
//!
//! ```ignore
//! static MIGRATIONS: svcdb::migrate::EmbeddedMigrations = svcdb::embed_migrations!("migrations");
//! let migrator = Migrator::new(db, Migrations::from_embedded(&MIGRATIONS)?);
//! ```
//!
//! # Layout
//!
//! Everything a service names is re-exported here; the submodules that stay public do so for
//! their reference documentation (the layouts a folder may use, the lint rules, the history
//! table, adoption, version order).
//!
//! | concept | where |
//! |---|---|
//! | sources: native (`1_x.up.sql`), diesel (`1_x/up.sql`), single files (sqlx, goose, dbmate: `1_x.sql`), Flyway (`V1__x.sql`), embedded; `new` | [`source`] ([`Migrations`], [`EmbeddedMigrations`], [`new_migration`]) |
//! | one migration, its checksum, its transaction mode | [`Migration`], [`Checksum`] |
//! | versions and their order | [`version`] ([`Version`]) |
//! | splitting a non-transactional migration into statements | (internal) |
//! | locking DDL found before it runs (`svcdb migrate lint`, and before every `up`) | [`lint`](mod@lint) ([`lint()`], [`Finding`], [`Rule`]) |
//! | the `svcdb_migrations` history table | [`history`] |
//! | Flyway's repeatable migrations (`R__x.sql`), run again when changed, and `svcdb_repeatables` | [`Repeatable`], [`RepeatableEntry`], [`RepeatableRun`] |
//! | adopting a schema another tool (diesel, sqlx, golang-migrate, goose, dbmate, Flyway, refinery) migrated | [`adopt`] ([`Migrator::adopt`], [`Tool`]) |
//! | the per-(database, schema) advisory lock | (internal; its errors: [`MigrateError::LockTimeout`]) |
//! | stopping a run on a signal: the running statement cancelled, the failure path taken | [`Migrator::with_interrupt`] ([`MigrateError::Interrupted`]) |
//! | status of every migration, drift checks | [`StatusReport`], [`MigrationState`] |
//! | the runner: up, down, redo, validate, baseline, repair | [`Migrator`] |
//! | options: drift allowances, lock wait, lock and statement timeouts; per-call up/down options | [`MigrateOptions`], [`UpOptions`], [`DownOptions`] |
//! | progress events for a CLI, printed as each migration runs | [`MigrateEvent`] |
//! | what each command did, serde-serializable | [`UpReport`], [`DownReport`], … |
//! | errors, matched by variant (and [`MigrateError::code`] for SQLSTATE) | [`MigrateError`] |
//! | where a failed migration failed: its file, line and statement | [`MigrationFailure::path`], [`line`](MigrationFailure::line), [`statement`](MigrationFailure::statement) |
//!
//! # Rules
//!
//! * **Sources.** A migration is `<version>_<name>.up.sql` (+ optional `.down.sql`), a folder
//!   `<version>_<name>/` holding `up.sql` (+ optional `down.sql`, `metadata.toml`), a single
//!   `<version>_<name>.sql` (up only, or split at goose's `-- +goose Up/Down` or dbmate's
//!   `-- migrate:up/down` markers), or Flyway's `V<version>__<name>.sql` (+ optional
//!   `U<version>__<name>.sql`), with its repeatable `R__<name>.sql`. The version is the
//!   prefix, digits optionally split by `-` ([`Version`]): timestamps (`2017-09-23-182408`,
//!   diesel's 18-digit `2017-09-23-182408-0000`) sort chronologically whatever their width,
//!   plain integers (`1`, `0002`, `10`) numerically, Flyway's dotted versions (`1.1`) part by
//!   part; the history keeps the text as written. Other files are ignored
//!   ([`Migrations::ignored`] lists the `.sql` ones, which the CLI warns about); a file that
//!   looks like a migration but is unusable is an error naming it.
//! * **Run once.** Applied versions are skipped. With nothing pending, `up` costs one query on a
//!   pooled connection and takes no lock.
//! * **One runner at a time per schema**, through a session advisory lock on a dedicated
//!   connection (released on every path, even on panic: the connection closes). Different schemas never wait.
//! * **Atomic deploy.** When every pending migration is transactional, all of them and their
//!   history rows run in one transaction: a failure leaves the schema as it was. With a
//!   non-transactional migration (first line `-- svcdb:no-transaction`, sqlx's
//!   `-- no-transaction` or morph's `-- morph:nontransactional`, or diesel
//!   `run_in_transaction = false`) in the batch, each run of consecutive transactional
//!   migrations is one *group*: one transaction with one history write, so a failure rolls
//!   back that whole group and nothing else ([`MigrationFailure::rolled_back_with`]). Then the
//!   groups and non-transactional migrations this deploy committed before it are undone with
//!   their down scripts, newest first, unless the failing migration is non-transactional
//!   ([`MigrateError::Failed`]'s [`MigrationFailure`] lists them). Only the deploy's last
//!   commit waits for the WAL to reach the disk (`synchronous_commit` is off before it): it
//!   flushes every earlier one, and a crash before it leaves what a crash at an earlier point
//!   would, a prefix of the deploy with each group whole. A non-transactional
//!   migration's history row is marked dirty while it runs. While its runner holds the lock
//!   it is *in progress* ([`MigrationState::InProgress`]): other runners' `up` waits for the
//!   lock and then finds it done, and the start-up gate stays ready. If it fails part-way, the
//!   schema is *dirty*: every run refuses until `repair`. If its first statement fails and
//!   leaves no invalid index, it changed nothing: the mark is taken back (the migration stays
//!   pending, or applied for a down) and the deploy is undone as after a transactional
//!   failure. After a failure that leaves the schema dirty, and in
//!   `repair`, every invalid index of the schema (what a failed `CREATE INDEX CONCURRENTLY`
//!   leaves, and `IF NOT EXISTS` would accept) is named with the statement that drops it.
//! * **Scripts** must not control the transaction: the runner owns it (a `COMMIT` in a script
//!   would end the deploy's transaction early and break its atomicity), so `COMMIT`,
//!   `ROLLBACK` or `BEGIN` mid-script is refused when the folder is read, naming the line. A
//!   script wrapped whole in `BEGIN; … COMMIT;`, as golang-migrate users write them, is
//!   accepted: the two statements are blanked and the rest runs inside the runner's
//!   transaction (the checksum stays the file's).
//! * **Owner.** Migrations run as the schema's owner, so what they create (the history table
//!   included) belongs to the service's role. A runner connected as another role that may act
//!   as the owner (a superuser, or a member of the owner role) switches to it with `SET ROLE`
//!   for the run and says so ([`MigrateEvent::ActingAsOwner`]); one that may not is refused
//!   before anything runs ([`MigrateError::NotOwner`]).
//! * **Written.** A pending migration that is still the template `svcdb migrate new` wrote is
//!   refused by `up` and `validate` ([`MigrateError::Unwritten`]).
//! * **Timeouts.** Migrations run with `lock_timeout` 10 s (a DDL statement stuck behind live
//!   traffic fails instead of queueing that table's queries behind it) and no
//!   `statement_timeout`; both are in [`MigrateOptions`]. A statement that hits `lock_timeout`
//!   (55P03) is retried after a jittered backoff, 3 times by default
//!   ([`MigrateOptions::lock_retries`]): a transactional migration's whole group, a
//!   non-transactional migration's failing statement; each retry is a
//!   [`MigrateEvent::LockRetry`]. The `CONCURRENTLY` statements that block no reads or writes
//!   (`CREATE`/`DROP INDEX`, `REINDEX`, `DETACH PARTITION`) run without svcdb's
//!   `lock_timeout`: they wait for every older transaction in the database, whatever tables
//!   it touches, and a timeout left an invalid index behind.
//! * **Unsafe DDL.** Before running anything, `up` checks the statements it is about to run
//!   ([`lint`](mod@lint)): a `CREATE INDEX` without `CONCURRENTLY` on a table that existed before the
//!   deploy, a table rewrite, a constraint validated under lock, … is refused with the safe
//!   rewrite, unless `-- svcdb:allow <rule>` in that file or [`MigrateOptions::allow_unsafe`]
//!   allows it.
//! * **Drift.** A changed applied file, a pending version older than the newest applied one and
//!   an applied version without a file are refused, unless [`MigrateOptions`] allows them.
//!
//! # API summary
//!
//! ```text
//! Migrations::from_dir(path) / from_embedded(&EmbeddedMigrations) -> Result<Migrations>
//! Migrations::{iter, get(&Version), len, is_empty, latest, ignored}
//! new_migration(dir, name) -> Result<NewMigration>        // files for `svcdb migrate new`
//! Migrator::new(ServiceDb, Migrations).with_options(MigrateOptions)
//!   .status()   -> StatusReport        // no lock, read-only
//!   .validate() -> StatusReport        // Err on dirty / changed / missing / out-of-order (in progress is fine)
//!   .up()  / .up_with(&UpOptions { to, dry_run }, &mut |&MigrateEvent| ..)   -> UpReport  // observer: dyn FnMut + Send
//!   .down(&DownOptions { steps, to, dry_run }) / .down_with(.., observer)    -> DownReport
//!   .redo() / .redo_with(observer)                                           -> RedoReport
//!   .baseline(&Version) -> BaselineReport
//!   .adopt(&AdoptOptions { from: Tool, history_table, dry_run, allow_changed }) -> AdoptReport  // Err(AdoptError)
//!   .repair()          -> RepairReport  // clears dirty marks, accepts changed files, names invalid indexes
//! ```

pub mod adopt;
mod error;
mod event;
pub mod history;
mod interrupt;
pub mod lint;
mod location;
pub(crate) mod lock;
pub(crate) mod migration;
mod options;
mod owner;
mod repeatable;
mod report;
mod runner;
pub mod source;
pub(crate) mod split;
mod status;
pub(crate) mod template;
pub mod version;

pub use adopt::{AdoptError, AdoptOptions, AdoptProblem, AdoptReport, OtherHistory, Tool};
pub use error::{MigrateError, MigrationFailure};
pub use event::{Direction, MigrateEvent};
pub use lint::{lint, lint_each, lint_with_repeatables, Finding, LintReport, Rule, Severity};
pub use migration::{Checksum, Migration, HISTORY_TABLE, NO_TRANSACTION_DIRECTIVE};
pub use options::{DownOptions, MigrateOptions, UpOptions};
pub use repeatable::{
    Repeatable, RepeatableEntry, RepeatableRun, RepeatableState, REPEATABLES_TABLE,
};
pub use report::{
    BaselineReport, DownReport, InvalidIndex, RedoReport, RepairAction, RepairReport, RunEntry,
    UpReport,
};
pub use runner::Migrator;
pub use source::{
    check_migration_name, new_migration, EmbeddedFile, EmbeddedMigrations, Migrations, NewMigration,
};
pub use status::{MigrationState, StatusEntry, StatusReport};
pub use version::{ParseVersionError, Version};
