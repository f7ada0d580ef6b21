//! vLLM's EPLB state (`vllm/distributed/eplb/eplb_state.py`).
//!
//! * `physical_to_logical_map` `[L][P]`: the logical expert of each physical slot. vLLM marks
//!   a slot that holds no expert with -1 (`move_to_buffer` in
//!   `vllm/distributed/eplb/rebalance_execute.py` skips `-1` entries; ranks masked or removed
//!   by elastic EP have all their slots at -1). [`read_phy2log`] reads such maps: ranks whose
//!   slots are all -1 in every layer are dropped (with a note); a -1 inside a rank that holds
//!   experts is refused, since every slot of a moectl placement holds an expert.
//! * `expert_load_window` `[W][L][P]` (and `expert_load_pass` `[L][P]`): token counts per
//!   physical slot, not per expert. [`logical_from_physical`] sums each expert's slots, which
//!   is what vLLM does before planning (`scatter_add_` over `physical_to_logical_map` in
//!   `EplbState.rearrange`). [`check_logical_columns`] catches a per-slot array given as a
//!   per-expert one.

use serde_json::Value;

use crate::error::{EplbError, Result};
use crate::formats::WrittenSlots;
use crate::formats::layout::ranges;
use crate::load::LoadHistory;
use crate::placement::{Placement, same_slots};

fn perr<T>(m: String) -> Result<T> {
    Err(EplbError::Placement(m))
}

/// Reads a `phy2log` array whose entries are expert ids or -1 (unused slot), for `num_ranks`
/// ranks. Returns the placement and notes.
pub fn read_phy2log(
    rows: &Value,
    num_experts: usize,
    num_ranks: usize,
    num_nodes: usize,
) -> Result<(Placement, Vec<String>)> {
    let rows = rows
        .as_array()
        .ok_or_else(|| EplbError::Placement("phy2log must be an array of layers".into()))?;
    let mut parsed: Vec<Vec<i64>> = Vec::with_capacity(rows.len());
    for (l, r) in rows.iter().enumerate() {
        let r = r.as_array().ok_or_else(|| {
            EplbError::Placement(format!("phy2log layer {l} must be an array of expert ids"))
        })?;
        let row = r
            .iter()
            .enumerate()
            .map(|(k, x)| match x.as_i64() {
                Some(e) if e >= -1 => Ok(e),
                _ => perr(format!(
                    "phy2log layer {l} slot {k}: {x} is not an expert id or -1"
                )),
            })
            .collect::<Result<Vec<i64>>>()?;
        parsed.push(row);
    }
    if !parsed.iter().flatten().any(|&e| e < 0) {
        let phy2log = parsed
            .into_iter()
            .map(|r| r.into_iter().map(|e| e as usize).collect())
            .collect();
        return Ok((
            Placement::from_phy2log(num_experts, num_ranks, num_nodes, phy2log)?,
            Vec::new(),
        ));
    }
    let slots = same_slots(&parsed)?;
    if num_ranks == 0 || !slots.is_multiple_of(num_ranks) {
        return perr(format!(
            "{slots} slots per layer cannot be split evenly over {num_ranks} ranks"
        ));
    }
    let s = slots / num_ranks;
    // A rank is unused when every slot of it is -1 in layer 0; it must be so in every layer.
    let unused: Vec<usize> = (0..num_ranks)
        .filter(|&r| parsed[0][r * s..r * s + s].iter().all(|&e| e < 0))
        .collect();
    for (l, row) in parsed.iter().enumerate() {
        if row.len() != slots {
            return perr(format!(
                "layer {l} has {} slots, layer 0 has {slots}",
                row.len()
            ));
        }
        for r in 0..num_ranks {
            let chunk = &row[r * s..r * s + s];
            let empty = chunk.iter().all(|&e| e < 0);
            if empty != unused.contains(&r) || (!empty && chunk.iter().any(|&e| e < 0)) {
                return perr(format!(
                    "layer {l} rank {r} has unused (-1) slots next to used ones or differs from layer 0; only whole ranks can be unused (masked or removed ranks)"
                ));
            }
        }
    }
    let kept = num_ranks - unused.len();
    if kept == 0 {
        return perr("every slot of phy2log is -1 (no rank holds an expert)".into());
    }
    if num_nodes == 0 || !kept.is_multiple_of(num_nodes) {
        return perr(format!(
            "{kept} ranks hold experts, which cannot be split evenly over {num_nodes} nodes"
        ));
    }
    let phy2log: Vec<Vec<usize>> = parsed
        .iter()
        .map(|row| {
            (0..num_ranks)
                .filter(|r| !unused.contains(r))
                .flat_map(|r| row[r * s..r * s + s].iter().map(|&e| e as usize))
                .collect()
        })
        .collect();
    let p = Placement::from_phy2log(num_experts, kept, num_nodes, phy2log)?;
    let note = format!(
        "{} {} {} no expert (-1 in vLLM's physical_to_logical_map): read as a placement over the other {}",
        if unused.len() == 1 { "rank" } else { "ranks" },
        ranges(&unused),
        if unused.len() == 1 { "holds" } else { "hold" },
        super::counted(kept, "rank", "ranks"),
    );
    Ok((p, vec![note]))
}

