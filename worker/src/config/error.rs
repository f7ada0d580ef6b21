//! A configuration error: the flag at fault, its environment variable, why, and the kind the
//! operator shows as the Degraded reason.

/// A configuration error names the flag (and its environment variable) at fault.
#[derive(Debug, thiserror::Error)]
#[error("invalid --{flag} (env {env}): {reason}")]
pub struct ConfigError {
    pub flag: &'static str,
    pub env: &'static str,
    pub reason: String,
    pub kind: ConfigErrorKind,
}

/// What kind of configuration error ended the worker, for the `Reason: message` line it
/// leaves in its termination message (the operator shows it as the Degraded reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigErrorKind {
    /// A flag is malformed or contradicts another.
    Invalid,
    /// The checkpoint cannot be served (config, tensors, dtypes).
    CheckpointInvalid,
    /// The checkpoint is not the model the flags (spec.model) describe.
    ModelMismatch,
}

impl ConfigErrorKind {
    pub fn reason(self) -> &'static str {
        match self {
            ConfigErrorKind::Invalid => "WorkerConfigInvalid",
            ConfigErrorKind::CheckpointInvalid => "CheckpointInvalid",
            ConfigErrorKind::ModelMismatch => "ModelMismatch",
        }
    }
}

pub(crate) fn bad(flag: &'static str, env: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        flag,
        env,
        reason: reason.into(),
        kind: ConfigErrorKind::Invalid,
    }
}

/// A flag that disagrees with the checkpoint it describes.
pub(crate) fn mismatch(
    flag: &'static str,
    env: &'static str,
    reason: impl Into<String>,
) -> ConfigError {
    ConfigError {
        kind: ConfigErrorKind::ModelMismatch,
        ..bad(flag, env, reason)
    }
}

impl ConfigError {
    /// The one line a worker leaves in its termination message: `Reason: message`.
    pub fn termination_message(&self) -> String {
        format!("{}: {self}", self.kind.reason())
    }
}
