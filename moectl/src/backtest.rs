//! `moectl backtest`: a recorded load history replayed through the rolling protocol of `moectl
//! bench --rolling` (`eplb::bench::rolling`). Every policy replans step by step, each from the
//! placement it deployed the step before, and is scored on the window that was recorded next:
//! which planner, budget or trigger would have served this traffic best, and at what cost in
//! moved slots. The benchmark's traces are synthetic; this answers the question on the
//! user's own.

use std::path::{Path, PathBuf};

use eplb::bench::rolling::{
    self, MAX_STEPS, OPERATOR_DEFAULTS, RollingInputs, RollingOutcome, RollingPeerInputs,
    RollingPeerPlan, RollingRow, Trigger,
};
use eplb::bench::{BenchOptions, BenchShape};
use eplb::{LoadHistory, Placement, Shape};

use crate::inputs::{self, LayoutArgs, count};
use crate::record::RecordedContext;
use crate::{Fail, print_out, write_out};

mod deployed;
mod sweep;

use deployed::Deployed;

/// The most windows summed into one (`--aggregate`): a recorder that counts every forward
/// pass holds a few thousand of them at most.
const MAX_AGGREGATE: usize = 1 << 20;

#[derive(clap::Args, Debug)]
pub struct BacktestArgs {
    /// The recorded load, oldest window first (2H + 1 windows at least, H + 1 with
    /// --previous): [W][L][E],
    /// {"windows": ...}, OpenEvolve's {"load_history": ...}, vLLM's per-slot [W][L][P] with
    /// --physical-load (SGLang's recorder files read as one window: their ring is not in time
    /// order).
    #[arg(long)]
    load: PathBuf,
    /// EP ranks (GPUs). Default: those of the placement a recording by `moectl record`
    /// carries.
    #[arg(long)]
    ranks: Option<usize>,
    /// Redundant expert slots per layer. Default: the recorded placement's.
    #[arg(long)]
    redundant: Option<usize>,
    /// Nodes the ranks are spread over (ranks divide evenly). Default: --previous's, else the
    /// recorded placement's, else 1.
    #[arg(long)]
    nodes: Option<usize>,
    /// Expert groups (1 = none).
    #[arg(long, default_value_t = 1)]
    groups: usize,
    /// The placement in use when the trace begins (any format moectl reads): step 0 plans
    /// from it on the first H windows. Default: the placement a recording by `moectl record`
    /// carries, where its layout is the replay's; otherwise joint's plan of the first H
    /// windows is the start and step 0 plans on the next H.
    #[arg(long)]
    previous: Option<PathBuf>,
    /// The load counts tokens per physical slot (vLLM's expert_load_window [W][L][P]): mapped
    /// to experts through --previous (the placement must have served the whole trace).
    #[arg(long)]
    physical_load: bool,
    /// Routed experts E, with --physical-load (see `moectl plan --help`).
    #[arg(long)]
    experts: Option<usize>,
    #[command(flatten)]
    layout: LayoutArgs,
    /// Windows each step plans on (H). Several, comma-separated (1,2,4,8): one replay each,
    /// all scored on the same windows, and a table of every policy at every H with the best
    /// settings, the operator's `spec.eplb` among them.
    #[arg(
        long,
        value_name = "H[,H...]",
        value_delimiter = ',',
        default_value = "8"
    )]
    history: Vec<usize>,
    /// Windows between consecutive steps (default: --history, so each step plans only on the
    /// windows recorded since the step before, as the engines count; 1 with several
    /// --history values, as the operator replans each window; 1 slides one window).
    #[arg(long, value_name = "T")]
    stride: Option<usize>,
    /// Sum every A consecutive recorded windows into one before replaying (for recorders that
    /// count each forward pass, as vLLM's expert_load_window does); the oldest windows that do
    /// not fill a group are left out.
    #[arg(long, value_name = "A", default_value_t = 1)]
    aggregate: usize,
    /// Also replay the operator behind these imbalance thresholds (`spec.eplb.imbalanceThreshold`,
    /// hysteresis 0.05, every layer), one row each, beside its defaults and 1.1.
    #[arg(long, value_name = "T[,T...]", value_delimiter = ',')]
    threshold: Vec<f64>,
    /// Replay at most K steps, the latest ones.
    #[arg(long, value_name = "K", default_value_t = MAX_STEPS)]
    steps: usize,
    /// Also write the report as markdown to this file (with the PAR of every step).
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Print every row as JSON (one object: the steps and each row's per-step PAR, slots
    /// moved, layers changed and planning time) instead of the table.
    #[arg(long)]
    json: bool,
    /// Write the replay's inputs for the peers' code to DIR/recorded/rolling.json and stop:
    /// step one of `scripts/bench-peers --backtest`.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["peers", "markdown"])]
    export: Option<PathBuf>,
    /// Also score the peers' runs in DIR/recorded/rolling/*.json (eplb/peers/run_peers.py on an
    /// --export of the same load and flags).
    #[arg(long, value_name = "DIR")]
    peers: Option<PathBuf>,
}

