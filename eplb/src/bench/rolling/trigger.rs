//! The operator's live loop as the rolling runs replay it: when it remaps and which layers
//! (`operator::remap::decide`), and what it deploys of the plan (`operator::remap::accept_plan`,
//! through [`crate::accept_layers`]).

use crate::error::Result;
use crate::metrics::score;
use crate::placement::Placement;
use crate::planner::{accept_layers, worst_first};

/// When the operator's live loop remaps and which layers (`operator::remap::decide`): once
/// some layer's PAR, measured on the latest window under the placement in use, is above
/// `threshold`, every layer above `threshold - hysteresis` is replanned, worst first, at most
/// `max_layers` of them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Trigger {
    /// `spec.eplb.imbalanceThreshold`.
    pub threshold: f64,
    /// `spec.eplb.hysteresis`.
    pub hysteresis: f64,
    /// `spec.eplb.maxLayersPerRemap` (`None`: every layer).
    pub max_layers: Option<usize>,
}

/// The operator's defaults (the CRD's: threshold 1.2, hysteresis 0.05, 8 layers per remap).
pub const OPERATOR_DEFAULTS: Trigger = Trigger {
    threshold: 1.2,
    hysteresis: 0.05,
    max_layers: Some(8),
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

    /// The row's name, in the CRD's terms (`spec.eplb.*`).
    pub fn label(&self) -> String {
        format!(
            "joint, operator trigger (imbalanceThreshold {:.2}, hysteresis {:.2}, {})",
            self.threshold,
            self.hysteresis,
            self.max_layers
                .map_or("every layer".to_string(), |m| format!(
                    "maxLayersPerRemap {m}"
                ))
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

/// What the operator deploys of a triggered plan (`operator::remap::accept_plan`): the changed
/// layers the plan improves on the measured window, and nothing unless their worst PAR drops
/// by at least the trigger's hysteresis.
pub(super) fn accepted(
    deployed: &Placement,
    planned: Placement,
    latest: &[Vec<f64>],
    pars_before: &[f64],
    trigger: &Trigger,
) -> Result<Placement> {
    let pars_after = score(&planned, latest)?.per_layer;
    let changed: Vec<usize> = (0..planned.num_layers)
        .filter(|&l| planned.phy2log[l] != deployed.phy2log[l])
        .collect();
    let pick =
        |pars: &[f64]| -> Vec<(usize, f64)> { changed.iter().map(|&l| (l, pars[l])).collect() };
    let keep = accept_layers(
        true,
        &pick(pars_before),
        &pick(&pars_after),
        trigger.hysteresis,
    );
    if keep.len() == changed.len() {
        return Ok(planned);
    }
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
    fn only_the_layers_a_plan_improves_are_deployed_and_only_past_the_hysteresis() {
        // Two experts of 10 and two of 1 on 2 ranks: {0, 1} together is PAR 20 / 11, apart 1.
        let load = vec![vec![10.0, 10.0, 1.0, 1.0]; 2];
        let deployed = placement(&[[0, 1, 2, 3], [0, 2, 1, 3]]);
        let before = score(&deployed, &load).unwrap().per_layer;
        let trigger = OPERATOR_DEFAULTS;
        // Layer 0 improves (1.82 -> 1), layer 1 gets worse: only layer 0 moves.
        let planned = placement(&[[0, 2, 1, 3], [0, 1, 2, 3]]);
        let next = accepted(&deployed, planned.clone(), &load, &before, &trigger).unwrap();
        assert_eq!(next.phy2log, vec![vec![0, 2, 1, 3], vec![0, 2, 1, 3]]);
        // A drop of the worst PAR below the hysteresis deploys nothing.
        let strict = Trigger {
            hysteresis: 0.9,
            ..trigger
        };
        let next = accepted(&deployed, planned, &load, &before, &strict).unwrap();
        assert_eq!(next, deployed);
        // Every changed layer improving: the plan as it is.
        let planned = placement(&[[0, 2, 1, 3], [0, 2, 1, 3]]);
        let next = accepted(&deployed, planned.clone(), &load, &before, &trigger).unwrap();
        assert_eq!(next, planned);
    }
}
