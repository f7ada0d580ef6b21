//! Prometheus metrics of a worker rank (names in base units, `_total` for counters).

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub step_duration: Histogram,
    pub tokens: IntCounter,
    pub steps: IntCounter,
    pub layer_imbalance: GaugeVec,
    pub remap_duration: Histogram,
    pub remap_bytes: IntCounter,
    pub remap_experts_moved: IntCounter,
    pub remap_stall: prometheus::Counter,
    pub remap_transfer: prometheus::Counter,
    pub remap_layers_done: IntGauge,
    pub remap_layers_total: IntGauge,
    pub remaps: IntCounterVec,
    pub placement_generation: IntGauge,
    pub ready: IntGauge,
    pub expert_memory_bytes: IntGauge,
    pub tokens_per_second: Gauge,
    /// Forward API: rows and requests this rank answered, errors by status, round and request
    /// latency.
    pub forward_rows: IntCounter,
    pub forward_requests: IntCounter,
    pub forward_errors: IntCounterVec,
    pub forward_round_duration: Histogram,
    pub forward_request_duration: Histogram,
}

impl Metrics {
    pub fn new(rank: usize) -> Metrics {
        let registry = Registry::new_custom(
            None,
            Some(std::iter::once(("rank".to_string(), rank.to_string())).collect()),
        )
        .unwrap_or_default();
        let step_buckets = prometheus::exponential_buckets(0.0001, 2.0, 20).unwrap_or_default();
        let m = Metrics {
            step_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "moe_worker_step_duration_seconds",
                    "Wall time of one step (all MoE layers, including communication)",
                )
                .buckets(step_buckets),
            )
            .expect("valid histogram"),
            tokens: IntCounter::new("moe_worker_tokens_total", "Tokens processed by this rank")
                .expect("valid counter"),
            steps: IntCounter::new("moe_worker_steps_total", "Steps completed").expect("valid"),
            layer_imbalance: GaugeVec::new(
                Opts::new(
                    "moe_worker_layer_imbalance_ratio",
                    "Peak-to-average rank load of this rank's traffic over the statistics window",
                ),
                &["layer"],
            )
            .expect("valid gauge"),
            remap_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "moe_worker_remap_duration_seconds",
                    "Wall time of completed remaps",
                )
                .buckets(prometheus::exponential_buckets(0.001, 2.0, 20).unwrap_or_default()),
            )
            .expect("valid histogram"),
            remap_bytes: IntCounter::new(
                "moe_worker_remap_bytes_total",
                "Bytes of expert weights received by remaps",
            )
            .expect("valid"),
            remap_experts_moved: IntCounter::new(
                "moe_worker_remap_experts_moved_total",
                "Expert slots whose weights were replaced by remaps on this rank",
            )
            .expect("valid"),
            remap_stall: prometheus::Counter::new(
                "moe_worker_remap_stall_seconds_total",
                "Time forward passes were held back by remaps",
            )
            .expect("valid"),
            remap_transfer: prometheus::Counter::new(
                "moe_worker_remap_transfer_seconds_total",
                "Time remap staging spent sending and receiving expert weights (side thread)",
            )
            .expect("valid"),
            remap_layers_done: IntGauge::new(
                "moe_worker_remap_layers_done",
                "Layers switched by the current or last remap",
            )
            .expect("valid"),
            remap_layers_total: IntGauge::new(
                "moe_worker_remap_layers_total",
                "Layers to switch in the current or last remap",
            )
            .expect("valid"),
            remaps: IntCounterVec::new(
                Opts::new("moe_worker_remaps_total", "Remaps by outcome"),
                &["result"],
            )
            .expect("valid"),
            placement_generation: IntGauge::new(
                "moe_worker_placement_generation",
                "Placement generation every layer serves (minimum over layers)",
            )
            .expect("valid"),
            ready: IntGauge::new(
                "moe_worker_ready",
                "1 once the group formed and weights loaded",
            )
            .expect("valid"),
            expert_memory_bytes: IntGauge::new(
                "moe_worker_expert_memory_bytes",
                "Bytes of expert weights held by this rank (slots x expert size)",
            )
            .expect("valid"),
            tokens_per_second: Gauge::new(
                "moe_worker_tokens_per_second",
                "Tokens per second of this rank over the last few seconds",
            )
            .expect("valid"),
            forward_rows: IntCounter::new(
                "moe_worker_forward_rows_total",
                "Rows this rank answered through the forward API",
            )
            .expect("valid"),
            forward_requests: IntCounter::new(
                "moe_worker_forward_requests_total",
                "Forward-API requests this rank answered with 200",
            )
            .expect("valid"),
            forward_errors: IntCounterVec::new(
                Opts::new(
                    "moe_worker_forward_errors_total",
                    "Forward-API requests refused, by HTTP status",
                ),
                &["status"],
            )
            .expect("valid"),
            forward_round_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "moe_worker_forward_round_duration_seconds",
                    "Wall time of one layer's round of the forward API on this rank (all-to-alls and experts)",
                )
                .buckets(prometheus::exponential_buckets(0.00001, 2.0, 24).unwrap_or_default()),
            )
            .expect("valid histogram"),
            forward_request_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "moe_worker_forward_request_duration_seconds",
                    "Time from a decoded forward request to its answer (queue and round)",
                )
                .buckets(prometheus::exponential_buckets(0.00001, 2.0, 24).unwrap_or_default()),
            )
            .expect("valid histogram"),
            registry,
        };
        let r = &m.registry;
        let _ = r.register(Box::new(m.step_duration.clone()));
        let _ = r.register(Box::new(m.tokens.clone()));
        let _ = r.register(Box::new(m.steps.clone()));
        let _ = r.register(Box::new(m.layer_imbalance.clone()));
        let _ = r.register(Box::new(m.remap_duration.clone()));
        let _ = r.register(Box::new(m.remap_bytes.clone()));
        let _ = r.register(Box::new(m.remap_experts_moved.clone()));
        let _ = r.register(Box::new(m.remap_stall.clone()));
        let _ = r.register(Box::new(m.remap_transfer.clone()));
        let _ = r.register(Box::new(m.remap_layers_done.clone()));
        let _ = r.register(Box::new(m.remap_layers_total.clone()));
        let _ = r.register(Box::new(m.remaps.clone()));
        let _ = r.register(Box::new(m.placement_generation.clone()));
        let _ = r.register(Box::new(m.ready.clone()));
        let _ = r.register(Box::new(m.expert_memory_bytes.clone()));
        let _ = r.register(Box::new(m.tokens_per_second.clone()));
        let _ = r.register(Box::new(m.forward_rows.clone()));
        let _ = r.register(Box::new(m.forward_requests.clone()));
        let _ = r.register(Box::new(m.forward_errors.clone()));
        let _ = r.register(Box::new(m.forward_round_duration.clone()));
        let _ = r.register(Box::new(m.forward_request_duration.clone()));
        m
    }

    pub fn render(&self) -> String {
        render_merged(std::slice::from_ref(&self.registry))
    }
}

