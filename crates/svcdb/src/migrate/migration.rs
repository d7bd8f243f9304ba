//! One migration and its checksum.

use std::fmt;

use sha2::{Digest, Sha256};

use super::version::Version;

/// The history table's name (in the service schema).
pub const HISTORY_TABLE: &str = "svcdb_migrations";

/// The first line that makes a migration run outside a transaction (needed for
/// `CREATE INDEX CONCURRENTLY`, `ALTER TYPE … ADD VALUE` on old servers, `VACUUM`, …).
pub const NO_TRANSACTION_DIRECTIVE: &str = "-- svcdb:no-transaction";

/// How each layout marks a migration to run outside a transaction, for hints.
pub(crate) const NO_TRANSACTION_HOW: &str = "first line `-- svcdb:no-transaction` (sqlx `-- no-transaction`; morph `-- morph:nontransactional`; goose `-- +goose NO TRANSACTION`; dbmate `-- migrate:up transaction:false`; diesel `run_in_transaction = false` in metadata.toml; Flyway: a script of such statements runs outside one by itself, or `executeInTransaction=false` in its `.sql.conf`)";

/// sqlx's spelling of the same first line, honoured so sqlx folders run as they are.
const SQLX_NO_TRANSACTION: &str = "-- no-transaction";

/// morph's (Mattermost's golang-migrate-style folders), honoured likewise (found by a user
/// trial on Mattermost's folder).
const MORPH_NO_TRANSACTION: &str = "-- morph:nontransactional";

/// A parsed migration: what runs, what undoes it, and how.
///
/// Built by [`Migrations`](super::Migrations); the fields are public for reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migration {
    /// The version: the file name's prefix as written (`0003_x` → `0003`,
    /// `2017-09-23-182408_x` → `2017-09-23-182408`, `V3__x` → `3`), ordered as its tool
    /// orders it (see [`Version`]).
    pub version: Version,
    /// The name after the first `_` (after `__` for `V3__x`), spaces and all.
    pub name: String,
    /// The up script, with any UTF-8 byte-order mark removed; for a goose or dbmate file, the
    /// text between its up and down markers. It may hold no statement: a no-op migration,
    /// recorded like any other (the check before `up` warns about it).
    pub up: String,
    /// The down script, if there is one; `down` refuses to cross a migration without it. A down
    /// file holding no statement (empty, or only comments) counts as none: the migration is
    /// irreversible.
    pub down: Option<String>,
    /// SHA-256 of the up script with a byte-order mark removed and CRLF turned into LF, so a
    /// line-ending-only change is not a change.
    pub checksum: Checksum,
    /// False when the up script starts with [`NO_TRANSACTION_DIRECTIVE`], diesel's
    /// `metadata.toml` says `run_in_transaction = false`, a goose file says
    /// `-- +goose NO TRANSACTION` or a dbmate file `-- migrate:up transaction:false`: it is then
    /// split into statements sent one by one.
    pub transactional: bool,
    /// Like `transactional`, for the down script.
    pub down_transactional: bool,
    /// Where the up script came from, for messages: the source's origin joined with the file
    /// (`migrations/0003_x.up.sql`, `migrations/0003_x/up.sql`, `migrations/0003_x.sql`).
    pub path: String,
    /// The line of [`path`](Self::path) the up script starts on: 1, except in a goose or dbmate
    /// file, where it is the line after the up marker. A line of the script is line
    /// `up_line + n - 1` of the file.
    pub up_line: usize,
    /// Where the down script came from, like `path` (`…/0003_x.down.sql`, `…/0003_x/down.sql`,
    /// Flyway's `…/U3__x.sql`, or the up file itself for goose and dbmate); `None` without a
    /// down script.
    pub down_path: Option<String>,
    /// The line of [`down_path`](Self::down_path) the down script starts on (1 without one).
    pub down_line: usize,
}

/// A SHA-256 digest, shown and serialized as 64 lowercase hex digits (what the history table
/// stores).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Checksum(pub [u8; 32]);

impl Checksum {
    /// The checksum of a script: BOM stripped, CRLF read as LF.
    pub fn of(script: &str) -> Self {
        let script = strip_bom(script);
        let mut hasher = Sha256::new();
        // Hash piecewise rather than allocating a normalized copy: drop each `\r` that
        // precedes a `\n`.
        let bytes = script.as_bytes();
        let mut start = 0;
        for (i, w) in bytes.windows(2).enumerate() {
            if w == b"\r\n" {
                hasher.update(&bytes[start..i]);
                start = i + 1;
            }
        }
        hasher.update(&bytes[start..]);
        Self(hasher.finalize().into())
    }

    /// Lowercase hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Checksum({})", self.to_hex())
    }
}

