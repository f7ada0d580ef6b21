//! SGLang's EPLB files (`python/sglang/srt/eplb/`).
//!
//! * `--init-expert-location FILE.json` with `{"physical_to_logical_map": [L][P]}`:
//!   `compute_initial_expert_location_metadata` (`expert_location.py`) passes the dict as
//!   keyword arguments to `ExpertLocationMetadata.init_by_mapping`, so that key must be the
//!   only one. L is `ModelConfigForExpertLocation.num_layers` = the model's
//!   `num_hidden_layers`: every decoder layer, dense ones included (`deepseek_v2.py`,
//!   `qwen3_moe.py`, ...). Dense layers' rows are never used for routing but must hold valid
//!   expert ids; [`write_placement`] gives them SGLang's trivial layout (`init_trivial`: slot
//!   k holds expert k mod E).
//! * The same option with `{"logical_count": [L][E] or [N][L][E]}` (JSON or `.pt`): SGLang
//!   plans with `rebalance_experts`, which sums the N passes (`eplb_algorithms/__init__.py`:
//!   `tokens_per_expert.sum(dim=0)`).
//! * The expert-distribution recorder dump (`/dump_expert_distribution_record`, `stat` mode):
//!   `torch.save(dict(rank, logical_count=int32 [buffer][L][E],
//!   average_utilization_rate_over_window))` from `_StatAccumulator.dump`
//!   (`expert_distribution.py`). The buffer is a `_CircularBuffer` saved as is: rows not yet
//!   written are zero and, once wrapped, rows are not in time order.
//!
//! Reading a load from either: zero passes (unwritten ring rows) are dropped and the rest
//! summed into one window, as SGLang's planner does (the ring's row order is not time order,
//! so passes cannot serve as ordered windows). Layers are decoder layers: with a
//! [`DecoderLayout`] the MoE rows are kept; without one, layers with no token in any pass are
//! taken as dense and dropped, and the layout found is returned.

use serde_json::{Value, json};

use crate::error::{EplbError, Result};
use crate::formats::LoadFile;
use crate::formats::layout::{DecoderLayout, ranges};
use crate::formats::torch_save::TorchFile;
use crate::load::{LoadHistory, matrix};
use crate::placement::Placement;

/// The `--init-expert-location` placement: `{"physical_to_logical_map": [decoder layers][P]}`.
pub fn write_placement(p: &Placement, layout: &DecoderLayout) -> Result<Value> {
    layout.check_moe_rows(p.num_layers, "the placement")?;
    let e = p.num_logical_experts;
    let trivial: Vec<usize> = (0..p.num_slots()).map(|k| k % e).collect();
    let mut rows = vec![&trivial; layout.num_decoder_layers()];
    for (i, &l) in layout.moe_layers().iter().enumerate() {
        rows[l] = &p.phy2log[i];
    }
    Ok(json!({ "physical_to_logical_map": rows }))
}

/// Reads `{"physical_to_logical_map": [L][P]}` for `num_ranks` ranks (SGLang's file does not
/// say). With a layout, L must be its decoder-layer count and the dense rows are dropped.
/// Returns notes. -1 entries (vLLM's unused slots, same key in vLLM's `EplbState`) are read as
/// [`crate::formats::vllm::read_phy2log`] does.
pub fn read_placement(
    v: &Value,
    num_experts: Option<usize>,
    num_ranks: usize,
    num_nodes: usize,
    layout: Option<&DecoderLayout>,
) -> Result<(Placement, Vec<String>)> {
    let rows = v["physical_to_logical_map"].as_array().ok_or_else(|| {
        EplbError::Placement("physical_to_logical_map must be [layers][slots] of expert ids".into())
    })?;
    let all = rows;
    let rows: Vec<Value> = match layout {
        Some(lay) => {
            lay.check_decoder_rows(all.len(), "physical_to_logical_map")?;
            lay.moe_layers().iter().map(|&l| all[l].clone()).collect()
        }
        None => all.clone(),
    };
    let experts = num_experts.unwrap_or_else(|| {
        rows.iter()
            .filter_map(Value::as_array)
            .flatten()
            .filter_map(Value::as_u64)
            .max()
            .map_or(0, |m| m as usize + 1)
    });
    if let Some(lay) = layout {
        check_dense_rows(all, lay, &rows, experts)?;
    }
    crate::formats::vllm::read_phy2log(&Value::Array(rows), experts, num_ranks, num_nodes)
}

