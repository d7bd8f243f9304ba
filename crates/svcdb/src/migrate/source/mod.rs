//! Where migrations come from: a folder read at run time or files embedded at compile time,
//! in any of these layouts (mixed freely in one folder), parsed by one code path.
//!
//! | layout | up | down (optional) | no transaction |
//! |---|---|---|---|
//! | native (also golang-migrate, sqlx reversible) | `<version>_<name>.up.sql` | `<version>_<name>.down.sql` | first line `-- svcdb:no-transaction` (sqlx `-- no-transaction`, morph `-- morph:nontransactional`) |
//! | diesel | `<version>_<name>/up.sql` | `<version>_<name>/down.sql` | `metadata.toml`: `run_in_transaction = false`, or the directive |
//! | one file (sqlx simple, goose, dbmate) | `<version>_<name>.sql`: all of it, or what follows `-- +goose Up` / `-- migrate:up` | in the same file, after `-- +goose Down` / `-- migrate:down` | `-- +goose NO TRANSACTION` (both scripts), `-- migrate:up transaction:false` (`migrate:down` for the down), or the directive |
//! | Flyway, refinery | `V<version>__<name>.sql`, also in sub-folders at any depth | Flyway's undo `U<version>__<name>.sql` | the script config file `<script>.conf` (`executeInTransaction`), else a statement Flyway runs outside a transaction (`CREATE INDEX CONCURRENTLY`, `VACUUM`, `ALTER TYPE … ADD VALUE`…: see `flyway.rs`), or the directive |
//!
//! The directive is the first line of the script itself (for a one-file migration, the line
//! after the marker). In a one-file migration only blank lines and comments may come before the
//! up marker, and each marker appears once, up before down.
//!
//! # Empty scripts
//!
//! A script holding no statement (an empty file, or only whitespace and comments) is accepted:
//!
//! * **An empty down** (`down.sql`, `.down.sql`, Flyway's undo file, a goose or dbmate down
//!   section) means the migration has no down: it is irreversible, and `down` refuses, before
//!   reverting anything, to cross it, naming it ([`MigrateError::NoDown`](crate::migrate::MigrateError::NoDown)). `up` is unaffected.
//! * **An empty up** is a no-op migration: applied and recorded like any other, with an
//!   `empty-up` warning from the check before `up` ([`lint`](mod@super::lint)) and from
//!   `svcdb migrate lint`.
//!
//! Where the other tools differ (read in their sources): diesel refuses a zero-byte `up.sql`
//! or `down.sql` only when it runs it (`EmptyMigration`; a file of whitespace or comments runs
//! as a no-op), so an empty `down.sql` fails `diesel migration revert` part-way through a
//! multi-step revert, where svcdb refuses before the first step. sqlx runs an empty script as a
//! no-op in both directions, and golang-migrate skips an empty (whitespace-only) body and a
//! missing down file alike: both "revert" an empty down by running nothing and forgetting the
//! version, which leaves the schema as it was while the history says otherwise; svcdb
//! refuses instead. goose's `StatementBegin`/`StatementEnd` are left in the scripts as
//! comments: a script goes to the server as one message.
//!
//! Flyway's dotted versions (`V1.1__x.sql`, `V1_1__x.sql`) are read and ordered as Flyway
//! reads them (see [`Version`](crate::migrate::Version)); the other tools' versions are
//! integers, and a dot in their names is refused.
//!
//! A folder runs in [`Version`](crate::migrate::Version) order. Where its tool would run two
//! of its migrations the other way round, it is refused, naming both files (`order.rs`):
//! dbmate runs its files in file-name order (`10_b.sql` before `9_a.sql`), diesel compares
//! version digits as text (`10` before `9`), and golang-migrate, sqlx, goose, refinery and
//! Flyway compare integers (a 16-digit timestamp after every 14-digit one).
//!
//! Refused with an error naming the file: Flyway's repeatable `R__<name>.sql`, a
//! `U<version>__` file without its `V<version>__` (refinery's
//! unversioned migrations), goose's Go and refinery's Rust migrations (`00002_x.go`,
//! `V2__x.rs`: the SQL ones around them would run without their step), and unknown
//! `-- +goose` annotations. Refused with the line as well:
//! what only psql can run, as `pg_dump` writes it for `psql -f`, a backslash meta-command
//! (`\restrict`, `\connect`) or `COPY … FROM stdin` with its data rows, and a Flyway
//! placeholder (`${schema}`) outside strings and function bodies; the server would reject
//! them only when they run, with a bare syntax error. A `.sql` file that is no migration
//! (`notes.sql`, `seed.sql`, a Prisma `<name>/migration.sql`) is ignored and listed by
//! [`Migrations::ignored`]; other files (a README, hidden files) are ignored silently.
//!
//! [`new_migration`] writes a new migration in the layout of the folder's newest one.
//!
//! # Layout
//!
//! | concept | file |
//! |---|---|
//! | reading a folder or embedded files into [`Migrations`], one code path | `read.rs` |
//! | what a file's name says: its layout, its role, its version and name | `names.rs` |
//! | one-file migrations cut at goose or dbmate markers | `one_file.rs` |
//! | the order each tool runs its folder in, checked against svcdb's | `order.rs` |
//! | diesel's `metadata.toml` | `diesel.rs` |
//! | the statements Flyway runs outside a transaction, its script config files | `flyway.rs` |
//! | the checks on each script: psql-only lines, `BEGIN`/`COMMIT` wrappers | `checks.rs` |
//! | writing a new migration in the folder's layout ([`new_migration`]) | `new.rs` |

mod checks;
mod diesel;
mod flyway;
mod names;
mod new;
mod one_file;
mod order;
mod read;
#[cfg(test)]
mod test_support;

pub(crate) use names::down_script_place;
pub use new::{check_migration_name, new_migration, NewMigration};
pub use read::{EmbeddedFile, EmbeddedMigrations, Migrations};
