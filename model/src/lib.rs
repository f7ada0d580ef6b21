//! The model description of a Mixture-of-Experts checkpoint, read from its `config.json` (and
//! `model.safetensors.index.json`): the one place every part of the project learns a model's
//! family, which decoder layers are MoE layers, how its router gates, its shared experts, its
//! weight dtype and the names of its tensors.
//!
//! Layer numbering: placements, statistics and the operator count **MoE layers** `0..L-1`;
//! [`ModelDescription::moe_layers`] maps MoE layer `l` to its decoder-layer index in the
//! checkpoint (`model.layers.{d}`).
//!
//! No GPU code and no I/O beyond reading `config.json` and the index file, so the worker,
//! `moectl` and the operator can all depend on it.

mod config;
mod family;
mod names;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use family::{Family, SUPPORTED_ARCHITECTURES};
pub use names::{FusedLayout, Projection, TensorNames};

/// Name of the configuration file next to the weights.
pub const CONFIG_FILE: &str = "config.json";
/// Name of the index of a sharded safetensors checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Why a checkpoint's description could not be built. Every message names the file, field or
/// value at fault.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not valid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "unknown architecture {found}: supported architectures are {}",
        SUPPORTED_ARCHITECTURES.join(", ")
    )]
    UnknownArchitecture { found: String },
    #[error("config.json of a {family} model lacks `{field}`")]
    MissingField { family: Family, field: &'static str },
    #[error("config.json of a {family} model: `{field}` {reason}")]
    InvalidField {
        family: Family,
        field: &'static str,
        reason: String,
    },
    #[error("config.json: {0}")]
    Unsupported(String),
    #[error("{path}: {reason}")]
    Index { path: PathBuf, reason: String },
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// Router score function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scoring {
    Softmax,
    Sigmoid,
}

/// How a group of experts is scored for group-limited routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum GroupScore {
    /// No group limit (one group).
    None,
    /// The group's largest score (DeepSeek-V2 `group_limited_greedy`).
    Max,
    /// The sum of the group's two largest choice scores (DeepSeek-V3 `noaux_tc`).
    Top2Sum,
}

/// Storage dtype of the expert weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightDtype {
    Bf16,
    F16,
    F32,
    /// FP8 E4M3 with per-block `weight_scale_inv` (see [`Quantization`]).
    Fp8E4m3,
}

impl WeightDtype {
    /// Bytes of one stored element.
    pub fn bytes(self) -> usize {
        match self {
            WeightDtype::Bf16 | WeightDtype::F16 => 2,
            WeightDtype::F32 => 4,
            WeightDtype::Fp8E4m3 => 1,
        }
    }
}

/// Block quantisation of the linear weights (DeepSeek-V3/R1: FP8 E4M3, 128x128 blocks, one
/// f32 `weight_scale_inv` per block, `w = q * scale_inv`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Quantization {
    /// `[rows, cols]` of one block.
    pub block: [usize; 2],
}

/// Experts every token goes through besides the routed ones (not placed by EPLB: every rank
/// holds them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SharedExperts {
    /// Number of shared experts the model counts (DeepSeek `n_shared_experts`; Qwen2-MoE: 1).
    pub count: usize,
    /// Intermediate size of the one fused shared MLP the checkpoint stores
    /// (DeepSeek: `n_shared_experts x moe_intermediate_size`).
    pub intermediate: usize,
    /// Output scaled by `sigmoid(shared_expert_gate · x)` (Qwen2-MoE).
    pub gated: bool,
}

/// gpt-oss's activation: `gate = min(gate, limit)`, `up = clamp(up, -limit, limit)`,
/// `(up + 1) * gate * sigmoid(alpha * gate)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClampedSwiglu {
    pub alpha: f64,
    pub limit: f64,
}

