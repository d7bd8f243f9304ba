//! Trace context across the broker: the W3C [`TraceParent`] of the current `tracing` span,
//! stored with an outbox row by [`outbox::enqueue`](crate::outbox::enqueue), sent by
//! svcdb-amqp's relay as the AMQP header `traceparent`, and continued by the consumer's
//! handler span, so that one order is one trace across the services it passes through.
//!
//! svcdb's spans (and svcdb-amqp's) are `tracing` spans. A span has an OpenTelemetry span
//! context, with a trace id, only when an OpenTelemetry layer is installed in the subscriber
//! (`tracing_opentelemetry::layer()`; svcdb-amqp's `telemetry::init` installs one with its
//! feature `otlp`). This module reads and sets that context, with the OpenTelemetry API alone
//! (no SDK, no exporter):
//!
//! * [`current`] is the current span's traceparent; [`continue_trace`] makes a span the child
//!   of a remote one.
//! * **Without an OpenTelemetry layer**, spans have no trace ids: [`current`] is `None`, so
//!   `enqueue` stores `NULL`, the relay sends no header for that row, and a consumer's span
//!   continues nothing. No id is made up: an id that no exporter records joins nothing, and
//!   it would cost a random number per event for nothing. A row whose producer did have a
//!   trace keeps its traceparent through a relay without the layer: the relay sends the
//!   stored value as it is.
//! * Only `traceparent` travels, not `tracestate` (vendor data svcdb does not produce).
//!
//! ```
//! use svcdb::trace::TraceParent;
//!
//! let parent: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse()?;
//! assert_eq!(format!("{:032x}", parent.trace_id()), "4bf92f3577b34da6a3ce929d0e0e4736");
//! assert!(parent.is_sampled());
//! assert!("00-00000000000000000000000000000000-00f067aa0ba902b7-01".parse::<TraceParent>().is_err());
//! # Ok::<(), svcdb::trace::TraceParentError>(())
//! ```

use std::fmt;
use std::str::FromStr;

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::pool::ServiceDb;

/// The AMQP header (and HTTP header) that carries the [`TraceParent`].
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// The length of a version `00` traceparent: `00-` + 32 + `-` + 16 + `-` + 2.
const LEN: usize = 55;

/// A W3C Trace Context `traceparent`: which trace a span belongs to and which span is its
/// parent. Parsed strictly ([`FromStr`]); shown in the version `00` form (`Display`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    trace_id: u128,
    span_id: u64,
    flags: u8,
}

impl TraceParent {
    /// The trace's id (never 0).
    pub fn trace_id(&self) -> u128 {
        self.trace_id
    }

    /// The parent span's id (never 0).
    pub fn span_id(&self) -> u64 {
        self.span_id
    }

    /// The trace flags; bit 0 is "sampled".
    pub fn flags(&self) -> u8 {
        self.flags
    }

    /// True when the producer recorded its span (the `sampled` flag).
    pub fn is_sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The traceparent of an OpenTelemetry span context, if it is valid.
    fn of_context(context: &SpanContext) -> Option<Self> {
        context.is_valid().then(|| Self {
            trace_id: u128::from_be_bytes(context.trace_id().to_bytes()),
            span_id: u64::from_be_bytes(context.span_id().to_bytes()),
            flags: context.trace_flags().to_u8(),
        })
    }

    /// As a remote OpenTelemetry span context.
    fn to_context(self) -> SpanContext {
        SpanContext::new(
            TraceId::from_bytes(self.trace_id.to_be_bytes()),
            SpanId::from_bytes(self.span_id.to_be_bytes()),
            TraceFlags::new(self.flags),
            true,
            TraceState::default(),
        )
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }
}

/// Why a `traceparent` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid traceparent {shown}: {reason}; expected 00-<32 lowercase hex>-<16 lowercase hex>-<2 lowercase hex>, ids not all zeros")]
pub struct TraceParentError {
    /// The value, cut to a readable length.
    shown: String,
    /// What is wrong with it.
    reason: &'static str,
}

impl FromStr for TraceParent {
    type Err = TraceParentError;

    /// Parses by the W3C rules: version `ff` is invalid; version `00` is exactly 55
    /// characters; a later version may be longer, its extra fields after a `-` ignored; ids
    /// and flags are lowercase hex, and neither id is all zeros.
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let refuse = |reason| TraceParentError {
            shown: format!("{:?}", value.chars().take(64).collect::<String>()),
            reason,
        };
        let bytes = value.as_bytes();
        if bytes.len() < LEN {
            return Err(refuse("too short"));
        }
        let version = hex(&bytes[0..2]).ok_or_else(|| refuse("the version is not hex"))?;
        if version == 0xff {
            return Err(refuse("version ff is invalid"));
        }
        if (version == 0 && bytes.len() != LEN) || (bytes.len() > LEN && bytes[LEN] != b'-') {
            return Err(refuse("unexpected characters after the flags"));
        }
        if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return Err(refuse("the fields are not separated by '-'"));
        }
        let trace_id = hex(&bytes[3..35]).ok_or_else(|| refuse("the trace id is not hex"))?;
        let span_id = hex(&bytes[36..52]).ok_or_else(|| refuse("the parent id is not hex"))?;
        let flags = hex(&bytes[53..55]).ok_or_else(|| refuse("the flags are not hex"))?;
        if trace_id == 0 {
            return Err(refuse("the trace id is all zeros"));
        }
        if span_id == 0 {
            return Err(refuse("the parent id is all zeros"));
        }
        Ok(Self {
            trace_id,
            span_id: span_id as u64,
            flags: flags as u8,
        })
    }
}

