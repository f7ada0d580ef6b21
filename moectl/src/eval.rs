//! `moectl eval`: PAR and balancedness of a placement under a load, migration cost from a
//! previous placement, and the heatmap.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use eplb::metrics::{Balancedness, balancedness, migration_cost, score, score_history};
use eplb::traffic::{cross_node_moves, mean_cross_node_floor, mean_cross_node_share};
use eplb::{LoadHistory, Placement};
use serde_json::{Value, json};

use crate::inputs::{self, LayoutArgs};
use crate::{Fail, print_out, svg, write_out};

/// Everything `eval` takes.
pub struct EvalArgs<'a> {
    pub placement: &'a Path,
    pub load: &'a Path,
    pub previous: Option<&'a Path>,
    /// `--expert-bytes`; `None`: the model's (see [`expert_bytes`]).
    pub expert_bytes: Option<u64>,
    pub as_json: bool,
    pub ranks: Option<usize>,
    pub svg: Option<&'a PathBuf>,
    pub layout: &'a LayoutArgs,
    pub physical_load: bool,
    pub nodes: Option<usize>,
    pub experts: Option<usize>,
}

/// Node-level traffic of a placement with several nodes (`eplb::traffic`).
struct CrossNode {
    /// Token-expert assignments that leave their node (mean over layers, summed load).
    token_share: f64,
    /// The least share any placement with the same replica counts can have.
    floor: f64,
    /// Moved slots whose expert their node did not hold before (with a comparable --previous).
    weight_moves: Option<usize>,
}

fn cross_node(p: &Placement, prev: Option<&Placement>, h: &LoadHistory) -> Option<CrossNode> {
    if p.num_nodes <= 1 {
        return None;
    }
    let total = h.total();
    Some(CrossNode {
        token_share: mean_cross_node_share(p, &total),
        floor: mean_cross_node_floor(p, &total),
        weight_moves: prev
            .filter(|old| old.num_layers == p.num_layers && old.num_slots() == p.num_slots())
            .map(|old| cross_node_moves(old, p)),
    })
}

/// PAR per layer (mean over windows), its mean and worst, and both balancedness figures.
struct Summary {
    per_layer: Vec<f64>,
    /// SGLang's balancedness of each layer: 1/PAR averaged over the windows (their mean over
    /// layers is `engines.sglang`; 1/(mean PAR) would be a third definition).
    balancedness_per_layer: Vec<f64>,
    worst_window: Vec<f64>,
    last_window: Vec<f64>,
    mean: f64,
    worst: f64,
    engines: Balancedness,
}

fn summarize(p: &Placement, h: &LoadHistory) -> Result<Summary, Fail> {
    let hs = score_history(p, h)?;
    let last = score(p, h.last())?;
    let mut worst_window = vec![1.0f64; p.num_layers];
    let mut balancedness_per_layer = vec![0.0; p.num_layers];
    let windows = h.num_windows() as f64;
    for w in h.windows() {
        for (l, (x, b)) in worst_window
            .iter_mut()
            .zip(&mut balancedness_per_layer)
            .enumerate()
        {
            let par = eplb::layer_par(p, l, &w[l]);
            *x = x.max(par);
            *b += 1.0 / par / windows;
        }
    }
    Ok(Summary {
        balancedness_per_layer,
        engines: balancedness(p, h)?,
        per_layer: hs.per_layer,
        worst_window,
        last_window: last.per_layer,
        mean: hs.mean,
        worst: hs.worst,
    })
}

fn engines_json(b: &Balancedness) -> Value {
    json!({"sglang_mean_inverse_par": b.sglang, "vllm_sum_mean_over_sum_max": b.vllm})
}

