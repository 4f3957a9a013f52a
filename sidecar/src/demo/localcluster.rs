//! Runs sidecar processes on loopback from a generated member file: the demo,
//! the bench harness and the process-level tests all use it.
//!
//! Ports come from binding `127.0.0.1:0`; each sidecar reports its HTTP port
//! on its first stdout line. Children are killed when the cluster is dropped.

use crate::demo::client::Client;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub struct LocalNode {
    pub name: String,
    pub route: String,
    pub replication: SocketAddr,
    pub http: Option<SocketAddr>,
    pub redis: Option<SocketAddr>,
    pub child: Option<Child>,
    pub log: PathBuf,
}

pub struct LocalCluster {
    pub dir: PathBuf,
    pub bin: PathBuf,
    pub cluster: String,
    pub nodes: Vec<LocalNode>,
    pub secret_file: PathBuf,
    pub args: Vec<String>,
    /// Members written to the member file (a node can exist before it is listed).
    pub listed: Vec<bool>,
    /// Each member gets a member file listing only itself: N sidecars with no
    /// peers, the bench's reference for what clustering costs.
    pub standalone: bool,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A free port for a test process to listen on. Ports are handed out from a
/// per-process window below Linux's ephemeral range (32768+), so they never
/// collide with the source ports of outgoing connections, nor (within one test
/// binary) with each other; each is checked by binding it.
pub fn free_port() -> std::io::Result<u16> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    const LOW: u64 = 20_000;
    const SPAN: u64 = 12_000;
    let start = (u64::from(std::process::id()) * 97) % SPAN;
    for _ in 0..SPAN {
        let port = (LOW + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl LocalCluster {
    /// `n` members named node1..nodeN, all listed; none started.
    pub fn new(bin: &Path, n: usize, args: &[&str]) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "sessionmesh-{}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            crate::node::now_ms() % 100_000
        ));
        std::fs::create_dir_all(&dir)?;
        let secret_file = dir.join("secret");
        let mut key = [0u8; 24];
        crate::core::identity::fill_random(&mut key);
        std::fs::write(&secret_file, crate::core::identity::hex(&key))?;
        let mut c = LocalCluster {
            dir,
            bin: bin.to_owned(),
            cluster: "local".into(),
            nodes: Vec::new(),
            secret_file,
            args: args.iter().map(|s| s.to_string()).collect(),
            listed: Vec::new(),
            standalone: false,
        };
        for _ in 0..n {
            c.add_node(true)?;
        }
        c.write_members()?;
        Ok(c)
    }

    /// Adds node(N+1); `listed` puts it into the member file on the next write.
    pub fn add_node(&mut self, listed: bool) -> anyhow::Result<usize> {
        let i = self.nodes.len();
        let name = format!("node{}", i + 1);
        let port = free_port()?;
        self.nodes.push(LocalNode {
            route: name.clone(),
            log: self.dir.join(format!("{name}.log")),
            name,
            replication: SocketAddr::from(([127, 0, 0, 1], port)),
            http: None,
            redis: None,
            child: None,
        });
        self.listed.push(listed);
        Ok(i)
    }

    pub fn members_file(&self) -> PathBuf {
        self.dir.join("members.yaml")
    }

    pub fn members_yaml(&self) -> String {
        let mut s = format!("cluster: {}\nmembers:\n", self.cluster);
        for (n, listed) in self.nodes.iter().zip(&self.listed) {
            if *listed {
                s.push_str(&format!(
                    "  - name: {}\n    address: {}\n    jvmRoute: {}\n",
                    n.name, n.replication, n.route
                ));
            }
        }
        s
    }

    /// Writes atomically (rename), as a config management tool would.
    pub fn write_members(&self) -> anyhow::Result<()> {
        self.write_members_text(&self.members_yaml())
    }

