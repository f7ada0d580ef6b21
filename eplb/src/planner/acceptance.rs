//! The operator's rules around a plan (`operator::remap`), kept here so that the rolling
//! benchmark and `moectl backtest` replay exactly what the live loop does: which layers a remap
//! takes ([`worst_first`]), how many slots each layer's plan may change ([`layer_move_cap`]),
//! which planned layers are worth their moves ([`accept_layers`], [`accept_paced`]) and how many
//! of them one remap deploys ([`within_budget`]).

/// Layers sorted worst first (ties by index), keeping the finite PARs at or above `floor`: the
/// order in which the operator's remaps take layers (`operator::remap::decide`), and the
/// benchmark's replay of that rule ([`crate::bench::rolling::Trigger`]).
pub fn worst_first(layer_par: &[f64], floor: f64) -> Vec<usize> {
    let mut layers: Vec<usize> = (0..layer_par.len())
        .filter(|&l| layer_par[l].is_finite() && layer_par[l] >= floor)
        .collect();
    layers.sort_by(|&a, &b| layer_par[b].total_cmp(&layer_par[a]).then(a.cmp(&b)));
    layers
}

/// The planned layers worth their moves, as the operator keeps them after planning
/// (`operator::remap::accept_plan`, and the benchmark's replay of its trigger), in the order
/// they are deployed (and the byte budget takes them): the layers whose predicted PAR is below
/// the PAR before (both on the window the trigger measured). For a remap the threshold
/// triggered (`threshold_triggered`) none unless some layer's PAR drops by at least
/// `hysteresis` on its own (otherwise the planner cannot do better and a remap would only
/// churn); those layers come first, then the others the plan improves, which ride along. A
/// layer the planner cannot improve enough (one hot expert and no replica to spare) therefore
/// does not hold back the layers it can, and under a byte budget it waits behind them.
/// `planned`: in the order requested, worst first.
pub fn accept_layers(
    threshold_triggered: bool,
    planned: &[PlannedLayer],
    hysteresis: f64,
) -> Vec<usize> {
    let floor = if threshold_triggered { hysteresis } else { 0.0 };
    worth_first(
        planned
            .iter()
            .filter(|l| l.improves())
            .map(|l| (l.layer, l.gain() >= floor)),
    )
}

/// Whether a plan was refused although it improves some layer: nothing `accepted`, and a
/// layer of `planned` better than before. Under a move cap, the operator then plans once more
/// without the cap for [`accept_paced`] (`operator::remap::paced_plan_cap`, and the replay).
pub fn refused_improvement(planned: &[PlannedLayer], accepted: &[usize]) -> bool {
    accepted.is_empty() && planned.iter().any(PlannedLayer::improves)
}

/// The improved layers (`(layer, worth its moves on its own)`, in the order requested): none
/// unless one is worth it; those first, then the rest in order.
fn worth_first(improved: impl Iterator<Item = (usize, bool)>) -> Vec<usize> {
    let (worth, riders): (Vec<_>, Vec<_>) = improved.partition(|&(_, w)| w);
    if worth.is_empty() {
        return Vec::new();
    }
    worth.into_iter().chain(riders).map(|(l, _)| l).collect()
}

/// The operator's budget per remap (`operator::remap::apply_byte_budget`, replayed by
/// `moectl backtest`): the longest prefix of `layers` (`(layer, cost)`, in the order they are
/// deployed: [`accept_layers`]'s) whose summed cost fits `budget` (any unit: bytes, slots). A layer
/// larger than the whole budget is never forced: it and every layer after it wait.
pub fn within_budget(layers: &[(usize, u64)], budget: Option<u64>) -> Vec<usize> {
    let Some(budget) = budget else {
        return layers.iter().map(|&(l, _)| l).collect();
    };
    let mut used = 0u64;
    let mut out = Vec::new();
    for &(layer, cost) in layers {
        let Some(total) = used.checked_add(cost) else {
            break;
        };
        if total > budget {
            break;
        }
        used = total;
        out.push(layer);
    }
    out
}

/// The slots one layer's plan may change under the operator's budgets: `maxMovesPerLayer`,
/// and no more than a remap's byte budget holds in whole experts (`budget_slots`), since a
/// layer planned to move more could never be deployed (the budget would skip it on every
/// remap). A budget of at least a layer's `slots` binds nothing and is not passed on (a cap
/// also changes how `joint` weighs the windows); one under a whole expert is left to the byte
/// budget, which then skips the remap as over budget.
pub fn layer_move_cap(
    max_moves: Option<usize>,
    budget_slots: Option<usize>,
    slots: usize,
) -> Option<usize> {
    let by_budget = budget_slots.filter(|&b| b > 0 && b < slots);
    match (max_moves, by_budget) {
        (Some(m), Some(b)) => Some(m.min(b)),
        (m, b) => m.or(b),
    }
}

/// One planned layer as the acceptance rules weigh it: its PAR before and as predicted, both
/// on the window the trigger measured, and the slots the plan changes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlannedLayer {
    pub layer: usize,
    pub par_before: f64,
    pub par_predicted: f64,
    pub moved_slots: usize,
}

impl PlannedLayer {
    /// How much the plan lowers the layer's PAR (negative: raises it).
    pub fn gain(&self) -> f64 {
        self.par_before - self.par_predicted
    }

    /// Whether the plan lowers the layer's PAR at all (beyond rounding).
    pub fn improves(&self) -> bool {
        self.par_predicted < self.par_before - 1e-9
    }
}

