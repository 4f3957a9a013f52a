//! Reconcile against a scenario-driven mock API server: fast, no processes.
//! Each scenario serves canned objects and records every request the
//! reconcile made, then asserts on them.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::too_many_lines)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use kube::runtime::events::{Recorder, Reporter};
use kube::Client;
use serde_json::{json, Value};
use sessionmesh_api::SessionCluster;
use sessionmesh_operator::reconcile::{reconcile, Ctx};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
struct Req {
    method: String,
    path: String,
    query: String,
    content_type: String,
    body: Value,
}

fn mock(pods: Value) -> (Client, Arc<Mutex<Vec<Req>>>) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let log2 = log.clone();
    let svc = tower::service_fn(move |req: http::Request<kube::client::Body>| {
        let log = log2.clone();
        let pods = pods.clone();
        async move {
            let method = req.method().to_string();
            let path = req.uri().path().to_owned();
            let query = req.uri().query().unwrap_or_default().to_owned();
            let content_type = req
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let bytes = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            log.lock().expect("log").push(Req {
                method: method.clone(),
                path: path.clone(),
                query,
                content_type,
                body: body.clone(),
            });
            if method == "GET" && path.contains("/secrets/") {
                let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"});
                return Ok::<_, std::convert::Infallible>(
                    http::Response::builder()
                        .status(404)
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(status.to_string())))
                        .expect("response"),
                );
            }
            let reply = match (method.as_str(), path.as_str()) {
                ("GET", p) if p.ends_with("/pods") => pods,
                (_, p) if p.contains("/sessionclusters/") => json!({
                    "apiVersion": "sessionmesh.io/v1alpha1", "kind": "SessionCluster",
                    "metadata": {"name": "web", "namespace": "shop"}, "spec": {}, "status": body["status"]
                }),
                // Echo patches and creates back, as an API server would.
                _ => {
                    let mut b = body;
                    if b.get("metadata").is_none() {
                        b["metadata"] = json!({"name": "x"});
                    }
                    b
                }
            };
            Ok::<_, std::convert::Infallible>(
                http::Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(reply.to_string())))
                    .expect("response"),
            )
        }
    });
    (Client::new(svc, "default"), log)
}

fn sc(spec: Value) -> Arc<SessionCluster> {
    Arc::new(
        serde_json::from_value(json!({
            "apiVersion": "sessionmesh.io/v1alpha1", "kind": "SessionCluster",
            "metadata": {"name": "web", "namespace": "shop", "uid": "sc-uid", "generation": 4},
            "spec": spec
        }))
        .expect("sc"),
    )
}

fn pod(name: &str, created: &str, ip: Option<&str>, route: Option<&str>, cluster: &str) -> Value {
    let mut ann = json!({"sessionmesh.io/cluster": cluster});
    let labels = if route.is_some() {
        json!({"sessionmesh.io/cluster": cluster})
    } else {
        json!({})
    };
    if let Some(r) = route {
        ann["sessionmesh.io/jvm-route"] = json!(r);
        ann["sessionmesh.io/receiver-port"] = json!("4000");
    }
    json!({
        "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"), "creationTimestamp": created, "annotations": ann, "labels": labels},
        "spec": {"containers": [{"name": "app", "image": "x"}]},
        "status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}
    })
}

fn ctx(client: Client) -> Arc<Ctx> {
    let rec = Recorder::new(
        client.clone(),
        Reporter {
            controller: "test".into(),
            instance: None,
        },
    );
    Arc::new(Ctx::new(client, rec))
}

