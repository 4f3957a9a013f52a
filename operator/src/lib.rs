//! sessionmesh operator: reconciles `SessionCluster` resources.

pub mod assign;
pub mod detect;
pub mod inject;
pub mod leader;
pub mod metrics;
mod owned;
pub mod reconcile;
pub mod serve;
mod status;
pub mod tls;
pub mod webhook;