/// Everything the project needs to know about a MoE checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelDescription {
    /// `architectures[0]` of the config (or the family's canonical one when absent).
    pub architecture: String,
    pub family: Family,
    /// `model_type` of the config.
    pub model_type: String,
    /// Decoder layers of the model (dense and MoE).
    pub num_hidden_layers: usize,
    /// Decoder-layer index of each MoE layer, in order: MoE layer `l` is decoder layer
    /// `moe_layers[l]`.
    pub moe_layers: Vec<usize>,
    /// Routed experts per MoE layer.
    pub num_experts: usize,
    /// Routed experts per token.
    pub top_k: usize,
    pub hidden: usize,
    /// Intermediate size of one routed expert.
    pub intermediate: usize,
    /// Expert groups (1: no group limit).
    pub expert_groups: usize,
    /// Groups a token may choose experts from.
    pub topk_groups: usize,
    pub group_score: GroupScore,
    pub scoring: Scoring,
    /// Divide the top-k weights by their sum.
    pub norm_topk_prob: bool,
    /// Final multiplier of the routed weights.
    pub routed_scaling_factor: f64,
    /// The router has a score-correction bias (`e_score_correction_bias`, choice only).
    pub correction_bias: bool,
    /// Shared experts (count 0: none).
    pub shared_experts: usize,
    /// Details of the shared experts, when there are any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared: Option<SharedExperts>,
    /// Activation of the expert MLPs (`silu`: SwiGLU; `clamped_swiglu`: gpt-oss's).
    pub activation: String,
    /// gpt-oss's clamped SwiGLU parameters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swiglu: Option<ClampedSwiglu>,
    /// The router adds a bias to its logits (gpt-oss).
    #[serde(default)]
    pub router_bias: bool,
    /// The routed experts' projections have biases (gpt-oss).
    #[serde(default)]
    pub expert_bias: bool,
    pub weight_dtype: WeightDtype,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantization: Option<Quantization>,
    /// Tensor-name templates of this family.
    pub tensors: TensorNames,
}

impl ModelDescription {
    /// The description of the model whose `config.json` text this is.
    pub fn from_config_str(text: &str) -> Result<ModelDescription> {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|source| ModelError::Json {
                path: PathBuf::from(CONFIG_FILE),
                source,
            })?;
        config::describe(&v)
    }

    /// Reads `config.json` from a checkpoint directory, or the given file when `path` is a
    /// file.
    pub fn from_path(path: &Path) -> Result<ModelDescription> {
        let file = if path.is_dir() {
            path.join(CONFIG_FILE)
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file).map_err(|source| ModelError::Io {
            path: file.clone(),
            source,
        })?;
        // Editors on Windows may start the file with a byte-order mark; JSON has none.
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|source| ModelError::Json {
                path: file.clone(),
                source,
            })?;
        config::describe(&v)
    }

    /// Number of MoE layers L.
    pub fn num_moe_layers(&self) -> usize {
        self.moe_layers.len()
    }

    /// Decoder-layer index of MoE layer `moe_layer`.
    pub fn decoder_layer(&self, moe_layer: usize) -> Option<usize> {
        self.moe_layers.get(moe_layer).copied()
    }

    /// MoE-layer index of decoder layer `decoder_layer` (None for a dense layer).
    pub fn moe_index(&self, decoder_layer: usize) -> Option<usize> {
        self.moe_layers.binary_search(&decoder_layer).ok()
    }

    /// Bytes of one routed expert's three projections as stored (FP8: plus its scales).
    pub fn expert_bytes(&self) -> usize {
        let elems = 3 * self.hidden * self.intermediate;
        let scales = match self.quantization {
            Some(q) => {
                let blocks = |r: usize, c: usize| r.div_ceil(q.block[0]) * c.div_ceil(q.block[1]);
                4 * (2 * blocks(self.intermediate, self.hidden)
                    + blocks(self.hidden, self.intermediate))
            }
            None => 0,
        };
        elems * self.weight_dtype.bytes() + scales
    }
}

/// Where each tensor of a sharded checkpoint lives (`model.safetensors.index.json`'s
/// `weight_map`), or `None` for a checkpoint without an index.
pub fn read_index(dir: &Path) -> Result<Option<BTreeMap<String, String>>> {
    let path = dir.join(INDEX_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(ModelError::Io { path, source }),
    };
    #[derive(Deserialize)]
    struct Index {
        weight_map: Option<BTreeMap<String, String>>,
    }
    let idx: Index = serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: path.clone(),
        source,
    })?;
    let map = idx.weight_map.ok_or_else(|| ModelError::Index {
        path: path.clone(),
        reason: "has no `weight_map`".into(),
    })?;
    for file in map.values() {
        if file.contains('/') || file.contains('\\') || file.starts_with('.') {
            return Err(ModelError::Index {
                path,
                reason: format!("`{file}` is not a file name in the checkpoint directory"),
            });
        }
    }
    Ok(Some(map))
}
