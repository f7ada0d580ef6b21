//! The remap loop's decisions, as pure functions: when to remap, which layers, whether a plan
//! is worth executing, how far the group has got.

use eplb::worst_first;
use jiff::Timestamp;
use moe_api::{RemapState, WorkerStatus};

use crate::crd::{EplbSpec, ImbalanceStatus, LayerImbalance};

/// What started a remap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Threshold,
    Manual,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Threshold => "Threshold",
            Trigger::Manual => "Manual",
        }
    }
}

/// Inputs of [`decide`].
#[derive(Debug, Clone)]
pub struct DecisionInput<'a> {
    pub eplb: &'a EplbSpec,
    /// `spec.remapRequest`.
    pub remap_request: Option<&'a str>,
    /// `status.lastHandledRemapRequest`.
    pub last_handled_request: Option<&'a str>,
    /// When the last remap ended (its start where no end is recorded), for the re-plan
    /// interval: counted from the end, so a remap slower than the interval is not followed at
    /// once by another judged on the first short window under the new placement.
    pub last_remap_ended: Option<Timestamp>,
    pub now: Timestamp,
    /// Measured PAR per layer under the committed placement.
    pub layer_par: &'a [f64],
    /// Steps in the statistics window (minimum over ranks).
    pub window_steps: u64,
    /// A remap is being executed (desired generation > applied).
    pub remap_in_flight: bool,
    /// Every rank is ready and serves the committed generation.
    pub group_ready: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// No remap now; reason (CamelCase) and message for the `Rebalancing` condition.
    Hold {
        reason: &'static str,
        message: String,
    },
    /// Plan these layers (worst first).
    Remap {
        trigger: Trigger,
        layers: Vec<usize>,
    },
}

fn hold(reason: &'static str, message: impl Into<String>) -> Decision {
    Decision::Hold {
        reason,
        message: message.into(),
    }
}

/// A pending manual request: `spec.remapRequest` set and not yet handled.
pub fn manual_pending(request: Option<&str>, handled: Option<&str>) -> bool {
    matches!(request, Some(r) if !r.is_empty() && Some(r) != handled)
}

/// When to remap and which layers.
///
/// * `paused` holds everything; a pending manual request stays pending.
/// * A manual request remaps the worst layers (up to the layer budget) regardless of threshold
///   and interval, even with `enabled: false`.
/// * Automatically (enabled): after `minWindowSteps` of statistics, once `replanIntervalSeconds`
///   have passed since the last remap, when some layer's PAR exceeds `imbalanceThreshold`; then
///   every layer above `imbalanceThreshold - hysteresis` is a candidate (worst first, at most
///   `maxLayersPerRemap`).
pub fn decide(i: &DecisionInput<'_>) -> Decision {
    let e = i.eplb;
    if i.remap_in_flight {
        return hold("RemapInProgress", "a remap is being executed");
    }
    if e.paused {
        return hold("Paused", "spec.eplb.paused is true");
    }
    if !i.group_ready {
        return hold("GroupNotReady", "waiting for every rank to be ready");
    }
    let max_layers = e.max_layers_per_remap.max(1) as usize;
    if manual_pending(i.remap_request, i.last_handled_request) {
        if i.window_steps == 0 || i.layer_par.is_empty() {
            return hold(
                "WaitingForStatistics",
                "manual request pending: no statistics yet",
            );
        }
        let mut layers = worst_first(i.layer_par, f64::NEG_INFINITY);
        layers.truncate(max_layers);
        return Decision::Remap {
            trigger: Trigger::Manual,
            layers,
        };
    }
    if !e.enabled {
        return hold("Disabled", "spec.eplb.enabled is false");
    }
    if i.window_steps < u64::from(e.min_window_steps) || i.layer_par.is_empty() {
        return hold(
            "WaitingForStatistics",
            format!(
                "waiting for {} steps of statistics (spec.eplb.minWindowSteps)",
                e.min_window_steps
            ),
        );
    }
    let worst = i
        .layer_par
        .iter()
        .copied()
        .filter(|p| p.is_finite())
        .fold(1.0f64, f64::max);
    if worst <= e.imbalance_threshold {
        return hold(
            "Balanced",
            // No live PAR in a condition message: it would rewrite the status on every poll
            // (the measured PAR is in status.imbalance).
            format!(
                "every layer's PAR is within the threshold {:.3}",
                e.imbalance_threshold
            ),
        );
    }
    if let Some(last) = i.last_remap_ended {
        let next = last
            .checked_add(jiff::SignedDuration::from_secs(i64::from(
                e.replan_interval_seconds,
            )))
            .unwrap_or(last);
        if i.now < next {
            return hold(
                "Cooldown",
                format!(
                    "a layer's PAR is above the threshold {:.3}; next remap allowed at {next}",
                    e.imbalance_threshold
                ),
            );
        }
    }
    let mut layers = worst_first(i.layer_par, e.imbalance_threshold - e.hysteresis);
    layers.truncate(max_layers);
    Decision::Remap {
        trigger: Trigger::Threshold,
        layers,
    }
}

