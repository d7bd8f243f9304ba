//! What Flyway decides from a script's statements rather than from a marker: whether the
//! migration runs inside a transaction.

use pg_query::protobuf::{DiscardMode, ReindexObjectType};
use pg_query::NodeEnum;

/// True when `sql` holds a statement that Flyway runs outside a transaction, which makes
/// Flyway run the whole migration outside one (refusing the migration, unless its `mixed`
/// setting is on, when other statements could have run inside one). A Flyway folder marks
/// nothing: a `V7__index.sql` of one `CREATE INDEX CONCURRENTLY` just works there, so svcdb
/// reads such a script as if it began with the no-transaction directive, and the file stays
/// as Flyway checksummed it.
///
/// The statements are those of Flyway's `PostgreSQLParser.detectCanExecuteInTransaction`:
/// `CREATE`/`DROP` `DATABASE`, `TABLESPACE` or `SUBSCRIPTION`, `ALTER SYSTEM`,
/// `CREATE`/`DROP INDEX CONCURRENTLY`, `REINDEX SCHEMA`/`DATABASE`/`SYSTEM`, `VACUUM`,
/// and `DISCARD ALL`; and `REINDEX … CONCURRENTLY`, which PostgreSQL refuses inside a
/// transaction too. Not `ALTER TYPE … ADD VALUE`: Flyway runs it outside a transaction only on
/// PostgreSQL before 12, which refused it inside one (found by a user trial: svcdb ran such a
/// script, Kestra's 100-statement first migration, outside a transaction, where Flyway on
/// PostgreSQL 12+ runs it in one; svcdb ends the transaction after it instead, so that later
/// migrations may use the value). They are
/// told apart by PostgreSQL's own parser; a script it rejects stays transactional, and its
/// error comes when it runs.
pub(super) fn runs_outside_a_transaction(sql: &str) -> bool {
    // Parsing costs about as much as reading the file, on every start of a service that
    // embeds its migrations: only a script that names one of these words can hold such a
    // statement (the parser still decides).
    const WORDS: [&str; 8] = [
        "concurrently",
        "vacuum",
        "database",
        "tablespace",
        "system",
        "discard",
        "subscription",
        "reindex",
    ];
    let lower = sql.to_ascii_lowercase();
    if !WORDS.iter().any(|w| lower.contains(w)) {
        return false;
    }
    let Ok(parsed) = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT) else {
        return false;
    };
    parsed
        .protobuf
        .stmts
        .iter()
        .filter_map(|raw| raw.stmt.as_ref().and_then(|s| s.node.as_ref()))
        .any(outside_a_transaction)
}

/// What a Flyway script config file (`V2__x.sql.conf`) says, where svcdb reads it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct ScriptConfig {
    /// `executeInTransaction`: `Some(false)` or `Some(true)` (both override
    /// [`runs_outside_a_transaction`], as in Flyway), `None` when it does not say.
    pub in_transaction: Option<bool>,
    /// `placeholderReplacement`: `Some(false)` when Flyway replaces nothing in the script (as
    /// svcdb), `Some(true)` when it replaces every `${…}` in it, strings and function bodies
    /// too; `None` when it does not say (Flyway's built-in `${flyway:…}` are replaced
    /// anyway, others as the project's settings say).
    pub placeholder_replacement: Option<bool>,
}

/// What Flyway's script config file (`V2__x.sql.conf`, Java properties) says about the
/// script: its transaction (`executeInTransaction`) and whether Flyway replaces placeholders in
/// it (`placeholderReplacement`); or what is wrong with it. `encoding` may only name UTF-8, the
/// encoding svcdb reads; any other property (Flyway Teams' `shouldExecute`) is refused rather
/// than ignored.
pub(super) fn script_config(bytes: &[u8]) -> Result<ScriptConfig, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "is not valid UTF-8".to_owned())?;
    let mut config = ScriptConfig::default();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
            continue;
        }
        let Some((key, value)) = line.split_once(['=', ':']) else {
            return Err(format!(
                "cannot read {line:?}: expected `property=value`, e.g. `executeInTransaction=false`"
            ));
        };
        let value = value.trim();
        let boolean = |key: &str| match value.to_ascii_lowercase().as_str() {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err(format!("{key} is true or false, not {value:?}")),
        };
        match key.trim() {
            "executeInTransaction" => {
                config.in_transaction = Some(boolean("executeInTransaction")?);
            }
            "placeholderReplacement" => {
                config.placeholder_replacement = Some(boolean("placeholderReplacement")?);
            }
            "encoding" if matches!(value.to_ascii_uppercase().as_str(), "UTF-8" | "UTF8") => {}
            "encoding" => {
                return Err(format!(
                    "encoding {value} is not UTF-8, the only encoding svcdb reads\n  hint: save the script as UTF-8 and set encoding=UTF-8"
                ))
            }
            other => {
                return Err(format!(
                    "{other} is not a script config property svcdb reads (executeInTransaction, placeholderReplacement, encoding)\n  hint: remove it; svcdb would run the script whatever it says"
                ))
            }
        }
    }
    Ok(config)
}

