//! What the API server supports, found out from its behaviour rather than its
//! version number: a feature gate can be off on a new server.

use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::{Api, Client};
use serde_json::json;
use tracing::{info, warn};

static RESTRICTED: std::sync::LazyLock<serde_json::Value> = std::sync::LazyLock::new(
    || json!({"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}),
);

/// How native sidecar support was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decided {
    /// A server-side dry-run create kept (or dropped) `restartPolicy: Always`.
    DryRun,
    /// The dry run was not possible; the version number decided (1.29+).
    Version,
    /// Set on the command line.
    Flag,
}

/// Whether init containers with `restartPolicy: Always` (native sidecars)
/// work on this server: a server-side dry-run create of such a pod in `ns`.
/// A server without the feature (older than 1.28, or with the
/// `SidecarContainers` gate off) drops the field; a server that refuses the
/// pod does not support it either.
pub async fn native_sidecars(client: &Client, ns: &str) -> (bool, Decided) {
    let pod: Pod = match serde_json::from_value(json!({
        "metadata": {"name": "sessionmesh-native-sidecar-probe", "labels": {"app.kubernetes.io/managed-by": "sessionmesh-operator"}},
        // Compliant with the "restricted" Pod Security Standard, so that a
        // namespace enforcing it does not refuse the probe.
        "spec": {
            "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
            "initContainers": [{"name": "probe", "image": "sessionmesh-probe", "restartPolicy": "Always",
                                "securityContext": RESTRICTED.clone()}],
            "containers": [{"name": "main", "image": "sessionmesh-probe", "securityContext": RESTRICTED.clone()}]
        }
    })) {
        Ok(p) => p,
        Err(e) => {
            warn!(error = %e, "cannot build the native sidecar probe pod");
            return by_version(client).await;
        }
    };
    let params = PostParams {
        dry_run: true,
        field_manager: Some("sessionmesh-operator".into()),
    };
    match Api::<Pod>::namespaced(client.clone(), ns)
        .create(&params, &pod)
        .await
    {
        Ok(p) => {
            let kept = p
                .spec
                .and_then(|s| s.init_containers)
                .and_then(|c| c.into_iter().next())
                .and_then(|c| c.restart_policy)
                .is_some_and(|r| r == "Always");
            (kept, Decided::DryRun)
        }
        // Invalid: a server that knows the field but refuses it.
        Err(kube::Error::Api(e)) if e.code == 422 => (false, Decided::DryRun),
        Err(e) => {
            warn!(error = %e, namespace = ns, "dry-run create for native sidecar support failed; deciding by version");
            by_version(client).await
        }
    }
}

async fn by_version(client: &Client) -> (bool, Decided) {
    let native = match client.apiserver_version().await {
        Ok(v) => {
            let minor: u32 = v.minor.trim_end_matches('+').parse().unwrap_or(0);
            v.major == "1" && minor >= 29
        }
        Err(e) => {
            warn!(error = %e, "server version unknown; assuming no native sidecars");
            false
        }
    };
    info!(native, "native sidecar support from the version number");
    (native, Decided::Version)
}
