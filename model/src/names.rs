//! Tensor-name templates of each family (the Hugging Face checkpoint names).
//!
//! Templates hold `{layer}` (decoder-layer index), `{module}` (the MoE block's module name),
//! `{expert}` and `{proj}`. A checkpoint stores routed experts either per expert (the Hub
//! layout, `experts.{e}.{proj}.weight`) or fused (`experts.gate_up_proj [E, 2I, H]` with the
//! gate rows first, `experts.down_proj [E, H, I]`), which newer transformers versions write.

use serde::{Deserialize, Serialize};

use crate::Family;

/// One of an expert's three projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Projection {
    /// `[I, H]`, goes through the activation.
    Gate,
    /// `[I, H]`, multiplies the activated gate.
    Up,
    /// `[H, I]`.
    Down,
}

impl Projection {
    pub const ALL: [Projection; 3] = [Projection::Gate, Projection::Up, Projection::Down];
}

/// Name templates of a family's MoE-block tensors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TensorNames {
    /// Module names of the MoE block, most usual first (the loader uses the first one the
    /// checkpoint has).
    pub modules: Vec<String>,
    /// Router weight `[E, H]`.
    pub router: String,
    /// Score-correction bias `[E]` (DeepSeek-V3).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correction_bias: Option<String>,
    /// One projection of one routed expert (per-expert layout).
    pub expert: String,
    /// `{proj}` values of the gate, up and down projections.
    pub projections: [String; 3],
    /// Fused gate and up projections of all experts, `[E, 2I, H]`.
    pub fused_gate_up: String,
    /// Fused down projections of all experts, `[E, H, I]` (gpt-oss: `[E, I, H]`).
    pub fused_down: String,
    /// How the fused tensors are laid out.
    pub fused_layout: FusedLayout,
    /// Router bias `[E]` (gpt-oss).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub router_bias: Option<String>,
    /// Fused gate/up biases `[E, 2I]` and down biases `[E, H]` (gpt-oss).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fused_gate_up_bias: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fused_down_bias: Option<String>,
    /// One projection of the shared expert MLP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared_expert: Option<String>,
    /// Qwen2-MoE's shared-expert gate `[1, H]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared_expert_gate: Option<String>,
    /// Suffix appended to a quantised weight's name for its block scales
    /// (`...weight` -> `...weight_scale_inv`).
    pub scale_suffix: String,
}

/// Layout of fused 3-D expert tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FusedLayout {
    /// `gate_up_proj [E, 2I, H]` (gate rows, then up rows), `down_proj [E, H, I]`
    /// (transformers 5 `save_original_format=False`).
    OutputMajor,
    /// gpt-oss: `gate_up_proj [E, H, 2I]` with gate and up interleaved along the last axis
    /// (columns `0::2` gate, `1::2` up), `down_proj [E, I, H]`.
    InputMajorInterleaved,
}

fn fill(t: &str, layer: usize, module: &str) -> String {
    t.replace("{layer}", &layer.to_string())
        .replace("{module}", module)
}

