//! Operator-wide settings and the reconciler's shared state: error backoff counts and the
//! bookkeeping that tells our own status writes from other changes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::runtime::events::Reporter;
use kube::{Client, ResourceExt};

use crate::crd::MoEDeployment;
use crate::events::EventRecorder;
use crate::metrics::Metrics;
use crate::resources;
use crate::workers::WorkerApi;

/// Operator-wide settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Requeue while a remap runs (progress tracking).
    pub remap_poll: Duration,
    /// Requeue when the deployment cannot be acted on (invalid spec, missing static map).
    pub blocked_requeue: Duration,
    /// Base and cap of the error backoff.
    pub error_backoff: (Duration, Duration),
    /// Defaults for worker fields the spec leaves unset.
    pub worker_defaults: resources::WorkerDefaults,
    /// Who the per-deployment NetworkPolicy admits to the workers' control port.
    pub control_peers: resources::ControlPlanePeers,
    /// Fleet-wide limit on whole-group restarts: at most this many per
    /// `group_restart_window` across every MoEDeployment (0: no limit).
    pub max_group_restarts: u32,
    pub group_restart_window: Duration,
    /// The key every per-deployment token is derived from (see [`crate::tokens`]). The
    /// default is a random key of this process (tests); the operator loads the cluster's.
    pub token_key: std::sync::Arc<crate::tokens::MasterKey>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            remap_poll: Duration::from_secs(2),
            blocked_requeue: Duration::from_secs(10),
            error_backoff: (Duration::from_secs(2), Duration::from_secs(300)),
            worker_defaults: resources::WorkerDefaults::default(),
            control_peers: resources::ControlPlanePeers {
                enabled: true,
                namespace: None,
                pod_labels: std::collections::BTreeMap::from([(
                    "app.kubernetes.io/name".to_string(),
                    "moe-operator".to_string(),
                )]),
                extra: Vec::new(),
            },
            max_group_restarts: 0,
            group_restart_window: Duration::from_secs(60),
            token_key: std::sync::Arc::new(crate::tokens::MasterKey::random()),
        }
    }
}

/// Shared state of the reconciler.
pub struct Context {
    /// For calls (reads, applies, status writes): see `api_client`.
    pub client: Client,
    /// For the controller's watches (no read timeout); the same client unless set apart.
    pub watch_client: Client,
    pub recorder: EventRecorder,
    pub workers: Arc<dyn WorkerApi>,
    pub metrics: Metrics,
    pub settings: Settings,
    /// Fleet-wide limit on whole-group restarts (from `settings`).
    pub restart_limiter: crate::fleet::RestartLimiter,
    /// Consecutive failures per object, for the error backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// Per object: the resourceVersion our last status write produced and when the next poll
    /// is due. A watch event carrying exactly that version is our own write echoing back; it
    /// must not cause another poll of the workers (which would write again: a feedback loop).
    own_writes: Mutex<HashMap<String, (String, Instant)>>,
    /// Per object: the resourceVersion of our last status write, kept when an event makes the
    /// next reconcile due at once. A reconcile that starts from a cached object of another
    /// version may predate that write (the watch cache lags): it reads the object afresh, so it
    /// never acts on a status older than its own last write (a remap in flight would otherwise
    /// be forgotten and "resumed").
    last_status_write: Mutex<HashMap<String, String>>,
    /// Deployments whose fixed object names were recently found free or ours.
    pub(super) ownership_checked: crate::ownership::Checked,
    /// Token Secrets recently created (or found existing): not posted again on every poll.
    pub(crate) token_secrets: crate::tokens::CreatedSecrets,
    /// Per object: the last threshold-triggered plan that moved nothing, answered again until
    /// its statistics change ([`crate::remap::PlanHold`]).
    plan_holds: Mutex<HashMap<String, crate::remap::PlanHold>>,
}

