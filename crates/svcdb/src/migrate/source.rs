//! Where migrations come from: a folder read at run time or files embedded at compile time,
//! in any of these layouts (mixed freely in one folder), parsed by one code path.
//!
//! | layout | up | down (optional) | no transaction |
//! |---|---|---|---|
//! | native (also golang-migrate, sqlx reversible) | `<version>_<name>.up.sql` | `<version>_<name>.down.sql` | first line `-- svcdb:no-transaction` |
//! | diesel | `<version>_<name>/up.sql` | `<version>_<name>/down.sql` | `metadata.toml`: `run_in_transaction = false`, or the directive |
//! | one file (sqlx simple, goose, dbmate) | `<version>_<name>.sql`: all of it, or what follows `-- +goose Up` / `-- migrate:up` | in the same file, after `-- +goose Down` / `-- migrate:down` | `-- +goose NO TRANSACTION` (both scripts), `-- migrate:up transaction:false` (`migrate:down` for the down), or the directive |
//! | Flyway, refinery | `V<version>__<name>.sql` | Flyway's undo `U<version>__<name>.sql` | the directive |
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
//!   reverting anything, to cross it, naming it ([`MigrateError::NoDown`]). `up` is unaffected.
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
//! Refused with an error naming the file: Flyway's repeatable `R__<name>.sql`, versions that are
//! not integers (`V1.1__x.sql`), a `U<version>__` file without its `V<version>__` (refinery's
//! unversioned migrations), and unknown `-- +goose` annotations. Refused with the line as well:
//! what only psql can run, as `pg_dump` writes it for `psql -f`, a backslash meta-command
//! (`\restrict`, `\connect`) or `COPY … FROM stdin` with its data rows; the server would reject
//! it only when it runs, with a bare syntax error. A `.sql` file that is no migration
//! (`notes.sql`, `seed.sql`, a Prisma `<name>/migration.sql`) is ignored and listed by
//! [`Migrations::ignored`]; other files (a README, hidden files) are ignored silently.
//!
//! [`new_migration`] writes a new migration in the layout of the folder's newest one.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::error::MigrateError;
use super::migration::{
    has_no_transaction_directive, strip_bom, Checksum, Migration, NO_TRANSACTION_DIRECTIVE,
};
use super::split::{psql_only, split_statements, transaction_control, PsqlOnly, TxControl};
use super::version::Version;

/// Versions below this are "small sequential numbers" (`0001`), as opposed to timestamps,
/// when [`new_migration`] picks the next version.
const SEQUENTIAL_LIMIT: i64 = 100_000_000;

/// One file embedded by [`embed_migrations!`](crate::embed_migrations).
#[derive(Clone, Copy)]
pub struct EmbeddedFile {
    /// Path relative to the migrations folder, `/`-separated (`0001_x.up.sql`, `0001_x/up.sql`).
    pub path: &'static str,
    /// The file's bytes, as `include_bytes!` read them.
    pub contents: &'static [u8],
}

/// A migrations folder compiled into the binary by
/// [`embed_migrations!`](crate::embed_migrations); usable in a `static`. Nothing is parsed at
/// compile time: [`Migrations::from_embedded`] validates it at run time exactly as
/// [`Migrations::from_dir`] validates a folder.
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedMigrations {
    /// The folder as written in the macro call, for messages.
    pub dir: &'static str,
    /// Every file of the folder and of its sub-folders (one level), sorted by path.
    pub files: &'static [EmbeddedFile],
}

impl std::fmt::Debug for EmbeddedFile {
    /// The path and size: the contents would flood a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedFile")
            .field("path", &self.path)
            .field("bytes", &self.contents.len())
            .finish()
    }
}

impl EmbeddedMigrations {
    /// What the macro expands to; `const` so the result can live in a `static`.
    pub const fn new(dir: &'static str, files: &'static [EmbeddedFile]) -> Self {
        Self { dir, files }
    }
}

/// A parsed, validated set of migrations, sorted by version, in any of the layouts of the
/// [module documentation](self) (native, diesel, one-file sqlx/goose/dbmate, Flyway/refinery),
/// plus the `.sql` files that were not migrations ([`ignored`](Self::ignored)).
#[derive(Debug, Clone)]
pub struct Migrations {
    /// Sorted by version, versions unique.
    list: Vec<Migration>,
    /// The folder (or embedded folder) they came from, for messages.
    origin: String,
    /// The widest digit prefix among the file names, so [`new_migration`] can keep `0001` style.
    prefix_width: usize,
    /// How the newest migration is written, so [`new_migration`] can write the next one alike.
    newest: Option<Newest>,
    /// `.sql` files that are no migration, relative to the folder, sorted.
    ignored: Vec<String>,
}

/// A file handed to the parser: path relative to the source folder and its bytes.
struct SourceFile<'a> {
    path: String,
    contents: Cow<'a, [u8]>,
}

