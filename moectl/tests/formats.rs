//! Every engine format through the `moectl` binary: round trips, the real vllm-ascend map, the
//! real SGLang `torch.save` dumps (made by eplb/tests/data/sglang/make_dumps.py with torch),
//! vLLM per-slot loads, and the one-line errors.

mod common;

use std::process::{Command, Output};

use common::*;

use serde_json::{Value, json};

fn data(name: &str) -> String {
    format!("{}/../eplb/tests/data/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "moectl failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json_of(o: &Output) -> Value {
    serde_json::from_str(&ok(o)).expect("JSON output")
}

fn read_json(path: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("JSON")
}

#[test]
fn real_ascend_map_round_trips_through_every_placement_format() {
    let d = Dir::new("ascend");
    let real = data("vllm-ascend_expert_map.json");
    let original = read_json(&real);
    let sg = d.path("sglang.json");
    ok(&moectl(&[
        "convert",
        "--input",
        &real,
        "--to",
        "sglang",
        "--first-dense",
        "1",
        "--output",
        &sg,
    ]));
    let v = read_json(&sg);
    assert_eq!(
        v.as_object().unwrap().len(),
        1,
        "only physical_to_logical_map: {v}"
    );
    // Decoder layer 0 is dense (trivial layout), layer 1 is the map's only MoE layer.
    assert_eq!(
        v["physical_to_logical_map"],
        json!([
            [0, 1, 2, 3, 4, 5, 6, 7, 0, 1],
            [7, 2, 0, 3, 5, 6, 1, 4, 7, 2]
        ])
    );
    let doc = d.path("doc.json");
    ok(&moectl(&[
        "convert",
        "--input",
        &sg,
        "--to",
        "document",
        "--ranks",
        "2",
        "--first-dense",
        "1",
        "--output",
        &doc,
    ]));
    let pl = d.path("placement.json");
    ok(&moectl(&[
        "convert",
        "--input",
        &doc,
        "--to",
        "placement",
        "--output",
        &pl,
    ]));
    let back = json_of(&moectl(&[
        "convert",
        "--input",
        &pl,
        "--to",
        "ascend-expert-map",
    ]));
    assert_eq!(back, original);
}

#[test]
fn ascend_ids_that_disagree_with_positions_only_warn() {
    let d = Dir::new("ascend-ids");
    let mut m = read_json(&data("vllm-ascend_expert_map.json"));
    m["layer_list"][0]["layer_id"] = json!(3); // a decoder-layer number
    m["layer_list"][0]["device_list"][0]["device_id"] = json!(1);
    m["layer_list"][0]["device_list"][1]["device_id"] = json!(0);
    let map = d.file("map.json", &m.to_string());
    let load = d.file("load.json", "[[90, 5, 40, 3, 8, 2, 60, 1]]");
    let o = moectl(&["eval", "--placement", &map, "--load", &load, "--json"]);
    let v = json_of(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("layer_id 3") && err.contains("device_ids"),
        "{err}"
    );
    // Read by position: device 0 = [7, 2, 0, 3, 5] whatever its device_id says.
    let pl = json_of(&moectl(&["convert", "--input", &map, "--to", "placement"]));
    assert_eq!(pl["phy2log"], json!([[7, 2, 0, 3, 5, 6, 1, 4, 7, 2]]));
    assert!(v["mean_par"].as_f64().unwrap() > 1.0);
}

#[test]
fn mix_placement_shared_experts_are_stripped_with_the_load_expert_count() {
    let d = Dir::new("mix");
    // 4 routed experts; id 4 is the shared expert, one copy per device.
    let map = d.file(
        "map.json",
        r#"{"moe_layer_count": 1, "layer_list": [{"layer_id": 0, "device_count": 2, "device_list": [
            {"device_id": 0, "device_expert": [4, 0, 1]}, {"device_id": 1, "device_expert": [4, 2, 3]}]}]}"#,
    );
    let load = d.file("load.json", "[[10, 20, 30, 40]]");
    let o = moectl(&["eval", "--placement", &map, "--load", &load, "--json"]);
    let v = json_of(&o);
    // Rank loads 30 and 70: PAR 1.4, not a 5-expert reading.
    assert!((v["mean_par"].as_f64().unwrap() - 1.4).abs() < 1e-9, "{v}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("shared experts"));
}

