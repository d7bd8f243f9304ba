//! Generated migration corpora in svcdb's native layout (`0001_create_customers.up.sql` +
//! `.down.sql`).
//!
//! [`realistic`] is what a service accumulates over a few years: tables with foreign keys to
//! earlier tables, indexes, added columns, check constraints, an `updated_at` trigger, a few
//! data backfills (`INSERT … SELECT generate_series`, then `UPDATE` into a new column) and a
//! few `CREATE INDEX CONCURRENTLY` migrations that must run outside a transaction. Every down
//! script reverts exactly its up script (given that later migrations were reverted first), so
//! `down` to zero leaves an empty schema — which the benchmark checks.
//!
//! [`trivial`] is a long history of cheap migrations (a feature-flag table, then one seed row
//! per migration): it measures what the runner's bookkeeping costs at 1 000 applied versions,
//! not what PostgreSQL spends on DDL.
//!
//! Generation is deterministic: the same `count` always gives the same files.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// svcdb's marker for a migration that runs outside a transaction.
const NO_TRANSACTION: &str = "-- svcdb:no-transaction";

/// One generated migration.
#[derive(Debug, Clone)]
pub struct MigrationFile {
    pub version: usize,
    /// `create_customers`: the part of the file name after the version.
    pub name: String,
    pub up: String,
    pub down: String,
}

impl MigrationFile {
    /// `0001_create_customers`.
    pub fn stem(&self) -> String {
        format!("{:04}_{}", self.version, self.name)
    }

    /// Whether svcdb runs the up script outside a transaction.
    pub fn transactional(&self) -> bool {
        !self.up.starts_with(NO_TRANSACTION)
    }
}

/// Writes `<stem>.up.sql` and `<stem>.down.sql` for each migration into `dir` (created if
/// missing); returns the up files' paths, in version order.
pub fn write(dir: &Path, migrations: &[MigrationFile]) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut ups = Vec::with_capacity(migrations.len());
    for m in migrations {
        let up = dir.join(format!("{}.up.sql", m.stem()));
        let down = dir.join(format!("{}.down.sql", m.stem()));
        std::fs::write(&up, &m.up).with_context(|| format!("cannot write {}", up.display()))?;
        std::fs::write(&down, &m.down)
            .with_context(|| format!("cannot write {}", down.display()))?;
        ups.push(up);
    }
    Ok(ups)
}

