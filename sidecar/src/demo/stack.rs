//! The seed scenario's stack on loopback: N sidecars, N demo apps, and a load
//! balancer in front (real HAProxy when installed, else the built-in router).
//! Used by the demo, the end-to-end tests and the bench harness.

use crate::demo::client::Client;
use crate::demo::localcluster::{free_port, signal, spawn_with_first_line, LocalCluster};
use crate::demo::router::Router;
use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbChoice {
    Haproxy,
    Builtin,
    /// HAProxy if it is on the PATH, else the built-in router.
    Auto,
}

pub enum Lb {
    Haproxy {
        child: Child,
        admin: PathBuf,
    },
    Builtin {
        router: Router,
        stop: CancellationToken,
    },
}

/// What runs next to each sidecar.
#[derive(Debug, Clone)]
pub enum AppSpec {
    /// `sessionmesh-sidecar demo-app` through the sidecar's HTTP API.
    Demo,
    /// Any program; it gets `PORT`, `REDIS_PORT`, `SIDECAR_HTTP`, `NODE_NAME`
    /// and `JVM_ROUTE` in its environment and must answer `GET /health`.
    External { program: PathBuf, args: Vec<String> },
}

pub struct Stack {
    pub cl: LocalCluster,
    pub app: AppSpec,
    pub bin: PathBuf,
    pub apps: Vec<Option<Child>>,
    pub app_ports: Vec<u16>,
    pub lb_addr: SocketAddr,
    pub lb: Lb,
    pub app_send: String,
}

pub fn haproxy_path() -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join("haproxy"))
        .find(|p| p.is_file())
}

/// The HAProxy configuration we recommend, with the given servers.
pub fn haproxy_config(bind: SocketAddr, admin: &Path, servers: &[(String, SocketAddr)]) -> String {
    let mut s = format!(
        "global\n\
         \x20   maxconn 4096\n\
         \x20   stats socket {admin} mode 600 level admin\n\
         defaults\n\
         \x20   mode http\n\
         \x20   timeout connect 500ms\n\
         \x20   timeout client 30s\n\
         \x20   timeout server 10s\n\
         \x20   # A slow /health is not a dead app: a killed app refuses at once whatever this is.\n\
         \x20   timeout check 1s\n\
         \x20   # On a dead server: retry at once, on another server (the session lives everywhere).\n\
         \x20   retries 3\n\
         \x20   option redispatch 1\n\
         \x20   retry-on conn-failure empty-response response-timeout\n\
         frontend web\n\
         \x20   bind {bind}\n\
         \x20   default_backend app\n\
         backend app\n\
         \x20   balance roundrobin\n\
         \x20   cookie SERVERID insert indirect nocache\n\
         \x20   option httpchk GET /health\n\
         \x20   http-check expect status 200\n\
         \x20   default-server inter 250ms fastinter 100ms downinter 250ms fall 2 rise 1\n",
        admin = admin.display()
    );
    for (name, addr) in servers {
        s.push_str(&format!("    server {name} {addr} cookie {name} check\n"));
    }
    s
}

/// Whether a row of HAProxy's `show stat` CSV is a server that passed its
/// last health check (field 17 is `status`, 36 is `check_status`). Before its
/// first check HAProxy shows a server as `UP 1/2` with check `INI`: that is
/// not up, the app may not even listen yet. A check in progress is shown with
/// a `* ` prefix.
pub fn haproxy_server_up(row: &[String]) -> bool {
    let status = row.get(17).map(String::as_str).unwrap_or_default();
    let check = row.get(36).map(String::as_str).unwrap_or_default();
    status.starts_with("UP") && check.trim_start_matches("* ") == "L7OK"
}

impl Stack {
    /// Starts `n` sidecars and apps and a load balancer, and waits until the
    /// load balancer sees every app healthy.
    pub async fn start(
        bin: &Path,
        n: usize,
        sidecar_args: &[&str],
        lb: LbChoice,
        app_send: &str,
    ) -> anyhow::Result<Stack> {
        Self::start_apps(bin, n, sidecar_args, lb, app_send, AppSpec::Demo).await
    }

    pub async fn start_apps(
        bin: &Path,
        n: usize,
        sidecar_args: &[&str],
        lb: LbChoice,
        app_send: &str,
        app: AppSpec,
    ) -> anyhow::Result<Stack> {
        Self::start_on(LocalCluster::new(bin, n, sidecar_args)?, lb, app_send, app).await
    }

