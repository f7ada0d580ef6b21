//! Balance and migration metrics.
//!
//! A token routed to a replicated expert goes to one of its replicas, chosen by a hash of the
//! token index, so each replica receives an equal share: a rank's load is the sum over its
//! slots of `load[expert] / replicas[expert]`. PAR (peak-to-average ratio) is the largest rank
//! load divided by the mean rank load; balancedness is `1 / PAR`.

use serde::{Deserialize, Serialize};

use crate::error::{EplbError, Result};
use crate::load::LoadHistory;
use crate::placement::Placement;

/// One rank load per rank for one layer: `row` is the layer's `phy2log`, `load` the logical
/// expert loads. Experts out of range of `load` count as zero.
pub fn rank_loads(row: &[usize], load: &[f64], num_ranks: usize) -> Vec<f64> {
    let mut out = Vec::new();
    rank_loads_per_window(row, &[load], num_ranks, &mut out);
    out
}

/// [`rank_loads`] of one layer under several loads of the same experts (windows), into
/// `out[k * G + r]` (rank `r` under `loads[k]`): scoring a layer under a history counts its
/// replicas and reads its slots once.
fn rank_loads_per_window(row: &[usize], loads: &[&[f64]], num_ranks: usize, out: &mut Vec<f64>) {
    let g = num_ranks.max(1);
    let s = row.len() / g;
    let w = loads.len();
    let mut cnt = vec![0u32; loads.first().map_or(0, |l| l.len())];
    for &e in row {
        if let Some(c) = cnt.get_mut(e) {
            *c += 1;
        }
    }
    // Each rank sums its slots in slot order from -0.0, as `Iterator::sum` does.
    out.clear();
    out.resize(w * g, -0.0);
    for r in 0..g {
        for &e in &row[r * s..r * s + s] {
            match cnt.get(e) {
                // x / 1 is x exactly; most experts have one replica, and the division is what
                // scoring spends most of its time on.
                Some(&1) => (0..w).for_each(|k| out[k * g + r] += loads[k][e]),
                Some(&c) if c > 0 => {
                    let c = f64::from(c);
                    (0..w).for_each(|k| out[k * g + r] += loads[k][e] / c);
                }
                // An expert out of range adds a zero, as the sum of before did: a rank of only
                // such slots ends at 0.0, not at the starting -0.0.
                _ => (0..w).for_each(|k| out[k * g + r] += 0.0),
            }
        }
    }
}

/// Peak-to-average ratio of rank loads; 1.0 when there is no load at all.
pub fn par(rank_loads: &[f64]) -> f64 {
    let n = rank_loads.len();
    if n == 0 {
        return 1.0;
    }
    let total: f64 = rank_loads.iter().sum();
    if total <= 0.0 {
        return 1.0;
    }
    let max = rank_loads.iter().copied().fold(f64::MIN, f64::max);
    max / (total / n as f64)
}

/// PAR of one layer of a placement under a logical load.
pub fn layer_par(placement: &Placement, layer: usize, load: &[f64]) -> f64 {
    placement
        .phy2log
        .get(layer)
        .map_or(1.0, |row| par(&rank_loads(row, load, placement.num_ranks)))
}

/// PAR per layer with its mean and worst.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlacementScore {
    pub per_layer: Vec<f64>,
    pub mean: f64,
    pub worst: f64,
}

impl PlacementScore {
    pub fn from_per_layer(per_layer: Vec<f64>) -> PlacementScore {
        let n = per_layer.len().max(1) as f64;
        let mean = per_layer.iter().sum::<f64>() / n;
        let worst = per_layer.iter().copied().fold(1.0, f64::max);
        PlacementScore {
            per_layer,
            mean,
            worst,
        }
    }

    /// Mean balancedness (`1 / PAR`) over layers.
    pub fn mean_balancedness(&self) -> f64 {
        let n = self.per_layer.len().max(1) as f64;
        self.per_layer.iter().map(|p| 1.0 / p).sum::<f64>() / n
    }
}

