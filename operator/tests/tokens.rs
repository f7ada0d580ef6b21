//! The token master key against the in-memory API server (which, like the chart's RBAC,
//! refuses to read any Secret but the master key): created on first start, read by its name
//! afterwards, one key for two replicas starting together, and clear errors.

mod support;

use base64::Engine;
use http::Method;
use moe_operator::tokens::{self, MasterKey, Owner, Purpose};
use serde_json::json;
use support::FakeApi;

const NS: &str = "moe-system";
const NAME: &str = "moe-operator-token-key";
const KEY: &str = "/api/v1/namespaces/moe-system/secrets/moe-operator-token-key";

/// The API server with the chart's Role: the master key readable by name, nothing else.
fn api() -> FakeApi {
    let api = FakeApi::default();
    api.readable_secrets.lock().unwrap().push(KEY.into());
    api
}

fn token_of(key: &MasterKey) -> String {
    key.token(
        Purpose::Control,
        Owner {
            namespace: "ml",
            name: "demo",
            uid: "uid-1",
            rotation: None,
        },
    )
}

#[tokio::test]
async fn the_first_start_creates_the_key_and_later_starts_read_it() {
    let api = api();
    let first = tokens::load_or_create(&api.client(), NS, NAME)
        .await
        .unwrap();
    let stored = api.get(KEY).expect("the master key Secret");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(stored["data"]["key"].as_str().unwrap())
        .unwrap();
    assert_eq!(bytes.len(), tokens::MASTER_KEY_LEN);
    assert!(
        stored["metadata"].get("ownerReferences").is_none(),
        "the key must outlive the release"
    );
    // A restarted operator derives the same tokens.
    let again = tokens::load_or_create(&api.client(), NS, NAME)
        .await
        .unwrap();
    assert_eq!(token_of(&first), token_of(&again));
    assert_eq!(api.count(Method::POST, "/secrets"), 1);
}

#[tokio::test]
async fn two_replicas_starting_together_share_one_key() {
    let api = api();
    let (first, second) = (api.client(), api.client());
    let (a, b) = tokio::join!(
        tokens::load_or_create(&first, NS, NAME),
        tokens::load_or_create(&second, NS, NAME)
    );
    assert_eq!(token_of(&a.unwrap()), token_of(&b.unwrap()));
}

#[tokio::test]
async fn a_master_key_secret_without_a_usable_key_is_a_clear_error() {
    let api = api();
    api.put(
        KEY,
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": NAME, "namespace": NS},
               "data": {"key": "c2hvcnQ="}}),
    );
    let err = tokens::load_or_create(&api.client(), NS, NAME)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("moe-system/moe-operator-token-key")
            && err.contains("5 bytes")
            && err.contains("delete it and restart the operator"),
        "{err}"
    );
}

#[tokio::test]
async fn without_permission_to_read_the_key_the_error_names_the_secret() {
    let api = FakeApi::default();
    let err = tokens::load_or_create(&api.client(), NS, NAME)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("moe-system/moe-operator-token-key") && err.contains("forbidden"),
        "{err}"
    );
}
