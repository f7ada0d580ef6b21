//! Backend selection (`--backend`).

use anyhow::{Result, bail};

use crate::config::BackendChoice;

/// The compute backend in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Cpu,
    Cuda,
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Cuda => "cuda",
        }
    }

    /// The bytes rank 0 hands out at rendezvous: an NCCL unique id on CUDA, random bytes on
    /// the CPU backend (which needs none).
    pub fn unique_id(&self) -> Result<Vec<u8>> {
        match self {
            Backend::Cpu => Ok(crate::comm::random_unique_id()),
            Backend::Cuda => crate::cuda_exec::nccl_unique_id(),
        }
    }
}

/// `auto`: CUDA when a GPU, the CUDA libraries and NCCL are usable, else the CPU backend.
pub fn resolve(choice: BackendChoice) -> Result<Backend> {
    match choice {
        BackendChoice::Cpu => Ok(Backend::Cpu),
        BackendChoice::Cuda => match crate::cuda_exec::unavailable() {
            Some(why) => bail!("--backend cuda (env MOE_BACKEND): {why}"),
            None => Ok(Backend::Cuda),
        },
        BackendChoice::Auto => match crate::cuda_exec::unavailable() {
            Some(why) => {
                tracing::info!("using the CPU backend: {why}");
                Ok(Backend::Cpu)
            }
            None => Ok(Backend::Cuda),
        },
    }
}
