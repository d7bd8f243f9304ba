//! The checks every script goes through once read: nothing only psql can run, no string or
//! comment left open, and no transaction control but a whole-file `BEGIN; … COMMIT;` wrapper,
//! which is unwrapped.

use crate::migrate::error::MigrateError;
use crate::migrate::migration::NO_TRANSACTION_HOW;
use crate::migrate::split::{client_only, transaction_control, unclosed, ClientOnly, TxControl};

/// Refuses a script that cannot run as written, naming its line (`first_line` is the line of
/// `path` the script starts on): one holding what only psql can run or Flyway fills in, or one
/// that ends inside a string, quoted identifier, dollar quote or block comment (the server
/// would take the rest of the script, and the runner's statement after it, for its content).
pub(super) fn refuse_unrunnable(
    script: &str,
    path: &str,
    first_line: usize,
) -> Result<(), MigrateError> {
    let line = |at: usize| first_line + script[..at].matches('\n').count();
    // psql's lines first: COPY's data rows may hold a lone quote (`O'Brien`).
    let Some((at, found)) = client_only(script) else {
        return match unclosed(script) {
            Some((at, what)) => Err(MigrateError::source_file(
                path,
                format!(
                    "line {}: this {what} is never closed: the script ends inside it\n  hint: close it where it should end",
                    line(at)
                ),
            )),
            None => Ok(()),
        };
    };
    let line = line(at);
    let message = match found {
        ClientOnly::MetaCommand(command) => format!(
            "line {line}: psql meta-command {command} cannot run: svcdb sends SQL to the server, not through psql\n  hint: delete psql lines (\\restrict, \\connect, \\set …) from the file"
        ),
        ClientOnly::Placeholder(placeholder) => format!(
            "line {line}: {placeholder} is a placeholder that a tool fills in before sending the script (Flyway from its configuration, goose's ENVSUB from the environment, pop/soda from its Go templates), and svcdb does not substitute placeholders\n  hint: write the value in its place (for the service's own schema, nothing: svcdb pins the search path to it)"
        ),
        ClientOnly::CopyFromStdin => format!(
            "line {line}: COPY … FROM stdin needs psql to stream the data rows that follow it\n  hint: turn the rows into INSERT statements (pg_dump --inserts or --column-inserts), or load them with COPY FROM a file on the server"
        ),
        ClientOnly::CopyToStdout => format!(
            "line {line}: COPY … TO stdout streams rows to psql, and a migration has nowhere to put them\n  hint: delete the statement, or write the rows to a file on the server with COPY … TO '/path/file'"
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
pub(super) fn unwrap_transaction(
    script: String,
    transactional: bool,
    path: &str,
    first_line: usize,
) -> Result<String, MigrateError> {
    let line = |at: usize| first_line + script[..at].matches('\n').count();
    let refuse = |at: usize, keyword: &str, what: &str| {
        let message = if transactional {
            format!(
                "line {}: {keyword} {what}: svcdb runs each migration in a transaction it owns (a deploy's pending migrations in one), so the script must not control it\n  hint: remove the transaction statements (a file wrapped whole in BEGIN; … COMMIT; is accepted as it is); a migration that must run outside a transaction says so: {NO_TRANSACTION_HOW}",
                line(at)
            )
        } else {
            // Found by a user trial: the hint above told a script that has the marker to add
            // it.
            format!(
                "line {}: {keyword} {what}: this migration is marked to run outside a transaction, so svcdb runs its statements one by one, each committing on its own, and records it as dirty until the last one is done\n  hint: remove the transaction statements; statements that must commit together belong in a migration of their own without the no-transaction marker",
                line(at)
            )
        };
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

#[cfg(test)]
mod tests {
    use super::super::test_support::{parse, v};
    use crate::migrate::MigrateError;

    /// The path of a `Source` error and the line its message starts with (`line N: …`).
    fn refused_at(files: &[(&str, &[u8])]) -> (String, usize) {
        match parse(files) {
            Err(MigrateError::Source { path, message }) => {
                let line = message
                    .strip_prefix("line ")
                    .and_then(|rest| rest.split_once(':'))
                    .and_then(|(n, _)| n.parse().ok())
                    .unwrap_or_else(|| panic!("no line in {message:?}"));
                (path, line)
            }
            other => panic!("expected a source error, got {other:?}"),
        }
    }

    /// The 1-based number of the first line of `text` starting with `start`.
    fn line_of(text: &str, start: &str) -> usize {
        text.lines().position(|l| l.starts_with(start)).unwrap() + 1
    }

    /// The shape of `pg_dump` output (since 17.6, 16.10, 15.14): `\restrict`, then a data section.
    const PG_DUMP: &str = "\
--
-- PostgreSQL database dump
--

\\restrict p2pTPzcmK7wXf1gLbKqcX1yBqfxbWZmXc3QRLGS4v4j5eGD1LTMhIhOxEcgtmIa

-- Dumped from database version 15.14
-- Dumped by pg_dump version 17.6

SET statement_timeout = 0;
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);

CREATE TABLE public.items (
    id integer NOT NULL,
    name text
);

--
-- Data for Name: items; Type: TABLE DATA; Schema: public; Owner: postgres
--

COPY public.items (id, name) FROM stdin;
1\tapple
2\tpear\\tgreen
\\.

--
-- PostgreSQL database dump complete
--

\\unrestrict p2pTPzcmK7wXf1gLbKqcX1yBqfxbWZmXc3QRLGS4v4j5eGD1LTMhIhOxEcgtmIa
";

    #[test]
    fn pg_dump_output_is_refused_at_its_psql_lines() {
        let (path, line) = refused_at(&[("0001_dump.up.sql", PG_DUMP.as_bytes())]);
        assert!(path.ends_with("0001_dump.up.sql"), "{path}");
        assert_eq!(line, line_of(PG_DUMP, "\\restrict"));

        // Without the psql commands, the data section is what cannot run.
        let unrestricted: String = PG_DUMP
            .split_inclusive('\n')
            .filter(|l| !l.contains("restrict "))
            .collect();
        let (path, line) = refused_at(&[("0001_dump.up.sql", unrestricted.as_bytes())]);
        assert!(path.ends_with("0001_dump.up.sql"), "{path}");
        assert_eq!(line, line_of(&unrestricted, "COPY public.items"));

        // In a goose file, counted from the top of the file; any case, any spacing.
        let goose = "-- +goose Up\nCREATE TABLE t (a int);\ncopy t (a)\n  from\tSTDIN;\n1\n\\.\n";
        let (path, line) = refused_at(&[("20240101000000_load.sql", goose.as_bytes())]);
        assert!(path.ends_with("20240101000000_load.sql"), "{path}");
        assert_eq!(line, 3);
    }

    /// Found by a trial: `COPY … TO stdout` reached the server and failed as "unexpected message
    /// from server", with nothing to say why.
    #[test]
    fn copy_to_stdout_is_refused_at_its_line() {
        let script = "CREATE TABLE t (a int);\n-- check\ncopy (select a from t)\n  TO Stdout;\n";
        let (path, line) = refused_at(&[("0001_a.up.sql", script.as_bytes())]);
        assert!(path.ends_with("0001_a.up.sql"), "{path}");
        assert_eq!(line, 3);
    }

    /// Found by a robustness trial: an unclosed quote made the server report a syntax error in
    /// the runner's own statement sent after the script, at a line the user never wrote.
    #[test]
    fn a_script_ending_inside_a_string_or_comment_is_refused_at_its_line() {
        for (script, expected) in [
            (
                "CREATE TABLE a (id int);\nCOMMENT ON TABLE a IS 'oops;\n",
                2,
            ),
            ("SELECT 1;\n\nDO $$ BEGIN PERFORM 1; END $;\n", 3),
            ("/* header\nCREATE TABLE b (id int);\n", 1),
        ] {
            let (path, line) = refused_at(&[("0001_a.up.sql", script.as_bytes())]);
            assert!(path.ends_with("0001_a.up.sql"), "{path}");
            assert_eq!(line, expected, "{script}");
        }
    }

    #[test]
    fn a_flyway_placeholder_in_code_is_refused_at_its_line() {
        let script = "-- users\nCREATE TABLE ${schema}.users (id int);\n";
        let (path, line) = refused_at(&[
            ("V1__a.sql", b"SELECT '${kept}';"),
            ("V2__users.sql", script.as_bytes()),
        ]);
        assert!(path.ends_with("V2__users.sql"), "{path}");
        assert_eq!(line, 2);
    }

    #[test]
    fn psql_meta_commands_in_down_scripts_are_refused() {
        let (path, line) = refused_at(&[
            ("0001_a.up.sql", b"CREATE TABLE a (id int);"),
            (
                "0001_a.down.sql",
                b"-- undo\n\\set ON_ERROR_STOP on\nDROP TABLE a;",
            ),
        ]);
        assert!(path.ends_with("0001_a.down.sql"), "{path}");
        assert_eq!(line, 2);

        let dbmate = "-- migrate:up\nCREATE TABLE a (id int);\n\n-- migrate:down\n\\connect other\nDROP TABLE a;\n";
        let (path, line) = refused_at(&[("20240101000000_a.sql", dbmate.as_bytes())]);
        assert!(path.ends_with("20240101000000_a.sql"), "{path}");
        assert_eq!(line, 5);
    }

    #[test]
    fn backslashes_in_strings_bodies_and_comments_and_server_side_copy_are_accepted() {
        let up = r#"-- \restrict in a comment
/* \connect in a /* nested */ comment */
CREATE FUNCTION f() RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    -- \set in the body
    RETURN E'a\\b\'' || '\n' || $q$\.$q$;
END
$$;
SELECT 'C:\temp\' AS path, "odd\name" FROM (SELECT 1 AS "odd\name") s;
COPY t FROM '/tmp/x.csv' WITH (FORMAT csv);
COPY (SELECT a FROM stdin) TO '/tmp/y.csv';
"#;
        let m = parse(&[("0001_a.up.sql", up.as_bytes())]).unwrap();
        assert_eq!(m.get(&v(1)).unwrap().up, up);
    }

    /// golang-migrate runs files as they are, so its users wrap them in `BEGIN; … COMMIT;`: that
    /// wrapper is accepted (and blanked, keeping the checksum and the line numbers); any other
    /// transaction control is refused at its line.
    #[test]
    fn golang_migrate_wrappers_are_accepted_other_transaction_control_refused() {
        let wrapped = "BEGIN;\nCREATE TABLE a (id int);\nCOMMIT;\n";
        let migrations = parse(&[
            ("000001_a.up.sql", wrapped.as_bytes()),
            ("000001_a.down.sql", b"BEGIN;\nDROP TABLE a;\nCOMMIT;\n"),
        ])
        .unwrap();
        let m = migrations.get(&v(1)).unwrap();
        assert_eq!(m.up, "      \nCREATE TABLE a (id int);\n       \n");
        assert_eq!(m.down.as_deref(), Some("      \nDROP TABLE a;\n       \n"));
        assert_eq!(m.checksum, crate::migrate::Checksum::of(wrapped));
        assert!(m.transactional);

        let mid_commit = "CREATE TABLE a (id int);\nCOMMIT;\nCREATE TABLE b (id int);\n";
        let (path, line) = refused_at(&[("0001_a.up.sql", mid_commit.as_bytes())]);
        assert!(
            path.ends_with("0001_a.up.sql") && line == 2,
            "{path}:{line}"
        );
        let goose =
            "-- +goose Up\nCREATE TABLE a (id int);\n-- +goose Down\nDROP TABLE a;\nROLLBACK;\n";
        let (path, line) = refused_at(&[("0001_a.sql", goose.as_bytes())]);
        assert!(path.ends_with("0001_a.sql") && line == 5, "{path}:{line}");
        let no_tx =
            "-- svcdb:no-transaction\nBEGIN;\nCREATE INDEX CONCURRENTLY i ON a (id);\nCOMMIT;\n";
        let (path, line) = refused_at(&[("0001_a.up.sql", no_tx.as_bytes())]);
        assert!(
            path.ends_with("0001_a.up.sql") && line == 2,
            "{path}:{line}"
        );
        // Found by a user trial: a script with the marker was told to add it.
        let late_begin = "-- svcdb:no-transaction\nCREATE TABLE a (id int);\nBEGIN;\nCOMMIT;\n";
        for (script, marked) in [(no_tx, true), (late_begin, true), (mid_commit, false)] {
            match parse(&[("0001_a.up.sql", script.as_bytes())]) {
                Err(MigrateError::Source { message, .. }) => assert_eq!(
                    message.contains(super::NO_TRANSACTION_HOW),
                    !marked,
                    "{message}"
                ),
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
    }
}
