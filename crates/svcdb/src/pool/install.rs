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
    pub(crate) async fn install_ddl(&self, ddl: &'static str) -> Result<()> {
        const ATTEMPTS: u32 = 3;
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
}
