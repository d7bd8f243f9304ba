//! `svcdb-bench events`: what exactly-once event handling costs, end to end, against the
//! plainest at-least-once pipeline on the same broker and database.
//!
//! * **svcdb**: N events, each stored with [`svcdb::outbox::enqueue`] in a transaction of its
//!   own (`--producers` at once); then the [`Relay`] drains the outbox to RabbitMQ (batches of
//!   100 with publisher confirms); then a [`Consumer`] handles every event inside
//!   `process_once` (the claim plus one `INSERT` into `effects`, one transaction) and acks
//!   after the commit. The stages run one after another, so each has a rate of its own; the
//!   end-to-end rate is N over the time from the first enqueue to the last event handled.
//! * **raw lapin**: the same N envelopes published straight to the broker (batches of 100
//!   with publisher confirms, like the relay), then a plain lapin consumer (same prefetch,
//!   same pool, deliveries handled concurrently) that decodes each, does the same `INSERT` in
//!   a transaction of its own (the driver's, whose `BEGIN` is waited for, as a service without
//!   svcdb writes it) and acks: no outbox, no claim, at least once.
//! * **batched consume**, in `--consume-rounds` rounds: N new envelopes published straight
//!   into a queue of their own, then a [`Consumer`] with batches of `--consume-batch` (the
//!   claims in one statement, each `INSERT` under a savepoint, one commit per batch) and a
//!   prefetch of 128, room for several batches in flight; and N more for raw lapin's consumer
//!   as above, the two consuming in turns first. The target judges the median of the rounds'
//!   ratios. The svcdb consume stage above runs with a transaction per delivery (`batch = 1`).
//! * **duplicates**: N new envelopes, each published twice in a row straight into the svcdb
//!   consumer's queue (so copies of one event are often handled concurrently); the run fails
//!   unless exactly N business effects result.
//!
//! Everything happens in a database of its own (`svcdb_bench_events`, recreated, dropped at
//! the end) and on an exchange and queues with a random suffix (deleted at the end).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use futures_util::StreamExt;
use rand::Rng;
use serde_json::json;
use svcdb::{outbox, Envelope, Ident, Outbox, ServiceDb, Transaction};
use svcdb_amqp::lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions};
use svcdb_amqp::lapin::types::FieldTable;
use svcdb_amqp::lapin::{Channel, Confirmation, Connection};
use svcdb_amqp::topology::{QueueSpec, Topology};
use svcdb_amqp::{
    AmqpConfig, CancellationToken, Consumer, ConsumerOptions, HandlerError, Relay, RelayConfig,
};
use tokio::task::JoinSet;

use crate::pg::Server;
use crate::report::{self, Bound, Figures, Target};

/// The benchmark's own database, recreated at start and dropped at the end.
const DATABASE: &str = "svcdb_bench_events";

/// The event kind every envelope carries.
const KIND: &str = "BenchEventHappened";

/// The consumer name: the idempotency scope of the claims.
const CONSUMER: &str = "svcdb-bench.events";

/// Messages per publisher-confirm batch, for the relay and for raw publishing alike.
const BATCH: usize = 100;

/// Unacknowledged deliveries per consumer, svcdb's and raw; the pool has as many connections.
const PREFETCH: u16 = 32;

/// Unacknowledged deliveries of svcdb's batched consumers (the batched stage, the pipelined
/// rounds and the paced latencies): svcdb's default, room for 8 batches of the default 16 in
/// flight (a batch holds its deliveries for its whole transaction, so at the prefetch of the
/// others, 32, only two batches would be). The pool is the same: 32 connections.
const BATCH_PREFETCH: u16 = svcdb_amqp::DEFAULT_PREFETCH;

/// Longest wait for any one stage; a stage that takes longer is a broken run.
const STAGE_TIMEOUT: Duration = Duration::from_secs(120);

/// Options of `svcdb-bench events`.
#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    /// Print every figure as one JSON object on the last line.
    #[arg(long)]
    json: bool,

    /// Events per path (svcdb, raw lapin, and the duplicates check).
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    events: u32,

    /// Concurrent producers enqueueing (each event in a transaction of its own).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=64))]
    producers: u16,

    /// Events per second of the paced load the latencies are measured at.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    paced_rate: u32,

    /// Rounds of the pipelined throughput, svcdb and raw lapin back to back in each (in turns
    /// first: the second of a round finds the pool grown by the first); the target judges the
    /// median of the rounds' ratios. Even, so that each path goes first as often.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=20))]
    pipelined_rounds: u32,

    /// Seconds the paced load is measured, per path (after one more second of warm-up).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=600))]
    paced_seconds: u32,

    /// Windows each path's paced seconds are split into, the two paths taking turns (each
    /// first in every other round) under one unbroken paced load, so that a stall of the
    /// machine is as likely to land on either. The percentiles pool each path's windows; the
    /// target judges the median of the rounds' p99 ratios, which one stall cannot decide.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=60))]
    latency_rounds: u32,

    /// Rounds of the publishing comparison after the stages: each round enqueues `--events`
    /// new events, then the relay drains them and raw lapin publishes as many, in turns first;
    /// the relay target judges the median of the rounds' ratios (one drain against one
    /// publish, a fraction of a second each, swung from 0.5× to 1.5× between runs).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=20))]
    publish_rounds: u32,

    /// Rounds of the consuming comparison: each round publishes `--events` new events for
    /// raw lapin's consumer and as many for the batched svcdb consumer, which consume them in
    /// turns first; the batched target judges the median of the rounds' ratios (one consume
    /// against one, a second or two each, gave 1.28× and 1.48× in two runs an hour apart).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    consume_rounds: u32,

    /// The broker: `amqp://user:password@host:port/vhost`.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = svcdb_amqp::DEFAULT_URL,
        hide_env_values = true
    )]
    amqp_url: String,

    /// Deliveries per transaction of the batched consumer (at most 32, a quarter of its
    /// prefetch).
    #[arg(long, default_value_t = svcdb_amqp::DEFAULT_BATCH, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=32))]
    consume_batch: usize,
}

/// The exchange and queues of one run, unique to it.
struct Names {
    exchange: String,
    svcdb_queue: QueueSpec,
    raw_queue: QueueSpec,
    batch_queue: QueueSpec,
    /// Where the publishing rounds' messages go (both paths), purged after each round.
    rounds_queue: QueueSpec,
}

impl Names {
    fn new() -> Self {
        let suffix: u64 = rand::rng().random();
        let base = format!("svcdb-bench.{suffix:016x}");
        let exchange = format!("{base}.events");
        Self {
            svcdb_queue: QueueSpec::new(format!("{base}.svcdb")).bind(&exchange, "svcdb.#"),
            raw_queue: QueueSpec::new(format!("{base}.raw")).bind(&exchange, "raw.#"),
            batch_queue: QueueSpec::new(format!("{base}.batch")).bind(&exchange, "batch.#"),
            rounds_queue: QueueSpec::new(format!("{base}.rounds")).bind(&exchange, "rounds.#"),
            exchange,
        }
    }

    fn topology(&self) -> Topology {
        Topology::new()
            .exchange(&self.exchange)
            .queue(self.svcdb_queue.clone())
            .queue(self.raw_queue.clone())
            .queue(self.batch_queue.clone())
            .queue(self.rounds_queue.clone())
    }
}

