//! The operator's live loop as the rolling runs replay it: when it remaps and which layers
//! (`operator::remap::decide`), and what it deploys of the plan (`operator::remap::accept_plan`,
//! through [`crate::accept_layers`] and [`crate::accept_paced`]).

use crate::error::Result;
use crate::metrics::{migration_cost, score};
use crate::placement::Placement;
use crate::planner::{
    PlannedLayer, accept_layers, accept_paced, refused_improvement, within_budget, worst_first,
};

/// When the operator's live loop remaps and which layers (`operator::remap::decide`): once
/// some layer's PAR, measured on the latest window under the placement in use, is above
/// `threshold`, every layer above `threshold - hysteresis` is replanned, worst first, at most
/// `max_layers` of them; not sooner than `cooldown_seconds` after the last remap began. What it
/// deploys of the plan: [`accepted`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Trigger {
    /// `spec.eplb.imbalanceThreshold`.
    pub threshold: f64,
    /// `spec.eplb.hysteresis`.
    pub hysteresis: f64,
    /// `spec.eplb.maxLayersPerRemap` (`None`: every layer).
    pub max_layers: Option<usize>,
    /// The planner (`spec.eplb.algorithm`; a name [`crate::planner_by_name`] knows).
    pub algorithm: &'static str,
    /// `spec.eplb.maxMovesPerLayer`: slots one layer's plan changes at most.
    pub max_moves: Option<usize>,
    /// `spec.eplb.maxBytesPerRemap` over the bytes of one expert: the slots one remap moves
    /// at most. As the operator's byte budget, the accepted layers are deployed in
    /// [`crate::accept_layers`]'s order while their moved slots fit, and the rest wait.
    pub max_slots_per_remap: Option<usize>,
    /// `spec.eplb.replanIntervalSeconds`: no remap begins sooner after the last one began, on
    /// the trace's clock ([`super::RollingInputs::window_ends`]; ignored on a trace without
    /// one).
    pub cooldown_seconds: Option<f64>,
}

/// The operator's defaults (the CRD's: threshold 1.2, hysteresis 0.05, 8 layers per remap),
/// planning with `joint`, no move or byte budget and no cooldown.
pub const OPERATOR_DEFAULTS: Trigger = Trigger {
    threshold: 1.2,
    hysteresis: 0.05,
    max_layers: Some(8),
    algorithm: "joint",
    max_moves: None,
    max_slots_per_remap: None,
    cooldown_seconds: None,
};

impl Trigger {
    /// The layers to replan under `pars` (per layer), worst first; none while the worst
    /// finite PAR is at or below the threshold.
    pub fn layers(&self, pars: &[f64]) -> Vec<usize> {
        let mut layers = worst_first(pars, self.threshold - self.hysteresis);
        if layers.first().is_none_or(|&l| pars[l] <= self.threshold) {
            return Vec::new();
        }
        if let Some(m) = self.max_layers {
            layers.truncate(m.max(1));
        }
        layers
    }

    /// Slots one layer's plan may change (`slots`: a layer's), as the operator caps them
    /// ([`crate::layer_move_cap`]).
    pub fn layer_moves(&self, slots: usize) -> Option<usize> {
        crate::layer_move_cap(self.max_moves, self.max_slots_per_remap, slots)
    }

    /// Whether a remap may begin at `now` (seconds on the trace's clock, `None` without one)
    /// after the last began at `last`.
    pub fn cooled_down(&self, now: Option<f64>, last: Option<f64>) -> bool {
        match (self.cooldown_seconds, now, last) {
            (Some(c), Some(now), Some(last)) => now - last >= c,
            _ => true,
        }
    }