/// Evaluates; what the readers had to assume goes to `notes`, also when a later step fails.
pub fn eval(a: &EvalArgs, notes: &mut Vec<String>) -> Result<(), Fail> {
    if let Some(path) = a.svg {
        crate::outfile::check_output(
            path,
            "--svg",
            &[Some(a.placement), Some(a.load), a.previous],
        )?;
    }
    let mut load = inputs::read_load(a.load, a.layout)?;
    notes.append(&mut load.notes);
    // E: the load's columns, unless they count slots (then --experts, for maps that list
    // shared experts after the routed ones).
    let experts = inputs::load_experts(&load, a.physical_load, a.experts)?;
    let layout = load.layout.clone();
    let flags = inputs::Stated {
        ranks: a.ranks,
        nodes: a.nodes,
        experts: a.experts,
    };
    let p = inputs::read_user_placement(a.placement, experts, &flags, layout.as_ref(), notes)?;
    let prev = a
        .previous
        .map(|f| inputs::read_user_placement(f, experts, &flags, layout.as_ref(), notes))
        .transpose()?;
    if let (Some(pp), Some(file)) = (&prev, a.previous) {
        check_previous(pp, file, &p, a.placement)?;
    }
    // A per-slot load was recorded while the previous placement served (or, without one, the
    // evaluated placement).
    let (through, through_file, flag) = match (&prev, a.previous) {
        (Some(pp), Some(file)) => (pp, file, "--previous"),
        _ => (&p, a.placement, "--placement"),
    };
    if a.physical_load {
        inputs::settle_physical(&mut load, true, Some(through), Some(through_file), flag)?;
    } else {
        inputs::settle_physical(&mut load, false, Some(&p), Some(a.placement), "--placement")?;
    }
    notes.append(&mut load.notes);
    let history = load.history;
    let now = summarize(&p, &history)
        .map_err(|Fail(e)| Fail(format!("--placement {}: {e}", a.placement.display())))?;
    // Same layers and experts (checked above): its PAR under the same load is comparable.
    let before = prev
        .as_ref()
        .map(|pp| summarize(pp, &history))
        .transpose()?;
    // Slots correspond only between placements of the same size; a previous placement with
    // other slots (say, fewer redundant experts) is still compared by PAR.
    let mig = match &prev {
        Some(old) if old.num_layers == p.num_layers && old.num_slots() == p.num_slots() => {
            Some(migration_cost(old, &p, expert_bytes(a)?)?)
        }
        Some(old) => {
            notes.push(format!(
                "no migration cost: the previous placement has {} x {} slots, this one {} x {} (slots do not correspond)",
                inputs::count(old.num_layers, "layer"),
                old.num_slots(),
                inputs::count(p.num_layers, "layer"),
                p.num_slots()
            ));
            None
        }
        None => None,
    };
    if let Some(path) = a.svg {
        let mut panels = Vec::new();
        if let Some(pp) = &prev {
            panels.push(svg::Panel {
                title: format!("before: {}", file_name(a.previous.unwrap_or(a.placement))),
                placement: pp,
            });
        }
        panels.push(svg::Panel {
            title: format!(
                "{}{}",
                if prev.is_some() { "after: " } else { "" },
                file_name(a.placement)
            ),
            placement: &p,
        });
        let doc = svg::render(&panels, &history, &file_name(a.load));
        write_out(Some(path), doc.as_bytes())?;
    }
    let nodes = cross_node(&p, prev.as_ref(), &history);
    let windows = history.num_windows();
    let mut out = String::new();
    // One line of the text report.
    macro_rules! out_line {
        ($($arg:tt)*) => {{
            let _ = writeln!(out, $($arg)*);
        }};
    }
    if a.as_json {
        let layers: Vec<Value> = (0..p.num_layers)
            .map(|l| {
                let mut v = json!({"layer": l, "par": now.per_layer[l], "balancedness": now.balancedness_per_layer[l],
                       "worst_window_par": now.worst_window[l], "last_window_par": now.last_window[l]});
                if let Some(b) = &before {
                    v["previous_par"] = json!(b.per_layer[l]);
                }
                v
            })
            .collect();
        let mut v = json!({"windows": windows, "layers": layers, "mean_par": now.mean,
                           "worst_par": now.worst, "mean_balancedness": now.engines.sglang,
                           "balancedness": engines_json(&now.engines)});
        if let Some(m) = &mig {
            v["migration"] = json!({"slots": m.slots, "bytes": m.bytes, "per_layer": m.per_layer});
        }
        if let Some(c) = &nodes {
            v["cross_node"] = json!({"nodes": p.num_nodes, "token_share": c.token_share,
                                     "floor": c.floor, "weight_moves": c.weight_moves});
        }
        if let Some(b) = &before {
            v["previous"] = json!({"mean_par": b.mean, "worst_par": b.worst,
                                   "per_layer_par": b.per_layer,
                                   "balancedness": engines_json(&b.engines)});
        }
        out.push_str(&serde_json::to_string(&v)?);
        out.push('\n');
    } else {
        let prev_col = if before.is_some() { "  previous" } else { "" };
        out_line!("layer  PAR     balancedness  worst-window  last-window{prev_col}");
        for (l, w) in now.worst_window.iter().enumerate() {
            let prev = before
                .as_ref()
                .map_or(String::new(), |b| format!("  {:.4}", b.per_layer[l]));
            // With a previous column, last-window is padded to its header's width.
            let last = if prev.is_empty() {
                format!("{:.4}", now.last_window[l])
            } else {
                format!("{:<11.4}", now.last_window[l])
            };
            out_line!(
                "{:<6} {:<7.4} {:<13.4} {:<13.4} {last}{prev}",
                l,
                now.per_layer[l],
                now.balancedness_per_layer[l],
                w,
            );
        }
        out_line!("windows: {windows}");
        out_line!("mean PAR: {:.4}", now.mean);
        out_line!("worst PAR: {:.4}", now.worst);
        out_line!(
            "balancedness, SGLang (1/PAR, mean over layers and windows): {:.4}",
            now.engines.sglang
        );
        out_line!(
            "balancedness, vLLM (sum over layers of mean rank load / of max rank load, mean over windows): {:.4}",
            now.engines.vllm
        );
        if let Some(b) = &before {
            out_line!(
                "previous: mean PAR {:.4}, worst {:.4}, balancedness SGLang {:.4}, vLLM {:.4}",
                b.mean,
                b.worst,
                b.engines.sglang,
                b.engines.vllm
            );
        }
        if let Some(m) = &mig {
            out_line!("migration: {} slots, {} bytes", m.slots, m.bytes);
        }
        if let Some(c) = &nodes {
            out_line!(
                "cross-node tokens: {:.1}% over {} nodes (these replica counts allow {:.1}%)",
                100.0 * c.token_share,
                p.num_nodes,
                100.0 * c.floor
            );
            if let Some(m) = c.weight_moves {
                out_line!("cross-node weight moves: {m} slots");
            }
        }
    }
    print_out(&out)?;
    Ok(())
}

