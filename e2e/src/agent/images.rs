//! Container image -> local binary. There is no container runtime: the agent runs a
//! container's command as a host process, so an image only decides which binary is its
//! ENTRYPOINT.
//!
//! Matching (first rule that matches wins), on the image reference without tag or digest:
//! * a rule whose pattern contains `/` matches when the repository equals the pattern
//!   (`ghcr.io/moe-operator/moe-worker` matches `ghcr.io/moe-operator/moe-worker:v1` and
//!   `...@sha256:...`);
//! * a rule whose pattern has no `/` matches the last path segment of the repository
//!   (`moe-worker` matches `ghcr.io/anyone/moe-worker:dev` and `moe-worker:latest`).
//!
//! How the argv is built (mirroring Kubernetes' command/args over ENTRYPOINT/CMD):
//! * no `command`: `[entrypoint] + (args or the rule's default args)`; the image must be mapped;
//! * `command` given: `command[0]` is replaced by the entrypoint when its file name equals the
//!   entrypoint's file name or the image rule's extra `binaries` name it; otherwise it is run as
//!   given (absolute path, or looked up on the host `PATH`: `sleep`, `sh`, `python3` ...).
//!   Images that are not mapped at all are fine in that case (`busybox` + `command: [sleep]`).

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// One image rule.
#[derive(Debug, Clone)]
pub struct ImageRule {
    pub pattern: String,
    /// The binary playing the image's ENTRYPOINT.
    pub entrypoint: Option<PathBuf>,
    /// The image's CMD (used when the container has neither command nor args).
    pub default_args: Vec<String>,
    /// Run nothing: the container is reported Running and Ready until the pod stops (what
    /// kwok does; for scale tests where only the API objects matter).
    pub fake: bool,
}

/// The image table. See the module docs for the matching rules.
#[derive(Debug, Clone, Default)]
pub struct ImageMap {
    rules: Vec<ImageRule>,
    /// Command names mapped to binaries for any image (`moe-worker` -> target/debug/moe-worker).
    binaries: Vec<(String, PathBuf)>,
}

/// `ghcr.io/x/y:tag@sha256:..` -> `ghcr.io/x/y`
pub fn repository(image: &str) -> &str {
    let no_digest = image.split('@').next().unwrap_or(image);
    // A ':' after the last '/' is a tag separator (a ':' before it is a registry port).
    match no_digest.rfind(':') {
        Some(i) if !no_digest[i..].contains('/') => &no_digest[..i],
        _ => no_digest,
    }
}

impl ImageMap {
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps images matching `pattern` to `entrypoint`.
    pub fn image(mut self, pattern: impl Into<String>, entrypoint: impl Into<PathBuf>) -> Self {
        let entrypoint = entrypoint.into();
        let pattern = pattern.into();
        if let Some(name) = entrypoint.file_name().and_then(|n| n.to_str()) {
            self.binaries.push((name.to_string(), entrypoint.clone()));
        }
        self.rules.push(ImageRule {
            pattern,
            entrypoint: Some(entrypoint),
            default_args: Vec::new(),
            fake: false,
        });
        self
    }

    /// Containers of images matching `pattern` run nothing and are reported Running and
    /// Ready (see [`ImageRule::fake`]). Put it before other rules for the same image.
    pub fn fake(mut self, pattern: impl Into<String>) -> Self {
        self.rules.push(ImageRule {
            pattern: pattern.into(),
            entrypoint: None,
            default_args: Vec::new(),
            fake: true,
        });
        self
    }

    /// Whether the image's first matching rule is a fake one.
    pub fn is_fake(&self, image: &str) -> bool {
        self.find_rule(image).is_some_and(|r| r.fake)
    }

    /// Appends `other`'s rules and binaries after this map's (so this map's win).
    pub fn merge(mut self, other: ImageMap) -> Self {
        self.rules.extend(other.rules);
        self.binaries.extend(other.binaries);
        self
    }

    /// Adds a full rule.
    pub fn rule(mut self, rule: ImageRule) -> Self {
        self.rules.push(rule);
        self
    }

    /// Maps a command name (as written in `command[0]`, file name only) to a binary.
    pub fn binary(mut self, name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        self.binaries.push((name.into(), path.into()));
        self
    }

    /// The default table for this workspace: images ending in `moe-worker`, `moe-operator`
    /// and `moectl` run the binaries of the same name from the cargo target directory
    /// (`$CARGO_TARGET_DIR` or `<workspace>/target`, `debug` then `release`) where they exist,
    /// plus the rules in `$MOE_E2E_IMAGE_MAP` (`pattern=/path/to/bin,pattern2=/path2`), which
    /// come first.
    pub fn workspace_default() -> Self {
        let mut m = Self::from_env();
        for name in ["moe-worker", "moe-operator", "moectl"] {
            if let Some(p) = find_workspace_binary(name) {
                m = m.image(name, p);
            }
        }
        m
    }

