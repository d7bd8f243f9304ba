//! What a file's name says: which layout it belongs to, whether it is an up or down script
//! (or diesel's metadata), and its version and name.

use crate::migrate::version::Version;

/// How a migration's files are laid out. Part of the grouping key, so that `1_a.up.sql`,
/// `1_a/up.sql` and `1_a.sql` are three migrations (and then a duplicate version), not one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Layout {
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
pub(super) enum Tool {
    Goose,
    Dbmate,
}

/// What a file is to its migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    /// The up script (for [`Layout::OneFile`], the whole file, cut at its markers later).
    Up,
    Down,
    Metadata,
}

/// What a file is, from its name alone.
pub(super) enum Class {
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
    /// Flyway's repeatable `R__<name>.sql`.
    Repeatable { name: String },
    /// Flyway's script config file of an undo script, `U<version>__<name>.sql.conf`.
    UndoConfig { stem: String },
    /// Flyway's script config file of a repeatable migration, `R__<name>.sql.conf`.
    RepeatableConfig { name: String },
    /// A migration file svcdb cannot use: what is wrong and what to do.
    Refused(String),
}

/// Why a pop `.fizz` migration is refused.
const FIZZ: &str = "is a pop fizz migration, which svcdb cannot run (fizz is pop's own language, which pop turns into each database's SQL)\n  hint: write its PostgreSQL as a file of the same name ending in `.postgres.up.sql` (or `.down.sql`) instead, holding the SQL pop runs for it on PostgreSQL, then remove the fizz file";

/// What the file at `rel` is to a migration; `None` for other files.
pub(super) fn classify(rel: &str) -> Option<Class> {
    let part = |stem: &str, layout, role| {
        Some(Class::Part {
            stem: stem.to_owned(),
            layout,
            role,
        })
    };
    match rel.split_once('/') {
        // pop's own migration language: skipped, the folder would run without it.
        None if rel.ends_with(".up.fizz") || rel.ends_with(".down.fizz") => {
            Some(Class::Refused(FIZZ.to_owned()))
        }
        None => {
            // Flyway's script config file (`V2__x.sql.conf`) goes with its script.
            if let Some(script) = rel.strip_suffix(".conf").filter(|s| s.ends_with(".sql")) {
                return match classify(script)? {
                    Class::Part {
                        stem,
                        layout: Layout::Flyway,
                        ..
                    } => part(&stem, Layout::Flyway, Role::Metadata),
                    Class::Undo { stem } => Some(Class::UndoConfig { stem }),
                    Class::Repeatable { name } => Some(Class::RepeatableConfig { name }),
                    _ => None,
                };
            }
            if let Some(stem) = rel.strip_suffix(".up.sql") {
                return part(stem, Layout::Native, Role::Up);
            }
            if let Some(stem) = rel.strip_suffix(".down.sql") {
                return part(stem, Layout::Native, Role::Down);
            }
            if let Some(stem) = rel.strip_suffix(".go").filter(|s| !s.ends_with("_test")) {
                return parse_stem(stem, Layout::OneFile).is_ok().then(|| {
                    Class::Refused(format!(
                        "a goose Go migration, which svcdb cannot run: running the SQL migrations around it would skip its step\n  hint: port it to SQL as {stem}.sql (`-- +goose Up`, its statements, `-- +goose Down`, theirs: goose runs that file too), or keep the migrations folder svcdb reads free of it once every database has applied it"
                    ))
                });
            }
            // refinery names them `V<version>__<name>.rs`.
            if let Some(stem) = rel.strip_suffix(".rs").filter(|s| s.contains("__")) {
                return matches!(flyway_like(stem), Some(Class::Part { .. })).then(|| {
                    Class::Refused(format!(
                        "a refinery Rust migration, which svcdb cannot run: running the SQL migrations around it would skip its step\n  hint: port it to SQL as {stem}.sql (the SQL its `migration()` function returns), or keep the migrations folder svcdb reads free of it once every database has applied it"
                    ))
                });
            }
            let stem = rel.strip_suffix(".sql")?;
            let mut chars = stem.chars();
            match (chars.next()?, chars.next()) {
                (c, _) if c.is_ascii_digit() => part(stem, Layout::OneFile, Role::Up),
                ('V' | 'v' | 'U' | 'u', Some(_)) => flyway_like(stem),
                ('R' | 'r', Some('_')) if stem[1..].starts_with("__") => {
                    let name = &stem[3..];
                    Some(if name.trim().is_empty() {
                        Class::Refused(
                            "the name after `R__` is empty; expected `R__<name>.sql`, e.g. `R__views.sql`".to_owned(),
                        )
                    } else {
                        Class::Repeatable {
                            name: name.to_owned(),
                        }
                    })
                }
                _ => None,
            }
        }
        Some((dir, file)) if !dir.starts_with('.') => {
            let role = match file {
                "up.sql" => Role::Up,
                "down.sql" => Role::Down,
                "metadata.toml" => Role::Metadata,
                // Flyway finds its files in sub-folders too (`release_2/V7__x.sql`).
                _ => {
                    return classify(file).filter(|class| {
                        matches!(
                            class,
                            Class::Part {
                                layout: Layout::Flyway,
                                ..
                            } | Class::Undo { .. }
                                | Class::Repeatable { .. }
                                | Class::UndoConfig { .. }
                                | Class::RepeatableConfig { .. }
                        )
                    })
                }
            };
            part(dir, Layout::Diesel, role)
        }
        Some(_) => None,
    }
}

