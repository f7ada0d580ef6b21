//! `multi-episode-lpt`: the plain multi-episode construction that `joint` is measured against.
//!
//! Replica counts by water-filling on the window-averaged load (every episode weighted the
//! same), then every replica, heaviest first, goes to the rank without that expert (with a
//! free slot) whose largest per-episode load after adding it is smallest (ties: the smaller
//! summed load, then the lower rank). No search.

use crate::placement::repair_duplicates;

use super::problem::{Problem, better, water_fill};

/// One layer's multi-episode LPT row.
pub(crate) fn lpt_row(p: &Problem) -> Vec<usize> {
    let w = p.w;
    let live = p.omega.iter().filter(|&&o| o > 0.0).count().max(1) as f64;
    // Window average of the normalised episodes (uniform, unlike joint's recency weights).
    let avg: Vec<f64> = (0..p.e)
        .map(|e| {
            (0..w)
                .filter(|&k| p.omega[k] > 0.0)
                .map(|k| p.x[e * w + k])
                .sum::<f64>()
                / live
        })
        .collect();
    let cnt = water_fill(&avg, p.slots(), p.max_rep);
    let mut items: Vec<usize> = (0..p.e)
        .flat_map(|e| std::iter::repeat_n(e, cnt[e]))
        .collect();
    items.sort_by(|&a, &b| {
        (avg[b] / cnt[b] as f64)
            .total_cmp(&(avg[a] / cnt[a] as f64))
            .then(a.cmp(&b))
    });
    let mut loads = vec![0.0f64; p.g * w];
    let mut packs: Vec<Vec<usize>> = vec![Vec::with_capacity(p.s); p.g];
    for e in items {
        let c = cnt[e] as f64;
        let mut best: Option<(f64, f64, usize)> = None;
        let mut fallback = None;
        for (r, pack) in packs.iter().enumerate() {
            if pack.len() >= p.s {
                continue;
            }
            fallback.get_or_insert(r);
            if !p.dup_ok && pack.contains(&e) {
                continue;
            }
            let mut peak = f64::NEG_INFINITY;
            let mut sum = 0.0;
            for k in 0..w {
                if p.omega[k] == 0.0 {
                    continue;
                }
                let l = loads[r * w + k] + p.x[e * w + k] / c;
                peak = peak.max(l);
                sum += l;
            }
            if best.is_none_or(|b| better((peak, sum), (b.0, b.1))) {
                best = Some((peak, sum, r));
            }
        }
        let Some(r) = best.map(|b| b.2).or(fallback) else {
            continue;
        };
        packs[r].push(e);
        for k in 0..w {
            loads[r * w + k] += p.x[e * w + k] / c;
        }
    }
    let mut row: Vec<usize> = packs.into_iter().flatten().collect();
    repair_duplicates(&mut row, p.e, p.g);
    row
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Equal window averages, opposite episodes: each replica goes where its per-episode peak
    /// is lowest (expert 2 joins expert 1, not expert 0), which balances both episodes exactly.
    #[test]
    fn places_by_the_per_episode_peak() {
        let (a, b) = ([4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]);
        let p = Problem::new(&[&a[..], &b[..]], 2, 4, 1.0, 2);
        let row = lpt_row(&p);
        assert_eq!(row, vec![0, 3, 1, 2]);
        assert!((p.episode_par(&row) - 1.0).abs() < 1e-12);
    }

    /// Water-filling on the window average gives the hot expert the redundant slots.
    #[test]
    fn replicates_the_hot_expert() {
        let a = [90.0, 5.0, 3.0, 2.0];
        let p = Problem::new(&[&a[..]], 4, 8, 1.0, 4);
        let row = lpt_row(&p);
        assert_eq!(row.iter().filter(|&&e| e == 0).count(), 4);
        assert!(crate::placement::find_duplicate(&row, 2).is_none());
    }
}
