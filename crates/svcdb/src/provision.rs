//! Provisioning: a login role per service owning its schema, enforced by PostgreSQL privileges.

use std::fmt;

use serde::Serialize;
use tokio_postgres::Client;

use crate::error::Result;
use crate::ident::{quoted_list, Ident};

/// A password that never shows in `Debug` or `Display`.
#[derive(Clone)]
pub struct Password(String);

impl Password {
    /// Wraps a password.
    pub fn new(password: impl Into<String>) -> Self {
        Self(password.into())
    }

    /// The password itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// What to provision for one service.
#[derive(Debug, Clone)]
pub struct ProvisionSpec {
    /// The service's login role. Default: the service name.
    pub role: Ident,
    /// The service's schema, owned by `role`.
    pub schema: Ident,
    /// Schemas searched after the service schema (`public`, `extensions`); the role is granted
    /// `USAGE` on each and they are appended to its default `search_path`. Default: none.
    pub extra_schemas: Vec<Ident>,
    /// Password for the role, sent to the server only as a SCRAM-SHA-256 verifier. Default:
    /// none (the role authenticates however `pg_hba.conf` says).
    pub password: Option<Password>,
    /// Remove what breaks the role's isolation instead of refusing it: its `SUPERUSER`,
    /// `CREATEROLE`, `CREATEDB`, `REPLICATION` and `BYPASSRLS` attributes, and its memberships
    /// in other roles (`svcdb provision --fix`). Never done to the role provisioning connects
    /// as. Also give the role the objects in its schema that another role owns. Default: false
    /// (refused, with the statements that would fix it).
    pub fix: bool,
}

impl ProvisionSpec {
    /// The spec for `service` using `schema`, with the role named after the service.
    pub fn new(service: &str, schema: &str) -> Result<Self> {
        Ok(Self {
            role: Ident::new("role", service)?,
            schema: Ident::new("schema", schema)?,
            extra_schemas: Vec::new(),
            password: None,
            fix: false,
        })
    }
}

/// What [`provision`] did; `changes` is empty when everything was already in place.
#[derive(Debug, Clone, Serialize)]
pub struct ProvisionReport {
    /// The service's role.
    pub role: String,
    /// The service's schema.
    pub schema: String,
    /// The database provisioned in.
    pub database: String,
    /// One line per change made, in order.
    pub changes: Vec<String>,
    /// Whether the role has a password: `Some(false)` means it can log in only where
    /// `pg_hba.conf` trusts it or uses another method (`peer`, certificates), and every
    /// password-checking connection fails with "password missing" until it gets one
    /// ([`ProvisionSpec::password`], `svcdb provision --password-env`). `None` when provisioning
    /// cannot tell: reading `pg_authid` takes a superuser.
    pub has_password: Option<bool>,
    /// Other schemas of this database the role owns, by name: left by an earlier provisioning
    /// with another schema (a typo put right, a rename), or made by the role itself. Its
    /// `search_path` now names only `schema` (and the extras), so a service connected as it no
    /// longer finds what they hold; provisioning never drops a schema.
    pub other_schemas: Vec<String>,
}

/// Creates or completes, in one transaction, the role and schema of one service:
///
/// 1. a `LOGIN` role without `SUPERUSER`, `CREATEROLE`, `CREATEDB`, `REPLICATION`,
///    `BYPASSRLS` or membership in any other role, with its password if given;
/// 2. `CONNECT` on the current database;
/// 3. the schema, owned by the role, and every object in it (tables, sequences, views, types,
///    functions: what an administrator's migration run may have left) owned by the role;
/// 4. no privileges for `PUBLIC` on the schema;
/// 5. `USAGE` on each extra schema, and no `CREATE` on it for `PUBLIC`;
/// 6. the role's default `search_path` in this database: the schema, then the extras.
///
/// An existing role with any of those attributes or memberships is an [`Error::Config`]
/// (key `role`) naming each and the statements that remove them, and nothing is changed;
/// with [`ProvisionSpec::fix`] they are removed instead. Likewise objects in the schema owned
/// by another role (key `schema`): with `fix` they are given to the role. The role `admin` connects as is
/// never changed so (it is refused: provision a dedicated role).
///
/// `admin` must be allowed to create roles (a superuser, or a role with `CREATEROLE` that owns
/// the database; removing `SUPERUSER`, `REPLICATION` or `BYPASSRLS` takes a superuser).
/// Concurrent calls serialize on an advisory lock.
///
/// [`Error::Config`]: crate::Error::Config
///
/// After [`provision`], a service connected as its own role can use its schema and nothing
/// else: another service's schema answers `permission denied` (SQLSTATE 42501), because each
/// schema is owned by its service's role and grants nothing to `PUBLIC`. Running it again
/// changes nothing.
///
/// It never reports isolation it cannot give. An existing role with an attribute that
/// bypasses privileges (`SUPERUSER`, `BYPASSRLS`), widens them (`CREATEROLE`, `CREATEDB`,
/// `REPLICATION`) or that is a member of another role (another service's, or a predefined one
/// like `pg_read_all_data`) is refused, naming each, unless [`ProvisionSpec::fix`] asks for
/// them to be removed. And `PUBLIC`'s `CREATE` on an extra schema (schema `public` has it by
/// default up to PostgreSQL 14) is revoked: with it, any role could plant a table or function
/// there that shadows what the service means to find on its search path (CVE-2018-1058).
pub async fn provision(admin: &mut Client, spec: &ProvisionSpec) -> Result<ProvisionReport> {
    // `public` is every role's by default: made one service's, with PUBLIC's privileges
    // revoked, every other role of the database would lose it.
    if spec.schema.as_str() == "public" {
        return Err(crate::Error::config(
            "schema",
            "public is shared by every role of the database; provisioning it would take it from the others\n  hint: give the service a schema of its own (`--schema <service>`)",
        ));
    }
    // An empty password (a secret store that handed over nothing) would remove the role's.
    if spec
        .password
        .as_ref()
        .is_some_and(|p| p.expose().is_empty())
    {
        return Err(crate::Error::config(
            "password",
            "is empty; setting it would leave the role without a password\n  hint: check the variable --password-env names (ProvisionSpec::password)",
        ));
    }
    let tx = admin.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended('svcdb.provision', 0))",
        &[],
    )
    .await?;
    let role = &spec.role;
    let schema = &spec.schema;
    let db_row = tx
        .query_one(
            "SELECT current_database(), quote_ident(current_database())",
            &[],
        )
        .await?;
    let database: String = db_row.get(0);
    let database_sql: String = db_row.get(1);
    let mut changes = Vec::new();

    // 1. The role.
    let existing = tx
        .query_opt(
            "SELECT rolcanlogin FROM pg_roles WHERE rolname = $1",
            &[&role.as_str()],
        )
        .await?;
    match existing {
        None => {
            tx.batch_execute(&format!(
                "CREATE ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS"
            ))
            .await?;
            if let Some(password) = &spec.password {
                set_password(&tx, role, password).await?;
            }
            changes.push(format!("created login role {}", role.as_str()));
        }
        Some(row) => {
            isolate_role(&tx, role, spec.fix, &mut changes).await?;
            if !row.get::<_, bool>(0) {
                tx.batch_execute(&format!("ALTER ROLE {role} LOGIN"))
                    .await?;
                changes.push(format!("allowed role {} to log in", role.as_str()));
            }
            if let Some(password) = &spec.password {
                // Set again on every run: PostgreSQL keeps only a salted verifier, so whether
                // the password is the same cannot be asked.
                set_password(&tx, role, password).await?;
                changes.push(format!("set the password of role {}", role.as_str()));
            }
        }
    }

    // 2. CONNECT on this database (PUBLIC usually has it; a locked-down database does not).
    let can_connect: bool = tx
        .query_one(
            "SELECT has_database_privilege($1, current_database(), 'CONNECT')",
            &[&role.as_str()],
        )
        .await?
        .get(0);
    if !can_connect {
        tx.batch_execute(&format!(
            "GRANT CONNECT ON DATABASE {database_sql} TO {role}"
        ))
        .await?;
        changes.push(format!(
            "granted CONNECT on database {database} to {}",
            role.as_str()
        ));
    }

    // 2b. Giving the role the schema (CREATE SCHEMA … AUTHORIZATION, ALTER … OWNER TO) needs
    // an administrator that may act as it: a superuser, or a member (PostgreSQL 15), or one
    // with the SET option (16 on). A CREATEROLE administrator may grant itself that (found by
    // a user trial: on 15, the README's "a role with CREATEROLE that owns the database" failed
    // with "must be member of role"). It keeps it, as the role's creator: a second run
    // changes nothing.
    //
    // One round trip, which also asks (for the report) whether it may read the role's
    // password: only a superuser may read pg_authid. Asked apart from reading it: the server
    // checks a statement's every table before it runs, a CASE branch it would not take
    // included (found by a user trial: a CREATEROLE administrator failed there).
    let admin = tx
        .query_one(
            "SELECT current_user::text, current_setting('server_version_num')::int >= 160000,
                    pg_has_role(current_user, $1, CASE WHEN current_setting('server_version_num')::int >= 160000
                                                       THEN 'SET' ELSE 'MEMBER' END),
                    has_table_privilege('pg_catalog.pg_authid', 'SELECT')",
            &[&role.as_str()],
        )
        .await?;
    let (admin_name, set_option, may_act, reads_passwords): (String, bool, bool, bool) =
        (admin.get(0), admin.get(1), admin.get(2), admin.get(3));
    // A superuser may act as any role.
    if !may_act {
        let options = if set_option {
            " WITH SET TRUE, INHERIT FALSE"
        } else {
            ""
        };
        tx.batch_execute(&format!("GRANT {role} TO CURRENT_USER{options}"))
            .await?;
        changes.push(format!(
            "granted role {} to the administrator {admin_name}, so that it may give it the schema",
            role.as_str()
        ));
    }

    // 3. The schema, owned by the role.
    let owner: Option<String> = tx
        .query_opt(
            "SELECT pg_get_userbyid(nspowner)::text FROM pg_namespace WHERE nspname = $1",
            &[&schema.as_str()],
        )
        .await?
        .map(|r| r.get(0));
    match owner {
        None => {
            tx.batch_execute(&format!("CREATE SCHEMA {schema} AUTHORIZATION {role}"))
                .await?;
            changes.push(format!(
                "created schema {} owned by {}",
                schema.as_str(),
                role.as_str()
            ));
        }
        Some(owner) if owner != role.as_str() => {
            // Made for the service by whoever provisions (a superuser, or this admin): handed
            // over. Another role's (another service's) only with --fix.
            let made_for_it: bool = tx
                .query_one(
                    "SELECT $1 = current_user::text OR (SELECT rolsuper FROM pg_roles WHERE rolname = $1)",
                    &[&owner],
                )
                .await?
                .get(0);
            if !made_for_it && !spec.fix {
                return Err(crate::Error::refused(
                    "schema",
                    format!(
                        "schema {} belongs to role {owner}, perhaps another service's\n  hint: give the service a schema of its own, or provision again with --fix (ProvisionSpec::fix) to hand it to {}",
                        schema.as_str(),
                        role.as_str()
                    ),
                ));
            }
            tx.batch_execute(&format!("ALTER SCHEMA {schema} OWNER TO {role}"))
                .await?;
            changes.push(format!(
                "gave schema {} to role {} (it was owned by {owner})",
                schema.as_str(),
                role.as_str()
            ));
        }
        Some(_) => {}
    }
    reassign_foreign_objects(&tx, schema, role, spec.fix, &mut changes).await?;

    // 4. Nothing for PUBLIC on the schema.
    let public_has_any: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace n, aclexplode(n.nspacl) a \
             WHERE n.nspname = $1 AND a.grantee = 0)",
            &[&schema.as_str()],
        )
        .await?
        .get(0);
    if public_has_any {
        tx.batch_execute(&format!("REVOKE ALL ON SCHEMA {schema} FROM PUBLIC"))
            .await?;
        changes.push(format!(
            "revoked PUBLIC's privileges on schema {}",
            schema.as_str()
        ));
    }

    // 5. USAGE on the extra schemas, and no CREATE there for PUBLIC.
    for extra in &spec.extra_schemas {
        revoke_public_create(&tx, extra, &mut changes).await?;
        let usage: Option<bool> = tx
            .query_opt(
                "SELECT has_schema_privilege($1, nspname, 'USAGE') FROM pg_namespace WHERE nspname = $2",
                &[&role.as_str(), &extra.as_str()],
            )
            .await?
            .map(|r| r.get(0));
        match usage {
            None => {
                return Err(crate::Error::config(
                    "extra_schemas",
                    format!(
                    "schema {} does not exist; create it first or leave it out of --extra-schemas",
                    extra.as_str()
                ),
                ))
            }
            Some(false) => {
                tx.batch_execute(&format!("GRANT USAGE ON SCHEMA {extra} TO {role}"))
                    .await?;
                changes.push(format!(
                    "granted USAGE on schema {} to {}",
                    extra.as_str(),
                    role.as_str()
                ));
            }
            Some(true) => {}
        }
    }

    // 6. The role's default search_path in this database.
    let mut path = vec![schema.clone()];
    path.extend(spec.extra_schemas.iter().cloned());
    let wanted = path.iter().map(Ident::as_str).collect::<Vec<_>>().join(",");
    let current: Option<String> = tx
        .query_opt(
            "SELECT substr(c, length('search_path=') + 1) \
             FROM pg_db_role_setting s \
             JOIN pg_database d ON d.oid = s.setdatabase AND d.datname = current_database() \
             JOIN pg_roles r ON r.oid = s.setrole AND r.rolname = $1, \
             unnest(s.setconfig) c WHERE c LIKE 'search_path=%'",
            &[&role.as_str()],
        )
        .await?
        .map(|r| r.get(0));
    // The server stores the list re-quoted and with spaces; compare the bare names.
    let normalize = |s: &str| s.replace(['"', ' '], "");
    if current.as_deref().map(normalize) != Some(wanted.clone()) {
        tx.batch_execute(&format!(
            "ALTER ROLE {role} IN DATABASE {database_sql} SET search_path TO {}",
            quoted_list(&path)
        ))
        .await?;
        changes.push(format!(
            "set the default search_path of {} in {database} to {wanted}",
            role.as_str()
        ));
    }

    // pg_roles shows every password as ********.
    let has_password: Option<bool> = if reads_passwords {
        tx.query_one(
            "SELECT rolpassword IS NOT NULL FROM pg_catalog.pg_authid WHERE rolname = $1",
            &[&role.as_str()],
        )
        .await?
        .get(0)
    } else {
        None
    };

    // Found by a user trial: provisioning again with another --schema quietly made the role
    // the owner of two schemas, the first one off its search path.
    let other_schemas = tx
        .query(
            "SELECT nspname::text FROM pg_namespace
             WHERE nspowner = (SELECT oid FROM pg_roles WHERE rolname = $1) AND nspname <> $2
             ORDER BY 1",
            &[&role.as_str(), &schema.as_str()],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();

    tx.commit().await?;
    Ok(ProvisionReport {
        role: role.as_str().to_owned(),
        schema: schema.as_str().to_owned(),
        database,
        changes,
        has_password,
        other_schemas,
    })
}

