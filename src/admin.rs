//! The admin HTTP listener: health, readiness and status for probes and
//! operators. It reads the shared status and never steers anything.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

use crate::status::SharedStatus;

pub fn router(status: SharedStatus) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/api/v1/status", get(status_json))
        .with_state(status)
}

async fn readyz(State(s): State<SharedStatus>) -> impl IntoResponse {
    match s.read().not_ready_reason() {
        None => (StatusCode::OK, "ready\n".to_string()),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

async fn status_json(State(s): State<SharedStatus>) -> impl IntoResponse {
    Json(s.read())
}

/// Binds now (so a taken port fails startup clearly) and serves in the
/// background.
pub async fn serve(addr: SocketAddr, status: SharedStatus) -> Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the admin listener on {addr}"))?;
    tracing::info!(%addr, "admin listener up: /healthz /readyz /api/v1/status");
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(status)).await {
            tracing::error!("admin listener failed: {e}");
        }
    }))
}
