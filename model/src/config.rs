//! Reading a transformers `config.json` into a [`ModelDescription`].
//!
//! Fields a family cannot do without are required (a missing one names the field and the
//! family); optional fields take the default of the family's transformers configuration class.

use serde_json::Value;

use crate::{
    ClampedSwiglu, Family, GroupScore, ModelDescription, ModelError, Quantization, Result, Scoring,
    SharedExperts, TensorNames, WeightDtype,
};

struct Cfg<'a> {
    v: &'a Value,
    family: Family,
}

impl Cfg<'_> {
    fn get(&self, field: &'static str) -> Option<&Value> {
        self.v.get(field).filter(|x| !x.is_null())
    }

    fn bad(&self, field: &'static str, reason: impl Into<String>) -> ModelError {
        ModelError::InvalidField {
            family: self.family,
            field,
            reason: reason.into(),
        }
    }

    fn opt_usize(&self, field: &'static str) -> Result<Option<usize>> {
        let Some(x) = self.get(field) else {
            return Ok(None);
        };
        let n = x
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| self.bad(field, format!("must be a non-negative integer, not {x}")))?;
        if let Some(max) = size_limit(field)
            && n > max
        {
            return Err(self.bad(
                field,
                format!("is {n}, more than {max}, the most any model has room for here"),
            ));
        }
        Ok(Some(n))
    }

    fn usize(&self, field: &'static str) -> Result<usize> {
        self.opt_usize(field)?.ok_or(ModelError::MissingField {
            family: self.family,
            field,
        })
    }

    /// A required size that must be at least 1.
    fn positive(&self, field: &'static str) -> Result<usize> {
        let n = self.usize(field)?;
        if n == 0 {
            return Err(self.bad(field, "must be at least 1"));
        }
        Ok(n)
    }

    /// A required positive size that transformers versions spell differently (the first name
    /// is the one an error names).
    fn positive_alias(&self, names: &[&'static str]) -> Result<usize> {
        match names.iter().find(|n| self.get(n).is_some()) {
            Some(n) => self.positive(n),
            None => Err(ModelError::MissingField {
                family: self.family,
                field: names[0],
            }),
        }
    }

    fn usize_or(&self, field: &'static str, default: usize) -> Result<usize> {
        Ok(self.opt_usize(field)?.unwrap_or(default))
    }

    fn f64_or(&self, field: &'static str, default: f64) -> Result<f64> {
        match self.get(field) {
            None => Ok(default),
            Some(x) => x
                .as_f64()
                .filter(|f| f.is_finite())
                .ok_or_else(|| self.bad(field, format!("must be a finite number, not {x}"))),
        }
    }

    fn bool_or(&self, field: &'static str, default: bool) -> Result<bool> {
        match self.get(field) {
            None => Ok(default),
            Some(x) => x
                .as_bool()
                .ok_or_else(|| self.bad(field, format!("must be true or false, not {x}"))),
        }
    }

    fn str_or<'s>(&'s self, field: &'static str, default: &'s str) -> Result<&'s str> {
        match self.get(field) {
            None => Ok(default),
            Some(x) => x
                .as_str()
                .ok_or_else(|| self.bad(field, format!("must be a string, not {x}"))),
        }
    }

    fn usize_list(&self, field: &'static str) -> Result<Vec<usize>> {
        match self.get(field) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_u64()
                        .map(|n| n as usize)
                        .ok_or_else(|| self.bad(field, format!("has a non-integer entry {x}")))
                })
                .collect(),
            Some(x) => Err(self.bad(field, format!("must be a list of layer indices, not {x}"))),
        }
    }
}

/// The largest value a size field may have. Layer and expert counts size vectors (one entry
/// per decoder layer, per expert) and widths multiply into bytes per expert, so a config with
/// `num_hidden_layers: 100000000000` must be refused by name before anything is allocated.
/// Layers: the bound of the decoder-layer flags (`eplb::formats::DecoderLayout`); experts and
/// widths: far above any released model (256 experts, widths of tens of thousands).
fn size_limit(field: &str) -> Option<usize> {
    const MAX_LAYERS: usize = 1 << 16;
    const MAX_EXPERTS: usize = 1 << 16;
    const MAX_WIDTH: usize = 1 << 24;
    match field {
        "num_hidden_layers" => Some(MAX_LAYERS),
        "num_experts"
        | "num_local_experts"
        | "n_routed_experts"
        | "n_shared_experts"
        | "num_experts_per_tok"
        | "n_group"
        | "topk_group" => Some(MAX_EXPERTS),
        "hidden_size"
        | "intermediate_size"
        | "moe_intermediate_size"
        | "shared_expert_intermediate_size" => Some(MAX_WIDTH),
        _ => None,
    }
}

