//! Polling helpers for tests.

use std::fmt::Debug;
use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, ListParams};
use kube::core::NamespaceResourceScope;
use serde::de::DeserializeOwned;

/// Polls `f` every 250 ms until it returns `Ok(Some(v))`; errors from `f` are retried (the last
/// one is reported on timeout).
pub async fn until<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() > deadline {
            match last_err {
                Some(e) => {
                    bail!("timed out after {timeout:?} waiting for {what}; last error: {e:#}")
                }
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until the namespaced object `name` satisfies `cond`; returns it.
pub async fn object<K>(
    client: &Client,
    ns: &str,
    name: &str,
    timeout: Duration,
    cond: impl Fn(&K) -> bool,
) -> Result<K>
where
    K: kube::Resource<Scope = NamespaceResourceScope> + Clone + DeserializeOwned + Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let what = format!("{} {ns}/{name}", K::kind(&K::DynamicType::default()));
    until(timeout, &what, || {
        let api = api.clone();
        let cond = &cond;
        async move { Ok(api.get_opt(name).await?.filter(|o| cond(o))) }
    })
    .await
}

/// Waits until the namespaced object `name` no longer exists.
pub async fn deleted<K>(client: &Client, ns: &str, name: &str, timeout: Duration) -> Result<()>
where
    K: kube::Resource<Scope = NamespaceResourceScope> + Clone + DeserializeOwned + Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let what = format!(
        "deletion of {} {ns}/{name}",
        K::kind(&K::DynamicType::default())
    );
    until(timeout, &what, || {
        let api = api.clone();
        async move { Ok(api.get_opt(name).await?.is_none().then_some(())) }
    })
    .await
}

/// Whether the pod's `Ready` condition is true.
pub fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Waits until at least `n` pods match `selector` in `ns` and all of them are Ready; returns
/// them sorted by name.
pub async fn pods_ready(
    client: &Client,
    ns: &str,
    selector: &str,
    n: usize,
    timeout: Duration,
) -> Result<Vec<Pod>> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default().labels(selector);
    until(
        timeout,
        &format!("{n} ready pods matching {selector:?} in {ns}"),
        || {
            let api = api.clone();
            let lp = lp.clone();
            async move {
                let mut pods = api.list(&lp).await?.items;
                pods.retain(|p| p.metadata.deletion_timestamp.is_none());
                pods.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
                Ok((pods.len() >= n && pods.iter().all(pod_ready)).then_some(pods))
            }
        },
    )
    .await
}
