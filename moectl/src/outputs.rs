//! Writing placements and loads in the formats other engines read.

use clap::ValueEnum;
use eplb::formats::{self, DecoderLayout};
use eplb::{LoadHistory, Placement};
use serde_json::{Value, json};

use crate::Fail;
use crate::inputs::need_layout;

/// Placement output formats.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Format {
    /// moectl's JSON (`phy2log` and derived maps).
    Placement,
    /// vllm-ascend's expert map (`expert_map_path`).
    AscendExpertMap,
    /// SGLang's `--init-expert-location` file: `{"physical_to_logical_map": [decoder layers][P]}`.
    Sglang,
    /// The operator's placement document (camelCase, generation 0).
    Document,
}

/// Load output formats.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum LoadFormat {
    /// `{"windows": [W][L][E]}`.
    Windows,
    /// The OpenEvolve EPLB data set: `{"load_history": [{"logical_expert_load": [L][E]}]}`.
    Openevolve,
    /// SGLang's `{"logical_count": [W][decoder layers][E]}` (`--init-expert-location` input).
    SglangLogicalCount,
}

/// The placement core every moectl placement file has.
pub fn placement_json(p: &Placement) -> Value {
    json!({
        "num_layers": p.num_layers,
        "num_logical_experts": p.num_logical_experts,
        "num_ranks": p.num_ranks,
        "num_nodes": p.num_nodes,
        "phy2log": p.phy2log,
        "log2phy": p.log2phy(),
        "logcnt": p.logcnt(),
    })
}

/// A placement in a foreign format (everything but `Placement`, whose plan output carries
/// more fields and is built by the caller).
pub fn write_placement(
    p: &Placement,
    format: Format,
    layout: Option<&DecoderLayout>,
) -> Result<String, Fail> {
    let v = match format {
        Format::Placement => placement_json(p),
        Format::AscendExpertMap => {
            return Ok(serde_json::to_string_pretty(&formats::ascend::write(p)?)?);
        }
        Format::Sglang => formats::sglang::write_placement(p, need_layout(layout)?)?,
        Format::Document => serde_json::to_value(p.to_document(0))?,
    };
    Ok(serde_json::to_string(&v)?)
}

/// A count as JSON: an integer when it is one (token counts), else a float.
fn count(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 9.0e15 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

fn matrix(m: &[Vec<f64>]) -> Value {
    Value::Array(
        m.iter()
            .map(|r| Value::Array(r.iter().map(|&x| count(x)).collect()))
            .collect(),
    )
}

/// A load in one of the load formats.
pub fn write_load(
    h: &LoadHistory,
    format: LoadFormat,
    layout: Option<&DecoderLayout>,
) -> Result<String, Fail> {
    let v = match format {
        LoadFormat::Windows => {
            json!({ "windows": h.windows().iter().map(|w| matrix(w)).collect::<Vec<_>>() })
        }
        LoadFormat::Openevolve => json!({
            "load_history": h.windows().iter()
                .map(|w| json!({ "logical_expert_load": matrix(w) }))
                .collect::<Vec<_>>()
        }),
        LoadFormat::SglangLogicalCount => {
            let passes = formats::sglang::logical_count(h, need_layout(layout)?)?;
            json!({ "logical_count": passes.iter().map(|p| matrix(p)).collect::<Vec<_>>() })
        }
    };
    Ok(serde_json::to_string(&v)?)
}
