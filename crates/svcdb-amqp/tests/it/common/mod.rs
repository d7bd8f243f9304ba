//! Shared test helpers: the real broker and database, unique names, clean-up on drop.

pub mod cluster;

use std::future::Future;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use svcdb::testing::TestDb;
use svcdb::{Envelope, ServiceDb};
use svcdb_amqp::topology::Topology;
use svcdb_amqp::AmqpConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The broker tests use: `SVCDB_TEST_AMQP_URL`, else `AMQP_URL`, else the local default.
pub fn amqp_url() -> String {
    std::env::var("SVCDB_TEST_AMQP_URL")
        .or_else(|_| std::env::var("AMQP_URL"))
        .unwrap_or_else(|_| svcdb_amqp::DEFAULT_URL.to_owned())
}

pub fn amqp() -> AmqpConfig {
    AmqpConfig::new(amqp_url()).with_connection_name("svcdb-amqp tests")
}

/// `t.<prefix>.<random>`: unique per test, recognisable as a test's leftover.
pub fn unique(prefix: &str) -> String {
    let random = uuid::Uuid::now_v7().simple().to_string();
    format!("t.{prefix}.{}", &random[random.len() - 10..])
}

/// A connection to the real broker, and the topology declared through it, deleted on drop
/// (also when the test panics).
pub struct Broker {
    pub config: AmqpConfig,
    pub connection: Connection,
    declared: Mutex<Vec<Topology>>,
}

impl Broker {
    pub async fn new() -> Self {
        let config = amqp();
        let connection = config.connect().await.unwrap_or_else(|e| {
            panic!("tests need RabbitMQ: {e}\n  hint: run scripts/services, or set SVCDB_TEST_AMQP_URL")
        });
        Self {
            config,
            connection,
            declared: Mutex::new(Vec::new()),
        }
    }

    /// Declares `topology` and deletes it when the broker guard drops.
    pub async fn declare(&self, topology: Topology) {
        self.declared.lock().unwrap().push(topology.clone());
        topology.declare(&self.connection).await.unwrap();
    }

    /// Remembers `topology` for deletion without declaring it (the code under test does).
    pub fn delete_later(&self, topology: Topology) {
        self.declared.lock().unwrap().push(topology);
    }

    pub async fn channel(&self) -> Channel {
        svcdb_amqp::publish::confirm_channel(&self.connection)
            .await
            .unwrap()
    }

    /// Publishes `envelope` with confirms.
    pub async fn publish(&self, exchange: &str, routing_key: &str, envelope: &Envelope) {
        let channel = self.channel().await;
        svcdb_amqp::publish::publish_envelope(
            &channel,
            exchange,
            routing_key,
            envelope,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        let _ = channel.close(200, "OK".into()).await;
    }

    /// Publishes raw bytes (for malformed messages), with confirms.
    pub async fn publish_raw(&self, exchange: &str, routing_key: &str, body: &[u8]) {
        let properties = BasicProperties::default().with_delivery_mode(2);
        self.publish_with(exchange, routing_key, body, properties)
            .await;
    }

    /// Publishes `body` with `properties` as given (headers included), with confirms: what a
    /// person replaying a dead letter does.
    pub async fn publish_with(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) {
        let channel = self.channel().await;
        let confirm = channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                properties,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(
            matches!(confirm, lapin::Confirmation::Ack(None)),
            "{confirm:?}"
        );
        let _ = channel.close(200, "OK".into()).await;
    }

    /// Ready (not delivered, not unacknowledged) messages in `queue`.
    pub async fn ready(&self, queue: &str) -> u32 {
        let channel = self.connection.create_channel().await.unwrap();
        let q = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let _ = channel.close(200, "OK".into()).await;
        q.message_count()
    }

    /// A classic queue bound to `exchange` (any routing key), exclusive to this connection
    /// so it goes with it: it receives a copy of what is published there exactly as sent
    /// (a quorum queue sets its own `x-delivery-count` on what it delivers).
    pub async fn tap(&self, exchange: &str) -> String {
        let name = unique("tap");
        let channel = self.connection.create_channel().await.unwrap();
        channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_bind(
                name.as_str().into(),
                exchange.into(),
                "#".into(),
                lapin::options::QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        name
    }

    /// Whether this broker counts a `basic.nack` with requeue in a quorum queue's
    /// `x-delivery-count`: RabbitMQ before 4.3 does, 4.3 and later do not (rabbitmq-server
    /// PR 15387). Found out on a scratch queue rather than from the version string.
    pub async fn nack_spends_a_delivery(&self) -> bool {
        let queue = svcdb_amqp::QueueSpec::new(unique("nack-control"));
        self.declare(Topology::new().queue(queue.clone())).await;
        self.publish_raw("", &queue.name, b"control").await;
        let channel = self.connection.create_channel().await.unwrap();
        let first = get_one(&channel, &queue.name).await;
        first
            .nack(lapin::options::BasicNackOptions {
                requeue: true,
                multiple: false,
            })
            .await
            .unwrap();
        let second = get_one(&channel, &queue.name).await;
        assert!(second.redelivered, "the control message came back");
        second.ack(BasicAckOptions::default()).await.unwrap();
        let _ = channel.close(200, "OK".into()).await;
        count_header(&second, "x-delivery-count") > 0
    }

    /// Takes (and acks) every message of `queue` that arrives within `wait`, expecting at least
    /// `at_least`.
    pub async fn take(
        &self,
        queue: &str,
        at_least: usize,
        wait: Duration,
    ) -> Vec<lapin::message::Delivery> {
        let channel = self.connection.create_channel().await.unwrap();
        let mut taken = Vec::new();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match channel
                .basic_get(queue.into(), BasicGetOptions::default())
                .await
                .unwrap()
            {
                Some(message) => {
                    message
                        .delivery
                        .ack(BasicAckOptions::default())
                        .await
                        .unwrap();
                    taken.push(message.delivery);
                }
                None if taken.len() >= at_least || tokio::time::Instant::now() >= deadline => break,
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        let _ = channel.close(200, "OK".into()).await;
        assert!(
            taken.len() >= at_least,
            "expected at least {at_least} messages in {queue}, got {}",
            taken.len()
        );
        taken
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let declared =
            std::mem::take(&mut *self.declared.lock().unwrap_or_else(|p| p.into_inner()));
        if declared.is_empty() {
            return;
        }
        let config = self.config.clone();
        // Drop can't await, and the test's runtime may be gone: clean up on a thread of our own.
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let connection = config.connect().await?;
                for topology in declared {
                    topology.delete(&connection).await?;
                }
                let _ = connection.close(200, "OK".into()).await;
                Ok::<_, svcdb_amqp::Error>(())
            })
        });
        match cleanup.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("warning: broker clean-up failed: {e}"),
            Err(_) => eprintln!("warning: broker clean-up panicked"),
        }
    }
}

