//! What the spec implies (ranks per node and per pod, slots, ...) and its semantic checks:
//! [`MoEDeploymentSpec::validate`] mirrors the CEL rules of the schema, so that a resource that
//! slipped past them (an old CRD, a test) never crashes the controller.

use super::*;

/// Why a spec cannot be acted on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    pub field: &'static str,
    pub message: String,
}

impl std::fmt::Display for SpecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl MoEDeploymentSpec {
    /// Ranks per node in effect.
    pub fn ranks_per_node(&self) -> u32 {
        self.expert_parallel
            .ranks_per_node
            .unwrap_or(self.expert_parallel.ranks)
    }

    /// Ranks per worker pod in effect (`ranksPerPod`, default 1).
    pub fn ranks_per_pod(&self) -> u32 {
        self.expert_parallel.ranks_per_pod.unwrap_or(1).max(1)
    }

    /// Worker pods of the group (`ranks / ranksPerPod`).
    pub fn num_pods(&self) -> u32 {
        self.expert_parallel.ranks / self.ranks_per_pod()
    }

    /// Nodes of the group (`ranks / ranksPerNode`).
    pub fn num_nodes(&self) -> u32 {
        let per_node = self.ranks_per_node().max(1);
        (self.expert_parallel.ranks / per_node).max(1)
    }

