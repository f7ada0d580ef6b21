//! The product scenarios of issue 7 on a real local control plane (see docs/e2e.md): the Helm
//! chart installs the operator as a pod, MoEDeployments run real `moe-worker` processes on the
//! CPU backend through the kubelet stand-in, and every check reads the API server and the
//! workers' HTTP API. One test binary, so the harness's cluster limit applies to all of them.
//!
//! 1, 2: `install` · 3: `validation` · 4: `failures` · 5: `spec_changes` ·
//! 6 (benchmark, ignored): `scale` · 7 (measurement, ignored): `history` ·
//! 8: `upgrade` · 9: `serving` · 9 (issue 14): `pod_settings` · 10 (issue 14): `leader` ·
//! 11 (issue 13): `attention` · 12 (issue 14): `alerts` (a real Prometheus; `monitors`,
//! `prometheus`).
//!
//! Skipped (a printed `SKIPPED` line) when the control-plane binaries are not installed
//! (`e2e/bootstrap.sh`). The agent needs `moe-worker` and `moe-operator` built into the same
//! target directory (`cargo build --bins -p moe-worker -p moe-operator`).

mod alerts;
mod attention;
mod common;
mod failures;
mod history;
mod install;
mod leader;
mod monitors;
mod pod_settings;
mod prometheus;
mod scale;
mod serving;
mod spec_changes;
mod upgrade;
mod validation;
