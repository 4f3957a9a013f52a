//! Every field of a SessionCluster's spec reaches the sidecar: a cluster with
//! a non-default value for each, a pod admitted through the webhook, and the
//! sidecar started with exactly the injected arguments (addresses and file
//! paths mapped to the test's), read back from its `/v1/cluster`.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::too_many_lines)]

mod common;

use common::{eventually, free_port, sidecar_bin, webhook_env};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{PostParams, ResourceExt};
use kube::Api;
use serde_json::{json, Value};
use sessionmesh_api::{ClusterSettings, SendMode, SessionCluster};
use std::process::{Command, Stdio};
use std::time::Duration;

async fn get_json(addr: std::net::SocketAddr, path: &str, token: &str) -> Option<Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    serde_json::from_str(out.split_once("\r\n\r\n")?.1).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spec_field_reaches_a_running_sidecar() {
    let bin = sidecar_bin();
    // The sidecar's test credentials are those of shop's default ServiceAccount.
    let (env, _op) = webhook_env("shop", &[]).await;
    let port = free_port();
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "web-secret"}, "stringData": {"secret": "a cluster secret of 32 bytes...."}
    }))
    .expect("secret");
    Api::<Secret>::namespaced(env.client.clone(), "shop")
        .create(&PostParams::default(), &secret)
        .await
        .expect("secret");
    let spec = json!({
        "replication": {"mode": "backup", "backups": 2, "send": "sync"},
        "receiverPorts": {"first": port, "last": port},
        "jvmRoute": {"prefix": "tc"},
        "failureDetection": {"heartbeatInterval": "150ms", "suspectAfter": "900ms", "probeTimeout": "400ms"},
        "sessions": {"maxInactiveInterval": "45m", "maxSessionBytes": 65536, "maxSessions": 1234},
        "sidecar": {"image": "sessionmesh:custom", "mode": "classic",
                    "resources": {"requests": {"cpu": "20m"}, "limits": {"memory": "96Mi"}}},
        "peerAuth": {"secretName": "web-secret"}
    });
    Api::<SessionCluster>::namespaced(env.client.clone(), "shop")
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"apiVersion": "sessionmesh.io/v1alpha1", "kind": "SessionCluster",
                "metadata": {"name": "web"}, "spec": spec}),
            )
            .expect("sc"),
        )
        .await
        .expect("create sc");
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), "shop");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "web-0", "labels": {"sessionmesh.io/cluster": "web"}},
        "spec": {
            "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "app", "image": "app:1",
                "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}}]
        }
    }))
    .expect("pod");
    let created = pods
        .create(&PostParams::default(), &pod)
        .await
        .expect("create through the webhook");
    assert_eq!(
        created
            .annotations()
            .get("sessionmesh.io/jvm-route")
            .map(String::as_str),
        Some("tc1")
    );
    let spec = created.spec.expect("spec");
    // sidecar.mode classic: a container, even where native sidecars work.
    let side = spec
        .containers
        .iter()
        .find(|c| c.name == "sessionmesh-sidecar")
        .expect("classic sidecar container");
    assert_eq!(side.image.as_deref(), Some("sessionmesh:custom"));
    let res = side.resources.as_ref().expect("resources");
    assert_eq!(
        res.requests
            .as_ref()
            .and_then(|r| r.get("cpu"))
            .map(|q| q.0.as_str()),
        Some("20m")
    );
    assert_eq!(
        res.limits
            .as_ref()
            .and_then(|r| r.get("memory"))
            .map(|q| q.0.as_str()),
        Some("96Mi")
    );
    assert!(spec.volumes.expect("volumes").iter().any(|v| v
        .secret
        .as_ref()
        .and_then(|s| s.secret_name.as_deref())
        == Some("web-secret")));

    // Run the injected arguments. Kubelet would substitute $(VAR)s and mount
    // the Secrets; the test does both, and keeps every address on loopback.
    let secret_file = env.dir.join("peer-secret");
    std::fs::write(&secret_file, "a cluster secret of 32 bytes....").expect("secret file");
    let token_file = env.dir.join("api-token");
    std::fs::write(&token_file, "contract-test-token").expect("token file");
    let args: Vec<String> = side
        .args
        .clone()
        .expect("args")
        .into_iter()
        .map(|a| {
            let a = a
                .replace("$(POD_NAMESPACE)", "shop")
                .replace("$(POD_NAME)", "web-0");
            match a.as_str() {
                "127.0.0.1:7070" | "127.0.0.1:6379" | "0.0.0.0:7071" => "127.0.0.1:0".to_owned(),
                "/etc/sessionmesh/peer/secret" => secret_file.display().to_string(),
                "/etc/sessionmesh/local/api-token" => token_file.display().to_string(),
                x if x.starts_with("0.0.0.0:") => x.replace("0.0.0.0", "127.0.0.1"),
                x => x.to_owned(),
            }
        })
        .collect();
    env.set_running("shop", "web-0", "127.0.0.1", true).await;
    let mut cmd = Command::new(&bin);
    cmd.env("KUBECONFIG", env.dir.join("kubeconfig-sidecar"))
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::from(
            std::fs::File::create(env.dir.join("web-0.log")).expect("log"),
        ));
    let (mut child, line) = sessionmesh_sidecar::demo::localcluster::spawn_with_first_line(
        &mut cmd,
        Some(Duration::from_secs(30)),
    )
    .expect("spawn");
    let line = line.unwrap_or_else(|| {
        panic!(
            "the sidecar did not start with {args:?}: {}",
            env.log_tail("web-0.log")
        )
    });
    let v: Value = serde_json::from_str(&line).expect("json");
    let http: std::net::SocketAddr = v["http"].as_str().expect("http").parse().expect("addr");
    let cluster = eventually(Duration::from_secs(20), "/v1/cluster", || async {
        get_json(http, "/v1/cluster", "contract-test-token").await
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let got: ClusterSettings =
        serde_json::from_value(cluster["settings"].clone()).expect("settings in /v1/cluster");
    assert_eq!(
        got,
        ClusterSettings {
            send: SendMode::Sync,
            replication: sessionmesh_api::ReplicationMode::Backup,
            backups: 2,
            heartbeat_interval_ms: 150,
            suspect_after_ms: 900,
            probe_timeout_ms: 400,
            max_inactive_seconds: 2700,
            max_session_bytes: 65536,
            max_sessions: 1234,
        }
    );
    assert_eq!(cluster["me"]["jvmRoute"], "tc1", "{cluster}");
    assert_eq!(
        cluster["me"]["address"],
        format!("127.0.0.1:{port}"),
        "{cluster}"
    );
}
