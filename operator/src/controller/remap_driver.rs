//! The remap loop, one pass with every rank ready: drive a remap in flight and track it; once
//! the group serves the committed placement, measure the load, decide whether to remap, plan,
//! persist the new placement (first: a restarted group or operator resumes from it), and let
//! the next pass drive the workers.

use std::time::Duration;

use futures::future::join_all;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::Api;
use kube::runtime::events::EventType;
use moe_api::{LoadReport, PlacementDocument, RemapRequest};
use tracing::{info, warn};

use super::context::Context;
use super::owned::apply;
use super::placement_source::parse_document;
use super::restarts::GroupCtx;
use super::status::{Notes, Pending, now_time};
use crate::conditions::{Problem, RemapView};
use crate::crd::{MoEDeploymentSpec, MoEDeploymentStatus, RemapProgressStatus, RemapRecord};
use crate::error::Error;
use crate::group::{RankFailure, RestartReason};
use crate::planning;
use crate::remap::{self, Decision, GroupProgress, Trigger};
use crate::resources::{self, Names, Resolved};
use crate::token_secrets::{self, TOKEN_MISMATCH, Tokens};
use crate::workers::{Endpoint, WorkerError};

/// How to reach the ranks, and what the committed placement came from.
pub(super) struct WorkerCtx<'a> {
    pub endpoints: &'a [Endpoint],
    /// The deployment's derived tokens (the control token for remaps; both to compare with
    /// what the ranks hold).
    pub tokens: &'a Tokens,
    pub source_label: &'a str,
}

/// What one pass of the remap loop found.
pub(super) struct StepOutcome {
    view: RemapView,
    problems: Vec<Problem>,
    fast_requeue: bool,
    /// A plan was just committed: the next pass, which asks the ranks to move, comes at once.
    drive_now: bool,
    /// Restart the group (a rank failed a remap): why.
    restart_group: Option<String>,
}

impl StepOutcome {
    fn idle(reason: &str, message: String) -> Self {
        Self {
            view: RemapView::Idle {
                reason: reason.into(),
                message,
            },
            problems: Vec::new(),
            fast_requeue: false,
            drive_now: false,
            restart_group: None,
        }
    }

    /// The pass stops: a rank did not answer.
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

    /// The pass stops: a rank holds another token than the operator derived.
    fn token_mismatch(mut self, p: Problem) -> Self {
        self.mark_token_mismatch(p);
        self
    }

    fn mark_token_mismatch(&mut self, p: Problem) {
        self.view = RemapView::Idle {
            reason: TOKEN_MISMATCH.into(),
            message: "a rank holds another token than the operator: see Degraded".into(),
        };
        self.problems.push(p);
    }

    /// The view, and come back after the remap poll (progress to track, or planning again).
    fn soon(mut self, view: RemapView) -> Self {
        self.view = view;
        self.fast_requeue = true;
        self
    }

    /// A plan is committed (ConfigMap written; the status with the prediction is written at
    /// the end of this pass): the ranks are asked in the next pass, right after that write, not
    /// a remap poll later. The plan was made on the newest window; every second before the
    /// workers get it, the traffic moves on (measured: 2 s of a 2.2-s plan-to-landing time,
    /// docs/benchmarks/eplb-live-loop.md).
    fn committed(mut self, view: RemapView) -> Self {
        self.drive_now = true;
        self.soon(view)
    }

    /// Moves the step's problems into `notes` and returns when the next pass is due (at most
    /// `requeue`). One slow or failed poll is not a degraded group: WorkersUnreachable becomes
    /// a problem only when the previous pass could not reach the workers either (the
    /// Rebalancing condition records it); meanwhile the next poll comes sooner.
    fn settle(
        &mut self,
        mut requeue: Duration,
        remap_poll: Duration,
        notes: &mut Notes<'_>,
    ) -> Duration {
        let unreachable_before =
            notes.had_condition(crate::conditions::REBALANCING, "WorkersUnreachable");
        for p in std::mem::take(&mut self.problems) {
            if p.reason == "WorkersUnreachable" && !unreachable_before {
                requeue = requeue.min(remap_poll);
                continue;
            }
            if p.reason == TOKEN_MISMATCH {
                // With a Warning event on the transition.
                notes.problem(p, "Authenticate");
                continue;
            }
            notes.problems.push(p);
        }
        if self.fast_requeue {
            requeue = remap_poll;
        }
        if self.drive_now {
            requeue = Duration::ZERO;
        }
        requeue
    }
}

