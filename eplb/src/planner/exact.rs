//! Exact branch-and-bound for one layer: replica counts and placement decided together.
//!
//! Experts are taken heaviest first (by their episode-weighted load). At each node the search
//! chooses, for the next expert, its replica count `c` and the `c` ranks that receive its
//! replicas, so every rank load is final as soon as it is written and bounds are exact.
//!
//! * Symmetry: ranks in the same state (same loads in every episode, same free slots) are
//!   interchangeable, so within such a class only one canonical distribution is tried (the
//!   first members get the most replicas). At the root every rank is in one class.
//! * Counts: below the cut every replica count must exceed `agg / cut` (a replica's rank
//!   carries `x / c` in every episode); with the slots left that also caps every count.
//! * Bound (per episode, summed with the episode weights; a lower bound on the objective
//!   `F = sum_w weight_w * max_r load_{w,r}` of every completion), the largest of:
//!   (a) the heaviest rank so far; (b) the water level of the load still to place over the
//!   open ranks; (c) per open rank, its load plus its smallest fill; (d) for the j heaviest open ranks together: their mean with the smallest
//!   fill, and the j-th heaviest plus the largest of the replicas they must take; (e) with two
//!   slots per rank, the sorted pairing of the half-filled ranks' loads and the remaining
//!   replicas' lower bounds.
//! * Feasibility: every slot must be filled and (unless forced) no rank holds an expert twice,
//!   so a rank can never have more free slots than there are experts left. With one episode,
//!   the remaining load must fit under the cut with each rank taking at most its free slots'
//!   worth of the largest replicas that fit on it ([`Search::overfull`]): this is what refutes
//!   near-perfect partitions, where every rank must end just below the cut.
//! * Tail: with one episode, once every open rank has one free slot, only the remaining
//!   experts' counts are enumerated; the sorted assignment is the best for each
//!   ([`Search::one_slot_tail`]).
//! * Seeded with the best objective known; finishing within the node budget proves the
//!   incumbent optimal.

use super::problem::Problem;

/// Node budget of one layer's exact search (about half a second on the slowest instances of
/// the sweep in docs/benchmarks/eplb-exact.md; `joint` gives it a quarter after the
/// rank-by-rank search). Near-perfect partitions (optimum within 0.1% of the mean bound) are
/// the rank-by-rank search's to prove ([`super::ranks`]); multi-window layers with 6-16 ranks
/// stay the hard ones for both.
pub(crate) const EXACT_NODES: usize = 1_000_000;

/// Counts one more node of a budgeted search. False (and `aborted` set) once the budget is
/// spent or the search was already aborted: the caller returns without expanding the node.
pub(crate) fn spend_node(nodes: &mut usize, budget: usize, aborted: &mut bool) -> bool {
    if *aborted {
        return false;
    }
    *nodes += 1;
    if *nodes > budget {
        *aborted = true;
        return false;
    }
    true
}

/// The node budget for a problem: a node costs time in proportion to the episodes, so the
/// budget shrinks with them (1 episode: [`EXACT_NODES`]; 4: 40%; 8: 22%).
pub(crate) fn budget(p: &Problem) -> usize {
    EXACT_NODES * 2 / (p.w + 1)
}

/// Outcome of the exact search.
pub(crate) struct ExactResult {
    /// A placement strictly better than the seed objective, if one exists.
    pub row: Option<Vec<usize>>,
    /// The search finished: nothing is better than the returned row (or than the seed) by
    /// more than its rounding margin (1e-9).
    pub proven: bool,
    /// Nodes the search visited.
    pub nodes: usize,
}

/// Whether the exact search is tried on a layer of this size.
pub(crate) fn eligible(p: &Problem) -> bool {
    !p.empty && p.e <= 24 && p.slots() <= 48
}

