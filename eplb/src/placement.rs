//! Placements (`phy2log` per layer) and every map derived from them.

use serde::{Deserialize, Serialize};
#[cfg(test)]
use serde_json::json;

use crate::error::{EplbError, Result};
use crate::shape::Shape;

/// Where every replica of every layer lives: `phy2log[layer][slot] = logical expert`.
///
/// Rank `r` holds slots `r*S .. r*S + S` with `S = slots / num_ranks`. Every other map is
/// derived from `phy2log`. Build one with [`Placement::from_phy2log`] (validating) or take one
/// from a planner or [`crate::initial_placement`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub num_layers: usize,
    pub num_logical_experts: usize,
    pub num_ranks: usize,
    pub num_nodes: usize,
    pub phy2log: Vec<Vec<usize>>,
}

fn perr<T>(m: String) -> Result<T> {
    Err(EplbError::Placement(m))
}

/// The slots per layer when every layer has layer 0's (0 without layers); else the error
/// naming the first layer that differs. For placements and for rows still holding vLLM's -1.
pub(crate) fn same_slots<T>(rows: &[Vec<T>]) -> Result<usize> {
    let slots = rows.first().map_or(0, Vec::len);
    match rows.iter().enumerate().find(|(_, r)| r.len() != slots) {
        Some((layer, row)) => perr(format!(
            "layer {layer} has {} slots, layer 0 has {slots}: every layer must have the same slots",
            row.len()
        )),
        None => Ok(slots),
    }
}

/// Finds, in one layer, a rank that holds an expert twice: `(rank, expert)`, the first rank
/// with one and in it the first slot whose expert an earlier slot holds.
pub(crate) fn find_duplicate(row: &[usize], slots_per_rank: usize) -> Option<(usize, usize)> {
    // Ranks of a plan hold a few slots, where a scan of the slots before is fastest; a rank
    // read from a file may hold any number (not yet checked against a shape), and a set keeps
    // that linear. Both find the same slot.
    const SCAN_UP_TO: usize = 32;
    let mut seen = std::collections::HashSet::new();
    for (rank, chunk) in row.chunks(slots_per_rank.max(1)).enumerate() {
        let twice = if chunk.len() <= SCAN_UP_TO {
            chunk
                .iter()
                .enumerate()
                .find(|&(i, e)| chunk[..i].contains(e))
                .map(|(_, &e)| e)
        } else {
            seen.clear();
            chunk.iter().copied().find(|&e| !seen.insert(e))
        };
        if let Some(e) = twice {
            return Some((rank, e));
        }
    }
    None
}

/// Repairs same-rank duplicates of one layer by swapping slot contents between ranks,
/// keeping replica counts. Falls back to a layout that is valid by construction (replicas in
/// order of count, dealt over ranks column by column) when no repairing swap exists.
/// Does nothing when `S > E` (duplicates are then forced and allowed).
pub(crate) fn repair_duplicates(row: &mut [usize], num_experts: usize, num_ranks: usize) {
    let s = row.len() / num_ranks.max(1);
    if s > num_experts || s == 0 {
        return;
    }
    let holds = |row: &[usize], rank: usize, e: usize| row[rank * s..rank * s + s].contains(&e);
    let mut guard = 0;
    // Whether the swaps left no duplicate (the last scan found none), so the row need not be
    // scanned again.
    let repaired = loop {
        let Some((a, e)) = find_duplicate(row, s) else {
            break true;
        };
        guard += 1;
        if guard > row.len() * 4 {
            break false;
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
            break false;
        }
    };
    if !repaired {
        column_layout(row, num_experts, num_ranks);
    }
}

/// Rebuilds a row from its replica counts so that no rank holds an expert twice (valid when
/// every count is at most `num_ranks`): replicas sorted by count then expert, the k-th replica
/// in that order goes to rank `k % G`.
pub(crate) fn column_layout(row: &mut [usize], num_experts: usize, num_ranks: usize) {
    let s = row.len() / num_ranks;
    let mut cnt = vec![0usize; num_experts];
    for &e in row.iter() {
        cnt[e] += 1;
    }
    let mut order: Vec<usize> = (0..num_experts).collect();
    order.sort_by(|&a, &b| cnt[b].cmp(&cnt[a]).then(a.cmp(&b)));
    let mut k = 0;
    for e in order {
        for _ in 0..cnt[e] {
            let rank = k % num_ranks;
            let local = k / num_ranks;
            row[rank * s + local] = e;
            k += 1;
        }
    }
}

