//! A container's environment as the kubelet computes it, plus the mount-path rewriting that
//! stands in for bind mounts.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use anyhow::{Result, anyhow, bail};
use k8s_openapi::api::core::v1::{Container, ObjectFieldSelector, Pod, ResourceFieldSelector};

/// Data the environment may refer to.
pub struct EnvContext<'a> {
    pub pod: &'a Pod,
    pub pod_ip: &'a str,
    pub host_ip: &'a str,
    /// ConfigMap name -> data (missing: not fetched / does not exist).
    pub config_maps: &'a HashMap<String, BTreeMap<String, String>>,
    /// Secret name -> decoded data.
    pub secrets: &'a HashMap<String, BTreeMap<String, String>>,
}

/// Value of a downward-API field path (`metadata.name`, `metadata.labels['k']`, `status.podIP`, ...).
pub fn field_ref(ctx: &EnvContext<'_>, sel: &ObjectFieldSelector) -> Result<String> {
    let p = ctx.pod;
    let path = sel.field_path.as_str();
    let meta = &p.metadata;
    let spec = p.spec.as_ref();
    let map_key = |prefix: &str| -> Option<String> {
        let rest = path.strip_prefix(prefix)?;
        let inner = rest.strip_prefix("['").and_then(|r| r.strip_suffix("']"))?;
        Some(inner.to_string())
    };
    if let Some(k) = map_key("metadata.labels") {
        return Ok(meta
            .labels
            .as_ref()
            .and_then(|l| l.get(&k).cloned())
            .unwrap_or_default());
    }
    if let Some(k) = map_key("metadata.annotations") {
        return Ok(meta
            .annotations
            .as_ref()
            .and_then(|l| l.get(&k).cloned())
            .unwrap_or_default());
    }
    let fmt_map = |m: Option<&BTreeMap<String, String>>| -> String {
        m.map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={v:?}"))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
    };
    Ok(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "metadata.labels" => fmt_map(meta.labels.as_ref()),
        "metadata.annotations" => fmt_map(meta.annotations.as_ref()),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        "status.podIP" | "status.podIPs" => ctx.pod_ip.to_string(),
        "status.hostIP" | "status.hostIPs" => ctx.host_ip.to_string(),
        other => bail!("unsupported fieldRef fieldPath {other:?}"),
    })
}

/// Value of a `resourceFieldRef` (limits/requests of cpu, memory, ephemeral-storage), in the
/// divisor's units (default 1), rounded up as the kubelet does. Without a limit the kubelet
/// reports node allocatable; here a large constant.
pub fn resource_ref(container: &Container, sel: &ResourceFieldSelector) -> Result<String> {
    let res = container.resources.as_ref();
    let (kind, name) = sel
        .resource
        .split_once('.')
        .ok_or_else(|| anyhow!("bad resourceFieldRef {:?}", sel.resource))?;
    let map = match kind {
        "limits" => res.and_then(|r| r.limits.as_ref()),
        "requests" => res.and_then(|r| r.requests.as_ref()),
        _ => bail!("bad resourceFieldRef {:?}", sel.resource),
    };
    let q = map.and_then(|m| m.get(name)).map(|q| q.0.clone());
    let value = match q {
        Some(q) => parse_quantity(&q)?,
        None if name == "cpu" => 64.0,
        None => 512.0 * 1024.0 * 1024.0 * 1024.0,
    };
    let divisor = match &sel.divisor {
        Some(d) => parse_quantity(&d.0)?,
        None => 1.0,
    };
    if divisor <= 0.0 {
        bail!("resourceFieldRef divisor must be positive");
    }
    Ok(format!("{}", (value / divisor).ceil() as i64))
}

/// A Kubernetes quantity as a float (`500m`, `2`, `1Gi`, `1e3`, `10M`).
pub fn parse_quantity(q: &str) -> Result<f64> {
    let q = q.trim();
    const SUFFIXES: &[(&str, f64)] = &[
        ("Ki", 1024.0),
        ("Mi", 1048576.0),
        ("Gi", 1073741824.0),
        ("Ti", 1099511627776.0),
        ("Pi", 1125899906842624.0),
        ("Ei", 1152921504606846976.0),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    for (s, mult) in SUFFIXES {
        if let Some(num) = q.strip_suffix(s) {
            let n: f64 = num.parse().map_err(|_| anyhow!("bad quantity {q:?}"))?;
            return Ok(n * mult);
        }
    }
    q.parse().map_err(|_| anyhow!("bad quantity {q:?}"))
}

/// Kubernetes `$(VAR)` expansion: `$(NAME)` is replaced by NAME's value when defined (left as
/// is otherwise); `$$` is an escaped `$`.
pub fn expand(s: &str, vars: &dyn Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$' && i + 1 < b.len() {
            if b[i + 1] == b'$' {
                out.push('$');
                i += 2;
                continue;
            }
            if b[i + 1] == b'('
                && let Some(end) = s[i + 2..].find(')')
            {
                let name = &s[i + 2..i + 2 + end];
                if let Some(v) = vars(name) {
                    out.push_str(&v);
                    i += end + 3;
                    continue;
                }
            }
        }
        // Push the whole UTF-8 character starting at i.
        let ch = s[i..].chars().next().unwrap_or('\u{fffd}');
        out.push(ch);
        i += ch.len_utf8().max(1);
    }
    out
}

