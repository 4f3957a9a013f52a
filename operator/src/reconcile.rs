//! The reconcile loop for one `SessionCluster`: validate the spec, find member
//! pods, assign and record jvmRoutes and ports, publish the membership
//! ConfigMap (server-side apply), write status and events.
//!
//! Invalid specs become a `Degraded` condition, not an error loop. API errors
//! back off exponentially per object.

use crate::assign::{assign, Assignment, PodInfo};
use crate::owned::{ensure_local_secret, ensure_pdb, ensure_peer_secret, ensure_sidecar_rbac};
use crate::status::{cluster_status, event, reject_invalid, report_forbidden, write_status};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{EventType, Recorder};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use sessionmesh_api::{
    members_configmap, DocMember, MemberStatus, MembershipDoc, SessionCluster, CLUSTER_ANNOTATION,
    CLUSTER_LABEL, MEMBERS_KEY, PORT_ANNOTATION, ROUTE_ANNOTATION,
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
    /// The membership document could not be written; nothing is published
    /// rather than an empty document (which would tell every sidecar that it
    /// is alone).
    #[error("membership document: {0}")]
    Yaml(#[from] serde_yaml::Error),
}

pub use crate::metrics::Metrics;

pub struct Ctx {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub(crate) failures: Mutex<HashMap<String, u32>>,
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

pub(crate) fn now_rfc3339() -> String {
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

pub async fn reconcile(sc: Arc<SessionCluster>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let out = reconcile_inner(sc.clone(), ctx.clone()).await;
    if let Err(Error::Kube(kube::Error::Api(e))) = &out {
        if e.code == 403 {
            report_forbidden(&ctx, &sc, &e.message).await;
        }
    }
    out
}

async fn reconcile_inner(sc: Arc<SessionCluster>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = sc.namespace().ok_or(Error::NoNamespace)?;
    let name = sc.name_any();
    let generation = sc.metadata.generation.unwrap_or(0);
    let sc_api: Api<SessionCluster> = Api::namespaced(ctx.client.clone(), &ns);
    let prev = sc.status.clone().unwrap_or_default();

    // The same check the webhook makes before it injects.
    if let Err(e) = sessionmesh_api::ClusterSettings::from_spec(&sc.spec) {
        return reject_invalid(&ctx, &sc, &sc_api, &prev, e.to_string()).await;
    }

    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let members = member_pods(&pods_api, &name).await?;
    let infos: Vec<PodInfo> = members.iter().map(pod_info).collect();
    let (assignments, assign_err) =
        assign(&sc.spec.jvm_route.prefix, sc.spec.receiver_ports, &infos);
    write_assignments(&ctx, &sc, &pods_api, &members, &assignments).await?;
    let (statuses, doc) = membership(&name, &assignments, &infos);
    publish_members(&ctx, &sc, &ns, &doc).await?;

    ensure_peer_secret(&ctx, &sc, &ns, &name).await?;
    ensure_local_secret(&ctx, &sc, &ns, &name).await?;
    ensure_pdb(&ctx, &sc, &ns, &name).await?;
    ensure_sidecar_rbac(&ctx, &sc, &ns, &name, &members).await?;

    let count = statuses.len() as u32;
    let status = cluster_status(
        &prev,
        generation,
        statuses,
        &assignments,
        assign_err.as_ref(),
    );
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
    ctx.failures
        .lock()
        .map(|mut f| f.remove(&backoff_key(&sc)))
        .ok();
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// The pods that joined the cluster with the annotation and have not finished.
async fn member_pods(pods_api: &Api<Pod>, name: &str) -> Result<Vec<Pod>, Error> {
    let pods = pods_api.list(&ListParams::default()).await?;
    Ok(pods
        .items
        .into_iter()
        .filter(|p| p.annotations().get(CLUSTER_ANNOTATION).map(String::as_str) == Some(name))
        .filter(|p| {
            !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
        })
        .collect())
}

/// Writes each new assignment (and the cluster label) onto its pod.
async fn write_assignments(
    ctx: &Ctx,
    sc: &SessionCluster,
    pods_api: &Api<Pod>,
    members: &[Pod],
    assignments: &[Assignment],
) -> Result<(), Error> {
    let name = sc.name_any();
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
                ctx,
                sc,
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
    Ok(())
}

/// The members' status entries and the membership document, ordered by jvmRoute.
fn membership(
    name: &str,
    assignments: &[Assignment],
    infos: &[PodInfo],
) -> (Vec<MemberStatus>, MembershipDoc) {
    let by_pod: HashMap<&str, &PodInfo> = infos.iter().map(|p| (p.name.as_str(), p)).collect();
    let mut statuses = Vec::new();
    let mut doc = MembershipDoc {
        cluster: name.to_owned(),
        members: Vec::new(),
    };
    for a in assignments {
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
    (statuses, doc)
}

/// Publishes the membership document in the cluster's ConfigMap (server-side apply).
async fn publish_members(
    ctx: &Ctx,
    sc: &SessionCluster,
    ns: &str,
    doc: &MembershipDoc,
) -> Result<(), Error> {
    let name = sc.name_any();
    let cm_name = members_configmap(&name);
    let owner = sc
        .controller_owner_ref(&())
        .map(|o| vec![o])
        .unwrap_or_default();
    let text = serde_yaml::to_string(doc)?;
    let cm = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": cm_name, "namespace": ns, "ownerReferences": owner, "labels": {"app.kubernetes.io/managed-by": MANAGER, "sessionmesh.io/cluster": name}},
        "data": {MEMBERS_KEY: text},
    });
    let cm_api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
    cm_api
        .patch(
            &cm_name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&cm),
        )
        .await?;
    Ok(())
}

/// What failures are counted by: namespace and name (names repeat across
/// namespaces).
pub(crate) fn backoff_key(sc: &SessionCluster) -> String {
    format!("{}/{}", sc.namespace().unwrap_or_default(), sc.name_any())
}

/// Exponential backoff per object: 0.5 s, 1 s, 2 s ... up to 5 minutes.
pub fn error_policy(sc: Arc<SessionCluster>, err: &Error, ctx: Arc<Ctx>) -> Action {
    ctx.metrics.failures.inc();
    let n = ctx
        .failures
        .lock()
        .map(|mut f| {
            let e = f.entry(backoff_key(&sc)).or_insert(0);
            *e = (*e + 1).min(20);
            *e
        })
        .unwrap_or(1);
    let delay = Duration::from_millis(500u64.saturating_mul(1 << (n - 1).min(10)))
        .min(Duration::from_secs(300));
    warn!(cluster = %backoff_key(&sc), error = %err, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assign::AssignError;
    use sessionmesh_api::SessionClusterStatus;

    fn pod(name: &str, ip: Option<&str>, ready: bool, terminating: bool) -> PodInfo {
        PodInfo {
            name: name.into(),
            uid: format!("uid-{name}"),
            created: "2026-01-01T00:00:00Z".into(),
            ip: ip.map(Into::into),
            host_network: false,
            node: None,
            ready,
            terminating,
            route: None,
            port: None,
        }
    }

    fn assigned(pod: &str, route: &str, changed: bool) -> Assignment {
        Assignment {
            pod: pod.into(),
            route: route.into(),
            port: 4000,
            changed,
        }
    }

    #[test]
    fn the_document_lists_members_with_an_ip_in_route_order() {
        let infos = [
            pod("web-b", Some("10.0.0.2"), true, false),
            pod("web-a", Some("fd00::1"), true, true),
            pod("web-c", None, false, false),
        ];
        let assignments = [
            assigned("web-b", "node10", false),
            assigned("web-a", "node2", false),
            assigned("web-c", "node3", false),
            assigned("gone", "node4", false),
        ];
        let (statuses, doc) = membership("web", &assignments, &infos);
        assert_eq!(doc.cluster, "web");
        let names: Vec<&str> = statuses.iter().map(|m| m.pod.as_str()).collect();
        assert_eq!(names, ["web-a", "web-c", "web-b"], "node2 < node3 < node10");
        let addrs: Vec<&str> = doc.members.iter().map(|m| m.address.as_str()).collect();
        assert_eq!(
            addrs,
            ["[fd00::1]:4000", "10.0.0.2:4000"],
            "no IP, no entry"
        );
        assert!(
            doc.members[0].leaving && !doc.members[0].ready,
            "terminating"
        );
        assert!(statuses[2].ready);
    }

    #[test]
    fn conditions_follow_readiness_assignments_and_port_exhaustion() {
        let prev = SessionClusterStatus::default();
        let (statuses, _) = membership(
            "web",
            &[assigned("a", "node1", false)],
            &[pod("a", Some("10.0.0.1"), true, false)],
        );
        let st = cluster_status(
            &prev,
            3,
            statuses.clone(),
            &[assigned("a", "node1", false)],
            None,
        );
        let get = |st: &SessionClusterStatus, t: &str| {
            let c = st
                .conditions
                .iter()
                .find(|c| c.type_ == t)
                .expect("condition");
            (c.status.clone(), c.reason.clone())
        };
        assert_eq!(get(&st, "Ready"), ("True".into(), "AllMembersReady".into()));
        assert_eq!(get(&st, "Progressing"), ("False".into(), "Stable".into()));
        assert_eq!(get(&st, "Degraded"), ("False".into(), "AsExpected".into()));
        assert_eq!(
            (st.member_count, st.ready_members, st.observed_generation),
            (1, 1, 3)
        );
        let err = AssignError::PortsExhausted {
            first: 4000,
            last: 4000,
            pods: 1,
        };
        let st = cluster_status(
            &prev,
            3,
            statuses,
            &[assigned("a", "node1", true)],
            Some(&err),
        );
        assert_eq!(get(&st, "Progressing"), ("True".into(), "Assigning".into()));
        assert_eq!(
            get(&st, "Degraded"),
            ("True".into(), "PortsExhausted".into())
        );
        let st = cluster_status(&prev, 3, Vec::new(), &[], None);
        assert_eq!(get(&st, "Ready"), ("False".into(), "NoMembers".into()));
    }
}