impl Placement {
    /// Builds a placement and checks every invariant (see [`Placement::validate`]).
    pub fn from_phy2log(
        num_logical_experts: usize,
        num_ranks: usize,
        num_nodes: usize,
        phy2log: Vec<Vec<usize>>,
    ) -> Result<Placement> {
        let p = Placement {
            num_layers: phy2log.len(),
            num_logical_experts,
            num_ranks,
            num_nodes,
            phy2log,
        };
        p.validate()?;
        Ok(p)
    }

    /// Invariants: at least one layer; ranks, nodes and experts non-zero; nodes divide ranks;
    /// every layer has the same number of slots, divisible by the ranks; every slot names a
    /// real expert; every expert has at least one replica; no rank holds two replicas of one
    /// expert unless `S > E` forces it.
    pub fn validate(&self) -> Result<()> {
        if self.num_ranks == 0 {
            return perr("the number of ranks must be at least 1".into());
        }
        if self.num_nodes == 0 || !self.num_ranks.is_multiple_of(self.num_nodes) {
            return perr(format!(
                "{} ranks cannot be split evenly over {} nodes",
                self.num_ranks, self.num_nodes
            ));
        }
        if self.num_logical_experts == 0 {
            return perr("the number of logical experts must be at least 1".into());
        }
        if self.phy2log.len() != self.num_layers {
            return perr(format!(
                "phy2log has {} layers but num_layers is {}",
                self.phy2log.len(),
                self.num_layers
            ));
        }
        if self.num_layers == 0 {
            return perr("a placement needs at least one layer".into());
        }
        // Rows of different lengths first: otherwise layer 0's length alone is blamed for not
        // dividing over the ranks.
        let slots = same_slots(&self.phy2log)?;
        if slots == 0 {
            return perr("the layers have no slots: no rank holds an expert".into());
        }
        if !slots.is_multiple_of(self.num_ranks) {
            return perr(format!(
                "{slots} slots per layer cannot be split evenly over {} ranks",
                self.num_ranks
            ));
        }
        if slots < self.num_logical_experts {
            // Name an expert without a replica: with E read as the largest id + 1, a gap in
            // the ids is the likely cause.
            let held: std::collections::BTreeSet<usize> = self.phy2log[0].iter().copied().collect();
            let missing = (0..self.num_logical_experts).find(|e| !held.contains(e));
            return perr(format!(
                "{slots} slots cannot hold {} experts{}",
                self.num_logical_experts,
                missing.map_or(String::new(), |e| format!(
                    " (layer 0 has no replica of expert {e})"
                ))
            ));
        }
        let s = slots / self.num_ranks;
        for (layer, row) in self.phy2log.iter().enumerate() {
            let mut served = vec![false; self.num_logical_experts];
            for (slot, &e) in row.iter().enumerate() {
                match served.get_mut(e) {
                    Some(f) => *f = true,
                    None => {
                        return perr(format!(
                            "layer {layer} slot {slot} holds expert {e}, but there are only {} experts",
                            self.num_logical_experts
                        ));
                    }
                }
            }
            if let Some(missing) = served.iter().position(|f| !f) {
                return perr(format!("layer {layer} has no replica of expert {missing}"));
            }
            if s <= self.num_logical_experts
                && let Some((rank, e)) = find_duplicate(row, s)
            {
                return perr(format!(
                    "layer {layer}: rank {rank} holds two replicas of expert {e}"
                ));
            }
        }
        Ok(())
    }

    /// Checks that the placement fits a shape (experts, slots, ranks).
    pub fn check_shape(&self, shape: &Shape) -> Result<()> {
        if self.num_logical_experts != shape.num_experts
            || self.num_ranks != shape.num_ranks
            || self.num_slots() != shape.slots()
        {
            return Err(EplbError::Mismatch(format!(
                "placement has {} experts, {} slots and {} ranks per layer, expected {} experts, {} slots and {} ranks",
                self.num_logical_experts,
                self.num_slots(),
                self.num_ranks,
                shape.num_experts,
                shape.slots(),
                shape.num_ranks
            )));
        }
        Ok(())
    }

    /// Physical slots per layer.
    pub fn num_slots(&self) -> usize {
        self.phy2log.first().map_or(0, Vec::len)
    }

    /// Slots per rank, `S`.
    pub fn slots_per_rank(&self) -> usize {
        self.num_slots() / self.num_ranks.max(1)
    }

    /// The rank holding physical slot `slot`.
    pub fn rank_of_slot(&self, slot: usize) -> usize {
        slot / self.slots_per_rank().max(1)
    }

    /// The node of a rank (ranks `n*G/N .. (n+1)*G/N` are on node `n`).
    pub fn node_of_rank(&self, rank: usize) -> usize {
        rank / (self.num_ranks / self.num_nodes.max(1)).max(1)
    }

    /// The slots of one rank, as a range of physical slot indices.
    pub fn rank_slots(&self, rank: usize) -> std::ops::Range<usize> {
        let s = self.slots_per_rank();
        rank * s..rank * s + s
    }

