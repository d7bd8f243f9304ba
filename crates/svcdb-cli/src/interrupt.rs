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
use std::sync::Arc;

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
}

impl Signals {
    /// Starts watching SIGINT and SIGTERM on the current runtime.
    pub fn watch(json: bool) -> Self {
        let signals = Self {
            json,
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
        if self.token.is_cancelled() {
            // The command's own report will not come; with --json, stdout still holds one
            // object (a user trial found it empty).
            let failure = crate::failure::Failure::new(&anyhow::Error::new(Interrupted));
            if self.json {
                println!("{}", failure.json());
            }
            eprintln!("{}", failure.text());
            std::process::exit(i32::from(code));
        }
        self.code.store(code, Ordering::Relaxed);
        self.token.cancel();
        eprintln!("interrupted ({name}): stopping; send it again to exit at once");
    }
}

/// A command stopped by a signal before it finished (JSON code `interrupted`).
#[derive(Debug)]
pub struct Interrupted;

impl fmt::Display for Interrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("interrupted before the command finished")
    }
}

impl std::error::Error for Interrupted {}
