//! Large-neighbourhood search for the upper bound: the replicas on a few ranks at a time are
//! re-placed among those ranks exactly (every split into full ranks without a duplicate, by
//! branch and bound), the other ranks kept as they are; the local search's count moves
//! ([`State::improve`]) when no set of ranks improves; then descents from randomly kicked
//! copies of the best plan (a replica handed to another expert, or two replicas swapped),
//! seeded per layer. Then the same again from the best plan, for [`COUNT_NODES`] more, where a neighbourhood may also change the replica counts of the experts whose
//! replicas all lie on its ranks. Either way every rank outside a neighbourhood keeps its loads
//! (an expert with a replica outside keeps its count, so its load per replica), and the
//! objective of a re-placement depends only on its own ranks and the other ranks' heaviest load
//! per episode. It only finds plans: nothing it does is a proof or a bound.
//!
//! Why: on multi-window layers the local search's swaps (one replica pair between two ranks)
//! stop far above the optimum (16 experts on 8 x 4 with four windows: plans at 1.025-1.035 times
//! the mean, where a long exact search found 1.0145 on one layer); re-placing three ranks at
//! once reaches placements no single swap leads to.

use super::local_search::{MAX_ITERS, State};
use super::problem::{Problem, better};

/// Branch-and-bound nodes of [`improve`] in `joint` (about 15M a second): on the sweep's
/// 16-expert 8 x 4 layers with four windows 2M took the median proven gap from 2.1% to 1.65%
/// (about 0.1-0.2 s), 3M to 1.58%, 6M to 1.5%.
pub(crate) const NODES: usize = 2_000_000;

/// Nodes of the second phase of [`improve`] in `joint`, where counts change inside
/// neighbourhoods. On 60 four-window 16-expert layers (20 zipf and 20 pareto on 8 x 4, 10 and
/// 10 on 4 x 8; `docs/benchmarks/raw/eplb-lns-counts-2026-12-08`) 1M after [`NODES`], on the
/// layers left open, gave a better plan on 29 and a worse on none (mean F -0.11%). With the
/// phase also before the narrow path's ascent: 1M, 32 (-0.12%), but 30-50 ms more on layers
/// the ascent proves; the same 1M with counts fixed, 15 (-0.03%); counts free from the start
/// within 2M, 29 but a worse plan on 7 (-0.07%); 0.5M, 24 (-0.10%); 2M, 38 (-0.16%).
pub(crate) const COUNT_NODES: usize = 1_000_000;

/// Most splits of one neighbourhood's replicas (counted as `(m s)! / (s!^m m!)`, duplicates
/// ignored) for `m` ranks to be a neighbourhood size: 8 ranks of 4 re-place 3 at a time (5,775
/// splits), 16 ranks of 2 four at a time (105), 4 ranks of 8 two at a time (6,435).
const MAX_SPLITS: f64 = 10_000.0;

/// Splits ignoring duplicates of `m` ranks of `s` slots: `(m s)! / (s!^m m!)`.
fn splits(m: usize, s: usize) -> f64 {
    let mut v = 1.0;
    // Choose the members of each rank in turn, the rank holding the first item left first.
    for i in 0..m {
        let n = (m - i) * s - 1;
        // C(n, s - 1)
        let mut c = 1.0;
        for j in 0..s - 1 {
            c = c * (n - j) as f64 / (j + 1) as f64;
        }
        v *= c;
    }
    v
}

/// The largest neighbourhood (ranks re-placed together) within [`MAX_SPLITS`], at least 2.
fn largest_size(p: &Problem) -> usize {
    let mut m = 2;
    while m < p.g && splits(m + 1, p.s) <= MAX_SPLITS {
        m += 1;
    }
    m.min(p.g)
}

/// One item of a neighbourhood's re-placement: one replica of an expert with replicas outside
/// the neighbourhood (`counts` 0: its count, and so its load per replica, stays), or every
/// replica of an expert wholly inside it, its count free from 1 to `counts`. Its loads per
/// episode lie in [`Split::unit_loads`] from `at`, one run of `w` per count.
#[derive(Clone, Copy)]
struct Unit {
    e: usize,
    counts: usize,
    at: usize,
}

