//! `sessionmesh-sidecar demo`: three members on loopback; a user's counter
//! survives a SIGKILL of the member it was written to, and a restarted member
//! gets it back by state transfer. Exits non-zero if anything goes wrong.

use anyhow::{bail, Context};
use sessionmesh_sidecar::client::Client;
use sessionmesh_sidecar::localcluster::LocalCluster;
use sessionmesh_sidecar::node::now_ms;
use std::time::{Duration, Instant};

async fn counter(c: &mut Client, id: &str) -> anyhow::Result<u64> {
    let r = c.get(&format!("/v1/sessions/{id}/attributes/counter")).await?;
    if r.status != 200 {
        bail!("reading the counter failed: {} {}", r.status, r.text());
    }
    Ok(r.text().parse()?)
}

async fn increment(c: &mut Client, id: &str) -> anyhow::Result<u64> {
    let n = counter(c, id).await? + 1;
    let r = c.put(&format!("/v1/sessions/{id}/attributes/counter?send=sync"), n.to_string()).await?;
    if r.status != 204 {
        bail!("writing the counter failed: {} {}", r.status, r.text());
    }
    Ok(n)
}

pub async fn run() -> anyhow::Result<()> {
    let bin = std::env::current_exe()?;
    let mut cl = LocalCluster::new(&bin, 3, &[])?;
    println!("sessionmesh demo: 3 sidecars on loopback, static member file, replication mode `all`");
    for i in 0..3 {
        cl.start(i).with_context(|| format!("starting node{}", i + 1))?;
    }
    for i in 0..3 {
        if !cl.wait_ready(i, Duration::from_secs(10)).await {
            bail!("node{} did not become ready:\n{}", i + 1, cl.log_tail(i, 20));
        }
        let n = &cl.nodes[i];
        println!("  {}  replication {}  http {}  ready", n.name, n.replication, n.http.map(|a| a.to_string()).unwrap_or_default());
    }

    let mut c1 = cl.client(0);
    let r = c1.post("/v1/sessions", r#"{"attributes":{"counter":"MA=="},"maxInactiveSeconds":1800}"#).await?;
    if r.status != 201 {
        bail!("create failed: {} {}", r.status, r.text());
    }
    let cookie = r.json()["routedId"].as_str().unwrap_or_default().to_owned();
    let short = &cookie[..6.min(cookie.len())];
    println!("\nuser logs in on node1: JSESSIONID={short}….node1");
    let mut last = 0;
    for _ in 0..5 {
        last = increment(&mut c1, &cookie).await?;
    }
    println!("user clicks 5 times on node1 (sync replication): counter = {last}");

    let pid = cl.pid(0).unwrap_or(0);
    let killed_at = now_ms();
    let t0 = Instant::now();
    cl.kill(0);
    println!("\nkill -9 node1 (pid {pid})");

    let mut c2 = cl.client(1);
    let mut detected = None;
    while t0.elapsed() < Duration::from_secs(5) {
        let v = c2.get("/v1/cluster").await?.json();
        if let Some(m) = v["members"].as_array().and_then(|m| m.iter().find(|m| m["name"] == "node1")) {
            if m["state"] == "dead" {
                detected = m["sinceMs"].as_u64().or(m["since_ms"].as_u64());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    match detected {
        Some(t) => println!("node2 declared node1 dead after {} ms", t.saturating_sub(killed_at)),
        None => bail!("node2 did not declare node1 dead within 5 s"),
    }

    let seen = counter(&mut c2, &cookie).await?;
    println!("next request lands on node2 with JSESSIONID={short}….node1: counter = {seen}");
    if seen != last {
        bail!("session lost: expected counter {last}, node2 has {seen}");
    }
    let after = increment(&mut c2, &cookie).await?;
    let rebound = cookie.replace(".node1", ".node2");
    println!("node2 increments it to {after} and rebinds the cookie to JSESSIONID={short}….node2 (same session key)");
    let _ = rebound;

    println!("\nrestarting node1 (new generation): it must receive every session before it is ready");
    cl.start(0)?;
    if !cl.wait_ready(0, Duration::from_secs(10)).await {
        bail!("node1 did not become ready after restart:\n{}", cl.log_tail(0, 20));
    }
    let mut c1 = cl.client(0);
    let back = counter(&mut c1, &cookie).await?;
    println!("node1 is ready again and holds the session: counter = {back}");
    if back != after {
        bail!("restarted node1 has counter {back}, expected {after}");
    }
    for i in 0..3 {
        cl.terminate(i, Duration::from_secs(10));
    }
    println!("\nOK: the session survived kill -9 of its node, and a restarted node caught up.");
    Ok(())
}
