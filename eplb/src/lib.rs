//! Expert-parallel load balancing (EPLB): where every expert replica lives.
//!
//! * [`Shape`]: experts, redundant slots, ranks, nodes, groups of one layer.
//! * [`Placement`]: `phy2log` per layer and every derived map (`log2phy`, `logcnt`,
//!   per-rank expert maps, the DeepEP trio), the operator's wire document and the
//!   vllm-ascend expert-map JSON.
//! * [`initial_placement`]: linear and round-robin placements before statistics exist.
//! * [`LoadHistory`]: per-window logical expert loads, parsed from the three load formats.
//! * [`metrics`]: rank loads, PAR, balancedness, migration cost.
//! * [`Planner`] and [`planner_by_name`]: `greedy`, `joint` (default), `incremental`.
//! * [`select_layers`]: threshold-with-hysteresis layer selection.
//! * [`synth`] and [`bench`]: deterministic synthetic traces and the benchmark protocol.
//!
//! No I/O and no GPU: everything here is pure computation on in-memory data.

pub mod bench;
pub mod error;
pub mod initial;
pub mod load;
pub mod metrics;
pub mod placement;
pub mod planner;
pub mod shape;
pub mod synth;

pub use error::{EplbError, Result};
pub use initial::{InitialStrategy, initial_placement};
pub use load::LoadHistory;
pub use metrics::{Migration, PlacementScore, layer_par, migration_cost, rank_loads};
pub use placement::Placement;
pub use planner::{
    DEFAULT_ALGORITHM, LayerPlan, LayerSelection, Plan, PlanRequest, Planner, planner_by_name,
    select_layers,
};
pub use shape::{Shape, smallest_valid_redundant};
