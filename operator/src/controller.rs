//! The reconciler: owned objects by server-side apply, group restarts, status, and the remap
//! loop (measure, decide, plan, persist, drive, record).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::join_all;
use jiff::Timestamp;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Reporter};

use crate::events::EventRecorder;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use moe_api::{PlacementDocument, RemapRequest};
use serde::Serialize;
use tracing::{info, warn};

use crate::conditions::{self, Observed, Problem, RemapView};
use crate::crd::{
    GroupRestartRecord, MoEDeployment, MoEDeploymentStatus, PlacementStatus, PlacementStrategy,
    RankPod, RemapProgressStatus, RemapRecord,
};
use crate::group::{self, Gate, RankFailure, RestartReason};
use crate::metrics::{CONTROLLER, Metrics};
use crate::planning;
use crate::remap::{self, Decision, Trigger};
use crate::resources::{self, Names, Resolved};
use crate::token_secrets::{self, TOKEN_MISMATCH, Tokens};
use crate::workers::{Endpoint, WorkerApi};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("serialization: {0}")]
    Serde(#[from] serde_json::Error),
    #[error("object has no {0}")]
    MissingObjectKey(&'static str),
    /// The API server refused an owned object's apply (reported in status and as an event).
    #[error("{0}")]
    Refused(crate::apply_refusal::Refusal),
}

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
    pub token_key: Arc<crate::tokens::MasterKey>,
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
            token_key: Arc::new(crate::tokens::MasterKey::random()),
        }
    }
}

/// Shared state of the reconciler.
pub struct Context {
    pub client: Client,
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
    ownership_checked: crate::ownership::Checked,
    /// Token Secrets recently created (or found existing): not posted again on every poll.
    pub(crate) token_secrets: crate::tokens::CreatedSecrets,
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
        }
    }

    fn key(moed: &MoEDeployment) -> String {
        format!(
            "{}/{}",
            moed.namespace().unwrap_or_default(),
            moed.name_any()
        )
    }

    fn record_failure(&self, moed: &MoEDeployment) -> u32 {
        let Ok(mut map) = self.failures.lock() else {
            return 1;
        };
        let n = map.entry(Self::key(moed)).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }

    /// When the event is the echo of our own status write: the time left until the next poll.
    fn echo_of_own_write(&self, moed: &MoEDeployment) -> Option<Duration> {
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

    fn remember_own_write(&self, moed: &MoEDeployment, rv: Option<String>, due: Instant) {
        if let (Ok(mut last), Some(rv)) = (self.last_status_write.lock(), rv.as_ref()) {
            last.insert(Self::key(moed), rv.clone());
        }
        if let (Ok(mut map), Some(rv)) = (self.own_writes.lock(), rv) {
            map.insert(Self::key(moed), (rv, due));
        }
    }

    /// Whether the object in hand may be older than our last status write of it.
    fn may_predate_own_write(&self, moed: &MoEDeployment) -> bool {
        let Ok(last) = self.last_status_write.lock() else {
            return false;
        };
        last.get(&Self::key(moed))
            .is_some_and(|rv| moed.metadata.resource_version.as_deref() != Some(rv.as_str()))
    }

    fn reset_failures(&self, moed: &MoEDeployment) {
        if let Ok(mut map) = self.failures.lock() {
            map.remove(&Self::key(moed));
        }
    }
}

/// Runs the controller until the stream ends (shutdown signal).
pub async fn run(ctx: Arc<Context>, namespace: Option<String>) {
    let client = ctx.client.clone();
    let (moeds, stss, cms): (Api<MoEDeployment>, Api<StatefulSet>, Api<ConfigMap>) =
        match &namespace {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
            None => (
                Api::all(client.clone()),
                Api::all(client.clone()),
                Api::all(client.clone()),
            ),
        };
    let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=moe-operator");
    let metrics = ctx.metrics.clone();
    let controller = Controller::new(moeds, watcher::Config::default());
    let store = controller.store();
    let mapper_ctx = ctx.clone();
    let sts_ctx = ctx.clone();
    controller
        // Owned StatefulSets (their status moves when a rank's pod fails or becomes ready):
        // like `owns`, but the event is not mistaken for the echo of our status write.
        .watches(stss, owned, move |sts| {
            let refs = controller_owner(&sts);
            for r in &refs {
                sts_ctx.forget_own_write(r.namespace.as_deref().unwrap_or(""), &r.name);
            }
            refs
        })
        // Static maps are the user's ConfigMaps (no label to select them by): a created, fixed
        // or deleted map, or a change to an owned placement ConfigMap, reconciles at once.
        .watches(cms, watcher::Config::default(), move |cm| {
            let refs = deployments_for_configmap(&cm, &store.state());
            for r in &refs {
                mapper_ctx.forget_own_write(r.namespace.as_deref().unwrap_or(""), &r.name);
            }
            refs
        })
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|res| {
            let metrics = metrics.clone();
            async move {
                match res {
                    Ok(_) => {}
                    // A deleted deployment: owner references clean up; drop its series.
                    Err(kube::runtime::controller::Error::ObjectNotFound(r)) => {
                        metrics.forget(r.namespace.as_deref().unwrap_or(""), &r.name);
                    }
                    Err(e) => warn!(error = %e, "reconcile failed"),
                }
            }
        })
        .await;
}

/// Requeue with exponential backoff per object.
pub fn error_policy(moed: Arc<MoEDeployment>, error: &Error, ctx: Arc<Context>) -> Action {
    let n = ctx.record_failure(&moed);
    let (base, cap) = ctx.settings.error_backoff;
    let delay = base
        .checked_mul(1u32 << n.min(16).saturating_sub(1))
        .unwrap_or(cap)
        .min(cap);
    warn!(name = %moed.name_any(), namespace = ?moed.namespace(), error = %error, retry_in = ?delay, "reconcile error");
    Action::requeue(delay)
}

/// The MoEDeployment that controls an object (owner reference with `controller: true`).
pub fn controller_owner<K: Resource>(obj: &K) -> Vec<ObjectRef<MoEDeployment>> {
    let Some(ns) = obj.meta().namespace.as_deref() else {
        return Vec::new();
    };
    obj.owner_references()
        .iter()
        .filter(|o| {
            o.controller == Some(true)
                && o.kind == crate::crd::KIND
                && o.api_version.starts_with(crate::crd::GROUP)
        })
        .map(|o| ObjectRef::new(&o.name).within(ns))
        .collect()
}

/// The deployments a ConfigMap event concerns: its controller owner (the placement ConfigMap)
/// and every deployment of its namespace whose `spec.placement.staticMap` names it.
pub fn deployments_for_configmap(
    cm: &ConfigMap,
    moeds: &[Arc<MoEDeployment>],
) -> Vec<ObjectRef<MoEDeployment>> {
    let Some(ns) = cm.namespace() else {
        return Vec::new();
    };
    let name = cm.name_any();
    let mut out = controller_owner(cm);
    for m in moeds {
        if m.namespace().as_deref() == Some(ns.as_str())
            && m.spec
                .placement
                .static_map
                .as_ref()
                .is_some_and(|r| r.name == name)
        {
            let r = ObjectRef::from_obj(m.as_ref());
            if !out.contains(&r) {
                out.push(r);
            }
        }
    }
    out
}

