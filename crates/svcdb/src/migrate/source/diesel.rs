//! diesel's `metadata.toml`, the one file of a diesel migration that is no script.

/// diesel's `metadata.toml`.
#[derive(serde::Deserialize)]
struct Metadata {
    run_in_transaction: Option<bool>,
}

/// Whether diesel's `metadata.toml` (its bytes) says `run_in_transaction = false`, or what is
/// wrong with it.
pub(super) fn metadata_says_no_tx(metadata: &[u8]) -> Result<bool, String> {
    let text = std::str::from_utf8(metadata).map_err(|_| "is not valid UTF-8".to_owned())?;
    let parsed: Metadata = toml::from_str(text).map_err(|e| format!("is not valid TOML: {e}"))?;
    Ok(parsed.run_in_transaction == Some(false))
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{parse, source_error_path, v};

    #[test]
    fn diesel_layout_with_metadata_toml() {
        let m = parse(&[
            (
                "2017-09-23-182408_create_users/up.sql",
                b"CREATE TABLE users (id int);",
            ),
            (
                "2017-09-23-182408_create_users/down.sql",
                b"DROP TABLE users;",
            ),
            (
                "2017-09-24-000000_index/up.sql",
                b"CREATE INDEX CONCURRENTLY u ON users (id);",
            ),
            (
                "2017-09-24-000000_index/down.sql",
                b"DROP INDEX CONCURRENTLY u;",
            ),
            (
                "2017-09-24-000000_index/metadata.toml",
                b"run_in_transaction = false\n",
            ),
            ("2017-09-25-000000_explicit/up.sql", b"SELECT 1;"),
            (
                "2017-09-25-000000_explicit/metadata.toml",
                b"run_in_transaction = true\n",
            ),
        ])
        .unwrap();
        let users = m.get(&v(20170923182408)).unwrap();
        assert!(users.transactional && users.down_transactional);
        let index = m.get(&v(20170924000000)).unwrap();
        assert!(!index.transactional && !index.down_transactional);
        assert!(m.get(&v(20170925000000)).unwrap().transactional);
    }

    #[test]
    fn bad_metadata_toml() {
        let path = source_error_path(&[
            ("1_a/up.sql", b"SELECT 1;"),
            ("1_a/metadata.toml", b"run_in_transaction = maybe"),
        ]);
        assert!(path.ends_with("1_a/metadata.toml"), "{path}");
    }
}
