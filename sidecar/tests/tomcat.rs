//! Tomcat apps join unchanged: three Debian tomcat10 instances (one
//! CATALINA_BASE each, `e2e/tomcat/run.sh`) with the sessionmesh Manager, one
//! sidecar each, behind HAProxy with cookie stickiness. Needs the adapter
//! built (`adapters/tomcat`, Maven offline) and `e2e/setup.sh`'s packages.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::too_many_lines)]

use sessionmesh_sidecar::demo::localcluster::require;
use sessionmesh_sidecar::demo::stack::{AppSpec, LbChoice, Stack, User};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sessionmesh-sidecar"))
}

fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The adapter jar and the test app's listener classes, built
/// (`e2e/tomcat/build.sh`: Maven offline, javac) if they are not there yet.
fn adapter() {
    let jar = root().join("adapters/tomcat/target/sessionmesh-tomcat-0.1.0.jar");
    let classes = root().join("e2e/tomcat/webapp/WEB-INF/classes/e2e/Events.class");
    if jar.is_file() && classes.is_file() {
        return;
    }
    require("mvn");
    require("javac");
    let st = std::process::Command::new("bash")
        .arg(root().join("e2e/tomcat/build.sh"))
        .status()
        .expect("bash");
    assert!(st.success(), "e2e/tomcat/build.sh failed");
}

fn app(st: &Stack, i: usize) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], st.app_ports[i]))
}

/// A user of node `i` (no load balancer) carrying `cookie`.
fn on(st: &Stack, i: usize, cookie: &str) -> User {
    let mut u = User::new(app(st, i));
    u.jar.insert("JSESSIONID".into(), cookie.to_owned());
    u
}

/// The session events node `i` recorded since the last call.
async fn events(st: &Stack, i: usize) -> Vec<String> {
    let r = User::new(app(st, i)).get("/events").await.expect("events");
    assert_eq!(r.status, 200, "{}", r.text());
    serde_json::from_value(r.json()).expect("a JSON array")
}

