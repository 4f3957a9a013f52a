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
    /// Whether the API server supports native sidecars (1.29+).
    pub native_supported: bool,
}

/// What to inject, decided from the pod, the cluster and the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injection {
    pub cluster: String,
    pub route: String,
    pub port: u16,
    pub native: bool,
    pub image: String,
    pub send: String,
    pub secret_name: String,
    pub heartbeat: String,
    pub suspect_after: String,
    pub probe_timeout: String,
    pub resources: Option<sessionmesh_api::SidecarResources>,
    /// Protect the local API with the cluster's token and Redis password
    /// (off with the pod annotation `sessionmesh.io/local-auth: "false"`).
    pub local_auth: bool,
}

/// Pod annotation that turns the local API credentials off for one pod.
pub const LOCAL_AUTH_ANNOTATION: &str = "sessionmesh.io/local-auth";

/// The Secret with a cluster's local API token and Redis password.
pub fn local_secret_name(cluster: &str) -> String {
    format!("{cluster}-local")
}

fn ms(s: &str) -> u64 {
    sessionmesh_api::parse_duration_ms(s).unwrap_or(0)
}

/// The JSONPatch for a pod. Pure: the unit tests feed it pods and compare patches.
pub fn patch_for(pod: &Pod, inj: &Injection) -> Vec<Value> {
    let mut ops = Vec::new();
    metadata_ops(pod, inj, &mut ops);
    app_env_ops(pod, inj, &mut ops);
    let sidecar = sidecar_container(inj);
    placement_ops(pod, inj, sidecar, &mut ops);
    volume_ops(pod, inj, &mut ops);
    ops
}

