//! The reconciler of `MoEDeployment`s, one file per concern:
//!
//! * this file: the modules and what the rest of the operator uses of them;
//! * `controller/reconcile.rs`: the reconcile entry and the order of its steps (the tokens and
//!   their Secrets: `crate::token_secrets`; the error type: `crate::error`);
//! * `controller/context.rs`: operator settings and the reconciler's shared state;
//! * `controller/watch.rs`: what is watched, which deployment an event concerns, error backoff;
//! * `controller/placement_source.rs`: the placement ConfigMap, from a strategy or a static map;
//! * `controller/owned.rs`: owned objects by server-side apply;
//! * `controller/pods.rs`: what the group's pods show (ready, rank, hashes, restarts, problems);
//! * `controller/restarts.rs`: whole-group restarts (spec change, rank failure, backoff, budget,
//!   fleet limit);
//! * `controller/remap_driver.rs`: the remap loop (measure, decide, plan, persist, drive, record);
//! * `controller/status.rs`: conditions, the status write and events at the end of a pass.

mod context;
mod owned;
mod placement_source;
mod pods;
mod reconcile;
mod remap_driver;
mod restarts;
mod status;
mod watch;

pub use crate::error::Error;
pub use context::{Context, Settings};
pub use placement_source::{PlacementSource, next_document};
pub use reconcile::reconcile;
pub use watch::{controller_owner, deployments_for_configmap, error_policy, run};
