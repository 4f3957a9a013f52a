//! Types shared by the operator and the sidecar: the `SessionCluster` custom
//! resource (`sessionmesh.io/v1alpha1`) and the membership document the
//! operator publishes for the sidecars.

pub mod cluster;
pub mod membership;
pub mod settings;

pub use cluster::*;
pub use membership::*;
pub use settings::ClusterSettings;

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

/// The `SessionCluster` CustomResourceDefinition as it is installed: `spec`
/// may be left out (every field has a default, so the API server fills in
/// `spec: {}` and the defaults below it).
pub fn crd(
) -> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    use kube::CustomResourceExt;
    let mut crd = SessionCluster::crd();
    for v in &mut crd.spec.versions {
        let Some(root) = v
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        else {
            continue;
        };
        if let Some(req) = root.required.as_mut() {
            req.retain(|r| r != "spec");
        }
        if root.required.as_ref().is_some_and(Vec::is_empty) {
            root.required = None;
        }
        if let Some(spec) = root.properties.as_mut().and_then(|p| p.get_mut("spec")) {
            spec.default = Some(
                k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSON(
                    serde_json::json!({}),
                ),
            );
        }
    }
    crd
}
