//! A batch of deliveries in one transaction: their events claimed in one statement, each
//! handler run under a savepoint, one commit, then the acknowledgements (see [Batches](super::Consumer#batches)
//! for the rules). Collected by [`Pending`] in the consume loop.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use futures_util::FutureExt;
use lapin::message::Delivery;
use svcdb::idempotency::EventRef;
use svcdb::{Envelope, Processed, Retryable, Transaction, TxOptions};
use tokio::task::JoinSet;
use tracing::{Instrument, Span};

use super::context::Context;
use super::delivery::{self, Work};
use super::stats::Counters;
use super::{outage, settle};
use crate::handler::{DynHandler, HandlerError};

/// A handler's outcome in the batch: `Err` was rolled back to its savepoint.
type Outcome = std::result::Result<Processed<()>, HandlerError>;

/// A batch's transaction: each delivery's outcome and how long its handler took, or the error
/// that failed the whole batch.
type Ran = std::result::Result<Vec<(Outcome, Duration)>, HandlerError>;

/// The deliveries received and not yet handed to a batch task: a batch closes when it holds
/// `size` deliveries, `linger` after its first, or (`eager`) when no other batch is running.
pub(super) struct Pending {
    size: usize,
    linger: Duration,
    eager: bool,
    deliveries: Vec<Delivery>,
    deadline: Option<tokio::time::Instant>,
}

impl Pending {
    /// Batches of up to `size` (1: a task per delivery, no batching).
    pub(super) fn new(size: usize, linger: Duration, eager: bool) -> Self {
        Self {
            size: size.max(1),
            linger,
            eager,
            deliveries: Vec::new(),
            deadline: None,
        }
    }

    /// Adds `delivery`; spawns its batch once full, or at once when `tasks` (the running
    /// batches) is empty and the batches are eager.
    pub(super) fn push(
        &mut self,
        delivery: Delivery,
        context: &Arc<Context>,
        tasks: &mut JoinSet<()>,
    ) {
        context.unsettled.received(delivery.delivery_tag);
        if self.size == 1 {
            tasks.spawn(delivery::handle(context.clone(), delivery));
            return;
        }
        if self.deliveries.is_empty() {
            self.deadline = Some(tokio::time::Instant::now() + self.linger);
        }
        self.deliveries.push(delivery);
        if self.deliveries.len() >= self.size || (self.eager && tasks.is_empty()) {
            self.flush(context, tasks);
        }
    }

    /// After a batch task ended: the batch collected meanwhile starts when it was the last one
    /// running and the batches are eager.
    pub(super) fn batch_ended(&mut self, context: &Arc<Context>, tasks: &mut JoinSet<()>) {
        if self.eager && tasks.is_empty() {
            self.flush(context, tasks);
        }
    }

    /// Spawns the batch collected so far, if any.
    pub(super) fn flush(&mut self, context: &Arc<Context>, tasks: &mut JoinSet<()>) {
        self.deadline = None;
        if !self.deliveries.is_empty() {
            let deliveries = std::mem::take(&mut self.deliveries);
            tasks.spawn(handle(context.clone(), deliveries));
        }
    }

    /// Resolves when the open batch's linger is over; never while no batch is open.
    pub(super) async fn lingered(&self) {
        match self.deadline {
            Some(deadline) => tokio::time::sleep_until(deadline).await,
            None => std::future::pending().await,
        }
    }
}

