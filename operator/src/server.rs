//! Health and metrics endpoints of the operator process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::metrics::Metrics;

#[derive(Clone)]
pub struct ServerState {
    pub metrics: Metrics,
    /// False until the process has a Kubernetes client (readiness).
    pub ready: Arc<AtomicBool>,
    /// Whether this replica leads (shown on /readyz's body; followers are ready too).
    pub leader: Arc<AtomicBool>,
}

pub fn router(state: ServerState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(s): State<ServerState>) -> (StatusCode, String) {
    if s.ready.load(Ordering::Relaxed) {
        let role = if s.leader.load(Ordering::Relaxed) {
            "leader"
        } else {
            "follower"
        };
        (StatusCode::OK, format!("ok ({role})"))
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting".into())
    }
}

async fn metrics(
    State(s): State<ServerState>,
) -> (StatusCode, [(&'static str, &'static str); 1], String) {
    (
        StatusCode::OK,
        [("content-type", "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}

pub async fn serve(addr: SocketAddr, state: ServerState) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, router(state)).await
}