/// One neighbourhood's exact re-placement (branch and bound over its replicas).
struct Split<'a> {
    p: &'a Problem,
    /// The items to place, heaviest replica first.
    units: Vec<Unit>,
    /// The units' loads per replica: `[at + (c - 1) * w + k]` for count `c` (1 for a fixed
    /// replica) and episode `k`.
    unit_loads: Vec<f64>,
    /// `(fixed replicas, closed experts, most replicas of the closed experts)` from unit `i`
    /// on, at `[i]`: what the slots left must hold.
    suffix: Vec<(usize, usize, usize)>,
    /// Per episode: the heaviest rank outside the neighbourhood, or the neighbourhood's mean
    /// (whichever is larger; every split reaches it).
    floor: Vec<f64>,
    /// `loads[r * w + k]` of the ranks being filled.
    loads: Vec<f64>,
    members: Vec<u64>,
    sizes: Vec<usize>,
    /// Per unit, the mask of ranks holding it.
    assign: Vec<u64>,
    best: (f64, f64),
    best_assign: Option<Vec<u64>>,
    nodes: usize,
    limit: usize,
}

impl Split<'_> {
    fn partial_f(&self) -> f64 {
        let (p, m) = (self.p, self.sizes.len());
        (0..p.w)
            .map(|k| {
                let top = (0..m)
                    .map(|r| self.loads[r * p.w + k])
                    .fold(self.floor[k], f64::max);
                p.omega[k] * top
            })
            .sum()
    }

    fn q(&self) -> f64 {
        let (p, m) = (self.p, self.sizes.len());
        (0..p.w)
            .map(|k| p.omega[k] * (0..m).map(|r| self.loads[r * p.w + k].powi(2)).sum::<f64>())
            .sum()
    }

    /// Puts a replica of `e` with loads `unit_loads[at..at + w]` on rank `r`.
    fn put(&mut self, r: usize, e: usize, at: usize) {
        let w = self.p.w;
        let load = &self.unit_loads[at..at + w];
        for (l, &x) in self.loads[r * w..(r + 1) * w].iter_mut().zip(load) {
            *l += x;
        }
        self.members[r] |= 1 << e;
        self.sizes[r] += 1;
    }

    /// Takes back what [`Split::put`] put.
    fn take(&mut self, r: usize, e: usize, at: usize) {
        let w = self.p.w;
        let load = &self.unit_loads[at..at + w];
        for (l, &x) in self.loads[r * w..(r + 1) * w].iter_mut().zip(load) {
            *l -= x;
        }
        self.members[r] &= !(1 << e);
        self.sizes[r] -= 1;
    }

    fn dfs(&mut self, i: usize) {
        if self.nodes >= self.limit {
            return;
        }
        self.nodes += 1;
        let f = self.partial_f();
        if f > self.best.0 + 1e-12 {
            return;
        }
        if i == self.units.len() {
            let q = self.q();
            // Q, the weighted sum of squared rank loads, breaks ties of F so that the
            // search can cross plateaus of F without cycling.
            if better((f, q), self.best) {
                self.best = (f, q);
                self.best_assign = Some(self.assign.clone());
            }
            return;
        }
        let (m, s) = (self.sizes.len(), self.p.s);
        let Unit { e, counts, at } = self.units[i];
        if counts == 0 {
            let mut tried_empty = false;
            for r in 0..m {
                if self.sizes[r] == s || self.members[r] & (1 << e) != 0 {
                    continue;
                }
                // Empty ranks are interchangeable: the item goes into the first only.
                if self.sizes[r] == 0 {
                    if tried_empty {
                        continue;
                    }
                    tried_empty = true;
                }
                self.put(r, e, at);
                self.assign[i] = 1 << r;
                self.dfs(i + 1);
                self.take(r, e, at);
            }
            return;
        }
        self.closed(i, e, counts, at);
    }

    /// [`Split::dfs`] on a unit with its count free: every count and every set of ranks for
    /// it (kept apart so that the search with fixed counts stays as fast as before).
    #[inline(never)]
    fn closed(&mut self, i: usize, e: usize, counts: usize, at: usize) {
        let (m, s, w) = (self.sizes.len(), self.p.s, self.p.w);
        let (fixed, closed, most) = self.suffix[i + 1];
        let placed: usize = self.sizes.iter().sum();
        let empties: u64 = (0..m)
            .filter(|&r| self.sizes[r] == 0)
            .fold(0, |a, r| a | 1 << r);
        let open: u64 = (0..m)
            .filter(|&r| self.sizes[r] < s)
            .fold(0, |a, r| a | 1 << r);
        for c in (1..=counts).rev() {
            // The slots left after `c` more must hold the rest.
            let Some(free) = (m * s).checked_sub(placed + c) else {
                continue;
            };
            if free < fixed + closed || free > fixed + most {
                continue;
            }
            let at = at + (c - 1) * w;
            for mask in 1u64..1 << m {
                if mask.count_ones() as usize != c || mask & !open != 0 {
                    continue;
                }
                // Empty ranks are interchangeable: only the first ones are chosen.
                let chosen = mask & empties;
                if chosen != lowest_bits(empties, chosen.count_ones()) {
                    continue;
                }
                for r in (0..m).filter(|&r| mask & 1 << r != 0) {
                    self.put(r, e, at);
                }
                self.assign[i] = mask;
                self.dfs(i + 1);
                for r in (0..m).filter(|&r| mask & 1 << r != 0) {
                    self.take(r, e, at);
                }
            }
        }
    }
}

