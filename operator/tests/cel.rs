//! The CRD's CEL rules (x-kubernetes-validations), evaluated client-side with kube's CEL
//! validator on the generated schema, defaults applied first as the API server does.

use kube::core::cel;
use moe_operator::MoEDeployment;
use serde_json::{Value, json};

mod support {
    pub mod cel;
}
use support::cel::{failures, object, schema};

fn valid_spec() -> Value {
    json!({
        "model": {"numLayers": 58, "numExperts": 256, "hidden": 7168, "intermediate": 2048,
                  "topK": 8, "expertGroups": 8, "topkGroups": 4, "scoring": "Sigmoid"},
        "expertParallel": {"ranks": 32, "ranksPerNode": 8, "redundantExperts": 32},
        "eplb": {"imbalanceThreshold": 1.15, "hysteresis": 0.05}
    })
}

fn assert_rejected(spec: Value, field: &str) {
    let f = failures(spec);
    assert!(!f.is_empty(), "expected a rule naming {field} to fail");
    assert!(
        f.iter().any(|m| m.contains(field)),
        "no message names {field}: {f:?}"
    );
}

#[test]
fn every_rule_compiles() {
    let compiled = cel::compile_schema(&schema());
    fn walk(s: &cel::CompiledSchema, errors: &mut Vec<String>) {
        errors.extend(s.compilation_errors().iter().map(|e| e.to_string()));
        for child in s.properties.values() {
            walk(child, errors);
        }
        if let Some(items) = &s.items {
            walk(items, errors);
        }
    }
    let mut errors = Vec::new();
    walk(&compiled, &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
}

#[test]
fn a_deepseek_like_spec_is_valid_and_so_is_a_minimal_one() {
    assert_eq!(failures(valid_spec()), Vec::<String>::new());
    let minimal = json!({
        "model": {"numLayers": 2, "numExperts": 10, "hidden": 16, "intermediate": 8, "topK": 2},
        "expertParallel": {"ranks": 4}
    });
    assert_eq!(failures(minimal), Vec::<String>::new());
}

#[test]
fn slots_must_split_evenly_over_ranks() {
    let mut s = valid_spec();
    s["expertParallel"]["redundantExperts"] = json!(30);
    assert_rejected(s, "spec.expertParallel.redundantExperts");
}

#[test]
fn redundancy_is_bounded_by_what_ranks_can_hold() {
    let s = json!({
        "model": {"numLayers": 1, "numExperts": 2, "hidden": 1, "intermediate": 1, "topK": 1},
        "expertParallel": {"ranks": 2, "redundantExperts": 4}
    });
    assert_rejected(s, "larger than the replicas");
}

#[test]
fn top_k_at_most_experts() {
    let mut s = valid_spec();
    s["model"]["topK"] = json!(300);
    assert_rejected(s, "spec.model.topK");
}

#[test]
fn expert_groups_divide_experts_and_bound_topk_groups() {
    let mut s = valid_spec();
    s["model"]["expertGroups"] = json!(7);
    assert_rejected(s, "spec.model.expertGroups");
    let mut s = valid_spec();
    s["model"]["topkGroups"] = json!(9);
    assert_rejected(s, "spec.model.topkGroups");
}

#[test]
fn threshold_above_one_and_hysteresis_below_it() {
    let mut s = valid_spec();
    s["eplb"]["imbalanceThreshold"] = json!(1.0);
    assert_rejected(s, "spec.eplb.imbalanceThreshold");
    let mut s = valid_spec();
    s["eplb"]["hysteresis"] = json!(0.5);
    assert_rejected(s, "spec.eplb.hysteresis");
}

#[test]
fn ranks_at_least_one_and_multiple_of_ranks_per_node() {
    let mut s = valid_spec();
    s["expertParallel"]["ranks"] = json!(0);
    s["expertParallel"]
        .as_object_mut()
        .unwrap()
        .remove("redundantExperts");
    s["expertParallel"]
        .as_object_mut()
        .unwrap()
        .remove("ranksPerNode");
    assert_rejected(s, "spec.expertParallel.ranks must be at least 1");
    let mut s = valid_spec();
    s["expertParallel"]["ranksPerNode"] = json!(5);
    assert_rejected(s, "spec.expertParallel.ranksPerNode");
}

#[test]
fn ranks_per_pod_divides_ranks_and_ranks_per_node() {
    let mut s = valid_spec();
    s["expertParallel"]["ranksPerPod"] = json!(8);
    assert_eq!(failures(s), Vec::<String>::new());
    let mut s = valid_spec();
    s["expertParallel"]["ranksPerPod"] = json!(3);
    assert_rejected(s, "multiple of spec.expertParallel.ranksPerPod");
    let mut s = valid_spec();
    s["expertParallel"]["ranksPerPod"] = json!(16);
    assert_rejected(s, "a pod cannot span nodes");
}

#[test]
fn static_strategy_needs_a_map_and_only_it_may_have_one() {
    let mut s = valid_spec();
    s["placement"] = json!({"strategy": "Static"});
    assert_rejected(s, "spec.placement.staticMap is required");
    let mut s = valid_spec();
    s["placement"] = json!({"strategy": "Linear", "staticMap": {"name": "m"}});
    assert_rejected(s, "spec.placement.staticMap is only read");
    let mut s = valid_spec();
    s["placement"] = json!({"strategy": "Static", "staticMap": {"name": "m"}});
    assert_eq!(failures(s), Vec::<String>::new());
}

#[test]
fn at_most_one_weight_source() {
    let mut s = valid_spec();
    s["weights"] = json!({"synthetic": {"seed": 1}, "persistentVolumeClaim": {"claimName": "w"}});
    assert_rejected(s, "spec.weights");
    let mut s = valid_spec();
    s["weights"] = json!({"persistentVolumeClaim": {"claimName": "w", "path": "dsv3"}});
    assert_eq!(failures(s), Vec::<String>::new());
    let mut s = valid_spec();
    s["weights"] = json!({});
    assert_eq!(failures(s), Vec::<String>::new());
}

/// The schema's default for `spec.weights` must not hold a source: the API server stores it,
/// and a later apply that adds `persistentVolumeClaim` would then carry two sources.
#[test]
fn the_weights_default_stores_no_source() {
    let schema = schema();
    let default = &schema["properties"]["spec"]["properties"]["weights"]["default"];
    assert!(
        default.is_null() || default == &json!({}),
        "spec.weights defaults to {default}"
    );
}

#[test]
fn max_bytes_per_remap_is_a_positive_whole_byte_quantity() {
    for bad in [
        json!("lots"),
        json!("-1Gi"),
        json!("0"),
        json!(0),
        json!("0.5"),
    ] {
        let mut s = valid_spec();
        s["eplb"]["maxBytesPerRemap"] = bad.clone();
        assert_rejected(s, "spec.eplb.maxBytesPerRemap");
    }
    for good in [json!("8Gi"), json!("512Mi"), json!(1000000), json!("1G")] {
        let mut s = valid_spec();
        s["eplb"]["maxBytesPerRemap"] = good.clone();
        assert_eq!(failures(s), Vec::<String>::new(), "{good}");
    }
}

#[test]
fn algorithm_is_an_enum_of_the_operators_planners() {
    let schema = schema();
    let algo = &schema["properties"]["spec"]["properties"]["eplb"]["properties"]["algorithm"];
    let listed: Vec<&str> = algo["enum"]
        .as_array()
        .expect("eplb.algorithm has an enum")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(listed, moe_operator::planning::ALGORITHMS);
    assert_eq!(algo["default"], json!("joint"));
}

#[test]
fn http_and_comm_ports_differ() {
    let mut s = valid_spec();
    s["worker"] = json!({"httpPort": 9000, "commPort": 9000});
    assert_rejected(
        s,
        "spec.worker.httpPort and spec.worker.commPort must differ",
    );
}

#[test]
fn worker_env_may_not_place_ranks() {
    let mut s = valid_spec();
    s["worker"] = json!({"env": [{"name": "RUST_LOG", "value": "debug"}, {"name": "MOE_RANK", "value": "3"}]});
    assert_rejected(s, "spec.worker.env must not set MOE_RANK");
    let mut s = valid_spec();
    s["worker"] = json!({"env": [{"name": "RUST_LOG", "value": "debug"}]});
    assert_eq!(failures(s), Vec::<String>::new());
}

#[test]
fn names_fit_the_derived_objects() {
    let validate = |name: &str| {
        let mut obj = object(valid_spec());
        obj["metadata"]["name"] = json!(name);
        cel::Validator::new().validate(&schema(), &obj, None)
    };
    assert!(validate(&"a".repeat(moe_operator::crd::MAX_NAME_LENGTH)).is_ok());
    for bad in [
        "a".repeat(moe_operator::crd::MAX_NAME_LENGTH + 1),
        "my.model".to_string(),
        "7b-model".to_string(),
    ] {
        let errors = validate(&bad).expect_err(&bad);
        assert!(
            errors
                .as_slice()
                .iter()
                .any(|e| e.message.contains("metadata.name must be at most")),
            "{bad}"
        );
    }
}

#[test]
fn group_restart_backoff_starts_below_its_cap() {
    let mut spec = valid_spec();
    spec["groupRestartPolicy"] = json!({"initialBackoffSeconds": 600, "maxBackoffSeconds": 60});
    assert_rejected(spec, "spec.groupRestartPolicy.initialBackoffSeconds");
    // Against the default cap (300 s).
    let mut spec = valid_spec();
    spec["groupRestartPolicy"] = json!({"initialBackoffSeconds": 600});
    assert_rejected(spec, "spec.groupRestartPolicy.initialBackoffSeconds");
    let mut spec = valid_spec();
    spec["groupRestartPolicy"] = json!({"maxRestarts": 0, "initialBackoffSeconds": 30});
    assert_eq!(failures(spec), Vec::<String>::new());
}

#[test]
fn the_checked_in_crd_matches_the_types() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/moedeployment.yaml");
    let on_disk = std::fs::read_to_string(path).unwrap_or_default();
    assert_eq!(
        on_disk,
        moe_operator::crd_yaml().unwrap(),
        "crds/moedeployment.yaml is out of date: run `cargo run -p moe-operator --bin crdgen > crds/moedeployment.yaml`"
    );
}

