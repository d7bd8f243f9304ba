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
    /// `-- +goose StatementBegin` / `StatementEnd`: a comment to us.
    Statement,
}

/// The marker on `line`, if it is one; an error for an annotation we do not know.
fn marker(line: &str) -> Result<Option<Marker>, String> {
    let Some(comment) = line.trim().strip_prefix("--") else {
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
            "statementbegin" | "statementend" => Ok(Some(Marker::Statement)),
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
            Marker::Statement => {}
        }
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
