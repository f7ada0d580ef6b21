//! Rank contents, shared by the two cover searches ([`super::cover`] for one episode,
//! [`super::episodes`] for several): listing every content whose (episode-weighted) load lies
//! in a window, and the replica counts a partial cover has decided.
//!
//! A content is `S` distinct experts, each with a replica count; its load is the sum of its
//! members' replica loads `x / count`.

/// What listing the contents needs: positions are experts heaviest first.
pub(super) struct Lister {
    order: Vec<usize>,
    x: Vec<f64>,
    fewest: Vec<usize>,
    cap: usize,
    /// Smallest and largest replica any position from `j` on can add.
    suf_small: Vec<f64>,
    suf_large: Vec<f64>,
    /// Every replica a position can add, `(size, position, count)`, ascending by size.
    reps: Vec<(f64, usize, usize)>,
    /// The window: loads in `[lo, hi)`.
    lo: f64,
    hi: f64,
}

/// Where [`Lister::list`] sends what it finds, and charges the nodes it spends.
pub(super) trait Sink {
    /// One node of the listing; false when the budget is spent.
    fn spend(&mut self) -> bool;
    /// A content with this load (members as `(expert, count)`); false to stop listing.
    fn add(&mut self, load: f64, picked: &[(usize, usize)]) -> bool;
}

impl Lister {
    /// `x[e]`: expert `e`'s load; `fewest[e]`: its fewest replicas (at most `cap + 1`, which
    /// leaves it no replica); `cap`: most replicas of an expert; contents in `[lo, hi)`.
    pub(super) fn new(x: &[f64], fewest: &[usize], cap: usize, lo: f64, hi: f64) -> Lister {
        let e = x.len();
        let mut order: Vec<usize> = (0..e).collect();
        order.sort_by(|&a, &b| x[b].total_cmp(&x[a]).then(a.cmp(&b)));
        let fewest: Vec<usize> = order.iter().map(|&i| fewest[i]).collect();
        let x: Vec<f64> = order.iter().map(|&i| x[i]).collect();
        // Suffix extremes: what `k` more members from position `j` on add at least / most.
        let mut suf_small = vec![f64::INFINITY; e + 1];
        let mut suf_large = vec![0.0f64; e + 1];
        for j in (0..e).rev() {
            suf_small[j] = suf_small[j + 1].min(x[j] / cap as f64);
            suf_large[j] = suf_large[j + 1].max(x[j] / fewest[j] as f64);
        }
        let mut reps: Vec<(f64, usize, usize)> = (0..e)
            .flat_map(|j| (fewest[j]..=cap).map(move |c| (j, c)))
            .map(|(j, c)| (x[j] / c as f64, j, c))
            .collect();
        reps.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        Lister {
            order,
            x,
            fewest,
            cap,
            suf_small,
            suf_large,
            reps,
            lo,
            hi,
        }
    }

    /// Sends every content of `s` members with load in the window to `sink`, in lexicographic
    /// order of positions. False when the sink stopped it or the budget ran out.
    pub(super) fn list(&self, s: usize, sink: &mut impl Sink) -> bool {
        let mut picked: Vec<(usize, usize)> = Vec::with_capacity(s);
        self.list_from(s, 0, 0.0, &mut picked, sink)
    }

    /// The contents that extend `picked` (members at positions `from` on, whose loads add to
    /// `sum` so far).
    fn list_from(
        &self,
        s: usize,
        from: usize,
        sum: f64,
        picked: &mut Vec<(usize, usize)>,
        sink: &mut impl Sink,
    ) -> bool {
        if !sink.spend() {
            return false;
        }
        let need = s - picked.len();
        if need == 1 {
            // The last member: its replica must bring the load into the window, looked up
            // among every replica by size.
            let start = self.reps.partition_point(|r| sum + r.0 < self.lo);
            for &(size, j, c) in &self.reps[start..] {
                let v = sum + size;
                if v >= self.hi {
                    break;
                }
                if j < from {
                    continue;
                }
                if !sink.spend() {
                    return false;
                }
                picked.push((self.order[j], c));
                let ok = sink.add(v, picked);
                picked.pop();
                if !ok {
                    return false;
                }
            }
            return true;
        }
        let more = (need - 1) as f64;
        for j in from..self.order.len() {
            if self.order.len() - j < need
                || sum + need as f64 * self.suf_small[j] >= self.hi
                || sum + need as f64 * self.suf_large[j] < self.lo
            {
                break;
            }
            for c in self.fewest[j]..=self.cap {
                let v = sum + self.x[j] / c as f64;
                if v + more * self.suf_small[j + 1] >= self.hi {
                    continue;
                }
                if v + more * self.suf_large[j + 1] < self.lo {
                    // Larger counts only shrink the replica further.
                    break;
                }
                picked.push((self.order[j], c));
                let ok = self.list_from(s, j + 1, v, picked, sink);
                picked.pop();
                if !ok {
                    return false;
                }
            }
        }
        true
    }
}

