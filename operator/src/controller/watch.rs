//! Watch wiring: what the controller watches, which deployment each event concerns, and the
//! error backoff.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use tracing::warn;

use super::context::Context;
use super::reconcile::reconcile;
use crate::crd::MoEDeployment;
use crate::error::Error;

/// Runs the controller until the stream ends (shutdown signal).
pub async fn run(ctx: Arc<Context>, namespace: Option<String>) {
    let client = ctx.watch_client.clone();
    let (moeds, stss, cms): (Api<MoEDeployment>, Api<StatefulSet>, Api<ConfigMap>) =
        match &namespace {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
            None => (
                Api::all(client.clone()),
                Api::all(client.clone()),
                Api::all(client.clone()),
            ),
        };
    let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=moe-operator");
    let metrics = ctx.metrics.clone();
    let forget_ctx = ctx.clone();
    let controller = Controller::new(moeds, watcher::Config::default());
    let store = controller.store();
    let mapper_ctx = ctx.clone();
    let sts_ctx = ctx.clone();
    controller
        // Owned StatefulSets (their status moves when a rank's pod fails or becomes ready):
        // like `owns`, but the event is not mistaken for the echo of our status write.
        .watches(stss, owned, move |sts| {
            let refs = controller_owner(&sts);
            for r in &refs {
                sts_ctx.forget_own_write(r.namespace.as_deref().unwrap_or(""), &r.name);
            }
            refs
        })
        // Static maps are the user's ConfigMaps (no label to select them by): a created, fixed
        // or deleted map, or a change to an owned placement ConfigMap, reconciles at once.
        .watches(cms, watcher::Config::default(), move |cm| {
            let refs = deployments_for_configmap(&cm, &store.state());
            for r in &refs {
                mapper_ctx.forget_own_write(r.namespace.as_deref().unwrap_or(""), &r.name);
            }
            refs
        })
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|res| {
            let metrics = metrics.clone();
            let forget_ctx = forget_ctx.clone();
            async move {
                match res {
                    Ok(_) => {}
                    // A deleted deployment: owner references clean up; drop its series.
                    Err(kube::runtime::controller::Error::ObjectNotFound(r)) => {
                        let ns = r.namespace.as_deref().unwrap_or("");
                        metrics.forget(ns, &r.name);
                        forget_ctx.set_plan_hold(ns, &r.name, None);
                    }
                    Err(e) => warn!(error = %e, "reconcile failed"),
                }
            }
        })
        .await;
}

/// Requeue with exponential backoff per object.
pub fn error_policy(moed: Arc<MoEDeployment>, error: &Error, ctx: Arc<Context>) -> Action {
    let n = ctx.record_failure(&moed);
    let (base, cap) = ctx.settings.error_backoff;
    let delay = base
        .checked_mul(1u32 << n.min(16).saturating_sub(1))
        .unwrap_or(cap)
        .min(cap);
    warn!(name = %moed.name_any(), namespace = ?moed.namespace(), error = %error, retry_in = ?delay, "reconcile error");
    Action::requeue(delay)
}

/// The MoEDeployment that controls an object (owner reference with `controller: true`).
pub fn controller_owner<K: Resource>(obj: &K) -> Vec<ObjectRef<MoEDeployment>> {
    let Some(ns) = obj.meta().namespace.as_deref() else {
        return Vec::new();
    };
    obj.owner_references()
        .iter()
        .filter(|o| {
            o.controller == Some(true)
                && o.kind == crate::crd::KIND
                && o.api_version.starts_with(crate::crd::GROUP)
        })
        .map(|o| ObjectRef::new(&o.name).within(ns))
        .collect()
}

/// The deployments a ConfigMap event concerns: its controller owner (the placement ConfigMap)
/// and every deployment of its namespace whose `spec.placement.staticMap` names it.
pub fn deployments_for_configmap(
    cm: &ConfigMap,
    moeds: &[Arc<MoEDeployment>],
) -> Vec<ObjectRef<MoEDeployment>> {
    let Some(ns) = cm.namespace() else {
        return Vec::new();
    };
    let name = cm.name_any();
    let mut out = controller_owner(cm);
    for m in moeds {
        if m.namespace().as_deref() == Some(ns.as_str())
            && m.spec
                .placement
                .static_map
                .as_ref()
                .is_some_and(|r| r.name == name)
        {
            let r = ObjectRef::from_obj(m.as_ref());
            if !out.contains(&r) {
                out.push(r);
            }
        }
    }
    out
}
