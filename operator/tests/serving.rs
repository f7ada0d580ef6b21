//! The expert tier through the reconciler, against the in-memory API server (tower-test) and a
//! scripted worker group: the Service, client-token Secret and NetworkPolicy a serving
//! MoEDeployment owns, the (derived) token kept across reconciles, a foreign object of a fixed
//! name refused, a foreign token Secret never read or written but reported as a token
//! mismatch, and the served rows in status. The fake API server refuses every Secret read, as
//! the chart's RBAC does.

mod support;

use std::sync::Arc;

use http::Method;
use moe_operator::MoEDeployment;
use moe_operator::controller::{self, Context, Settings};
use moe_operator::metrics::Metrics;
use moe_operator::tokens::{Owner, Purpose};
use serde_json::{Value, json};
use support::{FakeApi, FakeWorkers};

const NS: &str = "ml";
const MOED: &str = "/apis/moe-operator.github.io/v1alpha1/namespaces/ml/moedeployments/demo";
const STS: &str = "/apis/apps/v1/namespaces/ml/statefulsets/demo";
const PODS: &str = "/api/v1/namespaces/ml/pods";
const EXPERTS: &str = "/api/v1/namespaces/ml/services/demo-experts";
const CLIENT_TOKEN: &str = "/api/v1/namespaces/ml/secrets/demo-client-token";
const POLICY: &str = "/apis/networking.k8s.io/v1/namespaces/ml/networkpolicies/demo-workers";

fn serving_spec(enabled: bool) -> Value {
    json!({
        "model": {"numLayers": 2, "numExperts": 8, "hidden": 16, "intermediate": 8, "topK": 2},
        "expertParallel": {"ranks": 2},
        "worker": {"backend": "Cpu"},
        "serving": {"enabled": enabled, "port": 8300, "maxRowsPerRequest": 4096,
                    "clients": {"matchLabels": {"app": "attention"}}},
    })
}

struct Harness {
    api: FakeApi,
    workers: FakeWorkers,
    ctx: Arc<Context>,
    metrics: Metrics,
}

impl Harness {
    fn new(spec: Value) -> Self {
        let api = FakeApi::default();
        api.put(MOED, support::moed_json(NS, spec, 1));
        let workers = FakeWorkers::new(2, 2, 0);
        let metrics = Metrics::new().unwrap();
        let ctx = Arc::new(Context::new(
            api.client(),
            Arc::new(workers.clone()),
            metrics.clone(),
            Settings::default(),
            Some("test".into()),
        ));
        Self {
            api,
            workers,
            ctx,
            metrics,
        }
    }

    async fn reconcile(&self) {
        self.ctx.forget_own_writes();
        let moed: MoEDeployment = serde_json::from_value(self.api.get(MOED).unwrap()).unwrap();
        controller::reconcile(Arc::new(moed), self.ctx.clone())
            .await
            .unwrap();
    }

    fn status(&self) -> Value {
        self.api.get(MOED).unwrap()["status"].clone()
    }

    fn condition(&self, type_: &str) -> Value {
        support::condition(&self.status(), type_)
    }

    fn set_spec(&self, spec: Value) {
        let mut obj = self.api.get(MOED).unwrap();
        obj["spec"] = spec;
        obj["metadata"]["generation"] = json!(2);
        self.api.put(MOED, obj);
    }

    /// The token the operator derives for "demo".
    fn derived(&self, purpose: Purpose) -> String {
        self.ctx.settings.token_key.token(
            purpose,
            Owner {
                namespace: NS,
                name: "demo",
                uid: "moed-uid",
                rotation: None,
            },
        )
    }

    /// What every rank reports about the tokens it holds (ids, as in `GET /v1/status`).
    fn workers_hold(&self, control: &str, client: &str) {
        let mut st = self.workers.state.lock().unwrap();
        for s in st.statuses.values_mut() {
            s.control_token_id = Some(moe_api::token_id(control));
            s.client_token_id = Some(moe_api::token_id(client));
        }
    }

    /// No Secret was read (the chart grants only create on them).
    fn assert_no_secret_read(&self) {
        let reads: Vec<_> = self
            .api
            .requests()
            .into_iter()
            .filter(|s| s.method == Method::GET && s.path.contains("/secrets"))
            .map(|s| s.path)
            .collect();
        assert!(reads.is_empty(), "Secrets read: {reads:?}");
    }

