//! Admission through the real API server, with the chart's webhook
//! configuration: what an operator outage blocks, what dry runs and refused
//! pods reserve, how a pod of an invalid cluster is denied, and the CRD as
//! kubectl shows it.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::too_many_lines)]

mod common;

use common::{eventually, webhook_env, KubeEnv};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{PostParams, ResourceExt};
use kube::Api;
use serde_json::{json, Value};
use sessionmesh_api::SessionCluster;
use std::time::Duration;

fn restricted_pod(meta: Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": meta,
        "spec": {
            "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "app", "image": "app:1",
                            "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}}]
        }
    }))
    .expect("pod")
}

fn host_pod(name: &str, container: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"sessionmesh.io/cluster": "hosts"}},
        "spec": {"hostNetwork": true, "containers": [{"name": container, "image": "app:1"}]}
    }))
    .expect("pod")
}

async fn cluster(env: &KubeEnv, ns: &str, name: &str, spec: Option<Value>) {
    let mut sc = json!({"apiVersion": "sessionmesh.io/v1alpha1", "kind": "SessionCluster", "metadata": {"name": name}});
    if let Some(spec) = spec {
        sc["spec"] = spec;
    }
    // As YAML would send it: the Rust type always has a spec.
    let ar = kube::core::ApiResource::erase::<SessionCluster>(&());
    Api::<kube::core::DynamicObject>::namespaced_with(env.client.clone(), ns, &ar)
        .create(
            &PostParams::default(),
            &serde_json::from_value(sc).expect("sc"),
        )
        .await
        .unwrap_or_else(|e| panic!("create SessionCluster {name}: {e}"));
}

