//! The operator's Kubernetes client: kube's defaults, without kube's built-in retries.
//!
//! kube-client 5's default stack retries every request answered 429, 503 or 504 up to 15
//! times, backing off exponentially from 5 ms up to 1000 s and sleeping for the server's
//! `Retry-After` when it asks for longer (`Config::default_retry`, `RetryPolicy::server_retry`).
//! One API call can then take minutes, and the caller cannot tell: a reconcile holds its
//! object that long, and the leader's renewal only ends because `leader.rs` bounds every call
//! with what is left of the renew deadline. Each call here is one request; the callers retry
//! on their own schedules, which already bound them:
//! - the controller requeues a failed reconcile with its error backoff (2 s doubling to 300 s);
//! - the leader tries to renew every `retry_interval` while the renew deadline lasts, each
//!   attempt within what is left of it, and stops leading when it passes.

//!
//! Calls (gets, applies, status writes, Lease renewals) also get a read timeout: kube's default
//! has none, so an API server that accepts a request and never answers would hold a reconcile
//! forever. Watches cannot have one (a quiet watch legitimately sends nothing for minutes; kube's
//! watcher has its own idle timeout), so they use a second client without it.

use std::time::Duration;

use kube::{Client, Config};

/// How long a call waits for the API server's answer (watches excepted). Long above any answer a
/// healthy API server takes, well under the controller's backoff ceiling.
pub const CALL_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// `config` with kube's default retry turned off.
pub fn without_retries(mut config: Config) -> Config {
    config.default_retry = false;
    config
}

/// `config` for calls: no retries, and an answer within `read_timeout` of sending the request
/// (the timeout counts from the write, not from when a pooled connection went idle).
pub fn for_calls(config: Config, read_timeout: Duration) -> Config {
    let mut config = without_retries(config);
    config.read_timeout = Some(read_timeout);
    config.reset_reader_on_write = true;
    config
}

/// The operator's two clients, from the environment (in-cluster or kubeconfig).
pub struct Clients {
    /// One request per call, each answered within [`CALL_READ_TIMEOUT`].
    pub calls: Client,
    /// For the controller's watches: one request per call, no read timeout.
    pub watches: Client,
}

pub async fn clients() -> anyhow::Result<Clients> {
    let config = Config::infer().await?;
    Ok(Clients {
        calls: Client::try_from(for_calls(config.clone(), CALL_READ_TIMEOUT))?,
        watches: Client::try_from(without_retries(config))?,
    })
}
