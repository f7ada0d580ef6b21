//! The node's cgroup root (`kubelet --cgroup-root`, cgroupfs driver): one per node, so that
//! kubelets of concurrent clusters do not manage each other's pods. The kubelet wants it to
//! exist in every hierarchy; removing it kills whatever still runs in it.

use std::path::{Path, PathBuf};

const CGROUP_FS: &str = "/sys/fs/cgroup";

/// Every hierarchy directory (cgroup v1 controllers, the named systemd one, cgroup2).
fn hierarchies() -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(CGROUP_FS) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.join("cgroup.procs").exists())
        .collect();
    if v.is_empty() && Path::new(CGROUP_FS).join("cgroup.procs").exists() {
        v.push(PathBuf::from(CGROUP_FS)); // pure cgroup2 host
    }
    v.sort();
    v
}

/// Creates `root` (e.g. `/moe-e2e-3`) in every hierarchy.
pub fn create(root: &str) -> anyhow::Result<()> {
    for h in hierarchies() {
        let dir = h.join(root.trim_start_matches('/'));
        std::fs::create_dir_all(&dir)
            .map_err(|e| anyhow::anyhow!("creating cgroup {}: {e}", dir.display()))?;
        if h.ends_with("cpuset") {
            // A v1 cpuset starts empty; no task could join it or its children.
            for f in ["cpuset.cpus", "cpuset.mems"] {
                let parent = std::fs::read_to_string(h.join(f)).unwrap_or_default();
                let _ = std::fs::write(dir.join(f), parent.trim());
            }
        }
    }
    Ok(())
}

fn subdirs_depth_first(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.filter_map(|e| e.ok()) {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                subdirs_depth_first(&e.path(), out);
            }
        }
    }
    out.push(dir.to_path_buf());
}

/// Process ids in `root` or below, in any hierarchy.
pub fn pids(root: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for h in hierarchies() {
        let mut dirs = Vec::new();
        subdirs_depth_first(&h.join(root.trim_start_matches('/')), &mut dirs);
        for d in dirs {
            if let Ok(s) = std::fs::read_to_string(d.join("cgroup.procs")) {
                pids.extend(s.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
            }
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// SIGKILLs every process in `root` and removes its directories (deepest first).
pub fn remove(root: &str) {
    for _ in 0..50 {
        let pids = pids(root);
        if pids.is_empty() {
            break;
        }
        for p in pids {
            crate::process::kill_pid(p, libc::SIGKILL);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    for h in hierarchies() {
        let mut dirs = Vec::new();
        let top = h.join(root.trim_start_matches('/'));
        if !top.exists() {
            continue;
        }
        subdirs_depth_first(&top, &mut dirs);
        for d in dirs {
            let _ = std::fs::remove_dir(&d);
        }
    }
}
