//! A Hugging Face checkpoint directory read through its model description: the safetensors
//! headers (only the shards the index names, when there is an index), the name of every tensor
//! the MoE layers need, checked up front (presence, shape, dtype, FP8 scales), and reads of
//! single tensors or single experts' slices of fused 3-D tensors.
//!
//! Opening reads headers only; a rank then reads just the bytes of the tensors it holds.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use half::bf16;
use moe_model::{FusedLayout, ModelDescription, Projection, WeightDtype};
use safetensors::Dtype;
use safetensors::tensor::TensorInfo;

/// A checkpoint problem found at start; the message names the tensor (and the files searched)
/// or the value at fault.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{0}")]
    Model(#[from] moe_model::ModelError),
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("tensor {name} not found (searched {searched})")]
    Missing { name: String, searched: String },
    #[error("tensor {name} has shape {found:?}, expected {expected:?} ({why})")]
    Shape {
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
        why: String,
    },
    #[error("tensor {name} has dtype {found:?}; supported: {supported}")]
    Dtype {
        name: String,
        found: Dtype,
        supported: &'static str,
    },
    #[error(
        "tensor {name} is FP8 (F8_E4M3) but its block scales {scale} are missing (searched {searched})"
    )]
    MissingScales {
        name: String,
        scale: String,
        searched: String,
    },
    #[error(
        "no routed experts of MoE layer {layer} (decoder layer {decoder}): neither {per_expert} nor {fused} (searched {searched})"
    )]
    NoExperts {
        layer: usize,
        decoder: usize,
        per_expert: String,
        fused: String,
        searched: String,
    },
}

type Result<T, E = CheckpointError> = std::result::Result<T, E>;

struct Entry {
    file: usize,
    /// Offset of the data section in the file.
    base: u64,
    info: TensorInfo,
}

/// How one MoE layer's routed experts are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    PerExpert,
    Fused,
}

/// Where one MoE layer's tensors live.
#[derive(Debug, Clone)]
struct LayerNames {
    decoder: usize,
    module: String,
    layout: Layout,
}

/// An opened checkpoint (headers read, every needed tensor checked).
pub struct Checkpoint {
    dir: PathBuf,
    desc: ModelDescription,
    files: Vec<PathBuf>,
    /// One open handle per file (positioned reads need no seek, so ranks' loads can share it).
    handles: Vec<File>,
    tensors: HashMap<String, Entry>,
    layers: Vec<LayerNames>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("files", &self.files.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// Decodes one FP8 E4M3 (`e4m3fn`: bias 7, no infinities, `S.1111.111` is NaN) value.
pub fn fp8_e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = ((b >> 3) & 0x0f) as i32;
    let man = (b & 0x07) as f32;
    if exp == 0x0f && b & 0x07 == 0x07 {
        return f32::NAN;
    }
    if exp == 0 {
        sign * man / 8.0 * 2f32.powi(-6)
    } else {
        sign * (1.0 + man / 8.0) * 2f32.powi(exp - 7)
    }
}

/// `dst`'s bytes (little-endian bf16 is what safetensors stores).
fn bf16_bytes_mut(dst: &mut [bf16]) -> &mut [u8] {
    // SAFETY: `bf16` is `repr(transparent)` over `u16`, so the slice covers exactly
    // `2 * len` initialised bytes; every bit pattern is a valid `bf16`; `u8` needs no alignment.
    unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<u8>(), 2 * dst.len()) }
}

/// FP8 weights as stored (kept for backends that compute in FP8; the CPU backend dequantises).
#[derive(Debug, Clone, PartialEq)]
pub struct Fp8Matrix {
    pub rows: usize,
    pub cols: usize,
    /// `[rows * cols]` E4M3 codes.
    pub data: Vec<u8>,
    /// `[ceil(rows / block[0]) * ceil(cols / block[1])]` `weight_scale_inv`, row-major.
    pub scale_inv: Vec<f32>,
    pub block: [usize; 2],
}

