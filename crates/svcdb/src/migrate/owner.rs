//! Migrating as the schema's owner, whichever role connected.
//!
//! What a migration creates belongs to the role that runs it. Run as an administrator (a new
//! shell, a skipped `export DATABASE_URL=…`), the history table and every table would belong to
//! that administrator, and the service's own role would then get `permission denied` on its own
//! schema. So a runner connected as another role than the schema's owner works as the owner
//! (`SET ROLE`) on its dedicated connection for the run, when the server lets it (a superuser,
//! or a member of the owner role: PostgreSQL docs, "SET ROLE"; from PostgreSQL 16 the
//! membership must carry the `SET` option), and refuses before running anything otherwise.

use tokio_postgres::Client;

use super::error::MigrateError;
use super::event::MigrateEvent;
use crate::error::SqlState;
use crate::ident::Ident;

/// Switches the runner's connection to `schema`'s owner when the connected role is another
/// one, telling `observer` ([`MigrateEvent::ActingAsOwner`]); [`MigrateError::NotOwner`] when
/// the server refuses the switch. Returns the role the connection now works as. A schema
/// that does not exist is left to the caller, which reports it where it needs the schema.
pub(crate) async fn act_as_owner(
    client: &Client,
    schema: &Ident,
    observer: &mut (dyn FnMut(&MigrateEvent) + Send),
) -> Result<String, MigrateError> {
    // svcdb's own tables there, with the names of those another role owns.
    let own = [
        super::migration::HISTORY_TABLE,
        super::repeatable::REPEATABLES_TABLE,
    ];
    let row = client
        .query_one(
            "SELECT current_user::text, pg_get_userbyid(n.nspowner)::text, \
                    quote_ident(pg_get_userbyid(n.nspowner)), \
                    ARRAY(SELECT quote_ident(c.relname) FROM pg_catalog.pg_class c \
                           WHERE c.relnamespace = n.oid AND c.relname = ANY($2) \
                             AND c.relowner <> n.nspowner) \
               FROM (SELECT) AS one \
               LEFT JOIN pg_catalog.pg_namespace n ON n.nspname = $1",
            &[&schema.as_str(), &&own[..]],
        )
        .await?;
    let connected: String = row.get(0);
    let (Some(owner), Some(owner_sql)): (Option<String>, Option<String>) = (row.get(1), row.get(2))
    else {
        return Ok(connected);
    };
    // `public` belongs to pg_database_owner from PostgreSQL 15 on: a stand-in for whoever
    // owns the database, which no object should belong to. Its objects are the connected
    // role's, as they always were.
    if owner == connected || owner == "pg_database_owner" {
        return Ok(connected);
    }
    let others: Vec<String> = row.get::<_, Option<Vec<String>>>(3).unwrap_or_default();
    give_own_tables_to(client, schema, &others, &owner_sql).await;
    // Asking the server to switch, rather than predicting its answer from pg_has_role, keeps
    // one rule for every version (PostgreSQL 16 added the SET option to memberships).
    match client.batch_execute(&format!("SET ROLE {owner_sql}")).await {
        Ok(()) => {
            observer(&MigrateEvent::ActingAsOwner {
                schema: schema.as_str().to_owned(),
                connected,
                owner: owner.clone(),
            });
            Ok(owner)
        }
        Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {
            Err(MigrateError::NotOwner {
                schema: schema.as_str().to_owned(),
                connected,
                owner,
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// Gives svcdb's own `tables` in `schema` (of its history and repeatables tables, those that
/// belong to another role; quoted) to the schema's owner (`owner_sql`, quoted), while the
/// connection is still the connected role's. A migration may have handed the schema to another role
/// (`ALTER SCHEMA … OWNER TO`, as Conductor's first Flyway migration does) after svcdb made its
/// tables as the role that ran it: the new owner, which every later run switches to, could
/// not write them (42501 on `svcdb_migrations`; found by a trial). Best effort: where the
/// connected role may not (neither a superuser nor the tables' owner and a member of the new
/// one), the run goes on and reports what the server then refuses.
async fn give_own_tables_to(client: &Client, schema: &Ident, tables: &[String], owner_sql: &str) {
    for table in tables {
        let alter = format!("ALTER TABLE {schema}.{table} OWNER TO {owner_sql}");
        match client.batch_execute(&alter).await {
            Ok(()) => {
                tracing::info!(target: "svcdb::migrate", %schema, %table, "svcdb's table now belongs to the schema's owner, as the schema does");
            }
            Err(e) => {
                tracing::warn!(target: "svcdb::migrate", %schema, %table, error = %e, "cannot give svcdb's table to the schema's owner");
            }
        }
    }
}