/// Where the down script of the migration whose up script is at `up_path` (from line
/// `up_line`) goes, in the layout [`classify`] reads from its name: `0003_x.up.sql` →
/// `0003_x.down.sql`, diesel's `…/up.sql` → `…/down.sql`, Flyway's `V3__x.sql` → `U3__x.sql`;
/// a goose or dbmate file (its up script starting after a marker line) holds it in a section
/// of its own; sqlx's one-way `0003_x.sql` becomes reversible as `0003_x.up.sql` beside a
/// `0003_x.down.sql`.
pub(crate) fn down_script_place(up_path: &str, up_line: usize) -> String {
    let (folder, file) = match up_path.rsplit_once('/') {
        Some((folder, file)) => (format!("{folder}/"), file),
        None => (String::new(), up_path),
    };
    if file == "up.sql" {
        return format!("{folder}down.sql");
    }
    match classify(file) {
        Some(Class::Part {
            stem,
            layout: Layout::Native,
            ..
        }) => format!("{folder}{stem}.down.sql"),
        // Flyway's `V` (any case) is one ASCII byte.
        Some(Class::Part {
            layout: Layout::Flyway,
            ..
        }) => format!("{folder}U{}", &file[1..]),
        _ if up_line > 1 => {
            format!("the down section of {up_path} (after `-- +goose Down` or `-- migrate:down`)")
        }
        _ => {
            let stem = file.strip_suffix(".sql").unwrap_or(file);
            format!("{folder}{stem}.down.sql, after renaming {file} to {stem}.up.sql (a one-way `.sql` has no down)")
        }
    }
}

/// What a Flyway-style stem (`V<version>__<name>` or `U<version>__<name>`, any case) is, if it
/// has a digit after the letter.
fn flyway_like(stem: &str) -> Option<Class> {
    let mut chars = stem.chars();
    match (chars.next()?, chars.next()?) {
        ('V' | 'v' | 'U' | 'u', c) if c.is_ascii_digit() => Some(flyway(stem)),
        _ => None,
    }
}

