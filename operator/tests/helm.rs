//! The Helm chart, rendered the way Helm does (Go text/template + Sprig, by
//! `e2e/helm/render.go`), applied to the real API server: first with
//! `dryRun=All` (kubectl apply --dry-run=server), then for real.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::too_many_lines)]

mod common;

use common::{render_chart as render, KubeEnv};
use kube::api::{DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::{pinned_kind, Scope};
use kube::Api;
use std::process::Command;

#[test]
fn the_chart_carries_the_generated_crd() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let top = std::fs::read_to_string(format!("{root}/crds/sessioncluster.yaml")).expect("crds/");
    let chart = std::fs::read_to_string(format!(
        "{root}/charts/sessionmesh/crds/sessioncluster.yaml"
    ))
    .expect("chart crds/");
    assert_eq!(
        top, chart,
        "charts/sessionmesh/crds/ differs from crds/: copy it over"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rendered_chart_applies_to_a_real_api_server() {
    let (manifests, notes) = render(None);
    assert!(
        notes.contains("kubectl label namespace"),
        "NOTES.txt not rendered: {notes}"
    );
    let env = KubeEnv::start().await;
    env.apply_crds().await;
    env.namespace("sessionmesh").await;
    let applied = apply_all(&env, &manifests, "sessionmesh").await;
    let kinds: Vec<&str> = applied.iter().map(|(_, _, k)| k.as_str()).collect();
    for want in [
        "Deployment",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Service",
        "MutatingWebhookConfiguration",
    ] {
        assert!(kinds.contains(&want), "the chart has no {want}: {kinds:?}");
    }
    for (api, name, kind) in &applied {
        assert!(
            api.get_opt(name).await.expect("get").is_some(),
            "{kind} {name} missing after apply"
        );
    }
    let deploy = applied
        .iter()
        .find(|(_, _, k)| k == "Deployment")
        .expect("deployment");
    let d = deploy.0.get(&deploy.1).await.expect("deployment");
    assert_eq!(d.data["spec"]["replicas"], 2);
}

/// Applies every manifest with server-side apply, first as a dry run (which
/// must create nothing), then for real. Returns what was applied.
async fn apply_all(
    env: &KubeEnv,
    manifests: &str,
    default_ns: &str,
) -> Vec<(Api<DynamicObject>, String, String)> {
    let mut applied = Vec::new();
    for dry_run in [true, false] {
        for doc in manifests.split("\n---\n") {
            if doc
                .lines()
                .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
            {
                continue;
            }
            let obj: DynamicObject =
                serde_yaml::from_str(doc).unwrap_or_else(|e| panic!("not an object: {e}\n{doc}"));
            let tm = obj.types.clone().expect("apiVersion and kind");
            let gvk = GroupVersionKind::try_from(&tm).expect("gvk");
            let (ar, caps) = pinned_kind(&env.client, &gvk)
                .await
                .unwrap_or_else(|e| panic!("{} unknown to the API server: {e}", tm.kind));
            let name = obj.metadata.name.clone().expect("name");
            let api: Api<DynamicObject> = match caps.scope {
                Scope::Namespaced => Api::namespaced_with(
                    env.client.clone(),
                    obj.metadata.namespace.as_deref().unwrap_or(default_ns),
                    &ar,
                ),
                Scope::Cluster => Api::all_with(env.client.clone(), &ar),
            };
            let mut pp = PatchParams::apply("example-test").force();
            if dry_run {
                pp = pp.dry_run();
            }
            api.patch(&name, &pp, &Patch::Apply(&obj))
                .await
                .unwrap_or_else(|e| panic!("{} {name} refused (dry run: {dry_run}): {e}", tm.kind));
            if dry_run {
                assert!(
                    api.get_opt(&name).await.expect("get").is_none(),
                    "a dry run created {} {name}",
                    tm.kind
                );
            } else {
                applied.push((api, name, tm.kind.clone()));
            }
        }
    }
    applied
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_examples_apply_and_the_haproxy_config_is_valid() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/shop");
    let out = Command::new(sessionmesh_sidecar::demo::localcluster::require("haproxy"))
        .args(["-c", "-f", &format!("{root}/haproxy.cfg")])
        .output()
        .expect("haproxy");
    assert!(
        out.status.success(),
        "haproxy rejects the example: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let env = KubeEnv::start().await;
    env.apply_crds().await;
    env.namespace("shop").await;
    let mut kinds = Vec::new();
    for f in ["sessioncluster.yaml", "deployment.yaml"] {
        let text = std::fs::read_to_string(format!("{root}/{f}")).expect("example");
        kinds.extend(
            apply_all(&env, &text, "shop")
                .await
                .into_iter()
                .map(|(_, _, k)| k),
        );
    }
    for want in ["SessionCluster", "Deployment", "Service", "Ingress"] {
        assert!(
            kinds.iter().any(|k| k == want),
            "examples lack a {want}: {kinds:?}"
        );
    }
}

#[test]
fn values_override_like_helm() {
    let path = std::env::temp_dir().join(format!("sessionmesh-values-{}.yaml", std::process::id()));
    std::fs::write(
        &path,
        "operator:\n  replicas: 3\n  watchNamespace: shop\nwebhook:\n  failurePolicy: Ignore\n  clientCASecret: apiserver-client-ca\nsidecar:\n  native: \"false\"\n",
    )
    .expect("values");
    let (m, _) = render(Some(path.to_str().expect("path")));
    assert!(m.contains("replicas: 3"));
    assert!(m.contains("--namespace=shop"));
    assert!(m.contains("failurePolicy: Ignore"));
    assert!(m.contains("--webhook-client-ca=/etc/sessionmesh/client-ca/ca.crt"));
    assert!(m.contains("secretName: apiserver-client-ca"));
    assert!(m.contains("--native-sidecars=false"));
    // watchNamespace: the reads are a Role there, not cluster-wide.
    let cluster_role = m
        .split("\n---\n")
        .find(|d| d.contains("kind: ClusterRole\n"))
        .expect("ClusterRole");
    assert!(!cluster_role.contains("sessionclusters"), "{cluster_role}");
    assert!(m.contains("kind: Role\nmetadata:\n  name: sm-sessionmesh-operator\n  namespace: shop"));
    let _ = std::fs::remove_file(path);
}

/// Least privilege, measured: the chart's RBAC (writes granted in the member
/// namespace `shop` only) applied to a real API server; the operator's
/// ServiceAccount is refused what it does not need, and the operator running
/// with only those rights reconciles `shop` and reports `other` as Forbidden.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_service_account_gets_only_what_it_needs() {
    use common::{client_for, eventually, OPERATOR_SA};
    use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
    use k8s_openapi::api::rbac::v1::Role;
    use kube::api::PostParams;
    use sessionmesh_api::SessionCluster;
    use std::time::Duration;
    let values = std::env::temp_dir().join(format!("sessionmesh-rbac-{}.yaml", std::process::id()));
    std::fs::write(&values, "operator:\n  memberNamespaces: [shop]\n").expect("values");
    let (manifests, _) = render(Some(values.to_str().expect("path")));
    let _ = std::fs::remove_file(&values);
    let env = KubeEnv::start().await;
    env.apply_crds().await;
    for ns in ["sessionmesh", "shop", "other"] {
        env.namespace(ns).await;
    }
    apply_all(&env, &manifests, "sessionmesh").await;
    let sa = client_for(&env.dir.join("kubeconfig-operator")).await;
    let admin = env.client.clone();
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "db-password"}, "stringData": {"password": "x"}
    }))
    .expect("secret");
    for ns in ["other", "sessionmesh"] {
        Api::<Secret>::namespaced(admin.clone(), ns)
            .create(&PostParams::default(), &secret)
            .await
            .expect("secret");
    }
    for ns in ["shop", "other"] {
        env.pod(ns, "web-0", "web", false).await;
    }
    let forbidden = |what: &str, r: Result<(), kube::Error>| match r {
        Err(kube::Error::Api(e)) if e.code == 403 => println!("refused as it should be: {what}"),
        other => panic!("{OPERATOR_SA} was not refused {what}: {other:?}"),
    };
    let touch = serde_json::json!({"metadata": {"annotations": {"x": "y"}}});
    forbidden(
        "pods patch in another namespace",
        Api::<Pod>::namespaced(sa.clone(), "other")
            .patch("web-0", &PatchParams::default(), &Patch::Merge(&touch))
            .await
            .map(|_| ()),
    );
    for ns in ["other", "sessionmesh"] {
        forbidden(
            &format!("get of a Secret in {ns}"),
            Api::<Secret>::namespaced(sa.clone(), ns)
                .get("db-password")
                .await
                .map(|_| ()),
        );
    }
    forbidden(
        "list of Secrets cluster-wide",
        Api::<Secret>::all(sa.clone())
            .list(&Default::default())
            .await
            .map(|_| ()),
    );
    let cm: ConfigMap =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "x"}})).expect("cm");
    forbidden(
        "configmaps create in another namespace",
        Api::<ConfigMap>::namespaced(sa.clone(), "other")
            .create(&PostParams::default(), &cm)
            .await
            .map(|_| ()),
    );
    let role: Role =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "x"}, "rules": []}))
            .expect("role");
    forbidden(
        "roles create in another namespace",
        Api::<Role>::namespaced(sa.clone(), "other")
            .create(&PostParams::default(), &role)
            .await
            .map(|_| ()),
    );
    // What it does need, it has: pods cluster-wide read, pods patch in shop.
    Api::<Pod>::all(sa.clone())
        .list(&Default::default())
        .await
        .expect("list pods");
    Api::<Pod>::namespaced(sa.clone(), "shop")
        .patch("web-0", &PatchParams::default(), &Patch::Merge(&touch))
        .await
        .expect("patch a pod in a member namespace");

    // The operator itself, with these rights only.
    let _op = env.operator_as(
        &env.dir.join("kubeconfig-operator"),
        "sessionmesh",
        "op",
        &[
            "--webhook",
            "127.0.0.1:0",
            "--webhook-hosts",
            "127.0.0.1",
            "--webhook-config",
            "sm-sessionmesh-injector",
            "--webhook-secret",
            "sm-sessionmesh-webhook-tls",
            "--lease-name",
            "sm-sessionmesh-leader",
        ],
    );
    for ns in ["shop", "other"] {
        env.set_running(ns, "web-0", "10.0.0.1", true).await;
        Api::<SessionCluster>::namespaced(admin.clone(), ns)
            .create(
                &PostParams::default(),
                &serde_json::from_value(serde_json::json!({
                    "apiVersion": "sessionmesh.io/v1alpha1", "kind": "SessionCluster",
                    "metadata": {"name": "web"}, "spec": {}
                }))
                .expect("sc"),
            )
            .await
            .expect("create sc");
    }
    let reason = |ns: &'static str| {
        let api = Api::<SessionCluster>::namespaced(admin.clone(), ns);
        async move {
            let sc = api.get("web").await.ok()?;
            sc.status?
                .conditions
                .iter()
                .find(|c| c.type_ == "Ready")
                .map(|c| c.reason.clone())
        }
    };
    let r = eventually(Duration::from_secs(30), "shop reconciled", || async {
        reason("shop").await.filter(|r| r == "AllMembersReady")
    })
    .await;
    assert_eq!(r, "AllMembersReady");
    assert!(Api::<ConfigMap>::namespaced(admin.clone(), "shop")
        .get_opt("web-members")
        .await
        .expect("get")
        .is_some());
    eventually(
        Duration::from_secs(30),
        "other reported Forbidden",
        || async { reason("other").await.filter(|r| r == "Forbidden") },
    )
    .await;
    assert!(Api::<ConfigMap>::namespaced(admin.clone(), "other")
        .get_opt("web-members")
        .await
        .expect("get")
        .is_none());
    // The webhook certificate was created in the release namespace.
    assert!(Api::<Secret>::namespaced(admin.clone(), "sessionmesh")
        .get_opt("sm-sessionmesh-webhook-tls")
        .await
        .expect("get")
        .is_some());
}
