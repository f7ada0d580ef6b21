//! The reconciler against an in-memory API server (tower-test) and a scripted worker group.

mod support;

use std::sync::Arc;

use http::Method;
use moe_operator::controller::{self, Context, Settings};
use moe_operator::metrics::Metrics;
use moe_operator::resources::{ROLLOUT_ANNOTATION, WorkerDefaults};
use moe_operator::{MoEDeployment, MoEDeploymentSpec};
use serde_json::{Value, json};
use support::{FakeApi, FakeWorkers};

const NS: &str = "ml";
const MOED: &str = "/apis/moe-operator.github.io/v1alpha1/namespaces/ml/moedeployments/demo";
const CM: &str = "/api/v1/namespaces/ml/configmaps/demo-placement";
const STS: &str = "/apis/apps/v1/namespaces/ml/statefulsets/demo";
const PODS: &str = "/api/v1/namespaces/ml/pods";

fn spec_json() -> Value {
    json!({
        "model": {"numLayers": 2, "numExperts": 8, "hidden": 16, "intermediate": 8, "topK": 2},
        "expertParallel": {"ranks": 2},
        "worker": {"backend": "Cpu"},
        "eplb": {"minWindowSteps": 10, "imbalanceThreshold": 1.2, "hysteresis": 0.05}
    })
}

struct Harness {
    api: FakeApi,
    workers: FakeWorkers,
    ctx: Arc<Context>,
}

impl Harness {
    fn new(spec: Value) -> Self {
        Self::with_settings(spec, Settings::default())
    }

    fn with_settings(spec: Value, settings: Settings) -> Self {
        let api = FakeApi::default();
        api.put(MOED, support::moed_json(NS, spec, 1));
        let workers = FakeWorkers::new(2, 2, 0);
        let ctx = Arc::new(Context::new(
            api.client(),
            Arc::new(workers.clone()),
            Metrics::new().unwrap(),
            settings,
            Some("test".into()),
        ));
        Self { api, workers, ctx }
    }

    fn moed(&self) -> MoEDeployment {
        serde_json::from_value(self.api.get(MOED).unwrap()).unwrap()
    }

    /// A reconcile as when the poll timer fires.
    async fn reconcile(&self) -> kube::runtime::controller::Action {
        self.ctx.forget_own_writes();
        self.reconcile_event().await
    }

    /// A reconcile as when a watch event arrives.
    async fn reconcile_event(&self) -> kube::runtime::controller::Action {
        controller::reconcile(Arc::new(self.moed()), self.ctx.clone())
            .await
            .unwrap()
    }

    fn status(&self) -> Value {
        self.api.get(MOED).unwrap()["status"].clone()
    }

    fn condition(&self, type_: &str) -> Value {
        support::condition(&self.status(), type_)
    }

    fn placement(&self) -> moe_api::PlacementDocument {
        let cm = self.api.get(CM).expect("placement ConfigMap");
        serde_json::from_str(cm["data"]["placement.json"].as_str().unwrap()).unwrap()
    }

    /// A new placement generation committed in the ConfigMap (same rows), as a planner's
    /// remap would leave it before the ranks are asked to move.
    fn commit_next_generation(&self) {
        let mut cm = self.api.get(CM).unwrap();
        let mut doc = self.placement();
        doc.generation += 1;
        cm["data"]["placement.json"] = json!(serde_json::to_string(&doc).unwrap());
        self.api.put(CM, cm);
    }

    fn set_spec(&self, spec: Value, generation: i64) {
        let mut obj = self.api.get(MOED).unwrap();
        obj["spec"] = spec;
        obj["metadata"]["generation"] = json!(generation);
        self.api.put(MOED, obj);
    }

    /// Ready pods for every rank made from the StatefulSet's current template (its
    /// annotations: group and spec hashes).
    fn add_ready_pods(&self, ranks: usize) {
        let sts = self.api.get(STS).unwrap();
        self.add_pods(
            ranks,
            sts["spec"]["template"]["metadata"]["annotations"].clone(),
        );
    }

    fn add_pods(&self, ranks: usize, annotations: Value) {
        for rank in 0..ranks {
            self.api.put(
                &format!("{PODS}/demo-{rank}"),
                support::ready_pod(NS, rank, annotations.clone()),
            );
        }
    }
}

#[tokio::test]
async fn first_reconcile_applies_owned_objects_with_owner_references() {
    let h = Harness::new(spec_json());
    h.reconcile().await;
    for path in [
        CM,
        STS,
        "/api/v1/namespaces/ml/services/demo-workers",
        "/api/v1/namespaces/ml/serviceaccounts/demo-worker",
        "/api/v1/namespaces/ml/secrets/demo-control",
    ] {
        let obj = h
            .api
            .get(path)
            .unwrap_or_else(|| panic!("{path} was not created"));
        assert_eq!(
            obj["metadata"]["ownerReferences"][0]["uid"], "moed-uid",
            "{path}"
        );
        assert_eq!(
            obj["metadata"]["ownerReferences"][0]["controller"], true,
            "{path}"
        );
    }
    // Owned objects go through server-side apply with our field manager.
    let applies: Vec<_> = h
        .api
        .requests()
        .into_iter()
        .filter(|r| r.method == Method::PATCH)
        .collect();
    assert!(
        applies
            .iter()
            .all(|r| r.query.contains("fieldManager=moe-operator"))
    );
    // Generation 0: the RoundRobin placement for 8 experts on 2 ranks (no redundancy needed).
    let doc = h.placement();
    assert_eq!(doc.generation, 0);
    assert_eq!((doc.num_layers, doc.num_ranks, doc.num_slots()), (2, 2, 8));
    let secret = h
        .api
        .get("/api/v1/namespaces/ml/secrets/demo-control")
        .unwrap();
    // The control token is the one derived for this deployment; no Secret was read.
    use base64::Engine;
    let stored = base64::engine::general_purpose::STANDARD
        .decode(secret["data"]["token"].as_str().unwrap())
        .unwrap();
    let derived = h.ctx.settings.token_key.token(
        moe_operator::tokens::Purpose::Control,
        moe_operator::tokens::Owner {
            namespace: NS,
            name: "demo",
            uid: "moed-uid",
            rotation: None,
        },
    );
    assert_eq!(String::from_utf8(stored).unwrap(), derived);
    assert_eq!(h.api.count(Method::GET, "/secrets"), 0);
    let sts = h.api.get(STS).unwrap();
    assert_eq!(sts["spec"]["replicas"], 2);
    assert_eq!(sts["spec"]["podManagementPolicy"], "Parallel");
    // Status: waiting for ranks.
    let st = h.status();
    assert_eq!(st["observedGeneration"], 1);
    assert_eq!(st["ready"], "0/2");
    assert_eq!(st["redundantExperts"], 0);
    assert_eq!(st["placement"]["desiredGeneration"], 0);
    assert_eq!(h.condition("Available")["status"], "False");
    assert_eq!(h.condition("Progressing")["reason"], "WaitingForRanks");
    assert_eq!(h.condition("Degraded")["status"], "False");
}

#[tokio::test]
async fn nothing_changed_means_no_status_write() {
    let h = Harness::new(spec_json());
    h.reconcile().await;
    assert_eq!(h.api.count(Method::PATCH, "/moedeployments/demo/status"), 1);
    h.reconcile().await;
    h.reconcile().await;
    assert_eq!(h.api.count(Method::PATCH, "/moedeployments/demo/status"), 1);
    // The committed placement is not rewritten either, and the token is created once.
    assert_eq!(h.api.count(Method::PATCH, "/configmaps/demo-placement"), 1);
    assert_eq!(h.api.count(Method::POST, "/secrets"), 1);
}

#[tokio::test]
async fn the_echo_of_our_own_status_write_does_not_poll_again() {
    let h = Harness::new(spec_json());
    h.reconcile().await;
    h.add_ready_pods(2);
    // Balanced: the pass publishes the imbalance and commits no plan (after a commit the
    // next pass is due at once).
    h.workers.set_load(vec![vec![10.0; 8]; 2], 0, 100);
    h.reconcile().await;
    let writes = h.api.count(Method::PATCH, "/moedeployments/demo/status");
    let requests = h.api.requests().len();
    // The watch delivers the object as written: nothing to do until the poll is due.
    let action = h.reconcile_event().await;
    assert_eq!(
        h.api.requests().len(),
        requests,
        "no API calls for our own echo"
    );
    assert_eq!(
        h.api.count(Method::PATCH, "/moedeployments/demo/status"),
        writes
    );
    assert!(
        format!("{action:?}").contains("requeue_after: Some"),
        "{action:?}"
    );
    // A spec change (new resourceVersion) is acted on at once.
    let mut spec = spec_json();
    spec["eplb"]["paused"] = json!(true);
    h.set_spec(spec, 2);
    let mut obj = h.api.get(MOED).unwrap();
    obj["metadata"]["resourceVersion"] = json!("999");
    h.api.put(MOED, obj);
    h.reconcile_event().await;
    assert!(h.api.requests().len() > requests);
    assert_eq!(h.status()["observedGeneration"], 2);
}

