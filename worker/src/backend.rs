//! Backend selection (`--backend`).

use anyhow::{Result, bail};

use crate::config::BackendChoice;

/// The compute backend in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Cpu,
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
        }
    }

    /// The bytes rank 0 hands out at rendezvous (an NCCL unique id on CUDA).
    pub fn unique_id(&self) -> Vec<u8> {
        crate::comm::random_unique_id()
    }
}

/// Why the CUDA backend cannot be used on this machine / in this build.
pub fn cuda_unavailable() -> Option<String> {
    Some("the CUDA execution path is not wired into this build of moe-worker yet".into())
}

pub fn resolve(choice: BackendChoice) -> Result<Backend> {
    match choice {
        BackendChoice::Cpu => Ok(Backend::Cpu),
        BackendChoice::Cuda => match cuda_unavailable() {
            Some(why) => bail!("--backend cuda (env MOE_BACKEND): {why}"),
            None => Ok(Backend::Cpu),
        },
        BackendChoice::Auto => {
            if let Some(why) = cuda_unavailable() {
                tracing::warn!("using the CPU backend: {why}");
            }
            Ok(Backend::Cpu)
        }
    }
}
