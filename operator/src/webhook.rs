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
//!   twice; the reconcile loop repairs anything else.

use crate::assign::{assign, PodInfo};
pub use crate::inject::{local_secret_name, patch_for, Injection, LOCAL_AUTH_ANNOTATION};
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use kube::{Api, Client, ResourceExt};
use serde_json::{json, Value};
use sessionmesh_api::{SessionCluster, CLUSTER_ANNOTATION, PORT_ANNOTATION, ROUTE_ANNOTATION};
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
    /// Whether the API server supports native sidecars (1.29+).
    pub native_supported: bool,
}

/// A route and port handed out at admission, and when.
type Reserved = (String, u16, Instant);

/// Serializes admission-time assignment and remembers recent assignments
/// until their pods are visible in the API.
pub struct Admission {
    pub client: Client,
    pub cfg: InjectConfig,
    reserved: Mutex<HashMap<(String, String), Vec<Reserved>>>,
}

impl Admission {
    pub fn new(client: Client, cfg: InjectConfig) -> Self {
        Admission {
            client,
            cfg,
            reserved: Mutex::new(HashMap::new()),
        }
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
        let mut guard = self.reserved.lock().await;
        let key = (ns.clone(), cluster.to_owned());
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
        let reserved = guard.entry(key).or_default();
        reserved.retain(|(route, _, at)| {
            !seen.contains(route) && at.elapsed() < Duration::from_secs(60)
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
        reserved.push((a.route.clone(), a.port, Instant::now()));
        Ok(injection_for(&self.cfg, cluster, spec, pod, a))
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
            Some(pod) => match pod.annotations().get(CLUSTER_ANNOTATION).cloned() {
                None => resp,
                Some(_) if pod.annotations().contains_key(INJECTED_ANNOTATION) => resp,
                Some(cluster) => match self.injection(&req, pod, &cluster).await {
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

/// Routes and ports handed out by recent admissions whose pods the API does
/// not show yet, as pods for `assign`.
fn reserved_infos(reserved: &[(String, u16, Instant)], host_network: bool) -> Vec<PodInfo> {
    reserved
        .iter()
        .enumerate()
        .map(|(i, (route, port, _))| PodInfo {
            name: format!("\u{0}reserved-{i}"),
            uid: format!("reserved-{i}"),
            created: String::new(),
            ip: None,
            host_network,
            node: None,
            ready: false,
            terminating: false,
            route: Some(route.clone()),
            port: Some(*port),
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
    cluster: &str,
    spec: &sessionmesh_api::SessionClusterSpec,
    pod: &Pod,
    a: crate::assign::Assignment,
) -> Injection {
    let mode = pod
        .annotations()
        .get(MODE_ANNOTATION)
        .cloned()
        .or_else(|| spec.sidecar.mode.clone())
        .unwrap_or_else(|| {
            if cfg.native_supported {
                "native".into()
            } else {
                "classic".into()
            }
        });
    Injection {
        cluster: cluster.to_owned(),
        route: a.route,
        port: a.port,
        native: mode == "native" && cfg.native_supported,
        image: spec
            .sidecar
            .image
            .clone()
            .unwrap_or_else(|| cfg.image.clone()),
        send: spec.replication.send.as_str().into(),
        secret_name: spec
            .peer_auth
            .as_ref()
            .map(|p| p.secret_name.clone())
            .unwrap_or_else(|| format!("{cluster}-peer")),
        heartbeat: spec.failure_detection.heartbeat_interval.clone(),
        suspect_after: spec.failure_detection.suspect_after.clone(),
        probe_timeout: spec.failure_detection.probe_timeout.clone(),
        resources: spec.sidecar.resources.clone(),
        local_auth: pod
            .annotations()
            .get(LOCAL_AUTH_ANNOTATION)
            .is_none_or(|v| v != "false"),
    }
}
