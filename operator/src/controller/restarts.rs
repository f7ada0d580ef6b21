//! Whole-group restarts: a group is replaced as a whole (every rank together) when its worker
//! spec changed or a rank failed, within the restart budget, after the backoff, and within the
//! fleet-wide restart limit.

use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams};
use kube::runtime::events::EventType;
use tracing::{info, warn};

use super::context::Context;
use super::pods::{pod_hash, pod_spec_stale, rank_pods};
use super::status::{Notes, Pending, now_time};
use crate::conditions::{self, Problem};
use crate::crd::{GroupRestartRecord, MoEDeploymentSpec, MoEDeploymentStatus, RankPod};
use crate::error::Error;
use crate::group::{self, Gate, RankFailure, RestartReason};
use crate::resources::{self, Resolved};

/// The hashes of the StatefulSet's pod template: the spec hash decides restarts; the template
/// hash only says whether pods run the operator's current template (its defaults may have
/// changed since they were made).
pub(super) struct Desired {
    pub spec_hash: String,
    pub template_hash: String,
}

/// The group's pods as this pass found and left them.
pub(super) struct GroupPods<'p> {
    /// Pods of the current spec (none once the group restarted in this pass).
    pub current: Vec<&'p Pod>,
    /// The group is being replaced in this pass (stale pods deleted, pods terminating, or a
    /// restart just made).
    pub restarting: bool,
}

/// Every pod of the group, terminating ones included.
pub(super) async fn list_pods(ctx: &Context, r: &Resolved) -> Result<Vec<Pod>, Error> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &r.namespace);
    Ok(api
        .list(&ListParams::default().labels(&resources::selector_string(&r.name)))
        .await?
        .items)
}

/// Whole-group restarts of one reconcile.
/// Whole-group restarts of one reconcile.
pub(super) struct GroupCtx<'a> {
    api: Api<Pod>,
    ctx: &'a Context,
    ns: &'a str,
    name: &'a str,
    ranks: u32,
    policy: &'a crate::crd::GroupRestartPolicy,
    /// The operator deleted the group's pods in this pass.
    pub restarted: bool,
    /// A failure waits for the backoff (message for `Progressing/RestartBackoff`).
    pub pending_restart: Option<String>,
    /// A failure is held: the restart budget is used up.
    pub held_restart: Option<String>,
    /// A restart waits for the fleet-wide restart limit (message for `Progressing`).
    pub fleet_wait: Option<String>,
    /// Reconcile again after this long (backoff over, budget freed).
    pub wake_in: Option<Duration>,
}

impl<'a> GroupCtx<'a> {
    pub(super) fn new(ctx: &'a Context, r: &'a Resolved, spec: &'a MoEDeploymentSpec) -> Self {
        Self {
            api: Api::namespaced(ctx.client.clone(), &r.namespace),
            ctx,
            ns: &r.namespace,
            name: &r.name,
            ranks: spec.expert_parallel.ranks,
            policy: &spec.group_restart_policy,
            restarted: false,
            pending_restart: None,
            held_restart: None,
            fleet_wait: None,
            wake_in: None,
        }
    }

    /// A rank failed and its group restart waits (backoff, budget, fleet limit): remaps hold.
    pub(super) fn broken(&self) -> bool {
        self.pending_restart.is_some() || self.held_restart.is_some()
    }