    /// The row's name, in the CRD's terms (`spec.eplb.*`); the budgets and the cooldown only
    /// where set.
    pub fn label(&self) -> String {
        let mut settings = vec![
            format!("imbalanceThreshold {:.2}", self.threshold),
            format!("hysteresis {:.2}", self.hysteresis),
            self.max_layers.map_or("every layer".to_string(), |m| {
                format!("maxLayersPerRemap {m}")
            }),
        ];
        if let Some(m) = self.max_moves {
            settings.push(format!("maxMovesPerLayer {m}"));
        }
        if let Some(s) = self.max_slots_per_remap {
            settings.push(format!(
                "maxBytesPerRemap {s} expert{}",
                if s == 1 { "" } else { "s" }
            ));
        }
        if let Some(c) = self.cooldown_seconds {
            settings.push(format!("replanIntervalSeconds {c}"));
        }
        format!(
            "{}, operator trigger ({})",
            self.algorithm,
            settings.join(", ")
        )
    }
}

/// The operator triggers a rolling run replays unless told otherwise
/// ([`crate::bench::BenchOptions::triggers`], in its rows' order): the CRD's defaults, the same
/// for every layer, and a threshold of 1.1 for every layer.
pub fn replayed_triggers() -> [Trigger; 3] {
    [
        OPERATOR_DEFAULTS,
        Trigger {
            max_layers: None,
            ..OPERATOR_DEFAULTS
        },
        Trigger {
            threshold: 1.1,
            max_layers: None,
            ..OPERATOR_DEFAULTS
        },
    ]
}

