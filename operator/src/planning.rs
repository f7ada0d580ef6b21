//! Everything the operator asks of the `eplb` crate, in one place.

use moe_api::{LoadReport, PlacementDocument};

use crate::crd::{MoEDeploymentSpec, PlacementStrategy};

/// Redundant experts in effect: the spec's, or the smallest valid number.
pub fn effective_redundant(spec: &MoEDeploymentSpec) -> u32 {
    match spec.expert_parallel.redundant_experts {
        Some(r) => r,
        None => eplb::smallest_valid_redundant(
            spec.model.num_experts as usize,
            spec.expert_parallel.ranks.max(1) as usize,
        ) as u32,
    }
}

/// The eplb shape of one layer of the deployment.
pub fn shape(spec: &MoEDeploymentSpec, redundant: u32) -> Result<eplb::Shape, String> {
    eplb::Shape::new(
        spec.model.num_experts as usize,
        redundant as usize,
        spec.expert_parallel.ranks as usize,
        spec.num_nodes() as usize,
        spec.model.expert_groups as usize,
    )
    .map_err(|e| e.to_string())
}

/// Whether a committed document fits the spec's shape (same layers, experts, ranks, nodes and
/// slots). When it does not, the shape changed: the placement is re-initialised and the group
/// replaced.
pub fn document_matches(doc: &PlacementDocument, spec: &MoEDeploymentSpec, redundant: u32) -> bool {
    doc.num_layers == spec.model.num_layers as usize
        && doc.num_logical_experts == spec.model.num_experts as usize
        && doc.num_ranks == spec.expert_parallel.ranks as usize
        && doc.num_nodes == spec.num_nodes() as usize
        && doc.num_slots() == (spec.model.num_experts + redundant) as usize
        && doc.validate().is_ok()
}

/// Generation-`generation` placement from the Linear or RoundRobin strategy.
pub fn initial_document(
    spec: &MoEDeploymentSpec,
    redundant: u32,
    generation: u64,
) -> Result<PlacementDocument, String> {
    let strategy = match spec.placement.strategy {
        PlacementStrategy::Linear => eplb::InitialStrategy::Linear,
        PlacementStrategy::RoundRobin => eplb::InitialStrategy::RoundRobin,
        PlacementStrategy::Static => {
            return Err("the Static strategy is imported, not computed".into());
        }
    };
    let shape = shape(spec, redundant)?;
    let placement = eplb::initial_placement(strategy, spec.model.num_layers as usize, &shape)
        .map_err(|e| e.to_string())?;
    Ok(placement.to_document(generation))
}

/// Imports a vllm-ascend expert map and checks it against the model.
pub fn import_static(
    spec: &MoEDeploymentSpec,
    redundant: u32,
    text: &str,
    generation: u64,
) -> Result<PlacementDocument, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let placement = eplb::Placement::from_ascend_expert_map(
        &value,
        Some(spec.model.num_experts as usize),
        spec.num_nodes() as usize,
    )
    .map_err(|e| e.to_string())?;
    let shape = shape(spec, redundant)?;
    placement.check_shape(&shape).map_err(|e| e.to_string())?;
    if placement.num_layers != spec.model.num_layers as usize {
        return Err(format!(
            "the map has {} layers, spec.model.numLayers is {}",
            placement.num_layers, spec.model.num_layers
        ));
    }
    Ok(placement.to_document(generation))
}

/// Measured PAR per layer: rank loads are the slot counts summed over each rank's slots.
pub fn measured_layer_par(doc: &PlacementDocument, slot_counts: &[Vec<f64>]) -> Vec<f64> {
    let ranks = doc.num_ranks.max(1);
    slot_counts
        .iter()
        .take(doc.num_layers)
        .map(|row| {
            let s = row.len() / ranks;
            if s == 0 {
                return 1.0;
            }
            let loads: Vec<f64> = (0..ranks)
                .map(|r| row[r * s..r * s + s].iter().sum())
                .collect();
            eplb::metrics::par(&loads)
        })
        .collect()
}

/// Group load per layer and logical expert, from every rank's report.
pub fn logical_load(reports: &[LoadReport], doc: &PlacementDocument) -> Vec<Vec<f64>> {
    let summed = LoadReport::sum_slot_counts(reports);
    LoadReport::logical_load(&summed, doc)
}