/// Rewrites container mount paths to the host directories backing them: every occurrence of a
/// mount path (longest first) in `s` that is followed by `/`, the end, or a character that
/// cannot continue a path component is replaced by the host path.
pub fn rewrite_mounts(s: &str, mounts: &[(String, PathBuf)]) -> String {
    let mut sorted: Vec<&(String, PathBuf)> = mounts.iter().filter(|(m, _)| m.len() > 1).collect();
    sorted.sort_by_key(|(m, _)| std::cmp::Reverse(m.len()));
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    'outer: while i < s.len() {
        for (m, host) in &sorted {
            let m = m.trim_end_matches('/');
            if s[i..].starts_with(m) {
                let next = s[i + m.len()..].chars().next();
                let boundary = match next {
                    None => true,
                    Some(c) => !(c.is_alphanumeric() || c == '-' || c == '_' || c == '.'),
                };
                // Must also start at a boundary (not in the middle of another path).
                let prev_ok = i == 0 || {
                    let p = s[..i].chars().next_back().unwrap_or(' ');
                    !(p.is_alphanumeric() || p == '-' || p == '_' || p == '.' || p == '/')
                };
                if boundary && prev_ok {
                    out.push_str(&host.display().to_string());
                    i += m.len();
                    continue 'outer;
                }
            }
        }
        let ch = s[i..].chars().next().unwrap_or('\u{fffd}');
        out.push(ch);
        i += ch.len_utf8().max(1);
    }
    out
}

