//! The consume loop on one channel: a task per delivery or per batch, a pause while the
//! database is unavailable, and a graceful end (cancel, drain, wait for in-flight handlers).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::Channel;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::batch::Pending;
use super::context::Context;
use super::outage::{self, Flow};
use super::stats::Counters;
use super::unsettled::Unsettled;
use super::Consumer;
use crate::error::{Error, Result};

impl Consumer {
    /// Consumes from `channel` until shutdown (`Ok`) or the channel is lost, then waits for
    /// the in-flight handlers (up to the shutdown timeout).
    pub(super) async fn consume(
        &self,
        channel: &Channel,
        dead_letters: &Channel,
        shutdown: &CancellationToken,
    ) -> Result<()> {
        let queue = self.queue.name.as_str();
        channel
            .basic_qos(self.config.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| {
                Error::amqp(
                    format!("setting prefetch {} on {queue}", self.config.prefetch),
                    e,
                )
            })?;
        let permits = usize::from(self.config.prefetch).min(self.db.config().pool_max.max(1));
        let context = Arc::new(Context {
            db: self.db.clone(),
            name: self.name.clone(),
            queue: self.queue.clone(),
            handlers: self.handlers.clone(),
            dead_letters: dead_letters.clone(),
            options: self.options.clone(),
            permits: Semaphore::new(permits),
            shutdown: shutdown.clone(),
            counters: self.counters.clone(),
            flow: watch::Sender::new(Flow::Consuming),
            unsettled: Unsettled::default(),
        });

        let mut tasks = JoinSet::new();
        let outcome = self
            .consume_until_stopped(channel, &context, &mut tasks)
            .await;
        // Tasks waiting for the pause to hand their message back must not wait for a loop
        // that has ended.
        context.flow.send_replace(Flow::Stopped);

        let in_flight = tasks.len();
        let finish = async {
            while let Some(joined) = tasks.join_next().await {
                log_join(joined);
            }
        };
        if tokio::time::timeout(self.options.shutdown_timeout, finish)
            .await
            .is_err()
        {
            tracing::warn!(target: "svcdb_amqp::consumer", %queue, remaining = tasks.len(), timeout = ?self.options.shutdown_timeout, "handlers still running at the shutdown timeout; aborting them (their transactions roll back and their messages are redelivered)");
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        match &outcome {
            Ok(()) => {
                tracing::info!(target: "svcdb_amqp::consumer", %queue, consumer = %self.name, in_flight, "consumer stopped")
            }
            Err(e) => {
                tracing::warn!(target: "svcdb_amqp::consumer", %queue, consumer = %self.name, in_flight, error = %e, "consumer lost its channel")
            }
        }
        outcome
    }

    /// Consumes, spawning a task per delivery into `tasks`, until shutdown (`Ok`) or the
    /// channel is lost; pauses while the database is unavailable.
    async fn consume_until_stopped(
        &self,
        channel: &Channel,
        context: &Arc<Context>,
        tasks: &mut JoinSet<()>,
    ) -> Result<()> {
        let queue = self.queue.name.as_str();
        let shutdown = &context.shutdown;
        let mut resuming = false;
        // A batch holds at most what the broker sends unacknowledged.
        let size = self.options.batch.min(usize::from(self.config.prefetch));
        let mut pending = Pending::new(size, self.options.linger, self.options.eager);
        loop {
            // A tag per basic.consume, prefixed with the consumer name, so the management UI
            // shows which service and replica holds which messages.
            let random = uuid::Uuid::now_v7().simple().to_string();
            let tag = format!("{}.{}", self.name, &random[random.len() - 8..]);
            let mut deliveries = channel
                .basic_consume(
                    queue.into(),
                    crate::publish::short(&tag),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| {
                    if resuming && !channel.status().connected() {
                        // Lost while paused (a broker restart): reconnecting helps.
                        Error::ConnectionLost {
                            reason: format!(
                                "the channel closed while the consumer was paused: {e}"
                            ),
                        }
                    } else {
                        Error::amqp(format!("consuming from queue {queue}"), e)
                    }
                })?;
            context.flow.send_replace(Flow::Consuming);
            tracing::info!(target: "svcdb_amqp::consumer", %queue, consumer = %self.name, %tag, prefetch = self.config.prefetch, "consuming");

            let mut flow = context.flow.subscribe();
            let database_out = loop {
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break false,
                    Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                        log_join(joined);
                        pending.batch_ended(context, tasks);
                    }
                    _ = flow.wait_for(|f| *f == Flow::PauseRequested) => break true,
                    () = pending.lingered() => pending.flush(context, tasks),
                    next = deliveries.next() => match next {
                        Some(Ok(delivery)) => pending.push(delivery, context, tasks),
                        Some(Err(e)) => {
                            pending.flush(context, tasks);
                            return Err(Error::ConnectionLost { reason: e.to_string() });
                        }
                        None => {
                            pending.flush(context, tasks);
                            return Err(Error::ConnectionLost {
                                reason: format!("the broker cancelled the consumer of {queue} (was the queue deleted?)"),
                            });
                        }
                    },
                }
            };
            // Stop the flow, then handle what the broker sent before it saw the cancel: those
            // messages are ours until settled, and handling them now spares them a
            // redelivery (while paused, they are handed back if the database is still out).
            cancel_and_drain(channel, &tag, &mut deliveries, context, &mut pending, tasks).await;
            if !database_out {
                return Ok(());
            }

            context.flow.send_replace(Flow::Paused);
            Counters::bump(&context.counters.paused);
            tracing::warn!(target: "svcdb_amqp::consumer", %queue, consumer = %self.name, "the database is unavailable; stopped taking deliveries until it answers");
            if !outage::wait_until_writable(&self.db, &self.options, queue, shutdown).await {
                return Ok(());
            }
            tracing::info!(target: "svcdb_amqp::consumer", %queue, consumer = %self.name, "the database answers again; taking deliveries");
            resuming = true;
        }
    }
}

