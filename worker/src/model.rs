//! The worker's view of the model description: the one a checkpoint's `config.json` gives,
//! or one built from the shape flags for synthetic weights (optionally imitating a family's
//! gating with `--family`), and the kernels' gating configuration derived from it.

use std::sync::Arc;

use moe_api::env as api_env;
use moe_kernels::cpu::Activation;
use moe_kernels::{GatingConfig, GroupScore as KGroupScore, Scoring as KScoring};
use moe_model::{
    Family, GroupScore, ModelDescription, Scoring, SharedExperts, TensorNames, WeightDtype,
};

use crate::checkpoint::Checkpoint;
use crate::config::error::{ConfigError, ConfigErrorKind, bad, mismatch};
use crate::config::flags::{Args, Scoring as FlagScoring, WeightsSource, env};

/// Shape flags of a synthetic model (defaults applied).
#[derive(Debug, Clone, Copy)]
pub struct SyntheticShape {
    pub num_layers: usize,
    pub num_experts: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub top_k: usize,
    pub expert_groups: usize,
    pub topk_groups: usize,
    pub scoring: Scoring,
}

/// The description of synthetic weights. Without a family the gating is the worker's
/// historical one: softmax renormalised (groups scored by their top two) or grouped sigmoid,
/// factor 1, no correction bias, no shared experts. With a family, its released models'
/// gating: Qwen3-MoE and Mixtral renormalise; Qwen2-MoE does not and adds a gated shared
/// expert (4x the expert intermediate size, as Qwen1.5-MoE); DeepSeek-V2 scores groups by their
/// max, scales by 16 (1 without groups, as V2-Lite) and adds two shared experts; DeepSeek-V3
/// uses sigmoid with a correction bias, renormalises, scales by 2.5 and adds one shared expert.
pub fn synthetic(family: Option<Family>, s: SyntheticShape) -> ModelDescription {
    let grouped = s.expert_groups > 1;
    let mut d = ModelDescription {
        architecture: "synthetic".into(),
        family: family.unwrap_or(match s.scoring {
            Scoring::Softmax => Family::Qwen3Moe,
            Scoring::Sigmoid => Family::DeepseekV3,
        }),
        model_type: "synthetic".into(),
        num_hidden_layers: s.num_layers,
        moe_layers: (0..s.num_layers).collect(),
        num_experts: s.num_experts,
        top_k: s.top_k,
        hidden: s.hidden,
        intermediate: s.intermediate,
        expert_groups: s.expert_groups,
        topk_groups: s.topk_groups,
        group_score: if grouped {
            GroupScore::Top2Sum
        } else {
            GroupScore::None
        },
        scoring: s.scoring,
        norm_topk_prob: true,
        routed_scaling_factor: 1.0,
        correction_bias: false,
        shared_experts: 0,
        shared: None,
        activation: "silu".into(),
        swiglu: None,
        router_bias: false,
        expert_bias: false,
        weight_dtype: WeightDtype::Bf16,
        quantization: None,
        tensors: TensorNames::for_family(family.unwrap_or(Family::Qwen3Moe), false, false),
    };
    let Some(f) = family else {
        return d;
    };
    d.architecture = format!("synthetic {}", f.architecture());
    let shared = |count: usize, intermediate: usize, gated: bool| SharedExperts {
        count,
        intermediate,
        gated,
    };
    match f {
        Family::Qwen3Moe | Family::Mixtral => {}
        // The gating only (softmax over the top-k logits); synthetic experts have no biases.
        Family::GptOss => d.norm_topk_prob = false,
        Family::Qwen2Moe => {
            d.norm_topk_prob = false;
            d.shared = Some(shared(1, 4 * s.intermediate, true));
        }
        Family::DeepseekV2 => {
            d.norm_topk_prob = false;
            if grouped {
                d.group_score = GroupScore::Max;
                d.routed_scaling_factor = 16.0;
            }
            d.shared = Some(shared(2, 2 * s.intermediate, false));
        }
        Family::DeepseekV3 => {
            d.correction_bias = true;
            d.routed_scaling_factor = 2.5;
            d.shared = Some(shared(1, s.intermediate, false));
        }
    }
    d.shared_experts = d.shared.map_or(0, |x| x.count);
    d.tensors = TensorNames::for_family(f, d.correction_bias, d.shared.is_some());
    d
}

/// The experts' gated activation (gpt-oss: its clamped SwiGLU).
pub fn activation(d: &ModelDescription) -> Activation {
    match d.swiglu {
        Some(s) => Activation::ClampedSwiglu {
            alpha: s.alpha as f32,
            limit: s.limit as f32,
        },
        None => Activation::SiluMul,
    }
}

