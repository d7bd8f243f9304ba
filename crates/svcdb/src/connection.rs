//! Dedicated connections: opened outside the pool, closed when dropped.

use std::ops::{Deref, DerefMut};

use tokio_postgres::{Client, NoTls};

use crate::config::describe_target;
use crate::error::{Error, Result};

/// A connection of its own, outside any pool. Dropping it closes the socket, which also
/// releases every session-level lock it held, even if the task holding it panicked or was
/// cancelled.
pub struct DedicatedConn {
    /// The driver's client; reach it through `Deref`.
    client: Client,
    /// The task that drives the socket; aborted on drop so the socket closes at once.
    driver: tokio::task::JoinHandle<()>,
}

impl DedicatedConn {
    /// Opens a connection with `config` (which should carry the pinned schema; see
    /// [`Config::session_config`](crate::Config::session_config)).
    pub async fn connect(config: &tokio_postgres::Config) -> Result<Self> {
        let (client, connection) =
            config
                .connect(NoTls)
                .await
                .map_err(|source| Error::Connect {
                    target: describe_target(config),
                    source,
                })?;
        let driver = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(target: "svcdb::connection", error = %crate::error::pg_message(&e), "dedicated connection ended");
            }
        });
        Ok(Self { client, driver })
    }
}

impl Deref for DedicatedConn {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl DerefMut for DedicatedConn {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

impl Drop for DedicatedConn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl std::fmt::Debug for DedicatedConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DedicatedConn")
            .field("closed", &self.client.is_closed())
            .finish()
    }
}
