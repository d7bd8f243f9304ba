//! A database outage seen from the consumer: a delivery task that met an unavailable
//! database asks the consume loop to pause (cancel its `basic.consume`), which then checks the
//! database with backoff until it hands out a connection that can write, and consumes again.
//! A failover does not dead-letter the backlog.

use svcdb::ServiceDb;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::ConsumerOptions;
use crate::connection::{next_backoff, pause};

/// Whether the consumer takes deliveries: a delivery task that met an unavailable database
/// asks for a pause, and hands its message back once the broker sends nothing more (else the
/// broker could hand it straight back to this consumer, spending a delivery before 4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Flow {
    /// `basic.consume` is active.
    Consuming,
    /// A task met an unavailable database; the consume loop is to cancel.
    PauseRequested,
    /// Cancelled, until the database answers again.
    Paused,
    /// The consume loop ended (shutdown, lost channel).
    Stopped,
}

/// Asks the consume loop to pause (if it is consuming) and waits until it took no more
/// deliveries: a message handed back before that could come straight back to this consumer.
pub(super) async fn pause_consuming(flow: &watch::Sender<Flow>) {
    flow.send_if_modified(|flow| {
        let request = *flow == Flow::Consuming;
        if request {
            *flow = Flow::PauseRequested;
        }
        request
    });
    let mut flow = flow.subscribe();
    // The consume loop sets Paused or Stopped on every path out of Consuming.
    let _ = flow
        .wait_for(|f| matches!(f, Flow::Paused | Flow::Stopped))
        .await;
}

/// Checks the database with backoff (from [`ConsumerOptions::retry_delay`], doubling up to
/// [`ConsumerOptions::max_retry_delay`]) until it can write: `true`, or `false` when
/// `shutdown` came first.
pub(super) async fn wait_until_writable(
    db: &ServiceDb,
    options: &ConsumerOptions,
    queue: &str,
    shutdown: &CancellationToken,
) -> bool {
    let mut wait = options.retry_delay;
    loop {
        if !pause(shutdown, wait).await {
            return false;
        }
        let check = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return false,
            check = database_can_write(db) => check,
        };
        match check {
            Ok(()) => return true,
            Err(reason) => {
                wait = next_backoff(wait, options.max_retry_delay);
                tracing::debug!(target: "svcdb_amqp::consumer", %queue, %reason, check_in = ?wait, "the database is still unavailable");
            }
        }
    }
}

/// `Ok` when the database hands out a connection that can write; else why not. Handlers'
/// transactions always write (the claim), so a connection to a primary that turned read-only
/// is not "back".
async fn database_can_write(db: &ServiceDb) -> std::result::Result<(), String> {
    let conn = db.get().await.map_err(|e| e.to_string())?;
    let row = conn
        .query_one("SELECT current_setting('transaction_read_only')", &[])
        .await
        .map_err(|e| svcdb::error::pg_message(&e))?;
    match row.try_get::<_, String>(0).as_deref() {
        Ok("off") => Ok(()),
        Ok(_) => Err("the database accepts only read-only transactions".to_owned()),
        Err(e) => Err(svcdb::error::pg_message(e)),
    }
}
