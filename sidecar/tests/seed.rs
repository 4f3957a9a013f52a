//! The seed scenario with real HAProxy (Debian's package, started on loopback
//! by each test): three app instances, each with a sidecar, cookie persistence,
//! SIGKILL, graceful shutdown, and a rolling restart under load.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::too_many_lines)]

use sessionmesh_sidecar::demo::localcluster::LocalCluster;
use sessionmesh_sidecar::demo::stack::{AppSpec, LbChoice, Stack, User};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn bin() -> std::path::PathBuf {
    env!("CARGO_BIN_EXE_sessionmesh-sidecar").into()
}

async fn stack() -> Stack {
    sessionmesh_sidecar::demo::localcluster::require("haproxy");
    Stack::start(&bin(), 3, &[], LbChoice::Haproxy, "sync")
        .await
        .expect("stack with HAProxy (is haproxy installed?)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_of_the_node_holding_the_session_keeps_the_user_logged_in() {
    scenario_a(stack().await).await;
}

/// The demo's fallback when HAProxy is not installed behaves the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_with_the_builtin_router() {
    let st = Stack::start(&bin(), 3, &[], LbChoice::Builtin, "sync")
        .await
        .expect("stack");
    assert_eq!(st.lb_name(), "built-in cookie-sticky router");
    scenario_a(st).await;
}

async fn scenario_a(mut st: Stack) {
    let mut user = User::new(st.lb_addr);
    let mut holder = String::new();
    for i in 1..=20u64 {
        let v = user.visit().await.expect("visit");
        assert_eq!(v.status, 200);
        assert_eq!(v.counter, Some(i));
        assert_eq!(v.new, i == 1);
        if i > 1 {
            assert_eq!(v.node, holder, "cookie persistence broken");
        }
        holder = v.node.clone();
    }
    assert!(user
        .session_cookie()
        .is_some_and(|c| c.ends_with(&format!(".{holder}"))));
    let i = st.index_of(&holder).expect("holder");
    st.kill_node(i);
    let t = Instant::now();
    let mut failed = 0;
    let v = loop {
        match user.visit().await {
            Ok(v) if v.status == 200 => break v,
            _ => failed += 1,
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no good response after the kill"
        );
    };
    let took = t.elapsed();
    eprintln!(
        "first good response {} ms after SIGKILL, {failed} failed before it",
        took.as_millis()
    );
    assert_eq!(v.counter, Some(21), "the user's counter did not continue");
    assert_ne!(v.node, holder);
    assert!(
        v.rebound,
        "the new node did not rebind the session to its route"
    );
    assert!(
        user.session_cookie()
            .is_some_and(|c| c.ends_with(&format!(".{}", v.node))),
        "cookie not rebound"
    );
    assert_eq!(failed, 0, "HAProxy should redispatch the first request");
    assert!(took < Duration::from_secs(1), "failover took {took:?}");
    // And it keeps counting on the new node.
    let v = user.visit().await.expect("visit");
    assert_eq!(v.counter, Some(22));
    assert!(!v.rebound);
}

