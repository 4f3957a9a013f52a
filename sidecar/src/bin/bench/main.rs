//! `sessionmesh-bench [scenario]`: figures for a 3-member cluster on loopback,
//! printed as `name value unit` lines. Scenarios: demo (wrk through HAProxy),
//! failover, rolling, store (versus redis-server), resp, tomcat (the Tomcat
//! Manager versus StandardManager and DeltaManager), writes, lag, detect
//! (SIGKILL and SIGSTOP), transfer (includes rss), backup (backup mode
//! against all mode at 3, 5 and 9 members), all (default).

use sessionmesh_sidecar::demo::localcluster::{cpu_seconds, metric, rss_bytes, LocalCluster};
use sessionmesh_sidecar::demo::stack::{AppSpec, LbChoice, Stack, User};
use sessionmesh_sidecar::node::now_ms;
use std::path::PathBuf;
use std::time::{Duration, Instant};

mod backup;
mod cluster;
mod demo;
mod redis;
mod tomcat;

use cluster::*;
use demo::*;
use redis::*;

pub(crate) fn sidecar_bin() -> PathBuf {
    let me = std::env::current_exe().unwrap_or_default();
    me.with_file_name("sessionmesh-sidecar")
}

/// `(state, sinceMs)` of `name` in a member's `/v1/cluster`.
pub(crate) async fn member(
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
pub(crate) async fn wait_member(
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

pub(crate) fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

pub(crate) fn figure(name: &str, value: f64, unit: &str) {
    println!("{name} {value:.3} {unit}");
}

pub(crate) async fn cluster(n: usize, args: &[&str]) -> anyhow::Result<LocalCluster> {
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

pub(crate) fn b64(s: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

pub(crate) fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/sbin"])
        .map(|d| PathBuf::from(d).join(cmd))
        .find(|p| p.is_file())
}

/// `/proc/loadavg`'s three figures, for the conditions printed with each scenario.
pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

#[tokio::main]

pub(crate) async fn main() -> anyhow::Result<()> {
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
        "tomcat" => tomcat::tomcat(secs, demo_rounds(quick)).await?,
        "backup" => backup::backup(secs, quick).await?,
        "idle" => backup::idle_figures(quick).await?,
        "all" => {
            resp(quick).await?;
            demo(secs, demo_rounds(quick)).await?;
            tomcat::tomcat(secs, demo_rounds(quick)).await?;
            failover(if quick { 3 } else { 11 }).await?;
            rolling().await?;
            store(secs).await?;
            writes("async", secs).await?;
            writes("sync", secs).await?;
            lag(if quick { 200 } else { 1000 }).await?;
            detect(if quick { 5 } else { 21 }).await?;
            detect_hung(if quick { 3 } else { 10 }).await?;
            transfer(if quick { 10_000 } else { 100_000 }).await?;
            backup::backup(secs, quick).await?;
        }
        other => anyhow::bail!("unknown scenario {other:?}: demo, failover, rolling, store, resp, tomcat, backup, writes, lag, detect, transfer, all"),
    }
    Ok(())
}
