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
