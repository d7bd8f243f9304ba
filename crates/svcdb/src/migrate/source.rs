//! Where migrations come from: a folder read at run time or files embedded at compile time,
//! in the native layout or diesel's, parsed by one code path.
//!
//! | layout | up | down (optional) | transaction mode |
//! |---|---|---|---|
//! | native (also golang-migrate, sqlx reversible) | `<version>_<name>.up.sql` | `<version>_<name>.down.sql` | first line `-- svcdb:no-transaction` |
//! | diesel | `<version>_<name>/up.sql` | `<version>_<name>/down.sql` | `metadata.toml`: `run_in_transaction = false`, or the directive |
//!
//! Anything else (a README, a loose `notes.sql`, hidden files) is ignored.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::error::MigrateError;
use super::migration::{has_no_transaction_directive, strip_bom, Checksum, Migration};

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

/// A parsed, validated set of migrations, sorted by version.
#[derive(Debug, Clone)]
pub struct Migrations {
    /// Sorted by version, versions unique.
    list: Vec<Migration>,
    /// The folder (or embedded folder) they came from, for messages.
    origin: String,
    /// The widest digit prefix among the file names, so [`new_migration`] can keep `0001` style.
    prefix_width: usize,
}

/// A file handed to the parser: path relative to the source folder and its bytes.
struct SourceFile<'a> {
    path: String,
    contents: Cow<'a, [u8]>,
}

/// What a file is to a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Up,
    Down,
    Metadata,
}

