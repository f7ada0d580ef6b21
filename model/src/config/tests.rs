//! Descriptions of the released configs' MoE fields (values as published on the Hub).

use crate::*;

fn desc(json: &str) -> ModelDescription {
    ModelDescription::from_config_str(json).unwrap()
}

fn err(json: &str) -> String {
    ModelDescription::from_config_str(json)
        .unwrap_err()
        .to_string()
}

const DEEPSEEK_V3: &str = r#"{
  "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
  "hidden_size": 7168, "num_hidden_layers": 61, "n_routed_experts": 256,
  "num_experts_per_tok": 8, "moe_intermediate_size": 2048, "n_shared_experts": 1,
  "first_k_dense_replace": 3, "moe_layer_freq": 1, "n_group": 8, "topk_group": 4,
  "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": true,
  "routed_scaling_factor": 2.5, "hidden_act": "silu", "torch_dtype": "bfloat16",
  "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
    "quant_method": "fp8", "weight_block_size": [128, 128]}
}"#;

#[test]
fn deepseek_v3_release() {
    let d = desc(DEEPSEEK_V3);
    assert_eq!(d.family, Family::DeepseekV3);
    assert_eq!(d.moe_layers, (3..61).collect::<Vec<_>>());
    assert_eq!(d.num_moe_layers(), 58);
    assert_eq!(d.decoder_layer(0), Some(3));
    assert_eq!(d.moe_index(3), Some(0));
    assert_eq!(d.moe_index(2), None);
    assert_eq!(
        (d.num_experts, d.top_k, d.hidden, d.intermediate),
        (256, 8, 7168, 2048)
    );
    assert_eq!((d.expert_groups, d.topk_groups), (8, 4));
    assert_eq!(d.group_score, GroupScore::Top2Sum);
    assert_eq!(d.scoring, Scoring::Sigmoid);
    assert!(d.norm_topk_prob && d.correction_bias);
    assert_eq!(d.routed_scaling_factor, 2.5);
    assert_eq!(d.shared_experts, 1);
    assert_eq!(d.shared.unwrap().intermediate, 2048);
    assert_eq!(d.weight_dtype, WeightDtype::Fp8E4m3);
    assert_eq!(d.quantization, Some(Quantization { block: [128, 128] }));
    // 3 x 7168 x 2048 bytes of FP8 plus 2 x 16x56 + 56x16 f32 scales.
    assert_eq!(d.expert_bytes(), 3 * 7168 * 2048 + 4 * 3 * 16 * 56);
    assert_eq!(
        d.tensors.correction_bias(3, "mlp").unwrap(),
        "model.layers.3.mlp.gate.e_score_correction_bias"
    );
    assert_eq!(
        d.tensors.shared_expert(3, "mlp", Projection::Down).unwrap(),
        "model.layers.3.mlp.shared_experts.down_proj.weight"
    );
    let w = d.tensors.expert(5, "mlp", 7, Projection::Up);
    assert_eq!(w, "model.layers.5.mlp.experts.7.up_proj.weight");
    assert_eq!(d.tensors.scale_of(&w), format!("{w}_scale_inv"));
}

#[test]
fn json_keys_other_tools_read() {
    let v = serde_json::to_value(desc(DEEPSEEK_V3)).unwrap();
    for (k, want) in [
        ("architecture", serde_json::json!("DeepseekV3ForCausalLM")),
        ("numExperts", serde_json::json!(256)),
        ("topK", serde_json::json!(8)),
        ("hidden", serde_json::json!(7168)),
        ("intermediate", serde_json::json!(2048)),
        ("expertGroups", serde_json::json!(8)),
        ("topkGroups", serde_json::json!(4)),
        ("scoring", serde_json::json!("sigmoid")),
        ("normTopkProb", serde_json::json!(true)),
        ("routedScalingFactor", serde_json::json!(2.5)),
        ("sharedExperts", serde_json::json!(1)),
        ("weightDtype", serde_json::json!("fp8_e4m3")),
    ] {
        assert_eq!(v[k], want, "key {k}");
    }
    assert_eq!(v["moeLayers"][0], 3);
    let back: ModelDescription = serde_json::from_value(v).unwrap();
    assert_eq!(back, desc(DEEPSEEK_V3));
}

