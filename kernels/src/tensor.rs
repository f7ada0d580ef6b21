//! Dense row-major matrices (bf16 activations and weights, fp32 logits).

use crate::error::{Result, invalid};
use half::bf16;

/// A dense row-major matrix: element `(r, c)` is `data[r * cols + c]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix<T> {
    rows: usize,
    cols: usize,
    data: Vec<T>,
}

/// bf16 activations or weights.
pub type Bf16Matrix = Matrix<bf16>;
/// fp32 values (router logits, references).
pub type F32Matrix = Matrix<f32>;

impl<T: Copy + Default> Matrix<T> {
    /// A `rows x cols` matrix of `T::default()` (zero for numbers).
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            data: vec![T::default(); rows * cols],
        }
    }
}

impl<T> Matrix<T> {
    /// Wraps `data` (row-major, `rows * cols` elements).
    pub fn from_vec(rows: usize, cols: usize, data: Vec<T>) -> Result<Self> {
        match rows.checked_mul(cols) {
            Some(n) if n == data.len() => Ok(Self { rows, cols, data }),
            _ => invalid(format!(
                "matrix {rows}x{cols} needs {} elements, got {}",
                rows.saturating_mul(cols),
                data.len()
            )),
        }
    }
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// All elements, row-major.
    pub fn as_slice(&self) -> &[T] {
        &self.data
    }
    /// All elements, row-major, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        &mut self.data
    }
    /// Consumes the matrix and returns its elements.
    pub fn into_vec(self) -> Vec<T> {
        self.data
    }
    /// Row `r` (panics when `r >= rows`, like slice indexing).
    pub fn row(&self, r: usize) -> &[T] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
    /// Row `r`, mutable (panics when `r >= rows`).
    pub fn row_mut(&mut self, r: usize) -> &mut [T] {
        &mut self.data[r * self.cols..(r + 1) * self.cols]
    }
    /// Rows `start..end` as a new view-less slice.
    pub fn rows_slice(&self, start: usize, end: usize) -> &[T] {
        &self.data[start * self.cols..end * self.cols]
    }
}

impl Matrix<bf16> {
    /// Rounds fp32 values to bf16 (round to nearest even).
    pub fn from_f32(rows: usize, cols: usize, data: &[f32]) -> Result<Self> {
        Self::from_vec(
            rows,
            cols,
            data.iter().map(|&v| bf16::from_f32(v)).collect(),
        )
    }
    /// Widens to fp32.
    pub fn to_f32(&self) -> Matrix<f32> {
        Matrix {
            rows: self.rows,
            cols: self.cols,
            data: self.data.iter().map(|v| v.to_f32()).collect(),
        }
    }
}

/// Weights of one expert's SwiGLU FFN, bf16, row-major.
///
/// * `w1`: `[2 * intermediate, hidden]`: rows `0..intermediate` are the gate projection,
///   rows `intermediate..2 * intermediate` the up projection (the fused "w13" layout).
/// * `w2`: `[hidden, intermediate]`: the down projection.
///
/// `y = w2 · (silu(w1_gate · x) * (w1_up · x))`.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertWeights {
    /// `[2 * intermediate, hidden]`
    pub w1: Bf16Matrix,
    /// `[hidden, intermediate]`
    pub w2: Bf16Matrix,
    /// Biases of the two projections (gpt-oss), if the model has them.
    pub bias: Option<ExpertBias>,
}

/// Biases of an expert's projections, fp32: `b1` `[2 * intermediate]` (gate entries first),
/// `b2` `[hidden]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertBias {
    pub b1: Vec<f32>,
    pub b2: Vec<f32>,
}

impl ExpertWeights {
    /// Checks the shapes and wraps them.
    pub fn new(w1: Bf16Matrix, w2: Bf16Matrix) -> Result<Self> {
        if !w1.rows().is_multiple_of(2) || w1.rows() / 2 != w2.cols() || w1.cols() != w2.rows() {
            return invalid(format!(
                "expert weights: w1 is {}x{}, w2 is {}x{}; need w1 [2I,H], w2 [H,I]",
                w1.rows(),
                w1.cols(),
                w2.rows(),
                w2.cols()
            ));
        }
        Ok(Self { w1, w2, bias: None })
    }

    /// Adds the projections' biases (`b1` `[2I]`, gate entries first; `b2` `[H]`).
    pub fn with_bias(mut self, b1: Vec<f32>, b2: Vec<f32>) -> Result<Self> {
        if b1.len() != self.w1.rows() || b2.len() != self.w2.rows() {
            return invalid(format!(
                "expert biases: {} and {} entries, need {} and {}",
                b1.len(),
                b2.len(),
                self.w1.rows(),
                self.w2.rows()
            ));
        }
        self.bias = Some(ExpertBias { b1, b2 });
        Ok(self)
    }
    /// Hidden size H.
    pub fn hidden(&self) -> usize {
        self.w1.cols()
    }
    /// Intermediate size I.
    pub fn intermediate(&self) -> usize {
        self.w2.cols()
    }
}
