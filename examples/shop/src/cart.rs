//! The cart service: carts and their items. It learns who its customers are from
//! `UserRegistered` (its role cannot read `users_schema`, and should not), and closes a cart
//! when the `OrderPlaced` event for it arrives. Items added between the order reading the cart
//! and that event arriving are not in the order: closing the cart moves them to a new open cart
//! of the same user (`carried_to`), so none is lost.
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
    /// The open cart that items added after the order was placed were moved to, if any.
    #[serde(default)]
    pub carried_to: Option<i64>,
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
                carried_to: None,
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
        .query_opt(
            "SELECT user_id, order_id, carried_to FROM carts WHERE id = $1",
            &[&id],
        )
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
        carried_to: row.get(2),
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
        carry_over_late_items(tx, &order).await?;
        Ok(())
    }
}

/// Moves what the closed cart holds beyond `order`'s lines (items added after the order
/// service read the cart) to a new open cart of the same user, and notes it in `carried_to`;
/// the closed cart keeps what was ordered. Found by a trial: such an item was accepted and
/// then silently in no order.
async fn carry_over_late_items(
    tx: &mut Transaction<'_>,
    order: &OrderPlaced,
) -> Result<(), HandlerError> {
    let (products, quantities): (Vec<i64>, Vec<i32>) = order
        .lines
        .iter()
        .map(|l| (l.product_id, l.quantity))
        .unzip();
    let late = tx
        .query(
            "SELECT i.product_id, i.quantity - coalesce(o.quantity, 0)
               FROM cart_items i
               LEFT JOIN (SELECT product_id, sum(quantity)::int AS quantity
                            FROM unnest($2::bigint[], $3::int[]) AS o (product_id, quantity)
                           GROUP BY product_id) o USING (product_id)
              WHERE i.cart_id = $1 AND i.quantity > coalesce(o.quantity, 0)",
            &[&order.cart_id, &products, &quantities],
        )
        .await?;
    if late.is_empty() {
        return Ok(());
    }
    let (late_products, late_quantities): (Vec<i64>, Vec<i32>) = late
        .iter()
        .map(|r| (r.get::<_, i64>(0), r.get::<_, i32>(1)))
        .unzip();
    let carried_to: i64 = tx
        .query_one(
            "INSERT INTO carts (user_id) VALUES ($1) RETURNING id",
            &[&order.user_id],
        )
        .await?
        .get(0);
    tx.execute(
        "INSERT INTO cart_items (cart_id, product_id, quantity)
         SELECT $1, product_id, quantity FROM unnest($2::bigint[], $3::int[]) AS l (product_id, quantity)",
        &[&carried_to, &late_products, &late_quantities],
    )
    .await?;
    // The closed cart keeps what was ordered.
    tx.execute(
        "DELETE FROM cart_items i
          USING unnest($2::bigint[], $3::int[]) AS l (product_id, quantity)
          WHERE i.cart_id = $1 AND i.product_id = l.product_id AND i.quantity = l.quantity",
        &[&order.cart_id, &late_products, &late_quantities],
    )
    .await?;
    tx.execute(
        "UPDATE cart_items i SET quantity = i.quantity - l.quantity
           FROM unnest($2::bigint[], $3::int[]) AS l (product_id, quantity)
          WHERE i.cart_id = $1 AND i.product_id = l.product_id",
        &[&order.cart_id, &late_products, &late_quantities],
    )
    .await?;
    tx.execute(
        "UPDATE carts SET carried_to = $2 WHERE id = $1",
        &[&order.cart_id, &carried_to],
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An item added after the order read the cart, and more of an ordered one: both move to a
    /// new open cart when the cart closes; the control, a cart unchanged since the order, gets
    /// no new cart.
    #[tokio::test]
    async fn items_added_after_the_order_move_to_a_new_cart() {
        let test_db = svcdb::testing::TestDb::new().await;
        let db = test_db.service("cart_schema").await;
        svcdb::migrate::Migrator::new(
            db.clone(),
            svcdb::migrate::Migrations::from_embedded(&MIGRATIONS).unwrap(),
        )
        .up()
        .await
        .unwrap();
        let conn = db.get().await.unwrap();
        conn.batch_execute(
            "INSERT INTO customers (user_id, email) VALUES (7, 'a@example.com');
             INSERT INTO carts (user_id) VALUES (7), (7);
             INSERT INTO cart_items VALUES (1, 10, 1), (1, 11, 3), (1, 12, 1), (2, 10, 2);",
        )
        .await
        .unwrap();
        let line = |product_id, quantity| Line {
            product_id,
            quantity,
        };
        let envelope = |cart_id, order_id, lines| {
            let order = OrderPlaced {
                order_id,
                cart_id,
                user_id: 7,
                lines,
            };
            Envelope::new(
                OrderPlaced::KIND,
                "orders",
                serde_json::to_value(order).unwrap(),
            )
        };
        // The order took 10 × 1 and 11 × 1; then 11 × 2 more and 12 × 1 were added.
        let late = envelope(1, 100, vec![line(10, 1), line(11, 1)]);
        // Cart 2 is ordered as it is.
        let unchanged = envelope(2, 101, vec![line(10, 2)]);
        for event in [&late, &unchanged] {
            db.transaction(async |tx| CloseCart.handle(tx, event).await)
                .await
                .unwrap();
        }
        let items = |cart: i64| {
            let conn = &conn;
            async move {
                conn.query(
                    "SELECT product_id, quantity FROM cart_items WHERE cart_id = $1 ORDER BY product_id",
                    &[&cart],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get::<_, i64>(0), r.get::<_, i32>(1)))
                .collect::<Vec<_>>()
            }
        };
        let carried: Vec<(i64, Option<i64>)> = conn
            .query(
                "SELECT id, carried_to FROM carts WHERE id IN (1, 2) ORDER BY id",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let [(1, Some(new_cart)), (2, None)] = carried[..] else {
            panic!("{carried:?}");
        };
        assert_eq!(
            items(1).await,
            [(10, 1), (11, 1)],
            "the closed cart keeps the order"
        );
        assert_eq!(items(new_cart).await, [(11, 2), (12, 1)], "the late items");
        assert_eq!(items(2).await, [(10, 2)]);
        let open: Option<i64> = conn
            .query_one("SELECT order_id FROM carts WHERE id = $1", &[&new_cart])
            .await
            .unwrap()
            .get(0);
        assert_eq!(open, None, "the new cart is open");
    }
}
