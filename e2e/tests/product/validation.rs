//! Scenario 3: every CEL rule of the CRD rejects an invalid MoEDeployment on the real API
//! server with the documented message (docs/operator.md), and nothing is created.

use anyhow::{Result, ensure};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::common::*;

/// (what, spec patch merged over a valid spec, expected message).
fn cases() -> Vec<(&'static str, Value, &'static str)> {
    vec![
        (
            "threshold <= 1",
            json!({"eplb": {"imbalanceThreshold": 1.0}}),
            "spec.eplb.imbalanceThreshold must be above 1.0 (a PAR of 1.0 is perfect balance): use e.g. 1.2",
        ),
        (
            "threshold - hysteresis < 1",
            json!({"eplb": {"imbalanceThreshold": 1.1, "hysteresis": 0.2}}),
            "spec.eplb.hysteresis must be at least 0 and imbalanceThreshold - hysteresis at least 1.0: lower hysteresis",
        ),
        (
            "ranks = 0",
            json!({"expertParallel": {"ranks": 0, "ranksPerNode": null}}),
            "spec.expertParallel.ranks must be at least 1: set the number of GPUs (ranks) of the group",
        ),
        (
            "ranks not a multiple of ranksPerNode",
            json!({"expertParallel": {"ranks": 4, "ranksPerNode": 3}}),
            "spec.expertParallel.ranks must be a multiple of spec.expertParallel.ranksPerNode: change ranksPerNode to a divisor of ranks",
        ),
        (
            "ranks not a multiple of ranksPerPod",
            json!({"expertParallel": {"ranks": 2, "ranksPerNode": null, "ranksPerPod": 4}}),
            "spec.expertParallel.ranks must be a multiple of spec.expertParallel.ranksPerPod: change ranksPerPod to a divisor of ranks",
        ),
        (
            "a pod spanning nodes",
            json!({"expertParallel": {"ranks": 4, "ranksPerNode": 2, "ranksPerPod": 4}}),
            "spec.expertParallel.ranksPerNode must be a multiple of spec.expertParallel.ranksPerPod: a pod cannot span nodes",
        ),
        (
            "topK > numExperts",
            json!({"model": {"topK": 9}}),
            "spec.model.topK must be at most spec.model.numExperts: lower topK",
        ),
        (
            "expertGroups does not divide numExperts",
            json!({"model": {"expertGroups": 3}}),
            "spec.model.numExperts must be divisible by spec.model.expertGroups: set expertGroups to a divisor of numExperts (1 disables grouping)",
        ),
        (
            "topkGroups > expertGroups",
            json!({"model": {"expertGroups": 2, "topkGroups": 3}}),
            "spec.model.topkGroups must be at most spec.model.expertGroups: lower topkGroups",
        ),
        (
            "Static without staticMap",
            json!({"placement": {"strategy": "Static"}}),
            "spec.placement.staticMap is required when spec.placement.strategy is Static: reference the ConfigMap that holds the expert map",
        ),
        (
            "staticMap without Static",
            json!({"placement": {"strategy": "RoundRobin", "staticMap": {"name": "m", "key": "expert_map.json"}}}),
            "spec.placement.staticMap is only read with strategy Static: set strategy to Static or remove staticMap",
        ),
        (
            "two weight sources",
            json!({"weights": {"synthetic": {"seed": 1}, "persistentVolumeClaim": {"claimName": "w"}}}),
            "set at most one of spec.weights.synthetic or spec.weights.persistentVolumeClaim (neither: synthetic weights with seed 0)",
        ),
        (
            "experts + redundant not divisible by ranks",
            json!({"expertParallel": {"redundantExperts": 1}}),
            "spec.model.numExperts + spec.expertParallel.redundantExperts must be divisible by spec.expertParallel.ranks (every rank holds the same number of expert slots): change redundantExperts, or leave it unset to get the smallest valid value",
        ),
        (
            "unknown planner",
            json!({"eplb": {"algorithm": "magic"}}),
            "spec.eplb.algorithm: Unsupported value: \"magic\": supported values: \"joint\", \"greedy\", \"greedy-global\", \"incremental\"",
        ),
        (
            "maxBytesPerRemap not a quantity",
            json!({"eplb": {"maxBytesPerRemap": "lots"}}),
            "spec.eplb.maxBytesPerRemap must be a positive whole number of bytes",
        ),
        (
            "negative maxBytesPerRemap",
            json!({"eplb": {"maxBytesPerRemap": "-1Gi"}}),
            "spec.eplb.maxBytesPerRemap must be a positive whole number of bytes",
        ),
        (
            "httpPort == commPort",
            json!({"worker": {"httpPort": 9000, "commPort": 9000}}),
            "spec.worker.httpPort and spec.worker.commPort must differ",
        ),
        (
            "serving.port == httpPort",
            json!({"serving": {"port": 8080}}),
            "spec.serving.port must differ from spec.worker.httpPort and spec.worker.commPort",
        ),
        (
            "serving.port == commPort",
            json!({"serving": {"port": 29500}}),
            "spec.serving.port must differ from spec.worker.httpPort and spec.worker.commPort",
        ),
        (
            "serving enabled with the burn-in generator",
            json!({"serving": {"enabled": true}}),
            "spec.serving.enabled: true and spec.traffic exclude each other",
        ),
        (
            "worker.env places a rank",
            json!({"worker": {"env": [{"name": "MOE_RANK", "value": "3"}]}}),
            "spec.worker.env must not set MOE_RANK",
        ),
        (
            "more redundant experts than the ranks can hold",
            json!({"expertParallel": {"redundantExperts": 10}}),
            "spec.expertParallel.redundantExperts is larger than the replicas the ranks can hold (at most numExperts * (ranks - 1), one replica of an expert per rank): lower it",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cel_rules_reject_invalid_manifests() -> Result<()> {
    moe_e2e::init_tracing();
    let Some((cluster, _nodes)) =
        cluster_with_operator("cel_rules_reject_invalid_manifests", 1).await?
    else {
        return Ok(());
    };
    let client = cluster.client();
    let ns = "cel";
    create_namespace(&cluster, ns).await?;
    let api = moed_api(&client, ns);
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };

    // The base manifest is valid (server-side dry run), so each case fails by its own rule.
    let base = small_moed("base", "RoundRobin", json!({}), json!({}));
    let obj: DynamicObject = serde_json::from_value(base.clone())?;
    api.create(&dry, &obj).await?;

    let mut failures = Vec::new();
    for (i, (what, patch, want)) in cases().into_iter().enumerate() {
        let mut m = base.clone();
        m["metadata"]["name"] = json!(format!("invalid-{i}"));
        merge(&mut m["spec"], patch);
        strip_nulls(&mut m);
        let obj: DynamicObject = serde_json::from_value(m)?;
        match api.create(&PostParams::default(), &obj).await {
            Ok(_) => failures.push(format!("{what}: accepted")),
            Err(e) => {
                let text = e.to_string();
                if !(text.contains(want) && (text.contains("422") || text.contains("Invalid"))) {
                    failures.push(format!("{what}: rejected with {text}\n    wanted: {want}"));
                } else {
                    println!("rejected ({what}): {want}");
                }
            }
        }
    }

    // A name too long for the objects the operator derives from it.
    let mut m = base.clone();
    m["metadata"]["name"] = json!("a".repeat(53));
    let obj: DynamicObject = serde_json::from_value(m)?;
    match api.create(&PostParams::default(), &obj).await {
        Ok(_) => failures.push("a 53-character name: accepted".into()),
        Err(e)
            if e.to_string()
                .contains("metadata.name must be at most 52 characters") =>
        {
            println!("rejected (long name)");
        }
        Err(e) => failures.push(format!("a 53-character name: rejected with {e}")),
    }

    // The weights default stores no source, so an apply that later adds a PVC is valid under
    // merge semantics (it used to carry the stored `synthetic: {seed: 0}` as well). In a
    // namespace of its own: the running operator acts on the created resource.
    let weights_ns = "cel-weights";
    create_namespace(&cluster, weights_ns).await?;
    let weights_api = moed_api(&client, weights_ns);
    let mut m = base.clone();
    m["metadata"]["name"] = json!("weights-later");
    if let Some(spec) = m["spec"].as_object_mut() {
        spec.remove("weights");
    }
    let obj: DynamicObject = serde_json::from_value(m)?;
    let created = weights_api.create(&PostParams::default(), &obj).await?;
    ensure!(
        created.data["spec"]["weights"] == json!({}),
        "spec.weights stored as {}",
        created.data["spec"]["weights"]
    );
    let patch = json!({"spec": {"weights": {"persistentVolumeClaim": {"claimName": "w"}}}});
    let patch_dry = PatchParams {
        dry_run: true,
        ..PatchParams::default()
    };
    match weights_api
        .patch("weights-later", &patch_dry, &Patch::Merge(&patch))
        .await
    {
        Ok(_) => println!("accepted (a PVC added to a resource created without weights)"),
        Err(e) => failures.push(format!("adding a PVC after a defaulted create: {e}")),
    }
    weights_api
        .delete("weights-later", &DeleteParams::default())
        .await?;

    // Nothing exists: no MoEDeployment, and the (running) operator created nothing.
    let left = api.list(&ListParams::default()).await?.items;
    ensure!(
        left.is_empty(),
        "MoEDeployments exist: {:?}",
        left.iter()
            .map(|o| o.metadata.name.clone())
            .collect::<Vec<_>>()
    );
    let sts = Api::<StatefulSet>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?;
    let pods = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?;
    let cms = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?;
    let cm_names: Vec<String> = cms
        .items
        .iter()
        .filter_map(|c| c.metadata.name.clone())
        .filter(|n| n != "kube-root-ca.crt")
        .collect();
    ensure!(
        sts.items.is_empty() && pods.items.is_empty() && cm_names.is_empty(),
        "objects created: {} StatefulSets, {} pods, ConfigMaps {cm_names:?}",
        sts.items.len(),
        pods.items.len()
    );
    ensure!(
        failures.is_empty(),
        "{} of {} invalid manifests not rejected as documented:\n  {}",
        failures.len(),
        cases().len(),
        failures.join("\n  ")
    );
    Ok(())
}

fn strip_nulls(v: &mut Value) {
    if let Value::Object(m) = v {
        m.retain(|_, x| !x.is_null());
        for x in m.values_mut() {
            strip_nulls(x);
        }
    }
}
