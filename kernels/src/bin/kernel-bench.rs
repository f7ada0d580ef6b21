//! Kernel benchmarks. `kernel-bench single` (one GPU) or `kernel-bench multi` (all visible
//! GPUs, NCCL). Prints `RESULT <section> <shape> <tokens> <metric> <value>` lines (merged with
//! the PyTorch script's lines into docs/benchmarks/kernels.md) and a readable table.

use cudarc::driver::sys::CUevent_flags;
use moe_kernels::cuda::{
    self, DeviceExperts, DeviceMatrix, DeviceReplicaMap, EpComm, EpLayer, FfnStrategy, Gpu,
};
use moe_kernels::rng::SplitMix64;
use moe_kernels::{EpTopology, GatingConfig, KernelError, Matrix, ReplicaMap, Result, bf16};

fn drv(e: cudarc::driver::DriverError) -> KernelError {
    KernelError::Driver(format!("{e:?}"))
}

fn result(section: &str, shape: &str, tokens: usize, metric: &str, value: f64) {
    println!("RESULT {section} {shape} {tokens} {metric} {value:.3}");
}

/// Median over 5 batches of `reps` calls, in microseconds per call (device events).
fn time_us(gpu: &Gpu, reps: usize, f: impl FnMut() -> Result<()>) -> Result<f64> {
    gpu.time_per_call_us(3, 5, reps, f)
}

struct Shape {
    name: &'static str,
    hidden: usize,
    inter: usize,
    experts: usize,
    top_k: usize,
    ep: usize,
    gating: GatingConfig,
}

fn shapes() -> Vec<Shape> {
    vec![
        Shape {
            name: "dsv3",
            hidden: 7168,
            inter: 2048,
            experts: 256,
            top_k: 8,
            ep: 8,
            gating: GatingConfig::grouped_sigmoid(256, 8, 8, 4, 2.5),
        },
        Shape {
            name: "h4096e64",
            hidden: 4096,
            inter: 1536,
            experts: 64,
            top_k: 8,
            ep: 8,
            gating: GatingConfig::softmax(64, 8, true),
        },
    ]
}

/// Deterministic mildly skewed split of `rows` over `n` experts (weights 1, 1.5, 2, 2.5, ...);
/// the PyTorch script uses the same split.
fn skewed_offsets(rows: usize, n: usize) -> Vec<u32> {
    let w: Vec<f64> = (0..n).map(|e| 1.0 + 0.5 * (e % 4) as f64).collect();
    let s: f64 = w.iter().sum();
    let mut c: Vec<usize> = w
        .iter()
        .map(|x| (rows as f64 * x / s).floor() as usize)
        .collect();
    let used: usize = c.iter().sum();
    c[0] += rows - used;
    let mut o = vec![0u32];
    for x in c {
        o.push(o.last().copied().unwrap_or(0) + x as u32);
    }
    o
}

const TOKENS: [usize; 6] = [16, 128, 512, 2048, 8192, 16384];

