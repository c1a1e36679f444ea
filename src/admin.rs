//! The admin HTTP listener: health, readiness, status and Prometheus
//! metrics for probes and operators. It reads the shared status and never
//! steers anything. With `admin.auth`, `/api/*` and `/metrics` need HTTP
//! basic auth; `/healthz` and `/readyz` stay open for probes.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::extract::{Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine as _;

use crate::config::Config;
use crate::status::SharedStatus;
use crate::telemetry::prometheus;

/// Credentials `/api/*` and `/metrics` require.
pub struct BasicAuth {
    username: String,
    password: String,
}

impl BasicAuth {
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Self {
        BasicAuth { username: username.into(), password: password.into() }
    }

    /// Whether an `Authorization` header carries these credentials.
    pub fn accepts(&self, header: Option<&HeaderValue>) -> bool {
        let Some(value) = header.and_then(|h| h.to_str().ok()) else { return false };
        let Some((scheme, encoded)) = value.trim().split_once(' ') else { return false };
        if !scheme.eq_ignore_ascii_case("basic") {
            return false;
        }
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
            return false;
        };
        let Some(colon) = decoded.iter().position(|&b| b == b':') else { return false };
        let (user, pass) = (&decoded[..colon], &decoded[colon + 1..]);
        // Both compared in full, so the time taken says nothing about which failed.
        let user_ok = same(user, self.username.as_bytes());
        let pass_ok = same(pass, self.password.as_bytes());
        user_ok & pass_ok
    }
}

/// Compares without stopping at the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Clone)]
struct AppState {
    status: SharedStatus,
    metrics: Arc<prometheus::Endpoint>,
}

/// The routes; `auth` guards `/api/*` and `/metrics`.
pub fn router(status: SharedStatus, metrics: prometheus::Endpoint, auth: Option<BasicAuth>) -> Router {
    let guarded =
        Router::new().route("/api/v1/status", get(status_json)).route("/metrics", get(metrics_text));
    let guarded = match auth {
        Some(auth) => guarded.route_layer(middleware::from_fn_with_state(Arc::new(auth), require_auth)),
        None => guarded,
    };
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(guarded)
        .with_state(AppState { status, metrics: Arc::new(metrics) })
}

/// 200 `ok` while the process serves and its data-plane worker answers;
/// 503 with the reason otherwise.
async fn healthz(State(app): State<AppState>) -> (StatusCode, String) {
    match app.status.read().unhealthy_reason(crate::provider::unix_ms()) {
        None => (StatusCode::OK, "ok\n".into()),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

async fn require_auth(State(auth): State<Arc<BasicAuth>>, req: Request, next: Next) -> Response {
    if auth.accepts(req.headers().get(AUTHORIZATION)) {
        next.run(req).await
    } else {
        let challenge = [(WWW_AUTHENTICATE, "Basic realm=\"xlb\", charset=\"UTF-8\"")];
        (StatusCode::UNAUTHORIZED, challenge, "unauthorized\n").into_response()
    }
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    match s.status.read().not_ready_reason() {
        None => (StatusCode::OK, "ready\n".to_string()),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

async fn status_json(State(s): State<AppState>) -> impl IntoResponse {
    Json(s.status.read())
}

async fn metrics_text(State(s): State<AppState>) -> impl IntoResponse {
    ([(CONTENT_TYPE, prometheus::CONTENT_TYPE)], s.metrics.render())
}

/// Binds `admin.address:admin.port` now (so a taken port fails startup
/// clearly) and serves in the background. The basic-auth password is read
/// from its environment variable here, once.
pub async fn serve(cfg: &Config, status: SharedStatus) -> Result<tokio::task::JoinHandle<()>> {
    let addr = SocketAddr::new(cfg.admin.address, cfg.admin.port);
    let auth = match &cfg.admin.auth {
        None => None,
        Some(a) => {
            let password = a.password().with_context(|| {
                format!("admin.auth.password_env: {} is not set or empty", a.password_env)
            })?;
            Some(BasicAuth::new(a.username.clone(), password))
        }
    };
    let guarded = if auth.is_some() { " (basic auth on /metrics and /api/*)" } else { "" };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the admin listener on {addr}"))?;
    let app = router(status.clone(), crate::telemetry::prometheus_endpoint(cfg, status), auth);
    tracing::info!(%addr, "admin listener up: /healthz /readyz /metrics /api/v1/status{guarded}");
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("admin listener failed: {e}");
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(user_pass: &str) -> HeaderValue {
        let encoded = base64::engine::general_purpose::STANDARD.encode(user_pass);
        HeaderValue::from_str(&format!("Basic {encoded}")).unwrap()
    }

    #[test]
    fn basic_auth_accepts_only_the_exact_credentials() {
        let auth = BasicAuth::new("ops", "s3cret:with:colons");
        assert!(auth.accepts(Some(&basic("ops:s3cret:with:colons"))));
        let lower = HeaderValue::from_str(
            basic("ops:s3cret:with:colons").to_str().unwrap().replace("Basic", "basic").as_str(),
        );
        assert!(auth.accepts(Some(&lower.unwrap())));
        for wrong in ["ops:s3cret", "ops:s3cret:with:colons ", "opz:s3cret:with:colons", ":", "ops"] {
            assert!(!auth.accepts(Some(&basic(wrong))), "{wrong}");
        }
        assert!(!auth.accepts(None));
        assert!(!auth.accepts(Some(&HeaderValue::from_static("Bearer abc"))));
        assert!(!auth.accepts(Some(&HeaderValue::from_static("Basic !!!notbase64"))));
    }
}
