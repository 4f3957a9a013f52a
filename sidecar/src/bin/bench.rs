//! `sessionmesh-bench [scenario]`: figures for a 3-member cluster on loopback,
//! printed as `name value unit` lines. Scenarios: writes, lag, detect (SIGKILL
//! and SIGSTOP),
//! transfer (includes rss), all (default).

use sessionmesh_sidecar::localcluster::LocalCluster;
use sessionmesh_sidecar::node::now_ms;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn sidecar_bin() -> PathBuf {
    let me = std::env::current_exe().unwrap_or_default();
    me.with_file_name("sessionmesh-sidecar")
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
                match c.put(&format!("/v1/sessions/{}/attributes/data", ids[i % ids.len()]), value.clone()).await {
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
    figure(&format!("replicated_writes_{mode}"), n / secs as f64, "writes/s");
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
        let r = a.put("/v1/sessions/LAG/attributes/k?send=async", val.clone()).await?;
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
        let t0 = Instant::now();
        let mut since = None;
        while t0.elapsed() < Duration::from_secs(5) {
            let j = c.get("/v1/cluster").await?.json();
            if let Some(m) = j["members"].as_array().and_then(|m| m.iter().find(|m| m["name"] == "node3")) {
                if m["state"] == "dead" {
                    since = m["sinceMs"].as_u64();
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let since = since.ok_or_else(|| anyhow::anyhow!("not detected within 5 s"))?;
        v.push(since.saturating_sub(killed) as f64);
        cl.start(2)?;
        anyhow::ensure!(cl.wait_ready(2, Duration::from_secs(10)).await, "node3 not ready after restart");
        let t0 = Instant::now();
        loop {
            let j = c.get("/v1/cluster").await?.json();
            let alive = j["members"].as_array().and_then(|m| m.iter().find(|m| m["name"] == "node3")).is_some_and(|m| m["state"] == "alive");
            if alive {
                break;
            }
            anyhow::ensure!(t0.elapsed() < Duration::from_secs(5), "node3 never alive again");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    figure("failure_detect_p50_ms", pct(&mut v, 0.5), "ms");
    figure("failure_detect_p99_ms", pct(&mut v, 0.99), "ms");
    figure("failure_detect_max_ms", pct(&mut v, 1.0), "ms");
    figure("failure_detect_rounds", v.len() as f64, "count");
    Ok(())
}

async fn metric(c: &mut sessionmesh_sidecar::client::Client, name: &str) -> f64 {
    let Ok(r) = c.get("/metrics").await else { return f64::NAN };
    r.text()
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// SIGSTOP the third member (a hung process with open sockets), read when the
/// first declared it dead, then SIGCONT it and wait until it is alive again.
async fn detect_hung(rounds: usize) -> anyhow::Result<()> {
    let mut cl = cluster(3, &[]).await?;
    let mut c = cl.client(0);
    let pid = cl.pid(2).unwrap_or(0);
    let mut v = Vec::new();
    for _ in 0..rounds {
        let stopped = now_ms();
        sessionmesh_sidecar::localcluster::signal(pid, libc::SIGSTOP);
        let t0 = Instant::now();
        let mut since = None;
        while t0.elapsed() < Duration::from_secs(5) {
            let j = c.get("/v1/cluster").await?.json();
            if let Some(m) = j["members"].as_array().and_then(|m| m.iter().find(|m| m["name"] == "node3")) {
                if m["state"] == "dead" {
                    since = m["sinceMs"].as_u64();
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        sessionmesh_sidecar::localcluster::signal(pid, libc::SIGCONT);
        let since = since.ok_or_else(|| anyhow::anyhow!("hung member not detected within 5 s"))?;
        v.push(since.saturating_sub(stopped) as f64);
        let t0 = Instant::now();
        loop {
            let j = c.get("/v1/cluster").await?.json();
            if j["members"].as_array().and_then(|m| m.iter().find(|m| m["name"] == "node3")).is_some_and(|m| m["state"] == "alive") {
                break;
            }
            anyhow::ensure!(t0.elapsed() < Duration::from_secs(5), "node3 never alive again");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let _ = &mut cl;
    figure("failure_detect_hung_p50_ms", pct(&mut v, 0.5), "ms");
    figure("failure_detect_hung_p99_ms", pct(&mut v, 0.99), "ms");
    Ok(())
}

fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .map_or(0, |kb| kb * 1024)
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
                if c.post("/v1/sessions", body).await.is_ok_and(|r| r.status == 201) {
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
    figure("load_sessions_per_s", n as f64 / t0.elapsed().as_secs_f64(), "sessions/s");
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
    anyhow::ensure!(cl.wait_ready(i, Duration::from_secs(60)).await, "joiner not ready");
    let wall = t2.elapsed().as_secs_f64();
    let mut c4 = cl.client(i);
    let have = c4.get("/v1/sessions?limit=1").await?.json()["count"].as_u64().unwrap_or(0);
    anyhow::ensure!(have == n as u64, "joiner ready with {have} of {n}");
    let m = c4.get("/metrics").await?.text();
    let inner = m
        .lines()
        .find(|l| l.starts_with("sessionmesh_transfer_duration_seconds "))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    figure(&format!("state_transfer_{}k_s", n / 1000), inner, "s");
    figure(&format!("state_transfer_{}k_start_to_ready_s", n / 1000), wall, "s");
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let what = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    let quick = std::env::var("BENCH_QUICK").is_ok();
    let secs = if quick { 2 } else { 5 };
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
        "all" => {
            writes("async", secs).await?;
            writes("sync", secs).await?;
            lag(if quick { 200 } else { 1000 }).await?;
            detect(if quick { 5 } else { 21 }).await?;
            detect_hung(if quick { 3 } else { 10 }).await?;
            transfer(if quick { 10_000 } else { 100_000 }).await?;
        }
        other => anyhow::bail!("unknown scenario {other:?}: writes, lag, detect, transfer, all"),
    }
    Ok(())
}