/// The kernels' gating configuration of a model: exactly its family's transformers gating.
///
/// DeepSeek-V2 never renormalises in transformers (whatever `norm_topk_prob` says) and always
/// scales by `routed_scaling_factor`; the other families renormalise when `norm_topk_prob`
/// (Mixtral: always) and scale (DeepSeek-V3; 1 elsewhere).
pub fn gating_config(d: &ModelDescription) -> GatingConfig {
    let renormalize = match d.family {
        Family::DeepseekV2 | Family::GptOss => false,
        _ => d.norm_topk_prob,
    };
    GatingConfig {
        num_experts: d.num_experts,
        top_k: d.top_k,
        scoring: match (d.family, d.scoring) {
            (Family::GptOss, _) => KScoring::SoftmaxTopK,
            (_, Scoring::Softmax) => KScoring::Softmax,
            (_, Scoring::Sigmoid) => KScoring::Sigmoid,
        },
        renormalize,
        num_groups: d.expert_groups,
        topk_groups: d.topk_groups,
        routed_scaling_factor: d.routed_scaling_factor as f32,
        group_score: match d.group_score {
            GroupScore::Max => KGroupScore::Max,
            GroupScore::None | GroupScore::Top2Sum => KGroupScore::Top2Sum,
        },
    }
}

