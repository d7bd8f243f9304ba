//! Reading migrations: a folder at run time or files embedded at compile time, grouped into
//! migrations by [`names`](super::names) and checked by one code path.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

use super::checks::{refuse_unrunnable, unwrap_transaction};
use super::diesel::metadata_says_no_tx;
use super::flyway::{runs_outside_a_transaction, script_config, ScriptConfig};
use super::names::{classify, parse_stem, Class, Layout, Role, Tool};
use super::one_file::{cut_at_markers, Sections};
use super::order::{refuse_another_order, ToolOrder};
use crate::migrate::error::MigrateError;
use crate::migrate::migration::{has_no_transaction_directive, strip_bom, Checksum, Migration};
use crate::migrate::repeatable::Repeatable;
use crate::migrate::split::{flyway_placeholder_in_quoted, split_statements};
use crate::migrate::version::Version;

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
/// [module documentation](super) (native, diesel, one-file sqlx/goose/dbmate, Flyway/refinery),
/// plus the `.sql` files that were not migrations ([`ignored`](Self::ignored)).
#[derive(Debug, Clone)]
pub struct Migrations {
    /// Sorted by version, versions unique.
    list: Vec<Migration>,
    /// The folder (or embedded folder) they came from, for messages.
    origin: String,
    /// The widest digit prefix among the file names, so [`new_migration`](super::new_migration) can keep `0001` style.
    pub(super) prefix_width: usize,
    /// How the newest migration is written, so [`new_migration`](super::new_migration) can write the next one alike.
    pub(super) newest: Option<Newest>,
    /// `.sql` files that are no migration, relative to the folder, sorted.
    ignored: Vec<String>,
    /// Flyway's repeatable migrations, by name.
    repeatables: Vec<Repeatable>,
}

/// A file handed to the parser: path relative to the source folder and its bytes.
pub(super) struct SourceFile<'a> {
    path: String,
    contents: Cow<'a, [u8]>,
}

/// How a migration is written: what [`new_migration`](super::new_migration) copies from the
/// newest one.
#[derive(Debug, Clone, Copy)]
pub(super) struct Newest {
    pub(super) layout: Layout,
    /// For a one-file migration, whose markers cut it (`None`: a plain sqlx file).
    pub(super) markers: Option<Tool>,
    /// Whether its version is written with dashes, as diesel writes `2017-09-23-182408`.
    pub(super) dashed: bool,
    /// Whether its dotted version is written with `_`, as Flyway reads `V1_12_30__x.sql`.
    pub(super) underscored: bool,
}

/// Gives each lone `.down.sql` to the `.up.sql` of its version when their names differ and
/// that up has no down of its own, as golang-migrate and sqlx pair them (by version, whatever
/// the names): real folders rename one side (`000002_create_x.up.sql` beside
/// `000002_del_x.down.sql`). A down that two ups of its version could take, or whose up has a
/// down already, stays alone and is refused.
fn pair_downs_by_version(groups: &mut BTreeMap<(String, Layout), Group<'_>>) {
    let version = |stem: &str| {
        parse_stem(stem, Layout::Native)
            .ok()
            .map(|(version, ..)| version)
    };
    let lone: Vec<(String, Layout)> = groups
        .iter()
        .filter(|((_, layout), g)| *layout == Layout::Native && g.up.is_none() && g.down.is_some())
        .map(|(key, _)| key.clone())
        .collect();
    for key in lone {
        let Some(wanted) = version(&key.0) else {
            continue;
        };
        let partners: Vec<(String, Layout)> = groups
            .iter()
            .filter(|((stem, layout), g)| {
                *layout == Layout::Native
                    && g.up.is_some()
                    && g.down.is_none()
                    && version(stem).as_ref() == Some(&wanted)
            })
            .map(|(key, _)| key.clone())
            .collect();
        let [partner] = partners.as_slice() else {
            continue;
        };
        let down = groups.remove(&key).and_then(|g| g.down);
        if let Some(group) = groups.get_mut(partner) {
            group.down = down;
        }
    }
}

/// The databases ory's pop writes a file of each migration for
/// (`<version>_<name>.<dialect>.up.sql`).
const POP_DIALECTS: [&str; 5] = ["postgres", "cockroach", "mysql", "sqlite3", "mariadb"];

/// True for pop's PostgreSQL file of a migration (`20200519101057000000_x.postgres.up.sql`). A
/// folder holding one is pop's: its migrations are those files, and the files without a
/// dialect (pop runs those on every database); the other databases' files are left alone.
fn is_pop_postgres(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    name.ends_with(".postgres.up.sql") || name.ends_with(".postgres.down.sql")
}

