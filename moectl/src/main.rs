//! `moectl`: plan, evaluate and benchmark expert placements offline.
//!
//! Bad input ends with one line `error: ...` on stderr and exit code 2; nothing is written.
//! The `note: ...` lines the readers gathered before the failure come first.
//! Argument errors are clap's whole message (with the usage line), also with exit code 2.

mod backtest;
mod bench;
mod convert;
mod eval;
mod inputs;
mod model;
mod outfile;
mod outputs;
mod plan_output;
mod record;
mod svg;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use eplb::{PlanRequest, Shape, planner_by_name};

use crate::convert::{ConvertArgs, ConvertTo};
use crate::eval::EvalArgs;
use crate::inputs::LayoutArgs;
use crate::outputs::Format;

#[derive(Parser, Debug)]
#[command(
    name = "moectl",
    version,
    about = "Plan, evaluate and benchmark MoE expert placements"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum ModelCommand {
    /// Family, MoE decoder layers, experts, gating, shared experts, weight dtype and bytes per
    /// expert of a checkpoint, and the `spec.model` stanza of a MoEDeployment for it.
    Inspect {
        /// Checkpoint directory (with config.json) or a config.json file.
        path: PathBuf,
        /// `text` (default) or `json`.
        #[arg(long, value_enum, default_value_t = model::InspectOutput::Text)]
        output: model::InspectOutput,
    },
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Read a checkpoint's config.json: `moectl model inspect DIR_OR_CONFIG`.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Plan a placement from a load file.
    Plan {
        /// Load file: [L][E], [W][L][E], {"windows": ...}, OpenEvolve's {"load_history": ...},
        /// SGLang's {"logical_count": ...} or its recorder dump (.pt), or vLLM's per-slot counts
        /// with --physical-load.
        #[arg(long)]
        load: PathBuf,
        /// EP ranks (GPUs).
        #[arg(long)]
        ranks: usize,
        /// Redundant expert slots per layer.
        #[arg(long)]
        redundant: usize,
        /// Nodes the ranks are spread over (ranks divide evenly): joint keeps tokens on their
        /// node within --node-slack. Default: --previous's, else 1.
        #[arg(long)]
        nodes: Option<usize>,
        /// Expert groups (1 = none).
        #[arg(long, default_value_t = 1)]
        groups: usize,
        /// greedy, joint or incremental (or a benchmark baseline: greedy-global, flashlb-like,
        /// multi-episode-lpt).
        #[arg(long, default_value = eplb::DEFAULT_ALGORITHM)]
        algorithm: String,
        /// The placement in use (any format moectl reads).
        #[arg(long)]
        previous: Option<PathBuf>,
        /// The load counts tokens per physical slot (vLLM's expert_load_window [W][L][P],
        /// vllm-ascend's moe_load): mapped to experts through --previous.
        #[arg(long)]
        physical_load: bool,
        /// Routed experts E, with --physical-load: a vllm-ascend --previous lists
        /// mix_placement shared experts after the routed ones (without E its largest id is
        /// read as routed). With a per-expert load E is its column count.
        #[arg(long)]
        experts: Option<usize>,
        #[command(flatten)]
        layout: LayoutArgs,
        /// At most this many slots change per layer (needs --previous).
        #[arg(long)]
        max_moves: Option<usize>,
        /// Only re-plan layers whose current PAR exceeds this (needs --previous).
        #[arg(long, allow_negative_numbers = true)]
        threshold: Option<f64>,
        /// joint with --nodes above 1: objective (PAR) fraction it may give up to keep tokens
        /// on their node (default 0.0025).
        #[arg(long, allow_negative_numbers = true)]
        node_slack: Option<f64>,
        /// Output: placement (moectl JSON), ascend-expert-map, sglang (--init-expert-location
        /// file, one row per decoder layer) or document.
        #[arg(long, value_enum, default_value_t = Format::Placement)]
        format: Format,
        /// Output file (default: standard output).
        #[arg(long)]
        output: Option<PathBuf>,
        /// Print to stderr how long reading the inputs, planning, formatting and writing took.
        #[arg(long)]
        timings: bool,
    },
    /// Replay a recorded load history: every planner, budget and trigger replans step by step
    /// from the placement it deployed before and is scored on the window recorded next.
    Backtest(backtest::BacktestArgs),
    /// Record the load a running worker group routes, window by window, into a file that
    /// backtest, plan and eval read (polls every rank's `/v1/load`).
    Record(record::RecordArgs),
    /// Per-layer PAR and balancedness of a placement under a load.
    Eval {
        /// The placement (any format moectl reads).
        #[arg(long)]
        placement: PathBuf,
        /// The load (any format `plan` reads).
        #[arg(long)]
        load: PathBuf,
        /// The placement before: migration cost, its PAR, and the "before" heatmap panel.
        #[arg(long)]
        previous: Option<PathBuf>,
        /// Bytes of one expert's weights, for the migration cost (default: --model's as stored,
        /// FP8 scales included; without --model DeepSeek-V3's in bf16, 88,080,384).
        #[arg(long)]
        expert_bytes: Option<u64>,
        /// Print the report as one JSON object instead of the table.
        #[arg(long)]
        json: bool,
        /// EP ranks, for placements that do not say (SGLang's); an error where it contradicts
        /// the placement.
        #[arg(long)]
        ranks: Option<usize>,
        /// Also write a heatmap of rank loads per layer (before and after with --previous).
        #[arg(long)]
        svg: Option<PathBuf>,
        /// The load counts tokens per physical slot (vLLM, vllm-ascend): mapped to experts
        /// through --previous, or --placement without it.
        #[arg(long)]
        physical_load: bool,
        /// Nodes, for placements that do not say (SGLang's and vllm-ascend's maps; an error
        /// where it contradicts moectl's JSON or a placement document): with more than one,
        /// cross-node token share and weight moves are reported.
        #[arg(long)]
        nodes: Option<usize>,
        /// Routed experts E, with --physical-load: vllm-ascend maps list mix_placement shared
        /// experts after the routed ones (without E the largest id is read as routed). With a
        /// per-expert load E is its column count; an error where it contradicts the placement.
        #[arg(long)]
        experts: Option<usize>,
        #[command(flatten)]
        layout: LayoutArgs,
    },
    /// Convert a placement or a load between formats.
    Convert {
        /// A placement or a load in any format moectl reads.
        #[arg(long)]
        input: PathBuf,
        /// The format to write.
        #[arg(long, value_enum)]
        to: ConvertTo,
        /// Output file (default: standard output).
        #[arg(long)]
        output: Option<PathBuf>,
        /// EP ranks, for placements that do not say (SGLang's); an error where it contradicts
        /// the placement.
        #[arg(long)]
        ranks: Option<usize>,
        /// Routed experts E (vllm-ascend maps: ids from E up are mix_placement shared experts;
        /// SGLang's maps); an error where it contradicts the placement.
        #[arg(long)]
        experts: Option<usize>,
        /// Nodes, for placements that do not say (SGLang's and vllm-ascend's maps); an error
        /// where it contradicts the placement.
        #[arg(long)]
        nodes: Option<usize>,
        /// The load counts tokens per physical slot (vLLM, vllm-ascend; a vllm-ascend map's
        /// shared-expert slots are left out): mapped to experts through --placement.
        #[arg(long)]
        physical_load: bool,
        /// The placement whose slots a per-slot load counts (with --physical-load).
        #[arg(long)]
        placement: Option<PathBuf>,
        #[command(flatten)]
        layout: LayoutArgs,
    },
    /// Run the benchmark protocol on the standard shapes and print the table.
    Bench {
        /// Also write the table as markdown to this file.
        #[arg(long)]
        markdown: Option<PathBuf>,
        /// Only shapes whose name contains this (case-insensitive).
        #[arg(long)]
        shape: Option<String>,
        /// Windows of history H each algorithm plans on (the trace has 2H+1 windows).
        #[arg(long, default_value_t = 8)]
        history: usize,
        /// Runs per algorithm and shape; the fastest and median time are reported.
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        /// Seed of the synthetic traces.
        #[arg(long, default_value_t = 2026)]
        seed: u64,
        /// Drift of the synthetic traces: the standard deviation of each expert's
        /// log-popularity step per window (0.12: about 12% a window; 0 keeps the popularity
        /// still, leaving only the counting noise).
        #[arg(long, value_name = "SIGMA", default_value_t = eplb::bench::DEFAULT_DRIFT)]
        drift: f64,
        /// Write each shape's inputs (history and placement in use) for the peers' policies
        /// to DIR/<shape>/inputs.json and stop: step one of scripts/bench-peers.
        #[arg(long, value_name = "DIR", conflicts_with_all = ["peers", "markdown"])]
        export: Option<PathBuf>,
        /// Also score the peers' plans in DIR/<shape>/peers/*.json (written by
        /// eplb/peers/run_peers.py on an --export of the same --seed and --history; with
        /// --rolling, their rolling runs in DIR/<shape>/rolling/*.json).
        #[arg(long, value_name = "DIR")]
        peers: Option<PathBuf>,
        /// The rolling protocol instead: every policy replans K times in a row on a drifting
        /// trace, each time from the placement it deployed the step before (see --stride);
        /// reports PAR and slots moved over the run. With --export, writes the peers' rolling
        /// inputs (DIR/<shape>/rolling.json).
        #[arg(long, value_name = "K")]
        rolling: Option<usize>,
        /// With --rolling: windows between consecutive steps (default: --history, so each
        /// step plans only on the windows recorded since the step before, as the engines
        /// count; 1 slides the history one window a step).
        #[arg(long, value_name = "T", requires = "rolling")]
        stride: Option<usize>,
    },
}