/// The model description and, for a checkpoint, the opened checkpoint. A shape flag given
/// with a checkpoint must agree with it.
#[allow(clippy::type_complexity)]
pub(crate) fn resolve(
    args: &Args,
    weights: &WeightsSource,
) -> Result<(Arc<ModelDescription>, Option<Arc<Checkpoint>>), ConfigError> {
    use api_env as e;
    let family = args
        .family
        .as_deref()
        .map(|f| {
            f.parse::<Family>()
                .map_err(|err| bad("family", env::FAMILY, err))
        })
        .transpose()?;
    // spec.model.architecture: names the family synthetic weights imitate.
    let arch_family = args
        .architecture
        .as_deref()
        .map(|a| {
            a.parse::<Family>()
                .map_err(|err| bad("architecture", e::ARCHITECTURE, err))
        })
        .transpose()?;
    let family = match (family, arch_family) {
        (Some(f), Some(a)) if f != a => {
            return Err(bad(
                "architecture",
                e::ARCHITECTURE,
                format!(
                    "{} is a {} model but --family is {}",
                    args.architecture.as_deref().unwrap_or_default(),
                    a.model_type(),
                    f.model_type()
                ),
            ));
        }
        (f, a) => f.or(a),
    };
    let flag_scoring = args.scoring.map(|s| match s {
        FlagScoring::Softmax => Scoring::Softmax,
        FlagScoring::Sigmoid => Scoring::Sigmoid,
    });
    let dir = match weights {
        WeightsSource::Synthetic { .. } => {
            let family_scoring = family.map(|f| match f {
                Family::DeepseekV3 => Scoring::Sigmoid,
                _ => Scoring::Softmax,
            });
            let scoring = match (flag_scoring, family_scoring) {
                (Some(s), Some(f)) if s != f => {
                    return Err(bad(
                        "scoring",
                        e::SCORING,
                        format!(
                            "{s:?} disagrees with --family {} ({f:?})",
                            args.family.as_deref().unwrap_or_default()
                        )
                        .to_lowercase(),
                    ));
                }
                (Some(s), _) | (None, Some(s)) => s,
                (None, None) => Scoring::Softmax,
            };
            let shape = SyntheticShape {
                num_layers: args.num_layers.unwrap_or(4),
                num_experts: args.num_experts.unwrap_or(16),
                hidden: args.hidden.unwrap_or(128),
                intermediate: args.intermediate.unwrap_or(256),
                top_k: args.top_k.unwrap_or(2),
                expert_groups: args.expert_groups.unwrap_or(1),
                topk_groups: args.topk_groups.unwrap_or(1),
                scoring,
            };
            let mut d = synthetic(family, shape);
            if let Some(v) = args.norm_topk_prob {
                d.norm_topk_prob = v;
            }
            if let Some(v) = args.routed_scaling_factor {
                d.routed_scaling_factor = v;
            }
            if let Some(n) = args.shared_experts
                && n != d.shared_experts
            {
                return Err(bad(
                    "shared-experts",
                    e::SHARED_EXPERTS,
                    format!(
                        "synthetic weights of this family have {} shared experts, not {n}: pick the family (--family / --architecture) that has them",
                        d.shared_experts
                    ),
                ));
            }
            return Ok((Arc::new(d), None));
        }
        WeightsSource::Safetensors { dir } => dir,
    };
    let weights_err = |err: String| ConfigError {
        kind: ConfigErrorKind::CheckpointInvalid,
        ..bad("weights", e::WEIGHTS, format!("{}: {err}", dir.display()))
    };
    let desc = ModelDescription::from_path(dir).map_err(|err| weights_err(err.to_string()))?;
    let config_path = dir.join(moe_model::CONFIG_FILE);
    if let Some(a) = &args.architecture
        && *a != desc.architecture
    {
        return Err(mismatch(
            "architecture",
            e::ARCHITECTURE,
            format!(
                "{a} disagrees with the checkpoint's architecture {} ({}); fix spec.model.architecture",
                desc.architecture,
                config_path.display()
            ),
        ));
    }
    if let Some(f) = family
        && f != desc.family
    {
        return Err(mismatch(
            "family",
            env::FAMILY,
            format!(
                "{} disagrees with the checkpoint's family {} ({}, {})",
                f.model_type(),
                desc.family.model_type(),
                desc.architecture,
                dir.join(moe_model::CONFIG_FILE).display()
            ),
        ));
    }
    let checks: [(&'static str, &'static str, Option<usize>, usize, &str); 7] = [
        (
            "num-layers",
            e::NUM_LAYERS,
            args.num_layers,
            desc.num_moe_layers(),
            "MoE layers",
        ),
        (
            "num-experts",
            e::NUM_EXPERTS,
            args.num_experts,
            desc.num_experts,
            "routed experts",
        ),
        ("hidden", e::HIDDEN, args.hidden, desc.hidden, "hidden size"),
        (
            "intermediate",
            e::INTERMEDIATE,
            args.intermediate,
            desc.intermediate,
            "expert intermediate size",
        ),
        (
            "top-k",
            e::TOP_K,
            args.top_k,
            desc.top_k,
            "experts per token",
        ),
        (
            "expert-groups",
            e::EXPERT_GROUPS,
            args.expert_groups,
            desc.expert_groups,
            "expert groups",
        ),
        (
            "topk-groups",
            e::TOPK_GROUPS,
            args.topk_groups,
            desc.topk_groups,
            "groups per token",
        ),
    ];
    let checks = checks.into_iter().chain([(
        "shared-experts",
        e::SHARED_EXPERTS,
        args.shared_experts,
        desc.shared_experts,
        "shared experts",
    )]);
    for (flag, env, given, found, what) in checks {
        if let Some(v) = given
            && v != found
        {
            return Err(mismatch(
                flag,
                env,
                format!(
                    "{v} disagrees with the checkpoint's {what} {found} ({}); drop the flag or fix it",
                    dir.join(moe_model::CONFIG_FILE).display()
                ),
            ));
        }
    }
    if let Some(v) = args.norm_topk_prob
        && v != desc.norm_topk_prob
    {
        return Err(mismatch(
            "norm-topk-prob",
            e::NORM_TOPK_PROB,
            format!(
                "{v} disagrees with the checkpoint's norm_topk_prob {} ({})",
                desc.norm_topk_prob,
                config_path.display()
            ),
        ));
    }
    if let Some(v) = args.routed_scaling_factor
        && (v - desc.routed_scaling_factor).abs() > 1e-9 * v.abs().max(1.0)
    {
        return Err(mismatch(
            "routed-scaling-factor",
            e::ROUTED_SCALING_FACTOR,
            format!(
                "{v} disagrees with the checkpoint's routed_scaling_factor {} ({})",
                desc.routed_scaling_factor,
                config_path.display()
            ),
        ));
    }
    if let Some(s) = flag_scoring
        && s != desc.scoring
    {
        return Err(mismatch(
            "scoring",
            e::SCORING,
            format!(
                "{s:?} disagrees with the checkpoint's scoring {:?} ({})",
                desc.scoring,
                dir.join(moe_model::CONFIG_FILE).display()
            )
            .to_lowercase(),
        ));
    }
    let ck = Checkpoint::open(dir, desc.clone()).map_err(|err| weights_err(err.to_string()))?;
    Ok((Arc::new(desc), Some(Arc::new(ck))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(scoring: Scoring, groups: usize) -> SyntheticShape {
        SyntheticShape {
            num_layers: 2,
            num_experts: 16,
            hidden: 32,
            intermediate: 16,
            top_k: 4,
            expert_groups: groups,
            topk_groups: groups.min(2),
            scoring,
        }
    }

    #[test]
    fn synthetic_without_family_gates_as_before() {
        let g = gating_config(&synthetic(None, shape(Scoring::Softmax, 1)));
        assert_eq!(g, GatingConfig::softmax(16, 4, true));
        let g = gating_config(&synthetic(None, shape(Scoring::Sigmoid, 4)));
        assert_eq!(g, GatingConfig::grouped_sigmoid(16, 4, 4, 2, 1.0));
    }

    #[test]
    fn synthetic_families_imitate_their_gating() {
        let v3 = synthetic(Some(Family::DeepseekV3), shape(Scoring::Sigmoid, 4));
        assert!(v3.correction_bias);
        assert_eq!(v3.shared_experts, 1);
        let g = gating_config(&v3);
        assert_eq!(g.routed_scaling_factor, 2.5);
        assert!(g.renormalize);
        let v2 = synthetic(Some(Family::DeepseekV2), shape(Scoring::Softmax, 4));
        let g = gating_config(&v2);
        assert_eq!(g.group_score, KGroupScore::Max);
        assert!(!g.renormalize);
        assert_eq!(v2.shared.unwrap().intermediate, 32);
        let q2 = synthetic(Some(Family::Qwen2Moe), shape(Scoring::Softmax, 1));
        assert!(q2.shared.unwrap().gated);
        assert!(!gating_config(&q2).renormalize);
    }
}