/// The text exposition of several ranks' registries (the ranks of one process), one family per
/// metric name holding every rank's series (each registry labels its series with its rank), as
/// the format requires: a name's HELP and TYPE appear once.
pub fn render_merged(registries: &[Registry]) -> String {
    let mut families: Vec<prometheus::proto::MetricFamily> = Vec::new();
    for family in registries.iter().flat_map(Registry::gather) {
        match families.iter_mut().find(|f| f.name() == family.name()) {
            Some(f) => f.mut_metric().extend(family.get_metric().iter().cloned()),
            None => families.push(family),
        }
    }
    let mut buf = Vec::new();
    let _ = TextEncoder::new().encode(&families, &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_ranks_share_one_family_per_name() {
        let (a, b) = (Metrics::new(0), Metrics::new(1));
        a.tokens.inc_by(2);
        b.tokens.inc_by(3);
        let text = render_merged(&[a.registry.clone(), b.registry.clone()]);
        assert!(
            text.contains("moe_worker_tokens_total{rank=\"0\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("moe_worker_tokens_total{rank=\"1\"} 3"),
            "{text}"
        );
        assert_eq!(
            text.matches("# TYPE moe_worker_tokens_total counter")
                .count(),
            1,
            "{text}"
        );
    }

    #[test]
    fn renders_conventional_names() {
        let m = Metrics::new(3);
        m.tokens.inc_by(5);
        m.layer_imbalance.with_label_values(&["0"]).set(1.5);
        m.step_duration.observe(0.01);
        let text = m.render();
        for name in [
            "moe_worker_tokens_total{rank=\"3\"} 5",
            "moe_worker_layer_imbalance_ratio{layer=\"0\",rank=\"3\"} 1.5",
            "moe_worker_step_duration_seconds_bucket",
            "moe_worker_remap_bytes_total",
            "moe_worker_remap_stall_seconds_total",
            "moe_worker_placement_generation",
        ] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
    }
}
