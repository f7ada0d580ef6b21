//! Expert-parallel load balancing (EPLB): where every expert replica lives.
