//! Splits a script into statements, for migrations that must run outside a transaction, and
//! finds what in a script only psql can run and where it controls the transaction itself.
//!
//! A multi-statement simple-query message runs as one implicit transaction in PostgreSQL, so
//! `CREATE INDEX CONCURRENTLY` inside it fails; a non-transactional migration is therefore sent
//! one statement at a time. The splitter knows PostgreSQL's lexical rules that can hide a `;`:
//! single-quoted strings (`''` escapes), `E''` strings (backslash escapes), double-quoted
//! identifiers, dollar quoting (`$$…$$`, `$tag$…$tag$`), `--` comments and nested `/* */`
//! comments.
//!
//! Known limit: a SQL-standard function body (`BEGIN ATOMIC … END`) holds bare `;` and is split
//! wrongly here; the runner splits with PostgreSQL's parser first ([`statements_to_run`]), so
//! this splitter only serves a script the parser rejects.

use std::ops::Range;

/// The statements a non-transactional script runs as, one message each: as PostgreSQL's own
/// parser splits it (`BEGIN ATOMIC` bodies and all), or, for a script the parser rejects
/// (which the lint refuses unless allowed), as [`split_statements`] does. Every piece is a
/// slice of `sql`, in order.
pub(crate) fn statements_to_run(sql: &str) -> Vec<&str> {
    match pg_query::split_with_parser(sql) {
        Ok(statements) => statements
            .into_iter()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect(),
        Err(_) => split_statements(sql),
    }
}

/// True when `statement` is one of the `CONCURRENTLY` statements that wait out older
/// transactions without blocking anyone's reads or writes: `CREATE INDEX`, `DROP INDEX`,
/// `REINDEX … CONCURRENTLY` and `ALTER TABLE … DETACH PARTITION … CONCURRENTLY`. They take
/// `SHARE UPDATE EXCLUSIVE`, which no `SELECT`, `INSERT`, `UPDATE` or `DELETE` conflicts
/// with, and then wait for every transaction in the database older than their snapshot,
/// whatever tables it touches (PostgreSQL: "waits for all existing transactions that could
/// potentially modify or use the index to terminate"). Those waits count against
/// `lock_timeout`, so another service's long transaction in the same database cut them short
/// and left an invalid index behind (found by a user trial). Told apart by PostgreSQL's parser;
/// a statement it rejects is none of them.
pub(crate) fn waits_out_older_transactions(statement: &str) -> bool {
    use pg_query::protobuf::AlterTableType;
    use pg_query::NodeEnum;
    // Parsing every statement of every non-transactional migration would cost more than the
    // word check that rules out nearly all of them.
    if !statement.to_ascii_lowercase().contains("concurrently") {
        return false;
    }
    let Ok(parsed) = pg_query::parse(statement, pg_query::ParserOptions::DEFAULT) else {
        return false;
    };
    let concurrently = |params: &[pg_query::Node]| {
        params
            .iter()
            .any(|p| matches!(&p.node, Some(NodeEnum::DefElem(d)) if d.defname == "concurrently"))
    };
    parsed
        .protobuf
        .stmts
        .iter()
        .filter_map(|raw| raw.stmt.as_ref().and_then(|s| s.node.as_ref()))
        .any(|node| match node {
            NodeEnum::IndexStmt(index) => index.concurrent,
            NodeEnum::DropStmt(drop) => drop.concurrent,
            NodeEnum::ReindexStmt(reindex) => concurrently(&reindex.params),
            NodeEnum::AlterTableStmt(alter) => alter.cmds.iter().any(|cmd| {
                matches!(&cmd.node, Some(NodeEnum::AlterTableCmd(c))
                    if c.subtype == AlterTableType::AtDetachPartition as i32
                        && matches!(c.def.as_ref().and_then(|d| d.node.as_ref()),
                            Some(NodeEnum::PartitionCmd(p)) if p.concurrent))
            }),
            _ => false,
        })
}

/// True when `statement`, run in a non-transactional script before a statement of
/// [`waits_out_older_transactions`], may have set the session's `lock_timeout` itself, which
/// the runner then keeps: a `SET` or `RESET` of it, `RESET ALL`, `DISCARD ALL`, a call of
/// `set_config`, code the parser cannot see into (`DO`, `CALL`), or a statement the parser
/// rejects. Told on the client, from the script's own text: the session reset after every
/// script puts svcdb's bound back, so only the script's earlier statements can have changed
/// it. (A function of the script's that sets it internally is not seen.)
pub(crate) fn may_change_lock_timeout(statement: &str) -> bool {
    use pg_query::protobuf::VariableSetKind;
    use pg_query::NodeEnum;
    let Ok(parsed) = pg_query::parse(statement, pg_query::ParserOptions::DEFAULT) else {
        return true;
    };
    let sets = parsed
        .protobuf
        .stmts
        .iter()
        .filter_map(|raw| raw.stmt.as_ref().and_then(|s| s.node.as_ref()))
        .any(|node| match node {
            NodeEnum::VariableSetStmt(set) => {
                set.name == "lock_timeout" || set.kind == VariableSetKind::VarResetAll as i32
            }
            NodeEnum::DiscardStmt(_) | NodeEnum::DoStmt(_) | NodeEnum::CallStmt(_) => true,
            _ => false,
        });
    sets || parsed
        .call_functions()
        .iter()
        .any(|f| f.rsplit('.').next() == Some("set_config"))
}