#[tokio::test]
async fn missing_static_map_is_a_degraded_condition_not_an_error() {
    let mut spec = spec_json();
    spec["placement"] = json!({"strategy": "Static", "staticMap": {"name": "offline-map"}});
    let h = Harness::new(spec);
    h.reconcile().await;
    let d = h.condition("Degraded");
    assert_eq!(d["status"], "True");
    assert_eq!(d["reason"], "StaticMapMissing");
    assert!(d["message"].as_str().unwrap().contains("offline-map"));
    assert_eq!(h.status()["phase"], "Degraded");
    assert!(h.api.get(STS).is_none(), "no workers without a placement");
    assert!(
        h.api.count(Method::POST, "/events") >= 1,
        "a warning event is published"
    );

    // The map appears (a layout computed offline, vllm-ascend format): workers get created.
    let map = json!({"moe_layer_count": 2, "layer_list": [
        {"layer_id": 0, "device_count": 2, "device_list": [
            {"device_id": 0, "device_expert": [7, 6, 5, 4]}, {"device_id": 1, "device_expert": [3, 2, 1, 0]}]},
        {"layer_id": 1, "device_count": 2, "device_list": [
            {"device_id": 0, "device_expert": [0, 2, 4, 6]}, {"device_id": 1, "device_expert": [1, 3, 5, 7]}]}
    ]});
    h.api.put(
        "/api/v1/namespaces/ml/configmaps/offline-map",
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "offline-map", "namespace": NS},
               "data": {"expert_map.json": map.to_string()}}),
    );
    h.reconcile().await;
    assert_eq!(h.condition("Degraded")["status"], "False");
    assert!(h.api.get(STS).is_some());
    let doc = h.placement();
    assert_eq!(doc.phy2log[0], vec![7, 6, 5, 4, 3, 2, 1, 0]);
}

#[tokio::test]
async fn static_map_of_the_wrong_shape_is_reported() {
    let mut spec = spec_json();
    spec["placement"] = json!({"strategy": "Static", "staticMap": {"name": "m", "key": "map"}});
    let h = Harness::new(spec);
    h.api.put(
        "/api/v1/namespaces/ml/configmaps/m",
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "m", "namespace": NS},
               "data": {"map": "{\"moe_layer_count\": 1, \"layer_list\": [{\"layer_id\": 0, \"device_count\": 2, \"device_list\": [{\"device_id\": 0, \"device_expert\": [0,1,2,3]}, {\"device_id\": 1, \"device_expert\": [4,5,6,7]}]}]}"}}),
    );
    h.reconcile().await;
    let d = h.condition("Degraded");
    assert_eq!(d["reason"], "StaticMapInvalid");
    assert!(h.api.get(STS).is_none());
}

#[tokio::test]
async fn invalid_spec_is_reported_without_touching_objects() {
    let mut spec = spec_json();
    spec["expertParallel"]["redundantExperts"] = json!(3);
    let h = Harness::new(spec);
    h.reconcile().await;
    let d = h.condition("Degraded");
    assert_eq!(d["reason"], "InvalidSpec");
    assert!(
        d["message"]
            .as_str()
            .unwrap()
            .contains("spec.expertParallel.redundantExperts")
    );
    assert!(h.api.get(CM).is_none() && h.api.get(STS).is_none());
}

