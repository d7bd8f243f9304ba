//! The deployment `shop demo` runs: every replica of every service is its own OS process
//! (`shop serve <service>`, configured from its environment as a container would be), and each
//! service has a front: a round-robin TCP forwarder on a fixed port, as a Kubernetes Service or
//! a load balancer would be, which is the only address anyone (shoppers, the orders service
//! calling the cart) uses. Replicas come and go behind it.
//!
//! Every child is started with `kill_on_drop` and, on Linux, dies with the demo
//! (`PR_SET_PDEATHSIG`), so no exit path of the demo (an error, a panic, Ctrl-C, even a
//! SIGKILL of the demo) leaves one running; [`Fleet::stop`] is the graceful way.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rand::seq::IndexedRandom;
use rand::Rng;
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use crate::client::ApiClient;
use crate::report::Scraped;

/// Longest wait for a replica's `/readyz` to say 200 (its migrations included), and for a
/// replica to stop gracefully.
const READY_WITHIN: Duration = Duration::from_secs(60);
const STOP_WITHIN: Duration = Duration::from_secs(30);
/// Lines of a replica's log shown when it fails to come up.
const LOG_TAIL: usize = 20;

/// How to start a replica of one service: its arguments after `shop serve <service>` and its
/// environment.
#[derive(Debug, Clone, Default)]
pub struct Spec {
    pub args: Vec<String>,
    pub env: Vec<(&'static str, String)>,
}

/// One running replica.
struct Replica {
    /// `orders#3`.
    name: String,
    service: &'static str,
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

/// The processes of a deployment and their fronts.
pub struct Fleet {
    exe: PathBuf,
    logs: tempfile::TempDir,
    specs: HashMap<&'static str, Spec>,
    fronts: HashMap<&'static str, Front>,
    replicas: Mutex<Vec<Replica>>,
    started: AtomicUsize,
    killed: AtomicU64,
    http: ApiClient,
    /// What each service's replicas' `/metrics` said just before they were stopped or killed.
    scraped: Mutex<HashMap<&'static str, Scraped>>,
    /// Services with a replica killed: what it handled after its last scrape is not counted.
    killed_services: Mutex<HashSet<&'static str>>,
}

impl Fleet {
    /// A fleet running this very binary (`shop serve`). Replicas' logs go to a temporary
    /// directory, removed with the fleet.
    pub fn new(http: ApiClient) -> anyhow::Result<Self> {
        Ok(Self {
            exe: std::env::current_exe().context("finding the shop binary to run services")?,
            logs: tempfile::Builder::new()
                .prefix("shop-demo-")
                .tempdir()
                .context("creating a directory for the replicas' logs")?,
            specs: HashMap::new(),
            fronts: HashMap::new(),
            replicas: Mutex::new(Vec::new()),
            started: AtomicUsize::new(0),
            killed: AtomicU64::new(0),
            http,
            scraped: Mutex::default(),
            killed_services: Mutex::default(),
        })
    }

    /// Opens `service`'s front and records how its replicas start. Returns the front's URL.
    pub async fn define(&mut self, service: &'static str, spec: Spec) -> anyhow::Result<String> {
        let front = Front::open().await?;
        let url = front.url();
        self.fronts.insert(service, front);
        self.specs.insert(service, spec);
        Ok(url)
    }

    /// The URL of `service`'s front (`http://127.0.0.1:<port>`).
    pub fn url(&self, service: &str) -> String {
        self.fronts[service].url()
    }

    /// Adds a variable to `service`'s environment, for replicas started from now on.
    pub fn set_env(&mut self, service: &str, key: &'static str, value: String) {
        if let Some(spec) = self.specs.get_mut(service) {
            spec.env.retain(|(k, _)| *k != key);
            spec.env.push((key, value));
        }
    }

