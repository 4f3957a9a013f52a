//! Tomcat: what the sessionmesh Manager costs a Tomcat app per request, against
//! StandardManager (no clustering) and Tomcat's own DeltaManager
//! (SimpleTcpCluster, static membership), and how many sessions each loses
//! to a SIGKILL right after they were created. Three Debian tomcat10 per
//! stack (`e2e/tomcat/run.sh`, bench profile) behind HAProxy; every request
//! writes the session (`/whoami` counts visits).

use crate::demo::{cookie_header, stack_cpu, write_script, wrk};
use crate::*;
use sessionmesh_sidecar::demo::localcluster::free_port;

const USERS: usize = 64;
const CONNS: usize = 32;
/// Sessions created on one Tomcat right before it is killed.
const LOSS_SESSIONS: usize = 50;

/// The stacks, in the order wrk visits them in each round.
const KINDS: [&str; 5] = [
    "standard",
    "sessionmesh_sync",
    "sessionmesh_async",
    "deltamanager_sync",
    "deltamanager_async",
];

/// The stacks of this run: all, or those `BENCH_TOMCAT_STACKS` names
/// (comma-separated; StandardManager, the reference, always comes first).
fn kinds() -> Vec<&'static str> {
    let wanted = std::env::var("BENCH_TOMCAT_STACKS").unwrap_or_default();
    KINDS
        .into_iter()
        .filter(|k| {
            *k == "standard" || wanted.is_empty() || wanted.split(',').any(|w| w.trim() == *k)
        })
        .collect()
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

async fn start(kind: &str) -> anyhow::Result<Stack> {
    let bin = sidecar_bin();
    let run = root().join("e2e/tomcat/run.sh");
    let (send, manager) = match kind {
        "sessionmesh_sync" => ("sync", "sessionmesh"),
        "sessionmesh_async" => ("async", "sessionmesh"),
        "deltamanager_sync" => ("sync", "delta-sync"),
        "deltamanager_async" => ("async", "delta-async"),
        _ => ("sync", "standard"),
    };
    let mut args = vec![manager.to_owned(), "bench".to_owned()];
    let cl = if manager == "sessionmesh" {
        LocalCluster::new(&bin, 3, &["--send", send])?
    } else {
        // Sidecars that the Tomcats do not use (the stack needs them for /health).
        let mut cl = LocalCluster::new(&bin, 3, &[])?;
        cl.standalone = true;
        if manager.starts_with("delta") {
            let ports = (0..3)
                .map(|_| free_port().map(|p| p.to_string()))
                .collect::<Result<Vec<_>, _>>()?;
            args.push(ports.join(","));
        }
        cl
    };
    let app = AppSpec::External { program: run, args };
    Stack::start_on(cl, LbChoice::Haproxy, send, app).await
}

/// Logs `USERS` users in through the load balancer; a wrk script that sends
/// `/whoami` with each user's cookies in turn.
async fn users_script(st: &Stack) -> anyhow::Result<PathBuf> {
    let mut cookies = Vec::new();
    for n in 0..USERS {
        let mut u = User::new(st.lb_addr);
        let r = u.get(&format!("/login?user=u{n}")).await?;
        anyhow::ensure!(r.status == 200, "login: {}", r.status);
        cookies.push(cookie_header(&u));
    }
    write_script(&st.cl.dir.join("tomcat-users.lua"), &cookies, "/whoami")
}