#[test]
fn ascend_output_refuses_an_expert_twice_on_a_rank() {
    let d = Dir::new("dup");
    let load = d.file("load.json", "[[5, 1]]");
    let out = d.path("map.json");
    // 2 experts, 1 rank, 2 redundant: 4 slots on one rank hold each expert twice.
    let o = moectl(&[
        "plan",
        "--load",
        &load,
        "--ranks",
        "1",
        "--redundant",
        "2",
        "--format",
        "ascend-expert-map",
        "--output",
        &out,
    ]);
    assert_bad(&o, "twice");
    assert!(!std::path::Path::new(&out).exists());
}

#[test]
fn sglang_dump_plans_to_sglang_placement() {
    let d = Dir::new("sglang");
    let pt = data("sglang/expert_distribution_partial.pt");
    let out = d.path("init.json");
    let o = moectl(&[
        "plan",
        "--load",
        &pt,
        "--ranks",
        "4",
        "--redundant",
        "4",
        "--format",
        "sglang",
        "--output",
        &out,
    ]);
    ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("decoder layer 0 has no routed tokens"),
        "{err}"
    );
    let v = read_json(&out);
    let rows = v["physical_to_logical_map"].as_array().unwrap();
    assert_eq!(rows.len(), 4, "every decoder layer, dense layer 0 included");
    assert_eq!(rows[0], json!([0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]));
    // The written file reads back as the same plan (layer 0 stripped by the layout flag).
    let m = d.path("moectl.json");
    ok(&moectl(&[
        "plan",
        "--load",
        &pt,
        "--ranks",
        "4",
        "--redundant",
        "4",
        "--output",
        &m,
    ]));
    let back = json_of(&moectl(&[
        "convert",
        "--input",
        &out,
        "--to",
        "placement",
        "--ranks",
        "4",
        "--first-dense",
        "1",
    ]));
    assert_eq!(back["phy2log"], read_json(&m)["phy2log"]);
    // The .pt dump and its JSON twin give the same evaluation.
    let js = data("sglang/expert_distribution_partial.json");
    let a = json_of(&moectl(&[
        "eval",
        "--placement",
        &m,
        "--load",
        &pt,
        "--json",
    ]));
    let b = json_of(&moectl(&[
        "eval",
        "--placement",
        &m,
        "--load",
        &js,
        "--json",
    ]));
    assert_eq!(a, b);
}

#[test]
fn sglang_placement_pt_reads_like_its_json() {
    let pt = data("sglang/init_expert_location.pt");
    let js = data("sglang/init_expert_location.json");
    let args = |f: &str| {
        moectl(&[
            "convert",
            "--input",
            f,
            "--to",
            "placement",
            "--ranks",
            "4",
            "--first-dense",
            "1",
        ])
    };
    let a = json_of(&args(&pt));
    assert_eq!(a, json_of(&args(&js)));
    assert_eq!(a["num_layers"], json!(3));
    // The dump gives the layout (decoder layer 0 dense), so eval needs only --ranks.
    let dump = data("sglang/expert_distribution_partial.pt");
    let v = json_of(&moectl(&[
        "eval",
        "--placement",
        &pt,
        "--load",
        &dump,
        "--ranks",
        "4",
        "--json",
    ]));
    assert_eq!(v["layers"].as_array().unwrap().len(), 3);
}

#[test]
fn sglang_output_needs_the_layout() {
    let d = Dir::new("layout");
    let load = d.file("load.json", "[[100, 50, 20, 10], [10, 10, 80, 90]]");
    let out = d.path("init.json");
    let o = moectl(&[
        "plan",
        "--load",
        &load,
        "--ranks",
        "2",
        "--redundant",
        "2",
        "--format",
        "sglang",
        "--output",
        &out,
    ]);
    assert_bad(&o, "--first-dense");
    assert!(!std::path::Path::new(&out).exists());
    let v = json_of(&moectl(&[
        "plan",
        "--load",
        &load,
        "--ranks",
        "2",
        "--redundant",
        "2",
        "--format",
        "sglang",
        "--first-dense",
        "3",
    ]));
    assert_eq!(v["physical_to_logical_map"].as_array().unwrap().len(), 5);
    let v = json_of(&moectl(&[
        "plan",
        "--load",
        &load,
        "--ranks",
        "2",
        "--redundant",
        "2",
        "--format",
        "sglang",
        "--decoder-layers",
        "4",
        "--moe-layers",
        "1,3",
    ]));
    let rows = v["physical_to_logical_map"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[0], json!([0, 1, 2, 3, 0, 1]));
    let o = moectl(&[
        "plan",
        "--load",
        &load,
        "--ranks",
        "2",
        "--redundant",
        "2",
        "--format",
        "sglang",
        "--decoder-layers",
        "4",
        "--moe-layers",
        "1",
    ]);
    assert_bad(&o, "MoE layers");
    // Reading SGLang's rows needs the layout too: dense rows cannot be told from MoE ones.
    let init = d.file("init.json", &v.to_string());
    let o = moectl(&[
        "convert",
        "--input",
        &init,
        "--to",
        "placement",
        "--ranks",
        "2",
    ]);
    assert_bad(&o, "one row per decoder layer");
    let o = moectl(&[
        "convert",
        "--input",
        &init,
        "--to",
        "placement",
        "--first-dense",
        "1",
    ]);
    assert_bad(&o, "--ranks");
}