/// The folder of an export that holds the replay (the peers' driver reads `*/rolling.json`).
const EXPORT_FOLDER: &str = "recorded";

pub fn backtest(a: &BacktestArgs, notes: &mut Vec<String>) -> Result<(), Fail> {
    if a.aggregate == 0 || a.aggregate > MAX_AGGREGATE {
        return Err(Fail(format!(
            "--aggregate {}: give between 1 and {MAX_AGGREGATE} windows to sum into one",
            a.aggregate
        )));
    }
    check_counts(a)?;
    let recorded = crate::record::context_of(&a.load).map_err(Fail)?;
    if let Some(out) = &a.markdown {
        crate::outfile::check_output(
            out,
            "--markdown",
            &[
                Some(a.load.as_path()),
                a.previous.as_deref(),
                a.layout.model.as_deref(),
            ],
        )?;
    }
    if let Some(dir) = &a.export {
        crate::outfile::check_output_dir(dir, "--export")?;
    }
    let mut trace = read_trace(a, &recorded, notes)?;
    trace.deployed = recorded.deployment.clone().map(|(name, eplb)| Deployed {
        name,
        eplb,
        expert_bytes: recorded.expert_bytes,
        // The windows replayed are dated (not only the recording).
        clocked: trace.window_ends.is_some(),
    });
    let opts = options(a, trace.deployed.as_ref())?;
    if let Some(d) = &trace.deployed {
        notes.extend(d.notes(&opts.triggers));
    }
    let (history, layout) = (&trace.history, &trace.layout);
    let mut histories = a.history.clone();
    histories.sort_unstable();
    histories.dedup();
    let shape = Shape::new(
        history.num_experts(),
        layout.redundant,
        layout.ranks,
        layout.nodes,
        a.groups,
    )?;
    if let (Some(p), Some(file)) = (&trace.prev, &a.previous) {
        inputs::check_previous_fits(p, file, &shape)?;
    }
    let bs = BenchShape {
        name: "recorded",
        num_layers: history.num_layers(),
        shape,
    };
    let &[h] = histories.as_slice() else {
        return sweep::backtest_histories(a, &opts, &bs, trace, &histories, notes);
    };
    let stride = stride_of(a, h)?;
    let inputs = RollingInputs::recorded(&bs, history, h, stride, a.steps, trace.prev.clone())
        .map_err(|e| replay_error(a, e))?;
    let inputs = match trace.window_ends.clone() {
        Some(ends) => inputs.with_window_ends(ends)?,
        None => inputs,
    };
    notes.push(replay_note(&inputs, history.num_windows()));
    let peer_inputs = RollingPeerInputs::new(&bs, &inputs);
    if let Some(dir) = &a.export {
        return export(dir, &peer_inputs);
    }
    let plans = match &a.peers {
        Some(dir) => peer_runs(dir, &peer_inputs, notes)?,
        None => Vec::new(),
    };
    let (rows, outcomes) = rolling::run_on(&bs, &inputs, &opts, plans)?;
    let outcomes: Vec<_> = outcomes
        .into_iter()
        .map(|o| (bs.name.to_string(), o))
        .collect();
    // The deployment's own settings against the lowest operator row, as in a sweep: the rows
    // as that replay's.
    let one = [sweep::Replay { history: h, rows }];
    let rows = &one[0].rows;
    let deployed = trace.deployed.as_ref().map_or_else(String::new, |d| {
        d.finding(&one, &opts.triggers, history.num_windows(), stride)
    });
    if a.json {
        let report = serde_json::json!({
            "steps": inputs.steps,
            "stride": inputs.stride,
            "history": inputs.history,
            "first_scored_window": inputs.scored_at(0),
            "rows": rows,
            "deployment": trace.deployed.as_ref().map(|d| d.json(&one)),
        });
        print_out(&format!("{}\n", serde_json::to_string_pretty(&report)?))?;
    } else {
        print_out(&rolling::markdown_table(rows))?;
        print_out(&rolling::summary(rows, &outcomes))?;
        print_out(&deployed)?;
    }
    if let Some(path) = &a.markdown {
        let mut doc = markdown(a, &bs, history.num_windows(), &inputs, rows, &outcomes);
        doc.push_str(&deployed);
        write_out(Some(path), doc.as_bytes())?;
    }
    Ok(())
}

