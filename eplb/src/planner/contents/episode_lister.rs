//! Listing a rank's contents for several episodes, pruned in every episode at once (the cover
//! search for several episodes, [`crate::planner::episodes`]); [`super::Lister`] is the one-episode
//! version.

use super::Sink;
use super::suffix_sums::SuffixSums;
use std::cell::Cell;

/// Lists the contents of a rank for several episodes, pruned in every episode at once.
///
/// [`super::Lister`] prunes on one number (the episode-weighted load) and leaves the episodes to the
/// sink: with eight slots per rank that is most of the work (a 16-expert 4 x 8 layer with
/// four windows, a cut 0.1% above the mean: 2.4-4.0M contents in the window of the weighted
/// load, 850-2,400 of them below the cut in every episode, 6-16M nodes, 0.35-1.2 s). A rank
/// with loads `L_k` below a cut `T` has `sum_k w_k max(L_k, (total_k - L_k) / (G - 1)) < T`
/// (the other ranks carry the rest, and their heaviest is at least their mean); each term is
/// convex in `L_k`, smallest at `L_k = total_k / G`, so over a box of loads its least value is
/// at that point clamped into the box. Here the box is, per episode, the load picked so far
/// plus the least and the most the members still to pick can add (the sums of the smallest
/// and of the largest replicas of the experts left, per episode): a branch whose box cannot
/// hold a rank below the cut is cut off.
///
/// Those bounds take the members left one at a time; what they leave open near the mean is
/// the discrete part. A rank below the cut has its episode-weighted load in a window of width
/// `G (T - mean)` (a 16-expert 4 x 8 layer: 0.008 times the mean at 0.2% above it), and the two
/// or three members a branch has left must bring it there: their sets are listed once, sorted
/// by that load ([`SuffixSums`]), and a branch is cut when none lies in its window; the last
/// two members are those sets in the window, each checked exactly.
pub(in crate::planner) struct EpisodeLister<'a> {
    /// Positions are experts heaviest first (episode-weighted).
    order: Vec<usize>,
    fewest: Vec<usize>,
    cap: usize,
    w: usize,
    omega: &'a [f64],
    total: &'a [f64],
    /// Ranks besides the one being listed (`G - 1`).
    others: f64,
    /// `least[(j * (s + 1) + n) * w + k]` / `most[..]`: the least / most `n` members at
    /// positions from `j` on add to episode `k` (each member's smallest / largest replica).
    least: Vec<f64>,
    most: Vec<f64>,
    s: usize,
    /// The linear lower bounds of the rank's term (built in [`EpisodeLister::reusing`], tested in
    /// [`EpisodeLister::hopeless`]), for up to [`MAX_FORM_EPISODES`] episodes: `constant[f]`
    /// (its constant term) and `least_form[(j * (s + 1) + n) * forms + f]`, the least `n`
    /// members from position `j` on add to form `f`.
    constant: Vec<f64>,
    least_form: Vec<f64>,
    forms: usize,
    /// Per replica `r = j * (cap + 1) + c` (position `j`, count `c`): its loads per episode
    /// (`rep[r * w + k]`) and what it adds to each linear bound (`rep_form[r * forms + f]`).
    rep: Vec<f64>,
    rep_form: Vec<f64>,
    /// Every replica as `(episode-weighted load, position, count)`, lightest first, and the
    /// episode-weighted load of all the experts (`sum_k w_k total_k`).
    last: Vec<(f64, usize, usize)>,
    whole: f64,
    /// Every replica's episode-weighted load (`weighted[r]`, `r` as `rep`).
    weighted: Vec<f64>,
    /// The sets of two (with their members) and of three replicas the rank's last members
    /// may be ([`SuffixSums`]; empty below two or three slots per rank).
    pairs: SuffixSums,
    triples: SuffixSums,
    /// Window lookups and pairs scanned, not yet charged (a node per [`WORK_PER_NODE`]).
    work: Cell<usize>,
    /// Contents below this (with the rounding margin of the caller).
    cut: f64,
}

/// The sets of two and three replicas of an [`EpisodeLister`] and what they were built with
/// (the fewest replicas per position, the most replicas, the slots per rank).
pub(in crate::planner) struct Sets {
    fewest: Vec<usize>,
    cap: usize,
    s: usize,
    pairs: SuffixSums,
    triples: SuffixSums,
}

