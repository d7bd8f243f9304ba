//! The checks every script goes through once read: nothing only psql can run, and no
//! transaction control but a whole-file `BEGIN; … COMMIT;` wrapper, which is unwrapped.

use crate::migrate::error::MigrateError;
use crate::migrate::migration::NO_TRANSACTION_DIRECTIVE;
use crate::migrate::split::{psql_only, transaction_control, PsqlOnly, TxControl};

/// Refuses a script holding what only psql can run, naming its line (`first_line` is the line
/// of `path` the script starts on).
pub(super) fn refuse_psql_only(
    script: &str,
    path: &str,
    first_line: usize,
) -> Result<(), MigrateError> {
    let Some((at, found)) = psql_only(script) else {
        return Ok(());
    };
    let line = first_line + script[..at].matches('\n').count();
    let message = match found {
        PsqlOnly::MetaCommand(command) => format!(
            "line {line}: psql meta-command {command} cannot run: svcdb sends SQL to the server, not through psql\n  hint: delete psql lines (\\restrict, \\connect, \\set …) from the file"
        ),
        PsqlOnly::CopyFromStdin => format!(
            "line {line}: COPY … FROM stdin needs psql to stream the data rows that follow it\n  hint: turn the rows into INSERT statements (pg_dump --inserts or --column-inserts), or load them with COPY FROM a file on the server"
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
        let message = format!(
            "line {}: {keyword} {what}: svcdb runs each migration in a transaction it owns (a deploy's pending migrations in one), so the script must not control it\n  hint: remove the transaction statements (a file wrapped whole in BEGIN; … COMMIT; is accepted as it is); a migration that must run outside a transaction starts with `{NO_TRANSACTION_DIRECTIVE}`",
            line(at)
        );
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