#[test]
fn load_formats_round_trip() {
    let d = Dir::new("loads");
    let windows = json!({"windows": [[[5, 0, 7], [1, 2, 3]], [[4, 4, 4], [9, 0, 1]]]});
    let w = d.file("w.json", &windows.to_string());
    let oe = d.path("oe.json");
    ok(&moectl(&[
        "convert",
        "--input",
        &w,
        "--to",
        "openevolve",
        "--output",
        &oe,
    ]));
    assert_eq!(
        read_json(&oe)["load_history"][1]["logical_expert_load"],
        json!([[4, 4, 4], [9, 0, 1]])
    );
    let back = json_of(&moectl(&["convert", "--input", &oe, "--to", "windows"]));
    assert_eq!(back, windows);
    // SGLang: one pass per window, dense rows zero; reading sums the passes.
    let sg = d.path("sg.json");
    ok(&moectl(&[
        "convert",
        "--input",
        &w,
        "--to",
        "sglang-logical-count",
        "--first-dense",
        "2",
        "--output",
        &sg,
    ]));
    let v = read_json(&sg);
    assert_eq!(v["logical_count"][0][0], json!([0, 0, 0]));
    assert_eq!(v["logical_count"][1][3], json!([9, 0, 1]));
    let back = json_of(&moectl(&["convert", "--input", &sg, "--to", "windows"]));
    assert_eq!(back, json!({"windows": [[[9, 4, 11], [10, 2, 4]]]}));
    // The recorder dump converts like its JSON twin.
    let pt = data("sglang/expert_distribution_wrapped.pt");
    let js = data("sglang/expert_distribution_wrapped.json");
    let a = json_of(&moectl(&["convert", "--input", &pt, "--to", "windows"]));
    let b = json_of(&moectl(&["convert", "--input", &js, "--to", "windows"]));
    assert_eq!(a, b);
    assert_eq!(a["windows"][0].as_array().unwrap().len(), 3);
    let o = moectl(&["convert", "--input", &w, "--to", "sglang"]);
    assert_bad(&o, "is a load");
}

