//! `svcdb provision`: a login role owning the service's schema, nothing for PUBLIC; an
//! existing role with more than that is refused, or stripped with `--fix`.

use anyhow::Result;
use svcdb::error::shell_word;
use svcdb::{provision, Config, DedicatedConn, Ident, Password, ProvisionSpec, Tls};

use crate::global::Global;
use crate::output::{errln, outln};
use crate::{output, Outcome};

/// Options of `svcdb provision` (the schema is the global `--schema`).
#[derive(clap::Args)]
pub struct Args {
    /// The service's name; the role is named after it unless --role says otherwise.
    #[arg(long)]
    service: String,

    /// The login role to create; default: the service name.
    #[arg(long)]
    role: Option<String>,

    /// Name of an environment variable holding the role's password (never pass a password
    /// on the command line: other users can read it in the process list).
    #[arg(long, value_name = "VAR")]
    password_env: Option<String>,

    /// Remove what breaks an existing role's isolation (SUPERUSER, CREATEROLE, CREATEDB,
    /// REPLICATION, BYPASSRLS, membership in other roles), and give the role the objects in
    /// its schema that another role owns (left by migrations run as an administrator), instead
    /// of refusing them.
    #[arg(long)]
    fix: bool,
}

/// Provisions with the admin connection given by `--database-url`.
pub async fn run(global: &Global, args: Args) -> Result<Outcome> {
    let schema = global.schema()?;
    Ident::new("service", &args.service)?;
    let mut spec = ProvisionSpec::new(args.role.as_deref().unwrap_or(&args.service), schema)?;
    spec.fix = args.fix;
    if let Some(list) = &global.extra_schemas {
        spec.extra_schemas = Ident::parse_list("schema", list)?;
    }
    if let Some(var) = &args.password_env {
        let password = std::env::var(var).map_err(|_| {
            crate::usage::Usage::new(
                format!("--password-env names {var}, which is not set"),
                format!("export {var} with the role's password first, or leave --password-env out"),
            )
        })?;
        spec.password = Some(Password::new(password));
    }
    // Read as a service's URL is, so that every libpq sslmode (and sslrootcert) holds for the
    // admin connection too; the driver's own parser knows only three modes.
    let admin_config = Config::new(global.database_url()?, schema)?;
    let tls = Tls::new(admin_config.tls, admin_config.ssl_root_cert.as_deref())?;
    let mut admin = match DedicatedConn::connect_with(&admin_config.connection, &tls).await {
        // The usual hint (run `svcdb provision` to create the role) would send the user back
        // here: this connection is the administrator's.
        Err(e) if e.code() == Some(&svcdb::SqlState::INVALID_AUTHORIZATION_SPECIFICATION) => {
            anyhow::bail!(
                "cannot connect as the administrator: role {} does not exist (SQLSTATE 28000)\n  hint: provision connects as an administrator (a superuser, or a role with CREATEROLE that owns the database): give its URL in --database-url",
                admin_config.connection.get_user().unwrap_or("?")
            )
        }
        connected => connected?,
    };
    let report = match provision(&mut admin, &spec).await {
        // Found by an operations trial: run as a service's own role, provision failed with a
        // bare "permission denied for table pg_authid" and no hint.
        // The SQLSTATE stays in the chain, for `--json`'s code.
        Err(e) if e.code() == Some(&svcdb::SqlState::INSUFFICIENT_PRIVILEGE) => {
            return Err(anyhow::Error::new(e).context(format!(
                "role {} may not provision\n  hint: provision creates roles and schemas, so it connects as an administrator (a superuser, or a role with CREATEROLE that owns the database): give the administrator's URL in --database-url",
                admin_config.connection.get_user().unwrap_or("?")
            )))
        }
        provisioned => provisioned?,
    };
    if global.json {
        output::json(&report)?;
    } else if report.changes.is_empty() {
        outln!(
            "nothing to do: role {} and schema {} are already provisioned in {}",
            report.role,
            report.schema,
            report.database
        );
    } else {
        for change in &report.changes {
            outln!("{change}");
        }
    }
    if !global.json {
        // Notes on stderr, as every other command's: stdout holds what was done.
        if !report.other_schemas.is_empty() {
            errln!("{}", other_schemas_warning(&report));
        }
        if report.has_password == Some(false) {
            errln!("{}", no_password_note(global, &args, &report.role, schema));
        }
    }
    Ok(Outcome::Success)
}

/// What to do about the schemas a role owns besides its own (`--json` has `other_schemas`).
fn other_schemas_warning(report: &svcdb::ProvisionReport) -> String {
    let (schemas, them) = match report.other_schemas.as_slice() {
        [one] => (format!("schema {one}"), "it"),
        more => (format!("schemas {}", more.join(", ")), "them"),
    };
    let drop = report
        .other_schemas
        .iter()
        // Quoted: the name is the server's, whatever its case or characters.
        .map(|s| format!("DROP SCHEMA \"{}\";", s.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        "warning: role {role} also owns {schemas} in {database}, off its search path now (it names only {schema}); provisioned before with another --schema?\n  \
         hint: if nothing uses {them}, drop {them} as an administrator: `{drop}` (refused while a schema holds objects: look before adding CASCADE)",
        role = report.role,
        database = report.database,
        schema = report.schema,
    )
}

/// What to do about a role without a password (`--json` has `has_password: false` instead):
/// this provisioning's command again, with `--password-env`.
fn no_password_note(global: &Global, args: &Args, role: &str, schema: &str) -> String {
    let var = format!("{}_PASSWORD", args.service.to_uppercase().replace('$', "_"));
    // Quoted where a shell would change them (a `$` in a name).
    let service = shell_word(&args.service);
    let schema = shell_word(schema);
    let mut flags = String::new();
    if let Some(role) = &args.role {
        flags.push_str(&format!(" --role {}", shell_word(role)));
    }
    // Provisioning sets the role's search_path to exactly these: leaving them out would drop them.
    if let Some(extra) = &global.extra_schemas {
        flags.push_str(&format!(" --extra-schemas {}", shell_word(extra)));
    }
    if args.fix {
        flags.push_str(" --fix");
    }
    format!(
        "note: role {role} has no password, so a server that checks passwords (pg_hba.conf `scram-sha-256`, the usual setup) refuses it with \"password missing\"\n  \
         hint: give it one: `export {var}=\"$(openssl rand -hex 16)\"; svcdb provision --service {service}{flags} --schema {schema} --password-env {var}`, \
         then give the service the same password (in DATABASE_URL, postgres://{role}:<password>@host/db, or SVCDB_PASSWORD or PGPASSWORD)"
    )
}
