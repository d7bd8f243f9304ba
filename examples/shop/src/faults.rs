//! The faults `shop demo` injects, each aimed at one component:
//!
//! * [`Link`]: each service reaches RabbitMQ through a TCP forwarder of its own that can drop
//!   its connections ([`Link::cut`]) or refuse new ones for a while ([`Link::set_down`]): a
//!   network hiccup, or the broker unreachable from one service. Nothing in the services knows
//!   about it; they see what they would see in production.
//! * [`Faults::after_handler`]: a consumer "crashes" after its handler's writes and before the
//!   broker hears the acknowledgement: its link drops while the transaction commits, so the
//!   work is done and the broker redelivers the message anyway.
//! * [`catalog_release_2`]: a release whose third migration fails.
//! * [`publish_copies`] and [`publish_malformed`]: what a retrying producer and a buggy one put
//!   on the wire.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use svcdb::migrate::{EmbeddedFile, EmbeddedMigrations, Migrations};
use svcdb::Envelope;
use svcdb_amqp::lapin::options::BasicPublishOptions;
use svcdb_amqp::lapin::uri::AMQPUri;
use svcdb_amqp::lapin::{BasicProperties, Confirmation, Connection};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use uuid::Uuid;

/// A TCP forwarder from a port on 127.0.0.1 to the broker, that can drop its connections and
/// refuse new ones.
pub struct Link {
    port: u16,
    state: Arc<LinkState>,
    listener: JoinHandle<()>,
}

struct LinkState {
    upstream: String,
    down: AtomicBool,
    connections: Mutex<Vec<JoinHandle<()>>>,
}

impl Link {
    /// Starts forwarding a new port to `upstream` (`host:port`).
    pub async fn open(upstream: String) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(LinkState {
            upstream,
            down: AtomicBool::new(false),
            connections: Mutex::new(Vec::new()),
        });
        let shared = state.clone();
        let listener = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if shared.down.load(Ordering::SeqCst) {
                    continue; // dropped at once: the client sees the connection closed
                }
                let upstream = shared.upstream.clone();
                let forward = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                let mut connections = lock(&shared.connections);
                connections.retain(|c| !c.is_finished());
                connections.push(forward);
            }
        });
        Ok(Self {
            port,
            state,
            listener,
        })
    }

    /// `broker_url` with its host and port replaced by this link's.
    pub fn url(&self, broker_url: &str) -> anyhow::Result<String> {
        let mut uri =
            AMQPUri::from_str(broker_url).map_err(|e| anyhow::anyhow!("not an AMQP URL: {e}"))?;
        uri.authority.host = "127.0.0.1".into();
        uri.authority.port = self.port;
        Ok(uri.to_string())
    }

    /// Drops every connection through the link, both ways, as a network failure would: the
    /// broker requeues what was unacknowledged, the client reconnects.
    pub fn cut(&self) {
        for connection in lock(&self.state.connections).drain(..) {
            connection.abort();
        }
    }

    /// While down, the link drops its connections and refuses new ones: the broker is
    /// unreachable for this service.
    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
        if down {
            self.cut();
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.listener.abort();
        self.cut();
    }
}

/// `host:port` of the broker `url` names.
pub fn broker_address(url: &str) -> anyhow::Result<String> {
    let uri = AMQPUri::from_str(url).map_err(|e| anyhow::anyhow!("not an AMQP URL: {e}"))?;
    Ok(format!("{}:{}", uri.authority.host, uri.authority.port))
}

/// A consumer crash that happened.
#[derive(Debug, Clone)]
pub struct Crash {
    pub service: &'static str,
    pub event_id: Uuid,
    pub kind: String,
}

/// Faults armed by the demo, consulted by the services at their fault points. Outside the demo
/// nothing is armed and every check is a no-op.
#[derive(Default)]
pub struct Faults {
    links: Mutex<HashMap<&'static str, Arc<Link>>>,
    crashes_armed: Mutex<HashMap<&'static str, u32>>,
    crashed: Mutex<Vec<Crash>>,
}

