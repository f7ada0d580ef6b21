//! What the group's pods show: readiness, rank, the hashes they were made for, restarts, and
//! how to reach their ranks.

use k8s_openapi::api::core::v1::Pod;
use kube::{Client, ResourceExt};

use super::status::Notes;
use crate::crd::{MoEDeploymentSpec, RankPod};
use crate::error::Error;
use crate::resources::{self, Names, Resolved};
use crate::workers::Endpoint;

pub(super) fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The pod's ordinal in the StatefulSet (its first rank is this times `ranksPerPod`).
pub(super) fn pod_index(pod: &Pod) -> Option<usize> {
    let label = pod.labels().get(resources::POD_INDEX_LABEL);
    moe_api::pods::ordinal(label.map(String::as_str), &pod.name_any())
}

pub(super) fn pod_hash(pod: &Pod) -> Option<&str> {
    pod.annotations()
        .get(resources::GROUP_HASH_ANNOTATION)
        .map(String::as_str)
}

/// Whether a pod was made for another spec than `desired` (its spec-hash annotation). A pod
/// without one (made by an operator release before spec hashes) is taken as current: an
/// upgrade must not restart running groups.
pub(super) fn pod_spec_stale(pod: &Pod, desired: &str) -> bool {
    pod.annotations()
        .get(resources::SPEC_HASH_ANNOTATION)
        .is_some_and(|h| h != desired)
}

/// Container restarts of a pod (all containers).
pub(super) fn pod_restarts(pod: &Pod) -> u32 {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map_or(0, |cs| {
            cs.iter()
                .map(|c| u32::try_from(c.restart_count).unwrap_or(0))
                .fold(0u32, u32::saturating_add)
        })
}

/// The group's live pods (uid, restarts), each under its first rank.
pub(super) fn rank_pods(pods: &[&Pod], ranks_per_pod: u32) -> Vec<RankPod> {
    let mut out: Vec<RankPod> = pods
        .iter()
        .filter_map(|p| {
            let rank = u32::try_from(pod_index(p)?)
                .ok()?
                .checked_mul(ranks_per_pod)?;
            Some(RankPod {
                rank,
                uid: p.uid().unwrap_or_else(|| p.name_any()),
                restarts: pod_restarts(p),
            })
        })
        .collect();
    out.sort_by_key(|p| p.rank);
    out.dedup_by_key(|p| p.rank);
    out
}

/// Each ready pod serves ranks `index*k .. index*k+k-1` on `httpPort + local rank`
/// (`k` = ranks per pod); in rank order.
pub(super) fn rank_endpoints(ready_pods: &[&Pod], per_pod: usize, http_port: u16) -> Vec<Endpoint> {
    let mut endpoints: Vec<Endpoint> = ready_pods
        .iter()
        .filter_map(|p| Some((pod_index(p)?, p.status.as_ref()?.pod_ip.as_deref()?)))
        .flat_map(|(index, ip)| {
            (0..per_pod).filter_map(move |local| {
                let port = u16::try_from(usize::from(http_port) + local).ok()?;
                Some(Endpoint::new(index * per_pod + local, ip, port))
            })
        })
        .collect();
    endpoints.sort_by_key(|e| e.rank);
    endpoints
}

/// What keeps pods from running, as problems (a Warning event on the transition; the condition
/// carries the problem meanwhile): pods the StatefulSet could not create (they show nothing
/// themselves: its events tell), unless the group is being replaced, and what the pods show.
pub(super) async fn report_pod_problems(
    client: &Client,
    r: &Resolved,
    spec: &MoEDeploymentSpec,
    pods: &[Pod],
    restarting: bool,
    notes: &mut Notes<'_>,
) -> Result<(), Error> {
    let statefulset = Names::new(&r.name).statefulset;
    if !restarting
        && pods.len() < spec.num_pods() as usize
        && let Some(p) = crate::pod_creation::read(client, &r.namespace, &statefulset).await?
    {
        notes.problem(p, "CreatePods");
    }
    for p in crate::pod_health::pod_problems(pods) {
        notes.problem(p, "Observe");
    }
    Ok(())
}
