//! A real kube-apiserver with etcd, on loopback, per test: v1.20 built from
//! Debian's source by `e2e/kube/build-apiserver.sh`, or any other one named by
//! `SESSIONMESH_KUBE_APISERVER`. Flags are chosen by the binary's version, and
//! what the server supports (policy/v1, native sidecars) is asked of it.

#![allow(dead_code)]

mod chart;
#[allow(unused_imports)]
pub use chart::*;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use serde_json::json;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    sessionmesh_sidecar::demo::localcluster::free_port().unwrap_or(0)
}

pub fn apiserver_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SESSIONMESH_KUBE_APISERVER") {
        return p.into();
    }
    let cache = std::env::var_os("SESSIONMESH_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/sessionmesh")
        });
    cache.join("kube-apiserver-1.20.2")
}

pub struct KubeEnv {
    /// The server's minor version (20 for v1.20.2).
    pub minor: u32,
    pub dir: PathBuf,
    pub url: String,
    pub kubeconfig: PathBuf,
    pub client: Client,
    children: Vec<Child>,
}

/// The chart's operator ServiceAccount (release `sm` in namespace
/// `sessionmesh`), which `kubeconfig-operator` authenticates as.
pub const OPERATOR_SA: &str = "system:serviceaccount:sessionmesh:sm-sessionmesh";

static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// `kube-apiserver --version` ("Kubernetes v1.20.2") as (text, minor).
pub fn apiserver_version(bin: &std::path::Path) -> (String, u32) {
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("{} --version: {e}", bin.display()));
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let minor = text
        .split_whitespace()
        .last()
        .and_then(|v| v.trim_start_matches('v').split('.').nth(1))
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("cannot read a version from {text:?}"));
    (text, minor)
}

impl KubeEnv {
    pub async fn start() -> KubeEnv {
        Self::start_with(&[]).await
    }