    /// The same checks as the CRD's CEL rules, for specs that did not go through them.
    pub fn validate(&self) -> Result<(), SpecError> {
        let m = &self.model;
        let ep = &self.expert_parallel;
        let err = |field, message: String| Err(SpecError { field, message });
        if m.num_layers == 0 {
            return err("spec.model.numLayers", "must be at least 1".into());
        }
        if m.num_experts == 0 {
            return err("spec.model.numExperts", "must be at least 1".into());
        }
        if m.hidden == 0 || m.intermediate == 0 {
            return err(
                "spec.model.hidden",
                "hidden and intermediate must be at least 1".into(),
            );
        }
        if m.top_k == 0 || m.top_k > m.num_experts {
            return err(
                "spec.model.topK",
                format!("must be between 1 and numExperts ({})", m.num_experts),
            );
        }
        if m.expert_groups == 0 || !m.num_experts.is_multiple_of(m.expert_groups) {
            return err(
                "spec.model.expertGroups",
                format!("must divide numExperts ({})", m.num_experts),
            );
        }
        if m.topk_groups == 0 || m.topk_groups > m.expert_groups {
            return err(
                "spec.model.topkGroups",
                "must be between 1 and expertGroups".into(),
            );
        }
        if ep.ranks == 0 {
            return err("spec.expertParallel.ranks", "must be at least 1".into());
        }
        if let Some(per_node) = ep.ranks_per_node
            && (per_node == 0 || !ep.ranks.is_multiple_of(per_node))
        {
            return err(
                "spec.expertParallel.ranksPerNode",
                format!("must divide ranks ({})", ep.ranks),
            );
        }
        if let Some(per_pod) = ep.ranks_per_pod {
            if per_pod == 0 || !ep.ranks.is_multiple_of(per_pod) {
                return err(
                    "spec.expertParallel.ranksPerPod",
                    format!("must divide ranks ({})", ep.ranks),
                );
            }
            let last = |p: u16| u32::from(p) + per_pod - 1;
            let (http, comm) = (
                u32::from(self.worker.http_port),
                u32::from(self.worker.comm_port),
            );
            if http <= last(self.worker.comm_port) && comm <= last(self.worker.http_port) {
                return err(
                    "spec.expertParallel.ranksPerPod",
                    format!(
                        "the pod's ranks listen on httpPort {http}..{} and commPort {comm}..{}, \
                         which overlap: move one of the ports",
                        last(self.worker.http_port),
                        last(self.worker.comm_port)
                    ),
                );
            }
            if self.worker.backend == Backend::Cuda
                && let Some(gpus) = self
                    .worker
                    .resources
                    .as_ref()
                    .and_then(|r| r.limits.as_ref())
                    .and_then(|l| l.get(GPU_RESOURCE))
                && gpus.0.trim().parse::<u32>().is_ok_and(|g| g != per_pod)
            {
                return err(
                    "spec.worker.resources",
                    format!(
                        "limits.nvidia.com/gpu is {} but each of the pod's {per_pod} ranks \
                         (spec.expertParallel.ranksPerPod) uses one GPU: set it to {per_pod} or \
                         leave it out",
                        gpus.0
                    ),
                );
            }
            if last(self.worker.http_port) > 65535 || last(self.worker.comm_port) > 65535 {
                return err(
                    "spec.expertParallel.ranksPerPod",
                    "the pod's ranks listen on httpPort..httpPort+ranksPerPod-1 and \
                     commPort..commPort+ranksPerPod-1: lower the ports"
                        .into(),
                );
            }
            if let Some(per_node) = ep.ranks_per_node
                && !per_node.is_multiple_of(per_pod)
            {
                return err(
                    "spec.expertParallel.ranksPerPod",
                    format!("must divide ranksPerNode ({per_node}): a pod cannot span nodes"),
                );
            }
        }
        if self.worker.http_port == self.worker.comm_port {
            return err(
                "spec.worker.commPort",
                format!(
                    "equals httpPort ({}): the HTTP API and the rendezvous need separate ports",
                    self.worker.http_port
                ),
            );
        }
        if let Some(e) = self
            .worker
            .env
            .iter()
            .flatten()
            .find(|e| PLACED_BY_OPERATOR.contains(&e.name.as_str()))
        {
            return err(
                "spec.worker.env",
                format!(
                    "{} is set by the operator from spec.expertParallel and spec.worker \
                     (ranks, ranksPerPod, httpPort, commPort) and spec.serving.port: remove it \
                     from worker.env",
                    e.name
                ),
            );
        }
        self.worker.pod.validate()?;
        if let Some(r) = ep.redundant_experts {
            if !(u64::from(m.num_experts) + u64::from(r)).is_multiple_of(u64::from(ep.ranks)) {
                return err(
                    "spec.expertParallel.redundantExperts",
                    format!(
                        "numExperts + redundantExperts ({}) must be divisible by ranks ({})",
                        u64::from(m.num_experts) + u64::from(r),
                        ep.ranks
                    ),
                );
            }
            if u64::from(r) > u64::from(m.num_experts) * u64::from(ep.ranks - 1) {
                return err(
                    "spec.expertParallel.redundantExperts",
                    "more replicas than the ranks can hold".into(),
                );
            }
        }
        let e = &self.eplb;
        if e.imbalance_threshold.is_nan() || e.imbalance_threshold <= 1.0 {
            return err("spec.eplb.imbalanceThreshold", "must be above 1.0".into());
        }
        if e.hysteresis.is_nan() || e.hysteresis < 0.0 || e.imbalance_threshold - e.hysteresis < 1.0
        {
            return err(
                "spec.eplb.hysteresis",
                "must be >= 0 with imbalanceThreshold - hysteresis >= 1.0".into(),
            );
        }
        if let Some(q) = &e.max_bytes_per_remap
            && crate::quantity::parse_bytes(&q.0).is_none()
        {
            return err(
                "spec.eplb.maxBytesPerRemap",
                format!("{:?} is not a byte quantity (e.g. 8Gi)", q.0),
            );
        }
        match (self.placement.strategy, &self.placement.static_map) {
            (PlacementStrategy::Static, None) => {
                return err(
                    "spec.placement.staticMap",
                    "required with strategy Static".into(),
                );
            }
            (PlacementStrategy::Linear | PlacementStrategy::RoundRobin, Some(_)) => {
                return err(
                    "spec.placement.staticMap",
                    "only allowed with strategy Static".into(),
                );
            }
            _ => {}
        }
        let rp = &self.group_restart_policy;
        if rp.initial_backoff_seconds > rp.max_backoff_seconds {
            return err(
                "spec.groupRestartPolicy.initialBackoffSeconds",
                "must be at most maxBackoffSeconds".into(),
            );
        }
        if rp.window_seconds == 0 {
            return err(
                "spec.groupRestartPolicy.windowSeconds",
                "must be at least 1".into(),
            );
        }
        self.validate_serving()?;
        if self.weights.synthetic.is_some() && self.weights.persistent_volume_claim.is_some() {
            return err(
                "spec.weights",
                "set at most one of synthetic or persistentVolumeClaim".into(),
            );
        }
        Ok(())
    }
}
