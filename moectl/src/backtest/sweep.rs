//! `moectl backtest --history 1,2,4,8`: the recorded trace replayed once per history length,
//! every replay scored on the same windows (`RollingInputs::recorded_alike`), then one table
//! of every policy at every H and what served this traffic best: overall, and among what the
//! operator runs, as the `spec.eplb` fields that run it.

use eplb::bench::rolling::{self, BOUND_ROW, RollingInputs, RollingRow, Trigger};
use eplb::bench::{BenchOptions, BenchShape};
use serde_json::json;

use super::{BacktestArgs, PROTOCOL, Trace, replay_error, replay_note};
use crate::inputs::count;
use crate::{Fail, print_out, write_out};

/// The most windows `spec.eplb.historyWindows` keeps (the CRD's maximum).
pub(super) const OPERATOR_MAX_HISTORY: usize = 17;

/// One replay's rows.
pub(super) struct Replay {
    pub(super) history: usize,
    pub(super) rows: Vec<RollingRow>,
}

/// A policy at one history length.
#[derive(Clone, Copy)]
pub(super) struct Pick<'a> {
    pub(super) history: usize,
    pub(super) row: &'a RollingRow,
}

pub(super) fn backtest_histories(
    a: &BacktestArgs,
    opts: &BenchOptions,
    bs: &BenchShape,
    trace: Trace,
    histories: &[usize],
    notes: &mut Vec<String>,
) -> Result<(), Fail> {
    let history = &trace.history;
    if a.export.is_some() || a.peers.is_some() {
        return Err(Fail(format!(
            "--export and --peers replay one history, not {} of them: give one --history value",
            histories.len()
        )));
    }
    let stride = a.stride.unwrap_or(1);
    let mut inputs =
        RollingInputs::recorded_alike(bs, history, histories, stride, a.steps, trace.prev)
            .map_err(|e| replay_error(a, e))?;
    if let Some(ends) = &trace.window_ends {
        inputs = inputs
            .into_iter()
            .map(|i| i.with_window_ends(ends.clone()))
            .collect::<Result<_, _>>()?;
    }
    let mut replays = Vec::with_capacity(inputs.len());
    for replay in &inputs {
        notes.push(replay_note(replay, history.num_windows()));
        let (rows, _) = rolling::run_on(bs, replay, opts, Vec::new())?;
        replays.push(Replay {
            history: replay.history,
            rows,
        });
    }
    let first = &inputs[0];
    let triggers = &opts.triggers;
    let table = table(&replays);
    // The recorded byte budget, which the operator rows replay (`options`).
    let bytes = trace
        .deployed
        .as_ref()
        .and_then(|d| d.eplb.max_bytes_per_remap.as_ref());
    let mut findings = findings(&replays, triggers, bs.num_layers, bytes);
    if let Some(d) = &trace.deployed {
        findings.push_str(&d.finding(&replays, triggers, history.num_windows(), stride));
    }
    if a.json {
        let report = json!({
            "steps": first.steps,
            "stride": first.stride,
            "first_scored_window": first.scored_at(0),
            "histories": replays.iter().map(|r| json!({
                "history": r.history,
                "rows": r.rows,
            })).collect::<Vec<_>>(),
            "best": best(&replays, |_| true).map(|p| pick_json(p, triggers, bs.num_layers, bytes)),
            "operator": best(&replays, |p| trigger_of(p.row, triggers).is_some())
                .map(|p| pick_json(p, triggers, bs.num_layers, bytes)),
            "deployment": trace.deployed.as_ref().map(|d| d.json(&replays)),
        });
        print_out(&format!("{}\n", serde_json::to_string_pretty(&report)?))?;
    } else {
        print_out(&format!("{table}\n{findings}"))?;
    }
    if let Some(path) = &a.markdown {
        let shape = &bs.shape;
        let mut doc = format!(
            "# EPLB backtest: {load} replayed with {} histories\n\n\
             `moectl backtest` on `{load}`: {} ({}, {}; {}, {} redundant \
             slots, {}), planning on {} windows, {} {} apart, every history scored on windows \
             {} to {} (from 0).\n\nProtocol: {PROTOCOL} {ALIGNED}\n\n\
             ## Next-window PAR by history\n\n{table}\n## Findings\n\n{findings}",
            histories.len(),
            count(history.num_windows(), "window"),
            count(shape.num_experts, "expert"),
            count(bs.num_layers, "layer"),
            count(shape.num_ranks, "rank"),
            shape.num_redundant,
            count(shape.num_nodes, "node"),
            list(histories),
            count(first.steps, "step"),
            count(first.stride, "window"),
            first.scored_at(0),
            first.scored_at(first.steps - 1),
            load = a.load.display(),
        );
        for r in &replays {
            doc.push_str(&format!(
                "\n## H = {}\n\n{}\n### Next-window PAR step by step\n\n{}\n### Findings\n\n{}",
                r.history,
                rolling::markdown_table(&r.rows),
                rolling::steps_table(&r.rows),
                rolling::summary(&r.rows, &[]),
            ));
        }
        write_out(Some(path), doc.as_bytes())?;
    }
    Ok(())
}