/// How a migration's files are laid out. Part of the grouping key, so that `1_a.up.sql`,
/// `1_a/up.sql` and `1_a.sql` are three migrations (and then a duplicate version), not one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Layout {
    /// `<version>_<name>.up.sql` and `.down.sql`.
    Native,
    /// `<version>_<name>/up.sql`, `down.sql`, `metadata.toml`.
    Diesel,
    /// `<version>_<name>.sql`, maybe cut in two by goose or dbmate markers.
    OneFile,
    /// `V<version>__<name>.sql`, with Flyway's undo `U<version>__<name>.sql`.
    Flyway,
}

/// The tool whose markers cut a one-file migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tool {
    Goose,
    Dbmate,
}

/// How a migration is written: what [`new_migration`] copies from the newest one.
#[derive(Debug, Clone, Copy)]
struct Newest {
    layout: Layout,
    /// For a one-file migration, whose markers cut it (`None`: a plain sqlx file).
    markers: Option<Tool>,
    /// Whether its version is written with dashes, as diesel writes `2017-09-23-182408`.
    dashed: bool,
}

/// What a file is to its migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The up script (for [`Layout::OneFile`], the whole file, cut at its markers later).
    Up,
    Down,
    Metadata,
}

/// What a file is, from its name alone.
enum Class {
    /// One of the files of the migration `stem` (`<version>_<name>`; for Flyway's
    /// `V2__x.sql` too: `2_x`).
    Part {
        stem: String,
        layout: Layout,
        role: Role,
    },
    /// Flyway's `U<version>__<name>.sql`: the down script of the `V` migration of that version
    /// (`stem` as for `Part`).
    Undo { stem: String },
    /// A migration file svcdb cannot use: what is wrong and what to do.
    Refused(String),
}

/// The files of one migration, before validation.
#[derive(Default)]
struct Group<'a> {
    up: Option<SourceFile<'a>>,
    down: Option<SourceFile<'a>>,
    metadata: Option<SourceFile<'a>>,
}

/// A migration's scripts, read from its files, before the transaction rules.
struct Scripts {
    up: String,
    /// The line of the up file the up script starts on.
    up_line: usize,
    down: Option<Down>,
    /// Made non-transactional by a marker or `metadata.toml` (the directive is checked later).
    up_no_tx: bool,
    down_no_tx: bool,
}

/// A down script and where it came from.
struct Down {
    sql: String,
    /// The file, as shown in messages.
    path: String,
    /// The line of that file the script starts on.
    line: usize,
}

/// diesel's `metadata.toml`.
#[derive(serde::Deserialize)]
struct Metadata {
    run_in_transaction: Option<bool>,
}

