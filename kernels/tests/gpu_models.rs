//! GPU tests of the real-model semantics and the FP8 experts, against the CPU references.
//! Without a GPU each test prints "SKIPPED: ..." and passes.
//!
//! Tolerances:
//! * gating (gpt-oss softmax over the top-k, DeepSeek-V2 max group score, router and
//!   correction biases, scaling): identical ids; weights within 1e-5 relative
//! * fp32 routers: |d| <= 1e-4 (1 + |ref|) (fp32 GEMM, different summation order)
//! * shared-expert gate: within 1e-5; combine with shared experts: at most 1 bf16 ulp
//! * FP8 activation quantisation and weight dequantisation: bit for bit
//! * FP8 FFN, dequantised weights: relative Frobenius error <= 1e-2 against the CPU FFN on
//!   the CPU's dequantised weights (as the bf16 FFN test)
//! * FP8 FFN, native (activations quantised per 1x128): <= 1e-2 against the same quantised
//!   operands with fp64 accumulation (`moe_kernels::fp8::expert_ffn_native`), and <= 6e-2
//!   against the CPU's bf16 FFN on dequantised weights (E4M3 keeps 3 mantissa bits: each
//!   activation is rounded by up to 2^-4 relative)

#![allow(clippy::needless_range_loop)]

use moe_kernels::cuda::{self, DeviceFp8Experts, DeviceMatrix, Fp8Compute, Gpu};
use moe_kernels::fp8::{self, Fp8Expert};
use moe_kernels::rng::SplitMix64;
use moe_kernels::{
    Bf16Matrix, ExpertWeights, GatingConfig, GroupScore, Matrix, Scoring, bf16, cpu,
};

fn skip(msg: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {msg}");
}

fn gpu_or_skip() -> Option<Gpu> {
    match cuda::available() {
        Err(e) => {
            skip(&format!("no CUDA driver/GPU found ({e})"));
            None
        }
        Ok(_) => Some(Gpu::new(0).expect("open GPU")),
    }
}

fn rel_fro(a: &Bf16Matrix, b: &Bf16Matrix) -> f64 {
    assert_eq!((a.rows(), a.cols()), (b.rows(), b.cols()));
    let (mut e, mut n) = (0f64, 0f64);
    for (x, y) in a.as_slice().iter().zip(b.as_slice()) {
        e += (x.to_f64() - y.to_f64()).powi(2);
        n += y.to_f64().powi(2);
    }
    (e / n.max(1e-30)).sqrt()
}

fn ulps(a: bf16, b: bf16) -> u32 {
    let (x, y) = (a.to_bits() as i32, b.to_bits() as i32);
    let m = |v: i32| if v & 0x8000 != 0 { -(v & 0x7fff) } else { v };
    (m(x) - m(y)).unsigned_abs()
}

fn check_gating(
    gpu: &Gpu,
    logits: &Matrix<f32>,
    cfg: &GatingConfig,
    lbias: Option<&[f32]>,
    bias: Option<&[f32]>,
) {
    let mut biased = logits.clone();
    if let Some(b) = lbias {
        for r in 0..biased.rows() {
            biased
                .row_mut(r)
                .iter_mut()
                .zip(b)
                .for_each(|(v, b)| *v += b);
        }
    }
    let want = cpu::gating_topk(&biased, cfg, bias).unwrap();
    let dl = gpu.upload(logits).unwrap();
    let db = bias.map(|b| gpu.upload_slice(b).unwrap());
    let dlb = lbias.map(|b| gpu.upload_slice(b).unwrap());
    let got = gpu
        .gating_topk_with(&dl, cfg, dlb.as_ref(), db.as_ref())
        .unwrap();
    let n = want.tokens * want.k;
    let ids = gpu.download_slice(&got.ids.slice(..n)).unwrap();
    let w = gpu.download_slice(&got.weights.slice(..n)).unwrap();
    assert_eq!(ids, want.ids, "gating ids {cfg:?}");
    for (g, c) in w.iter().zip(&want.weights) {
        assert!(
            (g - c).abs() <= 1e-5 * (1.0 + c.abs()),
            "weight {g} vs {c} {cfg:?}"
        );
    }
}