/// The files of one migration, before validation.
#[derive(Default)]
struct Group<'a> {
    up: Option<SourceFile<'a>>,
    down: Option<SourceFile<'a>>,
    metadata: Option<SourceFile<'a>>,
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
            // Read only what the parser will look at; it classifies again itself, so that
            // embedded files (all of which are handed over) go through the same rule.
            if classify(&rel).is_some() {
                let contents = std::fs::read(abs).map_err(|e| unreadable(abs, e))?;
                files.push(SourceFile {
                    path: rel,
                    contents: Cow::Owned(contents),
                });
            }
            Ok(())
        };
        for entry in read_dir(dir).map_err(|e| unreadable(dir, e))? {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if path.is_dir() {
                for inner in read_dir(&path).map_err(|e| unreadable(&path, e))? {
                    let inner_name = inner.file_name().to_string_lossy().into_owned();
                    consider(format!("{name}/{inner_name}"), &inner.path())?;
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

    /// The migration with this version.
    pub fn get(&self, version: i64) -> Option<&Migration> {
        self.list
            .binary_search_by_key(&version, |m| m.version)
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

    fn parse(origin: String, files: Vec<SourceFile<'_>>) -> Result<Self, MigrateError> {
        let display = |rel: &str| format!("{}/{rel}", origin.trim_end_matches('/'));
        // Keyed by (stem, is_diesel): `1_a.up.sql` and `1_a/up.sql` are two migrations (and
        // then a duplicate version), not one.
        let mut groups: BTreeMap<(String, bool), Group<'_>> = BTreeMap::new();
        for file in files {
            let Some((stem, role, diesel)) = classify(&file.path) else {
                continue;
            };
            let group = groups.entry((stem.to_owned(), diesel)).or_default();
            let slot = match role {
                Role::Up => &mut group.up,
                Role::Down => &mut group.down,
                Role::Metadata => &mut group.metadata,
            };
            *slot = Some(file);
        }
        let mut list: Vec<Migration> = Vec::with_capacity(groups.len());
        let mut prefix_width = 0;
        for ((stem, _), group) in groups {
            let Some(up) = group.up else {
                // A metadata.toml alone does not make a folder a migration.
                if let Some(down) = group.down {
                    return Err(MigrateError::source_file(
                        display(&down.path),
                        "a down script without an up script; add the up script or remove this file",
                    ));
                }
                continue;
            };
            let (version, name, width) =
                parse_stem(&stem).map_err(|m| MigrateError::source_file(display(&up.path), m))?;
            prefix_width = prefix_width.max(width);
            let up_sql = script(&up, &display)?;
            let down_sql = group
                .down
                .as_ref()
                .map(|d| script(d, &display))
                .transpose()?;
            let metadata_says_no_tx = match &group.metadata {
                Some(meta) => {
                    let text = std::str::from_utf8(&meta.contents).map_err(|_| {
                        MigrateError::source_file(display(&meta.path), "is not valid UTF-8")
                    })?;
                    let parsed: Metadata = toml::from_str(text).map_err(|e| {
                        MigrateError::source_file(
                            display(&meta.path),
                            format!("is not valid TOML: {e}"),
                        )
                    })?;
                    parsed.run_in_transaction == Some(false)
                }
                None => false,
            };
            list.push(Migration {
                version,
                name: name.to_owned(),
                checksum: Checksum::of(&up_sql),
                transactional: !(metadata_says_no_tx || has_no_transaction_directive(&up_sql)),
                down_transactional: !(metadata_says_no_tx
                    || down_sql
                        .as_deref()
                        .is_some_and(has_no_transaction_directive)),
                up: strip_bom(&up_sql).to_owned(),
                down: down_sql.map(|d| strip_bom(&d).to_owned()),
                path: display(&up.path),
            });
        }
        list.sort_by_key(|m| m.version);
        if let Some(pair) = list.windows(2).find(|w| w[0].version == w[1].version) {
            return Err(MigrateError::source_file(
                &pair[1].path,
                format!(
                    "version {} is used twice, also by {}; give one of them a new version",
                    pair[1].version, pair[0].path
                ),
            ));
        }
        Ok(Self {
            list,
            origin,
            prefix_width,
        })
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

/// `(stem, role, is_diesel)` for a path that belongs to a migration; `None` for other files.
fn classify(rel: &str) -> Option<(&str, Role, bool)> {
    match rel.split_once('/') {
        None => {
            if let Some(stem) = rel.strip_suffix(".up.sql") {
                Some((stem, Role::Up, false))
            } else {
                rel.strip_suffix(".down.sql")
                    .map(|stem| (stem, Role::Down, false))
            }
        }
        Some((dir, file)) if !dir.starts_with('.') => {
            let role = match file {
                "up.sql" => Role::Up,
                "down.sql" => Role::Down,
                "metadata.toml" => Role::Metadata,
                _ => return None,
            };
            Some((dir, role, true))
        }
        Some(_) => None,
    }
}

/// `(version, name, digit count)` from `<version>_<name>`, or what is wrong with it.
fn parse_stem(stem: &str) -> Result<(i64, &str, usize), String> {
    const EXPECTED: &str =
        "expected `<version>_<name>`, e.g. `0001_create_users.up.sql` or `20261124093000_create_users/up.sql`";
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
    let digits: String = prefix.chars().filter(char::is_ascii_digit).collect();
    let version = digits
        .parse::<i64>()
        .map_err(|_| format!("version {digits} is too large (at most 19 digits)"))?;
    Ok((version, name, digits.len()))
}

/// The file's text, refusing non-UTF-8 and empty files.
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
    if strip_bom(&text).trim().is_empty() {
        return Err(MigrateError::source_file(
            display(&file.path),
            "is empty; write the migration's SQL (a comment is enough for a no-op) or remove the file",
        ));
    }
    Ok(text)
}

/// The files [`new_migration`] created.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NewMigration {
    /// The version chosen.
    pub version: i64,
    /// The up script.
    pub up_path: PathBuf,
    /// The down script.
    pub down_path: PathBuf,
}

/// Creates `<version>_<name>.up.sql` and `.down.sql` in `dir` (created if missing).
///
/// The version is the UTC time as `YYYYMMDDHHMMSS`, or, when the folder already numbers its
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
    let latest = existing.latest().map(|m| m.version);
    let prefix = match latest {
        Some(v) if v < SEQUENTIAL_LIMIT => {
            format!("{:0width$}", v + 1, width = existing.prefix_width)
        }
        _ => {
            let now: i64 = chrono::Utc::now()
                .format("%Y%m%d%H%M%S")
                .to_string()
                .parse()
                .expect("a 14-digit timestamp fits in i64");
            latest.map_or(now, |v| now.max(v + 1)).to_string()
        }
    };
    let version = prefix.parse().expect("digits only");
    let up_path = dir.join(format!("{prefix}_{name}.up.sql"));
    let down_path = dir.join(format!("{prefix}_{name}.down.sql"));
    for (path, body) in [
        (&up_path, format!("-- {prefix} {name}: the change.\n")),
        (
            &down_path,
            format!("-- {prefix} {name}: undo the change.\n"),
        ),
    ] {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, body.as_bytes()))
            .map_err(|e| {
                MigrateError::source_file(
                    path.display().to_string(),
                    format!("cannot create it: {e}"),
                )
            })?;
    }
    Ok(NewMigration {
        version,
        up_path,
        down_path,
    })
}
