//! FP8 E4M3 references: the format's encoding and decoding, DeepSeek-V3's 128x128 weight
//! blocks and 1x128 activation blocks, and the FFN the GPU's native FP8 path computes (for
//! its tests: same quantised operands, fp64 accumulation).
//!
//! E4M3 here is `e4m3fn`: bias 7, no infinities, `S.1111.111` is NaN, largest finite 448.
//! Encoding rounds to nearest even and saturates to +-448 (the hardware's `satfinite`).

use crate::error::{Result, invalid};
use crate::tensor::{Bf16Matrix, Matrix};
use half::bf16;

/// One FP8 projection as stored in a checkpoint: `[rows, cols]` E4M3 codes and the
/// `[ceil(rows/128) * ceil(cols/128)]` row-major `weight_scale_inv` (multiplicative).
#[derive(Debug, Clone, PartialEq)]
pub struct Fp8Projection {
    /// Rows (output features).
    pub rows: usize,
    /// Columns (input features).
    pub cols: usize,
    /// `[rows * cols]` E4M3 codes.
    pub codes: Vec<u8>,
    /// `[ceil(rows/128) * ceil(cols/128)]` block scales.
    pub scales: Vec<f32>,
}

impl Fp8Projection {
    pub(crate) fn check(&self, rows: usize, cols: usize, what: &str) -> Result<()> {
        if self.rows != rows
            || self.cols != cols
            || self.codes.len() != rows * cols
            || self.scales.len() != rows.div_ceil(128) * cols.div_ceil(128)
        {
            return invalid(format!(
                "fp8 experts: {what} is [{}, {}] with {} codes and {} scales, expected [{rows}, {cols}] \
                 with 128x128 blocks",
                self.rows,
                self.cols,
                self.codes.len(),
                self.scales.len()
            ));
        }
        Ok(())
    }
}

/// The three projections of one expert (gate `[I, H]`, up `[I, H]`, down `[H, I]`).
pub type Fp8Expert = [Fp8Projection; 3];

/// Largest finite E4M3 value.
pub const E4M3_MAX: f32 = 448.0;

/// Decodes one E4M3 code.
pub fn e4m3_to_f32(b: u8) -> f32 {
    let e = ((b >> 3) & 0x0f) as i32;
    let m = (b & 7) as f32;
    let v = if e == 0x0f && b & 7 == 7 {
        f32::NAN
    } else if e == 0 {
        m * 2f32.powi(-9)
    } else {
        (1.0 + m / 8.0) * 2f32.powi(e - 7)
    };
    if b & 0x80 != 0 { -v } else { v }
}

/// Encodes `v` as E4M3: round to nearest even, saturating to +-448; NaN to NaN.
pub fn f32_to_e4m3(v: f32) -> u8 {
    let sign = if v.is_sign_negative() { 0x80u8 } else { 0 };
    if v.is_nan() {
        return 0x7f;
    }
    let a = v.abs();
    if a >= E4M3_MAX {
        return sign | 0x7e;
    }
    let min_normal = 2f32.powi(-6);
    if a < min_normal {
        // subnormals step 2^-9; a result of 8 steps is the smallest normal (code 0x08)
        let q = (a * 512.0).round_ties_even() as u8;
        return sign | q;
    }
    let e = a.log2().floor() as i32;
    // log2 may be off by one at exact powers of two: fix e so that 2^e <= a < 2^(e+1)
    let e = if 2f32.powi(e) > a {
        e - 1
    } else if 2f32.powi(e + 1) <= a {
        e + 1
    } else {
        e
    };
    let frac = a / 2f32.powi(e) - 1.0; // exact: division by a power of two
    let mut r = (frac * 8.0).round_ties_even() as i32;
    let mut be = e + 7;
    if r == 8 {
        r = 0;
        be += 1;
    }
    if be > 15 || (be == 15 && r == 7) {
        return sign | 0x7e;
    }
    sign | ((be as u8) << 3) | r as u8
}

/// Quantises one block as DeepSeek-V3's activation quantisation does: `s = amax / 448`
/// (`1` for an all-zero block), `q = e4m3(v / s)`. Returns the scale; codes go to `out`.
pub fn quantize_block(v: &[f32], out: &mut [u8]) -> f32 {
    let amax = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    let s = if amax > 0.0 { amax / E4M3_MAX } else { 1.0 };
    for (o, x) in out.iter_mut().zip(v) {
        *o = f32_to_e4m3(x / s);
    }
    s
}

/// Quantises a weight `[rows, cols]` per 128x128 block (`s = amax / 448`), as an FP8
/// checkpoint stores it (`weight_scale_inv` = s).
pub fn quantize_weight(rows: usize, cols: usize, w: &[f32]) -> Fp8Projection {
    let (rb, cb) = (rows.div_ceil(128), cols.div_ceil(128));
    let mut scales = vec![0f32; rb * cb];
    let mut codes = vec![0u8; rows * cols];
    for br in 0..rb {
        for bc in 0..cb {
            let (r0, r1) = (br * 128, ((br + 1) * 128).min(rows));
            let (c0, c1) = (bc * 128, ((bc + 1) * 128).min(cols));
            let mut amax = 0f32;
            for r in r0..r1 {
                for &x in &w[r * cols + c0..r * cols + c1] {
                    amax = amax.max(x.abs());
                }
            }
            let s = if amax > 0.0 { amax / E4M3_MAX } else { 1.0 };
            scales[br * cb + bc] = s;
            for r in r0..r1 {
                for c in c0..c1 {
                    codes[r * cols + c] = f32_to_e4m3(w[r * cols + c] / s);
                }
            }
        }
    }
    Fp8Projection {
        rows,
        cols,
        codes,
        scales,
    }
}