#[test]
fn real_model_gating_matches_cpu() {
    let Some(gpu) = gpu_or_skip() else { return };
    let mut rng = SplitMix64::new(21);
    for &(t, e) in &[(300usize, 64usize), (77, 16), (33, 256), (5, 8)] {
        let logits = Matrix::from_vec(t, e, rng.vec_f32(t * e, -3.0, 3.0)).unwrap();
        let lbias = rng.vec_f32(e, -0.5, 0.5);
        let bias = rng.vec_f32(e, -0.1, 0.1);
        let k = e.min(4);
        // gpt-oss: softmax over the top-k logits, router bias on the logits, no renormalise
        let mut oss = GatingConfig::softmax(e, k, false);
        oss.scoring = Scoring::SoftmaxTopK;
        check_gating(&gpu, &logits, &oss, None, None);
        check_gating(&gpu, &logits, &oss, Some(&lbias), None);
        // Qwen2-MoE: softmax, top-k, no renormalise; Mixtral/Qwen3: renormalise
        check_gating(
            &gpu,
            &logits,
            &GatingConfig::softmax(e, k, false),
            None,
            None,
        );
        check_gating(
            &gpu,
            &logits,
            &GatingConfig::softmax(e, k, true),
            None,
            None,
        );
        if e % 8 == 0 && e >= 16 {
            let g = 8;
            // DeepSeek-V2: softmax, groups scored by their max, factor 16, no renormalise
            let mut v2 = GatingConfig::softmax(e, k, false);
            v2.num_groups = g;
            v2.topk_groups = 3;
            v2.group_score = GroupScore::Max;
            v2.routed_scaling_factor = 16.0;
            check_gating(&gpu, &logits, &v2, None, None);
            // DeepSeek-V3: sigmoid + correction bias, top-2 group sum, renormalise, 2.5
            let v3 = GatingConfig::grouped_sigmoid(e, k, g, 4, 2.5);
            check_gating(&gpu, &logits, &v3, None, Some(&bias));
            let mut v3n = v3;
            v3n.renormalize = false;
            check_gating(&gpu, &logits, &v3n, None, Some(&bias));
        }
    }
}

#[test]
fn fp32_router_logits_match_cpu() {
    let Some(gpu) = gpu_or_skip() else { return };
    let mut rng = SplitMix64::new(22);
    for &(t, h, e) in &[(77, 256, 64), (1, 7168, 256), (0, 64, 8)] {
        let x = rng.bf16_matrix(t, h, 1.0);
        let w = Matrix::from_vec(e, h, rng.vec_f32(e * h, -0.1, 0.1)).unwrap();
        let want = cpu::router_logits_f32(&x, &w).unwrap();
        let got = gpu
            .router_logits_f32(&gpu.upload(&x).unwrap(), &gpu.upload(&w).unwrap())
            .unwrap()
            .download(&gpu)
            .unwrap();
        assert_eq!(got.rows(), t);
        for (g, w) in got.as_slice().iter().zip(want.as_slice()) {
            assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{g} vs {w}");
        }
    }
}

