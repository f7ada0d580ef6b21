//! Pods the StatefulSet controller could not create: a ResourceQuota, an admission webhook or
//! the namespace's Pod Security level refused them. Nothing shows on pods that do not exist, so
//! the StatefulSet's `FailedCreate` events are read (only while the group lacks pods) and the
//! newest one becomes a `Degraded` reason carrying the API server's message.

use k8s_openapi::api::core::v1::Event;
use kube::Client;
use kube::api::{Api, ListParams};

use crate::conditions::Problem;

/// The `Degraded` reason of a pod-creation refusal, from the API server's message.
pub fn reason(message: &str) -> &'static str {
    if message.contains("exceeded quota") || message.contains("must specify limits") {
        "QuotaExceeded"
    } else if message.contains("violates PodSecurity") {
        "PodSecurityViolation"
    } else if message.contains("admission webhook") {
        "AdmissionWebhookDenied"
    } else {
        "PodCreateFailed"
    }
}

/// When the event last happened (series, lastTimestamp, eventTime, creation).
fn last_seen(e: &Event) -> Option<jiff::Timestamp> {
    e.series
        .as_ref()
        .and_then(|s| s.last_observed_time.as_ref().map(|t| t.0))
        .or_else(|| e.last_timestamp.as_ref().map(|t| t.0))
        .or_else(|| e.event_time.as_ref().map(|t| t.0))
        .or_else(|| e.metadata.creation_timestamp.as_ref().map(|t| t.0))
}

/// How old a `FailedCreate` event may be and still speak for the group now. The StatefulSet
/// controller retries a refused create with a backoff capped at 1000 s and records the event
/// again each time, so a refusal that persists is never older than that; an older event is
/// about a cause that went away (pods are missing for another reason, e.g. between a group
/// restart's deletes and creates).
pub const MAX_EVENT_AGE: jiff::SignedDuration = jiff::SignedDuration::from_secs(1200);

/// The newest `FailedCreate` event of the StatefulSet `name` seen within [`MAX_EVENT_AGE`]
/// before `now`, as a problem.
pub fn problem(
    namespace: &str,
    name: &str,
    events: &[Event],
    now: jiff::Timestamp,
) -> Option<Problem> {
    let e = events
        .iter()
        .filter(|e| {
            e.reason.as_deref() == Some("FailedCreate")
                && e.involved_object.kind.as_deref() == Some("StatefulSet")
                && e.involved_object.name.as_deref() == Some(name)
                && last_seen(e).is_some_and(|t| now.duration_since(t) <= MAX_EVENT_AGE)
        })
        .max_by_key(|e| last_seen(e))?;
    let message = e.message.clone().unwrap_or_default();
    let count = e.count.unwrap_or(1).max(1);
    let when = last_seen(e)
        .map(|t| format!(", last at {t}"))
        .unwrap_or_default();
    Some(Problem::new(
        reason(&message),
        format!(
            "StatefulSet {namespace}/{name} cannot create worker pods ({count} time{}{when}): {message}",
            if count == 1 { "" } else { "s" }
        ),
    ))
}

/// Reads the StatefulSet's `FailedCreate` events (namespace events, list by field selector).
pub async fn read(
    client: &Client,
    namespace: &str,
    statefulset: &str,
) -> Result<Option<Problem>, kube::Error> {
    let api: Api<Event> = Api::namespaced(client.clone(), namespace);
    let fields = format!(
        "involvedObject.kind=StatefulSet,involvedObject.name={statefulset},reason=FailedCreate"
    );
    let events = api
        .list(&ListParams::default().fields(&fields))
        .await?
        .items;
    Ok(problem(
        namespace,
        statefulset,
        &events,
        jiff::Timestamp::now(),
    ))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;

    fn event(message: &str, at: &str, count: i32) -> Event {
        Event {
            reason: Some("FailedCreate".into()),
            message: Some(message.into()),
            last_timestamp: Some(Time(at.parse().unwrap())),
            count: Some(count),
            involved_object: k8s_openapi::api::core::v1::ObjectReference {
                kind: Some("StatefulSet".into()),
                name: Some("demo".into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn the_newest_refusal_is_classified_with_the_servers_message() {
        let quota = "create Pod demo-1 in StatefulSet demo failed error: pods \"demo-1\" is forbidden: exceeded quota: pods, requested: pods=1, used: pods=1, limited: pods=1";
        let pss = "create Pod demo-0 in StatefulSet demo failed error: pods \"demo-0\" is forbidden: violates PodSecurity \"restricted:latest\": unrestricted capabilities";
        let hook = "create Pod demo-0 in StatefulSet demo failed error: admission webhook \"gpu.example.com\" denied the request: no GPU quota";
        let now: jiff::Timestamp = "2026-12-05T03:15:00Z".parse().unwrap();
        let p = problem(
            "ml",
            "demo",
            &[
                event(pss, "2026-12-05T03:00:00Z", 1),
                event(quota, "2026-12-05T03:10:00Z", 4),
            ],
            now,
        )
        .unwrap();
        assert_eq!(p.reason, "QuotaExceeded");
        assert!(p.message.contains("exceeded quota: pods"), "{}", p.message);
        assert!(p.message.contains("StatefulSet ml/demo") && p.message.contains("4 times"));
        assert_eq!(reason(pss), "PodSecurityViolation");
        assert_eq!(reason(hook), "AdmissionWebhookDenied");
        assert_eq!(reason("something else"), "PodCreateFailed");
        assert!(problem("ml", "demo", &[], now).is_none());
        assert!(
            problem(
                "ml",
                "other",
                &[event(quota, "2026-12-05T03:10:00Z", 1)],
                now
            )
            .is_none()
        );
        // A refusal last seen 21 minutes ago is over: nothing to report.
        let later: jiff::Timestamp = "2026-12-05T03:31:00Z".parse().unwrap();
        assert!(
            problem(
                "ml",
                "demo",
                &[event(quota, "2026-12-05T03:10:00Z", 4)],
                later
            )
            .is_none()
        );
    }
}
