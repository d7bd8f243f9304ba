//! The order each tool runs its folder in, checked against svcdb's [`Version`] order.
//!
//! svcdb orders every folder one way (see [`Version`]: timestamps by their time whatever
//! their width, plain numbers numerically, Flyway's dotted versions part by part), and its
//! history compares versions so. The tools whose folders it reads do not all agree with that
//! order, nor with each other:
//!
//! * golang-migrate (`uint`), sqlx (`i64`), goose (`int64`), refinery and Flyway
//!   (`BigInteger` parts) compare versions as **integers**: a 16-digit timestamp runs after
//!   every 14-digit one.
//! * diesel compares its versions' digits (dashes dropped) as **text**: `10` runs before `9`.
//! * dbmate sorts its files by **file name** (`sort.Slice(… FileName < FileName)`):
//!   `10_b.sql` runs before `9_a.sql`, and supabase's `10000000000000_x.sql` before
//!   `100000022_y.sql`.
//!
//! Where a folder's migrations would run in an order that their tool would not run them in,
//! the folder is refused, naming the two files: applied in another order than the tool did,
//! a fresh database could end up other than the tool leaves it, and `down` would revert
//! another "newest". In the usual folders (versions of one width, 14-digit timestamps,
//! `0001`-style numbers) the orders agree and nothing changes.

use std::cmp::Ordering;

use super::names::{Layout, Tool};
use crate::migrate::error::MigrateError;
use crate::migrate::migration::Migration;
use crate::migrate::version::Version;

/// How a migration's tool orders it, as its layout (and markers) tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ToolOrder {
    /// By the version as an integer (Flyway: part by part); the tool's name for messages.
    Integer(&'static str),
    /// diesel: the version's digits compared as text.
    DigitText,
    /// dbmate: the file names compared as text.
    FileName,
}

impl ToolOrder {
    /// The order of a migration in `layout`, cut at `markers` (a one-file migration).
    pub(super) fn of(layout: Layout, markers: Option<Tool>) -> Self {
        match (layout, markers) {
            (Layout::Diesel, _) => ToolOrder::DigitText,
            (Layout::OneFile, Some(Tool::Dbmate)) => ToolOrder::FileName,
            (Layout::OneFile, Some(Tool::Goose)) => ToolOrder::Integer("goose"),
            (Layout::OneFile, None) => ToolOrder::Integer("sqlx"),
            (Layout::Native, _) => ToolOrder::Integer("golang-migrate (and sqlx)"),
            (Layout::Flyway, _) => ToolOrder::Integer("Flyway (and refinery)"),
        }
    }

    /// Whether two migrations are ordered by the same rule (and so by one tool).
    fn same_rule(self, other: Self) -> bool {
        std::mem::discriminant(&self) == std::mem::discriminant(&other)
    }

    fn cmp(self, a: &Migration, b: &Migration) -> Ordering {
        match self {
            ToolOrder::Integer(_) => a.version.cmp_as_integers(&b.version),
            ToolOrder::DigitText => digit_text(&a.version).cmp(&digit_text(&b.version)),
            ToolOrder::FileName => file_name(&a.path).cmp(file_name(&b.path)),
        }
    }
}