/// [`accept_layers`] for a threshold-triggered remap whose plan was held to a move cap
/// (`cap` slots a layer: `maxMovesPerLayer`, or what `maxBytesPerRemap` holds,
/// [`layer_move_cap`]). `paced`: the capped plan's layers; `unpaced`: the same layers planned
/// without the cap.
///
/// The hysteresis asks whether rebalancing a layer is worth doing at all; a cap only sets its
/// pace. So a layer whose capped step misses the hysteresis still counts as clearing it (as
/// in [`accept_layers`]: it lets the remap go ahead and comes before the layers that ride
/// along) when the cap bound it (its unpaced plan moves more than `cap` slots), that plan
/// clears the hysteresis, and the step earns its share of it: the hysteresis times the slots
/// the step moves over the slots the unpaced plan moves. Without this a budget of a few experts
/// can never clear the hysteresis once the easy moves are made, and the layer stays imbalanced
/// although every step would improve it; with it, a step that moves a fifth of the unpaced
/// plan's slots and gains less than a fifth of the hysteresis carries no remap (it may still
/// ride along behind a layer that does), and neither does a step the cap did not bind.
/// (`incremental` limits its own moves even without a cap, to an eighth of the slots: under a
/// cap above that, its steps are never bound.)
pub fn accept_paced(
    paced: &[PlannedLayer],
    unpaced: &[PlannedLayer],
    hysteresis: f64,
    cap: usize,
) -> Vec<usize> {
    let worth = |step: &PlannedLayer| {
        let gain = step.gain();
        gain >= hysteresis
            || unpaced
                .iter()
                .find(|whole| whole.layer == step.layer)
                .is_some_and(|whole| {
                    let share = step.moved_slots as f64 / whole.moved_slots.max(1) as f64;
                    whole.moved_slots > cap
                        && whole.gain() >= hysteresis
                        && gain >= hysteresis * share
                })
    };
    worth_first(
        paced
            .iter()
            .filter(|step| step.improves())
            .map(|step| (step.layer, worth(step))),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planned(
        layer: usize,
        par_before: f64,
        par_predicted: f64,
        moved_slots: usize,
    ) -> PlannedLayer {
        PlannedLayer {
            layer,
            par_before,
            par_predicted,
            moved_slots,
        }
    }

    #[test]
    fn a_remap_needs_one_layer_past_the_hysteresis_and_the_others_ride_along() {
        // Layer 0 (the worst) gains 0.02, layer 1 gains 0.09, layer 2 gets worse.
        let plan = [
            planned(0, 1.23, 1.21, 2),
            planned(1, 1.20, 1.11, 2),
            planned(2, 1.18, 1.19, 2),
        ];
        // Layer 1 carries the remap and goes first; layer 0 rides along behind it.
        assert_eq!(accept_layers(true, &plan, 0.05), vec![1, 0]);
        assert_eq!(accept_layers(true, &plan, 0.0), vec![0, 1]);
        // Not threshold-triggered (a manual remap): every improving layer, in order.
        assert_eq!(accept_layers(false, &plan, 0.05), vec![0, 1]);
        // No layer gains the hysteresis: nothing.
        assert!(accept_layers(true, &plan, 0.1).is_empty());
        // Refused although layers 0 and 1 improve; not when accepted, nor when none improves.
        assert!(refused_improvement(&plan, &[]));
        assert!(!refused_improvement(&plan, &[1, 0]));
        assert!(!refused_improvement(&plan[2..], &[]));
    }

    #[test]
    fn a_capped_step_toward_a_worthwhile_plan_is_taken_by_its_share_of_the_hysteresis() {
        // Unpaced: 10 slots take layer 0 from 1.40 to 1.05, well past a hysteresis of 0.05.
        // The capped step moves 2 of them and gains 0.03: under the whole hysteresis
        // (accept_layers refuses it) but above its share, 0.05 x 2/10 = 0.01. Layer 1's
        // unpaced plan gains 0.04 only: it does not carry a remap, but rides along.
        let unpaced = [planned(0, 1.40, 1.05, 10), planned(1, 1.30, 1.26, 4)];
        let paced = [planned(0, 1.40, 1.37, 2), planned(1, 1.30, 1.28, 2)];
        assert!(accept_layers(true, &paced, 0.05).is_empty());
        assert_eq!(accept_paced(&paced, &unpaced, 0.05, 2), vec![0, 1]);
        assert!(accept_paced(&paced[1..], &unpaced, 0.05, 2).is_empty());
        // A step that gains less than its share is churn.
        let timid = [planned(0, 1.40, 1.395, 2)];
        assert!(accept_paced(&timid, &unpaced, 0.05, 2).is_empty());
        // A cap the unpaced plan fits in bound nothing: the step needs the whole hysteresis.
        assert!(accept_paced(&paced, &unpaced, 0.05, 10).is_empty());
        // A step that clears the hysteresis by itself needs no destination.
        assert_eq!(
            accept_paced(&[planned(1, 1.30, 1.20, 2)], &[], 0.05, 2),
            vec![1]
        );
        // A step worth its share carries the remap and goes before a rider requested ahead of
        // it (layer 1 gains 0.02, its uncapped plan 0.04).
        let rider_first = [planned(1, 1.45, 1.43, 2), planned(0, 1.40, 1.37, 2)];
        assert_eq!(accept_paced(&rider_first, &unpaced, 0.05, 2), vec![0, 1]);
        // A step that improves nothing is refused whatever the destination.
        assert!(accept_paced(&[planned(0, 1.40, 1.40, 0)], &unpaced, 0.0, 2).is_empty());
    }
}