/// Keeps the planned layers worth moving, in the order they are deployed: those the plan
/// improves, and for a threshold-triggered remap none unless one of them drops by at least
/// `hysteresis` (those first, the rest riding along). The rule is eplb's
/// [`eplb::accept_layers`], which `moectl bench --rolling` and `moectl backtest` replay.
pub fn accept_plan(
    trigger: Trigger,
    planned: &[eplb::PlannedLayer],
    hysteresis: f64,
) -> Vec<usize> {
    eplb::accept_layers(trigger == Trigger::Threshold, planned, hysteresis)
}

/// The move cap (`cap`: [`crate::planning::max_moves`]) that may have held back a
/// threshold-triggered plan: [`accept_plan`] kept nothing although some layer improves
/// ([`eplb::refused_improvement`]). Then the operator plans the same layers without the cap,
/// and [`eplb::accept_paced`] weighs each capped step against that destination (the cap paces
/// a rebalance; the hysteresis judges whether it is worth doing), counting it only where the
/// cap did bind. `None`: no second plan is run. A layer stuck above the threshold at its floor
/// would be planned twice per poll, but [`PlanHold`] keeps the answer until a window closes.
pub fn paced_plan_cap(
    trigger: Trigger,
    cap: Option<usize>,
    planned: &[eplb::PlannedLayer],
    accepted: &[usize],
) -> Option<usize> {
    cap.filter(|_| trigger == Trigger::Threshold && eplb::refused_improvement(planned, accepted))
}

/// Why a planned remap moved nothing, for the `Rebalancing` condition and the `RemapSkipped`
/// event: what the best layer would have gained against the hysteresis, or which layer the
/// byte budget could not hold. `planned`: the plan's layers, worst first; `accepted`: those
/// worth their moves; `costs`: their moved bytes, in that order; `cap`: the move cap.
pub fn skip_message(
    layers: &[usize],
    planned: &[eplb::PlannedLayer],
    costs: &[(usize, u64)],
    hysteresis: f64,
    cap: Option<usize>,
    budget: Option<u64>,
) -> String {
    if let (Some(&(layer, bytes)), Some(budget)) = (costs.first(), budget) {
        return format!(
            "layer {layer}'s plan moves {bytes} bytes, more than maxBytesPerRemap ({budget} \
             bytes): raise it to at least one expert per slot the plan moves"
        );
    }
    let best = planned
        .iter()
        .filter(|l| l.improves())
        .max_by(|a, b| a.gain().total_cmp(&b.gain()));
    let Some(best) = best else {
        return format!(
            "the planner found no placement of layers {layers:?} better than the current one \
             on this window"
        );
    };
    let capped = match cap {
        Some(c) => format!(
            " with at most {c} moved slots a layer (maxMovesPerLayer / maxBytesPerRemap), nor \
             a share of it toward a plan without that cap that clears it"
        ),
        None => String::new(),
    };
    format!(
        "no plan of layers {layers:?} lowers a layer's PAR by the hysteresis {hysteresis}{capped}: \
         the most is layer {}, {:.3} -> {:.3}",
        best.layer, best.par_before, best.par_predicted
    )
}

