//! `pretext keys`: the operator's commands for API keys (create, list,
//! revoke). They talk to Postgres directly, not to a server, so they work
//! before any key exists; the database is migrated first.

use anyhow::Context;
use clap::{Args, Subcommand};
use uuid::Uuid;

use super::output::{maybe_time, time, Table};
use super::CliError;
use crate::auth::keys::{generate_key, store_key};
use crate::db::connect_and_migrate;
use crate::db::keys::{list_keys, revoke_key};

/// `pretext keys …`
#[derive(Args, Debug)]
pub struct KeysArgs {
    /// Postgres connection string of the server's database.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/pretext",
        global = true
    )]
    pub database_url: String,

    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(Subcommand, Debug)]
enum KeysCommand {
    /// Make a key for a tenant (created if new) and print it, once.
    Create {
        /// The tenant the key acts for; its datasets, jobs and models are
        /// the only ones the key sees.
        #[arg(long)]
        tenant: String,
        /// A label to tell keys apart in `pretext keys list`.
        #[arg(long, default_value = "")]
        name: String,
    },
    /// List every key: id, tenant, name, prefix, dates (never the key).
    List,
    /// Revoke a key by id; requests with it are refused from then on.
    Revoke {
        /// The key's id, as `pretext keys list` shows it.
        id: Uuid,
    },
}

/// Runs one `keys` command; returns the process exit code.
pub async fn run(args: KeysArgs) -> i32 {
    match execute(args).await {
        Ok(()) => 0,
        Err(error) => {
            error.report();
            error.exit_code()
        }
    }
}

async fn execute(args: KeysArgs) -> Result<(), CliError> {
    let pool = connect_and_migrate(&args.database_url).await?;
    match args.command {
        KeysCommand::Create { tenant, name } => {
            let tenant = tenant.trim();
            if tenant.is_empty() || tenant.chars().count() > 100 {
                return Err(CliError::Usage(
                    "--tenant must be 1 to 100 characters, such as --tenant acme".into(),
                ));
            }
            let key = generate_key();
            let id = store_key(&pool, tenant, name.trim(), &key)
                .await
                .context("Failed to store the key")?;
            eprintln!("key {id} for tenant `{tenant}`; keep it, it is shown only this once:");
            println!("{key}");
        }
        KeysCommand::List => {
            let keys = list_keys(&pool).await.context("Failed to list keys")?;
            let mut table = Table::new(vec![
                "ID",
                "TENANT",
                "NAME",
                "PREFIX",
                "CREATED",
                "LAST USED",
                "REVOKED",
            ]);
            for key in keys {
                table.row(vec![
                    key.id.to_string(),
                    key.tenant,
                    if key.name.is_empty() {
                        "-".to_string()
                    } else {
                        key.name
                    },
                    format!("{}…", key.prefix),
                    time(&key.created_at),
                    maybe_time(&key.last_used_at),
                    maybe_time(&key.revoked_at),
                ]);
            }
            table.print("no keys yet; make one with `pretext keys create --tenant NAME`");
        }
        KeysCommand::Revoke { id } => {
            let revoked_at = revoke_key(&pool, id)
                .await
                .context("Failed to revoke the key")?
                .ok_or_else(|| {
                    CliError::Usage(format!(
                        "no key with id {id}; `pretext keys list` shows the ids"
                    ))
                })?;
            println!("key {id} revoked at {}", time(&revoked_at));
        }
    }
    Ok(())
}
