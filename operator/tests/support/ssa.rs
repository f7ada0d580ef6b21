//! Field ownership as the fake API server models it: a test fake, not the API server's
//! structured-merge algorithm. It keeps what the operator's code paths depend on:
//!
//! * **Fields.** Each key of `metadata.labels`, `metadata.annotations`, `spec`, `data` and
//!   `binaryData` is a field of its own; `metadata.ownerReferences`, `metadata.finalizers` and
//!   every other top-level field (`type`, `rules`, `subjects`, ...) is one field. Identity and
//!   server fields (`metadata.name`, `uid`, `resourceVersion`, ...) and `status` are nobody's.
//!   (The API server goes deeper: list items by key, nested maps field by field.)
//! * **Managers.** `metadata.managedFields` holds one entry per (manager, operation), in the
//!   API server's `FieldsV1` shape, on every stored object.
//! * **Apply** (`application/apply-patch+yaml`): the manager's applied fields are set; a field
//!   another manager owns with a different value is a conflict (409 naming the field and the
//!   manager) unless forced, when the applier takes it over; a field the manager applied before
//!   and no longer applies is removed unless someone else still owns it.
//! * **Update** (create, replace, merge patch): the writer owns every field it added or
//!   changed, taken from the other managers without conflict; removed fields leave everyone.
//!
//! Fields of an object stored by the test harness itself (`FakeApi::put` without
//! `managedFields`) belong to no manager: an apply sets them without conflict and a later apply
//! that leaves them out leaves them in place.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

/// A field's path from the object's root, e.g. `["metadata", "labels", "app"]`.
pub type Field = Vec<String>;

/// Keys under these top-level maps are fields of their own.
const KEYED: &[&str] = &["spec", "data", "binaryData"];
/// Keys of `metadata` that are fields (the rest are identity or the server's).
const METADATA_MAPS: &[&str] = &["labels", "annotations"];
const METADATA_WHOLE: &[&str] = &["ownerReferences", "finalizers"];

/// The object's fields at the granularity above, with their values.
pub fn fields(obj: &Value) -> BTreeMap<Field, Value> {
    let mut out = BTreeMap::new();
    let Some(map) = obj.as_object() else {
        return out;
    };
    for (k, v) in map {
        match k.as_str() {
            "apiVersion" | "kind" | "status" => {}
            "metadata" => {
                for (mk, mv) in v.as_object().into_iter().flatten() {
                    if METADATA_MAPS.contains(&mk.as_str()) {
                        for (lk, lv) in mv.as_object().into_iter().flatten() {
                            out.insert(path(&["metadata", mk, lk]), lv.clone());
                        }
                    } else if METADATA_WHOLE.contains(&mk.as_str()) {
                        out.insert(path(&["metadata", mk]), mv.clone());
                    }
                }
            }
            _ if KEYED.contains(&k.as_str()) && v.is_object() => {
                for (sk, sv) in v.as_object().into_iter().flatten() {
                    out.insert(path(&[k, sk]), sv.clone());
                }
            }
            _ => {
                out.insert(path(&[k]), v.clone());
            }
        }
    }
    out
}

fn path(segments: &[&str]) -> Field {
    segments.iter().map(|s| s.to_string()).collect()
}

/// `.metadata.labels.app`, as the API server names a field in a conflict.
pub fn dotted(field: &Field) -> String {
    field.iter().map(|s| format!(".{s}")).collect()
}

fn get<'v>(obj: &'v Value, field: &Field) -> Option<&'v Value> {
    field.iter().try_fold(obj, |v, seg| v.get(seg))
}

fn set(obj: &mut Value, field: &Field, value: Value) {
    let mut at = obj;
    for seg in &field[..field.len() - 1] {
        if !at.get(seg).is_some_and(Value::is_object) {
            at[seg.as_str()] = json!({});
        }
        at = &mut at[seg.as_str()];
    }
    at[field[field.len() - 1].as_str()] = value;
}

fn remove(obj: &mut Value, field: &Field) {
    let mut at = obj;
    for seg in &field[..field.len() - 1] {
        match at.get_mut(seg) {
            Some(v) => at = v,
            None => return,
        }
    }
    if let Some(map) = at.as_object_mut() {
        map.remove(&field[field.len() - 1]);
    }
}

/// One entry of `metadata.managedFields`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Managed {
    pub manager: String,
    /// `Apply` or `Update`.
    pub operation: String,
    pub fields: BTreeSet<Field>,
}

/// The object's managers, read from its `metadata.managedFields`.
pub fn managers(obj: &Value) -> Vec<Managed> {
    obj["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let mut fields = BTreeSet::new();
            decode(&e["fieldsV1"], &mut Vec::new(), &mut fields);
            Managed {
                manager: e["manager"].as_str().unwrap_or_default().to_string(),
                operation: e["operation"].as_str().unwrap_or_default().to_string(),
                fields,
            }
        })
        .collect()
}