impl Migrations {
    /// Reads `<dir>` (and its direct sub-folders, for the diesel layout).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self, MigrateError> {
        let dir = dir.as_ref();
        let origin = dir.display().to_string();
        let unreadable = |path: &Path, e: std::io::Error| {
            MigrateError::source_file(path.display().to_string(), format!("cannot read it: {e}"))
        };
        let mut files = Vec::new();
        let mut consider = |rel: String, abs: &Path| -> Result<(), MigrateError> {
            // Read only what the parser will look at: it classifies again itself (so that
            // embedded files, all of which are handed over, go through the same rule) and
            // needs only the names of the others, to list the ignored `.sql` files.
            let contents = if classify(&rel).is_some() {
                std::fs::read(abs).map_err(|e| unreadable(abs, e))?
            } else {
                Vec::new()
            };
            files.push(SourceFile {
                path: rel,
                contents: Cow::Owned(contents),
            });
            Ok(())
        };
        let entries = read_dir(dir).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => MigrateError::source_file(
                &origin,
                "the migrations folder does not exist\n  hint: create it, or give the right folder (`--dir` or SVCDB_MIGRATIONS_DIR)",
            ),
            std::io::ErrorKind::NotADirectory => MigrateError::source_file(
                &origin,
                "is a file, not the migrations folder\n  hint: give the folder that holds the migration files (`--dir` or SVCDB_MIGRATIONS_DIR)",
            ),
            _ => unreadable(dir, e),
        })?;
        for entry in entries {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if path.is_dir() {
                for inner in read_dir(&path).map_err(|e| unreadable(&path, e))? {
                    // One level only, files only, as `embed_migrations!` collects them.
                    if inner.path().is_file() {
                        let inner_name = inner.file_name().to_string_lossy().into_owned();
                        consider(format!("{name}/{inner_name}"), &inner.path())?;
                    }
                }
            } else {
                consider(name, &path)?;
            }
        }
        Self::parse(origin, files)
    }

    /// Validates migrations embedded with [`embed_migrations!`](crate::embed_migrations).
    pub fn from_embedded(embedded: &EmbeddedMigrations) -> Result<Self, MigrateError> {
        let files = embedded
            .files
            .iter()
            .map(|f| SourceFile {
                path: f.path.to_owned(),
                contents: Cow::Borrowed(f.contents),
            })
            .collect();
        Self::parse(embedded.dir.to_owned(), files)
    }

    /// Every migration, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Migration> {
        self.list.iter()
    }

    /// The migration with this version (`0003` finds the file named `3_x`: leading zeros do
    /// not count).
    pub fn get(&self, version: &Version) -> Option<&Migration> {
        self.list
            .binary_search_by(|m| m.version.cmp(version))
            .ok()
            .map(|i| &self.list[i])
    }

    /// How many migrations there are.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// True when the source holds no migration.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The newest migration.
    pub fn latest(&self) -> Option<&Migration> {
        self.list.last()
    }

    /// The folder the migrations came from, as given.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The `.sql` files of the folder (and of its direct sub-folders) that are not migrations,
    /// such as `notes.sql`, `seed.sql` or a Prisma `20240101000000_init/migration.sql`: paths
    /// relative to the folder, `/`-separated, sorted. Worth a warning: a folder named for a
    /// tool whose layout svcdb does not read would otherwise just look like no migrations.
    pub fn ignored(&self) -> &[String] {
        &self.ignored
    }

    fn parse(origin: String, files: Vec<SourceFile<'_>>) -> Result<Self, MigrateError> {
        let display = |rel: &str| format!("{}/{rel}", origin.trim_end_matches('/'));
        let refuse = |file: &SourceFile<'_>, message: String| {
            MigrateError::source_file(display(&file.path), message)
        };
        let mut groups: BTreeMap<(String, Layout), Group<'_>> = BTreeMap::new();
        // Flyway undo scripts (and their names) by version, each taken by the `V` migration of
        // its version.
        let mut undo: BTreeMap<Version, (SourceFile<'_>, String)> = BTreeMap::new();
        let mut ignored = Vec::new();
        for file in files {
            let Some(class) = classify(&file.path) else {
                if file.path.to_ascii_lowercase().ends_with(".sql") {
                    ignored.push(file.path);
                }
                continue;
            };
            let (stem, layout, role) = match class {
                Class::Part { stem, layout, role } => (stem, layout, role),
                Class::Refused(why) => return Err(refuse(&file, why)),
                Class::Undo { stem } => {
                    let (version, name, _) = parse_stem(&stem).map_err(|m| refuse(&file, m))?;
                    if let Some((other, _)) = undo.get(&version) {
                        let message = format!(
                            "version {version} has a second undo script, {}; remove one of them",
                            display(&other.path)
                        );
                        return Err(refuse(&file, message));
                    }
                    let name = name.to_owned();
                    undo.insert(version, (file, name));
                    continue;
                }
            };
            let group = groups.entry((stem, layout)).or_default();
            let slot = match role {
                Role::Up => &mut group.up,
                Role::Down => &mut group.down,
                Role::Metadata => &mut group.metadata,
            };
            *slot = Some(file);
        }
        let mut list: Vec<Migration> = Vec::with_capacity(groups.len());
        let mut prefix_width = 0;
        let mut newest: Option<(Version, Newest)> = None;
        for ((stem, layout), group) in groups {
            let Some(up) = group.up else {
                // A metadata.toml alone does not make a folder a migration.
                if let Some(down) = group.down {
                    let up_name = match layout {
                        Layout::Diesel => format!("{stem}/up.sql"),
                        _ => format!("{stem}.up.sql"),
                    };
                    let message = format!(
                        "a down script without its up script {up_name}; add the up script or remove this file"
                    );
                    return Err(refuse(&down, message));
                }
                continue;
            };
            let (version, name, width) = parse_stem(&stem).map_err(|m| refuse(&up, m))?;
            prefix_width = prefix_width.max(width);
            let up_path = display(&up.path);
            let text = script(&up, &display)?;
            let down_file = |file: &SourceFile<'_>| -> Result<Down, MigrateError> {
                Ok(Down {
                    sql: script(file, &display)?,
                    path: display(&file.path),
                    line: 1,
                })
            };
            let mut markers = None;
            let scripts = match layout {
                Layout::OneFile => {
                    let sections = cut_at_markers(&text).map_err(|m| refuse(&up, m))?;
                    markers = sections.markers;
                    sections.into_scripts(&up_path)
                }
                Layout::Flyway => Scripts::whole(
                    text,
                    undo.remove(&version)
                        .map(|(file, _)| down_file(&file))
                        .transpose()?,
                    false,
                ),
                Layout::Native | Layout::Diesel => Scripts::whole(
                    text,
                    group.down.as_ref().map(down_file).transpose()?,
                    match &group.metadata {
                        Some(meta) => metadata_says_no_tx(meta).map_err(|m| refuse(meta, m))?,
                        None => false,
                    },
                ),
            };
            let Scripts {
                up: up_sql,
                up_line,
                down,
                up_no_tx,
                down_no_tx,
            } = scripts;
            // A down script without a statement (an empty file, comments only) undoes nothing:
            // the migration is irreversible, and `down` refuses it before touching anything.
            let down = down.filter(|d| !split_statements(&d.sql).is_empty());
            refuse_psql_only(&up_sql, &up_path, up_line)?;
            if let Some(d) = &down {
                refuse_psql_only(&d.sql, &d.path, d.line)?;
            }
            if newest.as_ref().is_none_or(|(v, _)| version > *v) {
                let dashed = stem.split_once('_').is_some_and(|(p, _)| p.contains('-'));
                let written = Newest {
                    layout,
                    markers,
                    dashed,
                };
                newest = Some((version.clone(), written));
            }
            // The checksum is the file's: blanking a `BEGIN`/`COMMIT` wrapper below is not an
            // edit, and histories written before it was done still match.
            let checksum = Checksum::of(&up_sql);
            let transactional = !(up_no_tx || has_no_transaction_directive(&up_sql));
            let down_transactional = !(down_no_tx
                || down
                    .as_ref()
                    .is_some_and(|d| has_no_transaction_directive(&d.sql)));
            let up_sql = unwrap_transaction(up_sql, transactional, &up_path, up_line)?;
            let down = match down {
                Some(d) => Some(Down {
                    sql: unwrap_transaction(d.sql, down_transactional, &d.path, d.line)?,
                    ..d
                }),
                None => None,
            };
            list.push(Migration {
                version,
                name: name.to_owned(),
                checksum,
                transactional,
                down_transactional,
                up: up_sql,
                up_line,
                down_line: down.as_ref().map_or(1, |d| d.line),
                down_path: down.as_ref().map(|d| d.path.clone()),
                down: down.map(|d| d.sql),
                path: up_path,
            });
        }
        if let Some((version, (file, name))) = undo.into_iter().next() {
            let message = format!(
                "a Flyway undo script without its migration: there is no `V{version}__<name>.sql` for it to undo\n  hint: add that migration, or remove this file; refinery's unversioned `U` migrations are not supported: to run it as a migration, rename it to `V{version}__{name}.sql`"
            );
            return Err(refuse(&file, message));
        }
        list.sort_by(|a, b| a.version.cmp(&b.version));
        if let Some(pair) = list.windows(2).find(|w| w[0].version == w[1].version) {
            return Err(MigrateError::source_file(
                &pair[1].path,
                format!(
                    "version {} is used twice, also by {}; give one of them a new version",
                    pair[1].version, pair[0].path
                ),
            ));
        }
        ignored.sort();
        Ok(Self {
            list,
            origin,
            prefix_width,
            newest: newest.map(|(_, written)| written),
            ignored,
        })
    }
}