/// The dense decoder layers' rows are not part of the placement, but SGLang loads the map as
/// one `[decoder layers][P]` tensor, indexes every row with the expert ids and builds its
/// static dispatch map from every row: a dense row must have the MoE rows' length, hold ids
/// below E and every expert at least once, as the trivial rows we write do.
fn check_dense_rows(
    all: &[Value],
    layout: &DecoderLayout,
    moe_rows: &[Value],
    experts: usize,
) -> Result<()> {
    let slots = moe_rows.first().and_then(Value::as_array).map(Vec::len);
    for (l, row) in all.iter().enumerate() {
        if layout.moe_layers().contains(&l) {
            continue;
        }
        let bad = |why: String| {
            Err(EplbError::Placement(format!(
                "physical_to_logical_map decoder layer {l} (dense): {why}; SGLang reads every row of the map, dense ones included"
            )))
        };
        let Some(row) = row.as_array() else {
            return bad("not an array of expert ids".into());
        };
        if let Some(s) = slots
            && row.len() != s
        {
            return bad(format!("{} slots, the MoE rows have {s}", row.len()));
        }
        let mut held = vec![false; experts];
        for (k, x) in row.iter().enumerate() {
            match x.as_u64().and_then(|e| held.get_mut(e as usize)) {
                Some(h) => *h = true,
                None => {
                    return bad(format!(
                        "slot {k} holds {x}, not an expert id below {experts}"
                    ));
                }
            }
        }
        if let Some(e) = held.iter().position(|h| !h) {
            return bad(format!("no replica of expert {e}"));
        }
    }
    Ok(())
}

/// `logical_count` passes `[N][L][E]`, flat and row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Passes {
    pub passes: usize,
    pub layers: usize,
    pub experts: usize,
    pub data: Vec<f64>,
}

impl Passes {
    /// Checks the size and every count (finite, non-negative).
    pub fn new(passes: usize, layers: usize, experts: usize, data: Vec<f64>) -> Result<Passes> {
        if layers == 0 || experts == 0 || passes == 0 {
            return Err(EplbError::Load(
                "logical_count is empty (no passes, layers or experts)".into(),
            ));
        }
        if Some(data.len())
            != passes
                .checked_mul(layers)
                .and_then(|x| x.checked_mul(experts))
        {
            return Err(EplbError::Load(format!(
                "logical_count holds {} counts, not {passes} x {layers} x {experts}",
                data.len()
            )));
        }
        if let Some(i) = data.iter().position(|x| !x.is_finite() || *x < 0.0) {
            let (p, l, e) = (i / (layers * experts), i / experts % layers, i % experts);
            return Err(EplbError::Load(format!(
                "logical_count pass {p} layer {l} expert {e}: {} is not a token count",
                data[i]
            )));
        }
        Ok(Passes {
            passes,
            layers,
            experts,
            data,
        })
    }

    fn pass(&self, i: usize) -> &[f64] {
        let n = self.layers * self.experts;
        &self.data[i * n..(i + 1) * n]
    }
}

/// `logical_count` from JSON: `[N][L][E]`, or `[L][E]` as one pass.
pub fn logical_count_passes(v: &Value) -> Result<Passes> {
    let top = v
        .as_array()
        .ok_or_else(|| EplbError::Load("logical_count must be an array".into()))?;
    let three_d = top
        .first()
        .and_then(|r| r.as_array())
        .and_then(|r| r.first())
        .is_some_and(Value::is_array);
    let parse = |m: &Value, what: &str| -> Result<Vec<Vec<f64>>> {
        let rows = matrix(m, what)?;
        Ok(rows)
    };
    let passes: Vec<Vec<Vec<f64>>> = if three_d {
        top.iter()
            .enumerate()
            .map(|(i, m)| parse(m, &format!("logical_count pass {i}")))
            .collect::<Result<_>>()?
    } else {
        vec![parse(v, "logical_count")?]
    };
    let layers = passes[0].len();
    let experts = passes[0].first().map_or(0, Vec::len);
    for (i, p) in passes.iter().enumerate() {
        if p.len() != layers || p.iter().any(|r| r.len() != experts) {
            return Err(EplbError::Load(format!(
                "logical_count pass {i} is not {layers} layers x {experts} experts (ragged array)"
            )));
        }
    }
    let n = passes.len();
    Passes::new(
        n,
        layers,
        experts,
        passes.into_iter().flatten().flatten().collect(),
    )
}

