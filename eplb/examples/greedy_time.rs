//! Times one planner on the DeepSeek-V3 prefill shape, single-threaded: `cargo run --release
//! --example greedy_time -- [algorithm] [repeats]`.
use eplb::synth::{TraceSpec, generate};
use eplb::{LoadHistory, PlanRequest, Shape, planner_by_name};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let name = args.next().unwrap_or_else(|| "greedy".into());
    let reps: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(50);
    let shape = Shape::new(256, 32, 32, 4, 8)?;
    let h = LoadHistory::new(generate(&TraceSpec::new(58, 256, 8, 8, 1)))?;
    let planner = planner_by_name(&name)?;
    let mut t = Vec::new();
    for _ in 0..reps {
        let t0 = std::time::Instant::now();
        let p = planner.plan(&PlanRequest::new(shape, &h).threads(1))?;
        t.push(t0.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(p);
    }
    t.sort_by(f64::total_cmp);
    println!(
        "{name}: min {:.3} ms, median {:.3} ms",
        t[0],
        t[t.len() / 2]
    );
    Ok(())
}