/// Controller entry point: timing and metrics around [`reconcile_inner`].
pub async fn reconcile(moed: Arc<MoEDeployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    if let Some(left) = ctx.echo_of_own_write(&moed) {
        return Ok(Action::requeue(left.max(Duration::from_millis(100))));
    }
    // A cached object of another version than our last write may predate it: read it afresh.
    let fresh;
    let moed: &MoEDeployment = if ctx.may_predate_own_write(&moed) {
        let ns = moed.namespace().unwrap_or_default();
        match Api::<MoEDeployment>::namespaced(ctx.client.clone(), &ns)
            .get_opt(&moed.name_any())
            .await
        {
            Ok(Some(o)) => {
                fresh = o;
                &fresh
            }
            Ok(None) => return Ok(Action::await_change()),
            Err(e) => return Err(Error::Kube(e)),
        }
    } else {
        &moed
    };
    let start = Instant::now();
    let mut result = reconcile_inner(moed, &ctx).await;
    if let Err(Error::Refused(r)) = &result
        && let Err(e) = report_refusal(moed, &ctx, r).await
    {
        warn!(error = %e, refusal = %r, "could not report the refused apply in status");
        result = Err(e);
    }
    ctx.metrics
        .reconcile_time
        .with_label_values(&[CONTROLLER])
        .observe(start.elapsed().as_secs_f64());
    match &result {
        Ok(_) => {
            ctx.reset_failures(moed);
            ctx.metrics
                .reconcile_total
                .with_label_values(&[CONTROLLER, "success"])
                .inc();
        }
        Err(_) => {
            ctx.metrics
                .reconcile_total
                .with_label_values(&[CONTROLLER, "error"])
                .inc();
            ctx.metrics
                .reconcile_errors
                .with_label_values(&[CONTROLLER])
                .inc();
        }
    }
    result
}

fn apply_params() -> PatchParams {
    PatchParams::apply(resources::FIELD_MANAGER).force()
}

async fn apply<K>(api: &Api<K>, name: &str, obj: &K) -> Result<K, Error>
where
    K: Resource + Clone + Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    Ok(api.patch(name, &apply_params(), &Patch::Apply(obj)).await?)
}

/// [`apply`] of an owned object: a refusal by the API server (4xx) becomes
/// [`Error::Refused`], which the reconcile reports in status and as an event.
async fn apply_owned<K>(api: &Api<K>, name: &str, obj: &K) -> Result<K, Error>
where
    K: Resource<DynamicType = ()>
        + Clone
        + Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    match api.patch(name, &apply_params(), &Patch::Apply(obj)).await {
        Ok(o) => Ok(o),
        Err(e) => {
            let object = format!("{}/{name}", obj.meta().namespace.as_deref().unwrap_or(""));
            let kind = match K::kind(&()) {
                std::borrow::Cow::Borrowed(k) => k,
                std::borrow::Cow::Owned(_) => "object",
            };
            Err(
                match crate::apply_refusal::Refusal::from_error(kind, object, e) {
                    Ok(refusal) => Error::Refused(refusal),
                    Err(e) => Error::Kube(e),
                },
            )
        }
    }
}

/// What the committed placement should be initialised from, as recorded on the ConfigMap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlacementSource {
    Linear,
    RoundRobin,
    /// A static map's text and a hash of it.
    Static {
        text: String,
        hash: String,
    },
}

impl PlacementSource {
    pub fn label(&self) -> String {
        match self {
            PlacementSource::Linear => "Linear".into(),
            PlacementSource::RoundRobin => "RoundRobin".into(),
            PlacementSource::Static { hash, .. } => format!("Static:{hash}"),
        }
    }
}