fn single() -> Result<()> {
    let gpu = Gpu::new(0)?;
    println!("device: {} ({})", gpu.name(), gpu.arch());
    let mut rng = SplitMix64::new(1);

    // Copy bandwidth ceiling: 1 GiB, bytes read + written.
    let n = 1usize << 30;
    let src = gpu.zeros::<u8>(n)?;
    let mut dst = gpu.zeros::<u8>(n)?;
    let t_kernel = time_us(&gpu, 5, || gpu.copy_kernel(&src, &mut dst))?;
    let t_memcpy = time_us(&gpu, 5, || {
        gpu.stream().memcpy_dtod(&src, &mut dst).map_err(drv)
    })?;
    let copy_bw = 2.0 * n as f64 / t_kernel / 1e3;
    result("copy", "1GiB", 0, "kernel_GBps", copy_bw);
    result(
        "copy",
        "1GiB",
        0,
        "memcpy_GBps",
        2.0 * n as f64 / t_memcpy / 1e3,
    );
    drop((src, dst));

    for sh in shapes() {
        let (h, i, e, k) = (sh.hidden, sh.inter, sh.experts, sh.top_k);
        let s_local = e / sh.ep;
        let w_gate = gpu.upload(&rng.bf16_matrix(e, h, 0.05))?;
        let bias = gpu.upload_slice(&rng.vec_f32(e, -0.01, 0.01))?;
        let bias_opt = (sh.gating.scoring == moe_kernels::Scoring::Sigmoid).then_some(&bias);
        // EP8 map with 32 (resp. 8) redundant slots: slots per rank S = E/ep + E/(8 ep)
        let spr = s_local + (s_local / 8).max(1);
        let topo = EpTopology::new(sh.ep, spr)?;
        let phy2log: Vec<u32> = (0..topo.num_slots()).map(|p| (p % e) as u32).collect();
        let map = DeviceReplicaMap::upload(&gpu, &ReplicaMap::from_phy2log(&phy2log, e)?)?;
        let mut load = gpu.zeros::<u32>(topo.num_slots())?;
        let experts = DeviceExperts::random(&gpu, s_local, h, i, 5, 0.02)?;
        for &t in &TOKENS {
            let mut x = DeviceMatrix {
                rows: t,
                cols: h,
                buf: gpu.zeros::<bf16>(t * h)?,
            };
            gpu.fill_uniform(&mut x.buf, 3, 1.0)?;
            let tr = time_us(&gpu, 10, || gpu.router_logits(&x, &w_gate).map(|_| ()))?;
            result("kernel", sh.name, t, "router_us", tr);
            let logits = gpu.router_logits(&x, &w_gate)?;
            let tg = time_us(&gpu, 10, || {
                gpu.gating_topk(&logits, &sh.gating, bias_opt).map(|_| ())
            })?;
            result("kernel", sh.name, t, "gating_us", tg);
            let topk = gpu.gating_topk(&logits, &sh.gating, bias_opt)?;
            let tm = time_us(&gpu, 10, || {
                let p = gpu.map_to_physical(&topk, &map, 0, &mut load)?;
                gpu.dispatch_layout(&p, t, k, topo).map(|_| ())
            })?;
            result("kernel", sh.name, t, "map_layout_us", tm);
            let phys = gpu.map_to_physical(&topk, &map, 0, &mut load)?;
            let layout = gpu.dispatch_layout(&phys, t, k, topo)?;
            let mut send = gpu.alloc_matrix::<bf16>(t * k, h)?;
            let perm = layout.perm.slice(..t * k);
            let tgat = time_us(&gpu, 10, || {
                gpu.gather_rows_into(&x, &perm, k as u32, &mut send)
            })?;
            result("kernel", sh.name, t, "permute_gather_us", tgat);
            let tp = time_us(&gpu, 10, || gpu.permute_into(&x, &layout, &mut send))?;
            // fewest bytes: each token row read once, each send row written once
            let bytes_p = ((t + t * k) * h * 2) as f64;
            result("kernel", sh.name, t, "permute_us", tp);
            result("kernel", sh.name, t, "permute_GBps", bytes_p / tp / 1e3);
            let mut out = gpu.alloc_matrix::<bf16>(t, h)?;
            let tc = time_us(&gpu, 10, || {
                gpu.unpermute_combine_into(&send, &layout.inv, &topk.weights, t, k, &mut out)
            })?;
            let bytes_c = ((t * k * h + t * h) * 2 + t * k * 8) as f64;
            result("kernel", sh.name, t, "combine_us", tc);
            result("kernel", sh.name, t, "combine_GBps", bytes_c / tc / 1e3);
            // expert FFN of one EP rank: T*k rows (average receive) over the local experts
            let rows = t * k;
            let mut gu = DeviceMatrix {
                rows,
                cols: 2 * i,
                buf: gpu.zeros::<bf16>(rows * 2 * i)?,
            };
            gpu.fill_uniform(&mut gu.buf, 9, 4.0)?;
            let ts = time_us(&gpu, 10, || gpu.silu_and_mul(&gu).map(|_| ()))?;
            result("kernel", sh.name, t, "silu_us", ts);
            result(
                "kernel",
                sh.name,
                t,
                "silu_GBps",
                (rows * 3 * i * 2) as f64 / ts / 1e3,
            );
            drop(gu);
            let offsets = skewed_offsets(rows, s_local);
            let flops = 6.0 * (rows * h * i) as f64;
            for (name, st) in [
                ("loop", FfnStrategy::Loop),
                ("serial_loop", FfnStrategy::SerialLoop),
                ("grouped", FfnStrategy::Grouped),
                ("auto", FfnStrategy::default()),
            ] {
                let tf = time_us(&gpu, 3, || {
                    experts.ffn(&gpu, &send, &offsets, st).map(|_| ())
                })?;
                result("ffn", sh.name, t, &format!("{name}_us"), tf);
                result(
                    "ffn",
                    sh.name,
                    t,
                    &format!("{name}_TFLOPs"),
                    flops / tf / 1e6,
                );
            }
        }
        gpu.synchronize()?;
    }

    // Loop / grouped crossover: uniform rows per expert.
    for sh in shapes() {
        let (h, i) = (sh.hidden, sh.inter);
        let s_local = sh.experts / sh.ep;
        let experts = DeviceExperts::random(&gpu, s_local, h, i, 6, 0.02)?;
        for per in [8usize, 16, 32, 64, 96, 128, 192, 256] {
            let rows = per * s_local;
            let mut x = DeviceMatrix {
                rows,
                cols: h,
                buf: gpu.zeros::<bf16>(rows * h)?,
            };
            gpu.fill_uniform(&mut x.buf, 8, 1.0)?;
            let offsets: Vec<u32> = (0..=s_local).map(|e| (e * per) as u32).collect();
            for (name, st) in [
                ("loop", FfnStrategy::Loop),
                ("grouped", FfnStrategy::Grouped),
            ] {
                let tf = time_us(&gpu, 3, || experts.ffn(&gpu, &x, &offsets, st).map(|_| ()))?;
                result("crossover", sh.name, per, &format!("{name}_us"), tf);
            }
        }
    }

    // Whole layer on one GPU (EP1: all experts local).
    for sh in shapes() {
        let (h, i, e) = (sh.hidden, sh.inter, sh.experts);
        let topo = EpTopology::new(1, e)?;
        let map = ReplicaMap::identity(e)?;
        let w_gate = rng.bf16_matrix(e, h, 0.05);
        let bias = rng.vec_f32(e, -0.01, 0.01);
        let bias_opt = (sh.gating.scoring == moe_kernels::Scoring::Sigmoid).then_some(&bias[..]);
        let experts = DeviceExperts::random(&gpu, e, h, i, 77, 0.02)?;
        let mut layer = EpLayer::new(&gpu, &w_gate, sh.gating, bias_opt, &map, topo, 0, experts)?;
        for &t in &TOKENS {
            let mut x = DeviceMatrix {
                rows: t,
                cols: h,
                buf: gpu.zeros::<bf16>(t * h)?,
            };
            gpu.fill_uniform(&mut x.buf, 4, 1.0)?;
            let tl = time_us(&gpu, 3, || layer.forward(&gpu, None, &x, 0).map(|_| ()))?;
            result("layer1", sh.name, t, "layer_us", tl);
        }
        drop(layer);
        gpu.synchronize()?;
    }
    Ok(())
}

