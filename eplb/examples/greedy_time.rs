//! Times `greedy` and `greedy-global` exactly as `moectl bench` does (the bench's trace, its
//! placement in use, one thread, the whole `plan` call) but many more times, and prints a
//! digest of each plan so that two builds can be checked for identical output:
//! `cargo run --release --example greedy_time -- [repeats] [shape filter] [algorithm]`.
//!
//! Without a filter it runs the two DeepSeek-V3 shapes (the ones behind the "< 5 ms" target),
//! without an algorithm both `greedy` and (where the shape has nodes) `greedy-global`.
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::Instant;

use eplb::bench::{BenchInputs, BenchOptions, standard_shapes};
use eplb::planner_by_name;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let repeats: usize = args.first().and_then(|s| s.parse().ok()).unwrap_or(200);
    let filter = args
        .get(1)
        .map_or("deepseek", String::as_str)
        .to_lowercase();
    let only = args.get(2);
    let opts = BenchOptions::default();
    println!("| shape | algorithm | min ms | median ms | runs | plan digest |");
    println!("|---|---|---|---|---|---|");
    for bs in standard_shapes()
        .into_iter()
        .filter(|s| s.name.to_lowercase().contains(&filter))
    {
        let inputs = BenchInputs::generate(&bs, &opts)?;
        let mut names = vec!["greedy"];
        if bs.shape.hierarchical() {
            names.push("greedy-global");
        }
        for name in names.into_iter().filter(|n| only.is_none_or(|o| o == n)) {
            let planner = planner_by_name(name)?;
            let req = inputs.request(bs.shape, 1);
            let mut times = Vec::with_capacity(repeats);
            let mut plan = None;
            for _ in 0..repeats.max(1) {
                let t0 = Instant::now();
                let p = planner.plan(&req)?;
                times.push(t0.elapsed().as_secs_f64() * 1e3);
                plan = Some(std::hint::black_box(p));
            }
            // The whole plan (placement, per-layer PARs and objectives, moves) as JSON: floats
            // print in their shortest round-trip form, so equal digests mean equal bits.
            let mut hasher = DefaultHasher::new();
            serde_json::to_string(&plan)?.hash(&mut hasher);
            times.sort_by(f64::total_cmp);
            println!(
                "| {} | {name} | {:.3} | {:.3} | {} | {:016x} |",
                bs.name,
                times[0],
                times[times.len() / 2],
                times.len(),
                hasher.finish()
            );
        }
    }
    Ok(())
}
