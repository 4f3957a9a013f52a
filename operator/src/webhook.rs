//! The mutating admission webhook: for pods annotated `sessionmesh.io/cluster`
//! it assigns the jvmRoute and receiver port at admission (so the app can read
//! its route at its first start) and injects the sidecar.
//!
//! - Native sidecar (an init container with `restartPolicy: Always`, Kubernetes
//!   1.29+): starts before the app, is ready (startup probe) before the app
//!   starts, stops after it. Classic fallback (older clusters, or chosen per
//!   cluster or per pod with `sessionmesh.io/sidecar-mode`): a regular container
//!   whose preStop waits so the app drains first.
//! - Idempotent: the marker annotation `sessionmesh.io/injected` makes a second
//!   pass (reinvocation) a no-op.
//! - Concurrent creates: assignment is serialized in the operator and recent
//!   assignments are reserved until the pods show up, so no route is handed out
//!   twice; the reconcile loop repairs anything else. Dry runs reserve
//!   nothing; a reservation whose pod never shows up lapses after
//!   `InjectConfig::reservation`, or at once when the same pod name is
//!   admitted again.

use crate::assign::{assign, PodInfo};
pub use crate::inject::{local_secret_name, patch_for, Injection, LOCAL_AUTH_ANNOTATION};
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use kube::{Api, Client, ResourceExt};
use serde_json::{json, Value};
use sessionmesh_api::{
    SessionCluster, CLUSTER_ANNOTATION, CLUSTER_LABEL, PORT_ANNOTATION, ROUTE_ANNOTATION,
};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;
use tracing::{info, warn};

pub const INJECTED_ANNOTATION: &str = "sessionmesh.io/injected";
pub const MODE_ANNOTATION: &str = "sessionmesh.io/sidecar-mode";
pub const SIDECAR_NAME: &str = "sessionmesh-sidecar";
/// The sidecar's probe port (health only; the app API stays on loopback).
pub const PROBE_PORT: u16 = 7071;

#[derive(Debug, Clone)]
pub struct InjectConfig {
    pub image: String,
    /// Whether the API server supports native sidecars (when not found out
    /// by `Admission::detecting`).
    pub native_supported: bool,
    /// How long a route and port handed out at admission stay reserved for a
    /// pod that does not show up (refused by a later admission step or by
    /// validation). Dry runs reserve nothing.
    pub reservation: Duration,
}

/// A route and port handed out at admission, when, and to which pod name
/// (empty for `generateName` pods, which have none yet).
/// One cluster's reservations, behind its own lock.
type ClusterSlot = std::sync::Arc<Mutex<Vec<Reserved>>>;

struct Reserved {
    route: String,
    port: u16,
    at: Instant,
    pod: String,
}

/// Serializes admission-time assignment and remembers recent assignments
/// until their pods are visible in the API.
pub struct Admission {
    pub client: Client,
    pub cfg: InjectConfig,
    /// Per (namespace, cluster): admissions of one cluster are serialized,
    /// those of different clusters do not wait for each other.
    reserved: Mutex<HashMap<(String, String), ClusterSlot>>,
    /// Where to find out native sidecar support by a dry run, when it is not
    /// given (`cfg.native_supported` is then unused).
    detect_in: Option<String>,
    native: tokio::sync::OnceCell<bool>,
}

impl Admission {
    /// Native sidecar support as `cfg` says.
    pub fn new(client: Client, cfg: InjectConfig) -> Self {
        Admission {
            client,
            cfg,
            reserved: Mutex::new(HashMap::new()),
            detect_in: None,
            native: tokio::sync::OnceCell::new(),
        }
    }

    /// Native sidecar support found out by a dry-run create in namespace
    /// `ns`, once, on first use.
    pub fn detecting(client: Client, cfg: InjectConfig, ns: &str) -> Self {
        Admission {
            detect_in: Some(ns.to_owned()),
            ..Admission::new(client, cfg)
        }
    }

    /// Whether native sidecars can be injected.
    pub async fn native_supported(&self) -> bool {
        let Some(ns) = &self.detect_in else {
            return self.cfg.native_supported;
        };
        *self
            .native
            .get_or_init(|| async {
                let (native, how) = crate::detect::native_sidecars(&self.client, ns).await;
                info!(native_sidecars = native, decided_by = ?how, "native sidecar support");
                native
            })
            .await
    }