    /// The client token in the Secret (decoded from `data`).
    fn token(&self) -> String {
        use base64::Engine;
        let data = self.api.get(CLIENT_TOKEN).expect("client-token Secret")["data"]["token"]
            .as_str()
            .unwrap()
            .to_string();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data)
            .unwrap();
        String::from_utf8(bytes).unwrap()
    }

    /// Ready pods for every rank from the StatefulSet's current template.
    fn add_ready_pods(&self, ranks: usize) {
        let sts = self.api.get(STS).unwrap();
        let annotations = sts["spec"]["template"]["metadata"]["annotations"].clone();
        for rank in 0..ranks {
            self.api.put(
                &format!("{PODS}/demo-{rank}"),
                support::ready_pod(NS, rank, annotations.clone()),
            );
        }
    }
}

fn owner_uid(obj: &Value) -> &Value {
    &obj["metadata"]["ownerReferences"][0]["uid"]
}

#[tokio::test]
async fn a_serving_deployment_owns_its_service_token_and_policy() {
    let h = Harness::new(serving_spec(true));
    h.reconcile().await;

    let svc = h.api.get(EXPERTS).expect("expert Service");
    assert_eq!(owner_uid(&svc), "moed-uid");
    assert_eq!(svc["spec"]["type"], "ClusterIP");
    assert_eq!(svc["spec"]["ports"][0]["port"], 8300);
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "forward");
    assert_eq!(
        svc["spec"]["selector"]["app.kubernetes.io/instance"],
        "demo"
    );

    let secret = h.api.get(CLIENT_TOKEN).unwrap();
    assert_eq!(owner_uid(&secret), "moed-uid");
    let token = h.token();
    assert_eq!(token, h.derived(Purpose::Client));
    assert_ne!(
        token,
        h.api
            .get("/api/v1/namespaces/ml/secrets/demo-control")
            .unwrap()["data"]["token"],
        "the client token is not the control token"
    );

    let np = h.api.get(POLICY).expect("NetworkPolicy");
    assert_eq!(owner_uid(&np), "moed-uid");
    let ingress = np["spec"]["ingress"].as_array().unwrap();
    let forward = ingress
        .iter()
        .find(|r| r["ports"][0]["port"] == 8300)
        .expect("a rule for the forward port");
    assert_eq!(
        forward["from"][0]["podSelector"]["matchLabels"]["app"],
        "attention"
    );
    let control = ingress
        .iter()
        .find(|r| r["ports"][0]["port"] == 8080)
        .expect("a rule for the control port");
    assert_eq!(
        control["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "moe-operator"
    );

    // The workers serve the API with the token mounted.
    let sts = h.api.get(STS).unwrap();
    let env = sts["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .clone();
    let value = |name: &str| {
        env.iter()
            .find(|e| e["name"] == name)
            .map(|e| e["value"].clone())
    };
    assert_eq!(value("MOE_TRAFFIC"), Some(json!("api")));
    assert_eq!(value("MOE_FORWARD_PORT"), Some(json!("8300")));
    assert_eq!(
        value("MOE_CLIENT_TOKEN_FILE"),
        Some(json!("/etc/moe/client/token"))
    );

    let serving = &h.status()["serving"];
    assert_eq!(serving["endpoint"], "demo-experts.ml.svc:8300");
    assert_eq!(
        serving["rankEndpoints"],
        json!([
            "demo-0.demo-workers.ml.svc:8300",
            "demo-1.demo-workers.ml.svc:8300"
        ])
    );
    assert_eq!(serving["clientTokenSecret"], "demo-client-token");

    // Later reconciles keep the token: created once, never re-applied.
    h.reconcile().await;
    h.reconcile().await;
    assert_eq!(h.token(), token);
    let writes = h
        .api
        .requests()
        .iter()
        .filter(|s| {
            s.path.contains("/secrets") && s.method != Method::GET && {
                s.path.ends_with("demo-client-token")
                    || s.body["metadata"]["name"] == "demo-client-token"
            }
        })
        .count();
    assert_eq!(writes, 1, "the client token was written more than once");
    h.assert_no_secret_read();
}

/// A user's Secret of the client-token name: the operator cannot read it (RBAC) and never
/// writes it (its create is answered 409). The workers mount the user's token; when they
/// report holding another token than the derived one, Degraded/TokenMismatch names the Secret
/// and the fix; once the user removes it, the operator creates its own at the next reconcile.
#[tokio::test]
async fn a_foreign_secret_of_the_token_name_is_not_taken_over_and_shows_as_a_mismatch() {
    let h = Harness::new(serving_spec(true));
    let theirs = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "demo-client-token", "namespace": NS, "uid": "user-secret"},
        "data": {"token": "dXNlcg=="}
    });
    h.api.put(CLIENT_TOKEN, theirs.clone());
    h.reconcile().await;
    assert_eq!(
        h.api.get(CLIENT_TOKEN).unwrap(),
        theirs,
        "the user's Secret changed"
    );
    h.add_ready_pods(2);
    // The workers serve with the user's token ("user"), the operator's control token.
    h.workers_hold(&h.derived(Purpose::Control), "user");
    h.reconcile().await;
    let degraded = h.condition("Degraded");
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "TokenMismatch");
    let message = degraded["message"].as_str().unwrap();
    assert!(
        message.contains("Secret ml/demo-client-token") && message.contains("delete the Secret"),
        "{message}"
    );
    assert_eq!(h.api.get(CLIENT_TOKEN).unwrap(), theirs);
    assert!(h.api.requests().iter().any(|s| s.method == Method::POST
        && s.path.contains("events")
        && s.body.to_string().contains("TokenMismatch")));

    // The user removes their Secret: the operator's own comes at once, with the derived token.
    h.api.remove(CLIENT_TOKEN);
    h.reconcile().await;
    assert_eq!(owner_uid(&h.api.get(CLIENT_TOKEN).unwrap()), "moed-uid");
    assert_eq!(h.token(), h.derived(Purpose::Client));
    // The kubelet refreshes the mounted Secret; the workers report the derived token.
    h.workers_hold(&h.derived(Purpose::Control), &h.derived(Purpose::Client));
    h.reconcile().await;
    assert_eq!(h.condition("Degraded")["status"], "False");
    h.assert_no_secret_read();
}

