//! The worker's view of the model description: the one a checkpoint's `config.json` gives,
//! or one built from the shape flags for synthetic weights (optionally imitating a family's
//! gating with `--family`), and the kernels' gating configuration derived from it.

use moe_kernels::{GatingConfig, GroupScore as KGroupScore, Scoring as KScoring};
use moe_model::{
    Family, GroupScore, ModelDescription, Scoring, SharedExperts, TensorNames, WeightDtype,
};

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

/// The kernels' gating configuration of a model: exactly its family's transformers gating.
///
/// DeepSeek-V2 never renormalises in transformers (whatever `norm_topk_prob` says) and always
/// scales by `routed_scaling_factor`; the other families renormalise when `norm_topk_prob`
/// (Mixtral: always) and scale (DeepSeek-V3; 1 elsewhere).
pub fn gating_config(d: &ModelDescription) -> GatingConfig {
    let renormalize = match d.family {
        Family::DeepseekV2 => false,
        _ => d.norm_topk_prob,
    };
    GatingConfig {
        num_experts: d.num_experts,
        top_k: d.top_k,
        scoring: match d.scoring {
            Scoring::Softmax => KScoring::Softmax,
            Scoring::Sigmoid => KScoring::Sigmoid,
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
