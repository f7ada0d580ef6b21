//! The local search shared by `joint`, `incremental` and the neighbourhood search: a layer's
//! placement with its rank loads kept up to date, and moves (swaps of two slots, a slot handed
//! to another expert) taken while they lower `(F, Q)` lexicographically (see
//! [`super::problem`] for `F` and `Q`).

use super::problem::{Problem, better, slots_changed};

/// Iteration cap of the local search (each iteration applies one improving move).
pub(crate) const MAX_ITERS: usize = 400;
/// Improvements smaller than this are treated as none.
pub(crate) const EPS: f64 = 1e-9;
/// Partner ranks tried per critical rank in one local-search iteration (unbudgeted mode).
const PARTNERS: usize = 12;

/// Mutable search state of one layer.
pub(crate) struct State<'p> {
    pub p: &'p Problem,
    pub row: Vec<usize>,
    pub cnt: Vec<usize>,
    /// `rc[r * e + i]`: replicas of expert `i` on rank `r`.
    pub rc: Vec<u16>,
    /// `loads[r * w + k]` (rank-major: one rank's episodes are contiguous).
    pub loads: Vec<f64>,
    /// `y[e * w + k]`: load of one replica of expert `e` in episode `k` (`x / cnt`).
    pub y: Vec<f64>,
    /// Per episode, the three largest `(load, rank)`.
    pub top: Vec<[(f64, usize); 3]>,
    /// Slots of each expert.
    pub pos: Vec<Vec<usize>>,
}

fn improving(d: (f64, f64)) -> bool {
    d.0 < -EPS || (d.0 <= 1e-12 && d.1 < -EPS)
}

