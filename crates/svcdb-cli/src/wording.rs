//! The library's messages, worded for the command line.
//!
//! One message serves the library and the CLI; where it names an option it gives both
//! spellings, the flag and the library's name in brackets: "`--allow-unsafe`
//! (MigrateOptions::allow_unsafe)", "(SVCDB_CREATE_SCHEMA=true, Config::create_schema)". At the
//! command line the library's names mean nothing (three user trials tripped over them), so the
//! CLI drops them before printing: a bracket holding only such names goes, and a name next to
//! a flag or variable leaves the rest.

/// `text` without the library's item paths in brackets.
pub fn for_cli(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find('(') {
        let Some(len) = rest[open..].find(')') else {
            break;
        };
        let inner = &rest[open + 1..open + len];
        out.push_str(&rest[..open]);
        match without_items(inner) {
            Some(kept) if kept.is_empty() => {
                // The bracket goes with the space before it.
                if out.ends_with(' ') {
                    out.pop();
                }
            }
            Some(kept) => {
                out.push('(');
                out.push_str(&kept);
                out.push(')');
            }
            None => out.push_str(&rest[open..=open + len]),
        }
        rest = &rest[open + len + 1..];
    }
    out.push_str(rest);
    out
}

/// The bracket's text without its item paths, or `None` when it holds none (or a nested
/// bracket: left as it is).
fn without_items(inner: &str) -> Option<String> {
    if inner.contains('(') {
        return None;
    }
    let mut kept: Vec<String> = Vec::new();
    let mut dropped = false;
    // After a dropped path, bare member names that continue it ("lock_retries, lock_timeout").
    let mut after_item = false;
    for part in inner.split(", ") {
        let part = part.trim();
        // "MigrateOptions::statement_timeout: raise it": the advice stays without the name;
        // "Gate::allow_unknown_applied accepts it": a clause about the library goes whole.
        if let Some((first, rest)) = part.split_once(' ') {
            if first.strip_suffix(':').is_some_and(is_item) {
                dropped = true;
                after_item = false;
                kept.push(rest.to_owned());
                continue;
            }
            if is_item(first) {
                dropped = true;
                after_item = false;
                continue;
            }
        }
        // "Ctrl-C, SIGTERM: Migrator::with_interrupt": the path after a colon goes.
        let (head, tail) = match part.rsplit_once(": ") {
            Some((head, tail)) if is_item(tail) => (Some(head), tail),
            _ => (None, part),
        };
        if is_item(tail) || (after_item && head.is_none() && is_member(tail)) {
            dropped = true;
            after_item = true;
            if let Some(head) = head {
                kept.push(head.to_owned());
            }
            continue;
        }
        after_item = false;
        kept.push(part.to_owned());
    }
    dropped.then(|| kept.join(", "))
}

/// `Type::member` (or a longer path), in backticks or not, starting with a type's capital.
fn is_item(s: &str) -> bool {
    let s = s.trim_matches('`');
    let mut segments = s.split("::");
    let first = segments.next().unwrap_or_default();
    let rest: Vec<&str> = segments.collect();
    first.starts_with(|c: char| c.is_ascii_uppercase())
        && first.chars().all(|c| c.is_ascii_alphanumeric())
        && !rest.is_empty()
        && rest.iter().all(|m| is_member(m) || is_type(m))
}

/// A snake-case member name: `lock_timeout`.
fn is_member(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// A type's name: `Migrator`.
fn is_type(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_uppercase()) && s.chars().all(|c| c.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::for_cli;

    #[test]
    fn library_names_in_brackets_are_dropped() {
        for (library, cli) in [
            (
                "pass `--allow-unsafe` (MigrateOptions::allow_unsafe) to run it",
                "pass `--allow-unsafe` to run it",
            ),
            (
                "or let svcdb create it when it connects (SVCDB_CREATE_SCHEMA=true, Config::create_schema)",
                "or let svcdb create it when it connects (SVCDB_CREATE_SCHEMA=true)",
            ),
            (
                "allow more with `--lock-retries`/`--lock-timeout` (MigrateOptions::lock_retries, lock_timeout), which queues",
                "allow more with `--lock-retries`/`--lock-timeout`, which queues",
            ),
            (
                "by an interrupt of the runner (Ctrl-C, SIGTERM: Migrator::with_interrupt), or",
                "by an interrupt of the runner (Ctrl-C, SIGTERM), or",
            ),
            (
                "`svcdb migrate down --to 0003` (DownOptions::to) reverts",
                "`svcdb migrate down --to 0003` reverts",
            ),
            (
                "by the statement timeout (`--statement-timeout`, MigrateOptions::statement_timeout: raise it, or 0 for none), or",
                "by the statement timeout (`--statement-timeout`, raise it, or 0 for none), or",
            ),
            (
                "accept it with `--ignore-missing` (Gate::allow_unknown_applied, MigrateOptions::ignore_missing for a service)",
                "accept it with `--ignore-missing`",
            ),
        ] {
            assert_eq!(for_cli(library), cli);
        }
    }

    /// The control: brackets holding anything else, a path inside a sentence, an unclosed
    /// bracket and SQL are left as they are.
    #[test]
    fn other_brackets_are_left_alone() {
        for text in [
            "find it in pg_stat_activity (a long or idle-in-transaction session), then",
            "CREATE TABLE t (id int, n bigint)",
            "version 0002 (add_name) is dirty",
            "an unclosed (bracket",
            "SELECT count(*) FROM t",
            "(SQLSTATE 42501)",
        ] {
            assert_eq!(for_cli(text), text);
        }
    }
}
