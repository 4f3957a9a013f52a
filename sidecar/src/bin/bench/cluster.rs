//! Cluster figures: write throughput, replication lag, failure detection,
//! state transfer, failover and rolling restarts.

use crate::*;

/// Replicated writes/s with 32 connections spread over the 3 members, 1 KiB attribute.
pub(crate) async fn writes(mode: &str, secs: u64) -> anyhow::Result<()> {
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
pub(crate) async fn lag(samples: usize) -> anyhow::Result<()> {
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
pub(crate) async fn detect(rounds: usize) -> anyhow::Result<()> {
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
pub(crate) async fn detect_hung(rounds: usize) -> anyhow::Result<()> {
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
pub(crate) async fn transfer(n: usize) -> anyhow::Result<()> {
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

/// SIGKILL of the node holding a user's session, behind HAProxy: time to the
/// first good response. Median of `rounds`.
pub(crate) async fn failover(rounds: usize) -> anyhow::Result<()> {
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
pub(crate) async fn rolling() -> anyhow::Result<()> {
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
