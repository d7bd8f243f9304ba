//! Options every subcommand shares, and the library configuration built from them.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use svcdb::migrate::Migrations;
use svcdb::{Config, ServiceDb};

use crate::output::errln;
use crate::usage::Usage;

/// The default of `--dir`; `schema verify` and `health` skip the migration checks when this
/// default folder is absent (a folder named explicitly must exist).
pub const DEFAULT_MIGRATIONS_DIR: &str = "./migrations";

/// Connection and output options shared by every subcommand.
#[derive(clap::Args)]
pub struct Global {
    /// PostgreSQL URL: postgres://user[:password]@host[:port]/dbname, with libpq's
    /// ?sslmode=disable|allow|prefer|require|verify-ca|verify-full and &sslrootcert=<CA file>
    // hide_env_values: the URL may hold a password, and --help must not print it.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,

    /// The service's schema.
    #[arg(long, env = "SVCDB_SCHEMA", global = true)]
    pub schema: Option<String>,

    /// Schemas searched after the service schema, comma-separated (e.g. public,extensions).
    #[arg(long, env = "SVCDB_EXTRA_SCHEMAS", global = true)]
    pub extra_schemas: Option<String>,

    /// The migrations folder.
    #[arg(
        long,
        env = "SVCDB_MIGRATIONS_DIR",
        global = true,
        default_value = DEFAULT_MIGRATIONS_DIR
    )]
    pub dir: PathBuf,

    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,

    /// Cancelled by the first Ctrl-C or SIGTERM ([`crate::interrupt`]).
    #[arg(skip)]
    pub interrupt: tokio_util::sync::CancellationToken,
}

impl Global {
    /// The URL, or a usage error (exit 64) saying how to give it.
    pub fn database_url(&self) -> Result<&str> {
        // An empty one (`--database-url ""`, `DATABASE_URL=`) is none given.
        self.database_url
            .as_deref()
            .filter(|url| !url.trim().is_empty())
            .ok_or_else(|| {
                Usage::new(
                "no database given",
                "pass --database-url or set DATABASE_URL, e.g. postgres://catalog@127.0.0.1/appdb",
            )
            .into()
            })
    }

    /// The service schema, or a usage error (exit 64) saying how to give it.
    pub fn schema(&self) -> Result<&str> {
        self.schema
            .as_deref()
            .filter(|schema| !schema.trim().is_empty())
            .ok_or_else(|| {
                Usage::new(
                    "no schema given",
                    "pass --schema or set SVCDB_SCHEMA to the service's schema",
                )
                .into()
            })
    }

    /// The service configuration: these options first, then the `SVCDB_*` environment for
    /// everything else (pool sizes, timeouts; see the library's `config` module).
    pub fn config(&self) -> Result<Config> {
        let url = self.database_url()?;
        let schema = self.schema()?;
        let mut config = Config::from_lookup(|key| match key {
            "DATABASE_URL" => Some(url.to_owned()),
            "SVCDB_SCHEMA" => Some(schema.to_owned()),
            "SVCDB_EXTRA_SCHEMAS" => self.extra_schemas.clone(),
            other => std::env::var(other).ok(),
        })
        .map_err(crate::usage::InvalidSetting)?;
        // A command-line run needs one connection, not a warm pool of five.
        config.pool_min = config.pool_min.min(1);
        Ok(config)
    }

    /// Connects the service pool. Never creates the schema (SVCDB_CREATE_SCHEMA is for the
    /// service and for `migrate up`): the commands that use this read, or delete old rows.
    pub async fn connect(&self) -> Result<ServiceDb> {
        let mut config = self.config()?;
        config.create_schema = false;
        ServiceDb::connect(config).await.map_err(|e| {
            if e.is_schema_missing() {
                SchemaMissingHere::of(&e).into()
            } else {
                e.into()
            }
        })
    }

