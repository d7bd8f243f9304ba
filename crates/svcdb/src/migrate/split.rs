//! Splits a script into statements, for migrations that must run outside a transaction.
//!
//! A multi-statement simple-query message runs as one implicit transaction in PostgreSQL, so
//! `CREATE INDEX CONCURRENTLY` inside it fails; a non-transactional migration is therefore sent
//! one statement at a time. The splitter knows PostgreSQL's lexical rules that can hide a `;`:
//! single-quoted strings (`''` escapes), `E''` strings (backslash escapes), double-quoted
//! identifiers, dollar quoting (`$$…$$`, `$tag$…$tag$`), `--` comments and nested `/* */`
//! comments.
//!
//! Known limit: a SQL-standard function body (`BEGIN ATOMIC … END`) holds bare `;` and is split
//! wrongly; write such functions with a dollar-quoted body, or in a transactional migration.

/// The statements of `sql`, each trimmed and without its terminating `;`. Pieces holding only
/// whitespace and comments are dropped.
///
/// ```
/// let s = svcdb::migrate::split_statements("SELECT ';'; /* ; */ SELECT $x$;$x$;");
/// assert_eq!(s, ["SELECT ';'", "/* ; */ SELECT $x$;$x$"]);
/// ```
pub fn split_statements(sql: &str) -> Vec<&str> {
    let bytes = sql.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    // Whether the current piece holds anything but whitespace and comments.
    let mut has_code = false;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let prev_is_word = i > 0 && is_word_byte(bytes[i - 1]);
        match b {
            b';' => {
                if has_code {
                    out.push(sql[start..i].trim());
                }
                start = i + 1;
                has_code = false;
                i += 1;
            }
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                i = bytes[i..]
                    .iter()
                    .position(|&c| c == b'\n')
                    .map_or(bytes.len(), |p| i + p + 1);
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => i = skip_block_comment(bytes, i),
            b'\'' => {
                // `E'…'` (any case) takes backslash escapes; the `E` must start a word.
                let escapes = i > 0
                    && matches!(bytes[i - 1], b'e' | b'E')
                    && !(i > 1 && is_word_byte(bytes[i - 2]));
                i = skip_quoted(bytes, i, b'\'', escapes);
                has_code = true;
            }
            b'"' => {
                i = skip_quoted(bytes, i, b'"', false);
                has_code = true;
            }
            b'$' if !prev_is_word => {
                i = match dollar_tag(bytes, i) {
                    Some(tag) => {
                        let body = i + tag.len();
                        find(bytes, body, tag).map_or(bytes.len(), |p| p + tag.len())
                    }
                    None => i + 1,
                };
                has_code = true;
            }
            _ => {
                if !b.is_ascii_whitespace() {
                    has_code = true;
                }
                i += 1;
            }
        }
    }
    if has_code {
        out.push(sql[start..].trim());
    }
    out
}

/// Letters, digits, `_`, `$` and any non-ASCII byte (PostgreSQL identifiers may hold those).
fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}

/// The index after the comment starting at `i` (`/*`); comments nest.
fn skip_block_comment(bytes: &[u8], mut i: usize) -> usize {
    let mut depth = 0usize;
    while i < bytes.len() {
        if bytes[i..].starts_with(b"/*") {
            depth += 1;
            i += 2;
        } else if bytes[i..].starts_with(b"*/") {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return i;
            }
        } else {
            i += 1;
        }
    }
    bytes.len()
}

/// The index after the quoted run opening at `i`. A doubled quote is an escaped quote (that
/// falls out of closing and reopening); with `escapes`, a backslash escapes the next byte.
fn skip_quoted(bytes: &[u8], i: usize, quote: u8, escapes: bool) -> usize {
    let mut j = i + 1;
    while j < bytes.len() {
        match bytes[j] {
            b'\\' if escapes => j += 2,
            c if c == quote => return j + 1,
            _ => j += 1,
        }
    }
    bytes.len()
}

/// The dollar-quote opener at `i` (`$$` or `$tag$`, tag = an identifier without `$`), if any.
/// `$1` is a parameter, not a quote: a tag cannot start with a digit.
fn dollar_tag(bytes: &[u8], i: usize) -> Option<&[u8]> {
    let rest = &bytes[i + 1..];
    let len = rest.iter().position(|&c| c == b'$')?;
    let tag = &rest[..len];
    let valid = tag.first().is_none_or(|c| !c.is_ascii_digit())
        && tag
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80);
    valid.then(|| &bytes[i..i + len + 2])
}