/// The next message of `queue`, waiting up to 10 s for one.
async fn get_one(channel: &Channel, queue: &str) -> lapin::message::Delivery {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .unwrap();
        if let Some(message) = got {
            return message.delivery;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after 10 s waiting for a message in {queue}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A numeric header of a message (`x-delivery-count`, …); 0 when absent.
pub fn count_header(delivery: &lapin::message::Delivery, name: &str) -> i64 {
    let headers = delivery.properties.headers();
    match headers.as_ref().and_then(|h| h.inner().get(name)) {
        Some(AMQPValue::LongLongInt(n)) => *n,
        Some(AMQPValue::LongInt(n)) => i64::from(*n),
        Some(AMQPValue::LongUInt(n)) => i64::from(*n),
        Some(AMQPValue::ShortInt(n)) => i64::from(*n),
        None => 0,
        Some(other) => panic!("header {name} is not a count: {other:?}"),
    }
}

/// A string header of a message, if present.
pub fn header(delivery: &lapin::message::Delivery, name: &str) -> Option<String> {
    match delivery.properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        AMQPValue::LongLongInt(n) => Some(n.to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// A throwaway database with a service schema holding the idempotency and outbox tables and
/// an `effects` table: one row per business effect, deliberately without a unique key, so a
/// handler that ran twice shows as two rows.
pub async fn service() -> (TestDb, ServiceDb) {
    let test_db = TestDb::new().await;
    let db = test_db.service("svc").await;
    db.install_idempotency().await.unwrap();
    db.install_outbox().await.unwrap();
    db.get()
        .await
        .unwrap()
        .batch_execute(
            "CREATE TABLE effects (n bigserial PRIMARY KEY, event_id uuid NOT NULL, note text)",
        )
        .await
        .unwrap();
    (test_db, db)
}

/// Rows in `effects` for `event_id`.
pub async fn effects(db: &ServiceDb, event_id: uuid::Uuid) -> i64 {
    db.get()
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FROM effects WHERE event_id = $1",
            &[&event_id],
        )
        .await
        .unwrap()
        .get(0)
}

/// Polls `condition` every 20 ms for up to 10 s; panics with `what` if it never holds.
pub async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if condition().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after 10 s waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The status code and body of `GET path` on `addr` (HTTP/1.1, one request per connection).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response: {text}"));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text}"));
    (code, body.to_owned())
}

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A TCP forwarder to the real broker on a port of our choosing, that can be started late,
/// can cut its connections, can go silent without closing them, and notes the AMQP methods
/// the clients send ([`Proxy::methods`]): a broker that is down,
/// comes up, drops connections, stops answering, or blocks publishers under an alarm.
pub struct Proxy {
    listener: JoinHandle<()>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    flow: watch::Sender<Flow>,
    methods: Arc<Mutex<Vec<Method>>>,
    freeze_at: Arc<Mutex<Option<Method>>>,
}

