//! What every delivery task of one channel shares: the pool, the handlers, the policies, the
//! counters, and the channel's unsettled deliveries.

use std::collections::HashMap;
use std::sync::Arc;

use lapin::Channel;
use svcdb::ServiceDb;
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;

use super::outage::Flow;
use super::stats::Counters;
use super::unsettled::Unsettled;
use super::ConsumerOptions;
use crate::handler::DynHandler;
use crate::topology::QueueSpec;

/// What each delivery task needs, shared.
pub(super) struct Context {
    /// The service's pool.
    pub(super) db: ServiceDb,
    /// The claims' scope.
    pub(super) name: String,
    /// Queue name, delivery limit, dead-letter exchange.
    pub(super) queue: QueueSpec,
    /// Handlers by kind.
    pub(super) handlers: HashMap<String, Arc<dyn DynHandler>>,
    /// Confirm-mode channel for dead-letter copies.
    pub(super) dead_letters: Channel,
    /// Pauses and policies.
    pub(super) options: ConsumerOptions,
    /// Bounds handlers running at once to what the pool can serve.
    pub(super) permits: Semaphore,
    /// Cut pauses short at shutdown.
    pub(super) shutdown: CancellationToken,
    /// The consumer's counters.
    pub(super) counters: Arc<Counters>,
    /// Consuming or paused for the database.
    pub(super) flow: watch::Sender<Flow>,
    /// The channel's deliveries not settled yet, for `multiple` acks.
    pub(super) unsettled: Unsettled,
}
