//! `svcdb health`: the report `/readyz` serves, from the command line.

use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;

use super::args::{outcome, GateArgs};
use crate::global::Global;
use crate::{output, Outcome};

/// Options of `svcdb health`: the gate's (see `svcdb schema verify`), and the broker.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    gate: GateArgs,

    /// The service's RabbitMQ (`amqp://user:password@host:port/vhost`): when given, the report
    /// also says whether it answers (`broker`), as a running service's `/readyz` does. A
    /// broker that does not answer is reported, and is not "not ready": requests keep working
    /// and their events wait in the outbox.
    #[arg(long, env = "AMQP_URL", hide_env_values = true)]
    amqp_url: Option<String>,
}

/// Whether the broker answered, as `svcdb health` reports it.
#[derive(Debug, Serialize)]
struct Broker {
    /// The broker's URL, without the password.
    url: String,
    /// True when a connection opened within the timeout.
    connected: bool,
    /// How long opening it took, in milliseconds; `null` when it did not open.
    latency_ms: Option<f64>,
    /// Why it did not open.
    error: Option<String>,
    /// What to do about it, apart from the error (found by a user trial: the hint was inside
    /// `error`, after a line break).
    hint: Option<String>,
}

/// Prints the health report; exit 0 when ready, 1 when not (the database unreachable, or a
/// problem of the gate). Never waits longer than `--timeout`.
pub async fn run(global: &Global, args: Args) -> Result<Outcome> {
    let (db, gate) = args.gate.prepare(global)?;
    let amqp = match super::args::amqp_url(args.amqp_url) {
        Some(url) => {
            let config = svcdb_amqp::AmqpConfig::new(url).with_connection_name("svcdb health");
            config.validate()?;
            Some(config)
        }
        None => None,
    };
    let (report, broker) = tokio::join!(db.health(&gate), async {
        match &amqp {
            Some(config) => Some(broker(config, args.gate.timeout()).await),
            None => None,
        }
    });
    let mut json = serde_json::to_value(&report)?;
    if let Some(broker) = &broker {
        json["broker"] = serde_json::to_value(broker)?;
    }
    output::report(global.json, &json, |_| {
        let mut text = crate::wording::for_cli(&report.to_string());
        if let Some(b) = &broker {
            text.push_str(&match (b.latency_ms, &b.error) {
                (Some(ms), _) => format!("\nbroker {}: reachable in {ms:.1} ms", b.url),
                (None, error) => format!(
                    "\nbroker {}: unreachable (requests still work; their events wait in the outbox): {}{}",
                    b.url,
                    error.as_deref().unwrap_or("no answer"),
                    b.hint
                        .as_deref()
                        .map(|h| format!("\n  hint: {}", h.replace('\n', "\n  hint: ")))
                        .unwrap_or_default()
                ),
            });
        }
        text
    })?;
    Ok(outcome(report.gate.ready))
}

/// Opens (and closes) one connection to the broker, within `timeout`.
async fn broker(config: &svcdb_amqp::AmqpConfig, timeout: Duration) -> Broker {
    let started = Instant::now();
    let outcome = tokio::time::timeout(timeout, config.connect()).await;
    let (latency_ms, error, hint) = match outcome {
        Ok(Ok(connection)) => {
            let took = started.elapsed();
            let _ = tokio::time::timeout(timeout, connection.close(200, "OK".into())).await;
            (Some(took.as_secs_f64() * 1e3), None, None)
        }
        Ok(Err(e)) => {
            let report = svcdb::error::Report::new(&e);
            let hints = report.hints();
            (
                None,
                Some(report.message().to_owned()),
                (!hints.is_empty()).then(|| hints.join("\n")),
            )
        }
        Err(_) => (None, Some(format!("no answer within {timeout:?}")), None),
    };
    Broker {
        url: config.redacted_url(),
        connected: latency_ms.is_some(),
        latency_ms,
        error,
        hint,
    }
}