    /// Reads the migrations folder (`--dir`), with a warning on stderr when it holds `.sql`
    /// files that are not migrations: a folder named for another tool would otherwise just
    /// look up to date.
    pub fn migrations(&self) -> Result<Migrations> {
        /// File names listed in the warning; the rest are counted.
        const LISTED: usize = 5;
        let migrations = Migrations::from_dir(&self.dir)?;
        let listed = |files: &[&String]| {
            let mut names = files[..files.len().min(LISTED)]
                .iter()
                .map(|f| f.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            if files.len() > LISTED {
                names.push_str(&format!(" and {} more", files.len() - LISTED));
            }
            names
        };
        // Found by a trial on a folder split into sub-folders of versions (`000001-000100/`):
        // the files were named as the warning asked, and ignored for where they were.
        // A Flyway callback gets a warning of its own, below (found by a trial: it got both).
        let (nested, other): (Vec<&String>, Vec<&String>) = migrations
            .ignored()
            .iter()
            .filter(|f| !is_flyway_callback(f) && flyway_baseline_version(f).is_none())
            .partition(|f| is_nested_migration(f));
        // Found by a trial with `--dir db` where the files were in db/migrations: `up` and
        // `status` said "up to date" (exit 0), and a start-up gate would have passed on an
        // empty schema. With nothing else in the folder, that is the wrong folder.
        if migrations.is_empty() && migrations.repeatables().is_empty() && !nested.is_empty() {
            let mut folders: Vec<&str> = nested
                .iter()
                .filter_map(|f| f.rsplit_once('/').map(|(folder, _)| folder))
                .collect();
            folders.dedup();
            let inside = |folder: &str| self.dir.join(folder).display().to_string();
            let hint = match folders.as_slice() {
                [one] => format!(
                    "point --dir (or SVCDB_MIGRATIONS_DIR) at the folder that holds them: --dir {}",
                    svcdb::error::shell_word(&inside(one))
                ),
                _ => "point --dir (or SVCDB_MIGRATIONS_DIR) at the folder that holds them, or move them all into one folder".to_owned(),
            };
            return Err(svcdb::migrate::MigrateError::Source {
                path: migrations.origin().to_owned(),
                message: format!(
                    "holds no migration, but {} .sql file{} in its sub-folders {} named like migrations ({}); svcdb reads migrations from the folder itself\n  hint: {hint}",
                    nested.len(),
                    if nested.len() == 1 { "" } else { "s" },
                    if nested.len() == 1 { "is" } else { "are" },
                    listed(&nested)
                ),
            }
            .into());
        }
        if !nested.is_empty() {
            errln!(
                "warning: ignored {} .sql file{} in sub-folders of {} named like migrations ({}); svcdb reads migrations from the folder itself (only Flyway's V<version>__<name>.sql also from sub-folders)\n  hint: point --dir at the folder that holds them, or move them all into one folder",
                nested.len(),
                if nested.len() == 1 { "" } else { "s" },
                migrations.origin(),
                listed(&nested)
            );
        }
        if !other.is_empty() {
            let (files, are) = match other.len() {
                1 => ("file", "is not a migration"),
                _ => ("files", "are not migrations"),
            };
            errln!(
                "warning: ignored {} .sql {files} in {} that {are} ({}); migration files are named <version>_<name>.sql, <version>_<name>.up.sql/.down.sql, V<version>__<name>.sql, R__<name>.sql or <version>_<name>/up.sql",
                other.len(),
                migrations.origin(),
                listed(&other)
            );
        }
        let ignored = migrations.ignored();
        for (file, version) in ignored
            .iter()
            .filter_map(|f| Some((f, flyway_baseline_version(f)?)))
        {
            errln!(
                "warning: {file} is a Flyway baseline migration, which svcdb does not run: on an empty database Flyway runs it in place of the versions up to {version}, and svcdb runs those versions\n  hint: to start a new database from it, apply it (psql -f), then record the versions it stands for with `svcdb migrate baseline {version}`; a database Flyway migrated is taken over with `svcdb migrate adopt --from flyway`"
            );
        }
        for callback in ignored.iter().filter(|f| is_flyway_callback(f)) {
            errln!(
                "warning: {callback} is a Flyway callback, which svcdb does not run\n  hint: to keep what it does, move its statements into a repeatable migration (R__<name>.sql: run after the versioned ones whenever the file changes) or a new versioned one"
            );
        }
        Ok(migrations)
    }
}

/// Whether `path` (relative to the migrations folder, `/`-separated) is a file in a sub-folder
/// whose own name reads as a migration's: `<digits>_<name>.sql` (or `.up.sql`, `.down.sql`).
fn is_nested_migration(path: &str) -> bool {
    let Some((_, file)) = path.rsplit_once('/') else {
        return false;
    };
    let Some((version, rest)) = file.split_once('_') else {
        return false;
    };
    !version.is_empty()
        && version.bytes().all(|b| b.is_ascii_digit() || b == b'-')
        && version.bytes().next().is_some_and(|b| b.is_ascii_digit())
        && !rest.is_empty()
        && file.ends_with(".sql")
}

/// A missing service schema, met by a command that only reads: the library's hint to let
/// svcdb create it "when it connects" does not hold here (found by a user trial: the hint
/// named SVCDB_CREATE_SCHEMA while it was set). Its JSON code stays the SQLSTATE, 3F000.
#[derive(Debug)]
pub struct SchemaMissingHere(String);

impl SchemaMissingHere {
    /// The library's message, with the hint worded for a command that only reads.
    fn of(e: &svcdb::Error) -> Self {
        const CONNECTS: &str = "or let svcdb create it when it connects (SVCDB_CREATE_SCHEMA=true, Config::create_schema)";
        Self(e.to_string().replace(
            CONNECTS,
            // Found by another trial: with the variable already set, `up` failed for the
            // role's missing CREATE on the database, which the hint did not say it needs.
            "or let `svcdb migrate up` create it (it does with SVCDB_CREATE_SCHEMA=true, as a role that may create schemas in the database); this command creates nothing",
        ))
    }
}

impl std::fmt::Display for SchemaMissingHere {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SchemaMissingHere {}

/// True for the name of a Flyway SQL callback (`afterMigrate.sql`, `beforeEachMigrate__log.sql`,
/// in a sub-folder too): an event name, `before` or `after` and a capital letter.
/// The version of a Flyway baseline migration, `B<version>__<description>.sql` (Flyway 9;
/// `B1_20_0__x.sql` is 1.20.0), as `svcdb migrate baseline` takes it; `None` for any other
/// file.
fn flyway_baseline_version(rel: &str) -> Option<String> {
    let file = rel.rsplit('/').next().unwrap_or(rel);
    let (version, _) = file.strip_prefix('B')?.split_once("__")?;
    let version = version.replace('_', ".");
    let digits = version
        .split('.')
        .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()));
    (digits && file.ends_with(".sql")).then_some(version)
}