/// The most script the lint parses at once. PostgreSQL's parse tree, as pg_query hands it
/// over, takes about 80 times the script's size: a 17 MB seed-data migration took 1.4 GB in
/// one piece (found by a trial).
const PARSE_CHUNK: usize = 512 * 1024;

/// `sql` parsed by PostgreSQL's parser, in pieces of whole statements of at most about
/// [`PARSE_CHUNK`] bytes (one piece for a script that size or smaller), each with the byte
/// offset in `sql` its statements' locations count from. The pieces are parsed one at a time
/// as the iterator is advanced, so only one tree is held at once; the statements are found
/// by the parser itself first ([`pg_query::split_with_parser`], whose tree stays in C and is
/// freed at once). An error is the parser's, for the first piece that holds one.
pub(crate) fn parsed_pieces(
    sql: &str,
) -> impl Iterator<Item = Result<(usize, pg_query::ParseResult), pg_query::Error>> + '_ {
    let whole = std::iter::once(0..sql.len()).collect();
    let ranges: Vec<Range<usize>> = if sql.len() <= PARSE_CHUNK {
        whole
    } else {
        match pg_query::split_with_parser(sql) {
            Ok(statements) => {
                let mut ranges: Vec<Range<usize>> = Vec::new();
                for statement in statements {
                    // The parser's pieces are slices of the script.
                    let start = statement.as_ptr() as usize - sql.as_ptr() as usize;
                    let end = start + statement.len();
                    match ranges.last_mut() {
                        Some(last) if end - last.start <= PARSE_CHUNK => last.end = end,
                        _ => ranges.push(start..end),
                    }
                }
                ranges
            }
            // The whole script, to get the parser's error.
            Err(_) => whole,
        }
    };
    ranges.into_iter().map(move |range| {
        pg_query::parse(&sql[range.clone()], pg_query::ParserOptions::DEFAULT)
            .map(|parsed| (range.start, parsed))
    })
}

/// The statements of `sql`, each trimmed and without its terminating `;`. Pieces holding only
/// whitespace and comments are dropped.
///
/// ```
/// let s = svcdb::__private::split_statements("SELECT ';'; /* ; */ SELECT $x$;$x$;");
/// assert_eq!(s, ["SELECT ';'", "/* ; */ SELECT $x$;$x$"]);
/// ```
pub fn split_statements(sql: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    // Whether the current piece holds anything but whitespace and comments.
    let mut has_code = false;
    for (token, range) in tokens(sql) {
        match token {
            Token::Semicolon => {
                if has_code {
                    out.push(sql[start..range.start].trim());
                }
                start = range.end;
                has_code = false;
            }
            Token::Space | Token::Comment => {}
            Token::Quoted | Token::Word | Token::Symbol => has_code = true,
        }
    }
    if has_code {
        out.push(sql[start..].trim());
    }
    out
}

/// The comments of `sql` (`-- …` with its newline, `/* … */`) with their byte offsets,
/// outside strings and quoted identifiers, for directives such as `-- svcdb:allow`.
pub(crate) fn comments(sql: &str) -> impl Iterator<Item = (usize, &str)> {
    tokens(sql)
        .filter(|(token, _)| *token == Token::Comment)
        .map(|(_, range)| (range.start, &sql[range]))
}

/// Where the code at or after byte `from` of `sql` starts, past whitespace and comments (the
/// end when there is none): where a statement the parser locates at `from` is shown to start.
/// `from` must be a character boundary before a token, as a parser's statement location is.
pub(crate) fn code_start(sql: &str, from: usize) -> usize {
    let Some(rest) = sql.get(from..) else {
        return from;
    };
    tokens(rest)
        .find(|(token, _)| !matches!(token, Token::Space | Token::Comment))
        .map_or(sql.len(), |(_, range)| from + range.start)
}

