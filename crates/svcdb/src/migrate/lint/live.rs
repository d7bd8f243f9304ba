//! What the live tables' columns are, for the checks a parser alone gets wrong: `SET NOT NULL`
//! on a column that already is (no scan), and a type change PostgreSQL makes without
//! rewriting the table (`varchar(30)` to `varchar(100)` or `text`). Read from the catalog
//! before `up` and by `svcdb migrate lint`; `lint --all`, without a database, knows what the
//! folder's earlier migrations made ([`LiveColumns::record`]). Either way it follows what the
//! deploy's own statements do ([`LiveColumns::apply`]).

use std::collections::{HashMap, HashSet};

use pg_query::protobuf::{
    a_const, AlterTableCmd, AlterTableType, ColumnDef, ConstrType, Constraint, ObjectType,
    RenameStmt, TypeName,
};
use pg_query::NodeEnum;

use crate::ident::Ident;

/// One column of a table, as the catalog has it, or as the statements that made and changed it
/// left it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Column {
    /// `format_type` of its type and modifier: `character varying(30)`, `text`, `integer`.
    /// From a statement, only the character types [`render`] knows; `None` for any other.
    type_name: Option<String>,
    not_null: bool,
}

/// The columns of the schema's tables, by table and column name, and which tables and indexes
/// there are. The default knows nothing (no database was asked).
#[derive(Debug, Clone, Default)]
pub(crate) struct LiveColumns {
    /// Per table, its columns by name.
    columns: HashMap<String, HashMap<String, Column>>,
    /// The schema's tables, when known: read from the catalog, or (`lint --all`) those the
    /// folder's earlier migrations made.
    tables: Option<HashSet<String>>,
    /// `tables` and `indexes` are the catalog's, which has every one of them; otherwise they
    /// are what the folder's earlier migrations made, and one made outside the folder may
    /// exist too.
    catalog: bool,
    /// The tables of the search path's other schemas (what an unqualified `DROP TABLE`
    /// reaches when the service schema has no such table; `CREATE TABLE` makes one in the
    /// service schema all the same).
    path_tables: HashSet<String>,
    /// Without a catalog: tables other migrations of the folder create, so they exist when
    /// this one runs (`svcdb migrate lint --all`).
    made_elsewhere: HashSet<String>,
    /// The schema's indexes, by name: `CREATE INDEX IF NOT EXISTS` of one does nothing.
    indexes: HashSet<String>,
    /// The partitioned tables (`PARTITION BY`), each with the partitions known (all of them
    /// when read from the catalog): PostgreSQL refuses `CONCURRENTLY`, a `NOT VALID` foreign
    /// key and `USING INDEX` on them, so the usual fixes do not work there.
    partitioned: HashMap<String, Vec<String>>,
    /// The indexes of partitioned tables (`relkind 'I'`): `DROP INDEX CONCURRENTLY` of one is
    /// refused.
    partitioned_indexes: HashSet<String>,
    /// Per table, its constraints known valid (foreign keys, unique constraints and primary
    /// keys from the catalog; any added valid or validated by the deploy): a partitioned table
    /// adopts its partitions' valid ones without checking or indexing a row again.
    valid_constraints: HashMap<String, HashSet<String>>,
    /// The server's `server_version_num`, when a database was asked.
    server_version: Option<i32>,
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
        let schema = schema.as_str();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&schema, &path];
        // Sent together with the catalog's query: one round trip.
        let version = client.query_one("SELECT current_setting('server_version_num')::int", &[]);
        // A LEFT JOIN: a table without columns is still a table; columns only of the service
        // schema's tables.
        let rows = client
            .query(
                "SELECT c.relname::text, a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull, n.nspname = $1,
                        c.relkind IN ('i', 'I'), c.relkind IN ('p', 'I'),
                        CASE WHEN c.relkind = 'p' AND n.nspname = $1 THEN ARRAY(
                            SELECT p.relname::text FROM pg_catalog.pg_inherits i
                              JOIN pg_catalog.pg_class p ON p.oid = i.inhrelid
                             WHERE i.inhparent = c.oid ORDER BY p.relname) END,
                        CASE WHEN c.relkind IN ('r', 'p') AND n.nspname = $1 THEN ARRAY(
                            SELECT k.conname::text FROM pg_catalog.pg_constraint k
                             WHERE k.conrelid = c.oid AND k.contype IN ('f', 'u', 'p') AND k.convalidated) END
                   FROM pg_catalog.pg_class c
                   JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                   LEFT JOIN pg_catalog.pg_attribute a
                          ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                             AND n.nspname = $1 AND c.relkind IN ('r', 'p')
                  WHERE ((n.nspname = $1 OR n.nspname::text = ANY($2)) AND c.relkind IN ('r', 'p'))
                     OR (n.nspname = $1 AND c.relkind IN ('i', 'I'))",
                &params,
            );
        let (version, rows) = futures_util::future::try_join(version, rows).await?;
        let mut live = Self {
            tables: Some(HashSet::new()),
            catalog: true,
            server_version: Some(version.get(0)),
            ..Self::default()
        };
        for r in &rows {
            let table: String = r.get(0);
            let partitioned = r.get::<_, bool>(6);
            if r.get::<_, bool>(5) {
                if partitioned {
                    live.partitioned_indexes.insert(table.clone());
                }
                live.indexes.insert(table);
                continue;
            }
            if !r.get::<_, bool>(4) {
                live.path_tables.insert(table);
                continue;
            }
            if let Some(partitions) = r.get::<_, Option<Vec<String>>>(7) {
                live.partitioned.insert(table.clone(), partitions);
            }
            if let Some(valid) = r.get::<_, Option<Vec<String>>>(8) {
                live.valid_constraints
                    .entry(table.clone())
                    .or_default()
                    .extend(valid);
            }
            if let (Some(column), Some(type_name), Some(not_null)) = (r.get(1), r.get(2), r.get(3))
            {
                live.columns.entry(table.clone()).or_default().insert(
                    column,
                    Column {
                        type_name: Some(type_name),
                        not_null,
                    },
                );
            }
            live.tables.get_or_insert_default().insert(table);
        }
        Ok(live)
    }

    /// Whether the server adds a foreign key `NOT VALID` to a partitioned table: PostgreSQL 18
    /// on. Without a database asked, as the versions before it do (they refuse it).
    pub(crate) fn adds_not_valid_foreign_keys_to_partitioned_tables(&self) -> bool {
        self.server_version.is_some_and(|v| v >= 180_000)
    }

    /// Knowing nothing but the server's version (`server_version_num`).
    #[cfg(test)]
    pub(crate) fn of_server(version: i32) -> Self {
        Self {
            server_version: Some(version),
            ..Self::default()
        }
    }

    /// What a folder's migrations made before the first one: nothing. [`record`](Self::record)
    /// each migration in turn (`lint --all`).
    pub(crate) fn folder() -> Self {
        Self {
            tables: Some(HashSet::new()),
            ..Self::default()
        }
    }

    /// What is known here, and that `made_elsewhere` are the tables other migrations of the
    /// folder create.
    pub(crate) fn with_made_elsewhere(&self, made_elsewhere: HashSet<String>) -> Self {
        Self {
            made_elsewhere,
            ..self.clone()
        }
    }

    /// Takes in what the statements of `sql` do to tables, columns and indexes; nothing from
    /// the piece that does not parse on.
    pub(crate) fn record(&mut self, sql: &str) {
        for piece in crate::migrate::split::parsed_pieces(sql) {
            let Ok((_, parsed)) = piece else {
                return;
            };
            for raw in &parsed.protobuf.stmts {
                if let Some(node) = raw.stmt.as_ref().and_then(|s| s.node.as_ref()) {
                    self.apply(node);
                }
            }
        }
    }

    /// Takes in what `node` does to tables, columns and indexes, run after what is known so
    /// far.
    pub(crate) fn apply(&mut self, node: &NodeEnum) {
        match node {
            NodeEnum::CreateStmt(create) => {
                let Some(table) = create.relation.as_ref().map(|r| r.relname.as_str()) else {
                    return;
                };
                if create.if_not_exists && self.has_table(table) {
                    return;
                }
                self.add_table(table);
                if create.partspec.is_some() {
                    self.partitioned.insert(table.to_owned(), Vec::new());
                }
                if create.partbound.is_some() {
                    if let Some(Some(NodeEnum::RangeVar(parent))) =
                        create.inh_relations.first().map(|n| n.node.as_ref())
                    {
                        self.attach(&parent.relname, table);
                    }
                }
                for element in &create.table_elts {
                    match element.node.as_ref() {
                        Some(NodeEnum::ColumnDef(column)) => self.add_column(table, column),
                        Some(NodeEnum::Constraint(c)) => self.constrain(table, c),
                        _ => {}
                    }
                }
            }
            NodeEnum::CreateTableAsStmt(create) => {
                if let Some(rel) = create.into.as_ref().and_then(|i| i.rel.as_ref()) {
                    self.add_table(&rel.relname);
                }
            }
            NodeEnum::AlterTableStmt(alter) => {
                let Some(table) = alter.relation.as_ref().map(|r| r.relname.as_str()) else {
                    return;
                };
                // `ALTER INDEX … ATTACH PARTITION` changes no table.
                if alter.objtype != ObjectType::ObjectTable as i32 {
                    return;
                }
                for cmd in &alter.cmds {
                    if let Some(NodeEnum::AlterTableCmd(cmd)) = cmd.node.as_ref() {
                        self.alter(table, cmd);
                    }
                }
            }
            NodeEnum::RenameStmt(rename) => self.rename(rename),
            NodeEnum::IndexStmt(index) if !index.idxname.is_empty() => {
                self.indexes.insert(index.idxname.clone());
                let table = index.relation.as_ref().map_or("", |r| r.relname.as_str());
                if self.is_partitioned(table) {
                    self.partitioned_indexes.insert(index.idxname.clone());
                }
            }
            NodeEnum::DropStmt(drop) if drop.remove_type == ObjectType::ObjectIndex as i32 => {
                for index in drop.objects.iter().filter_map(super::last_name) {
                    self.indexes.remove(index);
                    self.partitioned_indexes.remove(index);
                }
            }
            NodeEnum::DropStmt(drop) if drop.remove_type == ObjectType::ObjectTable as i32 => {
                for table in drop.objects.iter().filter_map(super::last_name) {
                    if let Some(tables) = &mut self.tables {
                        tables.remove(table);
                    }
                    self.columns.remove(table);
                    self.valid_constraints.remove(table);
                    self.partitioned.remove(table);
                    self.detach(table);
                }
            }
            _ => {}
        }
    }

    /// A table, column or index renamed keeps what is known of it under its new name; one
    /// that was not known to be there (made outside the folder) is there under the new name.
    fn rename(&mut self, rename: &RenameStmt) {
        let Some(old) = rename.relation.as_ref().map(|r| r.relname.as_str()) else {
            return;
        };
        let new = &rename.newname;
        match ObjectType::try_from(rename.rename_type) {
            Ok(ObjectType::ObjectTable) => {
                if let Some(tables) = &mut self.tables {
                    tables.remove(old);
                    tables.insert(new.clone());
                }
                if let Some(columns) = self.columns.remove(old) {
                    self.columns.insert(new.clone(), columns);
                }
                if let Some(valid) = self.valid_constraints.remove(old) {
                    self.valid_constraints.insert(new.clone(), valid);
                }
                if let Some(partitions) = self.partitioned.remove(old) {
                    self.partitioned.insert(new.clone(), partitions);
                }
                for partition in self.partitioned.values_mut().flatten() {
                    if partition == old {
                        partition.clone_from(new);
                    }
                }
            }
            Ok(ObjectType::ObjectColumn) => {
                if let Some(columns) = self.columns.get_mut(old) {
                    if let Some(column) = columns.remove(&rename.subname) {
                        columns.insert(new.clone(), column);
                    }
                }
            }
            Ok(ObjectType::ObjectIndex) => {
                self.indexes.remove(old);
                self.indexes.insert(new.clone());
                if self.partitioned_indexes.remove(old) {
                    self.partitioned_indexes.insert(new.clone());
                }
            }
            _ => {}
        }
    }

    /// `partition` is a partition of `parent`, when `parent` is known to be partitioned.
    fn attach(&mut self, parent: &str, partition: &str) {
        if let Some(partitions) = self.partitioned.get_mut(parent) {
            if !partitions.iter().any(|p| p == partition) {
                partitions.push(partition.to_owned());
            }
        }
    }

    /// `partition` is no partition any more.
    fn detach(&mut self, partition: &str) {
        for partitions in self.partitioned.values_mut() {
            partitions.retain(|p| p != partition);
        }
    }

    fn add_table(&mut self, table: &str) {
        if let Some(tables) = &mut self.tables {
            tables.insert(table.to_owned());
        }
    }

    /// One command of an `ALTER TABLE` of `table`.
    fn alter(&mut self, table: &str, cmd: &AlterTableCmd) {
        let def = cmd.def.as_ref().and_then(|d| d.node.as_ref());
        match (AlterTableType::try_from(cmd.subtype), def) {
            // `IF NOT EXISTS` of a column the table has adds nothing.
            (Ok(AlterTableType::AtAddColumn), Some(NodeEnum::ColumnDef(column)))
                if !(cmd.missing_ok && self.has_column(table, &column.colname)) =>
            {
                self.add_column(table, column);
            }
            (Ok(AlterTableType::AtAlterColumnType), Some(NodeEnum::ColumnDef(column))) => {
                // A `USING` expression may change every value: the type alone says nothing
                // then.
                let type_name = column
                    .raw_default
                    .is_none()
                    .then(|| column.type_name.as_ref().and_then(render))
                    .flatten();
                self.column(table, &cmd.name).type_name = type_name;
            }
            (Ok(AlterTableType::AtSetNotNull), _) => self.column(table, &cmd.name).not_null = true,
            (Ok(AlterTableType::AtDropNotNull), _) => {
                self.column(table, &cmd.name).not_null = false;
            }
            (Ok(AlterTableType::AtDropColumn), _) => {
                if let Some(columns) = self.columns.get_mut(table) {
                    columns.remove(&cmd.name);
                }
            }
            (Ok(AlterTableType::AtAddConstraint), Some(NodeEnum::Constraint(c))) => {
                self.constrain(table, c);
                if !c.skip_validation && !c.conname.is_empty() {
                    self.valid(table, &c.conname);
                }
            }
            (Ok(AlterTableType::AtValidateConstraint), _) => self.valid(table, &cmd.name),
            (Ok(AlterTableType::AtDropConstraint), _) => {
                if let Some(valid) = self.valid_constraints.get_mut(table) {
                    valid.remove(&cmd.name);
                }
            }
            (Ok(AlterTableType::AtAttachPartition), Some(NodeEnum::PartitionCmd(p))) => {
                if let Some(partition) = &p.name {
                    self.attach(table, &partition.relname);
                }
            }
            (Ok(AlterTableType::AtDetachPartition), Some(NodeEnum::PartitionCmd(p))) => {
                if let Some(partition) = &p.name {
                    if let Some(partitions) = self.partitioned.get_mut(table) {
                        partitions.retain(|t| *t != partition.relname);
                    }
                }
            }
            _ => {}
        }
    }

    fn valid(&mut self, table: &str, constraint: &str) {
        self.valid_constraints
            .entry(table.to_owned())
            .or_default()
            .insert(constraint.to_owned());
    }

    /// `column` of `table`, made with an unknown type and nullable when nothing was known of
    /// it (a column made outside what was recorded).
    fn column(&mut self, table: &str, column: &str) -> &mut Column {
        self.columns
            .entry(table.to_owned())
            .or_default()
            .entry(column.to_owned())
            .or_insert(Column {
                type_name: None,
                not_null: false,
            })
    }

    fn add_column(&mut self, table: &str, column: &ColumnDef) {
        let has = |t: ConstrType| {
            column.constraints.iter().any(
                |c| matches!(c.node.as_ref(), Some(NodeEnum::Constraint(c)) if c.contype == t as i32),
            )
        };
        let type_name = column.type_name.as_ref();
        let serial = type_name
            .and_then(|t| t.names.last())
            .and_then(super::string)
            .is_some_and(|name| super::SERIAL_TYPES.contains(&name));
        let not_null = column.is_not_null
            || serial
            || has(ConstrType::ConstrNotnull)
            || has(ConstrType::ConstrPrimary)
            || has(ConstrType::ConstrIdentity);
        *self.column(table, &column.colname) = Column {
            type_name: type_name.and_then(render),
            not_null,
        };
    }

    /// A table constraint on `table`: a primary key makes its columns `NOT NULL`.
    fn constrain(&mut self, table: &str, c: &Constraint) {
        if c.contype != ConstrType::ConstrPrimary as i32 {
            return;
        }
        for key in c.keys.iter().filter_map(super::string) {
            self.column(table, key).not_null = true;
        }
    }

    /// The service schema is known to have `table` (where `CREATE TABLE` makes it), or another
    /// migration of the folder makes it.
    pub(crate) fn has_table(&self, table: &str) -> bool {
        self.tables.as_ref().is_some_and(|t| t.contains(table))
            || self.made_elsewhere.contains(table)
    }

    /// `table` of the service schema is known to have `column`.
    pub(crate) fn has_column(&self, table: &str, column: &str) -> bool {
        self.get(table, column).is_some()
    }

    /// A `DROP INDEX` (`IF EXISTS`: `if_exists`) of `name` drops nothing: the catalog has no
    /// such index (without `IF EXISTS` the server refuses the drop), or, with `IF EXISTS`, the
    /// folder's earlier migrations left none (without it, the drop runs only if one made
    /// outside the folder is there).
    pub(crate) fn drops_no_index(&self, name: &str, if_exists: bool) -> bool {
        (self.catalog || if_exists) && self.tables.is_some() && !self.indexes.contains(name)
    }

    /// `table` is known to be partitioned (`PARTITION BY`).
    pub(crate) fn is_partitioned(&self, table: &str) -> bool {
        self.partitioned.contains_key(table)
    }

    /// The partitions known of `table`, a partitioned table (every one, when read from the
    /// catalog); none of a table not known to be partitioned.
    pub(crate) fn partitions(&self, table: &str) -> &[String] {
        self.partitioned.get(table).map_or(&[], Vec::as_slice)
    }

    /// `name` is known to be the index of a partitioned table.
    pub(crate) fn is_partitioned_index(&self, name: &str) -> bool {
        self.partitioned_indexes.contains(name)
    }

    /// `table` is known to have a valid constraint called `name`.
    pub(crate) fn has_valid_constraint(&self, table: &str, name: &str) -> bool {
        self.valid_constraints
            .get(table)
            .is_some_and(|valid| valid.contains(name))
    }

    /// The service schema is known to have an index called `name`.
    pub(crate) fn has_index(&self, name: &str) -> bool {
        self.indexes.contains(name)
    }

    /// A `DROP TABLE` of `table` drops nothing: as for
    /// [`drops_no_index`](Self::drops_no_index), with no such table in any schema of the search
    /// path, and none that another migration of the folder makes.
    pub(crate) fn drops_no_table(&self, table: &str, if_exists: bool) -> bool {
        (self.catalog || if_exists)
            && self.tables.as_ref().is_some_and(|t| !t.contains(table))
            && !self.path_tables.contains(table)
            && !self.made_elsewhere.contains(table)
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
        let (Some(old), Some(new)) = (
            self.get(table, column).and_then(|c| c.type_name.as_deref()),
            render(new),
        ) else {
            return false;
        };
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
        // numeric(p, s): PostgreSQL's `numeric_support` relabels (no rewrite, no scan) to an
        // unconstrained numeric, or to the same scale with no smaller precision (found by a
        // user trial: numeric(15,2) to numeric(20,2) was flagged as a rewrite; checked with
        // pg_relation_filenode on 15).
        let numeric = |t: &str| -> Option<Option<(u32, u32)>> {
            match t {
                "numeric" => Some(None),
                _ => t
                    .strip_prefix("numeric(")
                    .and_then(|rest| rest.strip_suffix(')'))
                    .and_then(|ps| ps.split_once(','))
                    .and_then(|(p, s)| Some((p.trim().parse().ok()?, s.trim().parse().ok()?)))
                    .map(Some),
            }
        };
        if let (Some(was), Some(now)) = (numeric(old), numeric(&new)) {
            return match (was, now) {
                (_, None) => true,
                (Some((p, s)), Some((p2, s2))) => s2 == s && p2 >= p,
                (None, Some(_)) => false,
            };
        }
        match (limit(old), limit(&new)) {
            // Unlimited to unlimited (text and varchar are binary-coercible both ways).
            (Some(None), Some(None)) => true,
            (Some(Some(_)), Some(None)) => true,
            (Some(Some(was)), Some(Some(now))) => now >= was,
            _ => false,
        }
    }

    fn get(&self, table: &str, column: &str) -> Option<&Column> {
        self.columns.get(table)?.get(column)
    }
}

