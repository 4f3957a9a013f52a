//! The operator against a real kube-apiserver and etcd on loopback.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::too_many_lines)]

mod common;

use common::{eventually, KubeEnv};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use sessionmesh_api::{MembershipDoc, SessionCluster, PORT_ANNOTATION, ROUTE_ANNOTATION};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

async fn cluster(env: &KubeEnv, ns: &str, name: &str, spec: serde_json::Value) {
    let api: Api<SessionCluster> = Api::namespaced(env.client.clone(), ns);
    let sc: SessionCluster = serde_json::from_value(json!({
        "apiVersion": "sessionmesh.io/v1alpha1", "kind": "SessionCluster", "metadata": {"name": name}, "spec": spec
    }))
    .expect("sc");
    api.create(&PostParams::default(), &sc)
        .await
        .expect("create SessionCluster");
}

async fn assignments(env: &KubeEnv, ns: &str) -> BTreeMap<String, (String, String)> {
    let api: Api<Pod> = Api::namespaced(env.client.clone(), ns);
    api.list(&Default::default())
        .await
        .expect("pods")
        .items
        .into_iter()
        .filter_map(|p| {
            let a = p.annotations();
            Some((
                p.name_any(),
                (
                    a.get(ROUTE_ANNOTATION)?.clone(),
                    a.get(PORT_ANNOTATION)?.clone(),
                ),
            ))
        })
        .collect()
}

async fn doc(env: &KubeEnv, ns: &str, cluster: &str) -> Option<MembershipDoc> {
    let api: Api<ConfigMap> = Api::namespaced(env.client.clone(), ns);
    let cm = api
        .get_opt(&sessionmesh_api::members_configmap(cluster))
        .await
        .ok()??;
    serde_yaml::from_str(cm.data?.get(sessionmesh_api::MEMBERS_KEY)?).ok()
}

async fn status(
    env: &KubeEnv,
    ns: &str,
    name: &str,
) -> Option<sessionmesh_api::SessionClusterStatus> {
    let api: Api<SessionCluster> = Api::namespaced(env.client.clone(), ns);
    api.get(name).await.ok()?.status
}

