//! Placements used before any load statistics exist.

use serde::{Deserialize, Serialize};

use crate::error::{EplbError, Result};
use crate::placement::{Placement, repair_duplicates};
use crate::shape::Shape;

/// The two strategies engines offer before statistics exist.
///
/// * `Linear`: physical slot `k` holds expert `k mod E`. Expert `e` sits on rank `e / S`
///   (`e / (E/G)` when `R = 0`); the R redundant slots (the last ones) hold replicas of experts
///   `0, 1, .., R-1` (wrapping modulo E when `R > E`).
/// * `RoundRobin`: expert `e` sits on rank `e mod G` at local index `e / G`. The R redundant
///   replicas are again of experts `0, 1, .., R-1` (mod E); replica `j` goes to the first rank,
///   scanning from rank `(E + j) mod G` upwards, that has a free slot and does not yet hold
///   that expert. Free slots on a rank come after its primary experts.
///
/// Both are correct when E is not divisible by G, and never put two replicas of an expert on
/// one rank unless `S > E` forces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum InitialStrategy {
    #[default]
    Linear,
    RoundRobin,
}

impl std::str::FromStr for InitialStrategy {
    type Err = EplbError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "linear" => Ok(InitialStrategy::Linear),
            "round-robin" | "round_robin" | "roundrobin" => Ok(InitialStrategy::RoundRobin),
            other => Err(EplbError::Request(format!(
                "unknown initial strategy '{other}' (expected linear or round-robin)"
            ))),
        }
    }
}

/// One layer of the given strategy.
pub fn initial_row(strategy: InitialStrategy, shape: &Shape) -> Vec<usize> {
    let e_n = shape.num_experts;
    let g = shape.num_ranks;
    let s = shape.slots_per_rank();
    let total = shape.slots();
    match strategy {
        InitialStrategy::Linear => (0..total).map(|k| k % e_n).collect(),
        InitialStrategy::RoundRobin => {
            let mut row = vec![usize::MAX; total];
            let mut fill = vec![0usize; g];
            for e in 0..e_n {
                let r = e % g;
                row[r * s + fill[r]] = e;
                fill[r] += 1;
            }
            let forced = shape.duplicates_forced();
            for j in 0..shape.num_redundant {
                let e = j % e_n;
                let start = (e_n + j) % g;
                let holds = |row: &[usize], r: usize| row[r * s..r * s + s].contains(&e);
                let pick = (0..g)
                    .map(|k| (start + k) % g)
                    .find(|&r| fill[r] < s && (forced || !holds(&row, r)))
                    .or_else(|| (0..g).map(|k| (start + k) % g).find(|&r| fill[r] < s));
                if let Some(r) = pick {
                    row[r * s + fill[r]] = e;
                    fill[r] += 1;
                }
            }
            repair_duplicates(&mut row, e_n, g);
            row
        }
    }
}

/// The initial placement of `num_layers` identical layers.
pub fn initial_placement(
    strategy: InitialStrategy,
    num_layers: usize,
    shape: &Shape,
) -> Result<Placement> {
    shape.validate()?;
    if num_layers == 0 {
        return Err(EplbError::Request(
            "the number of layers must be at least 1".into(),
        ));
    }
    let row = initial_row(strategy, shape);
    Placement::from_phy2log(
        shape.num_experts,
        shape.num_ranks,
        shape.num_nodes,
        vec![row; num_layers],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_divisible() {
        let s = Shape::new(8, 0, 4, 1, 1).unwrap();
        assert_eq!(
            initial_row(InitialStrategy::Linear, &s),
            vec![0, 1, 2, 3, 4, 5, 6, 7]
        );
    }

    #[test]
    fn linear_non_divisible_with_redundancy() {
        // E = 10, G = 4, R = 2: S = 3; the replicas are of experts 0 and 1 on rank 3.
        let s = Shape::new(10, 2, 4, 1, 1).unwrap();
        let p = initial_placement(InitialStrategy::Linear, 2, &s).unwrap();
        assert_eq!(p.phy2log[0], vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]);
    }

    #[test]
    fn round_robin_divisible() {
        let s = Shape::new(8, 0, 4, 1, 1).unwrap();
        // rank r holds r and r + 4.
        assert_eq!(
            initial_row(InitialStrategy::RoundRobin, &s),
            vec![0, 4, 1, 5, 2, 6, 3, 7]
        );
    }

    #[test]
    fn round_robin_non_divisible_with_redundancy() {
        // E = 10, G = 4, R = 2, S = 3: primaries 0,4,8 | 1,5,9 | 2,6 | 3,7; replicas of 0 and 1
        // scan from ranks (10+0)%4 = 2 and (10+1)%4 = 3.
        let s = Shape::new(10, 2, 4, 1, 1).unwrap();
        let p = initial_placement(InitialStrategy::RoundRobin, 1, &s).unwrap();
        assert_eq!(p.phy2log[0], vec![0, 4, 8, 1, 5, 9, 2, 6, 0, 3, 7, 1]);
    }

    #[test]
    fn round_robin_when_g_divides_e_avoids_self_replica() {
        // E = 4, G = 4, R = 4: the plain rule would put each replica next to its primary.
        let s = Shape::new(4, 4, 4, 1, 1).unwrap();
        let p = initial_placement(InitialStrategy::RoundRobin, 1, &s).unwrap();
        assert_eq!(p.phy2log[0], vec![0, 3, 1, 0, 2, 1, 3, 2]);
    }

    #[test]
    fn strategy_parses() {
        assert_eq!(
            "round-robin".parse::<InitialStrategy>().unwrap(),
            InitialStrategy::RoundRobin
        );
        assert!("zigzag".parse::<InitialStrategy>().is_err());
    }
}