/// The lowest `n` set bits of `mask`.
fn lowest_bits(mut mask: u64, n: u32) -> u64 {
    let mut out = 0;
    for _ in 0..n {
        let b = mask & mask.wrapping_neg();
        out |= b;
        mask &= !b;
    }
    out
}

/// Re-places the replicas of `ranks` among them in `st` when a split improves `(F, Q)`;
/// returns whether it did, and the nodes spent. With `counts`, the experts whose replicas all
/// lie on `ranks` may change their replica counts (at least one, at most one a rank of the set
/// and the problem's cap), the set's slots staying full: their loads change only inside the
/// set, so every rank outside it keeps its loads and the search stays exact.
fn replace(st: &mut State, ranks: &[usize], limit: usize, counts: bool) -> (bool, usize) {
    let p = st.p;
    let in_set = |r: usize| ranks.contains(&r);
    let floor: Vec<f64> = (0..p.w)
        .map(|k| {
            let outside = (0..p.g)
                .filter(|&r| !in_set(r))
                .map(|r| st.loads[r * p.w + k])
                .fold(0.0f64, f64::max);
            let mean =
                ranks.iter().map(|&r| st.loads[r * p.w + k]).sum::<f64>() / ranks.len() as f64;
            outside.max(mean)
        })
        .collect();
    let weight = |load: &[f64]| -> f64 { load.iter().zip(&p.omega).map(|(l, o)| l * o).sum() };
    let mut inside = vec![0usize; p.e];
    for &r in ranks {
        for &e in &st.row[r * p.s..(r + 1) * p.s] {
            inside[e] += 1;
        }
    }
    let cap = p.max_rep.min(p.g).min(ranks.len());
    let mut unit_loads = Vec::new();
    let mut units: Vec<(f64, Unit)> = Vec::new();
    for (e, &n) in inside.iter().enumerate() {
        if n == 0 {
            continue;
        }
        let y = &st.y[e * p.w..(e + 1) * p.w];
        let at = unit_loads.len();
        if counts && n == st.cnt[e] && cap > 1 {
            let x = &p.x[e * p.w..(e + 1) * p.w];
            let most = cap.max(n);
            for c in 1..=most {
                unit_loads.extend(x.iter().map(|v| v / c as f64));
            }
            units.push((
                weight(y),
                Unit {
                    e,
                    counts: most,
                    at,
                },
            ));
        } else {
            unit_loads.extend_from_slice(y);
            for _ in 0..n {
                units.push((weight(y), Unit { e, counts: 0, at }));
            }
        }
    }
    units.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.e.cmp(&b.1.e)));
    let units: Vec<Unit> = units.into_iter().map(|u| u.1).collect();
    let mut suffix = vec![(0, 0, 0); units.len() + 1];
    for (i, u) in units.iter().enumerate().rev() {
        let (f, c, most) = suffix[i + 1];
        suffix[i] = if u.counts == 0 {
            (f + 1, c, most)
        } else {
            (f, c + 1, most + u.counts)
        };
    }
    // The current split's (F, Q) is what a re-placement must beat.
    let mut loads = vec![0.0; ranks.len() * p.w];
    for (i, &r) in ranks.iter().enumerate() {
        loads[i * p.w..(i + 1) * p.w].copy_from_slice(&st.loads[r * p.w..(r + 1) * p.w]);
    }
    let n = units.len();
    let mut split = Split {
        p,
        units,
        unit_loads,
        suffix,
        floor,
        loads,
        members: vec![0; ranks.len()],
        sizes: vec![0; ranks.len()],
        assign: vec![0; n],
        best: (0.0, 0.0),
        best_assign: None,
        nodes: 0,
        limit,
    };
    split.best = (split.partial_f(), split.q());
    split.loads.iter_mut().for_each(|l| *l = 0.0);
    split.dfs(0);
    let nodes = split.nodes;
    let Some(assign) = split.best_assign else {
        return (false, nodes);
    };
    let mut slots: Vec<Vec<usize>> = vec![Vec::with_capacity(p.s); ranks.len()];
    for (unit, &mask) in split.units.iter().zip(&assign) {
        for (r, members) in slots.iter_mut().enumerate() {
            if mask & 1 << r != 0 {
                members.push(unit.e);
            }
        }
    }
    let mut row = st.row.clone();
    for (&r, members) in ranks.iter().zip(&slots) {
        row[r * p.s..(r + 1) * p.s].copy_from_slice(members);
    }
    *st = State::new(p, row);
    (true, nodes)
}