#[tokio::test]
async fn shape_change_replaces_the_group_and_the_placement() {
    let h = Harness::new(spec_json());
    h.reconcile().await;
    h.add_ready_pods(2);
    h.workers.set_load(vec![vec![1.0; 8]; 2], 0, 100);
    h.reconcile().await;
    assert_eq!(h.status()["ready"], "2/2");
    assert_eq!(h.condition("Available")["status"], "True");
    assert_eq!(h.status()["groupRestarts"], 0);

    // EPLB tuning: no restart.
    let mut spec = spec_json();
    spec["eplb"]["imbalanceThreshold"] = json!(1.5);
    spec["eplb"]["windowSteps"] = json!(50);
    h.set_spec(spec, 2);
    h.reconcile().await;
    assert_eq!(h.api.count(Method::DELETE, "/pods/"), 0);

    // EP size 2 -> 4: the whole group is replaced, the placement re-initialised.
    let mut spec = spec_json();
    spec["expertParallel"]["ranks"] = json!(4);
    h.set_spec(spec, 3);
    h.reconcile().await;
    assert_eq!(h.api.count(Method::DELETE, "/pods/"), 2);
    let doc = h.placement();
    assert_eq!((doc.generation, doc.num_ranks), (1, 4));
    let st = h.status();
    assert_eq!(st["groupRestarts"], 1);
    assert_eq!(st["ranks"], 4);
    assert_eq!(h.condition("Progressing")["status"], "True");
    let events: Vec<_> = h
        .api
        .requests()
        .into_iter()
        .filter(|r| r.method == Method::POST && r.path.ends_with("/events"))
        .map(|r| r.body["reason"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(events.contains(&"GroupRestarted".to_string()), "{events:?}");
}

#[tokio::test]
async fn unreachable_workers_degrade_but_do_not_fail_the_reconcile() {
    let h = Harness::new(spec_json());
    h.reconcile().await;
    h.add_ready_pods(2);
    h.workers.state.lock().unwrap().unreachable = true;
    // One failed poll (a slow rank) does not flip Degraded; the next poll comes sooner.
    let action = h.reconcile().await;
    assert_eq!(h.condition("Degraded")["status"], "False");
    assert_eq!(h.condition("Rebalancing")["reason"], "WorkersUnreachable");
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(Settings::default().remap_poll)
    );
    // Still unreachable at the next poll: degraded.
    h.reconcile().await;
    assert_eq!(h.condition("Degraded")["reason"], "WorkersUnreachable");
    // Reachable again: not degraded.
    h.workers.state.lock().unwrap().unreachable = false;
    h.workers.set_load(vec![vec![10.0; 8]; 2], 0, 100);
    h.reconcile().await;
    assert_eq!(
        h.condition("Degraded")["status"],
        "False",
        "{}",
        h.condition("Degraded")
    );
}

#[tokio::test]
async fn a_lost_placement_configmap_never_moves_generations_backwards() {
    let h = Harness::new(spec_json());
    h.reconcile().await;
    let mut spec = spec_json();
    spec["placement"] = json!({"strategy": "RoundRobin"});
    spec["model"]["numLayers"] = json!(3);
    h.set_spec(spec, 2);
    h.reconcile().await;
    assert_eq!(h.placement().generation, 1);
    h.api.remove(CM);
    h.reconcile().await;
    assert_eq!(
        h.placement().generation,
        2,
        "re-created after the last known generation"
    );
}

#[tokio::test]
async fn an_unknown_planner_holds_remaps_but_keeps_the_workers() {
    let mut spec = spec_json();
    spec["eplb"]["algorithm"] = json!("magic");
    let h = Harness::new(spec);
    h.reconcile().await;
    h.add_ready_pods(2);
    h.workers.set_load(skewed(), 0, 100);
    h.reconcile().await;
    assert!(h.api.get(STS).is_some());
    assert_eq!(h.condition("Degraded")["reason"], "UnknownAlgorithm");
    assert_eq!(h.condition("Rebalancing")["reason"], "UnknownAlgorithm");
    assert_eq!(h.placement().generation, 0);
}

#[tokio::test]
async fn unschedulable_pods_show_as_degraded() {
    let h = Harness::new(spec_json());
    h.reconcile().await;
    h.add_ready_pods(2);
    let path = format!("{PODS}/demo-1");
    let mut pod = h.api.get(&path).unwrap();
    pod["status"] = json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
        "reason": "Unschedulable", "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]});
    h.api.put(&path, pod);
    h.reconcile().await;
    let d = h.condition("Degraded");
    assert_eq!(d["reason"], "Unschedulable");
    assert!(d["message"].as_str().unwrap().contains("nvidia.com/gpu"));
    assert_eq!(h.status()["ready"], "1/2");
    assert_eq!(h.condition("Available")["status"], "False");
}

/// Workers of a release that reports no token ids show a foreign control token only by
/// refusing a remap (401): that is a token mismatch naming the Secret, and the pass stops
/// asking the other ranks.
#[tokio::test]
async fn a_worker_refusing_the_control_token_is_a_token_mismatch() {
    let h = Harness::new(spec_json());
    h.reconcile().await;
    h.add_ready_pods(2);
    h.commit_next_generation();
    h.workers.state.lock().unwrap().unauthorized = true;
    h.reconcile().await;
    let d = h.condition("Degraded");
    assert_eq!(d["status"], "True");
    assert_eq!(d["reason"], "TokenMismatch");
    let message = d["message"].as_str().unwrap();
    assert!(
        message.contains("rank 0 refused the operator's control token")
            && message.contains("Secret ml/demo-control"),
        "{message}"
    );
    assert_eq!(h.workers.state.lock().unwrap().remaps.len(), 1);
    // The Secret is created again at the next reconcile (the user may have deleted it).
    let before = h.api.count(Method::POST, "/namespaces/ml/secrets");
    h.reconcile().await;
    assert!(h.api.count(Method::POST, "/namespaces/ml/secrets") > before);
}

#[tokio::test]
async fn interrupted_remap_resumes_from_the_committed_generation() {
    let h = Harness::new(spec_json());
    h.reconcile().await;
    h.add_ready_pods(2);
    // An earlier operator committed generation 1 and died before telling the workers.
    let mut cm = h.api.get(CM).unwrap();
    let mut doc = h.placement();
    doc.generation = 1;
    doc.phy2log[1] = vec![1, 0, 3, 2, 5, 4, 7, 6];
    cm["data"]["placement.json"] = json!(serde_json::to_string(&doc).unwrap());
    h.api.put(CM, cm);
    h.workers.state.lock().unwrap().auto_complete = false;
    h.reconcile().await;
    {
        let st = h.workers.state.lock().unwrap();
        assert_eq!(st.remaps.len(), 2, "every rank is asked to move");
        assert!(
            st.remaps
                .iter()
                .all(|(_, _, r)| r.placement.generation == 1)
        );
        let token = &st.remaps[0].1;
        assert!(token.len() > 40, "the control token is presented");
    }
    let st = h.status();
    assert_eq!(st["remap"]["trigger"], "Resumed");
    assert_eq!(h.condition("Rebalancing")["status"], "True");
    assert_eq!(st["phase"], "Rebalancing");
    // Workers finish: the remap is recorded.
    {
        let mut w = h.workers.state.lock().unwrap();
        for s in w.statuses.values_mut() {
            s.placement_generation = 1;
            s.layer_generations = vec![1, 1];
            if let Some(r) = s.remap.as_mut() {
                r.state = moe_api::RemapState::Succeeded;
                r.layers_done = r.layers_total;
                r.finished_at_ms = Some(1_700_000_002_000);
            }
        }
    }
    h.workers.set_load(vec![vec![1.0; 8]; 2], 1, 100);
    h.reconcile().await;
    let st = h.status();
    assert!(st.get("remap").is_none() || st["remap"].is_null());
    assert_eq!(st["lastRemap"]["generation"], 1);
    assert_eq!(st["lastRemap"]["result"], "Succeeded");
    assert_eq!(st["placement"]["appliedGeneration"], 1);
    assert_eq!(h.condition("Rebalancing")["status"], "False");
}

#[tokio::test]
async fn failed_remap_restarts_the_group_into_the_committed_placement() {
    let h = Harness::new(spec_json());
    h.reconcile().await;
    h.add_ready_pods(2);
    h.commit_next_generation();
    h.workers.state.lock().unwrap().fail_remap = true;
    h.reconcile().await; // asks the ranks to move; they fail
    h.reconcile().await; // sees the failure
    let st = h.status();
    assert_eq!(st["lastRemap"]["result"], "Failed");
    assert!(
        st["lastRemap"]["message"]
            .as_str()
            .unwrap()
            .contains("timed out")
    );
    assert_eq!(h.api.count(Method::DELETE, "/pods/"), 2);
    assert_eq!(h.condition("Rebalancing")["reason"], "RemapFailed");
}

/// A rank that answers 409 `Diverged` (it holds another placement under that generation, as
/// when a second operator drove it) is not ignored: the group restarts into the committed
/// placement, with a RemapConflict event.
#[tokio::test]
async fn a_diverged_rank_restarts_the_group_into_the_committed_placement() {
    let h = Harness::new(spec_json());
    h.reconcile().await;
    h.add_ready_pods(2);
    h.commit_next_generation();
    h.workers.state.lock().unwrap().diverged = true;
    h.reconcile().await;
    assert_eq!(h.condition("Rebalancing")["reason"], "RemapConflict");
    assert_eq!(h.api.count(Method::DELETE, "/pods/"), 2, "group restarted");
    assert!(
        events(&h).iter().any(|(r, _)| r == "RemapConflict"),
        "{:?}",
        events(&h)
    );
}

/// An operator upgrade that changes its defaults (here the default worker image) does not
/// restart a running group: status says the pods run an older template and how to apply it;
/// the rollout annotation then restarts the group onto the current template.
#[tokio::test]
async fn an_operator_upgrade_leaves_running_groups_alone_until_a_rollout_is_asked() {
    let h = Harness::new(spec_json());
    h.reconcile().await;
    h.add_ready_pods(2);
    h.reconcile().await;
    assert_eq!(h.api.count(Method::DELETE, "/pods/"), 0);
    assert!(h.status().get("outdatedTemplate").is_none());
    // The same API server, a new operator release with another default image.
    let upgraded = Arc::new(Context::new(
        h.api.client(),
        Arc::new(h.workers.clone()),
        Metrics::new().unwrap(),
        Settings {
            worker_defaults: WorkerDefaults {
                image: Some("ghcr.io/moe-operator/moe-worker:9.9.9".into()),
                ..WorkerDefaults::default()
            },
            ..Settings::default()
        },
        Some("test".into()),
    ));
    let reconcile = || async {
        upgraded.forget_own_writes();
        controller::reconcile(Arc::new(h.moed()), upgraded.clone())
            .await
            .unwrap()
    };
    reconcile().await;
    reconcile().await;
    assert_eq!(
        h.api.count(Method::DELETE, "/pods/"),
        0,
        "an operator default restarted the group"
    );
    let st = h.status();
    let outdated = st["outdatedTemplate"].as_str().expect("outdatedTemplate");
    assert!(outdated.contains(ROLLOUT_ANNOTATION), "{outdated}");
    assert_eq!(
        events(&h)
            .iter()
            .filter(|(r, _)| r == "TemplateOutdated")
            .count(),
        1
    );
    // The StatefulSet already carries the new template (OnDelete: pods keep theirs).
    let sts = h.api.get(STS).unwrap();
    assert_eq!(
        sts["spec"]["template"]["spec"]["containers"][0]["image"],
        "ghcr.io/moe-operator/moe-worker:9.9.9"
    );
    // The user asks for the rollout: the group restarts as a whole.
    let mut obj = h.api.get(MOED).unwrap();
    obj["metadata"]["annotations"] = json!({ROLLOUT_ANNOTATION: "2026-12-05"});
    h.api.put(MOED, obj);
    reconcile().await;
    assert_eq!(h.api.count(Method::DELETE, "/pods/"), 2);
}

/// Skewed load on 2 ranks: layer 0 puts all traffic on rank 0's experts.
fn skewed() -> Vec<Vec<f64>> {
    // RoundRobin with 8 experts on 2 ranks: rank 0 holds 0,2,4,6 and rank 1 holds 1,3,5,7.
    vec![
        vec![40.0, 30.0, 20.0, 10.0, 1.0, 1.0, 1.0, 1.0],
        vec![10.0; 8],
    ]
}

#[tokio::test]
async fn imbalance_is_published_and_a_remap_is_planned_persisted_driven_and_recorded() {
    let h = Harness::new(spec_json());
    h.reconcile().await;
    h.add_ready_pods(2);
    h.workers.set_load(skewed(), 0, 100);
    let action = h.reconcile().await;
    let st = h.status();
    let worst = st["imbalance"]["worstPar"].as_f64().unwrap();
    assert!(worst > 1.5, "{st}");
    assert_eq!(st["imbalance"]["worstLayers"][0]["layer"], 0);
    // Planned and persisted first: ConfigMap at generation 1, status with the prediction, no
    // worker asked yet; the pass that asks them comes at once, not a remap poll later (the
    // echo of this pass's own status write does not hold it back).
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(std::time::Duration::ZERO)
    );
    let doc = h.placement();
    assert_eq!(doc.generation, 1);
    assert_eq!(st["placement"]["desiredGeneration"], 1);
    assert_eq!(st["remap"]["trigger"], "Threshold");
    assert_eq!(st["remap"]["layers"], json!([0]));
    let predicted = st["remap"]["parPredicted"].as_f64().unwrap();
    assert!(predicted < worst, "predicted {predicted} vs {worst}");
    assert!(h.workers.state.lock().unwrap().remaps.is_empty());
    // Next pass (the watch event of the status write) drives every rank (they complete at
    // once here).
    h.reconcile_event().await;
    assert_eq!(h.workers.state.lock().unwrap().remaps.len(), 2);
    // Next pass records the result; the load under the new placement gives the measured PAR.
    h.workers.set_load(vec![vec![10.0; 8]; 2], 1, 100);
    h.reconcile().await;
    let st = h.status();
    assert_eq!(st["lastRemap"]["result"], "Succeeded");
    assert_eq!(st["lastRemap"]["generation"], 1);
    assert!(st["lastRemap"]["parAfter"].as_f64().unwrap() < worst);
    assert_eq!(st["placement"]["appliedGeneration"], 1);
    // Balanced now; within the interval nothing else happens.
    h.reconcile().await;
    assert_eq!(h.placement().generation, 1);
}

