//! FP8 expert FFN benchmark at DeepSeek-V3 expert shapes (hidden 7168, intermediate 2048,
//! 32 local experts): the native FP8 path (activations quantised per 1x128 on the fly,
//! cuBLASLt block-scaled FP8 GEMMs) against the bf16 FFN on the same weights dequantised,
//! 4096-16384 rows per rank, plus the numerics between the two and the bytes one slot moves.
//! Prints `RESULT fp8 ...` lines and a table (docs/benchmarks/gpu-fp8.md).

use moe_kernels::cuda::{self, DeviceFp8Experts, DeviceMatrix, FfnStrategy, Fp8Compute, Gpu};
use moe_kernels::rng::SplitMix64;
use moe_kernels::{KernelError, Result, bf16};

fn drv(e: cudarc::driver::DriverError) -> KernelError {
    KernelError::Driver(format!("{e:?}"))
}

/// Median of 5 batches of `reps` calls, microseconds per call (device events).
fn time_us(gpu: &Gpu, reps: usize, f: impl FnMut() -> Result<()>) -> Result<f64> {
    gpu.time_per_call_us(2, 5, reps, f)
}

fn rel_fro(a: &[bf16], b: &[bf16]) -> f64 {
    let (mut e, mut n) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        e += (x.to_f64() - y.to_f64()).powi(2);
        n += y.to_f64().powi(2);
    }
    (e / n.max(1e-30)).sqrt()
}

fn run() -> Result<()> {
    let gpu = Gpu::new(0)?;
    println!("# {} ({})", gpu.name(), gpu.arch());
    for l in cuda::probe_block_scaled(&gpu)? {
        println!("# {l}");
    }
    let (slots, h, i) = (32usize, 7168usize, 2048usize);
    let mut fp8 = DeviceFp8Experts::random(&gpu, slots, h, i, 7, 0.02)?;
    let bf = fp8.to_bf16(&gpu)?;
    gpu.synchronize()?;
    if !fp8.native_supported(&gpu) {
        return Err(KernelError::Invalid(format!(
            "native FP8 needs a Hopper GPU; this is {}",
            gpu.arch()
        )));
    }
    let mut rng = SplitMix64::new(3);
    let mut rows_tbl = Vec::new();
    for &r in &[4096usize, 8192, 16384] {
        // rows spread over the experts at random (as a balanced router would)
        let mut counts = vec![0u32; slots];
        for _ in 0..r {
            counts[rng.below(slots as u64) as usize] += 1;
        }
        let mut offsets = vec![0u32; slots + 1];
        for e in 0..slots {
            offsets[e + 1] = offsets[e] + counts[e];
        }
        let mut x = DeviceMatrix {
            rows: r,
            cols: h,
            buf: gpu.zeros::<bf16>(r * h)?,
        };
        gpu.fill_uniform(&mut x.buf, 11 + r as u32, 1.0)?;
        let flop = 2.0 * r as f64 * (2.0 * i as f64 * h as f64 + h as f64 * i as f64);
        let t_loop = time_us(&gpu, 5, || {
            bf.ffn(&gpu, &x, &offsets, FfnStrategy::Loop).map(|_| ())
        })?;
        let t_grouped = time_us(&gpu, 5, || {
            bf.ffn(&gpu, &x, &offsets, FfnStrategy::Grouped).map(|_| ())
        })?;
        let t_fp8 = time_us(&gpu, 5, || {
            fp8.ffn(&gpu, &x, &offsets, Fp8Compute::Native).map(|_| ())
        })?;
        let t_bf16 = t_loop.min(t_grouped);
        let y8 = fp8.ffn(&gpu, &x, &offsets, Fp8Compute::Native)?;
        let yb = bf.ffn(&gpu, &x, &offsets, FfnStrategy::Loop)?;
        let a = gpu.download_slice(&y8.buf.slice(..r * h))?;
        let b = gpu.download_slice(&yb.buf.slice(..r * h))?;
        let err = rel_fro(&a, &b);
        let nan = a.iter().filter(|v| !v.to_f32().is_finite()).count();
        for (m, v) in [
            ("bf16_loop_us", t_loop),
            ("bf16_grouped_us", t_grouped),
            ("fp8_us", t_fp8),
            ("fp8_tflops", flop / t_fp8 / 1e6),
            ("bf16_tflops", flop / t_bf16 / 1e6),
            ("speedup", t_bf16 / t_fp8),
            ("rel_err_vs_bf16", err),
            ("nonfinite", nan as f64),
        ] {
            println!("RESULT fp8 dsv3_32experts {r} {m} {v:.4}");
        }
        rows_tbl.push((r, t_loop, t_grouped, t_fp8, flop, err));
    }
    // One slot's weight movement: a device-local copy into a staging buffer (what a remap's
    // local copy does; the NCCL transfer moves the same bytes).
    let mut st8 = fp8.alloc_staging(&gpu)?;
    let t8 = time_us(&gpu, 10, || {
        fp8.copy_slot_to_staging(gpu.stream(), 3, &mut st8)
    })?;
    let mut stb = bf.alloc_staging(&gpu)?;
    let (ea, eb) = bf.slot_elems();
    let tb = time_us(&gpu, 10, || {
        let s = gpu.stream();
        s.memcpy_dtod(&bf.w1.slice(3 * ea..4 * ea), &mut stb.w1)
            .map_err(drv)?;
        s.memcpy_dtod(&bf.w2.slice(3 * eb..4 * eb), &mut stb.w2)
            .map_err(drv)
    })?;
    let (b8, bb) = (fp8.slot_bytes() as f64, bf.slot_bytes() as f64);
    println!("RESULT fp8 slot_copy fp8_bytes {b8}");
    println!("RESULT fp8 slot_copy bf16_bytes {bb}");
    println!("RESULT fp8 slot_copy fp8_us {t8:.2}");
    println!("RESULT fp8 slot_copy bf16_us {tb:.2}");
    println!();
    println!(
        "| rows/rank | bf16 loop ms | bf16 grouped ms | FP8 ms | bf16 TFLOP/s | FP8 TFLOP/s | speed-up | FP8 vs bf16 rel. err |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (r, tl, tg, t8, flop, err) in rows_tbl {
        let tbf = tl.min(tg);
        println!(
            "| {r} | {:.3} | {:.3} | {:.3} | {:.0} | {:.0} | {:.2}x | {err:.2e} |",
            tl / 1e3,
            tg / 1e3,
            t8 / 1e3,
            flop / tbf / 1e6,
            flop / t8 / 1e6,
            tbf / t8
        );
    }
    println!(
        "| slot copy | bf16 {:.1} MB in {:.0} us ({:.0} GB/s) | FP8 {:.1} MB in {:.0} us ({:.0} GB/s) |",
        bb / 1e6,
        tb,
        bb / tb / 1e3,
        b8 / 1e6,
        t8,
        b8 / t8 / 1e3
    );
    Ok(())
}

fn main() {
    if let Err(e) = cuda::available() {
        println!("SKIPPED: no CUDA driver/GPU found ({e})");
        return;
    }
    if let Err(e) = run() {
        eprintln!("fp8-bench failed: {e}");
        std::process::exit(1);
    }
}