/// Stands in for cluster DNS of StatefulSet pods: every `<hostname>.<subdomain>.<namespace>.svc`
/// (optionally followed by `.cluster.local`) in `s` is replaced by `resolve(namespace,
/// hostname)` — the agent's loopback IP for that pod, allocated on first use so that names of
/// pods not started yet resolve too. Other names are left alone.
pub fn rewrite_pod_dns(s: &str, resolve: &dyn Fn(&str, &str) -> Option<String>) -> String {
    let is_label = |c: char| c.is_ascii_alphanumeric() || c == '-';
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find(".svc") {
        let after = &rest[pos + 4..];
        let (suffix_len, tail) = match after.strip_prefix(".cluster.local") {
            Some(t) => (14, t),
            None => (0, after),
        };
        let end_ok = tail
            .chars()
            .next()
            .is_none_or(|c| !(is_label(c) || c == '.'));
        // Walk back over `a.b.c` (labels and dots) before ".svc".
        let head = &rest[..pos];
        let start = head
            .char_indices()
            .rev()
            .find(|(_, c)| !(is_label(*c) || *c == '.'))
            .map(|(i, c)| i + c.len_utf8())
            .unwrap_or(0);
        let name = &head[start..];
        let labels: Vec<&str> = name.split('.').collect();
        let replaced = if end_ok && labels.len() == 3 && labels.iter().all(|l| !l.is_empty()) {
            resolve(labels[2], labels[0])
        } else {
            None
        };
        match replaced {
            Some(ip) => {
                out.push_str(&head[..start]);
                out.push_str(&ip);
                rest = &rest[pos + 4 + suffix_len..];
            }
            None => {
                out.push_str(&rest[..pos + 4]);
                rest = &rest[pos + 4..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The container's env in definition order (envFrom first, then env, `$(VAR)` expanded against
/// what is defined before, mount paths rewritten), prepended by `base` (service variables etc.).
pub fn container_env(
    ctx: &EnvContext<'_>,
    c: &Container,
    base: &[(String, String)],
    mounts: &[(String, PathBuf)],
) -> Result<Vec<(String, String)>> {
    let mut vars: Vec<(String, String)> = base.to_vec();
    let set = |vars: &mut Vec<(String, String)>, k: String, v: String| {
        if let Some(e) = vars.iter_mut().find(|(n, _)| *n == k) {
            e.1 = v;
        } else {
            vars.push((k, v));
        }
    };
    for src in c.env_from.iter().flatten() {
        let prefix = src.prefix.clone().unwrap_or_default();
        let (data, optional, what) = if let Some(r) = &src.config_map_ref {
            (
                ctx.config_maps.get(&r.name),
                r.optional.unwrap_or(false),
                format!("configmap {}", r.name),
            )
        } else if let Some(r) = &src.secret_ref {
            (
                ctx.secrets.get(&r.name),
                r.optional.unwrap_or(false),
                format!("secret {}", r.name),
            )
        } else {
            continue;
        };
        match data {
            Some(d) => {
                for (k, v) in d {
                    set(&mut vars, format!("{prefix}{k}"), v.clone());
                }
            }
            None if optional => {}
            None => bail!("envFrom: {what} not found"),
        }
    }
    for e in c.env.iter().flatten() {
        let value = if let Some(v) = &e.value {
            let lookup = |n: &str| vars.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
            expand(v, &lookup)
        } else if let Some(from) = &e.value_from {
            if let Some(f) = &from.field_ref {
                field_ref(ctx, f)?
            } else if let Some(r) = &from.resource_field_ref {
                resource_ref(c, r)?
            } else if let Some(r) = &from.config_map_key_ref {
                match ctx.config_maps.get(&r.name).and_then(|d| d.get(&r.key)) {
                    Some(v) => v.clone(),
                    None if r.optional.unwrap_or(false) => continue,
                    None => bail!(
                        "env {}: configmap key {}/{} not found",
                        e.name,
                        r.name,
                        r.key
                    ),
                }
            } else if let Some(r) = &from.secret_key_ref {
                match ctx.secrets.get(&r.name).and_then(|d| d.get(&r.key)) {
                    Some(v) => v.clone(),
                    None if r.optional.unwrap_or(false) => continue,
                    None => bail!("env {}: secret key {}/{} not found", e.name, r.name, r.key),
                }
            } else {
                bail!("env {}: unsupported valueFrom", e.name)
            }
        } else {
            String::new()
        };
        set(&mut vars, e.name.clone(), rewrite_mounts(&value, mounts));
    }
    Ok(vars)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion() {
        let f = |n: &str| (n == "A").then(|| "x".to_string());
        assert_eq!(expand("$(A)-$(B)-$$(A)-$", &f), "x-$(B)-$(A)-$");
        assert_eq!(expand("é$(A)", &f), "éx");
    }

    #[test]
    fn mounts() {
        let m = vec![
            ("/etc/moe".to_string(), PathBuf::from("/tmp/p/v/cfg")),
            ("/etc/moe/secret".to_string(), PathBuf::from("/tmp/p/v/sec")),
        ];
        assert_eq!(
            rewrite_mounts("--config=/etc/moe/map.json", &m),
            "--config=/tmp/p/v/cfg/map.json"
        );
        assert_eq!(
            rewrite_mounts("/etc/moe/secret/token", &m),
            "/tmp/p/v/sec/token"
        );
        assert_eq!(rewrite_mounts("/etc/moe", &m), "/tmp/p/v/cfg");
        assert_eq!(rewrite_mounts("/etc/moex/a", &m), "/etc/moex/a");
        assert_eq!(rewrite_mounts("/x/etc/moe/a", &m), "/x/etc/moe/a");
    }

    #[test]
    fn pod_dns() {
        let r = |ns: &str, host: &str| (ns == "ml").then(|| format!("127.9.0.{}", host.len()));
        assert_eq!(
            rewrite_pod_dns("demo-0.demo-workers.ml.svc:29500", &r),
            "127.9.0.6:29500"
        );
        assert_eq!(
            rewrite_pod_dns("http://a.b.ml.svc.cluster.local/x and a.b.other.svc", &r),
            "http://127.9.0.1/x and a.b.other.svc"
        );
        assert_eq!(rewrite_pod_dns("svc.ml.svc", &r), "svc.ml.svc");
        assert_eq!(rewrite_pod_dns("a.b.ml.svcx", &r), "a.b.ml.svcx");
        assert_eq!(rewrite_pod_dns("no dns here", &r), "no dns here");
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("500m").ok(), Some(0.5));
        assert_eq!(parse_quantity("1Gi").ok(), Some(1073741824.0));
        assert_eq!(parse_quantity("3").ok(), Some(3.0));
        assert!(parse_quantity("x").is_err());
    }
}
