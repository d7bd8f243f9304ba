//! The integration tests of `svcdb-amqp`, as one test binary (one link, not one per file), each
//! file a module. They talk to the real PostgreSQL and RabbitMQ (see the README).

mod common;

mod connect;
mod consumer;
mod consumer_batch;
mod failover;
mod limits;
mod metrics;
mod rabbit_cluster;
mod relay;
mod relay_nacks;
mod relay_wake;
mod retention;
mod secrets;
mod service;
mod traces;
