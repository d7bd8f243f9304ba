//! Printing reports: JSON (one object) with `--json`, otherwise tables and lines.

use std::fmt::Display;

use anyhow::Result;
use comfy_table::{presets::UTF8_FULL_CONDENSED, ContentArrangement, Table};
use serde::Serialize;

/// Prints `value` as one line of JSON.
pub fn json<T: Serialize>(value: &T) -> Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

/// Prints a command's report: `value` as JSON with `--json`, else the text `text` makes of
/// it. Reports go through here so that `--json` always means exactly one JSON object on stdout.
pub fn report<T: Serialize>(
    as_json: bool,
    value: &T,
    text: impl FnOnce(&T) -> String,
) -> Result<()> {
    if as_json {
        json(value)
    } else {
        println!("{}", text(value));
        Ok(())
    }
}

/// Prints a progress line as it happens: on stdout, or on stderr with `--json` so that stdout
/// holds only the final JSON report.
pub fn progress(as_json: bool, line: &dyn Display) {
    if as_json {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
}

/// How long a step took, or `-` for one that did not run.
pub fn took(ms: Option<f64>) -> String {
    ms.map_or_else(|| "-".to_owned(), millis)
}

/// A duration given in milliseconds, for people: `12.3 ms` below ten seconds, else `42.0 s`.
pub fn millis(ms: f64) -> String {
    if ms < 10_000.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{:.1} s", ms / 1e3)
    }
}

/// A table with the given header, sized to the terminal.
pub fn table<I, S>(header: I) -> Table
where
    I: IntoIterator<Item = S>,
    S: Into<comfy_table::Cell>,
{
    let mut table = Table::new();
    table
        .load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header);
    table
}
