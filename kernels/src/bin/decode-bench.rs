//! Decode-step latency of one MoE layer on one GPU at the DeepSeek-V3 layer shape (hidden
//! 7168, 256 routed experts of intermediate 2048, top-8 of 8 groups keeping 4, sigmoid with a
//! correction bias, one shared expert), 1, 8, 32 and 128 tokens: the expert FFN alone (the
//! tokens' routed rows) and the whole layer as `EpLayer::forward` runs it today (router,
//! gating, replica choice, layout, permute, one host round trip for the expert offsets, FFN,
//! shared expert, combine), with bf16 and with FP8 experts. A one-rank group: no all-to-all.
//! Prints `RESULT decode ...` lines and a table.

use moe_kernels::cuda::{
    self, DeviceExperts, DeviceFp8Experts, DeviceMatrix, EpLayer, FfnStrategy, Fp8Compute, Gpu,
    LayerExperts, Router, SharedExperts,
};
use moe_kernels::rng::SplitMix64;
use moe_kernels::{EpTopology, GatingConfig, KernelError, ReplicaMap, Result, bf16};

fn drv(e: cudarc::driver::DriverError) -> KernelError {
    KernelError::Driver(format!("{e:?}"))
}

/// Median of 7 batches of `reps` calls, microseconds per call (device events; the calls
/// include their host work and synchronisations).
fn time_us(gpu: &Gpu, reps: usize, f: impl FnMut() -> Result<()>) -> Result<f64> {
    gpu.time_per_call_us(3, 7, reps, f)
}

/// The layer; the router and biases come from a generator seeded the same way every time,
/// so that the bf16 and FP8 layers route identically.
fn layer(gpu: &Gpu, experts: LayerExperts) -> Result<EpLayer> {
    let (e, h) = (256usize, 7168usize);
    let mut rng = SplitMix64::new(42);
    let w_gate = rng.bf16_matrix(e, h, 0.02);
    let bias = rng.vec_f32(e, -0.05, 0.05);
    let shared = SharedExperts {
        mlp: DeviceExperts::random(gpu, 1, h, 2048, 99, 0.02)?,
        gate: None,
    };
    EpLayer::with_parts(
        gpu,
        Router::Bf16(&w_gate),
        GatingConfig::grouped_sigmoid(e, 8, 8, 4, 2.5),
        None,
        Some(&bias),
        &ReplicaMap::identity(e)?,
        EpTopology::new(1, e)?,
        0,
        experts,
        Some(shared),
    )
}