/// The gating and expert fields every family provides, under its own names.
struct Moe {
    num_experts: usize,
    top_k: usize,
    intermediate: usize,
    moe_layers: Vec<usize>,
    expert_groups: usize,
    topk_groups: usize,
    group_score: GroupScore,
    scoring: Scoring,
    norm_topk_prob: bool,
    routed_scaling_factor: f64,
    correction_bias: bool,
    shared: Option<SharedExperts>,
}

pub(crate) fn describe(v: &Value) -> Result<ModelDescription> {
    if !v.is_object() {
        return Err(ModelError::Unsupported(
            "the top level is not a JSON object".into(),
        ));
    }
    let architectures: Vec<String> = match v.get("architectures") {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_str().map(String::from))
            .collect(),
        _ => Vec::new(),
    };
    let model_type = v.get("model_type").and_then(Value::as_str);
    let family = Family::detect(&architectures, model_type).ok_or_else(|| {
        ModelError::UnknownArchitecture {
            found: match (architectures.first(), model_type) {
                (Some(a), Some(m)) => format!("`{a}` (model_type `{m}`)"),
                (Some(a), None) => format!("`{a}`"),
                (None, Some(m)) => format!("(model_type `{m}`)"),
                (None, None) => "(config.json has neither `architectures` nor `model_type`)".into(),
            },
        }
    })?;
    let c = Cfg { v, family };
    let num_hidden_layers = c.positive("num_hidden_layers")?;
    let hidden = c.positive("hidden_size")?;
    let moe = match family {
        Family::Qwen3Moe | Family::Qwen2Moe => qwen(&c, num_hidden_layers)?,
        Family::Mixtral => mixtral(&c, num_hidden_layers)?,
        Family::DeepseekV2 | Family::DeepseekV3 => deepseek(&c, num_hidden_layers)?,
        Family::GptOss => gpt_oss(&c, num_hidden_layers)?,
    };
    validate(&c, &moe)?;
    let gpt = family == Family::GptOss;
    let mut activation = c.str_or("hidden_act", "silu")?.to_string();
    if activation != "silu" {
        return Err(c.bad(
            "hidden_act",
            format!("is `{activation}`; only `silu` (SwiGLU experts) is supported"),
        ));
    }
    let swiglu = if gpt {
        activation = "clamped_swiglu".into();
        Some(ClampedSwiglu {
            alpha: c.f64_or("swiglu_alpha", 1.702)?,
            limit: c.f64_or("swiglu_limit", 7.0)?,
        })
    } else {
        None
    };
    let (weight_dtype, quantization) = dtype(&c)?;
    let architecture = architectures
        .first()
        .cloned()
        .unwrap_or_else(|| family.architecture().to_string());
    Ok(ModelDescription {
        architecture,
        family,
        model_type: model_type.unwrap_or(family.model_type()).to_string(),
        num_hidden_layers,
        moe_layers: moe.moe_layers,
        num_experts: moe.num_experts,
        top_k: moe.top_k,
        hidden,
        intermediate: moe.intermediate,
        expert_groups: moe.expert_groups,
        topk_groups: moe.topk_groups,
        group_score: moe.group_score,
        scoring: moe.scoring,
        norm_topk_prob: moe.norm_topk_prob,
        routed_scaling_factor: moe.routed_scaling_factor,
        correction_bias: moe.correction_bias,
        shared_experts: moe.shared.map_or(0, |s| s.count),
        shared: moe.shared,
        activation,
        swiglu,
        router_bias: gpt,
        expert_bias: gpt,
        weight_dtype,
        quantization,
        tensors: TensorNames::for_family(family, moe.correction_bias, moe.shared.is_some()),
    })
}

