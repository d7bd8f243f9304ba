//! Logs and traces for a service: one call at the top of `main`.
//!
//! ```no_run
//! # fn main() -> Result<(), svcdb_amqp::telemetry::TelemetryError> {
//! // Keep the guard until the end of main: dropping it flushes the spans not yet exported.
//! let _telemetry = svcdb_amqp::telemetry::init("orders", "info,tokio_postgres=warn")?;
//! # Ok(()) }
//! ```
//!
//! | variable | effect |
//! |---|---|
//! | `RUST_LOG` | which log lines are written ([`EnvFilter`] syntax, `info,svcdb_amqp=debug`); unset, the `default_filter` given to [`init`]; invalid, [`init`] fails saying why |
//! | `SVCDB_LOG_FORMAT` | `text` (the default): human-readable lines, naming the spans they are in without their dotted semantic-convention attributes; `json`: one JSON object per line, with the fields of the event and of every span it is in (the consumer's `process` and `handle` spans name the queue, the event id and its kind); anything else: [`init`] fails ([`TelemetryError::LogFormat`]) |
//! | `OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` | with the feature `otlp`: export spans over OTLP (HTTP/protobuf, plain `http://`) to that collector, batched in the background; the exporter's other standard variables apply (`OTEL_EXPORTER_OTLP_HEADERS`, `…_TIMEOUT`); `OTEL_SERVICE_NAME` overrides the service's name. Without either endpoint variable nothing is exported |
//!
//! Logs go to stderr, leaving stdout to the program, in colours only when it is a terminal. Without the feature `otlp` (the default)
//! the OpenTelemetry SDK and the exporter are not compiled, no OpenTelemetry layer is
//! installed, and spans have no trace ids: the `traceparent` of [`svcdb::trace`] is then not
//! stored nor sent. With it, spans at `INFO` and above of every crate are exported whatever
//! `RUST_LOG` says (it filters the log lines only), and each carries its trace across the
//! broker: one order is one trace through every service it reaches.

use std::fmt;
use std::io::IsTerminal;
use std::str::FromStr;

use tracing::field::{Field, Visit};
use tracing::Subscriber;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FormatFields, FormattedFields, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The variable that selects the log format ([`LogFormat`]).
pub const LOG_FORMAT_ENV: &str = "SVCDB_LOG_FORMAT";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines (`SVCDB_LOG_FORMAT=text`, or unset). The spans a line is in are
    /// shown by name, with their plain fields (`trace_id`) but not their dotted semantic
    /// convention attributes (`messaging.destination.name`, …): those are for traces and
    /// JSON, and would bury the message.
    #[default]
    Text,
    /// One JSON object per line, with the current span and the list of spans it is in
    /// (`SVCDB_LOG_FORMAT=json`).
    Json,
}

impl LogFormat {
    /// The format `SVCDB_LOG_FORMAT` selects; [`LogFormat::Text`] when it is unset or empty.
    pub fn from_env() -> Result<Self, TelemetryError> {
        match std::env::var(LOG_FORMAT_ENV) {
            Ok(value) if value.trim().is_empty() => Ok(Self::default()),
            Ok(value) => value.parse(),
            Err(std::env::VarError::NotPresent) => Ok(Self::default()),
            Err(std::env::VarError::NotUnicode(value)) => Err(TelemetryError::LogFormat {
                value: value.to_string_lossy().into_owned(),
            }),
        }
    }

    /// The log layer of this format, writing to `writer` (the current span and its parents
    /// with each JSON line); text in colours with `ansi` (for a terminal).
    pub fn layer<S, W>(self, writer: W, ansi: bool) -> Box<dyn Layer<S> + Send + Sync>
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
        W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
    {
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_ansi(ansi);
        match self {
            Self::Text => layer.fmt_fields(PlainFields).boxed(),
            Self::Json => layer.json().flatten_event(true).boxed(),
        }
    }
}

/// The text format's fields: `name=value` as tracing's default, leaving out dotted names (the
/// semantic conventions' attributes) so that a line inside a delivery stays readable.
struct PlainFields;

impl<'writer> FormatFields<'writer> for PlainFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut visitor = PlainVisitor {
            writer: &mut writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }

    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        // Only a separator when something is added: recording a dotted field adds nothing.
        let mut added = String::new();
        self.format_fields(Writer::new(&mut added), fields)?;
        if !added.is_empty() {
            if !current.fields.is_empty() {
                current.fields.push(' ');
            }
            current.fields.push_str(&added);
        }
        Ok(())
    }
}

struct PlainVisitor<'a, 'writer> {
    writer: &'a mut Writer<'writer>,
    first: bool,
    result: fmt::Result,
}

