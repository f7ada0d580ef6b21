//! The tokens of each MoEDeployment, derived instead of stored, so that the operator never
//! reads a Secret of a managed namespace.
//!
//! One master key lives in a Secret in the operator's own namespace (its name from the chart's
//! values); the operator creates it on first start and is allowed to read that one Secret only.
//! Every per-deployment token is `hex(HMAC-SHA256(key, purpose, namespace, name, uid[, rotation]))`:
//! the operator computes it whenever it needs it, writes it into the deployment's Secret with
//! `create` (a Secret of ours that exists already holds the same value: the derivation never
//! changes), and never reads it back. The RBAC this needs: `create` on Secrets in the managed
//! namespaces, and `get`/`create` of the master Secret in its own. docs/operator.md
//! ("Tokens") has the whole story, migration and rotation included.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use rand::RngCore;
use sha2::Sha256;

/// Key of the master key's bytes in its Secret.
pub const MASTER_KEY_FIELD: &str = "key";
/// Bytes of a master key the operator makes; a shorter one found in the Secret is refused.
pub const MASTER_KEY_LEN: usize = 32;
/// Changing this annotation's value on a MoEDeployment derives new tokens for it (rotation:
/// see docs/operator.md "Tokens").
pub const ROTATION_ANNOTATION: &str = "moe-operator.github.io/token-rotation";

/// What a token is for (part of the derivation: the two tokens of a deployment differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// The workers' control API (`POST /v1/remap`) and the group's rendezvous key.
    Control,
    /// The forward API's callers (attention instances).
    Client,
}

impl Purpose {
    fn label(self) -> &'static str {
        match self {
            Purpose::Control => "control",
            Purpose::Client => "client",
        }
    }
}

/// The master key.
#[derive(Clone)]
pub struct MasterKey(Vec<u8>);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

/// Whose token: the deployment's identity, uid included (a deployment deleted and created again
/// under the same name gets new tokens).
#[derive(Debug, Clone, Copy)]
pub struct Owner<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
    /// The value of [`ROTATION_ANNOTATION`], if set.
    pub rotation: Option<&'a str>,
}

impl MasterKey {
    /// A key of these bytes (at least [`MASTER_KEY_LEN`]).
    pub fn new(bytes: Vec<u8>) -> Result<Self, String> {
        if bytes.len() < MASTER_KEY_LEN {
            return Err(format!(
                "the master key has {} bytes, fewer than {MASTER_KEY_LEN}",
                bytes.len()
            ));
        }
        Ok(Self(bytes))
    }

    /// A fresh random key (the first start; tests).
    pub fn random() -> Self {
        let mut bytes = vec![0u8; MASTER_KEY_LEN];
        rand::rng().fill_bytes(&mut bytes);
        Self(bytes)
    }

    /// The token for `purpose` of `owner`, as 64 hex digits.
    pub fn token(&self, purpose: Purpose, owner: Owner<'_>) -> String {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        // Each field with its length first: no two different inputs give the same message.
        let fields = [
            "moe-operator-token/v1",
            purpose.label(),
            owner.namespace,
            owner.name,
            owner.uid,
            owner.rotation.unwrap_or(""),
        ];
        for f in fields {
            m.update(&(f.len() as u64).to_le_bytes());
            m.update(f.as_bytes());
        }
        m.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// Why the master key could not be had (one line, with the fix).
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading or creating the token master key Secret {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "the token master key Secret {namespace}/{name} {problem}: delete it and restart the operator (new tokens for every MoEDeployment: see docs/operator.md \"Tokens\")"
    )]
    Invalid {
        namespace: String,
        name: String,
        problem: String,
    },
}

fn key_of(secret: &Secret) -> Result<MasterKey, String> {
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(MASTER_KEY_FIELD))
        .ok_or_else(|| format!("has no `{MASTER_KEY_FIELD}`"))?;
    MasterKey::new(bytes.0.clone()).map_err(|e| format!("is unusable: {e}"))
}

/// The master Secret the operator creates (labels say what it is; no owner: it outlives
/// operator upgrades, and `helm uninstall` leaves it so that reinstalling keeps every token).
pub fn master_secret(namespace: &str, name: &str, key: &MasterKey) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([
                ("app.kubernetes.io/name".into(), "moe-operator".into()),
                (
                    "app.kubernetes.io/component".into(),
                    "token-master-key".into(),
                ),
            ])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            MASTER_KEY_FIELD.to_string(),
            ByteString(key.0.clone()),
        )])),
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

