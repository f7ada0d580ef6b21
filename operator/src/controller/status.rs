//! The end of a pass: conditions and phase from what was observed, the status write (only
//! when something changed), and the events collected on the way.

use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use tracing::warn;

use super::context::Context;
use super::owned::apply_params;
use crate::conditions::{self, Observed, Problem};
use crate::crd::{MoEDeployment, MoEDeploymentStatus};
use crate::error::Error;
use crate::resources::Resolved;

/// Events of one pass, published after the status write.
#[derive(Default)]
pub(super) struct Pending {
    events: Vec<Event>,
}

impl Pending {
    pub(super) fn event(&mut self, type_: EventType, reason: &str, action: &str, note: String) {
        self.events.push(Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        });
    }

    /// A Warning event for a problem, only on the transition: while a condition already
    /// carries the problem's reason, it says so without another event.
    pub(super) fn warn_on_transition(
        &mut self,
        old: &MoEDeploymentStatus,
        problem: &Problem,
        action: &str,
    ) {
        if old.conditions.iter().all(|c| c.reason != problem.reason) {
            self.event(
                EventType::Warning,
                &problem.reason,
                action,
                problem.message.clone(),
            );
        }
    }
}

/// What one pass notes on its way for its end: the status it started from (events fire on
/// transitions from it), the events and the problems.
pub(super) struct Notes<'a> {
    pub old: &'a MoEDeploymentStatus,
    pub pending: Pending,
    pub problems: Vec<Problem>,
}

impl<'a> Notes<'a> {
    pub(super) fn new(old: &'a MoEDeploymentStatus) -> Self {
        Self {
            old,
            pending: Pending::default(),
            problems: Vec::new(),
        }
    }

    /// A problem for the conditions, with a Warning event when it is new.
    pub(super) fn problem(&mut self, problem: Problem, action: &str) {
        self.pending.warn_on_transition(self.old, &problem, action);
        self.problems.push(problem);
    }

    /// Whether the status this pass started from has a condition of this type and reason.
    pub(super) fn had_condition(&self, type_: &str, reason: &str) -> bool {
        self.old
            .conditions
            .iter()
            .any(|c| c.type_ == type_ && c.reason == reason)
    }
}

pub(super) fn now_time() -> Time {
    Time(Timestamp::now())
}

/// The committed (desired) and served (applied) placement generations as metrics.
pub(super) fn publish_generations(ctx: &Context, r: &Resolved, st: &MoEDeploymentStatus) {
    let (ns, name) = (r.namespace.as_str(), r.name.as_str());
    if let Some(p) = &st.placement {
        let g = &ctx.metrics.placement_generation;
        g.with_label_values(&[ns, name, "desired"])
            .set(p.desired_generation as i64);
        if let Some(a) = p.applied_generation {
            g.with_label_values(&[ns, name, "applied"]).set(a as i64);
        }
    }
}

/// A refused owned-object apply: `Degraded` with the refusal (and `Stalled` for a 403 or 422,
/// which need a fix), a Warning event on the transition. The rest of the status stays as it was.
pub(super) async fn report_refusal(
    moed: &MoEDeployment,
    ctx: &Context,
    refusal: &crate::apply_refusal::Refusal,
) -> Result<Action, Error> {
    let old = moed.status.clone().unwrap_or_default();
    let mut st = old.clone();
    st.observed_generation = moed.metadata.generation;
    st.ranks = moed.spec.expert_parallel.ranks;
    let problem = refusal.problem();
    let mut pending = Pending::default();
    pending.warn_on_transition(&old, &problem, "Apply");
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

/// [`finish`] for a reconcile that stopped before the workers: requeue after the blocked delay.
pub(super) async fn finish_blocked(
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
pub(super) async fn finish(
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