/// The objects of `schema` owned by another role than `role`, as (what, owner, the statement
/// that gives it to `role`), by kind and name. Tables, views, materialized views, sequences,
/// foreign tables, composite types, functions, procedures and aggregates, domains, enums and
/// range types: what migrations create. Left out: what changes owner with another object
/// (indexes and TOAST tables with their table, a column's sequence with its table, a range's
/// multirange and constructor functions and every array type with their type: internal
/// dependencies, `pg_depend.deptype` `i`, as a table's row type is, and a serial column's
/// `a`) and extension members
/// (`e`), which belong to their extension.
const FOREIGN_OBJECTS_SQL: &str = "
WITH target AS (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = $2::text),
objects AS (
    SELECT 'pg_catalog.pg_class'::regclass AS classid, c.oid AS objid, c.relowner AS owner,
           CASE c.relkind WHEN 'r' THEN 'table' WHEN 'p' THEN 'table' WHEN 'v' THEN 'view'
                WHEN 'm' THEN 'materialized view' WHEN 'S' THEN 'sequence'
                ELSE 'foreign table' END AS kind,
           format('%I.%I', n.nspname, c.relname) AS name
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = $1::text AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
       AND NOT (c.relkind = 'S' AND EXISTS (
           SELECT FROM pg_catalog.pg_depend d
            WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = c.oid
              AND d.refobjsubid > 0 AND d.deptype IN ('a', 'i')))
    UNION ALL
    SELECT 'pg_catalog.pg_proc'::regclass, p.oid, p.proowner,
           CASE p.prokind WHEN 'p' THEN 'procedure' WHEN 'a' THEN 'aggregate' ELSE 'function' END,
           format('%I.%I(%s)', n.nspname, p.proname, pg_catalog.pg_get_function_identity_arguments(p.oid))
      FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
     WHERE n.nspname = $1::text
    UNION ALL
    SELECT 'pg_catalog.pg_type'::regclass, t.oid, t.typowner,
           CASE t.typtype WHEN 'd' THEN 'domain' ELSE 'type' END,
           format('%I.%I', n.nspname, t.typname)
      FROM pg_catalog.pg_type t JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace
     WHERE n.nspname = $1::text AND t.typtype IN ('c', 'd', 'e', 'r')
)
SELECT o.kind, o.name, pg_catalog.pg_get_userbyid(o.owner)::text,
       format('ALTER %s %s OWNER TO %I',
              CASE WHEN o.kind IN ('function', 'procedure') THEN 'ROUTINE'
                   ELSE upper(o.kind) END,
              o.name, $2::text)
  FROM objects o, target
 WHERE o.owner <> target.oid
   AND NOT EXISTS (SELECT FROM pg_catalog.pg_depend d
                    WHERE d.classid = o.classid AND d.objid = o.objid AND d.deptype IN ('e', 'i'))
 ORDER BY o.kind, o.name";