/// Refuses a count flag of 0 by name, before the trace is read.
fn check_counts(a: &BacktestArgs) -> Result<(), Fail> {
    for (flag, value, what) in [
        ("--ranks", a.ranks, "EP rank"),
        ("--nodes", a.nodes, "node"),
        ("--groups", Some(a.groups), "expert group (1 = none)"),
    ] {
        if let Some(v) = value {
            inputs::at_least_one(flag, v, what)?;
        }
    }
    Ok(())
}

/// The windows between steps of a single-history replay: --stride, else the history. A
/// defaulted stride out of range is --history's to fix (no --stride was given).
fn stride_of(a: &BacktestArgs, history: usize) -> Result<usize, Fail> {
    match a.stride {
        Some(t) => Ok(t),
        None if history > rolling::MAX_STRIDE => Err(Fail(format!(
            "--history {history}: give between 1 and {} windows (the stride between steps defaults to it; --stride sets it apart)",
            rolling::MAX_STRIDE
        ))),
        None => Ok(history),
    }
}

/// The replay's options: the default rows, a trigger row per `--threshold`, and one for the
/// recorded deployment's settings. On a deployment's recording every operator row keeps its
/// `maxMovesPerLayer`, `maxBytesPerRemap` and cooldown, so that the rows differ from its own
/// only in what they name (and their suggestions keep the rest); they plan with joint.
fn options(a: &BacktestArgs, deployed: Option<&Deployed>) -> Result<BenchOptions, Fail> {
    let mut opts = BenchOptions::default();
    let mine = deployed.and_then(Deployed::trigger);
    let keep_limits = |t: Trigger| deployed.map_or(t, |d| d.with_limits(t));
    opts.triggers = opts.triggers.into_iter().map(keep_limits).collect();
    if let Some(t) = mine
        && !opts.triggers.iter().any(|x| x.label() == t.label())
    {
        opts.triggers.push(t);
    }
    for &threshold in &a.threshold {
        let trigger = keep_limits(Trigger {
            threshold,
            max_layers: None,
            ..OPERATOR_DEFAULTS
        });
        // The CRD's rules (`spec.eplb`): a threshold above 1 that the hysteresis keeps at or
        // above 1.
        if !(threshold.is_finite() && threshold - trigger.hysteresis >= 1.0 && threshold <= 1000.0)
        {
            return Err(Fail(format!(
                "--threshold {threshold}: the operator takes imbalanceThreshold - hysteresis \
                 ({}) at least 1.0 and at most 1000: give e.g. 1.05 or above",
                trigger.hysteresis
            )));
        }
        // The rows are labelled to two decimals: a finer threshold would share a label.
        if (threshold * 100.0).round() / 100.0 != threshold {
            return Err(Fail(format!(
                "--threshold {threshold}: give at most two decimals (e.g. 1.05, 1.15)"
            )));
        }
        if !opts.triggers.iter().any(|t| t.label() == trigger.label()) {
            opts.triggers.push(trigger);
        }
    }
    Ok(opts)
}

/// A replay the windows cannot make, with the hint that `--previous` shortens what it needs.
fn replay_error(a: &BacktestArgs, e: eplb::EplbError) -> Fail {
    match e {
        eplb::EplbError::Request(m) if a.previous.is_none() && m.contains("needs at least") => {
            Fail(format!("{m} (--previous gives the placement in use)"))
        }
        other => Fail(other.to_string()),
    }
}