    async fn injection(
        &self,
        req: &AdmissionRequest<Pod>,
        pod: &Pod,
        cluster: &str,
    ) -> anyhow::Result<Injection> {
        let ns = req.namespace.clone().unwrap_or_default();
        let sc = Api::<SessionCluster>::namespaced(self.client.clone(), &ns)
            .get_opt(cluster)
            .await?;
        let Some(sc) = sc else {
            anyhow::bail!("SessionCluster {ns}/{cluster} does not exist")
        };
        let spec = &sc.spec;
        // An invalid cluster is refused as such, before any assignment.
        let settings = sessionmesh_api::ClusterSettings::from_spec(spec).map_err(|e| {
            anyhow::anyhow!("SessionCluster {ns}/{cluster} has an invalid spec ({e}); fix it and recreate the pod")
        })?;
        let key = (ns.clone(), cluster.to_owned());
        let slot = self.reserved.lock().await.entry(key).or_default().clone();
        let mut guard = slot.lock().await;
        let pods = Api::<Pod>::namespaced(self.client.clone(), &ns)
            .list(&ListParams::default())
            .await?;
        let mut infos: Vec<PodInfo> = pods
            .items
            .iter()
            .filter(|p| {
                p.annotations().get(CLUSTER_ANNOTATION).map(String::as_str) == Some(cluster)
            })
            .map(crate::reconcile::pod_info)
            .collect();
        let seen: std::collections::BTreeSet<String> =
            infos.iter().filter_map(|p| p.route.clone()).collect();
        let reserved = &mut *guard;
        let name = pod.metadata.name.clone().unwrap_or_default();
        // Gone: pods that showed up (counted from the list now), reservations
        // past their time, and an earlier admission of this same pod name (a
        // create that was refused after us and is now tried again).
        reserved.retain(|r| {
            !seen.contains(&r.route)
                && r.at.elapsed() < self.cfg.reservation
                && (name.is_empty() || r.pod != name)
        });
        let host_network = pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false);
        infos.extend(reserved_infos(reserved, host_network));
        let me = "\u{10ffff}admitted".to_owned();
        infos.push(admitted_info(&me, &req.uid, pod, host_network));
        let (out, err) = assign(&spec.jvm_route.prefix, spec.receiver_ports, &infos);
        let Some(a) = out.into_iter().find(|a| a.pod == me) else {
            anyhow::bail!(
                "no receiver port left: {}",
                err.map(|e| e.to_string()).unwrap_or_default()
            );
        };
        if !req.dry_run {
            reserved.push(Reserved {
                route: a.route.clone(),
                port: a.port,
                at: Instant::now(),
                pod: name,
            });
        }
        drop(guard);
        let native = self.native_supported().await;
        Ok(injection_for(
            &self.cfg, native, cluster, spec, settings, pod, a,
        ))
    }

    /// Answers one AdmissionReview.
    pub async fn review(&self, body: &[u8]) -> Value {
        let review: AdmissionReview<Pod> = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "malformed AdmissionReview");
                return json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                              "response": {"uid": "", "allowed": false, "status": {"message": format!("malformed AdmissionReview: {e}")}}});
            }
        };
        let req: AdmissionRequest<Pod> = match review.try_into() {
            Ok(r) => r,
            Err(e) => {
                return json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                              "response": {"uid": "", "allowed": false, "status": {"message": format!("no request: {e}")}}});
            }
        };
        let resp = AdmissionResponse::from(&req);
        let resp = match req.object.as_ref() {
            Some(pod) => match cluster_of(pod) {
                Ok(None) => resp,
                Ok(Some(_)) if pod.annotations().contains_key(INJECTED_ANNOTATION) => resp,
                Err(e) => resp.deny(format!("sessionmesh: {e}")),
                Ok(Some(cluster)) => match self.injection(&req, pod, &cluster).await {
                    Ok(inj) => {
                        let ops = patch_for(pod, &inj);
                        info!(cluster = %cluster, route = %inj.route, port = inj.port, native = inj.native, "injecting the sidecar");
                        match serde_json::from_value::<json_patch::Patch>(Value::Array(ops)) {
                            Ok(p) => resp.with_patch(p).unwrap_or_else(|e| {
                                AdmissionResponse::from(&req).deny(e.to_string())
                            }),
                            Err(e) => resp.deny(format!("internal error building the patch: {e}")),
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "cannot inject");
                        resp.deny(format!("sessionmesh: {e}"))
                    }
                },
            },
            None => resp,
        };
        let mut out = serde_json::to_value(resp.into_review()).unwrap_or(Value::Null);
        // The AdmissionReview API carries the patch as a base64 string; the
        // response type serializes its bytes as a JSON array.
        if let Some(bytes) = out["response"]["patch"].as_array().map(|a| {
            a.iter()
                .filter_map(|b| b.as_u64().map(|b| b as u8))
                .collect::<Vec<u8>>()
        }) {
            use base64::Engine;
            out["response"]["patch"] =
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));
        }
        out
    }
}