/// The same for `<name>-control`, e.g. a group made by an operator release that stored random
/// tokens: never rewritten, reported with the fix, and no remap is posted with a token the
/// workers would refuse.
#[tokio::test]
async fn a_control_secret_the_operator_did_not_derive_is_reported_not_rewritten() {
    let h = Harness::new(serving_spec(false));
    let control = "/api/v1/namespaces/ml/secrets/demo-control";
    let old = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "demo-control", "namespace": NS, "uid": "old-secret",
                     "ownerReferences": [{"apiVersion": "moe-operator.github.io/v1alpha1",
                                          "kind": "MoEDeployment", "name": "demo",
                                          "uid": "moed-uid", "controller": true}]},
        "data": {"token": "cmFuZG9t"}
    });
    h.api.put(control, old.clone());
    h.reconcile().await;
    h.add_ready_pods(2);
    // A remap is due (generation 1 committed): it must not be posted with a refused token.
    let cm_path = "/api/v1/namespaces/ml/configmaps/demo-placement";
    let mut cm = h.api.get(cm_path).unwrap();
    let mut doc: moe_api::PlacementDocument =
        serde_json::from_str(cm["data"]["placement.json"].as_str().unwrap()).unwrap();
    doc.generation += 1;
    cm["data"]["placement.json"] = json!(serde_json::to_string(&doc).unwrap());
    h.api.put(cm_path, cm);
    h.workers_hold("random", &h.derived(Purpose::Client));
    h.reconcile().await;
    let degraded = h.condition("Degraded");
    assert_eq!(degraded["reason"], "TokenMismatch");
    assert!(
        degraded["message"]
            .as_str()
            .unwrap()
            .contains("Secret ml/demo-control"),
        "{degraded}"
    );
    assert_eq!(h.condition("Rebalancing")["reason"], "TokenMismatch");
    assert_eq!(h.api.get(control).unwrap(), old, "the Secret was rewritten");
    assert!(h.workers.state.lock().unwrap().remaps.is_empty());
    h.assert_no_secret_read();
}

#[tokio::test]
async fn a_foreign_network_policy_is_refused_too() {
    let h = Harness::new(serving_spec(false));
    let theirs = json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "demo-workers", "namespace": NS, "uid": "np",
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                                          "name": "web", "uid": "web-uid", "controller": true}]},
        "spec": {"podSelector": {}}
    });
    h.api.put(POLICY, theirs.clone());
    h.reconcile().await;
    assert_eq!(h.api.get(POLICY).unwrap(), theirs);
    let degraded = h.condition("Degraded");
    assert_eq!(degraded["reason"], "NameConflict");
    assert!(
        degraded["message"]
            .as_str()
            .unwrap()
            .contains("controlled by Deployment web")
    );
}

