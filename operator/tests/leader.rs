//! Lease-based leader election against the in-memory API server.

mod support;

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use moe_operator::leader::LeaderElector;
use serde_json::json;
use support::FakeApi;

const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases/moe-operator-leader";

fn elector(api: &FakeApi, identity: &str) -> LeaderElector {
    LeaderElector {
        api: Api::<Lease>::namespaced(api.client(), "ops"),
        lease_name: "moe-operator-leader".into(),
        identity: identity.into(),
        lease_duration: Duration::from_secs(15),
        renew_interval: Duration::from_secs(5),
        retry_interval: Duration::from_secs(3),
    }
}

fn holder(api: &FakeApi) -> Option<String> {
    api.get(LEASE)?["spec"]["holderIdentity"]
        .as_str()
        .map(str::to_string)
}

#[tokio::test]
async fn first_replica_creates_the_lease_second_waits_then_takes_over_after_release() {
    let api = FakeApi::default();
    let a = elector(&api, "a");
    let b = elector(&api, "b");
    assert!(a.try_acquire_or_renew().await.unwrap());
    assert_eq!(holder(&api).as_deref(), Some("a"));
    assert!(
        !b.try_acquire_or_renew().await.unwrap(),
        "a holds a fresh lease"
    );
    assert!(a.try_acquire_or_renew().await.unwrap(), "the holder renews");
    a.release().await;
    assert_eq!(holder(&api), None);
    assert!(b.try_acquire_or_renew().await.unwrap());
    assert_eq!(holder(&api).as_deref(), Some("b"));
    assert_eq!(api.get(LEASE).unwrap()["spec"]["leaseTransitions"], 1);
}

#[tokio::test]
async fn an_expired_lease_is_taken_over() {
    let api = FakeApi::default();
    api.put(
        LEASE,
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "moe-operator-leader", "namespace": "ops", "resourceVersion": "7"},
            "spec": {"holderIdentity": "gone", "leaseDurationSeconds": 15,
                     "renewTime": "2026-01-01T00:00:00.000000Z", "leaseTransitions": 4}
        }),
    );
    let b = elector(&api, "b");
    assert!(b.try_acquire_or_renew().await.unwrap());
    let lease = api.get(LEASE).unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "b");
    assert_eq!(lease["spec"]["leaseTransitions"], 5);
}