impl Visit for PlainVisitor<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let name = field.name();
        if self.result.is_err() || name.contains('.') {
            return;
        }
        let separator = if self.first { "" } else { " " };
        self.first = false;
        self.result = if name == "message" {
            write!(self.writer, "{separator}{value:?}")
        } else {
            write!(self.writer, "{separator}{name}={value:?}")
        };
    }
}

impl FromStr for LogFormat {
    type Err = TelemetryError;

    /// `text` or `json`, in any case.
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            _ => Err(TelemetryError::LogFormat {
                value: value.to_owned(),
            }),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Text => "text",
            Self::Json => "json",
        })
    }
}

/// Why [`init`] could not set up logs and traces.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TelemetryError {
    /// `SVCDB_LOG_FORMAT` is neither `text` nor `json`.
    #[error("invalid {LOG_FORMAT_ENV} {value:?}\n  hint: use \"text\" (the default) or \"json\"")]
    LogFormat {
        /// The value given.
        value: String,
    },
    /// `RUST_LOG` is not a valid filter.
    #[error("invalid RUST_LOG {value:?}: {reason}\n  hint: write directives such as \"info,svcdb_amqp=debug\"")]
    Filter {
        /// The value given.
        value: String,
        /// The parser's reason.
        reason: String,
    },
    /// A global subscriber was installed before.
    #[error("a tracing subscriber is already installed: {0}\n  hint: call svcdb_amqp::telemetry::init once, at the top of main")]
    AlreadyInstalled(String),
    /// The OTLP exporter could not be built from its variables.
    #[cfg(feature = "otlp")]
    #[error("cannot export spans over OTLP: {0}\n  hint: check OTEL_EXPORTER_OTLP_ENDPOINT (an http:// URL of the collector) and the other OTEL_EXPORTER_OTLP_* variables")]
    Otlp(String),
}

impl TelemetryError {
    /// True when `SVCDB_LOG_FORMAT` is invalid.
    pub fn is_log_format(&self) -> bool {
        matches!(self, Self::LogFormat { .. })
    }

    /// True when `RUST_LOG` is invalid.
    pub fn is_filter(&self) -> bool {
        matches!(self, Self::Filter { .. })
    }
}

/// Keeps the span exporter (feature `otlp`) running; dropping it flushes the spans not yet
/// exported and stops it. Keep it until the end of `main`.
#[must_use = "dropping the guard stops exporting spans"]
pub struct TelemetryGuard {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl fmt::Debug for TelemetryGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TelemetryGuard").finish_non_exhaustive()
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        #[cfg(feature = "otlp")]
        if let Some(provider) = self.provider.take() {
            if let Err(e) = provider.shutdown() {
                eprintln!("warning: flushing the last spans failed: {e}");
            }
        }
    }
}

/// Log targets kept quieter than the filter asks unless it names them, for what they would
/// write: lapin's returned messages, each dumped whole at warn with its payload (customer
/// data: found by a user trial, 2 KB a line on every retry; the relay reports the return
/// itself, with the event's id), and tokio-postgres's statements and their parameters at
/// debug (`ALTER ROLE … PASSWORD` carries a SCRAM verifier).
const QUIETED: [(&str, &str); 2] = [
    ("lapin::returned_messages", "error"),
    ("tokio_postgres", "info"),
];

/// `filter`, written as `written` (the `RUST_LOG` text), with the log targets that would
/// leak data kept quieter unless `written` names them: lapin's returned messages at error,
/// tokio-postgres at info (its statements carry secrets). [`init`] applies it; so does a program that
/// builds its own filter (the `svcdb` CLI).
pub fn quiet_leaky_targets(mut filter: EnvFilter, written: &str) -> EnvFilter {
    for (target, level) in QUIETED {
        if !written.contains(target) {
            let directive = format!("{target}={level}")
                .parse()
                .expect("QUIETED holds valid directives");
            filter = filter.add_directive(directive);
        }
    }
    filter
}

/// The log filter: `rust_log` (`RUST_LOG`) when set, `default_filter` otherwise, with the
/// [`QUIETED`] targets it does not name kept quieter.
fn filter(rust_log: Option<String>, default_filter: &str) -> Result<EnvFilter, TelemetryError> {
    let value = match rust_log {
        Some(value) if !value.trim().is_empty() => value,
        _ => default_filter.to_owned(),
    };
    let filter = EnvFilter::try_new(&value).map_err(|e| TelemetryError::Filter {
        value: value.clone(),
        reason: e.to_string(),
    })?;
    Ok(quiet_leaky_targets(filter, &value))
}

