//! Device computations of one expert-parallel MoE layer, with CPU references.
//!
//! * [`cpu`]: reference implementations (also the worker's CPU backend).
//! * [`fp8`]: FP8 E4M3 encoding and DeepSeek-V3's block quantisation (references).
//! * [`cuda`]: NVRTC-compiled CUDA kernels, cuBLAS expert FFN, NCCL all-to-all and weight
//!   movement, behind run-time detection ([`cuda::available`]).
//! * Shared types: [`Matrix`]/[`Bf16Matrix`], [`ExpertWeights`], [`GatingConfig`], [`TopK`],
//!   [`ReplicaMap`] with [`replica_hash`], [`EpTopology`], [`DispatchLayout`], [`RecvLayout`].

pub mod cpu;
pub mod cuda;
mod error;
pub mod fp8;
pub mod rng;
mod routing;
mod tensor;

/// The CUDA bindings this crate is built on (same version and features), for callers that
/// need raw access to device buffers (`DeviceMatrix::buf`) or streams.
pub use cudarc;
pub use error::{KernelError, Result};
pub use half::bf16;
pub use routing::{
    DispatchLayout, EpTopology, GatingConfig, GroupScore, RecvLayout, ReplicaMap, Scoring, TopK,
    replica_hash,
};
pub use tensor::{Bf16Matrix, ExpertBias, ExpertWeights, F32Matrix, Matrix};
