//! Expert-parallel load balancing (EPLB): where every expert replica lives.
//!
//! * [`Shape`]: experts, redundant slots, ranks, nodes, groups of one layer.
//! * [`Placement`]: `phy2log` per layer and every derived map (`log2phy`, `logcnt`,
//!   per-rank expert maps, the DeepEP trio), the operator's wire document and the
//!   vllm-ascend expert-map JSON.
//! * [`formats`]: the other engines' files (vLLM, SGLang including its `torch.save` dump,
//!   vllm-ascend, the OpenEvolve EPLB data set) and the decoder-layer layout.
//! * [`initial_placement`]: linear and round-robin placements before statistics exist.
//! * [`LoadHistory`]: per-window logical expert loads, parsed from the JSON load formats.
//! * [`metrics`]: rank loads, PAR, balancedness, migration cost.
//! * [`Planner`] and [`planner_by_name`]: `greedy`, `joint` (default), `incremental`.
//! * [`select_layers`]: threshold-with-hysteresis layer selection.
//! * [`traffic`]: cross-node token traffic and cross-node weight moves.
//! * [`synth`] and [`bench`](mod@bench): deterministic synthetic traces and the benchmark protocol.
//!
//! No I/O and no GPU: everything here is pure computation on in-memory data.
//!
//! ```
//! use eplb::{InitialStrategy, LoadHistory, PlanRequest, Shape, initial_placement, planner_by_name};
//!
//! // 8 experts, 4 redundant slots, 4 ranks on 1 node, no expert groups.
//! let shape = Shape::new(8, 4, 4, 1, 1)?;
//! let current = initial_placement(InitialStrategy::RoundRobin, 2, &shape)?;
//! // Two windows of [layer][expert] token counts, oldest first.
//! let history = LoadHistory::from_json_str(
//!     r#"{"windows": [[[90, 50, 20, 10, 5, 5, 5, 3], [10, 10, 10, 10, 10, 10, 10, 10]],
//!                     [[60, 70, 10, 30, 5, 2, 9, 3], [12, 9, 10, 11, 10, 10, 9, 10]]]}"#,
//! )?;
//! let plan = planner_by_name("joint")?.plan(
//!     &PlanRequest::new(shape, &history).previous(&current).max_moves(6).threshold(1.2),
//! )?;
//! assert!(plan.layers[0].par < plan.layers[0].previous_par.unwrap());
//! assert!(!plan.changed_layers.contains(&1)); // balanced layer left alone
//! let doc = plan.placement.to_document(1); // what the operator commits
//! assert_eq!(doc.validate(), Ok(()));
//! # Ok::<(), eplb::EplbError>(())
//! ```

pub mod bench;
pub mod error;
pub mod formats;
pub mod initial;
pub mod load;
pub mod metrics;
pub mod placement;
pub mod planner;
pub mod shape;
pub mod synth;
pub mod traffic;

pub use error::{EplbError, Result};
pub use initial::{InitialStrategy, initial_placement};
pub use load::LoadHistory;
pub use metrics::{
    Balancedness, Migration, PlacementScore, balancedness, layer_par, migration_cost, rank_loads,
};
pub use placement::Placement;
pub use planner::{
    DEFAULT_ALGORITHM, LayerPlan, LayerSelection, Plan, PlanRequest, PlannedLayer, Planner,
    accept_layers, accept_paced, layer_move_cap, par_lower_bound, planner_by_name,
    refused_improvement, select_layers, within_budget, worst_first,
};
pub use shape::{Shape, smallest_valid_redundant};
