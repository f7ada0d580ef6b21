//! vllm-ascend's expert map (`--additional-config '{"expert_map_path": ...}'`).
//!
//! `{"moe_layer_count": L, "layer_list": [{"layer_id", "device_count", "device_list":
//! [{"device_id", "device_expert": [ids]}]}]}`. vllm-ascend reads it by list position:
//! `expert_file_to_tensor(path, layer_id)` in `vllm_ascend/eplb/core/eplb_utils.py` takes
//! `data["layer_list"][layer_id]["device_list"]` in list order, where `layer_id` is the MoE
//! layer's instance counter (`AscendFusedMoE.moe_counter`, from 0, in
//! `vllm_ascend/ops/fused_moe/fused_moe.py`), and the rank of a device is its position in
//! `device_list`. The `layer_id`, `device_id` and `device_count` fields are not read
//! (an older `ExpertLoadBalancer` in `vllm_ascend/ops/expert_load_balancer.py` read layer 0's
//! `device_count` as the rank count). This module does the same and notes every field that
//! disagrees with its position.
//!
//! Duplicates: `init_eplb_config` builds each rank's map with
//! `expert_map[local_placement] = arange(n)`, so an expert listed twice on one device keeps
//! only its last slot; [`write`](fn@write) refuses such placements and [`read`] such maps.
//!
//! Shared experts: with `mix_placement`, vllm-ascend appends the shared experts to every
//! token's top-k as ids `E .. E+n-1` (`vllm_ascend/ops/fused_moe/experts_selector.py`) and
//! puts one copy of each on every device. [`read`] with the routed expert count strips them
//! (with a note) when every device holds each of them once, and refuses otherwise;
//! they are never read as extra routed experts. A per-slot load recorded under such a map
//! (`moe_load`, one count per local slot) has columns for the shared slots too:
//! [`super::read_slot_map_bytes`] gives the slots as listed, and
//! [`super::vllm::logical_from_slot_map`] leaves those columns out.

use serde_json::{Value, json};

use crate::error::{EplbError, Result};
use crate::formats::counted;
use crate::placement::{Placement, find_duplicate};

fn perr<T>(m: String) -> Result<T> {
    Err(EplbError::Placement(m))
}

/// A map read from JSON, with what the reader had to assume.
#[derive(Debug, Clone, PartialEq)]
pub struct AscendRead {
    pub placement: Placement,
    /// Shared-expert ids (`E ..`) stripped from every device.
    pub shared_experts: usize,
    /// One line each: fields that disagree with list positions, stripped shared experts.
    pub notes: Vec<String>,
}

fn get_usize(v: &Value, what: &str) -> Result<usize> {
    v.as_u64()
        .map(|x| x as usize)
        .ok_or_else(|| EplbError::Placement(format!("{what} must be a non-negative integer")))
}