/// Refuses (or, with `fix`, reassigns to `role`) the objects of `schema` that another role
/// owns: what a migration run as an administrator left behind. The service's role cannot use,
/// alter or drop them (`permission denied`), and its later migrations would fail on them.
/// Object by object, not `REASSIGN OWNED`, which would take everything the other role owns in
/// the whole database.
async fn reassign_foreign_objects(
    tx: &tokio_postgres::Transaction<'_>,
    schema: &Ident,
    role: &Ident,
    fix: bool,
    changes: &mut Vec<String>,
) -> Result<()> {
    /// How many objects a refusal names; the statements cover them all.
    const SHOWN: usize = 10;
    let foreign: Vec<(String, String, String, String)> = tx
        .query(FOREIGN_OBJECTS_SQL, &[&schema.as_str(), &role.as_str()])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    if foreign.is_empty() {
        return Ok(());
    }
    let (schema_name, role_name) = (schema.as_str(), role.as_str());
    if !fix {
        let mut named: Vec<String> = foreign
            .iter()
            .take(SHOWN)
            .map(|(kind, name, owner, _)| format!("{kind} {name} (owned by {owner})"))
            .collect();
        if foreign.len() > SHOWN {
            named.push(format!("and {} more", foreign.len() - SHOWN));
        }
        let statements: Vec<&str> = foreign.iter().map(|(.., sql)| sql.as_str()).collect();
        return Err(crate::Error::refused(
            "schema",
            format!(
                "schema {schema_name} holds {} owned by a role other than {role_name}, which the service cannot use, alter or drop (permission denied): {}\n  \
                 hint: provision again with --fix (ProvisionSpec::fix) to give each to {role_name}, or run `{};`; \
                 they were likely made by migrations run as another role, which svcdb now runs as the schema's owner",
                objects(foreign.len()),
                named.join(", "),
                statements.join("; ")
            ),
        ));
    }
    for (.., statement) in &foreign {
        tx.batch_execute(statement).await?;
    }
    let mut owners: Vec<&str> = foreign
        .iter()
        .map(|(_, _, owner, _)| owner.as_str())
        .collect();
    owners.sort_unstable();
    owners.dedup();
    changes.push(format!(
        "gave {} in schema {schema_name} to role {role_name} (owned by {})",
        objects(foreign.len()),
        owners.join(", ")
    ));
    Ok(())
}