/// The Rebalancing view while the remap loop cannot run (not every rank is ready).
fn view_while_down(st: &MoEDeploymentStatus, broken: bool) -> RemapView {
    match &st.remap {
        Some(r) => RemapView::Running {
            generation: r.generation,
            layers_done: r.layers_done,
            layers_total: r.layers_total,
        },
        None => RemapView::Idle {
            reason: "GroupNotReady".into(),
            message: if broken {
                "a rank failed: the group must restart before remaps continue".into()
            } else {
                "waiting for every rank to be ready".into()
            },
        },
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

/// One pass of the remap loop over a group whose ranks are all ready.
pub(super) struct Step<'a> {
    pub ctx: &'a Context,
    pub spec: &'a MoEDeploymentSpec,
    /// The committed placement.
    pub doc: &'a PlacementDocument,
    pub workers: &'a WorkerCtx<'a>,
    pub r: &'a Resolved,
}

/// The group's load as measured under the committed placement.
struct Measured {
    reports: Vec<LoadReport>,
    window: u64,
    layer_par: Vec<f64>,
}

/// The layers a plan moves, the document it moves them to, and its PAR before and after.
struct Chosen {
    trigger: Trigger,
    layers: Vec<usize>,
    next: PlacementDocument,
    par_before: f64,
    par_predicted: f64,
    /// Windows planned on (the current one and the closed ones before it).
    history_windows: u32,
    /// Why the closed windows could not be read, when they could not.
    history_failure: Option<String>,
}

impl Step<'_> {
    /// The remap loop's part of a pass: a step when the group is up and every rank has an
    /// endpoint, and a group restart when a rank failed the remap. Returns the Rebalancing view
    /// and when the next pass is due.
    pub(super) async fn pass(
        &self,
        group_up: bool,
        group: &mut GroupCtx<'_>,
        current: &[&Pod],
        st: &mut MoEDeploymentStatus,
        notes: &mut Notes<'_>,
    ) -> Result<(RemapView, Duration), Error> {
        let poll = Duration::from_secs(u64::from(self.spec.eplb.poll_interval_seconds.max(1)));
        if !(group_up && self.workers.endpoints.len() == st.ranks as usize) {
            return Ok((view_while_down(st, group.broken()), poll));
        }
        let mut outcome = self.run(st, &mut notes.pending).await?;
        let requeue = outcome.settle(poll, self.ctx.settings.remap_poll, notes);
        if let Some(message) = outcome.restart_group.take() {
            let failure = RankFailure {
                reason: RestartReason::RemapFailed,
                message,
            };
            group.failed(&failure, current, st, notes).await?;
        }
        Ok((outcome.view, requeue))
    }

    async fn run(
        &self,
        st: &mut MoEDeploymentStatus,
        pending: &mut Pending,
    ) -> Result<StepOutcome, Error> {
        let (ctx, endpoints) = (self.ctx, self.workers.endpoints);
        let (ns, name) = (&self.r.namespace, &self.r.name);
        let out = StepOutcome::idle("Balanced", String::new());
        let answers = join_all(endpoints.iter().map(|e| ctx.workers.status(e))).await;
        let worker_status = match every_rank(endpoints, answers) {
            Ok(v) => v,
            Err((rank, e)) => return Ok(out.workers_unreachable(rank, e)),
        };
        crate::expert_tier::record_served(
            st.serving.as_mut(),
            &worker_status,
            &ctx.metrics,
            ns,
            name,
        );
        // A rank holding another token would refuse every remap (and the clients): say which
        // Secret is at fault before anything is driven.
        if let Some(p) = token_secrets::mismatch(
            &worker_status,
            self.workers.tokens,
            self.r,
            self.spec.serving_enabled(),
        ) {
            token_secrets::forget(&ctx.token_secrets, self.r);
            return Ok(out.token_mismatch(p));
        }
        let target = self.doc.generation;
        let layers_total = st
            .remap
            .as_ref()
            .filter(|x| x.generation == target)
            .map_or(self.doc.num_layers as u32, |x| x.layers_total);
        let progress = remap::group_progress(&worker_status, target, layers_total);
        if let Some(p) = st.placement.as_mut() {
            p.applied_generation = progress.applied;
        }
        if progress.applied.unwrap_or(0) < target {
            return Ok(self
                .drive_in_flight(st, &progress, layers_total, pending, out)
                .await);
        }
        self.close_finished(st, &progress, pending);
        let measured = match self.measure(st).await {
            Ok(m) => m,
            Err(out) => return Ok(out),
        };
        let (trigger, layers) = match self.decide(st, &measured) {
            Ok(d) => d,
            Err(out) => return Ok(out),
        };
        let chosen = match self.choose(&measured, trigger, layers, pending).await {
            Ok(c) => c,
            Err(out) => return Ok(out),
        };
        self.commit(st, chosen, pending, out).await
    }

    /// A remap is in flight: drive it and track it.
    async fn drive_in_flight(
        &self,
        st: &mut MoEDeploymentStatus,
        progress: &GroupProgress,
        layers_total: u32,
        pending: &mut Pending,
        mut out: StepOutcome,
    ) -> StepOutcome {
        let target = self.doc.generation;
        // A failure already recorded (its group restart is waiting for the backoff or the
        // budget) is not recorded again.
        let failure_recorded = st
            .last_remap
            .as_ref()
            .is_some_and(|l| l.generation == target && l.result == "Failed");
        let running = st.remap.get_or_insert_with(|| RemapProgressStatus {
            generation: target,
            trigger: "Resumed".into(),
            layers: Vec::new(),
            layers_total,
            layers_done: 0,
            ranks_done: 0,
            par_before: st.imbalance.as_ref().map_or(1.0, |i| i.worst_par),
            par_predicted: st.imbalance.as_ref().map_or(1.0, |i| i.worst_par),
            history_windows: None,
            started_at: now_time(),
        });
        if running.generation != target {
            running.generation = target;
            running.trigger = "Resumed".into();
            running.layers.clear();
        }
        running.layers_done = progress.layers_done;
        running.ranks_done = progress.ranks_done;
        if let Some((rank, message)) = &progress.failed {
            let running = running.clone();
            st.remap = None;
            out.restart_group = Some(format!(
                "rank {rank} failed the remap to placement generation {target}: {message}"
            ));
            out = out.soon(RemapView::Idle {
                reason: "RemapFailed".into(),
                message: format!("rank {rank}: {message}"),
            });
            if !failure_recorded {
                self.record_failed(st, &running, progress, *rank, message, pending);
            }
            return out;
        }
        let view = RemapView::Running {
            generation: target,
            layers_done: running.layers_done,
            layers_total: running.layers_total,
        };
        let request = RemapRequest {
            placement: self.doc.clone(),
            layers: running.layers.iter().map(|&l| l as usize).collect(),
            mode: self.spec.eplb.mode.into(),
        };
        if let Some(diverged) = self.request_remap(&request, progress, &mut out).await {
            st.remap = None;
            pending.event(EventType::Warning, "RemapConflict", "Remap", diverged.event);
            out.restart_group = Some(diverged.restart);
            return out.soon(diverged.view);
        }
        if out.problems.iter().any(|p| p.reason == TOKEN_MISMATCH) {
            return out;
        }
        out.soon(view)
    }

    /// Asks every rank that has not accepted the target yet to remap; a rank that holds
    /// another placement under this generation number (or a newer one) diverged.
    async fn request_remap(
        &self,
        request: &RemapRequest,
        progress: &GroupProgress,
        out: &mut StepOutcome,
    ) -> Option<Diverged> {
        let target = self.doc.generation;
        for &i in &progress.needs_request {
            let Some(ep) = self.workers.endpoints.get(i) else {
                continue;
            };
            match self
                .ctx
                .workers
                .remap(ep, &self.workers.tokens.control, request)
                .await
            {
                Ok(()) => {}
                // The rank holds another placement under this generation number or a newer
                // one: the committed ConfigMap decides, so the group restarts into it (every
                // rank then serves exactly the committed document).
                Err(e) if e.is_diverged() => {
                    return Some(Diverged {
                        restart: format!(
                            "rank {} diverged from the committed placement generation {target}: {e}",
                            ep.rank
                        ),
                        view: RemapView::Idle {
                            reason: "RemapConflict".into(),
                            message: format!("rank {}: {e}", ep.rank),
                        },
                        event: format!(
                            "rank {} refused placement generation {target} as diverged ({e}); restarting the group into the committed placement",
                            ep.rank
                        ),
                    });
                }
                // Busy: another remap is finishing on that rank; asked again next poll.
                Err(e) if e.is_conflict() => {}
                // A worker release that reports no token id shows a foreign Secret only here;
                // the other ranks would refuse the same token.
                Err(e) if e.is_unauthorized() => {
                    out.mark_token_mismatch(token_secrets::mismatch_problem(
                        self.r,
                        &Names::new(&self.r.name).secret,
                        &format!(
                            "rank {} refused the operator's control token ({e}): it holds another token",
                            ep.rank
                        ),
                    ));
                    token_secrets::forget(&self.ctx.token_secrets, self.r);
                    return None;
                }
                Err(e) => out.problems.push(Problem::new(
                    "WorkersUnreachable",
                    format!("rank {}: {e}", ep.rank),
                )),
            }
        }
        None
    }

    /// Records a remap a rank reported failed (the group restarts into the committed
    /// placement).
    fn record_failed(
        &self,
        st: &mut MoEDeploymentStatus,
        running: &RemapProgressStatus,
        progress: &GroupProgress,
        rank: usize,
        message: &str,
        pending: &mut Pending,
    ) {
        let (ns, name) = (&self.r.namespace, &self.r.name);
        let target = self.doc.generation;
        let rec = finished_record(
            running,
            progress,
            now_time(),
            "Failed",
            Some(format!(
                "rank {rank}: {message}; restarting the group into generation {target}"
            )),
        );
        self.ctx
            .metrics
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
    }

    /// The group serves the target: close a remap that was running.
    fn close_finished(
        &self,
        st: &mut MoEDeploymentStatus,
        progress: &GroupProgress,
        pending: &mut Pending,
    ) {
        let Some(running) = st.remap.take() else {
            return;
        };
        let (ns, name) = (&self.r.namespace, &self.r.name);
        let finished = progress
            .finished_at_ms
            .and_then(|ms| Timestamp::from_millisecond(ms as i64).ok())
            .map_or_else(now_time, Time);
        let restarted = progress.experts_moved == 0 && progress.finished_at_ms.is_none();
        let rec = finished_record(
            &running,
            progress,
            finished,
            if restarted { "Superseded" } else { "Succeeded" },
            restarted.then(|| "the group (re)started into the new placement".to_string()),
        );
        let metrics = &self.ctx.metrics;
        metrics
            .remaps
            .with_label_values(&[ns, name, &rec.trigger, &rec.result])
            .inc();
        metrics
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

    /// The load under the committed placement: imbalance into status and metrics, and the
    /// PAR after the last remap once its window is long enough. `Err`: the pass stops here.
    async fn measure(&self, st: &mut MoEDeploymentStatus) -> Result<Measured, StepOutcome> {
        let (ctx, endpoints, doc, spec) = (self.ctx, self.workers.endpoints, self.doc, self.spec);
        let (ns, name) = (&self.r.namespace, &self.r.name);
        let target = doc.generation;
        let out = StepOutcome::idle("Balanced", String::new());
        let answers = join_all(endpoints.iter().map(|e| ctx.workers.load(e))).await;
        let reports = match group_reports(endpoints, answers) {
            Ok(v) => v,
            Err((rank, e)) => return Err(out.workers_unreachable(rank, e)),
        };
        let window = reports.iter().map(|r| r.window_steps).min().unwrap_or(0);
        // Counts recorded under an older placement say little about this one.
        let current_counts = reports.iter().all(|r| {
            r.slot_counts.len() == doc.num_layers
                && r.slot_counts.iter().all(|row| row.len() == doc.num_slots())
                && r.layer_generations.iter().all(|&g| g >= target)
        });
        if !current_counts || window == 0 {
            return Err(StepOutcome::idle(
                "WaitingForStatistics",
                "no statistics recorded under the committed placement yet".into(),
            ));
        }
        let summed = LoadReport::sum_slot_counts(&reports);
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
        Ok(Measured {
            reports,
            window,
            layer_par,
        })
    }

    /// Whether to remap, which layers, and why (the trigger). `Err`: hold, and why. A manual
    /// request is marked handled once acted on.
    fn decide(
        &self,
        st: &mut MoEDeploymentStatus,
        m: &Measured,
    ) -> Result<(Trigger, Vec<usize>), StepOutcome> {
        let spec = self.spec;
        let decision = remap::decide(&remap::DecisionInput {
            eplb: &spec.eplb,
            remap_request: spec.remap_request.as_deref(),
            last_handled_request: st.last_handled_remap_request.as_deref(),
            last_remap_ended: st
                .last_remap
                .as_ref()
                .map(|l| l.finished_at.as_ref().unwrap_or(&l.started_at).0),
            now: Timestamp::now(),
            layer_par: &m.layer_par,
            window_steps: m.window,
            remap_in_flight: false,
            group_ready: true,
        });
        let (trigger, layers) = match decision {
            Decision::Hold { reason, message } => return Err(StepOutcome::idle(reason, message)),
            Decision::Remap { trigger, layers } => (trigger, layers),
        };
        if trigger == Trigger::Manual {
            st.last_handled_remap_request = spec.remap_request.clone();
        }
        Ok((trigger, layers))
    }

    /// Plans `layers` and keeps those worth their moves within the byte budget. `Err`: no
    /// remap in this pass, and why.
    async fn choose(
        &self,
        m: &Measured,
        trigger: Trigger,
        layers: Vec<usize>,
        pending: &mut Pending,
    ) -> Result<Chosen, StepOutcome> {
        let spec = self.spec;
        if !planning::planner_known(&spec.eplb.algorithm) {
            return Err(StepOutcome::idle(
                "UnknownAlgorithm",
                format!("spec.eplb.algorithm {:?} is unknown", spec.eplb.algorithm),
            ));
        }
        let now_step = m.reports.iter().map(|r| r.step).min().unwrap_or(0);
        let window_size = u64::from(spec.eplb.window_steps);
        let first_step = m
            .reports
            .iter()
            .map(|r| r.current_window_start(window_size))
            .min()
            .unwrap_or(0);
        let (ns, name) = (&self.r.namespace, &self.r.name);
        let uid = self.r.owner.uid.as_str();
        if trigger == Trigger::Threshold
            && let Some(hold) = self.ctx.plan_hold(ns, name)
            && hold.holds(uid, self.doc.generation, &spec.eplb, &layers, now_step)
        {
            return Err(StepOutcome::idle(hold.reason, hold.message));
        }
        let load = planning::logical_load(&m.reports, self.doc);
        let PastWindows {
            windows: past,
            failure: history_failure,
        } = past_windows(
            self.ctx,
            self.workers.endpoints,
            spec.eplb.history_windows,
            first_step,
        )
        .await;
        let cap = planning::max_moves(spec, self.doc.num_slots());
        let plan = self.plan(&load, &past, &layers, cap).await?;
        let mut accepted = remap::accept_plan(trigger, &plan.layers, spec.eplb.hysteresis);
        if let Some(cap) = remap::paced_plan_cap(trigger, cap, &plan.layers, &accepted) {
            // The cap sets the pace of a rebalance, not whether it is worth doing: ask the
            // planner where the rebalance would go without it (eplb::accept_paced).
            let unpaced = self.plan(&load, &past, &layers, None).await?;
            accepted = eplb::accept_paced(&plan.layers, &unpaced.layers, spec.eplb.hysteresis, cap);
        }
        let expert_bytes = remap::expert_bytes(spec.model.hidden, spec.model.intermediate);
        let with_bytes: Vec<(usize, u64)> = accepted
            .iter()
            .filter_map(|&l| {
                let o = plan.layers.iter().find(|o| o.layer == l)?;
                Some((l, o.moved_slots as u64 * expert_bytes))
            })
            .collect();
        let budget = planning::byte_budget(spec);
        let chosen = remap::apply_byte_budget(&with_bytes, budget);
        if chosen.is_empty() {
            let reason = if accepted.is_empty() {
                "NoImprovement"
            } else {
                "OverBudget"
            };
            let message = remap::skip_message(
                &layers,
                &plan.layers,
                &with_bytes,
                spec.eplb.hysteresis,
                cap,
                budget,
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
            if trigger == Trigger::Threshold {
                self.ctx.set_plan_hold(
                    ns,
                    name,
                    Some(remap::PlanHold {
                        uid: uid.to_string(),
                        generation: self.doc.generation,
                        eplb: spec.eplb.clone(),
                        layers: remap::PlanHold::layer_set(&layers),
                        from_step: now_step,
                        until_step: now_step.saturating_add(m.window.max(1)),
                        reason,
                        message: message.clone(),
                    }),
                );
            }
            return Err(StepOutcome::idle(reason, message));
        }
        self.ctx.set_plan_hold(ns, name, None);
        let next = planning::restrict(self.doc, &plan.document, &chosen, self.doc.generation + 1);
        let par_before = chosen
            .iter()
            .filter_map(|&l| m.layer_par.get(l).copied())
            .fold(1.0f64, f64::max);
        let par_predicted = chosen
            .iter()
            .filter_map(|&l| {
                plan.layers
                    .iter()
                    .find(|p| p.layer == l)
                    .map(|p| p.par_predicted)
            })
            .fold(1.0f64, f64::max);
        Ok(Chosen {
            trigger,
            layers: chosen,
            next,
            par_before,
            par_predicted,
            history_windows: plan.windows as u32,
            history_failure,
        })
    }

    /// Runs the planner for `layers` on the group's logical load (`load`, and the closed
    /// windows before it, `past`), each layer changing at most `max_moves` slots.
    async fn plan(
        &self,
        load: &[Vec<f64>],
        past: &[Vec<Vec<f64>>],
        layers: &[usize],
        max_moves: Option<usize>,
    ) -> Result<planning::PlanOutcome, StepOutcome> {
        let (spec, doc) = (self.spec, self.doc);
        // Planning is CPU work (the joint planner searches): keep it off the async workers.
        let (algorithm, spec_c, doc_c, load_c, past_c, layers_c) = (
            spec.eplb.algorithm.clone(),
            spec.clone(),
            doc.clone(),
            load.to_vec(),
            past.to_vec(),
            layers.to_vec(),
        );
        let redundant = self.r.redundant_experts;
        tokio::task::spawn_blocking(move || {
            planning::plan(
                &algorithm, &spec_c, redundant, &doc_c, &load_c, &past_c, &layers_c, max_moves,
            )
        })
        .await
        .map_err(|e| format!("planner task failed: {e}"))
        .and_then(|p| p)
        .map_err(|e| {
            let mut out = StepOutcome::idle("PlannerError", e.clone());
            out.problems.push(Problem::new(
                "PlannerError",
                format!("spec.eplb.algorithm {:?}: {e}", spec.eplb.algorithm),
            ));
            out
        })
    }

    /// Persists the chosen placement, then records the remap as running; the status (with the
    /// prediction) is written before any worker is asked to move: the next pass drives them.
    async fn commit(
        &self,
        st: &mut MoEDeploymentStatus,
        c: Chosen,
        pending: &mut Pending,
        out: StepOutcome,
    ) -> Result<StepOutcome, Error> {
        let (ns, name) = (&self.r.namespace, &self.r.name);
        let generation = c.next.generation;
        if let Some(view) = self.persist(st, &c.next).await? {
            return Ok(out.soon(view));
        }
        if let Some(p) = st.placement.as_mut() {
            p.desired_generation = generation;
        }
        st.remap = Some(RemapProgressStatus {
            generation,
            trigger: c.trigger.as_str().into(),
            layers: c.layers.iter().map(|&l| l as u32).collect(),
            layers_total: c.layers.len() as u32,
            layers_done: 0,
            ranks_done: 0,
            par_before: remap::round3(c.par_before),
            par_predicted: remap::round3(c.par_predicted),
            history_windows: Some(c.history_windows),
            started_at: now_time(),
        });
        let (chosen, par_before, par_predicted) = (&c.layers, c.par_before, c.par_predicted);
        let asked = self.spec.eplb.history_windows;
        let history = match &c.history_failure {
            None => format!(
                "planned on {} of {asked} statistics windows",
                c.history_windows
            ),
            Some(e) => format!(
                "planned on the current statistics window alone ({asked} asked): the workers' past windows could not be read ({e})"
            ),
        };
        pending.event(
            if c.history_failure.is_some() {
                EventType::Warning
            } else {
                EventType::Normal
            },
            "RemapStarted",
            "Remap",
            format!(
                "{} remap to placement generation {generation}: layers {chosen:?}, predicted worst PAR {:.3} (now {:.3}), {history}",
                c.trigger.as_str(),
                par_predicted,
                par_before
            ),
        );
        info!(%ns, %name, generation, layers = ?chosen, par_before, par_predicted, windows = c.history_windows, "remap committed");
        Ok(out.committed(RemapView::Running {
            generation,
            layers_done: 0,
            layers_total: chosen.len() as u32,
        }))
    }

    /// Persist first: a restarted group or operator resumes from the ConfigMap. Only over the
    /// generation this plan started from, guarded by the ConfigMap's resourceVersion: were a
    /// second operator (a split leadership) to commit a generation meanwhile, this write fails
    /// instead of giving one generation number two placements. `Some`: not written, and why.
    async fn persist(
        &self,
        st: &MoEDeploymentStatus,
        next: &PlacementDocument,
    ) -> Result<Option<RemapView>, Error> {
        let target = self.doc.generation;
        let cms = Api::<ConfigMap>::namespaced(self.ctx.client.clone(), &self.r.namespace);
        let cm_name = Names::new(&self.r.name).configmap;
        let live = cms.get_opt(&cm_name).await?;
        let live_generation = live.as_ref().and_then(parse_document).map(|d| d.generation);
        let changed = |found: String| RemapView::Idle {
            reason: "PlacementChanged".into(),
            message: format!(
                "the committed placement changed while planning ({found}; the plan started from generation {target}): planning again"
            ),
        };
        if live_generation != Some(target) {
            return Ok(Some(changed(format!("now generation {live_generation:?}"))));
        }
        let mut cm = resources::placement_configmap(
            self.r,
            next,
            self.workers.source_label,
            st.last_handled_remap_request.as_deref(),
        )?;
        cm.metadata.resource_version = live.and_then(|c| c.metadata.resource_version);
        match apply(&cms, &cm_name, &cm).await {
            Ok(_) => Ok(None),
            Err(Error::Kube(kube::Error::Api(e))) if e.code == 409 => Ok(Some(changed(format!(
                "written by someone else: {}",
                e.message
            )))),
            Err(e) => Err(e),
        }
    }
}

/// The record of a remap that ended (`result`: Succeeded, Superseded or Failed); its PAR
/// after is measured later, once the window under the new placement is long enough.
fn finished_record(
    running: &RemapProgressStatus,
    progress: &GroupProgress,
    finished_at: Time,
    result: &str,
    message: Option<String>,
) -> RemapRecord {
    RemapRecord {
        generation: running.generation,
        trigger: running.trigger.clone(),
        layers: running.layers.clone(),
        experts_moved: progress.experts_moved,
        bytes_moved: progress.bytes_moved,
        par_before: running.par_before,
        par_predicted: running.par_predicted,
        par_after: None,
        history_windows: running.history_windows,
        started_at: running.started_at.clone(),
        finished_at: Some(finished_at),
        result: result.into(),
        message,
    }
}

/// A rank refused the target as diverged: the group restarts into the committed placement.
struct Diverged {
    restart: String,
    view: RemapView,
    event: String,
}

/// The closed windows a plan uses beside the current one, and what became of the ask.
struct PastWindows {
    /// Oldest first, at most `historyWindows - 1`.
    windows: Vec<Vec<Vec<f64>>>,
    /// Why none were read although some were wanted (a rank did not answer).
    failure: Option<String>,
}

/// The group's closed windows before the current one (oldest first, at most
/// `history_windows - 1`), for planning over episodes. Asked for only when a plan is made, as
/// the bodies grow with the history. `first_step` is the oldest step the current window
/// holds (over the reports it came from): a closed window that shares steps with it is left
/// out ([`moe_api::LoadEpisode::group_history`]): always the newest, and one more when a
/// window closed since the current one was read, so two more than needed are asked for. A rank
/// that cannot answer, or whose address answers as another rank, leaves the plan to the current
/// window alone rather than holding it, and the remap says so.
async fn past_windows(
    ctx: &Context,
    endpoints: &[Endpoint],
    history_windows: u32,
    first_step: u64,
) -> PastWindows {
    let want = history_windows.saturating_sub(1) as usize;
    if want == 0 {
        return PastWindows {
            windows: Vec::new(),
            failure: None,
        };
    }
    let ask = (want + 2).min(moe_api::MAX_LOAD_HISTORY);
    let answers = join_all(
        endpoints
            .iter()
            .map(|e| ctx.workers.load_with_history(e, ask)),
    )
    .await;
    match group_reports(endpoints, answers).map_err(|(rank, e)| format!("rank {rank}: {e}")) {
        Ok(reports) => PastWindows {
            windows: moe_api::LoadEpisode::group_history(&reports, want, first_step),
            failure: None,
        },
        Err(e) => {
            warn!(error = %e, "could not read the workers' past windows; planning from the current one");
            PastWindows {
                windows: Vec::new(),
                failure: Some(e),
            }
        }
    }
}

/// Every rank's load report, in rank order, or the first rank that did not answer or whose
/// address answered as another rank (a pod IP taken over by another pod of the group: its
/// counts would be summed twice), with why.
fn group_reports(
    endpoints: &[Endpoint],
    answers: Vec<Result<LoadReport, WorkerError>>,
) -> Result<Vec<LoadReport>, (usize, String)> {
    let reports = every_rank(endpoints, answers).map_err(|(rank, e)| (rank, e.to_string()))?;
    match endpoints
        .iter()
        .zip(&reports)
        .find(|(ep, r)| ep.rank != r.rank)
    {
        Some((ep, r)) => Err((
            ep.rank,
            format!(
                "{} answered as rank {}, not rank {}: its address is stale",
                ep.base_url, r.rank, ep.rank
            ),
        )),
        None => Ok(reports),
    }
}