#[tokio::test]
async fn served_rows_are_summed_into_status_and_metrics() {
    let h = Harness::new(serving_spec(true));
    h.reconcile().await;
    h.add_ready_pods(2);
    {
        let mut st = h.workers.state.lock().unwrap();
        for (rank, s) in st.statuses.iter_mut() {
            s.traffic = "api".into();
            s.served_rows_per_second = 1000.0 + *rank as f64 * 500.0;
        }
    }
    h.reconcile().await;
    assert_eq!(h.status()["serving"]["servedRowsPerSecond"], json!(2500.0));
    assert!(
        h.metrics
            .render()
            .contains("moe_deployment_served_rows_per_second{name=\"demo\",namespace=\"ml\"} 2500")
    );
}

#[tokio::test]
async fn turning_serving_off_removes_the_service_and_keeps_the_token() {
    let h = Harness::new(serving_spec(true));
    h.reconcile().await;
    let token = h.token();
    h.set_spec(serving_spec(false));
    h.reconcile().await;
    assert!(h.api.get(EXPERTS).is_none(), "the expert Service stayed");
    assert!(h.status().get("serving").is_none());
    let sts = h.api.get(STS).unwrap();
    let env = sts["spec"]["template"]["spec"]["containers"][0]["env"].to_string();
    assert!(env.contains("\"generator\"") && !env.contains("MOE_FORWARD_PORT"));
    // Serving again: the clients' token still works.
    h.set_spec(serving_spec(true));
    h.reconcile().await;
    assert_eq!(h.token(), token);
    assert!(h.api.get(EXPERTS).is_some());
}

/// The names the operator used before serving existed are guarded the same way: a user's
/// `<name>-placement` ConfigMap is reported, not rewritten. (A `<name>-control` Secret cannot
/// be read: see a_control_secret_the_operator_did_not_derive_is_reported_not_rewritten.)
#[tokio::test]
async fn a_users_placement_configmap_is_not_taken_over() {
    for (path, kind, obj) in [(
        "/api/v1/namespaces/ml/configmaps/demo-placement",
        "ConfigMap ml/demo-placement",
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "demo-placement", "namespace": NS, "uid": "theirs"},
               "data": {"placement.json": "mine"}}),
    )] {
        let h = Harness::new(serving_spec(false));
        h.api.put(path, obj.clone());
        h.reconcile().await;
        assert_eq!(h.api.get(path).unwrap(), obj, "{kind} was rewritten");
        assert!(h.api.get(STS).is_none(), "{kind}: workers created");
        let degraded = h.condition("Degraded");
        assert_eq!(degraded["reason"], "NameConflict", "{kind}");
        assert!(
            degraded["message"].as_str().unwrap().contains(kind),
            "{}",
            degraded["message"]
        );
        // Nothing was written at all: no placement committed, no Secret created.
        assert!(
            h.api.requests().iter().all(|s| s.method == Method::GET
                || s.path.contains("moedeployments")
                || s.path.contains("events")),
            "{kind}: a write happened despite the conflict"
        );
    }
}

/// The ownership check reads every fixed name once, not on every poll: a deployment found
/// clean is checked again only after a while or when what it needs changes (serving on).
#[tokio::test]
async fn fixed_names_are_not_read_on_every_poll() {
    let h = Harness::new(serving_spec(false));
    let reads = |h: &Harness, path: &str| {
        h.api
            .requests()
            .iter()
            .filter(|s| s.method == Method::GET && s.path.ends_with(path))
            .count()
    };
    h.reconcile().await;
    h.reconcile().await;
    h.reconcile().await;
    assert_eq!(reads(&h, "/serviceaccounts/demo-worker"), 1);
    assert_eq!(reads(&h, "/services/demo-experts"), 0, "not serving");
    // Serving now needs two more names: checked at once.
    h.set_spec(serving_spec(true));
    h.reconcile().await;
    assert_eq!(reads(&h, "/serviceaccounts/demo-worker"), 2);
    assert_eq!(reads(&h, "/services/demo-experts"), 1);
}