/// The Manager's JMX attributes on node `i`.
async fn jmx(st: &Stack, i: usize) -> serde_json::Value {
    let r = User::new(app(st, i)).get("/jmx").await.expect("jmx");
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

async fn tomcats() -> Stack {
    require("haproxy");
    require("java");
    assert!(
        std::path::Path::new("/usr/share/tomcat10/bin/catalina.sh").is_file(),
        "tomcat10 is not installed (apt-get install tomcat10)"
    );
    adapter();
    Stack::start_apps(
        &bin(),
        3,
        &["--send", "sync"],
        LbChoice::Haproxy,
        "sync",
        AppSpec::External {
            program: root().join("e2e/tomcat/run.sh"),
            args: vec![],
        },
    )
    .await
    .expect("three Tomcats behind HAProxy")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tomcat_user_stays_logged_in_through_sigkill_with_no_failed_request() {
    let mut st = tomcats().await;
    let mut u = User::new(st.lb_addr);
    let r = u.get("/login?user=alice").await.expect("login");
    assert_eq!(r.status, 200, "login: {}", r.text());
    let mut visits = 0;
    let mut holder = String::new();
    for _ in 0..10 {
        let r = u.get("/whoami").await.expect("whoami");
        assert_eq!(r.status, 200, "{}", r.text());
        let j = r.json();
        assert_eq!(j["user"], "alice");
        visits += 1;
        assert_eq!(j["visits"], visits, "the counter goes on: {j}");
        holder = j["node"].as_str().unwrap_or_default().to_owned();
    }
    let i = st.index_of(&holder).expect("holder");
    st.kill_node(i);
    let t = Instant::now();
    let mut failed = 0;
    for _ in 0..50 {
        match u.get("/whoami").await {
            Ok(r) if r.status == 200 => {
                let j = r.json();
                assert_eq!(
                    j["user"], "alice",
                    "logged out after the SIGKILL of {holder}"
                );
                visits += 1;
                assert_eq!(j["visits"], visits, "the counter goes on: {j}");
                assert_ne!(j["node"], holder.as_str());
            }
            _ => failed += 1,
        }
    }
    println!(
        "50 requests after SIGKILL of {holder}: {failed} failed, {:?}",
        t.elapsed()
    );
    assert_eq!(failed, 0, "failed requests after the SIGKILL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_stickiness_every_tomcat_sees_the_latest_session_and_a_logout_everywhere() {
    let st = tomcats().await;
    let app = |i: usize| app(&st, i);
    let mut u = User::new(app(0));
    let r = u.get("/login?user=bob").await.expect("login");
    assert_eq!(r.status, 200, "{}", r.text());
    let cookie = u.session_cookie().cloned().expect("JSESSIONID");
    // Round robin over the three Tomcats, with no stickiness at all.
    for (n, i) in (0..9).map(|k| k % 3).enumerate() {
        let mut v = User::new(app(i));
        v.jar.insert("JSESSIONID".into(), cookie.clone());
        let r = v.get("/whoami").await.expect("whoami");
        assert_eq!(r.status, 200, "node{}: {}", i + 1, r.text());
        assert_eq!(
            r.json()["visits"],
            n as u64 + 1,
            "a stale copy on node{}",
            i + 1
        );
    }
    // Sticky again on node1, whose copy the change stream shows current: served
    // without asking the sidecar. Then one request on node2 and back to node1
    // with the same cookie: node1's copy is stale and must not be served.
    let mut u = on(&st, 0, &cookie);
    let mut visits = u.get("/whoami").await.expect("whoami").json()["visits"]
        .as_u64()
        .expect("visits");
    let deadline = Instant::now() + Duration::from_secs(10);
    while jmx(&st, 0).await["changeStreamConnected"] != true {
        assert!(Instant::now() < deadline, "node1 has no change stream");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let hits = jmx(&st, 0).await["nearCacheHits"].as_u64().expect("hits");
    for k in 0..6 {
        let holder = if k % 3 == 2 { 1 } else { 0 };
        let mut v = on(&st, holder, &cookie);
        let r = v.get("/whoami").await.expect("whoami");
        visits += 1;
        assert_eq!(
            r.json()["visits"],
            visits,
            "visit {k} on node{}",
            holder + 1
        );
    }
    let m = jmx(&st, 0).await;
    assert!(
        m["nearCacheHits"].as_u64().expect("hits") > hits,
        "node1 served its current copy without asking: {m}"
    );
    // Logout on node2: node1 and node3 (which hold local copies) see it at once.
    let mut v = User::new(app(1));
    v.jar.insert("JSESSIONID".into(), cookie.clone());
    assert_eq!(v.get("/logout").await.expect("logout").status, 200);
    let deadline = Instant::now() + Duration::from_secs(2);
    for i in [0, 2] {
        let mut w = User::new(app(i));
        w.jar.insert("JSESSIONID".into(), cookie.clone());
        let r = w.get("/whoami").await.expect("whoami");
        assert_eq!(
            r.status,
            401,
            "node{} still serves an invalidated session",
            i + 1
        );
        assert!(Instant::now() < deadline);
    }
}

/// The sidecar of one Tomcat dies: that Tomcat keeps serving the sessions it
/// holds from local memory (no 500), and its changes reach the cluster once
/// the sidecar is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tomcat_keeps_serving_while_its_sidecar_is_down_and_catches_up() {
    let mut st = tomcats().await;
    let mut u = User::new(app(&st, 0));
    assert_eq!(u.get("/login?user=carol").await.expect("login").status, 200);
    assert_eq!(u.get("/whoami").await.expect("whoami").json()["visits"], 1);
    st.cl.kill(0);
    // Five seconds without the sidecar: every request is answered.
    let t = Instant::now();
    let mut n = 1;
    while t.elapsed() < Duration::from_secs(5) {
        let r = u.get("/whoami").await.expect("whoami");
        n += 1;
        assert_eq!(r.status, 200, "served from local memory: {}", r.text());
        assert_eq!(r.json()["visits"], n);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = jmx(&st, 0).await;
    assert_eq!(m["sidecarReachable"], false, "{m}");
    assert!(m["degradedRequests"].as_u64() >= Some(n - 1), "{m}");
    // Back on the address the Tomcat knows.
    let http = st.cl.nodes[0].http.expect("address").to_string();
    st.cl
        .start_with(0, &["--http", &http])
        .expect("restart the sidecar");
    assert!(st.cl.wait_ready(0, Duration::from_secs(15)).await);
    let r = u.get("/whoami").await.expect("whoami");
    n += 1;
    assert_eq!(
        r.json()["visits"],
        n,
        "local changes kept over the cluster's older copy"
    );
    assert_eq!(jmx(&st, 0).await["sidecarReachable"], true);
    // Another Tomcat now sees what node1 did while its sidecar was away.
    let cookie = u.session_cookie().cloned().expect("cookie");
    let mut v = on(&st, 2, &cookie);
    let r = v.get("/whoami").await.expect("whoami");
    assert_eq!(r.json()["visits"], n + 1, "{}", r.text());
}

/// Listeners fire as with StandardManager: created, id changes and attribute
/// events where they happen, activation when a session arrives on a node,
/// and at expiry `sessionDestroyed` (with `valueUnbound`) once, on the node
/// that served the session last; a copy left on a node the session moved
/// away from is dropped silently. The jvmRoute suffix is rebound on arrival.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_fire_as_with_standard_manager_and_expiry_ends_the_session_once() {
    let st = tomcats().await;
    let mut u = User::new(app(&st, 0));
    let r = u.get("/login?user=erin&ttl=2").await.expect("login");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        events(&st, 0).await,
        ["created", "idChanged", "added:user", "added:visits"]
    );
    assert_eq!(u.get("/bind").await.expect("bind").status, 200);
    assert_eq!(events(&st, 0).await, ["bound:bound", "added:bound"]);
    let cookie = u.session_cookie().cloned().expect("cookie");
    assert!(cookie.ends_with(&format!(".{}", st.cl.nodes[0].route)));

    // On node2 the session arrives: activated, not created; its route rebound.
    let mut v = on(&st, 1, &cookie);
    let r = v.get("/whoami").await.expect("whoami");
    assert_eq!(r.status, 200, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap_or_default().to_owned();
    assert!(id.ends_with(&format!(".{}", st.cl.nodes[1].route)), "{id}");
    assert_eq!(
        cookie.split('.').next(),
        id.split('.').next(),
        "same session"
    );
    assert_eq!(v.session_cookie(), Some(&id), "the new cookie is sent");
    assert_eq!(
        events(&st, 1).await,
        ["activate", "idChanged", "replaced:visits"]
    );

    // Then node1 serves it again, later (so node2's copy is one it moved away from).
    tokio::time::sleep(Duration::from_millis(2 * 250 + 100)).await;
    let mut w = on(&st, 0, &id);
    assert_eq!(w.get("/whoami").await.expect("whoami").json()["visits"], 2);

    // Expiry: sessionDestroyed on node1 only, then the attributes unbound
    // (Tomcat's order; the events are read until the last one is there).
    let t = Instant::now();
    let mut on1 = Vec::new();
    while !on1.iter().any(|e| e == "removed:user") {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no sessionDestroyed on node1: {on1:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        on1.extend(events(&st, 0).await);
    }
    let on2 = events(&st, 1).await;
    println!("events: node1 {on1:?}, node2 {on2:?}");
    let at = |e: &str| on1.iter().position(|x| x == e);
    assert!(at("destroyed") < at("unbound:bound"), "{on1:?}");
    assert!(at("unbound:bound").is_some(), "{on1:?}");
    assert_eq!(on1.iter().filter(|e| *e == "destroyed").count(), 1);
    assert!(!on2.contains(&"destroyed".to_owned()), "node2: {on2:?}");
    assert!(
        on2.contains(&"passivate".to_owned()),
        "node2 drops its copy: {on2:?}"
    );
    assert_eq!(
        events(&st, 2).await,
        Vec::<String>::new(),
        "node3 never held it"
    );
    assert!(jmx(&st, 0).await["expiredSessions"].as_u64() >= Some(1));
    assert_eq!(jmx(&st, 1).await["expiredSessions"], 0);
    // Gone everywhere.
    let r = on(&st, 2, &id).get("/whoami").await.expect("whoami");
    assert_eq!(r.status, 401, "{}", r.text());
}

/// Login renames the session (session fixation protection): the id from
/// before the login is refused everywhere. A logout on one node is final on
/// every node, with one `sessionDestroyed`, where the logout happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_session_id_at_login_and_logout_are_final_on_every_node() {
    let st = tomcats().await;
    let mut u = User::new(app(&st, 0));
    assert_eq!(u.get("/bind").await.expect("anonymous session").status, 200);
    let before = u.session_cookie().cloned().expect("cookie");
    assert_eq!(u.get("/login?user=frank").await.expect("login").status, 200);
    let after = u.session_cookie().cloned().expect("cookie");
    assert_ne!(before, after, "login changes the session id");
    let r = on(&st, 2, &before).get("/whoami").await.expect("whoami");
    assert_eq!(r.status, 401, "the pre-login id still works: {}", r.text());
    let r = on(&st, 1, &after).get("/whoami").await.expect("whoami");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["user"], "frank");
    let _ = events(&st, 0).await;
    let _ = events(&st, 1).await;

    assert_eq!(
        on(&st, 1, &after)
            .get("/logout")
            .await
            .expect("logout")
            .status,
        200
    );
    for i in 0..3 {
        let r = on(&st, i, &after).get("/whoami").await.expect("whoami");
        assert_eq!(
            r.status,
            401,
            "node{} after the logout: {}",
            i + 1,
            r.text()
        );
    }
    assert!(events(&st, 1).await.contains(&"destroyed".to_owned()));
    let on1 = events(&st, 0).await;
    assert!(!on1.contains(&"destroyed".to_owned()), "node1: {on1:?}");
    assert_eq!(jmx(&st, 1).await["replicationErrors"], 0);
}

/// A rolling restart of all three Tomcats (each drained in HAProxy, stopped,
/// its sidecar and Tomcat started again) under 200 logged-in users: no
/// session lost, no counter going backwards, no failed request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_tomcat_under_200_users_loses_nothing() {
    let mut st = tomcats().await;
    let stop = Arc::new(AtomicBool::new(false));
    // requests, failed, sessions lost, counter regressions
    let stats: Arc<[AtomicU64; 4]> = Arc::new(Default::default());
    let failures = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::new()));
    let mut users = Vec::new();
    for n in 0..200 {
        let mut u = User::new(st.lb_addr);
        let r = u.get(&format!("/login?user=r{n}")).await.expect("login");
        assert_eq!(r.status, 200, "{}", r.text());
        let (stop, stats, failures) = (stop.clone(), stats.clone(), failures.clone());
        users.push(tokio::spawn(async move {
            let mut last = 0;
            while !stop.load(Ordering::Relaxed) {
                match u.get("/whoami").await {
                    Ok(r) if r.status == 200 => {
                        stats[0].fetch_add(1, Ordering::Relaxed);
                        let v = r.json()["visits"].as_u64().unwrap_or(0);
                        if v != last + 1 {
                            stats[3].fetch_add(1, Ordering::Relaxed);
                        }
                        last = v;
                    }
                    Ok(r) if r.status == 401 => {
                        stats[2].fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    other => {
                        stats[1].fetch_add(1, Ordering::Relaxed);
                        let what = match other {
                            Ok(r) => format!(
                                "HTTP {} {}",
                                r.status,
                                r.text().chars().take(60).collect::<String>()
                            ),
                            Err(e) => format!("{e:#}").chars().take(80).collect(),
                        };
                        if let Ok(mut f) = failures.lock() {
                            *f.entry(what).or_insert(0u64) += 1;
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
        }));
    }
    for i in 0..3 {
        st.stop_node_gracefully(i).await.expect("stop");
        st.restart_node(i).await.expect("restart");
    }
    stop.store(true, Ordering::Relaxed);
    for u in users {
        u.await.expect("user");
    }
    // node1 served its share of 200 busy users since its restart: requests
    // that finished together shared batches (group commit).
    let m = jmx(&st, 0).await;
    let (batches, batched) = (m["writeBatches"].as_u64(), m["batchedWrites"].as_u64());
    println!("node1 group commit: {batched:?} writes in {batches:?} batches");
    assert!(batches > Some(0), "no write went through a batch: {m}");
    assert!(batched > batches, "no batch carried two writes: {m}");
    let s: Vec<u64> = stats.iter().map(|a| a.load(Ordering::Relaxed)).collect();
    println!(
        "rolling restart of 3 Tomcats: requests {} failed {} lost {} regressions {}; failures {:?}",
        s[0],
        s[1],
        s[2],
        s[3],
        failures.lock().map(|f| f.clone()).unwrap_or_default()
    );
    println!("load balancer: {}", st.lb_report());
    assert!(s[0] > 1000, "too little load to mean anything");
    assert_eq!(s[2], 0, "sessions lost in a rolling restart");
    assert_eq!(s[3], 0, "counter regressions in a rolling restart");
    assert_eq!(s[1], 0, "failed requests in a drained rolling restart");
}
