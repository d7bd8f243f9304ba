//! Events on the wire: the [`Envelope`] every service publishes and consumes, and the errors
//! ([`EventError`]) that say why a message is not one.
//!
//! An envelope is a JSON object; its `id` (a UUID, v7 when svcdb makes it) is the event's
//! idempotency key: consumers record it with [`ServiceDb::process_once`] so that a redelivered
//! message has its effects once, and the outbox ([`crate::outbox`]) uses it as its primary key.
//!
//! ```json
//! {
//!   "id": "01912f6e-8a38-7cc1-9f5b-3c1e5a0f2b7d",
//!   "kind": "ProductStockReserved",
//!   "occurred_at": "2025-01-15T09:01:00.123456Z",
//!   "source": "catalog",
//!   "correlation_id": "01912f6e-7000-7000-8000-000000000001",
//!   "causation_id": "01912f6e-7000-7000-8000-000000000001",
//!   "payload": { "product_id": "abc123", "quantity": 5 }
//! }
//! ```
//!
//! Decoding is strict about what the idempotency machinery depends on (a non-nil `id`, a
//! non-empty `kind` and `source`, a timestamp) and tolerant of the rest: unknown fields are
//! ignored, so a producer can add fields before its consumers know them. A message that is not
//! an envelope gives an [`EventError`] variant saying what is wrong, so a consumer can
//! dead-letter it with that reason instead of crashing on it or silently acknowledging it.
//!
//! ```no_run
//! use svcdb::event::{Envelope, EventError};
//!
//! # fn demo(body: &[u8]) -> Result<(), EventError> {
//! let reserved = Envelope::new(
//!     "ProductStockReserved",
//!     "catalog",
//!     serde_json::json!({ "product_id": "abc123", "quantity": 5 }),
//! );
//! let bytes = reserved.to_json_bytes(); // what goes to RabbitMQ (via the outbox)
//!
//! // In the consumer: a malformed message is an error to dead-letter, not a panic.
//! match Envelope::from_slice(body) {
//!     Ok(event) => {
//!         let shipped = Envelope::new("OrderShipped", "orders", serde_json::json!({}))
//!             .caused_by(&event); // same correlation id, causation id = event.id
//!         # let _ = shipped;
//!     }
//!     Err(e) => eprintln!("dead-lettering: {e}"),
//! }
//! # let _ = bytes; Ok(()) }
//! ```
//!
//! [`ServiceDb::process_once`]: crate::ServiceDb::process_once

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

/// The largest envelope, in bytes of JSON, that [`Envelope::from_slice`] decodes and
/// [`outbox::enqueue`](crate::outbox::enqueue) stores: 1 MiB.
///
/// Events name things and carry small facts; a document or an image belongs in object storage,
/// with its reference in the event. The bound keeps one oversized message from costing a
/// consumer its memory, and producers are held to it so that svcdb never publishes an event
/// its own consumers would refuse.
pub const MAX_ENVELOPE_BYTES: usize = 1024 * 1024;

/// One event as it travels between services.
///
/// Serialized as a JSON object with these field names; `correlation_id` and `causation_id` are
/// written as `null` when absent. Deserializing (with serde or [`Envelope::from_slice`])
/// validates like [`Envelope::validate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Value")]
pub struct Envelope {
    /// The event's identity and idempotency key. [`Envelope::new`] makes a UUID v7, whose
    /// time-ordered bits keep the outbox's index append-only and its rows in creation order;
    /// events from other producers may carry any non-nil UUID.
    pub id: Uuid,
    /// What happened, in the past tense: `"ProductStockReserved"`. Consumers route on it.
    pub kind: String,
    /// When it happened, in the producer's clock.
    pub occurred_at: DateTime<Utc>,
    /// The service that produced it: `"catalog"`.
    pub source: String,
    /// The id shared by every event of one business flow (the first event's id), for tracing a
    /// flow across services. Set by [`Envelope::caused_by`].
    pub correlation_id: Option<Uuid>,
    /// The id of the event whose handling produced this one. Set by [`Envelope::caused_by`].
    pub causation_id: Option<Uuid>,
    /// The event's data, any JSON value; read it typed with [`Envelope::payload_as`].
    pub payload: Value,
}

