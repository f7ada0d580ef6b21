//! Publishing Kubernetes events (`events.k8s.io/v1`) about MoEDeployments.
//!
//! kube-runtime's `Recorder` folds every event with the same type, reason and action on an
//! object into one series for six minutes, and the series keeps the *first* event's note. Our
//! notes carry facts a person acts on (which placement generation finished, how many bytes
//! moved, why the group restarted), so with that recorder two remaps within six minutes show
//! the first remap's text twice. This recorder folds an event into a series only when its note
//! is the same too: a repeated message becomes a count, a different message a new event.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as K8sEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Reporter};
use kube::{Client, ResourceExt};
use tokio::sync::Mutex;

/// How long a published event can still absorb repeats of itself.
const SERIES_TTL: SignedDuration = SignedDuration::from_mins(6);

/// What makes two events "the same message" that may share a series.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SeriesKey {
    type_: &'static str,
    reason: String,
    action: String,
    note: Option<String>,
    regarding_uid: Option<String>,
    regarding_name: Option<String>,
    regarding_namespace: Option<String>,
}

fn type_name(t: EventType) -> &'static str {
    match t {
        EventType::Normal => "Normal",
        EventType::Warning => "Warning",
    }
}

fn series_key(ev: &Event, regarding: &ObjectReference) -> SeriesKey {
    SeriesKey {
        type_: type_name(ev.type_),
        reason: ev.reason.clone(),
        action: ev.action.clone(),
        note: ev.note.clone(),
        regarding_uid: regarding.uid.clone(),
        regarding_name: regarding.name.clone(),
        regarding_namespace: regarding.namespace.clone(),
    }
}

/// The event object for a first occurrence.
fn new_event(
    reporter: &Reporter,
    ev: &Event,
    regarding: &ObjectReference,
    now: Timestamp,
) -> K8sEvent {
    let base = regarding.name.as_deref().unwrap_or(&reporter.controller);
    K8sEvent {
        action: Some(ev.action.clone()),
        reason: Some(ev.reason.clone()),
        event_time: Some(MicroTime(now)),
        regarding: Some(regarding.clone()),
        related: ev.secondary.clone(),
        note: ev.note.clone(),
        metadata: ObjectMeta {
            namespace: regarding.namespace.clone(),
            name: Some(format!("{base}.{:x}", now.as_nanosecond())),
            ..ObjectMeta::default()
        },
        reporting_controller: Some(reporter.controller.clone()),
        reporting_instance: Some(
            reporter
                .instance
                .clone()
                .unwrap_or_else(|| reporter.controller.clone()),
        ),
        type_: Some(type_name(ev.type_).into()),
        ..K8sEvent::default()
    }
}

/// The same event seen once more: bump its series.
fn repeated(previous: &K8sEvent, now: Timestamp) -> K8sEvent {
    let count = previous.series.as_ref().map_or(2, |s| s.count + 1);
    K8sEvent {
        series: Some(EventSeries {
            count,
            last_observed_time: MicroTime(now),
        }),
        ..previous.clone()
    }
}

fn last_seen(event: &K8sEvent) -> Option<Timestamp> {
    match (&event.series, &event.event_time) {
        (Some(s), _) => Some(s.last_observed_time.0),
        (None, Some(t)) => Some(t.0),
        (None, None) => None,
    }
}

/// Publishes events, folding only exact repeats into a series.
pub struct EventRecorder {
    client: Client,
    reporter: Reporter,
    published: Mutex<HashMap<SeriesKey, K8sEvent>>,
}

impl EventRecorder {
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Self {
            client,
            reporter,
            published: Mutex::new(HashMap::new()),
        }
    }

    /// Creates the event in the regarded object's namespace, or bumps the series of an
    /// identical event published within the last six minutes.
    pub async fn publish(
        &self,
        ev: &Event,
        regarding: &ObjectReference,
    ) -> Result<(), kube::Error> {
        let now = Timestamp::now();
        let key = series_key(ev, regarding);
        let mut published = self.published.lock().await;
        published.retain(|_, e| last_seen(e).is_none_or(|t| t + SERIES_TTL > now));
        let namespace = regarding.namespace.as_deref().unwrap_or("default");
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), namespace);
        let event = match published.get(&key) {
            Some(previous) => {
                let event = repeated(previous, now);
                api.patch(
                    &event.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&event),
                )
                .await?;
                event
            }
            None => {
                let event = new_event(&self.reporter, ev, regarding, now);
                api.create(&PostParams::default(), &event).await?;
                event
            }
        };
        published.insert(key, event);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(note: &str) -> Event {
        Event {
            type_: EventType::Normal,
            reason: "RemapFinished".into(),
            note: Some(note.into()),
            action: "Remap".into(),
            secondary: None,
        }
    }

    fn regarding() -> ObjectReference {
        ObjectReference {
            name: Some("m".into()),
            namespace: Some("ml".into()),
            uid: Some("u1".into()),
            ..ObjectReference::default()
        }
    }

    #[test]
    fn different_notes_are_different_series() {
        let a = series_key(&event("generation 1 serves"), &regarding());
        let b = series_key(&event("generation 2 serves"), &regarding());
        assert_ne!(a, b);
        assert_eq!(a, series_key(&event("generation 1 serves"), &regarding()));
    }

    #[test]
    fn a_repeat_counts_up_and_keeps_the_name_and_note() {
        let reporter = Reporter {
            controller: "moe-operator".into(),
            instance: None,
        };
        let t0 = Timestamp::from_second(1_000).unwrap_or(Timestamp::UNIX_EPOCH);
        let first = new_event(&reporter, &event("x"), &regarding(), t0);
        assert_eq!(first.reporting_instance.as_deref(), Some("moe-operator"));
        assert_eq!(last_seen(&first), Some(t0));
        let t1 = t0 + SignedDuration::from_secs(5);
        let second = repeated(&first, t1);
        let third = repeated(&second, t1);
        assert_eq!(second.series.as_ref().map(|s| s.count), Some(2));
        assert_eq!(third.series.as_ref().map(|s| s.count), Some(3));
        assert_eq!(third.metadata.name, first.metadata.name);
        assert_eq!(third.note, first.note);
        assert_eq!(last_seen(&third), Some(t1));
    }
}
