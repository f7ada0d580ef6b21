//! The previous implementation of `greedy` (commit c09e984), kept unchanged as the oracle
//! that the current one must match bit for bit: a binary heap of ranks, one sort item per
//! replica, a rank x expert table of what each rank holds, and the water-filling and duplicate
//! repair of that commit; with the scoring every `greedy` plan goes through (the objective,
//! the rank loads and the history's PAR) as it was then. Tests only.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use crate::load::LoadHistory;
use crate::metrics::{PlacementScore, par};
use crate::placement::{Placement, column_layout, find_duplicate};
use crate::planner::problem::Problem;
use crate::shape::Shape;

/// A rank ordered by (load, index).
#[derive(Clone, Copy, PartialEq)]
struct RankKey(f64, usize);
impl Eq for RankKey {}
impl PartialOrd for RankKey {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for RankKey {
    fn cmp(&self, o: &Self) -> Ordering {
        self.0.total_cmp(&o.0).then(self.1.cmp(&o.1))
    }
}

/// Replicate and pack `experts` (ids) with loads `load[id]` into `ranks` ranks of `s` slots.
/// Returns, per rank, its `s` experts.
fn replicate_and_pack(
    load: &[f64],
    experts: &[usize],
    ranks: usize,
    s: usize,
    dup_ok: bool,
) -> Vec<Vec<usize>> {
    let n = experts.len();
    let local: Vec<f64> = experts.iter().map(|&e| load[e]).collect();
    let slots = ranks * s;
    let max_rep = if dup_ok { slots } else { ranks };
    let cnt = water_fill(&local, slots, max_rep);
    // Items: (per-replica load, local expert index).
    let mut items: Vec<(f64, usize)> = Vec::with_capacity(slots);
    for i in 0..n {
        for _ in 0..cnt[i] {
            items.push((local[i] / cnt[i] as f64, i));
        }
    }
    items.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut packs: Vec<Vec<usize>> = vec![Vec::with_capacity(s); ranks];
    // held[r * n + i]: rank r already holds local expert i.
    let mut held = vec![false; ranks * n];
    // Ranks with a free slot, lightest first (ties: lower rank).
    let mut heap: BinaryHeap<Reverse<RankKey>> =
        (0..ranks).map(|r| Reverse(RankKey(0.0, r))).collect();
    let mut skipped: Vec<RankKey> = Vec::new();
    for (w, i) in items {
        skipped.clear();
        let mut chosen = None;
        while let Some(Reverse(k)) = heap.pop() {
            if dup_ok || !held[k.1 * n + i] {
                chosen = Some(k);
                break;
            }
            skipped.push(k);
        }
        // No eligible rank: take the lightest one with room (repaired afterwards).
        let k = match chosen {
            Some(k) => k,
            None if !skipped.is_empty() => skipped.remove(0),
            None => break,
        };
        for sk in skipped.drain(..) {
            heap.push(Reverse(sk));
        }
        let r = k.1;
        packs[r].push(experts[i]);
        held[r * n + i] = true;
        if packs[r].len() < s {
            heap.push(Reverse(RankKey(k.0 + w, r)));
        }
    }
    packs
}

/// One layer's greedy row from the summed load.
pub(super) fn greedy_row(load: &[f64], shape: &Shape, allow_hierarchical: bool) -> Vec<usize> {
    let g = shape.num_ranks;
    let s = shape.slots_per_rank();
    let e_n = shape.num_experts;
    let dup_ok = shape.duplicates_forced();
    let hier = allow_hierarchical && shape.hierarchical() && (dup_ok || s <= e_n / shape.num_nodes);
    let mut row = Vec::with_capacity(shape.slots());
    if hier {
        let n = shape.num_nodes;
        let k = shape.num_groups;
        let per_group = shape.experts_per_group();
        let groups_per_node = k / n;
        let gl: Vec<f64> = (0..k)
            .map(|q| load[q * per_group..(q + 1) * per_group].iter().sum())
            .collect();
        let mut order: Vec<usize> = (0..k).collect();
        order.sort_by(|&a, &b| gl[b].total_cmp(&gl[a]).then(a.cmp(&b)));
        let mut node_groups: Vec<Vec<usize>> = vec![Vec::new(); n];
        let mut node_load = vec![0.0f64; n];
        for q in order {
            let mut pick: Option<usize> = None;
            for (m, groups) in node_groups.iter().enumerate() {
                if groups.len() < groups_per_node
                    && pick.is_none_or(|p| node_load[m] < node_load[p])
                {
                    pick = Some(m);
                }
            }
            if let Some(m) = pick {
                node_groups[m].push(q);
                node_load[m] += gl[q];
            }
        }
        let rpn = shape.ranks_per_node();
        for groups in &mut node_groups {
            groups.sort_unstable();
            let experts: Vec<usize> = groups
                .iter()
                .flat_map(|&q| q * per_group..(q + 1) * per_group)
                .collect();
            for pack in replicate_and_pack(load, &experts, rpn, s, dup_ok) {
                row.extend(pack);
            }
        }
    } else {
        let experts: Vec<usize> = (0..e_n).collect();
        for pack in replicate_and_pack(load, &experts, g, s, dup_ok) {
            row.extend(pack);
        }
    }
    repair_duplicates(&mut row, e_n, g);
    row
}

/// `placement::repair_duplicates` as of that commit (it scanned a repaired row once more).
fn repair_duplicates(row: &mut [usize], num_experts: usize, num_ranks: usize) {
    let s = row.len() / num_ranks.max(1);
    if s > num_experts || s == 0 {
        return;
    }
    let holds = |row: &[usize], rank: usize, e: usize| row[rank * s..rank * s + s].contains(&e);
    let mut guard = 0;
    while let Some((a, e)) = find_duplicate(row, s) {
        guard += 1;
        if guard > row.len() * 4 {
            break;
        }
        let ia = (a * s..a * s + s).rfind(|&i| row[i] == e).unwrap_or(a * s);
        let mut done = false;
        'outer: for b in 0..num_ranks {
            if b == a || holds(row, b, e) {
                continue;
            }
            for j in b * s..b * s + s {
                let f = row[j];
                if f != e && !holds(row, a, f) {
                    row.swap(ia, j);
                    done = true;
                    break 'outer;
                }
            }
        }
        if !done {
            break;
        }
    }
    if find_duplicate(row, s).is_some() {
        column_layout(row, num_experts, num_ranks);
    }
}