/// Installs the global subscriber of service `service`: log lines to stderr, filtered by
/// `RUST_LOG` (or `default_filter` when unset) in the format of `SVCDB_LOG_FORMAT`, and with
/// the feature `otlp`, spans exported over OTLP when an endpoint is configured (see the
/// [module documentation](self)). Fails on an invalid variable, naming it, and when a
/// subscriber is installed already.
pub fn init(service: &str, default_filter: &str) -> Result<TelemetryGuard, TelemetryError> {
    let format = LogFormat::from_env()?;
    let ansi = std::io::stderr().is_terminal();
    let logs = format.layer(std::io::stderr, ansi).with_filter(filter(
        std::env::var(EnvFilter::DEFAULT_ENV).ok(),
        default_filter,
    )?);
    #[cfg(feature = "otlp")]
    let (traces, provider) = match otlp::provider(service)? {
        Some(provider) => (Some(otlp::layer(&provider, service)), Some(provider)),
        None => (None, None),
    };
    #[cfg(not(feature = "otlp"))]
    let (traces, _) = (None::<tracing_subscriber::layer::Identity>, service);
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()
        .map_err(|e| TelemetryError::AlreadyInstalled(e.to_string()))?;
    Ok(TelemetryGuard {
        #[cfg(feature = "otlp")]
        provider,
    })
}

/// The OTLP exporter (feature `otlp`).
#[cfg(feature = "otlp")]
mod otlp {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use opentelemetry_sdk::Resource;
    use tracing::Subscriber;
    use tracing_subscriber::filter::LevelFilter;
    use tracing_subscriber::registry::LookupSpan;
    use tracing_subscriber::Layer;

    use super::TelemetryError;

    /// The endpoint variables; without one, nothing is exported.
    const ENDPOINTS: [&str; 2] = [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ];

    /// A tracer provider exporting in batches to the configured endpoint, or `None` when no
    /// endpoint is configured.
    pub(super) fn provider(service: &str) -> Result<Option<SdkTracerProvider>, TelemetryError> {
        if !ENDPOINTS
            .iter()
            .any(|key| std::env::var_os(key).is_some_and(|v| !v.is_empty()))
        {
            return Ok(None);
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
            .map_err(|e| TelemetryError::Otlp(e.to_string()))?;
        // The builder reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; the service's own
        // name only when they do not give one.
        let mut resource = Resource::builder();
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name(service.to_owned());
        }
        Ok(Some(
            SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource.build())
                .build(),
        ))
    }

    /// The layer turning `tracing` spans at `INFO` and above into OpenTelemetry spans of
    /// `provider`.
    pub(super) fn layer<S>(
        provider: &SdkTracerProvider,
        service: &str,
    ) -> Box<dyn Layer<S> + Send + Sync>
    where
        S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
    {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(service.to_owned()))
            .with_filter(LevelFilter::INFO)
            .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_format_is_text_or_json_in_any_case() {
        assert_eq!("text".parse::<LogFormat>().unwrap(), LogFormat::Text);
        assert_eq!("JSON".parse::<LogFormat>().unwrap(), LogFormat::Json);
        assert_eq!(" json ".parse::<LogFormat>().unwrap(), LogFormat::Json);
        for format in [LogFormat::Text, LogFormat::Json] {
            assert_eq!(format.to_string().parse::<LogFormat>().unwrap(), format);
        }
    }

    #[test]
    fn an_unknown_log_format_is_refused_naming_the_variable_and_the_choices() {
        let e = "yaml".parse::<LogFormat>().unwrap_err();
        assert!(e.is_log_format());
        let shown = e.to_string();
        assert!(
            shown.contains("SVCDB_LOG_FORMAT") && shown.contains("\"yaml\""),
            "{shown}"
        );
        assert!(shown.contains("\"json\""), "{shown}");
    }

    /// Found by a user trial: lapin logged each returned message whole (customer data) at
    /// warn, and tokio-postgres each statement (a SCRAM verifier) at debug. Kept quieter,
    /// unless RUST_LOG names them (the control).
    #[test]
    fn what_leaks_data_is_kept_quieter_unless_named() {
        let shown = filter(Some("debug".into()), "info").unwrap().to_string();
        assert!(
            shown.contains("lapin::returned_messages=error")
                && shown.contains("tokio_postgres=info"),
            "{shown}"
        );
        let shown = filter(Some("debug,tokio_postgres=trace".into()), "info")
            .unwrap()
            .to_string();
        assert!(!shown.contains("tokio_postgres=info"), "{shown}");
    }

    #[test]
    fn rust_log_wins_over_the_default_filter_and_an_invalid_one_is_refused() {
        assert!(filter(None, "info,svcdb_amqp=debug").is_ok());
        assert!(filter(Some(" ".into()), "info").is_ok());
        let e = filter(Some("info,svcdb_amqp=loud".into()), "info").unwrap_err();
        assert!(e.is_filter());
        assert!(
            e.to_string().contains("RUST_LOG \"info,svcdb_amqp=loud\""),
            "{e}"
        );
        // The control: the default filter is used when RUST_LOG is unset, and checked too.
        assert!(filter(None, "info,svcdb_amqp=loud")
            .unwrap_err()
            .is_filter());
    }
}