    pub fn write_members_text(&self, text: &str) -> anyhow::Result<()> {
        let tmp = self.dir.join("members.yaml.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, self.members_file())?;
        Ok(())
    }

    /// Starts node `i` and waits until it reports its HTTP address.
    pub fn start(&mut self, i: usize) -> anyhow::Result<()> {
        self.start_with(i, &[])
    }

    pub fn start_with(&mut self, i: usize, extra: &[&str]) -> anyhow::Result<()> {
        self.start_with_env(i, extra, &[])
    }

    /// Starts node `i` with extra arguments and environment (e.g. libfaketime's).
    pub fn start_with_env(
        &mut self,
        i: usize,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.nodes[i].log)?;
        let members = if self.standalone {
            let n = &self.nodes[i];
            let own = self.dir.join(format!("members-{}.yaml", n.name));
            let text = format!(
                "cluster: {}-{}\nmembers:\n  - name: {}\n    address: {}\n    jvmRoute: {}\n",
                self.cluster, n.name, n.name, n.replication, n.route
            );
            std::fs::write(&own, text)?;
            own
        } else {
            self.members_file()
        };
        let mut cmd = Command::new(&self.bin);
        cmd.arg("run")
            .arg("--members")
            .arg(members)
            .arg("--member")
            .arg(&self.nodes[i].name)
            .args(if extra.contains(&"--http") {
                vec![]
            } else {
                vec!["--http", "127.0.0.1:0"]
            })
            .args(if extra.contains(&"--secret-file") {
                vec![]
            } else {
                vec!["--secret-file".into(), self.secret_file.clone()]
            })
            .args(&self.args)
            .args(extra)
            .env_remove("SESSIONMESH_SECRET")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        let (child, first) = spawn_with_first_line(&mut cmd, Some(Duration::from_secs(15)))?;
        let Some(line) = first else {
            anyhow::bail!(
                "{} did not start: {}",
                self.nodes[i].name,
                self.log_tail(i, 20)
            );
        };
        let v: serde_json::Value = serde_json::from_str(&line)?;
        let http: SocketAddr = v["http"].as_str().unwrap_or_default().parse()?;
        self.nodes[i].http = Some(http);
        self.nodes[i].redis = v["redis"].as_str().and_then(|s| s.parse().ok());
        self.nodes[i].child = Some(child);
        Ok(())
    }

    pub fn client(&self, i: usize) -> Client {
        Client::new(
            self.nodes[i]
                .http
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9))),
        )
    }

    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].child.as_ref().map(|c| c.id())
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM; waits up to `within` for the exit. Returns the exit status code.
    pub fn terminate(&mut self, i: usize, within: Duration) -> Option<i32> {
        let mut c = self.nodes[i].child.take()?;
        // SAFETY-free: libc::kill has no memory-safety preconditions.
        signal(c.id(), libc::SIGTERM);
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn is_running(&mut self, i: usize) -> bool {
        self.nodes[i]
            .child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn log_text(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }

    pub fn log_tail(&self, i: usize, n: usize) -> String {
        let t = self.log_text(i);
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Polls node `i`'s `/readyz` until 200 or the deadline.
    pub async fn wait_ready(&self, i: usize, within: Duration) -> bool {
        let mut c = self.client(i);
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if c.get("/readyz").await.is_ok_and(|r| r.status == 200) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Spawns `cmd` (stdout piped) and, with a timeout, waits for its first stdout
/// line; stdout keeps being drained so the child never blocks on a full pipe.
/// A child that prints nothing in time is killed and `None` returned.
pub fn spawn_with_first_line(
    cmd: &mut Command,
    wait: Option<Duration>,
) -> anyhow::Result<(Child, Option<String>)> {
    let mut child = cmd.spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(l)) = lines.next() {
            let _ = tx.send(l);
        }
        for _ in lines {}
    });
    let Some(wait) = wait else {
        return Ok((child, None));
    };
    match rx.recv_timeout(wait) {
        Ok(l) => Ok((child, Some(l))),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            Ok((child, None))
        }
    }
}