/// Qwen2-MoE and Qwen3-MoE: decoder layer `d` is a MoE layer unless listed in
/// `mlp_only_layers`, when `num_experts > 0` and `(d + 1) % decoder_sparse_step == 0`.
fn qwen(c: &Cfg<'_>, layers: usize) -> Result<Moe> {
    // transformers >= 5 writes Qwen3-MoE's expert count as `num_local_experts`.
    let num_experts = c.positive_alias(&["num_experts", "num_local_experts"])?;
    let step = c.usize_or("decoder_sparse_step", 1)?;
    if step == 0 {
        return Err(c.bad("decoder_sparse_step", "must be at least 1"));
    }
    // An entry past the last decoder layer is read as transformers reads it: a layer is dense
    // when its index is listed (`layer_idx not in config.mlp_only_layers`), so such an entry
    // changes nothing and the config loads there; it does here too.
    let dense: std::collections::BTreeSet<usize> =
        c.usize_list("mlp_only_layers")?.into_iter().collect();
    let moe_layers = (0..layers)
        .filter(|d| !dense.contains(d) && (d + 1) % step == 0)
        .collect();
    let shared = if c.family == Family::Qwen2Moe {
        let i = c.usize("shared_expert_intermediate_size")?;
        (i > 0).then_some(SharedExperts {
            count: 1,
            intermediate: i,
            gated: true,
        })
    } else {
        None
    };
    Ok(Moe {
        num_experts,
        top_k: c.positive("num_experts_per_tok")?,
        intermediate: c.positive("moe_intermediate_size")?,
        moe_layers,
        expert_groups: 1,
        topk_groups: 1,
        group_score: GroupScore::None,
        scoring: Scoring::Softmax,
        norm_topk_prob: c.bool_or("norm_topk_prob", false)?,
        routed_scaling_factor: 1.0,
        correction_bias: false,
        shared,
    })
}

/// Mixtral: every layer is a MoE layer; the top-k softmax weights are always renormalised.
fn mixtral(c: &Cfg<'_>, layers: usize) -> Result<Moe> {
    Ok(Moe {
        num_experts: c.positive("num_local_experts")?,
        top_k: c.positive("num_experts_per_tok")?,
        intermediate: c.positive("intermediate_size")?,
        moe_layers: (0..layers).collect(),
        expert_groups: 1,
        topk_groups: 1,
        group_score: GroupScore::None,
        scoring: Scoring::Softmax,
        norm_topk_prob: true,
        routed_scaling_factor: 1.0,
        correction_bias: false,
        shared: None,
    })
}

/// DeepSeek-V2/V3: decoder layer `d` is a MoE layer when `d >= first_k_dense_replace` (as
/// transformers builds them). DeepSeek's own code also asks `d % moe_layer_freq == 0`; every
/// released config has frequency 1, and another frequency is refused rather than guessed.
fn deepseek(c: &Cfg<'_>, layers: usize) -> Result<Moe> {
    let v3 = c.family == Family::DeepseekV3;
    let num_experts = c.positive_alias(&["n_routed_experts", "num_local_experts"])?;
    let intermediate = c.positive("moe_intermediate_size")?;
    let first_dense = c.usize_or("first_k_dense_replace", if v3 { 3 } else { 0 })?;
    let freq = c.usize_or("moe_layer_freq", 1)?;
    if freq != 1 {
        return Err(c.bad(
            "moe_layer_freq",
            format!("is {freq}; transformers makes every layer from first_k_dense_replace on a MoE layer, so only 1 is supported"),
        ));
    }
    let moe_layers = (first_dense..layers).collect();
    let default_method = if v3 { "noaux_tc" } else { "greedy" };
    let method = c.str_or("topk_method", default_method)?;
    let scoring = match c.str_or("scoring_func", if v3 { "sigmoid" } else { "softmax" })? {
        "softmax" => Scoring::Softmax,
        "sigmoid" => Scoring::Sigmoid,
        other => {
            return Err(c.bad(
                "scoring_func",
                format!("is `{other}`; supported: softmax, sigmoid"),
            ));
        }
    };
    let (group_score, groups, topk_groups) = match (v3, method) {
        (false, "greedy") => (GroupScore::None, 1, 1),
        (false, "group_limited_greedy") => (
            GroupScore::Max,
            c.positive("n_group")?,
            c.positive("topk_group")?,
        ),
        (true, "noaux_tc") => (
            GroupScore::Top2Sum,
            c.usize_or("n_group", 8)?,
            c.usize_or("topk_group", 4)?,
        ),
        (_, other) => {
            return Err(c.bad(
                "topk_method",
                format!(
                    "is `{other}`; the {} block supports {}",
                    c.family,
                    if v3 {
                        "noaux_tc"
                    } else {
                        "greedy, group_limited_greedy"
                    }
                ),
            ));
        }
    };
    if v3 && scoring != Scoring::Sigmoid {
        return Err(c.bad("scoring_func", "must be `sigmoid` for DeepSeek-V3"));
    }
    if !v3 && scoring != Scoring::Softmax {
        return Err(c.bad("scoring_func", "must be `softmax` for DeepSeek-V2"));
    }
    let n_shared = c.usize_or("n_shared_experts", if v3 { 1 } else { 0 })?;
    Ok(Moe {
        num_experts,
        top_k: c.positive("num_experts_per_tok")?,
        intermediate,
        moe_layers,
        expert_groups: groups,
        topk_groups,
        group_score,
        scoring,
        norm_topk_prob: c.bool_or("norm_topk_prob", v3)?,
        routed_scaling_factor: c.f64_or("routed_scaling_factor", if v3 { 2.5 } else { 1.0 })?,
        correction_bias: v3,
        shared: (n_shared > 0).then_some(SharedExperts {
            count: n_shared,
            intermediate: n_shared * intermediate,
            gated: false,
        }),
    })
}