/// Sessions lost when the Tomcat (and sidecar) that created them is killed
/// right after the last one was created: `LOSS_SESSIONS` logins pinned to
/// node1, SIGKILL, then each user's next request through the load balancer.
async fn lost_after_sigkill(st: &mut Stack) -> anyhow::Result<usize> {
    let mut users = Vec::new();
    for n in 0..LOSS_SESSIONS {
        let mut u = User::new(st.lb_addr);
        u.jar.insert("SERVERID".into(), st.name(0));
        let r = u.get(&format!("/login?user=k{n}")).await?;
        anyhow::ensure!(r.status == 200, "login: {}", r.status);
        users.push(u);
    }
    st.kill_node(0);
    let mut lost = 0;
    for u in &mut users {
        let t = Instant::now();
        let ok = loop {
            match u.get("/whoami").await {
                Ok(r) if r.status == 200 => break true,
                Ok(r) if r.status == 401 => break false,
                _ if t.elapsed() > Duration::from_secs(10) => break false,
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        lost += usize::from(!ok);
    }
    Ok(lost)
}

/// Requests/s, p99, and CPU µs per request of [sidecars, Tomcats, HAProxy].
fn run_wrk(
    (kind, st): &(&'static str, Stack),
    script: &std::path::Path,
    secs: u64,
) -> anyhow::Result<(f64, f64, [f64; 3])> {
    let before = stack_cpu(st);
    let url = format!("http://{}/whoami", st.lb_addr);
    let (rps, _p50, p99, bad) = wrk(&url, CONNS, secs, script)?;
    let after = stack_cpu(st);
    if bad > 0 {
        println!("# tomcat: {kind}: {bad} requests failed or were logged out (non-2xx)");
    }
    let reqs = rps * secs as f64;
    Ok((rps, p99, [0, 1, 2].map(|i| (after[i] - before[i]) / reqs)))
}

/// JIT warm-up: a JVM under this load keeps compiling for a minute or more,
/// and its throughput grows by steps (and can sit on a plateau for a few
/// runs before the next); runs until the last three agree within 5% (at
/// least 12 runs, at most 36: a stack that does more per request, such as the
/// sessionmesh ones, reaches its plateau later and was seen still climbing at
/// run 24).
fn warm_up(
    kind: &str,
    mut run: impl FnMut() -> anyhow::Result<f64>,
    secs: u64,
) -> anyhow::Result<()> {
    let mut seen = Vec::new();
    loop {
        seen.push(run()?);
        let n = seen.len();
        let tail = &seen[n.saturating_sub(3)..];
        let (lo, hi) = tail
            .iter()
            .fold((f64::MAX, 0.0f64), |(l, h), &x| (l.min(x), h.max(x)));
        let settled = n >= 12 && hi <= 1.05 * lo;
        if settled || n >= 36 {
            let how = if settled {
                "warmed up"
            } else {
                "did not settle"
            };
            println!("# tomcat: {kind} {how} in {n} runs of {secs} s: {seen:.0?} req/s");
            return Ok(());
        }
    }
}

/// Every stack, with its users logged in.
async fn start_all() -> anyhow::Result<(Vec<(&'static str, Stack)>, Vec<PathBuf>)> {
    let mut stacks = Vec::new();
    let mut scripts = Vec::new();
    for kind in kinds() {
        let t = Instant::now();
        let st = start(kind).await?;
        println!(
            "# tomcat: {kind} stack up in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        scripts.push(users_script(&st).await?);
        stacks.push((kind, st));
    }
    Ok((stacks, scripts))
}

pub(crate) async fn tomcat(secs: u64, rounds: usize) -> anyhow::Result<()> {
    let Some(_) = which("java") else {
        println!("# tomcat: skipped, Java is not installed (e2e/setup.sh installs it)");
        return Ok(());
    };
    let jar = root().join("adapters/tomcat/target/sessionmesh-tomcat-0.1.0.jar");
    anyhow::ensure!(
        jar.is_file(),
        "the Manager is not built: bash e2e/tomcat/build.sh"
    );
    println!(
        "# tomcat: load average at start {}; {CONNS} connections, {USERS} users, {secs} s per run, {rounds} rounds \
         after a JIT warm-up of each stack; 3 tomcat10 per stack (Java 17, -Xmx512m, SerialGC) behind HAProxy, \
         each request writes the session",
        loadavg()
    );
    let (mut stacks, scripts) = start_all().await?;
    let run = |k: usize, secs: u64| run_wrk(&stacks[k], &scripts[k], secs);
    for (k, (kind, _)) in stacks.iter().enumerate() {
        warm_up(kind, || Ok(run(k, secs)?.0), secs)?;
    }
    // One interleaved round not counted: the first visit after the other
    // stacks' warm-ups still finds JIT and GC work left over.
    for k in 0..stacks.len() {
        run(k, secs)?;
    }
    let mut rps: Vec<Vec<f64>> = vec![Vec::new(); stacks.len()];
    let mut p99: Vec<Vec<f64>> = vec![Vec::new(); stacks.len()];
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); stacks.len()];
    for r in 0..rounds {
        let mut this = Vec::new();
        for (k, (kind, _)) in stacks.iter().enumerate() {
            let (x, p, cpu) = run(k, secs)?;
            println!(
                "# round {r} {kind}: {x:.0} req/s, p99 {p:.2} ms, CPU per request: sidecars {:.0} us, \
                 Tomcats {:.0} us, HAProxy {:.0} us; load average {}",
                cpu[0],
                cpu[1],
                cpu[2],
                loadavg()
            );
            rps[k].push(x);
            p99[k].push(p);
            this.push(x);
        }
        for k in 1..stacks.len() {
            ratios[k].push(this[k] / this[0]);
        }
    }
    report(&mut rps, &mut p99, &mut ratios);
    for (kind, st) in stacks.iter().filter(|(k, _)| k.starts_with("sessionmesh")) {
        let app = std::net::SocketAddr::from(([127, 0, 0, 1], st.app_ports[0]));
        let j = User::new(app).get("/jmx").await?.json();
        println!("# tomcat: {kind} node1 Manager counters (JMX): {j}");
        if let (Some(w), Some(b)) = (j["batchedWrites"].as_f64(), j["writeBatches"].as_f64()) {
            // Group commit: how many requests' writes shared one call to the sidecar.
            figure(
                &format!("tomcat_writes_per_batch_{kind}"),
                w / b.max(1.0),
                "writes",
            );
        }
    }
    for (kind, st) in stacks.iter_mut().skip(1) {
        let lost = lost_after_sigkill(st).await?;
        figure(
            &format!("tomcat_lost_of_{LOSS_SESSIONS}_after_sigkill_{kind}"),
            lost as f64,
            "sessions",
        );
    }
    println!("# tomcat: load average at end {}", loadavg());
    Ok(())
}

/// Medians (and the ratios' ranges) over the rounds, per stack.
fn report(rps: &mut [Vec<f64>], p99: &mut [Vec<f64>], ratios: &mut [Vec<f64>]) {
    for (k, kind) in kinds().iter().enumerate() {
        figure(
            &format!("tomcat_rps_c{CONNS}_{kind}"),
            pct(&mut rps[k], 0.5),
            "req/s",
        );
        figure(
            &format!("tomcat_p99_ms_c{CONNS}_{kind}"),
            pct(&mut p99[k], 0.5),
            "ms",
        );
        if k > 0 {
            let (lo, hi) = (pct(&mut ratios[k], 0.0), pct(&mut ratios[k], 1.0));
            figure(
                &format!("tomcat_ratio_{kind}"),
                pct(&mut ratios[k], 0.5),
                "ratio",
            );
            figure(&format!("tomcat_ratio_{kind}_min"), lo, "ratio");
            figure(&format!("tomcat_ratio_{kind}_max"), hi, "ratio");
        }
    }
}