impl Scripts {
    /// Scripts that are whole files: the up file and the down file, if any.
    fn whole(up: String, down: Option<Down>, no_tx: bool) -> Self {
        Scripts {
            up,
            up_line: 1,
            down,
            up_no_tx: no_tx,
            down_no_tx: no_tx,
        }
    }
}

/// Refuses a script holding what only psql can run, naming its line (`first_line` is the line
/// of `path` the script starts on).
fn refuse_psql_only(script: &str, path: &str, first_line: usize) -> Result<(), MigrateError> {
    let Some((at, found)) = psql_only(script) else {
        return Ok(());
    };
    let line = first_line + script[..at].matches('\n').count();
    let message = match found {
        PsqlOnly::MetaCommand(command) => format!(
            "line {line}: psql meta-command {command} cannot run: svcdb sends SQL to the server, not through psql\n  hint: delete psql lines (\\restrict, \\connect, \\set …) from the file"
        ),
        PsqlOnly::CopyFromStdin => format!(
            "line {line}: COPY … FROM stdin needs psql to stream the data rows that follow it\n  hint: turn the rows into INSERT statements (pg_dump --inserts or --column-inserts), or load them with COPY FROM a file on the server"
        ),
    };
    Err(MigrateError::source_file(path, message))
}

/// The script to run: one wrapped whole in `BEGIN; … COMMIT;` (as golang-migrate users write
/// them) has the two statements blanked out, line breaks kept so errors still point at the
/// file's lines, and runs inside the runner's transaction like any other. Any other
/// transaction control is refused, naming its line: a `COMMIT` would end the deploy's
/// transaction early (leaving what ran so far applied but unrecorded, and the rest outside any
/// transaction), and a non-transactional script runs statement by statement precisely so it is
/// in none.
fn unwrap_transaction(
    script: String,
    transactional: bool,
    path: &str,
    first_line: usize,
) -> Result<String, MigrateError> {
    let line = |at: usize| first_line + script[..at].matches('\n').count();
    let refuse = |at: usize, keyword: &str, what: &str| {
        let message = format!(
            "line {}: {keyword} {what}: svcdb runs each migration in a transaction it owns (a deploy's pending migrations in one), so the script must not control it\n  hint: remove the transaction statements (a file wrapped whole in BEGIN; … COMMIT; is accepted as it is); a migration that must run outside a transaction starts with `{NO_TRANSACTION_DIRECTIVE}`",
            line(at)
        );
        MigrateError::source_file(path, message)
    };
    match transaction_control(&script) {
        TxControl::None => Ok(script),
        TxControl::Misplaced(statement) => Err(refuse(
            statement.range.start,
            &statement.keyword,
            "controls the transaction",
        )),
        TxControl::Wrapped([open, _]) if !transactional => Err(refuse(
            open.range.start,
            &open.keyword,
            "opens a transaction in a migration marked to run outside one",
        )),
        TxControl::Wrapped(wrapper) => {
            let mut bytes = script.into_bytes();
            for statement in wrapper {
                for b in &mut bytes[statement.range] {
                    if *b != b'\n' {
                        *b = b' ';
                    }
                }
            }
            Ok(String::from_utf8(bytes).expect("blanking ASCII-bounded ranges keeps UTF-8"))
        }
    }
}