/// Which windows a replay plans on and is scored on (a note on stderr).
fn replay_note(inputs: &RollingInputs, windows: usize) -> String {
    format!(
        "replaying {} {} apart, each planning on {}: scored on windows {} to {} of {} (from 0)",
        count(inputs.steps, "step"),
        count(inputs.stride, "window"),
        count(inputs.history, "window"),
        inputs.scored_at(0),
        inputs.scored_at(inputs.steps - 1),
        windows
    )
}

/// The report for `--markdown`: what was replayed, the protocol, the table, every step's PAR
/// and the findings.
fn markdown(
    a: &BacktestArgs,
    bs: &BenchShape,
    windows: usize,
    inputs: &RollingInputs,
    rows: &[RollingRow],
    outcomes: &[(String, RollingOutcome)],
) -> String {
    let shape = &bs.shape;
    let peers = if a.peers.is_some() {
        format!(
            "{}\n\n{}\n",
            crate::bench::rolling::PEERS_PROTOCOL
                .replace("bench-peers --rolling", "bench-peers --backtest"),
            crate::bench::rolling::peer_notes(outcomes)
        )
    } else {
        String::new()
    };
    format!(
        "# EPLB backtest: {load} replayed\n\n\
         `moectl backtest` on `{load}`: {} ({}, {}; {}, {} redundant slots, \
         {}), {} {} apart, each planning on {}.\n\n\
         Protocol: {PROTOCOL}\n\n{peers}{}\n## Next-window PAR step by step\n\n{}\n\
         ## Findings (computed from the table)\n\n{}",
        count(windows, "window"),
        count(shape.num_experts, "expert"),
        count(bs.num_layers, "layer"),
        count(shape.num_ranks, "rank"),
        shape.num_redundant,
        count(shape.num_nodes, "node"),
        count(inputs.steps, "step"),
        count(inputs.stride, "window"),
        count(inputs.history, "window"),
        rolling::markdown_table(rows),
        rolling::steps_table(rows),
        rolling::summary(rows, outcomes),
        load = a.load.display(),
    )
}

/// What a backtest replays: the windows, the start, the layout and the recorded settings.
struct Trace {
    history: LoadHistory,
    prev: Option<Placement>,
    layout: EpLayout,
    deployed: Option<Deployed>,
    /// When each (summed) window closed, from a recording's clock.
    window_ends: Option<Vec<f64>>,
}

/// The ranks, redundant slots and nodes replayed.
struct EpLayout {
    ranks: usize,
    redundant: usize,
    nodes: usize,
}

