//! The membership document: what the operator publishes (one ConfigMap per
//! cluster, key `members.yaml`) and every sidecar watches with get/watch on that
//! one object. It is a superset of the sidecar's static member file.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MembershipDoc {
    pub cluster: String,
    pub members: Vec<DocMember>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DocMember {
    /// The member's name: its pod name.
    pub name: String,
    pub uid: String,
    /// Replication address `ip:port`.
    pub address: String,
    pub jvm_route: String,
    pub ready: bool,
    /// Terminating: peers treat it as having left.
    #[serde(default)]
    pub leaving: bool,
}
