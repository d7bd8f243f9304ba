//! The orders service: places an order from a cart (announcing `OrderPlaced` through its
//! outbox) and decides it when the catalog answers (`ProductStockReserved` → confirmed,
//! `StockReservationFailed` → rejected).
//!
//! | route | what |
//! |---|---|
//! | `POST /orders` `{"cart_id"}` | 201 and the order, `placed`; the same cart again: 200 and the same order |
//! | `GET /orders/{id}` | the order with its lines and status, or 404 |
//! | `GET /orders` | every order |

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use svcdb::migrate::EmbeddedMigrations;
use svcdb::{Envelope, Transaction};
use svcdb_amqp::{EventHandler, HandlerError};

use crate::cart::Cart;
use crate::events::{Event, Line, OrderPlaced, ProductStockReserved, StockReservationFailed};
use crate::platform::{ApiError, Ctx, ServiceDef, Subscription};

pub static MIGRATIONS: EmbeddedMigrations = svcdb::embed_migrations!("migrations/orders");

pub static SERVICE: ServiceDef = ServiceDef {
    name: "orders",
    schema: "orders_schema",
    migrations: &MIGRATIONS,
    tables: &["orders", "order_lines"],
    publishes: true,
    routes,
    subscriptions: &[Subscription {
        handler: "stock-results",
        sources: &[("catalog", "stock.#")],
        register: |consumer, ctx| {
            consumer
                .on_handler(
                    ProductStockReserved::KIND,
                    ctx.handler(Decide::<ProductStockReserved>::new()),
                )
                .on_handler(
                    StockReservationFailed::KIND,
                    ctx.handler(Decide::<StockReservationFailed>::new()),
                )
        },
    }],
};