/// Position of `needle` in `bytes` at or after `from`.
fn find(bytes: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    bytes[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| from + p)
}

#[cfg(test)]
mod tests {
    use super::split_statements as split;

    #[test]
    fn plain_statements_are_trimmed_and_empty_pieces_dropped() {
        assert_eq!(
            split("SELECT 1;\n\n  SELECT 2 ;;\n"),
            ["SELECT 1", "SELECT 2"]
        );
        assert_eq!(split("SELECT 1"), ["SELECT 1"]);
        assert!(split("  ;\n; ").is_empty());
    }

    #[test]
    fn single_quotes_with_doubled_quotes() {
        assert_eq!(
            split("INSERT INTO t VALUES ('a;b', 'it''s; fine'); SELECT 2"),
            ["INSERT INTO t VALUES ('a;b', 'it''s; fine')", "SELECT 2"]
        );
    }

    #[test]
    fn e_strings_take_backslash_escapes_standard_strings_do_not() {
        assert_eq!(
            split(r"SELECT E'a\';b'; SELECT 2"),
            [r"SELECT E'a\';b'", "SELECT 2"]
        );
        assert_eq!(
            split(r"SELECT e'\\'; SELECT 2"),
            [r"SELECT e'\\'", "SELECT 2"]
        );
        // In a standard string a backslash is a plain character: the string ends at the quote.
        assert_eq!(
            split(r"SELECT 'a\'; SELECT 2"),
            [r"SELECT 'a\'", "SELECT 2"]
        );
        // `some'…'` is not an E string: the E does not start a word.
        assert_eq!(
            split(r"SELECT name'x\'; SELECT 2"),
            [r"SELECT name'x\'", "SELECT 2"]
        );
    }

    #[test]
    fn double_quoted_identifiers() {
        assert_eq!(
            split(r#"CREATE TABLE "a;""b" (id int); SELECT 2"#),
            [r#"CREATE TABLE "a;""b" (id int)"#, "SELECT 2"]
        );
    }

    #[test]
    fn dollar_quoting_with_and_without_tags() {
        let f = "CREATE FUNCTION f() RETURNS int AS $$ BEGIN RETURN 1; END $$ LANGUAGE plpgsql";
        assert_eq!(split(&format!("{f}; SELECT 2;")), [f, "SELECT 2"]);
        let g = "DO $body$ BEGIN PERFORM 'x;'; PERFORM $$;$$; END $body$";
        assert_eq!(split(&format!("{g};SELECT 2")), [g, "SELECT 2"]);
    }

    #[test]
    fn dollar_signs_that_are_not_quotes() {
        // Parameters and identifiers holding `$` open nothing.
        assert_eq!(
            split("PREPARE p AS SELECT $1; SELECT 2"),
            ["PREPARE p AS SELECT $1", "SELECT 2"]
        );
        assert_eq!(
            split("SELECT a$b$c FROM t; SELECT 2"),
            ["SELECT a$b$c FROM t", "SELECT 2"]
        );
    }

    #[test]
    fn line_and_nested_block_comments() {
        assert_eq!(
            split("SELECT 1 -- no; split\n; /* a; /* nested; */ still; */ SELECT 2;"),
            [
                "SELECT 1 -- no; split",
                "/* a; /* nested; */ still; */ SELECT 2"
            ]
        );
        // Comment-only pieces are dropped.
        assert_eq!(
            split("-- svcdb:no-transaction\nSELECT 1;\n-- trailing; comment\n"),
            ["-- svcdb:no-transaction\nSELECT 1"]
        );
    }

    #[test]
    fn quotes_inside_comments_do_not_open_strings() {
        assert_eq!(
            split("-- it's\nSELECT 1; /* \"x */ SELECT 2"),
            ["-- it's\nSELECT 1", "/* \"x */ SELECT 2"]
        );
    }

    #[test]
    fn unterminated_constructs_run_to_the_end() {
        assert_eq!(split("SELECT 'abc; SELECT 2"), ["SELECT 'abc; SELECT 2"]);
        assert_eq!(split("SELECT 1 /* ; "), ["SELECT 1 /* ;"]);
    }

    #[test]
    fn non_ascii_text() {
        assert_eq!(
            split("SELECT 'héllo;'; SELECT \"ünï\""),
            ["SELECT 'héllo;'", "SELECT \"ünï\""]
        );
    }
}
