//! `spec.serving` and `status.serving`: the worker group as an expert tier that attention
//! instances call through the forward API (docs/forward-api.md, docs/operator.md "Serving").
//!
//! Whether a group serves is decided once, by [`MoEDeploymentSpec::serving_enabled`]:
//! `spec.serving.enabled` when set; otherwise serving is on for a real checkpoint
//! (`spec.weights.persistentVolumeClaim`) and off for synthetic weights, and `spec.traffic`
//! (the synthetic burn-in generator) switches the default off. An explicit `enabled: true` with
//! `spec.traffic` is refused at admission: a worker runs one traffic source.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::ValidationRule;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{MoEDeploymentSpec, SpecError};

/// Forward port of a group whose `spec.serving.port` is unset.
pub const DEFAULT_FORWARD_PORT: u16 = 8300;
/// Rows per request a worker accepts unless `spec.serving.maxRowsPerRequest` says otherwise
/// (the worker's own default).
pub const DEFAULT_MAX_ROWS_PER_REQUEST: u32 = 4096;
/// Upper bound of `maxRowsPerRequest`: 2^20 rows of a 7168-wide bf16 model are 14 GiB, far
/// beyond one request.
pub const MAX_ROWS_PER_REQUEST_LIMIT: u32 = 1 << 20;

/// The forward API of the worker group: attention instances send the hidden states of their
/// tokens for one MoE layer and get the MoE block's output back.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServingSpec {
    /// Serve the forward API. Unset: on for a checkpoint (`spec.weights.persistentVolumeClaim`)
    /// without `spec.traffic`, off otherwise. With `false` the workers run the synthetic
    /// generator (`spec.traffic`, burn-in) and the operator creates no expert Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Port of the forward API on the pod's first rank (rank i of a pod with `ranksPerPod` > 1
    /// listens on port + i). Must not overlap `spec.worker.httpPort` or `commPort`: only the
    /// operator reaches the control port, only the selected clients this one.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// Rows (tokens) one request may carry; larger requests are answered 413.
    #[serde(default = "default_max_rows")]
    #[schemars(range(min = 1, max = 1048576))]
    pub max_rows_per_request: u32,
    /// Pods allowed to call the forward port (the attention instances). Unset: pods labelled
    /// `moe-operator.github.io/expert-client: <name of this MoEDeployment>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clients: Option<LabelSelector>,
    /// Namespaces of the client pods. Unset: the MoEDeployment's own namespace only (the
    /// client-token Secret lives there too; clients elsewhere need a copy of it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
}

fn default_port() -> u16 {
    DEFAULT_FORWARD_PORT
}
fn default_max_rows() -> u32 {
    DEFAULT_MAX_ROWS_PER_REQUEST
}

impl Default for ServingSpec {
    fn default() -> Self {
        Self {
            enabled: None,
            port: DEFAULT_FORWARD_PORT,
            max_rows_per_request: DEFAULT_MAX_ROWS_PER_REQUEST,
            clients: None,
            namespace_selector: None,
        }
    }
}

/// `status.serving`: where attention instances reach the expert tier, and how much it serves.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServingStatus {
    /// The expert Service, `<name>-experts.<namespace>.svc:<port>`: any rank answers.
    pub endpoint: String,
    /// Each rank's own forward endpoint (`<pod>.<name>-workers.<namespace>.svc:<port>`), in
    /// rank order, for clients that spread requests over ranks themselves.
    #[serde(default)]
    pub rank_endpoints: Vec<String>,
    /// The Secret holding the client token (key `token`).
    pub client_token_secret: String,
    /// Rows per second the group answered through the forward API (sum over ranks of
    /// `servedRowsPerSecond` in `GET /v1/status`), as of the last poll of ready workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_rows_per_second: Option<f64>,
}

/// CEL rules on `spec` about serving (they read `spec.worker` and `spec.expertParallel` too,
/// so they sit on the spec, attached by [`super::definition`]).
pub fn spec_rules() -> Vec<ValidationRule> {
    // A pod with k ranks listens on port..port+k-1 of each kind.
    let k = "(has(self.expertParallel.ranksPerPod) ? self.expertParallel.ranksPerPod : 1)";
    let apart = |other: &str| {
        format!(
            "(self.serving.port + {k} <= self.worker.{other} || self.worker.{other} + {k} <= self.serving.port)"
        )
    };
    vec![
        ValidationRule {
            rule: format!(
                "!has(self.serving) || ({} && {})",
                apart("httpPort"),
                apart("commPort")
            ),
            message: Some(
                "spec.serving.port must differ from spec.worker.httpPort and spec.worker.commPort (with ranksPerPod k, each uses port..port+k-1): choose another spec.serving.port, e.g. 8300"
                    .into(),
            ),
            field_path: Some(".serving.port".into()),
            reason: Some("FieldValueInvalid".into()),
            ..Default::default()
        },
        ValidationRule {
            rule: format!("!has(self.serving) || self.serving.port + {k} <= 65536"),
            message: Some(
                "spec.serving.port + spec.expertParallel.ranksPerPod - 1 must be at most 65535 (rank i of a pod listens on port + i): lower spec.serving.port"
                    .into(),
            ),
            field_path: Some(".serving.port".into()),
            reason: Some("FieldValueInvalid".into()),
            ..Default::default()
        },
        ValidationRule {
            rule: "!(has(self.serving) && has(self.serving.enabled) && self.serving.enabled && has(self.traffic))".into(),
            message: Some(
                "spec.serving.enabled: true and spec.traffic exclude each other (a worker serves the forward API or runs the synthetic burn-in generator): remove spec.traffic to serve, or set spec.serving.enabled to false for a burn-in"
                    .into(),
            ),
            field_path: Some(".traffic".into()),
            reason: Some("FieldValueForbidden".into()),
            ..Default::default()
        },
    ]
}

