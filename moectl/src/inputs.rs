//! Reading the files `moectl` takes: loads and placements in every format of
//! `eplb::formats`, and the decoder-layer layout flags that SGLang's files need.
//!
//! Readers collect notes (what a file made us assume); `main` prints them to stderr, before
//! the error line when the command fails (a note often explains the error).

use std::path::{Path, PathBuf};

use clap::Args;
use eplb::formats::{self, DecoderLayout, PlacementContext};
use eplb::{LoadHistory, Placement};
use moe_model::ModelDescription;

use crate::Fail;

/// Which decoder layers are MoE layers. SGLang's files have one row per decoder layer; loads
/// read from them carry the layout (layers without tokens are dense), other inputs need these
/// flags when SGLang output is asked for.
#[derive(Args, Debug, Clone, Default)]
pub struct LayoutArgs {
    /// A checkpoint directory or its config.json: the decoder layers, which of them are MoE
    /// and the routed experts come from it (a load of another shape is refused).
    #[arg(long, conflicts_with_all = ["decoder_layers", "first_dense", "moe_layers"])]
    pub model: Option<PathBuf>,
    /// Decoder layers of the model, dense and MoE (default: the MoE layers plus --first-dense).
    #[arg(long)]
    pub decoder_layers: Option<usize>,
    /// The first K decoder layers are dense, the rest MoE (DeepSeek-V3: 3; 0 when every layer
    /// is MoE).
    #[arg(long, conflicts_with = "moe_layers")]
    pub first_dense: Option<usize>,
    /// Decoder-layer numbers of the MoE layers, comma separated (with --decoder-layers).
    #[arg(long, value_delimiter = ',', requires = "decoder_layers")]
    pub moe_layers: Option<Vec<usize>>,
}

impl LayoutArgs {
    fn given(&self) -> bool {
        self.model.is_some()
            || self.decoder_layers.is_some()
            || self.first_dense.is_some()
            || self.moe_layers.is_some()
    }

    /// The description of `--model`, when given.
    pub fn model(&self) -> Result<Option<ModelDescription>, Fail> {
        self.model
            .as_deref()
            .map(|p| ModelDescription::from_path(p).map_err(|e| Fail(format!("--model: {e}"))))
            .transpose()
    }

    /// Refuses a load whose shape is not the checkpoint's (`--model`).
    pub fn check_load_shape(&self, history: &LoadHistory) -> Result<(), Fail> {
        let Some(d) = self.model()? else {
            return Ok(());
        };
        let path = self.model.as_deref().unwrap_or(Path::new("")).display();
        if history.num_layers() != d.num_moe_layers() {
            return Err(Fail(format!(
                "the load has {} but the checkpoint {path} has {} (decoder layers {:?})",
                count(history.num_layers(), "MoE layer"),
                d.num_moe_layers(),
                d.moe_layers
            )));
        }
        if history.num_experts() != d.num_experts {
            return Err(Fail(format!(
                "the load has {} experts per layer but the checkpoint {path} has {} routed experts",
                history.num_experts(),
                d.num_experts
            )));
        }
        Ok(())
    }

    /// The layout for a file with `rows` rows, one per decoder layer.
    pub fn for_decoder_rows(&self, rows: usize) -> Result<Option<DecoderLayout>, Fail> {
        if !self.given() {
            return Ok(None);
        }
        if let Some(d) = self.model()? {
            if d.num_hidden_layers != rows {
                return Err(Fail(format!(
                    "--model has {} but the SGLang file has {rows}",
                    count(d.num_hidden_layers, "decoder layer")
                )));
            }
            return Ok(Some(model_layout(&d)?));
        }
        if let Some(n) = self.decoder_layers
            && n != rows
        {
            return Err(Fail(format!(
                "--decoder-layers is {n} but the SGLang file has {}",
                count(rows, "layer")
            )));
        }
        self.build(rows).map(Some)
    }

