//! Writing a new migration in the layout of the folder's newest one.

use std::path::{Path, PathBuf};

use super::names::{classify, Class, Layout, Tool};
use super::read::{Migrations, Newest};
use crate::migrate::error::MigrateError;
use crate::migrate::template::{down_placeholder, up_placeholder};
use crate::migrate::version::Version;

/// Versions below this are "small sequential numbers" (`0001`), as opposed to timestamps,
/// when [`new_migration`] picks the next version.
const SEQUENTIAL_LIMIT: i64 = 100_000_000;

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

/// Whether `name` can name a migration's files ([`new_migration`]): what is wrong with it if
/// not. Non-empty, without surrounding spaces, control characters (which would break every
/// listing of the folder) or a character some file systems refuse (`/ \\ : * ? " < > |`).
pub fn check_migration_name(name: &str) -> Result<(), String> {
    if name.trim().is_empty()
        || name.contains(['/', '\\', ':', '*', '?', '"', '<', '>', '|'])
        || name.chars().any(char::is_control)
        || name.trim() != name
    {
        return Err(format!("{name:?} cannot be a migration name: it must be non-empty, without surrounding spaces, control characters or any of / \\ : * ? \" < > |"));
    }
    // `x.up` would make `<version>_x.up.sql`, read back as the up script of a two-file
    // migration `x` (found by a user trial, in a one-file folder).
    let lower = name.to_ascii_lowercase();
    if lower.ends_with(".up") || lower.ends_with(".down") || lower.ends_with(".sql") {
        return Err(format!("{name:?} cannot be a migration name: ending in .up, .down or .sql, its file would be read as another kind of migration file; leave the ending out"));
    }
    // A file name holds at most 255 bytes on the usual file systems; a short version, the
    // separators and `.down.sql` take about 15 (found by a user trial: a 250-character name
    // failed when the file was written, as a folder error).
    if name.len() > MAX_NAME_BYTES {
        return Err(format!(
            "a migration name of {} bytes is too long to name its files: at most {MAX_NAME_BYTES}",
            name.len()
        ));
    }
    Ok(())
}

/// The longest migration name [`check_migration_name`] takes, in bytes.
const MAX_NAME_BYTES: usize = 240;

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
    check_migration_name(name).map_err(|why| MigrateError::source_file(shown.clone(), why))?;
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
        underscored: false,
    });
    // The integer after a version that is not a timestamp; none after the largest a version
    // can be (found by a user trial: the sum wrapped to a negative "version").
    let next = |v: &Version| {
        let next = if v.is_timestamp() {
            v.number().checked_add(1)
        } else {
            v.major().checked_add(1)
        };
        next.ok_or_else(|| {
            MigrateError::source_file(
                &shown,
                format!("cannot pick the next version: the newest, {v}, is the largest a version can be\n  hint: renumber the folder's versions, or write the new migration's files by hand"),
            )
        })
    };
    let prefix = match existing.latest().map(|m| &m.version) {
        // Flyway's `1.12.30` is followed by `1.12.31`, written as the folder writes it.
        Some(v) if v.as_str().contains('.') => {
            let (head, last) = v.as_str().rsplit_once('.').unwrap_or(("", v.as_str()));
            let next = last.parse::<u64>().unwrap_or(0).saturating_add(1);
            let text = format!("{head}.{next:0width$}", width = last.len());
            if newest.underscored {
                text.replace('.', "_")
            } else {
                text
            }
        }
        Some(v) if !v.is_timestamp() && v.major() < SEQUENTIAL_LIMIT => {
            format!("{:0width$}", next(v)?, width = existing.prefix_width)
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
                // Not a timestamp, or one the calendar does not know (`20260231…`), or one
                // whose next second is past the year 9999 (no longer 14 digits): the next
                // integer.
                Some(v)
                    if digits.parse::<Version>().is_ok_and(|new| new <= *v)
                        || digits.len() != 14 =>
                {
                    next(v)?.to_string()
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
                // As wide as the newest (pop's 20 digits, `…000000`): the tools that compare
                // versions as integers would otherwise run a narrower one first, and reading
                // the folder refuses that.
                Some(v) => {
                    let width = v.digits().count();
                    format!("{digits:0<width$}")
                }
                None => digits,
            }
        }
    };
    // Flyway's `1_12_10` is the version `1.12.10`.
    let version: Version = prefix.replace('_', ".").parse().map_err(
        |e: crate::migrate::version::ParseVersionError| {
            MigrateError::source_file(&shown, format!("cannot pick the next version: {e}"))
        },
    )?;
    let stem = format!("{prefix}_{name}");
    let up = up_placeholder(&prefix, name);
    let undo = down_placeholder(&prefix, name);
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
    // Most file systems take names of up to 255 bytes: checked before anything is created.
    if let Some(long) = files
        .iter()
        .flat_map(|(rel, _)| rel.split('/'))
        .find(|part| part.len() > NAME_MAX)
    {
        return Err(MigrateError::source_file(
            shown,
            format!("{name:?} is too long for a migration name: the file name {long} would be {} bytes, and file systems allow {NAME_MAX}\n  hint: choose a shorter name", long.len()),
        ));
    }
    let mut created: Vec<std::path::PathBuf> = Vec::with_capacity(files.len());
    for (rel, body) in files {
        let path = dir.join(&rel);
        let parent = path.parent().expect("a file in `dir`");
        let made_parent = !parent.exists();
        let written = std::fs::create_dir_all(parent)
            .and_then(|()| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)
            })
            .and_then(|mut f| std::io::Write::write_all(&mut f, body.as_bytes()));
        if let Err(e) = written {
            // Nothing half-made stays behind: the files created before this one go, and a
            // folder made for them (diesel's `<version>_<name>/`).
            for file in &created {
                let _ = std::fs::remove_file(file);
            }
            if made_parent || rel.contains('/') {
                let _ = std::fs::remove_dir(parent);
            }
            return Err(MigrateError::source_file(
                path.display().to_string(),
                format!("cannot create it: {e}; nothing was created"),
            ));
        }
        created.push(path);
    }
    let mut created = created.into_iter();
    Ok(NewMigration {
        version,
        up_path: created.next().expect("every layout creates the up file"),
        down_path: created.next(),
    })
}

