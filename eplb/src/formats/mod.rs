//! The files other engines and tools read and write, and the decoder-layer layout that links
//! their layer numbering to ours.
//!
//! | format | role | module |
//! |---|---|---|
//! | `[L][E]`, `[W][L][E]`, `{"windows": [W][L][E]}` | loads (this project) | [`crate::load`] |
//! | OpenEvolve EPLB data set `{"load_history": [{"logical_expert_load": [L][E]}]}` | loads | [`crate::load`] |
//! | vLLM `expert_load_window` `[W][L][P]` per slot, `physical_to_logical_map` with -1 | loads, placements | [`vllm`] |
//! | SGLang `{"logical_count"}` JSON and recorder `.pt` dump, `{"physical_to_logical_map"}` | loads, placements | [`sglang`], [`torch_save`] |
//! | vllm-ascend expert map | placements | [`ascend`] |
//!
//! Readers return notes (one line each) for what they had to assume; callers print them.

pub mod ascend;
pub mod layout;
pub mod sglang;
pub mod torch_save;
pub mod vllm;

use serde_json::Value;

pub use layout::DecoderLayout;

use crate::error::{EplbError, Result};
use crate::load::{LoadHistory, matrix, typed_windows};
use crate::placement::Placement;

// The core types' JSON constructors live here, beside the readers they call, so that
// `load` and `placement` stay below the formats (they know nothing of them).
impl LoadHistory {
    /// Parses a load in any JSON format of [`crate::formats`]: `[L][E]`, `[W][L][E]`,
    /// `{"windows": [W][L][E]}` (oldest first), the OpenEvolve EPLB data set's
    /// `{"load_history": [{"logical_expert_load": [L][E]}, ...]}`, or SGLang's
    /// `{"logical_count": ...}` (passes summed, layers without tokens taken as dense and
    /// dropped). Use [`crate::formats::read_load_json`] to get the notes and the layout.
    pub fn from_json_str(text: &str) -> Result<LoadHistory> {
        // Fast path: well-formed input deserialised straight into numbers (no JSON value
        // tree, several times faster on a DeepSeek-V3 history). Anything it does not take,
        // including every malformed input, goes the general way below, whose errors name the
        // window, layer and expert.
        if let Some((windows, _)) = typed_windows(text.as_bytes()) {
            return LoadHistory::new(windows);
        }
        let v: Value = serde_json::from_str(text)
            .map_err(|e| EplbError::Load(format!("not valid JSON: {e}")))?;
        LoadHistory::from_json_value(&v)
    }

    /// See [`LoadHistory::from_json_str`].
    pub fn from_json_value(v: &Value) -> Result<LoadHistory> {
        read_load_json(v, None).map(|f| f.history)
    }
}

impl Placement {
    /// Reads a placement from JSON in any of the forms of
    /// [`crate::formats::read_placement_json`] that need no extra context: the `moectl plan`
    /// output (snake_case, `phy2log`; -1 marks unused ranks as in vLLM), the operator's
    /// [`moe_api::PlacementDocument`] (camelCase), or a vllm-ascend expert map.
    pub fn from_json_str(text: &str) -> Result<Placement> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| EplbError::Placement(format!("not valid JSON: {e}")))?;
        Placement::from_json_value(&v)
    }

    /// See [`Placement::from_json_str`].
    pub fn from_json_value(v: &Value) -> Result<Placement> {
        read_placement_json(v, &PlacementContext::default()).map(|(p, _, _)| p)
    }
}

/// A load read from a file.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadFile {
    /// One row per MoE layer.
    pub history: LoadHistory,
    /// The format found, in words.
    pub format: &'static str,
    /// The decoder-layer layout, when the file numbers decoder layers (SGLang).
    pub layout: Option<DecoderLayout>,
    pub notes: Vec<String>,
}