/// What the forwarder passes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Flow {
    /// Everything, both ways.
    Open,
    /// Nothing, either way, and the connections stay open: a partition or a hung broker.
    Silent,
    /// What RabbitMQ does under a memory or disk alarm: it sends `connection.blocked` with
    /// this reason and stops reading from the client, while still talking to it.
    Blocked(String),
}

impl Flow {
    fn upstream_open(&self) -> bool {
        *self == Flow::Open
    }

    fn downstream_open(&self) -> bool {
        *self != Flow::Silent
    }
}

/// An AMQP 0-9-1 method: (class id, method id).
pub type Method = (u16, u16);
/// `basic.consume`
pub const BASIC_CONSUME: Method = (60, 20);
/// `basic.cancel`
pub const BASIC_CANCEL: Method = (60, 30);
/// `basic.publish`
pub const BASIC_PUBLISH: Method = (60, 40);
/// `basic.ack`
pub const BASIC_ACK: Method = (60, 80);
/// `basic.reject`
pub const BASIC_REJECT: Method = (60, 90);
/// `basic.nack`
pub const BASIC_NACK: Method = (60, 120);

/// Reads the client's side of an AMQP connection: the 8-byte protocol header, then frames
/// (type, channel, size, payload, end octet); a method frame's payload starts with its class
/// and method ids.
#[derive(Default)]
struct MethodReader {
    header_seen: bool,
    buffer: Vec<u8>,
}

impl MethodReader {
    /// The methods whose frames `bytes` completed.
    fn feed(&mut self, bytes: &[u8]) -> Vec<Method> {
        let mut methods = Vec::new();
        self.buffer.extend_from_slice(bytes);
        if !self.header_seen {
            if self.buffer.len() < 8 {
                return methods;
            }
            self.buffer.drain(..8);
            self.header_seen = true;
        }
        while self.buffer.len() >= 7 {
            let size = u32::from_be_bytes(self.buffer[3..7].try_into().unwrap()) as usize;
            if self.buffer.len() < 8 + size {
                break;
            }
            if self.buffer[0] == 1 && size >= 4 {
                let class = u16::from_be_bytes([self.buffer[7], self.buffer[8]]);
                let method = u16::from_be_bytes([self.buffer[9], self.buffer[10]]);
                methods.push((class, method));
            }
            self.buffer.drain(..8 + size);
        }
        methods
    }
}

fn broker_address() -> String {
    let uri = lapin::uri::AMQPUri::from_str(&amqp_url()).unwrap();
    format!("{}:{}", uri.authority.host, uri.authority.port)
}

/// The test broker's URL with the host and port replaced.
pub fn url_via(port: u16) -> String {
    let uri = lapin::uri::AMQPUri::from_str(&amqp_url()).unwrap();
    let vhost = if uri.vhost == "/" {
        "%2f".to_owned()
    } else {
        uri.vhost.clone()
    };
    let user = &uri.authority.userinfo;
    format!(
        "amqp://{}:{}@127.0.0.1:{port}/{vhost}",
        user.username, user.password
    )
}

/// A port with nothing listening on it.
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A [`Proxy`] on a fresh port, and the broker's config as reached through it: the connection
/// a test freezes or cuts.
pub async fn proxied() -> (Proxy, AmqpConfig) {
    let port = closed_port();
    (Proxy::start(port).await, AmqpConfig::new(url_via(port)))
}

impl Proxy {
    pub async fn start(port: u16) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let tracked = connections.clone();
        let noted: Arc<Mutex<Vec<Method>>> = Arc::default();
        let methods = noted.clone();
        let freeze_later: Arc<Mutex<Option<Method>>> = Arc::default();
        let freeze_at = freeze_later.clone();
        let upstream = broker_address();
        let flow = watch::Sender::new(Flow::Open);
        let flows = flow.clone();
        let listener = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let flow = flows.subscribe();
                let recorder = Recorder {
                    methods: methods.clone(),
                    freeze_at: freeze_at.clone(),
                    flow: flows.clone(),
                };
                let forward = tokio::spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(&upstream).await {
                        forward(inbound, outbound, flow, recorder).await;
                    }
                });
                tracked.lock().unwrap().push(forward);
            }
        });
        Self {
            listener,
            connections,
            flow,
            methods: noted,
            freeze_at: freeze_later,
        }
    }

    /// Goes silent ([`Proxy::silence`]) as soon as a client sends `method`, before passing it on.
    pub fn freeze_at(&self, method: Method) {
        *self.freeze_at.lock().unwrap() = Some(method);
    }

    /// Forgets the method set with [`Proxy::freeze_at`] (a proxy already silent stays so).
    pub fn freeze_at_nothing(&self) {
        *self.freeze_at.lock().unwrap() = None;
    }

    /// The AMQP methods clients sent through this proxy so far, in order.
    pub fn methods(&self) -> Vec<Method> {
        self.methods.lock().unwrap().clone()
    }

    /// How many times clients sent `method`.
    pub fn sent(&self, method: Method) -> usize {
        self.methods().iter().filter(|m| **m == method).count()
    }

    /// Drops every forwarded connection (the relay sees its connection reset).
    pub fn cut(&self) {
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }

    /// Stops passing bytes either way, keeping the connections open: a broker gone silent.
    pub fn silence(&self) {
        self.flow.send_replace(Flow::Silent);
    }

    /// Sends the client `connection.blocked` with `reason` and stops passing what it sends,
    /// as RabbitMQ does under a memory or disk alarm.
    pub fn block(&self, reason: &str) {
        self.flow.send_replace(Flow::Blocked(reason.to_owned()));
    }

    /// Passes everything again; a blocked client is sent `connection.unblocked` first.
    pub fn resume(&self) {
        self.flow.send_replace(Flow::Open);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.listener.abort();
        self.cut();
    }
}