/// A user error: printed as one line, exit code 2.
pub(crate) struct Fail(pub(crate) String);

impl<E: std::fmt::Display> From<E> for Fail {
    fn from(e: E) -> Self {
        Fail(e.to_string())
    }
}

/// Writes `text` to the file `output` (replaced atomically when it is a regular file, written
/// in place when it is a device or a FIFO: see [`outfile`]) or to standard output.
pub(crate) fn write_out(output: Option<&Path>, text: &[u8]) -> Result<(), Fail> {
    write_out_with(output, |w| w.write_all(text))
}

/// [`write_out`] for output that `write` produces piece by piece into the file (or standard
/// output, followed by a newline there).
pub(crate) fn write_out_with(
    output: Option<&Path>,
    write: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
) -> Result<(), Fail> {
    match output {
        Some(p) => outfile::write_file(p, write)
            .map_err(|e| Fail(format!("cannot write {}: {e}", p.display()))),
        None => print_with(|out| {
            write(out)?;
            out.write_all(b"\n")
        }),
    }
}

/// Writes `text` to standard output (see [`print_with`] for a reader that has gone).
pub(crate) fn print_out(text: &str) -> Result<(), Fail> {
    print_with(|out| out.write_all(text.as_bytes()))
}

/// What `write` writes, to standard output, flushed. When the reader has gone (`moectl eval
/// ... | head`) the command ends quietly, as Unix tools do, instead of with `println!`'s panic.
fn print_with(
    write: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
) -> Result<(), Fail> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match write(&mut out).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => Err(Fail(format!("cannot write to standard output: {e}"))),
    }
}

