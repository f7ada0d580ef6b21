//! `greedy`: the DeepSeek-style baseline, with deterministic tie-breaking and no same-rank
//! duplicates.
//!
//! Global: min-max replication on the summed load (one more replica to the expert with the
//! largest load per replica), then replicas heaviest first onto the lightest rank that has a
//! free slot and does not already hold that expert (ties: lower rank).
//! Hierarchical (groups divide evenly over nodes): expert groups heaviest first onto the
//! lightest node with room for a group, then the global procedure inside each node with the
//! node's share of slots.

use crate::placement::repair_duplicates;
use crate::shape::Shape;

use super::problem::{total_order, water_fill_sorted};

/// Replicate and pack `experts` (ids) with loads `load[id]` into `ranks` ranks of `s` slots;
/// appends each rank's experts to `row`, rank after rank.
fn replicate_and_pack(
    load: &[f64],
    experts: &[usize],
    ranks: usize,
    s: usize,
    dup_ok: bool,
    row: &mut Vec<usize>,
) {
    let local: Vec<f64> = experts.iter().map(|&e| load[e]).collect();
    let slots = ranks * s;
    let max_rep = if dup_ok { slots } else { ranks };
    // Experts heaviest first (ties: lower local index): water-filling only needs the first few.
    let mut heaviest: Vec<(u64, usize)> = (0..local.len())
        .map(|i| (!total_order(local[i]), i))
        .collect();
    heaviest.sort_unstable();
    let ids: Vec<usize> = heaviest.iter().map(|&(_, i)| i).collect();
    let cnt = water_fill_sorted(&local, &ids, slots, max_rep);
    // Each rank's slots are `row[base + r * s..]`, the first `fill[r]` of them used. `last[r]`
    // is the last local expert placed on rank r: because an expert's replicas are placed one
    // after the other, a rank holds the expert being placed exactly when it was the last.
    let base = row.len();
    row.resize(base + slots, 0);
    let mut fill = vec![0usize; ranks];
    let mut last = vec![usize::MAX; ranks];
    let mut rank_load = vec![0.0f64; ranks];
    // The ranks with a free slot, in rank order, as (order key of the load, rank): the first
    // smallest key is the lightest rank, ties going to the lower rank. A scan of these beats
    // a heap on a node's ranks and stays close to it on a few hundred.
    let mut open: Vec<(u64, usize)> = (0..ranks).map(|r| (total_order(0.0), r)).collect();
    'items: for i in replica_order(&local, &cnt, &heaviest) {
        let w = local[i] / cnt[i] as f64;
        for _ in 0..cnt[i] {
            let lightest_without_i = (0..open.len())
                .filter(|&j| dup_ok || last[open[j].1] != i)
                .min_by_key(|&j| open[j].0);
            // Every open rank holds the expert: the lightest takes a duplicate (repaired
            // afterwards).
            let Some(j) = lightest_without_i.or_else(|| (0..open.len()).min_by_key(|&j| open[j].0))
            else {
                break 'items;
            };
            let r = open[j].1;
            row[base + r * s + fill[r]] = experts[i];
            fill[r] += 1;
            last[r] = i;
            rank_load[r] += w;
            if fill[r] == s {
                open.remove(j);
            } else {
                open[j].0 = total_order(rank_load[r]);
            }
        }
    }
    // Water-filling makes exactly `slots` replicas when there are no more experts than slots,
    // and the loop above stops at full ranks otherwise: every rank is full.
    debug_assert!(fill.iter().all(|&f| f == s));
}

/// The local experts in the order their replicas are placed: heaviest per replica first
/// (ties: lower local index), each expert once. `heaviest`: every expert's key by its whole
/// load, sorted. Experts with one replica keep their place in it; the few replicated ones are
/// sorted by their load per replica and merged in.
fn replica_order(local: &[f64], cnt: &[usize], heaviest: &[(u64, usize)]) -> Vec<usize> {
    let mut replicated: Vec<(u64, usize)> = heaviest
        .iter()
        .filter(|&&(_, i)| cnt[i] > 1)
        .map(|&(_, i)| (!total_order(local[i] / cnt[i] as f64), i))
        .collect();
    replicated.sort_unstable();
    let mut order = Vec::with_capacity(heaviest.len());
    let mut replicated = replicated.into_iter().peekable();
    for &(key, i) in heaviest.iter().filter(|&&(_, i)| cnt[i] == 1) {
        while let Some((_, r)) = replicated.next_if(|&other| other < (key, i)) {
            order.push(r);
        }
        order.push(i);
    }
    order.extend(replicated.map(|(_, r)| r));
    order
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
            let mut experts = Vec::with_capacity(groups.len() * per_group);
            for &q in groups.iter() {
                experts.extend(q * per_group..(q + 1) * per_group);
            }
            replicate_and_pack(load, &experts, rpn, s, dup_ok, &mut row);
        }
    } else {
        let experts: Vec<usize> = (0..e_n).collect();
        replicate_and_pack(load, &experts, g, s, dup_ok, &mut row);
    }
    repair_duplicates(&mut row, e_n, g);
    row
}