    /// Rules from `$MOE_E2E_IMAGE_MAP` (`pattern=/path,...`); malformed entries are skipped
    /// with a warning.
    pub fn from_env() -> Self {
        let mut m = Self::new();
        if let Ok(spec) = std::env::var("MOE_E2E_IMAGE_MAP") {
            for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
                match entry.split_once('=') {
                    Some((pat, path)) if !pat.is_empty() && !path.is_empty() => {
                        m = m.image(pat, path);
                    }
                    _ => tracing::warn!(entry, "ignoring malformed MOE_E2E_IMAGE_MAP entry"),
                }
            }
        }
        m
    }

    fn find_rule(&self, image: &str) -> Option<&ImageRule> {
        let repo = repository(image);
        let last = repo.rsplit('/').next().unwrap_or(repo);
        self.rules.iter().find(|r| {
            if r.pattern.contains('/') {
                r.pattern == repo
            } else {
                r.pattern == last
            }
        })
    }

    /// The argv for a container.
    pub fn argv(&self, image: &str, command: &[String], args: &[String]) -> Result<Vec<String>> {
        let rule = self.find_rule(image);
        if command.is_empty() {
            let Some(rule) = rule else {
                bail!(
                    "image {image:?} is not in the agent's image table and the container has no command \
                     (map it with ImageMap::image or MOE_E2E_IMAGE_MAP)"
                );
            };
            let Some(ep) = &rule.entrypoint else {
                bail!(
                    "image rule {:?} has no entrypoint and the container has no command",
                    rule.pattern
                );
            };
            let mut v = vec![ep.display().to_string()];
            v.extend(if args.is_empty() {
                rule.default_args.clone()
            } else {
                args.to_vec()
            });
            return Ok(v);
        }
        let c0 = &command[0];
        let name = Path::new(c0)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or(c0);
        let mapped = rule
            .and_then(|r| r.entrypoint.as_ref())
            .filter(|ep| ep.file_name().and_then(|n| n.to_str()) == Some(name))
            .cloned()
            .or_else(|| {
                self.binaries
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, p)| p.clone())
            });
        let mut v = vec![match mapped {
            Some(p) => p.display().to_string(),
            None => c0.clone(),
        }];
        v.extend(command[1..].iter().cloned());
        v.extend(args.iter().cloned());
        Ok(v)
    }
}

/// `<target>/{debug,release}/<name>` for the workspace's cargo target directory: the one the
/// running executable lives in (a test binary is `<target>/<profile>/deps/<test>-<hash>`),
/// then `$CARGO_TARGET_DIR`, then `<workspace>/target`.
pub fn find_workspace_binary(name: &str) -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(3) {
            candidates.push(dir.join(name));
        }
    }
    let mut targets = Vec::new();
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR").filter(|t| !t.is_empty()) {
        targets.push(PathBuf::from(t));
    }
    targets.push(crate::workspace_root().join("target"));
    for t in targets {
        for profile in ["debug", "release"] {
            candidates.push(t.join(profile).join(name));
        }
    }
    candidates.into_iter().find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn repository_strips_tag_and_digest() {
        assert_eq!(repository("ghcr.io/a/b:v1"), "ghcr.io/a/b");
        assert_eq!(repository("localhost:5000/a/b:v1"), "localhost:5000/a/b");
        assert_eq!(repository("localhost:5000/a/b"), "localhost:5000/a/b");
        assert_eq!(repository("b@sha256:abc"), "b");
        assert_eq!(repository("busybox"), "busybox");
    }

    #[test]
    fn argv_rules() {
        let m = ImageMap::new().image("ghcr.io/moe-operator/moe-worker", "/bin/w/moe-worker");
        assert_eq!(
            m.argv(
                "ghcr.io/moe-operator/moe-worker:dev",
                &[],
                &s(&["--rank", "0"])
            )
            .ok(),
            Some(s(&["/bin/w/moe-worker", "--rank", "0"]))
        );
        assert_eq!(
            m.argv(
                "ghcr.io/moe-operator/moe-worker:dev",
                &s(&["/usr/local/bin/moe-worker", "serve"]),
                &s(&["-v"])
            )
            .ok(),
            Some(s(&["/bin/w/moe-worker", "serve", "-v"]))
        );
        assert_eq!(
            m.argv("busybox:1", &s(&["sleep", "100"]), &[]).ok(),
            Some(s(&["sleep", "100"]))
        );
        assert!(m.argv("busybox:1", &[], &[]).is_err());
        let m2 = ImageMap::new().image("moe-worker", "/x/moe-worker");
        assert_eq!(
            m2.argv("example.com:443/team/moe-worker@sha256:00", &[], &[])
                .ok(),
            Some(s(&["/x/moe-worker"]))
        );
    }
}