/// Sorted directory entries, so errors and embedding are deterministic. Hidden entries
/// (`.git`, editor swap files) are skipped.
fn read_dir(dir: &Path) -> std::io::Result<Vec<std::fs::DirEntry>> {
    let mut entries = std::fs::read_dir(dir)?
        .filter(|e| !matches!(e, Ok(e) if e.file_name().to_string_lossy().starts_with('.')))
        .collect::<std::io::Result<Vec<_>>>()?;
    entries.sort_by_key(|e| e.file_name());
    Ok(entries)
}

/// What the file at `rel` is to a migration; `None` for other files.
fn classify(rel: &str) -> Option<Class> {
    let part = |stem: &str, layout, role| {
        Some(Class::Part {
            stem: stem.to_owned(),
            layout,
            role,
        })
    };
    match rel.split_once('/') {
        None => {
            if let Some(stem) = rel.strip_suffix(".up.sql") {
                return part(stem, Layout::Native, Role::Up);
            }
            if let Some(stem) = rel.strip_suffix(".down.sql") {
                return part(stem, Layout::Native, Role::Down);
            }
            let stem = rel.strip_suffix(".sql")?;
            let mut chars = stem.chars();
            match (chars.next()?, chars.next()) {
                (c, _) if c.is_ascii_digit() => part(stem, Layout::OneFile, Role::Up),
                ('V' | 'v' | 'U' | 'u', Some(c)) if c.is_ascii_digit() => Some(flyway(stem)),
                ('R' | 'r', Some('_')) if stem[1..].starts_with("__") => Some(Class::Refused(
                    "Flyway repeatable migrations are not supported: svcdb runs each migration once, by version\n  hint: put the SQL in a versioned migration (`V<version>__<name>.sql`), and re-create objects in a new migration when they change".to_owned(),
                )),
                _ => None,
            }
        }
        Some((dir, file)) if !dir.starts_with('.') => {
            let role = match file {
                "up.sql" => Role::Up,
                "down.sql" => Role::Down,
                "metadata.toml" => Role::Metadata,
                _ => return None,
            };
            part(dir, Layout::Diesel, role)
        }
        Some(_) => None,
    }
}

/// A Flyway-style stem: `V<version>__<name>` or `U<version>__<name>`, any case, with a digit
/// after the letter.
fn flyway(stem: &str) -> Class {
    let (letter, rest) = stem.split_at(1);
    let letter = letter.to_ascii_uppercase();
    let expected =
        format!("expected `{letter}<version>__<name>.sql`, e.g. `{letter}2__create_users.sql`");
    let integer = |version: &str| version.chars().all(|c| c.is_ascii_digit());
    let refused = match rest.split_once("__") {
        None => format!(
            "a Flyway-style name needs two underscores between the version and the name; {expected}"
        ),
        Some((version, _)) if !integer(version) && integer(&version.replace(['.', '_'], "")) => {
            format!(
                "version {version} is not an integer: svcdb orders migrations by integer versions\n  hint: rename the files with integer versions that keep their order, e.g. `V1.1__` to `V101__`, `V1.2__` to `V102__`, `V2.0__` to `V200__`"
            )
        }
        Some((version, _)) if !integer(version) => {
            format!("cannot read a version from the name: {version:?} is not a number; {expected}")
        }
        Some((_, name)) if name.trim().is_empty() => {
            format!("the name after the version is empty; {expected}")
        }
        Some((version, name)) => {
            let stem = format!("{version}_{name}");
            return if letter == "U" {
                Class::Undo { stem }
            } else {
                Class::Part {
                    stem,
                    layout: Layout::Flyway,
                    role: Role::Up,
                }
            };
        }
    };
    Class::Refused(refused)
}

/// `(version, name, digit count)` from `<version>_<name>`, or what is wrong with it.
fn parse_stem(stem: &str) -> Result<(Version, &str, usize), String> {
    const EXPECTED: &str =
        "expected `<version>_<name>`, e.g. `0001_create_users.up.sql`, `20261124093000_create_users.sql` or `20261124093000_create_users/up.sql`";
    let Some((prefix, name)) = stem.split_once('_') else {
        return Err(format!(
            "cannot read a version from the name: no `_` after the version; {EXPECTED}"
        ));
    };
    if prefix.is_empty()
        || !prefix.chars().all(|c| c.is_ascii_digit() || c == '-')
        || !prefix.chars().any(|c| c.is_ascii_digit())
    {
        return Err(format!(
            "cannot read a version from the name: {prefix:?} is not a number (digits, optionally separated by `-`); {EXPECTED}"
        ));
    }
    if name.trim().is_empty() {
        return Err(format!("the name after the version is empty; {EXPECTED}"));
    }
    let version: Version = prefix
        .parse()
        .map_err(|e: super::version::ParseVersionError| e.to_string())?;
    let width = prefix.chars().filter(char::is_ascii_digit).count();
    Ok((version, name, width))
}