impl TensorNames {
    pub fn for_family(family: Family, correction_bias: bool, shared: bool) -> TensorNames {
        let hf = [
            "gate_proj".to_string(),
            "up_proj".to_string(),
            "down_proj".to_string(),
        ];
        let gpt_oss = family == Family::GptOss;
        let (modules, projections, shared_expert, shared_gate) = match family {
            Family::GptOss => (vec!["mlp"], hf.clone(), None, None),
            Family::Qwen3Moe => (vec!["mlp"], hf, None, None),
            Family::Qwen2Moe => (
                vec!["mlp"],
                hf,
                Some("model.layers.{layer}.{module}.shared_expert.{proj}.weight"),
                Some("model.layers.{layer}.{module}.shared_expert_gate.weight"),
            ),
            Family::Mixtral => (
                vec!["block_sparse_moe", "mlp"],
                ["w1".to_string(), "w3".to_string(), "w2".to_string()],
                None,
                None,
            ),
            Family::DeepseekV2 | Family::DeepseekV3 => (
                vec!["mlp"],
                hf,
                Some("model.layers.{layer}.{module}.shared_experts.{proj}.weight"),
                None,
            ),
        };
        TensorNames {
            modules: modules.into_iter().map(String::from).collect(),
            router: if gpt_oss {
                "model.layers.{layer}.{module}.router.weight".into()
            } else {
                "model.layers.{layer}.{module}.gate.weight".into()
            },
            router_bias: gpt_oss.then(|| "model.layers.{layer}.{module}.router.bias".into()),
            fused_layout: if gpt_oss {
                FusedLayout::InputMajorInterleaved
            } else {
                FusedLayout::OutputMajor
            },
            fused_gate_up_bias: gpt_oss
                .then(|| "model.layers.{layer}.{module}.experts.gate_up_proj_bias".into()),
            fused_down_bias: gpt_oss
                .then(|| "model.layers.{layer}.{module}.experts.down_proj_bias".into()),
            correction_bias: correction_bias
                .then(|| "model.layers.{layer}.{module}.gate.e_score_correction_bias".into()),
            expert: "model.layers.{layer}.{module}.experts.{expert}.{proj}.weight".into(),
            projections,
            fused_gate_up: "model.layers.{layer}.{module}.experts.gate_up_proj".into(),
            fused_down: "model.layers.{layer}.{module}.experts.down_proj".into(),
            shared_expert: shared_expert.filter(|_| shared).map(String::from),
            shared_expert_gate: shared_gate.filter(|_| shared).map(String::from),
            scale_suffix: "_scale_inv".into(),
        }
    }

    pub fn router(&self, layer: usize, module: &str) -> String {
        fill(&self.router, layer, module)
    }

    pub fn correction_bias(&self, layer: usize, module: &str) -> Option<String> {
        self.correction_bias
            .as_deref()
            .map(|t| fill(t, layer, module))
    }

    pub fn expert(&self, layer: usize, module: &str, expert: usize, proj: Projection) -> String {
        fill(&self.expert, layer, module)
            .replace("{expert}", &expert.to_string())
            .replace("{proj}", &self.projections[proj as usize])
    }

    pub fn fused_gate_up(&self, layer: usize, module: &str) -> String {
        fill(&self.fused_gate_up, layer, module)
    }

    pub fn fused_down(&self, layer: usize, module: &str) -> String {
        fill(&self.fused_down, layer, module)
    }

    pub fn router_bias(&self, layer: usize, module: &str) -> Option<String> {
        self.router_bias.as_deref().map(|t| fill(t, layer, module))
    }

    pub fn fused_gate_up_bias(&self, layer: usize, module: &str) -> Option<String> {
        self.fused_gate_up_bias
            .as_deref()
            .map(|t| fill(t, layer, module))
    }

    pub fn fused_down_bias(&self, layer: usize, module: &str) -> Option<String> {
        self.fused_down_bias
            .as_deref()
            .map(|t| fill(t, layer, module))
    }

    /// A projection of the shared expert MLP (always `gate_proj`/`up_proj`/`down_proj`).
    pub fn shared_expert(&self, layer: usize, module: &str, proj: Projection) -> Option<String> {
        let p = ["gate_proj", "up_proj", "down_proj"][proj as usize];
        self.shared_expert
            .as_deref()
            .map(|t| fill(t, layer, module).replace("{proj}", p))
    }

    pub fn shared_expert_gate(&self, layer: usize, module: &str) -> Option<String> {
        self.shared_expert_gate
            .as_deref()
            .map(|t| fill(t, layer, module))
    }

    /// The block-scale tensor of a quantised weight.
    pub fn scale_of(&self, weight: &str) -> String {
        format!("{weight}{}", self.scale_suffix)
    }
}