fn cond<'a>(
    st: &'a sessionmesh_api::SessionClusterStatus,
    t: &str,
) -> Option<&'a sessionmesh_api::Condition> {
    st.conditions.iter().find(|c| c.type_ == t)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_get_unique_routes_membership_and_status_and_survive_operator_restart() {
    let env = KubeEnv::start().await;
    env.apply_crds().await;
    env.namespace("shop").await;
    cluster(&env, "shop", "web", json!({})).await;
    for i in 0..3 {
        env.pod("shop", &format!("web-{i}"), "web", false).await;
    }
    // A pod of another cluster and an unannotated pod are left alone.
    env.pod("shop", "other-0", "other", false).await;
    let mut op = env.operator("shop", "op-a");
    let got = eventually(Duration::from_secs(20), "3 assignments", || async {
        let a = assignments(&env, "shop").await;
        (a.keys().filter(|k| k.starts_with("web-")).count() == 3).then_some(a)
    })
    .await;
    let routes: BTreeSet<&str> = got
        .iter()
        .filter(|(k, _)| k.starts_with("web-"))
        .map(|(_, (r, _))| r.as_str())
        .collect();
    assert_eq!(routes, BTreeSet::from(["node1", "node2", "node3"]));
    assert!(
        got.iter().all(|(_, (_, p))| p == "4000"),
        "pods with their own IPs all use the first port"
    );
    // No IP yet: members are assigned and in the status, but not published.
    let st = eventually(
        Duration::from_secs(10),
        "status with 3 members without IPs",
        || async {
            status(&env, "shop", "web")
                .await
                .filter(|s| s.member_count == 3)
        },
    )
    .await;
    assert!(st.members.iter().all(|m| m.ip.is_none() && !m.ready));
    assert_eq!(
        cond(&st, "Ready").map(|c| c.reason.as_str()),
        Some("MembersNotReady")
    );
    assert_eq!(
        doc(&env, "shop", "web").await.map(|d| d.members.len()),
        Some(0)
    );
    for i in 0..3 {
        env.set_running(
            "shop",
            &format!("web-{i}"),
            &format!("10.1.0.{}", i + 1),
            true,
        )
        .await;
    }
    let d = eventually(
        Duration::from_secs(10),
        "membership document with 3 members",
        || async {
            doc(&env, "shop", "web")
                .await
                .filter(|d| d.members.len() == 3 && d.members.iter().all(|m| m.ready))
        },
    )
    .await;
    assert_eq!(d.cluster, "web");
    assert!(d
        .members
        .iter()
        .all(|m| m.address.ends_with(":4000") && m.address.starts_with("10.1.0.")));
    let st = eventually(Duration::from_secs(10), "status Ready", || async {
        status(&env, "shop", "web")
            .await
            .filter(|s| s.ready_members == 3)
    })
    .await;
    assert_eq!(st.member_count, 3);
    assert_eq!(cond(&st, "Ready").map(|c| c.status.as_str()), Some("True"));
    assert_eq!(
        cond(&st, "Degraded").map(|c| c.status.as_str()),
        Some("False")
    );
    assert_eq!(st.observed_generation, 1);
    // The cluster secret the sidecars mount, and a disruption budget of one member.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(env.client.clone(), "shop");
    let secret = secrets.get("web-peer").await.expect("web-peer secret");
    assert_eq!(
        secret
            .data
            .as_ref()
            .and_then(|d| d.get("secret"))
            .map(|s| s.0.len()),
        Some(64)
    );
    // The local API credentials the webhook hands to the sidecar and the apps.
    let local = secrets.get("web-local").await.expect("web-local secret");
    for key in ["api-token", "redis-password"] {
        assert_eq!(
            local
                .data
                .as_ref()
                .and_then(|d| d.get(key))
                .map(|s| s.0.len()),
            Some(48),
            "{key}"
        );
    }
    let pdbs = env.pdb_api("shop").await;
    let pdb = pdbs.get("web-members").await.expect("pdb");
    assert_eq!(pdb.data["spec"]["maxUnavailable"], 1);
    assert_eq!(
        pdb.data["spec"]["selector"]["matchLabels"]["sessionmesh.io/cluster"],
        "web"
    );
    // Backup mode is accepted, and the budget follows K.
    let scs: Api<SessionCluster> = Api::namespaced(env.client.clone(), "shop");
    scs.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replication": {"mode": "backup", "backups": 2}}})),
    )
    .await
    .expect("backup mode");
    eventually(Duration::from_secs(20), "maxUnavailable 2", || async {
        pdbs.get("web-members")
            .await
            .ok()
            .filter(|p| p.data["spec"]["maxUnavailable"] == 2)
    })
    .await;
    let st = status(&env, "shop", "web").await.expect("status");
    assert_eq!(
        cond(&st, "Degraded").map(|c| c.status.as_str()),
        Some("False"),
        "backup mode is a valid spec"
    );
    scs.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replication": {"mode": "all"}}})),
    )
    .await
    .expect("back to all");
    eventually(Duration::from_secs(20), "maxUnavailable 1", || async {
        pdbs.get("web-members")
            .await
            .ok()
            .filter(|p| p.data["spec"]["maxUnavailable"] == 1)
    })
    .await;
    let role = Api::<k8s_openapi::api::rbac::v1::Role>::namespaced(env.client.clone(), "shop")
        .get("web-sessionmesh-sidecar")
        .await
        .expect("role");
    let rule = &role.rules.expect("rules")[0];
    assert_eq!(
        rule.resource_names.as_deref(),
        Some(&["web-members".to_owned()][..])
    );
    assert_eq!(rule.verbs, vec!["get", "list", "watch"]);
    let labeled = Api::<Pod>::namespaced(env.client.clone(), "shop")
        .get("web-0")
        .await
        .expect("pod");
    assert_eq!(
        labeled
            .labels()
            .get("sessionmesh.io/cluster")
            .map(String::as_str),
        Some("web")
    );

    // Restart the operator: nothing changes.
    op.kill();
    let before = assignments(&env, "shop").await;
    let op2 = env.operator("shop", "op-b");
    eventually(
        Duration::from_secs(20),
        "the new operator to reconcile",
        || async {
            op2.metric("sessionmesh_operator_reconciles_total")
                .await
                .filter(|n| *n >= 1.0)
        },
    )
    .await;
    assert_eq!(
        assignments(&env, "shop").await,
        before,
        "assignments changed across an operator restart"
    );

    // A terminating member is marked leaving, then removed; its route is freed.
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), "shop");
    pods.patch(
        "web-1",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": ["test/hold"]}})),
    )
    .await
    .expect("finalizer");
    pods.delete("web-1", &DeleteParams::default())
        .await
        .expect("delete");
    eventually(Duration::from_secs(10), "web-1 marked leaving", || async {
        doc(&env, "shop", "web").await.filter(|d| {
            d.members
                .iter()
                .any(|m| m.name == "web-1" && m.leaving && !m.ready)
        })
    })
    .await;
    let freed = before["web-1"].0.clone();
    pods.patch(
        "web-1",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .expect("drop finalizer");
    eventually(Duration::from_secs(10), "web-1 removed", || async {
        doc(&env, "shop", "web")
            .await
            .filter(|d| d.members.len() == 2 && !d.members.iter().any(|m| m.name == "web-1"))
    })
    .await;
    env.pod("shop", "web-3", "web", false).await;
    let a = eventually(Duration::from_secs(10), "web-3 assigned", || async {
        assignments(&env, "shop").await.get("web-3").cloned()
    })
    .await;
    assert_eq!(a.0, freed, "the freed route is reused (lowest free index)");
}