/// The recorded windows (per expert, summed `--aggregate` at a time), the placement in use
/// (`--previous`, else a recording's) and the layout (each of the flags, else the recorded
/// placement's; nodes only with the recording's ranks).
fn read_trace(
    a: &BacktestArgs,
    recorded: &RecordedContext,
    notes: &mut Vec<String>,
) -> Result<Trace, Fail> {
    let start = recorded.placement.as_ref();
    let ranks = a.ranks.or(start.map(|p| p.num_ranks)).ok_or_else(|| {
        Fail(format!(
            "--ranks: give the EP ranks ({})",
            if recorded.is_recording {
                format!(
                    "{} holds no placement: it was recorded by a moectl before `record` kept \
                     the group's",
                    a.load.display()
                )
            } else {
                "only a recording by `moectl record` says them".to_string()
            }
        ))
    })?;
    let (load, previous_read) = inputs::read_load_and_previous(
        &a.load,
        &a.layout,
        a.physical_load,
        a.experts,
        a.previous.as_deref(),
        ranks,
        a.nodes,
        notes,
    )?;
    let mut prev = previous_read.as_ref().map(|p| p.placement.clone());
    let experts = load.history.num_experts();
    let recorded_redundant = start.and_then(|p| p.num_slots().checked_sub(experts));
    let layout = EpLayout {
        ranks,
        redundant: a
            .redundant
            .or(recorded_redundant)
            .ok_or_else(|| Fail("--redundant: give the redundant expert slots per layer".into()))?,
        // --previous's nodes where its file states them; a format that does not (vLLM's,
        // SGLang's, vllm-ascend's) leaves them to the recording. The recorded nodes divide the
        // recorded ranks, not necessarily others.
        nodes: a
            .nodes
            .or(previous_read.as_ref().and_then(|p| p.stated_nodes))
            .or(start.filter(|p| p.num_ranks == ranks).map(|p| p.num_nodes))
            .unwrap_or(1),
    };
    // A --previous whose format does not state its nodes was read for 1 node (or --nodes):
    // it runs on the nodes replayed.
    if let (Some(p), Some(read)) = (prev.as_mut(), &previous_read)
        && read.stated_nodes.is_none()
    {
        p.num_nodes = layout.nodes;
    }
    if let Some(doc) = start
        && a.previous.is_none()
    {
        if doc.num_ranks == layout.ranks
            && doc.num_nodes == layout.nodes
            && Some(layout.redundant) == recorded_redundant
            && doc.num_logical_experts == experts
            && doc.num_layers == load.history.num_layers()
        {
            prev = Some(inputs::read_recorded_placement(
                &a.load, doc, &load, ranks, notes,
            )?);
            notes.push(format!(
                "every replay starts from the placement the group served when the recording \
                 began (generation {}, in {}; --previous gives another)",
                doc.generation,
                a.load.display()
            ));
        } else {
            notes.push(format!(
                "the recording's placement ({}, {}, {} slots) is not this replay's layout: each \
                 replay starts from joint's plan of its first windows",
                count(doc.num_ranks, "rank"),
                count(doc.num_nodes, "node"),
                doc.num_slots()
            ));
        }
    }
    let gaps = &recorded.gaps;
    if !gaps.is_empty() {
        let ranges: Vec<String> = gaps.iter().map(|[x, y]| format!("{x}-{y}")).collect();
        notes.push(format!(
            "the recording lost the windows of steps {}: the windows on either side are \
             replayed as consecutive",
            ranges.join(", ")
        ));
    }
    let recorded_windows = load.history.num_windows();
    if let Some(ends) = &recorded.window_ends
        && ends.len() != recorded_windows
    {
        notes.push(format!(
            "the recording dates {} and holds {}: its windows are replayed undated (no \
             replanIntervalSeconds)",
            count(ends.len(), "window"),
            count(recorded_windows, "window")
        ));
    }
    // A summed window closes with the last of its windows.
    let window_ends = recorded
        .window_ends
        .as_ref()
        .filter(|ends| ends.len() == recorded_windows)
        .map(|ends| {
            aggregate_groups(ends, a.aggregate)
                .filter_map(|c| c.last().copied())
                .collect()
        });
    let history = aggregate(load.history, a.aggregate)?;
    if a.aggregate > 1 {
        notes.push(format!(
            "{} recorded, summed {} at a time: {}{}",
            count(recorded_windows, "window"),
            a.aggregate,
            count(history.num_windows(), "window"),
            match recorded_windows % a.aggregate {
                0 => String::new(),
                left => format!(" (the oldest {} left out)", count(left, "window")),
            }
        ));
    }
    Ok(Trace {
        history,
        prev,
        layout,
        deployed: None,
        window_ends,
    })
}

/// Writes the peers' inputs to `dir/recorded/rolling.json`, where `eplb/peers/run_peers.py`
/// finds a rolling export.
fn export(dir: &Path, peer_inputs: &RollingPeerInputs) -> Result<(), Fail> {
    let folder = dir.join(EXPORT_FOLDER);
    std::fs::create_dir_all(&folder)
        .map_err(|e| Fail(format!("cannot create {}: {e}", folder.display())))?;
    let path = folder.join("rolling.json");
    write_out(Some(&path), &serde_json::to_vec(peer_inputs)?)?;
    print_out(&format!(
        "wrote the replay's inputs to {} ({}); the peers' runs go to {}\n",
        path.display(),
        count(peer_inputs.steps, "step"),
        folder.join("rolling").display()
    ))
}