/// `1 object`, `3 objects`.
fn objects(n: usize) -> String {
    format!("{n} object{}", if n == 1 { "" } else { "s" })
}

/// The role attributes that break isolation: each lets the role past the privileges
/// provisioning sets up (`SUPERUSER`, `BYPASSRLS`) or lets it widen them (`CREATEROLE` can
/// grant itself any role but superusers, `CREATEDB` makes databases it owns, `REPLICATION`
/// streams every schema's changes). `pg_roles` column, keyword, what removes it.
const UNSAFE_ATTRIBUTES: [(&str, &str, &str); 5] = [
    ("rolsuper", "SUPERUSER", "NOSUPERUSER"),
    ("rolcreaterole", "CREATEROLE", "NOCREATEROLE"),
    ("rolcreatedb", "CREATEDB", "NOCREATEDB"),
    ("rolreplication", "REPLICATION", "NOREPLICATION"),
    ("rolbypassrls", "BYPASSRLS", "NOBYPASSRLS"),
];

/// Sets `role`'s password. Only the salted SCRAM verifier crosses the wire, so the password
/// itself cannot land in the server's log even with `log_statement = 'all'`; and the verifier
/// (which can be attacked offline) is in no statement's text, but a parameter that shows as
/// `<redacted>` in tokio-postgres's debug log (found by a user trial: with `RUST_LOG` naming
/// `tokio_postgres`, the `ALTER ROLE … PASSWORD '…'` statement was logged whole). `ALTER
/// ROLE` takes no parameters, so a function of the session's own (`pg_temp`, dropped again)
/// runs it.
async fn set_password(
    tx: &tokio_postgres::Transaction<'_>,
    role: &Ident,
    password: &Password,
) -> Result<()> {
    let verifier = postgres_protocol::password::scram_sha_256(password.expose().as_bytes());
    tx.batch_execute(
        "CREATE FUNCTION pg_temp.svcdb_set_password(role_name text, verifier text) RETURNS void
         LANGUAGE plpgsql AS $$ BEGIN
           EXECUTE format('ALTER ROLE %I PASSWORD %L', role_name, verifier);
         END $$",
    )
    .await?;
    tx.execute(
        "SELECT pg_temp.svcdb_set_password($1, $2)",
        &[&role.as_str(), &Redacted(&verifier)],
    )
    .await?;
    tx.batch_execute("DROP FUNCTION pg_temp.svcdb_set_password(text, text)")
        .await?;
    Ok(())
}