#[test]
fn vllm_per_slot_loads_need_the_flag_and_map_through_the_previous_placement() {
    let d = Dir::new("vllm");
    // 4 experts, 2 ranks x 3 slots: slots 4 and 5 are replicas of experts 0 and 1.
    let prev = d.file(
        "prev.json",
        r#"{"num_logical_experts": 4, "num_ranks": 2, "phy2log": [[0, 1, 2, 3, 0, 1]]}"#,
    );
    let physical = d.file(
        "slots.json",
        "[[[30, 10, 5, 5, 30, 10]], [[20, 10, 5, 5, 20, 10]]]",
    );
    let logical = d.file("experts.json", "[[[60, 20, 5, 5]], [[40, 20, 5, 5]]]");
    let o = moectl(&["eval", "--placement", &prev, "--load", &physical]);
    assert_bad(&o, "--physical-load");
    let a = json_of(&moectl(&[
        "eval",
        "--placement",
        &prev,
        "--load",
        &physical,
        "--physical-load",
        "--json",
    ]));
    let b = json_of(&moectl(&[
        "eval",
        "--placement",
        &prev,
        "--load",
        &logical,
        "--json",
    ]));
    assert_eq!(a, b);
    let o = moectl(&[
        "plan",
        "--load",
        &physical,
        "--ranks",
        "2",
        "--redundant",
        "2",
        "--previous",
        &prev,
        "--physical-load",
    ]);
    assert_eq!(json_of(&o)["num_logical_experts"], json!(4));
    let o = moectl(&[
        "plan",
        "--load",
        &physical,
        "--ranks",
        "2",
        "--redundant",
        "2",
        "--physical-load",
    ]);
    assert_bad(&o, "--previous");
    // -1 marks the slots of a masked rank: read as a placement over the other ranks.
    let masked = d.file(
        "masked.json",
        r#"{"num_logical_experts": 4, "num_ranks": 3, "phy2log": [[0, 1, 2, -1, -1, -1, 3, 0, 1]]}"#,
    );
    let load = d.file("load.json", "[[60, 20, 5, 5]]");
    let o = moectl(&["eval", "--placement", &masked, "--load", &load, "--json"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("rank 1 holds no expert"));
    let masked_par = json_of(&o)["mean_par"].clone();
    // vLLM's own state under its attribute name: SGLang's key, MoE layers only.
    let state = d.file(
        "state.json",
        r#"{"physical_to_logical_map": [[0, 1, 2, -1, -1, -1, 3, 0, 1]]}"#,
    );
    let o = moectl(&[
        "eval",
        "--placement",
        &state,
        "--load",
        &load,
        "--ranks",
        "3",
        "--first-dense",
        "0",
        "--json",
    ]);
    assert_eq!(json_of(&o)["mean_par"], masked_par);
}

#[test]
fn eval_reports_both_balancedness_definitions_and_draws_the_heatmap() {
    let d = Dir::new("eval");
    // Layer 0: rank loads 9 and 11; layer 1: 0 and 100.
    let p = d.file(
        "p.json",
        r#"{"num_logical_experts": 3, "num_ranks": 2, "phy2log": [[0, 1, 2, 0], [0, 1, 2, 0]]}"#,
    );
    let q = d.file(
        "q.json",
        r#"{"num_logical_experts": 3, "num_ranks": 2, "phy2log": [[0, 2, 1, 0], [2, 0, 1, 0]]}"#,
    );
    let load = d.file("load.json", "[[10, 4, 6], [0, 0, 100]]");
    let svg = d.path("heat.svg");
    let v = json_of(&moectl(&[
        "eval",
        "--placement",
        &p,
        "--previous",
        &q,
        "--load",
        &load,
        "--json",
        "--svg",
        &svg,
    ]));
    let b = &v["balancedness"];
    let sglang = (10.0 / 11.0 + 0.5) / 2.0;
    let vllm = (10.0 + 50.0) / (11.0 + 100.0);
    assert!(
        (b["sglang_mean_inverse_par"].as_f64().unwrap() - sglang).abs() < 1e-9,
        "{v}"
    );
    assert!(
        (b["vllm_sum_mean_over_sum_max"].as_f64().unwrap() - vllm).abs() < 1e-9,
        "{v}"
    );
    assert!(v["previous"]["mean_par"].as_f64().is_some());
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg") && text.trim_end().ends_with("</svg>"));
    assert!(
        text.contains("before: q.json") && text.contains("after: p.json"),
        "{text}"
    );
    assert!(text.contains("layer 1 rank 1: 2.000 x mean"), "{text}");
    let plain = ok(&moectl(&["eval", "--placement", &p, "--load", &load]));
    assert!(plain.contains("balancedness, SGLang"), "{plain}");
    assert!(plain.contains("balancedness, vLLM"), "{plain}");
}

/// docs/images/eval-heatmap.svg is what the current code draws from its checked-in inputs
/// (docs/images/heatmap-example/make_inputs.py says how they were made).
#[test]
fn docs_heatmap_is_current() {
    let d = Dir::new("docs-heatmap");
    let ex = format!(
        "{}/../docs/images/heatmap-example",
        env!("CARGO_MANIFEST_DIR")
    );
    let out = d.path("heat.svg");
    let run = Command::new(env!("CARGO_BIN_EXE_moectl"))
        .current_dir(&ex)
        .args([
            "eval",
            "--placement",
            "after.json",
            "--previous",
            "before.json",
            "--load",
            "load.json",
            "--svg",
            &out,
        ])
        .output()
        .expect("run moectl");
    ok(&run);
    let want = std::fs::read_to_string(format!("{ex}/../eval-heatmap.svg")).unwrap();
    assert!(
        std::fs::read_to_string(&out).unwrap() == want,
        "docs/images/eval-heatmap.svg is out of date: rerun the eval command in docs/images/heatmap-example/make_inputs.py"
    );
}

/// Several windows: the per-layer balancedness and its mean are SGLang's (1/PAR per window and
/// layer, averaged), not 1/(mean PAR), so the report has exactly the two definitions.
#[test]
fn eval_balancedness_over_several_windows_is_one_definition_per_engine() {
    let d = Dir::new("eval-windows");
    let p = d.file(
        "p.json",
        r#"{"num_logical_experts": 3, "num_ranks": 2, "phy2log": [[0, 1, 2, 0], [0, 1, 2, 0]]}"#,
    );
    // Window A: rank loads 9/11 and 0/100; window B: 3/3 and 2/2.
    let load = d.file(
        "load.json",
        r#"{"windows": [[[10, 4, 6], [0, 0, 100]], [[2, 2, 2], [4, 0, 0]]]}"#,
    );
    let v = json_of(&moectl(&[
        "eval",
        "--placement",
        &p,
        "--load",
        &load,
        "--json",
    ]));
    let close = |x: &Value, want: f64| (x.as_f64().unwrap() - want).abs() < 1e-9;
    let layer0 = (10.0 / 11.0 + 1.0) / 2.0;
    let layer1 = (0.5 + 1.0) / 2.0;
    assert!(close(&v["layers"][0]["balancedness"], layer0), "{v}");
    assert!(close(&v["layers"][1]["balancedness"], layer1), "{v}");
    let sglang = (layer0 + layer1) / 2.0;
    assert!(
        close(&v["balancedness"]["sglang_mean_inverse_par"], sglang),
        "{v}"
    );
    assert!(close(&v["mean_balancedness"], sglang), "{v}");
    let vllm = ((10.0 + 50.0) / (11.0 + 100.0) + 1.0) / 2.0;
    assert!(
        close(&v["balancedness"]["vllm_sum_mean_over_sum_max"], vllm),
        "{v}"
    );
    let text = ok(&moectl(&["eval", "--placement", &p, "--load", &load]));
    assert_eq!(text.matches("balancedness").count(), 3, "{text}"); // column + two lines
    assert!(text.contains(&format!("{sglang:.4}")), "{text}");
}

/// A previous placement with other slots (more redundant experts) is compared, not refused:
/// its PAR and the heatmap's before panel, no migration figure (slots do not correspond).
#[test]
fn eval_previous_with_other_slots_compares_without_migration() {
    let d = Dir::new("eval-prev-slots");
    let p = d.file(
        "p.json",
        r#"{"num_logical_experts": 3, "num_ranks": 2, "phy2log": [[0, 1, 2, 0]]}"#,
    );
    let q = d.file(
        "q.json",
        r#"{"num_logical_experts": 3, "num_ranks": 1, "phy2log": [[0, 1, 2]]}"#,
    );
    let load = d.file("load.json", "[[10, 4, 6]]");
    let svg = d.path("heat.svg");
    let o = moectl(&[
        "eval",
        "--placement",
        &p,
        "--previous",
        &q,
        "--load",
        &load,
        "--svg",
        &svg,
    ]);
    let text = ok(&o);
    assert!(text.contains("previous: mean PAR 1.0000"), "{text}");
    assert!(!text.contains("migration"), "{text}");
    assert!(stderr(&o).contains("migration"), "{}", stderr(&o));
    assert!(
        std::fs::read_to_string(&svg)
            .unwrap()
            .contains("before: q.json")
    );
}

/// A previous placement of another model (other layers or experts) is refused, naming
/// --previous, the file and both shapes, instead of its column being dropped (other layers),
/// a migration cost between two models reported (other experts) or `--svg` panicking.
#[test]
fn eval_refuses_a_previous_of_another_model() {
    let d = Dir::new("eval-prev-model");
    let load = d.file("load.json", "[[10, 4, 6], [1, 2, 3]]");
    let p = d.file(
        "p.json",
        r#"{"num_logical_experts": 3, "num_ranks": 2, "phy2log": [[0, 1, 2, 0], [0, 1, 2, 1]]}"#,
    );
    let one_layer = d.file(
        "one.json",
        r#"{"num_logical_experts": 3, "num_ranks": 2, "phy2log": [[0, 1, 2, 0]]}"#,
    );
    let three_layers = d.file(
        "three.json",
        r#"{"num_logical_experts": 3, "num_ranks": 2, "phy2log": [[0, 1, 2, 0], [0, 1, 2, 1], [0, 1, 2, 1]]}"#,
    );
    let four_experts = d.file(
        "four.json",
        r#"{"num_logical_experts": 4, "num_ranks": 2, "phy2log": [[0, 1, 2, 3], [0, 1, 2, 3]]}"#,
    );
    let svg = d.path("heat.svg");
    for (prev, says) in [
        (&one_layer, "has 1 layer of 3 experts"),
        (&three_layers, "has 3 layers of 3 experts"),
        (&four_experts, "has 2 layers of 4 experts"),
    ] {
        let base = [
            "eval",
            "--placement",
            &p,
            "--load",
            &load,
            "--previous",
            prev,
        ];
        for extra in [&[][..], &["--svg", &svg][..]] {
            let o = moectl(&[&base[..], extra].concat());
            assert_bad(&o, &format!("--previous {prev} {says}"));
            assert!(
                stderr(&o).contains("2 layers of 3 experts"),
                "{}",
                stderr(&o)
            );
            assert!(stderr(&o).contains("drop --previous"), "{}", stderr(&o));
            assert!(!std::path::Path::new(&svg).exists());
        }
    }
}

/// Formats that take the expert count from the load (vllm-ascend maps, SGLang's map): a
/// per-slot load (P = 10 columns for the real map's 8 experts) is named as such, and a load
/// with another expert count says both counts, instead of "no replica of expert 8".
#[test]
fn per_slot_or_mismatched_loads_against_an_ascend_map_are_named() {
    let d = Dir::new("ascend-slots");
    let map = data("vllm-ascend_expert_map.json");
    let slots = d.file("slots.json", "[[5, 1, 2, 3, 4, 5, 6, 7, 8, 9]]");
    let o = moectl(&["eval", "--placement", &map, "--load", &slots]);
    assert_bad(&o, "--physical-load");
    let o = moectl(&[
        "plan",
        "--load",
        &slots,
        "--ranks",
        "2",
        "--redundant",
        "2",
        "--previous",
        &map,
    ]);
    assert_bad(&o, "--physical-load");
    let nine = d.file("nine.json", "[[5, 1, 2, 3, 4, 5, 6, 7, 8]]");
    let o = moectl(&["eval", "--placement", &map, "--load", &nine]);
    assert_bad(&o, "9 experts");
    assert!(stderr(&o).contains("8 experts"), "{}", stderr(&o));
    // With the flag the per-slot counts map through the map's slots.
    let v = json_of(&moectl(&[
        "eval",
        "--placement",
        &map,
        "--load",
        &slots,
        "--physical-load",
        "--json",
    ]));
    assert_eq!(v["layers"].as_array().unwrap().len(), 1);
}

/// vllm-ascend's per-slot load (`moe_load`, `[layers][devices][slots per device]`) has a
/// column for every local slot, with mix_placement the shared expert's too: those counts are
/// left out (with a note), the routed slots map to their experts; a load of the routed slots
/// alone maps as before.
#[test]
fn per_slot_loads_of_a_mix_placement_map_leave_the_shared_slots_out() {
    let d = Dir::new("mix-slots");
    // 4 routed experts; id 4 is the shared expert, first slot of each device.
    let map = d.file(
        "map.json",
        r#"{"moe_layer_count": 1, "layer_list": [{"layer_id": 0, "device_count": 2, "device_list": [
            {"device_id": 0, "device_expert": [4, 0, 1]}, {"device_id": 1, "device_expert": [4, 2, 3]}]}]}"#,
    );
    // Every slot counted, the shared ones (50, 60) included.
    let all = d.file(
        "all.json",
        "[[[50, 10, 20, 60, 30, 40]], [[9, 1, 1, 9, 1, 2]]]",
    );
    let o = moectl(&[
        "convert",
        "--input",
        &all,
        "--to",
        "windows",
        "--physical-load",
        "--placement",
        &map,
        "--experts",
        "4",
    ]);
    assert_eq!(
        json_of(&o),
        json!({"windows": [[[10, 20, 30, 40]], [[1, 1, 1, 2]]]})
    );
    assert!(
        stderr(&o).contains("2 shared-expert slots per layer left out"),
        "{}",
        stderr(&o)
    );
    // eval: rank loads 30 and 70 in the first window, as with the per-expert load.
    let v = json_of(&moectl(&[
        "eval",
        "--placement",
        &map,
        "--load",
        &all,
        "--physical-load",
        "--experts",
        "4",
        "--json",
    ]));
    assert_eq!(v["windows"], 2, "{v}");
    // plan through --previous.
    let o = moectl(&[
        "plan",
        "--load",
        &all,
        "--physical-load",
        "--experts",
        "4",
        "--previous",
        &map,
        "--ranks",
        "2",
        "--redundant",
        "0",
    ]);
    assert_eq!(json_of(&o)["num_logical_experts"], 4);
    // The routed slots alone (a load recorded without the shared columns): as before.
    let routed = d.file("routed.json", "[[10, 20, 30, 40]]");
    let o = moectl(&[
        "convert",
        "--input",
        &routed,
        "--to",
        "windows",
        "--physical-load",
        "--placement",
        &map,
        "--experts",
        "4",
    ]);
    assert_eq!(json_of(&o), json!({"windows": [[[10, 20, 30, 40]]]}));
    // Without --physical-load the 6 columns are named as a per-slot load.
    let o = moectl(&["eval", "--placement", &map, "--load", &all]);
    assert_bad(
        &o,
        "vllm-ascend's per-slot load (moe_load); pass --physical-load",
    );
    assert!(stderr(&o).contains("add --experts E"), "{}", stderr(&o));
}