    /// A rank failure: restart the group now, or say why not (backoff, budget).
    pub(super) async fn failed(
        &mut self,
        failure: &RankFailure,
        pods: &[&Pod],
        st: &mut MoEDeploymentStatus,
        notes: &mut Notes<'_>,
    ) -> Result<(), Error> {
        let now = Timestamp::now();
        let recent: Vec<Timestamp> = st.recent_group_restarts.iter().map(|t| t.0).collect();
        match group::gate(self.policy, &recent, now) {
            Gate::Restart => {
                if self.fleet_grant(notes, &failure.message, true) {
                    self.restart(failure, pods, st, &mut notes.pending).await?;
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
                let was_held = notes.old.conditions.iter().any(|c| {
                    c.type_ == conditions::DEGRADED
                        && c.status == "True"
                        && c.reason == "RestartBudgetExhausted"
                });
                if !was_held {
                    warn!(ns = %self.ns, name = %self.name, reason = failure.reason.as_str(), "group restart budget exhausted");
                    notes.pending.event(
                        EventType::Warning,
                        "RestartBudgetExhausted",
                        "RestartGroup",
                        message.clone(),
                    );
                }
                notes
                    .problems
                    .insert(0, Problem::new("RestartBudgetExhausted", message));
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
    fn fleet_grant(&mut self, notes: &mut Notes<'_>, what: &str, failed: bool) -> bool {
        let grant = self.ctx.restart_limiter.try_acquire(Instant::now());
        let (Some(message), crate::fleet::Grant::Wait { wait, .. }) = (grant.message(what), grant)
        else {
            return true;
        };
        info!(ns = %self.ns, name = %self.name, wait = ?wait, "group restart waits for the fleet-wide limit");
        if !notes.had_condition(conditions::PROGRESSING, "FleetRestartLimit") {
            notes.pending.event(
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
        st: &mut MoEDeploymentStatus,
        pending: &mut Pending,
    ) -> Result<(), Error> {
        for p in pods {
            delete_pod(&self.api, p).await?;
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
        self.ctx
            .metrics
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

async fn delete_pod(api: &Api<Pod>, pod: &Pod) -> Result<(), Error> {
    match api.delete(&pod.name_any(), &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

impl GroupCtx<'_> {
    /// The group's pods against the desired spec: replace the group as a whole when its spec
    /// hash changed, or when a rank failed (within the restart budget, after the backoff).
    pub(super) async fn reconcile_pods<'p>(
        &mut self,
        pods: &'p [Pod],
        spec: &MoEDeploymentSpec,
        desired: &Desired,
        st: &mut MoEDeploymentStatus,
        notes: &mut Notes<'_>,
    ) -> Result<GroupPods<'p>, Error> {
        let live: Vec<&Pod> = pods
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect();
        let stale: Vec<&Pod> = live
            .iter()
            .copied()
            .filter(|p| pod_spec_stale(p, &desired.spec_hash))
            .collect();
        let terminating = pods.len() > live.len();
        let now = Timestamp::now();
        let recorded_times: Vec<Timestamp> = notes
            .old
            .recent_group_restarts
            .iter()
            .map(|t| t.0)
            .collect();
        st.recent_group_restarts = group::recent_restarts(self.policy, &recorded_times, now)
            .into_iter()
            .map(Time)
            .collect();
        let mut current: Vec<&Pod> = live
            .iter()
            .copied()
            .filter(|p| !pod_spec_stale(p, &desired.spec_hash))
            .collect();
        note_outdated_template(&current, &desired.template_hash, st, notes);
        // Replacing stale pods is a group restart too: it waits for the fleet-wide limit.
        let stale_waits =
            !stale.is_empty() && !self.fleet_grant(notes, "the worker spec changed", false);
        if stale_waits {
            // Nothing deleted, nothing recorded: the next reconcile after the wait does it all.
        } else if !stale.is_empty() {
            self.replace_stale(&stale, desired, st, notes).await?;
        } else {
            self.check_rank_failures(&current, spec, desired, st, notes)
                .await?;
        }
        if self.restarted {
            current.clear();
        }
        if !stale_waits {
            st.group_hash = Some(desired.spec_hash.clone());
        }
        Ok(GroupPods {
            current,
            restarting: restarting_now(&stale, stale_waits, terminating, self.restarted),
        })
    }

    /// Deletes the pods of an older spec (the StatefulSet makes them anew), recording the
    /// group restart once per spec change.
    async fn replace_stale(
        &mut self,
        stale: &[&Pod],
        desired: &Desired,
        st: &mut MoEDeploymentStatus,
        notes: &mut Notes<'_>,
    ) -> Result<(), Error> {
        if notes.old.group_hash.as_deref() != Some(desired.spec_hash.as_str()) {
            let failure = RankFailure {
                reason: RestartReason::SpecChanged,
                message: "the worker spec changed".into(),
            };
            self.restart(&failure, &[], st, &mut notes.pending).await?;
        }
        for p in stale {
            delete_pod(&self.api, p).await?;
        }
        st.rank_pods.clear();
        Ok(())
    }

    /// Compares the pods with the record of the group's ranks: a rank whose pod was replaced
    /// or whose container restarted is a failure of the whole group.
    async fn check_rank_failures(
        &mut self,
        current: &[&Pod],
        spec: &MoEDeploymentSpec,
        desired: &Desired,
        st: &mut MoEDeploymentStatus,
        notes: &mut Notes<'_>,
    ) -> Result<(), Error> {
        // The record belongs to this group hash only.
        let recorded: &[RankPod] =
            if notes.old.group_hash.as_deref() == Some(desired.spec_hash.as_str()) {
                &notes.old.rank_pods
            } else {
                &[]
            };
        let seen = rank_pods(current, spec.ranks_per_pod());
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
            Some(f) => self.failed(&f, current, st, notes).await?,
        }
        Ok(())
    }
}

/// Pods of the current spec on an older template: reported, applied on request or at the
/// group's next own restart.
fn note_outdated_template(
    current: &[&Pod],
    desired_template: &str,
    st: &mut MoEDeploymentStatus,
    notes: &mut Notes<'_>,
) {
    let outdated = current
        .iter()
        .filter(|p| pod_hash(p) != Some(desired_template))
        .count();
    st.outdated_template = (outdated > 0).then(|| {
        format!(
            "{outdated} pod(s) run an older pod template than the operator's current one ({desired_template}: its defaults changed, e.g. the worker image); it applies at the group's next restart, or now by changing the annotation {} on this MoEDeployment",
            resources::ROLLOUT_ANNOTATION
        )
    });
    if st.outdated_template.is_some() && notes.old.outdated_template.is_none() {
        notes.pending.event(
            EventType::Normal,
            "TemplateOutdated",
            "Observe",
            st.outdated_template.clone().unwrap_or_default(),
        );
    }
}