fn routes() -> Router<Ctx> {
    Router::new()
        .route("/orders", post(place).get(list))
        .route("/orders/{id}", get(order))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlaceOrder {
    pub cart_id: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Order {
    pub id: i64,
    pub cart_id: i64,
    pub user_id: i64,
    /// `placed`, then `confirmed` or `rejected`.
    pub status: String,
    pub reason: Option<String>,
    pub lines: Vec<Line>,
}

/// Reads the cart from the cart service's API, then writes the order, its lines and its
/// `OrderPlaced` event in one transaction. Placing the same cart twice (a client retrying a
/// timed-out request) returns the first order.
async fn place(
    State(ctx): State<Ctx>,
    Json(request): Json<PlaceOrder>,
) -> Result<(StatusCode, Json<Order>), ApiError> {
    let cart_id = request.cart_id;
    if let Some(existing) = order_of_cart(&ctx, cart_id).await? {
        return Ok((StatusCode::OK, Json(existing)));
    }
    // The cart service down or failing is no fault of the request: 503 with Retry-After, and
    // its details (hosts, databases) go to the log, not to the client (found by a user trial:
    // 500 with the cart's connection error in the body).
    let response = match ctx
        .http
        .get(&format!("{}/carts/{cart_id}", ctx.peer("cart")?))
        .await
    {
        Ok(response) if !response.status.is_server_error() => response,
        Ok(response) => {
            tracing::warn!(status = %response.status, "the cart service failed; answering 503");
            return Err(ApiError::Unavailable(
                "the cart service is unavailable".into(),
            ));
        }
        Err(e) => {
            tracing::warn!(
                error = format!("{e:#}"),
                "cannot reach the cart service; answering 503"
            );
            return Err(ApiError::Unavailable(
                "the cart service cannot be reached".into(),
            ));
        }
    };
    if response.status == StatusCode::NOT_FOUND {
        return Err(ApiError::NotFound(format!("no cart {cart_id}")));
    }
    let cart: Cart = response.json()?;
    if let Some(order_id) = cart.order_id {
        return Err(ApiError::Conflict(format!(
            "cart {cart_id} is already checked out (order {order_id})"
        )));
    }
    if cart.items.is_empty() {
        return Err(ApiError::Unprocessable(format!("cart {cart_id} is empty")));
    }

    let c = ctx.clone();
    let placed = ctx
        .db
        .transaction(async move |tx| {
            let row = tx
                .query_opt(
                    "INSERT INTO orders (cart_id, user_id) VALUES ($1, $2)
                     ON CONFLICT (cart_id) DO NOTHING RETURNING id",
                    &[&cart.id, &cart.user_id],
                )
                .await?;
            let Some(row) = row else {
                return Ok(None); // placed concurrently by another request
            };
            let order_id: i64 = row.get(0);
            let (products, quantities): (Vec<i64>, Vec<i32>) = cart
                .items
                .iter()
                .map(|l| (l.product_id, l.quantity))
                .unzip();
            tx.execute(
                "INSERT INTO order_lines (order_id, product_id, quantity)
                 SELECT $1, * FROM unnest($2::bigint[], $3::int[])",
                &[&order_id, &products, &quantities],
            )
            .await?;
            let event = OrderPlaced {
                order_id,
                cart_id: cart.id,
                user_id: cart.user_id,
                lines: cart.items.clone(),
            };
            c.publish(tx, &event, None).await?;
            Ok::<_, ApiError>(Some(Order {
                id: order_id,
                cart_id: cart.id,
                user_id: cart.user_id,
                status: "placed".into(),
                reason: None,
                lines: cart.items,
            }))
        })
        .await?;
    match placed {
        Some(order) => Ok((StatusCode::CREATED, Json(order))),
        None => {
            let existing = order_of_cart(&ctx, cart_id).await?.ok_or_else(|| {
                ApiError::Internal(anyhow::anyhow!("order of cart {cart_id} vanished"))
            })?;
            Ok((StatusCode::OK, Json(existing)))
        }
    }
}

async fn order_of_cart(ctx: &Ctx, cart_id: i64) -> Result<Option<Order>, ApiError> {
    Ok(load(ctx, "WHERE o.cart_id = $1", cart_id).await?.pop())
}

async fn order(State(ctx): State<Ctx>, Path(id): Path<i64>) -> Result<Json<Order>, ApiError> {
    load(&ctx, "WHERE o.id = $1", id)
        .await?
        .pop()
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no order {id}")))
}

async fn list(State(ctx): State<Ctx>) -> Result<Json<Vec<Order>>, ApiError> {
    Ok(Json(load(&ctx, "WHERE o.id > $1", 0).await?))
}

/// Orders matching `filter` (on `o`, with `$1` bound to `value`), with their lines, by id.
async fn load(ctx: &Ctx, filter: &str, value: i64) -> Result<Vec<Order>, ApiError> {
    let rows = ctx
        .db
        .get()
        .await?
        .query(
            &format!(
                "SELECT o.id, o.cart_id, o.user_id, o.status, o.reason, l.product_id, l.quantity
                   FROM orders o LEFT JOIN order_lines l ON l.order_id = o.id
                 {filter} ORDER BY o.id, l.product_id"
            ),
            &[&value],
        )
        .await?;
    let mut orders: BTreeMap<i64, Order> = BTreeMap::new();
    for row in rows {
        let order = orders.entry(row.get(0)).or_insert_with(|| Order {
            id: row.get(0),
            cart_id: row.get(1),
            user_id: row.get(2),
            status: row.get(3),
            reason: row.get(4),
            lines: Vec::new(),
        });
        if let Some(product_id) = row.get::<_, Option<i64>>(5) {
            order.lines.push(Line {
                product_id,
                quantity: row.get(6),
            });
        }
    }
    Ok(orders.into_values().collect())
}

/// The catalog's answer to an order → the order's final status.
trait Decision: Event + Send + Sync + 'static {
    fn order_id(&self) -> i64;
    /// `confirmed` or `rejected`, and why.
    fn outcome(&self) -> (&'static str, Option<&str>);
}

impl Decision for ProductStockReserved {
    fn order_id(&self) -> i64 {
        self.order_id
    }
    fn outcome(&self) -> (&'static str, Option<&str>) {
        ("confirmed", None)
    }
}

impl Decision for StockReservationFailed {
    fn order_id(&self) -> i64 {
        self.order_id
    }
    fn outcome(&self) -> (&'static str, Option<&str>) {
        ("rejected", Some(&self.reason))
    }
}

/// Decides a placed order; one handler type for both answers.
struct Decide<D>(std::marker::PhantomData<fn() -> D>);

impl<D> Decide<D> {
    fn new() -> Self {
        Self(std::marker::PhantomData)
    }
}

impl<D: Decision> EventHandler for Decide<D> {
    async fn handle(&self, tx: &mut Transaction<'_>, event: &Envelope) -> Result<(), HandlerError> {
        let answer: D = event.payload_as()?;
        let (status, reason) = answer.outcome();
        let order_id = answer.order_id();
        let decided = tx
            .execute(
                "UPDATE orders SET status = $2, reason = $3, decided_at = now(), decided_by = $4
                  WHERE id = $1 AND status = 'placed'",
                &[&order_id, &status, &reason, &event.id],
            )
            .await?;
        if decided == 0 {
            // Redeliveries never get here (the claim catches them). An answer for an unknown
            // or already decided order is a bug elsewhere: keep it for a person.
            return Err(HandlerError::permanent(HandlerError::msg(format!(
                "{} for order {order_id}, which does not exist or is already decided",
                D::KIND
            ))));
        }
        Ok(())
    }
}