/// The file's text without a byte-order mark, refusing non-UTF-8. An empty file is fine: see
/// the module documentation for what an empty up or down script means.
fn script(file: &SourceFile<'_>, display: &dyn Fn(&str) -> String) -> Result<String, MigrateError> {
    let text = String::from_utf8(file.contents.to_vec()).map_err(|e| {
        MigrateError::source_file(
            display(&file.path),
            format!(
                "is not valid UTF-8 (bad byte at offset {}); save it as UTF-8",
                e.utf8_error().valid_up_to()
            ),
        )
    })?;
    let text = match strip_bom(&text) {
        stripped if stripped.len() < text.len() => stripped.to_owned(),
        _ => text,
    };
    Ok(text)
}

/// Whether diesel's `metadata.toml` says `run_in_transaction = false`, or what is wrong with it.
fn metadata_says_no_tx(meta: &SourceFile<'_>) -> Result<bool, String> {
    let text = std::str::from_utf8(&meta.contents).map_err(|_| "is not valid UTF-8".to_owned())?;
    let parsed: Metadata = toml::from_str(text).map_err(|e| format!("is not valid TOML: {e}"))?;
    Ok(parsed.run_in_transaction == Some(false))
}

/// A one-file migration cut at its goose or dbmate markers (a file without markers is all up).
struct Sections<'t> {
    up: &'t str,
    /// The line the up script starts on.
    up_line: usize,
    /// The down script (`None` when the down section holds only comments) and its first line.
    down: Option<(&'t str, usize)>,
    up_no_tx: bool,
    down_no_tx: bool,
    /// Whose up marker the file has (`None`: no markers).
    markers: Option<Tool>,
}

impl Sections<'_> {
    fn into_scripts(self, path: &str) -> Scripts {
        Scripts {
            up: self.up.to_owned(),
            up_line: self.up_line,
            down: self.down.map(|(sql, line)| Down {
                sql: sql.to_owned(),
                path: path.to_owned(),
                line,
            }),
            up_no_tx: self.up_no_tx,
            down_no_tx: self.down_no_tx,
        }
    }
}

/// A goose annotation or dbmate marker line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Marker {
    /// `-- +goose Up`, `-- migrate:up` (`transaction:false` sets `no_tx`).
    Up { no_tx: bool, tool: Tool },
    /// `-- +goose Down`, `-- migrate:down`.
    Down { no_tx: bool },
    /// `-- +goose NO TRANSACTION`: both scripts.
    NoTransaction,
    /// `-- +goose StatementBegin` / `StatementEnd`: a comment to us.
    Statement,
}

/// The marker on `line`, if it is one; an error for an annotation we do not know.
fn marker(line: &str) -> Result<Option<Marker>, String> {
    let Some(comment) = line.trim().strip_prefix("--") else {
        return Ok(None);
    };
    let comment = comment.trim_start();
    // What follows `prefix` (in any case) at the start of `comment`.
    let after = |prefix: &str| {
        comment
            .get(..prefix.len())
            .filter(|head| head.eq_ignore_ascii_case(prefix))
            .map(|_| &comment[prefix.len()..])
    };
    if let Some(rest) =
        after("+goose").filter(|r| r.is_empty() || r.starts_with(char::is_whitespace))
    {
        let words: Vec<String> = rest
            .split_whitespace()
            .map(str::to_ascii_lowercase)
            .collect();
        return match words.join(" ").as_str() {
            "up" => Ok(Some(Marker::Up {
                no_tx: false,
                tool: Tool::Goose,
            })),
            "down" => Ok(Some(Marker::Down { no_tx: false })),
            "no transaction" => Ok(Some(Marker::NoTransaction)),
            "statementbegin" | "statementend" => Ok(Some(Marker::Statement)),
            _ => Err(format!(
                "unknown goose annotation `{}`: svcdb reads `-- +goose Up`, `Down`, `NO TRANSACTION`, `StatementBegin` and `StatementEnd`, and substitutes no environment variables\n  hint: remove the annotation (and write any `${{VAR}}` out)",
                line.trim()
            )),
        };
    }
    let Some(rest) = after("migrate:") else {
        return Ok(None);
    };
    let mut words = rest.split_whitespace();
    // `migrate:up` is one word: `-- migrate: up the …` is prose.
    let up = match words.next() {
        Some(w) if rest.starts_with(w) && w.eq_ignore_ascii_case("up") => true,
        Some(w) if rest.starts_with(w) && w.eq_ignore_ascii_case("down") => false,
        _ => return Ok(None),
    };
    let mut no_tx = false;
    for option in words {
        match option.to_ascii_lowercase().as_str() {
            "transaction:false" => no_tx = true,
            "transaction:true" => no_tx = false,
            _ => {
                return Err(format!(
                    "unknown dbmate option `{option}` in `{}`: svcdb reads `transaction:false`\n  hint: remove the option",
                    line.trim()
                ))
            }
        }
    }
    Ok(Some(if up {
        Marker::Up {
            no_tx,
            tool: Tool::Dbmate,
        }
    } else {
        Marker::Down { no_tx }
    }))
}

