//! One layer's planning problem: normalised episode loads, the multi-episode objective, its
//! lower bounds, and the replica-count helpers the planners share (the local search over a
//! placement is [`super::local_search`]).
//!
//! Each window (episode) of the history is normalised so that its mean rank load is 1; the
//! objective of a layer's placement is `F = sum_w weight_w * max_r load_{w,r}`, i.e. the
//! weighted mean over episodes of the per-episode PAR. Ties in `F` are broken by the
//! weighted sum of squared rank loads `Q`, which rewards spreading load off the hottest ranks
//! and lets the search cross plateaus of `F` without cycling (moves must decrease `(F, Q)`
//! lexicographically).

/// Weight of the episode-weighted rank-load variance added to F when the local search ranks
/// moves (`F + VARIANCE_WEIGHT * mean_w var_r(load)`). Minimising the exact maximum of the
/// history over-fits it: the next window's heaviest rank is often another one. On the synthetic
/// traces (4 shapes x 3 seeds) weight 2 lowered joint's mean next-window PAR from 1.1079 to
/// 1.1046 (0.5: 1.1065, 4: 1.1055, 8: 1.1061). Plans are still compared by F alone.
pub(crate) const VARIANCE_WEIGHT: f64 = 2.0;

pub(crate) struct Problem {
    pub e: usize,
    pub g: usize,
    pub s: usize,
    /// Number of episodes.
    pub w: usize,
    /// `x[e * w + k]`: normalised load of expert `e` in episode `k`.
    pub x: Vec<f64>,
    /// Episode weights, summing to 1 (0 for an empty episode).
    pub omega: Vec<f64>,
    /// Weighted aggregate load per expert.
    pub agg: Vec<f64>,
    /// Raw sum of loads over episodes (what `greedy` plans on).
    pub raw_sum: Vec<f64>,
    /// Duplicates on one rank are forced (`S > E`) and therefore allowed.
    pub dup_ok: bool,
    pub max_rep: usize,
    /// Weight of the rank-load variance in the search objective ([`VARIANCE_WEIGHT`] / G: the
    /// search's Q is a sum over ranks).
    pub lam: f64,
    /// True when every episode is empty: any valid placement is optimal.
    pub empty: bool,
}

impl Problem {
    /// `windows`: one row per episode, oldest first, each of the same experts. `recency`:
    /// weight ratio between an episode and the next newer one (1 = uniform).
    pub fn new(
        windows: &[&[f64]],
        g: usize,
        slots: usize,
        recency: f64,
        max_rep: usize,
    ) -> Problem {
        let e = windows.first().map_or(0, |r| r.len());
        let w = windows.len();
        let s = slots / g;
        let mut x = vec![0.0; e * w];
        let mut omega = vec![0.0; w];
        let mut raw_sum = vec![0.0; e];
        let totals = window_totals(windows);
        for (k, (row, &total)) in windows.iter().zip(&totals).enumerate() {
            for (i, &v) in row.iter().enumerate() {
                raw_sum[i] += v;
            }
            let scale = g as f64 / total;
            // A window of no load, or of so little that normalising it overflows (subnormal
            // counts), weighs nothing: it would make every rank load infinite.
            if total > 0.0 && scale.is_finite() {
                for (i, &v) in row.iter().enumerate() {
                    x[i * w + k] = v * scale;
                }
                omega[k] = recency.powi((w - 1 - k) as i32);
            }
        }
        let sum: f64 = omega.iter().sum();
        let empty = sum <= 0.0;
        if !empty {
            for o in &mut omega {
                *o /= sum;
            }
        }
        let agg = (0..e)
            .map(|i| (0..w).map(|k| omega[k] * x[i * w + k]).sum())
            .collect();
        Problem {
            e,
            g,
            s,
            w,
            x,
            omega,
            agg,
            raw_sum,
            dup_ok: s > e,
            max_rep,
            lam: VARIANCE_WEIGHT / g as f64,
            empty,
        }
    }

    pub fn slots(&self) -> usize {
        self.g * self.s
    }

