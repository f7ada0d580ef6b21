//! Pod volumes materialised as directories under `<pod dir>/volumes/<volume name>`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{
    ConfigMap, KeyToPath, PersistentVolume, PersistentVolumeClaim, Pod, Secret, ServiceAccount,
    Volume,
};
use kube::Client;
use kube::api::{Api, PostParams};

use super::env::{EnvContext, field_ref};

/// Writes `data` into `path` if it differs (atomically, via a temporary file and rename).
fn write_if_changed(path: &Path, data: &[u8]) -> Result<()> {
    if std::fs::read(path).ok().as_deref() == Some(data) {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = path.with_extension("moe-e2e-tmp");
    std::fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Writes key/value files; with `items`, only the listed keys at their paths. With `prune`,
/// files for keys no longer present are removed (not in a shared projected directory).
fn write_keys(
    dir: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<KeyToPath>>,
    prune: bool,
) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    match items {
        Some(items) => {
            for it in items {
                if it.path.contains("..") {
                    bail!("volume item path {:?} must not contain '..'", it.path);
                }
                if let Some(v) = data.get(&it.key) {
                    write_if_changed(&dir.join(&it.path), v)?;
                }
            }
        }
        None => {
            for (k, v) in data {
                write_if_changed(&dir.join(k), v)?;
            }
            if prune {
                for e in std::fs::read_dir(dir)?.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if e.path().is_file() && !data.contains_key(&name) {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        }
    }
    Ok(())
}

pub(crate) fn config_map_data(cm: &ConfigMap) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = cm
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
        .collect();
    for (k, v) in cm.binary_data.iter().flatten() {
        out.insert(k.clone(), v.0.clone());
    }
    out
}

pub(crate) fn secret_data(s: &Secret) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = s
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    for (k, v) in s.string_data.iter().flatten() {
        out.insert(k.clone(), v.clone().into_bytes());
    }
    out
}

/// A kubeconfig with a fresh token of the pod's service account (TokenRequest bound to the
/// pod). `None` when the cluster parameters are unknown.
pub(crate) async fn service_account_kubeconfig(
    client: &Client,
    pod: &Pod,
    api_port: u16,
    ca_pem: &str,
    expiration: i64,
) -> Result<String> {
    use base64::Engine as _;
    let ns = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let token = request_token(client, pod, &ns, &sa, expiration).await?;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem.as_bytes());
    Ok(format!(
        "apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: https://127.0.0.1:{api_port}
    certificate-authority-data: {ca}
users:
- name: {sa}
  user:
    token: {token}
contexts:
- name: local
  context:
    cluster: local
    user: {sa}
    namespace: {ns}
current-context: local
"
    ))
}

async fn request_token(
    client: &Client,
    pod: &Pod,
    ns: &str,
    sa: &str,
    expiration: i64,
) -> Result<String> {
    let tr: TokenRequest = serde_json::from_value(serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "audiences": [],
            "expirationSeconds": expiration.max(600),
            "boundObjectRef": {
                "apiVersion": "v1", "kind": "Pod",
                "name": pod.metadata.name, "uid": pod.metadata.uid,
            },
        },
    }))?;
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let body = tr;
    let out: TokenRequest = api
        .create_subresource("token", sa, &PostParams::default(), &body)
        .await
        .with_context(|| format!("requesting a token for service account {ns}/{sa}"))?;
    Ok(out.status.map(|s| s.token).unwrap_or_default())
}

/// Context needed to fill volumes.
pub(crate) struct VolumeCtx<'a> {
    pub client: &'a Client,
    pub pod: &'a Pod,
    pub pod_ip: &'a str,
    pub pod_dir: &'a Path,
    /// First fill (errors for missing required objects) or a refresh (keep old contents).
    pub refresh: bool,
}

