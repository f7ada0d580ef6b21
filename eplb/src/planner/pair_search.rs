//! Two slots per rank, replica counts fixed: the exact search over the pairings of the
//! replicas ([`pair_search`]), which the count search of [`super::pairs`] runs on its leaves
//! (with one episode, where the sorted pairing put one expert twice on a rank; with several,
//! by turns with the caps search of [`super::pair_caps`], since it finds good pairings sooner).

use super::exact::spend_node;
use super::problem::Problem;

/// Exact search over the pairings of fixed replica counts `cnt` (two slots per rank; the count
/// search's leaves with one episode whose sorted pairing put one expert twice on a rank; any
/// number of episodes): the heaviest unpaired replica (episode-weighted) is paired with each
/// expert it may share a rank with, lightest first (replicas of one expert are
/// interchangeable, so each partner expert is tried once). Bound:
/// per episode, the larger of the heaviest pair so far and the sorted pairing of the unpaired
/// replicas (a lower bound for any pairing of them), weighted; and the same for the
/// episode-weighted loads. Returns a pairing below `cut` if one exists, whether the search
/// finished, and the nodes it used.
pub(crate) fn pair_search(
    p: &Problem,
    cnt: &[usize],
    cut: f64,
    budget: usize,
) -> super::exact::ExactResult {
    let mut s = PairSearch {
        p,
        cnt,
        left: cnt.to_vec(),
        pairs: Vec::with_capacity(p.slots() / 2),
        peak: vec![0.0; p.w + 1],
        cut,
        best_row: None,
        nodes: 0,
        budget,
        aborted: false,
        units: Vec::with_capacity(p.slots()),
    };
    s.pair();
    super::exact::ExactResult {
        row: s.best_row,
        proven: !s.aborted,
        nodes: s.nodes,
    }
}

struct PairSearch<'p> {
    p: &'p Problem,
    cnt: &'p [usize],
    /// Unpaired replicas per expert.
    left: Vec<usize>,
    pairs: Vec<(usize, usize)>,
    /// Heaviest pair so far per episode, and (last entry) by episode-weighted load.
    peak: Vec<f64>,
    cut: f64,
    best_row: Option<Vec<usize>>,
    nodes: usize,
    budget: usize,
    aborted: bool,
    units: Vec<f64>,
}

impl PairSearch<'_> {
    /// Load of one replica of `e` in episode `k` (`k == w`: episode-weighted).
    fn size(&self, e: usize, k: usize) -> f64 {
        let p = self.p;
        let v = if k == p.w { p.agg[e] } else { p.x[e * p.w + k] };
        v / self.cnt[e] as f64
    }

    fn peak_with_rest(&mut self, k: usize) -> f64 {
        self.units.clear();
        for e in 0..self.p.e {
            let v = self.size(e, k);
            for _ in 0..self.left[e] {
                self.units.push(v);
            }
        }
        self.units.sort_by(f64::total_cmp);
        let n = self.units.len();
        (0..n / 2)
            .map(|t| self.units[t] + self.units[n - 1 - t])
            .fold(self.peak[k], f64::max)
    }

    fn bound(&mut self) -> f64 {
        let p = self.p;
        let mut total = 0.0;
        for k in 0..p.w {
            if p.omega[k] > 0.0 {
                total += p.omega[k] * self.peak_with_rest(k);
            }
        }
        if p.w > 1 {
            total = total.max(self.peak_with_rest(p.w));
        }
        total
    }

    fn pair(&mut self) {
        if !spend_node(&mut self.nodes, self.budget, &mut self.aborted) {
            return;
        }
        let p = self.p;
        let heaviest = (0..p.e).filter(|&e| self.left[e] > 0).max_by(|&a, &b| {
            self.size(a, p.w)
                .total_cmp(&self.size(b, p.w))
                .then(b.cmp(&a))
        });
        let Some(a) = heaviest else {
            let f: f64 = (0..p.w).map(|k| p.omega[k] * self.peak[k]).sum();
            if f < self.cut {
                self.cut = f - 1e-9;
                self.best_row = Some(self.pairs.iter().flat_map(|&(a, b)| [a, b]).collect());
            }
            return;
        };
        if self.bound() >= self.cut {
            return;
        }
        self.left[a] -= 1;
        let mut partners: Vec<usize> = (0..p.e).filter(|&b| b != a && self.left[b] > 0).collect();
        partners.sort_by(|&x, &y| {
            self.size(x, p.w)
                .total_cmp(&self.size(y, p.w))
                .then(x.cmp(&y))
        });
        // Replicas of one expert are interchangeable: their partners are taken in the order
        // above (the previous replica of `a` was paired with `prev`, so this one pairs with
        // `prev` or a later partner).
        if let Some(&(pa, prev)) = self.pairs.last()
            && pa == a
        {
            let pos = partners.iter().position(|&b| b == prev);
            let first = pos.unwrap_or_else(|| {
                let ps = self.size(prev, p.w);
                partners.partition_point(|&b| {
                    let bs = self.size(b, p.w);
                    bs < ps || (bs == ps && b < prev)
                })
            });
            partners.drain(..first);
        }
        for b in partners {
            self.left[b] -= 1;
            let saved = self.peak.clone();
            for k in 0..=p.w {
                let v = self.size(a, k) + self.size(b, k);
                if v > self.peak[k] {
                    self.peak[k] = v;
                }
            }
            self.pairs.push((a, b));
            self.pair();
            self.pairs.pop();
            self.peak = saved;
            self.left[b] += 1;
            if self.aborted {
                break;
            }
        }
        self.left[a] += 1;
    }
}