/// Whether an expert with two or more possible counts has every replica on `ranks`.
fn has_closed(st: &State, ranks: &[usize]) -> bool {
    let p = st.p;
    if p.max_rep.min(ranks.len()) < 2 {
        return false;
    }
    (0..p.e).any(|e| {
        let inside: usize = ranks.iter().map(|&r| usize::from(st.rc[r * p.e + e])).sum();
        inside == st.cnt[e]
    })
}

/// Visits every set of `m` ranks once (lexicographic order), re-placing where that improves;
/// returns whether anything improved. Stops when `nodes` reaches `budget`.
fn pass(st: &mut State, m: usize, counts: bool, nodes: &mut usize, budget: usize) -> bool {
    let g = st.p.g;
    let mut set: Vec<usize> = (0..m).collect();
    let mut improved = false;
    loop {
        if *nodes >= budget {
            return improved;
        }
        // Without an expert wholly inside the set, its counts cannot change: the pass with
        // fixed counts has searched it.
        let (did, spent) = if counts && !has_closed(st, &set) {
            (false, 0)
        } else {
            replace(st, &set, budget - *nodes, counts)
        };
        *nodes += spent;
        improved |= did;
        // Next combination.
        let mut i = m;
        loop {
            if i == 0 {
                return improved;
            }
            i -= 1;
            if set[i] < g - m + i {
                break;
            }
        }
        set[i] += 1;
        for j in i + 1..m {
            set[j] = set[j - 1] + 1;
        }
    }
}

/// Whether the search applies: at least two ranks, no forced duplicates, experts fit the
/// member masks.
pub(crate) fn eligible(p: &Problem) -> bool {
    !p.empty && !p.dup_ok && p.g >= 2 && p.s >= 2 && p.e <= 64
}

/// Variable neighbourhood descent from `st`: passes over every set of 2, then up to `top`
/// ranks, back to pairs after any improvement; with `counts`, when none improves, the same
/// passes with the counts of the experts wholly inside a set free; then the local search's
/// moves (count moves included) when no set improves; until nothing improves or `nodes`
/// reaches `budget`.
fn descend(st: &mut State, top: usize, counts: bool, nodes: &mut usize, budget: usize) {
    let p = st.p;
    loop {
        let mut improved = false;
        for m in 2..=top {
            if pass(st, m, false, nodes, budget) {
                improved = true;
                break;
            }
        }
        if !improved && counts {
            for m in 2..=top {
                if pass(st, m, true, nodes, budget) {
                    improved = true;
                    break;
                }
            }
        }
        if !improved {
            // Count moves (and swaps) of the local search; it may trade a little F for
            // balance, so only an improvement of F counts.
            let mut ls = State::new(p, st.row.clone());
            ls.improve(None, MAX_ITERS);
            if p.episode_par(&ls.row) < p.episode_par(&st.row) - 1e-12 {
                *st = ls;
                improved = true;
            }
        }
        if !improved || *nodes >= budget {
            return;
        }
    }
}

/// A small deterministic generator for the kicks (xorshift64*), seeded per layer so that
/// plans are reproducible.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n.max(1)
    }
}

/// A random change of `row` that keeps it valid: one replica handed from an expert with
/// several to another expert (a count move), or two replicas of different ranks swapped.
fn kick(p: &Problem, row: &mut [usize], rng: &mut Rng) {
    let mut cnt = vec![0usize; p.e];
    for &e in row.iter() {
        cnt[e] += 1;
    }
    let holds = |row: &[usize], r: usize, e: usize| row[r * p.s..(r + 1) * p.s].contains(&e);
    for _ in 0..64 {
        let i = rng.below(row.len());
        let a = row[i];
        if rng.below(2) == 0 {
            let b = rng.below(p.e);
            if b != a && cnt[a] >= 2 && cnt[b] < p.max_rep.min(p.g) && !holds(row, i / p.s, b) {
                row[i] = b;
                return;
            }
        } else {
            let j = rng.below(row.len());
            let b = row[j];
            let (ri, rj) = (i / p.s, j / p.s);
            if ri != rj && a != b && !holds(row, ri, b) && !holds(row, rj, a) {
                row.swap(i, j);
                return;
            }
        }
    }
}