/// Everything measured in one run.
struct Results {
    machine: report::Machine,
    events: u64,
    producers: u16,
    enqueue: Duration,
    relay: Duration,
    svcdb_consume: Duration,
    svcdb_end_to_end: Duration,
    raw_publish: Duration,
    /// The publishing rounds: each round's relay drain and raw publish, events/s.
    relay_rounds: Vec<f64>,
    raw_publish_rounds: Vec<f64>,
    raw_consume: Duration,
    raw_end_to_end: Duration,
    consume_batch: usize,
    /// The consuming rounds: each round's batched svcdb consume and raw lapin consume,
    /// events/s.
    batch_rounds: Vec<f64>,
    raw_consume_rounds: Vec<f64>,
    dup_deliveries: u64,
    dup_handled: u64,
    dup_duplicates: u64,
    dup_effects: i64,
    dup_elapsed: Duration,
    /// Failed attempts the svcdb consumer requeued over the whole run (0 in a healthy run).
    requeued: u64,
    /// Every stage at once, and latencies under a paced load.
    concurrent: Concurrent,
}

/// What [`measure_concurrent`] measured.
struct Concurrent {
    /// Steady-state events/s with producers, relay and consumer running at once, per round.
    svcdb_pipelined: Vec<f64>,
    /// The same for raw lapin: producers publishing with confirms, a raw consumer.
    raw_pipelined: Vec<f64>,
    /// Paced events per second and seconds, for both latency measurements.
    paced_rate: u32,
    paced_seconds: u32,
    /// From the producer's commit to the end of the handler's write, all windows pooled.
    svcdb_latency: report::LatencySummary,
    /// From the raw publish to the end of the raw handler's write, all windows pooled.
    raw_latency: report::LatencySummary,
    /// Each window's p99, in milliseconds, in the order the windows ran.
    svcdb_latency_p99_rounds: Vec<f64>,
    raw_latency_p99_rounds: Vec<f64>,
}

/// Events per second.
fn rate(events: u64, elapsed: Duration) -> f64 {
    events as f64 / elapsed.as_secs_f64().max(1e-9)
}

pub async fn run(server: &Server, args: &EventsArgs) -> Result<()> {
    let machine = report::Machine::now(server.version());
    let amqp = AmqpConfig::new(&args.amqp_url)
        .with_connection_name("svcdb-bench events")
        .with_prefetch(PREFETCH);
    let connection = amqp
        .connect()
        .await
        .context("cannot reach RabbitMQ (start it with scripts/services, or set --amqp-url)")?;
    let names = Names::new();
    let topology = names.topology();

    server.recreate_database(DATABASE).await?;
    let outcome = async {
        topology.declare(&connection).await?;
        measure(server, args, &amqp, connection, &names, machine).await
    }
    .await;

    // Clean up whatever happened; a clean-up failure is reported, but the run's own error
    // (if any) is the one returned.
    let cleanup = async {
        let connection = amqp.connect().await?;
        let deleted = topology.delete(&connection).await;
        let _ = connection.close(200, "OK".into()).await;
        deleted?;
        server.drop_database(DATABASE).await?;
        anyhow::Ok(())
    }
    .await;
    let results = outcome?;
    cleanup.context("cleaning up the benchmark's queues and database")?;

    let targets = targets(&results);
    let text = format!(
        "{}\n\n{}",
        human_report(&results),
        concurrent_report(&results.concurrent, results.producers)
    );
    let mut figures = figures(&results);
    figures.set_targets(&targets);
    report::print(&text, &figures, &targets, args.json);
    Ok(())
}