/// Reads the master key from `namespace/name`, creating it with a random key when missing.
/// Two replicas starting together both try to create it: the loser (409) reads the winner's.
pub async fn load_or_create(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<MasterKey, KeyError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let api_error = |source| KeyError::Api {
        namespace: namespace.into(),
        name: name.into(),
        source,
    };
    let invalid = |problem| KeyError::Invalid {
        namespace: namespace.into(),
        name: name.into(),
        problem,
    };
    if let Some(found) = api.get_opt(name).await.map_err(api_error)? {
        return key_of(&found).map_err(invalid);
    }
    let key = MasterKey::random();
    let pp = PostParams {
        field_manager: Some(crate::resources::FIELD_MANAGER.into()),
        ..Default::default()
    };
    match api.create(&pp, &master_secret(namespace, name, &key)).await {
        Ok(created) => {
            tracing::info!(secret = %format!("{namespace}/{}", created.name_any()), "created the token master key");
            Ok(key)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let theirs = api.get(name).await.map_err(api_error)?;
            key_of(&theirs).map_err(invalid)
        }
        Err(e) => Err(api_error(e)),
    }
}

/// How long a token Secret found created is not created again. Each attempt is a POST
/// (answered 409 while the Secret exists); a Secret someone deleted is made again after this
/// at the latest, and at once when the workers show a mismatch.
pub const RECREATE_AFTER: Duration = Duration::from_secs(60);

/// Token Secrets created (or found to exist) recently, by `namespace/name`: the id of the
/// token they were created for, and when.
#[derive(Default)]
pub struct CreatedSecrets(Mutex<HashMap<String, (String, Instant)>>);

impl CreatedSecrets {
    /// Whether `namespace/name` was made for `token` within [`RECREATE_AFTER`].
    pub fn fresh(&self, key: &str, token: &str) -> bool {
        let id = token_id(token);
        self.0.lock().ok().is_some_and(|m| {
            m.get(key)
                .is_some_and(|(t, at)| *t == id && at.elapsed() < RECREATE_AFTER)
        })
    }

    pub fn record(&self, key: &str, token: &str) {
        if let Ok(mut m) = self.0.lock() {
            m.insert(key.to_string(), (token_id(token), Instant::now()));
        }
    }

    /// Create these again at the next reconcile (their holder showed another token).
    pub fn forget(&self, keys: &[String]) {
        if let Ok(mut m) = self.0.lock() {
            for k in keys {
                m.remove(k);
            }
        }
    }
}

/// A short, one-way id of a token (what a worker reports in its status, so that the operator
/// can tell that a rank holds another token than the one it derived without either sending
/// the token).
pub fn token_id(token: &str) -> String {
    moe_api::token_id(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner<'a>(ns: &'a str, name: &'a str, uid: &'a str) -> Owner<'a> {
        Owner {
            namespace: ns,
            name,
            uid,
            rotation: None,
        }
    }

    #[test]
    fn tokens_are_stable_for_one_key_and_owner() {
        let key = MasterKey::new(vec![7; 32]).unwrap();
        let a = key.token(Purpose::Control, owner("ml", "demo", "uid-1"));
        assert_eq!(a, key.token(Purpose::Control, owner("ml", "demo", "uid-1")));
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        // The same bytes under another key object give the same token (a restarted operator).
        let again = MasterKey::new(vec![7; 32]).unwrap();
        assert_eq!(
            a,
            again.token(Purpose::Control, owner("ml", "demo", "uid-1"))
        );
    }

    #[test]
    fn every_input_changes_the_token() {
        let key = MasterKey::new(vec![7; 32]).unwrap();
        let base = key.token(Purpose::Control, owner("ml", "demo", "uid-1"));
        let others = [
            key.token(Purpose::Client, owner("ml", "demo", "uid-1")),
            key.token(Purpose::Control, owner("ml2", "demo", "uid-1")),
            key.token(Purpose::Control, owner("ml", "demo2", "uid-1")),
            key.token(Purpose::Control, owner("ml", "demo", "uid-2")),
            // Moving a character between fields is another input.
            key.token(Purpose::Control, owner("m", "ldemo", "uid-1")),
            key.token(
                Purpose::Control,
                Owner {
                    rotation: Some("2026-12"),
                    ..owner("ml", "demo", "uid-1")
                },
            ),
            MasterKey::new(vec![8; 32])
                .unwrap()
                .token(Purpose::Control, owner("ml", "demo", "uid-1")),
        ];
        for (i, o) in others.iter().enumerate() {
            assert_ne!(&base, o, "input {i} did not change the token");
        }
        let mut all = others.to_vec();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), others.len());
    }

    #[test]
    fn short_or_missing_master_keys_are_refused_with_the_field() {
        assert!(MasterKey::new(vec![1; 16]).is_err());
        let mut s = master_secret("moe-system", "k", &MasterKey::random());
        assert!(key_of(&s).is_ok());
        s.data = Some(BTreeMap::from([(
            MASTER_KEY_FIELD.to_string(),
            ByteString(vec![1; 5]),
        )]));
        assert!(key_of(&s).unwrap_err().contains("5 bytes"));
        s.data = None;
        assert!(key_of(&s).unwrap_err().contains("`key`"));
    }

    #[test]
    fn random_keys_differ() {
        let owner = owner("ml", "demo", "uid-1");
        assert_ne!(
            MasterKey::random().token(Purpose::Control, owner),
            MasterKey::random().token(Purpose::Control, owner)
        );
    }
}