/// `maxBytesPerRemap` holds the planner too: the remap moves what the budget holds (here two
/// experts' weights) instead of a plan that moves more and is then skipped as over budget on
/// every pass.
#[tokio::test]
async fn a_byte_budget_remap_moves_what_the_budget_holds() {
    let mut spec = spec_json();
    // One expert as the budget counts it: 3 x hidden 16 x intermediate 8 x 2 bytes.
    spec["eplb"]["maxBytesPerRemap"] = json!(format!("{}", 2 * 3 * 16 * 8 * 2));
    let h = Harness::new(spec);
    h.reconcile().await;
    let before = h.placement();
    h.add_ready_pods(2);
    h.workers.set_load(skewed(), 0, 100);
    h.reconcile().await;
    let st = h.status();
    assert_eq!(st["remap"]["trigger"], "Threshold", "{st}");
    let after = h.placement();
    assert_eq!(after.generation, 1);
    let moved: usize = before
        .phy2log
        .iter()
        .zip(&after.phy2log)
        .map(|(a, b)| a.iter().zip(b).filter(|(x, y)| x != y).count())
        .sum();
    assert!(moved > 0 && moved <= 2, "{moved} slots moved: {after:?}");
    let predicted = st["remap"]["parPredicted"].as_f64().unwrap();
    assert!(
        predicted < st["remap"]["parBefore"].as_f64().unwrap(),
        "{st}"
    );
}

/// A budget paces a rebalance; the hysteresis judges the whole of it. Experts 0, 2, 4 and 6
/// (10 each, on rank 0) against four of 1 (rank 1): PAR 40 / 22. A budget of two experts allows
/// one swap, 1.82 -> 1.41, less than the hysteresis of 0.5; the two swaps the budget does not
/// allow reach 1.0. The swap is deployed: it moves half of the whole plan's slots and gains
/// more than half the hysteresis.
#[tokio::test]
async fn a_byte_budget_paces_a_rebalance_whose_whole_clears_the_hysteresis() {
    let mut spec = spec_json();
    spec["eplb"]["imbalanceThreshold"] = json!(1.5);
    spec["eplb"]["hysteresis"] = json!(0.5);
    spec["eplb"]["maxBytesPerRemap"] = json!(format!("{}", 2 * 3 * 16 * 8 * 2));
    let h = Harness::new(spec);
    h.reconcile().await;
    let before = h.placement();
    assert_eq!(before.phy2log[0], vec![0, 2, 4, 6, 1, 3, 5, 7]);
    h.add_ready_pods(2);
    // Slot counts: slots 0-3 (rank 0) hold experts 0, 2, 4, 6.
    let heavy_on_rank0 = vec![
        vec![10.0, 10.0, 10.0, 10.0, 1.0, 1.0, 1.0, 1.0],
        vec![10.0; 8],
    ];
    h.workers.set_load(heavy_on_rank0, 0, 100);
    h.reconcile().await;
    let st = h.status();
    assert_eq!(st["remap"]["trigger"], "Threshold", "{st}");
    let after = h.placement();
    assert_eq!(after.generation, 1, "{st}");
    let moved = before.phy2log[0]
        .iter()
        .zip(&after.phy2log[0])
        .filter(|(x, y)| x != y)
        .count();
    assert_eq!(moved, 2, "{after:?}");
    let predicted = st["remap"]["parPredicted"].as_f64().unwrap();
    assert!((predicted - 31.0 / 22.0).abs() < 1e-3, "{st}");
}

/// The windows a threshold remap is planned on (`status.remap.historyWindows`), with
/// `historyWindows: 4` and windows of 100 steps, when the ranks are at `step`, keep the closed
/// windows ending at `ends` and report their current window to start at `start`.
async fn windows_planned_on(step: u64, ends: &[u64], start: Option<u64>) -> Value {
    let mut spec = spec_json();
    spec["eplb"]["windowSteps"] = json!(100);
    spec["eplb"]["historyWindows"] = json!(4);
    let h = Harness::new(spec);
    h.reconcile().await;
    h.add_ready_pods(2);
    h.workers.set_load(skewed(), 0, 100);
    h.workers.set_step(step);
    h.workers.set_history(ends, 100);
    for report in h.workers.state.lock().unwrap().loads.values_mut() {
        report.window_start_step = start;
    }
    h.reconcile().await;
    let st = h.status();
    assert_eq!(st["remap"]["trigger"], "Threshold", "{st}");
    st["remap"]["historyWindows"].clone()
}

/// The plan uses the closed windows before the current one: the newest closed window shares
/// steps with the current (sliding) window and is left out, and the remap says how many
/// windows it was planned on.
#[tokio::test]
async fn a_remap_plans_on_the_closed_windows_before_the_current_one() {
    // At step 1000 the current window holds steps 900..1000: the window ending at 1000 is it.
    assert_eq!(
        windows_planned_on(1000, &[700, 800, 900, 1000], None).await,
        4
    );
    // Mid-window (step 1050) the window ending at 1000 still overlaps the current one.
    assert_eq!(windows_planned_on(1050, &[900, 1000], None).await, 2);
    // With the forward API a layer's window holds that layer's newest rounds, which can reach
    // further back than windowSteps: the worker says where it starts.
    assert_eq!(
        windows_planned_on(1000, &[700, 800, 900], Some(850)).await,
        3
    );
}

/// A rank's address that reaches another rank (its report says so) is not summed: that
/// rank would count twice.
#[tokio::test]
async fn a_report_from_another_rank_than_the_address_is_not_counted() {
    let h = Harness::new(spec_json());
    h.reconcile().await;
    h.add_ready_pods(2);
    h.workers.set_load(skewed(), 0, 100);
    {
        let mut st = h.workers.state.lock().unwrap();
        let zero = st.loads[&0].clone();
        st.loads.insert(1, zero);
    }
    h.reconcile().await;
    let rebalancing = h.condition("Rebalancing");
    assert_eq!(rebalancing["reason"], "WorkersUnreachable", "{rebalancing}");
    assert!(
        rebalancing["message"]
            .as_str()
            .unwrap()
            .contains("answered as rank 0, not rank 1"),
        "{rebalancing}"
    );
    assert!(h.status()["remap"].is_null(), "{}", h.status());
}

/// The re-plan interval counts from the end of the last remap: one that ran longer than the
/// interval is not followed at once by another.
#[tokio::test]
async fn the_replan_interval_counts_from_the_end_of_the_last_remap() {
    let h = Harness::new(spec_json());
    h.reconcile().await;
    h.add_ready_pods(2);
    h.workers.set_load(skewed(), 0, 100);
    let now = jiff::Timestamp::now();
    let ago = |s: i64| (now - jiff::SignedDuration::from_secs(s)).to_string();
    let mut obj = h.api.get(MOED).unwrap();
    obj["status"]["lastRemap"] = json!({
        "generation": 0, "trigger": "Threshold", "layers": [0], "parBefore": 1.5,
        "parPredicted": 1.1, "startedAt": ago(1000), "finishedAt": ago(10),
        "result": "Succeeded"
    });
    h.api.put(MOED, obj);
    h.reconcile().await;
    let rebalancing = h.condition("Rebalancing");
    assert_eq!(rebalancing["reason"], "Cooldown", "{rebalancing}");
    assert!(h.status()["remap"].is_null(), "{}", h.status());
}

