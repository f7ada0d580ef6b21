//! `moectl model inspect`: what a checkpoint is, read from its `config.json` through the same
//! model description the worker loads with, and the `spec.model` stanza of a MoEDeployment
//! serving it.

use std::fmt::Write as _;
use std::path::Path;

use moe_model::{ModelDescription, Scoring, WeightDtype};
use serde_json::{Value, json};

use crate::{Fail, print_out};

/// Output of `moectl model inspect`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum InspectOutput {
    /// A summary for people, then the `spec.model` stanza.
    Text,
    /// The model description as JSON (keys documented in docs/worker.md), with `expertBytes`
    /// and `specModel` added.
    Json,
}

/// The `spec.model` of a MoEDeployment for this checkpoint (the CRD's field names).
pub fn spec_model(d: &ModelDescription) -> Value {
    json!({
        "numLayers": d.num_moe_layers(),
        "numExperts": d.num_experts,
        "hidden": d.hidden,
        "intermediate": d.intermediate,
        "topK": d.top_k,
        "expertGroups": d.expert_groups,
        "topkGroups": d.topk_groups,
        "scoring": match d.scoring {
            Scoring::Softmax => "Softmax",
            Scoring::Sigmoid => "Sigmoid",
        },
        "architecture": d.architecture,
        "normTopkProb": d.norm_topk_prob,
        "routedScalingFactor": d.routed_scaling_factor,
        "sharedExperts": d.shared_experts,
    })
}

fn dtype_name(d: WeightDtype) -> &'static str {
    match d {
        WeightDtype::Bf16 => "bf16",
        WeightDtype::F16 => "f16",
        WeightDtype::F32 => "f32",
        WeightDtype::Fp8E4m3 => "fp8_e4m3 (128x128 block scales)",
    }
}

fn human_bytes(b: usize) -> String {
    let b = b as f64;
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", b / (1024.0 * 1024.0 * 1024.0))
    } else if b >= 1024.0 * 1024.0 {
        format!("{:.2} MiB", b / (1024.0 * 1024.0))
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b} B")
    }
}

/// A compact list of decoder-layer indices: `3-60` for a run, `1,3,5` otherwise.
fn layer_ranges(layers: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < layers.len() {
        let start = layers[i];
        let mut end = start;
        while i + 1 < layers.len() && layers[i + 1] == end + 1 {
            i += 1;
            end = layers[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(",")
}

pub fn inspect(path: &Path, output: InspectOutput) -> Result<Vec<String>, Fail> {
    let d = ModelDescription::from_path(path).map_err(|e| Fail(e.to_string()))?;
    let stanza = spec_model(&d);
    let mut out = String::new();
    // One line of the report.
    macro_rules! out_line {
        ($($arg:tt)*) => {{
            let _ = writeln!(out, $($arg)*);
        }};
    }
    match output {
        InspectOutput::Json => {
            let mut v = serde_json::to_value(&d)?;
            v["expertBytes"] = json!(d.expert_bytes());
            v["specModel"] = stanza;
            out_line!("{}", serde_json::to_string_pretty(&v)?);
        }
        InspectOutput::Text => {
            let shared = match &d.shared {
                Some(s) if d.shared_experts > 0 => format!(
                    "{} (intermediate {}{})",
                    d.shared_experts,
                    s.intermediate,
                    if s.gated { ", sigmoid-gated" } else { "" }
                ),
                _ => "none".into(),
            };
            let groups = if d.expert_groups > 1 {
                format!("{} groups, {} per token", d.expert_groups, d.topk_groups)
            } else {
                "none".into()
            };
            let scoring = match d.scoring {
                Scoring::Softmax => "softmax",
                Scoring::Sigmoid => "sigmoid",
            };
            out_line!("architecture        {} ({})", d.architecture, d.model_type);
            out_line!(
                "MoE decoder layers  {} of {}: {}",
                d.num_moe_layers(),
                d.num_hidden_layers,
                layer_ranges(&d.moe_layers)
            );
            out_line!("routed experts      {}, top-{}", d.num_experts, d.top_k);
            out_line!("hidden              {}", d.hidden);
            out_line!("expert intermediate {}", d.intermediate);
            out_line!("expert groups       {groups}");
            out_line!(
                "gating              {scoring}, renormalise top-k: {}, routed scaling {}{}",
                d.norm_topk_prob,
                d.routed_scaling_factor,
                if d.correction_bias {
                    ", score-correction bias (choice only)"
                } else {
                    ""
                }
            );
            out_line!("shared experts      {shared}");
            out_line!("weights             {}", dtype_name(d.weight_dtype));
            out_line!("bytes per expert    {}", human_bytes(d.expert_bytes()));
            out.push('\n');
            out_line!("# spec.model of a MoEDeployment serving this checkpoint:");
            let yaml = serde_yaml::to_string(&json!({ "model": stanza }))?;
            out.push_str(&yaml);
        }
    }
    print_out(&out)?;
    Ok(Vec::new())
}

#[cfg(test)]
mod tests {
    use super::layer_ranges;

    #[test]
    fn layer_lists_are_compact() {
        assert_eq!(layer_ranges(&[3, 4, 5, 6]), "3-6");
        assert_eq!(layer_ranges(&[1, 3, 5]), "1,3,5");
        assert_eq!(layer_ranges(&[0, 1, 3]), "0-1,3");
        assert_eq!(layer_ranges(&[]), "");
    }
}