#[test]
fn deepseek_v2_and_lite() {
    let v2 = desc(
        r#"{"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
        "hidden_size": 5120, "num_hidden_layers": 60, "n_routed_experts": 160,
        "num_experts_per_tok": 6, "moe_intermediate_size": 1536, "n_shared_experts": 2,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "n_group": 8, "topk_group": 3,
        "topk_method": "group_limited_greedy", "scoring_func": "softmax",
        "norm_topk_prob": false, "routed_scaling_factor": 16.0, "torch_dtype": "bfloat16"}"#,
    );
    assert_eq!(v2.moe_layers.len(), 59);
    assert_eq!(v2.group_score, GroupScore::Max);
    assert_eq!((v2.expert_groups, v2.topk_groups), (8, 3));
    assert_eq!(v2.routed_scaling_factor, 16.0);
    assert!(!v2.correction_bias && !v2.norm_topk_prob);
    assert_eq!(v2.shared.unwrap().intermediate, 2 * 1536);
    let lite = desc(
        r#"{"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
        "hidden_size": 2048, "num_hidden_layers": 27, "n_routed_experts": 64,
        "num_experts_per_tok": 6, "moe_intermediate_size": 1408, "n_shared_experts": 2,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "n_group": 1, "topk_group": 1,
        "topk_method": "greedy", "torch_dtype": "bfloat16"}"#,
    );
    assert_eq!(lite.moe_layers, (1..27).collect::<Vec<_>>());
    assert_eq!(
        (lite.expert_groups, lite.group_score),
        (1, GroupScore::None)
    );
    assert_eq!(lite.weight_dtype, WeightDtype::Bf16);
}

#[test]
fn qwen_families() {
    let q3 = desc(
        r#"{"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "hidden_size": 2048, "num_hidden_layers": 48, "num_experts": 128,
        "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": true,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "torch_dtype": "bfloat16"}"#,
    );
    assert_eq!(q3.num_moe_layers(), 48);
    assert_eq!(q3.shared_experts, 0);
    assert!(q3.norm_topk_prob);
    assert_eq!(
        q3.tensors.router(4, "mlp"),
        "model.layers.4.mlp.gate.weight"
    );
    let sparse = desc(
        r#"{"model_type": "qwen3_moe", "hidden_size": 64, "num_hidden_layers": 6,
        "num_local_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "decoder_sparse_step": 2, "mlp_only_layers": [3], "dtype": "float32"}"#,
    );
    // (d + 1) % 2 == 0 gives 1, 3, 5; 3 is dense.
    assert_eq!(sparse.moe_layers, vec![1, 5]);
    assert_eq!(sparse.architecture, "Qwen3MoeForCausalLM");
    assert_eq!(sparse.weight_dtype, WeightDtype::F32);
    let q2 = desc(
        r#"{"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
        "hidden_size": 2048, "num_hidden_layers": 24, "num_experts": 60,
        "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632, "norm_topk_prob": false,
        "torch_dtype": "bfloat16"}"#,
    );
    let s = q2.shared.unwrap();
    assert_eq!((s.count, s.intermediate, s.gated), (1, 5632, true));
    assert_eq!(
        q2.tensors.shared_expert_gate(0, "mlp").unwrap(),
        "model.layers.0.mlp.shared_expert_gate.weight"
    );
    assert_eq!(
        q2.tensors
            .shared_expert(0, "mlp", Projection::Gate)
            .unwrap(),
        "model.layers.0.mlp.shared_expert.gate_proj.weight"
    );
}

#[test]
fn mixtral() {
    let m = desc(
        r#"{"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "hidden_size": 4096, "num_hidden_layers": 32, "num_local_experts": 8,
        "num_experts_per_tok": 2, "intermediate_size": 14336, "torch_dtype": "bfloat16"}"#,
    );
    assert_eq!(m.num_moe_layers(), 32);
    assert!(m.norm_topk_prob);
    assert_eq!(m.tensors.modules[0], "block_sparse_moe");
    assert_eq!(
        m.tensors.expert(0, "block_sparse_moe", 1, Projection::Up),
        "model.layers.0.block_sparse_moe.experts.1.w3.weight"
    );
    assert_eq!(
        m.tensors.fused_gate_up(2, "mlp"),
        "model.layers.2.mlp.experts.gate_up_proj"
    );
}

#[test]
fn bad_configs_name_the_problem() {
    let e = err(r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}"#);
    assert!(
        e.contains("LlamaForCausalLM") && e.contains("Qwen3MoeForCausalLM"),
        "{e}"
    );
    assert!(e.contains("DeepseekV3ForCausalLM"), "{e}");
    let e = err(
        r#"{"model_type": "mixtral", "hidden_size": 8, "num_hidden_layers": 2,
        "num_experts_per_tok": 2, "intermediate_size": 4}"#,
    );
    assert_eq!(
        e,
        "config.json of a Mixtral model lacks `num_local_experts`"
    );
    let e = err(&DEEPSEEK_V3.replace("\"n_group\": 8", "\"n_group\": 7"));
    assert!(e.contains("`n_group`") && e.contains("256"), "{e}");
    let e = err(&DEEPSEEK_V3.replace("\"fmt\": \"e4m3\"", "\"fmt\": \"e5m2\""));
    assert!(e.contains("e5m2"), "{e}");
    let e = err(&DEEPSEEK_V3.replace("\"hidden_act\": \"silu\"", "\"hidden_act\": \"gelu\""));
    assert!(e.contains("hidden_act") && e.contains("gelu"), "{e}");
    let e = err(&DEEPSEEK_V3.replace("\"hidden_size\": 7168", "\"hidden_size\": \"big\""));
    assert!(e.contains("`hidden_size`"), "{e}");
    let e = err(r#"[1, 2]"#);
    assert!(e.contains("object"), "{e}");
}

