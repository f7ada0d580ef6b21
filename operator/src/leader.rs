//! Leader election through a `coordination.k8s.io/v1` Lease (kube-runtime 5 has none built in).
//!
//! The protocol of client-go's leaderelection, including the parts that keep two replicas
//! from both acting:
//! - **Expiry by observed time.** A follower never compares the holder's `renewTime` with its
//!   own clock (the clocks may disagree). It remembers when it last saw the Lease *change*
//!   (its `resourceVersion`) on its own monotonic clock, and takes the Lease over only once it
//!   has seen no change for `leaseDurationSeconds`.
//! - **A renew deadline shorter than the lease duration.** The leader renews every
//!   `retry_interval`; each call to the API server is bounded by what is left of
//!   `renew_deadline` since the last successful renewal (a hung request cannot keep an old
//!   leader acting), and when `renew_deadline` passes without a renewal the leader stops. A
//!   follower waits the whole `lease_duration` (> `renew_deadline`) before taking over, so
//!   the old leader has stopped by then.
//! - Writes carry the Lease's `resourceVersion`, so two replicas never both win a race.

use std::sync::Mutex;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tokio::time::Instant;
use tracing::{info, warn};

/// What to do with a Lease as observed now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseAction {
    /// Create it (there is none).
    Create,
    /// Take it over (free, or unchanged for its whole duration).
    Acquire,
    /// We hold it: renew.
    Renew,
    /// Someone else holds it and it changed recently.
    Wait,
}

/// Pure decision of the protocol. `unchanged_for` is how long this replica has seen the Lease
/// without any change (by its own clock, never the holder's timestamps).
pub fn lease_action(
    lease: Option<&Lease>,
    identity: &str,
    unchanged_for: Duration,
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
        .and_then(|d| u64::try_from(d).ok())
        .map_or(default_duration, Duration::from_secs);
    if unchanged_for >= duration {
        LeaseAction::Acquire
    } else {
        LeaseAction::Wait
    }
}

/// Why an attempt did not end with this replica holding the Lease.
#[derive(Debug, thiserror::Error)]
pub enum ElectionError {
    #[error("the API server did not answer within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Api(#[from] kube::Error),
}

/// When this replica last saw the Lease change.
#[derive(Debug, Clone)]
struct Observed {
    resource_version: Option<String>,
    at: Instant,
}

pub struct LeaderElector {
    pub api: Api<Lease>,
    pub lease_name: String,
    pub identity: String,
    /// How long a follower waits after the last change it saw before taking over.
    pub lease_duration: Duration,
    /// How long the leader keeps acting without a successful renewal (< `lease_duration`).
    pub renew_deadline: Duration,
    /// Time between attempts (renewals while leading, tries while following).
    pub retry_interval: Duration,
    observed: Mutex<Option<Observed>>,
}

impl LeaderElector {
    /// client-go's defaults scaled to `lease_duration`: renew deadline 2/3 of it, retries every
    /// 2/15 (15 s, 10 s, 2 s).
    pub fn new(
        api: Api<Lease>,
        lease_name: String,
        identity: String,
        lease_duration: Duration,
    ) -> Self {
        Self::with_timing(
            api,
            lease_name,
            identity,
            lease_duration,
            lease_duration * 2 / 3,
            lease_duration * 2 / 15,
        )
    }

    pub fn with_timing(
        api: Api<Lease>,
        lease_name: String,
        identity: String,
        lease_duration: Duration,
        renew_deadline: Duration,
        retry_interval: Duration,
    ) -> Self {
        Self {
            api,
            lease_name,
            identity,
            lease_duration,
            renew_deadline,
            retry_interval,
            observed: Mutex::new(None),
        }
    }

    /// How long the Lease has been seen unchanged, after noting this observation.
    fn observe(&self, lease: Option<&Lease>) -> Duration {
        let rv = lease.and_then(|l| l.metadata.resource_version.clone());
        let now = Instant::now();
        let mut o = self.observed.lock().unwrap_or_else(|e| e.into_inner());
        match o.as_ref() {
            Some(seen) if seen.resource_version == rv => now.duration_since(seen.at),
            _ => {
                *o = Some(Observed {
                    resource_version: rv,
                    at: now,
                });
                Duration::ZERO
            }
        }
    }

    /// One attempt to acquire or renew, every API call within `budget`; true when we hold the
    /// lease afterwards.
    pub async fn try_acquire_or_renew(&self, budget: Duration) -> Result<bool, ElectionError> {
        match tokio::time::timeout(budget, self.attempt()).await {
            Ok(r) => r,
            Err(_) => Err(ElectionError::Timeout(budget)),
        }
    }

