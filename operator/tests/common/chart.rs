//! The Helm chart as the tests use it: rendered, and its webhook
//! configuration registered against an operator under test.

use super::{eventually, KubeEnv, Operator};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::PostParams;
use kube::Api;
use serde_json::json;
use std::process::Command;
use std::time::Duration;

/// The Helm chart, rendered the way Helm does (Go text/template + Sprig, by
/// `e2e/helm/render.go`), as release `sm` in namespace `sessionmesh`:
/// (manifests, NOTES).
pub fn render_chart(values: Option<&str>) -> (String, String) {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let mut cmd = Command::new(sessionmesh_sidecar::demo::localcluster::require("go"));
    cmd.current_dir(root)
        .env("GOPATH", "/usr/share/gocode")
        .env("GO111MODULE", "off")
        .env("GOFLAGS", "-mod=mod")
        .env("GOCACHE", std::env::temp_dir().join("sessionmesh-gocache"))
        .args([
            "run",
            "e2e/helm/render.go",
            "charts/sessionmesh",
            "sm",
            "sessionmesh",
        ]);
    if let Some(v) = values {
        cmd.arg(v);
    }
    let out = cmd
        .output()
        .expect("go (apt-get install golang-go golang-github-masterminds-sprig-dev)");
    assert!(
        out.status.success(),
        "render failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The rendered chart's objects of one kind, as JSON.
pub fn chart_objects(kind: &str) -> Vec<serde_json::Value> {
    let (manifests, _) = render_chart(None);
    manifests
        .split("\n---\n")
        .filter_map(|d| serde_yaml::from_str::<serde_json::Value>(d).ok())
        .filter(|v| v["kind"] == kind)
        .collect()
}

/// An API server with the CRD, namespace `ns` opted in to injection (and,
/// on servers with PodSecurity admission, enforcing "restricted"), and an
/// operator serving the webhook, registered with the chart's own
/// MutatingWebhookConfiguration (its selectors and failure policies; the
/// client config points at the operator by URL).
pub async fn webhook_env(ns: &str, extra: &[&str]) -> (KubeEnv, Operator) {
    webhook_env_on(KubeEnv::start().await, ns, extra).await
}

/// `webhook_env` on a given API server.
pub async fn webhook_env_on(env: KubeEnv, ns: &str, extra: &[&str]) -> (KubeEnv, Operator) {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    env.apply_crds().await;
    let nss: Api<Namespace> = Api::all(env.client.clone());
    nss.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": ns, "labels": {
            "sessionmesh.io/injection": "enabled",
            "pod-security.kubernetes.io/enforce": "restricted"}}}))
        .expect("ns"),
    )
    .await
    .expect("namespace");
    env.namespace("sessionmesh").await;
    let mut args = vec![
        "--webhook",
        "127.0.0.1:0",
        "--webhook-hosts",
        "127.0.0.1",
        "--webhook-config",
        "sm-sessionmesh-injector",
        "--sidecar-image",
        "sessionmesh:test",
    ];
    args.extend_from_slice(extra);
    let op = env.operator_with("sessionmesh", "op", &args);
    let url = format!("https://{}/mutate", op.webhook.expect("webhook address"));
    let mut mwc = chart_objects("MutatingWebhookConfiguration")
        .pop()
        .expect("the chart has a MutatingWebhookConfiguration");
    for w in mwc["webhooks"].as_array_mut().expect("webhooks") {
        w["clientConfig"] = json!({"url": url});
    }
    let name = mwc["metadata"]["name"].as_str().expect("name").to_owned();
    let mwcs: Api<MutatingWebhookConfiguration> = Api::all(env.client.clone());
    mwcs.create(
        &PostParams::default(),
        &serde_json::from_value(mwc).expect("mwc"),
    )
    .await
    .expect("create webhook configuration");
    // The operator patches its CA into every webhook of the configuration.
    eventually(Duration::from_secs(20), "caBundle patched", || async {
        let ws = mwcs.get(&name).await.ok()?.webhooks?;
        ws.iter()
            .all(|w| w.client_config.ca_bundle.is_some())
            .then_some(())
    })
    .await;
    (env, op)
}
