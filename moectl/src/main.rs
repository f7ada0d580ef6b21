//! `moectl`: plan, evaluate and benchmark expert placements offline.
//!
//! Bad input ends with one line `error: ...` on stderr and exit code 2; nothing is written.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use eplb::metrics::{DEEPSEEK_V3_EXPERT_BYTES, migration_cost, score, score_history};
use eplb::{LoadHistory, Placement, PlanRequest, Shape, planner_by_name};
use serde_json::{Value, json};

mod bench;

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

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Format {
    Placement,
    AscendExpertMap,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Plan a placement from a load file.
    Plan {
        /// Load file: [L][E], {"windows": [W][L][E]} or {"load_history": [...]}.
        #[arg(long)]
        load: PathBuf,
        /// EP ranks (GPUs).
        #[arg(long)]
        ranks: usize,
        /// Redundant expert slots per layer.
        #[arg(long)]
        redundant: usize,
        #[arg(long, default_value_t = 1)]
        nodes: usize,
        /// Expert groups (1 = none).
        #[arg(long, default_value_t = 1)]
        groups: usize,
        /// greedy, joint or incremental.
        #[arg(long, default_value = eplb::DEFAULT_ALGORITHM)]
        algorithm: String,
        /// The placement in use (any format moectl reads).
        #[arg(long)]
        previous: Option<PathBuf>,
        /// At most this many slots change per layer.
        #[arg(long)]
        max_moves: Option<usize>,
        /// Only re-plan layers whose current PAR exceeds this (needs --previous).
        #[arg(long)]
        threshold: Option<f64>,
        /// joint with several nodes: objective (PAR) fraction it may give up to keep tokens
        /// on their node (default 0.0025).
        #[arg(long)]
        node_slack: Option<f64>,
        #[arg(long, value_enum, default_value_t = Format::Placement)]
        format: Format,
        /// Output file (default: standard output).
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Per-layer PAR of a placement under a load.
    Eval {
        #[arg(long)]
        placement: PathBuf,
        #[arg(long)]
        load: PathBuf,
        /// Also report the migration cost from this placement.
        #[arg(long)]
        previous: Option<PathBuf>,
        /// Bytes of one expert's weights (default: DeepSeek-V3, bf16).
        #[arg(long, default_value_t = DEEPSEEK_V3_EXPERT_BYTES)]
        expert_bytes: u64,
        #[arg(long)]
        json: bool,
    },
    /// Run the benchmark protocol on the standard shapes and print the table.
    Bench {
        /// Also write the table as markdown to this file.
        #[arg(long)]
        markdown: Option<PathBuf>,
        /// Only shapes whose name contains this (case-insensitive).
        #[arg(long)]
        shape: Option<String>,
        #[arg(long, default_value_t = 8)]
        history: usize,
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        #[arg(long, default_value_t = 2026)]
        seed: u64,
    },
}

/// A user error: printed as one line, exit code 2.
struct Fail(String);

impl<E: std::fmt::Display> From<E> for Fail {
    fn from(e: E) -> Self {
        Fail(e.to_string())
    }
}

fn read(path: &Path, what: &str) -> Result<String, Fail> {
    std::fs::read_to_string(path)
        .map_err(|e| Fail(format!("cannot read {what} {}: {e}", path.display())))
}

fn read_placement(path: &Path) -> Result<Placement, Fail> {
    Placement::from_json_str(&read(path, "placement")?)
        .map_err(|e| Fail(format!("{}: {e}", path.display())))
}

fn read_load(path: &Path) -> Result<LoadHistory, Fail> {
    LoadHistory::from_json_str(&read(path, "load")?)
        .map_err(|e| Fail(format!("{}: {e}", path.display())))
}

fn write_out(output: Option<&Path>, text: &str) -> Result<(), Fail> {
    match output {
        Some(p) => {
            // Write to a sibling temporary file, then rename: a failure leaves nothing behind.
            let tmp = p.with_extension("moectl-tmp");
            std::fs::write(&tmp, text)
                .map_err(|e| Fail(format!("cannot write {}: {e}", p.display())))?;
            std::fs::rename(&tmp, p).map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                Fail(format!("cannot write {}: {e}", p.display()))
            })
        }
        None => {
            println!("{text}");
            Ok(())
        }
    }
}

