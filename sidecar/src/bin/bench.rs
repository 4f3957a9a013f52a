//! `sessionmesh-bench [scenario]`: figures for a 3-member cluster on loopback,
//! printed as `name value unit` lines. Scenarios: demo (wrk through HAProxy),
//! failover, rolling, store (versus redis-server), writes, lag, detect (SIGKILL
//! and SIGSTOP),
//! transfer (includes rss), all (default).

use sessionmesh_sidecar::demo::localcluster::{cpu_seconds, metric, rss_bytes, LocalCluster};
use sessionmesh_sidecar::demo::stack::{AppSpec, LbChoice, Stack, User};
use sessionmesh_sidecar::node::now_ms;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn sidecar_bin() -> PathBuf {
    let me = std::env::current_exe().unwrap_or_default();
    me.with_file_name("sessionmesh-sidecar")
}

/// `(state, sinceMs)` of `name` in a member's `/v1/cluster`.
async fn member(
    c: &mut sessionmesh_sidecar::demo::client::Client,
    name: &str,
) -> anyhow::Result<Option<(String, u64)>> {
    let j = c.get("/v1/cluster").await?.json();
    Ok(j["members"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == name))
        .map(|m| {
            (
                m["state"].as_str().unwrap_or_default().to_owned(),
                m["sinceMs"].as_u64().unwrap_or(0),
            )
        }))
}