/// How the replays of several histories line up (after [`PROTOCOL`]).
const ALIGNED: &str = "With several histories every replay keeps the same steps: as many as the \
longest history leaves (at most --steps), the last scored on the newest window, so every H is \
scored on the same windows; a replay leaves out in front the oldest windows its stride cannot \
use. Without --previous each H starts from `joint`'s plan of the H windows before its first \
step.";

/// "1, 2, 4 and 8".
fn list(values: &[usize]) -> String {
    let text: Vec<String> = values.iter().map(|v| v.to_string()).collect();
    match text.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
        _ => text.concat(),
    }
}

/// The trigger a row of the operator's live loop replays (`joint` remapping when that trigger
/// fires), by its label; `None` for the other rows.
pub(super) fn trigger_of(row: &RollingRow, triggers: &[Trigger]) -> Option<Trigger> {
    triggers
        .iter()
        .copied()
        .find(|t| t.label() == row.algorithm)
}

/// The policy and history with the lowest mean next-window PAR among those `keep` admits
/// (never the lower bound); the shorter history on a tie.
pub(super) fn best<'a>(
    replays: &'a [Replay],
    keep: impl Fn(&Pick<'a>) -> bool,
) -> Option<Pick<'a>> {
    replays
        .iter()
        .flat_map(|r| {
            r.rows.iter().map(|row| Pick {
                history: r.history,
                row,
            })
        })
        .filter(|p| p.row.algorithm != BOUND_ROW && keep(p) && p.row.mean_next().is_finite())
        .min_by(|x, y| x.row.mean_next().total_cmp(&y.row.mean_next()))
}

/// The `spec.eplb` fields that make the operator run a trigger row with `history` windows;
/// `bytes`: the recorded `maxBytesPerRemap` (the trigger holds it in experts).
fn eplb_fields(
    trigger: &Trigger,
    history: usize,
    layers: usize,
    bytes: Option<&serde_json::Value>,
) -> serde_json::Value {
    let mut f = json!({
        "algorithm": trigger.algorithm,
        "historyWindows": history,
        "imbalanceThreshold": trigger.threshold,
        "hysteresis": trigger.hysteresis,
        "maxLayersPerRemap": trigger.max_layers.unwrap_or(layers).clamp(1, 1024),
    });
    if let Some(m) = trigger.max_moves {
        f["maxMovesPerLayer"] = json!(m);
    }
    if let Some(c) = trigger.cooldown_seconds {
        // A whole number of seconds in the CRD.
        f["replanIntervalSeconds"] = json!(c.round() as u64);
    }
    if let (Some(_), Some(q)) = (trigger.max_slots_per_remap, bytes) {
        f["maxBytesPerRemap"] = q.clone();
    }
    f
}

/// [`eplb_fields`] as the YAML of a MoEDeployment's `spec.eplb`, in the CRD's field order.
fn eplb_yaml(f: &serde_json::Value) -> String {
    let mut out = String::from("  ```yaml\n  spec:\n    eplb:\n");
    for key in [
        "algorithm",
        "historyWindows",
        "replanIntervalSeconds",
        "imbalanceThreshold",
        "hysteresis",
        "maxLayersPerRemap",
        "maxBytesPerRemap",
        "maxMovesPerLayer",
    ] {
        match &f[key] {
            serde_json::Value::Null => {}
            serde_json::Value::String(v) => out.push_str(&format!("      {key}: {v}\n")),
            v => out.push_str(&format!("      {key}: {v}\n")),
        }
    }
    out.push_str("  ```\n");
    out
}

