//! Node-level traffic of a placement: how much of the token traffic and of the weight
//! movement crosses nodes.
//!
//! Model: a layer's tokens come evenly from every node (data-parallel attention on every
//! rank), and the dispatcher prefers a replica on the token's own node (locality first; hashed
//! over all replicas when its node has none). A token-expert assignment then leaves its node
//! exactly when the expert has no replica there, so the cross-node share of a layer is
//! `sum_e load_e * (1 - nodes_holding_e / N) / sum_e load_e`. With at most one replica per
//! node per expert, locality-first routing still splits every expert's load evenly over its
//! replicas, which is what PAR assumes. Which experts a token picks together (co-activation,
//! group-limited routing) is not in the load statistics and is not modelled.

use crate::placement::Placement;

/// Cross-node share of one layer's token-expert assignments (0 with one node).
pub fn cross_node_share(row: &[usize], load: &[f64], num_nodes: usize) -> f64 {
    let n = num_nodes.max(1);
    if n == 1 || row.is_empty() {
        return 0.0;
    }
    let slots_per_node = row.len() / n;
    let mut nodes_holding = vec![0usize; load.len()];
    let mut seen = vec![usize::MAX; load.len()];
    for (slot, &e) in row.iter().enumerate() {
        let node = slot / slots_per_node.max(1);
        if e < load.len() && seen[e] != node {
            // Slots of one node are contiguous, so a change of node is a new node.
            seen[e] = node;
            nodes_holding[e] += 1;
        }
    }
    let total: f64 = load.iter().sum();
    if total <= 0.0 {
        return 0.0;
    }
    load.iter()
        .zip(&nodes_holding)
        .map(|(&x, &k)| x * (1.0 - k as f64 / n as f64))
        .sum::<f64>()
        / total
}

/// The smallest [`cross_node_share`] any placement with the same replica counts can have:
/// every expert on `min(replicas, N)` nodes.
pub fn cross_node_floor(row: &[usize], load: &[f64], num_nodes: usize) -> f64 {
    let n = num_nodes.max(1);
    let total: f64 = load.iter().sum();
    if n == 1 || total <= 0.0 {
        return 0.0;
    }
    let mut cnt = vec![0usize; load.len()];
    for &e in row {
        if let Some(c) = cnt.get_mut(e) {
            *c += 1;
        }
    }
    load.iter()
        .zip(&cnt)
        .map(|(&x, &c)| x * (1.0 - c.min(n) as f64 / n as f64))
        .sum::<f64>()
        / total
}

/// Mean over layers of [`cross_node_floor`] under `load` (`[L][E]`).
pub fn mean_cross_node_floor(placement: &Placement, load: &[Vec<f64>]) -> f64 {
    let l = placement.num_layers.min(load.len());
    if l == 0 {
        return 0.0;
    }
    (0..l)
        .map(|i| cross_node_floor(&placement.phy2log[i], &load[i], placement.num_nodes))
        .sum::<f64>()
        / l as f64
}

/// Mean over layers of [`cross_node_share`] under `load` (`[L][E]`).
pub fn mean_cross_node_share(placement: &Placement, load: &[Vec<f64>]) -> f64 {
    let l = placement.num_layers.min(load.len());
    if l == 0 {
        return 0.0;
    }
    (0..l)
        .map(|i| cross_node_share(&placement.phy2log[i], &load[i], placement.num_nodes))
        .sum::<f64>()
        / l as f64
}

/// Slots whose new expert is held by no rank of the slot's node in `old`: its weights must
/// come from another node.
pub fn cross_node_moves(old: &Placement, new: &Placement) -> usize {
    let n = new.num_nodes.max(1);
    let mut moves = 0;
    for (a, b) in old.phy2log.iter().zip(&new.phy2log) {
        if a.len() != b.len() || a.is_empty() {
            continue;
        }
        let per_node = a.len() / n;
        for node in 0..n {
            let range = node * per_node..(node + 1) * per_node;
            let before = &a[range.clone()];
            moves += range
                .filter(|&s| a[s] != b[s] && !before.contains(&b[s]))
                .count();
        }
    }
    moves
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_counts_nodes_without_a_replica() {
        // 2 nodes x 1 rank x 3 slots. Expert 0 on both nodes, 1 and 2 on node 0, 3 on node 1.
        let row = [0, 1, 2, 0, 3, 3];
        let load = [4.0, 2.0, 1.0, 1.0];
        // Expert 0 stays local; 1, 2, 3 leave their node for half of their tokens.
        let want = (2.0 * 0.5 + 1.0 * 0.5 + 1.0 * 0.5) / 8.0;
        assert!((cross_node_share(&row, &load, 2) - want).abs() < 1e-12);
        // Expert 3's two replicas share node 1; on two nodes it would stay local too.
        let floor = (2.0 * 0.5 + 1.0 * 0.5) / 8.0;
        assert!((cross_node_floor(&row, &load, 2) - floor).abs() < 1e-12);
        assert_eq!(cross_node_share(&row, &load, 1), 0.0);
    }

    #[test]
    fn moves_from_another_node_are_counted() {
        // 4 ranks of 1 slot, 2 nodes. Slots 0 and 1 swap experts within node 0 (local copies);
        // slot 3 takes expert 0, which node 1 did not hold: one cross-node move.
        let old = Placement::from_phy2log(3, 4, 2, vec![vec![0, 1, 2, 1]]).unwrap();
        let new = Placement::from_phy2log(3, 4, 2, vec![vec![1, 0, 2, 0]]).unwrap();
        assert_eq!(cross_node_moves(&old, &new), 1);
    }
}