/// The zip local-file magic: `torch.save` files start with it.
/// `n` and the noun, `one` for 1 and `many` otherwise ("1 layer", "2 layers"), for messages.
pub(crate) fn counted(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

pub fn is_zip(bytes: &[u8]) -> bool {
    bytes.starts_with(b"PK\x03\x04")
}

/// Reads a load from file contents: a `torch.save` dump (SGLang) or any JSON load format.
/// `layout` is used for SGLang's decoder-layer rows.
pub fn read_load_bytes(bytes: &[u8], layout: Option<&DecoderLayout>) -> Result<LoadFile> {
    if is_zip(bytes) {
        return sglang::read_dump(bytes, layout);
    }
    // Fast path for the formats without decoder layers: no JSON value tree (on a DeepSeek-V3
    // history of 8 windows the tree took longer than planning with greedy). Anything else,
    // malformed input included, takes the general path and its precise errors.
    if let Some((windows, format)) = typed_windows(bytes) {
        return Ok(LoadFile {
            history: LoadHistory::new(windows)?,
            format,
            layout: None,
            notes: Vec::new(),
        });
    }
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| EplbError::Load(format!("not valid JSON: {e}")))?;
    read_load_json(&v, layout)
}

const LOAD_FORMATS: &str = "expected [L][E], [W][L][E], {\"windows\": ...}, OpenEvolve's {\"load_history\": ...} or SGLang's {\"logical_count\": ...}";

/// Reads a load from JSON in any format of the table above.
pub fn read_load_json(v: &Value, layout: Option<&DecoderLayout>) -> Result<LoadFile> {
    let plain = |history, format| {
        Ok(LoadFile {
            history,
            format,
            layout: None,
            notes: Vec::new(),
        })
    };
    match v {
        Value::Array(rows) => {
            let three_d = rows
                .first()
                .and_then(Value::as_array)
                .and_then(|r| r.first())
                .is_some_and(Value::is_array);
            if three_d {
                let windows = rows
                    .iter()
                    .enumerate()
                    .map(|(w, m)| matrix(m, &format!("window {w}")))
                    .collect::<Result<Vec<_>>>()?;
                plain(LoadHistory::new(windows)?, "[W][L][E] array")
            } else {
                plain(LoadHistory::new(vec![matrix(v, "load")?])?, "[L][E] array")
            }
        }
        Value::Object(o) => {
            if let Some(ws) = o.get("windows") {
                let arr = ws
                    .as_array()
                    .ok_or_else(|| EplbError::Load("\"windows\" must be an array".into()))?;
                let windows = arr
                    .iter()
                    .enumerate()
                    .map(|(w, m)| matrix(m, &format!("window {w}")))
                    .collect::<Result<Vec<_>>>()?;
                plain(LoadHistory::new(windows)?, "moectl windows")
            } else if let Some(h) = o.get("load_history") {
                plain(openevolve(h)?, "OpenEvolve EPLB data set (load_history)")
            } else if let Some(lc) = o.get("logical_count") {
                sglang::load_from_passes(
                    sglang::logical_count_passes(lc)?,
                    layout,
                    "SGLang logical_count",
                )
            } else {
                Err(EplbError::Load(LOAD_FORMATS.into()))
            }
        }
        _ => Err(EplbError::Load(LOAD_FORMATS.into())),
    }
}

/// The OpenEvolve EPLB data set's `load_history`: one `logical_expert_load` `[L][E]` per
/// record, oldest first (OpenEvolve `examples/eplb`, data `expert-load.json`).
fn openevolve(h: &Value) -> Result<LoadHistory> {
    let arr = h
        .as_array()
        .ok_or_else(|| EplbError::Load("\"load_history\" must be an array".into()))?;
    let windows = arr
        .iter()
        .enumerate()
        .map(|(w, rec)| {
            let m = rec.get("logical_expert_load").ok_or_else(|| {
                EplbError::Load(format!(
                    "load_history[{w}] has no \"logical_expert_load\" (OpenEvolve EPLB data set format)"
                ))
            })?;
            matrix(m, &format!("load_history[{w}]"))
        })
        .collect::<Result<Vec<_>>>()?;
    LoadHistory::new(windows)
}