impl Context {
    pub fn new(
        client: Client,
        workers: Arc<dyn WorkerApi>,
        metrics: Metrics,
        settings: Settings,
        instance: Option<String>,
    ) -> Self {
        let recorder = EventRecorder::new(
            client.clone(),
            Reporter {
                controller: "moe-operator".into(),
                instance,
            },
        );
        let restart_limiter = crate::fleet::RestartLimiter::new(
            settings.max_group_restarts,
            settings.group_restart_window,
        );
        Self {
            watch_client: client.clone(),
            client,
            recorder,
            workers,
            metrics,
            settings,
            restart_limiter,
            failures: Mutex::new(HashMap::new()),
            own_writes: Mutex::new(HashMap::new()),
            last_status_write: Mutex::new(HashMap::new()),
            ownership_checked: Default::default(),
            token_secrets: Default::default(),
            plan_holds: Mutex::new(HashMap::new()),
        }
    }

    /// Watches through `client` instead of the calls' client (the operator's binary gives its
    /// watches a client without a read timeout; see `api_client`).
    pub fn with_watch_client(mut self, client: Client) -> Self {
        self.watch_client = client;
        self
    }

    fn key(moed: &MoEDeployment) -> String {
        format!(
            "{}/{}",
            moed.namespace().unwrap_or_default(),
            moed.name_any()
        )
    }

    pub(super) fn record_failure(&self, moed: &MoEDeployment) -> u32 {
        let Ok(mut map) = self.failures.lock() else {
            return 1;
        };
        let n = map.entry(Self::key(moed)).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }

    /// When the event is the echo of our own status write: the time left until the next poll.
    pub(super) fn echo_of_own_write(&self, moed: &MoEDeployment) -> Option<Duration> {
        let rv = moed.metadata.resource_version.as_deref()?;
        let map = self.own_writes.lock().ok()?;
        let (own, due) = map.get(&Self::key(moed))?;
        let now = Instant::now();
        (own == rv && now < *due).then(|| due.saturating_duration_since(now))
    }

    /// Treats every next event as due (tests: a timer that fired).
    pub fn forget_own_writes(&self) {
        if let Ok(mut map) = self.own_writes.lock() {
            map.clear();
        }
    }

    /// Something the deployment depends on changed (a ConfigMap): its next reconcile is not the
    /// echo of our own status write even if its resourceVersion is.
    pub fn forget_own_write(&self, namespace: &str, name: &str) {
        if let Ok(mut map) = self.own_writes.lock() {
            map.remove(&format!("{namespace}/{name}"));
        }
    }

    pub(super) fn remember_own_write(
        &self,
        moed: &MoEDeployment,
        rv: Option<String>,
        due: Instant,
    ) {
        if let (Ok(mut last), Some(rv)) = (self.last_status_write.lock(), rv.as_ref()) {
            last.insert(Self::key(moed), rv.clone());
        }
        if let (Ok(mut map), Some(rv)) = (self.own_writes.lock(), rv) {
            map.insert(Self::key(moed), (rv, due));
        }
    }

    /// Whether the object in hand may be older than our last status write of it.
    pub(super) fn may_predate_own_write(&self, moed: &MoEDeployment) -> bool {
        let Ok(last) = self.last_status_write.lock() else {
            return false;
        };
        last.get(&Self::key(moed))
            .is_some_and(|rv| moed.metadata.resource_version.as_deref() != Some(rv.as_str()))
    }

    /// The plan that moved nothing for `namespace/name`, if one is kept.
    pub(super) fn plan_hold(&self, namespace: &str, name: &str) -> Option<crate::remap::PlanHold> {
        let map = self.plan_holds.lock().ok()?;
        map.get(&format!("{namespace}/{name}")).cloned()
    }

    /// Keeps (`Some`) or forgets (`None`) the plan that moved nothing for `namespace/name`.
    pub(super) fn set_plan_hold(
        &self,
        namespace: &str,
        name: &str,
        hold: Option<crate::remap::PlanHold>,
    ) {
        if let Ok(mut map) = self.plan_holds.lock() {
            let key = format!("{namespace}/{name}");
            match hold {
                Some(h) => map.insert(key, h),
                None => map.remove(&key),
            };
        }
    }

    pub(super) fn reset_failures(&self, moed: &MoEDeployment) {
        if let Ok(mut map) = self.failures.lock() {
            map.remove(&Self::key(moed));
        }
    }
}