/// A Flyway-style stem: `V<version>__<name>` or `U<version>__<name>`, any case, with a digit
/// after the letter.
fn flyway(stem: &str) -> Class {
    let (letter, rest) = stem.split_at(1);
    let letter = letter.to_ascii_uppercase();
    let expected =
        format!("expected `{letter}<version>__<name>.sql`, e.g. `{letter}2__create_users.sql`");
    // Flyway reads `_` in a version as `.` (`V1_1__x.sql` is version 1.1).
    let integer = |version: &str| version.chars().all(|c| c.is_ascii_digit() || c == '.');
    let (version, name) = match rest.split_once("__") {
        // Flyway reads `V0001.sql` as version 0001 with an empty description.
        None if integer(&rest.replace('_', ".")) => (rest, ""),
        None => {
            // Found by a trial on openremote's folder: Flyway, unless `validateMigrationNaming`
            // is on, skips such a file without running it, so renaming it runs a script the
            // schema never ran.
            return Class::Refused(format!(
                "a Flyway-style name needs two underscores between the version and the name; {expected}\n  hint: Flyway (unless its validateMigrationNaming is on) skips a file named so, without running it: if Flyway migrated this schema, it never ran this file, so move the file out of the folder to leave it out; renamed `{letter}<version>__<name>.sql`, it runs as a migration"
            ));
        }
        Some((version, _)) if !integer(&version.replace('_', ".")) => {
            return Class::Refused(format!(
                "cannot read a version from the name: {version:?} is not a number; {expected}"
            ))
        }
        Some((_, name)) if name.trim().is_empty() => {
            return Class::Refused(format!("the name after the version is empty; {expected}"))
        }
        Some(parts) => parts,
    };
    let stem = format!("{}_{name}", version.replace('_', "."));
    if letter == "U" {
        Class::Undo { stem }
    } else {
        Class::Part {
            stem,
            layout: Layout::Flyway,
            role: Role::Up,
        }
    }
}

/// `(version, name, digit count)` from `<version>_<name>` of a file in `layout`, or what is
/// wrong with it. Only Flyway's versions may be dotted (`1.1`; [`classify`] turned its `1_1`
/// into that) and have an empty name (`V0001.sql`); their digit count is the first part's.
pub(super) fn parse_stem(stem: &str, layout: Layout) -> Result<(Version, &str, usize), String> {
    let flyway = layout == Layout::Flyway;
    const EXPECTED: &str =
        "expected `<version>_<name>`, e.g. `0001_create_users.up.sql`, `20261124093000_create_users.sql` or `20261124093000_create_users/up.sql`";
    let Some((prefix, name)) = stem.split_once('_') else {
        return Err(format!(
            "cannot read a version from the name: no `_` after the version; {EXPECTED}"
        ));
    };
    if prefix.is_empty()
        || !prefix
            .chars()
            .all(|c| c.is_ascii_digit() || c == '-' || (flyway && c == '.'))
        || !prefix.chars().any(|c| c.is_ascii_digit())
    {
        return Err(format!(
            "cannot read a version from the name: {prefix:?} is not a number (digits, optionally separated by `-`); {EXPECTED}"
        ));
    }
    if !flyway && name.trim().is_empty() {
        return Err(format!("the name after the version is empty; {EXPECTED}"));
    }
    let version: Version = prefix
        .parse()
        .map_err(|e: crate::migrate::version::ParseVersionError| e.to_string())?;
    let first = prefix.split('.').next().unwrap_or(prefix);
    let width = first.chars().filter(char::is_ascii_digit).count();
    Ok((version, name, width))
}

#[cfg(test)]
mod tests {
    use super::super::test_support::source_error_path;

    #[test]
    fn unparseable_names() {
        for bad in [
            "v1_init.up.sql",
            "0001.up.sql",
            "0001_.up.sql",
            "12a_x.up.sql",
            "V1.99999999999999999999__huge.sql",
            "_x.up.sql",
            "0001.sql",
            "12a_x.sql",
            "V1_init.sql",
            "V1a__x.sql",
            "V2__.sql",
            "20150100000001000000_networks.up.fizz",
        ] {
            let path = source_error_path(&[(bad, b"SELECT 1;")]);
            assert!(path.ends_with(bad), "{bad}: {path}");
        }
        let path = source_error_path(&[("latest/up.sql", b"SELECT 1;")]);
        assert!(path.ends_with("latest/up.sql"), "{path}");
    }