/// Reads a placement from file contents: JSON in any form of [`read_placement_json`], or
/// SGLang's `--init-expert-location` as a `torch.save` file
/// (`{"physical_to_logical_map": int64 [decoder layers][P]}`).
pub fn read_placement_bytes(
    bytes: &[u8],
    ctx: &PlacementContext,
) -> Result<(Placement, &'static str, Vec<String>)> {
    if !is_zip(bytes) {
        let v: Value = serde_json::from_slice(bytes)
            .map_err(|e| EplbError::Placement(format!("not valid JSON: {e}")))?;
        return read_placement_json(&v, ctx);
    }
    let file = torch_save::TorchFile::parse(bytes)?;
    let map = file.root.get("physical_to_logical_map").ok_or_else(|| {
        EplbError::Placement(
            "the torch.save file has no \"physical_to_logical_map\" (not an SGLang --init-expert-location placement)"
                .into(),
        )
    })?;
    let t = file.tensor(map, "physical_to_logical_map")?;
    let [layers, slots] = t.shape[..] else {
        return Err(EplbError::Placement(format!(
            "physical_to_logical_map has shape {:?}, expected [layers][slots]",
            t.shape
        )));
    };
    let rows: Vec<Value> = (0..layers)
        .map(|l| {
            Value::Array(
                t.data[l * slots..(l + 1) * slots]
                    .iter()
                    .map(|&x| Value::from(x as i64))
                    .collect(),
            )
        })
        .collect();
    let v = serde_json::json!({ "physical_to_logical_map": rows });
    let (p, _, notes) = read_placement_json(&v, ctx)?;
    Ok((p, "SGLang physical_to_logical_map (.pt)", notes))
}

/// The format name [`read_placement_json`] gives a vllm-ascend expert map.
pub const ASCEND_EXPERT_MAP: &str = "vllm-ascend expert map";

/// A placement file's slots as it writes them: what a per-slot load recorded while it served
/// counts, one column per slot.
#[derive(Debug, Clone, PartialEq)]
pub struct WrittenSlots {
    /// Per MoE layer, each slot's expert id; -1 for a slot that holds none (vLLM's masked
    /// ranks).
    pub rows: Vec<Vec<i64>>,
    /// A vllm-ascend map: ids from the routed expert count up are mix_placement shared experts
    /// (one copy per device, checked when the placement was read). Their slots have columns
    /// in vllm-ascend's per-slot load (`moe_load` is `[layers][devices][slots per device]`,
    /// every local slot), counting the shared expert's tokens, which are not routed load.
    pub lists_shared_experts: bool,
}

/// The slots of a placement file as written: -1 included (vLLM's masked ranks), `phy2log` or
/// `physical_to_logical_map` rows (the MoE rows, with a layout), or a vllm-ascend map's devices
/// in order with its mix_placement shared experts. `None` for other formats and for anything
/// the placement reader would refuse (it says why).
pub fn read_slot_map_bytes(bytes: &[u8], layout: Option<&DecoderLayout>) -> Option<WrittenSlots> {
    let v: Value = serde_json::from_slice(bytes).ok()?;
    if v.get("layer_list").is_some() {
        // Read without the routed count, every id is an expert: the slots as listed.
        let read = ascend::read(&v, None, 1).ok()?;
        let rows = read
            .placement
            .phy2log
            .iter()
            .map(|r| r.iter().map(|&e| e as i64).collect())
            .collect();
        return Some(WrittenSlots {
            rows,
            lists_shared_experts: true,
        });
    }
    let rows = match (v.get("phy2log"), v.get("physical_to_logical_map")) {
        (Some(rows), _) => rows.as_array()?.iter().collect::<Vec<_>>(),
        (None, Some(rows)) => {
            let rows = rows.as_array()?;
            match layout {
                Some(l) if l.num_decoder_layers() == rows.len() => {
                    l.moe_layers().iter().map(|&i| &rows[i]).collect()
                }
                _ => return None,
            }
        }
        (None, None) => return None,
    };
    let rows = rows
        .iter()
        .map(|r| r.as_array()?.iter().map(Value::as_i64).collect())
        .collect::<Option<_>>()?;
    Some(WrittenSlots {
        rows,
        lists_shared_experts: false,
    })
}