impl Fp8Matrix {
    /// `bf16(q * scale_inv[block])`, as DeepSeek's and transformers' dequantisation computes.
    pub fn dequantize(&self) -> Vec<bf16> {
        let lut: Vec<f32> = (0..=255u8).map(fp8_e4m3_to_f32).collect();
        let bc = self.cols.div_ceil(self.block[1]);
        let mut out = Vec::with_capacity(self.data.len());
        for r in 0..self.rows {
            let srow = &self.scale_inv[(r / self.block[0]) * bc..(r / self.block[0] + 1) * bc];
            let q = &self.data[r * self.cols..(r + 1) * self.cols];
            for (c, &v) in q.iter().enumerate() {
                out.push(bf16::from_f32(lut[v as usize] * srow[c / self.block[1]]));
            }
        }
        out
    }
}

fn searched(files: &[PathBuf]) -> String {
    let names: Vec<String> = files
        .iter()
        .map(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .collect();
    names.join(", ")
}

fn read_header(path: &Path) -> Result<(u64, HashMap<String, serde_json::Value>, File)> {
    let err = |reason: String| CheckpointError::File {
        path: path.to_path_buf(),
        reason,
    };
    let mut f = File::open(path).map_err(|e| err(format!("cannot open: {e}")))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|e| err(format!("reading the header size: {e}")))?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 {
        return Err(err(format!("header of {n} bytes is implausibly large")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .map_err(|e| err(format!("reading the header: {e}")))?;
    let map = serde_json::from_slice(&header)
        .map_err(|e| err(format!("the header is not safetensors JSON: {e}")))?;
    Ok((8 + n, map, f))
}

impl Checkpoint {
    /// Reads the headers of the checkpoint's safetensors files and checks every tensor the MoE
    /// layers need.
    pub fn open(dir: &Path, desc: ModelDescription) -> Result<Checkpoint> {
        let files: Vec<PathBuf> = match moe_model::read_index(dir)? {
            Some(map) => {
                let mut names: Vec<&String> = map.values().collect();
                names.sort();
                names.dedup();
                names.into_iter().map(|n| dir.join(n)).collect()
            }
            None => {
                let entries = std::fs::read_dir(dir).map_err(|e| CheckpointError::File {
                    path: dir.to_path_buf(),
                    reason: format!("cannot list the directory: {e}"),
                })?;
                let mut files: Vec<PathBuf> = entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                    .collect();
                files.sort();
                files
            }
        };
        if files.is_empty() {
            return Err(CheckpointError::File {
                path: dir.to_path_buf(),
                reason: "no .safetensors files".into(),
            });
        }
        let mut tensors = HashMap::new();
        let mut handles = Vec::with_capacity(files.len());
        for (i, path) in files.iter().enumerate() {
            let (base, map, file) = read_header(path)?;
            handles.push(file);
            for (name, v) in map {
                if name == "__metadata__" {
                    continue;
                }
                let info: TensorInfo =
                    serde_json::from_value(v).map_err(|e| CheckpointError::File {
                        path: path.clone(),
                        reason: format!("tensor {name}: {e}"),
                    })?;
                tensors.insert(
                    name,
                    Entry {
                        file: i,
                        base,
                        info,
                    },
                );
            }
        }
        let mut ck = Checkpoint {
            dir: dir.to_path_buf(),
            desc,
            files,
            handles,
            tensors,
            layers: Vec::new(),
        };
        ck.layers = (0..ck.desc.num_moe_layers())
            .map(|l| ck.locate(l))
            .collect::<Result<_>>()?;
        ck.check_all()?;
        Ok(ck)
    }

    pub fn description(&self) -> &ModelDescription {
        &self.desc
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The safetensors files of the checkpoint (the index's shards, or every file).
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Where a tensor's bytes are: file, absolute offset and length.
    pub fn tensor_bytes(&self, name: &str) -> Option<(&Path, u64, u64)> {
        let e = self.tensors.get(name)?;
        let (a, b) = e.info.data_offsets;
        Some((&self.files[e.file], e.base + a as u64, (b - a) as u64))
    }

    fn searched(&self) -> String {
        searched(&self.files)
    }

    /// Finds MoE layer `l`'s module name and expert layout.
    fn locate(&self, l: usize) -> Result<LayerNames> {
        let t = &self.desc.tensors;
        let d = self.desc.moe_layers[l];
        let module = t
            .modules
            .iter()
            .find(|m| self.tensors.contains_key(&t.router(d, m)))
            .ok_or_else(|| CheckpointError::Missing {
                name: t.router(d, &t.modules[0]),
                searched: self.searched(),
            })?
            .clone();
        let layout = if self
            .tensors
            .contains_key(&t.expert(d, &module, 0, Projection::Gate))
        {
            Layout::PerExpert
        } else if self.tensors.contains_key(&t.fused_gate_up(d, &module)) {
            Layout::Fused
        } else {
            return Err(CheckpointError::NoExperts {
                layer: l,
                decoder: d,
                per_expert: t.expert(d, &module, 0, Projection::Gate),
                fused: t.fused_gate_up(d, &module),
                searched: self.searched(),
            });
        };
        Ok(LayerNames {
            decoder: d,
            module,
            layout,
        })
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.tensors
            .get(name)
            .ok_or_else(|| CheckpointError::Missing {
                name: name.to_string(),
                searched: self.searched(),
            })
    }

    /// The tensor's entry, when it is present with this shape (`why` names the shape).
    fn entry_of_shape(&self, name: &str, shape: &[usize], why: &str) -> Result<&Entry> {
        let e = self.entry(name)?;
        if e.info.shape != shape {
            return Err(CheckpointError::Shape {
                name: name.into(),
                found: e.info.shape.clone(),
                expected: shape.to_vec(),
                why: why.into(),
            });
        }
        Ok(e)
    }

    /// Checks a linear weight's presence, shape and dtype (and its scales when FP8).
    fn check_weight(&self, name: &str, shape: &[usize], why: &str) -> Result<()> {
        let e = self.entry_of_shape(name, shape, why)?;
        match e.info.dtype {
            Dtype::BF16 | Dtype::F16 | Dtype::F32 => Ok(()),
            Dtype::F8_E4M3 => {
                let scale = self.desc.tensors.scale_of(name);
                let s = self
                    .tensors
                    .get(&scale)
                    .ok_or_else(|| CheckpointError::MissingScales {
                        name: name.into(),
                        scale: scale.clone(),
                        searched: self.searched(),
                    })?;
                let block = self.block();
                let (r, c) = (shape[shape.len() - 2], shape[shape.len() - 1]);
                let mut want: Vec<usize> = shape[..shape.len() - 2].to_vec();
                want.extend([r.div_ceil(block[0]), c.div_ceil(block[1])]);
                if s.info.shape != want {
                    return Err(CheckpointError::Shape {
                        name: scale,
                        found: s.info.shape.clone(),
                        expected: want,
                        why: format!("one scale per {}x{} block", block[0], block[1]),
                    });
                }
                match s.info.dtype {
                    Dtype::F32 | Dtype::BF16 | Dtype::F16 => Ok(()),
                    found => Err(CheckpointError::Dtype {
                        name: scale,
                        found,
                        supported: "F32, BF16, F16",
                    }),
                }
            }
            found => Err(CheckpointError::Dtype {
                name: name.into(),
                found,
                supported: "BF16, F16, F32, F8_E4M3 with weight_scale_inv",
            }),
        }
    }

    fn block(&self) -> [usize; 2] {
        self.desc.quantization.map_or([128, 128], |q| q.block)
    }

    /// Every tensor every MoE layer needs, so a bad checkpoint fails before the group forms.
    fn check_all(&self) -> Result<()> {
        let d = &self.desc;
        let (e, h, i) = (d.num_experts, d.hidden, d.intermediate);
        let t = &d.tensors;
        for ln in &self.layers {
            let (dl, m) = (ln.decoder, ln.module.as_str());
            let router = t.router(dl, m);
            self.check_plain(&router, &[e, h], "[experts, hidden]")?;
            if let Some(b) = t.correction_bias(dl, m) {
                self.check_plain(&b, &[e], "[experts]")?;
            }
            match ln.layout {
                Layout::PerExpert => {
                    for x in 0..e {
                        for p in Projection::ALL {
                            let shape = if p == Projection::Down {
                                [h, i]
                            } else {
                                [i, h]
                            };
                            self.check_weight(&t.expert(dl, m, x, p), &shape, "routed expert")?;
                        }
                    }
                }
                Layout::Fused if t.fused_layout == FusedLayout::InputMajorInterleaved => {
                    self.check_plain(
                        &t.fused_gate_up(dl, m),
                        &[e, h, 2 * i],
                        "[experts, hidden, 2 x intermediate], gate and up interleaved",
                    )?;
                    self.check_plain(
                        &t.fused_down(dl, m),
                        &[e, i, h],
                        "[experts, intermediate, hidden]",
                    )?;
                }
                Layout::Fused => {
                    self.check_weight(
                        &t.fused_gate_up(dl, m),
                        &[e, 2 * i, h],
                        "[experts, 2 x moe intermediate, hidden]",
                    )?;
                    self.check_weight(
                        &t.fused_down(dl, m),
                        &[e, h, i],
                        "[experts, hidden, moe intermediate]",
                    )?;
                }
            }
            if let Some(b) = t.router_bias(dl, m) {
                self.check_plain(&b, &[e], "[experts]")?;
            }
            if let Some(b) = t.fused_gate_up_bias(dl, m) {
                self.check_plain(&b, &[e, 2 * i], "[experts, 2 x intermediate]")?;
            }
            if let Some(b) = t.fused_down_bias(dl, m) {
                self.check_plain(&b, &[e, h], "[experts, hidden]")?;
            }
            if let Some(s) = d.shared {
                for p in Projection::ALL {
                    let shape = if p == Projection::Down {
                        [h, s.intermediate]
                    } else {
                        [s.intermediate, h]
                    };
                    if let Some(name) = t.shared_expert(dl, m, p) {
                        self.check_weight(&name, &shape, "shared expert")?;
                    }
                }
                if let Some(g) = t.shared_expert_gate(dl, m) {
                    self.check_plain(&g, &[1, h], "[1, hidden]")?;
                }
            }
        }
        Ok(())
    }

    /// A tensor that is never quantised (router, bias, shared-expert gate).
    fn check_plain(&self, name: &str, shape: &[usize], why: &str) -> Result<()> {
        let e = self.entry_of_shape(name, shape, why)?;
        match e.info.dtype {
            Dtype::BF16 | Dtype::F16 | Dtype::F32 => Ok(()),
            found => Err(CheckpointError::Dtype {
                name: name.into(),
                found,
                supported: "BF16, F16, F32",
            }),
        }
    }

    /// Reads bytes `[start, start + dst.len())` of a tensor's data into `dst`.
    fn read_range_into(&self, name: &str, start: usize, dst: &mut [u8]) -> Result<()> {
        let e = self.entry(name)?;
        let path = &self.files[e.file];
        let (a, b) = e.info.data_offsets;
        let end = start + dst.len();
        if end > b - a {
            return Err(CheckpointError::File {
                path: path.clone(),
                reason: format!("tensor {name}: data ends before byte {end}"),
            });
        }
        self.handles[e.file]
            .read_exact_at(dst, e.base + (a + start) as u64)
            .map_err(|err| CheckpointError::File {
                path: path.clone(),
                reason: format!("reading tensor {name}: {err}"),
            })
    }

    /// Reads bytes `[start, end)` of a tensor's data.
    fn read_range(&self, name: &str, start: usize, end: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; end.saturating_sub(start)];
        self.read_range_into(name, start, &mut buf)?;
        Ok(buf)
    }

    /// Elements `[first, first + n)` of a BF16/F16/F32 tensor, widened to f32.
    fn read_f32_elems(&self, name: &str, first: usize, n: usize) -> Result<Vec<f32>> {
        let dtype = self.entry(name)?.info.dtype;
        let sz = dtype.bitsize() / 8;
        let raw = self.read_range(name, first * sz, (first + n) * sz)?;
        Ok(match dtype {
            Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F16 => raw
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F32 => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            found => {
                return Err(CheckpointError::Dtype {
                    name: name.into(),
                    found,
                    supported: "BF16, F16, F32",
                });
            }
        })
    }

    /// Matrix `index` (`rows x cols`) of a linear weight (`index` 0 for a 2-D tensor, the
    /// expert for a fused 3-D one) into `dst`, as bf16: BF16 as stored (read straight into
    /// `dst`), F16/F32 rounded, FP8 dequantised.
    fn read_matrix_into(
        &self,
        name: &str,
        index: usize,
        rows: usize,
        cols: usize,
        dst: &mut [bf16],
    ) -> Result<()> {
        let dtype = self.entry(name)?.info.dtype;
        let n = rows * cols;
        debug_assert_eq!(dst.len(), n);
        match dtype {
            Dtype::F8_E4M3 => {
                dst.copy_from_slice(&self.read_fp8(name, index, rows, cols)?.dequantize())
            }
            Dtype::BF16 if cfg!(target_endian = "little") => {
                self.read_range_into(name, 2 * index * n, bf16_bytes_mut(dst))?;
            }
            _ => {
                for (d, v) in dst.iter_mut().zip(self.read_f32_elems(name, index * n, n)?) {
                    *d = bf16::from_f32(v);
                }
            }
        }
        Ok(())
    }

    fn read_matrix(&self, name: &str, index: usize, rows: usize, cols: usize) -> Result<Vec<bf16>> {
        let mut v = vec![bf16::ZERO; rows * cols];
        self.read_matrix_into(name, index, rows, cols, &mut v)?;
        Ok(v)
    }

    /// Matrix `index` of an FP8 weight with its block scales, as stored.
    pub fn read_fp8(
        &self,
        name: &str,
        index: usize,
        rows: usize,
        cols: usize,
    ) -> Result<Fp8Matrix> {
        let n = rows * cols;
        let data = self.read_range(name, index * n, (index + 1) * n)?;
        let block = self.block();
        let nb = rows.div_ceil(block[0]) * cols.div_ceil(block[1]);
        let scale_inv = self.read_f32_elems(&self.desc.tensors.scale_of(name), index * nb, nb)?;
        Ok(Fp8Matrix {
            rows,
            cols,
            data,
            scale_inv,
            block,
        })
    }

    /// Router weight of MoE layer `l`, `[experts, hidden]` in f32 (as stored, widened).
    pub fn router(&self, l: usize) -> Result<Vec<f32>> {
        let ln = &self.layers[l];
        let d = &self.desc;
        self.read_f32_elems(
            &d.tensors.router(ln.decoder, &ln.module),
            0,
            d.num_experts * d.hidden,
        )
    }

    /// Score-correction bias of MoE layer `l` (DeepSeek-V3), `[experts]`.
    pub fn correction_bias(&self, l: usize) -> Result<Option<Vec<f32>>> {
        let ln = &self.layers[l];
        match self.desc.tensors.correction_bias(ln.decoder, &ln.module) {
            Some(name) => Ok(Some(self.read_f32_elems(
                &name,
                0,
                self.desc.num_experts,
            )?)),
            None => Ok(None),
        }
    }

    /// Routed expert `e` of MoE layer `l` in the kernels' layout: `w1 = [gate; up]`
    /// (`[2I, H]`, read straight into place) and `w2 = down` (`[H, I]`).
    pub fn expert(&self, l: usize, e: usize) -> Result<(Vec<bf16>, Vec<bf16>)> {
        let ln = &self.layers[l];
        let (h, i) = (self.desc.hidden, self.desc.intermediate);
        let t = &self.desc.tensors;
        let (dl, m) = (ln.decoder, ln.module.as_str());
        let mut w1 = vec![bf16::ZERO; 2 * i * h];
        let mut w2 = vec![bf16::ZERO; h * i];
        match ln.layout {
            Layout::PerExpert => {
                let (gate, up) = w1.split_at_mut(i * h);
                self.read_matrix_into(&t.expert(dl, m, e, Projection::Gate), 0, i, h, gate)?;
                self.read_matrix_into(&t.expert(dl, m, e, Projection::Up), 0, i, h, up)?;
                self.read_matrix_into(&t.expert(dl, m, e, Projection::Down), 0, h, i, &mut w2)?;
            }
            Layout::Fused if t.fused_layout == FusedLayout::InputMajorInterleaved => {
                // gpt-oss: gate_up [H, 2I] with gate at even and up at odd columns; down
                // [I, H]. Transposed into w1 = [gate; up] [2I, H] and w2 [H, I].
                let gu = self.read_matrix(&t.fused_gate_up(dl, m), e, h, 2 * i)?;
                for r in 0..h {
                    for j in 0..i {
                        w1[j * h + r] = gu[r * 2 * i + 2 * j];
                        w1[(i + j) * h + r] = gu[r * 2 * i + 2 * j + 1];
                    }
                }
                let down = self.read_matrix(&t.fused_down(dl, m), e, i, h)?;
                for r in 0..i {
                    for c in 0..h {
                        w2[c * i + r] = down[r * h + c];
                    }
                }
            }
            Layout::Fused => {
                self.read_matrix_into(&t.fused_gate_up(dl, m), e, 2 * i, h, &mut w1)?;
                self.read_matrix_into(&t.fused_down(dl, m), e, h, i, &mut w2)?;
            }
        }
        Ok((w1, w2))
    }

    /// Routed expert `e` of MoE layer `l` as stored, FP8 codes with their block scales (gate,
    /// up, down), for backends that compute in FP8; `None` unless the layer stores its experts
    /// one tensor per projection in FP8.
    pub fn expert_fp8(&self, l: usize, e: usize) -> Result<Option<[Fp8Matrix; 3]>> {
        let ln = &self.layers[l];
        if ln.layout != Layout::PerExpert || self.expert_dtype(l)? != WeightDtype::Fp8E4m3 {
            return Ok(None);
        }
        let (h, i) = (self.desc.hidden, self.desc.intermediate);
        let t = &self.desc.tensors;
        let (dl, m) = (ln.decoder, ln.module.as_str());
        Ok(Some([
            self.read_fp8(&t.expert(dl, m, e, Projection::Gate), 0, i, h)?,
            self.read_fp8(&t.expert(dl, m, e, Projection::Up), 0, i, h)?,
            self.read_fp8(&t.expert(dl, m, e, Projection::Down), 0, h, i)?,
        ]))
    }

    /// Router bias of MoE layer `l` (gpt-oss), `[experts]`.
    pub fn router_bias(&self, l: usize) -> Result<Option<Vec<f32>>> {
        let ln = &self.layers[l];
        match self.desc.tensors.router_bias(ln.decoder, &ln.module) {
            Some(name) => Ok(Some(self.read_f32_elems(
                &name,
                0,
                self.desc.num_experts,
            )?)),
            None => Ok(None),
        }
    }

    /// Biases of routed expert `e` of MoE layer `l` (gpt-oss): `b1` `[2I]` with the gate
    /// entries first (de-interleaved), `b2` `[H]`.
    pub fn expert_bias(&self, l: usize, e: usize) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
        let ln = &self.layers[l];
        let t = &self.desc.tensors;
        let (h, i) = (self.desc.hidden, self.desc.intermediate);
        let (Some(gu), Some(dn)) = (
            t.fused_gate_up_bias(ln.decoder, &ln.module),
            t.fused_down_bias(ln.decoder, &ln.module),
        ) else {
            return Ok(None);
        };
        let raw = self.read_f32_elems(&gu, e * 2 * i, 2 * i)?;
        let mut b1 = vec![0f32; 2 * i];
        for j in 0..i {
            b1[j] = raw[2 * j];
            b1[i + j] = raw[2 * j + 1];
        }
        Ok(Some((b1, self.read_f32_elems(&dn, e * h, h)?)))
    }

    /// The shared expert MLP of MoE layer `l` (gate, up, down) and Qwen2's shared-expert gate.
    #[allow(clippy::type_complexity)]
    pub fn shared(
        &self,
        l: usize,
    ) -> Result<Option<((Vec<bf16>, Vec<bf16>, Vec<bf16>), Option<Vec<f32>>)>> {
        let Some(s) = self.desc.shared else {
            return Ok(None);
        };
        let ln = &self.layers[l];
        let (dl, m) = (ln.decoder, ln.module.as_str());
        let t = &self.desc.tensors;
        let (h, i) = (self.desc.hidden, s.intermediate);
        let name = |p| {
            t.shared_expert(dl, m, p)
                .ok_or_else(|| CheckpointError::Missing {
                    name: format!("shared expert of decoder layer {dl}"),
                    searched: self.searched(),
                })
        };
        let mlp = (
            self.read_matrix(&name(Projection::Gate)?, 0, i, h)?,
            self.read_matrix(&name(Projection::Up)?, 0, i, h)?,
            self.read_matrix(&name(Projection::Down)?, 0, h, i)?,
        );
        let gate = match t.shared_expert_gate(dl, m) {
            Some(g) => Some(self.read_f32_elems(&g, 0, h)?),
            None => None,
        };
        Ok(Some((mlp, gate)))
    }

    /// The stored dtype of MoE layer `l`'s routed experts.
    pub fn expert_dtype(&self, l: usize) -> Result<WeightDtype> {
        let ln = &self.layers[l];
        let t = &self.desc.tensors;
        let name = match ln.layout {
            Layout::PerExpert => t.expert(ln.decoder, &ln.module, 0, Projection::Gate),
            Layout::Fused => t.fused_gate_up(ln.decoder, &ln.module),
        };
        Ok(match self.entry(&name)?.info.dtype {
            Dtype::BF16 => WeightDtype::Bf16,
            Dtype::F16 => WeightDtype::F16,
            Dtype::F32 => WeightDtype::F32,
            _ => WeightDtype::Fp8E4m3,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_e4m3_decodes_like_the_format() {
        assert_eq!(fp8_e4m3_to_f32(0x00), 0.0);
        assert_eq!(fp8_e4m3_to_f32(0x38), 1.0); // exponent 7, mantissa 0
        assert_eq!(fp8_e4m3_to_f32(0xb8), -1.0);
        assert_eq!(fp8_e4m3_to_f32(0x7e), 448.0); // largest finite
        assert_eq!(fp8_e4m3_to_f32(0x01), 2f32.powi(-9)); // smallest subnormal
        assert_eq!(fp8_e4m3_to_f32(0x3c), 1.5);
        assert!(fp8_e4m3_to_f32(0x7f).is_nan());
        assert!(fp8_e4m3_to_f32(0xff).is_nan());
    }

    #[test]
    fn fp8_blocks_scale_their_own_elements() {
        // 3 x 5 with 2 x 2 blocks: scales [2, 3].
        let m = Fp8Matrix {
            rows: 3,
            cols: 5,
            data: vec![0x38; 15],
            scale_inv: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            block: [2, 2],
        };
        let d: Vec<f32> = m.dequantize().iter().map(|v| v.to_f32()).collect();
        assert_eq!(&d[..5], &[1.0, 1.0, 2.0, 2.0, 3.0]);
        assert_eq!(&d[5..10], &[1.0, 1.0, 2.0, 2.0, 3.0]);
        assert_eq!(&d[10..], &[4.0, 4.0, 5.0, 5.0, 6.0]);
    }
}