fn is_flyway_callback(rel: &str) -> bool {
    let file = rel.rsplit('/').next().unwrap_or(rel);
    ["before", "after"].iter().any(|when| {
        file.strip_prefix(when)
            .and_then(|rest| rest.chars().next())
            .is_some_and(|c| c.is_ascii_uppercase())
    })
}

/// Parses `500ms`, `10s`, `2m` or bare seconds, like the `SVCDB_*` durations: the value parser
/// of every duration option.
pub fn duration(value: &str) -> Result<Duration, String> {
    svcdb::__private::parse_duration("duration", value).map_err(|e| match e {
        // The key is clap's to name (it quotes the option); keep only what is wrong.
        svcdb::Error::Config { message, .. } => message,
        other => other.to_string(),
    })
}

/// A duration that must be more than zero (a wait of 0 could never succeed).
pub fn positive_duration(value: &str) -> Result<Duration, String> {
    let d = duration(value)?;
    if d.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(d)
}

/// A duration the server counts in whole milliseconds in an `int` (`lock_timeout`,
/// `statement_timeout`): 0 for no limit, else from 1ms to 2147483647ms (about 24 days).
pub fn server_timeout(value: &str) -> Result<Duration, String> {
    const MAX_MS: u128 = i32::MAX as u128;
    let d = duration(value)?;
    if !d.is_zero() && d < Duration::from_millis(1) {
        return Err(
            "must be 0 (no limit) or at least 1ms: PostgreSQL counts it in milliseconds".into(),
        );
    }
    if d.as_millis() > MAX_MS {
        return Err(format!(
            "must be at most {MAX_MS}ms (about 24 days), the most PostgreSQL takes; 0 sets no limit"
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use proptest::prelude::*;

    /// Found by a user trial (hawkbit's `B1_20_0__…sql`): a Flyway baseline migration got the
    /// warning for files that are no migration at all; it gets its own, with the version to
    /// give `svcdb migrate baseline`.
    #[test]
    fn a_flyway_baseline_migration_is_told_by_its_name() {
        for (file, version) in [
            ("B1_20_0__1.0.0_baseline__POSTGRESQL.sql", Some("1.20.0")),
            ("sub/B7__base.sql", Some("7")),
            ("B2.1__x.sql", Some("2.1")),
            ("Bad__x.sql", None),
            ("B__x.sql", None),
            ("B1__x.txt", None),
            ("V1__x.sql", None),
            ("beforeMigrate.sql", None),
        ] {
            assert_eq!(
                super::flyway_baseline_version(file).as_deref(),
                version,
                "{file}"
            );
        }
    }

    /// Every duration flag, as the command line spells it.
    type ParseFn = fn(&str) -> Result<std::time::Duration, String>;

    /// Every duration flag, as the command line spells it, with the parser it takes.
    const DURATION_FLAGS: [(&[&str], ParseFn); 6] = [
        (&["migrate", "up", "--lock-wait"], super::duration),
        (&["migrate", "up", "--lock-timeout"], super::server_timeout),
        (
            &["migrate", "up", "--statement-timeout"],
            super::server_timeout,
        ),
        (&["migrate", "repair", "--lock-wait"], super::duration),
        (&["schema", "verify", "--timeout"], super::positive_duration),
        (&["health", "--timeout"], super::positive_duration),
    ];

    /// Numbers as people (and fuzzers) write them, with and without units, and anything else.
    fn duration_text() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<f64>().prop_map(|x| x.to_string()),
            any::<f64>().prop_map(|x| format!("{x:e}")),
            any::<u128>().prop_map(|x| x.to_string()),
            (
                any::<u64>(),
                prop::sample::select(vec!["ms", "s", "m", "h", "d", "y"])
            )
                .prop_map(|(n, unit)| format!("{n}{unit}")),
            "\\PC{0,24}",
        ]
    }

    /// Found by a README walkthrough: `events purge --older-than 7` deleted everything older
    /// than seven seconds.
    #[test]
    fn a_retention_needs_its_unit() {
        let parse = |value: &str| {
            let flag = format!("--older-than={value}");
            crate::Cli::try_parse_from(["svcdb", "events", "purge", &flag])
        };
        for bad in ["7", "1.5", " 30 "] {
            assert!(
                matches!(parse(bad), Err(e) if e.kind() == clap::error::ErrorKind::ValueValidation),
                "{bad:?}"
            );
        }
        for good in ["7d", "24h", "0"] {
            assert!(parse(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn a_history_table_is_a_table_or_schema_dot_table() {
        let parse = |value: &str| {
            let flag = format!("--history-table={value}");
            crate::Cli::try_parse_from(["svcdb", "migrate", "adopt", "--from", "sqlx", &flag])
        };
        for bad in ["", "a.b.c", ".t", "s.", " "] {
            assert!(
                matches!(parse(bad), Err(e) if e.kind() == clap::error::ErrorKind::ValueValidation),
                "{bad:?}"
            );
        }
        for good in ["t", "s.t"] {
            assert!(parse(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn out_of_range_durations_are_usage_errors() {
        for text in ["1e30", "NaN", "-1", "inf", "99999999999999999999999y"] {
            let flag = format!("--lock-wait={text}");
            let parsed = crate::Cli::try_parse_from(["svcdb", "migrate", "up", &flag]);
            match parsed {
                Err(e) => assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{text}"),
                Ok(_) => panic!("{text} was accepted"),
            }
        }
    }

    /// Found by a robustness trial: `--lock-timeout 3000000s` reached the server, which
    /// refused it (22023) after connecting; `--statement-timeout 1ns` timed out svcdb's own
    /// first statement.
    #[test]
    fn server_timeouts_out_of_the_servers_range_are_usage_errors() {
        for text in ["3000000s", "25d", "1ns", "0.5ms"] {
            for flag in ["--lock-timeout", "--statement-timeout"] {
                let flag = format!("{flag}={text}");
                let parsed = crate::Cli::try_parse_from(["svcdb", "migrate", "up", &flag]);
                assert!(
                    matches!(parsed, Err(e) if e.kind() == clap::error::ErrorKind::ValueValidation),
                    "{flag}"
                );
            }
        }
        for text in ["0", "1ms", "24d", "10s"] {
            let flag = format!("--lock-timeout={text}");
            assert!(
                crate::Cli::try_parse_from(["svcdb", "migrate", "up", &flag]).is_ok(),
                "{text}"
            );
        }
    }

    proptest! {
        #[test]
        fn no_duration_flag_panics(index in 0..DURATION_FLAGS.len(), text in duration_text()) {
            // `--flag=value`: a value starting with '-' is then a value, not another flag.
            let (words, parser) = DURATION_FLAGS[index];
            let (flag, command) = words.split_last().unwrap();
            let flag = format!("{flag}={text}");
            let mut args = vec!["svcdb"];
            args.extend(command);
            args.push(&flag);
            // Ok (a duration every deadline computation caps) or clap's usage error.
            let parsed = crate::Cli::try_parse_from(&args);
            prop_assert_eq!(parsed.is_ok(), parser(&text).is_ok(), "{:?}", args);
        }
    }
}