    /// The layout for data with `moe_rows` MoE layers.
    pub fn for_moe_rows(&self, moe_rows: usize) -> Result<Option<DecoderLayout>, Fail> {
        if !self.given() {
            return Ok(None);
        }
        if let Some(d) = self.model()? {
            let layout = model_layout(&d)?;
            layout
                .check_moe_rows(moe_rows, "the input")
                .map_err(|e| Fail(format!("{e} (the checkpoint of --model)")))?;
            return Ok(Some(layout));
        }
        let n = match (self.decoder_layers, self.first_dense) {
            (Some(n), _) => n,
            // Checked: a huge K must not wrap round to a small layer count.
            (None, Some(k)) => k.checked_add(moe_rows).ok_or_else(|| {
                Fail(format!(
                    "--first-dense {k} plus the input's MoE layers ({moe_rows}) is more decoder layers than any model has"
                ))
            })?,
            (None, None) => unreachable!("--moe-layers requires --decoder-layers"),
        };
        let layout = self.build(n)?;
        layout
            .check_moe_rows(moe_rows, "the input")
            .map_err(|e| Fail(format!("{e} (check --first-dense/--moe-layers)")))?;
        Ok(Some(layout))
    }

    fn build(&self, n: usize) -> Result<DecoderLayout, Fail> {
        let r = if let Some(list) = &self.moe_layers {
            DecoderLayout::new(n, list)
        } else if let Some(k) = self.first_dense {
            if k >= n {
                return Err(Fail(format!(
                    "--first-dense {k} leaves no MoE layer of {}",
                    count(n, "decoder layer")
                )));
            }
            DecoderLayout::first_dense(k, n - k)
        } else {
            return Err(Fail(
                "--decoder-layers needs --first-dense K or --moe-layers i,j,.. to say which layers are MoE"
                    .into(),
            ));
        };
        r.map_err(|e| Fail(format!("layout flags: {e}")))
    }
}

/// The decoder-layer layout of a checkpoint.
fn model_layout(d: &ModelDescription) -> Result<DecoderLayout, Fail> {
    DecoderLayout::new(d.num_hidden_layers, &d.moe_layers)
        .map_err(|e| Fail(format!("--model: {e}")))
}

/// A load as read: MoE-layer rows, the layout when known, notes.
pub struct LoadInput {
    pub history: LoadHistory,
    pub layout: Option<DecoderLayout>,
    pub notes: Vec<String>,
}

/// Reads an input file: a torch.save zip as is, JSON without a UTF-8 byte-order mark (which
/// editors may write and serde_json reports as "expected value at line 1 column 1") and only
/// when it is UTF-8 text (otherwise serde_json names a column, not the cause).
pub(crate) fn read_bytes(path: &Path, what: &str) -> Result<Vec<u8>, Fail> {
    let mut bytes = std::fs::read(path)
        .map_err(|e| Fail(format!("cannot read {what} {}: {e}", path.display())))?;
    if formats::is_zip(&bytes) {
        return Ok(bytes);
    }
    if bytes.starts_with(b"\xef\xbb\xbf") {
        bytes.drain(..3);
    }
    if let Err(e) = std::str::from_utf8(&bytes) {
        return Err(Fail(format!(
            "{}: not UTF-8 text (byte 0x{:02x} at offset {}); JSON files must be UTF-8",
            path.display(),
            bytes[e.valid_up_to()],
            e.valid_up_to()
        )));
    }
    Ok(bytes)
}

fn at(path: &Path) -> impl Fn(eplb::EplbError) -> Fail + '_ {
    move |e| Fail(format!("{}: {e}", path.display()))
}

/// Reads `--load` in any format (JSON or SGLang's `.pt` dump) and settles the layout: the
/// flags win; a file with decoder-layer rows gives one otherwise.
pub fn read_load(path: &Path, layout: &LayoutArgs) -> Result<LoadInput, Fail> {
    let bytes = read_bytes(path, "load")?;
    let mut file = formats::read_load_bytes(&bytes, None).map_err(at(path))?;
    let mut notes = std::mem::take(&mut file.notes);
    if let Some(found) = &file.layout {
        if let Some(wanted) = layout.for_decoder_rows(found.num_decoder_layers())? {
            if &wanted != found {
                file = formats::read_load_bytes(&bytes, Some(&wanted)).map_err(at(path))?;
                notes = std::mem::take(&mut file.notes);
            }
            // The flags said it: the note about guessed dense layers is noise.
            notes.retain(|n| !n.contains("no routed tokens"));
        }
        return Ok(LoadInput {
            history: file.history,
            layout: file.layout,
            notes: prefix(path, notes),
        });
    }
    let layout = layout.for_moe_rows(file.history.num_layers())?;
    Ok(LoadInput {
        history: file.history,
        layout,
        notes: prefix(path, notes),
    })
}