struct Search<'p> {
    p: &'p Problem,
    /// Experts, heaviest first.
    order: Vec<usize>,
    /// `rest[i * w + k]`: load of experts `order[i..]` in episode `k`.
    rest: Vec<f64>,
    /// Replica count suggested by water-filling, per position in `order`.
    hint: Vec<usize>,
    loads: Vec<f64>,
    /// Copies of `loads` before each expert's replicas were added (one per depth).
    saved: Vec<f64>,
    free: Vec<usize>,
    /// Per rank, the experts placed on it.
    packs: Vec<Vec<usize>>,
    /// Only placements below this are searched for: the incumbent's objective less a rounding
    /// margin.
    cut: f64,
    best_row: Option<Vec<usize>>,
    nodes: usize,
    budget: usize,
    aborted: bool,
    scratch: Vec<f64>,
    small: Vec<f64>,
    prefix: Vec<f64>,
    open: Vec<(f64, usize)>,
    /// Per position in `order` (from the current depth on): the fewest and the most replicas
    /// the expert can still get in a placement below `cut`.
    cmin: Vec<usize>,
    cmax: Vec<usize>,
    /// Sorted lower bounds of the remaining replicas (`z[t]` <= the t-th smallest).
    z: Vec<f64>,
    pairs: Vec<(f64, usize)>,
    /// Half-filled ranks' loads and remaining replicas, for the pairing bound.
    units: Vec<f64>,
    /// Per remaining expert, its largest replica that fits on one rank ([`Search::overfull`]).
    fit: Vec<f64>,
    /// Every replica size the remaining experts can have, ascending ([`Search::overfull`]).
    sizes: Vec<f64>,
}

/// Runs the exact search on `p`, looking for a placement with objective below `seed_f` (and,
/// once it has one, for better ones). Finished (`proven`), it has found the best placement
/// below `seed_f`, or shown that there is none.
pub(crate) fn solve(p: &Problem, seed_f: f64, budget: usize) -> ExactResult {
    let w = p.w;
    let mut order: Vec<usize> = (0..p.e).collect();
    order.sort_by(|&a, &b| p.agg[b].total_cmp(&p.agg[a]).then(a.cmp(&b)));
    let mut rest = vec![0.0; (p.e + 1) * w];
    for i in (0..p.e).rev() {
        for k in 0..w {
            rest[i * w + k] = rest[(i + 1) * w + k] + p.x[order[i] * w + k];
        }
    }
    let wf = super::problem::water_fill(&p.agg, p.slots(), p.max_rep);
    let hint = order.iter().map(|&e| wf[e]).collect();
    let mut s = Search {
        p,
        order,
        rest,
        hint,
        loads: vec![0.0; p.g * w],
        saved: vec![0.0; p.e * p.g * w],
        free: vec![p.s; p.g],
        packs: vec![Vec::with_capacity(p.s); p.g],
        cut: seed_f - 1e-9,
        best_row: None,
        nodes: 0,
        budget,
        aborted: false,
        scratch: Vec::with_capacity(p.g),
        small: Vec::with_capacity(p.e),
        prefix: Vec::with_capacity(p.slots() + 1),
        open: Vec::with_capacity(p.g),
        cmin: vec![1; p.e],
        cmax: vec![1; p.e],
        z: Vec::with_capacity(p.slots()),
        pairs: Vec::with_capacity(p.e),
        units: Vec::with_capacity(2 * p.slots()),
        fit: Vec::with_capacity(p.e),
        sizes: Vec::with_capacity(p.e * p.g),
    };
    s.expert(0);
    if std::env::var("EPLB_DEBUG").is_ok() {
        eprintln!(
            "exact: below {seed_f} nodes {} proven {}",
            s.nodes, !s.aborted
        );
    }
    ExactResult {
        row: s.best_row,
        proven: !s.aborted,
        nodes: s.nodes,
    }
}

/// The largest sum of two entries of `sizes` (ascending; two different entries, which may
/// belong to one expert: a relaxation) below `cap`, if any pair is.
fn best_pair_below(sizes: &[f64], cap: f64) -> Option<f64> {
    let mut best: Option<f64> = None;
    let (mut lo, mut hi) = (0, sizes.len().checked_sub(1)?);
    while lo < hi {
        let v = sizes[lo] + sizes[hi];
        if v < cap {
            best = Some(best.map_or(v, |b: f64| b.max(v)));
            lo += 1;
        } else {
            hi -= 1;
        }
    }
    best
}