/// Something only a client tool runs or fills in (psql, Flyway): sent to the server as it is,
/// a syntax error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientOnly<'a> {
    /// A backslash command (`\restrict`, `\connect`, `\set`, `\.`), up to the next whitespace.
    MetaCommand(&'a str),
    /// `COPY … FROM stdin`: psql sends the data rows that follow the statement.
    CopyFromStdin,
    /// `COPY … TO stdout`: the server streams rows to a client that has nowhere to put them
    /// (driven through a driver's query call, the stream is a protocol error).
    CopyToStdout,
    /// A placeholder a tool replaces before it sends the script: Flyway's (`${schema}`,
    /// `${flyway:defaultSchema}`), up to its `}`, or a Go template's (`{{ .Options "x" }}`),
    /// up to its `}}` on the same line.
    Placeholder(&'a str),
}

/// The first thing in `sql` that only psql can run or Flyway fills in, and the byte offset it
/// starts at (for `COPY`, the statement's; a `COPY` to or from the client counts: only psql
/// has the data's other end). A backslash outside strings, quoted identifiers,
/// dollar quotes and comments is always psql's: PostgreSQL's own grammar has no use for one
/// there; nor for `${` (a parameter is `$1`, a dollar quote `$$` or `$tag$`). A Flyway
/// placeholder inside a string or a function body is left alone: it is valid SQL there, and
/// only the project's Flyway settings say whether Flyway replaced it (Flyway's own
/// `${flyway:…}`, which it always replaces, [`flyway_placeholder_in_quoted`] finds there for
/// Flyway's scripts); a Go template's action
/// on its data (`{{ .x }}`) is found there too, as pop renders the whole file.
pub(crate) fn client_only(sql: &str) -> Option<(usize, ClientOnly<'_>)> {
    /// How far the current statement has got towards `COPY … FROM stdin` or `TO stdout`.
    #[derive(Clone, Copy)]
    enum Step {
        /// No code yet.
        Start,
        /// After `COPY`, `depth` parentheses deep: a `FROM` inside them belongs to a query.
        Copy { depth: usize },
        /// After `COPY … FROM`.
        From,
        /// After `COPY … TO`.
        To,
        /// Anything else.
        Other,
    }
    let mut step = Step::Start;
    let mut statement = 0;
    for (token, range) in tokens(sql) {
        let text = &sql[range.clone()];
        let word = |w: &str| token == Token::Word && text.eq_ignore_ascii_case(w);
        // Inside a string or body too, where a Go template's action on its data
        // (`{{ .Options.Namespace }}`, `{{ index .Options "x" }}`) is left for text that pop
        // renders whole (found by a user trial: after the hint's fix of the code, the ones in
        // `IF NOT EXISTS` guards compared with the literal text). Other `{{ x }}` (a mustache
        // template stored in a table) is SQL text.
        if let Some(found) = (token == Token::Quoted)
            .then(|| go_template_action(text))
            .flatten()
        {
            let found = range.start + found.start..range.start + found.end;
            return Some((found.start, ClientOnly::Placeholder(&sql[found])));
        }
        step = match (token, step) {
            (Token::Space | Token::Comment, step) => step,
            (Token::Semicolon, _) => Step::Start,
            // `${schema}`, also right after a word (`users_${suffix}`: `$` is a word byte).
            (Token::Word, _) if text.ends_with('$') && sql[range.end..].starts_with('{') => {
                let start = range.end - 1;
                let end = sql[range.end..]
                    .find(['}', '\n'])
                    .filter(|&p| sql.as_bytes()[range.end + p] == b'}')
                    .map_or(range.end + 1, |p| range.end + p + 1);
                return Some((start, ClientOnly::Placeholder(&sql[start..end])));
            }
            // `{{ .Options "Namespace" }}`: a Go template (pop/soda, which gotrue and ory use);
            // PostgreSQL's grammar has no `{` outside strings.
            (Token::Symbol, _) if text == "{" && sql[range.end..].starts_with('{') => {
                let start = range.start;
                let end = sql[start..].find(['\n']).map_or(sql.len(), |p| start + p);
                let end = sql[start..end].find("}}").map_or(end, |p| start + p + 2);
                return Some((start, ClientOnly::Placeholder(&sql[start..end])));
            }
            (Token::Symbol, _) if text == "\\" => {
                let command = sql[range.start..]
                    .split(char::is_whitespace)
                    .next()
                    .unwrap_or(text);
                return Some((range.start, ClientOnly::MetaCommand(command)));
            }
            (_, Step::Start) => {
                statement = range.start;
                if word("copy") {
                    Step::Copy { depth: 0 }
                } else {
                    Step::Other
                }
            }
            (Token::Symbol, Step::Copy { depth }) if text == "(" => Step::Copy { depth: depth + 1 },
            (Token::Symbol, Step::Copy { depth }) if text == ")" => Step::Copy {
                depth: depth.saturating_sub(1),
            },
            (_, Step::Copy { depth: 0 }) if word("from") => Step::From,
            (_, Step::Copy { depth: 0 }) if word("to") => Step::To,
            (_, Step::From) if word("stdin") => {
                return Some((statement, ClientOnly::CopyFromStdin));
            }
            (_, Step::To) if word("stdout") => {
                return Some((statement, ClientOnly::CopyToStdout));
            }
            // `FROM 'file'`, `TO PROGRAM …`: the server reads or writes the data itself.
            (_, Step::From | Step::To) => Step::Other,
            (_, step) => step,
        };
    }
    None
}

/// The first Flyway placeholder inside a string, quoted identifier or dollar-quoted body of
/// `sql` (outside them, [`client_only`] finds every `${`), and the byte offset it starts at, up
/// to its `}` (unclosed on its line: up to the next whitespace): with `builtin_only`, only
/// Flyway's own (`${flyway:defaultSchema}`, `${flyway:user}`, …), which Flyway always defines and, unless a
/// script or project turns placeholder replacement off, replaces everywhere in the script, as
/// [`go_template_action`] finds pop's anywhere; otherwise any `${…}`, for a script whose
/// placeholder replacement is known to be on. Comments are left alone: whatever Flyway puts
/// there, nothing runs.
pub(crate) fn flyway_placeholder_in_quoted(sql: &str, builtin_only: bool) -> Option<(usize, &str)> {
    let needle = if builtin_only { "${flyway:" } else { "${" };
    tokens(sql)
        .filter(|(token, _)| *token == Token::Quoted)
        .find_map(|(_, range)| {
            let start = range.start + sql[range.clone()].find(needle)?;
            // Up to its `}` on the same line, else (unclosed) up to the next whitespace.
            let line_end = sql[start..range.end]
                .find('\n')
                .map_or(range.end, |p| start + p);
            let end = match sql[start..line_end].find('}') {
                Some(p) => start + p + 1,
                None => sql[start..line_end]
                    .find(char::is_whitespace)
                    .map_or(line_end, |p| start + p),
            };
            Some((start, &sql[start..end]))
        })
}

/// A transaction-control statement found in a script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TxStatement {
    /// From its first word to its `;` (or the end of the script).
    pub range: Range<usize>,
    /// Its first word as written (`BEGIN`, `commit`, `START`, …).
    pub keyword: String,
}