async fn measure(
    server: &Server,
    args: &EventsArgs,
    amqp: &AmqpConfig,
    connection: Connection,
    names: &Names,
    machine: report::Machine,
) -> Result<Results> {
    let n = u64::from(args.events);
    let mut config =
        svcdb::Config::with_connection(server.database(DATABASE), Ident::new("schema", "public")?);
    config.pool_min = usize::from(PREFETCH);
    config.pool_max = usize::from(PREFETCH);
    config.application_name = Some("svcdb-bench/events".into());
    let db = ServiceDb::connect(config).await?;
    db.install_idempotency().await?;
    db.install_outbox().await?;
    // One row per business effect, deliberately without a unique key: a handler that ran
    // twice for one event shows as two rows.
    db.get()
        .await?
        .batch_execute(
            "CREATE TABLE effects (n bigserial PRIMARY KEY, event_id uuid NOT NULL, phase text NOT NULL)",
        )
        .await?;
    let connection = Arc::new(connection);

    let consumer = Consumer::new(amqp, db.clone(), &names.svcdb_queue, CONSUMER)
        .with_options(ConsumerOptions {
            batch: 1,
            ..ConsumerOptions::default()
        })
        .on(KIND, |tx, event| Box::pin(business_write(tx, event)));

    // 1. svcdb: enqueue, relay, consume, one stage after another.
    let envelopes: Vec<Envelope> = (0..n).map(|i| envelope("svcdb", i)).collect();
    server.checkpoint().await;
    eprintln!(
        "svcdb: enqueueing {n} events, {} producers…",
        args.producers
    );
    let started = Instant::now();
    enqueue_all(
        &db,
        &names.exchange,
        "svcdb.bench",
        &envelopes,
        args.producers,
    )
    .await?;
    let enqueue = started.elapsed();

    eprintln!("svcdb: relaying…");
    let relay_elapsed = relay_drain(amqp, &db, n).await?;

    eprintln!("svcdb: consuming…");
    let consume_started = Instant::now();
    let consumer_stop = CancellationToken::new();
    let consumer_task = tokio::spawn({
        let consumer = consumer.clone();
        let stop = consumer_stop.clone();
        let connection = connection.clone();
        async move { consumer.run_on(&connection, &stop).await }
    });
    let consumed = wait_until(|| consumer.stats().handled >= n).await;
    let svcdb_done = Instant::now();
    let (svcdb_consume, svcdb_end_to_end) = (svcdb_done - consume_started, svcdb_done - started);
    if !consumed {
        consumer_stop.cancel();
        let _ = consumer_task.await;
        bail!(
            "the svcdb consumer handled {} of {n} events in {STAGE_TIMEOUT:?}: {:?}",
            consumer.stats().handled,
            consumer.stats()
        );
    }

    // 2. Raw lapin: publish the same envelopes with confirms, then consume and ack each after
    // the same write in a transaction of its own.
    server.checkpoint().await;
    eprintln!("raw lapin: publishing {n} events…");
    let channel = svcdb_amqp::publish::confirm_channel(&connection).await?;
    let started = Instant::now();
    let copies: Vec<&Envelope> = envelopes.iter().collect();
    publish_all(&channel, &names.exchange, "raw.bench", &copies).await?;
    let raw_publish = started.elapsed();
    eprintln!("raw lapin: consuming…");
    let raw_done = raw_consume(&connection, &db, &names.raw_queue.name, n).await?;
    let (raw_consume, raw_end_to_end) = (raw_done - started - raw_publish, raw_done - started);

    // 2a. Publishing in rounds: the relay draining new rows and raw lapin publishing as many,
    // in turns, into a queue nobody consumes.
    let (relay_rounds, raw_publish_rounds) =
        publish_rounds(server, args, amqp, &db, &channel, names).await?;

    // 2b. The batched svcdb consumer against raw lapin's, in rounds.
    let (batch_rounds, raw_consume_rounds) =
        consume_rounds(server, args, amqp, &db, &channel, &connection, names).await?;

    // 3. Duplicates: every new envelope twice, into the svcdb consumer's queue.
    server.checkpoint().await;
    eprintln!("duplicates: publishing {n} events twice into the svcdb queue…");
    let before = consumer.stats();
    let dups: Vec<Envelope> = (0..n).map(|i| envelope("dup", i)).collect();
    let twice: Vec<&Envelope> = dups.iter().flat_map(|e| [e, e]).collect();
    let started = Instant::now();
    publish_all(&channel, &names.exchange, "svcdb.dup", &twice).await?;
    let delivered = wait_until(|| {
        let s = consumer.stats();
        (s.handled + s.duplicates) - (before.handled + before.duplicates) >= 2 * n
    })
    .await;
    let dup_elapsed = started.elapsed();
    let _ = channel.close(200, "OK".into()).await;
    consumer_stop.cancel();
    consumer_task.await??;
    let after = consumer.stats();
    ensure!(
        delivered,
        "the svcdb consumer settled {} of {} duplicate deliveries in {STAGE_TIMEOUT:?}: {after:?}",
        (after.handled + after.duplicates) - (before.handled + before.duplicates),
        2 * n
    );

    // 4. Everything at once, and latencies under a paced load.
    let concurrent = measure_concurrent(server, args, amqp, &connection, &db, names).await?;

    let counts = db
        .get()
        .await?
        .query(
            "SELECT phase, count(*), count(DISTINCT event_id) FROM effects GROUP BY phase",
            &[],
        )
        .await?;
    let count = |phase: &str| -> (i64, i64) {
        counts
            .iter()
            .find(|r| r.get::<_, &str>(0) == phase)
            .map_or((0, 0), |r| (r.get(1), r.get(2)))
    };
    for phase in [
        "svcdb",
        "raw",
        "batch",
        "raw-rounds",
        "dup",
        "pipelined",
        "raw-pipelined",
    ] {
        // The stages in rounds run once per round, each time with new events.
        let runs = match phase {
            "pipelined" | "raw-pipelined" => u64::from(args.pipelined_rounds),
            "batch" | "raw-rounds" => u64::from(args.consume_rounds),
            _ => 1,
        };
        let expected = i64::try_from(n * runs)?;
        let (rows, distinct) = count(phase);
        if rows != expected || distinct != expected {
            bail!(
                "correctness check failed: {phase} events have {rows} business effects \
                 ({distinct} distinct events); expected exactly {expected}"
            );
        }
    }
    db.close();
    if let Ok(connection) = Arc::try_unwrap(connection) {
        let _ = connection.close(200, "OK".into()).await;
    }

    Ok(Results {
        machine,
        events: n,
        producers: args.producers,
        enqueue,
        relay: relay_elapsed,
        svcdb_consume,
        svcdb_end_to_end,
        raw_publish,
        relay_rounds,
        raw_publish_rounds,
        raw_consume,
        raw_end_to_end,
        consume_batch: args.consume_batch,
        batch_rounds,
        raw_consume_rounds,
        dup_deliveries: 2 * n,
        dup_handled: after.handled - before.handled,
        dup_duplicates: after.duplicates - before.duplicates,
        dup_effects: count("dup").0,
        requeued: after.requeued,
        dup_elapsed,
        concurrent,
    })
}

/// Event `seq` of `phase`; the phase is in the payload, for the business write.
fn envelope(phase: &str, seq: u64) -> Envelope {
    Envelope::new(KIND, "svcdb-bench", json!({ "phase": phase, "seq": seq }))
}

/// The business effect of one event, the same on every path.
const EFFECT_SQL: &str = "INSERT INTO effects (event_id, phase) VALUES ($1, $2)";

/// The svcdb handler: the business write, inside the consumer's `process_once` transaction.
async fn business_write(tx: &mut Transaction<'_>, event: &Envelope) -> Result<(), HandlerError> {
    let phase = event.payload["phase"].as_str().unwrap_or("unknown");
    tx.execute(EFFECT_SQL, &[&event.id, &phase]).await?;
    Ok(())
}

/// A new relay draining `n` rows from the outbox, timed from its connection (as raw
/// publishing is timed on an open channel: the drain, not connecting). The relay starts its
/// first batch as it reports the connection, so the clock may start up to a scheduling delay
/// late.
async fn relay_drain(amqp: &AmqpConfig, db: &ServiceDb, n: u64) -> Result<Duration> {
    let relay = Relay::new(amqp, Outbox::new(db.clone())).with_config(RelayConfig {
        batch_size: BATCH,
        ..RelayConfig::default()
    });
    let mut status = relay.status();
    let relay_stop = CancellationToken::new();
    let relay_task = tokio::spawn({
        let stop = relay_stop.clone();
        async move { relay.run(stop).await }
    });
    let connected = tokio::time::timeout(STAGE_TIMEOUT, status.wait_for(|s| s.connected))
        .await
        .is_ok_and(|r| r.is_ok());
    let relay_started = Instant::now();
    // Only whether it happened: the `Ref` that `wait_for` returns holds the watch's lock,
    // and the relay (updating its status) would block on it.
    let waited = connected
        && tokio::time::timeout(STAGE_TIMEOUT, status.wait_for(|s| s.published >= n))
            .await
            .is_ok_and(|r| r.is_ok());
    let relay_elapsed = relay_started.elapsed();
    relay_stop.cancel();
    let last = relay_task.await??;
    ensure!(
        waited,
        "the relay published {} of {n} events in {STAGE_TIMEOUT:?} (last error: {:?})",
        last.published,
        last.last_error
    );
    ensure!(
        last.published == n,
        "the relay published {} events, expected {n}",
        last.published
    );
    Ok(relay_elapsed)
}

