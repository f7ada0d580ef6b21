//! Runs the `moectl` binary end to end with temporary files.

mod common;

use common::*;

use serde_json::Value;

/// Two layers, eight experts, skewed.
const LOAD: &str = "[[100, 50, 20, 10, 5, 5, 5, 5], [10, 10, 10, 10, 80, 90, 1, 1]]";

#[test]
fn plan_writes_placement_json_and_eval_reads_it() {
    let d = Dir::new("plan");
    let load = d.file("load.json", LOAD);
    let out = d.path("placement.json");
    let o = moectl(&[
        "plan",
        "--load",
        &load,
        "--ranks",
        "4",
        "--redundant",
        "4",
        "--output",
        &out,
        "--timings",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // --timings: one line with every phase, on stderr.
    let line = stderr(&o)
        .lines()
        .find(|l| l.starts_with("timings: "))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no timings line: {}", stderr(&o)));
    for phase in ["inputs ", "plan ", "format ", "write ", "total "] {
        assert!(line.contains(phase), "{line}");
    }
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    for key in [
        "num_layers",
        "num_logical_experts",
        "num_ranks",
        "num_nodes",
        "phy2log",
        "log2phy",
        "logcnt",
        "algorithm",
        "par",
    ] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    assert_eq!(v["algorithm"], "joint");
    assert_eq!(v["num_layers"], 2);
    assert_eq!(v["phy2log"][0].as_array().unwrap().len(), 12);
    assert_eq!(v["par"].as_array().unwrap().len(), 2);

    let o = moectl(&["eval", "--placement", &out, "--load", &load]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("mean PAR"));

    let o = moectl(&["eval", "--placement", &out, "--load", &load, "--json"]);
    let v2: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let planned = v["par"][0].as_f64().unwrap();
    let evaluated = v2["layers"][0]["par"].as_f64().unwrap();
    assert!((planned - evaluated).abs() < 1e-9);
}

#[test]
fn plan_to_stdout_in_every_load_format_and_algorithm() {
    let d = Dir::new("formats");
    let loads = [
        d.file("a.json", LOAD),
        d.file("b.json", &format!("{{\"windows\": [{LOAD}, {LOAD}]}}")),
        d.file(
            "c.json",
            &format!("{{\"load_history\": [{{\"logical_expert_load\": {LOAD}}}]}}"),
        ),
    ];
    for load in &loads {
        for algo in ["greedy", "joint"] {
            let o = moectl(&[
                "plan",
                "--load",
                load,
                "--ranks",
                "2",
                "--redundant",
                "2",
                "--algorithm",
                algo,
                "--nodes",
                "2",
                "--groups",
                "2",
            ]);
            assert!(o.status.success(), "{algo}: {}", stderr(&o));
            let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
            assert_eq!(v["algorithm"], algo);
        }
    }
}

#[test]
fn ascend_format_and_incremental_with_previous() {
    let d = Dir::new("ascend");
    let load = d.file("load.json", LOAD);
    let map = d.path("map.json");
    let o = moectl(&[
        "plan",
        "--load",
        &load,
        "--ranks",
        "4",
        "--redundant",
        "0",
        "--algorithm",
        "greedy",
        "--format",
        "ascend-expert-map",
        "--output",
        &map,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&map).unwrap()).unwrap();
    assert_eq!(v["moe_layer_count"], 2);
    assert_eq!(v["layer_list"][0]["device_count"], 4);

    let o = moectl(&[
        "plan",
        "--load",
        &load,
        "--ranks",
        "4",
        "--redundant",
        "0",
        "--algorithm",
        "incremental",
        "--previous",
        &map,
        "--max-moves",
        "2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert!(v["slots_moved"].as_u64().unwrap() <= 4);

    let o = moectl(&[
        "eval",
        "--placement",
        &map,
        "--load",
        &load,
        "--previous",
        &map,
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["migration"]["slots"], 0);

    // A threshold no layer exceeds changes nothing.
    let o = moectl(&[
        "plan",
        "--load",
        &load,
        "--ranks",
        "4",
        "--redundant",
        "0",
        "--previous",
        &map,
        "--threshold",
        "50",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["slots_moved"], 0);
    assert_eq!(v["changed_layers"], serde_json::json!([]));
}

#[test]
fn bad_input_is_one_line_exit_2_and_writes_nothing() {
    let d = Dir::new("bad");
    let good = d.file("good.json", LOAD);
    let out = d.path("out.json");
    let cases: Vec<(String, Vec<String>, &str)> = vec![
        (
            d.file("ragged.json", "[[1, 2, 3], [1, 2]]"),
            vec![],
            "ragged",
        ),
        (d.file("neg.json", "[[1, -2, 3, 4]]"), vec![], "negative"),
        (
            d.file("nan.json", "[[1, \"NaN\", 3, 4]]"),
            vec![],
            "not a number",
        ),
        (d.file("nanlit.json", "[[1, NaN, 3, 4]]"), vec![], "json"),
        (good.clone(), vec!["--ranks".into(), "0".into()], "ranks"),
        (
            good.clone(),
            vec!["--redundant".into(), "1".into()],
            "smallest valid number of redundant experts is 0",
        ),
        (
            good.clone(),
            vec!["--algorithm".into(), "magic".into()],
            "unknown algorithm",
        ),
        (good.clone(), vec!["--nodes".into(), "3".into()], "nodes"),
        (
            good.clone(),
            vec!["--threshold".into(), "1.2".into()],
            "previous",
        ),
    ];
    for (load, extra, needle) in cases {
        let mut args: Vec<String> = vec![
            "plan".into(),
            "--load".into(),
            load,
            "--output".into(),
            out.clone(),
        ];
        let mut ranks = vec![
            "--ranks".to_string(),
            "4".to_string(),
            "--redundant".to_string(),
            "0".to_string(),
        ];
        // Later flags replace the defaults.
        for pair in extra.chunks(2) {
            if let Some(i) = ranks.iter().position(|a| *a == pair[0]) {
                ranks[i + 1] = pair[1].clone();
            } else {
                ranks.extend(pair.iter().cloned());
            }
        }
        args.extend(ranks);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = moectl(&refs);
        assert_bad(&o, needle);
        assert!(
            !std::path::Path::new(&out).exists(),
            "output written for {needle}"
        );
    }
    // Placement that does not match the load's shape.
    let other = d.file("other.json", "[[1, 2, 3, 4, 5, 6]]");
    let p = d.path("p.json");
    let o = moectl(&[
        "plan",
        "--load",
        &other,
        "--ranks",
        "2",
        "--redundant",
        "0",
        "--output",
        &p,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = moectl(&["eval", "--placement", &p, "--load", &good]);
    assert_bad(&o, "mismatch");
    let o = moectl(&[
        "plan",
        "--load",
        &good,
        "--ranks",
        "2",
        "--redundant",
        "0",
        "--previous",
        &p,
    ]);
    assert_bad(&o, "mismatch");
    let o = moectl(&[
        "plan",
        "--load",
        &good,
        "--ranks",
        "2",
        "--redundant",
        "0",
        "--algorithm",
        "incremental",
    ]);
    assert_bad(&o, "previous");
    let missing = d.path("missing.json");
    let o = moectl(&["eval", "--placement", &missing, "--load", &good]);
    assert_bad(&o, "cannot read");
}

#[test]
fn bench_prints_and_writes_markdown() {
    let d = Dir::new("bench");
    let md = d.path("bench.md");
    let o = moectl(&[
        "bench",
        "--shape",
        "mixtral",
        "--history",
        "2",
        "--repeats",
        "1",
        "--markdown",
        &md,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("| Mixtral-like | joint |"), "{out}");
    let text = std::fs::read_to_string(&md).unwrap();
    assert!(text.contains("# EPLB benchmark results"));
    assert!(text.contains("## Findings"));
    let o = moectl(&["bench", "--shape", "nothing-matches"]);
    assert_bad(&o, "no benchmark shape");
}

/// `bench --export` writes what the peers plan from; `bench --peers` scores their plans beside
/// ours, says which produced no row and why, and refuses plans made from another run's windows.
#[test]
fn bench_exports_inputs_and_scores_peer_plans() {
    let d = Dir::new("bench-peers");
    let dir = d.path("peers");
    let base = [
        "bench",
        "--shape",
        "mixtral",
        "--history",
        "2",
        "--repeats",
        "1",
    ];
    let o = moectl(&[&base[..], &["--export", &dir]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let inputs: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{dir}/mixtral-like/inputs.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(inputs["shape"], "Mixtral-like");
    assert_eq!(inputs["history"].as_array().unwrap().len(), 2);
    assert_eq!(inputs["previous"].as_array().unwrap().len(), 32);
    assert_eq!(inputs["slots_per_rank"], 9);
    // A "peer" that keeps the placement in use, and one that failed.
    std::fs::create_dir_all(format!("{dir}/mixtral-like/peers")).unwrap();
    let keep = serde_json::json!({
        "id": "keep", "label": "keeps it (peer)", "package": "none==0", "source": "-",
        "phy2log": inputs["previous"], "plan_ms": [1.5], "threads": 1
    });
    std::fs::write(
        format!("{dir}/mixtral-like/peers/a-keep.json"),
        keep.to_string(),
    )
    .unwrap();
    let failed = serde_json::json!({
        "id": "broken", "label": "broken (peer)", "package": "none==0", "source": "-",
        "error": "ModuleNotFoundError: numba"
    });
    std::fs::write(
        format!("{dir}/mixtral-like/peers/b-broken.json"),
        failed.to_string(),
    )
    .unwrap();
    let md = d.path("bench.md");
    let o = moectl(&[&base[..], &["--peers", &dir, "--markdown", &md]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("| Mixtral-like | keeps it (peer) |"), "{out}");
    assert!(out.contains("| 0 (0.0%) |"), "{out}");
    assert!(
        out.contains("broken (peer): no row (the peer failed: ModuleNotFoundError: numba)"),
        "{out}"
    );
    let doc = std::fs::read_to_string(&md).unwrap();
    assert!(doc.contains("## The peers' own code"), "{doc}");
    assert!(doc.contains("- keeps it (peer): `none==0`"), "{doc}");
    // Plans of another run's windows are refused, naming both runs' flags.
    let o = moectl(&[&base[..], &["--seed", "7", "--peers", &dir]].concat());
    assert_bad(
        &o,
        "exported with --seed 2026 --history 2, this run has --seed 7 --history 2",
    );
    // Another drift is another run's windows too.
    let o = moectl(&[&base[..], &["--drift", "0.3", "--peers", &dir]].concat());
    assert_bad(
        &o,
        "exported with --seed 2026 --history 2, this run has --seed 2026 --history 2 --drift 0.3",
    );
    // A folder that was never exported says how to make one.
    let o = moectl(&[&base[..], &["--peers", &d.path("nothing")]].concat());
    assert_bad(&o, "make the folder with moectl bench --export");
}

/// `bench --rolling K --export` writes the windows each step plans on; `bench --rolling K
/// --peers` scores the peers' runs step by step against their own previous placement, writes
/// the rolling report, and refuses runs of another export (here: another stride).
#[test]
fn bench_rolling_exports_and_scores_peer_runs() {
    let d = Dir::new("bench-rolling");
    let dir = d.path("peers");
    let base = [
        "bench",
        "--shape",
        "mixtral",
        "--history",
        "2",
        "--repeats",
        "1",
        "--rolling",
        "3",
    ];
    let o = moectl(&[&base[..], &["--export", &dir]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!std::path::Path::new(&format!("{dir}/mixtral-like/inputs.json")).exists());
    let inputs: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{dir}/mixtral-like/rolling.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(inputs["steps"], 3);
    assert_eq!(inputs["stride"], 2, "the stride defaults to --history");
    // H + (K - 1) T windows: the last step's history ends where the last scored window starts.
    assert_eq!(inputs["windows"].as_array().unwrap().len(), 2 + 2 * 2);
    let previous = inputs["previous"].clone();
    // A "peer" that keeps the starting placement at every step, and one that stopped at step 1.
    std::fs::create_dir_all(format!("{dir}/mixtral-like/rolling")).unwrap();
    let step = serde_json::json!({"phy2log": previous, "plan_ms": 2.0, "note": "kept"});
    let keep = serde_json::json!({
        "id": "keep", "label": "keeps it (peer)", "package": "none==0", "source": "-",
        "steps": [step, step, step], "threads": 1, "note": "run note"
    });
    std::fs::write(
        format!("{dir}/mixtral-like/rolling/a-keep.json"),
        keep.to_string(),
    )
    .unwrap();
    let failed = serde_json::json!({
        "id": "broken", "label": "broken (peer)", "package": "none==0", "source": "-",
        "steps": [step], "error": "step 1: ValueError: boom"
    });
    std::fs::write(
        format!("{dir}/mixtral-like/rolling/b-broken.json"),
        failed.to_string(),
    )
    .unwrap();
    let md = d.path("rolling.md");
    let o = moectl(&[&base[..], &["--peers", &dir, "--markdown", &md]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("| Mixtral-like | keeps it (peer) |"), "{out}");
    assert!(
        out.contains(
            "broken (peer): no row (the peer failed after 1 of 3 steps: step 1: ValueError: boom)"
        ),
        "{out}"
    );
    let doc = std::fs::read_to_string(&md).unwrap();
    assert!(doc.contains("# EPLB rolling benchmark: 3 replanning steps in a row, 2 windows apart"));
    assert!(doc.contains("--rolling 3 --stride 2"), "{doc}");
    assert!(doc.contains("## Next-window PAR step by step"), "{doc}");
    assert!(
        doc.contains("- keeps it (peer): `none==0`, `-`; run note\n"),
        "{doc}"
    );
    // The keeping peer and our row that never replans agree step by step.
    let row = |name: &str| {
        doc.lines()
            .find(|l| {
                l.starts_with(&format!("| Mixtral-like | {name} | ")) && l.contains("0 (0.0%)")
            })
            .map(|l| l.split('|').nth(3).unwrap().trim().to_string())
    };
    assert_eq!(row("keeps it (peer)"), row("keep the starting placement"));
    // Runs of another stride are refused, naming both runs' flags.
    let o = moectl(&[&base[..], &["--stride", "1", "--peers", &dir]].concat());
    assert_bad(
        &o,
        "exported with --seed 2026 --history 2 --rolling 3 --stride 2, this run has --seed 2026 --history 2 --rolling 3 --stride 1",
    );
    // Nor does a one-shot run read a rolling export.
    let one_shot = &base[..base.len() - 2];
    let o = moectl(&[one_shot, &["--peers", &dir]].concat());
    assert_bad(&o, "this run has --seed 2026 --history 2:");
    assert_bad(
        &moectl(&[&base[..], &["--stride", "0"]].concat()),
        "--stride 0",
    );
    assert_bad(&moectl(&["bench", "--rolling", "0"]), "--rolling 0");
}

/// The summary says how far the layers the exact search did not prove may be from optimal:
/// the largest `proven_gap` of the written plan's unproven layers (heavy-tailed loads on 16
/// experts, 8 ranks x 4 slots, four windows: not proven today; the test holds either way).
#[test]
fn plan_summary_reports_the_largest_open_gap() {
    let d = Dir::new("open-gap");
    let load = d.file(
        "load.json",
        "[[[37497, 3343, 900, 1200, 450, 700, 3357, 800, 1500, 950, 600, 2100, 1300, 500, 1100, 640]],\
         [[2309, 9281, 500, 23094, 1700, 900, 5829, 400, 1200, 800, 3000, 700, 1500, 600, 2200, 1000]],\
         [[1265, 4541, 12658, 700, 6570, 900, 1500, 1100, 800, 2400, 600, 1800, 500, 3100, 1300, 700]],\
         [[3632, 2961, 1800, 3304, 1200, 900, 2500, 1600, 1400, 2100, 1000, 800, 1900, 1300, 1700, 1100]]]",
    );
    let out = d.path("plan.json");
    let o = moectl(&[
        "plan",
        "--load",
        &load,
        "--ranks",
        "8",
        "--redundant",
        "16",
        "--output",
        &out,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let optimal = v["optimal"].as_array().unwrap();
    let gaps = v["proven_gap"].as_array().unwrap();
    let open: Vec<f64> = optimal
        .iter()
        .zip(gaps)
        .filter(|(o, _)| o == &&Value::Bool(false))
        .map(|(_, g)| g.as_f64().unwrap())
        .collect();
    let err = stderr(&o);
    match open.iter().copied().reduce(f64::max) {
        Some(gap) => assert!(
            err.contains(&format!(
                ", {} proven within {:.3}% of optimal",
                open.len(),
                100.0 * gap
            )),
            "{err}"
        ),
        None => assert!(!err.contains("proven within"), "{err}"),
    }
}

/// FlashLB's published example: 8 experts, 8 ranks x 2 slots. The optimum (heaviest rank
/// 590/3 = 196.67, PAR 1.085) is returned and reported as proven.
#[test]
fn plan_proves_the_flashlb_example_optimal() {
    let d = Dir::new("flashlb");
    let load = d.file("load.json", "[[600, 560, 120, 120, 20, 10, 10, 10]]");
    let out = d.path("plan.json");
    let o = moectl(&[
        "plan",
        "--load",
        &load,
        "--ranks",
        "8",
        "--redundant",
        "8",
        "--algorithm",
        "joint",
        "--output",
        &out,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("1 layer proven optimal"),
        "{}",
        stderr(&o)
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(v["optimal"], serde_json::json!([true]));
    let par = v["par"][0].as_f64().unwrap();
    let heaviest = par * 1450.0 / 8.0;
    assert!(
        (heaviest - 590.0 / 3.0).abs() < 1e-6,
        "heaviest rank {heaviest}"
    );
}

/// With several nodes `--node-slack` trades objective for on-node traffic; a negative one is
/// refused with one line naming it.
#[test]
fn node_slack_is_checked() {
    let d = Dir::new("node-slack");
    let load = d.file("load.json", LOAD);
    let out = d.path("plan.json");
    let o = moectl(&[
        "plan",
        "--load",
        &load,
        "--ranks",
        "4",
        "--redundant",
        "4",
        "--nodes",
        "2",
        "--node-slack=-0.1",
        "--output",
        &out,
    ]);
    assert_bad(&o, "node slack");
    assert!(!std::path::Path::new(&out).exists());
    // Written the usual way, a negative value gets the same message, not clap's
    // "unexpected argument '-0.1'".
    let o = moectl(&[
        "plan",
        "--load",
        &load,
        "--ranks",
        "4",
        "--redundant",
        "4",
        "--nodes",
        "2",
        "--node-slack",
        "-0.1",
    ]);
    assert_bad(&o, "node slack");
    let prev = d.file(
        "prev.json",
        r#"{"num_logical_experts": 8, "num_ranks": 4, "phy2log": [[0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7, 4, 5, 0, 1]]}"#,
    );
    let o = moectl(&[
        "plan",
        "--load",
        &load,
        "--ranks",
        "4",
        "--redundant",
        "4",
        "--previous",
        &prev,
        "--threshold",
        "-2",
    ]);
    assert_bad(&o, "threshold -2");
    let o = moectl(&[
        "plan",
        "--load",
        &load,
        "--ranks",
        "4",
        "--redundant",
        "4",
        "--nodes",
        "2",
        "--node-slack",
        "0.05",
        "--output",
        &out,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// A reader that stops early (`moectl eval ... | head`) ends the command quietly: no panic
/// message, no exit code 101. The output is larger than a pipe's buffer, so the write fails
/// whenever the reader goes.
#[test]
fn a_closed_stdout_is_not_a_panic() {
    use std::process::{Command, Stdio};
    let d = Dir::new("pipe");
    let layers = 3000;
    let load = d.file(
        "load.json",
        &serde_json::to_string(&vec![vec![3, 1]; layers]).unwrap(),
    );
    let placement = d.file(
        "placement.json",
        &serde_json::json!({"num_logical_experts": 2, "num_ranks": 2,
                            "phy2log": vec![vec![0, 1]; layers]})
        .to_string(),
    );
    for json in [false, true] {
        let mut args = vec!["eval", "--load", &load, "--placement", &placement];
        if json {
            args.push("--json");
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_moectl"))
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run moectl");
        drop(child.stdout.take());
        let o = child.wait_with_output().expect("wait");
        let err = stderr(&o);
        assert!(!err.contains("panicked"), "{err}");
        assert_ne!(o.status.code(), Some(101), "{err}");
    }
}

/// Argument errors keep clap's whole message: the flag that is missing, the "did you mean"
/// hint, the valid values. Exit code 2, as for every usage error.
#[test]
fn argument_errors_are_shown_whole() {
    let d = Dir::new("usage");
    let load = d.file("load.json", LOAD);
    let o = moectl(&["plan", "--load", &load, "--ranks", "4"]);
    assert_usage(&o, "--redundant <REDUNDANT>");
    let o = moectl(&["plan", "--lod", &load, "--ranks", "4", "--redundant", "0"]);
    assert_usage(&o, "--load");
    assert!(stderr(&o).contains("tip:"), "{}", stderr(&o));
    let o = moectl(&["plan", "--load", &load, "--ranks", "x", "--redundant", "0"]);
    assert_usage(&o, "invalid value 'x' for '--ranks <RANKS>'");
    let o = moectl(&[
        "plan",
        "--load",
        &load,
        "--ranks",
        "4",
        "--redundant",
        "0",
        "--format",
        "xx",
    ]);
    assert_usage(
        &o,
        "possible values: placement, ascend-expert-map, sglang, document",
    );
}

/// `moectl` without a subcommand is a usage error (exit code 2, help on stderr), as clap has
/// it; `--help` and `--version` succeed.
#[test]
fn no_subcommand_exits_2() {
    let o = moectl(&[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("Usage: moectl"), "{}", stderr(&o));
    assert!(o.stdout.is_empty());
    for flag in ["--help", "--version"] {
        let o = moectl(&[flag]);
        assert!(o.status.success(), "{flag}: {}", stderr(&o));
        assert!(!o.stdout.is_empty(), "{flag}");
    }
}

/// The notes gathered before an error are printed before it: here the note that decoder
/// layer 0 was read as dense explains why the load has one layer fewer than the placement.
#[test]
fn notes_before_an_error_are_printed() {
    let d = Dir::new("notes-on-error");
    let load = d.file(
        "load.json",
        r#"{"logical_count": [[0, 0, 0, 0], [1, 2, 3, 4], [4, 3, 2, 1]]}"#,
    );
    let placement = d.file(
        "p3.json",
        r#"{"num_logical_experts": 4, "num_ranks": 2, "phy2log": [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]]}"#,
    );
    let o = moectl(&["eval", "--placement", &placement, "--load", &load]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(o.stdout.is_empty());
    let lines: Vec<&str> = err.trim_end().lines().collect();
    assert!(
        lines.last().is_some_and(|l| l.starts_with("error: ")),
        "{err}"
    );
    assert!(
        lines[..lines.len() - 1]
            .iter()
            .any(|l| l.starts_with("note: ") && l.contains("read as dense")),
        "{err}"
    );
}

/// Flags that cannot act on the input are errors naming the flag, not silently ignored.
#[test]
fn flags_that_would_be_ignored_are_refused() {
    let d = Dir::new("ignored-flags");
    let load = d.file("load.json", LOAD);
    let base = ["plan", "--load", &load, "--ranks", "4", "--redundant", "4"];
    let run = |extra: &[&str]| moectl(&[&base[..], extra].concat());
    assert_bad(&run(&["--max-moves", "4"]), "--max-moves needs --previous");
    // The node slack is joint's, across several nodes.
    assert_bad(
        &run(&["--node-slack", "0.01"]),
        "--node-slack applies to --algorithm joint with --nodes above 1 (here joint with 1 node)",
    );
    assert_bad(
        &run(&[
            "--nodes",
            "2",
            "--algorithm",
            "greedy",
            "--node-slack",
            "0.01",
        ]),
        "here greedy with 2 nodes",
    );
    assert!(
        run(&["--nodes", "2", "--node-slack", "0.01"])
            .status
            .success()
    );

    // A moectl placement says its ranks, nodes and experts: flags that contradict it are
    // refused, flags that agree are accepted.
    let p = d.file(
        "p.json",
        r#"{"num_logical_experts": 4, "num_ranks": 2, "num_nodes": 1, "phy2log": [[0, 1, 2, 3]]}"#,
    );
    let doc = d.file(
        "doc.json",
        r#"{"generation": 1, "numLayers": 1, "numLogicalExperts": 4, "numRanks": 2, "numNodes": 1, "phy2log": [[0, 1, 2, 3]]}"#,
    );
    let l4 = d.file("l4.json", "[[4, 3, 2, 1]]");
    for placement in [&p, &doc] {
        let eval = |extra: &[&str]| {
            moectl(
                &[
                    &["eval", "--placement", placement.as_str(), "--load", &l4][..],
                    extra,
                ]
                .concat(),
            )
        };
        assert_bad(&eval(&["--nodes", "2"]), "--nodes 2 contradicts");
        assert_bad(&eval(&["--ranks", "3"]), "--ranks 3 contradicts");
        let o = eval(&["--ranks", "2", "--nodes", "1"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let o = moectl(&[
            "convert",
            "--input",
            placement,
            "--to",
            "sglang",
            "--first-dense",
            "0",
            "--experts",
            "7",
        ]);
        assert_bad(&o, "--experts 7 contradicts");
    }
    // convert: --placement maps a per-slot load and needs --physical-load; --ranks is for
    // placements.
    let o = moectl(&[
        "convert",
        "--input",
        &l4,
        "--to",
        "windows",
        "--placement",
        &p,
    ]);
    assert_bad(&o, "--physical-load and --placement go together");
    let o = moectl(&["convert", "--input", &l4, "--to", "windows", "--ranks", "2"]);
    assert_bad(&o, "--ranks is for placements");
    let o = moectl(&[
        "convert",
        "--input",
        &p,
        "--to",
        "sglang",
        "--first-dense",
        "0",
        "--physical-load",
    ]);
    assert_bad(&o, "is a placement");
}

/// Sizes at the edge of u64 are refused or computed without wrapping round.
#[test]
fn huge_numbers_do_not_wrap() {
    let d = Dir::new("overflow");
    let l4 = d.file("l4.json", "[[4, 3, 2, 1]]");
    let p = d.file(
        "p.json",
        r#"{"num_logical_experts": 4, "num_ranks": 2, "phy2log": [[0, 1, 2, 3]]}"#,
    );
    let q = d.file(
        "q.json",
        r#"{"num_logical_experts": 4, "num_ranks": 2, "phy2log": [[3, 1, 2, 0]]}"#,
    );
    let o = moectl(&[
        "eval",
        "--placement",
        &q,
        "--previous",
        &p,
        "--load",
        &l4,
        "--expert-bytes",
        "18446744073709551615",
    ]);
    assert_bad(
        &o,
        "2 slots x 18446744073709551615 bytes per expert is more than",
    );
    let o = moectl(&[
        "eval",
        "--placement",
        &q,
        "--previous",
        &p,
        "--load",
        &l4,
        "--expert-bytes",
        "9223372036854775807",
    ]);
    assert!(
        stdout(&o).contains("migration: 2 slots, 18446744073709551614 bytes"),
        "{}",
        stderr(&o)
    );
    let o = moectl(&[
        "convert",
        "--input",
        &l4,
        "--to",
        "sglang-logical-count",
        "--first-dense",
        "18446744073709551615",
    ]);
    assert_bad(
        &o,
        "--first-dense 18446744073709551615 plus the input's MoE layers (1)",
    );
}

/// `bench` refuses what it cannot measure and names the shapes when --shape matches none.
/// (The markdown header's flags are checked where a run is cheap enough: the smallest shape
/// with one window and one repeat.)
#[test]
fn bench_flags_are_checked() {
    assert_bad(&moectl(&["bench", "--history", "0"]), "--history 0");
    assert_bad(
        &moectl(&["bench", "--history", "100000000"]),
        "between 1 and 1024",
    );
    assert_bad(&moectl(&["bench", "--repeats", "0"]), "--repeats 0");
    for bad in ["-0.1", "1.5", "NaN", "inf"] {
        assert_bad(
            &moectl(&["bench", &format!("--drift={bad}")]),
            "must be between 0 and 1 (default 0.12)",
        );
    }
    let o = moectl(&["bench", "--shape", "llama"]);
    assert_bad(
        &o,
        "no benchmark shape matches --shape llama; the shapes are: DeepSeek-V3 prefill, DeepSeek-V3 decode, Qwen3-235B, Mixtral-like",
    );
    let d = Dir::new("bench-header");
    let md = d.path("bench.md");
    let o = moectl(&[
        "bench",
        "--shape",
        "mixtral",
        "--history",
        "1",
        "--repeats",
        "1",
        "--seed",
        "7",
        "--markdown",
        &md,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let doc = std::fs::read_to_string(&md).unwrap();
    assert!(
        doc.contains(&format!(
            "`moectl bench --markdown {md} --shape mixtral --history 1 --repeats 1 --seed 7`"
        )),
        "{doc}"
    );
    // Another drift is another trace: its header says so and its PARs differ.
    let md2 = d.path("bench-drift.md");
    let o = moectl(&[
        "bench",
        "--shape",
        "mixtral",
        "--history",
        "1",
        "--repeats",
        "1",
        "--seed",
        "7",
        "--drift",
        "0.3",
        "--markdown",
        &md2,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let doc2 = std::fs::read_to_string(&md2).unwrap();
    assert!(doc2.contains("--repeats 1 --seed 7 --drift 0.3`"), "{doc2}");
    let keep = |doc: &str| {
        doc.lines()
            .find(|l| l.starts_with("| Mixtral-like | keep previous |"))
            .map(str::to_string)
    };
    assert!(
        keep(&doc).is_some() && keep(&doc) != keep(&doc2),
        "{doc}\n{doc2}"
    );
}

/// A placement whose expert count differs from the one it is read with names where that count
/// came from: --experts or the checkpoint of --model, not "the load" when there is none.
#[test]
fn expert_count_mismatch_names_its_source() {
    let d = Dir::new("experts-source");
    let sg = d.file("sg.json", r#"{"physical_to_logical_map": [[0, 1, 2, 3]]}"#);
    let o = moectl(&[
        "convert",
        "--input",
        &sg,
        "--to",
        "placement",
        "--first-dense",
        "0",
        "--ranks",
        "2",
        "--experts",
        "8",
    ]);
    assert_bad(
        &o,
        "--experts is 8 but ", // then the file and its count
    );
    assert!(
        stderr(&o)
            .contains("holds 4 experts; give the placement's routed expert count to --experts"),
        "{}",
        stderr(&o)
    );
    assert!(!stderr(&o).contains("the load"), "{}", stderr(&o));
    let map = d.file(
        "map.json",
        r#"{"moe_layer_count": 1, "layer_list": [{"layer_id": 0, "device_count": 2,
            "device_list": [{"device_id": 0, "device_expert": [0, 1, 2]},
                            {"device_id": 1, "device_expert": [3, 4, 5]}]}]}"#,
    );
    let model = format!("{}/../fixtures/models/mixtral", env!("CARGO_MANIFEST_DIR"));
    let o = moectl(&[
        "convert", "--input", &map, "--to", "sglang", "--model", &model,
    ]);
    assert_bad(&o, "the checkpoint of --model has 8 routed experts but");
    assert!(
        stderr(&o).contains("holds 6 experts; use a checkpoint and a placement of the same model"),
        "{}",
        stderr(&o)
    );
}

/// eval and plan take --experts for per-slot loads (the load's columns are slots, not E); with
/// a per-expert load it must agree with the load.
#[test]
fn experts_flag_of_eval_and_plan() {
    let d = Dir::new("experts-flag");
    let p = d.file(
        "p.json",
        r#"{"num_logical_experts": 3, "num_ranks": 2, "phy2log": [[0, 1, 2, 0]]}"#,
    );
    let per_expert = d.file("l3.json", "[[10, 4, 6]]");
    let per_slot = d.file("l4.json", "[[5, 4, 6, 5]]");
    let o = moectl(&[
        "eval",
        "--placement",
        &p,
        "--load",
        &per_expert,
        "--experts",
        "4",
    ]);
    assert_bad(&o, "--experts 4 but the load has 3 experts per layer");
    let o = moectl(&[
        "eval",
        "--placement",
        &p,
        "--load",
        &per_expert,
        "--experts",
        "3",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = moectl(&[
        "eval",
        "--placement",
        &p,
        "--load",
        &per_slot,
        "--physical-load",
        "--experts",
        "3",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = moectl(&[
        "eval",
        "--placement",
        &p,
        "--load",
        &per_slot,
        "--physical-load",
        "--experts",
        "5",
    ]);
    assert_bad(&o, "--experts 5 contradicts");
    let o = moectl(&[
        "plan",
        "--load",
        &per_slot,
        "--physical-load",
        "--previous",
        &p,
        "--ranks",
        "2",
        "--redundant",
        "1",
        "--experts",
        "3",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = moectl(&[
        "plan",
        "--load",
        &per_slot,
        "--physical-load",
        "--previous",
        &p,
        "--ranks",
        "2",
        "--redundant",
        "1",
        "--experts",
        "5",
    ]);
    assert_bad(&o, "--experts 5 contradicts");
}

/// `convert` to a placement format says what it expected when the input is neither a
/// placement nor a load, instead of calling any JSON "a load".
#[test]
fn convert_says_what_an_unrecognised_input_is() {
    let d = Dir::new("convert-unknown");
    let foo = d.file("foo.json", r#"{"foo": 1}"#);
    let o = moectl(&["convert", "--input", &foo, "--to", "placement"]);
    assert_bad(
        &o,
        "is not a placement (it has none of the keys layer_list, physical_to_logical_map, numLogicalExperts, phy2log) nor a load",
    );
    assert!(!stderr(&o).contains("is a load"), "{}", stderr(&o));
    let load = d.file("load.json", "[[1, 2]]");
    let o = moectl(&["convert", "--input", &load, "--to", "placement"]);
    assert_bad(&o, "load.json is a load: --to must be windows");
}

/// Errors name their cause: a byte-order mark is accepted, text that is not UTF-8 is said to
/// be so, ragged rows are said to differ, a gap in the ids names the expert without a replica.
#[test]
fn errors_name_the_cause() {
    let d = Dir::new("causes");
    let p = d.file(
        "p.json",
        r#"{"num_logical_experts": 2, "num_ranks": 1, "phy2log": [[0, 1]]}"#,
    );
    let bom = d.0.join("bom.json");
    std::fs::write(&bom, b"\xef\xbb\xbf[[3, 1]]").unwrap();
    let bom = bom.display().to_string();
    let o = moectl(&["eval", "--placement", &p, "--load", &bom]);
    assert!(o.status.success(), "{}", stderr(&o));
    let latin1 = d.0.join("latin1.json");
    std::fs::write(&latin1, b"[[3, 1]] \xe9").unwrap();
    let latin1 = latin1.display().to_string();
    let o = moectl(&["eval", "--placement", &p, "--load", &latin1]);
    assert_bad(&o, "not UTF-8 text (byte 0xe9 at offset 9)");
    let o = moectl(&["convert", "--input", &latin1, "--to", "windows"]);
    assert_bad(&o, "not UTF-8 text");

    let ragged = d.file(
        "ragged.json",
        r#"{"physical_to_logical_map": [[0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 0, 1, 2]]}"#,
    );
    let o = moectl(&[
        "convert",
        "--input",
        &ragged,
        "--to",
        "placement",
        "--ranks",
        "2",
        "--first-dense",
        "0",
    ]);
    assert_bad(
        &o,
        "layer 1 has 7 slots, layer 0 has 6: every layer must have the same slots",
    );
    let gap = d.file("gap.json", r#"{"physical_to_logical_map": [[0, 1, 3, 4]]}"#);
    let o = moectl(&[
        "convert",
        "--input",
        &gap,
        "--to",
        "placement",
        "--ranks",
        "2",
        "--first-dense",
        "0",
    ]);
    assert_bad(
        &o,
        "4 slots cannot hold 5 experts (layer 0 has no replica of expert 2)",
    );
}

/// Under masked ranks (-1), a per-slot load passed as a per-expert one has as many columns as
/// the map as written, more than the placement read from it: the error names --physical-load.
#[test]
fn per_slot_load_under_masked_ranks_points_to_physical_load() {
    let d = Dir::new("masked-per-slot");
    let sg = d.file(
        "vps3.json",
        r#"{"physical_to_logical_map": [[-1, -1, 0, 1, 2, 3], [-1, -1, 3, 2, 1, 0]]}"#,
    );
    let ph = d.file(
        "ph.json",
        r#"{"num_logical_experts": 4, "num_ranks": 3, "phy2log": [[-1, -1, 0, 1, 2, 3], [-1, -1, 3, 2, 1, 0]]}"#,
    );
    let load = d.file("l6x2.json", "[[0, 0, 3, 4, 5, 6], [0, 0, 3, 4, 5, 6]]");
    for (placement, extra) in [(&sg, vec!["--ranks", "3"]), (&ph, vec![])] {
        let mut args = vec![
            "eval",
            "--placement",
            placement,
            "--first-dense",
            "0",
            "--load",
            &load,
        ];
        args.extend(extra);
        let o = moectl(&args);
        assert_bad(
            &o,
            "it looks like vLLM's per-slot load; pass --physical-load",
        );
        args.push("--physical-load");
        let o = moectl(&args);
        assert!(o.status.success(), "{}", stderr(&o));
    }
}

/// Small things a reader notices: singular counts, no note for a one-pass logical_count, an
/// output that would replace an input, the previous column under its header.
#[test]
fn cosmetics() {
    let d = Dir::new("cosmetics");
    let load = d.file("load.json", "[[10, 4, 6, 2]]");
    let out = d.path("plan.json");
    let o = moectl(&[
        "plan",
        "--load",
        &load,
        "--ranks",
        "2",
        "--redundant",
        "0",
        "--output",
        &out,
    ]);
    assert!(
        stderr(&o).contains("planned 1 layer with"),
        "{}",
        stderr(&o)
    );
    assert!(!stderr(&o).contains("1 layers"), "{}", stderr(&o));
    // A plain [L][E] logical_count is one pass: no "passes summed" note.
    let lc = d.file("lc.json", r#"{"logical_count": [[10, 4, 6, 2]]}"#);
    let o = moectl(&[
        "eval",
        "--placement",
        &out,
        "--load",
        &lc,
        "--first-dense",
        "0",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("passes summed"), "{}", stderr(&o));
    // Outputs that are inputs.
    let o = moectl(&["eval", "--placement", &out, "--load", &load, "--svg", &out]);
    assert_bad(&o, "--svg");
    assert!(stderr(&o).contains("is also an input"), "{}", stderr(&o));
    let o = moectl(&[
        "convert", "--input", &load, "--to", "windows", "--output", &load,
    ]);
    assert_bad(&o, "--output");
    let o = moectl(&[
        "plan",
        "--load",
        &load,
        "--ranks",
        "2",
        "--redundant",
        "0",
        "--output",
        &load,
    ]);
    assert_bad(&o, "is also an input");
    assert_eq!(std::fs::read_to_string(&load).unwrap(), "[[10, 4, 6, 2]]");
    // The previous column starts where its header does.
    let o = moectl(&[
        "eval",
        "--placement",
        &out,
        "--load",
        &load,
        "--previous",
        &out,
    ]);
    let text = stdout(&o);
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    let row = lines.next().unwrap();
    let col = header.find("previous").unwrap();
    assert_eq!(row.len(), col + "1.0000".len(), "{header}\n{row}");
    assert_eq!(&row[col - 2..col], "  ", "{header}\n{row}");
}

/// Every flag of every subcommand has a description in --help.
#[test]
fn every_flag_is_described() {
    for sub in [
        &["plan"][..],
        &["eval"],
        &["convert"],
        &["bench"],
        &["model", "inspect"],
    ] {
        let o = moectl(&[sub, &["--help"][..]].concat());
        assert!(o.status.success(), "{sub:?}");
        let help = stdout(&o);
        let lines: Vec<&str> = help.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            let flag = l.trim_start();
            if !(flag.starts_with("--") || flag.starts_with("-h, ") || flag.starts_with("-V, ")) {
                continue;
            }
            // clap writes the description after the flag on the same line, or (when some
            // do not fit) on the next line, further indented.
            // "[default: 8]" alone is no description.
            let words = |text: &str| {
                let t = text.trim();
                !t.is_empty() && !t.starts_with('[') && !t.starts_with('-')
            };
            if flag.split_once("  ").is_some_and(|(_, text)| words(text)) {
                continue;
            }
            let next = lines.get(i + 1).copied().unwrap_or("");
            let indent = |s: &str| s.len() - s.trim_start().len();
            assert!(
                indent(next) > indent(l) && words(next),
                "{sub:?}: no description for `{}`:\n{help}",
                flag
            );
        }
    }
}

/// `--output` through a symlink updates the file it points to (the link stays a link), keeps
/// that file's permissions, and an input named as the old temporary (`x.moectl-tmp` for
/// `x.json`) survives.
#[test]
fn output_keeps_links_permissions_and_inputs() {
    use std::os::unix::fs::PermissionsExt;
    let d = Dir::new("output-kinds");
    let load = d.file("x.moectl-tmp", LOAD);
    let real = d.file("real.json", "old");
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o600)).unwrap();
    let link = d.path("x.json");
    std::os::unix::fs::symlink("real.json", &link).unwrap();
    let o = moectl(&[
        "plan",
        "--load",
        &load,
        "--ranks",
        "4",
        "--redundant",
        "4",
        "--output",
        &link,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&real).unwrap()).unwrap();
    assert_eq!(v["num_layers"], 2);
    let mode = std::fs::metadata(&real).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(std::fs::read_to_string(&load).unwrap(), LOAD);
    let mut left: Vec<String> = std::fs::read_dir(&d.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["real.json", "x.json", "x.moectl-tmp"]);
}

/// `plan --previous` keeps the previous placement's nodes when `--nodes` is not given (a
/// 2-node placement re-planned stays on 2 nodes) and refuses a `--nodes` that contradicts it.
#[test]
fn plan_takes_the_nodes_of_previous() {
    let d = Dir::new("plan-prev-nodes");
    let load = d.file("load.json", LOAD);
    let two = d.path("two.json");
    let plan = |extra: &[&str]| {
        let base = ["plan", "--load", &load, "--ranks", "4", "--redundant", "4"];
        moectl(&[&base[..], extra].concat())
    };
    let o = plan(&["--nodes", "2", "--output", &two]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = plan(&["--previous", &two]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["num_nodes"], 2, "{v}");
    let o = plan(&["--previous", &two, "--nodes", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = plan(&["--previous", &two, "--nodes", "1"]);
    assert_bad(
        &o,
        &format!("--nodes 1 contradicts --previous {two}, which has 2 nodes"),
    );
    // Without --previous the default is still 1.
    let v: Value = serde_json::from_str(&stdout(&plan(&[]))).unwrap();
    assert_eq!(v["num_nodes"], 1, "{v}");
}

/// An output that cannot be written (an existing directory, a file in a directory that does
/// not exist) is refused before the work, naming its flag: nothing is printed first.
#[test]
fn unwritable_outputs_are_refused_before_the_work() {
    let d = Dir::new("unwritable");
    let load = d.file("load.json", LOAD);
    let placement = d.path("p.json");
    let o = moectl(&[
        "plan",
        "--load",
        &load,
        "--ranks",
        "4",
        "--redundant",
        "4",
        "--output",
        &placement,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let trace = d.file("trace.json", &format!("[{LOAD}, {LOAD}, {LOAD}]"));
    let dir = d.path("");
    let missing = d.path("missing/out.txt");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "plan",
                "--load",
                &load,
                "--ranks",
                "4",
                "--redundant",
                "4",
                "--output",
            ],
            "--output",
        ),
        (
            vec!["eval", "--placement", &placement, "--load", &load, "--svg"],
            "--svg",
        ),
        (
            vec![
                "backtest",
                "--load",
                &trace,
                "--ranks",
                "4",
                "--redundant",
                "4",
                "--history",
                "1",
                "--markdown",
            ],
            "--markdown",
        ),
        (
            vec!["bench", "--shape", "small", "--repeats", "1", "--markdown"],
            "--markdown",
        ),
        (
            vec!["convert", "--input", &load, "--to", "windows", "--output"],
            "--output",
        ),
        (
            vec![
                "record",
                "--worker",
                "http://127.0.0.1:9",
                "--idle-seconds",
                "1",
                "--output",
            ],
            "--output",
        ),
    ];
    for (args, flag) in &cases {
        let o = moectl(&[&args[..], &[dir.as_str()]].concat());
        assert_bad(&o, &format!("{flag} {dir} is a directory"));
        let o = moectl(&[&args[..], &[missing.as_str()]].concat());
        assert_bad(&o, &format!("{flag} {missing}: the directory"));
    }
    // --export is a directory: an existing file there is refused.
    let o = moectl(&[
        "backtest",
        "--load",
        &trace,
        "--ranks",
        "4",
        "--redundant",
        "4",
        "--history",
        "1",
        "--export",
        &load,
    ]);
    assert_bad(&o, "--export");
    let o = moectl(&["bench", "--export", &load]);
    assert_bad(&o, "--export");
}

/// Errors name the flag (and file) they are about, and say the fix.
#[test]
fn errors_name_their_flag() {
    let d = Dir::new("errors-name-flag");
    let load = d.file("load.json", LOAD);
    let trace = d.file("trace.json", &format!("[{LOAD}, {LOAD}, {LOAD}]"));
    let four = d.path("four.json");
    let plan = |extra: &[&str]| {
        let base = ["plan", "--load", &load, "--redundant", "4"];
        moectl(&[&base[..], extra].concat())
    };
    let o = plan(&["--ranks", "4", "--output", &four]);
    assert!(o.status.success(), "{}", stderr(&o));
    // A previous placement of another layout: which flag, which file, which flags fit it.
    let o = plan(&["--ranks", "2", "--previous", &four]);
    assert_bad(&o, &format!("--previous {four}: mismatch"));
    assert!(
        stderr(&o).contains("--ranks 4 --redundant 4, or drop --previous"),
        "{}",
        stderr(&o)
    );
    let backtest = |extra: &[&str]| {
        let base = ["backtest", "--load", &trace, "--redundant", "4"];
        moectl(&[&base[..], extra].concat())
    };
    let o = backtest(&["--ranks", "2", "--history", "1", "--previous", &four]);
    assert_bad(&o, &format!("--previous {four}: mismatch"));
    // The stride defaults to the history: too long a history is --history's fault.
    let o = backtest(&["--ranks", "4", "--history", "1025"]);
    assert_bad(&o, "--history 1025: give between 1 and 1024");
    for o in [
        plan(&["--ranks", "0"]),
        backtest(&["--ranks", "0", "--history", "1"]),
    ] {
        assert_bad(&o, "--ranks 0: give at least 1");
    }
    assert_bad(&plan(&["--ranks", "4", "--nodes", "0"]), "--nodes 0");
    assert_bad(&plan(&["--ranks", "4", "--groups", "0"]), "--groups 0");
    let o = plan(&["--ranks", "4", "--algorithm", "incremental"]);
    assert_bad(&o, "--algorithm incremental needs --previous");
    // record: both ways to reach the ranks are named; --windows 0 is refused when parsed.
    let out = d.path("rec.json");
    let o = moectl(&["record", "--output", &out]);
    assert_usage(&o, "--deployment");
    assert!(stderr(&o).contains("--worker"), "{}", stderr(&o));
    let o = moectl(&[
        "record",
        "--worker",
        "http://127.0.0.1:9",
        "--windows",
        "0",
        "--output",
        &out,
    ]);
    assert_usage(&o, "give at least 1 window");
    assert!(!std::path::Path::new(&out).exists());
}

/// eval's migration bytes are the `--model` checkpoint's experts as stored (FP8 weights and
/// their block scales), not DeepSeek-V3's bf16 size; `--expert-bytes` still decides.
#[test]
fn eval_counts_the_models_expert_bytes() {
    let d = Dir::new("eval-model-bytes");
    let model = format!(
        "{}/../fixtures/models/deepseek_v3_fp8",
        env!("CARGO_MANIFEST_DIR")
    );
    let load = d.file("l.json", "[[8, 7, 6, 5, 4, 3, 2, 1]]");
    let now = d.file(
        "p.json",
        r#"{"num_logical_experts": 8, "num_ranks": 2, "phy2log": [[0, 1, 2, 3, 4, 5, 6, 7]]}"#,
    );
    let before = d.file(
        "q.json",
        r#"{"num_logical_experts": 8, "num_ranks": 2, "phy2log": [[1, 0, 2, 3, 4, 5, 6, 7]]}"#,
    );
    let bytes = |extra: &[&str]| -> u64 {
        let mut args = vec![
            "eval",
            "--placement",
            &now,
            "--load",
            &load,
            "--previous",
            &before,
            "--json",
        ];
        args.extend_from_slice(extra);
        let o = moectl(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        v["migration"]["bytes"].as_u64().unwrap()
    };
    // hidden 256 x moe_intermediate 160, three projections of one byte, and f32 scales per
    // 128 x 128 block: 2 x (2 x 2) + 2 x 2 blocks.
    let fp8 = 3 * 256 * 160 + 4 * (2 * 4 + 4);
    assert_eq!(bytes(&["--model", &model]), 2 * fp8);
    assert_eq!(bytes(&[]), 2 * 88_080_384);
    assert_eq!(bytes(&["--model", &model, "--expert-bytes", "10"]), 20);
}
