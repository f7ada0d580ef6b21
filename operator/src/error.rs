//! The reconciler's error: what stops a pass (and is retried with backoff by the controller
//! runtime).

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("serialization: {0}")]
    Serde(#[from] serde_json::Error),
    #[error("object has no {0}")]
    MissingObjectKey(&'static str),
    /// The API server refused an owned object's apply (reported in status and as an event).
    #[error("{0}")]
    Refused(crate::apply_refusal::Refusal),
}
