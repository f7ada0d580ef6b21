//! `greedy`: the DeepSeek-style baseline, with deterministic tie-breaking and no same-rank
//! duplicates.
//!
//! Global: min-max replication on the summed load (one more replica to the expert with the
//! largest load per replica), then replicas heaviest first onto the lightest rank that has a
//! free slot and does not already hold that expert (ties: lower rank).
//! Hierarchical (groups divide evenly over nodes): expert groups heaviest first onto the
//! lightest node with room for a group, then the global procedure inside each node with the
//! node's share of slots.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use crate::placement::repair_duplicates;
use crate::shape::Shape;

use super::problem::water_fill;

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
pub(crate) fn greedy_row(load: &[f64], shape: &Shape, allow_hierarchical: bool) -> Vec<usize> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hierarchical_keeps_groups_on_nodes() {
        // 16 experts in 4 groups, 2 nodes of 2 ranks, 4 redundant: S = 5.
        let shape = Shape::new(16, 4, 4, 2, 4).unwrap();
        let load: Vec<f64> = (0..16).map(|e| ((e * 7) % 16 + 1) as f64).collect();
        let row = greedy_row(&load, &shape, true);
        let per_node = shape.slots() / shape.num_nodes;
        for node in 0..2 {
            let groups: std::collections::BTreeSet<usize> = row
                [node * per_node..(node + 1) * per_node]
                .iter()
                .map(|e| e / 4)
                .collect();
            assert_eq!(groups.len(), 2, "node {node} holds groups {groups:?}");
        }
        let mut served = [false; 16];
        row.iter().for_each(|&e| served[e] = true);
        assert!(served.iter().all(|&s| s));
        assert!(crate::placement::find_duplicate(&row, shape.slots_per_rank()).is_none());
    }

    #[test]
    fn global_gives_hot_expert_most_replicas() {
        let shape = Shape::new(4, 4, 4, 1, 1).unwrap();
        let row = greedy_row(&[100.0, 1.0, 1.0, 1.0], &shape, true);
        assert_eq!(row.iter().filter(|&&e| e == 0).count(), 4);
        assert!(crate::placement::find_duplicate(&row, 2).is_none());
    }
}