/// Reads an expert map by list position (see the module docs). `num_routed_experts`: the
/// model's routed expert count E; ids from E up are read as shared experts (mix_placement).
/// Without it, E is the largest id + 1.
pub fn read(v: &Value, num_routed_experts: Option<usize>, num_nodes: usize) -> Result<AscendRead> {
    let layers = v
        .get("layer_list")
        .and_then(Value::as_array)
        .ok_or_else(|| EplbError::Placement("expert map has no layer_list array".into()))?;
    let mut notes = Vec::new();
    // vllm-ascend indexes layer_list[i] for MoE layer i < moe_layer_count (layer i ==
    // moe_layer_count is the MTP layer, which falls back to the default placement).
    let count = match v.get("moe_layer_count") {
        Some(c) => get_usize(c, "moe_layer_count")?,
        None => {
            notes.push(format!(
                "no moe_layer_count: all {} layers of layer_list read; vllm-ascend requires the key (it reads data[\"moe_layer_count\"]), add it before serving this map",
                layers.len()
            ));
            layers.len()
        }
    };
    if count > layers.len() {
        return perr(format!(
            "moe_layer_count is {count} but layer_list has only {}",
            counted(layers.len(), "layer", "layers")
        ));
    }
    if count < layers.len() {
        notes.push(format!(
            "moe_layer_count is {count}: layer_list entries {count}.. are ignored, as vllm-ascend does"
        ));
    }
    if count == 0 {
        return perr("the expert map has no layers (moe_layer_count 0)".into());
    }
    let mut odd_layer_ids = Vec::new();
    let mut odd_device_ids = 0usize;
    let mut odd_device_counts = 0usize;
    let mut rows: Vec<Vec<Vec<usize>>> = Vec::with_capacity(count);
    for (pos, layer) in layers.iter().take(count).enumerate() {
        if let Some(id) = layer.get("layer_id")
            && id.as_u64() != Some(pos as u64)
        {
            odd_layer_ids.push((pos, id.clone()));
        }
        let devices = layer
            .get("device_list")
            .and_then(Value::as_array)
            .ok_or_else(|| {
                EplbError::Placement(format!("layer_list[{pos}] has no device_list array"))
            })?;
        if devices.is_empty() {
            return perr(format!("layer_list[{pos}] has no devices"));
        }
        if let Some(dc) = layer.get("device_count")
            && dc.as_u64() != Some(devices.len() as u64)
        {
            odd_device_counts += 1;
        }
        let mut per_dev = Vec::with_capacity(devices.len());
        for (dpos, d) in devices.iter().enumerate() {
            if let Some(id) = d.get("device_id")
                && id.as_u64() != Some(dpos as u64)
            {
                odd_device_ids += 1;
            }
            let experts = d
                .get("device_expert")
                .and_then(Value::as_array)
                .ok_or_else(|| {
                    EplbError::Placement(format!(
                        "layer_list[{pos}].device_list[{dpos}] has no device_expert array"
                    ))
                })?
                .iter()
                .map(|e| get_usize(e, &format!("layer_list[{pos}].device_list[{dpos}] expert")))
                .collect::<Result<Vec<usize>>>()?;
            if let Some(first) = per_dev.first().map(Vec::len)
                && first != experts.len()
            {
                return perr(format!(
                    "layer_list[{pos}].device_list[{dpos}] holds {} experts, device 0 holds {first} (every device needs the same count)",
                    experts.len()
                ));
            }
            if let Some((_, e)) = find_duplicate(&experts, experts.len()) {
                return perr(format!(
                    "layer_list[{pos}].device_list[{dpos}] lists expert {e} twice: vllm-ascend keeps only its last slot there (init_eplb_config maps expert ids to slots), so the map does not say what the device serves; list each expert at most once per device"
                ));
            }
            per_dev.push(experts);
        }
        if let Some(prev) = rows.first()
            && prev.len() != per_dev.len()
        {
            return perr(format!(
                "layer_list[{pos}] has {} devices, layer 0 has {}",
                per_dev.len(),
                prev.len()
            ));
        }
        rows.push(per_dev);
    }
    if !odd_layer_ids.is_empty() {
        let (p, id) = &odd_layer_ids[0];
        notes.push(format!(
            "{} of {count} layer_ids differ from their list position (layer_list[{p}] has layer_id {id}; decoder-layer numbers?): read by position, as vllm-ascend does",
            odd_layer_ids.len()
        ));
    }
    if odd_device_ids > 0 {
        notes.push(format!(
            "{} from {} position in device_list: ranks are read by position, as vllm-ascend does",
            counted(odd_device_ids, "device_id differs", "device_ids differ"),
            if odd_device_ids == 1 { "its" } else { "their" }
        ));
    }
    if odd_device_counts > 0 {
        notes.push(format!(
            "{} a device_count that differs from the devices listed: the list is used",
            counted(odd_device_counts, "layer has", "layers have")
        ));
    }
    let max_id = rows.iter().flatten().flatten().copied().max().unwrap_or(0);
    if num_routed_experts.is_none() && rows[0].len() > 1 && once_per_device(&rows, max_id) {
        notes.push(format!(
            "expert {max_id} sits once on every device of every layer, as vllm-ascend mix_placement's shared experts do: read as a routed expert (E = {}); if it is a shared expert, give the routed expert count (--experts E, --model or a load)",
            max_id + 1
        ));
    }
    let experts = num_routed_experts.unwrap_or(max_id + 1);
    let mut shared = 0;
    if max_id >= experts {
        shared = strip_shared(&mut rows, experts)?;
        let ids = id_range(experts, experts + shared - 1);
        notes.push(format!(
            "{ids} (vllm-ascend mix_placement, one copy per device): stripped, as moectl places routed experts only; a map written back has no shared experts",
            ids = if shared == 1 {
                format!("{ids} is a shared expert")
            } else {
                format!("{ids} are shared experts")
            }
        ));
    }
    let num_ranks = rows[0].len();
    let phy2log: Vec<Vec<usize>> = rows.into_iter().map(|r| r.concat()).collect();
    let placement = Placement::from_phy2log(experts, num_ranks, num_nodes, phy2log)?;
    Ok(AscendRead {
        placement,
        shared_experts: shared,
        notes,
    })
}