/// Bytes of one moved expert: `--expert-bytes`, else `--model`'s experts as stored (an FP8
/// checkpoint's are half a bf16 one's, plus scales), else DeepSeek-V3's in bf16.
fn expert_bytes(a: &EvalArgs) -> Result<u64, Fail> {
    if let Some(b) = a.expert_bytes {
        return Ok(b);
    }
    Ok(a.layout
        .model()?
        .map_or(eplb::metrics::DEEPSEEK_V3_EXPERT_BYTES, |m| {
            m.expert_bytes() as u64
        }))
}

/// Refuses a `--previous` of another model than `--placement` (other layers or experts): its
/// figures would be read against a load it does not fit, its extra layers dropped without a
/// word and the heatmap drawn past the load. Other slots or ranks (another redundancy or
/// cluster for the same model) are compared, without a migration cost.
fn check_previous(
    prev: &Placement,
    prev_file: &Path,
    p: &Placement,
    placement_file: &Path,
) -> Result<(), Fail> {
    if prev.num_layers == p.num_layers && prev.num_logical_experts == p.num_logical_experts {
        return Ok(());
    }
    Err(Fail(format!(
        "--previous {} has {} but --placement {} has {}: give a previous placement of the same model (plan it for the same layers and experts), or drop --previous",
        prev_file.display(),
        shape_of(prev),
        placement_file.display(),
        shape_of(p)
    )))
}

/// "2 layers of 16 experts, 20 slots on 4 ranks".
fn shape_of(p: &Placement) -> String {
    format!(
        "{} of {}, {} on {}",
        inputs::count(p.num_layers, "layer"),
        inputs::count(p.num_logical_experts, "expert"),
        inputs::count(p.num_slots(), "slot"),
        inputs::count(p.num_ranks, "rank")
    )
}

fn file_name(p: &Path) -> String {
    p.file_name().map_or_else(
        || p.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}
