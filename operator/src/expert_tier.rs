//! The reconciler's part for the expert tier and the group's network isolation: the
//! `<name>-experts` Service, the `<name>-client-token` Secret and the `<name>-workers`
//! NetworkPolicy (desired objects in [`crate::resources`]), and `status.serving`. Their names
//! are checked by [`crate::ownership`] before anything is written.

use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Client, Resource};
use moe_api::WorkerStatus;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::info;

use crate::crd::{MoEDeploymentSpec, ServingStatus};
use crate::metrics::Metrics;
use crate::resources::{self, ControlPlanePeers, Names, Resolved};

fn apply_params() -> PatchParams {
    PatchParams::apply(resources::FIELD_MANAGER).force()
}

async fn apply<K>(api: &Api<K>, name: &str, obj: &K) -> Result<(), kube::Error>
where
    K: Resource + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    api.patch(name, &apply_params(), &Patch::Apply(obj)).await?;
    Ok(())
}

/// The objects of this module, written in one place, after [`crate::ownership`] found their
/// names free or ours. `was_serving`: the last status had `serving` (only then can there be an
/// expert Service to remove).
pub async fn reconcile_objects(
    client: &Client,
    r: &Resolved,
    spec: &MoEDeploymentSpec,
    peers: &ControlPlanePeers,
    was_serving: bool,
    client_token: &str,
    created: &crate::tokens::CreatedSecrets,
) -> Result<(), crate::error::Error> {
    let names = Names::new(&r.name);
    let services: Api<Service> = Api::namespaced(client.clone(), &r.namespace);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &r.namespace);
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), &r.namespace);
    let serving = spec.serving_enabled();
    if peers.enabled {
        let np = resources::network_policy(r, spec, peers);
        apply(&policies, &names.network_policy, &np).await?;
    }
    if serving {
        // Created once; never read back (see crate::tokens).
        crate::token_secrets::create_secret(
            &secrets,
            &resources::client_token_secret(r, client_token),
            client_token,
            created,
        )
        .await?;
        apply(
            &services,
            &names.experts_service,
            &resources::experts_service(r, spec),
        )
        .await?;
    } else if was_serving {
        // A group that stopped serving (its last status had `serving`) leaves no Service
        // pointing clients at a closed port. The token Secret stays (serving again derives the
        // same token the clients hold).
        if let Some(svc) = services.get_opt(&names.experts_service).await?
            && crate::ownership::foreign_owner(&svc, &r.owner.uid).is_none()
        {
            services
                .delete(&names.experts_service, &DeleteParams::default())
                .await?;
            info!(ns = %r.namespace, name = %r.name, "serving disabled: deleted the expert Service");
        }
    }
    Ok(())
}

/// `status.serving` of a group that serves (`None` otherwise), without the served rate.
pub fn status(r: &Resolved, spec: &MoEDeploymentSpec) -> Option<ServingStatus> {
    spec.serving_enabled().then(|| ServingStatus {
        endpoint: resources::service_endpoint(r, spec),
        rank_endpoints: resources::rank_endpoints(r, spec),
        client_token_secret: Names::new(&r.name).client_secret,
        served_rows_per_second: None,
    })
}

/// Records the rows per second the group served, from every rank's `GET /v1/status`.
pub fn record_served(
    serving: Option<&mut ServingStatus>,
    statuses: &[WorkerStatus],
    metrics: &Metrics,
    namespace: &str,
    name: &str,
) {
    let Some(serving) = serving else { return };
    let total: f64 = statuses
        .iter()
        .map(|s| s.served_rows_per_second)
        .filter(|v| v.is_finite() && *v >= 0.0)
        .sum();
    // Three significant decimals: a status that changes in the ninth digit is rewritten for
    // nothing.
    let total = (total * 1000.0).round() / 1000.0;
    serving.served_rows_per_second = Some(total);
    metrics
        .served_rows
        .with_label_values(&[namespace, name])
        .set(total);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_rows_are_summed_over_ranks() {
        let metrics = Metrics::new().unwrap();
        let status = |rps: f64| WorkerStatus {
            rank: 0,
            world_size: 2,
            ready: true,
            backend: "cpu".into(),
            placement_generation: 0,
            layer_generations: vec![],
            step: 0,
            tokens_per_second: 0.0,
            remap: None,
            traffic: "api".into(),
            served_rows_total: 0,
            served_rows_per_second: rps,
            control_token_id: None,
            client_token_id: None,
        };
        let mut s = ServingStatus::default();
        record_served(
            Some(&mut s),
            &[status(100.25), status(50.5), status(f64::NAN)],
            &metrics,
            "ml",
            "demo",
        );
        assert_eq!(s.served_rows_per_second, Some(150.75));
        assert!(metrics.render().contains(
            "moe_deployment_served_rows_per_second{name=\"demo\",namespace=\"ml\"} 150.75"
        ));
    }
}
