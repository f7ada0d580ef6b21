//! Malformed user input must give errors, never panics.

use eplb::formats::{self, DecoderLayout, PlacementContext};
use eplb::{LoadHistory, Placement, PlanRequest, Shape, planner_by_name};
use proptest::prelude::*;
use serde_json::{Value, json};

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        (0u32..50).prop_map(|x| json!(x)),
        (-5i32..5).prop_map(|x| json!(x)),
        (-2.0f64..40.0).prop_map(|x| json!(x)),
        Just(json!("NaN")),
        Just(json!(null)),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    let leaf = number();
    leaf.prop_recursive(4, 64, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            (
                proptest::sample::select(vec![
                    "windows",
                    "load_history",
                    "logical_expert_load",
                    "phy2log",
                    "num_ranks",
                    "num_logical_experts",
                    "num_layers",
                    "layer_list",
                    "device_list",
                    "device_expert",
                    "device_id",
                    "layer_id",
                    "moe_layer_count",
                    "numLogicalExperts",
                    "logical_count",
                    "physical_to_logical_map",
                ]),
                inner.clone(),
                proptest::sample::select(vec![
                    "num_ranks",
                    "layer_list",
                    "numRanks",
                    "device_count"
                ]),
                inner,
            )
                .prop_map(|(k1, v1, k2, v2)| {
                    let mut m = serde_json::Map::new();
                    m.insert(k1.to_string(), v1);
                    m.insert(k2.to_string(), v2);
                    Value::Object(m)
                }),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn loads_and_placements_parse_or_error(v in value(), text in ".{0,40}") {
        let _ = LoadHistory::from_json_value(&v);
        let _ = Placement::from_json_value(&v);
        let _ = LoadHistory::from_json_str(&text);
        let _ = Placement::from_json_str(&text);
        let layout = DecoderLayout::first_dense(1, 2).unwrap();
        for experts in [None, Some(3)] {
            let ctx = PlacementContext { num_experts: experts, num_ranks: Some(2), num_nodes: None, layout: Some(&layout) };
            let _ = formats::read_placement_json(&v, &ctx);
            let _ = formats::read_load_json(&v, Some(&layout));
        }
        if let Ok(h) = LoadHistory::from_json_value(&v) {
            // Whatever parsed must plan or give an error.
            for g in 1..4 {
                if let Ok(shape) = Shape::new(h.num_experts(), eplb::smallest_valid_redundant(h.num_experts(), g), g, 1, 1) {
                    let _ = planner_by_name("joint").unwrap().plan(&PlanRequest::new(shape, &h));
                    if let Ok(p) = Placement::from_json_value(&v) {
                        let _ = planner_by_name("incremental").unwrap().plan(&PlanRequest::new(shape, &h).previous(&p));
                    }
                }
            }
        }
    }
}

/// A real `torch.save` dump (SGLang's recorder), damaged: errors, never panics or huge
/// allocations.
const DUMP: &[u8] = include_bytes!("data/sglang/expert_distribution_partial.pt");

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn damaged_torch_dumps_error(edits in proptest::collection::vec((0usize..DUMP.len(), any::<u8>()), 1..8), cut in 0usize..DUMP.len()) {
        let mut b = DUMP.to_vec();
        for (at, x) in edits {
            b[at] = x;
        }
        let _ = formats::read_load_bytes(&b, None);
        let _ = formats::read_load_bytes(&DUMP[..cut], None);
    }
}
