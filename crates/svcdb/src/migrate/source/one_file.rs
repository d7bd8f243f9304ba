//! One-file migrations (sqlx simple, goose, dbmate): the up script, cut from the down at
//! goose's or dbmate's markers when the file has them.

use super::names::Tool;
use crate::migrate::split::split_statements;

/// A one-file migration cut at its goose or dbmate markers (a file without markers is all up).
pub(super) struct Sections<'t> {
    pub(super) up: &'t str,
    /// The line the up script starts on.
    pub(super) up_line: usize,
    /// The down script (`None` when the down section holds only comments) and its first line.
    pub(super) down: Option<(&'t str, usize)>,
    pub(super) up_no_tx: bool,
    pub(super) down_no_tx: bool,
    /// Whose up marker the file has (`None`: no markers).
    pub(super) markers: Option<Tool>,
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
    /// `-- +goose StatementBegin` (true) / `StatementEnd` (false): they must pair up within a
    /// section, as goose requires; what they enclose needs nothing more from us (the
    /// splitter knows the dollar quotes that make them necessary for goose).
    Statement { begin: bool },
}

/// The marker on `line`, if it is one; an error for an annotation we do not know. Only at the
/// start of a line, as goose (`strings.HasPrefix(line, "--")`) and dbmate (`(?m)^--\s*migrate:up`)
/// read them: an indented one is a comment to both.
fn marker(line: &str) -> Result<Option<Marker>, String> {
    let Some(comment) = line.trim_end().strip_prefix("--") else {
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
            "statementbegin" => Ok(Some(Marker::Statement { begin: true })),
            "statementend" => Ok(Some(Marker::Statement { begin: false })),
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
pub(super) fn cut_at_markers(text: &str) -> Result<Sections<'_>, String> {
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
    // The line of a `StatementBegin` not yet ended.
    let mut open_block: Option<usize> = None;
    // goose refuses a section that ends inside a block (found by a user trial: svcdb ran such
    // a file, goose would not).
    let unended = |begin: usize, at: &str| {
        format!(
            "`-- +goose StatementBegin` on line {begin} has no `-- +goose StatementEnd` before {at}; goose refuses such a file\n  hint: add `-- +goose StatementEnd` after the statement it encloses"
        )
    };
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
        if let (Some(begin), Marker::Up { .. } | Marker::Down { .. }) = (open_block, found) {
            return Err(unended(begin, &format!("the marker on line {}", seen.line)));
        }
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
            Marker::Statement { begin: true } => {
                if let Some(begin) = open_block {
                    return Err(format!(
                        "`-- +goose StatementBegin` on line {} inside the block opened on line {begin}\n  hint: end that block with `-- +goose StatementEnd` first",
                        seen.line
                    ));
                }
                open_block = Some(seen.line);
            }
            Marker::Statement { begin: false } => {
                if open_block.take().is_none() {
                    return Err(format!(
                        "`-- +goose StatementEnd` on line {} ends no block\n  hint: put `-- +goose StatementBegin` before the statement it encloses, or remove this line",
                        seen.line
                    ));
                }
            }
        }
    }
    if let Some(begin) = open_block {
        return Err(unended(begin, "the end of the file"));
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
    if markers == Some(Tool::Dbmate) && down.is_none() {
        // dbmate refuses such a file ("dbmate requires each migration to define a down block
        // with '-- migrate:down'"); an indented marker is the usual cause.
        let indented = text
            .lines()
            .position(|l| l.starts_with(char::is_whitespace) && matches!(marker(l.trim_start()), Ok(Some(Marker::Down { .. }))))
            .map(|i| format!(" (line {} has one, indented: dbmate, like svcdb, reads a marker only at the start of a line)", i + 1))
            .unwrap_or_default();
        return Err(format!(
            "has `-- migrate:up` but no `-- migrate:down` line{indented}; dbmate requires both\n  hint: add `-- migrate:down` at the start of a line after the up SQL, followed by the SQL that undoes it (left empty, the migration cannot be reverted)"
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

#[cfg(test)]
mod tests {
    use super::super::test_support::{parse, v, GOOSE};
    use crate::migrate::error::MigrateError;
    use crate::migrate::migration::Checksum;

    #[test]
    fn sqlx_simple_files_are_up_only_migrations() {
        let text = "CREATE TABLE a (id int);\n";
        let m = parse(&[
            ("20240101120000_create_a.sql", text.as_bytes()),
            ("00001_x.sql", b"SELECT 1;"),
        ])
        .unwrap();
        let a = m.get(&v(20240101120000)).unwrap();
        assert_eq!(a.name, "create_a");
        assert_eq!(a.up, text);
        assert_eq!(a.down, None);
        assert_eq!(a.down_path, None);
        assert!(a.transactional);
        assert_eq!(
            a.checksum,
            Checksum::of(text),
            "the whole file, as for `.up.sql`"
        );
        assert!(
            a.path.ends_with("20240101120000_create_a.sql"),
            "{}",
            a.path
        );
        assert_eq!(a.up_line, 1);
        assert_eq!(m.get(&v(1)).unwrap().name, "x");
    }

    /// sqlx marks a migration that must run outside a transaction with `-- no-transaction`.
    #[test]
    fn sqlx_no_transaction_first_line_is_honoured() {
        let m = parse(&[
            (
                "20240101120000_index.up.sql",
                b"-- no-transaction\nCREATE INDEX CONCURRENTLY i ON a (id);\n",
            ),
            (
                "20240101120000_index.down.sql",
                b"-- no-transaction\nDROP INDEX CONCURRENTLY i;\n",
            ),
            ("20240102000000_x.sql", b"SELECT 1; -- no-transaction\n"),
        ])
        .unwrap();
        let index = m.get(&v(20240101120000)).unwrap();
        assert!(!index.transactional && !index.down_transactional);
        assert!(m.get(&v(20240102000000)).unwrap().transactional);
    }

    #[test]
    fn goose_file_with_up_down_and_no_transaction() {
        let m = parse(&[("20240102000000_index_a.sql", GOOSE.as_bytes())]).unwrap();
        let index = m.get(&v(20240102000000)).unwrap();
        let up = "-- +goose StatementBegin\nCREATE INDEX CONCURRENTLY a_id ON a (id);\n-- +goose StatementEnd\n\n";
        assert_eq!(index.up, up);
        assert_eq!(
            index.down.as_deref(),
            Some("DROP INDEX CONCURRENTLY a_id;\n")
        );
        assert!(!index.transactional && !index.down_transactional);
        assert_eq!(index.checksum, Checksum::of(up), "the up section only");
        assert_eq!((index.up_line, index.down_line), (5, 10));
        assert_eq!(index.down_path.as_ref(), Some(&index.path));

        // CRLF line endings: same scripts, same checksum.
        let crlf = GOOSE.replace('\n', "\r\n");
        let m = parse(&[("20240102000000_index_a.sql", crlf.as_bytes())]).unwrap();
        assert_eq!(m.get(&v(20240102000000)).unwrap().checksum, index.checksum);
    }

    /// goose refuses a section that ends inside a `StatementBegin` block, and so does svcdb
    /// now (a user trial found svcdb running such a file); blocks that pair up are fine (the
    /// control, with `GOOSE` above).
    #[test]
    fn goose_statement_blocks_must_pair_up() {
        for (text, line) in [
            (
                "-- +goose Up\n-- +goose StatementBegin\nSELECT 1;\n-- +goose Down\nSELECT 2;\n",
                2,
            ),
            (
                "-- +goose Up\nSELECT 1;\n-- +goose Down\n-- +goose StatementBegin\nSELECT 2;\n",
                4,
            ),
            ("-- +goose Up\n-- +goose StatementEnd\nSELECT 1;\n", 2),
            (
                "-- +goose Up\n-- +goose StatementBegin\n-- +goose StatementBegin\nSELECT 1;\n",
                3,
            ),
        ] {
            match parse(&[("00002_x.sql", text.as_bytes())]) {
                Err(MigrateError::Source { message, .. }) => {
                    assert!(
                        message.contains(&format!("line {line}")),
                        "{text:?}: {message}"
                    );
                    assert!(message.contains("StatementEnd"), "{text:?}: {message}");
                }
                other => panic!("{text:?}: expected a source error, got {other:?}"),
            }
        }
        let paired = "-- +goose Up\n-- +goose StatementBegin\nSELECT 1;\n-- +goose StatementEnd\n-- +goose Down\n-- +goose StatementBegin\nSELECT 2;\n-- +goose StatementEnd\n";
        assert!(parse(&[("00002_x.sql", paired.as_bytes())]).is_ok());
    }

    #[test]
    fn dbmate_file_with_transaction_false_and_an_empty_down() {
        let m = parse(&[(
        "20240103000000_index_b.sql",
        b"-- migrate:up transaction:false\nCREATE INDEX CONCURRENTLY b_id ON b (id);\n\n-- migrate:down\n-- nothing to undo\n\n",
    )])
    .unwrap();
        let index = m.get(&v(20240103000000)).unwrap();
        assert_eq!(index.up, "CREATE INDEX CONCURRENTLY b_id ON b (id);\n\n");
        assert_eq!(index.down, None, "a down section of comments is no down");
        assert_eq!(index.down_path, None);
        assert!(!index.transactional);
        assert_eq!(index.up_line, 2);
    }

    /// goose and dbmate read a marker only at the start of a line: indented, it is a comment.
    #[test]
    fn indented_markers_are_comments() {
        let text = "-- migrate:up\nCREATE TABLE q (id int);\n    -- migrate:down\nCREATE TABLE q2 (id int);\n\n-- migrate:down\nDROP TABLE q2;\nDROP TABLE q;\n";
        let m = parse(&[("20240103000000_q.sql", text.as_bytes())]).unwrap();
        let q = m.get(&v(20240103000000)).unwrap();
        assert_eq!(
            q.up,
            "CREATE TABLE q (id int);\n    -- migrate:down\nCREATE TABLE q2 (id int);\n\n"
        );
        assert_eq!(q.down.as_deref(), Some("DROP TABLE q2;\nDROP TABLE q;\n"));
        let goose =
            "-- +goose Up\nCREATE TABLE g (id int);\n  -- +goose Down\nCREATE TABLE g2 (id int);\n";
        let m = parse(&[("2_g.sql", goose.as_bytes())]).unwrap();
        let g = m.get(&v(2)).unwrap();
        assert_eq!(g.down, None, "{:?}", g.up);
        assert!(g.up.contains("g2"), "{:?}", g.up);
    }

    #[test]
    fn misplaced_or_unknown_markers() {
        for (why, text) in [
            (
                "down before up",
                "-- +goose Down\nDROP TABLE a;\n-- +goose Up\nCREATE TABLE a (id int);\n",
            ),
            ("down without up", "-- migrate:down\nDROP TABLE a;\n"),
            (
                "two ups",
                "-- +goose Up\nSELECT 1;\n-- +goose Up\nSELECT 2;\n",
            ),
            (
                "SQL before the up marker",
                "SELECT 0;\n-- +goose Up\nSELECT 1;\n",
            ),
            (
                "an unknown annotation",
                "-- +goose ENVSUB ON\n-- +goose Up\nSELECT '${X}';\n",
            ),
            (
                "an unknown dbmate option",
                "-- migrate:up transaction:maybe\nSELECT 1;\n",
            ),
            ("dbmate without a down marker", "-- migrate:up\nSELECT 1;\n"),
            (
                "dbmate with its down marker indented",
                "-- migrate:up\nALTER TABLE a\n  ADD UNIQUE (b)\n  -- migrate:down\n  DROP CONSTRAINT a_b_key;\n",
            ),
        ] {
            match parse(&[("1_a.sql", text.as_bytes())]) {
                Err(MigrateError::Source { path, .. }) => {
                    assert!(path.ends_with("1_a.sql"), "{why}: {path}")
                }
                other => panic!("{why}: expected a source error, got {other:?}"),
            }
        }
    }
}