/// One line to stderr in one write. Standard error is unbuffered: `eprintln!` with arguments
/// writes every piece of the format separately (47 system calls for the `--timings` line and
/// the summary after it, `strace`).
pub(crate) fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut text = line.to_string();
    text.push('\n');
    // As `eprintln!`, but a failure to write to stderr has nowhere to be reported.
    let _ = std::io::stderr().write_all(text.as_bytes());
}

/// Wall time of a command's phases, for `--timings`.
struct Stopwatch {
    start: std::time::Instant,
    last: std::time::Instant,
    laps: Vec<(&'static str, std::time::Duration)>,
}

impl Stopwatch {
    fn new() -> Stopwatch {
        let now = std::time::Instant::now();
        Stopwatch {
            start: now,
            last: now,
            laps: Vec::new(),
        }
    }

    fn lap(&mut self, phase: &'static str) {
        let now = std::time::Instant::now();
        self.laps.push((phase, now - self.last));
        self.last = now;
    }
}

impl std::fmt::Display for Stopwatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        for (phase, took) in &self.laps {
            write!(f, "{phase} {:.2} ms, ", ms(*took))?;
        }
        write!(f, "total {:.2} ms", ms(self.last - self.start))
    }
}

#[allow(clippy::too_many_arguments)]
fn plan(
    load: &Path,
    ranks: usize,
    redundant: usize,
    nodes: Option<usize>,
    groups: usize,
    algorithm: &str,
    previous: Option<&Path>,
    physical_load: bool,
    experts: Option<usize>,
    layout: &LayoutArgs,
    max_moves: Option<usize>,
    threshold: Option<f64>,
    node_slack: Option<f64>,
    format: Format,
    output: Option<&Path>,
    timings: bool,
    notes: &mut Vec<String>,
) -> Result<(), Fail> {
    let planner = planner_by_name(algorithm)?;
    inputs::at_least_one("--ranks", ranks, "EP rank")?;
    if let Some(n) = nodes {
        inputs::at_least_one("--nodes", n, "node")?;
    }
    inputs::at_least_one("--groups", groups, "expert group (1 = none)")?;
    if algorithm == "incremental" && previous.is_none() {
        return Err(Fail(
            "--algorithm incremental needs --previous (the placement it changes)".into(),
        ));
    }
    if let Some(out) = output {
        outfile::check_output(
            out,
            "--output",
            &[Some(load), previous, layout.model.as_deref()],
        )?;
    }
    let mut clock = Stopwatch::new();
    let (load, previous_read) = inputs::read_load_and_previous(
        load,
        layout,
        physical_load,
        experts,
        previous,
        ranks,
        nodes,
        notes,
    )?;
    // A re-planned placement stays on the nodes of the one it changes.
    let prev = previous_read.map(|p| p.placement);
    let nodes = nodes.or(prev.as_ref().map(|p| p.num_nodes)).unwrap_or(1);
    if format == Format::Sglang {
        inputs::need_layout(load.layout.as_ref())?;
    }
    let history = load.history;
    let shape = Shape::new(history.num_experts(), redundant, ranks, nodes, groups)?;
    if let (Some(p), Some(file)) = (&prev, previous) {
        inputs::check_previous_fits(p, file, &shape)?;
    }
    if threshold.is_some() && prev.is_none() {
        return Err(Fail(
            "--threshold needs --previous (the placement whose PAR is compared)".into(),
        ));
    }
    if max_moves.is_some() && prev.is_none() {
        return Err(Fail(
            "--max-moves needs --previous (the placement whose slots it limits changes to)".into(),
        ));
    }
    // The node-aware polish is joint's, and only spreads replicas over several nodes.
    if node_slack.is_some() && (algorithm != "joint" || nodes <= 1) {
        return Err(Fail(format!(
            "--node-slack applies to --algorithm joint with --nodes above 1 (here {algorithm} with {nodes} node{})",
            if nodes == 1 { "" } else { "s" }
        )));
    }
    let mut req = PlanRequest::new(shape, &history);
    if let Some(p) = &prev {
        req = req.previous(p);
    }
    if let Some(m) = max_moves {
        req = req.max_moves(m);
    }
    if let Some(t) = threshold {
        req = req.threshold(t);
    }
    if let Some(s) = node_slack {
        req = req.node_slack(s);
    }
    clock.lap("inputs");
    let plan = planner.plan(&req)?;
    clock.lap("plan");
    let p = &plan.placement;
    match format {
        // Formatted as it is written, in chunks (see `plan_output`): one phase.
        Format::Placement => {
            write_out_with(output, |w| plan_output::write_plan_json(&plan, &shape, w))?;
            clock.lap("format and write");
        }
        other => {
            let text = outputs::write_placement(p, other, load.layout.as_ref())?;
            clock.lap("format");
            write_out(output, text.as_bytes())?;
            clock.lap("write");
        }
    }
    if timings {
        say(format_args!("timings: {clock}"));
    }
    if output.is_some() {
        say(format_args!(
            "planned {} with {}: mean PAR {:.4}, worst {:.4}, {} changed, {} moved, {} proven optimal{}",
            inputs::count(p.num_layers, "layer"),
            plan.algorithm,
            plan.mean_par(),
            plan.worst_par(),
            inputs::count(plan.changed_layers.len(), "layer"),
            inputs::count(plan.slots_moved, "slot"),
            inputs::count(plan.layers.iter().filter(|l| l.optimal).count(), "layer"),
            open_gap(&plan.layers)
        ));
    }
    Ok(())
}