/// How a script uses transaction-control statements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TxControl {
    /// None at all.
    None,
    /// The script is wrapped whole: its first statement is a bare `BEGIN` (or
    /// `START TRANSACTION`), its last a bare `COMMIT` (or `END`), and nothing between controls
    /// the transaction. golang-migrate runs files as they are, so its users write this.
    Wrapped([TxStatement; 2]),
    /// Anything else: the first statement that ends, opens or aborts a transaction where the
    /// runner owns it (`COMMIT` mid-script, `ROLLBACK`, `BEGIN ISOLATION LEVEL …`, …).
    Misplaced(TxStatement),
}

/// What transaction control `sql` holds. Savepoints (`SAVEPOINT`, `RELEASE`, `ROLLBACK TO`)
/// stay inside the runner's transaction and are fine; the `END` closing a SQL-standard function
/// body (`BEGIN ATOMIC … END`) is not a transaction's.
pub(crate) fn transaction_control(sql: &str) -> TxControl {
    /// A statement's extent and its first code tokens (enough to classify it).
    struct Statement<'a> {
        range: Range<usize>,
        first: Vec<&'a str>,
        code_tokens: usize,
        opens_atomic_body: bool,
    }
    let mut statements: Vec<Statement<'_>> = Vec::new();
    let mut current: Option<Statement<'_>> = None;
    let mut previous_word = "";
    for (token, range) in tokens(sql) {
        match token {
            Token::Space | Token::Comment => continue,
            Token::Semicolon => {
                if let Some(mut statement) = current.take() {
                    statement.range.end = range.end;
                    statements.push(statement);
                }
                previous_word = "";
                continue;
            }
            Token::Quoted | Token::Word | Token::Symbol => {}
        }
        let text = &sql[range.clone()];
        let statement = current.get_or_insert_with(|| Statement {
            range: range.start..sql.len(),
            first: Vec::new(),
            code_tokens: 0,
            opens_atomic_body: false,
        });
        if statement.first.len() < 3 {
            statement.first.push(text);
        }
        statement.code_tokens += 1;
        if token == Token::Word
            && previous_word.eq_ignore_ascii_case("begin")
            && text.eq_ignore_ascii_case("atomic")
        {
            statement.opens_atomic_body = true;
        }
        previous_word = if token == Token::Word { text } else { "" };
    }
    statements.extend(current);

    /// What a statement is to the transaction the runner holds.
    #[derive(PartialEq)]
    enum Kind {
        Open,
        Close,
        Misplaced,
    }
    let mut atomic_bodies = 0usize;
    let mut found: Vec<(usize, Kind)> = Vec::new();
    for (index, statement) in statements.iter().enumerate() {
        let word = |i: usize| statement.first.get(i).map(|w| w.to_ascii_lowercase());
        // `BEGIN`, `BEGIN WORK`, `BEGIN TRANSACTION`: nothing else (an isolation level, READ
        // ONLY) can be carried over into the runner's transaction.
        let bare = statement.code_tokens == 1
            || (statement.code_tokens == 2
                && matches!(word(1).as_deref(), Some("work" | "transaction")));
        let kind = match (word(0).as_deref(), word(1).as_deref()) {
            (Some("end"), _) if atomic_bodies > 0 => {
                atomic_bodies -= 1;
                None
            }
            (Some("begin"), _) if bare => Some(Kind::Open),
            (Some("start"), Some("transaction")) if statement.code_tokens == 2 => Some(Kind::Open),
            (Some("commit" | "end"), _) if bare => Some(Kind::Close),
            (Some("rollback" | "abort"), Some("to")) => None,
            (Some("begin" | "start" | "commit" | "end" | "rollback" | "abort"), _) => {
                Some(Kind::Misplaced)
            }
            (Some("prepare"), Some("transaction")) => Some(Kind::Misplaced),
            _ => None,
        };
        if statement.opens_atomic_body {
            atomic_bodies += 1;
        }
        if let Some(kind) = kind {
            found.push((index, kind));
        }
    }
    let control = |index: usize| {
        let statement = &statements[index];
        TxStatement {
            range: statement.range.clone(),
            keyword: statement.first[0].to_owned(),
        }
    };
    match &found[..] {
        [] => TxControl::None,
        [(0, Kind::Open), (last, Kind::Close)] if *last == statements.len() - 1 => {
            TxControl::Wrapped([control(0), control(*last)])
        }
        [(0, Kind::Open), (second, _), ..] => TxControl::Misplaced(control(*second)),
        [(first, _), ..] => TxControl::Misplaced(control(*first)),
    }
}