/// `digits` as a number, if each is a lowercase hex digit (at most 32 of them).
fn hex(digits: &[u8]) -> Option<u128> {
    digits.iter().try_fold(0u128, |n, &d| {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => return None,
        };
        Some(n << 4 | u128::from(v))
    })
}

/// The span of one transaction of `db` ([`ServiceDb::transaction`]): a database client span
/// with the semantic conventions' `db.system.name` and `db.namespace` (`database.schema`).
pub(crate) fn transaction_span(db: &ServiceDb) -> Span {
    let namespace = db
        .metric_labels()
        .iter()
        .find(|label| label.key() == "db_namespace")
        .map(|label| label.value())
        .unwrap_or_default();
    tracing::info_span!(
        target: "svcdb::tx",
        "transaction",
        otel.name = format!("transaction {namespace}"),
        otel.kind = "client",
        db.system.name = "postgresql",
        db.namespace = namespace,
    )
}

/// The traceparent of the current span; `None` when it has no OpenTelemetry context (no
/// layer installed, or no span).
pub fn current() -> Option<TraceParent> {
    of(&Span::current())
}

/// The traceparent of `span` (the span itself as the parent); `None` when it has no
/// OpenTelemetry context.
pub fn of(span: &Span) -> Option<TraceParent> {
    if span.is_disabled() {
        return None;
    }
    TraceParent::of_context(span.context().span().span_context())
}

/// Records `span`'s trace id in its field `trace_id` (declared `trace_id = Empty`), when it
/// has one: log lines in the span then name their trace, for finding it in the tracing backend.
pub fn record_trace_id(span: &Span) {
    if let Some(own) = of(span) {
        span.record(
            "trace_id",
            tracing::field::display(format_args!("{:032x}", own.trace_id)),
        );
    }
}

/// Makes `span` continue the trace of `parent` (a remote span: the producer's). Call it right
/// after creating `span`, before entering it: a span that started keeps its parent. Does
/// nothing without an OpenTelemetry layer.
pub fn continue_trace(span: &Span, parent: &TraceParent) {
    let remote = opentelemetry::Context::new().with_remote_span_context(parent.to_context());
    // The errors say there is no layer or the span started: nothing to continue then.
    let _ = span.set_parent(remote);
}

/// Links `span` to `to` (an OpenTelemetry span link): for a span that serves several traces at
/// once, such as a consumer's batch of deliveries in one transaction, whose own trace then
/// points at each of theirs. Call it before entering `span`. Does nothing without an
/// OpenTelemetry layer.
pub fn link(span: &Span, to: &Span) {
    if span.is_disabled() || to.is_disabled() {
        return;
    }
    let context = to.context().span().span_context().clone();
    if context.is_valid() {
        span.add_link(context);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_shows_the_w3c_example() {
        let parent: TraceParent = EXAMPLE.parse().unwrap();
        assert_eq!(parent.trace_id(), 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(parent.span_id(), 0x00f067aa0ba902b7);
        assert_eq!(parent.flags(), 1);
        assert_eq!(parent.to_string(), EXAMPLE);
        let unsampled: TraceParent = EXAMPLE.replace("-01", "-00").parse().unwrap();
        assert!(!unsampled.is_sampled());
    }

    #[test]
    fn refuses_what_w3c_calls_invalid() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-é1",
        ] {
            let e = bad.parse::<TraceParent>().unwrap_err();
            assert!(e.to_string().starts_with("invalid traceparent"), "{bad:?}");
        }
    }

    #[test]
    fn a_later_version_may_carry_more_fields() {
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-whatever";
        let parent: TraceParent = later.parse().unwrap();
        assert_eq!(parent.to_string(), EXAMPLE);
    }

    #[test]
    fn without_an_opentelemetry_layer_there_is_no_current_traceparent() {
        let subscriber = tracing_subscriber::registry();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("work");
            continue_trace(&span, &EXAMPLE.parse().unwrap());
            let _entered = span.enter();
            assert_eq!(current(), None);
        });
    }

    #[test]
    fn a_span_continues_the_remote_trace_with_an_opentelemetry_layer() {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::layer::SubscriberExt;

        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let parent: TraceParent = EXAMPLE.parse().unwrap();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("work");
            continue_trace(&span, &parent);
            let _entered = span.enter();
            let own = current().expect("a span with a layer has a context");
            assert_eq!(own.trace_id(), parent.trace_id());
            assert_ne!(
                own.span_id(),
                parent.span_id(),
                "its own span id, not its parent's"
            );
            // The control: a span continuing nothing starts a trace of its own.
            let fresh = of(&tracing::info_span!(parent: None, "unrelated")).unwrap();
            assert_ne!(fresh.trace_id(), parent.trace_id());
        });
    }

    proptest::proptest! {
        #[test]
        fn any_input_parses_or_is_refused_without_panic(value in "\\PC{0,80}") {
            let _ = value.parse::<TraceParent>();
        }

        #[test]
        fn shown_values_parse_back(trace_id in 1u128.., span_id in 1u64.., flags: u8) {
            let parent = TraceParent { trace_id, span_id, flags };
            proptest::prop_assert_eq!(parent.to_string().parse::<TraceParent>(), Ok(parent));
        }
    }
}
