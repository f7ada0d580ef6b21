//! Owned objects by server-side apply (field manager `moe-operator`, forced: the operator owns
//! every field it sets), and the refusal of an owned object's apply as a reportable error.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;

use crate::error::Error;
use crate::resources::{self, Names, Resolved};

pub(super) fn apply_params() -> PatchParams {
    PatchParams::apply(resources::FIELD_MANAGER).force()
}

pub(super) async fn apply<K>(api: &Api<K>, name: &str, obj: &K) -> Result<K, Error>
where
    K: Resource + Clone + Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    Ok(api.patch(name, &apply_params(), &Patch::Apply(obj)).await?)
}

/// [`apply`] of an owned object: a refusal by the API server (4xx) becomes
/// [`Error::Refused`], which the reconcile reports in status and as an event.
async fn apply_owned<K>(api: &Api<K>, name: &str, obj: &K) -> Result<K, Error>
where
    K: Resource<DynamicType = ()>
        + Clone
        + Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    match api.patch(name, &apply_params(), &Patch::Apply(obj)).await {
        Ok(o) => Ok(o),
        Err(e) => {
            let object = format!("{}/{name}", obj.meta().namespace.as_deref().unwrap_or(""));
            let kind = match K::kind(&()) {
                std::borrow::Cow::Borrowed(k) => k,
                std::borrow::Cow::Owned(_) => "object",
            };
            Err(
                match crate::apply_refusal::Refusal::from_error(kind, object, e) {
                    Ok(refusal) => Error::Refused(refusal),
                    Err(e) => Error::Kube(e),
                },
            )
        }
    }
}

/// The group's own objects, in the order the workers need them: ServiceAccount, headless
/// Service, PodDisruptionBudget, and last the StatefulSet (returned, for its hashes).
pub(super) async fn apply_group_objects(
    client: &Client,
    r: &Resolved,
    spec: &crate::crd::MoEDeploymentSpec,
) -> Result<StatefulSet, Error> {
    let (ns, names) = (&r.namespace, Names::new(&r.name));
    apply_owned(
        &Api::<ServiceAccount>::namespaced(client.clone(), ns),
        &names.service_account,
        &resources::service_account(r),
    )
    .await?;
    apply_owned(
        &Api::<Service>::namespaced(client.clone(), ns),
        &names.service,
        &resources::service(r, spec),
    )
    .await?;
    sync_disruption_budget(client, ns, r, spec).await?;
    let sts = resources::statefulset(r, spec);
    apply_owned(
        &Api::<StatefulSet>::namespaced(client.clone(), ns),
        &names.statefulset,
        &sts,
    )
    .await?;
    Ok(sts)
}

/// The group's PodDisruptionBudget: applied when enabled, deleted (if ours) when not.
async fn sync_disruption_budget(
    client: &Client,
    ns: &str,
    r: &Resolved,
    spec: &crate::crd::MoEDeploymentSpec,
) -> Result<(), Error> {
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    let api: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), ns);
    let name = Names::new(&r.name).disruption_budget;
    match resources::pod_disruption_budget(r, spec) {
        Some(pdb) => {
            apply_owned(&api, &name, &pdb).await?;
        }
        None => {
            let ours = api.get_opt(&name).await?.is_some_and(|p| {
                p.owner_references()
                    .iter()
                    .any(|o| o.controller == Some(true) && o.uid == r.owner.uid)
            });
            if ours {
                match api.delete(&name, &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    Ok(())
}