/// What a run of a script is to PostgreSQL's lexer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    /// ASCII whitespace.
    Space,
    /// `-- …` with its newline, or `/* … */`.
    Comment,
    /// A string, quoted identifier or dollar-quoted text, quotes included.
    Quoted,
    /// A keyword, identifier, number or parameter (`$1`).
    Word,
    /// A `;` ending a statement.
    Semicolon,
    /// Any other (ASCII) byte: an operator, punctuation, a backslash.
    Symbol,
}

/// Where `text` holds a Go template action on the template's data, `{{ .x }}`, `{{- .x }}` or
/// `{{ index .x "y" }}`, up to its `}}` (or the end of its line).
fn go_template_action(text: &str) -> Option<Range<usize>> {
    let mut from = 0;
    while let Some(p) = text[from..].find("{{") {
        let start = from + p;
        let inner = text[start + 2..].trim_start_matches('-').trim_start();
        if inner.starts_with('.') || inner.starts_with("index .") {
            let line_end = text[start..].find('\n').map_or(text.len(), |p| start + p);
            let end = text[start..line_end]
                .find("}}")
                .map_or(line_end, |p| start + p + 2);
            return Some(start..end);
        }
        from = start + 2;
    }
    None
}

/// The tokens of `sql` with their byte ranges, which cover it. An unterminated comment or
/// quote runs to the end. Every range starts and ends on a character boundary: each ends on an
/// ASCII byte or at the end.
fn tokens(sql: &str) -> impl Iterator<Item = (Token, Range<usize>)> + '_ {
    let bytes = sql.as_bytes();
    let mut i = 0;
    // The index of the first byte at or after `from` that does not satisfy `keep`.
    let run = move |from: usize, keep: fn(u8) -> bool| {
        bytes[from..]
            .iter()
            .position(|&c| !keep(c))
            .map_or(bytes.len(), |p| from + p)
    };
    std::iter::from_fn(move || {
        let start = i;
        let b = *bytes.get(i)?;
        let prev_is_word = i > 0 && is_word_byte(bytes[i - 1]);
        let token = match b {
            b';' => {
                i += 1;
                Token::Semicolon
            }
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                i = run(i, |c| c != b'\n');
                i = (i + 1).min(bytes.len());
                Token::Comment
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                i = block_comment_end(bytes, i).unwrap_or(bytes.len());
                Token::Comment
            }
            b'\'' | b'"' => {
                i = quoted_end(bytes, i).unwrap_or(bytes.len());
                Token::Quoted
            }
            b'$' if !prev_is_word => match dollar_tag(bytes, i) {
                Some(_) => {
                    i = dollar_quoted_end(bytes, i).unwrap_or(bytes.len());
                    Token::Quoted
                }
                // `$1`.
                None => {
                    i = run(i, is_word_byte);
                    Token::Word
                }
            },
            c if c.is_ascii_whitespace() => {
                i = run(i, |c| c.is_ascii_whitespace());
                Token::Space
            }
            c if is_word_byte(c) => {
                i = run(i, is_word_byte);
                Token::Word
            }
            _ => {
                i += 1;
                Token::Symbol
            }
        };
        Some((token, start..i))
    })
}

/// Letters, digits, `_`, `$` and any non-ASCII byte (PostgreSQL identifiers may hold those).
fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}