    /// Starts the sidecars of `cl` (clustered, or each on its own when
    /// `cl.standalone`), an app beside each, and the load balancer.
    pub async fn start_on(
        mut cl: LocalCluster,
        lb: LbChoice,
        app_send: &str,
        app: AppSpec,
    ) -> anyhow::Result<Stack> {
        let bin = cl.bin.clone();
        let n = cl.nodes.len();
        for i in 0..n {
            cl.start(i)?;
        }
        for i in 0..n {
            anyhow::ensure!(
                cl.wait_ready(i, Duration::from_secs(15)).await,
                "sidecar node{} not ready",
                i + 1
            );
        }
        let app_ports = (0..n).map(|_| free_port()).collect::<Result<Vec<_>, _>>()?;
        let lb_port = free_port()?;
        let lb_addr = SocketAddr::from(([127, 0, 0, 1], lb_port));
        let servers: Vec<(String, SocketAddr)> = (0..n)
            .map(|i| {
                (
                    cl.nodes[i].name.clone(),
                    SocketAddr::from(([127, 0, 0, 1], app_ports[i])),
                )
            })
            .collect();
        let use_haproxy = match lb {
            LbChoice::Haproxy => true,
            LbChoice::Builtin => false,
            LbChoice::Auto => haproxy_path().is_some(),
        };
        let lb = if use_haproxy {
            let hp = haproxy_path().ok_or_else(|| anyhow::anyhow!("haproxy is not installed"))?;
            let admin = cl.dir.join("haproxy.sock");
            let cfg = cl.dir.join("haproxy.cfg");
            std::fs::write(&cfg, haproxy_config(lb_addr, &admin, &servers))?;
            let log = std::fs::File::create(cl.dir.join("haproxy.log"))?;
            let child = Command::new(hp)
                .arg("-db")
                .arg("-f")
                .arg(&cfg)
                .stdin(Stdio::null())
                .stdout(Stdio::from(log.try_clone()?))
                .stderr(Stdio::from(log))
                .spawn()?;
            Lb::Haproxy { child, admin }
        } else {
            let router = Router::new(servers.clone());
            let stop = CancellationToken::new();
            let listener = tokio::net::TcpListener::bind(lb_addr).await?;
            tokio::spawn(router.clone().serve(listener, stop.clone()));
            tokio::spawn(router.clone().check_loop(stop.clone()));
            Lb::Builtin { router, stop }
        };
        let mut st = Stack {
            cl,
            app,
            bin,
            apps: (0..n).map(|_| None).collect(),
            app_ports,
            lb_addr,
            lb,
            app_send: app_send.into(),
        };
        for i in 0..n {
            st.start_app(i)?;
        }
        // DeltaManager's start waits up to 60 s for another member's state
        // (its own timeout), and under load it can take that long: a
        // deadline past it.
        for i in 0..n {
            anyhow::ensure!(
                st.wait_lb_up(i, Duration::from_secs(120)).await,
                "load balancer never saw node{} up; app log:\n{}",
                i + 1,
                std::fs::read_to_string(st.cl.dir.join(format!("app{}.log", i + 1)))
                    .unwrap_or_default()
            );
        }
        Ok(st)
    }

