//! Expert and router weights: synthetic (seeded, identical on every rank) or safetensors files
//! in the Hugging Face MoE layout, of which a rank reads only its slots' experts.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::Dtype;
use safetensors::tensor::TensorInfo;

use crate::config::{ModelShape, WeightsSource};
use crate::placement::splitmix64;

pub use moe_kernels::ExpertWeights;
use moe_kernels::{Bf16Matrix, Matrix};

fn bf16_bytes(out: &mut Vec<u8>, v: &[bf16]) {
    for x in v {
        out.extend_from_slice(&x.to_bits().to_le_bytes());
    }
}

fn bf16_from_bytes(bytes: &[u8]) -> Vec<bf16> {
    bytes
        .chunks_exact(2)
        .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))
        .collect()
}

/// Builds the kernels' fused layout from the Hugging Face projections: `w1 = [gate; up]`
/// (`[2I, H]`), `w2 = down` (`[H, I]`).
pub fn expert_from_projections(
    gate: Vec<bf16>,
    up: Vec<bf16>,
    down: Vec<bf16>,
    shape: &ModelShape,
) -> Result<ExpertWeights> {
    let (h, i) = (shape.hidden, shape.intermediate);
    let mut w1 = gate;
    w1.extend(up);
    let w1 = Matrix::from_vec(2 * i, h, w1).map_err(|e| anyhow!("{e}"))?;
    let w2 = Matrix::from_vec(h, i, down).map_err(|e| anyhow!("{e}"))?;
    ExpertWeights::new(w1, w2).map_err(|e| anyhow!("{e}"))
}

/// Little-endian bf16 bytes of `w1` then `w2` (the transfer format).
pub fn expert_to_bytes(w: &ExpertWeights) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 * (w.w1.as_slice().len() + w.w2.as_slice().len()));
    bf16_bytes(&mut out, w.w1.as_slice());
    bf16_bytes(&mut out, w.w2.as_slice());
    out
}

pub fn expert_from_bytes(bytes: &[u8], shape: &ModelShape) -> Result<ExpertWeights> {
    let (h, i) = (shape.hidden, shape.intermediate);
    if bytes.len() != shape.expert_bytes() {
        bail!(
            "expert payload has {} bytes, expected {}",
            bytes.len(),
            shape.expert_bytes()
        );
    }
    let split = 2 * (2 * i * h);
    let w1 =
        Matrix::from_vec(2 * i, h, bf16_from_bytes(&bytes[..split])).map_err(|e| anyhow!("{e}"))?;
    let w2 =
        Matrix::from_vec(h, i, bf16_from_bytes(&bytes[split..])).map_err(|e| anyhow!("{e}"))?;
    ExpertWeights::new(w1, w2).map_err(|e| anyhow!("{e}"))
}

fn seeded(seed: u64, a: u64, b: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(splitmix64(
        seed ^ splitmix64(a.wrapping_mul(0x1000_0001) ^ b),
    ))
}