/// `q * s` per element in fp32 (what the FP8 GEMM multiplies).
pub fn dequantize_f32(p: &Fp8Projection) -> Vec<f32> {
    let cb = p.cols.div_ceil(128);
    let mut out = Vec::with_capacity(p.codes.len());
    for r in 0..p.rows {
        for c in 0..p.cols {
            out.push(e4m3_to_f32(p.codes[r * p.cols + c]) * p.scales[(r / 128) * cb + c / 128]);
        }
    }
    out
}

/// `bf16(q * s)`: an FP8 checkpoint's dequantisation (the CPU backend's weights).
pub fn dequantize_bf16(p: &Fp8Projection) -> Vec<bf16> {
    dequantize_f32(p).into_iter().map(bf16::from_f32).collect()
}

/// Rows quantised per 1x128 block and decoded again (`q * s`), fp32.
pub fn fake_quantize_rows(x: &[f32], cols: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    let mut q = [0u8; 128];
    for row in x.chunks(cols) {
        for blk in row.chunks(128) {
            let s = quantize_block(blk, &mut q[..blk.len()]);
            out.extend(q[..blk.len()].iter().map(|&c| e4m3_to_f32(c) * s));
        }
    }
    out
}

/// `bf16(sum_k x[r, k] * w[o, k])` with fp64 accumulation.
fn matmul_nt_round(x: &[f32], w: &[f32], n: usize, m: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0f32; n * m];
    for r in 0..n {
        for o in 0..m {
            let acc: f64 = (0..k)
                .map(|c| x[r * k + c] as f64 * w[o * k + c] as f64)
                .sum();
            out[r * m + o] = bf16::from_f64(acc).to_f32();
        }
    }
    out
}

/// The SwiGLU FFN of one FP8 expert as the GPU's native path computes it: `x` quantised per
/// 1x128 block, `gu = bf16(xq @ [gate; up]^T)`, `h = bf16(silu(g) * u)` quantised per 1x128
/// block, `y = bf16(hq @ down^T)` (operands `q * s`, fp64 accumulation here).
pub fn expert_ffn_native(x: &Bf16Matrix, e: &Fp8Expert) -> Bf16Matrix {
    let (n, h) = (x.rows(), x.cols());
    let i = e[0].rows;
    let xf: Vec<f32> = x.as_slice().iter().map(|v| v.to_f32()).collect();
    let xq = fake_quantize_rows(&xf, h);
    let mut w1 = dequantize_f32(&e[0]);
    w1.extend(dequantize_f32(&e[1]));
    let w2 = dequantize_f32(&e[2]);
    let gu = matmul_nt_round(&xq, &w1, n, 2 * i, h);
    let mut hm = Vec::with_capacity(n * i);
    for r in 0..n {
        for c in 0..i {
            let (g, u) = (gu[r * 2 * i + c], gu[r * 2 * i + i + c]);
            hm.push(bf16::from_f32(crate::cpu::silu(g) * u).to_f32());
        }
    }
    let hq = fake_quantize_rows(&hm, i);
    let y = matmul_nt_round(&hq, &w2, n, h, i);
    Matrix::from_vec(n, h, y.into_iter().map(bf16::from_f32).collect())
        .expect("shape matches by construction")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips() {
        for b in 0..=255u8 {
            let v = e4m3_to_f32(b);
            if v.is_nan() {
                assert_eq!(f32_to_e4m3(v) & 0x7f, 0x7f);
            } else if v == 0.0 {
                assert_eq!(f32_to_e4m3(v) & 0x7f, 0);
            } else {
                assert_eq!(f32_to_e4m3(v), b, "code {b:#x} = {v}");
            }
        }
    }

    #[test]
    fn rounds_to_nearest_even_and_saturates() {
        assert_eq!(f32_to_e4m3(1.0625), 0x38); // halfway 1 and 1.125: even (1.0)
        assert_eq!(f32_to_e4m3(1.1875), 0x3a); // halfway 1.125 and 1.25: even (1.25)
        assert_eq!(f32_to_e4m3(1000.0), 0x7e);
        assert_eq!(f32_to_e4m3(-1000.0), 0xfe);
        assert_eq!(f32_to_e4m3(2f32.powi(-10)), 0); // half the smallest subnormal: even (0)
        assert_eq!(f32_to_e4m3(3.0 * 2f32.powi(-10)), 2); // 1.5 steps: even (2)
        assert_eq!(f32_to_e4m3(0.015625), 0x08); // 2^-6, the smallest normal
    }

    #[test]
    fn weight_blocks_scale_to_their_amax() {
        let w: Vec<f32> = (0..200 * 130)
            .map(|i| ((i % 97) as f32 - 48.0) * 0.01)
            .collect();
        let p = quantize_weight(200, 130, &w);
        assert_eq!(p.scales.len(), 2 * 2);
        let d = dequantize_f32(&p);
        for (a, b) in d.iter().zip(&w) {
            assert!((a - b).abs() <= 0.0625 * b.abs() + 1e-6, "{a} vs {b}");
        }
    }
}
