//! `moectl`: plan, evaluate and benchmark expert placements offline.
//!
//! Bad input ends with one line `error: ...` on stderr and exit code 2; nothing is written.

mod convert;
mod eval;
mod inputs;
mod model;
mod outputs;
mod svg;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use eplb::metrics::DEEPSEEK_V3_EXPERT_BYTES;
use eplb::{PlanRequest, Shape, planner_by_name};
use serde_json::json;

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
        /// The load counts tokens per physical slot (vLLM's expert_load_window [W][L][P]):
        /// mapped to experts through --previous.
        #[arg(long)]
        physical_load: bool,
        #[command(flatten)]
        layout: LayoutArgs,
        /// At most this many slots change per layer.
        #[arg(long)]
        max_moves: Option<usize>,
        /// Only re-plan layers whose current PAR exceeds this (needs --previous).
        #[arg(long)]
        threshold: Option<f64>,
        /// Output: placement (moectl JSON), ascend-expert-map, sglang (--init-expert-location
        /// file, one row per decoder layer) or document.
        #[arg(long, value_enum, default_value_t = Format::Placement)]
        format: Format,
        /// Output file (default: standard output).
        #[arg(long)]
        output: Option<PathBuf>,
    },
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
        /// Bytes of one expert's weights (default: DeepSeek-V3, bf16).
        #[arg(long, default_value_t = DEEPSEEK_V3_EXPERT_BYTES)]
        expert_bytes: u64,
        #[arg(long)]
        json: bool,
        /// EP ranks, for placements that do not say (SGLang's).
        #[arg(long)]
        ranks: Option<usize>,
        /// Also write a heatmap of rank loads per layer (before and after with --previous).
        #[arg(long)]
        svg: Option<PathBuf>,
        /// The load counts tokens per physical slot (vLLM): mapped to experts through
        /// --previous, or --placement without it.
        #[arg(long)]
        physical_load: bool,
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
        /// EP ranks, for placements that do not say (SGLang's).
        #[arg(long)]
        ranks: Option<usize>,
        /// Routed experts E (vllm-ascend maps: ids from E up are mix_placement shared experts).
        #[arg(long)]
        experts: Option<usize>,
        #[arg(long)]
        nodes: Option<usize>,
        /// The load counts tokens per physical slot (vLLM): mapped to experts through --placement.
        #[arg(long)]
        physical_load: bool,
        /// The placement whose slots a per-slot load counts.
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
        #[arg(long, default_value_t = 8)]
        history: usize,
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        #[arg(long, default_value_t = 2026)]
        seed: u64,
    },
}

/// A user error: printed as one line, exit code 2.
pub(crate) struct Fail(pub(crate) String);

impl<E: std::fmt::Display> From<E> for Fail {
    fn from(e: E) -> Self {
        Fail(e.to_string())
    }
}

