//! The catalog service: products and their stock. It reserves the stock of each placed order
//! (consuming `OrderPlaced`) and answers with `ProductStockReserved` or
//! `StockReservationFailed`.
//!
//! | route | what |
//! |---|---|
//! | `POST /products` `{"name","price_cents","stock"}` | 201 and the product; 409 if the name is taken |
//! | `GET /products` | every product with its stock |
//! | `GET /products/{id}` | one product, or 404 |

use std::collections::HashMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use svcdb::migrate::EmbeddedMigrations;
use svcdb::{Envelope, Transaction};
use svcdb_amqp::{ConsumerOptions, EventHandler, HandlerError};

use crate::events::{Event, Line, OrderPlaced, ProductStockReserved, StockReservationFailed};
use crate::platform::{ApiError, Ctx, ServiceDef, Subscription};

pub static MIGRATIONS: EmbeddedMigrations = svcdb::embed_migrations!("migrations/catalog");

pub static SERVICE: ServiceDef = ServiceDef {
    name: "catalog",
    schema: "catalog_schema",
    migrations: &MIGRATIONS,
    tables: &["products", "stock_reservations"],
    publishes: true,
    routes,
    subscriptions: &[Subscription {
        handler: "reserve-stock",
        sources: &[("orders", OrderPlaced::ROUTING_KEY)],
        register: |consumer, ctx| {
            // One order a transaction: reserving locks the products' rows, which every order
            // for them locks too; a batch would hold them all until its commit, and two
            // batches would deadlock (see svcdb_amqp::Consumer, "Batches").
            let alone = ConsumerOptions {
                batch: 1,
                ..consumer.options().clone()
            };
            consumer.with_options(alone).on_handler(
                OrderPlaced::KIND,
                ctx.handler(ReserveStock { ctx: ctx.clone() }),
            )
        },
    }],
};

fn routes() -> Router<Ctx> {
    Router::new()
        .route("/products", post(create).get(list))
        .route("/products/{id}", get(product))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewProduct {
    pub name: String,
    pub price_cents: i64,
    pub stock: i32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Product {
    pub id: i64,
    pub name: String,
    pub price_cents: i64,
    pub stock: i32,
}

const PRODUCT_COLUMNS: &str = "id, name, price_cents, stock";

fn product_from(row: &svcdb::tokio_postgres::Row) -> Product {
    Product {
        id: row.get(0),
        name: row.get(1),
        price_cents: row.get(2),
        stock: row.get(3),
    }
}

async fn create(
    State(ctx): State<Ctx>,
    Json(new): Json<NewProduct>,
) -> Result<(StatusCode, Json<Product>), ApiError> {
    if new.name.trim().is_empty() || new.price_cents < 0 || new.stock < 0 {
        return Err(ApiError::Unprocessable(
            "a product needs a name, a price and a stock of 0 or more".into(),
        ));
    }
    let row = ctx
        .db
        .get()
        .await?
        .query_opt(
            &format!(
                "INSERT INTO products (name, price_cents, stock) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO NOTHING RETURNING {PRODUCT_COLUMNS}"
            ),
            &[&new.name, &new.price_cents, &new.stock],
        )
        .await?
        .ok_or_else(|| ApiError::Conflict(format!("product {} exists", new.name)))?;
    Ok((StatusCode::CREATED, Json(product_from(&row))))
}

async fn list(State(ctx): State<Ctx>) -> Result<Json<Vec<Product>>, ApiError> {
    let rows = ctx
        .db
        .get()
        .await?
        .query(
            &format!("SELECT {PRODUCT_COLUMNS} FROM products ORDER BY id"),
            &[],
        )
        .await?;
    Ok(Json(rows.iter().map(product_from).collect()))
}

async fn product(State(ctx): State<Ctx>, Path(id): Path<i64>) -> Result<Json<Product>, ApiError> {
    let row = ctx
        .db
        .get()
        .await?
        .query_opt(
            &format!("SELECT {PRODUCT_COLUMNS} FROM products WHERE id = $1"),
            &[&id],
        )
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no product {id}")))?;
    Ok(Json(product_from(&row)))
}

/// `OrderPlaced` → take the stock of every line, or of none.
///
/// It runs inside the consumer's transaction, which also holds the event's idempotency claim:
/// the stock update, the reservation rows, the answer in the outbox and the claim commit
/// together, so a redelivered `OrderPlaced` finds the claim and takes nothing.
struct ReserveStock {
    ctx: Ctx,
}

impl EventHandler for ReserveStock {
    async fn handle(&self, tx: &mut Transaction<'_>, event: &Envelope) -> Result<(), HandlerError> {
        // A payload of the wrong shape is an EventError: dead-lettered at once, not retried.
        let order: OrderPlaced = event.payload_as()?;
        let lines = merged(&order.lines);
        let ids: Vec<i64> = lines.iter().map(|l| l.product_id).collect();
        // Lock the rows in id order, so two orders sharing products cannot deadlock, and check
        // every line before changing any.
        let stock: HashMap<i64, i32> = tx
            .query(
                "SELECT id, stock FROM products WHERE id = ANY($1) ORDER BY id FOR UPDATE",
                &[&ids],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let shortfall = if lines.is_empty() {
            Some("the order has no lines".to_owned())
        } else {
            lines
                .iter()
                .find_map(|line| match stock.get(&line.product_id) {
                    _ if line.quantity <= 0 => Some(format!(
                        "product {}: quantity {} is not positive",
                        line.product_id, line.quantity
                    )),
                    None => Some(format!("product {} does not exist", line.product_id)),
                    Some(&left) if left < line.quantity => Some(format!(
                        "product {}: {} wanted, {left} left",
                        line.product_id, line.quantity
                    )),
                    Some(_) => None,
                })
        };
        if let Some(reason) = shortfall {
            let failed = StockReservationFailed {
                order_id: order.order_id,
                reason,
            };
            self.ctx.publish(tx, &failed, Some(event)).await?;
            return Ok(());
        }
        let quantities: Vec<i32> = lines.iter().map(|l| l.quantity).collect();
        tx.execute(
            "UPDATE products p SET stock = p.stock - l.quantity
               FROM unnest($1::bigint[], $2::int[]) AS l(id, quantity)
              WHERE p.id = l.id",
            &[&ids, &quantities],
        )
        .await?;
        tx.execute(
            "INSERT INTO stock_reservations (order_id, product_id, quantity, event_id)
             SELECT $1, l.id, l.quantity, $4
               FROM unnest($2::bigint[], $3::int[]) AS l(id, quantity)",
            &[&order.order_id, &ids, &quantities, &event.id],
        )
        .await?;
        let reserved = ProductStockReserved {
            order_id: order.order_id,
            lines,
        };
        self.ctx.publish(tx, &reserved, Some(event)).await?;
        Ok(())
    }
}

/// The lines by product, quantities of the same product added up, in product order.
fn merged(lines: &[Line]) -> Vec<Line> {
    let mut by_product: Vec<Line> = Vec::with_capacity(lines.len());
    let mut sorted = lines.to_vec();
    sorted.sort_by_key(|l| l.product_id);
    for line in sorted {
        match by_product.last_mut() {
            Some(last) if last.product_id == line.product_id => last.quantity += line.quantity,
            _ => by_product.push(line),
        }
    }
    by_product
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_merged_by_product_in_order() {
        let line = |product_id, quantity| Line {
            product_id,
            quantity,
        };
        assert_eq!(
            merged(&[line(3, 1), line(1, 2), line(3, 4)]),
            vec![line(1, 2), line(3, 5)]
        );
        assert!(merged(&[]).is_empty());
    }
}