/// `moectl plan`'s placement output, serialised straight from the plan (no JSON value tree:
/// building one cost several times the planning itself on the DeepSeek-V3 shape).
#[derive(serde::Serialize)]
struct PlanOutput<'a> {
    algorithm: &'a str,
    num_layers: usize,
    num_logical_experts: usize,
    num_redundant: usize,
    num_ranks: usize,
    num_nodes: usize,
    num_groups: usize,
    phy2log: &'a [Vec<usize>],
    log2phy: Log2Phy<'a>,
    logcnt: Vec<Vec<usize>>,
    par: Vec<f64>,
    mean_par: f64,
    worst_par: f64,
    objective: Vec<f64>,
    lower_bound: Vec<Option<f64>>,
    optimal: Vec<bool>,
    proven_gap: Vec<Option<f64>>,
    changed_layers: &'a [usize],
    slots_moved: usize,
}

/// `Placement::log2phy` written as it is computed, one layer at a time (the nested vectors
/// were most of the output's allocations).
struct Log2Phy<'a>(&'a Placement);

impl serde::Serialize for Log2Phy<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let p = self.0;
        let width = p.max_replicas();
        let e_n = p.num_logical_experts;
        let mut layers = s.serialize_seq(Some(p.num_layers))?;
        let mut flat = vec![-1i64; e_n * width];
        let mut fill = vec![0usize; e_n];
        for row in &p.phy2log {
            flat.iter_mut().for_each(|x| *x = -1);
            fill.iter_mut().for_each(|x| *x = 0);
            for (slot, &e) in row.iter().enumerate() {
                if e < e_n && fill[e] < width {
                    flat[e * width + fill[e]] = slot as i64;
                    fill[e] += 1;
                }
            }
            let experts: Vec<&[i64]> = flat.chunks(width).collect();
            layers.serialize_element(&experts)?;
        }
        layers.end()
    }
}