/// A threshold-triggered plan that moves nothing is not made again on every poll: its answer
/// stands until a window's worth of new steps has been counted. Expert 0 carries almost all of layer 0's load and
/// has no redundant slot, so no placement is better.
#[tokio::test]
async fn a_plan_that_moved_nothing_is_not_made_again_until_a_window_closes() {
    let mut spec = spec_json();
    spec["eplb"]["windowSteps"] = json!(100);
    let h = Harness::new(spec);
    h.reconcile().await;
    h.add_ready_pods(2);
    // Slot 0 holds expert 0 in the initial placement.
    let one_hot = vec![
        vec![100.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        vec![10.0; 8],
    ];
    h.workers.set_load(one_hot, 0, 100);
    h.reconcile().await;
    let rebalancing = h.condition("Rebalancing");
    assert_eq!(rebalancing["reason"], "NoImprovement", "{rebalancing}");
    let asks = |h: &Harness| h.workers.state.lock().unwrap().history_asks;
    let planned_once = asks(&h);
    assert!(planned_once > 0, "the plan asks for the past windows");
    h.workers.set_step(1099);
    h.reconcile().await;
    assert_eq!(
        asks(&h),
        planned_once,
        "planned again within the same window"
    );
    assert_eq!(
        h.condition("Rebalancing")["message"],
        rebalancing["message"]
    );
    h.workers.set_step(1100);
    h.reconcile().await;
    let planned_twice = asks(&h);
    assert!(
        planned_twice > planned_once,
        "a window's worth of steps: planned again"
    );
    assert_eq!(h.condition("Rebalancing")["reason"], "NoImprovement");
    // The group restarted (its step went back): planned again.
    h.workers.set_step(150);
    h.reconcile().await;
    assert!(
        asks(&h) > planned_twice,
        "a restarted group is planned again"
    );
}

/// Owned objects are applied with field management (forced, as manager `moe-operator`): a
/// field someone else added to one (an annotation by `kubectl annotate`, a label by a policy
/// controller) stays; a field of the operator's that someone changed is taken back.
#[tokio::test]
async fn fields_others_add_to_owned_objects_stay_and_the_operators_own_are_taken_back() {
    let h = Harness::new(spec_json());
    h.reconcile().await;
    let mut sts = h.api.get(STS).unwrap();
    let replicas = sts["spec"]["replicas"].clone();
    sts["metadata"]["annotations"]["team.example.com/owner"] = json!("ml-infra");
    sts["spec"]["replicas"] = json!(7);
    h.api.update_as(STS, "kubectl-edit", sts);
    h.reconcile().await;
    let sts = h.api.get(STS).unwrap();
    assert_eq!(
        sts["metadata"]["annotations"]["team.example.com/owner"], "ml-infra",
        "{sts}"
    );
    assert_eq!(sts["spec"]["replicas"], replicas);
    assert_eq!(
        h.api.owned_by(STS, "kubectl-edit"),
        vec![".metadata.annotations.team.example.com/owner"]
    );
    assert!(
        h.api
            .owned_by(STS, "moe-operator")
            .contains(&".spec.replicas".to_string())
    );
}

/// A new placement is committed only over the ConfigMap the plan started from: another
/// writer's commit between the operator's read and its write (a second operator during a split
/// leadership) makes the write a 409 (resourceVersion precondition), and nothing of the other
/// writer's is overwritten; the next pass plans again from what is committed then.
#[tokio::test]
async fn a_placement_written_by_someone_else_while_planning_is_not_overwritten() {
    let h = Harness::new(spec_json());
    h.reconcile().await;
    h.add_ready_pods(2);
    h.workers.set_load(skewed(), 0, 100);
    // The other writer keeps generation 0 (only the resourceVersion tells) and marks the map.
    let mut theirs = h.api.get(CM).unwrap();
    theirs["metadata"]["annotations"]["other.example.com/mark"] = json!("theirs");
    // The pass reads the ConfigMap twice: the committed placement, then right before writing.
    h.api.update_after_get(CM, 2, "other-operator", theirs);
    h.reconcile().await;
    let cm = h.api.get(CM).unwrap();
    assert_eq!(
        cm["metadata"]["annotations"]["other.example.com/mark"], "theirs",
        "{cm}"
    );
    assert_eq!(h.placement().generation, 0);
    let st = h.status();
    assert!(st["remap"].is_null(), "{st}");
    assert_eq!(st["placement"]["desiredGeneration"], 0);
    let rebalancing = h.condition("Rebalancing");
    assert_eq!(rebalancing["reason"], "PlacementChanged", "{rebalancing}");
    assert!(
        rebalancing["message"]
            .as_str()
            .unwrap()
            .contains("written by someone else"),
        "{rebalancing}"
    );
    h.reconcile().await;
    assert_eq!(h.placement().generation, 1);
    assert_eq!(h.status()["remap"]["generation"], 1);
}

/// A reconcile that starts from a cached object older than the operator's own last status
/// write (the watch cache lags; a ConfigMap event made it due at once) reads the object afresh:
/// the remap in flight keeps its trigger and predicted PAR instead of being "resumed" blind.
#[tokio::test]
async fn a_stale_cached_object_does_not_lose_the_remap_in_flight() {
    let h = Harness::new(spec_json());
    h.reconcile().await;
    h.add_ready_pods(2);
    h.workers.set_load(skewed(), 0, 100);
    let before_plan = h.moed();
    h.reconcile().await;
    assert_eq!(h.status()["remap"]["trigger"], "Threshold");
    let predicted = h.status()["remap"]["parPredicted"].clone();
    // The next reconcile is handed the object as it was before that status write.
    h.ctx.forget_own_write(NS, "demo");
    controller::reconcile(Arc::new(before_plan), h.ctx.clone())
        .await
        .unwrap();
    let st = h.status();
    assert_eq!(st["remap"]["trigger"], "Threshold", "{st}");
    assert_eq!(st["remap"]["parPredicted"], predicted);
}

#[tokio::test]
async fn manual_request_is_handled_once() {
    let mut spec = spec_json();
    spec["eplb"]["enabled"] = json!(false);
    spec["remapRequest"] = json!("please");
    let h = Harness::new(spec);
    h.reconcile().await;
    h.add_ready_pods(2);
    h.workers.set_load(skewed(), 0, 100);
    h.reconcile().await;
    let st = h.status();
    assert_eq!(st["lastHandledRemapRequest"], "please");
    assert_eq!(st["remap"]["trigger"], "Manual");
    // Handled once: after the remap completes, the same value does not trigger another.
    h.reconcile().await;
    h.workers.set_load(skewed(), 1, 100);
    h.reconcile().await;
    assert_eq!(h.placement().generation, 1);
    assert!(h.status()["remap"].is_null());
}

#[tokio::test]
async fn a_manual_request_committed_to_the_configmap_is_not_run_again_when_status_lost_it() {
    let mut spec = spec_json();
    spec["eplb"]["enabled"] = json!(false);
    spec["remapRequest"] = json!("please");
    let h = Harness::new(spec);
    h.reconcile().await;
    h.add_ready_pods(2);
    h.workers.set_load(skewed(), 0, 100);
    h.reconcile().await;
    assert_eq!(h.placement().generation, 1);
    // The operator dies after persisting generation 1 but before its status write lands (or a
    // reconcile starts from a cached object older than that write): the stored status knows
    // neither the running remap nor that the request was handled.
    let mut obj = h.api.get(MOED).unwrap();
    let status = obj["status"].as_object_mut().unwrap();
    status.remove("lastHandledRemapRequest");
    status.remove("remap");
    h.api.put(MOED, obj);
    // The remap resumes from the ConfigMap and completes; the still-skewed load must not make
    // the same request run a second time.
    h.reconcile().await;
    h.reconcile().await;
    h.workers.set_load(skewed(), 1, 100);
    h.reconcile().await;
    h.reconcile().await;
    assert_eq!(h.placement().generation, 1, "the manual request ran twice");
    assert_eq!(h.status()["lastHandledRemapRequest"], "please");
}

#[test]
fn spec_json_parses() {
    let _: MoEDeploymentSpec = serde_json::from_value(spec_json()).unwrap();
}

// ---------------------------------------------------------------------------------------------
// EP group restarts after rank failures: budget and backoff.

/// Ready pods of the current group hash, with uids of one incarnation of the group.
fn add_group(h: &Harness, ranks: usize, incarnation: u32) {
    h.add_ready_pods(ranks);
    for rank in 0..ranks {
        let path = format!("{PODS}/demo-{rank}");
        let mut pod = h.api.get(&path).unwrap();
        pod["metadata"]["uid"] = json!(format!("pod-{incarnation}-{rank}"));
        pod["status"]["containerStatuses"] = json!([{"name": "worker", "restartCount": 0,
            "ready": true, "image": "w", "imageID": "w"}]);
        h.api.put(&path, pod);
    }
}

fn set_restarts(h: &Harness, rank: usize, n: u32) {
    let path = format!("{PODS}/demo-{rank}");
    let mut pod = h.api.get(&path).unwrap();
    pod["status"]["containerStatuses"][0]["restartCount"] = json!(n);
    h.api.put(&path, pod);
}

/// Event (reason, note) pairs published so far.
fn events(h: &Harness) -> Vec<(String, String)> {
    h.api
        .requests()
        .into_iter()
        .filter(|r| r.method == Method::POST && r.path.ends_with("/events"))
        .map(|r| {
            (
                r.body["reason"].as_str().unwrap_or("").to_string(),
                r.body["note"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// Moves the recorded restart times `secs` into the past (time passing).
fn age_restarts(h: &Harness, secs: i64) {
    let mut obj = h.api.get(MOED).unwrap();
    let times = obj["status"]["recentGroupRestarts"]
        .as_array()
        .unwrap()
        .clone();
    let aged: Vec<Value> = times
        .iter()
        .map(|t| {
            let ts: jiff::Timestamp = t.as_str().unwrap().parse().unwrap();
            json!((ts - jiff::SignedDuration::from_secs(secs)).to_string())
        })
        .collect();
    obj["status"]["recentGroupRestarts"] = json!(aged);
    h.api.put(MOED, obj);
}

/// Seconds of `requeue_after` (the Action has no getter).
fn requeue_secs(action: &kube::runtime::controller::Action) -> f64 {
    let text = format!("{action:?}");
    let inner = text
        .split("Some(")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .unwrap_or_else(|| panic!("no requeue in {text}"));
    if let Some(ms) = inner.strip_suffix("ms") {
        ms.parse::<f64>().unwrap() / 1000.0
    } else {
        inner.strip_suffix('s').unwrap().parse().unwrap()
    }
}

fn restart_metric(h: &Harness, reason: &str) -> u64 {
    h.ctx
        .metrics
        .group_restarts
        .with_label_values(&[NS, "demo", reason])
        .get()
}

fn with_policy(policy: Value) -> Value {
    let mut spec = spec_json();
    spec["groupRestartPolicy"] = policy;
    spec
}

#[tokio::test]
async fn a_restarted_rank_restarts_the_whole_group() {
    let h = Harness::new(spec_json());
    h.reconcile().await;
    add_group(&h, 2, 1);
    h.workers.set_load(vec![vec![1.0; 8]; 2], 0, 100);
    h.reconcile().await;
    let st = h.status();
    assert_eq!(st["rankPods"].as_array().unwrap().len(), 2, "{st}");
    assert_eq!(h.condition("Available")["status"], "True");

    // Rank 1's worker exited (its communicator broke) and the kubelet restarted it.
    set_restarts(&h, 1, 1);
    h.reconcile().await;
    assert_eq!(h.api.count(Method::DELETE, "/pods/demo-"), 2, "every rank");
    let st = h.status();
    assert_eq!(st["groupRestarts"], 1);
    assert_eq!(st["lastGroupRestart"]["reason"], "RankRestarted");
    assert_eq!(st["lastGroupRestart"]["message"], "rank 1 restarted");
    assert_eq!(st["recentGroupRestarts"].as_array().unwrap().len(), 1);
    assert!(st["rankPods"].is_null(), "the record starts over: {st}");
    assert_eq!(h.condition("Progressing")["reason"], "GroupRestarting");
    assert_eq!(st["phase"], "Restarting");
    let ev = events(&h);
    let restarted = ev
        .iter()
        .find(|(r, _)| r == "GroupRestarted")
        .unwrap_or_else(|| panic!("{ev:?}"));
    assert!(
        restarted.1.starts_with("RankRestarted: rank 1 restarted"),
        "{ev:?}"
    );
    assert_eq!(restart_metric(&h, "RankRestarted"), 1);

    // The StatefulSet brings the group back: a new incarnation is adopted, not a failure.
    add_group(&h, 2, 2);
    h.reconcile().await;
    assert_eq!(h.api.count(Method::DELETE, "/pods/demo-"), 2);
    assert_eq!(h.condition("Available")["status"], "True");
    assert_eq!(h.status()["rankPods"][1]["uid"], "pod-2-1");
}

#[tokio::test]
async fn a_replaced_rank_pod_restarts_the_group_as_rank_lost() {
    let h = Harness::new(spec_json());
    h.reconcile().await;
    add_group(&h, 2, 1);
    h.reconcile().await;
    // Rank 0's pod was evicted and the StatefulSet created a new one; rank 1 still runs.
    let path = format!("{PODS}/demo-0");
    let mut pod = h.api.get(&path).unwrap();
    pod["metadata"]["uid"] = json!("pod-evicted-replacement");
    h.api.put(&path, pod);
    h.reconcile().await;
    assert_eq!(h.api.count(Method::DELETE, "/pods/demo-"), 2);
    assert_eq!(h.status()["lastGroupRestart"]["reason"], "RankLost");
    assert_eq!(restart_metric(&h, "RankLost"), 1);
}

/// Partial scheduling: rank 1 cannot be scheduled, rank 0 keeps failing its rendezvous and
/// restarting. The group is not restarted (the budget is not used up by it); Unschedulable is
/// the reported cause.
#[tokio::test]
async fn ranks_waiting_for_scheduling_do_not_burn_the_restart_budget() {
    let h = Harness::new(spec_json());
    h.reconcile().await;
    add_group(&h, 2, 1);
    let path = format!("{PODS}/demo-1");
    let mut pod = h.api.get(&path).unwrap();
    pod["status"] = json!({
        "phase": "Pending",
        "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                        "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."}]
    });
    h.api.put(&path, pod);
    h.reconcile().await;
    for restarts in 1..=3 {
        set_restarts(&h, 0, restarts);
        h.reconcile().await;
    }
    assert_eq!(h.api.count(Method::DELETE, "/pods/demo-"), 0);
    let st = h.status();
    assert!(
        st["recentGroupRestarts"]
            .as_array()
            .is_none_or(|a| a.is_empty()),
        "{st}"
    );
    let degraded = h.condition("Degraded");
    assert_eq!(degraded["reason"], "Unschedulable");
    assert!(
        degraded["message"]
            .as_str()
            .unwrap()
            .contains("Insufficient nvidia.com/gpu")
    );
}

#[tokio::test]
async fn an_exhausted_restart_budget_is_degraded_and_deletes_nothing() {
    let h = Harness::new(with_policy(
        json!({"maxRestarts": 1, "windowSeconds": 600, "initialBackoffSeconds": 0}),
    ));
    h.reconcile().await;
    add_group(&h, 2, 1);
    h.reconcile().await;
    set_restarts(&h, 0, 1);
    h.reconcile().await;
    assert_eq!(
        h.api.count(Method::DELETE, "/pods/demo-"),
        2,
        "first restart"
    );
    add_group(&h, 2, 2);
    h.reconcile().await;

    // A second failure within the window: over budget.
    set_restarts(&h, 1, 3);
    let action = h.reconcile().await;
    assert_eq!(h.api.count(Method::DELETE, "/pods/demo-"), 2, "no deletes");
    let d = h.condition("Degraded");
    assert_eq!(d["status"], "True");
    assert_eq!(d["reason"], "RestartBudgetExhausted");
    let m = d["message"].as_str().unwrap();
    assert!(m.contains("rank 1 restarted"), "{m}");
    assert!(
        m.contains("maxRestarts: 1") && m.contains("raise maxRestarts"),
        "{m}"
    );
    assert!(m.contains("next restart is allowed at"), "{m}");
    assert_eq!(h.condition("Available")["reason"], "RankFailed");
    assert_eq!(
        h.condition("Progressing")["reason"],
        "RestartBudgetExhausted"
    );
    assert_eq!(h.status()["groupRestarts"], 1);
    // The poll continues at its interval (15 s), well before the window frees up.
    assert!(requeue_secs(&action) <= 15.0, "{action:?}");
    let warnings = |h: &Harness| {
        events(h)
            .iter()
            .filter(|(r, _)| r == "RestartBudgetExhausted")
            .count()
    };
    assert_eq!(warnings(&h), 1);
    // Held on the next passes too, without status writes, and the warning is published once.
    let writes = h.api.count(Method::PATCH, "/moedeployments/demo/status");
    h.reconcile().await;
    assert_eq!(
        h.api.count(Method::PATCH, "/moedeployments/demo/status"),
        writes
    );
    assert_eq!(h.api.count(Method::DELETE, "/pods/demo-"), 2);
    assert_eq!(warnings(&h), 1);

    // The window frees up: the held failure restarts the group.
    age_restarts(&h, 601);
    h.reconcile().await;
    assert_eq!(h.api.count(Method::DELETE, "/pods/demo-"), 4);
    assert_eq!(h.status()["groupRestarts"], 2);
    assert_eq!(
        h.status()["recentGroupRestarts"].as_array().unwrap().len(),
        1
    );
    assert_ne!(h.condition("Degraded")["reason"], "RestartBudgetExhausted");
}

#[tokio::test]
async fn successive_restarts_wait_for_the_backoff() {
    let h = Harness::new(with_policy(
        json!({"maxRestarts": 5, "initialBackoffSeconds": 60, "maxBackoffSeconds": 600}),
    ));
    h.reconcile().await;
    add_group(&h, 2, 1);
    h.reconcile().await;
    set_restarts(&h, 1, 1);
    h.reconcile().await;
    assert_eq!(
        h.api.count(Method::DELETE, "/pods/demo-"),
        2,
        "the first is immediate"
    );
    add_group(&h, 2, 2);
    h.reconcile().await;

    // The next failure, seconds later: wait 60 s.
    set_restarts(&h, 0, 1);
    let action = h.reconcile().await;
    assert_eq!(h.api.count(Method::DELETE, "/pods/demo-"), 2, "backing off");
    let p = h.condition("Progressing");
    assert_eq!(p["reason"], "RestartBackoff");
    assert!(
        p["message"].as_str().unwrap().contains("rank 0 restarted"),
        "{p}"
    );
    assert_eq!(h.condition("Degraded")["status"], "False");
    assert_eq!(h.condition("Available")["reason"], "RankFailed");
    // The poll (15 s) comes first; later passes keep backing off.
    assert!(requeue_secs(&action) <= 15.0, "{action:?}");
    let writes = h.api.count(Method::PATCH, "/moedeployments/demo/status");
    h.reconcile().await;
    assert_eq!(
        h.api.count(Method::PATCH, "/moedeployments/demo/status"),
        writes,
        "a stable message: no status write per pass"
    );
    age_restarts(&h, 50);
    let action = h.reconcile().await;
    assert_eq!(h.api.count(Method::DELETE, "/pods/demo-"), 2);
    let left = requeue_secs(&action);
    assert!(
        left > 5.0 && left <= 10.0,
        "woken when the backoff ends: {action:?}"
    );

    // Backoff over: the group restarts.
    age_restarts(&h, 11);
    h.reconcile().await;
    assert_eq!(h.api.count(Method::DELETE, "/pods/demo-"), 4);
    assert_eq!(h.status()["groupRestarts"], 2);
    // The third restart would wait twice as long (120 s).
    add_group(&h, 2, 3);
    h.reconcile().await;
    set_restarts(&h, 1, 2);
    h.reconcile().await;
    let p = h.condition("Progressing");
    assert!(
        p["message"]
            .as_str()
            .unwrap()
            .contains("backoff 120s after 2 restarts"),
        "{p}"
    );
}

#[tokio::test]
async fn a_failed_remap_restart_counts_against_the_budget_and_is_recorded_once() {
    let h = Harness::new(with_policy(json!({"maxRestarts": 1})));
    h.reconcile().await;
    // One earlier failure restart within the window: the budget is used up.
    let mut obj = h.api.get(MOED).unwrap();
    obj["status"]["recentGroupRestarts"] = json!([jiff::Timestamp::now().to_string()]);
    h.api.put(MOED, obj);
    add_group(&h, 2, 1);
    h.commit_next_generation();
    h.workers.state.lock().unwrap().fail_remap = true;
    h.reconcile().await; // asks the ranks to move; they fail
    h.reconcile().await; // sees the failure: restart held
    h.reconcile().await; // still failed: not recorded again
    assert_eq!(h.api.count(Method::DELETE, "/pods/demo-"), 0);
    assert_eq!(h.status()["lastRemap"]["result"], "Failed");
    assert_eq!(h.condition("Degraded")["reason"], "RestartBudgetExhausted");
    let remap_failed = events(&h)
        .iter()
        .filter(|(r, _)| r == "RemapFailed")
        .count();
    assert_eq!(remap_failed, 1);
}

#[test]
fn configmap_events_map_to_the_deployments_that_use_them() {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::runtime::reflector::ObjectRef;
    let mut spec = spec_json();
    spec["placement"] = json!({"strategy": "Static", "staticMap": {"name": "offline-map"}});
    let user: MoEDeployment = serde_json::from_value(support::moed_json(NS, spec, 1)).unwrap();
    let mut other_ns = serde_json::to_value(&user).unwrap();
    other_ns["metadata"]["namespace"] = json!("elsewhere");
    other_ns["metadata"]["name"] = json!("other");
    let other_ns: MoEDeployment = serde_json::from_value(other_ns).unwrap();
    let plain: MoEDeployment =
        serde_json::from_value(support::moed_json(NS, spec_json(), 1)).unwrap();
    let moeds = vec![Arc::new(user), Arc::new(other_ns), Arc::new(plain)];

    let map: ConfigMap = serde_json::from_value(
        json!({"metadata": {"name": "offline-map", "namespace": NS}, "data": {}}),
    )
    .unwrap();
    assert_eq!(
        controller::deployments_for_configmap(&map, &moeds),
        vec![ObjectRef::<MoEDeployment>::new("demo").within(NS)]
    );
    let unrelated: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "kube-root-ca.crt", "namespace": NS}}))
            .unwrap();
    assert!(controller::deployments_for_configmap(&unrelated, &moeds).is_empty());
    // The owned placement ConfigMap maps to its owner.
    let placement: ConfigMap = serde_json::from_value(json!({"metadata": {
        "name": "x-placement", "namespace": NS,
        "ownerReferences": [{"apiVersion": "moe-operator.github.io/v1alpha1", "kind": "MoEDeployment",
            "name": "x", "uid": "u", "controller": true}]}}))
    .unwrap();
    assert_eq!(
        controller::deployments_for_configmap(&placement, &moeds),
        vec![ObjectRef::<MoEDeployment>::new("x").within(NS)]
    );
    // An owned StatefulSet maps to its controller; someone else's to nothing.
    let sts: k8s_openapi::api::apps::v1::StatefulSet = serde_json::from_value(json!({"metadata": {
        "name": "x", "namespace": NS,
        "ownerReferences": [{"apiVersion": "moe-operator.github.io/v1alpha1", "kind": "MoEDeployment",
            "name": "x", "uid": "u", "controller": true}]}}))
    .unwrap();
    assert_eq!(
        controller::controller_owner(&sts),
        vec![ObjectRef::<MoEDeployment>::new("x").within(NS)]
    );
    let foreign: k8s_openapi::api::apps::v1::StatefulSet =
        serde_json::from_value(json!({"metadata": {
        "name": "y", "namespace": NS,
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
            "name": "y", "uid": "u", "controller": true}]}}))
        .unwrap();
    assert!(controller::controller_owner(&foreign).is_empty());
}