/// A threshold-triggered plan that moved nothing (`NoImprovement`, `OverBudget`), kept so
/// that the polls after it give the same answer instead of planning again on the same
/// statistics: the current window slides a few steps between polls, and a large model's plan
/// costs a second or more of CPU (twice under a move cap), for an answer that changes only as
/// a window's worth of new traffic arrives. It holds while nothing it depended on changed: the
/// object (its uid), the committed generation, `spec.eplb`, the layers over the threshold, and
/// the group's step, which must stay within one window of the plan's (`from_step ..
/// until_step`: a new window's worth of steps, or a group restart, plans again). A manual
/// request always plans.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanHold {
    pub uid: String,
    pub generation: u64,
    pub eplb: EplbSpec,
    /// The layers planned, ascending (the worst-first order shifts as PARs move a little).
    pub layers: Vec<usize>,
    /// The group's step at the plan (the lowest over ranks).
    pub from_step: u64,
    /// `from_step` plus the steps of the window planned on (at least 1): the workers' own
    /// window length, whatever `windowSteps` says now (workers read it when they start).
    pub until_step: u64,
    pub reason: &'static str,
    pub message: String,
}

impl PlanHold {
    /// `layers` in the order a hold keeps them.
    pub fn layer_set(layers: &[usize]) -> Vec<usize> {
        let mut v = layers.to_vec();
        v.sort_unstable();
        v
    }

    /// Whether this answer still stands for a threshold-triggered plan of `layers` at `step`.
    pub fn holds(
        &self,
        uid: &str,
        generation: u64,
        eplb: &EplbSpec,
        layers: &[usize],
        step: u64,
    ) -> bool {
        self.uid == uid
            && self.generation == generation
            && &self.eplb == eplb
            && self.layers == Self::layer_set(layers)
            && (self.from_step..self.until_step).contains(&step)
    }
}

/// The longest prefix of `layers` whose moved bytes fit the budget (at least one layer is
/// never forced: a layer larger than the whole budget is skipped). The rule is eplb's
/// [`eplb::within_budget`], which `moectl backtest` replays in whole experts.
pub fn apply_byte_budget(layers: &[(usize, u64)], budget: Option<u64>) -> Vec<usize> {
    eplb::within_budget(layers, budget)
}

pub use moe_api::quantity::expert_bytes;

/// Imbalance summary for status: worst and mean PAR and the worst layers.
pub fn summarize(
    layer_par: &[f64],
    threshold: f64,
    window_steps: u64,
    now: Timestamp,
) -> ImbalanceStatus {
    let finite: Vec<f64> = layer_par
        .iter()
        .copied()
        .filter(|p| p.is_finite())
        .collect();
    let worst = finite.iter().copied().fold(1.0f64, f64::max);
    let mean = if finite.is_empty() {
        1.0
    } else {
        finite.iter().sum::<f64>() / finite.len() as f64
    };
    let over = worst_first(layer_par, f64::NEG_INFINITY)
        .into_iter()
        .filter(|&l| layer_par[l] > threshold)
        .count();
    let mut worst_layers: Vec<LayerImbalance> = worst_first(layer_par, f64::NEG_INFINITY)
        .into_iter()
        .take(over.clamp(1, 8))
        .map(|l| LayerImbalance {
            layer: l as u32,
            par: round3(layer_par[l]),
        })
        .collect();
    if layer_par.is_empty() {
        worst_layers.clear();
    }
    ImbalanceStatus {
        worst_par: round3(worst),
        mean_par: round3(mean),
        worst_layers,
        layers_over_threshold: over as u32,
        window_steps,
        measured_at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now),
    }
}

/// Rounds to 3 decimals (status values; avoids status writes for noise).
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Smallest PAR change worth a status write.
pub const PAR_TOLERANCE: f64 = 0.01;

