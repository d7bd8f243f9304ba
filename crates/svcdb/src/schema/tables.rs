//! The service schema's tables and views: list them, check that they exist, and the one
//! catalog probe the start-up gate shares.

use std::fmt;

use serde::Serialize;
use tokio_postgres::types::Type;
use tokio_postgres::Client;

use crate::error::{Error, Result};
use crate::ident::Ident;
use crate::pool::ServiceDb;

/// The service schema's relations a query can read: `$1` is the schema's name. A macro, not a
/// `const`, so `concat!` can build both queries below from the one definition.
macro_rules! relations_sql {
    () => {
        "SELECT c.relname, c.relkind::text AS kind
           FROM pg_catalog.pg_class c
           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = $1 AND c.relkind IN ('r', 'v', 'm', 'p', 'f')"
    };
}

/// `list_tables`: `$1` schema.
const LIST_SQL: &str = concat!(relations_sql!(), " ORDER BY c.relname");

/// Everything the gate asks the catalog, in one statement: the active schema, whether the
/// configured one exists and the role may use it (NULL: it does not exist), the role, and which
/// of the tables in `$2` are missing, in the order given. `$1` schema, `$2` table names.
const PROBE_SQL: &str = concat!(
    "SELECT current_schema(),
            (SELECT has_schema_privilege(oid, 'USAGE') FROM pg_catalog.pg_namespace WHERE nspname = $1),
            current_user::text,
            ARRAY(SELECT t.name FROM unnest($2::text[]) WITH ORDINALITY AS t(name, i)
                   WHERE NOT EXISTS (SELECT FROM (",
    relations_sql!(),
    ") r WHERE r.relname = t.name)
                   ORDER BY t.i),
            -- Only when the schema is missing: the others, to suggest a look-alike.
            ARRAY(SELECT nspname::text FROM pg_catalog.pg_namespace
                   WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_namespace WHERE nspname = $1)
                     AND nspname !~ '^pg_' AND nspname <> 'information_schema'),
            ARRAY(SELECT e FROM unnest($3::text[]) AS e
                   WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_namespace WHERE nspname = e))"
);

/// What a name in the service schema is (`pg_class.relkind`). Only relations a query can read
/// from count; indexes, sequences and composite types do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TableKind {
    /// An ordinary table (also a partition of a partitioned table).
    Table,
    /// A view.
    View,
    /// A materialized view.
    MaterializedView,
    /// A partitioned table (its rows live in its partitions).
    PartitionedTable,
    /// A foreign table (`postgres_fdw`, …).
    ForeignTable,
}

impl TableKind {
    fn from_relkind(relkind: &str) -> Option<Self> {
        Some(match relkind {
            "r" => Self::Table,
            "v" => Self::View,
            "m" => Self::MaterializedView,
            "p" => Self::PartitionedTable,
            "f" => Self::ForeignTable,
            _ => return None,
        })
    }

    /// How psql's `\d` names it: `table`, `view`, `materialized view`, …
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Table => "table",
            Self::View => "view",
            Self::MaterializedView => "materialized view",
            Self::PartitionedTable => "partitioned table",
            Self::ForeignTable => "foreign table",
        }
    }
}

impl fmt::Display for TableKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One table or view of the service schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TableInfo {
    /// Its name, without the schema.
    pub name: String,
    /// Table, view, …
    pub kind: TableKind,
}

/// The catalog's answer to [`PROBE_SQL`].
pub(super) struct SchemaRow {
    /// `current_schema()`: `None` when no schema on the search path is usable.
    pub(super) active: Option<String>,
    /// `None`: the configured schema does not exist; `Some(false)`: the role lacks `USAGE`.
    pub(super) usable: Option<bool>,
    /// `current_user`.
    pub(super) user: String,
    /// Required tables that are not in the configured schema, in the order asked.
    pub(super) missing: Vec<String>,
    /// When the configured schema does not exist, the database's other schemas.
    pub(super) others: Vec<String>,
    /// The extra schemas asked about that do not exist, in the order asked.
    pub(super) missing_extra: Vec<String>,
}

pub(super) async fn probe_schema(
    client: &Client,
    schema: &Ident,
    tables: &[Ident],
    extra_schemas: &[Ident],
) -> Result<SchemaRow, tokio_postgres::Error> {
    let names: Vec<&str> = tables.iter().map(Ident::as_str).collect();
    let extra: Vec<&str> = extra_schemas.iter().map(Ident::as_str).collect();
    // query_typed: parse, bind and execute in one message, so this is one round trip.
    let row = client
        .query_typed(
            PROBE_SQL,
            &[
                (&schema.as_str(), Type::TEXT),
                (&names, Type::TEXT_ARRAY),
                (&extra, Type::TEXT_ARRAY),
            ],
        )
        .await?;
    let row = row.first().expect("a SELECT without FROM returns one row");
    Ok(SchemaRow {
        active: row.get(0),
        usable: row.get(1),
        user: row.get(2),
        missing: row.get(3),
        others: row.get(4),
        missing_extra: row.get(5),
    })
}

/// Validates table names as [`Ident`]s before any SQL is sent.
pub(super) fn table_idents(names: impl IntoIterator<Item = impl AsRef<str>>) -> Result<Vec<Ident>> {
    names
        .into_iter()
        .map(|n| Ok(Ident::new("table", n.as_ref())?))
        .collect()
}

impl ServiceDb {
    /// The schema unqualified names resolve to on a pooled connection. It is the configured
    /// schema unless that schema does not exist, the role may not use it, or something changed
    /// `search_path` on the connection; `None` when no schema on the search path is usable.
    pub async fn current_schema(&self) -> Result<Option<String>> {
        let conn = self.get().await?;
        let row = conn.query_one("SELECT current_schema()", &[]).await?;
        Ok(row.get(0))
    }

    /// True when the service schema holds a table, view, materialized view, partitioned or
    /// foreign table named `name`. The name is validated like every [`Ident`].
    pub async fn table_exists(&self, name: &str) -> Result<bool> {
        Ok(self
            .missing_tables(&table_idents([name])?)
            .await?
            .is_empty())
    }

    /// The tables and views of the service schema with their kind, by name.
    pub async fn list_tables(&self) -> Result<Vec<TableInfo>> {
        let conn = self.get().await?;
        let rows = conn
            .query_typed(LIST_SQL, &[(&self.schema().as_str(), Type::TEXT)])
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                Some(TableInfo {
                    name: r.get(0),
                    kind: TableKind::from_relkind(r.get(1))?,
                })
            })
            .collect())
    }

    /// `Ok` when every one of `names` exists in the service schema (as
    /// [`table_exists`](Self::table_exists) counts), else [`Error::MissingTables`] naming every
    /// missing one. All names are validated before anything is sent.
    pub async fn require_tables(&self, names: &[impl AsRef<str>]) -> Result<()> {
        let missing = self.missing_tables(&table_idents(names)?).await?;
        if missing.is_empty() {
            return Ok(());
        }
        Err(Error::MissingTables {
            schema: self.schema().as_str().to_owned(),
            tables: missing,
        })
    }

    async fn missing_tables(&self, tables: &[Ident]) -> Result<Vec<String>> {
        let conn = self.get().await?;
        Ok(probe_schema(&conn, self.schema(), tables, &[])
            .await?
            .missing)
    }
}