/// Creates or refreshes every volume; returns volume name -> host directory (or file path
/// for hostPath files).
pub(crate) async fn materialize(ctx: &VolumeCtx<'_>) -> Result<HashMap<String, PathBuf>> {
    let ns = ctx
        .pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let mut out = HashMap::new();
    let vols: Vec<Volume> = ctx
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default();
    for v in vols {
        let dir = ctx.pod_dir.join("volumes").join(&v.name);
        if let Some(hp) = &v.host_path {
            let p = PathBuf::from(&hp.path);
            if matches!(hp.type_.as_deref(), Some("DirectoryOrCreate")) {
                std::fs::create_dir_all(&p)?;
            }
            out.insert(v.name.clone(), p);
            continue;
        }
        if let Some(src) = &v.persistent_volume_claim {
            // A claim stands for its bound volume: the stand-in can mount only hostPath ones.
            // Once mounted it stays (a kubelet does not re-resolve a mounted claim either):
            // a refresh that cannot resolve it leaves the pod's mount as it is.
            match claim_host_path(ctx.client, &ns, &src.claim_name).await {
                Ok(path) => {
                    out.insert(v.name.clone(), path);
                }
                Err(e) if ctx.refresh => {
                    tracing::debug!(volume = %v.name, "claim not re-resolved: {e:#}");
                }
                Err(e) => return Err(e),
            }
            continue;
        }
        std::fs::create_dir_all(&dir)?;
        if let Some(src) = &v.config_map {
            match cms.get_opt(&src.name).await? {
                Some(cm) => write_keys(&dir, &config_map_data(&cm), src.items.as_ref(), true)?,
                None if src.optional.unwrap_or(false) || ctx.refresh => {}
                None => bail!("configmap {ns}/{} not found", src.name),
            }
        } else if let Some(src) = &v.secret {
            let name = src.secret_name.clone().unwrap_or_default();
            match secrets.get_opt(&name).await? {
                Some(s) => write_keys(&dir, &secret_data(&s), src.items.as_ref(), true)?,
                None if src.optional.unwrap_or(false) || ctx.refresh => {}
                None => bail!("secret {ns}/{name} not found"),
            }
        } else if let Some(src) = &v.downward_api {
            write_downward(ctx, &dir, src.items.as_ref())?;
        } else if let Some(proj) = &v.projected {
            for s in proj.sources.iter().flatten() {
                if let Some(src) = &s.config_map {
                    match cms.get_opt(&src.name).await? {
                        Some(cm) => {
                            write_keys(&dir, &config_map_data(&cm), src.items.as_ref(), false)?
                        }
                        None if src.optional.unwrap_or(false) || ctx.refresh => {}
                        None => bail!("configmap {ns}/{} not found", src.name),
                    }
                }
                if let Some(src) = &s.secret {
                    match secrets.get_opt(&src.name).await? {
                        Some(sec) => {
                            write_keys(&dir, &secret_data(&sec), src.items.as_ref(), false)?
                        }
                        None if src.optional.unwrap_or(false) || ctx.refresh => {}
                        None => bail!("secret {ns}/{} not found", src.name),
                    }
                }
                if let Some(src) = &s.downward_api {
                    write_downward(ctx, &dir, src.items.as_ref())?;
                }
                if let Some(src) = &s.service_account_token {
                    // Tokens are requested once per pod start (refresh keeps the first one).
                    let file = dir.join(&src.path);
                    if !ctx.refresh || !file.exists() {
                        let ns2 = ns.clone();
                        let sa = ctx
                            .pod
                            .spec
                            .as_ref()
                            .and_then(|s| s.service_account_name.clone())
                            .unwrap_or_else(|| "default".into());
                        let token = request_token(
                            ctx.client,
                            ctx.pod,
                            &ns2,
                            &sa,
                            src.expiration_seconds.unwrap_or(3600),
                        )
                        .await?;
                        write_if_changed(&file, token.as_bytes())?;
                    }
                }
                if s.cluster_trust_bundle.is_some() || s.pod_certificate.is_some() {
                    tracing::warn!(volume = %v.name, "projected source not supported by the moe-e2e agent");
                }
            }
        } else if v.empty_dir.is_none() {
            tracing::warn!(volume = %v.name, "volume type not supported by the moe-e2e agent; using an empty directory");
        }
        out.insert(v.name.clone(), dir);
    }
    Ok(out)
}

fn write_downward(
    ctx: &VolumeCtx<'_>,
    dir: &Path,
    items: Option<&Vec<k8s_openapi::api::core::v1::DownwardAPIVolumeFile>>,
) -> Result<()> {
    let empty = HashMap::new();
    let ectx = EnvContext {
        pod: ctx.pod,
        pod_ip: ctx.pod_ip,
        host_ip: "127.0.0.1",
        config_maps: &empty,
        secrets: &empty,
    };
    for it in items.into_iter().flatten() {
        if it.path.contains("..") {
            bail!("downwardAPI path {:?} must not contain '..'", it.path);
        }
        let value = match &it.field_ref {
            Some(f) => field_ref(&ectx, f)?,
            None => continue,
        };
        write_if_changed(&dir.join(&it.path), value.as_bytes())?;
    }
    Ok(())
}

