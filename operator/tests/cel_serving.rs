//! The CRD's rules on `spec.serving`, evaluated client-side with kube's CEL validator on the
//! generated schema (defaults applied first, as the API server does). The e2e validation
//! scenario checks the same rules on the real API server.

use serde_json::{Value, json};

mod support {
    pub mod cel;
}
use support::cel::{failures, schema};

fn spec(serving: Value) -> Value {
    json!({
        "model": {"numLayers": 2, "numExperts": 8, "hidden": 16, "intermediate": 8, "topK": 2},
        "expertParallel": {"ranks": 2},
        "worker": {"httpPort": 8080, "commPort": 29500},
        "serving": serving
    })
}

const PORT_MESSAGE: &str =
    "spec.serving.port must differ from spec.worker.httpPort and spec.worker.commPort";

#[test]
fn a_forward_port_apart_from_the_others_is_valid() {
    assert_eq!(failures(spec(json!({"port": 8300}))), Vec::<String>::new());
    assert_eq!(failures(spec(json!({}))), Vec::<String>::new());
    let mut without = spec(json!({}));
    without.as_object_mut().unwrap().remove("serving");
    assert_eq!(failures(without), Vec::<String>::new());
}

#[test]
fn the_forward_port_may_not_be_the_http_or_comm_port() {
    for port in [8080, 29500] {
        let f = failures(spec(json!({"port": port})));
        assert!(
            f.iter().any(|m| m.starts_with(PORT_MESSAGE)),
            "{port}: {f:?}"
        );
    }
}

#[test]
fn port_ranges_of_a_pods_ranks_may_not_overlap() {
    // Two ranks per pod: forward 8079..8080 overlaps http 8080..8081.
    let mut s = spec(json!({"port": 8079}));
    assert_eq!(failures(s.clone()), Vec::<String>::new());
    s["expertParallel"]["ranksPerPod"] = json!(2);
    let f = failures(s);
    assert!(f.iter().any(|m| m.starts_with(PORT_MESSAGE)), "{f:?}");
    let mut top = spec(json!({"port": 65535}));
    top["expertParallel"]["ranksPerPod"] = json!(2);
    let f = failures(top);
    assert!(
        f.iter().any(|m| m.contains("must be at most 65535")),
        "{f:?}"
    );
}

#[test]
fn serving_and_the_burn_in_generator_exclude_each_other() {
    let mut s = spec(json!({"enabled": true}));
    s["traffic"] = json!({"skew": 1.0});
    let f = failures(s);
    assert!(
        f.iter().any(
            |m| m.starts_with("spec.serving.enabled: true and spec.traffic exclude each other")
        ),
        "{f:?}"
    );
    // Serving left to its default, or off: the generator runs.
    for serving in [json!({}), json!({"enabled": false})] {
        let mut s = spec(serving);
        s["traffic"] = json!({"skew": 1.0});
        assert_eq!(failures(s), Vec::<String>::new());
    }
}

#[test]
fn serving_defaults_are_stored_without_enabled() {
    let schema = schema();
    let serving = &schema["properties"]["spec"]["properties"]["serving"];
    assert!(
        serving.get("default").is_none(),
        "spec.serving has a stored default"
    );
    assert_eq!(serving["properties"]["port"]["default"], json!(8300));
    assert_eq!(
        serving["properties"]["maxRowsPerRequest"]["default"],
        json!(4096)
    );
    assert!(serving["properties"]["enabled"].get("default").is_none());
}
