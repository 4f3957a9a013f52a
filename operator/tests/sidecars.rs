//! Real sidecar processes that take their membership from the operator
//! through the real API server: replication, SIGKILL failover, and how fast a
//! pod's readiness reaches the membership document and every sidecar.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::too_many_lines)]

mod common;

use common::{eventually, free_port, sidecar_bin, KubeEnv};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::PostParams;
use kube::Api;
use serde_json::json;
use sessionmesh_api::{MembershipDoc, SessionCluster};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A run of `n` consecutive free ports on 127.0.0.1 (from the test port window,
/// taken whole so nothing else in this process gets them).
fn free_range(n: u16) -> u16 {
    for _ in 0..200 {
        let base = free_port();
        if base < 1024 || base > 65000 - n {
            continue;
        }
        let ok = (1..n).all(|i| free_port() == base + i);
        if ok {
            return base;
        }
    }
    panic!("no free port range");
}

struct Sidecar {
    child: Child,
    http: std::net::SocketAddr,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sidecars run as user `sidecar`, which may only get/list/watch the one ConfigMap.
fn start_sidecar(env: &KubeEnv, bin: &PathBuf, ns: &str, pod: &str, secret: &PathBuf) -> Sidecar {
    let log = std::fs::File::create(env.dir.join(format!("{pod}.log"))).expect("log");
    let mut cmd = Command::new(bin);
    cmd.env("KUBECONFIG", env.dir.join("kubeconfig-sidecar"))
        .args([
            "run",
            "--kube-membership",
            &format!("{ns}/web-members"),
            "--member",
            pod,
            "--http",
            "127.0.0.1:0",
            "--send",
            "sync",
        ])
        .arg("--secret-file")
        .arg(secret)
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log));
    let (child, line) = sessionmesh_sidecar::demo::localcluster::spawn_with_first_line(
        &mut cmd,
        Some(Duration::from_secs(30)),
    )
    .expect("spawn");
    let line = line.unwrap_or_else(|| {
        panic!(
            "sidecar {pod} did not start: {}",
            env.log_tail(&format!("{pod}.log"))
        )
    });
    let v: serde_json::Value = serde_json::from_str(&line).expect("json");
    Sidecar {
        child,
        http: v["http"]
            .as_str()
            .unwrap_or_default()
            .parse()
            .expect("http"),
    }
}

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return (0, String::new());
    };
    let _ = s
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    let code = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    (
        code,
        out.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default(),
    )
}

async fn send(addr: std::net::SocketAddr, method: &str, path: &str, body: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return 0;
    };
    let _ = s
        .write_all(format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes())
        .await;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0)
}

