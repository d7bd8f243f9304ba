//! The users service: registration. It announces each new user with `UserRegistered`, which
//! the cart service keeps its own list of customers from.
//!
//! | route | what |
//! |---|---|
//! | `POST /users` `{"email","name"}` | 201 and the user; 409 if the email is taken |
//! | `GET /users/{id}` | the user, or 404 |

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use svcdb::migrate::EmbeddedMigrations;

use crate::events::UserRegistered;
use crate::platform::{ApiError, Ctx, ServiceDef};

pub static MIGRATIONS: EmbeddedMigrations = svcdb::embed_migrations!("migrations/users");

pub static SERVICE: ServiceDef = ServiceDef {
    name: "users",
    schema: "users_schema",
    migrations: &MIGRATIONS,
    tables: &["users"],
    publishes: true,
    routes,
    subscriptions: &[],
};

fn routes() -> Router<Ctx> {
    Router::new()
        .route("/users", post(register))
        .route("/users/{id}", get(user))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Registration {
    pub email: String,
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct User {
    pub id: i64,
    pub email: String,
    pub name: String,
}

/// The user and their `UserRegistered` event commit together: no user nobody heard of, no
/// event about a user who does not exist.
async fn register(
    State(ctx): State<Ctx>,
    Json(registration): Json<Registration>,
) -> Result<(StatusCode, Json<User>), ApiError> {
    let Registration { email, name } = registration;
    if email.trim().is_empty() || name.trim().is_empty() {
        return Err(ApiError::Unprocessable(
            "email and name are required".into(),
        ));
    }
    let c = ctx.clone();
    let user = ctx
        .db
        .transaction(async move |tx| {
            let row = tx
                .query_opt(
                    "INSERT INTO users (email, name) VALUES ($1, $2)
                     ON CONFLICT (email) DO NOTHING RETURNING id",
                    &[&email, &name],
                )
                .await?;
            let Some(row) = row else {
                return Err(ApiError::Conflict(format!("{email} is already registered")));
            };
            let user = User {
                id: row.get(0),
                email,
                name,
            };
            let event = UserRegistered {
                user_id: user.id,
                email: user.email.clone(),
                name: user.name.clone(),
            };
            c.publish(tx, &event, None).await?;
            Ok(user)
        })
        .await?;
    Ok((StatusCode::CREATED, Json(user)))
}

async fn user(State(ctx): State<Ctx>, Path(id): Path<i64>) -> Result<Json<User>, ApiError> {
    let row = ctx
        .db
        .get()
        .await?
        .query_opt("SELECT id, email, name FROM users WHERE id = $1", &[&id])
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no user {id}")))?;
    Ok(Json(User {
        id: row.get(0),
        email: row.get(1),
        name: row.get(2),
    }))
}