/// The longest file name most file systems take, in bytes (`NAME_MAX` on Linux and macOS).
const NAME_MAX: usize = 255;

#[cfg(test)]
mod tests {
    use super::super::new_migration;
    use super::super::test_support::{v, write, GOOSE};
    use super::super::Migrations;
    use crate::migrate::error::MigrateError;

    #[test]
    fn new_migration_uses_timestamps_or_continues_sequential_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let fresh = dir.path().join("fresh");
        let created = new_migration(&fresh, "create users").unwrap();
        assert!(
            created.version.number() >= 20260101000000
                && created.version.number() < 100000000000000,
            "{}",
            created.version.number()
        );
        let (up, Some(down)) = (&created.up_path, &created.down_path) else {
            panic!("{created:?}")
        };
        assert!(up.ends_with(format!("{}_create users.up.sql", created.version)));
        assert!(down.ends_with(format!("{}_create users.down.sql", created.version)));
        assert!(up.is_file() && down.is_file());
        // A second one in the same second still gets a higher version.
        let second = new_migration(&fresh, "second").unwrap();
        assert!(second.version > created.version);
        assert_eq!(
            Migrations::from_dir(&fresh).unwrap().len(),
            2,
            "new files parse"
        );

        let seq = dir.path().join("seq");
        write(
            &seq,
            &[
                ("0001_a.up.sql", b"SELECT 1;"),
                ("0002_b.up.sql", b"SELECT 1;"),
            ],
        );
        let next = new_migration(&seq, "c").unwrap();
        assert_eq!(next.version.number(), 3);
        assert!(next.up_path.ends_with("0003_c.up.sql"), "{next:?}");