    /// An API server with these flags added.
    pub async fn start_with(extra: &[String]) -> KubeEnv {
        let bin = apiserver_bin();
        if !bin.is_file() {
            sessionmesh_sidecar::demo::localcluster::missing(
                &format!("kube-apiserver not found at {}", bin.display()),
                "bash e2e/kube/build-apiserver.sh",
            );
        }
        let (version, minor) = apiserver_version(&bin);
        // --insecure-port was removed in 1.24 (and defaults to 0 before that
        // only from 1.20 on): passed only where it exists.
        let version_flags: &[&str] = if minor < 24 {
            &["--insecure-port", "0"]
        } else {
            &[]
        };
        println!("kube-apiserver: {version} (extra flags {version_flags:?})");
        let openssl = sessionmesh_sidecar::demo::localcluster::require("openssl");
        let etcd_bin = sessionmesh_sidecar::demo::localcluster::require("etcd");
        let dir = std::env::temp_dir().join(format!(
            "sessionmesh-kube-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let run = |args: &[&str]| {
            let ok = Command::new(&openssl)
                .args(args)
                .current_dir(&dir)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "openssl {args:?}");
        };
        run(&["genrsa", "-out", "sa.key", "2048"]);
        run(&["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"]);
        std::fs::write(dir.join("tokens.csv"), format!("admin-token,admin,admin,system:masters\nsidecar-token,system:serviceaccount:shop:default,sa-uid,\"system:serviceaccounts,system:serviceaccounts:shop\"\n\
             operator-token,{OPERATOR_SA},op-sa-uid,\"system:serviceaccounts,system:serviceaccounts:sessionmesh\"\n")).expect("tokens");
        let (client_port, peer_port, api_port) = (free_port(), free_port(), free_port());
        let log = |n: &str| Stdio::from(std::fs::File::create(dir.join(n)).expect("log"));
        let etcd = Command::new(&etcd_bin)
            .args(["--data-dir", "etcd", "--name", "test"])
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{client_port}"),
            ])
            .args([
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{client_port}"),
            ])
            .args([
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer_port}"),
            ])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer_port}"),
            ])
            .args([
                "--initial-cluster",
                &format!("test=http://127.0.0.1:{peer_port}"),
            ])
            .current_dir(&dir)
            .stdout(log("etcd.log"))
            .stderr(log("etcd.err"))
            .spawn()
            .expect("etcd (apt-get install etcd-server)");
        let api = Command::new(&bin)
            .args(["--etcd-servers", &format!("http://127.0.0.1:{client_port}")])
            .args([
                "--bind-address",
                "127.0.0.1",
                "--secure-port",
                &api_port.to_string(),
            ])
            .args(version_flags)
            .args(extra)
            .args([
                "--cert-dir",
                "certs",
                "--token-auth-file",
                "tokens.csv",
                "--authorization-mode",
                "RBAC",
            ])
            .args(["--service-account-issuer", "https://kubernetes.default.svc"])
            .args([
                "--service-account-key-file",
                "sa.pub",
                "--service-account-signing-key-file",
                "sa.key",
            ])
            .args([
                "--service-cluster-ip-range",
                "10.96.0.0/24",
                "--disable-admission-plugins",
                "ServiceAccount",
            ])
            .current_dir(&dir)
            .stdout(log("apiserver.log"))
            .stderr(log("apiserver.err"))
            .spawn()
            .expect("kube-apiserver");
        let url = format!("https://127.0.0.1:{api_port}");
        let kubeconfig = dir.join("kubeconfig");
        for (file, user) in [
            ("kubeconfig", "admin"),
            ("kubeconfig-sidecar", "sidecar"),
            ("kubeconfig-operator", "operator"),
        ] {
            std::fs::write(
                dir.join(file),
                format!(
                    "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {url}\n    insecure-skip-tls-verify: true\n\
                     users:\n- name: {user}\n  user:\n    token: {user}-token\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: {user}\n\
                     current-context: test\n"
                ),
            )
            .expect("kubeconfig");
        }
        let client = client_for(&kubeconfig).await;
        let mut env = KubeEnv {
            minor,
            dir,
            url,
            kubeconfig,
            client,
            children: vec![etcd, api],
        };
        let t = Instant::now();
        loop {
            if env.client.apiserver_version().await.is_ok()
                && Api::<Namespace>::all(env.client.clone())
                    .get_opt("default")
                    .await
                    .is_ok_and(|n| n.is_some())
            {
                break;
            }
            for (i, what) in [(0, "etcd"), (1, "kube-apiserver")] {
                if let Ok(Some(st)) = env.children[i].try_wait() {
                    panic!(
                        "{what} exited ({st}) at start: {}",
                        env.log_tail(if i == 0 { "etcd.err" } else { "apiserver.err" })
                    );
                }
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "kube-apiserver did not come up: {}",
                env.log_tail("apiserver.err")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        env
    }

    /// The PodDisruptionBudget API this server serves: policy/v1 (1.21+),
    /// else policy/v1beta1 (removed in 1.25).
    pub async fn pdb_api(&self, ns: &str) -> Api<kube::core::DynamicObject> {
        let version = match self.client.list_api_group_resources("policy/v1").await {
            Ok(l) if l.resources.iter().any(|r| r.name == "poddisruptionbudgets") => "v1",
            _ => "v1beta1",
        };
        println!("PodDisruptionBudgets read through policy/{version}");
        let ar = kube::core::ApiResource::from_gvk(&kube::core::GroupVersionKind::gvk(
            "policy",
            version,
            "PodDisruptionBudget",
        ));
        Api::namespaced_with(self.client.clone(), ns, &ar)
    }

    /// Whether this server keeps an init container's `restartPolicy: Always`
    /// (native sidecars), asked with a server-side dry-run create.
    pub async fn native_sidecars(&self, ns: &str) -> bool {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "native-probe"},
            // "restricted"-compliant: the namespace may enforce it.
            "spec": {"securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
                     "initContainers": [{"name": "s", "image": "s", "restartPolicy": "Always",
                         "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}}],
                     "containers": [{"name": "a", "image": "a",
                         "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}}]}
        }))
        .expect("pod");
        let params = PostParams {
            dry_run: true,
            field_manager: None,
        };
        let native = match Api::<Pod>::namespaced(self.client.clone(), ns)
            .create(&params, &pod)
            .await
        {
            Ok(p) => p
                .spec
                .and_then(|s| s.init_containers)
                .is_some_and(|c| c[0].restart_policy.as_deref() == Some("Always")),
            Err(kube::Error::Api(e)) if e.code == 422 => false,
            Err(e) => panic!("dry-run create: {e}"),
        };
        println!("native sidecars supported by this server: {native}");
        native
    }

    pub fn log_tail(&self, name: &str) -> String {
        let t = std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        t.lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Applies `crds/` and waits until the CRD is established.
    pub async fn apply_crds(&self) {
        let yaml = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../crds/sessioncluster.yaml"
        ))
        .expect("crd");
        let crd: CustomResourceDefinition = serde_yaml::from_str(&yaml).expect("crd yaml");
        let api: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        api.patch(
            "sessionclusters.sessionmesh.io",
            &PatchParams::apply("test").force(),
            &Patch::Apply(&crd),
        )
        .await
        .expect("apply crd");
        let t = Instant::now();
        loop {
            let c = api
                .get("sessionclusters.sessionmesh.io")
                .await
                .expect("get crd");
            let established = c.status.and_then(|s| s.conditions).is_some_and(|cs| {
                cs.iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            });
            if established {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "CRD not established");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn namespace(&self, name: &str) {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let ns: Namespace =
            serde_json::from_value(json!({"metadata": {"name": name}})).expect("ns");
        api.create(&PostParams::default(), &ns)
            .await
            .expect("create namespace");
    }

    /// Creates a member pod (annotated), as the webhook-less API server sees it.
    pub async fn pod(&self, ns: &str, name: &str, cluster: &str, host_network: bool) -> Pod {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": {"sessionmesh.io/cluster": cluster}},
            "spec": {"hostNetwork": host_network, "containers": [{"name": "app", "image": "app:1"}]}
        }))
        .expect("pod");
        api.create(&PostParams::default(), &pod)
            .await
            .expect("create pod")
    }

    /// There is no kubelet: a test says the pod runs, with this IP, and is ready or not.
    pub async fn set_running(&self, ns: &str, name: &str, ip: &str, ready: bool) {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let status = json!({"status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "127.0.0.1",
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]
        }});
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .expect("patch pod status");
    }

    /// Starts the operator binary against this API server.
    pub fn operator(&self, lease_ns: &str, identity: &str) -> Operator {
        self.operator_with(lease_ns, identity, &[])
    }

    pub fn operator_with(&self, lease_ns: &str, identity: &str, extra: &[&str]) -> Operator {
        self.operator_as(&self.kubeconfig, lease_ns, identity, extra)
    }

    /// The operator binary with the credentials of `kubeconfig`.
    pub fn operator_as(
        &self,
        kubeconfig: &std::path::Path,
        lease_ns: &str,
        identity: &str,
        extra: &[&str],
    ) -> Operator {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sessionmesh-operator"));
        cmd.env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,kube=warn")
            .args([
                "--lease-namespace",
                lease_ns,
                "--identity",
                identity,
                "--health",
                "127.0.0.1:0",
                "--lease-seconds",
                "3",
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.join(format!("{identity}.log")))
                    .expect("log"),
            ));
        let (child, line) = sessionmesh_sidecar::demo::localcluster::spawn_with_first_line(
            &mut cmd,
            Some(Duration::from_secs(20)),
        )
        .expect("spawn");
        let line = line.expect("operator did not start");
        let v: serde_json::Value = serde_json::from_str(&line).expect("json");
        Operator {
            child: Some(child),
            health: v["health"]
                .as_str()
                .unwrap_or_default()
                .parse()
                .expect("addr"),
            webhook: v["webhook"].as_str().and_then(|w| w.parse().ok()),
        }
    }
}