    fn command(
        &self,
        service: &'static str,
        extra: &[&str],
        log: &Path,
    ) -> anyhow::Result<Command> {
        let spec = &self.specs[service];
        let out =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut command = Command::new(&self.exe);
        command
            .arg("serve")
            .arg(service)
            .args(["--listen", "127.0.0.1:0"])
            .args(&spec.args)
            .args(extra)
            .envs(spec.env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true);
        #[cfg(target_os = "linux")]
        // SAFETY: prctl is async-signal-safe, and this runs in the child between fork and exec.
        #[allow(unsafe_code)]
        unsafe {
            command.pre_exec(|| {
                // The child gets SIGKILL when the thread that started it exits: a runtime
                // worker, which lives as long as the demo. Nothing survives a demo that was
                // itself killed.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(command)
    }

    /// Starts one more replica of `service` (`--migrate`: a deploy that runs its migrations
    /// first, as every replica of a rolling deploy does) and waits until its `/readyz` says 200; then its
    /// front sends it connections. Returns its name.
    pub async fn start(&self, service: &'static str) -> anyhow::Result<String> {
        let n = self.started.fetch_add(1, Ordering::Relaxed) + 1;
        let name = format!("{service}#{n}");
        let log = self.logs.path().join(format!("{service}-{n}.log"));
        let mut child = self
            .command(service, &["--migrate"], &log)?
            .spawn()
            .with_context(|| format!("starting replica {name}"))?;
        let addr = match self.wait_ready(&name, &mut child, &log).await {
            Ok(addr) => addr,
            Err(e) => {
                let _ = child.kill().await;
                return Err(e);
            }
        };
        self.fronts[service].add(addr);
        lock(&self.replicas).push(Replica {
            name: name.clone(),
            service,
            child,
            addr,
            log,
        });
        Ok(name)
    }

    /// Runs `shop serve <service> <extra>` as a deploy would, expecting it to exit on its own
    /// (bounded); its exit status and log.
    pub async fn run_to_exit(
        &self,
        service: &'static str,
        extra: &[&str],
    ) -> anyhow::Result<(ExitStatus, String)> {
        let log = self.logs.path().join(format!("{service}-once.log"));
        let mut child = self.command(service, extra, &log)?.spawn()?;
        match tokio::time::timeout(READY_WITHIN, child.wait()).await {
            Ok(status) => Ok((status?, std::fs::read_to_string(&log).unwrap_or_default())),
            Err(_) => {
                let _ = child.kill().await;
                bail!(
                    "shop serve {service} {} was expected to exit and kept running\n{}",
                    extra.join(" "),
                    tail(&log)
                )
            }
        }
    }

    async fn wait_ready(
        &self,
        name: &str,
        child: &mut Child,
        log: &Path,
    ) -> anyhow::Result<SocketAddr> {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "replica {name} exited ({status}) before it was ready\n{}",
                    tail(log)
                );
            }
            if let Some(addr) = serving_address(log) {
                let readyz = self.http.get(&format!("http://{addr}/readyz")).await;
                if matches!(readyz, Ok(r) if r.status.is_success()) {
                    return Ok(addr);
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "replica {name} did not become ready within {} s\n{}\n  hint: RUST_LOG=info shows more of what it did",
                    READY_WITHIN.as_secs(),
                    tail(log)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends SIGKILL to a random replica of `service` (no shutdown, no last ack: a crash),
    /// then starts a new one. Returns (killed, started).
    pub async fn kill_one(
        &self,
        service: &'static str,
        rng: &mut impl Rng,
    ) -> anyhow::Result<(String, String)> {
        let victim = {
            let mut replicas = lock(&self.replicas);
            let candidates: Vec<usize> = (0..replicas.len())
                .filter(|&i| replicas[i].service == service)
                .collect();
            let Some(&index) = candidates.choose(rng) else {
                bail!("no replica of {service} to kill");
            };
            replicas.remove(index)
        };
        let Replica {
            name,
            mut child,
            addr,
            ..
        } = victim;
        self.fronts[service].remove(addr);
        self.scrape(service, addr).await;
        lock(&self.killed_services).insert(service);
        child.start_kill().context("SIGKILL")?;
        let _ = child.wait().await;
        self.killed.fetch_add(1, Ordering::Relaxed);
        let started = self.start(service).await?;
        Ok((name, started))
    }

    /// Adds what the replica at `addr` reports on `/metrics` to `service`'s counts; a replica
    /// that does not answer adds nothing (the check against the databases then fails).
    async fn scrape(&self, service: &'static str, addr: SocketAddr) {
        match self.http.get(&format!("http://{addr}/metrics")).await {
            Ok(response) if response.status.is_success() => {
                let counts = Scraped::parse(&String::from_utf8_lossy(&response.body));
                lock(&self.scraped).entry(service).or_default().add(counts);
            }
            Ok(response) => tracing::warn!(%addr, status = %response.status, "GET /metrics failed"),
            Err(e) => tracing::warn!(%addr, error = %e, "GET /metrics failed"),
        }
    }

    /// Each service's consumer counts, summed over the replicas stopped or killed so far (as
    /// their `/metrics` said just before).
    pub fn scraped(&self) -> HashMap<&'static str, Scraped> {
        lock(&self.scraped).clone()
    }

    /// Services that lost a replica to SIGKILL (their scraped counts may fall short).
    pub fn killed_services(&self) -> HashSet<&'static str> {
        lock(&self.killed_services).clone()
    }

    /// Replicas killed so far.
    pub fn killed(&self) -> u64 {
        self.killed.load(Ordering::Relaxed)
    }

    /// A replica that exited on its own (none should): its name, status and log tail.
    pub fn exited(&self) -> Option<String> {
        let mut replicas = lock(&self.replicas);
        for replica in replicas.iter_mut() {
            if let Ok(Some(status)) = replica.child.try_wait() {
                return Some(format!(
                    "replica {} exited on its own ({status})\n{}",
                    replica.name,
                    tail(&replica.log)
                ));
            }
        }
        None
    }

    /// Stops every replica gracefully (SIGTERM: they stop taking requests and messages,
    /// finish and acknowledge what is in flight, and exit), SIGKILL for any that does not
    /// within 30 s. Returns the replicas that did not exit cleanly.
    pub async fn stop(&self) -> Vec<String> {
        let replicas: Vec<Replica> = lock(&self.replicas).drain(..).collect();
        for front in self.fronts.values() {
            front.clear();
        }
        let stops = replicas.into_iter().map(|mut replica| async move {
            // Settled by now: nothing is handled between this scrape and the exit.
            self.scrape(replica.service, replica.addr).await;
            if let Some(pid) = replica.child.id() {
                // SAFETY: kill(2) on our own child's pid, which it keeps until we wait for it.
                #[allow(unsafe_code)]
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGTERM);
                }
            }
            match tokio::time::timeout(STOP_WITHIN, replica.child.wait()).await {
                Ok(Ok(status)) if status.success() => None,
                Ok(Ok(status)) => Some(format!("{} exited with {status}", replica.name)),
                Ok(Err(e)) => Some(format!("{}: {e}", replica.name)),
                Err(_) => {
                    let _ = replica.child.kill().await;
                    Some(format!(
                        "{} did not stop within {} s and was killed",
                        replica.name,
                        STOP_WITHIN.as_secs()
                    ))
                }
            }
        });
        futures_util::future::join_all(stops)
            .await
            .into_iter()
            .flatten()
            .collect()
    }
}

/// The address a replica's log says it serves on (`…; serving http://127.0.0.1:PORT …`).
fn serving_address(log: &Path) -> Option<SocketAddr> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines().find_map(|line| {
        let rest = line.split("serving http://").nth(1)?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The last lines of a log, indented, for an error message.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(LOG_TAIL);
    if lines.is_empty() {
        return "  its log is empty".into();
    }
    format!(
        "  its log ({}) ends with:\n{}",
        log.display(),
        lines[start..]
            .iter()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    )
}

/// A service's front: accepts on a fixed port and forwards each connection to the next
/// replica, round robin.
struct Front {
    port: u16,
    backends: Arc<Mutex<Vec<SocketAddr>>>,
    listener: JoinHandle<()>,
}

impl Front {
    async fn open() -> anyhow::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let port = listener.local_addr()?.port();
        let backends: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
        let shared = backends.clone();
        let next = Arc::new(AtomicUsize::new(0));
        let listener = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let (backends, next) = (shared.clone(), next.clone());
                tokio::spawn(async move {
                    // A replica that just died refuses the connection: try the others.
                    let candidates = lock(&backends).clone();
                    let start = next.fetch_add(1, Ordering::Relaxed);
                    for i in 0..candidates.len() {
                        let addr = candidates[(start + i) % candidates.len()];
                        if let Ok(mut outbound) = TcpStream::connect(addr).await {
                            let _ = inbound.set_nodelay(true);
                            let _ = outbound.set_nodelay(true);
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                            return;
                        }
                    }
                });
            }
        });
        Ok(Self {
            port,
            backends,
            listener,
        })
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn add(&self, addr: SocketAddr) {
        lock(&self.backends).push(addr);
    }

    fn remove(&self, addr: SocketAddr) {
        lock(&self.backends).retain(|a| *a != addr);
    }

    fn clear(&self) {
        lock(&self.backends).clear();
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