/// `new` as `format_type` writes it (the spelling of the catalog's column types), or `None`
/// where that is not known: an array, a type qualified with a schema other than
/// `pg_catalog`, a name that is not a plain lowercase identifier (format_type would quote
/// it), or modifiers on a type other than the character, numeric and timestamp types.
///
/// A plain name format_type writes as it is (`uuid`, `jsonb`, `date`, a type of the service's
/// own) compares as written: the lint's catalog query and the migration resolve it on the
/// same search path, where format_type leaves a visible type unqualified. Found by a user
/// trial: ory/kratos changes columns to the type they already have (`TYPE UUID`,
/// `TYPE jsonb`) in 18 migrations, which PostgreSQL neither rewrites nor rebuilds indexes
/// for, and which the lint flagged as rewrites.
fn render(new: &TypeName) -> Option<String> {
    if !new.array_bounds.is_empty() {
        return None;
    }
    let names: Vec<&str> = new
        .names
        .iter()
        .map(|n| match n.node.as_ref() {
            Some(NodeEnum::String(s)) => Some(s.sval.as_str()),
            _ => None,
        })
        .collect::<Option<_>>()?;
    let name = match names.as_slice() {
        [name] | ["pg_catalog", name] => *name,
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
    let plain = |name: &str| -> Option<String> {
        let mut chars = name.chars();
        let first = chars.next()?;
        ((first.is_ascii_lowercase() || first == '_')
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
        .then(|| name.to_owned())
    };
    match (name, modifiers.as_slice()) {
        ("varchar", []) => Some("character varying".to_owned()),
        ("varchar", [n]) => Some(format!("character varying({n})")),
        ("bpchar", [n]) => Some(format!("character({n})")),
        ("numeric", []) => Some("numeric".to_owned()),
        ("numeric", [p]) => Some(format!("numeric({p},0)")),
        ("numeric", [p, s]) => Some(format!("numeric({p},{s})")),
        ("int2", []) => Some("smallint".to_owned()),
        ("int4", []) => Some("integer".to_owned()),
        ("int8", []) => Some("bigint".to_owned()),
        ("float4", []) => Some("real".to_owned()),
        ("float8", []) => Some("double precision".to_owned()),
        ("bool", []) => Some("boolean".to_owned()),
        ("timestamp", []) => Some("timestamp without time zone".to_owned()),
        ("timestamp", [p]) => Some(format!("timestamp({p}) without time zone")),
        ("timestamptz", []) => Some("timestamp with time zone".to_owned()),
        ("timestamptz", [p]) => Some(format!("timestamp({p}) with time zone")),
        ("time", []) => Some("time without time zone".to_owned()),
        ("timetz", []) => Some("time with time zone".to_owned()),
        // Written differently by format_type, or not a type of its own (`char` is
        // `character(1)`; `serial` is not a type).
        (
            "bpchar" | "char" | "interval" | "bit" | "varbit" | "serial" | "bigserial"
            | "smallserial" | "serial2" | "serial4" | "serial8",
            _,
        ) => None,
        (name, []) => plain(name),
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
                .fold(HashMap::new(), |mut tables, (t, c, ty, nn)| {
                    tables.entry(t.to_string()).or_default().insert(
                        c.to_string(),
                        Column {
                            type_name: Some(ty.to_string()),
                            not_null: *nn,
                        },
                    );
                    tables
                }),
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

    /// Asserts that on a table `t` with `columns` (name, `format_type` spelling), changing each
    /// of `kept` to its type keeps the storage, and each of `rewritten` does not.
    fn assert_storage(columns: &[(&str, &str)], kept: &[(&str, &str)], rewritten: &[(&str, &str)]) {
        let columns: Vec<(&str, &str, &str, bool)> =
            columns.iter().map(|&(c, ty)| ("t", c, ty, false)).collect();
        let l = live(&columns);
        let keeps = |column: &str, ty: &str| {
            l.keeps_storage(
                "t",
                column,
                &type_of(&format!("ALTER TABLE t ALTER COLUMN {column} TYPE {ty}")),
            )
        };
        for (column, ty) in kept {
            assert!(keeps(column, ty), "{column} → {ty}");
        }
        for (column, ty) in rewritten {
            assert!(!keeps(column, ty), "{column} → {ty}");
        }
    }

    #[test]
    fn longer_or_unlimited_character_types_keep_the_storage() {
        assert_storage(
            &[
                ("short", "character varying(30)"),
                ("free", "character varying"),
                ("body", "text"),
                ("code", "character(2)"),
                ("n", "integer"),
            ],
            &[
                ("short", "varchar(100)"),
                ("short", "varchar(30)"),
                ("short", "text"),
                ("short", "varchar"),
                ("free", "text"),
                ("body", "varchar"),
                ("body", "text"),
            ],
            // A shorter limit checks every row; char(n) pads; other types convert; unknown
            // columns are not known.
            &[
                ("short", "varchar(10)"),
                ("code", "text"),
                ("n", "bigint"),
                ("body", "varchar(10)"),
                ("missing", "text"),
                ("short", "text[]"),
            ],
        );
        let l = live(&[("t", "short", "text", false), ("t", "n", "integer", true)]);
        assert!(l.is_not_null("t", "n") && !l.is_not_null("t", "short"));
    }

    /// Found by a user trial (ory/kratos): a column changed to the type it already has was
    /// flagged as a rewrite, for every type but the character and numeric ones.
    #[test]
    fn the_type_a_column_already_has_keeps_the_storage_however_it_is_spelled() {
        assert_storage(
            &[
                ("nid", "uuid"),
                ("ui", "jsonb"),
                ("n", "integer"),
                ("big", "bigint"),
                ("at", "timestamp without time zone"),
                ("at3", "timestamp(3) with time zone"),
                ("flag", "boolean"),
                ("status", "order_status"),
                ("quoted", "\"Mixed\""),
            ],
            &[
                ("nid", "UUID"),
                ("nid", "pg_catalog.uuid"),
                ("ui", "jsonb"),
                ("n", "int"),
                ("n", "integer"),
                ("n", "int4"),
                ("big", "int8"),
                ("at", "timestamp"),
                ("at3", "timestamptz(3)"),
                ("at3", "timestamp(3) with time zone"),
                ("flag", "bool"),
                ("status", "order_status"),
            ],
            // Another type, another schema's type of the same name, a quoted name, an array: a
            // rewrite, or not known.
            &[
                ("nid", "text"),
                ("ui", "json"),
                ("n", "bigint"),
                ("at", "timestamptz"),
                ("at3", "timestamptz"),
                ("status", "other.order_status"),
                ("quoted", "\"Mixed\""),
                ("nid", "uuid[]"),
            ],
        );
    }

    /// Found by a user trial: numeric(15,2) to numeric(20,2) was flagged as a rewrite, which
    /// PostgreSQL does not do (checked with pg_relation_filenode on 15).
    #[test]
    fn a_wider_or_unconstrained_numeric_keeps_the_storage() {
        assert_storage(
            &[("price", "numeric(15,2)"), ("free", "numeric")],
            &[
                ("price", "numeric(20,2)"),
                ("price", "numeric(15,2)"),
                ("price", "numeric"),
                ("price", "decimal(18,2)"),
            ],
            // A smaller precision or another scale checks or rewrites; a limit on an unlimited
            // one checks every row.
            &[
                ("price", "numeric(10,2)"),
                ("price", "numeric(20,3)"),
                ("price", "numeric(20)"),
                ("free", "numeric(20,2)"),
            ],
        );
    }
}