impl Faults {
    /// Registers the link `service` reaches the broker through.
    pub fn add_link(&self, service: &'static str, link: Arc<Link>) {
        lock(&self.links).insert(service, link);
    }

    /// The next `times` events `service` handles each end in a crash after the handler.
    pub fn arm_crash_after_commit(&self, service: &'static str, times: u32) {
        *lock(&self.crashes_armed).entry(service).or_default() += times;
    }

    /// The crashes so far.
    pub fn crashes(&self) -> Vec<Crash> {
        lock(&self.crashed).clone()
    }

    /// Called after each handler of `service` returned `Ok`, inside its transaction. If a crash
    /// is armed: drop the service's broker link, and give the drop time to reach both ends
    /// before returning, so that the transaction commits on a consumer whose acknowledgement
    /// can no longer reach the broker. The broker requeues the message, the consumer
    /// reconnects, and the redelivery meets the committed claim.
    pub async fn after_handler(&self, service: &'static str, event: &Envelope) {
        let armed = match lock(&self.crashes_armed).get_mut(service) {
            Some(left) if *left > 0 => {
                *left -= 1;
                true
            }
            _ => false,
        };
        if !armed {
            return;
        }
        let Some(link) = lock(&self.links).get(service).cloned() else {
            return;
        };
        link.cut();
        lock(&self.crashed).push(Crash {
            service,
            event_id: event.id,
            kind: event.kind.clone(),
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A poisoned lock still holds usable data here (counters and handles).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Release 2's own migrations: 0003 and 0004 are fine, 0005 fails.
static CATALOG_RELEASE_2: EmbeddedMigrations = svcdb::embed_migrations!("faults/catalog_release_2");

/// The catalog's release 2 as its binary would ship it: release 1's migrations and its own
/// three, the third of which fails.
pub fn catalog_release_2() -> anyhow::Result<Migrations> {
    let files: Vec<EmbeddedFile> = crate::catalog::MIGRATIONS
        .files
        .iter()
        .chain(CATALOG_RELEASE_2.files)
        .copied()
        .collect();
    // `EmbeddedMigrations` holds `'static` files, as the macro makes them; this list is built
    // once per demo, so leaking it costs a few bytes.
    let files: &'static [EmbeddedFile] = Box::leak(files.into_boxed_slice());
    Ok(Migrations::from_embedded(&EmbeddedMigrations::new(
        "catalog release 2",
        files,
    ))?)
}

/// Publishes `copies` copies of `envelopes` (round robin) to `exchange` with `routing_key`,
/// each confirmed by the broker: what a producer that retries on a lost confirm, or a relay
/// that died between publishing and marking, puts on the wire.
pub async fn publish_copies(
    connection: &Connection,
    exchange: &str,
    routing_key: &str,
    envelopes: &[Envelope],
    copies: usize,
) -> anyhow::Result<()> {
    anyhow::ensure!(!envelopes.is_empty() || copies == 0, "nothing to copy");
    let channel = svcdb_amqp::publish::confirm_channel(connection).await?;
    for envelope in envelopes.iter().cycle().take(copies) {
        svcdb_amqp::publish::publish_envelope(
            &channel,
            exchange,
            routing_key,
            envelope,
            Duration::from_secs(5),
        )
        .await?;
    }
    let _ = channel.close(200, "OK".into()).await;
    Ok(())
}

/// Publishes `body` straight to `queue` (through the default exchange), confirmed: a message
/// no svcdb producer would write.
pub async fn publish_malformed(
    connection: &Connection,
    queue: &str,
    body: &[u8],
) -> anyhow::Result<()> {
    let channel = svcdb_amqp::publish::confirm_channel(connection).await?;
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            BasicProperties::default()
                .with_delivery_mode(svcdb_amqp::publish::PERSISTENT)
                .with_content_type("application/json".into()),
        )
        .await
        .context("publishing the malformed message")?
        .await
        .context("waiting for the broker's confirm")?;
    let _ = channel.close(200, "OK".into()).await;
    anyhow::ensure!(
        matches!(confirm, Confirmation::Ack(None)),
        "the broker did not take the malformed message: {confirm:?}"
    );
    Ok(())
}