fn fnv(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The committed document to keep or write.
///
/// * Same shape and same source as committed: keep it (`Ok(None)`): remaps live in it.
/// * Otherwise a new document from the source, with the next generation: after the committed
///   one, or after `last_known` (the status' desired generation) when the ConfigMap was lost, so
///   that generations never go backwards under running workers; 0 for a new deployment.
pub fn next_document(
    current: Option<(&PlacementDocument, Option<&str>)>,
    last_known: Option<u64>,
    spec: &crate::crd::MoEDeploymentSpec,
    redundant: u32,
    source: &PlacementSource,
) -> Result<Option<PlacementDocument>, Problem> {
    if let Some((doc, label)) = current
        && planning::document_matches(doc, spec, redundant)
        && label == Some(source.label().as_str())
    {
        return Ok(None);
    }
    let generation = match (current, last_known) {
        (Some((d, _)), _) => d.generation + 1,
        (None, Some(g)) => g + 1,
        (None, None) => 0,
    };
    let doc = match source {
        PlacementSource::Static { text, .. } => {
            planning::import_static(spec, redundant, text, generation).map_err(|e| {
                Problem::new("StaticMapInvalid", format!("spec.placement.staticMap: {e}"))
            })?
        }
        _ => planning::initial_document(spec, redundant, generation)
            .map_err(|e| Problem::new("InvalidShape", e))?,
    };
    Ok(Some(doc))
}

fn parse_document(cm: &ConfigMap) -> Option<PlacementDocument> {
    let text = cm.data.as_ref()?.get(moe_api::PLACEMENT_CONFIGMAP_KEY)?;
    serde_json::from_str(text).ok()
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The pod's ordinal in the StatefulSet (its first rank is this times `ranksPerPod`).
fn pod_index(pod: &Pod) -> Option<usize> {
    if let Some(i) = pod.labels().get(resources::POD_INDEX_LABEL) {
        return i.parse().ok();
    }
    pod.name_any().rsplit('-').next()?.parse().ok()
}

fn pod_hash(pod: &Pod) -> Option<&str> {
    pod.annotations()
        .get(resources::GROUP_HASH_ANNOTATION)
        .map(String::as_str)
}

/// Whether a pod was made for another spec than `desired` (its spec-hash annotation). A pod
/// without one (made by an operator release before spec hashes) is taken as current: an
/// upgrade must not restart running groups.
fn pod_spec_stale(pod: &Pod, desired: &str) -> bool {
    pod.annotations()
        .get(resources::SPEC_HASH_ANNOTATION)
        .is_some_and(|h| h != desired)
}

/// Container restarts of a pod (all containers).
fn pod_restarts(pod: &Pod) -> u32 {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map_or(0, |cs| {
            cs.iter()
                .map(|c| u32::try_from(c.restart_count).unwrap_or(0))
                .fold(0u32, u32::saturating_add)
        })
}

/// The group's live pods (uid, restarts), each under its first rank.
fn rank_pods(pods: &[&Pod], ranks_per_pod: u32) -> Vec<RankPod> {
    let mut out: Vec<RankPod> = pods
        .iter()
        .filter_map(|p| {
            let rank = u32::try_from(pod_index(p)?)
                .ok()?
                .checked_mul(ranks_per_pod)?;
            Some(RankPod {
                rank,
                uid: p.uid().unwrap_or_else(|| p.name_any()),
                restarts: pod_restarts(p),
            })
        })
        .collect();
    out.sort_by_key(|p| p.rank);
    out.dedup_by_key(|p| p.rank);
    out
}

/// The group's closed windows before the current one (oldest first, at most
/// `history_windows - 1`), for planning over episodes. Asked for only when a plan is made, as
/// the bodies grow with the history; a rank that cannot answer leaves the plan to the current
/// window alone rather than holding it.
async fn past_windows(
    ctx: &Context,
    endpoints: &[Endpoint],
    history_windows: u32,
) -> Vec<Vec<Vec<f64>>> {
    let want = history_windows.saturating_sub(1) as usize;
    if want == 0 {
        return Vec::new();
    }
    let answers = join_all(
        endpoints
            .iter()
            .map(|e| ctx.workers.load_with_history(e, want)),
    )
    .await;
    match answers.into_iter().collect::<Result<Vec<_>, _>>() {
        Ok(reports) => moe_api::LoadEpisode::group_history(&reports, want),
        Err(e) => {
            warn!(error = %e, "could not read the workers' past windows; planning from the current one");
            Vec::new()
        }
    }
}

struct Pending {
    events: Vec<Event>,
}

impl Pending {
    fn event(&mut self, type_: EventType, reason: &str, action: &str, note: String) {
        self.events.push(Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        });
    }
}

fn now_time() -> Time {
    Time(Timestamp::now())
}

async fn reconcile_inner(moed: &MoEDeployment, ctx: &Context) -> Result<Action, Error> {
    let ns = moed
        .namespace()
        .ok_or(Error::MissingObjectKey("namespace"))?;
    let name = moed.name_any();
    if moed.metadata.deletion_timestamp.is_some() {
        // Owner references garbage-collect everything; nothing to finalise.
        ctx.metrics.forget(&ns, &name);
        return Ok(Action::await_change());
    }
    let owner = resources::owner_reference(moed).ok_or(Error::MissingObjectKey("uid"))?;
    let spec = &moed.spec;
    let old = moed.status.clone().unwrap_or_default();
    let mut st = old.clone();
    st.observed_generation = moed.metadata.generation;
    st.ranks = spec.expert_parallel.ranks;
    let mut pending = Pending { events: Vec::new() };
    let mut problems: Vec<Problem> = Vec::new();
    let names = Names::new(&name);
    let client = ctx.client.clone();

    // 1. The spec.
    if let Err(e) = spec.validate() {
        problems.push(Problem::new("InvalidSpec", e.to_string()));
        if old.conditions.iter().all(|c| {
            !(c.type_ == conditions::DEGRADED && c.reason == "InvalidSpec" && c.status == "True")
        }) {
            pending.event(EventType::Warning, "InvalidSpec", "Validate", e.to_string());
        }
        let observed = Observed::blocked(st.ranks, problems, "the spec is invalid");
        return finish_blocked(moed, ctx, &old, st, &observed, pending).await;
    }
    // An unknown planner does not stop the workers; it holds remaps and says why.
    if !planning::planner_known(&spec.eplb.algorithm) {
        let p = Problem::new(
            "UnknownAlgorithm",
            format!(
                "spec.eplb.algorithm {:?} is not a planner of this operator: use {}",
                spec.eplb.algorithm,
                planning::ALGORITHMS.join(", ")
            ),
        );
        if old.conditions.iter().all(|c| c.reason != p.reason) {
            pending.event(EventType::Warning, &p.reason, "Validate", p.message.clone());
        }
        problems.push(p);
    }
    let redundant = planning::effective_redundant(spec);
    st.redundant_experts = Some(redundant);
    let resolved = Resolved {
        name: name.clone(),
        namespace: ns.clone(),
        owner,
        redundant_experts: redundant,
        defaults: ctx.settings.worker_defaults.clone(),
        rollout: moed
            .annotations()
            .get(resources::ROLLOUT_ANNOTATION)
            .cloned(),
    };

    // 1b. No fixed name the operator writes may belong to someone else (see ownership.rs):
    //     checked before the first write.
    if let Some(p) = crate::ownership::taken_name(
        &client,
        &ctx.ownership_checked,
        &resolved,
        spec,
        &ctx.settings.control_peers,
    )
    .await?
    {
        if old.conditions.iter().all(|c| c.reason != p.reason) {
            pending.event(EventType::Warning, &p.reason, "Apply", p.message.clone());
        }
        problems.push(p);
        let observed = Observed::blocked(
            st.ranks,
            problems,
            "an object name the operator needs is taken",
        );
        return finish_blocked(moed, ctx, &old, st, &observed, pending).await;
    }
    // 2. The committed placement.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let current_cm = cms.get_opt(&names.configmap).await?;
    let current_doc = current_cm.as_ref().and_then(parse_document);
    let current_label = current_cm.as_ref().and_then(|cm| {
        cm.annotations()
            .get(resources::PLACEMENT_SOURCE_ANNOTATION)
            .cloned()
    });
    // The ConfigMap is written before status: when it says the current manual request was
    // acted on, it was, whatever a stale status says (see HANDLED_REMAP_REQUEST_ANNOTATION).
    if let Some(request) = spec.remap_request.as_deref()
        && current_cm.as_ref().is_some_and(|cm| {
            cm.annotations()
                .get(resources::HANDLED_REMAP_REQUEST_ANNOTATION)
                .is_some_and(|handled| handled == request)
        })
    {
        st.last_handled_remap_request = Some(request.to_string());
    }
    let source = match (spec.placement.strategy, &spec.placement.static_map) {
        (PlacementStrategy::Linear, _) => Ok(PlacementSource::Linear),
        (PlacementStrategy::RoundRobin, _) => Ok(PlacementSource::RoundRobin),
        (PlacementStrategy::Static, Some(r)) => match cms.get_opt(&r.name).await? {
            None => Err(Problem::new(
                "StaticMapMissing",
                format!(
                    "spec.placement.staticMap: ConfigMap {ns}/{} not found; create it or change the strategy",
                    r.name
                ),
            )),
            Some(cm) => match cm.data.as_ref().and_then(|d| d.get(&r.key)) {
                None => Err(Problem::new(
                    "StaticMapInvalid",
                    format!(
                        "spec.placement.staticMap: ConfigMap {ns}/{} has no key {:?}",
                        r.name, r.key
                    ),
                )),
                Some(text) => Ok(PlacementSource::Static {
                    hash: fnv(text),
                    text: text.clone(),
                }),
            },
        },
        (PlacementStrategy::Static, None) => Err(Problem::new(
            "InvalidSpec",
            "spec.placement.staticMap is required with strategy Static",
        )),
    };
    let mut doc = current_doc.clone();
    let mut source_label = current_label.clone();
    match source.and_then(|s| {
        let next = next_document(
            current_doc.as_ref().map(|d| (d, current_label.as_deref())),
            old.placement.as_ref().map(|p| p.desired_generation),
            spec,
            redundant,
            &s,
        )?;
        Ok((s, next))
    }) {
        Ok((_, None)) => {}
        Ok((s, Some(next))) => {
            let cm = resources::placement_configmap(
                &resolved,
                &next,
                &s.label(),
                st.last_handled_remap_request.as_deref(),
            )?;
            apply(&cms, &names.configmap, &cm).await?;
            info!(%ns, %name, generation = next.generation, source = %s.label(), "committed initial placement");
            // Any remap towards the replaced document is moot now.
            st.remap = None;
            doc = Some(next);
            source_label = Some(s.label());
        }
        Err(p) => {
            let usable = current_doc
                .as_ref()
                .is_some_and(|d| planning::document_matches(d, spec, redundant));
            if !usable {
                doc = None;
            }
            if old.conditions.iter().all(|c| c.reason != p.reason) {
                pending.event(
                    EventType::Warning,
                    &p.reason,
                    "CommitPlacement",
                    p.message.clone(),
                );
            }
            problems.push(p);
        }
    }
    let Some(doc) = doc else {
        // Nothing the workers could load: do not create them.
        let observed = Observed::blocked(st.ranks, problems, "no committed placement");
        return finish_blocked(moed, ctx, &old, st, &observed, pending).await;
    };
    st.placement = Some(PlacementStatus {
        config_map: names.configmap.clone(),
        desired_generation: doc.generation,
        applied_generation: old.placement.as_ref().and_then(|p| p.applied_generation),
    });

    // 3. Owned objects.
    let tokens = Tokens::of(&ctx.settings.token_key, moed, &resolved);
    crate::expert_tier::reconcile_objects(
        &client,
        &resolved,
        spec,
        &ctx.settings.control_peers,
        old.serving.is_some(),
        &tokens.client,
        &ctx.token_secrets,
    )
    .await?;
    st.serving = crate::expert_tier::status(&resolved, spec);
    token_secrets::create_secret(
        &Api::<Secret>::namespaced(client.clone(), &ns),
        &resources::control_secret(&resolved, &tokens.control),
        &tokens.control,
        &ctx.token_secrets,
    )
    .await?;
    apply_owned(
        &Api::<ServiceAccount>::namespaced(client.clone(), &ns),
        &names.service_account,
        &resources::service_account(&resolved),
    )
    .await?;
    apply_owned(
        &Api::<Service>::namespaced(client.clone(), &ns),
        &names.service,
        &resources::service(&resolved, spec),
    )
    .await?;
    sync_disruption_budget(&client, &ns, &resolved, spec).await?;
    let sts = resources::statefulset(&resolved, spec);
    // The spec hash decides restarts; the template hash only says whether pods run the
    // operator's current template (its defaults may have changed since they were made).
    let desired_hash = resources::desired_spec_hash(&sts).unwrap_or_default();
    let desired_template = resources::desired_group_hash(&sts).unwrap_or_default();
    apply_owned(
        &Api::<StatefulSet>::namespaced(client.clone(), &ns),
        &names.statefulset,
        &sts,
    )
    .await?;

    // 4. The group: replace it as a whole when its hash changed, or when a rank failed (within
    //    the restart budget, after the backoff).
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pods = pods_api
        .list(&ListParams::default().labels(&resources::selector_string(&name)))
        .await?
        .items;
    let live: Vec<&Pod> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    let stale: Vec<&Pod> = live
        .iter()
        .copied()
        .filter(|p| pod_spec_stale(p, &desired_hash))
        .collect();
    let terminating = pods.len() > live.len();
    let now = Timestamp::now();
    let policy = &spec.group_restart_policy;
    let recorded_times: Vec<Timestamp> = old.recent_group_restarts.iter().map(|t| t.0).collect();
    st.recent_group_restarts = group::recent_restarts(policy, &recorded_times, now)
        .into_iter()
        .map(Time)
        .collect();
    let mut current: Vec<&Pod> = live
        .iter()
        .copied()
        .filter(|p| !pod_spec_stale(p, &desired_hash))
        .collect();
    // Pods of the current spec on an older template: reported, applied on request or at the
    // group's next own restart.
    let outdated = current
        .iter()
        .filter(|p| pod_hash(p) != Some(desired_template.as_str()))
        .count();
    st.outdated_template = (outdated > 0).then(|| {
        format!(
            "{outdated} pod(s) run an older pod template than the operator's current one ({desired_template}: its defaults changed, e.g. the worker image); it applies at the group's next restart, or now by changing the annotation {} on this MoEDeployment",
            resources::ROLLOUT_ANNOTATION
        )
    });
    if st.outdated_template.is_some() && old.outdated_template.is_none() {
        pending.event(
            EventType::Normal,
            "TemplateOutdated",
            "Observe",
            st.outdated_template.clone().unwrap_or_default(),
        );
    }
    let mut group = GroupCtx {
        api: &pods_api,
        ns: &ns,
        name: &name,
        ranks: spec.expert_parallel.ranks,
        policy,
        restarted: false,
        pending_restart: None,
        held_restart: None,
        fleet_wait: None,
        wake_in: None,
    };
    // Replacing stale pods is a group restart too: it waits for the fleet-wide limit.
    let stale_waits = !stale.is_empty()
        && !group.fleet_grant(ctx, &old, &mut pending, "the worker spec changed", false);
    if stale_waits {
        // Nothing deleted, nothing recorded: the next reconcile after the wait does it all.
    } else if !stale.is_empty() {
        if old.group_hash.as_deref() != Some(desired_hash.as_str()) {
            let failure = RankFailure {
                reason: RestartReason::SpecChanged,
                message: "the worker spec changed".into(),
            };
            group
                .restart(&failure, &[], ctx, &mut st, &mut pending)
                .await?;
        }
        for p in &stale {
            delete_pod(&pods_api, p).await?;
        }
        st.rank_pods.clear();
    } else {
        // The record belongs to this group hash only.
        let recorded: &[RankPod] = if old.group_hash.as_deref() == Some(desired_hash.as_str()) {
            &old.rank_pods
        } else {
            &[]
        };
        let seen = rank_pods(&current, spec.ranks_per_pod());
        // One pod is the whole group: its restart needs no group restart.
        let failure = (spec.num_pods() > 1)
            .then(|| group::detect_failure(recorded, &seen, spec.expert_parallel.ranks))
            .flatten();
        // While some rank cannot be scheduled, the others fail their rendezvous and restart:
        // restarting the group cannot help and would use up the restart budget. Take the
        // record as it is (those restarts are not failures) and wait; Unschedulable is the
        // problem reported.
        let waiting_for_scheduling = current.iter().any(|p| crate::pod_health::unschedulable(p));
        match failure {
            None => st.rank_pods = seen,
            Some(_) if waiting_for_scheduling => st.rank_pods = seen,
            // The record stays as it was: the failure stays pending until acted on.
            Some(f) => {
                group
                    .failed(
                        &f,
                        &current,
                        ctx,
                        &mut st,
                        &old,
                        &mut pending,
                        &mut problems,
                    )
                    .await?;
            }
        }
    }
    if group.restarted {
        current.clear();
    }
    if !stale_waits {
        st.group_hash = Some(desired_hash.clone());
    }
    // Pods that the StatefulSet could not create show nothing themselves: read its events.
    if !restarting_now(&stale, stale_waits, terminating, group.restarted)
        && pods.len() < spec.num_pods() as usize
        && let Some(p) = crate::pod_creation::read(&client, &ns, &names.statefulset).await?
    {
        if old.conditions.iter().all(|c| c.reason != p.reason) {
            pending.event(
                EventType::Warning,
                &p.reason,
                "CreatePods",
                p.message.clone(),
            );
        }
        problems.push(p);
    }
    let ready_pods: Vec<&Pod> = current.iter().copied().filter(|p| pod_ready(p)).collect();
    let per_pod = spec.ranks_per_pod() as usize;
    st.ready_ranks = (ready_pods.len() * per_pod).min(st.ranks as usize) as u32;
    for p in crate::pod_health::pod_problems(&pods) {
        // An event on the transition only: the condition carries the problem meanwhile.
        if old.conditions.iter().all(|c| c.reason != p.reason) {
            pending.event(EventType::Warning, &p.reason, "Observe", p.message.clone());
        }
        problems.push(p);
    }
    let restarting = restarting_now(&stale, stale_waits, terminating, group.restarted);
    ctx.metrics
        .ready_ranks
        .with_label_values(&[&ns, &name])
        .set(i64::from(st.ready_ranks));

    // 5. The remap loop.
    let broken = group.pending_restart.is_some() || group.held_restart.is_some();
    let group_up = !restarting && !broken && st.ready_ranks == st.ranks && st.ranks > 0;
    // Each ready pod serves ranks index*k .. index*k+k-1 on httpPort + local rank.
    let mut endpoints: Vec<Endpoint> = ready_pods
        .iter()
        .filter_map(|p| Some((pod_index(p)?, p.status.as_ref()?.pod_ip.as_deref()?)))
        .flat_map(|(index, ip)| {
            (0..per_pod).filter_map(move |local| {
                let port = u16::try_from(usize::from(spec.worker.http_port) + local).ok()?;
                Some(Endpoint::new(index * per_pod + local, ip, port))
            })
        })
        .collect();
    endpoints.sort_by_key(|e| e.rank);
    let mut remap_view = RemapView::Idle {
        reason: "GroupNotReady".into(),
        message: if broken {
            "a rank failed: the group must restart before remaps continue".into()
        } else {
            "waiting for every rank to be ready".into()
        },
    };
    let mut requeue = Duration::from_secs(u64::from(spec.eplb.poll_interval_seconds.max(1)));
    if group_up && endpoints.len() == st.ranks as usize {
        let worker = WorkerCtx {
            endpoints: &endpoints,
            tokens: &tokens,
            source_label: source_label.as_deref().unwrap_or(""),
        };
        let step = remap_step(moed, ctx, &mut st, &doc, &worker, &resolved, &mut pending).await?;
        remap_view = step.view;
        // One slow or failed poll is not a degraded group: WorkersUnreachable becomes a problem
        // only when the previous pass could not reach the workers either (the Rebalancing
        // condition records it); meanwhile the next poll comes sooner.
        let unreachable_before = old
            .conditions
            .iter()
            .any(|c| c.type_ == conditions::REBALANCING && c.reason == "WorkersUnreachable");
        for p in step.problems {
            if p.reason == "WorkersUnreachable" && !unreachable_before {
                requeue = requeue.min(ctx.settings.remap_poll);
                continue;
            }
            if p.reason == TOKEN_MISMATCH && old.conditions.iter().all(|c| c.reason != p.reason) {
                pending.event(
                    EventType::Warning,
                    &p.reason,
                    "Authenticate",
                    p.message.clone(),
                );
            }
            problems.push(p);
        }
        if step.fast_requeue {
            requeue = ctx.settings.remap_poll;
        }
        if let Some(message) = step.restart_group {
            let f = RankFailure {
                reason: RestartReason::RemapFailed,
                message,
            };
            group
                .failed(
                    &f,
                    &current,
                    ctx,
                    &mut st,
                    &old,
                    &mut pending,
                    &mut problems,
                )
                .await?;
        }
    } else if let Some(r) = &st.remap {
        remap_view = RemapView::Running {
            generation: r.generation,
            layers_done: r.layers_done,
            layers_total: r.layers_total,
        };
    }
    if let Some(wake) = group.wake_in {
        requeue = requeue.min(wake.max(Duration::from_secs(1)));
    }
    if let Some(p) = &st.placement {
        let g = &ctx.metrics.placement_generation;
        g.with_label_values(&[&ns, &name, "desired"])
            .set(p.desired_generation as i64);
        if let Some(a) = p.applied_generation {
            g.with_label_values(&[&ns, &name, "applied"]).set(a as i64);
        }
    }

    let observed = Observed {
        ranks: st.ranks,
        ready_ranks: st.ready_ranks,
        restarting: restarting || group.restarted,
        blocked: false,
        restart_pending: group.pending_restart,
        restart_held: group.held_restart,
        fleet_wait: group.fleet_wait,
        problems,
        remap: remap_view,
    };
    finish(moed, ctx, &old, st, &observed, pending, requeue).await
}

/// Whole-group restarts of one reconcile.
struct GroupCtx<'a> {
    api: &'a Api<Pod>,
    ns: &'a str,
    name: &'a str,
    ranks: u32,
    policy: &'a crate::crd::GroupRestartPolicy,
    /// The operator deleted the group's pods in this pass.
    restarted: bool,
    /// A failure waits for the backoff (message for `Progressing/RestartBackoff`).
    pending_restart: Option<String>,
    /// A failure is held: the restart budget is used up.
    held_restart: Option<String>,
    /// A restart waits for the fleet-wide restart limit (message for `Progressing`).
    fleet_wait: Option<String>,
    /// Reconcile again after this long (backoff over, budget freed).
    wake_in: Option<Duration>,
}