/// Cuts a one-file migration at its markers, or says what is wrong with them.
fn cut_at_markers(text: &str) -> Result<Sections<'_>, String> {
    /// Where a marker line starts, where the text after it starts, and its line number.
    struct Seen {
        at: usize,
        after: usize,
        line: usize,
    }
    let mut up: Option<Seen> = None;
    let mut down: Option<Seen> = None;
    let mut markers = None;
    let (mut any, mut no_tx, mut up_no_tx, mut down_no_tx) = (false, false, false, false);
    let mut offset = 0;
    for (index, text_line) in text.split_inclusive('\n').enumerate() {
        let seen = Seen {
            at: offset,
            after: offset + text_line.len(),
            line: index + 1,
        };
        offset = seen.after;
        let Some(found) = marker(text_line).map_err(|m| format!("line {}: {m}", seen.line))? else {
            continue;
        };
        any = true;
        match found {
            Marker::Up { no_tx, tool } => {
                if let Some(first) = &up {
                    return Err(format!(
                        "a second up marker on line {} (the first is on line {}): a file holds one migration\n  hint: move the second migration into a file of its own",
                        seen.line, first.line
                    ));
                }
                if let Some(down) = &down {
                    return Err(format!(
                        "the up marker on line {} comes after the down marker on line {}\n  hint: put the up section first, then the down section",
                        seen.line, down.line
                    ));
                }
                up_no_tx = no_tx;
                markers = Some(tool);
                up = Some(seen);
            }
            Marker::Down { no_tx } => {
                if let Some(first) = &down {
                    return Err(format!(
                        "a second down marker on line {} (the first is on line {}); a migration has one down section\n  hint: merge them",
                        seen.line, first.line
                    ));
                }
                down_no_tx = no_tx;
                down = Some(seen);
            }
            Marker::NoTransaction => no_tx = true,
            Marker::Statement => {}
        }
    }
    if !any {
        return Ok(Sections {
            up: text,
            up_line: 1,
            down: None,
            up_no_tx: false,
            down_no_tx: false,
            markers: None,
        });
    }
    let Some(up) = up else {
        return Err(
            "has goose or dbmate markers but no up marker\n  hint: put `-- +goose Up` (or `-- migrate:up`) on the line before the up SQL".to_owned(),
        );
    };
    if !split_statements(&text[..up.at]).is_empty() {
        return Err(format!(
            "SQL before the up marker on line {}: it would belong to neither script\n  hint: move it below the marker, or remove it",
            up.line
        ));
    }
    let up_sql = &text[up.after..down.as_ref().map_or(text.len(), |d| d.at)];
    Ok(Sections {
        up: up_sql,
        up_line: up.line + 1,
        down: down.map(|d| (&text[d.after..], d.line + 1)),
        up_no_tx: no_tx || up_no_tx,
        down_no_tx: no_tx || down_no_tx,
        markers,
    })
}

/// The files [`new_migration`] created.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NewMigration {
    /// The version chosen, as written in the file name.
    pub version: Version,
    /// The file holding the up script (and, for goose and dbmate, the down section too).
    pub up_path: PathBuf,
    /// The down script's own file, in the native and diesel layouts; `None` where one file
    /// holds the migration (sqlx simple, goose, dbmate, Flyway without its undo file).
    pub down_path: Option<PathBuf>,
}

impl NewMigration {
    /// Every file created, the up file first.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        std::iter::once(self.up_path.as_path()).chain(self.down_path.as_deref())
    }
}