/// `n` and the noun, singular for 1 ("1 layer", "2 layers").
pub fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

fn prefix(path: &Path, notes: Vec<String>) -> Vec<String> {
    notes
        .into_iter()
        .map(|n| format!("{}: {n}", path.display()))
        .collect()
}

/// The `--ranks`, `--nodes` and `--experts` a user gave for a placement file. They fill in what
/// a format does not say (SGLang's map says neither ranks nor nodes; vllm-ascend's map says
/// no nodes and counts shared experts among its ids); a flag that contradicts what the file
/// says is an error naming both, not silently dropped or silently obeyed.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stated {
    pub ranks: Option<usize>,
    pub nodes: Option<usize>,
    pub experts: Option<usize>,
}

impl Stated {
    /// Refuses a flag that contradicts the placement read from `path` (`bytes`: the file).
    pub fn check(&self, path: &Path, bytes: &[u8], p: &Placement) -> Result<(), Fail> {
        let own = FileSays::of(bytes, p);
        let clash = |flag: &str, given: usize, what: &str, says: usize| {
            Fail(format!(
                "{flag} {given} contradicts {}, which has {}: drop {flag} (it is for formats that do not say)",
                path.display(),
                count(says, what)
            ))
        };
        if let (Some(g), Some(s)) = (self.ranks, own.ranks)
            && g != s
        {
            return Err(clash("--ranks", g, "rank", s));
        }
        if let (Some(g), Some(s)) = (self.nodes, own.nodes)
            && g != s
        {
            return Err(clash("--nodes", g, "node", s));
        }
        if let Some(e) = self.experts
            && e != p.num_logical_experts
        {
            return Err(Fail(format!(
                "--experts {e} contradicts {}, which holds {} routed experts",
                path.display(),
                p.num_logical_experts
            )));
        }
        Ok(())
    }
}

/// The ranks and nodes a placement file states itself (None where its format does not).
struct FileSays {
    ranks: Option<usize>,
    nodes: Option<usize>,
}

impl FileSays {
    fn of(bytes: &[u8], p: &Placement) -> FileSays {
        let none = FileSays {
            ranks: None,
            nodes: None,
        };
        // torch.save: SGLang's map, which says neither.
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(bytes) else {
            return none;
        };
        let num = |k: &str| {
            v.get(k)
                .and_then(serde_json::Value::as_u64)
                .map(|n| n as usize)
        };
        // In the order the placement reader tells formats apart (a document has phy2log too).
        if v.get("layer_list").is_some() {
            // vllm-ascend's map: one entry per device, no nodes.
            FileSays {
                ranks: Some(p.num_ranks),
                nodes: None,
            }
        } else if v.get("physical_to_logical_map").is_some() {
            none
        } else if v.get("numLogicalExperts").is_some() {
            FileSays {
                ranks: num("numRanks"),
                nodes: num("numNodes"),
            }
        } else if v.get("phy2log").is_some() {
            // moectl's JSON; vLLM's masked ranks are counted in num_ranks.
            FileSays {
                ranks: num("num_ranks"),
                nodes: num("num_nodes"),
            }
        } else {
            none
        }
    }
}

/// The routed expert count E a placement is read with, and where it came from: messages about
/// a mismatch name the source (there may be no load at all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Experts {
    /// The columns of a per-expert load.
    Load(usize),
    /// `--experts`.
    Flag(usize),
    /// The checkpoint of `--model`.
    Model(usize),
}

impl Experts {
    pub fn count(self) -> usize {
        match self {
            Experts::Load(e) | Experts::Flag(e) | Experts::Model(e) => e,
        }
    }

    /// "the load has 8 experts per layer", "--experts is 8", ...
    fn says(self) -> String {
        match self {
            Experts::Load(e) => format!("the load has {} per layer", count(e, "expert")),
            Experts::Flag(e) => format!("--experts is {e}"),
            Experts::Model(e) => {
                format!(
                    "the checkpoint of --model has {}",
                    count(e, "routed expert")
                )
            }
        }
    }

    /// What to do about a mismatch.
    fn advice(self) -> &'static str {
        match self {
            Experts::Load(_) => "use a load and a placement of the same model",
            Experts::Flag(_) => "give the placement's routed expert count to --experts",
            Experts::Model(_) => "use a checkpoint and a placement of the same model",
        }
    }
}