/// Planner names to suggest: the CRD's list.
pub use crate::crd::ALGORITHMS;

/// Whether `eplb` knows a planner of this name.
pub fn planner_known(name: &str) -> bool {
    planner_check(name).is_ok()
}

/// A plan: the full next document (layers not planned are unchanged) and what each planned
/// layer gains.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanOutcome {
    pub document: PlacementDocument,
    /// What each planned layer gains, on the current window.
    pub layers: Vec<eplb::PlannedLayer>,
    /// Statistics windows planned on: the current one and the past ones kept.
    pub windows: usize,
}

/// Plans the given layers with the named algorithm on the group's logical load: the current
/// window `load`, and the closed windows before it (`past`, oldest first; empty: plan from
/// the current window alone), each layer changing at most `max_moves` slots (the operator
/// passes [`max_moves`]). Predicted and previous PAR are reported on the current window.
#[allow(clippy::too_many_arguments)]
pub fn plan(
    algorithm: &str,
    spec: &MoEDeploymentSpec,
    redundant: u32,
    current: &PlacementDocument,
    load: &[Vec<f64>],
    past: &[Vec<Vec<f64>>],
    layers: &[usize],
    max_moves: Option<usize>,
) -> Result<PlanOutcome, String> {
    let shape = shape(spec, redundant)?;
    let previous = eplb::Placement::from_document(current).map_err(|e| e.to_string())?;
    let (next, windows) = run_planner(algorithm, &shape, &previous, load, past, layers, max_moves)?;
    let mut document = current.clone();
    let mut outcomes = Vec::new();
    for &layer in layers {
        let (Some(old_row), Some(new_row), Some(l)) = (
            previous.phy2log.get(layer),
            next.phy2log.get(layer),
            load.get(layer),
        ) else {
            continue;
        };
        let par_before = eplb::metrics::par(&eplb::rank_loads(old_row, l, shape.num_ranks));
        let par_predicted = eplb::metrics::par(&eplb::rank_loads(new_row, l, shape.num_ranks));
        let moved_slots = old_row.iter().zip(new_row).filter(|(a, b)| a != b).count();
        outcomes.push(eplb::PlannedLayer {
            layer,
            par_before,
            par_predicted,
            moved_slots,
        });
        if let Some(row) = document.phy2log.get_mut(layer) {
            *row = new_row.iter().map(|&e| e as u32).collect();
        }
    }
    Ok(PlanOutcome {
        document,
        layers: outcomes,
        windows,
    })
}

/// Keeps only the given layers of `planned`, the rest from `current` (after budget and
/// acceptance trimmed the layer list), with the next generation number.
pub fn restrict(
    current: &PlacementDocument,
    planned: &PlacementDocument,
    layers: &[usize],
    generation: u64,
) -> PlacementDocument {
    let mut doc = current.clone();
    doc.generation = generation;
    for &l in layers {
        if let (Some(dst), Some(src)) = (doc.phy2log.get_mut(l), planned.phy2log.get(l)) {
            dst.clone_from(src);
        }
    }
    doc
}

// --- the planner call -------------------------------------------------------------------------