/// Creates the files of a new migration in `dir` (created if missing), laid out like the newest
/// migration there:
///
/// | newest migration | files created |
/// |---|---|
/// | none, or native | `<version>_<name>.up.sql` and `.down.sql` |
/// | diesel | `<version>_<name>/up.sql` and `down.sql` |
/// | goose, dbmate | `<version>_<name>.sql` with `-- +goose Up`/`Down` or `-- migrate:up`/`down` |
/// | sqlx simple (one file, no markers) | `<version>_<name>.sql` |
/// | Flyway | `V<version>__<name>.sql` |
///
/// Each script (each section of a goose or dbmate file) holds a comment to replace with the
/// SQL, so the folder parses meanwhile; a down of comments only counts as no down.
///
/// The version is the UTC time as `YYYYMMDDHHMMSS` (with dashes, `YYYY-MM-DD-HHMMSS`, when the
/// newest version is written so, as diesel does), or, when the folder already numbers its
/// migrations with small sequential numbers (`0001`), the next number with the same width. It
/// is always above the newest existing version. The folder must parse (a broken migration
/// already there is reported), and `name` must be usable in a file name.
pub fn new_migration(dir: impl AsRef<Path>, name: &str) -> Result<NewMigration, MigrateError> {
    let dir = dir.as_ref();
    let shown = dir.display().to_string();
    if name.trim().is_empty() || name.contains(['/', '\\', '\0']) || name.trim() != name {
        return Err(MigrateError::source_file(
            shown,
            format!("{name:?} cannot be a migration name: it must be non-empty, without `/`, `\\` or surrounding spaces"),
        ));
    }
    let existing = if dir.exists() {
        Migrations::from_dir(dir)?
    } else {
        std::fs::create_dir_all(dir).map_err(|e| {
            MigrateError::source_file(&shown, format!("cannot create the folder: {e}"))
        })?;
        Migrations::parse(shown.clone(), Vec::new())?
    };
    let newest = existing.newest.unwrap_or(Newest {
        layout: Layout::Native,
        markers: None,
        dashed: false,
    });
    let prefix = match existing.latest().map(|m| &m.version) {
        Some(v) if !v.is_timestamp() && v.number() < SEQUENTIAL_LIMIT => {
            format!("{:0width$}", v.number() + 1, width = existing.prefix_width)
        }
        latest => {
            // One second after the newest timestamp when the clock is behind it, so the new
            // migration always sorts last.
            let time_format = "%Y%m%d%H%M%S";
            let mut time = chrono::Utc::now().naive_utc();
            if let Some(newest) = latest.and_then(Version::time).and_then(|t| {
                chrono::NaiveDateTime::parse_from_str(&t.to_string(), time_format).ok()
            }) {
                time = time.max(newest + chrono::Duration::seconds(1));
            }
            let digits = time.format(time_format).to_string();
            match latest {
                // Not a timestamp, or one the calendar does not know (`20260231…`): the next
                // integer.
                Some(v) if digits.parse::<Version>().is_ok_and(|new| new <= *v) => {
                    (v.number() + 1).to_string()
                }
                // Keep diesel's dashes: they are how the folder writes its versions (diesel
                // itself compares versions with the dashes removed).
                _ if newest.dashed => format!(
                    "{}-{}-{}-{}",
                    &digits[..4],
                    &digits[4..6],
                    &digits[6..8],
                    &digits[8..]
                ),
                _ => digits,
            }
        }
    };
    let version: Version = prefix
        .parse()
        .map_err(|e: super::version::ParseVersionError| {
            MigrateError::source_file(&shown, format!("cannot pick the next version: {e}"))
        })?;
    let stem = format!("{prefix}_{name}");
    let up = super::template::up_placeholder(&prefix, name);
    let undo = super::template::down_placeholder(&prefix, name);
    let files = match (newest.layout, newest.markers) {
        (Layout::Native, _) => vec![
            (format!("{stem}.up.sql"), up),
            (format!("{stem}.down.sql"), undo),
        ],
        (Layout::Diesel, _) => vec![
            (format!("{stem}/up.sql"), up),
            (format!("{stem}/down.sql"), undo),
        ],
        (Layout::OneFile, None) => vec![(format!("{stem}.sql"), up)],
        (Layout::OneFile, Some(Tool::Goose)) => vec![(
            format!("{stem}.sql"),
            format!("-- +goose Up\n{up}\n-- +goose Down\n{undo}"),
        )],
        (Layout::OneFile, Some(Tool::Dbmate)) => vec![(
            format!("{stem}.sql"),
            format!("-- migrate:up\n{up}\n-- migrate:down\n{undo}"),
        )],
        (Layout::Flyway, _) => vec![(format!("V{prefix}__{name}.sql"), up)],
    };
    // `x.up` makes the one file `0003_x.up.sql`, which would read as a native up script.
    let misread = files.iter().find(|(rel, _)| {
        !matches!(classify(rel), Some(Class::Part { layout, .. }) if layout == newest.layout)
    });
    if let Some((rel, _)) = misread {
        return Err(MigrateError::source_file(
            shown,
            format!("{name:?} cannot be a migration name in this folder's layout: its file {rel} would be read as a file of another layout\n  hint: choose a name that does not end in `.up` or `.down`"),
        ));
    }
    let mut created = Vec::with_capacity(files.len());
    for (rel, body) in files {
        let path = dir.join(rel);
        let parent = path.parent().expect("a file in `dir`");
        std::fs::create_dir_all(parent)
            .and_then(|()| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)
            })
            .and_then(|mut f| std::io::Write::write_all(&mut f, body.as_bytes()))
            .map_err(|e| {
                MigrateError::source_file(
                    path.display().to_string(),
                    format!("cannot create it: {e}"),
                )
            })?;
        created.push(path);
    }
    let mut created = created.into_iter();
    Ok(NewMigration {
        version,
        up_path: created.next().expect("every layout creates the up file"),
        down_path: created.next(),
    })
}