/// The host directory of claim `ns/claim`'s bound hostPath PersistentVolume.
async fn claim_host_path(client: &Client, ns: &str, claim: &str) -> Result<PathBuf> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    let pvc = claims
        .get_opt(claim)
        .await?
        .with_context(|| format!("persistentvolumeclaim {ns}/{claim} not found"))?;
    let volume_name = claim_volume_name(&pvc)?;
    let pv = Api::<PersistentVolume>::all(client.clone())
        .get_opt(volume_name)
        .await?
        .with_context(|| {
            format!("persistentvolume {volume_name} (bound to claim {ns}/{claim}) not found")
        })?;
    pv_host_path(&pv, ns, claim)
}

/// The volume a claim is bound to (`spec.volumeName`); an error while it is unbound, so the
/// container waits in `ContainerCreating` as it would on a kubelet.
pub(crate) fn claim_volume_name(pvc: &PersistentVolumeClaim) -> Result<&str> {
    let name = pvc.metadata.name.as_deref().unwrap_or_default();
    pvc.spec
        .as_ref()
        .and_then(|s| s.volume_name.as_deref())
        .filter(|v| !v.is_empty())
        .with_context(|| {
            format!(
                "persistentvolumeclaim {name} is not bound to a volume yet (no spec.volumeName)"
            )
        })
}

/// The host directory of a hostPath PersistentVolume that claims `ns/claim` (its `claimRef`
/// must name that claim, or be unset when the claim names the volume); other volume kinds are
/// refused with a reason, since the stand-in has no volume plugins.
pub(crate) fn pv_host_path(pv: &PersistentVolume, ns: &str, claim: &str) -> Result<PathBuf> {
    let name = pv.metadata.name.as_deref().unwrap_or_default();
    let spec = pv
        .spec
        .as_ref()
        .with_context(|| format!("persistentvolume {name} has no spec"))?;
    if let Some(r) = &spec.claim_ref
        && (r.namespace.as_deref() != Some(ns) || r.name.as_deref() != Some(claim))
    {
        bail!(
            "persistentvolume {name} is claimed by {}/{}, not by {ns}/{claim}",
            r.namespace.as_deref().unwrap_or_default(),
            r.name.as_deref().unwrap_or_default()
        );
    }
    match &spec.host_path {
        Some(hp) => Ok(PathBuf::from(&hp.path)),
        None => bail!(
            "persistentvolume {name} is not a hostPath volume: the moe-e2e agent mounts only hostPath persistent volumes"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pvc(volume_name: Option<&str>) -> PersistentVolumeClaim {
        serde_json::from_value(json!({
            "metadata": {"name": "weights", "namespace": "ml"},
            "spec": {"volumeName": volume_name, "storageClassName": ""},
        }))
        .unwrap()
    }

    fn pv(spec: serde_json::Value) -> PersistentVolume {
        serde_json::from_value(json!({"metadata": {"name": "w-pv"}, "spec": spec})).unwrap()
    }

    #[test]
    fn a_bound_claim_resolves_to_its_host_path_volume() {
        let c = pvc(Some("w-pv"));
        assert_eq!(claim_volume_name(&c).unwrap(), "w-pv");
        let v = pv(json!({"hostPath": {"path": "/data/ckpt"},
                          "claimRef": {"namespace": "ml", "name": "weights"}}));
        assert_eq!(
            pv_host_path(&v, "ml", "weights").unwrap(),
            PathBuf::from("/data/ckpt")
        );
        // A volume pre-bound from the claim's side only (no claimRef yet) resolves as well.
        let v = pv(json!({"hostPath": {"path": "/data/ckpt"}}));
        assert_eq!(
            pv_host_path(&v, "ml", "weights").unwrap(),
            PathBuf::from("/data/ckpt")
        );
    }

    #[test]
    fn unbound_foreign_or_non_host_path_volumes_are_refused() {
        let e = claim_volume_name(&pvc(None)).unwrap_err().to_string();
        assert!(e.contains("not bound"), "{e}");
        let v = pv(json!({"hostPath": {"path": "/x"},
                          "claimRef": {"namespace": "other", "name": "weights"}}));
        let e = pv_host_path(&v, "ml", "weights").unwrap_err().to_string();
        assert!(e.contains("claimed by other/weights"), "{e}");
        let v = pv(json!({"nfs": {"server": "s", "path": "/x"}}));
        let e = pv_host_path(&v, "ml", "weights").unwrap_err().to_string();
        assert!(e.contains("only hostPath"), "{e}");
    }
}
