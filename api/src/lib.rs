//! Types shared by the operator and the sidecar: the `SessionCluster` custom
//! resource (`sessionmesh.io/v1alpha1`) and the membership document the
//! operator publishes for the sidecars.

pub mod cluster;
pub mod membership;

pub use cluster::*;
pub use membership::*;

/// The annotation that makes a pod a member of a cluster (same namespace).
pub const CLUSTER_ANNOTATION: &str = "sessionmesh.io/cluster";
/// Label set alongside (by the webhook) for efficient watches; optional.
pub const CLUSTER_LABEL: &str = "sessionmesh.io/cluster";
/// The pod's assigned jvmRoute, recorded on the pod.
pub const ROUTE_ANNOTATION: &str = "sessionmesh.io/jvm-route";
/// The pod's assigned receiver port, recorded on the pod.
pub const PORT_ANNOTATION: &str = "sessionmesh.io/receiver-port";
/// Key of the membership document in its ConfigMap.
pub const MEMBERS_KEY: &str = "members.yaml";

/// Name of the ConfigMap holding a cluster's membership document.
pub fn members_configmap(cluster: &str) -> String {
    format!("{cluster}-members")
}