/// Why bytes or a JSON value are not a valid [`Envelope`], or why a payload does not have the
/// expected shape.
///
/// Match on the variant; the text says what is wrong and what to do and may change. A consumer
/// should dead-letter (reject without requeue) a message that fails to decode: redelivering it
/// cannot help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EventError {
    /// The message is larger than [`MAX_ENVELOPE_BYTES`].
    #[error("event is {size} bytes, over the limit of {max}; keep large data out of events (store it and send a reference)")]
    TooLarge {
        /// The message's size in bytes.
        size: usize,
        /// The limit.
        max: usize,
    },

    /// The bytes are not JSON (or not UTF-8).
    #[error("event is not valid JSON: {reason}; an event is a UTF-8 JSON object as written by Envelope::to_json_bytes")]
    NotJson {
        /// The parser's message, with line and column.
        reason: String,
    },

    /// The JSON is not an object.
    #[error("event is a JSON {found}, not an object; an event is a JSON object with id, kind, occurred_at, source and payload")]
    NotAnObject {
        /// What it is instead: `"array"`, `"string"`, …
        found: &'static str,
    },

    /// A required field is absent (or `null`).
    #[error("event has no `{field}`; every event needs id, kind, occurred_at, source and payload")]
    MissingField {
        /// The field's name.
        field: &'static str,
    },

    /// A field has the wrong type or an unusable value (an `id` that is not a UUID or is the
    /// nil UUID, an `occurred_at` that is not an RFC 3339 timestamp, …).
    #[error("event field `{field}` is invalid: {reason}")]
    InvalidField {
        /// The field's name.
        field: &'static str,
        /// What is wrong with it and what it should be.
        reason: String,
    },

    /// `kind` or `source` is empty or only whitespace.
    #[error("event field `{field}` is empty; give it a name, such as \"ProductStockReserved\" for kind or \"catalog\" for source")]
    EmptyField {
        /// The field's name.
        field: &'static str,
    },

    /// [`Envelope::payload_as`] could not read the payload as the requested type.
    #[error("payload of {kind} event {id} does not have the expected shape: {reason}")]
    Payload {
        /// The event's id.
        id: Uuid,
        /// The event's kind.
        kind: String,
        /// The deserializer's message.
        reason: String,
    },
}

impl Envelope {
    /// A new event with a fresh UUID v7 id, the current time, and no correlation or causation.
    pub fn new(kind: impl Into<String>, source: impl Into<String>, payload: Value) -> Self {
        Self {
            id: Uuid::now_v7(),
            kind: kind.into(),
            occurred_at: Utc::now(),
            source: source.into(),
            correlation_id: None,
            causation_id: None,
            payload,
        }
    }

    /// Marks this event as produced while handling `cause`: `causation_id` becomes
    /// `cause.id` and `correlation_id` is carried over (or starts at `cause.id` when `cause`
    /// begins the flow), so one id follows a business flow through every service.
    #[must_use]
    pub fn caused_by(mut self, cause: &Envelope) -> Self {
        self.causation_id = Some(cause.id);
        self.correlation_id = Some(cause.correlation_id.unwrap_or(cause.id));
        self
    }

    /// The JSON bytes to publish.
    pub fn to_json_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an envelope always serializes: its payload is a Value")
    }

    /// Decodes a message body, refusing one larger than [`MAX_ENVELOPE_BYTES`] before parsing
    /// it. Every refusal is an [`EventError`] naming the problem, for the dead-letter reason.
    ///
    /// To accept larger messages from a producer you trust, deserialize with serde
    /// (`serde_json::from_slice::<Envelope>`): it validates the same way, without the bound.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, EventError> {
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(EventError::TooLarge {
                size: bytes.len(),
                max: MAX_ENVELOPE_BYTES,
            });
        }
        let value: Value = serde_json::from_slice(bytes).map_err(|e| EventError::NotJson {
            reason: e.to_string(),
        })?;
        Self::try_from(value)
    }

    /// Checks what consumers rely on: a non-nil id, and a `kind` and `source` that are not
    /// blank. Decoding runs this; [`outbox::enqueue`](crate::outbox::enqueue) runs it (and the
    /// size bound) so a producer cannot store an event its consumers would refuse.
    pub fn validate(&self) -> Result<(), EventError> {
        if self.id.is_nil() {
            return Err(EventError::InvalidField {
                field: "id",
                reason: "the nil UUID cannot identify an event; use Envelope::new (a UUID v7)"
                    .into(),
            });
        }
        if self.kind.trim().is_empty() {
            return Err(EventError::EmptyField { field: "kind" });
        }
        if self.source.trim().is_empty() {
            return Err(EventError::EmptyField { field: "source" });
        }
        Ok(())
    }

    /// Reads the payload as `T`.
    ///
    /// ```no_run
    /// # fn demo(event: svcdb::event::Envelope) -> Result<(), svcdb::event::EventError> {
    /// #[derive(serde::Deserialize)]
    /// struct StockReserved { product_id: String, quantity: i32 }
    /// let reserved: StockReserved = event.payload_as()?;
    /// # Ok(()) }
    /// ```
    pub fn payload_as<T: DeserializeOwned>(&self) -> Result<T, EventError> {
        T::deserialize(&self.payload).map_err(|e| EventError::Payload {
            id: self.id,
            kind: self.kind.clone(),
            reason: e.to_string(),
        })
    }
}