impl serde::Serialize for Checksum {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

/// The script without a leading UTF-8 byte-order mark (which PostgreSQL would read as a
/// syntax error).
pub(crate) fn strip_bom(script: &str) -> &str {
    script.strip_prefix('\u{feff}').unwrap_or(script)
}

/// True when the script's first line is the no-transaction directive (svcdb's, sqlx's or
/// morph's).
pub(crate) fn has_no_transaction_directive(script: &str) -> bool {
    let first = strip_bom(script).lines().next().map(str::trim_end);
    // sqlx reads its directive as a prefix of the file (`sql.starts_with("-- no-transaction")`
    // in sqlx-core's migrate/source.rs): real folders write `-- no-transaction: why` (found by
    // a user trial, where svcdb ran such a file in a transaction).
    matches!(first, Some(NO_TRANSACTION_DIRECTIVE | MORPH_NO_TRANSACTION))
        || first.is_some_and(|line| line.starts_with(SQLX_NO_TRANSACTION))
}

/// A migration as messages name it: `0003 (create_users)`, or `0003` alone for one whose
/// file gives no name (Flyway's `V0003.sql`).
pub(crate) struct Named<'a>(pub &'a Version, pub &'a str);

impl fmt::Display for Named<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.1 {
            "" => write!(f, "{}", self.0),
            name => write!(f, "{} ({name})", self.0),
        }
    }
}

/// True when `sql` adds a value to an enum type (`ALTER TYPE … ADD VALUE`). Since PostgreSQL
/// 12 a transaction may do that, but may not use the new value before it commits (55P04,
/// "unsafe use of new value"): the runner commits after such a migration instead of running
/// the next ones, which may well use the value, in the same transaction (every other tool
/// runs each migration in a transaction of its own, so a folder written for one of them
/// relies on it; found by a trial on a golang-migrate folder).
pub(crate) fn adds_enum_value(sql: &str) -> bool {
    // Parsing costs about as much as reading the file: only a script with `add value` in it,
    // whitespace between, is parsed (and the parser decides).
    let lower = sql.to_ascii_lowercase();
    let named = lower
        .match_indices("value")
        .any(|(at, _)| lower[..at].trim_end().ends_with("add"));
    if !named {
        return false;
    }
    super::split::parsed_pieces(sql)
        .filter_map(Result::ok)
        .any(|(_, parsed)| {
            parsed.protobuf.stmts.iter().any(|raw| {
                // `ALTER TYPE … RENAME VALUE` sets `old_val` too.
                matches!(
                    raw.stmt.as_ref().and_then(|s| s.node.as_ref()),
                    Some(pg_query::NodeEnum::AlterEnumStmt(alter))
                        if !alter.new_val.is_empty() && alter.old_val.is_empty()
                )
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_endings_and_bom_do_not_change_the_checksum() {
        let lf = Checksum::of("CREATE TABLE a (id int);\nSELECT 1;\n");
        assert_eq!(
            Checksum::of("CREATE TABLE a (id int);\r\nSELECT 1;\r\n"),
            lf
        );
        assert_eq!(
            Checksum::of("\u{feff}CREATE TABLE a (id int);\r\nSELECT 1;\n"),
            lf
        );
        assert_ne!(Checksum::of("CREATE TABLE a (id bigint);\nSELECT 1;\n"), lf);
        // A lone CR is content, not a line ending.
        assert_ne!(Checksum::of("CREATE TABLE a (id int);\rSELECT 1;\n"), lf);
        assert_eq!(lf.to_hex().len(), 64);
    }

    #[test]
    fn directive_is_the_first_line_only() {
        assert!(has_no_transaction_directive(
            "-- svcdb:no-transaction\nCREATE INDEX CONCURRENTLY i ON t (a);"
        ));
        assert!(has_no_transaction_directive(
            "\u{feff}-- svcdb:no-transaction\r\nSELECT 1;"
        ));
        assert!(has_no_transaction_directive(
            "-- morph:nontransactional\nCREATE INDEX CONCURRENTLY i ON t (a);"
        ));
        assert!(!has_no_transaction_directive(
            "SELECT 1;\n-- svcdb:no-transaction\n"
        ));
        // sqlx's is a prefix, as sqlx reads it (found by a user trial on real folders).
        assert!(has_no_transaction_directive(
            "-- no-transaction: one concurrent index statement only\nCREATE INDEX CONCURRENTLY i ON t (a);"
        ));
        // svcdb's own and morph's are whole lines: a longer one is something else.
        assert!(!has_no_transaction_directive(
            "-- svcdb:no-transactional\nSELECT 1;"
        ));
    }

    #[test]
    fn a_script_that_adds_an_enum_value_is_told_apart_from_one_that_renames_or_mentions_one() {
        for sql in [
            "ALTER TYPE mood ADD VALUE 'meh'",
            "CREATE TABLE t (id int);\nalter type mood add\n  value if not exists 'meh' after 'ok';",
        ] {
            assert!(adds_enum_value(sql), "{sql}");
        }
        for sql in [
            "ALTER TYPE mood RENAME VALUE 'meh' TO 'fine'",
            "-- add value later\nCREATE TABLE t (id int)",
            "INSERT INTO notes (text) VALUES ('add value')",
            "ALTER TABLE t ADD COLUMN value int",
        ] {
            assert!(!adds_enum_value(sql), "{sql}");
        }
    }
}