/// A `--previous` placement, and the nodes its file states (`None` for formats that do not:
/// its `num_nodes` is then `--nodes` or 1, which must not override a recording's own).
pub struct Previous {
    pub placement: Placement,
    pub stated_nodes: Option<usize>,
}

/// Reads `--previous` for `plan` and `backtest` in any format, with `ranks` for formats that
/// do not say them. `nodes` (`--nodes`) fills in for formats that do not say theirs; where the
/// file says another count it is refused: re-planning a 4-node placement for 1 node would
/// drop its cross-node figures without a word.
fn read_previous(
    path: &Path,
    experts: Option<Experts>,
    ranks: usize,
    nodes: Option<usize>,
    layout: Option<&DecoderLayout>,
    notes: &mut Vec<String>,
) -> Result<Previous, Fail> {
    let bytes = read_bytes(path, "placement")?;
    let p = read_placement_from(path, &bytes, experts, Some(ranks), nodes, layout, notes)?;
    let stated_nodes = FileSays::of(&bytes, &p).nodes;
    if let (Some(given), Some(says)) = (nodes, stated_nodes)
        && given != says
    {
        return Err(Fail(format!(
            "--nodes {given} contradicts --previous {}, which has {}: drop --nodes (re-planning keeps the previous placement's nodes), or drop --previous to plan for another cluster",
            path.display(),
            count(says, "node")
        )));
    }
    Ok(Previous {
        placement: p,
        stated_nodes,
    })
}

/// A placement named on the command line with the user's `--ranks`,
/// `--nodes` and `--experts` (`flags`): they fill in what its format does not say and must not
/// contradict what it does. `input_experts`: E from the load or the checkpoint, when --experts
/// is not given.
pub fn read_user_placement(
    path: &Path,
    input_experts: Option<Experts>,
    flags: &Stated,
    layout: Option<&DecoderLayout>,
    notes: &mut Vec<String>,
) -> Result<Placement, Fail> {
    let bytes = read_bytes(path, "placement")?;
    let experts = flags.experts.map(Experts::Flag).or(input_experts);
    let p = read_placement_from(
        path,
        &bytes,
        experts,
        flags.ranks,
        flags.nodes,
        layout,
        notes,
    )?;
    flags.check(path, &bytes, &p)?;
    Ok(p)
}

fn read_placement_from(
    path: &Path,
    bytes: &[u8],
    experts: Option<Experts>,
    ranks: Option<usize>,
    nodes: Option<usize>,
    layout: Option<&DecoderLayout>,
    notes: &mut Vec<String>,
) -> Result<Placement, Fail> {
    let ctx = PlacementContext {
        num_experts: experts.map(Experts::count),
        num_ranks: ranks,
        num_nodes: nodes,
        layout,
    };
    let (p, _, n) = match formats::read_placement_bytes(bytes, &ctx) {
        Ok(read) => read,
        Err(e) => return Err(explain_expert_count(path, bytes, &ctx, experts, e)),
    };
    notes.extend(prefix(path, n));
    Ok(p)
}

/// A placement that fails with a given expert count E (formats that take E from outside:
/// vllm-ascend maps, SGLang's map) is read again without it, to say what the mismatch is: a
/// per-slot load (E columns = the placement's slots) or another expert count.
fn explain_expert_count(
    path: &Path,
    bytes: &[u8],
    ctx: &PlacementContext,
    experts: Option<Experts>,
    err: eplb::EplbError,
) -> Fail {
    let Some(given) = experts else {
        return at(path)(err);
    };
    let e = given.count();
    let own = PlacementContext {
        num_experts: None,
        ..ctx.clone()
    };
    let Ok((p, format, _)) = formats::read_placement_bytes(bytes, &own) else {
        return at(path)(err);
    };
    if p.num_logical_experts == e {
        return at(path)(err);
    }
    if let Experts::Load(_) = given {
        let ascend = format == formats::ASCEND_EXPERT_MAP;
        if let Err(per_slot) = formats::vllm::check_column_count(e, &p, per_slot_name(ascend)) {
            let Fail(m) = at(path)(per_slot);
            // A vllm-ascend map's per-slot load (moe_load) counts its shared experts' slots too.
            return Fail(if ascend {
                format!(
                    "{m}; if ids from some E up are vllm-ascend mix_placement shared experts, add --experts E (the routed count): their slots' counts are left out"
                )
            } else {
                m
            });
        }
        if let Some(per_slot) = per_slot_as_written(path, bytes, ctx.layout, e, &p) {
            return per_slot;
        }
    }
    let shared = if p.num_logical_experts > e {
        format!(
            " (ids from {e} up are read as vllm-ascend mix_placement shared experts only when every device holds one copy of each)"
        )
    } else {
        String::new()
    };
    Fail(format!(
        "{} but {} holds {}{shared}; {}",
        given.says(),
        path.display(),
        count(p.num_logical_experts, "expert"),
        given.advice()
    ))
}

