//! `moe-worker-bench`: runs an in-process group of worker ranks on loopback and measures
//! steady-state step time and tokens/s, PAR before and after an asynchronous remap planned by
//! `eplb` from the measured load, step time while the remap runs, and the stall of a
//! stop-the-world remap. Prints a markdown table row set (docs/benchmarks/worker.md).

use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use moe_api::{LoadReport, RemapMode, RemapRequest, RemapState};
use moe_kernels::cuda::{self, DeviceExperts, EpComm, ExpertStaging, Gpu, grouped};
use moe_kernels::cudarc::driver::sys::CUevent_flags;
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
    /// Router scoring (default: the family's, else softmax).
    #[arg(long)]
    scoring: Option<String>,
    /// Imitate a model family's gating and shared experts (`--family` of the worker).
    #[arg(long)]
    family: Option<String>,
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
    /// Asynchronous remaps to run (alternating between the planned placement and the initial
    /// one), for more samples of the step time while a remap runs.
    #[arg(long, default_value_t = 1)]
    async_rounds: usize,
    /// Measure the NCCL reference only (CUDA; for tuning NCCL settings) and exit.
    #[arg(long)]
    reference_only: bool,
}

/// What one remap moved, per rank.
struct RemapRun {
    /// Wall seconds from acceptance to the last rank's success.
    secs: f64,
    /// Bytes received, per rank.
    bytes: Vec<u64>,
    /// Transfer seconds (sends, receives and local copies; device time on CUDA), per rank.
    transfer: Vec<f64>,
    /// Engine-thread stall, max over ranks.
    stall: f64,
}