/// Sums the non-zero passes into one window and keeps the MoE layers (see the module docs).
/// `format` names the source.
pub fn load_from_passes(
    passes: Passes,
    layout: Option<&DecoderLayout>,
    format: &'static str,
) -> Result<LoadFile> {
    let mut notes = Vec::new();
    let (total, layers, experts) = (passes.passes, passes.layers, passes.experts);
    let mut sum = vec![0.0; layers * experts];
    let mut recorded = 0;
    for i in 0..total {
        let p = passes.pass(i);
        if p.iter().any(|&x| x != 0.0) {
            recorded += 1;
            for (a, b) in sum.iter_mut().zip(p) {
                *a += b;
            }
        }
    }
    if recorded == 0 {
        return Err(EplbError::Load(format!(
            "logical_count has {} and every count is zero (nothing recorded)",
            super::counted(total, "pass", "passes")
        )));
    }
    if recorded < total {
        notes.push(format!(
            "{} of {total} logical_count passes {} all zero (ring buffer not full): dropped",
            total - recorded,
            if total - recorded == 1 { "is" } else { "are" }
        ));
    }
    // One pass (a plain [L][E] logical_count) is a window as it is: nothing to say.
    if recorded > 1 {
        notes.push(format!(
            "{recorded} SGLang passes summed into one window (the recorder's ring is not in time order)"
        ));
    }
    let sum: Vec<Vec<f64>> = sum.chunks(experts).map(<[f64]>::to_vec).collect();
    let decoder_layers = sum.len();
    let layout = match layout {
        Some(l) => {
            l.check_decoder_rows(decoder_layers, "logical_count")?;
            for d in l.dense_layers() {
                if sum[d].iter().any(|&x| x != 0.0) {
                    return Err(EplbError::Mismatch(format!(
                        "logical_count has tokens in decoder layer {d}, which the layout says is dense"
                    )));
                }
            }
            l.clone()
        }
        None => {
            let moe: Vec<usize> = (0..decoder_layers)
                .filter(|&l| sum[l].iter().any(|&x| x != 0.0))
                .collect();
            let found = DecoderLayout::new(decoder_layers, &moe)?;
            let dense = found.dense_layers();
            if !dense.is_empty() {
                notes.push(format!(
                    "decoder layer{} {} {} no routed tokens: read as dense ({}); pass --first-dense or --moe-layers to say so",
                    if dense.len() == 1 { "" } else { "s" },
                    ranges(&dense),
                    if dense.len() == 1 { "has" } else { "have" },
                    super::counted(found.num_moe_layers(), "MoE layer", "MoE layers")
                ));
            }
            found
        }
    };
    let window: Vec<Vec<f64>> = layout
        .moe_layers()
        .iter()
        .map(|&l| sum[l].clone())
        .collect();
    Ok(LoadFile {
        history: LoadHistory::single(window)?,
        format,
        layout: Some(layout),
        notes,
    })
}

/// Reads the recorder's `torch.save` dump (`{"rank", "logical_count", ...}`).
pub fn read_dump(bytes: &[u8], layout: Option<&DecoderLayout>) -> Result<LoadFile> {
    let file = TorchFile::parse(bytes)?;
    let lc = file.root.get("logical_count").ok_or_else(|| {
        EplbError::Load(
            "torch.save file has no \"logical_count\" (not an SGLang expert-distribution dump in stat mode)"
                .into(),
        )
    })?;
    let t = file.tensor(lc, "logical_count")?;
    let (n, l, e) = match t.shape.as_slice() {
        [n, l, e] => (*n, *l, *e),
        [l, e] => (1, *l, *e),
        other => {
            return Err(EplbError::Load(format!(
                "logical_count has shape {other:?}, expected [buffer][layers][experts]"
            )));
        }
    };
    load_from_passes(
        Passes::new(n, l, e, t.data)?,
        layout,
        "SGLang expert-distribution dump (.pt)",
    )
}