impl TryFrom<Value> for Envelope {
    type Error = EventError;

    /// Validates field by field, so the error names the first field at fault.
    fn try_from(value: Value) -> Result<Self, EventError> {
        let mut object = match value {
            Value::Object(object) => object,
            other => {
                return Err(EventError::NotAnObject {
                    found: json_type(&other),
                })
            }
        };
        let envelope = Envelope {
            id: required_uuid(&mut object, "id")?,
            kind: required_string(&mut object, "kind")?,
            occurred_at: required(&mut object, "occurred_at").and_then(|v| {
                parse(
                    v,
                    "occurred_at",
                    "an RFC 3339 timestamp such as \"2025-01-15T09:01:00Z\"",
                )
            })?,
            source: required_string(&mut object, "source")?,
            correlation_id: optional_uuid(&mut object, "correlation_id")?,
            causation_id: optional_uuid(&mut object, "causation_id")?,
            // `null` is a legitimate payload; only its absence is refused.
            payload: object
                .remove("payload")
                .ok_or(EventError::MissingField { field: "payload" })?,
        };
        envelope.validate()?;
        Ok(envelope)
    }
}

/// The field's value; absent and `null` are both missing.
fn required(object: &mut Map<String, Value>, field: &'static str) -> Result<Value, EventError> {
    match object.remove(field) {
        None | Some(Value::Null) => Err(EventError::MissingField { field }),
        Some(v) => Ok(v),
    }
}

fn required_string(
    object: &mut Map<String, Value>,
    field: &'static str,
) -> Result<String, EventError> {
    match required(object, field)? {
        Value::String(s) => Ok(s),
        other => Err(EventError::InvalidField {
            field,
            reason: format!("expected a string, found a JSON {}", json_type(&other)),
        }),
    }
}

fn required_uuid(object: &mut Map<String, Value>, field: &'static str) -> Result<Uuid, EventError> {
    parse(required(object, field)?, field, UUID_EXPECTED)
}

fn optional_uuid(
    object: &mut Map<String, Value>,
    field: &'static str,
) -> Result<Option<Uuid>, EventError> {
    match object.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => parse(v, field, UUID_EXPECTED).map(Some),
    }
}

const UUID_EXPECTED: &str = "a UUID string such as \"01912f6e-8a38-7cc1-9f5b-3c1e5a0f2b7d\"";

/// Deserializes one field, naming it and what was expected on failure.
fn parse<T: DeserializeOwned>(
    value: Value,
    field: &'static str,
    expected: &str,
) -> Result<T, EventError> {
    let shown = match &value {
        Value::String(s) => format!("{:?}", truncate(s, 80)),
        other => format!("a JSON {}", json_type(other)),
    };
    T::deserialize(value).map_err(|_| EventError::InvalidField {
        field,
        reason: format!("{shown} is not {expected}"),
    })
}

fn truncate(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_owned(),
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn caused_by_carries_the_correlation() {
        let first = Envelope::new("OrderPlaced", "orders", json!({}));
        let second = Envelope::new("ProductStockReserved", "catalog", json!({})).caused_by(&first);
        assert_eq!(second.causation_id, Some(first.id));
        assert_eq!(second.correlation_id, Some(first.id));
        let third = Envelope::new("OrderConfirmed", "orders", json!({})).caused_by(&second);
        assert_eq!(third.causation_id, Some(second.id));
        assert_eq!(third.correlation_id, Some(first.id));
    }

    #[test]
    fn truncates_long_values_in_messages() {
        assert_eq!(truncate("abc", 2), "ab…");
        assert_eq!(truncate("ab", 2), "ab");
    }
}