/// Converts per-slot counts `[W][L][P]` (vLLM's `expert_load_window`) to per-expert counts
/// through the placement that was serving while they were recorded.
pub fn logical_from_physical(
    windows: &[Vec<Vec<f64>>],
    placement: &Placement,
) -> Result<LoadHistory> {
    let p = placement.num_slots();
    let mut out = Vec::with_capacity(windows.len());
    for (w, win) in windows.iter().enumerate() {
        if win.len() != placement.num_layers {
            return Err(EplbError::Mismatch(format!(
                "physical load window {w} has {}, the placement has {}",
                super::counted(win.len(), "layer", "layers"),
                placement.num_layers
            )));
        }
        let mut layers = Vec::with_capacity(win.len());
        for (l, row) in win.iter().enumerate() {
            if row.len() != p {
                return Err(EplbError::Mismatch(format!(
                    "physical load window {w} layer {l} has {} slots, the placement has {p}",
                    row.len()
                )));
            }
            let mut logical = vec![0.0; placement.num_logical_experts];
            for (slot, &x) in row.iter().enumerate() {
                logical[placement.phy2log[l][slot]] += x;
            }
            layers.push(logical);
        }
        out.push(layers);
    }
    LoadHistory::new(out)
}

/// Converts per-slot counts `[W][L][P]` through a placement file's slots as written
/// ([`WrittenSlots`]): vLLM's `physical_to_logical_map` with -1 (the window spans every
/// physical slot, masked ranks' too, whereas the placement read from such a map keeps only the
/// ranks that hold experts), or a vllm-ascend map with mix_placement shared experts (whose
/// slots are counted too, while the placement read from it holds routed experts only). A slot
/// at -1 holds no expert, so tokens counted there mean the counts and the map disagree; the
/// counts of shared-expert slots are left out (they are the shared expert's tokens, not
/// routed load).
pub fn logical_from_slot_map(
    windows: &[Vec<Vec<f64>>],
    written: &WrittenSlots,
    num_experts: usize,
) -> Result<LoadHistory> {
    let map = &written.rows;
    let mut out = Vec::with_capacity(windows.len());
    for (w, win) in windows.iter().enumerate() {
        if win.len() != map.len() {
            return Err(EplbError::Mismatch(format!(
                "physical load window {w} has {}, the placement has {}",
                super::counted(win.len(), "layer", "layers"),
                map.len()
            )));
        }
        let mut layers = Vec::with_capacity(win.len());
        for (l, (row, slots)) in win.iter().zip(map).enumerate() {
            if row.len() != slots.len() {
                return Err(EplbError::Mismatch(format!(
                    "physical load window {w} layer {l} has {} slots, the placement has {}",
                    row.len(),
                    slots.len()
                )));
            }
            let mut logical = vec![0.0; num_experts];
            for (k, (&x, &e)) in row.iter().zip(slots).enumerate() {
                match usize::try_from(e).ok().and_then(|e| logical.get_mut(e)) {
                    Some(acc) => *acc += x,
                    None if e < 0 && x == 0.0 => {}
                    None if e < 0 => {
                        return Err(EplbError::Mismatch(format!(
                            "physical load window {w} layer {l} slot {k}: {x} tokens on a slot that holds no expert (-1 in the placement)"
                        )));
                    }
                    None if written.lists_shared_experts => {}
                    None => {
                        return Err(EplbError::Mismatch(format!(
                            "placement layer {l} slot {k} holds expert {e}, beyond the {num_experts} experts"
                        )));
                    }
                }
            }
            layers.push(logical);
        }
        out.push(layers);
    }
    LoadHistory::new(out)
}

/// Refuses a load whose column count is the placement's slot count P but not its expert count
/// E: that is a per-slot (physical) load such as vLLM's `expert_load_pass`, and reading it as
/// per-expert would attribute slot k's tokens to expert k.
pub fn check_logical_columns(load: &LoadHistory, placement: &Placement) -> Result<()> {
    check_column_count(load.num_experts(), placement, "vLLM's per-slot load")
}