fn check_load_shape(placement: &Placement, layers: usize, experts: usize) -> Result<()> {
    if layers != placement.num_layers || experts != placement.num_logical_experts {
        return Err(EplbError::Mismatch(format!(
            "placement has {} layers x {} experts but the load has {} layers x {} experts",
            placement.num_layers, placement.num_logical_experts, layers, experts
        )));
    }
    Ok(())
}

/// PAR of every layer under one window `[layer][expert]`.
pub fn score(placement: &Placement, load: &[Vec<f64>]) -> Result<PlacementScore> {
    let experts = load.first().map_or(0, Vec::len);
    check_load_shape(placement, load.len(), experts)?;
    Ok(PlacementScore::from_per_layer(
        (0..placement.num_layers)
            .map(|l| layer_par(placement, l, &load[l]))
            .collect(),
    ))
}

/// Scores over every window of a history: `per_layer` is each layer's mean PAR over the
/// windows, `mean` the mean over layers and windows, `worst` the worst over layers and
/// windows.
pub fn score_history(placement: &Placement, history: &LoadHistory) -> Result<PlacementScore> {
    check_load_shape(placement, history.num_layers(), history.num_experts())?;
    let w = history.num_windows() as f64;
    let mut per_layer = vec![0.0; placement.num_layers];
    let mut worst: f64 = 1.0;
    let g = placement.num_ranks.max(1);
    let mut loads = Vec::new();
    // Layer by layer, so that a layer's slots are read once for all windows; each layer still
    // sums its windows oldest first.
    for (l, acc) in per_layer.iter_mut().enumerate() {
        let row = placement.phy2log.get(l);
        if let Some(row) = row {
            rank_loads_per_window(row, &history.layer(l), placement.num_ranks, &mut loads);
        }
        for k in 0..history.num_windows() {
            let p = match row {
                Some(_) => par(&loads[k * g..(k + 1) * g]),
                // As layer_par: a layer the placement lacks counts as balanced.
                None => 1.0,
            };
            *acc += p / w;
            worst = worst.max(p);
        }
    }
    let mut s = PlacementScore::from_per_layer(per_layer);
    s.worst = worst;
    Ok(s)
}

/// Slots whose content differs between two placements (each such slot receives weights).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migration {
    pub per_layer: Vec<usize>,
    pub slots: usize,
    pub bytes: u64,
}

/// Bytes of one DeepSeek-V3 routed expert in bf16 (3 matrices of 7168 x 2048).
pub const DEEPSEEK_V3_EXPERT_BYTES: u64 = 3 * 7168 * 2048 * 2;

/// Slots (and bytes, at `bytes_per_expert` each) that differ between `old` and `new`.
pub fn migration_cost(
    old: &Placement,
    new: &Placement,
    bytes_per_expert: u64,
) -> Result<Migration> {
    if old.num_layers != new.num_layers || old.num_slots() != new.num_slots() {
        return Err(EplbError::Mismatch(format!(
            "placements differ in shape: {} layers x {} slots vs {} layers x {} slots",
            old.num_layers,
            old.num_slots(),
            new.num_layers,
            new.num_slots()
        )));
    }
    let per_layer: Vec<usize> = old
        .phy2log
        .iter()
        .zip(&new.phy2log)
        .map(|(a, b)| a.iter().zip(b).filter(|(x, y)| x != y).count())
        .collect();
    let slots = per_layer.iter().sum::<usize>();
    // Checked: a wrapped product would report a small, wrong byte count.
    let bytes = (slots as u64)
        .checked_mul(bytes_per_expert)
        .ok_or_else(|| {
            EplbError::Request(format!(
                "{slots} slots x {bytes_per_expert} bytes per expert is more than {} bytes",
                u64::MAX
            ))
        })?;
    Ok(Migration {
        per_layer,
        slots,
        bytes,
    })
}