#[tokio::test]
async fn a_configmap_event_is_not_mistaken_for_the_echo_of_our_own_write() {
    let mut spec = spec_json();
    spec["placement"] = json!({"strategy": "Static", "staticMap": {"name": "offline-map"}});
    let h = Harness::new(spec);
    h.reconcile().await;
    assert_eq!(h.condition("Degraded")["reason"], "StaticMapMissing");
    let requests = h.api.requests().len();
    // The object as we wrote it: an echo, nothing is read.
    h.reconcile_event().await;
    assert_eq!(h.api.requests().len(), requests);
    // The map's watch event (the controller's mapper forgets the echo marker): reconciled.
    let map = json!({"moe_layer_count": 2, "layer_list": [
        {"layer_id": 0, "device_count": 2, "device_list": [
            {"device_id": 0, "device_expert": [0, 1, 2, 3]}, {"device_id": 1, "device_expert": [4, 5, 6, 7]}]},
        {"layer_id": 1, "device_count": 2, "device_list": [
            {"device_id": 0, "device_expert": [0, 1, 2, 3]}, {"device_id": 1, "device_expert": [4, 5, 6, 7]}]}
    ]});
    h.api.put(
        "/api/v1/namespaces/ml/configmaps/offline-map",
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "offline-map", "namespace": NS},
               "data": {"expert_map.json": map.to_string()}}),
    );
    h.ctx.forget_own_write(NS, "demo");
    h.reconcile_event().await;
    assert_eq!(h.condition("Degraded")["status"], "False");
    assert!(h.api.get(STS).is_some());
}

