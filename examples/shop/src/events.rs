//! The events the services exchange: the contract between them, in one place.
//!
//! Each event is a payload type with its kind (what consumers route on) and routing key (what
//! queues bind to). It travels inside a [`svcdb::Envelope`], whose id is the idempotency key.
//! A service publishes with [`Ctx::publish`](crate::platform::Ctx::publish), which stores it
//! in the service's outbox within the business transaction; a consumer reads the payload back
//! with [`Envelope::payload_as`](svcdb::Envelope::payload_as), whose error dead-letters an
//! event of the wrong shape instead of retrying it.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A payload type that travels as an event.
pub trait Event: Serialize + DeserializeOwned {
    /// The envelope's `kind`, past tense: what happened.
    const KIND: &'static str;
    /// The routing key it is published with on its producer's exchange; consumers bind to it.
    const ROUTING_KEY: &'static str;
}

/// users → cart: someone registered. The cart keeps its own list of customers from these.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserRegistered {
    pub user_id: i64,
    pub email: String,
    pub name: String,
}

impl Event for UserRegistered {
    const KIND: &'static str = "UserRegistered";
    const ROUTING_KEY: &'static str = "user.registered";
}

/// One line of an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub product_id: i64,
    pub quantity: i32,
}

/// orders → catalog, cart: an order was placed from a cart; its stock is not reserved yet.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderPlaced {
    pub order_id: i64,
    pub cart_id: i64,
    pub user_id: i64,
    pub lines: Vec<Line>,
}

impl Event for OrderPlaced {
    const KIND: &'static str = "OrderPlaced";
    const ROUTING_KEY: &'static str = "order.placed";
}

/// catalog → orders: every line of the order was reserved; the stock is taken.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProductStockReserved {
    pub order_id: i64,
    pub lines: Vec<Line>,
}

impl Event for ProductStockReserved {
    const KIND: &'static str = "ProductStockReserved";
    const ROUTING_KEY: &'static str = "stock.reserved";
}

/// catalog → orders: the order could not be reserved (not enough stock, unknown product);
/// nothing was taken.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StockReservationFailed {
    pub order_id: i64,
    pub reason: String,
}

impl Event for StockReservationFailed {
    const KIND: &'static str = "StockReservationFailed";
    const ROUTING_KEY: &'static str = "stock.reservation-failed";
}

/// What a malformed producer wrote: an `OrderPlaced` cut off mid-object, not an envelope.
pub const MALFORMED: &[u8] = br#"{"kind": "OrderPlaced", "order_id": 4"#;