/// What the summary says of the layers the exact search ran on but did not prove: the
/// largest proven distance from the optimum (`proven_gap`), so that a reader knows how far
/// the others may be; nothing when every such layer is proven or none has a gap.
fn open_gap(layers: &[eplb::LayerPlan]) -> String {
    let open: Vec<f64> = layers
        .iter()
        .filter(|l| !l.optimal)
        .filter_map(|l| l.proven_gap)
        .collect();
    match open.iter().copied().reduce(f64::max) {
        Some(gap) => format!(
            ", {} proven within {:.3}% of optimal",
            open.len(),
            100.0 * gap
        ),
        None => String::new(),
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            // Asked-for help and version succeed. Every other message is a usage error, printed
            // whole (which argument is missing, "did you mean", the valid values) with exit
            // code 2; that includes `moectl` alone, whose help lists the subcommands.
            let _ = e.print();
            return if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            };
        }
    };
    // Notes gathered before a failure are printed too: they often explain it (a layer read
    // as dense, then a layer count that does not match).
    let mut notes = Vec::new();
    let result = match &cli.command {
        Command::Model {
            command: ModelCommand::Inspect { path, output },
        } => model::inspect(path, *output).map(|n| notes.extend(n)),
        Command::Plan {
            load,
            ranks,
            redundant,
            nodes,
            groups,
            algorithm,
            previous,
            physical_load,
            experts,
            layout,
            max_moves,
            threshold,
            node_slack,
            format,
            output,
            timings,
        } => plan(
            load,
            *ranks,
            *redundant,
            *nodes,
            *groups,
            algorithm,
            previous.as_deref(),
            *physical_load,
            *experts,
            layout,
            *max_moves,
            *threshold,
            *node_slack,
            *format,
            output.as_deref(),
            *timings,
            &mut notes,
        ),
        Command::Backtest(args) => backtest::backtest(args, &mut notes),
        Command::Record(args) => record::record(args),
        Command::Eval {
            placement,
            load,
            previous,
            expert_bytes,
            json,
            ranks,
            svg,
            physical_load,
            nodes,
            experts,
            layout,
        } => eval::eval(
            &EvalArgs {
                placement,
                load,
                previous: previous.as_deref(),
                expert_bytes: *expert_bytes,
                as_json: *json,
                ranks: *ranks,
                svg: svg.as_ref(),
                layout,
                physical_load: *physical_load,
                nodes: *nodes,
                experts: *experts,
            },
            &mut notes,
        ),
        Command::Convert {
            input,
            to,
            output,
            ranks,
            experts,
            nodes,
            physical_load,
            placement,
            layout,
        } => convert::convert(
            &ConvertArgs {
                input,
                to: *to,
                output: output.as_deref(),
                ranks: *ranks,
                experts: *experts,
                nodes: *nodes,
                layout,
                physical_load: *physical_load,
                placement: placement.as_deref(),
            },
            &mut notes,
        ),
        Command::Bench {
            markdown,
            shape,
            history,
            repeats,
            seed,
            drift,
            export,
            peers,
            rolling,
            stride,
        } => bench::bench(
            bench::Outputs {
                markdown: markdown.as_deref(),
                export: export.as_deref(),
                peers: peers.as_deref(),
            },
            rolling.map(|steps| bench::Rolling {
                steps,
                stride: stride.unwrap_or(*history),
            }),
            shape.as_deref(),
            *history,
            *repeats,
            *seed,
            *drift,
        )
        .map(|n| notes.extend(n)),
    };
    for n in &notes {
        say(format_args!("note: {n}"));
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail(msg)) => {
            say(format_args!("error: {}", msg.lines().next().unwrap_or("")));
            ExitCode::from(2)
        }
    }
}