    /// `(F, Q)` of a row, computed from scratch: the same sums, in the same order, as the
    /// local search's [`super::local_search::State::objective`] (a test holds them equal).
    pub fn objective(&self, row: &[usize]) -> (f64, f64) {
        let loads = self.rank_loads(row);
        let (mut f, mut q) = (0.0, 0.0);
        for k in 0..self.w {
            let o = self.omega[k];
            if o == 0.0 {
                continue;
            }
            let rank = |r: usize| loads[r * self.w + k];
            f += o * (0..self.g).map(rank).fold(f64::NEG_INFINITY, f64::max);
            q += o * (0..self.g).map(|r| rank(r) * rank(r)).sum::<f64>();
        }
        (f, q)
    }

    /// Weighted-mean-over-episodes PAR of a row (= F).
    pub fn episode_par(&self, row: &[usize]) -> f64 {
        if self.empty {
            return 1.0;
        }
        let loads = self.rank_loads(row);
        (0..self.w)
            .map(|k| {
                self.omega[k]
                    * (0..self.g)
                        .map(|r| loads[r * self.w + k])
                        .fold(f64::NEG_INFINITY, f64::max)
            })
            .sum()
    }

    /// `loads[r * w + k]`: the load of rank `r` in episode `k` under `row`, each rank's
    /// replicas added in slot order.
    fn rank_loads(&self, row: &[usize]) -> Vec<f64> {
        let mut cnt = vec![0u32; self.e];
        for &e in row {
            cnt[e] += 1;
        }
        // loads[r * w + k]: one rank's episodes side by side, so that adding an expert's
        // episodes (x[e * w..]) to a rank is one contiguous run.
        let mut loads = vec![0.0f64; self.g * self.w];
        for (r, rank) in row.chunks(self.s.max(1)).enumerate() {
            let to = &mut loads[r * self.w..(r + 1) * self.w];
            for &e in rank {
                let x = &self.x[e * self.w..(e + 1) * self.w];
                // x / 1 is x exactly; most experts have one replica, and the division is
                // the costly part.
                if cnt[e] == 1 {
                    to.iter_mut().zip(x).for_each(|(l, &x)| *l += x);
                } else {
                    let c = f64::from(cnt[e]);
                    to.iter_mut().zip(x).for_each(|(l, &x)| *l += x / c);
                }
            }
        }
        loads
    }

    /// Lower bound on F: the larger of (a) per episode, the larger of the mean (1) and the
    /// best possible largest replica load under any replica counts (water-filling, per episode:
    /// a relaxation of shared counts), weighted; and (b) the best possible largest
    /// episode-weighted replica load under shared counts.
    pub fn lower_bound(&self) -> f64 {
        if self.empty {
            return 1.0;
        }
        let mut lb = 0.0;
        for k in 0..self.w {
            if self.omega[k] <= 0.0 {
                continue;
            }
            let loads: Vec<f64> = (0..self.e).map(|i| self.x[i * self.w + k]).collect();
            let cnt = water_fill(&loads, self.slots(), self.max_rep);
            let m = (0..self.e)
                .map(|i| loads[i] / cnt[i] as f64)
                .fold(1.0f64, f64::max);
            lb += self.omega[k] * m;
        }
        // Shared counts: F >= max_e sum_k w_k x_ke / c_e = max_e agg_e / c_e.
        let cnt = water_fill(&self.agg, self.slots(), self.max_rep);
        let shared = (0..self.e)
            .map(|i| self.agg[i] / cnt[i] as f64)
            .fold(1.0f64, f64::max);
        lb.max(shared)
    }
}

/// Each window's total, summed in expert order from -0.0 exactly as `Iterator::sum` does,
/// four windows side by side: one window's sum is a chain of dependent additions, and four
/// chains in registers run in parallel.
fn window_totals(windows: &[&[f64]]) -> Vec<f64> {
    let mut totals = Vec::with_capacity(windows.len());
    let mut blocks = windows.chunks_exact(4);
    for block in &mut blocks {
        let [a, b, c, d] = [block[0], block[1], block[2], block[3]];
        debug_assert!(block.iter().all(|row| row.len() == a.len()));
        let mut t = [-0.0f64; 4];
        for i in 0..a.len().min(b.len()).min(c.len()).min(d.len()) {
            t[0] += a[i];
            t[1] += b[i];
            t[2] += c[i];
            t[3] += d[i];
        }
        totals.extend_from_slice(&t);
    }
    totals.extend(blocks.remainder().iter().map(|row| row.iter().sum::<f64>()));
    totals
}

