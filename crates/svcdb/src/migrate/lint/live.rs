//! What the live tables' columns are, for the checks a parser alone gets wrong: `SET NOT NULL`
//! on a column that already is (no scan), and a type change PostgreSQL makes without
//! rewriting the table (`varchar(30)` to `varchar(100)` or `text`). Read from the catalog
//! before `up` and by `svcdb migrate lint`; `lint --all`, without a database, knows the
//! character types the folder's earlier migrations gave their columns ([`ColumnTypes`]).

use std::collections::{HashMap, HashSet};

use pg_query::protobuf::{a_const, TypeName};
use pg_query::NodeEnum;

use crate::ident::Ident;

/// One column of a table of the schema, as the catalog has it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Column {
    /// `format_type` of its type and modifier: `character varying(30)`, `text`, `integer`.
    type_name: String,
    not_null: bool,
}

/// The columns of the schema's tables, by table and column name, and which tables there are.
/// The default knows nothing (no database was asked).
#[derive(Debug, Clone, Default)]
pub(crate) struct LiveColumns {
    columns: HashMap<(String, String), Column>,
    /// The schema's tables, when the catalog was read.
    tables: Option<HashSet<String>>,
    /// The tables of the search path's other schemas (what an unqualified `DROP TABLE`
    /// reaches when the service schema has no such table; `CREATE TABLE` makes one in the
    /// service schema all the same).
    path_tables: HashSet<String>,
    /// Without a catalog: tables other migrations of the folder create, so they exist when
    /// this one runs (`svcdb migrate lint --all`).
    made_elsewhere: HashSet<String>,
    /// The schema's indexes, by name: `CREATE INDEX IF NOT EXISTS` of one does nothing.
    indexes: HashSet<String>,
}

impl LiveColumns {
    /// The columns of every table of `schema`, and the tables of every schema of `path` (the
    /// search path the migrations run with: an unqualified `DROP TABLE` reaches a table of an
    /// extra schema too), in one query.
    pub(crate) async fn read(
        client: &tokio_postgres::Client,
        schema: &Ident,
        path: &[Ident],
    ) -> Result<Self, tokio_postgres::Error> {
        let path: Vec<&str> = path.iter().map(Ident::as_str).collect();
        // A LEFT JOIN: a table without columns is still a table; columns only of the service
        // schema's tables.
        let rows = client
            .query(
                "SELECT c.relname::text, a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull, n.nspname = $1,
                        c.relkind IN ('i', 'I')
                   FROM pg_catalog.pg_class c
                   JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                   LEFT JOIN pg_catalog.pg_attribute a
                          ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                             AND n.nspname = $1 AND c.relkind IN ('r', 'p')
                  WHERE ((n.nspname = $1 OR n.nspname::text = ANY($2)) AND c.relkind IN ('r', 'p'))
                     OR (n.nspname = $1 AND c.relkind IN ('i', 'I'))",
                &[&schema.as_str(), &path],
            )
            .await?;
        let mut live = Self {
            tables: Some(HashSet::new()),
            ..Self::default()
        };
        for r in &rows {
            let table: String = r.get(0);
            if r.get::<_, bool>(5) {
                live.indexes.insert(table);
                continue;
            }
            if !r.get::<_, bool>(4) {
                live.path_tables.insert(table);
                continue;
            }
            if let (Some(column), Some(type_name), Some(not_null)) = (r.get(1), r.get(2), r.get(3))
            {
                live.columns.insert(
                    (table.clone(), column),
                    Column {
                        type_name,
                        not_null,
                    },
                );
            }
            live.tables.get_or_insert_default().insert(table);
        }
        Ok(live)
    }

    /// No catalog, but `made_elsewhere` are the tables other migrations create, and `types`
    /// the columns' types the earlier ones gave them (nullability unknown).
    pub(crate) fn made_elsewhere(made_elsewhere: HashSet<String>, types: &ColumnTypes) -> Self {
        let columns = types
            .0
            .iter()
            .map(|(key, type_name)| {
                let column = Column {
                    type_name: type_name.clone(),
                    not_null: false,
                };
                (key.clone(), column)
            })
            .collect();
        Self {
            made_elsewhere,
            columns,
            ..Self::default()
        }
    }

    /// The catalog was read and the service schema has `table` (where `CREATE TABLE` makes
    /// it), or another migration of the folder makes it.
    pub(crate) fn has_table(&self, table: &str) -> bool {
        self.tables.as_ref().is_some_and(|t| t.contains(table))
            || self.made_elsewhere.contains(table)
    }