/// Window lookups and pairs scanned per node charged. Measured on the ten zipf 16-expert
/// 4 x 8 layers with four windows (listing alone, 0.2% above the mean): about 200 ns per node
/// of the listing, 15-40 ns per lookup or pair scanned; the nodes charged cost about 290 ns
/// each with eight, where a node cost about 300 ns before the lookups (so a layer that spends
/// its budget is not slower for them).
const WORK_PER_NODE: usize = 8;

/// Episodes up to which [`EpisodeLister`] adds its `2^w` linear bounds (16 with four).
const MAX_FORM_EPISODES: usize = 4;

impl<'a> EpisodeLister<'a> {
    /// `x[e * w + k]`: expert `e`'s load in episode `k`; `agg[e]`: its episode-weighted load
    /// (the positions' order); `fewest[e]`: its fewest replicas (at most `cap + 1`, which
    /// leaves it no replica); contents of `s` members on one of `g` ranks, below `cut`.
    #[cfg(test)]
    #[allow(clippy::too_many_arguments)]
    pub(in crate::planner) fn new(
        x: &[f64],
        agg: &[f64],
        omega: &'a [f64],
        total: &'a [f64],
        fewest: &[usize],
        cap: usize,
        g: usize,
        s: usize,
        cut: f64,
    ) -> EpisodeLister<'a> {
        Self::reusing(x, agg, omega, total, fewest, cap, g, s, cut, None)
    }

    /// A lister (arguments as `new`, which builds every set anew: `x[e * w + k]` expert `e`'s
    /// load in episode `k`, `agg[e]` its episode-weighted load, `fewest[e]` its fewest
    /// replicas, contents of `s` members on one of `g` ranks below `cut`), taking the sets of
    /// two and three replicas from `sets_given` (what [`Self::into_sets`] gave back from a
    /// lister of the same layer) when they were built with the same fewest replicas, most
    /// replicas and slots (they depend on nothing else); otherwise built anew. Building them
    /// is most of a listing's time on the probes of an ascent just above the mean with four
    /// slots per rank (16 experts on 8 x 4: 1.2M sets of three, sorted, per listing), and
    /// consecutive probes mostly share the fewest replicas.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::planner) fn reusing(
        x: &[f64],
        agg: &[f64],
        omega: &'a [f64],
        total: &'a [f64],
        fewest: &[usize],
        cap: usize,
        g: usize,
        s: usize,
        cut: f64,
        sets_given: Option<Sets>,
    ) -> EpisodeLister<'a> {
        let (e, w) = (agg.len(), omega.len());
        let mut order: Vec<usize> = (0..e).collect();
        order.sort_by(|&a, &b| agg[b].total_cmp(&agg[a]).then(a.cmp(&b)));
        let fewest: Vec<usize> = order.iter().map(|&i| fewest[i]).collect();
        let x: Vec<f64> = order
            .iter()
            .flat_map(|&i| x[i * w..(i + 1) * w].iter().copied())
            .collect();
        let mut least = vec![0.0; (e + 1) * (s + 1) * w];
        let mut most = vec![0.0; (e + 1) * (s + 1) * w];
        for j in 0..e {
            for k in 0..w {
                let mut small: Vec<f64> = (j..e)
                    .filter(|&i| fewest[i] <= cap)
                    .map(|i| x[i * w + k] / cap as f64)
                    .collect();
                let mut large: Vec<f64> = (j..e)
                    .filter(|&i| fewest[i] <= cap)
                    .map(|i| x[i * w + k] / fewest[i] as f64)
                    .collect();
                small.sort_by(f64::total_cmp);
                large.sort_by(|a, b| b.total_cmp(a));
                let (mut lo, mut hi) = (0.0, 0.0);
                for n in 1..=s {
                    // Fewer experts left than members to pick: the box is empty.
                    lo += small.get(n - 1).copied().unwrap_or(f64::INFINITY);
                    hi += large.get(n - 1).copied().unwrap_or(f64::NEG_INFINITY);
                    least[(j * (s + 1) + n) * w + k] = lo;
                    most[(j * (s + 1) + n) * w + k] = hi;
                }
            }
        }
        for n in 1..=s {
            for k in 0..w {
                least[(e * (s + 1) + n) * w + k] = f64::INFINITY;
                most[(e * (s + 1) + n) * w + k] = f64::NEG_INFINITY;
            }
        }
        // Linear bounds: `max(L, (total - L) / (G - 1))` is at least either argument, so for
        // each choice per episode (bit `k` of `f`: the load itself, else the other ranks'
        // mean) `sum_k w_k (choice_k)` is a linear lower bound of the rank's term, and the
        // least a set of members adds to it is taken over one set of members for all
        // episodes at once (the box above takes each episode's extreme members apart).
        let others = g.saturating_sub(1) as f64;
        let forms = if others > 0.0 && w <= MAX_FORM_EPISODES {
            1 << w
        } else {
            0
        };
        let mut coef = vec![0.0; forms * w];
        let mut constant = vec![0.0; forms];
        for f in 0..forms {
            for k in 0..w {
                if f >> k & 1 == 1 {
                    coef[f * w + k] = omega[k];
                } else {
                    coef[f * w + k] = -omega[k] / others;
                    constant[f] += omega[k] * total[k] / others;
                }
            }
        }
        let mut least_form = vec![0.0; (e + 1) * (s + 1) * forms];
        for j in 0..=e {
            for f in 0..forms {
                // Each member's least addition to the form over its counts (`v / c` is
                // smallest at the most replicas when `v >= 0`, else at the fewest).
                let mut adds: Vec<f64> = (j..e)
                    .filter(|&i| fewest[i] <= cap)
                    .map(|i| {
                        let v: f64 = (0..w).map(|k| coef[f * w + k] * x[i * w + k]).sum();
                        if v >= 0.0 {
                            v / cap as f64
                        } else {
                            v / fewest[i] as f64
                        }
                    })
                    .collect();
                adds.sort_by(f64::total_cmp);
                let mut sum = 0.0;
                for n in 1..=s {
                    sum += adds.get(n - 1).copied().unwrap_or(f64::INFINITY);
                    least_form[(j * (s + 1) + n) * forms + f] = sum;
                }
            }
        }
        let mut rep = vec![0.0; e * (cap + 1) * w];
        let mut rep_form = vec![0.0; e * (cap + 1) * forms];
        for j in 0..e {
            for c in 1..=cap {
                let r = j * (cap + 1) + c;
                for k in 0..w {
                    rep[r * w + k] = x[j * w + k] / c as f64;
                }
                for f in 0..forms {
                    rep_form[r * forms + f] =
                        (0..w).map(|k| coef[f * w + k] * rep[r * w + k]).sum();
                }
            }
        }
        let weighted: Vec<f64> = (0..e * (cap + 1))
            .map(|r| (0..w).map(|k| omega[k] * rep[r * w + k]).sum())
            .collect();
        let mut last: Vec<(f64, usize, usize)> = (0..e)
            .flat_map(|j| (fewest[j]..=cap).map(move |c| (j, c)))
            .map(|(j, c)| (weighted[j * (cap + 1) + c], j, c))
            .collect();
        last.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let whole = (0..w).map(|k| omega[k] * total[k]).sum();
        let sets = |n: usize, keep: bool| {
            // Fewer slots than that: no branch has that many members left. (Three members
            // left are only looked up on a branch with four to pick, `list_from` going on
            // below it: with three slots per rank the sets of three, 112,000 on 12 experts
            // with up to 8 replicas, are never read.)
            let used = if n == 3 { s > n } else { s >= n };
            let fewest = if used {
                fewest.clone()
            } else {
                vec![cap + 1; e]
            };
            SuffixSums::new(&weighted, &fewest, cap, n, keep)
        };
        let (pairs, triples) = match sets_given {
            Some(given) if given.fewest == fewest && given.cap == cap && given.s == s => {
                (given.pairs, given.triples)
            }
            _ => (sets(2, true), sets(3, false)),
        };
        EpisodeLister {
            weighted,
            pairs,
            triples,
            work: Cell::new(0),
            order,
            rep,
            rep_form,
            last,
            whole,
            fewest,
            cap,
            w,
            omega,
            total,
            others,
            least,
            most,
            s,
            constant,
            least_form,
            forms,
            cut,
        }
    }

    /// The sets of two and three replicas, for [`Self::reusing`].
    pub(in crate::planner) fn into_sets(self) -> Sets {
        Sets {
            fewest: self.fewest,
            cap: self.cap,
            s: self.s,
            pairs: self.pairs,
            triples: self.triples,
        }
    }

    /// Sends every content of `s` members below the cut to `sink` (with its
    /// episode-weighted load), in lexicographic order of the positions of all members but the
    /// last. False when the sink stopped it or the budget ran out.
    pub(in crate::planner) fn list(&self, sink: &mut impl Sink) -> bool {
        let mut picked: Vec<(usize, usize)> = Vec::with_capacity(self.s);
        let mut sums = vec![0.0; (self.s + 1) * self.w];
        let mut form_sums = self.constant.clone();
        form_sums.resize((self.s + 1) * self.forms, 0.0);
        self.list_from(0, &mut sums, &mut form_sums, &mut picked, sink)
    }

    /// Whether no rank whose episode loads are `sums` (and linear bounds `form_sums`) plus
    /// what `n` members from position `j` on add can be below the cut: some linear bound
    /// reaches it, or the least `sum_k w_k max(L_k, (total_k - L_k) / (G - 1))` over the box.
    fn hopeless(&self, sums: &[f64], form_sums: &[f64], j: usize, n: usize) -> bool {
        let at = (j * (self.s + 1) + n) * self.forms;
        let least = &self.least_form[at..at + self.forms];
        if form_sums.iter().zip(least).any(|(f, l)| f + l >= self.cut) {
            return true;
        }
        let w = self.w;
        let at = (j * (self.s + 1) + n) * w;
        let (least, most) = (&self.least[at..at + w], &self.most[at..at + w]);
        let mut f = 0.0;
        for (k, ((&sum, &least), &most)) in sums.iter().zip(least).zip(most).enumerate() {
            let (lo, hi) = (sum + least, sum + most);
            if lo > hi {
                return true;
            }
            let v = if self.others > 0.0 {
                let l = (self.total[k] / (self.others + 1.0)).clamp(lo, hi);
                l.max((self.total[k] - l) / self.others)
            } else {
                lo
            };
            f += self.omega[k] * v;
        }
        f >= self.cut
    }

    /// Puts `c` replicas of the expert at position `j` on the rank holding `d` members: the
    /// per-episode and per-form sums of depth `d + 1` from those of depth `d`. False when no
    /// `n` more members from the positions after `j` can complete it below the cut.
    fn extend(
        &self,
        d: usize,
        j: usize,
        c: usize,
        n: usize,
        sums: &mut [f64],
        form_sums: &mut [f64],
    ) -> bool {
        let (w, forms) = (self.w, self.forms);
        let (at, next) = (d * w, (d + 1) * w);
        let (fat, fnext) = (d * forms, (d + 1) * forms);
        let r = j * (self.cap + 1) + c;
        for k in 0..w {
            sums[next + k] = sums[at + k] + self.rep[r * w + k];
        }
        for f in 0..forms {
            form_sums[fnext + f] = form_sums[fat + f] + self.rep_form[r * forms + f];
        }
        let sets = match n {
            2 => Some(&self.pairs),
            3 => Some(&self.triples),
            _ => None,
        };
        if let Some(sets) = sets {
            self.work.set(self.work.get() + 1);
            let (lo, hi) = self.window(&sums[next..next + w]);
            if !sets.any_in(j + 1, lo, hi) {
                return false;
            }
        }
        !self.hopeless(
            &sums[next..next + w],
            &form_sums[fnext..fnext + forms],
            j + 1,
            n,
        )
    }

    /// The last member: its replica must bring the episode-weighted load into the window
    /// every rank below the cut lies in (at most the cut, and at least what leaves the other
    /// ranks a mean below it), looked up among every replica by that load; each one in the
    /// window is checked exactly and costs a node. (Trying every replica with the bounds was
    /// most of the listing: on 16-expert 4 x 8 layers 0.4-2.6M nodes even 1e-6 above the mean,
    /// where nothing is listed.)
    fn list_last(
        &self,
        from: usize,
        sums: &mut [f64],
        form_sums: &mut [f64],
        picked: &mut Vec<(usize, usize)>,
        sink: &mut impl Sink,
    ) -> bool {
        let w = self.w;
        let d = picked.len();
        let next = (d + 1) * w;
        let (lo, hi) = self.window(&sums[d * w..next]);
        let start = self.last.partition_point(|r| r.0 < lo);
        for &(size, j, c) in &self.last[start..] {
            if size >= hi {
                break;
            }
            if j < from {
                continue;
            }
            if !sink.spend() {
                return false;
            }
            if !self.extend(d, j, c, 0, sums, form_sums) {
                continue;
            }
            picked.push((self.order[j], c));
            let here = &sums[next..next + w];
            let weighted = here.iter().zip(self.omega).map(|(l, o)| l * o).sum();
            let ok = sink.add(weighted, picked);
            picked.pop();
            if !ok {
                return false;
            }
        }
        true
    }

    /// The window the episode-weighted load of the members still to pick lies in if the rank,
    /// whose loads so far are `here`, is to be below the cut: at most the cut, and at least
    /// what leaves the other ranks a mean below it (`sum_k w_k L_k` and that mean are both at
    /// most the rank's bound). With a margin on both ends: an exact test decides.
    fn window(&self, here: &[f64]) -> (f64, f64) {
        let so_far: f64 = here.iter().zip(self.omega).map(|(l, o)| l * o).sum();
        let hi = self.cut - so_far + 1e-9;
        let lo = if self.others > 0.0 {
            self.whole - self.others * self.cut - so_far - 1e-9
        } else {
            f64::NEG_INFINITY
        };
        (lo, hi)
    }

    /// Charges the window lookups and scans done so far, a node per [`WORK_PER_NODE`]; false
    /// when the budget is spent.
    fn charge(&self, sink: &mut impl Sink) -> bool {
        while self.work.get() >= WORK_PER_NODE {
            self.work.set(self.work.get() - WORK_PER_NODE);
            if !sink.spend() {
                return false;
            }
        }
        true
    }

    /// The last two members: the pairs in the window (see [`EpisodeLister::window`]), each
    /// checked exactly (the rank's bound at its loads), those below the cut sent in the order
    /// the member-by-member listing sends them (the first member's position and count, then
    /// the last replica's weighted load, position and count, as [`EpisodeLister::list_last`]).
    fn list_pair(
        &self,
        from: usize,
        sums: &[f64],
        picked: &mut Vec<(usize, usize)>,
        sink: &mut impl Sink,
    ) -> bool {
        // The lookup and the pairs scanned are the work here (charged with the rest).
        self.work.set(self.work.get() + 1);
        let (w, cap1) = (self.w, self.cap + 1);
        let d = picked.len();
        let here = &sums[d * w..(d + 1) * w];
        let (lo, hi) = self.window(here);
        let mut hits: Vec<(usize, usize, f64, usize, usize, f64)> = Vec::new();
        let mut loads = vec![0.0; w];
        for pair in self.pairs.in_window(from, lo, hi) {
            self.work.set(self.work.get() + 1);
            let (r1, r2) = (pair[0] as usize, pair[1] as usize);
            for (k, l) in loads.iter_mut().enumerate() {
                *l = here[k] + self.rep[r1 * w + k] + self.rep[r2 * w + k];
            }
            if self.bound(&loads) >= self.cut {
                continue;
            }
            let weighted = loads.iter().zip(self.omega).map(|(l, o)| l * o).sum();
            hits.push((
                r1 / cap1,
                r1 % cap1,
                self.weighted[r2],
                r2 / cap1,
                r2 % cap1,
                weighted,
            ));
        }
        if !self.charge(sink) {
            return false;
        }
        hits.sort_by(|a, b| {
            (a.0, a.1)
                .cmp(&(b.0, b.1))
                .then(a.2.total_cmp(&b.2))
                .then((a.3, a.4).cmp(&(b.3, b.4)))
        });
        for (j1, c1, _, j2, c2, weighted) in hits {
            picked.push((self.order[j1], c1));
            picked.push((self.order[j2], c2));
            let ok = sink.add(weighted, picked);
            picked.truncate(d);
            if !ok {
                return false;
            }
        }
        true
    }

    /// The rank's bound `sum_k w_k max(L_k, (total_k - L_k) / (G - 1))` at loads `L`.
    fn bound(&self, loads: &[f64]) -> f64 {
        let mut f = 0.0;
        for (k, &l) in loads.iter().enumerate() {
            let v = if self.others > 0.0 {
                l.max((self.total[k] - l) / self.others)
            } else {
                l
            };
            f += self.omega[k] * v;
        }
        f
    }

    fn list_from(
        &self,
        from: usize,
        sums: &mut [f64],
        form_sums: &mut [f64],
        picked: &mut Vec<(usize, usize)>,
        sink: &mut impl Sink,
    ) -> bool {
        let (w, forms) = (self.w, self.forms);
        let d = picked.len();
        let need = self.s - d;
        if need == 0 {
            let here = &sums[d * w..(d + 1) * w];
            let weighted = here.iter().zip(self.omega).map(|(l, o)| l * o).sum();
            return sink.add(weighted, picked);
        }
        if need == 1 {
            return self.list_last(from, sums, form_sums, picked, sink);
        }
        if need == 2 {
            return self.list_pair(from, sums, picked, sink);
        }
        if !sink.spend() {
            return false;
        }
        let e = self.order.len();
        let (at, next) = (d * w, (d + 1) * w);
        let (fat, fnext) = (d * forms, (d + 1) * forms);
        for j in from..e {
            if e - j < need || self.hopeless(&sums[at..next], &form_sums[fat..fnext], j, need) {
                // Positions further on hold fewer choices: their box lies inside this one.
                break;
            }
            for c in self.fewest[j]..=self.cap {
                let open = self.extend(d, j, c, need - 1, sums, form_sums);
                if !self.charge(sink) {
                    return false;
                }
                if !open {
                    continue;
                }
                picked.push((self.order[j], c));
                let ok = self.list_from(j + 1, sums, form_sums, picked, sink);
                picked.pop();
                if !ok {
                    return false;
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Collects what a lister sends.
    struct Collect(Vec<Vec<(usize, usize)>>);

    impl Sink for Collect {
        fn spend(&mut self) -> bool {
            true
        }
        fn add(&mut self, _load: f64, picked: &[(usize, usize)]) -> bool {
            let mut members = picked.to_vec();
            members.sort_unstable();
            self.0.push(members);
            true
        }
    }

    /// `EpisodeLister` sends exactly the contents below the cut, each once: every set of `s`
    /// distinct experts with every count from its fewest to the cap, filtered by the rank's
    /// bound `sum_k w_k max(L_k, (total_k - L_k) / (G - 1)) < cut`, is the list. Random loads
    /// (ties and zeros included), 1-6 episodes (the linear bounds with up to four, the box
    /// alone beyond), 1-5 ranks, cuts from just above the mean to far above it. (Planted in
    /// review: each member's least addition to a linear bound taken at the fewest replicas
    /// whatever its sign, the scan stopped one position early, the most the members left add
    /// taken as the least, the last member's window 1e-3 short at either end; the window of the
    /// last two members 1e-3 short at the top, the window's lower end 1e-3 high, the sets of
    /// three members looked up from one position too far: each fails it.)
    #[test]
    fn episode_lister_lists_every_content_below_the_cut() {
        let mut rng = crate::synth::Rng::new(23);
        let mut seen = [0usize; 2];
        for _ in 0..3_000 {
            let e = 2 + rng.below(7);
            let s = 1 + rng.below(e.min(6));
            let g = 1 + rng.below(5);
            let w = 1 + rng.below(6);
            let cap = 1 + rng.below(g.min(3));
            let kind = rng.below(3);
            let x: Vec<f64> = (0..e * w)
                .map(|_| match kind {
                    0 => rng.below(4) as f64,
                    1 => (1 + rng.below(1000)) as f64,
                    _ => (100 + rng.below(5)) as f64,
                })
                .collect();
            let raw: Vec<f64> = (0..w).map(|_| 0.2 + rng.uniform()).collect();
            let sum: f64 = raw.iter().sum();
            let omega: Vec<f64> = raw.iter().map(|o| o / sum).collect();
            let agg: Vec<f64> = (0..e)
                .map(|i| (0..w).map(|k| omega[k] * x[i * w + k]).sum())
                .collect();
            let total: Vec<f64> = (0..w).map(|k| (0..e).map(|i| x[i * w + k]).sum()).collect();
            let fewest: Vec<usize> = (0..e).map(|_| 1 + rng.below(cap + 1)).collect();
            let mean: f64 = (0..w).map(|k| omega[k] * total[k]).sum::<f64>() / g as f64;
            let cut = mean * (1.0 + [1e-3, 0.03, 0.3, 3.0][rng.below(4)]) + 1e-9;
            let term = |members: &[(usize, usize)]| -> f64 {
                (0..w)
                    .map(|k| {
                        let l: f64 = members.iter().map(|&(i, c)| x[i * w + k] / c as f64).sum();
                        let rest = if g > 1 {
                            (total[k] - l) / (g - 1) as f64
                        } else {
                            l
                        };
                        omega[k] * l.max(rest)
                    })
                    .sum()
            };
            // Every content, from every set of `s` experts and every count in range.
            let mut want: Vec<Vec<(usize, usize)>> = Vec::new();
            for mask in 0u32..1 << e {
                if mask.count_ones() as usize != s {
                    continue;
                }
                let members: Vec<usize> = (0..e).filter(|&i| mask >> i & 1 == 1).collect();
                if members.iter().any(|&i| fewest[i] > cap) {
                    continue;
                }
                let mut counts: Vec<usize> = members.iter().map(|&i| fewest[i]).collect();
                loop {
                    let content: Vec<(usize, usize)> = members
                        .iter()
                        .copied()
                        .zip(counts.iter().copied())
                        .collect();
                    if term(&content) < cut {
                        want.push(content);
                    }
                    let Some(m) = (0..s).find(|&m| counts[m] < cap) else {
                        break;
                    };
                    counts[m] += 1;
                    for (earlier, &i) in counts[..m].iter_mut().zip(&members) {
                        *earlier = fewest[i];
                    }
                }
            }
            let lister = EpisodeLister::new(&x, &agg, &omega, &total, &fewest, cap, g, s, cut);
            let mut got = Collect(Vec::new());
            assert!(lister.list(&mut got));
            let mut got = got.0;
            got.sort();
            want.sort();
            assert_eq!(
                got, want,
                "{e} experts, {s} members, {g} ranks, {w} episodes, cap {cap}, fewest {fewest:?}, cut {cut}, loads {x:?}"
            );
            seen[usize::from(!want.is_empty())] += 1;
        }
        assert!(seen[0] > 300 && seen[1] > 1_000, "{seen:?}");
    }

    /// A lister reusing the sets of another ([`EpisodeLister::reusing`]) sends what a fresh one
    /// sends, in the same order, whether the other was built with the same fewest replicas or
    /// not (random loads with zeros, random fewest replicas, one to four episodes, three or
    /// four members). (Planted: the sets reused whatever fewest replicas they were built with
    /// fails it.)
    #[test]
    fn a_lister_reusing_sets_lists_what_a_fresh_one_does() {
        let mut rng = crate::synth::Rng::new(37);
        let mut seen = [0usize; 2];
        for _ in 0..2_000 {
            let e = 4 + rng.below(5);
            let s = 3 + rng.below(2);
            let g = 2 + rng.below(4);
            let w = 1 + rng.below(4);
            let cap = 1 + rng.below(g.min(3));
            let x: Vec<f64> = (0..e * w)
                .map(|_| match rng.below(2) {
                    0 => rng.below(4) as f64,
                    _ => (1 + rng.below(1000)) as f64,
                })
                .collect();
            let raw: Vec<f64> = (0..w).map(|_| 0.2 + rng.uniform()).collect();
            let sum: f64 = raw.iter().sum();
            let omega: Vec<f64> = raw.iter().map(|o| o / sum).collect();
            let agg: Vec<f64> = (0..e)
                .map(|i| (0..w).map(|k| omega[k] * x[i * w + k]).sum())
                .collect();
            let total: Vec<f64> = (0..w).map(|k| (0..e).map(|i| x[i * w + k]).sum()).collect();
            let mean: f64 = (0..w).map(|k| omega[k] * total[k]).sum::<f64>() / g as f64;
            let cut = mean * (1.0 + [1e-3, 0.03, 0.3, 3.0][rng.below(4)]) + 1e-9;
            let fewest = |rng: &mut crate::synth::Rng| -> Vec<usize> {
                (0..e).map(|_| 1 + rng.below(cap + 1)).collect()
            };
            let (before, now) = (fewest(&mut rng), fewest(&mut rng));
            let same = rng.below(4) == 0;
            let now = if same { before.clone() } else { now };
            let other = EpisodeLister::new(&x, &agg, &omega, &total, &before, cap, g, s, cut);
            let sets = other.into_sets();
            let list = |lister: EpisodeLister| {
                let mut got = Collect(Vec::new());
                assert!(lister.list(&mut got));
                got.0
            };
            let fresh = list(EpisodeLister::new(
                &x, &agg, &omega, &total, &now, cap, g, s, cut,
            ));
            let reused = list(EpisodeLister::reusing(
                &x,
                &agg,
                &omega,
                &total,
                &now,
                cap,
                g,
                s,
                cut,
                Some(sets),
            ));
            assert_eq!(reused, fresh, "fewest {before:?} -> {now:?}");
            seen[usize::from(!fresh.is_empty() && before != now)] += 1;
        }
        assert!(seen[1] > 200, "{seen:?}");
    }
}