fn planner_check(name: &str) -> Result<(), String> {
    eplb::planner_by_name(name)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// `spec.eplb.maxBytesPerRemap` in bytes (`None`: unset, or not a quantity, which admission
/// refuses).
pub fn byte_budget(spec: &MoEDeploymentSpec) -> Option<u64> {
    let q = spec.eplb.max_bytes_per_remap.as_ref()?;
    crate::quantity::parse_bytes(&q.0)
}

/// Slots one layer's plan may change (`slots`: a layer's): `maxMovesPerLayer`, and no more
/// than `maxBytesPerRemap` holds ([`eplb::layer_move_cap`]).
pub fn max_moves(spec: &MoEDeploymentSpec, slots: usize) -> Option<usize> {
    let per_expert = crate::quantity::expert_bytes(spec.model.hidden, spec.model.intermediate);
    let budget_slots = byte_budget(spec)
        .map(|bytes| usize::try_from(bytes / per_expert.max(1)).unwrap_or(usize::MAX));
    let by_moves = spec.eplb.max_moves_per_layer.map(|m| m as usize);
    eplb::layer_move_cap(by_moves, budget_slots, slots)
}

fn run_planner(
    algorithm: &str,
    shape: &eplb::Shape,
    previous: &eplb::Placement,
    load: &[Vec<f64>],
    past: &[Vec<Vec<f64>>],
    layers: &[usize],
    max_moves: Option<usize>,
) -> Result<(eplb::Placement, usize), String> {
    let planner = eplb::planner_by_name(algorithm).map_err(|e| e.to_string())?;
    // Past windows of another shape or with counts no traffic gives (a worker that reported
    // something odd) are left out rather than failing the plan.
    let mut windows: Vec<Vec<Vec<f64>>> = past
        .iter()
        .filter(|w| {
            w.len() == load.len()
                && w.iter().zip(load).all(|(a, b)| a.len() == b.len())
                && w.iter().all(|row| eplb::load::check_counts(row).is_ok())
        })
        .cloned()
        .collect();
    windows.push(load.to_vec());
    let planned_on = windows.len();
    let history = eplb::LoadHistory::new(windows).map_err(|e| e.to_string())?;
    let mut request = eplb::PlanRequest::new(*shape, &history)
        .previous(previous)
        .layers(layers.to_vec());
    if let Some(m) = max_moves {
        request = request.max_moves(m);
    }
    let plan = planner.plan(&request).map_err(|e| e.to_string())?;
    Ok((plan.placement, planned_on))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::tests::sample_spec;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    #[test]
    fn every_suggested_algorithm_exists() {
        for name in ALGORITHMS {
            assert!(planner_known(name), "{name}");
        }
        for name in eplb::planner::ALGORITHMS {
            assert!(
                ALGORITHMS.contains(&name),
                "{name} missing from the suggestions"
            );
        }
        assert!(!planner_known("magic"));
    }

    #[test]
    fn past_windows_are_planned_as_episodes() {
        // Loads where the current window and the windows before it disagree on the hot expert.
        let spec = sample_spec();
        let redundant = effective_redundant(&spec);
        let doc = initial_document(&spec, redundant, 0).unwrap();
        let e = spec.model.num_experts as usize;
        let layers = spec.model.num_layers as usize;
        let hot = |expert: usize| -> Vec<Vec<f64>> {
            (0..layers)
                .map(|_| {
                    (0..e)
                        .map(|j| if j == expert { 100.0 } else { 1.0 })
                        .collect()
                })
                .collect()
        };
        let current = hot(0);
        let alone = plan("greedy", &spec, redundant, &doc, &current, &[], &[0], None).unwrap();
        let with_past = plan(
            "greedy",
            &spec,
            redundant,
            &doc,
            &current,
            &[hot(1), hot(1), hot(1)],
            &[0],
            None,
        )
        .unwrap();
        // Alone, only expert 0 is hot and gets the replicas; with three windows where expert
        // 1 was hot, expert 1 gets replicas too.
        let count =
            |d: &PlacementDocument, x: u32| d.phy2log[0].iter().filter(|&&v| v == x).count();
        assert!(count(&alone.document, 0) > count(&alone.document, 1));
        assert!(count(&with_past.document, 1) > count(&alone.document, 1));
        assert_eq!((alone.windows, with_past.windows), (1, 4));
        // A past window of another shape, or with a count no traffic gives (or a sum that
        // overflows), is left out, not an error.
        let odd = vec![vec![1.0; e + 1]; layers];
        let mut negative = hot(1);
        negative[0][3] = -1.0;
        let mut not_finite = hot(1);
        not_finite[1][2] = f64::NAN;
        let mut overflowing = hot(1);
        overflowing[0][0] = f64::MAX;
        overflowing[0][1] = f64::MAX;
        for bad in [odd, negative, not_finite, overflowing] {
            let p = plan(
                "greedy",
                &spec,
                redundant,
                &doc,
                &current,
                &[bad],
                &[0],
                None,
            )
            .unwrap();
            assert_eq!(p.document.phy2log, alone.document.phy2log);
            assert_eq!(p.windows, 1, "the bad window is not counted");
        }
    }

    #[test]
    fn a_byte_budget_caps_each_layers_moves() {
        let mut spec = sample_spec();
        let slots = 16;
        assert_eq!(max_moves(&spec, slots), None);
        let expert = crate::quantity::expert_bytes(spec.model.hidden, spec.model.intermediate);
        let budget =
            |experts: u64, extra: u64| Some(Quantity(format!("{}", experts * expert + extra)));
        spec.eplb.max_bytes_per_remap = budget(2, 1);
        assert_eq!(max_moves(&spec, slots), Some(2));
        spec.eplb.max_moves_per_layer = Some(1);
        assert_eq!(max_moves(&spec, slots), Some(1));
        spec.eplb.max_moves_per_layer = Some(5);
        assert_eq!(max_moves(&spec, slots), Some(2));
        // A budget of a whole layer binds no plan; one under an expert is the byte budget's
        // to refuse (OverBudget), not a plan that moves nothing.
        spec.eplb.max_bytes_per_remap = budget(16, 0);
        assert_eq!(max_moves(&spec, slots), Some(5));
        spec.eplb.max_moves_per_layer = None;
        assert_eq!(max_moves(&spec, slots), None);
        spec.eplb.max_bytes_per_remap = budget(0, expert - 1);
        assert_eq!(max_moves(&spec, slots), None);
        // Planned under a budget of two experts, a zipf-loaded layer's plan moves at most two
        // slots; without it, more.
        let redundant = effective_redundant(&spec);
        let doc = initial_document(&spec, redundant, 0).unwrap();
        let e = spec.model.num_experts as usize;
        let load: Vec<Vec<f64>> = (0..spec.model.num_layers as usize)
            .map(|_| {
                (0..e)
                    .map(|j| 1000.0 / (1.0 + j as f64).powf(1.5))
                    .collect()
            })
            .collect();
        let moved = |spec: &MoEDeploymentSpec| {
            let cap = max_moves(spec, doc.phy2log[0].len());
            plan("joint", spec, redundant, &doc, &load, &[], &[0], cap)
                .unwrap()
                .layers[0]
                .moved_slots
        };
        spec.eplb.max_bytes_per_remap = None;
        let free = moved(&spec);
        spec.eplb.max_bytes_per_remap = budget(2, 0);
        let capped = moved(&spec);
        assert!(free > 2, "{free}");
        assert!(capped > 0 && capped <= 2, "{capped}");
    }

    #[test]
    fn redundant_defaults_to_smallest_valid() {
        let mut spec = sample_spec();
        spec.expert_parallel.redundant_experts = None;
        spec.model.num_experts = 10;
        spec.expert_parallel.ranks = 4;
        assert_eq!(effective_redundant(&spec), 2);
        spec.model.num_experts = 16;
        assert_eq!(effective_redundant(&spec), 0);
    }

    #[test]
    fn initial_documents_fit_the_spec() {
        let spec = sample_spec();
        let doc = initial_document(&spec, 4, 0).unwrap();
        assert_eq!(doc.generation, 0);
        assert_eq!(doc.num_slots(), 20);
        assert!(document_matches(&doc, &spec, 4));
        let mut bigger = spec.clone();
        bigger.expert_parallel.ranks = 2;
        assert!(!document_matches(&doc, &bigger, 4));
    }

    #[test]
    fn static_map_round_trips_and_rejects_wrong_shapes() {
        let spec = sample_spec();
        let doc = initial_document(&spec, 4, 0).unwrap();
        let map = eplb::Placement::from_document(&doc)
            .unwrap()
            .to_ascend_expert_map();
        let text = map.to_string();
        let imported = import_static(&spec, 4, &text, 3).unwrap();
        assert_eq!(imported.phy2log, doc.phy2log);
        assert_eq!(imported.generation, 3);
        let mut other = spec.clone();
        other.model.num_layers = 5;
        assert!(import_static(&other, 4, &text, 0).is_err());
        assert!(import_static(&spec, 4, "{", 0).is_err());
    }

    #[test]
    fn measured_par_sums_each_ranks_slots() {
        let doc = PlacementDocument {
            generation: 0,
            num_layers: 1,
            num_logical_experts: 3,
            num_ranks: 2,
            num_nodes: 1,
            phy2log: vec![vec![0, 1, 2, 0]],
        };
        let par = measured_layer_par(&doc, &[vec![3.0, 1.0, 1.0, 1.0]]);
        assert!((par[0] - 4.0 / 3.0).abs() < 1e-9);
    }
}