/// Fewest replicas of an expert with load `load` that keep each replica below `cut` (a replica
/// alone puts `load / c` on its rank); `cap + 1` when not even `cap` do (a tiny cut cannot
/// overflow it).
pub(crate) fn fewest_replicas(load: f64, cut: f64, cap: usize) -> usize {
    if load <= 0.0 || cut <= 0.0 {
        return 1;
    }
    let q = (load / cut).floor();
    if q >= cap as f64 {
        cap + 1
    } else {
        q as usize + 1
    }
}

/// Slots whose expert differs between two rows of a layer (the moves a plan costs).
pub(crate) fn slots_changed(row: &[usize], prev: &[usize]) -> usize {
    row.iter().zip(prev).filter(|(a, b)| a != b).count()
}

/// `x`'s place in [`f64::total_cmp`]'s order as an unsigned integer: comparing two keys
/// compares the two floats as `total_cmp` does, on every bit pattern, but faster.
pub(crate) fn total_order(x: f64) -> u64 {
    // total_cmp compares the bits as a signed integer after flipping the magnitude bits of
    // negative numbers; flipping the sign bit as well makes that order unsigned.
    let bits = x.to_bits();
    if bits >> 63 == 1 {
        !bits
    } else {
        bits | 1 << 63
    }
}

/// Min-max replication: starting from one replica each, repeatedly give one more replica to
/// the expert with the largest load per replica (ties: lower expert id), never above
/// `max_rep`, until `slots` replicas exist.
pub(crate) fn water_fill(loads: &[f64], slots: usize, max_rep: usize) -> Vec<usize> {
    water_fill_among(loads, slots, max_rep, 0..loads.len())
}

/// [`water_fill`] from the experts sorted heaviest first (ties: lower id), for a caller that
/// sorts them anyway: the heap then holds only the few that can get a second replica.
///
/// Why only the first `slots - n`: while extra replicas remain, the expert given the next one
/// is the heaviest per replica, so every expert sorted before it already has two or more
/// replicas (one with a single replica would be at least as heavy, and win the tie) and took
/// one of the extras before. With a cap below 2 nobody gets a second replica from the heap.
pub(crate) fn water_fill_sorted(
    loads: &[f64],
    heaviest_first: &[usize],
    slots: usize,
    max_rep: usize,
) -> Vec<usize> {
    let extra = slots.saturating_sub(loads.len());
    let candidates = if max_rep >= 2 && extra < heaviest_first.len() {
        &heaviest_first[..extra]
    } else {
        heaviest_first
    };
    water_fill_among(loads, slots, max_rep, candidates.iter().copied())
}

/// [`water_fill`] with the heap holding `candidates` only (which must include every expert
/// that water-filling over all would give a second replica).
fn water_fill_among(
    loads: &[f64],
    slots: usize,
    max_rep: usize,
    candidates: impl Iterator<Item = usize>,
) -> Vec<usize> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let n = loads.len();
    let mut cnt = vec![1usize; n];
    // Largest load per replica first, then the lower id; integer keys compare faster than
    // total_cmp, which building the heap spends most of its time in.
    let mut heap: BinaryHeap<(u64, Reverse<usize>)> = candidates
        .map(|i| (total_order(loads[i]), Reverse(i)))
        .collect();
    let mut extra = slots.saturating_sub(n);
    while extra > 0 {
        let Some((_, Reverse(i))) = heap.pop() else {
            break;
        };
        if cnt[i] >= max_rep {
            continue;
        }
        cnt[i] += 1;
        extra -= 1;
        heap.push((total_order(loads[i] / cnt[i] as f64), Reverse(i)));
    }
    if extra > 0 {
        // Every expert is at max_rep (only possible when max_rep is not binding in the
        // shape's own terms); spread the rest round-robin.
        let mut i = 0;
        while extra > 0 {
            cnt[i % n] += 1;
            extra -= 1;
            i += 1;
        }
    }
    cnt
}

/// `d` strictly better than `best`, both `(primary, tie-break)`: the primary lower by more
/// than 1e-12, or level with it and the tie-break lower by more than 1e-12. Every search here
/// ranks `(F, Q)` pairs (or a peak and a sum) this way.
pub(crate) fn better(d: (f64, f64), best: (f64, f64)) -> bool {
    if d.0 < best.0 - 1e-12 {
        return true;
    }
    d.0 <= best.0 + 1e-12 && d.1 < best.1 - 1e-12
}

