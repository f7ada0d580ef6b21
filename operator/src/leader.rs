//! Leader election through a `coordination.k8s.io/v1` Lease (kube-runtime 5 has none built in).
//!
//! The same protocol as client-go's leaderelection: a replica acquires the Lease when it is
//! free or expired (`renewTime + leaseDurationSeconds` in the past), renews it every
//! `renew_interval`, and writes with the Lease's `resourceVersion` so that two replicas never
//! both win. A leader that cannot renew within the lease duration steps down (the process
//! exits, and its Deployment restarts it as a follower).

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tracing::{info, warn};

/// What to do with a Lease as observed now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseAction {
    /// Create it (there is none).
    Create,
    /// Take it over (free or expired).
    Acquire,
    /// We hold it: renew.
    Renew,
    /// Someone else holds it and it is fresh.
    Wait,
}

/// Pure decision of the protocol.
pub fn lease_action(
    lease: Option<&Lease>,
    identity: &str,
    now: Timestamp,
    default_duration: Duration,
) -> LeaseAction {
    let Some(lease) = lease else {
        return LeaseAction::Create;
    };
    let spec = lease.spec.as_ref();
    let holder = spec
        .and_then(|s| s.holder_identity.as_deref())
        .unwrap_or("");
    if holder == identity {
        return LeaseAction::Renew;
    }
    if holder.is_empty() {
        return LeaseAction::Acquire;
    }
    let duration = spec
        .and_then(|s| s.lease_duration_seconds)
        .map_or(default_duration.as_secs() as i64, i64::from);
    let renewed = spec
        .and_then(|s| s.renew_time.as_ref().or(s.acquire_time.as_ref()))
        .map(|t| t.0);
    match renewed {
        Some(t) if t + SignedDuration::from_secs(duration) > now => LeaseAction::Wait,
        _ => LeaseAction::Acquire,
    }
}

pub struct LeaderElector {
    pub api: Api<Lease>,
    pub lease_name: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_interval: Duration,
    pub retry_interval: Duration,
}

impl LeaderElector {
    /// One attempt to acquire or renew; true when we hold the lease afterwards.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let lease = self.api.get_opt(&self.lease_name).await?;
        let action = lease_action(lease.as_ref(), &self.identity, now, self.lease_duration);
        let spec = |transitions: i32, acquired: Option<MicroTime>| LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.lease_duration.as_secs() as i32),
            acquire_time: acquired.or(Some(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        };
        let result = match (action, lease) {
            (LeaseAction::Wait, _) => return Ok(false),
            (LeaseAction::Create, _) | (_, None) => {
                let new = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.lease_name.clone()),
                        ..Default::default()
                    },
                    spec: Some(spec(0, None)),
                };
                self.api
                    .create(&PostParams::default(), &new)
                    .await
                    .map(|_| ())
            }
            (LeaseAction::Acquire, Some(mut l)) => {
                let transitions = l
                    .spec
                    .as_ref()
                    .and_then(|s| s.lease_transitions)
                    .unwrap_or(0)
                    + 1;
                l.spec = Some(spec(transitions, None));
                self.api
                    .replace(&self.lease_name, &PostParams::default(), &l)
                    .await
                    .map(|_| ())
            }
            (LeaseAction::Renew, Some(mut l)) => {
                let old = l.spec.clone().unwrap_or_default();
                l.spec = Some(spec(old.lease_transitions.unwrap_or(0), old.acquire_time));
                self.api
                    .replace(&self.lease_name, &PostParams::default(), &l)
                    .await
                    .map(|_| ())
            }
        };
        match result {
            Ok(()) => Ok(true),
            // Lost a race: someone else wrote first.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Blocks until this replica holds the lease.
    pub async fn acquire(&self) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    info!(lease = %self.lease_name, identity = %self.identity, "became leader");
                    return;
                }
                Ok(false) => {}
                Err(e) => warn!(error = %e, "leader election: cannot read or write the lease"),
            }
            tokio::time::sleep(self.retry_interval).await;
        }
    }

    /// Gives the lease up (clean shutdown), so a follower takes over without waiting for it to
    /// expire.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.lease_name).await else {
            return;
        };
        let holds = lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref())
            == Some(self.identity.as_str());
        if !holds {
            return;
        }
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
            spec.renew_time = None;
        }
        match self
            .api
            .replace(&self.lease_name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => info!(lease = %self.lease_name, "released the lease"),
            Err(e) => warn!(error = %e, "could not release the lease"),
        }
    }

    /// Renews until a renewal has failed for a whole lease duration; returns then (leadership
    /// lost).
    pub async fn keep(&self) {
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.renew_interval).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_ok = tokio::time::Instant::now(),
                Ok(false) => {
                    warn!(lease = %self.lease_name, "another replica took the lease");
                    return;
                }
                Err(e) => warn!(error = %e, "leader election: renewal failed"),
            }
            if last_ok.elapsed() >= self.lease_duration {
                warn!(lease = %self.lease_name, "could not renew the lease in time");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, renewed_at: i64, duration: i32) -> Lease {
        Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                lease_duration_seconds: Some(duration),
                renew_time: Some(MicroTime(Timestamp::from_second(renewed_at).unwrap())),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn protocol_decisions() {
        let now = Timestamp::from_second(1_000).unwrap();
        let d = Duration::from_secs(15);
        assert_eq!(lease_action(None, "a", now, d), LeaseAction::Create);
        assert_eq!(
            lease_action(Some(&lease("a", 990, 15)), "a", now, d),
            LeaseAction::Renew
        );
        assert_eq!(
            lease_action(Some(&lease("b", 990, 15)), "a", now, d),
            LeaseAction::Wait
        );
        assert_eq!(
            lease_action(Some(&lease("b", 980, 15)), "a", now, d),
            LeaseAction::Acquire
        );
        assert_eq!(
            lease_action(Some(&lease("", 999, 15)), "a", now, d),
            LeaseAction::Acquire
        );
    }
}