/// Writes the migrations into `dir` in diesel's layout, as a diesel user must write them: a
/// folder `<version>_<name>/` holding `up.sql` and `down.sql`, and for one that runs outside a
/// transaction a `metadata.toml` saying `run_in_transaction = false` in place of svcdb's marker
/// line (diesel reads only that file). diesel sends a script as one message, which PostgreSQL
/// runs as one implicit transaction, so a non-transactional migration of several statements
/// (`CREATE INDEX CONCURRENTLY` twice) becomes one migration per statement. Versions get a
/// fifth digit for that (`0045` → `00450`, `00451`). Returns how many migrations it wrote.
pub fn write_diesel(dir: &Path, migrations: &[MigrationFile]) -> Result<usize> {
    let mut written = 0;
    for m in migrations {
        let up = m.up.strip_prefix(NO_TRANSACTION).unwrap_or(&m.up);
        let down = m.down.strip_prefix(NO_TRANSACTION).unwrap_or(&m.down);
        let parts: Vec<(String, String)> = if m.transactional() {
            vec![(up.trim_start().to_owned(), down.trim_start().to_owned())]
        } else {
            let ups = svcdb::__private::split_statements(up);
            let downs = svcdb::__private::split_statements(down);
            anyhow::ensure!(
                ups.len() == downs.len(),
                "{}: {} up statements but {} down statements",
                m.stem(),
                ups.len(),
                downs.len()
            );
            // The downs revert the ups in reverse order.
            ups.iter()
                .zip(downs.iter().rev())
                .map(|(up, down)| (format!("{up};\n"), format!("{down};\n")))
                .collect()
        };
        let split = parts.len() > 1;
        for (part, (up, down)) in parts.into_iter().enumerate() {
            let name = if split {
                format!("{}_{}", m.name, part + 1)
            } else {
                m.name.clone()
            };
            let folder = dir.join(format!("{:04}{part}_{name}", m.version));
            std::fs::create_dir_all(&folder)
                .with_context(|| format!("cannot create {}", folder.display()))?;
            let mut files = vec![("up.sql", up), ("down.sql", down)];
            if !m.transactional() {
                files.push(("metadata.toml", "run_in_transaction = false\n".to_owned()));
            }
            for (file, contents) in files {
                let path = folder.join(file);
                std::fs::write(&path, contents)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            written += 1;
        }
    }
    Ok(written)
}

/// Every up script in version order, after `SET search_path TO <schema>`: one file for one
/// `psql -f` session.
pub fn concatenated_up(migrations: &[MigrationFile], schema: &str) -> String {
    let mut sql = format!("SET search_path TO {schema};\n");
    for m in migrations {
        let _ = writeln!(sql, "-- {}\n{}", m.stem(), m.up);
    }
    sql
}

/// A feature-flag table, then one seed row per migration: `count` real but cheap migrations.
pub fn trivial(count: usize) -> Vec<MigrationFile> {
    let mut out = Vec::with_capacity(count);
    if count == 0 {
        return out;
    }
    out.push(MigrationFile {
        version: 1,
        name: "create_feature_flags".into(),
        up: "CREATE TABLE feature_flags (\n    name text PRIMARY KEY,\n    enabled boolean NOT NULL DEFAULT false,\n    created_at timestamptz NOT NULL DEFAULT now()\n);\n".into(),
        down: "DROP TABLE feature_flags;\n".into(),
    });
    for version in 2..=count {
        out.push(MigrationFile {
            version,
            name: format!("seed_flag_{version:04}"),
            up: format!("INSERT INTO feature_flags (name) VALUES ('flag_{version:04}');\n"),
            down: format!("DELETE FROM feature_flags WHERE name = 'flag_{version:04}';\n"),
        });
    }
    out
}

/// `count` realistic migrations (see the module documentation); `backfill_rows` rows per data
/// backfill.
pub fn realistic(count: usize, backfill_rows: u32) -> Vec<MigrationFile> {
    let mut generator = Generator {
        tables: Vec::new(),
        backfill_rows,
        created: 0,
    };
    (1..=count).map(|v| generator.migration(v)).collect()
}

/// (plural, singular) table nouns of a shop's services; later rounds add a suffix.
const NOUNS: &[(&str, &str)] = &[
    ("customers", "customer"),
    ("products", "product"),
    ("orders", "order"),
    ("order_items", "order_item"),
    ("invoices", "invoice"),
    ("payments", "payment"),
    ("shipments", "shipment"),
    ("addresses", "address"),
    ("carts", "cart"),
    ("cart_items", "cart_item"),
    ("reviews", "review"),
    ("categories", "category"),
    ("suppliers", "supplier"),
    ("warehouses", "warehouse"),
    ("stock_levels", "stock_level"),
    ("coupons", "coupon"),
    ("refunds", "refund"),
    ("returns", "return"),
    ("subscriptions", "subscription"),
    ("plans", "plan"),
    ("notifications", "notification"),
    ("sessions", "session"),
    ("audit_events", "audit_event"),
    ("price_lists", "price_list"),
    ("tax_rates", "tax_rate"),
    ("currencies", "currency"),
    ("regions", "region"),
    ("stores", "store"),
    ("employees", "employee"),
    ("departments", "department"),
];

/// Columns added by `ALTER TABLE … ADD COLUMN`, each with its type and default.
const ADDED_COLUMNS: &[(&str, &str)] = &[
    ("notes", "text"),
    ("external_ref", "text"),
    ("priority", "integer NOT NULL DEFAULT 0"),
    ("archived_at", "timestamptz"),
    ("currency_code", "char(3) NOT NULL DEFAULT 'EUR'"),
    ("tags", "text[] NOT NULL DEFAULT '{}'"),
    ("is_active", "boolean NOT NULL DEFAULT true"),
    ("source", "text NOT NULL DEFAULT 'web'"),
];

/// Columns added and then filled from existing data (`UPDATE`), then made `NOT NULL`.
const DERIVED_COLUMNS: &[(&str, &str, &str)] = &[
    ("amount_cents", "bigint", "(amount * 100)::bigint"),
    ("name_search", "text", "lower(name)"),
    (
        "status_rank",
        "smallint",
        "CASE status WHEN 'new' THEN 1 WHEN 'paid' THEN 2 ELSE 3 END",
    ),
];

/// Check constraints, by name suffix.
const CHECKS: &[(&str, &str)] = &[
    ("amount_non_negative", "CHECK (amount >= 0)"),
    (
        "status_known",
        "CHECK (status IN ('new', 'paid', 'shipped', 'cancelled'))",
    ),
];

/// What the generator knows about one table it created.
struct Table {
    name: String,
    singular: String,
    /// The table its foreign key points to (index into `Generator::tables`).
    parent: Option<usize>,
    /// Columns that may get an index, in the order they should.
    indexable: Vec<String>,
    /// Columns that have one.
    indexed: Vec<String>,
    /// `ADDED_COLUMNS` / `DERIVED_COLUMNS` entries already added.
    added: Vec<&'static str>,
    /// `CHECKS` entries already added.
    checks: usize,
    trigger: bool,
    /// Rows inserted by a backfill (ids 1..=rows: the identity starts at 1).
    rows: u32,
}

impl Table {
    fn fk_column(&self, tables: &[Table]) -> Option<String> {
        self.parent.map(|p| format!("{}_id", tables[p].singular))
    }

    fn unindexed(&self) -> impl Iterator<Item = &String> {
        self.indexable.iter().filter(|c| !self.indexed.contains(c))
    }
}

/// What kind of change a version makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    CreateTable,
    Function,
    Index,
    AddColumn,
    Check,
    Trigger,
    BackfillInsert,
    BackfillUpdate,
    ConcurrentIndex,
}

