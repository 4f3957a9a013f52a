//! The sidecar injection as a JSONPatch: annotations and label, the app's
//! environment, the sidecar container (native or classic) and its volumes.
//! Pure: the unit tests feed it pods and compare patches.

use crate::webhook::{INJECTED_ANNOTATION, PROBE_PORT, SIDECAR_NAME};
use k8s_openapi::api::core::v1::Pod;
use serde_json::{json, Value};
use sessionmesh_api::{CLUSTER_ANNOTATION, CLUSTER_LABEL, PORT_ANNOTATION, ROUTE_ANNOTATION};

/// What to inject, decided from the pod, the cluster and the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injection {
    pub cluster: String,
    pub route: String,
    pub port: u16,
    pub native: bool,
    pub image: String,
    pub secret_name: String,
    /// Everything the cluster's spec sets for the sidecar.
    pub settings: sessionmesh_api::ClusterSettings,
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
        // The operator finds members by this annotation; a pod that joined by
        // the label alone gets it too.
        (CLUSTER_ANNOTATION, inj.cluster.clone()),
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
            "--log-format", "json",
        ],
        "env": env,
        "ports": [{"name": "sm-replication", "containerPort": inj.port, "protocol": "TCP"},
                  {"name": "sm-probe", "containerPort": PROBE_PORT, "protocol": "TCP"}],
        "startupProbe": {"httpGet": {"path": "/readyz", "port": PROBE_PORT}, "periodSeconds": 1, "failureThreshold": 300},
        "readinessProbe": probe("/readyz"),
        "livenessProbe": probe("/healthz"),
        "volumeMounts": [{"name": "sessionmesh-peer", "mountPath": "/etc/sessionmesh/peer", "readOnly": true}],
        // Everything the Pod Security Standard "restricted" asks of a container.
        "securityContext": {
            "runAsNonRoot": true,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    });
    if let Some(args) = sidecar["args"].as_array_mut() {
        args.extend(inj.settings.to_args().into_iter().map(Value::String));
    }
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

/// The container-level rules of the "restricted" Pod Security Standard
/// (v1.20 API servers have no PodSecurity admission to check them).
pub fn restricted_violations(c: &Value) -> Vec<String> {
    let sc = &c["securityContext"];
    let mut v = Vec::new();
    if sc["allowPrivilegeEscalation"] != json!(false) {
        v.push("allowPrivilegeEscalation != false".to_owned());
    }
    if sc["runAsNonRoot"] != json!(true) {
        v.push("runAsNonRoot != true".to_owned());
    }
    if sc["runAsUser"] == json!(0) {
        v.push("runAsUser = 0".to_owned());
    }
    let drops = sc["capabilities"]["drop"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if !drops.contains(&json!("ALL")) {
        v.push("capabilities.drop lacks ALL".to_owned());
    }
    let adds = sc["capabilities"]["add"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if adds.iter().any(|a| a != "NET_BIND_SERVICE") {
        v.push(format!("capabilities.add {adds:?}"));
    }
    if !matches!(
        sc["seccompProfile"]["type"].as_str(),
        Some("RuntimeDefault" | "Localhost")
    ) {
        v.push("seccompProfile.type is not RuntimeDefault or Localhost".to_owned());
    }
    if sc["privileged"] == json!(true) {
        v.push("privileged".to_owned());
    }
    if c["ports"]
        .as_array()
        .is_some_and(|p| p.iter().any(|p| p.get("hostPort").is_some()))
    {
        v.push("hostPort".to_owned());
    }
    v
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
            secret_name: "shop-peer".into(),
            settings: sessionmesh_api::ClusterSettings {
                max_sessions: 77,
                ..Default::default()
            },
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
        assert!(args.windows(2).any(|w| w == ["--max-sessions", "77"]));
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
    fn the_sidecar_meets_the_restricted_pod_security_standard() {
        let p = pod(
            json!({"metadata": {"name": "a"}, "spec": {"containers": [{"name": "app", "image": "app"}]}}),
        );
        for native in [false, true] {
            let out = apply(&p, patch_for(&p, &inj(native)));
            let side = if native {
                &out["spec"]["initContainers"][0]
            } else {
                &out["spec"]["containers"][1]
            };
            assert_eq!(side["name"], SIDECAR_NAME);
            assert_eq!(restricted_violations(side), Vec::<String>::new());
            assert_eq!(side["securityContext"]["readOnlyRootFilesystem"], true);
        }
        // The check itself fails on a container without the fields.
        assert_eq!(
            restricted_violations(&json!({"securityContext": {"runAsNonRoot": true}})).len(),
            3
        );
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
