//! The one error type of the crate.

use thiserror::Error;

/// Everything that can go wrong while building shapes, placements, loads or plans.
///
/// Every message is one line and names the offending value, so that a command line can print
/// it as is.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EplbError {
    /// The deployment shape is impossible (zero ranks, slots not divisible, ...).
    #[error("invalid shape: {0}")]
    Shape(String),
    /// A placement breaks an invariant or does not parse.
    #[error("invalid placement: {0}")]
    Placement(String),
    /// A load file or load history is malformed.
    #[error("invalid load: {0}")]
    Load(String),
    /// Two inputs disagree (placement vs. load, shape vs. previous placement, ...).
    #[error("mismatch: {0}")]
    Mismatch(String),
    /// `planner_by_name` was given a name it does not know.
    #[error(
        "unknown algorithm '{0}' (expected greedy, joint or incremental, or a benchmark baseline: greedy-global, flashlb-like, multi-episode-lpt)"
    )]
    UnknownAlgorithm(String),
    /// A plan request is inconsistent (bad threshold, layer out of range, ...).
    #[error("invalid request: {0}")]
    Request(String),
}

/// Result with [`EplbError`] as the default error.
pub type Result<T, E = EplbError> = std::result::Result<T, E>;