/// `convert` without a load: the routed expert count comes from --experts or --model; without
/// either, an id on every device once (how mix_placement's shared experts sit) is read as a
/// routed expert with a note that names --experts, never silently.
#[test]
fn convert_takes_the_expert_count_from_the_checkpoint_and_flags_shared_looking_ids() {
    let d = Dir::new("mix-convert");
    // Mixtral fixture: 8 routed experts; id 8 is a shared expert, one copy per device.
    let map = d.file(
        "map.json",
        r#"{"moe_layer_count": 2, "layer_list": [
            {"layer_id": 0, "device_count": 2, "device_list": [
                {"device_id": 0, "device_expert": [8, 0, 1, 2, 3]}, {"device_id": 1, "device_expert": [8, 4, 5, 6, 7]}]},
            {"layer_id": 1, "device_count": 2, "device_list": [
                {"device_id": 0, "device_expert": [0, 8, 1, 2, 3]}, {"device_id": 1, "device_expert": [4, 5, 8, 6, 7]}]}]}"#,
    );
    let model = format!(
        "{}/../fixtures/models/mixtral/config.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let o = moectl(&[
        "convert",
        "--input",
        &map,
        "--to",
        "placement",
        "--model",
        &model,
    ]);
    let v = json_of(&o);
    assert_eq!(v["num_logical_experts"], 8, "{v}");
    // One id: singular ("is a shared experts" before).
    assert!(
        stderr(&o).contains("id 8 is a shared expert ("),
        "{}",
        stderr(&o)
    );
    let o = moectl(&["convert", "--input", &map, "--to", "placement"]);
    assert_eq!(json_of(&o)["num_logical_experts"], 9);
    assert!(stderr(&o).contains("--experts"), "{}", stderr(&o));
}