    /// The catalog was read and `table` of the service schema has `column`.
    pub(crate) fn has_column(&self, table: &str, column: &str) -> bool {
        self.columns
            .contains_key(&(table.to_owned(), column.to_owned()))
    }

    /// The catalog was read and the service schema has no index called `name`.
    pub(crate) fn lacks_index(&self, name: &str) -> bool {
        self.tables.is_some() && !self.indexes.contains(name)
    }

    /// The catalog was read and the service schema has an index called `name`.
    pub(crate) fn has_index(&self, name: &str) -> bool {
        self.indexes.contains(name)
    }

    /// The catalog was read and has no `table` in any schema of the search path.
    pub(crate) fn lacks_table(&self, table: &str) -> bool {
        self.tables.as_ref().is_some_and(|t| !t.contains(table))
            && !self.path_tables.contains(table)
    }

    /// The column is known to be `NOT NULL` already: `SET NOT NULL` changes nothing.
    pub(crate) fn is_not_null(&self, table: &str, column: &str) -> bool {
        self.get(table, column).is_some_and(|c| c.not_null)
    }

    /// The column's type is known, and changing it to `new` keeps every stored value as it is
    /// (no rewrite, no index rebuilt): the same type, or within the character types a longer
    /// or unlimited `varchar`, or `text` (PostgreSQL docs, ALTER TABLE: "increasing the
    /// length limit of a varchar column … or changing a varchar column to text" needs no
    /// rewrite). Anything else, or a `USING` expression, counts as a rewrite.
    pub(crate) fn keeps_storage(&self, table: &str, column: &str, new: &TypeName) -> bool {
        let (Some(old), Some(new)) = (self.get(table, column), render(new)) else {
            return false;
        };
        let old = old.type_name.as_str();
        if old == new {
            return true;
        }
        let limit = |t: &str| -> Option<Option<u32>> {
            match t {
                "text" | "character varying" => Some(None),
                _ => t
                    .strip_prefix("character varying(")
                    .and_then(|rest| rest.strip_suffix(')'))
                    .and_then(|n| n.parse().ok())
                    .map(Some),
            }
        };
        match (limit(old), limit(&new)) {
            // Unlimited to unlimited (text and varchar are binary-coercible both ways).
            (Some(None), Some(None)) => true,
            (Some(Some(_)), Some(None)) => true,
            (Some(Some(was)), Some(Some(now))) => now >= was,
            _ => false,
        }
    }

    fn get(&self, table: &str, column: &str) -> Option<&Column> {
        self.columns.get(&(table.to_owned(), column.to_owned()))
    }
}

/// The character types (`varchar(n)`, `varchar`, `text`) of the columns a folder's migrations
/// made so far, by table and column, from their `CREATE TABLE`, `ADD COLUMN` and
/// `ALTER COLUMN … TYPE` statements, in version order: what `lint --all` knows of a column's
/// type where `lint` asks the catalog (found by a user trial: harbor's `varchar(128)` to
/// `varchar(1024)`, which rewrites nothing, was an error without a database).
#[derive(Debug, Default)]
pub(crate) struct ColumnTypes(HashMap<(String, String), String>);

impl ColumnTypes {
    /// Takes in what `sql` does to column types; nothing when it does not parse.
    pub(crate) fn record(&mut self, sql: &str) {
        for piece in crate::migrate::split::parsed_pieces(sql) {
            let Ok((_, parsed)) = piece else {
                return;
            };
            self.record_parsed(&parsed);
        }
    }

    fn record_parsed(&mut self, parsed: &pg_query::ParseResult) {
        for raw in &parsed.protobuf.stmts {
            match raw.stmt.as_ref().and_then(|s| s.node.as_ref()) {
                Some(NodeEnum::CreateStmt(create)) => {
                    let Some(table) = create.relation.as_ref().map(|r| r.relname.as_str()) else {
                        continue;
                    };
                    for element in &create.table_elts {
                        if let Some(NodeEnum::ColumnDef(column)) = element.node.as_ref() {
                            self.set(table, &column.colname, column.type_name.as_ref());
                        }
                    }
                }
                Some(NodeEnum::AlterTableStmt(alter)) => {
                    let Some(table) = alter.relation.as_ref().map(|r| r.relname.as_str()) else {
                        continue;
                    };
                    for cmd in &alter.cmds {
                        let Some(NodeEnum::AlterTableCmd(cmd)) = cmd.node.as_ref() else {
                            continue;
                        };
                        let Some(NodeEnum::ColumnDef(column)) =
                            cmd.def.as_ref().and_then(|d| d.node.as_ref())
                        else {
                            continue;
                        };
                        let name = if cmd.name.is_empty() {
                            &column.colname // ADD COLUMN
                        } else {
                            &cmd.name // ALTER COLUMN … TYPE
                        };
                        // A `USING` expression may change every value: the type alone says
                        // nothing then.
                        let typed = column
                            .raw_default
                            .is_none()
                            .then_some(column.type_name.as_ref());
                        self.set(table, name, typed.flatten());
                    }
                }
                _ => {}
            }
        }
    }

