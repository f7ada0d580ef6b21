//! Where the control-plane binaries are: `$MOE_E2E_BIN_DIR`, else the cache that
//! `e2e/bootstrap.sh` fills (`${MOE_E2E_CACHE:-$HOME/.cache/moe-operator/e2e}/bin`).

use std::path::{Path, PathBuf};

/// Paths of the binaries a local control plane needs (and the optional CLI tools).
#[derive(Debug, Clone)]
pub struct Bins {
    pub dir: PathBuf,
    pub etcd: PathBuf,
    pub kube_apiserver: PathBuf,
    pub kube_controller_manager: PathBuf,
    pub kube_scheduler: PathBuf,
    /// kubectl matching the API server's minor version, if installed.
    pub kubectl: Option<PathBuf>,
    /// helm, if installed.
    pub helm: Option<PathBuf>,
}

/// The cache directory `e2e/bootstrap.sh` installs into.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(c) = std::env::var_os("MOE_E2E_CACHE").filter(|c| !c.is_empty()) {
        return Some(PathBuf::from(c));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".cache/moe-operator/e2e"))
}

/// The directory searched for binaries.
pub fn bin_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("MOE_E2E_BIN_DIR").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d));
    }
    cache_dir().map(|c| c.join("bin"))
}

fn executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

impl Bins {
    /// Finds the binaries, or explains what is missing (`Err` holds a human-readable reason).
    pub fn locate() -> Result<Bins, String> {
        let Some(dir) = bin_dir() else {
            return Err("neither MOE_E2E_BIN_DIR nor HOME is set".into());
        };
        let get = |n: &str| {
            let p = dir.join(n);
            executable(&p).then_some(p)
        };
        let mut missing = Vec::new();
        let mut need = |n: &str| match get(n) {
            Some(p) => p,
            None => {
                missing.push(n.to_string());
                PathBuf::new()
            }
        };
        let etcd = need("etcd");
        let kube_apiserver = need("kube-apiserver");
        let kube_controller_manager = need("kube-controller-manager");
        let kube_scheduler = need("kube-scheduler");
        if !missing.is_empty() {
            return Err(format!(
                "{} not found in {} (run e2e/bootstrap.sh, or set MOE_E2E_BIN_DIR)",
                missing.join(", "),
                dir.display()
            ));
        }
        Ok(Bins {
            kubectl: get("kubectl"),
            helm: get("helm"),
            dir,
            etcd,
            kube_apiserver,
            kube_controller_manager,
            kube_scheduler,
        })
    }
}