/// Sends a signal to a process.
pub fn signal(pid: u32, sig: i32) {
    #[allow(unsafe_code)]
    // SAFETY: kill(2) takes plain integers and has no memory-safety requirements.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// Re-evaluates `cond` every 5 ms until it holds or `within` passes.
pub async fn wait_for<F, Fut>(within: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        if std::env::var_os("SESSIONMESH_KEEP_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Resident memory of a process, in bytes (0 if it is gone).
pub fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// CPU time (user + system) a process has used, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    // utime and stime are fields 14 and 15, after the parenthesised command.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

/// One value of a member's `/metrics` (NaN if absent).
pub async fn metric(c: &mut Client, name: &str) -> f64 {
    let Ok(r) = c.get("/metrics").await else {
        return f64::NAN;
    };
    r.text()
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Where an external part the tests use comes from, for the one-line error a
/// test gives when it is missing.
fn install_hint(part: &str) -> &'static str {
    match part {
        "haproxy" => "apt-get install haproxy",
        "redis-cli" | "redis-benchmark" => "apt-get install redis-tools",
        "redis-server" => "apt-get install redis-server",
        "etcd" => "apt-get install etcd-server",
        "wrk" => "apt-get install wrk",
        "openssl" => "apt-get install openssl",
        "faketime" => "apt-get install faketime",
        "go" => {
            "apt-get install golang-go golang-github-masterminds-sprig-dev golang-gopkg-yaml.v2-dev"
        }
        "python3" => "apt-get install python3 python3-pip",
        "node" => "apt-get install nodejs npm",
        "php" => "apt-get install php-cli php-redis",
        _ => "see e2e/setup.sh",
    }
}

/// A standalone redis-server on a free loopback port, without persistence:
/// the reference the tests and the bench compare the Redis endpoint with.
/// Killed when dropped.
pub struct RedisServer {
    pub port: u16,
    child: std::process::Child,
}

impl RedisServer {
    /// Starts one and waits (at most 5 s) until it accepts connections.
    pub fn start() -> anyhow::Result<RedisServer> {
        let port = free_port()?;
        let child = Command::new(require("redis-server"))
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()?;
        let server = RedisServer { port, child };
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(
                t0.elapsed() < Duration::from_secs(5),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(server)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The path of an external program a test needs. When it is missing, the test
/// fails with one line that names the command installing it.
pub fn require(program: &str) -> PathBuf {
    let dirs = std::env::var("PATH").unwrap_or_default();
    let found = dirs
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file());
    match found {
        Some(p) => p,
        None => missing(
            &format!("{program} is not installed"),
            install_hint(program),
        ),
    }
}

/// Python modules a test needs (imported by `python3`), or one line naming the install command.
pub fn require_python(modules: &[&str]) {
    require("python3");
    let ok = Command::new("python3")
        .arg("-c")
        .arg(format!("import {}", modules.join(", ")))
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        missing(
            &format!("python3 cannot import {}", modules.join(", ")),
            "pip install redis flask flask-session django",
        );
    }
}

/// `e2e/node/node_modules` with the packages the Node session-store test uses.
pub fn require_node_modules(e2e_node: &Path) {
    require("node");
    if !e2e_node.join("node_modules/connect-redis").is_dir() {
        missing("e2e/node has no node_modules", "cd e2e/node && npm install");
    }
}

/// The environment that runs a process with its wall clock moved by `offset`
/// (libfaketime syntax, e.g. `+10m`, `-1h`); monotonic time is left alone so
/// timers behave. Fails the test with one line when libfaketime is missing.
pub fn faketime_env(offset: &str) -> Vec<(&'static str, String)> {
    require("faketime");
    let lib = [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib",
    ]
    .iter()
    .map(|d| Path::new(d).join("faketime/libfaketime.so.1"))
    .find(|p| p.is_file());
    let Some(lib) = lib else {
        missing("libfaketime.so.1 not found", install_hint("faketime"))
    };
    vec![
        ("LD_PRELOAD", lib.display().to_string()),
        ("FAKETIME", offset.to_owned()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_owned()),
        ("FAKETIME_NO_CACHE", "1".to_owned()),
    ]
}

/// Fails the calling test with one readable line, no backtrace.
pub fn missing(what: &str, install: &str) -> ! {
    // `panic!` would add a location and a backtrace hint; this line is all a
    // user needs. `resume_unwind` fails the test without the panic hook.
    let line =
        format!("{what}: run ./e2e/setup.sh (installs every part the tests need), or: {install}");
    eprintln!("{line}");
    std::panic::resume_unwind(Box::new(line))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_part_fails_with_one_line_naming_the_install_command() {
        let err = std::panic::catch_unwind(|| require("haproxy-that-is-not-installed"))
            .err()
            .map(|e| e.downcast_ref::<String>().cloned().unwrap_or_default());
        let line = err.unwrap_or_default();
        assert!(
            line.starts_with("haproxy-that-is-not-installed is not installed: run ./e2e/setup.sh"),
            "{line}"
        );
        assert_eq!(line.lines().count(), 1, "{line}");
        assert_eq!(install_hint("redis-cli"), "apt-get install redis-tools");
    }
}
