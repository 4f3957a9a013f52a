//! The Redis endpoint against a standalone redis-server, with redis-benchmark.

use crate::*;

use sessionmesh_sidecar::demo::localcluster::RedisServer;

/// The store path against an external session store: the sidecar's HTTP API
/// (PUT of a 1 KiB attribute, replicated to two peers) versus a standalone
/// redis-server (SET of 1 KiB), 32 connections each, same run.
pub(crate) async fn store(secs: u64) -> anyhow::Result<()> {
    let rb = which("redis-benchmark")
        .ok_or_else(|| anyhow::anyhow!("redis-benchmark is not installed"))?;
    let reference = RedisServer::start()?;
    let port = reference.port;
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
            .next_back()
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
    Ok(())
}

/// redis-benchmark's `-q` results: test name -> requests per second.
pub(crate) fn redis_benchmark(
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
/// a standalone redis-server, same run: with the endpoint's default
/// (`--redis-send sync`: `resp_*` figures) and with `--redis-send async`
/// (`resp_async_*`).
pub(crate) async fn resp(quick: bool) -> anyhow::Result<()> {
    let reference = RedisServer::start()?;
    let port = reference.port;
    for (prefix, extra) in [("resp", None), ("resp_async", Some("async"))] {
        let mut args = vec!["--redis", "127.0.0.1:0"];
        if let Some(mode) = extra {
            args.extend(["--redis-send", mode]);
        }
        let cl = cluster(3, &args).await?;
        resp_against(&cl, port, prefix, quick)?;
        // Everything written on node1 reached the peers.
        let applied = metric(&mut cl.client(1), "sessionmesh_deltas_applied_total").await;
        figure(
            &format!("{prefix}_deltas_applied_on_peer"),
            applied,
            "count",
        );
    }
    Ok(())
}

/// One configuration's rounds: SET, GET and HSET without and with pipelining.
fn resp_against(
    cl: &sessionmesh_sidecar::demo::localcluster::LocalCluster,
    port: u16,
    prefix: &str,
    quick: bool,
) -> anyhow::Result<()> {
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
                        &format!("{prefix}_{key}_p{pipeline}_sessionmesh_rps"),
                        *v,
                        "req/s",
                    );
                    figure(
                        &format!("{prefix}_{key}_p{pipeline}_redis_rps"),
                        *r,
                        "req/s",
                    );
                    ratios.entry(key).or_default().push(v / r);
                }
            }
        }
        for (key, mut r) in ratios {
            figure(
                &format!("{prefix}_{key}_p{pipeline}_ratio_median"),
                pct(&mut r, 0.5),
                "ratio",
            );
        }
    }
    Ok(())
}