    pub fn lb_name(&self) -> &'static str {
        match self.lb {
            Lb::Haproxy { .. } => "HAProxy",
            Lb::Builtin { .. } => "built-in cookie-sticky router",
        }
    }

    pub fn name(&self, i: usize) -> String {
        self.cl.nodes[i].name.clone()
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.cl.nodes.iter().position(|n| n.name == name)
    }

    pub fn start_app(&mut self, i: usize) -> anyhow::Result<()> {
        let sidecar = self.cl.nodes[i]
            .http
            .ok_or_else(|| anyhow::anyhow!("sidecar not started"))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.cl.dir.join(format!("app{}.log", i + 1)))?;
        let node = &self.cl.nodes[i];
        let mut cmd = match &self.app {
            AppSpec::Demo => {
                let mut c = Command::new(&self.bin);
                c.arg("demo-app")
                    .arg("--listen")
                    .arg(format!("127.0.0.1:{}", self.app_ports[i]))
                    .arg("--sidecar")
                    .arg(sidecar.to_string())
                    .arg("--route")
                    .arg(&node.route)
                    .arg("--name")
                    .arg(&node.name)
                    .arg("--send")
                    .arg(&self.app_send);
                c
            }
            AppSpec::External { program, args } => {
                let mut c = Command::new(program);
                c.args(args);
                c
            }
        };
        cmd.env("PORT", self.app_ports[i].to_string())
            .env(
                "REDIS_PORT",
                node.redis.map(|a| a.port().to_string()).unwrap_or_default(),
            )
            .env("SIDECAR_HTTP", sidecar.to_string())
            .env("NODE_NAME", &node.name)
            .env("JVM_ROUTE", &node.route)
            // Scratch space that goes with the stack (e.g. a CATALINA_BASE).
            .env("SESSIONMESH_APP_DIR", &self.cl.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        // The demo app reports its address on stdout; other apps are waited for
        // through the load balancer's health checks.
        let wait = matches!(self.app, AppSpec::Demo).then_some(Duration::from_secs(10));
        let (child, first) = spawn_with_first_line(&mut cmd, wait)?;
        if wait.is_some() && first.is_none() {
            anyhow::bail!("demo app {} did not start", i + 1);
        }
        self.apps[i] = Some(child);
        Ok(())
    }

    /// SIGKILL of the whole node: app and sidecar.
    pub fn kill_node(&mut self, i: usize) {
        if let Some(mut c) = self.apps[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.cl.kill(i);
    }

    /// Sends a command to HAProxy's admin socket, or acts on the built-in router.
    pub fn set_maint(&self, i: usize, maint: bool) -> anyhow::Result<()> {
        let name = self.name(i);
        match &self.lb {
            Lb::Haproxy { admin, .. } => {
                let mut s = std::os::unix::net::UnixStream::connect(admin)?;
                let state = if maint { "maint" } else { "ready" };
                s.write_all(format!("set server app/{name} state {state}\n").as_bytes())?;
                let mut out = String::new();
                let _ = std::io::Read::read_to_string(&mut s, &mut out);
                anyhow::ensure!(out.trim().is_empty(), "haproxy: {out}");
                Ok(())
            }
            Lb::Builtin { router, .. } => {
                router.set_maint(&name, maint);
                Ok(())
            }
        }
    }

    /// Node `i`'s row of HAProxy's `show stat` CSV.
    fn haproxy_stat(&self, i: usize) -> Option<Vec<String>> {
        let Lb::Haproxy { admin, .. } = &self.lb else {
            return None;
        };
        let mut s = std::os::unix::net::UnixStream::connect(admin).ok()?;
        s.write_all(b"show stat\n").ok()?;
        let mut out = String::new();
        let _ = std::io::Read::read_to_string(&mut s, &mut out);
        let prefix = format!("app,{},", self.name(i));
        out.lines()
            .find(|l| l.starts_with(&prefix))
            .map(|l| l.split(',').map(str::to_owned).collect())
    }

    /// The load balancer's view of every app, for failure messages: status,
    /// last check result and its duration (HAProxy's `show stat` fields).
    pub fn lb_report(&self) -> String {
        (0..self.cl.nodes.len())
            .map(|i| match self.haproxy_stat(i) {
                Some(r) => {
                    let f = |k: usize| r.get(k).map(String::as_str).unwrap_or("?");
                    format!(
                        "{} {} check={} code={} took={}ms desc={}",
                        self.name(i),
                        f(17),
                        f(36),
                        f(37),
                        f(38),
                        f(65)
                    )
                }
                None => format!("{} up={}", self.name(i), self.lb_up(i)),
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Current sessions on a server, as the load balancer counts them (0 for
    /// the built-in router, which does not count). CSV field 4 is `scur`.
    pub fn lb_current(&self, i: usize) -> u64 {
        self.haproxy_stat(i)
            .and_then(|r| r.get(4)?.parse().ok())
            .unwrap_or(0)
    }

    /// Whether the load balancer considers the app of node `i` up, after a
    /// passed health check.
    pub fn lb_up(&self, i: usize) -> bool {
        match &self.lb {
            Lb::Haproxy { .. } => self.haproxy_stat(i).is_some_and(|r| haproxy_server_up(&r)),
            Lb::Builtin { router, .. } => router.backends[i]
                .up
                .load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Waits until the app of node `i` answers `GET /health` with 200 itself.
    pub async fn wait_app_healthy(&self, i: usize, within: Duration) -> bool {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.app_ports[i]));
        let t = Instant::now();
        while t.elapsed() < within {
            let mut c = crate::demo::client::Client::new(addr);
            if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(2), c.get("/health")).await
            {
                if r.status == 200 {
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    pub async fn wait_lb_up(&self, i: usize, within: Duration) -> bool {
        let t = Instant::now();
        while t.elapsed() < within {
            if self.lb_up(i) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    /// Graceful stop of node `i`: out of the load balancer, in-flight requests
    /// finished, then SIGTERM to the app and the sidecar (which flushes and leaves).
    pub async fn stop_node_gracefully(&mut self, i: usize) -> anyhow::Result<()> {
        self.set_maint(i, true)?;
        let t = Instant::now();
        while self.lb_current(i) > 0 && t.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if let Some(mut c) = self.apps[i].take() {
            signal(c.id(), libc::SIGTERM);
            let _ = c.wait();
        }
        let code = self.cl.terminate(i, Duration::from_secs(10));
        anyhow::ensure!(
            code == Some(0),
            "sidecar node{} did not exit cleanly ({code:?})",
            i + 1
        );
        Ok(())
    }

    /// Starts node `i` again: sidecar (gated on `/readyz`), then the app, then
    /// back into the load balancer.
    pub async fn restart_node(&mut self, i: usize) -> anyhow::Result<()> {
        self.cl.start(i)?;
        anyhow::ensure!(
            self.cl.wait_ready(i, Duration::from_secs(30)).await,
            "node{} not ready after restart",
            i + 1
        );
        self.start_app(i)?;
        // Out of maintenance only once the app answers: HAProxy takes a server
        // out of MAINT as UP with its last check result, from before the stop.
        // A JVM app under load takes seconds to start.
        anyhow::ensure!(
            self.wait_app_healthy(i, Duration::from_secs(60)).await,
            "the app of node{} never answered /health after the restart",
            i + 1
        );
        self.set_maint(i, false)?;
        anyhow::ensure!(
            self.wait_lb_up(i, Duration::from_secs(60)).await,
            "load balancer never saw node{} up again",
            i + 1
        );
        Ok(())
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for c in self.apps.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
        match &mut self.lb {
            Lb::Haproxy { child, .. } => {
                let _ = child.kill();
                let _ = child.wait();
            }
            Lb::Builtin { stop, .. } => stop.cancel(),
        }
    }
}

/// A browser: one connection to the load balancer and a cookie jar.
pub struct User {
    pub client: Client,
    pub jar: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct Visit {
    pub status: u16,
    pub counter: Option<u64>,
    pub node: String,
    pub session: String,
    pub new: bool,
    pub rebound: bool,
}

impl User {
    pub fn new(lb: SocketAddr) -> Self {
        User {
            client: Client::new(lb),
            jar: BTreeMap::new(),
        }
    }

    pub fn session_cookie(&self) -> Option<&String> {
        self.jar.get("JSESSIONID")
    }

    /// GET `path` with the cookie jar; keeps cookies the response sets.
    pub async fn get(&mut self, path: &str) -> anyhow::Result<crate::demo::client::Reply> {
        let cookies = self
            .jar
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ");
        let headers = if cookies.is_empty() {
            vec![]
        } else {
            vec![("cookie", cookies)]
        };
        let r = self
            .client
            .request_with(hyper::Method::GET, path, &headers, bytes::Bytes::new())
            .await?;
        for v in r.headers.get_all(hyper::header::SET_COOKIE) {
            if let Ok(v) = v.to_str() {
                let first = v.split(';').next().unwrap_or_default();
                if let Some((k, val)) = first.split_once('=') {
                    self.jar.insert(k.trim().to_owned(), val.trim().to_owned());
                }
            }
        }
        Ok(r)
    }

    pub async fn visit(&mut self) -> anyhow::Result<Visit> {
        let r = self.get("/").await?;
        let j = r.json();
        Ok(Visit {
            status: r.status,
            counter: j["counter"].as_u64(),
            node: j["node"].as_str().unwrap_or_default().to_owned(),
            session: j["session"].as_str().unwrap_or_default().to_owned(),
            new: j["new"].as_bool().unwrap_or(false),
            rebound: j["rebound"].as_bool().unwrap_or(false),
        })
    }

    pub fn sticky_server(&self) -> Option<String> {
        self.jar.get("SERVERID").cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::haproxy_server_up;

    fn row(status: &str, check: &str) -> Vec<String> {
        let mut r = vec![String::new(); 80];
        r[17] = status.into();
        r[36] = check.into();
        r
    }

    #[test]
    fn a_server_is_up_only_after_a_passed_check() {
        // HAProxy 2.6 right after start: not checked yet, the app may not listen.
        assert!(!haproxy_server_up(&row("UP 1/2", "INI")));
        assert!(!haproxy_server_up(&row("UP 1/2", "* INI")));
        assert!(!haproxy_server_up(&row("DOWN", "L4CON")));
        assert!(!haproxy_server_up(&row("UP 1/2", "L7STS")));
        assert!(!haproxy_server_up(&row("MAINT", "L7OK")));
        assert!(!haproxy_server_up(&[]));
        assert!(haproxy_server_up(&row("UP", "L7OK")));
        assert!(haproxy_server_up(&row("UP", "* L7OK")));
    }
}