/// `--publish-rounds` rounds of the relay draining `--events` new rows against raw lapin
/// publishing as many envelopes, the two in turns (each first in every other round), into
/// the rounds' queue, purged after each round. Returns each round's rates, relay's and raw
/// lapin's.
async fn publish_rounds(
    server: &Server,
    args: &EventsArgs,
    amqp: &AmqpConfig,
    db: &ServiceDb,
    channel: &Channel,
    names: &Names,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let n = u64::from(args.events);
    let (mut relay_rates, mut raw_rates) = (Vec::new(), Vec::new());
    for round in 0..args.publish_rounds {
        let envelopes: Vec<Envelope> = (0..n).map(|i| envelope("rounds", i)).collect();
        enqueue_all(
            db,
            &names.exchange,
            "rounds.relay",
            &envelopes,
            args.producers,
        )
        .await?;
        eprintln!(
            "round {}/{}: relay drain and raw lapin publish, {n} events each…",
            round + 1,
            args.publish_rounds
        );
        let copies: Vec<&Envelope> = envelopes.iter().collect();
        // Each path publishes into an empty queue: one holding the other path's 5 000
        // persistent messages took publishes about a third slower (measured: raw lapin at
        // 14 700/s after the relay, 22 000–25 400/s before it, in the same run).
        let purge = || async {
            channel
                .queue_purge(
                    names.rounds_queue.name.as_str().into(),
                    svcdb_amqp::lapin::options::QueuePurgeOptions::default(),
                )
                .await
        };
        let raw = async {
            let started = Instant::now();
            publish_all(channel, &names.exchange, "rounds.raw", &copies).await?;
            anyhow::Ok(started.elapsed())
        };
        // And neither path pays for what the one before it left to clean up: the outbox's
        // 5 000 inserted, then updated, rows are vacuumed (autovacuum would otherwise start on
        // them during the next path) and the dirty buffers written, before each path.
        let settle = || async {
            purge().await?;
            db.get().await?.batch_execute("VACUUM svcdb_outbox").await?;
            server.checkpoint().await;
            anyhow::Ok(())
        };
        settle().await?;
        let (relay, raw) = if round % 2 == 0 {
            let relay = relay_drain(amqp, db, n).await?;
            settle().await?;
            (relay, raw.await?)
        } else {
            let raw = raw.await?;
            settle().await?;
            (relay_drain(amqp, db, n).await?, raw)
        };
        relay_rates.push(rate(n, relay));
        raw_rates.push(rate(n, raw));
    }
    Ok((relay_rates, raw_rates))
}

/// The consuming comparison: `--consume-rounds` rounds, each publishing `--events` new
/// events for the batched svcdb consumer and as many for raw lapin's consumer (one
/// transaction per message), then timing each consumer on its queue, in turns first. Each
/// round's rates, events/s: (batched, raw).
async fn consume_rounds(
    server: &Server,
    args: &EventsArgs,
    amqp: &AmqpConfig,
    db: &ServiceDb,
    channel: &Channel,
    connection: &Arc<Connection>,
    names: &Names,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let n = u64::from(args.events);
    let (mut batched_rates, mut raw_rates) = (Vec::new(), Vec::new());
    for round in 0..args.consume_rounds {
        eprintln!(
            "round {}/{}: svcdb batched consumer (batches of {}) and raw lapin consumer, {n} events each…",
            round + 1,
            args.consume_rounds,
            args.consume_batch
        );
        for (phase, routing_key) in [("batch", "batch.bench"), ("raw-rounds", "raw.bench")] {
            let envelopes: Vec<Envelope> = (0..n).map(|i| envelope(phase, i)).collect();
            let copies: Vec<&Envelope> = envelopes.iter().collect();
            publish_all(channel, &names.exchange, routing_key, &copies).await?;
        }
        let batched = async {
            server.checkpoint().await;
            batch_consume(
                db,
                amqp,
                connection,
                &names.batch_queue,
                n,
                args.consume_batch,
            )
            .await
        };
        let raw = async {
            server.checkpoint().await;
            let started = Instant::now();
            raw_consume_as(connection, db, &names.raw_queue.name, n, "raw-rounds", None).await?;
            anyhow::Ok(started.elapsed())
        };
        let (batched, raw) = if round % 2 == 0 {
            let batched = batched.await?;
            (batched, raw.await?)
        } else {
            let raw = raw.await?;
            (batched.await?, raw)
        };
        batched_rates.push(rate(n, batched));
        raw_rates.push(rate(n, raw));
    }
    Ok((batched_rates, raw_rates))
}

/// Enqueues every envelope in a transaction of its own, `producers` at a time, for
/// `routing_key`.
async fn enqueue_all(
    db: &ServiceDb,
    exchange: &str,
    routing_key: &str,
    envelopes: &[Envelope],
    producers: u16,
) -> Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let envelopes = Arc::new(envelopes.to_vec());
    let mut tasks = JoinSet::new();
    for _ in 0..producers {
        let (db, next, envelopes) = (db.clone(), next.clone(), envelopes.clone());
        let (exchange, routing_key) = (exchange.to_owned(), routing_key.to_owned());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(envelope) = usize::try_from(i).ok().and_then(|i| envelopes.get(i)) else {
                    return anyhow::Ok(());
                };
                db.transaction(async |tx| {
                    outbox::enqueue(tx, &exchange, &routing_key, envelope).await
                })
                .await?;
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined??;
    }
    Ok(())
}

/// Publishes `envelopes` (mandatory, persistent, svcdb's message properties) in batches of
/// [`BATCH`], waiting for each batch's confirms before the next, as the relay does.
async fn publish_all(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    envelopes: &[&Envelope],
) -> Result<()> {
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    for batch in envelopes.chunks(BATCH) {
        let mut confirms = Vec::with_capacity(batch.len());
        for envelope in batch {
            confirms.push(
                channel
                    .basic_publish(
                        exchange.into(),
                        routing_key.into(),
                        options,
                        &envelope.to_json_bytes(),
                        svcdb_amqp::publish::envelope_properties(envelope),
                    )
                    .await?,
            );
        }
        for confirm in confirms {
            match confirm.await? {
                Confirmation::Ack(None) => {}
                other => bail!("the broker did not take a message: {other:?}"),
            }
        }
    }
    Ok(())
}

/// Consumes `n` messages from `queue`: each decoded, written in a transaction of its own
/// (no claim) and acked after the commit, up to [`PREFETCH`] at once. Returns when the last
/// was acked.
async fn raw_consume(
    connection: &Connection,
    db: &ServiceDb,
    queue: &str,
    n: u64,
) -> Result<Instant> {
    raw_consume_as(connection, db, queue, n, "raw", None).await
}

/// [`raw_consume`], writing the effects as `phase` and noting in `timeline` when each
/// event's write was done (before its commit, as for the svcdb handler).
async fn raw_consume_as(
    connection: &Connection,
    db: &ServiceDb,
    queue: &str,
    n: u64,
    phase: &'static str,
    timeline: Option<Arc<Timeline>>,
) -> Result<Instant> {
    let channel = connection.create_channel().await?;
    channel.basic_qos(PREFETCH, Default::default()).await?;
    let mut deliveries = channel
        .basic_consume(
            queue.into(),
            "svcdb-bench.raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut tasks = JoinSet::new();
    let mut received = 0;
    let mut acked = 0;
    let deadline = tokio::time::Instant::now() + STAGE_TIMEOUT;
    while acked < n {
        tokio::select! {
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                joined??;
                acked += 1;
            }
            next = deliveries.next(), if received < n => {
                let delivery = next.context("the broker cancelled the raw consumer")??;
                received += 1;
                let (db, timeline) = (db.clone(), timeline.clone());
                tasks.spawn(async move {
                    let event = Envelope::from_slice(&delivery.data)?;
                    // The same envelopes as the svcdb path (payload phase "svcdb"): the
                    // effects are told apart by the path that wrote them. The driver's own
                    // transaction, as a service without svcdb writes it (its `BEGIN` waited
                    // for), on a connection of the same pool.
                    let mut conn = db.get().await?;
                    let tx = conn.transaction().await?;
                    tx.execute(EFFECT_SQL, &[&event.id, &phase]).await?;
                    if let Some(timeline) = &timeline {
                        timeline.handled(&event);
                    }
                    tx.commit().await?;
                    delivery.ack(BasicAckOptions::default()).await?;
                    anyhow::Ok(())
                });
            }
            () = tokio::time::sleep_until(deadline) => {
                bail!("the raw consumer acked {acked} of {n} events in {STAGE_TIMEOUT:?}");
            }
        }
    }
    let done = Instant::now();
    let _ = channel.close(200, "OK".into()).await;
    Ok(done)
}