    fn set(&mut self, table: &str, column: &str, type_name: Option<&TypeName>) {
        let key = (table.to_owned(), column.to_owned());
        match type_name.and_then(render) {
            Some(rendered) => self.0.insert(key, rendered),
            None => self.0.remove(&key),
        };
    }
}

/// `new` as `format_type` writes it, for the types [`LiveColumns::keeps_storage`] knows
/// (`character varying(n)`, `character varying`, `text`); `None` for any other, or an array.
fn render(new: &TypeName) -> Option<String> {
    if !new.array_bounds.is_empty() {
        return None;
    }
    let name = match new.names.last()?.node.as_ref()? {
        NodeEnum::String(s) => s.sval.as_str(),
        _ => return None,
    };
    let modifiers: Vec<i32> = new
        .typmods
        .iter()
        .map(|m| match m.node.as_ref() {
            Some(NodeEnum::AConst(c)) => match &c.val {
                Some(a_const::Val::Ival(i)) => Some(i.ival),
                _ => None,
            },
            Some(NodeEnum::Integer(i)) => Some(i.ival),
            _ => None,
        })
        .collect::<Option<_>>()?;
    match (name, modifiers.as_slice()) {
        ("text", []) => Some("text".to_owned()),
        ("varchar", []) => Some("character varying".to_owned()),
        ("varchar", [n]) => Some(format!("character varying({n})")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(columns: &[(&str, &str, &str, bool)]) -> LiveColumns {
        LiveColumns {
            columns: columns
                .iter()
                .map(|(t, c, ty, nn)| {
                    (
                        (t.to_string(), c.to_string()),
                        Column {
                            type_name: ty.to_string(),
                            not_null: *nn,
                        },
                    )
                })
                .collect(),
            tables: Some(columns.iter().map(|(t, ..)| t.to_string()).collect()),
            ..LiveColumns::default()
        }
    }

    /// The `TYPE …` of `ALTER TABLE t ALTER COLUMN c TYPE …`.
    fn type_of(sql: &str) -> TypeName {
        let parsed = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT).unwrap();
        let node = parsed.protobuf.stmts[0]
            .stmt
            .as_ref()
            .unwrap()
            .node
            .as_ref()
            .unwrap();
        let NodeEnum::AlterTableStmt(alter) = node else {
            panic!("{sql}")
        };
        let Some(NodeEnum::AlterTableCmd(cmd)) = &alter.cmds[0].node else {
            panic!("{sql}")
        };
        let Some(NodeEnum::ColumnDef(def)) = cmd.def.as_ref().and_then(|d| d.node.as_ref()) else {
            panic!("{sql}")
        };
        def.type_name.clone().unwrap()
    }

    #[test]
    fn longer_or_unlimited_character_types_keep_the_storage() {
        let l = live(&[
            ("t", "short", "character varying(30)", false),
            ("t", "free", "character varying", false),
            ("t", "body", "text", false),
            ("t", "code", "character(2)", false),
            ("t", "n", "integer", true),
        ]);
        let keeps = |column: &str, ty: &str| {
            l.keeps_storage(
                "t",
                column,
                &type_of(&format!("ALTER TABLE t ALTER COLUMN {column} TYPE {ty}")),
            )
        };
        for (column, ty) in [
            ("short", "varchar(100)"),
            ("short", "varchar(30)"),
            ("short", "text"),
            ("short", "varchar"),
            ("free", "text"),
            ("body", "varchar"),
            ("body", "text"),
        ] {
            assert!(keeps(column, ty), "{column} → {ty}");
        }
        // A shorter limit checks every row; char(n) pads; other types convert; unknown columns
        // are not known.
        for (column, ty) in [
            ("short", "varchar(10)"),
            ("code", "text"),
            ("n", "bigint"),
            ("body", "varchar(10)"),
            ("missing", "text"),
            ("short", "text[]"),
        ] {
            assert!(!keeps(column, ty), "{column} → {ty}");
        }
        assert!(l.is_not_null("t", "n") && !l.is_not_null("t", "short"));
    }
}
