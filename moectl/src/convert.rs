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
    let bytes = inputs::read_bytes(path, "input")?;
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
    if let Some(out) = a.output {
        crate::outfile::check_output(
            out,
            "--output",
            &[Some(a.input), a.placement, a.layout.model.as_deref()],
        )?;
    }
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
        if a.physical_load || a.placement.is_some() {
            return Err(Fail(format!(
                "{} is a placement: --physical-load and --placement are for converting a per-slot load",
                a.input.display()
            )));
        }
        // The routed expert count: --experts, else the checkpoint's (vllm-ascend maps need it
        // to tell mix_placement's shared experts from routed ones).
        let model_experts = a
            .layout
            .model()?
            .map(|m| inputs::Experts::Model(m.num_experts));
        let flags = inputs::Stated {
            ranks: a.ranks,
            nodes: a.nodes,
            experts: a.experts,
        };
        let p = inputs::read_user_placement(
            a.input,
            model_experts,
            &flags,
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
            // A placement format was asked for but the file has no placement key: say what it
            // is, a load, or what was expected when it is neither.
            return Err(match inputs::read_load(a.input, a.layout) {
                Ok(_) => Fail(format!(
                    "{} is a load: --to must be windows, openevolve or sglang-logical-count",
                    a.input.display()
                )),
                Err(Fail(why)) => Fail(format!(
                    "{} is not a placement (it has none of the keys {}) nor a load ({why})",
                    a.input.display(),
                    PLACEMENT_KEYS.join(", ")
                )),
            });
        };
        let mut load = inputs::read_load(a.input, a.layout)?;
        notes.append(&mut load.notes);
        // --placement serves only to map a per-slot load; --ranks, --nodes and --experts only
        // to read that placement. Anything else would be silently ignored.
        if a.placement.is_some() != a.physical_load {
            return Err(Fail(
                "--physical-load and --placement go together: the per-slot load is mapped to experts through the placement whose slots it counts"
                    .into(),
            ));
        }
        if a.placement.is_none() {
            for (flag, given) in [
                ("--ranks", a.ranks.is_some()),
                ("--nodes", a.nodes.is_some()),
                ("--experts", a.experts.is_some()),
            ] {
                if given {
                    return Err(Fail(format!(
                        "{} is a load: {flag} is for placements (or the --placement of a per-slot load)",
                        a.input.display()
                    )));
                }
            }
        }
        let flags = inputs::Stated {
            ranks: a.ranks,
            nodes: a.nodes,
            experts: a.experts,
        };
        let through = a
            .placement
            .map(|f| inputs::read_user_placement(f, None, &flags, load.layout.as_ref(), notes))
            .transpose()?;
        if let Some(p) = &through {
            inputs::settle_physical(&mut load, true, Some(p), a.placement, "--placement")?;
        }
        notes.append(&mut load.notes);
        outputs::write_load(&load.history, format, load.layout.as_ref())?
    };
    write_out(a.output, text.as_bytes())?;
    Ok(())
}