/// gpt-oss: every layer is a MoE layer; the top-k logits (router bias included) are
/// softmax-normalised among themselves.
fn gpt_oss(c: &Cfg<'_>, layers: usize) -> Result<Moe> {
    Ok(Moe {
        num_experts: c.positive("num_local_experts")?,
        top_k: c.positive("num_experts_per_tok")?,
        intermediate: c.positive("intermediate_size")?,
        moe_layers: (0..layers).collect(),
        expert_groups: 1,
        topk_groups: 1,
        group_score: GroupScore::None,
        scoring: Scoring::Softmax,
        norm_topk_prob: false,
        routed_scaling_factor: 1.0,
        correction_bias: false,
        shared: None,
    })
}

fn validate(c: &Cfg<'_>, m: &Moe) -> Result<()> {
    let e = m.num_experts;
    if m.top_k > e {
        return Err(c.bad(
            "num_experts_per_tok",
            format!("{} is more than the {e} routed experts", m.top_k),
        ));
    }
    if m.moe_layers.is_empty() {
        return Err(ModelError::Unsupported(format!(
            "the {} config has no MoE layer (check num_hidden_layers and the dense-layer fields)",
            c.family
        )));
    }
    if m.expert_groups > 1 {
        if !e.is_multiple_of(m.expert_groups) {
            return Err(c.bad(
                "n_group",
                format!("{} does not divide the {e} routed experts", m.expert_groups),
            ));
        }
        let per = e / m.expert_groups;
        if m.topk_groups == 0 || m.topk_groups > m.expert_groups {
            return Err(c.bad(
                "topk_group",
                format!("{} is not in 1..={}", m.topk_groups, m.expert_groups),
            ));
        }
        if m.topk_groups * per < m.top_k {
            return Err(c.bad(
                "topk_group",
                format!(
                    "{} groups of {per} experts hold fewer than num_experts_per_tok {}",
                    m.topk_groups, m.top_k
                ),
            ));
        }
        if m.group_score == GroupScore::Top2Sum && per < 2 {
            return Err(c.bad(
                "n_group",
                format!("groups of {per} expert cannot be scored by their top two"),
            ));
        }
    }
    Ok(())
}

fn dtype(c: &Cfg<'_>) -> Result<(WeightDtype, Option<Quantization>)> {
    if let Some(q) = c.get("quantization_config") {
        let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("");
        if method != "fp8" {
            return Err(c.bad(
                "quantization_config",
                format!(
                    "quant_method `{method}` is not supported; supported: fp8 (e4m3 with block scales)"
                ),
            ));
        }
        let fmt = q.get("fmt").and_then(Value::as_str).unwrap_or("e4m3");
        if fmt != "e4m3" {
            return Err(c.bad(
                "quantization_config",
                format!("fmt `{fmt}` is not supported; supported: e4m3"),
            ));
        }
        let block = match q.get("weight_block_size") {
            None | Some(Value::Null) => [128, 128],
            Some(Value::Array(a)) if a.len() == 2 => {
                let dim = |x: &Value| x.as_u64().filter(|&n| n > 0).map(|n| n as usize);
                match (dim(&a[0]), dim(&a[1])) {
                    (Some(r), Some(col)) => [r, col],
                    _ => {
                        return Err(c.bad(
                            "quantization_config",
                            "weight_block_size must be two positive integers",
                        ));
                    }
                }
            }
            Some(x) => {
                return Err(c.bad(
                    "quantization_config",
                    format!("weight_block_size must be [rows, cols], not {x}"),
                ));
            }
        };
        return Ok((WeightDtype::Fp8E4m3, Some(Quantization { block })));
    }
    // transformers >= 4.56 writes `dtype`, older versions `torch_dtype`.
    let name = match c.get("dtype").or_else(|| c.get("torch_dtype")) {
        None => return Ok((WeightDtype::F32, None)),
        Some(x) => x.as_str().unwrap_or(""),
    };
    let d = match name {
        "bfloat16" => WeightDtype::Bf16,
        "float16" => WeightDtype::F16,
        "float32" => WeightDtype::F32,
        other => {
            return Err(c.bad(
                "torch_dtype",
                format!("`{other}` is not supported; supported: bfloat16, float16, float32"),
            ));
        }
    };
    Ok((d, None))
}

#[cfg(test)]
mod tests;