/// Notes the methods a client sends, and silences the proxy at the one asked for.
struct Recorder {
    methods: Arc<Mutex<Vec<Method>>>,
    freeze_at: Arc<Mutex<Option<Method>>>,
    flow: watch::Sender<Flow>,
}

impl Recorder {
    fn note(&self, reader: &mut MethodReader, bytes: &[u8]) {
        for method in reader.feed(bytes) {
            self.methods.lock().unwrap().push(method);
            if *self.freeze_at.lock().unwrap() == Some(method) {
                self.flow.send_replace(Flow::Silent);
            }
        }
    }
}

/// `connection.blocked` (class 10, method 60, a short-string reason) or, with `None`,
/// `connection.unblocked` (method 61): method frames on channel 0, as the broker sends them.
fn blocked_frame(reason: Option<&str>) -> Vec<u8> {
    let mut payload = vec![0, 10, 0, if reason.is_some() { 60 } else { 61 }];
    if let Some(reason) = reason {
        payload.push(u8::try_from(reason.len()).unwrap());
        payload.extend_from_slice(reason.as_bytes());
    }
    let mut frame = vec![1, 0, 0];
    frame.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(&payload);
    frame.push(0xCE);
    frame
}

/// Forwards one connection as `flow` allows until either side closes. The broker's side is
/// forwarded frame by frame, so that `connection.blocked` lands between two frames.
async fn forward(
    inbound: TcpStream,
    outbound: TcpStream,
    flow: watch::Receiver<Flow>,
    recorder: Recorder,
) {
    let (mut client_in, mut client_out) = inbound.into_split();
    let (mut broker_in, mut broker_out) = outbound.into_split();
    let mut up_flow = flow.clone();
    let upstream = async move {
        let mut reader = MethodReader::default();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if up_flow.wait_for(Flow::upstream_open).await.is_err() {
                return;
            }
            let n = match client_in.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            recorder.note(&mut reader, &buf[..n]);
            if up_flow.wait_for(Flow::upstream_open).await.is_err()
                || broker_out.write_all(&buf[..n]).await.is_err()
            {
                return;
            }
        }
    };
    let (frames_tx, mut frames_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    let read_frames = async move {
        loop {
            let mut header = [0u8; 7];
            if broker_in.read_exact(&mut header).await.is_err() {
                return;
            }
            let size = u32::from_be_bytes(header[3..7].try_into().unwrap()) as usize;
            let mut frame = header.to_vec();
            frame.resize(7 + size + 1, 0);
            if broker_in.read_exact(&mut frame[7..]).await.is_err()
                || frames_tx.send(frame).await.is_err()
            {
                return;
            }
        }
    };
    let mut down_flow = flow;
    let downstream = async move {
        let mut blocked = false;
        loop {
            tokio::select! {
                changed = down_flow.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let now = down_flow.borrow_and_update().clone();
                    let inject = match (&now, blocked) {
                        (Flow::Blocked(reason), false) => Some(blocked_frame(Some(reason))),
                        (Flow::Open, true) => Some(blocked_frame(None)),
                        _ => None,
                    };
                    blocked = matches!(now, Flow::Blocked(_));
                    if let Some(frame) = inject {
                        if client_out.write_all(&frame).await.is_err() {
                            return;
                        }
                    }
                }
                frame = frames_rx.recv() => {
                    let Some(frame) = frame else { return };
                    if down_flow.wait_for(Flow::downstream_open).await.is_err()
                        || client_out.write_all(&frame).await.is_err()
                    {
                        return;
                    }
                }
            }
        }
    };
    tokio::select! {
        _ = upstream => {}
        _ = async { tokio::join!(read_frames, downstream) } => {}
    }
}
