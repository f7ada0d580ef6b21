//! `moectl backtest` end to end: a recorded trace replayed, checked against `plan` and `eval`
//! run by hand on the same windows.

mod common;

use common::*;

/// Windows of a drifting trace `[W][L][E]`, 2 layers of 8 experts (deterministic).
fn trace(windows: usize) -> Vec<Vec<Vec<u64>>> {
    (0..windows)
        .map(|w| {
            (0..2)
                .map(|l| {
                    (0..8)
                        .map(|e| {
                            let phase = (w as f64) * 0.4 + (e * (l + 2)) as f64;
                            (1000.0 / (1.0 + e as f64) * (1.5 + phase.sin())).round() as u64
                        })
                        .collect()
                })
                .collect()
        })
        .collect()
}

/// [`trace`] as `moectl record` writes it: windows ending every 100 steps.
fn recording(windows: usize) -> serde_json::Value {
    serde_json::json!({
        "windows": trace(windows),
        "endSteps": (1..=windows).map(|k| 100 * k).collect::<Vec<_>>(),
    })
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap()
}

/// The note that says which windows were scored.
fn replay_note(o: &std::process::Output) -> String {
    stderr(o)
        .lines()
        .find(|l| l.contains("replaying"))
        .unwrap_or_else(|| panic!("no replay note: {}", stderr(o)))
        .to_string()
}

/// A row's next PAR (the table's third column).
fn next_par(table: &str, policy: &str) -> f64 {
    let row = table
        .lines()
        .find(|l| l.starts_with(&format!("| recorded | {policy} |")))
        .unwrap_or_else(|| panic!("no row {policy}: {table}"));
    row.split('|').nth(3).unwrap().trim().parse().unwrap()
}

/// `moectl backtest` on `load` with 4 ranks and 4 redundant slots, then `extra`.
fn backtest(load: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "backtest",
        "--load",
        load,
        "--ranks",
        "4",
        "--redundant",
        "4",
    ];
    args.extend_from_slice(extra);
    moectl(&args)
}