fn pick_json(
    p: Pick<'_>,
    triggers: &[Trigger],
    layers: usize,
    bytes: Option<&serde_json::Value>,
) -> serde_json::Value {
    let mut v = json!({
        "policy": p.row.algorithm,
        "history": p.history,
        "next_par": p.row.mean_next(),
        "slots_moved_per_step": p.row.moved_share_per_step(),
    });
    // Settings the CRD takes only (it keeps at most 17 windows).
    if let Some(t) = trigger_of(p.row, triggers)
        && p.history <= OPERATOR_MAX_HISTORY
    {
        v["eplb"] = eplb_fields(&t, p.history, layers, bytes);
    }
    v
}

/// Every policy (rows) at every history (columns): next-window mean PAR and the share of
/// slots moved per step, the lowest PAR of each row in bold.
fn table(replays: &[Replay]) -> String {
    let mut out = String::from("| policy |");
    for r in replays {
        out.push_str(&format!(" H = {} |", r.history));
    }
    out.push_str("\n|---|");
    out.push_str(&"---|".repeat(replays.len()));
    out.push('\n');
    for (i, row) in replays[0].rows.iter().enumerate() {
        let cells: Vec<&RollingRow> = replays.iter().filter_map(|r| r.rows.get(i)).collect();
        let lowest = cells
            .iter()
            .map(|c| c.mean_next())
            .fold(f64::INFINITY, f64::min);
        out.push_str(&format!("| {} |", row.algorithm));
        for c in cells {
            let par = format!("{:.4}", c.mean_next());
            let par = if c.mean_next() == lowest && row.algorithm != BOUND_ROW && replays.len() > 1
            {
                format!("**{par}**")
            } else {
                par
            };
            if row.algorithm == BOUND_ROW {
                out.push_str(&format!(" {par} |"));
            } else {
                out.push_str(&format!(
                    " {par} ({:.1}%) |",
                    100.0 * c.moved_share_per_step()
                ));
            }
        }
        out.push('\n');
    }
    out.push_str(
        "\nNext-window mean PAR over the steps (in brackets: slots moved per step); bold: the \
         lowest of each row.\n",
    );
    out
}