pub(crate) fn write_out(output: Option<&Path>, text: &str) -> Result<(), Fail> {
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

#[allow(clippy::too_many_arguments)]
fn plan(
    load: &Path,
    ranks: usize,
    redundant: usize,
    nodes: usize,
    groups: usize,
    algorithm: &str,
    previous: Option<&Path>,
    physical_load: bool,
    layout: &LayoutArgs,
    max_moves: Option<usize>,
    threshold: Option<f64>,
    format: Format,
    output: Option<&Path>,
) -> Result<Vec<String>, Fail> {
    let planner = planner_by_name(algorithm)?;
    let mut load = inputs::read_load(load, layout)?;
    let mut notes = std::mem::take(&mut load.notes);
    let experts = (!physical_load).then(|| load.history.num_experts());
    let prev = previous
        .map(|f| {
            inputs::read_placement(
                f,
                experts,
                Some(ranks),
                None,
                load.layout.as_ref(),
                &mut notes,
            )
        })
        .transpose()?;
    inputs::settle_physical(&mut load, physical_load, prev.as_ref(), "--previous")?;
    layout.check_load_shape(&load.history)?;
    notes.append(&mut load.notes);
    if format == Format::Sglang {
        inputs::need_layout(load.layout.as_ref())?;
    }
    let history = load.history;
    let shape = Shape::new(history.num_experts(), redundant, ranks, nodes, groups)?;
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
    let plan = planner.plan(&req)?;
    let p = &plan.placement;
    let text = match format {
        Format::Placement => {
            let v = json!({
                "algorithm": plan.algorithm,
                "num_layers": p.num_layers,
                "num_logical_experts": p.num_logical_experts,
                "num_redundant": shape.num_redundant,
                "num_ranks": p.num_ranks,
                "num_nodes": p.num_nodes,
                "num_groups": shape.num_groups,
                "phy2log": p.phy2log,
                "log2phy": p.log2phy(),
                "logcnt": p.logcnt(),
                "par": plan.predicted_par(),
                "mean_par": plan.mean_par(),
                "worst_par": plan.worst_par(),
                "objective": plan.layers.iter().map(|l| l.objective).collect::<Vec<_>>(),
                "lower_bound": plan.layers.iter().map(|l| l.lower_bound).collect::<Vec<_>>(),
                "optimal": plan.layers.iter().map(|l| l.optimal).collect::<Vec<_>>(),
                "changed_layers": plan.changed_layers,
                "slots_moved": plan.slots_moved,
            });
            serde_json::to_string(&v)?
        }
        other => outputs::write_placement(p, other, load.layout.as_ref())?,
    };
    write_out(output, &text)?;
    if output.is_some() {
        eprintln!(
            "planned {} layers with {}: mean PAR {:.4}, worst {:.4}, {} layers changed, {} slots moved",
            p.num_layers,
            plan.algorithm,
            plan.mean_par(),
            plan.worst_par(),
            plan.changed_layers.len(),
            plan.slots_moved
        );
    }
    Ok(notes)
}

fn bench(
    markdown: Option<&Path>,
    filter: Option<&str>,
    history: usize,
    repeats: usize,
    seed: u64,
) -> Result<Vec<String>, Fail> {
    let opts = eplb::bench::BenchOptions {
        history,
        seed,
        repeats,
        ..Default::default()
    };
    let shapes: Vec<_> = eplb::bench::standard_shapes()
        .into_iter()
        .filter(|s| filter.is_none_or(|f| s.name.to_lowercase().contains(&f.to_lowercase())))
        .collect();
    if shapes.is_empty() {
        return Err(Fail("no benchmark shape matches --shape".into()));
    }
    let mut rows = Vec::new();
    for s in &shapes {
        let r = eplb::bench::run_shape(s, &opts)?;
        print!("{}", eplb::bench::markdown_table(&r));
        rows.extend(r);
    }
    if let Some(path) = markdown {
        let doc = format!(
            "# EPLB benchmark results\n\n\
             Generated by `moectl bench --markdown {}` (release build) on {} UTC.\n\n\
             Machine: {} logical CPUs, {}; shared with other builds while measured, so \
             times are the fastest (and median) of {} runs.\n\n\
             Protocol: {}\n\n{}\n## Findings (computed from the table)\n\n{}",
            path.display(),
            utc_now(),
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model(),
            repeats.max(1),
            PROTOCOL,
            eplb::bench::markdown_table(&rows),
            eplb::bench::summary(&rows)
        );
        write_out(Some(path), &doc)?;
    }
    Ok(Vec::new())
}

const PROTOCOL: &str = "for each shape a deterministic synthetic trace of 2H+1 windows \
(H = --history, default 8) is generated (heavy-tailed per-layer popularity, log-normal drift, \
Poisson-like noise; see `eplb::synth`). The placement in use (`keep previous`) is the `joint` \
plan of the first H windows. Each algorithm plans on the next H windows with that previous \
placement and is scored on those H windows (history: mean over layers and windows, worst over \
both) and on the following window (next: mean and worst over layers). `slots moved` counts \
slots whose expert differs from the previous placement. `flashlb-like` is joint's construction \
step alone (episode-weighted replication and packing, matched and cherry-picked like joint, no \
local or exact search): our reading of FlashLB's design, not its code. `greedy` and \
`greedy-global` run on one thread; the others use every CPU (layers in parallel). The gap is the joint \
objective's distance to its lower bound (per layer; mean and max over layers).";

/// The model name from /proc/cpuinfo, or "unknown CPU".
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// Current UTC time as `YYYY-MM-DD HH:MM`.
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60
    )
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
        Command::Model {
            command: ModelCommand::Inspect { path, output },
        } => model::inspect(path, *output),
        Command::Plan {
            load,
            ranks,
            redundant,
            nodes,
            groups,
            algorithm,
            previous,
            physical_load,
            layout,
            max_moves,
            threshold,
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
            *physical_load,
            layout,
            *max_moves,
            *threshold,
            *format,
            output.as_deref(),
        ),
        Command::Eval {
            placement,
            load,
            previous,
            expert_bytes,
            json,
            ranks,
            svg,
            physical_load,
            layout,
        } => eval::eval(&EvalArgs {
            placement,
            load,
            previous: previous.as_deref(),
            expert_bytes: *expert_bytes,
            as_json: *json,
            ranks: *ranks,
            svg: svg.as_ref(),
            layout,
            physical_load: *physical_load,
        }),
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
        } => convert::convert(&ConvertArgs {
            input,
            to: *to,
            output: output.as_deref(),
            ranks: *ranks,
            experts: *experts,
            nodes: *nodes,
            layout,
            physical_load: *physical_load,
            placement: placement.as_deref(),
        }),
        Command::Bench {
            markdown,
            shape,
            history,
            repeats,
            seed,
        } => bench(
            markdown.as_deref(),
            shape.as_deref(),
            *history,
            *repeats,
            *seed,
        ),
    };
    match result {
        Ok(notes) => {
            for n in notes {
                eprintln!("note: {n}");
            }
            ExitCode::SUCCESS
        }
        Err(Fail(msg)) => {
            eprintln!("error: {}", msg.lines().next().unwrap_or(""));
            ExitCode::from(2)
        }
    }
}
