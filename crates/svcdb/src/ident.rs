//! Validated SQL identifiers (schema, role and table names).

use std::fmt;

/// PostgreSQL truncates identifiers longer than `NAMEDATALEN - 1` bytes; we refuse them instead,
/// because a silently truncated schema name would point two services at the same schema.
pub const MAX_IDENT_BYTES: usize = 63;

/// A schema, role or table name that is safe to put into SQL.
///
/// Accepted: a lowercase ASCII letter or `_`, then lowercase letters, digits, `_` or `$`, at most
/// 63 bytes, not starting with `pg_` (reserved by PostgreSQL for system schemas and roles).
/// Uppercase is refused rather than folded: PostgreSQL folds unquoted names to lowercase, so
/// `Catalog` would name one schema in svcdb (which quotes) and another one in psql.
///
/// `Display` renders the quoted form (`"catalog"`), ready for SQL; [`Ident::as_str`] gives the
/// bare name for use as a bind parameter.
///
/// Every name that ends up inside generated SQL passes through [`Ident::new`] first, so an
/// injection-shaped name (`x; drop table y`, quotes, spaces) is refused before anything is sent
/// to the server, and [`Ident`]'s `Display` always renders the name double-quoted.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ident(String);

/// Why a name was refused as an identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} name {shown}: {reason}")]
pub struct IdentError {
    /// What the name was for ("schema", "role", "table").
    pub what: &'static str,
    /// The refused name, escaped for display (control characters shown as escapes).
    pub shown: String,
    /// What rule it broke and how to fix it.
    pub reason: String,
}

impl Ident {
    /// Validates `name` as an identifier for `what` ("schema", "role", "table", …).
    pub fn new(what: &'static str, name: &str) -> Result<Self, IdentError> {
        let refuse = |reason: String| IdentError {
            what,
            shown: format!("{name:?}"),
            reason,
        };
        if name.is_empty() {
            return Err(refuse("the name is empty".into()));
        }
        if name.len() > MAX_IDENT_BYTES {
            return Err(refuse(format!(
                "it is {} bytes long; PostgreSQL names hold at most {MAX_IDENT_BYTES}",
                name.len()
            )));
        }
        let first = name.as_bytes()[0];
        if !(first.is_ascii_lowercase() || first == b'_') {
            return Err(refuse(
                "a name must start with a lowercase letter or `_`".into(),
            ));
        }
        if let Some(bad) = name
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_' || *c == '$'))
        {
            let hint = if bad.is_ascii_uppercase() {
                "; use lowercase (PostgreSQL folds unquoted names to lowercase)"
            } else {
                ""
            };
            return Err(refuse(format!(
                "{bad:?} is not allowed; use lowercase letters, digits, `_` and `$`{hint}"
            )));
        }
        if name.starts_with("pg_") {
            return Err(refuse(
                "names starting with `pg_` are reserved by PostgreSQL".into(),
            ));
        }
        if name == "information_schema" {
            return Err(refuse("information_schema is PostgreSQL's own".into()));
        }
        Ok(Self(name.to_owned()))
    }

    /// Validates a comma-separated list (`"public, extensions"`); empty items are skipped.
    pub fn parse_list(what: &'static str, list: &str) -> Result<Vec<Self>, IdentError> {
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| Self::new(what, s))
            .collect()
    }

    /// The bare name, for bind parameters and catalog look-ups.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as a single-quoted SQL string literal (for the few statements, such as
    /// `ALTER ROLE … SET`, that take a literal and cannot take a bind parameter).
    pub fn literal(&self) -> String {
        // Validation already excludes quotes; the doubling keeps this correct on its own.
        quote_literal(&self.0)
    }
}

/// `value` as a single-quoted SQL string literal (quotes doubled; with
/// `standard_conforming_strings`, PostgreSQL's default since 9.1, backslashes are plain).
pub(crate) fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Validation excludes `"`, so no escaping is needed; quoting keeps keywords
        // such as `user` or `order` usable as names.
        write!(f, "\"{}\"", self.0)
    }
}

impl fmt::Debug for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ident({})", self.0)
    }
}

impl AsRef<str> for Ident {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl serde::Serialize for Ident {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// Renders a list of identifiers as a quoted, comma-separated SQL list (`"a", "b"`).
pub(crate) fn quoted_list(idents: &[Ident]) -> String {
    idents
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for name in ["catalog", "catalog_schema", "_x", "orders2", "a$b", "user"] {
            assert_eq!(Ident::new("schema", name).unwrap().as_str(), name);
        }
        assert_eq!(
            Ident::new("schema", &"a".repeat(63))
                .unwrap()
                .as_str()
                .len(),
            63
        );
    }

    #[test]
    fn refuses_injection_shaped_and_invalid_names() {
        for name in [
            "",
            "x; drop table y",
            "x\"y",
            "x'y",
            "with space",
            "Catalog",
            "1abc",
            "$x",
            "pg_catalog",
            // Found by a robustness trial: a service's tables and history went into it.
            "information_schema",
            "a-b",
            "naïve",
            "x\0",
            "x\n",
            &"a".repeat(64),
        ] {
            let err = Ident::new("schema", name).unwrap_err();
            assert_eq!(err.what, "schema", "{name:?}");
        }
    }

    #[test]
    fn display_quotes_and_literal_escapes() {
        let id = Ident::new("table", "order").unwrap();
        assert_eq!(id.to_string(), "\"order\"");
        assert_eq!(id.literal(), "'order'");
    }

    #[test]
    fn parse_list_skips_blanks_and_validates_each() {
        let l = Ident::parse_list("schema", " public, extensions ,,").unwrap();
        assert_eq!(
            l.iter().map(Ident::as_str).collect::<Vec<_>>(),
            ["public", "extensions"]
        );
        assert!(Ident::parse_list("schema", "public, x;y").is_err());
        assert_eq!(quoted_list(&l), "\"public\", \"extensions\"");
    }
}
