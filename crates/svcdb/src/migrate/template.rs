//! The placeholder scripts [`new_migration`](super::new_migration) writes, and telling a
//! migration that still holds one from a written one.
//!
//! The placeholder is a comment, so a folder with a new migration still parses; applied as it
//! is, it would record a migration that did nothing, and once the user wrote the SQL the file
//! would count as changed after it was applied. `up` refuses it instead.

use super::error::MigrateError;
use super::migration::Migration;
use super::version::Version;

/// What the up script's placeholder says after `-- <prefix> <name>`.
const UP_TAIL: &str = ": the change.";

/// The up script `new_migration` writes for the file prefix `prefix` (`0002`,
/// `20261130095000`, `2026-11-30-095000`) and `name`.
pub(crate) fn up_placeholder(prefix: &str, name: &str) -> String {
    format!("-- {prefix} {name}{UP_TAIL}\n")
}

/// The down script `new_migration` writes.
pub(crate) fn down_placeholder(prefix: &str, name: &str) -> String {
    format!("-- {prefix} {name}: undo the change.\n")
}

/// True when `sql`, a down script, is goose's placeholder (`goose create` writes
/// `SELECT 'down SQL query';`, often left as it is). It runs and undoes nothing, so `down`
/// would report the migration reverted while its objects stay, and the next `up` fail on them
/// (found by a user trial): it counts as no down script, as an empty one does.
pub(crate) fn is_goose_placeholder_down(sql: &str) -> bool {
    let statements = super::split::split_statements(sql);
    !statements.is_empty()
        && statements.iter().all(|statement| {
            let code = &statement[super::split::code_start(statement, 0)..];
            code.split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
                .eq_ignore_ascii_case("SELECT 'down SQL query'")
        })
}

/// True when `m`'s up script is exactly the placeholder `new_migration` wrote for it, give or
/// take blank lines around it (a goose or dbmate section ends with one).
pub(crate) fn is_untouched(m: &Migration) -> bool {
    let Some((prefix, name)) =
        m.up.trim()
            .strip_prefix("-- ")
            .and_then(|line| line.strip_suffix(UP_TAIL))
            .and_then(|line| line.split_once(' '))
    else {
        return false;
    };
    // The prefix as written in the file name: diesel's dashed versions keep their dashes.
    // Flyway's `1_12_10` is the version `1.12.10`.
    name == m.name
        && prefix
            .replace('_', ".")
            .parse::<Version>()
            .is_ok_and(|v| v == m.version)
}

/// [`MigrateError::Unwritten`] for the first migration of `plan` that is still a placeholder.
pub(crate) fn refuse_untouched(plan: &[&Migration]) -> Result<(), MigrateError> {
    match plan.iter().find(|m| is_untouched(m)) {
        Some(m) => Err(MigrateError::Unwritten {
            version: m.version.clone(),
            path: m.path.clone(),
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::Migrations;

    fn parsed(dir: &std::path::Path) -> Vec<Migration> {
        Migrations::from_dir(dir).unwrap().iter().cloned().collect()
    }

    #[test]
    fn gooses_placeholder_down_is_told_from_a_written_one() {
        for placeholder in [
            "SELECT 'down SQL query';",
            "-- +goose StatementBegin\nselect  'down SQL query'\n;\n-- +goose StatementEnd\n",
        ] {
            assert!(is_goose_placeholder_down(placeholder), "{placeholder}");
        }
        for written in [
            "SELECT 'down SQL query'; DROP TABLE a;",
            "DROP TABLE a;",
            "SELECT 'up SQL query';",
            "",
        ] {
            assert!(!is_goose_placeholder_down(written), "{written}");
        }
    }

    #[test]
    fn every_layouts_new_migration_is_untouched_until_written() {
        // One folder per layout `new_migration` continues, each with a written first migration.
        let layouts: [(&str, &str); 8] = [
            ("0001_a.up.sql", "CREATE TABLE a (id int);"),
            ("2026-11-29-120000_a/up.sql", "CREATE TABLE a (id int);"),
            ("0001_a.sql", "CREATE TABLE a (id int);"),
            (
                "0001_a.sql",
                "-- +goose Up\nCREATE TABLE a (id int);\n-- +goose Down\nDROP TABLE a;\n",
            ),
            (
                "0001_a.sql",
                "-- migrate:up\nCREATE TABLE a (id int);\n-- migrate:down\nDROP TABLE a;\n",
            ),
            ("V1__a.sql", "CREATE TABLE a (id int);"),
            ("V1_12_9__a.sql", "CREATE TABLE a (id int);"),
            ("V1.1__a.sql", "CREATE TABLE a (id int);"),
        ];
        for (file, sql) in layouts {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(file);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, sql).unwrap();
            let created = super::super::new_migration(dir.path(), "add stock").unwrap();
            let all = parsed(dir.path());
            let (new, old): (Vec<_>, Vec<_>) =
                all.iter().partition(|m| m.version == created.version);
            assert!(is_untouched(new[0]), "{file}: {:?}", new[0].up);
            assert!(!is_untouched(old[0]), "{file}: a written migration");

            // Written: the placeholder comment kept above real SQL is no placeholder.
            let text = std::fs::read_to_string(&created.up_path).unwrap();
            std::fs::write(
                &created.up_path,
                text.replacen(": the change.\n", ": the change.\nSELECT 1;\n", 1),
            )
            .unwrap();
            let written = parsed(dir.path());
            let new = written.iter().find(|m| m.version == created.version);
            assert!(!is_untouched(new.unwrap()), "{file}: written");
        }
    }

    #[test]
    fn another_migrations_comment_is_no_placeholder() {
        let dir = tempfile::tempdir().unwrap();
        // A comment-only migration the user wrote, and a copy of another migration's
        // placeholder: neither is this migration's untouched template.
        std::fs::write(dir.path().join("0001_a.up.sql"), "-- nothing yet\n").unwrap();
        std::fs::write(
            dir.path().join("0002_b.up.sql"),
            up_placeholder("0001", "a"),
        )
        .unwrap();
        assert!(parsed(dir.path()).iter().all(|m| !is_untouched(m)));
    }
}