#[cfg(test)]
mod oracle;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::problem::water_fill;
    use crate::synth::Rng;

    /// A load of `e` experts of one of the kinds that decide tie-breaking: all zero, small
    /// integers (many ties, many zeros), a few repeated values, values a unit in the last
    /// place apart, heavy-tailed, all distinct.
    fn random_load(rng: &mut Rng, e: usize) -> Vec<f64> {
        let kind = rng.below(6);
        (0..e)
            .map(|_| match kind {
                0 => 0.0,
                1 => rng.below(4) as f64,
                2 => [0.0, 1.5, 3.0][rng.below(3)] * 1e3,
                3 => f64::from_bits(1e3f64.to_bits() + rng.below(3) as u64),
                4 => (2.0 * rng.normal()).exp().round(),
                _ => 1e3 * rng.uniform(),
            })
            .collect()
    }

    /// A valid shape of up to 40 experts on up to 12 ranks: nodes and groups are random
    /// divisors, slots per rank from the fewest that fit to a few more, and sometimes more
    /// than the experts (duplicates on a rank forced).
    fn random_shape(rng: &mut Rng) -> Shape {
        let divisor = |rng: &mut Rng, x: usize| {
            let d: Vec<usize> = (1..=x).filter(|d| x.is_multiple_of(*d)).collect();
            d[rng.below(d.len())]
        };
        let e = 1 + rng.below(40);
        let g = 1 + rng.below(12);
        let s = if rng.below(5) == 0 {
            e + 1 + rng.below(3)
        } else {
            e.div_ceil(g) + rng.below(4)
        };
        let (n, k) = (divisor(rng, g), divisor(rng, e));
        Shape::new(e, g * s - e, g, n, k).expect("valid by construction")
    }

    /// The current greedy against the previous implementation (`oracle`): the same row, bit
    /// for bit, on random shapes and loads, with and without the hierarchical variant, and on
    /// the DeepSeek-V3 shapes. Counts that the cases that matter occurred. (The packing's
    /// fallback, no rank with room lacks the expert, is not among them: it occurred in none of
    /// 200,000 small random cases of the previous implementation.)
    #[test]
    fn matches_the_previous_implementation() {
        let mut rng = Rng::new(7);
        let (mut hier, mut dup_ok, mut ties, mut zero) = (0, 0, 0, 0);
        let deepseek = [
            Shape::new(256, 32, 32, 4, 8).unwrap(),
            Shape::new(256, 64, 64, 8, 8).unwrap(),
        ];
        for case in 0..4000 {
            let shape = if case % 100 == 0 {
                deepseek[case / 100 % 2]
            } else {
                random_shape(&mut rng)
            };
            let load = random_load(&mut rng, shape.num_experts);
            for allow_hierarchical in [true, false] {
                assert_eq!(
                    greedy_row(&load, &shape, allow_hierarchical),
                    oracle::greedy_row(&load, &shape, allow_hierarchical),
                    "shape {shape:?}, hierarchical allowed: {allow_hierarchical}, load {load:?}"
                );
            }
            let s = shape.slots_per_rank();
            hier += usize::from(shape.hierarchical() && s <= shape.num_experts / shape.num_nodes);
            dup_ok += usize::from(shape.duplicates_forced());
            let mut sorted = load.clone();
            sorted.sort_by(f64::total_cmp);
            ties += usize::from(sorted.windows(2).any(|w| w[0] == w[1] && w[0] > 0.0));
            zero += usize::from(load.contains(&0.0));
        }
        for (what, n) in [
            ("hierarchical", hier),
            ("duplicates forced", dup_ok),
            ("tied loads", ties),
            ("zero loads", zero),
        ] {
            assert!(n >= 100, "only {n} cases with {what}");
        }
    }

    /// A row of `shape` for scoring: every expert once, the other slots random experts, in a
    /// random order (duplicates on a rank allowed: scoring does not care).
    fn random_row(rng: &mut Rng, shape: &Shape) -> Vec<usize> {
        let mut row: Vec<usize> = (0..shape.slots())
            .map(|i| {
                if i < shape.num_experts {
                    i
                } else {
                    rng.below(shape.num_experts)
                }
            })
            .collect();
        for i in (1..row.len()).rev() {
            row.swap(i, rng.below(i + 1));
        }
        row
    }

    /// Water-filling, over all experts and from the sorted ones, against the previous
    /// implementation: the same counts on random loads, slot counts (fewer than the experts
    /// included) and replica caps (binding or not, below 2 included).
    #[test]
    fn water_fill_matches_the_previous_implementation() {
        let mut rng = Rng::new(11);
        for _ in 0..4000 {
            let n = 1 + rng.below(40);
            let load = random_load(&mut rng, n);
            let slots = rng.below(3 * n + 2);
            let max_rep = 1 + rng.below(6);
            let want = oracle::water_fill(&load, slots, max_rep);
            let why = format!("load {load:?}, {slots} slots, at most {max_rep} replicas");
            assert_eq!(water_fill(&load, slots, max_rep), want, "{why}");
            let mut heaviest: Vec<usize> = (0..n).collect();
            heaviest.sort_by(|&a, &b| load[b].total_cmp(&load[a]).then(a.cmp(&b)));
            assert_eq!(
                water_fill_sorted(&load, &heaviest, slots, max_rep),
                want,
                "{why} (sorted)"
            );
        }
    }

    /// The planning problem (normalised episodes, weights, summed load), the objective and the
    /// history's scores (what every greedy plan reports) against the previous implementation,
    /// bit for bit: random shapes, rows (greedy's and random ones), episodes (empty ones
    /// included) and recency.
    #[test]
    fn scoring_matches_the_previous_implementation() {
        use crate::load::LoadHistory;
        use crate::metrics::{PlacementScore, rank_loads, score_history};
        use crate::placement::Placement;
        use crate::planner::problem::Problem;
        let mut rng = Rng::new(13);
        for case in 0..1500 {
            let shape = random_shape(&mut rng);
            let (layers, windows) = (1 + rng.below(3), 1 + rng.below(4));
            let history: Vec<Vec<Vec<f64>>> = (0..windows)
                .map(|_| {
                    (0..layers)
                        .map(|_| random_load(&mut rng, shape.num_experts))
                        .collect()
                })
                .collect();
            let rows: Vec<Vec<usize>> = (0..layers)
                .map(|l| {
                    if case % 2 == 0 {
                        greedy_row(&history[0][l], &shape, true)
                    } else {
                        random_row(&mut rng, &shape)
                    }
                })
                .collect();
            let recency = [1.0, 0.5, rng.uniform()][rng.below(3)];
            for (l, row) in rows.iter().enumerate() {
                let episodes: Vec<&[f64]> = history.iter().map(|w| w[l].as_slice()).collect();
                let p = Problem::new(
                    &episodes,
                    shape.num_ranks,
                    shape.slots(),
                    recency,
                    shape.max_replicas(),
                );
                let old = oracle::problem(
                    &episodes,
                    shape.num_ranks,
                    shape.slots(),
                    recency,
                    shape.max_replicas(),
                );
                let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                for (new, old) in [(&p.x, &old.x), (&p.omega, &old.omega), (&p.agg, &old.agg)]
                    .into_iter()
                    .chain([(&p.raw_sum, &old.raw_sum)])
                {
                    assert_eq!(bits(new), bits(old), "episodes {episodes:?}");
                }
                assert_eq!(p.empty, old.empty);
                assert_eq!(
                    p.episode_par(row).to_bits(),
                    oracle::episode_par(&old, row).to_bits(),
                    "shape {shape:?}, row {row:?}, episodes {episodes:?}"
                );
                // Sometimes a load one expert short: slots naming that expert count as zero.
                let short = usize::from(shape.num_experts > 1 && rng.below(2) == 0);
                let short = &history[0][l][..shape.num_experts - short];
                assert_eq!(
                    bits(&rank_loads(row, short, shape.num_ranks)),
                    bits(&oracle::rank_loads(row, short, shape.num_ranks)),
                    "row {row:?}, load {short:?}"
                );
            }
            // Scoring needs no valid placement (random rows may hold an expert twice on a rank).
            let placement = Placement {
                num_layers: layers,
                num_logical_experts: shape.num_experts,
                num_ranks: shape.num_ranks,
                num_nodes: shape.num_nodes,
                phy2log: rows,
            };
            let history = LoadHistory::new(history).expect("finite, non-negative loads");
            let new = score_history(&placement, &history).expect("shapes agree");
            let old = oracle::score_history(&placement, &history);
            let bits = |s: &PlacementScore| {
                let mut b: Vec<u64> = s.per_layer.iter().map(|x| x.to_bits()).collect();
                b.extend([s.mean.to_bits(), s.worst.to_bits()]);
                b
            };
            assert_eq!(bits(&new), bits(&old), "{placement:?}");
        }
    }

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