/// Where `sql` opens a string, quoted identifier, dollar quote or block comment that it never
/// closes, and which of those it is. PostgreSQL would read the rest of the script as part of
/// it, and whatever the runner sends after the script too; so would every tool.
pub(crate) fn unclosed(sql: &str) -> Option<(usize, &'static str)> {
    // Only the last token can be unclosed: an unclosed one runs to the end.
    let (token, range) = tokens(sql).last()?;
    let bytes = sql.as_bytes();
    let at = range.start;
    let what = match (token, bytes[at]) {
        (Token::Comment, b'/') if block_comment_end(bytes, at).is_none() => "block comment",
        (Token::Quoted, b'\'') if quoted_end(bytes, at).is_none() => "string",
        (Token::Quoted, b'"') if quoted_end(bytes, at).is_none() => "quoted identifier",
        (Token::Quoted, b'$') if dollar_quoted_end(bytes, at).is_none() => "dollar-quoted string",
        _ => return None,
    };
    Some((at, what))
}

/// The index after the comment starting at `i` (`/*`; comments nest), or `None` when the
/// text ends inside it.
fn block_comment_end(bytes: &[u8], mut i: usize) -> Option<usize> {
    let mut depth = 0usize;
    while i < bytes.len() {
        if bytes[i..].starts_with(b"/*") {
            depth += 1;
            i += 2;
        } else if bytes[i..].starts_with(b"*/") {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return Some(i);
            }
        } else {
            i += 1;
        }
    }
    None
}

/// The index after the string (`'`) or quoted identifier (`"`) opening at `i`, or `None` when
/// the text ends inside it. A doubled quote is an escaped quote (that falls out of closing and
/// reopening); in an `E'…'` string (any case; the `E` must start a word) a backslash escapes
/// the next byte.
fn quoted_end(bytes: &[u8], i: usize) -> Option<usize> {
    let quote = bytes[i];
    let escapes = quote == b'\''
        && i > 0
        && matches!(bytes[i - 1], b'e' | b'E')
        && !(i > 1 && is_word_byte(bytes[i - 2]));
    let mut j = i + 1;
    while j < bytes.len() {
        match bytes[j] {
            b'\\' if escapes => j += 2,
            c if c == quote => return Some(j + 1),
            _ => j += 1,
        }
    }
    None
}

