//! Harness for a local Kubernetes control plane (filled in by the e2e issue).