    async fn attempt(&self) -> Result<bool, ElectionError> {
        let lease = self.api.get_opt(&self.lease_name).await?;
        let unchanged_for = self.observe(lease.as_ref());
        let action = lease_action(
            lease.as_ref(),
            &self.identity,
            unchanged_for,
            self.lease_duration,
        );
        // Timestamps are informational (kubectl, other tools); no decision here reads them.
        let now = MicroTime(Timestamp::now());
        let spec = |transitions: i32, acquired: Option<MicroTime>| LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.lease_duration.as_secs() as i32),
            acquire_time: acquired.or(Some(now.clone())),
            renew_time: Some(now.clone()),
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
                self.api.create(&PostParams::default(), &new).await
            }
            (LeaseAction::Acquire, Some(mut l)) => {
                let transitions = l
                    .spec
                    .as_ref()
                    .and_then(|s| s.lease_transitions)
                    .unwrap_or(0)
                    + 1;
                l.spec = Some(spec(transitions, None));
                // `l` carries the resourceVersion read above: a concurrent writer wins, we get 409.
                self.api
                    .replace(&self.lease_name, &PostParams::default(), &l)
                    .await
            }
            (LeaseAction::Renew, Some(mut l)) => {
                let old = l.spec.clone().unwrap_or_default();
                l.spec = Some(spec(old.lease_transitions.unwrap_or(0), old.acquire_time));
                self.api
                    .replace(&self.lease_name, &PostParams::default(), &l)
                    .await
            }
        };
        match result {
            Ok(written) => {
                // Our own write is a change we made, not one to wait out.
                self.observe(Some(&written));
                Ok(true)
            }
            // Lost a race: someone else wrote first.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Blocks until this replica holds the lease.
    pub async fn acquire(&self) {
        loop {
            match self.try_acquire_or_renew(self.renew_deadline).await {
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
        let give_up = async {
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
        };
        if tokio::time::timeout(self.renew_deadline, give_up)
            .await
            .is_err()
        {
            warn!(lease = %self.lease_name, "releasing the lease timed out");
        }
    }

    /// Renews every `retry_interval` and returns (leadership lost: the caller must stop
    /// acting at once) when another replica holds the Lease or when `renew_deadline` passed
    /// since the last successful renewal; a request still hanging then is abandoned.
    pub async fn keep(&self) {
        let mut last_ok = Instant::now();
        loop {
            tokio::time::sleep(self.retry_interval).await;
            let left = self.renew_deadline.saturating_sub(last_ok.elapsed());
            if left.is_zero() {
                warn!(lease = %self.lease_name, "could not renew the lease in time");
                return;
            }
            match self.try_acquire_or_renew(left).await {
                Ok(true) => last_ok = Instant::now(),
                Ok(false) => {
                    warn!(lease = %self.lease_name, "another replica took the lease");
                    return;
                }
                Err(e) => warn!(error = %e, "leader election: renewal failed"),
            }
            if last_ok.elapsed() >= self.renew_deadline {
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
        let d = Duration::from_secs(15);
        let secs = Duration::from_secs;
        assert_eq!(lease_action(None, "a", secs(0), d), LeaseAction::Create);
        assert_eq!(
            lease_action(Some(&lease("a", 990, 15)), "a", secs(0), d),
            LeaseAction::Renew
        );
        assert_eq!(
            lease_action(Some(&lease("b", 990, 15)), "a", secs(10), d),
            LeaseAction::Wait
        );
        assert_eq!(
            lease_action(Some(&lease("b", 980, 15)), "a", secs(15), d),
            LeaseAction::Acquire
        );
        assert_eq!(
            lease_action(Some(&lease("", 999, 15)), "a", secs(0), d),
            LeaseAction::Acquire
        );
    }

    /// The holder's timestamps never decide: a renewTime far in the past (the holder's clock
    /// behind ours) is not expired while the Lease keeps changing, and one far in the future
    /// (its clock ahead) does not hold the Lease once it stopped changing.
    #[test]
    fn skewed_clocks_do_not_matter() {
        let d = Duration::from_secs(15);
        let behind = lease("b", 0, 15);
        assert_eq!(
            lease_action(Some(&behind), "a", Duration::from_secs(1), d),
            LeaseAction::Wait
        );
        let ahead = lease("b", 4_000_000_000, 15);
        assert_eq!(
            lease_action(Some(&ahead), "a", Duration::from_secs(16), d),
            LeaseAction::Acquire
        );
    }
}
