//! sessionmesh operator: reconciles `SessionCluster` resources.

pub mod assign;
pub mod leader;
pub mod reconcile;
pub mod tls;
pub mod webhook;
