//! Ctrl-C and SIGTERM (a pod being stopped): the first asks the running command to stop, the
//! second exits at once.
//!
//! A migration command stops the way a failure stops it: the statement running on the server
//! is cancelled there, a transaction rolls back, a non-transactional migration stopped in its
//! first statement stays pending (one stopped later is marked dirty), and the command reports
//! what happened, as text and with `--json` as JSON, before exiting 130 (Ctrl-C) or 143
//! (SIGTERM). Other commands only read: they stop where they are.

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::output::{errln, outln};
use tokio_util::sync::CancellationToken;

/// The interrupt a command watches, and the exit code of the signal that set it.
#[derive(Clone, Default)]
pub struct Signals {
    /// Cancelled by the first signal.
    pub token: CancellationToken,
    /// 0 until a signal came; then 130 (SIGINT) or 143 (SIGTERM), as the shell reports them.
    code: Arc<AtomicU8>,
    /// `--json`: the second signal's exit still prints one JSON object.
    json: bool,
    /// The command migrates: the second signal's exit says what the server does next.
    migrating: bool,
    /// When the first signal came.
    first: Arc<OnceLock<Instant>>,
}

/// A signal this soon after the first is the same one delivered twice, not a second: GNU
/// `timeout` (and a shell killing a job) signals the process and then its whole process group,
/// which holds the process too. A person pressing Ctrl-C twice takes longer.
const SAME_SIGNAL_WITHIN: Duration = Duration::from_millis(100);

impl Signals {
    /// Starts watching SIGINT and SIGTERM on the current runtime, for a command that
    /// `migrating` or not.
    pub fn watch(json: bool, migrating: bool) -> Self {
        let signals = Self {
            json,
            migrating,
            ..Self::default()
        };
        tokio::spawn(signals.clone().run());
        signals
    }

    /// The exit code of the signal that came, if one did.
    pub fn code(&self) -> Option<u8> {
        Some(self.code.load(Ordering::Relaxed)).filter(|&c| c != 0)
    }

    async fn run(self) {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut int), Ok(mut term)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                return;
            };
            loop {
                let (code, name) = tokio::select! {
                    _ = int.recv() => (130, "Ctrl-C"),
                    _ = term.recv() => (143, "SIGTERM"),
                };
                self.received(code, name);
            }
        }
        #[cfg(not(unix))]
        while tokio::signal::ctrl_c().await.is_ok() {
            self.received(130, "Ctrl-C");
        }
    }

    fn received(&self, code: u8, name: &str) {
        let first = *self.first.get_or_init(Instant::now);
        if self.token.is_cancelled() {
            if first.elapsed() < SAME_SIGNAL_WITHIN {
                // Found by a user trial: `timeout -s INT` exited at once, as a second signal
                // does, and left the migration's statement running on the server.
                return;
            }
            // The command's own report will not come; with --json, stdout still holds one
            // object (a user trial found it empty).
            let interrupted = Interrupted {
                migrating: self.migrating,
            };
            let failure = crate::failure::Failure::new(&anyhow::Error::new(interrupted));
            if self.json {
                outln!("{}", failure.json());
            }
            errln!("{}", failure.text());
            std::process::exit(i32::from(code));
        }
        self.code.store(code, Ordering::Relaxed);
        self.token.cancel();
        errln!("interrupted ({name}): stopping; send it again to exit at once");
    }
}

/// A command stopped by a signal before it finished (JSON code `interrupted`).
#[derive(Debug, Default)]
pub struct Interrupted {
    /// It was running migrations, which a second signal leaves to the server to stop.
    pub migrating: bool,
}

impl fmt::Display for Interrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("interrupted before the command finished")?;
        if self.migrating {
            // The runner's session sets client_connection_check_interval (PostgreSQL 14+).
            f.write_str("\n  hint: the server notices the closed connection within about a second and ends the migration's session: what ran in a transaction is rolled back, and a non-transactional migration stopped part-way is left dirty; `svcdb migrate status` says where it stopped")?;
        }
        Ok(())
    }
}

impl std::error::Error for Interrupted {}
