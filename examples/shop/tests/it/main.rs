//! The integration tests of `shop`, as one test binary (one link, not one per file), each
//! file a module. They talk to the real PostgreSQL and RabbitMQ (see the README).

mod demo;
mod shutdown;
mod split;
