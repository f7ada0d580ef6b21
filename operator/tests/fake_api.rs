//! The test fake API server's server-side apply (tests/support/ssa.rs) through a kube client:
//! field managers, conflicts, force, and resourceVersion preconditions, as the operator's tests
//! rely on them.

mod support;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;
use support::FakeApi;

const CM: &str = "/api/v1/namespaces/ml/configmaps/settings";

fn configmap(data: serde_json::Value, labels: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "settings", "namespace": "ml", "labels": labels}, "data": data})
}

async fn apply(
    api: &Api<ConfigMap>,
    manager: &str,
    force: bool,
    obj: serde_json::Value,
) -> Result<ConfigMap, kube::Error> {
    let mut pp = PatchParams::apply(manager);
    pp.force = force;
    api.patch("settings", &pp, &Patch::Apply(&obj)).await
}

fn conflict(e: kube::Error) -> String {
    match e {
        kube::Error::Api(s) if s.code == 409 && s.reason == "Conflict" => s.message,
        other => panic!("expected a 409 Conflict, got {other:?}"),
    }
}

#[tokio::test]
async fn apply_conflicts_with_another_managers_field_unless_forced() {
    let fake = FakeApi::default();
    let api: Api<ConfigMap> = Api::namespaced(fake.client(), "ml");
    apply(
        &api,
        "alice",
        false,
        configmap(json!({"a": "1"}), json!({"team": "x"})),
    )
    .await
    .unwrap();
    // Bob applies the same value: shared, no conflict; another value: conflict naming both.
    apply(&api, "bob", false, configmap(json!({"a": "1"}), json!({})))
        .await
        .unwrap();
    let e = apply(
        &api,
        "bob",
        false,
        configmap(json!({}), json!({"team": "y"})),
    )
    .await
    .unwrap_err();
    let message = conflict(e);
    assert!(message.contains(".metadata.labels.team"), "{message}");
    assert!(message.contains("\"alice\""), "{message}");
    assert_eq!(fake.get(CM).unwrap()["metadata"]["labels"]["team"], "x");
    // Forced: bob takes the field over.
    apply(
        &api,
        "bob",
        true,
        configmap(json!({}), json!({"team": "y"})),
    )
    .await
    .unwrap();
    assert_eq!(fake.get(CM).unwrap()["metadata"]["labels"]["team"], "y");
    assert_eq!(fake.owned_by(CM, "bob"), vec![".metadata.labels.team"]);
    assert_eq!(fake.owned_by(CM, "alice"), vec![".data.a"]);
}

#[tokio::test]
async fn a_field_left_out_of_the_next_apply_goes_unless_someone_else_owns_it() {
    let fake = FakeApi::default();
    let api: Api<ConfigMap> = Api::namespaced(fake.client(), "ml");
    apply(
        &api,
        "op",
        true,
        configmap(json!({"a": "1", "b": "2"}), json!({"x": "1"})),
    )
    .await
    .unwrap();
    // A user's update of its own label and of one of op's keys.
    let mut cm = fake.get(CM).unwrap();
    cm["metadata"]["labels"]["mine"] = json!("yes");
    cm["data"]["b"] = json!("user");
    fake.update_as(CM, "kubectl-edit", cm);
    apply(&api, "op", true, configmap(json!({"a": "1"}), json!({})))
        .await
        .unwrap();
    let cm = fake.get(CM).unwrap();
    assert_eq!(cm["metadata"]["labels"]["mine"], "yes", "{cm}");
    assert!(cm["metadata"]["labels"].get("x").is_none(), "{cm}");
    // "b" became the user's by the update: op leaving it out does not remove it.
    assert_eq!(cm["data"]["b"], "user", "{cm}");
    assert_eq!(cm["data"]["a"], "1");
}

#[tokio::test]
async fn writes_with_a_stale_resource_version_are_conflicts() {
    let fake = FakeApi::default();
    let api: Api<ConfigMap> = Api::namespaced(fake.client(), "ml");
    let first = apply(&api, "op", true, configmap(json!({"a": "1"}), json!({})))
        .await
        .unwrap();
    let stale = first.metadata.resource_version.clone().unwrap();
    apply(&api, "op", true, configmap(json!({"a": "2"}), json!({})))
        .await
        .unwrap();
    let mut guarded = configmap(json!({"a": "3"}), json!({}));
    guarded["metadata"]["resourceVersion"] = json!(stale);
    let e = apply(&api, "op", true, guarded).await.unwrap_err();
    assert!(conflict(e).contains("has been modified"));
    let mut replaced = first.clone();
    replaced.data = Some([("a".to_string(), "4".to_string())].into());
    let e = api
        .replace("settings", &PostParams::default(), &replaced)
        .await
        .unwrap_err();
    assert!(conflict(e).contains("has been modified"));
    assert_eq!(fake.get(CM).unwrap()["data"]["a"], "2");
}