/// The schedule: mostly schema changes, with a backfill of each kind every 50 versions and a
/// concurrent index every 60 (so 300 migrations hold 6 inserts, 5 updates, 5 concurrent ones).
fn kind(version: usize) -> Kind {
    match version {
        1 => Kind::CreateTable,
        2 => Kind::Function,
        v if v % 60 == 45 => Kind::ConcurrentIndex,
        v if v % 50 == 20 => Kind::BackfillInsert,
        v if v % 50 == 35 => Kind::BackfillUpdate,
        v => match v % 7 {
            0 | 3 | 5 => Kind::CreateTable,
            1 => Kind::Index,
            2 | 6 => Kind::AddColumn,
            _ if v % 14 == 4 => Kind::Check,
            _ => Kind::Trigger,
        },
    }
}

struct Generator {
    tables: Vec<Table>,
    backfill_rows: u32,
    /// Tables created so far (names of later rounds get a suffix).
    created: usize,
}

impl Generator {
    /// The migration of `version`; when its kind has nothing to work on (no table without a
    /// trigger left, say) it creates a table instead, which is always possible.
    fn migration(&mut self, version: usize) -> MigrationFile {
        let made = match kind(version) {
            Kind::CreateTable => None,
            Kind::Function => Some(self.function()),
            Kind::Index => self.index(version),
            Kind::AddColumn => self.add_column(version),
            Kind::Check => self.check(version),
            Kind::Trigger => self.trigger(version),
            Kind::BackfillInsert => self.backfill_insert(),
            Kind::BackfillUpdate => self.backfill_update(),
            Kind::ConcurrentIndex => self.concurrent_index(version),
        };
        let (name, up, down) = made.unwrap_or_else(|| self.create_table());
        MigrationFile {
            version,
            name,
            up,
            down,
        }
    }

    /// Tables in a rotating order starting at a version-dependent place, so changes spread
    /// over the schema instead of piling onto the first table.
    fn rotation(&self, version: usize) -> impl Iterator<Item = usize> {
        let n = self.tables.len();
        let start = if n == 0 { 0 } else { version * 7 % n };
        (0..n).map(move |i| (start + i) % n)
    }