/// Consumes the `n` events in `queue` with a batched svcdb consumer (`batch` deliveries per
/// transaction) and returns how long it took to handle them all.
async fn batch_consume(
    db: &ServiceDb,
    amqp: &AmqpConfig,
    connection: &Arc<Connection>,
    queue: &QueueSpec,
    n: u64,
    batch: usize,
) -> Result<Duration> {
    let amqp = &amqp.clone().with_prefetch(BATCH_PREFETCH);
    let consumer = Consumer::new(amqp, db.clone(), queue, CONSUMER)
        .with_options(ConsumerOptions {
            batch,
            ..ConsumerOptions::default()
        })
        .on(KIND, |tx, event| Box::pin(business_write(tx, event)));
    let started = Instant::now();
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let (consumer, stop, connection) = (consumer.clone(), stop.clone(), connection.clone());
        async move { consumer.run_on(&connection, &stop).await }
    });
    let consumed = wait_until(|| consumer.stats().handled >= n).await;
    let elapsed = started.elapsed();
    stop.cancel();
    task.await??;
    ensure!(
        consumed,
        "the batched svcdb consumer handled {} of {n} events in {STAGE_TIMEOUT:?}: {:?}",
        consumer.stats().handled,
        consumer.stats()
    );
    Ok(elapsed)
}

/// Producers, relay and consumer at once, for svcdb and for raw lapin: the steady-state
/// throughput, then the latency from the producer's commit (raw: its publish) to the end of
/// the handler's write, at a paced load.
async fn measure_concurrent(
    server: &Server,
    args: &EventsArgs,
    amqp: &AmqpConfig,
    connection: &Arc<Connection>,
    db: &ServiceDb,
    names: &Names,
) -> Result<Concurrent> {
    let n = u64::from(args.events);
    let channel = svcdb_amqp::publish::confirm_channel(connection).await?;
    let (mut svcdb_pipelined, mut raw_pipelined) = (Vec::new(), Vec::new());
    for round in 1..=args.pipelined_rounds {
        // Back to back, each path first in every other round, so that each round's ratio
        // compares the two under one load.
        for svcdb_turn in [round % 2 == 1, round % 2 == 0] {
            server.checkpoint().await;
            if svcdb_turn {
                eprintln!(
                    "round {round}/{}: svcdb, pipelined: {n} events, {} producers, relay and consumer at once…",
                    args.pipelined_rounds, args.producers
                );
                svcdb_pipelined
                    .push(svcdb_pipelined_rate(args, amqp, connection, db, names).await?);
            } else {
                eprintln!(
                    "round {round}/{}: raw lapin, pipelined: {n} events, {} producers publishing with confirms and a consumer at once…",
                    args.pipelined_rounds, args.producers
                );
                raw_pipelined
                    .push(raw_pipelined_rate(args, &channel, connection, db, names).await?);
            }
        }
    }

    server.checkpoint().await;
    let paced = paced_latencies(args, amqp, connection, db, names, &channel).await?;
    let _ = channel.close(200, "OK".into()).await;

    Ok(Concurrent {
        svcdb_pipelined,
        raw_pipelined,
        paced_rate: args.paced_rate,
        paced_seconds: args.paced_seconds,
        svcdb_latency: paced.svcdb.summary,
        raw_latency: paced.raw.summary,
        svcdb_latency_p99_rounds: paced.svcdb.p99_rounds,
        raw_latency_p99_rounds: paced.raw.p99_rounds,
    })
}

/// One path's latencies at the paced load: pooled over its windows, and each window's p99.
struct PacedPath {
    summary: report::LatencySummary,
    p99_rounds: Vec<f64>,
}

/// Both paths' latencies at the paced load.
struct Paced {
    svcdb: PacedPath,
    raw: PacedPath,
}

/// The paced load, `--paced-rate` events a second without a break, handed to svcdb and to
/// raw lapin in turns: `--latency-rounds` rounds of one window per path, each path first in
/// every other round, each path's windows adding up to `--paced-seconds`. svcdb's relay and
/// consumer and raw lapin's consumer run throughout, idle in the other path's windows.
/// Measured one path after the other, a stall of the whole machine (seen lasting 30-60 ms,
/// delaying 20-30 consecutive events) decided which path's p99 it inflated; in turns, both
/// meet the machine's stalls alike. Each path's first window starts with one more second,
/// left out: its pool grows to its working size then (each new connection a server process
/// to start; events queued behind that had a 30-200 ms tail in some runs), which a running
/// service's pool already has.
async fn paced_latencies(
    args: &EventsArgs,
    amqp: &AmqpConfig,
    connection: &Arc<Connection>,
    db: &ServiceDb,
    names: &Names,
    channel: &Channel,
) -> Result<Paced> {
    let rounds = u64::from(args.latency_rounds);
    let warmup = u64::from(args.paced_rate);
    let window = (u64::from(args.paced_rate) * u64::from(args.paced_seconds)).div_ceil(rounds);
    let per_path = warmup + window * rounds;
    eprintln!(
        "latency: {} events/s, {} s per path in {rounds} windows each, svcdb and raw lapin in turns…",
        args.paced_rate, args.paced_seconds
    );
    let svcdb_timeline = Arc::new(Timeline::new(per_path));
    let raw_timeline = Arc::new(Timeline::new(per_path));
    let pipeline = SvcdbPipeline::start(amqp, db, names, connection, &svcdb_timeline).await?;
    // Each path's windows, as ranges of its events' seqs (the first window after the warm-up).
    let windows: Vec<std::ops::Range<u64>> = (0..rounds)
        .map(|k| warmup + k * window..warmup + (k + 1) * window)
        .collect();
    let producing = async {
        let mut producers: JoinSet<Result<()>> = JoinSet::new();
        let mut tick = pacer(args.paced_rate);
        let mut next = [0u64; 2];
        for round in 0..rounds {
            let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for path in order {
                let until = windows[usize::try_from(round)?].end;
                while next[path] < until {
                    tick.tick().await;
                    let seq = next[path];
                    next[path] += 1;
                    let exchange = names.exchange.clone();
                    if path == 0 {
                        let (db, timeline) = (db.clone(), svcdb_timeline.clone());
                        producers.spawn(async move {
                            let event = envelope("latency", seq);
                            db.transaction(async |tx| {
                                outbox::enqueue(tx, &exchange, "svcdb.latency", &event).await
                            })
                            .await?;
                            timeline.produced(seq);
                            Ok(())
                        });
                    } else {
                        let (channel, timeline) = (channel.clone(), raw_timeline.clone());
                        producers.spawn(async move {
                            let event = envelope("raw-latency", seq);
                            timeline.produced(seq);
                            publish_confirmed(&channel, &exchange, "raw.latency", &event).await
                        });
                    }
                }
            }
        }
        while let Some(joined) = producers.join_next().await {
            joined??;
        }
        let handled = wait_until(|| svcdb_timeline.handled_count() >= per_path).await;
        ensure!(
            handled,
            "the svcdb path handled {} of {per_path} paced events in {STAGE_TIMEOUT:?}",
            svcdb_timeline.handled_count()
        );
        Ok(())
    };
    let (consumed, produced) = tokio::join!(
        raw_consume_as(
            connection,
            db,
            &names.raw_queue.name,
            per_path,
            "raw-latency",
            Some(raw_timeline.clone())
        ),
        producing,
    );
    let stopped = pipeline.stop().await;
    consumed?;
    produced?;
    stopped?;
    let path = |timeline: &Timeline| PacedPath {
        summary: timeline.latencies(warmup..per_path).summary(),
        p99_rounds: windows
            .iter()
            .map(|w| timeline.latencies(w.clone()).summary().p99_ms)
            .collect(),
    };
    Ok(Paced {
        svcdb: path(&svcdb_timeline),
        raw: path(&raw_timeline),
    })
}