/// `planner::problem::water_fill` as of that commit (a heap ordered by `total_cmp`).
pub(super) fn water_fill(loads: &[f64], slots: usize, max_rep: usize) -> Vec<usize> {
    use std::cmp::Ordering;
    use std::collections::BinaryHeap;
    #[derive(PartialEq)]
    struct Item(f64, usize);
    impl Eq for Item {}
    impl PartialOrd for Item {
        fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
            Some(self.cmp(o))
        }
    }
    impl Ord for Item {
        fn cmp(&self, o: &Self) -> Ordering {
            self.0.total_cmp(&o.0).then(o.1.cmp(&self.1))
        }
    }
    let n = loads.len();
    let mut cnt = vec![1usize; n];
    let mut heap: BinaryHeap<Item> = (0..n).map(|i| Item(loads[i], i)).collect();
    let mut extra = slots.saturating_sub(n);
    while extra > 0 {
        let Some(Item(_, i)) = heap.pop() else { break };
        if cnt[i] >= max_rep {
            continue;
        }
        cnt[i] += 1;
        extra -= 1;
        heap.push(Item(loads[i] / cnt[i] as f64, i));
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

/// `Problem::episode_par` as of that commit (episode-major rank loads, every replica divided).
pub(super) fn episode_par(p: &Problem, row: &[usize]) -> f64 {
    if p.empty {
        return 1.0;
    }
    let mut cnt = vec![0u32; p.e];
    for &e in row {
        cnt[e] += 1;
    }
    let mut loads = vec![0.0f64; p.w * p.g];
    for (slot, &e) in row.iter().enumerate() {
        let r = slot / p.s;
        let c = f64::from(cnt[e]);
        for k in 0..p.w {
            loads[k * p.g + r] += p.x[e * p.w + k] / c;
        }
    }
    (0..p.w)
        .map(|k| {
            p.omega[k]
                * loads[k * p.g..(k + 1) * p.g]
                    .iter()
                    .copied()
                    .fold(f64::NEG_INFINITY, f64::max)
        })
        .sum()
}

/// `metrics::rank_loads` as of that commit (every replica divided).
pub(super) fn rank_loads(row: &[usize], load: &[f64], num_ranks: usize) -> Vec<f64> {
    let g = num_ranks.max(1);
    let s = row.len() / g;
    let mut cnt = vec![0u32; load.len()];
    for &e in row {
        if let Some(c) = cnt.get_mut(e) {
            *c += 1;
        }
    }
    (0..g)
        .map(|r| {
            row[r * s..r * s + s]
                .iter()
                .map(|&e| match (load.get(e), cnt.get(e)) {
                    (Some(&x), Some(&c)) if c > 0 => x / f64::from(c),
                    _ => 0.0,
                })
                .sum()
        })
        .collect()
}

/// `metrics::score_history` as of that commit (window by window, `layer_par` on each layer;
/// without the shape check).
pub(super) fn score_history(placement: &Placement, history: &LoadHistory) -> PlacementScore {
    let w = history.num_windows() as f64;
    let mut per_layer = vec![0.0; placement.num_layers];
    let mut worst: f64 = 1.0;
    for win in history.windows() {
        for (l, acc) in per_layer.iter_mut().enumerate() {
            let p = placement.phy2log.get(l).map_or(1.0, |row| {
                par(&rank_loads(row, &win[l], placement.num_ranks))
            });
            *acc += p / w;
            worst = worst.max(p);
        }
    }
    let mut s = PlacementScore::from_per_layer(per_layer);
    s.worst = worst;
    s
}

/// `Problem::new` as of that commit (each window's total summed on its own).
pub(super) fn problem(
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
    for (k, row) in windows.iter().enumerate() {
        let total: f64 = row.iter().sum();
        for (i, &v) in row.iter().enumerate() {
            raw_sum[i] += v;
        }
        if total > 0.0 {
            let scale = g as f64 / total;
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
        lam: crate::planner::problem::VARIANCE_WEIGHT / g as f64,
        empty,
    }
}