/// Balancedness as the engines log it, for one placement under every window of a history.
///
/// * `sglang`: SGLang's `compute_utilization_rate` (`python/sglang/srt/eplb/expert_distribution.py`):
///   per layer mean rank load / max rank load (= 1 / PAR), averaged over layers; here also
///   averaged over windows.
/// * `vllm`: vLLM's `EplbState.step` log (`vllm/distributed/eplb/eplb_state.py`): the sum over
///   layers of the mean rank load divided by the sum over layers of the max rank load, so heavy
///   layers weigh more; here per window, averaged over windows.
///
/// Layers without load count as balanced (1).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Balancedness {
    pub sglang: f64,
    pub vllm: f64,
}

/// See [`Balancedness`].
pub fn balancedness(placement: &Placement, history: &LoadHistory) -> Result<Balancedness> {
    check_load_shape(placement, history.num_layers(), history.num_experts())?;
    let (mut sg, mut vl) = (0.0, 0.0);
    for win in history.windows() {
        let (mut per_layer, mut sum_mean, mut sum_max) = (0.0, 0.0, 0.0);
        for (l, row) in placement.phy2log.iter().enumerate() {
            let loads = rank_loads(row, &win[l], placement.num_ranks);
            let mean = loads.iter().sum::<f64>() / loads.len().max(1) as f64;
            let max = loads.iter().copied().fold(0.0, f64::max);
            per_layer += if max > 0.0 { mean / max } else { 1.0 };
            sum_mean += mean;
            sum_max += max;
        }
        sg += per_layer / placement.num_layers.max(1) as f64;
        vl += if sum_max > 0.0 {
            sum_mean / sum_max
        } else {
            1.0
        };
    }
    let w = history.num_windows() as f64;
    Ok(Balancedness {
        sglang: sg / w,
        vllm: vl / w,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_loads_split_replicas() {
        // rank 0 = [0, 1], rank 1 = [2, 0]; expert 0 has two replicas.
        let l = rank_loads(&[0, 1, 2, 0], &[10.0, 4.0, 6.0], 2);
        assert_eq!(l, vec![9.0, 11.0]);
        assert!((par(&l) - 1.1).abs() < 1e-12);
        assert_eq!(par(&[0.0, 0.0]), 1.0);
    }

    #[test]
    fn migration_counts_differing_slots() {
        let a = Placement::from_phy2log(3, 2, 1, vec![vec![0, 1, 2, 0]]).unwrap();
        let b = Placement::from_phy2log(3, 2, 1, vec![vec![0, 1, 0, 2]]).unwrap();
        let m = migration_cost(&a, &b, 100).unwrap();
        assert_eq!(m.slots, 2);
        assert_eq!(m.bytes, 200);
        // 2 slots of u64::MAX bytes do not fit: an error, not a wrapped count.
        let e = migration_cost(&a, &b, u64::MAX).unwrap_err().to_string();
        assert!(e.contains("2 slots x 18446744073709551615 bytes"), "{e}");
    }

    #[test]
    fn score_checks_shape() {
        let a = Placement::from_phy2log(3, 2, 1, vec![vec![0, 1, 2, 0]]).unwrap();
        assert!(score(&a, &[vec![1.0, 1.0]]).is_err());
        let s = score(&a, &[vec![10.0, 4.0, 6.0]]).unwrap();
        assert!((s.mean - 1.1).abs() < 1e-12);
    }

    #[test]
    fn balancedness_both_definitions() {
        // Layer 0: rank loads 9, 11 (1/PAR = 10/11); layer 1: rank loads 0, 100 (1/PAR = 1/2).
        let p = Placement::from_phy2log(3, 2, 1, vec![vec![0, 1, 2, 0], vec![0, 1, 2, 0]]).unwrap();
        let h = LoadHistory::single(vec![vec![10.0, 4.0, 6.0], vec![0.0, 0.0, 100.0]]).unwrap();
        let b = balancedness(&p, &h).unwrap();
        assert!(
            (b.sglang - (10.0 / 11.0 + 0.5) / 2.0).abs() < 1e-12,
            "{b:?}"
        );
        assert!(
            (b.vllm - (10.0 + 50.0) / (11.0 + 100.0)).abs() < 1e-12,
            "{b:?}"
        );
    }
}
