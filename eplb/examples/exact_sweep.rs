//! Exact-search sweep: `cargo run --release -p eplb --example exact_sweep -- [class] [experts]
//! [slots] [instances] [windows]`, class `zipf` (default), `uniform`, `one-hot`, `pareto` or `flashlb`. For every
//! rank count that divides the slots (and leaves no more slots per rank than experts), plans
//! random single-layer instances of the class with `joint` and prints how many were proven
//! optimal, how many proven within 0.1% and 1%, the median and largest proven gap, and the
//! median, 99th-percentile (nearest rank) and largest planning time (CPU time of the planning
//! thread, so that a shared machine's load does not inflate it).
//!
//! Classes (loads are rounded token counts, as the workers report them):
//! * `zipf`: `1000 * (1 + i)^-s * lognormal(0.4)`, exponent `s` uniform in 0.4..1.2;
//! * `uniform`: `1000 * U(0.5, 1.5)` per expert;
//! * `one-hot`: one random expert carries 30-70% of the load, the others `100 * U(0.5, 1.5)`;
//! * `pareto`: `1000 * U(0, 1)^(-1/a)` per expert, tail index `a` uniform in 1.0..1.6 (heavy
//!   tails: several hot experts at once, a few carrying most of the load);
//! * `flashlb`: FlashLB's published example (8 experts: 600, 560, 120, 120, 20, 10, 10, 10),
//!   exactly (no noise).
//!
//! Each window (except `flashlb`'s) is the base load times `lognormal(0.15)` per expert.
//!
//! `SWEEP_RANKS=24` (a comma-separated list of rank counts) plans only those rows; the other
//! rows' instances are still drawn, so every instance is the one the full sweep plans.
use eplb::synth::Rng;
use eplb::{LoadHistory, PlanRequest, Shape, planner_by_name};

/// FlashLB's published example (vllm-ascend PR), 8 experts.
const FLASHLB: [f64; 8] = [600.0, 560.0, 120.0, 120.0, 20.0, 10.0, 10.0, 10.0];

fn base_load(class: &str, e: usize, rng: &mut Rng) -> Vec<f64> {
    match class {
        "flashlb" => FLASHLB.to_vec(),
        "uniform" => (0..e).map(|_| 1000.0 * (0.5 + rng.uniform())).collect(),
        "one-hot" => {
            let mut v: Vec<f64> = (0..e).map(|_| 100.0 * (0.5 + rng.uniform())).collect();
            let hot = rng.below(e);
            let rest: f64 = v.iter().sum::<f64>() - v[hot];
            let share = 0.3 + 0.4 * rng.uniform();
            v[hot] = rest * share / (1.0 - share);
            v
        }
        "pareto" => {
            let a = 1.0 + 0.6 * rng.uniform();
            (0..e)
                .map(|_| 1000.0 * (1.0 - rng.uniform()).max(1e-9).powf(-1.0 / a))
                .collect()
        }
        _ => {
            let s = 0.4 + 0.8 * rng.uniform();
            (0..e)
                .map(|i| 1000.0 * (1.0 + i as f64).powf(-s) * (0.4 * rng.normal()).exp())
                .collect()
        }
    }
}

/// CPU time this thread has run, in milliseconds (`/proc/thread-self/schedstat`, Linux), so
/// that timings on a shared machine count the planner's own work; wall-clock time where that
/// file is missing.
fn cpu_ms(wall: std::time::Instant) -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map_or_else(|| wall.elapsed().as_secs_f64() * 1e3, |ns| ns / 1e6)
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let class = raw
        .first()
        .filter(|a| a.parse::<usize>().is_err())
        .cloned()
        .unwrap_or_else(|| "zipf".to_string());
    if !["zipf", "uniform", "one-hot", "pareto", "flashlb"].contains(&class.as_str()) {
        return Err(
            format!("class {class:?}: use zipf, uniform, one-hot, pareto or flashlb").into(),
        );
    }
    let args: Vec<usize> = raw.iter().filter_map(|a| a.parse().ok()).collect();
    let e = args.first().copied().unwrap_or(16);
    if class == "flashlb" && e != FLASHLB.len() {
        return Err(format!("class flashlb has {} experts, not {e}", FLASHLB.len()).into());
    }
    let noise = if class == "flashlb" { 0.0 } else { 0.15 };
    let slots = args.get(1).copied().unwrap_or(32);
    let n = args.get(2).copied().unwrap_or(20).max(1);
    let windows = args.get(3).copied().unwrap_or(1).max(1);
    let planner = planner_by_name("joint")?;
    let only: Option<Vec<usize>> = match std::env::var("SWEEP_RANKS") {
        Ok(v) => Some(
            v.split(',')
                .map(|r| r.trim().parse::<usize>())
                .collect::<Result<_, _>>()
                .map_err(|err| format!("SWEEP_RANKS={v:?}: {err}"))?,
        ),
        Err(_) => None,
    };
    let mut rng = Rng::new(5);
    println!(
        "| class | experts | slots | ranks x slots | windows | proven optimal | within 0.1% | within 1% | median gap | largest gap | p50 ms | p99 ms | max ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for g in 2..=slots {
        if slots % g != 0 || slots < e || slots / g > e {
            continue;
        }
        let shape = Shape::new(e, slots - e, g, 1, 1)?;
        let mut times = Vec::new();
        let mut gaps = Vec::new();
        let (mut proven, mut within, mut within1) = (0, 0, 0);
        for _ in 0..n {
            let base = base_load(&class, e, &mut rng);
            let h: Vec<Vec<Vec<f64>>> = (0..windows)
                .map(|_| {
                    vec![
                        base.iter()
                            .map(|b| (b * (noise * rng.normal()).exp()).round())
                            .collect(),
                    ]
                })
                .collect();
            if only.as_ref().is_some_and(|o| !o.contains(&g)) {
                continue;
            }
            let h = LoadHistory::new(h)?;
            let wall = std::time::Instant::now();
            let t0 = cpu_ms(wall);
            let plan = planner.plan(&PlanRequest::new(shape, &h).threads(1))?;
            times.push(cpu_ms(wall) - t0);
            let l = &plan.layers[0];
            let gap = l.proven_gap.unwrap_or(f64::INFINITY);
            gaps.push(gap);
            proven += usize::from(l.optimal);
            within += usize::from(gap <= 1e-3 + 1e-12);
            within1 += usize::from(gap <= 1e-2 + 1e-12);
            if std::env::var("SWEEP_VERBOSE").is_ok() {
                eprintln!("loads {h:?}");
                eprintln!(
                    "{g} ranks: objective {:.6} bound {:.6} gap {gap:.2e} optimal {} {:.1} ms",
                    l.objective,
                    l.lower_bound.unwrap_or(0.0),
                    l.optimal,
                    times[times.len() - 1]
                );
            }
        }
        if times.is_empty() {
            continue;
        }
        times.sort_by(f64::total_cmp);
        gaps.sort_by(f64::total_cmp);
        println!(
            "| {class} | {e} | {slots} | {g} x {} | {windows} | {proven}/{n} | {within}/{n} | {within1}/{n} | {:.3}% | {:.3}% | {:.1} | {:.1} | {:.1} |",
            slots / g,
            100.0 * percentile(&gaps, 0.5),
            100.0 * gaps[n - 1],
            percentile(&times, 0.5),
            percentile(&times, 0.99),
            times[n - 1],
        );
    }
    Ok(())
}