    /// Found by a trial on openremote's folder: a Flyway name with one underscore, which
    /// Flyway skipped, was refused with no hint, and renaming it as asked runs it.
    #[test]
    fn a_flyway_name_with_one_underscore_says_flyway_skipped_it() {
        let err =
            super::super::test_support::parse(&[("V20221219_HelperFunctions.sql", b"SELECT 1;")])
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("hint: Flyway") && err.contains("never ran this file"),
            "{err}"
        );
    }

    #[test]
    fn the_down_script_goes_where_each_layout_keeps_it() {
        for (up, down) in [
            ("migrations/0003_x.up.sql", "migrations/0003_x.down.sql"),
            (
                "m/2017-09-23-182408_x/up.sql",
                "m/2017-09-23-182408_x/down.sql",
            ),
            ("db/V3__add_tags.sql", "db/U3__add_tags.sql"),
            ("db/V0003.sql", "db/U0003.sql"),
            ("0003_x.up.sql", "0003_x.down.sql"),
        ] {
            assert_eq!(super::down_script_place(up, 1), down);
        }
        // goose and dbmate: the up script starts after its marker line.
        assert!(super::down_script_place("db/20240101120000_x.sql", 2).contains("-- +goose Down"));
        // sqlx's one-way file.
        assert_eq!(
            super::down_script_place("m/4_article.sql", 1),
            "m/4_article.down.sql, after renaming 4_article.sql to 4_article.up.sql (a one-way `.sql` has no down)"
        );
    }

    #[test]
    fn a_goose_go_migration_is_refused_and_other_go_files_are_not_migrations() {
        let path = source_error_path(&[
            (
                "00001_create_users.sql",
                b"-- +goose Up\nCREATE TABLE users (id int);",
            ),
            ("00002_rename_root.go", b"package migrations"),
        ]);
        assert!(path.ends_with("00002_rename_root.go"), "{path}");
        for other in ["migrations.go", "00003_x_test.go", "main.go"] {
            assert!(super::classify(other).is_none(), "{other}");
        }
    }

    #[test]
    fn a_refinery_rust_migration_is_refused_and_other_rust_files_are_not_migrations() {
        let path = source_error_path(&[
            ("V1__init.sql", b"CREATE TABLE users (id int);"),
            (
                "V2__backfill.rs",
                b"pub fn migration() -> String { String::new() }",
            ),
        ]);
        assert!(path.ends_with("V2__backfill.rs"), "{path}");
        for other in ["mod.rs", "main.rs", "V2.rs", "Vx__a.rs"] {
            assert!(super::classify(other).is_none(), "{other}");
        }
    }

    #[test]
    fn flyway_repeatable_migrations_are_read_by_name() {
        use super::{classify, Class};
        assert!(
            matches!(classify("R__views.sql"), Some(Class::Repeatable { name }) if name == "views")
        );
        assert!(
            matches!(classify("r__grant all.sql"), Some(Class::Repeatable { name }) if name == "grant all")
        );
        let path = source_error_path(&[("V1__init.sql", b"SELECT 1;"), ("R__.sql", b"SELECT 1;")]);
        assert!(path.ends_with("R__.sql"), "{path}");
        assert!(classify("R_views.sql").is_none());
    }

    #[test]
    fn flyway_dotted_versions_are_read_as_flyway_reads_them() {
        use super::{classify, parse_stem, Class, Layout};
        for (file, text) in [
            ("V1.1__x.sql", "1.1"),
            ("V1_1__x.sql", "1.1"),
            ("v2_0_3__x.sql", "2.0.3"),
            ("V1.1.sql", "1.1"),
        ] {
            let Some(Class::Part { stem, layout, .. }) = classify(file) else {
                panic!("{file} is not a migration");
            };
            let (version, _, width) = parse_stem(&stem, layout).unwrap();
            assert_eq!((version.as_str(), width), (text, 1), "{file}");
        }
        assert!(matches!(classify("U1_1__x.sql"), Some(Class::Undo { stem }) if stem == "1.1_x"));
        // Dots are Flyway's alone: sqlx, golang-migrate, goose and dbmate read integers.
        assert!(parse_stem("1.1_x", Layout::Native).is_err());
        assert!(parse_stem("1.1_x", Layout::OneFile).is_err());
        for bad in ["V1..1__x.sql", "V1.__x.sql", "V1._1__x.sql"] {
            let path = source_error_path(&[(bad, b"SELECT 1;")]);
            assert!(path.ends_with(bad), "{bad}: {path}");
        }
    }
}
