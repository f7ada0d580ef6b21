//! `moe-worker-bench`: runs an in-process group of worker ranks on loopback and measures
//! steady-state step time and tokens/s, PAR before and after an asynchronous remap planned by
//! `eplb` from the measured load, step time while the remap runs, and the stall of a
//! stop-the-world remap. Prints a markdown table row set (docs/benchmarks/worker.md).

use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use moe_api::{LoadReport, RemapMode, RemapRequest, RemapState};
use moe_worker::config::{Args, Config};
use moe_worker::engine::StepRecord;
use moe_worker::stats::par;
use moe_worker::{Hooks, Worker};

#[derive(Debug, Parser)]
#[command(name = "moe-worker-bench")]
struct Bench {
    #[arg(long, default_value_t = 4)]
    ranks: usize,
    #[arg(long, default_value = "cpu")]
    backend: String,
    #[arg(long, default_value_t = 4)]
    layers: usize,
    #[arg(long, default_value_t = 32)]
    experts: usize,
    #[arg(long, default_value_t = 8)]
    redundant: usize,
    #[arg(long, default_value_t = 256)]
    hidden: usize,
    #[arg(long, default_value_t = 512)]
    intermediate: usize,
    #[arg(long, default_value_t = 4)]
    top_k: usize,
    #[arg(long, default_value_t = 1)]
    groups: usize,
    #[arg(long, default_value_t = 1)]
    topk_groups: usize,
    #[arg(long, default_value = "softmax")]
    scoring: String,
    /// Tokens per step per rank.
    #[arg(long, default_value_t = 256)]
    tokens: usize,
    #[arg(long, default_value_t = 1.2)]
    skew: f64,
    #[arg(long, default_value_t = 10)]
    warmup: u64,
    /// Steps per measured phase (also the statistics window).
    #[arg(long, default_value_t = 100)]
    steps: u64,
    #[arg(long, default_value = "joint")]
    planner: String,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn intervals(recs: &[StepRecord], keep: impl Fn(&StepRecord) -> bool) -> Vec<f64> {
    recs.windows(2)
        .filter(|w| keep(&w[1]))
        .map(|w| w[1].finished.duration_since(w[0].finished).as_secs_f64() * 1e3)
        .collect()
}

async fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

fn group_load(workers: &[Worker]) -> (Vec<LoadReport>, Vec<f64>) {
    let reports: Vec<LoadReport> = workers.iter().map(|w| w.shared.load_report()).collect();
    let total = LoadReport::sum_slot_counts(&reports);
    let pars = total.iter().map(|c| par(c, workers.len())).collect();
    (reports, pars)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

/// (wall seconds, bytes received by all ranks, max stall seconds, max transfer seconds).
async fn remap(workers: &[Worker], req: RemapRequest) -> Result<(f64, u64, f64, f64)> {
    let transfer0: Vec<f64> = workers
        .iter()
        .map(|w| w.shared.metrics.remap_transfer.get())
        .collect();
    let generation = req.placement.generation;
    workers[0]
        .shared
        .submit_remap(req)
        .map_err(|e| anyhow!("remap refused: {e:?}"))?;
    wait_until("the remap", 600, || {
        workers.iter().all(|w| {
            w.shared
                .lock()
                .remap
                .as_ref()
                .is_some_and(|p| p.generation == generation && p.state == RemapState::Succeeded)
        })
    })
    .await?;
    let mut secs = 0.0f64;
    let mut bytes = 0;
    let mut stall = 0.0f64;
    for w in workers {
        let st = w.shared.lock();
        let p = st.remap.as_ref().context("remap progress")?;
        secs =
            secs.max((p.finished_at_ms.unwrap_or(p.started_at_ms) - p.started_at_ms) as f64 / 1e3);
        bytes += p.bytes_moved;
        stall = stall.max(p.stall_seconds);
    }
    let transfer = workers
        .iter()
        .zip(&transfer0)
        .map(|(w, t0)| w.shared.metrics.remap_transfer.get() - t0)
        .fold(0.0, f64::max);
    Ok((secs, bytes, stall, transfer))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let b = Bench::parse();
    // Worker logs (phases, CUDA device, weight sizes) on stderr; `RUST_LOG` picks the level.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let dir = std::env::temp_dir().join(format!("moe-worker-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let token = dir.join("token");
    std::fs::write(&token, "bench")?;
    let leader = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = leader.local_addr()?.port();
    let mut leader = Some(leader);
    let mut workers = Vec::new();
    let mut sinks = Vec::new();
    for r in 0..b.ranks {
        let argv: Vec<String> = vec![
            "moe-worker".into(),
            format!("--rank={r}"),
            format!("--world-size={}", b.ranks),
            format!("--leader-addr=127.0.0.1:{port}"),
            format!("--comm-port={}", if r == 0 { port } else { 0 }),
            "--http-port=0".into(),
            "--advertise-addr=127.0.0.1".into(),
            format!("--backend={}", b.backend),
            format!("--num-layers={}", b.layers),
            format!("--num-experts={}", b.experts),
            format!("--redundant-experts={}", b.redundant),
            format!("--hidden={}", b.hidden),
            format!("--intermediate={}", b.intermediate),
            format!("--top-k={}", b.top_k),
            format!("--expert-groups={}", b.groups),
            format!("--topk-groups={}", b.topk_groups),
            format!("--scoring={}", b.scoring),
            format!("--traffic-tokens-per-step={}", b.tokens),
            format!("--traffic-skew={}", b.skew),
            format!("--stats-window={}", b.steps),
            format!("--control-token-file={}", token.display()),
            "--comm-timeout-seconds=300".into(),
        ];
        let config = Config::from_args(Args::try_parse_from(argv)?)?;
        let (tx, rx) = mpsc::channel();
        let hooks = Hooks {
            comm_listener: if r == 0 { leader.take() } else { None },
            http_listener: None,
            step_sink: Some(tx),
            step_sink_timings_only: true,
            exit_on_hung_collective: false,
        };
        workers.push(moe_worker::start(config, hooks).await?);
        sinks.push(rx);
    }
    let t_start = Instant::now();
    wait_until("readiness", 600, || {
        workers.iter().all(|w| w.shared.is_ready())
    })
    .await?;
    let load_secs = t_start.elapsed().as_secs_f64();
    let step = |w: &Worker| w.shared.lock().step;
    let backend = workers[0].shared.lock().backend.clone();

    // A: steady state (statistics window = `steps`).
    let a0 = step(&workers[0]).max(b.warmup);
    wait_until("steady steps", 600, || {
        workers
            .iter()
            .all(|w| w.shared.load_report().window_steps >= b.steps)
            && step(&workers[0]) >= a0 + b.steps
    })
    .await?;
    let a1 = step(&workers[0]);
    let (reports, par_before) = group_load(&workers);
    let current = workers[0]
        .shared
        .lock()
        .placement
        .clone()
        .context("placement")?;
    let total = LoadReport::sum_slot_counts(&reports);
    let logical = LoadReport::logical_load(&total, &current);
    let history = eplb::LoadHistory::single(logical)?;
    let shape = eplb::Shape::new(b.experts, b.redundant, b.ranks, 1, b.groups)?;
    let prev = eplb::Placement::from_document(&current)?;
    let plan = eplb::planner_by_name(&b.planner)?
        .plan(&eplb::PlanRequest::new(shape, &history).previous(&prev))?;
    let target = plan.placement.to_document(current.generation + 1);

    // B: asynchronous remap while serving.
    let b0 = step(&workers[0]);
    let (async_secs, async_bytes, async_stall, async_transfer) = remap(
        &workers,
        RemapRequest {
            placement: target,
            layers: vec![],
            mode: RemapMode::Async,
        },
    )
    .await?;
    let b1 = step(&workers[0]);

    // C: steady state on the new placement (windows restart at each layer's switch).
    wait_until("windows after the remap", 600, || {
        workers
            .iter()
            .all(|w| w.shared.load_report().window_steps >= b.steps)
    })
    .await?;
    let (_, par_after) = group_load(&workers);
    let c1 = step(&workers[0]);

    // D: stop-the-world back to the initial placement.
    let mut back = current.clone();
    back.generation += 2;
    let d0 = step(&workers[0]);
    let (stw_secs, stw_bytes, stw_stall, stw_transfer) = remap(
        &workers,
        RemapRequest {
            placement: back,
            layers: vec![],
            mode: RemapMode::StopTheWorld,
        },
    )
    .await?;
    let d_target = step(&workers[0]) + 5;
    wait_until("steps after stop-the-world", 600, || {
        step(&workers[0]) >= d_target
    })
    .await?;

    workers[0].request_stop();
    for (r, w) in workers.into_iter().enumerate() {
        w.wait().await.with_context(|| format!("rank {r}"))?;
    }
    let recs: Vec<StepRecord> = sinks.remove(0).try_iter().collect();
    let in_range = |lo: u64, hi: u64| move |r: &StepRecord| r.step >= lo && r.step < hi;
    let mut steady = intervals(&recs, in_range(a0, a1));
    let mut during = intervals(&recs, |r| r.step >= b0 && r.step <= b1 && r.remap_running);
    let mut after = intervals(&recs, in_range(b1 + 2, c1));
    let stw = intervals(&recs, in_range(d0, d_target));
    let tokens_per_step = (b.ranks * b.tokens) as f64;
    let steady_mean = mean(&steady);
    let steady_p50 = pct(&mut steady, 0.5);
    let steady_p99 = pct(&mut steady, 0.99);
    let expert_mib = (3 * b.hidden * b.intermediate * 2) as f64 / (1 << 20) as f64;
    println!(
        "| {backend} | {} ranks | L{} E{}+{} H{} I{} top{} | {} tok/rank | {:.1} s | {:.2} / {:.2} ms | {:.0} tok/s | PAR mean {:.3} max {:.3} | PAR mean {:.3} max {:.3} | {:.2} ms (n={}) | {:.2} ms | async {:.3} s, {:.1} MiB, stall {:.2} ms | STW stall {:.1} ms, {:.1} MiB, max step {:.2} ms |",
        b.ranks,
        b.layers,
        b.experts,
        b.redundant,
        b.hidden,
        b.intermediate,
        b.top_k,
        b.tokens,
        load_secs,
        steady_p50,
        steady_p99,
        tokens_per_step / (steady_mean / 1e3),
        mean(&par_before),
        max(&par_before),
        mean(&par_after),
        max(&par_after),
        pct(&mut during, 0.99),
        during.len(),
        pct(&mut after, 0.99),
        async_secs,
        async_bytes as f64 / (1 << 20) as f64,
        async_stall * 1e3,
        stw_stall * 1e3,
        stw_bytes as f64 / (1 << 20) as f64,
        max(&stw),
    );
    let gbps = |bytes: u64, secs: f64| bytes as f64 / secs.max(1e-9) / 1e9;
    println!(
        "expert size {expert_mib:.2} MiB; predicted PAR by the planner {:.3}; async remap wall {async_secs:.3} s, transfer {:.3} s max/rank ({:.2} GB/s group), stop-the-world wall {stw_secs:.3} s, transfer {:.3} s ({:.2} GB/s group)",
        plan.mean_par(),
        async_transfer,
        gbps(async_bytes, async_transfer),
        stw_transfer,
        gbps(stw_bytes, stw_transfer),
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