/// [`check_logical_columns`] for a load of `cols` counts per layer; `per_slot` names the
/// per-slot load the message says it looks like (vLLM's, or vllm-ascend's `moe_load` for its
/// expert maps).
pub fn check_column_count(cols: usize, placement: &Placement, per_slot: &str) -> Result<()> {
    let (e, p) = (placement.num_logical_experts, placement.num_slots());
    if cols == p && p != e {
        return Err(EplbError::Mismatch(format!(
            "the load has {cols} counts per layer, as many as the placement's physical slots (it holds {e} experts): it looks like {per_slot}; pass --physical-load to map slots to experts through the placement"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unused_ranks_are_dropped() {
        // 3 ranks x 2 slots, rank 1 masked.
        let v = json!([[0, 1, -1, -1, 2, 0], [2, 1, -1, -1, 0, 1]]);
        let (p, notes) = read_phy2log(&v, 3, 3, 1).unwrap();
        assert_eq!(p.num_ranks, 2);
        assert_eq!(p.phy2log, vec![vec![0, 1, 2, 0], vec![2, 1, 0, 1]]);
        assert!(notes[0].contains("rank 1 holds no expert"), "{notes:?}");
        assert!(notes[0].contains("the other 2 ranks"), "{notes:?}");
        let partial = json!([[0, -1, 1, 2]]);
        assert!(read_phy2log(&partial, 3, 2, 1).is_err());
        let plain = json!([[0, 1, 2, 0]]);
        assert!(read_phy2log(&plain, 3, 2, 1).unwrap().1.is_empty());
        assert!(read_phy2log(&json!([[0, -2, 1, 2]]), 3, 2, 1).is_err());
    }

    #[test]
    fn physical_to_logical_and_detection() {
        let p = Placement::from_phy2log(3, 2, 1, vec![vec![0, 1, 2, 0]]).unwrap();
        let h = logical_from_physical(&[vec![vec![5.0, 1.0, 2.0, 7.0]]], &p).unwrap();
        assert_eq!(h.windows()[0], vec![vec![12.0, 1.0, 2.0]]);
        let phys = LoadHistory::single(vec![vec![5.0, 1.0, 2.0, 7.0]]).unwrap();
        let e = check_logical_columns(&phys, &p).unwrap_err().to_string();
        assert!(e.contains("--physical-load"), "{e}");
        let logical = LoadHistory::single(vec![vec![5.0, 1.0, 2.0]]).unwrap();
        assert!(check_logical_columns(&logical, &p).is_ok());
        assert!(logical_from_physical(&[vec![vec![1.0; 3]]], &p).is_err());
    }

    #[test]
    fn slot_maps_with_masked_ranks() {
        let map = vllm_slots(vec![vec![0, 1, -1, -1, 2, 0]]);
        let h =
            logical_from_slot_map(&[vec![vec![5.0, 1.0, 0.0, 0.0, 2.0, 7.0]]], &map, 3).unwrap();
        assert_eq!(h.windows()[0], vec![vec![12.0, 1.0, 2.0]]);
        let e = logical_from_slot_map(&[vec![vec![5.0, 1.0, 3.0, 0.0, 2.0, 7.0]]], &map, 3)
            .unwrap_err()
            .to_string();
        assert!(e.contains("slot 2"), "{e}");
        assert!(logical_from_slot_map(&[vec![vec![1.0; 5]]], &map, 3).is_err());
        let beyond = vllm_slots(vec![vec![0, 1, 2, 3, 0, 1]]);
        let e = logical_from_slot_map(&[vec![vec![1.0; 6]]], &beyond, 3)
            .unwrap_err()
            .to_string();
        assert!(e.contains("beyond the 3 experts"), "{e}");
    }

    fn vllm_slots(rows: Vec<Vec<i64>>) -> WrittenSlots {
        WrittenSlots {
            rows,
            lists_shared_experts: false,
        }
    }

    /// vllm-ascend's `moe_load` with mix_placement has a column for every local slot, the
    /// shared expert's (id E) among them: those counts are not routed load and are left out.
    #[test]
    fn shared_expert_slots_of_a_vllm_ascend_map_are_left_out() {
        // 3 routed experts, shared expert 3 on both devices (last slot of each).
        let slots = WrittenSlots {
            rows: vec![vec![0, 1, 3, 2, 0, 3]],
            lists_shared_experts: true,
        };
        let h =
            logical_from_slot_map(&[vec![vec![5.0, 1.0, 9.0, 2.0, 7.0, 8.0]]], &slots, 3).unwrap();
        assert_eq!(h.windows()[0], vec![vec![12.0, 1.0, 2.0]]);
    }
}
