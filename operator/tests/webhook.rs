//! Sidecar injection through the real API server: a MutatingWebhookConfiguration
//! by `url:` pointing at the operator, with the operator's self-managed CA.
//! Native or classic injection is asserted from what the server supports
//! (a dry-run create), not from its version.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::too_many_lines)]

mod common;

use common::{eventually, webhook_env};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{PostParams, ResourceExt};
use kube::Api;
use serde_json::json;
use sessionmesh_api::SessionCluster;
use std::collections::BTreeSet;
use std::time::Duration;

/// A pod spec made to pass the "restricted" Pod Security Standard, as an app
/// in such a namespace has to be: the injected sidecar must not break it.
fn restricted(mut spec: serde_json::Value) -> serde_json::Value {
    spec["securityContext"] =
        json!({"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}});
    for c in spec["containers"].as_array_mut().expect("containers") {
        c["securityContext"] =
            json!({"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}});
    }
    spec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn annotated_pods_come_back_injected_with_unique_routes() {
    let (env, op) = webhook_env("app", &[]).await;
    let nss: Api<Namespace> = Api::all(env.client.clone());
    nss.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "plain"}})).expect("ns"),
    )
    .await
    .expect("namespace");
    let scs: Api<SessionCluster> = Api::namespaced(env.client.clone(), "app");
    scs.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"apiVersion": "sessionmesh.io/v1alpha1", "kind": "SessionCluster", "metadata": {"name": "shop"},
            "spec": {"replication": {"send": "sync"}, "sidecar": {"resources": {"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}}}}}))
        .expect("sc"),
    )
    .await
    .expect("create sc");

    let pods: Api<Pod> = Api::namespaced(env.client.clone(), "app");
    let created = pods
        .create(&PostParams::default(), &serde_json::from_value(json!({
            "metadata": {"name": "web-0", "labels": {"sessionmesh.io/cluster": "shop"}},
            "spec": restricted(json!({"containers": [{"name": "app", "image": "app:1", "env": [{"name": "JAVA_OPTS", "value": "-Xmx1g"}]}]}))
        })).expect("pod"))
        .await
        .expect("create pod through the webhook");
    let ann = created.annotations();
    assert_eq!(
        ann.get("sessionmesh.io/jvm-route").map(String::as_str),
        Some("node1")
    );
    assert_eq!(
        ann.get("sessionmesh.io/receiver-port").map(String::as_str),
        Some("4000")
    );
    assert_eq!(
        ann.get("sessionmesh.io/injected").map(String::as_str),
        Some("v1")
    );
    // Joined by the label: the annotation the operator follows is added.
    assert_eq!(
        ann.get("sessionmesh.io/cluster").map(String::as_str),
        Some("shop")
    );
    assert_eq!(
        created
            .labels()
            .get("sessionmesh.io/cluster")
            .map(String::as_str),
        Some("shop")
    );
    let spec = created.spec.as_ref().expect("spec");
    let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
    let sidecar = if env.native_sidecars("app").await {
        // Native: the first init container, restartPolicy Always kept by the server.
        assert_eq!(names, vec!["app"]);
        let init = spec.init_containers.as_ref().expect("init containers");
        assert_eq!(init[0].name, "sessionmesh-sidecar");
        assert_eq!(init[0].restart_policy.as_deref(), Some("Always"));
        &init[0]
    } else {
        // Classic fallback: a container with a preStop wait.
        assert_eq!(names, vec!["app", "sessionmesh-sidecar"]);
        assert!(spec.init_containers.is_none());
        assert!(
            spec.containers[1]
                .lifecycle
                .as_ref()
                .and_then(|l| l.pre_stop.as_ref())
                .is_some(),
            "classic sidecar needs a preStop wait"
        );
        &spec.containers[1]
    };
    assert_eq!(sidecar.image.as_deref(), Some("sessionmesh:test"));
    // The restricted Pod Security Standard, checked field by field (1.20
    // has no PodSecurity admission; newer servers enforce it on this
    // namespace too, see the namespace labels above).
    let as_json = serde_json::to_value(sidecar).expect("json");
    assert_eq!(
        sessionmesh_operator::inject::restricted_violations(&as_json),
        Vec::<String>::new()
    );
    assert!(
        sidecar.readiness_probe.is_some()
            && sidecar.liveness_probe.is_some()
            && sidecar.startup_probe.is_some()
    );
    let res = sidecar
        .resources
        .as_ref()
        .expect("resources from the SessionCluster");
    assert_eq!(
        res.requests
            .as_ref()
            .and_then(|r| r.get("cpu"))
            .map(|q| q.0.as_str()),
        Some("50m")
    );
    assert_eq!(
        res.limits
            .as_ref()
            .and_then(|r| r.get("memory"))
            .map(|q| q.0.as_str()),
        Some("128Mi")
    );
    let app_env = spec.containers[0].env.as_ref().expect("env");
    assert!(
        app_env
            .iter()
            .any(|e| e.name == "SESSIONMESH_JVM_ROUTE" && e.value.as_deref() == Some("node1")),
        "the app sees its route at first start"
    );
    assert!(
        app_env.iter().any(|e| e.name == "JAVA_OPTS"),
        "existing env kept"
    );
    assert!(spec.volumes.as_ref().is_some_and(|v| v.iter().any(|v| v
        .secret
        .as_ref()
        .and_then(|s| s.secret_name.as_deref())
        == Some("shop-peer"))));

    // Not annotated, or in a namespace that did not opt in: untouched.
    let plain = pods
        .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "other"}, "spec": restricted(json!({"containers": [{"name": "x", "image": "x"}]}))})).expect("pod"))
        .await
        .expect("create");
    assert_eq!(plain.spec.as_ref().map(|s| s.containers.len()), Some(1));
    let elsewhere: Api<Pod> = Api::namespaced(env.client.clone(), "plain");
    let p = elsewhere
        .create(&PostParams::default(), &serde_json::from_value(json!({
            "metadata": {"name": "web", "annotations": {"sessionmesh.io/cluster": "shop"}}, "spec": {"containers": [{"name": "x", "image": "x"}]}
        })).expect("pod"))
        .await
        .expect("create");
    assert_eq!(p.spec.as_ref().map(|s| s.containers.len()), Some(1));

    // Concurrent creates: distinct routes at admission.
    let mut tasks = Vec::new();
    for _ in 1..=10 {
        let pods = pods.clone();
        tasks.push(tokio::spawn(async move {
            let p: Pod = serde_json::from_value(json!({
                "metadata": {"generateName": "web-", "annotations": {"sessionmesh.io/cluster": "shop"}},
                "spec": restricted(json!({"containers": [{"name": "app", "image": "app:1"}]}))
            }))
            .expect("pod");
            pods.create(&PostParams::default(), &p).await.expect("concurrent create")
        }));
    }
    let mut routes = BTreeSet::new();
    for t in tasks {
        let p = t.await.expect("task");
        routes.insert(
            p.annotations()
                .get("sessionmesh.io/jvm-route")
                .cloned()
                .expect("route"),
        );
    }
    assert_eq!(
        routes.len(),
        10,
        "duplicate routes handed out at admission: {routes:?}"
    );
    assert!(!routes.contains("node1"));
    // The operator agrees with what admission assigned: after it has reconciled
    // the new pods, nothing is rewritten.
    let seen = op
        .metric("sessionmesh_operator_reconciles_total")
        .await
        .unwrap_or(0.0);
    let pods_again = pods.clone();
    eventually(
        Duration::from_secs(20),
        "a reconcile that sees all 11 members",
        || {
            let op = &op;
            let pods = pods_again.clone();
            async move {
                let n = op.metric("sessionmesh_operator_reconciles_total").await?;
                let members = pods
                    .list(&Default::default())
                    .await
                    .ok()?
                    .items
                    .iter()
                    .filter(|p| p.labels().contains_key("sessionmesh.io/cluster"))
                    .count();
                (n > seen && members == 11).then_some(())
            }
        },
    )
    .await;
    let after: BTreeSet<String> = pods
        .list(&Default::default())
        .await
        .expect("list")
        .items
        .iter()
        .filter(|p| p.annotations().contains_key("sessionmesh.io/cluster"))
        .filter_map(|p| p.annotations().get("sessionmesh.io/jvm-route").cloned())
        .collect();
    assert_eq!(after.len(), 11);
}