/// A text parameter whose `Debug` (what tokio-postgres logs of a statement's parameters)
/// hides it.
struct Redacted<'a>(&'a str);

impl fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl tokio_postgres::types::ToSql for Redacted<'_> {
    fn to_sql(
        &self,
        ty: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>>
    {
        self.0.to_sql(ty, out)
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        <&str as tokio_postgres::types::ToSql>::accepts(ty)
    }

    tokio_postgres::types::to_sql_checked!();
}

/// Refuses (or, with `fix`, removes) what an existing `role` has beyond a service's needs:
/// the [`UNSAFE_ATTRIBUTES`] and membership in other roles, through which it holds another
/// service's privileges (or a predefined role's, like `pg_read_all_data`).
async fn isolate_role(
    tx: &tokio_postgres::Transaction<'_>,
    role: &Ident,
    fix: bool,
    changes: &mut Vec<String>,
) -> Result<()> {
    let columns = UNSAFE_ATTRIBUTES.map(|(column, _, _)| column).join(", ");
    let row = tx
        .query_one(
            &format!(
                "SELECT {columns}, rolname = current_user, \
                 ARRAY(SELECT quote_ident(g.rolname) FROM pg_auth_members m \
                       JOIN pg_roles g ON g.oid = m.roleid \
                       WHERE m.member = r.oid ORDER BY g.rolname) \
                 FROM pg_roles r WHERE rolname = $1"
            ),
            &[&role.as_str()],
        )
        .await?;
    let attributes: Vec<_> = UNSAFE_ATTRIBUTES
        .iter()
        .enumerate()
        .filter(|&(i, _)| row.get::<_, bool>(i))
        .map(|(_, &attribute)| attribute)
        .collect();
    let is_connected_role: bool = row.get(UNSAFE_ATTRIBUTES.len());
    let memberships: Vec<String> = row.get(UNSAFE_ATTRIBUTES.len() + 1);
    if attributes.is_empty() && memberships.is_empty() {
        return Ok(());
    }

    let name = role.as_str();
    let mut statements = Vec::new();
    if !attributes.is_empty() {
        let removals: Vec<_> = attributes.iter().map(|(_, _, removal)| *removal).collect();
        statements.push(format!("ALTER ROLE {role} {}", removals.join(" ")));
    }
    statements.extend(
        memberships
            .iter()
            .map(|granted| format!("REVOKE {granted} FROM {role}")),
    );
    let mut found: Vec<String> = attributes
        .iter()
        .map(|(_, keyword, _)| keyword.to_string())
        .collect();
    found.extend(
        memberships
            .iter()
            .map(|granted| format!("membership in {granted}")),
    );
    let found = found.join(", ");

    if is_connected_role {
        return Err(crate::Error::refused(
            "role",
            format!(
                "role {name} has {found}, and it is the role provisioning connects as, so it is not changed\n  \
                 hint: give the service a role of its own (--role), and connect as an administrator"
            ),
        ));
    }
    if !fix {
        return Err(crate::Error::refused(
            "role",
            format!(
                "role {name} exists with {found}, which bypass or widen the privileges that isolate it\n  \
                 hint: remove them with `{};`, or provision with --fix (ProvisionSpec::fix) to have them removed",
                statements.join("; ")
            ),
        ));
    }
    for statement in &statements {
        tx.batch_execute(statement).await?;
    }
    // On PostgreSQL 16 and later a membership granted by several roles survives a REVOKE of
    // the grant made by the current one: check rather than report what did not happen.
    let left: i64 = tx
        .query_one(
            "SELECT count(*) FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member \
             WHERE r.rolname = $1",
            &[&name],
        )
        .await?
        .get(0);
    if left > 0 {
        return Err(crate::Error::refused(
            "role",
            format!(
                "role {name} is still a member of another role after REVOKE: the membership was granted by another role too\n  \
                 hint: as a superuser, run REVOKE <role> FROM {role} GRANTED BY <grantor> for each grantor in pg_auth_members"
            ),
        ));
    }
    changes.push(format!("removed {found} from role {name}"));
    Ok(())
}

