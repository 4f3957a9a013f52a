//! The reconcile loop for one `SessionCluster`: validate the spec, find member
//! pods, assign and record jvmRoutes and ports, publish the membership
//! ConfigMap (server-side apply), write status and events.
//!
//! Invalid specs become a `Degraded` condition, not an error loop. API errors
//! back off exponentially per object.

use crate::assign::{assign, AssignError, PodInfo};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use sessionmesh_api::{
    members_configmap, Condition, DocMember, MemberStatus, MembershipDoc, SessionCluster,
    SessionClusterStatus, CLUSTER_ANNOTATION, CLUSTER_LABEL, MEMBERS_KEY, PORT_ANNOTATION,
    ROUTE_ANNOTATION,
};
use std::collections::HashMap;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{info, warn};

pub const MANAGER: &str = "sessionmesh-operator";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the API server failed; nothing after it was done this round.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("serialize: {0}")]
    Serde(#[from] serde_json::Error),
    #[error("the SessionCluster has no namespace")]
    NoNamespace,
    #[error("no randomness for the cluster secret: {0}")]
    Random(String),
}

pub use crate::metrics::Metrics;

pub struct Ctx {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    failures: Mutex<HashMap<String, u32>>,
}

impl Ctx {
    pub fn new(client: Client, recorder: Recorder) -> Self {
        Ctx {
            client,
            recorder,
            metrics: Metrics::default(),
            failures: Mutex::new(HashMap::new()),
        }
    }
}

fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

pub fn pod_info(p: &Pod) -> PodInfo {
    let ann = p.annotations();
    let spec = p.spec.as_ref();
    let status = p.status.as_ref();
    PodInfo {
        name: p.name_any(),
        uid: p.uid().unwrap_or_default(),
        created: p
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_default(),
        ip: status
            .and_then(|s| s.pod_ip.clone())
            .filter(|ip| !ip.is_empty()),
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        node: spec.and_then(|s| s.node_name.clone()),
        ready: status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True")),
        terminating: p.metadata.deletion_timestamp.is_some(),
        route: ann.get(ROUTE_ANNOTATION).cloned(),
        port: ann.get(PORT_ANNOTATION).and_then(|p| p.parse().ok()),
    }
}

fn condition(
    prev: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: i64,
) -> Condition {
    let status = if ok { "True" } else { "False" }.to_owned();
    let last = prev
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(now_rfc3339);
    Condition {
        type_: type_.into(),
        status,
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: last,
    }
}

async fn event(ctx: &Ctx, sc: &SessionCluster, type_: EventType, reason: &str, note: String) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &sc.object_ref(&())).await {
        warn!(error = %e, "could not record an event");
    }
}

async fn write_status(
    api: &Api<SessionCluster>,
    name: &str,
    status: &SessionClusterStatus,
) -> Result<(), Error> {
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await?;
    Ok(())
}

