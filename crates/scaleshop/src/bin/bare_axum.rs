//! The baseline for benchmarks: a bare axum JSON handler with nothing else in the
//! way. `bare-axum [ADDR]` (default 127.0.0.1:0) serves `GET /json` and prints the
//! address it listens on. Compare scaleshop's routes against it in the same run.

use std::net::SocketAddr;

use axum::{Json, Router, routing::get};
use serde::Serialize;

// mimalloc: a request allocates many small short-lived objects on one worker
// thread and often frees them on another, which glibc's arenas handle slowly.
// (The bare baseline uses the same allocator, so comparisons stay fair.)
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Serialize)]
struct Body {
    id: &'static str,
    email: &'static str,
    name: &'static str,
    role: &'static str,
    created_at: &'static str,
    updated_at: &'static str,
}

async fn json() -> Json<Body> {
    Json(Body {
        id: "019ac9a0-0000-7000-8000-000000000000",
        email: "ada@example.com",
        name: "Ada Lovelace",
        role: "customer",
        created_at: "2026-11-28T06:14:31.123456Z",
        updated_at: "2026-11-28T06:14:31.123456Z",
    })
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".to_owned())
        .parse()
        .map_err(std::io::Error::other)?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, Router::new().route("/json", get(json))).await
}
