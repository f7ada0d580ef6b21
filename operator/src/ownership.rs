//! The operator writes objects of fixed names (`<name>`, `<name>-workers`, `<name>-placement`,
//! ...) with server-side apply and `force`, which would silently take over a user's object of
//! the same name: their ConfigMap rewritten, their Service repointed. So before the first write
//! of a reconcile every fixed name is read, and one that exists without this MoEDeployment as
//! its controller owner stops the reconcile with `Degraded/NameConflict`, saying which object,
//! who controls it and what to do; nothing is written until it is gone.
//!
//! Secrets are the exception: the operator may not read them (least privilege), and it never
//! writes an existing one either; it only creates its token Secrets ([`crate::tokens`]). A
//! user's Secret of the same name is therefore never taken over, and it shows as
//! `Degraded/TokenMismatch` when the workers report holding another token than the operator
//! derived (see `token_secrets::mismatch`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::Api;
use kube::{Client, Resource};
use serde::de::DeserializeOwned;

use crate::conditions::Problem;
use crate::crd::MoEDeploymentSpec;
use crate::resources::{ControlPlanePeers, Names, Resolved};

/// How long a deployment whose names were all found free or ours is not checked again. The
/// check costs a GET per name (quorum reads) and a reconcile runs every poll interval; an
/// object of ours can only become someone else's by being deleted and recreated by them.
pub const RECHECK_AFTER: Duration = Duration::from_secs(300);

/// Deployments whose names were checked recently, by `namespace/name`: the uid and what the
/// check covered (serving, NetworkPolicy), and when.
#[derive(Default)]
pub struct Checked(Mutex<HashMap<String, (String, bool, bool, Instant)>>);

impl Checked {
    fn fresh(&self, r: &Resolved, serving: bool, policy: bool) -> bool {
        let key = format!("{}/{}", r.namespace, r.name);
        self.0.lock().ok().is_some_and(|m| {
            m.get(&key).is_some_and(|(uid, s, p, at)| {
                *uid == r.owner.uid && *s == serving && *p == policy && at.elapsed() < RECHECK_AFTER
            })
        })
    }

    fn record(&self, r: &Resolved, serving: bool, policy: bool) {
        if let Ok(mut m) = self.0.lock() {
            m.insert(
                format!("{}/{}", r.namespace, r.name),
                (r.owner.uid.clone(), serving, policy, Instant::now()),
            );
        }
    }

    fn forget(&self, r: &Resolved) {
        if let Ok(mut m) = self.0.lock() {
            m.remove(&format!("{}/{}", r.namespace, r.name));
        }
    }
}

/// Reason of the Degraded condition when a fixed name belongs to someone else.
pub const NAME_CONFLICT: &str = "NameConflict";

/// Why `obj` may not be written by the deployment with uid `owner_uid` (`None`: it is ours).
pub fn foreign_owner<K: Resource>(obj: &K, owner_uid: &str) -> Option<String> {
    let controller = obj
        .meta()
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true));
    match controller {
        Some(o) if o.uid == owner_uid => None,
        Some(o) => Some(format!("controlled by {} {}", o.kind, o.name)),
        None => Some("not created by this MoEDeployment (no controller owner)".into()),
    }
}

async fn check<K>(
    client: &Client,
    kind: &str,
    name: &str,
    r: &Resolved,
) -> Result<Option<Problem>, kube::Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), &r.namespace);
    let Some(obj) = api.get_opt(name).await? else {
        return Ok(None);
    };
    Ok(foreign_owner(&obj, &r.owner.uid).map(|why| {
        Problem::new(
            NAME_CONFLICT,
            format!(
                "{kind} {}/{name} exists and is {why}; the operator does not take it over: delete or rename it, or rename this MoEDeployment",
                r.namespace
            ),
        )
    }))
}

/// The first fixed name of this deployment's objects that someone else holds (`None`: all are
/// free or ours). Only the objects this spec needs: the expert Service while serving, the NetworkPolicy when the operator makes them, the PodDisruptionBudget unless
/// turned off. A deployment found clean is not
/// checked again for [`RECHECK_AFTER`] unless what it needs changes.
pub async fn taken_name(
    client: &Client,
    checked: &Checked,
    r: &Resolved,
    spec: &MoEDeploymentSpec,
    peers: &ControlPlanePeers,
) -> Result<Option<Problem>, kube::Error> {
    let (serving, policy) = (spec.serving_enabled(), peers.enabled);
    // The disruption budget is on unless turned off (spec.disruptionBudget.enabled).
    let budget = spec.disruption_budget.enabled;
    if checked.fresh(r, serving, policy) {
        return Ok(None);
    }
    let found = find_taken(client, r, serving, policy, budget).await?;
    match found {
        None => checked.record(r, serving, policy),
        Some(_) => checked.forget(r),
    }
    Ok(found)
}

async fn find_taken(
    client: &Client,
    r: &Resolved,
    serving: bool,
    policy: bool,
    budget: bool,
) -> Result<Option<Problem>, kube::Error> {
    let n = Names::new(&r.name);
    let mut found = [
        check::<ConfigMap>(client, "ConfigMap", &n.configmap, r).await?,
        check::<ServiceAccount>(client, "ServiceAccount", &n.service_account, r).await?,
        check::<Service>(client, "Service", &n.service, r).await?,
        check::<StatefulSet>(client, "StatefulSet", &n.statefulset, r).await?,
    ]
    .into_iter()
    .flatten()
    .next();
    if found.is_none() && serving {
        found = check::<Service>(client, "Service", &n.experts_service, r).await?;
    }
    if found.is_none() && policy {
        found = check::<NetworkPolicy>(client, "NetworkPolicy", &n.network_policy, r).await?;
    }
    if found.is_none() && budget {
        found =
            check::<PodDisruptionBudget>(client, "PodDisruptionBudget", &n.disruption_budget, r)
                .await?;
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Secret;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

    fn secret_owned_by(uid: Option<&str>) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some("demo-client-token".into()),
                owner_references: uid.map(|u| {
                    vec![OwnerReference {
                        api_version: "moe-operator.github.io/v1alpha1".into(),
                        kind: "MoEDeployment".into(),
                        name: "other".into(),
                        uid: u.into(),
                        controller: Some(true),
                        block_owner_deletion: None,
                    }]
                }),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn only_our_controller_reference_makes_an_object_ours() {
        assert_eq!(
            foreign_owner(&secret_owned_by(Some("uid-1")), "uid-1"),
            None
        );
        assert!(
            foreign_owner(&secret_owned_by(Some("uid-2")), "uid-1")
                .unwrap()
                .contains("MoEDeployment other")
        );
        assert!(foreign_owner(&secret_owned_by(None), "uid-1").is_some());
    }
}