/// What the operator deploys of a triggered plan (`operator::remap::accept_plan`, then
/// `apply_byte_budget`): of the `requested` layers (worst first), those the plan changes and
/// improves on the measured window, none unless one improves by at least the trigger's
/// hysteresis or, for a plan held to a move cap ([`Trigger::layer_moves`]), by its share of it
/// where the layer planned without the cap clears it (`unpaced`, planned only when the cap
/// held the whole plan back: [`crate::accept_paced`]); those first, then the rest; then, under
/// a byte budget, the longest run of them in that order whose moved slots fit it.
pub(super) fn accepted(
    deployed: &Placement,
    planned: Placement,
    latest: &[Vec<f64>],
    pars_before: &[f64],
    requested: &[usize],
    trigger: &Trigger,
    unpaced: impl FnOnce() -> Result<Placement>,
) -> Result<Placement> {
    let weigh = |plan: &Placement| -> Result<(Vec<PlannedLayer>, Vec<usize>)> {
        let pars_after = score(plan, latest)?.per_layer;
        let moved = migration_cost(deployed, plan, 0)?.per_layer;
        let changed = requested
            .iter()
            .filter(|&&l| moved[l] > 0)
            .map(|&layer| PlannedLayer {
                layer,
                par_before: pars_before[layer],
                par_predicted: pars_after[layer],
                moved_slots: moved[layer],
            })
            .collect();
        Ok((changed, moved))
    };
    let (changed, moved) = weigh(&planned)?;
    let mut improved = accept_layers(true, &changed, trigger.hysteresis);
    if let Some(cap) = trigger.layer_moves(deployed.num_slots())
        && refused_improvement(&changed, &improved)
    {
        let (destination, _) = weigh(&unpaced()?)?;
        improved = accept_paced(&changed, &destination, trigger.hysteresis, cap);
    }
    let costs: Vec<(usize, u64)> = improved.iter().map(|&l| (l, moved[l] as u64)).collect();
    let keep = within_budget(&costs, trigger.max_slots_per_remap.map(|s| s as u64));
    let mut next = deployed.clone();
    for l in keep {
        next.phy2log[l].clone_from(&planned.phy2log[l]);
    }
    // Whole layers of two valid placements of one shape: still valid.
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placement(rows: &[[usize; 4]]) -> Placement {
        Placement::from_phy2log(4, 2, 1, rows.iter().map(|r| r.to_vec()).collect()).unwrap()
    }

    #[test]
    fn only_the_layers_a_plan_improves_are_deployed_and_only_when_one_clears_the_hysteresis() {
        // Two experts of 10 and two of 1 on 2 ranks: {0, 1} together is PAR 20 / 11, apart 1.
        let load = vec![vec![10.0, 10.0, 1.0, 1.0]; 2];
        let deployed = placement(&[[0, 1, 2, 3], [0, 2, 1, 3]]);
        let before = score(&deployed, &load).unwrap().per_layer;
        let trigger = OPERATOR_DEFAULTS;
        // Layer 0 improves (1.82 -> 1), layer 1 gets worse: only layer 0 moves.
        let deploy = |planned: &Placement, trigger: &Trigger| {
            accepted(
                &deployed,
                planned.clone(),
                &load,
                &before,
                &[0, 1],
                trigger,
                || unreachable!("no move cap"),
            )
            .unwrap()
        };
        let planned = placement(&[[0, 2, 1, 3], [0, 1, 2, 3]]);
        let next = deploy(&planned, &trigger);
        assert_eq!(next.phy2log, vec![vec![0, 2, 1, 3], vec![0, 2, 1, 3]]);
        // A remap none of whose layers drops by the hysteresis deploys nothing.
        let strict = Trigger {
            hysteresis: 0.9,
            ..trigger
        };
        assert_eq!(deploy(&planned, &strict), deployed);
        // Every changed layer improving: the plan as it is.
        let planned = placement(&[[0, 2, 1, 3], [0, 2, 1, 3]]);
        assert_eq!(deploy(&planned, &trigger), planned);
    }

    #[test]
    fn a_byte_budget_deploys_the_worst_layers_whose_moves_fit_and_the_rest_wait() {
        let load = vec![vec![10.0, 10.0, 1.0, 1.0]; 3];
        let deployed = placement(&[[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]]);
        let before = score(&deployed, &load).unwrap().per_layer;
        // Every layer improves by moving 2 slots; requested worst first as 2, 0, 1.
        let planned = placement(&[[0, 2, 1, 3], [0, 2, 1, 3], [0, 2, 1, 3]]);
        let with = |slots| Trigger {
            max_slots_per_remap: Some(slots),
            ..OPERATOR_DEFAULTS
        };
        let rows = |slots| {
            accepted(
                &deployed,
                planned.clone(),
                &load,
                &before,
                &[2, 0, 1],
                &with(slots),
                || unreachable!("every plan here clears the hysteresis"),
            )
            .unwrap()
            .phy2log
        };
        let (old, new) = (vec![0, 1, 2, 3], vec![0, 2, 1, 3]);
        assert_eq!(rows(1), vec![old.clone(), old.clone(), old.clone()]);
        assert_eq!(rows(3), vec![old.clone(), old.clone(), new.clone()]);
        assert_eq!(rows(4), vec![new.clone(), old.clone(), new.clone()]);
        assert_eq!(rows(6), vec![new.clone(), new.clone(), new.clone()]);
        // Only the requested layers are deployed.
        let next = accepted(
            &deployed,
            planned.clone(),
            &load,
            &before,
            &[1],
            &OPERATOR_DEFAULTS,
            || unreachable!("no move cap"),
        );
        assert_eq!(next.unwrap().phy2log, vec![old.clone(), new, old]);
    }

    #[test]
    fn under_a_byte_budget_the_layer_past_the_hysteresis_goes_before_the_worse_one_riding_along() {
        // Layer 0 (PAR 19 / 16.75 = 1.134) is planned to 1.104, less than the hysteresis;
        // layer 1 (18 / 16 = 1.125) to 1.0. Requested worst first, each moving 2 slots, and a
        // budget of 2 slots: layer 1 carries the remap and takes the budget.
        let load = vec![vec![10.0, 9.0, 8.5, 6.0], vec![10.0, 8.0, 8.0, 6.0]];
        let deployed = placement(&[[0, 1, 2, 3], [0, 1, 2, 3]]);
        let before = score(&deployed, &load).unwrap().per_layer;
        let planned = placement(&[[0, 2, 1, 3], [2, 1, 0, 3]]);
        let deploy = |slots| {
            let trigger = Trigger {
                max_slots_per_remap: slots,
                ..OPERATOR_DEFAULTS
            };
            accepted(
                &deployed,
                planned.clone(),
                &load,
                &before,
                &[0, 1],
                &trigger,
                || unreachable!("layer 1 clears the hysteresis"),
            )
            .unwrap()
            .phy2log
        };
        assert_eq!(deploy(Some(2)), vec![vec![0, 1, 2, 3], vec![2, 1, 0, 3]]);
        // Room for both: layer 0 rides along.
        assert_eq!(deploy(None), planned.phy2log);
    }

    #[test]
    fn a_capped_step_is_deployed_when_the_uncapped_plan_clears_the_hysteresis() {
        // Experts 10, 10, 6, 6 and four of 1 on 4 ranks x 2, deployed in order: PAR 20 / 9.
        let load = vec![vec![10.0, 10.0, 6.0, 6.0, 1.0, 1.0, 1.0, 1.0]];
        let rows = |r: [usize; 8]| Placement::from_phy2log(8, 4, 1, vec![r.to_vec()]).unwrap();
        let deployed = rows([0, 1, 2, 3, 4, 5, 6, 7]);
        let before = score(&deployed, &load).unwrap().per_layer;
        // One swap (2 slots) takes the worst rank from 20 to 12 (PAR 2.22 -> 1.33); the
        // uncapped plan moves 6 slots to reach 11 (PAR 1.22). A hysteresis of 1.0: the step
        // alone misses it, the uncapped plan clears it, and the step beats its share, 2/6.
        let step = rows([0, 4, 2, 3, 1, 5, 6, 7]);
        let destination = rows([0, 7, 1, 6, 2, 5, 3, 4]);
        let trigger = |max_moves| Trigger {
            hysteresis: 1.0,
            max_moves,
            ..OPERATOR_DEFAULTS
        };
        let deploy = |t: &Trigger, unpaced: &Placement| {
            let unpaced = unpaced.clone();
            accepted(
                &deployed,
                step.clone(),
                &load,
                &before,
                &[0],
                t,
                move || Ok(unpaced),
            )
            .unwrap()
        };
        assert_eq!(deploy(&trigger(Some(2)), &destination), step);
        // The same step without a cap is a whole plan: it must clear the hysteresis itself.
        assert_eq!(deploy(&trigger(None), &destination), deployed);
        // A destination no better than the step is not worth the remap.
        assert_eq!(deploy(&trigger(Some(2)), &step), deployed);
    }

    #[test]
    fn the_cooldown_counts_from_the_last_remap_on_the_traces_clock() {
        let t = Trigger {
            cooldown_seconds: Some(300.0),
            ..OPERATOR_DEFAULTS
        };
        assert!(t.cooled_down(Some(100.0), None));
        assert!(!t.cooled_down(Some(399.0), Some(100.0)));
        assert!(t.cooled_down(Some(400.0), Some(100.0)));
        // A byte budget caps each layer's moves too.
        let both = |m, b| Trigger {
            max_moves: m,
            max_slots_per_remap: b,
            ..t
        };
        assert_eq!(both(Some(4), Some(2)).layer_moves(16), Some(2));
        assert_eq!(both(Some(1), Some(2)).layer_moves(16), Some(1));
        assert_eq!(both(None, Some(2)).layer_moves(16), Some(2));
        assert_eq!(both(None, None).layer_moves(16), None);
        // A budget of a whole layer caps nothing; none under an expert is left to the budget.
        assert_eq!(both(Some(4), Some(16)).layer_moves(16), Some(4));
        assert_eq!(both(None, Some(0)).layer_moves(16), None);
        // No clock: no cooldown.
        assert!(t.cooled_down(None, Some(100.0)));
        assert!(OPERATOR_DEFAULTS.cooled_down(Some(101.0), Some(100.0)));
        assert_eq!(
            Trigger {
                algorithm: "greedy",
                max_moves: Some(4),
                max_slots_per_remap: Some(1),
                ..t
            }
            .label(),
            "greedy, operator trigger (imbalanceThreshold 1.20, hysteresis 0.05, \
             maxLayersPerRemap 8, maxMovesPerLayer 4, maxBytesPerRemap 1 expert, \
             replanIntervalSeconds 300)"
        );
        assert_eq!(
            OPERATOR_DEFAULTS.label(),
            "joint, operator trigger (imbalanceThreshold 1.20, hysteresis 0.05, maxLayersPerRemap 8)"
        );
    }
}