/// vLLM's per-slot window spans every physical slot, the masked rank's (-1) included: it maps
/// through the map as written (those slots must count no tokens), in eval, plan and convert.
#[test]
fn per_slot_loads_map_through_a_phy2log_with_masked_ranks() {
    let d = Dir::new("vllm-masked");
    // 3 ranks x 2 slots, rank 1 masked.
    let map = d.file(
        "map.json",
        r#"{"num_logical_experts": 3, "num_ranks": 3, "phy2log": [[0, 1, -1, -1, 2, 0]]}"#,
    );
    let slots = d.file("slots.json", "[[[5, 1, 0, 0, 2, 7]], [[1, 1, 0, 0, 1, 1]]]");
    let windows = json_of(&moectl(&[
        "convert",
        "--input",
        &slots,
        "--to",
        "windows",
        "--physical-load",
        "--placement",
        &map,
    ]));
    assert_eq!(windows, json!({"windows": [[[12, 1, 2]], [[2, 1, 1]]]}));
    let v = json_of(&moectl(&[
        "eval",
        "--placement",
        &map,
        "--load",
        &slots,
        "--physical-load",
        "--json",
    ]));
    assert_eq!(v["windows"], 2, "{v}");
    let o = moectl(&[
        "plan",
        "--load",
        &slots,
        "--physical-load",
        "--previous",
        &map,
        "--ranks",
        "2",
        "--redundant",
        "1",
    ]);
    assert_eq!(json_of(&o)["num_logical_experts"], 3);
    // Tokens on a masked slot are refused: the counts and the map disagree.
    let bad = d.file("bad.json", "[[[5, 1, 3, 0, 2, 7]]]");
    let o = moectl(&[
        "eval",
        "--placement",
        &map,
        "--load",
        &bad,
        "--physical-load",
    ]);
    assert_bad(&o, "slot 2");
}