    /// `logcnt[layer][expert]`: number of replicas.
    pub fn logcnt(&self) -> Vec<Vec<usize>> {
        self.phy2log
            .iter()
            .map(|row| {
                let mut c = vec![0usize; self.num_logical_experts];
                for &e in row {
                    if let Some(x) = c.get_mut(e) {
                        *x += 1;
                    }
                }
                c
            })
            .collect()
    }

    /// The largest replica count over all layers and experts (the width of `log2phy`).
    pub fn max_replicas(&self) -> usize {
        self.logcnt()
            .iter()
            .flat_map(|r| r.iter().copied())
            .max()
            .unwrap_or(1)
            .max(1)
    }

    /// `log2phy[layer][expert][k]`: slots of the expert's replicas in ascending order, padded
    /// with -1 to [`Placement::max_replicas`].
    pub fn log2phy(&self) -> Vec<Vec<Vec<i64>>> {
        let width = self.max_replicas();
        self.phy2log
            .iter()
            .map(|row| {
                let mut m = vec![Vec::with_capacity(width); self.num_logical_experts];
                for (slot, &e) in row.iter().enumerate() {
                    if let Some(v) = m.get_mut(e) {
                        v.push(slot as i64);
                    }
                }
                for v in &mut m {
                    v.resize(width, -1);
                }
                m
            })
            .collect()
    }

    /// Per-rank expert map: `map[logical] = local slot index on `rank`, or -1`. When the rank
    /// holds an expert twice (only when `S > E`), the first local index is given.
    pub fn expert_map(&self, layer: usize, rank: usize) -> Vec<i64> {
        let mut map = vec![-1i64; self.num_logical_experts];
        if let Some(row) = self.phy2log.get(layer) {
            let s = self.slots_per_rank();
            for (local, slot) in (rank * s..rank * s + s).enumerate() {
                if let Some(&e) = row.get(slot)
                    && let Some(m) = map.get_mut(e)
                    && *m < 0
                {
                    *m = local as i64;
                }
            }
        }
        map
    }

    /// DeepEP low-latency trio: `physical_to_global[slot]` = logical (global) expert id.
    pub fn physical_to_global(&self, layer: usize) -> Vec<i64> {
        self.phy2log
            .get(layer)
            .map(|row| row.iter().map(|&e| e as i64).collect())
            .unwrap_or_default()
    }

    /// DeepEP low-latency trio: `global_to_physical[expert]` = the expert's canonical
    /// (lowest-numbered) physical slot, or -1 if it has none.
    pub fn global_to_physical(&self, layer: usize) -> Vec<i64> {
        let mut m = vec![-1i64; self.num_logical_experts];
        if let Some(row) = self.phy2log.get(layer) {
            for (slot, &e) in row.iter().enumerate() {
                if let Some(x) = m.get_mut(e)
                    && *x < 0
                {
                    *x = slot as i64;
                }
            }
        }
        m
    }

    /// DeepEP low-latency trio: `local_expert_global_ids` of a rank = the logical experts of
    /// its slots, in local order.
    pub fn local_expert_global_ids(&self, layer: usize, rank: usize) -> Vec<i64> {
        let s = self.slots_per_rank();
        self.phy2log
            .get(layer)
            .and_then(|row| row.get(rank * s..rank * s + s))
            .map(|c| c.iter().map(|&e| e as i64).collect())
            .unwrap_or_default()
    }

    /// The wire form the operator commits to its ConfigMap.
    pub fn to_document(&self, generation: u64) -> moe_api::PlacementDocument {
        moe_api::PlacementDocument {
            generation,
            num_layers: self.num_layers,
            num_logical_experts: self.num_logical_experts,
            num_ranks: self.num_ranks,
            num_nodes: self.num_nodes,
            phy2log: self
                .phy2log
                .iter()
                .map(|r| r.iter().map(|&e| e as u32).collect())
                .collect(),
        }
    }