async fn state_of(addr: std::net::SocketAddr, member: &str) -> Option<String> {
    let (_, body) = get(addr, "/v1/cluster").await;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["members"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == member)?["state"]
        .as_str()
        .map(str::to_owned)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_follow_the_operator_and_survive_sigkill() {
    let bin = sidecar_bin();
    let env = KubeEnv::start().await;
    env.apply_crds().await;
    env.namespace("shop").await;
    let first = free_range(10);
    let api: Api<SessionCluster> = Api::namespaced(env.client.clone(), "shop");
    let sc: SessionCluster = serde_json::from_value(json!({
        "apiVersion": "sessionmesh.io/v1alpha1", "kind": "SessionCluster", "metadata": {"name": "web"},
        "spec": {"receiverPorts": {"first": first, "last": first + 9}, "replication": {"send": "sync"}}
    }))
    .expect("sc");
    api.create(&PostParams::default(), &sc)
        .await
        .expect("create");
    let _op = env.operator("shop", "op");
    // hostNetwork pods on one node: one IP, so the operator gives them distinct ports.
    for i in 0..3 {
        env.pod("shop", &format!("web-{i}"), "web", true).await;
        env.set_running("shop", &format!("web-{i}"), "127.0.0.1", false)
            .await;
    }
    // Least privilege for sidecars, set up by the operator: they authenticate as
    // the pods' service account (shop/default) and may only read their ConfigMap.
    eventually(
        Duration::from_secs(10),
        "the operator's sidecar Role and binding",
        || async {
            let rb = Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(
                env.client.clone(),
                "shop",
            )
            .get_opt("web-sessionmesh-sidecar")
            .await
            .ok()??;
            rb.subjects?
                .iter()
                .any(|s| s.kind == "ServiceAccount" && s.name == "default")
                .then_some(())
        },
    )
    .await;
    let limited = common::client_for(&env.dir.join("kubeconfig-sidecar")).await;
    let denied = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(limited.clone(), "shop")
        .list(&Default::default())
        .await;
    assert!(denied.is_err(), "the sidecar's user must not list pods");
    let denied = Api::<ConfigMap>::namespaced(limited, "shop")
        .get("some-other-configmap")
        .await;
    assert!(
        matches!(denied, Err(kube::Error::Api(ref e)) if e.code == 403),
        "{denied:?}"
    );
    let secret = env.dir.join("secret");
    std::fs::write(&secret, "kubernetes-test-cluster-secret").expect("secret");
    let mut sidecars: Vec<Option<Sidecar>> = (0..3)
        .map(|i| {
            Some(start_sidecar(
                &env,
                &bin,
                "shop",
                &format!("web-{i}"),
                &secret,
            ))
        })
        .collect();
    for (i, s) in sidecars.iter().enumerate() {
        let addr = s.as_ref().expect("sidecar").http;
        eventually(
            Duration::from_secs(20),
            &format!("web-{i} ready"),
            || async { (get(addr, "/readyz").await.0 == 200).then_some(()) },
        )
        .await;
    }
    let (a, b, c) = (
        sidecars[0].as_ref().expect("a").http,
        sidecars[1].as_ref().expect("b").http,
        sidecars[2].as_ref().expect("c").http,
    );
    // The cluster has formed when every member sees the others alive (a sync
    // write waits only for members its writer considers live).
    for (x, others) in [
        (a, ["web-1", "web-2"]),
        (b, ["web-0", "web-2"]),
        (c, ["web-0", "web-1"]),
    ] {
        for o in others {
            eventually(Duration::from_secs(10), "mutual visibility", || async {
                (state_of(x, o).await.as_deref() == Some("alive")).then_some(())
            })
            .await;
        }
    }
    assert_eq!(
        send(
            a,
            "POST",
            "/v1/sessions",
            r#"{"id":"K8S","attributes":{"user":"YWxpY2U="}}"#
        )
        .await,
        201
    );
    assert_eq!(
        send(a, "PUT", "/v1/sessions/K8S/attributes/cart", "3").await,
        204
    );
    let (code, body) = get(b, "/v1/sessions/K8S/attributes/cart").await;
    assert_eq!((code, body.as_str()), (200, "3"), "sync write not on web-1");
    // SIGKILL web-0's sidecar: the others declare it dead within a second and keep the session.
    let t = Instant::now();
    drop(sidecars[0].take());
    eventually(Duration::from_secs(3), "web-0 dead on web-1", || async {
        (state_of(b, "web-0").await.as_deref() == Some("dead")).then_some(())
    })
    .await;
    let detect = t.elapsed();
    assert!(detect < Duration::from_secs(1), "detection took {detect:?}");
    let (code, body) = get(c, "/v1/sessions/K8S/attributes/user").await;
    assert_eq!((code, body.as_str()), (200, "alice"));
    eprintln!("kubernetes membership: SIGKILL detected in {detect:?}");

    // Pod readiness -> membership document -> every sidecar: time it.
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), "shop");
    let (mut to_doc, mut to_sidecars) = (Vec::new(), Vec::new());
    for round in 0..5 {
        let pod = format!("extra-{round}");
        env.pod("shop", &pod, "web", true).await;
        // Assigned first (no IP yet), then it "starts".
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t0 = Instant::now();
        env.set_running("shop", &pod, "127.0.0.1", true).await;
        eventually(
            Duration::from_secs(10),
            "document lists the pod",
            || async {
                let cm = cms.get("web-members").await.ok()?;
                let doc: MembershipDoc =
                    serde_yaml::from_str(cm.data?.get("members.yaml")?).ok()?;
                doc.members
                    .iter()
                    .any(|m| m.name == pod && m.ready)
                    .then_some(())
            },
        )
        .await;
        to_doc.push(t0.elapsed().as_secs_f64() * 1000.0);
        eventually(
            Duration::from_secs(10),
            "both sidecars know the pod",
            || async {
                (state_of(b, &pod).await.is_some() && state_of(c, &pod).await.is_some())
                    .then_some(())
            },
        )
        .await;
        to_sidecars.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    eprintln!(
        "pod Ready -> membership document: p50 {:.0} ms p99 {:.0} ms; -> every sidecar: p50 {:.0} ms p99 {:.0} ms",
        pct(&mut to_doc.clone(), 0.5),
        pct(&mut to_doc, 0.99),
        pct(&mut to_sidecars.clone(), 0.5),
        pct(&mut to_sidecars, 0.99)
    );
    assert!(
        pct(&mut to_sidecars, 0.99) < 1000.0,
        "membership took more than a second to reach the sidecars"
    );
}