/// The routed expert count to read placements with: the load's columns when they are per
/// expert (`--experts` must then agree), else `--experts` if given (vllm-ascend maps list
/// mix_placement shared experts after the routed ones; without E the largest id is read as
/// routed).
pub fn load_experts(
    load: &LoadInput,
    physical: bool,
    flag: Option<usize>,
) -> Result<Option<Experts>, Fail> {
    if physical {
        return Ok(flag.map(Experts::Flag));
    }
    let e = load.history.num_experts();
    match flag {
        Some(f) if f != e => Err(Fail(format!(
            "--experts {f} but the load has {} per layer (--experts is for per-slot loads, --physical-load, whose columns are slots)",
            count(e, "expert")
        ))),
        _ => Ok(Some(Experts::Load(e))),
    }
}

/// What a per-slot load is called in messages: vLLM's (`expert_load_window`), or for a
/// vllm-ascend map its `moe_load`, whose columns include the shared experts' slots.
fn per_slot_name(ascend: bool) -> &'static str {
    if ascend {
        "vllm-ascend's per-slot load (moe_load)"
    } else {
        "vLLM's per-slot load"
    }
}

/// A load whose columns are as many as the slots of the map as written, when masked ranks
/// (-1) make that more than the placement read from it has: vLLM's per-slot load, recorded
/// over every physical slot. The error that says so, or None.
fn per_slot_as_written(
    path: &Path,
    bytes: &[u8],
    layout: Option<&DecoderLayout>,
    cols: usize,
    p: &Placement,
) -> Option<Fail> {
    let slots = formats::read_slot_map_bytes(bytes, layout)?;
    let written = slots.rows.first()?.len();
    let extra = if slots.lists_shared_experts {
        "its shared experts' slots included"
    } else {
        "masked ranks' -1 slots included"
    };
    let name = per_slot_name(slots.lists_shared_experts);
    (cols == written && written != p.num_slots() && cols != p.num_logical_experts).then(|| {
        Fail(format!(
            "the load has {cols} counts per layer, as many as the slots {} lists ({extra}; it holds {}): it looks like {name}; pass --physical-load to map slots to experts through the map as written",
            path.display(),
            count(p.num_logical_experts, "routed expert")
        ))
    })
}

/// Turns a per-slot load into a per-expert one through `through` (`--physical-load`), or checks
/// that a per-expert load is not a per-slot one in disguise.
/// `through_file` is the placement's file: a vLLM map with masked ranks (-1) has more slots
/// than the placement read from it, and the counts span them all.
pub fn settle_physical(
    load: &mut LoadInput,
    physical: bool,
    through: Option<&Placement>,
    through_file: Option<&Path>,
    flag_for_placement: &str,
) -> Result<(), Fail> {
    match (physical, through) {
        (true, None) => Err(Fail(format!(
            "--physical-load needs {flag_for_placement} (the placement whose slots the counts are for)"
        ))),
        (true, Some(p)) => {
            let cols = load.history.num_experts();
            let slot_map = through_file
                .filter(|_| cols != p.num_slots())
                .and_then(|f| read_bytes(f, "placement").ok())
                .and_then(|b| formats::read_slot_map_bytes(&b, load.layout.as_ref()))
                .filter(|m| m.rows.first().map(Vec::len) == Some(cols));
            let e = p.num_logical_experts;
            let mut note =
                format!("per-slot counts mapped to {e} experts through {flag_for_placement}");
            load.history = match slot_map {
                Some(map) => {
                    let shared_slots = map.rows[0].iter().filter(|&&x| x >= e as i64).count();
                    if map.lists_shared_experts && shared_slots > 0 {
                        note.push_str(&format!(
                            "; the counts of its {} per layer left out (vllm-ascend mix_placement, ids from {e} up: not routed load)",
                            count(shared_slots, "shared-expert slot")
                        ));
                    }
                    formats::vllm::logical_from_slot_map(load.history.windows(), &map, e)?
                }
                None => formats::vllm::logical_from_physical(load.history.windows(), p)?,
            };
            load.notes.push(note);
            Ok(())
        }
        (false, Some(p)) => {
            formats::vllm::check_logical_columns(&load.history, p)?;
            let written = through_file.and_then(|f| {
                let bytes = read_bytes(f, "placement").ok()?;
                per_slot_as_written(
                    f,
                    &bytes,
                    load.layout.as_ref(),
                    load.history.num_experts(),
                    p,
                )
            });
            written.map_or(Ok(()), Err)
        }
        (false, None) => Ok(()),
    }
}

