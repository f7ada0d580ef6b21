//! `moe-load-bench`: how fast a rank loads its share of a real-layout checkpoint, against a
//! plain sequential read of the same bytes in the same run.
//!
//! Generates a sharded Qwen3-MoE-layout checkpoint (one safetensors file per MoE layer, an
//! index, a config.json; per-expert BF16 tensors) in a temp dir, then for each rank of a
//! `--world`-rank linear placement, with the files evicted from the page cache before every
//! pass (`posix_fadvise(DONTNEED)`):
//! * **plain**: the byte ranges of the tensors the rank holds (every layer's router plus its
//!   slots' experts), sorted by file and offset, adjacent ranges merged, each read with
//!   `pread` into one freshly allocated buffer of their total size: the I/O a loader cannot
//!   beat;
//! * **load**: the worker's loader (`Checkpoint::open` + per layer `router_f32` and
//!   `load_slots`), which reads the same tensors and builds the kernels' expert layout.
//!
//! Prints a markdown table (docs/benchmarks/checkpoint-load.md); deletes the checkpoint.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use moe_model::{ModelDescription, Projection};
use moe_worker::checkpoint::Checkpoint;
use moe_worker::config::{ModelShape, Scoring, WeightsSource};
use moe_worker::placement::splitmix64;
use moe_worker::weights::WeightStore;

#[derive(Debug, Parser)]
#[command(name = "moe-load-bench")]
struct Bench {
    /// MoE layers (one shard each).
    #[arg(long, default_value_t = 3)]
    layers: usize,
    #[arg(long, default_value_t = 64)]
    experts: usize,
    #[arg(long, default_value_t = 2048)]
    hidden: usize,
    #[arg(long, default_value_t = 1024)]
    intermediate: usize,
    /// Ranks of the linear placement (each is measured).
    #[arg(long, default_value_t = 4)]
    world: usize,
    /// Passes per rank (the best of each kind is reported).
    #[arg(long, default_value_t = 2)]
    passes: usize,
    /// Directory to generate the checkpoint in (default: the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
}

fn config_json(b: &Bench) -> String {
    serde_json::json!({
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "num_hidden_layers": b.layers,
        "hidden_size": b.hidden,
        "num_experts": b.experts,
        "num_experts_per_tok": 8.min(b.experts),
        "moe_intermediate_size": b.intermediate,
        "norm_topk_prob": true,
        "dtype": "bfloat16",
    })
    .to_string()
}

/// Writes one safetensors file tensor by tensor (the data never sits in memory as a whole).
fn write_shard(path: &Path, tensors: &[(String, Vec<usize>)], seed: u64) -> Result<u64> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in tensors {
        let bytes = 2 * shape.iter().product::<usize>();
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header))?;
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut w = BufWriter::with_capacity(8 << 20, File::create(path)?);
    w.write_all(&(h.len() as u64).to_le_bytes())?;
    w.write_all(&h)?;
    let mut buf = Vec::new();
    for (i, (_, shape)) in tensors.iter().enumerate() {
        let n = shape.iter().product::<usize>();
        buf.clear();
        // Small bf16 values (exponent well inside the range), a pure function of the position.
        for j in 0..n as u64 {
            let r = splitmix64(seed ^ ((i as u64) << 40) ^ j);
            let bits = 0x3c00u16 | (r as u16 & 0x83ff);
            buf.extend_from_slice(&bits.to_le_bytes());
        }
        w.write_all(&buf)?;
    }
    w.flush()?;
    Ok(8 + h.len() as u64 + offset as u64)
}

fn generate(dir: &Path, b: &Bench) -> Result<u64> {
    std::fs::write(dir.join("config.json"), config_json(b))?;
    let desc = ModelDescription::from_path(dir)?;
    let t = &desc.tensors;
    let (h, i) = (b.hidden, b.intermediate);
    let mut weight_map = serde_json::Map::new();
    let mut total = 0;
    for l in 0..b.layers {
        let file = format!("model-{:05}-of-{:05}.safetensors", l + 1, b.layers);
        let mut tensors = vec![(t.router(l, "mlp"), vec![b.experts, h])];
        for e in 0..b.experts {
            for p in Projection::ALL {
                let shape = if p == Projection::Down {
                    vec![h, i]
                } else {
                    vec![i, h]
                };
                tensors.push((t.expert(l, "mlp", e, p), shape));
            }
        }
        for (n, _) in &tensors {
            weight_map.insert(n.clone(), serde_json::Value::String(file.clone()));
        }
        total += write_shard(&dir.join(&file), &tensors, l as u64)?;
    }
    std::fs::write(
        dir.join(moe_model::INDEX_FILE),
        serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map})
            .to_string(),
    )?;
    Ok(total)
}

/// Drops the files' pages from the page cache, so every pass reads from the disk.
fn evict(files: &[PathBuf]) -> Result<()> {
    for f in files {
        let file = File::open(f)?;
        file.sync_all()?;
        // SAFETY: a valid open descriptor; offset 0 and length 0 mean the whole file.
        let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if rc != 0 {
            bail!("posix_fadvise on {f:?} failed: {rc}");
        }
    }
    Ok(())
}