/// Steps `row` to the next row of `E^slots` in odometer order (slot 0 turns fastest), for the
/// brute-force oracles of the tests. False after the last row (all `e - 1`), when it wraps to 0s.
#[cfg(test)]
pub(crate) fn next_row(row: &mut [usize], e: usize) -> bool {
    for slot in row.iter_mut() {
        *slot += 1;
        if *slot < e {
            return true;
        }
        *slot = 0;
    }
    false
}

/// For the tests: `windows` windows of `e` experts, heavy-tailed (a Zipf-like exponent drawn in
/// 0.4..1.2 with log-normal noise per expert) and drifting a little from window to window,
/// rounded to token counts; the draws come from `rng` in a fixed order.
#[cfg(test)]
pub(crate) fn drifting_zipf_windows(
    rng: &mut crate::synth::Rng,
    e: usize,
    windows: usize,
) -> Vec<Vec<f64>> {
    let s = 0.4 + 0.8 * rng.uniform();
    let base: Vec<f64> = (0..e)
        .map(|i| 1000.0 * (1.0 + i as f64).powf(-s) * (0.4 * rng.normal()).exp())
        .collect();
    (0..windows)
        .map(|_| {
            base.iter()
                .map(|b| (b * (0.15 * rng.normal()).exp()).round())
                .collect()
        })
        .collect()
}

/// For the tests: a layer of `windows.len()` episodes of `windows[0].len()` experts on `g`
/// ranks and `slots` slots, replicas capped as its shape caps them, and that shape.
#[cfg(test)]
pub(crate) fn test_layer(
    windows: &[Vec<f64>],
    g: usize,
    slots: usize,
    recency: f64,
) -> (Problem, crate::shape::Shape) {
    let e = windows[0].len();
    let shape = crate::shape::Shape::new(e, slots - e, g, 1, 1).expect("a valid test shape");
    let refs: Vec<&[f64]> = windows.iter().map(Vec::as_slice).collect();
    (
        Problem::new(&refs, g, slots, recency, shape.max_replicas()),
        shape,
    )
}

/// For the tests: the objective of an exact search's answer after checking that its row is a
/// valid placement (every slot filled, no expert twice on a rank, every count in range), and
/// whether the search finished.
#[cfg(test)]
pub(crate) fn checked_answer(p: &Problem, res: super::exact::ExactResult) -> (f64, bool) {
    let row = res.row.expect("every eligible problem has a placement");
    assert_eq!(row.len(), p.slots());
    assert!(
        crate::placement::find_duplicate(&row, p.s).is_none(),
        "{row:?}"
    );
    let mut cnt = vec![0; p.e];
    row.iter().for_each(|&e| cnt[e] += 1);
    assert!(cnt.iter().all(|&c| c >= 1 && c <= p.max_rep), "{cnt:?}");
    (p.objective(&row).0, res.proven)
}

/// For the tests of the exact searches (`solve(problem, seed objective, nodes)`): against the
/// brute-force optimum `want`, the search from an unbounded start finds and proves it, just
/// above it finds it, and just below it proves that nothing is there.
#[cfg(test)]
pub(crate) fn check_search_at_optimum(
    p: &Problem,
    want: f64,
    mut solve: impl FnMut(&Problem, f64, usize) -> super::exact::ExactResult,
) -> Result<(), String> {
    let (got, proven) = checked_answer(p, solve(p, f64::INFINITY, 10_000_000));
    if !proven || (got - want).abs() >= 1e-9 {
        return Err(format!("search {got} (proven {proven}) vs optimum {want}"));
    }
    let (near, proven) = checked_answer(p, solve(p, want * (1.0 + 1e-7), 10_000_000));
    if !proven || (near - want).abs() >= 1e-9 {
        return Err(format!(
            "just above: {near} (proven {proven}) vs optimum {want}"
        ));
    }
    let below = solve(p, want - 1e-6, 10_000_000);
    if !below.proven || below.row.is_some() {
        return Err(format!(
            "below {want}: proven {} row {:?}",
            below.proven, below.row
        ));
    }
    Ok(())
}

