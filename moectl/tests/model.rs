//! `moectl model inspect` on the checked-in transformers fixtures (fixtures/models/*) and on
//! bad configs.

use std::path::{Path, PathBuf};

use serde_json::Value;

mod common;

use common::{Dir, moectl};

fn fixtures() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("fixtures/models")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("config.json").is_file())
        .collect();
    dirs.sort();
    assert!(
        dirs.len() >= 5,
        "expected the family fixtures, found {dirs:?}"
    );
    dirs
}

fn config(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

/// The first of `keys` that the config has, as an integer.
fn first_int(c: &Value, keys: &[&str]) -> u64 {
    keys.iter()
        .find_map(|k| c[*k].as_u64())
        .unwrap_or_else(|| panic!("none of {keys:?} in config"))
}

#[test]
fn inspect_json_has_the_documented_keys_with_the_configs_values() {
    for dir in fixtures() {
        let out = moectl(&[
            "model",
            "inspect",
            dir.to_str().unwrap(),
            "--output",
            "json",
        ]);
        assert!(
            out.status.success(),
            "{}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("json");
        for key in [
            "architecture",
            "moeLayers",
            "numExperts",
            "topK",
            "hidden",
            "intermediate",
            "expertGroups",
            "topkGroups",
            "scoring",
            "normTopkProb",
            "routedScalingFactor",
            "sharedExperts",
            "weightDtype",
        ] {
            assert!(!v[key].is_null(), "{}: no {key} in {v}", dir.display());
        }
        let c = config(&dir);
        assert_eq!(
            v["architecture"],
            c["architectures"][0],
            "{}",
            dir.display()
        );
        assert_eq!(
            v["numExperts"].as_u64().unwrap(),
            first_int(
                &c,
                &["n_routed_experts", "num_local_experts", "num_experts"]
            ),
        );
        assert_eq!(
            v["topK"].as_u64().unwrap(),
            first_int(&c, &["num_experts_per_tok"])
        );
        assert_eq!(v["hidden"], c["hidden_size"]);
        assert!(matches!(
            v["scoring"].as_str(),
            Some("softmax") | Some("sigmoid")
        ));
        let fp8 = c["quantization_config"]["quant_method"] == "fp8";
        assert_eq!(v["weightDtype"] == "fp8_e4m3", fp8, "{}", dir.display());
        // The spec stanza agrees with the description.
        let spec = &v["specModel"];
        assert_eq!(
            spec["numLayers"].as_u64().unwrap() as usize,
            v["moeLayers"].as_array().unwrap().len()
        );
        assert_eq!(spec["numExperts"], v["numExperts"]);
        assert_eq!(spec["sharedExperts"], v["sharedExperts"]);
    }
}

#[test]
fn inspect_text_prints_a_spec_model_stanza() {
    let dir = fixtures()
        .into_iter()
        .find(|d| d.ends_with("deepseek_v3"))
        .expect("deepseek_v3 fixture");
    let out = moectl(&["model", "inspect", dir.to_str().unwrap()]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("DeepseekV3ForCausalLM"), "{text}");
    assert!(text.contains("score-correction bias"), "{text}");
    let stanza = text
        .split("MoEDeployment serving this checkpoint:")
        .nth(1)
        .unwrap();
    assert!(stanza.contains("scoring: Sigmoid"), "{stanza}");
    assert!(stanza.contains("routedScalingFactor: 2.5"), "{stanza}");
}

#[test]
fn bad_configs_end_with_exit_2_and_one_line() {
    let dir = Dir::new("bad-configs");
    let llama = dir.file(
        "llama.json",
        r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64}"#,
    );
    let partial = dir.file(
        "partial.json",
        r#"{"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 64}"#,
    );
    // A Qwen3-MoE config with 1e11 layers used to abort on a 4 GB allocation.
    let qbig = dir.file(
        "qbig.json",
        r#"{"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "hidden_size": 64, "num_hidden_layers": 100000000000, "num_experts": 8,
        "num_experts_per_tok": 2, "moe_intermediate_size": 32}"#,
    );
    let cases = [
        (
            qbig.as_str(),
            "`num_hidden_layers` is 100000000000, more than 65536",
        ),
        (llama.as_str(), "supported architectures are"),
        (partial.as_str(), "lacks"),
        ("/nonexistent/ckpt", "reading"),
    ];
    for (path, needle) in cases {
        let out = moectl(&["model", "inspect", path, "--output", "json"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{path}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains(needle), "{path}: {err}");
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn plan_takes_the_shape_from_the_checkpoint_and_refuses_another() {
    let dir = fixtures()
        .into_iter()
        .find(|d| d.ends_with("qwen2_moe"))
        .expect("qwen2_moe fixture");
    let desc: Value = serde_json::from_slice(
        &moectl(&[
            "model",
            "inspect",
            dir.to_str().unwrap(),
            "--output",
            "json",
        ])
        .stdout,
    )
    .unwrap();
    let layers = desc["moeLayers"].as_array().unwrap().len();
    let experts = desc["numExperts"].as_u64().unwrap() as usize;
    let tmp = Dir::new("model-plan");
    let load_of = |l: usize, e: usize| {
        let rows: Vec<Vec<u64>> = (0..l)
            .map(|i| (0..e).map(|j| ((i + 1) * (j * j + 1)) as u64).collect())
            .collect();
        tmp.file(
            &format!("load-{l}x{e}.json"),
            &serde_json::to_string(&rows).unwrap(),
        )
    };
    let out_path = tmp.path("sglang.json");
    let (good, bad_experts, bad_layers) = (
        load_of(layers, experts),
        load_of(layers, experts + 4),
        load_of(layers + 1, experts),
    );
    let model = dir.to_str().unwrap();
    // SGLang's placement counts every decoder layer: the checkpoint says which are dense.
    let ok = moectl(&[
        "plan",
        "--load",
        &good,
        "--ranks",
        "2",
        "--redundant",
        "2",
        "--model",
        model,
        "--format",
        "sglang",
        "--output",
        &out_path,
    ]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let written: Value =
        serde_json::from_str(&std::fs::read_to_string(&out_path).unwrap()).unwrap();
    let config = config(&dir);
    assert_eq!(
        written["physical_to_logical_map"].as_array().unwrap().len() as u64,
        config["num_hidden_layers"].as_u64().unwrap()
    );
    for (load, needle) in [
        (&bad_experts, "routed experts"),
        (&bad_layers, "MoE layers"),
    ] {
        let out = moectl(&[
            "plan",
            "--load",
            load,
            "--ranks",
            "2",
            "--redundant",
            "2",
            "--model",
            model,
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(needle), "{err}");
    }
}

/// A config.json that starts with a UTF-8 byte-order mark (as some editors write it) is read.
#[test]
fn a_byte_order_mark_is_accepted() {
    let dir = Dir::new("bom-config");
    let bom = dir.0.join("config.json");
    let mixtral = std::fs::read(format!(
        "{}/../fixtures/models/mixtral/config.json",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    std::fs::write(&bom, [&b"\xef\xbb\xbf"[..], &mixtral].concat()).unwrap();
    let out = moectl(&["model", "inspect", &bom.display().to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