    fn create_table(&mut self) -> (String, String, String) {
        let (plural, singular) = NOUNS[self.created % NOUNS.len()];
        let round = self.created / NOUNS.len() + 1;
        let (name, singular) = if round == 1 {
            (plural.to_owned(), singular.to_owned())
        } else {
            (format!("{plural}_{round}"), format!("{singular}_{round}"))
        };
        // Two tables out of three reference an earlier one, about halfway back.
        let parent = (!self.created.is_multiple_of(3) && !self.tables.is_empty())
            .then_some(self.tables.len() / 2);
        self.created += 1;
        let mut table = Table {
            name: name.clone(),
            singular,
            parent,
            indexable: vec!["status".into(), "created_at".into(), "name".into()],
            indexed: Vec::new(),
            added: Vec::new(),
            checks: 0,
            trigger: false,
            rows: 0,
        };
        let mut up = format!(
            "CREATE TABLE {name} (\n    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,\n"
        );
        let mut fk_index = String::new();
        if let Some(fk) = table.fk_column(&self.tables) {
            let parent = &self.tables[parent.expect("fk implies parent")].name;
            let _ = writeln!(
                up,
                "    {fk} bigint REFERENCES {parent} (id) ON DELETE RESTRICT,"
            );
            fk_index = format!("CREATE INDEX {name}_{fk}_idx ON {name} ({fk});\n");
            table.indexed.push(fk);
        }
        up.push_str(
            "    name text NOT NULL,\n    status text NOT NULL DEFAULT 'new',\n    amount numeric(12, 2) NOT NULL DEFAULT 0,\n    metadata jsonb NOT NULL DEFAULT '{}',\n    created_at timestamptz NOT NULL DEFAULT now(),\n    updated_at timestamptz NOT NULL DEFAULT now()\n);\n",
        );
        up.push_str(&fk_index);
        let _ = writeln!(
            up,
            "COMMENT ON TABLE {name} IS 'One row per {}.';",
            table.singular.replace('_', " ")
        );
        self.tables.push(table);
        (
            format!("create_{name}"),
            up,
            format!("DROP TABLE {name};\n"),
        )
    }

    fn function(&mut self) -> (String, String, String) {
        (
            "create_function_set_updated_at".into(),
            "CREATE FUNCTION set_updated_at() RETURNS trigger\nLANGUAGE plpgsql AS $$\nBEGIN\n    NEW.updated_at := now();\n    RETURN NEW;\nEND;\n$$;\n".into(),
            "DROP FUNCTION set_updated_at();\n".into(),
        )
    }

    /// The first table (in rotation) with a column still to index, and that column.
    fn pick_unindexed(&self, version: usize, want_rows: bool) -> Option<(usize, String)> {
        let mut candidates: Vec<usize> = self.rotation(version).collect();
        if want_rows {
            // Prefer filled tables: building an index over rows is what CONCURRENTLY is for.
            candidates.sort_by_key(|&t| self.tables[t].rows == 0);
        }
        candidates.into_iter().find_map(|t| {
            self.tables[t]
                .unindexed()
                .next()
                .map(|column| (t, column.clone()))
        })
    }

    fn index(&mut self, version: usize) -> Option<(String, String, String)> {
        let (t, column) = self.pick_unindexed(version, false)?;
        let table = &mut self.tables[t];
        let name = &table.name;
        let index = format!("{name}_{column}_idx");
        let columns = if column == "status" {
            "status, created_at".to_owned()
        } else {
            column.clone()
        };
        let migration = (
            format!("index_{name}_{column}"),
            format!("CREATE INDEX {index} ON {name} ({columns});\n"),
            format!("DROP INDEX {index};\n"),
        );
        table.indexed.push(column);
        Some(migration)
    }

    fn concurrent_index(&mut self, version: usize) -> Option<(String, String, String)> {
        let (t, first) = self.pick_unindexed(version, true)?;
        let table = &mut self.tables[t];
        table.indexed.push(first.clone());
        // Two statements, as such migrations often have: svcdb must split them, since a
        // multi-statement message is one implicit transaction.
        let mut columns = vec![first];
        let second = table.unindexed().next().cloned();
        if let Some(second) = second {
            table.indexed.push(second.clone());
            columns.push(second);
        }
        let name = &table.name;
        let mut up = format!("{NO_TRANSACTION}\n");
        let mut down = format!("{NO_TRANSACTION}\n");
        for column in &columns {
            let _ = writeln!(
                up,
                "CREATE INDEX CONCURRENTLY {name}_{column}_idx ON {name} ({column});"
            );
        }
        for column in columns.iter().rev() {
            let _ = writeln!(
                down,
                "DROP INDEX CONCURRENTLY IF EXISTS {name}_{column}_idx;"
            );
        }
        Some((format!("index_{name}_concurrently"), up, down))
    }

