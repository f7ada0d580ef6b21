//! One reconcile pass of a `MoEDeployment`: the entry point with its timing and metrics, and
//! the order of the steps (spec checks, tokens, owned objects, restarts, the remap loop,
//! status), each step in a module of its own beside this one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use tracing::warn;

use super::context::Context;
use super::remap_driver::{Step, WorkerCtx};
use super::restarts::{Desired, GroupCtx};
use super::status::{Notes, finish, finish_blocked, report_refusal};
use super::{owned, placement_source, pods, restarts, status};
use crate::conditions::{self, Observed, Problem};
use crate::crd::{MoEDeployment, PlacementStatus};
use crate::error::Error;
use crate::metrics::CONTROLLER;
use crate::planning;
use crate::resources::{self, Names, Resolved};
use crate::token_secrets::{self, Tokens};

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
    let mut notes = Notes::new(&old);
    let names = Names::new(&name);
    let client = ctx.client.clone();

    // 1. The spec.
    if let Err(blocked) = check_spec(spec, &mut notes) {
        let observed = Observed::blocked(st.ranks, notes.problems, blocked);
        return finish_blocked(moed, ctx, &old, st, &observed, notes.pending).await;
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
        notes.problem(p, "Apply");
        let observed = Observed::blocked(
            st.ranks,
            notes.problems,
            "an object name the operator needs is taken",
        );
        return finish_blocked(moed, ctx, &old, st, &observed, notes.pending).await;
    }

    // 2. The committed placement.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let committed =
        placement_source::commit_placement(&cms, &resolved, spec, &mut st, &mut notes).await?;
    let Some(doc) = committed.doc else {
        // Nothing the workers could load: do not create them.
        let observed = Observed::blocked(st.ranks, notes.problems, "no committed placement");
        return finish_blocked(moed, ctx, &old, st, &observed, notes.pending).await;
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
    let sts = owned::apply_group_objects(&client, &resolved, spec).await?;
    let desired = Desired {
        spec_hash: resources::desired_spec_hash(&sts).unwrap_or_default(),
        template_hash: resources::desired_group_hash(&sts).unwrap_or_default(),
    };

    // 4. The group: replace it as a whole when its spec changed, or when a rank failed (within
    //    the restart budget, after the backoff).
    let all_pods = restarts::list_pods(ctx, &resolved).await?;
    let mut group = GroupCtx::new(ctx, &resolved, spec);
    let pods = group
        .reconcile_pods(&all_pods, spec, &desired, &mut st, &mut notes)
        .await?;
    pods::report_pod_problems(
        &client,
        &resolved,
        spec,
        &all_pods,
        pods.restarting,
        &mut notes,
    )
    .await?;
    let ready_pods: Vec<&Pod> = pods
        .current
        .iter()
        .copied()
        .filter(|p| pods::pod_ready(p))
        .collect();
    let per_pod = spec.ranks_per_pod() as usize;
    st.ready_ranks = (ready_pods.len() * per_pod).min(st.ranks as usize) as u32;
    ctx.metrics
        .ready_ranks
        .with_label_values(&[&ns, &name])
        .set(i64::from(st.ready_ranks));

    // 5. The remap loop, while every rank is ready.
    let endpoints = pods::rank_endpoints(&ready_pods, per_pod, spec.worker.http_port);
    let workers = WorkerCtx {
        endpoints: &endpoints,
        tokens: &tokens,
        source_label: committed.source_label.as_deref().unwrap_or(""),
    };
    let step = Step {
        ctx,
        spec,
        doc: &doc,
        workers: &workers,
        r: &resolved,
    };
    let group_up =
        !pods.restarting && !group.broken() && st.ready_ranks == st.ranks && st.ranks > 0;
    let (remap_view, mut requeue) = step
        .pass(group_up, &mut group, &pods.current, &mut st, &mut notes)
        .await?;
    if let Some(wake) = group.wake_in {
        requeue = requeue.min(wake.max(Duration::from_secs(1)));
    }
    status::publish_generations(ctx, &resolved, &st);

    let observed = Observed {
        ranks: st.ranks,
        ready_ranks: st.ready_ranks,
        restarting: pods.restarting || group.restarted,
        blocked: false,
        restart_pending: group.pending_restart,
        restart_held: group.held_restart,
        fleet_wait: group.fleet_wait,
        problems: notes.problems,
        remap: remap_view,
    };
    finish(moed, ctx, &old, st, &observed, notes.pending, requeue).await
}

/// The spec's own checks. `Err`: the spec is invalid and nothing may be done (why, for
/// `Progressing`). An unknown planner does not stop the workers: it holds remaps and says why.
fn check_spec(
    spec: &crate::crd::MoEDeploymentSpec,
    notes: &mut Notes<'_>,
) -> Result<(), &'static str> {
    if let Err(e) = spec.validate() {
        notes
            .problems
            .push(Problem::new("InvalidSpec", e.to_string()));
        let reported = notes.old.conditions.iter().any(|c| {
            c.type_ == conditions::DEGRADED && c.reason == "InvalidSpec" && c.status == "True"
        });
        if !reported {
            notes
                .pending
                .event(EventType::Warning, "InvalidSpec", "Validate", e.to_string());
        }
        return Err("the spec is invalid");
    }
    if !planning::planner_known(&spec.eplb.algorithm) {
        let p = Problem::new(
            "UnknownAlgorithm",
            format!(
                "spec.eplb.algorithm {:?} is not a planner of this operator: use {}",
                spec.eplb.algorithm,
                planning::ALGORITHMS.join(", ")
            ),
        );
        notes.problem(p, "Validate");
    }
    Ok(())
}
