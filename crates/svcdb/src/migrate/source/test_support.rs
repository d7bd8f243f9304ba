//! Helpers of the source's unit tests: a folder of migration files in a temporary directory,
//! parsed as `Migrations::from_dir` reads it.

use std::path::Path;

use super::Migrations;
use crate::migrate::error::MigrateError;
use crate::migrate::version::Version;

/// A goose file: header comments, `NO TRANSACTION`, markers in mixed case and spacing.
pub(super) const GOOSE: &str = "\
-- Adds the index without locking writes.
-- +goose NO TRANSACTION

--   +goose   up
-- +goose StatementBegin
CREATE INDEX CONCURRENTLY a_id ON a (id);
-- +goose StatementEnd

-- +GOOSE DOWN
DROP INDEX CONCURRENTLY a_id;
";

/// Writes `files` (path relative to `dir`, contents) into `dir`.
pub(super) fn write(dir: &Path, files: &[(&str, &[u8])]) {
    for (rel, contents) in files {
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, contents).unwrap();
    }
}

pub(super) fn parse(files: &[(&str, &[u8])]) -> Result<Migrations, MigrateError> {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), files);
    Migrations::from_dir(dir.path())
}

/// The path of a `Source` error.
pub(super) fn source_error_path(files: &[(&str, &[u8])]) -> String {
    match parse(files) {
        Err(MigrateError::Source { path, .. }) => path,
        other => panic!("expected a source error, got {other:?}"),
    }
}

/// The version numbered `n` (as the history's integer column and `0001`-style files number it).
pub(super) fn v(n: i64) -> Version {
    Version::try_from(n).expect("a non-negative version")
}