/// A pop migration's stem without its dialect, and the dialect (`1_x.mysql` → `1_x`, `mysql`);
/// `None` for a stem without one.
fn pop_dialect(stem: &str) -> Option<(&str, &str)> {
    let (rest, dialect) = stem.rsplit_once('.')?;
    POP_DIALECTS.contains(&dialect).then_some((rest, dialect))
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
    /// Made non-transactional by a marker, `metadata.toml` or (Flyway) a statement that needs
    /// it (the directive is checked later).
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

impl Migrations {
    /// Reads `<dir>` and its sub-folders, at every depth (up to 16 folders down), as Flyway
    /// scans them; a diesel migration is a direct sub-folder.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self, MigrateError> {
        let dir = dir.as_ref();
        let origin = dir.display().to_string();
        let unreadable = |path: &Path, e: std::io::Error| {
            MigrateError::source_file(path.display().to_string(), format!("cannot read it: {e}"))
        };
        let mut files = Vec::new();
        let mut consider = |rel: String, abs: &Path, regular: bool| -> Result<(), MigrateError> {
            // Read only what the parser will look at: it classifies again itself (so that
            // embedded files, all of which are handed over, go through the same rule) and
            // needs only the names of the others, to list the ignored `.sql` files.
            let contents = if classify(&rel).is_some() {
                // A FIFO would block the read forever, a device (a link to /dev/zero) never
                // end it. The folder's listing already says so of all but links.
                if !regular && std::fs::metadata(abs).is_ok_and(|m| !m.is_file()) {
                    return Err(MigrateError::source_file(
                        abs.display().to_string(),
                        "is not a regular file (a FIFO, a device or a socket, or a link to one), so it cannot be read as a migration\n  hint: put the migration's SQL in a plain file of that name",
                    ));
                }
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
        // Flyway scans its locations at every depth (`2024/q1/V2__b.sql`): so does svcdb.
        let root = std::fs::canonicalize(dir).map_err(|e| unreadable(dir, e))?;
        let mut found = Vec::new();
        walk(entries, "", &mut vec![root], &mut found)?;
        for (rel, path, regular) in found {
            consider(rel, &path, regular)?;
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

    /// Flyway's repeatable migrations (`R__<name>.sql`), by name: `up` runs each, after the
    /// versioned ones, whenever its file changed since it last ran.
    pub fn repeatables(&self) -> &[Repeatable] {
        &self.repeatables
    }

    /// The folder the migrations came from, as given.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The `.sql` files of the folder (and of its sub-folders, at every depth) that are not migrations,
    /// such as `notes.sql`, `seed.sql` or a Prisma `20240101000000_init/migration.sql`: paths
    /// relative to the folder, `/`-separated, sorted. Worth a warning: a folder named for a
    /// tool whose layout svcdb does not read would otherwise just look like no migrations.
    pub fn ignored(&self) -> &[String] {
        &self.ignored
    }

    pub(super) fn parse(origin: String, files: Vec<SourceFile<'_>>) -> Result<Self, MigrateError> {
        let display = |rel: &str| format!("{}/{rel}", origin.trim_end_matches('/'));
        let refuse = |file: &SourceFile<'_>, message: String| {
            MigrateError::source_file(display(&file.path), message)
        };
        let mut groups: BTreeMap<(String, Layout), Group<'_>> = BTreeMap::new();
        // Flyway undo scripts (and their names) by version, each taken by the `V` migration of
        // its version.
        let mut undo: BTreeMap<Version, (SourceFile<'_>, String)> = BTreeMap::new();
        let mut ignored = Vec::new();
        // Flyway's repeatable migrations, and the script config files of undo scripts and
        // repeatables, by version or name, until every file is seen.
        let mut repeatable_files: BTreeMap<String, SourceFile<'_>> = BTreeMap::new();
        let mut undo_configs: BTreeMap<Version, SourceFile<'_>> = BTreeMap::new();
        let mut repeatable_configs: BTreeMap<String, SourceFile<'_>> = BTreeMap::new();
        let pop = files.iter().any(|f| is_pop_postgres(&f.path));
        for file in files {
            let Some(class) = classify(&file.path) else {
                if file.path.to_ascii_lowercase().ends_with(".sql") {
                    ignored.push(file.path);
                }
                continue;
            };
            let (stem, layout, role) = match class {
                Class::Part { stem, layout, role } if pop && layout == Layout::Native => {
                    match pop_dialect(&stem) {
                        Some((stem, "postgres")) => (stem.to_owned(), layout, role),
                        Some(_) => continue,
                        None => (stem, layout, role),
                    }
                }
                Class::Part { stem, layout, role } => (stem, layout, role),
                Class::Refused(why) => return Err(refuse(&file, why)),
                Class::Repeatable { name } => {
                    if let Some(other) = repeatable_files.get(&name) {
                        let message = format!(
                            "the repeatable migration {name:?} is also {}; remove one of them",
                            display(&other.path)
                        );
                        return Err(refuse(&file, message));
                    }
                    repeatable_files.insert(name, file);
                    continue;
                }
                Class::RepeatableConfig { name } => {
                    if let Some(other) = repeatable_configs.get(&name) {
                        let message = format!(
                            "{} has the same name; remove one of them",
                            display(&other.path)
                        );
                        return Err(refuse(&file, message));
                    }
                    repeatable_configs.insert(name, file);
                    continue;
                }
                Class::UndoConfig { stem } => {
                    let (version, ..) =
                        parse_stem(&stem, Layout::Flyway).map_err(|m| refuse(&file, m))?;
                    if let Some(other) = undo_configs.get(&version) {
                        let message = format!("{} is the script config file of this version's undo script too; remove one of them", display(&other.path));
                        return Err(refuse(&file, message));
                    }
                    undo_configs.insert(version, file);
                    continue;
                }
                Class::Undo { stem } => {
                    let (version, name, _) =
                        parse_stem(&stem, Layout::Flyway).map_err(|m| refuse(&file, m))?;
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
            // pop runs a database's own file of a migration rather than the one for every
            // database.
            if let Some(other) = slot.as_ref().filter(|_| pop && layout == Layout::Native) {
                match (is_pop_postgres(&other.path), is_pop_postgres(&file.path)) {
                    (true, false) => continue,
                    (false, true) => {
                        *slot = Some(file);
                        continue;
                    }
                    // Two of one kind: refused below, as anywhere.
                    _ => {}
                }
            }
            // Flyway's files of one name in two folders (`2024/V2__b.sql`, `old/V2__b.sql`).
            if let Some(other) = slot {
                let message = format!(
                    "{} has the same name; remove one of them",
                    display(&other.path)
                );
                return Err(refuse(&file, message));
            }
            *slot = Some(file);
        }
        pair_downs_by_version(&mut groups);
        let mut list: Vec<Migration> = Vec::with_capacity(groups.len());
        let mut prefix_width = 0;
        // The order each migration's tool runs it in, by its up file's path.
        let mut rule_of: std::collections::HashMap<String, ToolOrder> = Default::default();
        let mut newest: Option<(Version, Newest)> = None;
        for ((stem, layout), group) in groups {
            let Some(up) = group.up else {
                // A metadata.toml alone does not make a folder a migration.
                if let Some(config) = group.metadata.filter(|_| layout == Layout::Flyway) {
                    return Err(refuse(&config, WITHOUT_SCRIPT.to_owned()));
                }
                // pop runs, on each database, the migrations that have an up file for it;
                // kratos ships PostgreSQL down scripts of versions whose up is only for other
                // databases (`…000002_requests.postgres.down.sql` beside the MySQL and SQLite
                // ups), which pop never runs on PostgreSQL either.
                if let Some(down) = group.down.filter(|_| !(pop && layout == Layout::Native)) {
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
            let (version, name, width) = parse_stem(&stem, layout).map_err(|m| refuse(&up, m))?;
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
                // Flyway marks nothing: it runs a script outside a transaction when one of
                // its statements needs that, the undo script apart from its migration.
                Layout::Flyway => {
                    let down = undo
                        .remove(&version)
                        .map(|(file, _)| down_file(&file))
                        .transpose()?;
                    let up_no_tx =
                        flyway_script(&text, &up_path, group.metadata.as_ref(), &refuse)?;
                    let down_no_tx = match &down {
                        Some(d) => {
                            flyway_script(&d.sql, &d.path, undo_configs.get(&version), &refuse)?
                        }
                        None => false,
                    };
                    if down.is_some() {
                        undo_configs.remove(&version);
                    }
                    Scripts {
                        up_no_tx,
                        down_no_tx,
                        ..Scripts::whole(text, down, false)
                    }
                }
                Layout::Native | Layout::Diesel => Scripts::whole(
                    text,
                    group.down.as_ref().map(down_file).transpose()?,
                    match &group.metadata {
                        Some(meta) => {
                            metadata_says_no_tx(&meta.contents).map_err(|m| refuse(meta, m))?
                        }
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
            // A down script without a statement (an empty file, comments only), or goose's
            // placeholder, undoes nothing: the migration is irreversible, and `down` refuses
            // it before touching anything. Except in pop's folders, where an empty down is
            // a down that has nothing to undo: popx runs it as a no-op, and ory's projects
            // ship many (kratos reverts a split migration in one of its files and leaves the
            // others' downs empty, found by a trial: `down` refused to pass them).
            let down = down.filter(|d| {
                (pop && layout == Layout::Native)
                    || (!split_statements(&d.sql).is_empty()
                        && !crate::migrate::template::is_goose_placeholder_down(&d.sql))
            });
            refuse_unrunnable(&up_sql, &up_path, up_line)?;
            if let Some(d) = &down {
                refuse_unrunnable(&d.sql, &d.path, d.line)?;
            }
            if newest.as_ref().is_none_or(|(v, _)| version > *v) {
                let dashed = stem.split_once('_').is_some_and(|(p, _)| p.contains('-'));
                // `V1_12_30__x.sql`: the file's own spelling, before `classify` made it `1.12.30`.
                let file = up.path.rsplit('/').next().unwrap_or_default();
                let underscored = layout == Layout::Flyway
                    && file.split("__").next().is_some_and(|v| v.contains('_'));
                let written = Newest {
                    layout,
                    markers,
                    dashed,
                    underscored,
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
            rule_of.insert(up_path.clone(), ToolOrder::of(layout, markers));
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
        let mut repeatables = Vec::with_capacity(repeatable_files.len());
        for (name, file) in repeatable_files {
            let config = repeatable_configs.remove(&name);
            repeatables.push(repeatable(&file, name, config.as_ref(), &display, &refuse)?);
        }
        if let Some(config) = undo_configs
            .into_values()
            .chain(repeatable_configs.into_values())
            .next()
        {
            return Err(refuse(&config, WITHOUT_SCRIPT.to_owned()));
        }
        if let Some((version, (file, name))) = undo.into_iter().next() {
            let message = format!(
                "a Flyway undo script without its migration: there is no `V{version}__<name>.sql` for it to undo\n  hint: add that migration, or remove this file; refinery's unversioned `U` migrations are not supported: to run it as a migration, rename it to `V{version}__{name}.sql`"
            );
            return Err(refuse(&file, message));
        }
        list.sort_by(|a, b| a.version.cmp(&b.version));
        if let Some(pair) = list.windows(2).find(|w| w[0].version == w[1].version) {
            let (a, b) = (&pair[0].version, &pair[1].version);
            // `0001` and `1`: written differently, one version to svcdb, whose history keys
            // on the number.
            let why = if a.as_str() == b.as_str() {
                String::new()
            } else if a.as_str().contains('.') || b.as_str().contains('.') {
                format!(" (written {b} and {a}, one version to svcdb as to Flyway: leading zeros and trailing `.0` parts do not count)")
            } else {
                format!(
                    " (written {b} and {a}, both the number {} to svcdb)",
                    b.number()
                )
            };
            // Found by a user trial on a golang-migrate folder holding a stray `0005_x.sql`.
            let one_file =
                |p: &str| p.ends_with(".sql") && !p.ends_with(".up.sql") && !p.ends_with("/up.sql");
            let stray = if one_file(&pair[0].path) != one_file(&pair[1].path) {
                "\n  hint: svcdb reads a `<version>_<name>.sql` as a one-file migration (sqlx, goose, dbmate), where golang-migrate and pop read only `.up.sql` and `.down.sql`: if that file is not a migration, move it out of the folder"
            } else {
                "; give one of them a new version"
            };
            return Err(MigrateError::source_file(
                &pair[1].path,
                format!(
                    "version {b} is used twice{why}, also by {}{stray}",
                    pair[0].path
                ),
            ));
        }
        // Distinct versions whose history keys would be one: in practice never (a dotted
        // version's key is 61 bits of a hash), but then the second could never be recorded.
        let mut keys: BTreeMap<i64, &Migration> = BTreeMap::new();
        for m in &list {
            if let Some(other) = keys.insert(m.version.key(), m) {
                return Err(MigrateError::source_file(
                    &m.path,
                    format!(
                        "versions {} and {} share the history table's key {}, so svcdb cannot record both; give one of them a new version",
                        other.version,
                        m.version,
                        m.version.key()
                    ),
                ));
            }
        }
        // The order the tools run them in (dbmate: by file name), where it differs from ours.
        let rules: Vec<ToolOrder> = list
            .iter()
            .map(|m| {
                rule_of
                    .get(&m.path)
                    .copied()
                    .unwrap_or(ToolOrder::Integer("svcdb"))
            })
            .collect();
        refuse_another_order(&list, &rules)?;
        ignored.sort();
        Ok(Self {
            repeatables,
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

/// How many folders down `from_dir` reads: Flyway scans every depth, and a deeper folder is
/// refused rather than skipped.
const MAX_DEPTH: usize = 16;

/// The files under a folder whose sorted `entries` are given, each as its path relative to the
/// migrations folder (`prefix` is the folder's, `/`-separated) and its own path: at every
/// depth, up to [`MAX_DEPTH`] folders down (a deeper folder is refused, not skipped), without
/// following a link back into a folder it is inside (`ancestors`, canonical, the migrations
/// folder first). Each file comes with whether the listing showed it a regular file.
///
/// The entry's type comes from the listing itself (`d_type`), so only a link costs a `stat`
/// and a `realpath`: a folder of 300 diesel migrations took 2 170 `statx` and 1 223
/// `readlink` calls, a third of the no-op `svcdb migrate up`'s system time.
fn walk(
    entries: Vec<std::fs::DirEntry>,
    prefix: &str,
    ancestors: &mut Vec<std::path::PathBuf>,
    out: &mut Vec<(String, std::path::PathBuf, bool)>,
) -> Result<(), MigrateError> {
    let unreadable = |path: &Path, e: std::io::Error| {
        MigrateError::source_file(path.display().to_string(), format!("cannot read it: {e}"))
    };
    for entry in entries {
        let rel = format!("{prefix}{}", entry.file_name().to_string_lossy());
        let path = entry.path();
        // Without a type from the listing (some file systems give none), as a link: asked.
        let listed = entry.file_type().ok().filter(|t| !t.is_symlink());
        let is_dir = match listed {
            Some(t) => t.is_dir(),
            None => path.is_dir(),
        };
        // A name that is not UTF-8 would be recorded with U+FFFD in place of its bytes, and
        // shown as a path no one can type (found by a user trial).
        if entry.file_name().to_str().is_none() && (is_dir || rel.ends_with(".sql")) {
            return Err(MigrateError::source_file(
                path.display().to_string(),
                "its name is not valid UTF-8, and svcdb records migration names as text\n  hint: rename it with letters UTF-8 can hold",
            ));
        }
        if !is_dir {
            let regular = listed.is_some_and(|t| t.is_file());
            out.push((rel, path, regular));
            continue;
        }
        // A folder listed as one (not a link) inside a canonical folder is canonical as it is.
        let real = match listed {
            Some(_) => ancestors[ancestors.len() - 1].join(entry.file_name()),
            None => std::fs::canonicalize(&path).map_err(|e| unreadable(&path, e))?,
        };
        // A link to a folder it is inside: its files are read once, not forever. A link out of
        // the migrations folder is not followed, as Flyway's scan does not follow links (found
        // by a user trial: `vendor -> /usr` walked /usr, and `--dir /proc/self` the whole
        // file system).
        if ancestors.contains(&real) || !real.starts_with(&ancestors[0]) {
            continue;
        }
        let inner = read_dir(&path).map_err(|e| unreadable(&path, e))?;
        if ancestors.len() > MAX_DEPTH {
            // Refused only for `.sql` files svcdb would otherwise skip unseen; a deep folder of
            // something else (documentation, assets) is none of its business (found by a user
            // trial: it failed every command, with a hint to move migrations it did not hold).
            let holds_sql = inner
                .iter()
                .any(|e| e.file_name().to_string_lossy().ends_with(".sql") && !e.path().is_dir());
            if holds_sql {
                return Err(MigrateError::source_file(
                    path.display().to_string(),
                    format!("is more than {MAX_DEPTH} folders down the migrations folder and holds .sql files, deeper than svcdb reads\n  hint: move its migrations up, or the folder out of the migrations folder"),
                ));
            }
            continue;
        }
        ancestors.push(real);
        walk(inner, &format!("{rel}/"), ancestors, out)?;
        ancestors.pop();
    }
    Ok(())
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

/// The file's text without a byte-order mark, refusing non-UTF-8. An empty file is fine: see
/// the module documentation for what an empty up or down script means.
/// What a Flyway script config file is refused for when its script is not in the folder.
const WITHOUT_SCRIPT: &str = "a Flyway script config file without its script (the same name without `.conf`); add the script or remove this file";

/// Whether a Flyway-layout script (`V`, `U` or `R`, at `path`) runs outside a transaction: as
/// its script config file (`config`, `V2__x.sql.conf`) says, else as Flyway decides from its
/// statements. Refuses a placeholder Flyway would replace in a string or function body, where
/// svcdb would run it as written: Flyway's own `${flyway:…}` (always defined, replaced unless
/// the script config file turns replacement off), and any `${…}` when the script config file
/// turns replacement on (outside strings, every `${` is refused for every layout).
fn flyway_script(
    sql: &str,
    path: &str,
    config: Option<&SourceFile<'_>>,
    refuse: &dyn Fn(&SourceFile<'_>, String) -> MigrateError,
) -> Result<bool, MigrateError> {
    let said = match config {
        Some(file) => script_config(&file.contents).map_err(|m| refuse(file, m))?,
        None => ScriptConfig::default(),
    };
    let replaced = match said.placeholder_replacement {
        Some(false) => None,
        Some(true) => flyway_placeholder_in_quoted(sql, false),
        None => flyway_placeholder_in_quoted(sql, true),
    };
    if let Some((at, placeholder)) = replaced {
        let line = 1 + sql[..at].matches('\n').count();
        let why = if said.placeholder_replacement == Some(true) {
            "its script config file says placeholderReplacement=true"
        } else {
            "Flyway defines its `${flyway:…}` placeholders always"
        };
        return Err(MigrateError::source_file(
            path,
            format!(
                "line {line}: {placeholder} is a Flyway placeholder, which Flyway replaces everywhere in the script, in strings and function bodies too ({why}), and svcdb does not substitute placeholders, so it would run as written\n  hint: write the value in its place: for ${{flyway:defaultSchema}}, the schema's name, or current_schema() (svcdb runs the script in the service's schema); for ${{flyway:user}}, current_user; or, where the text is meant literally, set placeholderReplacement=false in the script config file (`<script>.conf`), as Flyway reads it too"
            ),
        ));
    }
    Ok(match said.in_transaction {
        Some(in_transaction) => !in_transaction,
        None => runs_outside_a_transaction(sql),
    })
}

/// Flyway's `R__<name>.sql`: the script, with the same checks as a migration's, run outside a
/// transaction when its script config file says so, Flyway would run it so, or it starts with
/// the directive.
fn repeatable(
    file: &SourceFile<'_>,
    name: String,
    config: Option<&SourceFile<'_>>,
    display: &dyn Fn(&str) -> String,
    refuse: &dyn Fn(&SourceFile<'_>, String) -> MigrateError,
) -> Result<Repeatable, MigrateError> {
    let path = display(&file.path);
    let sql = script(file, display)?;
    refuse_unrunnable(&sql, &path, 1)?;
    let checksum = Checksum::of(&sql);
    let transactional =
        !(flyway_script(&sql, &path, config, refuse)? || has_no_transaction_directive(&sql));
    let sql = unwrap_transaction(sql, transactional, &path, 1)?;
    Ok(Repeatable {
        name,
        sql,
        checksum,
        transactional,
        path,
    })
}

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

#[cfg(test)]
mod tests {
    use super::super::test_support::{parse, source_error_path, v};
    use super::super::Migrations;
    use crate::migrate::error::MigrateError;

    #[test]
    fn native_layout_sorted_numerically_with_other_files_ignored() {
        let m = parse(&[
            ("10_ten.up.sql", b"SELECT 10;"),
            ("9_nine.up.sql", b"SELECT 9;"),
            ("9_nine.down.sql", b"SELECT -9;"),
            ("README.md", b"# not a migration"),
            ("notes.sql", b"SELECT 'loose file';"),
            ("docs/index.html", b"<p>not a migration</p>"),
        ])
        .unwrap();
        let versions: Vec<i64> = m.iter().map(|m| m.version.number()).collect();
        assert_eq!(versions, [9, 10]);
        let nine = m.get(&v(9)).unwrap();
        assert_eq!(nine.name, "nine");
        assert_eq!(nine.down.as_deref(), Some("SELECT -9;"));
        assert!(nine.transactional);
        assert!(nine.path.ends_with("9_nine.up.sql"), "{}", nine.path);
        assert_eq!(
            m.get(&v(10)).unwrap().down,
            None,
            "an up without a down is allowed"
        );
        assert_eq!(m.latest().unwrap().version.number(), 10);
    }

    /// Found by a trial on ory kratos's folder: pop writes 20-digit versions and a file per
    /// database.
    #[test]
    fn a_pop_folder_is_read_as_its_postgres_files_and_those_for_every_database() {
        let m = parse(&[
            (
                "20150100000001000000_networks.postgres.up.sql",
                b"CREATE TABLE networks (id uuid);",
            ),
            (
                "20150100000001000000_networks.postgres.down.sql",
                b"DROP TABLE networks;",
            ),
            (
                "20150100000001000000_networks.mysql.up.sql",
                b"CREATE TABLE networks (id char(36));",
            ),
            (
                "20150100000001000000_networks.sqlite3.up.sql",
                b"CREATE TABLE networks (id TEXT);",
            ),
            (
                "20150100000001000000_networks.cockroach.up.sql",
                b"CREATE TABLE networks (id UUID);",
            ),
            (
                "20191100000001000000_identities.up.sql",
                b"CREATE TABLE identities (id uuid);",
            ),
            ("20200519101057000000_x.postgres.up.sql", b"SELECT 1;"),
            ("20200519101057000000_x.mysql.up.sql", b"SELECT 2;"),
            // As kratos ships them: a PostgreSQL down of a version whose ups are for others.
            (
                "20191100000002000002_requests.postgres.down.sql",
                b"SELECT 3;",
            ),
            ("20191100000002000002_requests.mysql.up.sql", b"SELECT 3;"),
            // A file for every database beside PostgreSQL's own: pop runs the latter.
            ("20200519101057000000_x.up.sql", b"SELECT 4;"),
            ("20210410175418000000_y.up.sql", b"SELECT 5;"),
            ("20210410175418000000_y.postgres.up.sql", b"SELECT 6;"),
        ])
        .unwrap();
        let read: Vec<(&str, &str)> = m
            .iter()
            .map(|m| (m.version.as_str(), m.name.as_str()))
            .collect();
        assert_eq!(
            read,
            [
                ("20150100000001000000", "networks"),
                ("20191100000001000000", "identities"),
                ("20200519101057000000", "x"),
                ("20210410175418000000", "y")
            ]
        );
        let ups: Vec<&str> = m.iter().skip(2).map(|m| m.up.as_str()).collect();
        assert_eq!(ups, ["SELECT 1;", "SELECT 6;"]);
        let networks = m.iter().next().unwrap();
        assert_eq!(networks.up, "CREATE TABLE networks (id uuid);");
        assert_eq!(networks.down.as_deref(), Some("DROP TABLE networks;"));
        assert!(m.ignored().is_empty(), "{:?}", m.ignored());

        // Without a PostgreSQL file, a dot in a name is only a dot.
        let plain = parse(&[("1_a.mysql.up.sql", b"SELECT 1;")]).unwrap();
        assert_eq!(plain.iter().next().unwrap().name, "a.mysql");
    }

    #[test]
    fn version_digits_and_names_with_spaces() {
        let m = parse(&[
            ("20261124093000_create the table.up.sql", b"SELECT 1;"),
            ("0001_first_one.up.sql", b"SELECT 1;"),
            ("2017-09-23-182408_diesel style/up.sql", b"SELECT 1;"),
        ])
        .unwrap();
        assert_eq!(m.get(&v(20261124093000)).unwrap().name, "create the table");
        assert_eq!(
            m.get(&v(1)).unwrap().name,
            "first_one",
            "the name is everything after the first `_`"
        );
        assert_eq!(m.get(&v(20170923182408)).unwrap().name, "diesel style");
    }

    #[test]
    fn no_transaction_directive_and_bom() {
        let m = parse(&[
            (
                "1_a.up.sql",
                b"\xef\xbb\xbf-- svcdb:no-transaction\r\nCREATE INDEX CONCURRENTLY i ON t (a);",
            ),
            ("1_a.down.sql", b"DROP INDEX i;"),
        ])
        .unwrap();
        let a = m.get(&v(1)).unwrap();
        assert!(!a.transactional);
        assert!(a.down_transactional, "the down has no directive of its own");
        assert!(
            a.up.starts_with("-- svcdb"),
            "the BOM is stripped from the script"
        );
    }

    #[test]
    fn crlf_only_change_keeps_the_checksum() {
        let lf = parse(&[("1_a.up.sql", b"CREATE TABLE a (id int);\nSELECT 1;\n")]).unwrap();
        let crlf = parse(&[("1_a.up.sql", b"CREATE TABLE a (id int);\r\nSELECT 1;\r\n")]).unwrap();
        let edited = parse(&[("1_a.up.sql", b"CREATE TABLE a (id bigint);\nSELECT 1;\n")]).unwrap();
        assert_eq!(
            lf.get(&v(1)).unwrap().checksum,
            crlf.get(&v(1)).unwrap().checksum
        );
        assert_ne!(
            lf.get(&v(1)).unwrap().checksum,
            edited.get(&v(1)).unwrap().checksum
        );
    }

    #[test]
    fn two_migrations_with_one_version() {
        let path = source_error_path(&[
            ("0001_a.up.sql", b"SELECT 1;"),
            ("1_b.up.sql", b"SELECT 1;"),
        ]);
        assert!(
            path.ends_with("1_b.up.sql") || path.ends_with("0001_a.up.sql"),
            "{path}"
        );
        // Across layouts too.
        let path = source_error_path(&[("1_a.up.sql", b"SELECT 1;"), ("1_a/up.sql", b"SELECT 1;")]);
        assert!(path.contains("1_a"), "{path}");
        let path = source_error_path(&[
            ("0001_a.sql", b"SELECT 1;"),
            ("0001_a.up.sql", b"SELECT 1;"),
        ]);
        assert!(path.contains("0001_a."), "{path}");
        let path = source_error_path(&[("V1__a.sql", b"SELECT 1;"), ("1_b.sql", b"SELECT 1;")]);
        assert!(
            path.ends_with("V1__a.sql") || path.ends_with("1_b.sql"),
            "{path}"
        );
    }

    #[test]
    fn an_empty_down_makes_the_migration_irreversible_instead_of_refusing_the_folder() {
        // Every layout's down, empty or comments only, is no down; the up is untouched.
        for files in [
            &[("1_a.up.sql", &b"SELECT 1;"[..]), ("1_a.down.sql", b"")][..],
            &[("1_a.up.sql", b"SELECT 1;"), ("1_a.down.sql", b" \n\t\n")],
            &[
                ("1_a/up.sql", b"SELECT 1;"),
                ("1_a/down.sql", b"\xef\xbb\xbf"),
            ],
            &[
                ("1_a/up.sql", b"SELECT 1;"),
                (
                    "1_a/down.sql",
                    b"-- This file should undo anything in `up.sql`\n/* nothing */\n",
                ),
            ],
            &[("V1__a.sql", b"SELECT 1;"), ("U1__a.sql", b"-- no undo\n")],
            &[("1_a.sql", b"-- +goose Up\nSELECT 1;\n-- +goose Down\n")],
        ] {
            let m = parse(files).unwrap_or_else(|e| panic!("{files:?}: {e}"));
            let a = m.get(&v(1)).unwrap();
            assert_eq!(a.down, None, "{files:?}");
            assert_eq!(a.down_path, None, "{files:?}");
            assert_eq!(a.up.trim(), "SELECT 1;", "{files:?}");
        }
    }

    #[test]
    fn an_empty_up_is_a_no_op_migration() {
        for files in [
            &[("1_a.up.sql", &b""[..])][..],
            &[("1_a.up.sql", b" \n\t\n"), ("1_a.down.sql", b"SELECT 1;")],
            &[("1_a/up.sql", b"\xef\xbb\xbf-- nothing yet\n")],
            &[("1_a.sql", b"-- +goose Up\n\n-- +goose Down\nSELECT 1;\n")],
            &[("V1__a.sql", b"")],
        ] {
            let m = parse(files).unwrap_or_else(|e| panic!("{files:?}: {e}"));
            let a = m.get(&v(1)).unwrap();
            assert!(
                crate::migrate::split::split_statements(&a.up).is_empty(),
                "{files:?}"
            );
            assert!(a.transactional, "{files:?}");
        }
    }

    #[test]
    fn non_utf8_files() {
        assert!(source_error_path(&[("1_a.up.sql", b"SELECT '\xff';")]).ends_with("1_a.up.sql"));
        assert!(
            source_error_path(&[("1_a/up.sql", b"SELECT 1;"), ("1_a/metadata.toml", b"\xff")])
                .ends_with("metadata.toml")
        );
    }

    #[test]
    fn down_without_up() {
        assert!(source_error_path(&[("1_a.down.sql", b"SELECT 1;")]).ends_with("1_a.down.sql"));
        // Another name of a version that has a down already is not taken.
        assert!(source_error_path(&[
            ("1_a.up.sql", b"SELECT 1;"),
            ("1_a.down.sql", b"SELECT 2;"),
            ("1_b.down.sql", b"SELECT 3;"),
        ])
        .ends_with("1_b.down.sql"));
        assert!(source_error_path(&[("1_a/down.sql", b"SELECT 1;")]).ends_with("1_a/down.sql"));
        // A folder holding only metadata.toml is not a migration.
        assert!(
            parse(&[("1_a/metadata.toml", b"run_in_transaction = false")])
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn a_down_named_otherwise_goes_with_the_up_of_its_version_as_golang_migrate_pairs_them() {
        // rudder-server's folder: each side of versions 2 and 3 named for what it does.
        let m = parse(&[
            (
                "000002_create_col_counters.up.sql",
                b"CREATE TABLE c (a int);",
            ),
            ("000002_del_col_counters.down.sql", b"DROP TABLE c;"),
            ("000003_add_columns.up.sql", b"ALTER TABLE c ADD b int;"),
            ("000003_remove_columns.down.sql", b"ALTER TABLE c DROP b;"),
        ])
        .unwrap();
        let two = m.get(&v(2)).unwrap();
        assert_eq!(two.name, "create_col_counters", "the up file names it");
        assert_eq!(two.down.as_deref(), Some("DROP TABLE c;"));
        assert!(two
            .down_path
            .as_deref()
            .is_some_and(|p| p.ends_with("000002_del_col_counters.down.sql")));
        assert_eq!(
            m.get(&v(3)).unwrap().down.as_deref(),
            Some("ALTER TABLE c DROP b;")
        );
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn missing_folder_is_a_source_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = Migrations::from_dir(dir.path().join("nope")).unwrap_err();
        assert!(
            matches!(err, MigrateError::Source { ref path, .. } if path.ends_with("nope")),
            "{err}"
        );
    }

    #[test]
    fn ignored_sql_files_are_listed() {
        let m = parse(&[
            ("0001_a.up.sql", b"SELECT 1;"),
            ("0002_b.sql", b"SELECT 2;"),
            ("V3__c.sql", b"SELECT 3;"),
            ("2017-09-23-182408_d/up.sql", b"SELECT 4;"),
            ("notes.sql", b"SELECT 'notes';"),
            ("seed.sql", b"INSERT INTO a VALUES (1);"),
            ("schema.sql", b"CREATE TABLE a (id int);"),
            (
                "20240101000000_init/migration.sql",
                b"CREATE TABLE p (id int);",
            ),
            ("README.md", b"# not SQL"),
        ])
        .unwrap();
        assert_eq!(m.len(), 4);
        assert_eq!(
            m.ignored(),
            [
                "20240101000000_init/migration.sql",
                "notes.sql",
                "schema.sql",
                "seed.sql"
            ]
        );
    }

    #[test]
    fn flyway_versioned_migrations_with_an_undo() {
        let m = parse(&[
            ("V1__init.sql", b"CREATE TABLE a (id int);"),
            ("V2__create_b.sql", b"CREATE TABLE b (id int);"),
            ("U2__create_b.sql", b"DROP TABLE b;"),
            ("v3__lower_case.sql", b"SELECT 3;"),
        ])
        .unwrap();
        let versions: Vec<i64> = m.iter().map(|m| m.version.number()).collect();
        assert_eq!(versions, [1, 2, 3]);
        let b = m.get(&v(2)).unwrap();
        assert_eq!(b.name, "create_b");
        assert_eq!(b.down.as_deref(), Some("DROP TABLE b;"));
        assert!(b.path.ends_with("V2__create_b.sql"), "{}", b.path);
        assert!(b
            .down_path
            .as_deref()
            .unwrap()
            .ends_with("U2__create_b.sql"));
        assert_eq!(m.get(&v(1)).unwrap().down, None);
        assert_eq!(m.get(&v(3)).unwrap().name, "lower_case");
    }

    #[test]
    fn a_flyway_folder_with_dotted_versions_runs_in_flyways_order() {
        let m = parse(&[
            ("V1__init.sql", b"SELECT 1;"),
            ("V1.10__ten.sql", b"SELECT 110;"),
            ("V1_2__two.sql", b"SELECT 12;"),
            ("V1.1__one.sql", b"SELECT 11;"),
            ("U1_1__one.sql", b"SELECT -11;"),
            ("V2__next.sql", b"SELECT 2;"),
            ("V11__eleven.sql", b"SELECT 11;"),
        ])
        .unwrap();
        let texts: Vec<&str> = m.iter().map(|m| m.version.as_str()).collect();
        assert_eq!(texts, ["1", "1.1", "1.2", "1.10", "2", "11"]);
        let one = m.get(&"1.1".parse().unwrap()).unwrap();
        assert_eq!(one.down.as_deref(), Some("SELECT -11;"));
        // One version written two ways, as Flyway would refuse it too.
        let path = source_error_path(&[
            ("V1.1__a.sql", b"SELECT 1;"),
            ("V1_1_0__b.sql", b"SELECT 2;"),
        ]);
        assert!(
            path.ends_with("V1.1__a.sql") || path.ends_with("V1_1_0__b.sql"),
            "{path}"
        );
    }

    #[test]
    fn a_flyway_script_flyway_runs_outside_a_transaction_is_non_transactional_unmarked() {
        let m = parse(&[
            ("V1__t.sql", b"CREATE TABLE t (a int);"),
            ("V2__index.sql", b"CREATE INDEX CONCURRENTLY t_a ON t (a);"),
            ("U2__index.sql", b"DROP INDEX CONCURRENTLY t_a;"),
            ("V3__enum.sql", b"CREATE TYPE mood AS ENUM ('ok');"),
            ("U3__enum.sql", b"DROP TYPE mood;"),
        ])
        .unwrap();
        let modes: Vec<(bool, bool)> = m
            .iter()
            .map(|m| (m.transactional, m.down_transactional))
            .collect();
        assert_eq!(modes, [(true, true), (false, false), (true, true)]);
        // The control: the same index in svcdb's own layout is transactional until marked.
        let native = parse(&[(
            "0002_index.up.sql",
            b"CREATE INDEX CONCURRENTLY t_a ON t (a);",
        )])
        .unwrap();
        assert!(native.get(&v(2)).unwrap().transactional);
    }

    #[test]
    fn flyway_script_config_files_set_the_transaction_mode_over_flyways_detection() {
        let m = parse(&[
            ("V1__t.sql", b"CREATE TABLE t (a int);"),
            ("V2__backfill.sql", b"UPDATE t SET a = 1;"),
            ("V2__backfill.sql.conf", b"executeInTransaction=false\n"),
            ("U2__backfill.sql", b"UPDATE t SET a = NULL;"),
            ("U2__backfill.sql.conf", b"executeInTransaction=false"),
            ("V3__index.sql", b"CREATE INDEX CONCURRENTLY t_a ON t (a);"),
            ("V3__index.sql.conf", b"executeInTransaction=true"),
            (
                "R__views.sql",
                b"CREATE OR REPLACE VIEW v AS SELECT a FROM t;",
            ),
            ("R__views.sql.conf", b"executeInTransaction=false"),
            ("release_2/V4__b.sql", b"CREATE TABLE b (a int);"),
            ("release_2/V4__b.sql.conf", b"executeInTransaction=false"),
        ])
        .unwrap();
        let modes: Vec<(bool, bool)> = m
            .iter()
            .map(|m| (m.transactional, m.down_transactional))
            .collect();
        assert_eq!(
            modes,
            [(true, true), (false, false), (true, true), (false, true)]
        );
        assert!(!m.repeatables()[0].transactional);
        // What svcdb would not honour is refused, naming the file; so is a config without
        // its script.
        for files in [
            [
                ("V1__t.sql", &b"SELECT 1;"[..]),
                ("V1__t.sql.conf", b"shouldExecute=false"),
            ],
            [
                ("V1__t.sql", b"SELECT 1;"),
                ("V2__gone.sql.conf", b"executeInTransaction=false"),
            ],
            [
                ("V1__t.sql", b"SELECT 1;"),
                ("U1__t.sql.conf", b"executeInTransaction=false"),
            ],
        ] {
            let path = source_error_path(&files);
            assert!(path.ends_with(".sql.conf"), "{path}");
        }
    }

    #[test]
    fn flyway_files_in_sub_folders_are_read_as_flyway_reads_them() {
        let m = parse(&[
            ("V1__init.sql", b"CREATE TABLE t (a int);"),
            ("release_2/V2__b.sql", b"CREATE TABLE b (a int);"),
            ("release_2/U2__b.sql", b"DROP TABLE b;"),
            (
                "common/R__views.sql",
                b"CREATE OR REPLACE VIEW v AS SELECT a FROM t;",
            ),
            ("release_2/notes.sql", b"SELECT 1;"),
        ])
        .unwrap();
        let b = m.get(&v(2)).unwrap();
        assert!(b.path.ends_with("release_2/V2__b.sql"), "{}", b.path);
        assert_eq!(b.down.as_deref(), Some("DROP TABLE b;"));
        assert_eq!(m.repeatables()[0].name, "views");
        assert_eq!(m.ignored(), ["release_2/notes.sql"]);
        // Two files of one version in different folders: refused, as Flyway refuses them.
        let path =
            source_error_path(&[("V2__a.sql", b"SELECT 1;"), ("r2/V2__b.sql", b"SELECT 2;")]);
        assert!(path.contains("V2__"), "{path}");
    }

    #[test]
    fn flyway_files_at_every_depth_are_read_as_flyway_scans_them() {
        let m = parse(&[
            ("V1__a.sql", b"CREATE TABLE a (x int);"),
            ("2024/V3__c.sql", b"CREATE TABLE c (x int);"),
            ("2024/q1/V2__b.sql", b"CREATE TABLE b (x int);"),
            ("2024/q1/U2__b.sql", b"DROP TABLE b;"),
            ("2024/q1/V2__b.sql.conf", b"executeInTransaction=false\n"),
            ("a/b/c/d/R__views.sql", b"CREATE VIEW v AS SELECT 1;"),
            ("2024/q1/notes.sql", b"SELECT 1;"),
            ("2024/q1/up.sql", b"SELECT 1;"),
        ])
        .unwrap();
        let versions: Vec<_> = m.iter().map(|m| m.version.number()).collect();
        assert_eq!(versions, [1, 2, 3]);
        let b = m.get(&v(2)).unwrap();
        assert!(b.path.ends_with("2024/q1/V2__b.sql"), "{}", b.path);
        assert_eq!(b.down.as_deref(), Some("DROP TABLE b;"));
        assert!(!b.transactional, "its script config file is read");
        assert_eq!(m.repeatables()[0].name, "views");
        // Only Flyway's files count below the top; diesel's `up.sql` is a direct sub-folder's.
        assert_eq!(m.ignored(), ["2024/q1/notes.sql", "2024/q1/up.sql"]);
        // One name in two folders: refused, not one of them dropped.
        let path = source_error_path(&[
            ("2024/V2__b.sql", b"SELECT 1;"),
            ("old/x/V2__b.sql", b"SELECT 2;"),
        ]);
        assert!(path.ends_with("V2__b.sql"), "{path}");
    }

    #[test]
    fn a_diesel_folder_is_read_one_sub_folder_down_as_before() {
        let m = parse(&[
            ("2024-01-01-000000_a/up.sql", b"CREATE TABLE a (x int);"),
            ("2024-01-01-000000_a/down.sql", b"DROP TABLE a;"),
            (
                "2024-01-01-000000_a/metadata.toml",
                b"run_in_transaction = false\n",
            ),
            ("2024-02-01-000000_b/up.sql", b"CREATE TABLE b (x int);"),
            ("2024-02-01-000000_b/extra/up.sql", b"SELECT 1;"),
        ])
        .unwrap();
        assert_eq!(m.len(), 2);
        let a = m.iter().next().unwrap();
        assert_eq!(a.down.as_deref(), Some("DROP TABLE a;"));
        assert!(!a.transactional);
        assert_eq!(m.ignored(), ["2024-02-01-000000_b/extra/up.sql"]);
    }

    #[test]
    fn a_link_back_up_the_folder_is_not_followed_and_too_deep_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        super::super::test_support::write(dir.path(), &[("a/V1__a.sql", b"SELECT 1;")]);
        std::os::unix::fs::symlink(dir.path(), dir.path().join("a/loop")).unwrap();
        let m = Migrations::from_dir(dir.path()).unwrap();
        assert_eq!(m.len(), 1);
        let deep = format!("{}/V1__a.sql", ["d"; super::MAX_DEPTH + 1].join("/"));
        let dir = tempfile::tempdir().unwrap();
        super::super::test_support::write(dir.path(), &[(&deep, b"SELECT 1;")]);
        match Migrations::from_dir(dir.path()) {
            Err(MigrateError::Source { message, .. }) => {
                assert!(message.contains("folders down"), "{message}")
            }
            other => panic!("expected a source error, got {other:?}"),
        }
        let ok = format!("{}/V1__a.sql", ["d"; super::MAX_DEPTH].join("/"));
        let dir = tempfile::tempdir().unwrap();
        super::super::test_support::write(dir.path(), &[(&ok, b"SELECT 1;")]);
        assert_eq!(Migrations::from_dir(dir.path()).unwrap().len(), 1);
    }

    /// Found by a user trial: a migration named with a byte that is not UTF-8 (`caf\xe9`) was
    /// recorded as `caf\u{FFFD}`. Refused, naming the file; another file so named (not a
    /// migration) is left alone (the control).
    #[test]
    fn a_migration_whose_name_is_not_utf8_is_refused() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        super::super::test_support::write(dir.path(), &[("0001_a.up.sql", b"SELECT 1;")]);
        let odd = |suffix: &[u8]| {
            let mut name = b"0002_caf\xe9".to_vec();
            name.extend_from_slice(suffix);
            dir.path().join(std::ffi::OsStr::from_bytes(&name))
        };
        std::fs::write(odd(b".txt"), b"notes").unwrap();
        assert_eq!(Migrations::from_dir(dir.path()).unwrap().len(), 1);
        std::fs::write(odd(b".up.sql"), b"SELECT 2;").unwrap();
        match Migrations::from_dir(dir.path()) {
            Err(MigrateError::Source { path, .. }) => assert!(path.contains("0002_caf"), "{path}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    /// Found by a user trial: a link to a folder outside the migrations folder was followed
    /// (`vendor -> /usr` walked /usr), and a deep folder holding no `.sql` refused every
    /// command. The link is not followed; the deep folder is passed over.
    #[test]
    fn a_link_out_of_the_folder_is_not_followed_and_a_deep_folder_without_sql_is_passed_over() {
        let outside = tempfile::tempdir().unwrap();
        super::super::test_support::write(outside.path(), &[("V9__elsewhere.sql", b"SELECT 9;")]);
        let dir = tempfile::tempdir().unwrap();
        let deep = format!("docs/{}/notes.md", ["d"; super::MAX_DEPTH + 1].join("/"));
        super::super::test_support::write(
            dir.path(),
            &[("V1__a.sql", b"SELECT 1;"), (&deep, b"# notes")],
        );
        std::os::unix::fs::symlink(outside.path(), dir.path().join("vendor")).unwrap();
        let m = Migrations::from_dir(dir.path()).unwrap();
        let versions: Vec<_> = m.iter().map(|m| m.version.number()).collect();
        assert_eq!(versions, [1], "the linked V9 is not read");
        // The control: the same folder, copied in rather than linked, is read.
        super::super::test_support::write(
            dir.path(),
            &[("copied/V9__elsewhere.sql", b"SELECT 9;")],
        );
        assert_eq!(Migrations::from_dir(dir.path()).unwrap().len(), 2);
    }

    /// The message of a `Source` error, and the path it names.
    fn source_error(files: &[(&str, &[u8])]) -> (String, String) {
        match parse(files) {
            Err(MigrateError::Source { path, message }) => (path, message),
            other => panic!("expected a source error, got {other:?}"),
        }
    }

    #[test]
    fn flyways_own_placeholders_are_refused_in_strings_and_bodies_of_flyway_scripts() {
        let body: &[u8] = b"CREATE TABLE t (a int);\nCREATE FUNCTION f() RETURNS int AS $$\nSELECT count(*)::int FROM ${flyway:defaultSchema}.t\n$$ LANGUAGE sql;\n";
        for files in [
            &[("V1__f.sql", body)][..],
            &[("V1__t.sql", b"SELECT 1;"), ("U1__t.sql", body)],
            &[("R__f.sql", body)],
            &[("sub/dir/V1__f.sql", body)],
        ] {
            let (path, message) = source_error(files);
            assert!(path.ends_with(files.last().unwrap().0), "{path}");
            assert!(
                message.starts_with("line 3: ${flyway:defaultSchema} is a Flyway placeholder"),
                "{message}"
            );
            assert!(message.contains("current_schema()"), "{message}");
        }
        let (_, message) =
            source_error(&[("V1__g.sql", b"GRANT SELECT ON t TO \"${flyway:user}\";")]);
        assert!(message.starts_with("line 1: ${flyway:user}"), "{message}");
        // A user's placeholder in a string is left alone (the project may turn replacement
        // off), as are Flyway's in a comment and in another tool's file.
        let m = parse(&[
            (
                "V1__a.sql",
                b"SELECT '${schema}', $$ ${x} $$; -- ${flyway:user}",
            ),
            ("0002_b.sql", b"SELECT '${flyway:defaultSchema}';"),
        ])
        .unwrap();
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn a_script_config_file_says_whether_flyway_replaces_placeholders() {
        let quoted: &[u8] = b"SELECT '${flyway:defaultSchema}', $$ ${schema} $$;";
        // Off: Flyway runs the text as written, as svcdb does.
        let m = parse(&[
            ("V1__a.sql", quoted),
            ("V1__a.sql.conf", b"placeholderReplacement=false\n"),
            ("R__r.sql", quoted),
            (
                "R__r.sql.conf",
                b"placeholderReplacement=false\nexecuteInTransaction=false\n",
            ),
        ])
        .unwrap();
        assert_eq!(
            m.get(&v(1)).unwrap().up,
            std::str::from_utf8(quoted).unwrap()
        );
        assert!(!m.repeatables()[0].transactional);
        // On: every `${…}` is Flyway's to replace, a user's in a body too.
        let (path, message) = source_error(&[
            ("V1__a.sql", b"SELECT 1;\nSELECT $$ ${schema} $$;"),
            ("V1__a.sql.conf", b"placeholderReplacement=true"),
        ]);
        assert!(path.ends_with("V1__a.sql"), "{path}");
        assert!(message.starts_with("line 2: ${schema}"), "{message}");
        assert!(message.contains("placeholderReplacement=true"), "{message}");
        // On, without a placeholder: nothing to replace.
        let m = parse(&[
            ("V1__a.sql", b"SELECT '$1', $$ x $$;"),
            ("V1__a.sql.conf", b"placeholderReplacement=true"),
        ])
        .unwrap();
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn flyway_repeatables_are_read_apart_from_the_versions_in_name_order() {
        let m = parse(&[
            ("V1__t.sql", b"CREATE TABLE t (a int);"),
            (
                "R__views.sql",
                b"CREATE OR REPLACE VIEW v AS SELECT a FROM t;",
            ),
            ("R__a_grants.sql", b"GRANT SELECT ON t TO PUBLIC;"),
            (
                "R__index.sql",
                b"CREATE INDEX CONCURRENTLY IF NOT EXISTS t_a ON t (a);",
            ),
        ])
        .unwrap();
        assert_eq!(m.len(), 1);
        let repeatables: Vec<(&str, bool)> = m
            .repeatables()
            .iter()
            .map(|r| (r.name.as_str(), r.transactional))
            .collect();
        assert_eq!(
            repeatables,
            [("a_grants", true), ("index", false), ("views", true)]
        );
        // One name twice (Flyway's `R` in either case).
        let path = source_error_path(&[("R__v.sql", b"SELECT 1;"), ("r__v.sql", b"SELECT 2;")]);
        assert!(path.ends_with("__v.sql"), "{path}");
        // The same checks as a migration's script.
        let path = source_error_path(&[("R__v.sql", b"CREATE VIEW ${schema}.v AS SELECT 1;")]);
        assert!(path.ends_with("R__v.sql"), "{path}");
    }

    #[test]
    fn lemmys_two_zero_versions_are_two_migrations_in_diesels_order() {
        // diesel compares versions as text: Lemmy's `000000000000000` runs right after
        // diesel's `00000000000000`, before the timestamps.
        let m = parse(&[
            ("2019-02-26-002946_create_user/up.sql", b"SELECT 3;"),
            ("000000000000000_forbid_diesel_cli/up.sql", b"SELECT 2;"),
            ("00000000000000_diesel_initial_setup/up.sql", b"SELECT 1;"),
        ])
        .unwrap();
        let names: Vec<&str> = m.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            ["diesel_initial_setup", "forbid_diesel_cli", "create_user"]
        );
        // The control: `0` and `00000000000000` are one version, refused twice.
        let path = source_error_path(&[
            ("00000000000000_diesel_initial_setup/up.sql", b"SELECT 1;"),
            ("0_zero/up.sql", b"SELECT 2;"),
        ]);
        assert!(
            path.contains("_diesel_initial_setup/up.sql") || path.contains("0_zero"),
            "{path}"
        );
        // `0001` and `1`: two_migrations_with_one_version.
    }

    #[test]
    fn a_flyway_file_without_a_description_is_read_as_flyway_reads_it() {
        // hmcts/nfdiv-case-api names its Flyway migrations `V0001.sql`, `V0002.sql`, …
        let m = parse(&[
            ("V0001.sql", b"CREATE TABLE a (id int);"),
            ("V0002.sql", b"CREATE TABLE b (id int);"),
            ("U0002.sql", b"DROP TABLE b;"),
            ("V0003__named.sql", b"SELECT 3;"),
        ])
        .unwrap();
        let versions: Vec<i64> = m.iter().map(|m| m.version.number()).collect();
        assert_eq!(versions, [1, 2, 3]);
        assert_eq!(m.get(&v(1)).unwrap().name, "");
        assert_eq!(m.get(&v(2)).unwrap().down.as_deref(), Some("DROP TABLE b;"));
        assert_eq!(m.get(&v(3)).unwrap().name, "named");
    }

    #[test]
    fn flyway_undo_without_its_migration() {
        assert!(source_error_path(&[("U3__x.sql", b"DROP TABLE x;")]).ends_with("U3__x.sql"));
        // The `V` must be there: another layout's migration of that version does not count.
        let path = source_error_path(&[
            ("0003_x.up.sql", b"CREATE TABLE x (id int);"),
            ("U3__x.sql", b"DROP TABLE x;"),
        ]);
        assert!(path.ends_with("U3__x.sql"), "{path}");
    }
}