#[tokio::test]
async fn assigns_new_pods_publishes_members_and_writes_status() {
    let pods = json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [
        pod("web-a", "2026-01-01T00:00:00Z", Some("10.0.0.1"), Some("node1"), "web"),
        pod("web-b", "2026-01-01T00:00:01Z", Some("10.0.0.2"), None, "web"),
        pod("web-c", "2026-01-01T00:00:02Z", None, None, "web"),
        pod("other", "2026-01-01T00:00:03Z", Some("10.0.0.9"), None, "other"),
    ]});
    let (client, log) = mock(pods);
    reconcile(sc(json!({})), ctx(client))
        .await
        .expect("reconcile");
    let log = log.lock().expect("log").clone();
    let pod_patches: Vec<&Req> = log
        .iter()
        .filter(|r| r.method == "PATCH" && r.path.contains("/pods/"))
        .collect();
    assert_eq!(
        pod_patches.len(),
        2,
        "only the unassigned members are patched: {pod_patches:?}"
    );
    assert!(pod_patches.iter().any(|r| r.path.ends_with("/web-b")
        && r.body["metadata"]["annotations"]["sessionmesh.io/jvm-route"] == "node2"));
    assert!(pod_patches.iter().any(|r| r.path.ends_with("/web-c")
        && r.body["metadata"]["annotations"]["sessionmesh.io/jvm-route"] == "node3"));
    assert!(
        !log.iter().any(|r| r.path.ends_with("/other")),
        "a pod of another cluster was touched"
    );
    let cm = log
        .iter()
        .find(|r| r.path.ends_with("/configmaps/web-members"))
        .expect("membership published");
    let doc: sessionmesh_api::MembershipDoc =
        serde_yaml::from_str(cm.body["data"]["members.yaml"].as_str().expect("doc")).expect("yaml");
    assert_eq!(
        doc.members
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>(),
        vec!["web-a", "web-b"],
        "web-c has no IP yet"
    );
    assert_eq!(cm.body["metadata"]["ownerReferences"][0]["uid"], "sc-uid");
    assert!(log.iter().any(|r| r.method == "POST"
        && r.path.ends_with("/secrets")
        && r.body["metadata"]["name"] == "web-peer"));
    let pdb = log
        .iter()
        .find(|r| r.path.contains("/poddisruptionbudgets/web-members"))
        .expect("pdb");
    assert_eq!(pdb.body["spec"]["maxUnavailable"], 1);
    let status = log
        .iter()
        .find(|r| r.path.ends_with("/sessionclusters/web/status"))
        .expect("status");
    assert_eq!(status.body["status"]["memberCount"], 3);
    assert_eq!(status.body["status"]["readyMembers"], 3);
    assert_eq!(status.body["status"]["observedGeneration"], 4);
    // Server-side apply, as the operator's field manager.
    assert_eq!(status.content_type, "application/apply-patch+yaml");
    assert!(
        status.query.contains("fieldManager=sessionmesh-operator")
            && status.query.contains("force=true"),
        "{}",
        status.query
    );
    // The recorder folds repeated reasons into an event series (a POST, then PATCHes).
    let events = log.iter().filter(|r| r.path.contains("/events")).count();
    assert_eq!(events, 2, "one Assigned event per assignment");
}

#[tokio::test]
async fn an_invalid_spec_writes_a_condition_and_touches_nothing_else() {
    let (client, log) = mock(json!({"items": []}));
    reconcile(
        sc(json!({"receiverPorts": {"first": 5000, "last": 4000}})),
        ctx(client),
    )
    .await
    .expect("no error loop");
    let log = log.lock().expect("log").clone();
    assert!(
        !log.iter()
            .any(|r| r.path.ends_with("/pods") || r.path.contains("/configmaps/")),
        "{log:?}"
    );
    let status = log
        .iter()
        .find(|r| r.path.ends_with("/status"))
        .expect("status");
    let conds = status.body["status"]["conditions"]
        .as_array()
        .expect("conditions");
    let degraded = conds
        .iter()
        .find(|c| c["type"] == "Degraded")
        .expect("Degraded");
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "InvalidSpec");
    assert!(degraded["message"]
        .as_str()
        .unwrap_or("")
        .contains("spec.receiverPorts"));
    assert!(log.iter().any(|r| r.method == "POST"
        && r.path.contains("/events")
        && r.body["reason"] == "InvalidSpec"));
}