impl RemapRun {
    fn total_bytes(&self) -> u64 {
        self.bytes.iter().sum()
    }
    /// Receive rate of each rank that received anything, GB/s.
    fn recv_gbps(&self) -> Vec<f64> {
        self.bytes
            .iter()
            .zip(&self.transfer)
            .filter(|(b, _)| **b > 0)
            .map(|(b, t)| *b as f64 / t.max(1e-9) / 1e9)
            .collect()
    }
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
    let reports: Vec<LoadReport> = workers.iter().map(|w| w.shared.load_report(0)).collect();
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

async fn remap(workers: &[Worker], req: RemapRequest) -> Result<RemapRun> {
    let before: Vec<(u64, f64, f64)> = workers.iter().map(remap_counters).collect();
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
    for w in workers {
        let st = w.shared.lock();
        let p = st.remap.as_ref().context("remap progress")?;
        secs =
            secs.max((p.finished_at_ms.unwrap_or(p.started_at_ms) - p.started_at_ms) as f64 / 1e3);
    }
    let after: Vec<(u64, f64, f64)> = workers.iter().map(remap_counters).collect();
    let d = |f: fn(&(u64, f64, f64)) -> f64| -> Vec<f64> {
        before
            .iter()
            .zip(&after)
            .map(|(a, b)| f(b) - f(a))
            .collect()
    };
    Ok(RemapRun {
        secs,
        bytes: d(|c| c.0 as f64).into_iter().map(|b| b as u64).collect(),
        transfer: d(|c| c.1),
        stall: max(&d(|c| c.2)),
    })
}

/// (bytes received, transfer seconds, stall seconds) so far, from a rank's metrics.
fn remap_counters(w: &Worker) -> (u64, f64, f64) {
    let m = &w.shared.metrics;
    (
        m.remap_bytes.get(),
        m.remap_transfer.get(),
        m.remap_stall.get(),
    )
}

/// NCCL send/recv between the bench's GPUs at the size of one expert, measured in the same run
/// before the workers start (the reference for the remap transfer rate).
struct NcclReference {
    /// GPU 0 -> GPU 1, one expert (w1 and w2 in one group, as a remap sends a slot), GB/s.
    one_way: f64,
    /// Every rank sends one expert to the next and receives one from the previous at once:
    /// receive rate per rank (median rank), GB/s.
    ring: f64,
}

/// One rank's part of a reference transfer: its rank, a one-slot expert buffer to send from,
/// a staging buffer to receive into, its communicator.
type RefStep =
    dyn Fn(usize, &DeviceExperts, &mut ExpertStaging, &EpComm) -> moe_kernels::Result<()> + Sync;

fn nccl_reference(ranks: usize, hidden: usize, inter: usize) -> Result<Option<NcclReference>> {
    if ranks < 2 || cuda::available().unwrap_or(0) < ranks || !cuda::nccl_available() {
        return Ok(None);
    }
    let gpus: Vec<Gpu> = (0..ranks).map(Gpu::new).collect::<Result<_, _>>()?;
    let comms = EpComm::for_streams(gpus.iter().map(|g| g.side_stream().clone()).collect())?;
    let bytes = (3 * hidden * inter * 2) as f64;
    let one_way = time_on_ranks(&gpus, &comms, hidden, inter, &|r, ex, st, c| match r {
        0 => c.send_slot(ex, 0, 1),
        1 => c.recv_slot(st, 0),
        _ => Ok(()),
    })?;
    let n = ranks;
    let ring = time_on_ranks(&gpus, &comms, hidden, inter, &move |r, ex, st, c| {
        grouped(|| {
            c.send_slot(ex, 0, (r + 1) % n)?;
            c.recv_slot(st, (r + n - 1) % n)
        })
    })?;
    let mut ring: Vec<f64> = ring.iter().map(|t| bytes / t / 1e9).collect();
    Ok(Some(NcclReference {
        one_way: bytes / one_way[1] / 1e9,
        ring: pct(&mut ring, 0.5),
    }))
}

/// Seconds per repetition of `f` on each rank's side stream (3 warm-up rounds, 10 timed).
fn time_on_ranks(
    gpus: &[Gpu],
    comms: &[EpComm],
    hidden: usize,
    inter: usize,
    f: &RefStep,
) -> Result<Vec<f64>> {
    struct Rank<'a>(usize, &'a Gpu, &'a EpComm);
    // SAFETY: each communicator (and its GPU) is used by exactly one thread.
    unsafe impl Send for Rank<'_> {}
    let cu = |e: moe_kernels::cudarc::driver::DriverError| anyhow!("timing NCCL: {e:?}");
    std::thread::scope(|sc| {
        let hs: Vec<_> = gpus
            .iter()
            .zip(comms)
            .enumerate()
            .map(|(r, (g, c))| {
                let rank = Rank(r, g, c);
                sc.spawn(move || -> Result<f64> {
                    // The whole struct moves in (not its fields one by one): it is the Send one.
                    let rank = rank;
                    let Rank(r, gpu, comm) = rank;
                    let experts = DeviceExperts::random(gpu, 1, hidden, inter, r as u32, 0.1)?;
                    let mut staging = experts.alloc_staging(gpu)?;
                    gpu.synchronize()?;
                    let side = gpu.side_stream();
                    for _ in 0..3 {
                        f(r, &experts, &mut staging, comm)?;
                    }
                    let ev = || side.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT));
                    let start = ev().map_err(cu)?;
                    for _ in 0..10 {
                        f(r, &experts, &mut staging, comm)?;
                    }
                    let end = ev().map_err(cu)?;
                    Ok(f64::from(start.elapsed_ms(&end).map_err(cu)?) / 1e3 / 10.0)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow!("a reference thread panicked"))?
            })
            .collect()
    })
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
    // The reference first, on idle GPUs; its contexts are gone before the workers start.
    let reference = if b.backend == "cuda" {
        nccl_reference(b.ranks, b.hidden, b.intermediate)?
    } else {
        None
    };
    if b.reference_only {
        match &reference {
            Some(r) => println!(
                "NCCL send/recv of one expert ({} ranks): one way GPU0->GPU1 {:.1} GB/s, ring {:.1} GB/s per rank",
                b.ranks, r.one_way, r.ring
            ),
            None => bail!("--reference-only needs --backend cuda and 2 or more GPUs"),
        }
        return Ok(());
    }
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
        let mut argv: Vec<String> = vec![
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
            format!("--traffic-tokens-per-step={}", b.tokens),
            format!("--traffic-skew={}", b.skew),
            format!("--stats-window={}", b.steps),
            format!("--control-token-file={}", token.display()),
            "--comm-timeout-seconds=300".into(),
        ];
        if let Some(s) = &b.scoring {
            argv.push(format!("--scoring={s}"));
        }
        if let Some(f) = &b.family {
            argv.push(format!("--family={f}"));
        }
        let config = Config::from_args(Args::try_parse_from(argv)?)?;
        let (tx, rx) = mpsc::channel();
        let hooks = Hooks {
            comm_listener: if r == 0 { leader.take() } else { None },
            http_listener: None,
            forward_listener: None,
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
            .all(|w| w.shared.load_report(0).window_steps >= b.steps)
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
    let first = remap(
        &workers,
        RemapRequest {
            placement: target.clone(),
            layers: vec![],
            mode: RemapMode::Async,
        },
    )
    .await?;
    let b1 = step(&workers[0]);
    let mut async_ranges = vec![(b0, b1)];
    let mut async_runs = vec![first];

    // C: steady state on the new placement (windows restart at each layer's switch).
    wait_until("windows after the remap", 600, || {
        workers
            .iter()
            .all(|w| w.shared.load_report(0).window_steps >= b.steps)
    })
    .await?;
    let (_, par_after) = group_load(&workers);
    let c1 = step(&workers[0]);

    // B': more asynchronous remaps, back and forth, for more samples during a remap.
    let mut generation = target.generation;
    for round in 1..b.async_rounds {
        generation += 1;
        let mut placement = if round % 2 == 1 {
            current.clone()
        } else {
            target.clone()
        };
        placement.generation = generation;
        let r0 = step(&workers[0]);
        async_runs.push(
            remap(
                &workers,
                RemapRequest {
                    placement,
                    layers: vec![],
                    mode: RemapMode::Async,
                },
            )
            .await?,
        );
        async_ranges.push((r0, step(&workers[0])));
        // A few steady steps between rounds.
        let settle = step(&workers[0]) + 5;
        wait_until("steps between remaps", 600, || step(&workers[0]) >= settle).await?;
    }

    // D: stop-the-world to the other placement of the two.
    let mut other = if b.async_rounds % 2 == 1 {
        current.clone()
    } else {
        target.clone()
    };
    other.generation = generation + 1;
    let d0 = step(&workers[0]);
    let stw = remap(
        &workers,
        RemapRequest {
            placement: other,
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
    // "During": the intervals ending in a step whose forward pass ran while a remap was active
    // on this rank (its interval holds the boundary that began or switched a layer), and the
    // step after the last switch (that switch's copies run on the GPU in it).
    let in_async = |step: u64| {
        async_ranges
            .iter()
            .any(|&(lo, hi)| step >= lo && step <= hi + 1)
    };
    let mut during: Vec<f64> = recs
        .windows(3)
        .filter(|w| in_async(w[2].step) && (w[2].remap_running || w[1].remap_running))
        .map(|w| w[2].finished.duration_since(w[1].finished).as_secs_f64() * 1e3)
        .collect();
    let mut after = intervals(&recs, in_range(b1 + 2, c1));
    let stw_steps = intervals(&recs, in_range(d0, d_target));
    let tokens_per_step = (b.ranks * b.tokens) as f64;
    let steady_mean = mean(&steady);
    let steady_p50 = pct(&mut steady, 0.5);
    let steady_p99 = pct(&mut steady, 0.99);
    let during_mean = mean(&during);
    let during_p50 = pct(&mut during, 0.5);
    let during_p99 = pct(&mut during, 0.99);
    let first = &async_runs[0];
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "| {backend} | {} ranks | L{} E{}+{} H{} I{} top{} | {} tok/rank | {:.1} s | {:.2} / {:.2} ms | {:.0} tok/s | PAR mean {:.3} max {:.3} | PAR mean {:.3} max {:.3} | {:.2} ms (n={}, {:+.1}% vs steady p99) | {:.2} ms | async {:.3} s, {:.1} MiB, stall {:.2} ms | STW stall {:.1} ms, {:.1} MiB, max step {:.2} ms |",
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
        during_p99,
        during.len(),
        (during_p99 / steady_p99 - 1.0) * 100.0,
        pct(&mut after, 0.99),
        first.secs,
        mib(first.total_bytes()),
        first.stall * 1e3,
        stw.stall * 1e3,
        mib(stw.total_bytes()),
        max(&stw_steps),
    );
    let rel = |a: f64, b: f64| (a / b - 1.0) * 100.0;
    println!(
        "step interval while an async remap runs vs steady state: p50 {during_p50:.2} vs {steady_p50:.2} ms ({:+.1}%), mean {during_mean:.2} vs {steady_mean:.2} ms ({:+.1}%), p99 {during_p99:.2} vs {steady_p99:.2} ms ({:+.1}%)",
        rel(during_p50, steady_p50),
        rel(during_mean, steady_mean),
        rel(during_p99, steady_p99),
    );
    let steady_recs: Vec<&StepRecord> = recs
        .iter()
        .filter(|r| r.step >= a0 && r.step < a1)
        .collect();
    let ms = |f: fn(&StepRecord) -> Duration| -> Vec<f64> {
        steady_recs
            .iter()
            .map(|r| f(r).as_secs_f64() * 1e3)
            .collect()
    };
    let (mut fwd, mut wait) = (ms(|r| r.duration), ms(|r| r.input_wait));
    println!(
        "steady state on rank 0: forward pass p50 {:.2} ms p99 {:.2} ms; waiting for the input batch p50 {:.2} ms p99 {:.2} ms; the rest of the interval is the step boundary",
        pct(&mut fwd, 0.5),
        pct(&mut fwd, 0.99),
        pct(&mut wait, 0.5),
        pct(&mut wait, 0.99)
    );
    let expert_mib = (3 * b.hidden * b.intermediate * 2) as f64 / (1 << 20) as f64;
    println!(
        "expert size {expert_mib:.2} MiB; predicted PAR by the planner {:.3}; {} async remap(s)",
        plan.mean_par(),
        async_runs.len()
    );
    let rates = |runs: &[&RemapRun]| {
        let mut v: Vec<f64> = runs.iter().flat_map(|r| r.recv_gbps()).collect();
        (pct(&mut v, 0.0), pct(&mut v, 0.5), v.len())
    };
    let (amin, amed, an) = rates(&async_runs.iter().collect::<Vec<_>>());
    let (smin, smed, _) = rates(&[&stw]);
    let stall_max = async_runs.iter().map(|r| r.stall).fold(0.0, f64::max);
    println!(
        "remap receive rate per rank (bytes received / that rank's transfer time): async min {amin:.1} median {amed:.1} GB/s over {an} rank-remaps (max stall per remap {:.2} ms); stop-the-world min {smin:.1} median {smed:.1} GB/s",
        stall_max * 1e3
    );
    match reference {
        Some(r) => println!(
            "NCCL send/recv of one expert, same GPUs, this run: one way GPU0->GPU1 {:.1} GB/s, ring (all ranks send and receive at once) {:.1} GB/s per rank; async median = {:.0}% of one-way, {:.0}% of ring",
            r.one_way,
            r.ring,
            amed / r.one_way * 100.0,
            amed / r.ring * 100.0
        ),
        None => println!("NCCL reference: not measured (needs the cuda backend on 2+ GPUs)"),
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