/// What `plan` and `backtest` read: the load (per expert: `--physical-load` counts mapped
/// through `previous`), and `previous`, the placement in use (`--previous`), read with the
/// load's expert count or `--experts`, `ranks` and `nodes` (see [`read_previous`]); the load's
/// shape checked against the layout flags. The readers' notes go to `notes`.
#[allow(clippy::too_many_arguments)] // the flags of `plan` and `backtest` that shape the inputs
pub fn read_load_and_previous(
    load: &Path,
    layout: &LayoutArgs,
    physical_load: bool,
    experts: Option<usize>,
    previous: Option<&Path>,
    ranks: usize,
    nodes: Option<usize>,
    notes: &mut Vec<String>,
) -> Result<(LoadInput, Option<Previous>), Fail> {
    let mut load = read_load(load, layout)?;
    notes.append(&mut load.notes);
    let experts = load_experts(&load, physical_load, experts)?;
    let previous_read = previous
        .map(|f| read_previous(f, experts, ranks, nodes, load.layout.as_ref(), notes))
        .transpose()?;
    let prev = previous_read.as_ref().map(|p| &p.placement);
    if let (Some(Experts::Flag(e)), Some(p), Some(f)) = (experts, &prev, previous)
        && e != p.num_logical_experts
    {
        return Err(Fail(format!(
            "--experts {e} contradicts {}, which holds {} routed experts",
            f.display(),
            p.num_logical_experts
        )));
    }
    settle_physical(&mut load, physical_load, prev, previous, "--previous")?;
    notes.append(&mut load.notes);
    layout.check_load_shape(&load.history)?;
    Ok((load, previous_read))
}

/// Refuses a `--previous` of another layout than the one planned (`shape`), naming the flag,
/// the file and the flags that would match it (eplb's message names neither).
pub fn check_previous_fits(prev: &Placement, file: &Path, shape: &eplb::Shape) -> Result<(), Fail> {
    prev.check_shape(shape).map_err(|e| {
        let redundant = prev.num_slots().saturating_sub(prev.num_logical_experts);
        Fail(format!(
            "--previous {}: {e}: plan with the previous placement's --ranks {} --redundant {redundant}, or drop --previous",
            file.display(),
            prev.num_ranks
        ))
    })
}

/// Refuses 0 for a count flag (`--ranks 0`) with the flag's name; eplb's shape check would
/// say only "the number of ranks must be at least 1".
pub fn at_least_one(flag: &str, value: usize, what: &str) -> Result<(), Fail> {
    if value == 0 {
        return Err(Fail(format!("{flag} 0: give at least 1 {what}")));
    }
    Ok(())
}

/// The placement a recording by `moectl record` carries (what the group served when it began),
/// read as a `--previous` file would be.
pub fn read_recorded_placement(
    recording: &Path,
    doc: &moe_api::PlacementDocument,
    load: &LoadInput,
    ranks: usize,
    notes: &mut Vec<String>,
) -> Result<Placement, Fail> {
    let bytes = serde_json::to_vec(doc)?;
    read_placement_from(
        recording,
        &bytes,
        Some(Experts::Load(load.history.num_experts())),
        Some(ranks),
        None,
        load.layout.as_ref(),
        notes,
    )
}

/// The layout SGLang output needs, or the error that says which flag gives it.
pub fn need_layout(layout: Option<&DecoderLayout>) -> Result<&DecoderLayout, Fail> {
    layout.ok_or_else(|| {
        Fail(
            "SGLang files have one row per decoder layer: pass --first-dense K (0 if every layer is MoE) or --decoder-layers N --moe-layers i,j,.."
                .into(),
        )
    })
}
