//! Dedicated connections: opened outside the pool, closed when dropped.

use std::ops::{Deref, DerefMut};

use tokio::sync::mpsc;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{AsyncMessage, Client, NoTls, Notification, SimpleQueryMessage, Socket};

use crate::config::describe_target;
use crate::error::{Error, Result};
use crate::tls::{Tls, TlsMode};

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
    ///
    /// Plain unless `config`'s `ssl_mode` is `Require`: then encrypted, the certificate
    /// unchecked (libpq's `require`). For `verify-ca`/`verify-full` use
    /// [`connect_with`](Self::connect_with) with the pool's [`Tls`], or one built from
    /// [`Config::tls`](crate::Config::tls).
    pub async fn connect(config: &tokio_postgres::Config) -> Result<Self> {
        let tls = Tls::new(TlsMode::of_driver_config(config), None)?;
        Self::connect_with(config, &tls).await
    }

    /// Opens a connection with `config`, encrypted and checked as `tls` says (its mode replaces
    /// `config`'s `ssl_mode`).
    pub async fn connect_with(config: &tokio_postgres::Config, tls: &Tls) -> Result<Self> {
        let config = tls.driver_config(config);
        match tls.rustls() {
            None => Self::open(&config, NoTls, None).await,
            Some(rustls) => Self::open(&config, rustls.clone(), None).await,
        }
    }

    /// Connects and spawns the task driving the socket; generic because the stream type
    /// differs with and without TLS.
    async fn open<T>(
        config: &tokio_postgres::Config,
        tls: T,
        notifications: Option<mpsc::UnboundedSender<Notification>>,
    ) -> Result<Self>
    where
        T: MakeTlsConnect<Socket>,
        T::Stream: Send + 'static,
    {
        let (client, mut connection) =
            config.connect(tls).await.map_err(|cause| Error::Connect {
                target: describe_target(config),
                cause,
            })?;
        let driver = tokio::spawn(async move {
            // Polling messages drives the connection as awaiting it does, and hands over the
            // notifications of `LISTEN`, which awaiting it drops.
            while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                match message {
                    Ok(AsyncMessage::Notification(n)) => {
                        if let Some(to) = &notifications {
                            let _ = to.send(n);
                        }
                    }
                    // What the server says besides answers: a migration's `RAISE NOTICE` or
                    // `RAISE WARNING`, or its own warnings. Dropped before (found by a user
                    // trial: a backfill's "backfilled 42 rows" and a WARNING never showed);
                    // warnings at warn, the rest (NOTICE, INFO, LOG) at info, under target
                    // `svcdb::server`, which the CLI shows from warn up.
                    Ok(AsyncMessage::Notice(notice)) => {
                        let (severity, message) = (notice.severity(), notice.message());
                        if severity == "WARNING" {
                            tracing::warn!(target: "svcdb::server", severity, "{message}");
                        } else {
                            tracing::info!(target: "svcdb::server", severity, "{message}");
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(target: "svcdb::connection", error = %crate::error::pg_message(&e), "dedicated connection ended");
                        break;
                    }
                }
            }
        });
        Ok(Self { client, driver })
    }

    /// Like [`connect_with`](Self::connect_with), and hands over the connection's `NOTIFY`
    /// notifications (after a `LISTEN`). The receiver ends when the connection does.
    pub(crate) async fn connect_listening(
        config: &tokio_postgres::Config,
        tls: &Tls,
    ) -> Result<(Self, mpsc::UnboundedReceiver<Notification>)> {
        let (to, from) = mpsc::unbounded_channel();
        let config = tls.driver_config(config);
        let conn = match tls.rustls() {
            None => Self::open(&config, NoTls, Some(to)).await,
            Some(rustls) => Self::open(&config, rustls.clone(), Some(to)).await,
        }?;
        Ok((conn, from))
    }
}

/// Whether the server behind `client` accepts writes now: `transaction_read_only` is off. A
/// standby says `on`, and so does a primary fenced with `default_transaction_read_only`
/// during a switchover. The check `target_session_attrs=read-write` makes when connecting
/// (`SHOW transaction_read_only`), made again on a connection that is already open.
pub(crate) async fn accepts_writes(client: &Client) -> Result<bool, tokio_postgres::Error> {
    let messages = client.simple_query("SHOW transaction_read_only").await?;
    Ok(!messages
        .iter()
        .any(|m| matches!(m, SimpleQueryMessage::Row(row) if row.get(0) == Some("on"))))
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