/// `id a` or `ids a..b` (inclusive), for messages.
fn id_range(first: usize, last: usize) -> String {
    if first == last {
        format!("id {first}")
    } else {
        format!("ids {first}..{last}")
    }
}

/// Every device of every layer holds `id` exactly once.
fn once_per_device(rows: &[Vec<Vec<usize>>], id: usize) -> bool {
    rows.iter()
        .flatten()
        .all(|dev| dev.iter().filter(|&&e| e == id).count() == 1)
}

/// Removes ids `>= experts` when every device holds each of them (once: [`read`] refuses a
/// device listing an id twice); returns how many shared ids there are.
fn strip_shared(rows: &mut [Vec<Vec<usize>>], experts: usize) -> Result<usize> {
    let max_id = rows.iter().flatten().flatten().copied().max().unwrap_or(0);
    let n = max_id + 1 - experts;
    let per_device = rows[0][0].len();
    if n > per_device {
        return perr(format!(
            "expert ids go up to {max_id}, {n} above the {experts} routed experts: more than a device's {per_device} slots can hold as shared experts; check the expert count"
        ));
    }
    for (l, layer) in rows.iter().enumerate() {
        for (d, dev) in layer.iter().enumerate() {
            for id in experts..=max_id {
                let c = dev.iter().filter(|&&e| e == id).count();
                let c0 = layer[0].iter().filter(|&&e| e == id).count();
                if c != c0 || c == 0 {
                    let found = if c == 0 {
                        format!("layer_list[{l}].device_list[{d}] does not hold id {id}")
                    } else {
                        format!(
                            "layer_list[{l}].device_list[{d}] holds id {id} {c} times, device 0 {c0} times"
                        )
                    };
                    return perr(format!(
                        "{} {} the {experts} routed experts but {} on every device ({found}): check the expert count",
                        id_range(experts, max_id),
                        if max_id == experts {
                            "exceeds"
                        } else {
                            "exceed"
                        },
                        if max_id == experts {
                            "is not a shared expert, which sits"
                        } else {
                            "are not shared experts, which sit"
                        },
                    ));
                }
            }
        }
    }
    for layer in rows.iter_mut() {
        for dev in layer.iter_mut() {
            dev.retain(|&e| e < experts);
        }
    }
    Ok(n)
}

/// Writes the expert map vllm-ascend reads: layers and devices in order, `layer_id`,
/// `device_id` = position, `device_count` = ranks. Refuses a placement where a rank holds an
/// expert twice (possible only when slots per rank exceed experts): vllm-ascend would keep the
/// last slot only.
pub fn write(p: &Placement) -> Result<Value> {
    let s = p.slots_per_rank();
    for (l, row) in p.phy2log.iter().enumerate() {
        if let Some((rank, e)) = find_duplicate(row, s) {
            return perr(format!(
                "layer {l}: rank {rank} holds expert {e} twice, which a vllm-ascend expert map cannot express (its reader keeps only the last slot); use fewer slots per rank than experts"
            ));
        }
    }
    Ok(raw(p))
}