impl GroupCtx<'_> {
    /// A rank failure: restart the group now, or say why not (backoff, budget).
    #[allow(clippy::too_many_arguments)]
    async fn failed(
        &mut self,
        failure: &RankFailure,
        pods: &[&Pod],
        ctx: &Context,
        st: &mut MoEDeploymentStatus,
        old: &MoEDeploymentStatus,
        pending: &mut Pending,
        problems: &mut Vec<Problem>,
    ) -> Result<(), Error> {
        let now = Timestamp::now();
        let recent: Vec<Timestamp> = st.recent_group_restarts.iter().map(|t| t.0).collect();
        match group::gate(self.policy, &recent, now) {
            Gate::Restart => {
                if self.fleet_grant(ctx, old, pending, &failure.message, true) {
                    self.restart(failure, pods, ctx, st, pending).await?;
                }
            }
            Gate::Backoff {
                wait,
                at,
                delay,
                recent,
            } => {
                info!(ns = %self.ns, name = %self.name, reason = failure.reason.as_str(), wait = ?wait, "group restart backing off");
                self.pending_restart = Some(format!(
                    "{}: the group restarts at {at} (backoff {}s after {recent} restart{} within {}s)",
                    failure.message,
                    delay.as_secs(),
                    if recent == 1 { "" } else { "s" },
                    self.policy.window_seconds
                ));
                self.wake_in = Some(wait);
            }
            Gate::Exhausted { until, recent } => {
                let message =
                    group::exhausted_message(self.policy, failure, recent, until, self.name);
                let was_held = old.conditions.iter().any(|c| {
                    c.type_ == conditions::DEGRADED
                        && c.status == "True"
                        && c.reason == "RestartBudgetExhausted"
                });
                if !was_held {
                    warn!(ns = %self.ns, name = %self.name, reason = failure.reason.as_str(), "group restart budget exhausted");
                    pending.event(
                        EventType::Warning,
                        "RestartBudgetExhausted",
                        "RestartGroup",
                        message.clone(),
                    );
                }
                problems.insert(0, Problem::new("RestartBudgetExhausted", message));
                self.held_restart = Some(format!(
                    "{}; the group restart is held (restart budget exhausted)",
                    failure.message
                ));
                if until != Timestamp::MAX {
                    let left = Duration::try_from(until.duration_since(now)).unwrap_or_default();
                    self.wake_in = Some(left);
                }
            }
        }
        Ok(())
    }

    /// Asks the fleet-wide limiter for a group restart; false (and the wait recorded, with an
    /// event on the transition) when the restart must wait. `failed`: a rank failure, which
    /// keeps the group unavailable and its remaps held meanwhile.
    fn fleet_grant(
        &mut self,
        ctx: &Context,
        old: &MoEDeploymentStatus,
        pending: &mut Pending,
        what: &str,
        failed: bool,
    ) -> bool {
        let grant = ctx.restart_limiter.try_acquire(Instant::now());
        let (Some(message), crate::fleet::Grant::Wait { wait, .. }) = (grant.message(what), grant)
        else {
            return true;
        };
        info!(ns = %self.ns, name = %self.name, wait = ?wait, "group restart waits for the fleet-wide limit");
        let waited_before = old
            .conditions
            .iter()
            .any(|c| c.type_ == conditions::PROGRESSING && c.reason == "FleetRestartLimit");
        if !waited_before {
            pending.event(
                EventType::Warning,
                "FleetRestartLimit",
                "RestartGroup",
                message.clone(),
            );
        }
        if failed {
            self.pending_restart = Some(message.clone());
        }
        self.fleet_wait = Some(message);
        self.wake_in = Some(self.wake_in.map_or(wait, |w| w.min(wait)));
        false
    }

    /// Deletes every pod of the group (the StatefulSet, `OnDelete` + `Parallel`, creates them
    /// again together) and records the restart.
    async fn restart(
        &mut self,
        failure: &RankFailure,
        pods: &[&Pod],
        ctx: &Context,
        st: &mut MoEDeploymentStatus,
        pending: &mut Pending,
    ) -> Result<(), Error> {
        for p in pods {
            delete_pod(self.api, p).await?;
        }
        let reason = failure.reason.as_str();
        let now = now_time();
        st.group_restarts = st.group_restarts.saturating_add(1);
        if failure.reason.budgeted() {
            st.recent_group_restarts.push(now.clone());
        }
        st.rank_pods.clear();
        st.last_group_restart = Some(GroupRestartRecord {
            at: now,
            reason: reason.into(),
            message: failure.message.clone(),
        });
        ctx.metrics
            .group_restarts
            .with_label_values(&[self.ns, self.name, reason])
            .inc();
        let budget = if failure.reason.budgeted() {
            format!(
                " (restart {} of at most {} within {}s)",
                st.recent_group_restarts.len(),
                self.policy.max_restarts,
                self.policy.window_seconds
            )
        } else {
            String::new()
        };
        pending.event(
            if failure.reason.budgeted() {
                EventType::Warning
            } else {
                EventType::Normal
            },
            "GroupRestarted",
            "RestartGroup",
            format!(
                "{reason}: {}; replacing all {} ranks together{budget}",
                failure.message, self.ranks
            ),
        );
        info!(ns = %self.ns, name = %self.name, reason, "group restarted");
        self.restarted = !pods.is_empty();
        Ok(())
    }
}