impl<'p> State<'p> {
    pub fn new(p: &'p Problem, row: Vec<usize>) -> State<'p> {
        let mut st = State {
            p,
            row,
            cnt: vec![0; p.e],
            rc: vec![0; p.g * p.e],
            loads: vec![0.0; p.w * p.g],
            y: vec![0.0; p.w * p.e],
            top: vec![[(0.0, usize::MAX); 3]; p.w],
            pos: vec![Vec::new(); p.e],
        };
        st.rebuild();
        st
    }

    fn rebuild(&mut self) {
        let p = self.p;
        self.cnt.iter_mut().for_each(|c| *c = 0);
        self.rc.iter_mut().for_each(|c| *c = 0);
        self.pos.iter_mut().for_each(Vec::clear);
        for (slot, &e) in self.row.iter().enumerate() {
            self.cnt[e] += 1;
            self.rc[(slot / p.s) * p.e + e] += 1;
            self.pos[e].push(slot);
        }
        for e in 0..p.e {
            self.refresh_y(e);
        }
        self.recompute_loads();
    }

    fn refresh_y(&mut self, e: usize) {
        let p = self.p;
        let c = self.cnt[e].max(1) as f64;
        for k in 0..p.w {
            self.y[e * p.w + k] = p.x[e * p.w + k] / c;
        }
    }

    pub fn recompute_loads(&mut self) {
        let p = self.p;
        self.loads.iter_mut().for_each(|l| *l = 0.0);
        for (slot, &e) in self.row.iter().enumerate() {
            let r = slot / p.s;
            for k in 0..p.w {
                self.loads[r * p.w + k] += self.y[e * p.w + k];
            }
        }
        for k in 0..p.w {
            self.refresh_top(k);
        }
    }

    fn refresh_top(&mut self, k: usize) {
        let g = self.p.g;
        let mut t = [(f64::NEG_INFINITY, usize::MAX); 3];
        for r in 0..g {
            let v = self.loads[r * self.p.w + k];
            if v > t[0].0 {
                t[2] = t[1];
                t[1] = t[0];
                t[0] = (v, r);
            } else if v > t[1].0 {
                t[2] = t[1];
                t[1] = (v, r);
            } else if v > t[2].0 {
                t[2] = (v, r);
            }
        }
        self.top[k] = t;
    }

    pub fn objective(&self) -> (f64, f64) {
        let p = self.p;
        let mut f = 0.0;
        let mut q = 0.0;
        for k in 0..p.w {
            let o = p.omega[k];
            if o == 0.0 {
                continue;
            }
            f += o * self.top[k][0].0;
            q += o
                * (0..p.g)
                    .map(|r| self.loads[r * p.w + k] * self.loads[r * p.w + k])
                    .sum::<f64>();
        }
        (f, q)
    }

    #[inline]
    fn holds(&self, r: usize, e: usize) -> bool {
        self.rc[r * self.p.e + e] > 0
    }

    #[inline]
    fn max_excluding(&self, k: usize, a: usize, b: usize) -> f64 {
        for &(v, r) in &self.top[k] {
            if r != a && r != b {
                return v;
            }
        }
        f64::NEG_INFINITY
    }

    /// `(dF, dQ)` of swapping the contents of slots `i` and `j` (different ranks).
    pub fn eval_swap(&self, i: usize, j: usize) -> (f64, f64) {
        let p = self.p;
        let (a, b) = (i / p.s, j / p.s);
        let (e, f) = (self.row[i], self.row[j]);
        let w = p.w;
        let ye = &self.y[e * w..e * w + w];
        let yf = &self.y[f * w..f * w + w];
        let las = &self.loads[a * w..a * w + w];
        let lbs = &self.loads[b * w..b * w + w];
        let mut df = 0.0;
        let mut dq = 0.0;
        for k in 0..w {
            let o = p.omega[k];
            let d = yf[k] - ye[k];
            let la = las[k];
            let lb = lbs[k];
            let na = la + d;
            let nb = lb - d;
            let m = na.max(nb).max(self.max_excluding(k, a, b));
            df += o * (m - self.top[k][0].0);
            dq += o * (na * na + nb * nb - la * la - lb * lb);
        }
        (df, dq)
    }

    pub fn swap_valid(&self, i: usize, j: usize) -> bool {
        let p = self.p;
        let (e, f) = (self.row[i], self.row[j]);
        if e == f || i / p.s == j / p.s {
            return false;
        }
        p.dup_ok || (!self.holds(j / p.s, e) && !self.holds(i / p.s, f))
    }

    pub fn apply_swap(&mut self, i: usize, j: usize) {
        let p = self.p;
        let (a, b) = (i / p.s, j / p.s);
        let (e, f) = (self.row[i], self.row[j]);
        for k in 0..p.w {
            let d = self.y[f * p.w + k] - self.y[e * p.w + k];
            self.loads[a * p.w + k] += d;
            self.loads[b * p.w + k] -= d;
            self.refresh_top(k);
        }
        self.row.swap(i, j);
        self.rc[a * p.e + e] -= 1;
        self.rc[a * p.e + f] += 1;
        self.rc[b * p.e + f] -= 1;
        self.rc[b * p.e + e] += 1;
        for x in self.pos[e].iter_mut() {
            if *x == i {
                *x = j;
            }
        }
        for x in self.pos[f].iter_mut() {
            if *x == j {
                *x = i;
            }
        }
    }

    pub fn rerep_valid(&self, i: usize, f: usize) -> bool {
        let p = self.p;
        let e = self.row[i];
        e != f
            && self.cnt[e] >= 2
            && self.cnt[f] < p.max_rep
            && (p.dup_ok || !self.holds(i / p.s, f))
    }

    /// Rank deltas (per episode, for affected ranks) of giving slot `i` (expert e) to `f`.
    fn rerep_deltas(&self, i: usize, f: usize, k: usize, out: &mut Vec<(usize, f64)>) {
        let p = self.p;
        out.clear();
        let e = self.row[i];
        let ce = self.cnt[e] as f64;
        let cf = self.cnt[f] as f64;
        let xe = p.x[e * p.w + k];
        let xf = p.x[f * p.w + k];
        let mut add = |r: usize, d: f64| {
            if let Some(x) = out.iter_mut().find(|x| x.0 == r) {
                x.1 += d;
            } else {
                out.push((r, d));
            }
        };
        for &slot in &self.pos[e] {
            if slot == i {
                add(slot / p.s, -xe / ce + xf / (cf + 1.0));
            } else {
                add(slot / p.s, xe / (ce - 1.0) - xe / ce);
            }
        }
        for &slot in &self.pos[f] {
            add(slot / p.s, xf / (cf + 1.0) - xf / cf);
        }
    }

    /// `(dF, dQ)` of giving slot `i` to expert `f` instead of its current expert.
    pub fn eval_rerep(&self, i: usize, f: usize, scratch: &mut Vec<(usize, f64)>) -> (f64, f64) {
        let p = self.p;
        let mut df = 0.0;
        let mut dq = 0.0;
        for k in 0..p.w {
            let o = p.omega[k];
            if o == 0.0 {
                continue;
            }
            self.rerep_deltas(i, f, k, scratch);
            let mut m = f64::NEG_INFINITY;
            let mut q = 0.0;
            for &(r, d) in scratch.iter() {
                let l = self.loads[r * p.w + k];
                m = m.max(l + d);
                q += (l + d) * (l + d) - l * l;
            }
            let mut other = f64::NEG_INFINITY;
            let mut found = false;
            for &(v, r) in &self.top[k] {
                if r != usize::MAX && !scratch.iter().any(|x| x.0 == r) {
                    other = v;
                    found = true;
                    break;
                }
            }
            if !found && scratch.len() < p.g {
                for r in 0..p.g {
                    if !scratch.iter().any(|x| x.0 == r) {
                        other = other.max(self.loads[r * p.w + k]);
                    }
                }
            }
            df += o * (m.max(other) - self.top[k][0].0);
            dq += o * q;
        }
        (df, dq)
    }

    pub fn apply_rerep(&mut self, i: usize, f: usize) {
        let p = self.p;
        let e = self.row[i];
        let r = i / p.s;
        self.row[i] = f;
        self.cnt[e] -= 1;
        self.cnt[f] += 1;
        self.rc[r * p.e + e] -= 1;
        self.rc[r * p.e + f] += 1;
        self.pos[e].retain(|&x| x != i);
        self.pos[f].push(i);
        self.refresh_y(e);
        self.refresh_y(f);
        self.recompute_loads();
    }

    /// Ranks that are the heaviest in some weighted episode, heaviest contribution first.
    fn critical_ranks(&self) -> Vec<usize> {
        let mut c: Vec<(f64, usize)> = Vec::new();
        for k in 0..self.p.w {
            if self.p.omega[k] == 0.0 {
                continue;
            }
            let r = self.top[k][0].1;
            if let Some(x) = c.iter_mut().find(|x| x.1 == r) {
                x.0 += self.p.omega[k];
            } else {
                c.push((self.p.omega[k], r));
            }
        }
        c.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        c.into_iter().map(|x| x.1).collect()
    }

    /// Local search. Without a budget: best-improvement swaps between a critical rank and
    /// any other rank, then replica re-assignments (one slot of an expert with spare replicas
    /// given to a hot expert), until neither improves `(F, Q)`. With a budget `(orig, max)`:
    /// moves are ranked by the drop in F per slot changed relative to `orig`, only moves that
    /// lower F are taken, and the number of slots differing from `orig` never exceeds `max`.
    pub fn improve(&mut self, budget: Option<(&[usize], usize)>, max_iters: usize) {
        let p = self.p;
        if p.empty {
            return;
        }
        let mut scratch = Vec::new();
        let (mut fmoves, mut qmoves) = (0, 0);
        for _ in 0..max_iters {
            let crit = self.critical_ranks();
            let cur_changed = budget.map(|(o, _)| slots_changed(&self.row, o));
            // (score, dF, dQ, kind, i, j)
            let mut best: Option<((f64, f64), usize, usize, usize)> = None;
            let consider =
                |d: (f64, f64),
                 slots_delta: isize,
                 kind: usize,
                 i: usize,
                 j: usize,
                 best: &mut Option<((f64, f64), usize, usize, usize)>| {
                    let d = (d.0 + p.lam * d.1, d.1);
                    match budget {
                        None => {
                            if improving(d) && best.is_none_or(|b| better(d, b.0)) {
                                *best = Some((d, kind, i, j));
                            }
                        }
                        Some((_, max)) => {
                            if d.0 >= -EPS {
                                return;
                            }
                            let now = cur_changed.unwrap_or(0) as isize + slots_delta;
                            if now > max as isize {
                                return;
                            }
                            let cost = (slots_delta.max(0) as f64).max(0.25);
                            let score = (d.0 / cost, d.1);
                            if best.is_none_or(|b| better(score, b.0)) {
                                *best = Some((score, kind, i, j));
                            }
                        }
                    }
                };
            let delta_of = |row: &[usize], slots: &[(usize, usize)]| -> isize {
                match budget {
                    None => 0,
                    Some((orig, _)) => slots
                        .iter()
                        .map(|&(slot, newv)| {
                            (newv != orig[slot]) as isize - (row[slot] != orig[slot]) as isize
                        })
                        .sum(),
                }
            };
            for (ci, &a) in crit.iter().enumerate() {
                if (ci > 0 && best.is_some() && budget.is_none()) || ci >= 3 {
                    break;
                }
                // Episodes where `a` is the heaviest rank: a swap can only lower F if it moves
                // load that counts in them off `a`.
                let ks: Vec<usize> = (0..p.w)
                    .filter(|&k| p.omega[k] > 0.0 && self.top[k][0].1 == a)
                    .collect();
                let ya = |e: usize| -> f64 {
                    ks.iter().map(|&k| p.omega[k] * self.y[e * p.w + k]).sum()
                };
                // Partner ranks: the lightest ones in those episodes.
                let mut partners: Vec<(f64, usize)> = (0..p.g)
                    .filter(|&b| b != a)
                    .map(|b| {
                        let l: f64 = ks
                            .iter()
                            .map(|&k| p.omega[k] * self.loads[b * p.w + k])
                            .sum();
                        (l, b)
                    })
                    .collect();
                let limit = PARTNERS;
                if partners.len() > limit {
                    partners.select_nth_unstable_by(limit, |x, y| {
                        x.0.total_cmp(&y.0).then(x.1.cmp(&y.1))
                    });
                    partners.truncate(limit);
                    partners.sort_by_key(|x| x.1);
                }
                let cands: Vec<(usize, f64)> = partners
                    .iter()
                    .flat_map(|&(_, b)| b * p.s..b * p.s + p.s)
                    .map(|j| (j, ya(self.row[j])))
                    .collect();
                for i in a * p.s..a * p.s + p.s {
                    let ye = ya(self.row[i]);
                    for &(j, yj) in &cands {
                        if yj >= ye || !self.swap_valid(i, j) {
                            continue;
                        }
                        let d = self.eval_swap(i, j);
                        if d.0 > EPS && budget.is_some() {
                            continue;
                        }
                        let sd = delta_of(&self.row, &[(i, self.row[j]), (j, self.row[i])]);
                        consider(d, sd, 0, i, j, &mut best);
                    }
                }
            }
            if best.is_none() || budget.is_some() {
                // Replica re-assignment: donors with spare replicas and low per-replica load,
                // receivers with high per-replica load.
                let mut donors: Vec<usize> = (0..p.e).filter(|&e| self.cnt[e] >= 2).collect();
                donors.sort_by(|&a, &b| {
                    (p.agg[a] / self.cnt[a] as f64)
                        .total_cmp(&(p.agg[b] / self.cnt[b] as f64))
                        .then(a.cmp(&b))
                });
                donors.truncate(6);
                let mut recv: Vec<usize> = (0..p.e).filter(|&e| self.cnt[e] < p.max_rep).collect();
                recv.sort_by(|&a, &b| {
                    (p.agg[b] / self.cnt[b] as f64)
                        .total_cmp(&(p.agg[a] / self.cnt[a] as f64))
                        .then(a.cmp(&b))
                });
                recv.truncate(6);
                // Also let any expert on a critical rank be a receiver candidate's donor site.
                for &d in &donors {
                    for &f in &recv {
                        for &i in &self.pos[d].clone() {
                            if !self.rerep_valid(i, f) {
                                continue;
                            }
                            let dd = self.eval_rerep(i, f, &mut scratch);
                            let sd = delta_of(&self.row, &[(i, f)]);
                            consider(dd, sd, 1, i, f, &mut best);
                        }
                    }
                }
            }
            match best {
                Some((d, kind, i, j)) => {
                    if d.0 < -EPS {
                        fmoves += 1;
                    } else {
                        qmoves += 1;
                    }
                    if kind == 0 {
                        self.apply_swap(i, j)
                    } else {
                        self.apply_rerep(i, j)
                    }
                }
                None => break,
            }
        }
        if std::env::var("EPLB_DEBUG").is_ok() {
            eprintln!(
                "F-moves {fmoves} Q-moves {qmoves} budget {}",
                budget.is_some()
            );
        }
        // Guard against drift of incremental load updates.
        self.recompute_loads();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::problem::test_layer;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// The search state's `(F, Q)` is bit for bit [`Problem::objective`]'s (the problem
        /// computes it without a state), on a fresh state and after the state's own moves
        /// (`improve` ends by recomputing its loads: the incrementally updated ones may differ
        /// in the last bits); plans and the searches' proofs compare the two.
        #[test]
        fn state_objective_is_the_problems(
            windows in 1usize..5,
            g in 2usize..6,
            s in 1usize..5,
            loads in proptest::collection::vec(0u32..1000, 80),
            zero_window in proptest::option::of(0usize..4),
            picks in proptest::collection::vec(0usize..1000, 64),
        ) {
            let slots = g * s;
            let e = (slots * 2 / 3).max(2).min(slots);
            let rows: Vec<Vec<f64>> = (0..windows)
                .map(|k| {
                    (0..e)
                        .map(|i| {
                            if zero_window == Some(k) {
                                0.0
                            } else {
                                f64::from(loads[(k * e + i) % 80])
                            }
                        })
                        .collect()
                })
                .collect();
            let (p, _) = test_layer(&rows, g, slots, 0.7);
            // Every expert once, then the spare slots to experts picked by `picks`.
            let mut row: Vec<usize> = (0..e).collect();
            row.extend((e..slots).map(|i| picks[i % 64] % e));
            let mut st = State::new(&p, row.clone());
            let same = |st: &State, p: &Problem| {
                let (a, b) = (st.objective(), p.objective(&st.row));
                a.0.to_bits() == b.0.to_bits() && a.1.to_bits() == b.1.to_bits()
            };
            prop_assert!(same(&st, &p), "{:?} vs {:?}", st.objective(), p.objective(&row));
            st.improve(None, MAX_ITERS);
            prop_assert!(same(&st, &p));
        }
    }
}
