//! The MoE families this project reads, and how a config names them.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A family of MoE models sharing one MoE-block definition in transformers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// Qwen3-MoE: softmax, top-k, optional renormalisation; no shared experts.
    Qwen3Moe,
    /// Qwen2-MoE (Qwen1.5-MoE): as Qwen3 plus one shared expert behind a sigmoid gate.
    Qwen2Moe,
    /// Mixtral: softmax, top-k, always renormalised; `block_sparse_moe`, `w1/w3/w2`.
    Mixtral,
    /// DeepSeek-V2 and V2-Lite: softmax, greedy or group-limited greedy (group score = max),
    /// scaled weights, shared experts.
    DeepseekV2,
    /// DeepSeek-V3/R1 and models reusing its architecture: sigmoid, correction bias for the
    /// choice, group score = sum of the top two, renormalised and scaled, shared experts.
    DeepseekV3,
    /// gpt-oss: router with a bias, softmax over the top-k logits, experts with biases and a
    /// clamped SwiGLU, fused interleaved `gate_up_proj`.
    GptOss,
}

/// `architectures` values recognised, with their family.
const ARCHITECTURES: &[(&str, Family)] = &[
    ("Qwen3MoeForCausalLM", Family::Qwen3Moe),
    ("Qwen2MoeForCausalLM", Family::Qwen2Moe),
    ("MixtralForCausalLM", Family::Mixtral),
    ("DeepseekV2ForCausalLM", Family::DeepseekV2),
    ("DeepseekV3ForCausalLM", Family::DeepseekV3),
    ("GptOssForCausalLM", Family::GptOss),
];

/// `model_type` values recognised when `architectures` is absent or names a wrapper.
const MODEL_TYPES: &[(&str, Family)] = &[
    ("qwen3_moe", Family::Qwen3Moe),
    ("qwen2_moe", Family::Qwen2Moe),
    ("mixtral", Family::Mixtral),
    ("deepseek_v2", Family::DeepseekV2),
    ("deepseek_v3", Family::DeepseekV3),
    ("gpt_oss", Family::GptOss),
];

/// The architectures an error message lists.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &[
    "Qwen3MoeForCausalLM (qwen3_moe)",
    "Qwen2MoeForCausalLM (qwen2_moe)",
    "MixtralForCausalLM (mixtral)",
    "DeepseekV2ForCausalLM (deepseek_v2)",
    "DeepseekV3ForCausalLM (deepseek_v3, also Kimi-K2 and other models reusing it)",
    "GptOssForCausalLM (gpt_oss, BF16 weights)",
];

impl Family {
    /// The family of a config: its `architectures` first, then its `model_type`.
    pub fn detect(architectures: &[String], model_type: Option<&str>) -> Option<Family> {
        architectures
            .iter()
            .find_map(|a| ARCHITECTURES.iter().find(|(n, _)| n == a).map(|(_, f)| *f))
            .or_else(|| {
                let mt = model_type?;
                MODEL_TYPES.iter().find(|(n, _)| *n == mt).map(|(_, f)| *f)
            })
    }

    /// The canonical `architectures` entry of the family.
    pub fn architecture(self) -> &'static str {
        ARCHITECTURES
            .iter()
            .find(|(_, f)| *f == self)
            .map(|(n, _)| *n)
            .unwrap_or("unknown")
    }

    /// The family's canonical `model_type`.
    pub fn model_type(self) -> &'static str {
        MODEL_TYPES
            .iter()
            .find(|(_, f)| *f == self)
            .map(|(n, _)| *n)
            .unwrap_or("unknown")
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Qwen3Moe => "Qwen3-MoE",
            Family::Qwen2Moe => "Qwen2-MoE",
            Family::Mixtral => "Mixtral",
            Family::DeepseekV2 => "DeepSeek-V2",
            Family::DeepseekV3 => "DeepSeek-V3",
            Family::GptOss => "gpt-oss",
        })
    }
}

impl std::str::FromStr for Family {
    type Err = String;
    /// Accepts the `model_type` spelling (`qwen3_moe`, `deepseek_v3`, ...) or the architecture.
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim().to_ascii_lowercase().replace('-', "_");
        MODEL_TYPES
            .iter()
            .find(|(n, _)| *n == t)
            .or_else(|| {
                ARCHITECTURES
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(s))
            })
            .map(|(_, f)| *f)
            .ok_or_else(|| {
                format!(
                    "unknown model family `{s}`: one of {}",
                    MODEL_TYPES
                        .iter()
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
    }
}