#[test]
fn backtest_replays_a_recorded_trace_as_plan_and_eval_would() {
    let d = Dir::new("backtest");
    let windows = trace(9);
    let load = d.file("trace.json", &json(&windows));
    let md = d.path("report.md");
    let o = backtest(&load, &["--history", "2", "--markdown", &md]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Without a placement in use the first 2 windows make the start; 3 steps of 2 fit.
    assert!(
        replay_note(&o).contains(
            "replaying 3 steps 2 windows apart, each planning on 2 windows: scored on windows 4 to 8 of 9"
        ),
        "{}",
        stderr(&o)
    );
    let table = stdout(&o);
    for policy in [
        "joint",
        "multi-episode-lpt",
        "greedy",
        "lower bound (each next window)",
    ] {
        assert!(next_par(&table, policy) >= 1.0, "{policy}");
    }
    // --json: the same rows, per step; a recorded trace's expected PAR is null.
    let o = backtest(&load, &["--history", "2", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(
        (v["steps"].as_u64(), v["first_scored_window"].as_u64()),
        (Some(3), Some(4))
    );
    let joint = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["algorithm"] == "joint")
        .unwrap();
    let pars: Vec<f64> = serde_json::from_value(joint["next_par"].clone()).unwrap();
    assert_eq!(pars.len(), 3);
    let mean = pars.iter().sum::<f64>() / 3.0;
    assert!((mean - next_par(&table, "joint")).abs() < 6e-5);
    assert!(
        joint["expected_par"]
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x.is_null())
    );
    let report = std::fs::read_to_string(&md).unwrap();
    assert!(report.contains("# EPLB backtest") && report.contains(" step 3 |"));

    // The starting placement, planned and scored by hand: joint on windows 0-1, then its
    // mean PAR on windows 4, 6 and 8, averaged, is the row that never replans.
    let start = d.path("start.json");
    let first = d.file("first.json", &json(&windows[..2].to_vec()));
    let o = moectl(&[
        "plan",
        "--load",
        &first,
        "--ranks",
        "4",
        "--redundant",
        "4",
        "--output",
        &start,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut sum = 0.0;
    for w in [4, 6, 8] {
        let one = d.file(&format!("w{w}.json"), &json(&windows[w]));
        let o = moectl(&["eval", "--placement", &start, "--load", &one, "--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        sum += v["mean_par"].as_f64().unwrap();
    }
    let keep = next_par(&table, "keep the starting placement");
    assert!((keep - sum / 3.0).abs() < 6e-5, "{keep} vs {}", sum / 3.0);

    // From the placement in use, step 0 plans on windows 0-1; the latest 2 steps of a stride
    // of 1 are scored on windows 7 and 8, and the start is that placement.
    let o = backtest(
        &load,
        &[
            "--history",
            "2",
            "--stride",
            "1",
            "--steps",
            "2",
            "--previous",
            &start,
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // The inputs are read as `plan` reads them: --experts must agree with the placement.
    assert_bad(
        &backtest(
            &load,
            &["--physical-load", "--experts", "9", "--previous", &start],
        ),
        "--experts 9 contradicts",
    );
    assert!(
        replay_note(&o).contains("replaying 2 steps 1 window apart")
            && replay_note(&o).contains("scored on windows 7 to 8 of 9"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn backtest_sums_windows_and_refuses_what_it_cannot_replay() {
    let d = Dir::new("backtest-bad");
    let load = d.file("trace.json", &json(&trace(9)));
    let run = |extra: &[&str]| backtest(&load, extra);
    // 9 windows summed 2 at a time: 4, the oldest left out; H = 1 leaves 2 steps.
    let o = run(&["--aggregate", "2", "--history", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(
            "9 windows recorded, summed 2 at a time: 4 windows (the oldest 1 window left out)"
        ),
        "{}",
        stderr(&o)
    );
    assert!(
        replay_note(&o).contains("replaying 2 steps"),
        "{}",
        stderr(&o)
    );
    // Too short without a placement in use: the message says how many and what helps.
    assert_bad(&run(&["--history", "5"]), "needs at least 11");
    assert_bad(&run(&["--history", "5"]), "--previous");
    assert_bad(&run(&["--aggregate", "0"]), "--aggregate 0");
    assert_bad(&run(&["--aggregate", "10"]), "--aggregate 10");
    assert_bad(
        &run(&["--physical-load"]),
        "--physical-load needs --previous",
    );
    assert_bad(&run(&["--history", "2", "--stride", "0"]), "stride of 0");
    assert_bad(&run(&["--threshold", "1.02"]), "--threshold 1.02");
    // The largest history there is: refused with what it needs, not wrapped around (alone and
    // beside another history).
    let max = usize::MAX.to_string();
    assert_bad(
        &run(&["--history", &max, "--stride", "1"]),
        "needs at least",
    );
    let both = format!("1,{max}");
    assert_bad(
        &run(&["--history", &both, "--stride", "1"]),
        "needs at least",
    );
    assert_bad(&run(&["--threshold", "nan"]), "--threshold NaN");
    assert_bad(&run(&["--history", "2", "--steps", "0"]), "at most 0 steps");
}

#[test]
fn backtest_exports_for_the_peers_and_scores_only_the_same_inputs() {
    let d = Dir::new("backtest-export");
    let load = d.file("trace.json", &json(&trace(9)));
    let dir = d.path("export");
    let run = |extra: &[&str]| {
        let mut args = vec!["--history", "2"];
        args.extend_from_slice(extra);
        backtest(&load, &args)
    };
    let o = run(&["--export", &dir]);
    assert!(o.status.success(), "{}", stderr(&o));
    let exported: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{dir}/recorded/rolling.json")).unwrap(),
    )
    .unwrap();
    // The steps' windows (not the ones that made the start, nor the last one scored) and the
    // start, as the peers' rolling driver reads them.
    assert_eq!(exported["steps"], 3);
    assert_eq!(exported["history_windows"], 2);
    assert_eq!(exported["windows"].as_array().unwrap().len(), 6);
    let first: Vec<Vec<f64>> = serde_json::from_value(exported["windows"][0].clone()).unwrap();
    let want: Vec<Vec<f64>> = trace(9)[2]
        .iter()
        .map(|row| row.iter().map(|&x| x as f64).collect())
        .collect();
    assert_eq!(first, want);
    assert_eq!(exported["shape"], "recorded");
    // Scoring needs the same inputs; without the peers' runs a note says so.
    let o = run(&["--peers", &dir]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("no peer plans for recorded"),
        "{}",
        stderr(&o)
    );
    assert_bad(
        &run(&["--peers", &dir, "--stride", "1"]),
        "holds other inputs than this run's",
    );
    assert_bad(
        &run(&["--peers", &d.path("nowhere")]),
        "make the folder with moectl backtest --export",
    );
}

/// A row of one history's replay in `--json` output.
fn json_row<'a>(replay: &'a serde_json::Value, policy: &str) -> &'a serde_json::Value {
    replay["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["algorithm"] == policy)
        .unwrap_or_else(|| panic!("no row {policy}"))
}

#[test]
fn backtest_with_several_histories_equals_one_replay_each_on_the_same_windows() {
    let d = Dir::new("backtest-histories");
    let load = d.file("trace.json", &json(&trace(11)));
    let md = d.path("sweep.md");
    let o = backtest(
        &load,
        &["--history", "3,1", "--steps", "3", "--markdown", &md],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // One step a window (the operator replans each window), the last on the newest window.
    for h in ["1 window", "3 windows"] {
        assert!(
            stderr(&o).contains(&format!(
                "replaying 3 steps 1 window apart, each planning on {h}: scored on windows 8 to 10 of 11"
            )),
            "{}",
            stderr(&o)
        );
    }
    let table = stdout(&o);
    assert!(table.starts_with("| policy | H = 1 | H = 3 |\n"), "{table}");
    assert!(table.contains("- Lowest next-window PAR: "), "{table}");
    assert!(table.contains("spec:\n    eplb:\n      algorithm: joint\n      historyWindows: "));
    let report = std::fs::read_to_string(&md).unwrap();
    assert!(report.contains("## H = 1\n") && report.contains("## H = 3\n"));

    // --json: each history's rows are those of a replay of that history alone.
    let o = backtest(&load, &["--history", "1,3", "--steps", "3", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(
        (v["steps"].as_u64(), v["first_scored_window"].as_u64()),
        (Some(3), Some(8))
    );
    let mut lowest = f64::INFINITY;
    for (i, h) in ["1", "3"].into_iter().enumerate() {
        let replay = &v["histories"][i];
        assert_eq!(replay["history"].to_string(), h);
        let alone = backtest(
            &load,
            &["--history", h, "--stride", "1", "--steps", "3", "--json"],
        );
        assert!(alone.status.success(), "{}", stderr(&alone));
        let alone: serde_json::Value = serde_json::from_str(&stdout(&alone)).unwrap();
        for policy in ["joint", "multi-episode-lpt", "keep the starting placement"] {
            assert_eq!(
                json_row(replay, policy)["next_par"],
                json_row(&alone, policy)["next_par"],
                "H = {h}, {policy}"
            );
        }
        for row in replay["rows"].as_array().unwrap() {
            if row["algorithm"] != "lower bound (each next window)" {
                let pars: Vec<f64> = serde_json::from_value(row["next_par"].clone()).unwrap();
                lowest = lowest.min(pars.iter().sum::<f64>() / 3.0);
            }
        }
    }
    // The best is the lowest row of all; the operator's is a trigger row, with its settings.
    assert!((v["best"]["next_par"].as_f64().unwrap() - lowest).abs() < 1e-12);
    let op = &v["operator"];
    assert!(
        op["policy"]
            .as_str()
            .unwrap()
            .starts_with("joint, operator trigger")
    );
    assert_eq!(op["eplb"]["historyWindows"], op["history"]);
    assert_eq!(op["eplb"]["algorithm"], "joint");

    // Too few windows for the longest history: the message names what it needs.
    assert_bad(&backtest(&load, &["--history", "1,6"]), "needs at least 13");
    assert_bad(
        &backtest(&load, &["--history", "1,2", "--export", &d.path("x")]),
        "give one --history value",
    );
}

#[test]
fn backtest_replays_the_operator_behind_each_threshold_asked_for() {
    let d = Dir::new("backtest-thresholds");
    let load = d.file("trace.json", &json(&trace(9)));
    let o = backtest(&load, &["--history", "2", "--threshold", "1.05,1.1,1.05"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let table = stdout(&o);
    let trigger = |t: &str| {
        format!("joint, operator trigger (imbalanceThreshold {t}, hysteresis 0.05, every layer)")
    };
    // 1.05 added once; 1.1 is a default row already.
    assert!(next_par(&table, &trigger("1.05")) >= 1.0, "{table}");
    for t in ["1.05", "1.10"] {
        let rows = table
            .lines()
            .filter(|l| l.starts_with(&format!("| recorded | {} |", trigger(t))))
            .count();
        assert_eq!(rows, 1, "{t}: {table}");
    }
    // Finer than the rows' labels, or where the CRD would refuse it: an error.
    assert_bad(
        &backtest(&load, &["--history", "2", "--threshold", "1.101"]),
        "at most two decimals",
    );
    // A recording's lost windows are said to be replayed as consecutive.
    let mut rec = recording(9);
    rec["gaps"] = serde_json::json!([[300, 500]]);
    let recorded = d.file("recorded.json", &rec.to_string());
    let o = backtest(&recorded, &["--history", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("the recording lost the windows of steps 300-500"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn budgets_that_round_alike_make_one_row() {
    let d = Dir::new("backtest-budgets");
    let load = d.file("trace.json", &json(&trace(9)));
    // 8 experts on 2 ranks, no redundant slot: 1/16 and 1/8 of 8 slots are both 1 move.
    let o = moectl(&[
        "backtest",
        "--load",
        &load,
        "--ranks",
        "2",
        "--redundant",
        "0",
        "--history",
        "2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = stdout(&o)
        .lines()
        .filter(|l| l.starts_with("| recorded | joint (max 1/layer) |"))
        .count();
    assert_eq!(rows, 1, "{}", stdout(&o));
}

/// A recording by `moectl record --deployment` carries the deployment's `spec.eplb`: its
/// settings get a row of their own, and the findings set them against the lowest operator row.
#[test]
fn backtest_sets_the_recorded_deployments_settings_against_the_best() {
    let d = Dir::new("backtest-deployed");
    let mut rec = recording(12);
    rec["deployment"] = serde_json::json!("ml/demo");
    // The API server returns spec.eplb with the CRD's defaults filled in; these are not them.
    rec["eplb"] = serde_json::json!({
        "enabled": true, "algorithm": "joint", "historyWindows": 2,
        "imbalanceThreshold": 1.07, "hysteresis": 0.02, "maxLayersPerRemap": 1,
        "maxBytesPerRemap": "1Gi",
    });
    let recorded = d.file("recorded.json", &rec.to_string());
    let label = "joint, operator trigger (imbalanceThreshold 1.07, hysteresis 0.02, \
                 maxLayersPerRemap 1)";
    let o = backtest(&recorded, &["--history", "1,2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let finding = out
        .lines()
        .find(|l| l.starts_with("- ml/demo as recorded (historyWindows 2, imbalanceThreshold 1.07"))
        .unwrap_or_else(|| panic!("no finding of the deployment's settings: {out}"));
    // Its figure is its row's at H = 2 in the table.
    let row = out
        .lines()
        .find(|l| l.starts_with(&format!("| {label} |")))
        .unwrap_or_else(|| panic!("no row {label}: {out}"));
    // Cells are `PAR (slots moved)`, the lowest of a row in bold.
    let cell = row.split('|').nth(3).unwrap().trim();
    let at_h2 = cell.split_whitespace().next().unwrap().trim_matches('*');
    assert!(
        finding.contains(&format!(": {at_h2},")),
        "{finding} / {row}"
    );
    assert!(finding.contains("the lowest operator row"), "{finding}");
    // Without the bytes of an expert and a clock (a recording by an older moectl), the byte
    // budget and the cooldown are not replayed, and the notes say so.
    for note in [
        "ml/demo's maxBytesPerRemap is not replayed: the recording does not say the bytes of an \
         expert",
        "ml/demo's replanIntervalSeconds is not replayed: the recording does not date its windows",
    ] {
        assert!(stderr(&o).contains(note), "{note}: {}", stderr(&o));
    }
    // One history: the line in the text and in the markdown report too.
    let report = d.path("one.md");
    let o = backtest(
        &recorded,
        &["--history", "2", "--stride", "1", "--markdown", &report],
    );
    assert!(
        stdout(&o).contains("- ml/demo as recorded"),
        "{}",
        stdout(&o)
    );
    let doc = std::fs::read_to_string(&report).unwrap();
    assert!(doc.contains("- ml/demo as recorded"), "{doc}");
    // Its history not replayed: said, with the flag that adds it.
    let o = backtest(&recorded, &["--history", "1"]);
    assert!(
        stdout(&o).contains("its historyWindows was not replayed; add 2 to --history"),
        "{}",
        stdout(&o)
    );
    // Settings that round to a default row's label are that row, said so.
    let mut near = rec.clone();
    near["eplb"] = serde_json::json!({"historyWindows": 2, "imbalanceThreshold": 1.201});
    let near = d.file("near.json", &near.to_string());
    let o = backtest(&near, &["--history", "2"]);
    assert!(
        stderr(&o).contains("round to the row \"joint, operator trigger (imbalanceThreshold 1.20"),
        "{}",
        stderr(&o)
    );
    // A recording too short for its history: how many windows it needs.
    let mut short = rec.clone();
    short["eplb"]["historyWindows"] = serde_json::json!(12);
    let short = d.file("short.json", &short.to_string());
    let o = backtest(&short, &["--history", "1"]);
    assert!(
        stdout(&o).contains("record at least 13 windows to compare"),
        "{}",
        stdout(&o)
    );
    // Paused: the settings remap nothing, and are the row that keeps the start.
    rec["eplb"]["paused"] = serde_json::json!(true);
    let paused = d.file("paused.json", &rec.to_string());
    let o = backtest(&paused, &["--history", "2", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(report["deployment"]["row"], "keep the starting placement");
    // A damaged eplb is an error that names it, not a recording without settings.
    rec["eplb"] = serde_json::json!({"historyWindows": "four"});
    let damaged = d.file("damaged.json", &rec.to_string());
    assert_bad(
        &backtest(&damaged, &["--history", "2"]),
        "the recording's eplb does not read",
    );
}

/// The steps the cooled row of [`backtest_replays_the_recorded_planner_budgets_and_cooldown`]
/// remaps at, where the same row without a cooldown remaps at every step: steps k + 1 and
/// k + 2 close 100 s and 200 s after a remap at step k, within its cooldown of 250 s.
const COOLED_STEPS: [usize; 4] = [0, 3, 6, 9];

#[test]
fn backtest_replays_the_recorded_planner_budgets_and_cooldown() {
    let d = Dir::new("backtest-budgets");
    let mut rec = recording(14);
    rec["deployment"] = serde_json::json!("ml/demo");
    // One expert is 1 MiB; a step a second, so a window (100 steps) closes every 100 s.
    rec["expertBytes"] = serde_json::json!(1 << 20);
    rec["clock"] = serde_json::json!([[250.0, 1250.0], [1400.0, 2400.0]]);
    // Remaps whenever a layer is above 1.01: every step but for the cooldown.
    let eplb = |extra: serde_json::Value| {
        let mut e = serde_json::json!({
            "historyWindows": 1, "imbalanceThreshold": 1.01, "hysteresis": 0.0,
            "maxLayersPerRemap": 2, "replanIntervalSeconds": 0,
        });
        e.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        e
    };
    let run = |name: &str, extra: serde_json::Value| {
        let mut r = rec.clone();
        r["eplb"] = eplb(extra);
        let path = d.file(name, &r.to_string());
        let o = backtest(&path, &["--history", "1", "--stride", "1", "--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let report: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        let row_name = report["deployment"]["row"].as_str().unwrap().to_string();
        let row = report["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["algorithm"] == row_name.as_str())
            .unwrap()
            .clone();
        let per_step = |key: &str| -> Vec<u64> {
            row[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect()
        };
        (
            row_name,
            per_step("slots_moved"),
            per_step("layers_changed"),
            stderr(&o),
        )
    };
    let remaps =
        |layers: &[u64]| -> Vec<usize> { (0..layers.len()).filter(|&k| layers[k] > 0).collect() };
    let (label, moved, layers, _) = run("eager.json", serde_json::json!({}));
    assert_eq!(
        label,
        "joint, operator trigger (imbalanceThreshold 1.01, hysteresis 0.00, maxLayersPerRemap 2)"
    );
    let eager = remaps(&layers);
    assert_eq!(eager, (0..12).collect::<Vec<_>>(), "{layers:?}");
    assert!(moved.iter().any(|&m| m > 2), "{moved:?}");
    let (eager_moved, eager_layers) = (moved, layers);
    // replanIntervalSeconds 250: no remap within 250 s (2 windows) of the last.
    let (label, _, layers, notes) = run(
        "cooled.json",
        serde_json::json!({"replanIntervalSeconds": 250}),
    );
    assert!(label.ends_with("replanIntervalSeconds 250)"), "{label}");
    assert!(!notes.contains("is not replayed"), "{notes}");
    let cooled = remaps(&layers);
    assert_eq!(cooled, COOLED_STEPS, "eager remapped at {eager:?}");
    // maxBytesPerRemap 2Mi: two experts a remap at most (eager moved more).
    let (label, moved, _, _) = run("bytes.json", serde_json::json!({"maxBytesPerRemap": "2Mi"}));
    assert!(label.ends_with("maxBytesPerRemap 2 experts)"), "{label}");
    assert!(moved.iter().all(|&m| m <= 2), "{moved:?}");
    assert!(moved.iter().any(|&m| m > 0), "{moved:?}");
    // maxMovesPerLayer 1: one slot per changed layer (eager moved more).
    let (label, moved, layers, _) = run("moves.json", serde_json::json!({"maxMovesPerLayer": 1}));
    assert!(label.ends_with("maxMovesPerLayer 1)"), "{label}");
    assert!(
        moved.iter().zip(&layers).all(|(m, l)| m <= l),
        "{moved:?} {layers:?}"
    );
    assert!(moved.iter().any(|&m| m > 0), "{moved:?}");
    assert!(eager_moved.iter().zip(&eager_layers).any(|(m, l)| m > l));
    // The deployment's planner.
    let (label, moved, _, _) = run(
        "incremental.json",
        serde_json::json!({"algorithm": "incremental"}),
    );
    assert!(
        label.starts_with("incremental, operator trigger"),
        "{label}"
    );
    assert!(moved.iter().any(|&m| m > 0), "{moved:?}");
    // Every operator row keeps the deployment's budget and cooldown, and the settings a sweep
    // suggests carry them.
    let mut r = rec.clone();
    r["eplb"] = eplb(serde_json::json!({"maxBytesPerRemap": "2Mi", "replanIntervalSeconds": 250}));
    let path = d.file("sweep.json", &r.to_string());
    let o = backtest(&path, &["--history", "1,2", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let suggested = &report["operator"]["eplb"];
    assert_eq!(suggested["maxBytesPerRemap"], "2Mi", "{report}");
    assert_eq!(suggested["replanIntervalSeconds"], 250, "{report}");
    for row in report["histories"][0]["rows"].as_array().unwrap() {
        let name = row["algorithm"].as_str().unwrap();
        if name.contains("operator trigger") {
            assert!(
                name.ends_with("maxBytesPerRemap 2 experts, replanIntervalSeconds 250)"),
                "{name}"
            );
        }
    }
}

/// `moectl plan` of `load` on 4 ranks, 4 redundant slots and 2 nodes, written to `out` in
/// `format`.
fn plan_on_two_nodes(load: &str, format: &str, out: &str) {
    let o = moectl(&[
        "plan",
        "--load",
        load,
        "--ranks",
        "4",
        "--redundant",
        "4",
        "--nodes",
        "2",
        "--format",
        format,
        "--output",
        out,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// `backtest --previous` replays on the previous placement's nodes when `--nodes` is not
/// given, and refuses a `--nodes` that contradicts it.
#[test]
fn backtest_takes_the_nodes_of_previous() {
    let d = Dir::new("backtest-prev-nodes");
    let windows = trace(5);
    let load = d.file("trace.json", &json(&windows));
    let first = d.file("first.json", &json(&windows[0]));
    let two = d.path("two.json");
    plan_on_two_nodes(&first, "placement", &two);
    let md = d.path("report.md");
    let o = backtest(
        &load,
        &["--history", "2", "--previous", &two, "--markdown", &md],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let report = std::fs::read_to_string(&md).unwrap();
    assert!(report.contains("4 redundant slots, 2 nodes)"), "{report}");
    let o = backtest(
        &load,
        &["--history", "2", "--previous", &two, "--nodes", "1"],
    );
    assert_bad(&o, "--nodes 1 contradicts --previous");
}

/// A `--previous` in a format that does not state its nodes (vllm-ascend's map) leaves the
/// nodes to the recording, which does: the replay keeps the recorded 2 nodes.
#[test]
fn backtest_keeps_the_recorded_nodes_under_a_previous_that_does_not_say_them() {
    let d = Dir::new("backtest-prev-unstated-nodes");
    let first = d.file("first.json", &json(&trace(9)[0]));
    let doc = d.path("doc.json");
    plan_on_two_nodes(&first, "document", &doc);
    let ascend = d.path("ascend.json");
    plan_on_two_nodes(&first, "ascend-expert-map", &ascend);
    let mut rec = recording(9);
    rec["placement"] = serde_json::from_str(&std::fs::read_to_string(&doc).unwrap()).unwrap();
    let recorded = d.file("recorded.json", &rec.to_string());
    let md = d.path("report.md");
    let o = backtest(
        &recorded,
        &["--history", "2", "--previous", &ascend, "--markdown", &md],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let report = std::fs::read_to_string(&md).unwrap();
    assert!(report.contains("4 redundant slots, 2 nodes)"), "{report}");
}
