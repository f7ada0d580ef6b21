//! Deterministic synthetic load traces with realistic skew and drift.
//!
//! Per layer, expert popularity is heavy-tailed: a Zipf-like law over a random permutation of
//! the experts (exponent drawn per layer) times a log-normal factor, times a log-normal factor
//! per expert group (grouped routing makes whole groups hot). Between windows every expert's
//! log-popularity takes a Gaussian step (log-normal drift) with mild mean reversion, and each
//! window's counts are Poisson-like (mean plus Gaussian noise of the Poisson's standard
//! deviation, rounded, never negative). Same spec and seed, same trace, on every machine.

/// SplitMix64: small, fast, and good enough for synthetic traces.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
    /// Uniform integer in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// Parameters of a synthetic trace.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceSpec {
    pub num_layers: usize,
    pub num_experts: usize,
    /// Expert groups (1 = none); a group shares a hotness factor.
    pub num_groups: usize,
    pub num_windows: usize,
    /// Token-expert assignments per window and layer (tokens x top-k).
    pub tokens_per_window: f64,
    /// Range of the per-layer Zipf exponent.
    pub zipf_min: f64,
    pub zipf_max: f64,
    /// Standard deviation of the per-window log-popularity step.
    pub drift: f64,
    pub seed: u64,
}

impl TraceSpec {
    pub fn new(
        num_layers: usize,
        num_experts: usize,
        num_groups: usize,
        num_windows: usize,
        seed: u64,
    ) -> TraceSpec {
        TraceSpec {
            num_layers,
            num_experts,
            num_groups: num_groups.max(1),
            num_windows,
            tokens_per_window: 262_144.0,
            zipf_min: 0.4,
            zipf_max: 1.0,
            drift: 0.12,
            seed,
        }
    }
}

/// `[window][layer][expert]` counts.
pub type Windows = Vec<Vec<Vec<f64>>>;

/// Generates `[window][layer][expert]` counts.
pub fn generate(spec: &TraceSpec) -> Windows {
    generate_with_expectation(spec).0
}

/// Like [`generate`], and also, per window, the expected counts given everything generated
/// before it (the generator's hidden popularity state after the previous window, one drift step
/// ahead, without its noise). The benchmark plans on the last of these to show the best a
/// perfect predictor could do: a floor for plans made from observed history.
pub fn generate_with_expectation(spec: &TraceSpec) -> (Windows, Windows) {
    let mut rng = Rng::new(spec.seed);
    let e_n = spec.num_experts;
    let groups = spec.num_groups.max(1);
    let per_group = (e_n / groups).max(1);
    let mut out = vec![vec![Vec::new(); spec.num_layers]; spec.num_windows];
    let mut expected = vec![vec![Vec::new(); spec.num_layers]; spec.num_windows];
    for l in 0..spec.num_layers {
        let s = spec.zipf_min + (spec.zipf_max - spec.zipf_min) * rng.uniform();
        let mut perm: Vec<usize> = (0..e_n).collect();
        for i in (1..e_n).rev() {
            let j = rng.below(i + 1);
            perm.swap(i, j);
        }
        let group_f: Vec<f64> = (0..groups).map(|_| (0.3 * rng.normal()).exp()).collect();
        let base: Vec<f64> = (0..e_n)
            .map(|e| {
                let zipf = ((perm[e] + 1) as f64).powf(-s);
                (zipf * (0.4 * rng.normal()).exp() * group_f[(e / per_group).min(groups - 1)]).ln()
            })
            .collect();
        let mut logp = base.clone();
        // Expected log-popularity of the next window: the drift step without its noise.
        let mut mean_logp = base.clone();
        for (window, exp_window) in out.iter_mut().zip(expected.iter_mut()) {
            let ze: f64 = mean_logp.iter().map(|x| x.exp()).sum();
            exp_window[l] = mean_logp
                .iter()
                .map(|x| spec.tokens_per_window * x.exp() / ze)
                .collect();
            let z: f64 = logp.iter().map(|x| x.exp()).sum();
            let row: Vec<f64> = logp
                .iter()
                .map(|x| {
                    let lambda = spec.tokens_per_window * x.exp() / z;
                    (lambda + lambda.sqrt() * rng.normal()).round().max(0.0)
                })
                .collect();
            window[l] = row;
            for ((lp, b), m) in logp.iter_mut().zip(&base).zip(mean_logp.iter_mut()) {
                *m = *lp - 0.1 * (*lp - b);
                *lp += spec.drift * rng.normal() - 0.1 * (*lp - b);
            }
        }
    }
    (out, expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_skewed() {
        let spec = TraceSpec::new(2, 64, 8, 3, 42);
        let a = generate(&spec);
        assert_eq!(a, generate(&spec));
        assert_eq!(a.len(), 3);
        assert_eq!(a[0][1].len(), 64);
        let row = &a[0][0];
        let max = row.iter().copied().fold(0.0, f64::max);
        let mean = row.iter().sum::<f64>() / 64.0;
        assert!(
            max > 3.0 * mean,
            "expected heavy tail, max {max} mean {mean}"
        );
        assert!(row.iter().all(|x| *x >= 0.0 && x.is_finite()));
    }
}