fn uniform(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<bf16> {
    fast_uniform(rng.random::<u64>(), n, scale)
}

/// `n` values uniform in `[-scale, scale)` (16-bit resolution), a pure function of `key`:
/// counter-based, four values per SplitMix64 output (fast enough for large synthetic models
/// and per-step traffic).
pub fn fast_uniform(key: u64, n: usize, scale: f32) -> Vec<bf16> {
    let mut out = Vec::with_capacity(n);
    let mut i = 0u64;
    while out.len() < n {
        let r = splitmix64(key.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
        for j in 0..4 {
            if out.len() == n {
                break;
            }
            let u = ((r >> (16 * j)) & 0xffff) as f32 * (1.0 / 65536.0);
            out.push(bf16::from_f32((u * 2.0 - 1.0) * scale));
        }
        i += 1;
    }
    out
}

/// Synthetic expert `expert` of `layer`: a pure function of (seed, layer, expert).
/// Synthetic expert `expert` of `layer` as Hugging Face projections `(gate, up, down)`: a pure
/// function of (seed, layer, expert).
pub fn synthetic_projections(
    seed: u64,
    layer: usize,
    expert: u32,
    shape: &ModelShape,
) -> (Vec<bf16>, Vec<bf16>, Vec<bf16>) {
    let mut rng = seeded(seed, layer as u64, expert as u64);
    let (h, i) = (shape.hidden, shape.intermediate);
    let a = 1.0 / (h as f32).sqrt();
    let b = 1.0 / (i as f32).sqrt();
    let gate = uniform(&mut rng, i * h, a);
    let up = uniform(&mut rng, i * h, a);
    let down = uniform(&mut rng, h * i, b);
    (gate, up, down)
}

/// Synthetic expert `expert` of `layer`: a pure function of (seed, layer, expert).
pub fn synthetic_expert(seed: u64, layer: usize, expert: u32, shape: &ModelShape) -> ExpertWeights {
    let (g, u, d) = synthetic_projections(seed, layer, expert, shape);
    expert_from_projections(g, u, d, shape).expect("synthetic shapes are consistent")
}

/// Synthetic router of `layer`: `[experts][hidden]`.
pub fn synthetic_router(seed: u64, layer: usize, shape: &ModelShape) -> Vec<bf16> {
    let mut rng = seeded(seed, layer as u64, u64::MAX);
    uniform(
        &mut rng,
        shape.num_experts * shape.hidden,
        1.0 / (shape.hidden as f32).sqrt(),
    )
}

pub fn router_name(layer: usize) -> String {
    format!("model.layers.{layer}.mlp.gate.weight")
}

pub fn expert_name(layer: usize, expert: u32, proj: &str) -> String {
    format!("model.layers.{layer}.mlp.experts.{expert}.{proj}.weight")
}

/// Index of the tensors in a directory of `.safetensors` files (headers only).
pub struct SafetensorsIndex {
    tensors: HashMap<String, (PathBuf, u64, TensorInfo)>,
}

impl SafetensorsIndex {
    pub fn open(dir: &Path) -> Result<SafetensorsIndex> {
        let mut tensors = HashMap::new();
        let entries =
            std::fs::read_dir(dir).with_context(|| format!("reading weights directory {dir:?}"))?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            bail!("no .safetensors files in {dir:?}");
        }
        for path in files {
            let mut f = File::open(&path).with_context(|| format!("opening {path:?}"))?;
            let mut len = [0u8; 8];
            f.read_exact(&mut len)
                .with_context(|| format!("reading the header size of {path:?}"))?;
            let n = u64::from_le_bytes(len);
            if n > 100 << 20 {
                bail!("{path:?}: header of {n} bytes is implausibly large");
            }
            let mut header = vec![0u8; n as usize];
            f.read_exact(&mut header)
                .with_context(|| format!("reading the header of {path:?}"))?;
            let map: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)
                .with_context(|| format!("parsing the header of {path:?}"))?;
            for (name, v) in map {
                if name == "__metadata__" {
                    continue;
                }
                let info: TensorInfo = serde_json::from_value(v)
                    .with_context(|| format!("{path:?}: tensor {name}"))?;
                tensors.insert(name, (path.clone(), 8 + n, info));
            }
        }
        Ok(SafetensorsIndex { tensors })
    }

    /// Reads one tensor as bf16 (converting from f16 or f32), checking its shape.
    pub fn read_bf16(&self, name: &str, shape: &[usize]) -> Result<Vec<bf16>> {
        let (path, base, info) = self
            .tensors
            .get(name)
            .ok_or_else(|| anyhow!("tensor {name} not found in the weights directory"))?;
        if info.shape != shape {
            bail!(
                "tensor {name} has shape {:?}, expected {shape:?}",
                info.shape
            );
        }
        let (start, end) = info.data_offsets;
        let mut f = File::open(path).with_context(|| format!("opening {path:?}"))?;
        f.seek(SeekFrom::Start(base + start as u64))?;
        let mut raw = vec![0u8; end.saturating_sub(start)];
        f.read_exact(&mut raw)
            .with_context(|| format!("reading tensor {name} from {path:?}"))?;
        let count: usize = shape.iter().product();
        let out: Vec<bf16> = match info.dtype {
            Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
            Dtype::F16 => raw
                .chunks_exact(2)
                .map(|c| bf16::from_f32(half::f16::from_le_bytes([c[0], c[1]]).to_f32()))
                .collect(),
            Dtype::F32 => raw
                .chunks_exact(4)
                .map(|c| bf16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
            other => bail!("tensor {name} has dtype {other:?}; supported: BF16, F16, F32"),
        };
        if out.len() != count {
            bail!("tensor {name}: {} elements, expected {count}", out.len());
        }
        Ok(out)
    }
}

/// Loads weights on demand from the configured source.
pub enum WeightStore {
    Synthetic {
        seed: u64,
        shape: ModelShape,
    },
    Files {
        index: SafetensorsIndex,
        shape: ModelShape,
    },
}

impl WeightStore {
    pub fn open(source: &WeightsSource, shape: &ModelShape) -> Result<WeightStore> {
        Ok(match source {
            WeightsSource::Synthetic { seed } => WeightStore::Synthetic {
                seed: *seed,
                shape: *shape,
            },
            WeightsSource::Safetensors { dir } => WeightStore::Files {
                index: SafetensorsIndex::open(dir)?,
                shape: *shape,
            },
        })
    }

    /// Router weight of `layer`, `[experts, hidden]`.
    pub fn router(&self, layer: usize) -> Result<Bf16Matrix> {
        let (data, shape) = match self {
            WeightStore::Synthetic { seed, shape } => {
                (synthetic_router(*seed, layer, shape), shape)
            }
            WeightStore::Files { index, shape } => (
                index.read_bf16(&router_name(layer), &[shape.num_experts, shape.hidden])?,
                shape,
            ),
        };
        Matrix::from_vec(shape.num_experts, shape.hidden, data).map_err(|e| anyhow!("{e}"))
    }

    pub fn expert(&self, layer: usize, expert: u32) -> Result<ExpertWeights> {
        match self {
            WeightStore::Synthetic { seed, shape } => {
                Ok(synthetic_expert(*seed, layer, expert, shape))
            }
            WeightStore::Files { index, shape } => {
                let (h, i) = (shape.hidden, shape.intermediate);
                expert_from_projections(
                    index.read_bf16(&expert_name(layer, expert, "gate_proj"), &[i, h])?,
                    index.read_bf16(&expert_name(layer, expert, "up_proj"), &[i, h])?,
                    index.read_bf16(&expert_name(layer, expert, "down_proj"), &[h, i])?,
                    shape,
                )
            }
        }
    }

    /// Loads the experts of the given slots (`phy2log` of one layer restricted to a rank's
    /// slots), reading each distinct expert once.
    pub fn load_slots(&self, layer: usize, experts: &[u32]) -> Result<Vec<Arc<ExpertWeights>>> {
        let mut cache: HashMap<u32, Arc<ExpertWeights>> = HashMap::new();
        let mut out = Vec::with_capacity(experts.len());
        for &e in experts {
            let w = match cache.get(&e) {
                Some(w) => w.clone(),
                None => {
                    let w = Arc::new(self.expert(layer, e)?);
                    cache.insert(e, w.clone());
                    w
                }
            };
            out.push(w);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Scoring;

    pub(crate) fn small_shape() -> ModelShape {
        ModelShape {
            num_layers: 2,
            num_experts: 4,
            hidden: 8,
            intermediate: 6,
            top_k: 2,
            expert_groups: 1,
            topk_groups: 1,
            scoring: Scoring::Softmax,
            redundant: 0,
            world_size: 2,
        }
    }

    #[test]
    fn synthetic_weights_are_deterministic_per_layer_and_expert() {
        let s = small_shape();
        assert_eq!(synthetic_expert(7, 1, 2, &s), synthetic_expert(7, 1, 2, &s));
        assert_ne!(synthetic_expert(7, 1, 2, &s), synthetic_expert(7, 1, 3, &s));
        assert_ne!(synthetic_expert(7, 0, 2, &s), synthetic_expert(7, 1, 2, &s));
        assert_ne!(synthetic_expert(8, 1, 2, &s), synthetic_expert(7, 1, 2, &s));
        let w = synthetic_expert(1, 0, 0, &s);
        assert_eq!(w.w1.rows(), 2 * s.intermediate);
        assert_eq!(expert_from_bytes(&expert_to_bytes(&w), &s).unwrap(), w);
        assert!(expert_from_bytes(&[0u8; 3], &s).is_err());
    }

    #[test]
    fn safetensors_directory_round_trip() {
        let s = small_shape();
        let dir = tempfile::tempdir().unwrap();
        // Write the synthetic model in the HF layout: layer 0 in bf16, layer 1 in f32, two files.
        for layer in 0..s.num_layers {
            let mut tensors: Vec<(String, Vec<u8>, Dtype, Vec<usize>)> = Vec::new();
            let enc = |v: &[bf16], dtype: Dtype| -> Vec<u8> {
                match dtype {
                    Dtype::F32 => v.iter().flat_map(|x| x.to_f32().to_le_bytes()).collect(),
                    _ => v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
                }
            };
            let dtype = if layer == 0 { Dtype::BF16 } else { Dtype::F32 };
            let r = synthetic_router(3, layer, &s);
            tensors.push((
                router_name(layer),
                enc(&r, dtype),
                dtype,
                vec![s.num_experts, s.hidden],
            ));
            for e in 0..s.num_experts as u32 {
                let (gate, up, down) = synthetic_projections(3, layer, e, &s);
                let (h, i) = (s.hidden, s.intermediate);
                for (proj, v, shp) in [
                    ("gate_proj", &gate, vec![i, h]),
                    ("up_proj", &up, vec![i, h]),
                    ("down_proj", &down, vec![h, i]),
                ] {
                    tensors.push((expert_name(layer, e, proj), enc(v, dtype), dtype, shp));
                }
            }
            let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
                .iter()
                .map(|(n, b, d, shp)| {
                    (
                        n.clone(),
                        safetensors::tensor::TensorView::new(*d, shp.clone(), b).unwrap(),
                    )
                })
                .collect();
            let path = dir.path().join(format!("model-{layer:05}.safetensors"));
            safetensors::serialize_to_file(views, None, &path).unwrap();
        }
        let src = WeightsSource::Safetensors {
            dir: dir.path().to_path_buf(),
        };
        let store = WeightStore::open(&src, &s).unwrap();
        for layer in 0..s.num_layers {
            assert_eq!(
                store.router(layer).unwrap().as_slice(),
                &synthetic_router(3, layer, &s)[..]
            );
            let slots = store.load_slots(layer, &[3, 1, 3]).unwrap();
            assert_eq!(*slots[0], synthetic_expert(3, layer, 3, &s));
            assert_eq!(*slots[1], synthetic_expert(3, layer, 1, &s));
            assert!(Arc::ptr_eq(&slots[0], &slots[2]));
        }
        let err = store.expert(5, 0).unwrap_err().to_string();
        assert!(err.contains("model.layers.5"), "{err}");
        let mut wrong = s;
        wrong.hidden = 4;
        let store = WeightStore::open(&src, &wrong).unwrap();
        assert!(store.router(0).unwrap_err().to_string().contains("shape"));
    }
}
