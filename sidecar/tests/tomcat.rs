//! Tomcat apps join unchanged: three Debian tomcat10 instances (one
//! CATALINA_BASE each, `e2e/tomcat/run.sh`) with the sessionmesh Manager, one
//! sidecar each, behind HAProxy with cookie stickiness. Needs the adapter
//! built (`adapters/tomcat`, Maven offline) and `e2e/setup.sh`'s packages.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::too_many_lines)]

use sessionmesh_sidecar::demo::localcluster::require;
use sessionmesh_sidecar::demo::stack::{AppSpec, LbChoice, Stack, User};
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sessionmesh-sidecar"))
}

fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The adapter jar, built with Maven offline if it is not there yet.
fn adapter() {
    let jar = root().join("adapters/tomcat/target/sessionmesh-tomcat-0.1.0.jar");
    if jar.is_file() {
        return;
    }
    let mvn = require("mvn");
    let st = std::process::Command::new(mvn)
        .args([
            "-B",
            "-o",
            "-q",
            "-Dmaven.repo.local=/usr/share/maven-repo",
            "package",
        ])
        .current_dir(root().join("adapters/tomcat"))
        .status()
        .expect("mvn");
    assert!(st.success(), "building adapters/tomcat failed");
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
    let app = |i: usize| std::net::SocketAddr::from(([127, 0, 0, 1], st.app_ports[i]));
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
    let app = |st: &Stack, i: usize| std::net::SocketAddr::from(([127, 0, 0, 1], st.app_ports[i]));
    let mut u = User::new(app(&st, 0));
    assert_eq!(u.get("/login?user=carol").await.expect("login").status, 200);
    assert_eq!(u.get("/whoami").await.expect("whoami").json()["visits"], 1);
    st.cl.kill(0);
    for n in 2..=4 {
        let r = u.get("/whoami").await.expect("whoami");
        assert_eq!(r.status, 200, "served from local memory: {}", r.text());
        assert_eq!(r.json()["visits"], n);
    }
    // Back on the address the Tomcat knows.
    let http = st.cl.nodes[0].http.expect("address").to_string();
    st.cl
        .start_with(0, &["--http", &http])
        .expect("restart the sidecar");
    assert!(st.cl.wait_ready(0, Duration::from_secs(15)).await);
    let r = u.get("/whoami").await.expect("whoami");
    assert_eq!(
        r.json()["visits"],
        5,
        "local changes kept over the cluster's older copy"
    );
    // Another Tomcat now sees what node1 did while its sidecar was away.
    let cookie = u.session_cookie().cloned().expect("cookie");
    let mut v = User::new(app(&st, 2));
    v.jar.insert("JSESSIONID".into(), cookie);
    let r = v.get("/whoami").await.expect("whoami");
    assert_eq!(r.json()["visits"], 6, "{}", r.text());
}
