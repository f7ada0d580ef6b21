//! Prometheus metrics: controller-runtime's conventional names for the reconciler, plus the
//! deployments' imbalance and remap counters.

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

pub const CONTROLLER: &str = "moedeployment";

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub reconcile_total: IntCounterVec,
    pub reconcile_errors: IntCounterVec,
    pub reconcile_time: HistogramVec,
    pub imbalance: GaugeVec,
    pub worst_imbalance: GaugeVec,
    pub ready_ranks: IntGaugeVec,
    pub placement_generation: IntGaugeVec,
    pub remaps: IntCounterVec,
    pub remap_bytes: IntCounterVec,
    pub group_restarts: IntCounterVec,
    pub leader: IntGaugeVec,
    /// Rows per second a deployment's group answered through the forward API.
    pub served_rows: GaugeVec,
    /// Layers published per deployment, to remove stale series.
    layers: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<(String, String), usize>>>,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let reconcile_total = IntCounterVec::new(
            Opts::new(
                "controller_runtime_reconcile_total",
                "Total number of reconciliations per controller",
            ),
            &["controller", "result"],
        )?;
        let reconcile_errors = IntCounterVec::new(
            Opts::new(
                "controller_runtime_reconcile_errors_total",
                "Total number of reconciliation errors per controller",
            ),
            &["controller"],
        )?;
        let reconcile_time = HistogramVec::new(
            HistogramOpts::new(
                "controller_runtime_reconcile_time_seconds",
                "Length of time per reconciliation per controller",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["controller"],
        )?;
        let imbalance = GaugeVec::new(
            Opts::new(
                "moe_deployment_imbalance_ratio",
                "Peak-to-average rank load per MoE layer",
            ),
            &["namespace", "name", "layer"],
        )?;
        let worst_imbalance = GaugeVec::new(
            Opts::new(
                "moe_deployment_worst_imbalance_ratio",
                "Worst per-layer peak-to-average rank load",
            ),
            &["namespace", "name"],
        )?;
        let ready_ranks = IntGaugeVec::new(
            Opts::new("moe_deployment_ready_ranks", "Ready EP ranks"),
            &["namespace", "name"],
        )?;
        let placement_generation = IntGaugeVec::new(
            Opts::new(
                "moe_deployment_placement_generation",
                "Placement generation, desired (committed) and applied (served)",
            ),
            &["namespace", "name", "kind"],
        )?;
        let remaps = IntCounterVec::new(
            Opts::new(
                "moe_deployment_remaps_total",
                "Remaps by trigger and result",
            ),
            &["namespace", "name", "trigger", "result"],
        )?;
        let remap_bytes = IntCounterVec::new(
            Opts::new(
                "moe_deployment_remap_bytes_moved_total",
                "Expert weight bytes moved by remaps",
            ),
            &["namespace", "name"],
        )?;
        let group_restarts = IntCounterVec::new(
            Opts::new(
                "moe_deployment_group_restarts_total",
                "Whole-group restarts made by the operator",
            ),
            &["namespace", "name", "reason"],
        )?;
        let leader = IntGaugeVec::new(
            Opts::new(
                "leader_election_master_status",
                "1 while this replica holds the leader lease",
            ),
            &["name"],
        )?;
        registry.register(Box::new(reconcile_total.clone()))?;
        registry.register(Box::new(reconcile_errors.clone()))?;
        registry.register(Box::new(reconcile_time.clone()))?;
        registry.register(Box::new(imbalance.clone()))?;
        registry.register(Box::new(worst_imbalance.clone()))?;
        registry.register(Box::new(ready_ranks.clone()))?;
        registry.register(Box::new(placement_generation.clone()))?;
        registry.register(Box::new(remaps.clone()))?;
        registry.register(Box::new(remap_bytes.clone()))?;
        registry.register(Box::new(group_restarts.clone()))?;
        let served_rows = GaugeVec::new(
            Opts::new(
                "moe_deployment_served_rows_per_second",
                "Rows per second the worker group answered through the forward API (sum over ranks)",
            ),
            &["namespace", "name"],
        )?;
        registry.register(Box::new(served_rows.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        Ok(Self {
            registry,
            reconcile_total,
            reconcile_errors,
            reconcile_time,
            imbalance,
            worst_imbalance,
            ready_ranks,
            placement_generation,
            remaps,
            remap_bytes,
            group_restarts,
            leader,
            served_rows,
            layers: Default::default(),
        })
    }

    /// Publishes per-layer PARs (replacing a previous, possibly longer, set).
    pub fn set_imbalance(&self, namespace: &str, name: &str, layer_par: &[f64]) {
        for (layer, par) in layer_par.iter().enumerate() {
            self.imbalance
                .with_label_values(&[namespace, name, &layer.to_string()])
                .set(*par);
        }
        let previous = self.swap_layers(namespace, name, layer_par.len());
        for layer in layer_par.len()..previous {
            let _ = self
                .imbalance
                .remove_label_values(&[namespace, name, &layer.to_string()]);
        }
        let worst = layer_par.iter().copied().fold(1.0f64, f64::max);
        self.worst_imbalance
            .with_label_values(&[namespace, name])
            .set(worst);
    }

    fn swap_layers(&self, namespace: &str, name: &str, n: usize) -> usize {
        let Ok(mut map) = self.layers.lock() else {
            return 0;
        };
        let key = (namespace.to_string(), name.to_string());
        if n == 0 {
            map.remove(&key).unwrap_or(0)
        } else {
            map.insert(key, n).unwrap_or(0)
        }
    }

    /// Drops every series of a deleted deployment.
    pub fn forget(&self, namespace: &str, name: &str) {
        let previous = self.swap_layers(namespace, name, 0);
        for layer in 0..previous {
            let _ = self
                .imbalance
                .remove_label_values(&[namespace, name, &layer.to_string()]);
        }
        let _ = self.worst_imbalance.remove_label_values(&[namespace, name]);
        let _ = self.ready_ranks.remove_label_values(&[namespace, name]);
        let _ = self.served_rows.remove_label_values(&[namespace, name]);
        for kind in ["desired", "applied"] {
            let _ = self
                .placement_generation
                .remove_label_values(&[namespace, name, kind]);
        }
    }

    /// Text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if encoder.encode(&self.registry.gather(), &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_controller_runtime_names() {
        let m = Metrics::new().unwrap();
        m.reconcile_total
            .with_label_values(&[CONTROLLER, "success"])
            .inc();
        m.reconcile_errors.with_label_values(&[CONTROLLER]).inc();
        m.reconcile_time
            .with_label_values(&[CONTROLLER])
            .observe(0.1);
        m.set_imbalance("ml", "demo", &[1.1, 1.5]);
        let text = m.render();
        for name in [
            "controller_runtime_reconcile_total",
            "controller_runtime_reconcile_errors_total",
            "controller_runtime_reconcile_time_seconds_bucket",
            "moe_deployment_imbalance_ratio{layer=\"1\",name=\"demo\",namespace=\"ml\"} 1.5",
            "moe_deployment_worst_imbalance_ratio",
        ] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
        m.forget("ml", "demo");
        assert!(!m.render().contains("moe_deployment_imbalance_ratio{"));
    }
}
