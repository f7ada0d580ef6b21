//! Client-side CEL checks for the CRD tests: kube's CEL validator run on the generated schema,
//! defaults applied first as the API server does. Shared by `cel.rs` and `cel_serving.rs`.
// Each test crate uses its own part of this file.
#![allow(dead_code)]

use kube::core::cel;
use serde_json::{Value, json};

/// The generated CRD's OpenAPI v3 schema.
pub fn schema() -> Value {
    let crd = moe_operator::crd::definition();
    serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .unwrap(),
    )
    .unwrap()
}

/// A `MoEDeployment` object around `spec`.
pub fn object(spec: Value) -> Value {
    json!({
        "apiVersion": "moe-operator.github.io/v1alpha1",
        "kind": "MoEDeployment",
        "metadata": {"name": "demo", "namespace": "ml"},
        "spec": spec
    })
}

/// Error messages of the rules that fail on `spec` (empty when valid).
pub fn failures(spec: Value) -> Vec<String> {
    match cel::Validator::new().validate(&schema(), &object(spec), None) {
        Ok(()) => Vec::new(),
        Err(errors) => errors
            .as_slice()
            .iter()
            .map(|e| e.message.clone())
            .collect(),
    }
}