/// `{"f:metadata": {"f:labels": {"f:app": {}}}}` into `[metadata, labels, app]`.
fn decode(v: &Value, prefix: &mut Field, out: &mut BTreeSet<Field>) {
    let Some(map) = v.as_object() else { return };
    if map.is_empty() && !prefix.is_empty() {
        out.insert(prefix.clone());
        return;
    }
    for (k, child) in map {
        if let Some(name) = k.strip_prefix("f:") {
            prefix.push(name.to_string());
            decode(child, prefix, out);
            prefix.pop();
        }
    }
}

fn encode(fields: &BTreeSet<Field>) -> Value {
    let mut root = json!({});
    for f in fields {
        let mut at = &mut root;
        for seg in f {
            let key = format!("f:{seg}");
            if at.get(&key).is_none() {
                at[key.as_str()] = json!({});
            }
            at = &mut at[key.as_str()];
        }
    }
    root
}

fn store_managers(obj: &mut Value, managers: &[Managed]) {
    let api_version = obj["apiVersion"].clone();
    let entries: Vec<Value> = managers
        .iter()
        .filter(|m| !m.fields.is_empty())
        .map(|m| {
            json!({"manager": m.manager, "operation": m.operation, "apiVersion": api_version,
                "fieldsType": "FieldsV1", "fieldsV1": encode(&m.fields)})
        })
        .collect();
    if let Some(meta) = obj["metadata"].as_object_mut() {
        meta.insert("managedFields".into(), Value::Array(entries));
    }
}

/// The fields another manager owns with another value than the applied one.
pub type Conflicts = Vec<(Field, String)>;

/// The 409 message of an apply that conflicts, as the API server words it.
pub fn conflict_message(conflicts: &Conflicts) -> String {
    let list: Vec<String> = conflicts
        .iter()
        .map(|(f, m)| format!("conflict with \"{m}\": {}", dotted(f)))
        .collect();
    format!(
        "Apply failed with {} conflict{}: {}",
        conflicts.len(),
        if conflicts.len() == 1 { "" } else { "s" },
        list.join(", ")
    )
}

/// Server-side apply of `applied` by `manager` onto `live` (`None`: the object is created).
/// Returns the new object (identity and status kept from `live`), or the conflicts.
pub fn apply(
    live: Option<&Value>,
    applied: &Value,
    manager: &str,
    force: bool,
) -> Result<Value, Conflicts> {
    let mut obj = match live {
        Some(l) => l.clone(),
        None => json!({
            "apiVersion": applied["apiVersion"],
            "kind": applied["kind"],
            "metadata": {
                "name": applied["metadata"]["name"],
                "namespace": applied["metadata"]["namespace"],
            },
        }),
    };
    let mut managers = managers(&obj);
    let wanted = fields(applied);
    let mut conflicts = Conflicts::new();
    for (f, v) in &wanted {
        let same = get(&obj, f) == Some(v);
        for m in managers.iter_mut() {
            let mine = m.manager == manager && m.operation == "Apply";
            if mine || !m.fields.contains(f) || same {
                continue;
            }
            if force {
                m.fields.remove(f);
            } else {
                conflicts.push((f.clone(), m.manager.clone()));
            }
        }
    }
    if !conflicts.is_empty() {
        return Err(conflicts);
    }
    // What this manager applied before and leaves out now goes, unless someone else owns it.
    let before: BTreeSet<Field> = managers
        .iter()
        .find(|m| m.manager == manager && m.operation == "Apply")
        .map(|m| m.fields.clone())
        .unwrap_or_default();
    for f in before.iter().filter(|f| !wanted.contains_key(*f)) {
        let others = managers
            .iter()
            .any(|m| !(m.manager == manager && m.operation == "Apply") && m.fields.contains(f));
        if !others {
            remove(&mut obj, f);
        }
    }
    for (f, v) in &wanted {
        set(&mut obj, f, v.clone());
    }
    managers.retain(|m| !(m.manager == manager && m.operation == "Apply"));
    managers.push(Managed {
        manager: manager.to_string(),
        operation: "Apply".into(),
        fields: wanted.into_keys().collect(),
    });
    store_managers(&mut obj, &managers);
    Ok(obj)
}

/// An update (create, replace, merge patch) by `manager` from `live` to `new`: the writer owns
/// what it added or changed; removed fields leave every manager.
pub fn update(live: Option<&Value>, mut new: Value, manager: &str) -> Value {
    let mut managers = live.map(managers).unwrap_or_default();
    let old_fields = live.map(fields).unwrap_or_default();
    let new_fields = fields(&new);
    let changed: BTreeSet<Field> = new_fields
        .iter()
        .filter(|(f, v)| old_fields.get(*f) != Some(*v))
        .map(|(f, _)| f.clone())
        .collect();
    for m in managers.iter_mut() {
        m.fields
            .retain(|f| new_fields.contains_key(f) && !changed.contains(f));
    }
    match managers
        .iter_mut()
        .find(|m| m.manager == manager && m.operation == "Update")
    {
        Some(m) => m.fields.extend(changed),
        None => managers.push(Managed {
            manager: manager.to_string(),
            operation: "Update".into(),
            fields: changed,
        }),
    }
    store_managers(&mut new, &managers);
    new
}

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Some(patch) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let map = target.as_object_mut().expect("made an object above");
    for (k, v) in patch {
        if v.is_null() {
            map.remove(k);
        } else {
            merge_patch(map.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}
