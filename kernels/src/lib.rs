//! Device computations of one expert-parallel MoE layer, with CPU references.