/// The cluster a pod asks to join: its `sessionmesh.io/cluster` label (what
/// the webhook's object selector matches) or, as before, the annotation of
/// the same name.
pub fn cluster_of(pod: &Pod) -> Result<Option<String>, String> {
    let label = pod.labels().get(CLUSTER_LABEL);
    let ann = pod.annotations().get(CLUSTER_ANNOTATION);
    match (label, ann) {
        (Some(l), Some(a)) if l != a => Err(format!(
            "the label {CLUSTER_LABEL}={l:?} and the annotation {CLUSTER_ANNOTATION}={a:?} name different clusters"
        )),
        (Some(c), _) | (None, Some(c)) => Ok(Some(c.clone())),
        (None, None) => Ok(None),
    }
}

/// Routes and ports handed out by recent admissions whose pods the API does
/// not show yet, as pods for `assign`.
fn reserved_infos(reserved: &[Reserved], host_network: bool) -> Vec<PodInfo> {
    reserved
        .iter()
        .enumerate()
        .map(|(i, r)| PodInfo {
            name: format!("\u{0}reserved-{i}"),
            uid: format!("reserved-{i}"),
            created: String::new(),
            ip: None,
            host_network,
            node: None,
            ready: false,
            terminating: false,
            route: Some(r.route.clone()),
            port: Some(r.port),
        })
        .collect()
}

/// The pod under admission, as the newest pod for `assign`.
fn admitted_info(me: &str, uid: &str, pod: &Pod, host_network: bool) -> PodInfo {
    PodInfo {
        name: me.to_owned(),
        uid: format!("admitted-{uid}"),
        created: "\u{10ffff}".into(),
        ip: None,
        host_network,
        node: None,
        ready: false,
        terminating: false,
        route: pod.annotations().get(ROUTE_ANNOTATION).cloned(),
        port: pod
            .annotations()
            .get(PORT_ANNOTATION)
            .and_then(|p| p.parse().ok()),
    }
}

/// What to inject for an assignment, from the cluster's spec and the pod's
/// annotations.
fn injection_for(
    cfg: &InjectConfig,
    native_supported: bool,
    cluster: &str,
    spec: &sessionmesh_api::SessionClusterSpec,
    settings: sessionmesh_api::ClusterSettings,
    pod: &Pod,
    a: crate::assign::Assignment,
) -> Injection {
    let mode = pod
        .annotations()
        .get(MODE_ANNOTATION)
        .cloned()
        .or_else(|| spec.sidecar.mode.clone())
        .unwrap_or_else(|| {
            if native_supported {
                "native".into()
            } else {
                "classic".into()
            }
        });
    Injection {
        cluster: cluster.to_owned(),
        route: a.route,
        port: a.port,
        native: mode == "native" && native_supported,
        image: spec
            .sidecar
            .image
            .clone()
            .unwrap_or_else(|| cfg.image.clone()),
        secret_name: spec
            .peer_auth
            .as_ref()
            .map(|p| p.secret_name.clone())
            .unwrap_or_else(|| format!("{cluster}-peer")),
        settings,
        resources: spec.sidecar.resources.clone(),
        local_auth: pod
            .annotations()
            .get(LOCAL_AUTH_ANNOTATION)
            .is_none_or(|v| v != "false"),
    }
}