fn port_of(p: &Pod) -> (String, String) {
    let a = p.annotations();
    (
        a.get("sessionmesh.io/jvm-route")
            .cloned()
            .unwrap_or_default(),
        a.get("sessionmesh.io/receiver-port")
            .cloned()
            .unwrap_or_default(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_outage_blocks_only_pods_labelled_to_join() {
    let (env, mut op) = webhook_env("app", &[]).await;
    cluster(&env, "app", "shop", None).await;
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), "app");
    // While the operator answers, both ways to join are injected.
    for (name, meta) in [
        (
            "by-label",
            json!({"name": "by-label", "labels": {"sessionmesh.io/cluster": "shop"}}),
        ),
        (
            "by-annotation",
            json!({"name": "by-annotation", "annotations": {"sessionmesh.io/cluster": "shop"}}),
        ),
    ] {
        let p = pods
            .create(&PostParams::default(), &restricted_pod(meta))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            p.annotations().contains_key("sessionmesh.io/injected"),
            "{name} not injected"
        );
    }
    op.kill();
    // No operator: a pod that does not join is admitted as it is...
    let plain = pods
        .create(
            &PostParams::default(),
            &restricted_pod(json!({"name": "plain"})),
        )
        .await
        .expect("a pod that joins no cluster is not blocked by an operator outage");
    assert_eq!(plain.spec.as_ref().map(|s| s.containers.len()), Some(1));
    // ... so is one that joins by the annotation only, without a sidecar ...
    let old_style = pods
        .create(
            &PostParams::default(),
            &restricted_pod(
                json!({"name": "old-style", "annotations": {"sessionmesh.io/cluster": "shop"}}),
            ),
        )
        .await
        .expect("annotation-only pods fail open");
    assert!(!old_style
        .annotations()
        .contains_key("sessionmesh.io/injected"));
    // ... and one labelled to join is refused rather than started without replication.
    let err = pods
        .create(
            &PostParams::default(),
            &restricted_pod(
                json!({"name": "member", "labels": {"sessionmesh.io/cluster": "shop"}}),
            ),
        )
        .await
        .expect_err("a labelled pod must not start without its sidecar");
    assert!(err.to_string().contains("inject.sessionmesh.io"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_runs_and_refused_pods_hold_no_port_and_invalid_clusters_are_named() {
    let (env, _op) = webhook_env("app", &["--reservation-seconds", "3"]).await;
    // hostNetwork is not allowed under "restricted": a namespace without it.
    Api::<Namespace>::all(env.client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": "hosts", "labels": {"sessionmesh.io/injection": "enabled"}}}),
            )
            .expect("ns"),
        )
        .await
        .expect("namespace");
    cluster(
        &env,
        "hosts",
        "hosts",
        Some(json!({"receiverPorts": {"first": 4000, "last": 4001}})),
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), "hosts");
    let dry = PostParams {
        dry_run: true,
        field_manager: None,
    };
    // Two server-side dry runs: each is told what it would get, nothing is kept.
    for i in 0..2 {
        let p = pods
            .create(&dry, &host_pod(&format!("dry-{i}"), "app"))
            .await
            .expect("dry run");
        assert_eq!(port_of(&p), ("node1".into(), "4000".into()), "dry run {i}");
    }
    let p = pods
        .create(&PostParams::default(), &host_pod("hn-1", "app"))
        .await
        .expect("a hostNetwork pod after two dry runs");
    assert_eq!(port_of(&p), ("node1".into(), "4000".into()));
    // Refused by validation after the webhook (an invalid container name):
    // its port is free again when the same pod is created again, fixed.
    let err = pods
        .create(&PostParams::default(), &host_pod("hn-2", "Not_Valid"))
        .await
        .expect_err("invalid container name");
    assert!(err.to_string().contains("Not_Valid"), "{err}");
    let p = pods
        .create(&PostParams::default(), &host_pod("hn-2", "app"))
        .await
        .expect("the same pod, fixed, gets the port its refused create had");
    assert_eq!(port_of(&p), ("node2".into(), "4001".into()));
    // A refused pod of another name holds the port only for the reservation
    // time (3 s here), then a new pod gets it.
    pods.delete("hn-2", &Default::default())
        .await
        .expect("delete");
    eventually(Duration::from_secs(20), "hn-2 gone", || async {
        pods.get_opt("hn-2")
            .await
            .ok()
            .and_then(|p| p.is_none().then_some(()))
    })
    .await;
    pods.create(&PostParams::default(), &host_pod("refused", "Not_Valid"))
        .await
        .expect_err("invalid container name");
    let p = eventually(Duration::from_secs(15), "the port freed", || async {
        pods.create(&PostParams::default(), &host_pod("hn-3", "app"))
            .await
            .ok()
    })
    .await;
    assert_eq!(
        port_of(&p),
        ("node2".into(), "4001".into()),
        "no route gap either"
    );

    // A pod of a cluster with an invalid spec is denied for that reason.
    cluster(
        &env,
        "hosts",
        "broken",
        Some(json!({"failureDetection": {"heartbeatInterval": "1s", "suspectAfter": "1s"}})),
    )
    .await;
    let err = pods
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "b", "labels": {"sessionmesh.io/cluster": "broken"}},
                "spec": {"containers": [{"name": "app", "image": "app:1"}]}
            }))
            .expect("pod"),
        )
        .await
        .expect_err("a pod of an invalid cluster");
    let msg = err.to_string();
    assert!(
        msg.contains("invalid spec") && msg.contains("spec.failureDetection.suspectAfter"),
        "{msg}"
    );
    assert!(!msg.contains("port"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_without_spec_is_valid_and_kubectl_shows_its_conditions() {
    let env = KubeEnv::start().await;
    env.apply_crds().await;
    env.namespace("shop").await;
    cluster(&env, "shop", "bare", None).await;
    let sc = Api::<SessionCluster>::namespaced(env.client.clone(), "shop")
        .get("bare")
        .await
        .expect("get");
    assert_eq!(sc.spec.receiver_ports.first, 4000, "defaults filled in");
    let _op = env.operator("shop", "op");
    // The short name is one no built-in resource has (sc is StorageClass's).
    let res = env
        .client
        .list_api_group_resources("sessionmesh.io/v1alpha1")
        .await
        .expect("discovery");
    let r = res
        .resources
        .iter()
        .find(|r| r.name == "sessionclusters")
        .expect("sessionclusters");
    assert_eq!(r.short_names.as_deref(), Some(&["smc".to_owned()][..]));
    // `kubectl get smc` asks for a Table: Ready and Degraded are columns.
    let table: Value = eventually(Duration::from_secs(20), "a Ready condition", || async {
        let req =
            http::Request::get("/apis/sessionmesh.io/v1alpha1/namespaces/shop/sessionclusters")
                .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
                .body(Vec::new())
                .ok()?;
        let t: Value = env.client.request(req).await.ok()?;
        (t["rows"][0]["cells"].as_array()?.len() > 5
            && t["rows"][0]["cells"]
                .as_array()?
                .iter()
                .any(|c| c == "False" || c == "True"))
        .then_some(t)
    })
    .await;
    let cols: Vec<&str> = table["columnDefinitions"]
        .as_array()
        .expect("columns")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    for want in ["Members", "Ready", "Degraded", "Reason"] {
        assert!(cols.contains(&want), "no {want} column: {cols:?}");
    }
    let cells = &table["rows"][0]["cells"];
    let at = |n: &str| cols.iter().position(|c| *c == n).expect("col");
    // Native sidecar support is asked of the server (a dry-run create), and
    // the answer agrees with what the server keeps of such a pod.
    let (native, how) = sessionmesh_operator::detect::native_sidecars(&env.client, "shop").await;
    assert_eq!(how, sessionmesh_operator::detect::Decided::DryRun);
    assert_eq!(native, env.native_sidecars("shop").await);
    // No members yet: not ready, not degraded.
    assert_eq!(cells[at("Ready")], "False", "{table}");
    assert_eq!(cells[at("Degraded")], "False", "{table}");
    assert_eq!(cells[at("Reason")], "NoMembers", "{table}");
}

/// Certificates have a bounded lifetime and are replaced before they expire
/// (here: 20 s, replaced with 15 s left), with no failed admission meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_certificate_rotates_without_a_failed_admission() {
    use k8s_openapi::api::core::v1::Secret;
    let (env, _op) = webhook_env("app", &["--webhook-cert-test-seconds", "20,15"]).await;
    cluster(&env, "app", "shop", None).await;
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), "app");
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), "sessionmesh");
    let mut certs = std::collections::BTreeSet::new();
    let t = std::time::Instant::now();
    let mut n = 0;
    while certs.len() < 3 {
        assert!(
            t.elapsed() < Duration::from_secs(40),
            "{} certificates seen in 40 s",
            certs.len()
        );
        let s = secrets
            .get("sessionmesh-webhook-tls")
            .await
            .expect("webhook Secret");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let not_after: u64 = s
            .annotations()
            .get("sessionmesh.io/not-after")
            .and_then(|v| v.parse().ok())
            .expect("not-after");
        assert!(not_after <= now + 21, "valid until {not_after}, now {now}");
        certs.insert(s.data.expect("data")["tls.crt"].0.clone());
        let p = pods
            .create(
                &PostParams::default(),
                &restricted_pod(json!({"name": format!("web-{n}"), "labels": {"sessionmesh.io/cluster": "shop"}})),
            )
            .await
            .unwrap_or_else(|e| panic!("admission {n} failed during rotation: {e}"));
        assert!(p.annotations().contains_key("sessionmesh.io/injected"));
        n += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!("{n} admissions across {} certificates", certs.len());
}