/// 50 pods by default; `SESSIONMESH_OPERATOR_PODS=200` for the sizing figure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_host_network_pods_get_distinct_routes_and_ports() {
    let n: usize = std::env::var("SESSIONMESH_OPERATOR_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let env = KubeEnv::start().await;
    env.apply_crds().await;
    env.namespace("big").await;
    cluster(
        &env,
        "big",
        "web",
        json!({"receiverPorts": {"first": 5000, "last": 5299}}),
    )
    .await;
    let op = env.operator("big", "op");
    for i in 0..n {
        env.pod("big", &format!("web-{i:03}"), "web", true).await;
    }
    let t = Instant::now();
    let a = eventually(Duration::from_secs(120), "every pod assigned", || async {
        let a = assignments(&env, "big").await;
        (a.len() == n).then_some(a)
    })
    .await;
    eprintln!("{n} pods assigned in {:?}", t.elapsed());
    let routes: BTreeSet<&String> = a.values().map(|(r, _)| r).collect();
    let ports: BTreeSet<&String> = a.values().map(|(_, p)| p).collect();
    assert_eq!(routes.len(), n, "duplicate routes");
    assert_eq!(
        ports.len(),
        n,
        "hostNetwork pods share an IP: ports must differ"
    );
    // A steady-state reconcile (nothing to assign) with n members.
    let api: Api<SessionCluster> = Api::namespaced(env.client.clone(), "big");
    let before = op
        .metric("sessionmesh_operator_reconciles_total")
        .await
        .unwrap_or(0.0);
    api.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"touch": "1"}}})),
    )
    .await
    .expect("touch");
    eventually(Duration::from_secs(20), "one more reconcile", || async {
        op.metric("sessionmesh_operator_reconciles_total")
            .await
            .filter(|v| *v > before)
    })
    .await;
    let last = op
        .metric("sessionmesh_operator_last_reconcile_seconds")
        .await
        .unwrap_or(f64::NAN);
    eprintln!("steady reconcile with {n} members: {:.1} ms", last * 1000.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_spec_is_a_condition_not_a_crash() {
    let env = KubeEnv::start().await;
    env.apply_crds().await;
    env.namespace("bad").await;
    // What the schema cannot express: first after last.
    cluster(
        &env,
        "bad",
        "web",
        json!({"receiverPorts": {"first": 5000, "last": 4000}}),
    )
    .await;
    // What it can: a prefix that is not a valid route start is refused by the API server.
    let api: Api<SessionCluster> = Api::namespaced(env.client.clone(), "bad");
    let bad: SessionCluster = serde_json::from_value(json!({
        "apiVersion": "sessionmesh.io/v1alpha1", "kind": "SessionCluster", "metadata": {"name": "worse"},
        "spec": {"jvmRoute": {"prefix": "Node-"}}
    }))
    .expect("sc");
    let err = api
        .create(&PostParams::default(), &bad)
        .await
        .expect_err("schema must refuse the prefix");
    assert!(err.to_string().contains("prefix"), "{err}");
    let op = env.operator("bad", "op");
    let st = eventually(Duration::from_secs(20), "InvalidSpec condition", || async {
        status(&env, "bad", "web")
            .await
            .filter(|s| cond(s, "Degraded").is_some_and(|c| c.status == "True"))
    })
    .await;
    let d = cond(&st, "Degraded").expect("degraded");
    assert_eq!(d.reason, "InvalidSpec");
    assert!(d.message.contains("spec.receiverPorts"), "{}", d.message);
    assert_eq!(cond(&st, "Ready").map(|c| c.status.as_str()), Some("False"));
    // Fixing the spec clears it.
    api.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"receiverPorts": {"first": 4000, "last": 5000}}})),
    )
    .await
    .expect("fix");
    eventually(Duration::from_secs(20), "Degraded cleared", || async {
        status(&env, "bad", "web").await.filter(|s| {
            s.observed_generation == 2 && cond(s, "Degraded").is_some_and(|c| c.status == "False")
        })
    })
    .await;
    assert!(op.metric("sessionmesh_operator_leader").await == Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_exactly_one_reconciles_and_the_standby_takes_over() {
    let env = KubeEnv::start().await;
    env.apply_crds().await;
    env.namespace("ha").await;
    cluster(&env, "ha", "web", json!({})).await;
    let mut a = env.operator("ha", "op-a");
    eventually(Duration::from_secs(20), "op-a leads", || async {
        a.metric("sessionmesh_operator_leader")
            .await
            .filter(|v| *v == 1.0)
    })
    .await;
    let b = env.operator("ha", "op-b");
    env.pod("ha", "web-0", "web", false).await;
    eventually(Duration::from_secs(20), "web-0 assigned", || async {
        assignments(&env, "ha").await.get("web-0").cloned()
    })
    .await;
    // Give the standby time to (wrongly) act, then check it did not.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(b.metric("sessionmesh_operator_leader").await, Some(0.0));
    assert_eq!(
        b.metric("sessionmesh_operator_reconciles_total").await,
        Some(0.0),
        "the standby reconciled"
    );
    assert!(
        a.metric("sessionmesh_operator_reconciles_total")
            .await
            .unwrap_or(0.0)
            >= 1.0
    );
    // The leader shuts down gracefully: the standby takes over and reconciles.
    a.terminate();
    eventually(Duration::from_secs(20), "op-b leads", || async {
        b.metric("sessionmesh_operator_leader")
            .await
            .filter(|v| *v == 1.0)
    })
    .await;
    env.pod("ha", "web-1", "web", false).await;
    let got = eventually(
        Duration::from_secs(20),
        "web-1 assigned by op-b",
        || async { assignments(&env, "ha").await.get("web-1").cloned() },
    )
    .await;
    assert_eq!(got.0, "node2");
}
