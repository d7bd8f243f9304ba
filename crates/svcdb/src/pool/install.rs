//! Installing svcdb's own tables (the idempotency claims, the outbox) in the service schema.

use crate::error::{is_lost_create_race, Error, Result};
use crate::pool::ServiceDb;

impl ServiceDb {
    /// Runs svcdb's own `CREATE TABLE IF NOT EXISTS …` script (`ddl`) in the service schema,
    /// safely when several replicas start at once.
    ///
    /// The script runs in one transaction with `search_path` set to the service schema alone, so
    /// the tables cannot land in an extra schema (`public`) when the service schema is missing:
    /// that is an error (SQLSTATE 3F000) instead. Two sessions creating the same table at the same
    /// moment both pass the `IF NOT EXISTS` check and the loser fails with a catalog conflict
    /// (23505 on `pg_type`, …) once the winner commits; the winner's script created everything, so
    /// the loser runs the script again, now as a no-op, to confirm it.
    ///
    /// When every relation of `installed` (and column, `table.column`) is there already, the
    /// script does not run: its `CREATE INDEX IF NOT EXISTS` takes a SHARE lock on the table
    /// before it finds the index there, and waits behind any transaction writing the table,
    /// which in turn queues every later write (found by a user trial: a replica starting made
    /// another replica's requests wait 11 s). One catalog query, no lock.
    pub(crate) async fn install_ddl(&self, ddl: &'static str, installed: &[&str]) -> Result<()> {
        const ATTEMPTS: u32 = 3;
        if self.installed(installed).await? {
            return Ok(());
        }
        let set_path = format!("SET LOCAL search_path TO {}", self.schema());
        let mut attempt = 1;
        loop {
            let outcome = self
                .transaction(async |tx| {
                    tx.batch_execute(&set_path).await?;
                    tx.batch_execute(ddl).await?;
                    Ok::<_, Error>(())
                })
                .await;
            match outcome {
                Err(Error::Db(e)) if is_lost_create_race(&e) && attempt < ATTEMPTS => {
                    // The target it logged under when this lived in `event`: filters keep working.
                    tracing::debug!(target: "svcdb::event", attempt, "another session created svcdb's tables at the same time; checking again");
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Whether every relation named in `installed` (or column, written `table.column`) is in
    /// the service schema.
    async fn installed(&self, installed: &[&str]) -> Result<bool> {
        if installed.is_empty() {
            return Ok(false);
        }
        let schema = self.schema().as_str();
        let (relations, columns): (Vec<&str>, Vec<&str>) =
            installed.iter().partition(|name| !name.contains('.'));
        let conn = self.get().await?;
        let found: bool = conn
            .query_one(
                "SELECT (SELECT count(*) FROM pg_catalog.pg_class c
                           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                          WHERE n.nspname = $1 AND c.relname = ANY($2)) = cardinality($2)
                    AND (SELECT count(*) FROM pg_catalog.pg_attribute a
                           JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
                           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                          WHERE n.nspname = $1 AND NOT a.attisdropped
                            AND c.relname || '.' || a.attname = ANY($3)) = cardinality($3)",
                &[&schema, &relations, &columns],
            )
            .await?
            .get(0);
        Ok(found)
    }
}