/// With several nodes (the placement's num_nodes, or --nodes for formats that do not say),
/// eval reports the cross-node token share beside its floor for the replica counts, and the
/// cross-node weight moves from --previous: the node-aware figures of the benchmark.
#[test]
fn eval_reports_cross_node_traffic_with_several_nodes() {
    let d = Dir::new("eval-nodes");
    // 2 nodes x 2 ranks x 2 slots. Experts 1 and 2 on both nodes; both replicas of expert 0
    // on node 0 and of expert 3 on node 1: 0 and 3 serve half their tokens remotely, though
    // two replicas each could cover both nodes (floor 0).
    let p = d.file(
        "p.json",
        r#"{"num_logical_experts": 4, "num_ranks": 4, "num_nodes": 2, "phy2log": [[0, 1, 0, 2, 3, 1, 2, 3]]}"#,
    );
    // From q, slot 3 takes expert 2, which node 0 did not hold: one cross-node move (slot 4
    // takes expert 3, which node 1 held).
    let q = d.file(
        "q.json",
        r#"{"num_logical_experts": 4, "num_ranks": 4, "num_nodes": 2, "phy2log": [[0, 1, 0, 3, 2, 1, 2, 3]]}"#,
    );
    let load = d.file("load.json", "[[4, 2, 1, 1]]");
    let v = json_of(&moectl(&[
        "eval",
        "--placement",
        &p,
        "--previous",
        &q,
        "--load",
        &load,
        "--json",
    ]));
    let c = &v["cross_node"];
    let share = (4.0 * 0.5 + 1.0 * 0.5) / 8.0;
    assert!(
        (c["token_share"].as_f64().unwrap() - share).abs() < 1e-12,
        "{v}"
    );
    assert!(c["floor"].as_f64().unwrap().abs() < 1e-12, "{v}");
    assert_eq!(c["weight_moves"], 1, "{v}");
    let text = ok(&moectl(&["eval", "--placement", &p, "--load", &load]));
    assert!(text.contains("cross-node tokens: 31."), "{text}");
    // One node (a file that does not say reads as one): no such figures.
    let unsaid = d.file(
        "unsaid.json",
        r#"{"num_logical_experts": 4, "num_ranks": 4, "phy2log": [[0, 1, 0, 2, 3, 1, 2, 3]]}"#,
    );
    let one = ok(&moectl(&["eval", "--placement", &unsaid, "--load", &load]));
    assert!(!one.contains("cross-node"), "{one}");
    // --nodes fills in what the file does not say, and must not contradict what it does.
    let two = ok(&moectl(&[
        "eval",
        "--placement",
        &unsaid,
        "--load",
        &load,
        "--nodes",
        "2",
    ]));
    assert!(two.contains("cross-node tokens: 31."), "{two}");
    let o = moectl(&["eval", "--placement", &p, "--load", &load, "--nodes", "1"]);
    assert_bad(&o, "--nodes 1 contradicts");
}

/// An SGLang map's dense rows are not part of the placement, but SGLang reads them: an id no
/// expert has, or another length, is refused as the engine would.
#[test]
fn sglang_dense_rows_hold_valid_ids() {
    let d = Dir::new("sglang-dense-rows");
    let read = |rows: &str| {
        let f = d.file(
            "map.json",
            &format!(r#"{{"physical_to_logical_map": {rows}}}"#),
        );
        moectl(&[
            "convert",
            "--input",
            &f,
            "--to",
            "placement",
            "--ranks",
            "2",
            "--first-dense",
            "1",
        ])
    };
    assert!(read("[[0, 1, 2, 3], [3, 2, 1, 0]]").status.success());
    assert_bad(
        &read("[[0, 99, 2, 3], [3, 2, 1, 0]]"),
        "decoder layer 0 (dense): slot 1 holds 99, not an expert id below 4;",
    );
    assert_bad(
        &read("[[0, 1, 2], [3, 2, 1, 0]]"),
        "decoder layer 0 (dense): 3 slots, the MoE rows have 4",
    );
    assert_bad(
        &read("[[0, 0, 2, 3], [3, 2, 1, 0]]"),
        "decoder layer 0 (dense): no replica of expert 1",
    );
}
