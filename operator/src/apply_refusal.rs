//! An owned object whose server-side apply the API server refused (a 4xx: RBAC 403, a 422 from
//! validation or an admission webhook, ...). The reconcile cannot go on, and a log line is not
//! enough: the refusal becomes a `Degraded` reason and a Warning event naming the object and
//! the API server's reason and message.

use kube::core::Status;

use crate::conditions::Problem;

/// The refused apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Kind of the object (`StatefulSet`, `Service`...).
    pub kind: &'static str,
    /// `namespace/name` of the object.
    pub object: String,
    pub code: u16,
    /// The API server's reason (`Forbidden`, `Invalid`...).
    pub reason: String,
    pub message: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the API server refused to apply {} {}: {} {}: {}",
            self.kind, self.object, self.code, self.reason, self.message
        )
    }
}

impl Refusal {
    /// A refusal when the error is the API server answering 4xx; other errors (timeouts,
    /// 5xx, transport) are returned as they are, for the ordinary retry with backoff.
    pub fn from_error(
        kind: &'static str,
        object: String,
        e: kube::Error,
    ) -> Result<Self, kube::Error> {
        match e {
            kube::Error::Api(s) if (400..500).contains(&s.code) => {
                Ok(Self::from_status(kind, object, &s))
            }
            other => Err(other),
        }
    }

    fn from_status(kind: &'static str, object: String, s: &Status) -> Self {
        Self {
            kind,
            object,
            code: s.code,
            reason: if s.reason.is_empty() {
                "Refused".into()
            } else {
                s.reason.clone()
            },
            message: s.message.clone(),
        }
    }

    /// `ApplyForbidden` (403: the operator's RBAC), `ApplyInvalid` (422: validation or an
    /// admission webhook), `ApplyFailed` (any other 4xx).
    pub fn condition_reason(&self) -> &'static str {
        match self.code {
            403 => "ApplyForbidden",
            422 => "ApplyInvalid",
            _ => "ApplyFailed",
        }
    }

    pub fn problem(&self) -> Problem {
        Problem::new(self.condition_reason(), self.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_4xx_names_the_object_and_the_servers_reason_other_errors_pass_through() {
        let status = Status::failure(
            "statefulsets.apps \"demo\" is forbidden: User \"system:serviceaccount:moe-system:moe-operator\" cannot patch resource \"statefulsets\"",
            "Forbidden",
        )
        .with_code(403);
        let r = Refusal::from_error(
            "StatefulSet",
            "ml/demo".into(),
            kube::Error::Api(Box::new(status)),
        )
        .unwrap();
        let p = r.problem();
        assert_eq!(p.reason, "ApplyForbidden");
        assert!(p.message.starts_with("the API server refused to apply StatefulSet ml/demo: 403 Forbidden: statefulsets.apps"), "{}", p.message);
        let gone = Status::failure("boom", "InternalError").with_code(500);
        assert!(
            Refusal::from_error("Service", "ml/x".into(), kube::Error::Api(Box::new(gone)))
                .is_err()
        );
    }
}
