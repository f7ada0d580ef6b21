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

use kube::{Client, Config};

/// `config` with kube's default retry turned off.
pub fn without_retries(mut config: Config) -> Config {
    config.default_retry = false;
    config
}

/// A client from the environment (in-cluster or kubeconfig), one request per call.
pub async fn client() -> anyhow::Result<Client> {
    let config = Config::infer().await?;
    Ok(Client::try_from(without_retries(config))?)
}
