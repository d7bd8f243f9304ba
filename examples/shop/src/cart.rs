//! The cart service: carts and their items. It learns who its customers are from
//! `UserRegistered` (its role cannot read `users_schema`, and should not), and closes a cart
//! when the `OrderPlaced` event for it arrives.
//!
//! | route | what |
//! |---|---|
//! | `POST /carts` `{"user_id"}` | 201 and the empty cart; 422 while the user is unknown here |
//! | `POST /carts/{id}/items` `{"product_id","quantity"}` | the cart; 409 once it is checked out |
//! | `GET /carts/{id}` | the cart with its items, or 404 |

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use svcdb::migrate::EmbeddedMigrations;
use svcdb::{Envelope, SqlState, Transaction};
use svcdb_amqp::{EventHandler, HandlerError};

use crate::events::{Event, Line, OrderPlaced, UserRegistered};
use crate::platform::{ApiError, Ctx, ServiceDef, Subscription};

pub static MIGRATIONS: EmbeddedMigrations = svcdb::embed_migrations!("migrations/cart");

pub static SERVICE: ServiceDef = ServiceDef {
    name: "cart",
    schema: "cart_schema",
    migrations: &MIGRATIONS,
    tables: &["customers", "carts", "cart_items"],
    publishes: false,
    routes,
    subscriptions: &[
        Subscription {
            handler: "customers",
            sources: &[("users", UserRegistered::ROUTING_KEY)],
            register: |consumer, ctx| {
                consumer.on_handler(UserRegistered::KIND, ctx.handler(LearnCustomer))
            },
        },
        Subscription {
            handler: "checkout",
            sources: &[("orders", OrderPlaced::ROUTING_KEY)],
            register: |consumer, ctx| {
                consumer.on_handler(OrderPlaced::KIND, ctx.handler(CloseCart))
            },
        },
    ],
};

fn routes() -> Router<Ctx> {
    Router::new()
        .route("/carts", post(create))
        .route("/carts/{id}", get(cart))
        .route("/carts/{id}/items", post(add_item))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewCart {
    pub user_id: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cart {
    pub id: i64,
    pub user_id: i64,
    pub items: Vec<Line>,
    /// Set once the order placed from this cart was announced; the cart is closed then.
    pub order_id: Option<i64>,
}

async fn create(
    State(ctx): State<Ctx>,
    Json(new): Json<NewCart>,
) -> Result<(StatusCode, Json<Cart>), ApiError> {
    let inserted = ctx
        .db
        .get()
        .await?
        .query_one(
            "INSERT INTO carts (user_id) VALUES ($1) RETURNING id",
            &[&new.user_id],
        )
        .await;
    match inserted {
        Ok(row) => Ok((
            StatusCode::CREATED,
            Json(Cart {
                id: row.get(0),
                user_id: new.user_id,
                items: Vec::new(),
                order_id: None,
            }),
        )),
        // The foreign key to `customers`: this service has not heard of the user (yet; the
        // UserRegistered event may still be on its way).
        Err(e) if e.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION) => Err(
            ApiError::Unprocessable(format!("user {} is not a customer here (yet)", new.user_id)),
        ),
        Err(e) => Err(e.into()),
    }
}

async fn cart(State(ctx): State<Ctx>, Path(id): Path<i64>) -> Result<Json<Cart>, ApiError> {
    let conn = ctx.db.get().await?;
    let row = conn
        .query_opt("SELECT user_id, order_id FROM carts WHERE id = $1", &[&id])
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no cart {id}")))?;
    let items = conn
        .query(
            "SELECT product_id, quantity FROM cart_items WHERE cart_id = $1 ORDER BY product_id",
            &[&id],
        )
        .await?
        .iter()
        .map(|r| Line {
            product_id: r.get(0),
            quantity: r.get(1),
        })
        .collect();
    Ok(Json(Cart {
        id,
        user_id: row.get(0),
        items,
        order_id: row.get(1),
    }))
}

async fn add_item(
    State(ctx): State<Ctx>,
    Path(id): Path<i64>,
    Json(line): Json<Line>,
) -> Result<Json<Cart>, ApiError> {
    if line.quantity <= 0 {
        return Err(ApiError::Unprocessable("quantity must be positive".into()));
    }
    ctx.db
        .transaction(async move |tx| {
            // Locks the cart against a concurrent checkout.
            let order_id: Option<i64> = tx
                .query_opt(
                    "SELECT order_id FROM carts WHERE id = $1 FOR UPDATE",
                    &[&id],
                )
                .await?
                .ok_or_else(|| ApiError::NotFound(format!("no cart {id}")))?
                .get(0);
            if let Some(order_id) = order_id {
                return Err(ApiError::Conflict(format!(
                    "cart {id} is checked out (order {order_id})"
                )));
            }
            tx.execute(
                "INSERT INTO cart_items (cart_id, product_id, quantity) VALUES ($1, $2, $3)
                 ON CONFLICT (cart_id, product_id)
                 DO UPDATE SET quantity = cart_items.quantity + EXCLUDED.quantity",
                &[&id, &line.product_id, &line.quantity],
            )
            .await?;
            Ok::<_, ApiError>(())
        })
        .await?;
    cart(State(ctx), Path(id)).await
}

/// `UserRegistered` → a customer this service can open carts for.
struct LearnCustomer;

impl EventHandler for LearnCustomer {
    async fn handle(&self, tx: &mut Transaction<'_>, event: &Envelope) -> Result<(), HandlerError> {
        let user: UserRegistered = event.payload_as()?;
        tx.execute(
            "INSERT INTO customers (user_id, email) VALUES ($1, $2)",
            &[&user.user_id, &user.email],
        )
        .await?;
        Ok(())
    }
}

/// `OrderPlaced` → the cart is closed, with the order's id.
struct CloseCart;

impl EventHandler for CloseCart {
    async fn handle(&self, tx: &mut Transaction<'_>, event: &Envelope) -> Result<(), HandlerError> {
        let order: OrderPlaced = event.payload_as()?;
        let closed = tx
            .execute(
                "UPDATE carts SET order_id = $2, checked_out_at = now(), checked_out_by = $3
                  WHERE id = $1 AND order_id IS NULL",
                &[&order.cart_id, &order.order_id, &event.id],
            )
            .await?;
        if closed == 0 {
            // Not a redelivery (the claim catches those): an order for a cart that does not
            // exist or was closed by another order. Retrying cannot fix it; a person should
            // look, so it goes to the dead-letter queue.
            return Err(HandlerError::permanent(HandlerError::msg(format!(
                "order {} names cart {}, which does not exist or is already checked out",
                order.order_id, order.cart_id
            ))));
        }
        Ok(())
    }
}