impl Drop for KubeEnv {
    fn drop(&mut self) {
        for c in self.children.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::env::var_os("SESSIONMESH_KEEP_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

pub async fn client_for(kubeconfig: &std::path::Path) -> Client {
    let kc = Kubeconfig::read_from(kubeconfig).expect("kubeconfig");
    let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("config");
    Client::try_from(cfg).expect("client")
}

pub struct Operator {
    pub child: Option<Child>,
    pub health: std::net::SocketAddr,
    pub webhook: Option<std::net::SocketAddr>,
}

impl Operator {
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            #[allow(unsafe_code)]
            // SAFETY: kill(2) with plain integers.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let _ = c.wait();
        }
    }
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let text = http_get(self.health, "/metrics").await?;
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())
}

/// Polls `f` every 20 ms until it returns `Some`, or panics after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let t = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            t.elapsed() < within,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The sidecar binary, built by cargo for this workspace.
pub fn sidecar_bin() -> PathBuf {
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "-q",
            "-p",
            "sessionmesh-sidecar",
            "--bin",
            "sessionmesh-sidecar",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cargo build");
    assert!(status.success(), "building the sidecar failed");
    let exe = std::env::current_exe().expect("exe");
    exe.parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("sessionmesh-sidecar"))
        .expect("target dir")
}