/// Polls until `name` is in `state`; returns its `sinceMs`.
async fn wait_member(
    c: &mut sessionmesh_sidecar::demo::client::Client,
    name: &str,
    state: &str,
    within: Duration,
) -> anyhow::Result<u64> {
    let t0 = Instant::now();
    loop {
        if let Some((s, since)) = member(c, name).await? {
            if s == state {
                return Ok(since);
            }
        }
        anyhow::ensure!(
            t0.elapsed() < within,
            "{name} not {state} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn figure(name: &str, value: f64, unit: &str) {
    println!("{name} {value:.3} {unit}");
}

async fn cluster(n: usize, args: &[&str]) -> anyhow::Result<LocalCluster> {
    let mut cl = LocalCluster::new(&sidecar_bin(), n, args)?;
    for i in 0..n {
        cl.start(i)?;
    }
    for i in 0..n {
        if !cl.wait_ready(i, Duration::from_secs(15)).await {
            anyhow::bail!("node{} not ready", i + 1);
        }
    }
    Ok(cl)
}

fn b64(s: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Replicated writes/s with 32 connections spread over the 3 members, 1 KiB attribute.
async fn writes(mode: &str, secs: u64) -> anyhow::Result<()> {
    let cl = cluster(3, &["--send", mode]).await?;
    let conns = 32;
    let value = vec![b'v'; 1024];
    let mut tasks = Vec::new();
    for t in 0..conns {
        let mut c = cl.client(t % 3);
        let value = value.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let ids: Vec<String> = (0..20).map(|i| format!("B{t}x{i}")).collect();
            for id in &ids {
                let _ = c.post("/v1/sessions", format!(r#"{{"id":"{id}"}}"#)).await;
            }
            let end = Instant::now() + Duration::from_secs(secs);
            let mut i = 0usize;
            let mut errors = 0u64;
            while Instant::now() < end {
                let t0 = Instant::now();
                match c
                    .put(
                        &format!("/v1/sessions/{}/attributes/data", ids[i % ids.len()]),
                        value.clone(),
                    )
                    .await
                {
                    Ok(r) if r.status == 204 => lat.push(t0.elapsed().as_secs_f64() * 1000.0),
                    _ => errors += 1,
                }
                i += 1;
            }
            (lat, errors)
        }));
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        lat.extend(l);
        errors += e;
    }
    let n = lat.len() as f64;
    // Every write must have reached both other members: count what they applied.
    let t = Instant::now();
    let mut coverage = 0.0;
    while t.elapsed() < Duration::from_secs(10) {
        let mut applied = 0.0;
        for i in 0..3 {
            applied += metric(&mut cl.client(i), "sessionmesh_deltas_applied_total").await;
        }
        // Creates (20 per connection) are replicated too.
        coverage = applied / (2.0 * (n + (conns * 20) as f64));
        if coverage >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    figure(
        &format!("replicated_writes_{mode}"),
        n / secs as f64,
        "writes/s",
    );
    figure(&format!("replication_coverage_{mode}"), coverage, "ratio");
    figure(&format!("write_{mode}_p50_ms"), pct(&mut lat, 0.5), "ms");
    figure(&format!("write_{mode}_p99_ms"), pct(&mut lat, 0.99), "ms");
    figure(&format!("write_{mode}_errors"), errors as f64, "count");
    Ok(())
}

/// Written on A (async), visible on B: polled on B over a keep-alive connection.
async fn lag(samples: usize) -> anyhow::Result<()> {
    let cl = cluster(3, &[]).await?;
    let (mut a, mut b) = (cl.client(0), cl.client(1));
    a.post("/v1/sessions", r#"{"id":"LAG"}"#).await?;
    let mut v = Vec::new();
    let pad = "x".repeat(1000);
    for i in 0..samples {
        let val = format!("{i:08}{pad}");
        let r = a
            .put("/v1/sessions/LAG/attributes/k?send=async", val.clone())
            .await?;
        anyhow::ensure!(r.status == 204, "write failed: {}", r.status);
        let t0 = Instant::now();
        loop {
            let r = b.get("/v1/sessions/LAG/attributes/k?touch=false").await?;
            if r.body.len() >= 8 && r.body[..8] == val.as_bytes()[..8] {
                break;
            }
            if t0.elapsed() > Duration::from_secs(2) {
                anyhow::bail!("value never arrived");
            }
        }
        v.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    figure("replication_lag_p50_ms", pct(&mut v, 0.5), "ms");
    figure("replication_lag_p99_ms", pct(&mut v, 0.99), "ms");
    Ok(())
}

/// SIGKILL the third member, read when the first declared it dead.
async fn detect(rounds: usize) -> anyhow::Result<()> {
    let mut cl = cluster(3, &[]).await?;
    let mut c = cl.client(0);
    let mut v = Vec::new();
    for _ in 0..rounds {
        let killed = now_ms();
        cl.kill(2);
        let since = wait_member(&mut c, "node3", "dead", Duration::from_secs(5)).await?;
        v.push(since.saturating_sub(killed) as f64);
        cl.start(2)?;
        anyhow::ensure!(
            cl.wait_ready(2, Duration::from_secs(10)).await,
            "node3 not ready after restart"
        );
        wait_member(&mut c, "node3", "alive", Duration::from_secs(5)).await?;
    }
    figure("failure_detect_p50_ms", pct(&mut v, 0.5), "ms");
    figure("failure_detect_p99_ms", pct(&mut v, 0.99), "ms");
    figure("failure_detect_max_ms", pct(&mut v, 1.0), "ms");
    figure("failure_detect_rounds", v.len() as f64, "count");
    Ok(())
}

/// SIGSTOP the third member (a hung process with open sockets), read when the
/// first declared it dead, then SIGCONT it and wait until it is alive again.
async fn detect_hung(rounds: usize) -> anyhow::Result<()> {
    let cl = cluster(3, &[]).await?;
    let mut c = cl.client(0);
    let pid = cl.pid(2).unwrap_or(0);
    let mut v = Vec::new();
    for _ in 0..rounds {
        let stopped = now_ms();
        sessionmesh_sidecar::demo::localcluster::signal(pid, libc::SIGSTOP);
        let since = wait_member(&mut c, "node3", "dead", Duration::from_secs(5)).await;
        sessionmesh_sidecar::demo::localcluster::signal(pid, libc::SIGCONT);
        v.push(since?.saturating_sub(stopped) as f64);
        wait_member(&mut c, "node3", "alive", Duration::from_secs(5)).await?;
    }
    figure("failure_detect_hung_p50_ms", pct(&mut v, 0.5), "ms");
    figure("failure_detect_hung_p99_ms", pct(&mut v, 0.99), "ms");
    Ok(())
}

/// Loads N × 1 KiB sessions, then a fourth member joins; also RSS per session.
async fn transfer(n: usize) -> anyhow::Result<()> {
    let mut cl = cluster(3, &[]).await?;
    let pid = cl.pid(0).unwrap_or(0);
    let base = rss_bytes(pid);
    let payload = b64(&[b'p'; 1024]);
    let conns = 32;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..conns {
        let mut c = cl.client(0);
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            let mut ok = 0usize;
            let mut i = t;
            while i < n {
                let body = format!(r#"{{"id":"T{i:08}","attributes":{{"data":"{payload}"}}}}"#);
                if c.post("/v1/sessions", body)
                    .await
                    .is_ok_and(|r| r.status == 201)
                {
                    ok += 1;
                }
                i += conns;
            }
            ok
        }));
    }
    let mut loaded = 0;
    for t in tasks {
        loaded += t.await?;
    }
    anyhow::ensure!(loaded == n, "loaded only {loaded} of {n}");
    figure(
        "load_sessions_per_s",
        n as f64 / t0.elapsed().as_secs_f64(),
        "sessions/s",
    );
    // Let replication settle before measuring memory and joining.
    let mut c1 = cl.client(1);
    let t1 = Instant::now();
    while t1.elapsed() < Duration::from_secs(30) {
        if c1.get("/v1/sessions?limit=1").await?.json()["count"].as_u64() == Some(n as u64) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = rss_bytes(pid);
    let per = after.saturating_sub(base) as f64 / n as f64;
    let payload_per = (1024 + "data".len() + 9) as f64;
    figure("rss_bytes_per_session", per, "bytes");
    figure("rss_payload_ratio", per / payload_per, "ratio");

    let i = cl.add_node(true)?;
    cl.write_members()?;
    // The other members pick the new member up on their next member-file poll.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let t2 = Instant::now();
    cl.start(i)?;
    anyhow::ensure!(
        cl.wait_ready(i, Duration::from_secs(60)).await,
        "joiner not ready"
    );
    let wall = t2.elapsed().as_secs_f64();
    let mut c4 = cl.client(i);
    let have = c4.get("/v1/sessions?limit=1").await?.json()["count"]
        .as_u64()
        .unwrap_or(0);
    anyhow::ensure!(have == n as u64, "joiner ready with {have} of {n}");
    let m = c4.get("/metrics").await?.text();
    let inner = m
        .lines()
        .find(|l| l.starts_with("sessionmesh_transfer_duration_seconds "))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    figure(&format!("state_transfer_{}k_s", n / 1000), inner, "s");
    figure(
        &format!("state_transfer_{}k_start_to_ready_s", n / 1000),
        wall,
        "s",
    );
    Ok(())
}

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/sbin"])
        .map(|d| PathBuf::from(d).join(cmd))
        .find(|p| p.is_file())
}

/// wrk's latency figure, e.g. `1.23ms`, `850.00us`, `1.02s`, in ms.
fn wrk_ms(s: &str) -> f64 {
    let (num, mult) = if let Some(n) = s.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000.0)
    } else {
        (s, 1.0)
    };
    num.parse::<f64>().map_or(f64::NAN, |v| v * mult)
}

/// Runs wrk and returns (requests/s, p50 ms, p99 ms, non-2xx).
fn wrk(
    url: &str,
    conns: usize,
    secs: u64,
    script: &std::path::Path,
) -> anyhow::Result<(f64, f64, f64, u64)> {
    let wrk = which("wrk").ok_or_else(|| anyhow::anyhow!("wrk is not installed"))?;
    let threads = conns.clamp(1, 2);
    let out = std::process::Command::new(wrk)
        .args([
            "-t",
            &threads.to_string(),
            "-c",
            &conns.to_string(),
            "-d",
            &format!("{secs}s"),
            "--latency",
            "-s",
        ])
        .arg(script)
        .arg(url)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN);
    let lat = |p: &str| {
        text.lines()
            .map(str::trim)
            .find(|l| l.starts_with(p))
            .and_then(|l| l.split_whitespace().nth(1))
            .map_or(f64::NAN, wrk_ms)
    };
    let non2xx = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    anyhow::ensure!(
        rps.is_finite(),
        "wrk printed no result:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((rps, lat("50%"), lat("99%"), non2xx))
}

/// `/proc/loadavg`'s three figures, for the conditions printed with each scenario.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// CPU microseconds used so far by the stack's sidecars, apps and load balancer.
fn stack_cpu(st: &Stack) -> [f64; 3] {
    let sidecars: f64 = (0..st.cl.nodes.len())
        .filter_map(|i| st.cl.pid(i))
        .map(|p| cpu_seconds(p) * 1e6)
        .sum();
    let apps: f64 = st
        .apps
        .iter()
        .flatten()
        .map(|c| cpu_seconds(c.id()) * 1e6)
        .sum();
    let lb = match &st.lb {
        sessionmesh_sidecar::demo::stack::Lb::Haproxy { child, .. } => {
            cpu_seconds(child.id()) * 1e6
        }
        sessionmesh_sidecar::demo::stack::Lb::Builtin { .. } => 0.0,
    };
    [sidecars, apps, lb]
}

/// A wrk script that sends each request with one of `cookies`, in turn.
async fn cookie_script(st: &Stack, users: usize) -> anyhow::Result<PathBuf> {
    {
        let mut cookies = Vec::new();
        for _ in 0..users {
            let mut u = User::new(st.lb_addr);
            u.visit().await?;
            cookies.push(
                u.jar
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join("; "),
            );
        }
        let script = st.cl.dir.join("cookies.lua");
        let list = cookies
            .iter()
            .map(|c| format!("{c:?}"))
            .collect::<Vec<_>>()
            .join(",\n  ");
        std::fs::write(
            &script,
            format!(
                "cookies = {{\n  {list}\n}}\ncounter = math.random(1, #cookies)\nrequest = function()\n  counter = counter + 1\n  \
                 return wrk.format(\"GET\", \"/\", {{ [\"Cookie\"] = cookies[(counter % #cookies) + 1] }})\nend\n"
            ),
        )?;
        Ok(script)
    }
}

/// What a user pays for clustering: the demo app behind HAProxy, every request
/// reading and writing the session, with (a) 3 members in sync mode, (b) 3
/// members in async mode, (c) the same 3 apps each with a sidecar of its own
/// (no peers). The three stacks run side by side and wrk visits them in turn,
/// `rounds` times, so a noisy neighbour hits all three alike.
async fn demo(secs: u64, rounds: usize) -> anyhow::Result<()> {
    const USERS: usize = 64;
    const CONNS: usize = 32;
    println!(
        "# demo: load average at start {}; {CONNS} connections, {USERS} cookies, {secs} s per run, {rounds} rounds; \
         HAProxy as in stack::haproxy_config (cookie SERVERID insert, roundrobin, httpchk)",
        loadavg()
    );
    let bin = sidecar_bin();
    let mut standalone = LocalCluster::new(&bin, 3, &[])?;
    standalone.standalone = true;
    let stacks = [
        (
            "sync",
            Stack::start(&bin, 3, &["--send", "sync"], LbChoice::Haproxy, "sync").await?,
        ),
        (
            "async",
            Stack::start(&bin, 3, &["--send", "async"], LbChoice::Haproxy, "async").await?,
        ),
        (
            "standalone",
            Stack::start_on(standalone, LbChoice::Haproxy, "sync", AppSpec::Demo).await?,
        ),
    ];
    let mut scripts = Vec::new();
    for (name, st) in &stacks {
        scripts.push(cookie_script(st, USERS).await?);
        // For `perf record -p`: which processes belong to which stack.
        let sidecars: Vec<String> = (0..st.cl.nodes.len())
            .filter_map(|i| st.cl.pid(i))
            .map(|p| p.to_string())
            .collect();
        let apps: Vec<String> = st
            .apps
            .iter()
            .flatten()
            .map(|c| c.id().to_string())
            .collect();
        println!(
            "# {name} stack: sidecar pids {}, app pids {}",
            sidecars.join(","),
            apps.join(",")
        );
    }
    let mut rps: [Vec<f64>; 3] = Default::default();
    let mut p99: [Vec<f64>; 3] = Default::default();
    let mut ratios: [Vec<f64>; 2] = Default::default();
    // CPU µs per request of [sidecars, apps, load balancer], per stack.
    let mut cpu: [[Vec<f64>; 3]; 3] = Default::default();
    for round in 0..rounds {
        let mut this = [0.0; 3];
        for (k, (name, st)) in stacks.iter().enumerate() {
            let url = format!("http://{}/", st.lb_addr);
            let before = stack_cpu(st);
            let (r, _p50, p, bad) = wrk(&url, CONNS, secs, &scripts[k])?;
            let after = stack_cpu(st);
            anyhow::ensure!(bad == 0, "{name}: {bad} failed requests");
            let reqs = r * secs as f64;
            for part in 0..3 {
                cpu[k][part].push((after[part] - before[part]) / reqs);
            }
            println!(
                "# round {round} {name}: {r:.0} req/s, p99 {p:.2} ms, CPU per request: sidecars {:.1} us, apps {:.1} us, HAProxy {:.1} us; load average {}",
                cpu[k][0].last().unwrap_or(&0.0), cpu[k][1].last().unwrap_or(&0.0), cpu[k][2].last().unwrap_or(&0.0), loadavg()
            );
            this[k] = r;
            rps[k].push(r);
            p99[k].push(p);
        }
        ratios[0].push(this[0] / this[2]);
        ratios[1].push(this[1] / this[2]);
    }
    for (k, (name, _)) in stacks.iter().enumerate() {
        let (lo, hi) = (pct(&mut rps[k], 0.0), pct(&mut rps[k], 1.0));
        figure(
            &format!("demo_rps_c{CONNS}_{name}"),
            pct(&mut rps[k], 0.5),
            "req/s",
        );
        figure(&format!("demo_rps_c{CONNS}_{name}_min"), lo, "req/s");
        figure(&format!("demo_rps_c{CONNS}_{name}_max"), hi, "req/s");
        figure(
            &format!("demo_p99_ms_c{CONNS}_{name}"),
            pct(&mut p99[k], 0.5),
            "ms",
        );
        figure(
            &format!("demo_sidecar_cpu_us_per_req_{name}"),
            pct(&mut cpu[k][0], 0.5),
            "us",
        );
        figure(
            &format!("demo_app_cpu_us_per_req_{name}"),
            pct(&mut cpu[k][1], 0.5),
            "us",
        );
        figure(
            &format!("demo_haproxy_cpu_us_per_req_{name}"),
            pct(&mut cpu[k][2], 0.5),
            "us",
        );
    }
    for (k, mode) in ["sync", "async"].iter().enumerate() {
        let (lo, hi) = (pct(&mut ratios[k], 0.0), pct(&mut ratios[k], 1.0));
        figure(
            &format!("demo_ratio_{mode}"),
            pct(&mut ratios[k], 0.5),
            "ratio",
        );
        figure(&format!("demo_ratio_{mode}_min"), lo, "ratio");
        figure(&format!("demo_ratio_{mode}_max"), hi, "ratio");
    }
    // One connection: latency without queueing, sync cluster.
    let url = format!("http://{}/", stacks[0].1.lb_addr);
    let (r, p50, p, _) = wrk(&url, 1, secs, &scripts[0])?;
    figure("demo_rps_c1_sync", r, "req/s");
    figure("demo_p50_ms_c1_sync", p50, "ms");
    figure("demo_p99_ms_c1_sync", p, "ms");
    println!("# demo: load average at end {}", loadavg());
    Ok(())
}

/// SIGKILL of the node holding a user's session, behind HAProxy: time to the
/// first good response. Median of `rounds`.
async fn failover(rounds: usize) -> anyhow::Result<()> {
    let mut st = Stack::start(&sidecar_bin(), 3, &[], LbChoice::Haproxy, "sync").await?;
    let mut v = Vec::new();
    let mut lost = 0;
    for _ in 0..rounds {
        let mut u = User::new(st.lb_addr);
        let mut last = None;
        for _ in 0..5 {
            last = Some(u.visit().await?);
        }
        let Some(before) = last else {
            anyhow::bail!("no visit")
        };
        let i = st
            .index_of(&before.node)
            .ok_or_else(|| anyhow::anyhow!("unknown node"))?;
        st.kill_node(i);
        let t0 = Instant::now();
        let after = loop {
            if let Ok(r) = u.visit().await {
                if r.status == 200 {
                    break r;
                }
            }
            anyhow::ensure!(
                t0.elapsed() < Duration::from_secs(10),
                "no good response within 10 s"
            );
        };
        v.push(t0.elapsed().as_secs_f64() * 1000.0);
        if after.counter != before.counter.map(|c| c + 1) {
            lost += 1;
        }
        st.restart_node(i).await?;
    }
    figure("failover_recovery_ms", pct(&mut v, 0.5), "ms");
    figure("failover_recovery_max_ms", pct(&mut v, 1.0), "ms");
    figure("failover_rounds", rounds as f64, "count");
    figure("failover_sessions_lost", lost as f64, "count");
    Ok(())
}

/// Rolling restart of all three nodes under 200 concurrent users.
async fn rolling() -> anyhow::Result<()> {
    let mut st = Stack::start(&sidecar_bin(), 3, &[], LbChoice::Haproxy, "sync").await?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut users = Vec::new();
    for _ in 0..200 {
        let stop = stop.clone();
        let lb = st.lb_addr;
        users.push(tokio::spawn(async move {
            let (mut ok, mut failed, mut lost, mut regress, mut last) =
                (0u64, 0u64, 0u64, 0u64, 0u64);
            let mut u = User::new(lb);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match u.visit().await {
                    Ok(v) if v.status == 200 => {
                        ok += 1;
                        let c = v.counter.unwrap_or(0);
                        if last > 0 && v.new {
                            lost += 1;
                        } else if last > 0 && c != last + 1 {
                            regress += 1;
                        }
                        last = c;
                    }
                    _ => failed += 1,
                }
            }
            (ok, failed, lost, regress)
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t0 = Instant::now();
    for i in 0..3 {
        st.stop_node_gracefully(i).await?;
        st.restart_node(i).await?;
    }
    let took = t0.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut tot = (0, 0, 0, 0);
    for u in users {
        let r = u.await?;
        tot = (tot.0 + r.0, tot.1 + r.1, tot.2 + r.2, tot.3 + r.3);
    }
    figure("rolling_restart_sessions_lost", tot.2 as f64, "count");
    figure("rolling_restart_counter_regressions", tot.3 as f64, "count");
    figure("rolling_restart_failed_requests", tot.1 as f64, "count");
    figure("rolling_restart_requests", tot.0 as f64, "count");
    figure("rolling_restart_s", took.as_secs_f64(), "s");
    Ok(())
}

struct RedisServer {
    port: u16,
    server: std::process::Child,
}

/// A standalone redis-server on a free loopback port, no persistence: the reference.
async fn redis_server() -> anyhow::Result<RedisServer> {
    let redis =
        which("redis-server").ok_or_else(|| anyhow::anyhow!("redis-server is not installed"))?;
    let port = sessionmesh_sidecar::demo::localcluster::free_port()?;
    let server = std::process::Command::new(redis)
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
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(5),
            "redis-server did not start"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(RedisServer { port, server })
}

/// The store path against an external session store: the sidecar's HTTP API
/// (PUT of a 1 KiB attribute, replicated to two peers) versus a standalone
/// redis-server (SET of 1 KiB), 32 connections each, same run.
async fn store(secs: u64) -> anyhow::Result<()> {
    let rb = which("redis-benchmark")
        .ok_or_else(|| anyhow::anyhow!("redis-benchmark is not installed"))?;
    let RedisServer { port, mut server } = redis_server().await?;
    let cl = cluster(3, &[]).await?;
    let mut c = cl.client(0);
    for i in 0..64 {
        c.post("/v1/sessions", format!(r#"{{"id":"R{i}"}}"#))
            .await?;
    }
    let script = cl.dir.join("put.lua");
    std::fs::write(
        &script,
        "counter = 0\nbody = string.rep(\"x\", 1024)\nrequest = function()\n  counter = counter + 1\n  \
         return wrk.format(\"PUT\", \"/v1/sessions/R\" .. (counter % 64) .. \"/attributes/data\", nil, body)\nend\n",
    )?;
    let mut ratios = Vec::new();
    for round in 0..3 {
        let url = format!(
            "http://{}/",
            cl.nodes[0].http.ok_or_else(|| anyhow::anyhow!("no http"))?
        );
        let (sm, _, p99, bad) = wrk(&url, 32, secs, &script)?;
        anyhow::ensure!(bad == 0, "{bad} failed PUTs");
        let out = std::process::Command::new(&rb)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-t",
                "set",
                "-d",
                "1024",
                "-c",
                "32",
                "-n",
                "200000",
                "-r",
                "64",
                "-q",
            ])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let rr: f64 = text
            .split(['\r', '\n'])
            .filter_map(|l| l.trim().strip_prefix("SET: "))
            .last()
            .and_then(|l| l.split_whitespace().next()?.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("redis-benchmark printed no result: {text}"))?;
        if round == 0 {
            figure("store_sessionmesh_put_p99_ms", p99, "ms");
        }
        figure(&format!("store_sessionmesh_put_rps_r{round}"), sm, "req/s");
        figure(&format!("store_redis_set_rps_r{round}"), rr, "req/s");
        ratios.push(sm / rr);
    }
    figure("store_path_ratio_median", pct(&mut ratios, 0.5), "ratio");
    let _ = server.kill();
    let _ = server.wait();
    Ok(())
}

/// redis-benchmark's `-q` results: test name -> requests per second.
fn redis_benchmark(
    port: u16,
    tests: &str,
    pipeline: usize,
    n: usize,
) -> anyhow::Result<Vec<(String, f64)>> {
    let rb = which("redis-benchmark")
        .ok_or_else(|| anyhow::anyhow!("redis-benchmark is not installed"))?;
    // HSET writes fields of one hash: keep it session-sized (500 fields of 1 KiB).
    let keyspace = if tests == "hset" { "500" } else { "10000" };
    let out = std::process::Command::new(rb)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-q",
            "-t",
            tests,
            "-d",
            "1024",
            "-c",
            "50",
            "-r",
            keyspace,
        ])
        .args(["-n", &n.to_string(), "-P", &pipeline.to_string()])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut res = Vec::new();
    for part in text.split(['\r', '\n']) {
        if let Some((name, rest)) = part.trim().split_once(": ") {
            if let Some(v) = rest.strip_suffix(" requests per second").or_else(|| {
                rest.split(" requests per second")
                    .next()
                    .filter(|_| rest.contains("requests per second"))
            }) {
                if let Ok(v) = v.trim().parse::<f64>() {
                    res.retain(|(n, _): &(String, f64)| n != name);
                    res.push((name.to_owned(), v));
                }
            }
        }
    }
    anyhow::ensure!(!res.is_empty(), "redis-benchmark printed no result: {text}");
    Ok(res)
}

/// redis-benchmark against one sidecar (replicating to two peers) and against
/// a standalone redis-server, same run.
async fn resp(quick: bool) -> anyhow::Result<()> {
    let RedisServer { port, mut server } = redis_server().await?;
    let cl = cluster(3, &["--redis", "127.0.0.1:0"]).await?;
    let sm = cl.nodes[0]
        .redis
        .ok_or_else(|| anyhow::anyhow!("no redis endpoint"))?
        .port();
    for pipeline in [1usize, 16] {
        let n = if quick {
            20_000
        } else if pipeline == 1 {
            100_000
        } else {
            400_000
        };
        let mut ratios: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
        for _round in 0..if quick { 1 } else { 3 } {
            let mut ours = redis_benchmark(sm, "set,get", pipeline, n)?;
            ours.extend(redis_benchmark(sm, "hset", pipeline, n)?);
            let mut theirs = redis_benchmark(port, "set,get", pipeline, n)?;
            theirs.extend(redis_benchmark(port, "hset", pipeline, n)?);
            for (name, v) in &ours {
                if let Some((_, r)) = theirs.iter().find(|(t, _)| t == name) {
                    let key = name.to_ascii_lowercase();
                    figure(
                        &format!("resp_{key}_p{pipeline}_sessionmesh_rps"),
                        *v,
                        "req/s",
                    );
                    figure(&format!("resp_{key}_p{pipeline}_redis_rps"), *r, "req/s");
                    ratios.entry(key).or_default().push(v / r);
                }
            }
        }
        for (key, mut r) in ratios {
            figure(
                &format!("resp_{key}_p{pipeline}_ratio_median"),
                pct(&mut r, 0.5),
                "ratio",
            );
        }
    }
    // Everything written on node1 reached the peers.
    let applied = metric(&mut cl.client(1), "sessionmesh_deltas_applied_total").await;
    figure("resp_deltas_applied_on_peer", applied, "count");
    let _ = server.kill();
    let _ = server.wait();
    Ok(())
}

/// Rounds of the interleaved demo scenario: `BENCH_ROUNDS`, else 1 quick or 5.
fn demo_rounds(quick: bool) -> usize {
    std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 1 } else { 5 })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let what = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    let quick = std::env::var("BENCH_QUICK").is_ok();
    let secs = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 2 } else { 5 });
    match what.as_str() {
        "writes" => {
            writes("async", secs).await?;
            writes("sync", secs).await?;
        }
        "lag" => lag(if quick { 200 } else { 1000 }).await?,
        "detect" => {
            detect(if quick { 5 } else { 21 }).await?;
            detect_hung(if quick { 3 } else { 10 }).await?;
        }
        "transfer" => transfer(if quick { 10_000 } else { 100_000 }).await?,
        "demo" => demo(secs, demo_rounds(quick)).await?,
        "failover" => failover(if quick { 3 } else { 11 }).await?,
        "rolling" => rolling().await?,
        "store" => store(secs).await?,
        "resp" => resp(quick).await?,
        "all" => {
            resp(quick).await?;
            demo(secs, demo_rounds(quick)).await?;
            failover(if quick { 3 } else { 11 }).await?;
            rolling().await?;
            store(secs).await?;
            writes("async", secs).await?;
            writes("sync", secs).await?;
            lag(if quick { 200 } else { 1000 }).await?;
            detect(if quick { 5 } else { 21 }).await?;
            detect_hung(if quick { 3 } else { 10 }).await?;
            transfer(if quick { 10_000 } else { 100_000 }).await?;
        }
        other => anyhow::bail!("unknown scenario {other:?}: demo, failover, rolling, store, resp, writes, lag, detect, transfer, all"),
    }
    Ok(())
}