fn run() -> Result<()> {
    let gpu = Gpu::new(0)?;
    println!("# {} ({})", gpu.name(), gpu.arch());
    let (e, h, i, k) = (256usize, 7168usize, 2048usize, 8usize);
    let mut rng = SplitMix64::new(5);
    let fp8 = DeviceFp8Experts::random(&gpu, e, h, i, 17, 0.02)?;
    let bf = fp8.to_bf16(&gpu)?;
    let native = fp8.native_supported(&gpu);
    let mut l_bf = layer(&gpu, LayerExperts::Bf16(bf))?;
    let compute = if native {
        Fp8Compute::Native
    } else {
        Fp8Compute::Dequant
    };
    let mut l_8 = layer(&gpu, LayerExperts::Fp8(Box::new(fp8), compute))?;
    gpu.synchronize()?;
    let mut table = Vec::new();
    for &t in &[1usize, 8, 32, 128] {
        let mut x = DeviceMatrix {
            rows: t,
            cols: h,
            buf: gpu.zeros::<bf16>(t * h)?,
        };
        gpu.fill_uniform(&mut x.buf, 100 + t as u32, 1.0)?;
        // The experts alone: each token's k distinct experts, rows grouped by expert.
        let mut counts = vec![0u32; e];
        for _ in 0..t {
            let mut chosen = Vec::with_capacity(k);
            while chosen.len() < k {
                let c = rng.below(e as u64) as usize;
                if !chosen.contains(&c) {
                    chosen.push(c);
                }
            }
            for c in chosen {
                counts[c] += 1;
            }
        }
        let mut offsets = vec![0u32; e + 1];
        for j in 0..e {
            offsets[j + 1] = offsets[j] + counts[j];
        }
        let mut rows = DeviceMatrix {
            rows: t * k,
            cols: h,
            buf: gpu.zeros::<bf16>(t * k * h)?,
        };
        gpu.fill_uniform(&mut rows.buf, 200 + t as u32, 1.0)?;
        let reps = 20;
        let ex_bf = time_us(&gpu, reps, || {
            l_bf.experts
                .ffn(&gpu, &rows, &offsets, FfnStrategy::default())
                .map(|_| ())
        })?;
        let ex_8 = time_us(&gpu, reps, || {
            l_8.experts
                .ffn(&gpu, &rows, &offsets, FfnStrategy::default())
                .map(|_| ())
        })?;
        let la_bf = time_us(&gpu, reps, || l_bf.forward(&gpu, None, &x, 0).map(|_| ()))?;
        let la_8 = time_us(&gpu, reps, || l_8.forward(&gpu, None, &x, 0).map(|_| ()))?;
        // The same step without host round trips (device-offset FFN), eager and replayed
        // from a CUDA graph; numerics against today's path.
        let mut out = gpu.alloc_matrix::<bf16>(t, h)?;
        let la_dev = time_us(&gpu, reps, || l_bf.forward_decode(&gpu, &x, 0, &mut out))?;
        let mut graph = l_bf.capture_decode(&gpu, t, 0)?;
        gpu.stream()
            .memcpy_dtod(&x.buf, &mut graph.x.buf)
            .map_err(drv)?;
        let la_graph = time_us(&gpu, reps, || graph.launch())?;
        let la_dev8 = time_us(&gpu, reps, || l_8.forward_decode(&gpu, &x, 0, &mut out))?;
        let mut graph8 = l_8.capture_decode(&gpu, t, 0)?;
        gpu.stream()
            .memcpy_dtod(&x.buf, &mut graph8.x.buf)
            .map_err(drv)?;
        let la_graph8 = time_us(&gpu, reps, || graph8.launch())?;
        let want = l_bf.forward(&gpu, None, &x, 0)?;
        let a = gpu.download_slice(&graph.out.buf.slice(..t * h))?;
        let b = gpu.download_slice(&want.buf.slice(..t * h))?;
        let (mut num, mut den) = (0f64, 0f64);
        for (p, q) in a.iter().zip(&b) {
            num += (p.to_f64() - q.to_f64()).powi(2);
            den += q.to_f64().powi(2);
        }
        let err = (num / den.max(1e-30)).sqrt();
        let a8 = gpu.download_slice(&graph8.out.buf.slice(..t * h))?;
        let (mut num8, mut den8) = (0f64, 0f64);
        for (p, q) in a8.iter().zip(&b) {
            num8 += (p.to_f64() - q.to_f64()).powi(2);
            den8 += q.to_f64().powi(2);
        }
        let err8 = (num8 / den8.max(1e-30)).sqrt();
        for (m, v) in [
            ("experts_bf16_us", ex_bf),
            ("experts_fp8_us", ex_8),
            ("layer_bf16_us", la_bf),
            ("layer_fp8_us", la_8),
            ("layer_bf16_device_offsets_us", la_dev),
            ("layer_bf16_graph_us", la_graph),
            ("graph_vs_today_rel_err", err),
            ("layer_fp8_device_offsets_us", la_dev8),
            ("layer_fp8_graph_us", la_graph8),
            ("fp8_graph_vs_bf16_layer_rel_err", err8),
        ] {
            println!("RESULT decode dsv3_ep1 {t} {m} {v:.5}");
        }
        table.push((
            t, ex_bf, ex_8, la_bf, la_8, la_dev, la_graph, err, la_graph8, err8,
        ));
    }
    println!();
    println!(
        "| tokens | experts bf16 us | experts FP8 ({compute:?}) us | layer bf16 us | layer FP8 us | layer bf16, no host sync, eager us | layer bf16, CUDA graph us | graph vs today rel. err | layer FP8 (weight-only dequant), CUDA graph us | FP8 graph vs bf16 layer rel. err |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (t, a, b, c, d, e, f, g, i, j) in table {
        println!(
            "| {t} | {a:.0} | {b:.0} | {c:.0} | {d:.0} | {e:.0} | {f:.0} | {g:.1e} | {i:.0} | {j:.1e} |"
        );
    }
    Ok(())
}

fn main() {
    if let Err(e) = cuda::available() {
        println!("SKIPPED: no CUDA driver/GPU found ({e})");
        return;
    }
    if let Err(e) = run() {
        eprintln!("decode-bench failed: {e}");
        std::process::exit(1);
    }
}