/// The tensors rank `rank` loads: every layer's router and its slots' experts (linear).
fn rank_tensors(desc: &ModelDescription, world: usize, rank: usize) -> Vec<String> {
    let t = &desc.tensors;
    let per = desc.num_experts / world;
    let mut v = Vec::new();
    for l in 0..desc.num_moe_layers() {
        v.push(t.router(l, "mlp"));
        for e in rank * per..(rank + 1) * per {
            for p in Projection::ALL {
                v.push(t.expert(l, "mlp", e, p));
            }
        }
    }
    v
}

/// The plain read: merged byte ranges, one `pread` each. Returns the bytes read.
fn plain_read(ck: &Checkpoint, names: &[String]) -> Result<u64> {
    let mut ranges: Vec<(PathBuf, u64, u64)> = names
        .iter()
        .map(|n| {
            let (f, off, len) = ck.tensor_bytes(n).context("tensor")?;
            Ok((f.to_path_buf(), off, len))
        })
        .collect::<Result<_>>()?;
    ranges.sort();
    let mut merged: Vec<(PathBuf, u64, u64)> = Vec::new();
    for (f, off, len) in ranges {
        match merged.last_mut() {
            Some((lf, lo, ll)) if *lf == f && *lo + *ll == off => *ll += len,
            _ => merged.push((f, off, len)),
        }
    }
    // Into memory the caller keeps, as a loader must (a fresh buffer, like `std::fs::read`).
    let total: u64 = merged.iter().map(|r| r.2).sum();
    let mut buf = vec![0u8; total as usize];
    let mut at = 0usize;
    for (f, off, len) in merged {
        let file = File::open(&f)?;
        file.read_exact_at(&mut buf[at..at + len as usize], off)?;
        at += len as usize;
    }
    std::hint::black_box(&buf);
    Ok(total)
}

fn load(dir: &Path, shape: &ModelShape, world: usize, rank: usize) -> Result<()> {
    let store = WeightStore::open(
        &WeightsSource::Safetensors {
            dir: dir.to_path_buf(),
        },
        shape,
    )?;
    let per = shape.num_experts / world;
    let mine: Vec<u32> = (rank * per..(rank + 1) * per).map(|e| e as u32).collect();
    for l in 0..shape.num_layers {
        std::hint::black_box(store.router_f32(l)?);
        std::hint::black_box(store.load_slots(l, &mine)?);
    }
    Ok(())
}

/// The generated checkpoint's directory, removed however the bench ends.
struct TempDir(PathBuf);

impl TempDir {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn main() -> Result<()> {
    let b = Bench::parse();
    if b.experts % b.world != 0 {
        bail!("--experts {} must divide by --world {}", b.experts, b.world);
    }
    let parent = b.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = TempDir(parent.join(format!("moe-load-bench-{}", std::process::id())));
    std::fs::create_dir_all(dir.path())?;
    let t0 = Instant::now();
    let total = generate(dir.path(), &b)?;
    eprintln!(
        "generated {:.2} GiB in {:.1} s at {:?}",
        total as f64 / (1u64 << 30) as f64,
        t0.elapsed().as_secs_f64(),
        dir.path()
    );
    let desc = ModelDescription::from_path(dir.path())?;
    let ck = Checkpoint::open(dir.path(), desc.clone())?;
    let files = ck.files().to_vec();
    let shape = ModelShape {
        num_layers: desc.num_moe_layers(),
        num_experts: desc.num_experts,
        hidden: desc.hidden,
        intermediate: desc.intermediate,
        top_k: desc.top_k,
        expert_groups: 1,
        topk_groups: 1,
        scoring: Scoring::Softmax,
        redundant: 0,
        world_size: b.world,
        expert_bias: false,
    };
    println!("| rank | bytes held | plain read | loader | loader / plain |\n|---|---|---|---|---|");
    let mut ratios = Vec::new();
    for rank in 0..b.world {
        let names = rank_tensors(&desc, b.world, rank);
        let (mut plain, mut loaded) = (f64::MAX, f64::MAX);
        let mut bytes = 0;
        for _ in 0..b.passes {
            evict(&files)?;
            let t = Instant::now();
            bytes = plain_read(&ck, &names)?;
            plain = plain.min(t.elapsed().as_secs_f64());
            evict(&files)?;
            let t = Instant::now();
            load(dir.path(), &shape, b.world, rank)?;
            loaded = loaded.min(t.elapsed().as_secs_f64());
        }
        let gbs = |s: f64| bytes as f64 / s / 1e9;
        ratios.push(plain / loaded);
        println!(
            "| {rank} | {:.2} GiB | {:.2} GB/s | {:.2} GB/s | {:.0}% |",
            bytes as f64 / (1u64 << 30) as f64,
            gbs(plain),
            gbs(loaded),
            100.0 * plain / loaded
        );
    }
    evict(&files)?;
    let min = ratios.iter().copied().fold(f64::MAX, f64::min);
    println!(
        "\ncheckpoint {:.2} GiB ({} layers x {} experts, hidden {}, intermediate {}, BF16, {} shards + index); world {}; best of {} passes; loader / plain min {:.0}%",
        total as f64 / (1u64 << 30) as f64,
        b.layers,
        b.experts,
        b.hidden,
        b.intermediate,
        b.layers,
        b.world,
        b.passes,
        100.0 * min
    );
    Ok(())
}