/// The index after the dollar quote opening at `i` (a [`dollar_tag`] is there), or `None` when
/// the text ends inside it.
fn dollar_quoted_end(bytes: &[u8], i: usize) -> Option<usize> {
    let tag = dollar_tag(bytes, i)?;
    find(bytes, i + tag.len(), tag).map(|p| p + tag.len())
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
    #[test]
    fn the_concurrently_statements_that_wait_out_older_transactions_are_told_apart() {
        use super::waits_out_older_transactions as waits;
        for yes in [
            "CREATE INDEX CONCURRENTLY i ON t (a)",
            "create unique index concurrently if not exists i on t (a)",
            "DROP INDEX CONCURRENTLY IF EXISTS i",
            "REINDEX INDEX CONCURRENTLY i",
            "REINDEX (CONCURRENTLY) TABLE t",
            "ALTER TABLE p DETACH PARTITION p1 CONCURRENTLY",
        ] {
            assert!(waits(yes), "{yes}");
        }
        for no in [
            "CREATE INDEX i ON t (a)",
            "REFRESH MATERIALIZED VIEW CONCURRENTLY v",
            "ALTER TABLE p DETACH PARTITION p1",
            "REINDEX INDEX i",
            "SELECT 'CREATE INDEX CONCURRENTLY i ON t (a)'",
            "CREATE TABLE concurrently (a int)",
            "CREATE INDEX CONCURRENTLY i ON t (a",
        ] {
            assert!(!waits(no), "{no}");
        }
    }

    #[test]
    fn the_statements_that_may_set_lock_timeout_are_told_apart() {
        use super::may_change_lock_timeout as sets;
        for yes in [
            "SET lock_timeout = '250ms'",
            "set local lock_timeout to 0",
            "RESET lock_timeout",
            "RESET ALL",
            "DISCARD ALL",
            "SELECT set_config('lock_timeout', '1s', false)",
            "SELECT pg_catalog.set_config('lock_timeout', '1s', false)",
            "DO $$ BEGIN PERFORM 1; END $$",
            "CALL setup()",
            "SET lock_timeout = ",
        ] {
            assert!(sets(yes), "{yes}");
        }
        for no in [
            "SET search_path = app",
            "SET statement_timeout = '5min'",
            "CREATE INDEX CONCURRENTLY i ON t (a)",
            "SELECT count(*) FROM t",
            "UPDATE t SET a = lower(a)",
            "SELECT 'SET lock_timeout = 0'",
        ] {
            assert!(!sets(no), "{no}");
        }
    }

    use super::split_statements as split;
    use super::{client_only, code_start, comments, transaction_control, ClientOnly, TxControl};

    #[test]
    fn what_a_script_never_closes() {
        use super::unclosed;
        assert_eq!(unclosed("SELECT 'a;\nSELECT 1;"), Some((7, "string")));
        assert_eq!(
            unclosed("SELECT 1; /* a /* b */"),
            Some((10, "block comment"))
        );
        assert_eq!(
            unclosed("DO $x$ BEGIN END $$;"),
            Some((3, "dollar-quoted string"))
        );
        assert_eq!(unclosed("SELECT \"a"), Some((7, "quoted identifier")));
        assert_eq!(unclosed("SELECT E'\\'"), Some((8, "string")));
        for closed in [
            "SELECT 'a''b';",
            "SELECT E'\\'';",
            "/* a /* b */ */ SELECT 1",
            "DO $x$ $$ $x$;",
            "SELECT $1, a$b -- '",
            "",
        ] {
            assert_eq!(unclosed(closed), None, "{closed}");
        }
    }

    #[test]
    fn comments_outside_strings_and_where_code_starts() {
        let sql = "-- a\nSELECT '-- no' /* b */; -- c";
        let found: Vec<(usize, &str)> = comments(sql).collect();
        assert_eq!(found, [(0, "-- a\n"), (20, "/* b */"), (29, "-- c")]);
        assert_eq!(&sql[code_start(sql, 0)..code_start(sql, 0) + 6], "SELECT");
        let after = sql.find(';').unwrap() + 1;
        assert_eq!(code_start(sql, after), sql.len(), "only a comment follows");
        assert_eq!(
            code_start(sql, sql.len() + 5),
            sql.len() + 5,
            "past the end: unchanged"
        );
    }

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

    #[test]
    fn psql_only_finds_backslash_commands_and_copy_to_and_from_the_client() {
        // What was found, and the text at its offset.
        let found = |sql| client_only(sql).map(|(at, what)| (what, &sql[at..at + 4]));
        assert_eq!(
            found("SELECT 1;\n\\restrict abc\n"),
            Some((ClientOnly::MetaCommand(r"\restrict"), r"\res"))
        );
        // Anywhere in code, not only at the start of a statement: `\gexec` ends a query.
        assert_eq!(
            found("SELECT 'x'\\gexec\n"),
            Some((ClientOnly::MetaCommand(r"\gexec"), r"\gex"))
        );
        assert_eq!(
            found("-- load\ncopy t (a, b) from\n  STDIN;\n1\t2\n\\.\n"),
            Some((ClientOnly::CopyFromStdin, "copy"))
        );
        assert_eq!(
            found("SELECT 1;\nCOPY (SELECT a FROM stdin) TO stdout WITH (FORMAT csv);"),
            Some((ClientOnly::CopyToStdout, "COPY"))
        );
        for fine in [
            r#"SELECT E'\\', '\', "a\b", $$ \x $$, $f$ \. $f$; -- \connect"#,
            r"/* \set /* \i */ */ SELECT 1",
            "COPY t FROM '/tmp/x.csv'; COPY t FROM PROGRAM 'cat x'",
            "COPY t TO '/tmp/x.csv'; COPY (SELECT a FROM stdin) TO PROGRAM 'cat'",
        ] {
            assert_eq!(client_only(fine), None, "{fine}");
        }
    }

    #[test]
    fn go_templates_in_code_and_actions_on_data_anywhere_are_found_mustache_text_is_not() {
        assert_eq!(
            client_only("CREATE TABLE {{ index .Options \"Namespace\" }}.users (id int);"),
            Some((
                13,
                ClientOnly::Placeholder("{{ index .Options \"Namespace\" }}")
            ))
        );
        assert_eq!(
            client_only("SELECT '{{x}}', '{1,2}'::int[], $$ {{ y }} $$;"),
            None
        );
        // An action on the template's data is pop's, in a string or body as well.
        let guard = "DO $$ BEGIN IF NOT EXISTS (SELECT 1 WHERE s = '{{ index .Options \"Namespace\" }}') THEN NULL; END IF; END $$;";
        assert_eq!(
            client_only(guard),
            Some((
                guard.find("{{").unwrap(),
                ClientOnly::Placeholder("{{ index .Options \"Namespace\" }}")
            ))
        );
        assert_eq!(
            client_only("SELECT '{{- .Options.Namespace }}'"),
            Some((8, ClientOnly::Placeholder("{{- .Options.Namespace }}")))
        );
    }

    #[test]
    fn flyway_placeholders_in_code_are_found_and_left_alone_in_strings_and_bodies() {
        let found = client_only;
        assert_eq!(
            found("CREATE TABLE ${schema}.users (id int);"),
            Some((13, ClientOnly::Placeholder("${schema}")))
        );
        assert_eq!(
            found("GRANT SELECT ON t TO ${flyway:user};"),
            Some((21, ClientOnly::Placeholder("${flyway:user}")))
        );
        assert_eq!(
            found("CREATE TABLE users_${suffix} (id int);"),
            Some((19, ClientOnly::Placeholder("${suffix}")))
        );
        // Unclosed on its line: up to the `{`.
        assert_eq!(
            found("SELECT ${x\n}"),
            Some((7, ClientOnly::Placeholder("${")))
        );
        for fine in [
            "SELECT '${x}', $$ ${y} $$, \"${z}\"; -- ${w}",
            "/* ${v} */ SELECT $1, $f$ ${u} $f$",
        ] {
            assert_eq!(client_only(fine), None, "{fine}");
        }
    }

    #[test]
    fn flyway_builtin_placeholders_are_found_in_strings_and_bodies_others_only_when_asked() {
        use super::flyway_placeholder_in_quoted as found;
        let body = "CREATE FUNCTION f() RETURNS int AS $$\nBEGIN\n  PERFORM 1 FROM ${flyway:defaultSchema}.t;\n  RETURN 1;\nEND $$ LANGUAGE plpgsql;";
        let at = body.find("${").unwrap();
        assert_eq!(found(body, true), Some((at, "${flyway:defaultSchema}")));
        assert_eq!(
            found("SELECT '${flyway:user}', \"${flyway:defaultSchema}\"", true),
            Some((8, "${flyway:user}"))
        );
        assert_eq!(
            found("COMMENT ON TABLE t IS $c$ ${flyway:timestamp $c$;", true),
            Some((26, "${flyway:timestamp"))
        );
        for fine in [
            "SELECT '${schema}', $$ ${x} $$;",
            "-- ${flyway:defaultSchema}\nSELECT 1; /* ${flyway:user} */",
            "SELECT '$flyway:x', '{flyway:y}';",
        ] {
            assert_eq!(found(fine, true), None, "{fine}");
        }
        assert_eq!(
            found("SELECT 1; SELECT '${schema}.t'", false),
            Some((18, "${schema}"))
        );
        assert_eq!(found("SELECT ${x} -- ${y}", false), None);
    }

    /// The keyword and the text of each transaction statement `sql` holds, or of the misplaced
    /// one.
    fn control(sql: &str) -> (&'static str, Vec<&str>) {
        match transaction_control(sql) {
            TxControl::None => ("none", vec![]),
            TxControl::Wrapped(w) => ("wrapped", w.iter().map(|t| &sql[t.range.clone()]).collect()),
            TxControl::Misplaced(t) => ("misplaced", vec![&sql[t.range]]),
        }
    }

    #[test]
    fn a_whole_file_wrapper_is_recognised_and_anything_else_is_misplaced() {
        assert_eq!(control("CREATE TABLE a (id int);"), ("none", vec![]));
        assert_eq!(
            control("-- up\nBEGIN;\nCREATE TABLE a (id int);\nCOMMIT;\n"),
            ("wrapped", vec!["BEGIN;", "COMMIT;"])
        );
        assert_eq!(
            control("start transaction; SELECT 1; end work"),
            ("wrapped", vec!["start transaction;", "end work"])
        );
        assert_eq!(
            control("SELECT 1; COMMIT; SELECT 2;"),
            ("misplaced", vec!["COMMIT;"])
        );
        assert_eq!(
            control("BEGIN; SELECT 1; COMMIT; SELECT 2;"),
            ("misplaced", vec!["COMMIT;"])
        );
        assert_eq!(control("BEGIN; SELECT 1;"), ("misplaced", vec!["BEGIN;"]));
        assert_eq!(
            control("BEGIN ISOLATION LEVEL SERIALIZABLE; SELECT 1; COMMIT;"),
            ("misplaced", vec!["BEGIN ISOLATION LEVEL SERIALIZABLE;"])
        );
        assert_eq!(
            control("SELECT 1; ROLLBACK;"),
            ("misplaced", vec!["ROLLBACK;"])
        );
        assert_eq!(
            control("BEGIN; SELECT 1; COMMIT AND CHAIN; COMMIT;"),
            ("misplaced", vec!["COMMIT AND CHAIN;"])
        );
    }

    #[test]
    fn savepoints_bodies_strings_and_atomic_function_ends_are_not_transaction_control() {
        assert_eq!(
            control("SAVEPOINT s; SELECT 1; ROLLBACK TO SAVEPOINT s; RELEASE s;"),
            ("none", vec![])
        );
        assert_eq!(
            control("DO $$ BEGIN PERFORM 1; COMMIT; END $$; SELECT 'COMMIT;'; -- COMMIT;\n"),
            ("none", vec![])
        );
        assert_eq!(
            control(
                "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END; SELECT 2;"
            ),
            ("none", vec![])
        );
        assert_eq!(
            control("BEGIN; CREATE FUNCTION f() RETURNS int LANGUAGE sql\nBEGIN ATOMIC\n SELECT 1;\nEND;\nCOMMIT;"),
            ("wrapped", vec!["BEGIN;", "COMMIT;"])
        );
    }
}