        assert!(matches!(
            new_migration(&seq, "a/b"),
            Err(MigrateError::Source { .. })
        ));
        assert!(matches!(
            new_migration(&seq, " "),
            Err(MigrateError::Source { .. })
        ));
        // Found by a robustness trial: a 243-byte name created the up file, then failed on
        // the down file's longer name and left the up file behind. Now nothing is created.
        for bad in ["a\nb", "a:b", "a*", &"y".repeat(243)] {
            assert!(
                matches!(new_migration(&seq, bad), Err(MigrateError::Source { .. })),
                "{bad}"
            );
        }
        let mut names: Vec<String> = std::fs::read_dir(&seq)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "0001_a.up.sql",
                "0002_b.up.sql",
                "0003_c.down.sql",
                "0003_c.up.sql"
            ]
        );
        // The control: the longest name that fits is taken.
        assert!(new_migration(&seq, &"y".repeat(240)).is_ok());
    }

    /// A folder holding `files`, and what `new_migration` created in it, relative to it.
    fn new_in(files: &[(&str, &[u8])], name: &str) -> (tempfile::TempDir, Vec<String>) {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), files);
        let created = new_migration(dir.path(), name).unwrap();
        let rel = created
            .files()
            .map(|f| {
                let rel = f.strip_prefix(dir.path()).unwrap();
                rel.to_str().unwrap().replace('\\', "/")
            })
            .collect();
        (dir, rel)
    }

    /// The text of the file `rel` of `dir`.
    fn read(dir: &tempfile::TempDir, rel: &str) -> String {
        std::fs::read_to_string(dir.path().join(rel)).unwrap()
    }

    /// A pop folder's versions are 20 digits: a 14-digit one after them would run before
    /// them by integers, and the folder would be refused.
    #[test]
    fn new_migration_after_wider_versions_is_as_wide() {
        let (dir, files) = new_in(
            &[
                ("20200519101057000000_a.postgres.up.sql", b"SELECT 1;"),
                ("20200519101057000000_a.mysql.up.sql", b"SELECT 1;"),
            ],
            "b",
        );
        let version = files[0].split_once('_').unwrap().0;
        assert_eq!(version.len(), 20, "{files:?}");
        assert!(version.ends_with("000000"), "{files:?}");
        let m = Migrations::from_dir(dir.path()).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m.latest().unwrap().name, "b");
    }

    #[test]
    fn new_migration_in_a_diesel_folder_keeps_its_folders_and_dashes() {
        let (dir, files) = new_in(
            &[("2017-09-23-182408_create_users/up.sql", b"SELECT 1;")],
            "add_email",
        );
        let [up, down] = &files[..] else {
            panic!("{files:?}")
        };
        let stem = up.strip_suffix("/up.sql").unwrap();
        assert_eq!(down, &format!("{stem}/down.sql"));
        // `YYYY-MM-DD-HHMMSS_add_email`, as diesel writes it.
        let (version, name) = stem.split_once('_').unwrap();
        assert_eq!(name, "add_email");
        assert_eq!(
            version
                .match_indices('-')
                .map(|(i, _)| i)
                .collect::<Vec<_>>(),
            [4, 7, 10],
            "{stem}"
        );
        let m = Migrations::from_dir(dir.path()).unwrap();
        assert_eq!(m.latest().unwrap().name, "add_email");
        assert!(
            m.latest().unwrap().down.is_none(),
            "the placeholder down is a comment: no down until its SQL is written"
        );

        // Without dashes in the folder's names, none in the new one.
        let (_dir, files) = new_in(&[("20240101000000_a/up.sql", b"SELECT 1;")], "b");
        assert!(
            files[0].chars().take(14).all(|c| c.is_ascii_digit()),
            "{files:?}"
        );
    }

    #[test]
    fn new_migration_in_a_goose_folder_writes_one_file_with_both_sections() {
        let (dir, files) = new_in(&[("00001_a.sql", GOOSE.as_bytes())], "b");
        assert_eq!(files, ["00002_b.sql"]);
        let text = read(&dir, "00002_b.sql");
        assert!(text.starts_with("-- +goose Up\n"), "{text}");
        assert!(text.contains("\n-- +goose Down\n"), "{text}");
        let m = Migrations::from_dir(dir.path()).unwrap();
        let b = m.get(&v(2)).unwrap();
        assert_eq!(b.up_line, 2);
        assert_eq!(b.down, None, "the down section holds only a comment");
    }

    #[test]
    fn new_migration_in_a_dbmate_folder_writes_dbmate_markers() {
        let (dir, files) = new_in(
            &[(
                "20240101000000_a.sql",
                b"-- migrate:up\nCREATE TABLE a (id int);\n-- migrate:down\nDROP TABLE a;\n",
            )],
            "b",
        );
        let [file] = &files[..] else {
            panic!("{files:?}")
        };
        assert!(
            file.ends_with("_b.sql") && !file.ends_with(".up.sql"),
            "{file}"
        );
        let text = read(&dir, file);
        assert!(text.starts_with("-- migrate:up\n"), "{text}");
        assert!(text.contains("\n-- migrate:down\n"), "{text}");
        assert_eq!(Migrations::from_dir(dir.path()).unwrap().len(), 2);
    }

    /// Found by a user trial: after the largest version there is, the next one wrapped to a
    /// negative number (a panic in a build with overflow checks, as this test's), and after
    /// the last second of 9999 the clock gave `+10000…`; the first is refused, the second
    /// takes the next integer.
    #[test]
    fn new_migration_at_the_top_of_the_versions_is_refused_or_takes_the_next_integer() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            &[(
                "9223372036854775807_max.up.sql",
                b"CREATE TABLE a (id int);",
            )],
        );
        match new_migration(dir.path(), "after") {
            Err(MigrateError::Source { .. }) => {}
            other => panic!("expected a refusal, got {other:?}"),
        }
        let (_dir, files) = new_in(
            &[("99991231235959_x.up.sql", b"CREATE TABLE a (id int);")],
            "after",
        );
        assert!(
            files.iter().all(|f| f.starts_with("99991231235960_after")),
            "{files:?}"
        );
    }

    #[test]
    fn new_migration_in_an_sqlx_folder_writes_one_plain_file() {
        let (dir, files) = new_in(&[("0001_a.sql", b"CREATE TABLE a (id int);")], "b");
        assert_eq!(files, ["0002_b.sql"]);
        let text = read(&dir, "0002_b.sql");
        assert!(
            !text.contains("goose") && !text.contains("migrate:"),
            "{text}"
        );
        let m = Migrations::from_dir(dir.path()).unwrap();
        assert_eq!((m.len(), m.get(&v(2)).unwrap().down.as_deref()), (2, None));
    }

    #[test]
    fn new_migration_in_a_flyway_folder_writes_a_versioned_file() {
        let (dir, files) = new_in(
            &[("V1__init.sql", b"SELECT 1;"), ("V2__b.sql", b"SELECT 2;")],
            "add_c",
        );
        assert_eq!(files, ["V3__add_c.sql"]);
        assert_eq!(
            Migrations::from_dir(dir.path())
                .unwrap()
                .get(&v(3))
                .unwrap()
                .name,
            "add_c"
        );
    }

    #[test]
    fn new_migration_after_a_dotted_flyway_version_counts_on_its_last_part() {
        let (_dir, files) = new_in(
            &[
                ("V1__init.sql", b"SELECT 1;"),
                ("V1_12_09__b.sql", b"SELECT 2;"),
            ],
            "add_c",
        );
        // Not `V11210__` (its digits plus one): the next version as the folder writes them.
        assert_eq!(files, ["V1_12_10__add_c.sql"]);
        let (dir, files) = new_in(&[("V1.1__a.sql", b"SELECT 1;")], "b");
        assert_eq!(files, ["V1.2__b.sql"]);
        let m = Migrations::from_dir(dir.path()).unwrap();
        assert_eq!(m.latest().unwrap().name, "b");
    }

    #[test]
    fn new_migration_follows_the_newest_migration_when_layouts_mix() {
        let goose_then_native = [
            ("0001_a.sql", GOOSE.as_bytes()),
            ("0002_b.up.sql", b"SELECT 2;"),
        ];
        let (_dir, files) = new_in(&goose_then_native, "c");
        assert_eq!(files, ["0003_c.up.sql", "0003_c.down.sql"]);
        let native_then_goose = [
            ("0001_a.up.sql", b"SELECT 1;" as &[u8]),
            ("0002_b.sql", GOOSE.as_bytes()),
        ];
        let (_dir, files) = new_in(&native_then_goose, "c");
        assert_eq!(files, ["0003_c.sql"]);

        // A name that would make the one file read as a native `.up.sql` is refused.
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &native_then_goose);
        assert!(matches!(
            new_migration(dir.path(), "c.up"),
            Err(MigrateError::Source { .. })
        ));
        assert_eq!(Migrations::from_dir(dir.path()).unwrap().len(), 2);
    }
}