// ---------------------------------------------------------------------------------------------
// Disruption budget, refused applies, pods that cannot be created, the fleet-wide restart limit.

const PDB: &str = "/apis/policy/v1/namespaces/ml/poddisruptionbudgets/demo";

#[tokio::test]
async fn the_group_gets_a_disruption_budget_that_can_be_turned_off() {
    let h = Harness::new(spec_json());
    h.reconcile().await;
    let pdb = h.api.get(PDB).expect("PodDisruptionBudget");
    assert_eq!(pdb["metadata"]["ownerReferences"][0]["uid"], "moed-uid");
    assert_eq!(pdb["spec"]["maxUnavailable"], 0);
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"],
        "demo"
    );
    let mut spec = spec_json();
    spec["disruptionBudget"] = json!({"maxUnavailable": 1});
    h.set_spec(spec.clone(), 2);
    h.reconcile().await;
    assert_eq!(h.api.get(PDB).unwrap()["spec"]["maxUnavailable"], 1);
    spec["disruptionBudget"] = json!({"enabled": false});
    h.set_spec(spec, 3);
    h.reconcile().await;
    assert!(h.api.get(PDB).is_none(), "a disabled budget is deleted");
}

#[tokio::test]
async fn a_refused_apply_is_degraded_with_the_object_and_the_servers_reason() {
    let h = Harness::new(spec_json());
    let message = "statefulsets.apps \"demo\" is forbidden: User \"system:serviceaccount:moe-system:moe-operator\" cannot patch resource \"statefulsets\" in API group \"apps\" in the namespace \"ml\"";
    h.api.refuse.lock().unwrap().insert(
        STS.to_string(),
        (403, "Forbidden".to_string(), message.to_string()),
    );
    h.ctx.forget_own_writes();
    let err = controller::reconcile(Arc::new(h.moed()), h.ctx.clone())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("StatefulSet ml/demo"), "{err}");
    let degraded = h.condition("Degraded");
    assert_eq!(
        (degraded["status"].as_str(), degraded["reason"].as_str()),
        (Some("True"), Some("ApplyForbidden"))
    );
    let text = degraded["message"].as_str().unwrap();
    assert!(
        text.starts_with("the API server refused to apply StatefulSet ml/demo: 403 Forbidden: statefulsets.apps \"demo\" is forbidden"),
        "{text}"
    );
    assert_eq!(h.condition("Stalled")["status"], "True", "RBAC needs a fix");
    assert!(
        events(&h)
            .iter()
            .any(|(r, n)| r == "ApplyForbidden" && n.contains("StatefulSet ml/demo")),
        "{:?}",
        events(&h)
    );
    // Fixed: the next reconcile applies and the condition clears.
    h.api.refuse.lock().unwrap().clear();
    h.reconcile().await;
    assert_eq!(h.condition("Degraded")["status"], "False");
    assert!(h.api.get(STS).is_some());
}