fn outside_a_transaction(node: &NodeEnum) -> bool {
    match node {
        NodeEnum::CreatedbStmt(_)
        | NodeEnum::DropdbStmt(_)
        | NodeEnum::CreateTableSpaceStmt(_)
        | NodeEnum::DropTableSpaceStmt(_)
        | NodeEnum::CreateSubscriptionStmt(_)
        | NodeEnum::DropSubscriptionStmt(_)
        | NodeEnum::AlterSystemStmt(_) => true,
        NodeEnum::IndexStmt(index) => index.concurrent,
        NodeEnum::DropStmt(drop) => drop.concurrent,
        NodeEnum::ReindexStmt(reindex) => {
            matches!(
                ReindexObjectType::try_from(reindex.kind),
                Ok(ReindexObjectType::ReindexObjectSchema
                    | ReindexObjectType::ReindexObjectSystem
                    | ReindexObjectType::ReindexObjectDatabase)
            ) || reindex.params.iter().any(
                |p| matches!(&p.node, Some(NodeEnum::DefElem(d)) if d.defname == "concurrently"),
            )
        }
        NodeEnum::VacuumStmt(vacuum) => vacuum.is_vacuumcmd,
        NodeEnum::DiscardStmt(discard) => discard.target == DiscardMode::DiscardAll as i32,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::runs_outside_a_transaction as outside;
    use super::{script_config, ScriptConfig};

    #[test]
    fn script_config_files_say_whether_the_script_runs_in_a_transaction() {
        let tx = |bytes: &[u8]| script_config(bytes).map(|c| c.in_transaction);
        assert_eq!(tx(b"executeInTransaction=false\n"), Ok(Some(false)));
        assert_eq!(
            tx(b"# why\nencoding = UTF-8\nexecuteInTransaction : TRUE\n"),
            Ok(Some(true))
        );
        assert_eq!(tx(b"encoding=utf8\n\n"), Ok(None));
        for bad in [
            &b"executeInTransaction=maybe"[..],
            b"placeholderReplacement=off",
            b"encoding=ISO-8859-1",
            b"shouldExecute=${flyway:environment}==prod",
            b"executeInTransaction",
            b"\xff",
        ] {
            assert!(
                script_config(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn script_config_files_say_whether_flyway_replaces_placeholders() {
        assert_eq!(
            script_config(b"placeholderReplacement=false\nexecuteInTransaction=false\n"),
            Ok(ScriptConfig {
                in_transaction: Some(false),
                placeholder_replacement: Some(false),
            })
        );
        assert_eq!(
            script_config(b"placeholderReplacement = TRUE").map(|c| c.placeholder_replacement),
            Ok(Some(true))
        );
        assert_eq!(
            script_config(b"").map(|c| c.placeholder_replacement),
            Ok(None)
        );
    }

    #[test]
    fn the_statements_flyway_runs_outside_a_transaction() {
        for sql in [
            "CREATE INDEX CONCURRENTLY i ON t (a);",
            "create unique index concurrently if not exists i on t (a)",
            "SELECT 1; DROP INDEX CONCURRENTLY IF EXISTS i;",
            "REINDEX SCHEMA public",
            "REINDEX (VERBOSE) DATABASE app",
            "REINDEX INDEX CONCURRENTLY i",
            "VACUUM ANALYZE t",
            "DISCARD ALL",
            "CREATE DATABASE other",
            "DROP TABLESPACE IF EXISTS fast",
            "ALTER SYSTEM SET work_mem = '8MB'",
        ] {
            assert!(outside(sql), "{sql}");
        }
        for sql in [
            "CREATE INDEX i ON t (a); DROP INDEX i;",
            "REINDEX TABLE t",
            "ANALYZE t",
            "DISCARD PLANS",
            "ALTER TYPE mood RENAME VALUE 'meh' TO 'fine'",
            // Flyway on PostgreSQL 12+ runs it in the script's transaction.
            "ALTER TYPE mood ADD VALUE 'meh' AFTER 'ok'",
            "ALTER TYPE mood ADD VALUE IF NOT EXISTS 'meh'",
            "CREATE TABLE vacuum (concurrently int)",
            "SELECT 'CREATE INDEX CONCURRENTLY i ON t (a)'",
            // PostgreSQL's parser rejects it: left to fail when it runs, inside a transaction.
            "CREATE INDEX CONCURRENTLY i ON t (a",
        ] {
            assert!(!outside(sql), "{sql}");
        }
    }
}