/// True when a new summary is worth publishing: worst or mean PAR moved by at least
/// [`PAR_TOLERANCE`], or the set of worst layers or the count over the threshold changed.
/// (Live traffic changes the third decimal on every poll; writing that would churn the status.)
pub fn imbalance_changed(old: Option<&ImbalanceStatus>, new: &ImbalanceStatus) -> bool {
    match old {
        None => true,
        Some(o) => {
            let layers =
                |s: &ImbalanceStatus| s.worst_layers.iter().map(|l| l.layer).collect::<Vec<_>>();
            (o.worst_par - new.worst_par).abs() >= PAR_TOLERANCE
                || (o.mean_par - new.mean_par).abs() >= PAR_TOLERANCE
                || layers(o) != layers(new)
                || o.layers_over_threshold != new.layers_over_threshold
        }
    }
}

/// How far the group has got towards a target generation.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GroupProgress {
    /// Minimum generation served over ranks (None without reports).
    pub applied: Option<u64>,
    /// Ranks serving the target.
    pub ranks_done: u32,
    /// Layers switched by every rank (minimum over ranks; a rank at the target counts all).
    pub layers_done: u32,
    /// A rank reported the remap to the target failed: (rank, message).
    pub failed: Option<(usize, String)>,
    /// Indices (into the status slice) of ranks that have not accepted the target yet.
    pub needs_request: Vec<usize>,
    pub experts_moved: u64,
    pub bytes_moved: u64,
    /// Latest finish time reported (unix ms).
    pub finished_at_ms: Option<u64>,
}