async fn users_loop(
    lb: std::net::SocketAddr,
    n: usize,
    stop: Arc<AtomicBool>,
    stats: Arc<[AtomicU64; 4]>,
) -> Vec<tokio::task::JoinHandle<()>> {
    // stats: [requests, failed, sessions lost, regressions]
    (0..n)
        .map(|_| {
            let stop = stop.clone();
            let stats = stats.clone();
            tokio::spawn(async move {
                let mut u = User::new(lb);
                let mut last = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    match u.visit().await {
                        Ok(v) if v.status == 200 => {
                            stats[0].fetch_add(1, Ordering::Relaxed);
                            let c = v.counter.unwrap_or(0);
                            if last > 0 && v.new {
                                stats[2].fetch_add(1, Ordering::Relaxed);
                            } else if last > 0 && c != last + 1 {
                                stats[3].fetch_add(1, Ordering::Relaxed);
                            }
                            last = c;
                        }
                        _ => {
                            stats[1].fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                }
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_graceful_shutdown_after_draining_fails_no_request() {
    let mut st = stack().await;
    let stop = Arc::new(AtomicBool::new(false));
    let stats: Arc<[AtomicU64; 4]> = Arc::new(Default::default());
    let users = users_loop(st.lb_addr, 20, stop.clone(), stats.clone()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    st.stop_node_gracefully(0).await.expect("graceful stop");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for u in users {
        u.await.expect("user");
    }
    let s: Vec<u64> = stats.iter().map(|a| a.load(Ordering::Relaxed)).collect();
    eprintln!(
        "requests {} failed {} lost {} regressions {}",
        s[0], s[1], s[2], s[3]
    );
    assert!(s[0] > 100, "too little load to mean anything");
    assert_eq!(s[1], 0, "a request failed during a drained shutdown");
    assert_eq!(s[2], 0, "a session was lost");
    assert_eq!(s[3], 0, "a counter went backwards");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_rolling_restart_under_load_loses_no_session() {
    let mut st = stack().await;
    let stop = Arc::new(AtomicBool::new(false));
    let stats: Arc<[AtomicU64; 4]> = Arc::new(Default::default());
    let users = users_loop(st.lb_addr, 200, stop.clone(), stats.clone()).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    for i in 0..3 {
        st.stop_node_gracefully(i).await.expect("stop");
        st.restart_node(i).await.expect("restart");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for u in users {
        u.await.expect("user");
    }
    let s: Vec<u64> = stats.iter().map(|a| a.load(Ordering::Relaxed)).collect();
    eprintln!(
        "rolling restart: requests {} failed {} lost {} regressions {}",
        s[0], s[1], s[2], s[3]
    );
    assert!(s[0] > 1000, "too little load to mean anything");
    assert_eq!(s[2], 0, "sessions lost in a rolling restart");
    assert_eq!(s[3], 0, "counter regressions in a rolling restart");
    assert_eq!(s[1], 0, "failed requests in a drained rolling restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_colliding_receiver_ports_are_a_clear_startup_error() {
    let mut cl = LocalCluster::new(&bin(), 3, &[]).expect("cluster");
    // The classic server.xml mistake: every instance on the host with the same Receiver port.
    let shared = cl.nodes[0].replication;
    for n in cl.nodes.iter_mut() {
        n.replication = shared;
    }
    cl.write_members().expect("members");
    for i in 0..3 {
        assert!(
            cl.start(i).is_err(),
            "node{} started with a colliding receiver port",
            i + 1
        );
        let log = cl.log_text(i);
        assert!(log.contains("members[1].address"), "node{}: {log}", i + 1);
        assert!(
            log.contains("every member needs its own receiver port"),
            "node{}: {log}",
            i + 1
        );
    }
}

/// Apps that listen late (a JVM or a Django import takes seconds): the stack
/// is ready only once HAProxy has checked every app, so the first requests
/// are answered by each of them, never with a 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stack_waits_for_apps_that_listen_late() {
    sessionmesh_sidecar::demo::localcluster::require("haproxy");
    let late = AppSpec::External {
        program: "sh".into(),
        args: vec![
            "-c".into(),
            "sleep 1; exec \"$0\" demo-app --listen 127.0.0.1:$PORT --sidecar $SIDECAR_HTTP \
             --route $JVM_ROUTE --name $NODE_NAME --send sync"
                .into(),
            bin().display().to_string(),
        ],
    };
    let st = Stack::start_apps(&bin(), 3, &[], LbChoice::Haproxy, "sync", late)
        .await
        .expect("stack");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let r = User::new(st.lb_addr).get("/health").await.expect("health");
        assert_eq!(r.status, 200, "{} ({})", r.text(), st.lb_report());
        seen.insert(r.json()["node"].as_str().unwrap_or_default().to_owned());
    }
    assert_eq!(seen.len(), 3, "round robin over every app: {seen:?}");
}