    /// Reads the wire form back, validating every invariant.
    pub fn from_document(doc: &moe_api::PlacementDocument) -> Result<Placement> {
        if doc.phy2log.len() != doc.num_layers {
            return perr(format!(
                "phy2log has {} layers but numLayers is {}",
                doc.phy2log.len(),
                doc.num_layers
            ));
        }
        Placement::from_phy2log(
            doc.num_logical_experts,
            doc.num_ranks,
            doc.num_nodes,
            doc.phy2log
                .iter()
                .map(|r| r.iter().map(|&e| e as usize).collect())
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ranks of up to 32 slots are scanned, longer ones checked with a set: both answer as the
    /// scan of every earlier slot does (the first rank with a repeat, its first repeated slot).
    #[test]
    fn find_duplicate_answers_alike_for_short_and_long_ranks() {
        let reference = |row: &[usize], s: usize| {
            row.chunks(s).enumerate().find_map(|(rank, c)| {
                (0..c.len())
                    .find(|&i| c[..i].contains(&c[i]))
                    .map(|i| (rank, c[i]))
            })
        };
        let mut x = 12345u64;
        for case in 0..2000 {
            let s = [3, 8, 32, 33, 40, 100][case % 6];
            let ranks = 1 + case % 3;
            let ids = s + case % 5; // few spare ids: repeats are common but not certain
            let row: Vec<usize> = (0..s * ranks)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % ids as u64) as usize
                })
                .collect();
            assert_eq!(find_duplicate(&row, s), reference(&row, s), "{row:?}");
            let distinct: Vec<usize> = (0..s * ranks).map(|i| i % s).collect();
            assert_eq!(find_duplicate(&distinct, s), None);
        }
    }

    fn sample() -> Placement {
        // 3 experts, 1 redundant, 2 ranks: rank 0 = [0, 1], rank 1 = [2, 0].
        Placement::from_phy2log(3, 2, 1, vec![vec![0, 1, 2, 0]]).unwrap()
    }

    #[test]
    fn derived_maps() {
        let p = sample();
        assert_eq!(p.logcnt(), vec![vec![2, 1, 1]]);
        assert_eq!(
            p.log2phy(),
            vec![vec![vec![0, 3], vec![1, -1], vec![2, -1]]]
        );
        assert_eq!(p.expert_map(0, 0), vec![0, 1, -1]);
        assert_eq!(p.expert_map(0, 1), vec![1, -1, 0]);
        assert_eq!(p.global_to_physical(0), vec![0, 1, 2]);
        assert_eq!(p.physical_to_global(0), vec![0, 1, 2, 0]);
        assert_eq!(p.local_expert_global_ids(0, 1), vec![2, 0]);
        assert_eq!(p.rank_of_slot(3), 1);
    }

    #[test]
    fn validation_errors_name_the_problem() {
        let e = Placement::from_phy2log(3, 2, 1, vec![vec![0, 1, 1, 0]]).unwrap_err();
        assert!(e.to_string().contains("expert 2"), "{e}");
        let e = Placement::from_phy2log(3, 2, 1, vec![vec![0, 0, 1, 2]]).unwrap_err();
        assert!(e.to_string().contains("two replicas of expert 0"), "{e}");
        let e = Placement::from_phy2log(3, 2, 1, vec![vec![0, 1, 2, 9]]).unwrap_err();
        assert!(e.to_string().contains("expert 9"), "{e}");
        assert!(Placement::from_phy2log(3, 2, 1, vec![vec![0, 1, 2]]).is_err());
        assert!(Placement::from_phy2log(3, 0, 1, vec![vec![0, 1, 2, 0]]).is_err());
        // S > E: duplicates allowed.
        assert!(Placement::from_phy2log(1, 1, 1, vec![vec![0, 0]]).is_ok());
    }

    #[test]
    fn document_and_ascend_round_trip() {
        let p = sample();
        let doc = p.to_document(7);
        assert_eq!(doc.generation, 7);
        assert_eq!(doc.validate(), Ok(()));
        assert_eq!(Placement::from_document(&doc).unwrap(), p);
        let m = p.to_ascend_expert_map();
        assert_eq!(
            m["layer_list"][0]["device_list"][1]["device_expert"],
            json!([2, 0])
        );
        assert_eq!(Placement::from_ascend_expert_map(&m, None, 1).unwrap(), p);
        let text = serde_json::to_string(&m).unwrap();
        assert_eq!(Placement::from_json_str(&text).unwrap(), p);
        let text = serde_json::to_string(&doc).unwrap();
        assert_eq!(Placement::from_json_str(&text).unwrap(), p);
        let text = serde_json::to_string(&p).unwrap();
        assert_eq!(Placement::from_json_str(&text).unwrap(), p);
    }

    #[test]
    fn ascend_import_rejects_ragged_devices() {
        let m = json!({"moe_layer_count": 1, "layer_list": [{"layer_id": 0, "device_count": 2,
            "device_list": [{"device_id": 0, "device_expert": [0, 1]},
                            {"device_id": 1, "device_expert": [2]}]}]});
        assert!(Placement::from_ascend_expert_map(&m, None, 1).is_err());
    }

    #[test]
    fn repair_removes_duplicates() {
        let mut row = vec![0, 0, 1, 2, 3, 1];
        repair_duplicates(&mut row, 4, 3);
        assert!(find_duplicate(&row, 2).is_none());
        let mut sorted = row.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 0, 1, 1, 2, 3]);
    }
}
