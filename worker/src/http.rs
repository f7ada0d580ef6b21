//! The worker's HTTP API (axum): health, readiness, metrics, status, load, placement, remap.

use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Json, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use moe_api::{API_PREFIX, AUTH_SCHEME, ApiError, RemapRequest};

use crate::state::{Refusal, Shared};

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route(&format!("{API_PREFIX}/status"), get(status))
        .route(&format!("{API_PREFIX}/load"), get(load))
        .route(&format!("{API_PREFIX}/placement"), get(placement))
        .route(&format!("{API_PREFIX}/model"), get(model))
        .route(&format!("{API_PREFIX}/remap"), post(remap))
        .with_state(shared)
}

fn error(code: StatusCode, msg: impl Into<String>) -> Response {
    (
        code,
        Json(ApiError {
            error: msg.into(),
            reason: None,
        }),
    )
        .into_response()
}

/// 409 with the machine-readable kind of conflict.
fn conflict(reason: &str, msg: String) -> Response {
    (
        StatusCode::CONFLICT,
        Json(ApiError {
            error: msg,
            reason: Some(reason.into()),
        }),
    )
        .into_response()
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(s): State<Arc<Shared>>) -> Response {
    if s.is_ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: forming the group or loading weights",
        )
            .into_response()
    }
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    let text = match s.local_peers.get() {
        Some(peers) => {
            let mut all = vec![s.metrics.registry.clone()];
            all.extend(peers.iter().cloned());
            crate::metrics::render_merged(&all)
        }
        None => s.metrics.render(),
    };
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn status(State(s): State<Arc<Shared>>) -> Response {
    Json(s.status()).into_response()
}

/// `?history=N`: also the newest N closed windows (at most `MAX_LOAD_HISTORY`).
#[derive(Debug, serde::Deserialize)]
struct LoadQuery {
    #[serde(default)]
    history: usize,
}

async fn load(State(s): State<Arc<Shared>>, Query(q): Query<LoadQuery>) -> Response {
    Json(s.load_report(q.history)).into_response()
}

/// The model description (read-only): family, MoE decoder layers, gating, shared experts,
/// dtypes, tensor names.
async fn model(State(s): State<Arc<Shared>>) -> Response {
    Json(&*s.model).into_response()
}

async fn placement(State(s): State<Arc<Shared>>) -> Response {
    match s.lock().placement.clone() {
        Some(p) => Json(p).into_response(),
        None => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no placement yet: the group has not formed",
        ),
    }
}

/// The token of an `Authorization: Bearer <token>` header, when the request has one.
pub(crate) fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix(AUTH_SCHEME))
        .and_then(|v| v.strip_prefix(' '))
        .map(str::trim)
}

/// Constant-time comparison of the presented and the expected token.
pub(crate) fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorize(s: &Shared, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let Some(path) = &s.token_file else {
        return Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            "mutating calls are disabled: no control token configured (--control-token-file)",
        )));
    };
    // Read on every call so a rotated Secret takes effect without a restart.
    let expected = std::fs::read_to_string(path).map_err(|e| {
        Box::new(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot read the control token file: {e}"),
        ))
    })?;
    let expected = expected.trim();
    if expected.is_empty() {
        return Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            "the control token file is empty",
        )));
    }
    let presented = bearer_token(headers);
    match presented {
        Some(t) if same(t.as_bytes(), expected.as_bytes()) => Ok(()),
        Some(_) => Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            "invalid bearer token",
        ))),
        None => Err(Box::new(
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, AUTH_SCHEME)],
                Json(ApiError {
                    error: "missing `Authorization: Bearer <token>`".into(),
                    reason: None,
                }),
            )
                .into_response(),
        )),
    }
}

async fn remap(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Result<Json<RemapRequest>, JsonRejection>,
) -> Response {
    if let Err(r) = authorize(&s, &headers) {
        return *r;
    }
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("malformed request: {}", e.body_text()),
            );
        }
    };
    match s.submit_remap(req) {
        Ok(p) => (StatusCode::ACCEPTED, Json(p)).into_response(),
        Err(Refusal::Malformed(m)) => error(StatusCode::BAD_REQUEST, m),
        Err(Refusal::Diverged(m)) => conflict(moe_api::CONFLICT_DIVERGED, m),
        Err(Refusal::Busy(m)) => conflict(moe_api::CONFLICT_BUSY, m),
        Err(Refusal::NotReady(m)) => error(StatusCode::SERVICE_UNAVAILABLE, m),
    }
}