pub async fn reconcile(sc: Arc<SessionCluster>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = sc.namespace().ok_or(Error::NoNamespace)?;
    let name = sc.name_any();
    let generation = sc.metadata.generation.unwrap_or(0);
    let sc_api: Api<SessionCluster> = Api::namespaced(ctx.client.clone(), &ns);
    let prev = sc.status.clone().unwrap_or_default();

    if let Err(e) = sc.spec.validate() {
        let status = SessionClusterStatus {
            observed_generation: generation,
            conditions: vec![
                condition(
                    &prev.conditions,
                    "Ready",
                    false,
                    "InvalidSpec",
                    e.to_string(),
                    generation,
                ),
                condition(
                    &prev.conditions,
                    "Progressing",
                    false,
                    "InvalidSpec",
                    "waiting for a valid spec".into(),
                    generation,
                ),
                condition(
                    &prev.conditions,
                    "Degraded",
                    true,
                    "InvalidSpec",
                    e.to_string(),
                    generation,
                ),
            ],
            ..prev.clone()
        };
        if prev.observed_generation != generation
            || !prev.conditions.iter().any(|c| c.reason == "InvalidSpec")
        {
            event(&ctx, &sc, EventType::Warning, "InvalidSpec", e.to_string()).await;
        }
        write_status(&sc_api, &name, &status).await?;
        ctx.failures.lock().map(|mut f| f.remove(&name)).ok();
        return Ok(Action::requeue(Duration::from_secs(300)));
    }

    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let pods = pods_api.list(&ListParams::default()).await?;
    let members: Vec<Pod> = pods
        .items
        .into_iter()
        .filter(|p| p.annotations().get(CLUSTER_ANNOTATION) == Some(&name))
        .filter(|p| {
            !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
        })
        .collect();
    let infos: Vec<PodInfo> = members.iter().map(pod_info).collect();
    let (assignments, assign_err) =
        assign(&sc.spec.jvm_route.prefix, sc.spec.receiver_ports, &infos);

    let unlabeled: std::collections::HashSet<String> = members
        .iter()
        .filter(|p| p.labels().get(CLUSTER_LABEL) != Some(&name))
        .map(|p| p.name_any())
        .collect();
    for a in assignments
        .iter()
        .filter(|a| a.changed || unlabeled.contains(&a.pod))
    {
        // The label lets the PodDisruptionBudget (and watches) select members.
        let patch = json!({"metadata": {
            "labels": {CLUSTER_LABEL: name},
            "annotations": {ROUTE_ANNOTATION: a.route, PORT_ANNOTATION: a.port.to_string()}
        }});
        pods_api
            .patch(&a.pod, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        if a.changed {
            info!(cluster = %name, pod = %a.pod, route = %a.route, port = a.port, "assigned");
            event(
                &ctx,
                &sc,
                EventType::Normal,
                "Assigned",
                format!(
                    "pod {}: jvmRoute {}, receiver port {}",
                    a.pod, a.route, a.port
                ),
            )
            .await;
        }
    }

    let by_pod: HashMap<&str, &PodInfo> = infos.iter().map(|p| (p.name.as_str(), p)).collect();
    let mut statuses = Vec::new();
    let mut doc = MembershipDoc {
        cluster: name.clone(),
        members: Vec::new(),
    };
    for a in &assignments {
        let Some(p) = by_pod.get(a.pod.as_str()) else {
            continue;
        };
        statuses.push(MemberStatus {
            pod: p.name.clone(),
            uid: p.uid.clone(),
            ip: p.ip.clone(),
            port: a.port,
            jvm_route: a.route.clone(),
            ready: p.ready && !p.terminating,
            leaving: p.terminating,
        });
        // A member is reachable only once it has an IP.
        if let Some(ip) = &p.ip {
            let address = if ip.contains(':') {
                format!("[{ip}]:{}", a.port)
            } else {
                format!("{ip}:{}", a.port)
            };
            doc.members.push(DocMember {
                name: p.name.clone(),
                uid: p.uid.clone(),
                address,
                jvm_route: a.route.clone(),
                ready: p.ready && !p.terminating,
                leaving: p.terminating,
            });
        }
    }
    let route_idx = |r: &str| {
        r.trim_start_matches(|c: char| !c.is_ascii_digit())
            .parse::<u32>()
            .unwrap_or(u32::MAX)
    };
    statuses.sort_by_key(|m| route_idx(&m.jvm_route));
    doc.members.sort_by_key(|m| route_idx(&m.jvm_route));

    let cm_name = members_configmap(&name);
    let owner = sc
        .controller_owner_ref(&())
        .map(|o| vec![o])
        .unwrap_or_default();
    let cm = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": cm_name, "namespace": ns, "ownerReferences": owner, "labels": {"app.kubernetes.io/managed-by": MANAGER, "sessionmesh.io/cluster": name}},
        "data": {MEMBERS_KEY: serde_yaml::to_string(&doc).unwrap_or_default()},
    });
    let cm_api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    cm_api
        .patch(
            &cm_name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&cm),
        )
        .await?;

    ensure_peer_secret(&ctx, &sc, &ns, &name).await?;
    ensure_local_secret(&ctx, &sc, &ns, &name).await?;
    ensure_pdb(&ctx, &sc, &ns, &name).await?;
    ensure_sidecar_rbac(&ctx, &sc, &ns, &name, &members).await?;

    let count = statuses.len() as u32;
    let ready = statuses.iter().filter(|m| m.ready).count() as u32;
    let all_ready = count > 0 && ready == count;
    let changed = assignments.iter().any(|a| a.changed);
    let status = SessionClusterStatus {
        observed_generation: generation,
        members: statuses,
        member_count: count,
        ready_members: ready,
        conditions: vec![
            condition(
                &prev.conditions,
                "Ready",
                all_ready,
                if count == 0 {
                    "NoMembers"
                } else if all_ready {
                    "AllMembersReady"
                } else {
                    "MembersNotReady"
                },
                format!("{ready} of {count} members ready"),
                generation,
            ),
            condition(
                &prev.conditions,
                "Progressing",
                changed || !all_ready,
                if changed {
                    "Assigning"
                } else if all_ready {
                    "Stable"
                } else {
                    "WaitingForMembers"
                },
                format!(
                    "{} assignments written",
                    assignments.iter().filter(|a| a.changed).count()
                ),
                generation,
            ),
            match &assign_err {
                Some(e @ AssignError::PortsExhausted { .. }) => condition(
                    &prev.conditions,
                    "Degraded",
                    true,
                    "PortsExhausted",
                    e.to_string(),
                    generation,
                ),
                None => condition(
                    &prev.conditions,
                    "Degraded",
                    false,
                    "AsExpected",
                    "spec valid, every member assigned".into(),
                    generation,
                ),
            },
        ],
    };
    if let Some(e) = &assign_err {
        event(
            &ctx,
            &sc,
            EventType::Warning,
            "PortsExhausted",
            e.to_string(),
        )
        .await;
    }
    if Some(&status) != sc.status.as_ref() {
        write_status(&sc_api, &name, &status).await?;
    }
    ctx.metrics.reconciles.inc();
    let labels = crate::metrics::ClusterLabels {
        namespace: ns.clone(),
        name: name.clone(),
    };
    ctx.metrics.members.get_or_create(&labels).set(count as i64);
    ctx.metrics
        .last_reconcile
        .set(started.elapsed().as_secs_f64());
    ctx.failures.lock().map(|mut f| f.remove(&name)).ok();
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// The cluster secret the injected sidecars mount, unless the spec names one:
/// created once with 32 random bytes, owned by the SessionCluster.
async fn ensure_peer_secret(
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
async fn ensure_local_secret(
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
async fn ensure_sidecar_rbac(
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
/// most one member at a time: each leaving member hands over before the next
/// goes. policy/v1 (1.21+), else policy/v1beta1.
async fn ensure_pdb(ctx: &Ctx, sc: &SessionCluster, ns: &str, name: &str) -> Result<(), Error> {
    use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
    let owner = sc
        .controller_owner_ref(&())
        .map(|o| vec![o])
        .unwrap_or_default();
    let pdb_name = format!("{name}-members");
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
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {CLUSTER_LABEL: name}}}
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

/// Exponential backoff per object: 0.5 s, 1 s, 2 s ... up to 5 minutes.
pub fn error_policy(sc: Arc<SessionCluster>, err: &Error, ctx: Arc<Ctx>) -> Action {
    ctx.metrics.failures.inc();
    let n = ctx
        .failures
        .lock()
        .map(|mut f| {
            let e = f.entry(sc.name_any()).or_insert(0);
            *e = (*e + 1).min(20);
            *e
        })
        .unwrap_or(1);
    let delay = Duration::from_millis(500u64.saturating_mul(1 << (n - 1).min(10)))
        .min(Duration::from_secs(300));
    warn!(cluster = %sc.name_any(), error = %err, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}