#[test]
fn reads_a_directory_and_its_index() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(CONFIG_FILE), DEEPSEEK_V3).unwrap();
    assert_eq!(
        ModelDescription::from_path(dir.path()).unwrap(),
        desc(DEEPSEEK_V3)
    );
    assert_eq!(read_index(dir.path()).unwrap(), None);
    std::fs::write(
        dir.path().join(INDEX_FILE),
        r#"{"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors"}}"#,
    )
    .unwrap();
    let idx = read_index(dir.path()).unwrap().unwrap();
    assert_eq!(idx["a"], "model-00001-of-00002.safetensors");
    std::fs::write(
        dir.path().join(INDEX_FILE),
        r#"{"weight_map": {"a": "../x"}}"#,
    )
    .unwrap();
    assert!(read_index(dir.path()).is_err());
    let missing = ModelDescription::from_path(&dir.path().join("nope")).unwrap_err();
    assert!(missing.to_string().contains("nope"));
}

#[test]
fn gpt_oss() {
    let cfg = r#"{"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss",
        "hidden_size": 2880, "num_hidden_layers": 24, "num_local_experts": 32,
        "num_experts_per_tok": 4, "intermediate_size": 2880, "swiglu_limit": 7.0,
        "hidden_act": "silu", "torch_dtype": "bfloat16"}"#;
    let d = desc(cfg);
    assert_eq!(d.family, Family::GptOss);
    assert_eq!(d.num_moe_layers(), 24);
    assert!(d.router_bias && d.expert_bias && !d.norm_topk_prob);
    assert_eq!(d.activation, "clamped_swiglu");
    assert_eq!(
        d.swiglu,
        Some(ClampedSwiglu {
            alpha: 1.702,
            limit: 7.0
        })
    );
    assert_eq!(d.tensors.fused_layout, FusedLayout::InputMajorInterleaved);
    assert_eq!(
        d.tensors.router_bias(3, "mlp").unwrap(),
        "model.layers.3.mlp.router.bias"
    );
    // The released weights are MXFP4: refused by name.
    let e = err(&cfg.replace(
        "\"torch_dtype\": \"bfloat16\"",
        "\"quantization_config\": {\"quant_method\": \"mxfp4\"}",
    ));
    assert!(e.contains("mxfp4"), "{e}");
}

/// Sizes that would allocate a vector per layer or per expert beyond any model are refused by
/// name before anything is allocated (`num_hidden_layers: 1e11` used to abort the process).
#[test]
fn absurd_sizes_are_refused_by_name() {
    let qwen = r#"{"model_type": "qwen3_moe", "hidden_size": 64, "num_hidden_layers": 6,
        "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32}"#;
    assert_eq!(desc(qwen).num_moe_layers(), 6);
    for (from, to, field) in [
        (
            "\"num_hidden_layers\": 6",
            "\"num_hidden_layers\": 100000000000",
            "num_hidden_layers",
        ),
        (
            "\"num_hidden_layers\": 6",
            "\"num_hidden_layers\": 65537",
            "num_hidden_layers",
        ),
        (
            "\"num_experts\": 8",
            "\"num_experts\": 4294967296",
            "num_experts",
        ),
        (
            "\"hidden_size\": 64",
            "\"hidden_size\": 100000000000",
            "hidden_size",
        ),
        (
            "\"moe_intermediate_size\": 32",
            "\"moe_intermediate_size\": 18446744073709551615",
            "moe_intermediate_size",
        ),
    ] {
        let e = err(&qwen.replace(from, to));
        assert!(
            e.contains(&format!("`{field}`")) && e.contains("more than"),
            "{e}"
        );
    }
    // The bound itself is accepted.
    let big = desc(&qwen.replace("\"num_hidden_layers\": 6", "\"num_hidden_layers\": 65536"));
    assert_eq!(big.num_moe_layers(), 65536);
    let e = err(&DEEPSEEK_V3.replace(
        "\"n_routed_experts\": 256",
        "\"n_routed_experts\": 9999999999",
    ));
    assert!(e.contains("`n_routed_experts`"), "{e}");
}

/// `mlp_only_layers` naming a layer the model does not have changes nothing, as in
/// transformers (`layer_idx not in config.mlp_only_layers`), which loads such a config.
#[test]
fn mlp_only_layers_beyond_the_model_are_read_as_transformers_reads_them() {
    let qwen = r#"{"model_type": "qwen3_moe", "hidden_size": 64, "num_hidden_layers": 2,
        "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "mlp_only_layers": [LIST]}"#;
    assert_eq!(desc(&qwen.replace("LIST", "1")).moe_layers, vec![0]);
    assert_eq!(desc(&qwen.replace("LIST", "0, 5")).moe_layers, vec![1]);
}
