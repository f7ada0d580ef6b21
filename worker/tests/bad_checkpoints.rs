//! Bad checkpoints and flags that disagree with a checkpoint are refused at configuration
//! time (before the group forms; the binary exits 2), each with a message naming what is
//! wrong: the tensor and the files searched, the field and the family, the flag and both
//! values.

use std::path::{Path, PathBuf};

use clap::Parser;
use moe_worker::config::{Args, Config};
use safetensors::{Dtype, SafeTensors};

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/models")
        .join(case)
}

/// A copy of a fixture's checkpoint (config.json and model.safetensors) in a temp dir.
fn copy(case: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture(case).join(f), dir.path().join(f)).unwrap();
    }
    dir
}

type Tensor = (String, Dtype, Vec<usize>, Vec<u8>);

/// Rewrites `model.safetensors` after `edit` changed its tensor list.
fn rewrite(dir: &Path, edit: impl FnOnce(&mut Vec<Tensor>)) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<Tensor> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
}

fn config_error(dir: &Path, extra: &[&str]) -> String {
    let weights = dir.to_string_lossy().into_owned();
    let mut argv = vec!["moe-worker", "--weights", &weights];
    argv.extend_from_slice(extra);
    match Config::from_args(Args::try_parse_from(argv).unwrap()) {
        Ok(_) => panic!("{dir:?} {extra:?} was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_good_checkpoint_configures_the_shape() {
    let c = Config::from_args(
        Args::try_parse_from([
            "moe-worker",
            "--weights",
            &fixture("deepseek_v3").to_string_lossy(),
            "--num-experts",
            "16",
        ])
        .unwrap(),
    )
    .unwrap();
    assert_eq!(c.shape.num_experts, c.model.num_experts);
    assert_eq!(c.shape.num_layers, c.model.moe_layers.len());
    assert!(c.checkpoint.is_some());
}

#[test]
fn unknown_architecture_lists_the_supported_ones() {
    let dir = copy("qwen3_moe");
    edit_config(dir.path(), |v| {
        v["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
        v["model_type"] = serde_json::json!("llama");
    });
    let e = config_error(dir.path(), &[]);
    assert!(e.starts_with("invalid --weights (env MOE_WEIGHTS)"), "{e}");
    assert!(
        e.contains("LlamaForCausalLM") && e.contains("Qwen3MoeForCausalLM"),
        "{e}"
    );
    assert!(
        e.contains("DeepseekV3ForCausalLM") && e.contains("MixtralForCausalLM"),
        "{e}"
    );
}

#[test]
fn a_config_without_a_needed_field_names_it_and_the_family() {
    let dir = copy("deepseek_v2");
    edit_config(dir.path(), |v| {
        v.as_object_mut().unwrap().remove("moe_intermediate_size");
    });
    let e = config_error(dir.path(), &[]);
    assert!(
        e.contains("DeepSeek-V2") && e.contains("`moe_intermediate_size`"),
        "{e}"
    );
}

#[test]
fn a_missing_tensor_is_named_with_the_files_searched() {
    let dir = copy("qwen2_moe");
    let gone = "model.layers.3.mlp.experts.5.up_proj.weight";
    rewrite(dir.path(), |t| t.retain(|x| x.0 != gone));
    let e = config_error(dir.path(), &[]);
    assert!(
        e.contains(&format!("tensor {gone} not found")) && e.contains("model.safetensors"),
        "{e}"
    );
    // A misnamed shared expert is missing under its expected name.
    let dir = copy("qwen2_moe");
    rewrite(dir.path(), |t| {
        for x in t.iter_mut() {
            x.0 = x.0.replace("shared_expert_gate", "shared_gate");
        }
    });
    let e = config_error(dir.path(), &[]);
    assert!(
        e.contains("model.layers.1.mlp.shared_expert_gate.weight not found"),
        "{e}"
    );
}

#[test]
fn a_wrong_shape_names_the_tensor_and_both_shapes() {
    let dir = copy("mixtral");
    edit_config(dir.path(), |v| {
        let i = v["intermediate_size"].as_u64().unwrap();
        v["intermediate_size"] = serde_json::json!(i + 8);
    });
    let e = config_error(dir.path(), &[]);
    assert!(
        e.contains("block_sparse_moe.experts.0.w1.weight has shape"),
        "{e}"
    );
}

#[test]
fn an_unsupported_dtype_is_named() {
    let dir = copy("qwen3_moe");
    let name = "model.layers.1.mlp.experts.0.gate_proj.weight";
    rewrite(dir.path(), |t| {
        for x in t.iter_mut().filter(|x| x.0 == name) {
            // Same bytes per element, another dtype.
            x.1 = Dtype::I16;
        }
    });
    let e = config_error(dir.path(), &[]);
    assert!(
        e.contains(name) && e.contains("I16") && e.contains("F8_E4M3"),
        "{e}"
    );
}

#[test]
fn fp8_without_scales_is_refused() {
    let dir = copy("deepseek_v3_fp8");
    let w = "model.layers.1.mlp.experts.2.down_proj.weight";
    rewrite(dir.path(), |t| {
        t.retain(|x| x.0 != format!("{w}_scale_inv"))
    });
    let e = config_error(dir.path(), &[]);
    assert!(
        e.contains(&format!("tensor {w} is FP8")) && e.contains(&format!("{w}_scale_inv")),
        "{e}"
    );
}

#[test]
fn shape_flags_that_disagree_name_the_flag_and_both_values() {
    let dir = fixture("deepseek_v3");
    let d = moe_model::ModelDescription::from_path(&dir).unwrap();
    let e = config_error(&dir, &["--num-experts", "7"]);
    assert!(
        e.starts_with("invalid --num-experts (env MOE_NUM_EXPERTS): 7 disagrees with the checkpoint's routed experts")
            && e.contains(&d.num_experts.to_string()),
        "{e}"
    );
    let e = config_error(&dir, &["--num-layers", "9"]);
    assert!(
        e.contains("--num-layers") && e.contains("MoE layers 2"),
        "{e}"
    );
    let e = config_error(&dir, &["--scoring", "softmax"]);
    assert!(e.contains("--scoring") && e.contains("sigmoid"), "{e}");
    let e = config_error(&dir, &["--family", "mixtral"]);
    assert!(e.contains("--family") && e.contains("deepseek_v3"), "{e}");
}

/// What spec.model says beyond the shape (MOE_ARCHITECTURE, MOE_SHARED_EXPERTS, ...) is
/// checked against the checkpoint, and the worker's termination message leads with the
/// reason the operator shows (`ModelMismatch`; `CheckpointInvalid` for a broken checkpoint).
#[test]
fn spec_model_fields_that_disagree_are_a_model_mismatch() {
    let dir = fixture("deepseek_v3");
    let weights = dir.to_string_lossy().into_owned();
    let error = |extra: &[&str]| {
        let mut argv = vec!["moe-worker", "--weights", &weights];
        argv.extend_from_slice(extra);
        match Config::from_args(Args::try_parse_from(argv).unwrap()) {
            Ok(_) => panic!("{extra:?} was accepted"),
            Err(e) => e,
        }
    };
    for (extra, needle) in [
        (
            &["--architecture", "Qwen3MoeForCausalLM"][..],
            "disagrees with the checkpoint's architecture DeepseekV3ForCausalLM",
        ),
        (
            &["--shared-experts", "0"][..],
            "disagrees with the checkpoint's shared experts 1",
        ),
        (
            &["--norm-topk-prob", "false"][..],
            "disagrees with the checkpoint's norm_topk_prob true",
        ),
        (
            &["--routed-scaling-factor", "1"][..],
            "disagrees with the checkpoint's routed_scaling_factor 2.5",
        ),
    ] {
        let e = error(extra);
        let line = e.termination_message();
        assert!(line.starts_with("ModelMismatch: invalid --"), "{line}");
        assert!(line.contains(needle), "{line}");
    }
    // Agreeing values are accepted.
    let argv = [
        "moe-worker",
        "--weights",
        &weights,
        "--architecture",
        "DeepseekV3ForCausalLM",
        "--shared-experts",
        "1",
        "--routed-scaling-factor",
        "2.5",
        "--norm-topk-prob",
        "true",
    ];
    Config::from_args(Args::try_parse_from(argv).unwrap()).unwrap();
    // A broken checkpoint is not a mismatch.
    let empty = tempfile::tempdir().unwrap();
    let weights = empty.path().to_string_lossy().into_owned();
    let argv = ["moe-worker", "--weights", &weights];
    let e = Config::from_args(Args::try_parse_from(argv).unwrap()).unwrap_err();
    assert!(
        e.termination_message().starts_with("CheckpointInvalid: "),
        "{}",
        e.termination_message()
    );
}

/// With synthetic weights, spec.model.architecture picks the family to imitate.
#[test]
fn synthetic_weights_imitate_the_named_architecture() {
    let argv = [
        "moe-worker",
        "--architecture",
        "DeepseekV3ForCausalLM",
        "--expert-groups",
        "4",
        "--topk-groups",
        "2",
    ];
    let c = Config::from_args(Args::try_parse_from(argv).unwrap()).unwrap();
    assert!(c.model.correction_bias);
    assert_eq!(c.model.shared_experts, 1);
    let argv = [
        "moe-worker",
        "--architecture",
        "MixtralForCausalLM",
        "--shared-experts",
        "1",
    ];
    let e = Config::from_args(Args::try_parse_from(argv).unwrap()).unwrap_err();
    assert!(e.to_string().contains("--shared-experts"), "{e}");
}
