//! Matching a new layer to the old one so that unchanged experts never move.
//!
//! PAR does not depend on which rank holds which set of experts, so the new rank contents may
//! be given to any ranks: an assignment problem (Hungarian method) gives each new rank's
//! content to the old rank with which it shares the most replicas. Inside a rank, an expert
//! that stays keeps its old slot; the rest fill the freed slots in ascending expert order.

/// Minimum-cost perfect assignment of an `n x n` cost matrix (row -> column), O(n^3).
pub(crate) fn assignment(cost: &[Vec<i64>]) -> Vec<usize> {
    let n = cost.len();
    if n == 0 {
        return Vec::new();
    }
    // Potentials method on a 1-indexed formulation.
    let inf = i64::MAX / 4;
    let mut u = vec![0i64; n + 1];
    let mut v = vec![0i64; n + 1];
    let mut pcol = vec![0usize; n + 1]; // column j matched to row pcol[j]
    let mut way = vec![0usize; n + 1];
    for i in 1..=n {
        pcol[0] = i;
        let mut j0 = 0usize;
        let mut minv = vec![inf; n + 1];
        let mut used = vec![false; n + 1];
        loop {
            used[j0] = true;
            let i0 = pcol[j0];
            let mut delta = inf;
            let mut j1 = 0usize;
            for j in 1..=n {
                if !used[j] {
                    let cur = cost[i0 - 1][j - 1] - u[i0] - v[j];
                    if cur < minv[j] {
                        minv[j] = cur;
                        way[j] = j0;
                    }
                    if minv[j] < delta {
                        delta = minv[j];
                        j1 = j;
                    }
                }
            }
            for j in 0..=n {
                if used[j] {
                    u[pcol[j]] += delta;
                    v[j] -= delta;
                } else {
                    minv[j] -= delta;
                }
            }
            j0 = j1;
            if pcol[j0] == 0 {
                break;
            }
        }
        loop {
            let j1 = way[j0];
            pcol[j0] = pcol[j1];
            j0 = j1;
            if j0 == 0 {
                break;
            }
        }
    }
    let mut row_to_col = vec![0usize; n];
    for j in 1..=n {
        if pcol[j] > 0 {
            row_to_col[pcol[j] - 1] = j - 1;
        }
    }
    row_to_col
}

fn overlap(a: &[usize], b: &[usize]) -> i64 {
    let mut used = vec![false; b.len()];
    let mut n = 0;
    for x in a {
        if let Some(k) = (0..b.len()).find(|&k| !used[k] && b[k] == *x) {
            used[k] = true;
            n += 1;
        }
    }
    n
}

/// Re-arranges `new` (same multiset per rank, ranks permuted) to share as many slots as
/// possible with `old`. Ranks are only permuted within blocks of `block` ranks (a node) when
/// `block` is given, across all ranks otherwise.
pub(crate) fn align(new: &[usize], old: &[usize], g: usize, block: Option<usize>) -> Vec<usize> {
    let s = new.len() / g;
    let block = block.unwrap_or(g).max(1);
    let mut target: Vec<usize> = vec![0; g]; // new rank -> position (old rank)
    for start in (0..g).step_by(block) {
        let end = (start + block).min(g);
        let n = end - start;
        let cost: Vec<Vec<i64>> = (start..end)
            .map(|rn| {
                (start..end)
                    .map(|ro| -overlap(&new[rn * s..rn * s + s], &old[ro * s..ro * s + s]))
                    .collect()
            })
            .collect();
        let m = assignment(&cost);
        for i in 0..n {
            target[start + i] = start + m[i];
        }
    }
    let mut out = vec![usize::MAX; new.len()];
    for rn in 0..g {
        let ro = target[rn];
        let mut content: Vec<usize> = new[rn * s..rn * s + s].to_vec();
        content.sort_unstable();
        let mut taken = vec![false; s];
        for i in 0..s {
            let want = old[ro * s + i];
            if let Some(k) = (0..s).find(|&k| !taken[k] && content[k] == want) {
                taken[k] = true;
                out[ro * s + i] = want;
            }
        }
        let mut rest = (0..s).filter(|&k| !taken[k]).map(|k| content[k]);
        for i in 0..s {
            if out[ro * s + i] == usize::MAX
                && let Some(x) = rest.next()
            {
                out[ro * s + i] = x;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignment_finds_minimum() {
        let c = vec![vec![4, 1, 3], vec![2, 0, 5], vec![3, 2, 2]];
        let m = assignment(&c);
        let total: i64 = m.iter().enumerate().map(|(i, &j)| c[i][j]).sum();
        assert_eq!(total, 5);
    }

    #[test]
    fn align_keeps_unchanged_experts_in_place() {
        let old = vec![0, 1, 2, 3, 4, 5];
        // Same contents, ranks permuted and slots shuffled.
        let new = vec![5, 4, 1, 0, 3, 2];
        assert_eq!(align(&new, &old, 3, None), old);
        // One expert replaced: only that slot differs.
        let new = vec![4, 5, 0, 1, 3, 0];
        let a = align(&new, &old, 3, None);
        assert_eq!(a.iter().zip(&old).filter(|(x, y)| x != y).count(), 1);
    }
}
