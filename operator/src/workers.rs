//! HTTP client of the worker ranks' API (`/v1/status`, `/v1/load`, `POST /v1/remap`).
//!
//! Behind a trait so the reconciler can be tested without workers.

use std::time::Duration;

use futures::future::BoxFuture;
use moe_api::{ApiError, LoadReport, RemapRequest, WorkerStatus};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("request to {url} failed: {message}")]
    Transport { url: String, message: String },
    #[error("{url} answered {status}: {message}")]
    Status {
        url: String,
        status: u16,
        message: String,
        /// The worker's machine-readable reason (409: `Diverged` or `Busy`).
        reason: Option<String>,
    },
    #[error("{url} answered with a body that does not parse: {message}")]
    Body { url: String, message: String },
}

impl WorkerError {
    /// 409: the worker refused an older generation than it serves or moves to.
    pub fn is_conflict(&self) -> bool {
        matches!(self, WorkerError::Status { status: 409, .. })
    }

    /// 401: the worker does not accept the token presented.
    pub fn is_unauthorized(&self) -> bool {
        matches!(self, WorkerError::Status { status: 401, .. })
    }

    /// 409 `Diverged`: the rank serves or accepted another placement under this generation
    /// number or a newer one (someone else drove it); it cannot converge on the request.
    pub fn is_diverged(&self) -> bool {
        matches!(self, WorkerError::Status { status: 409, reason: Some(r), .. } if r == moe_api::CONFLICT_DIVERGED)
    }
}

/// One rank's API endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub rank: usize,
    /// `http://host:port`
    pub base_url: String,
}

impl Endpoint {
    pub fn new(rank: usize, ip: &str, port: u16) -> Self {
        let host = if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip.to_string()
        };
        Self {
            rank,
            base_url: format!("http://{host}:{port}"),
        }
    }
}

pub trait WorkerApi: Send + Sync {
    fn status<'a>(&'a self, ep: &'a Endpoint) -> BoxFuture<'a, Result<WorkerStatus, WorkerError>>;
    fn load<'a>(&'a self, ep: &'a Endpoint) -> BoxFuture<'a, Result<LoadReport, WorkerError>>;
    /// The report with the newest `windows` closed windows (`GET /v1/load?history=N`), asked
    /// for only when planning. The default (test fakes) reports no past windows.
    fn load_with_history<'a>(
        &'a self,
        ep: &'a Endpoint,
        windows: usize,
    ) -> BoxFuture<'a, Result<LoadReport, WorkerError>> {
        let _ = windows;
        self.load(ep)
    }
    fn remap<'a>(
        &'a self,
        ep: &'a Endpoint,
        token: &'a str,
        request: &'a RemapRequest,
    ) -> BoxFuture<'a, Result<(), WorkerError>>;
}

/// The real client (reqwest, short timeouts: a slow rank must not stall reconciliation).
#[derive(Clone)]
pub struct HttpWorkers {
    client: reqwest::Client,
}

impl HttpWorkers {
    pub fn new(timeout: Duration) -> anyhow::Result<Self> {
        Ok(Self {
            client: reqwest::Client::builder()
                .timeout(timeout)
                .connect_timeout(timeout)
                .build()?,
        })
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        url: String,
    ) -> Result<T, WorkerError> {
        let resp = self
            .client
            .get(&url)
            .send()
            .await
            .map_err(|e| WorkerError::Transport {
                url: url.clone(),
                message: e.to_string(),
            })?;
        decode(url, resp).await
    }
}

async fn decode<T: serde::de::DeserializeOwned>(
    url: String,
    resp: reqwest::Response,
) -> Result<T, WorkerError> {
    let status = resp.status();
    let bytes = resp.bytes().await.map_err(|e| WorkerError::Transport {
        url: url.clone(),
        message: e.to_string(),
    })?;
    if !status.is_success() {
        let (message, reason) = match serde_json::from_slice::<ApiError>(&bytes) {
            Ok(e) => (e.error, e.reason),
            Err(_) => (
                String::from_utf8_lossy(&bytes).chars().take(200).collect(),
                None,
            ),
        };
        return Err(WorkerError::Status {
            url,
            status: status.as_u16(),
            message,
            reason,
        });
    }
    serde_json::from_slice(&bytes).map_err(|e| WorkerError::Body {
        url,
        message: e.to_string(),
    })
}

impl WorkerApi for HttpWorkers {
    fn status<'a>(&'a self, ep: &'a Endpoint) -> BoxFuture<'a, Result<WorkerStatus, WorkerError>> {
        Box::pin(self.get_json(format!("{}{}/status", ep.base_url, moe_api::API_PREFIX)))
    }

    fn load<'a>(&'a self, ep: &'a Endpoint) -> BoxFuture<'a, Result<LoadReport, WorkerError>> {
        Box::pin(self.get_json(format!("{}{}/load", ep.base_url, moe_api::API_PREFIX)))
    }

    fn load_with_history<'a>(
        &'a self,
        ep: &'a Endpoint,
        windows: usize,
    ) -> BoxFuture<'a, Result<LoadReport, WorkerError>> {
        Box::pin(self.get_json(format!(
            "{}{}/load?history={windows}",
            ep.base_url,
            moe_api::API_PREFIX
        )))
    }

    fn remap<'a>(
        &'a self,
        ep: &'a Endpoint,
        token: &'a str,
        request: &'a RemapRequest,
    ) -> BoxFuture<'a, Result<(), WorkerError>> {
        Box::pin(async move {
            let url = format!("{}{}/remap", ep.base_url, moe_api::API_PREFIX);
            let resp = self
                .client
                .post(&url)
                .header(
                    http::header::AUTHORIZATION,
                    format!("{} {token}", moe_api::AUTH_SCHEME),
                )
                .json(request)
                .send()
                .await
                .map_err(|e| WorkerError::Transport {
                    url: url.clone(),
                    message: e.to_string(),
                })?;
            let _: serde_json::Value = decode(url, resp).await.or_else(|e| match e {
                WorkerError::Body { .. } => Ok(serde_json::Value::Null),
                other => Err(other),
            })?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_bracket_ipv6() {
        assert_eq!(
            Endpoint::new(0, "10.0.0.1", 8080).base_url,
            "http://10.0.0.1:8080"
        );
        assert_eq!(
            Endpoint::new(1, "fd00::1", 80).base_url,
            "http://[fd00::1]:80"
        );
    }
}