#[tokio::test]
async fn pods_the_statefulset_cannot_create_are_reported_with_the_servers_message() {
    let h = Harness::new(spec_json());
    h.reconcile().await;
    let message = "create Pod demo-0 in StatefulSet demo failed error: pods \"demo-0\" is forbidden: exceeded quota: gpu-quota, requested: pods=1, used: pods=0, limited: pods=0";
    h.api.put(
        "/api/v1/namespaces/ml/events/demo.1",
        json!({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": "demo.1", "namespace": NS},
            "involvedObject": {"kind": "StatefulSet", "name": "demo", "namespace": NS},
            "reason": "FailedCreate", "type": "Warning", "message": message, "count": 3,
            "lastTimestamp": jiff::Timestamp::now().to_string()
        }),
    );
    h.reconcile().await;
    let degraded = h.condition("Degraded");
    assert_eq!(degraded["reason"], "QuotaExceeded", "{degraded}");
    let text = degraded["message"].as_str().unwrap();
    assert!(
        text.contains("StatefulSet ml/demo cannot create worker pods")
            && text.contains("exceeded quota: gpu-quota"),
        "{text}"
    );
    assert!(events(&h).iter().any(|(r, _)| r == "QuotaExceeded"));
    // A refusal last seen long ago is over (the StatefulSet controller would have retried and
    // recorded it again): nothing to report.
    let mut ev = h.api.get("/api/v1/namespaces/ml/events/demo.1").unwrap();
    ev["lastTimestamp"] =
        json!((jiff::Timestamp::now() - jiff::SignedDuration::from_secs(3600)).to_string());
    h.api.put("/api/v1/namespaces/ml/events/demo.1", ev.clone());
    h.reconcile().await;
    assert_eq!(h.condition("Degraded")["status"], "False");
    ev["lastTimestamp"] = json!(jiff::Timestamp::now().to_string());
    h.api.put("/api/v1/namespaces/ml/events/demo.1", ev);
    h.reconcile().await;
    assert_eq!(h.condition("Degraded")["reason"], "QuotaExceeded");
    // Once the pods exist, the event says nothing any more.
    h.add_ready_pods(2);
    h.reconcile().await;
    assert_eq!(h.condition("Degraded")["status"], "False");
}

#[tokio::test]
async fn the_fleet_wide_limit_makes_restarts_wait_and_says_so() {
    let settings = Settings {
        max_group_restarts: 1,
        group_restart_window: std::time::Duration::from_secs(60),
        ..Settings::default()
    };
    let h = Harness::with_settings(
        with_policy(json!({"maxRestarts": 10, "initialBackoffSeconds": 0})),
        settings,
    );
    h.reconcile().await;
    add_group(&h, 2, 1);
    h.workers.set_load(vec![vec![1.0; 8]; 2], 0, 100);
    h.reconcile().await;
    set_restarts(&h, 1, 1);
    h.reconcile().await;
    assert_eq!(
        h.api.count(Method::DELETE, "/pods/demo-"),
        2,
        "the first one goes"
    );

    add_group(&h, 2, 2);
    h.reconcile().await;
    set_restarts(&h, 0, 1);
    let action = h.reconcile().await;
    assert_eq!(
        h.api.count(Method::DELETE, "/pods/demo-"),
        2,
        "the second restart within the minute waits"
    );
    let progressing = h.condition("Progressing");
    assert_eq!(progressing["reason"], "FleetRestartLimit", "{progressing}");
    assert!(
        progressing["message"]
            .as_str()
            .unwrap()
            .contains("fleet-wide limit of 1 group restart per 60s"),
        "{progressing}"
    );
    assert_eq!(h.condition("Available")["reason"], "RankFailed");
    assert_eq!(h.status()["groupRestarts"], 1);
    assert!(requeue_secs(&action) <= 60.0);
    assert_eq!(
        events(&h)
            .iter()
            .filter(|(r, _)| r == "FleetRestartLimit")
            .count(),
        1
    );
    // Still waiting: no second event, the failure stays pending.
    h.reconcile().await;
    assert_eq!(
        events(&h)
            .iter()
            .filter(|(r, _)| r == "FleetRestartLimit")
            .count(),
        1
    );

    // A spec change waits too, and its pods are left alone meanwhile.
    let mut spec = with_policy(json!({"maxRestarts": 10, "initialBackoffSeconds": 0}));
    spec["worker"]["image"] = json!("other:2");
    h.set_spec(spec, 2);
    h.reconcile().await;
    assert_eq!(h.api.count(Method::DELETE, "/pods/demo-"), 2);
    assert_eq!(h.condition("Progressing")["reason"], "FleetRestartLimit");
}
