//! The faults `shop demo` injects from outside the services, each aimed at one component:
//!
//! * [`Link`]: each service's replicas reach RabbitMQ through a TCP forwarder of the demo's
//!   that reads the AMQP frames going by. It can drop its connections ([`Link::cut`]) or
//!   refuse new ones for a while ([`Link::set_down`]): the broker unreachable from one
//!   service. With [`LostAcks`] it drops a consumer's connection at the moment the consumer
//!   sends `basic.ack` for a chosen message: the handler's transaction has committed (the
//!   consumer acknowledges only after the commit) and the broker never hears it, so it
//!   redelivers. Nothing in the services knows; they see what they would see in production.
//! * [`catalog_release_2`]: a release whose third migration fails.
//! * [`publish_copies`] and [`publish_malformed`]: what a retrying producer and a buggy one put
//!   on the wire.
//!
//! Killed replicas, terminated database backends and a broker restart are in
//! [`crate::fleet`] and [`crate::scenario`]: they need no help from the wire.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use svcdb::migrate::{EmbeddedFile, EmbeddedMigrations, Migrations};
use svcdb::Envelope;
use svcdb_amqp::lapin::options::BasicPublishOptions;
use svcdb_amqp::lapin::uri::AMQPUri;
use svcdb_amqp::lapin::{BasicProperties, Confirmation, Connection};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Which acknowledgements get lost: a share of the messages (chosen by their message id, so
/// every replica and every redelivery agree), each up to `redeliveries` times. Shared by
/// every link of a demo; it also counts what went by, for the report.
#[derive(Debug, Default)]
pub struct LostAcks {
    /// Share of messages whose acknowledgement is lost, 0 to 1.
    rate: f64,
    /// How many times each chosen message's acknowledgement is lost.
    redeliveries: u32,
    seed: u64,
    /// Set once the demo stops losing acknowledgements (before it stops the replicas).
    disabled: AtomicBool,
    /// Acknowledgements lost so far, by message id.
    lost: Mutex<HashMap<String, u32>>,
    /// Acknowledgements sent (lost or not), by (service, message id).
    acked: Mutex<HashMap<(&'static str, String), u32>>,
    cuts: AtomicU64,
}

impl LostAcks {
    pub fn new(rate: f64, redeliveries: u32, seed: u64) -> Self {
        Self {
            rate,
            redeliveries,
            seed,
            ..Self::default()
        }
    }

    /// Whether the acknowledgement of `message_id`, about to be sent, is to be lost. Counts it.
    fn lose(&self, message_id: &str) -> bool {
        if self.rate <= 0.0 || self.redeliveries == 0 || self.disabled.load(Ordering::Relaxed) {
            return false;
        }
        let mut hasher = DefaultHasher::new();
        (self.seed, message_id).hash(&mut hasher);
        let chosen = (hasher.finish() as f64 / u64::MAX as f64) < self.rate;
        if !chosen {
            return false;
        }
        let mut lost = lock(&self.lost);
        let times = lost.entry(message_id.to_owned()).or_default();
        if *times >= self.redeliveries {
            return false;
        }
        *times += 1;
        self.cuts.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Stops losing acknowledgements: the replicas' graceful stop is not a fault.
    pub fn disable(&self) {
        self.disabled.store(true, Ordering::Relaxed);
    }

    fn acked(&self, service: &'static str, message_id: String) {
        *lock(&self.acked).entry((service, message_id)).or_default() += 1;
    }

    /// Connections cut at an acknowledgement so far.
    pub fn cuts(&self) -> u64 {
        self.cuts.load(Ordering::Relaxed)
    }

    /// Acknowledgements sent beyond the first, per message and service, added up: each is a
    /// delivery of a message the consumer had handled before (a copy, or a redelivery after a
    /// lost ack, a kill or a cut), which its claim absorbed.
    pub fn repeated_acks(&self) -> u64 {
        lock(&self.acked)
            .values()
            .map(|&n| u64::from(n.saturating_sub(1)))
            .sum()
    }
}

/// A TCP forwarder from a port on 127.0.0.1 to the broker, that can drop its connections,
/// refuse new ones, and lose chosen acknowledgements ([`LostAcks`]).
pub struct Link {
    port: u16,
    state: Arc<LinkState>,
    listener: JoinHandle<()>,
}

struct LinkState {
    service: &'static str,
    upstream: String,
    down: AtomicBool,
    lost_acks: Arc<LostAcks>,
    connections: Mutex<Vec<JoinHandle<()>>>,
}

impl Link {
    /// Starts forwarding a new port to `upstream` (`host:port`) for `service`'s replicas.
    pub async fn open(
        service: &'static str,
        upstream: String,
        lost_acks: Arc<LostAcks>,
    ) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(LinkState {
            service,
            upstream,
            down: AtomicBool::new(false),
            lost_acks,
            connections: Mutex::new(Vec::new()),
        });
        let shared = state.clone();
        let listener = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if shared.down.load(Ordering::SeqCst) {
                    continue; // dropped at once: the client sees the connection closed
                }
                let state = shared.clone();
                let forward = tokio::spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(&state.upstream).await {
                        forward(inbound, outbound, &state).await;
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

/// AMQP 0-9-1 frame types and the methods the link looks at (class 60 is `basic`), from the
/// protocol's specification (section 4.2.3 and the class reference).
const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_END: u8 = 0xCE;
const BASIC: u16 = 60;
const BASIC_DELIVER: u16 = 60;
const BASIC_ACK: u16 = 80;
const BASIC_REJECT: u16 = 90;
const BASIC_NACK: u16 = 120;

/// What one connection's consumer has been sent and not yet settled: delivery tag → message
/// id, per channel; and the delivery whose content header is expected next, per channel.
#[derive(Default)]
struct Deliveries {
    open: HashMap<(u16, u64), String>,
    awaiting_header: HashMap<u16, u64>,
}

/// Forwards one connection both ways, frame by frame, until either side closes or an
/// acknowledgement is to be lost (then both sides are dropped, as a network failure would).
async fn forward(inbound: TcpStream, outbound: TcpStream, state: &LinkState) {
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (client_read, mut client_write) = inbound.into_split();
    let (server_read, mut server_write) = outbound.into_split();
    let deliveries = Mutex::new(Deliveries::default());
    let from_client = async {
        let mut reader = BufReader::new(client_read);
        // The protocol header, "AMQP" 0 0 9 1, precedes the client's first frame.
        let mut header = [0u8; 8];
        reader.read_exact(&mut header).await?;
        server_write.write_all(&header).await?;
        loop {
            let frame = read_frame(&mut reader).await?;
            if let Some((tag, multiple, ack)) = settlement(&frame) {
                let settled: Vec<String> = {
                    let mut d = lock(&deliveries);
                    let keys: Vec<(u16, u64)> = d
                        .open
                        .keys()
                        .filter(|(c, t)| {
                            *c == channel_of(&frame) && (*t == tag || (multiple && *t <= tag))
                        })
                        .copied()
                        .collect();
                    keys.iter().filter_map(|k| d.open.remove(k)).collect()
                };
                if ack {
                    let mut lost = false;
                    for id in settled {
                        lost |= state.lost_acks.lose(&id);
                        state.lost_acks.acked(state.service, id);
                    }
                    if lost {
                        return anyhow::Ok(()); // the ack never reaches the broker
                    }
                }
            }
            server_write.write_all(&frame).await?;
        }
    };
    let from_server = async {
        let mut reader = BufReader::new(server_read);
        loop {
            let frame = read_frame(&mut reader).await?;
            observe_delivery(&frame, &deliveries);
            client_write.write_all(&frame).await?;
        }
        #[allow(unreachable_code)]
        anyhow::Ok(())
    };
    tokio::select! {
        _ = from_client => {}
        _ = from_server => {}
    }
}

/// One whole frame: header, payload and end octet.
async fn read_frame<R: AsyncReadExt + Unpin>(reader: &mut R) -> anyhow::Result<Vec<u8>> {
    let mut frame = vec![0u8; 7];
    reader.read_exact(&mut frame).await?;
    let size = u32::from_be_bytes([frame[3], frame[4], frame[5], frame[6]]) as usize;
    // RabbitMQ's frame_max is at most 128 KiB by default; anything near this is not AMQP.
    anyhow::ensure!(size <= 1 << 27, "not an AMQP frame: {size} bytes");
    frame.resize(7 + size + 1, 0);
    reader.read_exact(&mut frame[7..]).await?;
    anyhow::ensure!(frame[7 + size] == FRAME_END, "not an AMQP frame");
    Ok(frame)
}

fn channel_of(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[1], frame[2]])
}

/// The method's class and id, and its arguments, if `frame` is a method frame.
fn method(frame: &[u8]) -> Option<(u16, u16, &[u8])> {
    if frame[0] != FRAME_METHOD || frame.len() < 12 {
        return None;
    }
    let payload = &frame[7..frame.len() - 1];
    Some((
        u16::from_be_bytes([payload[0], payload[1]]),
        u16::from_be_bytes([payload[2], payload[3]]),
        &payload[4..],
    ))
}

/// A client's `basic.ack` / `basic.nack` / `basic.reject`: (delivery tag, multiple, is ack).
fn settlement(frame: &[u8]) -> Option<(u64, bool, bool)> {
    let (class, id, args) = method(frame)?;
    if class != BASIC || !matches!(id, BASIC_ACK | BASIC_NACK | BASIC_REJECT) || args.len() < 9 {
        return None;
    }
    let tag = u64::from_be_bytes(args[..8].try_into().ok()?);
    let multiple = id != BASIC_REJECT && args[8] & 1 == 1;
    Some((tag, multiple, id == BASIC_ACK))
}

/// Notes a `basic.deliver`'s tag, and the message id from the content header that follows it.
fn observe_delivery(frame: &[u8], deliveries: &Mutex<Deliveries>) {
    let channel = channel_of(frame);
    if let Some((BASIC, BASIC_DELIVER, args)) = method(frame) {
        // consumer-tag (shortstr), then the delivery tag.
        let skip = 1 + usize::from(args.first().copied().unwrap_or_default());
        if let Some(tag) = args.get(skip..skip + 8).and_then(|t| t.try_into().ok()) {
            lock(deliveries)
                .awaiting_header
                .insert(channel, u64::from_be_bytes(tag));
        }
        return;
    }
    if frame[0] != FRAME_HEADER || frame.len() < 8 {
        return;
    }
    let Some(tag) = lock(deliveries).awaiting_header.remove(&channel) else {
        return;
    };
    if let Some(id) = message_id(&frame[7..frame.len() - 1]) {
        lock(deliveries).open.insert((channel, tag), id);
    }
}

/// The `message-id` property of a content header payload (class, weight, body size, flags,
/// then the properties present, in flag order from bit 15 down).
fn message_id(payload: &[u8]) -> Option<String> {
    let flags = u16::from_be_bytes(payload.get(12..14)?.try_into().ok()?);
    let mut at = 14;
    let shortstr = |at: &mut usize| -> Option<&[u8]> {
        let len = usize::from(*payload.get(*at)?);
        let s = payload.get(*at + 1..*at + 1 + len)?;
        *at += 1 + len;
        Some(s)
    };
    for bit in (7..=15).rev() {
        if flags & (1 << bit) == 0 {
            continue;
        }
        match bit {
            // content-type, content-encoding, correlation-id, reply-to, expiration
            15 | 14 | 10 | 9 | 8 => {
                shortstr(&mut at)?;
            }
            // headers: a table, length-prefixed
            13 => {
                let len = u32::from_be_bytes(payload.get(at..at + 4)?.try_into().ok()?);
                at += 4 + len as usize;
            }
            // delivery-mode, priority
            12 | 11 => at += 1,
            // message-id
            7 => return Some(String::from_utf8_lossy(shortstr(&mut at)?).into_owned()),
            _ => unreachable!("bits 7 to 15 only"),
        }
    }
    None
}

/// `host:port` of the broker `url` names.
pub fn broker_address(url: &str) -> anyhow::Result<String> {
    let uri = AMQPUri::from_str(url).map_err(|e| anyhow::anyhow!("not an AMQP URL: {e}"))?;
    Ok(format!("{}:{}", uri.authority.host, uri.authority.port))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![kind];
        frame.extend_from_slice(&channel.to_be_bytes());
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(payload);
        frame.push(FRAME_END);
        frame
    }

    fn method_frame(channel: u16, class: u16, id: u16, args: &[u8]) -> Vec<u8> {
        let mut payload = class.to_be_bytes().to_vec();
        payload.extend_from_slice(&id.to_be_bytes());
        payload.extend_from_slice(args);
        frame(FRAME_METHOD, channel, &payload)
    }

    #[test]
    fn a_delivery_is_matched_with_its_message_id_and_its_ack() {
        let deliveries = Mutex::new(Deliveries::default());
        // basic.deliver: consumer tag "c1", delivery tag 7, redelivered, exchange, routing key.
        let mut args = vec![2, b'c', b'1'];
        args.extend_from_slice(&7u64.to_be_bytes());
        args.extend_from_slice(&[0, 0, 0]);
        observe_delivery(&method_frame(3, BASIC, BASIC_DELIVER, &args), &deliveries);
        // The content header: class, weight, body size, flags (content-type, headers,
        // delivery-mode, message-id), then those properties in order.
        let mut header = BASIC.to_be_bytes().to_vec();
        header.extend_from_slice(&[0, 0]);
        header.extend_from_slice(&10u64.to_be_bytes());
        let flags: u16 = (1 << 15) | (1 << 13) | (1 << 12) | (1 << 7);
        header.extend_from_slice(&flags.to_be_bytes());
        header.push(16);
        header.extend_from_slice(b"application/json");
        header.extend_from_slice(&3u32.to_be_bytes());
        header.extend_from_slice(&[1, b'x', b'S']);
        header.push(2);
        header.push(5);
        header.extend_from_slice(b"event");
        observe_delivery(&frame(FRAME_HEADER, 3, &header), &deliveries);
        assert_eq!(
            lock(&deliveries).open.get(&(3, 7)).map(String::as_str),
            Some("event")
        );

        let mut ack = 7u64.to_be_bytes().to_vec();
        ack.push(0);
        assert_eq!(
            settlement(&method_frame(3, BASIC, BASIC_ACK, &ack)),
            Some((7, false, true))
        );
        assert_eq!(
            settlement(&method_frame(
                3,
                BASIC,
                BASIC_NACK,
                &[ack.as_slice(), &[]].concat()
            )),
            Some((7, false, false))
        );
        // A publisher confirm travels the other way and a heartbeat is not a method.
        assert_eq!(settlement(&frame(8, 0, &[])), None);
    }

    #[test]
    fn truncated_frames_are_ignored() {
        let deliveries = Mutex::new(Deliveries::default());
        observe_delivery(&method_frame(1, BASIC, BASIC_DELIVER, &[9]), &deliveries);
        observe_delivery(&frame(FRAME_HEADER, 1, &[0, 60]), &deliveries);
        assert!(lock(&deliveries).open.is_empty());
        assert_eq!(message_id(&[0; 13]), None);
        assert_eq!(
            settlement(&method_frame(1, BASIC, BASIC_ACK, &[1, 2])),
            None
        );
    }

    #[test]
    fn the_chosen_share_loses_each_ack_up_to_the_redeliveries() {
        let lost_acks = LostAcks::new(0.5, 3, 1);
        let ids: Vec<String> = (0..400).map(|i| format!("m{i}")).collect();
        let chosen: Vec<&String> = ids.iter().filter(|id| lost_acks.lose(id)).collect();
        assert!(
            (120..280).contains(&chosen.len()),
            "{} of 400",
            chosen.len()
        );
        for id in &chosen {
            assert!(lost_acks.lose(id) && lost_acks.lose(id), "lost 3 times");
            assert!(!lost_acks.lose(id), "then acknowledged");
        }
        lost_acks.disable();
        assert!(ids.iter().all(|id| !lost_acks.lose(id)));
        assert_eq!(lost_acks.cuts(), chosen.len() as u64 * 3);
    }
}