/// The peers' runs of an export made by `--export` from the same inputs: refused when the
/// export's inputs differ from this run's (its peers planned on other windows).
fn peer_runs(
    dir: &Path,
    expected: &RollingPeerInputs,
    notes: &mut Vec<String>,
) -> Result<Vec<RollingPeerPlan>, Fail> {
    let path = dir.join(EXPORT_FOLDER).join("rolling.json");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        Fail(format!(
            "cannot read {}: {e} (make the folder with moectl backtest --export)",
            path.display()
        ))
    })?;
    let exported: RollingPeerInputs =
        serde_json::from_str(&text).map_err(|e| Fail(format!("{}: {e}", path.display())))?;
    if &exported != expected {
        return Err(Fail(format!(
            "{} holds other inputs than this run's (another load, shape, --previous, --history, \
             --stride, --aggregate or --steps): the peers planned on other windows; run with the \
             export's flags or export again",
            path.display()
        )));
    }
    crate::bench::read_plans_in(
        &dir.join(EXPORT_FOLDER).join("rolling"),
        EXPORT_FOLDER,
        "rolling run",
        notes,
    )
}

/// The groups of `by` consecutive windows `--aggregate` sums into one (the same for the windows
/// and their close times): the oldest that do not fill a group are left out.
fn aggregate_groups<T>(items: &[T], by: usize) -> std::slice::Chunks<'_, T> {
    items[items.len() % by..].chunks(by)
}

/// Sums every `by` consecutive windows into one, the newest group last; the oldest
/// `len % by` windows, which fill no group, are left out.
fn aggregate(history: LoadHistory, by: usize) -> Result<LoadHistory, Fail> {
    if by == 1 {
        return Ok(history);
    }
    let windows = history.windows();
    if windows.len() < by {
        return Err(Fail(format!(
            "--aggregate {by}: the load has only {}",
            count(windows.len(), "window")
        )));
    }
    let summed = aggregate_groups(windows, by)
        .map(|group| {
            let mut sum = group[0].clone();
            for w in &group[1..] {
                for (row, add) in sum.iter_mut().zip(w) {
                    for (x, y) in row.iter_mut().zip(add) {
                        *x += y;
                    }
                }
            }
            sum
        })
        .collect();
    Ok(LoadHistory::new(summed)?)
}

const PROTOCOL: &str = "the recorded windows, oldest first. With --previous the placement in \
use at step 0 is that placement and step k plans on windows kT .. kT+H-1; without it the start \
is `joint`'s plan of the first H windows and step k plans on windows H+kT .. 2H+kT-1 (H = \
--history, T = --stride; with --steps the latest steps are kept and the start moves with them). \
Every policy plans with the placement it deployed at step k-1 and is scored on the window \
recorded after its H windows (mean PAR over layers). Loads recorded by the engines count \
tokens per logical expert, whatever the placement that served them, so every policy is scored \
on the same counts. There is no expected PAR: a recorded trace has no law to draw other \
windows from. The rows are those of `moectl bench --rolling` (its report explains each): keep \
the starting placement, greedy, multi-episode-lpt, flashlb-like, joint, joint with a minimum \
improvement of 0, joint with at most 1/16 and 1/8 of the slots moved per layer, joint replanning \
only what the operator's trigger picks (its defaults; every layer above the threshold; a \
threshold of 1.1; one row per --threshold, every layer), deploying what the operator accepts of \
each plan, and each next window's lower bound. On a recording of a MoEDeployment one more \
operator row runs its own settings (its planner too), and every operator row keeps its \
maxMovesPerLayer, maxBytesPerRemap (in whole experts of the recorded size: the longest \
run of accepted layers that fits, those past the hysteresis first) and, where the recording \
dates its windows, its replanIntervalSeconds (a step decides when the last window it plans on closes, and holds \
sooner than that after the last remap began); their labels say so. A remap takes effect at \
once; manual remaps are not replayed.";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregation_sums_groups_and_leaves_out_the_oldest_remainder() {
        let w = |v: f64| vec![vec![v, 2.0 * v]];
        let h = LoadHistory::new((1..=5).map(|v| w(v as f64)).collect()).unwrap();
        let two = aggregate(h.clone(), 2).map_err(|f| f.0).unwrap();
        // Windows 2+3 and 4+5; window 1 fills no group.
        assert_eq!(two.windows(), &[w(5.0), w(9.0)]);
        let one = aggregate(h.clone(), 1).map_err(|f| f.0).unwrap();
        assert_eq!(one.windows(), h.windows());
        assert!(aggregate(h, 6).is_err());
    }
}
