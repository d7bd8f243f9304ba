//! Where a migration failed: the file, the line the server's error points at and the statement,
//! for [`MigrationFailure`](super::MigrationFailure), so a service that migrates at start-up
//! gets the same location as `svcdb migrate`.

use tokio_postgres::error::ErrorPosition;

use super::event::Direction;
use super::migration::Migration;
use std::ops::Range;

use super::split::{code_start, statements_to_run};

/// The failing script's file, line and statement.
pub(super) struct Location {
    /// The script's file.
    pub path: String,
    /// The line of `path` the error points at.
    pub line: Option<usize>,
    /// The failing statement, as written in the script.
    pub statement: Option<String>,
}

/// Where `m`'s script for `direction` failed with `cause`. `statements_done` is set for a
/// non-transactional script, which is sent one statement at a time: the failing statement is
/// the next one, and the server's position counts from its start. `at` is set for a
/// transactional script sent statement by statement: the failing statement's bytes, from
/// whose start the position counts. Otherwise the script was sent whole, and the position
/// counts from its start. Without a position, the line is the failing statement's first.
pub(super) fn locate(
    m: &Migration,
    direction: Direction,
    cause: &tokio_postgres::Error,
    statements_done: Option<usize>,
    at: Option<Range<usize>>,
) -> Location {
    let (path, script, first_line) = match direction {
        Direction::Up => (m.path.as_str(), m.up.as_str(), m.up_line),
        Direction::Down => (
            m.down_path.as_deref().unwrap_or(&m.path),
            m.down.as_deref().unwrap_or_default(),
            m.down_line,
        ),
    };
    locate_in(path, script, first_line, cause, statements_done, at)
}

/// [`locate`] for `script`, which starts at line `first_line` of the file `path`: also
/// where a repeatable migration failed (a whole file, its first line 1).
pub(super) fn locate_in(
    path: &str,
    script: &str,
    first_line: usize,
    cause: &tokio_postgres::Error,
    statements_done: Option<usize>,
    at: Option<Range<usize>>,
) -> Location {
    // Each statement with its byte offset in the script (the statements are trimmed pieces
    // of it, in order).
    let mut end = 0;
    let statements: Vec<(usize, &str)> = statements_to_run(script)
        .into_iter()
        .filter_map(|statement| {
            let start = end + script[end..].find(statement)?;
            end = start + statement.len();
            Some((start, statement))
        })
        .collect();
    let position = match cause.as_db_error().and_then(|e| e.position()) {
        // The position is 1-based, in characters.
        Some(ErrorPosition::Original(p)) => usize::try_from(*p).ok().and_then(|p| p.checked_sub(1)),
        _ => None,
    };
    let (start, statement) = match (statements_done, at) {
        (Some(done), _) => match statements.get(done) {
            Some(&(start, statement)) => (start, Some(statement)),
            None => (0, None),
        },
        (None, Some(at)) => match script.get(at.clone()) {
            Some(statement) => (at.start, Some(statement.trim())),
            None => (0, None),
        },
        (None, None) => (0, None),
    };
    // The error's byte offset in the script.
    let at = position.map(|chars| {
        let from = &script[start..];
        start
            + from
                .char_indices()
                .nth(chars)
                .map_or(from.len(), |(i, _)| i)
    });
    let statement = statement.or_else(|| {
        // Sent whole: the statement that starts last at or before the error.
        let at = at?;
        statements
            .iter()
            .rev()
            .find(|(start, _)| *start <= at)
            .map(|&(_, statement)| statement)
    });
    // Without a position, the failing statement's first line of code, when it is known.
    let at = at.or_else(|| statement.map(|_| code_start(script, start)));
    // The script may start further down its file (a goose or dbmate file).
    let line = at.map(|at| first_line + script[..at].matches('\n').count());
    Location {
        path: path.to_owned(),
        line,
        statement: statement.map(str::to_owned),
    }
}