/// [`write()`] without the duplicate check (see [`Placement::to_ascend_expert_map`]).
pub(crate) fn raw(p: &Placement) -> Value {
    let s = p.slots_per_rank();
    let layers: Vec<Value> = p
        .phy2log
        .iter()
        .enumerate()
        .map(|(l, row)| {
            let devices: Vec<Value> = (0..p.num_ranks)
                .map(|r| json!({"device_id": r, "device_expert": &row[r * s..r * s + s]}))
                .collect();
            json!({"layer_id": l, "device_count": p.num_ranks, "device_list": devices})
        })
        .collect();
    json!({"moe_layer_count": p.num_layers, "layer_list": layers})
}

impl Placement {
    /// vllm-ascend expert-map JSON: `{"moe_layer_count": L, "layer_list": [{"layer_id": l,
    /// "device_count": G, "device_list": [{"device_id": r, "device_expert": [ids]}]}]}`.
    /// Does not check for a rank holding an expert twice (possible only when slots per rank
    /// exceed experts), which the map cannot express: [`crate::formats::ascend::write`] does.
    pub fn to_ascend_expert_map(&self) -> Value {
        raw(self)
    }

    /// Reads a vllm-ascend expert map by list position, as vllm-ascend does (see
    /// [`crate::formats::ascend`], which also returns the notes). `num_logical_experts`: the
    /// routed expert count; ids from it up are mix_placement shared experts and are stripped.
    /// Without it, the largest id + 1.
    pub fn from_ascend_expert_map(
        v: &Value,
        num_logical_experts: Option<usize>,
        num_nodes: usize,
    ) -> Result<Placement> {
        read(v, num_logical_experts, num_nodes).map(|r| r.placement)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// vllm-ascend's own test map (`tests/ut/eplb/core/a2/expert_map.json`, copied unchanged
    /// into /work/shared/interop and into this crate's tests/data).
    const REAL: &str = include_str!("../../tests/data/vllm-ascend_expert_map.json");

    #[test]
    fn reads_the_real_map_by_position() {
        let v: Value = serde_json::from_str(REAL).unwrap();
        let r = read(&v, Some(8), 1).unwrap();
        assert_eq!(r.placement.num_ranks, 2);
        assert_eq!(
            r.placement.phy2log,
            vec![vec![7, 2, 0, 3, 5, 6, 1, 4, 7, 2]]
        );
        assert!(r.notes.is_empty(), "{:?}", r.notes);
        assert_eq!(write(&r.placement).unwrap(), v);
    }

    #[test]
    fn ids_that_disagree_with_positions_are_noted_not_fatal() {
        let mut v: Value = serde_json::from_str(REAL).unwrap();
        // Decoder-layer numbering (DeepSeek-V3's first MoE layer is decoder layer 3) and a
        // reversed device numbering: vllm-ascend ignores both.
        v["layer_list"][0]["layer_id"] = json!(3);
        v["layer_list"][0]["device_list"][0]["device_id"] = json!(1);
        v["layer_list"][0]["device_list"][1]["device_id"] = json!(0);
        v["layer_list"][0]["device_count"] = json!(4);
        let r = read(&v, None, 1).unwrap();
        assert_eq!(
            r.placement.phy2log,
            vec![vec![7, 2, 0, 3, 5, 6, 1, 4, 7, 2]]
        );
        assert_eq!(r.notes.len(), 4, "{:?}", r.notes);
        assert!(r.notes[0].contains("layer_id 3"), "{:?}", r.notes);
        // Without the routed expert count, expert 7 (on both devices once) could be a
        // mix_placement shared expert: read as routed, with a note naming the way to say so.
        assert!(r.notes[3].contains("expert 7 sits once"), "{:?}", r.notes);
        assert!(read(&v, Some(8), 1).unwrap().notes.len() == 3);
    }

    #[test]
    fn shared_experts_of_mix_placement_are_stripped() {
        // 4 routed experts + shared expert id 4 on both devices.
        let v = json!({"moe_layer_count": 1, "layer_list": [{"layer_id": 0, "device_count": 2,
            "device_list": [{"device_id": 0, "device_expert": [0, 1, 4]},
                            {"device_id": 1, "device_expert": [2, 4, 3]}]}]});
        let r = read(&v, Some(4), 1).unwrap();
        assert_eq!(r.shared_experts, 1);
        assert_eq!(r.placement.num_logical_experts, 4);
        assert_eq!(r.placement.phy2log, vec![vec![0, 1, 2, 3]]);
        assert!(r.notes[0].contains("shared"), "{:?}", r.notes);
        // Only on one device: not a shared expert; refused, never read as a routed one.
        let bad = json!({"layer_list": [{"device_list": [{"device_expert": [0, 4]},
            {"device_expert": [1, 2]}, {"device_expert": [3, 0]}]}]});
        let e = read(&bad, Some(4), 1).unwrap_err().to_string();
        assert!(e.contains("shared expert"), "{e}");
    }

    #[test]
    fn structure_errors() {
        let ragged = json!({"layer_list": [{"device_list": [{"device_expert": [0, 1]},
            {"device_expert": [2]}]}]});
        assert!(read(&ragged, None, 1).is_err());
        let dup = json!({"layer_list": [{"device_list": [{"device_expert": [0, 0]},
            {"device_expert": [1, 2]}]}]});
        let e = read(&dup, None, 1).unwrap_err().to_string();
        assert!(e.contains("device_list[0] lists expert 0 twice"), "{e}");
        let short = json!({"moe_layer_count": 2, "layer_list": [{"device_list": [{"device_expert": [0]}]}]});
        assert!(read(&short, None, 1).is_err());
        let long = json!({"moe_layer_count": 1, "layer_list": [
            {"device_list": [{"device_expert": [0, 1]}]},
            {"device_list": [{"device_expert": [1, 0]}]}]});
        let r = read(&long, None, 1).unwrap();
        assert_eq!(r.placement.num_layers, 1);
        assert_eq!(r.notes.len(), 1);
    }

    /// An expert twice on a device is refused even where a placement may hold it (more slots
    /// per rank than experts), routed or shared: vllm-ascend would serve it from the last slot
    /// only, so no placement read from the map says what the device serves.
    #[test]
    fn read_refuses_a_device_listing_an_expert_twice() {
        let forced = json!({"moe_layer_count": 1, "layer_list": [{"device_list": [
            {"device_expert": [0, 1, 1]}, {"device_expert": [1, 0, 0]}]}]});
        let e = read(&forced, None, 1).unwrap_err().to_string();
        assert!(e.contains("device_list[0] lists expert 1 twice"), "{e}");
        let shared_twice = json!({"moe_layer_count": 1, "layer_list": [{"device_list": [
            {"device_expert": [0, 1, 4, 4]}, {"device_expert": [2, 3, 4, 4]}]}]});
        let e = read(&shared_twice, Some(4), 1).unwrap_err().to_string();
        assert!(e.contains("lists expert 4 twice"), "{e}");
    }

    /// vllm-ascend reads `moe_layer_count` unconditionally: a map without it is read (every
    /// layer) with a note saying the engine needs the key.
    #[test]
    fn a_map_without_moe_layer_count_is_read_with_a_note() {
        let v = json!({"layer_list": [{"device_list": [{"device_expert": [0, 1]},
            {"device_expert": [1, 0]}]}]});
        let r = read(&v, None, 1).unwrap();
        assert_eq!(r.placement.num_layers, 1);
        assert!(
            r.notes.iter().any(|n| n.contains("no moe_layer_count")),
            "{:?}",
            r.notes
        );
        assert!(
            write(&r.placement)
                .unwrap()
                .get("moe_layer_count")
                .is_some()
        );
    }

    #[test]
    fn write_refuses_a_rank_holding_an_expert_twice() {
        // S = 2 > E = 1: the placement is valid (forced), the map cannot express it.
        let p = Placement::from_phy2log(1, 1, 1, vec![vec![0, 0]]).unwrap();
        let e = write(&p).unwrap_err().to_string();
        assert!(e.contains("twice"), "{e}");
    }
}
