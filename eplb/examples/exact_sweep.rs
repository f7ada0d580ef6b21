//! Exact-search sweep: `cargo run --release -p eplb --example exact_sweep -- [experts] [slots]
//! [instances] [windows]`. For every rank count that divides the slots, plans random skewed
//! single-layer instances with `joint` and prints how many were proven optimal, how many
//! proven within 0.1% and 1% of the optimum, and the slowest and median planning time.
use eplb::synth::Rng;
use eplb::{LoadHistory, PlanRequest, Shape, planner_by_name};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let e = args.first().copied().unwrap_or(16);
    let slots = args.get(1).copied().unwrap_or(32);
    let n = args.get(2).copied().unwrap_or(20);
    let windows = args.get(3).copied().unwrap_or(1);
    let planner = planner_by_name("joint")?;
    let mut rng = Rng::new(5);
    println!(
        "| experts | slots | ranks | windows | proven optimal | within 0.1% | within 1% | slowest ms | median ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for g in 2..=slots {
        if slots % g != 0 || slots < e {
            continue;
        }
        let shape = Shape::new(e, slots - e, g, 1, 1)?;
        let mut times = Vec::new();
        let mut proven = 0;
        let mut within = 0;
        let mut within1 = 0;
        for _ in 0..n {
            let s = 0.4 + 0.8 * rng.uniform();
            let base: Vec<f64> = (0..e)
                .map(|i| 1000.0 * (1.0 + i as f64).powf(-s) * (0.4 * rng.normal()).exp())
                .collect();
            let h: Vec<Vec<Vec<f64>>> = (0..windows)
                .map(|_| {
                    vec![
                        base.iter()
                            .map(|b| (b * (0.15 * rng.normal()).exp()).round())
                            .collect(),
                    ]
                })
                .collect();
            let h = LoadHistory::new(h)?;
            let t0 = std::time::Instant::now();
            let plan = planner.plan(&PlanRequest::new(shape, &h).threads(1))?;
            times.push(t0.elapsed().as_secs_f64() * 1e3);
            proven += usize::from(plan.layers[0].optimal);
            within += usize::from(plan.layers[0].proven_gap.is_some_and(|g| g <= 1e-3 + 1e-12));
            within1 += usize::from(plan.layers[0].proven_gap.is_some_and(|g| g <= 1e-2 + 1e-12));
            if std::env::var("SWEEP_VERBOSE").is_ok() {
                let l = &plan.layers[0];
                eprintln!(
                    "g {g}: objective {:.5} bound {:.5} optimal {}",
                    l.objective,
                    l.lower_bound.unwrap_or(0.0),
                    l.optimal
                );
            }
        }
        times.sort_by(f64::total_cmp);
        println!(
            "| {e} | {slots} | {g} | {windows} | {proven}/{n} | {within}/{n} | {within1}/{n} | {:.1} | {:.2} |",
            times[n - 1],
            times[n / 2]
        );
    }
    Ok(())
}