#[tokio::test]
async fn a_route_conflict_from_a_race_is_repaired_for_the_newer_pod() {
    let pods = json!({"items": [
        pod("young", "2026-01-02T00:00:00Z", Some("10.0.0.2"), Some("node1"), "web"),
        pod("old", "2026-01-01T00:00:00Z", Some("10.0.0.1"), Some("node1"), "web"),
    ]});
    let (client, log) = mock(pods);
    reconcile(sc(json!({})), ctx(client))
        .await
        .expect("reconcile");
    let log = log.lock().expect("log").clone();
    let patched: Vec<&Req> = log
        .iter()
        .filter(|r| r.method == "PATCH" && r.path.contains("/pods/"))
        .collect();
    assert_eq!(patched.len(), 1);
    assert!(patched[0].path.ends_with("/young"));
    assert_eq!(
        patched[0].body["metadata"]["annotations"]["sessionmesh.io/jvm-route"],
        "node2"
    );
}

#[tokio::test]
async fn admission_review_in_json_patch_out() {
    use base64::Engine;
    use sessionmesh_operator::webhook::{Admission, InjectConfig};
    let pods = json!({"items": [pod("web-a", "2026-01-01T00:00:00Z", Some("10.0.0.1"), Some("node1"), "web")]});
    let (client, _log) = mock(pods);
    let adm = Admission::new(
        client,
        InjectConfig {
            image: "sessionmesh:test".into(),
            native_supported: true,
            reservation: std::time::Duration::from_secs(10),
        },
    );
    let review = json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "req-1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop", "operation": "CREATE", "userInfo": {"username": "test"},
            "object": {"metadata": {"generateName": "web-", "annotations": {"sessionmesh.io/cluster": "web"}},
                       "spec": {"containers": [{"name": "app", "image": "app"}]}}
        }
    });
    let out = adm.review(review.to_string().as_bytes()).await;
    let resp = &out["response"];
    assert_eq!(resp["uid"], "req-1");
    assert_eq!(resp["allowed"], true);
    assert_eq!(resp["patchType"], "JSONPatch");
    let patch: Value = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(resp["patch"].as_str().expect("patch"))
            .expect("b64"),
    )
    .expect("json");
    let ops = patch.as_array().expect("ops");
    // node1 is taken by web-a: the new pod gets node2, and a native sidecar.
    assert!(
        ops.iter().any(
            |o| o["path"] == "/metadata/annotations/sessionmesh.io~1jvm-route"
                && o["value"] == "node2"
        ),
        "{ops:?}"
    );
    assert!(ops
        .iter()
        .any(|o| o["path"] == "/spec/initContainers/0" && o["value"]["restartPolicy"] == "Always"));

    // Already injected (reinvocation): allowed, nothing to patch.
    let mut again = review.clone();
    again["request"]["object"]["metadata"]["annotations"]["sessionmesh.io/injected"] = json!("v1");
    let out = adm.review(again.to_string().as_bytes()).await;
    assert_eq!(out["response"]["allowed"], true);
    assert!(out["response"].get("patch").is_none_or(|p| p.is_null()));

    // Garbage is refused with a reason, not a panic.
    let out = adm.review(b"{not json").await;
    assert_eq!(out["response"]["allowed"], false);
}

#[tokio::test]
async fn backoff_is_kept_per_namespace_and_name() {
    use sessionmesh_operator::reconcile::{error_policy, Error};
    use std::time::Duration;
    let (client, _) =
        mock(json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": []}));
    let ctx = ctx(client);
    let in_ns = |ns: &str| {
        Arc::new(
            serde_json::from_value::<SessionCluster>(json!({
                "apiVersion": "sessionmesh.io/v1alpha1", "kind": "SessionCluster",
                "metadata": {"name": "web", "namespace": ns}, "spec": {}
            }))
            .expect("sc"),
        )
    };
    let err = Error::NoNamespace;
    let a = in_ns("a");
    let mut last = None;
    for _ in 0..4 {
        last = Some(error_policy(a.clone(), &err, ctx.clone()));
    }
    assert_eq!(
        last,
        Some(kube::runtime::controller::Action::requeue(
            Duration::from_secs(4)
        ))
    );
    // web in namespace b has failed once: its first backoff, not a's fifth.
    assert_eq!(
        error_policy(in_ns("b"), &err, ctx.clone()),
        kube::runtime::controller::Action::requeue(Duration::from_millis(500))
    );
}