/// One round of the svcdb path with every stage at once: `--events` events enqueued by
/// `--producers` producers, each in a business transaction of its own, while the relay and the
/// consumer run; the steady-state rate at which their handlers wrote.
async fn svcdb_pipelined_rate(
    args: &EventsArgs,
    amqp: &AmqpConfig,
    connection: &Arc<Connection>,
    db: &ServiceDb,
    names: &Names,
) -> Result<f64> {
    let n = u64::from(args.events);
    let timeline = Arc::new(Timeline::new(n));
    let pipeline = SvcdbPipeline::start(amqp, db, names, connection, &timeline).await?;
    let envelopes: Vec<Envelope> = (0..n).map(|i| envelope("pipelined", i)).collect();
    enqueue_all(
        db,
        &names.exchange,
        "svcdb.bench",
        &envelopes,
        args.producers,
    )
    .await?;
    let handled = wait_until(|| timeline.handled_count() >= n).await;
    pipeline.stop().await?;
    ensure!(
        handled,
        "the pipelined svcdb path handled {} of {n} events in {STAGE_TIMEOUT:?}",
        timeline.handled_count()
    );
    Ok(timeline.steady_rate())
}

/// One round of raw lapin with every stage at once: `--producers` producers publishing with
/// confirms on `channel` while a raw consumer writes each in a transaction of its own; the
/// steady-state rate of those writes.
async fn raw_pipelined_rate(
    args: &EventsArgs,
    channel: &Channel,
    connection: &Arc<Connection>,
    db: &ServiceDb,
    names: &Names,
) -> Result<f64> {
    let n = u64::from(args.events);
    let timeline = Arc::new(Timeline::new(n));
    let envelopes: Arc<Vec<Envelope>> =
        Arc::new((0..n).map(|i| envelope("raw-pipelined", i)).collect());
    let (consumed, published) = tokio::join!(
        raw_consume_as(
            connection,
            db,
            &names.raw_queue.name,
            n,
            "raw-pipelined",
            Some(timeline.clone())
        ),
        publish_each(channel, &names.exchange, &envelopes, args.producers),
    );
    consumed?;
    published?;
    Ok(timeline.steady_rate())
}

impl Concurrent {
    /// The median of the rounds.
    fn svcdb_pipelined_per_s(&self) -> f64 {
        report::median_f64(&self.svcdb_pipelined)
    }

    /// The median of the rounds.
    fn raw_pipelined_per_s(&self) -> f64 {
        report::median_f64(&self.raw_pipelined)
    }

    /// Each round's svcdb / raw lapin.
    fn pipelined_ratios(&self) -> Vec<f64> {
        report::paired_ratios(&self.svcdb_pipelined, &self.raw_pipelined)
    }

    /// The median of the rounds' ratios (each round's two sides ran back to back).
    fn svcdb_vs_raw_pipelined(&self) -> Option<f64> {
        report::paired_median(&self.svcdb_pipelined, &self.raw_pipelined)
    }
}

/// Ticks `rate` times a second; late ticks are caught up at once, so the load stays `rate`
/// on average even when a tick is delayed.
fn pacer(rate: u32) -> tokio::time::Interval {
    tokio::time::interval(Duration::from_secs(1) / rate)
}

/// A relay and a svcdb consumer (batches of the default size, at svcdb's default prefetch)
/// whose handler notes each event in a [`Timeline`], running.
struct SvcdbPipeline {
    stop: CancellationToken,
    relay: tokio::task::JoinHandle<svcdb_amqp::Result<svcdb_amqp::RelayStatus>>,
    consumer: tokio::task::JoinHandle<svcdb_amqp::Result<()>>,
}

impl SvcdbPipeline {
    /// Starts both and returns once the relay is connected and listening, so the first events
    /// do not wait for it.
    async fn start(
        amqp: &AmqpConfig,
        db: &ServiceDb,
        names: &Names,
        connection: &Arc<Connection>,
        timeline: &Arc<Timeline>,
    ) -> Result<Self> {
        let stop = CancellationToken::new();
        let relay = Relay::new(amqp, Outbox::new(db.clone())).with_config(RelayConfig {
            batch_size: BATCH,
            ..RelayConfig::default()
        });
        let mut status = relay.status();
        let relay = tokio::spawn({
            let stop = stop.clone();
            async move { relay.run(stop).await }
        });
        let timeline = timeline.clone();
        let amqp = amqp.clone().with_prefetch(BATCH_PREFETCH);
        let consumer = Consumer::new(&amqp, db.clone(), &names.svcdb_queue, CONSUMER).on(
            KIND,
            move |tx, event| {
                let timeline = timeline.clone();
                Box::pin(async move {
                    business_write(tx, event).await?;
                    timeline.handled(event);
                    Ok(())
                })
            },
        );
        let consumer = tokio::spawn({
            let (stop, connection) = (stop.clone(), connection.clone());
            async move { consumer.run_on(&connection, &stop).await }
        });
        let ready = tokio::time::timeout(
            STAGE_TIMEOUT,
            status.wait_for(|s| s.connected && s.listening),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        let pipeline = Self {
            stop,
            relay,
            consumer,
        };
        if !ready {
            pipeline.stop().await?;
            bail!("the relay did not connect and listen within {STAGE_TIMEOUT:?}");
        }
        Ok(pipeline)
    }

    async fn stop(self) -> Result<()> {
        self.stop.cancel();
        self.relay.await??;
        self.consumer.await??;
        Ok(())
    }
}

/// When each event of one measurement was produced and when its handler's write was done, by
/// the event's `seq`.
struct Timeline {
    produced: std::sync::Mutex<Vec<Option<Instant>>>,
    handled: std::sync::Mutex<Vec<(u64, Instant)>>,
}

impl Timeline {
    fn new(events: u64) -> Self {
        let events = usize::try_from(events).unwrap_or(0);
        Self {
            produced: std::sync::Mutex::new(vec![None; events]),
            handled: std::sync::Mutex::new(Vec::with_capacity(events)),
        }
    }