/// Every MoEDeployment under examples/ passes the CRD's CEL rules and the operator's checks.
#[test]
fn examples_are_valid() {
    use serde::Deserialize;
    fn yaml_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() {
                yaml_files(&p, out);
            } else if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    yaml_files(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples"),
        &mut files,
    );
    let mut checked = 0;
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value: Value = match Value::deserialize(doc) {
                Ok(v) => v,
                Err(e) => panic!("{}: {e}", file.display()),
            };
            if value["kind"] != "MoEDeployment" {
                continue;
            }
            let mut obj = value.clone();
            obj["metadata"]["namespace"] = json!("ml");
            if let Err(e) = cel::Validator::new().validate(&schema(), &obj, None) {
                panic!("{}: {e}", file.display());
            }
            let moed: MoEDeployment =
                serde_json::from_value(obj).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            if let Err(e) = moed.spec.validate() {
                panic!("{}: {e}", file.display());
            }
            checked += 1;
        }
    }
    assert!(checked >= 1, "no MoEDeployment found under examples/");
}

#[test]
fn worker_pod_settings_keep_off_the_operators_keys_volumes_and_paths() {
    let with = |worker: Value| {
        let mut s = valid_spec();
        s["worker"] = worker;
        s
    };
    let good = json!({
        "podLabels": {"team": "ml", "volcano.sh/queue-name": "gpu"},
        "podAnnotations": {"scheduling.k8s.io/group-name": "demo"},
        "volumes": [{"name": "cache", "emptyDir": {}}],
        "volumeMounts": [{"name": "cache", "mountPath": "/cache"}],
        "shmSize": "16Gi",
        "schedulerName": "volcano",
        "runtimeClassName": "nvidia",
        "imagePullSecrets": [{"name": "regcred"}],
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "DoNotSchedule"}],
        "terminationGracePeriodSeconds": 120,
        "probes": {"startup": {"failureThreshold": 360}},
        "securityContext": {"capabilities": {"add": ["IPC_LOCK"]}}
    });
    assert_eq!(failures(with(good.clone())), Vec::<String>::new());
    let mut bad = good.clone();
    bad["podLabels"]["app.kubernetes.io/instance"] = json!("other");
    assert_rejected(with(bad), "spec.worker.podLabels must not set");
    let mut bad = good.clone();
    bad["podLabels"]["moe-operator.github.io/deployment"] = json!("other");
    assert_rejected(with(bad), "spec.worker.podLabels must not set");
    let mut bad = good.clone();
    bad["podLabels"]["controller-revision-hash"] = json!("other");
    assert_rejected(with(bad), "spec.worker.podLabels must not set");
    let mut bad = good.clone();
    bad["podAnnotations"]["moe-operator.github.io/spec-hash"] = json!("x");
    assert_rejected(with(bad), "spec.worker.podAnnotations must not set");
    let mut bad = good.clone();
    bad["volumes"] = json!([{"name": "control", "emptyDir": {}}]);
    bad["volumeMounts"] = json!([]);
    assert_rejected(with(bad), "spec.worker.volumes must not be named");
    let mut bad = good.clone();
    bad["volumeMounts"] = json!([{"name": "cache", "mountPath": "/dev/shm"}]);
    assert_rejected(with(bad), "spec.worker.volumeMounts must not mount on");
    let mut bad = good;
    bad["shmSize"] = json!("lots");
    assert_rejected(with(bad), "spec.worker.shmSize must be a positive quantity");
}