impl Search<'_> {
    /// Sets `cmin`/`cmax` for the experts `order[i..]` from the cut, or returns false when no
    /// completion can get below it. A replica of expert `e` alone puts `x[e][k] / c` on its
    /// rank in every episode, so `F >= agg[e] / c`: below the cut needs `c > agg[e] / cut`.
    /// Without duplicates an expert has at most one replica per open rank.
    fn count_ranges(&mut self, i: usize) -> bool {
        let p = self.p;
        let free_slots: usize = self.free.iter().sum();
        let open = self.free.iter().filter(|&&f| f > 0).count();
        let cap = if p.dup_ok { free_slots } else { open }.min(p.max_rep);
        let mut sum_min = 0;
        for j in i..p.e {
            let a = p.agg[self.order[j]];
            let c = if a > 0.0 && self.cut > 0.0 {
                ((a / self.cut) - 1e-9).ceil().max(1.0) as usize
            } else {
                1
            };
            if c > cap {
                return false;
            }
            self.cmin[j] = c;
            sum_min += c;
        }
        if sum_min > free_slots {
            return false;
        }
        for j in i..p.e {
            self.cmax[j] = cap.min(free_slots - (sum_min - self.cmin[j]));
        }
        true
    }

    /// Lower bound of every completion of the current partial placement, where experts
    /// `order[i..]` are still to be placed with counts in `cmin..=cmax`.
    fn bound(&mut self, i: usize) -> f64 {
        let p = self.p;
        let w = p.w;
        let left = p.e - i;
        let free_slots: usize = self.free.iter().sum();
        let mut total = 0.0;
        for k in 0..w {
            if p.omega[k] == 0.0 {
                continue;
            }
            let mut m = f64::NEG_INFINITY;
            self.scratch.clear();
            for r in 0..p.g {
                let l = self.loads[r * w + k];
                m = m.max(l);
                if self.free[r] > 0 {
                    self.scratch.push(l);
                }
            }
            if left > 0 {
                self.scratch.sort_by(f64::total_cmp);
                // The smallest replica each remaining expert can have, one per expert.
                self.small.clear();
                self.pairs.clear();
                for j in i..p.e {
                    let v = p.x[self.order[j] * w + k] / self.cmax[j] as f64;
                    self.small.push(v);
                    self.pairs.push((v, self.cmax[j]));
                }
                self.small.sort_by(f64::total_cmp);
                self.pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
                // z: sorted lower bounds of the remaining replicas. Two valid ones, taken
                // element by element: every expert has at most cmax copies of at least
                // load / cmax; and every expert has one replica of at least load / cmax, the
                // others at least the smallest of those.
                self.z.clear();
                'fill: for &(v, c) in &self.pairs {
                    for _ in 0..c {
                        if self.z.len() == free_slots {
                            break 'fill;
                        }
                        self.z.push(v);
                    }
                }
                let extra = free_slots - left;
                for t in 0..free_slots {
                    let alt = if t < extra {
                        self.small[0]
                    } else {
                        self.small[t - extra]
                    };
                    if alt > self.z[t] {
                        self.z[t] = alt;
                    }
                }
                self.prefix.clear();
                self.prefix.push(0.0);
                let mut acc = 0.0;
                for &v in &self.z {
                    acc += v;
                    self.prefix.push(acc);
                }
                // (c) every open rank receives its free slots' worth of replicas (of distinct
                // remaining experts unless duplicates are forced).
                for r in 0..p.g {
                    let f = self.free[r];
                    if f == 0 {
                        continue;
                    }
                    let mut fill = self.prefix[f];
                    if !p.dup_ok {
                        fill = fill.max(self.small[..f.min(self.small.len())].iter().sum());
                    }
                    m = m.max(self.loads[r * w + k] + fill);
                }
                // (d) the j heaviest open ranks together receive n_j = their free slots'
                // replicas: their mean final load is at least (loads + z_1 + .. + z_{n_j}) / j;
                // and one of them receives a replica of at least z_{n_j}, which with its other
                // free slots (at least the smallest replicas) lands on a load of at least the
                // j-th heaviest's.
                self.open.clear();
                self.open.extend(
                    (0..p.g)
                        .filter(|&r| self.free[r] > 0)
                        .map(|r| (self.loads[r * w + k], self.free[r])),
                );
                self.open.sort_by(|a, b| b.0.total_cmp(&a.0));
                let (mut sum_l, mut sum_f, mut min_f) = (0.0, 0usize, usize::MAX);
                for (idx, &(l, f)) in self.open.iter().enumerate() {
                    sum_l += l;
                    sum_f += f;
                    min_f = min_f.min(f);
                    m = m.max((sum_l + self.prefix[sum_f]) / (idx + 1) as f64);
                    m = m.max(l + self.z[sum_f - 1] + self.prefix[min_f - 1]);
                }
                // (e) two slots per rank: the final ranks pair the loads of the half-filled
                // ranks and the remaining replicas (at least z). Pairing that multiset
                // freely (heaviest with lightest: optimal for pairs) cannot do better, and
                // its value grows with the replicas.
                if p.s == 2 {
                    self.units.clear();
                    self.units
                        .extend(self.open.iter().filter(|o| o.1 == 1).map(|o| o.0));
                    self.units.extend_from_slice(&self.z);
                    self.units.sort_by(f64::total_cmp);
                    let n = self.units.len();
                    for t in 0..n / 2 {
                        m = m.max(self.units[t] + self.units[n - 1 - t]);
                    }
                }
                // (b) water level of the remaining load over the open ranks. (Capping each
                // rank's share at its largest possible fill was tried: 60% more time per node
                // and no instance of the sweep proven that was not before.)
                let remaining = self.rest[i * w + k];
                let n = self.scratch.len();
                let mut prefix = 0.0;
                let mut level = f64::INFINITY;
                for j in 0..n {
                    prefix += self.scratch[j];
                    let h = (prefix + remaining) / (j + 1) as f64;
                    if j + 1 == n || h <= self.scratch[j + 1] {
                        level = h;
                        break;
                    }
                }
                m = m.max(level);
            }
            total += p.omega[k] * m;
        }
        total
    }

    fn expert(&mut self, i: usize) {
        if !spend_node(&mut self.nodes, self.budget, &mut self.aborted) {
            return;
        }
        let p = self.p;
        let left = p.e - i;
        let free_slots: usize = self.free.iter().sum();
        if left == 0 {
            let f = self.bound(i);
            if f < self.cut && free_slots == 0 {
                self.cut = f - 1e-9;
                let mut row = Vec::with_capacity(p.slots());
                for pack in &self.packs {
                    row.extend_from_slice(pack);
                }
                self.best_row = Some(row);
            }
            return;
        }
        // Without forced duplicates every remaining expert puts at most one replica per rank.
        if !p.dup_ok && self.free.iter().any(|&f| f > left) {
            return;
        }
        if !self.count_ranges(i) || self.bound(i) >= self.cut || self.overfull(i) {
            return;
        }
        if p.w == 1 && self.free.iter().all(|&f| f <= 1) {
            self.one_slot_tail(i);
            return;
        }
        let (cmin, cmax) = if left == 1 {
            (free_slots, free_slots)
        } else {
            (self.cmin[i], self.cmax[i])
        };
        if cmin < self.cmin[i] || cmax > self.cmax[i] || cmin > cmax {
            return;
        }
        // Counts nearest the water-filling suggestion first.
        let hint = self.hint[i].clamp(cmin, cmax);
        let mut counts: Vec<usize> = (cmin..=cmax).collect();
        counts.sort_by_key(|&c| (c.abs_diff(hint), std::cmp::Reverse(c)));
        let classes = self.classes();
        let mut take = vec![0usize; p.g];
        let agg = p.agg[self.order[i]];
        for c in counts {
            // A better incumbent found meanwhile may rule this count out.
            if agg / c as f64 >= self.cut + 1e-9 {
                continue;
            }
            self.distribute(i, c, &classes, 0, &mut take);
            if self.aborted {
                return;
            }
        }
    }

    /// One episode (without forced duplicates): the load still to place cannot go anywhere
    /// below the cut. Each open rank can take at most the sum of its free slots' worth of the
    /// largest replicas that fit under the cut on it (one per remaining expert: the largest
    /// `x / c` below `cut - load` with `c` in the expert's count range; with two free slots,
    /// the largest sum of two replica sizes below `cut - load`), and never more than
    /// `cut - load`. If those capacities together fall short of the remaining load, every
    /// completion puts some rank at or above the cut.
    ///
    /// The plain water level (part of [`Self::bound`]) lets each rank fill up to the cut;
    /// this one sees that a rank whose last slot no replica fits closely loses the
    /// difference, which is what refutes near-perfect partitions: below a cut of
    /// `1 + d` (mean 1) every rank must end within `g * d` of the cut.
    fn overfull(&mut self, i: usize) -> bool {
        let p = self.p;
        if p.w != 1 || p.dup_ok {
            return false;
        }
        let remaining = self.rest[i];
        let mut capacity = 0.0;
        let mut sizes_ready = false;
        for r in 0..p.g {
            let f = self.free[r];
            if f == 0 {
                continue;
            }
            let cap = self.cut - self.loads[r];
            if cap <= 0.0 {
                return true;
            }
            self.fit.clear();
            for j in i..p.e {
                let x = p.x[self.order[j]];
                // Fewest replicas (within the range) that bring one below `cap`.
                let c = ((x / cap).floor() as usize + 1).max(self.cmin[j]);
                if c <= self.cmax[j] {
                    self.fit.push(x / c as f64);
                }
            }
            if self.fit.len() < f {
                return true;
            }
            let fill = match f {
                1 => self.fit.iter().copied().fold(0.0, f64::max),
                2 => {
                    if !sizes_ready {
                        self.replica_sizes(i);
                        sizes_ready = true;
                    }
                    match best_pair_below(&self.sizes, cap) {
                        Some(v) => v,
                        None => return true,
                    }
                }
                _ => {
                    self.fit.sort_by(|a, b| b.total_cmp(a));
                    self.fit[..f].iter().sum()
                }
            };
            capacity += fill.min(cap);
        }
        capacity < remaining - 1e-9
    }

    /// Every replica size the remaining experts can have (`x / c`, `c` in the count range),
    /// ascending.
    fn replica_sizes(&mut self, i: usize) {
        let p = self.p;
        self.sizes.clear();
        for j in i..p.e {
            let x = p.x[self.order[j]];
            for c in self.cmin[j]..=self.cmax[j] {
                self.sizes.push(x / c as f64);
            }
        }
        self.sizes.sort_by(f64::total_cmp);
    }

    /// One episode, every open rank with one free slot: the remaining experts `order[i..]`
    /// fill those slots, one replica per rank, so only their counts are left to choose. For
    /// given counts the best assignment puts the largest replica on the lightest open rank,
    /// the second largest on the second lightest, and so on (exchanging any two replicas
    /// against that order never lowers the heavier of their two ranks). So the search
    /// enumerates count vectors (one node each) instead of rank subsets per expert, which
    /// near the leaves of near-perfect partitions is most of the tree.
    fn one_slot_tail(&mut self, i: usize) {
        let p = self.p;
        let mut open: Vec<(f64, usize)> = (0..p.g)
            .filter(|&r| self.free[r] == 1)
            .map(|r| (self.loads[r], r))
            .collect();
        open.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let closed_max = (0..p.g)
            .filter(|&r| self.free[r] == 0)
            .map(|r| self.loads[r])
            .fold(f64::NEG_INFINITY, f64::max);
        let mut cnt = vec![0usize; p.e - i];
        let mut items = Vec::with_capacity(open.len());
        self.tail_counts(i, 0, open.len(), &open, closed_max, &mut cnt, &mut items);
    }

    /// Chooses the count of `order[i + j]` (within its range, leaving enough slots for the
    /// experts after it), then the next; at the end scores the sorted assignment.
    #[allow(clippy::too_many_arguments)]
    fn tail_counts(
        &mut self,
        i: usize,
        j: usize,
        left: usize,
        open: &[(f64, usize)],
        closed_max: f64,
        cnt: &mut [usize],
        items: &mut Vec<(f64, usize)>,
    ) {
        if self.aborted {
            return;
        }
        let p = self.p;
        let k = cnt.len();
        if j == k {
            if left != 0 || !spend_node(&mut self.nodes, self.budget, &mut self.aborted) {
                return;
            }
            items.clear();
            for (t, &c) in cnt.iter().enumerate() {
                let e = self.order[i + t];
                items.extend(std::iter::repeat_n((p.x[e] / c as f64, e), c));
            }
            items.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let f = open
                .iter()
                .zip(items.iter())
                .map(|(o, it)| o.0 + it.0)
                .fold(closed_max, f64::max);
            if f < self.cut {
                self.cut = f - 1e-9;
                let mut packs = self.packs.clone();
                for (o, it) in open.iter().zip(items.iter()) {
                    packs[o.1].push(it.1);
                }
                self.best_row = Some(packs.concat());
            }
            return;
        }
        let rest_min: usize = self.cmin[i + j + 1..p.e].iter().sum();
        let Some(room) = left.checked_sub(rest_min) else {
            return;
        };
        let (lo, hi) = if j + 1 == k {
            (left, left)
        } else {
            (self.cmin[i + j], self.cmax[i + j].min(room))
        };
        if lo < self.cmin[i + j] || hi > self.cmax[i + j] {
            return;
        }
        let x = p.x[self.order[i + j]];
        for c in lo..=hi {
            // A replica alone on a rank must stay below the cut.
            if x / c as f64 >= self.cut + 1e-9 {
                continue;
            }
            cnt[j] = c;
            self.tail_counts(i, j + 1, left - c, open, closed_max, cnt, items);
            if self.aborted {
                return;
            }
        }
    }

    /// Open ranks grouped into classes of identical state, lightest class first.
    fn classes(&self) -> Vec<Vec<usize>> {
        let p = self.p;
        let w = p.w;
        let mut open: Vec<usize> = (0..p.g).filter(|&r| self.free[r] > 0).collect();
        let key = |r: usize| -> f64 {
            (0..w)
                .map(|k| p.omega[k] * self.loads[r * w + k])
                .sum::<f64>()
        };
        open.sort_by(|&a, &b| key(a).total_cmp(&key(b)).then(a.cmp(&b)));
        let mut classes: Vec<Vec<usize>> = Vec::new();
        for r in open {
            let same = |q: usize| {
                self.free[q] == self.free[r]
                    && self.loads[q * w..q * w + w] == self.loads[r * w..r * w + w]
            };
            match classes.iter_mut().find(|c| same(c[0])) {
                Some(c) => c.push(r),
                None => classes.push(vec![r]),
            }
        }
        classes
    }

    /// Spreads `c` replicas of expert `order[i]` over the classes from `ci` on (canonical:
    /// inside a class, non-increasing per member), then recurses to the next expert.
    fn distribute(
        &mut self,
        i: usize,
        c: usize,
        classes: &[Vec<usize>],
        ci: usize,
        take: &mut Vec<usize>,
    ) {
        if self.aborted {
            return;
        }
        if c == 0 {
            // Loads are restored from a copy, not by subtraction, so that equal rank states
            // stay bit-identical (the symmetry classes compare them exactly).
            let n = self.loads.len();
            self.saved[i * n..(i + 1) * n].copy_from_slice(&self.loads);
            self.apply(i, take, true);
            self.expert(i + 1);
            self.apply(i, take, false);
            let (loads, saved) = (&mut self.loads, &self.saved);
            loads.copy_from_slice(&saved[i * n..(i + 1) * n]);
            return;
        }
        if ci == classes.len() {
            return;
        }
        let p = self.p;
        let class = &classes[ci];
        let per = if p.dup_ok { self.free[class[0]] } else { 1 };
        let room: usize =
            per * class.len() + classes[ci + 1..].iter().map(|c| c.len()).sum::<usize>() * p.s;
        if room < c {
            return;
        }
        let most = c.min(per * class.len());
        // Heaviest share to the lightest class first: the first solution is LPT-like.
        for t in (0..=most).rev() {
            self.split(i, c - t, t, per, classes, ci, 0, t, take);
            if self.aborted {
                return;
            }
        }
    }

    /// Inside class `ci`, gives member `mi` on a non-increasing share of the `t` replicas
    /// (each at most `cap` and at most `per`), then moves on to the next class with `rest_c`.
    #[allow(clippy::too_many_arguments)]
    fn split(
        &mut self,
        i: usize,
        rest_c: usize,
        t: usize,
        per: usize,
        classes: &[Vec<usize>],
        ci: usize,
        mi: usize,
        cap: usize,
        take: &mut Vec<usize>,
    ) {
        let class = &classes[ci];
        if t == 0 {
            self.distribute(i, rest_c, classes, ci + 1, take);
            return;
        }
        if mi == class.len() {
            return;
        }
        let members_left = class.len() - mi;
        let hi = t.min(per).min(cap);
        for m in (1..=hi).rev() {
            if m * members_left < t {
                break;
            }
            take[class[mi]] = m;
            self.split(i, rest_c, t - m, per, classes, ci, mi + 1, m, take);
            take[class[mi]] = 0;
            if self.aborted {
                return;
            }
        }
    }

    /// Places (`add`) or takes back the replicas of `order[i]` given by `take` (loads are
    /// restored by the caller).
    fn apply(&mut self, i: usize, take: &[usize], add: bool) {
        let p = self.p;
        let w = p.w;
        let e = self.order[i];
        let c: usize = take.iter().sum();
        for (r, &m) in take.iter().enumerate() {
            if m == 0 {
                continue;
            }
            if add {
                for k in 0..w {
                    self.loads[r * w + k] += m as f64 * p.x[e * w + k] / c as f64;
                }
                self.free[r] -= m;
                for _ in 0..m {
                    self.packs[r].push(e);
                }
            } else {
                self.free[r] += m;
                let n = self.packs[r].len();
                self.packs[r].truncate(n - m);
            }
        }
    }
}