/// Cancels the consumer `tag` and spawns tasks for the open batch and for the deliveries the
/// broker sent before it saw the cancel.
async fn cancel_and_drain(
    channel: &Channel,
    tag: &str,
    deliveries: &mut lapin::Consumer,
    context: &Arc<Context>,
    pending: &mut Pending,
    tasks: &mut JoinSet<()>,
) {
    pending.flush(context, tasks);
    let queue = context.queue.name.as_str();
    let cancel = channel.basic_cancel(crate::publish::short(tag), BasicCancelOptions::default());
    // Bounded: a broker that went silent never confirms the cancel.
    match tokio::time::timeout(DRAIN_TIMEOUT, cancel).await {
        Ok(Ok(())) => {
            let drain = async {
                while let Some(Ok(delivery)) = deliveries.next().await {
                    pending.push(delivery, context, tasks);
                }
            };
            if tokio::time::timeout(DRAIN_TIMEOUT, drain).await.is_err() {
                tracing::debug!(target: "svcdb_amqp::consumer", %queue, "consumer stream did not end after basic.cancel; going on anyway");
            }
            pending.flush(context, tasks);
        }
        Ok(Err(e)) => {
            tracing::debug!(target: "svcdb_amqp::consumer", %queue, error = %e, "basic.cancel failed; the channel is closed with the consumer")
        }
        Err(_) => {
            tracing::debug!(target: "svcdb_amqp::consumer", %queue, timeout = ?DRAIN_TIMEOUT, "the broker did not confirm basic.cancel; going on anyway")
        }
    }
}

/// Longest wait, after `basic.cancel`, for the deliveries the broker sent before it saw the
/// cancel; lapin ends the stream once the broker confirms the cancel, so this only matters
/// when the broker does not answer.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Logs a delivery task that panicked outside the handler (handler panics are caught in the
/// task).
fn log_join(joined: std::result::Result<(), tokio::task::JoinError>) {
    if let Err(e) = joined {
        if e.is_panic() {
            // Handler panics are caught inside the task; this is the runtime's own code.
            tracing::error!(target: "svcdb_amqp::consumer", error = %e, "a delivery task panicked");
        }
    }
}