/// A load as SGLang's `logical_count` passes `[W][decoder layers][E]`, one pass per window,
/// dense layers' rows zero (SGLang sums the passes when it plans).
pub fn logical_count(h: &LoadHistory, layout: &DecoderLayout) -> Result<Vec<Vec<Vec<f64>>>> {
    layout.check_moe_rows(h.num_layers(), "the load")?;
    let e = h.num_experts();
    Ok(h.windows()
        .iter()
        .map(|w| {
            let mut rows = vec![vec![0.0; e]; layout.num_decoder_layers()];
            for (i, &l) in layout.moe_layers().iter().enumerate() {
                rows[l] = w[i].clone();
            }
            rows
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARTIAL_PT: &[u8] =
        include_bytes!("../../tests/data/sglang/expert_distribution_partial.pt");
    const PARTIAL_JSON: &str =
        include_str!("../../tests/data/sglang/expert_distribution_partial.json");
    const WRAPPED_PT: &[u8] =
        include_bytes!("../../tests/data/sglang/expert_distribution_wrapped.pt");
    const WRAPPED_JSON: &str =
        include_str!("../../tests/data/sglang/expert_distribution_wrapped.json");

    fn json_load(text: &str, layout: Option<&DecoderLayout>) -> LoadFile {
        let v: Value = serde_json::from_str(text).unwrap();
        load_from_passes(
            logical_count_passes(&v["logical_count"]).unwrap(),
            layout,
            "json",
        )
        .unwrap()
    }

    #[test]
    fn the_torch_dump_reads_like_its_json() {
        for (pt, js) in [(PARTIAL_PT, PARTIAL_JSON), (WRAPPED_PT, WRAPPED_JSON)] {
            let a = read_dump(pt, None).unwrap();
            let b = json_load(js, None);
            assert_eq!(a.history, b.history);
            assert_eq!(a.layout, b.layout);
            // Layer 0 is dense in the generator: found and dropped.
            assert_eq!(a.layout.as_ref().unwrap().dense_layers(), vec![0]);
            assert_eq!(a.history.num_layers(), 3);
            assert_eq!(a.history.num_experts(), 8);
        }
        let a = read_dump(PARTIAL_PT, None).unwrap();
        assert!(a.notes[0].contains("2 of 6"), "{:?}", a.notes);
        // Every pass routed top-2 of its tokens in each MoE layer: equal sums per layer.
        let sums: Vec<f64> = a.history.last().iter().map(|r| r.iter().sum()).collect();
        assert!(sums.iter().all(|&s| s == sums[0] && s > 0.0), "{sums:?}");
    }

    #[test]
    fn the_dump_sums_the_raw_passes() {
        // Independent of the reader: sum the JSON by hand.
        let v: Value = serde_json::from_str(WRAPPED_JSON).unwrap();
        let passes: Vec<Vec<Vec<f64>>> =
            serde_json::from_value(v["logical_count"].clone()).unwrap();
        let mut want = vec![vec![0.0; 8]; 3];
        for p in &passes {
            for l in 1..4 {
                for e in 0..8 {
                    want[l - 1][e] += p[l][e];
                }
            }
        }
        assert_eq!(read_dump(WRAPPED_PT, None).unwrap().history.last(), want);
    }

    #[test]
    fn layouts_are_checked() {
        let wrong = DecoderLayout::first_dense(2, 2).unwrap();
        let v: Value = serde_json::from_str(PARTIAL_JSON).unwrap();
        let passes = logical_count_passes(&v["logical_count"]).unwrap();
        let e = load_from_passes(passes.clone(), Some(&wrong), "json")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("decoder layer 1"), "{e}");
        let right = DecoderLayout::first_dense(1, 3).unwrap();
        assert!(load_from_passes(passes, Some(&right), "json").is_ok());
        assert!(read_dump(b"PK\x03\x04garbage", None).is_err());
        for bad in [
            "[[[1, 2]], [[1]]]",
            "[[1, -2]]",
            "[]",
            "[[]]",
            "[[[0, 0]]]",
            "{}",
        ] {
            let v: Value = serde_json::from_str(bad).unwrap();
            let r = logical_count_passes(&v).and_then(|p| load_from_passes(p, None, "json"));
            assert!(r.is_err(), "{bad}");
        }
    }

    #[test]
    fn placement_round_trip_with_dense_layers() {
        let p = Placement::from_phy2log(
            4,
            2,
            1,
            vec![vec![0, 1, 2, 3, 1, 0], vec![3, 2, 1, 0, 1, 2]],
        )
        .unwrap();
        let layout = DecoderLayout::new(4, &[1, 3]).unwrap();
        let v = write_placement(&p, &layout).unwrap();
        let obj = v.as_object().unwrap();
        assert_eq!(
            obj.keys().collect::<Vec<_>>(),
            vec!["physical_to_logical_map"]
        );
        let rows = v["physical_to_logical_map"].as_array().unwrap();
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[0], json!([0, 1, 2, 3, 0, 1]));
        assert_eq!(rows[3], json!([3, 2, 1, 0, 1, 2]));
        let (back, notes) = read_placement(&v, Some(4), 2, 1, Some(&layout)).unwrap();
        assert_eq!(back, p);
        assert!(notes.is_empty());
        assert!(write_placement(&p, &DecoderLayout::all_moe(3).unwrap()).is_err());
        let h = LoadHistory::single(vec![vec![1.0, 2.0], vec![3.0, 4.0]]).unwrap();
        let lc = logical_count(&h, &layout).unwrap();
        assert_eq!(lc[0][0], vec![0.0, 0.0]);
        assert_eq!(lc[0][3], vec![3.0, 4.0]);
        let back = load_from_passes(
            logical_count_passes(&json!(lc)).unwrap(),
            Some(&layout),
            "json",
        )
        .unwrap();
        assert_eq!(back.history, h);
    }
}