    fn add_column(&mut self, version: usize) -> Option<(String, String, String)> {
        let (t, &(column, definition)) = self.rotation(version).find_map(|t| {
            ADDED_COLUMNS
                .iter()
                .find(|(c, _)| !self.tables[t].added.contains(c))
                .map(|c| (t, c))
        })?;
        let table = &mut self.tables[t];
        let name = &table.name;
        let migration = (
            format!("add_{column}_to_{name}"),
            format!(
                "ALTER TABLE {name} ADD COLUMN {column} {definition};\nCOMMENT ON COLUMN {name}.{column} IS 'Added in a later release.';\n"
            ),
            format!("ALTER TABLE {name} DROP COLUMN {column};\n"),
        );
        table.added.push(column);
        if !definition.starts_with("text[]") && column != "notes" {
            table.indexable.push(column.to_owned());
        }
        Some(migration)
    }

    fn check(&mut self, version: usize) -> Option<(String, String, String)> {
        let t = self
            .rotation(version)
            .find(|&t| self.tables[t].checks < CHECKS.len())?;
        let table = &mut self.tables[t];
        let (suffix, check) = CHECKS[table.checks];
        table.checks += 1;
        let name = &table.name;
        Some((
            format!("add_{suffix}_to_{name}"),
            format!("ALTER TABLE {name} ADD CONSTRAINT {name}_{suffix} {check};\n"),
            format!("ALTER TABLE {name} DROP CONSTRAINT {name}_{suffix};\n"),
        ))
    }

    fn trigger(&mut self, version: usize) -> Option<(String, String, String)> {
        let t = self.rotation(version).find(|&t| !self.tables[t].trigger)?;
        let table = &mut self.tables[t];
        table.trigger = true;
        let name = &table.name;
        Some((
            format!("add_updated_at_trigger_to_{name}"),
            format!(
                "CREATE TRIGGER {name}_set_updated_at BEFORE UPDATE ON {name}\n    FOR EACH ROW EXECUTE FUNCTION set_updated_at();\n"
            ),
            format!("DROP TRIGGER {name}_set_updated_at ON {name};\n"),
        ))
    }

    /// Seed rows into the newest empty table, pointing at the parent's rows when it has some.
    fn backfill_insert(&mut self) -> Option<(String, String, String)> {
        let t = (0..self.tables.len())
            .rev()
            .find(|&t| self.tables[t].rows == 0)?;
        let rows = self.backfill_rows;
        let table = &self.tables[t];
        let name = &table.name;
        let label = table.singular.replace('_', " ");
        let parent = table.parent.filter(|&p| self.tables[p].rows > 0).map(|p| {
            (
                table.fk_column(&self.tables).expect("parent"),
                self.tables[p].rows,
            )
        });
        let (fk_column, fk_value) = match &parent {
            Some((column, parent_rows)) => (
                format!(", {column}"),
                format!(",\n       g % {parent_rows} + 1"),
            ),
            None => (String::new(), String::new()),
        };
        let up = format!(
            "INSERT INTO {name} (name, status, amount{fk_column})\nSELECT '{label} ' || g,\n       CASE WHEN g % 3 = 0 THEN 'paid' ELSE 'new' END,\n       (g % 500) * 1.25{fk_value}\nFROM generate_series(1, {rows}) AS g;\n"
        );
        // The table was empty before: delete the rows and rewind the identity, so a later up
        // gets the same ids again.
        let down = format!(
            "DELETE FROM {name} WHERE name LIKE '{label} %';\nALTER TABLE {name} ALTER COLUMN id RESTART;\n"
        );
        let name = format!("backfill_{name}");
        self.tables[t].rows = rows;
        Some((name, up, down))
    }