pub fn group_progress(statuses: &[WorkerStatus], target: u64, layers_total: u32) -> GroupProgress {
    let mut g = GroupProgress {
        applied: statuses.iter().map(|s| s.placement_generation).min(),
        layers_done: layers_total,
        ..Default::default()
    };
    for (i, s) in statuses.iter().enumerate() {
        let remap = s.remap.as_ref().filter(|r| r.generation == target);
        if let Some(r) = remap {
            // Worker-reported figures: a wrong one must not wrap or panic the operator.
            g.experts_moved = g.experts_moved.saturating_add(r.experts_moved);
            g.bytes_moved = g.bytes_moved.saturating_add(r.bytes_moved);
            if let Some(f) = r.finished_at_ms {
                g.finished_at_ms = Some(g.finished_at_ms.map_or(f, |x| x.max(f)));
            }
        }
        if s.placement_generation >= target {
            g.ranks_done += 1;
            continue;
        }
        match remap {
            Some(r) if r.state == RemapState::Failed => {
                if g.failed.is_none() {
                    g.failed = Some((
                        s.rank,
                        r.error.clone().unwrap_or_else(|| "remap failed".into()),
                    ));
                }
                g.layers_done = g.layers_done.min(r.layers_done as u32);
            }
            Some(r) => g.layers_done = g.layers_done.min(r.layers_done as u32),
            None => {
                g.layers_done = 0;
                g.needs_request.push(i);
            }
        }
    }
    g
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_api::{RemapMode, RemapProgress};

    fn input<'a>(eplb: &'a EplbSpec, par: &'a [f64]) -> DecisionInput<'a> {
        DecisionInput {
            eplb,
            remap_request: None,
            last_handled_request: None,
            last_remap_ended: None,
            now: Timestamp::from_second(10_000).unwrap(),
            layer_par: par,
            window_steps: 1000,
            remap_in_flight: false,
            group_ready: true,
        }
    }

    /// A plan that moved nothing answers again until a window's worth of steps has passed, the
    /// layers, the spec, the generation or the object change, or the group restarts.
    #[test]
    fn a_plan_that_moved_nothing_holds_until_its_statistics_change() {
        let e = EplbSpec::default();
        let hold = PlanHold {
            uid: "u1".into(),
            generation: 3,
            eplb: e.clone(),
            layers: PlanHold::layer_set(&[2, 0]),
            from_step: 1234,
            until_step: 1334,
            reason: "NoImprovement",
            message: "m".into(),
        };
        assert!(hold.holds("u1", 3, &e, &[0, 2], 1234));
        assert!(
            hold.holds("u1", 3, &e, &[2, 0], 1333),
            "same window, other worst-first order"
        );
        assert!(
            !hold.holds("u1", 3, &e, &[0, 2], 1334),
            "a window's worth of steps"
        );
        assert!(
            !hold.holds("u1", 3, &e, &[0, 2], 1233),
            "the group restarted"
        );
        assert!(
            !hold.holds("u1", 4, &e, &[0, 2], 1234),
            "another generation"
        );
        assert!(
            !hold.holds("u2", 3, &e, &[0, 2], 1234),
            "a new object of that name"
        );
        assert!(
            !hold.holds("u1", 3, &e, &[0, 1, 2], 1234),
            "another layer over the threshold"
        );
        let looser = EplbSpec {
            hysteresis: e.hysteresis / 2.0,
            ..e.clone()
        };
        assert!(
            !hold.holds("u1", 3, &looser, &[0, 2], 1234),
            "the spec changed"
        );
    }

    /// The hold message does not change with the measured PAR: a condition message that did
    /// would rewrite the status on every poll.
    #[test]
    fn hold_messages_do_not_carry_the_live_par() {
        let e = EplbSpec::default();
        let message = |par: &[f64]| match decide(&input(&e, par)) {
            Decision::Hold { message, .. } => message,
            other => panic!("{other:?}"),
        };
        assert_eq!(message(&[1.1, 1.05]), message(&[1.02, 1.07]));
        let mut cool = input(&e, &[1.5, 1.0]);
        cool.last_remap_ended = Some(Timestamp::from_second(10_000 - 10).unwrap());
        let mut hotter = input(&e, &[1.7, 1.0]);
        hotter.last_remap_ended = cool.last_remap_ended;
        let (Decision::Hold { message: a, .. }, Decision::Hold { message: b, .. }) =
            (decide(&cool), decide(&hotter))
        else {
            panic!("expected Cooldown holds");
        };
        assert_eq!(a, b);
    }

    #[test]
    fn balanced_layers_hold() {
        let e = EplbSpec::default();
        let par = [1.1, 1.05];
        assert!(matches!(
            decide(&input(&e, &par)),
            Decision::Hold {
                reason: "Balanced",
                ..
            }
        ));
    }

    #[test]
    fn threshold_selects_layers_with_hysteresis_worst_first() {
        let e = EplbSpec {
            imbalance_threshold: 1.3,
            hysteresis: 0.1,
            ..EplbSpec::default()
        };
        let par = [1.25, 1.5, 1.1, 1.21, 1.35];
        let d = decide(&input(&e, &par));
        assert_eq!(
            d,
            Decision::Remap {
                trigger: Trigger::Threshold,
                layers: vec![1, 4, 0, 3]
            }
        );
        let e2 = EplbSpec {
            max_layers_per_remap: 2,
            ..e
        };
        let Decision::Remap { layers, .. } = decide(&input(&e2, &par)) else {
            panic!()
        };
        assert_eq!(layers, vec![1, 4]);
    }

    #[test]
    fn interval_pause_disable_window_and_flight_hold() {
        let e = EplbSpec::default();
        let par = [2.0];
        let mut i = input(&e, &par);
        i.last_remap_ended = Some(Timestamp::from_second(10_000 - 10).unwrap());
        assert!(matches!(
            decide(&i),
            Decision::Hold {
                reason: "Cooldown",
                ..
            }
        ));
        i.last_remap_ended = Some(Timestamp::from_second(10_000 - 301).unwrap());
        assert!(matches!(decide(&i), Decision::Remap { .. }));
        i.window_steps = 5;
        assert!(matches!(
            decide(&i),
            Decision::Hold {
                reason: "WaitingForStatistics",
                ..
            }
        ));
        let mut i = input(&e, &par);
        i.remap_in_flight = true;
        assert!(matches!(
            decide(&i),
            Decision::Hold {
                reason: "RemapInProgress",
                ..
            }
        ));
        let paused = EplbSpec {
            paused: true,
            ..EplbSpec::default()
        };
        assert!(matches!(
            decide(&input(&paused, &par)),
            Decision::Hold {
                reason: "Paused",
                ..
            }
        ));
        let disabled = EplbSpec {
            enabled: false,
            ..EplbSpec::default()
        };
        assert!(matches!(
            decide(&input(&disabled, &par)),
            Decision::Hold {
                reason: "Disabled",
                ..
            }
        ));
    }

    #[test]
    fn manual_request_overrides_threshold_interval_and_disable_but_not_pause() {
        let disabled = EplbSpec {
            enabled: false,
            ..EplbSpec::default()
        };
        let par = [1.01, 1.02];
        let mut i = input(&disabled, &par);
        i.remap_request = Some("2026-11-22T09:00");
        i.last_handled_request = Some("old");
        i.last_remap_ended = Some(i.now);
        assert_eq!(
            decide(&i),
            Decision::Remap {
                trigger: Trigger::Manual,
                layers: vec![1, 0]
            }
        );
        i.last_handled_request = Some("2026-11-22T09:00");
        assert!(matches!(
            decide(&i),
            Decision::Hold {
                reason: "Disabled",
                ..
            }
        ));
        let paused = EplbSpec {
            paused: true,
            ..EplbSpec::default()
        };
        let mut i = input(&paused, &par);
        i.remap_request = Some("x");
        assert!(matches!(
            decide(&i),
            Decision::Hold {
                reason: "Paused",
                ..
            }
        ));
    }

    #[test]
    fn a_remap_needs_one_layer_past_the_hysteresis() {
        // Layers 1 and 4 at PAR 1.5 and 1.35 before, planned to the PARs given.
        let plan = |p1, p4| {
            [(1, 1.5, p1), (4, 1.35, p4)].map(|(layer, par_before, par_predicted)| {
                eplb::PlannedLayer {
                    layer,
                    par_before,
                    par_predicted,
                    moved_slots: 2,
                }
            })
        };
        let good = plan(1.1, 1.36);
        assert_eq!(accept_plan(Trigger::Threshold, &good, 0.05), vec![1]);
        let tiny = plan(1.48, 1.34);
        assert!(accept_plan(Trigger::Threshold, &tiny, 0.05).is_empty());
        assert_eq!(accept_plan(Trigger::Manual, &tiny, 0.05), vec![1, 4]);
        // A worst layer the planner cannot improve enough does not hold back one it can: the
        // layer past the hysteresis goes first, the other rides along.
        let stuck = plan(1.48, 1.2);
        assert_eq!(accept_plan(Trigger::Threshold, &stuck, 0.05), vec![4, 1]);
    }

    #[test]
    fn a_skipped_remap_says_what_the_best_layer_would_gain_or_what_the_budget_holds() {
        let planned = |layer, before, predicted| eplb::PlannedLayer {
            layer,
            par_before: before,
            par_predicted: predicted,
            moved_slots: 2,
        };
        let plan = [planned(2, 1.225, 1.209), planned(1, 1.2, 1.17)];
        let m = skip_message(&[2, 1], &plan, &[], 0.05, None, None);
        assert!(
            m.contains("hysteresis 0.05") && m.contains("layer 1, 1.200 -> 1.170"),
            "{m}"
        );
        let m = skip_message(&[2, 1], &plan, &[], 0.05, Some(2), None);
        assert!(m.contains("at most 2 moved slots"), "{m}");
        let m = skip_message(&[2], &[planned(2, 1.2, 1.2)], &[], 0.05, None, None);
        assert!(m.contains("no placement of layers [2] better"), "{m}");
        let m = skip_message(&[2, 1], &plan, &[(1, 4096)], 0.05, None, Some(1024));
        assert!(
            m.contains("layer 1's plan moves 4096 bytes") && m.contains("(1024 bytes)"),
            "{m}"
        );
    }

    #[test]
    fn only_a_capped_threshold_plan_with_a_refused_improvement_is_planned_again() {
        let layer = |layer, par_before, par_predicted| eplb::PlannedLayer {
            layer,
            par_before,
            par_predicted,
            moved_slots: 2,
        };
        let plan = [layer(0, 1.3, 1.28), layer(1, 1.25, 1.1)];
        let again = paced_plan_cap;
        // Both layers improve, by less than the hysteresis (say 0.2): refused.
        assert_eq!(again(Trigger::Threshold, Some(2), &plan, &[]), Some(2));
        // No cap: the refusal stands.
        assert_eq!(again(Trigger::Threshold, None, &plan, &[]), None);
        // A manual remap takes every improvement: nothing is held back.
        assert_eq!(again(Trigger::Manual, Some(2), &plan, &[]), None);
        // A remap going ahead, or nothing improving: nothing to weigh.
        assert_eq!(again(Trigger::Threshold, Some(2), &plan, &[1, 0]), None);
        let flat = [layer(0, 1.3, 1.3)];
        assert_eq!(again(Trigger::Threshold, Some(2), &flat, &[]), None);
    }

    #[test]
    fn byte_budget_keeps_a_prefix() {
        let layers = [(3, 100), (1, 200), (2, 50)];
        assert_eq!(apply_byte_budget(&layers, None), vec![3, 1, 2]);
        assert_eq!(apply_byte_budget(&layers, Some(320)), vec![3, 1]);
        assert!(apply_byte_budget(&layers, Some(99)).is_empty());
    }

    #[test]
    fn summary_rounds_and_lists_worst_layers() {
        let s = summarize(&[1.0, 1.4444, 1.3], 1.2, 100, Timestamp::UNIX_EPOCH);
        assert_eq!(s.worst_par, 1.444);
        assert_eq!(s.layers_over_threshold, 2);
        assert_eq!(s.worst_layers.len(), 2);
        assert_eq!(s.worst_layers[0].layer, 1);
        let calm = summarize(&[1.0, 1.1], 1.2, 100, Timestamp::UNIX_EPOCH);
        assert_eq!(calm.worst_layers.len(), 1);
        assert!(!imbalance_changed(
            Some(&s),
            &summarize(&[1.0, 1.44441, 1.3], 1.2, 7, Timestamp::now())
        ));
        assert!(imbalance_changed(Some(&s), &calm));
        assert!(!imbalance_changed(
            Some(&s),
            &summarize(&[1.0, 1.449, 1.302], 1.2, 7, Timestamp::now())
        ));
        assert!(imbalance_changed(
            Some(&s),
            &summarize(&[1.0, 1.46, 1.3], 1.2, 7, Timestamp::now())
        ));
    }

    fn status(
        rank: usize,
        generation: u64,
        remap: Option<(u64, RemapState, usize)>,
    ) -> WorkerStatus {
        WorkerStatus {
            rank,
            world_size: 2,
            ready: true,
            backend: "cpu".into(),
            placement_generation: generation,
            layer_generations: vec![generation; 4],
            step: 1,
            tokens_per_second: 1.0,
            remap: remap.map(|(generation, state, done)| RemapProgress {
                generation,
                state,
                mode: RemapMode::Async,
                layers_total: 4,
                layers_done: done,
                experts_moved: 3,
                bytes_moved: 30,
                stall_seconds: 0.0,
                started_at_ms: 1,
                finished_at_ms: (state != RemapState::Running).then_some(9),
                error: (state == RemapState::Failed).then(|| "nccl timeout".to_string()),
            }),
            traffic: "generator".into(),
            served_rows_total: 0,
            served_rows_per_second: 0.0,
            control_token_id: None,
            client_token_id: None,
        }
    }

    #[test]
    fn progress_tracks_ranks_layers_and_failures() {
        let s = [
            status(0, 1, Some((2, RemapState::Running, 2))),
            status(1, 1, None),
        ];
        let g = group_progress(&s, 2, 4);
        assert_eq!(g.applied, Some(1));
        assert_eq!(g.needs_request, vec![1]);
        assert_eq!(g.layers_done, 0);
        let s = [
            status(0, 2, Some((2, RemapState::Succeeded, 4))),
            status(1, 1, Some((2, RemapState::Running, 3))),
        ];
        let g = group_progress(&s, 2, 4);
        assert_eq!((g.ranks_done, g.layers_done), (1, 3));
        assert_eq!(g.bytes_moved, 60);
        let s = [
            status(0, 1, Some((2, RemapState::Failed, 1))),
            status(1, 2, None),
        ];
        let g = group_progress(&s, 2, 4);
        assert_eq!(g.failed, Some((0, "nccl timeout".to_string())));
        let s = [status(0, 2, None), status(1, 2, None)];
        let g = group_progress(&s, 2, 4);
        assert_eq!((g.applied, g.ranks_done, g.layers_done), (Some(2), 2, 4));
    }
}