impl<'a> PlanOutput<'a> {
    fn new(plan: &'a eplb::Plan, shape: &Shape) -> PlanOutput<'a> {
        let p = &plan.placement;
        PlanOutput {
            algorithm: &plan.algorithm,
            num_layers: p.num_layers,
            num_logical_experts: p.num_logical_experts,
            num_redundant: shape.num_redundant,
            num_ranks: p.num_ranks,
            num_nodes: p.num_nodes,
            num_groups: shape.num_groups,
            phy2log: &p.phy2log,
            log2phy: Log2Phy(p),
            logcnt: p.logcnt(),
            par: plan.predicted_par(),
            mean_par: plan.mean_par(),
            worst_par: plan.worst_par(),
            objective: plan.layers.iter().map(|l| l.objective).collect(),
            lower_bound: plan.layers.iter().map(|l| l.lower_bound).collect(),
            optimal: plan.layers.iter().map(|l| l.optimal).collect(),
            proven_gap: plan.layers.iter().map(|l| l.proven_gap).collect(),
            changed_layers: &plan.changed_layers,
            slots_moved: plan.slots_moved,
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn plan(
    load: &Path,
    ranks: usize,
    redundant: usize,
    nodes: usize,
    groups: usize,
    algorithm: &str,
    previous: Option<&Path>,
    max_moves: Option<usize>,
    threshold: Option<f64>,
    node_slack: Option<f64>,
    format: Format,
    output: Option<&Path>,
) -> Result<(), Fail> {
    let planner = planner_by_name(algorithm)?;
    let history = read_load(load)?;
    let shape = Shape::new(history.num_experts(), redundant, ranks, nodes, groups)?;
    let prev = previous.map(read_placement).transpose()?;
    if threshold.is_some() && prev.is_none() {
        return Err(Fail(
            "--threshold needs --previous (the placement whose PAR is compared)".into(),
        ));
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
    let plan = planner.plan(&req)?;
    let p = &plan.placement;
    let text = match format {
        Format::AscendExpertMap => serde_json::to_string_pretty(&p.to_ascend_expert_map())?,
        Format::Placement => serde_json::to_string(&PlanOutput::new(&plan, &shape))?,
    };
    write_out(output, &text)?;
    if output.is_some() {
        eprintln!(
            "planned {} layers with {}: mean PAR {:.4}, worst {:.4}, {} layers changed, {} slots moved, {} layers proven optimal",
            p.num_layers,
            plan.algorithm,
            plan.mean_par(),
            plan.worst_par(),
            plan.changed_layers.len(),
            plan.slots_moved,
            plan.layers.iter().filter(|l| l.optimal).count()
        );
    }
    Ok(())
}

fn eval(
    placement: &Path,
    load: &Path,
    previous: Option<&Path>,
    expert_bytes: u64,
    as_json: bool,
) -> Result<(), Fail> {
    let p = read_placement(placement)?;
    let history = read_load(load)?;
    let prev = previous.map(read_placement).transpose()?;
    let hs = score_history(&p, &history)?;
    let last = score(&p, history.last())?;
    let windows = history.num_windows();
    // Worst window per layer.
    let mut worst = vec![1.0f64; p.num_layers];
    for w in history.windows() {
        for (l, x) in worst.iter_mut().enumerate() {
            *x = x.max(eplb::layer_par(&p, l, &w[l]));
        }
    }
    let mig = match &prev {
        Some(old) => Some(migration_cost(old, &p, expert_bytes)?),
        None => None,
    };
    if as_json {
        let layers: Vec<Value> = (0..p.num_layers)
            .map(|l| {
                json!({"layer": l, "par": hs.per_layer[l], "balancedness": 1.0 / hs.per_layer[l],
                       "worst_window_par": worst[l], "last_window_par": last.per_layer[l]})
            })
            .collect();
        let mut v = json!({"windows": windows, "layers": layers, "mean_par": hs.mean,
                           "worst_par": hs.worst, "mean_balancedness": hs.mean_balancedness()});
        if let Some(m) = &mig {
            v["migration"] = json!({"slots": m.slots, "bytes": m.bytes, "per_layer": m.per_layer});
        }
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!("layer  PAR     balancedness  worst-window  last-window");
        for (l, w) in worst.iter().enumerate() {
            println!(
                "{:<6} {:<7.4} {:<13.4} {:<13.4} {:.4}",
                l,
                hs.per_layer[l],
                1.0 / hs.per_layer[l],
                w,
                last.per_layer[l]
            );
        }
        println!("windows: {windows}");
        println!("mean PAR: {:.4}", hs.mean);
        println!("worst PAR: {:.4}", hs.worst);
        println!("mean balancedness: {:.4}", hs.mean_balancedness());
        if let Some(m) = &mig {
            println!("migration: {} slots, {} bytes", m.slots, m.bytes);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            let text = e.to_string();
            let line = text.lines().next().unwrap_or("error: bad arguments");
            eprintln!("{line}");
            return ExitCode::from(2);
        }
    };
    let result = match &cli.command {
        Command::Plan {
            load,
            ranks,
            redundant,
            nodes,
            groups,
            algorithm,
            previous,
            max_moves,
            threshold,
            node_slack,
            format,
            output,
        } => plan(
            load,
            *ranks,
            *redundant,
            *nodes,
            *groups,
            algorithm,
            previous.as_deref(),
            *max_moves,
            *threshold,
            *node_slack,
            *format,
            output.as_deref(),
        ),
        Command::Eval {
            placement,
            load,
            previous,
            expert_bytes,
            json,
        } => eval(placement, load, previous.as_deref(), *expert_bytes, *json),
        Command::Bench {
            markdown,
            shape,
            history,
            repeats,
            seed,
        } => bench::bench(
            markdown.as_deref(),
            shape.as_deref(),
            *history,
            *repeats,
            *seed,
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail(msg)) => {
            eprintln!("error: {}", msg.lines().next().unwrap_or(""));
            ExitCode::from(2)
        }
    }
}