/// Revokes `PUBLIC`'s `CREATE` on an extra schema, which PostgreSQL 14 and older grant on
/// schema `public` by default. While it holds, any role can create a table or function there
/// that the service finds on its search path before the one it meant (CVE-2018-1058):
/// PostgreSQL 15 dropped that default, and its documentation's secure schema usage pattern
/// revokes it. Revoked rather than refused because a service needs only `USAGE` on a shared
/// schema, and no role should need `CREATE` there through `PUBLIC`.
async fn revoke_public_create(
    tx: &tokio_postgres::Transaction<'_>,
    schema: &Ident,
    changes: &mut Vec<String>,
) -> Result<()> {
    let public_creates: Option<bool> = tx
        .query_opt(
            "SELECT has_schema_privilege('public', oid, 'CREATE') FROM pg_namespace WHERE nspname = $1",
            &[&schema.as_str()],
        )
        .await?
        .map(|r| r.get(0));
    if public_creates == Some(true) {
        tx.batch_execute(&format!("REVOKE CREATE ON SCHEMA {schema} FROM PUBLIC"))
            .await?;
        changes.push(format!(
            "revoked PUBLIC's CREATE on schema {} (any role could plant objects on the service's search path)",
            schema.as_str()
        ));
    }
    Ok(())
}
