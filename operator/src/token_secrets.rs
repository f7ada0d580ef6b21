//! The reconciler's part for the tokens ([`crate::tokens`] derives them): each deployment's
//! control and client token, creating their Secrets (create only: the operator never reads or
//! rewrites a Secret), and telling from the workers' status or a 401 that a rank holds another
//! token, which means the Secret of that name is not the operator's (`Degraded/TokenMismatch`).

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, PostParams};
use tracing::info;

use crate::conditions::Problem;
use crate::crd::MoEDeployment;
use crate::resources::{self, Names, Resolved};
use crate::tokens::{CreatedSecrets, MasterKey, Owner, Purpose, ROTATION_ANNOTATION, token_id};

/// The deployment's tokens, derived (never read back from its Secrets).
pub(crate) struct Tokens {
    pub control: String,
    pub client: String,
}

impl Tokens {
    pub fn of(key: &MasterKey, moed: &MoEDeployment, r: &Resolved) -> Self {
        let owner = Owner {
            namespace: &r.namespace,
            name: &r.name,
            uid: &r.owner.uid,
            rotation: moed
                .annotations()
                .get(ROTATION_ANNOTATION)
                .map(String::as_str),
        };
        Self {
            control: key.token(Purpose::Control, owner),
            client: key.token(Purpose::Client, owner),
        }
    }
}

/// Creates a token Secret unless one of that name exists (409). The operator never reads or
/// rewrites it: a Secret of ours already holds this very token (the derivation does not
/// change); one that is not ours shows as a token mismatch in the workers' status
/// ([`mismatch`]).
pub(crate) async fn create_secret(
    api: &Api<Secret>,
    secret: &Secret,
    token: &str,
    created: &CreatedSecrets,
) -> Result<(), crate::error::Error> {
    let key = format!(
        "{}/{}",
        secret.namespace().unwrap_or_default(),
        secret.name_any()
    );
    if created.fresh(&key, token) {
        return Ok(());
    }
    let pp = PostParams {
        field_manager: Some(resources::FIELD_MANAGER.into()),
        ..Default::default()
    };
    match api.create(&pp, secret).await {
        Ok(_) => {
            info!(secret = %key, "created a token Secret");
            created.record(&key, token);
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {
            created.record(&key, token);
            Ok(())
        }
        Err(e) => Err(
            match crate::apply_refusal::Refusal::from_error("Secret", key, e) {
                Ok(refusal) => crate::error::Error::Refused(refusal),
                Err(e) => crate::error::Error::Kube(e),
            },
        ),
    }
}

/// Reason of the Degraded condition when a rank holds another token than the operator derived.
pub const TOKEN_MISMATCH: &str = "TokenMismatch";

/// The problem when some rank reports (by id, see [`moe_api::token_id`]) another control or
/// client token than the operator's: the Secret of that name was not made by this operator
/// for this deployment (a user's Secret, or a random token of an operator release before
/// derived tokens). `None` when every rank that reports ids agrees (a worker release before
/// token ids reports none: only a 401 then shows the mismatch).
pub(crate) fn mismatch(
    statuses: &[moe_api::WorkerStatus],
    tokens: &Tokens,
    r: &Resolved,
    serving: bool,
) -> Option<Problem> {
    let names = Names::new(&r.name);
    let (control, client) = (token_id(&tokens.control), token_id(&tokens.client));
    let mismatch = |s: &moe_api::WorkerStatus| {
        if s.control_token_id.as_ref().is_some_and(|id| *id != control) {
            Some((s.rank, &names.secret))
        } else if serving && s.client_token_id.as_ref().is_some_and(|id| *id != client) {
            Some((s.rank, &names.client_secret))
        } else {
            None
        }
    };
    let (rank, secret) = statuses.iter().find_map(mismatch)?;
    Some(mismatch_problem(
        r,
        secret,
        &format!("rank {rank} holds another token"),
    ))
}

/// After a mismatch, the deployment's token Secrets are created again at the next reconcile:
/// once the user deleted the foreign one, the operator's own replaces it at once.
pub(crate) fn forget(created: &CreatedSecrets, r: &Resolved) {
    let names = Names::new(&r.name);
    created.forget(&[
        format!("{}/{}", r.namespace, names.secret),
        format!("{}/{}", r.namespace, names.client_secret),
    ]);
}

/// [`TOKEN_MISMATCH`] naming the Secret and the fix.
pub(crate) fn mismatch_problem(r: &Resolved, secret: &str, what: &str) -> Problem {
    Problem::new(
        TOKEN_MISMATCH,
        format!(
            "{what} than the operator derives for this MoEDeployment: Secret {}/{secret} was not created by this operator for it (a Secret of someone else, or a random token of an operator release before derived tokens); the operator cannot read or rewrite Secrets: delete the Secret (or rename yours) and the operator creates its own, which the workers pick up within a minute without a restart (see docs/operator.md \"Tokens\")",
            r.namespace
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::tests::resolved;

    fn status(rank: usize, control: Option<&str>, client: Option<&str>) -> moe_api::WorkerStatus {
        moe_api::WorkerStatus {
            rank,
            world_size: 2,
            ready: true,
            backend: "cpu".into(),
            placement_generation: 0,
            layer_generations: vec![0],
            step: 1,
            tokens_per_second: 1.0,
            remap: None,
            traffic: "api".into(),
            served_rows_total: 0,
            served_rows_per_second: 0.0,
            control_token_id: control.map(token_id),
            client_token_id: client.map(token_id),
        }
    }

    #[test]
    fn a_rank_with_another_token_names_the_secret_to_delete() {
        let r = resolved();
        let tokens = Tokens {
            control: "c".into(),
            client: "k".into(),
        };
        // Ranks that agree, or report no ids (older workers): nothing to say.
        let agree = [status(0, Some("c"), Some("k")), status(1, None, None)];
        assert!(mismatch(&agree, &tokens, &r, true).is_none());
        let control = [
            status(0, Some("c"), Some("k")),
            status(1, Some("x"), Some("k")),
        ];
        let p = mismatch(&control, &tokens, &r, true).unwrap();
        assert_eq!(p.reason, TOKEN_MISMATCH);
        assert!(
            p.message.starts_with("rank 1 holds another token")
                && p.message.contains("Secret ml/demo-control")
                && p.message.contains("delete the Secret"),
            "{}",
            p.message
        );
        let client = [status(0, Some("c"), Some("x"))];
        let p = mismatch(&client, &tokens, &r, true).unwrap();
        assert!(
            p.message.contains("Secret ml/demo-client-token"),
            "{}",
            p.message
        );
        // The client token only matters while serving.
        assert!(mismatch(&client, &tokens, &r, false).is_none());
    }
}
