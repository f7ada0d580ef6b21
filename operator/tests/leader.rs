//! Lease-based leader election against the in-memory API server (which answers a replace with
//! a stale resourceVersion with 409, and can hang), on tokio's paused clock.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use moe_operator::leader::LeaderElector;
use serde_json::json;
use support::FakeApi;

const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases/moe-operator-leader";
const BUDGET: Duration = Duration::from_secs(10);

fn elector(api: &FakeApi, identity: &str) -> LeaderElector {
    LeaderElector::new(
        Api::<Lease>::namespaced(api.client(), "ops"),
        "moe-operator-leader".into(),
        identity.into(),
        Duration::from_secs(15),
    )
}

fn holder(api: &FakeApi) -> Option<String> {
    api.get(LEASE)?["spec"]["holderIdentity"]
        .as_str()
        .map(str::to_string)
}

fn held_by(holder: &str, renew_time: &str) -> serde_json::Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "moe-operator-leader", "namespace": "ops", "resourceVersion": "7"},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                 "renewTime": renew_time, "leaseTransitions": 4}
    })
}

#[tokio::test(start_paused = true)]
async fn first_replica_creates_the_lease_second_waits_then_takes_over_after_release() {
    let api = FakeApi::default();
    let a = elector(&api, "a");
    let b = elector(&api, "b");
    assert!(a.try_acquire_or_renew(BUDGET).await.unwrap());
    assert_eq!(holder(&api).as_deref(), Some("a"));
    assert!(
        !b.try_acquire_or_renew(BUDGET).await.unwrap(),
        "a holds a fresh lease"
    );
    assert!(
        a.try_acquire_or_renew(BUDGET).await.unwrap(),
        "the holder renews"
    );
    a.release().await;
    assert_eq!(holder(&api), None);
    assert!(b.try_acquire_or_renew(BUDGET).await.unwrap());
    assert_eq!(holder(&api).as_deref(), Some("b"));
    assert_eq!(api.get(LEASE).unwrap()["spec"]["leaseTransitions"], 1);
}

/// A Lease is taken over once this replica has seen it unchanged for its duration, by its own
/// clock: the holder's renewTime (here years in the future: its clock runs ahead) is ignored.
#[tokio::test(start_paused = true)]
async fn a_lease_unchanged_for_its_duration_is_taken_over_whatever_its_timestamps_say() {
    let api = FakeApi::default();
    api.put(LEASE, held_by("gone", "2099-01-01T00:00:00.000000Z"));
    let b = elector(&api, "b");
    assert!(
        !b.try_acquire_or_renew(BUDGET).await.unwrap(),
        "first sight"
    );
    tokio::time::advance(Duration::from_secs(14)).await;
    assert!(
        !b.try_acquire_or_renew(BUDGET).await.unwrap(),
        "14 s unchanged"
    );
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(
        b.try_acquire_or_renew(BUDGET).await.unwrap(),
        "16 s unchanged"
    );
    let lease = api.get(LEASE).unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "b");
    assert_eq!(lease["spec"]["leaseTransitions"], 5);
}

/// A holder whose clock runs behind (renewTime long past) keeps the Lease while it renews.
#[tokio::test(start_paused = true)]
async fn a_renewing_holder_keeps_the_lease_whatever_its_timestamps_say() {
    let api = FakeApi::default();
    let a = elector(&api, "a");
    let b = elector(&api, "b");
    assert!(a.try_acquire_or_renew(BUDGET).await.unwrap());
    for _ in 0..10 {
        // The holder's clock is far behind: its renewTime says 2001.
        let mut l = api.get(LEASE).unwrap();
        l["spec"]["renewTime"] = json!("2001-01-01T00:00:00.000000Z");
        api.put(LEASE, l);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(a.try_acquire_or_renew(BUDGET).await.unwrap());
        assert!(!b.try_acquire_or_renew(BUDGET).await.unwrap());
    }
    assert_eq!(holder(&api).as_deref(), Some("a"));
}

/// Two followers that both see the same expired Lease: one replace wins, the other gets 409
/// (resourceVersion precondition) and does not lead.
#[tokio::test(start_paused = true)]
async fn two_replicas_racing_for_an_expired_lease_never_both_win() {
    let api = FakeApi::default();
    api.put(LEASE, held_by("gone", "2026-01-01T00:00:00.000000Z"));
    let (b, c) = (elector(&api, "b"), elector(&api, "c"));
    assert!(!b.try_acquire_or_renew(BUDGET).await.unwrap());
    assert!(!c.try_acquire_or_renew(BUDGET).await.unwrap());
    tokio::time::advance(Duration::from_secs(16)).await;
    let (rb, rc) = tokio::join!(
        b.try_acquire_or_renew(BUDGET),
        c.try_acquire_or_renew(BUDGET)
    );
    let won = [rb.unwrap(), rc.unwrap()];
    assert_eq!(won.iter().filter(|w| **w).count(), 1, "{won:?}");
}

/// A leader whose API server hangs stops (keep() returns) when its renew deadline passes,
/// before any follower may take over (lease duration), instead of waiting on the request.
#[tokio::test(start_paused = true)]
async fn a_hung_api_server_ends_leadership_within_the_renew_deadline() {
    let api = FakeApi::default();
    let a = elector(&api, "a");
    assert!(a.try_acquire_or_renew(BUDGET).await.unwrap());
    api.hang.store(true, Ordering::SeqCst);
    let start = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(60), a.keep())
        .await
        .expect("keep() returned");
    let held = start.elapsed();
    assert!(
        held <= a.renew_deadline + a.retry_interval,
        "acted {held:?} without renewing"
    );
    assert!(held < a.lease_duration, "{held:?}");
}