/// For the tests of proving from below with a search: from a poor start (experts dealt
/// round-robin) and any budget, the interval holds the optimum `want` and "optimal" is said
/// of the optimum only.
#[cfg(test)]
pub(crate) fn check_ascent(
    p: &Problem,
    want: f64,
    budget: usize,
    mut solve: impl FnMut(&Problem, f64, usize) -> super::exact::ExactResult,
) -> Result<(), String> {
    let mut start: Vec<usize> = (0..p.slots()).map(|i| i % p.e).collect();
    crate::placement::repair_duplicates(&mut start, p.e, p.g);
    let proof = super::prove::ascend(
        p,
        super::prove::Proof::start(p, start),
        budget,
        budget / 2,
        |t, n| solve(p, t, n),
    );
    if proof.lower > want + 1e-9 || proof.objective < want - 1e-9 {
        return Err(format!(
            "[{}, {}] misses the optimum {want}",
            proof.lower, proof.objective
        ));
    }
    if (proof.objective - p.objective(&proof.row).0).abs() >= 1e-12 {
        return Err("the proof's objective is not its row's".into());
    }
    if proof.optimal && (proof.objective - want).abs() >= 1e-9 {
        return Err(format!("optimal {} vs {want}", proof.objective));
    }
    Ok(())
}

/// The brute-force optimum for the tests' oracles: the best objective over every valid row of
/// `E^slots` (every expert served, no duplicate on a rank unless the problem allows them),
/// optionally only rows with the replica counts `counts`.
#[cfg(test)]
pub(crate) fn brute_force_optimum(p: &Problem, counts: Option<&[usize]>) -> f64 {
    let mut row = vec![0usize; p.slots()];
    let mut best = f64::INFINITY;
    loop {
        let mut cnt = vec![0usize; p.e];
        row.iter().for_each(|&e| cnt[e] += 1);
        let ok = cnt.iter().all(|&c| c > 0)
            && counts.is_none_or(|want| want == cnt.as_slice())
            && (p.dup_ok || crate::placement::find_duplicate(&row, p.s).is_none());
        if ok {
            best = best.min(p.objective(&row).0);
        }
        if !next_row(&mut row, p.e) {
            return best;
        }
    }
}

/// The optimum of a problem without forced duplicates, for the tests' oracles on shapes beyond
/// [`brute_force_optimum`]'s reach (it enumerates `E^slots` rows; this, the multisets of `G`
/// rank contents of `S` distinct experts, `C(C(E, S) + G - 1, G)` of them): every multiset that
/// serves every expert within `max_rep` replicas, its objective computed here from the loads
/// (independent of the planner's state). Returns the optimum and a row reaching it.
#[cfg(test)]
pub(crate) fn rank_sets_optimum(p: &Problem) -> (f64, Vec<usize>) {
    assert!(!p.dup_ok, "rank contents are sets: no forced duplicates");
    let (e, s, g, w) = (p.e, p.s, p.g, p.w);
    // Every rank content, as `s` ascending experts.
    let mut sets: Vec<Vec<usize>> = Vec::new();
    let mut set: Vec<usize> = (0..s).collect();
    loop {
        sets.push(set.clone());
        let Some(i) = (0..s).rev().find(|&i| set[i] < e - s + i) else {
            break;
        };
        set[i] += 1;
        for t in i + 1..s {
            set[t] = set[t - 1] + 1;
        }
    }
    // Multisets of `g` contents as non-decreasing indices into `sets`.
    let mut pick = vec![0usize; g];
    let mut cnt = vec![0usize; e];
    let mut best = (f64::INFINITY, Vec::new());
    loop {
        cnt.iter_mut().for_each(|c| *c = 0);
        pick.iter()
            .flat_map(|&i| sets[i].iter())
            .for_each(|&j| cnt[j] += 1);
        if cnt.iter().all(|&c| c >= 1 && c <= p.max_rep) {
            let f: f64 = (0..w)
                .map(|k| {
                    let heaviest = pick
                        .iter()
                        .map(|&i| {
                            sets[i]
                                .iter()
                                .map(|&j| p.x[j * w + k] / cnt[j] as f64)
                                .sum::<f64>()
                        })
                        .fold(f64::NEG_INFINITY, f64::max);
                    p.omega[k] * heaviest
                })
                .sum();
            if f < best.0 {
                best = (
                    f,
                    pick.iter().flat_map(|&i| sets[i].iter().copied()).collect(),
                );
            }
        }
        let Some(i) = (0..g).rev().find(|&i| pick[i] + 1 < sets.len()) else {
            return best;
        };
        pick[i] += 1;
        for t in i + 1..g {
            pick[t] = pick[i];
        }
    }
}