/// diesel's version: the digits of the folder's prefix, dashes dropped.
fn digit_text(version: &Version) -> String {
    version.as_str().replace('-', "")
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Refuses `list` (sorted by [`Version`], versions unique; `rules[i]` is the order of
/// `list[i]`'s tool) when
/// two migrations ordered by one rule run in another order under it than under svcdb's:
/// checking each such pair that svcdb runs one after the other is enough, the orders being
/// total.
pub(super) fn refuse_another_order(
    list: &[Migration],
    rules: &[ToolOrder],
) -> Result<(), MigrateError> {
    let pairs: Vec<(&Migration, ToolOrder)> = list.iter().zip(rules.iter().copied()).collect();
    for (i, &(a, rule)) in pairs.iter().enumerate() {
        let Some(&(b, _)) = pairs[i + 1..].iter().find(|(_, r)| r.same_rule(rule)) else {
            continue;
        };
        let message = match rule.cmp(a, b) {
            Ordering::Less => continue,
            Ordering::Equal => format!(
                "versions {} and {} are the one number {} to {}, which refuses such a folder (svcdb would run {} first), also {}\n  hint: give one of them a new version",
                b.version,
                a.version,
                b.version.number(),
                tool_name(rule),
                a.version,
                a.path
            ),
            Ordering::Greater => another_order(rule, a, b),
        };
        return Err(MigrateError::source_file(&b.path, message));
    }
    Ok(())
}

fn tool_name(rule: ToolOrder) -> &'static str {
    match rule {
        ToolOrder::Integer(tool) => tool,
        ToolOrder::DigitText => "diesel",
        ToolOrder::FileName => "dbmate",
    }
}

/// Why `b`, after `a` in svcdb's order, is refused when its tool runs it first.
fn another_order(rule: ToolOrder, a: &Migration, b: &Migration) -> String {
    let (tool, how, svcdb_how, fix) = match rule {
        ToolOrder::FileName => (
            "dbmate",
            "dbmate orders migrations by file name, as text",
            "orders plain numbers numerically",
            "versions of one width (`09_…` beside `10_…`), or 14-digit timestamps (YYYYMMDDHHMMSS)",
        ),
        ToolOrder::DigitText => (
            "diesel",
            "diesel compares versions' digits as text",
            "orders plain numbers numerically",
            "versions of one width (`09_…` beside `10_…`), or 14-digit timestamps (YYYYMMDDHHMMSS)",
        ),
        ToolOrder::Integer(tool) => (
            tool,
            "it orders versions as integers, so the wider one comes later",
            "orders timestamps by their time whatever their width",
            "timestamps of one width (14 digits, YYYYMMDDHHMMSS)",
        ),
    };
    format!(
        "{tool} runs this migration (version {}) before {} (version {}): {how}; svcdb, which {svcdb_how}, would run them the other way round, so it refuses the folder rather than apply it in another order than {tool}\n  hint: rename files so that both orders agree, in the order the migrations must run ({tool}'s, where {tool} has migrated a database from this folder): {fix}; rename an applied migration together with its row in {tool}'s history table, which records the version as the file writes it",
        b.version, a.path, a.version
    )
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{parse, v};
    use crate::migrate::error::MigrateError;

    /// A dbmate file creating `table`.
    fn dbmate(table: &str) -> Vec<u8> {
        format!("-- migrate:up\nCREATE TABLE {table} (id int);\n\n-- migrate:down\nDROP TABLE {table};\n")
            .into_bytes()
    }

    /// The path and message of the `Source` error reading `files` gives.
    fn refused(files: &[(&str, &[u8])]) -> (String, String) {
        match parse(files) {
            Err(MigrateError::Source { path, message }) => (path, message),
            other => panic!("expected a source error, got {other:?}"),
        }
    }

    fn versions(files: &[(&str, &[u8])]) -> Vec<String> {
        let m = parse(files).unwrap_or_else(|e| panic!("{files:?}: {e}"));
        m.iter().map(|m| m.version.to_string()).collect()
    }

    /// Found by a user trial: dbmate runs `10_` before `9_` (it sorts file names), svcdb ran
    /// `9_` first.
    #[test]
    fn a_dbmate_folder_whose_file_names_sort_otherwise_than_its_versions_is_refused() {
        let (a, b) = (dbmate("a"), dbmate("b"));
        let (path, message) = refused(&[("9_create_a.sql", &a), ("10_create_b.sql", &b)]);
        assert!(path.ends_with("/10_create_b.sql"), "{path}");
        assert!(
            message.contains("9_create_a.sql"),
            "names the other file: {message}"
        );

        // supabase/postgres: dbmate runs 10000000000000, 100000022, 20230612152300.
        let (c, d, e) = (dbmate("c"), dbmate("d"), dbmate("e"));
        let (path, message) = refused(&[
            ("10000000000000_demote-postgres.sql", &c),
            ("100000022_test.sql", &d),
            ("20230612152300_test.sql", &e),
        ]);
        assert!(
            path.ends_with("/10000000000000_demote-postgres.sql"),
            "{path}"
        );
        assert!(message.contains("100000022_test.sql"), "{message}");
    }

    #[test]
    fn dbmate_folders_whose_names_sort_as_their_versions_are_read_as_before() {
        // The common case: dbmate's own 14-digit timestamps.
        let (a, b, c) = (dbmate("a"), dbmate("b"), dbmate("c"));
        assert_eq!(
            versions(&[
                ("20240102000000_b.sql", &b),
                ("20231231235959_a.sql", &a),
                ("20240102000001_c.sql", &c),
            ]),
            ["20231231235959", "20240102000000", "20240102000001"]
        );
        // Numbers of one width.
        assert_eq!(
            versions(&[("0009_a.sql", &a), ("0010_b.sql", &b), ("0100_c.sql", &c)]),
            ["0009", "0010", "0100"]
        );
        // Numbers before timestamps, as both order them.
        assert_eq!(
            versions(&[("1_a.sql", &a), ("20240102000000_b.sql", &b)]),
            ["1", "20240102000000"]
        );
    }

    #[test]
    fn the_integer_tools_run_9_before_10_as_svcdb_does() {
        let goose = b"-- +goose Up\nSELECT 1;\n-- +goose Down\nSELECT 2;\n";
        assert_eq!(
            versions(&[("9_a.sql", goose), ("10_b.sql", goose)]),
            ["9", "10"]
        );
        assert_eq!(
            versions(&[("9_a.sql", b"SELECT 1;"), ("10_b.sql", b"SELECT 2;")]),
            ["9", "10"]
        );
        assert_eq!(
            versions(&[("9_a.up.sql", b"SELECT 1;"), ("10_b.up.sql", b"SELECT 2;")]),
            ["9", "10"]
        );
        assert_eq!(
            versions(&[("V9__a.sql", b"SELECT 1;"), ("V10__b.sql", b"SELECT 2;")]),
            ["9", "10"]
        );
        // A sqlx file and a dbmate file are ordered each by its own tool: no conflict.
        let a = dbmate("a");
        assert_eq!(
            versions(&[("9_a.sql", &a), ("10_b.up.sql", b"SELECT 2;")]),
            ["9", "10"]
        );
    }

    #[test]
    fn a_timestamp_wider_than_14_digits_is_refused_where_its_tool_orders_integers() {
        // golang-migrate, sqlx, goose, Flyway: 2023061215230001 is the larger integer, so it
        // runs after 20230613000000; svcdb, by time, before.
        let goose = b"-- +goose Up\nSELECT 1;\n-- +goose Down\nSELECT 2;\n";
        for files in [
            [
                ("2023061215230001_a.up.sql", &b"SELECT 1;"[..]),
                ("20230613000000_b.up.sql", b"SELECT 2;"),
            ],
            [
                ("2023061215230001_a.sql", b"SELECT 1;"),
                ("20230613000000_b.sql", b"SELECT 2;"),
            ],
            [
                ("2023061215230001_a.sql", goose),
                ("20230613000000_b.sql", goose),
            ],
            [
                ("V2023061215230001__a.sql", b"SELECT 1;"),
                ("V20230613000000__b.sql", b"SELECT 2;"),
            ],
        ] {
            let (path, message) = refused(&files);
            assert!(path.contains("20230613000000_"), "{files:?}: {path}");
            assert!(message.contains("2023061215230001"), "{message}");
        }
        // The control: diesel compares the digits as text, as svcdb orders timestamps.
        assert_eq!(
            versions(&[
                ("2023-06-12-152300-01_a/up.sql", b"SELECT 1;"),
                ("2023-06-13-000000_b/up.sql", b"SELECT 2;"),
            ]),
            ["2023-06-12-152300-01", "2023-06-13-000000"]
        );
        // Wider timestamps that sort alike both ways are fine.
        assert_eq!(
            versions(&[
                ("20230612152300_a.up.sql", b"SELECT 1;"),
                ("2023061215230001_b.up.sql", b"SELECT 2;"),
            ]),
            ["20230612152300", "2023061215230001"]
        );
    }

    #[test]
    fn diesel_runs_10_before_9_so_such_a_diesel_folder_is_refused() {
        let (path, message) =
            refused(&[("9_a/up.sql", b"SELECT 1;"), ("10_b/up.sql", b"SELECT 2;")]);
        assert!(path.ends_with("/10_b/up.sql"), "{path}");
        assert!(message.contains("9_a/up.sql"), "{message}");
        // Numbers of one width, and diesel's initial setup before timestamps: as before.
        assert_eq!(
            versions(&[
                ("00000000000000_diesel_initial_setup/up.sql", b"SELECT 1;"),
                ("2017-09-23-182408_b/up.sql", b"SELECT 2;"),
                ("09_a/up.sql", b"SELECT 1;"),
                ("10_c/up.sql", b"SELECT 2;"),
            ]),
            ["00000000000000", "09", "10", "2017-09-23-182408"]
        );
    }

    #[test]
    fn two_runs_of_zeros_are_one_version_to_the_integer_tools() {
        // diesel (Lemmy) tells them apart; golang-migrate reads both as 0 and refuses them.
        let (path, _) = refused(&[
            ("0_a.up.sql", b"SELECT 1;"),
            ("000000000000000_b.up.sql", b"SELECT 2;"),
        ]);
        assert!(path.ends_with("000000000000000_b.up.sql"), "{path}");
        assert_eq!(
            versions(&[
                ("00000000000000_a/up.sql", b"SELECT 1;"),
                ("000000000000000_b/up.sql", b"SELECT 2;"),
            ]),
            ["00000000000000", "000000000000000"]
        );
        assert!(v(0) < "000000000000000".parse().unwrap());
    }
}
