//! The demo stack figures: clustered apps against the same apps unclustered,
//! through HAProxy, measured with wrk.

use crate::*;

/// wrk's latency figure, e.g. `1.23ms`, `850.00us`, `1.02s`, in ms.
pub(crate) fn wrk_ms(s: &str) -> f64 {
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
pub(crate) fn wrk(
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

/// CPU microseconds used so far by the stack's sidecars, apps and load balancer.
pub(crate) fn stack_cpu(st: &Stack) -> [f64; 3] {
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
pub(crate) async fn cookie_script(st: &Stack, users: usize) -> anyhow::Result<PathBuf> {
    {
        let mut cookies = Vec::new();
        for _ in 0..users {
            let mut u = User::new(st.lb_addr);
            u.visit().await?;
            cookies.push(cookie_header(&u));
        }
        write_script(&st.cl.dir.join("cookies.lua"), &cookies, "/")
    }
}

/// A user's cookies as one `Cookie` header value.
pub(crate) fn cookie_header(u: &User) -> String {
    u.jar
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// A wrk script that sends `GET path` with each of `cookies` in turn.
pub(crate) fn write_script(
    script: &std::path::Path,
    cookies: &[String],
    path: &str,
) -> anyhow::Result<PathBuf> {
    let list = cookies
        .iter()
        .map(|c| format!("{c:?}"))
        .collect::<Vec<_>>()
        .join(",\n  ");
    std::fs::write(
        script,
        format!(
            "cookies = {{\n  {list}\n}}\ncounter = math.random(1, #cookies)\nrequest = function()\n  counter = counter + 1\n  \
             return wrk.format(\"GET\", \"{path}\", {{ [\"Cookie\"] = cookies[(counter % #cookies) + 1] }})\nend\n"
        ),
    )?;
    Ok(script.to_owned())
}

/// What a user pays for clustering: the demo app behind HAProxy, every request
/// reading and writing the session, with (a) 3 members in sync mode, (b) 3
/// members in async mode, (c) the same 3 apps each with a sidecar of its own
/// (no peers). The three stacks run side by side and wrk visits them in turn,
/// `rounds` times, so a noisy neighbour hits all three alike.
const USERS: usize = 64;
const CONNS: usize = 32;

/// What the interleaved rounds measured, per stack.
#[derive(Default)]
struct Samples {
    rps: [Vec<f64>; 3],
    p99: [Vec<f64>; 3],
    /// sync and async throughput over standalone, per round.
    ratios: [Vec<f64>; 2],
    /// CPU µs per request of [sidecars, apps, load balancer], per stack.
    cpu: [[Vec<f64>; 3]; 3],
}

/// The three stacks side by side: a sync cluster, an async cluster, and the
/// same apps each with a sidecar of its own and no peers.
async fn start_stacks() -> anyhow::Result<[(&'static str, Stack); 3]> {
    let bin = sidecar_bin();
    let mut standalone = LocalCluster::new(&bin, 3, &[])?;
    standalone.standalone = true;
    Ok([
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
    ])
}

/// Prints which processes belong to a stack, for `perf record -p`.
fn print_pids(name: &str, st: &Stack) {
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

/// One round: each stack in turn, so the machine's noise hits them alike.
fn round(
    round: usize,
    stacks: &[(&'static str, Stack); 3],
    scripts: &[PathBuf],
    secs: u64,
    m: &mut Samples,
) -> anyhow::Result<()> {
    let mut this = [0.0; 3];
    for (k, (name, st)) in stacks.iter().enumerate() {
        let url = format!("http://{}/", st.lb_addr);
        let before = stack_cpu(st);
        let (r, _p50, p, bad) = wrk(&url, CONNS, secs, &scripts[k])?;
        let after = stack_cpu(st);
        anyhow::ensure!(bad == 0, "{name}: {bad} failed requests");
        let reqs = r * secs as f64;
        for part in 0..3 {
            m.cpu[k][part].push((after[part] - before[part]) / reqs);
        }
        let c = |part: usize| m.cpu[k][part].last().copied().unwrap_or(0.0);
        println!(
            "# round {round} {name}: {r:.0} req/s, p99 {p:.2} ms, CPU per request: sidecars {:.1} us, apps {:.1} us, HAProxy {:.1} us; load average {}",
            c(0), c(1), c(2), loadavg()
        );
        this[k] = r;
        m.rps[k].push(r);
        m.p99[k].push(p);
    }
    m.ratios[0].push(this[0] / this[2]);
    m.ratios[1].push(this[1] / this[2]);
    Ok(())
}

/// Medians (and ranges) of every round.
fn report(stacks: &[(&'static str, Stack); 3], m: &mut Samples) {
    for (k, (name, _)) in stacks.iter().enumerate() {
        let (lo, hi) = (pct(&mut m.rps[k], 0.0), pct(&mut m.rps[k], 1.0));
        figure(
            &format!("demo_rps_c{CONNS}_{name}"),
            pct(&mut m.rps[k], 0.5),
            "req/s",
        );
        figure(&format!("demo_rps_c{CONNS}_{name}_min"), lo, "req/s");
        figure(&format!("demo_rps_c{CONNS}_{name}_max"), hi, "req/s");
        figure(
            &format!("demo_p99_ms_c{CONNS}_{name}"),
            pct(&mut m.p99[k], 0.5),
            "ms",
        );
        for (part, what) in ["sidecar", "app", "haproxy"].iter().enumerate() {
            let v = pct(&mut m.cpu[k][part], 0.5);
            figure(&format!("demo_{what}_cpu_us_per_req_{name}"), v, "us");
        }
    }
    for (k, mode) in ["sync", "async"].iter().enumerate() {
        let (lo, hi) = (pct(&mut m.ratios[k], 0.0), pct(&mut m.ratios[k], 1.0));
        figure(
            &format!("demo_ratio_{mode}"),
            pct(&mut m.ratios[k], 0.5),
            "ratio",
        );
        figure(&format!("demo_ratio_{mode}_min"), lo, "ratio");
        figure(&format!("demo_ratio_{mode}_max"), hi, "ratio");
    }
}

pub(crate) async fn demo(secs: u64, rounds: usize) -> anyhow::Result<()> {
    println!(
        "# demo: load average at start {}; {CONNS} connections, {USERS} cookies, {secs} s per run, {rounds} rounds; \
         HAProxy as in stack::haproxy_config (cookie SERVERID insert, roundrobin, httpchk)",
        loadavg()
    );
    let stacks = start_stacks().await?;
    let mut scripts = Vec::new();
    for (name, st) in &stacks {
        scripts.push(cookie_script(st, USERS).await?);
        print_pids(name, st);
    }
    let mut m = Samples::default();
    for r in 0..rounds {
        round(r, &stacks, &scripts, secs, &mut m)?;
    }
    report(&stacks, &mut m);
    // One connection: latency without queueing, sync cluster.
    let url = format!("http://{}/", stacks[0].1.lb_addr);
    let (r, p50, p, _) = wrk(&url, 1, secs, &scripts[0])?;
    figure("demo_rps_c1_sync", r, "req/s");
    figure("demo_p50_ms_c1_sync", p50, "ms");
    figure("demo_p99_ms_c1_sync", p, "ms");
    println!("# demo: load average at end {}", loadavg());
    Ok(())
}

/// Rounds of the interleaved demo scenario: `BENCH_ROUNDS`, else 1 quick or 5.
pub(crate) fn demo_rounds(quick: bool) -> usize {
    std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 1 } else { 5 })
}