/// Lists the contents of a rank for several episodes, pruned in every episode at once.
///
/// [`Lister`] prunes on one number (the episode-weighted load) and leaves the episodes to the
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
pub(super) struct EpisodeLister<'a> {
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
    /// The linear lower bounds of the rank's term (see [`Self::least_bound`]), for up to
    /// [`MAX_FORM_EPISODES`] episodes: `constant[f]` (its constant term) and
    /// `least_form[(j * (s + 1) + n) * forms + f]`, the least `n` members from position `j` on
    /// add to form `f`.
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
    /// Contents below this (with the rounding margin of the caller).
    cut: f64,
}

/// Episodes up to which [`EpisodeLister`] adds its `2^w` linear bounds (16 with four).
const MAX_FORM_EPISODES: usize = 4;

impl<'a> EpisodeLister<'a> {
    /// `x[e * w + k]`: expert `e`'s load in episode `k`; `agg[e]`: its episode-weighted load
    /// (the positions' order); `fewest[e]`: its fewest replicas (at most `cap + 1`, which
    /// leaves it no replica); contents of `s` members on one of `g` ranks, below `cut`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
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
        let mut last: Vec<(f64, usize, usize)> = (0..e)
            .flat_map(|j| (fewest[j]..=cap).map(move |c| (j, c)))
            .map(|(j, c)| {
                let r = j * (cap + 1) + c;
                let weighted = (0..w).map(|k| omega[k] * rep[r * w + k]).sum();
                (weighted, j, c)
            })
            .collect();
        last.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let whole = (0..w).map(|k| omega[k] * total[k]).sum();
        EpisodeLister {
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

    /// Sends every content of `s` members below the cut to `sink` (with its
    /// episode-weighted load), in lexicographic order of the positions of all members but the
    /// last. False when the sink stopped it or the budget ran out.
    pub(super) fn list(&self, sink: &mut impl Sink) -> bool {
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
        let (at, next) = (d * w, (d + 1) * w);
        let so_far: f64 = sums[at..next]
            .iter()
            .zip(self.omega)
            .map(|(l, o)| l * o)
            .sum();
        // (A margin on both ends: the exact test below decides.)
        let hi = self.cut - so_far + 1e-9;
        let lo = if self.others > 0.0 {
            self.whole - self.others * self.cut - so_far - 1e-9
        } else {
            f64::NEG_INFINITY
        };
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
                if !self.extend(d, j, c, need - 1, sums, form_sums) {
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

/// The replica counts a partial cover has decided: per expert its count (`label`, 0 while
/// undecided) and the appearances still owed (`rem`); per content chosen, which of its members
/// it gave their count (a bit per member), so that undoing it restores the state.
pub(super) struct Counts {
    pub(super) label: Vec<usize>,
    pub(super) rem: Vec<usize>,
    fresh: Vec<u8>,
}

impl Counts {
    /// Nothing decided for `e` experts, room for `g` contents.
    pub(super) fn new(e: usize, g: usize) -> Counts {
        Counts {
            label: vec![0; e],
            rem: vec![0; e],
            fresh: Vec::with_capacity(g),
        }
    }

    /// A content with these members `(expert, count)` becomes a rank: members not decided yet
    /// get their count, and each owes one appearance less.
    pub(super) fn apply(&mut self, members: &[(usize, usize)]) {
        let mut fresh = 0u8;
        for (m, &(f, c)) in members.iter().enumerate() {
            if self.label[f] == 0 {
                self.label[f] = c;
                self.rem[f] = c;
                fresh |= 1 << m;
            }
            self.rem[f] -= 1;
        }
        self.fresh.push(fresh);
    }

    /// Undoes the last [`Self::apply`], of the same members.
    pub(super) fn undo(&mut self, members: &[(usize, usize)]) {
        let fresh = self.fresh.pop().unwrap_or(0);
        for (m, &(f, _)) in members.iter().enumerate() {
            self.rem[f] += 1;
            if fresh & (1 << m) != 0 {
                self.label[f] = 0;
                self.rem[f] = 0;
            }
        }
    }

    /// What the next rank must satisfy for the counts to still fit the slots after it (see
    /// [`NextRank`]); `None` when they do not fit now ([`Self::slots_fit`]). `ranks_left`:
    /// the empty ranks, the next one included.
    pub(super) fn next_rank(
        &self,
        fewest: &[usize],
        cap: usize,
        s: usize,
        ranks_left: usize,
    ) -> Option<NextRank> {
        if ranks_left == 0 {
            return None;
        }
        let each_now = ranks_left.min(cap);
        let each = (ranks_left - 1).min(cap);
        let (mut owed, mut least, mut most_now, mut most) = (0, 0, 0, 0);
        let mut forced = 0;
        for ((&label, &rem), &fewest) in self.label.iter().zip(&self.rem).zip(fewest) {
            if label == 0 {
                if fewest > each_now {
                    return None;
                }
                forced += usize::from(fewest > each);
                least += fewest;
                most_now += each_now;
                most += each;
            } else {
                if rem > ranks_left {
                    return None;
                }
                forced += usize::from(rem == ranks_left);
                owed += rem;
            }
        }
        let free = s * ranks_left;
        if owed + least > free || free > owed + most_now {
            return None;
        }
        Some(NextRank {
            ranks_left,
            spare: free - owed - least,
            surplus: (owed + most) as isize - free as isize,
            each,
            forced,
        })
    }

    /// Whether a content with these members `(expert, count)` can be the next rank: each
    /// member's count agrees with the count decided (with an appearance left) or is new and
    /// at most the ranks left, and after it the counts still fit the slots (the test
    /// [`Self::slots_fit`] makes of the state after it, from `next` in `O(S)`: the content's
    /// new counts use at most the spare replicas and give up at most the surplus, and it
    /// holds every expert that must be on each rank left).
    #[inline(always)]
    pub(super) fn admits(
        &self,
        next: &NextRank,
        fewest: &[usize],
        members: impl IntoIterator<Item = (usize, usize)>,
    ) -> bool {
        let (mut extra, mut given_up, mut forced) = (0usize, 0isize, 0usize);
        for (f, c) in members {
            let label = self.label[f];
            if label == 0 {
                if c > next.ranks_left {
                    return false;
                }
                extra += c.saturating_sub(fewest[f]);
                given_up += next.each as isize - c as isize;
                forced += usize::from(fewest[f] > next.each);
            } else {
                if label != c || self.rem[f] == 0 {
                    return false;
                }
                forced += usize::from(self.rem[f] == next.ranks_left);
            }
        }
        extra <= next.spare && given_up <= next.surplus && forced == next.forced
    }

    /// Replicas owed and replica counts still open fit the `s * ranks_left` empty slots
    /// (`fewest`: the fewest replicas each expert may have).
    pub(super) fn slots_fit(
        &self,
        fewest: &[usize],
        cap: usize,
        s: usize,
        ranks_left: usize,
    ) -> bool {
        let mut owed = 0;
        let (mut least, mut most) = (0, 0);
        for ((&label, &rem), &fewest) in self.label.iter().zip(&self.rem).zip(fewest) {
            if label == 0 {
                if fewest > ranks_left.min(cap) {
                    return false;
                }
                least += fewest;
                most += ranks_left.min(cap);
            } else {
                if rem > ranks_left {
                    return false;
                }
                owed += rem;
            }
        }
        let free = s * ranks_left;
        owed + least <= free && free <= owed + most
    }
}

/// What the next rank of a partial cover must satisfy for the replica counts to fit the
/// slots after it ([`Counts::next_rank`], [`Counts::admits`]). Without it the searches
/// spent most of their nodes on ranks [`Counts::slots_fit`] rejected one level down (the
/// sweep's slowest layer, uniform 16 experts on 8 x 4: 60-70% of its cover nodes), and
/// counted such ranks among an expert's options when choosing the most constrained one.
pub(super) struct NextRank {
    /// Empty ranks, the next one included.
    pub(super) ranks_left: usize,
    /// Replicas the new counts of the next rank's members may add above their fewest: the
    /// free slots less the replicas owed and the fewest of the experts still open.
    spare: usize,
    /// Replicas the new counts may fall short of the most each expert can still have once
    /// this rank is placed (`each`): what the replicas owed and those most add up to beyond
    /// the slots left after it.
    surplus: isize,
    /// Most replicas an open expert can have after the next rank (ranks left after it, at
    /// most the cap).
    each: usize,
    /// Experts that must be on the next rank: those owing an appearance on every rank left,
    /// and open ones whose fewest replicas exceed `each`.
    forced: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `admits` answers as the slow test it replaces: each member's count agrees with the
    /// state (as the cover search tested before) and, the content applied as the next rank,
    /// `slots_fit` holds one rank down. Random partial states (counts decided or not, any
    /// appearances owed, fewest replicas up to one above the cap) and random contents of
    /// distinct experts, both answers common (24,000 no, 3,400 yes). (Planted in review: `spare` one larger, the
    /// forced open experts counted with `each` of the rank before, the surplus without the
    /// new counts: each fails it.)
    #[test]
    fn admits_as_slots_fit_after_the_rank() {
        let mut rng = crate::synth::Rng::new(17);
        let mut seen = [0usize; 2];
        for _ in 0..200_000 {
            let e = 3 + rng.below(8);
            // (At most six members here; the searches' contents have at most eight: `fresh`
            // has a bit per member.)
            let s = 2 + rng.below(e.min(6) - 1);
            let g = 1 + rng.below(6);
            let cap = 1 + rng.below(g);
            let fewest: Vec<usize> = (0..e).map(|_| 1 + rng.below(2)).collect();
            let ranks_left = 1 + rng.below(g);
            let mut counts = Counts::new(e, g);
            for f in 0..e {
                if rng.below(2) == 0 {
                    let c = 1 + rng.below(cap);
                    counts.label[f] = c;
                    counts.rem[f] = rng.below(c + 1);
                }
            }
            let next = counts.next_rank(&fewest, cap, s, ranks_left);
            assert_eq!(
                next.is_some(),
                counts.slots_fit(&fewest, cap, s, ranks_left)
            );
            let Some(next) = next else { continue };
            let mut experts: Vec<usize> = (0..e).collect();
            for i in 0..s {
                experts.swap(i, i + rng.below(e - i));
            }
            let members: Vec<(usize, usize)> = experts[..s]
                .iter()
                .map(|&f| {
                    (
                        f,
                        fewest[f].min(cap) + rng.below(cap + 1 - fewest[f].min(cap)),
                    )
                })
                .collect();
            let agree = members.iter().all(|&(f, c)| {
                if counts.label[f] == 0 {
                    c <= ranks_left
                } else {
                    counts.label[f] == c && counts.rem[f] >= 1
                }
            });
            let got = counts.admits(&next, &fewest, members.iter().copied());
            let want = agree && {
                counts.apply(&members);
                let fit = counts.slots_fit(&fewest, cap, s, ranks_left - 1);
                counts.undo(&members);
                fit
            };
            assert_eq!(
                got, want,
                "{members:?} on {:?} / {:?}, fewest {fewest:?}, cap {cap}, {ranks_left} ranks of {s}",
                counts.label, counts.rem
            );
            seen[usize::from(want)] += 1;
        }
        assert!(seen[0] > 10_000 && seen[1] > 2_000, "{seen:?}");
    }

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
    /// taken as the least, the last member's window 1e-3 short at either end: each fails it.)
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
}