/// A JSON pointer segment (RFC 6901).
fn esc(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

/// A reference to a key of the cluster's local-credentials Secret.
fn from_local(inj: &Injection, key: &str) -> Value {
    json!({"secretKeyRef": {"name": local_secret_name(&inj.cluster), "key": key}})
}

/// The assignment annotations and the cluster label.
fn metadata_ops(pod: &Pod, inj: &Injection, ops: &mut Vec<Value>) {
    let has_ann = pod.metadata.annotations.is_some();
    if !has_ann {
        ops.push(json!({"op": "add", "path": "/metadata/annotations", "value": {}}));
    }
    for (k, v) in [
        (ROUTE_ANNOTATION, inj.route.clone()),
        (PORT_ANNOTATION, inj.port.to_string()),
        (INJECTED_ANNOTATION, "v1".to_owned()),
    ] {
        ops.push(
            json!({"op": "add", "path": format!("/metadata/annotations/{}", esc(k)), "value": v}),
        );
    }
    if pod.metadata.labels.is_none() {
        ops.push(json!({"op": "add", "path": "/metadata/labels", "value": {}}));
    }
    ops.push(json!({"op": "add", "path": format!("/metadata/labels/{}", esc(CLUSTER_LABEL)), "value": inj.cluster}));
}

/// What every app container needs to reach its sidecar, where not already set.
fn app_env_ops(pod: &Pod, inj: &Injection, ops: &mut Vec<Value>) {
    let mut app_env = vec![
        json!({"name": "SESSIONMESH_JVM_ROUTE", "value": inj.route}),
        json!({"name": "SESSIONMESH_CLUSTER", "value": inj.cluster}),
        json!({"name": "SESSIONMESH_HTTP", "value": "127.0.0.1:7070"}),
        json!({"name": "SESSIONMESH_REDIS", "value": "127.0.0.1:6379"}),
    ];
    if inj.local_auth {
        // What the app needs to reach its sidecar: the token for the HTTP API,
        // the password for the Redis endpoint.
        app_env.push(
            json!({"name": "SESSIONMESH_API_TOKEN", "valueFrom": from_local(inj, "api-token")}),
        );
        app_env.push(json!({"name": "SESSIONMESH_REDIS_PASSWORD", "valueFrom": from_local(inj, "redis-password")}));
    }
    let containers = pod
        .spec
        .as_ref()
        .map(|s| s.containers.clone())
        .unwrap_or_default();
    for (i, c) in containers.iter().enumerate() {
        if c.env.is_none() {
            ops.push(
                json!({"op": "add", "path": format!("/spec/containers/{i}/env"), "value": []}),
            );
        }
        for e in &app_env {
            let present = c.env.as_ref().is_some_and(|env| {
                env.iter()
                    .any(|x| Some(x.name.as_str()) == e["name"].as_str())
            });
            if !present {
                ops.push(
                    json!({"op": "add", "path": format!("/spec/containers/{i}/env/-"), "value": e}),
                );
            }
        }
    }
}

/// The sidecar container, with the local credentials when they are on.
fn sidecar_container(inj: &Injection) -> Value {
    let field = |p: &str| json!({"valueFrom": {"fieldRef": {"fieldPath": p}}});
    let mut env = vec![
        json!({"name": "POD_NAME"}),
        json!({"name": "POD_NAMESPACE"}),
        json!({"name": "POD_IP"}),
        json!({"name": "SESSIONMESH_JVM_ROUTE", "value": inj.route}),
        json!({"name": "SESSIONMESH_RECEIVER_PORT", "value": inj.port.to_string()}),
    ];
    for (e, p) in env
        .iter_mut()
        .zip(["metadata.name", "metadata.namespace", "status.podIP"])
    {
        if let (Some(obj), Some(f)) = (e.as_object_mut(), field(p).as_object()) {
            obj.extend(f.clone());
        }
    }
    let probe = |path: &str| json!({"httpGet": {"path": path, "port": PROBE_PORT}, "periodSeconds": 2, "timeoutSeconds": 1});
    let mut sidecar = json!({
        "name": SIDECAR_NAME,
        "image": inj.image,
        "args": [
            "run",
            "--kube-membership", format!("$(POD_NAMESPACE)/{}", sessionmesh_api::members_configmap(&inj.cluster)),
            "--member", "$(POD_NAME)",
            "--listen", format!("0.0.0.0:{}", inj.port),
            "--http", "127.0.0.1:7070",
            "--redis", "127.0.0.1:6379",
            "--probe", format!("0.0.0.0:{PROBE_PORT}"),
            "--secret-file", "/etc/sessionmesh/peer/secret",
            "--send", inj.send,
            "--heartbeat-interval-ms", ms(&inj.heartbeat).to_string(),
            "--suspect-after-ms", ms(&inj.suspect_after).to_string(),
            "--probe-timeout-ms", ms(&inj.probe_timeout).to_string(),
            "--log-format", "json",
        ],
        "env": env,
        "ports": [{"name": "sm-replication", "containerPort": inj.port, "protocol": "TCP"},
                  {"name": "sm-probe", "containerPort": PROBE_PORT, "protocol": "TCP"}],
        "startupProbe": {"httpGet": {"path": "/readyz", "port": PROBE_PORT}, "periodSeconds": 1, "failureThreshold": 300},
        "readinessProbe": probe("/readyz"),
        "livenessProbe": probe("/healthz"),
        "volumeMounts": [{"name": "sessionmesh-peer", "mountPath": "/etc/sessionmesh/peer", "readOnly": true}],
        "securityContext": {"runAsNonRoot": true, "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true},
    });
    if let Some(r) = &inj.resources {
        sidecar["resources"] = json!({"requests": r.requests, "limits": r.limits});
    }
    if inj.local_auth {
        if let Some(args) = sidecar["args"].as_array_mut() {
            args.extend([
                json!("--api-token-file"),
                json!("/etc/sessionmesh/local/api-token"),
            ]);
        }
        if let Some(env) = sidecar["env"].as_array_mut() {
            env.push(json!({"name": "SESSIONMESH_REDIS_PASSWORD", "valueFrom": from_local(inj, "redis-password")}));
        }
        if let Some(m) = sidecar["volumeMounts"].as_array_mut() {
            m.push(json!({"name": "sessionmesh-local", "mountPath": "/etc/sessionmesh/local", "readOnly": true}));
        }
    }
    sidecar
}

/// The sidecar as a native sidecar (first init container, restartPolicy
/// Always) where the server supports it, else as a container with a preStop wait.
fn placement_ops(pod: &Pod, inj: &Injection, mut sidecar: Value, ops: &mut Vec<Value>) {
    if inj.native {
        sidecar["restartPolicy"] = json!("Always");
        let has_init = pod
            .spec
            .as_ref()
            .is_some_and(|s| s.init_containers.is_some());
        if !has_init {
            ops.push(json!({"op": "add", "path": "/spec/initContainers", "value": []}));
        }
        // First, so it is up before any other init container or the app.
        ops.push(json!({"op": "add", "path": "/spec/initContainers/0", "value": sidecar}));
    } else {
        // The app gets SIGTERM at the same time; waiting lets it drain first,
        // then the sidecar flushes, announces its leave and exits.
        sidecar["lifecycle"] = json!({"preStop": {"exec": {"command": ["/usr/local/bin/sessionmesh-sidecar", "pause", "--seconds", "5"]}}});
        ops.push(json!({"op": "add", "path": "/spec/containers/-", "value": sidecar}));
    }
}

/// The peer secret's volume, and the local credentials' when they are on.
fn volume_ops(pod: &Pod, inj: &Injection, ops: &mut Vec<Value>) {
    let has_volumes = pod.spec.as_ref().is_some_and(|s| s.volumes.is_some());
    if !has_volumes {
        ops.push(json!({"op": "add", "path": "/spec/volumes", "value": []}));
    }
    ops.push(json!({"op": "add", "path": "/spec/volumes/-", "value": {"name": "sessionmesh-peer", "secret": {"secretName": inj.secret_name}}}));
    if inj.local_auth {
        ops.push(json!({"op": "add", "path": "/spec/volumes/-", "value": {"name": "sessionmesh-local", "secret": {"secretName": local_secret_name(&inj.cluster)}}}));
    }
}

/// Serializes admission-time assignment and remembers recent assignments
/// until their pods are visible in the API.
pub struct Admission {
    pub client: Client,
    pub cfg: InjectConfig,
    reserved: Mutex<HashMap<(String, String), Vec<(String, u16, Instant)>>>,
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
        for (i, (route, port, _)) in reserved.iter().enumerate() {
            infos.push(PodInfo {
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
            });
        }
        let me = "\u{10ffff}admitted".to_owned();
        infos.push(PodInfo {
            name: me.clone(),
            uid: format!("admitted-{}", req.uid),
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
        });
        let (out, err) = assign(&spec.jvm_route.prefix, spec.receiver_ports, &infos);
        let Some(a) = out.into_iter().find(|a| a.pod == me) else {
            anyhow::bail!(
                "no receiver port left: {}",
                err.map(|e| e.to_string()).unwrap_or_default()
            );
        };
        reserved.push((a.route.clone(), a.port, Instant::now()));
        let mode = pod
            .annotations()
            .get(MODE_ANNOTATION)
            .cloned()
            .or_else(|| spec.sidecar.mode.clone())
            .unwrap_or_else(|| {
                if self.cfg.native_supported {
                    "native".into()
                } else {
                    "classic".into()
                }
            });
        Ok(Injection {
            cluster: cluster.to_owned(),
            route: a.route,
            port: a.port,
            native: mode == "native" && self.cfg.native_supported,
            image: spec
                .sidecar
                .image
                .clone()
                .unwrap_or_else(|| self.cfg.image.clone()),
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
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(v: Value) -> Pod {
        serde_json::from_value(v).expect("pod")
    }
    fn inj(native: bool) -> Injection {
        Injection {
            cluster: "shop".into(),
            route: "node3".into(),
            port: 4001,
            native,
            image: "sessionmesh:1".into(),
            send: "sync".into(),
            secret_name: "shop-peer".into(),
            heartbeat: "100ms".into(),
            suspect_after: "500ms".into(),
            probe_timeout: "300ms".into(),
            resources: Some(sessionmesh_api::SidecarResources {
                requests: [("cpu".to_owned(), "50m".to_owned())].into(),
                limits: [("memory".to_owned(), "128Mi".to_owned())].into(),
            }),
            local_auth: false,
        }
    }
    fn apply(p: &Pod, ops: Vec<Value>) -> Value {
        let mut doc = serde_json::to_value(p).expect("json");
        let patch: json_patch::Patch = serde_json::from_value(Value::Array(ops)).expect("patch");
        json_patch::patch(&mut doc, &patch).expect("the patch applies");
        doc
    }

    #[test]
    fn classic_injection_adds_container_env_annotations_and_volume() {
        let p = pod(
            json!({"metadata": {"name": "a", "annotations": {"sessionmesh.io/cluster": "shop"}},
                           "spec": {"containers": [{"name": "app", "image": "app", "env": [{"name": "X", "value": "1"}]}]}}),
        );
        let out = apply(&p, patch_for(&p, &inj(false)));
        let cs = out["spec"]["containers"].as_array().expect("containers");
        assert_eq!(cs.len(), 2);
        assert_eq!(cs[1]["name"], SIDECAR_NAME);
        assert!(cs[1]["lifecycle"]["preStop"].is_object());
        assert_eq!(cs[1]["resources"]["requests"]["cpu"], "50m");
        assert_eq!(cs[1]["resources"]["limits"]["memory"], "128Mi");
        assert!(cs[1].get("restartPolicy").is_none());
        let env: Vec<&str> = cs[0]["env"]
            .as_array()
            .expect("env")
            .iter()
            .map(|e| e["name"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(
            env,
            vec![
                "X",
                "SESSIONMESH_JVM_ROUTE",
                "SESSIONMESH_CLUSTER",
                "SESSIONMESH_HTTP",
                "SESSIONMESH_REDIS"
            ]
        );
        assert_eq!(cs[0]["env"][1]["value"], "node3");
        assert_eq!(
            out["metadata"]["annotations"]["sessionmesh.io/jvm-route"],
            "node3"
        );
        assert_eq!(
            out["metadata"]["annotations"]["sessionmesh.io/receiver-port"],
            "4001"
        );
        assert_eq!(out["metadata"]["annotations"][INJECTED_ANNOTATION], "v1");
        assert_eq!(out["metadata"]["labels"]["sessionmesh.io/cluster"], "shop");
        assert_eq!(
            out["spec"]["volumes"][0]["secret"]["secretName"],
            "shop-peer"
        );
        let args: Vec<&str> = cs[1]["args"]
            .as_array()
            .expect("args")
            .iter()
            .map(|a| a.as_str().unwrap_or(""))
            .collect();
        assert!(args
            .windows(2)
            .any(|w| w == ["--kube-membership", "$(POD_NAMESPACE)/shop-members"]));
        assert!(args.windows(2).any(|w| w == ["--listen", "0.0.0.0:4001"]));
    }

    #[test]
    fn local_auth_gives_sidecar_and_app_the_clusters_local_credentials() {
        let p = pod(
            json!({"metadata": {"name": "a", "annotations": {"sessionmesh.io/cluster": "shop"}},
                           "spec": {"containers": [{"name": "app", "image": "app"}, {"name": "worker", "image": "w", "env": []}]}}),
        );
        let out = apply(
            &p,
            patch_for(
                &p,
                &Injection {
                    local_auth: true,
                    ..inj(false)
                },
            ),
        );
        let cs = out["spec"]["containers"].as_array().expect("containers");
        for app in &cs[..2] {
            let env = app["env"].as_array().expect("env");
            for (name, key) in [
                ("SESSIONMESH_API_TOKEN", "api-token"),
                ("SESSIONMESH_REDIS_PASSWORD", "redis-password"),
            ] {
                let e = env
                    .iter()
                    .find(|e| e["name"] == name)
                    .unwrap_or_else(|| panic!("{} has no {name}", app["name"]));
                assert_eq!(
                    e["valueFrom"]["secretKeyRef"],
                    json!({"name": "shop-local", "key": key})
                );
            }
        }
        let side = &cs[2];
        let args: Vec<&str> = side["args"]
            .as_array()
            .expect("args")
            .iter()
            .map(|a| a.as_str().unwrap_or(""))
            .collect();
        assert!(
            args.windows(2)
                .any(|w| w == ["--api-token-file", "/etc/sessionmesh/local/api-token"]),
            "{args:?}"
        );
        assert!(side["env"]
            .as_array()
            .expect("env")
            .iter()
            .any(|e| e["name"] == "SESSIONMESH_REDIS_PASSWORD"));
        assert!(side["volumeMounts"]
            .as_array()
            .expect("mounts")
            .iter()
            .any(|m| m["mountPath"] == "/etc/sessionmesh/local"));
        assert!(out["spec"]["volumes"]
            .as_array()
            .expect("v")
            .iter()
            .any(|v| v["secret"]["secretName"] == "shop-local"));
        // Off: none of it.
        let out = apply(&p, patch_for(&p, &inj(false)));
        assert!(!out.to_string().contains("shop-local"));
    }

    #[test]
    fn native_injection_is_a_first_init_container_with_restart_policy_always() {
        let p = pod(
            json!({"metadata": {"name": "a", "annotations": {"sessionmesh.io/cluster": "shop"}, "labels": {"app": "x"}},
                           "spec": {"initContainers": [{"name": "migrate", "image": "m"}], "containers": [{"name": "app", "image": "app"}],
                                    "volumes": [{"name": "data", "emptyDir": {}}]}}),
        );
        let out = apply(&p, patch_for(&p, &inj(true)));
        let init = out["spec"]["initContainers"].as_array().expect("init");
        assert_eq!(init[0]["name"], SIDECAR_NAME);
        assert_eq!(init[0]["restartPolicy"], "Always");
        assert!(init[0]["startupProbe"].is_object());
        assert_eq!(init[1]["name"], "migrate");
        assert_eq!(out["spec"]["containers"].as_array().expect("c").len(), 1);
        assert_eq!(out["spec"]["volumes"].as_array().expect("v").len(), 2);
        assert_eq!(out["metadata"]["labels"]["app"], "x");
    }

    #[test]
    fn a_second_pass_has_nothing_to_add_to_app_env() {
        let p = pod(
            json!({"metadata": {"name": "a"}, "spec": {"containers": [{"name": "app", "image": "app"}]}}),
        );
        let once = apply(&p, patch_for(&p, &inj(false)));
        let again: Pod = serde_json::from_value(once).expect("pod");
        let ops = patch_for(&again, &inj(false));
        assert!(
            !ops.iter().any(|o| o["path"]
                .as_str()
                .is_some_and(|p| p.starts_with("/spec/containers/0/env"))),
            "{ops:?}"
        );
    }
}