/// The findings: the best policy and history, joint against multi-episode-lpt at each H, and
/// the operator's best settings as `spec.eplb`.
fn findings(
    replays: &[Replay],
    triggers: &[Trigger],
    layers: usize,
    bytes: Option<&serde_json::Value>,
) -> String {
    let mut out = String::new();
    let bound = replays[0]
        .rows
        .iter()
        .find(|r| r.algorithm == BOUND_ROW)
        .map(RollingRow::mean_next);
    if let Some(p) = best(replays, |_| true) {
        // Keeping the start plans nothing (its history only chose the start).
        let how = if p.row.moved_total() == 0 && p.row.plan_ms.is_empty() {
            p.row.algorithm.clone()
        } else {
            format!(
                "{} planning on {}",
                p.row.algorithm,
                count(p.history, "window")
            )
        };
        out.push_str(&format!(
            "- Lowest next-window PAR: {how}: {:.4}, {:.1}% of the slots moved per step{}.\n",
            p.row.mean_next(),
            100.0 * p.row.moved_share_per_step(),
            bound.map_or(String::new(), |b| format!(" (lower bound {b:.4})")),
        ));
    }
    let at = |r: &Replay, name: &str| {
        r.rows
            .iter()
            .find(|row| row.algorithm == name)
            .map(RollingRow::mean_next)
    };
    let against: Vec<String> = replays
        .iter()
        .filter_map(|r| {
            let (joint, lpt) = (at(r, "joint")?, at(r, "multi-episode-lpt")?);
            Some(format!(
                "{:+.2}% (H = {})",
                100.0 * (joint / lpt - 1.0),
                r.history
            ))
        })
        .collect();
    if !against.is_empty() {
        out.push_str(&format!(
            "- joint against multi-episode-lpt at the same history (negative: joint lower): {}.\n",
            against.join(", ")
        ));
    }
    if let Some(p) = best(replays, |p| trigger_of(p.row, triggers).is_some())
        && let Some(trigger) = trigger_of(p.row, triggers)
    {
        out.push_str(&format!(
            "- What the operator runs (its planner, remapping when its trigger fires; a recorded \
             window stands for one statistics window of spec.eplb.windowSteps steps): lowest \
             with {} and historyWindows {}: {:.4}, {:.1}% of the slots moved per step.",
            p.row.algorithm,
            p.history,
            p.row.mean_next(),
            100.0 * p.row.moved_share_per_step(),
        ));
        if p.history > OPERATOR_MAX_HISTORY {
            out.push_str(&format!(
                " The operator keeps at most {OPERATOR_MAX_HISTORY} windows: replay with \
                 --history values up to {OPERATOR_MAX_HISTORY} for settings it can run.\n"
            ));
        } else {
            let f = eplb_fields(&trigger, p.history, layers, bytes);
            out.push_str(&format!(
                " As the MoEDeployment's settings:\n\n{}",
                eplb_yaml(&f)
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, pars: &[f64]) -> RollingRow {
        RollingRow {
            algorithm: name.to_string(),
            shape: "recorded".into(),
            next_par: pars.to_vec(),
            expected_par: vec![f64::NAN; pars.len()],
            slots_moved: vec![2; pars.len()],
            layers_changed: vec![1; pars.len()],
            cross_node_moves: vec![0; pars.len()],
            cross_node_tokens: vec![0.0; pars.len()],
            plan_ms: Vec::new(),
            slots_total: 20,
            threads: 1,
        }
    }

    fn replays() -> Vec<Replay> {
        let defaults = rolling::replayed_triggers()[0].label();
        let tight = rolling::replayed_triggers()[2].label();
        let replay = |history, joint, lpt, trig, tight_par| Replay {
            history,
            rows: vec![
                row("joint", &[joint]),
                row("multi-episode-lpt", &[lpt]),
                row(&defaults, &[trig]),
                row(&tight, &[tight_par]),
                row(BOUND_ROW, &[1.0]),
            ],
        };
        vec![
            replay(1, 1.08, 1.06, 1.12, 1.10),
            replay(4, 1.05, 1.07, 1.11, 1.09),
            replay(20, 1.04, 1.08, 1.10, 1.07),
        ]
    }

    #[test]
    fn the_best_is_the_lowest_row_and_the_operator_best_a_trigger_row() {
        let r = replays();
        let b = best(&r, |_| true).unwrap();
        assert_eq!((b.row.algorithm.as_str(), b.history), ("joint", 20));
        let triggers = rolling::replayed_triggers();
        let o = best(&r, |p| trigger_of(p.row, &triggers).is_some()).unwrap();
        assert_eq!(o.history, 20);
        assert_eq!(trigger_of(o.row, &triggers).unwrap().threshold, 1.1);
        let text = findings(&r, &triggers, 8, None);
        assert!(
            text.contains("joint planning on 20 windows: 1.0400"),
            "{text}"
        );
        assert!(
            text.contains("+1.89% (H = 1), -1.87% (H = 4), -3.70% (H = 20)"),
            "{text}"
        );
        // 20 windows are more than the operator keeps: no settings offered.
        assert!(text.contains("at most 17 windows"), "{text}");
        assert!(!text.contains("```yaml"), "{text}");
        let four: Vec<Replay> = replays().into_iter().take(2).collect();
        let text = findings(&four, &triggers, 8, None);
        assert!(text.contains("historyWindows: 4\n"), "{text}");
        assert!(text.contains("imbalanceThreshold: 1.1\n"), "{text}");
        assert!(text.contains("maxLayersPerRemap: 8\n"), "{text}");
    }

    #[test]
    fn the_table_bolds_the_lowest_of_each_row_and_shows_the_bound_once_per_column() {
        let t = table(&replays());
        assert!(t.starts_with("| policy | H = 1 | H = 4 | H = 20 |\n|---|---|---|---|\n"));
        assert!(t.contains("| joint | 1.0800 (10.0%) | 1.0500 (10.0%) | **1.0400** (10.0%) |"));
        assert!(t.contains("| multi-episode-lpt | **1.0600** (10.0%) |"));
        assert!(t.contains(&format!("| {BOUND_ROW} | 1.0000 | 1.0000 | 1.0000 |")));
        assert_eq!(list(&[1, 2, 4]), "1, 2 and 4");
        assert_eq!(list(&[3]), "3");
    }
}
