//! Images on the node without importing them for every cluster: importing the worker image
//! (650 MB compressed, 900 MB of CUDA libraries) takes ~40 s on a loaded 2-core machine. The
//! archives are imported once into a *seed* containerd root in the e2e cache (keyed by the
//! archives' names, sizes and modification times), and each node's containerd root starts as
//! a hard-linked copy of it: content blobs and unpacked layers are only ever read, so they can
//! be shared; the two metadata databases are copied, because containerd writes them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::NodeBins;
use crate::process::ManagedProcess;

/// The files containerd writes in its root; everything else is shared.
const WRITTEN: [&str; 2] = [
    "io.containerd.metadata.v1.bolt/meta.db",
    "io.containerd.snapshotter.v1.overlayfs/metadata.db",
];

fn key(archives: &[PathBuf]) -> Result<String> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for a in archives {
        let m = std::fs::metadata(a).with_context(|| format!("{}", a.display()))?;
        a.hash(&mut h);
        m.len().hash(&mut h);
        m.modified()?.hash(&mut h);
    }
    Ok(format!("{:016x}", h.finish()))
}

/// Returns a containerd root holding `archives` (imported in namespace `k8s.io`), creating it
/// under `cache` the first time. Older seeds are removed.
pub fn seed_root(nb: &NodeBins, archives: &[PathBuf], cache: &Path) -> Result<PathBuf> {
    let base = cache.join("node-images");
    std::fs::create_dir_all(&base)?;
    let lock = std::fs::File::create(base.join(".lock"))?;
    // SAFETY: flock(2) on a descriptor we own; blocks until other test processes are done.
    unsafe {
        use std::os::fd::AsRawFd;
        libc::flock(lock.as_raw_fd(), libc::LOCK_EX);
    }
    let k = key(archives)?;
    let seed = base.join(&k);
    if seed.join(".complete").exists() {
        return Ok(seed.join("root"));
    }
    for e in std::fs::read_dir(&base)?.filter_map(|e| e.ok()) {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let t0 = std::time::Instant::now();
    let tmp = tempfile::Builder::new().prefix("moe-e2e-seed-").tempdir()?;
    let sock = tmp.path().join("containerd.sock");
    let config = tmp.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "version = 2\nroot = \"{}\"\nstate = \"{}\"\n[grpc]\n  address = \"{}\"\n[ttrpc]\n  address = \"{}.ttrpc\"\n",
            seed.join("root").display(),
            tmp.path().join("state").display(),
            sock.display(),
            sock.display()
        ),
    )?;
    let mut cmd = Command::new(&nb.containerd);
    cmd.arg("--config").arg(&config);
    let mut ctrd = ManagedProcess::spawn("containerd (image seed)", cmd, &tmp.path().join("log"))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !sock.exists() {
        ctrd.ensure_running()?;
        if std::time::Instant::now() > deadline {
            bail!("containerd for the image seed did not start");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for a in archives {
        let out = Command::new(&nb.ctr)
            .arg("--address")
            .arg(&sock)
            .args(["-n", "k8s.io", "images", "import"])
            .arg(a)
            .output()?;
        if !out.status.success() {
            bail!(
                "ctr images import {}: {}",
                a.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    // A clean shutdown, so the databases are consistent when copied.
    ctrd.stop(Duration::from_secs(10));
    std::fs::write(seed.join(".complete"), "")?;
    tracing::info!(
        seed = %seed.display(),
        secs = t0.elapsed().as_secs_f32(),
        "imported the images into the node image seed"
    );
    Ok(seed.join("root"))
}

/// Makes `dest` a containerd root with the seed's images: hard links, except the databases.
pub fn clone_root(seed: &Path, dest: &Path) -> Result<()> {
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let out = Command::new("cp")
        .arg("-al")
        .arg(seed)
        .arg(dest)
        .output()
        .context("cp -al")?;
    if !out.status.success() {
        // Another filesystem than the cache's: copy instead.
        let _ = std::fs::remove_dir_all(dest);
        let copy = Command::new("cp").arg("-a").arg(seed).arg(dest).output()?;
        if copy.status.success() {
            return Ok(());
        }
        bail!(
            "hard-linking {} to {}: {}",
            seed.display(),
            dest.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for f in WRITTEN {
        let (s, d) = (seed.join(f), dest.join(f));
        if s.exists() {
            std::fs::remove_file(&d)?;
            std::fs::copy(&s, &d).with_context(|| format!("copying {}", s.display()))?;
        }
    }
    Ok(())
}
