//! The committed placement: the `<name>-placement` ConfigMap the workers load at start and
//! remaps advance. Where its first document comes from (a strategy or the user's static map)
//! and when it is rewritten (the shape or the source changed).

use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;
use kube::api::Api;
use moe_api::PlacementDocument;
use tracing::info;

use super::owned::apply;
use super::status::Notes;
use crate::conditions::Problem;
use crate::crd::{MoEDeploymentSpec, MoEDeploymentStatus, PlacementStrategy};
use crate::error::Error;
use crate::planning;
use crate::resources::{self, Names, Resolved};

/// What the committed placement should be initialised from, as recorded on the ConfigMap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlacementSource {
    Linear,
    RoundRobin,
    /// A static map's text and a hash of it.
    Static {
        text: String,
        hash: String,
    },
}

impl PlacementSource {
    pub fn label(&self) -> String {
        match self {
            PlacementSource::Linear => "Linear".into(),
            PlacementSource::RoundRobin => "RoundRobin".into(),
            PlacementSource::Static { hash, .. } => format!("Static:{hash}"),
        }
    }
}

fn fnv(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The committed document to keep or write.
///
/// * Same shape and same source as committed: keep it (`Ok(None)`): remaps live in it.
/// * Otherwise a new document from the source, with the next generation: after the committed
///   one, or after `last_known` (the status' desired generation) when the ConfigMap was lost, so
///   that generations never go backwards under running workers; 0 for a new deployment.
pub fn next_document(
    current: Option<(&PlacementDocument, Option<&str>)>,
    last_known: Option<u64>,
    spec: &MoEDeploymentSpec,
    redundant: u32,
    source: &PlacementSource,
) -> Result<Option<PlacementDocument>, Problem> {
    if let Some((doc, label)) = current
        && planning::document_matches(doc, spec, redundant)
        && label == Some(source.label().as_str())
    {
        return Ok(None);
    }
    let generation = match (current, last_known) {
        (Some((d, _)), _) => d.generation + 1,
        (None, Some(g)) => g + 1,
        (None, None) => 0,
    };
    let doc = match source {
        PlacementSource::Static { text, .. } => {
            planning::import_static(spec, redundant, text, generation).map_err(|e| {
                Problem::new("StaticMapInvalid", format!("spec.placement.staticMap: {e}"))
            })?
        }
        _ => planning::initial_document(spec, redundant, generation)
            .map_err(|e| Problem::new("InvalidShape", e))?,
    };
    Ok(Some(doc))
}

pub(super) fn parse_document(cm: &ConfigMap) -> Option<PlacementDocument> {
    let text = cm.data.as_ref()?.get(moe_api::PLACEMENT_CONFIGMAP_KEY)?;
    serde_json::from_str(text).ok()
}

/// The committed placement this pass works with, and the label of the source it came from.
pub(super) struct Committed {
    /// `None`: nothing the workers could load (the reconcile stops before creating them).
    pub doc: Option<PlacementDocument>,
    pub source_label: Option<String>,
}

/// Reads the committed placement and writes a new one when the spec's shape or source no
/// longer matches it. A source that cannot be read (missing or invalid static map) is a
/// problem; the committed document stays in use while it still fits the spec.
pub(super) async fn commit_placement(
    cms: &Api<ConfigMap>,
    r: &Resolved,
    spec: &MoEDeploymentSpec,
    st: &mut MoEDeploymentStatus,
    notes: &mut Notes<'_>,
) -> Result<Committed, Error> {
    let (ns, name) = (&r.namespace, &r.name);
    let names = Names::new(name);
    let redundant = r.redundant_experts;
    let current_cm = cms.get_opt(&names.configmap).await?;
    let current_doc = current_cm.as_ref().and_then(parse_document);
    let current_label = current_cm.as_ref().and_then(|cm| {
        cm.annotations()
            .get(resources::PLACEMENT_SOURCE_ANNOTATION)
            .cloned()
    });
    // The ConfigMap is written before status: when it says the current manual request was
    // acted on, it was, whatever a stale status says (see HANDLED_REMAP_REQUEST_ANNOTATION).
    if let Some(request) = spec.remap_request.as_deref()
        && current_cm.as_ref().is_some_and(|cm| {
            cm.annotations()
                .get(resources::HANDLED_REMAP_REQUEST_ANNOTATION)
                .is_some_and(|handled| handled == request)
        })
    {
        st.last_handled_remap_request = Some(request.to_string());
    }
    let source = read_source(cms, ns, spec).await?;
    let mut committed = Committed {
        doc: current_doc.clone(),
        source_label: current_label.clone(),
    };
    match source.and_then(|s| {
        let next = next_document(
            current_doc.as_ref().map(|d| (d, current_label.as_deref())),
            notes.old.placement.as_ref().map(|p| p.desired_generation),
            spec,
            redundant,
            &s,
        )?;
        Ok((s, next))
    }) {
        Ok((_, None)) => {}
        Ok((s, Some(next))) => {
            let cm = resources::placement_configmap(
                r,
                &next,
                &s.label(),
                st.last_handled_remap_request.as_deref(),
            )?;
            apply(cms, &names.configmap, &cm).await?;
            info!(%ns, %name, generation = next.generation, source = %s.label(), "committed initial placement");
            // Any remap towards the replaced document is moot now.
            st.remap = None;
            committed.doc = Some(next);
            committed.source_label = Some(s.label());
        }
        Err(p) => {
            let usable = current_doc
                .as_ref()
                .is_some_and(|d| planning::document_matches(d, spec, redundant));
            if !usable {
                committed.doc = None;
            }
            notes.problem(p, "CommitPlacement");
        }
    }
    Ok(committed)
}

/// What the spec says the placement comes from; a static map is read from its ConfigMap.
async fn read_source(
    cms: &Api<ConfigMap>,
    ns: &str,
    spec: &MoEDeploymentSpec,
) -> Result<Result<PlacementSource, Problem>, Error> {
    Ok(
        match (spec.placement.strategy, &spec.placement.static_map) {
            (PlacementStrategy::Linear, _) => Ok(PlacementSource::Linear),
            (PlacementStrategy::RoundRobin, _) => Ok(PlacementSource::RoundRobin),
            (PlacementStrategy::Static, Some(r)) => match cms.get_opt(&r.name).await? {
                None => Err(Problem::new(
                    "StaticMapMissing",
                    format!(
                        "spec.placement.staticMap: ConfigMap {ns}/{} not found; create it or change the strategy",
                        r.name
                    ),
                )),
                Some(cm) => match cm.data.as_ref().and_then(|d| d.get(&r.key)) {
                    None => Err(Problem::new(
                        "StaticMapInvalid",
                        format!(
                            "spec.placement.staticMap: ConfigMap {ns}/{} has no key {:?}",
                            r.name, r.key
                        ),
                    )),
                    Some(text) => Ok(PlacementSource::Static {
                        hash: fnv(text),
                        text: text.clone(),
                    }),
                },
            },
            (PlacementStrategy::Static, None) => Err(Problem::new(
                "InvalidSpec",
                "spec.placement.staticMap is required with strategy Static",
            )),
        },
    )
}
