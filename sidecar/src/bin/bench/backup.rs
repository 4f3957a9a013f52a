//! Backup mode against `all` mode, in one run: bytes on the wire and CPU per
//! sync write at N = 3, 5 and 9 members, memory per member with 100,000
//! sessions at N = 9, the latency of a read on a member without a copy (a
//! remote fetch), and the time to restore 1 + K copies after a SIGKILL.

use crate::*;
use sessionmesh_sidecar::core::identity::SessionId;
use sessionmesh_sidecar::core::placement;
use sessionmesh_sidecar::demo::localcluster::LocalCluster;

fn mode_args(backup: bool) -> Vec<&'static str> {
    let mut a = vec!["--send", "sync"];
    if backup {
        a.extend(["--replication", "backup", "--backups", "1"]);
    }
    a
}

async fn sum_metric(cl: &LocalCluster, on: &[usize], name: &str) -> f64 {
    let mut t = 0.0;
    for i in on {
        t += metric(&mut cl.client(*i), name).await;
    }
    t
}

fn total_cpu(cl: &LocalCluster, n: usize) -> f64 {
    (0..n).filter_map(|i| cl.pid(i)).map(cpu_seconds).sum()
}

/// Sync writes of 1 KiB for `secs` at 16 connections spread over the members.
async fn write_load(cl: &LocalCluster, n: usize, secs: u64) -> anyhow::Result<u64> {
    let value = vec![b'v'; 1024];
    let mut tasks = Vec::new();
    for t in 0..16 {
        let mut c = cl.client(t % n);
        let value = value.clone();
        tasks.push(tokio::spawn(async move {
            let ids: Vec<String> = (0..10).map(|i| format!("W{t}x{i}")).collect();
            for id in &ids {
                let _ = c.post("/v1/sessions", format!(r#"{{"id":"{id}"}}"#)).await;
            }
            let end = Instant::now() + Duration::from_secs(secs);
            let mut ok = 0u64;
            let mut i = 0;
            while Instant::now() < end {
                let path = format!("/v1/sessions/{}/attributes/data", ids[i % ids.len()]);
                if c.put(&path, value.clone())
                    .await
                    .is_ok_and(|r| r.status == 204)
                {
                    ok += 1;
                }
                i += 1;
            }
            ok
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await?;
    }
    Ok(total)
}

/// Bytes on the wire (sent by all members) and sidecar CPU per write.
async fn per_write(n: usize, backup: bool, secs: u64) -> anyhow::Result<()> {
    let cl = cluster(n, &mode_args(backup)).await?;
    let all: Vec<usize> = (0..n).collect();
    // Leave the start-up traffic out: measure from here.
    let bytes0 = sum_metric(&cl, &all, "sessionmesh_bytes_sent_total").await;
    let cpu0 = total_cpu(&cl, n);
    let t0 = Instant::now();
    let writes = write_load(&cl, n, secs).await? as f64;
    let wall = t0.elapsed().as_secs_f64();
    let bytes = sum_metric(&cl, &all, "sessionmesh_bytes_sent_total").await - bytes0;
    let cpu = total_cpu(&cl, n) - cpu0;
    // Heartbeats and clocks flow meanwhile too: count them out.
    let idle = idle_bytes_per_s(n);
    let mode = if backup { "backup1" } else { "all" };
    figure(
        &format!("backup_wire_bytes_per_write_{mode}_n{n}"),
        (bytes - idle * wall).max(0.0) / writes,
        "bytes",
    );
    figure(
        &format!("backup_cpu_us_per_write_{mode}_n{n}"),
        cpu * 1e6 / writes,
        "us",
    );
    figure(
        &format!("backup_writes_per_s_{mode}_n{n}"),
        writes / wall,
        "writes/s",
    );
    Ok(())
}

/// Heartbeat and clock frames of an idle cluster: each member sends both to
/// each peer every 100 ms, about 80 bytes each once sealed.
fn idle_bytes_per_s(n: usize) -> f64 {
    (n * (n - 1)) as f64 * 10.0 * 2.0 * 80.0
}

/// Creates `sessions` sessions of 1 KiB; returns how many were created.
async fn load(cl: &LocalCluster, n: usize, sessions: usize) -> anyhow::Result<usize> {
    let payload = b64(&[b'p'; 1024]);
    let conns = 32;
    let mut tasks = Vec::new();
    for t in 0..conns {
        let mut c = cl.client(t % n);
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            let mut ok = 0usize;
            let mut i = t;
            while i < sessions {
                let body = format!(r#"{{"id":"T{i:08}","attributes":{{"data":"{payload}"}}}}"#);
                // A create can time out under back-pressure (504, applied
                // locally and still replicating): the retry finds it (409).
                for _ in 0..5 {
                    let r = c.post("/v1/sessions?send=async", body.clone()).await;
                    if r.is_ok_and(|r| r.status == 201 || r.status == 409) {
                        ok += 1;
                        break;
                    }
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
    Ok(loaded)
}

/// Waits until the members `on` store `want` sessions in all; returns the time.
async fn until_stored(
    cl: &LocalCluster,
    on: &[usize],
    want: f64,
    within: Duration,
) -> anyhow::Result<f64> {
    let t = Instant::now();
    loop {
        let have = sum_metric(cl, on, "sessionmesh_sessions").await;
        if have >= want {
            return Ok(t.elapsed().as_secs_f64());
        }
        anyhow::ensure!(
            t.elapsed() < within,
            "{have} of {want} copies after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Memory per member with `sessions` sessions at N = 9, remote-fetch
/// latency, and the time to restore two copies after a SIGKILL.
async fn nine(backup: bool, sessions: usize) -> anyhow::Result<()> {
    let n = 9;
    let mut cl = cluster(n, &mode_args(backup)).await?;
    let all: Vec<usize> = (0..n).collect();
    let base: Vec<u64> = all
        .iter()
        .map(|i| rss_bytes(cl.pid(*i).unwrap_or(0)))
        .collect();
    let loaded = load(&cl, n, sessions).await?;
    let mode = if backup { "backup1" } else { "all" };
    // Creates still refused after five tries (back-pressure): counted, not fatal.
    figure(
        &format!("backup_load_refused_{mode}_n9"),
        (sessions - loaded) as f64,
        "sessions",
    );
    let copies = if backup { 2.0 } else { n as f64 };
    until_stored(&cl, &all, copies * loaded as f64, Duration::from_secs(120)).await?;
    let mut per: Vec<f64> = all
        .iter()
        .map(|i| rss_bytes(cl.pid(*i).unwrap_or(0)).saturating_sub(base[*i]) as f64 / 1e6)
        .collect();
    let k = sessions / 1000;
    figure(
        &format!("backup_rss_mb_per_member_{mode}_n9_{k}k"),
        pct(&mut per, 0.5),
        "MB",
    );
    if !backup {
        return Ok(());
    }
    let names: Vec<String> = cl.nodes.iter().map(|x| x.name.clone()).collect();
    let (mut remote, mut local) = (Vec::new(), Vec::new());
    // One kept-alive connection per member, as an application holds.
    let mut clients: Vec<_> = all.iter().map(|i| cl.client(*i)).collect();
    for s in 0..2_000 {
        let id = format!("T{:08}", (s * 37) % sessions);
        let h = placement::holders(&names, &SessionId::parse(&id)?, 2);
        let holder = names.iter().position(|x| x == h[0]).unwrap_or(0);
        let other = (0..n)
            .find(|i| !h.contains(&names[*i].as_str()))
            .unwrap_or(0);
        for (on, into) in [(other, &mut remote), (holder, &mut local)] {
            let c = &mut clients[on];
            let t = Instant::now();
            let r = c.get(&format!("/v1/sessions/{id}?touch=false")).await?;
            if r.status == 404 && loaded < sessions {
                continue; // one of the creates refused under load
            }
            anyhow::ensure!(
                r.status == 200,
                "read of {id} on node{}: {}",
                on + 1,
                r.status
            );
            into.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    figure("backup_remote_read_p50_ms", pct(&mut remote, 0.5), "ms");
    figure("backup_remote_read_p99_ms", pct(&mut remote, 0.99), "ms");
    figure("backup_local_read_p99_ms", pct(&mut local, 0.99), "ms");
    // Fetched copies go within a second; then SIGKILL one member.
    until_stored(&cl, &all, 2.0 * loaded as f64, Duration::from_secs(10)).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cl.kill(4);
    let left: Vec<usize> = all.iter().copied().filter(|i| *i != 4).collect();
    let took = until_stored(&cl, &left, 2.0 * loaded as f64, Duration::from_secs(60)).await?;
    figure(&format!("backup_restore_{k}k_after_sigkill_s"), took, "s");
    Ok(())
}

/// CPU of idle members holding `sessions` small sessions each: what the
/// periodic sweep, timers and (with peers) anti-entropy rounds cost when
/// nothing happens. With `members` > 1 they run in `all` mode, so each holds
/// every session and every anti-entropy round compares the whole store.
async fn idle(sessions: usize, members: usize) -> anyhow::Result<()> {
    let cl = cluster(members, &[]).await?;
    let conns = 32;
    let mut tasks = Vec::new();
    for t in 0..conns {
        let mut c = cl.client(t % members);
        tasks.push(tokio::spawn(async move {
            let mut i = t;
            while i < sessions {
                let body = format!(r#"{{"id":"I{i:08}","attributes":{{"u":"dXNlcg=="}}}}"#);
                let _ = c.post("/v1/sessions", body).await;
                i += conns;
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    for m in 0..members {
        let stored = metric(&mut cl.client(m), "sessionmesh_sessions").await;
        anyhow::ensure!(
            stored as usize == sessions,
            "member {m} stored {stored} of {sessions}"
        );
    }
    let pids: Vec<u32> = (0..members).filter_map(|m| cl.pid(m)).collect();
    let cpu = |pids: &[u32]| pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (c0, t0) = (cpu(&pids), Instant::now());
    // Two anti-entropy intervals (5 s each) and more.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let pct = (cpu(&pids) - c0) / t0.elapsed().as_secs_f64() * 100.0 / members as f64;
    let name = match members {
        1 => format!("idle_cpu_pct_{}k_sessions", sessions / 1000),
        n => format!("idle_cpu_pct_{}k_sessions_{n}_members", sessions / 1000),
    };
    figure(&name, pct, "%");
    Ok(())
}

/// The idle figures alone (`bench idle`): one member, and two that compare
/// stores by anti-entropy.
pub(crate) async fn idle_figures(quick: bool) -> anyhow::Result<()> {
    let sessions = if quick { 100_000 } else { 1_000_000 };
    println!("# idle: {sessions} sessions per member; load {}", loadavg());
    idle(sessions, 1).await?;
    idle(sessions, 2).await?;
    println!("# idle: done; load {}", loadavg());
    Ok(())
}

pub(crate) async fn backup(secs: u64, quick: bool) -> anyhow::Result<()> {
    println!(
        "# backup: sync writes of 1 KiB at 16 connections; load {}",
        loadavg()
    );
    for n in [3, 5, 9] {
        per_write(n, false, secs).await?;
        per_write(n, true, secs).await?;
    }
    let sessions = if quick { 10_000 } else { 100_000 };
    nine(true, sessions).await?;
    nine(false, sessions).await?;
    idle_figures(quick).await?;
    println!("# backup: done; load {}", loadavg());
    Ok(())
}