/// Improves `row` by exact re-placement on neighbourhoods of 2 up to [`largest_size`] ranks
/// (variable neighbourhood descent) and the local search's count moves, then by iterated
/// descents from kicked copies of the best plan (a kick is kept when its descent ends no
/// worse), within about `fixed` branch-and-bound nodes; then, for `free` more, the same from
/// the best plan with counts free inside the neighbourhoods. Never returns a worse F than
/// `row`'s.
pub(crate) fn improve(p: &Problem, row: Vec<usize>, fixed: usize, free: usize) -> Vec<usize> {
    if !eligible(p) || p.episode_par(&row) <= p.lower_bound() + 1e-9 {
        return row;
    }
    let top = largest_size(p);
    let start = row.clone();
    let t0 = std::time::Instant::now();
    let mut nodes = 0;
    let mut best = (p.episode_par(&start), start.clone());
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (p.g * 1_000 + p.e) as u64);
    let mut kicks = 0;
    // First with fixed counts inside the neighbourhoods, then with the counts of the experts
    // wholly inside one free, from the best plan so far.
    for (counts, budget) in [(false, fixed), (true, fixed + free)] {
        if nodes >= budget {
            continue;
        }
        let mut st = State::new(p, best.1.clone());
        descend(&mut st, top, counts, &mut nodes, budget);
        let f = p.episode_par(&st.row);
        // The start is kept only when strictly better (as before the second phase).
        if f <= best.0 + 1e-12 && !(best.1 == start && best.0 < f) {
            best = (f, st.row);
        }
        while nodes < budget {
            let mut row = best.1.clone();
            for _ in 0..1 + rng.below(3) {
                kick(p, &mut row, &mut rng);
            }
            let mut st = State::new(p, row);
            descend(&mut st, top, counts, &mut nodes, budget);
            kicks += 1;
            let f = p.episode_par(&st.row);
            if f <= best.0 + 1e-12 {
                best = (f, st.row);
            }
        }
    }
    if std::env::var("EPLB_DEBUG").is_ok() {
        eprintln!(
            "neighbourhood: F {:.6} -> {:.6}, {} nodes, {} kicks, ranks up to {} {:?}",
            p.episode_par(&start),
            best.0,
            nodes,
            kicks,
            top,
            t0.elapsed()
        );
    }
    best.1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::{find_duplicate, repair_duplicates};
    use crate::planner::problem::brute_force_optimum;
    use proptest::prelude::*;

    /// Tiny shapes `(E, slots, G)` without forced duplicates, two or more slots per rank.
    const TINY: [(usize, usize, usize); 7] = [
        (4, 6, 3),
        (5, 8, 4),
        (4, 8, 2),
        (5, 6, 2),
        (6, 6, 2),
        (4, 9, 3),
        (5, 8, 2),
    ];

    fn problem(slots: usize, g: usize, rows: &[Vec<f64>]) -> Problem {
        crate::planner::problem::test_layer(rows, g, slots, 0.6).0
    }

    fn rows(e: usize, windows: usize, seed: &[u32], hot: &[bool]) -> Vec<Vec<f64>> {
        (0..windows)
            .map(|k| {
                (0..e)
                    .map(|i| {
                        let t = (k * e + i) % seed.len();
                        f64::from(seed[t]) * if hot[t] { 20.0 } else { 1.0 }
                    })
                    .collect()
            })
            .collect()
    }

    /// A valid row from `pick`: every expert once, the other slots as `pick` says (within the
    /// replica cap), duplicates repaired.
    fn start_row(p: &Problem, pick: &[usize]) -> Vec<usize> {
        let mut row: Vec<usize> = (0..p.e).collect();
        let mut cnt = vec![1usize; p.e];
        for &x in pick.iter().cycle() {
            if row.len() == p.slots() {
                break;
            }
            let e = x % p.e;
            let e = (0..p.e)
                .map(|d| (e + d) % p.e)
                .find(|&f| cnt[f] < p.max_rep.min(p.g))
                .expect("slots fit the cap");
            cnt[e] += 1;
            row.push(e);
        }
        // Interleave so that repair has room, then repair.
        row.sort_unstable();
        let mut dealt = vec![0; row.len()];
        for (i, &e) in row.iter().enumerate() {
            dealt[(i % p.g) * p.s + i / p.g] = e;
        }
        repair_duplicates(&mut dealt, p.e, p.g);
        dealt
    }

    /// The best F over every re-placement of the replicas of `ranks` among their slots (all
    /// permutations, the other ranks unchanged, duplicates rejected): the oracle for `replace`.
    fn best_over_permutations(p: &Problem, row: &[usize], ranks: &[usize]) -> f64 {
        let slots: Vec<usize> = ranks.iter().flat_map(|&r| r * p.s..(r + 1) * p.s).collect();
        let mut items: Vec<usize> = slots.iter().map(|&i| row[i]).collect();
        items.sort_unstable();
        let mut best = f64::INFINITY;
        let mut trial = row.to_vec();
        // Lexicographic permutations of the multiset `items`.
        loop {
            for (&slot, &e) in slots.iter().zip(&items) {
                trial[slot] = e;
            }
            if find_duplicate(&trial, p.s).is_none() {
                best = best.min(p.episode_par(&trial));
            }
            let Some(i) = (0..items.len().saturating_sub(1))
                .rev()
                .find(|&i| items[i] < items[i + 1])
            else {
                return best;
            };
            let j = (i + 1..items.len())
                .rev()
                .find(|&j| items[j] > items[i])
                .expect("a larger element after i");
            items.swap(i, j);
            items[i + 1..].reverse();
        }
    }

    /// The best F over every re-filling of the slots of `ranks` (each rank any `s` distinct
    /// experts, the other ranks unchanged) that keeps the loads of the other ranks: every expert
    /// with a replica outside `ranks` keeps its count inside, every other one has at least one
    /// replica, counts within the cap. The oracle for `replace` with counts.
    fn best_over_counts(p: &Problem, row: &[usize], ranks: &[usize]) -> f64 {
        let count_inside = |row: &[usize]| {
            let mut c = vec![0usize; p.e];
            for &r in ranks {
                row[r * p.s..(r + 1) * p.s].iter().for_each(|&e| c[e] += 1);
            }
            c
        };
        let mut total = vec![0usize; p.e];
        row.iter().for_each(|&e| total[e] += 1);
        let inside = count_inside(row);
        // Every subset of `s` experts, as a list.
        let subsets: Vec<Vec<usize>> = (0u64..1 << p.e)
            .filter(|m| m.count_ones() as usize == p.s)
            .map(|m| (0..p.e).filter(|&e| m & 1 << e != 0).collect())
            .collect();
        let mut pick = vec![0usize; ranks.len()];
        let mut trial = row.to_vec();
        let mut best = f64::INFINITY;
        loop {
            for (&r, &i) in ranks.iter().zip(&pick) {
                trial[r * p.s..(r + 1) * p.s].copy_from_slice(&subsets[i]);
            }
            let now = count_inside(&trial);
            let ok = (0..p.e).all(|e| {
                let outside = total[e] - inside[e];
                if outside > 0 {
                    now[e] == inside[e]
                } else {
                    now[e] >= 1 && now[e] <= p.max_rep.min(p.g)
                }
            });
            if ok {
                best = best.min(p.episode_par(&trial));
            }
            // Next pick (odometer).
            let Some(i) = (0..pick.len()).find(|&i| pick[i] + 1 < subsets.len()) else {
                return best;
            };
            pick[i] += 1;
            pick[..i].iter_mut().for_each(|x| *x = 0);
        }
    }

    /// A drawn case of the re-placement properties: the problem of `TINY[case]`, a valid start
    /// row without duplicates, and a sorted set of 2..=G distinct ranks; `None` where the draw
    /// does not make one (the property then assumes it away).
    fn drawn_case(
        case: usize,
        windows: usize,
        seed: &[u32],
        hot: &[bool],
        pick: &[usize],
        set_seed: usize,
    ) -> Option<(Problem, Vec<usize>, Vec<usize>)> {
        let (e, slots, g) = TINY[case];
        let p = problem(slots, g, &rows(e, windows, seed, hot));
        if !eligible(&p) {
            return None;
        }
        let row = start_row(&p, pick);
        if find_duplicate(&row, p.s).is_some() {
            return None;
        }
        let m = 2 + set_seed % (g - 1);
        let mut ranks: Vec<usize> = (0..m).map(|i| (set_seed / 7 + i) % g).collect();
        ranks.sort_unstable();
        ranks.dedup();
        (ranks.len() == m).then_some((p, row, ranks))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// Re-placing a set of ranks with counts free for the experts wholly inside it reaches
        /// the best such re-filling (brute force), never changes the other ranks' rows or
        /// loads, and keeps the row valid; on the whole layer it reaches the brute-force
        /// optimum over every count, which the re-placement with fixed counts misses.
        #[test]
        fn replacement_with_counts_is_the_best_refilling(
            case in 0..TINY.len(),
            windows in 1usize..4,
            seed in proptest::collection::vec(0u32..1000, 24),
            hot in proptest::collection::vec(prop::bool::weighted(0.2), 24),
            pick in proptest::collection::vec(0usize..64, 8),
            set_seed in 0usize..1000,
        ) {
            let (e, _, g) = TINY[case];
            let drawn = drawn_case(case, windows, &seed, &hot, &pick, set_seed);
            prop_assume!(drawn.is_some());
            let (p, row, ranks) = drawn.unwrap();
            let m = ranks.len();
            let want = best_over_counts(&p, &row, &ranks);
            let mut st = State::new(&p, row.clone());
            let before = st.loads.clone();
            replace(&mut st, &ranks, usize::MAX, true);
            let got = p.episode_par(&st.row);
            prop_assert!((got - want).abs() < 1e-9, "re-placed {got}, best {want}");
            prop_assert!(find_duplicate(&st.row, p.s).is_none());
            let mut cnt = vec![0usize; e];
            st.row.iter().for_each(|&x| cnt[x] += 1);
            prop_assert!(cnt.iter().all(|&c| c >= 1 && c <= p.max_rep.min(g)));
            for r in (0..g).filter(|r| !ranks.contains(r)) {
                prop_assert_eq!(&st.row[r * p.s..(r + 1) * p.s], &row[r * p.s..(r + 1) * p.s]);
                for k in 0..p.w {
                    let (a, b) = (st.loads[r * p.w + k], before[r * p.w + k]);
                    prop_assert!((a - b).abs() < 1e-9, "rank {r} outside: {a} != {b}");
                }
            }
            if m == g {
                let opt = brute_force_optimum(&p, None);
                prop_assert!((got - opt).abs() < 1e-9, "whole layer {got}, optimum {opt}");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// Re-placing a set of ranks reaches the best re-placement of their replicas (brute
        /// force over every permutation of them), never changes the other ranks, and keeps the
        /// row valid. Planted bugs it caught (within 1 s, also without the saved cases): the
        /// episode floor without the outside ranks' heaviest load (the mean only), a rank
        /// holding one replica treated as empty (interchangeable with the empty ones).
        #[test]
        fn replacement_is_the_best_over_permutations(
            case in 0..TINY.len(),
            windows in 1usize..4,
            seed in proptest::collection::vec(0u32..1000, 24),
            hot in proptest::collection::vec(prop::bool::weighted(0.2), 24),
            pick in proptest::collection::vec(0usize..64, 8),
            set_seed in 0usize..1000,
        ) {
            let (e, _, g) = TINY[case];
            let drawn = drawn_case(case, windows, &seed, &hot, &pick, set_seed);
            prop_assume!(drawn.is_some());
            let (p, row, sorted) = drawn.unwrap();
            let m = sorted.len();
            let want = best_over_permutations(&p, &row, &sorted);
            let mut st = State::new(&p, row.clone());
            replace(&mut st, &sorted, usize::MAX, false);
            let got = p.episode_par(&st.row);
            prop_assert!((got - want).abs() < 1e-9, "re-placed {got}, best {want}");
            prop_assert!(find_duplicate(&st.row, p.s).is_none());
            for r in (0..g).filter(|r| !sorted.contains(r)) {
                prop_assert_eq!(&st.row[r * p.s..(r + 1) * p.s], &row[r * p.s..(r + 1) * p.s]);
            }
            let mut a = st.row.clone();
            let mut b = row.clone();
            a.sort_unstable();
            b.sort_unstable();
            prop_assert_eq!(a, b, "the replicas are the same");
            // The whole layer re-placed at once: the best placement with these counts.
            if m == g {
                let mut cnt = vec![0usize; e];
                row.iter().for_each(|&x| cnt[x] += 1);
                let opt = brute_force_optimum(&p, Some(&cnt));
                prop_assert!((got - opt).abs() < 1e-9, "whole layer {got}, optimum {opt}");
            }
        }

    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// `improve` returns a valid row (every expert served, no duplicate, counts within the
        /// cap), never worse than its start and never below the brute-force optimum.
        #[test]
        fn improve_keeps_plans_valid_and_never_worse(
            case in 0..TINY.len(),
            windows in 1usize..4,
            seed in proptest::collection::vec(0u32..1000, 24),
            hot in proptest::collection::vec(prop::bool::weighted(0.2), 24),
            pick in proptest::collection::vec(0usize..64, 8),
            budget in 1usize..200_000,
        ) {
            let (e, slots, g) = TINY[case];
            let p = problem(slots, g, &rows(e, windows, &seed, &hot));
            prop_assume!(eligible(&p));
            let row = start_row(&p, &pick);
            prop_assume!(find_duplicate(&row, p.s).is_none());
            let before = p.episode_par(&row);
            let out = improve(&p, row, budget, budget / 2);
            prop_assert_eq!(out.len(), slots);
            prop_assert!(find_duplicate(&out, p.s).is_none());
            let mut cnt = vec![0usize; e];
            out.iter().for_each(|&x| cnt[x] += 1);
            prop_assert!(cnt.iter().all(|&c| c >= 1 && c <= p.max_rep.min(g)));
            let f = p.episode_par(&out);
            prop_assert!(f <= before + 1e-12, "{f} worse than the start {before}");
            let opt = brute_force_optimum(&p, None);
            prop_assert!(f >= opt - 1e-9, "{f} below the optimum {opt}");
        }
    }

    /// The first 16-expert 8 x 4 layer of the sweep with four windows (`exact_sweep zipf 16 32
    /// 5 4`): the heuristic's plan is at 1.029502 times the mean and the searches find nothing
    /// better; the neighbourhood search brings it to 1.020614 (below 1.021 asserted; with only
    /// the descent and no kicks it stops at 1.021131).
    #[test]
    fn improves_a_sweep_layer_with_four_windows() {
        let windows: [[f64; 16]; 4] = [
            [
                660.0, 782.0, 397.0, 376.0, 209.0, 353.0, 378.0, 496.0, 395.0, 252.0, 407.0, 166.0,
                234.0, 110.0, 311.0, 167.0,
            ],
            [
                792.0, 762.0, 343.0, 490.0, 244.0, 379.0, 279.0, 373.0, 411.0, 240.0, 333.0, 177.0,
                279.0, 127.0, 325.0, 218.0,
            ],
            [
                723.0, 944.0, 460.0, 400.0, 311.0, 380.0, 430.0, 407.0, 383.0, 213.0, 286.0, 125.0,
                227.0, 127.0, 227.0, 149.0,
            ],
            [
                918.0, 792.0, 365.0, 460.0, 287.0, 401.0, 420.0, 264.0, 339.0, 217.0, 324.0, 169.0,
                262.0, 120.0, 259.0, 256.0,
            ],
        ];
        let rows: Vec<Vec<f64>> = windows.iter().map(|w| w.to_vec()).collect();
        let p = problem(32, 8, &rows);
        let shape = crate::shape::Shape::new(16, 16, 8, 1, 1).expect("a valid shape");
        let start = crate::planner::joint::heuristic(&p, &shape, false);
        let before = p.episode_par(&start);
        assert!((before - 1.029502).abs() < 1e-6, "heuristic {before}");
        let out = improve(&p, start, NODES, 0);
        let after = p.episode_par(&out);
        assert!(after < 1.021, "{after}");
        assert!(find_duplicate(&out, p.s).is_none());
        // The plan `joint` returns is at least as good.
        let res = crate::planner::joint::plan_layer(&p, &shape, false);
        assert!(p.objective(&res.row).0 <= after + 1e-12);
    }

    /// A pareto 16-expert 4 x 8 layer of the sweep with four windows (`exact_sweep pareto 16
    /// 32 5 4`, the fifth 4 x 8 layer), where HiGHS found 1.004196
    /// (`docs/benchmarks/raw/eplb-milp-2026-12-07`) and `joint` with counts fixed inside the
    /// neighbourhoods stopped at 1.007263: the phase with counts free brings it to 1.005225
    /// (below 1.006 asserted).
    #[test]
    fn counts_inside_neighbourhoods_improve_a_sweep_layer() {
        let windows: [[f64; 16]; 4] = [
            [
                4732.0, 1855.0, 9714.0, 6054.0, 917.0, 5756.0, 2547.0, 1715.0, 1066.0, 1163.0,
                4422.0, 2583.0, 2422.0, 881.0, 1599.0, 7719.0,
            ],
            [
                5252.0, 1290.0, 8629.0, 4679.0, 1896.0, 8670.0, 1803.0, 1444.0, 1123.0, 1073.0,
                4457.0, 2979.0, 2047.0, 1107.0, 1253.0, 6608.0,
            ],
            [
                6400.0, 1762.0, 8648.0, 6376.0, 1280.0, 7099.0, 2244.0, 1850.0, 944.0, 1352.0,
                4712.0, 2715.0, 1402.0, 923.0, 1430.0, 7575.0,
            ],
            [
                4891.0, 1399.0, 8179.0, 5824.0, 1218.0, 6402.0, 2453.0, 1637.0, 1140.0, 1327.0,
                3700.0, 3086.0, 1985.0, 1327.0, 1304.0, 7370.0,
            ],
        ];
        let rows: Vec<Vec<f64>> = windows.iter().map(|w| w.to_vec()).collect();
        let p = problem(32, 4, &rows);
        let shape = crate::shape::Shape::new(16, 16, 4, 1, 1).expect("a valid shape");
        let res = crate::planner::joint::plan_layer(&p, &shape, false);
        let f = p.episode_par(&res.row);
        assert!(f < 1.006, "{f}");
        assert!(find_duplicate(&res.row, p.s).is_none());
    }
}