/// Whether the group is being replaced in this pass (stale pods deleted, pods terminating, or
/// a restart just made).
fn restarting_now(stale: &[&Pod], stale_waits: bool, terminating: bool, restarted: bool) -> bool {
    (!stale.is_empty() && !stale_waits) || terminating || restarted
}

/// The group's PodDisruptionBudget: applied when enabled, deleted (if ours) when not.
async fn sync_disruption_budget(
    client: &Client,
    ns: &str,
    r: &Resolved,
    spec: &crate::crd::MoEDeploymentSpec,
) -> Result<(), Error> {
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    let api: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), ns);
    let name = Names::new(&r.name).disruption_budget;
    match resources::pod_disruption_budget(r, spec) {
        Some(pdb) => {
            apply_owned(&api, &name, &pdb).await?;
        }
        None => {
            let ours = api.get_opt(&name).await?.is_some_and(|p| {
                p.owner_references()
                    .iter()
                    .any(|o| o.controller == Some(true) && o.uid == r.owner.uid)
            });
            if ours {
                match api.delete(&name, &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    Ok(())
}

/// A refused owned-object apply: `Degraded` with the refusal (and `Stalled` for a 403 or 422,
/// which need a fix), a Warning event on the transition. The rest of the status stays as it was.
async fn report_refusal(
    moed: &MoEDeployment,
    ctx: &Context,
    refusal: &crate::apply_refusal::Refusal,
) -> Result<Action, Error> {
    let old = moed.status.clone().unwrap_or_default();
    let mut st = old.clone();
    st.observed_generation = moed.metadata.generation;
    st.ranks = moed.spec.expert_parallel.ranks;
    let problem = refusal.problem();
    let mut pending = Pending { events: Vec::new() };
    if old.conditions.iter().all(|c| c.reason != problem.reason) {
        pending.event(
            EventType::Warning,
            &problem.reason,
            "Apply",
            problem.message.clone(),
        );
    }
    let observed = Observed {
        ready_ranks: st.ready_ranks,
        ..Observed::blocked(
            st.ranks,
            vec![problem],
            "an owned object could not be applied; see Degraded",
        )
    };
    finish_blocked(moed, ctx, &old, st, &observed, pending).await
}

async fn delete_pod(api: &Api<Pod>, pod: &Pod) -> Result<(), Error> {
    match api.delete(&pod.name_any(), &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

struct StepOutcome {
    view: RemapView,
    problems: Vec<Problem>,
    fast_requeue: bool,
    /// Restart the group (a rank failed a remap): why.
    restart_group: Option<String>,
}

/// How to reach the ranks, and what the committed placement came from.
struct WorkerCtx<'a> {
    endpoints: &'a [Endpoint],
    tokens: &'a Tokens,
    source_label: &'a str,
}

impl StepOutcome {
    /// The pass stops: a rank did not answer.
    fn token_mismatch(mut self, p: Problem) -> Self {
        self.view = RemapView::Idle {
            reason: TOKEN_MISMATCH.into(),
            message: "a rank holds another token than the operator: see Degraded".into(),
        };
        self.problems.push(p);
        self
    }

    fn workers_unreachable(mut self, rank: usize, e: impl std::fmt::Display) -> Self {
        self.problems.push(Problem::new(
            "WorkersUnreachable",
            format!("rank {rank}: {e}"),
        ));
        self.view = RemapView::Idle {
            reason: "WorkersUnreachable".into(),
            message: e.to_string(),
        };
        self
    }
}

/// Every rank's answer in rank order, or the first rank that failed with its error.
fn every_rank<T, E>(
    endpoints: &[Endpoint],
    answers: Vec<Result<T, E>>,
) -> Result<Vec<T>, (usize, E)> {
    endpoints
        .iter()
        .zip(answers)
        .map(|(ep, answer)| answer.map_err(|e| (ep.rank, e)))
        .collect()
}

/// One pass of the remap loop with every rank ready.
async fn remap_step(
    moed: &MoEDeployment,
    ctx: &Context,
    st: &mut MoEDeploymentStatus,
    doc: &PlacementDocument,
    w: &WorkerCtx<'_>,
    r: &Resolved,
    pending: &mut Pending,
) -> Result<StepOutcome, Error> {
    let (endpoints, token) = (w.endpoints, w.tokens.control.as_str());
    let spec = &moed.spec;
    let (ns, name) = (&r.namespace, &r.name);
    let mut out = StepOutcome {
        view: RemapView::Idle {
            reason: "Balanced".into(),
            message: String::new(),
        },
        problems: Vec::new(),
        fast_requeue: false,
        restart_group: None,
    };
    let answers = join_all(endpoints.iter().map(|e| ctx.workers.status(e))).await;
    let worker_status = match every_rank(endpoints, answers) {
        Ok(v) => v,
        Err((rank, e)) => return Ok(out.workers_unreachable(rank, e)),
    };
    crate::expert_tier::record_served(st.serving.as_mut(), &worker_status, &ctx.metrics, ns, name);
    // A rank holding another token would refuse every remap (and the clients): say which
    // Secret is at fault before anything is driven.
    if let Some(p) = token_secrets::mismatch(&worker_status, w.tokens, r, spec.serving_enabled()) {
        token_secrets::forget(&ctx.token_secrets, r);
        return Ok(out.token_mismatch(p));
    }
    let target = doc.generation;
    let layers_total = st
        .remap
        .as_ref()
        .filter(|x| x.generation == target)
        .map_or(doc.num_layers as u32, |x| x.layers_total);
    let progress = remap::group_progress(&worker_status, target, layers_total);
    if let Some(p) = st.placement.as_mut() {
        p.applied_generation = progress.applied;
    }
    let applied = progress.applied.unwrap_or(0);

    // A remap is in flight: drive it and track it.
    // A failure already recorded (its group restart is waiting for the backoff or the budget)
    // is not recorded again.
    let failure_recorded = st
        .last_remap
        .as_ref()
        .is_some_and(|l| l.generation == target && l.result == "Failed");
    if applied < target {
        let running = st.remap.get_or_insert_with(|| RemapProgressStatus {
            generation: target,
            trigger: "Resumed".into(),
            layers: Vec::new(),
            layers_total,
            layers_done: 0,
            ranks_done: 0,
            par_before: st.imbalance.as_ref().map_or(1.0, |i| i.worst_par),
            par_predicted: st.imbalance.as_ref().map_or(1.0, |i| i.worst_par),
            started_at: now_time(),
        });
        if running.generation != target {
            running.generation = target;
            running.trigger = "Resumed".into();
            running.layers.clear();
        }
        running.layers_done = progress.layers_done;
        running.ranks_done = progress.ranks_done;
        if let Some((rank, message)) = progress.failed {
            let running = running.clone();
            st.remap = None;
            out.restart_group = Some(format!(
                "rank {rank} failed the remap to placement generation {target}: {message}"
            ));
            out.view = RemapView::Idle {
                reason: "RemapFailed".into(),
                message: format!("rank {rank}: {message}"),
            };
            out.fast_requeue = true;
            if failure_recorded {
                return Ok(out);
            }
            let rec = RemapRecord {
                generation: target,
                trigger: running.trigger.clone(),
                layers: running.layers.clone(),
                experts_moved: progress.experts_moved,
                bytes_moved: progress.bytes_moved,
                par_before: running.par_before,
                par_predicted: running.par_predicted,
                par_after: None,
                started_at: running.started_at.clone(),
                finished_at: Some(now_time()),
                result: "Failed".into(),
                message: Some(format!(
                    "rank {rank}: {message}; restarting the group into generation {target}"
                )),
            };
            ctx.metrics
                .remaps
                .with_label_values(&[ns, name, &rec.trigger, "Failed"])
                .inc();
            pending.event(
                EventType::Warning,
                "RemapFailed",
                "Remap",
                format!(
                    "remap to generation {target} failed on rank {rank}: {message}; the group restarts and loads the committed placement"
                ),
            );
            st.last_remap = Some(rec);
            return Ok(out);
        }
        let request = RemapRequest {
            placement: doc.clone(),
            layers: running.layers.iter().map(|&l| l as usize).collect(),
            mode: spec.eplb.mode.into(),
        };
        for &i in &progress.needs_request {
            let Some(ep) = endpoints.get(i) else { continue };
            match ctx.workers.remap(ep, token, &request).await {
                Ok(()) => {}
                // The rank holds another placement under this generation number or a newer
                // one: the committed ConfigMap decides, so the group restarts into it (every
                // rank then serves exactly the committed document).
                Err(e) if e.is_diverged() => {
                    st.remap = None;
                    out.restart_group = Some(format!(
                        "rank {} diverged from the committed placement generation {target}: {e}",
                        ep.rank
                    ));
                    out.view = RemapView::Idle {
                        reason: "RemapConflict".into(),
                        message: format!("rank {}: {e}", ep.rank),
                    };
                    out.fast_requeue = true;
                    pending.event(
                        EventType::Warning,
                        "RemapConflict",
                        "Remap",
                        format!(
                            "rank {} refused placement generation {target} as diverged ({e}); restarting the group into the committed placement",
                            ep.rank
                        ),
                    );
                    return Ok(out);
                }
                // Busy: another remap is finishing on that rank; asked again next poll.
                Err(e) if e.is_conflict() => {}
                // A worker release that reports no token id shows a foreign Secret only here.
                Err(e) if e.is_unauthorized() => {
                    let p = token_secrets::mismatch_problem(
                        r,
                        &Names::new(name).secret,
                        &format!(
                            "rank {} refused the operator's control token ({e}): it holds another token",
                            ep.rank
                        ),
                    );
                    token_secrets::forget(&ctx.token_secrets, r);
                    return Ok(out.token_mismatch(p));
                }
                Err(e) => out.problems.push(Problem::new(
                    "WorkersUnreachable",
                    format!("rank {}: {e}", ep.rank),
                )),
            }
        }
        out.view = RemapView::Running {
            generation: target,
            layers_done: running.layers_done,
            layers_total: running.layers_total,
        };
        out.fast_requeue = true;
        return Ok(out);
    }

    // The group serves the target: close a remap that was running.
    if let Some(running) = st.remap.take() {
        let finished = progress
            .finished_at_ms
            .and_then(|ms| Timestamp::from_millisecond(ms as i64).ok())
            .map_or_else(now_time, Time);
        let restarted = progress.experts_moved == 0 && progress.finished_at_ms.is_none();
        let rec = RemapRecord {
            generation: running.generation,
            trigger: running.trigger.clone(),
            layers: running.layers.clone(),
            experts_moved: progress.experts_moved,
            bytes_moved: progress.bytes_moved,
            par_before: running.par_before,
            par_predicted: running.par_predicted,
            par_after: None,
            started_at: running.started_at,
            finished_at: Some(finished),
            result: if restarted { "Superseded" } else { "Succeeded" }.into(),
            message: restarted.then(|| "the group (re)started into the new placement".to_string()),
        };
        ctx.metrics
            .remaps
            .with_label_values(&[ns, name, &rec.trigger, &rec.result])
            .inc();
        ctx.metrics
            .remap_bytes
            .with_label_values(&[ns, name])
            .inc_by(rec.bytes_moved);
        pending.event(
            EventType::Normal,
            "RemapFinished",
            "Remap",
            format!(
                "placement generation {} serves on every rank: layers {:?}, {} experts ({} bytes) moved, predicted PAR {:.3} (was {:.3})",
                rec.generation, rec.layers, rec.experts_moved, rec.bytes_moved, rec.par_predicted, rec.par_before
            ),
        );
        st.last_remap = Some(rec);
    }

    // Measure.
    let answers = join_all(endpoints.iter().map(|e| ctx.workers.load(e))).await;
    let reports = match every_rank(endpoints, answers) {
        Ok(v) => v,
        Err((rank, e)) => return Ok(out.workers_unreachable(rank, e)),
    };
    let window = reports.iter().map(|r| r.window_steps).min().unwrap_or(0);
    // Counts recorded under an older placement say little about this one.
    let current_counts = reports.iter().all(|r| {
        r.slot_counts.len() == doc.num_layers
            && r.slot_counts.iter().all(|row| row.len() == doc.num_slots())
            && r.layer_generations.iter().all(|&g| g >= target)
    });
    if !current_counts || window == 0 {
        out.view = RemapView::Idle {
            reason: "WaitingForStatistics".into(),
            message: "no statistics recorded under the committed placement yet".into(),
        };
        return Ok(out);
    }
    let summed = moe_api::LoadReport::sum_slot_counts(&reports);
    let layer_par = planning::measured_layer_par(doc, &summed);
    ctx.metrics.set_imbalance(ns, name, &layer_par);
    let summary = remap::summarize(
        &layer_par,
        spec.eplb.imbalance_threshold,
        window,
        Timestamp::now(),
    );
    if remap::imbalance_changed(st.imbalance.as_ref(), &summary) {
        st.imbalance = Some(summary);
    }
    if let Some(last) = st.last_remap.as_mut()
        && last.par_after.is_none()
        && last.result != "Failed"
        && last.generation == target
        && window >= u64::from(spec.eplb.min_window_steps).max(1)
    {
        let after = last
            .layers
            .iter()
            .filter_map(|&l| layer_par.get(l as usize).copied())
            .fold(1.0f64, f64::max);
        last.par_after = Some(remap::round3(after));
    }

    // Decide.
    let decision = remap::decide(&remap::DecisionInput {
        eplb: &spec.eplb,
        remap_request: spec.remap_request.as_deref(),
        last_handled_request: st.last_handled_remap_request.as_deref(),
        last_remap_started: st.last_remap.as_ref().map(|l| l.started_at.0),
        now: Timestamp::now(),
        layer_par: &layer_par,
        window_steps: window,
        remap_in_flight: false,
        group_ready: true,
    });
    let (trigger, layers) = match decision {
        Decision::Hold { reason, message } => {
            out.view = RemapView::Idle {
                reason: reason.into(),
                message,
            };
            return Ok(out);
        }
        Decision::Remap { trigger, layers } => (trigger, layers),
    };
    if trigger == Trigger::Manual {
        st.last_handled_remap_request = spec.remap_request.clone();
    }

    // Plan.
    if !planning::planner_known(&spec.eplb.algorithm) {
        out.view = RemapView::Idle {
            reason: "UnknownAlgorithm".into(),
            message: format!("spec.eplb.algorithm {:?} is unknown", spec.eplb.algorithm),
        };
        return Ok(out);
    }
    let load = planning::logical_load(&reports, doc);
    let past = past_windows(ctx, endpoints, spec.eplb.history_windows).await;
    // Planning is CPU work (the joint planner searches): keep it off the async workers.
    let planned = {
        let (algorithm, spec_c, doc_c, layers_c) = (
            spec.eplb.algorithm.clone(),
            spec.clone(),
            doc.clone(),
            layers.clone(),
        );
        let redundant = r.redundant_experts;
        tokio::task::spawn_blocking(move || {
            planning::plan(
                &algorithm, &spec_c, redundant, &doc_c, &load, &past, &layers_c,
            )
        })
        .await
        .map_err(|e| format!("planner task failed: {e}"))
        .and_then(|p| p)
    };
    let plan = match planned {
        Ok(p) => p,
        Err(e) => {
            out.problems.push(Problem::new(
                "PlannerError",
                format!("spec.eplb.algorithm {:?}: {e}", spec.eplb.algorithm),
            ));
            out.view = RemapView::Idle {
                reason: "PlannerError".into(),
                message: e,
            };
            return Ok(out);
        }
    };
    let before: Vec<(usize, f64)> = plan
        .layers
        .iter()
        .map(|l| (l.layer, l.par_before))
        .collect();
    let predicted: Vec<(usize, f64)> = plan
        .layers
        .iter()
        .map(|l| (l.layer, l.par_predicted))
        .collect();
    let accepted = remap::accept_plan(trigger, &before, &predicted, spec.eplb.hysteresis);
    let expert_bytes = remap::expert_bytes(spec.model.hidden, spec.model.intermediate);
    let with_bytes: Vec<(usize, u64)> = accepted
        .iter()
        .filter_map(|&l| {
            let o = plan.layers.iter().find(|o| o.layer == l)?;
            Some((l, o.moved_slots as u64 * expert_bytes))
        })
        .collect();
    let budget = spec
        .eplb
        .max_bytes_per_remap
        .as_ref()
        .and_then(|q| crate::quantity::parse_bytes(&q.0));
    let chosen = remap::apply_byte_budget(&with_bytes, budget);
    if chosen.is_empty() {
        let reason = if accepted.is_empty() {
            "NoImprovement"
        } else {
            "OverBudget"
        };
        let message = format!(
            "the planner found no remap of layers {layers:?} worth its moves within the budget"
        );
        if trigger == Trigger::Manual {
            // The request is marked handled: tell the person who made it why nothing moved.
            pending.event(
                EventType::Normal,
                "RemapSkipped",
                "Remap",
                format!(
                    "remap request {:?}: {reason}: {message}",
                    spec.remap_request.as_deref().unwrap_or_default()
                ),
            );
        }
        out.view = RemapView::Idle {
            reason: reason.into(),
            message,
        };
        return Ok(out);
    }
    let generation = target + 1;
    let next = planning::restrict(doc, &plan.document, &chosen, generation);
    let par_before = chosen
        .iter()
        .filter_map(|&l| layer_par.get(l).copied())
        .fold(1.0f64, f64::max);
    let par_predicted = chosen
        .iter()
        .filter_map(|&l| predicted.iter().find(|(x, _)| *x == l).map(|p| p.1))
        .fold(1.0f64, f64::max);

    // Persist first: a restarted group or operator resumes from the ConfigMap. Only over the
    // generation this plan started from, guarded by the ConfigMap's resourceVersion: were a
    // second operator (a split leadership) to commit a generation meanwhile, this write fails
    // instead of giving one generation number two placements.
    let cms = Api::<ConfigMap>::namespaced(ctx.client.clone(), ns);
    let cm_name = Names::new(name).configmap;
    let live = cms.get_opt(&cm_name).await?;
    let live_generation = live.as_ref().and_then(parse_document).map(|d| d.generation);
    let changed = |found: String| RemapView::Idle {
        reason: "PlacementChanged".into(),
        message: format!(
            "the committed placement changed while planning ({found}; the plan started from generation {target}): planning again"
        ),
    };
    if live_generation != Some(target) {
        out.view = changed(format!("now generation {live_generation:?}"));
        out.fast_requeue = true;
        return Ok(out);
    }
    let mut cm = resources::placement_configmap(
        r,
        &next,
        w.source_label,
        st.last_handled_remap_request.as_deref(),
    )?;
    cm.metadata.resource_version = live.and_then(|c| c.metadata.resource_version);
    match apply(&cms, &cm_name, &cm).await {
        Ok(_) => {}
        Err(Error::Kube(kube::Error::Api(e))) if e.code == 409 => {
            out.view = changed(format!("written by someone else: {}", e.message));
            out.fast_requeue = true;
            return Ok(out);
        }
        Err(e) => return Err(e),
    }
    if let Some(p) = st.placement.as_mut() {
        p.desired_generation = generation;
    }
    st.remap = Some(RemapProgressStatus {
        generation,
        trigger: trigger.as_str().into(),
        layers: chosen.iter().map(|&l| l as u32).collect(),
        layers_total: chosen.len() as u32,
        layers_done: 0,
        ranks_done: 0,
        par_before: remap::round3(par_before),
        par_predicted: remap::round3(par_predicted),
        started_at: now_time(),
    });
    pending.event(
        EventType::Normal,
        "RemapStarted",
        "Remap",
        format!(
            "{} remap to placement generation {generation}: layers {chosen:?}, predicted worst PAR {:.3} (now {:.3})",
            trigger.as_str(),
            par_predicted,
            par_before
        ),
    );
    info!(%ns, %name, generation, layers = ?chosen, par_before, par_predicted, "remap committed");
    // The status (with the prediction) is written before any worker is asked to move; the next
    // pass drives the workers.
    out.view = RemapView::Running {
        generation,
        layers_done: 0,
        layers_total: chosen.len() as u32,
    };
    out.fast_requeue = true;
    Ok(out)
}

/// [`finish`] for a reconcile that stopped before the workers: requeue after the blocked delay.
async fn finish_blocked(
    moed: &MoEDeployment,
    ctx: &Context,
    old: &MoEDeploymentStatus,
    st: MoEDeploymentStatus,
    observed: &Observed,
    pending: Pending,
) -> Result<Action, Error> {
    let requeue = ctx.settings.blocked_requeue;
    finish(moed, ctx, old, st, observed, pending, requeue).await
}

/// Conditions, phase, status write (only when something changed), events; requeue after
/// `requeue`.
async fn finish(
    moed: &MoEDeployment,
    ctx: &Context,
    old: &MoEDeploymentStatus,
    mut st: MoEDeploymentStatus,
    observed: &Observed,
    pending: Pending,
    requeue: Duration,
) -> Result<Action, Error> {
    let now = now_time();
    let conds = conditions::desired(observed);
    st.conditions = conditions::merge(&old.conditions, &conds, &now, moed.metadata.generation);
    st.phase = Some(conditions::phase(observed).to_string());
    st.ready = Some(format!("{}/{}", st.ready_ranks, st.ranks));
    if &st != old {
        let api: Api<MoEDeployment> = Api::namespaced(
            ctx.client.clone(),
            &moed
                .namespace()
                .ok_or(Error::MissingObjectKey("namespace"))?,
        );
        let patch = serde_json::json!({
            "apiVersion": format!("{}/{}", crate::crd::GROUP, crate::crd::VERSION),
            "kind": crate::crd::KIND,
            "status": st,
        });
        let written = api
            .patch_status(&moed.name_any(), &apply_params(), &Patch::Apply(&patch))
            .await?;
        ctx.remember_own_write(
            moed,
            written.metadata.resource_version,
            Instant::now() + requeue,
        );
    }
    let reference = moed.object_ref(&());
    for ev in pending.events {
        if let Err(e) = ctx.recorder.publish(&ev, &reference).await {
            warn!(error = %e, reason = %ev.reason, "could not publish event");
        }
    }
    Ok(Action::requeue(requeue))
}