    /// A new column computed from existing rows, then made `NOT NULL`.
    fn backfill_update(&mut self) -> Option<(String, String, String)> {
        let (t, &(column, ty, expression)) = (0..self.tables.len()).rev().find_map(|t| {
            let table = &self.tables[t];
            if table.rows == 0 {
                return None;
            }
            DERIVED_COLUMNS
                .iter()
                .find(|(c, _, _)| !table.added.contains(c))
                .map(|c| (t, c))
        })?;
        let table = &mut self.tables[t];
        table.added.push(column);
        table.indexable.push(column.to_owned());
        let name = &table.name;
        Some((
            format!("add_{column}_to_{name}_backfilled"),
            format!(
                "ALTER TABLE {name} ADD COLUMN {column} {ty};\nUPDATE {name} SET {column} = {expression};\nALTER TABLE {name} ALTER COLUMN {column} SET NOT NULL;\n"
            ),
            format!("ALTER TABLE {name} DROP COLUMN {column};\n"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn realistic_corpus_has_every_kind_and_unique_names() {
        let corpus = realistic(300, 5000);
        assert_eq!(corpus.len(), 300);
        assert_eq!(corpus[0].stem(), "0001_create_customers");
        let stems: HashSet<String> = corpus.iter().map(MigrationFile::stem).collect();
        assert_eq!(stems.len(), 300, "file names must be unique");
        let count = |f: &dyn Fn(&MigrationFile) -> bool| corpus.iter().filter(|m| f(m)).count();
        assert_eq!(count(&|m| !m.transactional()), 5);
        assert!(count(&|m| m.up.contains("REFERENCES")) > 30);
        assert_eq!(count(&|m| m.up.starts_with("INSERT INTO")), 6);
        assert_eq!(count(&|m| m.up.contains("\nUPDATE ")), 5);
        assert!(count(&|m| m.up.starts_with("CREATE INDEX ")) > 20);
        assert!(count(&|m| m.up.contains("ADD COLUMN")) > 50);
        assert!(count(&|m| m.up.contains("CREATE TRIGGER")) > 5);
        // Every concurrent migration's down runs outside a transaction too.
        for m in corpus.iter().filter(|m| !m.transactional()) {
            assert!(m.down.starts_with(NO_TRANSACTION), "{}", m.stem());
            assert_eq!(m.up.matches("CONCURRENTLY").count(), 2, "{}", m.up);
        }
    }

    #[test]
    fn identifiers_fit_postgres_limit() {
        for m in realistic(1000, 10) {
            for word in
                m.up.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            {
                assert!(word.len() <= 63, "{word} in {}", m.stem());
            }
        }
    }

    #[test]
    fn generation_is_deterministic() {
        let a = realistic(120, 100);
        let b = realistic(120, 100);
        assert!(a
            .iter()
            .zip(&b)
            .all(|(x, y)| x.up == y.up && x.down == y.down));
    }

    #[test]
    fn trivial_corpus_seeds_one_row_per_migration() {
        let corpus = trivial(1000);
        assert_eq!(corpus.len(), 1000);
        assert!(corpus[0].up.starts_with("CREATE TABLE feature_flags"));
        assert_eq!(corpus[999].stem(), "1000_seed_flag_1000");
        assert!(corpus.iter().all(MigrationFile::transactional));
    }

    #[test]
    fn concatenation_sets_the_search_path_first() {
        let sql = concatenated_up(&trivial(3), "bench");
        assert!(sql.starts_with("SET search_path TO bench;\n"));
        assert_eq!(sql.matches("INSERT INTO").count(), 2);
    }

    #[test]
    fn the_diesel_layout_reads_back_with_one_statement_per_non_transactional_migration() {
        let corpus = realistic(300, 10);
        let dir = tempfile::tempdir().unwrap();
        let written = write_diesel(dir.path(), &corpus).unwrap();
        let read = svcdb::migrate::Migrations::from_dir(dir.path()).unwrap();
        assert_eq!(read.len(), written);
        // Each of the five concurrent-index migrations holds two statements: ten in all.
        assert_eq!(written, 300 + 5);
        let outside: Vec<_> = read.iter().filter(|m| !m.transactional).collect();
        assert_eq!(outside.len(), 10);
        for m in &outside {
            assert!(!m.down_transactional, "{}", m.name);
            assert_eq!(
                svcdb::__private::split_statements(&m.up).len(),
                1,
                "{}",
                m.name
            );
            assert!(
                !m.up.contains(NO_TRANSACTION),
                "diesel reads only metadata.toml"
            );
        }
        let names: Vec<&str> = read.iter().map(|m| m.name.as_str()).collect();
        let original: Vec<&str> = corpus.iter().map(|m| m.name.as_str()).collect();
        assert!(
            original
                .iter()
                .all(|n| names.iter().any(|r| r.starts_with(n))),
            "every migration is there, in order"
        );
    }
}
