//! `moectl convert`: a placement or a load from one engine's format to another's.

use std::path::Path;

use clap::ValueEnum;
use eplb::formats;
use serde_json::Value;

use crate::inputs::{self, LayoutArgs};
use crate::outputs::{self, Format, LoadFormat};
use crate::{Fail, write_out};

/// Every format `convert` writes.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum ConvertTo {
    /// Placement: moectl's JSON.
    Placement,
    /// Placement: vllm-ascend's expert map.
    AscendExpertMap,
    /// Placement: SGLang's `{"physical_to_logical_map"}`.
    Sglang,
    /// Placement: the operator's placement document.
    Document,
    /// Load: `{"windows": [W][L][E]}`.
    Windows,
    /// Load: the OpenEvolve EPLB data set's `{"load_history": [...]}`.
    Openevolve,
    /// Load: SGLang's `{"logical_count": [W][decoder layers][E]}`.
    SglangLogicalCount,
}

impl ConvertTo {
    fn placement(self) -> Option<Format> {
        match self {
            ConvertTo::Placement => Some(Format::Placement),
            ConvertTo::AscendExpertMap => Some(Format::AscendExpertMap),
            ConvertTo::Sglang => Some(Format::Sglang),
            ConvertTo::Document => Some(Format::Document),
            _ => None,
        }
    }
    fn load(self) -> Option<LoadFormat> {
        match self {
            ConvertTo::Windows => Some(LoadFormat::Windows),
            ConvertTo::Openevolve => Some(LoadFormat::Openevolve),
            ConvertTo::SglangLogicalCount => Some(LoadFormat::SglangLogicalCount),
            _ => None,
        }
    }
}

/// Everything `convert` takes.
pub struct ConvertArgs<'a> {
    pub input: &'a Path,
    pub to: ConvertTo,
    pub output: Option<&'a Path>,
    pub ranks: Option<usize>,
    pub experts: Option<usize>,
    pub nodes: Option<usize>,
    pub layout: &'a LayoutArgs,
    pub physical_load: bool,
    pub placement: Option<&'a Path>,
}

const PLACEMENT_KEYS: [&str; 4] = [
    "layer_list",
    "physical_to_logical_map",
    "numLogicalExperts",
    "phy2log",
];

/// The file is a placement (by its keys): its number of rows when they are SGLang's (one per
/// decoder layer), or None when it is a load.
fn placement_rows(path: &Path) -> Result<Option<Option<usize>>, Fail> {
    let bytes = std::fs::read(path)
        .map_err(|e| Fail(format!("cannot read input {}: {e}", path.display())))?;
    if formats::is_zip(&bytes) {
        // torch.save: SGLang's placement or its recorder dump.
        let f = formats::torch_save::TorchFile::parse(&bytes)
            .map_err(|e| Fail(format!("{}: {e}", path.display())))?;
        return Ok(match f.root.get("physical_to_logical_map") {
            Some(map) => {
                let t = f
                    .tensor(map, "physical_to_logical_map")
                    .map_err(|e| Fail(format!("{}: {e}", path.display())))?;
                Some(t.shape.first().copied())
            }
            None => None,
        });
    }
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| Fail(format!("{}: not valid JSON: {e}", path.display())))?;
    if !PLACEMENT_KEYS.iter().any(|k| v.get(k).is_some()) {
        return Ok(None);
    }
    Ok(Some(
        v.get("physical_to_logical_map")
            .and_then(Value::as_array)
            .map(Vec::len),
    ))
}

/// Converts; what the readers had to assume goes to `notes`, also when a later step fails.
pub fn convert(a: &ConvertArgs, notes: &mut Vec<String>) -> Result<(), Fail> {
    let text = if let Some(sglang_rows) = placement_rows(a.input)? {
        let Some(format) = a.to.placement() else {
            return Err(Fail(format!(
                "{} is a placement: --to must be placement, ascend-expert-map, sglang or document",
                a.input.display()
            )));
        };
        // SGLang's rows are decoder layers: the flags say which are MoE.
        let input_layout = match sglang_rows {
            Some(rows) => a.layout.for_decoder_rows(rows)?,
            None => None,
        };
        // The routed expert count: --experts, else the checkpoint's (vllm-ascend maps need it
        // to tell mix_placement's shared experts from routed ones).
        let experts = match a.experts {
            Some(e) => Some(e),
            None => a.layout.model()?.map(|m| m.num_experts),
        };
        let p = inputs::read_placement(
            a.input,
            experts,
            a.ranks,
            a.nodes,
            input_layout.as_ref(),
            notes,
        )?;
        let layout = match input_layout {
            Some(l) => Some(l),
            None => a.layout.for_moe_rows(p.num_layers)?,
        };
        outputs::write_placement(&p, format, layout.as_ref())?
    } else {
        let Some(format) = a.to.load() else {
            return Err(Fail(format!(
                "{} is a load: --to must be windows, openevolve or sglang-logical-count",
                a.input.display()
            )));
        };
        let mut load = inputs::read_load(a.input, a.layout)?;
        notes.append(&mut load.notes);
        let through = a
            .placement
            .map(|f| inputs::read_placement(f, None, a.ranks, a.nodes, load.layout.as_ref(), notes))
            .transpose()?;
        if a.physical_load || through.is_some() {
            inputs::settle_physical(
                &mut load,
                a.physical_load,
                through.as_ref(),
                a.placement,
                "--placement",
            )?;
        }
        notes.append(&mut load.notes);
        outputs::write_load(&load.history, format, load.layout.as_ref())?
    };
    write_out(a.output, text.as_bytes())?;
    Ok(())
}