    fn produced(&self, seq: u64) {
        let now = Instant::now();
        let mut produced = self.produced.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = usize::try_from(seq).ok().and_then(|i| produced.get_mut(i)) {
            *slot = Some(now);
        }
    }

    fn handled(&self, event: &Envelope) {
        let now = Instant::now();
        let seq = event.payload["seq"].as_u64().unwrap_or(u64::MAX);
        self.handled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((seq, now));
    }

    fn handled_count(&self) -> u64 {
        self.handled.lock().unwrap_or_else(|p| p.into_inner()).len() as u64
    }

    /// Events handled per second between the 10th and the 90th percentile of the handling
    /// times: the steady state, without the start (everything warming up) and the tail (the
    /// last events, with the producers done).
    fn steady_rate(&self) -> f64 {
        let mut times: Vec<Instant> = self
            .handled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(_, t)| *t)
            .collect();
        times.sort();
        let (from, to) = (times.len() / 10, times.len() * 9 / 10);
        if to <= from {
            return 0.0;
        }
        rate((to - from) as u64, times[to] - times[from])
    }

    /// Produced to handled, per event whose seq is in `seqs`.
    fn latencies(&self, seqs: std::ops::Range<u64>) -> report::Latencies {
        let produced = self.produced.lock().unwrap_or_else(|p| p.into_inner());
        let mut latencies = report::Latencies::new();
        for (seq, handled) in self
            .handled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            if !seqs.contains(seq) {
                continue;
            }
            if let Some(Some(at)) = usize::try_from(*seq).ok().and_then(|i| produced.get(i)) {
                // A handler can finish before its producer noted the commit: 0, not negative.
                latencies.record(handled.saturating_duration_since(*at));
            }
        }
        latencies
    }
}

/// Publishes `envelopes` with `producers` tasks, each publishing one envelope and waiting for
/// its confirm before the next (as a service that publishes directly in a request would).
async fn publish_each(
    channel: &Channel,
    exchange: &str,
    envelopes: &Arc<Vec<Envelope>>,
    producers: u16,
) -> Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..producers {
        let (channel, next, envelopes) = (channel.clone(), next.clone(), envelopes.clone());
        let exchange = exchange.to_owned();
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(envelope) = usize::try_from(i).ok().and_then(|i| envelopes.get(i)) else {
                    return anyhow::Ok(());
                };
                publish_confirmed(&channel, &exchange, "raw.pipelined", envelope).await?;
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined??;
    }
    Ok(())
}

/// Publishes one envelope (mandatory, persistent) and waits for its confirm.
async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    envelope: &Envelope,
) -> Result<()> {
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            options,
            &envelope.to_json_bytes(),
            svcdb_amqp::publish::envelope_properties(envelope),
        )
        .await?
        .await?;
    match confirm {
        Confirmation::Ack(None) => Ok(()),
        other => bail!("the broker did not take a message: {other:?}"),
    }
}

/// Polls `condition` every millisecond, up to [`STAGE_TIMEOUT`]; false if it never held.
async fn wait_until(condition: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + STAGE_TIMEOUT;
    while !condition() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    true
}

/// The JSON figures.
fn figures(r: &Results) -> Figures {
    let mut f = Figures::new();
    f.set("benchmark", "events");
    r.machine.add_to(&mut f);
    f.set("events", r.events);
    f.set("producers", r.producers);
    f.set("prefetch", PREFETCH);
    f.set("batch_size", BATCH as u64);
    f.set("enqueue_per_s", rate(r.events, r.enqueue));
    f.set("relay_per_s", rate(r.events, r.relay));
    f.set("svcdb_consume_per_s", rate(r.events, r.svcdb_consume));
    f.set("svcdb_end_to_end_per_s", rate(r.events, r.svcdb_end_to_end));
    f.set("svcdb_end_to_end_s", r.svcdb_end_to_end.as_secs_f64());
    f.set("raw_publish_per_s", rate(r.events, r.raw_publish));
    f.set("relay_per_s_rounds", r.relay_rounds.clone());
    f.set("raw_publish_per_s_rounds", r.raw_publish_rounds.clone());
    f.set(
        "relay_vs_raw_publish_rounds",
        report::paired_ratios(&r.relay_rounds, &r.raw_publish_rounds),
    );
    f.set("raw_consume_per_s", rate(r.events, r.raw_consume));
    f.set("consume_batch", r.consume_batch as u64);
    f.set("batch_prefetch", BATCH_PREFETCH);
    f.set(
        "svcdb_batch_consume_per_s",
        report::median_f64(&r.batch_rounds),
    );
    f.set("svcdb_batch_consume_per_s_rounds", r.batch_rounds.clone());
    f.set("raw_consume_per_s_rounds", r.raw_consume_rounds.clone());
    f.set(
        "svcdb_batch_vs_raw_consume",
        report::paired_median(&r.batch_rounds, &r.raw_consume_rounds),
    );
    f.set(
        "svcdb_batch_vs_raw_consume_rounds",
        report::paired_ratios(&r.batch_rounds, &r.raw_consume_rounds),
    );
    f.set("raw_end_to_end_per_s", rate(r.events, r.raw_end_to_end));
    f.set("raw_end_to_end_s", r.raw_end_to_end.as_secs_f64());
    f.set(
        "svcdb_vs_raw",
        report::ratio(
            Some(rate(r.events, r.svcdb_end_to_end)),
            Some(rate(r.events, r.raw_end_to_end)),
        ),
    );
    f.set("duplicate_deliveries", r.dup_deliveries);
    f.set("duplicate_handled", r.dup_handled);
    f.set("duplicate_absorbed", r.dup_duplicates);
    f.set("duplicate_effects", r.dup_effects);
    f.set(
        "duplicate_deliveries_per_s",
        rate(r.dup_deliveries, r.dup_elapsed),
    );
    f.set("svcdb_requeued", r.requeued);
    let c = &r.concurrent;
    f.set("svcdb_pipelined_per_s", c.svcdb_pipelined_per_s());
    f.set("raw_pipelined_per_s", c.raw_pipelined_per_s());
    f.set("svcdb_pipelined_per_s_rounds", c.svcdb_pipelined.clone());
    f.set("raw_pipelined_per_s_rounds", c.raw_pipelined.clone());
    f.set("svcdb_vs_raw_pipelined_rounds", c.pipelined_ratios());
    f.set("paced_rate_per_s", c.paced_rate);
    f.set("paced_seconds", c.paced_seconds);
    f.set("svcdb_latency_p50_ms", c.svcdb_latency.p50_ms);
    f.set("svcdb_latency_p99_ms", c.svcdb_latency.p99_ms);
    f.set("svcdb_latency_max_ms", c.svcdb_latency.max_ms);
    f.set("raw_latency_p50_ms", c.raw_latency.p50_ms);
    f.set("raw_latency_p99_ms", c.raw_latency.p99_ms);
    f.set("raw_latency_max_ms", c.raw_latency.max_ms);
    f.set(
        "svcdb_latency_p99_ms_rounds",
        c.svcdb_latency_p99_rounds.clone(),
    );
    f.set(
        "raw_latency_p99_ms_rounds",
        c.raw_latency_p99_rounds.clone(),
    );
    f.set(
        "svcdb_vs_raw_latency_p99_rounds",
        report::paired_ratios(&c.svcdb_latency_p99_rounds, &c.raw_latency_p99_rounds),
    );
    f.set(
        "exactly_once",
        r.dup_effects == i64::try_from(r.events).unwrap_or(-1),
    );
    f
}