/// Per-rank closure runner: one thread per GPU; returns rank 0's value.
fn on_ranks<T: Send>(
    gpus: &[Gpu],
    comms: &[EpComm],
    f: impl Fn(usize, &Gpu, &EpComm) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    struct C<'a>(&'a EpComm);
    // SAFETY: each communicator is used by exactly one thread.
    unsafe impl Send for C<'_> {}
    std::thread::scope(|sc| {
        let hs: Vec<_> = comms
            .iter()
            .enumerate()
            .map(|(r, c)| {
                let c = C(c);
                let f = &f;
                let gpu = &gpus[r];
                sc.spawn(move || {
                    let c = c;
                    f(r, gpu, c.0)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(KernelError::Invalid("rank thread panicked".into())))
            })
            .collect()
    })
}

fn multi() -> Result<()> {
    let n = cuda::available()?;
    if n < 2 || !cuda::nccl_available() {
        println!("SKIPPED: multi-GPU benchmark needs 2 GPUs and NCCL (found {n})");
        return Ok(());
    }
    let all: Vec<Gpu> = (0..n).map(Gpu::new).collect::<Result<_>>()?;
    println!("devices: {} x {}", n, all[0].name());

    // NCCL send/recv reference between GPU 0 and 1, 1 GiB, one direction.
    let pair = &all[..2];
    let comms = EpComm::for_streams(pair.iter().map(|g| g.stream().clone()).collect())?;
    let elems = 1usize << 29;
    let r = on_ranks(pair, &comms, |rank, gpu, comm| {
        let mut buf = gpu.zeros::<bf16>(elems)?;
        time_us(gpu, 5, || {
            if rank == 0 {
                comm.send(&buf, 1)
            } else {
                comm.recv(&mut buf, 0)
            }
        })
    })?;
    let sendrecv = (elems * 2) as f64 / r[0] / 1e3;
    result("nccl", "sendrecv", 2, "GBps", sendrecv);
    // the same at the size of one DeepSeek-V3 expert (3 * 7168 * 2048 bf16 = 88 MB)
    let e88 = 3 * 7168 * 2048;
    let r = on_ranks(pair, &comms, |rank, gpu, comm| {
        let mut buf = gpu.zeros::<bf16>(e88)?;
        time_us(gpu, 5, || {
            if rank == 0 {
                comm.send(&buf, 1)
            } else {
                comm.recv(&mut buf, 0)
            }
        })
    })?;
    result(
        "nccl",
        "sendrecv_88MB",
        2,
        "GBps",
        (e88 * 2) as f64 / r[0] / 1e3,
    );

    // Uneven all-to-all, G = 2 and (if present) 4 ranks; hidden 7168 rows.
    for g in [2usize, 4] {
        if g > n {
            continue;
        }
        let gpus = &all[..g];
        let comms = EpComm::for_streams(gpus.iter().map(|x| x.stream().clone()).collect())?;
        for tokens in [512usize, 4096, 16384] {
            let h = 7168;
            // rank r sends to p: tokens * 8 / g * (0.5 .. 1.5) rows, skewed
            let cnt = |r: usize, p: usize| -> u32 {
                let base = tokens * 8 / g;
                (base as f64 * (0.5 + ((r * 3 + p * 5) % g) as f64 / (g - 1).max(1) as f64)) as u32
            };
            let times = on_ranks(gpus, &comms, |rank, gpu, comm| {
                let send_rows: Vec<u32> = (0..g).map(|p| cnt(rank, p)).collect();
                let recv_rows: Vec<u32> = (0..g).map(|s| cnt(s, rank)).collect();
                let st = send_rows.iter().sum::<u32>() as usize;
                let rt = recv_rows.iter().sum::<u32>() as usize;
                let mut send = DeviceMatrix {
                    rows: st,
                    cols: h,
                    buf: gpu.zeros::<bf16>(st * h)?,
                };
                gpu.fill_uniform(&mut send.buf, rank as u32, 1.0)?;
                let mut recv = gpu.alloc_matrix::<bf16>(rt, h)?;
                let t = time_us(gpu, 5, || {
                    comm.all_to_all_rows(&send, &send_rows, &mut recv, &recv_rows)
                })?;
                let off_rank: u64 = (0..g)
                    .filter(|&p| p != rank)
                    .map(|p| send_rows[p] as u64)
                    .sum();
                Ok((t, off_rank as f64 * h as f64 * 2.0))
            })?;
            let tmax = times.iter().map(|x| x.0).fold(0.0, f64::max);
            let bytes_max = times.iter().map(|x| x.1).fold(0.0, f64::max);
            result("a2a", &format!("G{g}"), tokens, "us", tmax);
            result(
                "a2a",
                &format!("G{g}"),
                tokens,
                "GBps_per_rank",
                bytes_max / tmax / 1e3,
            );
        }
    }

    // Weight movement of one DeepSeek-V3 expert (H 7168, I 2048: 88 MB).
    let (h, i) = (7168, 2048);
    let src = DeviceExperts::random(&all[0], 2, h, i, 1, 0.02)?;
    let mut dst = DeviceExperts::random(&all[1], 2, h, i, 2, 0.02)?;
    let bytes = src.slot_bytes() as f64;
    all[0].synchronize()?;
    all[1].synchronize()?;
    let mut staging = dst.new_staging(&all[1])?;
    // without pool access (only context peer access may be missing too)
    let t_nopeer = time_us(&all[1], 3, || {
        let ev = src.copy_slot_to_peer(1, &all[1], &mut staging)?;
        all[1].stream().wait(&ev).map_err(drv)
    })?;
    result(
        "weights",
        "peer_copy_no_access",
        1,
        "GBps",
        bytes / t_nopeer / 1e3,
    );
    cuda::enable_peer_access(&[&all[0], &all[1]])?;
    let t_peer = time_us(&all[1], 5, || {
        let ev = src.copy_slot_to_peer(1, &all[1], &mut staging)?;
        all[1].stream().wait(&ev).map_err(drv)
    })?;
    result("weights", "peer_copy", 1, "GBps", bytes / t_peer / 1e3);
    let t_commit = time_us(&all[1], 5, || {
        dst.commit_staging(&all[1], &staging, 0, None)
    })?;
    result("weights", "commit_staging", 1, "us", t_commit);
    let side = EpComm::for_streams(vec![
        all[0].side_stream().clone(),
        all[1].side_stream().clone(),
    ])?;
    struct Both<'a>(
        &'a DeviceExperts,
        std::sync::Mutex<&'a mut cuda::ExpertStaging>,
    );
    let both = Both(&src, std::sync::Mutex::new(&mut staging));
    let r = on_ranks(&all[..2], &side, |rank, gpu, comm| {
        let s = gpu.side_stream();
        // only rank 1 touches the staging buffer (rank 0 must not hold the lock while sending)
        let mut guard = if rank == 1 {
            Some(
                both.1
                    .lock()
                    .map_err(|_| KernelError::Invalid("lock".into()))?,
            )
        } else {
            None
        };
        let mut step = || -> Result<()> {
            match guard.as_mut() {
                Some(st) => comm.recv_slot(st, 0),
                None => comm.send_slot(both.0, 1, 1),
            }
        };
        for _ in 0..2 {
            step()?;
        }
        s.synchronize().map_err(drv)?;
        let a = s
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(drv)?;
        for _ in 0..5 {
            step()?;
        }
        let b = s
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(drv)?;
        b.synchronize().map_err(drv)?;
        Ok(a.elapsed_ms(&b).map_err(drv)? as f64 * 1000.0 / 5.0)
    });
    match r {
        Ok(v) => result(
            "weights",
            "nccl_sendrecv_slot",
            1,
            "GBps",
            bytes / v[1] / 1e3,
        ),
        Err(e) => println!("nccl slot transfer failed: {e}"),
    }

    // Whole layer on G GPUs: DeepSeek-V3 shape, E = 256 over G ranks.
    for g in [2usize, 4] {
        if g > n {
            continue;
        }
        let gpus = &all[..g];
        let comms = EpComm::for_streams(gpus.iter().map(|x| x.stream().clone()).collect())?;
        let sh = &shapes()[0];
        let (e, s) = (sh.experts, sh.experts / g);
        let topo = EpTopology::new(g, s)?;
        let map = ReplicaMap::identity(e)?;
        let mut rng = SplitMix64::new(9);
        let w_gate = rng.bf16_matrix(e, sh.hidden, 0.05);
        let bias = rng.vec_f32(e, -0.01, 0.01);
        for tokens in [128usize, 4096] {
            let t = on_ranks(gpus, &comms, |rank, gpu, comm| {
                let experts =
                    DeviceExperts::random(gpu, s, sh.hidden, sh.inter, 100 + rank as u32, 0.02)?;
                let mut layer = EpLayer::new(
                    gpu,
                    &w_gate,
                    sh.gating,
                    Some(&bias),
                    &map,
                    topo,
                    rank,
                    experts,
                )?;
                let mut x = DeviceMatrix {
                    rows: tokens,
                    cols: sh.hidden,
                    buf: gpu.zeros::<bf16>(tokens * sh.hidden)?,
                };
                gpu.fill_uniform(&mut x.buf, 50 + rank as u32, 1.0)?;
                time_us(gpu, 3, || {
                    layer
                        .forward(gpu, Some(comm), &x, (rank * tokens) as u32)
                        .map(|_| ())
                })
            })?;
            let tmax = t.iter().copied().fold(0.0, f64::max);
            result("layerG", &format!("dsv3_G{g}"), tokens, "layer_us", tmax);
        }
    }
    let _ = Matrix::<f32>::zeros(0, 0);
    Ok(())
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "single".into());
    if let Err(e) = cuda::available() {
        println!("SKIPPED: no CUDA driver/GPU found ({e})");
        return;
    }
    let r = match mode.as_str() {
        "single" => single(),
        "multi" => multi(),
        other => Err(KernelError::Invalid(format!(
            "unknown mode {other}; use single or multi"
        ))),
    };
    if let Err(e) = r {
        eprintln!("kernel-bench failed: {e}");
        std::process::exit(1);
    }
}
