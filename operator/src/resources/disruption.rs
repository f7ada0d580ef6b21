//! The group's PodDisruptionBudget (see [`crate::crd::DisruptionBudgetSpec`] for why).

use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{Names, Resolved, meta, selector_labels};
use crate::crd::MoEDeploymentSpec;

/// The PodDisruptionBudget `<name>` over the group's pods, or `None` when
/// `spec.disruptionBudget.enabled` is false.
pub fn pod_disruption_budget(
    r: &Resolved,
    spec: &MoEDeploymentSpec,
) -> Option<PodDisruptionBudget> {
    if !spec.disruption_budget.enabled {
        return None;
    }
    let names = Names::new(&r.name);
    Some(PodDisruptionBudget {
        metadata: meta(r, &names.disruption_budget),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(
                i32::try_from(spec.disruption_budget.max_unavailable).unwrap_or(i32::MAX),
            )),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&r.name)),
                match_expressions: None,
            }),
            // A pod that is not ready (the group is forming, or already broken) may be evicted:
            // it holds nothing a drain would lose, and keeping it would block drains for no gain.
            unhealthy_pod_eviction_policy: Some("AlwaysAllow".into()),
            ..Default::default()
        }),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::tests::resolved;

    #[test]
    fn zero_unavailable_over_the_group_by_default_owned_and_optional() {
        let mut spec = crate::crd::tests::sample_spec();
        let pdb = pod_disruption_budget(&resolved(), &spec).unwrap();
        assert_eq!(pdb.metadata.name.as_deref(), Some("demo"));
        assert_eq!(
            pdb.metadata.owner_references.as_ref().unwrap()[0].uid,
            "uid-1"
        );
        let s = pdb.spec.unwrap();
        assert_eq!(s.max_unavailable, Some(IntOrString::Int(0)));
        assert_eq!(s.min_available, None);
        assert_eq!(
            s.selector.unwrap().match_labels,
            Some(selector_labels("demo"))
        );
        spec.disruption_budget.max_unavailable = 1;
        let s = pod_disruption_budget(&resolved(), &spec)
            .unwrap()
            .spec
            .unwrap();
        assert_eq!(s.max_unavailable, Some(IntOrString::Int(1)));
        spec.disruption_budget.enabled = false;
        assert!(pod_disruption_budget(&resolved(), &spec).is_none());
    }
}