/// Handles a batch of deliveries to the end: each acked, handed back or dead-lettered.
async fn handle(context: Arc<Context>, deliveries: Vec<Delivery>) {
    let prepared = join_all(
        deliveries
            .into_iter()
            .map(|d| delivery::prepare(&context, d)),
    )
    .await;
    let work: Vec<Work> = prepared.into_iter().flatten().collect();
    if work.is_empty() {
        return;
    }

    let queue = context.queue.name.as_str();
    let ran = {
        let Ok(_permit) = context.permits.acquire().await else {
            return; // never closed
        };
        run(&context, &work).await
        // The permit goes back here, as for a single delivery.
    };
    match ran {
        Ok(outcomes) => {
            let mut acked = Vec::with_capacity(work.len());
            let mut failed = Vec::new();
            for (work, (outcome, took)) in work.into_iter().zip(outcomes) {
                context.counters.duration.record(took);
                match outcome {
                    Ok(processed) => acked.push((work, processed)),
                    Err(e) => failed.push((work, e)),
                }
            }
            // Counted before the acknowledgements, as committed: a connection lost while they
            // are sent ends this task, and the redelivery then counts as a duplicate.
            for (work, processed) in &acked {
                let (id, kind) = (work.envelope.id, work.envelope.kind.as_str());
                let deliveries = work.deliveries;
                if processed.is_duplicate() {
                    tracing::debug!(target: "svcdb_amqp::consumer", %queue, %id, %kind, deliveries, "duplicate; already handled");
                    Counters::bump(&context.counters.duplicates);
                } else {
                    tracing::debug!(target: "svcdb_amqp::consumer", %queue, %id, %kind, deliveries, "handled");
                    Counters::bump(&context.counters.handled);
                }
            }
            let deliveries: Vec<&Delivery> = acked.iter().map(|(w, _)| &w.delivery).collect();
            settle::ack_all(&context, &deliveries).await;
            drop(acked);
            // Each failure by the single-delivery rules, and returned on its own: RabbitMQ does
            // not count a delivery returned by a `multiple` nack.
            join_all(
                failed
                    .into_iter()
                    .map(|(work, e)| delivery::finish(&context, work, Err(e))),
            )
            .await;
        }
        Err(e) if e.is_database_unavailable() => {
            tracing::warn!(target: "svcdb_amqp::consumer", %queue, events = work.len(), error = %e, "database unavailable; handing the batch back and pausing");
            outage::pause_consuming(&context.flow).await;
            join_all(
                work.iter()
                    .map(|w| settle::return_unprocessed(&context, &w.delivery, w.envelope.id)),
            )
            .await;
        }
        Err(e) => {
            // Not the database's availability: a deadlock or serialization failure, a commit
            // refused (a deferred constraint) or a claim that failed. Each delivery on
            // its own finds which one is at fault, and fails only that one.
            tracing::warn!(target: "svcdb_amqp::consumer", %queue, events = work.len(), error = %e, "the batch failed; handling its events one by one");
            join_all(work.into_iter().map(|w| {
                let context = &context;
                async move {
                    let outcome = delivery::process_alone(context, &w).await;
                    delivery::finish(context, w, outcome).await;
                }
            }))
            .await;
        }
    }
}

/// A batch's event, its handler, and its delivery's span.
type Event = (Envelope, Arc<dyn DynHandler>, Span);

/// Runs `work` in one transaction, not retried: each delivery's outcome and how long its handler
/// took, or the error that failed the whole batch (the database unavailable, a
/// failed claim, a retryable error past the retries, a failed commit).
async fn run(context: &Context, work: &[Work]) -> Ran {
    let events: Arc<[Event]> = work
        .iter()
        .map(|w| (w.envelope.clone(), w.handler.clone(), w.span.clone()))
        .collect();
    let deliveries: Vec<Span> = work.iter().map(|w| w.span.clone()).collect();
    let batch_span = crate::spans::batch(&context.queue.name, &context.name, &deliveries);
    let name = context.name.clone();
    // One attempt: a batch that hit a deadlock or a serialization failure collided with
    // another over rows its events lock (a stock counter), and run again whole it would
    // likely collide again, each time after the server's deadlock_timeout (1 s). Its events
    // are handled one by one instead, each with the configured retries.
    let once = TxOptions {
        max_attempts: 1,
        ..context.options.tx.clone()
    };
    // Boxed here, where every lifetime is concrete, for the same reason as delivery::process.
    let run: Pin<Box<dyn Future<Output = Ran> + Send + '_>> =
        Box::pin(context.db.transaction_with(&once, async move |tx| {
            let refs: Vec<EventRef<'_>> = events.iter().map(|(e, ..)| e.into()).collect();
            let first = svcdb::idempotency::claim_batch(tx, &name, &refs).await?;
            let mut outcomes = Vec::with_capacity(events.len());
            for ((envelope, handler, delivery), first) in events.iter().zip(first) {
                let started = Instant::now();
                let outcome = if first {
                    // The handler's span is a child of its own delivery's, so each event
                    // of the batch stays in its producer's trace.
                    let span = delivery.in_scope(|| crate::spans::handler(&name, envelope));
                    one(tx, &name, envelope, handler).instrument(span).await?
                } else {
                    Ok(Processed::Duplicate)
                };
                outcomes.push((outcome, started.elapsed()));
            }
            // A statement that failed unseen (a savepoint, a handler that dropped an error)
            // fails the commit: ServiceDb's transactions check for it as they commit.
            Ok(outcomes)
        }));
    run.instrument(batch_span).await
}

/// Runs the handler of `envelope`, claimed, under a savepoint: the outcome (a failure undone
/// to the savepoint, its claim with it), or `Err` for an error that fails the whole batch.
async fn one(
    tx: &mut Transaction<'_>,
    name: &str,
    envelope: &Envelope,
    handler: &Arc<dyn DynHandler>,
) -> std::result::Result<Outcome, HandlerError> {
    svcdb::idempotency::savepoint_event(tx, envelope.id);
    let handled = AssertUnwindSafe(handler.call(tx, envelope))
        .catch_unwind()
        .await;
    let e = match handled {
        Ok(Ok(())) => return Ok(Ok(Processed::Done(()))),
        Ok(Err(e)) => e,
        Err(panic) => delivery::panicked(panic),
    };
    if e.is_database_unavailable() || e.is_retryable() {
        // The transaction, not this event: the batch is handed back, or run again.
        return Err(e);
    }
    svcdb::idempotency::undo_event(tx, name, envelope.id).await?;
    Ok(Err(e))
}
