//! Objects the operator owns for each cluster, beside the membership
//! ConfigMap: the peer secret, the local credentials, the PodDisruptionBudget
//! and the RBAC the injected sidecars use to read their membership.

use crate::reconcile::{Ctx, Error, MANAGER};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::{Api, Resource};
use serde_json::json;
use sessionmesh_api::{members_configmap, SessionCluster, CLUSTER_LABEL};

use tracing::info;

/// The cluster secret the injected sidecars mount, unless the spec names one:
/// created once with 32 random bytes, owned by the SessionCluster.
pub(crate) async fn ensure_peer_secret(
    ctx: &Ctx,
    sc: &SessionCluster,
    ns: &str,
    name: &str,
) -> Result<(), Error> {
    if sc.spec.peer_auth.is_some() {
        return Ok(());
    }
    create_secret_once(
        ctx,
        sc,
        ns,
        name,
        &format!("{name}-peer"),
        &[("secret", 32)],
        "the cluster secret",
    )
    .await
}

/// Creates a Secret of random hex values (`(key, random bytes)`) owned by the
/// SessionCluster, unless it exists. Existing values are never replaced.
async fn create_secret_once(
    ctx: &Ctx,
    sc: &SessionCluster,
    ns: &str,
    cluster: &str,
    secret_name: &str,
    keys: &[(&str, usize)],
    what: &str,
) -> Result<(), Error> {
    let api: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(ctx.client.clone(), ns);
    if api.get_opt(secret_name).await?.is_some() {
        return Ok(());
    }
    let mut data = serde_json::Map::new();
    for (key, len) in keys {
        let mut b = vec![0u8; *len];
        getrandom::getrandom(&mut b).map_err(|e| Error::Random(e.to_string()))?;
        data.insert(
            (*key).to_owned(),
            json!(b.iter().map(|b| format!("{b:02x}")).collect::<String>()),
        );
    }
    let owner = sc
        .controller_owner_ref(&())
        .map(|o| vec![o])
        .unwrap_or_default();
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "metadata": {"name": secret_name, "ownerReferences": owner, "labels": {"app.kubernetes.io/managed-by": MANAGER}},
        "stringData": data
    }))?;
    match api.create(&kube::api::PostParams::default(), &secret).await {
        Ok(_) => {
            info!(cluster = %cluster, secret = %secret_name, "created {what}");
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The credentials of each member's local API, shared by the sidecar and the
/// app in the same pod: a bearer token for the HTTP API and a password for
/// the Redis endpoint, random, created once, owned by the SessionCluster.
pub(crate) async fn ensure_local_secret(
    ctx: &Ctx,
    sc: &SessionCluster,
    ns: &str,
    name: &str,
) -> Result<(), Error> {
    let secret_name = crate::webhook::local_secret_name(name);
    create_secret_once(
        ctx,
        sc,
        ns,
        name,
        &secret_name,
        &[("api-token", 24), ("redis-password", 24)],
        "the local API credentials",
    )
    .await
}

/// Least privilege for the sidecars, without manual steps: a Role allowing
/// get/list/watch on this cluster's membership ConfigMap only, bound to the
/// service accounts the member pods run as.
pub(crate) async fn ensure_sidecar_rbac(
    ctx: &Ctx,
    sc: &SessionCluster,
    ns: &str,
    name: &str,
    members: &[Pod],
) -> Result<(), Error> {
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    let owner = sc
        .controller_owner_ref(&())
        .map(|o| vec![o])
        .unwrap_or_default();
    let rbac_name = format!("{name}-sessionmesh-sidecar");
    let role = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": rbac_name, "namespace": ns, "ownerReferences": owner, "labels": {"app.kubernetes.io/managed-by": MANAGER}},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [members_configmap(name)], "verbs": ["get", "list", "watch"]}]
    });
    Api::<Role>::namespaced(ctx.client.clone(), ns)
        .patch(
            &rbac_name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&role),
        )
        .await?;
    let mut accounts: Vec<String> = members
        .iter()
        .map(|p| {
            p.spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .filter(|a| !a.is_empty())
                .unwrap_or_else(|| "default".into())
        })
        .collect();
    accounts.sort();
    accounts.dedup();
    let subjects: Vec<serde_json::Value> = accounts
        .iter()
        .map(|a| json!({"kind": "ServiceAccount", "name": a, "namespace": ns}))
        .collect();
    let binding = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": rbac_name, "namespace": ns, "ownerReferences": owner, "labels": {"app.kubernetes.io/managed-by": MANAGER}},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": rbac_name},
        "subjects": subjects
    });
    Api::<RoleBinding>::namespaced(ctx.client.clone(), ns)
        .patch(
            &rbac_name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&binding),
        )
        .await?;
    Ok(())
}

/// A PodDisruptionBudget so voluntary disruptions (drains, upgrades) take at
/// most one member at a time in `all` mode (each leaving member hands over
/// before the next goes), and at most `backups` in backup mode: with K
/// members away at once every session still has a copy, even one whose
/// handover had not finished. policy/v1 (1.21+), else policy/v1beta1.
pub(crate) fn pdb_max_unavailable(spec: &sessionmesh_api::SessionClusterSpec) -> u8 {
    match spec.replication.mode {
        sessionmesh_api::ReplicationMode::All => 1,
        sessionmesh_api::ReplicationMode::Backup => spec.replication.backups.max(1),
    }
}

pub(crate) async fn ensure_pdb(
    ctx: &Ctx,
    sc: &SessionCluster,
    ns: &str,
    name: &str,
) -> Result<(), Error> {
    use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
    let owner = sc
        .controller_owner_ref(&())
        .map(|o| vec![o])
        .unwrap_or_default();
    let pdb_name = format!("{name}-members");
    let max_unavailable = pdb_max_unavailable(&sc.spec);
    let mut last = None;
    for version in ["v1", "v1beta1"] {
        let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(
            "policy",
            version,
            "PodDisruptionBudget",
        ));
        let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), ns, &ar);
        let body = json!({
            "apiVersion": format!("policy/{version}"), "kind": "PodDisruptionBudget",
            "metadata": {"name": pdb_name, "ownerReferences": owner, "labels": {"app.kubernetes.io/managed-by": MANAGER}},
            "spec": {"maxUnavailable": max_unavailable, "selector": {"matchLabels": {CLUSTER_LABEL: name}}}
        });
        match api
            .patch(
                &pdb_name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await
        {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => last = Some(kube::Error::Api(e)),
            Err(e) => return Err(e.into()),
        }
    }
    Err(last.map(Error::Kube).unwrap_or(Error::NoNamespace))
}