#[test]
fn combine_with_shared_experts_matches_cpu() {
    let Some(gpu) = gpu_or_skip() else { return };
    let mut rng = SplitMix64::new(23);
    for &(t, k, h) in &[(50usize, 4usize, 256usize), (7, 2, 100), (1, 8, 7168)] {
        let y = rng.bf16_matrix(t * k, h, 1.0);
        let shared = rng.bf16_matrix(t, h, 1.0);
        let x = rng.bf16_matrix(t, h, 1.0);
        let gw = rng.vec_f32(h, -0.05, 0.05);
        let w = rng.vec_f32(t * k, 0.0, 1.0);
        // a random permutation of the rows
        let mut inv: Vec<u32> = (0..(t * k) as u32).collect();
        for i in (1..inv.len()).rev() {
            inv.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let dx = gpu.upload(&x).unwrap();
        let dg = gpu
            .shared_gate(&dx, &gpu.upload_slice(&gw).unwrap())
            .unwrap();
        let g = gpu.download_slice(&dg.slice(..t)).unwrap();
        for tok in 0..t {
            let z: f32 = x
                .row(tok)
                .iter()
                .zip(&gw)
                .map(|(a, b)| a.to_f32() * b)
                .sum();
            let want = 1.0 / (1.0 + (-z).exp());
            assert!((g[tok] - want).abs() <= 1e-5, "gate {} vs {want}", g[tok]);
        }
        for gated in [false, true] {
            let mut out = gpu.alloc_matrix::<bf16>(t, h).unwrap();
            let ds = gpu.upload(&shared).unwrap();
            gpu.unpermute_combine_shared_into(
                &gpu.upload(&y).unwrap(),
                &gpu.upload_slice(&inv).unwrap(),
                &gpu.upload_slice(&w).unwrap(),
                t,
                k,
                Some((&ds, gated.then_some(&dg))),
                &mut out,
            )
            .unwrap();
            let got = out.download(&gpu).unwrap();
            for tok in 0..t {
                let gt = if gated { g[tok] } else { 1.0 };
                for c in 0..h {
                    let mut acc = 0f32;
                    for j in 0..k {
                        acc = w[tok * k + j]
                            .mul_add(y.row(inv[tok * k + j] as usize)[c].to_f32(), acc);
                    }
                    acc = gt.mul_add(shared.row(tok)[c].to_f32(), acc);
                    let d = ulps(got.row(tok)[c], bf16::from_f32(acc));
                    assert!(d <= 1, "token {tok} col {c}: {d} ulps");
                }
            }
        }
    }
}

fn random_fp8_experts(rng: &mut SplitMix64, n: usize, h: usize, i: usize) -> Vec<Fp8Expert> {
    (0..n)
        .map(|_| {
            let a = 1.0 / (h as f32).sqrt();
            let b = 1.0 / (i as f32).sqrt();
            [
                fp8::quantize_weight(i, h, &rng.vec_f32(i * h, -a, a)),
                fp8::quantize_weight(i, h, &rng.vec_f32(i * h, -a, a)),
                fp8::quantize_weight(h, i, &rng.vec_f32(h * i, -b, b)),
            ]
        })
        .collect()
}

fn dequantized(e: &Fp8Expert) -> ExpertWeights {
    let (h, i) = (e[0].cols, e[0].rows);
    let mut w1 = fp8::dequantize_bf16(&e[0]);
    w1.extend(fp8::dequantize_bf16(&e[1]));
    ExpertWeights::new(
        Matrix::from_vec(2 * i, h, w1).unwrap(),
        Matrix::from_vec(h, i, fp8::dequantize_bf16(&e[2])).unwrap(),
    )
    .unwrap()
}

#[test]
fn fp8_activation_quantisation_matches_cpu() {
    let Some(gpu) = gpu_or_skip() else { return };
    if gpu.arch() < "sm_89" {
        skip("FP8 conversion needs sm_89 or newer");
        return;
    }
    let k_major = std::env::var("MOE_FP8_ACT_SCALES").is_ok_and(|v| v == "k-major");
    let mut rng = SplitMix64::new(24);
    let (r, k) = (37usize, 384usize);
    let mut x = rng.bf16_matrix(r, k, 3.0);
    for c in 0..k {
        x.row_mut(5)[c] = bf16::ZERO; // an all-zero row (scale 1)
    }
    let (q, s) = DeviceFp8Experts::quantize_activations(&gpu, &gpu.upload(&x).unwrap()).unwrap();
    let kb = k / 128;
    let ld = r.div_ceil(4) * 4;
    let mut codes = [0u8; 128];
    for row in 0..r {
        let xf: Vec<f32> = x.row(row).iter().map(|v| v.to_f32()).collect();
        for b in 0..kb {
            let sc = fp8::quantize_block(&xf[b * 128..(b + 1) * 128], &mut codes);
            let at = if k_major { row * kb + b } else { b * ld + row };
            assert_eq!(s[at], sc, "row {row} block {b} scale");
            assert_eq!(
                &q[row * k + b * 128..row * k + (b + 1) * 128],
                &codes[..],
                "row {row} block {b} codes"
            );
        }
    }
}

#[test]
fn fp8_dequantisation_and_dequant_ffn_match_cpu() {
    let Some(gpu) = gpu_or_skip() else { return };
    let mut rng = SplitMix64::new(25);
    // I = 160: block rows that do not line up with 128 (the fixture's shape)
    let (h, i) = (256, 160);
    let experts = random_fp8_experts(&mut rng, 3, h, i);
    let mut dev = DeviceFp8Experts::upload(&gpu, &experts).unwrap();
    let host: Vec<ExpertWeights> = experts.iter().map(dequantized).collect();
    for (e, w) in host.iter().enumerate() {
        let (w1, w2) = dev.dequantize_slot(&gpu, e).unwrap();
        assert!(w1 == w.w1.as_slice(), "slot {e} w1 differs");
        assert!(w2 == w.w2.as_slice(), "slot {e} w2 differs");
    }
    let offsets = [0u32, 40, 40, 107];
    let x = rng.bf16_matrix(107, h, 1.0);
    let refs: Vec<&ExpertWeights> = host.iter().collect();
    let want = cpu::expert_ffn(&x, &offsets, &refs).unwrap();
    let got = dev
        .ffn(
            &gpu,
            &gpu.upload(&x).unwrap(),
            &offsets,
            Fp8Compute::Dequant,
        )
        .unwrap()
        .download(&gpu)
        .unwrap();
    let err = rel_fro(&got, &want);
    println!("fp8 dequant ffn: rel err {err:.2e}");
    assert!(err <= 1e-2, "{err}");
    // the same weights as a bf16 device copy
    let bf = dev.to_bf16(&gpu).unwrap();
    for e in 0..3 {
        let w = bf.download_slot(&gpu, e).unwrap();
        assert!(w.w1 == host[e].w1 && w.w2 == host[e].w2, "to_bf16 slot {e}");
    }
}

#[test]
fn fp8_native_ffn_matches_reference() {
    let Some(gpu) = gpu_or_skip() else { return };
    let mut rng = SplitMix64::new(26);
    let (h, i) = (512, 256);
    let experts = random_fp8_experts(&mut rng, 4, h, i);
    let mut dev = DeviceFp8Experts::upload(&gpu, &experts).unwrap();
    if !dev.native_supported(&gpu) {
        skip(&format!(
            "native FP8 GEMMs need a Hopper GPU, this is {}",
            gpu.arch()
        ));
        return;
    }
    let offsets = [0u32, 0, 5, 135, 168];
    let r = 168;
    let x = rng.bf16_matrix(r, h, 1.0);
    let got = dev
        .ffn(&gpu, &gpu.upload(&x).unwrap(), &offsets, Fp8Compute::Native)
        .unwrap()
        .download(&gpu)
        .unwrap();
    let host: Vec<ExpertWeights> = experts.iter().map(dequantized).collect();
    let refs: Vec<&ExpertWeights> = host.iter().collect();
    let bf16_ref = cpu::expert_ffn(&x, &offsets, &refs).unwrap();
    let mut sim = Vec::with_capacity(r * h);
    for e in 0..4 {
        let (a, b) = (offsets[e] as usize, offsets[e + 1] as usize);
        let xe = Matrix::from_vec(b - a, h, x.rows_slice(a, b).to_vec()).unwrap();
        sim.extend_from_slice(fp8::expert_ffn_native(&xe, &experts[e]).as_slice());
    }
    let sim = Matrix::from_vec(r, h, sim).unwrap();
    let e_sim = rel_fro(&got, &sim);
    let e_bf = rel_fro(&got, &bf16_ref);
    let e_sim_bf = rel_fro(&sim, &bf16_ref);
    println!(
        "fp8 native ffn: rel err {e_sim:.2e} vs the quantised-operand reference, {e_bf:.2e} vs \
         the bf16 FFN on dequantised weights (the reference itself: {e_sim_bf:.2e})"
    );
    assert!(e_sim <= 1e-2, "{e_sim}");
    assert!(e_bf <= 6e-2, "{e_bf}");
    // a second call reuses the cached algorithms and gives the same result
    let again = dev
        .ffn(&gpu, &gpu.upload(&x).unwrap(), &offsets, Fp8Compute::Native)
        .unwrap()
        .download(&gpu)
        .unwrap();
    assert!(again.as_slice() == got.as_slice());
    let _unused: Option<DeviceMatrix<bf16>> = None;
}

#[test]
fn decode_step_without_host_sync_and_its_graph_match_the_layer() {
    use moe_kernels::cuda::{DeviceExperts, EpLayer, LayerExperts, Router, SharedExperts};
    use moe_kernels::{EpTopology, ReplicaMap};
    let Some(gpu) = gpu_or_skip() else { return };
    let mut rng = SplitMix64::new(27);
    let (e, h, i, k) = (16usize, 256usize, 128usize, 4usize);
    let experts: Vec<ExpertWeights> = (0..e)
        .map(|_| {
            ExpertWeights::new(rng.bf16_matrix(2 * i, h, 0.05), rng.bf16_matrix(h, i, 0.05))
                .unwrap()
        })
        .collect();
    let shared =
        ExpertWeights::new(rng.bf16_matrix(2 * i, h, 0.05), rng.bf16_matrix(h, i, 0.05)).unwrap();
    let w_gate = rng.bf16_matrix(e, h, 0.1);
    let gate = rng.vec_f32(h, -0.05, 0.05);
    let mut layer = EpLayer::with_parts(
        &gpu,
        Router::Bf16(&w_gate),
        GatingConfig::softmax(e, k, false),
        None,
        None,
        &ReplicaMap::identity(e).unwrap(),
        EpTopology::new(1, e).unwrap(),
        0,
        LayerExperts::Bf16(DeviceExperts::upload(&gpu, &experts).unwrap()),
        Some(SharedExperts {
            mlp: DeviceExperts::upload(&gpu, &[shared]).unwrap(),
            gate: Some(gpu.upload_slice(&gate).unwrap()),
        }),
    )
    .unwrap();
    for t in [1usize, 5, 40] {
        let x = rng.bf16_matrix(t, h, 1.0);
        let dx = gpu.upload(&x).unwrap();
        let want = layer
            .forward(&gpu, None, &dx, 0)
            .unwrap()
            .download(&gpu)
            .unwrap();
        let mut out = gpu.alloc_matrix::<bf16>(t, h).unwrap();
        layer.forward_decode(&gpu, &dx, 0, &mut out).unwrap();
        let eager = out.download(&gpu).unwrap();
        // the graph reads the buffer it was captured with: the tokens are copied into it
        let mut graph = layer.capture_decode(&gpu, t, 0).unwrap();
        gpu.stream().memcpy_dtod(&dx.buf, &mut graph.x.buf).unwrap();
        graph.launch().unwrap();
        let replay = graph.out.download(&gpu).unwrap();
        let (e1, e2) = (rel_fro(&eager, &want), rel_fro(&replay, &want));
        println!("decode step, {t} tokens: eager rel err {e1:.2e}, graph {e2:.2e}");
        assert!(e1 <= 1e-2 && e2 <= 1e-2, "{e1} {e2}");
        assert!(
            replay.as_slice() == eager.as_slice(),
            "graph replay differs from the eager step"
        );
    }
}

#[test]
fn fp8_decode_projections_match_the_dequantised_ffn() {
    let Some(gpu) = gpu_or_skip() else { return };
    let mut rng = SplitMix64::new(28);
    let (h, i) = (256, 384);
    let experts = random_fp8_experts(&mut rng, 6, h, i);
    let mut dev = DeviceFp8Experts::upload(&gpu, &experts).unwrap();
    // an empty expert, 1 to 17 rows per expert (up to three 8-row chunks, the last of one
    // row); H = 256 and I = 384 give both an even and an odd count of 128-wide K blocks
    let offsets = [0u32, 3, 3, 14, 15, 20, 37];
    let x = rng.bf16_matrix(37, h, 1.0);
    let dx = gpu.upload(&x).unwrap();
    let want = dev
        .ffn(&gpu, &dx, &offsets, Fp8Compute::Dequant)
        .unwrap()
        .download(&gpu)
        .unwrap();
    let got = dev
        .ffn_device_offsets(&gpu, &dx, &gpu.upload_slice(&offsets).unwrap())
        .unwrap()
        .download(&gpu)
        .unwrap();
    let err = rel_fro(&got, &want);
    println!("fp8 decode projections: rel err {err:.2e} against the dequantised FFN");
    assert!(err <= 1e-2, "{err}");
}
