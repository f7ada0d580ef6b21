//! Error type of the crate.

/// Everything that can go wrong in this crate, on the CPU or the GPU.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// An argument has the wrong shape or is out of range (the message says which).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The CUDA driver, NVRTC, cuBLAS or NCCL library is not installed, or no GPU is visible.
    #[error("CUDA unavailable: {0}")]
    Unavailable(String),
    /// A CUDA driver call failed.
    #[error("CUDA driver error: {0}")]
    Driver(String),
    /// NVRTC failed to compile the kernels (the log is included).
    #[error("NVRTC compilation failed: {0}")]
    Compile(String),
    /// A cuBLAS call failed.
    #[error("cuBLAS error: {0}")]
    Cublas(String),
    /// An NCCL call failed. (`cudarc`'s `NcclError` does not implement `std::error::Error`,
    /// so it is carried as text.)
    #[error("NCCL error: {0}")]
    Nccl(String),
}

/// Result alias of the crate.
pub type Result<T, E = KernelError> = std::result::Result<T, E>;

/// Shorthand for an [`KernelError::Invalid`] error.
pub(crate) fn invalid<T>(msg: impl Into<String>) -> Result<T> {
    Err(KernelError::Invalid(msg.into()))
}