/// The targets, as same-run ratios.
fn targets(r: &Results) -> Vec<Target> {
    let c = &r.concurrent;
    vec![
        Target {
            key: "svcdb_vs_raw_pipelined".into(),
            what: "svcdb / raw lapin, pipelined throughput".into(),
            value: c.svcdb_vs_raw_pipelined(),
            bound: Bound::AtLeast(1.0),
            unit: "×",
        },
        Target {
            key: "svcdb_batch_vs_raw_consume".into(),
            what: "svcdb batched consume / raw lapin consume (median of the rounds)".into(),
            value: report::paired_median(&r.batch_rounds, &r.raw_consume_rounds),
            bound: Bound::AtLeast(1.5),
            unit: "×",
        },
        Target {
            key: "relay_vs_raw_publish".into(),
            what: "relay drain / raw lapin publish (median of the rounds)".into(),
            value: report::paired_median(&r.relay_rounds, &r.raw_publish_rounds),
            bound: Bound::AtLeast(0.9),
            unit: "×",
        },
        Target {
            key: "svcdb_vs_raw_latency_p99".into(),
            what: "svcdb / raw lapin, p99 latency at the paced load (median of the rounds)".into(),
            value: report::paired_median(&c.svcdb_latency_p99_rounds, &c.raw_latency_p99_rounds),
            bound: Bound::AtMost(3.0),
            unit: "×",
        },
    ]
}

/// The table and the context a reader needs to judge it.
fn human_report(r: &Results) -> String {
    let mut table = report::table(&["stage", "events", "seconds", "events/s"]);
    let line = |stage: &str, events: u64, elapsed: Duration| {
        vec![
            stage.to_owned(),
            events.to_string(),
            report::num(elapsed.as_secs_f64()),
            report::num(rate(events, elapsed)),
        ]
    };
    table.add_row(line(
        &format!(
            "svcdb: outbox::enqueue, 1 tx each, {} producers",
            r.producers
        ),
        r.events,
        r.enqueue,
    ));
    table.add_row(line("svcdb: Relay drain (confirms)", r.events, r.relay));
    table.add_row(line(
        "svcdb: Consumer (process_once + INSERT)",
        r.events,
        r.svcdb_consume,
    ));
    table.add_row(line("svcdb: end to end", r.events, r.svcdb_end_to_end));
    table.add_row(line(
        "raw lapin: publish (confirms)",
        r.events,
        r.raw_publish,
    ));
    table.add_row(line(
        "raw lapin: consume (INSERT tx, ack)",
        r.events,
        r.raw_consume,
    ));
    table.add_row(line("raw lapin: end to end", r.events, r.raw_end_to_end));
    // The median round's: a rate as a line of the table.
    let median_secs = |rates: &[f64]| {
        Duration::from_secs_f64(r.events as f64 / report::median_f64(rates).max(1e-9))
    };
    table.add_row(line(
        &format!(
            "svcdb: Consumer, batches of {}, prefetch {BATCH_PREFETCH} (1 commit a batch; median of {} rounds)",
            r.consume_batch,
            r.batch_rounds.len()
        ),
        r.events,
        median_secs(&r.batch_rounds),
    ));
    table.add_row(line(
        &format!(
            "raw lapin: consume, in turns with the batched one (median of {} rounds)",
            r.raw_consume_rounds.len()
        ),
        r.events,
        median_secs(&r.raw_consume_rounds),
    ));
    table.add_row(line(
        "duplicates: every event published twice",
        r.dup_deliveries,
        r.dup_elapsed,
    ));
    let ratio = report::ratio(
        Some(rate(r.events, r.svcdb_end_to_end)),
        Some(rate(r.events, r.raw_end_to_end)),
    );
    let rounds = |ours: &[f64], theirs: &[f64]| {
        report::paired_ratios(ours, theirs)
            .iter()
            .map(|x| report::num(*x))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "Events benchmark: {} events per path; stages run one after another; \
         publisher confirms per batch of {BATCH}; prefetch {PREFETCH}, pool of {PREFETCH}\n{}\n\n\
         {table}\n\n\
         svcdb / raw lapin, end to end: {}× (the cost of the outbox and exactly-once claims)\n\
         svcdb batched consumer / raw lapin consume, {} rounds in turns: {}× (median of {}; target: at least 1.5)\n\
         Relay drain / raw lapin publish, {} rounds in turns: {}× (median of {}; target: at least 0.9)\n\
         Duplicates: {} deliveries → {} handled, {} absorbed as duplicates, {} business effects \
         (expected {}): exactly once",
        r.events,
        r.machine.line(),
        ratio.map_or_else(|| "n/a".to_owned(), report::num),
        r.batch_rounds.len(),
        report::paired_median(&r.batch_rounds, &r.raw_consume_rounds)
            .map_or_else(|| "n/a".to_owned(), report::num),
        rounds(&r.batch_rounds, &r.raw_consume_rounds),
        r.relay_rounds.len(),
        report::paired_median(&r.relay_rounds, &r.raw_publish_rounds)
            .map_or_else(|| "n/a".to_owned(), report::num),
        rounds(&r.relay_rounds, &r.raw_publish_rounds),
        r.dup_deliveries,
        r.dup_handled,
        r.dup_duplicates,
        r.dup_effects,
        r.events,
    )
}

/// The concurrent measurements, for people.
fn concurrent_report(c: &Concurrent, producers: u16) -> String {
    let mut throughput = report::table(&["all stages at once", "events/s (steady state)"]);
    throughput.add_row(vec![
        format!("svcdb: {producers} producers (1 tx each) + Relay + Consumer (prefetch {BATCH_PREFETCH})"),
        report::num(c.svcdb_pipelined_per_s()),
    ]);
    throughput.add_row(vec![
        format!("raw lapin: {producers} producers (confirm each) + consumer (1 tx each, prefetch {PREFETCH})"),
        report::num(c.raw_pipelined_per_s()),
    ]);
    let mut latency = report::table(&["latency", "p50 ms", "p99 ms", "max ms", "p99 per window"]);
    for (path, l, rounds) in [
        (
            "svcdb: producer's commit → handler's write",
            &c.svcdb_latency,
            &c.svcdb_latency_p99_rounds,
        ),
        (
            "raw lapin: publish → handler's write",
            &c.raw_latency,
            &c.raw_latency_p99_rounds,
        ),
    ] {
        latency.add_row(vec![
            path.to_owned(),
            report::num(l.p50_ms),
            report::num(l.p99_ms),
            report::num(l.max_ms),
            rounds
                .iter()
                .map(|&p99| report::num(p99))
                .collect::<Vec<_>>()
                .join(", "),
        ]);
    }
    format!(
        "{throughput}\n\nLatency at a paced {} events/s for {} s per path, the paths taking turns \
         in {} windows each (to the end of the handler's write, just before its commit):\n{latency}",
        c.paced_rate,
        c.paced_seconds,
        c.svcdb_latency_p99_rounds.len()
    )
}