/// What a placement reader may need besides the file.
#[derive(Debug, Clone, Default)]
pub struct PlacementContext<'a> {
    /// Routed experts E (from the load); otherwise the largest id + 1.
    pub num_experts: Option<usize>,
    /// Ranks, for formats that do not say (SGLang).
    pub num_ranks: Option<usize>,
    /// Nodes (default 1).
    pub num_nodes: Option<usize>,
    /// Decoder-layer layout, for formats with one row per decoder layer (SGLang).
    pub layout: Option<&'a DecoderLayout>,
}

/// Reads a placement from JSON: the `moectl plan` output (`phy2log`, -1 allowed as in vLLM),
/// the operator's placement document, a vllm-ascend expert map or SGLang's
/// `{"physical_to_logical_map"}`. Returns the placement, the format found and notes.
pub fn read_placement_json(
    v: &Value,
    ctx: &PlacementContext,
) -> Result<(Placement, &'static str, Vec<String>)> {
    let nodes = ctx
        .num_nodes
        .or_else(|| {
            v.get("num_nodes")
                .and_then(Value::as_u64)
                .map(|n| n as usize)
        })
        .unwrap_or(1);
    if v.get("layer_list").is_some() {
        let r = ascend::read(v, ctx.num_experts, nodes)?;
        return Ok((r.placement, ASCEND_EXPERT_MAP, r.notes));
    }
    if v.get("physical_to_logical_map").is_some() {
        let ranks = ctx.num_ranks.ok_or_else(|| {
            EplbError::Placement(
                "an SGLang physical_to_logical_map does not say how many ranks it spans: pass --ranks"
                    .into(),
            )
        })?;
        // Its rows are decoder layers; which of them are dense cannot be told from the rows.
        let layout = ctx.layout.ok_or_else(|| {
            EplbError::Placement(
                "an SGLang physical_to_logical_map has one row per decoder layer: pass --first-dense K (0 if every layer is MoE) or --decoder-layers N --moe-layers i,j,.."
                    .into(),
            )
        })?;
        let (p, notes) = sglang::read_placement(v, ctx.num_experts, ranks, nodes, Some(layout))?;
        return Ok((p, "SGLang physical_to_logical_map", notes));
    }
    if v.get("numLogicalExperts").is_some() {
        let doc: moe_api::PlacementDocument = serde_json::from_value(v.clone())
            .map_err(|e| EplbError::Placement(format!("bad placement document: {e}")))?;
        return Ok((
            Placement::from_document(&doc)?,
            "placement document",
            Vec::new(),
        ));
    }
    if let Some(rows) = v.get("phy2log") {
        let field = |k: &str| -> Result<usize> {
            v.get(k)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| EplbError::Placement(format!("missing or bad field {k}")))
        };
        let (p, notes) = vllm::read_phy2log(
            rows,
            field("num_logical_experts")?,
            field("num_ranks")?,
            nodes,
        )?;
        if let Some(l) = v.get("num_layers").and_then(Value::as_u64)
            && l as usize != p.num_layers
        {
            return Err(EplbError::Placement(format!(
                "num_layers is {l} but phy2log has {}",
                counted(p.num_layers, "layer", "layers")
            )));
        }
        return Ok((p, "moectl placement (phy2log)", notes));
    }
    Err(EplbError::Placement(
        "unrecognised placement JSON (expected phy2log, a placement document, a vllm-ascend expert map or SGLang's physical_to_logical_map)"
            .into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_load_format_reads() {
        let f = |t: &str| read_load_json(&serde_json::from_str(t).unwrap(), None);
        assert_eq!(f("[[1, 2], [3, 4]]").unwrap().history.num_windows(), 1);
        let w = f("[[[1, 2]], [[3, 4]]]").unwrap();
        assert_eq!(w.history.num_windows(), 2);
        assert_eq!(w.format, "[W][L][E] array");
        let o = f(r#"{"load_history": [{"logical_expert_load": [[1, 2]]}]}"#).unwrap();
        assert!(o.format.starts_with("OpenEvolve"));
        let s = f(r#"{"logical_count": [[[0, 0], [1, 2]], [[0, 0], [0, 0]], [[0, 0], [3, 1]]]}"#)
            .unwrap();
        assert_eq!(s.history.windows(), &[vec![vec![4.0, 3.0]]]);
        assert_eq!(s.layout.unwrap().dense_layers(), vec![0]);
        let e = f(r#"{"load_history": [{"x": 1}]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("OpenEvolve"), "{e}");
        assert!(
            f(r#"{"x": 1}"#)
                .unwrap_err()
                .to_string()
                .contains("logical_count")
        );
        assert!(read_load_bytes(b"not json", None).is_err());
        // The typed fast path of read_load_bytes reads what the general path reads.
        for t in [
            "[[1, 2], [3, 4]]",
            "[[[1, 2]], [[3, 4]]]",
            r#"{"windows": [[[1, 2]], [[3, 4]]]}"#,
            r#"{"load_history": [{"logical_expert_load": [[1, 2]]}]}"#,
            r#"{"logical_count": [[0, 0], [1, 2]]}"#,
        ] {
            assert_eq!(
                read_load_bytes(t.as_bytes(), None).unwrap(),
                f(t).unwrap(),
                "{t}"
            );
        }
    }

    #[test]
    fn sglang_placement_pt_reads_like_its_json() {
        let pt = include_bytes!("../../tests/data/sglang/init_expert_location.pt");
        let js = include_bytes!("../../tests/data/sglang/init_expert_location.json");
        let layout = DecoderLayout::first_dense(1, 3).unwrap();
        let ctx = PlacementContext {
            num_ranks: Some(4),
            layout: Some(&layout),
            ..Default::default()
        };
        let (a, fa, _) = read_placement_bytes(pt, &ctx).unwrap();
        let (b, _, _) = read_placement_bytes(js, &ctx).unwrap();
        assert_eq!(a, b);
        assert_eq!(fa, "SGLang physical_to_logical_map (.pt)");
        assert_eq!(a.phy2log[0], vec![2, 4, 3, 5, 1, 0, 6, 7, 2, 4, 3, 5]);
        let dump = include_bytes!("../../tests/data/sglang/expert_distribution_partial.pt");
        let e = read_placement_bytes(dump, &ctx).unwrap_err().to_string();
        assert!(e.contains("physical_to_logical_map"), "{e}");
    }

    #[test]
    fn placement_dispatch() {
        let ctx = PlacementContext::default();
        let v: Value =
            serde_json::from_str(r#"{"physical_to_logical_map": [[0, 1, 2, 0]]}"#).unwrap();
        let e = read_placement_json(&v, &ctx).unwrap_err().to_string();
        assert!(e.contains("--ranks"), "{e}");
        let ctx = PlacementContext {
            num_ranks: Some(2),
            ..Default::default()
        };
        let e = read_placement_json(&v, &ctx).unwrap_err().to_string();
        assert!(e.contains("--first-dense"), "{e}");
        let layout = DecoderLayout::all_moe(1).unwrap();
        let ctx = PlacementContext {
            num_ranks: Some(2),
            layout: Some(&layout),
            ..Default::default()
        };
        let (p, f, _) = read_placement_json(&v, &ctx).unwrap();
        assert_eq!(
            (p.num_logical_experts, f),
            (3, "SGLang physical_to_logical_map")
        );
        let v: Value = serde_json::from_str(
            r#"{"num_logical_experts": 3, "num_ranks": 3, "phy2log": [[0, 1, -1, -1, 2, 0]]}"#,
        )
        .unwrap();
        let (p, _, notes) = read_placement_json(&v, &ctx).unwrap();
        assert_eq!(p.num_ranks, 2);
        assert_eq!(notes.len(), 1);
    }
}