/// With `--webhook-client-ca`, only the API server (configured to present a
/// client certificate for webhooks) is answered; a forged AdmissionReview
/// from anything else that reaches the port is refused at the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_api_server_is_answered_with_client_certificates() {
    let dir = std::env::temp_dir().join(format!("sessionmesh-clientca-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let openssl = sessionmesh_sidecar::demo::localcluster::require("openssl");
    let run = |args: &[&str]| {
        let st = std::process::Command::new(&openssl)
            .args(args)
            .current_dir(&dir)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl");
        assert!(st.success(), "openssl {args:?}");
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=webhook-client-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=kube-apiserver",
        "-keyout",
        "client.key",
        "-out",
        "client.csr",
    ]);
    std::fs::write(
        dir.join("client.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n",
    )
    .expect("ext");
    run(&[
        "x509",
        "-req",
        "-in",
        "client.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-out",
        "client.crt",
        // X.509 v3 with clientAuth: webpki refuses v1 certificates.
        "-extfile",
        "client.ext",
    ]);
    let p = |f: &str| dir.join(f).display().to_string();
    std::fs::write(
        dir.join("webhook-kubeconfig"),
        format!(
            "apiVersion: v1\nkind: Config\nusers:\n- name: \"*\"\n  user:\n    client-certificate: {}\n    client-key: {}\n",
            p("client.crt"),
            p("client.key")
        ),
    )
    .expect("kubeconfig");
    std::fs::write(
        dir.join("admission.yaml"),
        format!(
            "apiVersion: apiserver.config.k8s.io/v1\nkind: AdmissionConfiguration\nplugins:\n\
             - name: MutatingAdmissionWebhook\n  configuration:\n    apiVersion: apiserver.config.k8s.io/v1\n\
             \x20   kind: WebhookAdmissionConfiguration\n    kubeConfigFile: {}\n",
            p("webhook-kubeconfig")
        ),
    )
    .expect("admission config");
    let env = KubeEnv::start_with(&[
        "--admission-control-config-file".into(),
        p("admission.yaml"),
    ])
    .await;
    let ca = p("ca.crt");
    let (env, op) = common::webhook_env_on(env, "app", &["--webhook-client-ca", &ca]).await;
    cluster(&env, "app", "shop", None).await;
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), "app");
    let created = pods
        .create(
            &PostParams::default(),
            &restricted_pod(json!({"name": "web-0", "labels": {"sessionmesh.io/cluster": "shop"}})),
        )
        .await
        .expect("the API server, with its client certificate, is answered");
    assert!(created
        .annotations()
        .contains_key("sessionmesh.io/injected"));
    // A forged review for another namespace, straight to the port.
    let review = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "forged", "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "namespace": "app", "operation": "CREATE", "userInfo": {"username": "mallory"},
        "object": {"metadata": {"name": "x", "labels": {"sessionmesh.io/cluster": "shop"}},
                   "spec": {"containers": [{"name": "a", "image": "a"}]}}}});
    std::fs::write(dir.join("review.json"), review.to_string()).expect("review");
    let url = format!("https://{}/mutate", op.webhook.expect("webhook"));
    let curl = sessionmesh_sidecar::demo::localcluster::require("curl");
    let post = |cert: bool| {
        let mut c = std::process::Command::new(&curl);
        c.args([
            "-sk",
            "--max-time",
            "5",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
        ])
        .arg(format!("@{}", p("review.json")))
        .arg(&url);
        if cert {
            c.args(["--cert", &p("client.crt"), "--key", &p("client.key")]);
        }
        c.output().expect("curl")
    };
    let forged = post(false);
    assert!(
        !forged.status.success() && forged.stdout.is_empty(),
        "a client without a certificate got: {}",
        String::from_utf8_lossy(&forged.stdout)
    );
    // The same request with the API server's certificate is answered (so the
    // refusal above is the certificate check, not a broken endpoint).
    let ok = post(true);
    let v: Value = serde_json::from_slice(&ok.stdout).expect("an AdmissionReview");
    assert_eq!(v["response"]["uid"], "forged");
    let _ = std::fs::remove_dir_all(&dir);
}
