//! Printing reports: JSON (one object) with `--json`, otherwise tables and lines.

use std::fmt::Display;
use std::io::Write;

use anyhow::Result;
use comfy_table::{presets::UTF8_FULL_CONDENSED, ContentArrangement, Table};
use serde::Serialize;

/// `println!` that does not panic when stdout is closed (`svcdb migrate up | head -1`): the
/// reader has gone, but the command's work goes on to its end (a deploy stopped half-way by a
/// closed pipe would roll back, or leave a non-transactional migration dirty), and the exit
/// code still says how it went. The `print!` macros panic on a write error (exit 101).
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::output::write_line(&mut std::io::stdout().lock(), format_args!($($arg)*))
    };
}

/// [`outln!`] for stderr (`2>&1 | head -1` closes it too).
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::output::write_line(&mut std::io::stderr().lock(), format_args!($($arg)*))
    };
}

pub(crate) use {errln, outln};

/// Writes `line` and a newline to `to`. A closed pipe is ignored (see [`outln!`]); any other
/// failure (a full disk: `> /dev/full`) is kept for [`write_failure`], so that the command
/// still runs to its end but does not exit 0 with its report lost.
pub fn write_line(to: &mut impl Write, line: std::fmt::Arguments<'_>) {
    if let Err(e) = to.write_fmt(line).and_then(|()| to.write_all(b"\n")) {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            let _ = WRITE_FAILURE.set(e.to_string());
        }
    }
}

/// The first failure to write output other than a closed pipe.
static WRITE_FAILURE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The first failure to write output other than a closed pipe, if any.
pub fn write_failure() -> Option<&'static str> {
    WRITE_FAILURE.get().map(String::as_str)
}

/// Prints `value` as one line of JSON.
pub fn json<T: Serialize>(value: &T) -> Result<()> {
    outln!("{}", serde_json::to_string(value)?);
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
        outln!("{}", text(value));
        Ok(())
    }
}

/// Prints a progress line as it happens: on stdout, or on stderr with `--json` so that stdout
/// holds only the final JSON report.
pub fn progress(as_json: bool, line: &dyn Display) {
    if as_json {
        errln!("{line}");
    } else {
        outln!("{line}");
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
