//! A TCP forwarder to the test server, for faults the server itself will not produce: it counts
//! the connections it accepts (how many attempts a pool made) and can freeze its connections
//! (a socket that stays open while nothing passes, as after a network partition).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use svcdb::testing::TestDb;
use svcdb::{Config, Ident};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_postgres::config::Host;

/// Forwards a port on 127.0.0.1 to the test server.
pub struct Forwarder {
    port: u16,
    accepted: Arc<AtomicUsize>,
    /// One per forwarded connection: notified to freeze it.
    freezes: Arc<Mutex<Vec<Arc<Notify>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Forwarder {
    /// Starts forwarding to the server `db` lives on.
    pub async fn to(db: &TestDb) -> Self {
        let pg = db.connection();
        let host = match pg.get_hosts().first() {
            Some(Host::Tcp(host)) => host.clone(),
            other => panic!("the test server is reached over TCP, not {other:?}"),
        };
        let port = pg.get_ports().first().copied().unwrap_or(5432);
        let upstream: SocketAddr = tokio::net::lookup_host((host.as_str(), port))
            .await
            .unwrap()
            .next()
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let freezes: Arc<Mutex<Vec<Arc<Notify>>>> = Arc::default();
        let task = {
            let accepted = accepted.clone();
            let freezes = freezes.clone();
            tokio::spawn(async move {
                let mut links = tokio::task::JoinSet::new();
                while let Ok((mut inbound, _)) = listener.accept().await {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let freeze = Arc::new(Notify::new());
                    freezes.lock().unwrap().push(freeze.clone());
                    links.spawn(async move {
                        let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                            // Frozen: both sockets stay open, nothing passes either way.
                            () = freeze.notified() => std::future::pending().await,
                        }
                    });
                }
            })
        };
        Self {
            port,
            accepted,
            freezes,
            task,
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Stops every connection forwarded so far, leaving its sockets open; later connections
    /// pass as usual.
    pub fn freeze(&self) {
        for freeze in self.freezes.lock().unwrap().drain(..) {
            freeze.notify_one();
        }
    }

    /// A service configuration for `db` as `user` (with the admin's password, if any), through
    /// this forwarder, to database `dbname`; otherwise as [`TestDb::config`].
    pub fn config(&self, db: &TestDb, user: &str, dbname: &str, schema: &str) -> Config {
        let admin = db.connection();
        let mut pg = tokio_postgres::Config::new();
        pg.host("127.0.0.1")
            .port(self.port)
            .user(user)
            .dbname(dbname);
        if let Some(password) = admin.get_password() {
            pg.password(password);
        }
        let mut config = Config::with_connection(pg, Ident::new("schema", schema).unwrap());
        config.pool_min = 1;
        config.pool_max = 5;
        config
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}
