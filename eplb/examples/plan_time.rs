//! Times one planner on a DeepSeek-V3 shape: `cargo run --release --example plan_time --
//! [algorithm] [prefill|decode] [repeats] [threads]`. Prints the fastest and median run.
use eplb::synth::{TraceSpec, generate};
use eplb::{LoadHistory, PlanRequest, Shape, planner_by_name};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let name = args.first().map_or("greedy", String::as_str);
    let decode = args.get(1).is_some_and(|s| s == "decode");
    let reps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(50);
    let threads: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1);
    let shape = if decode {
        Shape::new(256, 64, 64, 8, 8)?
    } else {
        Shape::new(256, 32, 32, 4, 8)?
    };
    let h = LoadHistory::new(generate(&TraceSpec::new(58, 256, 8, 8, 1)))?;
    let planner = planner_by_name(name)?;
    let mut t = Vec::new();
    for _ in 0..reps.max(1) {
        let t0 = std::time::Instant::now();
        let p = planner.plan(&PlanRequest::new(shape, &h).threads(threads))?;
        t.push(t0.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(p);
    }
    t.sort_by(f64::total_cmp);
    println!(
        "{name} ({}, {threads} thread(s)): min {:.3} ms, median {:.3} ms",
        if decode { "decode" } else { "prefill" },
        t[0],
        t[t.len() / 2]
    );
    Ok(())
}