impl MoEDeploymentSpec {
    /// Whether the workers serve the forward API (see the module documentation).
    pub fn serving_enabled(&self) -> bool {
        match self.serving.as_ref().and_then(|s| s.enabled) {
            Some(explicit) => explicit,
            None => self.weights.persistent_volume_claim.is_some() && self.traffic.is_none(),
        }
    }

    /// `spec.serving` with its defaults filled in.
    pub fn serving_or_default(&self) -> ServingSpec {
        self.serving.clone().unwrap_or_default()
    }

    /// The serving checks of [`MoEDeploymentSpec::validate`] (the CEL rules above, and the
    /// port of a group that serves by default without a `spec.serving`).
    pub(super) fn validate_serving(&self) -> Result<(), SpecError> {
        let s = self.serving_or_default();
        let err = |field, message: String| Err(SpecError { field, message });
        if self.serving.as_ref().and_then(|s| s.enabled) == Some(true) && self.traffic.is_some() {
            return err(
                "spec.traffic",
                "excludes spec.serving.enabled: true (one traffic source per worker): remove \
                 spec.traffic, or set spec.serving.enabled to false for a burn-in"
                    .into(),
            );
        }
        if s.max_rows_per_request == 0 || s.max_rows_per_request > MAX_ROWS_PER_REQUEST_LIMIT {
            return err(
                "spec.serving.maxRowsPerRequest",
                format!("must be between 1 and {MAX_ROWS_PER_REQUEST_LIMIT}"),
            );
        }
        if !self.serving_enabled() && self.serving.is_none() {
            return Ok(());
        }
        let k = self.ranks_per_pod();
        let range = |p: u16| (u32::from(p), u32::from(p) + k - 1);
        let (fwd_lo, fwd_hi) = range(s.port);
        if fwd_hi > 65535 {
            return err(
                "spec.serving.port",
                format!(
                    "port + ranksPerPod - 1 is {fwd_hi}, above 65535 (rank i of a pod listens on \
                     port + i): lower spec.serving.port"
                ),
            );
        }
        for (what, p) in [
            ("httpPort", self.worker.http_port),
            ("commPort", self.worker.comm_port),
        ] {
            let (lo, hi) = range(p);
            if fwd_lo <= hi && lo <= fwd_hi {
                return err(
                    "spec.serving.port",
                    format!(
                        "{} overlaps spec.worker.{what} ({p}; each port kind uses port..port+{}): \
                         choose another spec.serving.port",
                        s.port,
                        k - 1
                    ),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::tests::sample_spec;
    use crate::crd::{PvcWeights, TrafficSpec};

    fn pvc() -> crate::crd::WeightsSpec {
        crate::crd::WeightsSpec {
            synthetic: None,
            persistent_volume_claim: Some(PvcWeights {
                claim_name: "w".into(),
                path: None,
            }),
        }
    }

    #[test]
    fn serving_defaults_follow_the_weights_and_the_burn_in() {
        let mut s = sample_spec();
        assert!(!s.serving_enabled(), "synthetic weights do not serve");
        s.weights = pvc();
        assert!(s.serving_enabled(), "a checkpoint serves");
        s.traffic = Some(TrafficSpec::default());
        assert!(!s.serving_enabled(), "spec.traffic means burn-in");
        s.traffic = None;
        s.serving = Some(ServingSpec {
            enabled: Some(false),
            ..Default::default()
        });
        assert!(!s.serving_enabled());
        let mut synthetic = sample_spec();
        synthetic.serving = Some(ServingSpec {
            enabled: Some(true),
            ..Default::default()
        });
        assert!(synthetic.serving_enabled());
        synthetic.validate().unwrap();
    }

    #[test]
    fn serving_json_defaults() {
        let v: ServingSpec = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(v, ServingSpec::default());
        assert_eq!(v.port, 8300);
        assert_eq!(v.max_rows_per_request, 4096);
    }

    #[test]
    fn validate_refuses_overlapping_ports_and_two_traffic_sources() {
        let on = |port| ServingSpec {
            enabled: Some(true),
            port,
            ..Default::default()
        };
        let mut s = sample_spec();
        s.serving = Some(on(8080));
        let e = s.validate().unwrap_err();
        assert_eq!(e.field, "spec.serving.port");
        assert!(e.message.contains("httpPort"), "{}", e.message);
        s.serving = Some(on(29500));
        assert!(s.validate().unwrap_err().message.contains("commPort"));
        // Two ranks per pod: forward 8079..8080 overlaps http 8080..8081.
        s.serving = Some(on(8079));
        s.validate().unwrap();
        s.expert_parallel.ranks_per_pod = Some(2);
        assert_eq!(s.validate().unwrap_err().field, "spec.serving.port");
        s.serving = Some(on(65535));
        assert!(s.validate().unwrap_err().message.contains("65535"));
        s.serving = Some(on(8300));
        s.validate().unwrap();
        s.traffic = Some(TrafficSpec::default());
        assert_eq!(s.validate().unwrap_err().field, "spec.traffic");
        // A checkpoint serving by default on the default port collides with httpPort 8300.
        let mut d = sample_spec();
        d.weights = pvc();
        d.worker.http_port = 8300;
        assert_eq!(d.validate().unwrap_err().field, "spec.serving.port");
        // The same spec with synthetic weights does not serve: no conflict.
        d.weights = Default::default();
        d.validate().unwrap();
        let mut rows = sample_spec();
        rows.serving = Some(ServingSpec {
            max_rows_per_request: 0,
            ..Default::default()
        });
        assert_eq!(
            rows.validate().unwrap_err().field,
            "spec.serving.maxRowsPerRequest"
        );
    }
}
